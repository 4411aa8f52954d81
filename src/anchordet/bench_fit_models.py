"""The models of the fit benchmark (`anchordet.bench_fit`): ours from the project's configs, and
torchvision's RetinaNet, FCOS and Faster R-CNN RPN on the same ResNet depth + FPN.

Every model is wrapped as a `FitModel`: the module the optimiser trains, a loss on a training batch
and a prediction on an evaluation batch. Batches are what the project's loaders yield: letterboxed
``uint8 [B, 3, S, S]`` images and targets with ``boxes`` (xyxy, input pixels) and ``labels``
(0..C-1). Predictions come back in the same frame (xyxy input pixels), one dict per image with
``boxes`` [D, 4], ``scores`` [D] and ``labels`` [D]; the harness maps them to the original images.

Shape glossary: B images per batch, S input side, C classes, D detections or proposals of one image.

torchvision's models normalise and resize inputs in their own ``GeneralizedRCNNTransform``; with
``min_size = max_size = S`` an S x S letterboxed image is scaled by exactly 1, so they see the same
pixels as ours (as ``[0, 1]`` floats, which that transform normalises with the ImageNet statistics
our module uses). From random initialisation torchvision's constructors put trainable BatchNorm in
the ResNet (FrozenBatchNorm is for ImageNet weights); ours uses trainable BatchNorm too
(``backbone.norm: batch``). Given a local ImageNet weights file, both load it and train every layer.
Each peer keeps its own defaults otherwise (anchors, head, losses, thresholds), as a user would get.

A new model is one function decorated with ``@fit_model("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from anchordet.app import build_datamodule, build_fresh_detector, compose_train_config
from anchordet.models.heads.common import DETECTIONS, PROPOSALS
from anchordet.module import DetectionModule

Batch = tuple[Tensor, list[dict]]  # (uint8 [B, 3, S, S], targets), on the model's device


@dataclass
class FitSetup:
    """What every model of one benchmark invocation shares."""

    overrides: list[str]  # Hydra overrides of ours: data, image size, batch, backbone depth, weights
    datamodule: object  # the one datamodule every model trains and is evaluated on
    num_classes: int
    image_size: int
    depth: int
    device: torch.device
    output_dir: Path
    weights_file: Path | None = None  # a local torchvision ResNet state dict, or random init
    channels_last: bool = False  # for the peers (ours follows its own module default)


@dataclass
class FitModel:
    name: str
    task: str  # DETECTIONS or PROPOSALS (evaluated by mAP or by class-agnostic recall)
    network: nn.Module  # what the optimiser trains
    loss: Callable[[Batch], Tensor]  # scalar training loss
    predict: Callable[[Tensor], list[dict]]  # uint8 images -> per image boxes / scores / labels
    notes: dict = field(default_factory=dict)  # reported with the model's rows (e.g. its anchors)


FitModelBuilder = Callable[[FitSetup], FitModel]
FIT_MODELS: dict[str, FitModelBuilder] = {}


def fit_model(name: str) -> Callable[[FitModelBuilder], FitModelBuilder]:
    if name in FIT_MODELS:
        raise ValueError(f"fit benchmark model {name!r} is registered twice; give the new one another name")
    return lambda builder: FIT_MODELS.setdefault(name, builder)


# ---------------------------------------------------------------------------- ours
def ours(name: str, extra_overrides: list[str], setup: FitSetup) -> FitModel:
    """Our detector exactly as ``python train.py <setup.overrides> <extra_overrides>`` builds it
    (anchors fitted to the shared training data, the module's device-side normalisation)."""
    cfg = compose_train_config(setup.overrides + extra_overrides, setup.output_dir / name)
    detector, anchor_report = build_fresh_detector(cfg, setup.datamodule)
    module = DetectionModule(detector, setup.datamodule.category_map).to(setup.device)
    task = detector.head.task

    def loss(batch: Batch) -> Tensor:
        images, targets = module.on_after_batch_transfer(batch)
        return detector.loss(images, targets)["loss"]

    def predict(images: Tensor) -> list[dict]:
        normalised, _ = module.on_after_batch_transfer((images, None))
        return detector.predict(normalised)

    shapes = [[[round(v, 1) for v in wh] for wh in level.tolist()] for level in detector.anchor_shapes_per_level]
    notes = {"overrides": extra_overrides, "anchor_shapes_per_level": shapes}
    # Shape fitness against the training boxes, of these anchors and of the builder's reference set.
    notes["anchor_fitness"] = {kind: {key: fit[key] for key in ("mean_best_iou", "best_possible_recall")}
                               for kind, fit in (anchor_report or {}).items() if isinstance(fit, dict)}
    return FitModel(name, task, module, loss, predict, notes)


# Grid anchors with as many shapes as k-means gives (3 per level): one size per level, 4x the
# level's stride (the FPN / RetinaNet convention, Lin et al. 2017), at the three usual ratios.
SAME_K_GRID = ["anchor=grid", "anchor.sizes_per_level=[[32],[64],[128]]"]


@fit_model("anchordet_yolo_kmeans")
def yolo_kmeans(setup: FitSetup) -> FitModel:
    return ours("anchordet_yolo_kmeans", ["anchor=kmeans"], setup)


@fit_model("anchordet_yolo_grid")
def yolo_grid(setup: FitSetup) -> FitModel:
    return ours("anchordet_yolo_grid", SAME_K_GRID, setup)


@fit_model("anchordet_rpn")
def rpn_grid(setup: FitSetup) -> FitModel:
    return ours("anchordet_rpn", ["head=rpn"], setup)


@fit_model("anchordet_rpn_kmeans")
def rpn_kmeans(setup: FitSetup) -> FitModel:
    return ours("anchordet_rpn_kmeans", ["head=rpn", "anchor=kmeans"], setup)


# ---------------------------------------------------------------------------- torchvision
def torchvision_backbone(setup: FitSetup, returned_layers: list[int], extra_blocks=None) -> nn.Module:
    """torchvision's ResNet + FPN (256 channels) at our depth; BatchNorm trainable, every stage trained."""
    backbone = resnet_fpn_backbone(backbone_name=f"resnet{setup.depth}", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=returned_layers, extra_blocks=extra_blocks)
    if setup.weights_file is not None:
        state = torch.load(setup.weights_file, map_location="cpu", weights_only=True)
        # The classifier (fc) is not part of the detection body.
        missing, unexpected = backbone.body.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
        if missing or unexpected:
            raise ValueError(f"{setup.weights_file}: not a torchvision resnet{setup.depth} state dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return backbone


def unit_images(images: Tensor) -> list[Tensor]:
    """uint8 [B, 3, S, S] -> B float [3, S, S] in [0, 1], the input torchvision's detectors expect."""
    return list(images.float().div_(255))


def plain_targets(targets: list[dict]) -> list[dict]:
    """Only what torchvision reads; it also rejects zero-width boxes, which letterboxing can make."""
    kept = []
    for target in targets:
        boxes = target["boxes"].float()
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        kept.append({"boxes": boxes[valid], "labels": target["labels"][valid].long()})
    return kept


def one_stage_peer(name: str, model: nn.Module, setup: FitSetup) -> FitModel:
    model = model.to(setup.device)
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)

    def loss(batch: Batch) -> Tensor:
        images, targets = batch
        return sum(model(unit_images(images), plain_targets(targets)).values())

    def predict(images: Tensor) -> list[dict]:
        return model(unit_images(images))

    return FitModel(name, DETECTIONS, model, loss, predict, {"torchvision": torchvision.__version__})


@fit_model("torchvision_retinanet")
def retinanet(setup: FitSetup) -> FitModel:
    # P3-P7 with P6/P7 from P5, as torchvision's retinanet_resnet50_fpn builds it.
    backbone = torchvision_backbone(setup, [2, 3, 4], LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, num_classes=setup.num_classes, min_size=setup.image_size, max_size=setup.image_size)
    return one_stage_peer("torchvision_retinanet", model, setup)


@fit_model("torchvision_fcos")
def fcos(setup: FitSetup) -> FitModel:
    backbone = torchvision_backbone(setup, [2, 3, 4], LastLevelP6P7(256, 256))  # as fcos_resnet50_fpn
    model = FCOS(backbone, num_classes=setup.num_classes, min_size=setup.image_size, max_size=setup.image_size)
    return one_stage_peer("torchvision_fcos", model, setup)


@fit_model("torchvision_rpn")
def torchvision_rpn(setup: FitSetup) -> FitModel:
    """Faster R-CNN's transform, backbone (P2-P6) and RPN; its RoI heads are never run or trained."""
    backbone = torchvision_backbone(setup, [1, 2, 3, 4])  # P2-P5 + max-pooled P6, as fasterrcnn_resnet50_fpn
    model = FasterRCNN(backbone, num_classes=setup.num_classes + 1, min_size=setup.image_size,
                       max_size=setup.image_size).to(setup.device)
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
    trained = nn.ModuleDict({"backbone": model.backbone, "rpn": model.rpn})

    def proposals(images: Tensor, targets: list[dict] | None):
        image_list, targets = model.transform(unit_images(images), targets)
        return model.rpn(image_list, model.backbone(image_list.tensors), targets)

    def loss(batch: Batch) -> Tensor:
        images, targets = batch
        return sum(proposals(images, plain_targets(targets))[1].values())

    def predict(images: Tensor) -> list[dict]:
        boxes_per_image, _ = proposals(images, None)
        # torchvision's RPN returns its proposals sorted by objectness but drops the scores; COCOeval
        # only ranks by score, so the rank itself (1 for the first) is an exact stand-in.
        return [{"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long, device=boxes.device),
                 "scores": 1.0 - torch.arange(len(boxes), device=boxes.device) / max(len(boxes), 1)}
                for boxes in boxes_per_image]

    return FitModel("torchvision_rpn", PROPOSALS, trained, loss, predict, {"torchvision": torchvision.__version__})


def shared_datamodule(overrides: list[str], output_dir: Path):
    """The datamodule of ours' config: every model trains and is evaluated on this one."""
    datamodule = build_datamodule(compose_train_config(overrides, output_dir))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule
