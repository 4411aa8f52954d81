"""`python -m anchordet.bench` on the CPU at toy sizes: output format and consistency, no timing claims."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anchordet import bench

TINY = ["--device", "cpu", "--image-size", "64", "--batch-size", "1", "--warmup", "1", "--iters", "1"]
CASE_KEYS = {"case", "device", "precision", "image_size", "batch_size", "boxes_per_image", "compile", "median_step_s",
             "images_per_s", "peak_mem_mb"}


def test_main_prints_one_parsable_line_per_case_and_consistent_ratios(tmp_path, capsys):
    out_file = tmp_path / "sub" / "bench.jsonl"
    records = bench.main(TINY + ["--out", str(out_file)])

    stdout_lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in stdout_lines]
    assert parsed == records
    assert [json.loads(line) for line in out_file.read_text().splitlines()] == records

    cases = [r for r in records if "case" in r]
    ratios = [r for r in records if "ratio" in r]
    assert [r["case"] for r in cases] == list(bench.BENCHMARK_CASES)
    assert len(cases) + len(ratios) == len(records)
    for record in cases:
        assert set(record) == CASE_KEYS
        assert (record["device"], record["precision"], record["image_size"], record["batch_size"]) == (
            "cpu", "fp32", 64, 1)
        assert record["images_per_s"] > 0 and record["median_step_s"] > 0
        assert math.isclose(record["images_per_s"], 1 / record["median_step_s"])
        assert record["peak_mem_mb"] is None or record["peak_mem_mb"] >= 0

    by_name = {r["case"]: r for r in cases}
    assert [r["ratio"] for r in ratios] == [
        "anchordet_yolo_r50 / torchvision_retinanet_r50", "anchordet_yolo_r50 / resnet50_fpn_bare",
        "anchordet_rpn_r50 / torchvision_rpn_r50"]
    for ratio in ratios:
        top, bottom = (by_name[name] for name in ratio["ratio"].split(" / "))
        assert math.isclose(ratio["images_per_s_ratio"], top["images_per_s"] / bottom["images_per_s"])
        assert math.isclose(ratio["median_step_s_ratio"], top["median_step_s"] / bottom["median_step_s"])
        # images/s is B / step time with the same B, so the two ratios are reciprocal.
        assert math.isclose(ratio["images_per_s_ratio"] * ratio["median_step_s_ratio"], 1.0)


def test_ratios_by_hand_and_only_for_cases_that_ran():
    def record(name, step_s, mem):
        return {"case": name, "median_step_s": step_s, "images_per_s": 2 / step_s, "peak_mem_mb": mem}

    yolo = record("anchordet_yolo_r50", 0.5, 300.0)  # 4 images/s
    retina = record("torchvision_retinanet_r50", 2.0, 600.0)  # 1 image/s
    bare = record("resnet50_fpn_bare", 0.25, None)  # 8 images/s, memory unknown
    ratios = bench.ratio_records([yolo, retina, bare])
    assert ratios == [
        {"ratio": "anchordet_yolo_r50 / torchvision_retinanet_r50", "images_per_s_ratio": 4.0,
         "median_step_s_ratio": 0.25, "peak_mem_ratio": 0.5},
        {"ratio": "anchordet_yolo_r50 / resnet50_fpn_bare", "images_per_s_ratio": 0.5,
         "median_step_s_ratio": 2.0, "peak_mem_ratio": None},
    ]
    assert bench.ratio_records([yolo, bare]) == ratios[1:]
    assert bench.ratio_records([retina, bare]) == []


def test_unknown_case_is_rejected_with_the_known_names(capsys):
    with pytest.raises(SystemExit):
        bench.main(TINY + ["--cases", "anchordet_yolo_r50,nope"])
    assert "nope" in capsys.readouterr().err


def test_cpu_defaults_follow_the_brief():
    args = bench.parse_args(["--device", "cpu"])
    assert (args.image_size, args.batch_size, args.warmup, args.iters) == (256, 2, 3, 5)
    assert (args.precision, args.channels_last, args.num_classes) == ("fp32", False, 80)
    assert args.cases == list(bench.BENCHMARK_CASES)


def test_synthetic_batch_is_fixed_and_boxes_lie_inside_the_image():
    first = bench.make_batch(2, 96, 80, torch.device("cpu"), channels_last=False)
    again = bench.make_batch(2, 96, 80, torch.device("cpu"), channels_last=False)
    assert torch.equal(first.images, again.images)
    for target, target_again in zip(first.targets, again.targets):
        assert torch.equal(target["boxes"], target_again["boxes"])
        boxes = target["boxes"]
        assert boxes.shape == (bench.BOXES_PER_IMAGE, 4)
        assert bool((boxes >= 0).all() and (boxes <= 96).all())
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        assert target["labels"].dtype == torch.int64 and bool((target["labels"] < 80).all())
    # Normalised images are the [0, 1] ones through the ImageNet mean/std.
    mean = torch.tensor(bench.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(bench.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(first.images * std + mean, first.images_unit)
    crowded = bench.make_batch(2, 96, 80, torch.device("cpu"), channels_last=False, boxes_per_image=500)
    assert [t["boxes"].shape for t in crowded.targets] == [(500, 4), (500, 4)]


def test_retinanet_transform_keeps_the_input_size():
    # min_size = max_size = S must make torchvision's resize a no-op on S x S images, else the two
    # detectors would not be timed at the same input size.
    batch = bench.make_batch(1, 96, 80, torch.device("cpu"), channels_last=False)
    model, _ = bench.BENCHMARK_CASES["torchvision_retinanet_r50"](batch)
    model.train()
    image_list, targets = model.transform(list(batch.images_unit), [dict(t) for t in batch.targets])
    assert tuple(image_list.tensors.shape) == (1, 3, 96, 96)
    assert image_list.image_sizes == [(96, 96)]
    torch.testing.assert_close(targets[0]["boxes"], batch.targets[0]["boxes"])
