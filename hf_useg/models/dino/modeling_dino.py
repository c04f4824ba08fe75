"""Zero-training DINO segmentation baselines (METHODS 4.2): cosine k-means over frozen DINO patch features, and
per-head masks from the last layer's CLS attention."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...backbones import FeatureBackbone
from ...clustering import ClusterProbe, KMeansResult, kmeans
from ...modeling_utils import (
    UnsupervisedSegmentationPrediction,
    UnsupervisedSegmentationPreTrainedModel,
    UnsupervisedSegmenterOutput,
    backbone_precision,
    check_pixel_values,
)
from .configuration_dino import DinoSegmentationConfig

__all__ = [
    "DinoAttentionPrediction",
    "DinoForUnsupervisedSegmentation",
    "DinoPreTrainedModel",
    "attention_mass_mask",
]


def attention_mass_mask(weights: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """DINO's attention mask (METHODS 4.2) along the last dimension: keep the largest weights until their sum
    reaches ``threshold`` of the total.

    A weight is kept when the mass of the weights strictly larger than it is below ``threshold * total``; so the
    weight that makes the sum reach the threshold is kept, the ones after it are not, a sum landing exactly on the
    threshold stops there, and equal weights are kept or dropped together (the mask depends on the values only,
    not on their order; without ties this is DINO's ``cumsum > 1 - threshold`` rule). Zero weights are never
    kept. Computed in float64.

    Args:
        weights: non-negative ``[..., N]`` (e.g. ``[B, heads, h * w]`` CLS attention; need not sum to one).
        threshold: fraction of the mass to keep, in (0, 1].

    Returns:
        bool tensor of the shape of ``weights``.

    Example:

    ```python
    >>> attention_mass_mask(torch.tensor([0.1, 0.5, 0.2, 0.2]), threshold=0.6)
    tensor([False,  True,  True,  True])
    >>> attention_mass_mask(torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0]), threshold=0.6)
    tensor([ True, False,  True, False, False])
    ```
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if weights.ndim == 0 or weights.shape[-1] == 0:
        raise ValueError(f"weights must have a non-empty last dimension, got shape {tuple(weights.shape)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not torch.isfinite(weights).all():
        raise ValueError("attention weights contain NaN or infinite values")
    if (weights < 0).any():
        raise ValueError("attention weights must be non-negative")
    values = weights.double()
    descending = values.sort(dim=-1, descending=True).values
    # mass before each position of the descending order
    before = torch.cat([torch.zeros_like(descending[..., :1]), descending.cumsum(-1)[..., :-1]], dim=-1)
    # the first position of each value in that order = the number of strictly larger weights
    first = torch.searchsorted((-descending).contiguous(), (-values).contiguous(), right=False)
    larger_mass = before.gather(-1, first)
    return larger_mass < threshold * values.sum(-1, keepdim=True)


@dataclass
class DinoAttentionPrediction(UnsupervisedSegmentationPrediction):
    """Output of `DinoForUnsupervisedSegmentation.predict` with ``mode="attention"`` (and of `attention_masks`).

    Args:
        attention_maps (`torch.FloatTensor` of shape `(batch_size, num_heads, height, width)`):
            Last-layer CLS->patch attention of every head (the CLS key left out), nearest-upsampled from the patch
            grid to the output size (each patch's value fills its pixels, as in DINO's figures).
        attention_masks (`torch.BoolTensor` of shape `(batch_size, num_heads, height, width)`):
            Per-head masks keeping ``attention_threshold`` of the head's mass on the patch grid
            ([`attention_mass_mask`]), nearest-upsampled.
        cluster_log_probs: None in attention mode (the masks are per head, not a partition into clusters).
    """

    attention_maps: torch.FloatTensor | None = None
    attention_masks: torch.BoolTensor | None = None


class DinoPreTrainedModel(UnsupervisedSegmentationPreTrainedModel):
    config_class = DinoSegmentationConfig
    base_model_prefix = "dino"


class DinoForUnsupervisedSegmentation(DinoPreTrainedModel):
    """DINO zero-training baselines (METHODS 4.2) on a frozen backbone.

    * ``mode="kmeans"``: ``num_clusters`` cosine centroids fitted with [`fit`] on a dataset's patch features;
      prediction = nearest centroid (cosine), upsampled.
    * ``mode="attention"``: `predict` returns a [`DinoAttentionPrediction`] with each head's last-layer CLS
      attention (``attention_maps``) and its mask keeping ``config.attention_threshold`` of the mass
      (``attention_masks``), both ``[B, heads, H, W]``; no fitting needed. [`attention_masks`] gives the same
      in either mode, and `hf_useg.visualization.draw_attention_heads` draws them.

    The centroids live in a [`~hf_useg.clustering.ClusterProbe`] (frozen), so evaluation shares STEGO's code
    path: ``log_softmax(logit_scale * cosine)``.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg import DinoSegmentationConfig, DinoForUnsupervisedSegmentation
    >>> from transformers import ViTConfig
    >>> tiny = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                  patch_size=8, image_size=32)
    >>> model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=tiny, num_clusters=3))
    >>> _ = model.fit([torch.randn(4, 3, 32, 32)], progress=False)
    >>> model.predict(torch.randn(1, 3, 32, 32)).cluster_log_probs.shape
    torch.Size([1, 3, 32, 32])
    >>> model.config.mode = "attention"
    >>> model.predict(torch.randn(1, 3, 32, 32)).attention_masks.shape
    torch.Size([1, 2, 32, 32])
    ```
    """

    frozen_modules = ("cluster_probe.clusters",)  # fitted by k-means, never by gradients

    def __init__(self, config: DinoSegmentationConfig):
        super().__init__(config)
        self.backbone = FeatureBackbone(
            config.backbone_config, pos_embed_interpolation=config.pos_embed_interpolation, frozen=True
        )
        self.cluster_probe = ClusterProbe(self.backbone.hidden_size, config.num_clusters)
        self.cluster_probe.clusters.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is getattr(self, "cluster_probe", None):
            module.clusters.data.zero_()  # no centroids until `fit`: zero centroids mean "not fitted"
        else:
            super()._init_weights(module)

    @property
    def is_fitted(self) -> bool:
        """Whether the centroids are fitted: derived from them (all zero until `fit`). A `config.json` written
        before this property existed carries an ``is_fitted`` flag instead, which is honoured."""
        legacy = getattr(self.config, "is_fitted", None)
        if legacy is not None:
            return bool(legacy)
        return bool(self.cluster_probe.clusters.detach().abs().sum() > 0)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError(
                "this DinoForUnsupervisedSegmentation has no fitted centroids: call model.fit(batches) on your "
                "images first (or load a fitted model with from_pretrained)"
            )

    def compute_code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(
            pixel_values, self.backbone.patch_size, getattr(self.config.backbone_config, "num_channels", 3)
        )
        return self.backbone(pixel_values).feature_map

    def probe_log_probs(self, code: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check_fitted()
        return self.cluster_probe.log_probs(code, alpha=self.config.logit_scale), None

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> UnsupervisedSegmenterOutput:
        """Cluster log-probabilities at feature resolution. The baseline has no trainable part: ``loss`` is the
        k-means objective (mean ``1 - cosine`` to the nearest centroid) for reference, ``labels`` are unused."""
        features = self.compute_code(pixel_values)
        logits = self.cluster_probe.log_probs(features, alpha=self.config.logit_scale)
        loss = None
        if self.is_fitted:
            loss = (1.0 - self.cluster_probe.cosine(features).max(1).values).mean()
        return UnsupervisedSegmenterOutput(loss=loss, logits=logits, code=features, features=features)

    @torch.no_grad()
    def fit(
        self,
        batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
        *,
        vectors_per_image: int | None = None,
        num_iterations: int = 100,
        num_init: int = 3,
        seed: int = 0,
        progress: bool = True,
    ) -> KMeansResult:
        """Fit the centroids with cosine k-means over the patch features of ``batches``.

        Args:
            batches: an iterable of ``pixel_values`` tensors ``[B, 3, H, W]`` or of dicts holding them (a
                DataLoader over the image processor's output works as is).
            vectors_per_image: keep at most this many random patch vectors per image (None: all), which bounds
                memory on large datasets.
            num_init: k-means restarts (the lowest inertia wins).
        """
        generator = torch.Generator().manual_seed(seed)
        device = self.cluster_probe.clusters.device
        collected = []
        for batch in tqdm(batches, desc="DINO features", disable=not progress):
            pixel_values = batch["pixel_values"] if isinstance(batch, Mapping) else batch
            features = self.compute_code(pixel_values.to(device))
            vectors = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[1])
            if vectors_per_image is not None and vectors.shape[1] > vectors_per_image:
                keep = torch.stack(
                    [torch.randperm(vectors.shape[1], generator=generator)[:vectors_per_image] for _ in vectors]
                ).to(device)
                vectors = torch.gather(vectors, 1, keep.unsqueeze(-1).expand(-1, -1, vectors.shape[-1]))
            collected.append(vectors.reshape(-1, vectors.shape[-1]).float().cpu())
        if not collected:
            raise ValueError("fit() got no batches: the dataset is empty")
        vectors = torch.cat(collected).to(device)
        if vectors.shape[0] < self.config.num_clusters:
            raise ValueError(
                f"only {vectors.shape[0]} feature vectors for {self.config.num_clusters} clusters: give more images"
            )
        result = kmeans(
            vectors,
            self.config.num_clusters,
            metric="cosine",
            num_iterations=num_iterations,
            num_init=num_init,
            seed=seed,
        )
        self.cluster_probe.clusters.copy_(result.centroids.to(self.cluster_probe.clusters.dtype))
        if getattr(self.config, "is_fitted", None) is not None:
            self.config.is_fitted = True  # a model loaded from an older config.json keeps its flag truthful
        return result

    # ----------------------------------------------------------------------------------------------------------
    # attention baseline
    @torch.no_grad()
    def attention_masks(
        self,
        pixel_values: torch.Tensor,
        threshold: float | None = None,
        output_size: tuple[int, int] | None = None,
        flip_tta: bool = False,
    ) -> DinoAttentionPrediction:
        """Per-head CLS-attention maps and masks (METHODS 4.2), whatever ``config.mode`` says.

        Args:
            pixel_values: ``[B, 3, H, W]``, ``H`` and ``W`` multiples of the patch size.
            threshold: fraction of each head's attention mass kept (default ``config.attention_threshold``).
            output_size: ``(H, W)`` of the returned maps (default: the input size); patches are upsampled with
                nearest-neighbour interpolation.
            flip_tta: average the maps with those of the flipped image (flipped back) before thresholding; off by
                default, as in DINO's figures.

        Example:

        ```python
        >>> out = model.attention_masks(pixel_values, threshold=0.6)   # doctest: +SKIP
        >>> draw_attention_heads(image, out.attention_masks[0])       # doctest: +SKIP
        ```
        """
        threshold = self.config.attention_threshold if threshold is None else float(threshold)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        check_pixel_values(
            pixel_values, self.backbone.patch_size, getattr(self.config.backbone_config, "num_channels", 3)
        )
        maps = self.backbone(pixel_values, output_cls_attention=True).cls_attention
        if flip_tta:
            flipped = self.backbone(pixel_values.flip(-1), output_cls_attention=True).cls_attention
            maps = (maps + flipped.flip(-1)) / 2
        batch, heads, height, width = maps.shape
        masks = attention_mass_mask(maps.reshape(batch, heads, height * width), threshold)
        masks = masks.reshape(batch, heads, height, width)
        size = tuple(output_size) if output_size is not None else tuple(pixel_values.shape[-2:])
        return DinoAttentionPrediction(
            attention_maps=F.interpolate(maps.float(), size=size, mode="nearest"),
            attention_masks=F.interpolate(masks.float(), size=size, mode="nearest").bool(),
        )

    @torch.no_grad()
    def predict(
        self,
        pixel_values: torch.Tensor,
        output_size: tuple[int, int] | None = None,
        flip_tta: bool = True,
        crf: bool = False,
        images: np.ndarray | Sequence[np.ndarray] | None = None,
        crf_workers: int = 0,
        autocast_dtype: str | torch.dtype | None = None,
        crf_backend: str = "pydensecrf",
    ) -> UnsupervisedSegmentationPrediction:
        """``mode="kmeans"``: the shared `predict` (cluster log-probabilities of the fitted centroids).
        ``mode="attention"``: a [`DinoAttentionPrediction`] from [`attention_masks`] with
        ``config.attention_threshold`` (``flip_tta`` averages the maps of the image and its mirror; ``crf`` is not
        available)."""
        if self.config.mode == "kmeans":
            return super().predict(
                pixel_values, output_size, flip_tta, crf, images, crf_workers, autocast_dtype, crf_backend
            )
        if crf:
            raise ValueError("crf=True refines cluster predictions; mode='attention' returns per-head attention masks")
        with backbone_precision(autocast_dtype, pixel_values.device):
            return self.attention_masks(pixel_values, output_size=output_size, flip_tta=flip_tta)
