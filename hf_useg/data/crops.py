"""Five-crop training images (STEGO, METHODS 0.5).

Each training image of size H x W gives five crops of size ``(h, w) = (int(H * r), int(W * r))``: top-left,
top-right, bottom-left, bottom-right (flush with the corners) and center, whose top-left corner is
``(int(round((H - h) / 2)), int(round((W - w) / 2)))`` with Python's ``round`` (half to even), as torchvision
does. Every crop is its own training item and its own kNN entry.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from .metadata import _set_metadata, segmentation_metadata

__all__ = ["CROP_NAMES", "expand_five_crops", "five_crop", "five_crop_boxes"]

CROP_NAMES: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """Boxes ``(top, left, h, w)`` of the five crops of an image, in the order tl, tr, bl, br, center.

    Example:

    ```python
    >>> five_crop_boxes(5, 7)      # h = int(2.5) = 2, w = int(3.5) = 3; center top = round(1.5) = 2
    [(0, 0, 2, 3), (0, 4, 2, 3), (3, 0, 2, 3), (3, 4, 2, 3), (2, 2, 2, 3)]
    ```
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_ratio(ratio)
    height, width = int(height), int(width)
    crop_h, crop_w = int(height * ratio), int(width * ratio)
    if crop_h < 1 or crop_w < 1:
        raise ValueError(f"ratio {ratio} gives an empty crop of a {height}x{width} image ({crop_h}x{crop_w})")
    bottom, right = height - crop_h, width - crop_w
    center_top, center_left = int(round(bottom / 2)), int(round(right / 2))
    return [
        (0, 0, crop_h, crop_w),
        (0, right, crop_h, crop_w),
        (bottom, 0, crop_h, crop_w),
        (bottom, right, crop_h, crop_w),
        (center_top, center_left, crop_h, crop_w),
    ]


def _size_of(value: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, a numpy array ``[H, W, ...]`` or a tensor ``[..., H, W]``."""
    if isinstance(value, PILImage.Image):
        return value.size[1], value.size[0]
    if isinstance(value, np.ndarray) and value.ndim >= 2:
        return value.shape[0], value.shape[1]
    if isinstance(value, torch.Tensor) and value.ndim >= 2:
        return value.shape[-2], value.shape[-1]
    raise TypeError(
        "expected a PIL image, a numpy array [H, W, ...] or a torch tensor [..., H, W], "
        f"got {type(value).__name__}{getattr(value, 'shape', '')}"
    )


def _crop(value: Any, box: tuple[int, int, int, int]) -> Any:
    top, left, height, width = box
    if isinstance(value, PILImage.Image):
        return value.crop((left, top, left + width, top + height))
    if isinstance(value, np.ndarray):
        return value[top : top + height, left : left + width]
    return value[..., top : top + height, left : left + width]


def five_crop(image_or_array: Any, ratio: float = 0.5) -> list[Any]:
    """The five crops (tl, tr, bl, br, center) of a PIL image, a numpy array ``[H, W, ...]`` or a tensor
    ``[..., H, W]``, as objects of the same kind (numpy/torch crops are views).

    Example:

    ```python
    >>> import numpy as np
    >>> crops = five_crop(np.arange(20).reshape(4, 5))
    >>> [c.tolist() for c in crops[:2]]
    [[[0, 1], [5, 6]], [[3, 4], [8, 9]]]
    ```
    """
    height, width = _size_of(image_or_array)
    return [_crop(image_or_array, box) for box in five_crop_boxes(height, width, ratio)]


class _FiveCropTransform:
    """Format transform of the index dataset built by `expand_five_crops`: fetch the source item, crop it."""

    def __init__(self, source, ratio: float):
        self.source = source
        self.ratio = ratio
        self._last: tuple[int, dict] | None = None

    def __getstate__(self) -> dict:
        return {"source": self.source, "ratio": self.ratio, "_last": None}

    def _source_item(self, index: int) -> dict:
        # Crops of one source are consecutive: decode each source image once, not five times.
        if self._last is None or self._last[0] != index:
            self._last = (index, self.source[index])
        return self._last[1]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        for source_index, crop_index in zip(batch["source_index"], batch["crop_index"]):
            item = self._source_item(int(source_index))
            if "image" not in item:
                raise ValueError(f"the source dataset has no 'image' column (columns: {list(item)})")
            height, width = _size_of(item["image"])
            box = five_crop_boxes(height, width, self.ratio)[int(crop_index)]
            row = dict(item)
            row["image"] = _crop(item["image"], box)
            if item.get("label") is not None:
                if _size_of(item["label"]) != (height, width):
                    raise ValueError(
                        f"item {int(source_index)}: label size {_size_of(item['label'])} differs from "
                        f"image size {(height, width)} (height, width)"
                    )
                row["label"] = _crop(item["label"], box)
            row["source_index"], row["crop_index"] = int(source_index), int(crop_index)
            for key, value in row.items():
                out.setdefault(key, []).append(value)
        return out


def expand_five_crops(dataset, ratio: float = 0.5, *, lazy: bool = True):
    """Turn each item of a dataset into five items, its five crops (image and label cropped identically).

    Item ``5 * i + c`` is crop ``c`` (0 tl, 1 tr, 2 bl, 3 br, 4 center) of source item ``i``; it carries the
    source's columns plus ``source_index`` and ``crop_index``.

    With ``lazy=True`` (default) nothing is decoded up front: the result is a dataset of
    ``(source_index, crop_index)`` rows with a format transform that reads and crops the source item on access
    (so ``dataset.features`` lists only the two index columns, and ``set_format``/``set_transform`` on the
    result removes the cropping). With ``lazy=False`` every crop is decoded and stored (PNG-encoded, in
    memory) with a progress bar, giving a plain dataset with ``image``/``label`` features.

    Example:

    ```python
    >>> from hf_useg.data import make_synthetic_scenes, expand_five_crops
    >>> crops = expand_five_crops(make_synthetic_scenes(num_images=2, image_size=32))
    >>> len(crops), crops[4]["image"].size, crops[4]["crop_index"], crops[4]["source_index"]
    (10, (16, 16), 4, 0)
    ```
    """
    import datasets

    _check_ratio(ratio)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to crop")
    for name in ("source_index", "crop_index"):
        if name in dataset.column_names:
            raise ValueError(f"the dataset already has a {name!r} column")
    count = len(dataset)
    index = datasets.Dataset.from_dict(
        {
            "source_index": np.repeat(np.arange(count, dtype=np.int64), 5),
            "crop_index": np.tile(np.arange(5, dtype=np.int64), count),
        }
    )
    metadata = segmentation_metadata(dataset)
    summary = f"Five crops (ratio {ratio}; order tl, tr, bl, br, center) of each item of a {count}-item dataset."
    source_summary = "\n".join(
        line
        for line in (getattr(dataset.info, "description", "") or "").splitlines()
        if not line.startswith("hf_useg-")
    ).strip()
    if source_summary:
        summary = f"{summary}\nSource: {source_summary}"
    index.set_transform(_FiveCropTransform(dataset, ratio))
    _set_metadata(index, metadata, summary=summary)
    if lazy:
        return index

    from tqdm.auto import tqdm

    rows = [index[i] for i in tqdm(range(len(index)), desc="five crops", unit="crop")]
    features = {key: dataset.features[key] for key in rows[0] if key in dataset.features}
    features.update(source_index=datasets.Value("int64"), crop_index=datasets.Value("int64"))
    rows = [{key: row[key] for key in features} for row in rows]
    materialised = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    _set_metadata(materialised, metadata, summary=summary)
    return materialised
