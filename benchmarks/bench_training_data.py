"""Training-data throughput: batches built in the main process (the previous way for STEGO and IIC, where
``num_workers`` was ignored) against the recipes' DataLoader with worker processes, while the main process is
busy with a training step (simulated by a sleep, as when a GPU computes and the CPU is free).

    python benchmarks/bench_training_data.py [--data ../shared/data/camvid11] [--step-ms 60] [--batches 12]

Prints a table: seconds for the same batches with ``num_workers`` 0 and N, per method, and the ratio. The batches
are identical in both columns (the recipes draw every random choice from the step's seed).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from hf_useg.registry import get_method
from hf_useg.training import (
    StepBatchSampler,
    TrainingRun,
    load_splits,
    load_training_arguments,
    resolve_recipe_options,
)
from hf_useg.training.data import build_model
from hf_useg.training.data import protocol_processor as processor_for

SHARED_CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid11"


class _CPU:
    num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass

    def print(self, *args) -> None:
        pass


def _recipe(method: str, data: str, workers: int, resolution: int, extra: dict):
    args = load_training_arguments(
        None,
        method=method,
        dataset=data,
        num_classes=11 if data != "synthetic" else None,
        backbone="none" if method == "iic" else "random-vit-tiny",
        resolution=resolution,
        eval_resolution=resolution,
        num_workers=workers,
        output_dir="outputs/bench-training-data",
        progress=False,
        synthetic_num_images=64,
        synthetic_image_size=resolution,
        **extra,
    )
    recipe = get_method(method).load_recipe_class()(args, resolve_recipe_options(args))
    train_set, val_set, num_classes, class_names = load_splits(args)
    model, _ = build_model(args, recipe, num_classes)
    patch = model.backbone.patch_size if hasattr(model, "backbone") else 1
    run = TrainingRun(
        args=args,
        accelerator=_CPU(),
        train_set=train_set,
        val_set=val_set,
        num_classes=num_classes,
        class_names=class_names,
        train_processor=processor_for(resolution, patch),
        eval_processor=processor_for(resolution, patch),
    )
    recipe.setup(model, run)
    return recipe


def _epoch_seconds(recipe, batches: int, step_ms: float) -> float:
    sampler = StepBatchSampler(recipe.num_train_items, recipe.options.batch_size, seed=0)
    loader = recipe.train_dataloader(sampler)
    start = time.perf_counter()
    for index, _ in enumerate(loader):
        time.sleep(step_ms / 1000)  # the training step: the CPU is free while an accelerator computes
        if index + 1 == batches:
            break
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_CAMVID) if SHARED_CAMVID.exists() else "synthetic")
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    parser.add_argument("--step-ms", type=float, default=60.0, help="simulated training step (accelerator time)")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {
        "stego (image pairs)": ("stego", {"batch_size": 8, "five_crop": False, "knn_cache_dir": None}),
        "iic (jittered view pairs)": ("iic", {"batch_size": 8}),
    }
    print(f"data: {args.data}, {args.resolution} px, {args.batches} batches, step {args.step_ms:.0f} ms")
    print(f"{'method':<28}{'main process (s)':>18}{f'{args.workers} workers (s)':>16}{'speed-up':>10}")
    for name, (method, extra) in cases.items():
        seconds = []
        for workers in (0, args.workers):
            recipe = _recipe(method, args.data, workers, args.resolution, extra)
            seconds.append(_epoch_seconds(recipe, args.batches, args.step_ms))
        print(f"{name:<28}{seconds[0]:>18.2f}{seconds[1]:>16.2f}{seconds[0] / seconds[1]:>9.2f}x")


if __name__ == "__main__":
    main()
