"""What every head shares: anchor counts, joining the levels, and the NMS tail of ``postprocess``.

Shape glossary
    B       images in the batch
    L       feature levels the head receives
    A       anchors per cell on one level
    K       outputs per anchor (head-specific)
    N       anchors over all levels, ``sum_l Hl*Wl*A``, ordered ``(level, y, x, a)`` like AnchorGrid
    Q       candidate boxes of the whole batch entering NMS
    D       detections (or proposals) kept for one image

The head contract (``docs/architecture.md``)::

    head.task                                       "detections" (mAP, classes) or "proposals" (AR)
    head(features: list[B, Cin, Hl, Wl]) -> raw     list of [B, Hl*Wl*A, K], (y, x, a) order
    head.loss(raw, anchors, gt, match) -> dict      loss_* scalars; gt: PaddedTargets, match: MatchResult
    head.anchor_roles(raw, anchors, gt, match)      MatchResult whose labels are the roles the loss trains
    head.postprocess(raw, anchors) -> list[dict]    per image {"boxes" [D, 4], "scores" [D], "labels" [D]}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

DETECTIONS = "detections"  # class-labelled boxes, judged by COCO mAP
PROPOSALS = "proposals"  # class-agnostic boxes, judged by COCO average recall
TASKS = (DETECTIONS, PROPOSALS)


def anchors_per_level(num_anchors: int | Sequence[int], num_levels: int, head_name: str) -> list[int]:
    """A per head-level anchor count list from an int (same A everywhere) or a list, checked."""
    if num_levels < 1:
        raise ValueError(f"{head_name} needs at least one level, got num_levels={num_levels}")
    if isinstance(num_anchors, int):
        num_anchors = [num_anchors] * num_levels
    counts = [int(a) for a in num_anchors]
    if len(counts) != num_levels or min(counts) < 1:
        raise ValueError(
            f"{head_name} num_anchors={list(num_anchors)} must give at least one anchor for each of "
            f"the num_levels={num_levels} levels"
        )
    return counts


def check_level_sizes(raw_per_level: Sequence[Tensor], anchors, head_name: str) -> None:
    """The head predicted exactly the anchors of the grid, level by level."""
    predicted = [int(raw.shape[1]) for raw in raw_per_level]
    if predicted != list(anchors.num_per_level):
        raise ValueError(
            f"{head_name}: {predicted} predictions per level but the AnchorGrid has "
            f"{list(anchors.num_per_level)} anchors per level; the anchor shapes and grid sizes must "
            f"match the head's levels and anchors per cell"
        )


def concat_levels(raw_per_level: Sequence[Tensor], anchors, head_name: str) -> Tensor:
    """list of [B, Hl*Wl*A, K] -> [B, N, K] float32: losses and decoding stay in fp32 under AMP."""
    check_level_sizes(raw_per_level, anchors, head_name)
    return torch.cat(list(raw_per_level), dim=1).float()


def nms_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, images: Tensor, groups: Tensor,
                  batch_size: int, nms_iou: float, max_per_image: int) -> list[dict]:
    """The candidates of a whole batch -> per image the ``max_per_image`` best after NMS.

    ``boxes [Q, 4]``, ``scores [Q]``, ``labels [Q]``, ``images [Q]`` (which image a candidate is of)
    and ``groups [Q]``: NMS only compares candidates of the same group, so a group must never span
    two images (e.g. ``image * C + class`` for detections, ``image * L + level`` for proposals).
    One ``batched_nms`` call serves the batch; the result is sorted by score within each image.
    """
    kept = batched_nms(boxes, scores, groups, nms_iou)
    # batched_nms sorts by score; a stable sort by image keeps that order inside each image.
    kept = kept[torch.sort(images[kept], stable=True).indices]
    kept_images = images[kept]
    counts = torch.bincount(kept_images, minlength=batch_size)  # [B]
    first_of_image = torch.cumsum(counts, 0) - counts
    rank_in_image = torch.arange(kept.numel(), device=boxes.device) - first_of_image[kept_images]
    kept = kept[rank_in_image < max_per_image]
    counts = counts.clamp(max=max_per_image).tolist()
    return [
        {"boxes": b, "scores": s, "labels": l}
        for b, s, l in zip(boxes[kept].split(counts), scores[kept].split(counts), labels[kept].split(counts))
    ]
