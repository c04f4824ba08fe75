"""Zero-training DINO segmentation baselines (METHODS 4.2): cosine k-means over frozen DINO patch features."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from ...backbones import FeatureBackbone
from ...clustering import ClusterProbe, KMeansResult, kmeans
from ...modeling_utils import (
    UnsupervisedSegmentationPreTrainedModel,
    UnsupervisedSegmenterOutput,
    check_pixel_values,
)
from .configuration_dino import DinoSegmentationConfig

__all__ = ["DinoForUnsupervisedSegmentation", "DinoPreTrainedModel"]


class DinoPreTrainedModel(UnsupervisedSegmentationPreTrainedModel):
    config_class = DinoSegmentationConfig
    base_model_prefix = "dino"


class DinoForUnsupervisedSegmentation(DinoPreTrainedModel):
    """DINO-feature k-means baseline: a frozen backbone, and ``num_clusters`` cosine centroids fitted with
    [`fit`] on a dataset's patch features. Prediction = nearest centroid (cosine), upsampled.

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
    ```
    """

    def __init__(self, config: DinoSegmentationConfig):
        super().__init__(config)
        self.backbone = FeatureBackbone(
            config.backbone_config, pos_embed_interpolation=config.pos_embed_interpolation, frozen=True
        )
        self.cluster_probe = ClusterProbe(self.backbone.hidden_size, config.num_clusters)
        self.cluster_probe.clusters.requires_grad_(False)
        self.post_init()

    def _check_fitted(self) -> None:
        if not self.config.is_fitted:
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
        if self.config.is_fitted:
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
        self.config.is_fitted = True
        return result
