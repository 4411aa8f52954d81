"""The LightningModule: optimisation, device-side normalisation, logging and COCO validation.

The detector (backbone + anchors + head) knows nothing about training loops; this module knows
nothing about boxes beyond mapping them back to the original image frame for evaluation.

Shape glossary: B images per batch, S network input side, D detections of one image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from anchordet.data.categories import CategoryMap
from anchordet.data.transforms import to_original_frame
from anchordet.evaluation import (
    BACKENDS,
    DEFAULT_BACKEND,
    evaluate_detections,
    evaluate_proposals,
    format_per_class_table,
    to_coco_results,
)
from anchordet.distributed import gather_results
from anchordet.models.heads.common import DETECTIONS, PROPOSALS

# The metric shown in the progress bar, per head task (the name COCOeval's wrapper gives it).
HEADLINE_METRIC = {DETECTIONS: "mAP", PROPOSALS: "AR@1000"}

log = logging.getLogger("anchordet")

# ImageNet statistics: what torchvision's ResNet weights expect, and harmless from scratch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def planned_optimizer_steps(trainer: L.Trainer) -> float:
    """How many optimiser steps the run will take, as `trainer.estimated_stepping_batches` counts
    them, but without building the fit loop's training loader. Lightning's property builds it when
    asked from `configure_optimizers`, which runs before a resumed run's loader position is restored;
    the fit loop then keeps that loader and never restores its position (Lightning issue #20550), so
    a mid-epoch resume would replay the epoch from its first batch. A loader of our own, only asked
    for its length, leaves the fit loop's untouched."""
    datamodule = trainer.datamodule
    if datamodule is None or trainer.max_epochs == -1:
        return trainer.estimated_stepping_batches
    batches = len(datamodule.train_dataloader())  # per process: the sampler shards by rank
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    total = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100,
                  warmup_start_factor: float = 0.001, min_lr_factor: float = 0.05) -> LambdaLR:
    """Linear warm-up (Goyal et al. 2017) then cosine decay to ``min_lr_factor`` (the SGDR shape),
    stepped once per optimiser step. The warm-up keeps the first large-gradient steps of a randomly
    initialised head from wrecking the backbone; it is capped at a third of a short run."""
    warmup = min(int(warmup_steps), max(1, total_steps // 3))
    start, floor = float(warmup_start_factor), float(min_lr_factor)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, lr_factor)


def decay_parameter_groups(model: nn.Module) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases pulls them to 0
    and hurts detectors (the bag-of-tricks result, He et al. 2019), so they get none. The first
    group takes the optimizer's own ``weight_decay``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class DetectionModule(L.LightningModule):
    """Trains a `Detector`; validates with COCOeval on the val annotation file.

    What is evaluated follows the head's ``task``: "detections" (mAP, needs class labels) or
    "proposals" (class-agnostic AR, for the RPN).

    Args:
        detector: the `Detector`.
        category_map: COCO ids <-> labels of the training data (saved in checkpoints).
        val_annotation_file: the JSON COCOeval scores validation against (None: no evaluation).
        optimizer: ``optimizer(param_groups) -> torch.optim.Optimizer``, e.g. the Hydra partial
            ``torch.optim.SGD`` of ``conf/optim``; None for a module that is only evaluated.
        scheduler: ``scheduler(optimizer, total_steps=...) -> LRScheduler``, stepped every
            optimiser step (default: `warmup_cosine` with its defaults).
        channels_last: store the detector and the batches channels-last (faster convolutions).
        run_config: the composed config as a plain dict; saved in checkpoints so `evaluate.py` can
            rebuild the model without the user retyping overrides.
        anchor_report: the anchor builder's report (fitness against the training boxes), which the
            anchor picture callback writes to TensorBoard; None after a resume.
        eval_backend: "faster_coco_eval" (default) or "pycocotools" (see `anchordet.evaluation`).
        compile: None, or keyword arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``):
            the backbone and the head are compiled in place (``nn.Module.compile``, so checkpoint
            keys do not change) when Lightning sets the model up; matching and postprocessing stay
            eager, their shapes change with every batch.
    """

    def __init__(
        self,
        detector: nn.Module,
        category_map: CategoryMap,
        val_annotation_file: str | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        channels_last: bool = True,
        run_config: dict | None = None,
        anchor_report: dict | None = None,
        eval_backend: str = DEFAULT_BACKEND,
        compile: dict | None = None,
    ) -> None:
        super().__init__()
        self.compile_options = None if compile is None else dict(compile)
        if eval_backend not in BACKENDS:
            raise ValueError(f"evaluation.backend={eval_backend!r}: use one of {BACKENDS}")
        self.eval_backend = eval_backend
        self.detector = detector
        self.category_map = category_map
        self.val_annotation_file = val_annotation_file
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler or warmup_cosine
        self.use_channels_last = channels_last
        self.run_config = run_config or {}
        self.anchor_report = anchor_report
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self._val_results: list[dict] = []
        self._val_image_ids: list[int] = []
        self.last_losses: dict[str, torch.Tensor] = {}
        if channels_last:
            self.detector.to(memory_format=torch.channels_last)

    def configure_model(self) -> None:
        if self.compile_options is not None and not getattr(self, "_compiled", False):
            self.detector.backbone.compile(**self.compile_options)
            self.detector.head.compile(**self.compile_options)
            self._compiled = True

    @property
    def task(self) -> str:
        """What the head produces: "detections" or "proposals" (the head says, see heads/common.py)."""
        return self.detector.head.task

    # ---------------------------------------------------------------- data on the device
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        """uint8 -> normalised float on the device: workers ship 4x fewer bytes, the GPU does the maths."""
        images, targets = batch
        images = (images.float() - self.pixel_mean) / self.pixel_std
        if self.use_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    # ---------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        losses = self.detector.loss(images, targets)
        # For the non-finite guard (anchordet.guard), which looks at them before the optimiser step.
        self.last_losses = {k: v.detach() for k, v in losses.items()}
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()},
                      prog_bar=False, on_step=True, on_epoch=True, batch_size=images.shape[0])
        self.log("train/loss_total", losses["loss"].detach(), prog_bar=True, batch_size=images.shape[0])
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_results, self._val_image_ids = [], []

    def validation_step(self, batch, batch_idx: int):
        images, targets = batch
        predictions = self.detector.predict(images)
        # Proposals are class-agnostic (label 0); they are written under the first category id
        # because COCOeval only looks detections up under the annotation file's ids.
        category_ids = self.category_map.category_ids if self.task == DETECTIONS else self.category_map.category_ids[:1]
        for prediction, target in zip(predictions, targets):
            boxes = to_original_frame(prediction["boxes"], target)
            self._val_results.extend(to_coco_results(
                boxes, prediction["scores"], prediction["labels"], target["image_id"], category_ids))
            self._val_image_ids.append(int(target["image_id"]))
        return predictions

    def on_validation_epoch_end(self) -> None:
        if self.val_annotation_file is None or self.trainer.sanity_checking:
            return
        results, image_ids = gather_results(self._val_results, self._val_image_ids)
        self.last_results, self.last_image_ids = results, image_ids
        metrics = self.compute_metrics(results, image_ids)
        # Every rank computed the same numbers from the same gathered list: no sync needed.
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False, sync_dist=False)
        self.log("val_headline", metrics[HEADLINE_METRIC[self.task]], prog_bar=True, logger=False)

    def compute_metrics(self, results: list[dict], image_ids: list[int]) -> dict[str, float]:
        if self.task == PROPOSALS:
            evaluation = evaluate_proposals(self.val_annotation_file, results, image_ids, backend=self.eval_backend)
        else:
            evaluation = evaluate_detections(self.val_annotation_file, results, image_ids, backend=self.eval_backend)
            self.last_per_class_table = format_per_class_table(evaluation.per_class_ap)
        self.last_evaluation = evaluation
        return evaluation.metrics

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict]:
        return decay_parameter_groups(self)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("DetectionModule was built without an optimizer; pass optimizer=... "
                             "(train.py takes it from the optim config group)")
        optimizer = self.optimizer_factory(self.parameter_groups())
        total_steps = max(1, int(planned_optimizer_steps(self.trainer)))
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What `evaluate.py` needs to rebuild the model: the config, class mapping and anchors
        (the anchors are also buffers in the state dict; this copy lets the builder size the head)."""
        checkpoint["anchordet"] = {
            "run_config": self.run_config,
            "category_map": self.category_map.to_dict(),
            "anchor_shapes_per_level": [s.cpu().tolist() for s in self.detector.anchor_shapes_per_level],
            "anchor_offset": self.detector.anchor_offset,
        }
