"""Peak memory of RPN matching with many objects: IoU in blocks (the default) against one [B, N, M] matrix.

    python scripts/bench_match_memory.py [--image-size 640] [--batch-size 16] [--objects 10,100,500]

Places the default RPN anchors (conf/anchor/rpn_grid.yaml: P2-P6, sizes 32-512, ratios 0.5/1/2;
about 102k anchors at 640 px) and matches them with `IoUMatcher` (0.7 / 0.3, low-quality matches)
against random ground-truth boxes, once with `matching.MAX_IOU_ELEMENTS` as shipped and once with
the limit lifted so the whole matrix is built at once. Prints one JSON line per (objects, mode):
seconds and the peak resident-memory growth during the call (Linux VmHWM, as `anchordet.bench`
measures CPU memory), and checks that both modes give the same match.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from anchordet import matching
from anchordet.anchors import grid_anchor_shapes
from anchordet.assembly import assemble_detector
from anchordet.bench import PeakMemory, make_batch
from anchordet.matching import IoUMatcher
from anchordet.models.backbone import ResNetFPN
from anchordet.models.heads.rpn import RpnHead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--objects", default="10,100,500")
    parser.add_argument("--one-matrix-max-objects", type=int, default=100,
                        help="skip the one-matrix mode above this many objects: at 500 (3.1 GB of IoU) "
                             "its intermediates ran the 24 GB machine out of memory (killed)")
    args = parser.parse_args()

    backbone = ResNetFPN(depth=18, levels=("P2", "P3", "P4", "P5", "P6"))  # only its geometry is used
    shapes = grid_anchor_shapes([[32], [64], [128], [256], [512]], [0.5, 1.0, 2.0])
    detector = assemble_detector(backbone, RpnHead, shapes, IoUMatcher(), 1)
    anchors = detector.anchor_grid((args.image_size, args.image_size), torch.device("cpu"))
    matcher, shipped_limit = IoUMatcher(), matching.MAX_IOU_ELEMENTS
    for objects in (int(n) for n in args.objects.split(",")):
        batch = make_batch(args.batch_size, args.image_size, 1, torch.device("cpu"), False, objects)
        gt_boxes = torch.stack([t["boxes"] for t in batch.targets])  # [B, M, 4]
        gt_mask = torch.ones(gt_boxes.shape[:2], dtype=torch.bool)
        results = {}
        modes = [("blocks", shipped_limit)] + [("one_matrix", 1 << 62)] * (objects <= args.one_matrix_max_objects)
        for mode, limit in modes:
            matching.MAX_IOU_ELEMENTS = limit
            memory = PeakMemory(torch.device("cpu"))
            start = time.perf_counter()
            results[mode] = matcher(anchors, gt_boxes, gt_mask)
            seconds = time.perf_counter() - start
            matrix_mb = args.batch_size * anchors.boxes.shape[0] * objects * 4 / 2**20
            print(json.dumps({"objects": objects, "mode": mode, "anchors": anchors.boxes.shape[0],
                              "batch_size": args.batch_size, "image_size": args.image_size,
                              "seconds": round(seconds, 3), "peak_mem_mb": round(memory.peak_mb(), 1),
                              "fp32_iou_matrix_mb": round(matrix_mb, 1)}), flush=True)
        matching.MAX_IOU_ELEMENTS = shipped_limit
        if "one_matrix" in results:
            same = all(torch.equal(a, b) for a, b in zip(results["blocks"], results["one_matrix"]))
            print(json.dumps({"objects": objects, "same_match": same}), flush=True)


if __name__ == "__main__":
    main()
