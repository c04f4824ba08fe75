"""STEGO's contrastive correlation loss (METHODS 1.2).

The frozen backbone's feature correlations between sampled points of two images supervise the correlations of
the learned code at the same points: pairs whose features correlate more than a shift ``b`` are pulled
together, the others pushed apart. Three pair types are used: an image with itself, with its kNN partner and
with random other images of the batch.

Example:

```python
>>> import torch
>>> from hf_useg.models.stego import StegoConfig, StegoCorrelationLoss
>>> loss_fn = StegoCorrelationLoss(StegoConfig())
>>> features, features_pos = torch.randn(4, 768, 28, 28), torch.randn(4, 768, 28, 28)
>>> code = torch.randn(4, 90, 28, 28, requires_grad=True)
>>> code_pos = torch.randn(4, 90, 28, 28, requires_grad=True)
>>> out = loss_fn(features, features_pos, code, code_pos)
>>> out.loss.backward()
>>> sorted(k for k in out.keys())
['loss', 'neg_inter', 'pos_inter', 'pos_intra']
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

__all__ = [
    "StegoCorrelationLoss",
    "StegoLossOutput",
    "norm",
    "sample_grid",
    "super_perm",
    "tensor_correlation",
]


def norm(t: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """L2-normalise a ``[N, C, ...]`` tensor over its channel dimension (dim 1): ``t / max(||t||, eps)``.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.stego.loss_stego import norm
    >>> norm(torch.tensor([[3.0, 4.0]]).view(1, 2, 1, 1)).flatten().tolist()
    [0.6000000238418579, 0.800000011920929]
    ```
    """
    return F.normalize(t, dim=1, eps=eps)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs correlation of two maps: ``out[n, h, w, i, j] = sum_c a[n, c, h, w] * b[n, c, i, j]``.

    Args:
        a (`torch.Tensor` of shape `[N, C, H1, W1]`), b (`torch.Tensor` of shape `[N, C, H2, W2]`).

    Returns:
        `torch.Tensor` of shape `[N, H1, W1, H2, W2]`.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.stego.loss_stego import tensor_correlation
    >>> a = torch.randn(2, 4, 3, 3)
    >>> tensor_correlation(a, a).shape
    torch.Size([2, 3, 3, 3, 3])
    ```
    """
    return torch.einsum("nchw,ncij->nhwij", a, b)


def sample_grid(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample a map at continuous coordinates, STEGO's way.

    ``coords`` is ``[N, S1, S2, 2]`` in ``[-1, 1]`` with the last dimension ``(x, y)`` = (width, height),
    ``align_corners=True`` (-1 and 1 are the centres of the border pixels) and border padding. The coordinate
    tensor is transposed in its two spatial dims before sampling: output position ``(a, b)`` comes from
    ``coords[n, b, a]``.

    Args:
        t (`torch.Tensor` of shape `[N, C, H, W]`): the map.
        coords (`torch.Tensor` of shape `[N, S1, S2, 2]`): the sampling points.

    Returns:
        `torch.Tensor` of shape `[N, C, S2, S1]`.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.stego.loss_stego import sample_grid
    >>> t = torch.arange(6.0).view(1, 1, 2, 3)                   # rows [0, 1, 2], [3, 4, 5]
    >>> coords = torch.tensor([[[[-1.0, -1.0], [1.0, -1.0]]]])   # top-left, top-right
    >>> sample_grid(t, coords).flatten().tolist()                # output [1, 1, 2, 1]
    [0.0, 2.0]
    ```
    """
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def super_perm(size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None):
    """STEGO's pairing of each batch item with another one: draw ``randperm(size)``, add 1 wherever
    ``perm[i] == i``, take the result modulo ``size``.

    For ``size >= 2`` no item is paired with itself, but the result is not always a permutation: indices can
    repeat (``randperm = [0, 2, 1]`` gives ``[1, 2, 1]``). For ``size == 1`` the single item is paired with
    itself.

    Example:

    ```python
    >>> from hf_useg.models.stego.loss_stego import super_perm
    >>> super_perm(2).tolist()        # the only choice for two items
    [1, 0]
    ```
    """
    perm = torch.randperm(size, device=device, generator=generator)
    perm[perm == torch.arange(size, device=perm.device)] += 1
    return perm % size


@dataclass
class StegoLossOutput(ModelOutput):
    """Output of [`StegoCorrelationLoss`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            ``correspondence_weight * (pos_intra_weight * pos_intra + pos_inter_weight * pos_inter +
            neg_inter_weight * neg_inter)``.
        pos_intra (`torch.FloatTensor` of shape `()`):
            Unweighted mean of the self-pair (image with itself) term.
        pos_inter (`torch.FloatTensor` of shape `()`):
            Unweighted mean of the kNN-pair term.
        neg_inter (`torch.FloatTensor` of shape `()`):
            Unweighted mean of the random-pair term over all ``neg_samples`` pairings.
        pos_intra_correlation, pos_inter_correlation (`torch.FloatTensor` of shape `[N, S, S, S, S]`):
            The clamped code correlations of the self and kNN pairs (only with ``output_correlations=True``).
        neg_inter_correlation (`torch.FloatTensor` of shape `[P, N, S, S, S, S]`, *optional*):
            The clamped code correlations of the ``P`` random pairings.
    """

    loss: torch.FloatTensor | None = None
    pos_intra: torch.FloatTensor | None = None
    pos_inter: torch.FloatTensor | None = None
    neg_inter: torch.FloatTensor | None = None
    pos_intra_correlation: torch.FloatTensor | None = None
    pos_inter_correlation: torch.FloatTensor | None = None
    neg_inter_correlation: torch.FloatTensor | None = None


def _check_map(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 4:
        raise ValueError(f"{name} must be [batch, channels, height, width], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")


class StegoCorrelationLoss(nn.Module):
    """STEGO's contrastive correlation loss (METHODS 1.2). Has no parameters.

    For a pair of sampled maps ``(f1, f2, c1, c2)`` and a shift ``b``:
    ``F = corr(norm f1, norm f2)`` (without gradient; with ``pointwise`` each ``F[n, h, w]`` row is centred
    over the partner's positions and the global mean added back), ``S = corr(norm c1, norm c2)`` and
    ``loss = -clamp(S, min=0 if zero_clamp else -9999, max=0.8 if stabilize else None) * (F - b)``.

    Args:
        config ([`StegoConfig`]):
            Reads `pos_intra_weight`, `pos_inter_weight`, `neg_inter_weight`, `pos_intra_shift`,
            `pos_inter_shift`, `neg_inter_shift`, `pointwise`, `zero_clamp`, `stabilize`, `feature_samples`,
            `neg_samples` and `correspondence_weight` at every call (so changing the config changes the loss).

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.stego import StegoConfig, StegoCorrelationLoss
    >>> loss_fn = StegoCorrelationLoss(StegoConfig.for_dataset("potsdam3"))
    >>> f = torch.randn(2, 384, 28, 28)
    >>> c = torch.randn(2, 70, 28, 28, requires_grad=True)
    >>> g = torch.Generator().manual_seed(0)
    >>> out = loss_fn(f, f.roll(1, 0), c, c.roll(1, 0), generator=g)
    >>> out.loss.shape
    torch.Size([])
    ```
    """

    def __init__(self, config):
        super().__init__()
        self.config = config

    def _clamp(self, correlation: torch.Tensor) -> torch.Tensor:
        min_value = 0.0 if self.config.zero_clamp else -9999.0
        max_value = 0.8 if self.config.stabilize else None
        return correlation.clamp(min_value, max_value)

    def _pair_loss(
        self,
        feats1: torch.Tensor,
        feats2: torch.Tensor,
        code1: torch.Tensor,
        code2: torch.Tensor,
        shift: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element loss ``[N, S, S, S, S]`` and clamped code correlation of sampled, normalised maps."""
        with torch.no_grad():
            fd = tensor_correlation(feats1, feats2)
            if self.config.pointwise:
                old_mean = fd.mean()
                fd = fd - fd.mean(dim=(3, 4), keepdim=True)
                fd = fd - fd.mean() + old_mean
        cd = self._clamp(tensor_correlation(code1, code2))
        return -cd * (fd - shift), cd

    def forward(
        self,
        features: torch.Tensor,
        features_pos: torch.Tensor,
        code: torch.Tensor,
        code_pos: torch.Tensor,
        coords1: torch.Tensor | None = None,
        coords2: torch.Tensor | None = None,
        neg_perms: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_correlations: bool = False,
    ) -> StegoLossOutput:
        """
        Args:
            features (`torch.Tensor` of shape `[N, C, h, w]`): backbone features of the images.
            features_pos (`torch.Tensor` of shape `[N, C, h', w']`): features of each image's kNN partner.
            code (`torch.Tensor` of shape `[N, D, h, w]`): the head's code for the images.
            code_pos (`torch.Tensor` of shape `[N, D, h', w']`): the code of the partners.
            coords1, coords2 (`torch.Tensor` of shape `[N, S, S, 2]`, *optional*):
                Sampling points in ``[-1, 1]``, ``(x, y)``, for the images and for their partners (kNN and
                random). Drawn uniformly (``S = feature_samples``) when omitted.
            neg_perms (`torch.LongTensor` of shape `[P, N]`, *optional*):
                Row ``p`` pairs image ``n`` with image ``neg_perms[p, n]`` of the batch. Drawn with
                [`super_perm`] (``P = neg_samples``) when omitted.
            generator (`torch.Generator`, *optional*):
                Source of randomness for the draws (on the features' device).
            output_correlations (`bool`, *optional*, defaults to `False`):
                Also return the clamped code correlations.
        """
        for name, t in (
            ("features", features),
            ("features_pos", features_pos),
            ("code", code),
            ("code_pos", code_pos),
        ):
            _check_map(name, t)
        batch_size = features.shape[0]
        for name, t in (("features_pos", features_pos), ("code", code), ("code_pos", code_pos)):
            if t.shape[0] != batch_size:
                raise ValueError(f"{name} has batch size {t.shape[0]}, features has {batch_size}")
        if features_pos.shape[1] != features.shape[1]:
            raise ValueError(f"features_pos has {features_pos.shape[1]} channels, features has {features.shape[1]}")
        if code_pos.shape[1] != code.shape[1]:
            raise ValueError(f"code_pos has {code_pos.shape[1]} channels, code has {code.shape[1]}")

        device = features.device
        num_samples = self.config.feature_samples
        coords_shape = (batch_size, num_samples, num_samples, 2)
        if coords1 is None:
            coords1 = torch.rand(coords_shape, device=device, generator=generator) * 2 - 1
        if coords2 is None:
            coords2 = torch.rand(coords_shape, device=device, generator=generator) * 2 - 1
        for name, coords in (("coords1", coords1), ("coords2", coords2)):
            if (
                not isinstance(coords, torch.Tensor)
                or coords.ndim != 4
                or coords.shape[0] != batch_size
                or coords.shape[1] != coords.shape[2]
                or coords.shape[3] != 2
            ):
                shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
                raise ValueError(f"{name} must be [N={batch_size}, S, S, 2], got {shape}")
        if coords1.shape != coords2.shape:
            raise ValueError(f"coords1 {tuple(coords1.shape)} and coords2 {tuple(coords2.shape)} must match")
        if neg_perms is None:
            neg_perms = torch.stack(
                [super_perm(batch_size, device, generator) for _ in range(self.config.neg_samples)]
            )
        if not isinstance(neg_perms, torch.Tensor) or neg_perms.ndim != 2 or neg_perms.shape[1] != batch_size:
            shape = tuple(neg_perms.shape) if isinstance(neg_perms, torch.Tensor) else type(neg_perms).__name__
            raise ValueError(f"neg_perms must be [num_pairings, N={batch_size}], got {shape}")
        if neg_perms.dtype != torch.long:
            raise TypeError(f"neg_perms must be a long tensor, got {neg_perms.dtype}")
        if neg_perms.shape[0] < 1:
            raise ValueError("neg_perms must hold at least one pairing")
        if neg_perms.min() < 0 or neg_perms.max() >= batch_size:
            raise ValueError(
                f"neg_perms values must be in [0, {batch_size}), got {neg_perms.min()}..{neg_perms.max()}"
            )

        neg_perms = neg_perms.to(device)
        coords1 = coords1.to(device=device, dtype=torch.float32)
        coords2 = coords2.to(device=device, dtype=torch.float32)
        # The loss is defined in float32; under autocast the correlations would otherwise run in half
        # precision.
        with torch.autocast(device_type=device.type, enabled=False):
            features, features_pos = features.float(), features_pos.float()
            code, code_pos = code.float(), code_pos.float()
            with torch.no_grad():
                feats = norm(sample_grid(features, coords1))
                feats_pos = norm(sample_grid(features_pos, coords2))
            codes = norm(sample_grid(code, coords1))
            codes_pos = norm(sample_grid(code_pos, coords2))

            config = self.config
            pos_intra_loss, pos_intra_cd = self._pair_loss(feats, feats, codes, codes, config.pos_intra_shift)
            pos_inter_loss, pos_inter_cd = self._pair_loss(feats, feats_pos, codes, codes_pos, config.pos_inter_shift)
            # Random partners: image perm[n] of the same batch, sampled at coords2[n]. Each pairing is its own
            # "batch" for the pointwise centering and its global mean. One pairing at a time keeps a single
            # extra copy of the maps in memory.
            neg_losses, neg_cds = [], []
            for perm in neg_perms:
                with torch.no_grad():
                    feats_neg = norm(sample_grid(features[perm], coords2))
                codes_neg = norm(sample_grid(code[perm], coords2))
                neg_loss, neg_cd = self._pair_loss(feats, feats_neg, codes, codes_neg, config.neg_inter_shift)
                neg_losses.append(neg_loss)
                neg_cds.append(neg_cd)
            neg_inter_loss = torch.stack(neg_losses)

            pos_intra, pos_inter, neg_inter = (
                pos_intra_loss.mean(),
                pos_inter_loss.mean(),
                neg_inter_loss.mean(),
            )
            loss = config.correspondence_weight * (
                config.pos_intra_weight * pos_intra
                + config.pos_inter_weight * pos_inter
                + config.neg_inter_weight * neg_inter
            )
        return StegoLossOutput(
            loss=loss,
            pos_intra=pos_intra,
            pos_inter=pos_inter,
            neg_inter=neg_inter,
            pos_intra_correlation=pos_intra_cd if output_correlations else None,
            pos_inter_correlation=pos_inter_cd if output_correlations else None,
            neg_inter_correlation=torch.stack(neg_cds) if output_correlations else None,
        )
