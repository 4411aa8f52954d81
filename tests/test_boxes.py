import math

import pytest
import torch

from anchordet.boxes import (
    DEFAULT_MAX_LOG_SCALE,
    RcnnDeltaCoder,
    YoloBoxCoder,
    box_wh,
    cxcywh_to_xyxy,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)

E = math.e


def test_conversions_by_hand_and_leading_dims():
    xyxy = torch.tensor([[[10.0, 20.0, 30.0, 60.0]], [[0.0, 0.0, 4.0, 2.0]]])  # [2, 1, 4]
    assert torch.equal(xyxy_to_cxcywh(xyxy), torch.tensor([[[20.0, 40.0, 20.0, 40.0]], [[2.0, 1.0, 4.0, 2.0]]]))
    assert torch.equal(xyxy_to_xywh(xyxy), torch.tensor([[[10.0, 20.0, 20.0, 40.0]], [[0.0, 0.0, 4.0, 2.0]]]))
    assert torch.equal(box_wh(xyxy), torch.tensor([[[20.0, 40.0]], [[4.0, 2.0]]]))
    assert torch.equal(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)
    assert torch.equal(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        xyxy_to_xywh(torch.zeros(3, 5))


def test_yolo_decode_hand_checked():
    # Anchor (5, 10), stride-32 cell (0, 0): tx = 0 -> x = 0.5 * 32 = 16; ty = 50 -> sigmoid = 1 ->
    # y = 32; tw = 0 -> w = 5; th = 1 -> h = 10e.
    coder = YoloBoxCoder()
    box = coder.decode(
        torch.tensor([0.0, 50.0, 0.0, 1.0]),
        cell_xy=torch.tensor([0.0, 0.0]),
        anchor_wh=torch.tensor([5.0, 10.0]),
        stride=torch.tensor([32.0]),
    )
    expected = torch.tensor([13.5, 32 - 5 * E, 18.5, 32 + 5 * E])
    torch.testing.assert_close(box, expected)


def test_yolo_encode_hand_checked():
    # Stride 16, cell (column 2, row 1): a centre (40, 24) is offset (0.5, 0.5) in the cell -> logit 0.
    # Size (10, 40) against anchor (10, 20) -> (log 1, log 2).
    coder = YoloBoxCoder()
    target = coder.encode(
        torch.tensor([[35.0, 4.0, 45.0, 44.0]]),
        cell_xy=torch.tensor([[2.0, 1.0]]),
        anchor_wh=torch.tensor([[10.0, 20.0]]),
        stride=torch.tensor([[16.0]]),
    )
    torch.testing.assert_close(target, torch.tensor([[0.0, 0.0, 0.0, math.log(2.0)]]))


def test_yolo_encode_clamps_border_offsets_to_finite_logits():
    coder = YoloBoxCoder(eps=1e-3)
    # Centre x exactly on the cell's left border (offset 0), y on its bottom border (offset 1).
    target = coder.encode(
        torch.tensor([28.0, 28.0, 36.0, 36.0]), torch.tensor([4.0, 3.0]), torch.tensor([8.0, 8.0]), torch.tensor([8.0])
    )
    assert torch.isfinite(target).all()
    torch.testing.assert_close(target[:2], torch.tensor([math.log(1e-3 / (1 - 1e-3)), math.log((1 - 1e-3) / 1e-3)]))


def test_yolo_decode_clamps_log_scale():
    coder = YoloBoxCoder()
    box = coder.decode(torch.tensor([0.0, 0.0, 1e4, -1e4]), torch.zeros(2), torch.tensor([4.0, 4.0]), torch.tensor([8.0]))
    assert torch.isfinite(box).all()
    # w = 4 * exp(log(1000/16)) = 250; h underflows to 0 but stays finite.
    torch.testing.assert_close(box[2] - box[0], torch.tensor(250.0))
    assert DEFAULT_MAX_LOG_SCALE == pytest.approx(math.log(62.5))


def test_yolo_round_trip_random_boxes_broadcast():
    g = torch.Generator().manual_seed(0)
    stride = torch.tensor([8.0, 16.0, 32.0])[:, None, None]  # [3, 1, 1] broadcast over [3, 50, .]
    cell_xy = torch.randint(0, 20, (3, 50, 2), generator=g).float()
    offset = 0.05 + 0.9 * torch.rand(3, 50, 2, generator=g)
    size = 1 + 300 * torch.rand(3, 50, 2, generator=g)
    centre = (cell_xy + offset) * stride
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    anchor_wh = 5 + 100 * torch.rand(3, 50, 2, generator=g)
    coder = YoloBoxCoder()
    target = coder.encode(boxes, cell_xy, anchor_wh, stride)
    assert target.shape == (3, 50, 4)
    torch.testing.assert_close(coder.decode(target, cell_xy, anchor_wh, stride), boxes, atol=1e-3, rtol=1e-5)


def test_rcnn_encode_hand_checked_with_weights():
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size (10, 20)
    box = torch.tensor([[2.0, 4.0, 22.0, 44.0]])  # centre (12, 24), size (20, 40)
    plain = RcnnDeltaCoder().encode(reference, box)
    torch.testing.assert_close(plain, torch.tensor([[0.7, 0.7, math.log(2), math.log(2)]]))
    weighted = RcnnDeltaCoder(weights=(10, 10, 5, 5)).encode(reference, box)
    torch.testing.assert_close(weighted, torch.tensor([[7.0, 7.0, 5 * math.log(2), 5 * math.log(2)]]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_rcnn_round_trip_random_boxes(weights):
    g = torch.Generator().manual_seed(1)

    def random_boxes(n):
        # Sides in [10, 210]: size ratios stay below the exp(log(1000/16)) = 62.5 clamp.
        xy = 500 * torch.rand(n, 2, generator=g)
        return torch.cat([xy, xy + 10 + 200 * torch.rand(n, 2, generator=g)], dim=1)

    reference, boxes = random_boxes(200), random_boxes(200)
    coder = RcnnDeltaCoder(weights=weights)
    torch.testing.assert_close(coder.decode(coder.encode(reference, boxes), reference), boxes, atol=1e-3, rtol=1e-5)


def test_rcnn_decode_clamps_and_broadcasts():
    coder = RcnnDeltaCoder()
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 2.0, 2.0]])  # [3, 4]
    deltas = torch.zeros(2, 3, 4)  # [2, 3, 4] broadcast against [3, 4]
    deltas[1, :, 2] = 1e4  # dw far beyond the clamp
    boxes = coder.decode(deltas, reference)
    assert boxes.shape == (2, 3, 4)
    assert torch.isfinite(boxes).all()
    torch.testing.assert_close(boxes[0], reference)
    widths = boxes[1, :, 2] - boxes[1, :, 0]
    torch.testing.assert_close(widths, torch.tensor([10.0, 20.0, 2.0]) * 62.5)


def test_rcnn_rejects_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        RcnnDeltaCoder(weights=(1.0, 1.0, 0.0, 1.0))
