"""Every performance benchmark of issue 13 in one run, at real sizes on a CUDA machine (small sizes on the CPU),
written to one JSON file and one Markdown table.

    python benchmarks/gpu_suite.py                                   # CUDA: real sizes, ~6 minutes on an H100
    python benchmarks/gpu_suite.py --device cpu --small              # the same suite at CI size (~1-2 minutes)
    python benchmarks/gpu_suite.py --prepare-data bench_data         # here: copy a CamVid subset to carry along

What runs, each benchmark in its own process (`--json` into the output folder, its log beside it), with a time
limit per benchmark and a budget for the whole suite (a benchmark that would start after the budget is reported
as skipped, never half-run):

| name | script | CUDA arguments | what it measures |
|---|---|---|---|
| ``matmul`` | (this file) | 8192³ bf16 | the card's matrix rate, the compute floor of the others |
| ``crf`` | ``bench_crf.py`` | batch 8, 320² and 480x360 | torch dense CRF on the GPU vs ``pydensecrf2`` |
| ``inference`` | ``bench_inference.py`` | ViT-S/8, ViT-B/8, 320² | images/s: bf16 + SDPA vs fp32 eager, vs floor |
| ``stego_step`` | ``bench_stego_step.py`` | ViT-S/8, 224, batch 32 | steps/s, peak memory: cached vs recomputed |
| ``knn`` | ``bench_knn.py`` | 250k x 384, k = 30 | chunked top-k on the device: time and peak memory |
| ``metric`` | ``bench_metric.py`` | 200 maps of 320² | confusion-matrix accumulation on the device |

The machine it is written for has torch, transformers, accelerate, scipy, numpy, PIL and safetensors and nothing
else of the package's dependencies (no ``datasets``, ``evaluate``, ``gradio``, ``pydensecrf``), and hf_useg is not
installed there: the suite puts the repository on ``PYTHONPATH`` and runs every benchmark with those modules
blocked (``--allow-module NAME`` lifts a block), so a run here fails where it would fail there. Optional pieces
missing there are reported, not fatal: without ``pydensecrf`` the CRF rows have no reference column. Real CamVid
images make the CRF rows' agreement figures meaningful; ``../shared`` does not travel with the repository, so
``--prepare-data bench_data`` copies a few val images (and their labels) into ``bench_data/camvid11`` (ignored by
git), which the suite uses when it is there (synthetic images otherwise, said so in the table).

Outputs (``--output-dir``, default ``outputs/gpu_suite``): ``gpu_suite.json`` (machine, per benchmark: command,
exit status, seconds, its JSON rows) and ``gpu_suite.md`` (one table per benchmark), plus ``<name>.log`` and
``<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SHARED_CAMVID = ROOT.parent / "shared" / "data" / "camvid11"
CARRIED_CAMVID = ROOT / "bench_data" / "camvid11"
# what the GPU machine lacks: blocked in every benchmark process unless --allow-module lifts it
MISSING_THERE = ("datasets", "evaluate", "gradio", "pydensecrf")


@dataclass
class Benchmark:
    """One benchmark of the suite: its script and arguments for a CUDA run and for a small (``--small``) run."""

    name: str
    script: str
    cuda_args: list[str]
    small_args: list[str]
    timeout: float
    description: str
    data_args: list[str] = field(default_factory=list)


def suite(camvid: Path | None) -> list[Benchmark]:
    camvid_args = ["--camvid", str(camvid)] if camvid is not None else []
    return [
        Benchmark(
            "crf",
            "bench_crf.py",
            ["--num-images", "8", "--repeats", "3"],
            ["--small"],
            150,
            "dense CRF, torch backend vs pydensecrf2 (when installed)",
            camvid_args,
        ),
        Benchmark(
            "inference",
            "bench_inference.py",
            [],
            ["--small"],
            150,
            "segmentation inference images/s: batched bf16 autocast + SDPA vs fp32 eager, against the compute floor",
        ),
        Benchmark(
            "stego_step",
            "bench_stego_step.py",
            [],
            ["--small"],
            120,
            "STEGO training step: fp16 feature cache + bf16 backbone vs fp32 recompute",
        ),
        Benchmark(
            "knn",
            "bench_knn.py",
            ["--items", "250000", "--dim", "384"],
            ["--small"],
            120,
            "kNN positives: chunked top-k on the device vs the full similarity matrix",
        ),
        Benchmark(
            "metric",
            "bench_metric.py",
            [],
            ["--maps", "20", "--size", "64"],
            60,
            "confusion-matrix accumulation: torch on the device vs numpy",
        ),
    ]


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    for name in ("transformers", "accelerate", "scipy", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
            cuda=torch.version.cuda,
        )
    else:
        info["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


def measure_matmul_rate(device: str, size: int) -> dict[str, Any]:
    """TFLOP/s of a ``size``³ matrix product (bf16 on CUDA, float32 on the CPU), timed by bench_inference.py's
    `matmul_rate` (the rate its compute floor divides by)."""
    import torch

    sys.path[:0] = [path for path in (str(ROOT), str(BENCHMARKS)) if path not in sys.path]
    from bench_inference import matmul_rate

    device = torch.device(device)
    rate = matmul_rate(device, size, min_seconds=1.0)
    return {"size": size, "dtype": "bfloat16" if device.type == "cuda" else "float32", "tflops": rate / 1e12}


def blocked_runner(blocked: list[str]) -> list[str]:
    """A ``python -c`` prefix that makes ``import`` of each blocked module fail (as on a machine without it), then
    runs the script named by ``sys.argv[1]`` as ``__main__``."""
    code = (
        "import runpy, sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "script = sys.argv[1]\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(script, run_name='__main__')\n"
    )
    return [sys.executable, "-c", code]


def run_benchmark(
    benchmark: Benchmark, args: argparse.Namespace, blocked: list[str], deadline: float
) -> dict[str, Any]:
    output_dir: Path = args.output_dir
    json_path = output_dir / f"{benchmark.name}.json"
    log_path = output_dir / f"{benchmark.name}.log"
    script_args = benchmark.small_args if args.small else benchmark.cuda_args
    command = [str(BENCHMARKS / benchmark.script), "--device", args.device, *script_args, *benchmark.data_args]
    command += ["--json", str(json_path)]
    record: dict[str, Any] = {
        "name": benchmark.name,
        "description": benchmark.description,
        "command": "python benchmarks/" + " ".join([benchmark.script, *command[1:]]),
    }
    remaining = deadline - time.monotonic()
    if remaining < min(benchmark.timeout, 30):
        return {**record, "status": "skipped: the suite's time budget is spent"}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.monotonic()
    json_path.unlink(missing_ok=True)
    with log_path.open("w") as log:
        try:
            completed = subprocess.run(
                blocked_runner(blocked) + command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=min(benchmark.timeout, remaining),
            )
            status = "ok" if completed.returncode == 0 else f"failed (exit status {completed.returncode})"
        except subprocess.TimeoutExpired:
            status = "timed out"
    record.update(status=status, seconds=round(time.monotonic() - start, 1), log=log_path.name)
    if json_path.exists():
        record["result"] = json.loads(json_path.read_text())
    elif status == "ok":
        record["status"] = "failed (no JSON written)"
    if record["status"] != "ok":
        record["log_tail"] = log_path.read_text()[-2000:]
    return record


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value).replace("|", "/")


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of dicts: the columns are the union of their keys, in order of first appearance.

    Example:

    ```python
    >>> rows_table([{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}])
    ['| a | b | c |', '|---|---|---|', '| 1 | 0.5 |  |', '| 2 |  | x |']
    ```
    """
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return lines


def write_markdown(report: dict[str, Any], path: Path) -> None:
    machine = report["machine"]
    where = machine.get("gpu") or f"CPU ({machine['cpu_count']} cores, load {_cell(machine.get('load_average'))})"
    matmul = report["matmul"]
    lines = [
        f"# hf_useg performance suite: {where}",
        "",
        f"torch {machine['torch']}, transformers {machine['transformers']}, device `{machine['device']}`, "
        f"{'small sizes' if report['small'] else 'real sizes'}, {report['seconds']:.0f} s in all. "
        f"Matrix rate: {matmul['tflops']:.1f} TFLOP/s ({matmul['dtype']}, {matmul['size']}³).",
        "",
    ]
    for record in report["benchmarks"]:
        lines += [f"## {record['name']}: {record['description']}", "", f"`{record['command']}`", ""]
        lines += [f"Status: {record['status']}" + (f", {record['seconds']} s" if "seconds" in record else ""), ""]
        rows = (record.get("result") or {}).get("rows")
        if rows:
            lines += rows_table(rows) + [""]
    path.write_text("\n".join(lines))


def prepare_data(target: Path, count: int) -> Path:
    """Copy ``count`` CamVid val images and labels from ``../shared`` into ``target/camvid11`` (the layout
    bench_crf.py reads: ``images/val``, ``labels/val``, ``splits/val.txt``)."""
    if not SHARED_CAMVID.is_dir():
        raise FileNotFoundError(f"no CamVid at {SHARED_CAMVID}: nothing to prepare")
    names = (SHARED_CAMVID / "splits" / "val.txt").read_text().split()[:count]
    destination = target / "camvid11"
    for folder in ("images/val", "labels/val", "splits"):
        (destination / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        for folder in ("images/val", "labels/val"):
            matches = sorted((SHARED_CAMVID / folder).glob(f"{name}.*"))
            if not matches:
                raise FileNotFoundError(f"{SHARED_CAMVID / folder} has no file for {name!r}")
            shutil.copy2(matches[0], destination / folder / matches[0].name)
    (destination / "splits" / "val.txt").write_text("\n".join(names) + "\n")
    return destination


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--small", action="store_true", help="CI sizes (default on the CPU)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "gpu_suite")
    parser.add_argument("--only", nargs="+", default=None, help="run only these benchmarks (names in the table)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite (default 8 min)")
    parser.add_argument("--allow-module", action="append", default=[], help="do not block this module")
    parser.add_argument("--prepare-data", type=Path, default=None, help="copy a CamVid subset here, then exit")
    parser.add_argument("--prepare-count", type=int, default=16, help="images --prepare-data copies")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_data is not None:
        print(f"copied to {prepare_data(args.prepare_data, args.prepare_count)}")
        return 0
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (use --device cpu --small)")
    if not args.device.startswith("cuda"):
        args.small = True  # the real sizes are the GPU's
    camvid = next((path for path in (CARRIED_CAMVID, SHARED_CAMVID) if path.is_dir()), None)
    benchmarks = suite(camvid)
    known = {benchmark.name for benchmark in benchmarks}
    if args.only:
        unknown = sorted(set(args.only) - known)
        if unknown:
            raise SystemExit(f"--only: unknown benchmark(s) {unknown}; the suite has {sorted(known)}")
        benchmarks = [benchmark for benchmark in benchmarks if benchmark.name in args.only]
    blocked = [name for name in MISSING_THERE if name not in args.allow_module]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget
    report: dict[str, Any] = {
        "machine": machine_info(args.device),
        "small": args.small,
        "blocked_modules": blocked,
        "camvid": str(camvid) if camvid is not None else None,
        "matmul": measure_matmul_rate(args.device, 1024 if args.small else 8192),
        "benchmarks": [],
    }
    print(f"matrix rate: {report['matmul']['tflops']:.2f} TFLOP/s ({report['matmul']['dtype']})", flush=True)
    for benchmark in benchmarks:
        print(f"== {benchmark.name} ({benchmark.script})", flush=True)
        record = run_benchmark(benchmark, args, blocked, deadline)
        print(f"   {record['status']}" + (f" in {record['seconds']} s" if "seconds" in record else ""), flush=True)
        report["benchmarks"].append(record)
    report["seconds"] = round(time.monotonic() - start, 1)
    (args.output_dir / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(report, args.output_dir / "gpu_suite.md")
    print(f"wrote {args.output_dir / 'gpu_suite.json'} and {args.output_dir / 'gpu_suite.md'}")
    return 0 if all(record["status"] == "ok" for record in report["benchmarks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
