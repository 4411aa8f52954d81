"""COCO evaluation: hand-checked numbers, equality with pycocotools' COCOeval run directly, and the
faster-coco-eval backend equal to pycocotools on real coco128 annotations (crowd regions included)."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from anchordet.distributed import _dedupe
from anchordet.evaluation import (
    BACKENDS,
    evaluate_detections,
    evaluate_proposals,
    format_per_class_table,
    load_coco,
    to_coco_results,
)

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "annotations" / "instances_train2017.json"


@pytest.fixture()
def annotation_file(tmp_path):
    """Two images; image 1 has one 'bar' (id 7) at x=10..50, y=10..30; image 2 one 'disc' (id 3)
    and one crowd region; category ids deliberately non-contiguous."""
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}],
        "categories": [{"id": 3, "name": "disc"}, {"id": 7, "name": "bar"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 20], "area": 800, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [20, 20, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [70, 0, 30, 30], "area": 900, "iscrowd": 1},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def direct_cocoeval(annotation_file, results, use_cats=True, max_dets=(1, 10, 100)):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.useCats = int(use_cats)
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate(); evaluator.accumulate(); evaluator.summarize()
    return evaluator


def test_to_coco_results_converts_xyxy_and_category_ids():
    rows = to_coco_results(torch.tensor([[10.0, 10.0, 50.0, 30.0]]), torch.tensor([0.9]),
                           torch.tensor([1]), image_id=1, category_ids=[3, 7])
    assert rows == [{"image_id": 1, "category_id": 7, "bbox": [10.0, 10.0, 40.0, 20.0], "score": 0.9}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_checked_map_for_a_box_with_iou_0_62(annotation_file, backend):
    # Image 1: detection x=10..50, y=10..30.4 is narrower... build IoU = 20*40 / (40*20 + extra):
    # a box shifted right by 10 px: x=20..60 -> inter 30*20=600, union 800+800-600=1000, IoU 0.6.
    # Shift 9.4 px -> inter 30.6*20=612, union 988, IoU 0.6194: matched at thresholds 0.50, 0.55,
    # 0.60 only, so AP(bar) = 3/10. Image 2: a perfect disc -> AP(disc) = 1.
    results = [
        {"image_id": 1, "category_id": 7, "bbox": [19.4, 10, 40, 20], "score": 0.9},
        {"image_id": 2, "category_id": 3, "bbox": [20, 20, 40, 40], "score": 0.8},
    ]
    evaluation = evaluate_detections(annotation_file, results, backend=backend)
    assert evaluation.per_class_ap["bar"] == pytest.approx(0.3)
    assert evaluation.per_class_ap["disc"] == pytest.approx(1.0)
    assert evaluation.metrics["mAP"] == pytest.approx(0.65)
    assert evaluation.metrics["mAP_50"] == pytest.approx(1.0)
    assert evaluation.metrics["mAP_75"] == pytest.approx(0.5)
    assert "Average Precision" in evaluation.summary and len(evaluation.summary.splitlines()) == 12
    assert "| bar" in format_per_class_table(evaluation.per_class_ap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_metrics_equal_cocoeval_on_random_detections(annotation_file, backend):
    generator = torch.Generator().manual_seed(0)
    results = []
    for image_id in (1, 2):
        for _ in range(30):
            x, y = (torch.rand(2, generator=generator) * 60).tolist()
            w, h = (torch.rand(2, generator=generator) * 40 + 5).tolist()
            results.append({"image_id": image_id, "category_id": [3, 7][int(torch.rand(1, generator=generator) > 0.5)],
                            "bbox": [x, y, w, h], "score": float(torch.rand(1, generator=generator))})
    results.append({"image_id": 2, "category_id": 3, "bbox": [21, 19, 40, 41], "score": 0.5})
    ours = evaluate_detections(annotation_file, results, backend=backend)
    reference = direct_cocoeval(annotation_file, results)
    np.testing.assert_allclose(list(ours.metrics.values()), reference.stats, atol=1e-12)
    assert ours.metrics["mAP"] > 0  # the near-perfect disc scores something


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zero_not_an_error(annotation_file, backend):
    evaluation = evaluate_detections(annotation_file, [], backend=backend)
    assert evaluation.metrics["mAP"] <= 0  # COCOeval reports -1 / 0 for no detections
    assert evaluation.metrics["mAP"] != evaluation.metrics["mAP"] or evaluation.metrics["mAP"] in (0.0, -1.0)


def test_results_for_an_image_the_file_does_not_list_are_refused_by_id(annotation_file):
    rows = [{"image_id": 999, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.9}]
    with pytest.raises(ValueError, match=r"image ids that the annotation file does not list: \[999\]"):
        evaluate_detections(annotation_file, rows, backend="faster_coco_eval")


def test_evaluation_leaves_the_callers_rows_as_they_were(annotation_file):
    rows = [{"image_id": 1, "category_id": 7, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.9}]
    for backend in BACKENDS:
        evaluate_detections(annotation_file, rows, backend=backend)
    assert rows == [{"image_id": 1, "category_id": 7, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.9}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_proposal_recall_equals_class_agnostic_cocoeval(annotation_file, backend):
    results = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 20], "score": 0.9},
        {"image_id": 2, "category_id": 3, "bbox": [29.4, 20, 40, 40], "score": 0.8},
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.7},
    ]
    ours = evaluate_proposals(annotation_file, results, backend=backend)
    reference = direct_cocoeval(annotation_file, results, use_cats=False, max_dets=(100, 300, 1000))
    # stats[8] is AR at the largest maxDets (1000) over all areas.
    assert ours.metrics["AR@1000"] == pytest.approx(reference.stats[8])
    assert ours.metrics["AR@100"] == pytest.approx(reference.stats[6])
    # Both GTs found: one exactly (recall 1 at every threshold), one at IoU 0.619 (0.50, 0.55, 0.60 -> 3/10).
    assert ours.metrics["AR@100"] == pytest.approx((1.0 + 0.3) / 2)
    # COCOeval pools categories with useCats=0, but only finds rows under the file's ids: ours
    # rewrites the id, so a proposal written under id 7 counts the same.
    relabelled = [{**r, 'category_id': 7} for r in results]
    assert evaluate_proposals(annotation_file, relabelled, backend=backend).metrics == ours.metrics


def test_distributed_dedupe_counts_padded_images_once():
    row = lambda image_id, score: {"image_id": image_id, "category_id": 1, "bbox": [0, 0, 1, 1], "score": score}
    rank0 = ([row(1, 0.9), row(2, 0.8), row(2, 0.7)], [1, 2])
    # rank 1 saw image 3 and, as the sampler's padding, image 1 again.
    rank1 = ([row(3, 0.6), row(1, 0.9)], [3, 1])
    kept, image_ids = _dedupe([rank0, rank1])
    assert image_ids == [1, 2, 3]
    assert sorted((r["image_id"], r["score"]) for r in kept) == [(1, 0.9), (2, 0.7), (2, 0.8), (3, 0.6)]


def jittered_detections(coco: COCO, seed: int, per_image: int = 30) -> list[dict]:
    """Detections built from the GT boxes of every image (crowd regions included): moved and resized
    by up to 20 %, some with the wrong class, scores 0.3-1; plus random boxes scoring 0-0.6."""
    rng = np.random.default_rng(seed)
    category_ids = coco.getCatIds()
    rows = []
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        for ann in coco.imgToAnns[image_id]:
            for _ in range(2):
                x, y, w, h = ann["bbox"]
                dx, dy, dw, dh = rng.uniform(-0.2, 0.2, 4)
                category = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(category_ids))
                rows.append({"image_id": image_id, "category_id": category,
                             "bbox": [x + dx * w, y + dy * h, w * (1 + dw), h * (1 + dh)],
                             "score": float(rng.uniform(0.3, 1.0))})
        for _ in range(per_image):
            w, h = rng.uniform(5, info["width"] / 2), rng.uniform(5, info["height"] / 2)
            rows.append({"image_id": image_id, "category_id": int(rng.choice(category_ids)),
                         "bbox": [rng.uniform(0, info["width"] - w), rng.uniform(0, info["height"] - h), w, h],
                         "score": float(rng.uniform(0.0, 0.6))})
    return rows


@pytest.mark.skipif(not COCO128.is_file(), reason=f"real COCO sample not found at {COCO128}")
def test_faster_coco_eval_equals_pycocotools_on_coco128_detections_and_proposals():
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(COCO128))
    assert sum(a["iscrowd"] for a in gt.dataset["annotations"]) == 10  # crowd regions are in play
    results = jittered_detections(gt, seed=0)
    reference = evaluate_detections(COCO128, results, backend="pycocotools")
    faster = evaluate_detections(COCO128, results, backend="faster_coco_eval")
    assert reference.metrics["mAP"] > 0.1  # the jittered boxes do score
    for name, value in reference.metrics.items():
        assert faster.metrics[name] == pytest.approx(value, abs=1e-6), name
    np.testing.assert_allclose(faster.precision, reference.precision, atol=1e-6)
    assert faster.per_class_ap.keys() == reference.per_class_ap.keys()
    np.testing.assert_allclose(list(faster.per_class_ap.values()), list(reference.per_class_ap.values()), atol=1e-6)
    assert faster.summary == reference.summary
    # A subset of images, as a distributed validation passes them.
    subset = gt.getImgIds()[::3]
    assert evaluate_detections(COCO128, results, subset, backend="faster_coco_eval").metrics == pytest.approx(
        evaluate_detections(COCO128, results, subset, backend="pycocotools").metrics, abs=1e-6)

    proposals = [{**row, "category_id": 1} for row in results]
    reference = evaluate_proposals(COCO128, proposals, backend="pycocotools")
    faster = evaluate_proposals(load_coco(COCO128, "faster_coco_eval"), proposals, backend="faster_coco_eval")
    assert reference.metrics["AR@1000"] > 0.1
    assert faster.metrics == pytest.approx(reference.metrics, abs=1e-6)
