"""Anchor pictures: the anchor shapes, how they cover the data, and what the matcher makes of them.

Shape glossary: B sample images, M GT boxes per image (padded), N placed anchors over the used levels
in ``(level, y, x, a)`` order, K anchor shapes over all levels. Boxes are xyxy network-input pixels.

Anchor roles in the matching picture:

- **positive**: ``matched_gt >= 0`` (the matcher gave the anchor a GT);
- **ignored**: neither trained as object nor as background. For a head with a YOLO ignore rule
  (``head.ignore_iou`` and ``head.box_coder``: an unmatched anchor whose *decoded prediction*
  overlaps a GT by more than ``ignore_iou`` gets no objectness loss) the rule is applied exactly
  as the loss applies it, so the ignored set changes as training moves the predictions. Matchers
  following torchvision's convention (``IoUMatcher``: ``matched_gt == -2`` between the IoU
  thresholds) have their own ignored anchors; those count too. Otherwise nothing is ignored;
- **negative**: everything else; a uniform random sample (fixed seed) is drawn, all of them would
  cover the image. It is not the RPN's balanced sampler's pick, which changes every step.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torchvision.ops import box_iou

from anchordet import plots, viz
from anchordet.anchors.kmeans import fitness_report, shape_iou
from anchordet.callbacks import PictureCallback, level_names_of
from anchordet.matching import BETWEEN_THRESHOLDS, pad_targets


def grid_sizes_for(image_height: int, image_width: int, strides: list[int]) -> list[tuple[int, int]]:
    """Feature-map size of every level: a stride-2 conv with padding rounds up, so ceil(S / stride)."""
    return [(math.ceil(image_height / s), math.ceil(image_width / s)) for s in strides]


def match_anchors(detector, images: Tensor | None, targets: list[dict], image_size: tuple[int, int]):
    """Run the detector's matcher (and, when ``images`` is given, its head's ignore rule).

    Returns ``(anchors: AnchorGrid, matched_gt [B, N] int64, ignored [B, N] bool, gt_boxes [B, M, 4],
    gt_mask [B, M])``. ``images`` float [B, 3, S, S] normalised, needed only for the prediction-based
    ignore rule; without it ``ignored`` holds only the matcher's own between-thresholds anchors.
    """
    device = detector.anchor_shapes_per_level[0].device
    gt_boxes, _, gt_mask = pad_targets(targets)
    gt_boxes, gt_mask = gt_boxes.to(device), gt_mask.to(device)
    anchors = detector.anchor_grid(grid_sizes_for(*image_size, detector.used_strides), device)
    # The head knows how to call its own matcher (YOLO: shapes on the grid; RPN: placed boxes).
    matched = detector.head.match(anchors, gt_boxes, gt_mask, detector.matcher)  # [B, N]
    ignored = matched == BETWEEN_THRESHOLDS
    head = detector.head
    if images is not None and hasattr(head, "ignore_iou") and hasattr(head, "box_coder"):
        # list of [B, Hl*Wl*A, K] -> [B, N, K], the same concatenation the head's loss does.
        raw = torch.cat(list(detector(images)), dim=1).float()
        if raw.shape[1] != anchors.num_anchors:
            raise ValueError(f"AnchorPictures: the head predicts {raw.shape[1]} anchors but the anchor grid "
                             f"for input {image_size} has {anchors.num_anchors}; grid sizes {anchors.grid_sizes}")
        pred_boxes = head.box_coder.decode(raw[..., :4], anchors.cell_xy, anchors.anchor_wh, anchors.stride)
        best_iou = box_iou(pred_boxes, gt_boxes).masked_fill(~gt_mask[:, None, :], 0.0).amax(dim=2)  # [B, N]
        ignored = ignored | ((best_iou > head.ignore_iou) & (matched < 0))
    return anchors, matched, ignored, gt_boxes, gt_mask


def placed_anchor_coverage(anchor_boxes: Tensor, targets: list[dict],
                           foreground_iou: float | None) -> dict[str, float]:
    """How well the *placed* anchors (shape and grid position) can reach the GT boxes.

    ``anchor_boxes [N, 4]`` are the anchors of one input size, ``targets`` carry ``boxes [M, 4]``
    in the same frame. Returns ``placed_best_iou``, the mean over GT boxes of their best IoU with any
    anchor, and, when the matcher has a foreground threshold, ``gt_with_foreground_anchor``: the
    share of GT boxes with at least one anchor at or above it. The shape-only fitness
    (``mean_best_iou``) centres every anchor on its box and so ignores the stride; an IoU matcher
    does not. A GT box without a foreground anchor is trained only through its low-quality matches,
    which is what starves an RPN whose anchors do not fit the data (docs/rpn.md).
    """
    best = [box_iou(t["boxes"].to(anchor_boxes).reshape(-1, 4), anchor_boxes).amax(dim=1)
            for t in targets if t["boxes"].numel()]
    best_iou = torch.cat(best) if best else anchor_boxes.new_zeros(0)
    if best_iou.numel() == 0:
        return {}
    report = {"placed_best_iou": best_iou.mean().item()}
    if foreground_iou is not None:
        report["gt_with_foreground_anchor"] = (best_iou >= foreground_iou).float().mean().item()
    return report


def sample_indices(mask: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    """Indices of up to ``limit`` True entries of ``mask [N]``, drawn without replacement."""
    index = mask.nonzero().flatten().cpu()
    if index.numel() > limit:
        index = index[torch.randperm(index.numel(), generator=generator)[:limit]]
    return index


class AnchorPictures(PictureCallback):
    """Anchor shapes, their fit to the training boxes, and matcher roles on a few training images.

    At fit start: ``anchors/shapes``, ``anchors/gt_size_scatter``, ``anchors/best_iou_histogram``
    (pictures), ``anchors/mean_best_iou`` and ``anchors/best_possible_recall`` (scalars, against
    ``datamodule.train_box_sizes()``), plus what is repeated every ``every_n_epochs`` training
    epochs: ``anchors/matching`` (GT, positive, ignored and sampled negative anchors) and
    ``anchors/positives_per_image/<level>`` (mean positives per image on that level over the first
    ``num_stat_images`` training images: a level with ~0 is starved). At fit start, over the same
    images: ``anchors/placed_best_iou`` and, for matchers with a foreground threshold (``fg_iou``),
    ``anchors/gt_with_foreground_anchor`` (see ``placed_anchor_coverage``).

    Args:
        every_n_epochs: repeat the matching picture and positives scalars after every N epochs
            (the YOLO ignored set follows the predictions); 0 = at fit start only.
        num_images: training images in the matching picture.
        num_stat_images: training images the positives per level are averaged over.
        num_negatives: negatives drawn per image; max_ignored: ignored anchors drawn per image.
        seed: for the negative sample.
    """

    def __init__(self, every_n_epochs: int = 5, num_images: int = 4, num_stat_images: int = 64,
                 num_negatives: int = 12, max_ignored: int = 50, seed: int = 0) -> None:
        super().__init__(every_n_epochs, "anchor_pictures")
        self.num_images, self.num_stat_images = int(num_images), int(num_stat_images)
        self.num_negatives, self.max_ignored, self.seed = int(num_negatives), int(max_ignored), int(seed)
        self._images: Tensor | None = None
        self._targets: list[dict] | None = None
        self._stat_targets: list[dict] | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.can_draw(trainer):
            return
        with self.timed(trainer), self.eval_mode(pl_module.detector):
            self._load_samples(trainer)
            self._draw_shapes_and_fitness(trainer, pl_module)
            self._draw_matching(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.can_draw(trainer) or not self.is_due(trainer.current_epoch + 1):
            return
        with self.timed(trainer), self.eval_mode(pl_module.detector):
            self._load_samples(trainer)
            self._draw_matching(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def _load_samples(self, trainer: L.Trainer) -> None:
        if self._images is not None:
            return
        dataset = self.datamodule(trainer).train_dataset
        count = max(self.num_images, self.num_stat_images)
        images, targets = self.take_samples(dataset, range(count))
        # clone: a slice would keep all the statistics images' pixels alive.
        self._images, self._targets = images[: self.num_images].clone(), targets[: self.num_images]
        # Only the boxes of the statistics images are kept; their pixels are not needed again.
        self._stat_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets[: self.num_stat_images]]

    def _draw_shapes_and_fitness(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer, step = self.writer(trainer), trainer.global_step
        detector = pl_module.detector
        shapes = [detector.anchor_shapes_per_level[i].detach().float().cpu() for i in detector.used_level_indices]
        names = level_names_of(detector)
        writer.add_image("anchors/shapes", viz.draw_anchor_shapes(self._images[0], shapes, names, detector.used_strides), step)

        datamodule = self.datamodule(trainer)
        if hasattr(datamodule, "train_box_sizes"):
            box_wh = datamodule.train_box_sizes().float()
        else:  # a datamodule of another kind: the statistics images' boxes stand in for the data
            boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in self._stat_targets]).float()
            box_wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
        report = fitness_report(box_wh, shapes)
        writer.add_scalar("anchors/mean_best_iou", report["mean_best_iou"], step)
        writer.add_scalar("anchors/best_possible_recall", report["best_possible_recall"], step)
        writer.add_image("anchors/gt_size_scatter", plots.anchor_shape_scatter(box_wh, shapes, names), step)
        best_iou = shape_iou(box_wh, torch.cat(shapes)).amax(dim=1) if box_wh.shape[0] else box_wh.new_zeros(0)
        writer.add_image("anchors/best_iou_histogram", plots.best_iou_histogram(best_iou), step)

        # Placed anchors (shape + grid position) against the statistics images' boxes: what an IoU
        # matcher sees, unlike the centred shape IoU above. They never move, so fit start is enough.
        image_size = tuple(self._images.shape[-2:])
        device = detector.anchor_shapes_per_level[0].device
        anchors = detector.anchor_grid(grid_sizes_for(*image_size, detector.used_strides), device)
        coverage = placed_anchor_coverage(anchors.boxes, self._stat_targets, getattr(detector.matcher, "fg_iou", None))
        for name, value in coverage.items():
            writer.add_scalar(f"anchors/{name}", value, step)

    def _draw_matching(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer, step = self.writer(trainer), trainer.global_step
        detector = pl_module.detector
        image_size = tuple(self._images.shape[-2:])
        images, targets = self.to_model_input(pl_module, self._images, self._targets)
        anchors, matched, ignored, gt_boxes, gt_mask = match_anchors(detector, images, targets, image_size)
        generator = torch.Generator().manual_seed(self.seed)
        boxes = anchors.boxes.cpu()
        pictures = []
        for b in range(matched.shape[0]):
            positive = (matched[b] >= 0).cpu()
            ignored_b = ignored[b].cpu()
            negative = ~positive & ~ignored_b
            pictures.append(viz.draw_matching(
                self._images[b], gt_boxes[b][gt_mask[b]].cpu(), boxes[positive],
                boxes[sample_indices(ignored_b, self.max_ignored, generator)],
                boxes[sample_indices(negative, self.num_negatives, generator)]))
        writer.add_image("anchors/matching", viz.tile(pictures, nrow=min(2, len(pictures))), step)

        # Positives per image per level over the statistics images: matcher only, no forward pass.
        _, stat_matched, _, _, _ = match_anchors(detector, None, self._stat_targets, image_size)
        per_level = anchors.split_per_level(stat_matched >= 0, dim=1)  # list of [B, Hl*Wl*A]
        for name, positives in zip(level_names_of(detector), per_level):
            writer.add_scalar(f"anchors/positives_per_image/{name}", positives.sum().item() / len(self._stat_targets), step)
