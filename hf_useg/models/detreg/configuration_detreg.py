"""Configuration of CutMix-DETReg detector pretraining (METHODS 5)."""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, DeformableDetrConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["BOX_SOURCES", "DETREG_DETECTOR_KWARGS", "CutMixDetregConfig"]

# where the pseudo-boxes come from (recorded in the config for the model card; the data pipeline makes them)
BOX_SOURCES = ("cutmix", "random", "selective_search")

# DETReg's detector (its ``deformable_detr`` defaults, ``util/default_args.py``): Deformable DETR on a ResNet-50
# (stages 2-4, strides 8/16/32, + one extra stride-64 level), 300 queries, 6 + 6 layers, d_model 256, 8 heads, FFN
# 1024, 4 sampling points, dropout 0.1, no box refinement, single stage. One output class: objectness. The loss fields
# are Deformable DETR's fine-tuning settings (class cost 2, auxiliary losses), what the fine-tuning folder carries;
# pretraining uses the loss fields of `CutMixDetregConfig` itself.
DETREG_DETECTOR_KWARGS = {
    "backbone_config": {"model_type": "resnet", "out_features": ["stage2", "stage3", "stage4"]},
    "num_queries": 300,
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "dropout": 0.1,
    "num_feature_levels": 4,
    "encoder_n_points": 4,
    "decoder_n_points": 4,
    "position_embedding_type": "sine",
    "with_box_refine": False,
    "two_stage": False,
    "num_labels": 1,
    "class_cost": 2,
    "bbox_cost": 5,
    "giou_cost": 2,
    "bbox_loss_coefficient": 5,
    "giou_loss_coefficient": 2,
    "focal_alpha": 0.25,
    "auxiliary_loss": True,
}


@strict
class CutMixDetregConfig(PreTrainedConfig):
    r"""
    Configuration of [`CutMixDetregForPretraining`]: DETReg's detector pretraining (METHODS 5) on unlabelled images,
    with pseudo-boxes from CutMix pastes (the thesis), random boxes or Selective Search. Defaults are DETReg's.

    The detector is `transformers`' `DeformableDetrForObjectDetection` (pure PyTorch, runs on CPU) with one output
    class (objectness). Its pseudo-boxes are Hungarian-matched to the queries; losses: sigmoid focal objectness, L1 and
    GIoU box losses on every decoder layer, and an L1 loss between a small MLP on the last decoder layer's queries and
    a frozen encoder's embedding of each matched box's content.

    Args:
        detector_config (`dict` or `DeformableDetrConfig`, *optional*):
            The detector. Defaults to DETReg's (`DETREG_DETECTOR_KWARGS`: ResNet-50 stages 2-4, 300 queries, 6 + 6
            layers, d_model 256, no box refinement, single stage). Its backbone must be a `transformers`-native
            config (e.g. ``ResNetConfig(out_features=["stage2", "stage3", "stage4"])``), never timm; a dict without
            ``backbone_config`` gets the ResNet-50 one. ``num_labels`` is always 1 (objectness). Its own loss fields
            (``class_cost``, ``auxiliary_loss``, ...) are not used by pretraining: they are the fine-tuning settings
            that [`~CutMixDetregForPretraining.save_detector_for_finetuning`] writes. ``two_stage=True`` is not
            supported (its encoder-proposal loss is not implemented).
        object_encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            The frozen encoder that embeds each box's content (the embedding loss's target). `None` (default): a copy
            of the detector's backbone, initialised from it (DETReg uses its SwAV backbone). Otherwise any
            `FeatureBackbone` config: a ViT/DINOv2 (the CLS token) or an `AutoBackbone` config (the spatial mean of
            a stage's feature map).
        object_encoder_stage (`str`, *optional*):
            For `AutoBackbone` encoders: the stage whose feature map is averaged, e.g. ``"stage2"``; `None` (default):
            the last stage. DETReg's released code (``--obj_embedding_head intermediate``) averages SwAV's stage 2
            (512 channels).
        object_embedding_dim (`int`, *optional*):
            Size of the object embeddings: the frozen encoder's output size (2048 for the default ResNet-50). `None`
            (default): filled in from the encoder when the model is built.
        object_embedding_head_layers (`int`, *optional*, defaults to 2):
            Linear layers of the MLP (width d_model, ReLU between) from the last decoder layer's queries to the
            object embeddings.
        object_crop_size (`int`, *optional*, defaults to 128):
            Side of the square box crops the encoder embeds (the data pipeline resizes each box's content to it; a
            multiple of the encoder's stride).
        freeze_backbone (`bool`, *optional*, defaults to `True`):
            Freeze the detector's backbone during pretraining (DETReg: ``--lr_backbone 0``): no gradients, eval mode.
            When `False`, the backbone trains as in (Deformable) DETR: a ResNet's stem and first stage stay frozen,
            any other backbone trains whole.
        box_source (`str`, *optional*, defaults to `"cutmix"`):
            Where the pseudo-boxes come from: `"cutmix"` (pasted rectangles of other images, the thesis), `"random"`
            (the same box law on the unmodified image, the control) or `"selective_search"` (DETReg's). Recorded for
            the model card; the data pipeline makes the boxes.
        class_cost (`float`, *optional*, defaults to 2):
            Weight of the focal objectness cost in the Hungarian matching (alpha 0.25, gamma 2).
        bbox_cost (`float`, *optional*, defaults to 5):
            Weight of the L1 box cost in the matching.
        giou_cost (`float`, *optional*, defaults to 2):
            Weight of the (negative) GIoU cost in the matching.
        objectness_loss_weight (`float`, *optional*, defaults to 2):
            Weight of the sigmoid focal objectness loss (every decoder layer).
        bbox_loss_weight (`float`, *optional*, defaults to 5):
            Weight of the L1 box loss (every decoder layer).
        giou_loss_weight (`float`, *optional*, defaults to 2):
            Weight of the GIoU loss (every decoder layer).
        object_embedding_loss_weight (`float`, *optional*, defaults to 1):
            Weight of the L1 object-embedding loss (last decoder layer only).
        focal_alpha (`float`, *optional*, defaults to 0.25):
            Alpha of the focal objectness loss.
        auxiliary_loss (`bool`, *optional*, defaults to `True`):
            Apply the objectness and box losses to every decoder layer (each matched on its own), not only the last.

    Example:

    ```python
    >>> from transformers import DeformableDetrConfig, ResNetConfig
    >>> from hf_useg import CutMixDetregConfig
    >>> config = CutMixDetregConfig()
    >>> config.detector_config.num_queries, config.objectness_loss_weight, config.box_source
    (300, 2, 'cutmix')
    >>> backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1],
    ...                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    >>> detector = DeformableDetrConfig(backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2,
    ...                                 num_queries=10, encoder_ffn_dim=32, decoder_ffn_dim=32)
    >>> tiny = CutMixDetregConfig(detector_config=detector, object_crop_size=32, box_source="random")
    >>> tiny.detector_config.num_labels
    1
    ```
    """

    model_type = "cutmix_detreg"
    sub_configs_defaults = {
        "detector_config": SubConfigSpec(config_class=DeformableDetrConfig, init_kwargs=DETREG_DETECTOR_KWARGS),
        "object_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet", optional=True),
    }

    detector_config: dict | PreTrainedConfig | None = None
    object_encoder_config: dict | PreTrainedConfig | None = None
    object_encoder_stage: str | None = None
    object_embedding_dim: int | None = None
    object_embedding_head_layers: int = 2
    object_crop_size: int = 128
    freeze_backbone: bool = True
    box_source: str = "cutmix"
    class_cost: float | int = 2
    bbox_cost: float | int = 5
    giou_cost: float | int = 2
    objectness_loss_weight: float | int = 2
    bbox_loss_weight: float | int = 5
    giou_loss_weight: float | int = 2
    object_embedding_loss_weight: float | int = 1
    focal_alpha: float | int = 0.25
    auxiliary_loss: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.detector_config, dict):
            detector = dict(self.detector_config)
            if detector.pop("use_timm_backbone", False) or detector.get("backbone") is not None:
                raise ValueError(_NO_TIMM)
            if detector.get("backbone_config") is None:
                detector["backbone_config"] = copy.deepcopy(DETREG_DETECTOR_KWARGS["backbone_config"])
            self.detector_config = detector
        elif isinstance(self.detector_config, PreTrainedConfig):
            # our copy: num_labels is changed below, and the caller's config stays theirs
            self.detector_config = copy.deepcopy(self.detector_config)
        super().__post_init__(**kwargs)

        detector = self.detector_config
        if not isinstance(detector, DeformableDetrConfig):
            raise TypeError(
                f"detector_config must be a DeformableDetrConfig (or its dict), got {type(detector).__name__}"
            )
        backbone = detector.backbone_config
        if (
            backbone is None
            or "timm" in getattr(backbone, "model_type", "")
            or getattr(detector, "use_timm_backbone", 0)
        ):
            raise ValueError(_NO_TIMM)
        if detector.two_stage:
            raise ValueError(
                "two_stage=True is not supported: DETReg's base detector is single-stage (its encoder-proposal loss "
                "is not implemented here); use with_box_refine=True alone for iterative box refinement"
            )
        if detector.num_labels != 1:
            detector.num_labels = 1  # objectness; the class head is dropped for fine-tuning

        if self.box_source not in BOX_SOURCES:
            raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {self.box_source!r}")
        for name in ("class_cost", "bbox_cost", "giou_cost"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.class_cost == 0 and self.bbox_cost == 0 and self.giou_cost == 0:
            raise ValueError("the matching costs (class_cost, bbox_cost, giou_cost) can't all be 0")
        for name in ("objectness_loss_weight", "bbox_loss_weight", "giou_loss_weight", "object_embedding_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        if self.object_embedding_head_layers < 1:
            raise ValueError(f"object_embedding_head_layers must be >= 1, got {self.object_embedding_head_layers}")
        if self.object_crop_size < 1:
            raise ValueError(f"object_crop_size must be >= 1, got {self.object_crop_size}")
        if self.object_embedding_dim is not None and self.object_embedding_dim < 1:
            raise ValueError(f"object_embedding_dim must be >= 1, got {self.object_embedding_dim}")
        if self.object_encoder_stage is not None:
            stage_names = getattr(self.encoder_config, "stage_names", None)
            if not stage_names:
                raise ValueError(
                    "object_encoder_stage applies to stage backbones (ResNet, ConvNeXt, ...); the object encoder "
                    f"{type(self.encoder_config).__name__} has no stages (a ViT's embedding is its CLS token)"
                )
            if self.object_encoder_stage not in stage_names:
                raise ValueError(
                    f"object_encoder_stage must be one of the encoder's stages {list(stage_names)}, got "
                    f"{self.object_encoder_stage!r}"
                )

    @property
    def encoder_config(self) -> PreTrainedConfig:
        """The architecture of the frozen object encoder: `object_encoder_config`, or the detector's backbone config
        when it is `None` (a copy: the encoder has its own module and weights)."""
        if self.object_encoder_config is not None:
            return self.object_encoder_config
        return copy.deepcopy(self.detector_config.backbone_config)


_NO_TIMM = (
    "the detector's backbone must be a transformers-native config (e.g. detector_config={'backbone_config': "
    "ResNetConfig(out_features=['stage2', 'stage3', 'stage4'])}), never a timm backbone: timm needs torchvision, "
    "which this package keeps out of its environment"
)
