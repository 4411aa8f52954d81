"""Every bad input gives a DatasetError that names the file or id at fault, and when it is caught.

JSON problems and missing files fail at construction; problems that need the pixels (an unreadable
file, a size that disagrees with the JSON) fail when that image is loaded.
"""

from __future__ import annotations

import re

import pytest

from anchordet.data import CocoDetectionDataset, DatasetError


def build(tiny_coco, annotation_file, images_dir=None):
    return CocoDetectionDataset(images_dir or tiny_coco.images_dir, annotation_file, image_size=64,
                                train=False)


def expect_error(*fragments):
    """pytest.raises for a DatasetError whose message contains every fragment literally."""
    lookaheads = "".join(f"(?=.*{re.escape(str(fragment))})" for fragment in fragments)
    return pytest.raises(DatasetError, match="(?s)" + lookaheads)


def test_valid_tiny_set_builds(tiny_coco):
    dataset = build(tiny_coco, tiny_coco.write())
    assert len(dataset) == 3


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


def test_missing_annotation_file(tiny_coco):
    missing = tiny_coco.root / "nope" / "instances.json"
    with expect_error(missing, "does not exist"):
        build(tiny_coco, missing)


def test_missing_image_folder(tiny_coco):
    folder = tiny_coco.root / "no_images_here"
    with expect_error(folder, "image folder"):
        build(tiny_coco, tiny_coco.write(), images_dir=folder)


def test_invalid_json(tiny_coco):
    path = tiny_coco.root / "broken.json"
    path.write_text('{"images": [1, 2,')
    with expect_error(path, "not valid JSON", "line 1"):
        build(tiny_coco, path)


@pytest.mark.parametrize("section", ["images", "annotations", "categories"])
def test_missing_section(tiny_coco, section):
    data = tiny_coco.copy_data()
    del data[section]
    path = tiny_coco.write(data)
    with expect_error(path, f"'{section}' section is missing"):
        build(tiny_coco, path)


def test_empty_bbox(tiny_coco):
    data = tiny_coco.copy_data()
    data["annotations"][1]["bbox"] = []
    path = tiny_coco.write(data)
    with expect_error(path, "annotation id 11", "empty bbox"):
        build(tiny_coco, path)


@pytest.mark.parametrize("bbox", [["a", 1, 2, 3], [1, 2, None, 4], [1, 2, 3], "1 2 3 4",
                                  [1, 2, float("nan"), 4]])
def test_non_numeric_or_malformed_bbox(tiny_coco, bbox):
    data = tiny_coco.copy_data()
    data["annotations"][2]["bbox"] = bbox
    path = tiny_coco.write(data)
    with expect_error(path, "annotation id 12", "bbox"):
        build(tiny_coco, path)


def test_duplicate_image_ids(tiny_coco):
    data = tiny_coco.copy_data()
    data["images"][2]["id"] = 2  # image 3 now claims id 2 as well
    path = tiny_coco.write(data)
    with expect_error(path, "image id 2 appears 2 times"):
        build(tiny_coco, path)


def test_duplicate_annotation_ids(tiny_coco):
    data = tiny_coco.copy_data()
    data["annotations"][2]["id"] = 10
    path = tiny_coco.write(data)
    with expect_error(path, "annotation id 10 appears 2 times"):
        build(tiny_coco, path)


def test_annotation_for_unknown_image(tiny_coco):
    data = tiny_coco.copy_data()
    data["annotations"][1]["image_id"] = 99
    path = tiny_coco.write(data)
    with expect_error(path, "annotation id 11", "image id 99"):
        build(tiny_coco, path)


def test_annotation_for_unknown_category(tiny_coco):
    data = tiny_coco.copy_data()
    data["annotations"][0]["category_id"] = 42
    path = tiny_coco.write(data)
    with expect_error(path, "annotation id 10", "category id 42"):
        build(tiny_coco, path)


def test_missing_field_names_the_entry(tiny_coco):
    data = tiny_coco.copy_data()
    del data["annotations"][1]["category_id"]
    path = tiny_coco.write(data)
    with expect_error(path, "id 11", "'category_id'"):
        build(tiny_coco, path)


def test_non_integer_id_names_the_entry(tiny_coco):
    data = tiny_coco.copy_data()
    data["images"][1]["id"] = "2"
    path = tiny_coco.write(data)
    with expect_error(path, "image #1", "'2'", "integer"):
        build(tiny_coco, path)


def test_missing_image_file_is_caught_up_front(tiny_coco):
    (tiny_coco.images_dir / "0002.jpg").unlink()
    with expect_error("0002.jpg", "image id 2", "does not exist"):
        build(tiny_coco, tiny_coco.write())


def test_unreadable_image_file_fails_on_load_naming_file_and_id(tiny_coco):
    (tiny_coco.images_dir / "0002.jpg").write_bytes(b"this is not a jpeg")
    dataset = build(tiny_coco, tiny_coco.write())  # existence is all construction checks
    dataset[0]
    with expect_error("0002.jpg", "image id 2", "cannot read"):
        dataset[1]


@pytest.mark.parametrize("file_name", ["../0001.jpg", "sub/../../0001.jpg", "/etc/hostname"])
def test_file_name_outside_the_image_folder(tiny_coco, file_name):
    data = tiny_coco.copy_data()
    data["images"][1]["file_name"] = file_name
    path = tiny_coco.write(data)
    with expect_error(path, "image id 2", file_name, "not a path inside"):
        build(tiny_coco, path)


def test_file_name_in_a_subfolder_is_fine(tiny_coco):
    (tiny_coco.images_dir / "sub").mkdir()
    (tiny_coco.images_dir / "0002.jpg").rename(tiny_coco.images_dir / "sub" / "0002.jpg")
    data = tiny_coco.copy_data()
    data["images"][1]["file_name"] = "sub/0002.jpg"
    dataset = build(tiny_coco, tiny_coco.write(data))
    assert dataset[1][1]["orig_size"] == (80, 60)


def test_image_size_disagreeing_with_json_fails_on_load(tiny_coco):
    data = tiny_coco.copy_data()
    data["images"][0]["width"] = 81  # the file is 80 x 60
    dataset = build(tiny_coco, tiny_coco.write(data))
    with expect_error("0001.jpg", "image id 1", "80x60", "width=81"):
        dataset[0]


def test_non_positive_image_size_is_caught_up_front(tiny_coco):
    data = tiny_coco.copy_data()
    data["images"][2]["height"] = 0
    path = tiny_coco.write(data)
    with expect_error(path, "image id 3", "'height'"):
        build(tiny_coco, path)


def test_given_category_map_must_match_the_file(tiny_coco):
    from anchordet.data import CategoryMap

    other = CategoryMap([2, 5, 7], ["ball", "box", "kite"])
    path = tiny_coco.write()
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*ids only in the map: \\[7\\]"):
        CocoDetectionDataset(tiny_coco.images_dir, path, 64, train=False, category_map=other)
