"""The COCO detection dataset: an index (`anchordet.data.index`) plus image loading and transforms.

Only what needs the pixels (an unreadable file, a size that disagrees with the JSON) is checked when
an image is loaded; `anchordet.data.verify` can check every image before training instead.
Samples carry xyxy boxes in network-input pixels (see `transforms`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from anchordet.data.categories import CategoryMap
from anchordet.data.index import CocoIndex, DatasetError, build_coco_index, drop_images
from anchordet.data.sampling import augmentation_seed
from anchordet.data.transforms import DetectionTransform, letterbox_scale
from anchordet.data.verify import verify_images

log = logging.getLogger("anchordet.data")

__all__ = ["BAD_IMAGE_ACTIONS", "CocoDetectionDataset", "DatasetError", "load_rgb_image", "read_rgb"]


# ---------------------------------------------------------------------- images
JPEG_START = b"\xff\xd8"


def decode_jpeg_file(path: Path) -> Tensor | None:
    """uint8 [3, h, w] upright RGB through torchvision's libjpeg decoder (about 1.6x PIL's speed on
    the coco128 JPEGs, the same pixels), or None when it is not a JPEG or torchvision refuses it."""
    try:
        data = read_file(str(path))
        if bytes(data[:2].tolist()) != JPEG_START:
            return None
        return decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # a damaged file or a JPEG variant it does not read: PIL decides and explains
        return None


def read_rgb(path: Path) -> Tensor:
    """uint8 [3, h, w] RGB of the displayed image: EXIF orientation applied, any mode -> RGB.
    Raises what PIL raises for a missing or unreadable file."""
    image = decode_jpeg_file(path) if path.is_file() else None
    if image is not None:
        return image
    with Image.open(path) as opened:
        upright = ImageOps.exif_transpose(opened)
        if upright.mode == "P" and "transparency" in upright.info:
            upright = upright.convert("RGBA")  # palette transparency must go through RGBA
        rgb = upright.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)


UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_rgb_image(path: Path, image_id: int, expected_hw: tuple[int, int],
                   annotation_file: Path) -> Tensor:
    """`read_rgb` with errors that name the file, the image id and what to do, and the size checked
    against the annotation file."""
    try:
        image = read_rgb(path)
    except FileNotFoundError:
        raise DatasetError(f"image file {path} (image id {image_id}, listed in {annotation_file}) "
                           "has disappeared since the dataset was built; restore it") from None
    except UNREADABLE as error:
        raise DatasetError(f"cannot read image file {path} (image id {image_id}, listed in "
                           f"{annotation_file}): {error}; replace the file with a valid image or "
                           "remove the image entry") from None
    height, width = image.shape[-2:]
    if (height, width) != tuple(expected_hw):
        raise DatasetError(f"image file {path} (image id {image_id}) is {width}x{height} "
                           f"pixels (width x height, after EXIF orientation) but {annotation_file} "
                           f"says width={expected_hw[1]}, height={expected_hw[0]}; fix the entry "
                           "(COCO sizes are those of the displayed, EXIF-rotated image)")
    return image


BAD_IMAGE_ACTIONS = ("error", "skip")


class CocoDetectionDataset(Dataset):
    """COCO detection samples: ``image`` uint8 ``[3, S, S]`` and ``target``::

        {"boxes": float32 [N, 4] xyxy input px, "labels": int64 [N] (contiguous, `CategoryMap`),
         "image_id": int, "orig_size": (h, w), "scale": float, "pad": (left, top)}

    ``train=False`` is the deterministic letterbox; ``train=True`` adds flip and scale jitter.
    ``category_map`` (e.g. the training file's, or a checkpoint's) must equal this file's categories.
    ``strict``: a box the index would clip or drop is an error (see `build_coco_index`).
    ``verify_images``: check every image up front (`anchordet.data.verify`, results cached in
    ``verify_cache_dir``, ``verify_workers`` processes). ``on_bad_image``: "error" stops with the list
    of bad files; "skip" leaves them out, and an image that still fails to load later is replaced by
    the next one and counted, never a crash.
    """

    def __init__(self, images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
                 image_size: int, train: bool, category_map: CategoryMap | None = None,
                 hflip_prob: float = 0.5, scale_range: Sequence[float] = (0.5, 1.5), seed: int = 0,
                 strict: bool = False, verify_images: bool = False, on_bad_image: str = "error",
                 verify_cache_dir: str | os.PathLike | None = None, verify_workers: int = 0) -> None:
        if on_bad_image not in BAD_IMAGE_ACTIONS:
            raise ValueError(f"data.on_bad_image={on_bad_image!r}: use one of {BAD_IMAGE_ACTIONS}")
        self.transform = DetectionTransform(image_size, train, hflip_prob, scale_range)
        self.seed = int(seed)  # augmentation seed for (position, epoch) keys
        self.on_bad_image = on_bad_image
        self.replaced_images = 0  # images that failed to load in this process and were replaced
        index = build_coco_index(annotation_file, images_dir, strict=strict)
        if verify_images:
            index = self._without_bad_images(index, verify_cache_dir, verify_workers)
        self.index = index
        if category_map is not None and category_map != self.index.category_map:
            difference = category_map.describe_difference(self.index.category_map, ("the map", "the file"))
            raise DatasetError(f"the categories of {annotation_file} differ from the category map in "
                               f"use (from the training annotations or a checkpoint): {difference}; "
                               "use annotation files that share one category list")
        self.category_map = category_map or self.index.category_map
        self.labels = self.category_map.labels_of(self.index.category_ids)  # int64 [K]
        self.image_size, self.train = int(image_size), bool(train)

    def _without_bad_images(self, index: CocoIndex, cache_dir, workers: int) -> CocoIndex:
        bad = verify_images(index.images_dir, index.file_names.tolist(), index.image_ids.tolist(),
                            list(zip(index.heights.tolist(), index.widths.tolist())),
                            Path(cache_dir) if cache_dir is not None else None, int(workers))
        if not bad:
            return index
        listing = "\n".join(f"  {b}" for b in bad[:20]) + (f"\n  ... {len(bad) - 20} more" if len(bad) > 20 else "")
        if self.on_bad_image == "error":
            raise DatasetError(f"{len(bad)} of {len(index.image_ids)} images listed in {index.annotation_file} "
                               f"cannot be used:\n{listing}\nreplace or remove them, or set "
                               "data.on_bad_image=skip to train without them")
        log.warning("leaving out %d of %d images listed in %s (data.on_bad_image=skip):\n%s", len(bad),
                    len(index.image_ids), index.annotation_file, listing)
        return drop_images(index, np.isin(index.image_ids, [b.image_id for b in bad]))

    def __len__(self) -> int:
        return len(self.index.image_ids)

    @property
    def image_ids(self) -> list[int]:
        return self.index.image_ids.tolist()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict]:
        """``key`` is an image position, or ``(position, epoch)`` from `EpochShuffleSampler`: then the
        augmentation draws from a generator seeded by (seed, epoch, position), reproducible anywhere."""
        i, generator = key, None
        if isinstance(key, tuple):
            i, epoch = int(key[0]), int(key[1])
            generator = torch.Generator().manual_seed(augmentation_seed(self.seed, epoch, i))
        i, image = self._load(int(i))
        index = self.index
        image_id, orig_size = int(index.image_ids[i]), (int(index.heights[i]), int(index.widths[i]))
        start, end = index.offsets[i], index.offsets[i + 1]
        boxes = torch.from_numpy(index.boxes[start:end])
        labels = torch.from_numpy(self.labels[start:end])
        image, boxes, labels, scale, pad = self.transform(image, boxes, labels, generator)
        target = {"boxes": boxes.to(torch.float32), "labels": labels.to(torch.int64),
                  "image_id": image_id, "orig_size": orig_size, "scale": scale, "pad": pad}
        return image, target

    def _load(self, i: int) -> tuple[int, Tensor]:
        """(position, uint8 image) of image ``i``; under ``on_bad_image=skip`` a file that fails to load
        (changed since it was verified) is replaced by the next loadable image, and counted."""
        index = self.index
        for attempt in range(len(self)):
            position = (i + attempt) % len(self)
            hw = (int(index.heights[position]), int(index.widths[position]))
            try:
                return position, load_rgb_image(index.images_dir / str(index.file_names[position]),
                                                int(index.image_ids[position]), hw, index.annotation_file)
            except DatasetError as error:
                if self.on_bad_image == "error":
                    raise
                self.replaced_images += 1
                log.warning("replacing an image that failed to load (%d in this process so far): %s",
                            self.replaced_images, error)
        raise DatasetError(f"no image listed in {index.annotation_file} can be loaded")

    def letterbox_box_sizes(self) -> Tensor:
        """(w, h) float32 [K, 2] of every kept box after the deterministic letterbox (no decoding)."""
        index = self.index
        box_image = np.repeat(np.arange(len(index.image_ids)), np.diff(index.offsets))
        scales = letterbox_scale(index.heights, index.widths, self.image_size)[box_image]
        wh = (index.boxes[:, 2:] - index.boxes[:, :2]) * scales[:, None]
        return torch.from_numpy(wh.astype(np.float32))
