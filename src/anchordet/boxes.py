"""Box formats, conversions and box coders.

Formats (every tensor here is ``[..., 4]``, any number of leading dims):

- ``xyxy``   : ``(x1, y1, x2, y2)`` corners, absolute pixels of the network input (the library default)
- ``cxcywh`` : ``(cx, cy, w, h)`` centre and size
- ``xywh``   : ``(x1, y1, w, h)`` top-left corner and size (COCO JSON)

Coders map between boxes and what a head predicts:

- :class:`YoloBoxCoder`  -- YOLOv2 offsets (Redmon & Farhadi, "YOLO9000", 2017): sigmoid of the
  centre offset inside the cell, log of the size relative to the anchor shape.
- :class:`RcnnDeltaCoder` -- R-CNN deltas (Girshick et al. 2014, Ren et al. "Faster R-CNN" 2015):
  centre shift in units of the reference box size, log size ratio.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert

# exp(log(1000/16)) = 62.5: a predicted box may be at most 62.5x its anchor/reference side.  The same
# bound torchvision's detection BoxCoder uses; it keeps exp() finite in early, noisy training.
DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16)

__all__ = [
    "DEFAULT_MAX_LOG_SCALE",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "box_wh",
    "shape_iou",
    "YoloBoxCoder",
    "RcnnDeltaCoder",
]


def _convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    # torchvision's box_convert unbinds the last dim, so it already works for any leading dims; a
    # zero-size tensor of shape [..., 4] passes through unchanged.
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(boxes.shape)}")
    return box_convert(boxes, in_fmt=in_fmt, out_fmt=out_fmt)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """xyxy ``[..., 4]`` -> cxcywh ``[..., 4]``."""
    return _convert(boxes, "xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """cxcywh ``[..., 4]`` -> xyxy ``[..., 4]``."""
    return _convert(boxes, "cxcywh", "xyxy")


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """xywh (COCO) ``[..., 4]`` -> xyxy ``[..., 4]``."""
    return _convert(boxes, "xywh", "xyxy")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """xyxy ``[..., 4]`` -> xywh (COCO) ``[..., 4]``."""
    return _convert(boxes, "xyxy", "xywh")


def box_wh(boxes: Tensor) -> Tensor:
    """Widths and heights ``[..., 2]`` of xyxy boxes ``[..., 4]``."""
    return boxes[..., 2:4] - boxes[..., 0:2]


def shape_iou(wh_a: Tensor, wh_b: Tensor) -> Tensor:
    """IoU ``[N, K]`` of box shapes ``wh_a [N, 2]`` and ``wh_b [K, 2]`` (w, h) placed on the same centre.

    Centred together, the intersection is ``min(w) * min(h)``; positions do not matter. This is the
    distance of YOLOv2's anchor clustering and the score of YOLO's best-anchor assignment.
    """
    for name, wh in (("wh_a", wh_a), ("wh_b", wh_b)):
        if wh.ndim != 2 or wh.shape[1] != 2:
            raise ValueError(f"{name} must have shape [N, 2] of (w, h), got {tuple(wh.shape)}")
    # [N, 1] against [1, K] broadcasts to the [N, K] matrix.
    inter = torch.minimum(wh_a[:, None, 0], wh_b[None, :, 0]) * torch.minimum(wh_a[:, None, 1], wh_b[None, :, 1])
    union = (wh_a[:, 0] * wh_a[:, 1])[:, None] + (wh_b[:, 0] * wh_b[:, 1])[None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


class YoloBoxCoder:
    """YOLOv2 box parameterisation (Redmon & Farhadi 2017, section "Direct location prediction").

    For a cell with integer index ``(cx, cy)`` (column, row) on a level of stride ``s`` and an
    anchor shape ``(pw, ph)``::

        x = (cx + sigmoid(tx)) * s        w = pw * exp(tw)
        y = (cy + sigmoid(ty)) * s        h = ph * exp(th)

    The sigmoid keeps the predicted centre inside its own cell, which is what made YOLOv2 training
    stable compared with unconstrained offsets.  ``tw, th`` are clamped at ``max_log_scale`` before
    ``exp`` so a wild prediction gives a large but finite box.

    All inputs broadcast against each other over the leading dims: ``pred [..., 4]``,
    ``cell_xy [..., 2]``, ``anchor_wh [..., 2]``, ``stride [..., 1]``.
    """

    def __init__(self, max_log_scale: float = DEFAULT_MAX_LOG_SCALE, eps: float = 1e-4) -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"YoloBoxCoder eps must be in (0, 0.5), got {eps}")
        self.max_log_scale = float(max_log_scale)
        self.eps = float(eps)

    def decode(self, pred: Tensor, cell_xy: Tensor, anchor_wh: Tensor, stride: Tensor) -> Tensor:
        """Raw ``(tx, ty, tw, th)`` ``[..., 4]`` -> boxes xyxy ``[..., 4]`` in input pixels."""
        centre = (cell_xy + torch.sigmoid(pred[..., 0:2])) * stride
        size = anchor_wh * torch.exp(pred[..., 2:4].clamp(max=self.max_log_scale))
        return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)

    def encode(self, boxes: Tensor, cell_xy: Tensor, anchor_wh: Tensor, stride: Tensor) -> Tensor:
        """Boxes xyxy ``[..., 4]`` -> targets ``(tx, ty, tw, th)`` ``[..., 4]``.

        ``tx, ty`` are the logits of the centre's offset inside the cell.  The offset is clamped to
        ``[eps, 1 - eps]`` first: a centre exactly on the cell border (offset 0 or 1) would need an
        infinite logit.  Sizes are floored at ``eps`` pixels for the same reason (``log 0``).
        """
        centre = 0.5 * (boxes[..., 0:2] + boxes[..., 2:4])
        size = box_wh(boxes).clamp(min=self.eps)
        offset = (centre / stride - cell_xy).clamp(self.eps, 1.0 - self.eps)
        txy = torch.logit(offset)
        twh = torch.log(size / anchor_wh)
        return torch.cat([txy, twh], dim=-1)


class RcnnDeltaCoder:
    """R-CNN box deltas (Girshick et al. 2014, appendix C; reused by Faster R-CNN's RPN).

    For a reference box (anchor / proposal) with centre ``(xa, ya)`` and size ``(wa, ha)`` and a box
    with centre ``(x, y)`` and size ``(w, h)``::

        dx = wx * (x - xa) / wa        dw = ww * log(w / wa)
        dy = wy * (y - ya) / ha        dh = wh * log(h / ha)

    Normalising by the reference size makes the targets scale-invariant; the weights rescale them
    to roughly unit variance (Fast R-CNN heads use (10, 10, 5, 5), an RPN uses (1, 1, 1, 1)).
    ``dw, dh`` are clamped at ``clamp`` (after dividing out the weight) before ``exp``.

    Boxes are xyxy ``[..., 4]``; deltas ``[..., 4]``; leading dims broadcast.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = DEFAULT_MAX_LOG_SCALE,
        eps: float = 1e-6,
    ) -> None:
        if len(weights) != 4 or any(float(w) <= 0 for w in weights):
            raise ValueError(f"RcnnDeltaCoder weights must be 4 positive numbers, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)
        self.eps = float(eps)

    def _weights(self, like: Tensor) -> Tensor:
        return torch.tensor(self.weights, dtype=like.dtype, device=like.device)

    def encode(self, reference_boxes: Tensor, boxes: Tensor) -> Tensor:
        """Deltas ``(dx, dy, dw, dh)`` ``[..., 4]`` that move xyxy ``reference_boxes`` onto xyxy ``boxes``."""
        ref = xyxy_to_cxcywh(reference_boxes)
        box = xyxy_to_cxcywh(boxes)
        # Sizes floored at eps: a degenerate reference/box would otherwise give inf/nan targets.
        ref_wh = ref[..., 2:4].clamp(min=self.eps)
        box_wh_ = box[..., 2:4].clamp(min=self.eps)
        dxy = (box[..., 0:2] - ref[..., 0:2]) / ref_wh
        dwh = torch.log(box_wh_ / ref_wh)
        return torch.cat([dxy, dwh], dim=-1) * self._weights(dxy)

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """Apply deltas ``[..., 4]`` to xyxy ``reference_boxes`` -> boxes xyxy ``[..., 4]``."""
        ref = xyxy_to_cxcywh(reference_boxes)
        unweighted = deltas / self._weights(deltas)
        centre = ref[..., 0:2] + unweighted[..., 0:2] * ref[..., 2:4]
        size = ref[..., 2:4] * torch.exp(unweighted[..., 2:4].clamp(max=self.clamp))
        return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)
