"""scripts/gpu_check.sh in its CPU mode: every step runs at toy size, writes its JSON line and the
summary table, so the script is known to work before a GPU is ever lent."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_step(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps[:2] == ["gpu tests", "bench"] and steps[-3:] == ["train 1 device", "train ddp 1 device", "fit"]
    assert all(r["status"] == "ok" for r in records), result.stdout[-3000:]
    assert result.returncode == 0
    bench = next(r for r in records if r["step"] == "bench")
    assert "anchordet_yolo_r50" in bench["measured"] and "x" in bench["measured"]
    assert "last.ckpt" in next(r for r in records if r["step"] == "train 1 device")["measured"]
    fit = next(r for r in records if r["step"] == "fit")["measured"]
    assert "anchordet_yolo_kmeans AP50" in fit and "torchvision_retinanet AP50" in fit
    assert "skipped" in records[0]["measured"]  # no CUDA here: the gpu tests skip, with their reason
    assert "step" in result.stdout.splitlines()[-len(records) - 1]  # the summary table's header
