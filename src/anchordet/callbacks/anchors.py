"""Anchor pictures: the anchor shapes, how they cover the data, and what the matcher makes of them.

Shape glossary: B sample images, M GT boxes per image (padded), N placed anchors over the used levels
in ``(level, y, x, a)`` order. Boxes are xyxy network-input pixels.

Everything here is read from the parts, never re-derived: the placed anchors and their grid from
``Detector.anchor_grid`` (the backbone's geometry), the roles from ``Detector.anchor_roles`` (the
matcher's verdict refined by the head's own rules, exactly what the loss trains with), the fitness
numbers from the anchor builder's report (``DetectionModule.anchor_report``). Roles:

- **positive**: label 1, the anchor learns a GT;
- **ignored**: label -1, trained neither as object nor as background (an IoU matcher's band between
  its thresholds, or YOLO's rule for good predictions that were not assigned, which follows the
  predictions as training moves them);
- **negative**: label 0; a uniform random sample (fixed seed) is drawn, all of them would cover the
  image. It is not the RPN's balanced sampler's pick, which changes every step.
"""

from __future__ import annotations

import json

import lightning as L
import torch
from torch import Tensor

from anchordet import plots, viz
from anchordet.anchors.fitness import RECALL_IOU, best_shape_iou, placed_anchor_coverage
from anchordet.callbacks import PictureCallback, level_names_of


def flatten_numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested report as ``{"a/b": value}`` (bools, strings, lists left out)."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def sample_indices(mask: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    """Indices of up to ``limit`` True entries of ``mask [N]``, drawn without replacement."""
    index = mask.nonzero().flatten().cpu()
    if index.numel() > limit:
        index = index[torch.randperm(index.numel(), generator=generator)[:limit]]
    return index


class AnchorPictures(PictureCallback):
    """Anchor shapes, their fit to the training boxes, and matcher roles on a few training images.

    At fit start: ``anchors/shapes``, ``anchors/gt_size_scatter``, ``anchors/best_iou_histogram``
    (pictures, against ``datamodule.train_box_sizes()``); the anchor builder's report as
    ``anchors/report`` (text) and one scalar per number (``anchors/kmeans/mean_best_iou``,
    ``anchors/grid/best_possible_recall``, ...); ``anchors/placed_best_iou`` and, for matchers with
    a foreground threshold (``matcher.foreground_iou``), ``anchors/gt_with_foreground_anchor`` over
    the first ``num_stat_images`` training images (see ``placed_anchor_coverage``). Then, at fit
    start and every ``every_n_epochs`` training epochs: ``anchors/matching`` (GT, positive, ignored
    and sampled negative anchors) and ``anchors/positives_per_image/<level>`` (mean positives per
    image on that level over the statistics images: a level with ~0 is starved).

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

    @property
    def _input_size(self) -> tuple[int, int]:
        return tuple(int(n) for n in self._images.shape[-2:])

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
        writer.add_image("anchors/gt_size_scatter", plots.anchor_shape_scatter(box_wh, shapes, names), step)
        writer.add_image("anchors/best_iou_histogram",
                         plots.best_iou_histogram(best_shape_iou(box_wh, shapes), RECALL_IOU), step)
        self._write_report(writer, step, getattr(pl_module, "anchor_report", None), shapes, names)

        # Placed anchors (shape + grid position) against the statistics images' boxes: what an IoU
        # matcher sees, unlike the centred shape IoU above. They never move, so fit start is enough.
        anchors = detector.anchor_grid(self._input_size)
        coverage = placed_anchor_coverage(anchors.boxes, [t["boxes"] for t in self._stat_targets],
                                          getattr(detector.matcher, "foreground_iou", None))
        for name, value in coverage.items():
            writer.add_scalar(f"anchors/{name}", value, step)

    @staticmethod
    def _write_report(writer, step: int, report: dict | None, shapes: list[Tensor], names: list[str]) -> None:
        """The builder's report: every number once as a scalar, the whole as text with the shapes."""
        if not report:
            return
        for key, value in flatten_numbers(report).items():
            writer.add_scalar(f"anchors/{key}", value, step)
        shapes_text = "\n\n".join(f"- {name}: " + ", ".join(f"({w:.1f}, {h:.1f})" for w, h in s.tolist())
                                   for name, s in zip(names, shapes))
        writer.add_text("anchors/report", "```\n" + json.dumps(report, indent=2) + "\n```\n\n"
                        "anchor shapes (w, h) per level:\n\n" + shapes_text, step)

    def _draw_matching(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer, step = self.writer(trainer), trainer.global_step
        detector = pl_module.detector
        images, targets = self.to_model_input(pl_module, self._images, self._targets)
        anchors, gt, roles = detector.anchor_roles(images, targets)
        generator = torch.Generator().manual_seed(self.seed)
        boxes = anchors.boxes.cpu()
        pictures = []
        for b in range(roles.labels.shape[0]):
            positive, ignored, negative = roles.positive[b].cpu(), roles.ignored[b].cpu(), roles.negative[b].cpu()
            pictures.append(viz.draw_matching(
                self._images[b], gt.boxes[b][gt.mask[b]].cpu(), boxes[positive],
                boxes[sample_indices(ignored, self.max_ignored, generator)],
                boxes[sample_indices(negative, self.num_negatives, generator)]))
        writer.add_image("anchors/matching", viz.tile(pictures, nrow=min(2, len(pictures))), step)

        # Positives per image per level over the statistics images: matcher only, no forward pass.
        _, _, stat_match = detector.match_targets(self._stat_targets, self._input_size)
        per_level = anchors.split_per_level(stat_match.positive, dim=1)  # list of [B, Hl*Wl*A]
        for name, positives in zip(level_names_of(detector), per_level):
            writer.add_scalar(f"anchors/positives_per_image/{name}", positives.sum().item() / len(self._stat_targets), step)
