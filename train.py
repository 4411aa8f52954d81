"""Train a detector: `python train.py [group=choice ...] [key=value ...]`.

Hydra composes `conf/train.yaml`; this file instantiates the parts, fits k-means anchors on the
training boxes (or builds grid anchors), assembles the detector and runs the Lightning trainer.
Returns the best value of `monitor` so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from anchordet.assembly import assemble_detector
from anchordet.data.categories import CategoryMap
from anchordet.hparams import HParamsSession, flatten_hyperparameters, run_outcome
from anchordet.module import DetectionModule, read_checkpoint
from anchordet.sweep import write_run_result

log = logging.getLogger("anchordet.train")
# What Lightning's SLURM auto-requeue saves in the run folder (default_root_dir) before requeueing.
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """`precision: auto` means bf16-mixed where a GPU trains and full fp32 on the CPU (CPU bf16 autocast
    is slow on most processors and buys nothing here)."""
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def build_detector(cfg: DictConfig, anchor_shapes_per_level: list[torch.Tensor], num_classes: int,
                   backbone_weights_override: bool = False):
    """Instantiate backbone, head and matcher from `cfg` and assemble them around the given anchors.

    `backbone_weights_override`: rebuild without loading pretrained weights (evaluate.py loads the
    trained state dict right after, so fetching ImageNet weights would be wasted or impossible).
    """
    backbone_cfg = cfg.backbone
    if backbone_weights_override:
        backbone_cfg = OmegaConf.merge(backbone_cfg, {"weights": None})
    backbone = instantiate(backbone_cfg)
    return assemble_detector(backbone, instantiate(cfg.head), anchor_shapes_per_level,
                             instantiate(cfg.matcher), num_classes, anchor_offset=cfg.get("anchor_offset", 0.5))


def fit_anchors(cfg: DictConfig, datamodule, num_levels: int) -> tuple[list[torch.Tensor], dict]:
    """Anchor shapes per level from the anchor config and the training boxes, plus the fitness report."""
    anchor_builder = instantiate(cfg.anchor)
    box_wh = datamodule.train_box_sizes()
    shapes = anchor_builder.build(box_wh, num_levels=num_levels, fingerprint=datamodule.fingerprint())
    report = getattr(anchor_builder, "last_report", None) or anchor_builder.fitness_report(box_wh, shapes)
    return shapes, report


def log_anchor_report(loggers: list, report: dict, shapes: list[torch.Tensor]) -> None:
    flat = {f"anchors/{k}": float(v) for k, v in _flatten(report).items() if isinstance(v, (int, float))}
    text = "anchor shapes (w, h) per level:\n\n" + "\n\n".join(
        f"- level {i}: " + ", ".join(f"({w:.1f}, {h:.1f})" for w, h in s.tolist()) for i, s in enumerate(shapes))
    for logger in loggers:
        logger.log_metrics(flat, step=0)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("anchors/report", "```\n" + json.dumps(report, indent=2) + "\n```\n\n" + text, 0)


def _flatten(report: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_resume(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: `ckpt_path=...`, or `resume=true` = this run dir's last.ckpt, or
    (without either) the newest `hpc_ckpt_<n>.ckpt` in the run folder, which Lightning's SLURM
    auto-requeue leaves there before the job is requeued. Lightning would pick the same file itself
    inside `fit` on SLURM, but only after the model is built; train.py needs it earlier, because the
    anchors and the run folder come from the checkpoint.

    A checkpoint inside `<run>/checkpoints/` makes `<run>` the output folder again, so checkpoints and
    TensorBoard events continue in the run that is being resumed rather than in a new folder.
    """
    ckpt_path = cfg.get("ckpt_path")
    requeued = {int(m.group(1)): path for path in Path(cfg.paths.output_dir).glob("hpc_ckpt_*.ckpt")
                if (m := HPC_CHECKPOINT.fullmatch(path.name))}
    if requeued and not ckpt_path:
        # Lightning's SLURM auto-requeue saved this before the job was requeued: same job, same folder.
        newest = requeued[max(requeued)]
        log.info("requeued job: resuming from %s", newest)
        return newest.resolve()
    if cfg.get("resume") and not ckpt_path:
        checkpoint_dir = Path(cfg.paths.output_dir) / "checkpoints"
        candidates = [p for p in [checkpoint_dir / "last.ckpt", *checkpoint_dir.glob("step-*.ckpt")] if p.is_file()]
        if not candidates:
            raise FileNotFoundError(
                f"resume=true but {checkpoint_dir} holds no last.ckpt or step-*.ckpt: run inside the folder "
                "of the run to resume (hydra.run.dir=outputs/runs/<date>/<time>) or pass ckpt_path=...")
        # The step checkpoint is newer than last.ckpt when the run died mid-epoch.
        ckpt_path = max(candidates, key=lambda p: p.stat().st_mtime)
    if not ckpt_path:
        return None
    ckpt_path = Path(ckpt_path).resolve()
    if ckpt_path.parent.name == "checkpoints":
        with open_dict(cfg):
            cfg.paths.output_dir = str(ckpt_path.parent.parent)
        log.info("resuming %s: writing to its run folder %s", ckpt_path, cfg.paths.output_dir)
    return ckpt_path


def rerun_ranks_in_this_job() -> None:
    """Point Lightning's rank launcher at this job: its overrides and its output folder (see below)."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def prepare_ddp(cfg: DictConfig) -> DictConfig:
    """Make Lightning's DDP launcher and Hydra agree, for single runs and inside `-m` sweeps.

    Lightning starts ranks 1..N-1 by re-running this script with `sys.argv` plus
    `hydra.run.dir=<HydraConfig run.dir>`. Left alone that breaks in two ways: `run.dir` holds
    `${now:...}`, which each rank resolves at its own second (a folder per rank), and inside a sweep
    `sys.argv` still says `-m a,b`, so every rank would start a sweep of its own. So the ranks get this
    job's own overrides (one value per key) and the folder this job already writes to.
    Also: SyncBatchNorm only runs on accelerators, so on CPU (gloo) it is switched off.
    """
    trainer_cfg = cfg.trainer
    strategy = trainer_cfg.get("strategy")
    if strategy is None or int(trainer_cfg.get("devices", 1) or 1) * int(trainer_cfg.get("num_nodes", 1) or 1) <= 1:
        return trainer_cfg
    rerun_ranks_in_this_job()
    on_cpu = trainer_cfg.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if on_cpu and trainer_cfg.get("sync_batchnorm"):
        log.info("trainer.sync_batchnorm=true ignored on the CPU (SyncBatchNorm needs an accelerator)")
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"sync_batchnorm": False})
    return trainer_cfg


def run_training(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    resume_from = resolve_resume(cfg)
    datamodule = instantiate(cfg.data)
    category_map: CategoryMap = datamodule.category_map

    if resume_from is not None:
        # The anchors the weights were trained with, not a new clustering of (maybe changed) data.
        saved = read_checkpoint(resume_from)["anchordet"]
        anchor_shapes = [torch.tensor(s, dtype=torch.float32).reshape(-1, 2) for s in saved["anchor_shapes_per_level"]]
        anchor_report = None
        log.info("anchors from the checkpoint %s (no new k-means clustering): %s", resume_from,
                 [len(s) for s in anchor_shapes])
    else:
        anchor_shapes, anchor_report = fit_anchors(cfg, datamodule, len(cfg.backbone.levels))
        log.info("anchor fitness: %s", json.dumps(anchor_report))
    detector = build_detector(cfg, anchor_shapes, category_map.num_classes)

    task = "proposals" if "AR@" in str(cfg.monitor) else "detection"
    module = DetectionModule(
        detector, category_map, str(datamodule.val_annotation_file), task=task,
        run_config=OmegaConf.to_container(cfg, resolve=True), **cfg.optim)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # The run's row in TensorBoard's HParams tab: resolved settings + Hydra choices, final metrics.
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    callbacks.append(HParamsSession(
        flatten_hyperparameters(OmegaConf.to_container(cfg, resolve=True), choices), cfg.monitor))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer_cfg = OmegaConf.merge(prepare_ddp(cfg), {"precision": resolve_precision(cfg.trainer)})
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero and anchor_report is not None:
        log_anchor_report(loggers, anchor_report, anchor_shapes)
    with distributed_job_scope():
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        return report_result(cfg, trainer)


# What Lightning's DDP launcher leaves in the launching process: the next job of a sweep would see
# them, take itself for an externally launched rank and wait forever for peers that never start.
LAUNCHER_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def distributed_job_scope():
    """Leave the process as this job found it: one job's process group and launcher variables must
    not leak into the next job of a `-m` sweep run by the same process."""
    saved_env = {key: os.environ.get(key) for key in LAUNCHER_ENV_KEYS}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def report_result(cfg: DictConfig, trainer: L.Trainer) -> float | None:
    """The best monitored value (returned to sweepers) and `result.json` for the sweep summary."""
    best, best_path, last_path = run_outcome(trainer, cfg.monitor)
    if trainer.is_global_zero:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        write_run_result(cfg.paths.output_dir, overrides, cfg.monitor, best, best_path, last_path)
        log.info("best %s = %s (%s)", cfg.monitor, best, best_path)
    return best


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_training(cfg)


if __name__ == "__main__":
    main()
