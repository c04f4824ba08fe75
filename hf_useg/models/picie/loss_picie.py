"""PiCIE loss (Cho et al., CVPR 2021; METHODS 2.3–2.5): cross-entropy of each view's features against the
frozen k-means centroids of both views (within- and cross-view terms), and the paper's overclustering "+H"."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

__all__ = [
    "PicieLossOutput",
    "PicieOverclusteringLossOutput",
    "overclustering_loss_weights",
    "picie_cluster_weights",
    "picie_loss",
    "picie_loss_with_overclustering",
]


@dataclass
class PicieLossOutput(ModelOutput):
    """Output of [`picie_loss`].

    Args:
        loss (`torch.Tensor`, scalar):
            `(within + cross) / 2`.
        within (`torch.Tensor`, scalar):
            `(CE(z¹, μ¹, y¹) + CE(z², μ², y²)) / 2`.
        cross (`torch.Tensor`, scalar):
            `(CE(z¹, μ², y²) + CE(z², μ¹, y¹)) / 2`.
    """

    loss: torch.Tensor | None = None
    within: torch.Tensor | None = None
    cross: torch.Tensor | None = None


@dataclass
class PicieOverclusteringLossOutput(ModelOutput):
    """Output of [`picie_loss_with_overclustering`].

    Args:
        loss (`torch.Tensor`, scalar):
            `w1 * main.loss + w2 * over.loss` with `(w1, w2) = overclustering_loss_weights(K1, K2)`.
        main ([`PicieLossOutput`]):
            The PiCIE loss with the K1 (main) clusterings.
        over ([`PicieLossOutput`]):
            The PiCIE loss with the K2 (overclustering) clusterings.
        main_weight (`float`):
            w1 = log K2 / (log K1 + log K2).
        over_weight (`float`):
            w2 = log K1 / (log K1 + log K2).
    """

    loss: torch.Tensor | None = None
    main: PicieLossOutput | None = None
    over: PicieLossOutput | None = None
    main_weight: float | None = None
    over_weight: float | None = None


def picie_cluster_weights(counts: torch.Tensor, mode: str = "frequency") -> torch.Tensor:
    """Per-cluster cross-entropy weights from the cluster sizes of one view's labelling (METHODS 2.3).

    With n_k = `counts[k]` and N = Σ_k n_k:

    * `"frequency"` (the released code's behaviour, the default): w_k = n_k / N. This *up*-weights large
      clusters.
    * `"balanced"` (the paper's stated intent): w_k = (1 / n_k) / Σ_{j: n_j > 0} (1 / n_j) for n_k > 0 and
      w_k = 0 for empty clusters (they are never a target, so their weight is never used). Every non-empty
      cluster then carries the same total weight n_k · w_k.

    Both sum to 1. The scale does not matter: [`picie_loss`] takes the weighted *mean*
    Σ w_y ℓ / Σ w_y.

    Args:
        counts (`torch.Tensor` of shape `[K]`):
            Number of pixels assigned to each cluster (non-negative, not all zero).
        mode (`str`, *optional*, defaults to `"frequency"`):
            `"frequency"` or `"balanced"`.

    Returns:
        `torch.Tensor` of shape `[K]`, floating point (float32 for integer counts).

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.picie.loss_picie import picie_cluster_weights
    >>> picie_cluster_weights(torch.tensor([1, 3, 0, 4]))
    tensor([0.1250, 0.3750, 0.0000, 0.5000])
    >>> picie_cluster_weights(torch.tensor([1, 3, 0, 4]), mode="balanced") * 19  # (12, 4, 0, 3) / 19
    tensor([12.,  4.,  0.,  3.])
    ```
    """
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"`counts` must be a torch.Tensor, got {type(counts).__name__}")
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"`counts` must be a non-empty 1-D tensor [K], got shape {tuple(counts.shape)}")
    if mode not in ("frequency", "balanced"):
        raise ValueError(f"`mode` must be 'frequency' or 'balanced', got {mode!r}")
    counts = counts if counts.is_floating_point() else counts.float()
    if bool((counts < 0).any()):
        raise ValueError("`counts` must be non-negative")
    total = counts.sum()
    if not bool(total > 0):
        raise ValueError("`counts` are all zero: no cluster has any pixel")
    if mode == "frequency":
        return counts / total
    inverse = torch.where(counts > 0, 1.0 / counts.clamp_min(torch.finfo(counts.dtype).tiny), 0.0)
    return inverse / inverse.sum()


def overclustering_loss_weights(k1: int, k2: int) -> tuple[float, float]:
    """Loss weights of PiCIE's overclustering "+H" (METHODS 2.5): the K1 (main) loss gets
    log K2 / (log K1 + log K2) and the K2 (overclustering) loss log K1 / (log K1 + log K2); they sum to 1, and
    the loss with more clusters (whose cross-entropy is larger, ~log K) gets the smaller weight.

    Example:

    ```python
    >>> from hf_useg.models.picie.loss_picie import overclustering_loss_weights
    >>> [round(w, 4) for w in overclustering_loss_weights(27, 100)]
    [0.5829, 0.4171]
    ```
    """
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"`{name}` must be an int, got {type(k).__name__}")
        if k < 2:
            raise ValueError(f"`{name}` must be >= 2 (log K must be positive), got {k}")
    log_k1, log_k2 = math.log(k1), math.log(k2)
    return log_k2 / (log_k1 + log_k2), log_k1 / (log_k1 + log_k2)


def _check_view(name: str, features: torch.Tensor, labels: torch.Tensor, num_clusters: int, ignore_index: int) -> None:
    batch_size, _, height, width = features.shape
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != (batch_size, height, width):
        raise ValueError(
            f"`{name}` must have shape [B, h, w] = {[batch_size, height, width]}, got {list(labels.shape)}"
        )
    if labels.dtype != torch.long:
        raise TypeError(f"`{name}` must be a long tensor of cluster ids, got {labels.dtype}")
    valid = labels != ignore_index
    if not bool(valid.any()):
        raise ValueError(f"`{name}` has no pixel with a label other than ignore_index={ignore_index}")
    if bool(((labels[valid] < 0) | (labels[valid] >= num_clusters)).any()):
        raise ValueError(
            f"`{name}` must hold cluster ids in [0, {num_clusters}) or ignore_index={ignore_index}; "
            f"got values in [{int(labels[valid].min())}, {int(labels[valid].max())}]"
        )


def _check_weights(
    name: str, weights: torch.Tensor | None, labels: torch.Tensor, num_clusters: int, ignore_index: int
):
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(weights).__name__}")
    if tuple(weights.shape) != (num_clusters,):
        raise ValueError(f"`{name}` must have shape [K] = [{num_clusters}], got {list(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError(f"`{name}` must be non-negative")
    if not weights.is_floating_point():
        raise TypeError(f"`{name}` must be floating point, got {weights.dtype}")
    if not bool(weights.to(labels.device)[labels[labels != ignore_index]].sum() > 0):
        raise ValueError(f"`{name}` gives zero total weight to the pixels' targets: the weighted mean is undefined")


def _cross_entropy(
    normalized: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    # a frozen 1x1 conv whose weights are the centroids: s_k = <ẑ, μ_k>, no bias, no temperature
    logits = F.conv2d(normalized, centroids.detach()[:, :, None, None].to(normalized.dtype))
    if weights is not None:
        weights = weights.detach().to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, labels, weight=weights, ignore_index=ignore_index)


def picie_loss(
    features1: torch.Tensor,
    features2: torch.Tensor,
    centroids1: torch.Tensor,
    centroids2: torch.Tensor,
    labels1: torch.Tensor,
    labels2: torch.Tensor,
    weights1: torch.Tensor | None = None,
    weights2: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> PicieLossOutput:
    r"""PiCIE's clustering loss (METHODS 2.4).

    The features are L2-normalised over channels here (ẑ = `F.normalize(z, dim=1)`); the logits are
    s_k = ⟨ẑ, μ_k⟩ with the centroids as they are (not normalised, no temperature, no bias) and frozen: no
    gradient reaches `centroids1`/`centroids2`. CE is PyTorch's (weighted) mean cross-entropy
    Σ_p w_{y_p} ℓ_p / Σ_p w_{y_p}; the weights follow the *labels'* view (w¹ for every term whose target is
    y¹, w² for every term whose target is y²):

        within = (CE(z¹, μ¹, y¹; w¹) + CE(z², μ², y²; w²)) / 2
        cross  = (CE(z¹, μ², y²; w²) + CE(z², μ¹, y¹; w¹)) / 2
        loss   = (within + cross) / 2

    View 2's features must already be in view 1's geometry (PiCIE: z² = G(f(P2(x))), z¹ = f(G(P1(x)))), so
    both views share one pixel grid and the labels of either view apply to the features of both.

    Args:
        features1 (`torch.Tensor` of shape `[B, C, h, w]`):
            Raw (unnormalised) features of view 1.
        features2 (`torch.Tensor` of shape `[B, C, h, w]`):
            Raw features of view 2, aligned with view 1.
        centroids1 (`torch.Tensor` of shape `[K, C]`):
            k-means centroids of view 1 (on L2-normalised features, not re-normalised).
        centroids2 (`torch.Tensor` of shape `[K, C]`):
            k-means centroids of view 2.
        labels1 (`torch.LongTensor` of shape `[B, h, w]`):
            Cluster ids of view 1 (nearest centroid in `centroids1`).
        labels2 (`torch.LongTensor` of shape `[B, h, w]`):
            Cluster ids of view 2.
        weights1 (`torch.Tensor` of shape `[K]`, *optional*):
            Class weights for the targets `labels1` (see [`picie_cluster_weights`]); `None` = unweighted.
        weights2 (`torch.Tensor` of shape `[K]`, *optional*):
            Class weights for the targets `labels2`.
        ignore_index (`int`, *optional*, defaults to -100):
            Label value excluded from the loss, as in `torch.nn.functional.cross_entropy`. PiCIE itself has no
            ignored pixels (every pixel gets a cluster); this only exists for callers that mask pixels.

    Returns:
        [`PicieLossOutput`] with scalar `loss`, `within` and `cross`.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.picie.loss_picie import picie_loss
    >>> z1, z2 = torch.randn(2, 8, 5, 5, requires_grad=True), torch.randn(2, 8, 5, 5)
    >>> mu1, mu2 = torch.randn(4, 8), torch.randn(4, 8)
    >>> y1, y2 = torch.randint(0, 4, (2, 5, 5)), torch.randint(0, 4, (2, 5, 5))
    >>> out = picie_loss(z1, z2, mu1, mu2, y1, y2)
    >>> out.loss.backward()
    >>> bool(torch.isclose(out.loss, (out.within + out.cross) / 2))
    True
    ```
    """
    for name, f in (("features1", features1), ("features2", features2)):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(f).__name__}")
        if f.ndim != 4:
            raise ValueError(f"`{name}` must be 4-D [B, C, h, w], got shape {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"`{name}` must be floating point, got {f.dtype}")
    if features1.shape != features2.shape:
        raise ValueError(
            f"`features1` and `features2` must have the same shape (view 2 aligned with view 1), got "
            f"{tuple(features1.shape)} and {tuple(features2.shape)}"
        )
    channels = features1.shape[1]
    for name, c in (("centroids1", centroids1), ("centroids2", centroids2)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(c).__name__}")
        if c.ndim != 2 or c.shape[1] != channels:
            raise ValueError(f"`{name}` must have shape [K, C] with C = {channels}, got {list(c.shape)}")
    if centroids1.shape != centroids2.shape:
        raise ValueError(
            f"`centroids1` and `centroids2` must have the same shape [K, C], got {list(centroids1.shape)} "
            f"and {list(centroids2.shape)}"
        )
    num_clusters = centroids1.shape[0]
    _check_view("labels1", features1, labels1, num_clusters, ignore_index)
    _check_view("labels2", features2, labels2, num_clusters, ignore_index)
    _check_weights("weights1", weights1, labels1, num_clusters, ignore_index)
    _check_weights("weights2", weights2, labels2, num_clusters, ignore_index)

    z1 = F.normalize(features1, dim=1)
    z2 = F.normalize(features2, dim=1)
    ce_11 = _cross_entropy(z1, centroids1, labels1, weights1, ignore_index)
    ce_22 = _cross_entropy(z2, centroids2, labels2, weights2, ignore_index)
    ce_12 = _cross_entropy(z1, centroids2, labels2, weights2, ignore_index)
    ce_21 = _cross_entropy(z2, centroids1, labels1, weights1, ignore_index)
    within = (ce_11 + ce_22) / 2
    cross = (ce_12 + ce_21) / 2
    return PicieLossOutput(loss=(within + cross) / 2, within=within, cross=cross)


def picie_loss_with_overclustering(
    features1: torch.Tensor,
    features2: torch.Tensor,
    centroids1: torch.Tensor,
    centroids2: torch.Tensor,
    labels1: torch.Tensor,
    labels2: torch.Tensor,
    over_centroids1: torch.Tensor,
    over_centroids2: torch.Tensor,
    over_labels1: torch.Tensor,
    over_labels2: torch.Tensor,
    weights1: torch.Tensor | None = None,
    weights2: torch.Tensor | None = None,
    over_weights1: torch.Tensor | None = None,
    over_weights2: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> PicieOverclusteringLossOutput:
    r"""PiCIE "+H" (METHODS 2.5, paper only): the PiCIE loss with the main K1 clusterings plus the PiCIE
    loss with an auxiliary K2-cluster clustering (K2 = 100 in the paper) of the same features,
    loss = w1 · L_K1 + w2 · L_K2 with `(w1, w2) = overclustering_loss_weights(K1, K2)`. K1 and K2 are read
    from the centroid shapes. All other arguments are as in [`picie_loss`]; the `over_*` ones belong to the
    K2 clustering.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.picie.loss_picie import picie_loss_with_overclustering
    >>> z1, z2 = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    >>> out = picie_loss_with_overclustering(
    ...     z1, z2, torch.randn(3, 8), torch.randn(3, 8), torch.randint(0, 3, (1, 4, 4)),
    ...     torch.randint(0, 3, (1, 4, 4)), torch.randn(10, 8), torch.randn(10, 8),
    ...     torch.randint(0, 10, (1, 4, 4)), torch.randint(0, 10, (1, 4, 4)))
    >>> round(out.main_weight + out.over_weight, 6)
    1.0
    ```
    """
    main = picie_loss(features1, features2, centroids1, centroids2, labels1, labels2, weights1, weights2, ignore_index)
    over = picie_loss(
        features1,
        features2,
        over_centroids1,
        over_centroids2,
        over_labels1,
        over_labels2,
        over_weights1,
        over_weights2,
        ignore_index,
    )
    main_weight, over_weight = overclustering_loss_weights(int(centroids1.shape[0]), int(over_centroids1.shape[0]))
    return PicieOverclusteringLossOutput(
        loss=main_weight * main.loss + over_weight * over.loss,
        main=main,
        over=over,
        main_weight=main_weight,
        over_weight=over_weight,
    )
