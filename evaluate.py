"""Evaluate a trained checkpoint: `python evaluate.py ckpt_path=outputs/runs/.../checkpoints/last.ckpt`.

The model is rebuilt from the config, anchors and class mapping stored in the checkpoint, so no
training override needs retyping. Writes `detections.json` (COCO results: original image frame and
category ids) or `proposals.json` for an RPN, and `metrics.json`; prints pycocotools' 12-line summary
and a per-class AP table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from anchordet.data import collate
from anchordet.data.categories import CategoryMap
from anchordet.viz import write_prediction_overlays
from anchordet.evaluation import format_per_class_table, write_results
from anchordet.module import DetectionModule, read_checkpoint
from train import build_detector, distributed_job_scope, rerun_ranks_in_this_job

log = logging.getLogger("anchordet.evaluate")


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
                   head_overrides: DictConfig | dict | None = None):
    """(module with trained weights, datamodule) from a checkpoint written by train.py."""
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
    anchor_shapes = [torch.tensor(s, dtype=torch.float32).reshape(-1, 2) for s in saved["anchor_shapes_per_level"]]
    detector = build_detector(run_cfg, anchor_shapes, trained_map.num_classes, backbone_weights_override=True)
    module = DetectionModule(detector, trained_map, str(datamodule.val_annotation_file),
                             task=saved["task"], run_config=saved["run_config"])
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
    class_names = module.category_map.names if module.task == "detection" else None
    return write_prediction_overlays(images_uint8, predictions, targets, class_names, out_dir, score_threshold)


def run_evaluation(cfg: DictConfig) -> dict:
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
    results_name = "detections.json" if module.task == "detection" else "proposals.json"
    write_results(module.last_results, output_dir / results_name)
    metrics = {"checkpoint": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split,
               "annotation_file": str(module.val_annotation_file),
               "num_images": len(module.last_image_ids),
               "head_overrides": head_overrides,
               **evaluation.metrics}
    if module.task == "detection":
        metrics["per_class_AP"] = evaluation.per_class_ap
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    overlays = write_overlays(module, datamodule, output_dir / "overlays", cfg.num_overlays, cfg.overlay_score_threshold)

    print(evaluation.summary)
    if module.task == "detection":
        print(format_per_class_table(evaluation.per_class_ap))
    print(f"wrote {output_dir / results_name}, {output_dir / 'metrics.json'} and {len(overlays)} overlays "
          f"in {output_dir / 'overlays'}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
