"""Property-based tests (hypothesis) of the metric and of the transforms that move images and labels together.

Metric (`hf_useg.evaluation`): scores do not depend on how clusters are numbered, stay in their bounds, the three
matchings agree where they must, and merging the metrics of two halves of the pixels gives the metric of the whole.

Transforms: every image below encodes where its pixels come from (channel 0 = source row, channel 1 = source
column, as exact uint8 values or as relative coordinates), so after a transform the image itself says which source
pixel each output pixel shows, and the label at that place must be the source label there.

The examples are derandomized (profile ``hf_useg`` in `conftest.py`): every run checks the same cases.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install -e '.[dev]')")

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_useg.augmentation import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    random_resized_crop_box,
    resample_crops,
    square_crop_box,
)
from hf_useg.data.crops import expand_five_crops, five_crop, five_crop_boxes  # noqa: E402
from hf_useg.evaluation import (  # noqa: E402
    UnsupervisedSegmentationMetric,
    confusion_matrix,
    fit_and_score,
    match_clusters,
    scores_from_confusion,
)
from hf_useg.image_processing import (  # noqa: E402
    UnsupervisedSegmentationImageProcessor,
    protocol_image_processor,
    whole_image_processor,
)
from hf_useg.models.iic.loss_iic import iic_segmentation_loss  # noqa: E402
from hf_useg.models.iic.training_iic import make_iic_views  # noqa: E402
from hf_useg.models.picie.augmentation import apply_geometric, draw_view_parameters  # noqa: E402

MATCHINGS = ("hungarian", "majority", "none")
FAST = settings(max_examples=40)
SLOWER = settings(max_examples=15)


# =================================================================================================================
# metric
# =================================================================================================================


@st.composite
def segmentations(draw, max_clusters: int = 5, max_classes: int = 5, max_pixels: int = 60):
    """(preds, labels, num_clusters, num_classes): flat int64 maps with at least one valid label; labels include
    ignored values (-1, num_classes, 255)."""
    num_clusters = draw(st.integers(1, max_clusters))
    num_classes = draw(st.integers(1, max_classes))
    size = draw(st.integers(1, max_pixels))
    preds = draw(st.lists(st.integers(0, num_clusters - 1), min_size=size, max_size=size))
    label_values = st.one_of(st.integers(0, num_classes - 1), st.sampled_from([-1, num_classes, 255]))
    labels = draw(st.lists(label_values, min_size=size, max_size=size))
    labels[draw(st.integers(0, size - 1))] = draw(st.integers(0, num_classes - 1))  # at least one valid pixel
    return np.asarray(preds, np.int64), np.asarray(labels, np.int64), num_clusters, num_classes


def _score(preds, labels, num_clusters: int, num_classes: int, matching: str) -> dict:
    metric = UnsupervisedSegmentationMetric(num_classes, num_clusters=num_clusters, matching=matching)
    metric.update(preds, labels)
    return metric.compute()


def _assert_same_scores(a: dict, b: dict) -> None:
    for key in ("accuracy", "mean_iou", "num_pixels"):
        assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), (key, a[key], b[key])
    for key in ("per_class_iou", "per_class_accuracy"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _matched_pixels(matrix: np.ndarray, assignment: np.ndarray) -> int:
    return int(sum(matrix[k, c] for k, c in enumerate(assignment) if c >= 0))


@FAST
@given(segmentations(), st.randoms(use_true_random=False))
def test_scores_do_not_depend_on_cluster_numbering(data, rnd):
    preds, labels, num_clusters, num_classes = data
    perm = np.asarray(rnd.sample(range(num_clusters), num_clusters))  # cluster k is renamed perm[k]
    for matching in ("hungarian", "majority"):
        original = _score(preds, labels, num_clusters, num_classes, matching)
        renamed = _score(perm[preds], labels, num_clusters, num_classes, matching)
        np.testing.assert_array_equal(renamed["confusion_matrix"][perm], original["confusion_matrix"])
        assert renamed["accuracy"] == original["accuracy"], matching
        if matching == "majority":  # ties go to the lowest class id, whatever the cluster's number
            np.testing.assert_array_equal(renamed["assignment"][perm], original["assignment"])
            _assert_same_scores(renamed, original)
        # the renamed run's assignment, read back in the original numbering, scores the original identically
        pulled_back = scores_from_confusion(original["confusion_matrix"], renamed["assignment"][perm])
        _assert_same_scores(pulled_back, renamed)


@FAST
@given(segmentations(), st.randoms(use_true_random=False))
def test_accuracy_does_not_depend_on_class_numbering(data, rnd):
    preds, labels, num_clusters, num_classes = data
    perm = np.asarray(rnd.sample(range(num_classes), num_classes))
    valid = (labels >= 0) & (labels < num_classes)
    renamed_labels = np.where(valid, perm[np.clip(labels, 0, num_classes - 1)], labels)
    for matching in ("hungarian", "majority"):
        original = _score(preds, labels, num_clusters, num_classes, matching)
        renamed = _score(preds, renamed_labels, num_clusters, num_classes, matching)
        assert renamed["accuracy"] == original["accuracy"], matching


@FAST
@given(segmentations(max_clusters=5, max_classes=5), st.randoms(use_true_random=False))
def test_identity_matching_follows_a_joint_renaming_of_clusters_and_classes(data, rnd):
    # With K == C and "none", renaming cluster k and class k alike renames the per-class scores, nothing else.
    preds, labels, _, num_classes = data
    preds = preds % num_classes
    perm = np.asarray(rnd.sample(range(num_classes), num_classes))
    valid = (labels >= 0) & (labels < num_classes)
    renamed_labels = np.where(valid, perm[np.clip(labels, 0, num_classes - 1)], labels)
    original = _score(preds, labels, num_classes, num_classes, "none")
    renamed = _score(perm[preds], renamed_labels, num_classes, num_classes, "none")
    assert renamed["accuracy"] == original["accuracy"]
    np.testing.assert_array_equal(renamed["per_class_iou"][perm], original["per_class_iou"])
    np.testing.assert_array_equal(renamed["per_class_accuracy"][perm], original["per_class_accuracy"])
    assert renamed["mean_iou"] == pytest.approx(original["mean_iou"], rel=1e-12)


@FAST
@given(segmentations(max_clusters=4, max_classes=4))
def test_scores_stay_in_bounds_and_matchings_are_ordered(data):
    preds, labels, num_clusters, num_classes = data
    valid = (labels >= 0) & (labels < num_classes)
    results = {m: _score(preds, labels, num_clusters, num_classes, m) for m in MATCHINGS}
    for matching, result in results.items():
        assert result["num_pixels"] == int(valid.sum())
        assert result["num_ignored_pixels"] == int((~valid).sum())
        assert 0.0 <= result["accuracy"] <= 1.0, matching
        assert 0.0 <= result["mean_iou"] <= 1.0, matching
        iou, class_accuracy = result["per_class_iou"], result["per_class_accuracy"]
        assert np.all((np.isnan(iou)) | ((iou >= 0) & (iou <= 1))), matching
        # IoU = TP / (TP + FP + FN) <= TP / (TP + FN), defined wherever the class has pixels
        present = np.bincount(labels[valid], minlength=num_classes) > 0
        np.testing.assert_array_equal(~np.isnan(class_accuracy), present)
        assert np.all(iou[present] <= class_accuracy[present] + 1e-12), matching
        assert result["accuracy"] * result["num_pixels"] == pytest.approx(
            _matched_pixels(result["confusion_matrix"], result["assignment"])
        )
    matrix = results["hungarian"]["confusion_matrix"]
    # identity is one of the one-to-one maps hungarian maximises over; majority drops the one-to-one constraint
    assert results["none"]["accuracy"] <= results["hungarian"]["accuracy"] <= results["majority"]["accuracy"]
    assert _matched_pixels(matrix, results["hungarian"]["assignment"]) >= matrix.max()
    assert _matched_pixels(matrix, results["majority"]["assignment"]) == int(matrix.max(axis=1).sum())
    for row, cls in zip(matrix, results["majority"]["assignment"]):  # ties go to the lowest class; empty -> -1
        assert cls == (int(np.flatnonzero(row == row.max())[0]) if row.sum() else -1)


@FAST
@given(
    st.integers(1, 4).flatmap(
        lambda k: st.integers(1, 4).flatmap(
            lambda c: st.lists(st.lists(st.integers(0, 9), min_size=c, max_size=c), min_size=k, max_size=k)
        )
    )
)
def test_hungarian_is_the_best_one_to_one_matching(rows):
    matrix = np.asarray(rows, dtype=np.int64)
    num_clusters, num_classes = matrix.shape
    assignment = match_clusters(matrix, "hungarian")
    matched = assignment[assignment >= 0]
    assert len(set(matched.tolist())) == matched.size == min(num_clusters, num_classes)  # one-to-one, maximal
    size = min(num_clusters, num_classes)
    best = max(  # brute force over every one-to-one map of `size` clusters onto as many classes
        sum(int(matrix[k, c]) for k, c in zip(clusters, classes))
        for clusters in itertools.combinations(range(num_clusters), size)
        for classes in itertools.permutations(range(num_classes), size)
    )
    assert _matched_pixels(matrix, assignment) == best


@st.composite
def dominant_confusions(draw):
    """A confusion matrix [K, C] with K <= C whose every cluster has one clearly dominant class, all different:
    cluster k's row holds more pixels of class f(k) than of all the other classes together."""
    num_classes = draw(st.integers(1, 5))
    num_clusters = draw(st.integers(1, num_classes))
    classes = draw(st.permutations(range(num_classes)))[:num_clusters]
    matrix = np.asarray(
        draw(
            st.lists(
                st.lists(st.integers(0, 4), min_size=num_classes, max_size=num_classes),
                min_size=num_clusters,
                max_size=num_clusters,
            )
        ),
        dtype=np.int64,
    ).reshape(num_clusters, num_classes)
    for k, c in enumerate(classes):
        matrix[k, c] = matrix[k].sum() - matrix[k, c] + draw(st.integers(1, 6))
    return matrix, np.asarray(classes, np.int64)


@FAST
@given(dominant_confusions())
def test_hungarian_and_majority_agree_when_every_cluster_has_its_own_dominant_class(data):
    matrix, classes = data
    hungarian = scores_from_confusion(matrix, match_clusters(matrix, "hungarian"))
    majority = scores_from_confusion(matrix, match_clusters(matrix, "majority"))
    np.testing.assert_array_equal(hungarian["assignment"], classes)
    np.testing.assert_array_equal(majority["assignment"], classes)
    _assert_same_scores(hungarian, majority)
    # and the identity agrees with both when the dominant classes are the clusters' own numbers
    aligned = np.zeros_like(matrix)
    aligned[:, : matrix.shape[0]] = matrix[:, classes]
    aligned[:, matrix.shape[0] :] = np.delete(matrix, classes, axis=1)
    results = [scores_from_confusion(aligned, match_clusters(aligned, m)) for m in MATCHINGS]
    for result in results[1:]:
        np.testing.assert_array_equal(result["assignment"], results[0]["assignment"])
        _assert_same_scores(result, results[0])


@FAST
@given(segmentations(max_clusters=5, max_classes=5), st.randoms(use_true_random=False))
def test_a_relabelled_ground_truth_scores_one_under_hungarian_and_majority(data, rnd):
    _, labels, _, num_classes = data
    perm = np.asarray(rnd.sample(range(num_classes), num_classes))
    valid = (labels >= 0) & (labels < num_classes)
    preds = np.where(valid, perm[np.clip(labels, 0, num_classes - 1)], 0)  # ignored pixels may predict anything
    present = np.unique(labels[valid])
    for matching in ("hungarian", "majority"):
        result = _score(preds, labels, num_classes, num_classes, matching)
        assert result["accuracy"] == 1.0 and result["mean_iou"] == 1.0, matching
        np.testing.assert_array_equal(result["assignment"][perm[present]], present)
    identity = _score(preds, labels, num_classes, num_classes, "none")
    assert identity["accuracy"] == pytest.approx(np.mean(perm[labels[valid]] == labels[valid]))


@FAST
@given(segmentations(max_pixels=80), st.data())
def test_merging_the_metrics_of_parts_gives_the_metric_of_the_whole(data, draw):
    preds, labels, num_clusters, num_classes = data
    matching = draw.draw(st.sampled_from(MATCHINGS))
    num_parts = draw.draw(st.integers(2, 4))
    part_of = np.asarray(draw.draw(st.lists(st.integers(0, num_parts - 1), min_size=preds.size, max_size=preds.size)))
    parts = []
    for part in range(num_parts):
        metric = UnsupervisedSegmentationMetric(num_classes, num_clusters=num_clusters, matching=matching)
        chosen = part_of == part
        # some parts get their pixels in several update() calls, or none at all
        for chunk in np.array_split(np.flatnonzero(chosen), draw.draw(st.integers(1, 3))):
            metric.update(preds[chunk], labels[chunk])
        parts.append(metric)
    whole = _score(preds, labels, num_clusters, num_classes, matching)

    before = [p.confusion_matrix.clone() for p in parts]
    added = parts[0] + parts[1]
    assert torch.equal(parts[0].confusion_matrix, before[0]) and torch.equal(parts[1].confusion_matrix, before[1])
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    assert torch.equal(merged.confusion_matrix, torch.from_numpy(whole["confusion_matrix"]))
    result = merged.compute()
    _assert_same_scores(result, whole)
    np.testing.assert_array_equal(result["assignment"], whole["assignment"])
    assert result["num_ignored_pixels"] == whole["num_ignored_pixels"]
    if num_parts == 2:
        _assert_same_scores(added.compute(), whole)
    # the confusion matrix is the sum of the parts' matrices, also through the functional API
    summed = sum(
        confusion_matrix(preds[part_of == p], labels[part_of == p], num_classes, num_clusters)
        for p in range(num_parts)
    )
    assert torch.equal(summed, merged.confusion_matrix)


@FAST
@given(segmentations(), segmentations(), st.sampled_from(MATCHINGS))
def test_fit_and_score_on_one_split_is_compute_with_its_assignment(fit_data, score_data, matching):
    # the second split is reshaped to the first's cluster/class counts
    preds, labels, num_clusters, num_classes = fit_data
    score_preds = score_data[0] % num_clusters
    score_labels = np.where(score_data[1] >= 0, score_data[1] % (num_classes + 1), -1)
    assume(((score_labels >= 0) & (score_labels < num_classes)).any())
    fit = UnsupervisedSegmentationMetric(num_classes, num_clusters=num_clusters, matching=matching)
    fit.update(preds, labels)
    score = UnsupervisedSegmentationMetric(num_classes, num_clusters=num_clusters, matching=matching)
    score.update(score_preds, score_labels)
    fitted = fit.compute()
    transferred = fit_and_score(fit.confusion_matrix, score.confusion_matrix, matching)
    _assert_same_scores(transferred, score.compute(assignment=fitted["assignment"]))
    np.testing.assert_array_equal(transferred["assignment"], fitted["assignment"])
    # fitted and scored on the same split: the ordinary compute()
    _assert_same_scores(fit_and_score(fit.confusion_matrix, fit.confusion_matrix, matching), fitted)


# =================================================================================================================
# image processor: shorter-side nearest resize + center crop (protocol) or resize to multiples (whole image)
# =================================================================================================================


@st.composite
def coded_images(draw, max_side: int = 40):
    """(image [H, W, 3] uint8 with channel 0 = row, 1 = column, 2 = label % 256; labels [H, W] int64)."""
    height, width = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    num_labels = draw(st.sampled_from([2, 7, 256, 1000]))  # 1000: the int32 ("I") path of label resizing
    seed = draw(st.integers(0, 2**16))
    labels = np.random.default_rng(seed).integers(0, num_labels, size=(height, width))
    rows, cols = np.indices((height, width))
    image = np.stack([rows, cols, labels % 256], axis=-1).astype(np.uint8)
    return image, labels


def _as_input(image: np.ndarray, labels: np.ndarray, kind: str):
    if kind == "numpy":
        dtype = np.uint8 if labels.max() < 256 else np.int32
        return image, labels.astype(dtype)
    if kind == "pil":
        mode_labels = labels.astype(np.uint8) if labels.max() < 256 else labels.astype(np.int32)
        return Image.fromarray(image, "RGB"), Image.fromarray(mode_labels, "L" if labels.max() < 256 else "I")
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(labels)


def _check_aligned(pixel_values: np.ndarray, out_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every labelled output pixel carries the source label of the source pixel its image pixel shows; padded
    pixels (label -1) are black. Returns the mask of labelled pixels."""
    rows, cols = pixel_values[0].astype(np.int64), pixel_values[1].astype(np.int64)
    labelled = out_labels != -1
    assert np.all(pixel_values[:, ~labelled] == 0), "padded label pixels must be padded image pixels"
    np.testing.assert_array_equal(out_labels[labelled], labels[rows[labelled], cols[labelled]])
    np.testing.assert_array_equal(pixel_values[2][labelled], labels[rows[labelled], cols[labelled]] % 256)
    # a nearest resize is separable and keeps the order: row sources depend on the row only, and increase
    if labelled.any():
        kept_rows = np.flatnonzero(labelled.any(axis=1))
        kept_cols = np.flatnonzero(labelled.any(axis=0))
        block = np.ix_(kept_rows, kept_cols)
        assert np.all(rows[block] == rows[block][:, :1]) and np.all(cols[block] == cols[block][:1, :])
        assert np.all(np.diff(rows[block][:, 0]) >= 0) and np.all(np.diff(cols[block][0, :]) >= 0)
    return labelled


RAW = {"do_rescale": False, "do_normalize": False, "return_tensors": "np"}


@SLOWER
@given(coded_images(), st.integers(1, 24), st.sampled_from(["numpy", "pil", "torch"]))
def test_protocol_processor_keeps_labels_aligned(data, resolution, kind):
    image, labels = data
    processor = protocol_image_processor(resolution)
    batch = processor(*_as_input(image, labels, kind), **RAW)
    pixel_values, out_labels = batch["pixel_values"][0], batch["labels"][0]
    assert pixel_values.shape == (3, resolution, resolution) and out_labels.shape == (resolution, resolution)
    labelled = _check_aligned(pixel_values, out_labels, labels)
    assert labelled.all()  # the crop never exceeds the resized image: nothing is padded


@SLOWER
@given(
    coded_images(max_side=24),
    st.integers(1, 20),
    st.integers(1, 30),
    st.integers(1, 30),
)
def test_center_crop_larger_than_the_image_pads_both_alike(data, shortest_edge, crop_h, crop_w):
    image, labels = data
    processor = UnsupervisedSegmentationImageProcessor(
        size={"shortest_edge": shortest_edge}, crop_size={"height": crop_h, "width": crop_w}
    )
    batch = processor(image, segmentation_maps=labels, **RAW)
    pixel_values, out_labels = batch["pixel_values"][0], batch["labels"][0]
    assert out_labels.shape == (crop_h, crop_w)
    labelled = _check_aligned(pixel_values, out_labels, labels)
    resized = processor._target_size(labels.shape, True, processor.size, True, None)
    assert int(labelled.sum()) == min(resized[0], crop_h) * min(resized[1], crop_w)


@SLOWER
@given(coded_images(), st.integers(1, 24), st.sampled_from([1, 2, 8]), st.sampled_from(["numpy", "pil", "torch"]))
def test_whole_image_processor_keeps_labels_aligned_and_the_whole_image(data, resolution, size_divisor, kind):
    image, labels = data
    processor = whole_image_processor(resolution, size_divisor=size_divisor)
    batch = processor(*_as_input(image, labels, kind), **RAW)
    pixel_values, out_labels = batch["pixel_values"][0], batch["labels"][0]
    out_h, out_w = out_labels.shape
    assert out_h % size_divisor == 0 and out_w % size_divisor == 0
    assert _check_aligned(pixel_values, out_labels, labels).all()
    # nothing is cut off: the first and last output rows/columns show the image's borders (nearest sampling
    # skips at most one source step at each side)
    height, width = labels.shape
    rows, cols = pixel_values[0], pixel_values[1]
    assert rows.min() <= height / out_h and rows.max() >= height - 1 - height / out_h
    assert cols.min() <= width / out_w and cols.max() >= width - 1 - width / out_w


# =================================================================================================================
# five crops
# =================================================================================================================


@FAST
@given(st.integers(1, 200), st.integers(1, 200), st.floats(0.05, 1.0))
def test_five_crop_boxes_lie_inside_the_image(height, width, ratio):
    crop_h, crop_w = int(height * ratio), int(width * ratio)
    assume(crop_h >= 1 and crop_w >= 1)
    boxes = five_crop_boxes(height, width, ratio)
    assert len(boxes) == 5
    for top, left, h, w in boxes:
        assert (h, w) == (crop_h, crop_w)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert boxes[:4] == [
        (0, 0, crop_h, crop_w),
        (0, width - crop_w, crop_h, crop_w),
        (height - crop_h, 0, crop_h, crop_w),
        (height - crop_h, width - crop_w, crop_h, crop_w),
    ]
    center_top, center_left = boxes[4][:2]
    assert abs(center_top + crop_h / 2 - height / 2) <= 0.5 and abs(center_left + crop_w / 2 - width / 2) <= 0.5


@FAST
@given(coded_images(), st.floats(0.1, 1.0))
def test_five_crop_cuts_image_and_label_at_the_same_place(data, ratio):
    image, labels = data
    height, width = labels.shape
    assume(int(height * ratio) >= 1 and int(width * ratio) >= 1)
    boxes = five_crop_boxes(height, width, ratio)
    for kind in ("numpy", "torch", "pil"):
        image_in, labels_in = _as_input(image, labels, kind)
        for box, image_crop, label_crop in zip(boxes, five_crop(image_in, ratio), five_crop(labels_in, ratio)):
            image_crop, label_crop = np.asarray(image_crop), np.asarray(label_crop)
            if kind == "torch":
                image_crop = image_crop.transpose(1, 2, 0)
            top, left, h, w = box
            rows, cols = image_crop[..., 0].astype(np.int64), image_crop[..., 1].astype(np.int64)
            np.testing.assert_array_equal(rows, top + np.arange(h)[:, None].repeat(w, 1))
            np.testing.assert_array_equal(cols, left + np.arange(w)[None, :].repeat(h, 0))
            np.testing.assert_array_equal(label_crop, labels[rows, cols])


@settings(max_examples=5)
@given(st.lists(coded_images(max_side=16), min_size=1, max_size=2), st.sampled_from([0.5, 0.3, 1.0]))
def test_expand_five_crops_keeps_labels_aligned(items, ratio):
    import datasets

    items = [(image, labels % 256) for image, labels in items]  # "L" PNG labels
    assume(all(int(lab.shape[0] * ratio) >= 1 and int(lab.shape[1] * ratio) >= 1 for _, lab in items))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    source = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(image, "RGB") for image, _ in items],
            "label": [Image.fromarray(lab.astype(np.uint8), "L") for _, lab in items],
        },
        features=features,
    )
    crops = expand_five_crops(source, ratio)
    assert len(crops) == 5 * len(items)
    for index in range(len(crops)):
        row = crops[index]
        image, labels = items[row["source_index"]]
        assert row["crop_index"] == index % 5 and row["source_index"] == index // 5
        top, left, h, w = five_crop_boxes(*labels.shape, ratio)[row["crop_index"]]
        image_crop, label_crop = np.asarray(row["image"]), np.asarray(row["label"])
        assert image_crop.shape[:2] == label_crop.shape == (h, w)
        rows, cols = image_crop[..., 0].astype(np.int64), image_crop[..., 1].astype(np.int64)
        assert rows.min() == top and cols.min() == left
        np.testing.assert_array_equal(label_crop, labels[rows, cols])


# =================================================================================================================
# crops and flips of the augmentation module, PiCIE's geometric transform, IIC's flip
# =================================================================================================================


@FAST
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
    st.tuples(st.floats(0.2, 1.0), st.floats(1.0, 5.0)),
    st.integers(0, 2**16),
)
def test_random_resized_crop_box_lies_inside_the_image(width, height, scale, ratio, seed):
    left, top, crop_w, crop_h = random_resized_crop_box(
        width, height, scale, ratio, generator=torch.Generator().manual_seed(seed)
    )
    assert crop_w >= 1 and crop_h >= 1
    assert 0 <= left and left + crop_w <= width and 0 <= top and top + crop_h <= height


def _coordinate_images(batch: int, height: int, width: int) -> torch.Tensor:
    """[B, 2, H, W] float64: channel 0 = relative row of the pixel centre, 1 = relative column."""
    rows = ((torch.arange(height, dtype=torch.float64) + 0.5) / height)[:, None].expand(height, width)
    cols = ((torch.arange(width, dtype=torch.float64) + 0.5) / width)[None, :].expand(height, width)
    return torch.stack([rows, cols])[None].expand(batch, -1, -1, -1).contiguous()


@st.composite
def geometric_params(draw, batch: int):
    """Rows of `PicieViewParameters.geometric`: drawn directly (edge cases included) or by the recipe's sampler."""
    if draw(st.booleans()):
        return draw_view_parameters(batch, seed=draw(st.integers(0, 1000)), epoch=draw(st.integers(0, 50))).geometric
    rows = [
        [draw(st.floats(0.05, 1.0)), draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 1.0)), float(draw(st.booleans()))]
        for _ in range(batch)
    ]
    return torch.tensor(rows, dtype=torch.float64)


@SLOWER
@given(st.data(), st.integers(1, 3), st.integers(1, 24), st.integers(1, 24), st.integers(1, 12), st.integers(1, 12))
def test_picie_geometric_transform_samples_the_same_place_at_every_resolution(
    data, batch, height, width, out_h, out_w
):
    # Coordinates are affine in the pixel position, so bilinear sampling returns exactly the relative position
    # each output pixel samples (clamped to the outermost pixel centres by the border padding): the crop box and
    # the flip, as fractions of the image, whatever the input resolution (image or feature map).
    params = data.draw(geometric_params(batch))
    out = apply_geometric(_coordinate_images(batch, height, width), params, (out_h, out_w))
    assert out.shape == (batch, 2, out_h, out_w)
    box = square_crop_box(params[:, 0], params[:, 1], params[:, 2])
    rows = box[:, 0:1] + box[:, 2:3] * (torch.arange(out_h, dtype=torch.float64) + 0.5) / out_h
    cols = (torch.arange(out_w, dtype=torch.float64) + 0.5) / out_w
    cols = torch.where(params[:, 3:4] != 0, 1.0 - cols, cols)
    cols = box[:, 1:2] + box[:, 3:4] * cols
    rows, cols = rows.clamp(0.5 / height, 1 - 0.5 / height), cols.clamp(0.5 / width, 1 - 0.5 / width)
    torch.testing.assert_close(out[:, 0], rows[:, :, None].expand(-1, -1, out_w), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1], cols[:, None, :].expand(-1, out_h, -1), atol=1e-6, rtol=0)
    # a flip is a mirror of the unflipped crop
    unflipped = params.clone()
    unflipped[:, 3] = 0
    plain = apply_geometric(_coordinate_images(batch, height, width), unflipped, (out_h, out_w))
    flipped = params[:, 3] != 0
    torch.testing.assert_close(out[flipped], plain[flipped].flip(-1), atol=1e-6, rtol=0)


@SLOWER
@given(st.integers(1, 3), st.integers(1, 16), st.integers(1, 16), st.integers(0, 2**16))
def test_resample_crops_of_the_whole_image_is_the_identity_or_a_flip(batch, height, width, seed):
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flipped = torch.arange(batch) % 2 == 1
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * batch, dtype=torch.float64)
    out = resample_crops(images, whole, flipped, (height, width))
    expected = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=0)


def _normalised_rgb(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    rgb = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (rgb - mean) / std


def _back_to_view1(pair: torch.Tensor, affine2_to_1: torch.Tensor) -> torch.Tensor:
    # as in `iic_segmentation_loss`
    grid = F.affine_grid(affine2_to_1, list(pair.shape), align_corners=False)
    return F.grid_sample(pair, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@SLOWER
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_iic_affine_brings_the_flipped_view_back_onto_view_one(batch, height, width, seed, flip_p):
    pixel_values = _normalised_rgb(batch, height, width, seed)
    views = make_iic_views(
        pixel_values, torch.Generator().manual_seed(seed), brightness=0, contrast=0, saturation=0, hue=0, flip_p=flip_p
    )
    assert torch.equal(views.pixel_values, pixel_values)
    expected_pair = torch.where(views.flipped[:, None, None, None], pixel_values.flip(-1), pixel_values)
    torch.testing.assert_close(views.pixel_values_pair, expected_pair, atol=1e-5, rtol=0)
    torch.testing.assert_close(views.affine2_to_1[:, 0, 0], torch.where(views.flipped, -1.0, 1.0))
    torch.testing.assert_close(
        _back_to_view1(views.pixel_values_pair, views.affine2_to_1), pixel_values, atol=1e-4, rtol=0
    )

    # end to end: with per-pixel "predictions", the loss of (view 1, view 2 + affine) is the loss of the view with
    # itself, so IIC's objective compares each pixel with itself and not with its mirror image
    weights = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed + 1))
    probs = [torch.einsum("kc,bchw->bkhw", weights, v).softmax(dim=1) for v in (pixel_values, views.pixel_values_pair)]
    paired, _ = iic_segmentation_loss(probs[0], probs[1], affine2_to_1=views.affine2_to_1, displacement=0)
    itself, _ = iic_segmentation_loss(probs[0], probs[0], displacement=0)
    torch.testing.assert_close(paired, itself, atol=1e-4, rtol=1e-4)


@SLOWER
@given(st.integers(1, 4), st.integers(1, 10), st.integers(1, 10), st.integers(0, 2**16), st.integers(1, 6))
def test_iic_mask_of_unlabelled_pixels_stays_in_view_one(batch, height, width, seed, num_classes):
    # labels belong to view 1 (never flipped): the mask is the valid labels where they are, whatever view 2 did
    pixel_values = _normalised_rgb(batch, height, width, seed)
    labels = torch.randint(-1, num_classes + 1, (batch, height, width), generator=torch.Generator().manual_seed(seed))
    views = make_iic_views(
        pixel_values, torch.Generator().manual_seed(seed), labels=labels, num_classes=num_classes, mask_unlabelled=True
    )
    torch.testing.assert_close(views.mask, ((labels >= 0) & (labels < num_classes)).float())
    assert views.pixel_values_pair.shape == pixel_values.shape
    torch.testing.assert_close(views.affine2_to_1[:, 0, 0], torch.where(views.flipped, -1.0, 1.0))
