"""`load_detection_dataset` on the raccoon CSV folder (real data), tiny COCO / VOC / CSV / image folders written
here, `datasets` sources, `detection_references`, `detection_class_names`, and the errors on bad inputs."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_useg.data import (
    VOC_CLASSES,
    detection_class_names,
    detection_references,
    load_detection_dataset,
)

BASE_OBJECT_FIELDS = {"id", "area", "bbox", "category"}


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    # Parquet/imagefolder sources go through the `datasets` Arrow cache: keep it out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


@pytest.fixture(scope="module")
def raccoon_root(shared_data: Path) -> Path:
    root = shared_data / "raccoon"
    if not (root / "train_labels.csv").is_file():
        pytest.skip(f"the raccoon detection data is not at {root}")
    return root


@pytest.fixture(scope="module")
def raccoon_splits(raccoon_root: Path) -> dict[str, datasets.Dataset]:
    return {split: load_detection_dataset(raccoon_root, split=split) for split in ("train", "test", None)}


def _csv_boxes(file: Path) -> dict[str, list[list[float]]]:
    """filename -> [[x, y, w, h], ...] in row order, read independently of the loader."""
    boxes = defaultdict(list)
    with open(file, newline="") as handle:
        for row in csv.DictReader(handle):
            xmin, ymin, xmax, ymax = (int(row[key]) for key in ("xmin", "ymin", "xmax", "ymax"))
            boxes[row["filename"]].append([xmin, ymin, xmax - xmin, ymax - ymin])
    return dict(boxes)


def _write_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# -- raccoon (real data) -------------------------------------------------------------------------------------


def test_raccoon_split_counts(raccoon_root, raccoon_splits):
    expected = {"train": "train_labels.csv", "test": "test_labels.csv", None: "raccoon_labels.csv"}
    counts = {}
    for split, file in expected.items():
        dataset = raccoon_splits[split]
        rows = _csv_boxes(raccoon_root / file)
        references = detection_references(dataset)
        counts[split] = (len(dataset), sum(len(reference["boxes"]) for reference in references))
        assert counts[split] == (len(rows), sum(len(boxes) for boxes in rows.values()))
        assert detection_class_names(dataset) == ["raccoon"]
    assert counts == {"train": (160, 173), "test": (40, 44), None: (200, 217)}
    train_names, test_names = set(raccoon_splits["train"]["file_name"]), set(raccoon_splits["test"]["file_name"])
    assert not train_names & test_names and train_names | test_names == set(raccoon_splits[None]["file_name"])


def test_raccoon_boxes_and_sizes_match_the_csv_exactly(raccoon_root, raccoon_splits):
    dataset = raccoon_splits["train"]
    expected = _csv_boxes(raccoon_root / "train_labels.csv")
    sizes = {}
    with open(raccoon_root / "train_labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            sizes[row["filename"]] = (int(row["width"]), int(row["height"]))
    loaded = dataset.select_columns(["file_name", "width", "height", "objects"])
    for row in loaded:
        assert row["objects"]["bbox"] == expected[row["file_name"]]
        assert (row["width"], row["height"]) == sizes[row["file_name"]]
        assert row["objects"]["category"] == [0] * len(expected[row["file_name"]])
        assert row["objects"]["area"] == [w * h for _, _, w, h in expected[row["file_name"]]]
    # a few rows by hand (first lines of train_labels.csv): raccoon-17.jpg,259,194,raccoon,95,60,167,118
    by_name = {row["file_name"]: row for row in loaded}
    assert by_name["raccoon-17.jpg"]["objects"]["bbox"] == [[95, 60, 72, 58]]
    assert by_name["raccoon-63.jpg"]["objects"]["bbox"] == [[74, 107, 206, 183], [227, 93, 176, 205]]
    references = detection_references(dataset)
    position = dataset["file_name"].index("raccoon-63.jpg")
    np.testing.assert_array_equal(references[position]["boxes"], [[74, 107, 280, 290], [227, 93, 403, 298]])
    assert references[position]["labels"].tolist() == [0, 0]
    assert references[position]["difficult"].tolist() == [False, False]


def test_raccoon_layout_ids_and_images(raccoon_splits):
    train, test, full = raccoon_splits["train"], raccoon_splits["test"], raccoon_splits[None]
    assert set(train.features) == {"image", "image_id", "file_name", "width", "height", "objects"}
    assert train.features["image"] == datasets.Image(mode="RGB")
    assert set(train.features["objects"]) == BASE_OBJECT_FIELDS
    assert train.features["objects"]["category"].feature.names == ["raccoon"]
    # image ids agree between the splits and the full file
    full_ids = dict(zip(full["file_name"], full["image_id"]))
    for split in (train, test):
        assert dict(zip(split["file_name"], split["image_id"])) == {
            name: full_ids[name] for name in split["file_name"]
        }
    assert len(set(full["image_id"])) == len(full)
    # a greyscale JPEG of the set decodes as RGB at its annotated size
    position = full["file_name"].index("raccoon-150.jpg")
    item = full[position]
    assert item["image"].mode == "RGB" and item["image"].size == (item["width"], item["height"])


def test_raccoon_errors_and_unlabelled_images(raccoon_root):
    with pytest.raises(ValueError, match=r"split 'val' not found.*available splits: \['raccoon', 'test', 'train'\]"):
        load_detection_dataset(raccoon_root, split="val")
    images = load_detection_dataset(raccoon_root / "images")
    assert len(images) == 200 and "objects" not in images.column_names
    assert detection_class_names(images) == []
    with pytest.raises(ValueError, match="no 'objects' column"):
        load_detection_dataset(raccoon_root / "images", require_objects=True)


# -- CSV folders written here --------------------------------------------------------------------------------


def _write_csv(
    path: Path, rows: list[list], header=("filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax")
):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def csv_root(tmp_path: Path) -> Path:
    root = tmp_path / "csv_data"
    for index, (width, height) in enumerate([(40, 30), (32, 32), (50, 20), (20, 20)]):
        _write_image(root / "images" / f"img{index}.png", width, height, seed=index)
    _write_csv(
        root / "train_labels.csv",
        [
            ["img0.png", 40, 30, "dog", 1, 2, 11, 12],
            ["img0.png", 40, 30, "cat", 0, 0, 40, 30],
            ["img1.png", 32, 32, "", "", "", "", ""],  # an image without objects
        ],
    )
    _write_csv(root / "val_labels.csv", [["img2.png", 50, 20, "bird", 5.5, 1.25, 20, 19]])
    return root


def test_csv_folder_splits_classes_and_all(csv_root):
    train = load_detection_dataset(csv_root, split="train")
    assert train["file_name"] == ["img0.png", "img1.png"]
    # class ids come from every CSV of the folder, sorted: bird, cat, dog
    assert detection_class_names(train) == ["bird", "cat", "dog"]
    assert train[0]["objects"]["bbox"] == [[1, 2, 10, 10], [0, 0, 40, 30]]
    assert train[0]["objects"]["category"] == [2, 1]
    assert train[1]["objects"]["bbox"] == [] and train[1]["objects"]["category"] == []
    validation = load_detection_dataset(csv_root, split="validation")  # a synonym of val
    assert validation[0]["objects"]["bbox"] == [[5.5, 1.25, 14.5, 17.75]]
    assert validation[0]["objects"]["category"] == [0]
    with pytest.raises(ValueError, match=r"available splits: \['train', 'val'\]"):
        load_detection_dataset(csv_root, split="test")
    # no full file: split=None has nothing to pick
    with pytest.raises(ValueError, match="no single full annotation file"):
        load_detection_dataset(csv_root)
    # a full file: the images of the folder without a row are included without objects
    _write_csv(
        csv_root / "labels.csv",
        [["img0.png", 40, 30, "dog", 1, 2, 11, 12], ["img2.png", 50, 20, "bird", 5, 1, 20, 19]],
    )
    full = load_detection_dataset(csv_root, split="all")
    assert full["file_name"] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert [len(objects["bbox"]) for objects in full["objects"]] == [1, 0, 1, 0]
    assert full["width"] == [40, 32, 50, 20] and full["height"] == [30, 32, 20, 20]
    # one file is one split
    single = load_detection_dataset(csv_root / "val_labels.csv")
    assert single["file_name"] == ["img2.png"]


def test_csv_bad_inputs(csv_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_detection_dataset(tmp_path / "no_such_folder")
    _write_csv(csv_root / "train_labels.csv", [["img0.png", 40, 30, "dog", 1, 2]], header=CSV_HEADER_WITHOUT_BOX_END)
    with pytest.raises(ValueError, match=r"misses the column\(s\) \['xmax', 'ymax'\]"):
        load_detection_dataset(csv_root, split="train")
    _write_csv(
        csv_root / "train_labels.csv",
        [["img0.png", 40, 30, "dog", 1, 2, 11, 12], ["img0.png", 40, 30, "dog", 30, 2, 45, 12]],
    )
    with pytest.raises(
        ValueError, match=r"train_labels.csv line 3: invalid box of img0.png \(outside the 40x30 image"
    ):
        load_detection_dataset(csv_root, split="train")
    dropped = load_detection_dataset(csv_root, split="train", invalid_boxes="drop")
    assert dropped[0]["objects"]["bbox"] == [[1, 2, 10, 10]]
    _write_csv(csv_root / "train_labels.csv", [["img0.png", 40, 30, "dog", 10, 2, 10, 12]])
    with pytest.raises(ValueError, match=r"line 2: invalid box of img0.png \(non-positive size"):
        load_detection_dataset(csv_root, split="train")
    # one pixel of annotation-tool rounding is clipped, not an error
    _write_csv(csv_root / "train_labels.csv", [["img0.png", 40, 30, "dog", 0, 0, 41, 30]])
    assert load_detection_dataset(csv_root, split="train")[0]["objects"]["bbox"] == [[0, 0, 40, 30]]
    _write_csv(csv_root / "train_labels.csv", [["img0.png", 41, 30, "dog", 1, 2, 11, 12]])
    with pytest.raises(
        ValueError, match=r"another size than annotated, e.g. img0.png \(annotated 41x30, file 40x30\)"
    ):
        load_detection_dataset(csv_root, split="train")
    _write_csv(csv_root / "train_labels.csv", [["missing.png", 40, 30, "dog", 1, 2, 11, 12]])
    with pytest.raises(FileNotFoundError, match="1 image file.*missing.png"):
        load_detection_dataset(csv_root, split="train")
    _write_csv(csv_root / "train_labels.csv", [["img0.png", 40, 30, "dog", 1, 2, 11, 12]])
    with pytest.raises(ValueError, match=r"class\(es\) \['dog'\] that are not in \['cat'\]"):
        load_detection_dataset(csv_root, split="train", class_names=["cat"])
    with pytest.raises(ValueError, match="invalid_boxes must be one of"):
        load_detection_dataset(csv_root, split="train", invalid_boxes="clip")


CSV_HEADER_WITHOUT_BOX_END = ("filename", "width", "height", "class", "xmin", "ymin")


# -- COCO json -----------------------------------------------------------------------------------------------


def _write_coco(root: Path) -> Path:
    _write_image(root / "val2017" / "a.jpg", 60, 40, seed=1)
    _write_image(root / "val2017" / "b.jpg", 30, 30, seed=2)
    content = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 60, "height": 40},
            {"id": 3, "file_name": "b.jpg", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 11, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20.5, 10], "area": 150.0, "iscrowd": 0},
            {"id": 12, "image_id": 7, "category_id": 1, "bbox": [0, 0, 60, 40], "area": 2400.0, "iscrowd": 1},
            {"id": 13, "image_id": 3, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "zebra"}, {"id": 1, "name": "person"}],
    }
    file = root / "annotations" / "instances_val2017.json"
    file.parent.mkdir(parents=True)
    file.write_text(json.dumps(content))
    return file


def test_coco_json_file_and_folder(tmp_path):
    file = _write_coco(tmp_path / "coco")
    from_file = load_detection_dataset(file)
    from_folder = load_detection_dataset(tmp_path / "coco", split="val")  # finds instances_val2017.json
    for dataset in (from_file, from_folder):
        assert dataset["image_id"] == [3, 7]  # COCO's own ids, sorted
        assert detection_class_names(dataset) == ["person", "zebra"]  # categories sorted by their COCO id
        assert set(dataset.features["objects"]) == BASE_OBJECT_FIELDS | {"iscrowd"}
        first, second = dataset[0]["objects"], dataset[1]["objects"]
        assert first == {"id": [13], "area": [12.0], "bbox": [[1, 2, 3, 4]], "category": [0], "iscrowd": [False]}
        assert second["bbox"] == [[10, 5, 20.5, 10], [0, 0, 60, 40]]
        assert second["category"] == [1, 0] and second["id"] == [11, 12] and second["area"] == [150.0, 2400.0]
        assert second["iscrowd"] == [False, True]
        assert dataset[1]["image"].size == (60, 40)
    references = detection_references(from_file)
    np.testing.assert_array_equal(references[1]["boxes"], [[10, 5, 30.5, 15], [0, 0, 60, 40]])
    assert references[1]["difficult"].tolist() == [False, True]  # crowd boxes are ignored ground truth
    with pytest.raises(ValueError, match=r"split 'train' not found .*available splits: \['val2017'\]"):
        load_detection_dataset(tmp_path / "coco", split="train")


def test_coco_bad_inputs(tmp_path):
    file = _write_coco(tmp_path / "coco")
    content = json.loads(file.read_text())
    content["annotations"][0]["bbox"] = [50, 5, 20, 10]
    file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 11\): invalid box of a.jpg \(outside the 60x40"):
        load_detection_dataset(file)
    content["annotations"][0]["category_id"] = 99
    file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="category_id 99 is not in 'categories'"):
        load_detection_dataset(file)
    del content["categories"]
    file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"not a COCO detection file: it has no \['categories'\]"):
        load_detection_dataset(file)
    moved = tmp_path / "elsewhere.json"
    moved.write_text(json.dumps(json.loads(file.read_text()) | {"categories": [{"id": 1, "name": "p"}]}))
    with pytest.raises(FileNotFoundError, match="pass images_dir="):
        load_detection_dataset(moved)


# -- Pascal VOC ----------------------------------------------------------------------------------------------


def _voc_xml(file_name: str, width: int, height: int, objects: list[tuple[str, int, tuple]]) -> str:
    parts = [f"<annotation><filename>{file_name}</filename><size><width>{width}</width><height>{height}</height>"]
    parts.append("<depth>3</depth></size>")
    for name, difficult, (xmin, ymin, xmax, ymax) in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>"
            "<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>"
            "</object>"
        )
    return "".join(parts) + "</annotation>"


def _write_voc(root: Path, names=("dog", "person")) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    specs = {
        "000001": (48, 32, [(names[0], 0, (1, 2, 30, 20)), (names[1], 1, (10, 10, 48, 32))]),
        "000002": (20, 24, [(names[1], 0, (3, 4, 15, 22))]),
        "000003": (16, 16, []),
    }
    for seed, (stem, (width, height, objects)) in enumerate(specs.items()):
        _write_image(root / "JPEGImages" / f"{stem}.jpg", width, height, seed=seed)
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(f"{stem}.jpg", width, height, objects))
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000003\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("000001  1\n000003 -1\n")


def test_voc_folder(tmp_path):
    _write_voc(tmp_path / "voc")
    train = load_detection_dataset(tmp_path / "voc", split="train")
    assert train["file_name"] == ["000001.jpg", "000003.jpg"] and train["image_id"] == [0, 2]
    assert detection_class_names(train) == list(VOC_CLASSES)
    assert set(train.features["objects"]) == BASE_OBJECT_FIELDS | {"difficult"}
    objects = train[0]["objects"]
    assert objects["bbox"] == [[1, 2, 29, 18], [10, 10, 38, 22]]  # raw VOC corners, no +1
    assert objects["category"] == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert objects["difficult"] == [False, True]
    assert train[1]["objects"]["bbox"] == []
    references = detection_references(train)
    np.testing.assert_array_equal(references[0]["boxes"], [[1, 2, 30, 20], [10, 10, 48, 32]])
    assert references[0]["difficult"].tolist() == [False, True]
    everything = load_detection_dataset(tmp_path / "voc")
    assert everything["file_name"] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    with pytest.raises(ValueError, match=r"split 'test' not found .*available splits: \['train', 'val'\]"):
        load_detection_dataset(tmp_path / "voc", split="test")
    # names outside VOC's 20: the sorted names of the whole folder, the same ids in every split
    _write_voc(tmp_path / "custom", names=("zebra", "apple"))
    custom_train = load_detection_dataset(tmp_path / "custom", split="train")
    custom_val = load_detection_dataset(tmp_path / "custom", split="val")
    assert detection_class_names(custom_train) == detection_class_names(custom_val) == ["apple", "zebra"]
    assert custom_val[0]["objects"]["category"] == [0]


def test_voc_bad_box_names_the_file(tmp_path):
    _write_voc(tmp_path / "voc")
    (tmp_path / "voc" / "Annotations" / "000002.xml").write_text(
        _voc_xml("000002.jpg", 20, 24, [("cat", 0, (3, 4, 30, 22))])
    )
    with pytest.raises(ValueError, match=r"Annotations/000002.xml <object> 0: invalid box of 000002.jpg"):
        load_detection_dataset(tmp_path / "voc", split="val")


# -- layouts that are already datasets, unlabelled folders ---------------------------------------------------


def test_saved_and_list_of_dicts_sources(csv_root, tmp_path):
    train = load_detection_dataset(csv_root, split="train")
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "saved"))
    reloaded = load_detection_dataset(tmp_path / "saved")
    assert reloaded.features == train.features and reloaded["objects"] == train["objects"]
    with pytest.raises(ValueError, match=r"split 'test' not found .*\['train'\]"):
        load_detection_dataset(tmp_path / "saved", split="test")
    # a list-of-dicts `objects` column with another image column name becomes the examples' layout
    listed = datasets.Dataset.from_dict(
        {
            "img": [str(csv_root / "images" / "img0.png")],
            "objects": [[{"bbox": [1.0, 2.0, 3.0, 4.0], "category": 2}]],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                # a list of dicts (a Python list: datasets.List in datasets >= 4)
                "objects": [
                    {
                        "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                        "category": datasets.Value("int64"),
                    }
                ],
            }
        ),
    )
    listed.save_to_disk(str(tmp_path / "listed"))
    converted = load_detection_dataset(tmp_path / "listed")
    assert converted.column_names == ["image", "objects"]
    assert converted[0]["objects"] == {"bbox": [[1.0, 2.0, 3.0, 4.0]], "category": [2]}
    assert detection_references(converted)[0]["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]]
    with pytest.raises(ValueError, match="not a ClassLabel"):
        detection_class_names(converted)
    broken = listed.map(lambda row: {"objects": [{"bbox": [1.0, 2.0, 0.0, 4.0], "category": 2}]})
    broken.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match="row 0: invalid box"):
        load_detection_dataset(tmp_path / "broken")


def test_unlabelled_folder_with_split_folders(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for index in range(count):
            _write_image(tmp_path / "unlabelled" / split / f"{index}.jpg", 12, 10, seed=index)
    train = load_detection_dataset(tmp_path / "unlabelled", split="train")
    assert train.column_names == ["image", "image_id", "file_name"]
    assert train["file_name"] == ["0.jpg", "1.jpg", "2.jpg"] and train[0]["image"].size == (12, 10)
    assert len(load_detection_dataset(tmp_path / "unlabelled")) == 5
    with pytest.raises(ValueError, match=r"available splits: \['train', 'val'\]"):
        load_detection_dataset(tmp_path / "unlabelled", split="test")
    with pytest.raises(ValueError, match="no 'objects' column"):
        load_detection_dataset(tmp_path / "unlabelled", split="train", require_objects=True)
    with pytest.raises(ValueError, match="unlabelled images have no references"):
        detection_references(train)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no detection dataset found"):
        load_detection_dataset(tmp_path / "empty")
