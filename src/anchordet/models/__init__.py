"""Networks: the ResNet + FPN backbone, the heads, and the Detector that ties them to the anchors."""

from anchordet.models.backbone import ResNetFPN
from anchordet.models.detector import Detector
from anchordet.models.heads import YoloHead

__all__ = ["ResNetFPN", "Detector", "YoloHead"]
