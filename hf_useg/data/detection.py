"""Object-detection datasets in the `datasets` layout of transformers' object-detection examples.

`load_detection_dataset` reads CSV, COCO-json and Pascal-VOC annotations, `datasets` sources that already have
an ``objects`` column, and plain folders of unlabelled images (for pretraining), into one layout:

* ``image``: `datasets.Image(mode="RGB")`, decoded lazily (EXIF orientation applied, as `datasets` does);
* ``image_id`` (int64), ``file_name`` (str, relative to the images folder), ``width`` / ``height`` (int32);
* ``objects``: a dict of per-image lists (``datasets.Sequence`` of a dict, as in ``cppe-5``):

  - ``bbox``: ``[x, y, w, h]`` in pixels (COCO format, float32), ``x, y`` the top-left corner;
  - ``category``: class ids, a `datasets.ClassLabel` whose ``names`` are the class names
    (`detection_class_names` reads them);
  - ``area`` (float32: ``w * h``, or COCO's own ``area``) and ``id`` (int64: COCO's annotation ids, otherwise
    the running index of the box in the returned dataset);
  - VOC only: ``difficult`` (bool); COCO only: ``iscrowd`` (bool).

Coordinates are kept as written in the annotation files: a CSV/VOC box ``xmin, ymin, xmax, ymax`` becomes
``[xmin, ymin, xmax - xmin, ymax - ymin]`` (no +1: VOC's devkit evaluator applies its own +1-pixel convention to
the raw values, see `hf_useg.evaluation.voc07_detection_ap`). Corners up to one pixel outside the image
(annotation-tool rounding) are clipped to it; boxes further outside, or with a non-positive width or height,
raise a `ValueError` naming the file and row (``invalid_boxes="drop"`` drops them with a warning instead).

`detection_references` turns the ``objects`` column into the per-image ``{"boxes", "labels", "difficult"}``
references the detection evaluators of `hf_useg.evaluation` take.

Example:

```python
>>> from hf_useg.data import detection_class_names, detection_references, load_detection_dataset
>>> train = load_detection_dataset("../shared/data/raccoon", split="train")  # doctest: +SKIP
>>> len(train), detection_class_names(train), train[0]["objects"]["bbox"]  # doctest: +SKIP
(160, ['raccoon'], [[81.0, 88.0, 441.0, 320.0]])
>>> detection_references(train)[0]["boxes"]  # doctest: +SKIP
array([[ 81.,  88., 522., 408.]], dtype=float32)
```
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .readers import (
    _KNOWN_SPLIT_WORDS,
    IMAGE_EXTENSIONS,
    _load_from_hub,
    _load_imagefolder,
    _load_parquet_files,
    _parquet_files_for_split,
    _split_candidates,
    _visible_parquet_files,
)
from .sources import _HUB_ID_RE, IMAGE_COLUMN_ALIASES

logger = logging.getLogger(__name__)

__all__ = [
    "CSV_COLUMNS",
    "VOC_CLASSES",
    "detection_class_names",
    "detection_references",
    "load_detection_dataset",
]

#: Columns a CSV annotation file must have (one row per box; ``filename`` relative to the images folder).
CSV_COLUMNS: tuple[str, ...] = ("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")

#: The 20 Pascal VOC classes in the devkit's order (the class ids of VOC folders whose names are all among them).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

_ALL_SPLITS = ("all",)
# Annotation tools round corners outwards now and then (VOC's xmax == width + 1, COCO's x + w == width + 0.01).
_CLIP_TOLERANCE = 1.0
_INVALID_BOX_POLICIES = ("raise", "drop")
_LISTED_PROBLEMS = 5


def load_detection_dataset(
    source: str | os.PathLike,
    split: str | None = None,
    *,
    images_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    invalid_boxes: str = "raise",
    require_objects: bool = False,
):
    """Load an object-detection dataset as a `datasets.Dataset` in the layout of the module docstring.

    Sources, recognised in this order:

    * a ``save_to_disk`` folder, Parquet file(s), a Hub id, or an imagefolder with ``metadata.jsonl`` /
      ``metadata.csv``, whose ``objects`` column is already in the layout (a list-of-dicts ``objects`` column is
      turned into the dict-of-lists layout; the image column may have any of the usual names);
    * a **CSV folder** (``<root>/<split>_labels.csv`` with the columns `CSV_COLUMNS`, images in
      ``<root>/images/``, e.g. ``../shared/data/raccoon``) or one ``.csv`` file. `split` picks
      ``<split>_labels.csv``; ``None``/``"all"`` picks the full file (``labels.csv``, ``all_labels.csv``, or the
      one file not named after a split, e.g. ``raccoon_labels.csv``), and then the images of the folder without a
      row are included with no objects. A row with empty class and box fields is an image without objects. Class
      ids are the sorted class names of all CSV files of the folder, so every split gets the same ids;
    * a **COCO json** file, or a folder with ``annotations/instances_<split>*.json`` (``val`` finds
      ``instances_val2017.json``) or Roboflow's ``<split>/_annotations.coco.json``. Images are looked for in
      `images_dir`, next to the json, in ``<root>/<split name>/`` (COCO's ``val2017/``), ``<root>/images/<split
      name>/`` and ``<root>/images/``. Class ids are the categories sorted by their COCO id; ``image_id`` and
      ``objects.id`` are COCO's; ``objects.iscrowd`` keeps the crowd flag;
    * a **Pascal VOC** folder (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``; ``None``
      or ``"all"`` takes every annotation). ``objects.difficult`` keeps the difficult flag. Class ids follow
      `VOC_CLASSES` when every name is a VOC class, else the sorted names of all the folder's annotations;
    * a **plain folder of images** (searched recursively; ``<root>/<split>/`` or ``<root>/images/<split>/`` split
      folders are honoured): the unlabelled data of pretraining. The dataset has ``image``, ``image_id`` and
      ``file_name`` only: no ``objects`` (and no ``width``/``height``, which would mean opening every file).

    A single annotation or Parquet file is one split: `split` is not used for it. For a saved `DatasetDict` and
    a Hub id, ``None`` means its only split (a Hub id: ``"train"``). Split names match their usual synonyms
    (``val``/``validation``/``valid``, ...). For CSV and VOC sources, the annotated image sizes are checked
    against the image files (their headers, EXIF orientation included).

    Args:
        source: local path (folder, ``.csv``, ``.json`` or ``.parquet`` file) or Hub dataset id.
        split: split to load (see above); ``None`` or ``"all"`` for the whole of a folder.
        images_dir: folder the annotations' file names are relative to, when not the default one.
        class_names: class names in id order (CSV and VOC sources; COCO json files name their categories).
            Annotated names missing from it raise.
        invalid_boxes: ``"raise"`` (default) or ``"drop"`` for annotation files' boxes that lie more than one
            pixel outside their image or have a non-positive size. Sources that already have ``objects`` always
            raise.
        require_objects: raise when the dataset has no ``objects`` column (an unlabelled folder).

    Raises:
        FileNotFoundError: a missing path that is not a Hub id; a missing images folder or image files.
        ValueError: unknown split (the message lists the available ones), CSV files missing columns, malformed
            annotations, unknown class names, invalid boxes or annotated sizes that differ from the image files
            (with the file and row), an empty dataset, no image column, no ``objects`` when required.
        ConnectionError: a Hub id while offline without a cached copy.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a str or path, got {type(source).__name__}")
    if split is not None and not isinstance(split, str):
        raise TypeError(f"split must be a str or None, got {type(split).__name__}")
    if invalid_boxes not in _INVALID_BOX_POLICIES:
        raise ValueError(f"invalid_boxes must be one of {_INVALID_BOX_POLICIES}, got {invalid_boxes!r}")
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names has duplicates: {class_names}")

    text = str(source)
    path = Path(text).expanduser()
    options = _Options(
        images_dir=Path(images_dir).expanduser().resolve() if images_dir is not None else None,
        class_names=class_names,
        invalid_boxes=invalid_boxes,
    )
    if options.images_dir is not None and not options.images_dir.is_dir():
        raise FileNotFoundError(f"images_dir {str(options.images_dir)!r} is not a folder")
    if path.exists():
        dataset = _load_local(path.resolve(), split, options)
    elif isinstance(source, str) and _HUB_ID_RE.match(text) and ".." not in text:
        dataset = _normalise_embedded(_load_from_hub(text, split or "train"), text)
    else:
        raise FileNotFoundError(f"detection dataset path {text!r} does not exist (and it is not a Hub dataset id)")

    if len(dataset) == 0:
        raise ValueError(f"the detection dataset {text!r} (split {split!r}) is empty")
    if require_objects and "objects" not in dataset.column_names:
        raise ValueError(
            f"the dataset {text!r} (split {split!r}) has no 'objects' column (no boxes; columns: "
            f"{dataset.column_names}): a labelled detection dataset is needed here"
        )
    return dataset


def detection_class_names(dataset) -> list[str]:
    """The class names of ``objects.category`` (its `datasets.ClassLabel` names), in id order.

    A dataset without ``objects`` (unlabelled images) gives ``[]``; integer categories without names raise.

    Example:

    ```python
    >>> import datasets
    >>> features = datasets.Features({"objects": datasets.Sequence({
    ...     "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
    ...     "category": datasets.ClassLabel(names=["cat", "dog"])})})
    >>> dataset = datasets.Dataset.from_dict({"objects": [{"bbox": [], "category": []}]}, features=features)
    >>> detection_class_names(dataset)
    ['cat', 'dog']
    ```
    """
    import datasets

    features = dataset.features
    if "objects" not in features:
        return []
    category = _objects_fields(features["objects"]).get("category")
    if category is None:
        raise ValueError(f"'objects' has no 'category' field: {features['objects']}")
    while not isinstance(category, datasets.ClassLabel) and hasattr(category, "feature"):
        category = category.feature
    if not isinstance(category, datasets.ClassLabel) or not category.names:
        raise ValueError(
            f"objects.category is {category}, not a ClassLabel: the dataset carries no class names. Name them with "
            "dataset.cast_column('objects', ...) using datasets.ClassLabel(names=[...]) for 'category'"
        )
    return list(category.names)


def detection_references(dataset) -> list[dict[str, np.ndarray]]:
    """Per-image references for the detection evaluators (`hf_useg.evaluation.coco_detection_ap` /
    ``voc07_detection_ap``): ``{"boxes": float32 [n, 4] xyxy pixels, "labels": int64 [n], "difficult": bool [n]}``.

    ``boxes`` are ``[x, y, x + w, y + h]`` of ``objects.bbox``. ``difficult`` is VOC's difficult flag, or COCO's
    ``iscrowd`` (both are ground truth that the respective evaluator ignores), else all False. Reads the
    ``objects`` column only: no image is decoded.

    Example:

    ```python
    >>> import datasets
    >>> features = datasets.Features({"objects": datasets.Sequence({
    ...     "bbox": datasets.Sequence(datasets.Value("float32"), length=4), "category": datasets.Value("int64")})})
    >>> data = {"objects": [{"bbox": [[10, 20, 30, 40]], "category": [1]}]}
    >>> detection_references(datasets.Dataset.from_dict(data, features=features))[0]["boxes"]
    array([[10., 20., 40., 60.]], dtype=float32)
    ```
    """
    if "objects" not in dataset.column_names:
        raise ValueError(
            f"the dataset has no 'objects' column (columns: {dataset.column_names}): unlabelled images have no "
            "references"
        )
    references = []
    for objects in dataset.data.column("objects").to_pylist():
        objects = _dict_of_lists(objects)
        bbox = np.asarray(objects.get("bbox") or [], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], axis=1)
        labels = np.asarray(objects.get("category") or [], dtype=np.int64).reshape(-1)
        flags = objects.get("difficult")
        if flags is None:
            flags = objects.get("iscrowd")
        difficult = np.asarray(flags if flags is not None else [False] * len(boxes), dtype=bool).reshape(-1)
        if not len(boxes) == len(labels) == len(difficult):
            raise ValueError(f"objects fields differ in length: {len(boxes)} boxes, {len(labels)} categories")
        references.append({"boxes": boxes, "labels": labels, "difficult": difficult})
    return references


# -- shared pieces -------------------------------------------------------------------------------------------


class _Options:
    def __init__(self, images_dir: Path | None, class_names: list[str] | None, invalid_boxes: str):
        self.images_dir = images_dir
        self.class_names = class_names
        self.invalid_boxes = invalid_boxes


class _Image:
    """One image and its boxes while an annotation file is read."""

    def __init__(self, file_name: str, path: Path, image_id: int, width: int | None, height: int | None):
        self.file_name, self.path, self.image_id = file_name, path, image_id
        self.width, self.height = width, height
        self.bbox: list[list[float]] = []
        self.names: list[str] = []
        self.area: list[float] = []
        self.ids: list[int] = []
        self.flags: list[bool] = []  # VOC difficult / COCO iscrowd


def _objects_feature(class_names: list[str], flag: str | None):
    import datasets

    fields = {
        "id": datasets.Value("int64"),
        "area": datasets.Value("float32"),
        "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
        "category": datasets.ClassLabel(names=class_names),
    }
    if flag is not None:
        fields[flag] = datasets.Value("bool")
    return datasets.Sequence(fields)


def _build_dataset(images: list[_Image], class_names: list[str], flag: str | None, where: str):
    """The dataset of `images` (sorted by image id), with running box ids unless the source gave its own."""
    import datasets

    if not class_names:
        class_names = []
    index_of = {name: index for index, name in enumerate(class_names)}
    images = sorted(images, key=lambda image: image.image_id)
    next_id = 0
    objects = []
    for image in images:
        unknown = sorted({name for name in image.names if name not in index_of})
        if unknown:
            raise ValueError(f"{where}: {image.file_name} has class(es) {unknown} that are not in {class_names}")
        ids = image.ids or list(range(next_id, next_id + len(image.bbox)))
        next_id += len(image.bbox)
        entry: dict[str, list] = {
            "id": ids,
            "area": image.area,
            "bbox": image.bbox,
            "category": [index_of[name] for name in image.names],
        }
        if flag is not None:
            entry[flag] = image.flags
        objects.append(entry)
    columns = {
        "image": [str(image.path) for image in images],
        "image_id": [image.image_id for image in images],
        "file_name": [image.file_name for image in images],
        "width": [image.width for image in images],
        "height": [image.height for image in images],
        "objects": objects,
    }
    features = datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "image_id": datasets.Value("int64"),
            "file_name": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": _objects_feature(class_names, flag),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def _add_box(
    image: _Image,
    corners: tuple[float, float, float, float],
    where: str,
    invalid_boxes: str,
) -> bool:
    """Check a box ``(x1, y1, x2, y2)`` against its image, clip it within the tolerance and add it as
    ``[x, y, w, h]``; return False when it is dropped."""
    x1, y1, x2, y2 = corners
    width, height = image.width, image.height
    problem = None
    if not all(np.isfinite(value) for value in corners):
        problem = f"non-finite coordinates {list(corners)}"
    elif x2 <= x1 or y2 <= y1:
        problem = f"non-positive size: xmin={x1:g}, ymin={y1:g}, xmax={x2:g}, ymax={y2:g}"
    elif (
        min(x1, y1) < -_CLIP_TOLERANCE
        or x2 > width + _CLIP_TOLERANCE
        or y2 > height + _CLIP_TOLERANCE
        or x1 >= width
        or y1 >= height
        or x2 <= 0
        or y2 <= 0
    ):
        problem = f"outside the {width}x{height} image: xmin={x1:g}, ymin={y1:g}, xmax={x2:g}, ymax={y2:g}"
    if problem is not None:
        if invalid_boxes == "raise":
            raise ValueError(
                f"{where}: invalid box of {image.file_name} ({problem}); pass invalid_boxes='drop' to drop it"
            )
        logger.warning("%s: dropped the box of %s (%s)", where, image.file_name, problem)
        return False
    x1, y1 = max(x1, 0.0), max(y1, 0.0)
    x2, y2 = min(x2, float(width)), min(y2, float(height))
    image.bbox.append([x1, y1, x2 - x1, y2 - y1])
    image.area.append((x2 - x1) * (y2 - y1))
    return True


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as `datasets` decodes the file: from the header, after the EXIF orientation."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112)
    except Exception as error:  # PIL raises several types
        raise ValueError(f"cannot read the image file {path}: {error}") from error
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_sizes(images: list[_Image], where: str) -> None:
    """Fill in missing sizes from the files and check the annotated ones against them."""
    wrong = []
    for image in images:
        width, height = _image_size(image.path)
        if image.width is None or image.height is None or image.width <= 0 or image.height <= 0:
            image.width, image.height = width, height
        elif (image.width, image.height) != (width, height):
            wrong.append(f"{image.file_name} (annotated {image.width}x{image.height}, file {width}x{height})")
    if wrong:
        raise ValueError(
            f"{where}: {len(wrong)} image(s) have another size than annotated, "
            f"e.g. {'; '.join(wrong[:_LISTED_PROBLEMS])}"
        )


def _raise_missing_images(missing: list[str], folder: Path, where: str) -> None:
    if missing:
        raise FileNotFoundError(
            f"{where}: {len(missing)} image file(s) not found in {folder}, "
            f"e.g. {', '.join(missing[:_LISTED_PROBLEMS])}; pass images_dir= when the images are elsewhere"
        )


def _list_images(folder: Path) -> dict[str, Path]:
    """Image files under `folder` (recursively, hidden ones skipped) keyed by their relative path."""
    return {
        file.relative_to(folder).as_posix(): file
        for file in sorted(folder.rglob("*"))
        if file.is_file()
        and file.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)
    }


def _match_split(split: str, available: dict[str, Any], where: str, extra: str = "") -> str:
    """The key of `available` that names `split` (exactly, a synonym, or with a year suffix as ``val2017``)."""
    for candidate in _split_candidates(split):
        if candidate in available:
            return candidate
    for candidate in _split_candidates(split):
        suffixed = [name for name in available if re.fullmatch(rf"{re.escape(candidate)}\d*", name)]
        if len(suffixed) == 1:
            return suffixed[0]
    raise ValueError(f"split {split!r} not found in {where}; available splits: {sorted(available)}{extra}")


# -- local sources -------------------------------------------------------------------------------------------


def _load_local(path: Path, split: str | None, options: _Options):
    import datasets

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return _load_csv(path, path.parent, False, options)
        if suffix == ".json":
            return _load_coco(path, None, options)
        if suffix == ".parquet":
            return _normalise_embedded(_load_parquet_files([path]), str(path))
        raise ValueError(
            f"unsupported detection dataset file {str(path)!r}: expected a .csv, COCO .json or .parquet file, "
            "or a folder"
        )
    if (path / "dataset_dict.json").is_file():
        dataset_dict = datasets.load_from_disk(str(path))
        if split is None and len(dataset_dict) == 1:
            return _normalise_embedded(next(iter(dataset_dict.values())), str(path))
        if split is None:
            raise ValueError(
                f"the saved DatasetDict {str(path)!r} has several splits: pick one of {sorted(dataset_dict)}"
            )
        name = _match_split(split, dict(dataset_dict), f"the saved DatasetDict {str(path)!r}")
        return _normalise_embedded(dataset_dict[name], str(path))
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return _normalise_embedded(datasets.load_from_disk(str(path)), str(path))
    if any((path / name).is_file() for name in ("metadata.jsonl", "metadata.csv")) or any(
        path.glob("*/metadata.jsonl")
    ):
        return _normalise_embedded(_load_imagefolder(path, split or "train"), str(path))
    csv_files = _csv_label_files(path)
    if csv_files:
        return _load_csv_folder(path, csv_files, split, options)
    coco_files = _coco_files(path)
    if coco_files:
        return _load_coco_folder(path, coco_files, split, options)
    if (path / "Annotations").is_dir():
        return _load_voc(path, split, options)
    if _visible_parquet_files(path):
        return _normalise_embedded(_load_parquet_files(_parquet_files_for_split(path, split or "all")), str(path))
    return _load_unlabelled_folder(path, split)


# -- CSV -----------------------------------------------------------------------------------------------------


def _csv_label_files(root: Path) -> dict[str, Path]:
    """Split name -> CSV file (``train_labels.csv`` -> ``train``; ``labels.csv`` -> ``all``)."""
    files = {}
    for file in sorted(root.glob("*.csv")):
        if file.name.startswith(".") or file.name == "metadata.csv":
            continue
        stem = file.stem
        name = stem[: -len("_labels")] if stem.endswith("_labels") else stem
        files["all" if name in ("labels", "all") else name] = file
    return files


def _load_csv_folder(root: Path, csv_files: dict[str, Path], split: str | None, options: _Options):
    where = f"the CSV folder {str(root)!r}"
    if split is None or split == "all":
        full = [name for name in csv_files if name == "all"] or [
            name for name in csv_files if name.lower() not in _KNOWN_SPLIT_WORDS
        ]
        if len(full) != 1:
            raise ValueError(
                f"{where} has no single full annotation file for split=None/'all' (found {sorted(full)} among "
                f"{sorted(csv_files)}): name the split, or name the full file labels.csv"
            )
        return _load_csv(csv_files[full[0]], root, True, options)
    names = {name: file for name, file in csv_files.items() if name != "all"}
    extra = (
        " (or None/'all' for the full file)"
        if len(csv_files) > len(names) or any(name.lower() not in _KNOWN_SPLIT_WORDS for name in names)
        else ""
    )
    name = _match_split(split, names, where, extra)
    return _load_csv(csv_files[name], root, False, options)


def _read_csv_rows(file: Path) -> list[dict[str, str]]:
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [column.strip() for column in reader.fieldnames or []]
        missing = [column for column in CSV_COLUMNS if column not in columns]
        if missing:
            raise ValueError(
                f"the CSV file {file} misses the column(s) {missing}: it has {columns}, a detection CSV needs "
                f"{list(CSV_COLUMNS)}"
            )
        return [{(key or "").strip(): (value or "").strip() for key, value in row.items()} for row in reader]


def _csv_class_names(root: Path, options: _Options) -> list[str]:
    if options.class_names is not None:
        return options.class_names
    names: set[str] = set()
    for file in _csv_label_files(root).values():
        names.update(row["class"] for row in _read_csv_rows(file) if row["class"])
    return sorted(names)


def _load_csv(file: Path, root: Path, include_unlisted: bool, options: _Options):
    """One CSV file; with `include_unlisted`, the images of the folder without a row are added without objects."""
    rows = _read_csv_rows(file)
    images_root = options.images_dir or (root / "images" if (root / "images").is_dir() else root)
    # Image ids are positions among all the folder's images, so that they agree between splits.
    folder_images = _list_images(images_root)
    image_ids = {name: index for index, name in enumerate(folder_images)}
    images: dict[str, _Image] = {}
    boxes: list[tuple[_Image, tuple[float, float, float, float], str, str]] = []
    missing: list[str] = []
    for line, row in enumerate(rows, start=2):
        where = f"{file.name} line {line}"
        file_name = row["filename"]
        if not file_name:
            raise ValueError(f"{where}: empty filename")
        try:
            width, height = int(row["width"]), int(row["height"])
        except ValueError as error:
            raise ValueError(
                f"{where}: width/height are not integers ({row['width']!r}, {row['height']!r})"
            ) from error
        image = images.get(file_name)
        if image is None:
            if file_name not in image_ids:
                missing.append(file_name)
                image_ids[file_name] = len(image_ids)
            image = _Image(file_name, images_root / file_name, image_ids[file_name], width, height)
            images[file_name] = image
        elif (image.width, image.height) != (width, height):
            raise ValueError(
                f"{where}: {file_name} is {width}x{height} here but {image.width}x{image.height} in an earlier row"
            )
        box_fields = [row[column] for column in ("class", "xmin", "ymin", "xmax", "ymax")]
        if not any(box_fields):
            continue  # an image without objects
        if not all(box_fields):
            raise ValueError(f"{where}: class and box fields must be all filled or all empty, got {box_fields}")
        try:
            corners = tuple(float(row[column]) for column in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as error:
            raise ValueError(f"{where}: box coordinates are not numbers: {box_fields[1:]}") from error
        boxes.append((image, corners, where, row["class"]))
    _raise_missing_images(missing, images_root, str(file))
    if include_unlisted:
        for file_name, path in folder_images.items():
            if file_name not in images:
                images[file_name] = _Image(file_name, path, image_ids[file_name], None, None)
    _check_sizes(list(images.values()), str(file))
    for image, corners, where, name in boxes:
        if _add_box(image, corners, where, options.invalid_boxes):
            image.names.append(name)
    return _build_dataset(list(images.values()), _csv_class_names(root, options), None, str(file))


# -- COCO ----------------------------------------------------------------------------------------------------


def _coco_files(root: Path) -> dict[str, Path]:
    """Split name -> COCO json: ``annotations/instances_<name>.json`` (any ``annotations/*.json`` when there is
    no ``instances_`` file), ``instances_<name>.json``, and Roboflow's ``<name>/_annotations.coco.json``."""
    files: dict[str, Path] = {}
    annotations = sorted((root / "annotations").glob("*.json")) + sorted(root.glob("instances_*.json"))
    instances = [file for file in annotations if file.stem.startswith("instances_")]
    for file in instances or annotations:
        files[file.stem.removeprefix("instances_")] = file
    for file in sorted(root.glob("*/_annotations.coco.json")):
        files[file.parent.name] = file
    return files


def _load_coco_folder(root: Path, coco_files: dict[str, Path], split: str | None, options: _Options):
    where = f"the COCO folder {str(root)!r}"
    if split is None or split == "all":
        if len(coco_files) != 1:
            raise ValueError(f"{where} holds several annotation files: pick a split among {sorted(coco_files)}")
        name = next(iter(coco_files))
    else:
        name = _match_split(split, coco_files, where)
    return _load_coco(coco_files[name], name, options)


def _coco_images_root(json_file: Path, split_name: str | None, first_file: str | None, options: _Options) -> Path:
    if options.images_dir is not None:
        return options.images_dir
    parent, grandparent = json_file.parent, json_file.parent.parent
    candidates = [parent]
    if split_name:
        candidates += [grandparent / split_name, grandparent / "images" / split_name, parent / split_name]
    candidates += [parent / "images", grandparent / "images", grandparent]
    for folder in candidates:
        if first_file is None or (folder / first_file).is_file():
            return folder
    raise FileNotFoundError(
        f"the images of {json_file} (e.g. {first_file!r}) are in none of "
        f"{[str(folder) for folder in dict.fromkeys(candidates)]}: pass images_dir="
    )


def _load_coco(file: Path, split_name: str | None, options: _Options):
    where = str(file)
    if options.class_names is not None:
        raise ValueError(f"class_names cannot be given for the COCO json {where}: its categories name the classes")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from error
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(content.get(key), list)]
    if missing:
        raise ValueError(f"{where} is not a COCO detection file: it has no {missing} list(s)")
    categories = sorted(content["categories"], key=lambda category: int(category["id"]))
    class_names = [str(category["name"]) for category in categories]
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"{where}: category names are not unique: {class_names}")
    category_names = {int(category["id"]): str(category["name"]) for category in categories}

    if split_name is None:
        split_name = file.stem.removeprefix("instances_")
    entries = content["images"]
    images_root = _coco_images_root(file, split_name, entries[0]["file_name"] if entries else None, options)
    images: dict[int, _Image] = {}
    missing_files: list[str] = []
    for position, entry in enumerate(entries):
        try:
            image_id, file_name = int(entry["id"]), str(entry["file_name"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{where}: images[{position}] needs an integer 'id' and a 'file_name': {entry}"
            ) from error
        if image_id in images:
            raise ValueError(f"{where}: images[{position}] repeats the image id {image_id}")
        path = images_root / file_name
        if not path.is_file():
            missing_files.append(file_name)
        width, height = entry.get("width"), entry.get("height")
        image = _Image(file_name, path, image_id, int(width) if width else None, int(height) if height else None)
        images[image_id] = image
    _raise_missing_images(missing_files, images_root, where)
    for image in images.values():
        if image.width is None or image.height is None:
            image.width, image.height = _image_size(image.path)

    for position, annotation in enumerate(content["annotations"]):
        row = f"{where} annotations[{position}] (id {annotation.get('id')})"
        image = images.get(annotation.get("image_id"))
        if image is None:
            raise ValueError(f"{row}: image_id {annotation.get('image_id')!r} is not in 'images'")
        category = annotation.get("category_id")
        if category not in category_names:
            raise ValueError(f"{row}: category_id {category!r} is not in 'categories' ({sorted(category_names)})")
        bbox = annotation.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{row}: bbox must be [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(value) for value in bbox)
        if _add_box(image, (x, y, x + w, y + h), row, options.invalid_boxes):
            image.names.append(category_names[category])
            image.ids.append(int(annotation.get("id", position)))
            image.flags.append(bool(annotation.get("iscrowd", 0)))
            if annotation.get("area") is not None:
                image.area[-1] = float(annotation["area"])
    return _build_dataset(list(images.values()), class_names, "iscrowd", where)


# -- Pascal VOC ----------------------------------------------------------------------------------------------


def _voc_splits(root: Path) -> dict[str, Path]:
    folder = root / "ImageSets" / "Main"
    if not folder.is_dir():
        return {}
    # class-specific lists are named <class>_<split>.txt
    return {file.stem: file for file in sorted(folder.glob("*.txt")) if "_" not in file.stem}


def _parse_voc_xml(file: Path) -> tuple[str | None, int | None, int | None, list[tuple[str, bool, tuple]]]:
    try:
        root = ElementTree.parse(file).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"cannot parse the VOC annotation {file}: {error}") from error
    size = root.find("size")

    def number(element, tag: str) -> float | None:
        text = element.findtext(tag) if element is not None else None
        if text is None or not text.strip():
            return None
        try:
            return float(text)
        except ValueError as error:
            raise ValueError(f"{file}: <{tag}> is not a number: {text!r}") from error

    width, height = number(size, "width"), number(size, "height")
    objects = []
    for position, element in enumerate(root.findall("object")):  # direct children: not the <part>s of persons
        name = (element.findtext("name") or "").strip()
        box = element.find("bndbox")
        corners = tuple(number(box, tag) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if not name or box is None or any(value is None for value in corners):
            raise ValueError(f"{file}: <object> {position} needs a <name> and a <bndbox> with xmin/ymin/xmax/ymax")
        difficult = (element.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
        objects.append((name, difficult, corners))
    return (
        root.findtext("filename"),
        int(width) if width else None,
        int(height) if height else None,
        objects,
    )


def _voc_image_path(images_root: Path, stem: str, file_name: str | None) -> Path | None:
    for suffix in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        if (images_root / f"{stem}{suffix}").is_file():
            return images_root / f"{stem}{suffix}"
    if file_name and (images_root / file_name).is_file():
        return images_root / file_name
    return None


def _load_voc(root: Path, split: str | None, options: _Options):
    where = f"the VOC folder {str(root)!r}"
    annotations_root = root / "Annotations"
    all_stems = sorted(file.stem for file in annotations_root.glob("*.xml") if not file.name.startswith("."))
    if not all_stems:
        raise ValueError(f"{where}: no .xml files in {annotations_root}")
    if split is None or split == "all":
        stems = all_stems
    else:
        splits = _voc_splits(root)
        name = _match_split(split, splits, where, " (or None/'all' for every annotation)")
        stems = [line.split()[0] for line in splits[name].read_text().splitlines() if line.strip()]
        unknown = [stem for stem in stems if stem not in set(all_stems)]
        if unknown:
            raise FileNotFoundError(
                f"{splits[name]} lists {len(unknown)} id(s) without an annotation in {annotations_root}, e.g. "
                f"{', '.join(unknown[:_LISTED_PROBLEMS])}"
            )
    images_root = options.images_dir or root / "JPEGImages"
    if not images_root.is_dir():
        raise FileNotFoundError(f"{where}: no JPEGImages folder ({images_root}); pass images_dir=")
    image_ids = {stem: index for index, stem in enumerate(all_stems)}
    parsed = {stem: _parse_voc_xml(annotations_root / f"{stem}.xml") for stem in stems}

    if options.class_names is not None:
        class_names = options.class_names
    else:
        names = {name for *_, objects in parsed.values() for name, _, _ in objects}
        if names <= set(VOC_CLASSES):
            class_names = list(VOC_CLASSES)
        else:
            # the whole folder's names, so that every split gets the same ids
            for stem in all_stems:
                if stem not in parsed:
                    names.update(name for name, _, _ in _parse_voc_xml(annotations_root / f"{stem}.xml")[3])
            class_names = sorted(names)

    images, missing = [], []
    for stem in stems:
        file_name, width, height, objects = parsed[stem]
        path = _voc_image_path(images_root, stem, file_name)
        if path is None:
            missing.append(f"{stem}.jpg")
            continue
        image = _Image(path.relative_to(images_root).as_posix(), path, image_ids[stem], width, height)
        images.append((image, objects))
    _raise_missing_images(missing, images_root, where)
    _check_sizes([image for image, _ in images], where)
    for image, objects in images:
        for position, (name, difficult, corners) in enumerate(objects):
            row = f"Annotations/{Path(image.file_name).stem}.xml <object> {position}"
            if _add_box(image, corners, row, options.invalid_boxes):
                image.names.append(name)
                image.flags.append(difficult)
    return _build_dataset([image for image, _ in images], class_names, "difficult", where)


# -- unlabelled images ---------------------------------------------------------------------------------------


def _load_unlabelled_folder(root: Path, split: str | None):
    import datasets

    base = root / "images" if (root / "images").is_dir() else root
    split_folders = {
        folder.name: folder
        for folder in sorted(base.iterdir())
        if folder.is_dir() and folder.name.lower() in _KNOWN_SPLIT_WORDS
    }
    if split is None or split == "all":
        folder = base
    elif split_folders:
        folder = split_folders[_match_split(split, split_folders, f"the image folder {str(base)!r}")]
    elif split.lower() in ("train", "training"):
        folder = base
    else:
        raise ValueError(
            f"split {split!r} not found in the image folder {str(base)!r}: it has no split folders, so its only "
            "split is all of it (split=None, 'all' or 'train')"
        )
    images = _list_images(folder)
    if not images:
        raise ValueError(
            f"no detection dataset found in {str(root)!r}: no image files, CSV / COCO json / VOC annotations, "
            "Parquet files or saved dataset"
        )
    columns = {
        "image": [str(path) for path in images.values()],
        "image_id": list(range(len(images))),
        "file_name": list(images),
    }
    features = datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "image_id": datasets.Value("int64"),
            "file_name": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


# -- sources that are already datasets -----------------------------------------------------------------------


def _objects_fields(feature) -> dict[str, Any]:
    """The fields of an ``objects`` feature, dict-of-lists (``{"bbox": List(...)}``) or list-of-dicts layout."""
    if isinstance(feature, dict):
        return dict(feature)
    if isinstance(feature, list):  # `[{...}]`: a list of dicts in datasets < 4
        return dict(feature[0]) if feature and isinstance(feature[0], dict) else {}
    inner = getattr(feature, "feature", None)
    return dict(inner) if isinstance(inner, dict) else {}


def _is_dict_of_lists(feature) -> bool:
    # datasets >= 4 turns Sequence({...}) into a dict of Lists; datasets < 4 keeps a Sequence object with that meaning
    return isinstance(feature, dict) or (
        type(feature).__name__ == "Sequence" and isinstance(getattr(feature, "feature", None), dict)
    )


def _dict_of_lists(objects) -> dict[str, list]:
    if isinstance(objects, list):  # list-of-dicts layout
        keys = objects[0].keys() if objects else ()
        return {key: [entry[key] for entry in objects] for key in keys}
    return objects or {}


def _normalise_embedded(dataset, source: str):
    """Image column named ``image`` (PIL RGB), ``objects`` as a dict of lists, its boxes checked."""
    import datasets

    columns = dataset.column_names
    image_name = next((name for name in IMAGE_COLUMN_ALIASES if name in columns), None)
    if image_name is None:
        raise ValueError(
            f"no image column in {source!r}: expected one of {list(IMAGE_COLUMN_ALIASES)} (columns: {columns})"
        )
    if image_name != "image":
        if "image" in columns:
            dataset = dataset.rename_column("image", "original_image")
        dataset = dataset.rename_column(image_name, "image")
    if dataset.features["image"] != datasets.Image(mode="RGB"):
        try:
            dataset = dataset.cast_column("image", datasets.Image(mode="RGB"))
        except Exception as error:  # arrow raises several types
            raise TypeError(f"could not read the image column of {source!r} as images: {error}") from error
    if "objects" not in dataset.column_names:
        return dataset

    feature = dataset.features["objects"]
    fields = _objects_fields(feature)
    missing = [name for name in ("bbox", "category") if name not in fields]
    if missing:
        raise ValueError(f"the 'objects' column of {source!r} has no {missing} field(s): {feature}")
    if not _is_dict_of_lists(feature):  # a list of dicts: to the dict-of-lists layout of the examples
        target = datasets.Features({**dataset.features, "objects": datasets.Sequence(fields)})
        dataset = dataset.map(
            lambda objects: {"objects": _dict_of_lists(objects)},
            input_columns="objects",
            features=target,
            desc="objects as a dict of lists",
        )
    _check_embedded_boxes(dataset, source)
    return dataset


def _check_embedded_boxes(dataset, source: str) -> None:
    sizes = None
    if "width" in dataset.column_names and "height" in dataset.column_names:
        sizes = zip(dataset.data.column("width").to_pylist(), dataset.data.column("height").to_pylist())
    for row, objects in enumerate(dataset.data.column("objects").to_pylist()):
        bbox = np.asarray(_dict_of_lists(objects).get("bbox") or [], dtype=np.float64)
        size = next(sizes) if sizes is not None else None
        if bbox.size == 0:
            continue
        if bbox.ndim != 2 or bbox.shape[1] != 4:
            raise ValueError(f"{source!r} row {row}: objects.bbox must be a list of [x, y, w, h], got {bbox.tolist()}")
        bad = ~np.isfinite(bbox).all(axis=1) | (bbox[:, 2] <= 0) | (bbox[:, 3] <= 0)
        if size is not None and None not in size:
            width, height = size
            bad |= (bbox[:, 0] < -_CLIP_TOLERANCE) | (bbox[:, 1] < -_CLIP_TOLERANCE)
            bad |= (bbox[:, 0] + bbox[:, 2] > width + _CLIP_TOLERANCE) | (
                bbox[:, 1] + bbox[:, 3] > height + _CLIP_TOLERANCE
            )
        if bad.any():
            raise ValueError(
                f"{source!r} row {row}: invalid box(es) {bbox[bad].tolist()} ([x, y, w, h] with a non-positive size, "
                "or outside the image): fix or filter them"
            )
