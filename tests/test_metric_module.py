"""The `evaluate` module (hf_useg/metrics/unsupervised_segmentation) loads offline from the checkout and gives
exactly the numbers of `hf_useg.evaluation.UnsupervisedSegmentationMetric`.

`import evaluate` takes several seconds, so it happens inside a module-scoped fixture (never at collection)
and every test here is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hf_useg.evaluation import EVALUATE_MODULE_PATH, UnsupervisedSegmentationMetric

pytestmark = pytest.mark.slow

MODULE_DIR = Path(__file__).resolve().parents[1] / "hf_useg" / "metrics" / "unsupervised_segmentation"
RESULT_KEYS = (
    "accuracy",
    "mean_iou",
    "per_class_iou",
    "per_class_accuracy",
    "assignment",
    "confusion_matrix",
    "num_pixels",
    "num_ignored_pixels",
)


@pytest.fixture(scope="module")
def module():
    evaluate = pytest.importorskip("evaluate")
    # The checkout's folder, as a user would pass it; keep_in_memory avoids Arrow cache files.
    return evaluate.load(str(MODULE_DIR), keep_in_memory=True)


def _random_maps(seed: int, num_clusters: int, num_classes: int, count: int = 6):
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for _ in range(count):
        shape = tuple(rng.integers(3, 40, size=2))  # every map has its own size
        preds = rng.integers(0, num_clusters, size=shape)
        labels = np.where(rng.random(shape) < 0.5, preds % num_classes, rng.integers(0, num_classes, size=shape))
        labels[rng.random(shape) < 0.1] = 255  # ignored
        predictions.append(preds)
        references.append(labels.astype(np.uint8))
    return predictions, references


def _class_result(predictions, references, **kwargs):
    metric = UnsupervisedSegmentationMetric(**kwargs)
    for preds, labels in zip(predictions, references):
        metric.update(preds, labels)
    return metric.compute()


def _assert_same(result, expected):
    assert set(RESULT_KEYS) <= set(result)
    for key in RESULT_KEYS:
        np.testing.assert_array_equal(result[key], expected[key], err_msg=key)  # NaN == NaN here


def test_module_path_is_the_packaged_folder():
    assert Path(EVALUATE_MODULE_PATH) == MODULE_DIR


def test_worked_example(module):
    # map 1: (cluster 1, class 0) x2, (0, 1) x1, one ignored pixel; map 2: (0, 1), (1, 0), (1, 1)
    # M = [[0, 2], [3, 1]] -> Hungarian swaps the clusters: 5 of 6 pixels right.
    predictions = [np.array([[1, 1], [0, 0]]), np.array([[0, 1, 1]])]
    references = [np.array([[0, 0], [1, 255]]), np.array([[1, 0, 1]])]
    result = module.compute(predictions=predictions, references=references, num_classes=2)
    assert result["confusion_matrix"].tolist() == [[0, 2], [3, 1]]
    assert result["assignment"].tolist() == [1, 0]
    assert result["accuracy"] == pytest.approx(5 / 6)
    # class 0: TP 3, FP 1, FN 0 -> 3/4; class 1: TP 2, FP 0, FN 1 -> 2/3
    np.testing.assert_allclose(result["per_class_iou"], [3 / 4, 2 / 3])
    assert result["num_ignored_pixels"] == 1


@pytest.mark.parametrize(
    "matching,num_clusters,num_classes",
    [("hungarian", 5, 5), ("hungarian", 8, 5), ("majority", 9, 4), ("none", 5, 5)],
)
def test_same_numbers_as_the_class(module, matching, num_clusters, num_classes):
    predictions, references = _random_maps(num_clusters, num_clusters, num_classes)
    result = module.compute(
        predictions=predictions,
        references=references,
        num_classes=num_classes,
        num_clusters=num_clusters,
        matching=matching,
    )
    expected = _class_result(
        predictions, references, num_classes=num_classes, num_clusters=num_clusters, matching=matching
    )
    _assert_same(result, expected)
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["mean_iou"] <= 1.0
    assert result["confusion_matrix"].shape == (num_clusters, num_classes)


def test_add_batch_then_compute_and_iid_plus_assignment(module):
    predictions, references = _random_maps(0, 6, 6, count=8)
    for start in range(0, 8, 3):
        module.add_batch(predictions=predictions[start : start + 3], references=references[start : start + 3])
    result = module.compute(num_classes=6)
    _assert_same(result, _class_result(predictions, references, num_classes=6))
    # IID+: a mapping fitted elsewhere is applied as given
    assignment = [5, 4, 3, 2, 1, 0]
    result = module.compute(predictions=predictions, references=references, num_classes=6, assignment=assignment)
    metric = UnsupervisedSegmentationMetric(num_classes=6)
    for preds, labels in zip(predictions, references):
        metric.update(preds, labels)
    assert result["assignment"].tolist() == assignment
    _assert_same(result, metric.compute(assignment=np.asarray(assignment)))


def test_errors_name_the_map(module):
    predictions, references = _random_maps(1, 3, 3, count=3)
    predictions[1] = predictions[1].copy()
    predictions[1][0, 0] = 3
    with pytest.raises(ValueError, match=r"map 1: predicted cluster ids must lie in \[0, num_clusters=3\)"):
        module.compute(predictions=predictions, references=references, num_classes=3)
    with pytest.raises(ValueError, match=r"map 0: preds and labels must have the same shape.*\(2, 3\).*\(3, 2\)"):
        module.compute(
            predictions=[np.zeros((2, 3), dtype=int)], references=[np.zeros((3, 2), dtype=int)], num_classes=3
        )
