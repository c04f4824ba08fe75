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
    "CORRELATION_SAMPLES",
    "SHIFT_NAMES",
    "StegoCorrelationLoss",
    "StegoLossOutput",
    "correlation_samples",
    "draw_correlation_points",
    "norm",
    "pair_correlation",
    "sample_grid",
    "super_perm",
    "tensor_correlation",
]

# The loss's three pair types ("correlation samples"), in the loss's order, and the config shift of each.
CORRELATION_SAMPLES = ("intra", "knn", "neg")
SHIFT_NAMES = {"intra": "pos_intra_shift", "knn": "pos_inter_shift", "neg": "neg_inter_shift"}


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


def draw_correlation_points(
    batch_size: int,
    feature_samples: int,
    neg_samples: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    coords1: torch.Tensor | None = None,
    coords2: torch.Tensor | None = None,
    neg_perms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss's random draws: ``coords1``, ``coords2`` (``[N, S, S, 2]`` uniform in ``[-1, 1]``,
    ``S = feature_samples``) and ``neg_perms`` (``[P, N]``, ``P = neg_samples`` rows of [`super_perm`]), drawn in
    that order from ``generator``; a draw given as an argument is kept as is (and takes nothing from the generator).

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.stego.loss_stego import draw_correlation_points
    >>> coords1, coords2, neg_perms = draw_correlation_points(4, 11, 5, generator=torch.Generator().manual_seed(0))
    >>> coords1.shape, neg_perms.shape
    (torch.Size([4, 11, 11, 2]), torch.Size([5, 4]))
    ```
    """
    coords_shape = (batch_size, feature_samples, feature_samples, 2)
    if coords1 is None:
        coords1 = torch.rand(coords_shape, device=device, generator=generator) * 2 - 1
    if coords2 is None:
        coords2 = torch.rand(coords_shape, device=device, generator=generator) * 2 - 1
    if neg_perms is None:
        neg_perms = torch.stack([super_perm(batch_size, device, generator) for _ in range(neg_samples)])
    return coords1, coords2, neg_perms


def pair_correlation(a: torch.Tensor, b: torch.Tensor, pointwise: bool = False) -> torch.Tensor:
    """[`tensor_correlation`] of two (normalised) maps; with ``pointwise`` each ``[n, h, w]`` row is centred over
    the partner's positions and the global mean of the whole tensor added back (METHODS 1.2, step 2): the
    centring STEGO applies to the feature correlations.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.stego.loss_stego import pair_correlation
    >>> a = torch.randn(2, 4, 3, 3)
    >>> centred = pair_correlation(a, a, pointwise=True)
    >>> torch.allclose(centred.mean(), pair_correlation(a, a).mean())   # the global mean is kept
    True
    ```
    """
    correlation = tensor_correlation(a, b)
    if pointwise:
        old_mean = correlation.mean()
        correlation = correlation - correlation.mean(dim=(3, 4), keepdim=True)
        correlation = correlation - correlation.mean() + old_mean
    return correlation


def correlation_samples(
    maps: torch.Tensor,
    partner_maps: torch.Tensor,
    *,
    coords1: torch.Tensor,
    coords2: torch.Tensor,
    neg_perms: torch.Tensor,
    pointwise: bool = False,
    stack_negatives: bool = True,
) -> dict[str, torch.Tensor]:
    """The three correlation samples of STEGO's loss, exactly as the loss computes them: ``maps`` (backbone features
    or the code) are bilinearly sampled at ``coords1`` ([`sample_grid`]), the partners' maps at ``coords2``, each
    point L2-normalised over channels, and correlated ([`pair_correlation`]):

    * ``"intra"`` ``[N, S, S, S, S]``: each image with itself (both sides at ``coords1``);
    * ``"knn"`` ``[N, S, S, S, S]``: each image with its kNN partner ``partner_maps[n]``;
    * ``"neg"`` ``[P, N, S, S, S, S]``: for each row ``p`` of ``neg_perms``, image ``n`` with image
      ``neg_perms[p, n]`` of the same batch (sampled at ``coords2``); each pairing is centred on its own.

    With ``stack_negatives=False``, ``"neg"`` is a tuple of the ``P`` pairings' ``[N, S, S, S, S]`` tensors.

    [`StegoCorrelationLoss`] calls it on the features (``pointwise`` as configured, without gradient) and on the
    code (``pointwise=False``); `hf_useg.models.stego.diagnostics` calls it on a backbone's features.

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.models.stego.loss_stego import correlation_samples, draw_correlation_points
    >>> features = torch.randn(4, 16, 7, 7)
    >>> coords1, coords2, perms = draw_correlation_points(4, 5, 3, generator=torch.Generator().manual_seed(0))
    >>> samples = correlation_samples(features, features.roll(1, 0), coords1=coords1, coords2=coords2,
    ...                               neg_perms=perms, pointwise=True)
    >>> {name: tuple(t.shape) for name, t in samples.items()}
    {'intra': (4, 5, 5, 5, 5), 'knn': (4, 5, 5, 5, 5), 'neg': (3, 4, 5, 5, 5, 5)}
    ```
    """
    sampled = norm(sample_grid(maps, coords1))
    partners = norm(sample_grid(partner_maps, coords2))
    samples = {
        "intra": pair_correlation(sampled, sampled, pointwise),
        "knn": pair_correlation(sampled, partners, pointwise),
    }
    # One pairing at a time keeps a single extra full-size copy of the maps in memory.
    negatives = tuple(
        pair_correlation(sampled, norm(sample_grid(maps[perm], coords2)), pointwise) for perm in neg_perms
    )
    samples["neg"] = torch.stack(negatives) if stack_negatives else negatives
    return samples


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
        feature_correlations (`dict[str, torch.FloatTensor]`, *optional*):
            The feature correlations the three terms compared with their shifts (centred when ``pointwise``), by
            sample name (``"intra"``, ``"knn"``, ``"neg"``; [`correlation_samples`]); only with
            ``output_correlations=True``.
        statistics (`dict[str, torch.FloatTensor]`, *optional*):
            Cheap summaries of the three samples (detached scalars; with ``output_statistics``), for each sample
            ``s`` in ``intra``, ``knn``, ``neg``: ``code_corr_<s>_mean``, the mean code correlation before the
            clamp (STEGO's ``cd/*`` logs; all three near 1 when the code collapses), and
            ``feat_above_shift_<s>``, the fraction of pairs whose feature correlation exceeds the term's shift
            (the pairs the term pulls together).
    """

    loss: torch.FloatTensor | None = None
    pos_intra: torch.FloatTensor | None = None
    pos_inter: torch.FloatTensor | None = None
    neg_inter: torch.FloatTensor | None = None
    pos_intra_correlation: torch.FloatTensor | None = None
    pos_inter_correlation: torch.FloatTensor | None = None
    neg_inter_correlation: torch.FloatTensor | None = None
    feature_correlations: dict[str, torch.FloatTensor] | None = None
    statistics: dict[str, torch.FloatTensor] | None = None


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

    Attributes:
        output_statistics (`bool`, defaults to `False`): return `StegoLossOutput.statistics` from every call
            (a few reductions; [`StegoRecipe`] turns it on to log them during training).

    The three correlation samples come from [`correlation_samples`], the function the diagnostics use too.

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
        self.output_statistics = False

    def _clamp(self, correlation: torch.Tensor) -> torch.Tensor:
        min_value = 0.0 if self.config.zero_clamp else -9999.0
        max_value = 0.8 if self.config.stabilize else None
        return correlation.clamp(min_value, max_value)

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
        output_statistics: bool | None = None,
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
                Also return the clamped code correlations and the feature correlations.
            output_statistics (`bool`, *optional*):
                Also return `StegoLossOutput.statistics`; defaults to the module's ``output_statistics``.
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
        coords1, coords2, neg_perms = draw_correlation_points(
            batch_size,
            self.config.feature_samples,
            self.config.neg_samples,
            device=device,
            generator=generator,
            coords1=coords1,
            coords2=coords2,
            neg_perms=neg_perms,
        )
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
        draws = {"coords1": coords1, "coords2": coords2, "neg_perms": neg_perms}
        config = self.config
        shifts = {name: getattr(config, SHIFT_NAMES[name]) for name in CORRELATION_SAMPLES}
        # The loss is defined in float32; under autocast the correlations would otherwise run in half
        # precision.
        with torch.autocast(device_type=device.type, enabled=False):
            with torch.no_grad():
                feature_corr = correlation_samples(
                    features.float(), features_pos.float(), **draws, pointwise=config.pointwise, stack_negatives=False
                )
            code_corr = correlation_samples(code.float(), code_pos.float(), **draws, stack_negatives=False)
            clamped = {name: self._clamp(code_corr[name]) for name in ("intra", "knn")}
            clamped["neg"] = tuple(self._clamp(pairing) for pairing in code_corr["neg"])
            # Each random pairing's term is computed on its own tensor: through views of a stacked tensor the
            # gradients would round differently (not bit-identical to a per-pairing computation).
            pos_intra = (-clamped["intra"] * (feature_corr["intra"] - shifts["intra"])).mean()
            pos_inter = (-clamped["knn"] * (feature_corr["knn"] - shifts["knn"])).mean()
            neg_inter = torch.stack(
                [-cd * (fd - shifts["neg"]) for cd, fd in zip(clamped["neg"], feature_corr["neg"], strict=True)]
            ).mean()
            loss = config.correspondence_weight * (
                config.pos_intra_weight * pos_intra
                + config.pos_inter_weight * pos_inter
                + config.neg_inter_weight * neg_inter
            )
        if output_statistics is None:
            output_statistics = self.output_statistics
        if output_correlations or output_statistics:
            feature_corr["neg"] = torch.stack(feature_corr["neg"])
        statistics = None
        if output_statistics:
            with torch.no_grad():
                statistics = {}
                for name in CORRELATION_SAMPLES:
                    code_values = torch.stack(code_corr[name]) if name == "neg" else code_corr[name]
                    statistics[f"code_corr_{name}_mean"] = code_values.mean()
                    statistics[f"feat_above_shift_{name}"] = (feature_corr[name] > shifts[name]).float().mean()
        return StegoLossOutput(
            loss=loss,
            pos_intra=pos_intra,
            pos_inter=pos_inter,
            neg_inter=neg_inter,
            pos_intra_correlation=clamped["intra"] if output_correlations else None,
            pos_inter_correlation=clamped["knn"] if output_correlations else None,
            neg_inter_correlation=torch.stack(clamped["neg"]) if output_correlations else None,
            feature_correlations=feature_corr if output_correlations else None,
            statistics=statistics,
        )
