"""Prediction pictures on fixed validation images, and the per-class results of the last validation.

Runs at ``on_validation_end``, not ``on_validation_epoch_end``: Lightning calls the callbacks' epoch-end
hooks *before* the module's, and the module computes ``last_evaluation`` (COCOeval) in its own
``on_validation_epoch_end``, so only afterwards is this epoch's evaluation there to show.

Tags: ``predictions/images`` (GT and detections above ``score_threshold``; for the RPN,
``module.task == "proposals"``, the ``proposals_top_k`` best proposals, class-agnostic), and for
detection ``predictions/per_class_ap`` (text table) and ``predictions/pr_curves`` (per-class
precision-recall at IoU 0.5, area all, maxDets 100). For proposals ``predictions/proposal_recall``
(text) holds the AR summary instead.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from anchordet import plots, viz
from anchordet.callbacks import PictureCallback
from anchordet.evaluation import format_per_class_table
from anchordet.models.heads.common import PROPOSALS


class PredictionPictures(PictureCallback):
    """Predictions on the first ``num_images`` validation images every ``every_n_epochs`` validations.

    Args:
        every_n_epochs: draw after every N-th validation run (counting runs, not training epochs,
            so ``trainer.check_val_every_n_epoch`` and this multiply).
        num_images: validation images shown (the first ones of ``datamodule.val_dataset``).
        score_threshold: detections below this score are not drawn.
        max_detections: at most this many detections per image (highest scores).
        proposals_top_k: proposals drawn per image when the task is "proposals".
        pr_curves: draw the per-class precision-recall figure.
        max_pr_classes: at most this many classes (in label order) in that figure.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, score_threshold: float = 0.3,
                 max_detections: int = 50, proposals_top_k: int = 20, pr_curves: bool = True,
                 max_pr_classes: int = 80) -> None:
        super().__init__(every_n_epochs, "prediction_pictures")
        self.num_images, self.score_threshold = int(num_images), float(score_threshold)
        self.max_detections, self.proposals_top_k = int(max_detections), int(proposals_top_k)
        self.pr_curves, self.max_pr_classes = bool(pr_curves), int(max_pr_classes)
        self.validation_runs = 0
        self._images: Tensor | None = None
        self._targets: list[dict] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.can_draw(trainer):
            return
        self.validation_runs += 1
        if not self.is_due(self.validation_runs):
            return
        with self.timed(trainer), self.eval_mode(pl_module.detector):
            self._draw_predictions(trainer, pl_module)
            self._write_evaluation(trainer, pl_module)

    def _draw_predictions(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._images is None:
            dataset = self.datamodule(trainer).val_dataset
            self._images, self._targets = self.take_samples(dataset, range(self.num_images))
        images, _ = self.to_model_input(pl_module, self._images, self._targets)
        predictions = pl_module.detector.predict(images)
        proposals = pl_module.task == PROPOSALS
        class_names = None if proposals else list(pl_module.category_map.names)
        pictures = []
        for image, prediction, target in zip(self._images, predictions, self._targets):
            if proposals:
                # Proposals carry objectness scores with no calibrated threshold: show the best k.
                picture = viz.draw_detections(image, target["boxes"], None, prediction["boxes"], prediction["scores"],
                                              None, None, score_threshold=float("-inf"),
                                              max_detections=self.proposals_top_k)
            else:
                picture = viz.draw_detections(image, target["boxes"], target["labels"], prediction["boxes"],
                                              prediction["scores"], prediction["labels"], class_names,
                                              self.score_threshold, self.max_detections)
            pictures.append(picture)
        self.writer(trainer).add_image("predictions/images", viz.tile(pictures, nrow=min(2, len(pictures))),
                                       trainer.global_step)

    def _write_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluation = getattr(pl_module, "last_evaluation", None)
        if evaluation is None:
            return
        writer, step = self.writer(trainer), trainer.global_step
        if pl_module.task == PROPOSALS:
            writer.add_text("predictions/proposal_recall", "```\n" + evaluation.summary + "\n```", step)
            return
        table = getattr(pl_module, "last_per_class_table", None) or format_per_class_table(evaluation.per_class_ap)
        writer.add_text("predictions/per_class_ap", "AP@[.5:.95], area all, maxDets 100\n\n" + table, step)
        if self.pr_curves and evaluation.precision is not None:
            figure = plots.precision_recall_figure(evaluation.precision, list(pl_module.category_map.names),
                                                 max_classes=self.max_pr_classes)
            if figure is not None:
                writer.add_image("predictions/pr_curves", figure, step)
