"""Converters from the raw downloads of the published benchmarks to Parquet datasets (METHODS 0.4).

Each converter writes ``<output_dir>/<split>-00000-of-0000N.parquet`` shards with the columns ``image`` (the
original encoded image bytes where the source is a JPEG/PNG file, PNG otherwise), ``label`` (PNG, ``L`` mode,
coarse class ids, 255 = ignored) and ``file_name``, plus ``<output_dir>/classes.json`` (class names, number of
classes, ignore id). The result loads with ``load_segmentation_dataset(output_dir, split=split)``. Shards are
written to a hidden temporary folder and moved in place at the end, so an interrupted run leaves no partial
split behind.

Supported raw layouts:

* COCO-Stuff-27 (`convert_cocostuff27`): the COCO-Stuff-164k layout used by IIC/PiCIE/STEGO,
  ``<raw_root>/images/{train2017,val2017}/<id>.jpg`` + ``<raw_root>/annotations/{train2017,val2017}/<id>.png``
  (fine ids 0..181, 255 unlabelled), optionally restricted by a curated list
  (``curated/train2017/Coco164kFull_Stuff_Coarse.txt``, ``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt``).
* Cityscapes-27 (`convert_cityscapes27`): ``<raw_root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` +
  ``<raw_root>/gtFine/<split>/<city>/*_gtFine_labelIds.png``.
* Potsdam-3 (`convert_potsdam3`): the IIC/STEGO preprocessed MATLAB files, or a plain folder pair of RGB tiles
  and 6-class label maps (ids or the ISPRS colour code); see the function.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from .readers import IMAGE_EXTENSIONS, LABEL_EXTENSIONS

__all__ = [
    "ISPRS_COLORS",
    "convert_cityscapes27",
    "convert_cocostuff27",
    "convert_potsdam3",
    "load_label_maps",
]

IGNORE_ID = 255
# ISPRS Potsdam colour code -> the 6 fine ids of label_maps.json (0 roads/impervious surfaces, 1 buildings,
# 2 low vegetation, 3 trees, 4 cars, 5 clutter).
ISPRS_COLORS: dict[tuple[int, int, int], int] = {
    (255, 255, 255): 0,
    (0, 0, 255): 1,
    (0, 255, 255): 2,
    (0, 255, 0): 3,
    (255, 255, 0): 4,
    (255, 0, 0): 5,
}
_COCO_SPLIT_DIRS = {"train": "train2017", "val": "val2017", "validation": "val2017"}
_POTSDAM_SPLIT_LISTS = {
    "train": ["labelled_train.txt"],
    "val": ["labelled_test.txt"],
    "validation": ["labelled_test.txt"],
    "train+val": ["labelled_train.txt", "labelled_test.txt"],
    "unlabelled_train": ["unlabelled_train.txt"],
    "all": ["all.txt"],
}


@lru_cache(maxsize=1)
def _label_maps_cached() -> dict[str, Any]:
    text = resources.files("hf_useg").joinpath("resources", "label_maps.json").read_text()
    maps = json.loads(text)
    for entry in maps.values():
        if isinstance(entry, dict) and "fine_to_coarse" in entry:
            entry["fine_to_coarse"] = {int(key): int(value) for key, value in entry["fine_to_coarse"].items()}
    return maps


def load_label_maps() -> dict[str, Any]:
    """The label tables shipped with the package (a copy of the project's ``label_maps.json``).

    Keys ``cocostuff27``, ``cityscapes27``, ``potsdam3`` (and ``source``); ``fine_to_coarse`` tables have int
    keys. Returns a fresh copy on each call.

    Example:

    ```python
    >>> maps = load_label_maps()
    >>> maps["cocostuff27"]["fine_to_coarse"][0], maps["potsdam3"]["class_names"][0]
    (9, 'roads and cars')
    ```
    """
    return copy.deepcopy(_label_maps_cached())


# ----------------------------------------------------------------------------------------------------------
# per-item conversion (module level so that worker processes can run it)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    image_path: Path
    label_path: Path | None
    file_name: str
    image_reader: str  # "bytes" (keep the encoded file), "mat" (IIC/STEGO .mat), "rgb" (decode, keep 3 channels)
    label_reader: str  # "ids" (single-channel ids), "mat", "ids_or_isprs" (ids or ISPRS colours)
    table: dict[int, int] = field(default_factory=dict)


def _apply_table(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Map integer ids through `table`; ids missing from it (and negative ones) become 255."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        rounded = np.rint(ids)
        if not np.array_equal(rounded, ids):
            raise ValueError("label map holds non-integer values")
        ids = rounded.astype(np.int64)
    lut = np.full(max(int(ids.max(initial=0)) + 1, 256), IGNORE_ID, dtype=np.uint8)
    for fine, coarse in table.items():
        if 0 <= fine < lut.size:
            lut[fine] = coarse
    out = lut[np.clip(ids, 0, None)]
    out[ids < 0] = IGNORE_ID
    return out


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _load_mat_array(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    content = loadmat(str(path))
    if key not in content:
        keys = [name for name in content if not name.startswith("__")]
        raise ValueError(f"{path}: no {key!r} array in the .mat file (arrays: {keys})")
    return np.asarray(content[key])


def _rgb_uint8(array: np.ndarray, where: Path) -> np.ndarray:
    if array.ndim != 3 or array.shape[-1] < 3:
        raise ValueError(f"{where}: expected an [H, W, >=3] image, got shape {array.shape}")
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        if float(array.max(initial=0)) <= 1.0:
            array = array * 255.0  # stored in [0, 1]
        array = np.rint(array)
    return np.clip(array, 0, 255).astype(np.uint8)


def _read_label(item: _Item) -> np.ndarray:
    if item.label_reader == "mat":
        gt = np.squeeze(_load_mat_array(item.label_path, "gt"))
        if gt.ndim != 2:
            raise ValueError(f"{item.label_path}: expected a 2-D 'gt' array, got shape {gt.shape}")
        return _apply_table(gt, item.table)
    with PILImage.open(item.label_path) as label:
        if label.mode in ("RGB", "RGBA") and item.label_reader == "ids_or_isprs":
            rgb = np.asarray(label.convert("RGB")).astype(np.int64)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            fine = np.full(code.shape, -1, dtype=np.int64)
            for (r, g, b), fine_id in ISPRS_COLORS.items():
                fine[code == ((r << 16) | (g << 8) | b)] = fine_id
            return _apply_table(fine, item.table)
        if label.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise ValueError(
                f"{item.label_path}: label map has mode {label.mode!r}; expected a single-channel map of ids"
            )
        return _apply_table(np.asarray(label), item.table)


def _convert_item(item: _Item) -> dict[str, Any]:
    if item.image_reader == "bytes":
        image_bytes = item.image_path.read_bytes()
        with PILImage.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
    elif item.image_reader == "mat":
        rgb = _rgb_uint8(_load_mat_array(item.image_path, "img"), item.image_path)
        height, width = rgb.shape[:2]
        image_bytes = _encode_png(rgb)
    else:
        with PILImage.open(item.image_path) as image:
            if image.mode == "RGB" and image.format in ("PNG", "JPEG"):
                image_bytes = item.image_path.read_bytes()
                width, height = image.size
            else:
                rgb = _rgb_uint8(
                    np.asarray(image.convert("RGB") if image.mode in ("L", "P") else image), item.image_path
                )
                height, width = rgb.shape[:2]
                image_bytes = _encode_png(rgb)
    row: dict[str, Any] = {
        "image": {"bytes": image_bytes, "path": item.image_path.name},
        "file_name": item.file_name,
    }
    if item.label_path is not None:
        label = _read_label(item)
        if label.shape != (height, width):
            raise ValueError(
                f"label {item.label_path} is {label.shape[1]}x{label.shape[0]} but image "
                f"{item.image_path} is {width}x{height} (width x height)"
            )
        row["label"] = {"bytes": _encode_png(label), "path": None}
    return row


# ----------------------------------------------------------------------------------------------------------
# shard writing
# ----------------------------------------------------------------------------------------------------------


def _existing_split_files(output_dir: Path, split: str) -> list[Path]:
    return sorted(output_dir.glob(f"{split}-*.parquet")) + sorted(output_dir.glob(f"{split}.parquet"))


def _write_dataset(
    items: Sequence[_Item],
    output_dir: str | Path,
    split: str,
    classes: dict[str, Any],
    *,
    shard_size: int,
    num_workers: int,
    overwrite: bool,
    desc: str,
) -> Path:
    import datasets
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if not items:
        raise ValueError(f"nothing to convert for split {split!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = _existing_split_files(output_dir, split)
    if existing and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds the split {split!r} ({existing[0].name}, ...); pass overwrite=True"
        )

    with_labels = any(item.label_path is not None for item in items)
    features = {"image": datasets.Image(), "file_name": datasets.Value("string")}
    if with_labels:
        features["label"] = datasets.Image()
    features = datasets.Features(features)
    num_shards = -(-len(items) // shard_size)
    staging = output_dir / f".{split}-incomplete"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()

    def write_shard(rows: list[dict], index: int) -> None:
        columns = {name: [row.get(name) for row in rows] for name in features}
        table = datasets.Dataset.from_dict(columns, features=features).data.table
        pq.write_table(table, staging / f"{split}-{index:05d}-of-{num_shards:05d}.parquet")

    def convert_all() -> Iterable[dict]:
        if num_workers == 0:
            yield from map(_convert_item, items)
            return
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=num_workers) as executor:
            yield from executor.map(_convert_item, items, chunksize=8)

    rows: list[dict] = []
    shard_index = 0
    for row in tqdm(convert_all(), total=len(items), desc=desc, unit="img"):
        rows.append(row)
        if len(rows) == shard_size:
            write_shard(rows, shard_index)
            rows, shard_index = [], shard_index + 1
    if rows:
        write_shard(rows, shard_index)

    for old in existing:
        old.unlink()
    for shard in sorted(staging.iterdir()):
        shard.replace(output_dir / shard.name)
    staging.rmdir()
    (output_dir / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    return output_dir


def _classes_json(name: str, class_names: list[str], source: str) -> dict[str, Any]:
    return {
        "dataset": name,
        "num_classes": len(class_names),
        "ignore_index": IGNORE_ID,
        "classes": [{"id": index, "name": class_name} for index, class_name in enumerate(class_names)],
        "source": source,
    }


def _missing_error(kind: str, missing: list[str], where: Path) -> ValueError:
    shown = ", ".join(repr(name) for name in missing[:5])
    return ValueError(f"{len(missing)} {kind} missing in {where}, e.g. {shown}")


# ----------------------------------------------------------------------------------------------------------
# COCO-Stuff-27
# ----------------------------------------------------------------------------------------------------------


def _read_image_list(image_list: str | Path | Sequence[str], raw_root: Path, split_dir: str) -> list[str]:
    if isinstance(image_list, (str, Path)):
        path = Path(image_list)
        if not path.is_file():
            candidate = raw_root / "curated" / split_dir / path.name
            if not candidate.is_file():
                raise FileNotFoundError(f"image list {str(image_list)!r} not found (also looked at {candidate})")
            path = candidate
        names: Iterable[str] = path.read_text().splitlines()
    else:
        names = image_list
    ids = []
    for name in names:
        name = Path(str(name).strip()).name
        if not name:
            continue
        for suffix in (".jpg", ".png"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        ids.append(name)
    if not ids:
        raise ValueError(f"the image list {image_list!r} is empty")
    return ids


def convert_cocostuff27(
    raw_root: str | Path,
    output_dir: str | Path,
    split: str = "train",
    image_list: str | Path | Sequence[str] | None = None,
    *,
    shard_size: int = 1000,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert COCO-Stuff-164k to COCO-Stuff-27 Parquet (27 coarse classes; unlabelled/unmapped -> 255).

    Args:
        raw_root: folder with ``images/{train2017,val2017}/<id>.jpg`` and
            ``annotations/{train2017,val2017}/<id>.png`` (the stuffthingmaps: fine ids 0..181,
            255 unlabelled).
        output_dir: where the ``<split>-*.parquet`` shards and ``classes.json`` go.
        split: ``"train"`` (train2017) or ``"val"`` (val2017); also the shard name prefix.
        image_list: restrict to these images: a text file with one image id per line (a bare file name
            such as ``"Coco164kFull_Stuff_Coarse.txt"`` is also looked up in
            ``<raw_root>/curated/<train2017|val2017>/``) or a sequence of ids. ``None`` converts every image
            of the split.
        shard_size: images per Parquet shard.
        num_workers: worker processes for decoding/encoding (0: in this process).
        overwrite: replace existing shards of this split.

    Images keep their original JPEG bytes. Returns `output_dir`.

    Example:

    ```python
    >>> convert_cocostuff27("cocostuff", "coco27", split="val",
    ...                     image_list="Coco164kFull_Stuff_Coarse_7.txt")   # doctest: +SKIP
    >>> load_segmentation_dataset("coco27", split="val")                     # doctest: +SKIP
    ```
    """
    raw_root = Path(raw_root)
    if split not in _COCO_SPLIT_DIRS:
        raise ValueError(f"split must be 'train' or 'val' for COCO-Stuff, got {split!r}")
    split_dir = _COCO_SPLIT_DIRS[split]
    image_dir, annotation_dir = raw_root / "images" / split_dir, raw_root / "annotations" / split_dir
    for folder in (image_dir, annotation_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"COCO-Stuff folder {folder} not found (expected images/ and annotations/)")
    if image_list is None:
        ids = sorted(path.stem for path in image_dir.glob("*.jpg"))
    else:
        ids = _read_image_list(image_list, raw_root, split_dir)
    table = load_label_maps()["cocostuff27"]["fine_to_coarse"]
    missing_images = [i for i in ids if not (image_dir / f"{i}.jpg").is_file()]
    if missing_images:
        raise _missing_error("image(s)", [f"{i}.jpg" for i in missing_images], image_dir)
    missing_labels = [i for i in ids if not (annotation_dir / f"{i}.png").is_file()]
    if missing_labels:
        raise _missing_error("annotation(s)", [f"{i}.png" for i in missing_labels], annotation_dir)
    items = [_Item(image_dir / f"{i}.jpg", annotation_dir / f"{i}.png", i, "bytes", "ids", table) for i in ids]
    maps = load_label_maps()["cocostuff27"]
    classes = _classes_json(
        "COCO-Stuff-27",
        maps["class_names"],
        f"converted by hf_useg.data.convert_cocostuff27 from {split_dir}",
    )
    return _write_dataset(
        items,
        output_dir,
        split,
        classes,
        shard_size=shard_size,
        num_workers=num_workers,
        overwrite=overwrite,
        desc=f"COCO-Stuff-27 {split}",
    )


# ----------------------------------------------------------------------------------------------------------
# Cityscapes-27
# ----------------------------------------------------------------------------------------------------------


def convert_cityscapes27(
    raw_root: str | Path,
    output_dir: str | Path,
    split: str = "train",
    *,
    shard_size: int = 500,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert Cityscapes (gtFine) to Cityscapes-27 Parquet: labelIds 7..33 -> 0..26, all others -> 255.

    Args:
        raw_root: folder with ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
            ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` (the official packages, unzipped).
        output_dir: where the ``<split>-*.parquet`` shards and ``classes.json`` go.
        split: ``"train"``, ``"val"`` or ``"test"`` (a folder name under ``leftImg8bit/``).
        shard_size, num_workers, overwrite: as in `convert_cocostuff27`.

    Images keep their original PNG bytes; ``file_name`` is ``<city>/<name>``. Returns `output_dir`.

    Example:

    ```python
    >>> convert_cityscapes27("cityscapes", "cityscapes27", split="val")   # doctest: +SKIP
    ```
    """
    raw_root = Path(raw_root)
    image_root, label_root = raw_root / "leftImg8bit", raw_root / "gtFine"
    if not image_root.is_dir():
        raise FileNotFoundError(f"Cityscapes folder {image_root} not found")
    if not (image_root / split).is_dir():
        available = sorted(p.name for p in image_root.iterdir() if p.is_dir())
        raise ValueError(f"split {split!r} not found in {image_root}; available splits: {available}")
    suffix = "_leftImg8bit.png"
    images = sorted((image_root / split).glob(f"*/*{suffix}"))
    if not images:
        raise ValueError(f"no *{suffix} images in {image_root / split}/<city>/")
    offset = int(load_label_maps()["cityscapes27"]["labelid_offset"])
    table = {label_id: label_id - offset for label_id in range(offset, offset + 27)}
    items, missing = [], []
    for image in images:
        city, stem = image.parent.name, image.name[: -len(suffix)]
        label = label_root / split / city / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            missing.append(f"{city}/{label.name}")
        items.append(_Item(image, label, f"{city}/{stem}", "bytes", "ids", table))
    if missing:
        raise _missing_error("label file(s)", missing, label_root / split)
    classes = _classes_json(
        "Cityscapes-27",
        load_label_maps()["cityscapes27"]["class_names"],
        f"converted by hf_useg.data.convert_cityscapes27 from gtFine/{split} labelIds",
    )
    return _write_dataset(
        items,
        output_dir,
        split,
        classes,
        shard_size=shard_size,
        num_workers=num_workers,
        overwrite=overwrite,
        desc=f"Cityscapes-27 {split}",
    )


# ----------------------------------------------------------------------------------------------------------
# Potsdam-3
# ----------------------------------------------------------------------------------------------------------


def _potsdam_mat_items(raw_root: Path, split: str, table: dict[int, int]) -> list[_Item]:
    lists = _POTSDAM_SPLIT_LISTS.get(split, [f"{split}.txt"])
    ids: list[str] = []
    for name in lists:
        list_file = raw_root / name
        if not list_file.is_file():
            raise FileNotFoundError(
                f"split list {list_file} not found (split {split!r}; known splits: "
                f"{sorted(_POTSDAM_SPLIT_LISTS)}, or any <split>.txt in the root)"
            )
        ids += [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"the split lists {lists} of {raw_root} are empty")
    missing_images = [i for i in ids if not (raw_root / "imgs" / f"{i}.mat").is_file()]
    if missing_images:
        raise _missing_error("image file(s)", [f"{i}.mat" for i in missing_images], raw_root / "imgs")
    has_label = [(raw_root / "gt" / f"{i}.mat").is_file() for i in ids]
    if any(has_label) and not all(has_label):
        missing = [f"{i}.mat" for i, present in zip(ids, has_label) if not present]
        raise _missing_error("gt file(s)", missing, raw_root / "gt")
    return [
        _Item(
            raw_root / "imgs" / f"{i}.mat",
            raw_root / "gt" / f"{i}.mat" if has_label[0] else None,
            i,
            "mat",
            "mat",
            table,
        )
        for i in ids
    ]


def _potsdam_folder_items(raw_root: Path, split: str, table: dict[int, int]) -> list[_Item]:
    image_dir, label_dir = raw_root / "images" / split, raw_root / "labels" / split
    if not image_dir.is_dir():
        available = sorted(p.name for p in (raw_root / "images").iterdir() if p.is_dir())
        raise ValueError(f"split {split!r} not found in {raw_root / 'images'}; available splits: {available}")
    images = {
        p.relative_to(image_dir).with_suffix("").as_posix(): p
        for p in sorted(image_dir.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    }
    if not images:
        raise ValueError(f"no image files in {image_dir}")
    labels: dict[str, Path] = {}
    if label_dir.is_dir():
        labels = {
            p.relative_to(label_dir).with_suffix("").as_posix(): p
            for p in sorted(label_dir.rglob("*"))
            if p.is_file() and p.suffix.lower() in LABEL_EXTENSIONS
        }
        missing = [images[key].name for key in images if key not in labels]
        if missing:
            raise _missing_error("label file(s) for images", missing, label_dir)
    return [_Item(path, labels.get(key), key, "rgb", "ids_or_isprs", table) for key, path in images.items()]


def convert_potsdam3(
    raw_root: str | Path,
    output_dir: str | Path,
    split: str = "train",
    *,
    shard_size: int = 1000,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert ISPRS Potsdam to Potsdam-3 Parquet: 6 classes merged into 3 (label_maps.json), others -> 255.

    Two raw layouts are accepted (the first that matches is used):

    1. The IIC/STEGO preprocessed release: ``<raw_root>/imgs/<id>.mat`` (array ``"img"``, ``[H, W, C>=3]``,
       the first three channels are RGB; uint8, or float in [0, 1] or [0, 255]) and ``<raw_root>/gt/<id>.mat``
       (array ``"gt"``, ``[H, W]`` fine ids 0..5), with the split lists ``<raw_root>/<list>.txt`` (one id per
       line): ``train`` -> ``labelled_train.txt``, ``val`` -> ``labelled_test.txt``, ``train+val`` -> both,
       ``unlabelled_train`` -> ``unlabelled_train.txt``, ``all`` -> ``all.txt``, any other split ``s`` ->
       ``s.txt``. A split whose ids have no ``gt`` file at all is written without a label column.
    2. A plain folder pair ``<raw_root>/images/<split>/*`` (RGB tiles; extra channels such as IR are dropped)
       + ``<raw_root>/labels/<split>/*`` matched by stem (optional), where a label is either a single-channel
       map of fine ids 0..5 or the ISPRS RGB colour code (white roads, blue buildings, cyan low vegetation,
       green trees, yellow cars, red clutter; any other colour, e.g. black boundaries, -> 255). Tiles are not
       cut: cut the 6000x6000 ISPRS tiles beforehand if you want small images.

    Fine ids (0 roads, 1 buildings, 2 low vegetation, 3 trees, 4 cars, 5 clutter) map to 0 roads and cars,
    1 buildings and clutter, 2 vegetation and trees. Images are stored as PNG (original bytes for RGB PNG/JPEG
    files of layout 2). `shard_size`, `num_workers`, `overwrite` as in `convert_cocostuff27`. Returns
    `output_dir`.

    Example:

    ```python
    >>> convert_potsdam3("potsdam", "potsdam3", split="val")   # doctest: +SKIP
    ```
    """
    raw_root = Path(raw_root)
    maps = load_label_maps()["potsdam3"]
    table = maps["fine_to_coarse"]
    if (raw_root / "imgs").is_dir():
        items = _potsdam_mat_items(raw_root, split, table)
        layout = "IIC/STEGO .mat files"
    elif (raw_root / "images").is_dir():
        items = _potsdam_folder_items(raw_root, split, table)
        layout = "images/ + labels/ folders"
    else:
        raise FileNotFoundError(
            f"no Potsdam data in {raw_root}: expected imgs/*.mat (+ gt/*.mat and split lists) or "
            "images/<split>/ (+ labels/<split>/)"
        )
    classes = _classes_json(
        "Potsdam-3", maps["class_names"], f"converted by hf_useg.data.convert_potsdam3 from {layout}"
    )
    return _write_dataset(
        items,
        output_dir,
        split,
        classes,
        shard_size=shard_size,
        num_workers=num_workers,
        overwrite=overwrite,
        desc=f"Potsdam-3 {split}",
    )
