"""Tests for anchordet.models.backbone.ResNetFPN (ResNet body + torchvision FPN)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from anchordet.models.backbone import ResNetFPN, resolve_weights


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# FPN over C2..C5 = (256, 512, 1024, 2048) -> 256, worked out by hand:
#   lateral 1x1 convs: (256 + 512 + 1024 + 2048) * 256 + 4 * 256 = 984,064
#   output 3x3 convs:  4 * (256 * 256 * 9 + 256)                 = 2,360,320
# ResNet-50 body without fc: 25,557,032 - (2048 * 1000 + 1000) = 23,508,032
# ResNet-101 body without fc: 44,549,160 - 2,049,000 = 42,500,160
FPN_C2_C5_PARAMS = 984_064 + 2_360_320


def test_resnet50_fpn_trainable_parameter_count():
    model = ResNetFPN(depth=50, levels=("P2", "P3", "P4", "P5", "P6"), norm="batch")
    assert count_trainable(model.fpn) == FPN_C2_C5_PARAMS == 3_344_384
    assert count_trainable(model) == 26_852_416


def test_resnet101_fpn_trainable_parameter_count():
    model = ResNetFPN(depth=101, levels=("P2", "P3", "P4", "P5", "P6"), norm="batch")
    assert count_trainable(model) == 42_500_160 + FPN_C2_C5_PARAMS == 45_844_544


def test_p3_to_p5_shapes_and_strides_at_256():
    model = ResNetFPN(depth=18, fpn_channels=32).eval()
    assert model.level_names == ["P3", "P4", "P5"]
    assert model.strides == [8, 16, 32]
    assert model.out_channels == 32
    # FPN over C3..C5 of ResNet-18: 128, 256, 512 input channels.
    assert [block[0].in_channels for block in model.fpn.inner_blocks] == [128, 256, 512]
    with torch.no_grad():
        features = model(torch.randn(2, 3, 256, 256))
    assert [tuple(f.shape) for f in features] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8)]


def test_p2_to_p6_shapes_and_strides():
    model = ResNetFPN(depth=18, levels=("P2", "P3", "P4", "P5", "P6"), fpn_channels=16).eval()
    assert model.strides == [4, 8, 16, 32, 64]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 256, 192))
    assert [tuple(f.shape) for f in features] == [
        (1, 16, 64, 48), (1, 16, 32, 24), (1, 16, 16, 12), (1, 16, 8, 6), (1, 16, 4, 3)
    ]
    # P6 is a kernel-1 stride-2 max-pool of P5: every other pixel of P5.
    torch.testing.assert_close(features[4], features[3][:, :, ::2, ::2])


def test_single_coarse_level_and_p6_only():
    model = ResNetFPN(depth=18, levels=("P6",), fpn_channels=8).eval()
    assert model.strides == [64]
    assert len(model.fpn.inner_blocks) == 1  # only C5 feeds the FPN
    with torch.no_grad():
        (p6,) = model(torch.randn(1, 3, 128, 128))
    assert p6.shape == (1, 8, 2, 2)


def test_body_stage_hooks_fire_with_stage_shapes():
    model = ResNetFPN(depth=18, fpn_channels=8).eval()
    assert set(model.body_stages) == {"C2", "C3", "C4", "C5"}
    assert model.body_stages["C4"] is model.body.layer3
    seen = {}
    for name, stage in model.body_stages.items():
        stage.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == {
        "C2": (1, 64, 16, 16), "C3": (1, 128, 8, 8), "C4": (1, 256, 4, 4), "C5": (1, 512, 2, 2)
    }


@pytest.mark.parametrize(
    "frozen_stages, frozen_prefixes",
    [
        (0, []),
        (1, ["conv1", "bn1"]),
        (2, ["conv1", "bn1", "layer1"]),
        (5, ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]),
    ],
)
def test_frozen_stages_freeze_stem_then_layers(frozen_stages, frozen_prefixes):
    model = ResNetFPN(depth=18, frozen_stages=frozen_stages, fpn_channels=8)
    for name, parameter in model.body.named_parameters():
        expected_frozen = name.split(".")[0] in frozen_prefixes
        assert parameter.requires_grad is not expected_frozen, name
    assert all(p.requires_grad for p in model.fpn.parameters())


def test_frozen_stage_batchnorm_statistics_do_not_drift_in_train_mode():
    model = ResNetFPN(depth=18, frozen_stages=2, fpn_channels=8).train()
    assert not model.body.bn1.training and not model.body.layer1.training
    assert model.body.layer2.training and model.fpn.training
    before_frozen = model.body.layer1[0].bn1.running_mean.clone()
    before_free = model.body.layer2[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64) * 3 + 1)
    torch.testing.assert_close(model.body.layer1[0].bn1.running_mean, before_frozen)
    assert not torch.equal(model.body.layer2[0].bn1.running_mean, before_free)


@pytest.mark.parametrize(
    "norm, layer_type", [("batch", nn.BatchNorm2d), ("frozen_batch", FrozenBatchNorm2d), ("group", nn.GroupNorm)]
)
def test_norm_option_sets_every_body_norm_layer(norm, layer_type):
    model = ResNetFPN(depth=18, norm=norm, fpn_channels=8)
    norm_types = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm)
    norms = [m for m in model.body.modules() if isinstance(m, norm_types)]
    # stem bn1 + 8 BasicBlocks * 2 + 3 downsample norms
    assert len(norms) == 1 + 16 + 3
    assert all(type(m) is layer_type for m in norms)
    if norm == "group":
        assert all(m.num_groups == 32 for m in norms)
    if norm == "frozen_batch":
        assert count_trainable(model.body) == sum(
            m.weight.numel() for m in model.body.modules() if isinstance(m, nn.Conv2d)
        )


@pytest.mark.parametrize("norm", ["batch", "frozen_batch"])
def test_local_weights_file_round_trip(tmp_path, norm):
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = ResNetFPN(depth=18, weights=str(path), norm=norm, fpn_channels=8)
    torch.testing.assert_close(model.body.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    torch.testing.assert_close(model.body.bn1.running_mean, source.bn1.running_mean)


def test_weights_file_fc_keys_are_ignored(tmp_path):
    # A classifier fine-tuned on 10 classes, and one saved without its fc: both load.
    ten_class = torchvision.models.resnet18(num_classes=10)
    torch.save(ten_class.state_dict(), tmp_path / "ten.pth")
    model = ResNetFPN(depth=18, weights=str(tmp_path / "ten.pth"), fpn_channels=8)
    torch.testing.assert_close(model.body.layer4[1].conv1.weight, ten_class.layer4[1].conv1.weight)
    headless = {k: v for k, v in ten_class.state_dict().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    ResNetFPN(depth=18, weights=str(tmp_path / "headless.pth"), fpn_channels=8)


def test_weights_file_of_wrong_depth_names_file_and_keys(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"backbone.weights.*r18\.pth"):
        ResNetFPN(depth=34, weights=str(path))


def test_weights_file_with_extra_keys_is_rejected(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer5.conv.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['layer5.conv.weight'\]"):
        ResNetFPN(depth=18, weights=str(path))


def test_missing_weights_file_names_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"backbone.weights.*nope\.pth"):
        ResNetFPN(depth=18, weights=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("name", ["IMAGENET9K_V7", "ResNet50_Weights.IMAGENET1K_V1"])
def test_bad_weight_name_names_config_key(name):
    with pytest.raises(ValueError, match="backbone.weights"):
        ResNetFPN(depth=18, weights=name)


def test_weight_names_resolve_to_torchvision_enums():
    weights_enum = torchvision.models.ResNet50_Weights
    assert resolve_weights("ResNet50_Weights.IMAGENET1K_V1", 50) is weights_enum.IMAGENET1K_V1
    assert resolve_weights("IMAGENET1K_V2", 50) is weights_enum.IMAGENET1K_V2
    assert resolve_weights("DEFAULT", 101) is torchvision.models.ResNet101_Weights.DEFAULT


def test_weight_name_loads_enum_state_dict_without_download(monkeypatch):
    source = torchvision.models.resnet18()
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return source.state_dict()

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fake_get_state_dict)
    model = ResNetFPN(depth=18, weights="IMAGENET1K_V1", fpn_channels=8)
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    torch.testing.assert_close(model.body.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize(
    "kwargs, config_key",
    [
        ({"depth": 152}, "backbone.depth"),
        ({"levels": ("P3", "P7")}, "backbone.levels"),
        ({"levels": ()}, "backbone.levels"),
        ({"levels": ("P4", "P3")}, "backbone.levels"),
        ({"norm": "layer"}, "backbone.norm"),
        ({"frozen_stages": 6}, "backbone.frozen_stages"),
    ],
)
def test_bad_arguments_name_the_config_key(kwargs, config_key):
    with pytest.raises(ValueError, match=config_key.replace(".", r"\.")):
        ResNetFPN(**{"depth": 18, **kwargs})
