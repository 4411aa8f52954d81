"""ResNet body + feature pyramid network (FPN): the shared backbone of every detector here.

Shape glossary
    B       images in the batch
    H, W    network input size in pixels
    Cs      channels of ResNet stage ``Cs`` (C2..C5): 64/128/256/512 for ResNet-18/34,
            256/512/1024/2048 for ResNet-50/101
    F       ``fpn_channels``, the channel count of every pyramid level
    Hl, Wl  size of pyramid level ``Pl``: ceil(H / stride_l), ceil(W / stride_l), stride_l = 2**l
            (``feature_sizes`` computes them without a forward pass)

Pyramid levels (Lin et al., "Feature Pyramid Networks for Object Detection", 2017): ``Pl`` is
built from ResNet stage ``Cl`` (``layer{l-1}`` in torchvision) by a 1x1 lateral conv plus the
upsampled coarser level, then a 3x3 conv. ``P6`` is a stride-2 max-pool (kernel 1) of ``P5``, as
in the Faster R-CNN FPN RPN; there is no P7. The FPN is built over ``C{finest}``..``C5`` whatever
the requested levels, because the top-down pathway needs every coarser stage.

Trainable parameter counts (levels P2..P6, norm="batch", frozen_stages=0, F=256; BatchNorm
weight and bias count, running statistics are buffers):
    ResNet-50  + FPN: 23,508,032 + 3,344,384 = 26,852,416
    ResNet-101 + FPN: 42,500,160 + 3,344,384 = 45,844,544
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

SUPPORTED_DEPTHS = (18, 34, 50, 101)
LEVEL_STRIDES = {"P2": 4, "P3": 8, "P4": 16, "P5": 32, "P6": 64}
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "frozen_batch": FrozenBatchNorm2d,
    # 32 groups as in Wu & He, "Group Normalization", 2018; every ResNet width is a multiple of 32.
    "group": lambda num_channels: nn.GroupNorm(32, num_channels),
}
# Stage name -> torchvision ResNet attribute; C1 is the stem (conv1 + bn1), which has no FPN level.
STAGE_MODULES = {"C2": "layer1", "C3": "layer2", "C4": "layer3", "C5": "layer4"}
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def resolve_weights(weights: str, depth: int) -> torchvision.models.WeightsEnum | Path:
    """Turn the ``backbone.weights`` config value into a torchvision weight enum or a local file.

    Accepted: ``"ResNet50_Weights.IMAGENET1K_V1"``, a bare member name such as ``"IMAGENET1K_V1"``
    or ``"DEFAULT"`` (looked up in ``ResNet{depth}_Weights``), or a path to a ``.pth`` state dict.
    """
    enum_class = getattr(torchvision.models, f"ResNet{depth}_Weights")
    looks_like_path = (
        "/" in weights or "\\" in weights or weights.endswith(WEIGHT_FILE_SUFFIXES)
    )
    if looks_like_path or Path(weights).is_file():
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone.weights: weight file {str(path)!r} does not exist; give an existing "
                f"ResNet-{depth} state-dict file, a torchvision weight name such as "
                f"'{enum_class.__name__}.IMAGENET1K_V1', or null for random init"
            )
        return path
    enum_name, _, member = weights.rpartition(".")
    if enum_name and enum_name != enum_class.__name__:
        raise ValueError(
            f"backbone.weights={weights!r} belongs to {enum_name}, but backbone.depth={depth} "
            f"needs {enum_class.__name__}"
        )
    if member not in enum_class.__members__:
        raise ValueError(
            f"backbone.weights={weights!r} is not a torchvision weight name nor a file; "
            f"choose one of {[f'{enum_class.__name__}.{m}' for m in enum_class.__members__]}, "
            f"a path to a .pth state dict, or null"
        )
    return enum_class[member]


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a ResNet state dict saved with ``torch.save(model.state_dict(), path)``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not a state dict"
        raise ValueError(
            f"backbone.weights: could not read {str(path)!r} as a state dict ({error})"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"backbone.weights: {str(path)!r} is not a flat state dict of tensors; save it with "
            f"torch.save(resnet.state_dict(), path)"
        )
    return state


def load_resnet_weights(resnet: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``resnet`` with strict checking of every key except the ``fc.*`` head."""
    body_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = resnet.load_state_dict(body_state, strict=False)
    except RuntimeError as error:  # shape mismatches, e.g. ResNet-18 weights into ResNet-50
        raise ValueError(f"backbone.weights: {source} does not fit this ResNet: {error}") from error
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"backbone.weights: {source} does not match the ResNet body (check backbone.depth and "
            f"backbone.norm); missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {result.unexpected_keys[:10]}"
            f"{' ...' if len(result.unexpected_keys) > 10 else ''}"
        )


class ResNetFPN(nn.Module):
    """torchvision ResNet-{18,34,50,101} body with a ``torchvision.ops.FeaturePyramidNetwork``.

    Args:
        depth: ResNet depth, one of 18, 34, 50, 101.
        levels: pyramid levels to return, fine to coarse, a subset of P2..P6.
        weights: None (random init), a torchvision weight name (downloads in real use), or a path
            to a local ``.pth`` ResNet state dict (``fc.*`` keys ignored).
        frozen_stages: Detectron2's FREEZE_AT convention. 0 freezes nothing, 1 freezes the stem
            (conv1 + bn1), k freezes the stem and ``layer1``..``layer{k-1}`` (C2..C{k}); max 5.
            Frozen parameters get ``requires_grad=False`` and frozen modules stay in eval mode, so
            their BatchNorm running statistics do not drift either.
        norm: "batch" (trainable BatchNorm2d), "frozen_batch" (FrozenBatchNorm2d: fixed affine and
            statistics, the usual choice for small detection batches) or "group" (GroupNorm, 32
            groups). Applies to the ResNet body; the FPN has no normalisation.
        fpn_channels: F, channels of every pyramid level.

    ``forward(x float[B, 3, H, W]) -> list[Tensor[B, F, Hl, Wl]]``, one per entry of ``levels``.
    """

    def __init__(
        self,
        depth: int = 50,
        levels: Sequence[str] = ("P3", "P4", "P5"),
        weights: str | None = None,
        frozen_stages: int = 0,
        norm: str = "batch",
        fpn_channels: int = 256,
    ) -> None:
        super().__init__()
        if depth not in SUPPORTED_DEPTHS:
            raise ValueError(f"backbone.depth={depth} is not supported; use one of {SUPPORTED_DEPTHS}")
        levels = list(levels)
        unknown = [name for name in levels if name not in LEVEL_STRIDES]
        if not levels or unknown:
            raise ValueError(
                f"backbone.levels={levels} has unknown levels {unknown}; use a non-empty subset of "
                f"{list(LEVEL_STRIDES)}"
            )
        ranks = [list(LEVEL_STRIDES).index(name) for name in levels]
        if ranks != sorted(set(ranks)):
            # Anchors and predictions are flattened level-major from fine to coarse.
            raise ValueError(f"backbone.levels={levels} must be distinct and ordered fine to coarse")
        if norm not in NORM_LAYERS:
            raise ValueError(f"backbone.norm={norm!r} is not supported; use one of {list(NORM_LAYERS)}")
        if not 0 <= frozen_stages <= 5:
            raise ValueError(
                f"backbone.frozen_stages={frozen_stages} is out of range; use 0 (nothing) to 5 "
                f"(stem and all four stages)"
            )

        resnet = getattr(torchvision.models, f"resnet{depth}")(
            weights=None, norm_layer=NORM_LAYERS[norm]
        )
        if weights is not None:
            resolved = resolve_weights(str(weights), depth)
            if isinstance(resolved, Path):
                load_resnet_weights(resnet, load_state_dict_file(resolved), f"file {str(resolved)!r}")
            else:
                load_resnet_weights(resnet, resolved.get_state_dict(progress=True), str(resolved))

        # The FPN runs over C{finest}..C5; P6 is pooled from P5, so it needs only C5.
        finest_stage = min(min(LEVEL_STRIDES[name] for name in levels), 32).bit_length() - 1
        fpn_stages = [f"C{s}" for s in range(finest_stage, 6)]
        expansion = resnet.layer1[0].expansion  # 1 for BasicBlock (18/34), 4 for Bottleneck
        stage_channels = {f"C{s}": 64 * 2 ** (s - 2) * expansion for s in range(2, 6)}

        # IntermediateLayerGetter calls layer1..layer4 as modules (unlike an FX-traced extractor),
        # so forward hooks registered on body_stages fire.
        self.body = IntermediateLayerGetter(
            resnet, return_layers={STAGE_MODULES[stage]: stage for stage in fpn_stages}
        )
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=[stage_channels[stage] for stage in fpn_stages],
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool() if "P6" in levels else None,
        )
        self.body_stages: dict[str, nn.Module] = {
            stage: getattr(self.body, module_name) for stage, module_name in STAGE_MODULES.items()
        }
        self.level_names: list[str] = levels
        self.strides: list[int] = [LEVEL_STRIDES[name] for name in levels]
        self.out_channels: int = fpn_channels
        self.frozen_stages = frozen_stages
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        stem = [self.body.conv1, self.body.bn1] if self.frozen_stages >= 1 else []
        return stem + [self.body_stages[f"C{s}"] for s in range(2, self.frozen_stages + 1)]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetFPN:
        super().train(mode)
        # Keep frozen stages in eval so BatchNorm running statistics stay those of the weights.
        for module in self._frozen_modules():
            module.eval()
        return self

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(Hl, Wl) of every returned level for an ``height x width`` input, without running it.

        Every stride-2 step here (the 7x7 stem conv with padding 3, the 3x3 max-pool with padding 1,
        the first conv of layer2-4, P6's kernel-1 max-pool) maps a side n to floor((n - 1) / 2) + 1
        = ceil(n / 2), and ceil(ceil(n / a) / b) = ceil(n / (a b)), so level l has ceil(n / stride_l).
        This is the one place the geometry is known: the detector places anchors from it.
        """
        return [(-(-int(height) // stride), -(-int(width) // stride)) for stride in self.strides]

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: float[B, 3, H, W], already normalised -> list of float[B, F, Hl, Wl] per level."""
        stages: OrderedDict[str, Tensor] = self.body(x)  # "C{s}" -> [B, Cs, H/2**s, W/2**s]
        pyramid = self.fpn(stages)  # same keys, F channels, plus "pool" (P6) when requested
        by_level = {f"P{name[1:]}": feature for name, feature in pyramid.items() if name != "pool"}
        if "pool" in pyramid:
            by_level["P6"] = pyramid["pool"]
        return [by_level[name] for name in self.level_names]
