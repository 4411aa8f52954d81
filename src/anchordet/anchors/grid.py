"""Hand-designed grid anchors: sizes x aspect ratios per pyramid level (Faster R-CNN, FPN, RetinaNet).

Shapes are ``(w, h)`` in network-input pixels, one ``Tensor[A, 2]`` per level.  Convention of
torchvision's ``AnchorGenerator``: aspect ratio ``r = h / w`` and area ``size ** 2``, so
``w = size / sqrt(r)`` and ``h = size * sqrt(r)``; ordered ratio-major, size-minor.  Unlike
torchvision the shapes are not rounded to whole pixels: rounding changes the aspect ratio of small
anchors (a 16 px anchor at r = 2 becomes 12 x 22, r = 1.83, instead of 11.3 x 22.6) for no gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from anchordet.anchors.fitness import fitness_report


def _as_size_lists(sizes_per_level: Sequence) -> list[list[float]]:
    # Accept [[32, 40], [64, 80]] and the shorthand [32, 64] (one size per level); Hydra passes
    # ListConfig, which is a Sequence but not a list.
    levels = []
    for level in sizes_per_level:
        if isinstance(level, (int, float)):
            levels.append([float(level)])
        else:
            levels.append([float(size) for size in level])
    return levels


def grid_anchor_shapes(sizes_per_level: Sequence, aspect_ratios: Sequence[float]) -> list[Tensor]:
    """Shapes ``list[Tensor[len(ratios) * len(sizes), 2]]`` (w, h) per level, ratio-major."""
    levels = _as_size_lists(sizes_per_level)
    ratios = [float(r) for r in aspect_ratios]
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"anchor.aspect_ratios must be positive numbers (h / w), got {list(aspect_ratios)}")
    shapes_per_level = []
    for level, sizes in enumerate(levels):
        if any(s <= 0 for s in sizes):
            raise ValueError(f"anchor.sizes_per_level[{level}] must hold positive sizes, got {sizes}")
        shapes = [(s / math.sqrt(r), s * math.sqrt(r)) for r in ratios for s in sizes]
        shapes_per_level.append(torch.tensor(shapes, dtype=torch.float32).reshape(-1, 2))
    return shapes_per_level


def check_sizes_ordered_by_level(sizes_per_level: list[list[float]]) -> None:
    """Levels run from fine to coarse (P3, P4, ... strides 8, 16, ...), so their anchor sizes must grow
    with them: a large anchor on a fine level is placed at many cells it cannot tell apart and a small
    one on a coarse level at too few to reach its objects. Each level's smallest and largest sizes must
    be at least those of the level before."""
    for level in range(1, len(sizes_per_level)):
        before, here = sizes_per_level[level - 1], sizes_per_level[level]
        if min(here) < min(before) or max(here) < max(before):
            raise ValueError(
                f"anchor.sizes_per_level is not ordered by level: level {level} has sizes {here}, smaller than "
                f"level {level - 1}'s {before}. The first list is for the finest level (the backbone's first, "
                f"e.g. P3 at stride 8), each next one for a level twice as coarse: list them from small to large")


class GridAnchors:
    """Anchor config target: fixed sizes per level times aspect ratios.

    ``build(box_wh, num_levels)`` returns ``(shapes_per_level, report)``. The shapes do not depend
    on the data; the report is their fitness on ``box_wh`` (``{"grid": fitness_report}``), or ``{}``
    for ``box_wh=None``. ``offset``: where the anchors sit inside their cell (see ``KMeansAnchors``).
    """

    def __init__(self, sizes_per_level: Sequence, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 offset: float = 0.5) -> None:
        self.sizes_per_level = _as_size_lists(sizes_per_level)
        check_sizes_ordered_by_level(self.sizes_per_level)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.offset = float(offset)

    def build(self, box_wh: Tensor | None, num_levels: int) -> tuple[list[Tensor], dict]:
        """(anchor shapes per level ``list[Tensor[A, 2]]`` (w, h), fitness report)."""
        if len(self.sizes_per_level) != num_levels:
            raise ValueError(
                f"anchor.sizes_per_level has {len(self.sizes_per_level)} levels but backbone.levels has "
                f"{num_levels}: give one list of sizes per backbone level, or pick the anchor config made "
                f"for these levels (anchor=grid for P3-P5, anchor=rpn_grid for P2-P6, anchor=kmeans for any)"
            )
        shapes_per_level = grid_anchor_shapes(self.sizes_per_level, self.aspect_ratios)
        report = {"grid": fitness_report(box_wh, shapes_per_level)} if box_wh is not None else {}
        return shapes_per_level, report
