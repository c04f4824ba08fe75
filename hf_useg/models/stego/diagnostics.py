"""STEGO's correlation diagnostics: how to choose the shifts for a dataset and a backbone.

STEGO's loss compares, for three kinds of point pairs, the backbone's feature correlation ``F`` with a shift ``b``
(METHODS 1.2): per pair, ``loss = -clamp(S) * (F - b)`` where ``S`` is the correlation of the learned code. Its
gradient with respect to ``S`` is ``-(F - b)``: a pair with ``F > b`` is **pulled together** (``S`` towards 1), a
pair with ``F < b`` pushed apart (``S`` down to 0 with ``zero_clamp``). Whether a shift is sensible therefore
depends on where it sits in the distribution of the backbone's own correlations, which differs from one backbone
(and dataset) to the next: the released shifts were tuned on DINO ViT-B/8.

[`stego_correlation_diagnostics`] measures the three distributions exactly as the loss sees them (the same function,
`loss_stego.correlation_samples`, on the same kind of draws): intra-image (an image with itself), kNN-partner (an
image with one of its nearest neighbours, from the package's kNN code as in training) and negative (an image with
another image of the sample). It reports their quantiles, where the configured shifts sit, the shifts
``--calibrate_shifts true`` would pick ([`calibrate_shifts`]), and warns when the configured shifts make the code
collapse (the rule, the sign of the loss's net pull, is documented at [`collapse_warnings`]).
[`plot_correlation_histograms`] draws them and [`format_diagnostics`] prints them.

Example:

```python
>>> from hf_useg.data import make_synthetic_scenes
>>> from hf_useg.models.stego.diagnostics import stego_correlation_diagnostics, format_diagnostics
>>> diagnostics = stego_correlation_diagnostics(
...     "random-vit-micro", make_synthetic_scenes(8, 32, 3), resolution=32, num_images=8, five_crop=False
... )
>>> sorted(diagnostics.samples)
['intra', 'knn', 'neg']
>>> print(format_diagnostics(diagnostics))  # doctest: +SKIP
```
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configuration_stego import StegoConfig
from .loss_stego import CORRELATION_SAMPLES, SHIFT_NAMES, correlation_samples, draw_correlation_points
from .training_stego import calibrate_shifts, calibration_items

__all__ = [
    "StegoDiagnostics",
    "collapse_warnings",
    "correlation_statistics",
    "diagnose_feature_correlations",
    "format_diagnostics",
    "net_pull",
    "plot_correlation_histograms",
    "save_diagnostics",
    "stego_correlation_diagnostics",
]

WEIGHT_NAMES = {"intra": "pos_intra_weight", "knn": "pos_inter_weight", "neg": "neg_inter_weight"}

SAMPLE_NAMES = {"intra": "intra-image", "knn": "kNN-partner", "neg": "negative"}
SAMPLE_TITLES = {
    "intra": "intra-image pairs (an image with itself)",
    "knn": "kNN-partner pairs (an image with one of its nearest neighbours)",
    "neg": "negative pairs (an image with another image)",
}
_QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}


@dataclass
class StegoDiagnostics:
    """What [`stego_correlation_diagnostics`] measured.

    Attributes:
        backbone: the backbone's name (for titles).
        num_items: how many training items (images, or five crops of each) were measured.
        samples: the feature correlations by sample (``"intra"``, ``"knn"``, ``"neg"``), the tensors
            `loss_stego.correlation_samples` returns (``[N, S, S, S, S]``, the negatives ``[P, N, S, S, S, S]``; CPU,
            float32), centred per point when ``pointwise``.
        shifts, weights: the configured shift and weight of each sample's term (``pos_intra_shift`` /
            ``pos_intra_weight``, ``pos_inter_*``, ``neg_inter_*``).
        calibrated_shifts: what ``--calibrate_shifts true`` would set (``pos_intra_shift`` and ``pos_inter_shift``,
            from [`calibrate_shifts`]).
        statistics: per sample, ``count``, ``mean``, the quantiles ``q05``, ``q25``, ``median``, ``q75``, ``q95``
            and ``pulled_together``, the fraction of pairs above the configured shift ([`correlation_statistics`]).
        net_pull: [`net_pull`] of the configured shifts: each term's pull and their sum, ``"total"``.
        calibrated_net_pull: the same total with the calibrated positive shifts.
        warnings: the collapse warnings ([`collapse_warnings`]); empty when the shifts are well posed.
        pointwise, feature_samples: the config's centring and its ``S`` (points per image side).
    """

    backbone: str
    num_items: int
    samples: dict[str, torch.Tensor]
    shifts: dict[str, float]
    weights: dict[str, float]
    calibrated_shifts: dict[str, float]
    statistics: dict[str, dict[str, float]]
    net_pull: dict[str, float]
    calibrated_net_pull: float
    warnings: list[str] = field(default_factory=list)
    pointwise: bool = True
    feature_samples: int = 11

    def to_dict(self) -> dict[str, Any]:
        """Everything but the samples, JSON-serialisable (e.g. for a report)."""
        return {
            "backbone": self.backbone,
            "num_items": self.num_items,
            "pointwise": self.pointwise,
            "feature_samples": self.feature_samples,
            "shifts": dict(self.shifts),
            "weights": dict(self.weights),
            "calibrated_shifts": dict(self.calibrated_shifts),
            "statistics": {name: dict(values) for name, values in self.statistics.items()},
            "net_pull": dict(self.net_pull),
            "calibrated_net_pull": self.calibrated_net_pull,
            "warnings": list(self.warnings),
        }


def correlation_statistics(samples: dict[str, torch.Tensor], shifts: dict[str, float]) -> dict[str, dict[str, float]]:
    """Summary of each correlation sample: ``count``, ``mean``, quantiles ``q05``, ``q25``, ``median``, ``q75``,
    ``q95`` and ``pulled_together``, the fraction of its pairs above ``shifts[name]`` (the pairs the loss term pulls
    together).

    Example:

    ```python
    >>> import torch
    >>> stats = correlation_statistics({"intra": torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])}, {"intra": 0.3})
    >>> stats["intra"]["median"], stats["intra"]["pulled_together"]
    (0.5, 0.6)
    ```
    """
    statistics = {}
    for name, sample in samples.items():
        values = sample.detach().flatten().double().cpu().numpy()
        quantiles = np.quantile(values, list(_QUANTILES.values()))
        statistics[name] = {
            "count": int(values.size),
            "mean": float(values.mean()),
            **{key: float(value) for key, value in zip(_QUANTILES, quantiles, strict=True)},
            "pulled_together": float((values > shifts[name]).mean()),
        }
    return statistics


def net_pull(means: dict[str, float], shifts: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Each term's pull ``weight * (mean feature correlation - shift)`` and their sum ``"total"``, the net pull
    (see [`collapse_warnings`]).

    Example:

    ```python
    >>> pull = net_pull({"intra": 0.5, "knn": 0.45, "neg": 0.1}, {"intra": 0.12, "knn": 0.2, "neg": 1.0},
    ...                 {"intra": 0.1, "knn": 1.0, "neg": 0.15})
    >>> round(pull["knn"], 3), round(pull["total"], 3)
    (0.25, 0.153)
    ```
    """
    pulls = {name: weights[name] * (means[name] - shifts[name]) for name in CORRELATION_SAMPLES}
    return {**pulls, "total": sum(pulls.values())}


def collapse_warnings(
    statistics: dict[str, dict[str, float]],
    shifts: dict[str, float],
    weights: dict[str, float],
    calibrated_shifts: dict[str, float] | None = None,
) -> list[str]:
    """The collapse warning of configured ``shifts`` (and term ``weights``) given a backbone's correlation
    ``statistics``; an empty list when they are well posed.

    The rule, the sign of the **net pull**: the correlation loss is ``sum_t w_t * mean_t(-clamp(S) * (F - b_t))``
    over the three terms ``t`` (intra-image, kNN-partner, negative; weights ``w_t``, shifts ``b_t``). Raising every
    code correlation ``S`` together by ``d`` — the direction in which the code collapses, every point getting the
    same code — changes the loss by ``-d * N`` with

        ``N = sum_t w_t * (mean_t(F) - b_t)``

    (the mean over the term's pairs; pointwise centring keeps it). With ``N > 0`` the loss rewards making all codes
    alike: the positive terms' pull outweighs the negative term's push and the head's easiest descent is the
    collapse, so the rule warns. With ``N < 0``, raising all code correlations costs loss, and only pairs whose
    features correlate above their shift are pulled together: the balance of positive and negative signals that
    STEGO's authors tune for. A calibrated shift sits at the median of its term, so the positive terms contribute
    about nothing and the negative term makes ``N < 0``.

    Measured on CamVid at the COCO-Stuff release (shifts 0.12 / 0.2 / 1.0, weights 0.1 / 1.0 / 0.154): a
    self-trained ViT with median correlations 0.56 / 0.57 collapsed (cluster mIoU 10.2) and trained with the
    calibrated shifts (14.0; training/configs/stego_camvid.yaml). A random ViT of the same shape with similar
    correlations (medians 0.49 / 0.46 at 224 px) gives ``N = +0.15`` with the COCO shifts and ``N = -0.14`` with its
    calibrated ones. The rule needs no tuned threshold; the fraction of pairs a term pulls together
    (``pulled_together``) is reported alongside but does not separate the two cases as well (0.78-0.87 against
    0.47-0.72 on that backbone).

    Example:

    ```python
    >>> stats = {name: {"mean": mean, "median": mean, "pulled_together": 0.8}
    ...          for name, mean in (("intra", 0.5), ("knn", 0.45), ("neg", 0.1))}
    >>> coco = {"intra": 0.12, "knn": 0.2, "neg": 1.0}
    >>> weights = {"intra": 0.1, "knn": 1.0, "neg": 0.1538}
    >>> len(collapse_warnings(stats, coco, weights))
    1
    >>> collapse_warnings(stats, {**coco, "intra": 0.5, "knn": 0.45}, weights)
    []
    ```
    """
    pull = net_pull({name: statistics[name]["mean"] for name in CORRELATION_SAMPLES}, shifts, weights)
    if pull["total"] <= 0:
        return []
    terms = ", ".join(f"{SAMPLE_NAMES[name]} {pull[name]:+.3f}" for name in CORRELATION_SAMPLES)
    positives = " / ".join(f"{SHIFT_NAMES[name]} {shifts[name]:.4g}" for name in ("intra", "knn"))
    medians = " / ".join(f"{statistics[name]['median']:.3f}" for name in ("intra", "knn"))
    pulled = " / ".join(f"{statistics[name]['pulled_together']:.0%}" for name in ("intra", "knn"))
    message = (
        f"the code will collapse: net pull N = {pull['total']:+.3f} > 0 (per term: {terms}), so the loss falls when "
        f"every code correlation rises together. The positive shifts ({positives}) sit low in this backbone's "
        f"correlations (medians {medians}; {pulled} of the pairs pulled together)."
    )
    if calibrated_shifts:
        calibrated = {**shifts, **{name: calibrated_shifts[SHIFT_NAMES[name]] for name in ("intra", "knn")}}
        calibrated_total = net_pull(
            {name: statistics[name]["mean"] for name in CORRELATION_SAMPLES}, calibrated, weights
        )
        values = " / ".join(f"{calibrated[name]:.4f}" for name in ("intra", "knn"))
        message += (
            f" With the calibrated shifts ({values}, --calibrate_shifts true) N = {calibrated_total['total']:+.3f}"
        )
        if calibrated_total["total"] > 0:
            message += "; still > 0: also raise neg_inter_shift or neg_inter_weight."
        else:
            message += "."
    return [message]


def diagnose_feature_correlations(
    features: torch.Tensor,
    knn: torch.Tensor,
    *,
    config: StegoConfig | None = None,
    num_neighbors: int = 7,
    seed: int = 0,
    backbone_name: str = "backbone",
) -> StegoDiagnostics:
    """[`stego_correlation_diagnostics`] on precomputed backbone maps (e.g. a training run's feature cache).

    Each item's kNN partner is ``knn[i, j]`` with ``j`` uniform in ``1..num_neighbors`` (as `StegoPairs` draws it);
    the sampling points and the negative pairings are drawn like the loss draws them
    (`loss_stego.draw_correlation_points`, ``config.feature_samples`` points per side, ``config.neg_samples``
    pairings), the whole sample being one batch; the calibrated shifts are [`calibrate_shifts`] on the items and
    partners ``--calibrate_shifts`` would use ([`calibration_items`]). Everything is drawn from ``seed``.

    Args:
        features (`torch.Tensor` of shape `[N, C, h, w]`): backbone maps of ``N >= 2`` training items.
        knn (`torch.LongTensor` of shape `[N, k]`): their nearest-neighbour table (rank 0 = the item), ``k >= 2``.
        config ([`StegoConfig`], *optional*): shifts, term weights, ``pointwise``, ``feature_samples``,
            ``neg_samples``; defaults to the COCO-Stuff release (``StegoConfig()``).

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.data import global_descriptors, nearest_neighbors
    >>> features = torch.randn(6, 16, 5, 5)
    >>> knn = nearest_neighbors(global_descriptors(features), 3)
    >>> diagnose_feature_correlations(features, knn, num_neighbors=2).samples["neg"].shape
    torch.Size([5, 6, 11, 11, 11, 11])
    ```
    """
    config = StegoConfig() if config is None else config
    if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] < 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be [N >= 2, C, h, w] maps, got {shape}")
    num_items = features.shape[0]
    if knn.ndim != 2 or knn.shape[0] != num_items or knn.shape[1] < 2:
        raise ValueError(f"knn must be [N={num_items}, k >= 2] neighbour indices, got {tuple(knn.shape)}")
    features = features.detach().float().cpu()
    knn = knn.cpu()
    num_neighbors = max(1, min(num_neighbors, knn.shape[1] - 1))
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, num_neighbors + 1, (num_items,), generator=generator)
    partners = knn[torch.arange(num_items), ranks]
    coords1, coords2, neg_perms = draw_correlation_points(
        num_items, config.feature_samples, config.neg_samples, generator=generator
    )
    with torch.no_grad():
        samples = correlation_samples(
            features,
            features[partners],
            coords1=coords1,
            coords2=coords2,
            neg_perms=neg_perms,
            pointwise=config.pointwise,
        )
    sample, sample_partners = calibration_items(num_items, knn)
    calibrated = calibrate_shifts(
        features[sample], pointwise=config.pointwise, seed=seed, partner_features=features[sample_partners]
    )
    shifts = {name: float(getattr(config, SHIFT_NAMES[name])) for name in CORRELATION_SAMPLES}
    weights = {name: float(getattr(config, WEIGHT_NAMES[name])) for name in CORRELATION_SAMPLES}
    statistics = correlation_statistics(samples, shifts)
    means = {name: statistics[name]["mean"] for name in CORRELATION_SAMPLES}
    calibrated_all = {**shifts, **{name: calibrated[SHIFT_NAMES[name]] for name in ("intra", "knn")}}
    return StegoDiagnostics(
        backbone=backbone_name,
        num_items=num_items,
        samples=samples,
        shifts=shifts,
        weights=weights,
        calibrated_shifts=calibrated,
        statistics=statistics,
        net_pull=net_pull(means, shifts, weights),
        calibrated_net_pull=net_pull(means, calibrated_all, weights)["total"],
        warnings=collapse_warnings(statistics, shifts, weights, calibrated),
        pointwise=bool(config.pointwise),
        feature_samples=int(config.feature_samples),
    )


def _resolve_config(config: StegoConfig | str | None) -> StegoConfig:
    if config is None:
        return StegoConfig()
    if isinstance(config, StegoConfig):
        return config
    if isinstance(config, (str, Path)):
        if str(config) in StegoConfig.dataset_presets:
            return StegoConfig.for_dataset(str(config))
        return StegoConfig.from_pretrained(str(config))
    raise TypeError(f"config must be a StegoConfig, a preset name or a model folder, got {type(config).__name__}")


def _feature_extractor(backbone, config: StegoConfig, seed: int) -> tuple[Callable, int, str, torch.nn.Module]:
    """``(maps_fn, patch_size, name, module)`` for a ``--backbone`` name, a `FeatureBackbone` or a model with
    ``extract_features`` (e.g. a trained STEGO)."""
    from ...backbones import FeatureBackbone

    if isinstance(backbone, (str, Path)):
        from ...training.data import load_backbone
        from .modeling_stego import StegoForUnsupervisedSegmentation

        backbone_config, weights, name = load_backbone(str(backbone))
        if backbone_config is None:
            raise ValueError(f"backbone {str(backbone)!r} means no backbone; STEGO needs one")
        model_config = copy.deepcopy(config)
        model_config.backbone_config = backbone_config
        # The model is built the way a training run builds it (seeded), so a random backbone is the run's one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = StegoForUnsupervisedSegmentation(model_config)
        if weights is not None:
            model.backbone.model.load_state_dict(weights)
        return model.extract_features, model.patch_size, name, model
    if isinstance(backbone, FeatureBackbone):
        name = getattr(backbone.config, "_name_or_path", "") or f"{backbone.config.model_type} backbone"
        return (lambda pixels: backbone(pixels).feature_map), backbone.patch_size, name, backbone
    if hasattr(backbone, "extract_features"):
        config_of = getattr(backbone, "config", None)
        name = getattr(config_of, "backbone_name", None) or type(backbone).__name__
        return backbone.extract_features, backbone.patch_size, name, backbone
    raise TypeError(
        "backbone must be a --backbone name (Hub id, folder or random-* name), a FeatureBackbone or a model with "
        f"extract_features, got {type(backbone).__name__}"
    )


def stego_correlation_diagnostics(
    backbone,
    dataset,
    *,
    config: StegoConfig | str | None = None,
    split: str = "train",
    resolution: int = 224,
    num_images: int = 32,
    five_crop: bool = True,
    crop_ratio: float = 0.5,
    num_neighbors: int = 7,
    knn_k: int = 30,
    batch_size: int = 16,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> StegoDiagnostics:
    """The three distributions of a backbone's feature correlations over a sample of a dataset, as STEGO's loss
    sees them, with the configured and the calibrated shifts and the collapse warnings ([`collapse_warnings`]).

    ``num_images`` images are drawn from the dataset (``seed``); with ``five_crop`` (STEGO's training default)
    each gives its five crops, as training does, so the measured items are ``5 * num_images`` crops. Items are
    processed like training items (the protocol processor at ``resolution``), their backbone maps computed once,
    their kNN table built with the package's kNN code among the measured items (``knn_k`` neighbours), and
    [`diagnose_feature_correlations`] does the rest. The features are measured without the training-time channel
    dropout, as ``--calibrate_shifts`` measures them.

    Args:
        backbone: a ``--backbone`` value (Hub id, folder, or a `RANDOM_BACKBONES` name, built with ``seed`` like a
            training run with that seed builds it), a `FeatureBackbone`, or a model with ``extract_features``.
        dataset: a `datasets.Dataset` with an ``image`` column, or a path / Hub id for `load_segmentation_dataset`
            (``split``).
        config: the STEGO config whose shifts are checked: a [`StegoConfig`], a preset name (``"cocostuff27"``,
            ``"cityscapes27"``, ``"potsdam3"``) or a model folder; default the COCO-Stuff release.
        device: where the backbone runs (default: a given module's device; for a name, CUDA when available).

    Example:

    ```python
    >>> from hf_useg.data import make_synthetic_scenes
    >>> diagnostics = stego_correlation_diagnostics(
    ...     "random-vit-micro", make_synthetic_scenes(8, 32, 3), resolution=32, num_images=4
    ... )
    >>> diagnostics.num_items, sorted(diagnostics.calibrated_shifts)
    (20, ['pos_inter_shift', 'pos_intra_shift'])
    ```
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ...data import expand_five_crops, global_descriptors, nearest_neighbors
    from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
    from ...training.data import protocol_processor

    config = _resolve_config(config)
    if num_images < 1 or (num_images < 2 and not five_crop):
        raise ValueError(f"num_images must leave at least 2 items to pair, got {num_images}")
    if isinstance(dataset, (str, Path)):
        from ...data import load_segmentation_dataset

        dataset = load_segmentation_dataset(str(dataset), split)
    maps_fn, patch_size, name, module = _feature_extractor(backbone, config, seed)
    if device is None and isinstance(backbone, (str, Path)):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device is None:
        device = next(module.parameters()).device
    device = torch.device(device)
    module.to(device)
    was_training = module.training
    module.eval()

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    subset = dataset.select(order.sort().values.tolist())
    if five_crop:
        subset = expand_five_crops(subset, ratio=crop_ratio)
    items = ProcessedSegmentationDataset(subset, protocol_processor(resolution, patch_size), with_labels=False)
    if len(items) < 2:
        raise ValueError(f"the dataset gives {len(items)} item(s); the diagnostics need at least 2")
    loader = DataLoader(items, batch_size=batch_size, collate_fn=collate_segmentation_batch)
    maps = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="backbone features", disable=not progress):
            maps.append(maps_fn(batch["pixel_values"].to(device)).float().cpu())
    module.train(was_training)
    features = torch.cat(maps)
    knn = nearest_neighbors(global_descriptors(features), min(knn_k, len(items)))
    return diagnose_feature_correlations(
        features, knn, config=config, num_neighbors=num_neighbors, seed=seed, backbone_name=name
    )


def plot_correlation_histograms(diagnostics: StegoDiagnostics, path: str | Path | None = None, *, bins: int = 100):
    """The three correlation histograms, one panel each (intra-image, kNN partner, negative), as a matplotlib
    `Figure`: the fraction of pairs per bin, the configured shift of the panel's term (red, with the fraction of
    pairs it pulls together), the calibrated shift (green, dashed; the positive terms) and the mean (grey, dotted).
    Each panel's title gives its term's pull ([`net_pull`]), in red when it drives a collapse warning; the figure's
    title gives the net pull. Written to ``path`` (PNG) when given. Needs matplotlib.

    Every panel draws ``np.histogram`` of its whole sample over the same ``bins`` edges (a `StepPatch`; the panel's
    ``get_label()`` is the sample's name); the view leaves out the sparsest 0.1 % tails.

    Example:

    ```python
    >>> figure = plot_correlation_histograms(diagnostics, "correlations.png")  # doctest: +SKIP
    ```
    """
    from matplotlib.figure import Figure

    values = {
        name: diagnostics.samples[name].detach().flatten().double().cpu().numpy() for name in CORRELATION_SAMPLES
    }
    calibrated = {
        name: diagnostics.calibrated_shifts[SHIFT_NAMES[name]]
        for name in CORRELATION_SAMPLES
        if SHIFT_NAMES[name] in diagnostics.calibrated_shifts
    }
    marks = [*diagnostics.shifts.values(), *calibrated.values()]
    everything = np.concatenate(list(values.values()))
    low, high = min(everything.min(), *marks), max(everything.max(), *marks)
    pad = 0.02 * (high - low or 1.0)
    edges = np.linspace(low - pad, high + pad, bins + 1)
    # The bins hold every pair; the view leaves out the sparse tails (pointwise centring stretches them).
    view_low, view_high = np.quantile(everything, [0.001, 0.999])
    view_low, view_high = min(view_low, *marks), max(view_high, *marks)
    view_pad = 0.03 * (view_high - view_low or 1.0)
    collapsing = bool(diagnostics.warnings)

    figure = Figure(figsize=(12.0, 9.0), layout="constrained")
    panels = figure.subplots(3, 1, sharex=True)
    for axes, name in zip(panels, CORRELATION_SAMPLES, strict=True):
        counts, _ = np.histogram(values[name], bins=edges)
        axes.set_label(name)
        axes.stairs(counts / max(1, values[name].size), edges, fill=True, alpha=0.45, color="tab:blue", label="pairs")
        stats, shift = diagnostics.statistics[name], diagnostics.shifts[name]
        axes.axvline(
            shift,
            color="tab:red",
            linewidth=2.0,
            label=f"configured {SHIFT_NAMES[name]} = {shift:.3g}\n({stats['pulled_together']:.0%} of pairs above it: "
            "pulled together)",
        )
        if name in calibrated:
            axes.axvline(
                calibrated[name],
                color="tab:green",
                linestyle="--",
                linewidth=2.0,
                label=f"calibrated (--calibrate_shifts true) = {calibrated[name]:.3f}",
            )
        axes.axvline(stats["mean"], color="0.3", linestyle=":", linewidth=1.5, label=f"mean {stats['mean']:.3f}")
        pull = diagnostics.net_pull[name]
        driving = collapsing and pull > 0
        axes.set_title(
            f"{SAMPLE_TITLES[name]}: pull = weight {diagnostics.weights[name]:.3g} x (mean - shift) = {pull:+.3f}",
            color="tab:red" if driving else "black",
            fontweight="bold" if driving else "normal",
        )
        axes.set_ylabel("fraction of pairs")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    panels[-1].set_xlim(view_low - view_pad, view_high + view_pad)
    centring = ", centred per point (pointwise)" if diagnostics.pointwise else ""
    panels[-1].set_xlabel(f"feature correlation: cosine similarity of two points' features{centring}")
    points = diagnostics.feature_samples
    total = diagnostics.net_pull["total"]
    verdict = "> 0: the code will collapse" if collapsing else "<= 0: well posed"
    figure.suptitle(
        f"STEGO feature correlations of {diagnostics.backbone}\n{diagnostics.num_items} items, {points}x{points} "
        f"points each; net pull {total:+.3f} {verdict} (with the calibrated shifts: "
        f"{diagnostics.calibrated_net_pull:+.3f})",
        color="tab:red" if collapsing else "black",
    )
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def format_diagnostics(diagnostics: StegoDiagnostics) -> str:
    """The diagnostics as terminal text: per sample its quantiles and mean, the configured shift, the fraction of
    pairs it pulls together and the term's pull; the net pull, the calibrated shifts, and the warnings.

    Example:

    ```python
    >>> print(format_diagnostics(diagnostics))  # doctest: +SKIP
    STEGO feature correlations of random-vit-micro (20 items, 11x11 points each, pointwise centring)
    sample      q05    q25 median    q75    q95   mean |   shift  pulled together    pull  calibrated
    ...
    ```
    """
    centring = "pointwise centring" if diagnostics.pointwise else "no centring"
    points = diagnostics.feature_samples
    lines = [
        f"STEGO feature correlations of {diagnostics.backbone} ({diagnostics.num_items} items, {points}x{points} "
        f"points each, {centring})",
        f"{'sample':<9}{'q05':>7}{'q25':>7}{'median':>7}{'q75':>7}{'q95':>7}{'mean':>7} | {'shift':>7}  "
        f"pulled together {'pull':>7}  calibrated",
    ]
    for name in CORRELATION_SAMPLES:
        stats = diagnostics.statistics[name]
        calibrated = diagnostics.calibrated_shifts.get(SHIFT_NAMES[name])
        lines.append(
            f"{name:<9}{stats['q05']:>7.3f}{stats['q25']:>7.3f}{stats['median']:>7.3f}{stats['q75']:>7.3f}"
            f"{stats['q95']:>7.3f}{stats['mean']:>7.3f} | {diagnostics.shifts[name]:>7.3f}  "
            f"{stats['pulled_together']:>15.1%} {diagnostics.net_pull[name]:>+7.3f}  "
            f"{'-' if calibrated is None else f'{calibrated:.4f}':>10}"
        )
    lines.append(
        f"net pull (sum of the pulls; > 0 means collapse): {diagnostics.net_pull['total']:+.3f}, with the calibrated "
        f"shifts {diagnostics.calibrated_net_pull:+.3f}"
    )
    shifts = ", ".join(f"{key} {value:.4f}" for key, value in diagnostics.calibrated_shifts.items())
    lines.append(f"calibrated shifts (--calibrate_shifts true): {shifts}")
    if diagnostics.warnings:
        lines += [f"WARNING: {message}" for message in diagnostics.warnings]
    else:
        lines.append("the configured shifts are well posed for this backbone (no collapse warning)")
    return "\n".join(lines)


def save_diagnostics(diagnostics: StegoDiagnostics, output_dir: str | Path) -> dict[str, Path]:
    """Write the diagnostics to ``output_dir``: ``stego_correlations.png`` ([`plot_correlation_histograms`]),
    ``stego_diagnostics.txt`` ([`format_diagnostics`]) and ``stego_diagnostics.json`` (`StegoDiagnostics.to_dict`).
    Returns the paths by kind (``"figure"``, ``"text"``, ``"json"``).

    Example:

    ```python
    >>> paths = save_diagnostics(diagnostics, "diagnostics/")  # doctest: +SKIP
    >>> print(paths["figure"])  # doctest: +SKIP
    diagnostics/stego_correlations.png
    ```
    """
    import json

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "figure": output_dir / "stego_correlations.png",
        "text": output_dir / "stego_diagnostics.txt",
        "json": output_dir / "stego_diagnostics.json",
    }
    plot_correlation_histograms(diagnostics, paths["figure"])
    paths["text"].write_text(format_diagnostics(diagnostics) + "\n")
    paths["json"].write_text(json.dumps(diagnostics.to_dict(), indent=2) + "\n")
    return paths
