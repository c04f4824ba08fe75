"""The one training loop of every method (`training/train.py` is its command line).

It reads like transformers' ``run_semantic_segmentation_no_trainer.py``: load the data, build the model, prepare
with Accelerate, then one plain loop — for each step: batch → ``recipe.training_step`` → backward → clip →
optimizer step → log → validate / checkpoint. Everything methods share is written here once: per-step seeding
(a resumed run draws exactly what the uninterrupted one drew, so resuming is bit-exact), gradient accumulation,
mixed precision and devices (Accelerate), trackers and ``metrics.jsonl``, the NaN/inf stop, validation every
``val_every`` steps with the best model kept in ``best/``, atomic resumable checkpoints, and the final model
folder (weights, processor, ``id2label`` from the Hungarian matching, evaluation results, a generated card).
What is particular to a method lives in its `Recipe`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..file_utils import atomic_file
from .arguments import TrainingArguments, resolve_recipe_options
from .checkpointing import (
    STATE_FILE,
    check_output_dir,
    check_same_run,
    latest_checkpoint,
    remove_interrupted_writes,
    run_identity,
    save_checkpoint,
)
from .data import build_model
from .recipe import Recipe, StepBatchSampler, TrainingRun, step_seed

logger = logging.getLogger(__name__)

__all__ = ["build_model", "train"]  # build_model: the segmentation default of `Recipe.create_model`


class _Logger:
    """Accelerate trackers plus ``metrics.jsonl`` (main process), whose lines it counts: a checkpoint records the
    count, and a resumed run drops what the interrupted one logged after its checkpoint (no step twice)."""

    def __init__(self, accelerator, output_dir: Path):
        self.accelerator, self.path, self.lines = accelerator, output_dir / "metrics.jsonl", 0

    def __call__(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        self.lines += 1

    def truncate(self, lines: int) -> None:
        self.lines = lines
        if self.accelerator.is_main_process and self.path.exists():
            kept = self.path.read_text().splitlines(keepends=True)[:lines]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(kept))


def _checkpoint_to_resume(args: TrainingArguments) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names (None: a fresh run)."""
    request = args.resume_from_checkpoint
    if not request:
        return None
    path = latest_checkpoint(args.output_dir) if request == "latest" else Path(request)
    if path is None:
        logger.warning("resume_from_checkpoint=latest but %s has no checkpoint: starting fresh", args.output_dir)
        return None
    if not (path / STATE_FILE).exists():
        raise ValueError(f"{path} is not a complete hf_useg checkpoint (no {STATE_FILE})")
    return path


def _micro_batches(
    recipe: Recipe, model, sampler: StepBatchSampler, first_micro: int, log
) -> Iterator[tuple[int, list]]:
    """``(micro-step, batch)`` from micro-step ``first_micro`` on, across epochs; ``on_epoch_start`` runs before
    the first batch of each epoch (and of the resumed one)."""
    micro = first_micro
    while True:
        epoch, first = divmod(micro, sampler.batches_per_epoch)
        values = recipe.on_epoch_start(model, epoch, micro)
        if values:
            log(values, micro)
        sampler.start(epoch, first, micro)
        for batch in recipe.train_dataloader(sampler):
            yield micro, batch
            micro += 1


def _validate(model, recipe: Recipe, state: dict[str, Any], step: int, log) -> None:
    evaluation = recipe.evaluate(model, final=False)
    model.train()
    values = {f"val/{key}": value for key, value in evaluation.values.items()}
    log(values, step)
    if evaluation.score > state["best_score"]:
        state["best_score"], state["best_step"] = evaluation.score, step
        run = recipe.run
        if run.accelerator.is_main_process:
            extra = {"best_metrics.json": json.dumps({"step": step, **values}, indent=2)}
            recipe.save_model(model, run.output_dir / "best", extra)
        run.accelerator.wait_for_everyone()


def train(args: TrainingArguments) -> dict[str, Any]:
    """Train (or fit) ``args.method`` and return a summary dict (also written to ``output_dir``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, send_to_device

    from ..registry import get_method

    spec = get_method(args.method)
    recipe_class = spec.load_recipe_class()
    recipe: Recipe = recipe_class(args, resolve_recipe_options(args))
    options = recipe.options
    output_dir = Path(args.output_dir)

    # data, accelerator, model
    train_set, val_set, num_classes, class_names = recipe.load_data()
    if args.max_train_images is not None:
        train_set = train_set.select(range(min(args.max_train_images, len(train_set))))
    has_train_labels = "label" in train_set.column_names
    identity = run_identity(args, options, train_set)
    checkpoint = _checkpoint_to_resume(args)
    if checkpoint is not None:
        check_same_run(checkpoint, identity)
    accelerator = Accelerator(
        log_with=args.report_to or None,
        project_dir=str(output_dir),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=recipe.find_unused_parameters or not has_train_labels)
        ],
    )
    model, backbone_description = recipe.create_model(num_classes)
    train_processor, eval_processor = recipe.processors(model)
    run = TrainingRun(
        args=args,
        accelerator=accelerator,
        train_set=train_set,
        val_set=val_set,
        num_classes=num_classes,
        class_names=class_names,
        train_processor=train_processor,
        eval_processor=eval_processor,
    )
    check_output_dir(output_dir, checkpoint is not None, args.overwrite_output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_interrupted_writes(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.json").write_text(
            json.dumps({**dataclasses.asdict(args), "recipe_options": dataclasses.asdict(options)}, indent=2)
        )
    if args.report_to:
        accelerator.init_trackers("hf_useg", config={k: str(v) for k, v in dataclasses.asdict(args).items()})
    log = _Logger(accelerator, output_dir)
    model.to(accelerator.device)
    start_time = time.time()
    recipe.setup(model, run)

    # prepare, resume
    optimizer = recipe.make_optimizer(model)
    for item in recipe.checkpoint_objects():
        accelerator.register_for_checkpointing(item)
    if optimizer is not None:
        prepared, optimizer = accelerator.prepare(model, optimizer)
    else:
        prepared = accelerator.prepare(model)
    model = accelerator.unwrap_model(prepared)
    state: dict[str, Any] = {"step": 0, "best_score": -math.inf, "best_step": None, "run": identity}
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        saved = json.loads((checkpoint / STATE_FILE).read_text())
        if "best_cluster_mean_iou" in saved:  # checkpoints written before evaluations had a generic score
            saved["best_score"] = saved.pop("best_cluster_mean_iou")
        state.update(saved)
        log.truncate(state.get("metrics_lines", log.lines))
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")

    # the loop
    accumulation = args.gradient_accumulation_steps
    has_val = recipe.has_validation(val_set)
    max_steps = options.max_steps
    if optimizer is not None and max_steps != 0:
        sampler = StepBatchSampler(
            recipe.num_train_items, options.batch_size, args.seed, accelerator.process_index, accelerator.num_processes
        )
        steps_per_epoch = max(1, sampler.batches_per_epoch // accumulation)
        if max_steps is None:
            max_steps = recipe.default_max_steps(steps_per_epoch)
        val_every = options.val_every or steps_per_epoch
        progress = _progress(max_steps, state["step"], recipe.progress_name, run.show_progress)
        batches = _micro_batches(recipe, model, sampler, state["step"] * accumulation, log)
        while state["step"] < max_steps:
            step = state["step"]
            logged: dict[str, list[float]] = {}
            prepared.train()
            for micro_index in range(accumulation):
                micro, batch = next(batches)
                torch.manual_seed(step_seed(args.seed, micro, accelerator.process_index))
                sync = micro_index == accumulation - 1
                context = contextlib.nullcontext() if sync else accelerator.no_sync(prepared)
                with context:
                    output = recipe.training_step(prepared, send_to_device(batch, accelerator.device))
                    loss = output.loss if accumulation == 1 else output.loss / accumulation
                    if micro_index == 0:
                        optimizer.zero_grad(set_to_none=True)  # (after the forward, as the released codes do)
                    accelerator.backward(loss)
                for name, value in {"loss": output.loss, **output.logs}.items():
                    logged.setdefault(name, []).append(value)
            if args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(prepared.parameters(), args.max_grad_norm)
            recipe.before_optimizer_step(model, optimizer, step)
            optimizer.step()
            recipe.after_optimizer_step(model, step)
            state["step"] = step = step + 1
            progress.update(1)

            if step % args.log_every == 0 or step == max_steps:
                values = _reduce(logged, accelerator)
                if not math.isfinite(values["train/loss"]):
                    loss = values["train/loss"]
                    raise FloatingPointError(
                        f"the training loss became {loss} at step {step}; the last checkpoint is intact"
                    )
                log(values, step)
                recipe.on_log(values, step)
                progress.set_postfix(loss=f"{values['train/loss']:.4f}")
            if has_val and step % val_every == 0:
                _validate(model, recipe, state, step, log)
            if step % args.save_every == 0 or step == max_steps:
                state["metrics_lines"] = log.lines
                save_checkpoint(accelerator, output_dir, dict(state), args.keep_checkpoints)
        progress.close()

    # finalize, evaluate, save
    model.eval()
    summary: dict[str, Any] = {
        "method": args.method,
        "backbone": backbone_description,
        "dataset": "generated synthetic scenes (not real data)" if args.dataset == "synthetic" else args.dataset,
    }
    if not recipe.label_free:
        summary["num_classes"] = num_classes
    finalized = recipe.finalize(model)
    model.eval()
    summary.update(steps=state["step"], train_seconds=round(time.time() - start_time, 1), **finalized)
    if accelerator.is_main_process:
        _write_training_curves(output_dir, f"{args.method} ({output_dir.name})")
    if recipe.label_free:  # nothing to evaluate: `finalize` saved the result
        _end(accelerator, prepared, optimizer)
        return summary

    evaluation = recipe.evaluate(model, final=True) if has_val else None
    if evaluation is not None:
        summary.update(evaluation.values)
        summary.update(evaluation.summary)
        summary.update(recipe.extra_evaluation(model))
    if accelerator.is_main_process:
        card = recipe.model_card(model, summary, evaluation)
        extra = {"training_summary.json": json.dumps(summary, indent=2), "README.md": card}
        recipe.save_model(model, output_dir / "model", extra, evaluation)
    _end(accelerator, prepared, optimizer)
    summary["model_dir"] = str(output_dir / "model")
    return summary


def _write_training_curves(output_dir: Path, title: str) -> None:
    """``training_curves.png`` from ``metrics.jsonl`` (loss and validation against steps); skipped, with a note,
    without matplotlib."""
    metrics = output_dir / "metrics.jsonl"
    if not metrics.exists() or not metrics.read_text().strip():
        return
    try:
        from ..visualization import plot_training_curves

        figure = plot_training_curves(metrics, title=title)
        with atomic_file(output_dir / "training_curves.png") as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    except ImportError:
        logger.warning("training_curves.png not written: matplotlib is not installed (pip install matplotlib)")


# The distributed objects of finished multi-process runs (see `_end`).
_FINISHED_DISTRIBUTED_RUNS: list[tuple] = []


def _end(accelerator, *prepared) -> None:
    """End the trackers; in a multi-process run, keep the prepared (DDP) objects alive.

    Freed when `train` returns, the DDP reducer's destructor joins gloo's worker threads while holding the GIL,
    and a worker still freeing the last collective's tensors waits for that GIL: a deadlock seen at the end of
    2-process CPU runs (the rank never exits; `torch.distributed.destroy_process_group` does not prevent it).
    Kept here, they are never destroyed before the process ends; `training/train.py` ends multi-process runs
    with `os._exit` once everything is written."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        _FINISHED_DISTRIBUTED_RUNS.append((accelerator, *prepared))


def _progress(total: int, initial: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, disable=not enabled)


def _reduce(logged: dict[str, list], accelerator) -> dict[str, float]:
    """Mean over the micro-batches of a step and over processes, as ``train/<name>`` floats."""
    names = list(logged)
    means = torch.stack(
        [
            torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in logged[n]]).mean()
            for n in names
        ]
    )
    if accelerator.num_processes > 1:
        means = accelerator.reduce(means.to(accelerator.device), reduction="mean").cpu()
    return {f"train/{name}": float(value) for name, value in zip(names, means)}
