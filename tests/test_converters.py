"""Benchmark converters on tiny fake raw trees that mimic the official layouts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.io import savemat

from hf_useg.data import (
    convert_cityscapes27,
    convert_cocostuff27,
    convert_potsdam3,
    load_label_maps,
    load_segmentation_dataset,
    segmentation_metadata,
)


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache_converters")
    )


def _rgb(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _labels(dataset) -> list[np.ndarray]:
    return [np.asarray(item["label"]) for item in dataset]


def test_load_label_maps(shared_data):
    maps = load_label_maps()
    assert "shared/data/label_maps.json" in maps["source"]
    shared = json.loads((shared_data / "label_maps.json").read_text())
    for name in ("cocostuff27", "cityscapes27", "potsdam3"):
        assert maps[name]["class_names"] == shared[name]["class_names"]
    assert maps["cocostuff27"]["fine_to_coarse"] == {
        int(k): v for k, v in shared["cocostuff27"]["fine_to_coarse"].items()
    }
    assert len(maps["cocostuff27"]["fine_to_coarse"]) == 182
    assert sorted(set(maps["cocostuff27"]["fine_to_coarse"].values())) == list(range(27))
    maps["potsdam3"]["class_names"].clear()  # callers get copies
    assert len(load_label_maps()["potsdam3"]["class_names"]) == 3


# ---------------------------------------------------------------------------------------------- COCO-Stuff


def _fake_coco(root: Path) -> dict[str, np.ndarray]:
    """Three val2017 images; annotation values hit things, stuff, 255 and ids outside the table."""
    annotations = {
        "000000000139": np.array([[0, 1, 9, 14], [15, 25, 33, 43], [51, 61, 71, 77], [83, 90, 91, 255]]),
        "000000000285": np.array([[92, 100, 101, 119], [120, 147, 170, 177], [179, 181, 182, 200], [254, 5, 5, 5]]),
        "000000000632": np.full((4, 4), 255),
    }
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations" / "val2017").mkdir(parents=True)
    for index, (name, annotation) in enumerate(annotations.items()):
        Image.fromarray(_rgb(index, 4, 4)).save(root / "images" / "val2017" / f"{name}.jpg", quality=90)
        Image.fromarray(annotation.astype(np.uint8)).save(root / "annotations" / "val2017" / f"{name}.png")
    return annotations


def test_convert_cocostuff27_exact_mapping(tmp_path):
    raw = tmp_path / "cocostuff"
    annotations = _fake_coco(raw)
    output = convert_cocostuff27(raw, tmp_path / "out", split="val", shard_size=2)
    shards = sorted(p.name for p in output.glob("*.parquet"))
    assert shards == ["val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]

    dataset = load_segmentation_dataset(output, split="val")
    assert dataset["file_name"] == sorted(annotations)
    meta = segmentation_metadata(dataset)
    assert meta["num_classes"] == 27 and meta["ignore_index"] == 255
    assert meta["class_names"][0] == "electronic" and meta["class_names"][26] == "water"

    # worked by hand from the fine_to_coarse table; 182, 200, 254 and 255 are not in it
    expected_first = np.array([[9, 11, 8, 8], [7, 6, 10, 5], [2, 3, 0, 1], [4, 4, 17, 255]])
    expected_second = np.array([[17, 13, 12, 26], [14, 26, 18, 26], [19, 24, 255, 255], [255, 11, 11, 11]])
    labels = _labels(dataset)
    np.testing.assert_array_equal(labels[0], expected_first)
    np.testing.assert_array_equal(labels[1], expected_second)
    np.testing.assert_array_equal(labels[2], np.full((4, 4), 255))
    table = load_label_maps()["cocostuff27"]["fine_to_coarse"]
    for name, label in zip(sorted(annotations), labels):
        mapped = np.vectorize(lambda v: table.get(int(v), 255))(annotations[name])
        np.testing.assert_array_equal(label, mapped)

    # images keep their original JPEG bytes
    table_rows = pq.read_table(output / "val-00000-of-00002.parquet").to_pylist()
    original = (raw / "images" / "val2017" / "000000000139.jpg").read_bytes()
    assert table_rows[0]["image"]["bytes"] == original
    assert dataset[0]["image"].mode == "RGB" and dataset[0]["image"].size == (4, 4)


def test_convert_cocostuff27_image_list_and_errors(tmp_path):
    raw = tmp_path / "cocostuff"
    _fake_coco(raw)
    (raw / "curated" / "val2017").mkdir(parents=True)
    (raw / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000285\n000000000632\n\n")
    output = convert_cocostuff27(raw, tmp_path / "out", split="val", image_list="Coco164kFull_Stuff_Coarse_7.txt")
    assert load_segmentation_dataset(output, split="val")["file_name"] == ["000000000285", "000000000632"]

    with pytest.raises(FileExistsError, match=r"already holds the split 'val'"):
        convert_cocostuff27(raw, output, split="val")
    convert_cocostuff27(raw, output, split="val", image_list=["000000000139.jpg"], overwrite=True)
    assert load_segmentation_dataset(output, split="val")["file_name"] == ["000000000139"]
    assert sorted(p.name for p in output.iterdir()) == ["classes.json", "val-00000-of-00001.parquet"]

    with pytest.raises(ValueError, match=r"1 image\(s\) missing .*'000000000999.jpg'"):
        convert_cocostuff27(raw, tmp_path / "x", split="val", image_list=["000000000999"])
    (raw / "annotations" / "val2017" / "000000000632.png").unlink()
    with pytest.raises(ValueError, match=r"1 annotation\(s\) missing .*'000000000632.png'"):
        convert_cocostuff27(raw, tmp_path / "y", split="val")
    with pytest.raises(FileNotFoundError, match=r"train2017 not found"):
        convert_cocostuff27(raw, tmp_path / "z", split="train")
    with pytest.raises(ValueError, match=r"split must be 'train' or 'val'"):
        convert_cocostuff27(raw, tmp_path / "z", split="test")
    with pytest.raises(FileNotFoundError, match=r"image list 'nope.txt' not found"):
        convert_cocostuff27(raw, tmp_path / "z", split="val", image_list="nope.txt")


def test_convert_with_worker_processes_gives_the_same_shards(tmp_path):
    raw = tmp_path / "cocostuff"
    _fake_coco(raw)
    serial = convert_cocostuff27(raw, tmp_path / "serial", split="val")
    parallel = convert_cocostuff27(raw, tmp_path / "parallel", split="val", num_workers=2)
    name = "val-00000-of-00001.parquet"
    assert pq.read_table(serial / name).equals(pq.read_table(parallel / name))


def test_label_size_mismatch_is_named(tmp_path):
    raw = tmp_path / "cocostuff"
    _fake_coco(raw)
    Image.fromarray(np.zeros((3, 4), dtype=np.uint8)).save(raw / "annotations" / "val2017" / "000000000285.png")
    with pytest.raises(ValueError, match=r"000000000285.png is 4x3 but image .*000000000285.jpg is 4x4"):
        convert_cocostuff27(raw, tmp_path / "out", split="val")
    assert not list((tmp_path / "out").glob("*.parquet"))  # nothing half-written


# ---------------------------------------------------------------------------------------------- Cityscapes


def test_convert_cityscapes27_exact_mapping(tmp_path):
    raw = tmp_path / "cityscapes"
    label_ids = np.arange(36).reshape(4, 9)  # 0..35: the full labelId range and two past it
    frames = [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000001_000019")]
    for index, (city, stem) in enumerate(frames):
        (raw / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (raw / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(index, 4, 9)).save(raw / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
        ids = np.roll(label_ids, index).astype(np.uint8)
        Image.fromarray(ids).save(raw / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
        # other gtFine files must be ignored
        Image.fromarray(ids).save(raw / "gtFine" / "val" / city / f"{stem}_gtFine_color.png")
    (raw / "leftImg8bit" / "train").mkdir()

    output = convert_cityscapes27(raw, tmp_path / "out", split="val")
    dataset = load_segmentation_dataset(output, split="val")
    assert dataset["file_name"] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000001_000019"]
    for index, label in enumerate(_labels(dataset)):
        ids = np.roll(label_ids, index)
        expected = np.where((ids >= 7) & (ids <= 33), ids - 7, 255)
        np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(_labels(dataset)[0][0], [255] * 7 + [0, 1])
    meta = segmentation_metadata(dataset)
    assert meta["num_classes"] == 27 and meta["class_names"][0] == "road" and meta["class_names"][26] == "bicycle"
    np.testing.assert_array_equal(np.asarray(dataset[1]["image"]), _rgb(1, 4, 9))  # PNG kept losslessly

    with pytest.raises(ValueError, match=r"split 'test' not found .*\['train', 'val'\]"):
        convert_cityscapes27(raw, tmp_path / "out2", split="test")
    with pytest.raises(ValueError, match=r"no \*_leftImg8bit.png images"):
        convert_cityscapes27(raw, tmp_path / "out2", split="train")
    (raw / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(ValueError, match=r"1 label file\(s\) missing .*lindau_000001_000019_gtFine_labelIds"):
        convert_cityscapes27(raw, tmp_path / "out3", split="val")


# ---------------------------------------------------------------------------------------------- Potsdam


_POTSDAM_FINE = np.array([[0, 1, 2, 3], [4, 5, 255, 7]])
_POTSDAM_COARSE = np.array([[0, 1, 2, 2], [0, 1, 255, 255]])


def test_convert_potsdam3_mat_layout(tmp_path):
    raw = tmp_path / "potsdam"
    (raw / "imgs").mkdir(parents=True)
    (raw / "gt").mkdir()
    rgbir = np.concatenate([_rgb(0, 2, 4), np.full((2, 4, 1), 7, dtype=np.uint8)], axis=-1)
    savemat(raw / "imgs" / "a.mat", {"img": rgbir})
    savemat(raw / "imgs" / "b.mat", {"img": _rgb(1, 2, 4).astype(np.float32) / 255.0})  # float in [0, 1]
    savemat(raw / "imgs" / "c.mat", {"img": _rgb(2, 2, 4)})
    savemat(raw / "gt" / "a.mat", {"gt": _POTSDAM_FINE.astype(np.uint8)})
    savemat(raw / "gt" / "b.mat", {"gt": _POTSDAM_FINE[::-1].astype(np.float64)})  # MATLAB doubles
    (raw / "labelled_train.txt").write_text("a\nb\n")
    (raw / "unlabelled_train.txt").write_text("c\n")

    output = convert_potsdam3(raw, tmp_path / "out", split="train")
    dataset = load_segmentation_dataset(output, split="train")
    assert dataset["file_name"] == ["a", "b"]
    labels = _labels(dataset)
    np.testing.assert_array_equal(labels[0], _POTSDAM_COARSE)
    np.testing.assert_array_equal(labels[1], _POTSDAM_COARSE[::-1])
    np.testing.assert_array_equal(np.asarray(dataset[0]["image"]), _rgb(0, 2, 4))  # IR channel dropped
    np.testing.assert_array_equal(np.asarray(dataset[1]["image"]), _rgb(1, 2, 4))
    assert segmentation_metadata(dataset)["class_names"] == [
        "roads and cars",
        "buildings and clutter",
        "vegetation and trees",
    ]

    unlabelled = load_segmentation_dataset(
        convert_potsdam3(raw, tmp_path / "out", split="unlabelled_train"), split="unlabelled_train"
    )
    assert unlabelled.column_names == ["image", "file_name"] and len(unlabelled) == 1

    with pytest.raises(FileNotFoundError, match=r"split list .*labelled_test.txt not found"):
        convert_potsdam3(raw, tmp_path / "out", split="val")
    (raw / "all.txt").write_text("a\nc\n")
    with pytest.raises(ValueError, match=r"1 gt file\(s\) missing .*'c.mat'"):
        convert_potsdam3(raw, tmp_path / "out", split="all")
    savemat(raw / "gt" / "a.mat", {"labels": _POTSDAM_FINE})
    with pytest.raises(ValueError, match=r"no 'gt' array in the .mat file \(arrays: \['labels'\]\)"):
        convert_potsdam3(raw, tmp_path / "out", split="train", overwrite=True)


def test_convert_potsdam3_folder_layout_ids_and_colours(tmp_path):
    raw = tmp_path / "potsdam"
    (raw / "images" / "val").mkdir(parents=True)
    (raw / "labels" / "val").mkdir(parents=True)
    Image.fromarray(_rgb(0, 2, 4)).save(raw / "images" / "val" / "tile_0.png")
    Image.fromarray(_rgb(1, 2, 4)).save(raw / "images" / "val" / "tile_1.png")
    Image.fromarray(_POTSDAM_FINE.astype(np.uint8)).save(raw / "labels" / "val" / "tile_0.png")
    colours = np.array(
        [
            [[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0]],
            [[255, 255, 0], [255, 0, 0], [0, 0, 0], [10, 20, 30]],  # black boundary, unknown colour
        ],
        dtype=np.uint8,
    )
    Image.fromarray(colours).save(raw / "labels" / "val" / "tile_1.png")

    dataset = load_segmentation_dataset(convert_potsdam3(raw, tmp_path / "out", split="val"), split="val")
    labels = _labels(dataset)
    np.testing.assert_array_equal(labels[0], _POTSDAM_COARSE)
    np.testing.assert_array_equal(labels[1], _POTSDAM_COARSE)
    np.testing.assert_array_equal(np.asarray(dataset[1]["image"]), _rgb(1, 2, 4))

    (raw / "labels" / "val" / "tile_1.png").unlink()
    with pytest.raises(ValueError, match=r"1 label file\(s\) for images missing .*'tile_1.png'"):
        convert_potsdam3(raw, tmp_path / "out2", split="val")
    with pytest.raises(ValueError, match=r"split 'train' not found .*\['val'\]"):
        convert_potsdam3(raw, tmp_path / "out2", split="train")
    with pytest.raises(FileNotFoundError, match=r"no Potsdam data"):
        convert_potsdam3(tmp_path / "empty", tmp_path / "out2")
