"""Training-loader throughput on real COCO JPEGs: images/s the data side delivers, per worker count.

    python scripts/bench_loader.py [--root ../shared/data/coco128] [--image-size 640] [--batch-size 16]
                                   [--workers 0,1,2] [--epochs 2]

Iterates the project's training loader (CocoDataModule: decode, EXIF, letterbox with scale jitter
and flip, collate) over the coco128 images (train = val) and prints one JSON line per worker count.
Compare with the step's consumption (`python -m anchordet.bench`, images/s): a loader slower than
the step starves it. The first epoch of each run includes the workers' start-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from anchordet.data import CocoDataModule

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    images, annotations = args.root / "train2017", args.root / "annotations" / "instances_train2017.json"
    for workers in (int(w) for w in args.workers.split(",")):
        datamodule = CocoDataModule(train_images=images, train_annotations=annotations, val_images=images,
                                    val_annotations=annotations, image_size=args.image_size,
                                    batch_size=args.batch_size, num_workers=workers)
        loader = datamodule.train_dataloader()
        count, start, first_epoch = 0, time.perf_counter(), None
        for epoch in range(args.epochs):
            for batch_images, _ in loader:
                count += batch_images.shape[0]
            if first_epoch is None:
                first_epoch = time.perf_counter() - start
        seconds = time.perf_counter() - start
        print(json.dumps({"workers": workers, "image_size": args.image_size, "batch_size": args.batch_size,
                          "images": count, "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1),
                          "first_epoch_s": round(first_epoch, 2)}), flush=True)


if __name__ == "__main__":
    main()
