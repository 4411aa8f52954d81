"""Put built parts together into a `Detector`, reading every derived size from the parts themselves.

The config names the parts; how many channels the backbone gives, how many anchors sit in a cell and
how many classes the data has are read off the built objects here, so no YAML repeats them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from anchordet.models.detector import Detector


def anchors_per_cell(anchor_shapes_per_level: list[torch.Tensor]) -> tuple[int, int]:
    """(A, number of used levels). Levels with no anchors are unused (the single-level YOLOv2 option);
    the used ones must all have the same A because one head conv serves every level."""
    counts = [int(s.shape[0]) for s in anchor_shapes_per_level if s.shape[0] > 0]
    if not counts:
        raise ValueError("the anchor config produced no anchors on any level: check anchor.k / "
                         "anchor.sizes_per_level")
    if len(set(counts)) != 1:
        raise ValueError(
            f"anchors per level differ ({counts}); the head needs the same number on every used level: "
            "make anchor.k divisible by the number of levels, or give every entry of "
            "anchor.sizes_per_level the same length")
    return counts[0], len(counts)


def assemble_detector(
    backbone: nn.Module,
    head_factory: Callable[..., nn.Module],
    anchor_shapes_per_level: list[torch.Tensor],
    matcher: Callable,
    num_classes: int,
    anchor_offset: float = 0.5,
) -> Detector:
    """Build the head for this backbone, these anchors and this many classes, and wrap it all."""
    if len(anchor_shapes_per_level) != len(backbone.strides):
        raise ValueError(
            f"{len(anchor_shapes_per_level)} anchor levels for a backbone with {len(backbone.strides)} "
            f"levels {list(backbone.level_names)}: check backbone.levels against the anchor config")
    num_anchors, num_levels = anchors_per_cell(anchor_shapes_per_level)
    head = head_factory(in_channels=backbone.out_channels, num_anchors=num_anchors,
                        num_classes=num_classes, num_levels=num_levels)
    return Detector(backbone, head, anchor_shapes_per_level, matcher, anchor_offset=anchor_offset)
