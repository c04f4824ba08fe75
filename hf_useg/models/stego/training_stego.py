"""STEGO's training recipe for `hf_useg.trainer` (METHODS 1.2): kNN positives from the frozen backbone's global
descriptors (cached on disk), Adam on the head (lr 5e-4) and on both probes (lr 5e-3), no schedule."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from .configuration_stego import StegoConfig
from .modeling_stego import StegoForUnsupervisedSegmentation

logger = logging.getLogger(__name__)

__all__ = ["FeatureCache", "build_model", "calibrate_shifts", "compute_feature_cache", "compute_knn_table", "train"]


def build_model(args, backbone_config, num_classes: int) -> StegoForUnsupervisedSegmentation:
    overrides = {"num_classes": num_classes, **args.model}
    if args.preset:
        config = StegoConfig.for_dataset(args.preset, **overrides)
        config.backbone_config = backbone_config
    else:
        config = StegoConfig(backbone_config=backbone_config, **overrides)
    return StegoForUnsupervisedSegmentation(config)


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
    path = None
    if cache_dir is not None:
        key = _knn_cache_key(model, items, resolution, k, five_crop, source_fingerprint)
        path = Path(cache_dir) / f"knn-{key}.pt"
        if path.exists():
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
            tmp = path.with_suffix(".tmp")
            torch.save(table, tmp)
            os.replace(tmp, path)
    accelerator.wait_for_everyone()
    if table is None:
        if path is None:
            raise ValueError("multi-process STEGO training needs a knn cache_dir to share the kNN table")
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
    from .loss_stego import norm, tensor_correlation

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
        correlation = tensor_correlation(normalized, partner)
        if pointwise:
            correlation = correlation - correlation.mean(dim=(-2, -1), keepdim=True) + correlation.mean()
        values = correlation.flatten()
        if values.numel() > 2_000_000:  # torch.quantile's input limit; a strided subsample is plenty
            values = values[:: values.numel() // 2_000_000 + 1]
        shifts[name] = float(torch.quantile(values, quantile))
    return shifts


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


def train(context) -> StegoForUnsupervisedSegmentation:
    args, schedule, accelerator = context.args, context.schedule, context.accelerator
    model: StegoForUnsupervisedSegmentation = context.model
    config = model.config
    train_set = context.train_set
    if schedule["five_crop"]:
        from ...data import expand_five_crops

        train_set = expand_five_crops(train_set, ratio=config.crop_ratio)
    items = context.train_items(dataset=train_set)
    cache = None
    if args.cache_backbone_features:
        cache = compute_feature_cache(
            model, items, batch_size=args.eval_batch_size, device=accelerator.device, progress=context.show_progress
        )
    knn = compute_knn_table(
        model,
        items,
        resolution=schedule["resolution"],
        k=args.knn_k,
        five_crop=schedule["five_crop"],
        cache_dir=args.knn_cache_dir or (context.output_dir / "knn_cache"),
        batch_size=args.eval_batch_size,
        accelerator=accelerator,
        progress=context.show_progress,
        source_fingerprint=getattr(context.train_set, "_fingerprint", None),
        features=None if cache is None else cache.features,
    )
    num_neighbors = max(1, min(config.num_neighbors, knn.shape[1] - 1))
    if args.calibrate_shifts:
        step = max(1, len(items) // 64)
        sample = list(range(0, len(items), step))[:64]
        partners = knn[torch.as_tensor(sample), 1].tolist()
        if cache is not None:
            features, partner_features = cache.features[sample], cache.features[partners]
        else:
            features, partner_features = (
                model.extract_features(
                    collate_segmentation_batch([items[i] for i in chosen])["pixel_values"].to(accelerator.device)
                ).cpu()
                for chosen in (sample, partners)
            )
        shifts = calibrate_shifts(
            features, pointwise=config.pointwise, seed=args.seed, partner_features=partner_features
        )
        config.pos_intra_shift, config.pos_inter_shift = shifts["pos_intra_shift"], shifts["pos_inter_shift"]
        accelerator.print(f"calibrated STEGO shifts to the backbone: {shifts}")
    steps = schedule["max_steps"]
    sampler = context.sampler(len(items), schedule["batch_size"])
    optimizer = torch.optim.Adam(
        [
            {"params": list(model.segmentation_head.parameters()), "lr": config.head_learning_rate},
            {
                "params": list(model.cluster_probe.parameters()) + list(model.linear_probe.parameters()),
                "lr": config.probe_learning_rate,
            },
        ]
    )
    prepared, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(prepared)
    context.resume()

    state = context.state
    progress = tqdm(total=steps, initial=state["step"], desc="train stego", disable=not context.show_progress)
    while state["step"] < steps:
        epoch, first = divmod(state["step"], sampler.batches_per_epoch)
        sampler.start(epoch, first)
        for indices in sampler:
            step = state["step"]
            generator = context.seed_step(step)
            ranks = torch.randint(1, num_neighbors + 1, (len(indices),), generator=generator)
            partners = knn[torch.as_tensor(indices), ranks].tolist()
            prepared.train()
            if cache is not None:
                labels = cache.labels[indices].long() if cache.labels is not None else None
                inputs = {
                    "backbone_features": cache.features[indices],
                    "backbone_features_pos": cache.features[partners],
                    "labels": labels,
                }
            else:
                batch = collate_segmentation_batch([items[i] for i in indices])
                positives = collate_segmentation_batch([items[i] for i in partners])
                inputs = {
                    "pixel_values": batch["pixel_values"],
                    "pixel_values_pos": positives["pixel_values"],
                    "labels": batch.get("labels"),
                }
            output = prepared(**{k: v.to(accelerator.device) if v is not None else None for k, v in inputs.items()})
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(output.loss)
            optimizer.step()
            state["step"] = step = step + 1
            progress.update(1)
            context.log_step(
                output,
                step,
                ("correlation_loss", "pos_intra", "pos_inter", "neg_inter", "cluster_probe_loss", "linear_probe_loss"),
                progress,
            )
            context.after_step(unwrapped, step)
            if step >= steps:
                break
    progress.close()
    return unwrapped
