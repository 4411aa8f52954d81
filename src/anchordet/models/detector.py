"""The Detector: backbone + anchor shapes + head + matcher, independent of which head it carries.

Shape glossary
    B       images in the batch
    S       network input side (H, W in general)
    L       levels the backbone returns; ``anchor_shapes_per_level`` has one entry per level
    A       anchor shapes on one level, ``Tensor[A, 2]`` of (w, h) in input pixels
    Hl, Wl  size of pyramid level ``l``
    N       placed anchors over the used levels, in ``(level, y, x, a)`` order
    M       ground-truth boxes per image after padding
    D       detections of one image

Boxes are xyxy in absolute pixels of the network input.

The head contract (``YoloHead`` today, an RPN head later): ``head(features) -> raw_per_level``,
``head.loss(raw, anchors, gt_boxes, gt_labels, gt_mask, matcher) -> dict of loss_* scalars``,
``head.postprocess(raw, anchors, image_size) -> list of {"boxes", "scores", "labels"}``.

Levels with no anchor shapes (``Tensor[0, 2]``, the single-level YOLOv2 option) are dropped from the
backbone output before the head sees it, so the head must be built for the used levels only:
``Detector.used_levels(shapes)`` lists them and ``Detector.num_anchors_per_used_level(shapes)``
gives the ``num_anchors`` for the head.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

from anchordet.anchors.placement import AnchorGrid
from anchordet.matching import pad_targets

# Multi-scale training visits a handful of input sizes; older grids are dropped beyond this many.
ANCHOR_CACHE_SIZE = 8


def _as_shapes(shapes, level: int) -> Tensor:
    """Anchor shapes of one level as float32 [A, 2] (w, h); accepts tensors and nested lists."""
    shapes = torch.as_tensor(shapes, dtype=torch.float32).reshape(-1, 2) if len(shapes) else torch.zeros(0, 2)
    if shapes.numel() and not bool((shapes > 0).all()):
        raise ValueError(f"anchor shapes of level {level} must be positive (w, h) pairs, got {shapes.tolist()}")
    return shapes


class Detector(nn.Module):
    """Runs ``backbone -> head`` and owns the anchor shapes (as buffers, so checkpoints carry them).

    Args:
        backbone: module with ``strides: list[int]`` and ``forward(x) -> list[[B, C, Hl, Wl]]``.
        head: see the head contract in the module docstring; built for the used levels only.
        anchor_shapes_per_level: one ``[A, 2]`` (w, h) tensor per backbone level; ``[0, 2]`` = unused.
        matcher: callable ``(gt_boxes, gt_mask, shapes_per_level, strides, grid_sizes) -> [B, N]``.
        anchor_offset: anchor centre inside its cell in cell units (0.5 = the cell centre).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        anchor_shapes_per_level: Sequence[Tensor],
        matcher,
        anchor_offset: float = 0.5,
    ) -> None:
        super().__init__()
        shapes = [_as_shapes(s, level) for level, s in enumerate(anchor_shapes_per_level)]
        backbone_strides = [int(s) for s in backbone.strides]
        if len(shapes) != len(backbone_strides):
            raise ValueError(
                f"Detector got anchor shapes for {len(shapes)} levels but the backbone returns "
                f"{len(backbone_strides)} levels (strides {backbone_strides}); give one [A, 2] entry "
                f"per backbone level, [0, 2] for a level without anchors"
            )
        self.used_level_indices = self.used_levels(shapes)
        if not self.used_level_indices:
            raise ValueError("Detector: no level has any anchor shape; check the anchor config")
        self._check_head(head, shapes)
        self.backbone = backbone
        self.head = head
        self.matcher = matcher
        self.anchor_offset = float(anchor_offset)
        self._all_strides = backbone_strides
        # One buffer per backbone level (empty ones too) so the state dict mirrors the anchor config.
        for level, level_shapes in enumerate(shapes):
            self.register_buffer(self._buffer_name(level), level_shapes.clone())
        self._anchor_cache: OrderedDict[tuple, AnchorGrid] = OrderedDict()
        # Checkpoint loading replaces the anchor shapes, so grids placed from the old ones must go.
        self.register_load_state_dict_post_hook(Detector._clear_anchor_cache_hook)

    # ------------------------------------------------------------------ level bookkeeping
    @staticmethod
    def used_levels(anchor_shapes_per_level: Sequence[Tensor]) -> list[int]:
        """Indices of the levels that have at least one anchor shape (the levels the head sees)."""
        return [level for level, s in enumerate(anchor_shapes_per_level) if len(s) > 0]

    @staticmethod
    def num_anchors_per_used_level(anchor_shapes_per_level: Sequence[Tensor]) -> list[int]:
        """A of every used level: what the head's ``num_anchors`` must be."""
        return [len(anchor_shapes_per_level[level]) for level in Detector.used_levels(anchor_shapes_per_level)]

    @staticmethod
    def _buffer_name(level: int) -> str:
        return f"anchor_shapes_{level}"

    def _check_head(self, head: nn.Module, shapes: list[Tensor]) -> None:
        used = self.used_levels(shapes)
        head_levels = getattr(head, "num_levels", None)
        if head_levels is not None and head_levels != len(used):
            raise ValueError(
                f"the head was built for {head_levels} levels but {len(used)} levels have anchors "
                f"(levels {used}); build it with num_levels=len(Detector.used_levels(shapes))"
            )
        head_anchors = getattr(head, "num_anchors_per_level", None)
        wanted = self.num_anchors_per_used_level(shapes)
        if head_anchors is not None and list(head_anchors) != wanted:
            raise ValueError(
                f"the head predicts {list(head_anchors)} anchors per level but the anchor shapes give "
                f"{wanted}; build it with num_anchors=Detector.num_anchors_per_used_level(shapes)"
            )

    @property
    def anchor_shapes_per_level(self) -> list[Tensor]:
        """[A, 2] (w, h) per backbone level, empty levels included (aligned with ``strides``)."""
        return [getattr(self, self._buffer_name(level)) for level in range(len(self._all_strides))]

    @property
    def strides(self) -> list[int]:
        """Stride of every backbone level, empty levels included (aligned with the anchor shapes)."""
        return list(self._all_strides)

    @property
    def used_strides(self) -> list[int]:
        return [self._all_strides[level] for level in self.used_level_indices]

    # ------------------------------------------------------------------ anchors
    @staticmethod
    def _clear_anchor_cache_hook(module: Detector, incompatible_keys) -> None:
        module.clear_anchor_cache()

    def clear_anchor_cache(self) -> None:
        """Forget the placed anchors; call it after editing the anchor-shape buffers in place."""
        self._anchor_cache.clear()

    def anchor_grid(self, grid_sizes: list[tuple[int, int]], device: torch.device) -> AnchorGrid:
        """The placed anchors of the used levels for these grid sizes, cached.

        The key holds whether inference mode is on: tensors made under ``torch.inference_mode``
        (Lightning's validation) cannot be saved for backward, so training must not reuse them.
        It does not look at the anchor values (that would need a device sync every step, and DDP's
        buffer broadcast rewrites them every step anyway); ``load_state_dict`` clears the cache.
        """
        shapes = [self.anchor_shapes_per_level[level] for level in self.used_level_indices]
        key = (
            tuple(grid_sizes),
            str(device),
            tuple(s.dtype for s in shapes),
            torch.is_inference_mode_enabled(),
        )
        grid = self._anchor_cache.get(key)
        if grid is None:
            grid = AnchorGrid.build(
                shapes, self.used_strides, list(grid_sizes), offset=self.anchor_offset, device=device
            )
            self._anchor_cache[key] = grid
            while len(self._anchor_cache) > ANCHOR_CACHE_SIZE:
                self._anchor_cache.popitem(last=False)
        return grid

    # ------------------------------------------------------------------ running
    def _features(self, images: Tensor) -> list[Tensor]:
        features = self.backbone(images)
        if len(features) != len(self._all_strides):
            raise ValueError(
                f"the backbone returned {len(features)} levels, expected {len(self._all_strides)}"
            )
        # Levels without anchors are dropped here: the head never sees them.
        return [features[level] for level in self.used_level_indices]

    def _run(self, images: Tensor) -> tuple[list[Tensor], AnchorGrid]:
        features = self._features(images)
        raw_per_level = self.head(features)
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        return raw_per_level, self.anchor_grid(grid_sizes, images.device)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images float [B, 3, H, W] (normalised) -> the head's raw outputs per used level."""
        return self.head(self._features(images))

    def loss(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """images float [B, 3, H, W]; targets: per image {"boxes" [M, 4] xyxy input px, "labels" [M]}.

        Returns the head's ``loss_*`` terms (already weighted) plus ``"loss"``, their sum.
        """
        raw_per_level, anchors = self._run(images)
        gt_boxes, gt_labels, gt_mask = pad_targets(targets)
        device = images.device
        losses = self.head.loss(
            raw_per_level,
            anchors,
            gt_boxes.to(device),
            gt_labels.to(device),
            gt_mask.to(device),
            self.matcher,
        )
        losses["loss"] = sum(losses.values())
        return losses

    def predict(self, images: Tensor) -> list[dict]:
        """images float [B, 3, H, W] -> per image {"boxes" [D, 4] xyxy input px, "scores" [D], "labels" [D]}.

        Runs in eval mode (BatchNorm running statistics) without gradients, then restores the mode,
        so a callback can call it in the middle of training.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                raw_per_level, anchors = self._run(images)
                height, width = int(images.shape[-2]), int(images.shape[-1])
                image_size = height if height == width else (height, width)
                return self.head.postprocess(raw_per_level, anchors, image_size)
        finally:
            self.train(was_training)
