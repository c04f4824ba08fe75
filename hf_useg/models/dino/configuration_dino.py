"""Configuration of the zero-training DINO segmentation baselines (METHODS 4.2)."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...configuration_utils import check_pos_embed_interpolation, dino_vit_kwargs

# DINO v1 ViT-S/8 (facebook/dino-vits8); LayerNorm eps 1e-6 reproduces DINO's features (METHODS 0.1).
DINO_VIT_SMALL_8 = dino_vit_kwargs("vit_small", 8)

_MODES = ("kmeans", "attention")


@strict
class DinoSegmentationConfig(PreTrainedConfig):
    r"""
    Configuration of [`DinoForUnsupervisedSegmentation`], the zero-training baselines of METHODS 4.2 on a frozen
    DINO backbone: cosine k-means over the patch features (``mode="kmeans"``), or per-head masks from the last
    layer's CLS attention (``mode="attention"``).

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the backbone (a `ViTConfig` for DINO v1, a `Dinov2Config`, or any `AutoBackbone` config).
            Defaults to DINO ViT-S/8.
        pos_embed_interpolation (`str`, *optional*, defaults to `"auto"`):
            `"dino"` (DINO's own formula, the default for ViT), `"transformers"` or `"auto"`.
        num_clusters (`int`, *optional*, defaults to 27):
            Number of k-means clusters (K = number of classes in the protocol).
        logit_scale (`float`, *optional*, defaults to 2.0):
            Cluster log-probabilities are ``log_softmax(logit_scale * cosine)``; the argmax is the nearest centroid
            whatever the scale.
        mode (`str`, *optional*, defaults to `"kmeans"`):
            Which baseline ``predict`` runs: `"kmeans"` (cluster log-probabilities, needs `fit`) or `"attention"`
            (per-head ``attention_maps`` / ``attention_masks``, no fitting).
        attention_threshold (`float`, *optional*, defaults to 0.6):
            Fraction of a head's CLS-attention mass kept by its mask (the largest weights until their sum reaches
            it).

    Whether the centroids are fitted is model state (the model's `is_fitted` buffer, set by `fit` and saved with
    the weights), not a config field; an older `config.json` with `"is_fitted": true` still loads as fitted.

    Example:

    ```python
    >>> from hf_useg import DinoSegmentationConfig, DinoForUnsupervisedSegmentation
    >>> config = DinoSegmentationConfig(num_clusters=11)
    >>> model = DinoForUnsupervisedSegmentation(config)
    ```
    """

    model_type = "dino_segmentation"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", init_kwargs=DINO_VIT_SMALL_8),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    pos_embed_interpolation: str = "auto"
    num_clusters: int = 27
    logit_scale: float = 2.0
    mode: str = "kmeans"
    attention_threshold: float = 0.6
    backbone_name: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {self.num_clusters}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if not 0.0 < self.attention_threshold <= 1.0:
            raise ValueError(f"attention_threshold must be in (0, 1], got {self.attention_threshold}")
        check_pos_embed_interpolation(self.pos_embed_interpolation)
        if len(self.id2label) != self.num_clusters:
            self.id2label = {i: f"cluster_{i}" for i in range(self.num_clusters)}
            self.label2id = {name: i for i, name in self.id2label.items()}


__all__ = ["DinoSegmentationConfig"]
