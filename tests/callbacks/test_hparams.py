"""The HParams-tab session: flattening a run config into scalar settings, hand-checked."""

import math

import torch

from anchordet.hparams import final_metrics, flatten_hyperparameters


def test_flatten_keeps_settings_and_choices_and_drops_plumbing():
    config = {
        "seed": 3, "monitor": "val/mAP", "ckpt_path": None, "paths": {"output_dir": "/x"},
        "callbacks": {"lr_monitor": {"_target_": "L.LearningRateMonitor"}}, "logger": {"tb": {}},
        "optim": {"lr": 0.01, "nesterov": False},
        "backbone": {"_target_": "Backbone", "levels": ["P3", "P4"], "weights": None},
        "head": {"_target_": "YoloHead", "_partial_": True, "box_weight": 5.0},
    }
    choices = {"backbone": "resnet18", "head": "yolo", "hydra/launcher": "basic", "paths": "default",
               "experiment": None}
    assert flatten_hyperparameters(config, choices) == {
        "seed": 3, "monitor": "val/mAP", "optim.lr": 0.01, "optim.nesterov": False,
        "backbone.levels": "['P3', 'P4']", "backbone.weights": "null", "head.box_weight": 5.0,
        "choice/backbone": "resnet18", "choice/head": "yolo", "choice/experiment": "null",
    }


def test_final_metrics_take_the_val_metrics_and_the_best_value():
    metrics = final_metrics(0.25, {"val/mAP": torch.tensor(0.2), "train/loss": torch.tensor(3.0),
                                   "val/AR@100": torch.tensor(0.5)})
    assert metrics == {"hp/best": 0.25, "hp/mAP": torch.tensor(0.2).item(), "hp/AR@100": 0.5}
    assert math.isnan(final_metrics(None, {})["hp/best"])
