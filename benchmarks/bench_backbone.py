"""Forward time of `FeatureBackbone` against the bare `ViTModel` it wraps (random DINO ViT-S/8 weights).

Shows what the wrapper costs: DINO's position-embedding interpolation (a bicubic resize of the position table
on every call off the 224 grid) and ``output_cls_attention=True`` (eager attention for that call instead of
SDPA). Also prints the largest feature difference between the "dino" and "transformers" interpolations at
each size (METHODS 0.1: zero at 224, about 1e-2 at 320 on real DINO weights; random weights differ in
scale). Not a test: prints a table.

    python benchmarks/bench_backbone.py                            # CPU, depth 12, batch 1
    python benchmarks/bench_backbone.py --device cuda --batch-size 16 --sizes 224 320 448
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from hf_useg.backbones import FeatureBackbone, dino_vit_config


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="vit_small", choices=["vit_tiny", "vit_small", "vit_base"])
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = dino_vit_config(args.arch, patch_size=args.patch_size, num_hidden_layers=args.depth)
    dino = FeatureBackbone(config, pos_embed_interpolation="dino", frozen=True).to(args.device)
    hf = FeatureBackbone(config, pos_embed_interpolation="transformers", frozen=True).to(args.device)
    hf.load_state_dict(dino.state_dict())
    bare = hf.model  # the plain ViTModel

    on_cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu"
    print(f"{args.arch}/{args.patch_size} depth {args.depth}, batch {args.batch_size}, {args.device} ({machine})")
    print(f"{'size':>6} {'ViTModel ms':>12} {'dino ms':>9} {'+cls attn ms':>13} {'max |dino - hf|':>16}")
    for size in args.sizes:
        pixels = torch.randn(args.batch_size, 3, size, size, device=args.device)
        with torch.no_grad():
            t_bare = timed(lambda x=pixels: bare(x, interpolate_pos_encoding=True), args.repeats, args.device)
            t_dino = timed(lambda x=pixels: dino(x), args.repeats, args.device)
            t_attn = timed(lambda x=pixels: dino(x, output_cls_attention=True), args.repeats, args.device)
            difference = (dino(pixels).feature_map - hf(pixels).feature_map).abs().max().item()
        print(f"{size:>6} {t_bare:>12.1f} {t_dino:>9.1f} {t_attn:>13.1f} {difference:>16.2e}")


if __name__ == "__main__":
    main()
