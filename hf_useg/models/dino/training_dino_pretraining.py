"""DINO self-distillation pretraining recipe (method ``dino_pretrain``, METHODS 4.1).

    accelerate launch training/train.py --config training/configs/dino_pretrain_vits16.yaml

Any image dataset works (a plain folder of images is enough; labels are ignored). At the end the teacher backbone
is exported to ``output_dir/backbone`` (a plain `ViTModel` folder for ``--backbone``), the whole pretraining
model is saved to ``output_dir/model`` and ``output_dir/pretraining_summary.json`` is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from ...file_utils import atomic_directory, atomic_file
from ...training.recipe import BatchIndex, Recipe, RecipeOptions, StepBatchSampler, TrainingStepOutput, step_generator
from .configuration_dino_pretraining import DinoPretrainingConfig
from .modeling_dino_pretraining import (
    DinoForSelfSupervisedPretraining,
    DinoSchedule,
    clip_gradients_per_parameter,
    dino_schedule,
)
from .multicrop import DinoMultiCropAugmentation, MultiCropDataset, collate_multicrop

logger = logging.getLogger(__name__)

__all__ = ["DinoPretrainingRecipe", "DinoPretrainingTrainingOptions"]

# run settings that have no meaning for pretraining, and what to set instead
_UNUSED_OPTIONS = {
    "resolution": "global_crops_size / local_crops_size",
    "eval_resolution": "global_crops_size",
    "preset": "the options of training/configs/dino_pretrain_vits16.yaml",
    "max_grad_norm": "clip_grad (DINO's per-parameter gradient clipping)",
}


def _unused(name: str) -> ValueError:
    return ValueError(f"{name} does not apply to dino_pretrain: set {_UNUSED_OPTIONS[name]} instead")


def _check_scale(name: str, scale) -> list[float]:
    if isinstance(scale, (str, bytes)) or len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be [min, max] with 0 < min <= max <= 1, got {scale!r}")
    return [float(scale[0]), float(scale[1])]


@dataclass
class DinoPretrainingTrainingOptions(RecipeOptions):
    """The training settings of DINO pretraining; defaults are DINO's 100-epoch ViT-S/16 run (``main_dino.py``):
    2 global crops (224 px, scale 0.4-1) and local crops of 96 px (scale 0.05-0.4), AdamW with lr 5e-4 per 256
    images (linear scaling, 10 warm-up epochs, cosine to 1e-6), weight decay 0.04 -> 0.4 (cosine), EMA momentum
    0.996 -> 1 (cosine), per-parameter gradient clipping at 3.0, the head's last layer frozen during the first epoch
    and a teacher temperature warming up from ``warmup_teacher_temp`` to the model config's ``teacher_temp``.

    Settings given in epochs become steps with the run's optimizer steps per epoch (a fractional number of epochs
    is allowed). The number of views is the model's (``global_crops_number`` / ``local_crops_number`` of
    `DinoPretrainingConfig`); ``resolution`` and ``eval_resolution`` do not apply (the crops have their sizes).

    Attributes:
        max_steps: optimisation steps (125100: 100 ImageNet-1k epochs at a global batch of 1024).
        batch_size: images per process and step (DINO: 64 per GPU on 16 GPUs).
        global_crops_scale, local_crops_scale: area fraction ranges of the random-resized crops.
        global_crops_size, local_crops_size: sides of the crops in pixels (multiples of the patch size).
        learning_rate: peak learning rate for a global batch of 256 images (the run uses
            ``learning_rate * global_batch_size / 256``); min_lr: at the end of the cosine schedule.
        warmup_epochs: linear learning-rate warm-up from 0.
        weight_decay, weight_decay_end: cosine weight-decay schedule (biases and norm parameters get none).
        clip_grad: per-parameter gradient-norm clipping (DINO's ``clip_gradients``); 0 disables it.
        freeze_last_layer_epochs: the head's last layer gets no update during these first epochs.
        momentum_teacher: EMA momentum at step 0 (cosine to 1 at the last step).
        warmup_teacher_temp, warmup_teacher_temp_epochs: teacher temperature at step 0 and the length of its
            linear warm-up (DINO's ViT-S/16 run: 30 epochs).
        color_jitter_probability, grayscale_probability, solarization_probability: of DINO's photometric
            augmentation (0.8, 0.2, 0.2; see `DinoMultiCropAugmentation`).

    Example:

    ```python
    >>> from hf_useg.models.dino.training_dino_pretraining import DinoPretrainingTrainingOptions
    >>> options = DinoPretrainingTrainingOptions(batch_size=16, global_crops_size=96, local_crops_size=48)
    >>> options.max_steps, options.global_crops_scale
    (125100, [0.4, 1.0])
    ```
    """

    max_steps: int | None = 125100
    batch_size: int = 64
    resolution: int | None = None
    eval_resolution: int | None = None
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    global_crops_size: int = 224
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_crops_size: int = 96
    learning_rate: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1.0
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    color_jitter_probability: float = 0.8
    grayscale_probability: float = 0.2
    solarization_probability: float = 0.2

    # the cosine schedules span the whole run: another max_steps is another run, not a resumed one
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("max_steps",)

    def __post_init__(self):
        for name in ("resolution", "eval_resolution"):
            if getattr(self, name) is not None:
                raise _unused(name)
        super().__post_init__()
        self.global_crops_scale = _check_scale("global_crops_scale", self.global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", self.local_crops_scale)
        for name in ("global_crops_size", "local_crops_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.learning_rate <= 0 or self.warmup_teacher_temp <= 0:
            raise ValueError(
                f"learning_rate and warmup_teacher_temp must be > 0, got {self.learning_rate} and "
                f"{self.warmup_teacher_temp}"
            )
        if not 0.0 <= self.momentum_teacher <= 1.0:
            raise ValueError(f"momentum_teacher must be in [0, 1], got {self.momentum_teacher}")
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
        for name in ("color_jitter_probability", "grayscale_probability", "solarization_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class _MultiCropSteps(torch.utils.data.Dataset):
    """Multi-crop views indexed by the loop's [`BatchIndex`] items: the augmentation seed of an item is the
    ``position``-th of ``batch_size`` seeds drawn from its step's generator, so any DataLoader worker builds the
    same views (and a resumed run the views of the uninterrupted one)."""

    def __init__(self, items: MultiCropDataset):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: BatchIndex) -> dict[str, Any]:
        seeds = torch.randint(0, 2**62, (key.batch_size,), generator=step_generator(key))
        return {**self.items[(key.index, int(seeds[key.position]))], "step": key.step}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {**collate_multicrop(items), "step": items[0]["step"]}


class _RunRecord:
    """What `finalize` reports that must survive a resume: the completed steps and the last logged metrics."""

    def __init__(self):
        self.step = 0
        self.last_metrics: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.last_metrics = int(state["step"]), dict(state["last_metrics"])


class DinoPretrainingRecipe(Recipe):
    """DINO self-distillation of a ViT on unlabelled images (``label_free``: no classes, no validation, no
    segmenter).

    Particular to DINO:

    * each image of a step gets multi-crop views from its own augmentation seed, drawn from the step's generator
      (`step_generator`) in the DataLoader worker;
    * the schedules (`dino_schedule`, in optimizer steps: lr, weight decay, EMA momentum, teacher temperature,
      last-layer freezing) are evaluated at each step: the teacher temperature in `training_step` from the
      batch's step, lr and weight decay (regularized group only) in `before_optimizer_step`, which also clips
      each parameter's gradient at ``clip_grad`` and drops the last layer's gradients while it is frozen;
    * the teacher follows the student by EMA in `after_optimizer_step`;
    * logs the teacher entropy (and that of its batch mean), KL(teacher || student) and the schedule values, and
      warns on a collapse (`on_log`);
    * `finalize` exports the teacher backbone, the model and ``pretraining_summary.json``.

    Example:

    ```python
    >>> from hf_useg.training import load_training_arguments, train
    >>> args = load_training_arguments("training/configs/dino_pretrain_tiny.yaml", output_dir="outputs/dino")
    >>> summary = train(args)  # doctest: +SKIP
    >>> summary["backbone_dir"]  # doctest: +SKIP
    'outputs/dino/backbone'
    ```
    """

    options_class = DinoPretrainingTrainingOptions
    label_free = True
    progress_name = "train dino"
    options: DinoPretrainingTrainingOptions

    def __init__(self, args: Any, options: DinoPretrainingTrainingOptions):
        super().__init__(args, options)
        for name in ("preset", "max_grad_norm"):
            if getattr(args, name, None) is not None:
                raise _unused(name)
        self.model: DinoForSelfSupervisedPretraining | None = None
        self.record = _RunRecord()
        self._items: _MultiCropSteps | None = None
        self._steps_per_epoch = 1
        self._global_batch = options.batch_size

    def build_model(self, backbone_config: Any, num_classes: int) -> DinoForSelfSupervisedPretraining:
        if backbone_config is None:
            raise ValueError(
                "dino_pretrain trains a ViT: give backbone: a RANDOM_BACKBONES name (from scratch) or a ViT folder / "
                "Hub id (continued pretraining)"
            )
        overrides = dict(self.args.model)
        fields = {item.name for item in dataclasses.fields(DinoPretrainingConfig)} - {"backbone_config"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            recipe_options = sorted(set(unknown) & self.options_class.field_names())
            hint = f" ({recipe_options} are recipe options: set them at the top level or under recipe:)"
            raise ValueError(
                f"unknown dino_pretrain model option(s) {unknown}; valid options are {sorted(fields)} (the ViT comes "
                f"from the backbone: option){hint if recipe_options else ''}"
            )
        patch = backbone_config.patch_size
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.options, name)
            if size < patch or size % patch:
                raise ValueError(f"{name}={size} must be a positive multiple of the backbone patch size {patch}")
        return DinoForSelfSupervisedPretraining(DinoPretrainingConfig(backbone_config=backbone_config, **overrides))

    def setup(self, model: DinoForSelfSupervisedPretraining, run) -> None:
        super().setup(model, run)
        self.model = model
        # the loop loaded pretrained backbone weights (if any) into the student after building the model
        model.sync_teacher()
        if "image" not in run.train_set.column_names:
            raise ValueError(f"the training set has no image column (columns: {run.train_set.column_names})")
        augmentation = DinoMultiCropAugmentation.from_config(model.config, self.options)
        self._items = _MultiCropSteps(MultiCropDataset(run.train_set, augmentation, "image"))
        processes, accumulation = run.accelerator.num_processes, self.args.gradient_accumulation_steps
        batches_per_epoch = len(self._items) // (self.options.batch_size * processes)
        self._steps_per_epoch = max(1, batches_per_epoch // accumulation)
        self._global_batch = self.options.batch_size * processes * accumulation

    def schedule(self, step: int) -> DinoSchedule:
        """The schedule values of optimizer step ``step`` (0-based) of this run."""
        return dino_schedule(
            self.options,
            step,
            self.options.max_steps,
            self._steps_per_epoch,
            self._global_batch,
            teacher_temp=self.model.config.teacher_temp,
        )

    def make_optimizer(self, model: DinoForSelfSupervisedPretraining) -> torch.optim.Optimizer:
        # lr and weight decay are set at every step from the schedules
        return torch.optim.AdamW(model.parameter_groups(), lr=0.0, weight_decay=self.options.weight_decay)

    def checkpoint_objects(self) -> list[Any]:
        return [self.record]

    def train_dataloader(self, batches: StepBatchSampler) -> DataLoader:
        return DataLoader(self._items, batch_sampler=batches, collate_fn=_collate, num_workers=self.args.num_workers)

    def training_step(self, model, batch: dict[str, Any]) -> TrainingStepOutput:
        values = self.schedule(batch["step"] // self.args.gradient_accumulation_steps)
        output = model(
            pixel_values=batch["pixel_values"],
            local_pixel_values=batch["local_pixel_values"],
            teacher_temp=values.teacher_temp,
        )
        logs = {
            "teacher_entropy": output.teacher_entropy,
            "teacher_batch_entropy": output.teacher_batch_entropy,
            "kl_divergence": output.kl_divergence,
            "lr": values.learning_rate,
            "weight_decay": values.weight_decay,
            "momentum": values.momentum,
            "teacher_temp": values.teacher_temp,
        }
        return TrainingStepOutput(loss=output.loss, logs=logs)

    def before_optimizer_step(self, model: DinoForSelfSupervisedPretraining, optimizer, step: int) -> None:
        values = self.schedule(step)
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = values.learning_rate
            if index == 0:  # the regularized group; biases and norms keep weight_decay 0
                group["weight_decay"] = values.weight_decay
        if self.options.clip_grad > 0:
            self.run.accelerator.unscale_gradients(optimizer)
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            clip_gradients_per_parameter(parameters, self.options.clip_grad)
        if values.freeze_last_layer:
            for parameter in model.last_layer_parameters():
                parameter.grad = None

    def after_optimizer_step(self, model: DinoForSelfSupervisedPretraining, step: int) -> None:
        model.update_teacher(self.schedule(step).momentum)
        self.record.step = step + 1

    def on_log(self, logs: dict[str, float], step: int) -> None:
        self.record.last_metrics = dict(logs)
        if self.run.accelerator.is_main_process:
            self.model.warn_if_collapsed(
                logs["train/teacher_entropy"],
                logs["train/kl_divergence"],
                step,
                teacher_batch_entropy=logs["train/teacher_batch_entropy"],
            )

    def finalize(self, model: DinoForSelfSupervisedPretraining) -> dict[str, Any]:
        """Export the teacher backbone to ``output_dir/backbone``, save the pretraining model to
        ``output_dir/model`` and write ``output_dir/pretraining_summary.json``; returns what it adds to the run
        summary."""
        run, options, config = self.run, self.options, model.config
        accelerator, output_dir = run.accelerator, run.output_dir
        backbone_dir, model_dir = output_dir / "backbone", output_dir / "model"
        metrics = self.record.last_metrics
        summary = {
            "backbone_dir": str(backbone_dir),
            "model_dir": str(model_dir),
            "num_train_images": len(run.train_set),
            "global_batch_size": self._global_batch,
            "views": f"{config.global_crops_number}x{options.global_crops_size}px + "
            f"{config.local_crops_number}x{options.local_crops_size}px",
            **{key.replace("train/", "final_"): value for key, value in metrics.items()},
            "usage": f"--backbone {backbone_dir}",
        }
        if accelerator.is_main_process:
            backbone_config = config.backbone_config
            card = _BACKBONE_CARD.format(
                dataset=self.args.dataset,
                num_images=summary["num_train_images"],
                steps=self.record.step,
                global_batch=summary["global_batch_size"],
                views=summary["views"],
                hidden=backbone_config.hidden_size,
                layers=backbone_config.num_hidden_layers,
                heads=backbone_config.num_attention_heads,
                patch=backbone_config.patch_size,
                initial=config.backbone_name,
                metrics=json.dumps({k: round(v, 5) for k, v in metrics.items()}),
                path=backbone_dir,
            )
            with atomic_directory(backbone_dir) as folder:
                model.export_teacher_backbone(folder)
                (folder / "README.md").write_text(card)
            with atomic_directory(model_dir) as folder:
                model.save_pretrained(folder)
            with atomic_file(output_dir / "pretraining_summary.json") as path:
                path.write_text(json.dumps(summary, indent=2))
        accelerator.wait_for_everyone()
        return summary


_BACKBONE_CARD = """---
library_name: transformers
tags:
- dino
- self-supervised
- vision-transformer
- hf_useg
---

# DINO-pretrained ViT backbone (teacher)

Self-distillation pretraining (DINO, Caron et al. 2021) with `hf_useg`'s `dino_pretrain` recipe.

* data: {dataset} ({num_images} images)
* steps: {steps} x {global_batch} images, {views}
* architecture: ViT, hidden {hidden}, {layers} layers, {heads} heads, patch {patch}
* initial student weights: {initial}
* last logged: {metrics}

A plain `ViTModel` (no pooler). Use it as the backbone of any `hf_useg` method:

```bash
python training/train.py --method stego --dataset <data> --backbone {path}
```
"""
