"""Letterbox, flip and scale jitter keep boxes on the pixels they describe."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from anchordet.data import CocoDetectionDataset, to_original_frame
from anchordet.data.transforms import DetectionTransform

BACKGROUND, RED = (40, 40, 40), (230, 30, 30)
# A 160 x 100 picture with a red rectangle over columns 30..69 and rows 20..49: xyxy (30, 20, 70, 50).
RECT_XYXY = (30, 20, 70, 50)


def is_red(pixels):
    return (pixels[..., 0] > 135) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)


@pytest.fixture
def red_rectangle_set(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    picture = Image.new("RGB", (160, 100), BACKGROUND)
    picture.paste(RED, RECT_XYXY)  # PIL's paste box excludes the right and bottom edges
    picture.save(images_dir / "rect.png")  # lossless, so the edges are exact
    x0, y0, x1, y1 = RECT_XYXY
    data = {"images": [{"id": 1, "file_name": "rect.png", "width": 160, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [x0, y0, x1 - x0, y1 - y0],
                             "iscrowd": 0}],
            "categories": [{"id": 3, "name": "rect"}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return images_dir, tmp_path / "instances.json"


def test_letterbox_by_hand(red_rectangle_set):
    # 160 x 100 into 80: scale 0.5 -> 80 x 50, centred: 15 rows of grey above.
    # (30, 20, 70, 50) * 0.5 + (0, 15, 0, 15) = (15, 25, 35, 40).
    image, target = CocoDetectionDataset(*red_rectangle_set, image_size=80, train=False)[0]
    assert target["scale"] == 0.5 and target["pad"] == (0.0, 15.0)
    assert target["boxes"].tolist() == [[15.0, 25.0, 35.0, 40.0]]
    assert image[:, :15].eq(114).all() and image[:, 65:].eq(114).all()
    assert not image[:, 15:65].eq(114).all(dim=0).any()


def test_val_box_matches_the_red_pixels_and_maps_back_exactly(red_rectangle_set, pixel_box):
    for size in (64, 96, 123, 200):
        image, target = CocoDetectionDataset(*red_rectangle_set, image_size=size, train=False)[0]
        found = pixel_box(image.permute(1, 2, 0).numpy(), is_red)
        assert found is not None
        assert target["boxes"][0].tolist() == pytest.approx(found, abs=1.0), size
        back = to_original_frame(target["boxes"], target)
        assert back[0].tolist() == pytest.approx(list(RECT_XYXY), abs=1e-4), size


def test_train_flip_and_jitter_keep_box_on_the_red_pixels(red_rectangle_set, pixel_box):
    dataset = CocoDetectionDataset(*red_rectangle_set, image_size=96, train=True, hflip_prob=1.0,
                                   scale_range=(0.5, 3.0))
    kept = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
        found = pixel_box(image.permute(1, 2, 0).numpy(), is_red)
        if len(target["boxes"]) == 0:
            # Cropped away: at most a sliver of red (<= 1 px plus a resampled edge) may remain.
            assert found is None or min(found[2] - found[0], found[3] - found[1]) <= 2.0, (seed, found)
            continue
        kept += 1
        assert found is not None, seed
        assert target["boxes"][0].tolist() == pytest.approx(found, abs=1.5), (seed, found)
    assert 10 < kept < 40  # both outcomes happen: boxes survive and get cropped away


def test_forced_flip_mirrors_the_box(red_rectangle_set):
    # Scale jitter pinned to 1: scale 96 / 160 = 0.6; flipped, the rectangle spans 160-70 .. 160-30.
    dataset = CocoDetectionDataset(*red_rectangle_set, image_size=96, train=True, hflip_prob=1.0,
                                   scale_range=(1.0, 1.0))
    for seed in range(5):
        torch.manual_seed(seed)
        _, target = dataset[0]
        left, top = target["pad"]
        assert left == 0.0 and 0.0 <= top <= 36.0  # 60 rows placed anywhere in 96
        expected = [left + 90 * 0.6, top + 20 * 0.6, left + 130 * 0.6, top + 50 * 0.6]
        assert target["boxes"][0].tolist() == pytest.approx(expected, abs=1e-4)


def test_no_flip_when_probability_is_zero(red_rectangle_set):
    dataset = CocoDetectionDataset(*red_rectangle_set, image_size=96, train=True, hflip_prob=0.0,
                                   scale_range=(1.0, 1.0))
    torch.manual_seed(0)
    _, target = dataset[0]
    left, top = target["pad"]
    assert target["boxes"][0].tolist() == pytest.approx([left + 18, top + 12, left + 42, top + 30], abs=1e-4)


def test_large_jitter_crops_and_clips_boxes_to_the_canvas():
    torch.manual_seed(0)
    transform = DetectionTransform(50, train=True, hflip_prob=0.5, scale_range=(2.0, 3.0))
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [10.0, 10.0, 12.0, 12.0], [40.0, 40.0, 60.0, 60.0]])
    labels = torch.tensor([0, 1, 2])
    for _ in range(20):
        out_image, out_boxes, out_labels, scale, (left, top) = transform(image, boxes, labels)
        assert out_image.shape == (3, 50, 50)
        assert 1.0 <= scale <= 1.5 and left <= 0 and top <= 0  # the scaled image covers the canvas
        assert out_boxes.min() >= 0 and out_boxes.max() <= 50
        assert ((out_boxes[:, 2:] - out_boxes[:, :2]) > 1.0).all()
        assert out_labels[0] == 0 and out_boxes[0].tolist() == [0.0, 0.0, 50.0, 50.0]  # covers all
        assert len(out_boxes) == len(out_labels)


def test_to_original_frame_by_hand_and_clipping():
    target = {"pad": (4.0, 10.0), "scale": 0.5, "orig_size": (60, 100)}
    boxes = torch.tensor([[4.0, 10.0, 14.0, 20.0], [0.0, 0.0, 60.0, 60.0]])
    # (box - (4, 10, 4, 10)) / 0.5; the second leaves the 100 x 60 image on every side.
    expected = [[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 100.0, 60.0]]
    assert to_original_frame(boxes, target).tolist() == expected


def test_transform_rejects_bad_settings():
    with pytest.raises(ValueError, match="image_size"):
        DetectionTransform(0, train=False)
    with pytest.raises(ValueError, match="hflip_prob"):
        DetectionTransform(64, train=True, hflip_prob=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        DetectionTransform(64, train=True, scale_range=(1.5, 0.5))
