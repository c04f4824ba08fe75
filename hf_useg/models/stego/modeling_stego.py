"""STEGO (Hamilton et al., ICLR 2022): a segmentation head distilled from frozen DINO feature correspondences
(METHODS 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import FeatureBackbone
from ...clustering import ClusterProbe
from ...modeling_utils import (
    UnsupervisedSegmentationPreTrainedModel,
    UnsupervisedSegmenterOutput,
    check_pixel_values,
)
from .configuration_stego import StegoConfig
from .loss_stego import StegoCorrelationLoss

__all__ = [
    "StegoForUnsupervisedSegmentation",
    "StegoPreTrainedModel",
    "StegoSegmentationHead",
    "StegoSegmenterOutput",
]


@dataclass
class StegoSegmenterOutput(UnsupervisedSegmenterOutput):
    """`UnsupervisedSegmenterOutput` plus the parts of STEGO's training loss (set when the loss is computed):
    the weighted correlation loss, its three unweighted means, and the two probe losses."""

    correlation_loss: torch.FloatTensor | None = None
    pos_intra: torch.FloatTensor | None = None
    pos_inter: torch.FloatTensor | None = None
    neg_inter: torch.FloatTensor | None = None
    cluster_probe_loss: torch.FloatTensor | None = None
    linear_probe_loss: torch.FloatTensor | None = None


class StegoSegmentationHead(nn.Module):
    """``code = L(drop(f)) + N(drop(f))`` with ``L`` a 1x1 conv ``C -> D`` and ``N`` = 1x1 conv ``C -> C``, ReLU,
    1x1 conv ``C -> D`` (``projection_type="nonlinear"``; ``"linear"`` keeps ``L`` only). Each branch gets its own
    ``Dropout2d`` draw in training (METHODS 1.1)."""

    def __init__(self, in_channels: int, dim: int, projection_type: str = "nonlinear", dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(p=dropout)
        self.linear = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.nonlinear = None
        if projection_type == "nonlinear":
            self.nonlinear = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, kernel_size=1),
                nn.ReLU(),
                nn.Conv2d(in_channels, dim, kernel_size=1),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        code = self.linear(self.dropout(features))
        if self.nonlinear is not None:
            code = code + self.nonlinear(self.dropout(features))
        return code


class StegoPreTrainedModel(UnsupervisedSegmentationPreTrainedModel):
    config_class = StegoConfig
    base_model_prefix = "stego"


class StegoForUnsupervisedSegmentation(StegoPreTrainedModel):
    """STEGO: frozen backbone -> segmentation head (the "code") -> cluster probe and linear probe.

    ``forward(pixel_values, labels=None, pixel_values_pos=None, ...)`` always returns the probes' outputs; with
    ``pixel_values_pos`` (each image's kNN partner) it also computes the training loss: the correlation loss on
    the code plus the two probe losses on the *detached* code (so the probes never train the head).

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig
    >>> from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation
    >>> tiny = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                  patch_size=8, image_size=32, layer_norm_eps=1e-6)
    >>> model = StegoForUnsupervisedSegmentation(StegoConfig(backbone_config=tiny, dim=8, num_classes=3))
    >>> out = model(torch.randn(2, 3, 32, 32), pixel_values_pos=torch.randn(2, 3, 32, 32))
    >>> out.loss.shape, out.logits.shape, out.code.shape
    (torch.Size([]), torch.Size([2, 3, 4, 4]), torch.Size([2, 8, 4, 4]))
    ```
    """

    def __init__(self, config: StegoConfig):
        super().__init__(config)
        self.backbone = FeatureBackbone(
            config.backbone_config, pos_embed_interpolation=config.pos_embed_interpolation, frozen=True
        )
        hidden_size = self.backbone.hidden_size
        self.segmentation_head = StegoSegmentationHead(hidden_size, config.dim, config.projection_type, config.dropout)
        self.feature_dropout = nn.Dropout2d(p=config.dropout)
        self.cluster_probe = ClusterProbe(config.dim, config.num_classes + config.extra_clusters)
        self.linear_probe = nn.Conv2d(config.dim, config.num_classes, kernel_size=1)
        self.correlation_loss = StegoCorrelationLoss(config)
        self.post_init()

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen backbone feature map ``[B, C, h, w]``."""
        check_pixel_values(
            pixel_values, self.backbone.patch_size, getattr(self.config.backbone_config, "num_channels", 3)
        )
        return self.backbone(pixel_values).feature_map

    def compute_code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.extract_features(pixel_values))

    def probe_log_probs(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cluster_probe.log_probs(code, alpha=2.0), torch.log_softmax(self.linear_probe(code), dim=1)

    def probe_losses(
        self, code: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cluster-probe loss (hard assignments) and linear-probe cross-entropy on the detached code; the linear
        logits are bilinearly upsampled to the label size and pixels labelled outside ``[0, num_classes)`` are
        ignored (METHODS 1.1)."""
        detached = code.detach()
        cluster_loss, _ = self.cluster_probe(detached, alpha=None)
        if labels is None:
            return cluster_loss, None
        if labels.ndim != 3:
            raise ValueError(f"labels must be [batch, height, width], got shape {tuple(labels.shape)}")
        logits = F.interpolate(
            self.linear_probe(detached), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        valid = (labels >= 0) & (labels < self.config.num_classes)
        if not valid.any():
            return cluster_loss, logits.sum() * 0.0
        targets = labels.masked_fill(~valid, -100).long()
        return cluster_loss, F.cross_entropy(logits, targets, ignore_index=-100)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values_pos: torch.Tensor | None = None,
        coords1: torch.Tensor | None = None,
        coords2: torch.Tensor | None = None,
        neg_perms: torch.Tensor | None = None,
        backbone_features: torch.Tensor | None = None,
        backbone_features_pos: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> StegoSegmenterOutput:
        r"""
        pixel_values_pos (`torch.Tensor`, *optional*):
            Each image's kNN partner; when given (or ``backbone_features_pos``), the training loss is computed.
        coords1, coords2, neg_perms (`torch.Tensor`, *optional*):
            Fixed draws for the correlation loss (see `StegoCorrelationLoss`); drawn when None.
        backbone_features, backbone_features_pos (`torch.Tensor`, *optional*):
            Precomputed frozen-backbone feature maps ``[B, C, h, w]`` used instead of running the backbone on
            ``pixel_values`` / ``pixel_values_pos`` (the backbone is frozen and STEGO trains without augmentation,
            so a training run can compute them once; see ``cache_backbone_features`` of `StegoTrainingOptions`).
        """
        if backbone_features is None:
            if pixel_values is None:
                raise ValueError("give pixel_values (or precomputed backbone_features)")
            backbone_features = self.extract_features(pixel_values)
        if backbone_features_pos is None and pixel_values_pos is not None:
            if pixel_values is not None and pixel_values_pos.shape != pixel_values.shape:
                raise ValueError(
                    f"pixel_values_pos {tuple(pixel_values_pos.shape)} must match "
                    f"pixel_values {tuple(pixel_values.shape)}"
                )
            backbone_features_pos = self.extract_features(pixel_values_pos)
        features = backbone_features
        code = self.segmentation_head(features)
        loss = correlation = cluster_loss = linear_loss = None
        if backbone_features_pos is not None:
            if backbone_features_pos.shape != features.shape:
                raise ValueError(
                    f"backbone_features_pos {tuple(backbone_features_pos.shape)} must match "
                    f"backbone_features {tuple(features.shape)}"
                )
            features_pos = backbone_features_pos
            code_pos = self.segmentation_head(features_pos)
            correlation = self.correlation_loss(
                self.feature_dropout(features),
                self.feature_dropout(features_pos),
                code,
                code_pos,
                coords1=coords1,
                coords2=coords2,
                neg_perms=neg_perms,
            )
            cluster_loss, linear_loss = self.probe_losses(code, labels)
            loss = correlation.loss + cluster_loss
            if linear_loss is not None:
                loss = loss + linear_loss
        detached = code.detach()
        return StegoSegmenterOutput(
            loss=loss,
            logits=self.cluster_probe.log_probs(detached, alpha=2.0),
            linear_logits=self.linear_probe(detached),
            code=code,
            features=features,
            correlation_loss=None if correlation is None else correlation.loss,
            pos_intra=None if correlation is None else correlation.pos_intra,
            pos_inter=None if correlation is None else correlation.pos_inter,
            neg_inter=None if correlation is None else correlation.neg_inter,
            cluster_probe_loss=cluster_loss,
            linear_probe_loss=linear_loss,
        )
