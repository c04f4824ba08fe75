"""Images/s of the evaluation `predict` path (frozen DINO ViT backbone + STEGO head + probes, output at the input
size) in the released code's way against this package's, and against the compute floor of the device.

* **released**: float32, eager attention, the flipped image in a second forward (STEGO's release evaluates this
  way), at batch 1 (``released_b1``) and at the same batch size as ours (``released``);
* **ours**: `model.predict` as `hf-useg evaluate` runs it: batched, SDPA attention, the backbone under autocast
  (bfloat16 on CUDA; float32 on the CPU, plus a bfloat16 row to show whether the CPU gains from it);
* **floor**: forward FLOPs of the path (counted by `torch.utils.flop_counter` on the meta device: patch embedding,
  every matmul of attention and MLP, head and probes) / the matmul rate measured in the same run (bfloat16 on CUDA,
  float32 on the CPU): the images/s a device doing nothing but dense matmuls at that rate would reach.

Random weights built from the DINO configs (no Hub access). Inputs are already on the device: this measures the
model, not JPEG decoding (`hf-useg evaluate --num-workers` overlaps that). ``agree`` is the fraction of pixels
whose cluster argmax matches the released way's (float32, eager) on the same images.

    python benchmarks/bench_inference.py                        # CPU: ViT-S/8 at 160x160, batch 2 (~1 min)
    python benchmarks/bench_inference.py --full                 # CPU: ViT-S/8 and ViT-B/8 at 320x320 (slow)
    python benchmarks/bench_inference.py --device cuda          # ViT-S/8 and ViT-B/8 at 320x320, batch 32
    python benchmarks/bench_inference.py --small --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hf_useg.backbones import dino_vit_config
from hf_useg.models.stego import StegoConfig, StegoForUnsupervisedSegmentation

ARCH_NAMES = {"vit_small": "ViT-S/8", "vit_base": "ViT-B/8"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(
    fn: Callable[[], object], device: torch.device, min_seconds: float, min_repeats: int
) -> tuple[float, object]:
    """Mean wall time of ``fn`` after one warm-up call (at least ``min_repeats`` calls and ``min_seconds``), and
    the last call's result."""
    fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(max(1, min_repeats if calls == 0 else calls)):
            result = fn()
            calls += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls, result


def matmul_rate(device: torch.device, size: int, min_seconds: float) -> float:
    """Measured FLOP/s of a square matmul: bfloat16 on CUDA, float32 elsewhere."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = seconds_per_call(lambda: torch.mm(a, b), device, min_seconds, min_repeats=3)
    return 2 * size**3 / seconds


def vit_forward_flops(config, height: int, width: int) -> int:
    """Analytic forward FLOPs of one image through a ViT (multiply-add = 2): patch embedding, and per layer the
    QKV/output projections, the two MLP matmuls and the two attention products (QK^T, AV) over N tokens."""
    patch, d, m = config.patch_size, config.hidden_size, config.intermediate_size
    patches = (height // patch) * (width // patch)
    tokens = patches + 1
    per_layer = 2 * tokens * (4 * d * d + 2 * d * m) + 4 * tokens * tokens * d
    return 2 * patches * (config.num_channels * patch * patch) * d + config.num_hidden_layers * per_layer


def predict_path_flops(config: StegoConfig, size: int, flip_tta: bool) -> int:
    """FLOPs per image of `predict` (backbone, head, upsampling, probes), counted on the meta device."""
    with torch.device("meta"):
        model = StegoForUnsupervisedSegmentation(config).eval()
        pixels = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model.predict(pixels, flip_tta=flip_tta)
    return int(counter.get_total_flops())


@torch.no_grad()
def released_predict(model, pixel_values: torch.Tensor, flip_tta: bool) -> torch.Tensor:
    """STEGO's release: code(x) and code(flip(x)) in two forwards, averaged, upsampled, cluster probe."""
    code = model.compute_code(pixel_values)
    if flip_tta:
        code = (code + model.compute_code(pixel_values.flip(-1)).flip(-1)) / 2
    code = F.interpolate(code, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    return model.probe_log_probs(code)[0]


def run_way(
    model, pixels: torch.Tensor, flip_tta: bool, way: str, dtype: torch.dtype | None, batch: int
) -> torch.Tensor:
    """Cluster log-probabilities of ``pixels`` the ``way`` a row measures, ``batch`` images per call."""
    if way.startswith("released"):
        return torch.cat(
            [released_predict(model, pixels[i : i + batch], flip_tta) for i in range(0, len(pixels), batch)]
        )
    return model.predict(pixels, flip_tta=flip_tta, autocast_dtype=dtype or torch.float32).cluster_log_probs


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--small", action="store_true", help="CI size: a 2-layer ViT-S/8 at 64x64, seconds")
    parser.add_argument("--full", action="store_true", help="on the CPU too: ViT-S/8 and ViT-B/8 at 320x320")
    parser.add_argument("--archs", nargs="+", choices=sorted(ARCH_NAMES), default=None)
    parser.add_argument("--size", type=int, default=None, help="image side (default: 320 on CUDA, 160 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 2 on the CPU")
    parser.add_argument("--depth", type=int, default=None, help="ViT layers (default: 12, 2 with --small)")
    parser.add_argument("--min-seconds", type=float, default=None, help="time each row at least this long")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    large = cuda or args.full
    archs = args.archs or (["vit_small"] if args.small or not large else ["vit_small", "vit_base"])
    size = args.size or (64 if args.small else 320 if large else 160)
    batch_size = args.batch_size or (2 if args.small or not cuda else 32)
    depth = args.depth or (2 if args.small else 12)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.small else 2.0 if cuda else 1.0)
    for name, value in (("--size", size), ("--batch-size", batch_size), ("--depth", depth)):
        if value < 1:
            raise SystemExit(f"{name} must be at least 1, got {value}")
    if size % 8:
        raise SystemExit(f"--size must be a multiple of the patch size 8, got {size}")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (PyTorch's default, made explicit)
        torch.backends.cudnn.allow_tf32 = False

    rate = matmul_rate(device, 256 if args.small else 8192 if cuda else 2048, min(min_seconds, 1.0))
    rate_dtype = "bfloat16" if cuda else "float32"
    print(f"device {device_description(device)}; {rate_dtype} matmul rate {rate / 1e12:.2f} TFLOP/s")
    print(f"{size}x{size} images, batch {batch_size}, depth {depth}, output at the input size, 27 classes")
    fast_dtype = torch.bfloat16 if cuda else None
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        vit = dino_vit_config(arch, patch_size=8, num_hidden_layers=depth)
        config = StegoConfig(backbone_config=vit, dim=70 if arch == "vit_small" else 90, num_classes=27)
        model = StegoForUnsupervisedSegmentation(config).to(device).eval()
        attention = model.backbone.model
        pixels = torch.randn(batch_size, 3, size, size, device=device)
        print(f"\n{ARCH_NAMES[arch]} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
              f"backbone {vit_forward_flops(vit, size, size) / 1e9:.1f} GFLOP/image (analytic)")  # fmt: skip
        header = (
            f"{'flip':>5} {'way':>12} {'batch':>5} {'attn':>5} {'dtype':>8} {'img/s':>9} {'x b1':>6} {'x same':>6} "
            f"{'floor img/s':>11} {'% floor':>7} {'agree':>6} {'peak MB':>8}"
        )
        print(header)
        print("-" * len(header))
        for flip_tta in (False, True):
            flops = predict_path_flops(config, size, flip_tta)
            floor = rate / flops
            attention.set_attn_implementation("eager")
            reference = released_predict(model, pixels, flip_tta).argmax(1)
            ways = [
                ("released_b1", "eager", None, 1),
                ("released", "eager", None, batch_size),
                ("ours", "sdpa", fast_dtype, batch_size),
            ]
            if not cuda:
                ways.append(("ours_bf16", "sdpa", torch.bfloat16, batch_size))
            speeds = {}
            for way, implementation, dtype, batch in ways:
                attention.set_attn_implementation(implementation)
                run = functools.partial(run_way, model, pixels, flip_tta, way, dtype, batch)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                seconds, log_probs = seconds_per_call(run, device, min_seconds, min_repeats=3 if cuda else 1)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
                agreement = float((log_probs.argmax(1) == reference).float().mean())
                speed = batch_size / seconds
                speeds[way] = speed
                row = {
                    "arch": ARCH_NAMES[arch],
                    "depth": depth,
                    "size": size,
                    "flip_tta": flip_tta,
                    "way": way,
                    "batch_size": batch,
                    "attention": implementation,
                    "dtype": "float32" if dtype is None else str(dtype).removeprefix("torch."),
                    "images_per_s": speed,
                    "speedup_vs_released_b1": speed / speeds["released_b1"],
                    "speedup_vs_released": speed / speeds["released"] if "released" in speeds else None,
                    "flops_per_image": flops,
                    "matmul_flops_per_s": rate,
                    "matmul_dtype": rate_dtype,
                    "floor_images_per_s": floor,
                    "percent_of_floor": 100 * speed / floor,
                    "argmax_agreement": agreement,
                    "peak_memory_mb": peak,
                }
                rows.append(row)
                same = f"{row['speedup_vs_released']:>6.2f}" if row["speedup_vs_released"] is not None else f"{'-':>6}"
                print(
                    f"{'on' if flip_tta else 'off':>5} {way:>12} {batch:>5} {implementation:>5} {row['dtype']:>8} "
                    f"{speed:>9.2f} {row['speedup_vs_released_b1']:>6.2f} {same} {floor:>11.1f} "
                    f"{row['percent_of_floor']:>6.1f}% {agreement:>6.3f} {'-' if peak is None else f'{peak:.0f}':>8}"
                )
        del model, pixels
        if cuda:
            torch.cuda.empty_cache()
    print(
        "\nx b1 / x same: images/s over the released way's at batch 1 / at the same batch; floor: predict FLOPs / "
        f"the {rate_dtype} matmul rate"
    )
    if args.json:
        record = {
            "benchmark": "inference",
            "device": device_description(device),
            "config": {
                "archs": [ARCH_NAMES[arch] for arch in archs],
                "size": size,
                "batch_size": batch_size,
                "depth": depth,
                "min_seconds": min_seconds,
                "threads": torch.get_num_threads(),
                "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "torch": torch.__version__,
            },
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=2))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
