"""A run SIGKILLed while it writes a checkpoint resumes to exactly the weights of an uninterrupted run, for every
method that takes training steps (the loop, its checkpoints and the per-step seeding are shared)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_useg.training import latest_checkpoint, load_training_arguments, train

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
    train(load_training_arguments(path, output_dir=str(tmp_path / "full")))

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.replace("{train_py!r}", repr(str(REPO / "training" / "train.py"))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cut = tmp_path / "cut"
    result = subprocess.run(
        [sys.executable, str(killer), "--config", str(path), "--output_dir", str(cut)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (cut / "model").exists()
    assert list((cut / "checkpoints").glob(".tmp-checkpoint-*")), "the kill must leave a half-written checkpoint"
    first = latest_checkpoint(cut)
    assert first is not None and not first.name.startswith(".")

    train(load_training_arguments(path, output_dir=str(cut), resume_from_checkpoint="latest"))
    expected, resumed = (load_file(run / "model" / "model.safetensors") for run in (tmp_path / "full", cut))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
