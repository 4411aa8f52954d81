"""Up-front image checks: header, size after EXIF orientation, JPEG end marker; the cache; what the
dataset does with bad images under data.on_bad_image=error and =skip."""

import logging
import os
import re

import pytest
from PIL import Image

import anchordet.data.verify as verify
from anchordet.data import CocoDetectionDataset, DatasetError
from anchordet.data.verify import check_image, verify_images


def jpeg(path, width=40, height=30, exif_orientation=None):
    # Noise, so the compressed scan is many times longer than the headers: cutting the file's
    # last bytes then truncates image data, as an interrupted copy does.
    image = Image.effect_noise((width, height), 64).convert("RGB")
    if exif_orientation is None:
        image.save(path, quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, quality=90, exif=exif)
    return path


def test_each_kind_of_bad_image_is_recognised(tmp_path):
    good = jpeg(tmp_path / "good.jpg")
    assert check_image(str(good), (30, 40)) is None
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:-200])
    assert check_image(str(truncated), (30, 40)) == "a truncated JPEG (no end-of-image marker)"
    assert "40x30 pixels" in check_image(str(good), (40, 30))  # the JSON swapped width and height
    (tmp_path / "text.jpg").write_text("not an image")
    assert check_image(str(tmp_path / "text.jpg"), (30, 40)).startswith("not a readable image")
    assert check_image(str(tmp_path / "missing.jpg"), (30, 40)) == "the file does not exist"
    # Stored 40 x 30 but shown rotated (orientation 6): COCO's width/height are the displayed 30 x 40.
    rotated = jpeg(tmp_path / "rotated.jpg", exif_orientation=6)
    assert check_image(str(rotated), (40, 30)) is None
    Image.new("RGB", (40, 30)).save(tmp_path / "ok.png")  # not a JPEG: no end marker to look for
    assert check_image(str(tmp_path / "ok.png"), (30, 40)) is None


def test_results_are_cached_by_size_and_mtime_and_worker_processes_agree(tmp_path, monkeypatch):
    names = []
    for k in range(6):
        jpeg(tmp_path / f"{k}.jpg")
        names.append(f"{k}.jpg")
    (tmp_path / "3.jpg").write_bytes((tmp_path / "3.jpg").read_bytes()[:-200])
    sizes, ids, cache = [(30, 40)] * 6, list(range(10, 16)), tmp_path / "cache"
    first = verify_images(tmp_path, names, ids, sizes, cache_dir=cache, num_workers=2)
    assert [(b.image_id, b.file_name) for b in first] == [(13, "3.jpg")]
    assert verify_images(tmp_path, names, ids, sizes, num_workers=0) == first  # one process, no cache

    def must_not_run(path, hw):
        raise AssertionError(f"{path} was checked again although unchanged")

    monkeypatch.setattr(verify, "check_image", must_not_run)
    assert verify_images(tmp_path, names, ids, sizes, cache_dir=cache) == first
    # A changed file (size or mtime) and a changed expected size are checked again.
    monkeypatch.setattr(verify, "check_image", lambda path, hw: f"checked {os.path.basename(path)} {hw}")
    os.utime(tmp_path / "1.jpg", ns=(1, 1))
    again = verify_images(tmp_path, names, ids, [(30, 40)] * 5 + [(40, 30)], cache_dir=cache)
    assert [str(b) for b in again] == ["1.jpg (image id 11): checked 1.jpg (30, 40)",
                                       "3.jpg (image id 13): a truncated JPEG (no end-of-image marker)",
                                       "5.jpg (image id 15): checked 5.jpg (40, 30)"]


def corrupt_second_image(tiny_coco):
    path = tiny_coco.images_dir / "0002.jpg"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def test_bad_images_stop_the_run_before_training_with_their_names(tiny_coco):
    corrupt_second_image(tiny_coco)
    with pytest.raises(DatasetError, match=r"1 of 3 images listed in .*instances.json cannot be used:\n  "
                                           r"0002.jpg \(image id 2\): .*\nreplace or remove them, or set data.on_bad_image=skip"):
        CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(), 64, train=True, verify_images=True)


def test_skip_leaves_bad_images_out_and_replaces_one_that_breaks_later(tiny_coco, caplog):
    corrupt_second_image(tiny_coco)
    with caplog.at_level(logging.WARNING, logger="anchordet.data"):
        dataset = CocoDetectionDataset(tiny_coco.images_dir, tiny_coco.write(), 64, train=False,
                                       verify_images=True, on_bad_image="skip")
    assert dataset.image_ids == [1, 3] and "leaving out 1 of 3 images" in caplog.text
    # Image 1 breaks after the check: it is replaced by the next one (image 3), and counted.
    (tiny_coco.images_dir / "0001.jpg").write_text("broken since")
    image, target = dataset[0]
    assert target["image_id"] == 3 and dataset.replaced_images == 1
    assert re.search(r"replacing an image that failed to load \(1 in this process so far\).*0001.jpg", caplog.text)
