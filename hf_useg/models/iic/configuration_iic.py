"""IIC model configuration (Ji et al., ICCV 2019; METHODS 3)."""

# No `from __future__ import annotations` here: `@strict` checks field types only when the annotations are real
# types, not strings.

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...configuration_utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetPresetsMixin,
    check_pos_embed_interpolation,
    dino_vit_kwargs,
    drop_legacy_training_fields,
)

__all__ = ["IicConfig"]

# DINO v1 ViT-S/8: the default when `trunk="backbone"` is asked for without a `backbone_config`.
DINO_VIT_SMALL_8 = dino_vit_kwargs("vit_small", 8)

# The paper's segmentation trunk (IIC "SegmentationNet10a"): 3x3 convs (BN + ReLU), a 2x2 max-pool after the
# second conv, the last two convs dilated by 2.
VGG_CHANNELS = [64, 128, 256, 256, 512, 512]
VGG_DILATIONS = [1, 1, 1, 1, 2, 2]

TRUNKS = ("vgg", "backbone")
INPUT_MODES = ("rgb", "sobel", "rgb_sobel")

# The architecture of the released runs (xu-ji/IIC examples/commands.txt, models 555 and 545; their training
# settings are the IIC recipe's presets of the same names). Potsdam-3 there is RGB+IR without Sobel; the Potsdam-3
# data written by `hf_useg.data.convert_potsdam3` is RGB, hence `input_mode="rgb"`.
_PRESETS: dict[str, dict[str, Any]] = {
    "cocostuff3": {
        "dataset_name": "cocostuff3",
        "num_classes": 3,
        "num_overclusters": 15,
        "lamb_a": 1.0,
        "lamb_b": 1.5,
        "input_mode": "rgb_sobel",
        "displacement": 10,
    },
    "potsdam3": {
        "dataset_name": "potsdam3",
        "num_classes": 3,
        "num_overclusters": 24,
        "lamb_a": 1.0,
        "lamb_b": 1.5,
        "input_mode": "rgb",
        "displacement": 10,
    },
}

# Training settings that configs written before the training recipe carried (now `IicTrainingOptions`).
_TRAINING_FIELDS = (
    "learning_rate",
    "resolution",
    "eval_resolution",
    "max_steps",
    "batch_size",
    "val_every",
    "jitter_brightness",
    "jitter_contrast",
    "jitter_saturation",
    "jitter_hue",
    "flip_p",
    "mask_unlabelled",
    "head_a_first",
    "head_a_steps",
    "head_b_steps",
)

_POSITIVE_INT_FIELDS = ("vgg_pool_after", "num_classes", "num_overclusters", "num_sub_heads")


@strict
class IicConfig(DatasetPresetsMixin, PreTrainedConfig):
    r"""
    Configuration of [`IicForUnsupervisedSegmentation`]: two IIC heads on a shared trunk (METHODS 3.2).

    Head B has `num_classes` outputs (K, the number of ground-truth classes; evaluated with Hungarian matching);
    head A overclusters into `num_overclusters` outputs (evaluated with majority matching). Both are trained with
    the IIC loss, which is **minus a mutual information and therefore negative** (see
    [`~hf_useg.models.iic.iic_segmentation_loss`]).

    The trunk is either the paper's VGG-like network trained from scratch (`trunk="vgg"`, the default when no
    `backbone_config` is given) or the feature map of a Hugging Face backbone (`trunk="backbone"`, the default
    when a `backbone_config` is given), frozen or fine-tuned.

    `config.id2label` names head B's `num_classes` outputs (`"cluster_0"`, ... until evaluation renames them);
    `config.num_labels` is therefore `num_classes`.

    Args:
        trunk (`str`, *optional*):
            `"vgg"` or `"backbone"`; `None` picks `"backbone"` when `backbone_config` is set, else `"vgg"`.
        input_mode (`str`, *optional*, defaults to `"rgb_sobel"`):
            Input of the VGG trunk. `pixel_values` are always the image processor's normalised RGB; the model
            derives from them: `"rgb"` (the 3 normalised channels as they are), `"sobel"` (2 channels) or
            `"rgb_sobel"` (5 channels: the 3 normalised RGB channels, then Sobel x, then Sobel y). Sobel channels
            (as in IIC): un-normalise with `image_mean`/`image_std` to [0, 1], greyscale
            `0.299 R + 0.587 G + 0.114 B`, then cross-correlate (zero padding 1) with
            `[[1, 0, -1], [2, 0, -2], [1, 0, -1]]` (x: left minus right) and `[[1, 2, 1], [0, 0, 0], [-1, -2, -1]]`
            (y: top minus bottom). Ignored by `trunk="backbone"` (the backbone takes RGB).
        vgg_channels (`list[int]`, *optional*):
            Output channels of the VGG trunk's 3x3 convs; defaults to the paper's `[64, 128, 256, 256, 512, 512]`.
        vgg_dilations (`list[int]`, *optional*):
            Dilation of each conv (padding = dilation); defaults to the paper's `[1, 1, 1, 1, 2, 2]`.
        vgg_pool_after (`int`, *optional*, defaults to 2):
            A 2x2 max-pool (stride 2) follows this many convs; the trunk's stride is 2.
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the HF backbone for `trunk="backbone"` (DINO ViT-S/8 when that trunk is asked for without
            one). Must be `None` for `trunk="vgg"`.
        pos_embed_interpolation (`str`, *optional*, defaults to `"auto"`):
            `"dino"`, `"transformers"` or `"auto"` (see [`~hf_useg.backbones.FeatureBackbone`]).
        freeze_backbone (`bool`, *optional*, defaults to `True`):
            Keep the HF backbone frozen (no gradients, eval mode); `False` fine-tunes it with the heads.
        projection_dim (`int`, *optional*):
            A 1x1 conv + BatchNorm + ReLU from the trunk's channels to this many before the heads (a small
            trainable adaptor, useful on a frozen backbone). `None`: the heads sit on the trunk's features.
        backbone_name (`str`, *optional*):
            Where the trunk's weights came from (informational, for model cards).
        dataset_name (`str`, *optional*):
            Training dataset (informational).
        num_classes (`int`, *optional*, defaults to 3):
            Outputs of head B (K).
        num_overclusters (`int`, *optional*, defaults to 15):
            Outputs of head A (the paper overclusters by 3x-8x: 15 for COCO-Stuff-3, 24 for Potsdam-3, 45 for
            COCO-Stuff-15).
        num_sub_heads (`int`, *optional*, defaults to 1):
            Independent 1x1-conv sub-heads per head (IIC's segmentation runs use 1); the loss averages them.
        eval_sub_head (`int`, *optional*, defaults to 0):
            The sub-head `predict` and `logits` use.
        displacement (`int`, *optional*, defaults to 10):
            Half side T of the dense displacement window of the loss.
        lamb_a, lamb_b (`float`, *optional*, default to 1.0):
            λ of the loss for head A and head B: 1.0 is plain −MI; the paper uses 1.5 for head B on the 3-class
            datasets (the `cocostuff3`/`potsdam3` presets).
        uncollapsed (`bool`, *optional*, defaults to `True`):
            Per-displacement MI (all paper results) or MI of the displacement-summed joint (the code's default).
        loss_at_input_resolution (`bool`, *optional*, defaults to `True`):
            As IIC: the heads' softmax outputs are bilinearly upsampled to the input size before the loss (so T is
            in input pixels). `False` computes the loss at feature resolution (much cheaper on patch-8/16 ViTs).
        image_mean, image_std (`list[float]`, *optional*):
            Normalisation of `pixel_values` (ImageNet's by default, what the image processor uses); needed to
            un-normalise for Sobel (and for the training recipe's colour jitter).

    The training settings (learning rate, batch size, resolutions, steps, the views' colour jitter and flip,
    `mask_unlabelled`, the head alternation) are the IIC recipe's options
    ([`~hf_useg.models.iic.training_iic.IicTrainingOptions`]); a `config.json` written by an earlier release
    that still holds them loads, and they are dropped.

    Example:

    ```python
    >>> from hf_useg import IicConfig
    >>> config = IicConfig()                                   # paper VGG trunk, RGB + Sobel input
    >>> config.trunk, config.vgg_channels, config.num_labels
    ('vgg', [64, 128, 256, 256, 512, 512], 3)
    >>> IicConfig.for_dataset("potsdam3").num_overclusters
    24
    >>> from transformers import ViTConfig
    >>> IicConfig(backbone_config=ViTConfig(patch_size=8), num_classes=11, num_overclusters=33).trunk
    'backbone'
    ```
    """

    model_type = "iic"
    dataset_presets = _PRESETS
    preset_family = "IIC"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="vit", init_kwargs=DINO_VIT_SMALL_8, optional=True
        ),
    }

    # Trunk
    trunk: str | None = None
    input_mode: str = "rgb_sobel"
    vgg_channels: list[int] | None = None
    vgg_dilations: list[int] | None = None
    vgg_pool_after: int = 2
    backbone_config: dict | PreTrainedConfig | None = None
    pos_embed_interpolation: str = "auto"
    freeze_backbone: bool = True
    projection_dim: int | None = None
    backbone_name: str | None = None
    dataset_name: str | None = None

    # Heads and loss
    num_classes: int = 3
    num_overclusters: int = 15
    num_sub_heads: int = 1
    eval_sub_head: int = 0
    displacement: int = 10
    lamb_a: float | int = 1.0
    lamb_b: float | int = 1.0
    uncollapsed: bool = True
    loss_at_input_resolution: bool = True

    # Normalisation of pixel_values
    image_mean: list[float | int] | None = None
    image_std: list[float | int] | None = None

    def __post_init__(self, **kwargs):
        drop_legacy_training_fields(kwargs, _TRAINING_FIELDS)
        if self.trunk is None:
            self.trunk = "backbone" if self.backbone_config is not None else "vgg"
        if self.trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {self.trunk!r}")
        if self.trunk == "vgg" and self.backbone_config is not None:
            raise ValueError(
                "trunk='vgg' is the paper's network trained from scratch and takes no backbone_config; "
                "use trunk='backbone' to put the IIC heads on an HF backbone"
            )
        if self.trunk == "backbone":
            if self.backbone_config is None:
                self.backbone_config = {"model_type": "vit", **DINO_VIT_SMALL_8}
            elif isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
                self.backbone_config = {"model_type": "vit", **DINO_VIT_SMALL_8, **self.backbone_config}
        if self.vgg_channels is None:
            self.vgg_channels = list(VGG_CHANNELS)
        if self.vgg_dilations is None:
            self.vgg_dilations = list(VGG_DILATIONS)
        if self.image_mean is None:
            self.image_mean = list(IMAGENET_MEAN)
        if self.image_std is None:
            self.image_std = list(IMAGENET_STD)
        self._check_values()

        num_labels = kwargs.pop("num_labels", None)
        if num_labels is not None and num_labels != self.num_classes:
            raise ValueError(
                f"num_labels ({num_labels}) must equal num_classes ({self.num_classes}), the outputs of head B; "
                "set num_classes instead"
            )
        if self.id2label is None:
            self.id2label = {i: f"cluster_{i}" for i in range(self.num_classes)}
        elif len(self.id2label) != self.num_classes:
            raise ValueError(
                f"id2label has {len(self.id2label)} entries but head B has num_classes = {self.num_classes} outputs"
            )
        super().__post_init__(**kwargs)
        if self.label2id is None:
            self.label2id = {name: i for i, name in self.id2label.items()}

    def _check_values(self) -> None:
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        check_pos_embed_interpolation(self.pos_embed_interpolation)
        for name in _POSITIVE_INT_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.vgg_channels or any(c < 1 for c in self.vgg_channels):
            raise ValueError(f"vgg_channels must be a non-empty list of positive ints, got {self.vgg_channels}")
        if len(self.vgg_dilations) != len(self.vgg_channels) or any(d < 1 for d in self.vgg_dilations):
            raise ValueError(
                f"vgg_dilations must hold one positive dilation per conv ({len(self.vgg_channels)}), "
                f"got {self.vgg_dilations}"
            )
        if self.vgg_pool_after > len(self.vgg_channels):
            raise ValueError(
                f"vgg_pool_after ({self.vgg_pool_after}) must be <= the number of convs ({len(self.vgg_channels)})"
            )
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {self.projection_dim}")
        if not 0 <= self.eval_sub_head < self.num_sub_heads:
            raise ValueError(
                f"eval_sub_head must be in [0, num_sub_heads={self.num_sub_heads}), got {self.eval_sub_head}"
            )
        if self.displacement < 0:
            raise ValueError(f"displacement must be >= 0, got {self.displacement}")
        for name in ("lamb_a", "lamb_b"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 entries (RGB), got {getattr(self, name)}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
