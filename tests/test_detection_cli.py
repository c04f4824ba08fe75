"""`hf-useg evaluate` on object detectors: a folder whose config is an `AutoModelForObjectDetection` type (a
fine-tuned Deformable DETR, or any other detector) is scored on a detection dataset with both evaluators (COCO AP
and DETReg's VOC07 AP), named in the output; segmentation-only options are a one-line error (exit code 2), as are
data problems, found before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_detreg_training import make_detection_folder
from tiny_configs import TINY_DETREG_DETECTOR_KWARGS, tiny_resnet_config
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

from hf_useg.cli import main
from hf_useg.data import load_detection_dataset
from hf_useg.detection_inference import EVALUATORS, detection_image_processor, evaluate_detector
from hf_useg.models.detreg import init_deformable_detr_heads
from hf_useg.models.detreg.training_detreg import detector_config_kwargs

METRICS = [f"{evaluator}_{name}" for evaluator in ("coco", "voc07") for name in ("ap", "ap50", "ap75")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The raccoon CSV layout with classes green and red: 6 train images, 2 test images."""
    return make_detection_folder(tmp_path_factory.mktemp("detection-data"))


def _tiny_detector() -> DeformableDetrForObjectDetection:
    torch.manual_seed(0)
    kwargs = detector_config_kwargs(tiny_resnet_config(), dict(TINY_DETREG_DETECTOR_KWARGS))
    labels = {"id2label": {0: "green", 1: "red"}, "label2id": {"green": 0, "red": 1}}
    config = DeformableDetrConfig(**{**kwargs, "num_labels": 2, **labels})
    model = DeformableDetrForObjectDetection(config)
    init_deformable_detr_heads(model)
    return model.eval()


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    """A tiny Deformable DETR folder (classes green, red) with its processor at 64 px, as fine-tuning saves it."""
    folder = tmp_path_factory.mktemp("detector")
    _tiny_detector().save_pretrained(folder)
    detection_image_processor(64).save_pretrained(folder)
    return folder


def _evaluate(capsys, model, dataset, *extra: str) -> tuple[int, str, str]:
    code = main(["evaluate", str(model), "--dataset", str(dataset), "--split", "test", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-useg: ") and "Traceback" not in err
    return lines[0]


def test_a_detector_is_scored_with_both_evaluators(detector_dir, data, capsys, tmp_path):
    out_dir = tmp_path / "eval"
    code, out, err = _evaluate(capsys, detector_dir, data, "--batch-size", "2", "--output-dir", str(out_dir))
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["num_images"] == 2 and line["split"] == "test"
    # the numbers are evaluate_detector's on the same model, data and processor
    expected = evaluate_detector(
        DeformableDetrForObjectDetection.from_pretrained(detector_dir),
        load_detection_dataset(data, "test"),
        detection_image_processor(64),
        batch_size=2,
        progress=False,
    )
    assert {key: line[key] for key in METRICS} == pytest.approx(
        {f"{e}_{n}": expected[e][n] for e in ("coco", "voc07") for n in ("ap", "ap50", "ap75")}
    )
    # the terminal table names both evaluators and says which is which
    for name, description in EVALUATORS.items():
        assert any(row.startswith(name) and row.endswith(description) for row in err.splitlines()), err
    record = json.loads((out_dir / "eval_results.json").read_text())
    assert record["coco"] == pytest.approx(expected["coco"]) and record["voc07"] == pytest.approx(expected["voc07"])
    evaluation = record["evaluation"]
    assert evaluation["model_type"] == "deformable_detr" and evaluation["task"] == "object-detection"
    assert (evaluation["num_images"], evaluation["split_size"], evaluation["complete"]) == (2, 2, True)
    assert evaluation["class_names"] == ["green", "red"]
    assert evaluation["protocol"]["resolution"] == "shorter side 64"
    assert evaluation["protocol"]["evaluators"] == EVALUATORS


def test_max_images_resolution_and_quiet(detector_dir, data, capsys, tmp_path):
    code, out, err = _evaluate(
        capsys,
        detector_dir,
        data,
        "--max-images",
        "1",
        "--resolution",
        "96",
        "--no-flip-tta",  # (detectors have no test-time augmentation: nothing to turn off)
        "--quiet",
        "--output-dir",
        str(tmp_path),
    )
    assert code == 0 and err == ""
    line = json.loads(out.strip())
    assert line["num_images"] == 1 and all(0.0 <= line[key] <= 1.0 for key in METRICS)
    evaluation = json.loads((tmp_path / "eval_results.json").read_text())["evaluation"]
    assert (evaluation["num_images"], evaluation["complete"]) == (1, False)
    assert evaluation["protocol"]["resolution"] == "shorter side 96"


def test_a_detector_saved_without_a_processor_gets_deformable_detrs(data, capsys, tmp_path):
    folder = tmp_path / "no-processor"
    _tiny_detector().save_pretrained(folder)
    code, _, err = _evaluate(capsys, folder, data, "--output-dir", str(tmp_path / "eval"))
    assert code == 0 and "has no image processor; using Deformable DETR's" in err
    protocol = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["evaluation"]["protocol"]
    assert protocol["resolution"] == "shorter side 800"


def test_any_object_detection_model_works(data, capsys, tmp_path):
    """DETR (softmax classes, no ``top_k`` in its post-processing), through AutoModelForObjectDetection."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

    torch.manual_seed(0)
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=tiny_resnet_config(out_features=["stage4"]),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=5,
        id2label={0: "green", 1: "red"},
        label2id={"green": 0, "red": 1},
    )
    folder = tmp_path / "detr"
    DetrForObjectDetection(config).save_pretrained(folder)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 107}).save_pretrained(folder)
    code, out, err = _evaluate(capsys, folder, data, "--output-dir", str(tmp_path / "eval"))
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["num_images"] == 2 and all(0.0 <= line[key] <= 1.0 for key in METRICS)
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["evaluation"]["model_type"] == "detr"


# ----------------------------------------------------------------------------------------------------------------
# one-line errors, exit code 2


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--crf"], "--crf"),
        (["--num-classes", "2"], "--num-classes"),
        (["--matching", "majority"], "--matching"),
        (["--label-column", "mask", "--crf-workers", "2"], "--crf-workers, --label-column"),
    ],
)
def test_segmentation_options_are_a_one_line_error(detector_dir, data, capsys, options, named):
    code, out, err = _evaluate(capsys, detector_dir, data, *options)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    verb = "are" if "," in named else "is"
    assert line.startswith(f"hf-useg: {named} {verb} for segmentation models only: ")
    assert "is an object detector (deformable_detr), scored with COCO and VOC07 AP" in line


def test_data_problems_are_reported_before_the_model_loads(detector_dir, data, capsys, tmp_path, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(transformers.AutoModelForObjectDetection, "from_pretrained", no_model)
    code, _, err = _evaluate(capsys, detector_dir, data, "--split", "val")  # (the last --split wins)
    assert code == 2
    assert "split 'val' not found" in _one_error_line(err) and "['test', 'train']" in err
    # a folder of images without boxes
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for index in range(2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(unlabelled / f"image-{index}.png")
    code = main(["evaluate", str(detector_dir), "--dataset", str(unlabelled), "--split", "all"])
    err = capsys.readouterr().err
    assert code == 2 and "has no 'objects' column (no boxes" in _one_error_line(err)


def test_a_dataset_of_other_classes_is_a_one_line_error(detector_dir, data, capsys, tmp_path):
    other = tmp_path / "other-classes"
    other.mkdir()
    (other / "images").symlink_to(data / "images")
    rows = (data / "test_labels.csv").read_text().replace("green", "blue")
    (other / "test_labels.csv").write_text(rows)
    code, _, err = _evaluate(capsys, detector_dir, other)
    assert code == 2
    line = _one_error_line(err)
    assert "the dataset's classes ['blue', 'red'] are not the model's ['green', 'red']" in line


def test_a_segmentation_model_still_takes_the_segmentation_path(tmp_path, capsys):
    """A STEGO folder on a detection folder: the segmentation loaders answer (it is not taken for a detector)."""
    from tiny_configs import tiny_vit_config

    from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation

    folder = tmp_path / "stego"
    StegoForUnsupervisedSegmentation(
        StegoConfig(backbone_config=tiny_vit_config(), dim=8, num_classes=3)
    ).save_pretrained(folder)
    capsys.readouterr()
    code = main(["evaluate", str(folder), "--dataset", str(tmp_path / "missing"), "--crf"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "for segmentation models only" not in line and "missing" in line
