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

A head's ``postprocess`` is its fixed-shape ``candidates(raw, anchors) -> Candidates`` followed by
the NMS tail shared here: `select_per_image` (a list of per-image results, for evaluation) or
`select_padded` (fixed-shape tensors, what the exported model returns). The heads also expose
``nms_iou`` and ``max_per_image``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class Candidates:
    """A head's detection candidates before NMS, all ``[B, K, ...]`` (K fixed for an input size):
    ``boxes [B, K, 4]`` xyxy input px, ``scores [B, K]``, ``labels [B, K]`` int64, ``groups [B, K]``
    int64 in ``0..num_groups-1`` (NMS compares candidates of one group of one image only) and
    ``valid [B, K]`` bool (candidates that may be kept at all)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    groups: Tensor
    valid: Tensor
    num_groups: int

    def image_index(self) -> Tensor:
        batch_size, k = self.scores.shape
        return torch.arange(batch_size, device=self.scores.device)[:, None].expand(batch_size, k)


def select_per_image(candidates: Candidates, nms_iou: float, max_per_image: int) -> list[dict]:
    """The valid candidates through NMS, at most ``max_per_image`` per image: a list of
    ``{"boxes" [D, 4], "scores" [D], "labels" [D]}``, each sorted by score."""
    c, images = candidates, candidates.image_index()
    keep = c.valid
    return nms_per_image(c.boxes[keep], c.scores[keep], c.labels[keep], images[keep],
                         groups=images[keep] * c.num_groups + c.groups[keep], batch_size=c.scores.shape[0],
                         nms_iou=nms_iou, max_per_image=max_per_image)


def select_padded(candidates: Candidates, nms_iou: float, max_per_image: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`select_per_image` with fixed-shape outputs and no data-dependent indexing (for export):
    ``boxes [B, D, 4]``, ``scores [B, D]``, ``labels [B, D]``, ``num_detections [B]`` with D =
    ``max_per_image``; slots past ``num_detections`` hold zeros and label -1.

    Invalid candidates get score -1 instead of being removed: NMS visits boxes by falling score, so
    a box scoring below every valid one can suppress none of them, and it is left out at the end.
    """
    c = candidates
    batch_size, k = c.scores.shape
    scores = torch.where(c.valid, c.scores, torch.full_like(c.scores, -1.0)).reshape(-1)  # [B*K]
    images = c.image_index().reshape(-1)
    kept = batched_nms(c.boxes.reshape(-1, 4), scores, images * c.num_groups + c.groups.reshape(-1), nms_iou)
    # By image, by score within one: unique keys (image, rank by score), so no stable sort is needed
    # (which the ONNX exporter lacks).
    order_key = images[kept] * kept.shape[0] + torch.arange(kept.shape[0], device=scores.device)
    kept = kept[torch.argsort(order_key)]
    kept_images = images[kept]
    counts = torch.zeros(batch_size, dtype=torch.long, device=scores.device).scatter_add_(
        0, kept_images, torch.ones_like(kept_images))
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kept.shape[0], device=scores.device) - first[kept_images]
    good = (rank < max_per_image) & (scores[kept] >= 0)
    # Slots of the padded outputs; everything not kept goes to one spare slot cut off at the end.
    slot = torch.where(good, kept_images * max_per_image + rank, torch.full_like(rank, batch_size * max_per_image))
    size = batch_size * max_per_image + 1
    out_boxes = torch.zeros(size, 4, dtype=c.boxes.dtype, device=scores.device).index_copy(
        0, slot, c.boxes.reshape(-1, 4)[kept])
    out_scores = torch.zeros(size, dtype=scores.dtype, device=scores.device).index_copy(0, slot, scores[kept])
    out_labels = torch.full((size,), -1, dtype=torch.long, device=scores.device).index_copy(
        0, slot, c.labels.reshape(-1)[kept])
    num = torch.zeros(batch_size, dtype=torch.long, device=scores.device).scatter_add_(
        0, kept_images, good.long())
    return (out_boxes[:-1].view(batch_size, max_per_image, 4), out_scores[:-1].view(batch_size, max_per_image),
            out_labels[:-1].view(batch_size, max_per_image), num)
