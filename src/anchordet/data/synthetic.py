"""A deterministic synthetic COCO set: coloured shapes on textured backgrounds, as real JPEGs + JSON.

The default data of the project, so that training, evaluation and every picture work without a
download. The classes are chosen to make anchors matter: their shapes have clearly different aspect
ratios (wide bars, tall poles, discs, squares, wide triangles, tall eggs), sizes run from under
32 px to half the image, and images are not all square, so the letterbox matters too. Each class
has its own colour (with some jitter) against a low-saturation background, which a small detector
learns in minutes on a CPU.

Everything comes from ``numpy.random.default_rng([seed, split, image index])``: the same settings
give byte-identical files, and image ``i`` does not change when ``num_train`` grows. A set is
written once to ``out_dir/synthetic-<settings hash>/`` in the COCO 2017 layout (``train2017/``,
``val2017/``, ``annotations/instances_{train,val}2017.json``) and reused; it is built in a
temporary folder and renamed into place, so concurrent processes (DDP ranks) cannot see half a set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

log = logging.getLogger("anchordet.data")

# Bump when the drawing changes, so that cached sets from older code are not reused.
GENERATOR_VERSION = 1
SETTINGS_FILE = "settings.json"
SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ShapeClass:
    category_id: int
    name: str
    colour: tuple[int, int, int]
    aspect_range: tuple[float, float]  # width / height
    kind: str  # "rectangle", "ellipse" or "triangle"


# Ids deliberately skip numbers (as COCO's do), so code that confuses ids with labels fails here.
SHAPE_CLASSES = (
    ShapeClass(1, "bar", (225, 45, 40), (3.0, 5.0), "rectangle"),
    ShapeClass(3, "pole", (40, 90, 235), (0.2, 1 / 3), "rectangle"),
    ShapeClass(4, "disc", (245, 205, 30), (1.0, 1.0), "ellipse"),
    ShapeClass(7, "square", (40, 195, 70), (1.0, 1.0), "rectangle"),
    ShapeClass(8, "triangle", (205, 60, 225), (1.4, 2.0), "triangle"),
    ShapeClass(11, "egg", (30, 215, 215), (0.45, 0.6), "ellipse"),
)
EMPTY_IMAGE_PROB = 0.05
MAX_OBJECTS = 6
MAX_OVERLAP_IOU = 0.3  # some overlap, but no object hidden behind another
MIN_OBJECT_SIDE = 10  # sqrt(area) of the smallest objects, px


def synthetic_settings(num_train: int, num_val: int, canvas_size: int, seed: int) -> dict:
    return {"version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "canvas_size": int(canvas_size), "seed": int(seed)}


def synthetic_set_dir(out_dir: str | os.PathLike, settings: dict) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(out_dir) / f"synthetic-{digest}"


def split_paths(set_dir: Path) -> dict[str, tuple[Path, Path]]:
    return {split: (set_dir / f"{split}2017", set_dir / "annotations" / f"instances_{split}2017.json")
            for split in SPLIT_CODES}


def generate_synthetic_coco(out_dir: str | os.PathLike, num_train: int = 512, num_val: int = 64,
                            canvas_size: int = 320, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write (once) and return ``{"train": (images_dir, annotation_file), "val": (...)}``.

    ``canvas_size`` is the longest side of every image; the other side is 70-100 % of it.
    """
    if int(num_train) < 1 or int(num_val) < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if int(canvas_size) < 64:
        raise ValueError(f"canvas_size must be at least 64 px to fit the shapes, got {canvas_size}")
    settings = synthetic_settings(num_train, num_val, canvas_size, seed)
    set_dir = synthetic_set_dir(out_dir, settings)
    if (set_dir / SETTINGS_FILE).is_file():
        return split_paths(set_dir)

    start = time.perf_counter()
    set_dir.parent.mkdir(parents=True, exist_ok=True)
    building = set_dir.parent / f".{set_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            images_dir, annotation_file = split_paths(building)[split]
            _write_split(images_dir, annotation_file, split, int(count), int(canvas_size), int(seed))
        (building / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        if set_dir.exists() and not (set_dir / SETTINGS_FILE).is_file():
            shutil.rmtree(set_dir)  # an incomplete set left by hand; ours replaces it
        try:
            os.rename(building, set_dir)
        except OSError:
            # Another process renamed an identical set into place first: keep theirs.
            if not (set_dir / SETTINGS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.info("wrote synthetic COCO set (%d train + %d val images, canvas %d px, seed %d) to %s in %.1f s",
             num_train, num_val, canvas_size, seed, set_dir, time.perf_counter() - start)
    return split_paths(set_dir)


def _write_split(images_dir: Path, annotation_file: Path, split: str, count: int,
                 canvas_size: int, seed: int) -> None:
    images_dir.mkdir(parents=True)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        image_id = index + 1
        picture, objects = _draw_image(rng, canvas_size)
        file_name = f"{split}_{image_id:06d}.jpg"
        picture.save(images_dir / file_name, quality=90, subsampling=0)  # 4:4:4: crisp colour edges
        images.append({"id": image_id, "file_name": file_name,
                       "width": picture.width, "height": picture.height})
        for shape in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **shape})
    categories = [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CLASSES]
    document = {"info": {"description": "anchordet synthetic shapes", "version": str(GENERATOR_VERSION)},
                "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    annotation_file.write_text(json.dumps(document, separators=(",", ":")))


def _draw_image(rng: np.random.Generator, canvas_size: int) -> tuple[Image.Image, list[dict]]:
    """One picture and its annotations (bbox xywh tight to the drawn pixels, area of the shape)."""
    short_side = int(round(canvas_size * rng.uniform(0.7, 1.0)))
    width, height = (canvas_size, short_side) if rng.random() < 0.5 else (short_side, canvas_size)
    picture = Image.fromarray(_background(rng, height, width))
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    sizes = np.exp(rng.uniform(math.log(MIN_OBJECT_SIDE), math.log(0.5 * min(width, height)), num_objects))
    placed = torch.zeros((0, 4), dtype=torch.float64)  # xyxy of the objects drawn so far
    objects = []
    draw = ImageDraw.Draw(picture)
    # Largest first, so that smaller shapes are drawn on top and never hidden.
    for size in np.sort(sizes)[::-1]:
        shape_class = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        aspect = rng.uniform(*shape_class.aspect_range)
        w = int(np.clip(round(size * math.sqrt(aspect)), 3, width - 2))
        h = int(np.clip(round(size / math.sqrt(aspect)), 3, height - 2))
        for _attempt in range(20):
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float64)
            if len(placed) == 0 or box_iou(box, placed).max() <= MAX_OVERLAP_IOU:
                break
        else:
            continue  # no free spot: leave this object out rather than bury it
        placed = torch.cat([placed, box])
        jitter = rng.integers(-25, 26, 3)
        colour = tuple(int(c) for c in np.clip(np.array(shape_class.colour) + jitter, 0, 255))
        area, polygon = _draw_shape(draw, shape_class.kind, x0, y0, w, h, colour,
                                    upside_down=rng.random() < 0.5)
        objects.append({"category_id": shape_class.category_id, "bbox": [x0, y0, w, h],
                        "area": round(area, 2), "segmentation": [polygon]})
    return picture, objects


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, w: int, h: int,
                colour: tuple[int, int, int], upside_down: bool) -> tuple[float, list[float]]:
    """Fill the shape whose pixels span columns x0..x0+w-1 and rows y0..y0+h-1 (so its tight xywh
    box is exactly [x0, y0, w, h]); return its area and outline polygon (flat x, y list)."""
    x1, y1 = x0 + w - 1, y0 + h - 1
    if kind == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
        return float(w * h), [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
    if kind == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
        angles = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        xs, ys = x0 + w / 2 * (1 + np.cos(angles)), y0 + h / 2 * (1 + np.sin(angles))
        return math.pi * w * h / 4, np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()
    apex_row, base_row = (y1, y0) if upside_down else (y0, y1)
    draw.polygon([(x0, base_row), (x1, base_row), ((x0 + x1) / 2, apex_row)], fill=colour)
    # The outline follows pixel edges, not pixel centres: the bottom row y1 ends at y0 + h.
    apex_y, base_y = (y0 + h, y0) if upside_down else (y0, y0 + h)
    return w * h / 2, [x0, base_y, x0 + w, base_y, x0 + w / 2, apex_y]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3): a low-saturation gradient, smooth blotches and pixel noise."""
    greys = (rng.uniform(70, 185, 2)[:, None] + rng.uniform(-18, 18, (2, 3))).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    # The ramp is separable in x and y, so broadcasting a row and a column builds it.
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    ramp = xs[None, :] * math.cos(angle) + ys[:, None] * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    picture = greys[0] + (greys[1] - greys[0]) * ramp[..., None]
    picture += 16.0 * _smooth_noise(rng, height, width, cells=6)
    picture += 6.0 * rng.standard_normal((height, width, 3), dtype=np.float32)
    return np.clip(picture, 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """float32 (h, w, 3), roughly standard normal: a ``cells x cells`` grid of random values,
    bilinearly upsampled (PIL's resize on uint8 is much faster than doing it in float numpy)."""
    grid = np.clip(128 + 40 * rng.standard_normal((cells, cells, 3)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)
    return (np.asarray(smooth, dtype=np.float32) - 128.0) / 40.0
