"""Every option of every config group composes, and unknown options fail with Hydra's choices."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["data", "backbone", "anchor", "matcher", "head", "optim", "trainer", "callbacks", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def hydra_context():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose(config_name="train", overrides=[f"{group}={option}"])
    assert group in cfg
    if group in ("data", "backbone", "anchor", "matcher", "head"):
        assert "_target_" in cfg[group], f"{group}={option} has no _target_"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose(config_name="train", overrides=[f"experiment={experiment}"])
    assert cfg.trainer.max_epochs >= 1


def test_defaults_are_resnet50_kmeans_yolo_on_synthetic_data():
    cfg = compose(config_name="train")
    assert cfg.backbone.depth == 50
    # k = 3 per level x P3-P5 = 9 (k: null means k_per_level x levels)
    assert cfg.anchor._target_.endswith("KMeansAnchors") and cfg.anchor.k_per_level == 3
    assert list(cfg.backbone.levels) == ["P3", "P4", "P5"]
    assert cfg.head._target_.endswith("YoloHead")
    assert cfg.data._target_.endswith("SyntheticCocoDataModule")


def test_backbone_resnet101_composes():
    assert compose(config_name="train", overrides=["backbone=resnet101"]).backbone.depth == 101


def test_evaluate_config_composes():
    cfg = compose(config_name="evaluate", overrides=["ckpt_path=x.ckpt"])
    assert cfg.ckpt_path == "x.ckpt" and cfg.split == "val"


def test_unknown_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as error:
        compose(config_name="train", overrides=["backbone=resnet5"])
    message = str(error.value)
    assert "resnet5" in message and "resnet50" in message and "resnet101" in message
