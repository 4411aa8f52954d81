"""DetectionModule pieces that stand alone: the learning-rate schedule by hand, the optimiser
partial with its no-decay group, and the compile option."""

import math

import lightning as L
import pytest
import torch

from anchordet.data.categories import CategoryMap
from anchordet.matching import YoloMatcher
from anchordet.models.backbone import ResNetFPN
from anchordet.models.detector import Detector
from anchordet.models.heads.yolo import YoloHead
from anchordet.module import DetectionModule, planned_optimizer_steps, warmup_cosine


def lr_factors(total_steps, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=total_steps, **kwargs)
    factors = []
    for _ in range(total_steps + 1):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_warmup_then_cosine_by_hand():
    f = lr_factors(100, warmup_steps=10, warmup_start_factor=0.1, min_lr_factor=0.2)
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.1 + 0.9 * 0.5) and f[10] == pytest.approx(1.0)
    # Half-way through the cosine part (step 10 + 45): floor + (1 - floor) * (1 + cos(pi/2)) / 2.
    assert f[55] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f[100] == pytest.approx(0.2)
    # A short run caps the warm-up at a third of it.
    assert lr_factors(9, warmup_steps=100, warmup_start_factor=0.0)[3] == pytest.approx(1.0)


@pytest.mark.parametrize("settings", [
    {"max_epochs": 3}, {"max_epochs": 2, "limit_train_batches": 5, "accumulate_grad_batches": 2},
    {"max_steps": 7}, {"max_epochs": 4, "max_steps": 9, "limit_train_batches": 0.5, "accumulate_grad_batches": 3}])
def test_planned_steps_count_as_lightning_does_without_building_the_fit_loops_loader(tmp_path, settings):
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    seen = {}

    class Recorder(BoringModel):
        def configure_optimizers(self):
            seen["ours"] = planned_optimizer_steps(self.trainer)
            # Not built yet: a resumed run can still restore the loader's position into it.
            seen["loader_untouched"] = self.trainer.train_dataloader is None
            seen["lightning"] = self.trainer.estimated_stepping_batches
            return super().configure_optimizers()

    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **settings)
    trainer.fit(Recorder(), datamodule=BoringDataModule())
    assert seen["loader_untouched"] and seen["ours"] == seen["lightning"], seen


def tiny_module(**kwargs):
    torch.manual_seed(0)
    shapes = [torch.tensor([[8.0, 8.0]]), torch.tensor([[16.0, 32.0]]), torch.tensor([[40.0, 40.0]])]
    backbone = ResNetFPN(depth=18, levels=("P3", "P4", "P5"), norm="group", fpn_channels=32)
    head = YoloHead(in_channels=32, num_anchors=1, num_classes=2, num_levels=3, tower_depth=1)
    return DetectionModule(Detector(backbone, head, shapes, YoloMatcher()), CategoryMap([1, 2], ["a", "b"]),
                           channels_last=False, **kwargs)


def test_the_optimizer_partial_gets_a_no_decay_group_for_norms_and_biases():
    module = tiny_module(optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1, weight_decay=0.01))
    optimizer = module.optimizer_factory(module.parameter_groups())
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and not_decayed["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in not_decayed["params"])
    with pytest.raises(ValueError, match="without an optimizer"):
        tiny_module().configure_optimizers()


def test_compile_compiles_backbone_and_head_in_place_and_keeps_checkpoint_keys():
    module = tiny_module(compile={"backend": "eager"})
    keys = set(module.state_dict())
    module.configure_model()
    assert set(module.state_dict()) == keys  # no _orig_mod. prefixes: checkpoints stay loadable
    assert module.detector.backbone._compiled_call_impl is not None
    assert module.detector.head._compiled_call_impl is not None
    images = torch.randn(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([0])}] * 2
    losses = module.detector.loss(images, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and module.detector.head.predictors[0].weight.grad is not None
    module.configure_model()  # Lightning may call it again: compiled once
    with pytest.raises(ValueError, match="evaluation.backend"):
        tiny_module(eval_backend="cocoapi")
