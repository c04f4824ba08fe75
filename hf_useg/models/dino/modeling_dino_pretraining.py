"""DINO self-distillation pretraining (METHODS 4.1): a student ViT + projection head trained to match an EMA teacher
across multi-crop views, so that users can pretrain a backbone on their own unlabelled images and then use it under
any segmentation method (``--backbone <exported folder>``)."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ...backbones import FeatureBackbone
from ...modeling_utils import CheckedLoadingMixin
from .configuration_dino_pretraining import DinoPretrainingConfig

if TYPE_CHECKING:
    from .training_dino_pretraining import DinoPretrainingTrainingOptions

logger = logging.getLogger(__name__)

__all__ = [
    "DinoForSelfSupervisedPretraining",
    "DinoHead",
    "DinoLoss",
    "DinoLossOutput",
    "DinoPretrainingOutput",
    "DinoPretrainingPreTrainedModel",
    "DinoSchedule",
    "WeightNormLinear",
    "clip_gradients_per_parameter",
    "cosine_schedule",
    "dino_schedule",
    "linear_warmup",
]


# ---------------------------------------------------------------------------------------------------------------
# schedules


def cosine_schedule(
    step: int,
    total_steps: int,
    base_value: float,
    final_value: float,
    warmup_steps: int = 0,
    warmup_start_value: float = 0.0,
) -> float:
    """DINO's ``cosine_scheduler`` evaluated at one step.

    During the first ``warmup_steps`` the value rises linearly, ``warmup_start_value + (base_value -
    warmup_start_value) * step / warmup_steps``; afterwards ``final_value + (base_value - final_value) * (1 +
    cos(pi * i / n)) / 2`` with ``i = step - warmup_steps`` and ``n = total_steps - warmup_steps`` (``base_value``
    at the end of the warm-up, approaching ``final_value`` at the last step). Steps past ``total_steps`` give
    ``final_value``.

    Example:

    ```python
    >>> cosine_schedule(0, 100, 0.996, 1.0), cosine_schedule(50, 100, 0.996, 1.0)
    (0.996, 0.998)
    ```
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return warmup_start_value + (base_value - warmup_start_value) * step / warmup_steps
    if step >= total_steps:
        return final_value
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start_value: float, final_value: float) -> float:
    """``start_value`` rising linearly to ``final_value`` over ``warmup_steps``, then constant (DINO's teacher
    temperature; DINO changes it once per epoch, here it changes every step).

    Example:

    ```python
    >>> round(linear_warmup(5, 10, 0.04, 0.07), 6)
    0.055
    ```
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return final_value
    return start_value + (final_value - start_value) * step / warmup_steps


@dataclass
class DinoSchedule:
    """The values a DINO training step uses (see [`dino_schedule`])."""

    learning_rate: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool


def _epochs_to_steps(epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    return min(total_steps, int(round(epochs * steps_per_epoch)))


def dino_schedule(
    options: DinoPretrainingTrainingOptions,
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    global_batch_size: int,
    teacher_temp: float,
) -> DinoSchedule:
    """Learning rate, weight decay, EMA momentum, teacher temperature and last-layer freezing at ``step``
    (0-based) of a run of ``total_steps``, from the recipe's ``options``
    ([`~hf_useg.models.dino.training_dino_pretraining.DinoPretrainingTrainingOptions`]):

    * lr: linear warm-up from 0 over ``warmup_epochs``, then cosine to ``min_lr``; peak
      ``learning_rate * global_batch_size / 256``;
    * weight decay: cosine from ``weight_decay`` to ``weight_decay_end``;
    * momentum: cosine from ``momentum_teacher`` to 1;
    * teacher temperature: linear from ``warmup_teacher_temp`` to ``teacher_temp`` (the model config's) over
      ``warmup_teacher_temp_epochs``, then constant;
    * the head's last layer is frozen while ``step < freeze_last_layer_epochs * steps_per_epoch``.

    Example:

    ```python
    >>> from hf_useg.models.dino.training_dino_pretraining import DinoPretrainingTrainingOptions
    >>> dino_schedule(DinoPretrainingTrainingOptions(), 0, 1000, 10, 256, teacher_temp=0.04).momentum
    0.996
    ```
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    peak_lr = options.learning_rate * global_batch_size / 256.0
    warmup = _epochs_to_steps(options.warmup_epochs, steps_per_epoch, total_steps)
    return DinoSchedule(
        learning_rate=cosine_schedule(step, total_steps, peak_lr, options.min_lr, warmup_steps=warmup),
        weight_decay=cosine_schedule(step, total_steps, options.weight_decay, options.weight_decay_end),
        momentum=cosine_schedule(step, total_steps, options.momentum_teacher, 1.0),
        teacher_temp=linear_warmup(
            step,
            _epochs_to_steps(options.warmup_teacher_temp_epochs, steps_per_epoch, total_steps),
            options.warmup_teacher_temp,
            teacher_temp,
        ),
        freeze_last_layer=step < _epochs_to_steps(options.freeze_last_layer_epochs, steps_per_epoch, total_steps),
    )


def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> list[float]:
    """DINO's ``clip_gradients``: every parameter's gradient whose L2 norm exceeds ``max_norm`` is rescaled to
    ``max_norm`` (``grad * max_norm / (norm + 1e-6)``), each parameter on its own. Returns the norms before
    clipping."""
    norms = []
    for parameter in parameters:
        if parameter.grad is None:
            continue
        norm = parameter.grad.detach().norm(2)
        norms.append(float(norm))
        coefficient = max_norm / (norm + 1e-6)
        if coefficient < 1:
            parameter.grad.mul_(coefficient)
    return norms


# ---------------------------------------------------------------------------------------------------------------
# head and loss


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation: ``weight = g * v / ||v||`` row by row (one row per
    prototype), with parameters ``weight_v`` ``[out, in]`` and ``weight_g`` ``[out, 1]`` (``g`` starts at 1).
    With ``fixed_norm=True`` (DINO's ``norm_last_layer``) ``g`` gets no gradient, so every prototype keeps norm 1.
    """

    def __init__(self, in_features: int, out_features: int, fixed_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_norm)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.trunc_normal_(self.weight_v, std=0.02)
        init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DinoHead(nn.Module):
    """DINO's projection head: an MLP (``num_layers`` linear layers, GELU between them) to a ``bottleneck_dim``
    embedding, L2-normalised, then a weight-normalised linear layer onto ``out_dim`` prototypes.

    Example:

    ```python
    >>> head = DinoHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    >>> head(torch.randn(5, 32)).shape
    torch.Size([5, 64])
    ```
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if num_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


@dataclass
class DinoLossOutput(ModelOutput):
    """Output of [`DinoLoss`]: the loss, the mean entropy of the teacher's (centred, sharpened) distributions, the
    entropy of their mean over the batch and views (how many prototypes the batch uses), and the mean
    KL(teacher || student) over the loss's pairs of views (``loss = teacher_entropy + kl_divergence``)."""

    loss: torch.FloatTensor | None = None
    teacher_entropy: torch.FloatTensor | None = None
    teacher_batch_entropy: torch.FloatTensor | None = None
    kl_divergence: torch.FloatTensor | None = None


class DinoLoss(nn.Module):
    """DINO's cross-view distillation loss with teacher centering (METHODS 4.1).

    For teacher view ``g`` (the global views) and student view ``v != g``:
    ``H(g, v) = mean_b sum_k -softmax((t_g - c) / tau_t)_k * log_softmax(s_v / tau_s)_k``; the loss is the mean
    of ``H`` over all those pairs. The center ``c`` (buffer ``center`` ``[1, out_dim]``) moves with
    [`update_center`]: ``c <- m c + (1 - m) mean(teacher outputs)``, the mean taken over every process when
    ``torch.distributed`` is initialised. With ``center_init="first_batch"`` a center that was never updated (all
    zeros, which a center that has been updated practically never is, so resumed runs need no extra state) is set to
    the batch's mean teacher output before the loss is computed.

    Example:

    ```python
    >>> loss = DinoLoss(out_dim=4)
    >>> out = loss(torch.randn(4, 2, 4), torch.randn(2, 2, 4), teacher_temp=0.04)   # 2 global + 2 local views
    >>> out.loss.shape
    torch.Size([])
    ```
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, center_init: str = "zeros"
    ):
        super().__init__()
        if center_init not in ("zeros", "first_batch"):
            raise ValueError(f"center_init must be 'zeros' or 'first_batch', got {center_init!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_init = center_init
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> DinoLossOutput:
        """``student_output`` ``[V, B, K]`` (views in order: the ``G`` global views first, then the local ones),
        ``teacher_output`` ``[G, B, K]`` (the same global views), raw head outputs."""
        if student_output.ndim != 3 or teacher_output.ndim != 3:
            raise ValueError(
                "student_output must be [views, batch, out_dim] and teacher_output [global_views, batch, out_dim], "
                f"got {tuple(student_output.shape)} and {tuple(teacher_output.shape)}"
            )
        num_global, batch, dim = teacher_output.shape
        num_views = student_output.shape[0]
        if student_output.shape[1:] != (batch, dim) or num_global > num_views:
            raise ValueError(
                f"student_output {tuple(student_output.shape)} does not match teacher_output "
                f"{tuple(teacher_output.shape)}: the student sees every teacher view (first) plus local views"
            )
        if num_views < 2:
            raise ValueError("the loss needs at least two views (it never compares a view with itself)")
        if self.center_init == "first_batch" and self.training and not self.center.any():
            self.center.copy_(self._mean_over_processes(teacher_output))
        student_log_probs = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        teacher_logits = (teacher_output.float() - self.center) / teacher_temp
        teacher_probs = F.softmax(teacher_logits, dim=-1)
        # cross[g, v] = mean over the batch of the cross-entropy between teacher view g and student view v
        cross = -torch.einsum("gbk,vbk->gv", teacher_probs, student_log_probs) / batch
        same_view = torch.eye(num_global, num_views, dtype=torch.bool, device=cross.device)
        loss = cross[~same_view].mean()
        entropy = -(teacher_probs * F.log_softmax(teacher_logits, dim=-1)).sum(-1).mean()
        mean_probs = teacher_probs.detach().reshape(-1, dim).mean(0)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-30).log()).sum()
        # every teacher view is paired with the same number (V - 1) of student views, so the mean cross-entropy
        # minus the mean teacher entropy is the mean KL over the pairs
        return DinoLossOutput(
            loss=loss,
            teacher_entropy=entropy.detach(),
            teacher_batch_entropy=batch_entropy,
            kl_divergence=(loss - entropy).detach(),
        )

    @staticmethod
    @torch.no_grad()
    def _mean_over_processes(teacher_output: torch.Tensor) -> torch.Tensor:
        flat = teacher_output.detach().float().reshape(-1, teacher_output.shape[-1])
        total = flat.sum(dim=0, keepdim=True)
        count = flat.shape[0]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            count *= torch.distributed.get_world_size()
        return total / count

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """``c <- m c + (1 - m) * mean of the teacher outputs`` over views, batch and processes."""
        mean = self._mean_over_processes(teacher_output)
        self.center.mul_(self.center_momentum).add_(mean, alpha=1.0 - self.center_momentum)


# ---------------------------------------------------------------------------------------------------------------
# the model


@dataclass
class DinoPretrainingOutput(ModelOutput):
    """Output of [`DinoForSelfSupervisedPretraining.forward`].

    Args:
        loss: DINO's loss (mean cross-entropy over the (teacher global view, other student view) pairs).
        teacher_entropy: mean entropy of the teacher's centred, sharpened distributions (``log(out_dim)``: uniform
            collapse; near 0 is DINO's normal regime as long as different images pick different prototypes).
        teacher_batch_entropy: entropy of the teacher distributions averaged over the batch and views (near 0: every
            image gets the same prototype, the one-hot collapse).
        kl_divergence: mean KL(teacher || student) over the same pairs (near 0 when the run has collapsed).
        student_output: raw student head outputs ``[V, B, out_dim]`` (global views first).
        teacher_output: raw teacher head outputs ``[G, B, out_dim]``.
        teacher_temp: the teacher temperature used.
    """

    loss: torch.FloatTensor | None = None
    teacher_entropy: torch.FloatTensor | None = None
    teacher_batch_entropy: torch.FloatTensor | None = None
    kl_divergence: torch.FloatTensor | None = None
    student_output: torch.FloatTensor | None = None
    teacher_output: torch.FloatTensor | None = None
    teacher_temp: float | None = None


class DinoPretrainingPreTrainedModel(CheckedLoadingMixin, PreTrainedModel):
    config_class = DinoPretrainingConfig
    base_model_prefix = "dino_pretraining"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # DINO: trunc-normal(0.02) linear weights, zero biases; the ViT sub-models use ViT's own initialisation.
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, WeightNormLinear):
            module.reset_parameters()
        elif isinstance(module, DinoLoss):
            init.zeros_(module.center)


class DinoForSelfSupervisedPretraining(DinoPretrainingPreTrainedModel):
    """DINO self-distillation (METHODS 4.1): a student (``backbone`` + ``head``) trained by gradient descent and a
    teacher (``teacher_backbone`` + ``teacher_head``, no gradients) that follows the student by EMA
    ([`update_teacher`]). Both see the global views; the student also sees the local ones.

    After training, [`export_teacher_backbone`] writes the teacher ViT as a plain `ViTModel` folder that
    `FeatureBackbone.from_pretrained`, every segmentation model's ``from_pretrained_backbone`` and
    ``training/train.py --backbone <folder>`` load.

    Example:

    ```python
    >>> import torch
    >>> from transformers import ViTConfig
    >>> from hf_useg import DinoPretrainingConfig, DinoForSelfSupervisedPretraining
    >>> tiny = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                  patch_size=8, image_size=32, layer_norm_eps=1e-6)
    >>> config = DinoPretrainingConfig(backbone_config=tiny, out_dim=64, head_hidden_dim=48, head_bottleneck_dim=16,
    ...                                local_crops_number=2)
    >>> model = DinoForSelfSupervisedPretraining(config)
    >>> out = model(torch.randn(4, 2, 3, 32, 32), local_pixel_values=torch.randn(4, 2, 3, 16, 16))
    >>> out.loss.shape, out.student_output.shape, out.teacher_output.shape
    (torch.Size([]), torch.Size([4, 4, 64]), torch.Size([2, 4, 64]))
    >>> model.update_teacher(momentum=0.996)
    >>> model.export_teacher_backbone("my-backbone")  # doctest: +SKIP
    ```
    """

    frozen_modules = ("teacher_head",)  # (the teacher backbone is a frozen FeatureBackbone)

    def restore_frozen_parameters(self) -> None:
        super().restore_frozen_parameters()
        if self.config.norm_last_layer:  # the last layer's weight norm stays fixed at 1
            self.head.last_layer.weight_g.requires_grad_(False)

    def __init__(self, config: DinoPretrainingConfig):
        super().__init__(config)
        hidden = config.backbone_config.hidden_size
        head_kwargs = dict(
            hidden_dim=config.head_hidden_dim,
            bottleneck_dim=config.head_bottleneck_dim,
            num_layers=config.head_num_layers,
            norm_last_layer=config.norm_last_layer,
        )
        self.backbone = FeatureBackbone(config.backbone_config, pos_embed_interpolation="dino")
        self.head = DinoHead(hidden, config.out_dim, **head_kwargs)
        # the teacher gets its own copy of the config: attention-implementation switches must not leak across
        self.teacher_backbone = FeatureBackbone(
            copy.deepcopy(config.backbone_config), pos_embed_interpolation="dino", frozen=True
        )
        self.teacher_head = DinoHead(hidden, config.out_dim, **head_kwargs).requires_grad_(False)
        self.dino_loss = DinoLoss(config.out_dim, config.student_temp, config.center_momentum, config.center_init)
        self.post_init()
        self.sync_teacher()

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Copy the student's weights into the teacher (DINO's start: teacher = student)."""
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher_head.load_state_dict(self.head.state_dict())

    def _student_teacher_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        student = list(self.backbone.parameters()) + list(self.head.parameters())
        teacher = list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters())
        return student, teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step ``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` on every teacher parameter."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        student, teacher = self._student_teacher_parameters()
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, [p.detach() for p in student], alpha=1.0 - momentum)

    def parameter_groups(self) -> list[dict]:
        """The student's trainable parameters for the optimizer, as DINO groups them: weights with weight decay,
        then biases and 1-D (norm) parameters without."""
        regularized, not_regularized = [], []
        for name, parameter in list(self.backbone.named_parameters()) + list(self.head.named_parameters()):
            if not parameter.requires_grad:
                continue
            if name.endswith(".bias") or parameter.ndim == 1:
                not_regularized.append(parameter)
            else:
                regularized.append(parameter)
        return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The student head's last layer (frozen during the recipe's first ``freeze_last_layer_epochs``)."""
        return list(self.head.last_layer.parameters())

    # ----------------------------------------------------------------------------------------------------------
    def _check_views(self, name: str, views: torch.Tensor, count: int) -> None:
        if not isinstance(views, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(views).__name__}")
        if views.ndim != 5 or views.shape[1] != count or views.shape[2] != 3:
            raise ValueError(
                f"{name} must be [batch, {count} views, 3, height, width] (config: {count} views), got "
                f"{tuple(views.shape)}"
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        local_pixel_values: torch.Tensor | None = None,
        teacher_temp: float | None = None,
    ) -> DinoPretrainingOutput:
        """DINO's loss for one batch of multi-crop views.

        Args:
            pixel_values: global views ``[B, G, 3, S, S]`` (``G = config.global_crops_number``).
            local_pixel_values: local views ``[B, L, 3, s, s]`` (``L = config.local_crops_number``; None when 0).
            teacher_temp: teacher temperature (default: ``config.teacher_temp``; the recipe passes the warm-up
                schedule's value).

        In training mode the teacher center is updated after the loss is computed (DINO's order).
        """
        config = self.config
        self._check_views("pixel_values", pixel_values, config.global_crops_number)
        if config.local_crops_number > 0:
            if local_pixel_values is None:
                raise ValueError(f"local_pixel_values are required: the config asks for {config.local_crops_number}")
            self._check_views("local_pixel_values", local_pixel_values, config.local_crops_number)
        elif local_pixel_values is not None and local_pixel_values.numel() > 0:
            raise ValueError("local_pixel_values given but config.local_crops_number is 0")
        teacher_temp = config.teacher_temp if teacher_temp is None else float(teacher_temp)

        batch = pixel_values.shape[0]
        # view-major order: rows [v * B, (v + 1) * B) hold view v of every image
        global_views = pixel_values.transpose(0, 1).reshape(-1, *pixel_values.shape[2:])
        tokens = [self.backbone(global_views).cls_token]
        if config.local_crops_number > 0:
            local_views = local_pixel_values.transpose(0, 1).reshape(-1, *local_pixel_values.shape[2:])
            tokens.append(self.backbone(local_views).cls_token)
        student_output = self.head(torch.cat(tokens)).reshape(config.num_views, batch, -1)
        with torch.no_grad():
            teacher_output = self.teacher_head(self.teacher_backbone(global_views).cls_token)
            teacher_output = teacher_output.reshape(config.global_crops_number, batch, -1)
        losses = self.dino_loss(student_output, teacher_output, teacher_temp)
        if self.training:
            self.dino_loss.update_center(teacher_output)
        return DinoPretrainingOutput(
            loss=losses.loss,
            teacher_entropy=losses.teacher_entropy,
            teacher_batch_entropy=losses.teacher_batch_entropy,
            kl_divergence=losses.kl_divergence,
            student_output=student_output,
            teacher_output=teacher_output,
            teacher_temp=teacher_temp,
        )

    # ----------------------------------------------------------------------------------------------------------
    def collapse_status(self, teacher_entropy: float, teacher_batch_entropy: float | None = None) -> str | None:
        """Which collapse the teacher statistics show, with ``margin = config.collapse_warning_margin``:

        * ``"uniform"``: the mean teacher entropy is above ``(1 - margin) * log(out_dim)`` (centering wins: every
          output is flat);
        * ``"one-hot"``: the entropy of the batch-averaged teacher distribution is below ``margin * log(out_dim)``
          (sharpening wins: every image gets the same prototype); without ``teacher_batch_entropy`` the mean
          per-image entropy is used (a sharp but diverse teacher is DINO's normal regime, so pass it when known);
        * None otherwise.
        """
        maximum = math.log(self.config.out_dim)
        margin = self.config.collapse_warning_margin
        if teacher_entropy > (1.0 - margin) * maximum:
            return "uniform"
        spread = teacher_entropy if teacher_batch_entropy is None else teacher_batch_entropy
        if spread < margin * maximum:
            return "one-hot"
        return None

    def warn_if_collapsed(
        self,
        teacher_entropy: float,
        kl_divergence: float,
        step: int | None = None,
        teacher_batch_entropy: float | None = None,
    ) -> str | None:
        """Log a warning when [`collapse_status`] reports a collapse; returns the status."""
        status = self.collapse_status(teacher_entropy, teacher_batch_entropy)
        if status is not None:
            where = f" at step {step}" if step is not None else ""
            batch = "" if teacher_batch_entropy is None else f" (batch-mean distribution {teacher_batch_entropy:.4f})"
            hint = (
                "sharpening wins over centering: raise teacher_temp a little or lower center_momentum"
                if status == "one-hot"
                else "centering wins over sharpening: lower teacher_temp (DINO: 0.04-0.07)"
            )
            logger.warning(
                f"DINO {status} collapse{where}: teacher entropy {teacher_entropy:.4f} nats{batch}, log(out_dim) = "
                f"{math.log(self.config.out_dim):.4f}, KL(teacher || student) {kl_divergence:.4f}; {hint}"
            )
        return status

    def export_teacher_backbone(self, path: str | Path) -> Path:
        """Write the teacher ViT as a plain `ViTModel` folder (``config.json`` + ``model.safetensors``), the
        backbone DINO evaluates and releases. Load it with `FeatureBackbone.from_pretrained(path)`,
        ``<Method>ForUnsupervisedSegmentation.from_pretrained_backbone(path)`` or ``--backbone path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.teacher_backbone.model.save_pretrained(path)
        return path
