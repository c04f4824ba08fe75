"""Chunked kNN (`hf_useg.data.nearest_neighbors`) against the full-matrix ``topk`` it replaces.

STEGO keeps the top-30 cosine neighbours of every training item (METHODS 0.6). The naive way builds the whole
``N x N`` similarity matrix; `nearest_neighbors` builds ``chunk_size x N`` at a time. Each method runs in its
own fresh process so that peak memory (``ru_maxrss`` on the CPU, ``max_memory_allocated`` on CUDA) is its
own. Prints a table of time and peak extra memory, with ratios, and how many rows agree.

    python benchmarks/bench_knn.py                       # 20k x 384, k=30, chunk 1024, CPU
    python benchmarks/bench_knn.py --num 50000 --device cuda
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np


def _descriptors(num: int, dim: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    # clustered descriptors, like real image features: 200 centres plus noise
    centres = torch.randn(200, dim, generator=generator)
    assignment = torch.randint(0, 200, (num,), generator=generator)
    return centres[assignment] + 0.5 * torch.randn(num, dim, generator=generator)


def _run(method: str, args: argparse.Namespace, queue) -> None:
    import torch
    import torch.nn.functional as F

    from hf_useg.data import nearest_neighbors

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    descriptors = _descriptors(args.num, args.dim, args.seed).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    start = time.perf_counter()
    if method == "chunked":
        result = nearest_neighbors(descriptors, args.k, chunk_size=args.chunk_size)
    else:
        normalised = F.normalize(descriptors, dim=1)
        result = (normalised @ normalised.T).topk(args.k, dim=1).indices.cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    queue.put((method, seconds, peak, result.numpy()))  # numpy: torch tensors would go via shared memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=20000, help="number of descriptors N")
    parser.add_argument("--dim", type=int, default=384, help="descriptor size C (ViT-S: 384)")
    parser.add_argument("--k", type=int, default=30, help="neighbours kept (STEGO: 30)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = {}
    for method in ("full", "chunked"):
        queue = context.Queue()
        process = context.Process(target=_run, args=(method, args, queue))
        process.start()
        name, seconds, peak, indices = queue.get()
        process.join()
        results[name] = (seconds, peak, indices)

    full_seconds, full_peak, full_indices = results["full"]
    chunk_seconds, chunk_peak, chunk_indices = results["chunked"]
    rows_equal = (full_indices == chunk_indices).all(axis=1).mean()
    sets_equal = (np.sort(full_indices, axis=1) == np.sort(chunk_indices, axis=1)).all(axis=1).mean()
    self_first = (chunk_indices[:, 0] == np.arange(args.num)).mean()
    mib = 1024**2
    print(
        f"kNN: N={args.num}, C={args.dim}, k={args.k}, chunk_size={args.chunk_size}, device={args.device}, "
        f"memory = {'CUDA max_memory_allocated' if args.device.startswith('cuda') else 'ru_maxrss'} increase"
    )
    print(f"{'method':<26}{'time (s)':>10}{'peak extra (MiB)':>18}")
    print(f"{'full matrix + topk':<26}{full_seconds:>10.2f}{full_peak / mib:>18.0f}")
    print(f"{'chunked (hf_useg)':<26}{chunk_seconds:>10.2f}{chunk_peak / mib:>18.0f}")
    print(f"{'ratio chunked / full':<26}{chunk_seconds / full_seconds:>10.2f}{chunk_peak / max(full_peak, 1):>18.3f}")
    print(
        f"agreement: identical rows {rows_equal:.2%}, identical neighbour sets {sets_equal:.2%} "
        f"(differences are near-equal similarities ordered differently by rounding); "
        f"rank 0 is the item itself for {self_first:.2%}"
    )


if __name__ == "__main__":
    main()
