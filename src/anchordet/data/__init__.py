"""COCO-format data: validated dataset, transforms, synthetic generator and LightningDataModules.

Boxes leave this package as ``float32 [N, 4]`` xyxy pixels of the ``S x S`` network input; labels
are contiguous ``0..C-1`` through `CategoryMap`, the only place that knows COCO category ids.
"""

from anchordet.data.categories import CategoryMap
from anchordet.data.coco import CocoDetectionDataset, DatasetError
from anchordet.data.datamodule import CocoDataModule, SyntheticCocoDataModule, collate
from anchordet.data.synthetic import generate_synthetic_coco
from anchordet.data.transforms import to_original_frame

__all__ = [
    "CategoryMap",
    "CocoDataModule",
    "CocoDetectionDataset",
    "DatasetError",
    "SyntheticCocoDataModule",
    "collate",
    "generate_synthetic_coco",
    "to_original_frame",
]
