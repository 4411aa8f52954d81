"""CocoDataModule / SyntheticCocoDataModule: paths, loaders, batches, box sizes (and the anchor cache
key made from them)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from anchordet.data.sampling import EpochShuffleSampler
from anchordet.data import (
    CocoDataModule,
    DatasetError,
    SyntheticCocoDataModule,
    collate,
    generate_synthetic_coco,
)


def module_over(splits, **kwargs) -> CocoDataModule:
    (train_images, train_json), (val_images, val_json) = splits["train"], splits["val"]
    kwargs.setdefault("num_workers", 0)
    return CocoDataModule(train_images=train_images, train_annotations=train_json,
                          val_images=val_images, val_annotations=val_json, **kwargs)


def test_root_means_the_coco_2017_layout_and_explicit_paths_win(synthetic_splits, tiny_coco):
    root = synthetic_splits["train"][0].parent
    datamodule = CocoDataModule(root=root, image_size=64)
    assert datamodule.train_annotation_file == root / "annotations" / "instances_train2017.json"
    assert datamodule.val_annotation_file == root / "annotations" / "instances_val2017.json"
    assert datamodule.train_dataset.index.images_dir == root / "train2017"
    assert datamodule.val_dataset.index.images_dir == root / "val2017"
    override = CocoDataModule(root=root, val_annotations=tiny_coco.write(), val_images=tiny_coco.images_dir)
    assert override.val_annotation_file == tiny_coco.root / "instances.json"
    assert override.train_annotation_file == root / "annotations" / "instances_train2017.json"


def test_missing_paths_name_the_config_key():
    with pytest.raises(DatasetError, match="data.train_images"):
        CocoDataModule(val_images="v", val_annotations="v.json").category_map
    with pytest.raises(DatasetError, match="data.val_annotations"):
        CocoDataModule(train_images="t", train_annotations="t.json", val_images="v").val_annotation_file


def test_batches_follow_the_contract(synthetic_splits):
    datamodule = module_over(synthetic_splits, image_size=64, batch_size=4)
    datamodule.setup("fit")
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        images, targets = next(iter(loader))
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
        assert isinstance(targets, list) and len(targets) == 4
        for target in targets:
            assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1:] == (4,)
            assert target["labels"].dtype == torch.int64
            assert target["labels"].shape == (target["boxes"].shape[0],)
            assert ((target["labels"] >= 0) & (target["labels"] < datamodule.num_classes)).all()
            assert isinstance(target["image_id"], int) and len(target["orig_size"]) == 2
            assert isinstance(target["scale"], float) and len(target["pad"]) == 2


def test_val_loader_is_ordered_and_deterministic_train_loader_shuffles(synthetic_splits):
    datamodule = module_over(synthetic_splits, image_size=48, batch_size=2)
    datamodule.setup("fit")
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    assert isinstance(train_loader.sampler, EpochShuffleSampler)
    assert isinstance(val_loader.sampler, SequentialSampler)
    seen = [t for _, targets in val_loader for t in targets]
    assert [t["image_id"] for t in seen] == datamodule.val_dataset.image_ids
    for target in seen:  # the plain letterbox: exact scale, centred padding
        height, width = target["orig_size"]
        assert target["scale"] == 48 / max(height, width)
        assert target["pad"] == ((48 - round(width * target["scale"])) // 2,
                                 (48 - round(height * target["scale"])) // 2)
    again = [t["boxes"] for _, targets in datamodule.val_dataloader() for t in targets]
    assert all(torch.equal(a, t["boxes"]) for a, t in zip(again, seen))


def test_train_order_and_augmentation_depend_only_on_seed_and_epoch(synthetic_splits):
    """Exact resume: epoch e is the same batches with the same augmentations, whatever ran before."""
    def epoch_batches(epoch, seed=0):
        datamodule = module_over(synthetic_splits, image_size=48, batch_size=2, shuffle_seed=seed)
        datamodule._current_epoch = lambda: epoch  # what Lightning's trainer.current_epoch says
        torch.manual_seed(epoch * 7 + 1)  # the global generator must not matter
        return [(images, [t["image_id"] for t in targets]) for images, targets in datamodule.train_dataloader()]

    first, again = epoch_batches(1), epoch_batches(1)
    assert [ids for _, ids in first] == [ids for _, ids in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert [ids for _, ids in epoch_batches(2)] != [ids for _, ids in first]
    assert [ids for _, ids in epoch_batches(1, seed=5)] != [ids for _, ids in first]


def test_loader_settings_on_this_machine(synthetic_splits):
    datamodule = module_over(synthetic_splits, image_size=48, num_workers=2)
    loader = datamodule.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
    assert loader.collate_fn is collate
    assert not module_over(synthetic_splits, num_workers=0).val_dataloader().persistent_workers


def test_train_box_sizes_by_hand(tiny_coco):
    data = tiny_coco.copy_data()
    data["annotations"] += [
        {"id": 20, "image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30], "iscrowd": 1},
        {"id": 21, "image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 0.5], "iscrowd": 0},
    ]
    path = tiny_coco.write(data)
    datamodule = CocoDataModule(train_images=tiny_coco.images_dir, train_annotations=path,
                                val_images=tiny_coco.images_dir, val_annotations=path, image_size=100)
    # Both images have longest side 80: scale 100 / 80 = 1.25; crowd 20 and degenerate 21 left out.
    expected = [[30 * 1.25, 20 * 1.25], [20 * 1.25, 40 * 1.25], [40 * 1.25, 40 * 1.25]]
    sizes = datamodule.train_box_sizes()
    assert sizes.dtype == torch.float32 and sizes.tolist() == expected


def test_train_box_sizes_match_the_boxes_the_val_transform_produces(synthetic_splits):
    datamodule = module_over(synthetic_splits, image_size=80)
    images, annotations = synthetic_splits["train"]
    val_like = module_over({"train": synthetic_splits["train"], "val": synthetic_splits["train"]},
                           image_size=80).val_dataset
    boxes = torch.cat([val_like[i][1]["boxes"] for i in range(len(val_like))])
    assert torch.allclose(datamodule.train_box_sizes(), boxes[:, 2:] - boxes[:, :2], atol=1e-4)
    assert len(boxes) == len(json.loads(annotations.read_text())["annotations"])


def test_anchor_cache_key_changes_with_annotations_and_image_size(tiny_coco):
    """k-means anchors are cached under a key made from the box sizes anchors are fitted to, so the
    cache goes stale exactly when the annotations or the input size change."""
    from anchordet.anchors import KMeansAnchors

    path = tiny_coco.write()

    def cache_key(image_size):
        box_wh = CocoDataModule(train_images=tiny_coco.images_dir, train_annotations=path,
                                val_images=tiny_coco.images_dir, val_annotations=path,
                                image_size=image_size).train_box_sizes()
        return KMeansAnchors(k=2).cache_key(box_wh, num_levels=1)

    first = cache_key(64)
    assert re.fullmatch("[0-9a-f]{16}", first)
    assert cache_key(64) == first
    assert cache_key(96) != first
    data = tiny_coco.copy_data()
    data["annotations"][0]["bbox"] = [11, 10, 30, 20]  # moved, same size: same clustering input
    tiny_coco.write(data)
    assert cache_key(64) == first
    data["annotations"][0]["bbox"] = [11, 10, 31, 20]  # one pixel wider
    tiny_coco.write(data)
    assert cache_key(64) != first


def test_category_map_comes_from_train_and_val_must_agree(tiny_coco):
    train_json = tiny_coco.write()
    datamodule = CocoDataModule(train_images=tiny_coco.images_dir, train_annotations=train_json,
                                val_images=tiny_coco.images_dir, val_annotations=train_json)
    assert datamodule.category_map.category_ids == [2, 5] and datamodule.num_classes == 2
    data = tiny_coco.copy_data()
    data["categories"].append({"id": 9, "name": "kite"})
    val_json = tiny_coco.write(data, name="val.json")
    mismatched = CocoDataModule(train_images=tiny_coco.images_dir, train_annotations=train_json,
                                val_images=tiny_coco.images_dir, val_annotations=val_json)
    with pytest.raises(DatasetError, match=f"{re.escape(str(val_json))}.*{re.escape(str(train_json))}"
                                           ".*ids only in val: \\[9\\]"):
        mismatched.setup("validate")


def test_synthetic_module_generates_lazily_and_in_prepare_data(tmp_path):
    lazy = SyntheticCocoDataModule(tmp_path / "lazy", num_train=5, num_val=2, canvas_size=64, num_workers=0)
    assert lazy.image_size == 64  # defaults to the canvas size
    sizes = lazy.train_box_sizes()  # before prepare_data, as train.py does
    assert sizes.ndim == 2 and sizes.shape[1] == 2 and len(sizes) > 0
    assert lazy.category_map.names[:2] == ["bar", "pole"]
    expected = generate_synthetic_coco(tmp_path / "lazy", 5, 2, 64, 0)
    assert lazy.val_annotation_file == expected["val"][1]

    prepared = SyntheticCocoDataModule(tmp_path / "prepared", num_train=5, num_val=2, canvas_size=64,
                                       image_size=48, batch_size=2, num_workers=0)
    assert not (tmp_path / "prepared").exists()
    prepared.prepare_data()
    assert (tmp_path / "prepared").is_dir()
    prepared.setup("fit")
    images, targets = next(iter(prepared.train_dataloader()))
    assert images.shape == (2, 3, 48, 48) and len(targets) == 2


def test_synthetic_module_refuses_paths(tmp_path):
    with pytest.raises(TypeError, match="root"):
        SyntheticCocoDataModule(tmp_path, root="/data/coco")


def test_collate_stacks_images_and_lists_targets():
    batch = [(torch.zeros(3, 8, 8, dtype=torch.uint8), {"image_id": 1}),
             (torch.ones(3, 8, 8, dtype=torch.uint8), {"image_id": 2})]
    images, targets = collate(batch)
    assert images.shape == (2, 3, 8, 8) and images[1].eq(1).all()
    assert targets == [{"image_id": 1}, {"image_id": 2}]
    assert np.array_equal(images[0].numpy(), np.zeros((3, 8, 8)))


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="scale_range"):
        CocoDataModule(root="/nowhere", scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="data.batch_size"):
        CocoDataModule(root="/nowhere", batch_size=0)
