"""Fit benchmark: which detector reaches a good mAP sooner on the same images, steps and machine.

    python -m anchordet.bench fit [--data coco128|synthetic|DIR] [--models a,b,...] [--steps N]
                                  [--marks K | --marks s1,s2,...] [--image-size S] [--batch-size B]
                                  [--depth 18|34|50|101] [--weights FILE] [--out DIR]

One invocation trains the chosen models one after the other (`anchordet.bench_fit_models`: ours with
k-means and with same-k grid anchors, our RPN, torchvision's RetinaNet, FCOS and RPN) with one loop
for all: the same loader (ours, with its augmentation; order and flips depend only on the seed and
the epoch, so every model sees the same batches), the same optimiser, schedule and gradient clipping
(``conf/optim`` and ``conf/trainer`` of ours: SGD with Nesterov momentum, warm-up then cosine over
the step budget, norm and bias parameters without weight decay, clip at 10), the same precision (fp32
on the CPU, bf16 autocast on CUDA) and the same initial seed. At each step mark every model is
evaluated with the same COCOeval call (pycocotools by default) against the same annotation file:
AP and AP50 for detectors, class-agnostic AR@100/300/1000 for proposal models. The clock counts
training only (loading batches included); evaluation time is reported beside it.

Data: ``coco128`` = ``../shared/data/coco128`` (train2017 images, val = train: a fit of 128 real
images), a folder in the COCO 2017 layout (``data.root``), ``synthetic`` (the built-in set) or
``tiny`` (its toy version, for tests).

Output: one JSON line per (model, mark) on stdout and in ``DIR/fit.jsonl``, one per model with its
setup, and ``DIR/fit.png``: AP50 (AR@1000 for proposal models, dashed) against step and against
training seconds, every model on the same axes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torchvision

from anchordet.app import compose_train_config, optimisation_recipe
from anchordet.bench import chosen_names, resolve_device
from anchordet.bench_fit_models import FIT_MODELS, FitModel, FitSetup, shared_datamodule
from anchordet.data.transforms import to_original_frame
from anchordet.evaluation import BACKENDS, evaluate_detections, evaluate_proposals, to_coco_results
from anchordet.models.heads.common import DETECTIONS
from anchordet.module import decay_parameter_groups

COCO128 = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128"
DEFAULT_MODELS = ("anchordet_yolo_kmeans", "anchordet_yolo_grid", "anchordet_rpn",
                  "torchvision_retinanet", "torchvision_fcos", "torchvision_rpn")
# Per device: (image size, batch, depth, steps). The CPU default keeps each model well under 20
# minutes on 2 cores; the CUDA one is the H100 setting of the reference table.
DEVICE_DEFAULTS = {"cpu": (256, 8, 18, 300), "cuda": (640, 16, 50, 2000)}


def data_overrides(data: str, image_size: int, batch_size: int, workers: int) -> list[str]:
    if data in ("synthetic", "tiny"):
        chosen = [f"data={data}"]
    else:
        root = COCO128 if data == "coco128" else Path(data)
        if not (root / "annotations" / "instances_train2017.json").is_file():
            raise SystemExit(f"error: --data {data}: {root}/annotations/instances_train2017.json not found "
                             "(a COCO 2017 layout folder, coco128, synthetic or tiny)")
        images, annotations = root / "train2017", root / "annotations" / "instances_train2017.json"
        # val = train: how well each model fits the same 128 real images.
        chosen = ["data=coco", f"data.train_images={images}", f"data.train_annotations={annotations}",
                  f"data.val_images={images}", f"data.val_annotations={annotations}"]
    return chosen + [f"data.image_size={image_size}", f"data.batch_size={batch_size}",
                     f"data.num_workers={workers}"]


def step_marks(spec: str, steps: int) -> list[int]:
    """``"K"`` -> K marks evenly spaced up to `steps`; ``"a,b,c"`` -> those steps (<= steps)."""
    if "," not in spec:
        count = int(spec)
        return sorted({max(1, round(steps * k / count)) for k in range(1, count + 1)})
    return sorted({int(s) for s in spec.split(",") if s.strip()})


def to_device(batch, device: torch.device):
    images, targets = batch
    return images.to(device, non_blocking=True), [
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def endless_batches(loader):
    """The training loader epoch after epoch, the epoch told to the sampler as Lightning would."""
    for epoch in itertools.count():
        loader.sampler.current_epoch = lambda epoch=epoch: epoch
        yield from loader


@torch.no_grad()
def evaluate(model: FitModel, loader, category_ids: list[int], annotation_file: str, args) -> dict:
    model.network.eval()
    results, image_ids = [], []
    ids = category_ids if model.task == DETECTIONS else category_ids[:1]
    for batch in loader:
        images, targets = to_device(batch, args.device)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            predictions = model.predict(images)
        for prediction, target in zip(predictions, targets):
            boxes = to_original_frame(prediction["boxes"].float(), target)
            results += to_coco_results(boxes, prediction["scores"], prediction["labels"], target["image_id"], ids)
            image_ids.append(int(target["image_id"]))
    model.network.train()
    if model.task == DETECTIONS:
        metrics = evaluate_detections(annotation_file, results, image_ids, backend=args.eval_backend).metrics
        return {"AP": metrics["mAP"], "AP50": metrics["mAP_50"], "AP75": metrics["mAP_75"]}
    return evaluate_proposals(annotation_file, results, image_ids, backend=args.eval_backend).metrics


def fit(name: str, setup: FitSetup, recipe: dict, args) -> list[dict]:
    """Train one model for `args.steps` steps, evaluating at each mark; its JSON rows."""
    torch.manual_seed(args.seed)  # the same initial weights on every run of a model
    model = FIT_MODELS[name](setup)
    model.network.train()
    optimizer = recipe["optimizer"](decay_parameter_groups(model.network))
    scheduler = recipe["scheduler"](optimizer, total_steps=args.steps)
    datamodule = setup.datamodule
    category_ids, annotation_file = datamodule.category_map.category_ids, str(datamodule.val_annotation_file)
    val_loader = datamodule.val_dataloader()
    sync = (lambda: torch.cuda.synchronize(args.device)) if args.device.type == "cuda" else (lambda: None)
    header = {"model": name, "task": model.task, "setup": args.setup, **model.notes}
    rows, train_seconds, losses = [emit(header)], 0.0, []
    batches = endless_batches(datamodule.train_dataloader())
    for step in range(1, args.steps + 1):
        sync()
        start = time.perf_counter()
        batch = to_device(next(batches), args.device)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe["gradient_clip_val"]:
            torch.nn.utils.clip_grad_norm_(model.network.parameters(), recipe["gradient_clip_val"])
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
        sync()
        train_seconds += time.perf_counter() - start
        if step in args.marks:
            mean_loss = torch.stack(losses).float().mean().item()
            losses = []
            row = {"model": name, "step": step, "images_seen": step * args.batch_size,
                   "train_seconds": round(train_seconds, 2), "loss": mean_loss}
            if not math.isfinite(mean_loss):  # diverged: no point in evaluating or going on
                rows.append(emit({**row, "diverged": True}))
                break
            eval_start = time.perf_counter()
            row.update(evaluate(model, val_loader, category_ids, annotation_file, args))
            rows.append(emit({**row, "eval_seconds": round(time.perf_counter() - eval_start, 2)}))
    del model, optimizer
    return rows


def summary_table(rows: list[dict]) -> str:
    """A markdown table: one row per model, one column per mark, each cell the headline metric
    (AP50, or AR@1000 for proposal models) and the training seconds it took to get there."""
    marks = sorted({row["step"] for row in rows if "step" in row})
    lines = ["| model | metric | " + " | ".join(f"step {m}" for m in marks) + " |",
             "|---|---|" + "---|" * len(marks)]
    for model in dict.fromkeys(row["model"] for row in rows):
        by_step = {row["step"]: row for row in rows if row["model"] == model and "step" in row}
        metric = "AP50" if any("AP50" in row for row in by_step.values()) else "AR@1000"
        cells = [f"{by_step[m][metric]:.3f} ({by_step[m]['train_seconds']:.0f} s)" if metric in by_step.get(m, {})
                 else ("diverged" if by_step.get(m, {}).get("diverged") else "-") for m in marks]
        lines.append(f"| {model} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m anchordet.bench fit", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="coco128", help="coco128, synthetic, tiny, or a COCO 2017 layout folder")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {list(FIT_MODELS)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, help="optimiser steps per model (default: 300 cpu, 2000 cuda)")
    parser.add_argument("--marks", default="6", help="K evenly spaced evaluation steps, or a list s1,s2,...")
    parser.add_argument("--image-size", type=int, help="S (default 256 cpu, 640 cuda)")
    parser.add_argument("--batch-size", type=int, help="B (default 8 cpu, 16 cuda)")
    parser.add_argument("--depth", type=int, choices=(18, 34, 50, 101), help="ResNet depth (default 18 cpu, 50 cuda)")
    parser.add_argument("--weights", type=Path, help="a local torchvision ResNet state dict for every backbone")
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument("--eval-backend", choices=BACKENDS, default="pycocotools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[],
                        help="extra Hydra override for ours, e.g. --override head.box_weight=2 (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_fit"), help="folder for fit.jsonl and fit.png")
    args = parser.parse_args(argv)
    args.device = resolve_device(parser, args.device)
    size, batch, depth, steps = DEVICE_DEFAULTS[args.device]
    args.image_size, args.batch_size = args.image_size or size, args.batch_size or batch
    args.depth, args.steps = args.depth or depth, args.steps or steps
    args.device, args.bf16 = torch.device(args.device), args.device == "cuda"
    args.models = chosen_names(parser, "--models", args.models, FIT_MODELS)
    if min(args.steps, args.image_size, args.batch_size) < 1 or args.workers < 0:
        parser.error("--steps, --image-size and --batch-size must be >= 1, --workers >= 0")
    try:
        args.marks = [m for m in step_marks(args.marks, args.steps) if 1 <= m <= args.steps]
    except ValueError:
        parser.error(f"--marks {args.marks!r}: a count or a comma-separated list of steps")
    if not args.marks:
        parser.error(f"--marks: no step between 1 and --steps {args.steps}")
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    overrides = data_overrides(args.data, args.image_size, args.batch_size, args.workers)
    overrides += [f"backbone=resnet{args.depth}", f"seed={args.seed}"]
    if args.weights is not None:
        overrides.append(f"backbone.weights={args.weights.resolve()}")
    overrides += args.override
    args.setup = {"data": args.data, "device": args.device.type, "image_size": args.image_size,
                  "batch_size": args.batch_size, "depth": args.depth, "steps": args.steps, "marks": args.marks,
                  "precision": "bf16" if args.bf16 else "fp32", "weights": str(args.weights) if args.weights else None,
                  "eval_backend": args.eval_backend, "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    datamodule = shared_datamodule(overrides, args.out / "data")
    recipe = optimisation_recipe(compose_train_config(overrides, args.out / "data"))
    setup = FitSetup(overrides, datamodule, datamodule.category_map.num_classes, args.image_size, args.depth,
                     args.device, args.out, args.weights, channels_last=args.device.type == "cuda")
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size: autotune once
    print(f"# fit benchmark: {', '.join(args.models)}; {args.steps} steps, marks {args.marks}, "
          f"{args.data} at {args.image_size} px, batch {args.batch_size}, ResNet-{args.depth}", file=sys.stderr)
    rows = []
    for name in args.models:
        rows += fit(name, setup, recipe, args)
        (args.out / "fit.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    from anchordet.plots import fit_curves_figure

    fit_curves_figure(rows).savefig(args.out / "fit.png")
    print(summary_table(rows), file=sys.stderr)
    print(f"# wrote {args.out / 'fit.jsonl'} and {args.out / 'fit.png'}", file=sys.stderr)
    return rows
