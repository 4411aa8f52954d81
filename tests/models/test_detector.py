"""Detector end to end on CPU: a ResNet-18 FPN at 64x64 (levels 8x8, 4x4, 2x2), the YOLO head and matcher."""

import pytest
import torch
from torch import nn

from anchordet.matching import YoloMatcher
from anchordet.models.backbone import ResNetFPN
from anchordet.models.detector import Detector
from anchordet.models.heads.yolo import YoloHead

SIZE = 64
NUM_CLASSES = 3
SHAPES = [
    torch.tensor([[8.0, 8.0], [12.0, 24.0]]),
    torch.tensor([[24.0, 24.0], [16.0, 32.0]]),
    torch.tensor([[40.0, 40.0], [32.0, 48.0]]),
]
TARGETS = [
    {"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


def build(shapes=SHAPES, seed=0):
    torch.manual_seed(seed)
    backbone = ResNetFPN(depth=18, levels=("P3", "P4", "P5"), norm="group", fpn_channels=32)
    head = YoloHead(
        in_channels=backbone.out_channels,
        num_anchors=Detector.num_anchors_per_used_level(shapes),
        num_classes=NUM_CLASSES,
        num_levels=len(Detector.used_levels(shapes)),
        tower_depth=1,
    )
    return Detector(backbone, head, shapes, YoloMatcher())


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_loss_keys_sum_and_backward(images):
    detector = build()
    losses = detector.loss(images, TARGETS)
    assert set(losses) == {"loss", "loss_obj", "loss_cls", "loss_box"}
    assert torch.allclose(losses["loss"], losses["loss_obj"] + losses["loss_cls"] + losses["loss_box"])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box"].item() > 0  # the first image has matched boxes
    losses["loss"].backward()
    assert detector.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert detector.head.predictors[0].weight.grad.abs().sum() > 0


def test_all_empty_batch_has_finite_loss_and_zero_box_term(images):
    detector = build()
    empty = [TARGETS[1], TARGETS[1]]
    losses = detector.loss(images, empty)
    assert losses["loss_box"].item() == 0.0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert detector.head.predictors[0].bias.grad.abs().sum() > 0


def test_forward_gives_raw_outputs_per_level(images):
    raw = build()(images)
    # 8x8, 4x4, 2x2 cells with 2 anchors each, 5 + 3 outputs per anchor.
    assert [tuple(r.shape) for r in raw] == [(2, 128, 8), (2, 32, 8), (2, 8, 8)]


def test_predict_format_and_mode_restored(images):
    detector = build()
    detector.head.score_thresh = 0.0  # an untrained head scores ~1e-4: keep everything to check the format
    detector.train()
    predictions = detector.predict(images)
    assert detector.training and detector.backbone.training
    assert len(predictions) == 2
    for prediction in predictions:
        assert set(prediction) == {"boxes", "scores", "labels"}
        count = prediction["scores"].shape[0]
        assert prediction["boxes"].shape == (count, 4) and prediction["labels"].shape == (count,)
        assert prediction["labels"].dtype == torch.int64
        assert 0 < count <= detector.head.max_detections
        assert prediction["boxes"].min() >= 0 and prediction["boxes"].max() <= SIZE
        assert torch.all(prediction["scores"][:-1] >= prediction["scores"][1:])
        assert prediction["labels"].max() < NUM_CLASSES


def test_anchor_shapes_are_buffers_restored_by_load_state_dict(images):
    trained = build()
    state = trained.state_dict()
    assert [torch.equal(state[f"anchor_shapes_{level}"], SHAPES[level]) for level in range(3)] == [True] * 3
    placeholders = [torch.ones_like(s) for s in SHAPES]
    fresh = build(shapes=placeholders, seed=1)
    fresh.loss(images, TARGETS)  # fills the anchor cache with the placeholder shapes
    # Loading through a parent module, as Lightning does with the LightningModule.
    parent = nn.ModuleDict({"detector": fresh})
    parent.load_state_dict({f"detector.{k}": v for k, v in state.items()})
    for loaded, saved in zip(fresh.anchor_shapes_per_level, SHAPES):
        assert torch.equal(loaded, saved)
    # The cached anchor grid must not keep the placeholders.
    _, grid = fresh._run(images)
    assert torch.equal(grid.anchor_wh[0], SHAPES[0][0])
    assert torch.equal(grid.shapes_per_level[2], SHAPES[2])
    assert fresh.strides == [8, 16, 32]


def test_single_level_option_drops_the_empty_levels(images):
    shapes = [torch.zeros(0, 2), torch.zeros(0, 2),
              torch.tensor([[8.0, 8.0], [16.0, 32.0], [24.0, 24.0], [40.0, 40.0], [32.0, 48.0]])]
    assert Detector.used_levels(shapes) == [2]
    assert Detector.num_anchors_per_used_level(shapes) == [5]
    detector = build(shapes=shapes)
    assert detector.head.num_levels == 1
    raw = detector(images)
    assert [tuple(r.shape) for r in raw] == [(2, 2 * 2 * 5, 8)]
    losses = detector.loss(images, TARGETS)
    assert torch.isfinite(losses["loss"]) and losses["loss_box"].item() > 0
    assert detector.state_dict()["anchor_shapes_0"].shape == (0, 2)
    assert [tuple(s.shape) for s in detector.anchor_shapes_per_level] == [(0, 2), (0, 2), (5, 2)]
    assert detector.used_strides == [32]
    assert len(detector.predict(images)) == 2


def test_mismatched_head_or_levels_are_reported():
    backbone = ResNetFPN(depth=18, fpn_channels=32, norm="group")
    head = YoloHead(32, num_anchors=2, num_classes=NUM_CLASSES, num_levels=2)
    with pytest.raises(ValueError, match="num_levels"):
        Detector(backbone, head, SHAPES, YoloMatcher())
    head = YoloHead(32, num_anchors=3, num_classes=NUM_CLASSES, num_levels=3)
    with pytest.raises(ValueError, match="num_anchors"):
        Detector(backbone, head, SHAPES, YoloMatcher())
    with pytest.raises(ValueError, match="backbone"):
        Detector(backbone, head, SHAPES[:2], YoloMatcher())


def test_anchors_cached_under_inference_mode_do_not_break_training(images):
    # Lightning validates under torch.inference_mode (its sanity check runs before training):
    # anchors cached there cannot be saved for backward, so training must build its own.
    detector = build()
    with torch.inference_mode():
        detector.predict(images)
    detector.loss(images, TARGETS)["loss"].backward()
    grid_first = detector.anchor_grid((SIZE, SIZE), images.device)
    assert detector.anchor_grid((SIZE, SIZE), images.device) is grid_first
    assert grid_first.grid_sizes == [(8, 8), (4, 4), (2, 2)] and grid_first.input_size == (SIZE, SIZE)


def test_the_anchor_grid_follows_the_backbone_geometry_and_a_wrong_one_is_reported(images):
    detector = build()
    # A 70 x 90 input: every stride-2 step rounds up, so the levels are ceil(70 / s) x ceil(90 / s).
    odd = torch.randn(1, 3, 70, 90)
    raw = detector(odd)
    grid = detector.anchor_grid((70, 90))
    assert grid.grid_sizes == [(9, 12), (5, 6), (3, 3)]
    assert [r.shape[1] for r in raw] == grid.num_per_level
    assert len(detector.predict(odd)) == 1
    detector.backbone.feature_sizes = lambda h, w: [(1, 1)] * 3  # a backbone that misstates its geometry
    detector.clear_anchor_cache()
    with pytest.raises(ValueError, match="feature_sizes"):
        detector.loss(images, TARGETS)


def test_a_few_steps_on_one_image_reduce_the_loss(images):
    detector = build()
    optimizer = torch.optim.Adam(detector.parameters(), lr=3e-3)
    batch, targets = images[:1], TARGETS[:1]
    history = []
    for _ in range(25):
        optimizer.zero_grad()
        losses = detector.loss(batch, targets)
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["loss_box"] < history[0]["loss_box"]
    assert history[-1]["loss_cls"] < history[0]["loss_cls"]
