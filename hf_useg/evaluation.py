# Copyright 2025 The hf_useg authors. Licensed under the Apache License, Version 2.0.
"""Unsupervised segmentation metric: confusion matrix, cluster-to-class matching and scores.

This is the one place for metrics in `hf_useg` (METHODS.md, section 0.3). The protocol:

* a dataset-wide `int64` confusion matrix `M[cluster, class]` is accumulated with `bincount`, without storing
  predictions; pixels whose label is outside `[0, num_classes)` (-1, 255, a void id) are ignored;
* clusters are matched to classes on that matrix: `"hungarian"` (one-to-one, `linear_sum_assignment(M,
  maximize=True)`), `"majority"` (many-to-one, IIC's overclustering evaluation) or `"none"` (identity, linear
  probe). Clusters left without a class map to -1 and their pixels count as errors;
* per class `IoU_c = TP / (TP + FP + FN)`, `mean_iou` = mean over classes where IoU is defined, `accuracy` =
  sum of TP / number of valid pixels. All scores are fractions in [0, 1].

`import evaluate` is slow (~7 s), so this module never imports it; the `evaluate` module lives in
`hf_useg/metrics/unsupervised_segmentation` (see `EVALUATE_MODULE_PATH`) and is a thin shell over this file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "EVALUATE_MODULE_PATH",
    "MATCHING_METHODS",
    "UnsupervisedSegmentationMetric",
    "coco_detection_ap",
    "confusion_matrix",
    "fit_and_score",
    "hungarian_assignment",
    "identity_assignment",
    "majority_assignment",
    "match_clusters",
    "scores_from_confusion",
    "voc07_detection_ap",
]

MATCHING_METHODS = ("hungarian", "majority", "none")
MatchingMethod = Literal["hungarian", "majority", "none"]

# Folder of the `evaluate` module: `evaluate.load(EVALUATE_MODULE_PATH)` works offline.
EVALUATE_MODULE_PATH = str(Path(__file__).resolve().parent / "metrics" / "unsupervised_segmentation")

# Integer dtypes that `torch.as_tensor` takes from numpy without a copy; others go through int64.
_TORCH_NATIVE_NUMPY_INTS = (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_matching(matching: str) -> str:
    if matching not in MATCHING_METHODS:
        raise ValueError(f"matching must be one of {MATCHING_METHODS}, got {matching!r}")
    return matching


def _as_int_tensor(x: Any, name: str, device: torch.device | None) -> torch.Tensor:
    """Integer array-like -> integer tensor on `device` (no copy for native dtypes on the same device)."""
    if isinstance(x, torch.Tensor):
        tensor = x.detach()
        if tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(
                f"{name} must hold integer ids, got a {tensor.dtype} tensor (take the argmax over the class "
                "dimension first, or cast integer-valued floats explicitly)"
            )
    else:
        array = np.asarray(x)
        if array.dtype.kind not in "biu":
            raise TypeError(
                f"{name} must hold integer ids, got dtype {array.dtype} (take the argmax over the class "
                "dimension first, or cast integer-valued floats explicitly)"
            )
        if array.dtype.type not in _TORCH_NATIVE_NUMPY_INTS:
            array = array.astype(np.int64)
        tensor = torch.as_tensor(np.ascontiguousarray(array))
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    # Move the (usually narrow) input first, widen on the target device.
    if device is not None and tensor.device != device:
        tensor = tensor.to(device)
    return tensor


def _as_numpy_matrix(matrix: Any, name: str = "confusion") -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [num_clusters, num_classes] matrix, got shape {matrix.shape}")
    if matrix.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer pixel counts, got dtype {matrix.dtype}")
    if matrix.size and matrix.min() < 0:
        raise ValueError(f"{name} holds negative counts (min {matrix.min()})")
    return matrix.astype(np.int64, copy=False)


def _flat_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, num_clusters: int) -> torch.Tensor:
    """Flat histogram of length `num_clusters * num_classes + 1`; the last bin counts ignored pixels.

    Ignored pixels go to an extra bin instead of being masked out: boolean indexing would cost a host-device
    synchronisation on GPU (the range check of the predictions is then the update's only one).
    """
    preds = preds.reshape(-1).long()
    labels = labels.reshape(-1).long()
    valid = (labels >= 0) & (labels < num_classes)
    index = torch.where(valid, preds * num_classes + labels, num_clusters * num_classes)
    return torch.bincount(index, minlength=num_clusters * num_classes + 1)


def _validated_pair(
    preds: Any, labels: Any, num_clusters: int, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    preds = _as_int_tensor(preds, "preds", device)
    labels = _as_int_tensor(labels, "labels", device if device is not None else preds.device)
    if preds.shape != labels.shape:
        raise ValueError(
            f"preds and labels must have the same shape, got preds {tuple(preds.shape)} and labels "
            f"{tuple(labels.shape)}"
        )
    if labels.device != preds.device:
        labels = labels.to(preds.device)
    if preds.numel():
        low, high = (int(v) for v in torch.aminmax(preds))
        if low < 0 or high >= num_clusters:
            raise ValueError(
                f"predicted cluster ids must lie in [0, num_clusters={num_clusters}), got values in [{low}, {high}]"
            )
    return preds, labels


def confusion_matrix(
    preds: Any,
    labels: Any,
    num_classes: int,
    num_clusters: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Confusion matrix `M[cluster, class]` of one batch of predictions.

    Args:
        preds: integer cluster ids (numpy array or tensor, any shape), each in `[0, num_clusters)`.
        labels: integer class ids of the same shape; values outside `[0, num_classes)` are ignored.
        num_classes: number of ground-truth classes C.
        num_clusters: number of predicted clusters K (defaults to `num_classes`).
        device: where to count; defaults to the device of `preds` (CPU for numpy inputs).

    Returns:
        `torch.int64` tensor `[num_clusters, num_classes]` (rows = predicted cluster).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_useg.evaluation import confusion_matrix
    >>> confusion_matrix(np.array([0, 1, 1, 1]), np.array([1, 0, 0, 255]), num_classes=2).tolist()
    [[0, 1], [2, 0]]
    ```
    """
    num_classes = _check_count(num_classes, "num_classes")
    num_clusters = num_classes if num_clusters is None else _check_count(num_clusters, "num_clusters")
    device = torch.device(device) if device is not None else None
    preds, labels = _validated_pair(preds, labels, num_clusters, device)
    counts = _flat_counts(preds, labels, num_classes, num_clusters)
    return counts[:-1].view(num_clusters, num_classes)


def hungarian_assignment(confusion: Any) -> np.ndarray:
    """One-to-one matching maximising the matched pixels: `linear_sum_assignment(M, maximize=True)`.

    Args:
        confusion: `[num_clusters, num_classes]` counts (numpy or torch).

    Returns:
        `np.int64` array `[num_clusters]`: the class of each cluster, -1 for clusters left unmatched (only
        when there are more clusters than classes).

    Example:

    ```python
    >>> from hf_useg.evaluation import hungarian_assignment
    >>> hungarian_assignment([[1, 5], [4, 0], [0, 3]]).tolist()
    [1, 0, -1]
    ```
    """
    matrix = _as_numpy_matrix(confusion)
    assignment = np.full(matrix.shape[0], -1, dtype=np.int64)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    assignment[rows] = cols
    return assignment


def majority_assignment(confusion: Any) -> np.ndarray:
    """Many-to-one matching: each cluster maps to the class it overlaps most (ties: lowest class id).

    A cluster without any valid pixel maps to -1 (no evidence, no class). IIC's code maps such a cluster to
    class 0 instead; the two agree on every score computed on the matrix the mapping was fitted on (an empty
    row contributes nothing) and differ only when the mapping is reused on another split (`fit_and_score`),
    where we count that cluster's pixels as errors rather than crediting them to class 0.

    Example:

    ```python
    >>> from hf_useg.evaluation import majority_assignment
    >>> majority_assignment([[3, 1], [2, 2], [0, 0]]).tolist()
    [0, 0, -1]
    ```
    """
    matrix = _as_numpy_matrix(confusion)
    assignment = matrix.argmax(axis=1).astype(np.int64) if matrix.shape[1] else np.zeros(0, np.int64)
    assignment[matrix.sum(axis=1) == 0] = -1
    return assignment


def identity_assignment(confusion: Any) -> np.ndarray:
    """Identity matching (linear probe): cluster i is class i; clusters `>= num_classes` map to -1.

    Example:

    ```python
    >>> from hf_useg.evaluation import identity_assignment
    >>> identity_assignment([[1, 0], [0, 1], [2, 2]]).tolist()
    [0, 1, -1]
    ```
    """
    num_clusters, num_classes = _as_numpy_matrix(confusion).shape
    assignment = np.arange(num_clusters, dtype=np.int64)
    assignment[assignment >= num_classes] = -1
    return assignment


def match_clusters(confusion: Any, matching: MatchingMethod = "hungarian") -> np.ndarray:
    """Cluster -> class assignment (`-1` = no class) by `"hungarian"`, `"majority"` or `"none"` (identity)."""
    matching = _check_matching(matching)
    if matching == "hungarian":
        return hungarian_assignment(confusion)
    if matching == "majority":
        return majority_assignment(confusion)
    return identity_assignment(confusion)


def scores_from_confusion(confusion: Any, assignment: Any) -> dict[str, Any]:
    """Scores of a confusion matrix under a cluster -> class assignment (METHODS 0.3).

    After mapping, per class c: TP = pixels of class c predicted as c, FP = pixels predicted as c of another
    class, FN = pixels of class c predicted as anything else, including clusters mapped to -1. `IoU_c =
    TP / (TP + FP + FN)` is NaN when the class is absent from both the labels and the mapped predictions, and
    `mean_iou` averages the defined ones. `accuracy = sum(TP) / valid pixels`.

    Args:
        confusion: `[num_clusters, num_classes]` counts (numpy or torch).
        assignment: `[num_clusters]` class of each cluster, -1 for none.

    Returns:
        dict with `accuracy`, `mean_iou` (floats; NaN when the matrix is empty), `per_class_iou`,
        `per_class_accuracy` (`float64 [num_classes]`, NaN where undefined), `assignment` (`int64
        [num_clusters]`), `confusion_matrix` (`int64 [num_clusters, num_classes]`) and `num_pixels`.

    Example:

    ```python
    >>> from hf_useg.evaluation import scores_from_confusion
    >>> scores = scores_from_confusion([[0, 4], [3, 1]], assignment=[1, 0])
    >>> scores["accuracy"], scores["per_class_iou"].tolist()
    (0.875, [0.75, 0.8])
    ```
    """
    matrix = _as_numpy_matrix(confusion)
    num_clusters, num_classes = matrix.shape
    assignment = np.asarray(assignment.cpu() if isinstance(assignment, torch.Tensor) else assignment)
    if assignment.shape != (num_clusters,) or assignment.dtype.kind not in "iu":
        raise ValueError(
            f"assignment must be an int array of shape ({num_clusters},), got {assignment.dtype} {assignment.shape}"
        )
    assignment = assignment.astype(np.int64)
    if num_clusters and (assignment.min() < -1 or assignment.max() >= num_classes):
        raise ValueError(
            f"assignment values must lie in [-1, num_classes={num_classes}), got [{assignment.min()}, "
            f"{assignment.max()}]"
        )

    matched = assignment >= 0
    # mapped[p, t]: pixels of true class t predicted (after mapping) as class p.
    mapped = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(mapped, assignment[matched], matrix[matched])
    true_positives = np.diag(mapped)
    class_pixels = matrix.sum(axis=0)  # TP + FN, FN including unmatched clusters
    predicted_pixels = mapped.sum(axis=1)  # TP + FP
    union = class_pixels + predicted_pixels - true_positives
    num_pixels = int(class_pixels.sum())

    with np.errstate(divide="ignore", invalid="ignore"):
        per_class_iou = np.where(union > 0, true_positives / union, np.nan)
        per_class_accuracy = np.where(class_pixels > 0, true_positives / class_pixels, np.nan)
    defined = ~np.isnan(per_class_iou)
    return {
        "accuracy": float(true_positives.sum() / num_pixels) if num_pixels else float("nan"),
        "mean_iou": float(per_class_iou[defined].mean()) if defined.any() else float("nan"),
        "per_class_iou": per_class_iou,
        "per_class_accuracy": per_class_accuracy,
        "assignment": assignment,
        "confusion_matrix": matrix,
        "num_pixels": num_pixels,
    }


def fit_and_score(fit_confusion: Any, score_confusion: Any, matching: MatchingMethod = "hungarian") -> dict[str, Any]:
    """IID+ mode: fit the matching on one split's confusion matrix, score another split with it.

    Example:

    ```python
    >>> from hf_useg.evaluation import fit_and_score
    >>> fit_and_score([[9, 1], [2, 8]], [[1, 3], [4, 0]])["accuracy"]
    0.125
    ```
    """
    fit = _as_numpy_matrix(fit_confusion, "fit_confusion")
    score = _as_numpy_matrix(score_confusion, "score_confusion")
    if fit.shape != score.shape:
        raise ValueError(f"fit_confusion {fit.shape} and score_confusion {score.shape} differ in shape")
    return scores_from_confusion(score, match_clusters(fit, matching))


class UnsupervisedSegmentationMetric:
    """Dataset-wide unsupervised segmentation metric with cluster-to-class matching (METHODS 0.3).

    `update()` adds a batch to an `int64` confusion matrix kept in torch on `device` (predictions are never
    stored); `compute()` matches clusters to classes on the whole matrix and scores. The accumulator is
    exposed as `confusion_matrix` (`[num_clusters, num_classes]`, rows = predicted cluster); metrics from
    several workers combine with `merge()` / `+`, or across processes with `sync()`.

    Args:
        num_classes: number of ground-truth classes C; labels outside `[0, C)` are ignored.
        num_clusters: number of predicted clusters K (default C). Predicted ids outside `[0, K)` raise.
        matching: `"hungarian"` (one-to-one; with K > C the unmatched clusters' pixels count as errors),
            `"majority"` (many-to-one, ties to the lowest class; empty clusters -> -1) or `"none"` (identity:
            cluster i is class i for i < C, clusters >= C map to -1).
        device: device of the accumulator. `None`: the device of the first tensor given to `update()` (CPU for
            numpy inputs).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_useg.evaluation import UnsupervisedSegmentationMetric
    >>> metric = UnsupervisedSegmentationMetric(num_classes=2)
    >>> metric.update(np.array([[1, 1], [0, 0]]), np.array([[0, 0], [1, 255]]))
    >>> result = metric.compute()
    >>> result["accuracy"], result["assignment"].tolist()
    (1.0, [1, 0])
    ```
    """

    def __init__(
        self,
        num_classes: int,
        num_clusters: int | None = None,
        matching: MatchingMethod = "hungarian",
        device: str | torch.device | None = None,
    ) -> None:
        self.num_classes = _check_count(num_classes, "num_classes")
        if num_clusters is not None:
            num_clusters = _check_count(num_clusters, "num_clusters")
        self.num_clusters = self.num_classes if num_clusters is None else num_clusters
        self.matching = _check_matching(matching)
        self._device_fixed = device is not None
        device = torch.device(device if device is not None else "cpu")
        # Flat counts: K * C confusion cells followed by one bin of ignored pixels.
        self._counts = torch.zeros(self.num_clusters * self.num_classes + 1, dtype=torch.int64, device=device)
        self._num_updates = 0
        self._synced = False

    @property
    def device(self) -> torch.device:
        return self._counts.device

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """The accumulator `[num_clusters, num_classes]` (a view of the metric's state, on `device`)."""
        return self._counts[:-1].view(self.num_clusters, self.num_classes)

    @property
    def num_ignored_pixels(self) -> int:
        """Pixels skipped so far because their label is outside `[0, num_classes)`."""
        return int(self._counts[-1])

    def to(self, device: str | torch.device) -> UnsupervisedSegmentationMetric:
        """Move the accumulator to `device` (in place) and return the metric."""
        self._counts = self._counts.to(device)
        self._device_fixed = True
        return self

    def reset(self) -> None:
        """Forget everything accumulated (the device is kept)."""
        self._counts.zero_()
        self._num_updates = 0
        self._synced = False

    @torch.no_grad()
    def update(self, preds: Any, labels: Any) -> None:
        """Add a batch: integer `preds` (cluster ids) and `labels` (class ids) of equal shape, any layout."""
        if self._synced:
            raise RuntimeError(
                "this metric was already synced across processes; updating it now would count the other "
                "processes' pixels twice at the next sync. Call reset() to start a new evaluation."
            )
        if not self._device_fixed and self._num_updates == 0 and isinstance(preds, torch.Tensor):
            self._counts = self._counts.to(preds.device)
        self._device_fixed = True
        preds, labels = _validated_pair(preds, labels, self.num_clusters, self.device)
        self._counts += _flat_counts(preds, labels, self.num_classes, self.num_clusters)
        self._num_updates += 1

    def compute(self, assignment: Any = None) -> dict[str, Any]:
        """Match clusters to classes on the accumulated matrix and score.

        Args:
            assignment: optional `[num_clusters]` cluster -> class map (-1 = none) fitted elsewhere, e.g. the
                `"assignment"` of another split's metric (IID+ mode); by default it is fitted here with
                `self.matching`.

        Returns:
            dict with `accuracy`, `mean_iou`, `per_class_iou`, `per_class_accuracy`, `assignment`,
            `confusion_matrix`, `num_pixels` (valid pixels) and `num_ignored_pixels` (see
            `scores_from_confusion`).
        """
        matrix = self.confusion_matrix.cpu().numpy()
        num_pixels = int(matrix.sum())
        if num_pixels == 0:
            raise ValueError(
                f"no valid pixels accumulated ({self.num_ignored_pixels} ignored): call update() first, and "
                f"check that labels lie in [0, num_classes={self.num_classes})"
            )
        if assignment is None:
            assignment = match_clusters(matrix, self.matching)
        scores = scores_from_confusion(matrix, assignment)
        scores["num_ignored_pixels"] = self.num_ignored_pixels
        return scores

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, UnsupervisedSegmentationMetric):
            raise TypeError(f"can only merge an UnsupervisedSegmentationMetric, got {type(other).__name__}")
        if (other.num_clusters, other.num_classes) != (self.num_clusters, self.num_classes):
            raise ValueError(
                f"cannot merge a metric with num_clusters={other.num_clusters}, "
                f"num_classes={other.num_classes} into one with num_clusters={self.num_clusters}, "
                f"num_classes={self.num_classes}"
            )

    def merge(self, other: UnsupervisedSegmentationMetric) -> UnsupervisedSegmentationMetric:
        """Add `other`'s counts to this metric (in place) and return it."""
        self._check_compatible(other)
        self._counts += other._counts.to(self.device)
        self._num_updates += other._num_updates
        return self

    def __iadd__(self, other: UnsupervisedSegmentationMetric) -> UnsupervisedSegmentationMetric:
        return self.merge(other)

    def __add__(self, other: UnsupervisedSegmentationMetric) -> UnsupervisedSegmentationMetric:
        self._check_compatible(other)
        return copy.deepcopy(self).merge(other)

    @torch.no_grad()
    def sync(self, accelerator_or_reduce_fn: Any = None) -> UnsupervisedSegmentationMetric:
        """Sum the counts of all processes into every process (in place); returns the metric.

        Args:
            accelerator_or_reduce_fn: `None` to all-reduce with `torch.distributed` when it is initialised (a
                no-op otherwise); an `accelerate.Accelerator` (its `reduce(tensor, reduction="sum")` is used);
                or a callable mapping the local count tensor to the summed one.

        A metric can be synced once (a no-op call does not count); `reset()` it before accumulating a new
        evaluation.
        """
        if self._synced:
            raise RuntimeError("this metric was already synced; syncing again would multiply its counts")
        counts = self._counts
        if accelerator_or_reduce_fn is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            if not distributed or torch.distributed.get_world_size() == 1:
                return self
            if torch.distributed.get_backend() == "nccl" and counts.device.type != "cuda":
                reduced = counts.to(torch.device("cuda", torch.cuda.current_device()))
            else:
                reduced = counts.clone()
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        elif callable(accelerator_or_reduce_fn):
            reduced = accelerator_or_reduce_fn(counts.clone())
        elif hasattr(accelerator_or_reduce_fn, "reduce"):
            target = getattr(accelerator_or_reduce_fn, "device", counts.device)
            reduced = accelerator_or_reduce_fn.reduce(counts.to(target), reduction="sum")
        else:
            raise TypeError(
                "accelerator_or_reduce_fn must be None, an object with .reduce(tensor, reduction='sum') (an "
                f"accelerate.Accelerator) or a callable, got {type(accelerator_or_reduce_fn).__name__}"
            )
        if not isinstance(reduced, torch.Tensor) or reduced.shape != counts.shape:
            raise ValueError(
                f"the reduction must return a tensor of shape {tuple(counts.shape)}, got "
                f"{getattr(reduced, 'shape', type(reduced).__name__)}"
            )
        self._counts = reduced.to(device=counts.device, dtype=torch.int64)
        self._synced = True
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, num_clusters={self.num_clusters}, "
            f"matching={self.matching!r}, device={str(self.device)!r}, "
            f"num_pixels={int(self._counts[:-1].sum())})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Detection
#
# Two box-AP evaluators for detectors (CutMix-DETReg, METHODS.md section 5), both taking the same per-image lists:
#
# * `coco_detection_ap`: the standard COCO bbox evaluation (pycocotools, called directly), AP / AP50 / AP75 with
#   101-point interpolation, maxDets 100, all areas;
# * `voc07_detection_ap`: DETReg's evaluator, the classic VOC devkit rules (py-faster-rcnn's / detectron2's
#   `voc_eval`) with the VOC07 11-point AP, averaged over IoU thresholds 0.50:0.95.
#
# They answer different questions and are not interchangeable: DETReg's 63.5 / 83.3 / 70.3 on VOC is the second.
# ---------------------------------------------------------------------------------------------------------------------

_DETECTION_EXTRA_HINT = "pip install 'hf-useg[detection]'"
# IoU thresholds 0.50, 0.55, ..., 0.95 computed as detectron2's VOC evaluator does (`thresh / 100.0`).
_VOC_IOU_THRESHOLDS = np.arange(50, 100, 5) / 100.0
# The devkit's 11 recall points, exactly `np.arange(0.0, 1.1, 0.1)` as in `voc_eval.py`: 0.3, 0.6 and 0.7 come out
# one ulp above the decimal value, so a recall of exactly 3/10 (in floating point) does not reach the 0.3 point.
_VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


class _ImageDetections(NamedTuple):
    """One image's normalised predictions and references: float64 boxes xyxy, int64 labels, bool difficult."""

    pred_boxes: np.ndarray
    pred_scores: np.ndarray
    pred_labels: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray


def _detection_array(value: Any, where: str) -> np.ndarray:
    """Tensor / array / (nested) list -> numpy array, without checking its shape."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return tensor.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # ragged nested lists
        raise ValueError(f"{where} is not an array-like of numbers ({error})") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where} must hold numbers, got dtype {array.dtype}")
    return array


def _detection_boxes(value: Any, where: str) -> np.ndarray:
    array = _detection_array(value, where)
    if array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{where} must have shape [n, 4] (x1, y1, x2, y2), got {tuple(array.shape)}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{where} holds non-finite values (nan or inf)")
    bad = np.nonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))[0]
    if bad.size:
        raise ValueError(
            f"{where}[{bad[0]}] = {array[bad[0]].tolist()} is not xyxy with x2 >= x1 and y2 >= y1 "
            "(COCO's [x, y, w, h] boxes must be converted first)"
        )
    return array


def _detection_vector(
    value: Any, where: str, length: int, kind: Literal["scores", "labels", "difficult"]
) -> np.ndarray:
    array = _detection_array(value, where)
    if array.size == 0:
        array = array.reshape(0)
    if array.ndim != 1 or array.shape[0] != length:
        raise ValueError(f"{where} must have shape [{length}] (one value per box), got {tuple(array.shape)}")
    if kind == "scores":
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{where} holds non-finite values (nan or inf)")
        return array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise ValueError(f"{where} must hold integers, got non-integer values {array[array != np.round(array)]}")
    if kind == "labels":
        return array.astype(np.int64)
    if ((array != 0) & (array != 1)).any():
        raise ValueError(f"{where} must hold booleans (or 0 / 1), got {np.unique(array).tolist()}")
    return array.astype(bool)


def _detection_record(record: Any, where: str, required: tuple[str, ...]) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} must be a dict with keys {required}, got {type(record).__name__}")
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing} (has {sorted(map(str, record))})")


def _detection_inputs(
    predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]]
) -> list[_ImageDetections]:
    """Validate and normalise the per-image predictions and references shared by both detection evaluators."""
    for name, value in (("predictions", predictions), ("references", references)):
        if isinstance(value, Mapping) or not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise ValueError(f"{name} must be a list with one dict per image, got {type(value).__name__}")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have one entry per image each, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    images = []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        pred, ref = f"predictions[{index}]", f"references[{index}]"
        _detection_record(prediction, pred, ("boxes", "scores", "labels"))
        _detection_record(reference, ref, ("boxes", "labels"))
        pred_boxes = _detection_boxes(prediction["boxes"], f'{pred}["boxes"]')
        n_pred = len(pred_boxes)
        gt_boxes = _detection_boxes(reference["boxes"], f'{ref}["boxes"]')
        n_gt = len(gt_boxes)
        difficult = reference.get("difficult")
        images.append(
            _ImageDetections(
                pred_boxes,
                _detection_vector(prediction["scores"], f'{pred}["scores"]', n_pred, "scores"),
                _detection_vector(prediction["labels"], f'{pred}["labels"]', n_pred, "labels"),
                gt_boxes,
                _detection_vector(reference["labels"], f'{ref}["labels"]', n_gt, "labels"),
                np.zeros(n_gt, dtype=bool)
                if difficult is None
                else _detection_vector(difficult, f'{ref}["difficult"]', n_gt, "difficult"),
            )
        )
    return images


def coco_detection_ap(
    predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """COCO box AP, AP50 and AP75 (pycocotools' standard bbox evaluation: maxDets 100, all areas), as fractions.

    Args:
        predictions: one dict per image, `{"boxes": [n, 4] xyxy in pixels, "scores": [n], "labels": [n]}`
            (tensors, numpy arrays or lists; an image may have no predictions).
        references: one dict per image, `{"boxes": [m, 4] xyxy in pixels, "labels": [m]}`. An optional
            `"difficult"` flag is validated but not used: COCO has no such notion, every box is an ordinary
            ground truth (`iscrowd` 0).

    Boxes become COCO's `[x, y, w, h]` with `area = w * h`; the categories are the union of all labels. As in
    pycocotools, a category with no ground truth does not enter the mean (its predictions are ignored), and an
    image's predictions beyond the 100 best-scored are dropped; a zero-area box (x2 == x1 or y2 == y1) has IoU 0
    with everything (pycocotools' rule; `voc07_detection_ap` counts it one pixel wide). When there is no ground
    truth at all every value is `nan` (pycocotools' -1, undefined); when there are ground truths but no
    predictions every value is 0. Values are pycocotools' own: its precision is `tp / (tp + fp + eps)`, so a
    perfect score reads 1 - 2e-16.

    Example:
        >>> gt = [{"boxes": [[10, 10, 50, 50]], "labels": [1]}]
        >>> ap = coco_detection_ap([{"boxes": [[10, 10, 50, 50]], "scores": [0.9], "labels": [1]}], gt)
        >>> {key: round(value, 6) for key, value in ap.items()}  # pycocotools' precision is tp / (tp + fp + eps)
        {'ap': 1.0, 'ap50': 1.0, 'ap75': 1.0}
        >>> coco_detection_ap([{"boxes": [], "scores": [], "labels": []}], gt)
        {'ap': 0.0, 'ap50': 0.0, 'ap75': 0.0}
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError(
            f"coco_detection_ap needs pycocotools, which is not installed: {_DETECTION_EXTRA_HINT}"
        ) from error
    import contextlib
    import io

    images = _detection_inputs(predictions, references)
    if not any(len(image.gt_labels) for image in images):
        return {"ap": float("nan"), "ap50": float("nan"), "ap75": float("nan")}

    def xywh(boxes: np.ndarray) -> np.ndarray:
        return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)

    # Annotation ids start at 1: COCOeval stores the matched id, and 0 reads as "unmatched".
    gt_annotations, dt_annotations = [], []
    for image_id, image in enumerate(images, start=1):
        for boxes, labels, scores, out in (
            (image.gt_boxes, image.gt_labels, None, gt_annotations),
            (image.pred_boxes, image.pred_labels, image.pred_scores, dt_annotations),
        ):
            for k, (box, label) in enumerate(zip(xywh(boxes).tolist(), labels.tolist())):
                annotation = {
                    "id": len(out) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
                if scores is not None:
                    annotation["score"] = float(scores[k])
                out.append(annotation)
    labels = sorted(set(np.concatenate([im.gt_labels for im in images] + [im.pred_labels for im in images]).tolist()))
    base = {
        "images": [{"id": image_id} for image_id in range(1, len(images) + 1)],
        "categories": [{"id": label, "name": str(label)} for label in labels],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {**base, "annotations": gt_annotations}
        coco_dt.dataset = {**base, "annotations": dt_annotations}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(value) if value > -1 else float("nan") for value in evaluator.stats[:3]]
    return dict(zip(("ap", "ap50", "ap75"), stats))


def _voc_iou(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """[n, m] IoU with the VOC devkit's +1-pixel convention (widths `x2 - x1 + 1`, intersections too)."""
    ix = np.minimum(boxes[:, None, 2], gt_boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], gt_boxes[None, :, 0])
    iy = np.minimum(boxes[:, None, 3], gt_boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], gt_boxes[None, :, 1])
    intersection = np.maximum(ix + 1.0, 0.0) * np.maximum(iy + 1.0, 0.0)
    area = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    gt_area = (gt_boxes[:, 2] - gt_boxes[:, 0] + 1.0) * (gt_boxes[:, 3] - gt_boxes[:, 1] + 1.0)
    return intersection / (area[:, None] + gt_area[None, :] - intersection)


def _voc07_11_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Mean over the 11 recall points of the best precision at recall >= point (0 where none)."""
    reached = recall[None, :] >= _VOC07_RECALL_POINTS[:, None]
    best = np.where(reached, precision[None, :], 0.0).max(axis=1, initial=0.0)
    return float(best.sum() / 11.0)


def voc07_detection_ap(
    predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """DETReg's detection AP: VOC07 11-point AP averaged over IoU 0.50:0.95, with AP50 / AP75, as fractions.

    The classic VOC devkit rules (`voc_eval.py` of py-faster-rcnn / detectron2), per class and IoU threshold:
    the class's detections of all images are sorted by score (descending; ties keep image order, then detection
    order); each takes the ground truth of its image and class with the highest IoU (+1-pixel convention,
    `(x2 - x1 + 1) * (y2 - y1 + 1)`, intersection likewise; boxes are used as given, no 1-based shift). It is a
    true positive when that IoU is strictly greater than the threshold and the ground truth is neither difficult
    nor already taken; matched (IoU above the threshold) to a difficult ground truth it counts neither way;
    otherwise, duplicates included, it is a false positive. Recall is over the non-difficult ground truths; the AP
    is the VOC07 11-point interpolation (mean over recall points `np.arange(0.0, 1.1, 0.1)`, exactly as in the
    devkit, of the best precision at recall >= the point, 0 where none). Classes are averaged, then thresholds
    0.50, 0.55, ..., 0.95 give `ap`; `ap50` and `ap75` are the class means at 0.50 and 0.75.

    Classes without any non-difficult ground truth (the devkit's recall is undefined for them) are skipped, so
    predictions of labels absent from the references do not count. When no class has a non-difficult ground
    truth every value is `nan`; when there are ground truths but no predictions every value is 0. Unlike COCO
    there is no cap on detections per image.

    Args:
        predictions: one dict per image, `{"boxes": [n, 4] xyxy in pixels, "scores": [n], "labels": [n]}`
            (tensors, numpy arrays or lists; an image may have no predictions).
        references: one dict per image, `{"boxes": [m, 4], "labels": [m]}` and optionally `"difficult": [m]`
            (booleans, default all False).

    Example:
        >>> gt = [{"boxes": [[0, 0, 9, 9], [20, 20, 29, 29]], "labels": [0, 0], "difficult": [False, True]}]
        >>> voc07_detection_ap([{"boxes": [[0, 0, 9, 9]], "scores": [0.9], "labels": [0]}], gt)
        {'ap': 1.0, 'ap50': 1.0, 'ap75': 1.0}
        >>> # [0, 0, 9, 9] vs [0, 0, 9, 4]: IoU 50 / 100 = 0.5 with +1 pixels, not above 0.5 -> false positive
        >>> voc07_detection_ap([{"boxes": [[0, 0, 9, 4]], "scores": [0.9], "labels": [0]}], gt)
        {'ap': 0.0, 'ap50': 0.0, 'ap75': 0.0}
    """
    images = _detection_inputs(predictions, references)

    gt_labels = np.concatenate([np.zeros(0, np.int64)] + [image.gt_labels for image in images])
    difficult = np.concatenate([np.zeros(0, bool)] + [image.gt_difficult for image in images])
    classes = np.unique(gt_labels[~difficult])
    if classes.size == 0:
        return {"ap": float("nan"), "ap50": float("nan"), "ap75": float("nan")}

    # Per detection (all images concatenated): its best IoU over the image's gts of its class and the global index
    # of that gt (-inf and -1 when the image has no gt of the class).
    gt_offsets = np.cumsum([0] + [len(image.gt_labels) for image in images])
    best_iou, best_gt = [], []
    for image, offset in zip(images, gt_offsets[:-1]):
        if len(image.gt_labels) == 0:
            best_iou.append(np.full(len(image.pred_labels), -np.inf))
            best_gt.append(np.full(len(image.pred_labels), -1))
            continue
        same_class = image.pred_labels[:, None] == image.gt_labels[None, :]
        overlaps = np.where(same_class, _voc_iou(image.pred_boxes, image.gt_boxes), -np.inf)
        jmax = overlaps.argmax(axis=1)  # the first of equal maxima, as the devkit's np.argmax
        ovmax = np.take_along_axis(overlaps, jmax[:, None], axis=1)[:, 0]
        best_iou.append(ovmax)
        best_gt.append(np.where(np.isfinite(ovmax), jmax + offset, -1))
    best_iou = np.concatenate(best_iou)
    best_gt = np.concatenate(best_gt).astype(np.int64)
    scores = np.concatenate([image.pred_scores for image in images])
    pred_labels = np.concatenate([image.pred_labels for image in images])
    # A sentinel slot at the end so that best_gt == -1 reads "not difficult".
    difficult_of_best = np.append(difficult, False)[best_gt]

    per_class = np.zeros((len(classes), len(_VOC_IOU_THRESHOLDS)))
    for c, label in enumerate(classes):
        num_positives = int(np.count_nonzero((gt_labels == label) & ~difficult))
        order = np.nonzero(pred_labels == label)[0]
        order = order[np.argsort(-scores[order], kind="stable")]
        if order.size == 0:
            continue
        ious, gts, gt_difficult = best_iou[order], best_gt[order], difficult_of_best[order]
        for t, threshold in enumerate(_VOC_IOU_THRESHOLDS):
            above = ious > threshold
            candidates = np.nonzero(above & ~gt_difficult)[0]
            # The first candidate (in score order) of each gt takes it; the later ones are duplicates.
            _, first = np.unique(gts[candidates], return_index=True)
            tp = np.zeros(order.size)
            tp[candidates[first]] = 1.0
            fp = (~above).astype(np.float64)
            fp[candidates] = 1.0 - tp[candidates]
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            recall = tp / num_positives
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            per_class[c, t] = _voc07_11_point_ap(recall, precision)
    per_threshold = per_class.mean(axis=0)
    return {
        "ap": float(per_threshold.mean()),
        "ap50": float(per_threshold[np.isclose(_VOC_IOU_THRESHOLDS, 0.5)][0]),
        "ap75": float(per_threshold[np.isclose(_VOC_IOU_THRESHOLDS, 0.75)][0]),
    }
