"""Training-step benchmark: this project's detector against torchvision's RetinaNet, in one process.

``python -m anchordet.bench [--device cpu|cuda] [--image-size S] [--batch-size B] ...`` prints one
JSON line per case (median seconds per training step after warm-up, images/s, peak memory) and then
one line per ratio, plus a small table on stderr. ``python -m anchordet.bench infer ...`` is the
inference benchmark instead (eager, TorchScript, onnxruntime; see `anchordet.bench_infer`), and
``python -m anchordet.bench fit ...`` the fit benchmark (AP50 against steps and seconds, ours beside
torchvision's detectors on the same images; see `anchordet.bench_fit`).

Every case trains on the same synthetic batch (fixed seed): B random images of S x S pixels and a
few random ground-truth boxes (xyxy, input pixels) with labels per image. One training step is
``zero_grad -> forward with loss -> backward -> SGD step``, CUDA synchronised before each clock read.

Cases (a new row is one function decorated with ``@benchmark_case``):
    anchordet_yolo_r50         ResNet-50 FPN (P3-P5) + YoloHead + YoloMatcher, via assemble_detector.
                               Anchors: a fixed set of 9 shapes (the YOLOv3 COCO anchors of Redmon &
                               Farhadi 2018, given for 416 px, scaled to S), 3 per level, no k-means,
                               so the timing does not depend on the random boxes.
    torchvision_retinanet_r50  ``retinanet_resnet50_fpn(weights=None, weights_backbone=None)``: P3-P7,
                               trainable BatchNorm everywhere (as our ``norm="batch"``), and a heavier
                               head (4 + 4 convs, no norm). Its GeneralizedRCNNTransform resizes and
                               normalises by itself, so it gets the [0, 1] images as a list and
                               ``min_size = max_size = S``: an S x S image is scaled by exactly 1 (the
                               resize call still runs and counts, as in real torchvision training).
    resnet50_fpn_bare          the same ResNetFPN alone, loss = sum of the level means: what the
                               backbone costs, so the ratio to it shows the head + loss overhead.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the case (weights, gradients, optimizer
state, activations, the shared batch). On CPU it is approximate: the peak resident set size during
the case (Linux ``VmHWM``, reset per case through ``/proc/self/clear_refs``) minus the resident size
before the model was built, after ``malloc_trim`` handed the earlier cases' freed heap back to the
OS. Where that reset is impossible, the growth of ``getrusage``'s ``ru_maxrss``, a lower bound.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn

from anchordet.anchors import grid_anchor_shapes, split_over_levels
from anchordet.assembly import assemble_detector
from anchordet.matching import IoUMatcher, YoloMatcher
from anchordet.models.backbone import ResNetFPN
from anchordet.models.heads.rpn import RpnHead
from anchordet.models.heads.yolo import YoloHead
from anchordet.module import IMAGENET_MEAN, IMAGENET_STD

# YOLOv3's nine COCO anchors (w, h) at 416 px input (Redmon & Farhadi, "YOLOv3", 2018).
YOLOV3_ANCHORS_416 = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119),
                      (116, 90), (156, 198), (373, 326))
BOXES_PER_IMAGE = 4
SEED = 0
# (numerator, denominator) pairs reported as ratio lines when both cases ran.
RATIOS = (("anchordet_yolo_r50", "torchvision_retinanet_r50"), ("anchordet_yolo_r50", "resnet50_fpn_bare"),
          ("anchordet_rpn_r50", "torchvision_rpn_r50"))


@dataclass
class SyntheticBatch:
    """The one batch every case trains on; boxes are xyxy float in input pixels, labels 0..C-1."""
    images_unit: Tensor  # [B, 3, S, S] in [0, 1], for models that normalise by themselves
    images: Tensor  # [B, 3, S, S] ImageNet-normalised, channels_last where asked
    targets: list[dict]  # per image {"boxes": [M, 4], "labels": [M]}
    num_classes: int


def make_batch(batch_size: int, image_size: int, num_classes: int, device: torch.device,
               channels_last: bool, boxes_per_image: int = BOXES_PER_IMAGE) -> SyntheticBatch:
    generator = torch.Generator().manual_seed(SEED)
    images_unit = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
    # Sides between 5% and 50% of the image, centres anywhere; clipping keeps every box inside.
    wh = torch.empty(batch_size, boxes_per_image, 2).uniform_(0.05, 0.5, generator=generator) * image_size
    centre = torch.rand(batch_size, boxes_per_image, 2, generator=generator) * image_size
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=-1).clamp(0, image_size)
    labels = torch.randint(num_classes, (batch_size, boxes_per_image), generator=generator)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    images = ((images_unit - mean) / std).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [{"boxes": b.to(device), "labels": l.to(device)} for b, l in zip(boxes, labels)]
    return SyntheticBatch(images_unit.to(device), images, targets, num_classes)


# A case builds its model (on the CPU, in fp32) and returns it with a closure computing the scalar
# training loss on the batch; the harness moves the model, adds autocast, backward and the SGD step.
CaseBuilder = Callable[[SyntheticBatch], tuple[nn.Module, Callable[[], Tensor]]]
BENCHMARK_CASES: dict[str, CaseBuilder] = {}


def benchmark_case(name: str) -> Callable[[CaseBuilder], CaseBuilder]:
    if name in BENCHMARK_CASES:
        raise ValueError(f"benchmark case {name!r} is registered twice; give the new case another name")
    return lambda builder: BENCHMARK_CASES.setdefault(name, builder)


@benchmark_case("anchordet_yolo_r50")
def yolo_r50(batch: SyntheticBatch):
    image_size = batch.images.shape[-1]
    shapes = torch.tensor(YOLOV3_ANCHORS_416, dtype=torch.float32) * (image_size / 416)
    backbone = ResNetFPN(depth=50, levels=("P3", "P4", "P5"))
    head_factory = functools.partial(YoloHead, tower_depth=2, norm="group")  # conf/head/yolo.yaml
    detector = assemble_detector(backbone, head_factory, split_over_levels(shapes, 3), YoloMatcher(),
                                 batch.num_classes)
    return detector, lambda: detector.loss(batch.images, batch.targets)["loss"]


@benchmark_case("torchvision_retinanet_r50")
def retinanet_r50(batch: SyntheticBatch):
    image_size = batch.images.shape[-1]
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=batch.num_classes,
        min_size=image_size, max_size=image_size)  # scale 1: keeps the S x S input size
    images = list(batch.images_unit)
    return model, lambda: sum(model(images, batch.targets).values())


@benchmark_case("resnet50_fpn_bare")
def bare_r50_fpn(batch: SyntheticBatch):
    backbone = ResNetFPN(depth=50, levels=("P3", "P4", "P5"))
    return backbone, lambda: sum(level.float().mean() for level in backbone(batch.images))


@benchmark_case("anchordet_rpn_r50")
def rpn_r50(batch: SyntheticBatch):
    # conf/head/rpn.yaml + conf/anchor/rpn_grid.yaml: P2-P6, sizes 32..512, ratios 0.5, 1, 2.
    backbone = ResNetFPN(depth=50, levels=("P2", "P3", "P4", "P5", "P6"))
    shapes = grid_anchor_shapes([[32], [64], [128], [256], [512]], [0.5, 1.0, 2.0])
    detector = assemble_detector(backbone, RpnHead, shapes, IoUMatcher(), batch.num_classes)
    return detector, lambda: detector.loss(batch.images, batch.targets)["loss"]


@benchmark_case("torchvision_rpn_r50")
def torchvision_rpn_r50(batch: SyntheticBatch):
    """torchvision's Faster R-CNN with only its transform, backbone and RPN run (no RoI heads)."""
    image_size = batch.images.shape[-1]
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=batch.num_classes,
        min_size=image_size, max_size=image_size)  # scale 1: keeps the S x S input size
    images = list(batch.images_unit)

    def rpn_loss():
        image_list, targets = model.transform(images, batch.targets)
        features = model.backbone(image_list.tensors)
        _, losses = model.rpn(image_list, features, targets)
        return sum(losses.values())

    return model, rpn_loss


class PeakMemory:
    """Peak memory of one case in MiB (see the module docstring for what it counts)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        _release_freed_heap()
        self.rss_before_kib = _proc_status_kib("VmRSS")
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS, Linux >= 4.0
            Path("/proc/self/clear_refs").write_text("5")
            self.use_hwm = self.rss_before_kib is not None and _proc_status_kib("VmHWM") is not None
        except OSError:
            self.use_hwm = False
        self.maxrss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.use_hwm:
            return max(_proc_status_kib("VmHWM") - self.rss_before_kib, 0) / 1024
        if sys.platform != "linux":
            return None  # ru_maxrss is in bytes on macOS, unknown units elsewhere
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss_before_kib) / 1024


def _release_freed_heap() -> None:
    """Give memory freed by earlier cases back to the OS (glibc keeps it, which would hide the next
    case's peak behind an already high resident size)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the CPU peak is then only a lower bound
        pass


def _proc_status_kib(field: str) -> int | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith(field + ":")), None)


def run_case(name: str, batch: SyntheticBatch, args: argparse.Namespace) -> dict:
    device, memory = batch.images.device, PeakMemory(batch.images.device)
    torch.manual_seed(SEED)  # same initial weights on every run
    model, compute_loss = BENCHMARK_CASES[name](batch)
    model.to(device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()  # in place; the warm-up steps absorb the compilation
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = compute_loss()
        loss.backward()
        optimizer.step()

    # CUDA runs asynchronously: without a sync the clock would time the kernel launches only.
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None
    durations = []
    for iteration in range(args.warmup + args.iters):
        sync()
        start = time.perf_counter()
        train_step()
        sync()
        if iteration >= args.warmup:
            durations.append(time.perf_counter() - start)
    peak_mb = memory.peak_mb()
    del model, optimizer, compute_loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    median = statistics.median(durations)
    return {"case": name, "device": device.type, "precision": args.precision, "compile": bool(args.compile),
            "image_size": args.image_size, "batch_size": args.batch_size,
            "boxes_per_image": args.boxes_per_image, "median_step_s": median,
            "images_per_s": args.batch_size / median,
            "peak_mem_mb": None if peak_mb is None else round(peak_mb, 1)}


def ratio_records(case_records: list[dict]) -> list[dict]:
    by_name = {record["case"]: record for record in case_records}
    ratios = []
    for numerator, denominator in RATIOS:
        if numerator in by_name and denominator in by_name:
            top, bottom = by_name[numerator], by_name[denominator]
            mems = top["peak_mem_mb"], bottom["peak_mem_mb"]
            mem = mems[0] / mems[1] if all(mems) else None
            ratios.append({"ratio": f"{numerator} / {denominator}",
                           "images_per_s_ratio": top["images_per_s"] / bottom["images_per_s"],
                           "median_step_s_ratio": top["median_step_s"] / bottom["median_step_s"],
                           "peak_mem_ratio": mem})
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m anchordet.bench", description=__doc__.split("\n")[0],
                                     epilog="python -m anchordet.bench infer --help: the inference benchmark; "
                                            "python -m anchordet.bench fit --help: the fit benchmark")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--image-size", type=int, help="S; default 640 on cuda, 256 on cpu")
    parser.add_argument("--batch-size", type=int, help="B; default 16 on cuda, 2 on cpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--iters", type=int, help="timed steps; default 10 on cuda, 5 on cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on cuda, fp32 on cpu")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--boxes-per-image", type=int, default=BOXES_PER_IMAGE,
                        help="ground-truth boxes per image (matching cost grows with it)")
    parser.add_argument("--cases", default=",".join(BENCHMARK_CASES),
                        help=f"comma-separated subset of {','.join(BENCHMARK_CASES)}")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for cuda, off for cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (inductor)")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    args.device = resolve_device(parser, args.device)
    on_cuda = args.device == "cuda"
    args.image_size = args.image_size or (640 if on_cuda else 256)
    args.batch_size = args.batch_size or (16 if on_cuda else 2)
    args.iters = args.iters or (10 if on_cuda else 5)
    if args.precision == "auto":
        args.precision = "bf16" if on_cuda else "fp32"
    if args.channels_last is None:
        args.channels_last = on_cuda
    args.cases = chosen_names(parser, "--cases", args.cases, BENCHMARK_CASES)
    if min(args.image_size, args.batch_size, args.iters, args.boxes_per_image) < 1 or args.warmup < 0:
        parser.error("--image-size, --batch-size, --iters and --boxes-per-image must be >= 1, --warmup >= 0")
    return args


def resolve_device(parser: argparse.ArgumentParser, device: str) -> str:
    """``--device auto|cpu|cuda`` -> "cpu" or "cuda"; a parser error when CUDA is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu")
    return device


def chosen_names(parser: argparse.ArgumentParser, option: str, value: str, registry: dict) -> list[str]:
    """A comma-separated list of registered names; a parser error naming the known ones otherwise."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in registry]
    if unknown or not names:
        parser.error(f"{option}: unknown or empty {unknown}; choose from {list(registry)}")
    return names


def print_table(records: list[dict]) -> None:
    lines = [f"{'case':28} {'step s':>8} {'images/s':>9} {'peak MiB':>9}"]
    for r in records:
        if "case" in r:
            mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            lines.append(f"{r['case']:28} {r['median_step_s']:8.3f} {r['images_per_s']:9.2f} {mem:>9}")
        else:
            lines.append(f"{r['ratio']}: images/s x{r['images_per_s_ratio']:.3f}")
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the chosen cases; print and return the case records followed by the ratio records."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one fixed input size: autotune once, in warm-up
    batch = make_batch(args.batch_size, args.image_size, args.num_classes, device, args.channels_last,
                       args.boxes_per_image)
    print(f"# {len(args.cases)} cases, B={args.batch_size}, S={args.image_size}, {args.precision}, "
          f"{device.type}, torch {torch.__version__}, torchvision {torchvision.__version__}", file=sys.stderr)
    records = run_cases(args.cases, lambda name: run_case(name, batch, args))
    records += emit(ratio_records(records))
    write_records(records, args.out)
    print_table(records)
    return records


def emit(records: list[dict]) -> list[dict]:
    """Print each record as one JSON line on stdout (as it comes, so a long run shows progress)."""
    for record in records:
        print(json.dumps(record), flush=True)
    return records


def run_cases(names: list[str], run_one: Callable[[str], dict]) -> list[dict]:
    """``run_one(name)`` for each case in turn, each record printed as soon as it is measured."""
    return [emit([run_one(name)])[0] for name in names]


def write_records(records: list[dict], out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(record) + "\n" for record in records))


if __name__ == "__main__":
    # The inference and fit benchmarks are modules of their own.
    if sys.argv[1:2] == ["infer"]:
        from anchordet.bench_infer import main as infer_main

        infer_main(sys.argv[2:])
    elif sys.argv[1:2] == ["fit"]:
        from anchordet.bench_fit import main as fit_main

        fit_main(sys.argv[2:])
    else:
        main()
