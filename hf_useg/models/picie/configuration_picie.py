"""PiCIE model configuration (METHODS 2)."""

# No `from __future__ import annotations` here: `@strict` validates the field types only when the annotations are
# real types, not strings.

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...configuration_utils import DatasetPresetsMixin, check_pos_embed_interpolation, drop_legacy_training_fields

__all__ = ["LEGACY_TRAINING_FIELDS", "PicieConfig", "RESNET_18"]

# ResNet-18 as a transformers `ResNetConfig` (same layers as torchvision's resnet18, which PiCIE uses), with the
# four residual stages as outputs for the FPN.
RESNET_18 = {
    "embedding_size": 64,
    "hidden_sizes": [64, 128, 256, 512],
    "depths": [2, 2, 2, 2],
    "layer_type": "basic",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}

_CLUSTER_WEIGHTINGS = ("frequency", "balanced")
# backbones that yield one token grid (a single feature map): the "FPN" is then a single 1x1 projection
TOKEN_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit")

# The released models (janghyuncho/PiCIE, METHODS 2.4): ResNet-18 + FPN, K = 27. Their training settings are the
# recipe's presets of the same names (`training_picie.PicieTrainingOptions.presets`).
_PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff27": {"dataset_name": "cocostuff27", "num_clusters": 27},
    "cityscapes27": {"dataset_name": "cityscapes27", "num_clusters": 27},
}

# Keys of configs written before the training recipe existed: now `PicieTrainingOptions` fields (and `is_fitted`,
# now derived from the model's centroids). Dropped when such a config.json loads.
LEGACY_TRAINING_FIELDS = (
    "kmeans_init_batches",
    "kmeans_iterations",
    "kmeans_init_max_vectors",
    "cluster_batch_size",
    "learning_rate",
    "num_epochs",
    "max_steps",
    "batch_size",
    "resolution",
    "base_resolution_factor",
    "eval_resolution",
    "val_every",
    "final_recluster",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "color_jitter_probability",
    "greyscale_probability",
    "blur_probability",
    "blur_radius_min",
    "blur_radius_max",
    "crop_scale_min",
    "crop_scale_max",
    "flip_probability",
    "released_augmentation",
    "is_fitted",
)


@strict
class PicieConfig(DatasetPresetsMixin, PreTrainedConfig):
    r"""
    Configuration of [`PicieForUnsupervisedSegmentation`] (PiCIE, Cho et al., CVPR 2021; METHODS 2): the
    architecture (backbone + FPN), the number of clusters and how the loss weights them. Every field has a default:
    the defaults are the released COCO-Stuff-27 model (ResNet-18 + FPN, K = 27) and [`PicieConfig.for_dataset`]
    gives the Cityscapes one. The training settings (Adam learning rate, epochs, views, the k-means schedule) are
    the recipe's: `hf_useg.models.picie.training_picie.PicieTrainingOptions`.

    `config.id2label` names the `num_clusters` outputs (`"cluster_0"`, ... until evaluation names them after the
    matched classes); passing an `id2label`/`num_labels` of another length is an error. Whether the centroids are
    fitted is the model's state (`PicieForUnsupervisedSegmentation.is_fitted`), not a config field; configs written
    by earlier releases (with `is_fitted` and the training settings) still load, those keys being dropped.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            The feature extractor. Defaults to ResNet-18 (`ResNetConfig`, see `RESNET_18`); a dict without
            `model_type` is read as overrides of it. Any `AutoBackbone` config works: the FPN runs over the stages
            named in its `out_features` when they are two or more, otherwise over every stage after the stem (a
            config loaded for a single stage is widened). A ViT/DINOv2 config gives a single feature map; the FPN
            is then one 1x1 projection (lateral conv with bias) of that map.
        pos_embed_interpolation (`str`, *optional*, defaults to `"auto"`):
            Position-embedding resizing of ViT backbones (`"dino"`, `"transformers"`, or `"auto"`, see
            `hf_useg.backbones.FeatureBackbone`); unused by convolutional backbones.
        backbone_name (`str`, *optional*, defaults to `"microsoft/resnet-18"`):
            Hub id of the backbone weights the model was trained from (informational).
        dataset_name (`str`, *optional*, defaults to `"cocostuff27"`):
            Training dataset (informational).
        freeze_backbone (`bool`, *optional*, defaults to `False`):
            PiCIE trains the whole network. `True` trains the FPN only (e.g. on a frozen DINO ViT).
        fpn_dim (`int`, *optional*, defaults to 128):
            Channels of the FPN output (the embedding that is clustered).
        num_clusters (`int`, *optional*, defaults to 27):
            K: clusters of the main clustering, and outputs of the model.
        overclustering (`bool`, *optional*, defaults to `False`):
            The paper's "+H" (METHODS 2.5): an auxiliary clustering with `num_overclusters` clusters, losses
            weighted log K2 / (log K1 + log K2) and log K1 / (log K1 + log K2). Paper only, not in the released code.
        num_overclusters (`int`, *optional*, defaults to 100):
            K2 of "+H".
        cluster_weighting (`str`, *optional*, defaults to `"frequency"`):
            Cross-entropy class weights from each view's cluster sizes: `"frequency"` (w_k = n_k / N, what the
            released code does; it up-weights large clusters) or `"balanced"` (inverse frequency, the paper's
            stated intent). See `picie_cluster_weights`.

    Example:

    ```python
    >>> from hf_useg import PicieConfig
    >>> config = PicieConfig()
    >>> config.backbone_config.model_type, config.backbone_config.out_features, config.fpn_dim
    ('resnet', ['stage1', 'stage2', 'stage3', 'stage4'], 128)
    >>> PicieConfig.for_dataset("cityscapes27").dataset_name
    'cityscapes27'
    ```
    """

    model_type = "picie"
    dataset_presets = _PRESETS
    preset_family = "PiCIE"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet", init_kwargs=RESNET_18),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    pos_embed_interpolation: str = "auto"
    backbone_name: str | None = "microsoft/resnet-18"
    dataset_name: str | None = "cocostuff27"
    freeze_backbone: bool = False

    # Model and clustering
    fpn_dim: int = 128
    num_clusters: int = 27
    overclustering: bool = False
    num_overclusters: int = 100
    cluster_weighting: str = "frequency"

    def __post_init__(self, **kwargs):
        drop_legacy_training_fields(kwargs, LEGACY_TRAINING_FIELDS)
        if isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
            self.backbone_config = {"model_type": "resnet", **RESNET_18, **self.backbone_config}
        num_labels = kwargs.pop("num_labels", None)
        if num_labels is not None and num_labels != self.num_clusters:
            raise ValueError(
                f"num_labels ({num_labels}) must equal num_clusters ({self.num_clusters}); set num_clusters instead"
            )
        if self.id2label is None:
            self.id2label = {i: f"cluster_{i}" for i in range(self.num_clusters)}
        elif len(self.id2label) != self.num_clusters:
            raise ValueError(
                f"id2label has {len(self.id2label)} entries but the model has num_clusters = {self.num_clusters} "
                "outputs"
            )
        super().__post_init__(**kwargs)
        self.backbone_config = _with_fpn_stages(self.backbone_config)
        if self.label2id is None:
            self.label2id = {name: i for i, name in self.id2label.items()}
        self._check_values()

    def _check_values(self) -> None:
        check_pos_embed_interpolation(self.pos_embed_interpolation)
        if self.cluster_weighting not in _CLUSTER_WEIGHTINGS:
            raise ValueError(f"cluster_weighting must be one of {_CLUSTER_WEIGHTINGS}, got {self.cluster_weighting!r}")
        if self.fpn_dim < 1:
            raise ValueError(f"fpn_dim must be >= 1, got {self.fpn_dim}")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.overclustering and self.num_overclusters < 2:
            raise ValueError(f"num_overclusters must be >= 2, got {self.num_overclusters}")

    @property
    def is_token_backbone(self) -> bool:
        """Whether the backbone yields a single token grid (ViT/DINOv2) rather than multi-scale stages."""
        return getattr(self.backbone_config, "model_type", None) in TOKEN_MODEL_TYPES


def _with_fpn_stages(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of an `AutoBackbone` config whose `out_features` name every stage after the stem when the given one
    names fewer than two (e.g. a config loaded by `FeatureBackbone` for its last stage only)."""
    if getattr(config, "model_type", None) in TOKEN_MODEL_TYPES:
        return config
    stage_names = list(getattr(config, "stage_names", None) or [])
    if not stage_names:
        raise ValueError(
            f"backbone_config {type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}) is "
            "neither a ViT/DINOv2 config nor an AutoBackbone config with stage_names"
        )
    if len(list(getattr(config, "out_features", None) or [])) >= 2:
        return config
    stages = stage_names[1:] if len(stage_names) > 1 else stage_names
    config = copy.deepcopy(config)
    config.out_indices = None
    config.out_features = stages
    return config
