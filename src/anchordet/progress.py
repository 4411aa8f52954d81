"""What a run prints while it trains: a live bar on a terminal, plain log lines everywhere else.

A job whose output goes to a file (nohup, SLURM, CI) gets nothing from a live progress bar: Rich
draws nothing into a file and tqdm writes carriage returns. `progress_bar()` (the
``callbacks.progress_bar`` target) therefore returns Lightning's `RichProgressBar` when stdout is a
terminal and `LogProgress` otherwise: one line every ``every_n_steps`` optimiser steps (step,
epoch, loss terms, images/s, time left) and one per validation.

`ParameterSummary` replaces Lightning's model-summary table, whose FLOPs column reads 0 for a
detector fed through a datamodule, with one line of parameter counts.

`DataWaitMonitor` logs how long each training step waited for its batch (``timing/data_wait_s``)
and which share of the step that was (``timing/data_wait_fraction``): a loader that cannot keep
up shows as a fraction well above a few percent.
"""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar

log = logging.getLogger("anchordet.progress")


def progress_bar(every_n_steps: int = 50, refresh_rate: int = 1) -> ProgressBar:
    """A live Rich bar on a terminal, `LogProgress` when stdout goes to a file or a pipe."""
    if sys.stdout.isatty():
        return RichProgressBar(refresh_rate=refresh_rate)
    return LogProgress(every_n_steps)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LogProgress(ProgressBar):
    """Training progress as log lines (``anchordet.progress`` logger, INFO), rank 0 only."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise ValueError(f"callbacks.progress_bar.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self._enabled = True
        self._start_time = self._start_step = None
        self._images = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time, self._start_step, self._images = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._images += int(batch[0].shape[0]) * trainer.world_size
        step = trainer.global_step
        if not (self._enabled and trainer.is_global_zero) or step == 0 or step % self.every_n_steps:
            return
        elapsed = time.perf_counter() - self._start_time
        done = step - self._start_step
        total = trainer.estimated_stepping_batches
        left = (total - step) * elapsed / done if done and total != float("inf") else float("nan")
        # The step values of the logged loss terms: train/loss_obj_step -> loss_obj.
        losses = " ".join(f"{name[len('train/'):-len('_step')]}={float(value):.4f}"
                          for name, value in trainer.callback_metrics.items()
                          if name.startswith("train/loss") and name.endswith("_step"))
        log.info("step %d/%s epoch %d: %s, %.1f images/s, %s left", step, total, trainer.current_epoch, losses,
                 self._images / elapsed if elapsed else 0.0, format_duration(left) if left == left else "?")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        metrics = ", ".join(f"{name}={float(value):.4f}" for name, value in trainer.callback_metrics.items()
                            if name.startswith("val/"))
        log.info("validation after step %d (epoch %d): %s", trainer.global_step, trainer.current_epoch,
                 metrics or "no metrics")


class ParameterSummary(ModelSummary):
    """One line with the parameter counts and size instead of Lightning's module table."""

    def summarize(self, summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes, **kwargs) -> None:
        log.info("model: %.1f M parameters (%.1f M trainable), %.1f MB", total_parameters / 1e6,
                 trainable_parameters / 1e6, model_size)


class DataWaitMonitor(L.Callback):
    """``timing/data_wait_s`` and ``timing/data_wait_fraction``, averaged over ``every_n_steps``.

    The wait is the time from the end of one training batch to the start of the next, which is
    fetching (and transferring) the next batch plus Lightning's own bookkeeping; the step is the
    time from one batch start to the next. On a GPU the step is measured on the host, which runs
    ahead of the device until something synchronises (the loss logging does, every step here).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = int(every_n_steps)
        self._batch_end = self._batch_start = None
        self._wait = self._total = 0.0
        self._count = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = self._batch_start = None  # the first batch of an epoch waits for the loader's start

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._wait += now - self._batch_end
            self._total += now - self._batch_start
            self._count += 1
        self._batch_start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._batch_end = time.perf_counter()
        if trainer.global_step % self.every_n_steps == 0 and self._count:
            pl_module.log_dict({"timing/data_wait_s": self._wait / self._count,
                                "timing/data_wait_fraction": self._wait / self._total},
                               on_step=True, on_epoch=False, rank_zero_only=True)
            self._wait = self._total = 0.0
            self._count = 0
