"""Load any image-segmentation dataset as a `datasets.Dataset` with ``image`` and ``label`` columns.

Supported sources (`load_segmentation_dataset`):

* a Hub dataset id (``datasets.load_dataset``; offline it fails at once with a clear error),
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
* Parquet: one file, a folder of files, or split-named files (``<dir>/<split>.parquet``,
  ``<dir>/<split>-*.parquet``, ``<dir>/<split>/**/*.parquet``, and the same under ``<dir>/data/``),
* an ``imagefolder``-style folder (``<dir>/<split>/...`` with an optional ``metadata.jsonl`` whose
  ``mask_file_name`` / ``label_file_name`` column points at the label maps),
* the plain folder pair ``<root>/images/<split>/*`` + ``<root>/labels/<split>/*.png``, matched by file stem
  (``/work/shared/data/camvid11`` is laid out this way).

Whatever the source, the result has an ``image`` column (`datasets.Image(mode="RGB")`: PIL RGB images) and,
when the source has segmentation maps, a ``label`` column (`datasets.Image()` decoded in the file's own mode,
``L``/``P``/``I``/``I;16``: the pixel values are class ids). Images are decoded lazily, on access.

Label ids are kept as stored. Ids ``>= num_classes`` (e.g. CamVid's void id 11) are *ignored* downstream:
`label_to_tensor(label, num_classes)` turns them into ``ignore_index`` and the evaluation metric skips them.
The number of classes, the class names and the source's own ignore id travel with the dataset in its
``info.description`` (a JSON line, so they survive ``select``/``map``/``save_to_disk``); read them back with
`segmentation_metadata`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .labels import check_label_sizes
from .metadata import _resolve_class_metadata, _set_metadata, segmentation_metadata
from .readers import IMAGE_EXTENSIONS, _load_from_hub, _load_local

__all__ = ["IMAGE_COLUMN_ALIASES", "LABEL_COLUMN_ALIASES", "load_segmentation_dataset"]

IMAGE_COLUMN_ALIASES: tuple[str, ...] = ("image", "pixel_values", "img", "images")
LABEL_COLUMN_ALIASES: tuple[str, ...] = (
    "label",
    "annotation",
    "mask",
    "semantic_segmentation",
    "segmentation",
    "segmentation_mask",
    "seg",
    "gt",
    "labels",
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_CHECKED_EMBEDDED_ITEMS = 32
# what the demo and training call the generated scenes (`hf_useg.training` generates them in memory)
_DEMO_DATASET_NAMES = frozenset({"synthetic"})


def load_segmentation_dataset(
    path_or_id: str,
    split: str = "train",
    *,
    num_classes: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = False,
):
    """Load a segmentation dataset from the Hub, a `datasets` folder, Parquet or image folders.

    The returned `datasets.Dataset` has an ``image`` column (PIL RGB) and, when the source has segmentation
    maps, a ``label`` column (single-channel PIL maps of class ids); other columns are kept. Columns are found
    under the usual names (``image``/``pixel_values``/``img`` and ``label``/``annotation``/``mask``/
    ``semantic_segmentation``/``segmentation``) unless `image_column` / `label_column` name them. A column
    called ``label`` that is not a segmentation map (e.g. an image-classification `ClassLabel`) is renamed
    ``class_label``. Decoding is lazy. Label sizes are checked against image sizes from the file headers:
    every pair for image-file sources (folders), the first 32 items for embedded sources (Parquet, saved,
    Hub); `check_label_sizes` checks all of them on request.

    Sources that hold a single split (one Parquet file, a folder of Parquet files without split names, a saved
    `Dataset`, an imagefolder without split folders) are returned whatever `split` says. A ``classes.json``
    (or ``id2label.json``) next to the data gives class names, number of classes and void id.

    Parquet sources go through ``datasets.load_dataset("parquet")`` and are therefore copied once into the
    `datasets` Arrow cache.

    Args:
        path_or_id: local path (folder or ``.parquet`` file) or Hub dataset id.
        split: split to load; ``val``/``validation``/``valid``/``dev`` (and ``train``/``training``,
            ``test``/``testing``) are taken as synonyms when the exact name is absent.
        num_classes: number of real classes: label ids ``>= num_classes`` are void (see `label_to_tensor`).
            Defaults to the value in ``classes.json`` when there is one. Stored in the dataset's metadata
            (`segmentation_metadata`).
        image_column: name of the image column when it is not one of the usual names.
        label_column: name of the label column when it is not one of the usual names.
        require_labels: raise when the dataset has no label column.

    Raises:
        FileNotFoundError: the path does not exist and is not a Hub id; the Hub has no such dataset.
        ConnectionError: a Hub id while offline / the Hub unreachable.
        ValueError: split missing (the message lists the available ones), empty dataset, no image column
            (the message lists the columns), missing label files, labels required but absent, unreadable
            image files, colour-coded (RGB) label maps, 16/32-bit images (which would be clipped to 255), the
            demo's name ``synthetic`` (generated in memory, not a dataset).

    Example:

    ```python
    >>> from hf_useg.data import load_segmentation_dataset, segmentation_metadata
    >>> camvid = load_segmentation_dataset("../shared/data/camvid11", split="val")   # doctest: +SKIP
    >>> len(camvid), camvid[0]["image"].size, segmentation_metadata(camvid)["num_classes"]   # doctest: +SKIP
    (101, (480, 360), 11)
    ```
    """
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"path_or_id must be a str or path, got {type(path_or_id).__name__}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")

    source = str(path_or_id)
    path = Path(source).expanduser()
    class_info: dict[str, Any] = {}
    if path.exists():
        dataset, kind, class_info = _load_local(path, split)
    elif source in _DEMO_DATASET_NAMES or source.startswith("generated synthetic"):
        raise ValueError(
            f"{source!r} is the demo's name for the scenes it generates during training, not a dataset on disk: "
            "write a copy with hf_useg.data.save_synthetic_scenes(FOLDER, split='val') and pass FOLDER"
        )
    elif isinstance(path_or_id, str) and _HUB_ID_RE.match(source) and ".." not in source:
        dataset, kind = _load_from_hub(source, split), "hub"
    else:
        raise FileNotFoundError(f"dataset path {source!r} does not exist (and it is not a Hub dataset id)")

    if len(dataset) == 0:
        raise ValueError(f"the dataset {source!r} (split {split!r}) is empty")

    dataset = _normalise_columns(dataset, source, image_column, label_column)
    if require_labels and "label" not in dataset.column_names:
        if kind == "folder":
            raise ValueError(
                f"the dataset {source!r} has images but no label maps for the split {split!r}: expected them "
                f"in {Path(source) / 'labels' / split}/, beside {Path(source) / 'images' / split}/"
            )
        raise ValueError(
            f"the dataset {source!r} (split {split!r}) has no segmentation label column "
            f"(columns: {dataset.column_names}); name it with label_column= (hf-useg evaluate --label-column)"
        )

    metadata = _resolve_class_metadata(num_classes, class_info, source)
    metadata["source"] = f"{kind}:{source}"
    metadata["synthetic"] = bool(class_info.get("synthetic") or segmentation_metadata(dataset)["synthetic"])
    _set_metadata(dataset, metadata)
    # Local image files: check every pair (headers only, cheap). Embedded bytes: reading them all could be
    # gigabytes, so only the first items are checked here.
    # Images without labels (e.g. pretraining folders, possibly huge): the first items show their bit depth.
    every_pair = kind in ("folder", "imagefolder") and "label" in dataset.column_names
    check_label_sizes(dataset, max_items=None if every_pair else _CHECKED_EMBEDDED_ITEMS)
    return dataset


# -- columns -------------------------------------------------------------------------------------------------


def _is_image_feature(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _castable_to_image(dataset, column: str) -> bool:
    """Whether a non-Image column holds encoded images or paths to image files."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return True
    if isinstance(feature, dict) and set(feature) <= {"bytes", "path"} and "bytes" in feature:
        return True
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        first = dataset.data.column(column)[0].as_py()
        return isinstance(first, str) and first.lower().endswith(IMAGE_EXTENSIONS)
    return isinstance(feature, (datasets.Array2D, datasets.Array3D))


def _normalise_columns(dataset, source: str, image_column: str | None, label_column: str | None):
    import datasets

    columns = dataset.column_names
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image_column {image_column!r} is not a column of {source!r} (columns: {columns})")
        image_name = image_column
    else:
        image_name = next((name for name in IMAGE_COLUMN_ALIASES if name in columns), None)
        if image_name is None:
            raise ValueError(
                f"no image column in {source!r}: expected one of {list(IMAGE_COLUMN_ALIASES)} "
                f"(columns: {columns}); pass image_column= to name it"
            )

    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"label_column {label_column!r} is not a column of {source!r} (columns: {columns})")
        if not (_is_image_feature(dataset.features[label_column]) or _castable_to_image(dataset, label_column)):
            raise ValueError(
                f"label_column {label_column!r} of {source!r} is {dataset.features[label_column]}, "
                "not a segmentation map (an image of class ids)"
            )
        label_name = label_column
    else:
        label_name = next(
            (
                name
                for name in LABEL_COLUMN_ALIASES
                if name in columns
                and name != image_name
                and (_is_image_feature(dataset.features[name]) or _castable_to_image(dataset, name))
            ),
            None,
        )
    if label_name == image_name:
        raise ValueError(f"the image and label columns are the same column {image_name!r}")

    # Free the target names when other columns hold them.
    renames: dict[str, str] = {}
    for target, chosen in (("image", image_name), ("label", label_name)):
        if target in columns and target != chosen:
            new_name = "class_label" if target == "label" else f"original_{target}"
            if new_name in columns:
                raise ValueError(f"cannot rename column {target!r} of {source!r}: {new_name!r} exists")
            renames[target] = new_name
    if renames:
        dataset = dataset.rename_columns(renames)
    if image_name != "image":
        dataset = dataset.rename_column(image_name, "image")
    if label_name is not None and label_name != "label":
        dataset = dataset.rename_column(label_name, "label")

    try:
        if dataset.features["image"] != datasets.Image(mode="RGB"):
            dataset = dataset.cast_column("image", datasets.Image(mode="RGB"))
        if label_name is not None and not _is_image_feature(dataset.features["label"]):
            dataset = dataset.cast_column("label", datasets.Image())
    except Exception as error:  # arrow raises several types
        raise TypeError(f"could not read the image/label columns of {source!r} as images: {error}") from error
    return dataset
