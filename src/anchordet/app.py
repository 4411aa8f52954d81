"""Hydra configs in, trained detectors out (with `anchordet.trained`, the only modules that import Hydra).

`train.py` composes its config and calls `train(cfg)`; everything between a composed training config
and the library's plain-argument classes lives here (commands on a trained checkpoint, `evaluate`,
`predict` and `export`, live in `anchordet.trained` and build on these parts):

- building the parts (`build_detector`, `fit_anchors`, `build_fresh_detector`,
  `anchors_from_checkpoint`) and checking that the chosen `monitor` is a metric the chosen head logs;
- `compose_train_config`: the config `python train.py <overrides>` runs, for tools that build many
  models in one process (`python -m anchordet.bench fit`);
- run mechanics: which checkpoint to resume (`resolve_resume`), how Lightning's DDP launcher re-runs
  the script inside a Hydra job (`prepare_ddp`), the precision `auto` stands for, `result.json`;
- `user_errors`: config and data mistakes shown as one line naming the key or file.
"""

from __future__ import annotations

import contextlib
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
from anchordet.data import DatasetError
from anchordet.data.categories import CategoryMap
from anchordet.distributed import distributed_job_scope
from anchordet.errors import ConfigError
from anchordet.evaluation import METRICS_OF_TASK
from anchordet.guard import NonFiniteError
from anchordet.hparams import HParamsSession, flatten_hyperparameters, run_outcome
from anchordet.models.detector import Detector
from anchordet.module import DetectionModule
from anchordet.sweep import write_run_result

log = logging.getLogger("anchordet.app")
# What Lightning's SLURM auto-requeue saves in the run folder (default_root_dir) before requeueing.
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
# The checkout's conf/: module entry points (`python -m anchordet.predict`, the fit benchmark) find
# it from any folder of an editable install.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
# Errors whose message says all a user needs (the file, the step, what to change): shown as one
# line, without the traceback through Lightning that would bury it.
USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, CheckpointWriteError, NonFiniteError,
               NonFiniteWeightsError)


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


def optimisation_recipe(cfg: DictConfig) -> dict:
    """The optimiser and schedule factories of `cfg.optim` and the trainer's gradient clipping:
    what a loop outside Lightning needs to train the way `train.py` does."""
    return {"optimizer": instantiate(cfg.optim.optimizer), "scheduler": instantiate(cfg.optim.scheduler),
            "gradient_clip_val": cfg.trainer.get("gradient_clip_val")}


def build_fresh_detector(cfg: DictConfig, datamodule) -> tuple[Detector, dict]:
    """A randomly initialised detector (backbone weights as `cfg.backbone.weights` says) around anchors
    fitted to `datamodule`'s training boxes; also the anchor builder's report."""
    shapes, report, offset = fit_anchors(cfg, datamodule)
    return build_detector(cfg, shapes, datamodule.category_map.num_classes, offset), report


def build_datamodule(cfg: DictConfig):
    """The LightningDataModule `cfg.data` names."""
    return instantiate(cfg.data)


def compose_train_config(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """The training config of ``python train.py <overrides>``, composed without starting a Hydra job.

    Outside a job ``${hydra:runtime...}`` cannot resolve, so the paths it feeds are set here: the
    project root is the current folder (as for train.py) and the run writes under `output_dir`.
    """
    from hydra import compose, initialize_config_dir

    if not (CONFIG_DIR / "train.yaml").is_file():
        raise ConfigError(f"{CONFIG_DIR / 'train.yaml'} not found: the fit benchmark composes the checkout's "
                          "conf/; install the project editable (pip install -e .) from its checkout")
    paths = [f"paths.root_dir={Path.cwd()}", f"paths.output_dir={Path(output_dir).resolve()}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=paths + list(overrides))


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
    on_cpu = trainer_cfg.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if on_cpu and trainer_cfg.get("sync_batchnorm"):
        # Even with one rank: DDP still wraps the model, and refuses SyncBatchNorm on CPU modules.
        log.info("trainer.sync_batchnorm=true ignored on the CPU (SyncBatchNorm needs an accelerator)")
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"sync_batchnorm": False})
    strategy = trainer_cfg.get("strategy")
    if strategy is None or int(trainer_cfg.get("devices", 1) or 1) * int(trainer_cfg.get("num_nodes", 1) or 1) <= 1:
        return trainer_cfg
    rerun_ranks_in_this_job()
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
    datamodule = build_datamodule(cfg)
    category_map: CategoryMap = datamodule.category_map
    if resume_from is not None:
        # The anchors the weights were trained with, not a new clustering of (maybe changed) data.
        anchor_shapes, anchor_offset = anchors_from_checkpoint(read_checkpoint(resume_from, allow_unsafe))
        anchor_report = None
        log.info("anchors from the checkpoint %s (no new k-means clustering): %s", resume_from,
                 [len(s) for s in anchor_shapes])
        detector = build_detector(cfg, anchor_shapes, category_map.num_classes, anchor_offset)
    else:
        detector, anchor_report = build_fresh_detector(cfg, datamodule)
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
