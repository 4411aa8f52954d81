"""One prepared run of every check that needs a GPU; `scripts/gpu_check.sh` sets up and calls this.

    bash scripts/gpu_check.sh            # on a GPU machine: about 8-10 minutes
    bash scripts/gpu_check.sh --cpu      # the same steps at toy sizes on the CPU (the test suite runs it)

Steps, each in its own process with its own time limit (a step that fails or times out is
reported and the next one runs):

1. the GPU-marked tests (`pytest -m gpu`): bf16 step with channels_last, NCCL with one process,
   the compile option;
2. `python -m anchordet.bench` at 640 px / batch 16 / bf16 beside torchvision, then again compiled;
3. the training loader's throughput on coco128 with 8 and 16 workers (`scripts/bench_loader.py`);
4. `train.py trainer=gpu data=coco` for 30 steps on coco128 (val = train): bf16, checkpoints, events;
5. `train.py trainer=ddp trainer.devices=1` for 20 steps: NCCL and the DDP paths on one GPU;
6. a 3-minute fit of ours against torchvision RetinaNet on coco128 (`python -m anchordet.bench fit`,
   640 px, batch 16, bf16, ResNet-50, 300 steps each, 4 evaluation marks).

Writes `gpu_check.jsonl` (one record per step: name, status, seconds, what it measured) and each
step's log under ``$OUT`` (or ``--out``), and prints one summary table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO128_CANDIDATES = (REPO / ".data" / "coco128", REPO.parent / "shared" / "data" / "coco128")


# The fit step's pair: our default single-stage model and the peer of the reference table.
FIT_MODELS = "anchordet_yolo_kmeans,torchvision_retinanet"


def coco128_root() -> Path | None:
    return next((p for p in COCO128_CANDIDATES if (p / "annotations" / "instances_train2017.json").is_file()), None)


def coco_overrides(root: Path, image_size: int, batch_size: int) -> list[str]:
    images, annotations = root / "train2017", root / "annotations" / "instances_train2017.json"
    return ["data=coco", f"data.train_images={images}", f"data.train_annotations={annotations}",
            f"data.val_images={images}", f"data.val_annotations={annotations}",
            f"data.image_size={image_size}", f"data.batch_size={batch_size}"]


def steps(cpu: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of every step, sized for a GPU or toy-sized for a CPU."""
    python = sys.executable
    root = coco128_root()
    quiet = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "callbacks.feature_pictures=null"]
    if cpu:
        bench = [python, "-m", "anchordet.bench", "--device", "cpu", "--image-size", "64", "--batch-size", "2",
                 "--warmup", "0", "--iters", "1", "--cases", "anchordet_yolo_r50,resnet50_fpn_bare"]
        train_size = ["experiment=tiny", "trainer.max_steps=2"]
        listed = [
            ("gpu tests", [python, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], 300),
            ("bench", [*bench, "--out", str(out / "bench.jsonl")], 300),
            ("train 1 device", [python, "train.py", *train_size, f"hydra.run.dir={out / 'run_gpu'}"], 300),
            ("train ddp 1 device", [python, "train.py", *train_size, "trainer=ddp", "trainer.devices=1",
                                    "trainer.accelerator=cpu", *quiet, f"hydra.run.dir={out / 'run_ddp'}"], 300),
        ]
        fit_data = ["--data", "tiny"] if root is None else ["--data", str(root)]
        listed.append(("fit", [python, "-m", "anchordet.bench", "fit", *fit_data, "--image-size", "64",
                               "--batch-size", "2", "--steps", "2", "--marks", "2", "--workers", "0",
                               "--models", FIT_MODELS, "--out", str(out / "fit")], 300))
        if root is not None:
            listed.insert(2, ("loader", [python, "scripts/bench_loader.py", "--root", str(root), "--workers", "0",
                                         "--epochs", "1", "--image-size", "128", "--batch-size", "8"], 300))
        return listed
    coco = coco_overrides(root, 640, 16) if root is not None else ["experiment=tiny"]
    listed = [
        ("gpu tests", [python, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], 150),
        ("bench", [python, "-m", "anchordet.bench", "--out", str(out / "bench.jsonl")], 150),
        ("bench compiled", [python, "-m", "anchordet.bench", "--compile", "--cases",
                            "anchordet_yolo_r50,resnet50_fpn_bare", "--out", str(out / "bench_compiled.jsonl")], 150),
        ("train 1 device", [python, "train.py", "trainer=gpu", *coco, "trainer.max_steps=30", *quiet,
                            "trainer.check_val_every_n_epoch=1", "data.num_workers=8",
                            f"hydra.run.dir={out / 'run_gpu'}"], 120),
        ("train ddp 1 device", [python, "train.py", "trainer=ddp", "trainer.devices=1", *coco,
                                "trainer.max_steps=20", *quiet, "data.num_workers=8",
                                f"hydra.run.dir={out / 'run_ddp'}"], 120),
    ]
    fit_data = ["--data", "synthetic"] if root is None else ["--data", str(root)]
    listed.append(("fit", [python, "-m", "anchordet.bench", "fit", *fit_data, "--steps", "300", "--marks", "4",
                           "--workers", "8", "--models", FIT_MODELS, "--out", str(out / "fit")], 200))
    if root is not None:
        listed.insert(3, ("loader", [python, "scripts/bench_loader.py", "--root", str(root), "--workers", "8,16"], 90))
    return listed


def run_step(name: str, command: list[str], limit: int, out: Path) -> dict:
    log_path = out / f"{name.replace(' ', '_')}.log"
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=limit).returncode
            status = "ok" if code == 0 else f"failed ({code})"
        except subprocess.TimeoutExpired:
            status = f"timeout ({limit} s)"
    record = {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1),
              "command": " ".join(command[1:]), "log": str(log_path)}
    record["measured"] = measured(name, log_path.read_text(errors="replace"), out)
    return record


def measured(name: str, log: str, out: Path) -> str:
    """The numbers a step is for, read back from what it wrote."""
    if name.startswith("bench"):
        path = out / ("bench.jsonl" if name == "bench" else "bench_compiled.jsonl")
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        return "; ".join(f"{r['case']} {r['images_per_s']:.1f} img/s" if "case" in r else
                         f"{r['ratio']} x{r['images_per_s_ratio']:.2f}" for r in records)
    if name == "loader":
        return "; ".join(f"{r['workers']} workers {r['images_per_s']} img/s"
                         for r in (json.loads(line) for line in log.splitlines() if line.startswith("{")))
    if name.startswith("train"):
        run = out / ("run_gpu" if name == "train 1 device" else "run_ddp")
        checkpoints = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
        events = list((run / "tensorboard").glob("events.out.tfevents.*")) if (run / "tensorboard").is_dir() else []
        return f"checkpoints {checkpoints}, {len(events)} event file(s)"
    if name == "fit":
        path = out / "fit" / "fit.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        last = {r["model"]: r for r in rows if "step" in r and "AP50" in r}
        return "; ".join(f"{m} AP50 {r['AP50']:.3f} at step {r['step']} ({r['train_seconds']:.0f} s)"
                         for m, r in last.items())
    if name == "gpu tests":
        return (log.strip().splitlines() or [""])[-1]
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="toy-sized steps on the CPU (checks the script itself)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for name, command, limit in steps(args.cpu, args.out):
        print(f"== {name} (at most {limit} s)", flush=True)
        records.append(run_step(name, command, limit, args.out))
        with open(args.out / "gpu_check.jsonl", "a") as handle:
            handle.write(json.dumps(records[-1]) + "\n")
    width = max(len(r["step"]) for r in records)
    print(f"\n{'step':{width}}  {'status':14} {'seconds':>8}  measured")
    for r in records:
        print(f"{r['step']:{width}}  {r['status']:14} {r['seconds']:8.1f}  {r['measured']}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
