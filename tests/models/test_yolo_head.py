"""YoloHead: output layout, hand-decoded postprocessing, and every loss term checked by hand.

Most tests use one level of stride 32 on a 2x2 grid (a 64x64 input) with one anchor per cell, so
the anchors are, in (y, x) order: 0 = cell (col 0, row 0), 1 = (1, 0), 2 = (0, 1), 3 = (1, 1).
The match is a fixed ``MatchResult`` (what a matcher would return), so the head's arithmetic is
tested alone.
"""

import math

import pytest
import torch

from anchordet.anchors.placement import AnchorGrid
from anchordet.boxes import YoloBoxCoder
from anchordet.matching import MatchResult, PaddedTargets
from anchordet.models.heads.yolo import YoloHead

LOG2 = math.log(2.0)
VERY_NEGATIVE = -30.0  # sigmoid(-30) ~ 1e-13: "certainly not"


def make_head(num_classes=3, num_anchors=1, num_levels=1, **kwargs):
    return YoloHead(in_channels=32, num_anchors=num_anchors, num_classes=num_classes,
                    num_levels=num_levels, tower_depth=1, **kwargs)


def make_grid(shapes=((20.0, 20.0),), stride=32, grid=(2, 2)):
    return AnchorGrid.build([torch.tensor(shapes)], [stride], [grid], (grid[0] * stride, grid[1] * stride))


def quiet_raw(batch, num_anchors, num_classes):
    """Raw outputs [B, N, 5+C] with zero box offsets and every objectness/class 'certainly not'."""
    raw = torch.zeros(batch, num_anchors, 5 + num_classes)
    raw[..., 4:] = VERY_NEGATIVE
    return raw


def fixed_match(matched_gt, labels=None):
    """A matcher's verdict: matched_gt [B, N]; labels default to foreground exactly where a GT is."""
    matched = torch.as_tensor(matched_gt, dtype=torch.long)
    return MatchResult(matched, (matched >= 0).long() if labels is None else torch.as_tensor(labels))


# ---------------------------------------------------------------- construction and layout
def test_forward_reshapes_channels_to_y_x_anchor_order():
    # Identity 1x1 predictor and no tower: output (anchor a, field k) at cell (y, x) must be the
    # input channel a*K + k at (y, x). Input value 1000*y + 100*x + channel makes every slot unique.
    num_anchors, num_classes, height, width = 2, 1, 2, 3
    k = 5 + num_classes
    head = YoloHead(in_channels=num_anchors * k, num_anchors=num_anchors, num_classes=num_classes,
                    num_levels=1, tower_depth=0)
    with torch.no_grad():
        head.predictors[0].weight.copy_(torch.eye(num_anchors * k)[:, :, None, None])
        head.predictors[0].bias.zero_()
    y = torch.arange(height).view(1, 1, height, 1)
    x = torch.arange(width).view(1, 1, 1, width)
    c = torch.arange(num_anchors * k).view(1, -1, 1, 1)
    features = (1000 * y + 100 * x + c).float()
    (raw,) = head([features])
    assert raw.shape == (1, height * width * num_anchors, k)
    # Row 1, column 2, anchor 1, field 3 -> flat index (1*3 + 2)*2 + 1 = 11; value 1000+200+(1*6+3).
    assert raw[0, 11, 3].item() == 1209.0
    assert raw[0, 0, 0].item() == 0.0
    assert raw[0, 2, 0].item() == 100.0  # row 0, column 1, anchor 0: x runs faster than y
    assert raw[0, 6, 0].item() == 1000.0  # row 1, column 0, anchor 0
    assert raw[0, 1, 0].item() == 6.0  # anchor 1 of cell (0, 0) starts at channel K = 6


def test_prior_initialisation_of_objectness_and_classes():
    head = make_head(num_classes=2, num_anchors=2, prior_prob=0.01)
    bias = head.predictors[0].bias.view(2, 7)
    assert torch.allclose(bias[:, 4:], torch.full((2, 3), -math.log(99.0)))  # sigmoid -> 0.01
    assert torch.equal(bias[:, :4], torch.zeros(2, 4))


def test_per_level_anchor_counts_and_bad_settings():
    head = YoloHead(32, [1, 3], num_classes=2, num_levels=2, tower_depth=1)
    outs = head([torch.zeros(1, 32, 4, 4), torch.zeros(1, 32, 2, 2)])
    assert [o.shape for o in outs] == [(1, 16, 7), (1, 12, 7)]
    with pytest.raises(ValueError, match="tower_channels"):
        YoloHead(48, 1, num_classes=2, num_levels=1, norm="group")
    with pytest.raises(ValueError, match="box_loss"):
        make_head(box_loss="iou")
    with pytest.raises(ValueError, match="num_levels"):
        YoloHead(32, [1, 2, 3], num_classes=2, num_levels=2)


def test_prediction_count_must_match_anchor_grid():
    head = make_head()
    with pytest.raises(ValueError, match="AnchorGrid"):
        head.postprocess([quiet_raw(1, 5, 3)], make_grid())


# ---------------------------------------------------------------- postprocess
def test_postprocess_decodes_a_hand_built_prediction():
    head = make_head(num_classes=3)
    anchors = make_grid(shapes=((5.0, 10.0),))
    raw = quiet_raw(1, 4, 3)
    # Anchor 0, cell (0, 0): tx=0 -> x = 0.5*32 = 16; ty=30 -> y ~ 1.0*32 = 32; w = 5; h = 10e.
    raw[0, 0, :5] = torch.tensor([0.0, 30.0, 0.0, 1.0, 0.0])
    raw[0, 0, 6] = 2.0  # class 1: score = sigmoid(0) * sigmoid(2) = 0.5 * 0.880797 = 0.440399
    # Anchor 3, cell (1, 1): centre (48, 48), box 5x10; score sigmoid(2)*sigmoid(1) = 0.643914.
    raw[0, 3, 4] = 2.0
    raw[0, 3, 5] = 1.0
    (result,) = head.postprocess([raw], anchors)
    assert result["labels"].tolist() == [0, 1]
    assert torch.allclose(result["scores"], torch.tensor([0.643914, 0.440399]), atol=1e-5)
    expected = torch.tensor([[45.5, 43.0, 50.5, 53.0], [13.5, 18.408591, 18.5, 45.591409]])
    assert torch.allclose(result["boxes"], expected, atol=1e-4)
    assert result["labels"].dtype == torch.int64


def test_postprocess_clips_boxes_to_the_image():
    head = make_head(num_classes=1)
    raw = quiet_raw(1, 4, 1)
    raw[0, 0, :6] = torch.tensor([0.0, 0.0, 3.0, 0.0, 5.0, 5.0])  # w = 20 e^3 = 401.7 around x=16
    (result,) = head.postprocess([raw], make_grid())
    assert torch.allclose(result["boxes"], torch.tensor([[0.0, 6.0, 64.0, 26.0]]))


def test_postprocess_threshold_nms_per_class_and_image_and_max_detections():
    # Two identical anchors (20x20) per cell: anchors 2a and 2a+1 decode to the same box.
    anchors = make_grid(shapes=((20.0, 20.0), (20.0, 20.0)))
    raw = quiet_raw(2, 8, 2)
    # Image 0: cell (0,0) twice with class 0 (NMS keeps the better), cell (1,0) once with class 0
    # and once with class 1 (different classes survive NMS), cell (1,1) below the threshold.
    raw[0, 0, 4:6] = torch.tensor([5.0, 5.0])  # score ~0.9866
    raw[0, 1, 4:6] = torch.tensor([4.0, 4.0])  # same box, same class, lower score: suppressed
    raw[0, 2, 4:6] = torch.tensor([3.0, 3.0])  # cell (1,0) class 0 ~0.9051
    raw[0, 3, [4, 6]] = torch.tensor([2.0, 2.0])  # cell (1,0) class 1 ~0.7758
    raw[0, 6, 4:6] = torch.tensor([-3.0, 0.0])  # 0.0474 * 0.5 = 0.0237 < 0.05
    # Image 1: the same box as image 0's best, must not be suppressed by it.
    raw[1, 0, 4:6] = torch.tensor([1.0, 1.0])
    head = make_head(num_classes=2, num_anchors=2, score_thresh=0.05, nms_iou=0.5)
    first, second = head.postprocess([raw], anchors)
    assert first["labels"].tolist() == [0, 0, 1]
    assert torch.allclose(first["scores"], torch.sigmoid(torch.tensor([5.0, 3.0, 2.0])) ** 2, atol=1e-6)
    assert torch.allclose(first["boxes"][0], torch.tensor([6.0, 6.0, 26.0, 26.0]))
    assert torch.allclose(first["boxes"][1:], torch.tensor([[38.0, 6.0, 58.0, 26.0]] * 2))
    assert second["labels"].tolist() == [0]
    assert torch.allclose(second["boxes"], torch.tensor([[6.0, 6.0, 26.0, 26.0]]))

    capped = make_head(num_classes=2, num_anchors=2, max_detections=2)
    first, second = capped.postprocess([raw], anchors)
    assert first["labels"].tolist() == [0, 0] and len(second["scores"]) == 1

    top1 = make_head(num_classes=2, num_anchors=2, topk_pre_nms=1)
    first, _ = top1.postprocess([raw], anchors)
    assert first["scores"].numel() == 1


def test_postprocess_without_any_detection_gives_empty_tensors():
    (result,) = make_head().postprocess([quiet_raw(1, 4, 3)], make_grid())
    assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,)
    assert result["labels"].shape == (0,)


# ---------------------------------------------------------------- loss
GT_BOX = torch.tensor([24.0, 30.0, 48.0, 70.0])  # centre (36, 50): cell (1, 1), offset (0.125, 0.5625)


def one_gt_batch(box=GT_BOX, label=1):
    return PaddedTargets(box.view(1, 1, 4), torch.tensor([[label]]), torch.tensor([[True]]))


def raw_encoding_gt_at_anchor3(anchors, num_classes=3, box=GT_BOX):
    raw = quiet_raw(1, 4, num_classes)
    raw[0, 3, :4] = YoloBoxCoder().encode(
        box, anchors.cell_xy[3], anchors.anchor_wh[3], anchors.stride[3])
    return raw


@pytest.mark.parametrize("box_loss", ["giou", "ciou", "l1"])
def test_box_loss_vanishes_when_raw_encodes_the_gt(box_loss):
    anchors = make_grid(shapes=((16.0, 32.0),))
    raw = raw_encoding_gt_at_anchor3(anchors)
    head = make_head(box_loss=box_loss)
    losses = head.loss([raw], anchors, one_gt_batch(), fixed_match([[-1, -1, -1, 0]]))
    assert losses["loss_box"].item() < 1e-5


def test_giou_and_l1_box_loss_by_hand():
    # Doubling the width (tw + log 2) around the same centre: IoU = 1/2, the predicted box encloses
    # the GT so the GIoU penalty term is 0: GIoU loss = 0.5; times box_weight 5 = 2.5.
    anchors = make_grid(shapes=((16.0, 32.0),))
    raw = raw_encoding_gt_at_anchor3(anchors)
    raw[0, 3, 2] += LOG2
    matcher = fixed_match([[-1, -1, -1, 0]])
    giou = make_head(box_loss="giou", box_weight=5.0).loss([raw], anchors, one_gt_batch(), matcher)
    assert giou["loss_box"].item() == pytest.approx(2.5, abs=1e-4)
    # L1 on (sigmoid tx, sigmoid ty, tw, th): only tw differs, by log 2; times box_weight 2.
    l1 = make_head(box_loss="l1", box_weight=2.0).loss([raw], anchors, one_gt_batch(), matcher)
    assert l1["loss_box"].item() == pytest.approx(2 * LOG2, abs=1e-4)


def test_class_and_objectness_loss_by_hand():
    anchors = make_grid()
    raw = torch.zeros(1, 4, 5 + 2)  # every logit 0: each BCE term is log 2
    head = make_head(num_classes=2, ignore_iou=1.0, obj_weight=1.0, noobj_weight=1.0, cls_weight=1.0)
    losses = head.loss([raw], anchors, one_gt_batch(label=1), fixed_match([[-1, -1, -1, 0]]))
    # Class: one positive, two one-vs-all terms of log 2, divided by 1 positive.
    assert losses["loss_cls"].item() == pytest.approx(2 * LOG2, abs=1e-6)
    # Objectness: four anchors of log 2 each, summed per image, divided by B = 1.
    assert losses["loss_obj"].item() == pytest.approx(4 * LOG2, abs=1e-6)

    # The same image twice: per-image sums averaged over B = 2 give the same objectness; the
    # positive-only class term is divided by 2 positives, so it is unchanged too.
    gt = PaddedTargets(*(t.expand(2, *t.shape[1:]) for t in one_gt_batch(label=1)))
    twice = head.loss([raw.expand(2, -1, -1)], anchors, gt, fixed_match([[-1, -1, -1, 0]] * 2))
    assert twice["loss_obj"].item() == pytest.approx(4 * LOG2, abs=1e-6)
    assert twice["loss_cls"].item() == pytest.approx(2 * LOG2, abs=1e-6)

    weighted = make_head(num_classes=2, ignore_iou=1.0, obj_weight=5.0, noobj_weight=0.5, cls_weight=3.0)
    losses = weighted.loss([raw], anchors, one_gt_batch(label=1), fixed_match([[-1, -1, -1, 0]]))
    assert losses["loss_obj"].item() == pytest.approx((5.0 + 3 * 0.5) * LOG2, abs=1e-6)
    assert losses["loss_cls"].item() == pytest.approx(3.0 * 2 * LOG2, abs=1e-6)


def test_unassigned_prediction_overlapping_a_gt_is_ignored_in_objectness():
    # Anchor 0 (20x20 at cell (0,0), offsets 0) decodes to (6, 6, 26, 26), area 400. The GT
    # (6, 6, 26, 33.3333) contains it: IoU = 400 / 666.67 = 0.6. The GT is assigned to anchor 3,
    # so anchor 0 is unassigned with IoU 0.6 > 0.5: ignored. Anchors 1, 2 decode to (38,6,58,26)
    # and (6,38,26,58): IoU 0 with the GT.
    anchors = make_grid()
    gt_box = torch.tensor([6.0, 6.0, 26.0, 6.0 + 20.0 / 0.6])
    raw = torch.zeros(1, 4, 5 + 1)
    raw[0, 0, 4] = 3.0  # a confident objectness that would cost softplus(3) = 3.0486 if not ignored
    raw.requires_grad_(True)
    matcher = fixed_match([[-1, -1, -1, 0]])
    batch = one_gt_batch(box=gt_box, label=0)

    ignoring = make_head(num_classes=1, ignore_iou=0.5).loss([raw], anchors, batch, matcher)
    assert ignoring["loss_obj"].item() == pytest.approx(3 * LOG2, abs=1e-5)
    ignoring["loss_obj"].backward()
    assert raw.grad[0, 0, 4].item() == 0.0
    assert raw.grad[0, 1, 4].item() == pytest.approx(0.5, abs=1e-6)  # d/dz BCE(z, 0) = sigmoid(0)

    strict = make_head(num_classes=1, ignore_iou=0.7).loss([raw], anchors, batch, matcher)
    assert strict["loss_obj"].item() == pytest.approx(3 * LOG2 + 3.0486, abs=1e-4)
    # anchor_roles gives the pictures exactly these roles: anchor 0 ignored only under the 0.5 rule.
    roles = make_head(num_classes=1, ignore_iou=0.5).anchor_roles([raw], anchors, batch, matcher)
    assert roles.labels.tolist() == [[-1, 0, 0, 1]] and roles.matched_gt.tolist() == [[-1, -1, -1, 0]]
    roles = make_head(num_classes=1, ignore_iou=0.7).anchor_roles([raw], anchors, batch, matcher)
    assert roles.labels.tolist() == [[0, 0, 0, 1]]


def test_padding_boxes_do_not_trigger_the_ignore_rule():
    # Slot 1 is padding with exactly anchor 1's decoded box; only real GTs may cause ignoring.
    anchors = make_grid()
    gt_boxes = torch.tensor([[[24.0, 30.0, 48.0, 70.0], [38.0, 6.0, 58.0, 26.0]]])
    gt_labels = torch.tensor([[0, 0]])
    gt_mask = torch.tensor([[True, False]])
    raw = torch.zeros(1, 4, 6)
    losses = make_head(num_classes=1).loss(
        [raw], anchors, PaddedTargets(gt_boxes, gt_labels, gt_mask), fixed_match([[-1, -1, -1, 0]]))
    assert losses["loss_obj"].item() == pytest.approx(4 * LOG2, abs=1e-6)


@pytest.mark.parametrize("box_loss", ["giou", "l1"])
def test_empty_images_give_finite_loss_and_objectness_gradient(box_loss):
    head = make_head(num_classes=3, box_loss=box_loss)
    anchors = make_grid()
    features = [torch.randn(2, 32, 2, 2)]
    gt_boxes, gt_labels = torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.long)
    gt_mask = torch.zeros(2, 1, dtype=torch.bool)
    losses = head.loss(head(features), anchors, PaddedTargets(gt_boxes, gt_labels, gt_mask),
                       fixed_match(torch.full((2, 4), -1)))
    assert set(losses) == {"loss_obj", "loss_cls", "loss_box"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box"].item() == 0.0 and losses["loss_cls"].item() == 0.0
    # Prior 0.01 on 4 anchors per image: 4 * -log(0.99) = 0.0402 per image (features move it a bit).
    assert losses["loss_obj"].item() == pytest.approx(4 * -math.log(0.99), rel=0.2)
    sum(losses.values()).backward()
    objectness_bias_grad = head.predictors[0].bias.grad[4]
    assert objectness_bias_grad.item() > 0  # pushes objectness down: nothing is there


def test_mixed_batch_with_one_empty_image():
    anchors = make_grid(shapes=((16.0, 32.0),))
    raw = torch.cat([raw_encoding_gt_at_anchor3(anchors), quiet_raw(1, 4, 3)]).requires_grad_(True)
    gt_boxes = torch.stack([GT_BOX.view(1, 4), torch.zeros(1, 4)])
    gt_labels = torch.tensor([[1], [0]])
    gt_mask = torch.tensor([[True], [False]])
    losses = make_head().loss([raw], anchors, PaddedTargets(gt_boxes, gt_labels, gt_mask),
                              fixed_match([[-1, -1, -1, 0], [-1, -1, -1, -1]]))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box"].item() < 1e-5
    sum(losses.values()).backward()
    assert torch.isfinite(raw.grad).all()


def test_anchors_an_iou_matcher_ignores_get_no_objectness_loss():
    # An IoU matcher's band between its thresholds (label -1): no objectness loss, like YOLO's own
    # ignore rule. Every logit 0: each BCE term is log 2; anchor 3 is positive, anchor 1 ignored.
    anchors = make_grid()
    raw = torch.zeros(1, 4, 5 + 2, requires_grad=True)
    head = make_head(num_classes=2, ignore_iou=1.0)  # the head's own rule off
    match = fixed_match([[-1, -1, -1, 0]], labels=[[0, -1, 0, 1]])
    losses = head.loss([raw], anchors, one_gt_batch(), match)
    assert losses["loss_obj"].item() == pytest.approx(3 * LOG2, abs=1e-6)
    losses["loss_obj"].backward()
    assert raw.grad[0, 1, 4].item() == 0.0 and raw.grad[0, 0, 4].item() > 0
    assert head.anchor_roles([raw], anchors, one_gt_batch(), match).labels.tolist() == [[0, -1, 0, 1]]
