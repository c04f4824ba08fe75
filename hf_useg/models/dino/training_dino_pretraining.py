"""DINO self-distillation pretraining recipe for `hf_useg.trainer` (method ``dino_pretrain``, METHODS 4.1).

    accelerate launch training/train.py --config training/configs/dino_pretrain_vits16.yaml

Any image dataset works (a plain folder of images is enough; labels are ignored). Every step draws its multi-crop
views from ``context.seed_step(step)`` (so a resumed run sees exactly the views the uninterrupted one saw), sets
the per-step schedules (lr, weight decay, EMA momentum, teacher temperature), updates the student with AdamW and
the teacher by EMA, and logs the loss, the teacher entropy and KL(teacher || student) (warning on collapse).
Checkpoints go through the trainer (``save_every``, ``--resume_from_checkpoint latest``). At the end
[`finalize`] exports the teacher backbone to ``output_dir/backbone`` (a plain `ViTModel` folder for
``--backbone``), saves the whole pretraining model to ``output_dir/model`` and writes
``output_dir/pretraining_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import types
import typing
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .configuration_dino_pretraining import DinoPretrainingConfig
from .modeling_dino_pretraining import DinoForSelfSupervisedPretraining, clip_gradients_per_parameter, dino_schedule
from .multicrop import DinoMultiCropAugmentation, MultiCropDataset, collate_multicrop

logger = logging.getLogger(__name__)

__all__ = ["build_model", "finalize", "train"]

# trainer options that have no meaning for pretraining (the crops are set by the method config)
_UNUSED_OPTIONS = {
    "resolution": "model.global_crops_size / model.local_crops_size",
    "eval_resolution": "model.global_crops_size",
    "five_crop": "model.global_crops_number / model.local_crops_number",
    "preset": "the model options of training/configs/dino_pretrain_vits16.yaml",
}


def _is_float_field(annotation) -> bool:
    return annotation is float


def _is_float_sequence_field(annotation) -> bool:
    if not isinstance(annotation, types.UnionType) and typing.get_origin(annotation) is not typing.Union:
        return False
    return any(typing.get_origin(arm) in (list, tuple) for arm in typing.get_args(annotation))


def _config_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Check the ``model:`` overrides against the config's fields and turn YAML integers into floats where the
    config expects floats (``clip_grad: 0``, ``global_crops_scale: [0.4, 1]``)."""
    fields = {field.name: field.type for field in dataclasses.fields(DinoPretrainingConfig)}
    unknown = sorted(set(overrides) - set(fields) | ({"backbone_config"} & set(overrides)))
    if unknown:
        own = sorted(set(DinoPretrainingConfig.__annotations__) - {"backbone_config"})
        raise ValueError(
            f"unknown dino_pretrain model option(s) {unknown}; valid options are {own} (the ViT comes from the "
            "backbone: option)"
        )
    coerced = {}
    for key, value in overrides.items():
        annotation = fields.get(key)
        if _is_float_field(annotation) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif _is_float_sequence_field(annotation) and isinstance(value, (list, tuple)):
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        coerced[key] = value
    return coerced


def build_model(args, backbone_config, num_classes: int) -> DinoForSelfSupervisedPretraining:
    for name, instead in _UNUSED_OPTIONS.items():
        if getattr(args, name) is not None:
            raise ValueError(f"{name} does not apply to dino_pretrain: set {instead} instead")
    if backbone_config is None:
        raise ValueError(
            "dino_pretrain trains a ViT: give backbone: a RANDOM_BACKBONES name (from scratch) or a ViT folder / Hub "
            "id (continued pretraining)"
        )
    config = DinoPretrainingConfig(backbone_config=backbone_config, **_config_overrides(dict(args.model)))
    return DinoForSelfSupervisedPretraining(config)


class _SeededBatches:
    """Batches of ``(index, seed)`` pairs: the indices from the trainer's resumable sampler, one augmentation seed
    per image drawn from ``context.seed_step(step)``. DataLoader workers then build identical views whatever
    their number (the trainer reseeds torch's RNG with ``seed_step`` before every step anyway)."""

    def __init__(self, sampler, context, first_step: int):
        self.sampler, self.context, self.first_step = sampler, context, first_step

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for offset, indices in enumerate(self.sampler):
            generator = self.context.seed_step(self.first_step + offset)
            seeds = torch.randint(0, 2**62, (len(indices),), generator=generator).tolist()
            yield list(zip(indices, seeds))


def train(context) -> DinoForSelfSupervisedPretraining:
    args, schedule, accelerator = context.args, context.schedule, context.accelerator
    model: DinoForSelfSupervisedPretraining = context.model
    config = model.config
    # pretraining has no segmentation probes: nothing to validate, `after_step` only writes checkpoints
    context.val_set = None
    # the trainer loads pretrained backbone weights (if any) into the student after building the model
    model.sync_teacher()

    image_column = "image"
    if image_column not in context.train_set.column_names:
        raise ValueError(f"the training set has no image column (columns: {context.train_set.column_names})")
    items = MultiCropDataset(context.train_set, DinoMultiCropAugmentation.from_config(config), image_column)
    steps = schedule["max_steps"]
    sampler = context.sampler(len(items), schedule["batch_size"])
    steps_per_epoch = sampler.batches_per_epoch
    global_batch = schedule["batch_size"] * accelerator.num_processes
    # lr and weight decay are set at every step from the schedules
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=0.0, weight_decay=config.weight_decay)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: DinoForSelfSupervisedPretraining = accelerator.unwrap_model(prepared)
    context.resume()
    student_parameters = [p for group in optimizer.param_groups for p in group["params"]]
    last_layer = unwrapped.last_layer_parameters()

    state = context.state
    progress = tqdm(total=steps, initial=state["step"], desc="train dino", disable=not context.show_progress)
    while state["step"] < steps:
        epoch, first = divmod(state["step"], steps_per_epoch)
        sampler.start(epoch, first)
        loader = DataLoader(
            items,
            batch_sampler=_SeededBatches(sampler, context, state["step"]),
            collate_fn=collate_multicrop,
            num_workers=args.num_workers,
        )
        for batch in loader:
            step = state["step"]
            context.seed_step(step)
            values = dino_schedule(config, step, steps, steps_per_epoch, global_batch)
            for index, group in enumerate(optimizer.param_groups):
                group["lr"] = values.learning_rate
                if index == 0:  # the regularized group; biases and norms keep weight_decay 0
                    group["weight_decay"] = values.weight_decay
            prepared.train()
            output = prepared(
                pixel_values=batch["pixel_values"].to(accelerator.device),
                local_pixel_values=(
                    batch["local_pixel_values"].to(accelerator.device)
                    if batch["local_pixel_values"] is not None
                    else None
                ),
                teacher_temp=values.teacher_temp,
            )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(output.loss)
            if config.clip_grad > 0:
                accelerator.unscale_gradients(optimizer)
                clip_gradients_per_parameter(student_parameters, config.clip_grad)
            if values.freeze_last_layer:
                for parameter in last_layer:
                    parameter.grad = None
            optimizer.step()
            unwrapped.update_teacher(values.momentum)
            state["step"] = step = step + 1
            progress.update(1)
            if step % args.log_every == 0 or step == steps:
                measured = torch.stack(
                    [output.loss.detach(), output.teacher_entropy, output.teacher_batch_entropy, output.kl_divergence]
                )
                loss, entropy, batch_entropy, kl = accelerator.reduce(measured.float(), reduction="mean").tolist()
                logged = {
                    "train/loss": loss,
                    "train/teacher_entropy": entropy,
                    "train/teacher_batch_entropy": batch_entropy,
                    "train/kl_divergence": kl,
                    "train/lr": values.learning_rate,
                    "train/weight_decay": values.weight_decay,
                    "train/momentum": values.momentum,
                    "train/teacher_temp": values.teacher_temp,
                }
                context.check_finite(loss, step)
                context.log(logged, step)
                state["last_metrics"] = logged
                if accelerator.is_main_process:
                    unwrapped.warn_if_collapsed(entropy, kl, step, teacher_batch_entropy=batch_entropy)
                progress.set_postfix(loss=f"{loss:.4f}", entropy=f"{entropy:.3f}", kl=f"{kl:.3f}")
            context.after_step(unwrapped, step)
            if step >= steps:
                break
    progress.close()
    return unwrapped


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


def finalize(context, model: DinoForSelfSupervisedPretraining) -> dict[str, Any]:
    """Export the teacher backbone to ``output_dir/backbone``, save the pretraining model to ``output_dir/model``
    and write ``output_dir/pretraining_summary.json``. Called by the trainer instead of its segmentation
    evaluation; returns what it adds to the run summary."""
    accelerator = context.accelerator
    output_dir = context.output_dir
    backbone_dir, model_dir = output_dir / "backbone", output_dir / "model"
    config = model.config
    metrics = context.state.get("last_metrics") or {}
    summary = {
        "backbone_dir": str(backbone_dir),
        "model_dir": str(model_dir),
        "num_train_images": len(context.train_set),
        "global_batch_size": context.schedule["batch_size"] * accelerator.num_processes,
        "views": f"{config.global_crops_number}x{config.global_crops_size}px + "
        f"{config.local_crops_number}x{config.local_crops_size}px",
        **{key.replace("train/", "final_"): value for key, value in metrics.items()},
        "usage": f"--backbone {backbone_dir}",
    }
    if accelerator.is_main_process:
        backbone_config = config.backbone_config
        card = _BACKBONE_CARD.format(
            dataset=context.args.dataset,
            num_images=summary["num_train_images"],
            steps=context.state["step"],
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

        def write_backbone(path):
            model.export_teacher_backbone(path)
            (path / "README.md").write_text(card)

        for final, write in ((backbone_dir, write_backbone), (model_dir, model.save_pretrained)):
            tmp = final.parent / f".tmp-{final.name}"  # atomic: a folder is either complete or absent
            if tmp.exists():
                shutil.rmtree(tmp)
            write(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        (output_dir / "pretraining_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
