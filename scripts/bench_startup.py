"""Start-up cost at COCO train2017 size: the dataset index and the k-means anchors.

    python scripts/bench_startup.py [--images 118287] [--boxes 862532] [--dir /tmp/startup_bench]

Writes once a generated COCO instances JSON of train2017's size (80 categories with COCO's ids,
COCO-like box sizes: log-normal areas and aspect ratios, 1 % crowd regions) and one empty file per
image (the index checks that every listed file exists; it never opens them), then times:
- ``index``: `build_coco_index` (read and validate the JSON, build the box arrays), as training does;
- ``kmeans``: `kmeans_anchor_shapes` (k = 9) on every kept box's letterboxed (w, h) at 640 px, with
  ``max_fit_boxes`` as shipped (a seeded sample of at most that many boxes is clustered) and with
  no cap (all boxes), and each result's mean best shape-IoU over all boxes.
One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from anchordet.anchors.fitness import best_shape
from anchordet.anchors.kmeans import MAX_FIT_BOXES, kmeans_anchor_shapes
from anchordet.data.coco import letterbox_scale
from anchordet.data.index import build_coco_index

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def generate(folder: Path, num_images: int, num_boxes: int, seed: int = 0) -> Path:
    annotation_file = folder / "instances_train2017.json"
    if annotation_file.is_file():
        return annotation_file
    rng = np.random.default_rng(seed)
    images_dir = folder / "train2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    widths = rng.choice([640, 640, 500, 427, 480], num_images)
    heights = rng.choice([480, 427, 375, 640, 333], num_images)
    images = []
    for k in range(num_images):
        name = f"{k + 1:012d}.jpg"
        (images_dir / name).touch()
        images.append({"id": k + 1, "file_name": name, "width": int(widths[k]), "height": int(heights[k])})
    owner = rng.integers(0, num_images, num_boxes)
    area = np.exp(rng.normal(7.5, 1.6, num_boxes))  # median ~1,800 px^2, COCO-like long tail
    ratio = np.exp(rng.normal(0.0, 0.6, num_boxes))  # h / w
    w = np.minimum(np.sqrt(area / ratio), widths[owner] - 1.0)
    h = np.minimum(np.sqrt(area * ratio), heights[owner] - 1.0)
    x = rng.uniform(0, 1, num_boxes) * (widths[owner] - w)
    y = rng.uniform(0, 1, num_boxes) * (heights[owner] - h)
    crowd = rng.uniform(0, 1, num_boxes) < 0.01
    categories = rng.choice(COCO_IDS, num_boxes)
    annotations = [{"id": j + 1, "image_id": int(owner[j]) + 1, "category_id": int(categories[j]),
                    "bbox": [round(float(x[j]), 2), round(float(y[j]), 2), round(float(w[j]), 2), round(float(h[j]), 2)],
                    "area": round(float(w[j] * h[j]), 2), "iscrowd": int(crowd[j])} for j in range(num_boxes)]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": f"class_{i}"} for i in COCO_IDS]}
    annotation_file.write_text(json.dumps(data))
    return annotation_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--boxes", type=int, default=862_532)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/startup_bench"))
    args = parser.parse_args()
    annotation_file = generate(args.dir, args.images, args.boxes)

    start = time.perf_counter()
    index = build_coco_index(annotation_file, args.dir / "train2017")
    print(json.dumps({"step": "index", "images": len(index.image_ids), "boxes": len(index.boxes),
                      "seconds": round(time.perf_counter() - start, 2)}), flush=True)

    box_image = np.repeat(np.arange(len(index.image_ids)), np.diff(index.offsets))
    scales = letterbox_scale(index.heights, index.widths, args.image_size)[box_image]
    box_wh = torch.from_numpy(((index.boxes[:, 2:] - index.boxes[:, :2]) * scales[:, None]).astype(np.float32))
    box_wh = box_wh[(box_wh > 0).all(dim=1)]
    for label, cap in (("max_fit_boxes", MAX_FIT_BOXES), ("all_boxes", None)):
        start = time.perf_counter()
        shapes = kmeans_anchor_shapes(box_wh, k=9, max_fit_boxes=cap)
        seconds = time.perf_counter() - start
        mean_best_iou = float(best_shape(box_wh, shapes)[0].mean())
        print(json.dumps({"step": "kmeans", "fit_on": label, "cap": cap, "boxes": len(box_wh),
                          "seconds": round(seconds, 2), "mean_best_iou_all_boxes": round(mean_best_iou, 5),
                          "shapes": [[round(v, 1) for v in row] for row in shapes.tolist()]}), flush=True)


if __name__ == "__main__":
    main()
