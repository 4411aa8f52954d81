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

import contextlib
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from anchordet.assembly import assemble_detector
from anchordet.checkpointing import CheckpointWriteError, NonFiniteWeightsError, read_checkpoint
from anchordet.data import CocoDataModule, DatasetError, collate
from anchordet.data.categories import CategoryMap
from anchordet.distributed import distributed_job_scope
from anchordet.evaluation import METRICS_OF_TASK, format_per_class_table, write_results
from anchordet.hparams import HParamsSession, flatten_hyperparameters, run_outcome
from anchordet.inference import find_images, write_predictions
from anchordet.models.detector import Detector
from anchordet.models.heads.common import DETECTIONS
from anchordet.guard import NonFiniteError
from anchordet.module import DetectionModule
from anchordet.sweep import write_run_result
from anchordet.viz import write_prediction_overlays

log = logging.getLogger("anchordet.app")
# What Lightning's SLURM auto-requeue saves in the run folder (default_root_dir) before requeueing.
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
# Errors whose message says all a user needs (the file, the step, what to change): shown as one
# line, without the traceback through Lightning that would bury it.
USER_ERRORS = (DatasetError, CheckpointWriteError, NonFiniteError, NonFiniteWeightsError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn `USER_ERRORS` into ``SystemExit("error: ...")``: exit status 1, the message on stderr."""
    try:
        yield
    except USER_ERRORS as error:
        log.error("%s", error)
        raise SystemExit(f"error: {error}") from None


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


def compile_options(cfg: DictConfig) -> dict | None:
    """`compile.enabled=true` -> the torch.compile keyword arguments of the rest of `compile`."""
    options = OmegaConf.to_container(cfg.get("compile") or OmegaConf.create({"enabled": False}))
    return None if not options.pop("enabled", False) else {k: v for k, v in options.items() if v is not None}


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
        candidates = [p for p in [checkpoint_dir / "last.ckpt", checkpoint_dir / "on_exception.ckpt",
                                  *checkpoint_dir.glob("step-*.ckpt")] if p.is_file()]
        if not candidates:
            raise FileNotFoundError(
                f"resume=true but {checkpoint_dir} holds no last.ckpt, on_exception.ckpt or step-*.ckpt: run "
                "inside the folder of the run to resume (hydra.run.dir=outputs/runs/<date>/<time>) or pass "
                "ckpt_path=...")
        # The newest one holds the most work: a step or exception checkpoint when the run died mid-epoch.
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
    with user_errors():
        return _train(cfg)


def _train(cfg: DictConfig) -> float | None:
    # The module normalises batches on the device in on_after_batch_transfer on purpose; Lightning
    # warns about any such hook when a datamodule is used too.
    warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")
    L.seed_everything(cfg.seed, workers=True)
    allow_unsafe = bool(cfg.get("allow_unsafe_checkpoint", False))
    resume_from = resolve_resume(cfg)
    datamodule = instantiate(cfg.data)
    category_map: CategoryMap = datamodule.category_map
    if resume_from is not None:
        # The anchors the weights were trained with, not a new clustering of (maybe changed) data.
        anchor_shapes, anchor_offset = anchors_from_checkpoint(read_checkpoint(resume_from, allow_unsafe))
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
        run_config=OmegaConf.to_container(cfg, resolve=True), anchor_report=anchor_report,
        eval_backend=cfg.evaluation.backend, compile=compile_options(cfg))

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # The run's row in TensorBoard's HParams tab: resolved settings + Hydra choices, final metrics.
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    callbacks.append(HParamsSession(
        flatten_hyperparameters(OmegaConf.to_container(cfg, resolve=True), choices), cfg.monitor))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer_cfg = OmegaConf.merge(prepare_ddp(cfg), {"precision": resolve_precision(cfg.trainer)})
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    with distributed_job_scope():
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=not allow_unsafe)
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


def rebuild_module(checkpoint: dict, head_overrides: DictConfig | dict | None = None,
                   eval_backend: str = "faster_coco_eval", val_annotation_file: str | None = None) -> DetectionModule:
    """The trained module of a checkpoint written by `train` (config, anchors, classes and weights
    all from the checkpoint), with inference-time head settings applied."""
    saved = checkpoint["anchordet"]
    run_cfg = OmegaConf.create(saved["run_config"])
    override_head(run_cfg, head_overrides)
    trained_map = CategoryMap.from_dict(saved["category_map"])
    anchor_shapes, anchor_offset = anchors_from_checkpoint(checkpoint)
    detector = build_detector(run_cfg, anchor_shapes, trained_map.num_classes, anchor_offset,
                              load_backbone_weights=False)
    module = DetectionModule(detector, trained_map, val_annotation_file, run_config=saved["run_config"],
                             eval_backend=eval_backend)
    module.load_state_dict(checkpoint["state_dict"])
    return module


# Keys of evaluate.yaml's `data` that point at other annotated data; the rest adjust the loader.
EVALUATION_DATA_PATHS = ("root", "val_images", "val_annotations")


def evaluation_datamodule(checkpoint: dict, data_overrides: DictConfig | dict | None):
    """The data to evaluate a checkpoint on: its training run's validation data, or other COCO data.

    ``data.root=/path/to/coco`` (the 2017 layout's val2017) or ``data.val_images=... data.val_annotations=...``
    evaluate on that annotation file, whose categories must be the checkpoint's (no training files
    needed); ``data.batch_size`` / ``data.num_workers`` adjust either; an override with its own
    ``_target_`` replaces the data config whole.
    """
    saved = checkpoint["anchordet"]
    run_data = OmegaConf.create(saved["run_config"]).data
    given = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(data_overrides or {})).items() if v is not None}
    trained_map = CategoryMap.from_dict(saved["category_map"])
    if "_target_" in given:
        datamodule = instantiate(given)
    elif any(key in given for key in EVALUATION_DATA_PATHS):
        loader = {k: given.get(k, run_data.get(k)) for k in ("batch_size", "num_workers") if given.get(k, run_data.get(k)) is not None}
        datamodule = CocoDataModule(**{k: given.get(k) for k in EVALUATION_DATA_PATHS}, image_size=run_data.image_size,
                                    category_map=trained_map, **loader)
    else:
        datamodule = instantiate(OmegaConf.merge(run_data, given))
    if datamodule.category_map != trained_map:
        raise ValueError(
            f"the dataset's classes ({datamodule.category_map.names}) disagree with the checkpoint's "
            f"({trained_map.names}): evaluate on data with the categories the model was trained on "
            "(check data.* overrides)")
    return datamodule


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
    with user_errors():
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict:
    checkpoint = read_checkpoint(cfg.ckpt_path, bool(cfg.get("allow_unsafe_checkpoint", False)))
    head_overrides = OmegaConf.to_container(cfg.get("head") or OmegaConf.create({}))
    datamodule = evaluation_datamodule(checkpoint, cfg.get("data"))
    module = rebuild_module(checkpoint, head_overrides, cfg.evaluation.backend, str(datamodule.val_annotation_file))
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
               "head_overrides": head_overrides, "evaluation_backend": cfg.evaluation.backend,
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


# ---------------------------------------------------------------------------- prediction
def predict(cfg: DictConfig) -> dict:
    """Run `cfg.ckpt_path` on the images `cfg.source` names; write predictions.json, images.json and
    overlays into the run folder."""
    with user_errors():
        return _predict(cfg)


def _predict(cfg: DictConfig) -> dict:
    checkpoint = read_checkpoint(cfg.ckpt_path, bool(cfg.get("allow_unsafe_checkpoint", False)))
    head_overrides = OmegaConf.to_container(cfg.get("head") or OmegaConf.create({}))
    module = rebuild_module(checkpoint, head_overrides)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    image_size = int(checkpoint["anchordet"]["run_config"]["data"]["image_size"])
    return write_predictions(module, find_images(cfg.source), image_size, Path(cfg.output_dir), device,
                             batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
                             score_threshold=float(cfg.score_threshold), max_detections=int(cfg.max_detections),
                             overlays=bool(cfg.overlays), max_overlays=int(cfg.max_overlays))
