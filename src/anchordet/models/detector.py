"""The Detector: backbone + anchor shapes + matcher + head, and the order they run in.

Shape glossary
    B       images in the batch
    H, W    network input size
    L       levels the backbone returns; ``anchor_shapes_per_level`` has one entry per level
    A       anchor shapes on one level, ``Tensor[A, 2]`` of (w, h) in input pixels
    Hl, Wl  size of pyramid level ``l``
    N       placed anchors over the used levels, in ``(level, y, x, a)`` order
    M       ground-truth boxes per image after padding
    D       detections of one image

Boxes are xyxy in absolute pixels of the network input.

One training step, in the order torchvision's and Detectron2's meta-architectures use (match first,
then the head's losses)::

    features = backbone(images)                      list of [B, F, Hl, Wl]
    raw      = head(features)                        list of [B, Hl*Wl*A, K]
    anchors  = anchor_grid((H, W))                   AnchorGrid, cached per input size
    gt       = pad_targets(targets)                  PaddedTargets [B, M, ...]
    match    = matcher(anchors, gt.boxes, gt.mask)   MatchResult [B, N]
    losses   = head.loss(raw, anchors, gt, match)    dict of loss_* scalars

The contracts of the parts are in ``models/heads/common.py`` (head), ``matching.py`` (matcher) and
``docs/architecture.md`` (backbone: ``strides``, ``level_names``, ``out_channels``,
``feature_sizes(H, W)``). The detector never reaches into a part beyond them.

Levels with no anchor shapes (``Tensor[0, 2]``, the single-level YOLOv2 option) are dropped from the
backbone output before the head sees it, so the head is built for the used levels only:
``Detector.used_levels(shapes)`` lists them and ``Detector.num_anchors_per_used_level(shapes)``
gives the head's ``num_anchors``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

from anchordet.anchors.placement import AnchorGrid
from anchordet.matching import MatchResult, PaddedTargets, pad_targets

# Multi-scale training visits a handful of input sizes; older grids are dropped beyond this many.
ANCHOR_CACHE_SIZE = 8


def _as_shapes(shapes, level: int) -> Tensor:
    """Anchor shapes of one level as float32 [A, 2] (w, h); accepts tensors and nested lists."""
    shapes = torch.as_tensor(shapes, dtype=torch.float32).reshape(-1, 2) if len(shapes) else torch.zeros(0, 2)
    if shapes.numel() and not bool((shapes > 0).all()):
        raise ValueError(f"anchor shapes of level {level} must be positive (w, h) pairs, got {shapes.tolist()}")
    return shapes


class Detector(nn.Module):
    """Runs backbone, head and matcher in order, and owns the anchor shapes (buffers, so checkpoints
    carry them).

    Args:
        backbone: module with ``strides``, ``feature_sizes(H, W)`` and ``forward(x) -> list[[B, C, Hl, Wl]]``.
        head: a head meeting the contract of ``models/heads/common.py``, built for the used levels.
        anchor_shapes_per_level: one ``[A, 2]`` (w, h) tensor per backbone level; ``[0, 2]`` = unused.
        matcher: ``matcher(anchors, gt_boxes [B, M, 4], gt_mask [B, M]) -> MatchResult``.
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

    def anchor_grid(self, input_size: tuple[int, int], device: torch.device | None = None) -> AnchorGrid:
        """The placed anchors of the used levels for an ``(H, W)`` network input, cached.

        The grid sizes come from ``backbone.feature_sizes``, the one source of the geometry (the
        forward pass checks the real feature maps against it). The cache key holds whether inference
        mode is on: tensors made under ``torch.inference_mode`` (Lightning's validation) cannot be
        saved for backward, so training must not reuse them. It does not look at the anchor values
        (that would need a device sync every step, and DDP's buffer broadcast rewrites them every
        step anyway); ``load_state_dict`` clears the cache.
        """
        shapes = [self.anchor_shapes_per_level[level] for level in self.used_level_indices]
        device = shapes[0].device if device is None else torch.device(device)
        input_size = (int(input_size[0]), int(input_size[1]))
        key = (input_size, str(device), tuple(s.dtype for s in shapes), torch.is_inference_mode_enabled())
        grid = self._anchor_cache.get(key)
        if grid is None:
            all_sizes = self.backbone.feature_sizes(*input_size)
            grid_sizes = [all_sizes[level] for level in self.used_level_indices]
            grid = AnchorGrid.build(shapes, self.used_strides, grid_sizes, input_size,
                                    offset=self.anchor_offset, device=device)
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
        anchors = self.anchor_grid(tuple(images.shape[-2:]), images.device)
        actual = [tuple(int(n) for n in f.shape[-2:]) for f in features]
        if actual != anchors.grid_sizes:
            raise ValueError(
                f"the backbone's feature maps are {actual} but its feature_sizes() says "
                f"{anchors.grid_sizes} for input {tuple(images.shape[-2:])}; fix feature_sizes")
        return self.head(features), anchors

    def forward(self, images: Tensor) -> list[Tensor]:
        """images float [B, 3, H, W] (normalised) -> the head's raw outputs per used level."""
        return self.head(self._features(images))

    @torch.no_grad()
    def match(self, anchors: AnchorGrid, gt: PaddedTargets) -> MatchResult:
        """The matcher's verdict for every anchor of ``anchors`` (no gradient flows through it)."""
        return self.matcher(anchors, gt.boxes, gt.mask)

    def loss(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """images float [B, 3, H, W]; targets: per image {"boxes" [M, 4] xyxy input px, "labels" [M]}.

        Returns the head's ``loss_*`` terms (already weighted) plus ``"loss"``, their sum.
        """
        raw_per_level, anchors = self._run(images)
        gt = pad_targets(targets).to(images.device)
        losses = self.head.loss(raw_per_level, anchors, gt, self.match(anchors, gt))
        losses["loss"] = sum(losses.values())
        return losses

    def match_targets(self, targets: list[dict], input_size: tuple[int, int]
                      ) -> tuple[AnchorGrid, PaddedTargets, MatchResult]:
        """Anchors, padded GT and the matcher's verdict for targets at an input size, without
        running the network (statistics over many images)."""
        anchors = self.anchor_grid(input_size)
        gt = pad_targets(targets).to(anchors.boxes.device)
        return anchors, gt, self.match(anchors, gt)

    @torch.no_grad()
    def anchor_roles(self, images: Tensor, targets: list[dict]) -> tuple[AnchorGrid, PaddedTargets, MatchResult]:
        """The roles the loss would train with on this batch (labels 1 / 0 / -1 per anchor), from
        the matcher and the head's own rules on the current predictions; for the anchor pictures."""
        raw_per_level, anchors = self._run(images)
        gt = pad_targets(targets).to(images.device)
        return anchors, gt, self.head.anchor_roles(raw_per_level, anchors, gt, self.match(anchors, gt))

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
                return self.head.postprocess(raw_per_level, anchors)
        finally:
            self.train(was_training)
