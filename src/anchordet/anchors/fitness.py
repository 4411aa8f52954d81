"""How well anchor shapes fit the training boxes: the numbers an anchor builder reports.

Shape glossary: N training boxes ``box_wh [N, 2]`` (w, h) in network-input pixels, K anchor shapes
over all levels ``[K, 2]``, one ``Tensor[A, 2]`` per level in ``shapes_per_level``.

- :func:`best_shape_iou`: each box's best shape-IoU with any anchor (boxes and anchors centred
  together, YOLOv2's "Avg IOU" measure), in row blocks so millions of boxes stay cache-sized;
- :func:`fitness_report`: its mean and the share of boxes reaching 0.5 (best possible recall);
- :func:`compare_with_grid`: the same for a grid baseline, and what the data-driven shapes gained;
- :func:`placed_anchor_coverage`: the placed anchors (shape *and* grid position) against real boxes,
  which is what an IoU matcher sees; the shape-only numbers ignore the stride.

Builders (``KMeansAnchors``, ``GridAnchors``) return these reports from ``build``; callbacks read the
report instead of computing it again, so every number has one TensorBoard tag.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from anchordet.boxes import shape_iou

# Rows of boxes per IoU block: keeps the [chunk, K] temporaries cache-sized (measured 3x faster than
# one [N, K] pass for 1M boxes) and bounds memory for many-million-box datasets.
CHUNK = 1 << 16
# A box whose best anchor has shape-IoU at least this counts as reachable (YOLO's anchor threshold).
RECALL_IOU = 0.5


def best_shape(box_wh: Tensor, shapes: Tensor) -> tuple[Tensor, Tensor]:
    """Best shape-IoU ``[N]`` of every box with the shapes ``[K, 2]``, and that shape's index ``[N]``."""
    best_iou = torch.empty(box_wh.shape[0], dtype=box_wh.dtype, device=box_wh.device)
    best_index = torch.empty(box_wh.shape[0], dtype=torch.long, device=box_wh.device)
    for start in range(0, box_wh.shape[0], CHUNK):
        block = slice(start, start + CHUNK)
        best_iou[block], best_index[block] = shape_iou(box_wh[block], shapes).max(dim=1)
    return best_iou, best_index


def best_shape_iou(box_wh: Tensor, shapes_per_level: list[Tensor]) -> Tensor:
    """Best shape-IoU ``[N]`` of every box with any anchor of any level (0 boxes or 0 anchors: zeros)."""
    shapes = torch.cat([s.reshape(-1, 2) for s in shapes_per_level]).to(box_wh.device, torch.float32)
    if box_wh.shape[0] == 0 or shapes.shape[0] == 0:
        return box_wh.new_zeros(box_wh.shape[0])
    return best_shape(box_wh.detach().float(), shapes)[0]


def fitness_report(box_wh: Tensor, shapes_per_level: list[Tensor]) -> dict:
    """How well anchor shapes cover the boxes ``box_wh [N, 2]``.

    ``mean_best_iou``: mean over boxes of the best shape-IoU with any anchor (the YOLOv2 "Avg IOU").
    ``best_possible_recall``: share of boxes whose best anchor reaches shape-IoU >= 0.5, an upper
    bound on what a matcher with that threshold can assign.
    """
    if box_wh.ndim != 2 or box_wh.shape[1] != 2:
        raise ValueError(f"box_wh must have shape [N, 2] of (w, h), got {tuple(box_wh.shape)}")
    best_iou = best_shape_iou(box_wh, shapes_per_level).double()
    report = {
        "num_boxes": int(box_wh.shape[0]),
        "num_anchors": int(sum(s.shape[0] for s in shapes_per_level)),
        "anchors_per_level": [int(s.shape[0]) for s in shapes_per_level],
    }
    if best_iou.numel() == 0 or report["num_anchors"] == 0:
        return {**report, "mean_best_iou": 0.0, "best_possible_recall": 0.0}
    return {
        **report,
        "mean_best_iou": float(best_iou.mean()),
        "best_possible_recall": float((best_iou >= RECALL_IOU).double().mean()),
    }


def compare_with_grid(box_wh: Tensor, kmeans_shapes: list[Tensor], grid_shapes: list[Tensor]) -> dict:
    """Fitness of k-means anchors next to a grid-anchor baseline, and what k-means gained."""
    kmeans = fitness_report(box_wh, kmeans_shapes)
    grid = fitness_report(box_wh, grid_shapes)
    return {
        "kmeans": kmeans,
        "grid": grid,
        "gain_mean_best_iou": kmeans["mean_best_iou"] - grid["mean_best_iou"],
        "gain_best_possible_recall": kmeans["best_possible_recall"] - grid["best_possible_recall"],
    }


def placed_anchor_coverage(anchor_boxes: Tensor, gt_boxes_per_image: list[Tensor],
                           foreground_iou: float | None) -> dict[str, float]:
    """How well the *placed* anchors (shape and grid position) can reach real GT boxes.

    ``anchor_boxes [N, 4]`` are the anchors of one input size, ``gt_boxes_per_image`` one ``[M, 4]``
    tensor per image in the same frame (xyxy). Returns ``placed_best_iou``, the mean over GT boxes of
    their best IoU with any anchor, and, when the matcher has a foreground threshold,
    ``gt_with_foreground_anchor``: the share of GT boxes with at least one anchor at or above it. A
    GT box without a foreground anchor is trained only through its low-quality matches, which is what
    starves an RPN whose anchors do not fit the data (docs/rpn.md). No boxes: an empty dict.
    """
    best = [box_iou(boxes.to(anchor_boxes).reshape(-1, 4), anchor_boxes).amax(dim=1)
            for boxes in gt_boxes_per_image if boxes.numel()]
    if not best:
        return {}
    best_iou = torch.cat(best)
    report = {"placed_best_iou": best_iou.mean().item()}
    if foreground_iou is not None:
        report["gt_with_foreground_anchor"] = (best_iou >= foreground_iou).float().mean().item()
    return report
