"""Segmentation metadata: the number of classes, class names and void id that travel with a dataset.

They are stored in the dataset's ``info.description`` as one JSON line (so they survive ``select``/``map``/
``save_to_disk``) and read back with `segmentation_metadata`. A ``classes.json`` (or ``id2label.json``) next to
local data describes them for `hf_useg.data.load_segmentation_dataset`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["segmentation_metadata"]

_METADATA_PREFIX = "hf_useg-segmentation-metadata: "


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
