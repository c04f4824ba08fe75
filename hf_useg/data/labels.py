"""Label maps: class-id tensors from segmentation maps, and label/image size checks.

Label ids are kept as stored. Ids ``>= num_classes`` (e.g. CamVid's void id 11) are *ignored* downstream:
`label_to_tensor(label, num_classes)` turns them into ``ignore_index`` and the evaluation metric skips them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

__all__ = ["check_label_sizes", "label_to_tensor"]

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")


def label_to_tensor(label: Any, num_classes: int | None = None, ignore_index: int = -1) -> torch.Tensor:
    """Turn a segmentation map into a ``torch.LongTensor [H, W]`` of class ids.

    Values ``< 0`` and, when `num_classes` is given, values ``>= num_classes`` (void / unlabelled ids such as
    CamVid's 11 or COCO's 255) become `ignore_index`.

    Args:
        label: a single-channel PIL image (mode ``L``, ``P``, ``I``, ``I;16`` or ``1``), or an integer array /
            tensor of shape ``[H, W]`` (``[1, H, W]`` and ``[H, W, 1]`` are squeezed).
        num_classes: number of real classes; ids at or above it are ignored.
        ignore_index: the value given to ignored pixels.

    Raises:
        ValueError: the map has several channels (e.g. an RGB colour-coded label) or is not 2-D.
        TypeError: the map holds non-integer values or is of an unsupported type.

    Example:

    ```python
    >>> import numpy as np
    >>> label_to_tensor(np.array([[0, 11], [3, 255]], dtype=np.uint8), num_classes=11)
    tensor([[ 0, -1],
            [ 3, -1]])
    ```
    """
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) != num_classes):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(label, PILImage.Image):
        if label.mode not in _LABEL_MODES:
            raise ValueError(
                f"label map has mode {label.mode!r} ({len(label.getbands())} channel(s)); expected a "
                f"single-channel map of class ids (modes {', '.join(_LABEL_MODES)}). Colour-coded labels "
                "must be converted to ids first."
            )
        array = np.asarray(label)
    elif isinstance(label, torch.Tensor):
        array = label.detach().cpu().numpy()
    elif isinstance(label, (np.ndarray, list, tuple)):
        array = np.asarray(label)
    else:
        raise TypeError(f"label must be a PIL image, numpy array or torch tensor, got {type(label).__name__}")

    if array.dtype == bool:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"label map must hold integer class ids, got dtype {array.dtype}")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"label map must be a single-channel [H, W] map of class ids, got shape {tuple(array.shape)}")
    tensor = torch.from_numpy(np.array(array, dtype=np.int64, copy=True))
    invalid = tensor < 0
    if num_classes is not None:
        invalid |= tensor >= num_classes
    return tensor.masked_fill_(invalid, ignore_index)


def _is_high_bit_depth(mode: str) -> bool:
    """16/32-bit integer and float PIL modes: ``convert("RGB")`` clips them to 0-255 instead of scaling."""
    return mode in ("I", "F") or mode.startswith("I;")


def _encoded_header(value: dict | None) -> tuple[tuple[int, int], str, str] | None:
    """((width, height), mode, name) of an undecoded `datasets.Image` value, read from the file header only."""
    if not value:
        return None
    if value.get("bytes") is not None:
        source, name = io.BytesIO(value["bytes"]), value.get("path") or "embedded bytes"
    elif value.get("path") and Path(value["path"]).is_file():
        source = name = value["path"]
    else:
        return None  # e.g. a path inside a remote archive: checked nowhere, decoded later
    try:
        with PILImage.open(source) as image:
            return image.size, image.mode, name
    except (OSError, SyntaxError) as error:  # PIL raises UnidentifiedImageError (an OSError) and others
        raise ValueError(f"cannot read the image file {name!r}: {error}") from error


def check_label_sizes(dataset, max_items: int | None = None, batch_size: int = 256) -> int:
    """Raise when a label map's size differs from its image's, when a label map is not a single-channel map of
    class ids (e.g. a colour-coded RGB map), or when an image has 16/32 bits per pixel (which the ``image``
    column's RGB conversion would clip to 255, not scale); return the number of items checked.

    Only the file headers are read (no pixel decoding). `max_items` limits the check to the first items.

    Example:

    ```python
    >>> from hf_useg.data import check_label_sizes, make_synthetic_scenes
    >>> check_label_sizes(make_synthetic_scenes(num_images=3, image_size=16))
    3
    ```
    """
    import datasets

    if "image" not in dataset.column_names:
        return 0
    has_labels = "label" in dataset.column_names
    count = len(dataset) if max_items is None else min(len(dataset), max_items)
    columns = (
        ["image"] + (["label"] if has_labels else []) + (["file_name"] if "file_name" in dataset.column_names else [])
    )
    raw = dataset.select_columns(columns).select(range(count)).with_format(None)
    for column in columns[: 2 if has_labels else 1]:
        raw = raw.cast_column(column, datasets.Image(decode=False))
    for start in range(0, count, batch_size):
        batch = raw[start : start + batch_size]
        names = batch.get("file_name") or [None] * len(batch["image"])
        labels = batch["label"] if has_labels else [None] * len(batch["image"])
        for offset, (image, label, name) in enumerate(zip(batch["image"], labels, names)):
            image_header, label_header = _encoded_header(image), _encoded_header(label)
            where = name if name is not None else f"item {start + offset}"
            if image_header is not None and _is_high_bit_depth(image_header[1]):
                raise ValueError(
                    f"the image {image_header[2]!r} has PIL mode {image_header[1]!r} (16/32 bits per pixel), "
                    f"which has no fixed 0-255 range: convert the images to 8-bit RGB first ({where})"
                )
            if label_header is not None and label_header[1] not in _LABEL_MODES:
                raise ValueError(
                    f"the label map {label_header[2]!r} has PIL mode {label_header[1]!r}, not a single-channel map "
                    f"of class ids (modes {', '.join(_LABEL_MODES)}); convert colour-coded labels to class ids "
                    f"first ({where})"
                )
            if image_header is not None and label_header is not None and image_header[0] != label_header[0]:
                (label_w, label_h), (image_w, image_h) = label_header[0], image_header[0]
                raise ValueError(
                    f"label size {label_w}x{label_h} differs from image size {image_w}x{image_h} "
                    f"({where}; sizes as width x height)"
                )
    return count
