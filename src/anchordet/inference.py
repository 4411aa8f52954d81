"""Run a trained detector on images that have no annotations: find them, load them, predict in batches.

Shape glossary: B images per batch, S the trained input side (letterbox), D detections of one image.

- `find_images(source)`: an image file, a folder (its image files, sorted), a glob, or a text file
  listing one path per line (relative paths are relative to the list file);
- `ImageFiles`: a dataset of those files, each read like the training images (EXIF orientation,
  any colour mode to RGB) and letterboxed to ``S x S``; a file that cannot be read is reported by
  name and skipped, and the run goes on;
- `predict_images`: batched inference -> COCO results rows in each image's *original* frame with
  the original category ids and names, and the overlay pictures.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from anchordet import viz
from anchordet.data.coco import UNREADABLE, read_rgb
from anchordet.data.transforms import DetectionTransform, to_original_frame
from anchordet.evaluation import to_coco_results
from anchordet.models.heads.common import DETECTIONS

log = logging.getLogger("anchordet.inference")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def find_images(source: str | os.PathLike) -> list[Path]:
    """The image files ``source`` names: a file, a folder, a glob pattern or a list file (.txt)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif path.is_file() and path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        files = [(path.parent / line) if not Path(line).is_absolute() else Path(line) for line in lines]
    elif path.is_file():
        files = [path]
    elif any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    else:
        raise FileNotFoundError(f"source={text!r}: no such image file, folder, glob match or list file")
    if not files:
        raise FileNotFoundError(f"source={text!r} names no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


class ImageFiles(Dataset):
    """``(image uint8 [3, S, S], meta)`` per file, meta ``{"image_id", "file_name", "orig_size",
    "scale", "pad", "original"}`` (``original``: the upright RGB image, for the overlays); an
    unreadable file gives ``None`` (skipped by `collate_readable`)."""

    def __init__(self, files: list[Path], image_size: int, keep_original: bool = True) -> None:
        self.files, self.keep_original = list(files), bool(keep_original)
        self.transform = DetectionTransform(image_size, train=False)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            original = read_rgb(path)
        except UNREADABLE as error:
            log.warning("skipping %s: not a readable image (%s)", path, error)
            return None
        image, _, _, scale, pad = self.transform(original, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
        meta = {"image_id": i + 1, "file_name": str(path), "orig_size": tuple(original.shape[-2:]),
                "scale": scale, "pad": pad, "original": original if self.keep_original else None}
        return image, meta


def collate_readable(batch):
    """Stack the readable images of a batch (None = unreadable, already reported)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return torch.stack([image for image, _ in kept]), [meta for _, meta in kept]


@dataclass
class Prediction:
    meta: dict
    boxes: Tensor  # [D, 4] xyxy in the original image frame
    scores: Tensor  # [D]
    labels: Tensor  # [D]


def predict_batches(module, dataset: ImageFiles, batch_size: int, num_workers: int,
                    device: torch.device) -> Iterator[Prediction]:
    """Every readable image's detections, in file order, boxes mapped back to the original frame."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_readable)
    module.to(device).eval()
    for batch in loader:
        if batch is None:
            continue
        images_uint8, metas = batch
        images, _ = module.on_after_batch_transfer((images_uint8.to(device), metas))
        for prediction, meta in zip(module.detector.predict(images), metas):
            boxes = to_original_frame(prediction["boxes"].cpu(), meta)
            yield Prediction(meta, boxes, prediction["scores"].cpu(), prediction["labels"].cpu())


def results_rows(prediction: Prediction, category_ids: list[int], names: list[str], task: str) -> list[dict]:
    """COCO results rows (original frame, original category ids) plus ``category_name``."""
    ids = category_ids if task == DETECTIONS else category_ids[:1]
    rows = to_coco_results(prediction.boxes, prediction.scores, prediction.labels, prediction.meta["image_id"], ids)
    for row, label in zip(rows, prediction.labels.tolist()):
        row["category_name"] = names[label] if task == DETECTIONS else "object"
    return rows


def overlay(prediction: Prediction, names: list[str] | None, score_threshold: float, max_detections: int) -> Tensor:
    """uint8 [3, H, W] picture of the original image with its detections (no GT)."""
    threshold = score_threshold if names is not None else float("-inf")  # proposals: the best k
    return viz.draw_detections(prediction.meta["original"], torch.zeros(0, 4), None, prediction.boxes,
                               prediction.scores, prediction.labels, names, threshold, max_detections)


def _progress(items, total: int, every: int = 100):
    """Rich's bar on a terminal, a log line every `every` images otherwise."""
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, total=total, description="predicting")
        return
    for count, item in enumerate(items, 1):
        if count % every == 0 or count == total:
            log.info("predicted %d of %d images", count, total)
        yield item


def write_predictions(module, files: list[Path], image_size: int, out_dir: Path, device: torch.device,
                      batch_size: int = 8, num_workers: int = 2, score_threshold: float = 0.3,
                      max_detections: int = 100, overlays: bool = True, max_overlays: int = 100) -> dict:
    """Predict on ``files`` and write, under ``out_dir``:

    - ``predictions.json``: COCO results rows (``image_id``, ``category_id``, ``bbox`` xywh in the
      original image, ``score``) plus ``category_name``; for a proposal network (task "proposals")
      every row is class-agnostic ("object", under the first category id);
    - ``images.json``: the ``images`` (id, file_name, width, height) and ``categories`` the rows refer
      to, so ``COCO("images.json").loadRes("predictions.json")`` reads them back;
    - ``overlays/<file stem>.png`` for the first ``max_overlays`` images (``overlays=true``).

    Detections below ``score_threshold`` are left out (proposals keep their best ``max_detections``).
    Unreadable files are reported by name and skipped. Returns a summary dict.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names, category_ids, task = module.category_map.names, module.category_map.category_ids, module.task
    dataset = ImageFiles(files, image_size, keep_original=overlays)
    rows, images, written = [], [], 0
    with torch.no_grad():
        for prediction in _progress(predict_batches(module, dataset, batch_size, num_workers, device), len(files)):
            keep = prediction.scores.argsort(descending=True)[:max_detections]
            if task == DETECTIONS:
                keep = keep[prediction.scores[keep] >= score_threshold]
            kept = Prediction(prediction.meta, prediction.boxes[keep], prediction.scores[keep], prediction.labels[keep])
            meta = kept.meta
            images.append({"id": meta["image_id"], "file_name": meta["file_name"],
                           "height": int(meta["orig_size"][0]), "width": int(meta["orig_size"][1])})
            rows.extend(results_rows(kept, category_ids, names, task))
            if overlays and written < max_overlays:
                picture = overlay(kept, names if task == DETECTIONS else None, score_threshold, max_detections)
                path = out_dir / "overlays" / f"{Path(meta['file_name']).stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)
                written += 1
    categories = [{"id": i, "name": n} for i, n in zip(category_ids, names)] if task == DETECTIONS else \
        [{"id": category_ids[0], "name": "object"}]
    (out_dir / "predictions.json").write_text(json.dumps(rows))
    (out_dir / "images.json").write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    summary = {"images": len(files), "predicted": len(images), "skipped": len(files) - len(images),
               "detections": len(rows), "overlays": written, "task": task, "output_dir": str(out_dir)}
    log.info("predicted %(predicted)d of %(images)d images (%(skipped)d unreadable, skipped): %(detections)d "
             "rows in predictions.json, %(overlays)d overlays", summary)
    return summary
