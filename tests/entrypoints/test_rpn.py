"""`head=rpn`: what the config group brings along (and what explicit overrides still change), and
`train.py head=rpn` + `evaluate.py` end to end, with the AR checked against pycocotools' own
class-agnostic COCOeval on the written proposals.json."""

import contextlib
import io
import json
from collections import Counter

import pytest
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from anchordet.trained import override_head

P2_P6 = ["P2", "P3", "P4", "P5", "P6"]


def compose_train(*overrides: str):
    return compose(config_name="train", overrides=list(overrides))


def build_anchor_shapes(cfg, num_boxes: int = 400) -> list[torch.Tensor]:
    """Instantiate cfg.anchor (no cache) and build it on random box sizes for the config's levels."""
    anchor_cfg = OmegaConf.to_container(cfg.anchor, resolve=False)  # cache_dir needs Hydra's runtime
    anchor_cfg.pop("cache_dir", None)
    builder = instantiate(anchor_cfg)
    box_wh = 8 + 200 * torch.rand(num_boxes, 2, generator=torch.Generator().manual_seed(0))
    return builder.build(box_wh, num_levels=len(cfg.backbone.levels))[0]


def test_head_rpn_brings_matcher_anchors_levels_and_monitor(hydra_context):
    cfg = compose_train("head=rpn")
    assert cfg.head._target_ == "anchordet.models.heads.rpn.RpnHead" and cfg.head._partial_
    assert cfg.matcher._target_ == "anchordet.matching.IoUMatcher"
    assert (cfg.matcher.fg_iou, cfg.matcher.bg_iou, cfg.matcher.allow_low_quality) == (0.7, 0.3, True)
    assert list(cfg.backbone.levels) == P2_P6
    assert cfg.monitor == "val/AR@1000"
    # The best checkpoint is picked by proposal recall (callbacks interpolate ${monitor}).
    assert cfg.callbacks.model_checkpoint.monitor == "val/AR@1000"
    shapes = build_anchor_shapes(cfg)
    assert [len(s) for s in shapes] == [3] * 5
    # One size per level, 32 .. 512, area size^2 for every ratio.
    areas = torch.stack([s[:, 0] * s[:, 1] for s in shapes])
    torch.testing.assert_close(areas, torch.tensor([32.0, 64, 128, 256, 512])[:, None].expand(5, 3) ** 2)
    head = instantiate(cfg.head)(in_channels=16, num_anchors=3, num_classes=80, num_levels=5)
    assert (head.pre_nms_top_n, head.post_nms_top_n) == ({"train": 2000, "test": 1000}, {"train": 2000, "test": 1000})
    assert head.nms_iou == 0.7 and head.sampler.batch_size_per_image == 256


def test_explicit_choices_win_over_what_head_rpn_brings(hydra_context):
    cfg = compose_train("head=rpn", "anchor=kmeans", "backbone=resnet101")
    assert cfg.anchor._target_.endswith("KMeansAnchors") and cfg.backbone.depth == 101
    assert list(cfg.backbone.levels) == P2_P6
    shapes = build_anchor_shapes(cfg)
    assert [len(s) for s in shapes] == [3] * 5  # 15 k-means anchors, 3 per level, small to large
    areas = torch.cat([s[:, 0] * s[:, 1] for s in shapes])
    assert (areas[1:] >= areas[:-1]).all()

    cfg = compose_train("head=rpn", "anchor=kmeans", "anchor.k=10", "backbone.levels=[P3,P4,P5,P6]",
                        "matcher.fg_iou=0.6", "monitor=val/AR@100")
    assert cfg.anchor.k == 10 and list(cfg.backbone.levels) == ["P3", "P4", "P5", "P6"]
    assert cfg.matcher.fg_iou == 0.6 and cfg.monitor == "val/AR@100"
    assert compose_train("head=rpn", "anchor=grid").anchor.sizes_per_level[0] == [32, 40, 51]
    # Group choices on the command line beat the head's defaults overrides too.
    cfg = compose_train("head=rpn", "matcher=yolo", "backbone/levels=p3_p5", "metric=map")
    assert cfg.matcher._target_.endswith("YoloMatcher") and list(cfg.backbone.levels) == ["P3", "P4", "P5"]
    assert cfg.monitor == "val/mAP"


def test_head_yolo_is_unchanged_and_kmeans_still_gives_9_anchors(hydra_context):
    cfg = compose_train()
    assert cfg.head._target_.endswith("YoloHead") and cfg.matcher._target_.endswith("YoloMatcher")
    assert list(cfg.backbone.levels) == ["P3", "P4", "P5"] and cfg.monitor == "val/mAP"
    assert [len(s) for s in build_anchor_shapes(cfg)] == [3, 3, 3]
    assert [len(s) for s in build_anchor_shapes(compose_train("anchor.k=6"))] == [2, 2, 2]


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_train_and_evaluate_rpn_report_pycocotools_proposal_recall(run_cli, tmp_path):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    run_cli("train.py", "head=rpn", "experiment=tiny", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    best = list((run_dir / "checkpoints").glob("epoch*-best.ckpt"))
    assert len(best) == 1
    checkpoint = torch.load(best[0], map_location="cpu", weights_only=False)
    assert checkpoint["anchordet"]["run_config"]["head"]["_target_"].endswith("RpnHead")
    monitors = [state.get("monitor") for key, state in checkpoint["callbacks"].items() if "ModelCheckpoint" in key]
    # The best-checkpoint callback monitors AR@1000; last.ckpt and step checkpoints monitor nothing.
    assert [m for m in monitors if m is not None] == ["val/AR@1000"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set(EventAccumulator(str(run_dir / "tensorboard")).Reload().Tags()["scalars"])
    for tag in ("train/loss_obj_step", "train/loss_box_step", "val/AR@100", "val/AR@1000", "val/AR_small@1000"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    # The IoU matcher's 0.7 foreground threshold gives the anchor-reach scalar (AnchorPictures).
    assert "anchors/gt_with_foreground_anchor" in scalars

    result = run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                 f"hydra.run.dir={eval_dir}", cwd=tmp_path)
    assert "AR@1000 =" in result.stdout
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    proposals = json.loads((eval_dir / "proposals.json").read_text())
    assert proposals, "the RPN wrote no proposals"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(metrics["annotation_file"])
        evaluator = COCOeval(gt, gt.loadRes(proposals), "bbox")
        evaluator.params.useCats = 0
        evaluator.params.maxDets = [100, 300, 1000]
        evaluator.evaluate(); evaluator.accumulate(); evaluator.summarize()
    # summarize(): stats[6:9] = AR at maxDets[0..2], stats[9:12] = AR small/medium/large at maxDets[2].
    names = ["AR@100", "AR@300", "AR@1000", "AR_small@1000", "AR_medium@1000", "AR_large@1000"]
    for name, value in zip(names, evaluator.stats[6:12]):
        assert metrics[name] == pytest.approx(max(value, 0.0), abs=1e-6), name
    assert metrics["AR@1000"] > 0
    per_image = {}
    for row in proposals:
        per_image.setdefault(row["image_id"], []).append(row["score"])
    assert set(per_image) <= set(gt.getImgIds()) and max(len(s) for s in per_image.values()) <= 1000
    assert {row["category_id"] for row in proposals} == {gt.getCatIds()[0]}
    assert all(0.0 <= s <= 1.0 for scores in per_image.values() for s in scores)

    # Test-time head settings: evaluate.py +head.nms_iou=... rebuilds the head with them.
    loose_dir = tmp_path / "eval_nms_0.95"
    run_cli("evaluate.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "+head.nms_iou=0.95",
        "+head.post_nms_top_n_test=50", f"hydra.run.dir={loose_dir}", cwd=tmp_path)
    loose_metrics = json.loads((loose_dir / "metrics.json").read_text())
    assert loose_metrics["head_overrides"] == {"nms_iou": 0.95, "post_nms_top_n_test": 50}
    loose = json.loads((loose_dir / "proposals.json").read_text())
    assert max(Counter(row["image_id"] for row in loose).values()) <= 50


def test_evaluate_rejects_a_head_setting_the_checkpoint_lacks():
    run_cfg = OmegaConf.create({"head": {"_target_": "anchordet.models.heads.rpn.RpnHead", "nms_iou": 0.7}})
    override_head(run_cfg, {"nms_iou": 0.9})
    assert run_cfg.head.nms_iou == 0.9
    with pytest.raises(ValueError, match=r"head\.nms_threshold: .*no such setting.*nms_iou"):
        override_head(run_cfg, {"nms_threshold": 0.9})
    with pytest.raises(ValueError, match=r"head\._target_"):
        override_head(run_cfg, {"_target_": "torch.nn.Identity"})
