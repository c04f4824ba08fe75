"""Configuration of DINO self-distillation pretraining (METHODS 4.1)."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...configuration_utils import dino_vit_kwargs, drop_legacy_training_fields

# DINO v1 ViT-S/16 (facebook/dino-vits16): the architecture of DINO's reference 100-epoch run.
DINO_VIT_SMALL_16 = dino_vit_kwargs("vit_small", 16)

# Training settings that configs written before the recipes existed carried: they are now
# `hf_useg.models.dino.training_dino_pretraining.DinoPretrainingTrainingOptions` fields.
LEGACY_TRAINING_FIELDS = (
    "global_crops_scale",
    "global_crops_size",
    "local_crops_scale",
    "local_crops_size",
    "warmup_teacher_temp",
    "warmup_teacher_temp_epochs",
    "momentum_teacher",
    "learning_rate",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "weight_decay_end",
    "clip_grad",
    "freeze_last_layer_epochs",
    "max_steps",
    "batch_size",
)


CENTER_INITS = ("zeros", "first_batch")


@strict
class DinoPretrainingConfig(PreTrainedConfig):
    r"""
    Configuration of [`DinoForSelfSupervisedPretraining`]: DINO self-distillation (METHODS 4.1) of a ViT on
    unlabelled images. Defaults are DINO's ViT-S/16 model (``main_dino.py``): out_dim 65536, 2 global views and 8
    local views, teacher temperature 0.04, student 0.1, center momentum 0.9.

    The training settings (crop sizes and scales, learning rate, weight decay and EMA schedules, teacher temperature
    warm-up, clipping, steps, batch size) are the recipe's:
    `hf_useg.models.dino.training_dino_pretraining.DinoPretrainingTrainingOptions`. Keys of those settings in an
    older ``config.json`` are ignored.

    Args:
        backbone_config (`dict` or `ViTConfig`, *optional*):
            The student/teacher ViT (``model_type="vit"``: the teacher is exported as a plain `ViTModel`).
            Defaults to DINO ViT-S/16.
        backbone_name (`str`, *optional*):
            Where the student's initial weights came from (set by the training loop).
        out_dim (`int`, *optional*, defaults to 65536):
            Number of prototypes of the head's last layer (dimension of the distributions compared by the loss).
        head_hidden_dim (`int`, *optional*, defaults to 2048):
            Width of the head's MLP.
        head_bottleneck_dim (`int`, *optional*, defaults to 256):
            Output of the MLP (L2-normalised before the last layer).
        head_num_layers (`int`, *optional*, defaults to 3):
            Linear layers of the MLP (GELU between them).
        norm_last_layer (`bool`, *optional*, defaults to `True`):
            Fix the norm of every prototype of the weight-normalised last layer to 1 (its ``weight_g`` is frozen).
        global_crops_number (`int`, *optional*, defaults to 2):
            Global views per image, seen by teacher and student (the views ``forward`` takes).
        local_crops_number (`int`, *optional*, defaults to 8):
            Local views per image, seen by the student only (0 disables multi-crop).
        student_temp (`float`, *optional*, defaults to 0.1):
            Student softmax temperature.
        teacher_temp (`float`, *optional*, defaults to 0.04):
            Teacher softmax temperature (DINO uses 0.04-0.07): ``forward``'s default, and the value the recipe's
            teacher-temperature warm-up ends at.
        center_momentum (`float`, *optional*, defaults to 0.9):
            ``c <- m c + (1 - m) mean(teacher outputs)``.
        center_init (`str`, *optional*, defaults to `"zeros"`):
            The center before the first update: ``"zeros"`` (DINO) or ``"first_batch"`` (the first batch's mean
            teacher output, so that centering works from the first step; for short runs, where the ~10 steps the
            center takes to catch up from zero are enough for the student to collapse onto one prototype).
        collapse_warning_margin (`float`, *optional*, defaults to 0.02):
            A warning is logged when the teacher's mean entropy is above ``(1 - margin) * log(out_dim)`` (uniform
            collapse) or the entropy of its batch-averaged distribution below ``margin * log(out_dim)`` (one-hot
            collapse: every image on the same prototype).

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> from hf_useg import DinoPretrainingConfig
    >>> tiny = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                  patch_size=8, image_size=32, layer_norm_eps=1e-6)
    >>> config = DinoPretrainingConfig(backbone_config=tiny, out_dim=64)
    >>> config.local_crops_number, config.teacher_temp
    (8, 0.04)
    ```
    """

    model_type = "dino_pretraining"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", init_kwargs=DINO_VIT_SMALL_16),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    backbone_name: str | None = None
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_num_layers: int = 3
    norm_last_layer: bool = True
    global_crops_number: int = 2
    local_crops_number: int = 8
    student_temp: float | int = 0.1
    teacher_temp: float | int = 0.04
    center_momentum: float | int = 0.9
    center_init: str = "zeros"
    collapse_warning_margin: float | int = 0.02

    def __post_init__(self, **kwargs):
        drop_legacy_training_fields(kwargs, LEGACY_TRAINING_FIELDS)
        super().__post_init__(**kwargs)
        if self.backbone_config.model_type != "vit":
            raise ValueError(
                "DINO pretraining trains a ViT (the teacher is exported as a plain ViTModel): backbone_config must "
                f"have model_type 'vit', got {self.backbone_config.model_type!r}"
            )
        if self.global_crops_number < 1 or self.local_crops_number < 0:
            raise ValueError(
                "global_crops_number must be >= 1 and local_crops_number >= 0, got "
                f"{self.global_crops_number} and {self.local_crops_number}"
            )
        if self.global_crops_number + self.local_crops_number < 2:
            raise ValueError(
                "the loss compares a teacher view with the student's other views: give at least 2 views in all "
                f"(global_crops_number={self.global_crops_number}, local_crops_number={self.local_crops_number})"
            )
        for name in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.out_dim < 2:
            raise ValueError(f"out_dim must be >= 2, got {self.out_dim}")
        for name in ("student_temp", "teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {self.center_momentum}")
        if self.center_init not in CENTER_INITS:
            raise ValueError(f"center_init must be one of {CENTER_INITS}, got {self.center_init!r}")
        if not 0.0 < self.collapse_warning_margin < 0.5:
            raise ValueError(f"collapse_warning_margin must be in (0, 0.5), got {self.collapse_warning_margin}")

    @property
    def num_views(self) -> int:
        """Global + local crops per image."""
        return self.global_crops_number + self.local_crops_number


__all__ = ["DinoPretrainingConfig"]
