"""STEGO's ``cluster_probe_init="kmeans"`` (the demo's): the cluster probe's centroids set by spherical k-means of
the first batch's code after the first step, instead of staying at their N(0, 1) draw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf_useg.models.stego.training_stego as training_stego
from hf_useg.models.stego.training_stego import StegoTrainingOptions, kmeans_probe_centroids

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "stego_tiny.yaml"


def test_kmeans_probe_centroids_point_at_the_code_clusters():
    torch.manual_seed(0)
    directions = F.normalize(torch.randn(3, 8), dim=1)
    code = (directions[torch.arange(48) % 3] * 4 + 0.05 * torch.randn(48, 8)).T.reshape(1, 8, 6, 8)
    centroids = kmeans_probe_centroids(code, 3, norm=2.5)
    assert centroids.shape == (3, 8)
    torch.testing.assert_close(centroids.norm(dim=1), torch.full((3,), 2.5))
    cosine = F.normalize(centroids, dim=1) @ directions.T
    assert sorted(cosine.argmax(1).tolist()) == [0, 1, 2] and bool((cosine.amax(1) > 0.99).all())


def test_cluster_probe_init_is_checked():
    assert StegoTrainingOptions().cluster_probe_init == "random"  # STEGO's N(0, 1) centroids by default
    with pytest.raises(ValueError, match="cluster_probe_init must be 'random' or 'kmeans'"):
        StegoTrainingOptions(cluster_probe_init="kmeans++")


@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_training_sets_the_probe_from_the_first_batch(tmp_path, monkeypatch, init):
    from transformers import AutoModel

    import hf_useg  # noqa: F401
    from hf_useg.training import load_training_arguments, train

    calls = []

    def recording(code, num_clusters, norm, seed=0, num_init=5):
        centroids = kmeans_probe_centroids(code, num_clusters, norm, seed=seed, num_init=num_init)
        calls.append((code.shape, centroids))
        return centroids

    monkeypatch.setattr(training_stego, "kmeans_probe_centroids", recording)
    args = load_training_arguments(
        TINY, output_dir=str(tmp_path), max_steps=1, val_every=None, cluster_probe_init=init, progress=False
    )
    summary = train(args)
    if init == "random":
        assert calls == []
        return
    [(shape, centroids)] = calls  # once, after the first step, on that batch's code [batch, dim, h, w]
    assert shape[:2] == (4, 8)
    model = AutoModel.from_pretrained(summary["model_dir"])
    torch.testing.assert_close(model.cluster_probe.clusters.detach(), centroids)  # no later step moved them
