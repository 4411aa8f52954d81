"""What the dataset makes of images and annotations: colour modes, EXIF, crowd, degenerate, empty."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from anchordet.data import CocoDetectionDataset, DatasetError

RED = (220, 30, 40)


def single_image_set(tmp_path, picture: Image.Image, file_name: str, width: int, height: int,
                     annotations=()):
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    save_options = picture.info.pop("save_options", {})
    picture.save(images_dir / file_name, **save_options)
    data = {"images": [{"id": 7, "file_name": file_name, "width": width, "height": height}],
            "annotations": list(annotations), "categories": [{"id": 1, "name": "thing"}]}
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(data))
    return images_dir, annotation_file


def palette_picture() -> Image.Image:
    """Every pixel is palette index 3, which the palette says is RED."""
    picture = Image.new("P", (40, 30), 3)
    picture.putpalette([0, 0, 0] * 3 + list(RED) + [255, 255, 255] * 252)
    return picture


def palette_with_transparency() -> Image.Image:
    picture = palette_picture()
    picture.info["save_options"] = {"transparency": 255}  # index 255 transparent, unused here
    return picture


# mode name -> (picture 40 x 30, file name, the RGB it must load as)
MODES = {
    "grayscale": (lambda: Image.new("L", (40, 30), 200), "g.jpg", (200, 200, 200)),
    "cmyk": (lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "c.jpg", (255, 0, 0)),
    "palette": (palette_picture, "p.png", RED),
    "palette_transparency": (palette_with_transparency, "t.png", RED),
    "rgba": (lambda: Image.new("RGBA", (40, 30), RED + (128,)), "a.png", RED),
    "grayscale_alpha": (lambda: Image.new("LA", (40, 30), (200, 255)), "la.png", (200, 200, 200)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_colour_mode_loads_as_rgb(tmp_path, mode):
    make_picture, file_name, expected_rgb = MODES[mode]
    images_dir, annotation_file = single_image_set(tmp_path, make_picture(), file_name, 40, 30)
    # image_size = longest side: scale 1, so pixels are not resampled; 30 rows centred -> pad top 5.
    image, target = CocoDetectionDataset(images_dir, annotation_file, 40, train=False)[0]
    assert image.shape == (3, 40, 40) and image.dtype == torch.uint8
    assert target["orig_size"] == (30, 40) and target["pad"] == (0.0, 5.0) and target["scale"] == 1.0
    centre = image[:, 20, 20].int()
    assert torch.allclose(centre, torch.tensor(expected_rgb, dtype=torch.int32), atol=6), centre
    assert image[:, 2, 20].tolist() == [114, 114, 114]  # the letterbox bar


def exif_rotated_picture() -> Image.Image:
    """Stored 60 x 40 with a red top-left corner; EXIF orientation 6 = show rotated 90 deg clockwise,
    so the displayed image is 40 wide, 60 high, with the red corner at its top right."""
    stored = np.full((40, 60, 3), 90, dtype=np.uint8)
    stored[:10, :10] = RED
    picture = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.info["save_options"] = {"exif": exif, "quality": 95}
    return picture


def test_exif_orientation_is_applied(tmp_path):
    images_dir, annotation_file = single_image_set(
        tmp_path, exif_rotated_picture(), "r.jpg", width=40, height=60,
        annotations=[{"id": 1, "image_id": 7, "category_id": 1, "bbox": [30, 0, 10, 10], "iscrowd": 0}])
    image, target = CocoDetectionDataset(images_dir, annotation_file, 60, train=False)[0]
    assert target["orig_size"] == (60, 40)
    assert target["pad"] == (10.0, 0.0)  # 40 columns centred in 60
    # Displayed top-right 10 x 10 block is red: canvas columns 10 + 30 .. 10 + 40, rows 0 .. 10.
    assert image[:, 5, 45].tolist() == pytest.approx(list(RED), abs=12)
    assert image[:, 5, 15].tolist() == pytest.approx([90, 90, 90], abs=12)
    assert target["boxes"].tolist() == [[40.0, 0.0, 50.0, 10.0]]


def test_exif_image_with_stored_size_in_json_is_an_error(tmp_path):
    images_dir, annotation_file = single_image_set(tmp_path, exif_rotated_picture(), "r.jpg",
                                                   width=60, height=40)
    dataset = CocoDetectionDataset(images_dir, annotation_file, 60, train=False)
    with pytest.raises(DatasetError, match="r.jpg.*image id 7.*40x60.*width=60, height=40"):
        dataset[0]


FIXED_BOXES = [
    {"id": 20, "image_id": 1, "category_id": 2, "bbox": [5, 5, 30, 30], "iscrowd": 1},
    {"id": 21, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0.5, 30], "iscrowd": 0},
    # 10 px wide in the JSON, but the image is 80 wide: clipped to 0.5 px, then too small
    {"id": 22, "image_id": 1, "category_id": 2, "bbox": [79.5, 5, 10, 10], "iscrowd": 0},
    {"id": 23, "image_id": 2, "category_id": 5, "bbox": [5, 5, 20, -3], "iscrowd": 0},
    # 3/4 outside the image (x 60..100 of 80 wide): clipped by 20 px, kept
    {"id": 24, "image_id": 1, "category_id": 2, "bbox": [60, 10, 40, 10], "iscrowd": 0},
    # wholly outside (x 90..100): dropped
    {"id": 25, "image_id": 1, "category_id": 2, "bbox": [90, 10, 10, 10], "iscrowd": 0},
]


def test_every_box_fix_is_reported_with_its_annotation_ids(tiny_coco, caplog):
    data = tiny_coco.copy_data()
    data["annotations"] += FIXED_BOXES
    with caplog.at_level(logging.INFO, logger="anchordet.data"):
        dataset = CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(data), 80, train=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "anchordet.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0]
    assert "1 boxes with a negative width or height dropped (annotation ids 23)" in message
    assert "1 boxes wholly outside their image dropped (annotation ids 25)" in message
    assert "2 boxes of 1 px or less after clipping dropped (annotation ids 21, 22)" in message
    assert "1 boxes clipped to their image (by up to 20.0 px) (annotation ids 24)" in message
    info = [r.getMessage() for r in caplog.records if r.name == "anchordet.data" and r.levelno == logging.INFO]
    assert len(info) == 1
    assert "1 crowd" in info[0] and "4 boxes dropped" in info[0] and "9 annotations -> 4 boxes" in info[0]
    assert "(1 without objects, kept)" in info[0]
    assert dataset.index.num_crowd == 1 and dataset.index.num_dropped == 4
    assert [len(dataset[i][1]["boxes"]) for i in range(3)] == [3, 1, 0]
    # The clipped box is cut at the image border (80 px wide, letterboxed at scale 1).
    boxes = dataset[0][1]["boxes"]
    assert boxes[:, 2].max().item() == pytest.approx(80.0)


def test_strict_data_turns_the_first_fix_into_an_error_naming_file_and_ids(tiny_coco):
    data = tiny_coco.copy_data()
    data["annotations"] += FIXED_BOXES[4:5]  # one clipped box is enough
    path = tiny_coco.write(data)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}: data.strict=true and 1 boxes clipped.*ids 24"):
        CocoDetectionDataset(tiny_coco.images_dir, path, 80, train=False, strict=True)
    CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(), 80, train=False, strict=True)  # clean: fine


def test_image_without_annotations_is_kept_with_empty_targets(tiny_coco):
    dataset = CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(), 64, train=True)
    assert dataset.image_ids == [1, 2, 3]
    image, target = dataset[2]
    assert image.shape == (3, 64, 64)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_target_follows_the_contract(tiny_coco):
    dataset = CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(), 40, train=False)
    image, target = dataset[0]
    assert set(target) == {"boxes", "labels", "image_id", "orig_size", "scale", "pad"}
    assert image.shape == (3, 40, 40) and image.dtype == torch.uint8
    assert isinstance(target["image_id"], int) and target["image_id"] == 1
    assert target["orig_size"] == (60, 80)
    # 80 x 60 -> scale 40 / 80 = 0.5, 30 rows centred in 40: pad top 5.
    assert target["scale"] == 0.5 and target["pad"] == (0.0, 5.0)
    # Annotation 10: xywh (10, 10, 30, 20) -> xyxy (10, 10, 40, 30) -> * 0.5 + (0, 5).
    # Annotation 11: xywh (50, 5, 20, 40) -> xyxy (50, 5, 70, 45) -> (25, 7.5, 35, 27.5).
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[5.0, 10.0, 20.0, 20.0], [25.0, 7.5, 35.0, 27.5]]
    # Category 5 ("box") and 2 ("ball"): sorted ids [2, 5] -> labels 1 and 0.
    assert target["labels"].tolist() == [1, 0]
    assert dataset.category_map.names == ["ball", "box"]


def test_index_lists_images_sorted_by_id(tiny_coco):
    data = tiny_coco.copy_data()
    data["images"].reverse()
    dataset = CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(data), 64, train=False)
    assert dataset.image_ids == [1, 2, 3]
    assert [dataset[i][1]["image_id"] for i in range(3)] == [1, 2, 3]
    assert [len(dataset[i][1]["boxes"]) for i in range(3)] == [2, 1, 0]


def test_letterbox_box_sizes_are_scaled_widths_and_heights(tiny_coco):
    dataset = CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(), 40, train=True)
    # Image 1 (80 x 60): scale 0.5; image 2 (60 x 80): scale 0.5. Boxes: 30x20, 20x40, 40x40.
    assert dataset.letterbox_box_sizes().tolist() == [[15.0, 10.0], [10.0, 20.0], [20.0, 20.0]]


def test_file_without_any_annotations_gives_empty_targets(tiny_coco):
    data = tiny_coco.copy_data()
    data["annotations"] = []
    dataset = CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(data), 64, train=True)
    assert len(dataset) == 3
    assert all(dataset[i][1]["boxes"].shape == (0, 4) for i in range(3))
    assert dataset.letterbox_box_sizes().shape == (0, 2)
