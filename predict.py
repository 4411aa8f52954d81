"""Run a trained checkpoint on images: `python predict.py ckpt_path=<run>/checkpoints/last.ckpt source=DIR`.

`anchordet.trained.predict` rebuilds the model from the checkpoint, predicts in batches on the CPU or
a GPU, and writes `predictions.json` (COCO results in each image's original frame, original
category ids and names), `images.json` and overlay pictures into the run folder. Unreadable files
are reported by name and skipped.
"""

import hydra
from omegaconf import DictConfig

from anchordet.trained import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
