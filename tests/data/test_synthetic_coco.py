"""The synthetic COCO generator: deterministic, cached, and with the variety anchors need."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import anchordet.data.synthetic as synthetic
from anchordet.data import CocoDetectionDataset, generate_synthetic_coco

SHAPE_COLOURS = {c.category_id: c.colour for c in synthetic.SHAPE_CLASSES}


@pytest.fixture(scope="module")
def varied_set(tmp_path_factory):
    """120 train images at 128 px: enough for every statistic below to be far from its bound."""
    splits = generate_synthetic_coco(tmp_path_factory.mktemp("varied"), num_train=120, num_val=2,
                                     canvas_size=128, seed=0)
    images_dir, annotation_file = splits["train"]
    return images_dir, json.loads(annotation_file.read_text())


def test_layout_is_coco_2017(tmp_path):
    splits = generate_synthetic_coco(tmp_path, num_train=3, num_val=2, canvas_size=64, seed=0)
    (train_images, train_json), (val_images, val_json) = splits["train"], splits["val"]
    assert train_images.name == "train2017" and val_images.name == "val2017"
    assert train_json.name == "instances_train2017.json" and val_json.parent.name == "annotations"
    assert len(list(train_images.glob("*.jpg"))) == 3 and len(list(val_images.glob("*.jpg"))) == 2
    assert train_images.parent.parent == tmp_path  # one folder per settings, inside out_dir
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = generate_synthetic_coco(tmp_path / "a", num_train=6, num_val=2, canvas_size=96, seed=5)
    second = generate_synthetic_coco(tmp_path / "b", num_train=6, num_val=2, canvas_size=96, seed=5)
    for split in ("train", "val"):
        (images_a, json_a), (images_b, json_b) = first[split], second[split]
        assert json_a.read_bytes() == json_b.read_bytes()
        names = sorted(p.name for p in images_a.iterdir())
        assert names == sorted(p.name for p in images_b.iterdir())
        assert all((images_a / n).read_bytes() == (images_b / n).read_bytes() for n in names)
    other = generate_synthetic_coco(tmp_path / "c", num_train=6, num_val=2, canvas_size=96, seed=6)
    assert other["train"][1].read_bytes() != first["train"][1].read_bytes()


def test_growing_the_set_keeps_the_first_images(tmp_path):
    small = generate_synthetic_coco(tmp_path, num_train=3, num_val=1, canvas_size=96, seed=1)
    large = generate_synthetic_coco(tmp_path, num_train=5, num_val=1, canvas_size=96, seed=1)
    assert small["train"][0] != large["train"][0]  # new settings, new folder
    for name in ("train_000001.jpg", "train_000003.jpg"):
        assert (small["train"][0] / name).read_bytes() == (large["train"][0] / name).read_bytes()


def test_second_call_reuses_the_files_without_writing(tmp_path, monkeypatch):
    first = generate_synthetic_coco(tmp_path, num_train=4, num_val=2, canvas_size=64, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    def refuse(*args, **kwargs):
        raise AssertionError("the cached set should have been reused")

    monkeypatch.setattr(synthetic, "_write_split", refuse)
    again = generate_synthetic_coco(tmp_path, num_train=4, num_val=2, canvas_size=64, seed=0)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    with pytest.raises(AssertionError, match="reused"):  # other settings do regenerate
        generate_synthetic_coco(tmp_path, num_train=4, num_val=2, canvas_size=64, seed=1)


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_synthetic_coco(tmp_path, num_train=0, num_val=2)
    with pytest.raises(ValueError, match="canvas_size"):
        generate_synthetic_coco(tmp_path, num_train=2, num_val=2, canvas_size=32)


def test_at_least_five_categories_with_clearly_different_aspect_ratios(varied_set):
    _, data = varied_set
    boxes = np.array([a["bbox"] for a in data["annotations"]], dtype=float)
    category_ids = np.array([a["category_id"] for a in data["annotations"]])
    assert len(data["categories"]) >= 5 and set(category_ids) == {c["id"] for c in data["categories"]}
    log_aspects = sorted(np.log(boxes[category_ids == c, 2] / boxes[category_ids == c, 3]).mean()
                         for c in np.unique(category_ids))
    # Groups of mean aspect ratios more than a factor 1.3 apart from their neighbours.
    groups = 1 + sum(b - a > math.log(1.3) for a, b in zip(log_aspects, log_aspects[1:]))
    assert groups >= 5, np.exp(log_aspects)
    assert np.exp(log_aspects[0]) < 0.35 and np.exp(log_aspects[-1]) > 3  # tall poles, wide bars


def test_sizes_from_small_to_large_several_objects_and_empty_images(varied_set):
    _, data = varied_set
    boxes = np.array([a["bbox"] for a in data["annotations"]], dtype=float)
    longest = boxes[:, 2:].max(axis=1)
    assert (longest < 32).mean() > 0.2  # COCO "small" objects are common
    assert (longest > 0.4 * 128).sum() >= 10
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=121)[1:]
    assert 1 <= (per_image == 0).sum() <= 15  # a few empty images
    assert (per_image >= 3).sum() > 30


def test_some_objects_overlap_and_images_are_not_all_square(varied_set):
    _, data = varied_set
    assert len({(i["width"], i["height"]) for i in data["images"]}) > 10
    assert all(max(i["width"], i["height"]) == 128 for i in data["images"])
    overlapping_images = 0
    for image in data["images"]:
        boxes = np.array([a["bbox"] for a in data["annotations"] if a["image_id"] == image["id"]], float)
        if len(boxes) < 2:
            continue
        x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
        inter_w = np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0)
        inter_h = np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0)
        overlap = (inter_w > 0) & (inter_h > 0)
        overlapping_images += bool(overlap[~np.eye(len(boxes), dtype=bool)].any())
    assert overlapping_images >= 5


def test_annotations_are_tight_crowd_free_and_areas_match_the_shapes(varied_set):
    images_dir, data = varied_set
    kinds = {c.category_id: c.kind for c in synthetic.SHAPE_CLASSES}
    area_factor = {"rectangle": 1.0, "ellipse": math.pi / 4, "triangle": 0.5}
    sizes = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        assert annotation["iscrowd"] == 0 and 0 <= x and 0 <= y and x + w <= width and y + h <= height
        shape_area = area_factor[kinds[annotation["category_id"]]] * w * h
        assert annotation["area"] == pytest.approx(shape_area, abs=0.01)
    # Pixels: for the biggest rectangle with nothing else within 3 px, the pixels of its colour
    # span exactly its box (to within a pixel of JPEG blur).
    def isolated(a):
        x, y, w, h = a["bbox"]
        return not any(b is not a and b["image_id"] == a["image_id"] and b["bbox"][0] < x + w + 3
                       and x - 3 < b["bbox"][0] + b["bbox"][2] and b["bbox"][1] < y + h + 3
                       and y - 3 < b["bbox"][1] + b["bbox"][3] for b in data["annotations"])

    rectangles = [a for a in data["annotations"] if kinds[a["category_id"]] == "rectangle" and isolated(a)]
    biggest = max(rectangles, key=lambda a: a["area"])
    x, y, w, h = biggest["bbox"]
    file_name = next(i["file_name"] for i in data["images"] if i["id"] == biggest["image_id"])
    pixels = np.asarray(Image.open(images_dir / file_name).convert("RGB"), dtype=float)
    colour = pixels[y + 2:y + h - 2, x + 2:x + w - 2].reshape(-1, 3).mean(axis=0)
    assert np.abs(colour - SHAPE_COLOURS[biggest["category_id"]]).max() <= 30  # class colour + jitter
    top, left = max(y - 3, 0), max(x - 3, 0)
    window = pixels[top:y + h + 3, left:x + w + 3]
    rows, columns = np.nonzero(np.abs(window - colour).max(axis=2) < 50)
    found = [columns.min() + left, rows.min() + top, columns.max() + 1 + left, rows.max() + 1 + top]
    assert found == pytest.approx([x, y, x + w, y + h], abs=1)


def test_generated_set_passes_dataset_validation(synthetic_splits):
    images_dir, annotation_file = synthetic_splits["train"]
    dataset = CocoDetectionDataset(images_dir, annotation_file, 96, train=False)
    assert dataset.category_map.names == [c.name for c in synthetic.SHAPE_CLASSES]
    assert dataset.category_map.category_ids != list(range(dataset.category_map.num_classes))
    image, target = dataset[0]
    assert image.shape == (3, 96, 96) and target["orig_size"] == (
        dataset.index.heights[0], dataset.index.widths[0])


def _generate_in_child(out_dir):
    return generate_synthetic_coco(out_dir, num_train=20, num_val=4, canvas_size=96, seed=2)


def test_concurrent_generation_leaves_one_complete_set(tmp_path):
    """DDP ranks may all generate at once: each builds privately, one rename wins, all agree."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_generate_in_child, [tmp_path] * 3)
    assert results[0] == results[1] == results[2]
    assert [p.name for p in tmp_path.iterdir()] == [results[0]["train"][0].parent.name]
    dataset = CocoDetectionDataset(*results[0]["train"], 96, train=False)
    assert len(dataset) == 20
