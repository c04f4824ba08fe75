"""DETReg's pretraining loss (METHODS 5) against hand-computed values: focal objectness, L1 and GIoU box terms on every
decoder layer, the L1 object-embedding loss on the last layer's matched pairs only, the weights, and the matching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hf_useg.models.detreg import CutMixDetregConfig, DetregLoss

ALPHA = 0.25


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: more threads only add overhead (and stall on a busy shared machine)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _focal(logit: float, target: int, alpha: float = ALPHA) -> float:
    """The sigmoid focal loss of one query, written out: -alpha_t (1 - p_t)^2 log(p_t)."""
    p = _sigmoid(logit)
    p_t = p if target == 1 else 1.0 - p
    alpha_t = alpha if target == 1 else 1.0 - alpha
    return -alpha_t * (1.0 - p_t) ** 2 * math.log(p_t)


def _xyxy(box):
    cx, cy, w, h = box
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(a, b) -> float:
    ax0, ay0, ax1, ay1 = _xyxy(a)
    bx0, by0, bx1, by1 = _xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _labels(*boxes_per_image):
    return [
        {"class_labels": torch.zeros(len(boxes), dtype=torch.long), "boxes": torch.tensor(boxes, dtype=torch.float32)}
        for boxes in boxes_per_image
    ]


def test_focal_objectness_by_hand():
    # one image, two queries, one box: query 0 sits on the box (matched, target 1), query 1 far away (target 0)
    box = [0.5, 0.5, 0.2, 0.2]
    logits = torch.tensor([[[0.7], [-1.3]]])
    pred_boxes = torch.tensor([[box, [0.1, 0.1, 0.05, 0.05]]])
    out = DetregLoss()(logits, pred_boxes, _labels([box]))
    expected = (_focal(0.7, 1) + _focal(-1.3, 0)) / 1  # summed over the queries, divided by the number of boxes
    assert out.loss_dict["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert [q.tolist() for q, _ in out.matched_indices] == [[0]]


def test_box_terms_by_hand_and_normalised_by_the_number_of_boxes():
    # two images with one query and one box each: the matching is forced, N = 2
    pred = [[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]
    target = [[0.5, 0.5, 0.4, 0.4], [0.7, 0.7, 0.2, 0.2]]  # nested, then disjoint (the hull term matters)
    out = DetregLoss()(torch.zeros(2, 1, 1), torch.tensor(pred).unsqueeze(1), _labels([target[0]], [target[1]]))
    l1 = sum(abs(p - t) for a, b in zip(pred, target) for p, t in zip(a, b)) / 2
    giou = sum(1.0 - _giou(a, b) for a, b in zip(pred, target)) / 2
    assert _giou(pred[0], target[0]) == pytest.approx(0.25)
    assert _giou(pred[1], target[1]) == pytest.approx(0.0 - (0.49 - 0.08) / 0.49)
    assert out.loss_dict["loss_bbox"].item() == pytest.approx(l1, rel=1e-5)
    assert out.loss_dict["loss_giou"].item() == pytest.approx(giou, rel=1e-5)


def test_total_is_the_weighted_sum_over_every_decoder_layer():
    torch.manual_seed(0)
    labels = _labels([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]], [[0.5, 0.5, 0.5, 0.5]])
    logits = torch.randn(2, 4, 1)
    boxes = torch.rand(2, 4, 4) * 0.4 + 0.3
    auxiliary = [{"logits": torch.randn(2, 4, 1), "pred_boxes": torch.rand(2, 4, 4) * 0.4 + 0.3} for _ in range(2)]
    embeddings, targets = torch.randn(2, 4, 8), [torch.randn(2, 8), torch.randn(1, 8)]
    out = DetregLoss()(logits, boxes, labels, auxiliary, embeddings, targets)
    terms = out.loss_dict
    assert set(terms) == {
        *(
            f"{name}{suffix}"
            for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")
            for suffix in ("", "_0", "_1")
        ),
        "loss_object_embedding",
    }
    expected = terms["loss_object_embedding"] + sum(
        2 * terms[f"loss_ce{s}"] + 5 * terms[f"loss_bbox{s}"] + 2 * terms[f"loss_giou{s}"] for s in ("", "_0", "_1")
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)

    # each auxiliary layer is its own last layer: the same terms as a loss on that layer alone
    alone = DetregLoss()(auxiliary[1]["logits"], auxiliary[1]["pred_boxes"], labels)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert terms[f"{name}_1"].item() == pytest.approx(alone.loss_dict[name].item(), rel=1e-6)

    # the weights are the config's
    config = CutMixDetregConfig(objectness_loss_weight=3, bbox_loss_weight=1, giou_loss_weight=0.5)
    reweighted = DetregLoss.from_config(config)(logits, boxes, labels, auxiliary, embeddings, targets)
    expected = terms["loss_object_embedding"] + sum(
        3 * terms[f"loss_ce{s}"] + terms[f"loss_bbox{s}"] + 0.5 * terms[f"loss_giou{s}"] for s in ("", "_0", "_1")
    )
    assert reweighted.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_object_embedding_loss_on_matched_pairs_only():
    # three queries, two boxes: query 2 sits on box 0 and query 0 on box 1; query 1 is matched to nothing
    boxes = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]
    pred_boxes = torch.tensor([[boxes[1], [0.1, 0.9, 0.05, 0.05], boxes[0]]])
    logits = torch.tensor([[[2.0], [-2.0], [2.0]]])
    embeddings = torch.tensor([[[1.0, 2.0, 3.0], [7.0, 7.0, 7.0], [0.0, -1.0, 0.5]]], requires_grad=True)
    targets = [torch.tensor([[0.5, -1.0, 0.0], [1.0, 1.0, 1.0]])]
    loss = DetregLoss()
    out = loss(logits, pred_boxes, _labels(boxes), pred_object_embeddings=embeddings, target_object_embeddings=targets)
    query, box = out.matched_indices[0]
    assert dict(zip(query.tolist(), box.tolist())) == {0: 1, 2: 0}
    # mean over the matched pairs and the dimensions: |(1,2,3)-(1,1,1)| and |(0,-1,.5)-(.5,-1,0)|
    expected = (0 + 1 + 2 + 0.5 + 0 + 0.5) / 6
    assert out.loss_dict["loss_object_embedding"].item() == pytest.approx(expected)

    changed = embeddings.detach().clone()
    changed[0, 1] = torch.tensor([-100.0, 50.0, 3.0])  # the unmatched query
    again = loss(logits, pred_boxes, _labels(boxes), pred_object_embeddings=changed, target_object_embeddings=targets)
    assert again.loss_dict["loss_object_embedding"].item() == out.loss_dict["loss_object_embedding"].item()
    assert again.loss.item() == out.loss.item()
    changed[0, 0] += 1.0  # a matched one
    moved = loss(logits, pred_boxes, _labels(boxes), pred_object_embeddings=changed, target_object_embeddings=targets)
    assert moved.loss_dict["loss_object_embedding"].item() != out.loss_dict["loss_object_embedding"].item()

    out.loss_dict["loss_object_embedding"].backward()
    assert embeddings.grad[0, 1].abs().sum() == 0 and embeddings.grad[0, 0].abs().sum() > 0


def _matching_cost(logit: float, pred, target, class_cost=2.0, bbox_cost=5.0, giou_cost=2.0) -> float:
    p = _sigmoid(logit)
    focal_cost = ALPHA * (1 - p) ** 2 * -math.log(p) - (1 - ALPHA) * p**2 * -math.log(1 - p)
    l1 = sum(abs(a - b) for a, b in zip(pred, target))
    return class_cost * focal_cost + bbox_cost * l1 - giou_cost * _giou(pred, target)


def _best_assignment(logits, preds, targets, **costs):
    best = None
    for queries in itertools.permutations(range(len(preds)), len(targets)):
        total = sum(_matching_cost(logits[q], preds[q], targets[j], **costs) for j, q in enumerate(queries))
        if best is None or total < best[0]:
            best = (total, queries)
    return {q: j for j, q in enumerate(best[1])}


def test_matching_costs_pick_the_expected_pairs():
    target = [[0.5, 0.5, 0.2, 0.2]]
    # query 0: the closer box but a confident "no object"; query 1: a little farther, confident "object"
    logits = [-5.0, 3.0]
    preds = [[0.52, 0.5, 0.2, 0.2], [0.56, 0.5, 0.2, 0.2]]

    def matched(**costs):
        out = DetregLoss(**costs)(
            torch.tensor(logits).view(1, 2, 1), torch.tensor([preds]), _labels(target), None, None, None
        )
        query, box = out.matched_indices[0]
        return dict(zip(query.tolist(), box.tolist()))

    assert _best_assignment(logits, preds, target) == {1: 0} == matched()  # DETReg's costs: class 2, L1 5, GIoU 2
    assert _best_assignment(logits, preds, target, class_cost=0.0) == {0: 0} == matched(class_cost=0.0)

    # a 4-query, 3-box case: the matcher's assignment is the brute-force optimum of the hand-written cost
    torch.manual_seed(3)
    logits = torch.randn(4).tolist()
    preds = (torch.rand(4, 4) * 0.3 + torch.tensor([0.3, 0.3, 0.1, 0.1])).tolist()
    targets = [[0.35, 0.4, 0.2, 0.3], [0.6, 0.5, 0.25, 0.2], [0.4, 0.6, 0.3, 0.3]]
    out = DetregLoss()(torch.tensor(logits).view(1, 4, 1), torch.tensor([preds]), _labels(targets))
    query, box = out.matched_indices[0]
    assert dict(zip(query.tolist(), box.tolist())) == _best_assignment(logits, preds, targets)


def test_images_without_boxes():
    loss = DetregLoss()
    logits, pred_boxes = torch.randn(2, 3, 1, requires_grad=True), torch.rand(2, 3, 4) * 0.5 + 0.25
    embeddings = torch.randn(2, 3, 4, requires_grad=True)
    labels = _labels([[0.5, 0.5, 0.2, 0.2]], [])
    labels[1]["boxes"] = torch.zeros(0, 4)
    out = loss(
        logits,
        pred_boxes,
        labels,
        pred_object_embeddings=embeddings,
        target_object_embeddings=[torch.randn(1, 4), torch.zeros(0, 4)],
    )
    assert torch.isfinite(out.loss) and [len(q) for q, _ in out.matched_indices] == [1, 0]
    nothing = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    empty = loss(
        logits,
        pred_boxes,
        nothing,
        pred_object_embeddings=embeddings,
        target_object_embeddings=[torch.zeros(0, 4)] * 2,
    )
    # every query is a negative, N is clamped to 1, and the embedding loss is 0 (still differentiable)
    expected = sum(_focal(x, 0) for x in logits.detach().flatten().tolist())
    assert empty.loss_dict["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert empty.loss_dict["loss_object_embedding"].item() == 0.0
    empty.loss.backward()


def test_bad_inputs_raise_clear_errors():
    loss = DetregLoss()
    logits, boxes = torch.zeros(1, 3, 1), torch.rand(1, 3, 4) * 0.5 + 0.25
    labels = _labels([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])
    with pytest.raises(ValueError, match="2 boxes"):
        loss(
            logits,
            boxes,
            labels,
            pred_object_embeddings=torch.zeros(1, 3, 4),
            target_object_embeddings=[torch.zeros(3, 4)],
        )
    with pytest.raises(ValueError, match="or neither"):
        loss(logits, boxes, labels, pred_object_embeddings=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="objectness"):
        loss(torch.zeros(1, 3, 2), boxes, labels)
    with pytest.raises(ValueError, match="1 images|batch of 1"):
        loss(logits, boxes, labels + labels)
