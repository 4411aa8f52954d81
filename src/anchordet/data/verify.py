"""Every image checked once before training starts, so a corrupt file is found at minute 0, not hour 7.

The check reads what can be read without decoding the pixels:

- the header (PIL opens the file and parses its markers): the file is an image at all;
- the size after EXIF orientation (COCO sizes are those of the displayed image), against the JSON;
- for JPEG, the end-of-image marker ``FF D9`` near the end of the file: a truncated download or copy
  loses it. (In JPEG entropy-coded data every ``FF`` byte is followed by ``00`` or a restart marker,
  so ``FF D9`` in the tail cannot be image data.)

Results are cached per image folder in a JSON file, keyed by each file's size and modification time,
so a second start only stats the files. The work is spread over processes (`num_workers`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger("anchordet.data")

# EXIF orientations 5-8 rotate by 90 or 270 degrees: the displayed image has width and height swapped.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"
# Bytes read from the end of a JPEG when looking for its end marker (writers may pad after it).
JPEG_TAIL = 1024
CACHE_VERSION = 1
# Images per task handed to a worker process: large enough that the pickling overhead vanishes.
CHUNK = 512


@dataclass(frozen=True)
class BadImage:
    image_id: int
    file_name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file_name} (image id {self.image_id}): {self.reason}"


def check_image(path: str, expected_hw: tuple[int, int]) -> str | None:
    """None when the file is a readable image of the expected (height, width), else the reason."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            image_format = image.format
    except FileNotFoundError:
        return "the file does not exist"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"not a readable image ({error})"
    if (height, width) != tuple(expected_hw):
        return (f"{width}x{height} pixels (width x height, after EXIF orientation) but the annotation file says "
                f"width={expected_hw[1]}, height={expected_hw[0]}")
    if image_format == "JPEG":
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - JPEG_TAIL))
            if JPEG_END not in handle.read():
                return "a truncated JPEG (no end-of-image marker)"
    return None


def _check_chunk(items: Sequence[tuple[str, tuple[int, int]]]) -> list[str | None]:
    return [check_image(path, hw) for path, hw in items]


def _cache_file(cache_dir: Path, images_dir: Path) -> Path:
    digest = hashlib.blake2b(str(images_dir.resolve()).encode(), digest_size=8).hexdigest()
    return cache_dir / f"verified_images_{digest}.json"


def _load_cache(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
        return payload["images"] if payload.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save_cache(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: parallel runs never read a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump({"version": CACHE_VERSION, "images": entries}, handle)
    os.replace(tmp, path)


def verify_images(images_dir: Path, file_names: Sequence[str], image_ids: Sequence[int],
                  sizes_hw: Sequence[tuple[int, int]], cache_dir: Path | None = None,
                  num_workers: int = 0) -> list[BadImage]:
    """Check every listed image (see the module docstring); returns the bad ones, in list order.

    An entry of the cache counts only while the file's size and modification time are unchanged;
    the expected size is part of the entry, so an edited annotation file is checked again.
    """
    start = time.perf_counter()
    cache_path = _cache_file(cache_dir, images_dir) if cache_dir is not None else None
    cache = _load_cache(cache_path) if cache_path is not None and cache_path.exists() else {}
    entries, reasons, todo = {}, [None] * len(file_names), []
    for k, (name, hw) in enumerate(zip(file_names, sizes_hw)):
        path = os.path.join(images_dir, name)
        try:
            stat = os.stat(path)
        except OSError:
            reasons[k] = "the file does not exist"
            continue
        key = [stat.st_size, stat.st_mtime_ns, int(hw[0]), int(hw[1])]
        cached = cache.get(name)
        if cached is not None and cached[:4] == key:
            reasons[k] = cached[4]
            entries[name] = cached
        else:
            todo.append((k, path, key))
    if todo:
        log.info("checking %d of %d images in %s (header, size, JPEG end marker) with %d processes",
                 len(todo), len(file_names), images_dir, max(1, num_workers))
        work = [(path, (key[2], key[3])) for _, path, key in todo]
        chunks = [work[i:i + CHUNK] for i in range(0, len(work), CHUNK)]
        results = _run_chunks(chunks, num_workers)
        for (k, _, key), reason in zip(todo, results):
            reasons[k] = reason
            entries[file_names[k]] = [*key, reason]
    if cache_path is not None and todo:
        _save_cache(cache_path, entries)
    bad = [BadImage(int(image_ids[k]), str(file_names[k]), reason) for k, reason in enumerate(reasons) if reason]
    log.info("verified %d images in %s in %.1f s (%d from the cache): %d unreadable or of the wrong size",
             len(file_names), images_dir, time.perf_counter() - start, len(file_names) - len(todo), len(bad))
    return bad


def _run_chunks(chunks: list, num_workers: int) -> list[str | None]:
    """Check the chunks in `num_workers` processes (0 or 1: here), printing progress on a terminal."""
    results: list[str | None] = []
    done, total = 0, sum(len(c) for c in chunks)
    show = sys.stderr.isatty()
    if num_workers <= 1 or len(chunks) < 2:  # a handful of images: not worth starting processes
        mapped = map(_check_chunk, chunks)
        executor = None
    else:
        executor = ProcessPoolExecutor(max_workers=num_workers)
        mapped = executor.map(_check_chunk, chunks)
    try:
        for chunk_result in mapped:
            results.extend(chunk_result)
            done += len(chunk_result)
            if show:
                print(f"\rverifying images: {done}/{total}", end="", file=sys.stderr, flush=True)
    finally:
        if executor is not None:
            executor.shutdown()
        if show:
            print(file=sys.stderr)
    return results
