"""Configuration of DINO self-distillation pretraining (METHODS 4.1)."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ...backbones import dino_vit_kwargs

# DINO v1 ViT-S/16 (facebook/dino-vits16): the architecture of DINO's reference 100-epoch run.
DINO_VIT_SMALL_16 = dino_vit_kwargs("vit_small", 16)


def _check_scale(name: str, scale) -> tuple[float, float]:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
    return float(scale[0]), float(scale[1])


@strict
class DinoPretrainingConfig(PreTrainedConfig):
    r"""
    Configuration of [`DinoForSelfSupervisedPretraining`]: DINO self-distillation (METHODS 4.1) of a ViT on
    unlabelled images. Defaults are DINO's ViT-S/16 recipe (``main_dino.py``): out_dim 65536, 2 global crops
    (224 px, scale 0.4-1) and 8 local crops (96 px, scale 0.05-0.4), teacher temperature 0.04, student 0.1,
    center momentum 0.9, EMA momentum 0.996 -> 1 (cosine), AdamW with lr 5e-4 per 256 images (linear scaling,
    10 warm-up epochs, cosine to 1e-6), weight decay 0.04 -> 0.4 (cosine), per-parameter gradient clipping at 3.0
    and a last layer frozen during the first epoch.

    Schedules given in epochs are turned into steps with the number of batches per epoch of the run (the
    recipe's sampler); a fractional number of epochs is allowed.

    Args:
        backbone_config (`dict` or `ViTConfig`, *optional*):
            The student/teacher ViT (``model_type="vit"``: the teacher is exported as a plain `ViTModel`).
            Defaults to DINO ViT-S/16.
        backbone_name (`str`, *optional*):
            Where the student's initial weights came from (set by the trainer).
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
            Global views, seen by teacher and student.
        global_crops_scale (`tuple[float, float]`, *optional*, defaults to `(0.4, 1.0)`):
            Area fraction range of the global random-resized crops.
        global_crops_size (`int`, *optional*, defaults to 224):
            Side of the global crops in pixels (a multiple of the patch size).
        local_crops_number (`int`, *optional*, defaults to 8):
            Local views, seen by the student only (0 disables multi-crop).
        local_crops_scale (`tuple[float, float]`, *optional*, defaults to `(0.05, 0.4)`):
            Area fraction range of the local crops.
        local_crops_size (`int`, *optional*, defaults to 96):
            Side of the local crops in pixels (a multiple of the patch size).
        student_temp (`float`, *optional*, defaults to 0.1):
            Student softmax temperature.
        teacher_temp (`float`, *optional*, defaults to 0.04):
            Teacher softmax temperature after the warm-up (DINO uses 0.04-0.07).
        warmup_teacher_temp (`float`, *optional*, defaults to 0.04):
            Teacher temperature at step 0.
        warmup_teacher_temp_epochs (`float`, *optional*, defaults to 0.0):
            Linear warm-up of the teacher temperature (DINO's ViT-S/16 run uses 30).
        center_momentum (`float`, *optional*, defaults to 0.9):
            ``c <- m c + (1 - m) mean(teacher outputs)``.
        momentum_teacher (`float`, *optional*, defaults to 0.996):
            EMA momentum at step 0; it follows a cosine schedule to 1 at the last step.
        learning_rate (`float`, *optional*, defaults to 5e-4):
            Peak learning rate for a global batch of 256 images; the run uses
            ``learning_rate * global_batch_size / 256``.
        min_lr (`float`, *optional*, defaults to 1e-6):
            Learning rate at the end of the cosine schedule.
        warmup_epochs (`float`, *optional*, defaults to 10.0):
            Linear learning-rate warm-up from 0.
        weight_decay (`float`, *optional*, defaults to 0.04):
            Weight decay at step 0 (biases and norm parameters get none).
        weight_decay_end (`float`, *optional*, defaults to 0.4):
            Weight decay at the end of the cosine schedule.
        clip_grad (`float`, *optional*, defaults to 3.0):
            Per-parameter gradient-norm clipping (DINO's ``clip_gradients``); 0 disables it.
        freeze_last_layer_epochs (`float`, *optional*, defaults to 1.0):
            The head's last layer gets no update during these first epochs (stabilises the start).
        collapse_warning_margin (`float`, *optional*, defaults to 0.02):
            A warning is logged when the teacher's mean entropy is above ``(1 - margin) * log(out_dim)`` (uniform
            collapse) or the entropy of its batch-averaged distribution below ``margin * log(out_dim)`` (one-hot
            collapse: every image on the same prototype).
        max_steps (`int`, *optional*, defaults to 125100):
            Optimisation steps (100 ImageNet-1k epochs at a global batch of 1024).
        batch_size (`int`, *optional*, defaults to 64):
            Images per process and step (DINO: 64 per GPU on 16 GPUs).

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> from hf_useg import DinoPretrainingConfig
    >>> tiny = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                  patch_size=8, image_size=32, layer_norm_eps=1e-6)
    >>> config = DinoPretrainingConfig(backbone_config=tiny, out_dim=64, global_crops_size=32, local_crops_size=16)
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
    global_crops_scale: list[float] | tuple[float, float] = (0.4, 1.0)
    global_crops_size: int = 224
    local_crops_number: int = 8
    local_crops_scale: list[float] | tuple[float, float] = (0.05, 0.4)
    local_crops_size: int = 96
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    learning_rate: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1.0
    collapse_warning_margin: float = 0.02
    max_steps: int = 125100
    batch_size: int = 64

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.backbone_config.model_type != "vit":
            raise ValueError(
                "DINO pretraining trains a ViT (the teacher is exported as a plain ViTModel): backbone_config must "
                f"have model_type 'vit', got {self.backbone_config.model_type!r}"
            )
        patch = self.backbone_config.patch_size
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self, name)
            if size < patch or size % patch:
                raise ValueError(f"{name}={size} must be a positive multiple of the backbone patch size {patch}")
        self.global_crops_scale = _check_scale("global_crops_scale", self.global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", self.local_crops_scale)
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
        for name in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_num_layers", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.out_dim < 2:
            raise ValueError(f"out_dim must be >= 2, got {self.out_dim}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("center_momentum", "momentum_teacher"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in (
            "min_lr",
            "warmup_epochs",
            "warmup_teacher_temp_epochs",
            "weight_decay",
            "weight_decay_end",
            "clip_grad",
            "freeze_last_layer_epochs",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.collapse_warning_margin < 0.5:
            raise ValueError(f"collapse_warning_margin must be in (0, 0.5), got {self.collapse_warning_margin}")

    @property
    def num_views(self) -> int:
        """Global + local crops per image."""
        return self.global_crops_number + self.local_crops_number


__all__ = ["DinoPretrainingConfig"]
