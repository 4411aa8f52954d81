"""TensorBoard picture callbacks: anchors, feature maps and predictions.

Every callback here follows the same safety rules, enforced by :class:`PictureCallback`:

- only global rank 0 draws, and no callback makes a collective call (no ``all_gather``, no
  ``self.log(sync_dist=...)``, the DDP wrapper is bypassed by calling ``pl_module.detector``
  directly), so other ranks never wait on rank 0's drawing;
- pictures come from a fixed, small set of images taken once from the *datasets* (never from the
  training loader's iterator, whose order and worker state they would disturb), moved to the module's
  device and normalised by ``pl_module.on_after_batch_transfer``, exactly like training batches;
- the work runs under ``torch.no_grad()`` with the model in eval mode, and the previous train/eval
  mode is restored afterwards;
- the seconds spent are logged as ``timing/<name>_s`` and summed in ``total_seconds``.

Each callback is one entry of ``conf/callbacks/default.yaml``: remove it with
``callbacks.<entry>=null`` or change its period with ``callbacks.<entry>.every_n_epochs=N``.
Without a TensorBoard logger the callbacks do nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

log = logging.getLogger("anchordet.callbacks")


class PictureCallback(L.Callback):
    """Shared plumbing of the picture callbacks: where to draw, when, on which images, at what cost.

    Args:
        every_n_epochs: draw every this many epochs (the subclass says which epochs it counts);
            0 or less disables the periodic pictures.
        name: the ``<name>`` of the ``timing/<name>_s`` scalar.
    """

    def __init__(self, every_n_epochs: int, name: str) -> None:
        super().__init__()
        self.every_n_epochs = int(every_n_epochs)
        self.name = name
        self.total_seconds = 0.0
        self.calls = 0

    # ------------------------------------------------------------------ where and when
    @staticmethod
    def writer(trainer: L.Trainer):
        """The TensorBoard ``SummaryWriter`` of the first TensorBoard logger, or None."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def can_draw(self, trainer: L.Trainer) -> bool:
        return bool(trainer.is_global_zero) and not trainer.sanity_checking and self.writer(trainer) is not None

    def is_due(self, count: int) -> bool:
        """True on every ``every_n_epochs``-th event, counting events from 1."""
        return self.every_n_epochs > 0 and count % self.every_n_epochs == 0

    # ------------------------------------------------------------------ cost
    @contextlib.contextmanager
    def timed(self, trainer: L.Trainer) -> Iterator[None]:
        """Time the block, add it to ``total_seconds`` and log ``timing/<name>_s`` at this step."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.total_seconds += seconds
            self.calls += 1
            writer = self.writer(trainer)
            if writer is not None:
                writer.add_scalar(f"timing/{self.name}_s", seconds, trainer.global_step)
            log.debug("%s pictures took %.3f s", self.name, seconds)

    # ------------------------------------------------------------------ model and images
    @staticmethod
    @contextlib.contextmanager
    def eval_mode(module: torch.nn.Module) -> Iterator[None]:
        """Eval mode (BatchNorm running statistics) and no gradients; the previous mode comes back."""
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            module.train(was_training)

    @staticmethod
    def take_samples(dataset, indices: Sequence[int]) -> tuple[Tensor, list[dict]]:
        """Read ``dataset[i]`` for the given indices (clipped to the dataset's length) ->
        (uint8 [B, 3, S, S] on the CPU, targets). A training dataset augments: the draw is kept."""
        indices = sorted({int(i) for i in indices if 0 <= int(i) < len(dataset)})
        if not indices:
            raise ValueError(f"no sample images: the dataset has {len(dataset)} items")
        items = [dataset[i] for i in indices]
        return torch.stack([image for image, _ in items]), [target for _, target in items]

    @staticmethod
    def to_model_input(pl_module: L.LightningModule, images_uint8: Tensor,
                       targets: list[dict]) -> tuple[Tensor, list[dict]]:
        """Move a sample batch to the module's device and normalise it the way training batches are
        (the module's own ``on_after_batch_transfer``): float images, targets' tensors on the device."""
        device = pl_module.device
        moved = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
        return pl_module.on_after_batch_transfer((images_uint8.to(device), moved), 0)

    @staticmethod
    def datamodule(trainer: L.Trainer):
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError("the picture callbacks need trainer.fit(..., datamodule=...) with a datamodule "
                               "that has train_dataset and val_dataset (anchordet.data.CocoDataModule)")
        return datamodule


def level_names_of(detector) -> list[str]:
    """Names of the pyramid levels the head sees (levels without anchors are skipped)."""
    names = list(getattr(detector.backbone, "level_names", []))
    used = list(getattr(detector, "used_level_indices", range(len(detector.strides))))
    return [names[i] if i < len(names) else f"L{i}" for i in used]


# Imported last: the submodules import PictureCallback from this package.
from anchordet.callbacks.anchors import AnchorPictures  # noqa: E402
from anchordet.callbacks.features import FeatureMapPictures  # noqa: E402
from anchordet.callbacks.predictions import PredictionPictures  # noqa: E402

__all__ = ["AnchorPictures", "FeatureMapPictures", "PictureCallback", "PredictionPictures", "level_names_of"]
