"""Distributed runs: exact evaluation across ranks, and leaving the process clean for the next job.

Lightning's DistributedSampler pads the last batches by repeating images when the val set does not
divide by the number of ranks. Averaging per-rank metrics would count those repeats (and weigh ranks
equally whatever their image count), so instead every rank sends its raw result rows, and the rows of
an image are kept from exactly one copy of that image.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch.distributed as dist

# What Lightning's DDP launcher leaves in the launching process: the next job of a sweep would see
# them, take itself for an externally launched rank and wait forever for peers that never start.
LAUNCHER_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def distributed_job_scope() -> Iterator[None]:
    """Leave the process as this job found it: one job's process group and launcher variables must
    not leak into the next job of a `-m` sweep run by the same process."""
    saved_env = {key: os.environ.get(key) for key in LAUNCHER_ENV_KEYS}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_results(results: list[dict], image_ids: list[int]) -> tuple[list[dict], list[int]]:
    """All ranks' COCO result rows and image ids, each image once (the first rank that saw it wins).

    Collective when distributed: every rank must call it, in the same place (validation epoch end).
    """
    if not is_distributed():
        return _dedupe([(results, image_ids)])
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (results, image_ids))
    return _dedupe(gathered)


def _dedupe(per_rank: list[tuple[list[dict], list[int]]]) -> tuple[list[dict], list[int]]:
    owner: dict[int, int] = {}  # image id -> rank whose rows are kept
    for rank, (_, ids) in enumerate(per_rank):
        for image_id in ids:
            owner.setdefault(int(image_id), rank)
    # A padded duplicate of an image on the same rank appears twice in `ids`; its rows then appear
    # twice in that rank's results. Keep rows of one occurrence by counting copies per (rank, image).
    kept: list[dict] = []
    for rank, (rows, ids) in enumerate(per_rank):
        copies = {}
        for image_id in ids:
            copies[int(image_id)] = copies.get(int(image_id), 0) + 1
        seen_rows: dict[int, int] = {}
        rows_per_image: dict[int, int] = {}
        for row in rows:
            rows_per_image[row["image_id"]] = rows_per_image.get(row["image_id"], 0) + 1
        for row in rows:
            image_id = row["image_id"]
            if owner.get(image_id) != rank:
                continue
            # rows of one image are appended together per occurrence, so the first 1/copies of them
            # belong to its first occurrence.
            limit = rows_per_image[image_id] // copies.get(image_id, 1)
            if seen_rows.get(image_id, 0) < limit:
                kept.append(row)
                seen_rows[image_id] = seen_rows.get(image_id, 0) + 1
    return kept, sorted(owner)
