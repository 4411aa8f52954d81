"""Data-driven anchor shapes: k-means on box sizes with a ``1 - IoU`` distance (YOLOv2).

Redmon & Farhadi ("YOLO9000", 2017, section "Dimension Clusters") cluster the training boxes'
``(w, h)`` with ``d(box, centre) = 1 - IoU(box, centre)``, both boxes centred together, because a
Euclidean distance on ``(w, h)`` lets large boxes dominate while the detector cares about overlap.

Shapes are ``(w, h)`` in network-input pixels: ``box_wh [N, 2]``, centres ``[k, 2]``.  Everything
here is vectorised torch; 1M boxes with k = 9 cluster in a few seconds on one CPU (see
``KMeansAnchors`` for the cached, reported wrapper the configs use; the fitness numbers live in
``anchors/fitness.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from anchordet.anchors.fitness import best_shape, compare_with_grid
from anchordet.anchors.grid import grid_anchor_shapes
from anchordet.boxes import shape_iou

logger = logging.getLogger("anchordet.anchors")

# Boxes clustered at most: a seeded sample of a larger set. The box shapes of a big dataset form a
# smooth distribution, so a large sample finds the same centres to within noise (tested: mean best
# IoU over all boxes within 0.002 on 60k long-tailed boxes sampled to 10k); Lloyd iterations cost
# O(N k), so the cap bounds start-up on train2017-size sets (scripts/bench_startup.py times it).
MAX_FIT_BOXES = 200_000


def _check_wh(wh: Tensor, name: str) -> Tensor:
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2] of (w, h), got {tuple(wh.shape)}")
    return wh


def _kmeans_pp_init(box_wh: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) under the 1 - IoU distance.

    Each new centre is a box drawn with probability proportional to its squared distance to the
    nearest centre so far.  Sampling uses cumsum + searchsorted on a uniform draw instead of
    torch.multinomial, which is limited to 2**24 categories.
    """
    n = box_wh.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    centres = [box_wh[first]]
    nearest = 1.0 - shape_iou(box_wh, box_wh[first : first + 1])[:, 0]
    for _ in range(1, k):
        weights = nearest.double().square().cumsum(0)
        total = weights[-1].item()
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        if total <= 0.0:
            # Every box coincides with a centre already: any box is as good as any other.
            pick = int(u.item() * n)
        else:
            pick = int(torch.searchsorted(weights, u.to(weights.device) * total).clamp(max=n - 1))
        centres.append(box_wh[pick])
        distance = 1.0 - shape_iou(box_wh, box_wh[pick : pick + 1])[:, 0]
        nearest = torch.minimum(nearest, distance)
    return torch.stack(centres)


def _per_cluster_median(values_sorted: Tensor, assign_sorted: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Median of ``values_sorted [N]`` (ascending) within each cluster, and the cluster sizes ``[k]``.

    A stable sort on the cluster ids keeps each cluster's values ascending, so each median sits at a
    fixed position of its cluster's run.  torch has no segmented median; a stable argsort of small
    integers is a radix sort (a few ms for 1M boxes) and needs no Python loop over clusters.
    """
    order = torch.argsort(assign_sorted, stable=True)
    counts = torch.bincount(assign_sorted, minlength=k)
    starts = counts.cumsum(0) - counts
    # Mean of the two middle elements (the same element when the count is odd); empty clusters
    # point at index 0 and are overwritten by the caller.
    filled = counts > 0
    lo = torch.where(filled, starts + (counts - 1) // 2, 0)
    hi = torch.where(filled, starts + counts // 2, 0)
    return 0.5 * (values_sorted[order[lo]] + values_sorted[order[hi]]), counts


def kmeans_anchor_shapes(
    box_wh: Tensor, k: int = 9, seed: int = 0, max_iter: int = 300, tol: float = 1e-3,
    max_fit_boxes: int | None = MAX_FIT_BOXES,
) -> Tensor:
    """Cluster ``box_wh [N, 2]`` into ``k`` anchor shapes ``[k, 2]`` (w, h), sorted by area.

    Distance ``1 - shape_iou`` (YOLOv2), k-means++ seeding from ``torch.Generator().manual_seed(seed)``,
    Lloyd iterations until no box changes cluster, no centre coordinate moves by more than ``tol``
    (relative), or ``max_iter``.  The ``tol`` stop matters on large sets: with 1M boxes a few dozen
    boxes keep swapping clusters for a hundred more iterations that change the mean IoU by < 1e-4.

    Centres are updated with the per-coordinate **median** of their members, not the mean: box
    sizes are long-tailed and IoU depends on size *ratios*, so the right notion of "middle" is
    multiplicative.  The median is invariant to monotone maps (median of w == exp(median of log w)),
    i.e. it is already the log-space centre, and a few huge boxes cannot drag a cluster's centre away
    from the bulk of its members the way they drag an arithmetic mean.

    An empty cluster is re-seeded at the box worst covered by the current centres (lowest best IoU;
    ties broken by the lowest index), which is deterministic and moves a centre to where it helps.

    With more than ``max_fit_boxes`` boxes (None: no cap), a sample of that many, drawn with its own
    generator seeded by ``seed``, is clustered; smaller sets are clustered whole, exactly as before.
    """
    _check_wh(box_wh, "box_wh")
    if k < 1:
        raise ValueError(f"anchor.k must be >= 1, got {k}")
    if max_iter < 1:
        raise ValueError(f"anchor.max_iter must be >= 1, got {max_iter}")
    n = box_wh.shape[0]
    if n < k:
        raise ValueError(
            f"k-means needs at least anchor.k={k} boxes, got {n}; lower anchor.k or use more training data"
        )
    # CPU: the torch.Generator that makes the result reproducible is a CPU generator.
    box_wh = box_wh.detach().float().cpu()
    if not torch.isfinite(box_wh).all() or (box_wh <= 0).any():
        raise ValueError("box_wh for k-means must be finite and strictly positive; drop degenerate boxes first")
    # Fewer distinct shapes than k would leave clusters empty forever.  Count them exactly through
    # the float bits (positive floats -> non-negative int32) packed into one int64 key per box.
    bits = box_wh.view(torch.int32).long()
    num_distinct = torch.unique(bits[:, 0] * 2**32 + bits[:, 1]).numel()
    if num_distinct < k:
        raise ValueError(
            f"k-means got only {num_distinct} distinct box shapes for anchor.k={k}; lower anchor.k "
            f"or use more training data"
        )

    if max_fit_boxes is not None and n > max(int(max_fit_boxes), k):
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[: int(max_fit_boxes)]
        box_wh, n = box_wh[sample.sort().values], int(max_fit_boxes)
    generator = torch.Generator().manual_seed(int(seed))
    centres = _kmeans_pp_init(box_wh, k, generator)
    # The values never change, only the assignment: sort each coordinate once.
    w_sorted, w_order = torch.sort(box_wh[:, 0])
    h_sorted, h_order = torch.sort(box_wh[:, 1])

    assign = torch.full((n,), -1, dtype=torch.long)
    converged = False
    for iteration in range(1, max_iter + 1):
        best_iou, new_assign = best_shape(box_wh, centres)
        if torch.equal(new_assign, assign):
            converged = True
            break
        assign = new_assign
        # int32 halves the bytes of the two random gathers, the slowest part of the update.
        assign32 = assign.int()
        centre_w, counts = _per_cluster_median(w_sorted, assign32[w_order], k)
        centre_h, _ = _per_cluster_median(h_sorted, assign32[h_order], k)
        new_centres = torch.stack([centre_w, centre_h], dim=1)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel() > 0:
            # Stable sort: ties in coverage fall back to the box index, so the re-seed is deterministic.
            worst = torch.sort(best_iou, stable=True).indices[: empty.numel()]
            new_centres[empty] = box_wh[worst]
        shift = ((new_centres - centres).abs() / centres).max().item()
        centres = new_centres
        if shift <= tol and empty.numel() == 0:
            converged = True
            break
    if not converged:
        logger.warning("k-means did not converge in anchor.max_iter=%d iterations; using the last centres", max_iter)
    logger.debug("k-means stopped after %d iterations", iteration)
    areas = centres[:, 0] * centres[:, 1]
    return centres[torch.sort(areas, stable=True).indices]


def split_over_levels(shapes: Tensor, num_levels: int, single_level: bool = False) -> list[Tensor]:
    """Split shapes ``[k, 2]`` over pyramid levels, smallest areas on the finest level.

    ``single_level=True`` puts all shapes on the last (coarsest) level and leaves the others empty
    (``[0, 2]``), which is the original YOLOv2 single-output layout.
    """
    _check_wh(shapes, "shapes")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    ordered = shapes[torch.sort(shapes[:, 0] * shapes[:, 1], stable=True).indices]
    if single_level:
        empty = shapes.new_zeros((0, 2))
        return [empty.clone() for _ in range(num_levels - 1)] + [ordered]
    k = shapes.shape[0]
    if k % num_levels != 0:
        raise ValueError(
            f"anchor.k={k} cannot be split evenly over {num_levels} pyramid levels; set anchor.k to a "
            f"multiple of {num_levels} or anchor.single_level=true"
        )
    return list(ordered.split(k // num_levels))


def _default_baseline_sizes(num_levels: int) -> list[list[float]]:
    # RetinaNet's base anchor (Lin et al. 2017): side 4 * stride on levels P3, P4, ... (strides 8,
    # 16, ...), one size per level; with three aspect ratios that is 3 anchors per level, the same
    # count as k = 9 k-means anchors on P3-P5.
    return [[4.0 * 8.0 * 2.0**level] for level in range(num_levels)]


def boxes_digest(box_wh: Tensor) -> str:
    """Short hash of the exact box sizes: a cache keyed on it goes stale exactly when they change
    (other data, another input size, a changed annotation file), whatever the data source."""
    data = box_wh.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


# Best possible recall k-means may give up against the baseline while still winning on mean best
# IoU: a point of recall is a few boxes in a thousand, below the run-to-run spread of any training.
RECALL_TOLERANCE = 0.01


def kmeans_beats_baseline(report: dict) -> bool:
    """The guard of the YOLO tools' auto-anchor check (Ultralytics keeps its default anchors unless
    new ones fit better): k-means shapes are used when their mean best shape-IoU is higher than the
    baseline grid's and their best possible recall is not lower by more than `RECALL_TOLERANCE`."""
    kmeans, grid = report["kmeans"], report["grid"]
    return (kmeans["mean_best_iou"] > grid["mean_best_iou"]
            and kmeans["best_possible_recall"] >= grid["best_possible_recall"] - RECALL_TOLERANCE)


class KMeansAnchors:
    """Anchor config target: k-means shapes split over levels, cached on disk, compared with a grid.

    ``build(box_wh, num_levels)`` returns ``(shapes_per_level, report)``: ``list[Tensor[A, 2]]``
    (w, h) per level, and the output of :func:`compare_with_grid` plus ``{"from_cache": bool,
    "cache_file": str | None}``, i.e. what k-means bought over the grid baseline
    (``baseline_sizes_per_level`` x ``baseline_aspect_ratios``; default one RetinaNet-style size
    ``4 * stride`` per level, strides 8, 16, ...).

    ``k`` is the total number of clusters; ``k=None`` means ``k_per_level`` times the number of
    pyramid levels the backbone returns (3 x 3 = 9 on P3-P5, 3 x 5 = 15 on P2-P6), so one anchor
    config serves both the single-stage head and the RPN. An explicit ``k`` always wins.
    ``offset`` is where the anchors sit inside their cell when placed (0.5 = the cell centre, as
    YOLO; 0 = the top-left corner, as torchvision and Detectron2).
    ``keep_baseline_if_better``: when the k-means shapes do not beat the baseline grid on the
    training boxes (`kmeans_beats_baseline`), train with the grid and say so (a WARNING, and the
    report's ``chosen`` / ``note``, which TensorBoard's anchors/report shows). Not with
    ``single_level``, whose one level has no per-level baseline to fall back to.
    """

    def __init__(
        self,
        k: int | None = 9,
        seed: int = 0,
        max_iter: int = 300,
        single_level: bool = False,
        cache_dir: str | os.PathLike | None = None,
        baseline_sizes_per_level: list[list[float]] | None = None,
        baseline_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        k_per_level: int | None = 3,
        offset: float = 0.5,
        max_fit_boxes: int | None = MAX_FIT_BOXES,
        keep_baseline_if_better: bool = True,
    ) -> None:
        if k is None and (k_per_level is None or int(k_per_level) < 1):
            raise ValueError(
                f"anchor.k is null, so anchor.k_per_level must be a positive integer, got {k_per_level}; "
                "set one of them"
            )
        self.k = None if k is None else int(k)
        self.k_per_level = None if k_per_level is None else int(k_per_level)
        self.seed = int(seed)
        self.max_iter = int(max_iter)
        self.single_level = bool(single_level)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.baseline_sizes_per_level = baseline_sizes_per_level
        self.baseline_aspect_ratios = tuple(float(r) for r in baseline_aspect_ratios)
        self.offset = float(offset)
        self.max_fit_boxes = None if max_fit_boxes is None else int(max_fit_boxes)
        self.keep_baseline_if_better = bool(keep_baseline_if_better)
        if self.max_fit_boxes is not None and self.max_fit_boxes < 1:
            raise ValueError(f"anchor.max_fit_boxes must be a positive integer or null, got {max_fit_boxes}")

    def total_k(self, num_levels: int) -> int:
        """Clusters for a backbone with ``num_levels`` levels: ``k``, or ``k_per_level * num_levels``."""
        return self.k if self.k is not None else self.k_per_level * int(num_levels)

    def cache_key(self, box_wh: Tensor, num_levels: int) -> str:
        # The resolved k, not the raw setting: k=9 and k=None with 3 per level on 3 levels are the
        # same clustering and share the cache file.
        settings = {
            "boxes": boxes_digest(box_wh),
            "k": self.total_k(num_levels),
            "seed": self.seed,
            "max_iter": self.max_iter,
            "single_level": self.single_level,
            "num_levels": int(num_levels),
            "max_fit_boxes": self.max_fit_boxes,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def _load(self, path: Path) -> list[Tensor] | None:
        try:
            payload = json.loads(path.read_text())
            return [torch.tensor(level, dtype=torch.float32).reshape(-1, 2) for level in payload["shapes_per_level"]]
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring unreadable k-means anchor cache %s (%s); recomputing", path, error)
            return None

    def _save(self, path: Path, shapes_per_level: list[Tensor], settings_key: str, k: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"key": settings_key, "k": k, "seed": self.seed,
                   "shapes_per_level": [s.tolist() for s in shapes_per_level]}
        # Write-then-rename: DDP ranks or sweep jobs building at once never see a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)

    def build(self, box_wh: Tensor, num_levels: int) -> tuple[list[Tensor], dict]:
        """(anchor shapes per level ``list[Tensor[A, 2]]`` (w, h), report) for the train boxes ``box_wh [N, 2]``."""
        _check_wh(box_wh, "box_wh")
        k = self.total_k(num_levels)
        key = self.cache_key(box_wh, num_levels)
        path = self.cache_dir / f"kmeans_anchors_{key}.json" if self.cache_dir is not None else None
        shapes_per_level = self._load(path) if path is not None and path.exists() else None
        from_cache = shapes_per_level is not None
        if from_cache:
            logger.info("loaded k-means anchors from cache %s", path)
        else:
            shapes = kmeans_anchor_shapes(box_wh, k=k, seed=self.seed, max_iter=self.max_iter,
                                          max_fit_boxes=self.max_fit_boxes)
            shapes_per_level = split_over_levels(shapes, num_levels, self.single_level)
            if path is not None:
                self._save(path, shapes_per_level, key, k)
                logger.info("saved k-means anchors to cache %s", path)

        baseline_sizes = self.baseline_sizes_per_level or _default_baseline_sizes(num_levels)
        grid_shapes = grid_anchor_shapes(baseline_sizes, list(self.baseline_aspect_ratios))
        report = {
            **compare_with_grid(box_wh, shapes_per_level, grid_shapes),
            "from_cache": from_cache,
            "cache_file": str(path) if path is not None else None,
            "chosen": "kmeans",
        }
        self._log_report(shapes_per_level, report)
        if self.keep_baseline_if_better and not kmeans_beats_baseline(report) and not self.single_level:
            report["chosen"] = "grid"
            report["note"] = (
                f"k-means anchors do not beat the baseline grid on these boxes (mean best IoU "
                f"{report['kmeans']['mean_best_iou']:.3f} vs {report['grid']['mean_best_iou']:.3f}, best possible "
                f"recall {report['kmeans']['best_possible_recall']:.3f} vs {report['grid']['best_possible_recall']:.3f}): "
                "training with the baseline grid anchors instead (anchor.keep_baseline_if_better=false keeps k-means)")
            logger.warning("%s", report["note"])
            return grid_shapes, report
        return shapes_per_level, report

    def _log_report(self, shapes_per_level: list[Tensor], report: dict) -> None:
        km, grid = report["kmeans"], report["grid"]
        shapes_text = " | ".join(
            " ".join(f"{w:.0f}x{h:.0f}" for w, h in level.tolist()) or "-" for level in shapes_per_level
        )
        logger.info(
            "k-means anchors (k=%d, seed=%d) per level: %s\n"
            "  k-means: mean best IoU %.3f, best possible recall (IoU>=0.5) %.3f with %d anchors\n"
            "  grid   : mean best IoU %.3f, best possible recall (IoU>=0.5) %.3f with %d anchors\n"
            "  gain   : %+.3f mean best IoU, %+.3f recall over %d boxes",
            sum(len(level) for level in shapes_per_level), self.seed, shapes_text,
            km["mean_best_iou"], km["best_possible_recall"], km["num_anchors"],
            grid["mean_best_iou"], grid["best_possible_recall"], grid["num_anchors"],
            report["gain_mean_best_iou"], report["gain_best_possible_recall"], km["num_boxes"],
        )
