"""STEGO training-step time: the released code's way (frozen backbone re-run on both images every step) against
hf_useg's cached backbone features (`cache_backbone_features: true`), same model, same batch, same draws.

    python benchmarks/bench_stego_step.py [--device cuda] [--depth 12] [--batch-size 8] [--steps 5]

Prints a table (ms per step, peak memory on CUDA) and the ratio. Uses a randomly initialised DINO ViT-S/8
shape (no download); only the backbone's cost depends on its weights' values, not on being pretrained.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation
from hf_useg.backbones import dino_vit_config


def _time(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=4, help="ViT-S/8 blocks (12 = the real ViT-S/8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = StegoConfig.for_dataset(
        "potsdam3", backbone_config=dino_vit_config("vit_small", 8, num_hidden_layers=args.depth)
    )
    model = StegoForUnsupervisedSegmentation(config).to(device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    images = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    partners = torch.randn_like(images)
    labels = torch.randint(0, 3, (args.batch_size, args.resolution, args.resolution), device=device)
    with torch.no_grad():
        features, features_pos = model.extract_features(images), model.extract_features(partners)

    def step(**inputs) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(labels=labels, **inputs).loss.backward()
        optimizer.step()

    rows = []
    for name, inputs in (
        ("backbone every step (released STEGO)", {"pixel_values": images, "pixel_values_pos": partners}),
        ("cached backbone features (hf_useg)", {"backbone_features": features, "backbone_features_pos": features_pos}),
    ):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        milliseconds = _time(lambda inputs=inputs: step(**inputs), args.steps, device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        rows.append((name, milliseconds, peak))
    print(
        f"device {device}, ViT-S/8 depth {args.depth}, batch {args.batch_size}, {args.resolution}px, "
        f"{args.steps} timed steps"
    )
    print(f"{'method':<40}{'ms/step':>12}{'peak MiB':>12}")
    for name, milliseconds, peak in rows:
        print(f"{name:<40}{milliseconds:>12.1f}{peak:>12.1f}")
    print(f"speed-up of the cached path: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
