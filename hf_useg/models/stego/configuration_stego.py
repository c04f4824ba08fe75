"""STEGO model configuration (METHODS 1)."""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...configuration_utils import (
    DatasetPresetsMixin,
    check_pos_embed_interpolation,
    dino_vit_kwargs,
    drop_legacy_training_fields,
)

__all__ = ["StegoConfig"]

# DINO v1 backbones (facebook/dino-vitb8, facebook/dino-vits8). LayerNorm eps 1e-6 reproduces DINO's features
# bit-exactly (METHODS 0.1); transformers' ViT default of 1e-12 does not.
DINO_VIT_BASE_8 = dino_vit_kwargs("vit_base", 8)
DINO_VIT_SMALL_8 = dino_vit_kwargs("vit_small", 8)

_PROJECTION_TYPES = ("nonlinear", "linear")

# The released checkpoints' training configs (METHODS 1.2 table). Weights and shifts are kept at the full
# precision of STEGO's (hyper-parameter-searched) configs.
_PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff27": {
        "backbone_config": {"model_type": "vit", **DINO_VIT_BASE_8},
        "backbone_name": "facebook/dino-vitb8",
        "dataset_name": "cocostuff27",
        "num_classes": 27,
        "dim": 90,
        "pointwise": True,
        "neg_inter_weight": 0.1538476246415498,
        "pos_inter_weight": 1.0,
        "pos_intra_weight": 0.1,
        "neg_inter_shift": 1.0,
        "pos_inter_shift": 0.2,
        "pos_intra_shift": 0.12,
    },
    "cityscapes27": {
        "backbone_config": {"model_type": "vit", **DINO_VIT_BASE_8},
        "backbone_name": "facebook/dino-vitb8",
        "dataset_name": "cityscapes27",
        "num_classes": 27,
        "dim": 100,
        "pointwise": False,
        "neg_inter_weight": 0.9058762625226623,
        "pos_inter_weight": 0.577453483136995,
        "pos_intra_weight": 1.0,
        "neg_inter_shift": 0.31361241889448443,
        "pos_inter_shift": 0.1754346515479633,
        "pos_intra_shift": 0.45828472207,
    },
    "potsdam3": {
        "backbone_config": {"model_type": "vit", **DINO_VIT_SMALL_8},
        "backbone_name": "facebook/dino-vits8",
        "dataset_name": "potsdam3",
        "num_classes": 3,
        "dim": 70,
        "pointwise": True,
        "neg_inter_weight": 0.63,
        "pos_inter_weight": 0.25,
        "pos_intra_weight": 0.67,
        "neg_inter_shift": 0.76,
        "pos_inter_shift": 0.02,
        "pos_intra_shift": 0.08,
    },
}

# Training settings that configs written before the recipes carried; they live in
# `hf_useg.models.stego.training_stego.StegoTrainingOptions` now.
LEGACY_TRAINING_FIELDS = (
    "num_neighbors",
    "five_crop",
    "crop_ratio",
    "resolution",
    "eval_resolution",
    "head_learning_rate",
    "probe_learning_rate",
    "max_steps",
    "batch_size",
    "val_every",
)


@strict
class StegoConfig(DatasetPresetsMixin, PreTrainedConfig):
    r"""
    Configuration of [`StegoForUnsupervisedSegmentation`] and of [`StegoCorrelationLoss`]. Every field has a
    default: the defaults are the released COCO-Stuff-27 model (DINO ViT-B/8, METHODS 1.2), and
    [`StegoConfig.for_dataset`] gives the other released settings.

    `config.id2label` names the `num_clusters` cluster-probe outputs (`"cluster_0"`, ... by default; replace
    the names with matched class names after evaluation). `config.num_labels` is therefore `num_clusters`,
    which is what the `image-segmentation` pipeline reads from `logits`. Passing an `id2label` (or
    `num_labels`) of another length is an error.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the frozen backbone. Defaults to DINO ViT-B/8 (`ViTConfig` with `layer_norm_eps=1e-6`).
            A dict without `model_type` is read as overrides of that default ViT-B/8 config.
        pos_embed_interpolation (`str`, *optional*, defaults to `"auto"`):
            How position embeddings are resized for inputs other than the backbone's image size: `"dino"`
            (DINO's formula, METHODS 0.1), `"transformers"` or `"auto"` (DINO's formula for ViT backbones).
        backbone_name (`str`, *optional*, defaults to `"facebook/dino-vitb8"`):
            Hub id of the backbone weights the model was trained from (informational, for model cards).
        dataset_name (`str`, *optional*, defaults to `"cocostuff27"`):
            Name of the training dataset (informational).
        dim (`int`, *optional*, defaults to 90):
            Channels D of the segmentation code.
        num_classes (`int`, *optional*, defaults to 27):
            Classes of the dataset: outputs of the linear probe.
        extra_clusters (`int`, *optional*, defaults to 0):
            Clusters of the cluster probe beyond `num_classes`.
        projection_type (`str`, *optional*, defaults to `"nonlinear"`):
            `"nonlinear"`: code = linear 1x1 conv + (1x1 conv, ReLU, 1x1 conv); `"linear"`: the linear part
            only.
        dropout (`float`, *optional*, defaults to 0.1):
            `Dropout2d` probability on the backbone features in training.
        correspondence_weight (`float`, *optional*, defaults to 1.0):
            Factor on the whole correlation loss.
        pos_intra_weight, pos_inter_weight, neg_inter_weight (`float`, *optional*):
            Weights of the self, kNN and random pair terms (defaults 0.1, 1.0, 0.1538476246415498).
        pos_intra_shift, pos_inter_shift, neg_inter_shift (`float`, *optional*):
            Shifts b subtracted from the feature correlations of the three terms (defaults 0.12, 0.2, 1.0).
        pointwise (`bool`, *optional*, defaults to `True`):
            Center each feature correlation row over the partner's positions, keeping the global mean.
        zero_clamp (`bool`, *optional*, defaults to `True`):
            Clamp the code correlation at 0 from below (else at -9999).
        stabilize (`bool`, *optional*, defaults to `False`):
            Clamp the code correlation at 0.8 from above. STEGO's configs spell it `stabalize`; that key is
            accepted too.
        feature_samples (`int`, *optional*, defaults to 11):
            S: each image is sampled at S x S random points.
        neg_samples (`int`, *optional*, defaults to 5):
            Random (negative) pairings drawn per step.

    Training settings (learning rates, steps, batch size, five-crop, kNN partners) are the recipe's:
    `hf_useg.models.stego.training_stego.StegoTrainingOptions` and `training/configs/stego_*.yaml`. Keys of
    those settings in an older `config.json` are ignored.

    Example:

    ```python
    >>> from hf_useg import StegoConfig
    >>> config = StegoConfig()                                 # COCO-Stuff-27 release, DINO ViT-B/8
    >>> config.backbone_config.hidden_size, config.dim, config.num_clusters
    (768, 90, 27)
    >>> StegoConfig.for_dataset("potsdam3").backbone_config.hidden_size
    384
    >>> StegoConfig(stabalize=True).stabilize                  # STEGO's spelling is accepted
    True
    ```
    """

    model_type = "stego"
    dataset_presets = _PRESETS
    preset_family = "STEGO"
    accepted_aliases = ("stabalize",)  # STEGO's own spelling of `stabilize`
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", init_kwargs=DINO_VIT_BASE_8),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    pos_embed_interpolation: str = "auto"
    backbone_name: str | None = "facebook/dino-vitb8"
    dataset_name: str | None = "cocostuff27"

    # Model
    dim: int = 90
    num_classes: int = 27
    extra_clusters: int = 0
    projection_type: str = "nonlinear"
    dropout: float | int = 0.1

    # Correlation loss
    correspondence_weight: float | int = 1.0
    pos_intra_weight: float | int = 0.1
    pos_inter_weight: float | int = 1.0
    neg_inter_weight: float | int = 0.1538476246415498
    pos_intra_shift: float | int = 0.12
    pos_inter_shift: float | int = 0.2
    neg_inter_shift: float | int = 1.0
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False
    feature_samples: int = 11
    neg_samples: int = 5

    def __post_init__(self, **kwargs):
        if "stabalize" in kwargs:
            self.stabilize = kwargs.pop("stabalize")
        if isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
            # Overrides of the default DINO ViT-B/8 (so a partial dict keeps DINO's LayerNorm eps, not ViT's).
            self.backbone_config = {"model_type": "vit", **DINO_VIT_BASE_8, **self.backbone_config}
        drop_legacy_training_fields(kwargs, LEGACY_TRAINING_FIELDS)
        self._check_values()

        num_clusters = self.num_clusters
        num_labels = kwargs.pop("num_labels", None)
        if num_labels is not None and num_labels != num_clusters:
            raise ValueError(
                f"num_labels ({num_labels}) must equal num_clusters = num_classes + extra_clusters "
                f"({self.num_classes} + {self.extra_clusters} = {num_clusters}); "
                "set num_classes/extra_clusters instead"
            )
        if self.id2label is None:
            self.id2label = {i: f"cluster_{i}" for i in range(num_clusters)}
        elif len(self.id2label) != num_clusters:
            raise ValueError(
                f"id2label has {len(self.id2label)} entries but the model has num_clusters = {num_clusters} "
                "cluster-probe outputs (num_classes + extra_clusters)"
            )
        super().__post_init__(**kwargs)
        if self.label2id is None:
            self.label2id = {name: i for i, name in self.id2label.items()}

    def _check_values(self) -> None:
        if self.projection_type not in _PROJECTION_TYPES:
            raise ValueError(f"projection_type must be one of {_PROJECTION_TYPES}, got {self.projection_type!r}")
        check_pos_embed_interpolation(self.pos_embed_interpolation)
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0, got {self.dim}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.extra_clusters < 0:
            raise ValueError(f"extra_clusters must be >= 0, got {self.extra_clusters}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("feature_samples", "neg_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_clusters(self) -> int:
        """Outputs of the cluster probe: `num_classes + extra_clusters`."""
        return self.num_classes + self.extra_clusters
