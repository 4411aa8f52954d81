"""Hydra configs in, trained or evaluated detectors out: the one module of anchordet that imports Hydra.

`train.py` and `evaluate.py` compose their config and call `train(cfg)` or `evaluate(cfg)`; everything
between a composed config and the library's plain-argument classes lives here:

- building the parts (`build_detector`, `fit_anchors`, `anchors_from_checkpoint`) and checking that
  the chosen `monitor` is a metric the chosen head logs;
- run mechanics: which checkpoint to resume (`resolve_resume`), how Lightning's DDP launcher re-runs
  the script inside a Hydra job (`prepare_ddp`), the precision `auto` stands for, `result.json`;
- evaluation of a checkpoint: rebuilding the model from the config it saved, inference-time head
  settings, results files and overlay pictures.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from anchordet.assembly import assemble_detector
from anchordet.data import collate
from anchordet.data.categories import CategoryMap
from anchordet.distributed import distributed_job_scope
from anchordet.evaluation import METRICS_OF_TASK, format_per_class_table, write_results
from anchordet.hparams import HParamsSession, flatten_hyperparameters, run_outcome
from anchordet.models.detector import Detector
from anchordet.models.heads.common import DETECTIONS
from anchordet.module import DetectionModule, read_checkpoint
from anchordet.sweep import write_run_result
from anchordet.viz import write_prediction_overlays

log = logging.getLogger("anchordet.app")
# What Lightning's SLURM auto-requeue saves in the run folder (default_root_dir) before requeueing.
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


# ---------------------------------------------------------------------------- parts
def build_detector(cfg: DictConfig, anchor_shapes_per_level: list[torch.Tensor], num_classes: int,
                   anchor_offset: float, load_backbone_weights: bool = True) -> Detector:
    """Instantiate backbone, head and matcher from `cfg` and assemble them around the given anchors.

    `load_backbone_weights=False` builds the backbone without its pretrained weights: evaluation
    loads the trained state dict right after, so fetching ImageNet weights would be wasted or impossible.
    """
    backbone_cfg = cfg.backbone if load_backbone_weights else OmegaConf.merge(cfg.backbone, {"weights": None})
    return assemble_detector(instantiate(backbone_cfg), instantiate(cfg.head), anchor_shapes_per_level,
                             instantiate(cfg.matcher), num_classes, anchor_offset=anchor_offset)


def fit_anchors(cfg: DictConfig, datamodule) -> tuple[list[torch.Tensor], dict, float]:
    """(anchor shapes per level, the builder's report, the in-cell offset) from `cfg.anchor` and the
    training boxes, for as many levels as `backbone.levels` names."""
    builder = instantiate(cfg.anchor)
    shapes, report = builder.build(datamodule.train_box_sizes(), num_levels=len(cfg.backbone.levels))
    return shapes, report, builder.offset


def anchors_from_checkpoint(checkpoint: dict) -> tuple[list[torch.Tensor], float]:
    """The anchor shapes per level and offset a checkpoint's weights were trained with."""
    saved = checkpoint["anchordet"]
    shapes = [torch.tensor(s, dtype=torch.float32).reshape(-1, 2) for s in saved["anchor_shapes_per_level"]]
    # Checkpoints written before the offset moved into the anchor config kept it at the top level.
    offset = saved.get("anchor_offset", saved["run_config"].get("anchor_offset", 0.5))
    return shapes, float(offset)


def check_monitor(monitor: str, task: str) -> None:
    """`monitor` must be a validation metric that a head of this task logs; say which ones do."""
    names = [f"val/{name}" for name in METRICS_OF_TASK[task]]
    if monitor not in names:
        raise ValueError(
            f"monitor={monitor}: the chosen head produces {task} and logs {names}; set monitor= to one "
            f"of them (head=yolo logs val/mAP..., head=rpn logs val/AR@100...)")


# ---------------------------------------------------------------------------- runs
def resolve_precision(trainer_cfg: DictConfig) -> str:
    """`precision: auto` means bf16-mixed where a GPU trains and full fp32 on the CPU (CPU bf16 autocast
    is slow on most processors and buys nothing here)."""
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def resolve_resume(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: `ckpt_path=...`, or `resume=true` = this run dir's last.ckpt, or
    (without either) the newest `hpc_ckpt_<n>.ckpt` in the run folder, which Lightning's SLURM
    auto-requeue leaves there before the job is requeued. Lightning would pick the same file itself
    inside `fit` on SLURM, but only after the model is built; training needs it earlier, because the
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


def train(cfg: DictConfig) -> float | None:
    """Fit anchors (or take them from the checkpoint being resumed), build the detector and train it.
    Returns the best value of `monitor`, which Hydra sweepers optimise."""
    L.seed_everything(cfg.seed, workers=True)
    resume_from = resolve_resume(cfg)
    datamodule = instantiate(cfg.data)
    category_map: CategoryMap = datamodule.category_map
    if resume_from is not None:
        # The anchors the weights were trained with, not a new clustering of (maybe changed) data.
        anchor_shapes, anchor_offset = anchors_from_checkpoint(read_checkpoint(resume_from))
        anchor_report = None
        log.info("anchors from the checkpoint %s (no new k-means clustering): %s", resume_from,
                 [len(s) for s in anchor_shapes])
    else:
        anchor_shapes, anchor_report, anchor_offset = fit_anchors(cfg, datamodule)
    detector = build_detector(cfg, anchor_shapes, category_map.num_classes, anchor_offset)
    check_monitor(cfg.monitor, detector.head.task)
    module = DetectionModule(
        detector, category_map, str(datamodule.val_annotation_file),
        optimizer=instantiate(cfg.optim.optimizer), scheduler=instantiate(cfg.optim.scheduler),
        run_config=OmegaConf.to_container(cfg, resolve=True), anchor_report=anchor_report)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # The run's row in TensorBoard's HParams tab: resolved settings + Hydra choices, final metrics.
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    callbacks.append(HParamsSession(
        flatten_hyperparameters(OmegaConf.to_container(cfg, resolve=True), choices), cfg.monitor))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer_cfg = OmegaConf.merge(prepare_ddp(cfg), {"precision": resolve_precision(cfg.trainer)})
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    with distributed_job_scope():
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        return report_result(cfg, trainer)


def report_result(cfg: DictConfig, trainer: L.Trainer) -> float | None:
    """The best monitored value (returned to sweepers) and `result.json` for the sweep summary."""
    best, best_path, last_path = run_outcome(trainer, cfg.monitor)
    if trainer.is_global_zero:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        write_run_result(cfg.paths.output_dir, overrides, cfg.monitor, best, best_path, last_path)
        log.info("best %s = %s (%s)", cfg.monitor, best, best_path)
    return best


# ---------------------------------------------------------------------------- evaluation
def override_head(run_cfg: DictConfig, head_overrides: DictConfig | dict | None) -> None:
    """Apply inference-time head settings (e.g. the RPN's ``nms_iou``) to the saved run config.

    Only keys the saved head config already has are accepted: a typo must not be ignored silently.
    The weights do not depend on these settings, so they load unchanged.
    """
    for key, value in OmegaConf.to_container(OmegaConf.create(head_overrides or {})).items():
        if key not in run_cfg.head or key.startswith("_"):
            raise ValueError(
                f"head.{key}: the checkpoint's head config has no such setting; choose one of "
                f"{sorted(k for k in run_cfg.head if not k.startswith('_'))}")
        run_cfg.head[key] = value


def rebuild_module(checkpoint: dict, data_overrides: DictConfig | dict | None = None,
                   head_overrides: DictConfig | dict | None = None) -> tuple[DetectionModule, object]:
    """(module with trained weights, datamodule) from a checkpoint written by `train`."""
    saved = checkpoint["anchordet"]
    run_cfg = OmegaConf.create(saved["run_config"])
    override_head(run_cfg, head_overrides)
    data_overrides = OmegaConf.create(data_overrides or {})
    # An override with its own _target_ is a whole new data config (another dataset class); otherwise
    # it adjusts the training run's data config (e.g. +data.batch_size=2).
    data_cfg = data_overrides if "_target_" in data_overrides else OmegaConf.merge(run_cfg.data, data_overrides)
    datamodule = instantiate(data_cfg)
    trained_map = CategoryMap.from_dict(saved["category_map"])
    if datamodule.category_map != trained_map:
        raise ValueError(
            f"the dataset's classes ({datamodule.category_map.names}) disagree with the checkpoint's "
            f"({trained_map.names}): evaluate on data with the categories the model was trained on "
            "(check data.* overrides)")
    anchor_shapes, anchor_offset = anchors_from_checkpoint(checkpoint)
    detector = build_detector(run_cfg, anchor_shapes, trained_map.num_classes, anchor_offset,
                              load_backbone_weights=False)
    module = DetectionModule(detector, trained_map, str(datamodule.val_annotation_file),
                             run_config=saved["run_config"])
    module.load_state_dict(checkpoint["state_dict"])
    return module, datamodule


@torch.no_grad()
def write_overlays(module: DetectionModule, datamodule, out_dir: Path, num_images: int,
                   score_threshold: float) -> list[Path]:
    """PNG pictures of GT and predictions on the first validation images (network-input frame)."""
    dataset = datamodule.val_dataset
    samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
    if not samples:
        return []
    images_uint8, targets = collate(samples)
    device = next(module.parameters()).device
    images, _ = module.on_after_batch_transfer((images_uint8.to(device), targets))
    predictions = [{k: v.cpu() for k, v in p.items()} for p in module.detector.predict(images)]
    class_names = module.category_map.names if module.task == DETECTIONS else None
    return write_prediction_overlays(images_uint8, predictions, targets, class_names, out_dir, score_threshold)


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate `cfg.ckpt_path` on its validation data: results JSON, metrics.json, overlays, printout."""
    checkpoint = read_checkpoint(cfg.ckpt_path)
    head_overrides = OmegaConf.to_container(cfg.get("head") or OmegaConf.create({}))
    module, datamodule = rebuild_module(checkpoint, cfg.get("data"), head_overrides)
    if cfg.split != "val":
        raise ValueError(f"split={cfg.split!r}: only 'val' is supported (point data.val_images / "
                         "data.val_annotations at another split to evaluate it)")
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    distributed = int(cfg.devices) > 1
    if distributed:
        rerun_ranks_in_this_job()
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=int(cfg.devices),
                        strategy="ddp" if distributed else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    datamodule.setup("validate")
    with distributed_job_scope():
        # Each rank validates its share; the module gathers every rank's detections (each image once)
        # before COCOeval, so the numbers equal a single-process run.
        trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    if not trainer.is_global_zero:
        return {}

    evaluation = module.last_evaluation
    detections = module.task == DETECTIONS
    results_name = "detections.json" if detections else "proposals.json"
    write_results(module.last_results, output_dir / results_name)
    metrics = {"checkpoint": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split,
               "annotation_file": str(module.val_annotation_file),
               "num_images": len(module.last_image_ids),
               "head_overrides": head_overrides,
               **evaluation.metrics}
    if detections:
        metrics["per_class_AP"] = evaluation.per_class_ap
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    overlays = write_overlays(module, datamodule, output_dir / "overlays", cfg.num_overlays, cfg.overlay_score_threshold)

    print(evaluation.summary)
    if detections:
        print(format_per_class_table(evaluation.per_class_ap))
    print(f"wrote {output_dir / results_name}, {output_dir / 'metrics.json'} and {len(overlays)} overlays "
          f"in {output_dir / 'overlays'}")
    return metrics
