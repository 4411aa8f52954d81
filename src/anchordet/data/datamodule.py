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
from torch.utils.data import DataLoader, DistributedSampler

from anchordet.data.categories import CategoryMap
from anchordet.data.coco import BAD_IMAGE_ACTIONS, CocoDetectionDataset, DatasetError
from anchordet.data.sampling import EpochShuffleSampler, ResumableDataLoader
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
    """Where the files are; None where neither ``root`` nor an explicit path says."""

    train_images: Path | None
    train_annotations: Path | None
    val_images: Path | None
    val_annotations: Path | None


class CocoDataModule(L.LightningDataModule):
    """Train/val loaders over COCO-format data.

    ``root=/path/to/coco`` means ``root/train2017``, ``root/annotations/instances_train2017.json``
    and the same for ``val2017``; ``train_images`` / ``train_annotations`` / ``val_images`` /
    ``val_annotations`` override single paths. Labels follow the training file's categories
    (`category_map`); the validation file must list the same categories.

    Data checks (see `CocoDetectionDataset`): ``strict`` makes every box the index would clip or
    drop an error; ``verify_images`` checks every image before training (cached in
    ``verify_cache_dir``, ``verify_workers`` processes, default: the CPU count); ``on_bad_image``
    is "error" (stop with the list) or "skip" (train without them).
    """

    def __init__(self, root: str | os.PathLike | None = None,
                 train_images: str | os.PathLike | None = None,
                 train_annotations: str | os.PathLike | None = None,
                 val_images: str | os.PathLike | None = None,
                 val_annotations: str | os.PathLike | None = None,
                 image_size: int = 512, batch_size: int = 8, num_workers: int = 2,
                 hflip_prob: float = 0.5, scale_range: Sequence[float] = (0.5, 1.5),
                 shuffle_seed: int = 0, strict: bool = False, verify_images: bool = False,
                 on_bad_image: str = "error", verify_cache_dir: str | os.PathLike | None = None,
                 verify_workers: int | None = None, category_map: CategoryMap | None = None) -> None:
        super().__init__()
        # Given (a checkpoint's classes, for evaluation): the files must list exactly these, and no
        # training files are needed.
        self._given_category_map = category_map
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
        if on_bad_image not in BAD_IMAGE_ACTIONS:
            raise ValueError(f"data.on_bad_image={on_bad_image!r}: use one of {BAD_IMAGE_ACTIONS}")
        workers = (os.cpu_count() or 1) if verify_workers is None else int(verify_workers)
        self.checks = {"strict": bool(strict), "verify_images": bool(verify_images), "on_bad_image": on_bad_image,
                       "verify_cache_dir": verify_cache_dir, "verify_workers": workers}
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
        return DataPaths(**{key: Path(explicit) if explicit is not None else from_root.get(key)
                            for key, explicit in self._explicit_paths.items()})

    def _path(self, key: str) -> Path:
        path = getattr(self._data_paths(), key)
        if path is None:
            raise DatasetError(f"no path for data.{key}: set data.root to a folder in the COCO "
                               f"2017 layout or give data.{key} explicitly")
        return path

    @property
    def train_annotation_file(self) -> Path:
        return self._path("train_annotations")

    @property
    def val_annotation_file(self) -> Path:
        """The JSON that COCO evaluation scores validation predictions against."""
        return self._path("val_annotations")

    # ------------------------------------------------------------------ datasets
    @property
    def train_dataset(self) -> CocoDetectionDataset:
        if self._train_dataset is None:
            self._train_dataset = CocoDetectionDataset(
                self._path("train_images"), self._path("train_annotations"), self.image_size, train=True,
                category_map=self._given_category_map, hflip_prob=self.hflip_prob, scale_range=self.scale_range,
                seed=self.shuffle_seed, **self.checks)
        return self._train_dataset

    @property
    def val_dataset(self) -> CocoDetectionDataset:
        if self._val_dataset is None:
            val_annotations = self._path("val_annotations")
            dataset = CocoDetectionDataset(self._path("val_images"), val_annotations, self.image_size,
                                           train=False, category_map=self._given_category_map, **self.checks)
            if dataset.category_map != self.category_map:
                difference = dataset.category_map.describe_difference(self.category_map, ("val", "train"))
                raise DatasetError(
                    f"the categories of {val_annotations} differ from those of the training "
                    f"annotations {self.train_annotation_file} ({difference}); labels would mean "
                    "different classes: use annotation files with the same category list")
            self._val_dataset = dataset
        return self._val_dataset

    @property
    def category_map(self) -> CategoryMap:
        """COCO category ids <-> labels: the given map, else the training annotation file's."""
        return self._given_category_map or self.train_dataset.category_map

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
        # Order and augmentation depend on (shuffle_seed, epoch) only, and the position in the epoch
        # goes into checkpoints: see data/sampling.py.
        sampler = EpochShuffleSampler(len(self.train_dataset), self.shuffle_seed, self._current_epoch,
                                      samples_done=self._samples_done, rank=self._rank, world_size=self._world_size)
        return self._loader(self.train_dataset, sampler=sampler, loader_class=ResumableDataLoader)

    # What the training sampler reads from the trainer (nothing without one: epoch 0, one process).
    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def _samples_done(self) -> int:
        """Samples of the current epoch this rank has trained on: Lightning's count of processed
        batches (a batch whose step was applied), the count its own restart logic trusts."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed) * self.batch_size

    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    def _world_size(self) -> int:
        return int(self.trainer.world_size) if self.trainer is not None else 1

    def val_dataloader(self) -> DataLoader:
        # Under DDP the training config leaves sampling to this module (use_distributed_sampler:
        # false), so validation shards itself too; padded duplicates are dropped when the results
        # are gathered (distributed.gather_results).
        sampler = None
        if self._world_size() > 1:
            sampler = DistributedSampler(self.val_dataset, num_replicas=self._world_size(), rank=self._rank(),
                                         shuffle=False)
        return self._loader(self.val_dataset, sampler=sampler)

    def _loader(self, dataset: CocoDetectionDataset, sampler=None, loader_class=DataLoader) -> DataLoader:
        return loader_class(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
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
