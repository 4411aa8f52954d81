"""What the heads share: reading the per-level anchor counts the assembly hands them."""

from __future__ import annotations

from collections.abc import Sequence


def anchors_per_level(num_anchors: int | Sequence[int], num_levels: int, head_name: str) -> list[int]:
    """A per head-level anchor count list from an int (same A everywhere) or a list, checked."""
    if num_levels < 1:
        raise ValueError(f"{head_name} needs at least one level, got num_levels={num_levels}")
    if isinstance(num_anchors, int):
        num_anchors = [num_anchors] * num_levels
    counts = [int(a) for a in num_anchors]
    if len(counts) != num_levels or min(counts) < 1:
        raise ValueError(
            f"{head_name} num_anchors={list(num_anchors)} must give at least one anchor for each of "
            f"the num_levels={num_levels} levels"
        )
    return counts
