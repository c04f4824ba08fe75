"""Model cards of hf_useg models (`huggingface_hub.ModelCard`).

* [`generate_model_card`] builds the card of a trained, fitted or converted model: `ModelCardData` metadata
  (``pipeline_tag: image-segmentation``, ``library_name: hf_useg``, base model, datasets, a ``model-index`` with
  the cluster- and linear-probe accuracy and mIoU) and a body with the results, the evaluation protocol and usage.
  The method's name, paper and description come from the method registry (`hf_useg.registry`).
* [`model_card_from_folder`] does the same for a saved model folder (``config.json``, ``training_summary.json``,
  ``eval_results.json``), [`validate_model_card`] checks a card offline, [`card_eval_results`] reads the numbers
  back.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import RepoCard

from ..registry import method_for_model_type

__all__ = [
    "CONFUSION_FIGURE",
    "card_eval_results",
    "generate_detection_model_card",
    "generate_model_card",
    "model_card_from_folder",
    "validate_model_card",
]

LIBRARY_NAME = "hf_useg"
LIBRARY_URL = "https://github.com/hf-useg/hf_useg"
PIPELINE_TAG = "image-segmentation"
TASK_NAME = "Unsupervised semantic segmentation"

# evaluation entries (keys of `hf_useg.inference.evaluate_segmenter`'s result) -> (card title, matching)
PROBES = {
    "cluster": ("cluster probe (unsupervised)", "hungarian"),
    "linear": ("linear probe (supervised)", "none"),
    "cluster_crf": ("cluster probe + dense CRF", "hungarian"),
    "linear_crf": ("linear probe + dense CRF", "none"),
}
# metric key in the results -> (model-index metric type, display name)
METRICS = {"accuracy": ("accuracy", "pixel accuracy"), "mean_iou": ("mean_iou", "mIoU")}

_PROTOCOL_ROWS = (
    ("resolution", "resolution (shorter side, px)"),
    ("crop", "crop"),
    ("flip_tta", "horizontal-flip TTA"),
    ("crf", "dense CRF"),
    ("matching", "cluster-to-class matching"),
    ("precision", "mixed precision"),
    ("split", "evaluation split"),
)
# the confusion-matrix figure saved beside the weights (`hf_useg.report.write_confusion_figure`), which the card embeds
CONFUSION_FIGURE = "confusion_matrix.png"
# method -> its card description naming the actual backbone (the registry's sentence assumes a DINO backbone)
_BACKBONE_DESCRIPTIONS = {
    "dino_kmeans": "Zero-training baseline: cosine k-means over the frozen patch features of {backbone}.",
    "stego": "A segmentation head trained on the frozen features of {backbone} by distilling their "
    "feature correspondences (no labels); segments are found by clustering the learned code.",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]*[A-Za-z0-9]$")
_SYNTHETIC_DATASET = ("synthetic-scenes", "generated synthetic scenes (not real data)")


def _looks_like_hub_id(name: Any) -> bool:
    """``owner/name`` that is not an existing local path (a Hub id the card may link to)."""
    return (
        isinstance(name, str)
        and bool(_HUB_ID.match(name))
        and ".." not in name
        and not os.path.exists(name)
        and len(name) <= 96
    )


def _dataset_fields(dataset: Any, dataset_id: str | None) -> tuple[str, str, str | None]:
    """(model-index dataset type, display name, Hub dataset id or None) for the training summary's ``dataset``."""
    if dataset_id is not None:
        return dataset_id, dataset_id, dataset_id if _looks_like_hub_id(dataset_id) else None
    if not dataset:
        return "unknown", "unknown data", None
    dataset = str(dataset)
    if dataset == "synthetic" or dataset.startswith("generated synthetic"):
        return _SYNTHETIC_DATASET[0], _SYNTHETIC_DATASET[1], None
    if _looks_like_hub_id(dataset):
        return dataset, dataset, dataset
    if os.path.exists(dataset) or "/" in dataset or "\\" in dataset:
        # a local folder or file: its name, never the machine's path
        slug = Path(dataset.rstrip("/\\")).name or "local-data"
        return slug, f"{slug} (local data)", None
    return re.sub(r"\s+", "-", dataset.strip()), dataset, None  # a plain name, e.g. "cocostuff27"


def _percent(value: Any, where: str) -> float:
    """A metric fraction in [0, 1] as a percentage with two decimals (what the card and model-index carry)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{where} must be a fraction in [0, 1], got {value!r}")
    return round(100.0 * number, 2)


def _config_of(model: Any) -> tuple[Any, str]:
    """(config, model class name) of a model or a config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return config, type(model).__name__
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):
        architectures = getattr(model, "architectures", None) or []
        return model, architectures[0] if architectures else "AutoModel"
    raise TypeError(f"expected a segmentation model or its config, got {type(model).__name__}")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _method_description(spec: Any, backbone: str | None) -> str:
    """The card's one-sentence description of the method, naming the backbone it was actually run on."""
    if spec is None:
        return "Unsupervised semantic segmentation model."
    if backbone and spec.name in _BACKBONE_DESCRIPTIONS:
        return _BACKBONE_DESCRIPTIONS[spec.name].format(backbone=backbone)
    return spec.description


def _per_class_table(results: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> str | None:
    """`hf_useg.inference.format_per_class_table` of the probes that carry per-class IoU (JSON nulls are NaN)."""
    from ..inference import format_per_class_table

    table_results = {}
    for probe, values in results.items():
        if probe in PROBES and isinstance(values, Mapping) and values.get("per_class_iou") is not None:
            per_class = [math.nan if value is None else float(value) for value in values["per_class_iou"]]
            if len(per_class) != len(class_names):
                return None
            table_results[probe] = {**values, "per_class_iou": per_class}
    return format_per_class_table(table_results, list(class_names)) if table_results else None


def _format_protocol_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def generate_model_card(
    model,
    *,
    summary: Mapping[str, Any] | None = None,
    results: Mapping[str, Mapping[str, Any]] | None = None,
    class_names: Sequence[str] | None = None,
    repo_id: str | None = None,
    dataset_id: str | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
    confusion_figure: str | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a trained, fitted or converted model, with its evaluation results.

    Args:
        model: the model (or its config).
        summary: the training summary (``method``, ``backbone``, ``dataset``, ``steps``, ``eval_protocol``,
            ``per_class_table``), as written by `hf_useg.training.train` (``training_summary.json``). A
            ``"notes"`` string, when present, is added to the card (e.g. where a converted checkpoint came from).
        results: ``{"cluster": metric dict, "linear": ..., "cluster_crf": ..., "linear_crf": ...}`` from
            `hf_useg.inference.evaluate_segmenter` (or ``eval_results.json``): ``accuracy`` and ``mean_iou``
            (fractions) become ``model-index`` eval results in percent with two decimals, and the card's table.
        class_names: the dataset's class names (listed in the card when given).
        repo_id: where the model will live (the model-index name and the usage snippets).
        dataset_id: the Hub id of the training/evaluation data when the summary names a local copy.
        base_model: the backbone's Hub id; by default the summary's ``backbone`` (or ``config.backbone_name``)
            when it is a Hub id (random and local backbones are described in the text only).
        model_name: the model-index name; default: the last part of ``repo_id``, else ``<method>-<dataset>``.
        confusion_figure: the file name, relative to the card, of the model's confusion-matrix figure
            (`hf_useg.report.write_confusion_figure`, saved beside the weights as [`CONFUSION_FIGURE`]) to embed.

    The per-class IoU table is the summary's ``per_class_table``, else built from the results' ``per_class_iou``
    when ``class_names`` are given.

    Raises:
        ValueError: for results that are not fractions in [0, 1] or lack ``accuracy``/``mean_iou``.

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> from hf_useg import StegoConfig
    >>> tiny = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                  patch_size=8, image_size=32)
    >>> card = generate_model_card(StegoConfig(backbone_config=tiny, dim=8, num_classes=3),
    ...                            results={"cluster": {"accuracy": 0.5, "mean_iou": 0.25}}, repo_id="me/stego")
    >>> card.data.pipeline_tag, [(r.metric_type, r.metric_value) for r in card.data.eval_results]
    ('image-segmentation', [('accuracy', 50.0), ('mean_iou', 25.0)])
    ```
    """
    summary = dict(summary or {})
    config, class_name = _config_of(model)
    model_type = config.model_type
    spec = method_for_model_type(model_type)
    backbone = summary.get("backbone") or getattr(config, "backbone_name", None)
    method_name = spec.display_name if spec is not None else model_type
    reference = spec.paper if spec is not None else ""
    description = _method_description(spec, backbone)
    dataset_type, dataset_name, hub_dataset = _dataset_fields(summary.get("dataset"), dataset_id)
    if model_name is not None or repo_id:
        model_name = model_name or repo_id.split("/")[-1]
        model_title = f"{method_name} — {model_name}"
    else:
        slug = (spec.name if spec is not None else model_type).replace("_", "-")
        model_name = slug if dataset_type == "unknown" else f"{slug}-{dataset_type}"
        model_title = method_name if dataset_type == "unknown" else f"{method_name} on {dataset_name}"
    protocol = dict(summary.get("eval_protocol") or {})

    eval_results: list[EvalResult] = []
    result_rows = []
    for probe, values in (results or {}).items():
        if probe not in PROBES:
            continue  # e.g. extra entries of a richer results dict
        title, matching = PROBES[probe]
        if not isinstance(values, Mapping) or any(key not in values for key in METRICS):
            raise ValueError(f"results[{probe!r}] must hold 'accuracy' and 'mean_iou', got {values!r:.200}")
        row = [title]
        for key, (metric_type, display) in METRICS.items():
            value = _percent(values[key], f"results[{probe!r}][{key!r}]")
            row.append(f"{value:.2f}")
            eval_results.append(
                EvalResult(
                    task_type=PIPELINE_TAG,
                    task_name=TASK_NAME,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=protocol.get("split"),
                    metric_type=metric_type,
                    metric_name=f"{title} {display} (%)",
                    metric_config=probe,
                    metric_args={
                        "matching": protocol.get("matching", matching) if matching == "hungarian" else matching
                    },
                    metric_value=value,
                )
            )
        result_rows.append(row)

    if base_model is None and _looks_like_hub_id(backbone):
        base_model = backbone
    tags = ["unsupervised-semantic-segmentation", "semantic-segmentation", model_type, LIBRARY_NAME]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license,
        tags=tags,
        base_model=base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=[metric_type for metric_type, _ in METRICS.values()] if eval_results else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )

    protocol_rows = [
        (display, _format_protocol_value(protocol[key])) for key, display in _PROTOCOL_ROWS if key in protocol
    ]
    protocol_rows += [
        (key, _format_protocol_value(value)) for key, value in protocol.items() if key not in dict(_PROTOCOL_ROWS)
    ]
    id2label = getattr(config, "id2label", None) or {}
    segment_names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    template = resources.files("hf_useg").joinpath("resources/model_card_template.md").read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_title=model_title,
        method_name=method_name,
        method_reference=reference,
        method_summary=description,
        backbone=backbone or "unknown",
        base_model=base_model,
        dataset=dataset_name,
        steps=summary.get("steps"),
        notes=summary.get("notes"),
        results_table=_markdown_table(["probe", "pixel accuracy (%)", "mIoU (%)"], result_rows) if result_rows else "",
        protocol_table=_markdown_table(["setting", "value"], protocol_rows) if protocol_rows else "",
        per_class_table=summary.get("per_class_table")
        or (_per_class_table(results, class_names) if results and class_names else None),
        confusion_figure=confusion_figure,
        segment_names=", ".join(segment_names),
        num_segments=len(segment_names),
        class_names=", ".join(str(name) for name in class_names) if class_names else None,
        repo_id=repo_id or "path/to/this/model",
        model_class=class_name,
        library_url=LIBRARY_URL,
    )


# detection evaluators (keys of `hf_useg.detection_inference.evaluate_detector`'s result) -> card title
DETECTION_EVALUATORS = {"coco": "COCO AP", "voc07": "VOC07 AP (DETReg)"}
# ... and the prefix of its metrics' names in the model-index ("COCO AP50 (%)", not "COCO AP AP50 (%)")
_DETECTION_METRIC_PREFIX = {"coco": "COCO", "voc07": "VOC07 (DETReg)"}


def generate_detection_model_card(
    summary: Mapping[str, Any],
    *,
    class_names: Sequence[str],
    repo_id: str | None = None,
    dataset_id: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """The model card of a fine-tuned detector (``pipeline_tag: object-detection``): how it was initialised (the
    pretraining and its box source, or none), its data, and the COCO and VOC07 AP of its final evaluation
    (``summary`` as `hf_useg.training.train` writes it for ``detection_finetune``: ``coco_ap``, ``voc07_ap50``, ...
    as fractions, ``eval_protocol``).

    Example:

    ```python
    >>> summary = {"coco_ap": 0.31, "coco_ap50": 0.6, "coco_ap75": 0.3}
    >>> card = generate_detection_model_card(summary, class_names=["cat"])
    >>> "pipeline_tag: object-detection" in card
    True
    ```
    """
    from ..detection_inference import EVALUATORS

    dataset_type, dataset_name, hub_dataset = _dataset_fields(summary.get("dataset"), dataset_id)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "deformable-detr-detection")
    protocol = dict(summary.get("eval_protocol") or {})
    eval_results, rows = [], []
    for evaluator, title in DETECTION_EVALUATORS.items():
        keys = [f"{evaluator}_{name}" for name in ("ap", "ap50", "ap75")]
        if not all(key in summary and summary[key] is not None for key in keys):
            continue
        values = [_percent(summary[key], key) for key in keys]
        rows.append([title, *(f"{value:.2f}" for value in values)])
        for key, value in zip(keys, values):
            eval_results.append(
                EvalResult(
                    task_type="object-detection",
                    task_name="Object detection",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=protocol.get("split"),
                    metric_type=key,
                    metric_name=f"{_DETECTION_METRIC_PREFIX[evaluator]} {key.split('_')[-1].upper()} (%)",
                    metric_value=value,
                )
            )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="object-detection",
        license=license,
        tags=["object-detection", "deformable-detr", "detreg", LIBRARY_NAME],
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    protocol_rows = [(key, _format_protocol_value(value)) for key, value in protocol.items() if key != "evaluators"]
    template = resources.files("hf_useg").joinpath("resources/detection_model_card_template.md").read_text()
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_title=f"Deformable DETR — {model_name}",
        pretraining=summary.get("pretraining"),
        backbone=summary.get("backbone") or "unknown",
        dataset=dataset_name,
        steps=summary.get("steps"),
        class_names=", ".join(str(name) for name in class_names),
        library_url=LIBRARY_URL,
        notes=summary.get("notes"),
        results_table=_markdown_table(["evaluator", "AP", "AP50", "AP75"], rows) if rows else "",
        evaluators={DETECTION_EVALUATORS[key]: text for key, text in EVALUATORS.items()},
        protocol_table=_markdown_table(["setting", "value"], protocol_rows) if protocol_rows else "",
        repo_id=repo_id or "path/to/this/model",
    )
    return str(card)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _csv_class_names(path: Path) -> list[str] | None:
    """The class names of a ``per_class_iou.csv`` (`hf_useg.inference.write_evaluation_report`), if any."""
    import csv

    if not path.is_file():
        return None
    with path.open(newline="") as file:
        names = [row["class_name"] for row in csv.DictReader(file) if row.get("class_name")]
    return names or None


def model_card_from_folder(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    dataset_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """The card of a saved model folder: its ``config.json``, and when present ``training_summary.json`` (method,
    backbone, data, protocol), ``eval_results.json`` (the measured numbers) and ``per_class_iou.csv`` (the class
    names) as written by training or ``hf-useg evaluate --output-dir <folder>``, and the confusion-matrix figure
    [`CONFUSION_FIGURE`] (embedded by a relative link, so it is pushed with the card).

    Example:

    ```python
    >>> card = model_card_from_folder("outputs/stego-tiny/model", repo_id="me/stego-tiny")   # doctest: +SKIP
    >>> card.save("outputs/stego-tiny/model/README.md")                                      # doctest: +SKIP
    ```
    """
    from transformers import AutoConfig

    import hf_useg  # noqa: F401  (registers the configs with AutoConfig)

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder: it has no config.json")
    config = AutoConfig.from_pretrained(folder)
    summary = _read_json(folder / "training_summary.json") if (folder / "training_summary.json").is_file() else {}
    spec = method_for_model_type(config.model_type)
    if spec is not None and spec.pipeline_task == "object-detection":
        id2label = getattr(config, "id2label", None) or {}
        card = generate_detection_model_card(
            summary,
            class_names=[str(id2label[key]) for key in sorted(id2label, key=int)],
            repo_id=repo_id,
            dataset_id=dataset_id,
            license=license,
        )
        return ModelCard(card)
    results = _read_json(folder / "eval_results.json") if (folder / "eval_results.json").is_file() else None
    if isinstance(results, dict):
        results.pop("evaluation", None)  # what `hf-useg evaluate` evaluated, beside the result sets
    return generate_model_card(
        config,
        summary=summary,
        results=results,
        class_names=_csv_class_names(folder / "per_class_iou.csv"),
        confusion_figure=CONFUSION_FIGURE if (folder / CONFUSION_FIGURE).is_file() else None,
        repo_id=repo_id,
        dataset_id=dataset_id,
        base_model=base_model,
        license=license,
    )


def _as_card(card: ModelCard | str | os.PathLike) -> ModelCard:
    if isinstance(card, RepoCard):
        return ModelCard(str(card))
    if isinstance(card, os.PathLike) or (isinstance(card, str) and not card.lstrip().startswith("---")):
        path = Path(card)
        if not path.is_file():
            raise ValueError(f"{card!s:.100} is neither a model card (text starting with '---') nor a file")
        return ModelCard(path.read_text())
    if isinstance(card, str):
        return ModelCard(card)
    raise TypeError(f"expected a ModelCard, its text or a README.md path, got {type(card).__name__}")


def validate_model_card(card: ModelCard | str | os.PathLike, pipeline_tag: str = PIPELINE_TAG) -> ModelCardData:
    """Check a model card offline and return its parsed metadata.

    `huggingface_hub` parses the YAML block (an invalid ``model-index`` raises), the metadata must survive a
    write/parse round trip unchanged, and the fields the Hub and the ``image-segmentation`` pipeline rely on must
    be present and well formed: ``pipeline_tag`` (``image-segmentation``; ``object-detection`` for a fine-tuned
    detector's card), ``library_name``, ``license``, Hub ids for ``base_model``/``datasets``, and eval results with
    finite percentages. (``ModelCard.validate()`` asks the
    Hub's own validator and needs the network; uploads with `push_model_folder` go through it.)

    Raises:
        ValueError: naming every problem found.

    Example:

    ```python
    >>> validate_model_card("---\\nlicense: mit\\n---\\n# card")
    Traceback (most recent call last):
    ...
    ValueError: invalid model card: pipeline_tag is None, expected 'image-segmentation'; library_name is missing
    ```
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        parsed = _as_card(card)
    except ValueError as error:
        raise ValueError(f"invalid model card: {error}") from error
    data = parsed.data
    problems = []
    reparsed = ModelCard(str(parsed)).data.to_dict()
    if reparsed != data.to_dict():
        problems.append("the metadata does not survive a write/parse round trip")
    if data.pipeline_tag != pipeline_tag:
        problems.append(f"pipeline_tag is {data.pipeline_tag!r}, expected {pipeline_tag!r}")
    if not data.library_name:
        problems.append("library_name is missing")
    if not data.license:
        problems.append("license is missing")
    for field in ("base_model", "datasets"):
        ids = data.get(field)
        for repo_id in [ids] if isinstance(ids, str) else ids or []:
            try:
                validate_repo_id(repo_id)
            except HFValidationError as error:
                problems.append(f"{field} {repo_id!r} is not a Hub id ({error})")
    for result in data.eval_results or []:
        where = f"eval result {result.metric_name or result.metric_type!r}"
        value = result.metric_value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{where} has a non-numeric value {value!r}")
        elif not 0.0 <= value <= 100.0:
            problems.append(f"{where} = {value} is not a percentage")
        if not result.dataset_type or not result.dataset_name:
            problems.append(f"{where} names no dataset")
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))
    return data


def card_eval_results(card: ModelCard | str | os.PathLike) -> dict[str, dict[str, float]]:
    """The eval results a card carries, as ``{probe: {"accuracy": %, "mean_iou": %}}`` (read from the parsed
    ``model-index``; the probe is the metric's ``config``).

    Example:

    ```python
    >>> card_eval_results(card)                      # doctest: +SKIP
    {'cluster': {'accuracy': 76.32, 'mean_iou': 52.99}, 'linear': {'accuracy': 38.16, 'mean_iou': 15.7}}
    ```
    """
    data = _as_card(card).data
    table: dict[str, dict[str, float]] = {}
    for result in data.eval_results or []:
        probe = result.metric_config or "unknown"
        table.setdefault(probe, {})[result.metric_type] = result.metric_value
    return table
