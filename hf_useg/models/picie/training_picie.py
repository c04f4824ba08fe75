"""PiCIE's training recipe for `hf_useg.trainer` (METHODS 2.2–2.6).

Each epoch:

1. draw the views of every image (`draw_view_parameters`, deterministic from seed, epoch and image index);
2. **clustering pass** (eval mode, no gradients, images in a seeded random order, `cluster_batch_size` per batch):
   for each view, a mini-batch k-means on the L2-normalised features of all pixels: k-means (`kmeans`, Euclidean,
   `kmeans_iterations`) on the vectors of the first `kmeans_init_batches` batches, then one
   `minibatch_kmeans_update` per further batch ([`StreamingKMeans`]); with "+H" the same for K2 clusters;
3. **labelling pass**: every pixel's nearest centroid (squared L2) for each view, kept in memory (uint8), and the
   class weights from these labels' counts (`picie_cluster_weights`, `cluster_weighting`);
4. **training pass**: Adam on the whole network with `picie_loss` (or the "+H" loss) against the frozen centroids;
   the model's own centroids are the epoch's view-1 centroids, so validation during training uses them.

After the last step the training images are re-clustered without augmentation (`eval_resolution` center crop)
and the model keeps those centroids for the final evaluation (METHODS 2.6).

Resuming is bit-exact: the epoch's centroids, weights and labels are saved with every checkpoint (registered with
`accelerator.register_for_checkpointing`), the views are redrawn from the seed, and a checkpoint taken at an epoch
boundary re-clusters with the restored model, exactly as the uninterrupted run did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.image_utils import PILImageResampling

from ...clustering import assign_to_centroids, kmeans, minibatch_kmeans_update
from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from ...image_processing import protocol_image_processor
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
    "StreamingKMeans",
    "build_model",
    "cluster_epoch",
    "recluster_without_augmentation",
    "train",
]


def _coerce_floats(overrides: dict[str, Any]) -> dict[str, Any]:
    # YAML reads `1` as an int and `1e-3` as a string; the strict config wants floats for its float fields
    result = dict(overrides)
    for name in PicieConfig.float_fields():
        value = result.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            result[name] = float(value)
        elif isinstance(value, str):
            try:
                result[name] = float(value)
            except ValueError:
                pass  # the config names the field in its error
    return result


def build_model(args, backbone_config, num_classes: int) -> PicieForUnsupervisedSegmentation:
    """PiCIE on the trainer's backbone with K = ``num_classes`` clusters, `args.model` overrides and `args.preset`
    (``"cocostuff27"``/``"cityscapes27"``)."""
    overrides = _coerce_floats({"num_clusters": num_classes, **args.model})
    overrides["backbone_config"] = backbone_config
    if args.preset:
        config = PicieConfig.for_dataset(args.preset, **overrides)
    else:
        config = PicieConfig(**overrides)
    return PicieForUnsupervisedSegmentation(config)


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
    saved with every checkpoint through `accelerator.register_for_checkpointing`."""

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
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One epoch's clustering and labelling (steps 2 and 3 of the module docstring).

    Args:
        model: the unwrapped model (put in eval mode for the passes, restored afterwards).
        items: the training items at the base resolution (``pixel_values`` + ``index``).
        view_params: the epoch's views of every item.

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
    batch_size = config.cluster_batch_size
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
                    init_batches=config.kmeans_init_batches,
                    num_iterations=config.kmeans_iterations,
                    seed=_derived_seed(seed, epoch, 10 + 2 * salt + view),
                    max_init_vectors=config.kmeans_init_max_vectors,
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
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """The paper's final clustering (METHODS 2.6): mini-batch k-means (same procedure as in training) with K =
    `num_clusters` on the features of the training images without augmentation (``items`` at the evaluation
    resolution, center crop). Returns the centroids ``[K, fpn_dim]``."""
    config: PicieConfig = model.config
    device = accelerator.device
    was_training = model.training
    model.eval()
    try:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(_derived_seed(seed, -1, 2)))
        size = config.cluster_batch_size
        global_batches = [order[i : i + size].tolist() for i in range(0, len(items), size)]
        stream = StreamingKMeans(
            config.num_clusters,
            init_batches=config.kmeans_init_batches,
            num_iterations=config.kmeans_iterations,
            seed=_derived_seed(seed, -1, 3),
            max_init_vectors=config.kmeans_init_max_vectors,
        )
        loader = _loader(items, _local_batches(global_batches, accelerator), num_workers)
        for batch, indices in zip(tqdm(loader, desc="picie final clustering", disable=not progress), global_batches):
            code = model.compute_code(batch["pixel_values"].to(device)).float()
            stream.partial_fit(_flatten(_gather(code, len(indices), accelerator)))
        return stream.finalize().float()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# the loop


def train(context) -> PicieForUnsupervisedSegmentation:
    args, schedule, accelerator = context.args, context.schedule, context.accelerator
    model: PicieForUnsupervisedSegmentation = context.model
    config: PicieConfig = model.config
    device = accelerator.device
    resolution = schedule["resolution"]
    base_processor = protocol_image_processor(
        resolution * config.base_resolution_factor, resample=PILImageResampling.BILINEAR
    )
    items = ProcessedSegmentationDataset(context.train_set, base_processor, context.num_classes, with_labels=False)
    sampler = context.sampler(len(items), schedule["batch_size"])
    per_epoch = sampler.batches_per_epoch
    # epochs -> steps (the trainer's schedule holds None when neither the arguments nor the config fix them)
    if schedule["max_steps"] is None:
        schedule["max_steps"] = config.num_epochs * per_epoch
    if schedule["val_every"] is None:
        schedule["val_every"] = per_epoch
    steps = schedule["max_steps"]

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    epoch_state = PicieEpochState()
    accelerator.register_for_checkpointing(epoch_state)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(prepared)
    context.resume()

    state = context.state
    progress = tqdm(total=steps, initial=state["step"], desc="train picie", disable=not context.show_progress)
    while state["step"] < steps:
        epoch, first = divmod(state["step"], per_epoch)
        view_params = draw_view_parameters(len(items), seed=args.seed, epoch=epoch, config=config)
        if epoch_state.epoch != epoch:
            tensors, stats = cluster_epoch(
                unwrapped,
                items,
                view_params,
                epoch=epoch,
                seed=args.seed,
                resolution=resolution,
                accelerator=accelerator,
                num_workers=args.num_workers,
                progress=context.show_progress,
            )
            epoch_state.epoch, epoch_state.tensors = epoch, tensors
            context.log({"cluster/epoch": float(epoch), **stats}, state["step"])
        unwrapped.set_centroids(epoch_state.tensors["centroids1"])
        sampler.start(epoch, first)
        loader = DataLoader(
            items, batch_sampler=sampler, collate_fn=collate_segmentation_batch, num_workers=args.num_workers
        )
        for batch in loader:
            step = state["step"]
            context.seed_step(step)
            rows = view_params.select(batch["index"])
            view1, view2 = make_picie_views(
                denormalize_images(batch["pixel_values"].to(device)),
                rows,
                resolution,
                photometric_view1=not config.released_augmentation,
            )
            prepared.train()
            output = prepared(
                pixel_values=view1,
                pixel_values_view2=view2,
                geometric_params=rows.geometric.to(device),
                cluster_targets=epoch_state.targets(batch["index"], device),
            )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(output.loss)
            optimizer.step()
            state["step"] = step = step + 1
            progress.update(1)
            context.log_step(output, step, ("within", "cross", "main_loss", "overclustering_loss"), progress)
            context.after_step(unwrapped, step)
            if step >= steps:
                break
    progress.close()

    if config.final_recluster:
        eval_items = ProcessedSegmentationDataset(
            context.train_set, context.eval_processor, context.num_classes, with_labels=False
        )
        centroids = recluster_without_augmentation(
            unwrapped,
            eval_items,
            seed=args.seed,
            accelerator=accelerator,
            num_workers=args.num_workers,
            progress=context.show_progress,
        )
        unwrapped.set_centroids(centroids)
    elif epoch_state.tensors:
        unwrapped.set_centroids(epoch_state.tensors["centroids1"])
    return unwrapped
