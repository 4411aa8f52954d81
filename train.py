"""Train a detector: `python train.py [group=choice ...] [key=value ...]`.

Hydra composes `conf/train.yaml`; `anchordet.app.train` fits the anchors, builds the detector and
runs the Lightning trainer, and returns the best value of `monitor` for Hydra's sweepers.
"""

import hydra
from omegaconf import DictConfig

from anchordet.app import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
