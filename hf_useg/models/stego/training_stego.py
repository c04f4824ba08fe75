"""STEGO's training recipe for the shared loop (METHODS 1.2): kNN positives from the frozen backbone's global
descriptors (cached on disk), Adam on the head (lr 5e-4) and on both probes (lr 5e-3), no schedule; and the
helpers it is made of (kNN table, feature cache, shift calibration).

The default path runs at the hardware's pace: the frozen backbone runs once over the training set, under bfloat16
autocast on CUDA (``backbone_dtype``), and its maps go to a float16 memory-mapped file on disk (`FeatureCache`,
sized up front against the free space) that the DataLoader workers read row by row; each step then runs only the
head, the loss and the probes. ``cache_backbone_features: false`` and ``backbone_dtype: float32`` give the released
code's way (fp32 backbone on both images of every step); ``benchmarks/bench_stego_step.py`` compares the two.

Besides the loss and its terms, every step logs the code's correlation statistics (`StegoLossOutput.statistics`,
computed from the tensors the loss already has): ``train/code_corr_{intra,knn,neg}_mean`` and
``train/feat_above_shift_{intra,knn,neg}``; a collapsing code shows as all three means rising towards 1, and the
recipe logs a warning once (see `StegoRecipe.on_log`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ...backbones import backbone_autocast, resolve_autocast_dtype
from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from ...file_utils import atomic_directory, atomic_file
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
    "BACKBONE_DTYPES",
    "CODE_COLLAPSE_CHECK_STEP",
    "CODE_COLLAPSE_THRESHOLD",
    "FEATURE_CACHE_DTYPES",
    "FeatureCache",
    "StegoPairCollator",
    "StegoPairs",
    "StegoRecipe",
    "StegoTrainingOptions",
    "calibrate_shifts",
    "calibration_items",
    "check_feature_cache_space",
    "compute_feature_cache",
    "compute_knn_table",
    "feature_cache_bytes",
    "frozen_backbone_features",
    "load_or_compute_feature_cache",
    "resolve_backbone_dtype",
]

# The training-time collapse warning (`StegoRecipe.on_log`): the mean code correlation of random pairs of different
# images above this value, at a logging step at or after CODE_COLLAPSE_CHECK_STEP (or the last step of a shorter
# run).
CODE_COLLAPSE_THRESHOLD = 0.8
CODE_COLLAPSE_CHECK_STEP = 100


BACKBONE_DTYPES = ("auto", "float32", "bfloat16", "float16")
FEATURE_CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_backbone_dtype(name: str, device: str | torch.device) -> torch.dtype | None:
    """The dtype the frozen backbone runs in under autocast, None for plain float32.

    ``"auto"``: bfloat16 on CUDA (float16 on GPUs without bfloat16), float32 elsewhere (CPU autocast is rarely
    faster). ``"float32"``: no autocast (the released code's way). ``"bfloat16"`` / ``"float16"``: that dtype on
    any device.

    Example:

    ```python
    >>> resolve_backbone_dtype("auto", "cpu") is None, resolve_backbone_dtype("bfloat16", "cpu")
    (True, torch.bfloat16)
    ```
    """
    if name not in BACKBONE_DTYPES:
        raise ValueError(f"backbone_dtype must be one of {BACKBONE_DTYPES}, got {name!r}")
    if name == "auto":
        return resolve_autocast_dtype("auto", device)
    return _HALF_DTYPES.get(name)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def frozen_backbone_features(
    model: StegoForUnsupervisedSegmentation, pixel_values: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The frozen backbone's feature maps ``[B, C, h, w]`` (float32), computed under
    `hf_useg.backbones.backbone_autocast` when a half dtype is given (see [`resolve_backbone_dtype`]): on a GPU
    the matrix products then run on the tensor cores, with SDPA attention (the backbone wrapper's default)."""
    with backbone_autocast(autocast_dtype):
        return model.extract_features(pixel_values)


def _cache_key(model, items, source_fingerprint: str | None, fields: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.backbone_config.to_dict(), sort_keys=True, default=str).encode())
    weights = list(model.backbone.state_dict().items())
    for name, tensor in weights[:4] + weights[-2:]:  # enough to tell two backbones apart, cheap on ViT-B
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:65536])
    fingerprint = source_fingerprint or getattr(items.dataset, "_fingerprint", None) or str(len(items))
    digest.update(f"{fingerprint}|{len(items)}|{fields}".encode())
    return digest.hexdigest()[:24]


def _knn_cache_key(
    model,
    items: ProcessedSegmentationDataset,
    resolution: int,
    k: int,
    five_crop: bool,
    source_fingerprint: str | None,
    backbone_dtype: torch.dtype | None = None,
    crop_ratio: float = 0.5,
) -> str:
    fields = f"{resolution}|{k}|{five_crop}"
    # only settings other than the defaults extend the key, so the tables of earlier runs stay valid
    if backbone_dtype is not None:
        fields += f"|backbone_dtype={_dtype_name(backbone_dtype)}"
    if five_crop and crop_ratio != 0.5:
        fields += f"|crop_ratio={crop_ratio}"
    return _cache_key(model, items, source_fingerprint, fields)


def _loader(items, batch_size: int, num_workers: int, device: str | torch.device) -> DataLoader:
    return DataLoader(
        items,
        batch_size=batch_size,
        collate_fn=collate_segmentation_batch,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )


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
    descriptors: torch.Tensor | None = None,
    backbone_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    crop_ratio: float = 0.5,
) -> torch.Tensor:
    """Top-``k`` cosine neighbours ``[N, k]`` of every training item's global descriptor (METHODS 0.6), cached
    under a key of (backbone config and weights, dataset fingerprint, resolution, k, five-crop; the backbone's
    autocast dtype and the crop ratio when not the defaults): reruns and resumed runs reuse it.
    ``source_fingerprint`` identifies the data when ``items`` wraps a derived dataset (five crops) whose own
    fingerprint only reflects its index columns. The main process computes it (the neighbour search in chunks on
    ``accelerator.device``, `hf_useg.data.nearest_neighbors`); the others read the cache file.

    ``descriptors`` (``[N, C]``, e.g. `FeatureCache.descriptors`) or ``features`` (the items' backbone maps): when
    already computed; otherwise the backbone runs over the items (under ``backbone_dtype`` autocast, with
    ``num_workers`` DataLoader workers)."""
    from ...data import global_descriptors, nearest_neighbors

    k = min(k, len(items))
    if cache_dir is None and accelerator.num_processes > 1:
        raise ValueError("multi-process STEGO training needs a knn cache_dir to share the kNN table")
    path = None
    if cache_dir is not None:
        key = _knn_cache_key(model, items, resolution, k, five_crop, source_fingerprint, backbone_dtype, crop_ratio)
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
        if descriptors is None and features is not None:
            descriptors = torch.cat([global_descriptors(chunk.float()) for chunk in features.split(batch_size)])
        elif descriptors is None:
            collected = []
            loader = _loader(items, batch_size, num_workers, accelerator.device)
            for batch in tqdm(loader, desc="kNN descriptors", disable=not progress):
                pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
                collected.append(global_descriptors(frozen_backbone_features(model, pixel_values, backbone_dtype)))
            descriptors = torch.cat(collected)
        table = nearest_neighbors(descriptors, k, device=accelerator.device)
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


_CACHE_FORMAT = "hf_useg.stego.feature_cache"
_CACHE_VERSION = 1
_HEADER = "header.json"
_FEATURES_FILE, _LABELS_FILE, _DESCRIPTORS_FILE = "features.bin", "labels.bin", "descriptors.bin"


def _label_storage(num_classes: int | None) -> tuple[str, int]:
    """dtype and ignored value of cached labels: uint8 with 255 when the classes fit, else int16 with -1."""
    if num_classes is not None and num_classes <= 255:
        return "uint8", 255
    return "int16", -1


class FeatureCache:
    """The frozen backbone's feature maps ``[N, C, h, w]`` of every training item, their global descriptors
    ``[N, C]`` (float32, taken from the maps before any rounding) and the items' labels ``[N, H, W]`` (or None).

    STEGO trains without augmentation, so every step's backbone output is one of these maps. A cache lives

    * on disk (`compute_feature_cache` with a ``directory``; what training uses): ``features.bin`` (raw float16
      by default, C order), ``labels.bin`` (uint8 with 255 = ignored; int16 with -1 beyond 255 classes),
      ``descriptors.bin`` (float32) and ``header.json`` (format, key, shapes, dtypes), read through memory maps.
      `gather` reads only the rows it is asked for, so the set may be far larger than RAM (COCO-Stuff's ~250k
      five-crop items take ~300 GB with ViT-B/8 at 224 px). The maps are opened lazily in each process and never
      pickled: DataLoader workers (fork or spawn) open their own.
    * in RAM (``FeatureCache(features, labels, descriptors)``): tensors, for small sets and tests.

    Example:

    ```python
    >>> import torch
    >>> cache = FeatureCache(torch.randn(4, 8, 2, 2), labels=torch.zeros(4, 16, 16, dtype=torch.long))
    >>> cache.gather([2, 0]).shape, cache.gather_labels([1]).shape, len(cache)
    (torch.Size([2, 8, 2, 2]), torch.Size([1, 16, 16]), 4)
    ```
    """

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        descriptors: torch.Tensor | None = None,
    ):
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            raise ValueError("features must be a [N, C, h, w] tensor")
        for name, value in (("labels", labels), ("descriptors", descriptors)):
            if value is not None and value.shape[0] != features.shape[0]:
                raise ValueError(f"{name} has {value.shape[0]} rows, features {features.shape[0]}")
        self.directory: Path | None = None
        self.header: dict[str, Any] | None = None
        self._features, self._labels, self._descriptors = features, labels, descriptors
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def open(cls, directory: str | Path) -> FeatureCache:
        """The cache `compute_feature_cache` wrote under ``directory`` (its header and file sizes checked)."""
        directory = Path(directory)
        header_path = directory / _HEADER
        if not header_path.is_file():
            raise FileNotFoundError(f"{directory} holds no feature cache (no {_HEADER})")
        header = json.loads(header_path.read_text())
        if header.get("format") != _CACHE_FORMAT or header.get("version") != _CACHE_VERSION:
            raise ValueError(
                f"{header_path} is not a version-{_CACHE_VERSION} hf_useg feature cache: delete {directory} to "
                "rebuild it"
            )
        cache = cls.__new__(cls)
        cache.directory, cache.header = directory, header
        cache._features = cache._labels = cache._descriptors = None
        cache._maps = {}
        for name, (shape, dtype) in cache._files().items():
            expected = math.prod(shape) * np.dtype(dtype).itemsize
            actual = (directory / name).stat().st_size if (directory / name).is_file() else None
            if actual != expected:
                raise ValueError(
                    f"{directory / name} has {actual} bytes where its header says {expected}: the feature cache is "
                    f"damaged; delete {directory} to rebuild it"
                )
        return cache

    def _files(self) -> dict[str, tuple[tuple[int, ...], str]]:
        header = self.header
        count, shape = header["num_items"], tuple(header["feature_shape"])
        files = {
            _FEATURES_FILE: ((count, *shape), header["dtype"]),
            _DESCRIPTORS_FILE: ((count, shape[0]), "float32"),
        }
        if header["labels"] is not None:
            files[_LABELS_FILE] = ((count, *header["labels"]["shape"]), header["labels"]["dtype"])
        return files

    def _map(self, name: str) -> np.memmap:
        if name not in self._maps:
            shape, dtype = self._files()[name]
            self._maps[name] = np.memmap(self.directory / name, dtype=dtype, mode="r", shape=shape)
        return self._maps[name]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # each process maps the files itself
        return state

    def __len__(self) -> int:
        return self.header["num_items"] if self.header is not None else self._features.shape[0]

    @property
    def on_disk(self) -> bool:
        return self.header is not None

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one item's feature map."""
        return tuple(self.header["feature_shape"]) if self.on_disk else tuple(self._features.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the maps are stored in (what `gather` returns)."""
        return FEATURE_CACHE_DTYPES[self.header["dtype"]] if self.on_disk else self._features.dtype

    @property
    def has_labels(self) -> bool:
        return self.header["labels"] is not None if self.on_disk else self._labels is not None

    def gather(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The feature maps of ``indices``, ``[B, C, h, w]`` in the storage dtype (float16 by default: the training
        step converts them to float32 on its device). On disk, only these rows are read."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if not self.on_disk:
            return self._features[index]
        return torch.from_numpy(np.asarray(self._map(_FEATURES_FILE)[index.numpy()]))

    def gather_labels(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor | None:
        """The labels of ``indices``, ``[B, H, W]`` long with -1 where ignored; None when the cache has none."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if not self.on_disk:
            return None if self._labels is None else self._labels[index].long()
        if self.header["labels"] is None:
            return None
        raw = torch.from_numpy(np.asarray(self._map(_LABELS_FILE)[index.numpy()])).long()
        ignore = self.header["labels"]["ignore"]
        return raw if ignore == -1 else raw.masked_fill(raw == ignore, -1)

    @property
    def features(self) -> torch.Tensor:
        """All feature maps ``[N, C, h, w]`` (storage dtype): the tensor, or a zero-copy view of the memory-mapped
        file whose pages are read as they are touched."""
        if not self.on_disk:
            return self._features
        shape, dtype = self._files()[_FEATURES_FILE]
        # copy-on-write: a writable view (torch warns on read-only arrays) that never changes the file
        return torch.from_numpy(np.memmap(self.directory / _FEATURES_FILE, dtype=dtype, mode="c", shape=shape))

    @property
    def labels(self) -> torch.Tensor | None:
        """All labels ``[N, H, W]`` (long, -1 ignored), read whole: for small sets."""
        return self.gather_labels(torch.arange(len(self))) if self.has_labels else None

    @property
    def descriptors(self) -> torch.Tensor:
        """Global descriptors ``[N, C]`` (float32, `hf_useg.data.global_descriptors` of the unrounded maps), read
        whole (``N * C * 4`` bytes)."""
        if self.on_disk:
            return torch.from_numpy(np.array(self._map(_DESCRIPTORS_FILE)))
        if self._descriptors is None:
            from ...data import global_descriptors

            self._descriptors = torch.cat([global_descriptors(chunk.float()) for chunk in self._features.split(256)])
        return self._descriptors


def _feature_cache_layout(model, items) -> dict[str, Any]:
    """Shapes of the cache of ``items`` known before the backbone runs: from the first item and the backbone."""
    first = items[0]
    _, height, width = first["pixel_values"].shape
    patch = model.patch_size
    labels = first.get("labels")
    label_dtype, ignore = _label_storage(getattr(items, "num_classes", None))
    return {
        "num_items": len(items),
        "feature_shape": [int(model.backbone.hidden_size), height // patch, width // patch],
        "labels": None if labels is None else {"shape": list(labels.shape), "dtype": label_dtype, "ignore": ignore},
    }


def feature_cache_bytes(
    num_items: int,
    feature_shape: Sequence[int],
    label_shape: Sequence[int] | None = None,
    dtype: str = "float16",
    label_dtype: str = "uint8",
) -> int:
    """Disk bytes of a feature cache: ``N * C * h * w`` maps in ``dtype``, ``N * C`` float32 descriptors and, when
    given, ``N * H * W`` labels in ``label_dtype``.

    Example:

    ```python
    >>> round(feature_cache_bytes(248_145, (768, 28, 28)) / 2**30, 1)  # COCO-Stuff-27 five crops, ViT-B/8, 224 px
    279.0
    ```
    """
    channels = int(feature_shape[0])
    total = num_items * math.prod(feature_shape) * np.dtype(dtype).itemsize + num_items * channels * 4
    if label_shape is not None:
        total += num_items * math.prod(label_shape) * np.dtype(label_dtype).itemsize
    return int(total)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def check_feature_cache_space(directory: str | Path, layout: dict[str, Any], dtype: str = "float16") -> int:
    """Raise a clear `OSError` when the disk holding ``directory`` has less free space than the feature cache of
    ``layout`` needs (`feature_cache_bytes`); return the bytes needed."""
    labels = layout["labels"]
    needed = feature_cache_bytes(
        layout["num_items"],
        layout["feature_shape"],
        None if labels is None else labels["shape"],
        dtype,
        "uint8" if labels is None else labels["dtype"],
    )
    probe = Path(directory).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        channels, height, width = layout["feature_shape"]
        raise OSError(
            f"the backbone feature cache needs {_gib(needed)} ({needed:,} bytes: {layout['num_items']:,} items x "
            f"{channels} x {height} x {width} x {np.dtype(dtype).itemsize} bytes of {dtype} maps, plus descriptors"
            f"{' and labels' if labels is not None else ''}) but {probe} has {_gib(free)} ({free:,} bytes) free: "
            "free space, set feature_cache_dir to a larger disk, or train without the cache "
            "(--cache_backbone_features false: the backbone then runs on both images of every step)"
        )
    return needed


@torch.no_grad()
def compute_feature_cache(
    model,
    items: ProcessedSegmentationDataset,
    *,
    batch_size: int,
    device: str | torch.device,
    progress: bool = True,
    directory: str | Path | None = None,
    dtype: str = "float16",
    backbone_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    key: str | None = None,
) -> FeatureCache:
    """Run the frozen backbone once over the training items (under ``backbone_dtype`` autocast, see
    [`resolve_backbone_dtype`]; ``num_workers`` DataLoader workers) and keep its maps, their global descriptors
    and the labels. STEGO trains without augmentation, so every step's backbone output is one of these maps:
    caching them leaves only the head, the loss and the probes per step (see benchmarks/bench_stego_step.py).

    With ``directory`` (what training uses), the cache is written there batch by batch, never held whole in RAM:
    the free disk space is checked first (`check_feature_cache_space`: a clear error naming the bytes needed and
    free), the files are filled in a temporary sibling folder that is renamed into place when complete (an
    interrupted or failed write leaves nothing behind), and the returned cache reads them through memory maps.
    Without it, the maps are kept in RAM. ``dtype``: ``"float16"`` (default; half the bytes, relative rounding
    below 5e-4) or ``"float32"``."""
    from ...data import global_descriptors

    if dtype not in FEATURE_CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(FEATURE_CACHE_DTYPES)}, got {dtype!r}")
    storage = FEATURE_CACHE_DTYPES[dtype]
    device = torch.device(device)
    loader = _loader(items, batch_size, num_workers, device)
    batches = tqdm(loader, desc="backbone features", disable=not progress)

    def maps_of(batch) -> torch.Tensor:
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        return frozen_backbone_features(model, pixel_values, backbone_dtype)

    if directory is None:
        features, labels, descriptors = [], [], []
        for batch in batches:
            maps = maps_of(batch)
            descriptors.append(global_descriptors(maps).cpu())
            features.append(maps.to(storage).cpu())
            if "labels" in batch:
                labels.append(batch["labels"].to(torch.int16))
        cache = FeatureCache(torch.cat(features), torch.cat(labels) if labels else None, torch.cat(descriptors))
        logger.info(
            "cached backbone features in RAM: %s %s (%s)",
            tuple(cache.features.shape),
            dtype,
            _gib(cache.features.numel() * cache.features.element_size()),
        )
        return cache

    directory = Path(directory)
    layout = _feature_cache_layout(model, items)
    needed = check_feature_cache_space(directory, layout, dtype)
    label_info = layout["labels"]
    try:
        with atomic_directory(directory) as tmp, ThreadPoolExecutor(max_workers=1) as writer:
            files = {
                _FEATURES_FILE: open(tmp / _FEATURES_FILE, "wb"),
                _DESCRIPTORS_FILE: open(tmp / _DESCRIPTORS_FILE, "wb"),
            }
            if label_info is not None:
                files[_LABELS_FILE] = open(tmp / _LABELS_FILE, "wb")
            pending: list = []
            written = 0
            try:
                for batch in batches:
                    maps = maps_of(batch)
                    if list(maps.shape[1:]) != layout["feature_shape"]:
                        raise ValueError(
                            f"the backbone gave {tuple(maps.shape[1:])} maps, the cache was sized for "
                            f"{tuple(layout['feature_shape'])}"
                        )
                    arrays = {
                        _FEATURES_FILE: maps.to(storage).cpu().numpy(),
                        _DESCRIPTORS_FILE: global_descriptors(maps).float().cpu().numpy(),
                    }
                    if label_info is not None:
                        arrays[_LABELS_FILE] = _encode_labels(batch["labels"], label_info).numpy()
                    # the writes overlap the next batch's forward; at most two batches wait in memory
                    while len(pending) >= 2:
                        pending.pop(0).result()
                    pending.append(writer.submit(_write_arrays, files, arrays))
                    written += maps.shape[0]
                for future in pending:
                    future.result()
            finally:
                for future in pending:
                    future.cancel()
                writer.shutdown(wait=True)
                for handle in files.values():
                    handle.close()
            if written != layout["num_items"]:
                raise ValueError(f"the loader gave {written} items, the dataset has {layout['num_items']}")
            header = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "key": key, "dtype": dtype}
            header.update(layout, backbone_dtype=_dtype_name(backbone_dtype))
            (tmp / _HEADER).write_text(json.dumps(header, indent=2))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise OSError(
                f"the disk under {directory} filled up while writing the backbone feature cache ({_gib(needed)}); "
                "nothing was kept. Free space, set feature_cache_dir to a larger disk, or train with "
                "--cache_backbone_features false"
            ) from error
        raise
    cache = FeatureCache.open(directory)
    logger.info("cached backbone features on disk: %s %s (%s) in %s", len(cache), dtype, _gib(needed), directory)
    return cache


def _encode_labels(labels: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    if info["dtype"] == "uint8":
        return labels.masked_fill((labels < 0) | (labels > 254), 255).to(torch.uint8)
    if labels.numel() and int(labels.max()) > torch.iinfo(torch.int16).max:
        raise ValueError(f"label {int(labels.max())} does not fit the cache's int16 labels")
    return labels.masked_fill(labels < 0, -1).to(torch.int16)


def _write_arrays(files: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        files[name].write(np.ascontiguousarray(array).tobytes())


def load_or_compute_feature_cache(
    model,
    items: ProcessedSegmentationDataset,
    *,
    directory: str | Path,
    accelerator,
    batch_size: int,
    dtype: str = "float16",
    backbone_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = True,
    key: str | None = None,
) -> FeatureCache:
    """The disk feature cache under ``directory`` (`compute_feature_cache`): reused when an earlier run (e.g. the
    one being resumed) wrote it, else written by the main process while the others wait. Every process checks the
    free disk space first, so a cache that would not fit stops them all at once with the same message."""
    directory = Path(directory)
    exists = (directory / _HEADER).is_file()
    if not exists:
        check_feature_cache_space(directory, _feature_cache_layout(model, items), dtype)
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if not exists and accelerator.is_main_process:
        compute_feature_cache(
            model,
            items,
            batch_size=batch_size,
            device=accelerator.device,
            progress=progress,
            directory=directory,
            dtype=dtype,
            backbone_dtype=backbone_dtype,
            num_workers=num_workers,
            key=key,
        )
    accelerator.wait_for_everyone()
    if exists:
        logger.info("reusing the backbone feature cache in %s", directory)
    cache = FeatureCache.open(directory)
    if len(cache) != len(items):
        raise ValueError(
            f"the feature cache in {directory} has {len(cache)} items, the training set {len(items)}: delete it"
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
        cache_backbone_features: run the frozen backbone once over the training set instead of on both images of
            every step, its maps kept in a memory-mapped file under ``feature_cache_dir`` (default
            ``<output_dir>/feature_cache``; a resumed run reuses it) whose size is checked against the free disk
            space first ([`FeatureCache`]). Off: the released code's way.
        feature_cache_dtype: ``"float16"`` (half the disk, relative rounding below 5e-4) or ``"float32"`` (the
            very values of the per-step backbone).
        backbone_dtype: the frozen backbone's autocast dtype ([`resolve_backbone_dtype`]): ``"auto"`` (bfloat16
            on CUDA, float32 on the CPU), ``"float32"`` (the released code's), ``"bfloat16"`` or ``"float16"``.
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
    cache_backbone_features: bool = True
    feature_cache_dir: str | None = None
    feature_cache_dtype: str = "float16"
    backbone_dtype: str = "auto"
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
        if self.feature_cache_dtype not in FEATURE_CACHE_DTYPES:
            raise ValueError(
                f"feature_cache_dtype must be one of {tuple(FEATURE_CACHE_DTYPES)}, got {self.feature_cache_dtype!r}"
            )
        if self.backbone_dtype not in BACKBONE_DTYPES:
            raise ValueError(f"backbone_dtype must be one of {BACKBONE_DTYPES}, got {self.backbone_dtype!r}")


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
    """Stacks a batch of [`StegoPairs`] items into the model's inputs. With a cache: the maps of the items and of
    their partners, read at once from it (`FeatureCache.gather`, in the DataLoader worker that runs the collator),
    in the cache's dtype (float16 by default: half the bytes to move; `StegoRecipe.training_step` makes them
    float32 on the device)."""

    def __init__(self, cache: FeatureCache | None = None):
        self.cache = cache

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            indices = [item["index"] for item in items]
            batch = {
                "backbone_features": self.cache.gather(indices),
                "backbone_features_pos": self.cache.gather([item["partner"] for item in items]),
            }
            labels = self.cache.gather_labels(indices)
            if labels is not None:
                batch["labels"] = labels
            return batch
        keys = [key for key in items[0] if key not in ("index", "partner")]
        return {key: torch.stack([item[key] for item in items]) for key in keys}


class StegoRecipe(Recipe):
    """STEGO (METHODS 1.2): a segmentation head on a frozen backbone, trained with the feature-correspondence loss
    on pairs of an item and one of its kNN partners (global descriptors of the frozen backbone, computed once and
    cached on disk), and both probes; Adam on the head and on the probes, no schedule.

    Before training, `setup` expands five crops, caches the backbone's feature maps on disk (unless
    ``cache_backbone_features`` is off; [`load_or_compute_feature_cache`]), builds the kNN table and, with
    ``calibrate_shifts``, sets the positive shifts of the model's config to the backbone's median correlations.
    The frozen backbone runs under ``backbone_dtype`` autocast ([`frozen_backbone_features`]) wherever it runs:
    the cache, the kNN descriptors, and every step when nothing is cached.
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
        self._backbone_dtype = resolve_backbone_dtype(options.backbone_dtype, accelerator.device)
        source_fingerprint = getattr(run.train_set, "_fingerprint", None)
        cache = None
        if options.cache_backbone_features:
            fields = f"{options.resolution}|{options.five_crop}|{options.crop_ratio}"
            fields += f"|{_dtype_name(self._backbone_dtype)}|{options.feature_cache_dtype}"
            key = _cache_key(model, items, source_fingerprint, fields)
            root = Path(options.feature_cache_dir) if options.feature_cache_dir else run.output_dir / "feature_cache"
            cache = load_or_compute_feature_cache(
                model,
                items,
                directory=root / f"features-{key}",
                accelerator=accelerator,
                batch_size=self.args.eval_batch_size,
                dtype=options.feature_cache_dtype,
                backbone_dtype=self._backbone_dtype,
                num_workers=self.args.num_workers,
                progress=run.show_progress,
                key=key,
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
            source_fingerprint=source_fingerprint,
            # only the main process searches the neighbours
            descriptors=cache.descriptors if cache is not None and accelerator.is_main_process else None,
            backbone_dtype=self._backbone_dtype,
            num_workers=self.args.num_workers,
            crop_ratio=options.crop_ratio,
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
            features, partner_features = cache.gather(sample).float(), cache.gather(partners).float()
        else:
            features, partner_features = (
                frozen_backbone_features(
                    model,
                    collate_segmentation_batch([items[i] for i in chosen])["pixel_values"].to(self.run.device),
                    self._backbone_dtype,
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
            pin_memory=self.run.accelerator.device.type == "cuda",
        )

    def training_step(self, model, batch: dict[str, torch.Tensor]) -> TrainingStepOutput:
        self._statistics = {}
        if "backbone_features" in batch:  # from the cache, in its dtype: float32 here, on the device
            batch["backbone_features"] = batch["backbone_features"].float()
            batch["backbone_features_pos"] = batch["backbone_features_pos"].float()
        elif self._backbone_dtype is not None:  # the backbone on both images, under autocast
            unwrapped = self.run.accelerator.unwrap_model(model)
            batch["backbone_features"] = frozen_backbone_features(
                unwrapped, batch.pop("pixel_values"), self._backbone_dtype
            )
            batch["backbone_features_pos"] = frozen_backbone_features(
                unwrapped, batch.pop("pixel_values_pos"), self._backbone_dtype
            )
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
