"""`hf-useg evaluate`: data, argument and model problems are one line ``hf-useg: <what is wrong> (<where>)`` with exit
code 2 (``--debug`` shows the traceback), the data is checked before the model loads, ``eval_results.json`` says
what was evaluated, and under ``accelerate launch`` the images are split over the processes."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_configs import tiny_vit_config

import hf_useg.cli
from hf_useg.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny (untrained) STEGO model folder with its whole-image processor."""
    import torch

    from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation
    from hf_useg.image_processing import whole_image_processor

    folder = tmp_path_factory.mktemp("stego-tiny")
    torch.manual_seed(0)
    model = StegoForUnsupervisedSegmentation(StegoConfig(backbone_config=tiny_vit_config(), dim=8, num_classes=3))
    model.save_pretrained(folder)
    whole_image_processor(32, 8).save_pretrained(folder)
    return folder


@pytest.fixture
def scenes(tmp_path) -> Path:
    """Six generated scenes (32x32, 3 classes) in the images/ + labels/ folder layout, split ``val``."""
    from hf_useg.data import save_synthetic_scenes

    return save_synthetic_scenes(tmp_path / "scenes", num_images=6, image_size=32, num_classes=3, seed=1, split="val")


def _evaluate(capsys, model, dataset, *extra: str) -> tuple[int, str, str]:
    code = main(["evaluate", str(model), "--dataset", str(dataset), "--quiet", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-useg: ") and "Traceback" not in err
    return lines[0]


def _label(scenes: Path, stem: str = "scene_00001") -> Path:
    return scenes / "labels" / "val" / f"{stem}.png"


def _image(scenes: Path, stem: str = "scene_00001") -> Path:
    return scenes / "images" / "val" / f"{stem}.png"


# ----------------------------------------------------------------------------------------------------------------
# data problems: one line naming the file, exit code 2


def test_label_of_the_wrong_size(model_dir, scenes, capsys):
    Image.new("L", (16, 32)).save(_label(scenes))
    code, out, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "label size 16x32 differs from image size 32x32 (scene_00001;" in line


def test_unreadable_image(model_dir, scenes, capsys):
    _image(scenes).write_bytes(b"not a png")
    code, _, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2
    line = _one_error_line(err)
    assert "cannot read the image file" in line and str(_image(scenes)) in line


def test_truncated_image_names_its_file(model_dir, scenes, capsys):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    _image(scenes, "scene_00004").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    code, _, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2
    line = _one_error_line(err)
    # the header is intact, so only decoding finds it: the message names the item and its files
    assert "truncated" in line or "broken" in line, line
    assert f"(item 4: {_image(scenes, 'scene_00004')}, {_label(scenes, 'scene_00004')})" in line


def test_rgb_label_map(model_dir, scenes, capsys):
    Image.new("RGB", (32, 32), (1, 1, 1)).save(_label(scenes))
    code, _, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2
    line = _one_error_line(err)
    assert f"the label map {str(_label(scenes))!r} has PIL mode 'RGB'" in line and "(scene_00001)" in line


def test_sixteen_bit_image_is_rejected_not_clipped(model_dir, scenes, capsys):
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(_image(scenes))
    assert Image.open(_image(scenes)).mode == "I;16"
    code, _, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2
    assert "has PIL mode 'I;16' (16/32 bits per pixel)" in _one_error_line(err)


def test_missing_label_file_and_missing_label_folder(model_dir, scenes, capsys):
    _label(scenes).unlink()
    code, _, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2 and "1 image(s) in" in _one_error_line(err) and "'scene_00001.png'" in err
    for label in (scenes / "labels" / "val").iterdir():
        label.unlink()
    (scenes / "labels" / "val").rmdir()
    code, _, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2
    assert "has images but no label maps for the split 'val'" in _one_error_line(err)


def test_empty_split(model_dir, scenes, capsys):
    (scenes / "images" / "test").mkdir()
    code, _, err = _evaluate(capsys, model_dir, scenes, "--split", "test")
    assert code == 2
    assert "the split 'test' is empty: no image files in" in _one_error_line(err)


def test_the_demos_dataset_name(model_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called "synthetic" here
    code, _, err = _evaluate(capsys, model_dir, "synthetic")
    assert code == 2
    assert "'synthetic' is the demo's name for the scenes it generates" in _one_error_line(err)


def test_offline_hub_dataset_id(model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _evaluate(capsys, model_dir, "no-such-user/no-such-dataset")
    assert code == 2
    line = _one_error_line(err)
    assert "'no-such-user/no-such-dataset' is not a local path" in line and "offline" in line


# ----------------------------------------------------------------------------------------------------------------
# argument and model problems


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--num-classes", "0"], "--num-classes must be at least 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
        (["--max-images", "0"], "--max-images must be at least 1, got 0"),
    ],
)
def test_bad_numbers(model_dir, scenes, capsys, option, message):
    code, _, err = _evaluate(capsys, model_dir, scenes, *option)
    assert code == 2 and _one_error_line(err) == f"hf-useg: {message}"


def test_missing_model_folder(scenes, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    code, _, err = _evaluate(capsys, missing, scenes)
    assert code == 2 and _one_error_line(err) == f"hf-useg: the model folder {str(missing)!r} does not exist"
    # a relative path that could also be a Hub id
    monkeypatch.chdir(tmp_path)
    code, _, err = _evaluate(capsys, "outputs/stego", scenes)
    assert code == 2
    line = _one_error_line(err)
    assert "'outputs/stego' is not an existing model folder" in line and "offline" in line
    # a folder that holds no model
    code, _, err = _evaluate(capsys, scenes, scenes)
    assert code == 2 and "is not a model folder: it has no config.json" in _one_error_line(err)


def test_the_data_is_checked_before_the_model_loads(model_dir, scenes, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(hf_useg.cli, "_load_model", no_model)
    monkeypatch.setattr(hf_useg.cli, "_load_model_config", no_model)
    Image.new("RGB", (32, 32)).save(_label(scenes))
    code, _, err = _evaluate(capsys, model_dir, scenes)
    assert code == 2 and "has PIL mode 'RGB'" in _one_error_line(err)


def test_debug_shows_the_traceback(model_dir, scenes):
    Image.new("L", (16, 32)).save(_label(scenes))
    with pytest.raises(ValueError, match="label size 16x32 differs"):
        main(["evaluate", str(model_dir), "--dataset", str(scenes), "--debug"])
    with pytest.raises(ValueError, match="label size 16x32 differs"):
        main(["--debug", "evaluate", str(model_dir), "--dataset", str(scenes)])


# ----------------------------------------------------------------------------------------------------------------
# what was evaluated


def test_eval_results_record_what_was_evaluated(model_dir, scenes, capsys, tmp_path):
    out_dir = tmp_path / "eval"
    code, out, _ = _evaluate(
        capsys, model_dir, scenes, "--max-images", "4", "--output-dir", str(out_dir), "--device", "cpu"
    )
    assert code == 0
    line = json.loads(out.strip().splitlines()[-1])
    assert line["num_images"] == 4
    record = json.loads((out_dir / "eval_results.json").read_text())
    assert record["evaluation"] == {
        "model": str(model_dir),
        "dataset": str(scenes),
        "split": "val",
        "num_images": 4,
        "split_size": 6,
        "complete": False,
        "num_classes": 3,
        "protocol": {"resolution": 32, "crop": "center", "flip_tta": True, "crf": False, "matching": "hungarian"},
        "processes": 1,
        # --dtype auto on the CPU: the backbone runs in float32
        "inference": {"device": "cpu", "dtype": "float32"},
    }
    assert {"cluster", "linear"} <= set(record) and 0.0 <= record["cluster"]["mean_iou"] <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# the real console: one line on stderr, exit status 2


def _console(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "hf_useg.cli", *args], capture_output=True, text=True, env=environment, timeout=300
    )


def test_console_reports_one_line_and_exit_status_2(model_dir, scenes):
    Image.new("RGB", (32, 32)).save(_label(scenes, "scene_00003"))
    result = _console(["evaluate", str(model_dir), "--dataset", str(scenes)])
    assert result.returncode == 2 and result.stdout == ""
    assert _one_error_line(result.stderr).endswith("(scene_00003)")


# ----------------------------------------------------------------------------------------------------------------
# accelerate launch: the images split over two CPU processes


@pytest.mark.slow
def test_two_processes_score_like_one(model_dir, scenes, tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["evaluate", str(model_dir), "--dataset", str(scenes), "--quiet", "--batch-size", "1",
                 "--device", "cpu", "--output-dir", str(single)]) == 0  # fmt: skip
    capsys.readouterr()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    double = tmp_path / "double"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "hf_useg.cli", "evaluate", str(model_dir), "--dataset", str(scenes), "--quiet", "--batch-size", "1",
        "--output-dir", str(double),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    json_lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1  # only the main process reports (and writes)
    assert sorted(p.name for p in double.iterdir()) == ["eval_results.json", "per_class_iou.csv"]
    expected = json.loads((single / "eval_results.json").read_text())
    actual = json.loads((double / "eval_results.json").read_text())
    assert actual["evaluation"].pop("processes") == 2 and expected["evaluation"].pop("processes") == 1
    assert actual["evaluation"] == expected["evaluation"]
    for probe in ("cluster", "linear"):
        # the summed confusion matrices count every image once: the same counts, the same scores
        assert actual[probe]["confusion_matrix"] == expected[probe]["confusion_matrix"]
        assert actual[probe]["mean_iou"] == pytest.approx(expected[probe]["mean_iou"], abs=1e-9)
    assert (double / "per_class_iou.csv").read_text() == (single / "per_class_iou.csv").read_text()
