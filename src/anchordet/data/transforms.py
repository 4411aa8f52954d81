"""Letterbox, horizontal flip and scale jitter for (image, boxes) pairs, on torchvision transforms v2.

Every detector here sees square ``S x S`` inputs. The deterministic path (validation, evaluation,
anchor fitting) is the *letterbox*: resize the longest side to ``S`` keeping the aspect ratio, pad
the rest with grey 114 (the mean-ish grey YOLO-family models pad with, so padding looks like
"nothing" rather than a black edge the network could learn to detect), image centred. The training
path flips, scales the letterbox by a random factor from ``scale_range`` and places the result at a
random offset: padding when it is smaller than ``S``, cropping when it is larger.

Boxes are ``tv_tensors.BoundingBoxes`` in XYXY pixels of the current canvas while they travel with
the image, and plain ``float32 [N, 4]`` xyxy network-input pixels when they leave.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

PAD_VALUE = 114
# A box narrower or lower than this many pixels (after clipping) carries no learnable signal.
MIN_BOX_SIDE = 1.0


def letterbox_scale(height, width, size: int):
    """``S / max(h, w)``; works on ints and on numpy arrays of heights and widths alike."""
    return size / np.maximum(height, width)


def resized_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """Integer (h, w) of an image scaled by ``scale``; at least one pixel per side."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def place_on_canvas(image: Tensor, boxes: Tensor, scale: float, left: int, top: int,
                    size: int) -> tuple[Tensor, Tensor]:
    """Scale ``image`` [3, h, w] and its xyxy ``boxes`` by ``scale``, put the image's top-left corner
    at (left, top) of a grey ``size x size`` canvas (negative offsets crop) and clip the boxes.

    The boxes are scaled by exactly ``scale`` rather than by the rounded pixel ratio, so that
    `to_original_frame` inverts the letterbox exactly; the price is at most half an input pixel of
    disagreement with the rounded image size on the short side.
    """
    height, width = image.shape[-2:]
    new_h, new_w = resized_shape(height, width, scale)
    resized = F.resize(image, [new_h, new_w], antialias=True)
    canvas = torch.full((image.shape[0], size, size), PAD_VALUE, dtype=image.dtype)
    # The visible window of the resized image in canvas coordinates, then the same window in the
    # resized image's own coordinates (shifted back by the offset).
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + new_w, size), min(top + new_h, size)
    if x1 > x0 and y1 > y0:
        canvas[:, y0:y1, x0:x1] = resized[:, y0 - top:y1 - top, x0 - left:x1 - left]
    offset = boxes.new_tensor([left, top, left, top])
    placed = (boxes.as_subclass(Tensor) * scale + offset).clamp_(0, size)
    return tv_tensors.Image(canvas), placed


class DetectionTransform:
    """Image + boxes + labels -> fixed ``S x S`` network input, and how to map boxes back.

    ``__call__(image uint8 [3, h, w], boxes BoundingBoxes xyxy [N, 4], labels int64 [N])`` returns
    ``(image uint8 [3, S, S], boxes float32 [N', 4] xyxy input px, labels [N'], scale, (left, top))``.
    With ``train=False`` nothing is random and N' = N. With ``train=True`` the image is flipped with
    probability ``hflip_prob`` (in the original frame, before scaling), the letterbox scale is
    multiplied by a factor drawn uniformly from ``scale_range``, the placement is random, and boxes
    cropped to ``MIN_BOX_SIDE`` px or less are dropped. Randomness comes from ``generator`` when
    one is given (the data module passes one seeded by (seed, epoch, image index), so a resumed run
    sees the same augmentations as an uninterrupted one), else from torch's global generator.
    """

    def __init__(self, image_size: int, train: bool, hflip_prob: float = 0.5,
                 scale_range: Sequence[float] = (0.5, 1.5)) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        low, high = (float(v) for v in scale_range)
        if not 0.0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, "
                             f"got {tuple(scale_range)}")
        self.image_size, self.train = int(image_size), bool(train)
        self.hflip_prob, self.scale_range = float(hflip_prob), (low, high)

    def __repr__(self) -> str:
        if not self.train:
            return f"DetectionTransform(letterbox {self.image_size})"
        return (f"DetectionTransform(letterbox {self.image_size}, hflip {self.hflip_prob}, "
                f"scale {self.scale_range})")

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor,
                 generator: torch.Generator | None = None):
        size = self.image_size
        height, width = image.shape[-2:]
        image = tv_tensors.Image(image)
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
        scale = float(letterbox_scale(height, width, size))
        if not self.train:
            new_h, new_w = resized_shape(height, width, scale)
            left, top = (size - new_w) // 2, (size - new_h) // 2
            image, placed = place_on_canvas(image, boxes, scale, left, top, size)
            return image.as_subclass(Tensor), placed, labels, scale, (float(left), float(top))

        if torch.rand((), generator=generator) < self.hflip_prob:
            image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
        scale *= float(torch.empty((), dtype=torch.float64).uniform_(*self.scale_range, generator=generator))
        new_h, new_w = resized_shape(height, width, scale)
        left = _random_offset(size - new_w, generator)
        top = _random_offset(size - new_h, generator)
        image, placed = place_on_canvas(image, boxes, scale, left, top, size)
        keep = ((placed[:, 2] - placed[:, 0]) > MIN_BOX_SIDE) & ((placed[:, 3] - placed[:, 1]) > MIN_BOX_SIDE)
        return image.as_subclass(Tensor), placed[keep], labels[keep], scale, (float(left), float(top))


def _random_offset(slack: int, generator: torch.Generator | None = None) -> int:
    """Offset of the image's edge on the canvas: within [0, slack] when the image is smaller than
    the canvas (it stays whole), within [slack, 0] when larger (the canvas stays covered)."""
    return int(torch.randint(min(0, slack), max(0, slack) + 1, (), generator=generator))


def to_original_frame(boxes: Tensor, target: Mapping[str, Any]) -> Tensor:
    """Network-input xyxy ``boxes`` [N, 4] -> xyxy pixels of the original (EXIF-rotated) image.

    ``(boxes - [left, top, left, top]) / scale``, clipped to ``target["orig_size"]`` (h, w). Exact
    for targets from the deterministic letterbox; for training targets it ignores the flip.
    """
    left, top = (float(v) for v in target["pad"])
    height, width = (float(v) for v in target["orig_size"])
    offset = boxes.new_tensor([left, top, left, top])
    upper = boxes.new_tensor([width, height, width, height])
    original = (boxes - offset) / float(target["scale"])
    return torch.minimum(original.clamp(min=0), upper)
