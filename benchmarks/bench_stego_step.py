"""STEGO training steps per second: the released code's way against this package's default path, same model,
same pairs, same draws, with the two loss curves side by side.

* **released**: the frozen backbone in float32 with eager attention, re-run on both images of every step (what
  STEGO's code does);
* **recompute**: this package with ``cache_backbone_features: false``: the backbone on both images of every step,
  under autocast (bfloat16 on CUDA; float32 on the CPU, where ``backbone_dtype: auto`` keeps it) with SDPA
  attention;
* **default**: this package's default: the backbone runs once over the training items (autocast, DataLoader
  workers) into a float16 memory-mapped file on disk (`FeatureCache`), and each step reads its maps from there in
  the DataLoader workers (`StegoPairCollator`) and runs only the head, the loss and the probes.

Every path starts from the same weights and trains for the same steps on the same kNN pairs, each step seeded as
the training loop seeds it: the loss curves differ only by the backbone's precision (and the float16 rounding of
the cache), reported as max |dloss|. Steps/s excludes the first ``--warmup`` steps (worker start-up); peak memory is
CUDA's ``max_memory_allocated`` over the timed steps (the CPU has no per-path figure). The cache is written once
before the timed steps: its time and size are reported with the step count after which it has paid for itself.
The timed reads come from the page cache (the set fits in RAM here); a COCO-scale cache (~300 GB) reads from disk.

Randomly initialised DINO ViT shapes (no download) on synthetic images: the cost does not depend on the weights.

    python benchmarks/bench_stego_step.py                    # CPU: ViT-S/8 with 2 blocks at 112 px, batch 8 (< 1 min)
    python benchmarks/bench_stego_step.py --small            # CI size (seconds)
    python benchmarks/bench_stego_step.py --device cuda      # ViT-S/8 at 224 px, batch 32 (STEGO's configs)
    python benchmarks/bench_stego_step.py --device cuda --arch vit_base --json stego_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hf_useg.backbones import dino_vit_config
from hf_useg.data import nearest_neighbors
from hf_useg.models.stego import StegoConfig, StegoForUnsupervisedSegmentation
from hf_useg.models.stego.training_stego import (
    StegoPairCollator,
    StegoPairs,
    compute_feature_cache,
    frozen_backbone_features,
    resolve_backbone_dtype,
)
from hf_useg.training.recipe import StepBatchSampler, step_seed

ARCH_NAMES = {"vit_small": "ViT-S/8", "vit_base": "ViT-B/8"}
NUM_CLASSES = 27
SEED = 0


class SyntheticItems(Dataset):
    """Deterministic smooth random images ``[3, H, W]`` (ImageNet-normalised range) and labels ``[H, W]``, made
    from their index in the DataLoader worker that asks for them (the released code decodes JPEGs there)."""

    def __init__(self, num_items: int, resolution: int):
        self.num_items, self.resolution, self.num_classes = num_items, resolution, NUM_CLASSES

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 + int(index))
        size = (self.resolution, self.resolution)
        coarse = torch.randn(1, 3, 8, 8, generator=generator)
        image = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
        regions = torch.randn(1, NUM_CLASSES, 4, 4, generator=generator)
        labels = F.interpolate(regions, size=size, mode="nearest")[0].argmax(0)
        return {"pixel_values": image, "labels": labels}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_steps(model, optimizer, items, knn, cache, args, device, autocast_dtype) -> dict:
    """``args.steps`` training steps as `StegoRecipe.training_step` runs them, through a real DataLoader over the
    loop's `StepBatchSampler`. Returns the loss curve, steps/s over the steps after the warm-up, peak memory."""
    sampler = StepBatchSampler(len(items), args.batch_size, SEED)
    loader = DataLoader(
        StegoPairs(items, knn, num_neighbors=7, cache=cache),
        batch_sampler=sampler,
        collate_fn=StegoPairCollator(cache),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    losses, start = [], None
    model.train()
    for step, batch in enumerate(loader):
        if step == args.warmup:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        if step == args.steps:
            break
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        torch.manual_seed(step_seed(SEED, step, 0))  # the loop's seeding: same draws on every path
        if "backbone_features" in batch:
            batch["backbone_features"] = batch["backbone_features"].float()
            batch["backbone_features_pos"] = batch["backbone_features_pos"].float()
        elif autocast_dtype is not None:
            batch["backbone_features"] = frozen_backbone_features(model, batch.pop("pixel_values"), autocast_dtype)
            batch["backbone_features_pos"] = frozen_backbone_features(
                model, batch.pop("pixel_values_pos"), autocast_dtype
            )
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    synchronize(device)
    seconds = time.perf_counter() - start
    timed = args.steps - args.warmup
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"losses": [float(value) for value in losses], "steps_per_s": timed / seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=tuple(ARCH_NAMES), default="vit_small")
    parser.add_argument("--depth", type=int, help="ViT blocks (default: 12 on CUDA, 2 on the CPU)")
    parser.add_argument("--resolution", type=int, help="training crop (default: 224 on CUDA, 112 on the CPU)")
    parser.add_argument("--batch-size", type=int, help="default: 32 on CUDA (STEGO's), 8 on the CPU")
    parser.add_argument("--steps", type=int, help="steps per path, warm-up included (default: 40 CUDA, 8 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default: 5 CUDA, 2 CPU)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: 8 CUDA, 1 CPU)")
    parser.add_argument("--items", type=int, help="training items (default: enough for the steps in one epoch)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cache-dir", type=Path, help="where to write the feature cache (default: a temp folder)")
    parser.add_argument("--small", action="store_true", help="CI size: 1 block, 64 px, batch 4, 4 steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        defaults = dict(depth=12, resolution=224, batch_size=32, steps=40, warmup=5, workers=8)
    else:
        defaults = dict(depth=2, resolution=112, batch_size=8, steps=8, warmup=2, workers=1)
    if args.small:
        defaults = dict(depth=1, resolution=64, batch_size=4, steps=4, warmup=1, workers=0)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")
    num_items = max(args.items or 0, args.batch_size * args.steps)  # one epoch covers the steps

    torch.manual_seed(SEED)
    backbone = dino_vit_config(args.arch, 8, num_hidden_layers=args.depth)
    config = StegoConfig.for_dataset("cocostuff27", backbone_config=backbone, num_classes=NUM_CLASSES)
    initial = StegoForUnsupervisedSegmentation(config).to(device)
    items = SyntheticItems(num_items, args.resolution)
    autocast_dtype = resolve_backbone_dtype("auto", device)
    arch = f"{ARCH_NAMES[args.arch]}{'' if args.depth == 12 else f' ({args.depth} blocks)'}"
    print(
        f"STEGO step, {device_name(device)}: {arch} at {args.resolution} px, batch {args.batch_size}, "
        f"{num_items} items, {args.steps} steps per path ({args.warmup} untimed), {args.workers} DataLoader workers; "
        f"load average {os.getloadavg()[0]:.2f}"
    )

    # the default path's one backbone pass: the float16 memory-mapped cache, then the kNN table from its
    # descriptors (every path trains on these pairs)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as root:
        synchronize(device)
        start = time.perf_counter()
        cache = compute_feature_cache(
            initial,
            items,
            batch_size=args.batch_size,
            device=device,
            progress=False,
            directory=Path(root) / "features",
            backbone_dtype=autocast_dtype,
            num_workers=args.workers,
        )
        synchronize(device)
        fill_seconds = time.perf_counter() - start
        cache_bytes = sum(path.stat().st_size for path in (Path(root) / "features").iterdir())
        start = time.perf_counter()
        knn = nearest_neighbors(cache.descriptors, min(30, num_items), device=device)
        knn_seconds = time.perf_counter() - start

        state = copy.deepcopy(initial.state_dict())
        results = {}
        for name in ("released", "recompute", "default"):
            model = copy.deepcopy(initial)
            model.load_state_dict(state)
            if name == "released":
                model.backbone.model.set_attn_implementation("eager")
            optimizer = torch.optim.Adam(
                [
                    {"params": list(model.segmentation_head.parameters()), "lr": 5e-4},
                    {"params": [*model.cluster_probe.parameters(), *model.linear_probe.parameters()], "lr": 5e-3},
                ]
            )
            dtype = None if name == "released" else autocast_dtype
            results[name] = run_steps(
                model, optimizer, items, knn, cache if name == "default" else None, args, device, dtype
            )
            del model, optimizer
            if cuda:
                torch.cuda.empty_cache()
        del cache

    released = results["released"]
    labels = {
        "released": "released: fp32, eager, backbone every step",
        "recompute": f"recompute: {'bf16 autocast' if autocast_dtype else 'fp32'}, SDPA, backbone every step",
        "default": f"default: fp16 memmap cache, workers: {args.workers}",
    }
    rows = []
    print(f"{'path':<52}{'steps/s':>9}{'speed-up':>10}{'peak MiB':>10}{'max |dloss|':>13}")
    for name, result in results.items():
        delta = max(abs(a - b) for a, b in zip(result["losses"], released["losses"]))
        speedup = result["steps_per_s"] / released["steps_per_s"]
        rows.append(
            {
                "path": name,
                "description": labels[name],
                "steps_per_s": result["steps_per_s"],
                "speedup_vs_released": speedup,
                "peak_memory_mib": None if math.isnan(result["peak_mib"]) else result["peak_mib"],
                "max_abs_loss_difference_vs_released": delta,
                "losses": result["losses"],
            }
        )
        print(
            f"{labels[name]:<52}{result['steps_per_s']:>9.2f}{speedup:>9.2f}x{result['peak_mib']:>10.0f}{delta:>13.2e}"
        )
    per_step_saving = 1 / released["steps_per_s"] - 1 / results["default"]["steps_per_s"]
    break_even = fill_seconds / per_step_saving if per_step_saving > 0 else float("inf")
    print(
        f"feature cache: {num_items} items in {fill_seconds:.2f} s ({num_items / fill_seconds:.1f} items/s), "
        f"{cache_bytes / 2**20:.1f} MiB on disk; pays for itself after {break_even:.0f} steps "
        f"(STEGO trains 7000); kNN table: {knn_seconds:.2f} s"
    )
    coco_items = 49_629 * 5
    coco_minutes = coco_items / (num_items / fill_seconds) / 60
    coco_gib = cache_bytes / num_items * coco_items / 2**30
    print(
        f"at COCO-Stuff-27 scale ({coco_items:,} five-crop items) this rate caches in {coco_minutes:.1f} min, "
        f"{coco_gib:.0f} GiB"
    )
    print("loss curves (step: released / recompute / default):")
    for step in range(args.steps):
        values = " / ".join(f"{results[name]['losses'][step]:.6f}" for name in results)
        print(f"  {step:>3}: {values}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        report = {
            "benchmark": "stego_step",
            "device": device_name(device),
            "config": {
                "arch": args.arch,
                "depth": args.depth,
                "resolution": args.resolution,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "workers": args.workers,
                "items": num_items,
                "backbone_autocast": str(autocast_dtype),
                "cache_fill_seconds": fill_seconds,
                "cache_bytes": cache_bytes,
                "cache_break_even_steps": break_even,
                "knn_seconds": knn_seconds,
            },
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
