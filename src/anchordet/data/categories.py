"""COCO category ids <-> contiguous labels: the one place where the two meet.

COCO numbers its 80 classes 1..90 with gaps; every loss, head and metric inside the library wants
labels 0..C-1. Mixing the two up fails silently (a class id used as a logit index trains the wrong
class), so the mapping lives in one small immutable object that the data module builds from the
training annotations and the checkpoint carries (`to_dict` / `from_dict`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch


class CategoryMap:
    """Sorted COCO category ids -> labels ``0..C-1`` (label ``i`` is the ``i``-th smallest id).

    Ids and names may be given in any order; they are sorted together by id so that the same set of
    categories always yields the same labels, whatever order the JSON lists them in.
    """

    def __init__(self, category_ids: Iterable[int], names: Iterable[str]) -> None:
        ids, names = [int(i) for i in category_ids], [str(n) for n in names]
        if len(ids) != len(names):
            raise ValueError(f"CategoryMap needs one name per category id, got {len(ids)} ids and "
                             f"{len(names)} names")
        if not ids:
            raise ValueError("CategoryMap needs at least one category; the annotation file lists none")
        duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
        if duplicates:
            raise ValueError(f"category ids must be unique, these appear more than once: {duplicates}")
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self._ids: tuple[int, ...] = tuple(ids[k] for k in order)
        self._names: tuple[str, ...] = tuple(names[k] for k in order)
        self._label_by_id = {cat_id: label for label, cat_id in enumerate(self._ids)}
        # Sorted ids let labels_of map a whole array with one searchsorted instead of a dict loop.
        self._sorted_ids = np.asarray(self._ids, dtype=np.int64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_categories(cls, categories: Iterable[Mapping[str, Any]]) -> "CategoryMap":
        """From the ``categories`` list of a COCO JSON (dicts with ``id`` and ``name``)."""
        categories = list(categories)
        return cls([c["id"] for c in categories], [c.get("name", str(c["id"])) for c in categories])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CategoryMap":
        """Inverse of `to_dict` (what checkpoints store)."""
        try:
            return cls(d["category_ids"], d["names"])
        except KeyError as missing:
            raise ValueError(f"a saved category map needs keys 'category_ids' and 'names', "
                             f"missing {missing}; was it written by CategoryMap.to_dict?") from None

    def to_dict(self) -> dict[str, list]:
        """Plain lists only, so it survives ``torch.save`` / YAML / JSON unchanged."""
        return {"category_ids": list(self._ids), "names": list(self._names)}

    # ------------------------------------------------------------------ lookups
    @property
    def num_classes(self) -> int:
        return len(self._ids)

    @property
    def category_ids(self) -> list[int]:
        """COCO ids in label order: ``category_ids[label]``."""
        return list(self._ids)

    @property
    def names(self) -> list[str]:
        """Category names in label order: ``names[label]``."""
        return list(self._names)

    def label_of(self, category_id: int) -> int:
        try:
            return self._label_by_id[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in this category map "
                           f"(known ids: {list(self._ids)})") from None

    def category_id_of(self, label: int) -> int:
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise IndexError(f"label {label} is outside 0..{self.num_classes - 1}")
        return self._ids[label]

    def labels_of(self, category_ids: np.ndarray | torch.Tensor | Iterable[int]) -> np.ndarray:
        """Vectorised `label_of`: int64 array of labels; raises KeyError naming unknown ids."""
        ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
        positions = np.searchsorted(self._sorted_ids, ids)
        positions_in_range = np.minimum(positions, self.num_classes - 1)
        unknown = self._sorted_ids[positions_in_range] != ids
        if unknown.any():
            raise KeyError(f"category ids {sorted(set(ids[unknown].tolist()))[:10]} are not in this "
                           f"category map (known ids: {list(self._ids)})")
        return positions.astype(np.int64)

    # ------------------------------------------------------------------ value semantics
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoryMap):
            return NotImplemented
        return self._ids == other._ids and self._names == other._names

    def __hash__(self) -> int:
        return hash((self._ids, self._names))

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}:{n}" for i, n in zip(self._ids[:6], self._names[:6]))
        more = f", ... ({self.num_classes} classes)" if self.num_classes > 6 else ""
        return f"CategoryMap({shown}{more})"

    def describe_difference(self, other: "CategoryMap",
                            labels: tuple[str, str] = ("the first", "the second")) -> str:
        """Human-readable difference, for errors when two annotation files disagree; ``labels``
        name ``self`` and ``other`` in the text."""
        mine, theirs = dict(zip(self._ids, self._names)), dict(zip(other._ids, other._names))
        parts = []
        if only_here := sorted(set(mine) - set(theirs)):
            parts.append(f"ids only in {labels[0]}: {only_here[:10]}")
        if only_there := sorted(set(theirs) - set(mine)):
            parts.append(f"ids only in {labels[1]}: {only_there[:10]}")
        renamed = [(i, mine[i], theirs[i]) for i in sorted(set(mine) & set(theirs)) if mine[i] != theirs[i]]
        if renamed:
            parts.append("names differ: " + ", ".join(f"{i}: {a!r} vs {b!r}" for i, a, b in renamed[:5]))
        return "; ".join(parts) or "no difference"
