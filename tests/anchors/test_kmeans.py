import json
import logging

import pytest
import torch

import anchordet.anchors.kmeans as kmeans_module
from anchordet.anchors.grid import grid_anchor_shapes
from anchordet.anchors.kmeans import kmeans_beats_baseline
from anchordet.anchors import (
    KMeansAnchors,
    best_shape_iou,
    compare_with_grid,
    fitness_report,
    kmeans_anchor_shapes,
    split_over_levels,
)
from anchordet.boxes import shape_iou


def test_shape_iou_hand_values():
    a = torch.tensor([[2.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[4.0, 2.0], [2.0, 4.0], [2.0, 2.0]])
    # (2,4) vs (4,2): inter 2*2 = 4, union 8 + 8 - 4 = 12.  (1,1) vs (2,2): 1 / 4.
    expected = torch.tensor([[4 / 12, 1.0, 4 / 8], [1 / 8, 1 / 8, 1 / 4]])
    torch.testing.assert_close(shape_iou(a, b), expected)
    assert shape_iou(torch.zeros(0, 2), b).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        shape_iou(torch.zeros(3, 4), b)


def _planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    planted = torch.tensor([[10.0, 30.0], [40.0, 40.0], [120.0, 60.0]])
    # 300 boxes per cluster, +-3 % multiplicative noise, shuffled.
    noise = 1 + 0.06 * (torch.rand(900, 2, generator=g) - 0.5)
    boxes = planted.repeat_interleave(300, dim=0) * noise
    return planted, boxes[torch.randperm(900, generator=g)]


def test_kmeans_recovers_planted_clusters_sorted_by_area():
    planted, boxes = _planted()
    shapes = kmeans_anchor_shapes(boxes, k=3, seed=0)
    assert shapes.shape == (3, 2)
    torch.testing.assert_close(shapes, planted, rtol=0.02, atol=0.0)
    areas = shapes.prod(dim=1)
    assert torch.all(areas[1:] >= areas[:-1])


def test_kmeans_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(3)
    boxes = torch.exp(torch.randn(2000, 2, generator=g) * 0.7 + 3.5)
    first = kmeans_anchor_shapes(boxes, k=9, seed=7)
    second = kmeans_anchor_shapes(boxes.clone(), k=9, seed=7)
    assert torch.equal(first, second)


def test_a_large_set_is_clustered_on_a_sample_with_the_same_fitness():
    g = torch.Generator().manual_seed(5)
    boxes = torch.exp(torch.randn(60_000, 2, generator=g) * 0.7 + 3.5)  # long-tailed, like real box sizes
    full = kmeans_anchor_shapes(boxes, k=9, seed=0, max_fit_boxes=None)
    sampled = kmeans_anchor_shapes(boxes, k=9, seed=0, max_fit_boxes=10_000)
    assert not torch.equal(full, sampled)  # the cap took effect
    assert torch.equal(sampled, kmeans_anchor_shapes(boxes, k=9, seed=0, max_fit_boxes=10_000))
    mean_full, mean_sampled = (best_shape_iou(boxes, [shapes]).mean().item() for shapes in (full, sampled))
    assert abs(mean_full - mean_sampled) < 0.002, (mean_full, mean_sampled)
    # At or under the cap the whole set is clustered, as without one.
    assert torch.equal(kmeans_anchor_shapes(boxes[:10_000], k=9, seed=0, max_fit_boxes=10_000),
                       kmeans_anchor_shapes(boxes[:10_000], k=9, seed=0, max_fit_boxes=None))


def test_empty_cluster_is_reseeded_at_the_worst_covered_box(monkeypatch):
    # Duplicate initial centres leave cluster 1 empty; the re-seed must land on the (40, 40) boxes
    # (best IoU 0.16, the worst covered) and k-means then recovers all three shapes exactly.
    boxes = torch.tensor([[10.0, 10.0], [40.0, 40.0], [100.0, 100.0]]).repeat_interleave(100, dim=0)
    init = torch.tensor([[10.0, 10.0], [10.0, 10.0], [100.0, 100.0]])
    monkeypatch.setattr(kmeans_module, "_kmeans_pp_init", lambda box_wh, k, generator: init.clone())
    shapes = kmeans_anchor_shapes(boxes, k=3, seed=0)
    assert torch.equal(shapes, torch.tensor([[10.0, 10.0], [40.0, 40.0], [100.0, 100.0]]))


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="anchor.k=9"):
        kmeans_anchor_shapes(torch.ones(5, 2), k=9)
    with pytest.raises(ValueError, match=r"only 2 distinct box shapes for anchor\.k=3"):
        kmeans_anchor_shapes(torch.tensor([[1.0, 2.0], [2.0, 1.0]]).repeat(10, 1), k=3)
    with pytest.raises(ValueError, match="strictly positive"):
        kmeans_anchor_shapes(torch.tensor([[1.0, 0.0], [2.0, 2.0]]), k=1)


def test_split_over_levels_even_and_single_level():
    shapes = torch.tensor([[50.0, 50.0], [1.0, 1.0], [3.0, 3.0], [20.0, 20.0], [2.0, 2.0], [10.0, 10.0]])
    levels = split_over_levels(shapes, num_levels=3)
    assert [lvl.tolist() for lvl in levels] == [[[1, 1], [2, 2]], [[3, 3], [10, 10]], [[20, 20], [50, 50]]]
    single = split_over_levels(shapes, num_levels=3, single_level=True)
    assert [lvl.shape for lvl in single] == [(0, 2), (0, 2), (6, 2)]
    assert single[2][:, 0].tolist() == [1, 2, 3, 10, 20, 50]


def test_split_over_levels_error_names_anchor_k():
    with pytest.raises(ValueError, match=r"anchor\.k=9 .* 2 pyramid levels"):
        split_over_levels(torch.ones(9, 2), num_levels=2)


def test_fitness_report_hand_made():
    boxes = torch.tensor([[10.0, 10.0], [20.0, 20.0], [10.0, 40.0]])
    shapes_per_level = [torch.tensor([[10.0, 10.0]]), torch.tensor([[20.0, 20.0]])]
    # Best IoUs: 1, 1 and max(100/400, 200/600) = 1/3 -> mean 7/9; recall (>= 0.5) 2/3.
    report = fitness_report(boxes, shapes_per_level)
    assert report["num_boxes"] == 3 and report["num_anchors"] == 2
    assert report["anchors_per_level"] == [1, 1]
    assert report["mean_best_iou"] == pytest.approx(7 / 9)
    assert report["best_possible_recall"] == pytest.approx(2 / 3)
    torch.testing.assert_close(best_shape_iou(boxes, shapes_per_level), torch.tensor([1.0, 1.0, 1 / 3]))

    # A grid of only (10, 10): best IoUs 1, 1/4, 1/4 -> mean 1/2, recall 1/3.
    comparison = compare_with_grid(boxes, shapes_per_level, [torch.tensor([[10.0, 10.0]]), torch.zeros(0, 2)])
    assert comparison["grid"]["mean_best_iou"] == pytest.approx(0.5)
    assert comparison["gain_mean_best_iou"] == pytest.approx(7 / 9 - 0.5)
    assert comparison["gain_best_possible_recall"] == pytest.approx(1 / 3)


def test_kmeans_anchors_build_report_and_cache(tmp_path, monkeypatch, caplog):
    _, boxes = _planted()
    calls = []
    real = kmeans_module.kmeans_anchor_shapes

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kmeans_module, "kmeans_anchor_shapes", counting)
    caplog.set_level(logging.INFO, logger="anchordet.anchors")

    first, first_report = KMeansAnchors(k=3, cache_dir=tmp_path).build(boxes, num_levels=3)
    assert len(calls) == 1 and [s.shape for s in first] == [(1, 2), (1, 2), (1, 2)]
    assert len(list(tmp_path.glob("kmeans_anchors_*.json"))) == 1
    assert first_report["from_cache"] is False

    second, report = KMeansAnchors(k=3, cache_dir=tmp_path).build(boxes, num_levels=3)
    assert len(calls) == 1, "second build must come from the cache"
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert "loaded k-means anchors from cache" in caplog.text
    assert report["from_cache"] is True
    assert report["kmeans"]["mean_best_iou"] > 0.95  # planted clusters with 3 % noise
    assert report["gain_mean_best_iou"] == pytest.approx(
        report["kmeans"]["mean_best_iou"] - report["grid"]["mean_best_iou"]
    )
    assert "gain" in caplog.text

    # Other boxes (one box 1 % wider: other data or another input size) or other settings recompute.
    changed = boxes.clone()
    changed[0, 0] *= 1.01
    KMeansAnchors(k=3, cache_dir=tmp_path).build(changed, num_levels=3)
    KMeansAnchors(k=3, seed=1, cache_dir=tmp_path).build(boxes, num_levels=3)
    assert len(calls) == 3


def test_kmeans_anchors_ignores_corrupt_cache(tmp_path, caplog):
    _, boxes = _planted()
    anchors = KMeansAnchors(k=3, single_level=True, cache_dir=tmp_path)
    anchors.build(boxes, num_levels=2)
    (cache_file,) = tmp_path.glob("kmeans_anchors_*.json")
    cache_file.write_text("{not json")
    caplog.set_level(logging.WARNING, logger="anchordet.anchors")
    shapes, _ = anchors.build(boxes, num_levels=2)
    assert "unreadable" in caplog.text
    assert [s.shape for s in shapes] == [(0, 2), (3, 2)]
    assert len(json.loads(cache_file.read_text())["shapes_per_level"][1]) == 3


def test_k_none_means_k_per_level_times_the_levels_and_explicit_k_wins(tmp_path):
    _, boxes = _planted()
    five, _ = KMeansAnchors(k=None, k_per_level=3).build(boxes, num_levels=5)
    assert [len(s) for s in five] == [3] * 5  # 15 on P2-P6
    three = KMeansAnchors(k=None, k_per_level=3)
    assert [len(s) for s in three.build(boxes, num_levels=3)[0]] == [3, 3, 3]  # 9 on P3-P5
    # Same clustering as an explicit k=9, so the same cache file serves both.
    assert three.cache_key(boxes, 3) == KMeansAnchors(k=9).cache_key(boxes, 3)
    assert three.cache_key(boxes, 5) == KMeansAnchors(k=15).cache_key(boxes, 5)
    assert three.cache_key(boxes, 3) != three.cache_key(boxes[1:], 3)
    assert [len(s) for s in KMeansAnchors(k=10, k_per_level=3).build(boxes, num_levels=5)[0]] == [2] * 5
    single, _ = KMeansAnchors(k=None, k_per_level=2, single_level=True).build(boxes, num_levels=3)
    assert [len(s) for s in single] == [0, 0, 6]
    with pytest.raises(ValueError, match="anchor.k_per_level"):
        KMeansAnchors(k=None, k_per_level=None)


def test_the_guard_keeps_the_baseline_grid_when_kmeans_fits_worse(caplog):
    # Every box is one of the baseline's own shapes (32 px at ratios 0.5 / 1 / 2): the grid fits them
    # exactly (mean best IoU 1), while k = 1 can only sit between them.
    grid_wh = grid_anchor_shapes([[32.0]], [0.5, 1.0, 2.0])[0]
    box_wh = grid_wh.repeat(50, 1)
    builder = KMeansAnchors(k=1, k_per_level=None, baseline_sizes_per_level=[[32.0]])
    with caplog.at_level(logging.WARNING, logger="anchordet.anchors"):
        shapes, report = builder.build(box_wh, num_levels=1)
    assert report["grid"]["mean_best_iou"] == pytest.approx(1.0)
    assert report["kmeans"]["mean_best_iou"] < 1.0
    assert report["chosen"] == "grid" and "anchor.keep_baseline_if_better=false" in report["note"]
    assert torch.equal(shapes[0], grid_wh)
    assert "do not beat the baseline grid" in caplog.text

    kept, kept_report = KMeansAnchors(k=1, k_per_level=None, baseline_sizes_per_level=[[32.0]],
                                      keep_baseline_if_better=False).build(box_wh, num_levels=1)
    assert kept_report["chosen"] == "kmeans" and kept[0].shape == (1, 2)


def test_the_guard_rule_on_hand_made_reports():
    def report(km_iou, km_recall, grid_iou, grid_recall):
        return {"kmeans": {"mean_best_iou": km_iou, "best_possible_recall": km_recall},
                "grid": {"mean_best_iou": grid_iou, "best_possible_recall": grid_recall}}

    assert kmeans_beats_baseline(report(0.66, 0.99, 0.55, 0.99))
    assert kmeans_beats_baseline(report(0.66, 0.985, 0.55, 0.99))  # within the recall tolerance
    assert not kmeans_beats_baseline(report(0.66, 0.97, 0.55, 0.99))  # a real recall loss
    assert not kmeans_beats_baseline(report(0.55, 1.0, 0.55, 0.9))  # no gain in mean best IoU
