"""Matchers: which ground-truth box each placed anchor learns from, behind one contract.

Shape glossary: B images, M ground-truth slots per image (padded), K anchor shapes over all levels,
N = sum_l Hl * Wl * Al placed anchors in ``(level, y, x, a)`` order (the order of
:class:`anchordet.anchors.AnchorGrid`). Boxes are xyxy in network-input pixels.

The contract every matcher meets (``docs/architecture.md`` has a worked example)::

    matcher(anchors: AnchorGrid, gt_boxes [B, M, 4], gt_mask [B, M]) -> MatchResult
    MatchResult.matched_gt [B, N] int64: the GT slot 0..M-1 of a foreground anchor, -1 otherwise
    MatchResult.labels     [B, N] int64: 1 foreground, 0 background, -1 ignored (neither)

``matched_gt >= 0`` exactly where ``labels == 1``. A matcher may also expose ``foreground_iou``
(float or None): the IoU at which it calls an anchor foreground, for coverage statistics.

- :func:`pad_targets`: list of per-image targets -> :class:`PaddedTargets` ``[B, M, ...]``.
- :class:`YoloMatcher`: YOLOv2/v3 assignment by best *shape* IoU, one cell per GT; no ignored anchors.
- :func:`match_iou_matrix` / :class:`IoUMatcher`: IoU thresholds (Faster R-CNN RPN, RetinaNet).
- :class:`BalancedSampler`: a fixed number of anchors per image, at most a fraction positive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from torchvision.ops import box_iou

from anchordet.anchors.placement import AnchorGrid
from anchordet.boxes import box_wh, shape_iou

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1
UNMATCHED = -1


class PaddedTargets(NamedTuple):
    """A batch of ground truth padded to M slots: ``boxes [B, M, 4]`` float32 xyxy input px,
    ``labels [B, M]`` int64, ``mask [B, M]`` bool (True = a real box, False = padding)."""

    boxes: Tensor
    labels: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> PaddedTargets:
        return PaddedTargets(*(t.to(device) for t in self))


class MatchResult(NamedTuple):
    """What a matcher decides per anchor: ``matched_gt [B, N]`` (GT slot or -1) and ``labels [B, N]``
    (1 foreground, 0 background, -1 ignored). Heads refine the labels with their own rules
    (``head.anchor_roles``) and return another ``MatchResult``."""

    matched_gt: Tensor
    labels: Tensor

    @property
    def positive(self) -> Tensor:
        return self.labels == FOREGROUND

    @property
    def negative(self) -> Tensor:
        return self.labels == BACKGROUND

    @property
    def ignored(self) -> Tensor:
        return self.labels == IGNORE


def labels_from_matched(matched_gt: Tensor) -> Tensor:
    """Foreground where an anchor has a GT, background elsewhere (matchers without an ignore band)."""
    return torch.where(matched_gt >= 0, FOREGROUND, BACKGROUND)


def pad_targets(targets: Sequence[dict]) -> PaddedTargets:
    """Pad per-image ``{"boxes": [n_i, 4] xyxy, "labels": [n_i]}`` to a batch.

    Returns :class:`PaddedTargets` ``(boxes [B, M, 4] float32 xyxy, labels [B, M] int64, mask [B, M]
    bool)`` with ``M = max(1, max_i n_i)``; padding is zeros.  Everything lives on the
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
    return PaddedTargets(gt_boxes, gt_labels, gt_mask)


class YoloMatcher:
    """Best-shape-IoU assignment (YOLOv2, Redmon & Farhadi 2017; multi-level as in YOLOv3).

    Each GT picks the anchor shape, over *all* levels, whose shape-IoU (boxes centred together) with
    the GT is largest, and is assigned to that shape at the grid cell containing the GT centre on
    that shape's level.  With ``multi_anchor_iou = t`` every other shape with shape-IoU > t also
    gets the GT at its own level's cell (the "multiple anchors per GT" refinement of later YOLOs),
    which gives more positives per object. Every other anchor is background: this matcher has no
    ignore band (the YOLO head adds its own, prediction-based one).
    """

    foreground_iou = None  # no IoU threshold between placed anchors and boxes

    def __init__(self, multi_anchor_iou: float | None = None) -> None:
        if multi_anchor_iou is not None and not 0.0 <= float(multi_anchor_iou) < 1.0:
            raise ValueError(f"matcher.multi_anchor_iou must be in [0, 1) or null, got {multi_anchor_iou}")
        self.multi_anchor_iou = None if multi_anchor_iou is None else float(multi_anchor_iou)

    @torch.no_grad()
    def __call__(self, anchors: AnchorGrid, gt_boxes: Tensor, gt_mask: Tensor) -> MatchResult:
        device = gt_boxes.device
        num_images, num_slots = gt_mask.shape
        num_anchors = anchors.num_anchors
        if anchors.shape_wh.shape[0] == 0:
            raise ValueError("YoloMatcher got no anchor shapes on any level")
        matched = torch.full((num_images * num_anchors,), UNMATCHED, dtype=torch.long, device=device)
        if num_images * num_slots == 0:
            matched = matched.view(num_images, num_anchors)
            return MatchResult(matched, labels_from_matched(matched))

        # (B, M, 4) -> (B*M, 4): every GT slot of the batch handled at once.
        flat_boxes = gt_boxes.reshape(-1, 4).float()
        flat_wh = box_wh(flat_boxes)
        iou = shape_iou(flat_wh, anchors.shape_wh)  # (B*M, K)
        best_shape = iou.argmax(dim=1)  # ties -> first shape in level order (finer level first)
        is_best = torch.zeros_like(iou, dtype=torch.bool)
        is_best[torch.arange(iou.shape[0], device=device), best_shape] = True
        claims = is_best | (iou > self.multi_anchor_iou) if self.multi_anchor_iou is not None else is_best
        claims = claims & gt_mask.reshape(-1, 1)  # not in place: claims may alias is_best

        # Cell containing the GT centre on every shape's level, (B*M, K); a centre on the far border
        # (x == W * stride) or outside the image is clamped into the grid rather than dropped.
        centre = 0.5 * (flat_boxes[:, 0:2] + flat_boxes[:, 2:4])
        shape_stride = anchors.shape_stride[:, 0]  # [K]
        width, height = anchors.shape_grid_wh[:, 0], anchors.shape_grid_wh[:, 1]  # [K] each
        column = torch.minimum(torch.floor(centre[:, 0:1] / shape_stride).long().clamp(min=0), width - 1)
        row = torch.minimum(torch.floor(centre[:, 1:2] / shape_stride).long().clamp(min=0), height - 1)
        image_of_slot = torch.arange(num_images, device=device).repeat_interleave(num_slots)[:, None]
        flat_index = (
            image_of_slot * num_anchors
            + anchors.shape_first_anchor
            + (row * width + column) * anchors.shape_per_cell
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
        matched = matched.view(num_images, num_anchors)
        return MatchResult(matched, labels_from_matched(matched))


# ---------------------------------------------------------------------------------------------------
# IoU-threshold matching and balanced sampling (Faster R-CNN RPN: Ren et al., "Faster R-CNN", 2015)
# ---------------------------------------------------------------------------------------------------

# IoU values computed at once: [B, n, M] blocks of at most this many floats (64 MB in fp32). A
# crowd dataset at 640 px (500 objects per image, 102k RPN anchors, batch 16) would otherwise build
# a 3.3 GB matrix, and torchvision's box_iou holds about ten times its result in intermediates
# (corners and sizes [B, n, M, 2], the masks): measured, one matrix of 500 objects ran out of 24 GB,
# and 2^26-element blocks still peaked at 2.6 GB (scripts/bench_match_memory.py, docs/benchmarks.md).
MAX_IOU_ELEMENTS = 1 << 24

IouBlocks = Callable[[], Iterator[tuple[slice, Tensor]]]


def _masked(iou: Tensor, gt_mask: Tensor) -> Tensor:
    # NaN (0/0 of two empty boxes) and padding both become -1: below any threshold, never a best GT.
    return iou.float().nan_to_num(0.0).masked_fill(~gt_mask[:, None, :], -1.0)


def _match_blocks(blocks: IouBlocks, shape: tuple[int, int, int], device, fg_iou: float, bg_iou: float,
                  allow_low_quality: bool) -> MatchResult:
    """The thresholds of `match_iou_matrix` over IoU blocks ``[B, n, M]`` that cover the N anchors.

    One pass gives every anchor its best GT and every GT its best IoU; the low-quality rule needs a
    second pass (an anchor is promoted when it holds its GT's best IoU, known only after the first).
    """
    num_images, num_anchors, num_slots = shape
    best_iou = torch.full((num_images, num_anchors), -1.0, device=device)
    best_gt = torch.zeros((num_images, num_anchors), dtype=torch.long, device=device)
    best_per_gt = torch.full((num_images, 1, max(num_slots, 1)), -1.0, device=device)
    if num_slots:
        for rows, iou in blocks():
            best_iou[:, rows], best_gt[:, rows] = iou.max(dim=2)  # max returns the first maximal index on ties
            best_per_gt = torch.maximum(best_per_gt, iou.amax(dim=1, keepdim=True))
    labels = torch.where(best_iou >= fg_iou, FOREGROUND, torch.where(best_iou >= bg_iou, IGNORE, BACKGROUND))
    if num_slots and allow_low_quality:
        for rows, iou in blocks():
            # [B, n, M] -> [B, n]: an anchor holding some real GT's highest IoU (> 0), ties included.
            is_gt_best = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=2)
            labels[:, rows] = torch.where(is_gt_best, FOREGROUND, labels[:, rows])
    return MatchResult(torch.where(labels == FOREGROUND, best_gt, UNMATCHED), labels)


def match_iou_matrix(
    iou: Tensor,
    gt_mask: Tensor | None = None,
    fg_iou: float = 0.7,
    bg_iou: float = 0.3,
    allow_low_quality: bool = True,
) -> MatchResult:
    """Threshold an anchor x GT IoU matrix: ``iou [B, N, M]`` or ``[N, M]``, ``gt_mask [B, M]`` / ``[M]``.

    Every anchor takes its highest-IoU GT (ties: the lower slot). It is foreground when that IoU is
    ``>= fg_iou``, background when ``< bg_iou`` and ignored in between (Faster R-CNN, section 3.1.2).
    With ``allow_low_quality`` every GT also makes the anchors of its own highest IoU foreground,
    even below ``fg_iou`` and all of them on a tie, so no GT is left without a positive; such an
    anchor learns its highest-IoU GT, which is not always the GT that promoted it (torchvision and
    Detectron2 do the same). Unlike those, a GT that overlaps no anchor at all (best IoU 0) promotes
    nothing: otherwise every anchor would tie at 0 and turn positive.

    Padding slots (``gt_mask`` False) never match: their IoU is replaced by -1 before anything else.

    Returns a :class:`MatchResult` of the input's batch shape (``[B, N]`` or ``[N]``).
    """
    if not 0.0 <= bg_iou <= fg_iou <= 1.0:
        raise ValueError(f"matcher needs 0 <= bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
    unbatched = iou.ndim == 2
    if unbatched:
        iou = iou[None]
        gt_mask = None if gt_mask is None else gt_mask[None]
    if iou.ndim != 3:
        raise ValueError(f"iou must be [B, N, M] or [N, M], got {tuple(iou.shape)}")
    if gt_mask is None:
        gt_mask = torch.ones((iou.shape[0], iou.shape[2]), dtype=torch.bool, device=iou.device)
    masked = _masked(iou, gt_mask) if iou.shape[2] else iou
    match = _match_blocks(lambda: iter([(slice(None), masked)]), tuple(iou.shape), iou.device,
                          fg_iou, bg_iou, allow_low_quality)
    return MatchResult(match.matched_gt[0], match.labels[0]) if unbatched else match


def iou_blocks(anchor_boxes: Tensor, gt_boxes: Tensor, gt_mask: Tensor, max_elements: int | None = None) -> IouBlocks:
    """A re-iterable source of masked IoU blocks ``(rows, [B, n, M])`` of ``anchor_boxes [N, 4]`` (or
    per-image boxes ``[B, N, 4]``) against ``gt_boxes [B, M, 4]``, each at most ``max_elements``
    (default `MAX_IOU_ELEMENTS`, read at call time)."""
    max_elements = MAX_IOU_ELEMENTS if max_elements is None else max_elements
    num_images, num_slots = gt_mask.shape
    num_anchors = anchor_boxes.shape[-2]
    rows_per_block = max(1, max_elements // max(1, num_images * num_slots))
    batched = anchor_boxes.ndim == 3

    def blocks() -> Iterator[tuple[slice, Tensor]]:
        for start in range(0, num_anchors, rows_per_block):
            rows = slice(start, min(start + rows_per_block, num_anchors))
            # (n, 4) -> (1, n, 4): box_iou broadcasts the leading dim, one [B, n, M] block for the batch.
            block = anchor_boxes[:, rows] if batched else anchor_boxes[rows][None]
            yield rows, _masked(box_iou(block.float(), gt_boxes.float()), gt_mask)

    return blocks


def best_iou_with_gt(boxes: Tensor, gt_boxes: Tensor, gt_mask: Tensor, max_elements: int | None = None) -> Tensor:
    """Each box's best IoU with a real GT box of its image: ``boxes [B, N, 4]`` -> ``[B, N]`` (-1
    without any), computed in blocks like the matcher's (YOLO's ignore rule on decoded boxes)."""
    best = torch.full(boxes.shape[:2], -1.0, device=boxes.device)
    if gt_mask.shape[1]:
        for rows, iou in iou_blocks(boxes, gt_boxes, gt_mask, max_elements)():
            best[:, rows] = iou.amax(dim=2)
    return best


class IoUMatcher:
    """IoU between every placed anchor and every GT box, thresholded by :func:`match_iou_matrix`.

    Args:
        fg_iou, bg_iou: foreground ``>= fg_iou``, background ``< bg_iou``, ignored in between
            (0.7 / 0.3 for the Faster R-CNN RPN, 0.5 / 0.4 for RetinaNet).
        allow_low_quality: each GT also keeps its highest-IoU anchors (see ``match_iou_matrix``).
        ignore_cross_boundary: anchors not fully inside the network input (``anchors.input_size``)
            are ignored, as the Faster R-CNN paper trains. Off by default, as in torchvision and
            Detectron2, which train on every anchor.
    """

    def __init__(
        self,
        fg_iou: float = 0.7,
        bg_iou: float = 0.3,
        allow_low_quality: bool = True,
        ignore_cross_boundary: bool = False,
    ) -> None:
        if not 0.0 <= float(bg_iou) <= float(fg_iou) <= 1.0:
            raise ValueError(
                f"matcher.bg_iou={bg_iou} and matcher.fg_iou={fg_iou}: need 0 <= bg_iou <= fg_iou <= 1"
            )
        self.fg_iou, self.bg_iou = float(fg_iou), float(bg_iou)
        self.allow_low_quality = bool(allow_low_quality)
        self.ignore_cross_boundary = bool(ignore_cross_boundary)

    @property
    def foreground_iou(self) -> float:
        return self.fg_iou

    @torch.no_grad()
    def __call__(self, anchors: AnchorGrid, gt_boxes: Tensor, gt_mask: Tensor) -> MatchResult:
        if gt_boxes.ndim != 3 or gt_mask.shape != gt_boxes.shape[:2]:
            raise ValueError(
                f"IoUMatcher: gt_boxes must be [B, M, 4] with gt_mask [B, M], got "
                f"{tuple(gt_boxes.shape)} and {tuple(gt_mask.shape)}"
            )
        anchor_boxes = anchors.boxes
        shape = (gt_boxes.shape[0], anchor_boxes.shape[0], gt_boxes.shape[1])
        match = _match_blocks(iou_blocks(anchor_boxes, gt_boxes, gt_mask), shape, anchor_boxes.device,
                              self.fg_iou, self.bg_iou, self.allow_low_quality)
        if not self.ignore_cross_boundary:
            return match
        height, width = anchors.input_size
        inside = (
            (anchor_boxes[:, 0] >= 0)
            & (anchor_boxes[:, 1] >= 0)
            & (anchor_boxes[:, 2] <= width)
            & (anchor_boxes[:, 3] <= height)
        )  # [N], broadcast over the batch below
        return MatchResult(torch.where(inside, match.matched_gt, UNMATCHED),
                           torch.where(inside, match.labels, IGNORE))


class BalancedSampler:
    """Pick ``batch_size_per_image`` anchors per image, at most ``positive_fraction`` of them positive.

    Faster R-CNN trains the RPN on 256 anchors per image with up to half positives; when an image
    has fewer positives, negatives fill the rest (and when it has fewer anchors, all are taken).

    ``__call__(labels [B, N], generator=None) -> (sampled_positive [B, N], sampled_negative [B, N])``
    bool, with labels 1 / 0 / -1 as from :func:`match_iou_matrix`; ignored anchors are never drawn.
    Vectorised over the batch: every anchor gets one uniform random score, and ``topk`` over the
    scores of the candidates gives a random subset per image without a Python loop. ``generator``
    (on the labels' device) makes the draw reproducible; None uses torch's global generator.
    """

    def __init__(self, batch_size_per_image: int = 256, positive_fraction: float = 0.5) -> None:
        if int(batch_size_per_image) < 1:
            raise ValueError(f"head.batch_size_per_image must be >= 1, got {batch_size_per_image}")
        if not 0.0 <= float(positive_fraction) <= 1.0:
            raise ValueError(f"head.positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    @property
    def max_positives(self) -> int:
        return int(self.batch_size_per_image * self.positive_fraction)

    def __call__(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if labels.ndim != 2:
            raise ValueError(f"BalancedSampler: labels must be [B, N], got {tuple(labels.shape)}")
        positive, negative = labels == FOREGROUND, labels == BACKGROUND
        num_positive = positive.sum(dim=1).clamp(max=self.max_positives)  # [B]
        num_negative = torch.minimum(negative.sum(dim=1), self.batch_size_per_image - num_positive)  # [B]
        scores = torch.rand(labels.shape, generator=generator, device=labels.device)
        return (
            self._pick(scores, positive, num_positive, self.max_positives),
            self._pick(scores, negative, num_negative, self.batch_size_per_image),
        )

    @staticmethod
    def _pick(scores: Tensor, candidates: Tensor, counts: Tensor, limit: int) -> Tensor:
        """The ``counts[b]`` candidates of image b with the highest random scores, as a [B, N] mask."""
        limit = min(limit, scores.shape[1])
        # Non-candidates score -1 < any uniform draw, so the top `counts[b] <= #candidates` entries
        # of each row are candidates, in random order.
        top = scores.masked_fill(~candidates, -1.0).topk(limit, dim=1).indices  # [B, limit]
        take = torch.arange(limit, device=scores.device)[None, :] < counts[:, None]  # [B, limit]
        return torch.zeros_like(candidates).scatter_(1, top, take)
