"""Train a detector: `python train.py [group=choice ...] [key=value ...]`.

Hydra composes `conf/train.yaml`; this file instantiates the parts, fits k-means anchors on the
training boxes (or builds grid anchors), assembles the detector and runs the Lightning trainer.
Returns the best value of `monitor` so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from anchordet.assembly import assemble_detector
from anchordet.data.categories import CategoryMap
from anchordet.module import DetectionModule, read_checkpoint
from anchordet.sweep import write_run_result

log = logging.getLogger("anchordet.train")


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
                             instantiate(cfg.matcher), num_classes)


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
    """The checkpoint to resume from: `ckpt_path=...`, or `resume=true` = this run dir's last.ckpt.

    A checkpoint inside `<run>/checkpoints/` makes `<run>` the output folder again, so checkpoints and
    TensorBoard events continue in the run that is being resumed rather than in a new folder.
    """
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume") and not ckpt_path:
        ckpt_path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not ckpt_path.is_file():
            raise FileNotFoundError(
                f"resume=true but {ckpt_path} does not exist: run inside the folder of the run to resume "
                "(hydra.run.dir=outputs/runs/<date>/<time>) or pass ckpt_path=.../last.ckpt")
    if not ckpt_path:
        return None
    ckpt_path = Path(ckpt_path).resolve()
    if ckpt_path.parent.name == "checkpoints":
        with open_dict(cfg):
            cfg.paths.output_dir = str(ckpt_path.parent.parent)
        log.info("resuming %s: writing to its run folder %s", ckpt_path, cfg.paths.output_dir)
    return ckpt_path


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
    else:
        anchor_shapes, anchor_report = fit_anchors(cfg, datamodule, len(cfg.backbone.levels))
        log.info("anchor fitness: %s", json.dumps(anchor_report))
    detector = build_detector(cfg, anchor_shapes, category_map.num_classes)

    task = "proposals" if "AR@" in str(cfg.monitor) else "detection"
    module = DetectionModule(
        detector, category_map, str(datamodule.val_annotation_file), task=task,
        run_config=OmegaConf.to_container(cfg, resolve=True), **cfg.optim)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"precision": resolve_precision(cfg.trainer)})
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero and anchor_report is not None:
        log_anchor_report(loggers, anchor_report, anchor_shapes)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    return report_result(cfg, trainer)


def report_result(cfg: DictConfig, trainer: L.Trainer) -> float | None:
    """The best monitored value (returned to sweepers) and `result.json` for the sweep summary."""
    best = trainer.callback_metrics.get(cfg.monitor)
    best_path = last_path = None
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        if checkpoint.best_model_score is not None:
            best, best_path = checkpoint.best_model_score, checkpoint.best_model_path
        last_path = str(Path(checkpoint.dirpath) / "last.ckpt") if checkpoint.dirpath else None
    best = float(best) if best is not None else None
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
