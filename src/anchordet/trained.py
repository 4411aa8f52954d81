"""Commands on a trained checkpoint: evaluate it, predict with it, export it.

`evaluate.py`, `predict.py` and `export.py` compose their configs and call `evaluate(cfg)`,
`predict(cfg)` or `export(cfg)`. Each rebuilds the model from what the checkpoint saved (run config,
anchors, class mapping, weights), so no training override needs retyping:

- `rebuild_module`: the trained module, with inference-time head settings (``head.nms_iou=...``)
  applied over the saved config (unknown keys rejected by name);
- `evaluation_datamodule`: the run's validation data, or any COCO annotation file with the same
  categories (``data.root=...`` or ``data.val_images=... data.val_annotations=...``);
- the three commands and the files they write (see each one).

With Lightning's ``EMAWeightAveraging`` callback in training, the checkpoint's ``state_dict`` holds
the averaged weights (Lightning moves the raw ones to ``current_model_state``), so all three
commands use the EMA weights whenever a run had them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from anchordet.app import (CONFIG_DIR, anchors_from_checkpoint, build_detector, rerun_ranks_in_this_job,
                           user_errors)
from anchordet.checkpointing import read_checkpoint
from anchordet.data import CocoDataModule, collate
from anchordet.data.categories import CategoryMap
from anchordet.distributed import distributed_job_scope
from anchordet.errors import ConfigError
from anchordet.evaluation import format_per_class_table, write_results
from anchordet.export import INPUT_DTYPES, ExportedDetector, compare_outputs, export_model, run_exported
from anchordet.inference import find_images, write_predictions
from anchordet.models.heads.common import DETECTIONS
from anchordet.module import DetectionModule
from anchordet.viz import write_prediction_overlays

log = logging.getLogger("anchordet.trained")

# Keys of evaluate.yaml's `data` that point at other annotated data; the rest adjust the loader.
EVALUATION_DATA_PATHS = ("root", "val_images", "val_annotations")


def override_head(run_cfg: DictConfig, head_overrides: DictConfig | dict | None) -> None:
    """Apply inference-time head settings (e.g. the RPN's ``nms_iou``) to the saved run config.

    Only keys the saved head config already has are accepted: a typo must not be ignored silently.
    The weights do not depend on these settings, so they load unchanged.
    """
    for key, value in OmegaConf.to_container(OmegaConf.create(head_overrides or {})).items():
        if key not in run_cfg.head or key.startswith("_"):
            raise ConfigError(
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


def head_overrides_of(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.get("head") or OmegaConf.create({}))


def load_trained(cfg: DictConfig) -> tuple[dict, DetectionModule]:
    """(checkpoint, module) for a command config with ``ckpt_path``, ``allow_unsafe_checkpoint`` and ``head``."""
    checkpoint = read_checkpoint(cfg.ckpt_path, bool(cfg.get("allow_unsafe_checkpoint", False)))
    return checkpoint, rebuild_module(checkpoint, head_overrides_of(cfg))


def trained_image_size(checkpoint: dict) -> int:
    return int(checkpoint["anchordet"]["run_config"]["data"]["image_size"])


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda when torch sees a GPU, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------- evaluation
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
        loader = {k: given.get(k, run_data.get(k)) for k in ("batch_size", "num_workers")
                  if given.get(k, run_data.get(k)) is not None}
        datamodule = CocoDataModule(**{k: given.get(k) for k in EVALUATION_DATA_PATHS}, image_size=run_data.image_size,
                                    category_map=trained_map, **loader)
    else:
        datamodule = instantiate(OmegaConf.merge(run_data, given))
    if datamodule.category_map != trained_map:
        raise ConfigError(
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
    head_overrides = head_overrides_of(cfg)
    datamodule = evaluation_datamodule(checkpoint, cfg.get("data"))
    module = rebuild_module(checkpoint, head_overrides, cfg.evaluation.backend, str(datamodule.val_annotation_file))
    if cfg.split != "val":
        raise ConfigError(f"split={cfg.split!r}: only 'val' is supported (point data.val_images / "
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
        checkpoint, module = load_trained(cfg)
        return write_predictions(module, find_images(cfg.source), trained_image_size(checkpoint),
                                 Path(cfg.output_dir), resolve_device(cfg.device),
                                 batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
                                 score_threshold=float(cfg.score_threshold),
                                 max_detections=int(cfg.max_detections),
                                 overlays=bool(cfg.overlays), max_overlays=int(cfg.max_overlays))


# ---------------------------------------------------------------------------- export
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


def export(cfg: DictConfig) -> dict:
    """Write `cfg.ckpt_path` as an ONNX or TorchScript model plus its JSON sidecar, then run the file
    once on a test batch beside the eager model and report how far apart they are."""
    with user_errors():
        return _export(cfg)


def _export(cfg: DictConfig) -> dict:
    fmt = str(cfg.format)
    if fmt not in EXPORT_SUFFIXES:
        raise ConfigError(f"format={fmt!r}: use one of {sorted(EXPORT_SUFFIXES)}")
    checkpoint, module = load_trained(cfg)
    image_size = trained_image_size(checkpoint)
    output = Path(cfg.output) if cfg.get("output") else Path(cfg.output_dir) / f"model{EXPORT_SUFFIXES[fmt]}"
    weights = "ema" if "current_model_state" in checkpoint else "trained"
    path, sidecar_path = export_model(module, image_size, output, fmt, batch_size=int(cfg.batch_size),
                                      input_dtype=str(cfg.input_dtype), max_detections=cfg.get("max_detections"),
                                      extra={"checkpoint": str(Path(cfg.ckpt_path).resolve()), "weights": weights})
    report = {"model": str(path), "sidecar": str(sidecar_path), "format": fmt, "weights": weights}
    if cfg.get("check", True):
        wrapper, images = check_batch(module, image_size, int(cfg.batch_size), str(cfg.input_dtype),
                                      cfg.get("max_detections"))
        with torch.no_grad():
            report["check"] = compare_outputs(wrapper(images), run_exported(path, fmt, images))
        log.info("the exported model on a test batch beside PyTorch: %s", report["check"])
    print(f"wrote {path} and {sidecar_path}")
    return report


# ---------------------------------------------------------------------------- module entry points
COMMANDS = {"evaluate": evaluate, "predict": predict, "export": export}


def run_command(name: str) -> None:
    """`python -m anchordet.<name> key=value ...`: the same command as `python <name>.py` in the checkout."""
    import hydra

    if not (CONFIG_DIR / f"{name}.yaml").is_file():
        raise SystemExit(f"error: {CONFIG_DIR / (name + '.yaml')} not found: `python -m anchordet.{name}` "
                         f"needs the project checkout (pip install -e .); or run python {name}.py there")
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=name)(COMMANDS[name])()


def check_batch(module: DetectionModule, image_size: int, batch_size: int, input_dtype: str,
                max_detections: int | None):
    """(eager wrapper, a fixed random pixel batch) for the after-export comparison."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=generator,
                           dtype=torch.uint8).to(INPUT_DTYPES[input_dtype])
    return ExportedDetector(module.cpu().detector, image_size, max_detections).eval(), images
