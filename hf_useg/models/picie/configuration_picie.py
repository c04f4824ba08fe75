"""PiCIE model configuration (METHODS 2)."""

# No `from __future__ import annotations` here: `@strict` validates the field types only when the annotations are
# real types, not strings.

import copy
import dataclasses
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...backbones import check_pos_embed_interpolation

__all__ = ["PicieConfig", "RESNET_18"]

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

# Released training settings (janghyuncho/PiCIE `sh_files/train_picie*.sh` + METHODS 2.4): ResNet-18 (ImageNet),
# 10 epochs, batch 128, views cut from a 640 center crop and fed at 320, clustering batch 256, k-means initialised
# on 20 batches. METHODS 2.4 gives Adam lr 1e-4 for COCO (the released logs) and 1e-3 for Cityscapes.
_PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff27": {"dataset_name": "cocostuff27", "num_clusters": 27, "learning_rate": 1e-4},
    "cityscapes27": {"dataset_name": "cityscapes27", "num_clusters": 27, "learning_rate": 1e-3},
}


@strict
class PicieConfig(PreTrainedConfig):
    r"""
    Configuration of [`PicieForUnsupervisedSegmentation`] (PiCIE, Cho et al., CVPR 2021; METHODS 2). Every field
    has a default: the defaults are the released COCO-Stuff-27 setting (ResNet-18 + FPN, K = 27, Adam 1e-4, 10
    epochs of batch 128 at 320 px) and [`PicieConfig.for_dataset`] gives the Cityscapes one.

    `config.id2label` names the `num_clusters` outputs (`"cluster_0"`, ... until evaluation names them after the
    matched classes); passing an `id2label`/`num_labels` of another length is an error.

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
        kmeans_init_batches (`int`, *optional*, defaults to 20):
            The mini-batch k-means of each epoch starts with k-means on the vectors of the first this many
            clustering batches, then updates online (METHODS 2.3).
        kmeans_iterations (`int`, *optional*, defaults to 20):
            Lloyd iterations of that initial k-means (METHODS 2.3; the released COCO script passes 10, its
            Cityscapes script 20).
        kmeans_init_max_vectors (`int`, *optional*):
            Cap on the vectors kept for the initial k-means (an even random share per batch); `None` keeps every
            pixel of the first batches, as the released code does (about 33M vectors on COCO at batch 256).
        cluster_batch_size (`int`, *optional*, defaults to 256):
            Images per batch of the clustering and labelling passes.
        learning_rate (`float`, *optional*, defaults to 1e-4):
            Adam learning rate (1e-4 COCO, 1e-3 Cityscapes).
        num_epochs (`int`, *optional*, defaults to 10):
            Epochs; `max_steps` = `num_epochs` x batches per epoch unless `max_steps` is set.
        max_steps (`int`, *optional*):
            Training steps (overrides `num_epochs`).
        batch_size (`int`, *optional*, defaults to 128):
            Training batch size.
        resolution (`int`, *optional*, defaults to 320):
            Side of the two views fed to the network.
        base_resolution_factor (`int`, *optional*, defaults to 2):
            The views are cut from a center crop of side `resolution * base_resolution_factor` (bilinear resize of
            the shorter side): PiCIE's res2 = 640 for res1 = 320. View 1 is a random crop of it resized to
            `resolution`; view 2 the whole crop resized to `resolution`.
        eval_resolution (`int`, *optional*, defaults to 320):
            Evaluation resolution (shorter side + center crop), also used by the final re-clustering.
        val_every (`int`, *optional*):
            Validation interval in steps; `None` = once per epoch (as the released code).
        final_recluster (`bool`, *optional*, defaults to `True`):
            After training, re-cluster the training images without augmentation (at `eval_resolution`, center
            crop) and keep those centroids (the paper's final evaluation).
        brightness, contrast, saturation (`float`, *optional*, defaults to 0.3):
            Factors ~ U(max(0, 1 - x), 1 + x), each applied with probability `color_jitter_probability`.
        hue (`float`, *optional*, defaults to 0.1):
            Hue shift ~ U(-x, x) (fraction of the hue circle), applied with probability `color_jitter_probability`.
        color_jitter_probability (`float`, *optional*, defaults to 0.8):
            Probability of each of the four colour changes (independently).
        greyscale_probability (`float`, *optional*, defaults to 0.2):
            Probability of turning the view grey.
        blur_probability (`float`, *optional*, defaults to 0.5):
            Probability of a Gaussian blur.
        blur_radius_min, blur_radius_max (`float`, *optional*, defaults to 0.1 and 2.0):
            Blur standard deviation in pixels of the base crop, ~ U(min, max).
        crop_scale_min, crop_scale_max (`float`, *optional*, defaults to 0.5 and 1.0):
            Side of the geometric crop relative to the image, ~ U(min, max).
        flip_probability (`float`, *optional*, defaults to 0.5):
            Probability of the horizontal flip of the geometric transform.
        released_augmentation (`bool`, *optional*, defaults to `False`):
            Reproduce the released code's augmentation bugs instead of the paper's list (METHODS 2.2): no
            greyscale ever, blur radius |r| with r ~ U(min - (max - min) p / (1 - p), min) (U(-1.8, 0.1) for the
            defaults), and view 1 fed to the network *without* its photometric change in the training pass (the
            clustering passes use it).
        is_fitted (`bool`, *optional*, defaults to `False`):
            Whether the model's centroids were fitted (training sets it); an unfitted model refuses to predict.

    Example:

    ```python
    >>> from hf_useg import PicieConfig
    >>> config = PicieConfig()
    >>> config.backbone_config.model_type, config.backbone_config.out_features, config.fpn_dim
    ('resnet', ['stage1', 'stage2', 'stage3', 'stage4'], 128)
    >>> PicieConfig.for_dataset("cityscapes27").learning_rate
    0.001
    ```
    """

    model_type = "picie"
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
    kmeans_init_batches: int = 20
    kmeans_iterations: int = 20
    kmeans_init_max_vectors: int | None = None
    cluster_batch_size: int = 256

    # Schedule
    learning_rate: float = 1e-4
    num_epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    resolution: int = 320
    base_resolution_factor: int = 2
    eval_resolution: int = 320
    val_every: int | None = None
    final_recluster: bool = True

    # Views (METHODS 2.2)
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.1
    color_jitter_probability: float = 0.8
    greyscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_radius_min: float = 0.1
    blur_radius_max: float = 2.0
    crop_scale_min: float = 0.5
    crop_scale_max: float = 1.0
    flip_probability: float = 0.5
    released_augmentation: bool = False

    is_fitted: bool = False

    def __post_init__(self, **kwargs):
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
        positive = (
            "fpn_dim",
            "kmeans_init_batches",
            "kmeans_iterations",
            "cluster_batch_size",
            "num_epochs",
            "batch_size",
            "resolution",
            "base_resolution_factor",
            "eval_resolution",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "val_every", "kmeans_init_max_vectors"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {self.num_clusters}")
        if self.overclustering and self.num_overclusters < 2:
            raise ValueError(f"num_overclusters must be >= 2, got {self.num_overclusters}")
        if self.kmeans_init_max_vectors is not None and self.kmeans_init_max_vectors < self.num_clusters:
            raise ValueError(
                f"kmeans_init_max_vectors ({self.kmeans_init_max_vectors}) must be at least num_clusters "
                f"({self.num_clusters})"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("brightness", "contrast", "saturation", "blur_radius_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        for name in ("color_jitter_probability", "greyscale_probability", "blur_probability", "flip_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.blur_radius_max < self.blur_radius_min:
            raise ValueError(
                f"blur_radius_max ({self.blur_radius_max}) must be >= blur_radius_min ({self.blur_radius_min})"
            )
        if not 0.0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(
                "crop scales must satisfy 0 < crop_scale_min <= crop_scale_max <= 1, got "
                f"{self.crop_scale_min} and {self.crop_scale_max}"
            )
        if self.released_augmentation and self.blur_probability >= 1.0:
            raise ValueError(
                "released_augmentation draws the blur radius from the blur coin: blur_probability must be < 1"
            )

    @property
    def is_token_backbone(self) -> bool:
        """Whether the backbone yields a single token grid (ViT/DINOv2) rather than multi-scale stages."""
        return getattr(self.backbone_config, "model_type", None) in TOKEN_MODEL_TYPES

    @classmethod
    def for_dataset(cls, name: str, **overrides: Any) -> "PicieConfig":
        """The released PiCIE setting for a benchmark: `"cocostuff27"` or `"cityscapes27"` (METHODS 2.4).

        Example:

        ```python
        >>> from hf_useg import PicieConfig
        >>> config = PicieConfig.for_dataset("cocostuff27", overclustering=True)
        >>> config.learning_rate, config.num_overclusters
        (0.0001, 100)
        ```
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown PiCIE preset {name!r}; available: {', '.join(sorted(_PRESETS))}")
        kwargs = copy.deepcopy(_PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def float_fields(cls) -> tuple[str, ...]:
        """Names of the float fields (a YAML `1` or a command-line `1e-3` string can be turned into floats for
        them before the strict type check)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.type is float)


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
