"""CategoryMap: COCO ids <-> contiguous labels, and its trip through a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from anchordet.data import CategoryMap

# COCO-like gaps: ids 1, 3, 90 become labels 0, 1, 2.
IDS, NAMES = [90, 1, 3], ["toothbrush", "person", "car"]


def test_ids_are_sorted_with_their_names_and_numbered_from_zero():
    category_map = CategoryMap(IDS, NAMES)
    assert category_map.category_ids == [1, 3, 90]
    assert category_map.names == ["person", "car", "toothbrush"]
    assert category_map.num_classes == 3 == len(category_map)
    assert [category_map.label_of(i) for i in (1, 3, 90)] == [0, 1, 2]
    assert [category_map.category_id_of(label) for label in (0, 1, 2)] == [1, 3, 90]


def test_round_trip_id_label_id_for_every_category():
    category_map = CategoryMap(IDS, NAMES)
    for category_id in IDS:
        assert category_map.category_id_of(category_map.label_of(category_id)) == category_id
    for label in range(category_map.num_classes):
        assert category_map.label_of(category_map.category_id_of(label)) == label


def test_vectorised_lookups_match_the_scalar_ones():
    category_map = CategoryMap(IDS, NAMES)
    ids = np.array([3, 90, 1, 3])
    assert category_map.labels_of(ids).tolist() == [1, 2, 0, 1]
    assert category_map.labels_of(ids).dtype == np.int64


def test_to_dict_from_dict_round_trip_survives_json():
    category_map = CategoryMap(IDS, NAMES)
    restored = CategoryMap.from_dict(json.loads(json.dumps(category_map.to_dict())))
    assert restored == category_map
    assert restored.to_dict() == {"category_ids": [1, 3, 90], "names": ["person", "car", "toothbrush"]}


def test_survives_torch_save(tmp_path):
    category_map = CategoryMap(IDS, NAMES)
    torch.save({"category_map": category_map.to_dict()}, tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert CategoryMap.from_dict(saved["category_map"]) == category_map


def test_equality_depends_on_ids_and_names_not_on_input_order():
    assert CategoryMap(IDS, NAMES) == CategoryMap([1, 3, 90], ["person", "car", "toothbrush"])
    assert CategoryMap(IDS, NAMES) != CategoryMap([1, 3, 91], ["person", "car", "toothbrush"])
    assert CategoryMap(IDS, NAMES) != CategoryMap([1, 3, 90], ["person", "bus", "toothbrush"])
    assert hash(CategoryMap(IDS, NAMES)) == hash(CategoryMap([1, 3, 90], ["person", "car", "toothbrush"]))


def test_from_categories_matches_what_pycocotools_reads_from_the_file(tmp_path):
    data = {"images": [], "annotations": [],
            "categories": [{"id": i, "name": n} for i, n in zip(reversed(IDS), reversed(NAMES))]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    from_file = CategoryMap.from_categories(coco.loadCats(coco.getCatIds()))
    assert from_file == CategoryMap.from_categories(data["categories"]) == CategoryMap(IDS, NAMES)


def test_unknown_id_and_out_of_range_label_are_named_in_the_error():
    category_map = CategoryMap(IDS, NAMES)
    with pytest.raises(KeyError, match="category id 2 is not in"):
        category_map.label_of(2)
    with pytest.raises(KeyError, match=r"\[2, 4\]"):
        category_map.labels_of([1, 2, 4])
    with pytest.raises(IndexError, match="label 3 is outside 0..2"):
        category_map.category_id_of(3)


def test_bad_construction_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="more than once: \\[3\\]"):
        CategoryMap([1, 3, 3], ["a", "b", "c"])
    with pytest.raises(ValueError, match="one name per category id"):
        CategoryMap([1, 3], ["a"])
    with pytest.raises(ValueError, match="at least one category"):
        CategoryMap([], [])
    with pytest.raises(ValueError, match="'names'"):
        CategoryMap.from_dict({"category_ids": [1]})


def test_describe_difference_names_ids_and_renames():
    first = CategoryMap([1, 2, 3], ["a", "b", "c"])
    second = CategoryMap([2, 3, 4], ["b", "x", "d"])
    text = first.describe_difference(second)
    assert "only in the first: [1]" in text
    assert "only in the second: [4]" in text
    assert "3: 'c' vs 'x'" in text
    assert first.describe_difference(first) == "no difference"
