"""STEGO's training recipe for the shared loop (METHODS 1.2): kNN positives from the frozen backbone's global
descriptors (cached on disk), Adam on the head (lr 5e-4) and on both probes (lr 5e-3), no schedule; and the
helpers it is made of (kNN table, feature cache, shift calibration).

Besides the loss and its terms, every step logs the code's correlation statistics (`StegoLossOutput.statistics`,
computed from the tensors the loss already has): ``train/code_corr_{intra,knn,neg}_mean`` and
``train/feat_above_shift_{intra,knn,neg}``; a collapsing code shows as all three means rising towards 1, and the
recipe logs a warning once (see `StegoRecipe.on_log`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from ...file_utils import atomic_file
from ...training.recipe import (
    BatchIndex,
    Recipe,
    RecipeOptions,
    StepBatchSampler,
    TrainingStepOutput,
    step_generator,
)
from .configuration_stego import StegoConfig
from .modeling_stego import StegoForUnsupervisedSegmentation

logger = logging.getLogger(__name__)

__all__ = [
    "CODE_COLLAPSE_CHECK_STEP",
    "CODE_COLLAPSE_THRESHOLD",
    "FeatureCache",
    "StegoPairCollator",
    "StegoPairs",
    "StegoRecipe",
    "StegoTrainingOptions",
    "calibrate_shifts",
    "calibration_items",
    "compute_feature_cache",
    "compute_knn_table",
]

# The training-time collapse warning (`StegoRecipe.on_log`): the mean code correlation of random pairs of different
# images above this value, at a logging step at or after CODE_COLLAPSE_CHECK_STEP (or the last step of a shorter
# run).
CODE_COLLAPSE_THRESHOLD = 0.8
CODE_COLLAPSE_CHECK_STEP = 100


def _knn_cache_key(
    model,
    items: ProcessedSegmentationDataset,
    resolution: int,
    k: int,
    five_crop: bool,
    source_fingerprint: str | None,
) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.backbone_config.to_dict(), sort_keys=True, default=str).encode())
    weights = list(model.backbone.state_dict().items())
    for name, tensor in weights[:4] + weights[-2:]:  # enough to tell two backbones apart, cheap on ViT-B
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:65536])
    fingerprint = source_fingerprint or getattr(items.dataset, "_fingerprint", None) or str(len(items))
    digest.update(f"{fingerprint}|{len(items)}|{resolution}|{k}|{five_crop}".encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute_knn_table(
    model,
    items: ProcessedSegmentationDataset,
    *,
    resolution: int,
    k: int,
    five_crop: bool,
    cache_dir: str | Path | None,
    batch_size: int,
    accelerator,
    progress: bool = True,
    source_fingerprint: str | None = None,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``k`` cosine neighbours ``[N, k]`` of every training item's global descriptor (METHODS 0.6), cached
    under a key of (backbone config and weights, dataset fingerprint, resolution, k, five-crop): reruns and
    resumed runs reuse it. ``source_fingerprint`` identifies the data when ``items`` wraps a derived dataset
    (five crops) whose own fingerprint only reflects its index columns. The main process computes it; the others
    read the cache file. ``features``: the items' backbone maps when already computed (cached features)."""
    from ...data import global_descriptors, nearest_neighbors

    k = min(k, len(items))
    if cache_dir is None and accelerator.num_processes > 1:
        raise ValueError("multi-process STEGO training needs a knn cache_dir to share the kNN table")
    path = None
    if cache_dir is not None:
        key = _knn_cache_key(model, items, resolution, k, five_crop, source_fingerprint)
        path = Path(cache_dir) / f"knn-{key}.pt"
        # every process looks before any writes (the barrier): they all take the same branch, or a process that
        # found the file the main process had just written would skip the barrier below and hang the others
        cached = path.exists()
        accelerator.wait_for_everyone()
        if cached:
            logger.info("loading the kNN table from %s", path)
            return torch.load(path)
    table = None
    if accelerator.is_main_process:
        if features is not None:
            descriptors = [global_descriptors(chunk) for chunk in features.split(batch_size)]
            table = nearest_neighbors(torch.cat(descriptors), k)
        else:
            loader = DataLoader(items, batch_size=batch_size, collate_fn=collate_segmentation_batch)
            descriptors = []
            for batch in tqdm(loader, desc="kNN descriptors", disable=not progress):
                maps = model.extract_features(batch["pixel_values"].to(accelerator.device))
                descriptors.append(global_descriptors(maps).cpu())
            table = nearest_neighbors(torch.cat(descriptors), k)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                torch.save(table, tmp)
    accelerator.wait_for_everyone()
    if table is None:
        table = torch.load(path)
    return table


@torch.no_grad()
def calibrate_shifts(
    features: torch.Tensor,
    pointwise: bool = True,
    quantile: float = 0.5,
    max_items: int = 64,
    seed: int = 0,
    partner_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """STEGO's positive shifts for a backbone other than DINO ViT-B/8: the ``quantile`` of the backbone's own
    feature correlations, within an image (``pos_intra_shift``) and between an image and another one
    (``pos_inter_shift``), centred the way the loss centres them when ``pointwise``.

    The released shifts (e.g. 0.12 / 0.2 for COCO-Stuff) sit inside DINO's correlation distribution; on a
    backbone whose correlations are much higher (random or briefly trained ViTs have medians near 0.4–0.9) they
    make almost every pair "positive" and the code collapses. Setting the shift at the median keeps about half
    of the pairs attracting. ``features``: ``[N, C, h, w]`` backbone maps of training images (at most
    ``max_items`` are used); ``partner_features``: the maps of each image's kNN partner (what the inter-image
    term pairs it with), else image ``i + 1`` (cyclic) stands in.

    Example:

    ```python
    >>> import torch
    >>> shifts = calibrate_shifts(torch.randn(8, 16, 7, 7))
    >>> sorted(shifts)
    ['pos_inter_shift', 'pos_intra_shift']
    ```
    """
    from .loss_stego import norm, pair_correlation

    if features.ndim != 4 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, C, h, w] maps, got shape {tuple(features.shape)}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if partner_features is not None and partner_features.shape != features.shape:
        raise ValueError(f"partner_features {tuple(partner_features.shape)} must match {tuple(features.shape)}")
    if features.shape[0] > max_items:
        keep = (
            torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_items].sort().values
        )
        features = features[keep]
        partner_features = None if partner_features is None else partner_features[keep]
    normalized = norm(features.float())
    partners = normalized.roll(-1, 0) if partner_features is None else norm(partner_features.float())
    shifts = {}
    for name, partner in (("pos_intra_shift", normalized), ("pos_inter_shift", partners)):
        values = pair_correlation(normalized, partner, pointwise).flatten()
        if values.numel() > 2_000_000:  # torch.quantile's input limit; a strided subsample is plenty
            values = values[:: values.numel() // 2_000_000 + 1]
        shifts[name] = float(torch.quantile(values, quantile))
    return shifts


def calibration_items(num_items: int, knn: torch.Tensor, max_items: int = 64) -> tuple[list[int], list[int]]:
    """The items ``--calibrate_shifts`` measures and their partners: ``max_items`` items evenly spread over the
    ``num_items`` training items, each with its nearest neighbour (rank 1 of the kNN table ``knn``).

    Example:

    ```python
    >>> import torch
    >>> calibration_items(4, torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]]), max_items=2)
    ([0, 2], [1, 3])
    ```
    """
    step = max(1, num_items // max_items)
    sample = list(range(0, num_items, step))[:max_items]
    return sample, knn[torch.as_tensor(sample), 1].tolist()


@dataclass
class FeatureCache:
    """Frozen-backbone feature maps ``[N, C, h, w]`` and labels ``[N, H, W]`` (or None) of every training item."""

    features: torch.Tensor
    labels: torch.Tensor | None


@torch.no_grad()
def compute_feature_cache(
    model, items: ProcessedSegmentationDataset, *, batch_size: int, device, progress: bool = True
) -> FeatureCache:
    """Run the frozen backbone once over the training items. STEGO trains without augmentation, so every step's
    backbone output is one of these maps: caching them leaves only the head, the loss and the probes per step
    (see benchmarks/bench_stego_step.py). Memory: ``N * C * h * w * 4`` bytes (logged)."""
    loader = DataLoader(items, batch_size=batch_size, collate_fn=collate_segmentation_batch)
    features, labels = [], []
    for batch in tqdm(loader, desc="backbone features", disable=not progress):
        features.append(model.extract_features(batch["pixel_values"].to(device)).cpu())
        if "labels" in batch:
            labels.append(batch["labels"].to(torch.int16))
    cache = FeatureCache(torch.cat(features), torch.cat(labels) if labels else None)
    logger.info(
        "cached backbone features: %s (%.1f MiB)", tuple(cache.features.shape), cache.features.numel() * 4 / 2**20
    )
    return cache


@dataclass
class StegoTrainingOptions(RecipeOptions):
    """STEGO's training settings (METHODS 1.2); the defaults are the COCO-Stuff-27 release, ``presets`` the others.

    Args:
        five_crop: train on the five crops of each image (METHODS 0.5), ``crop_ratio`` of the image side each.
        num_neighbors: the kNN partner of an item is drawn among its ``num_neighbors`` nearest neighbours (rank 0,
            the item itself, excluded), from a table of ``knn_k`` neighbours cached under ``knn_cache_dir``
            (default ``<output_dir>/knn_cache``).
        head_learning_rate, probe_learning_rate: Adam learning rates of the segmentation head and of both probes.
        cache_backbone_features: run the frozen backbone once over the training set instead of twice per step.
        calibrate_shifts: set the positive shifts to the backbone's median feature correlations
            ([`calibrate_shifts`]) — for backbones other than DINO ViT-B/8.
        cluster_probe_init: ``"random"`` (STEGO's: the cluster probe's centroids start at N(0, 1)) or
            ``"kmeans"``: after the first step they are set by spherical k-means (k-means++, 5 restarts) of that
            batch's code ([`kmeans_probe_centroids`]). The probe learns by gradient with hard assignments, so a
            centroid that starts where no code is nearest stays (almost) empty and two classes share one for the
            rest of training; with few classes that costs a whole class of the cluster probe.

    Example:

    ```python
    >>> StegoTrainingOptions.from_preset("potsdam3").batch_size
    16
    ```
    """

    max_steps: int | None = 7000
    batch_size: int = 32
    resolution: int = 224
    eval_resolution: int = 320
    val_every: int | None = 100
    five_crop: bool = True
    crop_ratio: float = 0.5
    num_neighbors: int = 7
    knn_k: int = 30
    knn_cache_dir: str | None = None
    head_learning_rate: float = 5e-4
    probe_learning_rate: float = 5e-3
    cache_backbone_features: bool = False
    calibrate_shifts: bool = False
    cluster_probe_init: str = "random"

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "cocostuff27": {"max_steps": 7000, "batch_size": 32, "five_crop": True},
        "cityscapes27": {"max_steps": 7000, "batch_size": 32, "five_crop": True},
        "potsdam3": {"max_steps": 5000, "batch_size": 16, "five_crop": False},
    }

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.crop_ratio <= 1.0:
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio}")
        if self.num_neighbors < 1 or self.knn_k < 2:
            raise ValueError(f"num_neighbors must be >= 1 and knn_k >= 2, got {self.num_neighbors}, {self.knn_k}")
        if self.head_learning_rate <= 0 or self.probe_learning_rate <= 0:
            raise ValueError("head_learning_rate and probe_learning_rate must be > 0")
        if self.cluster_probe_init not in ("random", "kmeans"):
            raise ValueError(f"cluster_probe_init must be 'random' or 'kmeans', got {self.cluster_probe_init!r}")


@torch.no_grad()
def kmeans_probe_centroids(
    code: torch.Tensor, num_clusters: int, norm: float | torch.Tensor, seed: int = 0, num_init: int = 5
) -> torch.Tensor:
    """Cluster-probe centroids ``[num_clusters, D]`` from a batch of code ``[B, D, h, w]``: spherical k-means
    (`hf_useg.clustering.kmeans`, ``metric="cosine"``, k-means++ with ``num_init`` restarts) of its vectors, each
    centroid scaled to ``norm`` (the probe's cosine ignores it; it sets how far Adam's steps turn a centroid).

    Example:

    ```python
    >>> import torch
    >>> code = torch.cat([torch.randn(1, 2, 4, 4) * 0.1 + torch.tensor([5.0, 0.0])[None, :, None, None],
    ...                   torch.randn(1, 2, 4, 4) * 0.1 + torch.tensor([0.0, 5.0])[None, :, None, None]])
    >>> centroids = kmeans_probe_centroids(code, 2, norm=2.0)
    >>> sorted(round(abs(value)) for value in centroids.flatten().tolist())
    [0, 0, 2, 2]
    ```
    """
    from ...clustering import kmeans

    vectors = code.detach().float().permute(0, 2, 3, 1).reshape(-1, code.shape[1])
    result = kmeans(vectors, num_clusters, metric="cosine", num_init=num_init, seed=seed)
    return torch.nn.functional.normalize(result.centroids, dim=1) * norm


class StegoPairs(Dataset):
    """Training pairs for the loop's batches: each [`BatchIndex`] gives its item and the item's kNN partner, drawn
    from the step's generator (``randint(1, num_neighbors + 1)`` per position of the batch) — in the DataLoader's
    workers. Items are the processed images, or only their indices when a feature cache stands in for the
    backbone (`StegoPairCollator` then gathers the cached maps)."""

    def __init__(
        self,
        items: ProcessedSegmentationDataset,
        knn: torch.Tensor,
        num_neighbors: int,
        cache: FeatureCache | None = None,
    ):
        self.items, self.knn, self.num_neighbors, self.cache = items, knn, num_neighbors, cache

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: BatchIndex) -> dict[str, Any]:
        rank = torch.randint(1, self.num_neighbors + 1, (key.batch_size,), generator=step_generator(key))[key.position]
        item = {"index": key.index, "partner": int(self.knn[key.index, rank])}
        if self.cache is None:
            anchor = self.items[key.index]
            item["pixel_values"] = anchor["pixel_values"]
            item["pixel_values_pos"] = self.items[item["partner"]]["pixel_values"]
            if "labels" in anchor:
                item["labels"] = anchor["labels"]
        return item


class StegoPairCollator:
    """Stacks a batch of [`StegoPairs`] items into the model's inputs (with a cache: its maps of the items and of
    their partners, gathered at once)."""

    def __init__(self, cache: FeatureCache | None = None):
        self.cache = cache

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            indices = [item["index"] for item in items]
            batch = {
                "backbone_features": self.cache.features[indices],
                "backbone_features_pos": self.cache.features[[item["partner"] for item in items]],
            }
            if self.cache.labels is not None:
                batch["labels"] = self.cache.labels[indices].long()
            return batch
        keys = [key for key in items[0] if key not in ("index", "partner")]
        return {key: torch.stack([item[key] for item in items]) for key in keys}


class StegoRecipe(Recipe):
    """STEGO (METHODS 1.2): a segmentation head on a frozen backbone, trained with the feature-correspondence loss
    on pairs of an item and one of its kNN partners (global descriptors of the frozen backbone, computed once and
    cached on disk), and both probes; Adam on the head and on the probes, no schedule.

    Before training, `setup` expands five crops, optionally caches the backbone's feature maps, builds the kNN
    table and, with ``calibrate_shifts``, sets the positive shifts of the model's config to the backbone's median
    correlations.
    """

    options_class = StegoTrainingOptions
    progress_name = "train stego"
    options: StegoTrainingOptions

    def build_model(self, backbone_config, num_classes: int) -> StegoForUnsupervisedSegmentation:
        overrides = {"num_classes": num_classes, **self.args.model}
        if self.args.preset:
            config = StegoConfig.for_dataset(self.args.preset, **overrides)
            config.backbone_config = backbone_config
        else:
            config = StegoConfig(backbone_config=backbone_config, **overrides)
        return StegoForUnsupervisedSegmentation(config)

    def setup(self, model: StegoForUnsupervisedSegmentation, run) -> None:
        super().setup(model, run)
        options, accelerator = self.options, run.accelerator
        train_set = run.train_set
        if options.five_crop:
            from ...data import expand_five_crops

            train_set = expand_five_crops(train_set, ratio=options.crop_ratio)
        items = ProcessedSegmentationDataset(train_set, run.train_processor, run.num_classes)
        cache = None
        if options.cache_backbone_features:
            cache = compute_feature_cache(
                model,
                items,
                batch_size=self.args.eval_batch_size,
                device=accelerator.device,
                progress=run.show_progress,
            )
        knn = compute_knn_table(
            model,
            items,
            resolution=options.resolution,
            k=options.knn_k,
            five_crop=options.five_crop,
            cache_dir=options.knn_cache_dir or (run.output_dir / "knn_cache"),
            batch_size=self.args.eval_batch_size,
            accelerator=accelerator,
            progress=run.show_progress,
            source_fingerprint=getattr(run.train_set, "_fingerprint", None),
            features=None if cache is None else cache.features,
        )
        num_neighbors = max(1, min(options.num_neighbors, knn.shape[1] - 1))
        if options.calibrate_shifts:
            self._calibrate(model, items, knn, cache)
        self.pairs = StegoPairs(items, knn, num_neighbors, cache)
        self._first_code: torch.Tensor | None = None
        self._probe_init_pending = options.cluster_probe_init == "kmeans"
        model.correlation_loss.output_statistics = True
        self._statistics: dict[str, torch.Tensor] = {}
        self._statistics_hook = model.correlation_loss.register_forward_hook(self._keep_statistics)
        self._collapse_warned = False
        self._config = model.config

    def _keep_statistics(self, module, inputs, output) -> None:
        self._statistics = output.statistics or {}

    def _calibrate(self, model, items, knn: torch.Tensor, cache: FeatureCache | None) -> None:
        config = model.config
        sample, partners = calibration_items(len(items), knn)
        if cache is not None:
            features, partner_features = cache.features[sample], cache.features[partners]
        else:
            features, partner_features = (
                model.extract_features(
                    collate_segmentation_batch([items[i] for i in chosen])["pixel_values"].to(self.run.device)
                ).cpu()
                for chosen in (sample, partners)
            )
        shifts = calibrate_shifts(
            features, pointwise=config.pointwise, seed=self.args.seed, partner_features=partner_features
        )
        config.pos_intra_shift, config.pos_inter_shift = shifts["pos_intra_shift"], shifts["pos_inter_shift"]
        self.run.accelerator.print(f"calibrated STEGO shifts to the backbone: {shifts}")

    @property
    def num_train_items(self) -> int:
        return len(self.pairs)

    def after_optimizer_step(self, model, step: int) -> None:
        if not self._probe_init_pending:
            return
        self._probe_init_pending = False
        if step != 0:  # a resumed run: its checkpoint holds the initialised probe
            self._first_code = None
            return
        # every process must set the same centroids: cluster the code of all processes' first batches
        code = self.run.accelerator.gather(self._first_code)
        self._first_code = None
        probe = model.cluster_probe
        norm = probe.clusters.detach().norm(dim=1, keepdim=True).mean()
        centroids = kmeans_probe_centroids(code, probe.num_clusters, norm, seed=self.args.seed)
        with torch.no_grad():
            probe.clusters.copy_(centroids.to(probe.clusters))
        # the first step's Adam moments belong to the random centroids
        self._optimizer.state.pop(probe.clusters, None)
        logger.info("initialised the cluster probe by k-means of the first batch's code (%s vectors)", code.shape)

    def make_optimizer(self, model: StegoForUnsupervisedSegmentation) -> torch.optim.Optimizer:
        self._optimizer = torch.optim.Adam(
            [
                {"params": list(model.segmentation_head.parameters()), "lr": self.options.head_learning_rate},
                {
                    "params": list(model.cluster_probe.parameters()) + list(model.linear_probe.parameters()),
                    "lr": self.options.probe_learning_rate,
                },
            ]
        )
        return self._optimizer

    def train_dataloader(self, batches: StepBatchSampler) -> DataLoader:
        return DataLoader(
            self.pairs,
            batch_sampler=batches,
            collate_fn=StegoPairCollator(self.pairs.cache),
            num_workers=self.args.num_workers,
        )

    def training_step(self, model, batch: dict[str, torch.Tensor]) -> TrainingStepOutput:
        self._statistics = {}
        output = model(**batch)
        names = ("correlation_loss", "pos_intra", "pos_inter", "neg_inter", "cluster_probe_loss", "linear_probe_loss")
        logs = {name: getattr(output, name).detach() for name in names if getattr(output, name, None) is not None}
        logs.update(self._statistics)  # the loss's code statistics, caught by the hook set in `setup`
        if self._probe_init_pending:
            self._first_code = output.code.detach()
        return TrainingStepOutput(loss=output.loss, logs=logs)

    def on_log(self, logs: dict[str, float], step: int) -> None:
        """Warn once when the code collapses: at a logging step at or after ``CODE_COLLAPSE_CHECK_STEP`` (or the
        last step of a shorter run; earlier, the code still reflects the random head), the mean code correlation
        of random pairs of different images (``train/code_corr_neg_mean``) above ``CODE_COLLAPSE_THRESHOLD``
        (0.8). Random pairs mostly show different segments, and the negative term pushes their code correlations
        down to 0 (``zero_clamp``); above 0.8 (the ceiling ``stabilize`` puts on any code correlation) points of
        unrelated images share nearly the same code, which the cluster probe cannot split: the positive terms
        outweigh the negative one, usually because the positive shifts sit below most of the backbone's
        correlations (see `hf_useg.models.stego.diagnostics`)."""
        value = logs.get("train/code_corr_neg_mean")
        max_steps = self.options.max_steps or CODE_COLLAPSE_CHECK_STEP
        if self._collapse_warned or value is None or step < min(CODE_COLLAPSE_CHECK_STEP, max_steps):
            return
        if value > CODE_COLLAPSE_THRESHOLD:
            self._collapse_warned = True
            if not self.run.accelerator.is_main_process:
                return
            config = self._config
            logger.warning(
                "STEGO's code is collapsing at step %d: random pairs of different images have a mean code "
                "correlation of %.3f (> %.2f; kNN pairs %.3f, same image %.3f). The positive shifts "
                "(pos_intra_shift %.4g, pos_inter_shift %.4g) likely sit below most of the backbone's feature "
                "correlations: check them with hf_useg.models.stego.diagnostics.stego_correlation_diagnostics, or "
                "train with --calibrate_shifts true.",
                step,
                value,
                CODE_COLLAPSE_THRESHOLD,
                logs.get("train/code_corr_knn_mean", float("nan")),
                logs.get("train/code_corr_intra_mean", float("nan")),
                config.pos_intra_shift,
                config.pos_inter_shift,
            )

    def finalize(self, model) -> dict[str, Any]:
        hook = getattr(self, "_statistics_hook", None)
        if hook is not None:
            hook.remove()
            model.correlation_loss.output_statistics = False
        return super().finalize(model)
