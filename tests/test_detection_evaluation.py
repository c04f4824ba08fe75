"""Tests of the detection AP evaluators (`hf_useg.evaluation`, METHODS.md section 5, issue 11).

Worked examples are computed by hand in the comments. `_reference_voc07` is an independent, loop-by-loop
transcription of the classic VOC devkit's `voc_eval` (per threshold, per class, per detection, per ground truth;
no vectorisation) that the vectorised `voc07_detection_ap` is checked against on random held-out cases.
`coco_detection_ap` is pycocotools itself; its tests check the wrapping (box conversion, ids, categories, maxDets)
on cases whose 101-point AP is derived by hand.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from hf_useg.evaluation import coco_detection_ap, voc07_detection_ap

# pycocotools' precision is tp / (tp + fp + eps): a perfect score reads 1 - 2e-16.
COCO_TOL = 1e-12


def _pred(boxes, scores, labels):
    return {"boxes": boxes, "scores": scores, "labels": labels}


def _ref(boxes, labels, difficult=None):
    ref = {"boxes": boxes, "labels": labels}
    if difficult is not None:
        ref["difficult"] = difficult
    return ref


NO_PRED = _pred([], [], [])


# ---------------------------------------------------------------------------------------------------------------------
# Independent VOC devkit transcription
# ---------------------------------------------------------------------------------------------------------------------


def _voc_eval_one(dets, gts, cls, ovthresh):
    """`voc_eval` for one class and threshold.

    dets: [(image, score, box, label)], gts: {image: [(box, label, difficult)]}.
    """
    class_recs = {}
    npos = 0
    for image, objects in gts.items():
        bbox = [box for box, label, _ in objects if label == cls]
        difficult = [diff for _, label, diff in objects if label == cls]
        class_recs[image] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(bbox)}
        for diff in difficult:
            if not diff:
                npos += 1
    mine = [(image, score, box) for image, score, box, label in dets if label == cls]
    mine = sorted(mine, key=lambda det: -det[1])  # Python's sort is stable: ties keep input order
    nd = len(mine)
    tp = [0.0] * nd
    fp = [0.0] * nd
    for d in range(nd):
        image, _, bb = mine[d]
        R = class_recs[image]
        ovmax = -math.inf
        jmax = -1
        for j in range(len(R["bbox"])):
            bbgt = R["bbox"][j]
            ixmin = max(bbgt[0], bb[0])
            iymin = max(bbgt[1], bb[1])
            ixmax = min(bbgt[2], bb[2])
            iymax = min(bbgt[3], bb[3])
            iw = max(ixmax - ixmin + 1.0, 0.0)
            ih = max(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (bbgt[2] - bbgt[0] + 1.0) * (bbgt[3] - bbgt[1] + 1.0)
                - inters
            )
            ov = inters / uni
            if ov > ovmax:
                ovmax = ov
                jmax = j
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    rec, prec = [], []
    ctp = cfp = 0.0
    for d in range(nd):
        ctp += tp[d]
        cfp += fp[d]
        rec.append(ctp / npos)
        prec.append(ctp / max(ctp + cfp, np.finfo(np.float64).eps))
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):  # the devkit's grid, float quirks included
        candidates = [p for r, p in zip(rec, prec) if r >= t]
        ap += (max(candidates) if candidates else 0.0) / 11.0
    return ap


def _reference_voc07(predictions, references):
    dets, gts = [], {}
    for image, (pred, ref) in enumerate(zip(predictions, references)):
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
            dets.append((image, float(score), [float(v) for v in box], int(label)))
        difficult = ref.get("difficult", [False] * len(ref["labels"]))
        gts[image] = [
            ([float(v) for v in box], int(label), bool(diff))
            for box, label, diff in zip(ref["boxes"], ref["labels"], difficult)
        ]
    classes = sorted({label for objects in gts.values() for _, label, diff in objects if not diff})
    if not classes:
        return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan}
    maps = {}
    for thresh in range(50, 100, 5):
        aps = [_voc_eval_one(dets, gts, cls, thresh / 100.0) for cls in classes]
        maps[thresh] = sum(aps) / len(aps)
    return {"ap": sum(maps.values()) / len(maps), "ap50": maps[50], "ap75": maps[75]}


def _random_case(seed: int, num_classes: int = 3, half_pixels: bool = False):
    """Random images: gts (some difficult), jittered detections, duplicates, wrong labels, clutter, empty images."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for _ in range(int(rng.integers(1, 9))):
        kind = rng.random()
        n_gt = 0 if kind < 0.2 else int(rng.integers(1, 6))
        xy = rng.integers(0, 80, size=(n_gt, 2))
        wh = rng.integers(0, 40, size=(n_gt, 2))
        gt_boxes = np.concatenate([xy, xy + wh], axis=1).astype(float)
        gt_labels = rng.integers(0, num_classes, size=n_gt)
        difficult = rng.random(n_gt) < 0.2
        boxes, labels = [], []
        if kind >= 0.1:  # else: no predictions at all for this image
            for box, label in zip(gt_boxes, gt_labels):
                for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # missed, found, duplicated
                    step = 0.5 if half_pixels else 1.0
                    jitter = rng.integers(-4, 5, size=4) * step
                    new = box + jitter
                    new[2:] = np.maximum(new[2:], new[:2])
                    boxes.append(new)
                    labels.append(label if rng.random() < 0.85 else int(rng.integers(0, num_classes + 1)))
            for _ in range(int(rng.integers(0, 4))):  # clutter
                x, y = rng.integers(0, 100, size=2)
                w, h = rng.integers(0, 30, size=2)
                boxes.append(np.array([x, y, x + w, y + h], dtype=float))
                labels.append(int(rng.integers(0, num_classes)))
        scores = rng.random(len(boxes))
        if seed % 2:
            scores = np.round(scores, 1)  # ties
        predictions.append(_pred(np.array(boxes).reshape(-1, 4), scores, np.array(labels, dtype=np.int64)))
        references.append(_ref(gt_boxes, gt_labels, difficult))
    return predictions, references


def _assert_scores(actual, expected, tol=1e-12):
    assert set(actual) == {"ap", "ap50", "ap75"}
    for key in ("ap", "ap50", "ap75"):
        if math.isnan(expected[key]):
            assert math.isnan(actual[key]), (key, actual, expected)
        else:
            assert actual[key] == pytest.approx(expected[key], abs=tol), (key, actual, expected)


# ---------------------------------------------------------------------------------------------------------------------
# VOC07 (DETReg's evaluator)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_voc07_matches_independent_devkit_transcription(seed):
    predictions, references = _random_case(seed, half_pixels=seed >= 8)
    expected = _reference_voc07(predictions, references)
    _assert_scores(voc07_detection_ap(predictions, references), expected)


def test_random_cases_are_not_degenerate():
    # The held-out cases exercise what they should: partial scores, difficult flags, empty images.
    values, difficult, empty = [], 0, 0
    for seed in range(12):
        predictions, references = _random_case(seed, half_pixels=seed >= 8)
        values.append(_reference_voc07(predictions, references)["ap"])
        difficult += sum(int(np.sum(ref["difficult"])) for ref in references)
        empty += sum(len(pred["scores"]) == 0 for pred in predictions) + sum(len(r["labels"]) == 0 for r in references)
    assert sum(0.05 < v < 0.95 for v in values) >= 8
    assert difficult >= 5 and empty >= 3


def test_voc07_perfect_detections():
    refs = [_ref([[0, 0, 9, 9], [20, 20, 49, 39]], [0, 1]), _ref([[5, 5, 30, 30]], [1])]
    preds = [_pred([[0, 0, 9, 9], [20, 20, 49, 39]], [0.9, 0.8], [0, 1]), _pred([[5, 5, 30, 30]], [0.7], [1])]
    assert voc07_detection_ap(preds, refs) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}


def test_voc07_no_detections_is_zero_and_no_ground_truth_is_nan():
    refs = [_ref([[0, 0, 9, 9]], [0]), _ref([], [])]
    assert voc07_detection_ap([NO_PRED, NO_PRED], refs) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    preds = [_pred([[0, 0, 9, 9]], [0.9], [0])]
    for refs in ([_ref([], [])], [_ref([[0, 0, 9, 9]], [0], [True])]):  # nothing, or only difficult gts
        assert all(math.isnan(v) for v in voc07_detection_ap(preds, refs).values())
    assert all(math.isnan(v) for v in voc07_detection_ap([], []).values())


def test_voc07_strict_threshold_and_plus_one_convention():
    gt = [_ref([[0, 0, 19, 9]], [0])]  # 20 x 10 = 200 pixels with the +1 convention

    def ap_of(box):
        return voc07_detection_ap([_pred([box], [0.9], [0])], gt)

    # [0, 0, 9, 9]: 10 x 10 inside the gt, IoU 100 / 200 = 0.5 exactly: not > 0.5, a false positive everywhere.
    assert ap_of([0, 0, 9, 9]) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    # [0, 0, 10, 9]: IoU 110 / 200 = 0.55: a true positive at 0.50 only (not > 0.55): AP = 1 / 10 thresholds.
    assert ap_of([0, 0, 10, 9]) == {"ap": pytest.approx(0.1), "ap50": 1.0, "ap75": 0.0}
    # [0, 0, 14, 9]: IoU 150 / 200 = 0.75: true positive at 0.50 ... 0.70 (5 thresholds) but not at 0.75.
    assert ap_of([0, 0, 14, 9]) == {"ap": pytest.approx(0.5), "ap50": 1.0, "ap75": 0.0}
    # [0, 0, 9.5, 9]: with +1 pixels IoU 105 / 200 = 0.525 > 0.5 (a hit at 0.50); without them it would be
    # 9.5 * 9 / (19 * 9) = 0.5, not above: the +1 convention decides this one.
    assert ap_of([0, 0, 9.5, 9]) == {"ap": pytest.approx(0.1), "ap50": 1.0, "ap75": 0.0}
    # Touching boxes overlap by one pixel column under the +1 convention: [19, 0, 38, 9] vs the gt: 10 / 390.
    assert ap_of([19, 0, 38, 9])["ap50"] == 0.0


def test_voc07_false_positive_between_hits_11_point():
    # Two gts in two images; scores: hit (img 0), miss, hit (img 1). Recall .5 .5 1, precision 1 .5 2/3.
    # 11 points: t = 0 ... 0.5 (6 points) -> 1, t = 0.6 ... 1 (5 points) -> 2/3: AP = (6 + 10/3) / 11 = 28/33.
    refs = [_ref([[0, 0, 9, 9]], [0]), _ref([[50, 50, 69, 59]], [0])]
    preds = [
        _pred([[0, 0, 9, 9], [30, 30, 40, 40]], [0.9, 0.8], [0, 0]),
        _pred([[50, 50, 69, 59]], [0.7], [0]),
    ]
    _assert_scores(voc07_detection_ap(preds, refs), {"ap": 28 / 33, "ap50": 28 / 33, "ap75": 28 / 33})


def test_voc07_duplicates_are_false_positives():
    # Same as above, with the miss replaced by a duplicate of the first hit: still a false positive -> 28/33.
    refs = [_ref([[0, 0, 9, 9]], [0]), _ref([[50, 50, 69, 59]], [0])]
    preds = [
        _pred([[0, 0, 9, 9], [0, 0, 9, 9]], [0.9, 0.8], [0, 0]),
        _pred([[50, 50, 69, 59]], [0.7], [0]),
    ]
    _assert_scores(voc07_detection_ap(preds, refs), {"ap": 28 / 33, "ap50": 28 / 33, "ap75": 28 / 33})


def test_voc07_taken_best_gt_makes_a_false_positive_even_if_another_gt_is_free():
    # The devkit only looks at the best-IoU gt: the second detection's best gt (IoU 1) is taken, so it is a false
    # positive although the other gt (IoU 90/100 = 0.9) is free. Recall .5 .5, precision 1 .5 -> 6 / 11.
    refs = [_ref([[0, 0, 9, 9], [0, 0, 9, 8]], [0, 0])]
    preds = [_pred([[0, 0, 9, 9], [0, 0, 9, 9]], [0.9, 0.8], [0, 0])]
    _assert_scores(voc07_detection_ap(preds, refs), {"ap": 6 / 11, "ap50": 6 / 11, "ap75": 6 / 11})
    # COCO matches the second detection to the free gt when its IoU is above the threshold (0.9 up to 0.90).
    coco = coco_detection_ap(preds, refs)
    assert coco["ap50"] == pytest.approx(1.0, abs=COCO_TOL) and coco["ap75"] == pytest.approx(1.0, abs=COCO_TOL)


def test_voc07_difficult_matches_count_neither_way():
    # A detection on a difficult gt (scored first) is neither TP nor FP; recall counts the 1 non-difficult gt.
    # Points: (rec 0, prec 0/eps = 0), (rec 1, prec 1) -> AP 1; counted as a false positive it would be 0.5.
    refs = [_ref([[0, 0, 9, 9], [40, 40, 59, 59]], [0, 0], [False, True])]
    preds = [_pred([[40, 40, 59, 59], [0, 0, 9, 9]], [0.9, 0.8], [0, 0])]
    assert voc07_detection_ap(preds, refs) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    # A difficult gt left undetected costs no recall: AP 1 (as an ordinary gt: recall .5, AP 6 / 11).
    assert voc07_detection_ap([_pred([[0, 0, 9, 9]], [0.8], [0])], refs) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    # Difficult given as 0 / 1 integers, a list, or a tensor: the same.
    for flags in ([0, 1], np.array([0, 1]), torch.tensor([False, True])):
        refs = [_ref([[0, 0, 9, 9], [40, 40, 59, 59]], [0, 0], flags)]
        assert voc07_detection_ap(preds, refs)["ap"] == 1.0
    # A second detection on the difficult gt (a duplicate of it) is still ignored.
    preds = [_pred([[40, 40, 59, 59], [40, 40, 59, 59], [0, 0, 9, 9]], [0.9, 0.85, 0.8], [0, 0, 0])]
    assert voc07_detection_ap(preds, refs)["ap"] == 1.0


def test_voc07_recall_grid_is_the_devkits():
    # 10 gts, 3 found (precision 1): recall 3/10 = 0.29999999999999998 stays below the devkit's 11-point grid value
    # np.arange(0, 1.1, 0.1)[3] = 0.30000000000000004, so only t = 0, 0.1, 0.2 count: AP = 3 / 11 (not 4 / 11).
    refs = [_ref([[10 * i, 0, 10 * i + 5, 5] for i in range(10)], [0] * 10)]
    preds = [_pred([[10 * i, 0, 10 * i + 5, 5] for i in range(3)], [0.9, 0.8, 0.7], [0, 0, 0])]
    _assert_scores(voc07_detection_ap(preds, refs), {"ap": 3 / 11, "ap50": 3 / 11, "ap75": 3 / 11})


def test_voc07_mean_over_classes_skips_classes_without_ground_truth():
    refs = [_ref([[0, 0, 9, 9], [20, 20, 29, 29], [40, 40, 49, 49]], [0, 1, 2], [False, False, True])]
    hit0 = [[0, 0, 9, 9]]
    # class 0 perfect, class 1 missed -> 0.5; class 2 (difficult only) and class 7 (no gt) are skipped.
    preds = [_pred(hit0 + [[40, 40, 49, 49], [60, 60, 70, 70]], [0.9, 0.8, 0.7], [0, 2, 7])]
    assert voc07_detection_ap(preds, refs) == {"ap": 0.5, "ap50": 0.5, "ap75": 0.5}


def test_voc07_no_cap_on_detections_per_image():
    # 100 higher-scored misses, then the hit: recall 1 at rank 101 with precision 1/101 -> 11-point AP 1/101.
    # COCO keeps the 100 best-scored detections per image: the hit is dropped and its AP is 0.
    misses = [[200 + i, 200, 205 + i, 205] for i in range(100)]
    preds = [_pred(misses + [[0, 0, 9, 9]], list(np.linspace(1.0, 0.5, 100)) + [0.1], [0] * 101)]
    refs = [_ref([[0, 0, 9, 9]], [0])]
    _assert_scores(voc07_detection_ap(preds, refs), {"ap": 1 / 101, "ap50": 1 / 101, "ap75": 1 / 101})
    assert coco_detection_ap(preds, refs) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


# ---------------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------------


def test_coco_hand_computed_single_class():
    # Two gts (COCO has no +1: areas w * h). Detections by score: D1 = G1 (IoU 1), a miss, D2 on G2 with IoU
    # 68 / 100 = 0.68. Recall .5 .5 1, precision 1 .5 2/3, made monotone from the right: 1 2/3 2/3.
    # 101-point AP at a threshold <= 0.68: 51 recall points in [0, .5] -> 1, 50 in (.5, 1] -> 2/3: (51 + 100/3) / 101.
    # Above 0.68 D2 misses: 51 points -> 1, the rest 0: 51 / 101. AP: thresholds .50 .55 .60 .65 hit, 6 others not.
    # Boxes are not at the origin, so passing xyxy as xywh would change D2's IoU (to 0.84) and the answer.
    refs = [_ref([[5, 5, 15, 25], [40, 10, 50, 20]], [3, 3])]
    preds = [_pred([[5, 5, 15, 25], [100, 100, 110, 110], [40, 10, 50, 16.8]], [0.9, 0.8, 0.7], [3, 3, 3])]
    hit, miss = (51 + 100 / 3) / 101, 51 / 101
    expected = {"ap": (4 * hit + 6 * miss) / 10, "ap50": hit, "ap75": miss}
    _assert_scores(coco_detection_ap(preds, refs), expected, tol=COCO_TOL)


def test_coco_categories_are_the_union_and_only_classes_with_gt_count():
    refs = [_ref([[0, 0, 10, 10]], [0]), _ref([[0, 0, 10, 10]], [5])]
    # class 0 found, class 5 missed -> mean 0.5; class 9 (predicted, never in the references) does not count.
    preds = [_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.95], [0, 9]), NO_PRED]
    _assert_scores(coco_detection_ap(preds, refs), {"ap": 0.5, "ap50": 0.5, "ap75": 0.5}, tol=COCO_TOL)


def test_coco_edge_cases():
    refs = [_ref([[0, 0, 10, 10]], [1]), _ref([], [])]
    assert coco_detection_ap([NO_PRED, NO_PRED], refs) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    # An image with only predictions: all false positives, ranked below the hit here -> no effect on AP.
    preds = [_pred([[0, 0, 10, 10]], [0.9], [1]), _pred([[0, 0, 5, 5]], [0.5], [1])]
    _assert_scores(coco_detection_ap(preds, refs), {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}, tol=COCO_TOL)
    for refs in ([_ref([], [])], []):
        preds = [_pred([[0, 0, 5, 5]], [0.5], [1])] if refs else []
        assert all(math.isnan(v) for v in coco_detection_ap(preds, refs).values())


def test_zero_area_boxes_match_in_voc_but_not_in_coco():
    # x2 == x1 is valid input. With the +1 convention the box is one pixel wide and matches itself (IoU 1);
    # pycocotools gives any zero-area box an IoU of 0.
    preds, refs = [_pred([[3, 0, 3, 10]], [0.9], [0])], [_ref([[3, 0, 3, 10]], [0])]
    assert voc07_detection_ap(preds, refs) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    assert coco_detection_ap(preds, refs) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_coco_missing_pycocotools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"pip install 'hf-useg\[detection\]'"):
        coco_detection_ap([NO_PRED], [_ref([], [])])


def test_coco_prints_nothing(capsys):
    coco_detection_ap([_pred([[0, 0, 10, 10]], [0.9], [1])], [_ref([[0, 0, 10, 10]], [1])])
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------------------------------
# Both evaluators
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_agree_on_perfect_and_empty_predictions(seed):
    _, refs = _random_case(seed)
    # No difficult flags (COCO has none) and no zero-area boxes (COCO's IoU of those is 0, see below).
    keep = [(r["boxes"][:, 2] > r["boxes"][:, 0]) & (r["boxes"][:, 3] > r["boxes"][:, 1]) for r in refs]
    refs = [_ref(r["boxes"][k], r["labels"][k]) for r, k in zip(refs, keep)]
    assert sum(len(r["labels"]) for r in refs) >= 3
    perfect = [_pred(r["boxes"], np.linspace(1, 0.5, len(r["labels"])), r["labels"]) for r in refs]
    _assert_scores(coco_detection_ap(perfect, refs), {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}, tol=COCO_TOL)
    assert voc07_detection_ap(perfect, refs) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    empty = [NO_PRED] * len(refs)
    assert coco_detection_ap(empty, refs) == voc07_detection_ap(empty, refs) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_tensors_arrays_and_lists_give_the_same_scores():
    predictions, references = _random_case(3)
    expected_voc = voc07_detection_ap(predictions, references)
    expected_coco = coco_detection_ap(predictions, references)
    as_lists = [{k: np.asarray(v).tolist() for k, v in d.items()} for d in predictions]
    refs_lists = [{k: np.asarray(v).tolist() for k, v in d.items()} for d in references]
    as_tensors = [{k: torch.as_tensor(np.asarray(v)) for k, v in d.items()} for d in predictions]
    refs_tensors = [{k: torch.as_tensor(np.asarray(v)) for k, v in d.items()} for d in references]
    for preds, refs in ((as_lists, refs_lists), (as_tensors, refs_tensors), (tuple(as_lists), tuple(refs_tensors))):
        assert voc07_detection_ap(preds, refs) == expected_voc
        assert coco_detection_ap(preds, refs) == expected_coco


# ---------------------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------------------

GOOD_PRED = _pred([[0, 0, 10, 10]], [0.9], [1])
GOOD_REF = _ref([[0, 0, 10, 10]], [1])


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([GOOD_PRED], [GOOD_REF, GOOD_REF], r"1 predictions and 2 references"),
        (GOOD_PRED, [GOOD_REF], r"predictions must be a list"),
        ([GOOD_PRED], [[0, 0, 10, 10]], r"references\[0\] must be a dict"),
        ([GOOD_PRED, {"boxes": [], "labels": []}], [GOOD_REF, GOOD_REF], r"predictions\[1\] lacks .*'scores'"),
        ([GOOD_PRED], [{"boxes": [[0, 0, 1, 1]]}], r"references\[0\] lacks .*'labels'"),
        ([GOOD_PRED, _pred([[0, 0, 1]], [0.5], [1])], [GOOD_REF] * 2, r'predictions\[1\]\["boxes"\].*shape \[n, 4\]'),
        ([GOOD_PRED], [_ref([0, 0, 1, 1], [1])], r'references\[0\]\["boxes"\] must have shape \[n, 4\]'),
        ([_pred([[0, 0, math.nan, 1]], [0.5], [1])], [GOOD_REF], r'predictions\[0\]\["boxes"\] .*non-finite'),
        ([_pred([[0, 0, 1, 1]], [math.inf], [1])], [GOOD_REF], r'predictions\[0\]\["scores"\] .*non-finite'),
        (
            [GOOD_PRED, GOOD_PRED],
            [GOOD_REF, _ref([[0, 0, 5, 5], [10, 0, 5, 20]], [1, 1])],
            r'references\[1\]\["boxes"\]\[1\] = \[10.0, 0.0, 5.0, 20.0\] is not xyxy with x2 >= x1',
        ),
        ([_pred([[0, 5, 1, 4]], [0.5], [1])], [GOOD_REF], r"y2 >= y1"),
        ([_pred([[0, 0, 1, 1]], [0.5, 0.4], [1])], [GOOD_REF], r'\["scores"\] must have shape \[1\]'),
        ([_pred([[0, 0, 1, 1]], [0.5], [[1]])], [GOOD_REF], r'\["labels"\] must have shape \[1\]'),
        ([_pred([[0, 0, 1, 1]], [0.5], [1.5])], [GOOD_REF], r'predictions\[0\]\["labels"\] must hold integers'),
        ([GOOD_PRED], [_ref([[0, 0, 1, 1]], ["cat"])], r'references\[0\]\["labels"\] must hold numbers'),
        ([GOOD_PRED], [_ref([[0, 0, 1, 1]], [1], [2])], r'references\[0\]\["difficult"\] must hold booleans'),
        ([GOOD_PRED], [_ref([[0, 0, 1, 1]], [1], [True, False])], r'\["difficult"\] must have shape \[1\]'),
    ],
)
@pytest.mark.parametrize("evaluator", [voc07_detection_ap, coco_detection_ap])
def test_invalid_inputs(evaluator, predictions, references, message):
    with pytest.raises(ValueError, match=message):
        evaluator(predictions, references)


def test_integral_float_labels_and_empty_shapes_are_accepted():
    preds = [_pred(np.zeros((0, 4)), np.zeros(0), np.zeros(0)), _pred([[0, 0, 9, 9]], [0.9], [1.0])]
    refs = [_ref(np.zeros((0, 4)), np.zeros(0, dtype=np.int64)), _ref(torch.tensor([[0, 0, 9, 9]]), torch.tensor([1]))]
    assert voc07_detection_ap(preds, refs) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
