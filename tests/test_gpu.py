"""What only a GPU can show: the bf16 step with channels_last, NCCL with one process, the compile
option on CUDA. Marked `gpu`; skipped (with the reason) where torch sees no CUDA device.
`bash scripts/gpu_check.sh` runs them on a GPU machine (`python -m pytest -m gpu`)."""

import socket

import lightning as L
import pytest
import torch

from anchordet.data import SyntheticCocoDataModule
from anchordet.matching import YoloMatcher
from anchordet.models.backbone import ResNetFPN
from anchordet.models.detector import Detector
from anchordet.models.heads.yolo import YoloHead
from anchordet.data.categories import CategoryMap
from anchordet.module import DetectionModule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


def module(**kwargs):
    torch.manual_seed(0)
    shapes = [torch.tensor([[8.0, 8.0]]), torch.tensor([[16.0, 32.0]]), torch.tensor([[40.0, 40.0]])]
    backbone = ResNetFPN(depth=18, levels=("P3", "P4", "P5"))
    head = YoloHead(in_channels=256, num_anchors=1, num_classes=6, num_levels=3)
    detector = Detector(backbone, head, shapes, YoloMatcher())
    return DetectionModule(detector, CategoryMap(range(1, 7), [str(i) for i in range(6)]),
                           optimizer=lambda groups: torch.optim.SGD(groups, lr=0.01), **kwargs)


def fit(tmp_path, pl_module, steps=3):
    data = SyntheticCocoDataModule(tmp_path / "data", num_train=16, num_val=4, canvas_size=96, image_size=96,
                                   batch_size=4, num_workers=2)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(pl_module, datamodule=data)
    return trainer


def test_a_bf16_step_with_channels_last_trains_on_the_gpu(tmp_path):
    pl_module = module()
    trainer = fit(tmp_path, pl_module)
    assert trainer.global_step == 3 and all(torch.isfinite(v) for v in pl_module.last_losses.values())
    weight = pl_module.detector.backbone.body.conv1.weight
    assert weight.is_cuda and weight.is_contiguous(memory_format=torch.channels_last)


def test_nccl_initialises_with_one_process():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        value = torch.ones(4, device="cuda")
        dist.all_reduce(value)
        assert value.tolist() == [1.0] * 4
    finally:
        dist.destroy_process_group()


def test_the_compile_option_trains_on_the_gpu(tmp_path):
    pl_module = module(compile={})
    fit(tmp_path, pl_module, steps=2)
    assert pl_module.detector.backbone._compiled_call_impl is not None
    assert all(torch.isfinite(v) for v in pl_module.last_losses.values())
