"""PiCIE's training recipe for the shared loop (`hf_useg.training`, METHODS 2.2–2.6).

Each epoch (`PicieRecipe.on_epoch_start`, before the epoch's first step):

1. draw the views of every image (`draw_view_parameters`, deterministic from seed, epoch and image index);
2. **clustering pass** (eval mode, no gradients, images in a seeded random order, `cluster_batch_size` per batch):
   for each view, a mini-batch k-means on the L2-normalised features of all pixels: k-means (`kmeans`, Euclidean,
   `kmeans_iterations`) on the vectors of the first `kmeans_init_batches` batches, then one
   `minibatch_kmeans_update` per further batch ([`StreamingKMeans`]); with "+H" the same for K2 clusters;
3. **labelling pass**: every pixel's nearest centroid (squared L2) for each view, kept in memory (uint8), and the
   class weights from these labels' counts (`picie_cluster_weights`, `cluster_weighting`);
4. **training pass** (`PicieRecipe.training_step`): Adam on the whole network with `picie_loss` (or the "+H" loss)
   against the frozen centroids; the model's own centroids are the epoch's view-1 centroids, so validation during
   training uses them.

After the last step (`PicieRecipe.finalize`) the training images are re-clustered without augmentation
(`eval_resolution` center crop) and the model keeps those centroids for the final evaluation (METHODS 2.6).

Resuming is bit-exact: the epoch's centroids, weights and labels are saved with every checkpoint
(`PicieRecipe.checkpoint_objects`), the views are redrawn from the seed, and a checkpoint taken at an epoch
boundary re-clusters with the restored model, exactly as the uninterrupted run did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.image_utils import PILImageResampling

from ...clustering import assign_to_centroids, kmeans, minibatch_kmeans_update
from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from ...image_processing import protocol_image_processor
from ...training.recipe import (
    ItemsByBatchIndex,
    Recipe,
    RecipeOptions,
    StepBatchSampler,
    TrainingRun,
    TrainingStepOutput,
)
from .augmentation import (
    PicieViewParameters,
    apply_geometric,
    denormalize_images,
    draw_view_parameters,
    make_picie_views,
)
from .configuration_picie import PicieConfig
from .loss_picie import picie_cluster_weights
from .modeling_picie import PicieForUnsupervisedSegmentation

logger = logging.getLogger(__name__)

__all__ = [
    "PicieEpochState",
    "PicieRecipe",
    "PicieTrainingOptions",
    "StreamingKMeans",
    "cluster_epoch",
    "recluster_without_augmentation",
]


@dataclass
class PicieTrainingOptions(RecipeOptions):
    """PiCIE's training settings (METHODS 2.2–2.4). The defaults are the released COCO-Stuff-27 run
    (janghyuncho/PiCIE `sh_files/train_picie*.sh`): Adam 1e-4, 10 epochs of batch 128, views cut from a 640 center
    crop and fed at 320, clustering batches of 256, k-means initialised on 20 of them; preset ``cityscapes27`` is
    Adam 1e-3 (METHODS 2.4).

    Args:
        learning_rate: Adam learning rate (1e-4 COCO, 1e-3 Cityscapes).
        num_epochs: epochs; ``max_steps`` = ``num_epochs`` x batches per epoch unless ``max_steps`` is set.
        max_steps, batch_size, resolution, eval_resolution: the schedule (`RecipeOptions`); ``resolution`` is the
            side of the two views fed to the network, ``eval_resolution`` also that of the final re-clustering.
        val_every: validation interval in steps; None = once per epoch (as the released code).
        base_resolution_factor: the views are cut from a center crop of side ``resolution * base_resolution_factor``
            (bilinear resize of the shorter side): PiCIE's res2 = 640 for res1 = 320. View 1 is a random crop of it
            resized to ``resolution``; view 2 the whole crop resized to ``resolution``.
        final_recluster: after training, re-cluster the training images without augmentation (at
            ``eval_resolution``, center crop) and keep those centroids (the paper's final evaluation).
        kmeans_init_batches: each epoch's mini-batch k-means starts with k-means on the vectors of the first this
            many clustering batches, then updates online (METHODS 2.3).
        kmeans_iterations: Lloyd iterations of that initial k-means (the released COCO script passes 10, its
            Cityscapes script 20).
        kmeans_init_max_vectors: cap on the vectors kept for the initial k-means (an even random share per batch);
            None keeps every pixel of the first batches, as the released code does (about 33M vectors on COCO).
        cluster_batch_size: images per batch of the clustering and labelling passes.
        brightness, contrast, saturation: factors ~ U(max(0, 1 - x), 1 + x), each applied with probability
            ``color_jitter_probability``.
        hue: hue shift ~ U(-x, x) (fraction of the hue circle), applied with probability
            ``color_jitter_probability``.
        color_jitter_probability: probability of each of the four colour changes (independently).
        greyscale_probability: probability of turning the view grey.
        blur_probability: probability of a Gaussian blur.
        blur_radius_min, blur_radius_max: blur standard deviation in pixels of the base crop, ~ U(min, max).
        crop_scale_min, crop_scale_max: side of the geometric crop relative to the image, ~ U(min, max).
        flip_probability: probability of the horizontal flip of the geometric transform.
        released_augmentation: reproduce the released code's augmentation bugs instead of the paper's list
            (METHODS 2.2): no greyscale ever, blur radius |r| with r ~ U(min - (max - min) p / (1 - p), min)
            (U(-1.8, 0.1) for the defaults), and view 1 fed to the network *without* its photometric change in the
            training pass (the clustering passes use it).

    Example:

    ```python
    >>> from hf_useg.models.picie.training_picie import PicieTrainingOptions
    >>> options = PicieTrainingOptions.from_preset("cityscapes27", num_epochs=2)
    >>> options.learning_rate, options.num_epochs, options.batch_size, options.resolution
    (0.001, 2, 128, 320)
    ```
    """

    max_steps: int | None = None
    batch_size: int = 128
    resolution: int = 320
    eval_resolution: int = 320
    val_every: int | None = None

    learning_rate: float = 1e-4
    num_epochs: int = 10
    base_resolution_factor: int = 2
    final_recluster: bool = True

    # the clustering of each epoch (METHODS 2.3)
    kmeans_init_batches: int = 20
    kmeans_iterations: int = 20
    kmeans_init_max_vectors: int | None = None
    cluster_batch_size: int = 256

    # the views (METHODS 2.2)
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.1
    color_jitter_probability: float = 0.8
    greyscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_radius_min: float = 0.1
    blur_radius_max: float = 2.0
    crop_scale_min: float = 0.5
    crop_scale_max: float = 1.0
    flip_probability: float = 0.5
    released_augmentation: bool = False

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "cocostuff27": {"learning_rate": 1e-4},
        "cityscapes27": {"learning_rate": 1e-3},
    }

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_epochs", "base_resolution_factor", "kmeans_init_batches", "kmeans_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cluster_batch_size < 1:
            raise ValueError(f"cluster_batch_size must be >= 1, got {self.cluster_batch_size}")
        if self.kmeans_init_max_vectors is not None and self.kmeans_init_max_vectors < 1:
            raise ValueError(f"kmeans_init_max_vectors must be >= 1 or None, got {self.kmeans_init_max_vectors}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("brightness", "contrast", "saturation", "blur_radius_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        for name in ("color_jitter_probability", "greyscale_probability", "blur_probability", "flip_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.blur_radius_max < self.blur_radius_min:
            raise ValueError(
                f"blur_radius_max ({self.blur_radius_max}) must be >= blur_radius_min ({self.blur_radius_min})"
            )
        if not 0.0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(
                "crop scales must satisfy 0 < crop_scale_min <= crop_scale_max <= 1, got "
                f"{self.crop_scale_min} and {self.crop_scale_max}"
            )
        if self.released_augmentation and self.blur_probability >= 1.0:
            raise ValueError(
                "released_augmentation draws the blur radius from the blur coin: blur_probability must be < 1"
            )

    def check_model(self, config: PicieConfig) -> None:
        """Settings that depend on the model: the initial k-means needs at least K vectors."""
        if self.kmeans_init_max_vectors is not None and self.kmeans_init_max_vectors < config.num_clusters:
            raise ValueError(
                f"kmeans_init_max_vectors ({self.kmeans_init_max_vectors}) must be at least num_clusters "
                f"({config.num_clusters})"
            )


# ----------------------------------------------------------------------------------------------------------------
# streaming (mini-batch) k-means


class StreamingKMeans:
    """PiCIE's mini-batch k-means over a stream of batches (METHODS 2.3), in torch on the vectors' device.

    The first `init_batches` batches are kept and clustered with k-means (`hf_useg.clustering.kmeans`, squared L2,
    random initial centroids, `num_iterations` Lloyd iterations); the counts start as the number of those vectors
    nearest to each centroid. Every later batch is one `minibatch_kmeans_update`. Only the first batches are ever
    held in memory (capped by `max_init_vectors` when given: an even random share of each batch).

    Example:

    ```python
    >>> import torch
    >>> stream = StreamingKMeans(2, init_batches=1, num_iterations=10, seed=0)
    >>> stream.partial_fit(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]))
    >>> stream.partial_fit(torch.tensor([[0.0, 1.0]]))
    >>> stream.counts.sum().item()
    5.0
    ```
    """

    def __init__(
        self,
        num_clusters: int,
        *,
        init_batches: int,
        num_iterations: int,
        seed: int = 0,
        max_init_vectors: int | None = None,
    ):
        if num_clusters < 1 or init_batches < 1 or num_iterations < 1:
            raise ValueError(
                f"num_clusters, init_batches and num_iterations must be >= 1, got {num_clusters}, {init_batches}, "
                f"{num_iterations}"
            )
        self.num_clusters = num_clusters
        self.init_batches = init_batches
        self.num_iterations = num_iterations
        self.seed = seed
        self.max_init_vectors = max_init_vectors
        self.centroids: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.num_updates = 0
        self._pending: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed + 1)

    @property
    def initialized(self) -> bool:
        return self.centroids is not None

    def partial_fit(self, vectors: torch.Tensor) -> None:
        """Feed one batch of L2-normalised vectors ``[N, C]``."""
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"expected a non-empty [N, C] batch of vectors, got shape {tuple(vectors.shape)}")
        if self.initialized:
            self.centroids, self.counts = minibatch_kmeans_update(self.centroids, self.counts, vectors)
            self.num_updates += 1
            return
        if self.max_init_vectors is not None:
            keep = math.ceil(self.max_init_vectors / self.init_batches)
            if vectors.shape[0] > keep:
                chosen = torch.randperm(vectors.shape[0], generator=self._generator)[:keep]
                vectors = vectors[chosen.to(vectors.device)]
        self._pending.append(vectors)
        if len(self._pending) == self.init_batches:
            self._initialize()

    def _initialize(self) -> None:
        vectors = torch.cat(self._pending)
        self._pending = []
        result = kmeans(
            vectors,
            self.num_clusters,
            metric="euclidean",
            num_iterations=self.num_iterations,
            init="random",
            tolerance=0.0,
            seed=self.seed,
        )
        self.centroids = result.centroids
        self.counts = torch.bincount(result.labels, minlength=self.num_clusters).to(
            device=vectors.device, dtype=torch.float64
        )

    def finalize(self) -> torch.Tensor:
        """The centroids ``[K, C]`` (running the initial k-means now when the stream had fewer batches)."""
        if not self.initialized:
            if not self._pending:
                raise ValueError("StreamingKMeans got no vectors")
            self._initialize()
        return self.centroids


# ----------------------------------------------------------------------------------------------------------------
# the epoch's clustering


class PicieEpochState:
    """The clustering of the current epoch (centroids, class weights, per-pixel labels of every image for each view),
    saved with every checkpoint (`PicieRecipe.checkpoint_objects`).

    Example:

    ```python
    >>> state = PicieEpochState()
    >>> state.epoch, state.tensors = 0, {"labels1": torch.zeros(4, 2, 2, dtype=torch.uint8)}
    >>> state.targets([3, 1], torch.device("cpu"))["labels1"].shape
    torch.Size([2, 2, 2])
    ```
    """

    def __init__(self):
        self.epoch = -1
        self.tensors: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "tensors": {key: value.cpu() for key, value in self.tensors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.tensors = dict(state["tensors"])

    def targets(self, indices: torch.Tensor | Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """`cluster_targets` of the model's forward for the images ``indices``."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        targets = {}
        for key, value in self.tensors.items():
            if "labels" in key:
                targets[key] = value[indices].long().to(device)
            else:
                targets[key] = value.to(device)
        return targets


def _clusterings(config: PicieConfig) -> list[tuple[str, int]]:
    """(prefix, K) of each clustering: the main one, and "+H"'s."""
    result = [("", config.num_clusters)]
    if config.overclustering:
        result.append(("over_", config.num_overclusters))
    return result


def _derived_seed(seed: int, epoch: int, salt: int) -> int:
    return (int(seed) * 7_919 + (int(epoch) + 2) * 1_000_003 + salt * 65_537) % (2**31 - 1)


def _local_batches(index_batches: list[list[int]], accelerator) -> list[list[int]]:
    """This process's share of each global batch, padded (by repeating the last index) to equal shares."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return index_batches
    shares = []
    for batch in index_batches:
        per = -(-len(batch) // world)
        padded = batch + [batch[-1]] * (per * world - len(batch))
        shares.append(padded[rank * per : (rank + 1) * per])
    return shares


def _gather(tensor: torch.Tensor, size: int, accelerator) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.gather(tensor.contiguous())[:size]


def _loader(items, local_batches: list[list[int]], num_workers: int) -> DataLoader:
    return DataLoader(
        items, batch_sampler=local_batches, collate_fn=collate_segmentation_batch, num_workers=num_workers
    )


@torch.no_grad()
def _view_codes(
    model: PicieForUnsupervisedSegmentation, pixel_values: torch.Tensor, params: PicieViewParameters, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ẑ¹ = normalise(f(G(P1 x))) and ẑ² = normalise(G(f(P2 x))), float32."""
    view1, view2 = make_picie_views(denormalize_images(pixel_values), params, resolution)
    code1 = model.compute_code(view1).float()
    raw2 = apply_geometric(model.fpn_features(view2), params.geometric, tuple(code1.shape[-2:]))
    return code1, F.normalize(raw2.float(), dim=1)


def _flatten(code: torch.Tensor) -> torch.Tensor:
    return code.permute(0, 2, 3, 1).reshape(-1, code.shape[1])


@torch.no_grad()
def cluster_epoch(
    model: PicieForUnsupervisedSegmentation,
    items,
    view_params: PicieViewParameters,
    *,
    epoch: int,
    seed: int,
    resolution: int,
    accelerator,
    options: PicieTrainingOptions | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One epoch's clustering and labelling (steps 2 and 3 of the module docstring).

    Args:
        model: the unwrapped model (put in eval mode for the passes, restored afterwards).
        items: the training items at the base resolution (``pixel_values`` + ``index``).
        view_params: the epoch's views of every item.
        options: the clustering schedule (``cluster_batch_size``, ``kmeans_*``); the defaults when omitted.

    Returns:
        ``(tensors, stats)``: ``centroids1/2``, ``weights1/2``, ``labels1/2`` (``[N, h, w]`` uint8, or int32 for
        K > 256) and the ``over_*`` ones with "+H"; stats = mean squared distance of the labelled pixels to their
        centroids per view.
    """
    config: PicieConfig = model.config
    device = accelerator.device
    num_items = len(items)
    if len(view_params) != num_items:
        raise ValueError(f"view parameters for {len(view_params)} images, but {num_items} items")
    options = options or PicieTrainingOptions()
    batch_size = options.cluster_batch_size
    was_training = model.training
    model.eval()
    try:
        # 2. mini-batch k-means per view (and per clustering with "+H"), images in a seeded random order
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(_derived_seed(seed, epoch, 1)))
        global_batches = [order[i : i + batch_size].tolist() for i in range(0, num_items, batch_size)]
        streams = {}
        for salt, (prefix, k) in enumerate(_clusterings(config)):
            for view in (1, 2):
                streams[f"{prefix}{view}"] = StreamingKMeans(
                    k,
                    init_batches=options.kmeans_init_batches,
                    num_iterations=options.kmeans_iterations,
                    seed=_derived_seed(seed, epoch, 10 + 2 * salt + view),
                    max_init_vectors=options.kmeans_init_max_vectors,
                )
        loader = _loader(items, _local_batches(global_batches, accelerator), num_workers)
        for batch, indices in zip(
            tqdm(loader, desc=f"picie clustering (epoch {epoch})", disable=not progress), global_batches
        ):
            params = view_params.select(batch["index"])
            code1, code2 = _view_codes(model, batch["pixel_values"].to(device), params, resolution)
            vectors = {
                1: _flatten(_gather(code1, len(indices), accelerator)),
                2: _flatten(_gather(code2, len(indices), accelerator)),
            }
            for prefix, _ in _clusterings(config):
                for view in (1, 2):
                    streams[f"{prefix}{view}"].partial_fit(vectors[view])
        centroids = {name: stream.finalize() for name, stream in streams.items()}

        # 3. labels of every pixel (nearest centroid) and class weights from their counts
        tensors: dict[str, torch.Tensor] = {}
        counts = {name: torch.zeros(c.shape[0], dtype=torch.float64) for name, c in centroids.items()}
        costs = {1: 0.0, 2: 0.0}
        pixels = 0
        in_order = [list(range(i, min(i + batch_size, num_items))) for i in range(0, num_items, batch_size)]
        loader = _loader(items, _local_batches(in_order, accelerator), num_workers)
        for batch, indices in zip(tqdm(loader, desc="picie labels", disable=not progress), in_order):
            params = view_params.select(batch["index"])
            codes = _view_codes(model, batch["pixel_values"].to(device), params, resolution)
            codes = {1: _gather(codes[0], len(indices), accelerator), 2: _gather(codes[1], len(indices), accelerator)}
            height, width = codes[1].shape[-2:]
            pixels += len(indices) * height * width
            for prefix, k in _clusterings(config):
                for view in (1, 2):
                    name = f"{prefix}{view}"
                    labels, cost = assign_to_centroids(_flatten(codes[view]), centroids[name], "euclidean")
                    if not prefix:
                        costs[view] += float(cost.double().sum())
                    key = f"{prefix}labels{view}"
                    if key not in tensors:
                        dtype = torch.uint8 if k <= 256 else torch.int32
                        tensors[key] = torch.zeros(num_items, height, width, dtype=dtype)
                    labels = labels.view(len(indices), height, width).cpu()
                    tensors[key][torch.as_tensor(indices)] = labels.to(tensors[key].dtype)
                    counts[name] += torch.bincount(labels.flatten(), minlength=k).double()
        for prefix, _ in _clusterings(config):
            for view in (1, 2):
                name = f"{prefix}{view}"
                tensors[f"{prefix}centroids{view}"] = centroids[name].float().cpu()
                tensors[f"{prefix}weights{view}"] = picie_cluster_weights(
                    counts[name], config.cluster_weighting
                ).float()
        stats = {f"cluster/kmeans_loss{view}": costs[view] / pixels for view in (1, 2)}
        return tensors, stats
    finally:
        model.train(was_training)


@torch.no_grad()
def recluster_without_augmentation(
    model: PicieForUnsupervisedSegmentation,
    items,
    *,
    seed: int,
    accelerator,
    options: PicieTrainingOptions | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """The paper's final clustering (METHODS 2.6): mini-batch k-means (same procedure as in training) with K =
    `num_clusters` on the features of the training images without augmentation (``items`` at the evaluation
    resolution, center crop), with the clustering schedule of ``options``. Returns the centroids
    ``[K, fpn_dim]``."""
    config: PicieConfig = model.config
    options = options or PicieTrainingOptions()
    device = accelerator.device
    was_training = model.training
    model.eval()
    try:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(_derived_seed(seed, -1, 2)))
        size = options.cluster_batch_size
        global_batches = [order[i : i + size].tolist() for i in range(0, len(items), size)]
        stream = StreamingKMeans(
            config.num_clusters,
            init_batches=options.kmeans_init_batches,
            num_iterations=options.kmeans_iterations,
            seed=_derived_seed(seed, -1, 3),
            max_init_vectors=options.kmeans_init_max_vectors,
        )
        loader = _loader(items, _local_batches(global_batches, accelerator), num_workers)
        for batch, indices in zip(tqdm(loader, desc="picie final clustering", disable=not progress), global_batches):
            code = model.compute_code(batch["pixel_values"].to(device)).float()
            stream.partial_fit(_flatten(_gather(code, len(indices), accelerator)))
        return stream.finalize().float()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# the recipe


class _ViewsCollate:
    """Collates training items and adds their rows of the epoch's views (``views``, a [`PicieViewParameters`] kept
    on the CPU), in the DataLoader worker."""

    def __init__(self, view_params: PicieViewParameters):
        self.view_params = view_params

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_segmentation_batch(items)
        batch["views"] = self.view_params.select(batch["index"])
        return batch


class PicieRecipe(Recipe):
    """PiCIE (Cho et al., CVPR 2021) on the shared loop: every epoch starts by clustering the features of every
    training image under that epoch's views (`on_epoch_start`: `cluster_epoch`), and the steps train the whole
    network with Adam to predict those clusters across views (`training_step`, METHODS 2.2–2.5).

    What is particular to PiCIE:

    * the length is given in epochs (`default_max_steps` = ``num_epochs`` x batches per epoch) and validation runs
      once per epoch unless ``val_every`` is set;
    * the training items are center crops of side ``resolution * base_resolution_factor`` (bilinear); the views of
      each image are drawn per epoch up front (`draw_view_parameters`) and the collate hands each batch its rows,
      the views themselves being made on the model's device in `training_step`;
    * the epoch's clustering (`PicieEpochState`) is checkpointed, so a run resumed mid-epoch reuses it and one
      resumed at an epoch boundary re-clusters with the restored model, as the uninterrupted run did;
    * `finalize` re-clusters the training images without augmentation (``final_recluster``, METHODS 2.6).

    Example:

    ```python
    >>> from hf_useg.training import load_training_arguments, train
    >>> args = load_training_arguments("training/configs/picie_tiny.yaml", output_dir="outputs/picie-tiny")
    >>> args.recipe["cluster_batch_size"], args.model["fpn_dim"]
    (8, 8)
    >>> summary = train(args)  # doctest: +SKIP
    ```
    """

    options_class = PicieTrainingOptions
    progress_name = "train picie"

    def __init__(self, args: Any, options: PicieTrainingOptions):
        super().__init__(args, options)
        self.options: PicieTrainingOptions = options
        self.epoch_state = PicieEpochState()
        self.items: ProcessedSegmentationDataset | None = None
        self.view_params: PicieViewParameters | None = None

    def build_model(self, backbone_config: Any, num_classes: int) -> PicieForUnsupervisedSegmentation:
        """PiCIE with K = ``num_classes`` clusters, the ``model:`` overrides and the preset's architecture."""
        overrides = {"num_clusters": num_classes, **self.args.model, "backbone_config": backbone_config}
        if self.args.preset:
            config = PicieConfig.for_dataset(self.args.preset, **overrides)
        else:
            config = PicieConfig(**overrides)
        self.options.check_model(config)
        return PicieForUnsupervisedSegmentation(config)

    def setup(self, model: PicieForUnsupervisedSegmentation, run: TrainingRun) -> None:
        super().setup(model, run)
        base_processor = protocol_image_processor(
            self.options.resolution * self.options.base_resolution_factor, resample=PILImageResampling.BILINEAR
        )
        self.items = ProcessedSegmentationDataset(run.train_set, base_processor, run.num_classes, with_labels=False)

    @property
    def num_train_items(self) -> int:
        return len(self.items)

    def default_max_steps(self, steps_per_epoch: int) -> int:
        return self.options.num_epochs * steps_per_epoch

    def make_optimizer(self, model: PicieForUnsupervisedSegmentation) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.options.learning_rate)

    def checkpoint_objects(self) -> list[Any]:
        return [self.epoch_state]

    def on_epoch_start(self, model: PicieForUnsupervisedSegmentation, epoch: int, step: int) -> dict[str, float]:
        """Draw the epoch's views and cluster under them, unless the restored checkpoint already holds this
        epoch's clustering; the model then classifies with the epoch's view-1 centroids."""
        run = self.run
        self.view_params = draw_view_parameters(
            len(self.items), seed=self.args.seed, epoch=epoch, options=self.options
        )
        values: dict[str, float] = {}
        if self.epoch_state.epoch != epoch:
            tensors, stats = cluster_epoch(
                model,
                self.items,
                self.view_params,
                epoch=epoch,
                seed=self.args.seed,
                resolution=self.options.resolution,
                accelerator=run.accelerator,
                options=self.options,
                num_workers=self.args.num_workers,
                progress=run.show_progress,
            )
            self.epoch_state.epoch, self.epoch_state.tensors = epoch, tensors
            values = {"cluster/epoch": float(epoch), **stats}
        model.set_centroids(self.epoch_state.tensors["centroids1"])
        return values

    def train_dataloader(self, batches: StepBatchSampler) -> DataLoader:
        return DataLoader(
            ItemsByBatchIndex(self.items),
            batch_sampler=batches,
            collate_fn=_ViewsCollate(self.view_params),
            num_workers=self.args.num_workers,
        )

    def training_step(self, model, batch: dict[str, Any]) -> TrainingStepOutput:
        pixel_values = batch["pixel_values"]
        device = pixel_values.device
        rows: PicieViewParameters = batch["views"]
        view1, view2 = make_picie_views(
            denormalize_images(pixel_values),
            rows,
            self.options.resolution,
            photometric_view1=not self.options.released_augmentation,
        )
        output = model(
            pixel_values=view1,
            pixel_values_view2=view2,
            geometric_params=rows.geometric.to(device),
            cluster_targets=self.epoch_state.targets(batch["index"], device),
        )
        parts = ("within", "cross", "main_loss", "overclustering_loss")
        logs = {name: getattr(output, name).detach() for name in parts if getattr(output, name) is not None}
        return TrainingStepOutput(loss=output.loss, logs=logs)

    def finalize(self, model: PicieForUnsupervisedSegmentation) -> dict[str, Any]:
        """Keep the centroids of the training images re-clustered without augmentation (``final_recluster``),
        else the last epoch's."""
        run = self.run
        if self.options.final_recluster:
            eval_items = ProcessedSegmentationDataset(
                run.train_set, run.eval_processor, run.num_classes, with_labels=False
            )
            centroids = recluster_without_augmentation(
                model,
                eval_items,
                seed=self.args.seed,
                accelerator=run.accelerator,
                options=self.options,
                num_workers=self.args.num_workers,
                progress=run.show_progress,
            )
            model.set_centroids(centroids)
        elif self.epoch_state.tensors:
            model.set_centroids(self.epoch_state.tensors["centroids1"])
        return {}
