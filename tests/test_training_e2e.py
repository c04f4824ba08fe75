"""End to end on CPU: the tiny STEGO config trains, resumes bit-for-bit, saves, reloads and evaluates."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_useg.training import latest_checkpoint, load_training_arguments, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "stego_tiny.yaml"


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("full")
    summary = train(load_training_arguments(TINY, output_dir=str(output)))
    return output, summary


@pytest.mark.slow
def test_tiny_run_writes_a_complete_model_folder(uninterrupted):
    output, summary = uninterrupted
    model_dir = output / "model"
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "eval_results.json",
        "per_class_iou.csv",
        "training_summary.json",
    ):
        assert (model_dir / name).exists(), name
    assert summary["steps"] == 8
    assert 0.0 <= summary["cluster_mean_iou"] <= 1.0 and 0.0 <= summary["linear_accuracy"] <= 1.0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "stego"
    # id2label comes from the Hungarian matching onto the generated classes
    assert set(config["id2label"].values()) <= {f"synthetic-class-{i}" for i in range(3)} | {
        f"unmatched_{i}" for i in range(3)
    }
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in line for line in lines) and any("val/cluster_mean_iou" in line for line in lines)
    assert (output / "best" / "model.safetensors").exists()
    assert latest_checkpoint(output).name == "checkpoint-00000008"
    card = (model_dir / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "model-index" in card


@pytest.mark.slow
def test_resume_from_checkpoint_matches_uninterrupted_run(uninterrupted, tmp_path):
    full_output, _ = uninterrupted
    interrupted = tmp_path / "resumed"
    train(load_training_arguments(TINY, output_dir=str(interrupted), max_steps=4))
    assert latest_checkpoint(interrupted).name == "checkpoint-00000004"
    summary = train(load_training_arguments(TINY, output_dir=str(interrupted), resume_from_checkpoint="latest"))
    assert summary["steps"] == 8
    expected, resumed = _weights(full_output / "model"), _weights(interrupted / "model")
    assert expected.keys() == resumed.keys()
    trained = [k for k in expected if "backbone" not in k]
    assert trained, "the head and probes must be in the saved weights"
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_saved_model_reloads_and_evaluates_through_the_cli(uninterrupted, tmp_path, capsys):
    import hf_useg
    from hf_useg.cli import main
    from hf_useg.data import save_synthetic_scenes

    output, summary = uninterrupted
    model = hf_useg.StegoForUnsupervisedSegmentation.from_pretrained(output / "model")
    assert model.config.dim == 8
    data_dir = tmp_path / "scenes"
    save_synthetic_scenes(data_dir, num_images=6, image_size=32, num_classes=3, seed=1, split="val")
    assert (
        main(
            [
                "evaluate",
                str(output / "model"),
                "--dataset",
                str(data_dir),
                "--split",
                "val",
                "--num-classes",
                "3",
                "--output-dir",
                str(tmp_path / "eval"),
                "--quiet",
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= line["cluster_accuracy"] <= 1.0 and "linear_mean_iou" in line
    assert (tmp_path / "eval" / "per_class_iou.csv").read_text().startswith("class_id,class_name")


def test_bad_training_options_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: stego\nlearning_rate_typo: 3\n")
    with pytest.raises(ValueError, match="learning_rate_typo"):
        load_training_arguments(bad)
    with pytest.raises(ValueError, match="method must be one of"):
        load_training_arguments(None, method="segformer")


@pytest.mark.slow
def test_cached_backbone_features_train_the_same_model(tmp_path):
    """With the frozen backbone's maps computed once (the default; stored in float32 here), training takes the
    path of the backbone run at every step (same draws, same data)."""
    plain = train(
        load_training_arguments(
            TINY, output_dir=str(tmp_path / "plain"), max_steps=4, val_every=100, cache_backbone_features=False
        )
    )
    cached = train(
        load_training_arguments(
            TINY,
            output_dir=str(tmp_path / "cached"),
            max_steps=4,
            val_every=100,
            cache_backbone_features=True,
            feature_cache_dtype="float32",
        )
    )
    assert plain["steps"] == cached["steps"] == 4
    expected, actual = _weights(tmp_path / "plain" / "model"), _weights(tmp_path / "cached" / "model")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["stego_tiny", "picie_tiny", "iic_tiny", "dino_pretrain_tiny"])
def test_two_cpu_processes_with_accelerate_launch(config, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo), for every method with training steps:
    DDP training (STEGO's kNN table shared through its cache file, PiCIE's clustering gathered over the processes,
    IIC's unused head, DINO's centre all-reduced), evaluation split over the processes, one model folder; a run
    interrupted after its step-2 checkpoint and resumed in 2 processes equals the uninterrupted 2-process run."""
    import os
    import socket
    import subprocess
    import sys

    def launch(output: Path, *extra: str, retried: bool = False) -> dict:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(port), str(REPO / "training" / "train.py")]
        command += ["--config", str(REPO / "training" / "configs" / f"{config}.yaml"), "--output_dir", str(output)]
        try:
            result = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            # gloo on an oversubscribed 2-core machine has been seen to stall (twice, under a parallel test
            # run); one retry on a fresh port, so that only a deadlock that repeats fails the test
            if retried:
                raise
            fresh = "--resume_from_checkpoint" not in extra
            return launch(output, *extra, *(["--overwrite_output_dir", "true"] if fresh else []), retried=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    summary = launch(tmp_path / "run", "--max_steps", "4", "--save_every", "2")
    assert summary["steps"] == 4
    if config != "dino_pretrain_tiny":  # the others are segmenters, evaluated at the end
        assert 0.0 <= summary["cluster_mean_iou"] <= 1.0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-00000004"

    # the same run interrupted after its step-2 checkpoint: resumed in 2 processes, it ends where it did
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "model")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-00000004")
    step_2 = tmp_path / "cut" / "checkpoints" / "checkpoint-00000002"
    launch(tmp_path / "cut", "--max_steps", "4", "--save_every", "2", "--resume_from_checkpoint", str(step_2))
    expected, resumed = _weights(tmp_path / "run" / "model"), _weights(tmp_path / "cut" / "model")
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
