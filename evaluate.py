"""Evaluate a trained checkpoint: `python evaluate.py ckpt_path=outputs/runs/.../checkpoints/last.ckpt`.

`anchordet.trained.evaluate` rebuilds the model from the config, anchors and class mapping stored in the
checkpoint (no training override needs retyping), writes `detections.json` (or `proposals.json` for
an RPN) and `metrics.json`, and prints pycocotools' summary and a per-class AP table.
"""

import hydra
from omegaconf import DictConfig

from anchordet.trained import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
