"""Clustering primitives shared by every method: k-means (Euclidean and cosine), PiCIE's online mini-batch
k-means step, and STEGO's cluster probe.

Everything here is plain torch and runs on whatever device its inputs live on. Assignments are computed in
chunks so that millions of vectors never need an ``N x K`` distance matrix in memory at once.

Example:

```python
>>> import torch
>>> from hf_useg.clustering import kmeans
>>> x = torch.cat([torch.randn(50, 2) + 5, torch.randn(50, 2) - 5])
>>> result = kmeans(x, num_clusters=2, seed=0)
>>> result.centroids.shape, result.labels.shape
(torch.Size([2, 2]), torch.Size([100]))
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClusterProbe",
    "KMeansResult",
    "assign_to_centroids",
    "kmeans",
    "minibatch_kmeans_update",
]

_METRICS = ("euclidean", "cosine")


@dataclass
class KMeansResult:
    """Output of [`kmeans`]: centroids ``[K, C]``, labels ``[N]``, inertia (sum of squared distances for
    ``"euclidean"``, sum of ``1 - cosine`` for ``"cosine"``), and the number of Lloyd iterations run."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    num_iterations: int


def _check_vectors(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 4:  # [B, C, h, w] feature maps -> one vector per pixel
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, C] vectors or [B, C, h, w] feature maps, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: no vectors to cluster")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def assign_to_centroids(
    x: torch.Tensor, centroids: torch.Tensor, metric: str = "euclidean", chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every vector, in chunks.

    Args:
        x: ``[N, C]`` vectors (or ``[B, C, h, w]`` feature maps, flattened pixel-wise).
        centroids: ``[K, C]``.
        metric: ``"euclidean"`` (squared L2) or ``"cosine"`` (both sides L2-normalised, largest cosine wins).
        chunk_size: vectors per chunk; memory is ``O(chunk_size * K)``.

    Returns:
        ``(labels [N] long, cost [N])`` where cost is the squared distance (euclidean) or ``1 - cosine``.
        Ties go to the lowest centroid index.
    """
    x = _check_vectors(x)
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids must be [K, {x.shape[1]}], got shape {tuple(centroids.shape)}")
    centroids = centroids.to(device=x.device, dtype=x.dtype)
    if metric == "cosine":
        centroids = F.normalize(centroids, dim=1)
    else:
        centroid_sq = (centroids * centroids).sum(1)
    labels, costs = [], []
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        if metric == "cosine":
            similarity = F.normalize(chunk, dim=1) @ centroids.T
            best, index = similarity.max(dim=1)
            costs.append((1.0 - best).clamp_min(0))
        else:
            distance = (chunk * chunk).sum(1, keepdim=True) - 2.0 * chunk @ centroids.T + centroid_sq
            best, index = distance.min(dim=1)
            costs.append(best.clamp_min(0))
        labels.append(index)
    return torch.cat(labels), torch.cat(costs)


def _kmeans_plus_plus(x: torch.Tensor, num_clusters: int, metric: str, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(x.shape[0], (1,), generator=generator, device="cpu").item()
    centroids = x[first : first + 1]
    _, cost = assign_to_centroids(x, centroids, metric)
    for _ in range(1, num_clusters):
        weights = cost.double().cpu()
        if weights.sum() <= 0:  # fewer distinct points than clusters: pick uniformly
            weights = torch.ones_like(weights)
        index = torch.multinomial(weights, 1, generator=generator).item()
        centroids = torch.cat([centroids, x[index : index + 1]])
        _, new_cost = assign_to_centroids(x, centroids[-1:], metric)
        cost = torch.minimum(cost, new_cost)
    return centroids


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    metric: str = "euclidean",
    num_iterations: int = 100,
    num_init: int = 1,
    init: str | torch.Tensor = "k-means++",
    tolerance: float = 1e-6,
    seed: int | None = 0,
    chunk_size: int = 65536,
) -> KMeansResult:
    """Lloyd's k-means on ``[N, C]`` vectors (or ``[B, C, h, w]`` feature maps).

    ``metric="cosine"`` is spherical k-means: vectors and centroids are L2-normalised and the centroid update
    is the re-normalised mean, which is the DINO-feature baseline's clustering (METHODS 4.2).
    ``metric="euclidean"`` is plain k-means (PiCIE's initialisation, METHODS 2.3).

    Args:
        num_iterations: maximum Lloyd iterations.
        num_init: restarts with different seeds; the lowest inertia wins.
        init: ``"k-means++"``, ``"random"`` (distinct random vectors) or an explicit ``[K, C]`` tensor.
        tolerance: stop when the relative change of inertia falls below it.
        seed: seed of the initialisation (deterministic for a given seed and input).

    An empty cluster is re-seeded with the vector that currently has the largest cost.
    """
    x = _check_vectors(x)
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if num_clusters > x.shape[0]:
        raise ValueError(f"cannot make {num_clusters} clusters from {x.shape[0]} vectors")
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    best: KMeansResult | None = None
    for restart in range(max(1, num_init)):
        generator = torch.Generator().manual_seed((seed if seed is not None else torch.seed()) + restart)
        if isinstance(init, torch.Tensor):
            centroids = init.to(device=x.device, dtype=x.dtype).clone()
            if centroids.shape != (num_clusters, x.shape[1]):
                raise ValueError(f"init centroids must be [{num_clusters}, {x.shape[1]}], got {tuple(init.shape)}")
        elif init == "k-means++":
            centroids = _kmeans_plus_plus(x, num_clusters, metric, generator)
        elif init == "random":
            centroids = x[torch.randperm(x.shape[0], generator=generator)[:num_clusters].to(x.device)].clone()
        else:
            raise ValueError(f"init must be 'k-means++', 'random' or a tensor, got {init!r}")
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=1)

        previous = float("inf")
        iterations = 0
        for iterations in range(1, num_iterations + 1):  # noqa: B007 (read after the loop)
            labels, cost = assign_to_centroids(x, centroids, metric, chunk_size)
            inertia = float(cost.sum())
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=num_clusters).to(x.dtype)
            empty = counts == 0
            new_centroids = sums / counts.clamp_min(1).unsqueeze(1)
            if empty.any():
                worst = cost.argsort(descending=True)[: int(empty.sum())]
                new_centroids[empty] = x[worst]
            if metric == "cosine":
                new_centroids = F.normalize(new_centroids, dim=1)
            centroids = new_centroids
            if previous - inertia <= tolerance * max(abs(previous), 1e-12) and not empty.any():
                break
            previous = inertia
        labels, cost = assign_to_centroids(x, centroids, metric, chunk_size)
        result = KMeansResult(centroids, labels, float(cost.sum()), iterations)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return best


@torch.no_grad()
def minibatch_kmeans_update(
    centroids: torch.Tensor, counts: torch.Tensor, normalized_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One online mini-batch k-means step, exactly as PiCIE's released code (METHODS 2.3).

    Each vector goes to its nearest centroid (squared L2). For a cluster ``k`` receiving ``n_k`` vectors:
    ``count_k += n_k``, ``eta = n_k / (count_k + 1e-6)``, ``mu_k <- (1 - eta) * mu_k + eta * mean(assigned)``.
    Clusters that receive nothing are unchanged. Centroids are not re-normalised.

    Args:
        centroids: ``[K, C]`` current centroids.
        counts: ``[K]`` running counts (start as the number of initialisation vectors of each centroid).
        normalized_features: ``[N, C]`` L2-normalised vectors, or ``[B, C, h, w]`` maps (flattened per pixel).

    Returns:
        ``(new_centroids, new_counts)`` — new tensors; the inputs are not modified.

    Example:

    ```python
    >>> import torch
    >>> c, n = minibatch_kmeans_update(torch.tensor([[0.0, 0.0]]), torch.tensor([1.0]), torch.tensor([[2.0, 0.0]]))
    >>> c, n   # eta = 1 / (2 + 1e-6) ~ 0.5
    (tensor([[1.0000, 0.0000]]), tensor([2.]))
    ```
    """
    x = _check_vectors(normalized_features, "normalized_features")
    if counts.shape != (centroids.shape[0],):
        raise ValueError(f"counts must be [{centroids.shape[0]}], got shape {tuple(counts.shape)}")
    labels, _ = assign_to_centroids(x, centroids, "euclidean")
    num_clusters = centroids.shape[0]
    batch_counts = torch.bincount(labels, minlength=num_clusters).to(counts.dtype)
    sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    new_counts = counts + batch_counts
    received = batch_counts > 0
    eta = (batch_counts / (new_counts + 1e-6)).to(centroids.dtype).unsqueeze(1)
    means = sums / batch_counts.clamp_min(1).to(x.dtype).unsqueeze(1)
    updated = (1 - eta) * centroids + eta * means.to(centroids.dtype)
    new_centroids = torch.where(received.unsqueeze(1), updated, centroids)
    return new_centroids, new_counts


class ClusterProbe(nn.Module):
    """STEGO's cluster probe (METHODS 1.1): learnable centroids ``[K, dim]`` and cosine assignment.

    ``forward(code, alpha=None)`` returns ``(loss, probs)``: with ``alpha=None`` the probabilities are the hard
    one-hot argmax of the cosine similarity (a mini-batch spherical k-means by gradient descent), otherwise
    ``softmax(alpha * cosine)``; loss is ``-mean over pixels of sum_k probs * cosine``. Give it a detached
    code so that its gradient does not reach the segmentation head.

    Example:

    ```python
    >>> import torch
    >>> probe = ClusterProbe(dim=8, num_clusters=3)
    >>> loss, probs = probe(torch.randn(2, 8, 4, 4))
    >>> probs.shape, probe.log_probs(torch.randn(2, 8, 4, 4)).shape
    (torch.Size([2, 3, 4, 4]), torch.Size([2, 3, 4, 4]))
    ```
    """

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        if dim < 1 or num_clusters < 1:
            raise ValueError(f"dim and num_clusters must be >= 1, got dim={dim}, num_clusters={num_clusters}")
        self.dim = dim
        self.num_clusters = num_clusters
        self.clusters = nn.Parameter(torch.randn(num_clusters, dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.clusters.normal_()

    def cosine(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``[B, K, h, w]`` between every code vector and every centroid."""
        if code.ndim != 4 or code.shape[1] != self.dim:
            raise ValueError(f"code must be [B, {self.dim}, h, w], got shape {tuple(code.shape)}")
        return torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(self.clusters, dim=1))

    def forward(self, code: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.cosine(code)
        if alpha is None:
            probs = F.one_hot(inner.argmax(1), self.num_clusters).permute(0, 3, 1, 2).to(inner.dtype)
        else:
            probs = torch.softmax(alpha * inner, dim=1)
        loss = -(probs * inner).sum(1).mean()
        return loss, probs

    def log_probs(self, code: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
        """``log_softmax(alpha * cosine)`` over clusters — the evaluation-time output (alpha 2 in STEGO)."""
        return torch.log_softmax(alpha * self.cosine(code), dim=1)
