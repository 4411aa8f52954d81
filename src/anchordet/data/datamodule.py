"""LightningDataModules: any COCO-format dataset, and the built-in synthetic one.

Both build their datasets lazily, because ``train.py`` asks for the category map and the training
box sizes (to fit anchors) before ``trainer.fit`` runs ``setup``. Batches are
``(uint8 Tensor[B, 3, S, S], list[target])``; conversion to float and normalisation happen on the
device (``DetectionModule.on_after_batch_transfer``), so workers ship a quarter of the bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from anchordet.data.categories import CategoryMap
from anchordet.data.coco import CocoDetectionDataset, DatasetError
from anchordet.data.sampling import EpochShuffleSampler
from anchordet.data.synthetic import generate_synthetic_coco
from anchordet.data.transforms import DetectionTransform


def collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, list[dict]]:
    """``[(image uint8 [3, S, S], target), ...] -> (uint8 [B, 3, S, S], [target, ...])``.

    Targets stay a list: images hold different numbers of boxes, and padding them belongs to the
    matcher (``pad_targets``), which knows what the padding means.
    """
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


@dataclass(frozen=True)
class DataPaths:
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path


class CocoDataModule(L.LightningDataModule):
    """Train/val loaders over COCO-format data.

    ``root=/path/to/coco`` means ``root/train2017``, ``root/annotations/instances_train2017.json``
    and the same for ``val2017``; ``train_images`` / ``train_annotations`` / ``val_images`` /
    ``val_annotations`` override single paths. Labels follow the training file's categories
    (`category_map`); the validation file must list the same categories.
    """

    def __init__(self, root: str | os.PathLike | None = None,
                 train_images: str | os.PathLike | None = None,
                 train_annotations: str | os.PathLike | None = None,
                 val_images: str | os.PathLike | None = None,
                 val_annotations: str | os.PathLike | None = None,
                 image_size: int = 512, batch_size: int = 8, num_workers: int = 2,
                 hflip_prob: float = 0.5, scale_range: Sequence[float] = (0.5, 1.5),
                 shuffle_seed: int = 0) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        DetectionTransform(image_size, True, hflip_prob, scale_range)  # fail now on bad settings
        self.root = Path(root) if root is not None else None
        self._explicit_paths = {"train_images": train_images, "train_annotations": train_annotations,
                                "val_images": val_images, "val_annotations": val_annotations}
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.num_workers = int(num_workers)
        self.hflip_prob, self.scale_range = float(hflip_prob), tuple(float(v) for v in scale_range)
        self.shuffle_seed = int(shuffle_seed)
        self._train_dataset: CocoDetectionDataset | None = None
        self._val_dataset: CocoDetectionDataset | None = None

    # ------------------------------------------------------------------ paths
    def _data_paths(self) -> DataPaths:
        """Explicit paths win; the rest come from ``root`` in the COCO 2017 layout."""
        from_root = {}
        if self.root is not None:
            from_root = {"train_images": self.root / "train2017",
                         "train_annotations": self.root / "annotations" / "instances_train2017.json",
                         "val_images": self.root / "val2017",
                         "val_annotations": self.root / "annotations" / "instances_val2017.json"}
        resolved = {}
        for key, explicit in self._explicit_paths.items():
            if explicit is None and key not in from_root:
                raise DatasetError(f"no path for data.{key}: set data.root to a folder in the COCO "
                                   f"2017 layout or give data.{key} explicitly")
            resolved[key] = Path(explicit) if explicit is not None else from_root[key]
        return DataPaths(**resolved)

    @property
    def train_annotation_file(self) -> Path:
        return self._data_paths().train_annotations

    @property
    def val_annotation_file(self) -> Path:
        """The JSON that COCO evaluation scores validation predictions against."""
        return self._data_paths().val_annotations

    # ------------------------------------------------------------------ datasets
    @property
    def train_dataset(self) -> CocoDetectionDataset:
        if self._train_dataset is None:
            paths = self._data_paths()
            self._train_dataset = CocoDetectionDataset(
                paths.train_images, paths.train_annotations, self.image_size, train=True,
                hflip_prob=self.hflip_prob, scale_range=self.scale_range, seed=self.shuffle_seed)
        return self._train_dataset

    @property
    def val_dataset(self) -> CocoDetectionDataset:
        if self._val_dataset is None:
            paths = self._data_paths()
            dataset = CocoDetectionDataset(paths.val_images, paths.val_annotations, self.image_size,
                                           train=False)
            if dataset.category_map != self.category_map:
                difference = dataset.category_map.describe_difference(self.category_map, ("val", "train"))
                raise DatasetError(
                    f"the categories of {paths.val_annotations} differ from those of the training "
                    f"annotations {paths.train_annotations} ({difference}); labels would mean "
                    "different classes: use annotation files with the same category list")
            self._val_dataset = dataset
        return self._val_dataset

    @property
    def category_map(self) -> CategoryMap:
        """COCO category ids <-> labels, from the training annotation file."""
        return self.train_dataset.category_map

    @property
    def num_classes(self) -> int:
        return self.category_map.num_classes

    def train_box_sizes(self) -> Tensor:
        """(w, h) float32 [N, 2] of every non-crowd, non-degenerate training box after the
        deterministic letterbox to ``image_size`` (what anchors are fitted to); reads only the JSON."""
        return self.train_dataset.letterbox_box_sizes()

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_dataset  # noqa: B018 (build now, so errors surface before the first step)
        self.val_dataset  # noqa: B018

    def train_dataloader(self) -> DataLoader:
        # Order and augmentation depend on (shuffle_seed, epoch) only: see data/sampling.py.
        sampler = EpochShuffleSampler(len(self.train_dataset), self.shuffle_seed, self._current_epoch)
        return self._loader(self.train_dataset, shuffle=False, sampler=sampler)

    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def _loader(self, dataset: CocoDetectionDataset, shuffle: bool, sampler=None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate,
            # Pinned host memory only speeds up copies to a GPU; on CPU it only costs memory.
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0)


class SyntheticCocoDataModule(CocoDataModule):
    """`CocoDataModule` over the built-in synthetic shapes set (see `synthetic`).

    The set is generated under ``data_dir`` in ``prepare_data``, or earlier the first time a path
    is needed (``train.py`` asks for box sizes before ``fit``), and reused afterwards.
    ``image_size`` defaults to ``canvas_size``; other keyword arguments go to `CocoDataModule`.
    """

    def __init__(self, data_dir: str | os.PathLike, num_train: int = 512, num_val: int = 64,
                 canvas_size: int = 320, seed: int = 0, **kwargs) -> None:
        given_paths = [key for key in ("root", "train_images", "train_annotations", "val_images",
                                       "val_annotations") if kwargs.get(key) is not None]
        if given_paths:
            raise TypeError(f"SyntheticCocoDataModule writes its own files; drop {given_paths} "
                            "(or use CocoDataModule for existing data)")
        kwargs.setdefault("image_size", canvas_size)
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir)
        self.num_train, self.num_val = int(num_train), int(num_val)
        self.canvas_size, self.seed = int(canvas_size), int(seed)
        self._generated_paths: DataPaths | None = None

    def prepare_data(self) -> None:
        self._data_paths()

    def _data_paths(self) -> DataPaths:
        if self._generated_paths is None:
            splits = generate_synthetic_coco(self.data_dir, self.num_train, self.num_val,
                                             self.canvas_size, self.seed)
            self._generated_paths = DataPaths(*splits["train"], *splits["val"])
        return self._generated_paths
