"""Fixtures for the data tests: a tiny hand-written COCO set and a small synthetic one."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anchordet.data import generate_synthetic_coco


@dataclass
class TinyCoco:
    """Three images, two categories (ids 2 and 5, so labels differ from ids), three annotations.

    image 1: 80 x 60 (w x h), annotations 10 (category 5) and 11 (category 2)
    image 2: 60 x 80, annotation 12 (category 5)
    image 3: 50 x 50, no annotations
    """

    root: Path
    images_dir: Path
    data: dict

    def write(self, data: dict | None = None, name: str = "instances.json") -> Path:
        path = self.root / name
        path.write_text(json.dumps(self.data if data is None else data))
        return path

    def copy_data(self) -> dict:
        return copy.deepcopy(self.data)


def write_image(path: Path, width: int, height: int, colour=(90, 90, 90)) -> None:
    Image.new("RGB", (width, height), colour).save(path)


@pytest.fixture
def tiny_coco(tmp_path: Path) -> TinyCoco:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    sizes = {1: (80, 60), 2: (60, 80), 3: (50, 50)}
    images = []
    for image_id, (width, height) in sizes.items():
        file_name = f"{image_id:04d}.jpg"
        write_image(images_dir / file_name, width, height)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [50, 5, 20, 40], "area": 800, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 5, "bbox": [5, 30, 40, 40], "area": 1600, "iscrowd": 0},
    ]
    categories = [{"id": 5, "name": "box"}, {"id": 2, "name": "ball"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    return TinyCoco(root=tmp_path, images_dir=images_dir, data=data)


@pytest.fixture(scope="session")
def synthetic_splits(tmp_path_factory) -> dict:
    """A small synthetic set shared by the data-module tests (read-only!)."""
    out_dir = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_coco(out_dir, num_train=12, num_val=5, canvas_size=96, seed=3)


def coloured_pixel_box(image: np.ndarray, colour_test) -> tuple[float, float, float, float] | None:
    """Tight xyxy box (pixel edges) of the pixels of ``image`` (h, w, 3) where ``colour_test`` holds."""
    mask = colour_test(image.astype(np.int32))
    if not mask.any():
        return None
    columns, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1)


@pytest.fixture
def pixel_box():
    """The helper above as a fixture: test modules cannot import conftest reliably."""
    return coloured_pixel_box
