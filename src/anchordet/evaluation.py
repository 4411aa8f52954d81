"""COCO evaluation against the annotation file: detection mAP and class-agnostic proposal recall.

Why COCOeval itself rather than a re-implementation: the product promises numbers equal to
pycocotools "to the digit". The cheapest way to keep that promise is to hand COCOeval the
annotation file and the results list and read its own accumulators, so crowd regions, area ranges and
the 101-point interpolation are the official ones by construction.

Two backends with the same API: ``faster_coco_eval`` (the default; the same algorithm with the
per-image matching and the accumulation in C++, about 10x faster on a COCO-val-sized result set)
and ``pycocotools`` (the reference, one switch away: ``evaluation.backend=pycocotools``). Equal
numbers from both are a test (``tests/test_evaluation.py``).

Boxes arriving here are xyxy in the *original* image frame (the caller maps them back from the
letterboxed network input first); results JSON uses COCO `[x, y, w, h]` and the original category ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("faster_coco_eval", "pycocotools")
DEFAULT_BACKEND = "faster_coco_eval"

#: names of COCOeval.stats[0..11] for bbox detection, in pycocotools' order.
DETECTION_STAT_NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
)
#: proposal budgets of the RPN papers and Detectron2: AR@100, AR@300, AR@1000.
PROPOSAL_BUDGETS = (100, 300, 1000)


def proposal_metric_names(max_proposals=PROPOSAL_BUDGETS) -> tuple[str, ...]:
    """What `evaluate_proposals` reports: AR at each budget, then by object size at the largest."""
    largest = max_proposals[-1]
    return (*(f"AR@{n}" for n in max_proposals),
            *(f"AR_{area}@{largest}" for area in ("small", "medium", "large")))


#: the metrics validation logs (as ``val/<name>``) for each head task (``head.task``).
METRICS_OF_TASK = {"detections": DETECTION_STAT_NAMES, "proposals": proposal_metric_names()}


@dataclass
class CocoEvaluation:
    """What one COCOeval run produced: named stats, pycocotools' printed summary, per-class AP."""

    metrics: dict[str, float]
    summary: str
    per_class_ap: dict[str, float] = field(default_factory=dict)
    precision: np.ndarray | None = None  # COCOeval.eval["precision"]: [T, R, K, A, M]


def coco_api(backend: str = DEFAULT_BACKEND):
    """(COCO, COCOeval) classes of a backend; both follow pycocotools' API."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        # It logs six INFO lines per evaluation (what pycocotools prints, and we swallow): keep them
        # out of train.log, where they would outnumber the progress lines.
        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"evaluation.backend={backend!r}: use one of {BACKENDS}")


def load_coco(annotation_file: str | Path, backend: str = DEFAULT_BACKEND):
    """Read an instances JSON with the backend's COCO class, quietly (it prints progress lines)."""
    coco_class, _ = coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_class(str(annotation_file))


def to_coco_results(
    boxes_xyxy: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, image_id: int,
    category_ids: list[int],
) -> list[dict]:
    """One image's detections as COCO results rows.

    boxes_xyxy: [D, 4] in the original image frame. `category_ids[label]` gives the COCO id. For
    class-agnostic proposals pass labels 0 and `category_ids=[any id of the annotation file]`:
    COCOeval with useCats=0 still drops detections whose category is not among the file's ids.
    """
    boxes = boxes_xyxy.detach().float().cpu()
    # xyxy -> xywh, the results format of the COCO API.
    wh = boxes[:, 2:] - boxes[:, :2]
    xywh = torch.cat([boxes[:, :2], wh], dim=1).tolist()
    scores_list = scores.detach().float().cpu().tolist()
    labels_list = labels.detach().cpu().tolist()
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[label]),
            "bbox": [round(v, 3) for v in box],
            "score": round(float(score), 5),
        }
        for box, score, label in zip(xywh, scores_list, labels_list)
    ]


def write_results(results: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def _run_cocoeval(coco_gt, results: list[dict], image_ids, use_cats: bool, max_dets, backend: str):
    _, cocoeval_class = coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if results and backend == "faster_coco_eval":
            coco_dt = _box_results_coco(coco_gt, results)
        elif results:
            # loadRes adds keys to the rows it gets (area, id, segmentation): give it copies, so the
            # caller's rows stay the COCO results format. Shallow copies suffice (bbox is not changed).
            coco_dt = coco_gt.loadRes([dict(row) for row in results])
        else:
            # pycocotools' loadRes refuses an empty list; an empty detector output is still a valid
            # (all-zero) result.
            coco_dt = type(coco_gt)()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "annotations": [],
                               "categories": coco_gt.dataset["categories"]}
            coco_dt.createIndex()
        evaluator = cocoeval_class(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.params.useCats = int(use_cats)
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _box_results_coco(coco_gt, results: list[dict]):
    """What ``coco_gt.loadRes(results)`` builds for box results, in one pass and without touching the
    caller's rows. loadRes copies nothing, so it needs copies, and it adds a polygon per box that box
    evaluation never reads: both cost 40 % of a COCO-val-sized evaluation (docs/benchmarks.md).
    The fields are loadRes's: area w x h, ids from 1 in row order, iscrowd 0."""
    known = set(coco_gt.getImgIds())
    unknown = {row["image_id"] for row in results} - known
    if unknown:
        raise ValueError(f"results name image ids that the annotation file does not list: {sorted(unknown)[:10]}")
    coco_dt = type(coco_gt)()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [{"image_id": row["image_id"], "category_id": row["category_id"], "bbox": row["bbox"],
                         "score": row["score"], "area": row["bbox"][2] * row["bbox"][3], "id": index, "iscrowd": 0}
                        for index, row in enumerate(results, start=1)],
    }
    coco_dt.createIndex()
    return coco_dt


def _summary_text(evaluator) -> str:
    """pycocotools' 12 summary lines. faster-coco-eval prints them to a logger by default, and two
    more after them (AR at IoU 0.5 and 0.75), which are left out so both backends print the same."""
    buffer = io.StringIO()
    if hasattr(evaluator, "print_function"):
        evaluator.print_function = print
    with contextlib.redirect_stdout(buffer):
        evaluator.summarize()
    return "\n".join(buffer.getvalue().rstrip("\n").splitlines()[:len(DETECTION_STAT_NAMES)])


def per_class_average_precision(evaluator, coco_gt) -> dict[str, float]:
    """AP@[.5:.95] per category (area all, the largest maxDets), as COCOeval computes mAP.

    precision is [T IoU thresholds, R recall points, K categories, A area ranges, M maxDets]; -1 marks
    "no ground truth", which COCOeval leaves out of its mean, so we do too (NaN for such a class).
    """
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    names = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        valid = precision[:, :, k][precision[:, :, k] > -1]
        per_class[names.get(cat_id, str(cat_id))] = float(valid.mean()) if valid.size else float("nan")
    return per_class


def evaluate_detections(annotation_file, results: list[dict], image_ids=None,
                        backend: str = DEFAULT_BACKEND) -> CocoEvaluation:
    """COCO bbox mAP of `results` (COCO results rows) against the annotation file (a path, or a COCO
    object of the backend's library)."""
    coco_gt = annotation_file if hasattr(annotation_file, "loadRes") else load_coco(annotation_file, backend)
    evaluator = _run_cocoeval(coco_gt, results, image_ids, use_cats=True, max_dets=(1, 10, 100), backend=backend)
    summary = _summary_text(evaluator)
    metrics = {name: float(v) for name, v in zip(DETECTION_STAT_NAMES, evaluator.stats)}
    return CocoEvaluation(metrics, summary, per_class_average_precision(evaluator, coco_gt),
                          evaluator.eval["precision"])


def evaluate_proposals(annotation_file, results: list[dict], image_ids=None, max_proposals=PROPOSAL_BUDGETS,
                       backend: str = DEFAULT_BACKEND) -> CocoEvaluation:
    """Class-agnostic average recall of proposals, the way Detectron2 and the RPN papers report it.

    COCOeval with useCats=0 and maxDets = the proposal budgets; AR@n is the recall averaged over IoU
    0.5:0.95 at n proposals, and the size split is taken at the largest budget.
    """
    coco_gt = annotation_file if hasattr(annotation_file, "loadRes") else load_coco(annotation_file, backend)
    # With useCats=0 COCOeval pools the boxes of all the file's categories but still only looks up
    # detections under those category ids, so give every proposal one of them.
    any_category = coco_gt.getCatIds()[0]
    results = [{**row, "category_id": any_category} for row in results]
    evaluator = _run_cocoeval(coco_gt, results, image_ids, use_cats=False, max_dets=max_proposals, backend=backend)
    # recall: [T, K, A, M]; with useCats=0 there is one pseudo-category. Area index 0 = all.
    recall = evaluator.eval["recall"]

    def mean_valid(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else 0.0

    metrics = {f"AR@{n}": mean_valid(recall[:, :, 0, m]) for m, n in enumerate(max_proposals)}
    largest = len(max_proposals) - 1
    for area_index, area in ((1, "small"), (2, "medium"), (3, "large")):
        metrics[f"AR_{area}@{max_proposals[-1]}"] = mean_valid(recall[:, :, area_index, largest])
    summary = "\n".join(f"{name:>16s} = {value:.4f}" for name, value in metrics.items())
    return CocoEvaluation(metrics, summary)


def format_per_class_table(per_class_ap: dict[str, float]) -> str:
    """A two-column text table (class, AP) sorted as the categories are, for logs and TensorBoard."""
    width = max([len(name) for name in per_class_ap] + [5])
    lines = [f"| {'class':<{width}} | AP     |", f"|{'-' * (width + 2)}|--------|"]
    for name, ap in per_class_ap.items():
        value = "  n/a " if np.isnan(ap) else f"{ap:.4f}"
        lines.append(f"| {name:<{width}} | {value} |")
    return "\n".join(lines)
