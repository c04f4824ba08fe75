"""`load_segmentation_dataset` on every source kind, column aliases, errors, and `label_to_tensor`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_useg.data import check_label_sizes, label_to_tensor, load_segmentation_dataset, segmentation_metadata
from hf_useg.data import readers as readers_module


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    # Parquet/imagefolder sources go through the `datasets` Arrow cache: keep it out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def _image(seed: int, height: int = 6, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _label(seed: int, height: int = 6, width: int = 8, high: int = 5) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, high, size=(height, width), dtype=np.uint8)


def _write_folder_pair(root: Path, splits: dict[str, int], labels: bool = True, ext: str = ".png") -> None:
    for split, count in splits.items():
        (root / "images" / split).mkdir(parents=True)
        if labels:
            (root / "labels" / split).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(_image(index)).save(root / "images" / split / f"item_{index}{ext}")
            if labels:
                Image.fromarray(_label(index)).save(root / "labels" / split / f"item_{index}.png")


def _records(count: int = 3) -> dict[str, list]:
    return {
        "image": [Image.fromarray(_image(i)) for i in range(count)],
        "label": [Image.fromarray(_label(i)) for i in range(count)],
    }


_FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})


def _assert_matches_records(dataset, count: int = 3) -> None:
    assert len(dataset) == count
    assert dataset.features["image"] == datasets.Image(mode="RGB")
    assert isinstance(dataset.features["label"], datasets.Image)
    for index in range(count):
        item = dataset[index]
        assert item["image"].mode == "RGB"
        np.testing.assert_array_equal(np.asarray(item["image"]), _image(index))
        np.testing.assert_array_equal(np.asarray(item["label"]), _label(index))


# ---------------------------------------- CamVid


@pytest.mark.slow
def test_camvid_real_data(camvid_root):
    train = load_segmentation_dataset(str(camvid_root), split="train")
    val = load_segmentation_dataset(str(camvid_root), split="val", num_classes=11)
    assert (len(train), len(val)) == (367, 101)
    names = (camvid_root / "splits" / "val.txt").read_text().split()
    assert sorted(val["file_name"]) == sorted(names)

    meta = segmentation_metadata(val)
    assert meta["num_classes"] == 11 and meta["ignore_index"] == 11
    assert meta["class_names"][:4] == ["sky", "building", "pole", "road"] and len(meta["class_names"]) == 11
    assert meta["synthetic"] is False
    # Without num_classes the count comes from classes.json.
    assert segmentation_metadata(train)["num_classes"] == 11

    values = set()
    for index in range(0, len(val), 10):
        item = val[index]
        assert item["image"].mode == "RGB" and item["image"].size == (480, 360)
        assert item["label"].mode == "L" and item["label"].size == (480, 360)
        raw = np.asarray(item["label"])
        values |= set(np.unique(raw).tolist())
        ids = label_to_tensor(item["label"], num_classes=meta["num_classes"])
        assert ids.shape == (360, 480) and ids.dtype == torch.long
        # void (11) and only void becomes ignore_index; every other pixel keeps its id
        np.testing.assert_array_equal(ids.numpy() == -1, raw == 11)
        np.testing.assert_array_equal(ids.numpy()[raw != 11], raw[raw != 11])
    assert values <= set(range(12)) and 11 in values and len(values) >= 8

    # the first decoded image matches the provenance hash of its pixels
    first = train[0]
    hashes = dict(
        line.split()[::-1] for line in (camvid_root / "pixel_sha256.txt").read_text().splitlines() if line.strip()
    )
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(np.asarray(first["image"])).tobytes()).hexdigest()
    key = next(k for k in hashes if first["file_name"] in k)
    assert hashes[key] == digest


@pytest.mark.slow
def test_camvid_split_errors(camvid_root):
    with pytest.raises(ValueError, match=r"split 'test' not found .*available splits: \['train', 'val'\]"):
        load_segmentation_dataset(str(camvid_root), split="test")
    # "validation" is taken as a synonym of the "val" folder
    assert len(load_segmentation_dataset(str(camvid_root), split="validation")) == 101


# ---------------------------------------- folders


def test_folder_pair_round_trip(tmp_path):
    _write_folder_pair(tmp_path, {"train": 3, "val": 2}, ext=".webp")
    # webp is lossy by default: store the reference images losslessly instead
    for index in range(3):
        Image.fromarray(_image(index)).save(tmp_path / "images" / "train" / f"item_{index}.webp", lossless=True)
    train = load_segmentation_dataset(tmp_path, split="train")
    _assert_matches_records(train)
    assert train["file_name"] == ["item_0", "item_1", "item_2"]
    assert len(load_segmentation_dataset(str(tmp_path), split="val")) == 2
    with pytest.raises(ValueError, match=r"split 'test' not found.*\['train', 'val'\]"):
        load_segmentation_dataset(tmp_path, split="test")


def test_folder_pair_nested_and_unlabelled(tmp_path):
    for city in ("aachen", "bonn"):
        (tmp_path / "images" / "train" / city).mkdir(parents=True)
        (tmp_path / "labels" / "train" / city).mkdir(parents=True)
        Image.fromarray(_image(0)).save(tmp_path / "images" / "train" / city / "x.jpg")
        Image.fromarray(_label(0)).save(tmp_path / "labels" / "train" / city / "x.png")
    (tmp_path / "images" / "test").mkdir(parents=True)
    Image.fromarray(_image(1)).save(tmp_path / "images" / "test" / "y.png")

    train = load_segmentation_dataset(tmp_path)
    assert train["file_name"] == ["aachen/x", "bonn/x"]
    np.testing.assert_array_equal(np.asarray(train[1]["label"]), _label(0))

    test = load_segmentation_dataset(tmp_path, split="test")
    assert test.column_names == ["image", "file_name"]
    with pytest.raises(
        ValueError, match=r"has images but no label maps for the split 'test': expected them in .*labels/test/"
    ):
        load_segmentation_dataset(tmp_path, split="test", require_labels=True)


def test_folder_pair_missing_and_orphan_labels(tmp_path):
    _write_folder_pair(tmp_path, {"train": 3})
    (tmp_path / "labels" / "train" / "item_1.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no label .*'item_1.png'"):
        load_segmentation_dataset(tmp_path)
    Image.fromarray(_label(1)).save(tmp_path / "labels" / "train" / "item_1.png")
    Image.fromarray(_label(9)).save(tmp_path / "labels" / "train" / "extra.png")
    with pytest.raises(ValueError, match=r"label file\(s\) .* have no image .*'extra.png'"):
        load_segmentation_dataset(tmp_path)


def test_label_size_mismatch_raises(tmp_path):
    _write_folder_pair(tmp_path / "folder", {"train": 2})
    Image.fromarray(_label(1, height=5)).save(tmp_path / "folder" / "labels" / "train" / "item_1.png")
    with pytest.raises(ValueError, match=r"label size 8x5 differs from image size 8x6 \(item_1;"):
        load_segmentation_dataset(tmp_path / "folder")

    records = _records(3)
    records["label"][2] = Image.fromarray(_label(2, width=7))
    saved = datasets.Dataset.from_dict(records, features=_FEATURES)
    with pytest.raises(ValueError, match=r"label size 7x6 differs from image size 8x6 \(item 2;"):
        check_label_sizes(saved)
    assert check_label_sizes(saved, max_items=2) == 2
    saved.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"label size 7x6 differs"):
        load_segmentation_dataset(tmp_path / "saved")


def test_decoding_is_lazy_and_unreadable_files_are_named(tmp_path):
    _write_folder_pair(tmp_path, {"train": 2})
    # a valid header with truncated pixel data: loading reads headers only, decoding fails on access
    truncated = tmp_path / "images" / "train" / "item_1.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    dataset = load_segmentation_dataset(tmp_path)
    assert dataset[0]["image"].size == (8, 6)
    with pytest.raises(OSError):
        dataset[1]
    (tmp_path / "labels" / "train" / "item_0.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read the image file '.*item_0.png'"):
        load_segmentation_dataset(tmp_path)


def test_empty_and_missing_paths(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"split 'train' is empty"):
        load_segmentation_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_segmentation_dataset(str(tmp_path / "nowhere" / "deeper"))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_segmentation_dataset("./no/such/dir")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported dataset file"):
        load_segmentation_dataset(tmp_path / "notes.txt")
    (tmp_path / "lonely").mkdir()
    with pytest.raises(ValueError, match=r"no dataset found"):
        load_segmentation_dataset(tmp_path / "lonely")
    with pytest.raises(ValueError, match=r"num_classes must be >= 1"):
        load_segmentation_dataset(tmp_path, num_classes=0)


# ---------------------------------------- datasets formats


def test_save_to_disk_dataset_and_dict(tmp_path):
    dataset = datasets.Dataset.from_dict(_records(), features=_FEATURES)
    dataset.save_to_disk(str(tmp_path / "single"))
    _assert_matches_records(load_segmentation_dataset(tmp_path / "single", split="anything"))

    splits = datasets.DatasetDict({"train": dataset, "validation": dataset.select([0, 1])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert len(load_segmentation_dataset(tmp_path / "dict", split="val")) == 2
    _assert_matches_records(load_segmentation_dataset(tmp_path / "dict", split="train"))
    with pytest.raises(ValueError, match=r"split 'test' not found .*\['train', 'validation'\]"):
        load_segmentation_dataset(tmp_path / "dict", split="test")


def test_metadata_survives_select_and_save(tmp_path):
    _write_folder_pair(tmp_path / "src", {"train": 3})
    (tmp_path / "src" / "classes.json").write_text(json.dumps(["a", "b", "c", "d", "e"]))
    dataset = load_segmentation_dataset(tmp_path / "src")
    assert segmentation_metadata(dataset)["class_names"] == ["a", "b", "c", "d", "e"]
    assert segmentation_metadata(dataset.select([0]))["num_classes"] == 5
    dataset.save_to_disk(str(tmp_path / "saved"))
    reloaded = load_segmentation_dataset(tmp_path / "saved")
    assert segmentation_metadata(reloaded)["num_classes"] is None  # the loader re-describes the new source
    assert segmentation_metadata(datasets.load_from_disk(str(tmp_path / "saved")))["num_classes"] == 5
    # an explicit num_classes that disagrees with classes.json wins and drops the names
    override = load_segmentation_dataset(tmp_path / "src", num_classes=3)
    assert segmentation_metadata(override)["num_classes"] == 3
    assert segmentation_metadata(override)["class_names"] is None


def test_parquet_sources(tmp_path):
    dataset = datasets.Dataset.from_dict(_records(), features=_FEATURES)
    dataset.to_parquet(str(tmp_path / "one.parquet"))
    _assert_matches_records(load_segmentation_dataset(tmp_path / "one.parquet"))

    unsplit = tmp_path / "unsplit"
    unsplit.mkdir()
    dataset.select([0, 1]).to_parquet(str(unsplit / "part-0.parquet"))
    dataset.select([2]).to_parquet(str(unsplit / "part-1.parquet"))
    _assert_matches_records(load_segmentation_dataset(unsplit, split="val"))

    named = tmp_path / "named"
    named.mkdir()
    dataset.to_parquet(str(named / "train-00000-of-00001.parquet"))
    dataset.select([0]).to_parquet(str(named / "val-00000-of-00001.parquet"))
    _assert_matches_records(load_segmentation_dataset(named, split="train"))
    assert len(load_segmentation_dataset(named, split="validation")) == 1
    with pytest.raises(ValueError, match=r"split 'test' not found .*\['train', 'val'\]"):
        load_segmentation_dataset(named, split="test")

    nested = tmp_path / "nested"
    (nested / "data" / "test").mkdir(parents=True)
    (nested / "data" / "train").mkdir(parents=True)
    dataset.select([1]).to_parquet(str(nested / "data" / "test" / "0.parquet"))
    dataset.to_parquet(str(nested / "data" / "train" / "0.parquet"))
    assert len(load_segmentation_dataset(nested, split="test")) == 1
    assert len(load_segmentation_dataset(nested, split="train")) == 3

    per_split_folder = tmp_path / "folders"
    (per_split_folder / "val").mkdir(parents=True)
    dataset.select([2, 0]).to_parquet(str(per_split_folder / "val" / "a.parquet"))
    val = load_segmentation_dataset(per_split_folder, split="val")
    np.testing.assert_array_equal(np.asarray(val[0]["label"]), _label(2))


def test_imagefolder_with_mask_metadata(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        folder = tmp_path / split
        folder.mkdir()
        rows = []
        for index in range(count):
            Image.fromarray(_image(index)).save(folder / f"{index}.png")
            Image.fromarray(_label(index)).save(folder / f"{index}_mask.png")
            rows.append({"file_name": f"{index}.png", "mask_file_name": f"{index}_mask.png"})
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    _assert_matches_records(load_segmentation_dataset(tmp_path, split="train"))
    assert len(load_segmentation_dataset(tmp_path, split="val")) == 2  # "validation" in datasets' naming


def test_imagefolder_classification_label_is_not_a_segmentation_map(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(_image(0)).save(tmp_path / "train" / name / "a.png")
    dataset = load_segmentation_dataset(tmp_path)
    assert "label" not in dataset.column_names
    assert isinstance(dataset.features["class_label"], datasets.ClassLabel)
    with pytest.raises(ValueError, match=r"has no segmentation label column"):
        load_segmentation_dataset(tmp_path, require_labels=True)
    with pytest.raises(ValueError, match=r"label_column 'label' .* is ClassLabel.*not a segmentation map"):
        load_segmentation_dataset(tmp_path, label_column="label")


# ---------------------------------------- columns


@pytest.mark.parametrize(
    ("image_name", "label_name"),
    [
        ("pixel_values", "annotation"),
        ("img", "semantic_segmentation"),
        ("image", "mask"),
        ("image", "segmentation"),
        ("pixel_values", "label"),
    ],
)
def test_column_aliases(tmp_path, image_name, label_name):
    records = _records()
    features = datasets.Features(
        {image_name: datasets.Image(), label_name: datasets.Image(), "extra": datasets.Value("int64")}
    )
    data = {image_name: records["image"], label_name: records["label"], "extra": [1, 2, 3]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path))
    dataset = load_segmentation_dataset(tmp_path)
    assert sorted(dataset.column_names) == ["extra", "image", "label"]
    _assert_matches_records(dataset)


def test_explicit_columns_and_bytes_columns(tmp_path):
    def png(array):
        import io

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    data = {
        "photo": [png(_image(i)) for i in range(3)],
        "gt_map": [png(_label(i)) for i in range(3)],
        "image_id": [10, 11, 12],
    }
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path))  # plain binary columns
    with pytest.raises(ValueError, match=r"no image column .*columns: \['photo', 'gt_map', 'image_id'\]"):
        load_segmentation_dataset(tmp_path)
    dataset = load_segmentation_dataset(tmp_path, image_column="photo", label_column="gt_map")
    _assert_matches_records(dataset)
    with pytest.raises(ValueError, match=r"label_column 'nope' is not a column"):
        load_segmentation_dataset(tmp_path, image_column="photo", label_column="nope")
    with pytest.raises(ValueError, match=r"label_column 'image_id' .* not a segmentation map"):
        load_segmentation_dataset(tmp_path, image_column="photo", label_column="image_id")
    with pytest.raises(ValueError, match=r"image_column 'nope' is not a column"):
        load_segmentation_dataset(tmp_path, image_column="nope")


def test_empty_saved_dataset(tmp_path):
    datasets.Dataset.from_dict({"image": [], "label": []}, features=_FEATURES).save_to_disk(str(tmp_path))
    with pytest.raises(ValueError, match=r"is empty"):
        load_segmentation_dataset(tmp_path)


# ---------------------------------------- Hub


def test_hub_id_offline_fails_fast():
    assert readers_module._hub_is_offline()  # conftest sets HF_HUB_OFFLINE=1
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"not a local path.*offline"):
        load_segmentation_dataset("someone/no-such-dataset-hf-useg")
    assert time.perf_counter() - start < 10


def test_hub_unreachable_and_missing(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(readers_module, "_hub_is_offline", lambda: False)

    def unreachable(self, repo_id, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(ConnectionError, match=r"could not be reached .*HF_HUB_OFFLINE=1"):
        load_segmentation_dataset("someone/dataset")

    def missing(self, repo_id, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(error, "404 Repository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", missing)
    with pytest.raises(FileNotFoundError, match=r"neither an existing local path nor a dataset on the Hugging"):
        load_segmentation_dataset("someone/dataset")


# ---------------------------------------- label_to_tensor


def test_label_to_tensor_values():
    raw = np.array([[0, 1, 11], [255, 3, 10]], dtype=np.uint8)
    expected = torch.tensor([[0, 1, -1], [-1, 3, 10]])
    assert torch.equal(label_to_tensor(Image.fromarray(raw), num_classes=11), expected)
    assert torch.equal(label_to_tensor(raw, num_classes=11), expected)
    assert torch.equal(label_to_tensor(torch.from_numpy(raw)[None], num_classes=11), expected)
    assert torch.equal(label_to_tensor(raw[..., None], num_classes=11), expected)
    assert torch.equal(
        label_to_tensor(raw, num_classes=4, ignore_index=255), torch.tensor([[0, 1, 255], [255, 3, 255]])
    )
    assert torch.equal(label_to_tensor(raw), torch.from_numpy(raw.astype(np.int64)))
    assert torch.equal(label_to_tensor([[-3, 2]], num_classes=5), torch.tensor([[-1, 2]]))
    assert label_to_tensor(raw).dtype == torch.long


def test_label_to_tensor_modes():
    wide = np.array([[0, 300], [70000, 2]], dtype=np.int32)
    assert torch.equal(label_to_tensor(Image.fromarray(wide), num_classes=301), torch.tensor([[0, 300], [-1, 2]]))
    sixteen = Image.fromarray(np.array([[1, 1000]], dtype=np.uint16))
    assert torch.equal(label_to_tensor(sixteen), torch.tensor([[1, 1000]]))
    palette = Image.new("P", (2, 2))  # VOC-style: the palette index is the class id, whatever its colour
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    palette.putdata([2, 0, 1, 2])
    assert torch.equal(label_to_tensor(palette, num_classes=2), torch.tensor([[-1, 0], [1, -1]]))
    assert torch.equal(label_to_tensor(Image.fromarray(np.array([[True, False]]))), torch.tensor([[1, 0]]))


def test_label_to_tensor_rejects_bad_maps():
    with pytest.raises(ValueError, match=r"mode 'RGB' \(3 channel"):
        label_to_tensor(Image.fromarray(_image(0)))
    with pytest.raises(ValueError, match=r"single-channel \[H, W\].*\(6, 8, 3\)"):
        label_to_tensor(_image(0))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        label_to_tensor(np.zeros(4, dtype=np.int64))
    with pytest.raises(TypeError, match=r"integer class ids, got dtype float32"):
        label_to_tensor(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(TypeError, match=r"PIL image, numpy array or torch tensor"):
        label_to_tensor("label.png")
    with pytest.raises(ValueError, match=r"num_classes must be >= 1"):
        label_to_tensor(np.zeros((2, 2), dtype=np.uint8), num_classes=0)
