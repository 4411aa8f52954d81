"""Real COCO data: the 128 train2017 images of ``../shared/data/coco128`` beside the checkout.

The expected box count is worked out here from the raw JSON, independently of the dataset code:
every annotation minus the crowd regions minus the boxes that are <= 1 px wide or high once clipped
to their image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from anchordet.data import CocoDataModule, CocoDetectionDataset, to_original_frame

COCO128 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "coco128"
IMAGES, ANNOTATIONS = COCO128 / "train2017", COCO128 / "annotations" / "instances_train2017.json"

pytestmark = pytest.mark.skipif(
    not ANNOTATIONS.is_file(),
    reason=f"coco128 not found at {COCO128.resolve()} (the shared data folder beside the checkout)")


def expected_counts() -> dict:
    data = json.loads(ANNOTATIONS.read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    crowd = degenerate = 0
    for annotation in data["annotations"]:
        if annotation["iscrowd"]:
            crowd += 1
            continue
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        clipped_w = min(x + w, width) - max(x, 0)
        clipped_h = min(y + h, height) - max(y, 0)
        degenerate += clipped_w <= 1 or clipped_h <= 1
    total = len(data["annotations"])
    return {"total": total, "crowd": crowd, "degenerate": degenerate,
            "boxes": total - crowd - degenerate, "images": len(data["images"])}


@pytest.fixture(scope="module")
def coco128():
    return CocoDetectionDataset(IMAGES, ANNOTATIONS, image_size=320, train=False)


def test_raw_counts_are_what_the_shared_readme_says():
    counts = expected_counts()
    assert counts["total"] == 939 and counts["images"] == 128 and counts["crowd"] == 10


def test_all_images_load_and_boxes_equal_annotations_minus_crowd_and_degenerate(coco128):
    counts = expected_counts()
    assert len(coco128) == counts["images"] == 128
    modes = {}
    num_boxes = 0
    for i in range(len(coco128)):
        with Image.open(IMAGES / str(coco128.index.file_names[i])) as raw:
            modes[raw.mode] = modes.get(raw.mode, 0) + 1
        image, target = coco128[i]
        assert image.shape == (3, 320, 320) and image.dtype == torch.uint8
        assert target["boxes"].dtype == torch.float32 and len(target["boxes"]) == len(target["labels"])
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= 320).all()
        num_boxes += len(target["boxes"])
    assert num_boxes == counts["boxes"]
    assert modes.get("L", 0) >= 1  # the grayscale image came out with three channels too
    assert coco128.index.num_crowd == counts["crowd"]
    assert coco128.index.num_dropped == counts["degenerate"]  # sides <= 1 px once clipped


def test_labels_are_contiguous_over_the_80_categories(coco128):
    assert coco128.category_map.num_classes == 80
    assert coco128.category_map.category_ids[-1] == 90  # COCO's ids have gaps; labels do not
    assert coco128.labels.min() >= 0 and coco128.labels.max() <= 79


def test_boxes_map_back_to_the_original_annotations(coco128):
    data = json.loads(ANNOTATIONS.read_text())
    image_id = coco128.image_ids[0]
    raw = [a["bbox"] for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
    _, target = coco128[0]
    back = to_original_frame(target["boxes"], target)
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in raw])
    assert torch.allclose(back, expected, atol=1e-3)


def test_datamodule_over_coco128_box_sizes_and_one_line_summary(caplog):
    with caplog.at_level(logging.INFO, logger="anchordet.data"):
        datamodule = CocoDataModule(train_images=IMAGES, train_annotations=ANNOTATIONS,
                                    val_images=IMAGES, val_annotations=ANNOTATIONS, image_size=640)
        sizes = datamodule.train_box_sizes()
    assert sizes.shape == (expected_counts()["boxes"], 2)
    summaries = [r.getMessage() for r in caplog.records if r.name == "anchordet.data"]
    assert len(summaries) == 1 and "10 crowd" in summaries[0]
    assert datamodule.num_classes == 80


def test_training_samples_stay_inside_the_canvas():
    dataset = CocoDetectionDataset(IMAGES, ANNOTATIONS, image_size=256, train=True, scale_range=(0.5, 1.5))
    torch.manual_seed(0)
    for i in range(0, len(dataset), 16):
        image, target = dataset[i]
        boxes = target["boxes"]
        assert image.shape == (3, 256, 256)
        assert (boxes >= 0).all() and (boxes <= 256).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 1).all()
