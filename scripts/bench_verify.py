"""Time the up-front image check (anchordet.data.verify) at COCO train2017 scale.

    python scripts/bench_verify.py [--images 118287] [--workers N] [--dir /tmp/verify_bench]

Writes N small generated JPEGs (their pixels do not matter: the check reads headers and the last
kilobyte, not the image data) and a COCO JSON once, then times a cold check (no cache), a second
start (everything from the cache) and a check after one file changed. One JSON line per pass.
The page cache is warm after generation, so the cold pass measures the CPU cost, not disk reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from PIL import Image

from anchordet.data.verify import verify_images


def generate(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / "template.jpg"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(template, quality=80)
    data = template.read_bytes()
    names = [f"{k:012d}.jpg" for k in range(count)]
    for name in names:
        path = folder / name
        if not path.exists():
            path.write_bytes(data)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=118287)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/verify_bench"))
    args = parser.parse_args()
    images_dir, cache = args.dir / "images", args.dir / "cache"
    start = time.perf_counter()
    names = generate(images_dir, args.images)
    print(json.dumps({"pass": "generate", "images": len(names), "seconds": round(time.perf_counter() - start, 2)}))
    shutil.rmtree(cache, ignore_errors=True)
    ids, sizes = list(range(len(names))), [(48, 64)] * len(names)
    for label in ("cold (no cache)", "second start (cache)", "one file changed"):
        if label == "one file changed":
            os.utime(images_dir / names[0], ns=(1, 1))
        start = time.perf_counter()
        bad = verify_images(images_dir, names, ids, sizes, cache_dir=cache, num_workers=args.workers)
        print(json.dumps({"pass": label, "images": len(names), "workers": args.workers, "bad": len(bad),
                          "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
