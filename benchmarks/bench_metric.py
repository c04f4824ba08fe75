# Copyright 2025 The hf_useg authors. Licensed under the Apache License, Version 2.0.
"""Speed and peak memory of the shared metric's accumulation against naive numpy references.

Every method consumes the same stream of synthetic prediction/label maps (default: 200 maps of 320x320,
27 classes, 5% ignored pixels) and must produce the same confusion matrix (checked):

* `torch bincount, streaming (hf_useg)`: `UnsupervisedSegmentationMetric.update` per map (int64 counts only);
* `numpy bincount, streaming`: the same idea in numpy, to separate "torch vs numpy" from "stream vs store";
* `numpy bincount, store all maps`: keep every map in memory and count once at the end (what a metric that
  stores its inputs, e.g. an `evaluate` module backed by Arrow, has to hold);
* `numpy histogram2d, store all maps`: the textbook `np.histogram2d` on the stored maps.

Each method runs in a fresh subprocess so its peak resident memory is its own (Linux: `VmHWM` after resetting
it through `/proc/self/clear_refs`; elsewhere `ru_maxrss` minus the resident size before the loop). Map
generation is excluded from the timings. The last row times `compute()` (Hungarian matching and scores).

    python benchmarks/bench_metric.py                    # ~10-20 s on 2 CPU cores
    python benchmarks/bench_metric.py --device cuda      # torch accumulator on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = {
    "torch": "torch bincount, streaming (hf_useg)",
    "numpy_stream": "numpy bincount, streaming",
    "numpy_store": "numpy bincount, store all maps",
    "histogram2d": "numpy histogram2d, store all maps",
}


def _maps(args: argparse.Namespace):
    """Deterministic stream of (preds, labels) int64 maps; identical for every method."""
    for index in range(args.maps):
        rng = np.random.default_rng(args.seed + index)
        preds = rng.integers(0, args.clusters, size=(args.size, args.size), dtype=np.int64)
        labels = rng.integers(0, args.classes, size=(args.size, args.size), dtype=np.int64)
        labels[rng.random((args.size, args.size)) < 0.05] = 255
        yield preds, labels


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class _PeakMemory:
    """Extra peak resident memory (MiB) of the block, relative to the resident size when it starts."""

    def __enter__(self):
        self.linux = os.path.exists("/proc/self/clear_refs")
        if self.linux:
            try:
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")  # reset VmHWM to the current VmRSS
            except OSError:
                self.linux = False
        if self.linux:
            self.start = _rss_kib("VmRSS")
        else:
            import resource

            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.linux:
            self.peak_mib = (_rss_kib("VmHWM") - self.start) / 1024
        else:
            import resource

            self.peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start) / 1024
        return False


def _worker(method: str, args: argparse.Namespace) -> dict:
    num_cells = args.clusters * args.classes
    update_seconds = 0.0
    compute_seconds = None
    gpu_peak_mib = None

    if method == "torch":
        import torch

        from hf_useg.evaluation import UnsupervisedSegmentationMetric

        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        metric = UnsupervisedSegmentationMetric(args.classes, args.clusters, device=device)
        warmup = np.zeros((8, 8), dtype=np.int64)
        metric.update(warmup, warmup)  # first-call overheads (allocator, kernels) out of the timing
        metric.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with _PeakMemory() as memory:
            for preds, labels in _maps(args):
                if device.type == "cuda":  # a model's predictions would already live on the GPU
                    preds, labels = torch.from_numpy(preds).to(device), torch.from_numpy(labels).to(device)
                    torch.cuda.synchronize()
                start = time.perf_counter()
                metric.update(preds, labels)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                update_seconds += time.perf_counter() - start
        if device.type == "cuda":
            gpu_peak_mib = torch.cuda.max_memory_allocated() / 2**20
        matrix = metric.confusion_matrix.cpu().numpy()
        start = time.perf_counter()
        metric.compute()
        compute_seconds = time.perf_counter() - start
    else:
        with _PeakMemory() as memory:
            if method == "numpy_stream":
                counts = np.zeros(num_cells, dtype=np.int64)
                for preds, labels in _maps(args):
                    start = time.perf_counter()
                    preds, labels = preds.ravel(), labels.ravel()
                    valid = (labels >= 0) & (labels < args.classes)
                    counts += np.bincount(preds[valid] * args.classes + labels[valid], minlength=num_cells)
                    update_seconds += time.perf_counter() - start
                matrix = counts.reshape(args.clusters, args.classes)
            else:
                stored_preds, stored_labels = [], []
                for preds, labels in _maps(args):
                    start = time.perf_counter()
                    stored_preds.append(preds)
                    stored_labels.append(labels)
                    update_seconds += time.perf_counter() - start
                start = time.perf_counter()
                preds = np.concatenate([p.ravel() for p in stored_preds])
                labels = np.concatenate([lab.ravel() for lab in stored_labels])
                valid = (labels >= 0) & (labels < args.classes)
                if method == "numpy_store":
                    counts = np.bincount(preds[valid] * args.classes + labels[valid], minlength=num_cells)
                    matrix = counts.reshape(args.clusters, args.classes)
                else:
                    matrix, _, _ = np.histogram2d(
                        preds[valid],
                        labels[valid],
                        bins=(args.clusters, args.classes),
                        range=((0, args.clusters), (0, args.classes)),
                    )
                    matrix = matrix.astype(np.int64)
                update_seconds += time.perf_counter() - start
    return {
        "seconds": update_seconds,
        "peak_mib": memory.peak_mib,
        "gpu_peak_mib": gpu_peak_mib,
        "compute_seconds": compute_seconds,
        "matrix": matrix.tolist(),
    }


def _run(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method] + _forwarded(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    options = ["maps", "size", "classes", "clusters", "seed", "device", "threads"]
    return [item for name in options for item in (f"--{name}", str(getattr(args, name)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--clusters", type=int, default=None, help="defaults to --classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="device of the torch accumulator")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (numpy is single-threaded)")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(METHODS), help="methods to leave out")
    parser.add_argument("--small", action="store_true", help="CI size: 20 maps of 64x64")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.maps, args.size = min(args.maps, 20), min(args.size, 64)
    if args.clusters is None or args.clusters == "None":
        args.clusters = args.classes
    args.clusters = int(args.clusters)

    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return

    pixels = args.maps * args.size * args.size
    print(
        f"{args.maps} maps of {args.size}x{args.size} ({pixels / 1e6:.1f} M pixels), "
        f"{args.clusters} clusters x {args.classes} classes, torch device {args.device}, "
        f"{args.threads} thread(s)\n"
    )
    results = {method: _run(method, args) for method in METHODS if method not in args.skip}
    reference = results.get("torch") or next(iter(results.values()))
    for method, result in results.items():
        if result["matrix"] != reference["matrix"]:
            raise SystemExit(f"{METHODS[method]} disagrees with the other methods' confusion matrix")

    ours = results.get("torch")
    header = f"| {'method':<36} | time (s) | ms / map | peak extra RAM (MiB) | time / ours | RAM / ours |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for method, result in results.items():
        time_ratio = f"{result['seconds'] / ours['seconds']:.2f}x" if ours else "-"
        ram_ratio = f"{result['peak_mib'] / max(ours['peak_mib'], 0.1):.0f}x" if ours else "-"
        print(
            f"| {METHODS[method]:<36} | {result['seconds']:8.3f} "
            f"| {1e3 * result['seconds'] / args.maps:8.2f} "
            f"| {result['peak_mib']:20.1f} | {time_ratio:>11} | {ram_ratio:>10} |"
        )
    if ours:
        print(f"\ncompute() (Hungarian matching + scores): {1e3 * ours['compute_seconds']:.2f} ms")
        if ours["gpu_peak_mib"] is not None:
            print(f"torch GPU peak allocated during the updates: {ours['gpu_peak_mib']:.1f} MiB")
    print("confusion matrices identical across methods: yes")
    if args.json:
        rows = [
            {
                "method": METHODS[method],
                "seconds": result["seconds"],
                "ms_per_map": 1e3 * result["seconds"] / args.maps,
                "peak_extra_ram_mib": result["peak_mib"],
                "time_vs_ours": result["seconds"] / ours["seconds"] if ours else None,
            }
            for method, result in results.items()
        ]
        if ours:
            rows.append({"method": "compute() (Hungarian + scores)", "seconds": ours["compute_seconds"]})
            if ours["gpu_peak_mib"] is not None:
                rows[0]["gpu_peak_mib"] = ours["gpu_peak_mib"]
        config = {key: getattr(args, key) for key in ("maps", "size", "classes", "clusters", "seed", "threads")}
        record = {"benchmark": "metric", "device": args.device, "config": config, "rows": rows}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
