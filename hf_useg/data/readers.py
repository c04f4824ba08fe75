"""Readers of the dataset sources `hf_useg.data.load_segmentation_dataset` accepts: ``save_to_disk`` folders,
Parquet files, ``images/`` + ``labels/`` folder pairs, imagefolders, and Hub datasets; and the split names they
share (``val``/``validation``/``valid``/``dev``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .metadata import _read_class_info

__all__ = ["IMAGE_EXTENSIONS", "LABEL_EXTENSIONS"]

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
