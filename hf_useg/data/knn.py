"""kNN positives (STEGO, METHODS 0.6): global descriptors and chunked cosine nearest neighbours.

The global descriptor of an item is the L2-normalised spatial mean of its backbone feature map; similarity is
the dot product of descriptors; each item keeps its top-k neighbours (rank 0 is normally the item itself).
The similarity matrix is never built whole: rows are processed ``chunk_size`` at a time, so memory is
``O(chunk_size * N)`` instead of ``O(N^2)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["compute_global_descriptors", "global_descriptors", "nearest_neighbors"]


def global_descriptors(feature_maps: torch.Tensor) -> torch.Tensor:
    """L2-normalised spatial mean of feature maps: ``[N, C, h, w] -> [N, C]``.

    Example:

    ```python
    >>> import torch
    >>> maps = torch.zeros(1, 2, 2, 2)
    >>> maps[0, 0] = 3.0; maps[0, 1] = 4.0
    >>> global_descriptors(maps)
    tensor([[0.6000, 0.8000]])
    ```
    """
    if not isinstance(feature_maps, torch.Tensor):
        raise TypeError(f"feature_maps must be a torch.Tensor, got {type(feature_maps).__name__}")
    if feature_maps.ndim != 4:
        raise ValueError(f"feature_maps must be [N, C, h, w], got shape {tuple(feature_maps.shape)}")
    if not feature_maps.is_floating_point():
        feature_maps = feature_maps.float()
    return F.normalize(feature_maps.mean(dim=(2, 3)), dim=1)


def _resolve_boundary_ties(similarities: torch.Tensor, k: int, self_indices: torch.Tensor) -> torch.Tensor:
    """The k columns to keep in rows where entries left out tie with the k-th value.

    Keeps everything strictly above the k-th value, then the tied entries by priority (the row's own item
    first, then the lower index). Returns the kept columns of each row in ascending order.
    """
    rows = similarities.shape[0]
    kth_value = similarities.topk(k, dim=1).values[:, -1:]
    above = similarities > kth_value
    equal = similarities == kth_value
    is_self = torch.zeros_like(equal)
    is_self[torch.arange(rows, device=similarities.device), self_indices] = True
    self_tied = equal & is_self
    others_tied = equal & ~is_self
    slots = k - above.sum(dim=1, keepdim=True) - self_tied.sum(dim=1, keepdim=True)
    tie_rank = others_tied.cumsum(dim=1, dtype=torch.int32)
    selected = above | self_tied | (others_tied & (tie_rank <= slots))
    return selected.nonzero()[:, 1].view(rows, k)


def _select_top_k(similarities: torch.Tensor, k: int, self_indices: torch.Tensor) -> torch.Tensor:
    """Indices of the k largest entries of each row, ordered by similarity, ties broken deterministically.

    ``torch.topk`` does not say which of several equal values it keeps, nor in which order: rows where the
    k-th value ties with entries left out are rebuilt by `_resolve_boundary_ties`, and every row is finally
    sorted by (similarity descending, priority), priority being the row's own item first, then the index.
    """
    columns = similarities.shape[1]
    # One extra value tells whether the k-th value ties with an entry left out.
    values, indices = similarities.topk(min(k + 1, columns), dim=1)
    indices = indices[:, :k]
    if k < columns:
        ambiguous = (values[:, k] == values[:, k - 1]).nonzero()[:, 0]
    else:
        ambiguous = indices.new_empty(0)
    if ambiguous.numel():
        indices = indices.clone()
        indices[ambiguous] = _resolve_boundary_ties(similarities[ambiguous], k, self_indices[ambiguous])

    priority = torch.where(indices == self_indices[:, None], -1, indices)
    indices = indices.gather(1, priority.argsort(dim=1))
    values = similarities.gather(1, indices)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return indices.gather(1, order)


def nearest_neighbors(
    descriptors: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Top-`k` cosine nearest neighbours of each descriptor among all: ``[N, C] -> LongTensor [N, k]``.

    Descriptors are L2-normalised here (a no-op for `global_descriptors` output), so the similarity is the
    cosine. Row ``i`` lists neighbour indices by decreasing similarity; rank 0 is ``i`` itself unless another
    item is strictly more similar (only possible through rounding). Equal similarities are ordered with the
    item itself first, then by increasing index, so the result is deterministic.

    Args:
        descriptors: ``[N, C]`` float tensor.
        k: neighbours per item, ``1 <= k <= N`` (STEGO keeps 30).
        chunk_size: rows of the similarity matrix computed at a time (memory ``O(chunk_size * N)``).
        device: where to compute (default: the descriptors' device); the result is on the CPU.

    Example:

    ```python
    >>> import torch
    >>> descriptors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    >>> nearest_neighbors(descriptors, k=2)
    tensor([[0, 2],
            [1, 2],
            [2, 0]])
    ```
    """
    if not isinstance(descriptors, torch.Tensor):
        raise TypeError(f"descriptors must be a torch.Tensor, got {type(descriptors).__name__}")
    if descriptors.ndim != 2 or descriptors.shape[0] == 0:
        raise ValueError(f"descriptors must be a non-empty [N, C] tensor, got shape {tuple(descriptors.shape)}")
    count = descriptors.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count:
        raise ValueError(f"k must be an int in [1, N={count}], got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    device = torch.device(device) if device is not None else descriptors.device
    dtype = descriptors.dtype if descriptors.dtype in (torch.float32, torch.float64) else torch.float32
    normalised = F.normalize(descriptors.detach().to(device=device, dtype=dtype), dim=1)
    if not torch.isfinite(normalised).all():
        raise ValueError("descriptors contain NaN or infinite values")

    result = torch.empty(count, k, dtype=torch.long)
    for start in range(0, count, chunk_size):
        chunk = normalised[start : start + chunk_size]
        similarities = chunk @ normalised.T
        self_indices = torch.arange(start, start + chunk.shape[0], device=device)
        result[start : start + chunk.shape[0]] = _select_top_k(similarities, k, self_indices).cpu()
    return result


def compute_global_descriptors(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    dataloader: Iterable,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "kNN descriptors",
) -> torch.Tensor:
    """Run `feature_fn` over a dataloader and return the `global_descriptors` of every item, ``[N, C]`` (CPU).

    Each batch is a tensor of pixel values, a mapping with ``"pixel_values"``, or a tuple/list whose first
    element is the pixel values; `feature_fn` maps them to feature maps ``[B, C, h, w]``. Runs under
    ``torch.no_grad()`` with a progress bar.

    Example:

    ```python
    >>> import torch
    >>> batches = [torch.ones(2, 3, 8, 8), torch.ones(1, 3, 8, 8)]
    >>> compute_global_descriptors(lambda x: x[:, :2], batches, progress=False).shape
    torch.Size([3, 2])
    ```
    """
    from tqdm.auto import tqdm

    outputs = []
    with torch.no_grad():
        for batch in tqdm(dataloader, desc=desc, disable=not progress):
            if isinstance(batch, Mapping):
                if "pixel_values" not in batch:
                    raise ValueError(f"batch mapping has no 'pixel_values' (keys: {list(batch)})")
                pixel_values = batch["pixel_values"]
            elif isinstance(batch, (tuple, list)):
                pixel_values = batch[0]
            else:
                pixel_values = batch
            if device is not None:
                pixel_values = pixel_values.to(device)
            outputs.append(global_descriptors(feature_fn(pixel_values)).cpu())
    if not outputs:
        raise ValueError("the dataloader yielded no batches")
    return torch.cat(outputs)
