"""Anchor shapes (k-means on box sizes or a sizes x ratios grid) and their placement on feature maps.

Shapes are ``Tensor[A, 2]`` of ``(w, h)`` in network-input pixels, one per pyramid level; placed
anchors are xyxy in ``(level, y, x, a)`` order (see ``docs/architecture.md``).
"""

from anchordet.anchors.grid import GridAnchors, grid_anchor_shapes
from anchordet.anchors.kmeans import (
    KMeansAnchors,
    compare_with_grid,
    fitness_report,
    kmeans_anchor_shapes,
    shape_iou,
    split_over_levels,
)
from anchordet.anchors.placement import AnchorGrid, place_anchors

__all__ = [
    "KMeansAnchors",
    "GridAnchors",
    "AnchorGrid",
    "place_anchors",
    "shape_iou",
    "kmeans_anchor_shapes",
    "split_over_levels",
    "fitness_report",
    "compare_with_grid",
    "grid_anchor_shapes",
]
