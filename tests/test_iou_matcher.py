"""IoU-threshold matcher and balanced sampler of the RPN: hand-made IoU matrices, torchvision's
Matcher on random boxes, padding, cross-boundary anchors and sampler counts."""

import pytest
import torch
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher
from torchvision.ops import box_iou

import anchordet.matching as matching
from anchordet.anchors import AnchorGrid
from anchordet.matching import BalancedSampler, IoUMatcher, best_iou_with_gt, match_iou_matrix, pad_targets

# Rows are anchors a0..a3, columns GTs g0..g2. Column maxima: g0 0.9 (a0), g1 0.4 (a1), g2 0.25 (a3).
HAND_IOU = torch.tensor(
    [
        [0.90, 0.00, 0.10],  # best 0.9 >= 0.7            -> foreground g0
        [0.50, 0.40, 0.00],  # best 0.5 in [0.3, 0.7)     -> ignored; holds g1's best (0.4) -> low quality
        [0.35, 0.20, 0.00],  # best 0.35 in the band      -> ignored, best of no GT
        [0.00, 0.10, 0.25],  # best 0.25 < 0.3            -> background; holds g2's best -> low quality
    ]
)


def test_hand_made_matrix_thresholds_and_ignore_band():
    matched, labels = match_iou_matrix(HAND_IOU, allow_low_quality=False)
    assert matched.tolist() == [0, -1, -1, -1]  # a GT slot only for foreground: the labels say the rest
    assert labels.tolist() == [1, -1, -1, 0]


def test_hand_made_matrix_low_quality_matches():
    matched, labels = match_iou_matrix(HAND_IOU, allow_low_quality=True)
    # a1 is promoted by g1 but learns its own best GT, g0 (0.5 > 0.4); a3 is promoted by and learns g2.
    assert matched.tolist() == [0, 0, -1, 2]
    assert labels.tolist() == [1, 1, -1, 1]


def test_thresholds_are_inclusive_for_foreground_and_background_band():
    iou = torch.tensor([[0.7], [0.6999], [0.3], [0.2999], [1.0]])
    matched, labels = match_iou_matrix(iou, allow_low_quality=False)
    assert labels.tolist() == [1, -1, -1, 0, 1]
    assert matched.tolist() == [0, -1, -1, -1, 0]


def test_low_quality_ties_are_all_kept_and_a_gt_without_overlap_promotes_nothing():
    iou = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.2, 0.0]])
    matched, labels = match_iou_matrix(iou)
    # g0's best 0.5 is held by a0 and a1 (a tie): both positive. g1 overlaps nothing: with its best at
    # 0 every anchor would "hold" it; torchvision would then turn a2 positive too, we do not.
    assert labels.tolist() == [1, 1, 0]
    assert matched.tolist() == [0, 0, -1]


def test_padding_slots_never_match_even_with_high_iou():
    iou = HAND_IOU.clone()
    iou[:, 2] = torch.tensor([0.1, 0.0, 0.95, 0.25])  # g2 is padding: 0.95 must not count
    mask = torch.tensor([True, True, False])
    matched, labels = match_iou_matrix(iou, mask)
    # Without g2: a2 keeps 0.35 (ignored), a3's best real IoU is 0.1 -> background.
    assert matched.tolist() == [0, 0, -1, -1]
    assert labels.tolist() == [1, 1, -1, 0]
    # Batched form, an all-padding image: everything background.
    batch = torch.stack([iou, iou])
    masks = torch.stack([mask, torch.zeros(3, dtype=torch.bool)])
    matched, labels = match_iou_matrix(batch, masks)
    assert matched.shape == (2, 4)
    assert matched[1].tolist() == [-1] * 4 and labels[1].tolist() == [0] * 4
    assert matched[0].tolist() == [0, 0, -1, -1]


def test_zero_gt_slots_and_bad_thresholds():
    matched, labels = match_iou_matrix(torch.zeros(2, 5, 0))
    assert matched.shape == (2, 5) and (labels == 0).all()
    with pytest.raises(ValueError, match="bg_iou"):
        IoUMatcher(fg_iou=0.3, bg_iou=0.7)


def _random_boxes(n: int, generator: torch.Generator, extent: float = 200.0) -> torch.Tensor:
    xy = extent * torch.rand(n, 2, generator=generator)
    return torch.cat([xy, xy + 8 + 90 * torch.rand(n, 2, generator=generator)], dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_torchvision_matcher_on_random_boxes(seed):
    g = torch.Generator().manual_seed(seed)
    # 13 x 13 cells of stride 16 on a 208 px input, three random shapes per cell: 507 anchors.
    grid = AnchorGrid.build([8 + 90 * torch.rand(3, 2, generator=g)], [16], [(13, 13)], (208, 208))
    anchors = grid.boxes
    counts = [7, 0, 3]  # an image without boxes in the middle
    targets = []
    for count in counts:
        boxes = _random_boxes(count, g)
        # torchvision lets a GT without any overlap promote every anchor (see the test above);
        # keep GTs that overlap some anchor so both define the same matching.
        if count:
            boxes = boxes[box_iou(boxes, anchors).amax(dim=1) > 0]
        targets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long)})
    gt_boxes, _, gt_mask = pad_targets(targets)
    matched, labels = IoUMatcher()(grid, gt_boxes, gt_mask)
    reference = TorchvisionMatcher(0.7, 0.3, allow_low_quality_matches=True)
    for image, target in enumerate(targets):
        if len(target["boxes"]) == 0:
            assert (matched[image] == -1).all()
            continue
        expected = reference(box_iou(target["boxes"], anchors))  # [N]: index, -1 below, -2 between
        assert torch.equal(matched[image], expected.clamp(min=-1)), f"image {image}"
        expected_labels = torch.where(expected >= 0, 1, torch.where(expected == -1, 0, -1))
        assert torch.equal(labels[image], expected_labels)
    assert (labels[0] == 1).any() and (labels[0] == -1).any() and (labels[0] == 0).any()


def test_cross_boundary_anchors_are_ignored_only_when_asked():
    # Two one-cell levels on a 64 x 64 input: a 20 x 20 anchor centred at (10, 10) (stride 20) and a
    # 25 x 25 anchor centred at (52.5, 52.5) (stride 105): [40, 40, 65, 65] reaches past 64.
    grid = AnchorGrid.build([torch.tensor([[20.0, 20.0]]), torch.tensor([[25.0, 25.0]])], [20, 105],
                            [(1, 1), (1, 1)], (64, 64), offset=0.5)
    torch.testing.assert_close(grid.boxes, torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 40.0, 65.0, 65.0]]))
    gt_boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [36.0, 40.0, 61.0, 65.0]]])
    gt_mask = torch.tensor([[True, True]])
    # Anchor 1 vs GT 1: inter 21 * 25 = 525, union 625 + 625 - 525 = 725 -> 0.72 (foreground).
    matched, labels = IoUMatcher(allow_low_quality=False)(grid, gt_boxes, gt_mask)
    assert labels.tolist() == [[1, 1]] and matched.tolist() == [[0, 1]]
    matched, labels = IoUMatcher(ignore_cross_boundary=True, allow_low_quality=False)(grid, gt_boxes, gt_mask)
    assert labels.tolist() == [[1, -1]] and matched.tolist() == [[0, -1]]


def test_matching_in_blocks_equals_the_whole_matrix_and_bounds_the_block_size(monkeypatch):
    """Crowded images match in blocks of anchors (MAX_IOU_ELEMENTS), with the same result as one
    [B, N, M] matrix, including the low-quality matches that need every block's maximum first."""
    g = torch.Generator().manual_seed(7)
    grid = AnchorGrid.build([8 + 60 * torch.rand(3, 2, generator=g)], [8], [(20, 20)], (160, 160))
    targets = [{"boxes": _random_boxes(n, g, extent=150), "labels": torch.zeros(n, dtype=torch.long)}
               for n in (40, 0, 25)]
    gt_boxes, _, gt_mask = pad_targets(targets)
    whole = match_iou_matrix(box_iou(grid.boxes[None], gt_boxes), gt_mask)
    sizes = []
    real_box_iou = matching.box_iou

    def recording_box_iou(a, b):
        result = real_box_iou(a, b)
        sizes.append(result.numel())
        return result

    monkeypatch.setattr(matching, "box_iou", recording_box_iou)
    monkeypatch.setattr(matching, "MAX_IOU_ELEMENTS", 3 * 40 * 100)  # blocks of 100 of the 1200 anchors
    blocked = IoUMatcher()(grid, gt_boxes, gt_mask)
    assert torch.equal(blocked.labels, whole.labels) and torch.equal(blocked.matched_gt, whole.matched_gt)
    assert max(sizes) <= 3 * 40 * 100 and len(sizes) == 2 * 12  # two passes over 12 blocks
    assert (whole.labels == 1).any() and (whole.labels == -1).any()
    # YOLO's ignore rule takes the best IoU per decoded box the same way.
    decoded = grid.boxes[None].expand(3, -1, -1) + torch.randn(3, grid.num_anchors, 4, generator=g)
    expected = box_iou(decoded, gt_boxes).masked_fill(~gt_mask[:, None, :], -1.0).amax(dim=2)
    torch.testing.assert_close(best_iou_with_gt(decoded, gt_boxes, gt_mask), expected)


# ------------------------------------------------------------------ sampler
def _labels(num_positive: int, num_negative: int, num_ignored: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.tensor([1] * num_positive + [0] * num_negative + [-1] * num_ignored)
    return labels[torch.randperm(len(labels), generator=generator)]


def test_sampler_counts_caps_and_keeps_all_scarce_positives():
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([
        _labels(300, 3000, 100, g),  # many positives: 128 + 128
        _labels(10, 3000, 390, g),   # few positives: all 10 + 246 negatives
        _labels(0, 3000, 400, g),    # none: 256 negatives
        _labels(5, 20, 3375, g),     # fewer than 256 candidates: all 25
    ])
    positive, negative = BalancedSampler(256, 0.5)(labels, generator=torch.Generator().manual_seed(1))
    assert positive.sum(dim=1).tolist() == [128, 10, 0, 5]
    assert negative.sum(dim=1).tolist() == [128, 246, 256, 20]
    assert (labels[positive] == 1).all() and (labels[negative] == 0).all()
    assert not (positive & negative).any()
    assert positive[1].sum() == (labels[1] == 1).sum()


def test_sampler_is_random_but_seedable():
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([_labels(300, 3000, 0, g)] * 2)
    sampler = BalancedSampler(64, 0.25)
    first = sampler(labels, generator=torch.Generator().manual_seed(5))
    again = sampler(labels, generator=torch.Generator().manual_seed(5))
    other = sampler(labels, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    # The two identical images of one call get different draws (independent scores per image).
    assert not torch.equal(first[0][0], first[0][1])
    assert first[0].sum(dim=1).tolist() == [16, 16] and first[1].sum(dim=1).tolist() == [48, 48]


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="batch_size_per_image"):
        BalancedSampler(0)
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(256, 1.5)
