"""Inference benchmark: the single-stage detector eager, as TorchScript and in onnxruntime, beside
torchvision's RetinaNet eager, in one process on the same pixels.

``python -m anchordet.bench infer [--image-size S] [--batch-size B] [--iters N] [--out FILE]`` prints
one JSON line per case (median seconds per batch after warm-up, images/s) and one per ratio to
torchvision RetinaNet eager, plus a small table on stderr. CPU only: onnxruntime runs its CPU
provider, and the eager and TorchScript cases run with torch's default CPU threads.

Shape glossary: B images per batch, S the input side (square, as the trained letterbox), D the
detections kept per image.

What one timed call does, for every case, from the same uint8 batch ``[B, 3, S, S]``:
    anchordet_yolo_r50_eager        `ExportedDetector` run as PyTorch: normalise, ResNet-50 FPN P3-P5 +
                                    YoloHead (the training benchmark's model and anchors), decode,
                                    top-k 1000 per image, class-wise NMS, padded [B, D] outputs;
    anchordet_yolo_r50_torchscript  the same wrapper traced, saved and loaded with `torch.jit.load`;
    anchordet_yolo_r50_onnxruntime  the same wrapper exported as `anchordet.export` does (opset 17),
                                    run in an onnxruntime CPU session (graph optimisations on);
    torchvision_retinanet_r50_eager ``retinanet_resnet50_fpn`` in eval mode on the batch as a list of
                                    [0, 1] images (the /255 counted): its transform (normalise, resize
                                    at scale 1), backbone P3-P7, head, per-level top-k, NMS.

All weights are random (seeded), so this measures cost, not detections: our exported graph always
sends its top 1000 candidates per image through NMS (fixed shapes), while torchvision drops the
candidates under its score threshold first, which with random weights leaves it very few.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor

from anchordet.bench import BENCHMARK_CASES, SEED, chosen_names, emit, make_batch, run_cases, write_records
from anchordet.export import ExportedDetector, onnx_session, write_exported

REFERENCE = "torchvision_retinanet_r50_eager"
# A case gets the uint8 batch and a scratch folder and returns the function one timed call runs.
InferBuilder = Callable[[Tensor, Path], Callable[[Tensor], object]]
INFER_CASES: dict[str, InferBuilder] = {}


def infer_case(name: str) -> Callable[[InferBuilder], InferBuilder]:
    if name in INFER_CASES:
        raise ValueError(f"inference case {name!r} is registered twice; give the new case another name")
    return lambda builder: INFER_CASES.setdefault(name, builder)


def _yolo_wrapper(pixels: Tensor) -> ExportedDetector:
    """The training benchmark's single-stage model (same anchors, head and class count), wrapped."""
    torch.manual_seed(SEED)
    batch = make_batch(pixels.shape[0], pixels.shape[-1], 80, torch.device("cpu"), channels_last=False)
    detector, _ = BENCHMARK_CASES["anchordet_yolo_r50"](batch)
    return ExportedDetector(detector, pixels.shape[-1]).eval()


@infer_case("anchordet_yolo_r50_eager")
def yolo_eager(pixels: Tensor, scratch: Path):
    return _yolo_wrapper(pixels)


@infer_case("anchordet_yolo_r50_torchscript")
def yolo_torchscript(pixels: Tensor, scratch: Path):
    path = scratch / "model.pt"
    write_exported(_yolo_wrapper(pixels), pixels, path, "torchscript")
    return torch.jit.load(str(path), map_location="cpu")


@infer_case("anchordet_yolo_r50_onnxruntime")
def yolo_onnxruntime(pixels: Tensor, scratch: Path):
    path = scratch / "model.onnx"
    write_exported(_yolo_wrapper(pixels), pixels, path, "onnx")
    session = onnx_session(path)
    return lambda images: session.run(None, {"images": images.numpy()})


@infer_case(REFERENCE)
def retinanet_eager(pixels: Tensor, scratch: Path):
    torch.manual_seed(SEED)
    batch = make_batch(pixels.shape[0], pixels.shape[-1], 80, torch.device("cpu"), channels_last=False)
    model, _ = BENCHMARK_CASES["torchvision_retinanet_r50"](batch)
    model.eval()
    return lambda images: model(list(images.float() / 255))


def run_infer_case(name: str, pixels: Tensor, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="anchordet-bench-") as scratch:
        infer = INFER_CASES[name](pixels, Path(scratch))
        durations = []
        with torch.inference_mode():
            for iteration in range(args.warmup + args.iters):
                start = time.perf_counter()
                infer(pixels)
                if iteration >= args.warmup:
                    durations.append(time.perf_counter() - start)
    median = statistics.median(durations)
    return {"case": name, "device": "cpu", "image_size": args.image_size, "batch_size": args.batch_size,
            "median_batch_s": median, "images_per_s": args.batch_size / median,
            "torch_threads": torch.get_num_threads()}


def parse_infer_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m anchordet.bench infer", description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=256, help="S (the default training letterbox)")
    parser.add_argument("--batch-size", type=int, default=1, help="B")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--iters", type=int, default=10, help="timed calls")
    parser.add_argument("--cases", default=",".join(INFER_CASES),
                        help=f"comma-separated subset of {','.join(INFER_CASES)}")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    args.cases = chosen_names(parser, "--cases", args.cases, INFER_CASES)
    if min(args.image_size, args.batch_size, args.iters) < 1 or args.warmup < 0:
        parser.error("--image-size, --batch-size and --iters must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str]) -> list[dict]:
    """Run the chosen inference cases; print and return their records, then the ratio records."""
    args = parse_infer_args(argv)
    generator = torch.Generator().manual_seed(SEED)
    pixels = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), generator=generator,
                           dtype=torch.uint8)
    print(f"# inference, {len(args.cases)} cases, B={args.batch_size}, S={args.image_size}, cpu, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}", file=sys.stderr)
    records = run_cases(args.cases, lambda name: run_infer_case(name, pixels, args))
    reference = next((r for r in records if r["case"] == REFERENCE), None)
    if reference is not None:
        records += emit([{"ratio": f"{r['case']} / {REFERENCE}",
                          "images_per_s_ratio": r["images_per_s"] / reference["images_per_s"]}
                         for r in records if r is not reference])
    write_records(records, args.out)
    lines = [f"{'case':34} {'batch s':>8} {'images/s':>9}"]
    lines += [f"{r['case']:34} {r['median_batch_s']:8.4f} {r['images_per_s']:9.2f}" if "case" in r
              else f"{r['ratio']}: images/s x{r['images_per_s_ratio']:.3f}" for r in records]
    print("\n".join(lines), file=sys.stderr)
    return records
