import math

import pytest
import torch

from anchordet.anchors import AnchorGrid
from anchordet.matching import MatchResult, YoloMatcher, pad_targets

# A 64 x 64 input on strides 8, 16, 32: level sizes 8x8 (A=2), 4x4 (A=1), 2x2 (A=2).
SHAPES = [torch.tensor([[8.0, 8.0], [16.0, 8.0]]), torch.tensor([[24.0, 24.0]]), torch.tensor([[48.0, 48.0], [60.0, 30.0]])]
STRIDES = [8, 16, 32]
GRIDS = [(8, 8), (4, 4), (2, 2)]
N = 8 * 8 * 2 + 4 * 4 * 1 + 2 * 2 * 2  # 152; level starts 0, 128, 144


def yolo_match(matcher, gt_boxes, gt_mask, shapes=SHAPES, strides=STRIDES, grids=GRIDS, input_size=(64, 64)):
    """matched_gt [B, N] of the matcher contract, checking the labels that come with it."""
    result = matcher(AnchorGrid.build(shapes, strides, grids, input_size), gt_boxes, gt_mask)
    assert isinstance(result, MatchResult)
    # The YOLO matcher has no ignore band: foreground exactly where a GT is assigned.
    assert torch.equal(result.labels, (result.matched_gt >= 0).long())
    return result.matched_gt


def _target(boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.arange(boxes.shape[0])}


def test_pad_targets():
    targets = [_target([[0, 0, 1, 1], [2, 2, 3, 3]]), _target([]), _target([[5, 5, 6, 6]])]
    gt_boxes, gt_labels, gt_mask = pad_targets(targets)
    assert gt_boxes.shape == (3, 2, 4) and gt_labels.dtype == torch.int64
    assert gt_mask.tolist() == [[True, True], [False, False], [True, False]]
    assert gt_boxes[0, 1].tolist() == [2, 2, 3, 3] and gt_boxes[2, 0].tolist() == [5, 5, 6, 6]
    assert gt_boxes[1].abs().sum() == 0 and gt_labels.tolist() == [[0, 1], [0, 0], [0, 0]]
    gt_boxes, _, gt_mask = pad_targets([_target([]), _target([])])
    assert gt_boxes.shape == (2, 1, 4) and not gt_mask.any()


def _hand_batch():
    # gt0: wh (8, 8), centre (4, 4)    -> shape (8, 8) (IoU 1) on level 0, cell (0, 0)  -> 0
    # gt1: wh (24, 24), centre (32, 48) -> shape (24, 24) on level 1, cell (col 2, row 3)
    #                                     -> 128 + (3*4 + 2) = 142
    # gt2: wh (60, 30), centre (34, 25) -> shape (60, 30) (IoU 1; (48, 48) only 1440/2664 = 0.54)
    #                                     on level 2, cell (col 1, row 0) -> 144 + (0*2 + 1)*2 + 1 = 147
    image0 = _target([[0, 0, 8, 8], [20, 36, 44, 60], [4, 10, 64, 40]])
    return pad_targets([image0, _target([])])


def test_yolo_matcher_hand_made_batch_with_an_empty_image():
    gt_boxes, _, gt_mask = _hand_batch()
    matched = yolo_match(YoloMatcher(), gt_boxes, gt_mask)
    assert matched.shape == (2, N) and matched.dtype == torch.int64
    expected = torch.full((2, N), -1)
    expected[0, 0], expected[0, 142], expected[0, 147] = 0, 1, 2
    assert torch.equal(matched, expected)
    # Cross-check with the anchors as the head will see them: same (level, y, x, a) order.
    grid = AnchorGrid.build(SHAPES, STRIDES, GRIDS, (64, 64))
    assert grid.num_anchors == N
    assert grid.anchor_wh[[0, 142, 147]].tolist() == [[8, 8], [24, 24], [60, 30]]
    assert grid.cell_xy[[0, 142, 147]].tolist() == [[0, 0], [2, 3], [1, 0]]


def test_yolo_matcher_multi_anchor_option():
    gt_boxes, _, gt_mask = _hand_batch()
    # With t = 0.4 also: gt0 -> (16, 8) (IoU 64/128 = 0.5) at 0*2+1 = 1; gt2 -> (48, 48) (IoU 0.54)
    # at 144 + 2 = 146.  gt1's other IoUs are all <= 0.32.
    matched = yolo_match(YoloMatcher(multi_anchor_iou=0.4), gt_boxes, gt_mask)
    positives = (matched[0] >= 0).nonzero().flatten().tolist()
    assert positives == [0, 1, 142, 146, 147]
    assert matched[0, positives].tolist() == [0, 0, 1, 2, 2]
    assert (matched[1] == -1).all()
    # 0.5 is not "> 0.5": gt0 loses its extra anchor, gt2 keeps it.
    matched = yolo_match(YoloMatcher(multi_anchor_iou=0.5), gt_boxes, gt_mask)
    assert (matched[0] >= 0).nonzero().flatten().tolist() == [0, 142, 146, 147]
    with pytest.raises(ValueError, match="multi_anchor_iou"):
        YoloMatcher(multi_anchor_iou=1.5)


@pytest.mark.parametrize("small_first", [True, False])
def test_yolo_matcher_collision_goes_to_the_smaller_gt(small_first):
    # (10, 10) centre (5, 5) and (6, 6) centre (4, 4): both prefer (8, 8) (IoU 0.64 and 0.5625) in cell (0, 0).
    small, large = [1, 1, 7, 7], [0, 0, 10, 10]
    boxes = [small, large] if small_first else [large, small]
    gt_boxes, _, gt_mask = pad_targets([_target(boxes)])
    matched = yolo_match(YoloMatcher(), gt_boxes, gt_mask)
    assert matched[0, 0].item() == (0 if small_first else 1)
    assert (matched >= 0).sum() == 1


def test_yolo_matcher_best_anchor_claim_beats_a_smaller_extra_claim():
    # X: wh (12, 7), area 84: best (16, 8) (IoU 84/128), extra (8, 8) (IoU 56/92 = 0.61).
    # Y: wh (10, 10), area 100: best (8, 8) (0.64), extra (16, 8) (80/148 = 0.54).  Same cell (0, 0).
    x_box, y_box = [-1.0, 1.5, 11.0, 8.5], [0.0, 0.0, 10.0, 10.0]
    gt_boxes, _, gt_mask = pad_targets([_target([x_box, y_box])])
    matched = yolo_match(YoloMatcher(multi_anchor_iou=0.5), gt_boxes, gt_mask)
    assert matched[0, :2].tolist() == [1, 0]  # (8, 8) -> Y although X is smaller; (16, 8) -> X


def test_yolo_matcher_clamps_centres_on_and_beyond_the_border():
    # Centre (64, 64) is on the far border: floor(64 / 8) = 8 -> clamped to column/row 7 on level 0:
    # (7*8 + 7)*2 + 0 = 126.  Centre (-2, -2) clamps to cell (0, 0) -> 0.
    gt_boxes, _, gt_mask = pad_targets([_target([[60, 60, 68, 68], [-6, -6, 2, 2]])])
    matched = yolo_match(YoloMatcher(), gt_boxes, gt_mask)
    assert (matched[0] >= 0).nonzero().flatten().tolist() == [0, 126]
    assert matched[0, [0, 126]].tolist() == [1, 0]


def _reference_match(gt_boxes, gt_mask, shapes_per_level, strides, grid_sizes, multi_anchor_iou):
    """Slow, loop-by-loop statement of the rule the vectorised matcher implements."""
    counts = [h * w * s.shape[0] for s, (h, w) in zip(shapes_per_level, grid_sizes)]
    starts = [sum(counts[:level]) for level in range(len(counts))]
    catalogue = [(level, a, s) for level, shapes in enumerate(shapes_per_level) for a, s in enumerate(shapes.tolist())]
    result = torch.full((gt_boxes.shape[0], sum(counts)), -1, dtype=torch.long)
    for b in range(gt_boxes.shape[0]):
        best_claim = {}  # anchor index -> (is_extra, area, m)
        for m in range(gt_boxes.shape[1]):
            if not gt_mask[b, m]:
                continue
            x1, y1, x2, y2 = gt_boxes[b, m].tolist()
            w, h = x2 - x1, y2 - y1
            ious = [min(w, sw) * min(h, sh) / (w * h + sw * sh - min(w, sw) * min(h, sh)) for _, _, (sw, sh) in catalogue]
            best = max(range(len(ious)), key=lambda i: (ious[i], -i))
            for i, (level, a, _) in enumerate(catalogue):
                is_extra = i != best
                if is_extra and (multi_anchor_iou is None or not ious[i] > multi_anchor_iou):
                    continue
                height, width = grid_sizes[level]
                col = min(max(math.floor((x1 + x2) / 2 / strides[level]), 0), width - 1)
                row = min(max(math.floor((y1 + y2) / 2 / strides[level]), 0), height - 1)
                n = starts[level] + (row * width + col) * shapes_per_level[level].shape[0] + a
                claim = (is_extra, w * h, m)
                if n not in best_claim or claim < best_claim[n]:
                    best_claim[n] = claim
        for n, (_, _, m) in best_claim.items():
            result[b, n] = m
    return result


@pytest.mark.parametrize("multi_anchor_iou", [None, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_yolo_matcher_equals_reference_loop_on_random_batches(seed, multi_anchor_iou):
    g = torch.Generator().manual_seed(seed)
    # An 80 x 96 input; the middle level has no anchors on seed 2 (single-level style layouts).
    shapes = [torch.rand(2, 2, generator=g) * 20 + 4, torch.rand(3, 2, generator=g) * 40 + 10, torch.rand(2, 2, generator=g) * 80 + 20]
    if seed == 2:
        shapes[1] = torch.zeros(0, 2)
    strides, grid_sizes = [8, 16, 32], [(10, 12), (5, 6), (3, 3)]
    targets = []
    for count in [7, 0, 12, 3]:
        # Small canvas region and integer-ish coordinates make cell and anchor collisions common,
        # and some centres land outside the image to exercise the clamp.
        centre = torch.rand(count, 2, generator=g) * torch.tensor([110.0, 90.0]) - 5
        size = torch.rand(count, 2, generator=g) * 90 + 2
        targets.append({"boxes": torch.cat([centre - size / 2, centre + size / 2], 1), "labels": torch.zeros(count, dtype=torch.long)})
    gt_boxes, _, gt_mask = pad_targets(targets)
    matcher = YoloMatcher(multi_anchor_iou=multi_anchor_iou)
    matched = yolo_match(matcher, gt_boxes, gt_mask, shapes, strides, grid_sizes, input_size=(80, 96))
    expected = _reference_match(gt_boxes, gt_mask, shapes, strides, grid_sizes, multi_anchor_iou)
    assert torch.equal(matched, expected)
    assert (matched[1] == -1).all()  # the empty image
    # Matches point only at real GT slots, and the random batch does exercise the matcher.
    b, n = (matched >= 0).nonzero(as_tuple=True)
    assert gt_mask[b, matched[b, n]].all() and b.numel() >= 10


def test_the_documented_example():
    """The worked example of the matcher contract in docs/architecture.md, line by line."""
    from anchordet.matching import IoUMatcher

    grid = AnchorGrid.build([torch.tensor([[16.0, 16.0]])], [16], [(2, 2)], (32, 32))
    assert grid.boxes.tolist() == [[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]]
    gt_boxes = torch.tensor([[[2.0, 0.0, 18.0, 16.0], [0.0, 0.0, 0.0, 0.0]]])
    gt_mask = torch.tensor([[True, False]])
    rows = [
        (IoUMatcher(fg_iou=0.7, bg_iou=0.3), [[0, -1, -1, -1]], [[1, 0, 0, 0]]),
        (IoUMatcher(fg_iou=0.9, bg_iou=0.05, allow_low_quality=False), [[-1, -1, -1, -1]], [[-1, -1, 0, 0]]),
        (YoloMatcher(), [[0, -1, -1, -1]], [[1, 0, 0, 0]]),
    ]
    for matcher, matched_gt, labels in rows:
        result = matcher(grid, gt_boxes, gt_mask)
        assert result.matched_gt.tolist() == matched_gt and result.labels.tolist() == labels, matcher
