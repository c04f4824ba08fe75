import math

import pytest
import torch
import torch.nn.functional as F

from hf_useg.clustering import ClusterProbe, assign_to_centroids, kmeans, minibatch_kmeans_update


def test_assign_to_centroids_by_hand_and_chunking():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.1], [4.0, 4.0], [2.5, 2.5]])
    centroids = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
    labels, cost = assign_to_centroids(x, centroids)
    assert labels.tolist() == [0, 0, 1, 1]
    # squared distances: 0, 1.01, 0, 2 * 1.5^2 = 4.5
    torch.testing.assert_close(cost, torch.tensor([0.0, 1.01, 0.0, 4.5]))
    chunked, _ = assign_to_centroids(x, centroids, chunk_size=1)
    assert chunked.tolist() == labels.tolist()
    # cosine: [1, 0.1] is closer in angle to [1, 0] than to [1, 1]
    labels, cost = assign_to_centroids(x[1:2], torch.tensor([[1.0, 0.0], [1.0, 1.0]]), metric="cosine")
    assert labels.tolist() == [0]
    torch.testing.assert_close(cost, 1 - torch.tensor([1.0 / math.sqrt(1.01)]))


def test_kmeans_recovers_separated_blobs():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[8.0, 0.0], [0.0, 8.0], [-8.0, -8.0]])
    x = torch.cat([c + torch.randn(60, 2, generator=generator) for c in centers])
    truth = torch.arange(3).repeat_interleave(60)
    result = kmeans(x, 3, seed=1, num_init=2)
    # every true blob maps to exactly one cluster
    pairs = {(int(t), int(p)) for t, p in zip(truth, result.labels)}
    assert len(pairs) == 3
    for center in centers:
        assert torch.cdist(center[None], result.centroids).min() < 0.5
    # inertia equals the sum of squared distances to the assigned centroid
    expected = ((x - result.centroids[result.labels]) ** 2).sum()
    assert result.inertia == pytest.approx(float(expected), rel=1e-4)


def test_cosine_kmeans_ignores_vector_norms():
    generator = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=1)
    x = torch.cat(
        [
            d * torch.rand(40, 1, generator=generator) * 10 + 0.01 * torch.randn(40, 3, generator=generator)
            for d in directions
        ]
    )
    result = kmeans(x, 2, metric="cosine", seed=0)
    assert torch.allclose(result.centroids.norm(dim=1), torch.ones(2), atol=1e-5)
    assert len(set(result.labels[:40].tolist())) == 1 and len(set(result.labels[40:].tolist())) == 1
    assert result.labels[0] != result.labels[40]


def test_kmeans_accepts_feature_maps_and_is_deterministic():
    maps = torch.randn(2, 4, 3, 3)
    first = kmeans(maps, 3, seed=5)
    second = kmeans(maps.permute(0, 2, 3, 1).reshape(-1, 4), 3, seed=5)
    torch.testing.assert_close(first.centroids, second.centroids)
    assert first.labels.shape == (18,)


def test_kmeans_errors():
    with pytest.raises(ValueError, match="cannot make 5 clusters from 3 vectors"):
        kmeans(torch.randn(3, 2), 5)
    with pytest.raises(ValueError, match="empty"):
        kmeans(torch.randn(0, 2), 1)
    with pytest.raises(TypeError, match="floating-point"):
        kmeans(torch.ones(4, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="metric"):
        kmeans(torch.randn(4, 2), 2, metric="manhattan")


def test_minibatch_kmeans_update_by_hand():
    # PiCIE (METHODS 2.3): count_k += n_k; eta = n_k / (count_k + 1e-6); mu <- (1 - eta) mu + eta mean
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    counts = torch.tensor([3.0, 1.0, 5.0])
    x = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])  # two to centroid 0, one to centroid 1, none to 2
    new_centroids, new_counts = minibatch_kmeans_update(centroids, counts, x)
    assert new_counts.tolist() == [5.0, 2.0, 5.0]
    eta0 = 2 / (5 + 1e-6)
    mean0 = torch.tensor([0.9, 0.3])
    expected0 = (1 - eta0) * centroids[0] + eta0 * mean0
    eta1 = 1 / (2 + 1e-6)
    expected1 = (1 - eta1) * centroids[1] + eta1 * torch.tensor([0.0, 1.0])
    torch.testing.assert_close(new_centroids[0], expected0)
    torch.testing.assert_close(new_centroids[1], expected1)
    torch.testing.assert_close(new_centroids[2], centroids[2])  # untouched
    assert counts.tolist() == [3.0, 1.0, 5.0]  # inputs not modified


def test_minibatch_kmeans_update_shape_errors():
    with pytest.raises(ValueError, match="counts"):
        minibatch_kmeans_update(torch.zeros(2, 3), torch.zeros(3), torch.zeros(4, 3))


def test_cluster_probe_hard_and_soft_by_hand():
    probe = ClusterProbe(dim=2, num_clusters=2)
    with torch.no_grad():
        probe.clusters.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    # two pixels: code [1, 1] (cos 0.7071 to both) and [0, -1] (cos 0 and -1)
    code = torch.tensor([[1.0, 0.0], [1.0, -1.0]]).reshape(1, 2, 1, 2)
    inner = torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, -1.0]])
    loss, probs = probe(code)
    # hard: pixel 0 ties -> argmax picks cluster 0; pixel 1 -> cluster 0 (0 > -1)
    assert probs[0, :, 0, 0].tolist() == [1.0, 0.0] and probs[0, :, 0, 1].tolist() == [1.0, 0.0]
    assert loss.item() == pytest.approx(-(inner[0, 0] + inner[1, 0]).item() / 2, abs=1e-6)
    loss, probs = probe(code, alpha=3.0)
    soft = torch.softmax(3.0 * inner, dim=1)
    torch.testing.assert_close(probs[0].permute(1, 2, 0).reshape(2, 2), soft)
    assert loss.item() == pytest.approx(-(soft * inner).sum(1).mean().item(), abs=1e-6)
    log_probs = probe.log_probs(code, alpha=2.0)
    torch.testing.assert_close(log_probs[0].permute(1, 2, 0).reshape(2, 2), torch.log_softmax(2.0 * inner, dim=1))


def test_cluster_probe_gradient_only_reaches_centroids_when_code_detached():
    probe = ClusterProbe(dim=4, num_clusters=3)
    code = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss, _ = probe(code.detach())
    loss.backward()
    assert probe.clusters.grad is not None and probe.clusters.grad.abs().sum() > 0
    assert code.grad is None
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        probe(torch.randn(2, 5, 3, 3))
