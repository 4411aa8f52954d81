"""Export a trained checkpoint: `python export.py ckpt_path=<run>/checkpoints/last.ckpt format=onnx`.

`anchordet.trained.export` rebuilds the model from the checkpoint and writes an ONNX or TorchScript
file that maps a pixel batch to boxes, scores and labels (decoding and NMS inside), a JSON sidecar
beside it, and checks the written file against PyTorch on a test batch.
"""

import hydra
from omegaconf import DictConfig

from anchordet.trained import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
