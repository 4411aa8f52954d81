"""COCO instances JSON + image folder -> a validated index of images and boxes.

The JSON is validated once, up front and column-wise (numpy over all annotations, no per-box
Python work), so that a broken file fails at construction with a message naming the file, the id
and the fix, instead of as a ``KeyError`` deep inside a DataLoader worker an hour into training.

The index keeps the boxes of all images in one ``[K, 4]`` array with per-image offsets (CSR
layout): numpy arrays instead of per-image Python lists keep DataLoader workers from slowly copying
the parent's memory, which happens when they touch (refcount) millions of small Python objects.

Boxes: ``bbox`` in the JSON is xywh in original-image pixels; the index stores xyxy clipped to the
image, and reports every box it clips or drops (`BoxFixes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from anchordet.data.categories import CategoryMap
from anchordet.data.transforms import MIN_BOX_SIDE

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
    num_dropped: int  # non-crowd boxes left out (negative size, outside the image, degenerate)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cycle collector while millions of small objects are made. Each of its passes
    walks every live object, and parsing train2017's JSON triggers enough of them to take 70 % of
    the index time (3.5 s of reading against 0.9 s paused, docs/benchmarks.md). Parsed JSON holds
    no reference cycles, so pausing frees nothing later than it would have been freed anyway."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@cyclic_gc_paused()
def read_annotation_file(annotation_file: str | os.PathLike) -> dict:
    """Parse a COCO JSON and check its three sections exist; DatasetError otherwise."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist; point the data config at a COCO "
                           "instances JSON (e.g. <root>/annotations/instances_train2017.json)")
    raw = path.read_bytes()
    try:
        # orjson: 2.2x faster than the json module on a train2017-sized file (0.81 s against 1.77 s).
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # Python's json also reads NaN and Infinity (json.dump writes them), which orjson refuses:
        # such a file then fails later with the annotation id of the bad number, not here.
        try:
            data = json.loads(raw)
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


@cyclic_gc_paused()
def build_coco_index(annotation_file: str | os.PathLike, images_dir: str | os.PathLike,
                     strict: bool = False) -> CocoIndex:
    """Validate ``annotation_file`` against ``images_dir`` and build the `CocoIndex`.

    Crowd annotations are kept out of the targets. Boxes are clipped to their image, and dropped
    when their size is negative, when they lie wholly outside the image or when a side is 1 px or
    less after clipping; every such fix is reported with annotation ids (a WARNING of the
    ``anchordet.data`` logger), or, with ``strict``, raised as a `DatasetError`.
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
    raw_xyxy = np.concatenate([bboxes_xywh[:, :2], bboxes_xywh[:, :2] + bboxes_xywh[:, 2:]], axis=1)
    fixes = BoxFixes.find(bboxes_xywh, raw_xyxy, limits, crowd, ann_ids)
    if fixes.any():
        if strict:
            raise DatasetError(f"annotation file {path}: data.strict=true and {fixes.describe()}; fix the "
                               "annotations, or set data.strict=false to train with them clipped and dropped")
        log.warning("%s: %s", path, fixes.describe())
    xyxy = np.clip(raw_xyxy, 0.0, limits)
    keep = np.flatnonzero(~crowd & ~fixes.dropped)
    keep = keep[np.argsort(row[keep], kind="stable")]  # group boxes by image, JSON order within one
    counts = np.bincount(row[keep], minlength=len(image_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    index = CocoIndex(
        annotation_file=path, images_dir=folder, category_map=category_map,
        image_ids=sorted_ids.astype(np.int64), file_names=np.asarray(file_names, dtype=str)[order],
        heights=sorted_heights, widths=sorted_widths, boxes=xyxy[keep].astype(np.float32),
        category_ids=ann_category_ids[keep], offsets=offsets, num_annotations=len(annotations),
        num_crowd=int(crowd.sum()), num_dropped=int(fixes.dropped.sum()))
    log.info("%s: %d images (%d without objects, kept), %d annotations -> %d boxes; %d crowd regions "
             "kept out of the targets, %d boxes dropped", path, len(image_ids), int((counts == 0).sum()),
             len(annotations), len(keep), index.num_crowd, index.num_dropped)
    return index


def drop_images(index: CocoIndex, drop: np.ndarray) -> CocoIndex:
    """The index without the images where ``drop [I]`` is True (their boxes go with them)."""
    keep_images = ~drop
    counts = np.diff(index.offsets)
    box_image = np.repeat(np.arange(len(counts)), counts)
    keep_boxes = keep_images[box_image]
    offsets = np.concatenate([[0], np.cumsum(counts[keep_images])]).astype(np.int64)
    return dataclasses.replace(
        index, image_ids=index.image_ids[keep_images], file_names=index.file_names[keep_images],
        heights=index.heights[keep_images], widths=index.widths[keep_images], boxes=index.boxes[keep_boxes],
        category_ids=index.category_ids[keep_boxes], offsets=offsets)


@dataclass(frozen=True)
class BoxFixes:
    """What the index changes about non-crowd boxes, per annotation (masks over the annotations):

    - ``negative``: a negative width or height in the JSON (dropped);
    - ``outside``: no overlap with its image at all (dropped);
    - ``degenerate``: width or height <= 1 px after clipping to the image (dropped);
    - ``clipped``: partly outside its image and cut to it (kept), by up to ``max_clip`` pixels.

    COCO train2017 itself has boxes of every kind, so by default they are reported and trained
    with; ``data.strict=true`` turns any of them into an error.
    """

    ann_ids: np.ndarray
    negative: np.ndarray
    outside: np.ndarray
    degenerate: np.ndarray
    clipped: np.ndarray
    max_clip: float

    @classmethod
    def find(cls, xywh: np.ndarray, raw_xyxy: np.ndarray, limits: np.ndarray, crowd: np.ndarray,
             ann_ids: np.ndarray) -> BoxFixes:
        """xywh / raw_xyxy [K, 4] as in the JSON, limits [K, 4] = (W, H, W, H) of each box's image."""
        real = ~crowd
        negative = real & ((xywh[:, 2] < 0) | (xywh[:, 3] < 0))
        outside = real & ~negative & ((raw_xyxy[:, 2] <= 0) | (raw_xyxy[:, 3] <= 0)
                                      | (raw_xyxy[:, 0] >= limits[:, 0]) | (raw_xyxy[:, 1] >= limits[:, 1]))
        clipped_xyxy = np.clip(raw_xyxy, 0.0, limits)
        # How far each side was moved by the clip: the part of the box outside its image.
        moved = np.abs(clipped_xyxy - raw_xyxy).max(axis=1) if len(raw_xyxy) else np.zeros(0)
        small = ((clipped_xyxy[:, 2] - clipped_xyxy[:, 0]) <= MIN_BOX_SIDE) | (
            (clipped_xyxy[:, 3] - clipped_xyxy[:, 1]) <= MIN_BOX_SIDE)
        degenerate = real & ~negative & ~outside & small
        clipped = real & ~negative & ~outside & ~degenerate & (moved > 0)
        max_clip = float(moved[clipped].max()) if clipped.any() else 0.0
        return cls(ann_ids, negative, outside, degenerate, clipped, max_clip)

    @property
    def dropped(self) -> np.ndarray:
        return self.negative | self.outside | self.degenerate

    def any(self) -> bool:
        return bool((self.dropped | self.clipped).any())

    def describe(self, shown: int = 5) -> str:
        """One line: each kind with its count and the first annotation ids."""
        parts = []
        for mask, what in ((self.negative, "with a negative width or height dropped"),
                           (self.outside, "wholly outside their image dropped"),
                           (self.degenerate, f"of {MIN_BOX_SIDE:g} px or less after clipping dropped"),
                           (self.clipped, f"clipped to their image (by up to {self.max_clip:.1f} px)")):
            if mask.any():
                ids = self.ann_ids[mask][:shown].tolist()
                more = ", ..." if mask.sum() > shown else ""
                parts.append(f"{int(mask.sum())} boxes {what} (annotation ids {str(ids)[1:-1]}{more})")
        return "; ".join(parts)


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
