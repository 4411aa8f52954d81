"""The config tree: every option of every group composes and instantiates; every head x matcher x
anchor combination trains a step or refuses with a message naming the keys in conflict; the keys
people type override without `+`; unknown options fail with Hydra's list of choices."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anchordet import app
from anchordet.matching import MatchResult
from anchordet.models.backbone import ResNetFPN
from anchordet.models.heads.common import TASKS
from anchordet.module import DetectionModule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_train(root: Path, *overrides: str):
    """The training config with its run folders under `root` (no Hydra runtime to resolve them)."""
    return compose(config_name="train", overrides=[f"paths.root_dir={root}", f"paths.output_dir={root / 'run'}",
                                                   *overrides])


def random_box_sizes(count: int = 300) -> torch.Tensor:
    return 8 + 120 * torch.rand(count, 2, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ every option, instantiated
def check_data(cfg, tmp_path):
    datamodule = instantiate(cfg.data)  # lazy: nothing is read or generated yet
    assert isinstance(datamodule, L.LightningDataModule) and datamodule.batch_size == cfg.data.batch_size


def check_backbone(cfg, tmp_path):
    backbone = instantiate(cfg.backbone)
    assert isinstance(backbone, ResNetFPN) and backbone.level_names == list(cfg.backbone.levels)
    assert backbone.feature_sizes(64, 64)[0] == (64 // backbone.strides[0],) * 2


def check_anchor(cfg, tmp_path):
    builder = instantiate(cfg.anchor)
    num_levels = len(cfg.backbone.levels)
    shapes, report = builder.build(random_box_sizes(), num_levels=num_levels)
    assert len(shapes) == num_levels and isinstance(report, dict) and 0.0 <= builder.offset <= 1.0


def check_matcher(cfg, tmp_path):
    matcher = instantiate(cfg.matcher)
    assert callable(matcher) and hasattr(matcher, "foreground_iou")


def check_head(cfg, tmp_path):
    levels = len(cfg.backbone.levels)
    head = instantiate(cfg.head)(in_channels=32, num_anchors=3, num_classes=2, num_levels=levels)
    assert isinstance(head, torch.nn.Module) and head.task in TASKS


def check_optim(cfg, tmp_path):
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = instantiate(cfg.optim.optimizer)([{"params": parameters}])
    scheduler = instantiate(cfg.optim.scheduler)(optimizer, total_steps=10)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


def check_trainer(cfg, tmp_path):
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("trainer=gpu needs a GPU to instantiate (composition is checked above)")
    trainer = instantiate(OmegaConf.merge(cfg.trainer, {"precision": app.resolve_precision(cfg.trainer)}),
                          logger=False, enable_checkpointing=False)
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == cfg.trainer.max_epochs


def check_callbacks(cfg, tmp_path):
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    assert all(isinstance(c, L.Callback) for c in callbacks)


def check_logger(cfg, tmp_path):
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    assert all(hasattr(logger, "log_metrics") for logger in loggers)


CHECKS = {"data": check_data, "backbone": check_backbone, "anchor": check_anchor, "matcher": check_matcher,
          "head": check_head, "optim": check_optim, "trainer": check_trainer, "callbacks": check_callbacks,
          "logger": check_logger}


@pytest.mark.parametrize("group,option", [(g, o) for g in CHECKS for o in options(g)])
def test_every_option_composes_and_instantiates(hydra_context, tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if group == "anchor" and option == "rpn_grid":
        overrides.append("backbone/levels=p2_p6")  # its sizes are for five levels
    CHECKS[group](compose_train(tmp_path, *overrides), tmp_path)


@pytest.mark.parametrize("group", ["experiment", "debug", "metric"])
def test_every_preset_composes(hydra_context, tmp_path, group):
    for option in options(group):
        cfg = compose_train(tmp_path, f"{group}={option}")
        assert cfg.trainer.max_epochs >= 1 and cfg.monitor.startswith("val/")


@pytest.mark.parametrize("data", options("data"))
@pytest.mark.parametrize("preset", [f"experiment={o}" for o in options("experiment")] + [f"debug={o}" for o in options("debug")])
def test_presets_compose_with_every_data_choice(hydra_context, tmp_path, preset, data):
    cfg = compose_train(tmp_path, preset, f"data={data}")
    datamodule = instantiate(cfg.data)  # no preset key the chosen data module does not take
    assert isinstance(datamodule, L.LightningDataModule)


# ------------------------------------------------------------------ head x matcher x anchor
# The levels an anchor config is written for, where it is fixed: a head that uses other levels refuses.
ANCHOR_LEVELS = {"grid": 3, "rpn_grid": 5}
HEAD_LEVELS = {"yolo": 3, "rpn": 5}


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One folder for the tiny synthetic set and the k-means caches of every combination."""
    return tmp_path_factory.mktemp("combinations")


@pytest.mark.parametrize("anchor", options("anchor"))
@pytest.mark.parametrize("matcher", options("matcher"))
@pytest.mark.parametrize("head", options("head"))
def test_every_head_matcher_anchor_combination_trains_a_step_or_refuses(hydra_context, shared_root,
                                                                         head, matcher, anchor):
    cfg = compose_train(shared_root, "experiment=tiny", f"head={head}", f"matcher={matcher}", f"anchor={anchor}")
    datamodule = instantiate(cfg.data)
    if ANCHOR_LEVELS.get(anchor, HEAD_LEVELS[head]) != HEAD_LEVELS[head]:
        with pytest.raises(ValueError, match=rf"anchor\.sizes_per_level has {ANCHOR_LEVELS[anchor]} levels but "
                                             rf"backbone\.levels has {HEAD_LEVELS[head]}.*anchor=kmeans"):
            app.fit_anchors(cfg, datamodule)
        return
    shapes, report, offset = app.fit_anchors(cfg, datamodule)
    torch.manual_seed(0)
    detector = app.build_detector(cfg, shapes, datamodule.num_classes, offset)
    app.check_monitor(cfg.monitor, detector.head.task)
    module = DetectionModule(detector, datamodule.category_map, optimizer=instantiate(cfg.optim.optimizer),
                             scheduler=instantiate(cfg.optim.scheduler), channels_last=False)
    optimizer = module.optimizer_factory(module.parameter_groups())
    images, targets = module.on_after_batch_transfer(next(iter(datamodule.train_dataloader())))
    match = detector.match_targets(targets, tuple(images.shape[-2:]))[2]
    assert isinstance(match, MatchResult) and match.positive.any(), "the matcher assigned no anchor"
    assert torch.equal(match.matched_gt >= 0, match.positive)

    before = [p.detach().clone() for p in detector.head.parameters()]
    losses = detector.loss(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box"] > 0
    losses["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, detector.head.parameters()))


def test_a_monitor_the_head_does_not_log_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"monitor=val/mAP: .*proposals.*val/AR@1000"):
        app.check_monitor("val/mAP", "proposals")
    app.check_monitor("val/AR@100", "proposals")
    app.check_monitor("val/mAP_50", "detections")


# ------------------------------------------------------------------ the tree itself
def test_defaults_are_resnet50_kmeans_yolo_on_synthetic_data(hydra_context, tmp_path):
    cfg = compose_train(tmp_path)
    assert cfg.backbone.depth == 50 and list(cfg.backbone.levels) == ["P3", "P4", "P5"]
    # k = 3 per level x P3-P5 = 9 (k: null means k_per_level x levels)
    assert cfg.anchor._target_.endswith("KMeansAnchors") and cfg.anchor.k_per_level == 3
    assert cfg.head._target_.endswith("YoloHead") and cfg.matcher._target_.endswith("YoloMatcher")
    assert cfg.data._target_.endswith("SyntheticCocoDataModule") and cfg.monitor == "val/mAP"
    assert cfg.optim.optimizer._target_ == "torch.optim.SGD" and cfg.optim.optimizer._partial_


def test_backbones_take_resnet50_and_change_only_the_depth(hydra_context, tmp_path):
    base = OmegaConf.to_container(compose_train(tmp_path).backbone)
    for depth in (18, 34, 101):
        other = OmegaConf.to_container(compose_train(tmp_path, f"backbone=resnet{depth}").backbone)
        assert other == {**base, "depth": depth}


def test_any_torch_optimizer_plugs_in_without_code(hydra_context, tmp_path):
    cfg = compose_train(tmp_path, "optim=adamw", "optim.optimizer._target_=torch.optim.RAdam")
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is torch.optim.RAdam and optimizer.defaults["lr"] == cfg.optim.optimizer.lr


def test_trainer_keys_people_type_override_without_plus(hydra_context, tmp_path):
    keys = {"fast_dev_run": True, "limit_train_batches": 3, "limit_val_batches": 2, "accumulate_grad_batches": 4,
            "val_check_interval": 0.5, "overfit_batches": 2, "num_sanity_val_steps": 0}
    cfg = compose_train(tmp_path, *(f"trainer.{k}={v}" for k, v in keys.items()))
    assert {k: cfg.trainer[k] for k in keys} == keys
    assert compose_train(tmp_path, "debug=fdr").trainer.fast_dev_run is True
    assert compose_train(tmp_path, "debug=overfit").trainer.overfit_batches == 3
    assert compose_train(tmp_path, "debug=limit").trainer.limit_train_batches == 0.05


def test_anchor_offset_lives_in_the_anchor_group(hydra_context, tmp_path):
    assert "anchor_offset" not in compose_train(tmp_path)
    for option in options("anchor"):
        assert compose_train(tmp_path, f"anchor={option}").anchor.offset == 0.5
    assert compose_train(tmp_path, "anchor.offset=0").anchor.offset == 0


def test_evaluate_config_composes(hydra_context):
    cfg = compose(config_name="evaluate", overrides=["ckpt_path=x.ckpt"])
    assert cfg.ckpt_path == "x.ckpt" and cfg.split == "val"


def test_unknown_option_lists_the_choices(hydra_context):
    with pytest.raises(MissingConfigException) as error:
        compose(config_name="train", overrides=["backbone=resnet5"])
    message = str(error.value)
    assert "resnet5" in message and "resnet50" in message and "resnet101" in message


@pytest.mark.parametrize("devices", [1, 2])
def test_ddp_on_the_cpu_drops_sync_batchnorm_which_needs_cuda(hydra_context, tmp_path, monkeypatch, devices):
    # One rank too: DDP wraps the model even then, and SyncBatchNorm refuses CPU modules.
    monkeypatch.setattr(app, "rerun_ranks_in_this_job", lambda: None)  # no Hydra runtime here
    cfg = compose_train(tmp_path, "trainer=ddp", f"trainer.devices={devices}", "trainer.accelerator=cpu")
    assert cfg.trainer.sync_batchnorm is True
    assert app.prepare_ddp(cfg).sync_batchnorm is False
