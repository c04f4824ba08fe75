"""benchmarks/gpu_suite.py: it must work the first time it runs on a GPU machine that lacks `datasets`, `evaluate`,
`gradio` and `pydensecrf`, so its CPU mode runs here with those modules blocked, as they are there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
SHARED_CAMVID = ROOT.parent / "shared" / "data" / "camvid11"


def load_suite():
    return load_script("benchmarks/gpu_suite.py", "gpu_suite")


def test_rows_table_takes_the_union_of_columns():
    suite = load_suite()
    lines = suite.rows_table([{"method": "a", "ms": 1.23456}, {"method": "b|c", "ratio": [1, 2.5]}])
    assert lines == [
        "| method | ms | ratio |",
        "|---|---|---|",
        "| a | 1.235 |  |",
        "| b/c |  | 1, 2.5 |",
    ]


def test_blocked_modules_fail_to_import_in_the_benchmark_process(tmp_path):
    suite = load_suite()
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        "try:\n    import datasets\nexcept ImportError:\n    print('blocked', sys.argv[1:])\n"
        "else:\n    print('imported')\n"
    )
    output = subprocess.run(
        suite.blocked_runner(["datasets"]) + [str(script), "--x", "1"], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "blocked ['--x', '1']"


def test_unknown_benchmark_and_missing_cuda_are_clear_errors(tmp_path):
    suite = load_suite()
    with pytest.raises(SystemExit, match="unknown benchmark"):
        suite.main(["--device", "cpu", "--only", "crf", "nope", "--output-dir", str(tmp_path)])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            suite.main(["--device", "cuda", "--output-dir", str(tmp_path)])


@pytest.mark.skipif(not SHARED_CAMVID.is_dir(), reason="needs ../shared/data/camvid11 (CamVid) beside the repository")
def test_prepare_data_copies_a_camvid_subset(tmp_path):
    suite = load_suite()
    destination = suite.prepare_data(tmp_path, 3)
    names = (SHARED_CAMVID / "splits" / "val.txt").read_text().split()[:3]
    assert (destination / "splits" / "val.txt").read_text().split() == names
    for folder in ("images/val", "labels/val"):
        copied = sorted(path.stem for path in (destination / folder).iterdir())
        assert copied == sorted(names)
        for path in (destination / folder).iterdir():
            assert path.read_bytes() == (SHARED_CAMVID / folder / path.name).read_bytes()


@pytest.mark.slow
def test_cpu_suite_runs_with_the_gpu_machines_modules_only(tmp_path):
    """The whole suite at CI size, in fresh processes with datasets/evaluate/gradio/pydensecrf blocked: every
    benchmark must finish and write rows, and both reports must be written."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--small"]
        + ["--output-dir", str(tmp_path), "--budget", "600"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    failures = {r["name"]: r.get("log_tail") for r in report["benchmarks"] if r["status"] != "ok"}
    assert completed.returncode == 0 and not failures, (completed.stdout[-2000:], failures)
    assert report["blocked_modules"] == ["datasets", "evaluate", "gradio", "pydensecrf"]
    assert [r["name"] for r in report["benchmarks"]] == ["crf", "inference", "stego_step", "knn", "metric"]
    assert all(r["result"]["rows"] for r in report["benchmarks"])
    assert report["matmul"]["tflops"] > 0
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert markdown.count("\n## ") == 5 and "| " in markdown
