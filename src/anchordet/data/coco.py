"""COCO instances JSON + image folder -> validated index -> ``(image, target)`` samples.

The JSON is validated once, up front and column-wise (numpy over all annotations, no per-box
Python work), so that a broken file fails at construction with a message naming the file, the id
and the fix, instead of as a ``KeyError`` deep inside a DataLoader worker an hour into training.
Only what needs the pixels (an unreadable file, a size that disagrees with the JSON) is checked when
an image is loaded.

The index keeps the boxes of all images in one ``[K, 4]`` array with per-image offsets (CSR
layout): numpy arrays instead of per-image Python lists keep DataLoader workers from slowly copying
the parent's memory, which happens when they touch (refcount) millions of small Python objects.

Boxes: ``bbox`` in the JSON is xywh in original-image pixels; the index stores xyxy clipped to the
image; samples carry xyxy in network-input pixels (see `transforms`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from anchordet.data.categories import CategoryMap
from anchordet.data.sampling import augmentation_seed
from anchordet.data.transforms import DetectionTransform, letterbox_scale

log = logging.getLogger("anchordet.data")

REQUIRED_SECTIONS = ("images", "annotations", "categories")


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; the message names it and says what to fix."""


@dataclass(frozen=True)
class CocoIndex:
    """Everything a sample needs, as arrays. I images (sorted by id), K kept boxes."""

    annotation_file: Path
    images_dir: Path
    category_map: CategoryMap  # the categories of this file
    image_ids: np.ndarray  # int64 [I]
    file_names: np.ndarray  # str [I]
    heights: np.ndarray  # int64 [I], of the displayed (EXIF-rotated) image, as COCO defines them
    widths: np.ndarray  # int64 [I]
    boxes: np.ndarray  # float32 [K, 4] xyxy original px, clipped, grouped by image
    category_ids: np.ndarray  # int64 [K]
    offsets: np.ndarray  # int64 [I + 1]; image i owns rows offsets[i]:offsets[i+1]
    num_annotations: int
    num_crowd: int
    num_degenerate: int


def read_annotation_file(annotation_file: str | os.PathLike) -> dict:
    """Parse a COCO JSON and check its three sections exist; DatasetError otherwise."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist; point the data config at a COCO "
                           "instances JSON (e.g. <root>/annotations/instances_train2017.json)")
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"annotation file {path} is not valid JSON (line {error.lineno}, column "
                           f"{error.colno}: {error.msg}); repair or re-export the file") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"annotation file {path} is not UTF-8 text ({error}); is it really "
                           "JSON?") from None
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path} holds a JSON {type(data).__name__}, not an object "
                           f"with {', '.join(REQUIRED_SECTIONS)}; is it a COCO instances file?")
    for section in REQUIRED_SECTIONS:
        if not isinstance(data.get(section), list):
            problem = "is missing" if section not in data else "is not a list"
            raise DatasetError(f"annotation file {path}: the '{section}' section {problem}; a COCO "
                               f"instances file needs lists {', '.join(REQUIRED_SECTIONS)}")
    return data


def build_coco_index(annotation_file: str | os.PathLike, images_dir: str | os.PathLike) -> CocoIndex:
    """Validate ``annotation_file`` against ``images_dir`` and build the `CocoIndex`.

    Crowd annotations are kept out; boxes whose width or height is <= 1 px after clipping to the
    image are dropped; both counts go into one INFO line of the ``anchordet.data`` logger.
    """
    path, folder = Path(annotation_file), Path(images_dir)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist (annotations: {path}); point the "
                           "data config at the folder holding the images")
    data = read_annotation_file(path)
    images, annotations = data["images"], data["annotations"]
    try:
        category_map = CategoryMap.from_categories(data["categories"])
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"annotation file {path}: bad 'categories' section ({error}); each "
                           "category needs a unique integer 'id' and a 'name'") from None
    if not images:
        raise DatasetError(f"annotation file {path} lists no images; nothing to train or evaluate on")

    image_ids = _integers(_column(images, "id", "image", path), "id", "image", images, path)
    _check_unique(image_ids, "image", path)
    file_names = _column(images, "file_name", "image", path)
    heights = _sizes(_column(images, "height", "image", path), "height", images, path)
    widths = _sizes(_column(images, "width", "image", path), "width", images, path)
    _check_file_names(file_names, image_ids, folder, path)

    ann_ids = _integers(_column(annotations, "id", "annotation", path), "id", "annotation", annotations, path)
    _check_unique(ann_ids, "annotation", path)
    ann_image_ids = _integers(_column(annotations, "image_id", "annotation", path), "image_id",
                              "annotation", annotations, path)
    ann_category_ids = _integers(_column(annotations, "category_id", "annotation", path),
                                 "category_id", "annotation", annotations, path)
    bboxes_xywh = _bboxes(_column(annotations, "bbox", "annotation", path), ann_ids, path)
    crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)

    # The index lists images sorted by id; an annotation finds its image's row by binary search.
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    row = np.minimum(np.searchsorted(sorted_ids, ann_image_ids), len(sorted_ids) - 1)
    unknown_image = sorted_ids[row] != ann_image_ids
    if unknown_image.any():
        k = int(np.flatnonzero(unknown_image)[0])
        raise DatasetError(f"annotation file {path}: annotation id {ann_ids[k]} refers to image id "
                           f"{ann_image_ids[k]}, which is not in 'images' ({int(unknown_image.sum())} "
                           "such annotations); remove them or add the image entries")
    unknown_category = ~np.isin(ann_category_ids, np.asarray(category_map.category_ids, dtype=np.int64))
    if unknown_category.any():
        k = int(np.flatnonzero(unknown_category)[0])
        raise DatasetError(f"annotation file {path}: annotation id {ann_ids[k]} has category id "
                           f"{ann_category_ids[k]}, which is not in 'categories' (known ids: "
                           f"{category_map.category_ids[:20]}); fix the annotation or add the category")

    sorted_heights, sorted_widths = heights[order], widths[order]
    limits = np.stack([sorted_widths, sorted_heights, sorted_widths, sorted_heights], axis=1)[row]
    xyxy = np.concatenate([bboxes_xywh[:, :2], bboxes_xywh[:, :2] + bboxes_xywh[:, 2:]], axis=1)
    xyxy = np.clip(xyxy, 0.0, limits)
    degenerate = ~crowd & (((xyxy[:, 2] - xyxy[:, 0]) <= 1.0) | ((xyxy[:, 3] - xyxy[:, 1]) <= 1.0))
    keep = np.flatnonzero(~crowd & ~degenerate)
    keep = keep[np.argsort(row[keep], kind="stable")]  # group boxes by image, JSON order within one
    counts = np.bincount(row[keep], minlength=len(image_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    index = CocoIndex(
        annotation_file=path, images_dir=folder, category_map=category_map,
        image_ids=sorted_ids.astype(np.int64), file_names=np.asarray(file_names, dtype=str)[order],
        heights=sorted_heights, widths=sorted_widths, boxes=xyxy[keep].astype(np.float32),
        category_ids=ann_category_ids[keep], offsets=offsets, num_annotations=len(annotations),
        num_crowd=int(crowd.sum()), num_degenerate=int(degenerate.sum()))
    log.info("%s: %d images (%d without objects, kept), %d annotations -> %d boxes; %d crowd regions "
             "kept out of the targets, %d degenerate boxes dropped (width or height <= 1 px after "
             "clipping to the image)", path, len(image_ids), int((counts == 0).sum()),
             len(annotations), len(keep), index.num_crowd, index.num_degenerate)
    return index


# ---------------------------------------------------------------------- column validation
def _describe(record) -> str:
    return f"id {record['id']}" if isinstance(record, dict) and "id" in record else "without an id"


def _column(records: list, key: str, kind: str, path: Path) -> list:
    try:
        return [record[key] for record in records]
    except (KeyError, TypeError):
        k = next(k for k, r in enumerate(records) if not isinstance(r, dict) or key not in r)
        raise DatasetError(f"annotation file {path}: {kind} #{k} ({_describe(records[k])}) has no "
                           f"'{key}' field; every {kind} entry needs one") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integers(values: list, key: str, kind: str, records: list, path: Path) -> np.ndarray:
    if not values:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(values)
    if array.ndim == 1 and array.dtype.kind in "iu":
        return array.astype(np.int64)
    k = next((k for k, v in enumerate(values) if not isinstance(v, int) or isinstance(v, bool)), 0)
    raise DatasetError(f"annotation file {path}: {kind} #{k} ({_describe(records[k])}) has "
                       f"'{key}' = {values[k]!r}; it must be an integer")


def _sizes(values: list, key: str, images: list, path: Path) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1 and array.dtype.kind in "iuf" and bool(np.all(array > 0)):
        return np.rint(array).astype(np.int64)
    k = next((k for k, v in enumerate(values) if not _is_number(v) or v <= 0), 0)
    raise DatasetError(f"annotation file {path}: image {_describe(images[k])} has '{key}' = "
                       f"{values[k]!r}; it must be the positive pixel {key} of the displayed image")


def _check_unique(ids: np.ndarray, kind: str, path: Path) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1]
        raise DatasetError(f"annotation file {path}: {kind} id {repeated[0]} appears "
                           f"{counts[counts > 1][0]} times ({len(repeated)} duplicated {kind} ids, "
                           f"first ones: {repeated[:10].tolist()}); {kind} ids must be unique")


def _bboxes(values: list, ann_ids: np.ndarray, path: Path) -> np.ndarray:
    """xywh float64 [K, 4]; names the first annotation whose bbox is not 4 finite numbers."""
    try:
        array = np.asarray(values) if values else np.zeros((0, 4))
    except ValueError:  # ragged: some bbox has the wrong length
        array = np.zeros((0,))
    if array.ndim == 2 and array.shape[1] == 4 and array.dtype.kind in "iuf":
        array = array.astype(np.float64)
        finite = np.isfinite(array).all(axis=1)
        if finite.all():
            return array
        k = int(np.flatnonzero(~finite)[0])
    else:
        k = next((k for k, b in enumerate(values) if not isinstance(b, (list, tuple)) or len(b) != 4
                  or not all(_is_number(v) for v in b)), 0)
    problem = "an empty bbox" if values[k] in ([], ()) else f"bbox {values[k]!r}"
    raise DatasetError(f"annotation file {path}: annotation id {ann_ids[k]} has {problem}; a COCO "
                       "bbox is [x, y, width, height], four finite numbers; fix or remove the annotation")


def _check_file_names(file_names: list, image_ids: np.ndarray, folder: Path, path: Path) -> None:
    """Every file name is a string, stays inside ``folder`` and names an existing file."""
    root = os.path.normpath(os.path.abspath(folder))
    for k, name in enumerate(file_names):
        # Lexical check: '../x.jpg' or an absolute path escapes the folder; a symlinked folder does not.
        if not isinstance(name, str) or not name or os.path.isabs(name) or not os.path.normpath(
                os.path.join(root, name)).startswith(root + os.sep):
            raise DatasetError(f"annotation file {path}: image id {image_ids[k]} has file_name "
                               f"{name!r}, which is not a path inside the image folder {folder}; "
                               "file names must be relative to it, without '..'")
    with os.scandir(root) as entries:
        present = {entry.name for entry in entries if entry.is_file()}
    missing = [k for k, name in enumerate(file_names)
               if name not in present and not os.path.isfile(os.path.join(root, name))]
    if missing:
        k = missing[0]
        raise DatasetError(f"image file {folder / file_names[k]} (image id {image_ids[k]}, listed in "
                           f"{path}) does not exist ({len(missing)} of {len(file_names)} images are "
                           "missing); copy the images there or point the data config at the right folder")


# ---------------------------------------------------------------------- images
def load_rgb_image(path: Path, image_id: int, expected_hw: tuple[int, int],
                   annotation_file: Path) -> Tensor:
    """uint8 [3, h, w] RGB of the displayed image: EXIF orientation applied, any mode -> RGB."""
    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)
            if upright.mode == "P" and "transparency" in upright.info:
                upright = upright.convert("RGBA")  # palette transparency must go through RGBA
            rgb = upright.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file {path} (image id {image_id}, listed in {annotation_file}) "
                           "has disappeared since the dataset was built; restore it") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"cannot read image file {path} (image id {image_id}, listed in "
                           f"{annotation_file}): {error}; replace the file with a valid image or "
                           "remove the image entry") from None
    if (rgb.height, rgb.width) != tuple(expected_hw):
        raise DatasetError(f"image file {path} (image id {image_id}) is {rgb.width}x{rgb.height} "
                           f"pixels (width x height, after EXIF orientation) but {annotation_file} "
                           f"says width={expected_hw[1]}, height={expected_hw[0]}; fix the entry "
                           "(COCO sizes are those of the displayed, EXIF-rotated image)")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w)


class CocoDetectionDataset(Dataset):
    """COCO detection samples: ``image`` uint8 ``[3, S, S]`` and ``target``::

        {"boxes": float32 [N, 4] xyxy input px, "labels": int64 [N] (contiguous, `CategoryMap`),
         "image_id": int, "orig_size": (h, w), "scale": float, "pad": (left, top)}

    ``train=False`` is the deterministic letterbox; ``train=True`` adds flip and scale jitter.
    ``category_map`` (e.g. the training file's, or a checkpoint's) must equal this file's categories.
    """

    def __init__(self, images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
                 image_size: int, train: bool, category_map: CategoryMap | None = None,
                 hflip_prob: float = 0.5, scale_range: Sequence[float] = (0.5, 1.5), seed: int = 0) -> None:
        self.transform = DetectionTransform(image_size, train, hflip_prob, scale_range)
        self.seed = int(seed)  # augmentation seed for (position, epoch) keys
        self.index = build_coco_index(annotation_file, images_dir)
        if category_map is not None and category_map != self.index.category_map:
            difference = category_map.describe_difference(self.index.category_map, ("the map", "the file"))
            raise DatasetError(f"the categories of {annotation_file} differ from the category map in "
                               f"use (from the training annotations or a checkpoint): {difference}; "
                               "use annotation files that share one category list")
        self.category_map = category_map or self.index.category_map
        self.labels = self.category_map.labels_of(self.index.category_ids)  # int64 [K]
        self.image_size, self.train = int(image_size), bool(train)

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
        index = self.index
        image_id, orig_size = int(index.image_ids[i]), (int(index.heights[i]), int(index.widths[i]))
        image = load_rgb_image(index.images_dir / str(index.file_names[i]), image_id, orig_size,
                               index.annotation_file)
        start, end = index.offsets[i], index.offsets[i + 1]
        boxes = torch.from_numpy(index.boxes[start:end])
        labels = torch.from_numpy(self.labels[start:end])
        image, boxes, labels, scale, pad = self.transform(image, boxes, labels, generator)
        target = {"boxes": boxes.to(torch.float32), "labels": labels.to(torch.int64),
                  "image_id": image_id, "orig_size": orig_size, "scale": scale, "pad": pad}
        return image, target

    def letterbox_box_sizes(self) -> Tensor:
        """(w, h) float32 [K, 2] of every kept box after the deterministic letterbox (no decoding)."""
        index = self.index
        box_image = np.repeat(np.arange(len(index.image_ids)), np.diff(index.offsets))
        scales = letterbox_scale(index.heights, index.widths, self.image_size)[box_image]
        wh = (index.boxes[:, 2:] - index.boxes[:, :2]) * scales[:, None]
        return torch.from_numpy(wh.astype(np.float32))
