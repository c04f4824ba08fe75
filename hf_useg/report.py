"""Comparison reports: several segmentation models scored on one split with the shared protocol, written as
``report.md`` / a self-contained ``report.html`` with matplotlib figures and ``results.json`` (issue 15).

* [`evaluate_for_report`] evaluates one model (`hf_useg.inference.evaluate_segmenter`, the numbers
  ``hf-useg evaluate`` prints) and predicts its first example images: a [`ModelReport`].
* [`write_comparison_report`] writes the report of one or more `ModelReport`s.
* The figures on their own: [`plot_per_class_iou`], [`plot_confusion`] (the confusion matrix after matching, whose
  data is [`matched_confusion`] row-normalised), [`plot_examples`]; [`write_confusion_figure`] saves a model's
  confusion figure (beside its weights, for the model card).

matplotlib is imported inside the plotting functions only.

Example:

```python
>>> from hf_useg.report import evaluate_for_report, write_comparison_report          # doctest: +SKIP
>>> reports = [evaluate_for_report(model, val, processor, 27, name=name, class_names=names)
...            for name, model in models.items()]                                         # doctest: +SKIP
>>> write_comparison_report(reports, "outputs/compare", class_names=names,
...                         protocol={"dataset": "cocostuff27", "split": "val"})          # doctest: +SKIP
PosixPath('outputs/compare/report.md')
```
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import backbone_autocast, resolve_autocast_dtype
from .hub.cards import CONFUSION_FIGURE
from .inference import _jsonable, evaluate_segmenter, summarize

__all__ = [
    "CONFUSION_FIGURE",
    "ExampleSet",
    "ModelReport",
    "class_palette",
    "describe_model",
    "evaluate_for_report",
    "evaluation_protocol",
    "matched_confusion",
    "matched_prediction",
    "plot_confusion",
    "plot_examples",
    "plot_per_class_iou",
    "predict_examples",
    "row_normalize",
    "write_comparison_report",
    "write_confusion_figure",
]

# colours of pixels that are no class: predicted clusters left unmatched, and unlabelled ground truth
UNMATCHED_COLOR = (190, 190, 190)
IGNORED_COLOR = (0, 0, 0)
_PROBE_COLUMNS = (
    ("cluster", "cluster"),
    ("linear", "linear"),
    ("cluster_crf", "cluster + CRF"),
    ("linear_crf", "linear + CRF"),
)
_DASH = "–"
_MATCHING_NAMES = {"hungarian": "Hungarian", "majority": "majority-vote", "none": "identity"}


@dataclass
class ExampleSet:
    """A few evaluated images as the model saw them (the protocol's crop), their labels and its predictions.

    Args:
        images: uint8 ``[H, W, 3]`` images (the processed crop, un-normalised).
        labels: int ``[H, W]`` class ids, -1 where unlabelled.
        predictions: int ``[H, W]`` predicted cluster ids (cluster probe, no CRF), one per image.
        indices: the images' indices in the evaluated dataset.

    Example:

    ```python
    >>> import numpy as np
    >>> ExampleSet([np.zeros((4, 4, 3), np.uint8)], [np.zeros((4, 4), int)], [np.ones((4, 4), int)], [0]).indices
    [0]
    ```
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    predictions: list[np.ndarray]
    indices: list[int] = field(default_factory=list)


@dataclass
class ModelReport:
    """One model's row of a comparison report.

    Args:
        name: the model's name in the report (e.g. its folder name).
        method: the method's display name (``"STEGO"``).
        backbone: what the features come from (a Hub id, or e.g. ``"random-vit-tiny (randomly initialised ViT)"``).
        steps: training steps (None when unknown).
        results: `hf_useg.inference.evaluate_segmenter`'s result (``{"cluster": metric dict, "linear": ...}``).
        protocol: how it was evaluated (`evaluation_protocol`).
        examples: its predictions of the first images (`predict_examples`), for the examples grid.
        model_type: ``config.model_type``.

    Example:

    ```python
    >>> report = ModelReport("km", "DINO-feature k-means", "facebook/dino-vits8", 0,
    ...                      {"cluster": {"accuracy": 0.5, "mean_iou": 0.25}}, {"resolution": 320})
    >>> report.summary()
    {'cluster_accuracy': 0.5, 'cluster_mean_iou': 0.25}
    ```
    """

    name: str
    method: str
    backbone: str
    steps: int | None
    results: dict[str, dict[str, Any]]
    protocol: dict[str, Any]
    examples: ExampleSet | None = None
    model_type: str | None = None

    def summary(self) -> dict[str, float]:
        """The headline numbers (`hf_useg.inference.summarize`: ``cluster_accuracy``, ``cluster_mean_iou``, ...)."""
        return summarize(self.results)


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _read_summary(model_path: str | os.PathLike | None) -> dict[str, Any]:
    """``training_summary.json`` of a local model folder (or of a Hub model already in the cache), else {}."""
    if model_path is None:
        return {}
    path = Path(model_path).expanduser()
    if path.is_dir():
        file = path / "training_summary.json"
        return json.loads(file.read_text()) if file.is_file() else {}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model_path), "training_summary.json")
    except Exception:  # not a Hub id: nothing to read
        return {}
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else {}


def describe_model(
    model, model_path: str | os.PathLike | None = None, summary: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``{"method", "model_type", "backbone", "steps"}`` of a model (or config): the method's display name from the
    registry, the backbone and steps from the training summary (``summary``, else ``training_summary.json`` of
    ``model_path``), the backbone otherwise from ``config.backbone_name``.

    Example:

    ```python
    >>> from hf_useg import DinoSegmentationConfig
    >>> describe_model(DinoSegmentationConfig(backbone_name="facebook/dino-vits8"))["method"]
    'DINO-feature k-means'
    ```
    """
    from .registry import method_for_model_type

    config = getattr(model, "config", model)
    summary = dict(summary) if summary is not None else _read_summary(model_path)
    spec = method_for_model_type(config.model_type)
    backbone = summary.get("backbone") or getattr(config, "backbone_name", None)
    if not backbone:
        backbone_config = getattr(config, "backbone_config", None)
        kind = getattr(backbone_config, "model_type", None) or "backbone"
        backbone = f"unnamed {kind} (random or local weights)"
    steps = summary.get("steps")
    return {
        "method": spec.display_name if spec is not None else config.model_type,
        "model_type": config.model_type,
        "backbone": str(backbone),
        "steps": int(steps) if isinstance(steps, (int, float)) else None,
    }


def model_display_name(model_path: str | os.PathLike) -> str:
    """A short name for a model folder or Hub id: a folder's name, with its run's for training's ``model`` and
    ``best`` folders (``runs/stego/model`` -> ``stego/model``); a Hub id (``owner/name`` that is no local folder)
    as it is.

    Example:

    ```python
    >>> model_display_name("outputs/stego-camvid/model"), model_display_name("./km"), model_display_name("me/km")
    ('stego-camvid/model', 'km', 'me/km')
    ```
    """
    text = str(model_path)
    path = Path(text.rstrip("/\\"))
    if not path.exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return text  # a Hub id
    if path.name in {"model", "best"} and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(model_path)


def evaluation_protocol(
    image_processor, *, flip_tta: bool, crf: bool, matching: str, num_images: int
) -> dict[str, Any]:
    """The protocol settings of an evaluation: ``resolution`` (the crop side), ``crop``, ``flip_tta``, ``crf``,
    ``matching`` and ``images``.

    Example:

    ```python
    >>> from hf_useg.image_processing import protocol_image_processor
    >>> evaluation_protocol(protocol_image_processor(320), flip_tta=True, crf=False, matching="hungarian",
    ...                     num_images=500)["resolution"]
    320
    ```
    """
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    if crop:
        resolution: Any = (
            int(crop["height"]) if crop["height"] == crop["width"] else f"{crop['height']}x{crop['width']}"
        )
    else:
        size = getattr(image_processor, "size", None) or {}
        resolution = size.get("shortest_edge", "native")
    return {
        "resolution": resolution,
        "crop": "center" if crop else "none (whole image)",
        "flip_tta": bool(flip_tta),
        "crf": bool(crf),
        "matching": matching,
        "images": int(num_images),
    }


def _unnormalize(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """``[3, H, W]`` processed pixel values back to the uint8 ``[H, W, 3]`` crop they were made from."""
    image = pixel_values.detach().float().cpu().numpy().transpose(1, 2, 0)
    if getattr(image_processor, "do_normalize", False):
        image = image * np.asarray(image_processor.image_std, np.float32) + np.asarray(
            image_processor.image_mean, np.float32
        )
    if getattr(image_processor, "do_rescale", False):
        image = image / float(image_processor.rescale_factor)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


@torch.no_grad()
def predict_examples(
    model,
    dataset,
    image_processor,
    num_classes: int,
    *,
    num_examples: int = 4,
    indices: Sequence[int] | None = None,
    flip_tta: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
) -> ExampleSet:
    """The model's cluster predictions of a few images, made exactly as `evaluate_segmenter` makes them (same
    processing, ``model.predict`` with ``flip_tta``, the backbone under the same autocast ``dtype``, no CRF, at the
    label's size).

    Args:
        indices: which images of ``dataset`` (default: ``num_examples`` spread evenly over it, first and last
            included — consecutive images of a video split are near duplicates).

    Example:

    ```python
    >>> examples = predict_examples(model, val, processor, 27, num_examples=3)     # doctest: +SKIP
    >>> len(examples.predictions)                                                  # doctest: +SKIP
    3
    ```
    """
    from .data.processing import ProcessedSegmentationDataset, collate_segmentation_batch

    if indices is None:
        indices = np.unique(np.linspace(0, len(dataset) - 1, min(num_examples, len(dataset))).round())
    indices = [int(index) for index in indices]
    examples = ExampleSet([], [], [], indices)
    if not indices:
        return examples
    items = ProcessedSegmentationDataset(dataset.select(indices), image_processor, num_classes, with_labels=True)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast_dtype = resolve_autocast_dtype(dtype, device)
    for start in range(0, len(items), batch_size):
        batch = collate_segmentation_batch([items[i] for i in range(start, min(start + batch_size, len(items)))])
        labels = batch["labels"]
        with backbone_autocast(autocast_dtype or torch.float32):
            prediction = model.predict(
                batch["pixel_values"].to(device), output_size=tuple(labels.shape[-2:]), flip_tta=flip_tta, crf=False
            )
        clusters = prediction.cluster_log_probs.argmax(1).cpu().numpy()
        for pixels, label, cluster_map in zip(batch["pixel_values"], labels.numpy(), clusters):
            examples.images.append(_unnormalize(pixels, image_processor))
            examples.labels.append(label.astype(np.int64))
            examples.predictions.append(cluster_map.astype(np.int64))
    return examples


def evaluate_for_report(
    model,
    dataset,
    image_processor,
    num_classes: int,
    *,
    name: str | None = None,
    model_path: str | os.PathLike | None = None,
    summary: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    flip_tta: bool = True,
    crf: bool = False,
    crf_workers: int = 0,
    crf_backend: str = "pydensecrf",
    matching: str = "hungarian",
    max_images: int | None = None,
    num_examples: int = 4,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    progress: bool = False,
) -> ModelReport:
    """Evaluate a model for a comparison report: `evaluate_segmenter` with the given protocol (the same numbers as
    ``hf-useg evaluate``), the predictions of ``num_examples`` images spread over the dataset
    (`predict_examples`) and the model's description (`describe_model`; ``model_path`` is its folder or Hub id,
    also its default ``name``).

    Example:

    ```python
    >>> report = evaluate_for_report(model, val, processor, 27, model_path="outputs/stego/model")  # doctest: +SKIP
    >>> report.summary()["cluster_mean_iou"]                                                          # doctest: +SKIP
    0.2853
    ```
    """
    results = evaluate_segmenter(
        model,
        dataset,
        image_processor,
        num_classes,
        batch_size=batch_size,
        flip_tta=flip_tta,
        crf=crf,
        crf_workers=crf_workers,
        crf_backend=crf_backend,
        matching=matching,
        max_images=max_images,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    num_images = len(dataset) if max_images is None else min(max_images, len(dataset))
    examples = predict_examples(
        model,
        dataset,
        image_processor,
        num_classes,
        num_examples=min(num_examples, num_images),
        flip_tta=flip_tta,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    description = describe_model(model, model_path, summary)
    if name is None:
        name = model_display_name(model_path) if model_path is not None else description["method"]
    return ModelReport(
        name=name,
        method=description["method"],
        backbone=description["backbone"],
        steps=description["steps"],
        results=results,
        protocol=evaluation_protocol(
            image_processor, flip_tta=flip_tta, crf=crf, matching=matching, num_images=num_images
        ),
        examples=examples,
        model_type=description["model_type"],
    )


# ----------------------------------------------------------------------------------------------------------------
# matched confusion and colours


def matched_confusion(
    confusion: Any, assignment: Any, num_classes: int | None = None, *, include_unmatched: bool = False
) -> np.ndarray:
    """The confusion matrix after matching: ``out[t, p]`` = pixels of ground-truth class ``t`` predicted as a
    cluster matched to class ``p`` (the metric's ``[num_clusters, num_classes]`` matrix summed over the clusters of
    each matched class and transposed). With ``include_unmatched`` a last column counts the pixels of clusters
    matched to no class, so each row sums to the class's pixels and the diagonal over the row is the class's
    accuracy.

    Example:

    ```python
    >>> matched_confusion([[0, 4], [3, 1], [2, 0]], [1, 0, -1], include_unmatched=True).tolist()
    [[3, 0, 2], [1, 4, 0]]
    ```
    """
    matrix = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.int64)
    assignment = np.asarray(assignment.cpu() if isinstance(assignment, torch.Tensor) else assignment, dtype=np.int64)
    num_clusters, classes = matrix.shape
    num_classes = classes if num_classes is None else int(num_classes)
    if classes != num_classes or assignment.shape != (num_clusters,):
        raise ValueError(
            f"confusion {matrix.shape} and assignment {assignment.shape} do not fit {num_classes} classes: expected "
            f"[num_clusters, {num_classes}] and [num_clusters]"
        )
    out = np.zeros((num_classes, num_classes + int(include_unmatched)), dtype=np.int64)
    matched = assignment >= 0
    np.add.at(out.T, assignment[matched], matrix[matched])
    if include_unmatched:
        out[:, -1] = matrix[~matched].sum(axis=0)
    return out


def row_normalize(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (float64); rows that sum to 0 become NaN.

    Example:

    ```python
    >>> row_normalize(np.array([[1, 3], [0, 0]])).tolist()
    [[0.25, 0.75], [nan, nan]]
    ```
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    sums = matrix.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums > 0, matrix / sums, np.nan)


def class_palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 class colours (`hf_useg.visualization.color_palette`), kept apart from the
    grey of unmatched clusters and the black of unlabelled pixels."""
    from .visualization import color_palette

    palette = color_palette(num_classes)
    for reserved in (UNMATCHED_COLOR, IGNORED_COLOR, (128, 128, 128)):
        clash = np.all(palette == np.asarray(reserved, np.uint8), axis=1)
        palette[clash] = (palette[clash].astype(np.int64) + (60, 20, 100)) % 256
    return palette


def matched_prediction(clusters: np.ndarray, assignment: Any) -> np.ndarray:
    """Predicted cluster ids -> the class each cluster was matched to (-1 for clusters matched to none).

    Example:

    ```python
    >>> matched_prediction(np.array([[0, 1, 2]]), [1, -1, 0]).tolist()
    [[1, -1, 0]]
    ```
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    classes = np.full(clusters.shape, -1, dtype=np.int64)
    known = (clusters >= 0) & (clusters < len(assignment))
    classes[known] = assignment[clusters[known]]
    return classes


def _paint(class_map: np.ndarray, palette: np.ndarray, fill) -> np.ndarray:
    class_map = np.asarray(class_map)
    image = np.empty((*class_map.shape, 3), dtype=np.uint8)
    image[:] = np.asarray(fill, np.uint8)
    valid = (class_map >= 0) & (class_map < len(palette))
    image[valid] = palette[class_map[valid]]
    return image


def _metric(results: Mapping[str, Any], probe: str) -> Mapping[str, Any]:
    """A metric dict from `evaluate_segmenter`'s result (or the metric dict itself)."""
    if "confusion_matrix" in results:
        return results
    if probe not in results:
        raise ValueError(f"no {probe!r} results (have {sorted(results)})")
    return results[probe]


# ----------------------------------------------------------------------------------------------------------------
# figures


_DPI = 110


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        # the first draw's constrained layout can leave rotated tick labels' axis label outside the figure; a
        # second pass settles it
        figure.draw_without_rendering()
        figure.savefig(path, dpi=_DPI)


# rough text extents at the figures' 9-point font, in inches (sizes the figures so that no label is cut or overlaps)
_CHAR_WIDTH = 0.075
_LINE_HEIGHT = 0.17


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(str(text), max(width, 8), break_on_hyphens=True)) or str(text)


def plot_per_class_iou(
    per_class_iou: Mapping[str, Sequence[float]],
    class_names: Sequence[str],
    path: str | os.PathLike | None = None,
    *,
    title: str = "Per-class IoU of the cluster probe (clusters matched to classes)",
):
    """Grouped bars of per-class IoU in percent: classes along x (names rotated when they would not fit), one bar
    per model, a legend of the models above the plot.

    ``per_class_iou``: model name -> ``[num_classes]`` IoU fractions (NaN: the class is in neither the labels nor
    the predictions; no bar). Returns the `matplotlib.figure.Figure`, also saved to ``path`` when given.

    Example:

    ```python
    >>> figure = plot_per_class_iou({"a": [0.5, 0.25], "b": [1.0, 0.0]}, ["road", "sky"])
    >>> [float(bar.get_height()) for bar in figure.axes[0].patches]
    [50.0, 25.0, 100.0, 0.0]
    ```
    """
    names = list(per_class_iou)
    num_classes = len(class_names)
    labels = [str(name) for name in class_names]
    longest = max((len(label) for label in labels), default=1)
    # inches per class: room for the bars, within a page-wide figure for many classes
    group = min(max(0.4, 0.16 * len(names) + 0.12), max(0.25, 14.4 / max(num_classes, 1)))
    width = max(6.0, num_classes * group + 1.6)
    rotate = longest * _CHAR_WIDTH > 0.9 * (width - 1.6) / max(num_classes, 1)
    legend_names = [_wrap(name, 40) for name in names]
    columns = max(1, min(len(names), int(width // (0.5 + _CHAR_WIDTH * max(len(n) for n in names)))))
    legend_height = _LINE_HEIGHT * (1 + -(-len(names) // columns) * max(n.count("\n") + 1 for n in legend_names))
    label_height = (0.72 * longest * _CHAR_WIDTH) if rotate else _LINE_HEIGHT
    figure = _new_figure(width, 3.6 + label_height + legend_height)
    axes = figure.add_subplot()
    bar_width = 0.8 / max(len(names), 1)
    positions = np.arange(num_classes)
    for index, name in enumerate(names):
        values = 100.0 * np.asarray(per_class_iou[name], dtype=np.float64)
        if values.shape != (num_classes,):
            raise ValueError(f"{name}: {values.shape[0]} IoU values for {num_classes} classes")
        offset = (index - (len(names) - 1) / 2) * bar_width
        axes.bar(positions + offset, np.nan_to_num(values), bar_width, label=legend_names[index])
    axes.set_xticks(
        positions, labels, rotation=45 if rotate else 0, ha="right" if rotate else "center", rotation_mode="anchor"
    )
    axes.tick_params(axis="x", labelsize=9)
    axes.set(xlabel="ground-truth class", ylabel="IoU (%)", ylim=(0, 100), xlim=(-0.6, num_classes - 0.4))
    axes.grid(axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", ncol=columns, fontsize=8, frameon=False, title="model", title_fontsize=8)
    figure.suptitle(_wrap(title, int(width / _CHAR_WIDTH / 1.2)), fontsize=11)
    _save(figure, path)
    return figure


def plot_confusion(
    confusion: Any,
    assignment: Any,
    class_names: Sequence[str],
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    matching: str = "hungarian",
):
    """The confusion matrix after matching, row-normalised: rows = ground-truth class, columns = the class each
    predicted cluster was matched to (plus an "unmatched clusters" column when some cluster has no class), class
    names on both axes and a colour bar. The image's data is
    ``row_normalize(matched_confusion(confusion, assignment, include_unmatched=...))``; cells are annotated in
    percent for up to 15 classes. Returns the `matplotlib.figure.Figure` (saved to ``path`` when given).

    Example:

    ```python
    >>> figure = plot_confusion([[0, 4], [3, 1]], [1, 0], ["road", "sky"])
    >>> figure.axes[0].images[0].get_array().tolist()
    [[1.0, 0.0], [0.2, 0.8]]
    ```
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    num_classes = len(class_names)
    unmatched = bool((assignment < 0).any())
    data = row_normalize(matched_confusion(confusion, assignment, num_classes, include_unmatched=unmatched))
    rows = [str(name) for name in class_names]
    columns = rows + (["(unmatched clusters)"] if unmatched else [])
    annotate = num_classes <= 15
    cell = 0.5 if annotate else 0.3
    longest = max(len(name) for name in columns)
    width = max(5.5, len(columns) * cell + longest * _CHAR_WIDTH + 2.2)
    height = max(4.5, len(rows) * cell + 0.72 * longest * _CHAR_WIDTH + 1.6)
    figure = _new_figure(width, height)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(data), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_xticks(np.arange(len(columns)), columns, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    axes.set_yticks(np.arange(len(rows)), rows, fontsize=9)
    axes.set_xlabel("predicted: the class its cluster was matched to")
    axes.set_ylabel("ground-truth class")
    if annotate:
        for (row, column), value in np.ndenumerate(data):
            if np.isfinite(value):
                axes.text(
                    column,
                    row,
                    f"{100 * value:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8 if num_classes <= 10 else 6,
                    color="white" if value > 0.55 else "black",
                )
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label("share of the class's pixels")
    heading = (
        f"Confusion after {_MATCHING_NAMES.get(matching, matching)} matching, row-normalised (percent in the "
        "cells). Rows: ground-truth "
        "class; columns: the class each predicted cluster was matched to."
    )
    characters = int(width / 0.1)  # what fits on a line at the suptitle's 11 pt (about 0.1 inch a character)
    lines = ([_wrap(title, characters)] if title else []) + [_wrap(heading, int(characters * 1.3))]
    figure.suptitle(lines[0], fontsize=11)
    if len(lines) > 1:
        axes.set_title(lines[1], fontsize=8)
    _save(figure, path)
    return figure


def write_confusion_figure(
    results: Mapping[str, Any],
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    probe: str = "cluster",
    title: str | None = None,
    matching: str = "hungarian",
) -> Path:
    """Save the `plot_confusion` figure of an evaluation to ``path`` (e.g. ``<model folder>/confusion_matrix.png``,
    which `hf_useg.hub.generate_model_card` embeds). ``results``: `evaluate_segmenter`'s result (``probe`` picks
    the entry) or one metric dict, numpy or JSON lists (``eval_results.json``).

    Example:

    ```python
    >>> write_confusion_figure(evaluation.results, class_names, model_dir / "confusion_matrix.png")  # doctest: +SKIP
    ```
    """
    metric = _metric(results, probe)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_confusion(metric["confusion_matrix"], metric["assignment"], class_names, path, title=title, matching=matching)
    return path


def plot_examples(
    examples: ExampleSet,
    predictions: Mapping[str, Sequence[np.ndarray]],
    assignments: Mapping[str, Any],
    class_names: Sequence[str],
    path: str | os.PathLike | None = None,
):
    """A grid of N images x (image | ground truth | each model's prediction), every segmentation in ONE class
    palette: a predicted cluster takes the colour of the class it was matched to (``assignments[model]``,
    Hungarian), clusters matched to none are grey, unlabelled ground truth black; no blending. One legend names
    the classes. Returns the `matplotlib.figure.Figure` (saved to ``path`` when given).

    Args:
        examples: the images and labels (its ``predictions`` are not used: pass them in ``predictions``).
        predictions: model name -> its ``[H, W]`` cluster maps of the same images (any size; each panel is drawn
            over the image's extent).
        assignments: model name -> its ``[num_clusters]`` cluster -> class map (-1: none).

    Example:

    ```python
    >>> import numpy as np
    >>> examples = ExampleSet([np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8), int)], [])
    >>> figure = plot_examples(examples, {"m": [np.ones((8, 8), int)]}, {"m": [-1, 0]}, ["road"])
    >>> len(figure.axes)
    3
    ```
    """
    from matplotlib.patches import Patch

    names = list(predictions)
    num_rows, num_columns = len(examples.images), 2 + len(names)
    if num_rows == 0:
        raise ValueError("no example images to draw")
    for name in names:
        if len(predictions[name]) != num_rows:
            raise ValueError(f"{name}: {len(predictions[name])} predictions for {num_rows} images")
    palette = class_palette(len(class_names))
    height, width = examples.images[0].shape[:2]
    panel = 2.2
    legend_rows = -(-(len(class_names) + 2) // max(1, min(num_columns * 2, 6)))
    figure = _new_figure(panel * num_columns, panel * height / max(width, 1) * num_rows + 0.6 + 0.25 * legend_rows)
    grid = figure.subplots(num_rows, num_columns, squeeze=False)
    titles = ["image", "ground truth", *names]
    for row in range(num_rows):
        extent = (0, examples.images[row].shape[1], examples.images[row].shape[0], 0)
        panels = [
            examples.images[row],
            _paint(examples.labels[row], palette, IGNORED_COLOR),
            *(
                _paint(matched_prediction(predictions[name][row], assignments[name]), palette, UNMATCHED_COLOR)
                for name in names
            ),
        ]
        for column, picture in enumerate(panels):
            axes = grid[row, column]
            axes.imshow(picture, extent=extent, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title("\n".join(textwrap.wrap(titles[column], 22)) or titles[column], fontsize=9)
            if column == 0:
                index = examples.indices[row] if row < len(examples.indices) else row
                axes.set_ylabel(f"image {index}", fontsize=8)
    handles = [
        Patch(facecolor=palette[i] / 255.0, edgecolor="black", linewidth=0.5, label=str(name))
        for i, name in enumerate(class_names)
    ]
    if any((np.asarray(assignment) < 0).any() for assignment in assignments.values()):
        handles.append(
            Patch(
                facecolor=np.asarray(UNMATCHED_COLOR) / 255.0,
                edgecolor="black",
                linewidth=0.5,
                label="(cluster matched to no class)",
            )
        )
    if any((label < 0).any() for label in examples.labels):
        handles.append(
            Patch(facecolor=np.asarray(IGNORED_COLOR) / 255.0, edgecolor="black", linewidth=0.5, label="(unlabelled)")
        )
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncol=max(1, min(num_columns * 2, 6, len(handles))),
        fontsize=8,
        frameon=False,
    )
    _save(figure, path)
    return figure


# ----------------------------------------------------------------------------------------------------------------
# the report


def _percent(value: Any) -> str:
    number = float(value) if value is not None else float("nan")
    return f"{100 * number:.2f}" if np.isfinite(number) else _DASH


def _file_slug(name: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    candidate, number = slug, 2
    while candidate in taken:
        candidate, number = f"{slug}_{number}", number + 1
    taken.add(candidate)
    return candidate


def _unique_names(reports: Sequence[ModelReport]) -> list[str]:
    names, seen = [], {}
    for report in reports:
        seen[report.name] = seen.get(report.name, 0) + 1
        names.append(report.name if seen[report.name] == 1 else f"{report.name} ({seen[report.name]})")
    return names


def _merged_protocol(reports: Sequence[ModelReport], protocol: Mapping[str, Any] | None, names: list[str]) -> dict:
    """The shared protocol: the caller's entries, then each per-model setting (one value, or one per model when
    they differ)."""
    merged: dict[str, Any] = dict(protocol or {})
    keys: list[str] = []
    for report in reports:
        keys += [key for key in report.protocol if key not in keys]
    for key in keys:
        if key in merged:
            continue
        values = [report.protocol.get(key) for report in reports]
        if all(value == values[0] for value in values):
            merged[key] = values[0]
        else:
            merged[key] = "; ".join(f"{name}: {_protocol_value(value)}" for name, value in zip(names, values))
    return merged


_PROTOCOL_LABELS = {
    "dataset": "dataset",
    "split": "split",
    "images": "images evaluated",
    "resolution": "resolution (crop side, px)",
    "crop": "crop",
    "flip_tta": "horizontal-flip TTA",
    "crf": "dense CRF",
    "matching": "cluster-to-class matching (cluster probe)",
}


def _protocol_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _DASH if value is None else str(value)


class _Document:
    """Blocks rendered both as Markdown and as self-contained HTML, so the two carry the same content."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(header), [[str(cell) for cell in row] for row in rows]))

    def figure(self, file_name: str, caption: str) -> None:
        self.blocks.append(("figure", file_name, caption))

    def markdown(self) -> str:
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                parts.append("#" * block[1] + " " + block[2])
            elif kind == "paragraph":
                parts.append(block[1])
            elif kind == "table":
                escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
                lines = ["| " + " | ".join(escape(cell) for cell in block[1]) + " |"]
                lines.append("|" + "|".join("---" for _ in block[1]) + "|")
                lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in block[2]]
                parts.append("\n".join(lines))
            else:
                parts.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                text = html.escape(block[1])
                text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
                body.append(f"<p>{text}</p>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(cell)}</th>" for cell in block[1])
                rows = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in block[2]
                )
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            else:
                data = base64.b64encode((self.folder / block[1]).read_bytes()).decode("ascii")
                caption = html.escape(block[2])
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "color:#222;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.92em}"
    "th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left}"
    "td:not(:first-child){font-variant-numeric:tabular-nums}"
    "th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}"
    "figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #eee}"
    "figcaption{color:#555;font-size:0.9em}code{background:#f3f3f3;padding:0 0.2em}"
)


def write_comparison_report(
    reports: Sequence[ModelReport],
    output_dir: str | os.PathLike,
    *,
    class_names: Sequence[str],
    protocol: Mapping[str, Any] | None = None,
    examples: ExampleSet | None = None,
    title: str | None = None,
) -> Path:
    """Write the comparison report of ``reports`` (one or more models evaluated on the same split) into
    ``output_dir``: ``report.md``, ``report.html`` (self-contained: figures inlined as data URIs),
    ``per_class_iou.png``, ``confusion_<model>.png`` per model, ``examples.png`` (when there are example
    predictions) and ``results.json`` (every number). Returns the path of ``report.md``.

    Args:
        class_names: the dataset's ``num_classes`` class names.
        protocol: what every model was evaluated on, e.g. ``{"dataset": ..., "split": ...}``; each report's own
            protocol settings (resolution, flip TTA, CRF, matching, images) are added (listed per model when they
            differ).
        examples: the images and labels of the examples grid (default: the first report's); each model's
            predictions come from its own ``examples``.

    Example:

    ```python
    >>> path = write_comparison_report(reports, "outputs/compare", class_names=names,
    ...                                protocol={"dataset": "camvid", "split": "val"})   # doctest: +SKIP
    ```
    """
    if not reports:
        raise ValueError("no models to report")
    class_names = [str(name) for name in class_names]
    num_classes = len(class_names)
    for report in reports:
        if "cluster" not in report.results:
            raise ValueError(f"{report.name}: the results have no 'cluster' entry (evaluate_segmenter's)")
        if len(report.results["cluster"]["per_class_iou"]) != num_classes:
            raise ValueError(
                f"{report.name}: {len(report.results['cluster']['per_class_iou'])} classes evaluated, "
                f"{num_classes} class names"
            )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names(reports)
    merged_protocol = _merged_protocol(reports, protocol, names)
    where = " ".join(str(merged_protocol[key]) for key in ("dataset", "split") if merged_protocol.get(key))
    title = title or (f"Comparison of {len(reports)} models" if len(reports) > 1 else f"Evaluation of {names[0]}")
    if where:
        title += f" on {where}"

    # figures
    figures: dict[str, Any] = {"per_class_iou": "per_class_iou.png", "confusion": {}}
    plot_per_class_iou(
        {name: report.results["cluster"]["per_class_iou"] for name, report in zip(names, reports)},
        class_names,
        output_dir / "per_class_iou.png",
    )
    taken: set[str] = set()
    matched: dict[str, dict[str, list]] = {}
    for name, report in zip(names, reports):
        file_name = f"confusion_{_file_slug(name, taken)}.png"
        write_confusion_figure(
            report.results,
            class_names,
            output_dir / file_name,
            title=name,
            matching=str(report.protocol.get("matching", "hungarian")),
        )
        figures["confusion"][name] = file_name
        matched[name] = {
            probe: matched_confusion(
                values["confusion_matrix"], values["assignment"], num_classes, include_unmatched=True
            ).tolist()
            for probe, values in report.results.items()
            if "confusion_matrix" in values and "assignment" in values
        }
    shown = [(name, report) for name, report in zip(names, reports) if report.examples and report.examples.predictions]
    if examples is None and shown:
        examples = shown[0][1].examples
    if examples is not None and examples.images and shown:
        count = min(len(examples.images), *(len(report.examples.predictions) for _, report in shown))
        grid = ExampleSet(examples.images[:count], examples.labels[:count], [], list(examples.indices[:count]))
        plot_examples(
            grid,
            {name: report.examples.predictions[:count] for name, report in shown},
            {name: report.results["cluster"]["assignment"] for name, report in shown},
            class_names,
            output_dir / "examples.png",
        )
        figures["examples"] = "examples.png"

    # the document
    document = _Document(output_dir)
    document.heading(1, title)
    probes = [(key, label) for key, label in _PROBE_COLUMNS if any(key in report.results for report in reports)]
    header = ["model", "method", "backbone", "steps"]
    for _, label in probes:
        header += [f"{label} acc (%)", f"{label} mIoU (%)"]
    rows = []
    for name, report in zip(names, reports):
        row = [name, report.method, report.backbone, _DASH if report.steps is None else report.steps]
        for key, _ in probes:
            values = report.results.get(key)
            row += [_percent(values["accuracy"]), _percent(values["mean_iou"])] if values else [_DASH, _DASH]
        rows.append(row)
    document.heading(2, "Results")
    document.table(header, rows)
    matching = str(merged_protocol.get("matching", "hungarian"))
    document.paragraph(
        "Pixel accuracy and mean IoU in percent. Cluster probe: the predicted clusters are matched one-to-one to "
        f"the classes ({_MATCHING_NAMES.get(matching, matching)} matching, fitted on the evaluated images "
        "themselves), no labels used in training. Linear probe: a linear layer trained with labels (supervised); "
        f"{_DASH} where the model has none."
    )
    document.heading(2, "Per-class IoU (cluster probe, %)")
    class_rows = [
        [class_name, *(_percent(report.results["cluster"]["per_class_iou"][index]) for report in reports)]
        for index, class_name in enumerate(class_names)
    ]
    class_rows.append(["mean (mIoU)", *(_percent(report.results["cluster"]["mean_iou"]) for report in reports)])
    document.table(["class", *names], class_rows)
    document.paragraph(f"{_DASH}: the class is in neither the labels nor the matched predictions (IoU undefined).")
    document.figure(figures["per_class_iou"], "Per-class IoU of the cluster probe, one bar per model")
    document.heading(2, "Confusion matrices after matching")
    document.paragraph(
        "Rows: ground-truth class; columns: the class each predicted cluster was matched to (clusters matched to "
        "no class in the last column); each row divided by the class's pixels, so the diagonal is the per-class "
        "accuracy."
    )
    for name in names:
        document.heading(3, name)
        document.figure(figures["confusion"][name], f"Confusion matrix of {name} after matching (row-normalised)")
    if "examples" in figures:
        document.heading(2, "Examples")
        document.paragraph(
            "Image, ground truth and each model's cluster-probe prediction (flip TTA as in the protocol, no CRF), "
            "every predicted cluster drawn in the colour of the class it was matched to; grey: a cluster matched "
            "to no class; black: unlabelled pixels."
        )
        document.figure(figures["examples"], "Examples: image | ground truth | each model's prediction")
    document.heading(2, "Evaluation protocol")
    protocol_rows = [
        (_PROTOCOL_LABELS.get(key, key), _protocol_value(value)) for key, value in merged_protocol.items()
    ]
    document.table(["setting", "value"], protocol_rows)
    document.paragraph("Generated by `hf_useg.report.write_comparison_report`; every number is in `results.json`.")

    record = {
        "title": title,
        "class_names": class_names,
        "protocol": merged_protocol,
        "figures": figures,
        "models": [
            {
                "name": name,
                "method": report.method,
                "model_type": report.model_type,
                "backbone": report.backbone,
                "steps": report.steps,
                "protocol": report.protocol,
                "summary": report.summary(),
                "results": report.results,
                "matched_confusion": matched[name],
                "example_indices": list(report.examples.indices) if report.examples else [],
            }
            for name, report in zip(names, reports)
        ],
    }
    (output_dir / "results.json").write_text(json.dumps(_jsonable(record), indent=2))
    path = output_dir / "report.md"
    path.write_text(document.markdown())
    (output_dir / "report.html").write_text(document.html(title))
    return path
