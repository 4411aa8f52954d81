"""Matchers: which ground-truth box each placed anchor learns from.

Shape glossary: B images, M ground-truth slots per image (padded), L pyramid levels, Al anchor shapes
on level l, K = sum_l Al anchor shapes in all, Hl/Wl grid size of level l, N = sum_l Hl * Wl * Al
placed anchors in ``(level, y, x, a)`` order (the order of :class:`anchordet.anchors.AnchorGrid`).
Boxes are xyxy in network-input pixels.

- :func:`pad_targets`: list of per-image targets -> padded ``[B, M, ...]`` tensors and a mask.
- :class:`YoloMatcher`: YOLOv2/v3 assignment by best *shape* IoU, one cell per GT.
- (An IoU-threshold matcher with a balanced sampler for the RPN belongs here as well.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from anchordet.anchors.kmeans import shape_iou
from anchordet.boxes import box_wh

UNMATCHED = -1


def pad_targets(targets: Sequence[dict]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad per-image ``{"boxes": [n_i, 4] xyxy, "labels": [n_i]}`` to a batch.

    Returns ``gt_boxes [B, M, 4]`` float32 xyxy, ``gt_labels [B, M]`` int64 and ``gt_mask [B, M]``
    bool (True = real box) with ``M = max(1, max_i n_i)``; padding is zeros.  Everything lives on the
    device of the boxes, so an all-empty batch still gives well-formed ``[B, 1, ...]`` tensors.
    """
    boxes = [t["boxes"].reshape(-1, 4) for t in targets]
    labels = [t["labels"].reshape(-1) for t in targets]
    device = boxes[0].device if boxes else torch.device("cpu")
    counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.long, device=device)
    for index, (b, l) in enumerate(zip(boxes, labels)):
        if b.shape[0] != l.shape[0]:
            raise ValueError(f"target {index}: {b.shape[0]} boxes but {l.shape[0]} labels")
    num_images, max_boxes = len(targets), max([1] + [b.shape[0] for b in boxes])
    gt_boxes = torch.zeros((num_images, max_boxes, 4), dtype=torch.float32, device=device)
    gt_labels = torch.zeros((num_images, max_boxes), dtype=torch.long, device=device)
    gt_mask = torch.zeros((num_images, max_boxes), dtype=torch.bool, device=device)
    if counts.sum() > 0:
        # One scatter for the whole batch: box j of image i goes to slot (i, j).
        image_index = torch.repeat_interleave(torch.arange(num_images, device=device), counts)
        first_of_image = counts.cumsum(0) - counts
        slot = torch.arange(image_index.shape[0], device=device) - first_of_image[image_index]
        gt_boxes[image_index, slot] = torch.cat(boxes).to(device, torch.float32)
        gt_labels[image_index, slot] = torch.cat(labels).to(device, torch.long)
        gt_mask[image_index, slot] = True
    return gt_boxes, gt_labels, gt_mask


class YoloMatcher:
    """Best-shape-IoU assignment (YOLOv2, Redmon & Farhadi 2017; multi-level as in YOLOv3).

    Each GT picks the anchor shape, over *all* levels, whose shape-IoU (boxes centred together) with
    the GT is largest, and is assigned to that shape at the grid cell containing the GT centre on
    that shape's level.  With ``multi_anchor_iou = t`` every other shape with shape-IoU > t also
    gets the GT at its own level's cell (the "multiple anchors per GT" refinement of later YOLOs),
    which gives more positives per object.

    ``__call__`` returns ``matched_gt [B, N]`` int64: the GT slot in ``0..M-1`` or -1.
    """

    def __init__(self, multi_anchor_iou: float | None = None) -> None:
        if multi_anchor_iou is not None and not 0.0 <= float(multi_anchor_iou) < 1.0:
            raise ValueError(f"matcher.multi_anchor_iou must be in [0, 1) or null, got {multi_anchor_iou}")
        self.multi_anchor_iou = None if multi_anchor_iou is None else float(multi_anchor_iou)

    def __call__(
        self,
        gt_boxes: Tensor,
        gt_mask: Tensor,
        anchor_shapes_per_level: Sequence[Tensor],
        strides: Sequence[float],
        grid_sizes: Sequence[tuple[int, int]],
    ) -> Tensor:
        if not len(anchor_shapes_per_level) == len(strides) == len(grid_sizes):
            raise ValueError(
                f"YoloMatcher needs one entry per level: got {len(anchor_shapes_per_level)} shape sets, "
                f"{len(strides)} strides and {len(grid_sizes)} grid sizes"
            )
        device = gt_boxes.device
        num_images, num_slots = gt_mask.shape
        shapes = [s.to(device=device, dtype=torch.float32).reshape(-1, 2) for s in anchor_shapes_per_level]

        # Per-shape view of the levels, all [K]: the level a shape lives on, its index a inside that
        # level, and that level's stride, grid size and first index in the flat (level, y, x, a) order.
        shapes_per_level = torch.tensor([s.shape[0] for s in shapes], dtype=torch.long, device=device)
        level_height = torch.tensor([int(h) for h, _ in grid_sizes], dtype=torch.long, device=device)
        level_width = torch.tensor([int(w) for _, w in grid_sizes], dtype=torch.long, device=device)
        level_count = level_height * level_width * shapes_per_level
        level_start = level_count.cumsum(0) - level_count
        num_anchors = int(level_count.sum())
        all_shapes = torch.cat(shapes)
        if all_shapes.shape[0] == 0:
            raise ValueError("YoloMatcher got no anchor shapes on any level")
        shape_level = torch.repeat_interleave(torch.arange(len(shapes), device=device), shapes_per_level)
        shape_index_in_level = (
            torch.arange(all_shapes.shape[0], device=device)
            - (shapes_per_level.cumsum(0) - shapes_per_level)[shape_level]
        )
        shape_stride = torch.tensor([float(s) for s in strides], dtype=torch.float32, device=device)[shape_level]
        shape_height, shape_width = level_height[shape_level], level_width[shape_level]
        shape_start, shape_count = level_start[shape_level], shapes_per_level[shape_level]

        matched = torch.full((num_images * num_anchors,), UNMATCHED, dtype=torch.long, device=device)
        if num_images * num_slots == 0 or not bool(gt_mask.any()):
            return matched.view(num_images, num_anchors)

        # (B, M, 4) -> (B*M, 4): every GT slot of the batch handled at once.
        flat_boxes = gt_boxes.reshape(-1, 4).float()
        flat_wh = box_wh(flat_boxes)
        iou = shape_iou(flat_wh, all_shapes)  # (B*M, K)
        best_shape = iou.argmax(dim=1)  # ties -> first shape in level order (finer level first)
        is_best = torch.zeros_like(iou, dtype=torch.bool)
        is_best[torch.arange(iou.shape[0], device=device), best_shape] = True
        claims = is_best | (iou > self.multi_anchor_iou) if self.multi_anchor_iou is not None else is_best
        claims = claims & gt_mask.reshape(-1, 1)  # not in place: claims may alias is_best

        # Cell containing the GT centre on every shape's level, (B*M, K); a centre on the far border
        # (x == W * stride) or outside the image is clamped into the grid rather than dropped.
        centre = 0.5 * (flat_boxes[:, 0:2] + flat_boxes[:, 2:4])
        column = torch.floor(centre[:, 0:1] / shape_stride).long().clamp(min=0)
        column = torch.minimum(column, shape_width - 1)
        row = torch.floor(centre[:, 1:2] / shape_stride).long().clamp(min=0)
        row = torch.minimum(row, shape_height - 1)
        image_of_slot = torch.arange(num_images, device=device).repeat_interleave(num_slots)[:, None]
        flat_index = (
            image_of_slot * num_anchors
            + shape_start
            + (row * shape_width + column) * shape_count
            + shape_index_in_level
        )

        # nonzero walks (B*M, K) row-major, so claims arrive ordered by (image, slot, shape).
        slot_of_claim, shape_of_claim = claims.nonzero(as_tuple=True)
        target = flat_index[slot_of_claim, shape_of_claim]
        gt_of_claim = slot_of_claim % num_slots
        # Collisions (two GTs on the same cell and anchor) are settled by priority, not by write
        # order, so the result is the same on every device:
        #  1. a GT's best shape beats an extra multi_anchor_iou claim: the best shape may be the
        #     GT's only positive, an extra claim is a bonus;
        #  2. then the smaller GT wins: two GTs that share a cell and prefer the same shape are alike
        #     in shape, and the larger one overlaps more neighbouring anchors (so it is still
        #     predicted near there and is not counted as background by IoU-based ignore rules),
        #     while the small object has no other place on the grid to be learnt;
        #  3. then the lower slot index (arrival order), for exact ties.
        area = flat_wh[:, 0] * flat_wh[:, 1]
        is_extra = ~is_best[slot_of_claim, shape_of_claim]
        order = torch.argsort(area[slot_of_claim], stable=True)
        order = order[torch.argsort(is_extra[order].to(torch.uint8), stable=True)]
        # Stable sort by target keeps the priority order inside each target's run; its first claim wins.
        order = order[torch.argsort(target[order], stable=True)]
        target_sorted = target[order]
        first = torch.ones_like(target_sorted, dtype=torch.bool)
        first[1:] = target_sorted[1:] != target_sorted[:-1]
        # Winning targets are unique, so this plain indexed write has no ordering ambiguity.
        matched[target_sorted[first]] = gt_of_claim[order][first]
        return matched.view(num_images, num_anchors)
