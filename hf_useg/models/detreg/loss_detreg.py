"""DETReg's pretraining loss (METHODS 5): Hungarian matching of the pseudo-boxes to the queries, then sigmoid focal
objectness, L1 and GIoU box losses on every decoder layer, and an L1 object-embedding loss on the last layer's
matched pairs. The matcher and the per-term losses are `transformers`' Deformable DETR ones."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss
from transformers.utils import ModelOutput

__all__ = ["DetregLoss", "DetregLossOutput"]

# a per-layer term of `DeformableDetrImageLoss`: the last layer's name, or ``<name>_<i>`` for decoder layer i
_LAYER_TERM = re.compile(r"^(loss_ce|loss_bbox|loss_giou)(?:_\d+)?$")


@dataclass
class DetregLossOutput(ModelOutput):
    """Output of [`DetregLoss`].

    Args:
        loss: the weighted total.
        loss_dict: every unweighted term: ``loss_ce`` (focal objectness), ``loss_bbox`` (L1), ``loss_giou`` and
            ``cardinality_error`` (logging only) of the last decoder layer, the same with a ``_<i>`` suffix for
            decoder layer ``i`` of the auxiliary outputs, and ``loss_object_embedding`` when embeddings were given.
        matched_indices: the last layer's matching, one ``(query_indices, box_indices)`` pair of int64 tensors per
            image (the pairs the embedding loss compares).
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    matched_indices: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class DetregLoss(nn.Module):
    """DETReg's set loss for a detector with one class (objectness) and pseudo-box targets.

    Each decoder layer's predictions are matched to the boxes with the Hungarian algorithm on
    ``class_cost * focal_cost + bbox_cost * L1 + giou_cost * (-GIoU)`` (transformers'
    `DeformableDetrHungarianMatcher`; its focal cost uses alpha 0.25, gamma 2, as DETReg's). Per layer, with ``N``
    the number of boxes in the batch (averaged over processes when `accelerate` runs several, at least 1; DETR's
    normalisation, transformers' `DeformableDetrImageLoss`):

    * ``loss_ce = sum over images and queries of FL(p, t) / N``, the sigmoid focal loss
      ``FL = -alpha_t (1 - p_t)^2 log(p_t)`` with target 1 for matched queries and 0 for the others;
    * ``loss_bbox = sum over matched pairs of |b - b'|_1 / N`` (normalised cxcywh);
    * ``loss_giou = sum over matched pairs of (1 - GIoU(b, b')) / N``.

    ``loss_object_embedding`` (last layer only, on the pairs of the last layer's matching, re-run here) is DETReg's
    ``F.l1_loss(predicted, target, reduction="mean")``: the mean absolute difference over the matched pairs and the
    embedding dimensions, on each process (0 when nothing is matched). The total is
    ``objectness_loss_weight * loss_ce + bbox_loss_weight * loss_bbox + giou_loss_weight * loss_giou`` summed over
    the layers, plus ``object_embedding_loss_weight * loss_object_embedding`` (transformers' own total hard-codes the
    objectness weight to 1, so the total is recomputed here).

    Example:

    ```python
    >>> import torch
    >>> loss = DetregLoss()
    >>> boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])   # normalised cxcywh
    >>> labels = [{"class_labels": torch.zeros(2, dtype=torch.long), "boxes": boxes}]
    >>> out = loss(torch.randn(1, 5, 1), torch.rand(1, 5, 4) * 0.5 + 0.25, labels,
    ...            pred_object_embeddings=torch.randn(1, 5, 8), target_object_embeddings=[torch.randn(2, 8)])
    >>> sorted(out.loss_dict)
    ['cardinality_error', 'loss_bbox', 'loss_ce', 'loss_giou', 'loss_object_embedding']
    ```
    """

    def __init__(
        self,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        objectness_loss_weight: float = 2.0,
        bbox_loss_weight: float = 5.0,
        giou_loss_weight: float = 2.0,
        object_embedding_loss_weight: float = 1.0,
        focal_alpha: float = 0.25,
    ):
        super().__init__()
        self.matcher = DeformableDetrHungarianMatcher(class_cost=class_cost, bbox_cost=bbox_cost, giou_cost=giou_cost)
        self.criterion = DeformableDetrImageLoss(
            matcher=self.matcher, num_classes=1, focal_alpha=focal_alpha, losses=["labels", "boxes", "cardinality"]
        )
        self.weight_dict = {
            "loss_ce": float(objectness_loss_weight),
            "loss_bbox": float(bbox_loss_weight),
            "loss_giou": float(giou_loss_weight),
            "loss_object_embedding": float(object_embedding_loss_weight),
        }

    @classmethod
    def from_config(cls, config) -> DetregLoss:
        """The loss of a [`CutMixDetregConfig`] (its matching costs, weights and focal alpha)."""
        return cls(
            class_cost=config.class_cost,
            bbox_cost=config.bbox_cost,
            giou_cost=config.giou_cost,
            objectness_loss_weight=config.objectness_loss_weight,
            bbox_loss_weight=config.bbox_loss_weight,
            giou_loss_weight=config.giou_loss_weight,
            object_embedding_loss_weight=config.object_embedding_loss_weight,
            focal_alpha=config.focal_alpha,
        )

    def term_weight(self, name: str) -> float:
        """The weight of a ``loss_dict`` term (0 for logging-only terms such as ``cardinality_error``)."""
        match = _LAYER_TERM.match(name)
        if match is not None:
            return self.weight_dict[match.group(1)]
        return self.weight_dict.get(name, 0.0)

    def forward(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        labels: Sequence[Mapping[str, torch.Tensor]],
        auxiliary_outputs: Sequence[Mapping[str, torch.Tensor]] | None = None,
        pred_object_embeddings: torch.Tensor | None = None,
        target_object_embeddings: Sequence[torch.Tensor] | None = None,
    ) -> DetregLossOutput:
        """The loss of one batch.

        Args:
            logits: the last decoder layer's objectness logits ``[B, Q, 1]``.
            pred_boxes: its boxes ``[B, Q, 4]``, normalised cxcywh.
            labels: one dict per image: ``class_labels`` (int64 zeros ``[n_i]``) and ``boxes`` (``[n_i, 4]``,
                normalised cxcywh), on the device of the predictions.
            auxiliary_outputs: the earlier decoder layers, first to last: dicts with ``logits`` and ``pred_boxes``
                (none: the last layer only).
            pred_object_embeddings: the predicted object embeddings ``[B, Q, D]`` of the last layer's queries.
            target_object_embeddings: one ``[n_i, D]`` tensor per image, row ``j`` the target of box ``j``. Without
                both embedding arguments the embedding loss is left out.
        """
        if logits.ndim != 3 or logits.shape[-1] != 1:
            raise ValueError(f"logits must be [batch, queries, 1] (objectness), got {tuple(logits.shape)}")
        if pred_boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(
                f"pred_boxes must be [batch, queries, 4] = {(*logits.shape[:2], 4)}, got {tuple(pred_boxes.shape)}"
            )
        if len(labels) != logits.shape[0]:
            raise ValueError(f"labels has {len(labels)} entries for a batch of {logits.shape[0]} images")
        if (pred_object_embeddings is None) != (target_object_embeddings is None):
            raise ValueError("give both pred_object_embeddings and target_object_embeddings, or neither")
        if target_object_embeddings is not None:
            if len(target_object_embeddings) != len(labels):
                raise ValueError(
                    f"target_object_embeddings has {len(target_object_embeddings)} entries for {len(labels)} images"
                )
            for image, (target, label) in enumerate(zip(target_object_embeddings, labels)):
                if target.shape[0] != len(label["boxes"]):
                    raise ValueError(
                        f"image {image}: {target.shape[0]} target object embeddings for {len(label['boxes'])} boxes "
                        "(one per box, in the order of the boxes)"
                    )

        # in float32 under mixed precision too: the matcher hands its cost matrix to scipy, which has no bfloat16
        logits, pred_boxes = logits.float(), pred_boxes.float()
        outputs = {"logits": logits, "pred_boxes": pred_boxes}
        if auxiliary_outputs:
            outputs["auxiliary_outputs"] = [
                {"logits": layer["logits"].float(), "pred_boxes": layer["pred_boxes"].float()}
                for layer in auxiliary_outputs
            ]
        loss_dict = dict(self.criterion(outputs, labels))

        indices = self.matcher({"logits": logits, "pred_boxes": pred_boxes}, labels)
        if pred_object_embeddings is not None:
            loss_dict["loss_object_embedding"] = self.object_embedding_loss(
                pred_object_embeddings.float(), target_object_embeddings, indices
            )
        loss = sum(self.term_weight(name) * value for name, value in loss_dict.items() if self.term_weight(name))
        if not isinstance(loss, torch.Tensor):  # every weight 0
            loss = logits.sum() * 0.0
        return DetregLossOutput(loss=loss, loss_dict=loss_dict, matched_indices=indices)

    @staticmethod
    def object_embedding_loss(
        pred_object_embeddings: torch.Tensor,
        target_object_embeddings: Sequence[torch.Tensor],
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Mean absolute difference between the matched queries' embeddings and their boxes' targets (DETReg's
        ``F.l1_loss(..., reduction="mean")``); 0 (still in the graph) when nothing is matched."""
        batch, _, dim = pred_object_embeddings.shape
        if len(target_object_embeddings) != batch:
            raise ValueError(
                f"target_object_embeddings has {len(target_object_embeddings)} entries for a batch of {batch} images"
            )
        sources, targets = [], []
        for image, (target, (query_index, box_index)) in enumerate(zip(target_object_embeddings, indices)):
            if target.ndim != 2 or target.shape[1] != dim:
                raise ValueError(
                    f"target_object_embeddings[{image}] must be [boxes, {dim}], got {tuple(target.shape)}"
                )
            sources.append(pred_object_embeddings[image, query_index.to(pred_object_embeddings.device)])
            targets.append(target[box_index.to(target.device)])
        source = torch.cat(sources)
        if source.shape[0] == 0:
            return pred_object_embeddings.sum() * 0.0
        target = torch.cat(targets).to(device=source.device, dtype=source.dtype)
        return F.l1_loss(source, target.detach(), reduction="mean")
