"""kNN positives at COCO scale: `hf_useg.data.nearest_neighbors` (chunked matmul + top-k on the device) against the
full ``N x N`` similarity matrix + ``topk`` it replaces, where that fits.

STEGO keeps the top-30 cosine neighbours of every training item's global descriptor (METHODS 0.6); COCO-Stuff-27's
five crops make ~250k items, whose full similarity matrix takes 250 GB. Methods, each in its own fresh process
so that its peak memory is its own (CUDA: ``max_memory_allocated``; CPU: the ``ru_maxrss`` increase):

* **full**: ``(x @ x.T).topk(k)`` (skipped, with the reason, when ``N x N`` float32 would not fit);
* **chunked**: float32, exact, ties broken deterministically (the default);
* **chunked-fp16** / **chunked-bf16** (CUDA): half-precision chunk matmuls, the top ``k + max(k, 32)`` candidates
  re-scored in float32;
* **faiss** (when ``faiss`` is installed): an exact inner-product index (``IndexFlatIP``), re-ranked the same way.

Descriptors are synthetic (clustered unit vectors, like image features). ``agree`` is the fraction of rows equal to
the reference's (full when it ran, else chunked), ``sets`` the fraction with the same neighbour sets: differences
come from near-equal similarities ordered differently by rounding.

    python benchmarks/bench_knn.py                                   # CPU: 20k x 384, k=30 (< 1 min)
    python benchmarks/bench_knn.py --small                           # CI size (seconds)
    python benchmarks/bench_knn.py --device cuda --items 250000 --dim 768 --json knn.json   # COCO scale
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

MIB = 2**20


def _descriptors(num: int, dim: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    # clustered descriptors, like real image features: 200 centres plus noise
    centres = torch.randn(200, dim, generator=generator)
    assignment = torch.randint(0, 200, (num,), generator=generator)
    return torch.nn.functional.normalize(centres[assignment] + 0.5 * torch.randn(num, dim, generator=generator))


def _search(method: str, descriptors, k: int, chunk_size: int | None):
    import torch

    from hf_useg.data import nearest_neighbors

    if method == "full":
        return (descriptors @ descriptors.T).topk(k, dim=1).indices.cpu()
    options = {
        "chunked": {},
        "chunked-fp16": {"matmul_dtype": torch.float16},
        "chunked-bf16": {"matmul_dtype": torch.bfloat16},
        "faiss": {"backend": "faiss"},
    }[method]
    return nearest_neighbors(descriptors, k, chunk_size=chunk_size, **options)


def _run(method: str, args: argparse.Namespace, queue) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    descriptors = _descriptors(args.items, args.dim, args.seed).to(device)
    _search(method, descriptors[: min(2048, args.items)], min(args.k, 2048), args.chunk_size)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    start = time.perf_counter()
    result = _search(method, descriptors, args.k, args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    queue.put((seconds, peak, result.numpy()))  # numpy: torch tensors would go through shared memory


def _available_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _device_name(device: str, threads: int) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", "--num", type=int, default=20000, help="number of descriptors N")
    parser.add_argument("--dim", type=int, default=384, help="descriptor size C (ViT-S: 384, ViT-B: 768)")
    parser.add_argument("--k", type=int, default=30, help="neighbours kept (STEGO's table: 30)")
    parser.add_argument("--chunk-size", type=int, help="rows per chunk (default: nearest_neighbors' automatic)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="CI size: 4000 items")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.small:
        args.items = min(args.items, 4000)
    import torch

    from hf_useg.data.knn import _auto_chunk_size

    cuda = args.device.startswith("cuda")
    chunk_size = args.chunk_size or _auto_chunk_size(args.items, torch.device(args.device))
    full_bytes = args.items**2 * 4
    available = _available_bytes(args.device)
    try:
        import faiss  # noqa: F401

        has_faiss = True
    except ImportError:
        has_faiss = False
    skipped = {}
    if full_bytes > 0.5 * available:
        skipped["full"] = (
            f"N x N float32 = {full_bytes / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available on {args.device}"
        )
    for method in ("chunked-fp16", "chunked-bf16"):
        if not cuda:
            skipped[method] = "CUDA only (half-precision matmuls are slow on the CPU)"
    if not has_faiss:
        skipped["faiss"] = "faiss not installed (pip install faiss-cpu)"

    name = _device_name(args.device, args.threads)
    print(
        f"kNN: N={args.items:,}, C={args.dim}, k={args.k}, chunk {chunk_size} rows "
        f"({chunk_size * args.items * 4 / MIB:.0f} MiB of float32 similarities), {name}; memory = "
        f"{'CUDA max_memory_allocated' if cuda else 'ru_maxrss'} increase; load average {os.getloadavg()[0]:.2f}"
    )
    context = mp.get_context("spawn")
    results = {}
    for method in ("full", "chunked", "chunked-fp16", "chunked-bf16", "faiss"):
        if method in skipped:
            continue
        queue = context.Queue()
        process = context.Process(target=_run, args=(method, args, queue))
        process.start()
        results[method] = queue.get()
        process.join()

    reference_name = "full" if "full" in results else "chunked"
    reference = results[reference_name][2]
    full = results.get("full")
    rows = []
    print(
        f"{'method':<14}{'time (s)':>10}{'peak extra MiB':>16}{'theory MiB':>12}{'x time':>9}{'x memory':>10}"
        f"{'agree':>9}{'sets':>9}"
    )
    for method in ("full", "chunked", "chunked-fp16", "chunked-bf16", "faiss"):
        if method in skipped:
            rows.append({"method": method, "skipped": skipped[method]})
            print(f"{method:<14}skipped: {skipped[method]}")
            continue
        seconds, peak, indices = results[method]
        # the similarity block the method holds at once (faiss blocks its search internally)
        theory = {"full": full_bytes, "faiss": None}.get(method, chunk_size * args.items * 4)
        agree = float((indices == reference).all(axis=1).mean())
        sets = float((np.sort(indices, axis=1) == np.sort(reference, axis=1)).all(axis=1).mean())
        time_ratio = seconds / full[0] if full else None
        memory_ratio = peak / max(full[1], 1) if full else None
        rows.append(
            {
                "method": method,
                "seconds": seconds,
                "peak_extra_mib": peak / MIB,
                "theory_mib": None if theory is None else theory / MIB,
                "time_vs_full": time_ratio,
                "memory_vs_full": memory_ratio,
                f"identical_rows_vs_{reference_name}": agree,
                f"identical_sets_vs_{reference_name}": sets,
            }
        )
        ratios = f"{time_ratio:>9.2f}{memory_ratio:>10.3f}" if full else f"{'-':>9}{'-':>10}"
        theory_text = "-" if theory is None else f"{theory / MIB:.0f}"
        print(f"{method:<14}{seconds:>10.2f}{peak / MIB:>16.0f}{theory_text:>12}{ratios}{agree:>9.2%}{sets:>9.2%}")
    print(f"agreement against {reference_name}; load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        report = {
            "benchmark": "knn",
            "device": name,
            "config": {"items": args.items, "dim": args.dim, "k": args.k, "chunk_size": chunk_size},
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
