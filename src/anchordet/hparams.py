"""One row per run in TensorBoard's HParams tab: the run's settings beside its final metrics.

Runs of a sweep differ in a handful of keys buried in a large config; the HParams tab lines them up
side by side (table, parallel coordinates, scatter plots) once each run has written its settings
and its metrics as one "session". The session is written when training ends, so the metrics are
the final ones; a run that dies before then shows up only in the Scalars tab.

`HParamsSession` writes it in `on_fit_end`, after the last validation and before Lightning closes
the loggers (writing after that would open a second event file). The settings are the resolved
config flattened to dotted keys (`optim.lr`, `head.box_weight`, `data.image_size`, ...) plus the
Hydra group choices (`choice/backbone=resnet50`), which name a run's configuration far better than
the `_target_` strings they select. Output locations, callbacks and loggers are left out: they
differ between runs without changing the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L

# Config sections that say where and how a run reports, not what it trains.
NOT_HYPERPARAMETERS = ("paths", "callbacks", "logger", "ckpt_path", "resume", "task_name", "allow_unsafe_checkpoint")
# Prefix of the HParams metrics; separate tags so the step-0 values the logger writes for them do
# not land on the val/* curves.
METRIC_PREFIX = "hp/"


def flatten_hyperparameters(config: Mapping[str, Any], choices: Mapping[str, Any] | None = None,
                            ) -> dict[str, bool | int | float | str]:
    """Dotted key -> scalar (what the HParams tab accepts). Lists become their Python string
    (`"['P3', 'P4', 'P5']"`), None becomes `"null"`, and Hydra/instantiate plumbing (`_target_`,
    `_partial_`) is dropped."""
    flat: dict[str, bool | int | float | str] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if str(key).startswith("_") and str(key).endswith("_"):
                    continue
                visit(value, f"{prefix}{key}.")
            return
        key = prefix[:-1]
        if node is None:
            flat[key] = "null"
        elif isinstance(node, (bool, int, float, str)):
            flat[key] = node
        else:
            flat[key] = str(node)

    visit({k: v for k, v in config.items() if k not in NOT_HYPERPARAMETERS}, "")
    for group, choice in (choices or {}).items():
        if not str(group).startswith("hydra") and group not in NOT_HYPERPARAMETERS:
            flat[f"choice/{group}"] = "null" if choice is None else str(choice)
    return flat


def final_metrics(best: float | None, callback_metrics: Mapping[str, Any]) -> dict[str, float]:
    """`hp/best` (the best value of the run's `monitor`, which is itself one of the hyperparameters)
    and `hp/<name>` for each final `val/<name>`."""
    metrics = {f"{METRIC_PREFIX}best": float("nan") if best is None else float(best)}
    for key, value in callback_metrics.items():
        if key.startswith("val/"):
            metrics[METRIC_PREFIX + key[len("val/"):]] = float(value)
    return metrics


def run_outcome(trainer: L.Trainer, monitor: str) -> tuple[float | None, str | None, str | None]:
    """(best value of `monitor`, best checkpoint, last checkpoint) of a finished fit. The checkpoint
    callback's best score wins; without one, the last logged value of `monitor` is the best known."""
    best = trainer.callback_metrics.get(monitor)
    best_path = last_path = None
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        if checkpoint.best_model_score is not None:
            best, best_path = checkpoint.best_model_score, checkpoint.best_model_path
        last_path = str(Path(checkpoint.dirpath) / "last.ckpt") if checkpoint.dirpath else None
    return (float(best) if best is not None else None), best_path, last_path


class HParamsSession(L.Callback):
    """Writes the run's HParams session (settings + final metrics) with every logger at the end of fit.
    Loggers log on rank 0 only, so no rank check is needed here."""

    def __init__(self, hyperparameters: dict, monitor: str) -> None:
        self.hyperparameters, self.monitor = hyperparameters, monitor

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best, _, _ = run_outcome(trainer, self.monitor)
        metrics = final_metrics(best, trainer.callback_metrics)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.hyperparameters, metrics)
