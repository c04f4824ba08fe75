"""PiCIE (Cho et al., CVPR 2021): an FPN feature extractor trained by clustering its own features with invariance
to photometric and equivariance to geometric changes (METHODS 2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone

from ...backbones import FeatureBackbone
from ...modeling_utils import (
    UnsupervisedSegmentationPreTrainedModel,
    UnsupervisedSegmenterOutput,
    check_pixel_values,
)
from .augmentation import apply_geometric
from .configuration_picie import PicieConfig
from .loss_picie import picie_loss, picie_loss_with_overclustering

__all__ = [
    "PicieFeaturePyramid",
    "PicieForUnsupervisedSegmentation",
    "PiciePreTrainedModel",
    "PicieSegmenterOutput",
]

_TARGET_KEYS = ("centroids1", "centroids2", "labels1", "labels2")
_OPTIONAL_TARGET_KEYS = (
    "weights1",
    "weights2",
    "over_centroids1",
    "over_centroids2",
    "over_labels1",
    "over_labels2",
    "over_weights1",
    "over_weights2",
)


@dataclass
class PicieSegmenterOutput(UnsupervisedSegmenterOutput):
    """`UnsupervisedSegmenterOutput` plus the parts of PiCIE's loss (set when the loss is computed): the within- and
    cross-view terms of the main clustering, and with "+H" the main and overclustering losses before weighting."""

    within: torch.FloatTensor | None = None
    cross: torch.FloatTensor | None = None
    main_loss: torch.FloatTensor | None = None
    overclustering_loss: torch.FloatTensor | None = None


class PicieFeaturePyramid(nn.Module):
    """PiCIE's FPN decoder (METHODS 2.1): a 1x1 lateral conv (with bias) per input map to ``dim`` channels, then from
    the coarsest map down: bilinearly upsample (``align_corners=False``) to the next finer map's size and add its
    lateral. Returns the finest map; no norm, no ReLU. With a single input map it is one 1x1 projection.

    Example:

    ```python
    >>> fpn = PicieFeaturePyramid([8, 16], dim=4)
    >>> fpn([torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]).shape
    torch.Size([1, 4, 8, 8])
    ```
    """

    def __init__(self, in_channels: Sequence[int], dim: int):
        super().__init__()
        if not in_channels:
            raise ValueError("PicieFeaturePyramid needs at least one input map")
        self.lateral = nn.ModuleList(nn.Conv2d(int(channels), dim, kernel_size=1) for channels in in_channels)

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``feature_maps`` from finest to coarsest, as a backbone returns its stages."""
        if len(feature_maps) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(feature_maps)}")
        output = self.lateral[-1](feature_maps[-1])
        for conv, feature_map in zip(reversed(self.lateral[:-1]), reversed(feature_maps[:-1])):
            lateral = conv(feature_map)
            output = F.interpolate(output, size=lateral.shape[-2:], mode="bilinear", align_corners=False) + lateral
        return output


class PiciePreTrainedModel(UnsupervisedSegmentationPreTrainedModel):
    config_class = PicieConfig
    base_model_prefix = "picie"


class PicieForUnsupervisedSegmentation(PiciePreTrainedModel):
    """PiCIE: backbone -> FPN -> L2-normalised embedding, classified by frozen k-means centroids.

    The backbone is wrapped in [`~hf_useg.backbones.FeatureBackbone`] (parameters named ``backbone.model.*``). An
    `AutoBackbone` (ResNet-18 by default) is built for *all* the stages in ``config.backbone_config.out_features``,
    because `FeatureBackbone` itself only reads the last one; a ViT/DINOv2 gives one map and the FPN reduces to a 1x1
    projection. The centroids are a persistent buffer ``centroids`` ``[K, fpn_dim]`` (saved with the weights, never
    trained): logits are ``s_k = <ẑ, μ_k>`` with ẑ the L2-normalised FPN feature, no temperature, no bias.

    * `compute_code(x)` = ẑ at feature resolution; `probe_log_probs(code)` = ``log_softmax(<code, μ>)``, so the
      shared `predict` (flip average -> bilinear upsampling of ẑ -> logits) equals PiCIE's evaluation (logits ->
      bilinear upsampling -> argmax), the logits being linear in ẑ.
    * `forward(pixel_values, pixel_values_view2=..., geometric_params=..., cluster_targets=...)` computes the
      training loss: view 1 = ``pixel_values`` (already ``G(P1(x))``), view 2 features = ``G(f(pixel_values_view2))``
      and [`picie_loss`] (or the "+H" loss when ``cluster_targets`` holds the ``over_*`` entries).

    Example:

    ```python
    >>> import torch
    >>> from transformers import ResNetConfig
    >>> from hf_useg import PicieConfig, PicieForUnsupervisedSegmentation
    >>> tiny = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic")
    >>> model = PicieForUnsupervisedSegmentation(PicieConfig(backbone_config=tiny, fpn_dim=16, num_clusters=3))
    >>> model.compute_code(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 16, 16, 16])
    >>> model.set_centroids(torch.randn(3, 16))
    >>> model.predict(torch.randn(1, 3, 64, 64)).cluster_log_probs.shape
    torch.Size([1, 3, 64, 64])
    ```
    """

    def __init__(self, config: PicieConfig):
        super().__init__(config)
        backbone_config = config.backbone_config
        self.is_token_backbone = config.is_token_backbone
        if self.is_token_backbone:
            self.backbone = FeatureBackbone(
                backbone_config,
                pos_embed_interpolation=config.pos_embed_interpolation,
                frozen=config.freeze_backbone,
            )
            in_channels = [self.backbone.hidden_size]
        else:
            # every FPN stage, not only the last one that FeatureBackbone would read (its `model` argument takes
            # the multi-stage AutoBackbone as is; parameter names do not depend on out_features)
            model = AutoBackbone.from_config(backbone_config)
            self.backbone = FeatureBackbone(model.config, frozen=config.freeze_backbone, model=model)
            in_channels = list(model.channels)
        self.fpn = PicieFeaturePyramid(in_channels, config.fpn_dim)
        self.register_buffer("centroids", torch.zeros(config.num_clusters, config.fpn_dim))
        self._output_stride: int | None = None
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        """Stride of the FPN output in pixels (4 for ResNet, the patch size for a ViT); inputs must be multiples."""
        if self.is_token_backbone:
            return self.backbone.patch_size
        if self._output_stride is None:
            self._output_stride = self._measure_output_stride()
        return self._output_stride

    @torch.no_grad()
    def _measure_output_stride(self) -> int:
        parameter = next(self.backbone.model.parameters())
        size = 128
        dummy = torch.zeros(
            1, self.backbone.num_channels or 3, size, size, device=parameter.device, dtype=parameter.dtype
        )
        was_training = self.backbone.model.training
        self.backbone.model.eval()  # no BatchNorm statistics from the probe
        try:
            height = self.backbone.model(dummy).feature_maps[0].shape[-2]
        finally:
            self.backbone.model.train(was_training)
        if size % height:
            raise ValueError(f"cannot infer the output stride of {type(self.backbone.model).__name__}")
        return size // height

    def backbone_feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's maps, finest first (one map for a ViT)."""
        check_pixel_values(pixel_values, self.patch_size, getattr(self.config.backbone_config, "num_channels", 3))
        if self.is_token_backbone:
            return [self.backbone(pixel_values).feature_map]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone.frozen):
            return list(self.backbone.model(pixel_values).feature_maps)

    def fpn_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) FPN output ``[B, fpn_dim, H / s, W / s]``."""
        return self.fpn(self.backbone_feature_maps(pixel_values))

    def compute_code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The clustered embedding ẑ: the FPN output L2-normalised over channels."""
        return F.normalize(self.fpn_features(pixel_values), dim=1)

    def cluster_logits(self, code: torch.Tensor) -> torch.Tensor:
        """``s_k = <code, μ_k>`` ``[B, K, h, w]`` (the frozen 1x1 conv whose weights are the centroids)."""
        if code.ndim != 4 or code.shape[1] != self.config.fpn_dim:
            raise ValueError(f"code must be [B, {self.config.fpn_dim}, h, w], got shape {tuple(code.shape)}")
        return torch.einsum("bchw,kc->bkhw", code, self.centroids.to(code.dtype))

    def probe_log_probs(self, code: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check_fitted()
        return torch.log_softmax(self.cluster_logits(code), dim=1), None

    @property
    def is_fitted(self) -> bool:
        """Whether the centroids were fitted (`set_centroids`, training, or loaded weights): the ``centroids``
        buffer starts at zero and k-means centroids of normalised features never are all zero."""
        return bool(self.centroids.any())

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError(
                "this PicieForUnsupervisedSegmentation has no fitted centroids: train it (the recipe's final "
                "re-clustering sets them), call model.set_centroids(...), or load a trained model"
            )

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Use ``centroids`` ``[num_clusters, fpn_dim]`` (k-means centroids of normalised features, not
        re-normalised) for the logits; the model is then fitted."""
        if not isinstance(centroids, torch.Tensor):
            raise TypeError(f"centroids must be a torch.Tensor, got {type(centroids).__name__}")
        if tuple(centroids.shape) != tuple(self.centroids.shape):
            raise ValueError(f"centroids must be {list(self.centroids.shape)}, got {list(centroids.shape)}")
        if not torch.isfinite(centroids).all():
            raise ValueError("centroids must be finite")
        if not centroids.any():
            raise ValueError("centroids must not all be zero (zero centroids mean an unfitted model)")
        self.centroids.copy_(centroids.to(device=self.centroids.device, dtype=self.centroids.dtype))

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values_view2: torch.Tensor | None = None,
        geometric_params: torch.Tensor | None = None,
        cluster_targets: Mapping[str, torch.Tensor] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PicieSegmenterOutput:
        """Cluster log-probabilities of ``pixel_values`` (when the centroids are fitted) and, with
        ``pixel_values_view2``, the training loss.

        Args:
            pixel_values (`torch.Tensor` of shape `[B, 3, H, W]`):
                Images; in training, view 1 = ``G(P1(x))``.
            labels (`torch.Tensor`, *optional*):
                Ground truth; unused (PiCIE has no supervised part), accepted for the shared interface.
            pixel_values_view2 (`torch.Tensor` of shape `[B, 3, H, W]`, *optional*):
                View 2 = ``P2(x)``; its features get ``G`` (``geometric_params``) before the loss.
            geometric_params (`torch.Tensor` of shape `[B, 4]`, *optional*):
                G of each image (rows of `PicieViewParameters.geometric`).
            cluster_targets (`Mapping[str, torch.Tensor]`, *optional*):
                The epoch's clustering: ``centroids1``/``centroids2`` ``[K, D]``, ``labels1``/``labels2``
                ``[B, h, w]`` (long), optional ``weights1``/``weights2`` ``[K]``; for "+H" also ``over_centroids1/2``,
                ``over_labels1/2`` and optional ``over_weights1/2``.
        """
        features = self.backbone_feature_maps(pixel_values)
        raw = self.fpn(features)
        code = F.normalize(raw, dim=1)
        # a training step (view 2 given) runs on the epoch's centroids: no fitted check, which would sync a GPU
        fitted = pixel_values_view2 is not None or self.is_fitted
        logits = torch.log_softmax(self.cluster_logits(code.detach()), dim=1) if fitted else None
        output = PicieSegmenterOutput(logits=logits, code=code, features=features[-1])
        if pixel_values_view2 is None:
            return output
        if geometric_params is None or cluster_targets is None:
            raise ValueError("the PiCIE loss needs geometric_params and cluster_targets with pixel_values_view2")
        if pixel_values_view2.shape != pixel_values.shape:
            raise ValueError(
                f"pixel_values_view2 {tuple(pixel_values_view2.shape)} must match pixel_values "
                f"{tuple(pixel_values.shape)}"
            )
        missing = [key for key in _TARGET_KEYS if key not in cluster_targets]
        unknown = sorted(set(cluster_targets) - set(_TARGET_KEYS) - set(_OPTIONAL_TARGET_KEYS))
        if missing or unknown:
            raise ValueError(f"cluster_targets: missing {missing}, unknown {unknown}")
        raw2 = apply_geometric(self.fpn_features(pixel_values_view2), geometric_params, tuple(raw.shape[-2:]))
        targets = dict(cluster_targets)
        if "over_centroids1" in targets:
            result = picie_loss_with_overclustering(
                raw,
                raw2,
                targets["centroids1"],
                targets["centroids2"],
                targets["labels1"],
                targets["labels2"],
                targets["over_centroids1"],
                targets["over_centroids2"],
                targets["over_labels1"],
                targets["over_labels2"],
                weights1=targets.get("weights1"),
                weights2=targets.get("weights2"),
                over_weights1=targets.get("over_weights1"),
                over_weights2=targets.get("over_weights2"),
            )
            output.loss = result.loss
            output.within, output.cross = result.main.within, result.main.cross
            output.main_loss, output.overclustering_loss = result.main.loss, result.over.loss
        else:
            result = picie_loss(
                raw,
                raw2,
                targets["centroids1"],
                targets["centroids2"],
                targets["labels1"],
                targets["labels2"],
                weights1=targets.get("weights1"),
                weights2=targets.get("weights2"),
            )
            output.loss, output.within, output.cross = result.loss, result.within, result.cross
            output.main_loss = result.loss
        return output
