"""benchmarks/stego_camvid_analysis.py: the kNN-partner and cluster statistics on hand-made tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analysis():
    return load_script("benchmarks/stego_camvid_analysis.py", "stego_camvid_analysis")


def test_knn_statistics_by_hand(analysis):
    # 10 items = 2 images x 5 crops; item i's partners (ranks 1, 2): one crop of the same image and crop i of the
    # other image (same position)
    knn = torch.tensor([[i, 5 * (i // 5) + (i + 1) % 5, (i + 5) % 10] for i in range(10)])
    labels = torch.zeros(10, 2, 2, dtype=torch.long)  # class 0 everywhere ...
    labels[0, 0, 0] = 1  # ... class 1 in a quarter of item 0 and of item 5; item 9 has one ignored pixel
    labels[5, 0, 0] = 1
    labels[9, 0, 0] = -1
    statistics = analysis.knn_statistics(knn, labels, num_classes=2, num_neighbors=2)
    assert statistics["same_image"] == 0.5 and statistics["same_crop_position"] == 0.5
    assert statistics["within_3_images"] == 1.0  # images 0 and 1 are adjacent
    class0, class1 = statistics["per_class"]
    assert class0 == {"frequency": 1.0, "knn_rate": 1.0}
    # items 0 and 5 show class 1: their partners are (1, 5) and (6, 0), so 2 of 4 partners show it
    assert class1["frequency"] == pytest.approx(0.2) and class1["knn_rate"] == pytest.approx(0.5)


def test_cluster_usage_counts_predicted_clusters_and_lost_classes(analysis):
    results = {"cluster": {"confusion_matrix": [[5, 0, 1], [0, 0, 3]], "per_class_iou": [0.8, 0.005]}}
    assert analysis.cluster_usage(results) == {"clusters": 3, "used": 2, "lost_classes": [1]}
