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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "EVALUATE_MODULE_PATH",
    "MATCHING_METHODS",
    "UnsupervisedSegmentationMetric",
    "confusion_matrix",
    "fit_and_score",
    "hungarian_assignment",
    "identity_assignment",
    "majority_assignment",
    "match_clusters",
    "scores_from_confusion",
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
