"""Five-crops (METHODS 0.5) and kNN positives (METHODS 0.6)."""

from __future__ import annotations

import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_useg.data import (
    compute_global_descriptors,
    expand_five_crops,
    five_crop,
    five_crop_boxes,
    global_descriptors,
    make_synthetic_scenes,
    nearest_neighbors,
    segmentation_metadata,
)

# ---------------------------------------------------------------------------------------------- five crops


def test_five_crop_boxes_by_hand():
    # 5x7: (h, w) = (int(2.5), int(3.5)) = (2, 3); bottom/right start at 3/4; center top round(1.5) = 2
    assert five_crop_boxes(5, 7) == [(0, 0, 2, 3), (0, 4, 2, 3), (3, 0, 2, 3), (3, 4, 2, 3), (2, 2, 2, 3)]
    # 9x11: (4, 5); center top round(2.5) = 2 (half to even, not 3), left round(3.0) = 3
    assert five_crop_boxes(9, 11) == [(0, 0, 4, 5), (0, 6, 4, 5), (5, 0, 4, 5), (5, 6, 4, 5), (2, 3, 4, 5)]
    # 13x13: (6, 6); center round(3.5) = 4 (half to even, up this time)
    assert five_crop_boxes(13, 13)[4] == (4, 4, 6, 6)
    # CamVid frames, 360x480
    assert five_crop_boxes(360, 480) == [
        (0, 0, 180, 240),
        (0, 240, 180, 240),
        (180, 0, 180, 240),
        (180, 240, 180, 240),
        (90, 120, 180, 240),
    ]
    # another ratio: 7x10 at 0.3 -> (int(2.1), int(3.0)) = (2, 3); center (round(2.5), round(3.5)) = (2, 4)
    assert five_crop_boxes(7, 10, ratio=0.3) == [
        (0, 0, 2, 3),
        (0, 7, 2, 3),
        (5, 0, 2, 3),
        (5, 7, 2, 3),
        (2, 4, 2, 3),
    ]
    assert five_crop_boxes(4, 6, ratio=1.0) == [(0, 0, 4, 6)] * 5


def test_five_crop_boxes_errors():
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        five_crop_boxes(10, 10, ratio=0)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        five_crop_boxes(10, 10, ratio=1.5)
    with pytest.raises(ValueError, match=r"height must be a positive int"):
        five_crop_boxes(0, 10)
    with pytest.raises(ValueError, match=r"width must be a positive int"):
        five_crop_boxes(10, 2.5)
    with pytest.raises(ValueError, match=r"empty crop of a 1x10 image"):
        five_crop_boxes(1, 10)


def test_five_crop_on_pil_numpy_and_tensor():
    array = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    numpy_crops = five_crop(array)
    assert [crop.shape for crop in numpy_crops] == [(2, 3, 3)] * 5
    np.testing.assert_array_equal(numpy_crops[1], array[0:2, 4:7])
    np.testing.assert_array_equal(numpy_crops[4], array[2:4, 2:5])
    pil_crops = five_crop(Image.fromarray(array))
    tensor_crops = five_crop(torch.from_numpy(array).permute(2, 0, 1))
    for numpy_crop, pil_crop, tensor_crop in zip(numpy_crops, pil_crops, tensor_crops):
        np.testing.assert_array_equal(np.asarray(pil_crop), numpy_crop)
        np.testing.assert_array_equal(tensor_crop.permute(1, 2, 0).numpy(), numpy_crop)
    with pytest.raises(TypeError, match=r"expected a PIL image"):
        five_crop([[1, 2], [3, 4]])


def test_expand_five_crops_lazy_and_materialised():
    source = make_synthetic_scenes(num_images=3, image_size=(9, 13), num_classes=4, seed=5)
    crops = expand_five_crops(source)
    assert len(crops) == 15
    assert segmentation_metadata(crops)["num_classes"] == 4 and segmentation_metadata(crops)["synthetic"]
    for index in range(15):
        item = crops[index]
        source_index, crop_index = divmod(index, 5)
        assert (item["source_index"], item["crop_index"]) == (source_index, crop_index)
        original = source[source_index]
        expected_image = five_crop(np.asarray(original["image"]))[crop_index]
        expected_label = five_crop(np.asarray(original["label"]))[crop_index]
        assert item["image"].size == (6, 4)
        np.testing.assert_array_equal(np.asarray(item["image"]), expected_image)
        np.testing.assert_array_equal(np.asarray(item["label"]), expected_label)

    batch = crops[5:8]  # several items at once
    assert batch["crop_index"] == [0, 1, 2] and batch["source_index"] == [1, 1, 1]

    restored = pickle.loads(pickle.dumps(crops))  # what DataLoader workers do
    np.testing.assert_array_equal(np.asarray(restored[7]["label"]), np.asarray(crops[7]["label"]))

    materialised = expand_five_crops(source, lazy=False)
    assert isinstance(materialised.features["image"], datasets.Image)
    assert materialised.column_names == ["image", "label", "source_index", "crop_index"]
    for index in (0, 9, 14):
        np.testing.assert_array_equal(np.asarray(materialised[index]["image"]), np.asarray(crops[index]["image"]))
        np.testing.assert_array_equal(np.asarray(materialised[index]["label"]), np.asarray(crops[index]["label"]))


def test_expand_five_crops_errors():
    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    label = Image.fromarray(np.zeros((8, 6), dtype=np.uint8))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    mismatched = datasets.Dataset.from_dict({"image": [image], "label": [label]}, features=features)
    crops = expand_five_crops(mismatched)
    with pytest.raises(ValueError, match=r"item 0: label size \(8, 6\) differs from image size \(8, 8\)"):
        crops[0]
    with pytest.raises(ValueError, match=r"ratio must be a number"):
        expand_five_crops(mismatched, ratio=2)
    with pytest.raises(ValueError, match=r"empty"):
        expand_five_crops(mismatched.select([]))


# ---------------------------------------------------------------------------------------------- descriptors


def test_global_descriptors_by_hand():
    maps = torch.tensor(
        [
            [[[1.0, 3.0]], [[0.0, 0.0]]],  # channel means (2, 0) -> (1, 0)
            [[[1.0, 1.0]], [[-1.0, -1.0]]],  # (1, -1) -> (1, -1) / sqrt(2)
            [[[0.0, 0.0]], [[0.0, 0.0]]],  # all zero -> zero, not NaN
        ]
    )
    expected = torch.tensor([[1.0, 0.0], [2**-0.5, -(2**-0.5)], [0.0, 0.0]])
    torch.testing.assert_close(global_descriptors(maps), expected)
    with pytest.raises(ValueError, match=r"\[N, C, h, w\]"):
        global_descriptors(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        global_descriptors(np.zeros((1, 1, 1, 1)))


def test_compute_global_descriptors():
    torch.manual_seed(0)
    batches = [torch.randn(4, 6, 3, 3), torch.randn(2, 6, 3, 3)]
    expected = global_descriptors(torch.cat(batches))
    double = lambda x: 2 * x  # noqa: E731 - scaling must not change normalised descriptors
    for wrapped in (batches, [{"pixel_values": b} for b in batches], [(b, None) for b in batches]):
        result = compute_global_descriptors(double, wrapped, progress=False)
        torch.testing.assert_close(result, expected)
    with pytest.raises(ValueError, match=r"no 'pixel_values'"):
        compute_global_descriptors(double, [{"image": batches[0]}], progress=False)
    with pytest.raises(ValueError, match=r"no batches"):
        compute_global_descriptors(double, [], progress=False)


# ---------------------------------------------------------------------------------------------- kNN


def _reference_neighbors(descriptors: np.ndarray, k: int) -> np.ndarray:
    """Full similarity matrix, then each row sorted by (similarity desc, not-self, index)."""
    normalised = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    similarities = normalised @ normalised.T
    rows = []
    for i in range(len(descriptors)):
        order = sorted(range(len(descriptors)), key=lambda j: (-similarities[i, j], j != i, j))
        rows.append(order[:k])
    return np.asarray(rows)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_nearest_neighbors_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(120, 16))
    result = nearest_neighbors(torch.from_numpy(descriptors), k=9, chunk_size=chunk_size)
    assert result.dtype == torch.long and result.shape == (120, 9)
    np.testing.assert_array_equal(result.numpy(), _reference_neighbors(descriptors, 9))
    assert torch.equal(result[:, 0], torch.arange(120))  # rank 0 is the item itself


def test_nearest_neighbors_float32_and_all_items():
    rng = np.random.default_rng(1)
    descriptors = rng.normal(size=(40, 8)).astype(np.float32)
    result = nearest_neighbors(torch.from_numpy(descriptors), k=40, chunk_size=16, device="cpu")
    np.testing.assert_array_equal(result.numpy(), _reference_neighbors(descriptors.astype(np.float64), 40))
    assert all(sorted(row) == list(range(40)) for row in result.tolist())


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_nearest_neighbors_ties_are_deterministic(chunk_size):
    # exact ties: 0, 1, 3 point the same way (3 twice as long), 2 and 4 the other way
    descriptors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    expected_all = [[0, 1, 3, 2, 4], [1, 0, 3, 2, 4], [2, 4, 0, 1, 3], [3, 0, 1, 2, 4], [4, 2, 0, 1, 3]]
    assert nearest_neighbors(descriptors, k=5, chunk_size=chunk_size).tolist() == expected_all
    # k cuts through the tie {0, 1, 3}: the item itself first, then the lower indices
    assert nearest_neighbors(descriptors, k=2, chunk_size=chunk_size).tolist() == [
        [0, 1],
        [1, 0],
        [2, 4],
        [3, 0],
        [4, 2],
    ]
    np.testing.assert_array_equal(
        nearest_neighbors(descriptors, k=3, chunk_size=chunk_size).numpy(),
        _reference_neighbors(descriptors.numpy().astype(np.float64), 3),
    )


def test_nearest_neighbors_many_duplicates_match_reference():
    # one-hot directions (exact dot products) with many duplicates and random lengths
    rng = np.random.default_rng(3)
    descriptors = np.eye(4)[rng.integers(0, 4, size=50)] * rng.uniform(0.5, 2.0, size=(50, 1))
    for chunk_size in (3, 50):
        result = nearest_neighbors(torch.from_numpy(descriptors), k=6, chunk_size=chunk_size)
        np.testing.assert_array_equal(result.numpy(), _reference_neighbors(descriptors, 6))


def test_nearest_neighbors_errors():
    descriptors = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=5\]"):
        nearest_neighbors(descriptors, k=6)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=5\]"):
        nearest_neighbors(descriptors, k=0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        nearest_neighbors(descriptors, k=2, chunk_size=0)
    with pytest.raises(ValueError, match=r"non-empty \[N, C\]"):
        nearest_neighbors(torch.randn(5, 3, 1), k=2)
    descriptors[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        nearest_neighbors(descriptors, k=2)
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        nearest_neighbors(np.zeros((3, 2)), k=1)


@pytest.mark.parametrize("matmul_dtype", ["bfloat16", "float16", torch.bfloat16])
def test_half_precision_matmul_rescored_in_float32_matches_brute_force(matmul_dtype):
    rng = np.random.default_rng(4)
    descriptors = rng.normal(size=(150, 16)).astype(np.float32)
    expected = _reference_neighbors(descriptors.astype(np.float64), 9)
    for chunk_size in (7, None):
        result = nearest_neighbors(
            torch.from_numpy(descriptors), k=9, chunk_size=chunk_size, matmul_dtype=matmul_dtype
        )
        np.testing.assert_array_equal(result.numpy(), expected)
    # exact ties (one-hot directions are exact in half precision): the same deterministic order
    ties = np.eye(4)[rng.integers(0, 4, size=50)] * rng.uniform(0.5, 2.0, size=(50, 1))
    result = nearest_neighbors(torch.from_numpy(ties).float(), k=6, chunk_size=5, matmul_dtype=matmul_dtype)
    np.testing.assert_array_equal(result.numpy(), _reference_neighbors(ties, 6))


def test_automatic_chunk_size_gives_the_same_table():
    descriptors = torch.from_numpy(np.random.default_rng(5).normal(size=(300, 8)))
    assert torch.equal(nearest_neighbors(descriptors, k=5), nearest_neighbors(descriptors, k=5, chunk_size=13))


def test_faiss_backend_matches_brute_force():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    descriptors = rng.normal(size=(120, 16)).astype(np.float32)
    result = nearest_neighbors(torch.from_numpy(descriptors), k=9, backend="faiss", chunk_size=50)
    np.testing.assert_array_equal(result.numpy(), _reference_neighbors(descriptors.astype(np.float64), 9))
    ties = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    assert nearest_neighbors(ties, k=2, backend="faiss").tolist() == [[0, 1], [1, 0], [2, 4], [3, 0], [4, 2]]


def test_faiss_backend_without_faiss_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(ImportError, match=r"backend='faiss'\) needs the faiss package \(pip install faiss-cpu"):
        nearest_neighbors(torch.randn(5, 3), k=2, backend="faiss")


def test_nearest_neighbors_option_errors():
    descriptors = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'faiss'\), got 'annoy'"):
        nearest_neighbors(descriptors, k=2, backend="annoy")
    with pytest.raises(ValueError, match=r"matmul_dtype must be None, 'float16' or 'bfloat16', got 'int8'"):
        nearest_neighbors(descriptors, k=2, matmul_dtype="int8")
    with pytest.raises(ValueError, match=r"matmul_dtype must be None"):
        nearest_neighbors(descriptors, k=2, matmul_dtype=torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nearest_neighbors_on_cuda_returns_the_cpu_table():
    rng = np.random.default_rng(7)
    descriptors = torch.from_numpy(rng.normal(size=(500, 32)).astype(np.float32))
    expected = nearest_neighbors(descriptors, k=7)
    for kwargs in ({}, {"matmul_dtype": "float16"}, {"matmul_dtype": "bfloat16"}):
        result = nearest_neighbors(descriptors.cuda(), k=7, chunk_size=64, **kwargs)
        assert result.device.type == "cpu"
        np.testing.assert_array_equal(np.sort(result.numpy(), axis=1), np.sort(expected.numpy(), axis=1))
        assert nearest_neighbors(descriptors, k=7, device="cuda", **kwargs).device.type == "cpu"
