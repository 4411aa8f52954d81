"""anchordet: anchor-based object detectors on COCO-format data (Lightning + Hydra).

The library never imports Hydra; `train.py` and `evaluate.py` compose configs and instantiate the
classes here with plain arguments.
"""

__version__ = "0.1.0"
