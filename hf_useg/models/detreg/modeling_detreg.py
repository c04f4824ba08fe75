"""CutMix-DETReg (METHODS 5): DETReg's detector pretraining on unlabelled images, around `transformers`'
`DeformableDetrForObjectDetection`. The pretrained detector is handed to fine-tuning as a plain
`DeformableDetrForObjectDetection` folder ([`CutMixDetregForPretraining.save_detector_for_finetuning`])."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DeformableDetrForObjectDetection, PreTrainedModel
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrMLPPredictionHead,
    DeformableDetrModelOutput,
    inverse_sigmoid,
)
from transformers.utils import ModelOutput

from ...backbones import FeatureBackbone
from ...file_utils import atomic_directory
from ...modeling_utils import CheckedLoadingMixin
from .configuration_detreg import CutMixDetregConfig
from .loss_detreg import DetregLoss

logger = logging.getLogger(__name__)

__all__ = [
    "CutMixDetregForPretraining",
    "CutMixDetregPreTrainedModel",
    "CutMixDetregPretrainingOutput",
    "init_deformable_detr_heads",
]

# Deformable DETR's head initialisation (its `DeformableDETR.__init__`), which transformers 5.x no longer applies:
# every query starts at objectness probability 0.01, so the focal loss of the ~300 unmatched queries starts small
_PRIOR_PROBABILITY = 0.01


@dataclass
class CutMixDetregPretrainingOutput(ModelOutput):
    """Output of [`CutMixDetregForPretraining.forward`].

    Args:
        loss: the weighted DETReg loss (when ``labels`` were given).
        loss_dict: its unweighted terms (see [`DetregLossOutput`]): ``loss_ce``, ``loss_bbox``, ``loss_giou``,
            ``cardinality_error`` (+ ``_<i>`` for decoder layer ``i`` when ``config.auxiliary_loss``) and
            ``loss_object_embedding`` (when ``box_crops`` were given).
        logits: the last decoder layer's objectness logits ``[B, Q, 1]``.
        pred_boxes: its boxes ``[B, Q, 4]``, normalised cxcywh.
        auxiliary_outputs: the earlier decoder layers' predictions, dicts with ``logits`` and ``pred_boxes``.
        object_embeddings: the predicted object embeddings ``[B, Q, D]`` (the head on the last layer's queries).
        target_object_embeddings: the frozen encoder's embedding of every box crop, one ``[n_i, D]`` tensor per image
            (when ``box_crops`` were given).
        matched_indices: the last layer's matching, one ``(query_indices, box_indices)`` pair per image.
        last_hidden_state: the last decoder layer's query outputs ``[B, Q, d_model]``.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None
    object_embeddings: torch.FloatTensor | None = None
    target_object_embeddings: list[torch.FloatTensor] | None = None
    matched_indices: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    last_hidden_state: torch.FloatTensor | None = None


class CutMixDetregPreTrainedModel(CheckedLoadingMixin, PreTrainedModel):
    config_class = CutMixDetregConfig
    base_model_prefix = "cutmix_detreg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The object-embedding MLP keeps PyTorch's default initialisation (DETReg's); the detector and the encoder are
        # transformers models with their own. The guarded init functions leave loaded weights untouched.
        if isinstance(module, nn.Linear):
            module.reset_parameters()


@torch.no_grad()
def init_deformable_detr_heads(detector: DeformableDetrForObjectDetection, box_heads: bool = True) -> None:
    """Deformable DETR's initialisation of the detection heads, which transformers 5.x no longer applies: class
    biases at ``-log((1 - 0.01) / 0.01)`` (every query starts at probability 0.01, so the focal loss of the many
    unmatched queries starts small) and, with ``box_heads``, the box heads' last layer at zero with the width/height
    logits at -2 (on the first decoder layer's head; on every layer without box refinement, where they share one).

    [`CutMixDetregForPretraining`] applies it at construction. A fine-tuning run on a pretrained detector folder can
    apply it to its new class head with ``box_heads=False`` (the box heads are pretrained).

    Example:

    ```python
    >>> detector = DeformableDetrForObjectDetection.from_pretrained("detreg-detector", num_labels=20)  # doctest: +SKIP
    >>> init_deformable_detr_heads(detector, box_heads=False)  # doctest: +SKIP
    ```
    """
    bias = -math.log((1 - _PRIOR_PROBABILITY) / _PRIOR_PROBABILITY)
    for class_embed in detector.class_embed:
        nn.init.constant_(class_embed.bias, bias)
    if not box_heads:
        return
    refine = detector.config.with_box_refine
    for level, bbox_embed in enumerate(detector.bbox_embed):
        last = bbox_embed.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        if level == 0 or not refine:
            nn.init.constant_(last.bias[2:], -2.0)


class CutMixDetregForPretraining(CutMixDetregPreTrainedModel):
    """DETReg's detector pretraining (METHODS 5): a `DeformableDetrForObjectDetection` with one class (objectness)
    learns to find the pseudo-boxes of unlabelled images (CutMix pastes, random boxes or Selective Search) and to
    predict, for each box it finds, a frozen encoder's embedding of the box's content.

    Modules: ``detector`` (the Deformable DETR; its backbone frozen when ``config.freeze_backbone``),
    ``object_embedding_head`` (an MLP on the last decoder layer's queries) and ``object_encoder`` (a frozen
    [`FeatureBackbone`]: no gradients, always in eval mode, run under `torch.no_grad`).

    **The object encoder's weights.** With ``config.object_encoder_config=None`` the encoder is a copy of the
    detector's backbone. A new model copies it at construction; after loading pretrained backbone weights into the
    detector by hand, call [`init_object_encoder_from_detector_backbone`] ([`load_backbone_weights`] does both).
    With an explicit ``object_encoder_config``, load its weights with [`load_object_encoder_weights`]. A
    pretraining checkpoint (``save_pretrained`` / ``from_pretrained``) holds the encoder's weights: nothing to call
    when resuming.

    **Fine-tuning.** [`save_detector_for_finetuning`] writes the detector without its class head; load it with
    ``DeformableDetrForObjectDetection.from_pretrained(folder, num_labels=N, id2label=...)``.

    Example:

    ```python
    >>> import torch
    >>> from transformers import DeformableDetrConfig, ResNetConfig
    >>> from hf_useg import CutMixDetregConfig, CutMixDetregForPretraining
    >>> backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1],
    ...                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    >>> detector = DeformableDetrConfig(backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2,
    ...                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
    ...                                 decoder_ffn_dim=32, num_queries=10, encoder_n_points=2, decoder_n_points=2)
    >>> model = CutMixDetregForPretraining(CutMixDetregConfig(detector_config=detector, object_crop_size=32))
    >>> labels = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.4, 0.3]])}]
    >>> crops = [torch.randn(2, 3, 32, 32)]   # each box's content, resized and normalised
    >>> out = model(torch.randn(1, 3, 128, 128), labels=labels, box_crops=crops)
    >>> out.loss.backward()
    >>> out.logits.shape, out.object_embeddings.shape, sorted(out.loss_dict)[-2:]
    (torch.Size([1, 10, 1]), torch.Size([1, 10, 24]), ['loss_giou_0', 'loss_object_embedding'])
    >>> model.save_detector_for_finetuning("detector-for-finetuning")  # doctest: +SKIP
    ```
    """

    def __init__(self, config: CutMixDetregConfig):
        super().__init__(config)
        self.detector = DeformableDetrForObjectDetection(config.detector_config)
        encoder_config = config.encoder_config
        if config.object_encoder_stage is not None:
            encoder_config.out_indices = None
            encoder_config.out_features = [config.object_encoder_stage]
        self.object_encoder = FeatureBackbone(encoder_config, frozen=True)
        embedding_dim = self.object_encoder.hidden_size
        if config.object_embedding_dim is None:
            config.object_embedding_dim = embedding_dim
        elif config.object_embedding_dim != embedding_dim:
            raise ValueError(
                f"object_embedding_dim={config.object_embedding_dim} but the object encoder "
                f"({type(encoder_config).__name__}) embeds into {embedding_dim} dimensions; leave it None"
            )
        d_model = config.detector_config.d_model
        self.object_embedding_head = DeformableDetrMLPPredictionHead(
            input_dim=d_model,
            hidden_dim=d_model,
            output_dim=embedding_dim,
            num_layers=config.object_embedding_head_layers,
        )
        self.criterion = DetregLoss.from_config(config)
        self.post_init()
        # here rather than in _init_weights: transformers never calls that on a module without parameters of its own
        # (this one); a checkpoint loaded by from_pretrained overwrites these values afterwards
        init_deformable_detr_heads(self.detector)
        self._freeze()
        if config.object_encoder_config is None:
            self.init_object_encoder_from_detector_backbone()

    def restore_frozen_parameters(self) -> None:
        """After `from_pretrained`: the object encoder and (per ``config.freeze_backbone``) the backbone frozen
        again (see `CheckedLoadingMixin.restore_frozen_parameters`)."""
        super().restore_frozen_parameters()
        self._freeze()

    def _freeze(self) -> None:
        self.object_encoder.requires_grad_(False)
        self.object_encoder.eval()
        backbone = self.detector.model.backbone
        if self.config.freeze_backbone:
            backbone.model.requires_grad_(False)
            backbone.eval()
            return
        # DETR trains a ResNet's stages 2-4 and keeps the stem and stage 1 frozen; transformers' own rule looks for
        # "stage.1"-style names and so freezes every stage of its native ResNet ("encoder.stages.1...")
        is_resnet = "resnet" in self.detector.config.backbone_config.model_type
        for name, parameter in backbone.model.named_parameters():
            parameter.requires_grad_(not (is_resnet and name.startswith(("embedder.", "encoder.stages.0."))))

    def train(self, mode: bool = True) -> CutMixDetregForPretraining:
        """Like `nn.Module.train`, but the object encoder (and the detector's backbone when
        ``config.freeze_backbone``) stay in eval mode."""
        super().train(mode)
        self.object_encoder.eval()
        if self.config.freeze_backbone:
            self.detector.model.backbone.eval()
        return self

    # ----------------------------------------------------------------------------------------------------------
    # weights

    @torch.no_grad()
    def init_object_encoder_from_detector_backbone(self) -> None:
        """Copy the detector's backbone weights into the object encoder (``config.object_encoder_config=None``:
        DETReg embeds the boxes with its own pretrained backbone). Call it after loading pretrained weights into the
        detector's backbone by any means other than [`load_backbone_weights`]; it is called at construction."""
        if self.config.object_encoder_config is not None:
            raise ValueError(
                "the object encoder has its own architecture (config.object_encoder_config); load its weights with "
                "load_object_encoder_weights(...)"
            )
        source = self.detector.model.backbone.model.state_dict()
        # a detector backbone may hold layers for stages the encoder does not output (e.g. ConvNeXt's per-stage
        # norms): extra keys are ignored; every encoder weight must be found
        missing, _ = self.object_encoder.model.load_state_dict(source, strict=False)
        missing = [key for key in missing if not key.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"the detector's backbone lacks object-encoder weights: {missing}")

    def load_backbone_weights(self, name_or_path: str, **kwargs) -> None:
        """Load pretrained backbone weights (a Hub id or a folder of a `transformers` backbone of the detector's
        backbone architecture, e.g. a ResNet-50) into the detector, and into the object encoder when it is a copy of
        the backbone. ``kwargs`` go to [`FeatureBackbone.from_pretrained`].

        Example:

        ```python
        >>> model = CutMixDetregForPretraining(CutMixDetregConfig())
        >>> model.load_backbone_weights("microsoft/resnet-50")  # doctest: +SKIP
        ```
        """
        pretrained = FeatureBackbone.from_pretrained(name_or_path, **kwargs).model
        missing, unexpected = self.detector.model.backbone.model.load_state_dict(pretrained.state_dict(), strict=False)
        missing = [key for key in missing if not key.endswith("num_batches_tracked")]
        unexpected = [key for key in unexpected if not key.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(
                f"{name_or_path} does not fit the detector's backbone "
                f"({type(self.detector.model.backbone.model).__name__}): missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}"
            )
        if self.config.object_encoder_config is None:
            self.init_object_encoder_from_detector_backbone()

    def load_object_encoder_weights(self, name_or_path: str, **kwargs) -> None:
        """Load the weights of an explicit ``config.object_encoder_config`` encoder (e.g. a DINO ViT or a SwAV
        ResNet folder) with [`FeatureBackbone.from_pretrained`]; ``kwargs`` go there."""
        pretrained = FeatureBackbone.from_pretrained(name_or_path, **kwargs).model
        missing, _ = self.object_encoder.model.load_state_dict(pretrained.state_dict(), strict=False)
        missing = [key for key in missing if not key.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{name_or_path} does not fit the object encoder: missing {missing[:5]}")

    def save_detector_for_finetuning(self, save_directory: str | os.PathLike) -> Path:
        """Write the pretrained detector as a `DeformableDetrForObjectDetection` folder without its class head (the
        objectness head is dropped, as DETReg does; the object-embedding head and the object encoder are not
        written). The folder is written atomically.

        Load it for fine-tuning with ``DeformableDetrForObjectDetection.from_pretrained(folder, num_labels=N,
        id2label=...)``: only ``class_embed.*`` is reported missing (freshly initialised for the ``N`` classes), and
        transformers warns that the tied ``class_embed`` weights are absent, which is expected. The config carries
        ``detector_config``'s fine-tuning settings (matching costs, auxiliary loss) without label names.

        Example:

        ```python
        >>> model.save_detector_for_finetuning("detreg-detector")  # doctest: +SKIP
        >>> detector = DeformableDetrForObjectDetection.from_pretrained(
        ...     "detreg-detector", num_labels=20
        ... )  # doctest: +SKIP
        ```
        """
        state_dict = {
            name: tensor for name, tensor in self.detector.state_dict().items() if "class_embed" not in name.split(".")
        }
        config = self.detector.config.__class__.from_dict(self.detector.config.to_dict())
        # no label names: the fine-tuning run gives its own num_labels / id2label
        config.id2label = None
        config.label2id = None
        with atomic_directory(save_directory) as tmp:
            previous, self.detector.config = self.detector.config, config
            try:
                self.detector.save_pretrained(tmp, state_dict=state_dict)
            finally:
                self.detector.config = previous
        return Path(save_directory)

    # ----------------------------------------------------------------------------------------------------------
    # forward

    def embed_box_crops(self, box_crops: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The frozen encoder's embedding of every box crop (under `torch.no_grad`, in eval mode): one ``[n_i, D]``
        tensor per image for crops ``[n_i, 3, S, S]`` (``S = config.object_crop_size``, normalised like the
        images). A ViT encoder embeds into its CLS token, a stage backbone into the spatial mean of its feature map."""
        if isinstance(box_crops, torch.Tensor) or not isinstance(box_crops, Sequence):
            raise TypeError(
                f"box_crops must be a list with one [boxes, 3, S, S] tensor per image, got {type(box_crops).__name__}"
            )
        size = self.config.object_crop_size
        for image, crops in enumerate(box_crops):
            if not isinstance(crops, torch.Tensor) or not crops.is_floating_point():
                raise TypeError(f"box_crops[{image}] must be a float tensor (normalised crops)")
            if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, size, size):
                raise ValueError(
                    f"box_crops[{image}] must be [boxes, 3, {size}, {size}] (config.object_crop_size={size}), got "
                    f"{tuple(crops.shape)}"
                )
        parameter = next(self.object_encoder.parameters())
        crops = torch.cat(list(box_crops)).to(device=parameter.device, dtype=parameter.dtype)
        counts = [len(c) for c in box_crops]
        dim = self.config.object_embedding_dim
        if crops.shape[0] == 0:
            return [crops.new_zeros(0, dim) for _ in counts]
        self.object_encoder.eval()
        with torch.no_grad():
            features = self.object_encoder(crops)
            if features.cls_token is not None:
                embeddings = features.cls_token
            else:
                embeddings = features.feature_map.mean(dim=(2, 3))
        return list(embeddings.split(counts))

    def _per_layer_predictions(self, outputs: DeformableDetrModelOutput) -> tuple[torch.Tensor, torch.Tensor]:
        # DeformableDetrForObjectDetection.forward's heads, kept per decoder layer (its output holds the last layer
        # only; the auxiliary losses need them all): [layers, B, Q, 1] logits and [layers, B, Q, 4] boxes
        hidden_states = outputs.intermediate_hidden_states
        classes, boxes = [], []
        for level in range(hidden_states.shape[1]):
            if level == 0:
                reference = outputs.init_reference_points
            else:
                reference = outputs.intermediate_reference_points[:, level - 1]
            reference = inverse_sigmoid(reference)
            delta = self.detector.bbox_embed[level](hidden_states[:, level])
            if reference.shape[-1] == 4:
                coordinates = delta + reference
            else:
                coordinates = torch.cat([delta[..., :2] + reference, delta[..., 2:]], dim=-1)
            classes.append(self.detector.class_embed[level](hidden_states[:, level]))
            boxes.append(coordinates.sigmoid())
        return torch.stack(classes), torch.stack(boxes)

    def _check_labels(
        self, labels: Sequence[Mapping[str, torch.Tensor]], batch: int, device: torch.device
    ) -> list[dict[str, torch.Tensor]]:
        if isinstance(labels, Mapping) or not isinstance(labels, Sequence):
            raise TypeError(
                "labels must be a list with one dict per image ({'boxes': [n, 4] normalised cxcywh, 'class_labels': "
                f"[n] zeros}}), got {type(labels).__name__}"
            )
        if len(labels) != batch:
            raise ValueError(f"labels has {len(labels)} entries for a batch of {batch} images")
        checked = []
        for image, label in enumerate(labels):
            if not isinstance(label, Mapping) or "boxes" not in label:
                raise ValueError(f"labels[{image}] must be a dict with 'boxes' ([n, 4] normalised cxcywh)")
            boxes = torch.as_tensor(label["boxes"])
            if boxes.ndim != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(f"labels[{image}]['boxes'] must be a float [n, 4] tensor, got {tuple(boxes.shape)}")
            if boxes.numel() and (
                not bool(torch.isfinite(boxes).all())
                or bool((boxes < 0).any() | (boxes > 1).any())
                or bool((boxes[:, 2:] <= 0).any())
            ):
                raise ValueError(
                    f"labels[{image}]['boxes'] must be normalised (center_x, center_y, width, height) in [0, 1] with "
                    "positive width and height"
                )
            class_labels = label.get("class_labels")
            if class_labels is None:
                class_labels = torch.zeros(len(boxes), dtype=torch.long)
            class_labels = torch.as_tensor(class_labels)
            if class_labels.shape != (len(boxes),) or bool((class_labels != 0).any()):
                raise ValueError(
                    f"labels[{image}]['class_labels'] must be {len(boxes)} zeros (one class: objectness), got "
                    f"{class_labels.tolist()}"
                )
            checked.append(
                {
                    "class_labels": class_labels.to(device=device, dtype=torch.long),
                    "boxes": boxes.to(device=device, dtype=torch.float32),
                }
            )
        return checked

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: Sequence[Mapping[str, torch.Tensor]] | None = None,
        box_crops: Sequence[torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> CutMixDetregPretrainingOutput | tuple:
        """Predictions, and DETReg's loss when ``labels`` are given.

        Args:
            pixel_values: normalised images ``[B, 3, H, W]`` (the composites, for CutMix).
            pixel_mask: ``[B, H, W]``, 1 on real pixels and 0 on padding (default: all real).
            labels: the pseudo-boxes, one dict per image as for transformers' DETR: ``boxes`` ``[n_i, 4]``
                normalised (center_x, center_y, width, height), ``class_labels`` ``[n_i]`` zeros (optional).
            box_crops: the content of every pseudo-box, one float tensor ``[n_i, 3, S, S]`` per image in the order of
                its boxes (``S = config.object_crop_size``, normalised like the images; for CutMix the un-blended
                pasted content). The frozen encoder embeds them into the embedding loss's targets. Without them the
                embedding loss is left out.
            return_dict: return a [`CutMixDetregPretrainingOutput`] (else a tuple of its non-None fields).
        """
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a [batch, 3, height, width] tensor, got {shape}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be normalised floats, got {pixel_values.dtype}")
        batch = pixel_values.shape[0]
        if pixel_mask is not None and tuple(pixel_mask.shape) != (batch, *pixel_values.shape[2:]):
            raise ValueError(
                f"pixel_mask must be [batch, height, width] = {(batch, *pixel_values.shape[2:])}, got "
                f"{tuple(pixel_mask.shape)}"
            )
        if box_crops is not None:
            if isinstance(box_crops, torch.Tensor) or not isinstance(box_crops, Sequence):
                raise TypeError(
                    "box_crops must be a list with one [boxes, 3, S, S] tensor per image (images have different "
                    f"numbers of boxes), got {type(box_crops).__name__}"
                )
            if labels is None:
                raise ValueError("box_crops need the labels (the boxes they were cut from)")
            if len(box_crops) != batch:
                raise ValueError(f"box_crops has {len(box_crops)} entries for a batch of {batch} images")
        if labels is not None:
            labels = self._check_labels(labels, batch, pixel_values.device)
            if box_crops is not None:
                for image, (crops, label) in enumerate(zip(box_crops, labels)):
                    if len(crops) != len(label["boxes"]):
                        raise ValueError(
                            f"image {image}: {len(crops)} box crops for {len(label['boxes'])} boxes (one crop per "
                            "box, in the order of the boxes)"
                        )

        outputs = self.detector.model(pixel_values, pixel_mask=pixel_mask)
        outputs_class, outputs_coord = self._per_layer_predictions(outputs)
        logits, pred_boxes = outputs_class[-1], outputs_coord[-1]
        auxiliary_outputs = [
            {"logits": classes, "pred_boxes": boxes} for classes, boxes in zip(outputs_class[:-1], outputs_coord[:-1])
        ]
        object_embeddings = self.object_embedding_head(outputs.last_hidden_state)
        targets = self.embed_box_crops(box_crops) if box_crops is not None else None

        loss = loss_dict = matched_indices = None
        if labels is not None:
            losses = self.criterion(
                logits,
                pred_boxes,
                labels,
                auxiliary_outputs=auxiliary_outputs if self.config.auxiliary_loss else None,
                pred_object_embeddings=object_embeddings if targets is not None else None,
                target_object_embeddings=targets,
            )
            loss, loss_dict, matched_indices = losses.loss, losses.loss_dict, losses.matched_indices
        output = CutMixDetregPretrainingOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary_outputs,
            object_embeddings=object_embeddings,
            target_object_embeddings=targets,
            matched_indices=matched_indices,
            last_hidden_state=outputs.last_hidden_state,
        )
        return output if return_dict else output.to_tuple()
