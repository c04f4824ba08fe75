"""A run SIGKILLed while it writes a checkpoint resumes to exactly the weights of an uninterrupted run, for every
method that takes training steps (the loop, its checkpoints and the per-step seeding are shared)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_useg.training import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"

# kills the training process in the middle of its second checkpoint: after accelerate has written the state into
# the temporary folder, before the folder is published
KILLER = """
import os, runpy, signal, sys
import hf_useg.training.loop as loop

original, calls = loop.save_checkpoint, []


def save_then_die(accelerator, output_dir, state, keep):
    calls.append(state["step"])
    if len(calls) == 2:
        accelerator.save_state(str(output_dir / "checkpoints" / f".tmp-checkpoint-{state['step']:08d}"))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(accelerator, output_dir, state, keep)


loop.save_checkpoint = save_then_die
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path({train_py!r}, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("config", ["stego_tiny", "picie_tiny", "iic_tiny", "dino_pretrain_tiny"])
def test_sigkill_during_a_checkpoint_then_resume_equals_the_uninterrupted_run(config, tmp_path):
    path = CONFIGS / f"{config}.yaml"
    script = REPO / "training" / "train.py"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.replace("{train_py!r}", repr(str(script))))
    # every run in a process of its own with the same threads, as an interrupted job and its restart are
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(program: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(program), "--config", str(path), "--output_dir", str(output), *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run(script, full).returncode == 0
    result = run(killer, cut)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (cut / "model").exists()
    assert list((cut / "checkpoints").glob(".tmp-checkpoint-*")), "the kill must leave a half-written checkpoint"
    first = latest_checkpoint(cut)
    assert first is not None and not first.name.startswith(".")

    resumed_run = run(script, cut, "--resume_from_checkpoint", "latest")
    assert resumed_run.returncode == 0, resumed_run.stderr[-2000:]
    expected, resumed = (load_file(folder / "model" / "model.safetensors") for folder in (full, cut))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
