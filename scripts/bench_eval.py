"""Time COCO bbox evaluation at COCO-val size with both backends, in one process, and compare them.

    python scripts/bench_eval.py [--images 5000] [--detections 100] [--seed 0]

Builds a COCO-like annotation set (80 categories with COCO's ids, 7 objects per image on average,
sizes from 4 px to half the image, 1 % crowd regions) and per image `--detections` results (most
near a GT box, with jitter and some wrong classes, the rest random), then runs
`anchordet.evaluation.evaluate_detections` with faster_coco_eval and with pycocotools on the same
rows. Prints one JSON line per backend (seconds, mAP) and the largest difference of any metric.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from anchordet.evaluation import evaluate_detections

COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
            32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
            58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
            88, 89, 90]


def make_set(num_images: int, detections_per_image: int, seed: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        boxes = []
        for _ in range(int(rng.poisson(7))):
            w = float(np.exp(rng.uniform(np.log(4), np.log(width / 2))))
            h = float(np.clip(w * np.exp(rng.normal(0, 0.5)), 2, height - 1))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            category = int(rng.choice(COCO_IDS))
            crowd = int(rng.random() < 0.01)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd})
            boxes.append((x, y, w, h, category))
        for k in range(detections_per_image):
            if boxes and k < 4 * len(boxes):
                x, y, w, h, category = boxes[k % len(boxes)]
                dx, dy, dw, dh = rng.uniform(-0.25, 0.25, 4)
                if rng.random() < 0.2:
                    category = int(rng.choice(COCO_IDS))
                box, score = [x + dx * w, y + dy * h, w * (1 + dw), h * (1 + dh)], float(rng.uniform(0.3, 1))
            else:
                w, h = float(rng.uniform(4, width / 2)), float(rng.uniform(4, height / 2))
                box = [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]
                category, score = int(rng.choice(COCO_IDS)), float(rng.uniform(0, 0.5))
            results.append({"image_id": image_id, "category_id": category,
                            "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    categories = [{"id": i, "name": f"class{i}"} for i in COCO_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data, results = make_set(args.images, args.detections, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        annotation_file = Path(folder) / "instances.json"
        annotation_file.write_text(json.dumps(data))
        metrics = {}
        for backend in ("faster_coco_eval", "pycocotools"):
            start = time.perf_counter()
            evaluation = evaluate_detections(annotation_file, results, backend=backend)
            seconds = time.perf_counter() - start
            metrics[backend] = evaluation.metrics
            print(json.dumps({"backend": backend, "images": args.images, "detections": len(results),
                              "gt_boxes": len(data["annotations"]), "seconds": round(seconds, 2),
                              "mAP": round(evaluation.metrics["mAP"], 6)}), flush=True)
    difference = max(abs(metrics["faster_coco_eval"][k] - metrics["pycocotools"][k]) for k in metrics["pycocotools"])
    print(json.dumps({"max_abs_metric_difference": difference}))


if __name__ == "__main__":
    main()
