"""Turn a `datasets.Dataset` with ``image`` (+ ``label``) columns into model-ready torch samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

__all__ = ["ProcessedSegmentationDataset", "collate_segmentation_batch"]


class ProcessedSegmentationDataset(TorchDataset):
    """Applies an image processor to each item of a `datasets.Dataset` (lazily, in the DataLoader workers).

    Each item is ``{"pixel_values": [3, H, W] float, "labels": [H, W] long (or absent), "index": int}``. Label
    values outside ``[0, num_classes)`` become ``ignore_index`` (-1), so every loss and the metric skip them.

    Example:

    ```python
    >>> from hf_useg.data import make_synthetic_scenes
    >>> from hf_useg import UnsupervisedSegmentationImageProcessor
    >>> processor = UnsupervisedSegmentationImageProcessor(
    ...     size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ... )
    >>> items = ProcessedSegmentationDataset(make_synthetic_scenes(4, 64, 3), processor, num_classes=3)
    >>> items[0]["pixel_values"].shape, items[0]["labels"].shape
    (torch.Size([3, 32, 32]), torch.Size([32, 32]))
    ```
    """

    def __init__(
        self,
        dataset,
        image_processor: Callable,
        num_classes: int | None = None,
        with_labels: bool | None = None,
        ignore_index: int = -1,
    ):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: nothing to segment")
        self.dataset = dataset
        self.image_processor = image_processor
        self.num_classes = num_classes
        # lazily transformed datasets (e.g. five crops) only show their columns on access
        has_labels = "label" in dataset.column_names or "label" in dataset[0]
        if with_labels and not has_labels:
            raise ValueError(f"the dataset has no 'label' column (columns: {dataset.column_names})")
        self.with_labels = has_labels if with_labels is None else with_labels
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        try:
            return self._process(int(index))
        except (OSError, SyntaxError, ValueError) as error:  # unreadable files, PIL's and the processor's errors
            raise ValueError(f"{error} ({self.describe_item(int(index))})") from error

    def describe_item(self, index: int) -> str:
        """``item <index>`` and, when the dataset stores them, the image (and label) file names: for messages."""
        where = f"item {index}"
        try:
            import datasets

            columns = [name for name in ("image", "label", "file_name") if name in self.dataset.column_names]
            raw = self.dataset.select_columns(columns).select([index]).with_format(None)
            for name in ("image", "label"):
                if name in columns:
                    raw = raw.cast_column(name, datasets.Image(decode=False))
            row = raw[0]
            files = [row[name].get("path") for name in ("image", "label") if name in row and row[name]]
            files = [str(file) for file in files if file]
            if not files and row.get("file_name"):
                files = [str(row["file_name"])]
        except Exception:  # a lazily transformed dataset (e.g. five crops) has no raw files to name
            return where
        return f"{where}: {', '.join(files)}" if files else where

    def _process(self, index: int) -> dict[str, torch.Tensor | int]:
        example = self.dataset[index]
        label = example.get("label") if self.with_labels else None
        if label is not None:
            image_size, label_size = _size(example["image"]), _size(label)
            if image_size != label_size:
                raise ValueError(
                    f"the label map is {label_size[1]}x{label_size[0]} (WxH) but its image is "
                    f"{image_size[1]}x{image_size[0]}; labels must have the image's size"
                )
        if label is not None:
            encoded = self.image_processor(example["image"], segmentation_maps=label, return_tensors="pt")
        else:
            encoded = self.image_processor(example["image"], return_tensors="pt")
        item: dict[str, torch.Tensor | int] = {
            "pixel_values": encoded["pixel_values"][0],
            "index": index,
        }
        if label is not None:
            labels = encoded["labels"][0].long()
            invalid = labels < 0
            if self.num_classes is not None:
                invalid |= labels >= self.num_classes
            item["labels"] = labels.masked_fill(invalid, self.ignore_index)
        return item


def _size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an HW / HWC array."""
    if hasattr(image, "size") and not isinstance(image, np.ndarray) and not isinstance(image, torch.Tensor):
        width, height = image.size
        return height, width
    return tuple(np.asarray(image).shape[:2])


def collate_segmentation_batch(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the tensors of `ProcessedSegmentationDataset` items (every item must have the same size)."""
    batch: dict[str, torch.Tensor] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(np.asarray(values))
    return batch
