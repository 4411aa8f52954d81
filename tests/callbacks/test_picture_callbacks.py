"""The picture callbacks in a real tiny Lightning fit (ResNet-18, 64 px, 2 epochs), built by
`train.run_training` from the composed config like `python train.py experiment=tiny`, with the
written TensorBoard event files read back; plus the matcher roles and the safety rules on their own."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from anchordet.anchors import placed_anchor_coverage
from anchordet.app import train
from anchordet.callbacks import AnchorPictures, FeatureMapPictures, PictureCallback, PredictionPictures
from anchordet.callbacks.anchors import flatten_numbers
from anchordet.matching import IoUMatcher, YoloMatcher
from anchordet.models.backbone import ResNetFPN
from anchordet.models.detector import Detector
from anchordet.models.heads.rpn import RpnHead
from anchordet.models.heads.yolo import YoloHead

REPO = Path(__file__).resolve().parents[2]
LEVELS = ("P3", "P4", "P5")
STAGES = ("C2", "C3", "C4", "C5")
# 64 px inputs, upscaled x8 to 512; two pictures per row with make_grid's 4 px padding: 2*512 + 3*4.
TWO_COLUMNS_OF_512 = 1036


def train_tiny(root: Path, *overrides: str) -> EventAccumulator:
    """`train.py experiment=tiny` in this process, output under `root`; returns its TensorBoard events."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=tiny", "trainer.max_epochs=2",
            f"paths.root_dir={root}", f"paths.output_dir={root / 'run'}", *overrides])
    train(cfg)
    size_guidance = {"images": 0, "scalars": 0, "histograms": 0, "tensors": 0}
    return EventAccumulator(str(root / "run" / "tensorboard"), size_guidance=size_guidance).Reload()


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("pictures"), "callbacks.anchor_pictures.every_n_epochs=1",
                      "callbacks.anchor_pictures.num_stat_images=8")


def image_sizes(events: EventAccumulator) -> dict[str, tuple[int, int]]:
    """tag -> (width, height) of the last picture written under it."""
    return {tag: (events.Images(tag)[-1].width, events.Images(tag)[-1].height) for tag in events.Tags()["images"]}


def test_every_picture_tag_exists_with_the_expected_size(events):
    sizes = image_sizes(events)
    assert sizes["anchors/matching"][0] == TWO_COLUMNS_OF_512
    assert sizes["anchors/shapes"][0] == TWO_COLUMNS_OF_512  # all-shapes panel + one per level, 2 per row
    assert sizes["predictions/images"][0] == TWO_COLUMNS_OF_512
    assert sizes["anchors/matching"][1] > TWO_COLUMNS_OF_512  # plus the legend bands
    assert sizes["anchors/gt_size_scatter"] == (600, 500)  # 6 x 5 in at 100 dpi
    assert sizes["anchors/best_iou_histogram"] == (600, 400)
    assert "predictions/pr_curves" in sizes
    for name in STAGES + LEVELS:
        # Maps of 16 .. 2 px upscaled (integer factor) to 256; channel grid of 16 tiles of 96 px.
        assert sizes[f"features/{name}/mean"] == (256, 256), name
        assert sizes[f"features/{name}/pca"] == (256, 256), name
        assert sizes[f"features/{name}/channels"] == (394, 394), name
        assert f"features/{name}/activations" in events.Tags()["histograms"]
    assert sizes["features/input"] == (256, 256)  # shown at the feature pictures' size


def test_pictures_repeat_on_schedule(events):
    # Anchors: fit start + after epochs 1 and 2 (every_n_epochs=1); features: fit start + after
    # epoch 2 (every 2); predictions: both validation runs (the sanity check is skipped).
    assert len(events.Images("anchors/matching")) == 3
    assert len(events.Images("anchors/shapes")) == 1
    assert len(events.Images("features/P3/pca")) == 2
    assert len(events.Images("predictions/images")) == 2


def test_scalars_and_text(events):
    scalars = set(events.Tags()["scalars"])
    for tag in ["anchors/kmeans/mean_best_iou", "anchors/kmeans/best_possible_recall", "anchors/grid/mean_best_iou",
                "anchors/gain_mean_best_iou", *(f"anchors/positives_per_image/{level}" for level in LEVELS),
                "timing/anchor_pictures_s", "timing/feature_pictures_s", "timing/prediction_pictures_s"]:
        assert tag in scalars, tag
    recall = events.Scalars("anchors/kmeans/best_possible_recall")[0].value
    assert 0.0 <= recall <= 1.0
    # The builder's report is written once, by the callback: no number under a second tag.
    assert "anchors/mean_best_iou" not in scalars and "anchors/best_possible_recall" not in scalars
    assert "anchors/report/text_summary" in events.Tags()["tensors"]
    # The YOLO matcher has no foreground IoU threshold, so only the placed best IoU is written.
    assert 0.0 < events.Scalars("anchors/placed_best_iou")[0].value <= 1.0
    assert "anchors/gt_with_foreground_anchor" not in scalars
    total_positives = sum(events.Scalars(f"anchors/positives_per_image/{level}")[0].value for level in LEVELS)
    assert total_positives > 0
    assert "predictions/per_class_ap/text_summary" in events.Tags()["tensors"]


def test_turning_callbacks_off_removes_their_tags(tmp_path):
    events = train_tiny(tmp_path, "callbacks.anchor_pictures=null", "callbacks.feature_pictures=null",
                        "trainer.max_epochs=1")
    tags = set(events.Tags()["images"]) | set(events.Tags()["scalars"]) | set(events.Tags()["histograms"])
    assert not [t for t in tags if t.startswith(("features/", "timing/anchor", "timing/feature", "anchors/"))]
    assert "predictions/images" in tags


# ---------------------------------------------------------------------------- matcher roles
def tiny_rpn_detector() -> Detector:
    torch.manual_seed(0)
    backbone = ResNetFPN(depth=18, levels=LEVELS, norm="group", fpn_channels=32)
    head = RpnHead(in_channels=32, num_anchors=1, num_levels=3)
    shapes = [torch.tensor([[8.0, 8.0]]), torch.tensor([[16.0, 32.0]]), torch.tensor([[40.0, 40.0]])]
    return Detector(backbone, head, shapes, IoUMatcher()).eval()


def tiny_detector(ignore_iou: float) -> Detector:
    torch.manual_seed(0)
    shapes = [torch.tensor([[8.0, 8.0]]), torch.tensor([[16.0, 32.0]]), torch.tensor([[40.0, 40.0]])]
    backbone = ResNetFPN(depth=18, levels=LEVELS, norm="group", fpn_channels=32)
    head = YoloHead(in_channels=32, num_anchors=1, num_classes=2, num_levels=3, tower_depth=1, ignore_iou=ignore_iou)
    return Detector(backbone, head, shapes, YoloMatcher()).eval()


def test_roles_follow_the_matcher_and_the_heads_ignore_rule():
    images = torch.randn(1, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([0])}]
    with torch.no_grad():
        # A 16 x 32 box: its best shape is level P4's 16 x 32 (IoU 1), at the cell of its centre
        # (16, 24) on the stride-16 grid: column 1, row 1. P3 has 8*8 anchors, so index 64 + 1*4 + 1.
        anchors, _, roles = tiny_detector(0.5).anchor_roles(images, targets)
        assert anchors.num_anchors == 64 + 16 + 4
        assert roles.positive[0].nonzero().flatten().tolist() == [64 + 5]
        assert not (roles.ignored & roles.positive).any()
        # IoU is never above 1 and always above -1: the head's threshold decides, nothing else.
        _, _, none_ignored = tiny_detector(1.0).anchor_roles(images, targets)
        _, _, all_ignored = tiny_detector(-1.0).anchor_roles(images, targets)
    assert not none_ignored.ignored.any()
    assert all_ignored.ignored.sum().item() == anchors.num_anchors - 1


def test_report_numbers_are_flattened_once_and_the_rest_left_out():
    report = {"kmeans": {"mean_best_iou": 0.6, "anchors_per_level": [3, 3]}, "gain_mean_best_iou": 0.1,
              "from_cache": True, "cache_file": "x.json", "num_boxes": 9}
    assert flatten_numbers(report) == {"kmeans/mean_best_iou": 0.6, "gain_mean_best_iou": 0.1, "num_boxes": 9.0}


def test_placed_anchor_coverage_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
    targets = [
        # IoU 1 with the first anchor; 80 / 100 = 0.8 with the second.
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [12.0, 0.0, 20.0, 10.0]]),
        # 50 / 100 = 0.5 with the first anchor (inside it), 0 with the second.
        torch.tensor([[0.0, 0.0, 5.0, 10.0]]),
        torch.zeros(0, 4),  # an empty image counts no box
    ]
    report = placed_anchor_coverage(anchors, targets, foreground_iou=0.7)
    assert report["placed_best_iou"] == pytest.approx((1.0 + 0.8 + 0.5) / 3)
    assert report["gt_with_foreground_anchor"] == pytest.approx(2 / 3)
    assert placed_anchor_coverage(anchors, targets, foreground_iou=0.5)["gt_with_foreground_anchor"] == 1.0
    assert set(placed_anchor_coverage(anchors, targets, None)) == {"placed_best_iou"}
    assert placed_anchor_coverage(anchors, targets[2:], 0.7) == {}


# ---------------------------------------------------------------------------- safety rules
@pytest.mark.parametrize("callback", [AnchorPictures(), FeatureMapPictures(), PredictionPictures()])
def test_only_rank_zero_draws(callback):
    # A trainer of rank 1: the hooks must return before touching the datamodule or the model.
    trainer = SimpleNamespace(is_global_zero=False, sanity_checking=False, loggers=[], current_epoch=9,
                              global_step=0)
    module = SimpleNamespace()  # any attribute access would raise
    callback.on_fit_start(trainer, module)
    getattr(callback, "on_train_epoch_end", lambda *a: None)(trainer, module)
    getattr(callback, "on_validation_end", lambda *a: None)(trainer, module)
    assert callback.calls == 0


def test_eval_mode_restores_the_training_mode_even_after_an_error():
    module = torch.nn.BatchNorm2d(3).train()
    with pytest.raises(RuntimeError):
        with PictureCallback.eval_mode(module):
            assert not module.training and not torch.is_grad_enabled()
            raise RuntimeError("drawing failed")
    assert module.training and torch.is_grad_enabled()


def test_proposals_show_the_top_k_and_the_recall_summary(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from anchordet.data.categories import CategoryMap
    from anchordet.evaluation import CocoEvaluation
    from anchordet.module import DetectionModule

    module = DetectionModule(tiny_rpn_detector(), CategoryMap([1, 2], ["a", "b"]), None, channels_last=False)
    module.last_evaluation = CocoEvaluation({"AR@100": 0.25}, "AR@100 = 0.2500")
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([0]), "image_id": 1}
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, loggers=[logger], global_step=3,
                              datamodule=SimpleNamespace(val_dataset=[(image, target)]))
    callback = PredictionPictures(num_images=2, proposals_top_k=5)
    callback.on_validation_end(trainer, module)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert events.Images("predictions/images")[0].width == 512  # one image (the dataset has one), 64 -> 512
    assert "predictions/proposal_recall/text_summary" in events.Tags()["tensors"]
    assert "predictions/per_class_ap/text_summary" not in events.Tags()["tensors"]
    assert callback.calls == 1 and module.training  # the mode it had before
