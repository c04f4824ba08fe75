"""Tests of the shared metric (`hf_useg.evaluation`, METHODS.md section 0.3).

Worked examples are computed by hand in the comments; `_reference_scores` is an independent pixel-level
implementation written from the METHODS text (no confusion matrix), and `_best_injection` finds the optimal
one-to-one matching by brute force over `itertools.permutations`.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_useg.evaluation import (
    EVALUATE_MODULE_PATH,
    UnsupervisedSegmentationMetric,
    confusion_matrix,
    fit_and_score,
    hungarian_assignment,
    identity_assignment,
    majority_assignment,
    match_clusters,
    scores_from_confusion,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pixels_from_confusion(matrix, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (preds, labels) pixel lists whose confusion matrix is `matrix`."""
    matrix = np.asarray(matrix)
    preds, labels = [], []
    for cluster, row in enumerate(matrix):
        for cls, count in enumerate(row):
            preds += [cluster] * int(count)
            labels += [cls] * int(count)
    order = np.random.default_rng(seed).permutation(len(preds))
    return np.asarray(preds, dtype=np.int64)[order], np.asarray(labels, dtype=np.int64)[order]


def _reference_scores(preds, labels, assignment, num_classes: int) -> dict:
    """Pixel-level scores straight from METHODS 0.3: map every pixel, then count TP/FP/FN per class."""
    preds, labels = np.ravel(preds), np.ravel(labels)
    valid = (labels >= 0) & (labels < num_classes)
    mapped = np.asarray([assignment[p] for p in preds[valid]])
    labels = labels[valid]
    ious = []
    for cls in range(num_classes):
        tp = int(np.sum((mapped == cls) & (labels == cls)))
        fp = int(np.sum((mapped == cls) & (labels != cls)))
        fn = int(np.sum((mapped != cls) & (labels == cls)))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    ious = np.asarray(ious)
    return {
        "accuracy": float(np.mean(mapped == labels)),
        "per_class_iou": ious,
        "mean_iou": float(np.nanmean(ious)),
    }


def _best_injection(matrix) -> tuple[int, list[tuple[int, ...]]]:
    """Brute force: the largest number of matched pixels over all one-to-one cluster<->class maps."""
    matrix = np.asarray(matrix)
    num_clusters, num_classes = matrix.shape
    best = -1
    if num_clusters >= num_classes:  # choose a distinct cluster for every class
        for clusters in itertools.permutations(range(num_clusters), num_classes):
            best = max(best, sum(int(matrix[k, c]) for c, k in enumerate(clusters)))
    else:  # choose a distinct class for every cluster
        for classes in itertools.permutations(range(num_classes), num_clusters):
            best = max(best, sum(int(matrix[k, c]) for k, c in enumerate(classes)))
    return best


# ---------------------------------------------------------------------------------------------------------
# confusion matrix
# ---------------------------------------------------------------------------------------------------------


def test_confusion_matrix_counts_rows_are_clusters():
    # pixels (cluster, class): (0,2) (0,2) (0,1) (1,0) (1,0) (2,1) (2,1) (2,1) (2,0) (0,2)
    preds = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    labels = np.array([2, 2, 1, 0, 0, 1, 1, 1, 0, 2])
    matrix = confusion_matrix(preds, labels, num_classes=3)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == [[0, 1, 3], [2, 0, 0], [1, 3, 0]]
    # Non-square: 2 classes, 4 clusters; shape is [num_clusters, num_classes].
    matrix = confusion_matrix(np.array([3, 3, 0]), np.array([1, 0, 1]), num_classes=2, num_clusters=4)
    assert matrix.tolist() == [[0, 1], [0, 0], [0, 0], [1, 1]]


def test_ignored_labels_are_skipped_but_counted():
    # num_classes = 2: -1, 255 and the void id 2 are all outside [0, 2) and ignored.
    preds = np.array([[0, 1, 1], [0, 1, 0]])
    labels = np.array([[0, 1, -1], [255, 2, 1]])
    # valid pixels: (0,0) (1,1) (0,1) -> M = [[1, 1], [0, 1]]
    assert confusion_matrix(preds, labels, num_classes=2).tolist() == [[1, 1], [0, 1]]
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    metric.update(preds, labels)
    result = metric.compute()
    assert result["num_pixels"] == 3
    assert result["num_ignored_pixels"] == 3
    assert metric.num_ignored_pixels == 3
    # uint8 labels with 255 as the void id
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    metric.update(torch.tensor([0, 1, 1], dtype=torch.uint8), np.array([0, 255, 1], dtype=np.uint8))
    assert metric.confusion_matrix.tolist() == [[1, 0], [0, 1]]


def test_input_dtypes_and_layouts_agree():
    rng = np.random.default_rng(1)
    preds = rng.integers(0, 5, size=(2, 7, 9))
    labels = rng.integers(-1, 6, size=(2, 7, 9))
    expected = confusion_matrix(preds, labels, num_classes=5)
    for p, lab in [
        (preds.astype(np.uint8), labels.astype(np.int8)),
        (preds.astype(np.uint16), labels.astype(np.int32)),  # uint16 has no zero-copy torch path
        (torch.from_numpy(preds).int(), torch.from_numpy(labels).short()),
        (preds.transpose(2, 1, 0), labels.transpose(2, 1, 0)),  # non-contiguous
        (preds[..., ::-1], labels[..., ::-1]),  # negative strides
        (preds.tolist(), labels.tolist()),
    ]:
        assert torch.equal(confusion_matrix(p, lab, num_classes=5), expected)
    # boolean maps are ids 0/1
    matrix = confusion_matrix(torch.tensor([True, False, True]), np.array([True, False, False]), num_classes=2)
    assert matrix.tolist() == [[1, 0], [1, 1]]


# ---------------------------------------------------------------------------------------------------------
# worked examples
# ---------------------------------------------------------------------------------------------------------


def test_hungarian_permutation_worked_example():
    # M = [[0, 1, 3],      Hungarian (maximise matched pixels): cluster 0 -> class 2 (3),
    #      [2, 0, 0],      cluster 1 -> class 0 (2), cluster 2 -> class 1 (3): 8 of 10 pixels.
    #      [1, 3, 0]]
    # class 0: TP 2, FP 0 (cluster 1 holds only class 0), FN 1 (in cluster 2)     -> IoU 2/3
    # class 1: TP 3, FP 1 (the class-0 pixel of cluster 2), FN 1 (in cluster 0)   -> IoU 3/5
    # class 2: TP 3, FP 1 (the class-1 pixel of cluster 0), FN 0                  -> IoU 3/4
    # mIoU = (2/3 + 3/5 + 3/4) / 3 = 121/180; per-class accuracy (recall) = [2/3, 3/4, 1]
    preds = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    labels = np.array([2, 2, 1, 0, 0, 1, 1, 1, 0, 2])
    metric = UnsupervisedSegmentationMetric(num_classes=3)
    metric.update(preds, labels)
    result = metric.compute()
    assert result["assignment"].tolist() == [2, 0, 1]
    assert result["accuracy"] == pytest.approx(0.8)
    np.testing.assert_allclose(result["per_class_iou"], [2 / 3, 3 / 5, 3 / 4])
    assert result["mean_iou"] == pytest.approx(121 / 180)
    np.testing.assert_allclose(result["per_class_accuracy"], [2 / 3, 3 / 4, 1.0])
    assert result["confusion_matrix"].dtype == np.int64
    assert result["confusion_matrix"].tolist() == [[0, 1, 3], [2, 0, 0], [1, 3, 0]]
    assert result["num_pixels"] == 10
    assert isinstance(result["accuracy"], float) and isinstance(result["mean_iou"], float)


def test_hungarian_fewer_clusters_than_classes():
    # 2 clusters x 3 classes: M = [[5, 1, 0], [0, 2, 4]]
    # -> cluster 0 -> class 0 (5), cluster 1 -> class 2 (4). Class 1 gets no cluster: its 3 pixels are errors.
    # accuracy 9/12; IoU: class 0 5/(5+1+0), class 1 0/(0+0+3) = 0, class 2 4/(4+2+0)
    # mIoU (5/6 + 0 + 2/3)/3 = 1/2
    matrix = np.array([[5, 1, 0], [0, 2, 4]])
    preds, labels = _pixels_from_confusion(matrix)
    metric = UnsupervisedSegmentationMetric(num_classes=3, num_clusters=2)
    metric.update(preds, labels)
    result = metric.compute()
    assert result["assignment"].tolist() == [0, 2]
    assert result["accuracy"] == pytest.approx(0.75)
    np.testing.assert_allclose(result["per_class_iou"], [5 / 6, 0.0, 2 / 3])
    assert result["mean_iou"] == pytest.approx(0.5)


def test_extra_cluster_pixels_count_as_errors_unlike_stego():
    # 3 clusters, 2 classes. Cluster 2 is an extra cluster holding 2 pixels of class 0 and 1 of class 1.
    # M = [[4, 0],      Hungarian: cluster 0 -> class 0, cluster 1 -> class 1 (7 pixels); cluster 2 -> -1.
    #      [0, 3],
    #      [2, 1]]
    # Its 3 pixels are errors: accuracy 7/10; class 0 IoU 4/(4+0+2) = 2/3, class 1 IoU 3/(3+0+1) = 3/4,
    # mIoU 17/24.
    # STEGO's metric instead masks out pixels predicted as a cluster >= num_classes before counting, i.e. it
    # scores M[:2] only: accuracy 7/7 = 1 and IoU 1 for both classes -- a perfect score for a model that
    # lumps pixels of two classes together in a third cluster.
    matrix = np.array([[4, 0], [0, 3], [2, 1]])
    preds, labels = _pixels_from_confusion(matrix)
    metric = UnsupervisedSegmentationMetric(num_classes=2, num_clusters=3)
    metric.update(preds, labels)
    result = metric.compute()
    assert result["assignment"].tolist() == [0, 1, -1]
    assert result["accuracy"] == pytest.approx(0.7)
    np.testing.assert_allclose(result["per_class_iou"], [2 / 3, 3 / 4])
    assert result["mean_iou"] == pytest.approx(17 / 24)
    assert result["num_pixels"] == 10  # the unmatched cluster's pixels stay in the denominator

    stego_drop = scores_from_confusion(matrix[:2], [0, 1])
    assert stego_drop["accuracy"] == 1.0 and stego_drop["mean_iou"] == 1.0
    assert result["accuracy"] < stego_drop["accuracy"]


def test_extra_cluster_matched_instead_of_a_pure_one():
    # M = [[4, 0], [0, 3], [2, 5]]: Hungarian picks cluster 0 -> 0 and cluster 2 -> 1 (4 + 5 = 9 > 7),
    # leaving the pure cluster 1 unmatched. accuracy 9/14.
    # class 0: TP 4, FP 0, FN 2 (in cluster 2)       -> 4/6
    # class 1: TP 5, FP 2 (cluster 2's class-0 px), FN 3 (in the unmatched cluster 1) -> 5/10
    result = scores_from_confusion(np.array([[4, 0], [0, 3], [2, 5]]), [0, -1, 1])
    assert hungarian_assignment([[4, 0], [0, 3], [2, 5]]).tolist() == [0, -1, 1]
    assert result["accuracy"] == pytest.approx(9 / 14)
    np.testing.assert_allclose(result["per_class_iou"], [4 / 6, 0.5])


def test_majority_many_to_one_with_ties_and_empty_cluster():
    # M = [[5, 1, 0],   -> class 0
    #      [2, 2, 1],   -> tie between classes 0 and 1: lowest id, class 0
    #      [0, 3, 3],   -> tie between classes 1 and 2: class 1
    #      [0, 0, 0]]   -> no valid pixel: -1 (IIC's code would say class 0; no effect on these scores)
    # Mapped: class 0 <- clusters 0, 1; class 1 <- cluster 2; class 2 <- nothing.
    # TP = 5 + 2 (class 0) + 3 (class 1) = 10 of 17 valid pixels.
    # class 0: TP 7, FP 11 - 7 = 4, FN 0  -> 7/11
    # class 1: TP 3, FP 3, FN 6 - 3 = 3   -> 3/9
    # class 2: TP 0, FP 0, FN 4           -> 0 (present in the labels, so it counts in the mean)
    matrix = np.array([[5, 1, 0], [2, 2, 1], [0, 3, 3], [0, 0, 0]])
    assert majority_assignment(matrix).tolist() == [0, 0, 1, -1]
    preds, labels = _pixels_from_confusion(matrix)
    metric = UnsupervisedSegmentationMetric(num_classes=3, num_clusters=4, matching="majority")
    metric.update(preds, labels)
    result = metric.compute()
    assert result["assignment"].tolist() == [0, 0, 1, -1]
    assert result["accuracy"] == pytest.approx(10 / 17)
    np.testing.assert_allclose(result["per_class_iou"], [7 / 11, 1 / 3, 0.0])
    assert result["mean_iou"] == pytest.approx((7 / 11 + 1 / 3) / 3)


def test_identity_matching():
    # M = [[1, 3], [4, 2]]: identity scores the diagonal, 3/10; Hungarian would swap (7/10).
    # identity IoU: class 0 1/(1+3+4) = 1/8, class 1 2/(2+4+3) = 2/9
    matrix = np.array([[1, 3], [4, 2]])
    preds, labels = _pixels_from_confusion(matrix)
    results = {}
    for matching in ("none", "hungarian"):
        metric = UnsupervisedSegmentationMetric(num_classes=2, matching=matching)
        metric.update(preds, labels)
        results[matching] = metric.compute()
    assert results["none"]["assignment"].tolist() == [0, 1]
    assert results["none"]["accuracy"] == pytest.approx(0.3)
    np.testing.assert_allclose(results["none"]["per_class_iou"], [1 / 8, 2 / 9])
    assert results["hungarian"]["assignment"].tolist() == [1, 0]
    assert results["hungarian"]["accuracy"] == pytest.approx(0.7)
    # More clusters than classes: cluster i -> i for i < num_classes, the rest -> -1 (errors).
    assert identity_assignment(np.zeros((4, 2), dtype=np.int64)).tolist() == [0, 1, -1, -1]
    assert identity_assignment(np.zeros((2, 3), dtype=np.int64)).tolist() == [0, 1]


def test_nan_per_class_iou_for_undefined_classes():
    # 4 classes, only classes 0 and 1 occur in the labels; 4 clusters, cluster 3 is empty.
    # M = [[3, 0, 0, 0],
    #      [0, 2, 0, 0],
    #      [1, 0, 0, 0],
    #      [0, 0, 0, 0]]
    # Hungarian: 0 -> 0, 1 -> 1; clusters 2 and 3 take classes 2 and 3 (zero gain, either way round).
    # class 0: TP 3, FN 1 -> 3/4; class 1: 1.
    # The class given to cluster 2 is absent from the labels but predicted (1 pixel): IoU 0, counts.
    # The class given to the empty cluster 3 is absent from labels and mapped predictions: NaN, skipped.
    matrix = np.array([[3, 0, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    preds, labels = _pixels_from_confusion(matrix)
    metric = UnsupervisedSegmentationMetric(num_classes=4)
    metric.update(preds, labels)
    result = metric.compute()
    assignment = result["assignment"]
    assert assignment[:2].tolist() == [0, 1] and sorted(assignment[2:].tolist()) == [2, 3]
    iou = result["per_class_iou"]
    assert iou[0] == pytest.approx(0.75) and iou[1] == 1.0
    assert iou[assignment[2]] == 0.0
    assert np.isnan(iou[assignment[3]])
    assert result["mean_iou"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert np.isnan(result["per_class_accuracy"][2:]).all()  # absent from the labels
    # Majority: cluster 2 -> class 0, cluster 3 -> -1: classes 2 and 3 are both undefined.
    result = scores_from_confusion(matrix, majority_assignment(matrix))
    assert np.isnan(result["per_class_iou"][2:]).all()
    assert result["mean_iou"] == 1.0 and result["accuracy"] == 1.0


def test_empty_matrix_gives_nan_and_metric_refuses_to_score_nothing():
    result = scores_from_confusion(np.zeros((2, 2), dtype=np.int64), [0, 1])
    assert np.isnan(result["accuracy"]) and np.isnan(result["mean_iou"])
    assert np.isnan(result["per_class_iou"]).all()
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    with pytest.raises(ValueError, match="no valid pixels"):
        metric.compute()
    metric.update(np.array([0, 1]), np.array([255, -1]))
    with pytest.raises(ValueError, match=r"no valid pixels accumulated \(2 ignored\)"):
        metric.compute()


# ---------------------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_clusters,num_classes", [(3, 3), (4, 4), (5, 5), (5, 3), (2, 4)])
def test_hungarian_matches_brute_force_and_pixel_reference(num_clusters, num_classes):
    rng = np.random.default_rng(num_clusters * 10 + num_classes)
    for _ in range(15):
        preds = rng.integers(0, num_clusters, size=300)
        labels = rng.integers(-1, num_classes + 1, size=300)  # includes ignored -1 and num_classes
        # bias towards a hidden permutation so the optimum is not trivially flat
        hidden = rng.permutation(max(num_clusters, num_classes))[:num_clusters] % num_classes
        labels = np.where(rng.random(300) < 0.4, hidden[preds], labels)
        metric = UnsupervisedSegmentationMetric(num_classes, num_clusters)
        metric.update(preds, labels)
        result = metric.compute()
        valid = int(np.sum((labels >= 0) & (labels < num_classes)))
        assert result["num_pixels"] == valid
        # the best one-to-one map over all permutations gives the same accuracy
        assert result["accuracy"] == pytest.approx(_best_injection(result["confusion_matrix"]) / valid)
        # and the matrix-based scores agree with pixel-level counting under the chosen assignment
        reference = _reference_scores(preds, labels, result["assignment"], num_classes)
        assert result["accuracy"] == pytest.approx(reference["accuracy"])
        np.testing.assert_allclose(result["per_class_iou"], reference["per_class_iou"])
        assert result["mean_iou"] == pytest.approx(reference["mean_iou"])


def test_majority_matches_pixel_reference():
    rng = np.random.default_rng(7)
    num_clusters, num_classes = 8, 3
    for _ in range(10):
        preds = rng.integers(0, num_clusters, size=400)
        labels = rng.integers(-1, num_classes, size=400)
        metric = UnsupervisedSegmentationMetric(num_classes, num_clusters, matching="majority")
        metric.update(preds, labels)
        result = metric.compute()
        # reference mapping: loop over clusters, the first class with the highest pixel count
        valid = labels >= 0
        for cluster in range(num_clusters):
            counts = [int(np.sum((preds == cluster) & (labels == c) & valid)) for c in range(num_classes)]
            expected = counts.index(max(counts)) if sum(counts) else -1
            assert result["assignment"][cluster] == expected
        reference = _reference_scores(preds, labels, result["assignment"], num_classes)
        assert result["accuracy"] == pytest.approx(reference["accuracy"])
        np.testing.assert_allclose(result["per_class_iou"], reference["per_class_iou"])


# ---------------------------------------------------------------------------------------------------------
# accumulation, devices, merge, sync
# ---------------------------------------------------------------------------------------------------------


def test_many_updates_equal_one_update_on_the_concatenation():
    rng = np.random.default_rng(3)
    batches = [
        (rng.integers(0, 6, size=shape), rng.integers(-1, 5, size=shape))
        for shape in [(4, 5), (3, 7, 2), (11,), (2, 2, 2, 2), (1, 9)] * 4
    ]
    streaming = UnsupervisedSegmentationMetric(num_classes=4, num_clusters=6)
    for preds, labels in batches:
        streaming.update(preds, labels)
    single = UnsupervisedSegmentationMetric(num_classes=4, num_clusters=6)
    single.update(np.concatenate([p.ravel() for p, _ in batches]), np.concatenate([lab.ravel() for _, lab in batches]))
    assert torch.equal(streaming.confusion_matrix, single.confusion_matrix)
    assert streaming.num_ignored_pixels == single.num_ignored_pixels > 0
    a, b = streaming.compute(), single.compute()
    for key in ("accuracy", "mean_iou", "per_class_iou", "assignment", "confusion_matrix", "num_pixels"):
        np.testing.assert_array_equal(a[key], b[key])
    streaming.reset()
    assert int(streaming.confusion_matrix.sum()) == 0 and streaming.num_ignored_pixels == 0


def test_device_argument_cpu():
    metric = UnsupervisedSegmentationMetric(num_classes=3, device="cpu")
    assert metric.device == torch.device("cpu")
    metric.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 1]]))
    assert metric.confusion_matrix.device == torch.device("cpu")
    assert metric.confusion_matrix.dtype == torch.int64
    assert metric.confusion_matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    # device=None follows the first tensor (CPU here) and accepts numpy afterwards
    metric = UnsupervisedSegmentationMetric(num_classes=3)
    metric.update(np.array([0]), np.array([0]))
    assert metric.device == torch.device("cpu")
    assert confusion_matrix(np.array([1]), np.array([1]), num_classes=2, device="cpu").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_argument_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 7, size=(4, 64, 64)), rng.integers(-1, 6, size=(4, 64, 64))
    cpu = UnsupervisedSegmentationMetric(num_classes=5, num_clusters=7)
    cpu.update(preds, labels)
    gpu = UnsupervisedSegmentationMetric(num_classes=5, num_clusters=7, device="cuda")
    gpu.update(torch.from_numpy(preds).cuda(), labels)  # mixed inputs are moved to the accumulator
    assert gpu.confusion_matrix.device.type == "cuda"
    assert torch.equal(gpu.confusion_matrix.cpu(), cpu.confusion_matrix)
    follow = UnsupervisedSegmentationMetric(num_classes=5, num_clusters=7)
    follow.update(torch.from_numpy(preds).cuda(), torch.from_numpy(labels).cuda())
    assert follow.device.type == "cuda"
    np.testing.assert_array_equal(follow.compute()["per_class_iou"], cpu.compute()["per_class_iou"])


def test_merge_equals_one_metric_over_both():
    rng = np.random.default_rng(5)
    first = [(rng.integers(0, 5, size=50), rng.integers(-1, 4, size=50)) for _ in range(3)]
    second = [(rng.integers(0, 5, size=30), rng.integers(-1, 4, size=30)) for _ in range(4)]
    m1, m2, both = (UnsupervisedSegmentationMetric(4, 5) for _ in range(3))
    for preds, labels in first:
        m1.update(preds, labels)
        both.update(preds, labels)
    for preds, labels in second:
        m2.update(preds, labels)
        both.update(preds, labels)
    summed = m1 + m2
    assert summed is not m1
    assert torch.equal(summed.confusion_matrix, both.confusion_matrix)
    assert summed.num_ignored_pixels == both.num_ignored_pixels
    assert int(m1.confusion_matrix.sum()) + int(m2.confusion_matrix.sum()) == int(both.confusion_matrix.sum())
    m1 += m2  # in place
    assert torch.equal(m1.confusion_matrix, both.confusion_matrix)
    assert m1.compute()["accuracy"] == both.compute()["accuracy"]
    with pytest.raises(ValueError, match="num_clusters=3"):
        both.merge(UnsupervisedSegmentationMetric(4, 3))
    with pytest.raises(TypeError, match="UnsupervisedSegmentationMetric"):
        both.merge(both.confusion_matrix)


def test_sync_is_a_noop_without_distributed_and_uses_a_reduce_fn():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    metric.update(np.array([0, 1, 1]), np.array([0, 1, 255]))
    assert metric.sync() is metric
    assert metric.confusion_matrix.tolist() == [[1, 0], [0, 1]]
    metric.update(np.array([0]), np.array([0]))  # still usable: the no-op sync did not count
    # a reduce function standing for three identical processes
    metric.sync(lambda counts: counts * 3)
    assert metric.confusion_matrix.tolist() == [[6, 0], [0, 3]]
    assert metric.num_ignored_pixels == 3
    with pytest.raises(RuntimeError, match="already synced"):
        metric.sync(lambda counts: counts)
    with pytest.raises(RuntimeError, match="reset"):
        metric.update(np.array([0]), np.array([0]))
    metric.reset()
    metric.update(np.array([1]), np.array([1]))
    assert metric.confusion_matrix.tolist() == [[0, 0], [0, 1]]


def test_sync_with_an_accelerator_like_object():
    class FakeAccelerator:
        device = torch.device("cpu")

        def __init__(self):
            self.calls = []

        def reduce(self, tensor, reduction="mean"):
            self.calls.append(reduction)
            return tensor * 2

    accelerator = FakeAccelerator()
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    metric.update(np.array([0, 1]), np.array([1, 1]))
    metric.sync(accelerator)
    assert accelerator.calls == ["sum"]
    assert metric.confusion_matrix.tolist() == [[0, 2], [0, 2]]
    with pytest.raises(TypeError, match="accelerate.Accelerator"):
        UnsupervisedSegmentationMetric(num_classes=2).sync(42)
    with pytest.raises(ValueError, match="shape"):
        UnsupervisedSegmentationMetric(num_classes=2).sync(lambda counts: counts[:2])


_DISTRIBUTED_WORKER = textwrap.dedent(
    """
    import importlib.util, json, os
    import numpy as np
    import torch

    # evaluation.py has no package-relative imports: loading the file alone skips hf_useg/__init__ (and its
    # transformers import), which keeps the two processes' start-up short.
    spec = importlib.util.spec_from_file_location("evaluation", os.environ["HF_USEG_EVALUATION_FILE"])
    evaluation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluation)
    UnsupervisedSegmentationMetric = evaluation.UnsupervisedSegmentationMetric

    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    rng = np.random.default_rng(rank)
    metric = UnsupervisedSegmentationMetric(num_classes=3, num_clusters=4)
    for _ in range(3):
        metric.update(rng.integers(0, 4, size=(8, 8)), rng.integers(-1, 3, size=(8, 8)))
    local = metric.confusion_matrix.tolist()
    result = metric.sync().compute()
    torch.distributed.destroy_process_group()
    print(json.dumps({"local": local, "synced": result["confusion_matrix"].tolist(),
                      "accuracy": result["accuracy"]}))
    """
)


@pytest.mark.slow
def test_sync_all_reduces_across_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DISTRIBUTED_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["OMP_NUM_THREADS"] = "1"
        env["HF_USEG_EVALUATION_FILE"] = str(REPO_ROOT / "hf_useg" / "evaluation.py")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    expected = (np.asarray(outputs[0]["local"]) + np.asarray(outputs[1]["local"])).tolist()
    assert outputs[0]["synced"] == outputs[1]["synced"] == expected
    assert outputs[0]["accuracy"] == outputs[1]["accuracy"]


# ---------------------------------------------------------------------------------------------------------
# IID+ (fit on one split, score another)
# ---------------------------------------------------------------------------------------------------------


def test_fit_on_one_split_and_score_another():
    # fit split: M = [[9, 1], [2, 8]] -> identity. score split: M = [[1, 3], [4, 0]].
    # With the fitted identity only the diagonal (1 + 0) is right: 1/8. Fitting on the score split itself
    # would swap the clusters: 7/8.
    fit, score = np.array([[9, 1], [2, 8]]), np.array([[1, 3], [4, 0]])
    iid_plus = fit_and_score(fit, score, matching="hungarian")
    assert iid_plus["assignment"].tolist() == [0, 1]
    assert iid_plus["accuracy"] == pytest.approx(1 / 8)
    assert scores_from_confusion(score, match_clusters(score))["accuracy"] == pytest.approx(7 / 8)

    train, test = UnsupervisedSegmentationMetric(2), UnsupervisedSegmentationMetric(2)
    train.update(*_pixels_from_confusion(fit))
    test.update(*_pixels_from_confusion(score, seed=1))
    result = test.compute(assignment=train.compute()["assignment"])
    assert result["accuracy"] == pytest.approx(1 / 8)
    np.testing.assert_allclose(result["per_class_iou"], iid_plus["per_class_iou"])
    # majority IID+: an empty cluster of the fit split maps to -1, so its pixels on the score split are errors
    result = fit_and_score([[3, 0], [0, 0]], [[1, 1], [2, 0]], matching="majority")
    assert result["assignment"].tolist() == [0, -1]
    assert result["accuracy"] == pytest.approx(1 / 4)


# ---------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------


def test_predicted_ids_out_of_range_raise():
    metric = UnsupervisedSegmentationMetric(num_classes=3, num_clusters=4)
    with pytest.raises(ValueError, match=r"\[0, num_clusters=4\).*\[0, 4\]"):
        metric.update(np.array([0, 4]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"num_clusters=4.*\[-1, 2\]"):
        metric.update(np.array([-1, 2]), np.array([0, 1]))
    # even where the label is ignored: an out-of-range id is a bug in the caller
    with pytest.raises(ValueError, match="num_clusters=3"):
        confusion_matrix(np.array([3]), np.array([255]), num_classes=3)
    assert int(metric.confusion_matrix.sum()) == 0  # nothing was half-counted


def test_shape_mismatch_names_both_shapes():
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    with pytest.raises(ValueError, match=r"preds \(2, 3\) and labels \(3, 2\)"):
        metric.update(np.zeros((2, 3), dtype=int), np.zeros((3, 2), dtype=int))
    with pytest.raises(ValueError, match=r"preds \(6,\) and labels \(2, 3\)"):
        confusion_matrix(torch.zeros(6, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 2)


def test_float_inputs_are_rejected():
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    with pytest.raises(TypeError, match="preds must hold integer ids.*float32"):
        metric.update(np.array([0.0, 1.0], dtype=np.float32), np.array([0, 1]))
    with pytest.raises(TypeError, match="preds must hold integer ids.*torch.float32.*argmax"):
        metric.update(torch.zeros(2, 2, 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must hold integer ids"):
        metric.update(np.array([0, 1]), np.array([0.0, 1.0]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        UnsupervisedSegmentationMetric(num_classes=0)
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        UnsupervisedSegmentationMetric(num_classes=3, num_clusters=-2)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        UnsupervisedSegmentationMetric(num_classes=2.0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        UnsupervisedSegmentationMetric(num_classes=True)
    with pytest.raises(ValueError, match="matching must be one of"):
        UnsupervisedSegmentationMetric(num_classes=3, matching="greedy")
    with pytest.raises(ValueError, match="matching must be one of"):
        match_clusters(np.eye(2, dtype=np.int64), matching="Hungarian")


def test_bad_matrices_and_assignments():
    with pytest.raises(ValueError, match="2-D"):
        hungarian_assignment(np.zeros(4, dtype=np.int64))
    with pytest.raises(TypeError, match="integer pixel counts"):
        majority_assignment(np.eye(2))
    with pytest.raises(ValueError, match="negative counts"):
        scores_from_confusion(np.array([[1, -1], [0, 1]]), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        scores_from_confusion(np.eye(2, dtype=np.int64), [0, 1, 2])
    with pytest.raises(ValueError, match=r"\[-1, num_classes=2\)"):
        scores_from_confusion(np.eye(2, dtype=np.int64), [0, 2])
    with pytest.raises(ValueError, match="differ in shape"):
        fit_and_score(np.eye(2, dtype=np.int64), np.eye(3, dtype=np.int64))
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    metric.update(np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="assignment"):
        metric.compute(assignment=[0.5, 1.0])


# ---------------------------------------------------------------------------------------------------------
# packaging
# ---------------------------------------------------------------------------------------------------------


def test_evaluation_module_does_not_import_evaluate_at_module_level():
    # `import evaluate` costs ~7 s; the metric must stay importable without it.
    source = (REPO_ROOT / "hf_useg" / "evaluation.py").read_text()
    top_level = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert "evaluate" not in top_level and "datasets" not in top_level
    assert {"numpy", "torch", "scipy"} <= top_level
    assert (Path(EVALUATE_MODULE_PATH) / "unsupervised_segmentation.py").is_file()
    assert (Path(EVALUATE_MODULE_PATH) / "README.md").is_file()
