"""Score any `*ForUnsupervisedSegmentation` model on a labelled dataset with the shared protocol (METHODS 0.3):
`predict` (flip TTA, optional CRF) -> argmax -> dataset-wide confusion matrices -> Hungarian (cluster probe)
and identity (linear probe) matching.

On a GPU the evaluation runs at the hardware's pace: batches are decoded by DataLoader workers into pinned memory
and copied without blocking, the frozen backbone runs under bf16 autocast with SDPA attention (``dtype="auto"``),
and the confusion matrices are accumulated on the device."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .backbones import backbone_autocast, resolve_autocast_dtype
from .data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from .evaluation import UnsupervisedSegmentationMetric

__all__ = ["evaluate_segmenter", "evaluation_loader", "process_share", "write_evaluation_report"]


def process_share(items, accelerator=None):
    """This process's share of ``items`` for evaluation: process ``r`` of ``P`` takes items ``r, r + P, ...``,
    with no padding duplicates (unlike ``accelerator.prepare_data_loader``), so confusion matrices summed over
    processes count every item once. ``items`` itself without an accelerator or with one process.

    Example:

    ```python
    >>> from types import SimpleNamespace
    >>> second_of_two = SimpleNamespace(num_processes=2, process_index=1)
    >>> list(process_share(list("abcde"), second_of_two))
    ['b', 'd']
    ```
    """
    if accelerator is None or accelerator.num_processes == 1:
        return items
    shard = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    if not shard:
        raise ValueError(f"{len(items)} evaluation images for {accelerator.num_processes} processes")
    return Subset(items, shard)


def evaluation_loader(
    dataset,
    image_processor,
    num_classes: int,
    *,
    batch_size: int = 8,
    max_images: int | None = None,
    num_workers: int = 0,
    accelerator=None,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of this process's labelled evaluation images (the first ``max_images`` of ``dataset``, processed by
    ``image_processor``, split over processes by [`process_share`]), in order.

    ``num_workers`` processes decode and process images while the model runs (kept alive for the loader's
    lifetime); ``pin_memory`` puts batches in page-locked memory, for non-blocking copies to a GPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be at least 0, got {num_workers}")
    if max_images is not None:
        dataset = dataset.select(range(min(max_images, len(dataset))))
    items = ProcessedSegmentationDataset(dataset, image_processor, num_classes=num_classes, with_labels=True)
    return DataLoader(
        process_share(items, accelerator),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_segmentation_batch,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


@torch.no_grad()
def evaluate_segmenter(
    model,
    dataset,
    image_processor,
    num_classes: int,
    *,
    batch_size: int = 8,
    flip_tta: bool = True,
    crf: bool = False,
    crf_workers: int = 0,
    crf_backend: str = "pydensecrf",
    matching: str = "hungarian",
    max_images: int | None = None,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    progress: bool = True,
    accelerator=None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on ``dataset`` (a `datasets.Dataset` with image and label columns).

    Returns ``{"cluster": metric_dict, "linear": metric_dict (when the model has a linear probe)}`` plus
    ``"*_crf"`` entries with ``crf=True``; each metric dict is `UnsupervisedSegmentationMetric.compute()`'s.
    With an ``accelerator`` the images are split over processes (process ``r`` takes images ``r, r + P, ...``)
    and the confusion matrices summed.

    Args:
        batch_size: images per `predict` call (the confusion counts do not depend on it, up to float rounding).
        num_workers: DataLoader processes that decode and process the next batches while the model runs.
        device: where the model runs (default: where its parameters are; the accelerator's with one).
        dtype: the autocast dtype of the frozen backbone: ``"auto"`` (default: bfloat16 on a GPU, float32 on the
            CPU), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a `torch.dtype` (see
            `hf_useg.backbones.resolve_autocast_dtype`); heads, probes and the metric stay in float32.

    Example:

    ```python
    >>> results = evaluate_segmenter(model, val, processor, 27, batch_size=32, num_workers=8)  # doctest: +SKIP
    >>> results["cluster"]["mean_iou"]                                                        # doctest: +SKIP
    0.2853
    ```
    """
    if accelerator is not None:
        device = accelerator.device
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast_dtype = resolve_autocast_dtype(dtype, device)
    loader = evaluation_loader(
        dataset,
        image_processor,
        num_classes,
        batch_size=batch_size,
        max_images=max_images,
        num_workers=num_workers,
        accelerator=accelerator,
        pin_memory=device.type == "cuda",
    )
    model = model.to(device)
    metrics: dict[str, UnsupervisedSegmentationMetric] = {}

    def metric(name: str, clusters: int, how: str) -> UnsupervisedSegmentationMetric:
        if name not in metrics:
            metrics[name] = UnsupervisedSegmentationMetric(
                num_classes=num_classes, num_clusters=clusters, matching=how, device=device
            )
        return metrics[name]

    for batch in tqdm(loader, desc="evaluate", disable=not progress):
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        # the autocast setting reaches the backbone through a context (not a `predict` argument), so models whose
        # `predict` override does not forward it (IIC's head choice, DINO's modes) get it too
        with backbone_autocast(autocast_dtype or torch.float32):
            prediction = model.predict(
                pixel_values,
                output_size=tuple(labels.shape[-2:]),
                flip_tta=flip_tta,
                crf=crf,
                crf_workers=crf_workers,
                crf_backend=crf_backend,
            )
        num_clusters = prediction.cluster_log_probs.shape[1]
        metric("cluster", num_clusters, matching).update(prediction.cluster_log_probs.argmax(1), labels)
        if prediction.linear_log_probs is not None:
            metric("linear", prediction.linear_log_probs.shape[1], "none").update(
                prediction.linear_log_probs.argmax(1), labels
            )
        if crf:
            metric("cluster_crf", num_clusters, matching).update(prediction.cluster_crf_probs.argmax(1), labels)
            if prediction.linear_crf_probs is not None:
                metric("linear_crf", prediction.linear_crf_probs.shape[1], "none").update(
                    prediction.linear_crf_probs.argmax(1), labels
                )
    if not metrics:
        raise ValueError("no evaluation batches: the dataset is empty")
    results = {}
    for name, value in metrics.items():
        if accelerator is not None:
            value.sync()
        results[name] = value.compute()
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The headline numbers: ``{"cluster_accuracy", "cluster_mean_iou", "linear_accuracy", ...}``."""
    summary = {}
    for name, values in results.items():
        summary[f"{name}_accuracy"] = float(values["accuracy"])
        summary[f"{name}_mean_iou"] = float(values["mean_iou"])
    return summary


def write_evaluation_report(
    results: dict[str, dict[str, Any]],
    output_dir: str | Path,
    class_names: Sequence[str] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write ``eval_results.json`` (everything, JSON-safe) and ``per_class_iou.csv`` into ``output_dir``.

    ``evaluation`` (what was evaluated: model, dataset, split, number of images, protocol; `hf-useg evaluate`
    passes it) is stored under the ``"evaluation"`` key of ``eval_results.json``, beside the result sets.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if evaluation is not None and "evaluation" in results:
        raise ValueError("results already hold an 'evaluation' entry")
    record = {**results, "evaluation": evaluation} if evaluation is not None else results
    (output_dir / "eval_results.json").write_text(json.dumps(_jsonable(record), indent=2))
    names = list(results)
    num_classes = len(next(iter(results.values()))["per_class_iou"])
    class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    lines = ["class_id,class_name," + ",".join(f"{name}_iou" for name in names)]
    for class_id in range(num_classes):
        row = []
        for name in names:
            iou = float(results[name]["per_class_iou"][class_id])
            row.append("" if np.isnan(iou) else f"{iou:.6f}")
        lines.append(f"{class_id},{class_names[class_id]}," + ",".join(row))
    path = output_dir / "per_class_iou.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def format_per_class_table(results: dict[str, dict[str, Any]], class_names: Sequence[str]) -> str:
    """A plain-text table of per-class IoU (percent) for every result set, for terminal summaries."""
    names = list(results)
    width = max(len(name) for name in class_names) + 2
    header = "class".ljust(width) + "".join(f"{name:>14}" for name in names)
    lines = [header, "-" * len(header)]
    for class_id, class_name in enumerate(class_names):
        cells = []
        for name in names:
            iou = float(results[name]["per_class_iou"][class_id])
            cells.append(f"{'-':>14}" if np.isnan(iou) else f"{100 * iou:>13.1f}%")
        lines.append(class_name.ljust(width) + "".join(cells))
    lines.append("-" * len(header))
    lines.append("mIoU".ljust(width) + "".join(f"{100 * results[n]['mean_iou']:>13.1f}%" for n in names))
    lines.append("accuracy".ljust(width) + "".join(f"{100 * results[n]['accuracy']:>13.1f}%" for n in names))
    return "\n".join(lines)
