"""Detection heads: raw outputs per level, their loss against matched targets, and postprocessing."""

from anchordet.models.heads.rpn import RpnHead
from anchordet.models.heads.yolo import YoloHead

__all__ = ["RpnHead", "YoloHead"]
