"""`python -m anchordet.bench fit` at toy sizes: every model trains, is evaluated at each mark and is
plotted; the harness feeds every model the same batches. No accuracy or speed claims here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from anchordet import bench_fit
from anchordet.bench_fit_models import FIT_MODELS, shared_datamodule

COCO128 = bench_fit.COCO128
TINY = ["--data", "tiny", "--image-size", "64", "--batch-size", "4", "--steps", "2", "--marks", "1,2",
        "--workers", "0"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the synthetic set and the anchor cache go under ./outputs
    return tmp_path


def test_step_marks_spread_evenly_or_as_listed():
    assert bench_fit.step_marks("3", 10) == [3, 7, 10]
    assert bench_fit.step_marks("1", 5) == [5]
    assert bench_fit.step_marks("4,2,4", 10) == [2, 4]


def test_every_model_is_trained_evaluated_at_each_mark_and_plotted(in_tmp, capsys):
    rows = bench_fit.main(TINY + ["--models", ",".join(FIT_MODELS), "--out", str(in_tmp / "fit")])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows
    assert [json.loads(line) for line in (in_tmp / "fit" / "fit.jsonl").read_text().splitlines()] == rows

    for name in FIT_MODELS:
        header, *marks = [row for row in rows if row["model"] == name]
        assert header["setup"]["steps"] == 2 and header["setup"]["image_size"] == 64
        assert [row["step"] for row in marks] == [1, 2], name
        assert [row["images_seen"] for row in marks] == [4, 8]
        assert 0 < marks[0]["train_seconds"] < marks[1]["train_seconds"]
        metrics = ("AP", "AP50") if header["task"] == "detections" else ("AR@100", "AR@300", "AR@1000")
        for row in marks:
            assert math.isfinite(row["loss"])
            assert all(0.0 <= row[m] <= 1.0 for m in metrics), row
    grid_header = next(row for row in rows if row["model"] == "anchordet_yolo_grid")
    assert "anchor=grid" in grid_header["overrides"] and len(sum(grid_header["anchor_shapes_per_level"], [])) == 9

    with Image.open(in_tmp / "fit" / "fit.png") as picture:
        picture.verify()
        assert picture.format == "PNG" and picture.size[0] > picture.size[1] > 200


def test_the_summary_table_has_a_cell_per_model_and_mark():
    rows = [{"model": "a", "task": "detections"},
            {"model": "a", "step": 5, "train_seconds": 1.0, "AP50": 0.25},
            {"model": "a", "step": 10, "train_seconds": 2.4, "AP50": 0.5},
            {"model": "r", "step": 5, "train_seconds": 3.0, "AR@1000": 0.125},
            {"model": "r", "step": 10, "train_seconds": 6.0, "loss": float("nan"), "diverged": True}]
    assert bench_fit.summary_table(rows).splitlines() == [
        "| model | metric | step 5 | step 10 |",
        "|---|---|---|---|",
        "| a | AP50 | 0.250 (1 s) | 0.500 (2 s) |",
        "| r | AR@1000 | 0.125 (3 s) | diverged |",
    ]


def test_every_model_sees_the_same_batches_and_each_epoch_a_new_order(in_tmp):
    overrides = bench_fit.data_overrides("tiny", 64, 4, 0)
    datamodule = shared_datamodule(overrides, in_tmp / "data")

    def image_ids(count: int) -> list[list[int]]:
        batches = bench_fit.endless_batches(datamodule.train_dataloader())
        return [[int(t["image_id"]) for t in next(batches)[1]] for _ in range(count)]

    first, second = image_ids(4), image_ids(4)  # 8 images, batch 4: two epochs
    assert first == second
    assert sorted(sum(first[:2], [])) == sorted(sum(first[2:], []))  # each epoch covers the set once
    assert first[:2] != first[2:]  # epoch 1 is shuffled anew, not epoch 0 again


@pytest.mark.skipif(not (COCO128 / "annotations" / "instances_train2017.json").is_file(),
                    reason=f"coco128 not found at {COCO128}")
def test_coco128_fit_evaluates_against_the_real_annotation_file(in_tmp, capsys):
    rows = bench_fit.main(["--data", "coco128", "--image-size", "64", "--batch-size", "4", "--steps", "1",
                           "--marks", "1", "--workers", "0", "--models", "anchordet_yolo_kmeans,torchvision_rpn",
                           "--out", str(in_tmp / "fit")])
    marks = [row for row in rows if "step" in row]
    assert [row["model"] for row in marks] == ["anchordet_yolo_kmeans", "torchvision_rpn"]
    header = rows[0]
    assert header["anchor_fitness"]["kmeans"]["mean_best_iou"] > header["anchor_fitness"]["grid"]["mean_best_iou"]
    assert all(0.0 <= row.get("AP50", row.get("AR@1000")) <= 1.0 for row in marks)


@pytest.mark.parametrize("argv, message", [
    (["--models", "yolo_v9"], "unknown or empty ['yolo_v9']"),
    (["--marks", "500,600", "--steps", "10"], "no step between 1 and --steps 10"),
    (["--marks", "x"], "a count or a comma-separated list"),
    (["--weights", "/no/such/weights.pth"], "no such file"),
])
def test_bad_arguments_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_fit.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_data_folder_without_annotations_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path}/annotations/instances_train2017.json not found"):
        bench_fit.data_overrides(str(tmp_path), 64, 2, 0)


def test_the_bench_command_dispatches_fit():
    result = subprocess.run([sys.executable, "-m", "anchordet.bench", "fit", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).parent)
    assert result.returncode == 0 and "torchvision_retinanet" in result.stdout
