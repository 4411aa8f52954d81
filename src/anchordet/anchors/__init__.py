"""Anchor shapes (k-means on box sizes or a sizes x ratios grid), their fitness, and their placement.

Shapes are ``Tensor[A, 2]`` of ``(w, h)`` in network-input pixels, one per pyramid level; placed
anchors are xyxy in ``(level, y, x, a)`` order (see ``docs/architecture.md``). Import order: fitness
(needs only ``boxes``) <- grid <- kmeans; no module here imports a later one.
"""

from anchordet.anchors.fitness import (
    best_shape_iou,
    compare_with_grid,
    fitness_report,
    placed_anchor_coverage,
)
from anchordet.anchors.grid import GridAnchors, grid_anchor_shapes
from anchordet.anchors.kmeans import KMeansAnchors, kmeans_anchor_shapes, split_over_levels
from anchordet.anchors.placement import AnchorGrid, place_anchors

__all__ = [
    "KMeansAnchors",
    "GridAnchors",
    "AnchorGrid",
    "place_anchors",
    "kmeans_anchor_shapes",
    "split_over_levels",
    "best_shape_iou",
    "fitness_report",
    "compare_with_grid",
    "placed_anchor_coverage",
    "grid_anchor_shapes",
]
