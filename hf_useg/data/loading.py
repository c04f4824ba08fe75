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

import io
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_COLUMN_ALIASES",
    "LABEL_COLUMN_ALIASES",
    "check_label_sizes",
    "label_to_tensor",
    "load_segmentation_dataset",
    "segmentation_metadata",
]

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
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".ppm",
)
# Label maps must be stored losslessly.
LABEL_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".webp")

# Groups of split names that mean the same thing ("val" is called "validation" by `datasets`' inference).
_SPLIT_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("train", "training"),
    ("val", "validation", "valid", "dev"),
    ("test", "testing", "eval", "evaluation"),
)
_KNOWN_SPLIT_WORDS = frozenset(name for group in _SPLIT_SYNONYMS for name in group)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_METADATA_PREFIX = "hf_useg-segmentation-metadata: "
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")
_CHECKED_EMBEDDED_ITEMS = 32


# ----------------------------------------------------------------------------------------------------------
# metadata carried in `dataset.info.description`
# ----------------------------------------------------------------------------------------------------------


def segmentation_metadata(dataset) -> dict[str, Any]:
    """The segmentation metadata stored by `load_segmentation_dataset` and the synthetic/crop helpers.

    Keys: ``num_classes`` (int or None), ``class_names`` (list of str or None), ``ignore_index`` (the
    source's own void id, or None; ids ``>= num_classes`` are ignored anyway), ``source`` (str) and
    ``synthetic`` (bool).
    A dataset that carries no metadata gives all-None values.

    Example:

    ```python
    >>> from hf_useg.data import make_synthetic_scenes, segmentation_metadata
    >>> segmentation_metadata(make_synthetic_scenes(2, 16, 3))["class_names"]
    ['synthetic-class-0', 'synthetic-class-1', 'synthetic-class-2']
    ```
    """
    meta: dict[str, Any] = {
        "num_classes": None,
        "class_names": None,
        "ignore_index": None,
        "source": None,
        "synthetic": False,
    }
    description = getattr(getattr(dataset, "info", None), "description", "") or ""
    for line in description.splitlines():
        if line.startswith(_METADATA_PREFIX):
            meta.update(json.loads(line[len(_METADATA_PREFIX) :]))
    return meta


def _description_with_metadata(description: str | None, metadata: dict[str, Any]) -> str:
    """Append (or replace) the machine-readable metadata line of a dataset description."""
    kept = [line for line in (description or "").splitlines() if not line.startswith(_METADATA_PREFIX)]
    text = "\n".join(kept).rstrip()
    line = _METADATA_PREFIX + json.dumps(metadata, sort_keys=True)
    return f"{text}\n\n{line}" if text else line


def _set_metadata(dataset, metadata: dict[str, Any], summary: str | None = None) -> None:
    description = dataset.info.description or ""
    if summary:
        description = summary if not description else f"{summary}\n\n{description}"
    dataset.info.description = _description_with_metadata(description, metadata)


# ----------------------------------------------------------------------------------------------------------
# label maps
# ----------------------------------------------------------------------------------------------------------


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


def _encoded_size(value: dict | None) -> tuple[int, int] | None:
    """(width, height) of an undecoded `datasets.Image` value, read from the file header only."""
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
            return image.size
    except (OSError, SyntaxError) as error:  # PIL raises UnidentifiedImageError (an OSError) and others
        raise ValueError(f"cannot read the image file {name!r}: {error}") from error


def check_label_sizes(dataset, max_items: int | None = None, batch_size: int = 256) -> int:
    """Raise when a label map's size differs from its image's; return the number of pairs checked.

    Only the file headers are read (no pixel decoding). `max_items` limits the check to the first items.

    Example:

    ```python
    >>> from hf_useg.data import check_label_sizes, make_synthetic_scenes
    >>> check_label_sizes(make_synthetic_scenes(num_images=3, image_size=16))
    3
    ```
    """
    import datasets

    if "image" not in dataset.column_names or "label" not in dataset.column_names:
        return 0
    count = len(dataset) if max_items is None else min(len(dataset), max_items)
    columns = ["image", "label"] + (["file_name"] if "file_name" in dataset.column_names else [])
    raw = dataset.select_columns(columns).select(range(count)).with_format(None)
    raw = raw.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    for start in range(0, count, batch_size):
        batch = raw[start : start + batch_size]
        names = batch.get("file_name") or [None] * len(batch["image"])
        for offset, (image, label, name) in enumerate(zip(batch["image"], batch["label"], names)):
            image_size, label_size = _encoded_size(image), _encoded_size(label)
            if image_size is not None and label_size is not None and image_size != label_size:
                where = name if name is not None else f"item {start + offset}"
                raise ValueError(
                    f"label size {label_size[0]}x{label_size[1]} differs from image size "
                    f"{image_size[0]}x{image_size[1]} ({where}; sizes as width x height)"
                )
    return count


# ----------------------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------------------


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
            (the message lists the columns), missing label files, labels required but absent.

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
    elif isinstance(path_or_id, str) and _HUB_ID_RE.match(source) and ".." not in source:
        dataset, kind = _load_from_hub(source, split), "hub"
    else:
        raise FileNotFoundError(f"dataset path {source!r} does not exist (and it is not a Hub dataset id)")

    if len(dataset) == 0:
        raise ValueError(f"the dataset {source!r} (split {split!r}) is empty")

    dataset = _normalise_columns(dataset, source, image_column, label_column)
    if require_labels and "label" not in dataset.column_names:
        raise ValueError(
            f"the dataset {source!r} (split {split!r}) has no segmentation label column "
            f"(columns: {dataset.column_names}); pass label_column= to name it"
        )

    metadata = _resolve_class_metadata(num_classes, class_info, source)
    metadata["source"] = f"{kind}:{source}"
    metadata["synthetic"] = bool(class_info.get("synthetic") or segmentation_metadata(dataset)["synthetic"])
    _set_metadata(dataset, metadata)
    # Local image files: check every pair (headers only, cheap). Embedded bytes: reading them all could be
    # gigabytes, so only the first items are checked here.
    check_label_sizes(dataset, max_items=None if kind in ("folder", "imagefolder") else _CHECKED_EMBEDDED_ITEMS)
    return dataset


def _resolve_class_metadata(num_classes: int | None, class_info: dict[str, Any], source: str) -> dict[str, Any]:
    names = class_info.get("class_names")
    stored = class_info.get("num_classes")
    if stored is None and names is not None:
        stored = len(names)
    if num_classes is None:
        num_classes = stored
    elif stored is not None and stored != num_classes:
        logger.warning(
            "num_classes=%d differs from the %d classes described next to %s; class names are dropped",
            num_classes,
            stored,
            source,
        )
    if names is not None and num_classes is not None and len(names) != num_classes:
        names = None
    return {"num_classes": num_classes, "class_names": names, "ignore_index": class_info.get("ignore_index")}


def _split_candidates(split: str) -> list[str]:
    candidates = [split]
    for group in _SPLIT_SYNONYMS:
        if split.lower() in group:
            candidates += [name for name in group if name != split]
    return candidates


def _pick_split(split: str, available: Iterable[str], where: str) -> str:
    available = list(available)
    for candidate in _split_candidates(split):
        if candidate in available:
            return candidate
    raise ValueError(f"split {split!r} not found in {where}; available splits: {sorted(available)}")


# -- local sources -------------------------------------------------------------------------------------------


def _load_local(path: Path, split: str):
    """Return (dataset, kind, class_info) for an existing local path."""
    import datasets

    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ValueError(
                f"unsupported dataset file {str(path)!r}: expected a .parquet file or a folder "
                "(save_to_disk output, Parquet files, images/ + labels/ folders or an imagefolder)"
            )
        return _load_parquet_files([path]), "parquet", _read_class_info(path.parent)

    class_info = _read_class_info(path)
    if (path / "dataset_dict.json").is_file():
        dataset_dict = datasets.load_from_disk(str(path))
        name = _pick_split(split, dataset_dict.keys(), f"the saved DatasetDict {str(path)!r}")
        return dataset_dict[name], "saved", class_info
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        if not json.loads((path / "state.json").read_text()).get("_data_files"):
            raise ValueError(f"the saved dataset {str(path)!r} is empty (it has no data files)")
        return datasets.load_from_disk(str(path)), "saved", class_info
    if (path / "images").is_dir():
        return _load_folder_pair(path, split), "folder", class_info
    if _visible_parquet_files(path):
        return _load_parquet_files(_parquet_files_for_split(path, split)), "parquet", class_info
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file()):
        return _load_imagefolder(path, split), "imagefolder", class_info
    raise ValueError(
        f"no dataset found in {str(path)!r}: expected a save_to_disk folder, Parquet files, "
        "images/<split>/ (+ labels/<split>/) folders, or an imagefolder"
    )


def _read_class_info(folder: Path) -> dict[str, Any]:
    """Class names / count / void id from ``classes.json`` or ``id2label.json`` next to the data."""
    info: dict[str, Any] = {}
    classes_file, id2label_file = folder / "classes.json", folder / "id2label.json"
    if classes_file.is_file():
        content = json.loads(classes_file.read_text())
        if isinstance(content, list):
            info["class_names"] = [str(name) for name in content]
        elif isinstance(content, dict):
            if isinstance(content.get("classes"), list):
                entries = content["classes"]
                if all(isinstance(entry, dict) for entry in entries):
                    entries = sorted(entries, key=lambda entry: int(entry["id"]))
                    if [int(entry["id"]) for entry in entries] != list(range(len(entries))):
                        raise ValueError(f"{classes_file}: class ids must be 0..{len(entries) - 1}")
                    info["class_names"] = [str(entry["name"]) for entry in entries]
                else:
                    info["class_names"] = [str(name) for name in entries]
            elif isinstance(content.get("class_names"), list):
                info["class_names"] = [str(name) for name in content["class_names"]]
            if content.get("num_classes") is not None:
                info["num_classes"] = int(content["num_classes"])
            if content.get("ignore_index") is not None:
                info["ignore_index"] = int(content["ignore_index"])
            if content.get("synthetic"):
                info["synthetic"] = True
    elif id2label_file.is_file():
        id2label = {int(key): str(value) for key, value in json.loads(id2label_file.read_text()).items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"{id2label_file}: ids must be 0..{len(id2label) - 1}")
        info["class_names"] = [id2label[index] for index in range(len(id2label))]
    return info


def _list_files(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Files under `folder` (recursively) keyed by their relative path without suffix."""
    files: dict[str, Path] = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix.lower() in extensions and not file.name.startswith("."):
            key = file.relative_to(folder).with_suffix("").as_posix()
            if key in files:
                raise ValueError(f"two files share the stem {key!r} in {folder}: {files[key].name}, {file.name}")
            files[key] = file
    return files


def _load_folder_pair(root: Path, split: str):
    """``<root>/images/<split>/*`` (+ ``<root>/labels/<split>/*``) matched by relative path without suffix."""
    import datasets

    root = root.resolve()  # the dataset stores file paths: keep them valid from any working directory
    images_root, labels_root = root / "images", root / "labels"
    available = sorted(p.name for p in images_root.iterdir() if p.is_dir())
    if not available:
        raise ValueError(f"{images_root} holds no split folders (expected {images_root}/<split>/<image files>)")
    name = _pick_split(split, available, f"{images_root}")
    images = _list_files(images_root / name, IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"the split {split!r} is empty: no image files in {images_root / name}")
    columns: dict[str, list] = {"image": [str(p) for p in images.values()], "file_name": list(images)}
    features = {"image": datasets.Image(mode="RGB"), "file_name": datasets.Value("string")}
    label_folder = labels_root / name
    if label_folder.is_dir():
        labels = _list_files(label_folder, LABEL_EXTENSIONS)
        missing = [key for key in images if key not in labels]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) in {images_root / name} have no label in {label_folder}, "
                f"e.g. {', '.join(repr(images[key].name) for key in missing[:5])}"
            )
        orphans = [key for key in labels if key not in images]
        if orphans:
            raise ValueError(
                f"{len(orphans)} label file(s) in {label_folder} have no image in {images_root / name}, "
                f"e.g. {', '.join(repr(labels[key].name) for key in orphans[:5])}"
            )
        columns["label"] = [str(labels[key]) for key in images]
        features["label"] = datasets.Image()
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _parquet_files_for_split(root: Path, split: str) -> list[Path]:
    """Pick the Parquet files of `split` in a folder (see the module docstring for the accepted names)."""
    for name in _split_candidates(split):
        for base in (root, root / "data"):
            files = sorted(base.glob(f"{name}.parquet")) + sorted(base.glob(f"{name}-*.parquet"))
            if (base / name).is_dir():
                files += sorted((base / name).rglob("*.parquet"))
            if files:
                return files
    available: set[str] = set()
    for base in (root, root / "data"):
        if not base.is_dir():
            continue
        for file in base.glob("*.parquet"):
            available.add(file.stem.split("-")[0])
        for folder in base.iterdir():
            if (
                folder.is_dir()
                and not folder.name.startswith(".")
                and folder.name != "data"
                and _visible_parquet_files(folder)
            ):
                available.add(folder.name)
    if available & _KNOWN_SPLIT_WORDS:
        raise ValueError(f"split {split!r} not found in {str(root)!r}; available splits: {sorted(available)}")
    # A folder of Parquet files without split names is a single split.
    return _visible_parquet_files(root)


def _visible_parquet_files(root: Path) -> list[Path]:
    """Parquet files under `root`, skipping hidden folders (e.g. a converter's unfinished staging folder)."""
    return sorted(
        path
        for path in root.rglob("*.parquet")
        if not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def _load_parquet_files(files: list[Path]):
    import datasets

    return datasets.load_dataset("parquet", data_files={"train": [str(f) for f in files]}, split="train")


def _load_imagefolder(root: Path, split: str):
    import datasets
    from datasets.data_files import get_data_patterns

    patterns = {str(name): value for name, value in get_data_patterns(str(root)).items()}
    if list(patterns) == ["train"] and patterns["train"] == ["**"]:
        name = "train"  # no split folders: a single split, whatever was asked
    else:
        name = _pick_split(split, patterns, f"the imagefolder {str(root)!r}")
    return datasets.load_dataset("imagefolder", data_dir=str(root), split=name)


# -- the Hub -------------------------------------------------------------------------------------------------


def _hub_is_offline() -> bool:
    import datasets
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _load_from_hub(repo_id: str, split: str):
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    offline = _hub_is_offline()
    if not offline:
        # A quick metadata request first: without network `load_dataset` retries for ~20 s before failing.
        try:
            HfApi().dataset_info(repo_id, timeout=10)
        except GatedRepoError:
            pass  # `load_dataset` explains how to authenticate
        except RepositoryNotFoundError as error:
            raise FileNotFoundError(
                f"{repo_id!r} is neither an existing local path nor a dataset on the Hugging Face Hub"
            ) from error
        except HFValidationError as error:
            raise FileNotFoundError(f"{repo_id!r} is neither an existing local path nor a valid Hub id") from error
        except Exception as error:  # network errors come from several libraries (httpx, socket, ...)
            raise ConnectionError(
                f"{repo_id!r} is not a local path, and the Hugging Face Hub could not be reached "
                f"({type(error).__name__}: {error}). Pass a local folder or Parquet path, or set "
                "HF_HUB_OFFLINE=1 to use a cached copy."
            ) from error

    last_error: Exception | None = None
    for name in _split_candidates(split):
        try:
            return datasets.load_dataset(repo_id, split=name)
        except ValueError as error:
            if "Unknown split" not in str(error):
                raise
            last_error = error
        except ConnectionError as error:
            state = "offline (HF_HUB_OFFLINE=1)" if offline else "unreachable"
            raise ConnectionError(
                f"{repo_id!r} is not a local path, and the Hugging Face Hub is {state} with no cached copy "
                "of it: pass a local folder or Parquet path, or go online."
            ) from error
    raise ValueError(f"split {split!r} not found in the Hub dataset {repo_id!r}: {last_error}")


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
