import json

import pytest
import torch

from hf_useg.cli import build_parser, main
from hf_useg.data import expand_five_crops, make_synthetic_scenes
from hf_useg.data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from hf_useg.image_processing import protocol_image_processor
from hf_useg.inference import format_per_class_table, summarize, write_evaluation_report


def test_processed_dataset_maps_out_of_range_labels_to_ignore():
    dataset = make_synthetic_scenes(num_images=2, image_size=32, num_classes=3, seed=0)
    items = ProcessedSegmentationDataset(dataset, protocol_image_processor(16), num_classes=2)
    item = items[1]
    assert item["pixel_values"].shape == (3, 16, 16) and item["index"] == 1
    raw = torch.as_tensor(
        protocol_image_processor(16)(dataset[1]["image"], segmentation_maps=dataset[1]["label"], return_tensors="pt")[
            "labels"
        ][0]
    )
    expected = torch.where(raw >= 2, torch.tensor(-1), raw)
    assert torch.equal(item["labels"], expected)
    batch = collate_segmentation_batch([items[0], items[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["index"].tolist() == [0, 1]


def test_processed_dataset_sees_labels_of_lazy_five_crops():
    crops = expand_five_crops(make_synthetic_scenes(num_images=2, image_size=32, num_classes=3))
    items = ProcessedSegmentationDataset(crops, protocol_image_processor(16), num_classes=3)
    assert items.with_labels and "labels" in items[7]


def test_processed_dataset_errors():
    dataset = make_synthetic_scenes(num_images=2, image_size=32).remove_columns("label")
    with pytest.raises(ValueError, match="no 'label' column"):
        ProcessedSegmentationDataset(dataset, protocol_image_processor(16), with_labels=True)
    with pytest.raises(ValueError, match="empty"):
        ProcessedSegmentationDataset(dataset.select([]), protocol_image_processor(16))


def test_report_writers(tmp_path):
    results = {
        "cluster": {"accuracy": 0.5, "mean_iou": 0.25, "per_class_iou": [0.5, float("nan")]},
        "linear": {"accuracy": 0.75, "mean_iou": 0.5, "per_class_iou": [0.25, 0.75]},
    }
    assert summarize(results) == {
        "cluster_accuracy": 0.5,
        "cluster_mean_iou": 0.25,
        "linear_accuracy": 0.75,
        "linear_mean_iou": 0.5,
    }
    path = write_evaluation_report(results, tmp_path, ["road", "sky"])
    assert path.read_text().splitlines() == [
        "class_id,class_name,cluster_iou,linear_iou",
        "0,road,0.500000,0.250000",
        "1,sky,,0.750000",
    ]
    assert json.loads((tmp_path / "eval_results.json").read_text())["cluster"]["per_class_iou"] == [0.5, None]
    table = format_per_class_table(results, ["road", "sky"])
    assert "road" in table and "50.0%" in table and "mIoU" in table


def test_cli_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("evaluate", "demo"):
        assert command in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate"])  # MODEL and --dataset are required


def test_cli_evaluate_rejects_a_folder_without_a_model(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--dataset", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"hf-useg: {str(tmp_path)!r} is not a model folder: it has no config.json\n"


def test_label_map_of_the_wrong_size_is_named():
    from PIL import Image

    dataset = make_synthetic_scenes(num_images=2, image_size=32, num_classes=3)
    small = dataset.cast_column("label", dataset.features["label"]).map(
        lambda example: {"label": Image.new("L", (16, 32))}, features=dataset.features
    )
    items = ProcessedSegmentationDataset(small, protocol_image_processor(16), num_classes=3)
    with pytest.raises(ValueError, match=r"^the label map is 16x32 \(WxH\) but its image is 32x32.*\(item 0\)$"):
        items[0]
