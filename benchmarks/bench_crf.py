"""Dense CRF throughput: `dense_crf_batch` serially vs. in a pool of worker processes.

Runs STEGO's CRF (METHODS 0.7: 10 mean-field iterations, Gaussian sxy 1 / compat 3, bilateral sxy 67 /
srgb 3 / compat 4) on synthetic images (smooth colour gradients with a few flat shapes, like a photo's
regions) with logits at ViT-8 patch resolution, and prints a time table. The pool's one-off start (a
forkserver importing torch) is timed separately from its steady state, since `dense_crf_batch` keeps its
workers for later calls. Every pooled result is checked to equal the serial one exactly.

    python benchmarks/bench_crf.py                          # 16 images 320x320, K=27, workers 0 and 2
    python benchmarks/bench_crf.py --num-images 64 --workers 0 4 8 16
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from hf_useg.crf import dense_crf_batch, shutdown_crf_workers


def synthetic_batch(num_images: int, size: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(num_images):
        a, b, c = rng.uniform(40, 215, 3)
        image = np.stack([a + 40 * xx, b + 40 * yy, c + 40 * (xx - yy)], axis=-1)
        for _ in range(4):  # flat rectangles
            top, left = rng.integers(0, size // 2, 2)
            height, width = rng.integers(size // 8, size // 2, 2)
            image[top : top + height, left : left + width] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 2, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    grid = max(2, size // 8)
    logits = torch.from_numpy(rng.normal(0, 2, (num_images, num_classes, grid, grid)).astype(np.float32))
    return np.stack(images), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--num-classes", type=int, default=27)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--chunksize", type=int, default=None)
    args = parser.parse_args()

    images, logits = synthetic_batch(args.num_images, args.size, args.num_classes)
    print(
        f"dense CRF: {args.num_images} images {args.size}x{args.size}, K={args.num_classes}, logits "
        f"{tuple(logits.shape[-2:])}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rows, reference, serial_time = [], None, None
    for num_workers in args.workers:
        start_up = 0.0
        if num_workers > 0:  # start the pool (kept for reuse) on a single tiny image
            t0 = time.perf_counter()
            dense_crf_batch(images[:1, :16, :16], logits[:1], num_workers=num_workers)
            start_up = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = dense_crf_batch(images, logits, num_workers=num_workers, chunksize=args.chunksize)
        elapsed = time.perf_counter() - t0
        if reference is None:
            reference = q
        exact = torch.equal(q, reference)
        if num_workers == 0:
            serial_time = elapsed
        speedup = f"{serial_time / elapsed:.2f}x" if serial_time else "-"
        rows.append((num_workers, elapsed, elapsed / args.num_images, speedup, start_up, exact))
    shutdown_crf_workers()

    header = ("workers", "total s", "s/image", "vs serial", "pool start s", "== first row")
    print(f"{header[0]:>8} {header[1]:>9} {header[2]:>9} {header[3]:>10} {header[4]:>13} {header[5]:>13}")
    for num_workers, elapsed, per_image, speedup, start_up, exact in rows:
        start = f"{start_up:.2f}" if num_workers else "-"
        print(f"{num_workers:>8} {elapsed:>9.2f} {per_image:>9.3f} {speedup:>10} {start:>13} {exact!s:>13}")


if __name__ == "__main__":
    main()
