"""`python -m anchordet.bench infer` on the CPU at toy sizes: output format and consistency, no timing claims."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from anchordet import bench_infer

TINY = ["--image-size", "64", "--batch-size", "2", "--warmup", "0", "--iters", "1"]


def test_every_case_runs_once_and_ratios_are_to_torchvision_retinanet(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the onnxruntime case needs the export extra: pip install -e '.[export]'")
    out_file = tmp_path / "infer.jsonl"
    records = bench_infer.main(TINY + ["--out", str(out_file)])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()] == records
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == records

    cases = {r["case"]: r for r in records if "case" in r}
    assert list(cases) == list(bench_infer.INFER_CASES)
    for record in cases.values():
        assert (record["image_size"], record["batch_size"], record["device"]) == (64, 2, "cpu")
        assert math.isclose(record["images_per_s"], 2 / record["median_batch_s"])
    ratios = [r for r in records if "ratio" in r]
    assert len(ratios) == len(cases) - 1
    for ratio in ratios:
        top, bottom = ratio["ratio"].split(" / ")
        assert bottom == bench_infer.REFERENCE and top != bottom
        assert math.isclose(ratio["images_per_s_ratio"], cases[top]["images_per_s"] / cases[bottom]["images_per_s"])


def test_without_the_reference_case_there_are_no_ratios(capsys):
    records = bench_infer.main(TINY + ["--cases", "anchordet_yolo_r50_eager"])
    assert [r["case"] for r in records] == ["anchordet_yolo_r50_eager"]


def test_unknown_case_is_rejected_with_the_known_names(capsys):
    with pytest.raises(SystemExit):
        bench_infer.main(["--cases", "yolo_tensorrt"])
    assert "anchordet_yolo_r50_onnxruntime" in capsys.readouterr().err


def test_the_bench_command_dispatches_infer_to_the_inference_benchmark():
    result = subprocess.run([sys.executable, "-m", "anchordet.bench", "infer", *TINY,
                             "--cases", "anchordet_yolo_r50_eager"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["case"] == "anchordet_yolo_r50_eager"
    assert "# inference, 1 cases" in result.stderr
