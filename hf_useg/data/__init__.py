"""Data layer: dataset loading, synthetic scenes, five-crops, kNN positives and benchmark converters.

Dataset loading is split by job: `sources` (`load_segmentation_dataset`, the entry point, and the image/label
column names), `readers` (one reader per source format, and split names), `metadata` (the class count, names and
void id a dataset carries) and `labels` (label maps as class-id tensors, label/image size checks).

Example:

```python
>>> from hf_useg.data import make_synthetic_scenes, label_to_tensor, segmentation_metadata
>>> scenes = make_synthetic_scenes(num_images=4, image_size=32, num_classes=3)
>>> label_to_tensor(scenes[0]["label"], num_classes=3).shape
torch.Size([32, 32])
```
"""

from __future__ import annotations

from .converters import (
    ISPRS_COLORS,
    convert_cityscapes27,
    convert_cocostuff27,
    convert_potsdam3,
    load_label_maps,
)
from .crops import CROP_NAMES, expand_five_crops, five_crop, five_crop_boxes
from .detection import (
    CSV_COLUMNS,
    VOC_CLASSES,
    detection_class_names,
    detection_references,
    load_detection_dataset,
)
from .knn import compute_global_descriptors, global_descriptors, nearest_neighbors
from .labels import check_label_sizes, label_to_tensor
from .metadata import segmentation_metadata
from .processing import ProcessedSegmentationDataset, collate_segmentation_batch
from .sources import IMAGE_COLUMN_ALIASES, LABEL_COLUMN_ALIASES, load_segmentation_dataset
from .synthetic import make_synthetic_scenes, save_synthetic_scenes, synthetic_class_names

__all__ = [
    "CROP_NAMES",
    "CSV_COLUMNS",
    "IMAGE_COLUMN_ALIASES",
    "ISPRS_COLORS",
    "LABEL_COLUMN_ALIASES",
    "ProcessedSegmentationDataset",
    "VOC_CLASSES",
    "check_label_sizes",
    "collate_segmentation_batch",
    "compute_global_descriptors",
    "convert_cityscapes27",
    "convert_cocostuff27",
    "convert_potsdam3",
    "detection_class_names",
    "detection_references",
    "expand_five_crops",
    "five_crop",
    "five_crop_boxes",
    "global_descriptors",
    "label_to_tensor",
    "load_detection_dataset",
    "load_label_maps",
    "load_segmentation_dataset",
    "make_synthetic_scenes",
    "nearest_neighbors",
    "save_synthetic_scenes",
    "segmentation_metadata",
    "synthetic_class_names",
]
