"""The generated "scenes" dataset: determinism, labels, learnability and the folder writer."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from scipy.cluster.vq import kmeans2
from scipy.optimize import linear_sum_assignment

from hf_useg.data import (
    load_segmentation_dataset,
    make_synthetic_scenes,
    save_synthetic_scenes,
    segmentation_metadata,
)


def _arrays(dataset):
    images = np.stack([np.asarray(item["image"]) for item in dataset])
    labels = np.stack([np.asarray(item["label"]) for item in dataset])
    return images, labels


def test_shapes_values_and_metadata():
    dataset = make_synthetic_scenes(num_images=6, image_size=(24, 40), num_classes=5, seed=3)
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 6
    assert dataset.column_names == ["image", "label"]
    item = dataset[0]
    assert item["image"].mode == "RGB" and item["image"].size == (40, 24)
    assert item["label"].mode == "L" and item["label"].size == (40, 24)
    _, labels = _arrays(dataset)
    assert labels.min() >= 0 and labels.max() <= 4
    assert len(np.unique(labels)) >= 3  # several classes appear over six scenes

    assert "SYNTHETIC" in dataset.info.description and "Not real images" in dataset.info.description
    meta = segmentation_metadata(dataset)
    assert meta["synthetic"] is True and meta["num_classes"] == 5
    assert meta["class_names"] == [f"synthetic-class-{i}" for i in range(5)]


def test_each_image_is_a_few_regions():
    _, labels = _arrays(make_synthetic_scenes(num_images=8, image_size=32, num_classes=4, seed=0))
    for label in labels:
        # Voronoi cells: few label changes along rows compared with a noise map
        changes = (label[:, 1:] != label[:, :-1]).mean()
        assert changes < 0.15


def test_deterministic_given_seed():
    first_images, first_labels = _arrays(make_synthetic_scenes(num_images=4, image_size=16, seed=7))
    again_images, again_labels = _arrays(make_synthetic_scenes(num_images=4, image_size=16, seed=7))
    other_images, _ = _arrays(make_synthetic_scenes(num_images=4, image_size=16, seed=8))
    np.testing.assert_array_equal(first_images, again_images)
    np.testing.assert_array_equal(first_labels, again_labels)
    assert not np.array_equal(first_images, other_images)


def test_class_appearance_is_shared_across_seeds():
    def class_means(seed):
        images, labels = _arrays(make_synthetic_scenes(num_images=24, image_size=32, num_classes=4, seed=seed))
        return np.stack([images[labels == c].mean(axis=0) for c in range(4)])

    first, second = class_means(0), class_means(1)
    assert np.abs(first - second).max() < 6.0
    # and the classes differ from each other by far more than that
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 80


def _colour_kmeans_accuracy(images, labels, num_classes, seed=0):
    pixels = images.reshape(-1, 3).astype(np.float64)
    truth = labels.reshape(-1)
    rng = np.random.default_rng(seed)
    sample = pixels[rng.choice(len(pixels), size=min(20000, len(pixels)), replace=False)]
    # best of a few k-means++ restarts (lowest inertia), as k-means is normally run
    best = None
    for restart in range(5):
        centroids, assignment = kmeans2(sample, num_classes, minit="++", seed=seed + restart)
        inertia = ((sample - centroids[assignment]) ** 2).sum()
        if best is None or inertia < best[0]:
            best = (inertia, centroids)
    centroids = best[1]
    predicted = np.argmin(((pixels[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (predicted, truth), 1)
    rows, columns = linear_sum_assignment(-confusion)
    return confusion[rows, columns].sum() / confusion.sum()


def test_learnable_by_colour_kmeans():
    images, labels = _arrays(make_synthetic_scenes(num_images=32, image_size=48, num_classes=4, seed=0))
    assert _colour_kmeans_accuracy(images, labels, 4) > 0.8
    # the same clustering against shuffled labels stays near chance: the score measures the labels
    shuffled = np.random.default_rng(0).permutation(labels.reshape(-1)).reshape(labels.shape)
    assert _colour_kmeans_accuracy(images, shuffled, 4) < 0.4


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_images must be a positive int"):
        make_synthetic_scenes(num_images=0)
    with pytest.raises(ValueError, match=r"num_classes must be an int in \[1, 255\]"):
        make_synthetic_scenes(num_classes=256)
    with pytest.raises(ValueError, match=r"image_size must be at least 4x4"):
        make_synthetic_scenes(image_size=3)
    with pytest.raises(ValueError, match=r"image_size must be an int or a \(height, width\) pair"):
        make_synthetic_scenes(image_size="64")


def test_save_and_load_round_trip(tmp_path):
    root = save_synthetic_scenes(tmp_path / "scenes", num_images=5, image_size=20, num_classes=3, seed=2)
    save_synthetic_scenes(tmp_path / "scenes", num_images=2, image_size=20, num_classes=3, seed=9, split="val")
    assert sorted(p.name for p in (root / "images").iterdir()) == ["train", "val"]
    classes = json.loads((root / "classes.json").read_text())
    assert classes["synthetic"] is True and classes["num_classes"] == 3

    loaded = load_segmentation_dataset(root, split="train")
    assert loaded["file_name"] == [f"scene_{i:05d}" for i in range(5)]
    expected_images, expected_labels = _arrays(make_synthetic_scenes(5, 20, 3, seed=2))
    images, labels = _arrays(loaded)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    meta = segmentation_metadata(loaded)
    assert meta["synthetic"] is True and meta["num_classes"] == 3 and meta["class_names"][2] == "synthetic-class-2"
    assert len(load_segmentation_dataset(root, split="val")) == 2

    # rewriting a split with fewer scenes leaves no stale files behind
    save_synthetic_scenes(root, num_images=3, image_size=20, num_classes=3, seed=2)
    assert len(load_segmentation_dataset(root, split="train")) == 3
