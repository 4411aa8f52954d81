"""RPN head: raw layout, hand-checked losses, empty images, proposals (clip, min size, NMS per image
and level, top-n, sorted), 5-level grid anchors against torchvision, and the Detector around it."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from anchordet.anchors import AnchorGrid
from anchordet.anchors.grid import grid_anchor_shapes
from anchordet.matching import IoUMatcher, PaddedTargets
from anchordet.models.backbone import ResNetFPN
from anchordet.models.detector import Detector
from anchordet.models.heads import RpnHead

RPN_SIZES = [[32.0], [64.0], [128.0], [256.0], [512.0]]
RATIOS = [0.5, 1.0, 2.0]


def one_level_grid(height=2, width=2, stride=16, shape=(16.0, 16.0)):
    return AnchorGrid.build([torch.tensor([shape])], [stride], [(height, width)], (height * stride, width * stride),
                            offset=0.5)


def rpn_loss(head, raw_per_level, anchors, gt_boxes, gt_mask=None, matcher=None):
    """head.loss after the IoU matcher, as the Detector runs them (labels are unused by the RPN)."""
    if gt_mask is None:
        gt_mask = torch.ones(gt_boxes.shape[:2], dtype=torch.bool)
    gt = PaddedTargets(gt_boxes, torch.zeros(gt_boxes.shape[:2], dtype=torch.long), gt_mask)
    return head.loss(raw_per_level, anchors, gt, (matcher or IoUMatcher())(anchors, gt.boxes, gt.mask))


# ------------------------------------------------------------------ forward
def test_raw_layout_is_y_x_a_with_deltas_then_objectness():
    head = RpnHead(in_channels=1, num_anchors=2, num_classes=80, num_levels=2, conv_depth=0)
    with torch.no_grad():
        # Objectness of anchor a = feature + 0.1 a; delta k of anchor a = 10 a + k (bias only).
        head.objectness[0].weight.fill_(1.0)
        head.objectness[0].bias.copy_(torch.tensor([0.0, 0.1]))
        head.box_deltas[0].weight.zero_()
        head.box_deltas[0].bias.copy_(torch.arange(8.0) + torch.tensor([0.0] * 4 + [6.0] * 4))
    height, width = 2, 3
    feature = torch.arange(float(height * width)).view(1, 1, height, width)  # value y * W + x
    raw = head([feature, feature[..., :1, :1]])
    assert [r.shape for r in raw] == [(1, height * width * 2, 5), (1, 2, 5)]
    rows = torch.arange(height * width * 2)
    # Row (y*W + x)*A + a: objectness (y*W + x) + 0.1 a, deltas 10 a + (0, 1, 2, 3).
    torch.testing.assert_close(raw[0][0, :, 4], (rows // 2).float() + 0.1 * (rows % 2))
    torch.testing.assert_close(raw[0][0, :, :4], 10.0 * (rows % 2)[:, None].float() + torch.arange(4.0))


def test_num_classes_is_ignored_and_predictors_shared_or_per_level():
    shared = RpnHead(in_channels=8, num_anchors=3, num_classes=1, num_levels=5)
    other = RpnHead(in_channels=8, num_anchors=3, num_classes=80, num_levels=5)
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in other.parameters())
    # 3x3 conv (8*8*9 + 8) + 1x1 objectness (8*3 + 3) + 1x1 deltas (8*12 + 12), once for all levels.
    assert sum(p.numel() for p in shared.parameters()) == 584 + 27 + 108
    per_level = RpnHead(in_channels=8, num_anchors=3, num_levels=5, share_predictors=False)
    assert len(per_level.objectness) == len(per_level.box_deltas) == 5
    features = [torch.randn(2, 8, s, s) for s in (8, 4, 2, 1, 1)]
    assert [r.shape[1] for r in per_level(features)] == [192, 48, 12, 3, 3]
    with pytest.raises(ValueError, match="share_predictors"):
        RpnHead(in_channels=8, num_anchors=[3, 6], num_levels=2)
    with pytest.raises(ValueError, match="2 levels but got 1"):
        shared_two = RpnHead(in_channels=8, num_anchors=3, num_levels=2)
        shared_two([features[0]])


# ------------------------------------------------------------------ loss
def test_loss_hand_checked_on_four_anchors():
    # Anchors (stride 16, 2x2 grid, 16x16 at cell centres): [0,0,16,16], [16,0,32,16], [0,16,16,32], [16,16,32,32].
    anchors = one_level_grid()
    # GT [2,0,18,16]: IoU 224/288 = 0.78 with a0 (foreground), 32/480 with a1, 0 with a2, a3.
    gt_boxes = torch.tensor([[[2.0, 0.0, 18.0, 16.0]]])
    raw = torch.zeros(1, 4, 5, requires_grad=True)
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=1)
    losses = rpn_loss(head, [raw], anchors, gt_boxes)
    # All 4 anchors are sampled (fewer than 256): BCE of logit 0 is log 2 for each, / 4.
    assert losses["loss_obj"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    # a0's target: dx = (10 - 8) / 16 = 0.125 >= beta = 1/9 -> 0.125 - 0.5/9; dy = dw = dh = 0; / 4.
    assert losses["loss_box"].item() == pytest.approx((0.125 - 0.5 / 9) / 4, abs=1e-6)
    sum(losses.values()).backward()
    assert raw.grad[0, 0, 0] < 0  # dx of a0 is pushed up, towards the target
    assert raw.grad[0, 0, 4] < 0 and (raw.grad[0, 1:, 4] > 0).all()  # object vs background


def test_perfect_deltas_give_zero_box_loss():
    anchors = one_level_grid()
    gt_boxes = torch.tensor([[[2.0, 0.0, 18.0, 16.0]]])
    raw = torch.zeros(1, 4, 5)
    raw[0, 0, 0] = 0.125
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=1)
    losses = rpn_loss(head, [raw], anchors, gt_boxes)
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-7)


def test_empty_images_give_finite_loss_zero_box_term_and_gradients():
    anchors = one_level_grid(height=4, width=4, stride=8)
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=1)
    features = torch.randn(2, 4, 4, 4, requires_grad=True)
    raw = head([features])
    gt_boxes, gt_mask = torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.bool)
    losses = rpn_loss(head, raw, anchors, gt_boxes, gt_mask)
    assert set(losses) == {"loss_obj", "loss_box"}
    assert losses["loss_box"].item() == 0.0 and torch.isfinite(losses["loss_obj"])
    sum(losses.values()).backward()
    assert head.objectness[0].weight.grad.abs().sum() > 0 and torch.isfinite(features.grad).all()


def test_loss_uses_at_most_256_sampled_anchors_per_image(monkeypatch):
    anchors = one_level_grid(height=32, width=32, stride=4, shape=(8.0, 8.0))  # 1024 anchors
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=1)
    seen = {}
    real_sampler = head.sampler

    def spy(labels):
        seen["result"] = real_sampler(labels)
        return seen["result"]

    monkeypatch.setattr(head, "sampler", spy)
    gt_boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [40.0, 40.0, 56.0, 56.0]]])
    rpn_loss(head, [torch.zeros(1, 1024, 5)], anchors, gt_boxes)
    positive, negative = seen["result"]
    assert 1 <= positive.sum() <= 128 and positive.sum() + negative.sum() == 256


# ------------------------------------------------------------------ proposals
def two_level_nms_case():
    """Level 0: stride 8, 2x2 grid of 16x16 anchors; level 1: one 16x16 anchor at (8, 8) = [0,0,16,16].

    Level-0 anchors 0 ([-4,-4,12,12]) and 1 ([4,-4,20,12]) are moved onto [0,0,16,16] by their deltas.
    """
    shapes = [torch.tensor([[16.0, 16.0]]), torch.tensor([[16.0, 16.0]])]
    anchors = AnchorGrid.build(shapes, [8, 16], [(2, 2), (1, 1)], (16, 16), offset=0.5)
    level0 = torch.zeros(1, 4, 5)
    level0[0, 0] = torch.tensor([0.25, 0.25, 0.0, 0.0, 2.0])
    level0[0, 1] = torch.tensor([-0.25, 0.25, 0.0, 0.0, 1.0])
    level0[0, 2:, 4] = -5.0
    level1 = torch.zeros(1, 1, 5)
    return anchors, [level0, level1]


def test_nms_keeps_levels_and_images_apart():
    anchors, raw = two_level_nms_case()
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=2, score_thresh=0.01).eval()
    batch = [torch.cat([r, r]) for r in raw]  # two identical images
    proposals = head.postprocess(batch, anchors)
    for image in proposals:
        # The level-0 duplicate (logit 1) is suppressed; the identical level-1 box survives.
        torch.testing.assert_close(image["boxes"], torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2))
        torch.testing.assert_close(image["scores"], torch.sigmoid(torch.tensor([2.0, 0.0])))
        assert image["labels"].tolist() == [0, 0] and image["labels"].dtype == torch.long


def test_proposals_are_clipped_sorted_and_drop_tiny_boxes():
    # A 4 x 3 grid of stride 16 on a 64 (high) x 48 (wide) input; 40 x 20 anchors cross the border.
    anchors = one_level_grid(height=4, width=3, stride=16, shape=(40.0, 20.0))
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 12, 5, generator=g)
    raw[..., :4] *= 0.05  # neighbours keep IoU < 0.7 (0.43 unclipped, 0.55 at the corner): NMS keeps them
    raw[:, 5, 2:4] = -20.0  # 40 e^-20 px: below min_size
    huge = raw.clone()
    huge[:, 11, 2] = 1e4  # clamped at log(1000/16): 2500 px wide but finite, then clipped
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=1).eval()
    for batch in (raw, huge):
        for image in head.postprocess([batch], anchors):
            boxes, scores = image["boxes"], image["scores"]
            assert torch.isfinite(boxes).all()
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all()
            assert (scores[1:] <= scores[:-1]).all()
            assert (boxes[:, 2:] - boxes[:, :2] >= 1e-3).all()
    assert [len(p["boxes"]) for p in head.postprocess([raw], anchors)] == [11, 11, 11]
    widest = head.postprocess([huge], anchors)[0]["boxes"]
    assert ((widest[:, 0] == 0) & (widest[:, 2] == 48)).any()


def test_top_n_follows_training_mode():
    anchors = one_level_grid(height=4, width=4, stride=16, shape=(4.0, 4.0))  # disjoint boxes: NMS keeps all
    raw = torch.randn(2, 16, 5, generator=torch.Generator().manual_seed(1))
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=1, pre_nms_top_n_train=10, pre_nms_top_n_test=6,
                   post_nms_top_n_train=8, post_nms_top_n_test=3)
    assert [len(p["boxes"]) for p in head.train().postprocess([raw], anchors)] == [8, 8]
    test_mode = head.eval().postprocess([raw], anchors)
    assert [len(p["boxes"]) for p in test_mode] == [3, 3]
    # The 3 kept are the 3 best objectness logits of the image.
    torch.testing.assert_close(test_mode[0]["scores"], raw[0, :, 4].topk(3).values.sigmoid())


# ------------------------------------------------------------------ anchors and the detector
def test_five_level_rpn_anchors_at_offset_0_equal_torchvision_anchor_generator():
    generator = AnchorGenerator(sizes=tuple((int(s[0]),) for s in RPN_SIZES), aspect_ratios=(tuple(RATIOS),) * 5)
    # Multiples of 64: torchvision infers a level's stride as image size // grid size, which is not
    # the real stride when the image does not divide (96 / 2 cells on P6 would say 48, not 64).
    image_height, image_width = 128, 192
    strides = [4, 8, 16, 32, 64]
    grid_sizes = [(math.ceil(image_height / s), math.ceil(image_width / s)) for s in strides]
    features = [torch.zeros(1, 1, h, w) for h, w in grid_sizes]
    image_list = ImageList(torch.zeros(1, 3, image_height, image_width), [(image_height, image_width)])
    (theirs,) = generator(image_list, features)
    ours = AnchorGrid.build(grid_anchor_shapes(RPN_SIZES, RATIOS), strides, grid_sizes, (image_height, image_width),
                            offset=0.0)
    assert ours.boxes.shape == theirs.shape == (3 * sum(h * w for h, w in grid_sizes), 4)
    torch.testing.assert_close(ours.boxes, theirs, atol=0.5, rtol=0.0)  # torchvision rounds its shapes


def build_detector(offset=0.5, seed=0):
    torch.manual_seed(seed)
    backbone = ResNetFPN(depth=18, levels=("P2", "P3", "P4", "P5", "P6"), norm="group", fpn_channels=32)
    shapes = grid_anchor_shapes([[16.0], [32.0], [64.0], [128.0], [256.0]], RATIOS)
    head = RpnHead(in_channels=backbone.out_channels, num_anchors=3, num_classes=5, num_levels=5)
    return Detector(backbone, head, shapes, IoUMatcher(), anchor_offset=offset)


TARGETS = [
    {"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


def test_detector_with_rpn_head_loss_predict_and_offset():
    detector = build_detector()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    losses = detector.loss(images, TARGETS)
    assert set(losses) == {"loss", "loss_obj", "loss_box"} and losses["loss_box"].item() > 0
    losses["loss"].backward()
    assert detector.backbone.body.conv1.weight.grad.abs().sum() > 0
    proposals = detector.predict(images)
    assert len(proposals) == 2 and detector.training
    for image in proposals:
        assert 0 < len(image["boxes"]) <= 1000 and (image["labels"] == 0).all()
        assert (image["scores"][1:] <= image["scores"][:-1]).all()
        assert (image["boxes"] >= 0).all() and (image["boxes"] <= 64).all()
    # Offset 0 puts the first anchor's centre on the image corner instead of the first cell's centre.
    corner = build_detector(offset=0.0).anchor_grid((64, 64))
    centre = detector.anchor_grid((64, 64))
    assert centre.grid_sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    torch.testing.assert_close(centre.boxes - corner.boxes, corner.stride.expand(-1, 4) * 0.5)


def test_anchor_roles_of_the_rpn_are_the_matchers_labels():
    """The RPN adds no rule of its own (the sampler's draw changes every step): the anchor pictures
    show the IoU matcher's foreground / ignored / background."""
    detector = build_detector().eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    anchors, gt, roles = detector.anchor_roles(images, TARGETS)
    matched_anchors, _, match = detector.match_targets(TARGETS, (64, 64))
    assert matched_anchors is anchors  # one cached grid for one input size
    expected = detector.matcher(anchors, gt.boxes, gt.mask)
    assert torch.equal(roles.labels, expected.labels) and torch.equal(match.labels, expected.labels)
    assert roles.labels.shape == (2, anchors.num_anchors)
    assert roles.positive[0].any() and roles.ignored[0].any() and not roles.positive[1].any()


def test_a_few_steps_on_fixed_features_fit_the_sampled_anchors():
    torch.manual_seed(0)
    head = RpnHead(in_channels=8, num_anchors=1, num_levels=1)
    anchors = one_level_grid(height=8, width=8, stride=8, shape=(16.0, 16.0))
    features = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    gt_boxes = torch.tensor([[[6.0, 4.0, 26.0, 22.0], [30.0, 34.0, 50.0, 50.0]]])
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(40):
        optimizer.zero_grad()
        losses = rpn_loss(head, head([features]), anchors, gt_boxes)
        first = first or {k: v.item() for k, v in losses.items()}
        sum(losses.values()).backward()
        optimizer.step()
    last = rpn_loss(head, head([features]), anchors, gt_boxes)
    assert last["loss_obj"].item() < 0.5 * first["loss_obj"] and last["loss_box"].item() < 0.7 * first["loss_box"]


def test_anchor_grid_that_does_not_fit_the_predictions_is_reported():
    head = RpnHead(in_channels=4, num_anchors=1, num_levels=1)
    with pytest.raises(ValueError, match=r"\[5\] predictions per level but the AnchorGrid has \[4\]"):
        head.postprocess([torch.zeros(1, 5, 5)], one_level_grid())
