#!/usr/bin/env python
"""Throughput and memory of PiCIE's streaming (mini-batch) k-means (`StreamingKMeans`: k-means on the first
batches, then one `minibatch_kmeans_update` per batch) on random unit vectors.

    python benchmarks/bench_minibatch_kmeans.py                               # small CPU run
    python benchmarks/bench_minibatch_kmeans.py --device cuda --batch-vectors 1638400 --batches 60
        # COCO scale: 256 images x 80 x 80 pixels per batch, 128 channels

Prints vectors per second for the initialisation and for the online updates, and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from hf_useg.models.picie.training_picie import StreamingKMeans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=27)
    parser.add_argument("--batch-vectors", type=int, default=20_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--init-batches", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)

    def batch() -> torch.Tensor:
        return F.normalize(torch.randn(args.batch_vectors, args.dim, device=device, generator=generator), dim=1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stream = StreamingKMeans(args.clusters, init_batches=args.init_batches, num_iterations=args.iterations, seed=0)
    sync()
    start = time.perf_counter()
    for _ in range(args.init_batches):
        stream.partial_fit(batch())
    sync()
    init_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.batches - args.init_batches):
        stream.partial_fit(batch())
    sync()
    update_seconds = time.perf_counter() - start
    updates = max(args.batches - args.init_batches, 0) * args.batch_vectors
    result = {
        "device": str(device),
        "vectors_per_batch": args.batch_vectors,
        "init_vectors_per_s": round(args.init_batches * args.batch_vectors / init_seconds),
        "update_vectors_per_s": round(updates / update_seconds) if updates else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "counts_total": float(stream.counts.sum()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
