"""kNN positives (STEGO, METHODS 0.6): global descriptors and chunked cosine nearest neighbours.

The global descriptor of an item is the L2-normalised spatial mean of its backbone feature map; similarity is
the dot product of descriptors; each item keeps its top-k neighbours (rank 0 is normally the item itself).
The similarity matrix is never built whole: rows are processed ``chunk_size`` at a time on the descriptors'
device, each chunk reduced to its top k at once, so memory is ``O(chunk_size * N)`` instead of ``O(N^2)``
(optionally in half precision on CUDA, or through faiss when it is installed).
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


def _rank_candidates(
    values: torch.Tensor, candidates: torch.Tensor, self_indices: torch.Tensor, k: int
) -> torch.Tensor:
    """The first ``k`` of each row's ``candidates`` (distinct item indices, with their similarities ``values``) in
    the order of `_select_top_k`: similarity descending, then the row's own item, then the lower index."""
    priority = torch.where(candidates == self_indices[:, None], -1, candidates)
    order = priority.argsort(dim=1)
    candidates, values = candidates.gather(1, order), values.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return candidates.gather(1, order)


def _rescored_top_k(
    queries: torch.Tensor, normalised: torch.Tensor, candidates: torch.Tensor, self_indices: torch.Tensor, k: int
) -> torch.Tensor:
    """Re-score each query's candidate items in the descriptors' own precision and keep the best ``k``."""
    values = torch.bmm(normalised[candidates], queries[:, :, None])[:, :, 0]
    return _rank_candidates(values, candidates, self_indices, k)


def _auto_chunk_size(count: int, device: torch.device) -> int:
    # rows whose float32 similarity block takes about 256 MiB (CPU) or 1 GiB (CUDA)
    budget = 2**30 if device.type == "cuda" else 2**28
    return max(16, min(count, 8192, budget // (4 * count)))


_MATMUL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_BACKENDS = ("torch", "faiss")


def nearest_neighbors(
    descriptors: torch.Tensor,
    k: int,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    matmul_dtype: str | torch.dtype | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Top-`k` cosine nearest neighbours of each descriptor among all: ``[N, C] -> LongTensor [N, k]``.

    Descriptors are L2-normalised here (a no-op for `global_descriptors` output), so the similarity is the
    cosine. Row ``i`` lists neighbour indices by decreasing similarity; rank 0 is ``i`` itself unless another
    item is strictly more similar (only possible through rounding). Equal similarities are ordered with the
    item itself first, then by increasing index, so the result is deterministic.

    The ``N x N`` similarity matrix is never built: ``chunk_size`` rows of it at a time (``chunk_size x N``
    values), each reduced to its top ``k`` on ``device`` before the next, so memory is ``O(chunk_size * N)`` plus
    the ``[N, k]`` result. At COCO-Stuff's ~250k five-crop items, a CUDA device takes seconds
    (``benchmarks/bench_knn.py``).

    Args:
        descriptors: ``[N, C]`` float tensor.
        k: neighbours per item, ``1 <= k <= N`` (STEGO keeps 30).
        chunk_size: rows of the similarity matrix computed at a time; None picks the rows whose float32 block
            takes about 256 MiB (CPU) or 1 GiB (CUDA). The result does not depend on it.
        device: where to compute (default: the descriptors' device); the result is on the CPU.
        matmul_dtype: ``"float16"`` or ``"bfloat16"`` (meant for CUDA's tensor cores): the chunk similarities
            are computed in that precision, the top ``k + max(k, 32)`` of each row are re-scored in the
            descriptors' precision (float32) and ranked with the tie rule above. Equal to the float32 result
            unless an item ranked in the float32 top ``k`` falls outside those candidates, which needs more than
            ``max(k, 32)`` items within half precision's rounding (about 1e-3 for float16, 8e-3 for bfloat16)
            of the ``k``-th similarity. None (default): float32 (float64 descriptors stay float64), exact.
        backend: ``"torch"`` (default) or ``"faiss"``: an exact inner-product index (``faiss.IndexFlatIP``, on
            the GPU when ``device`` is CUDA and faiss was built with GPU support) finds the top
            ``k + max(k, 32)`` candidates, re-scored and ranked as with ``matmul_dtype``. Needs the ``faiss``
            package (``pip install faiss-cpu``).

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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if isinstance(matmul_dtype, str):
        if matmul_dtype not in _MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be None, 'float16' or 'bfloat16', got {matmul_dtype!r}")
        matmul_dtype = _MATMUL_DTYPES[matmul_dtype]
    elif matmul_dtype is not None and matmul_dtype not in _MATMUL_DTYPES.values():
        raise ValueError(f"matmul_dtype must be None, 'float16' or 'bfloat16', got {matmul_dtype!r}")
    device = torch.device(device) if device is not None else descriptors.device
    dtype = descriptors.dtype if descriptors.dtype in (torch.float32, torch.float64) else torch.float32
    normalised = F.normalize(descriptors.detach().to(device=device, dtype=dtype), dim=1)
    if not torch.isfinite(normalised).all():
        raise ValueError("descriptors contain NaN or infinite values")
    if chunk_size is None:
        chunk_size = _auto_chunk_size(count, device)
    candidates = min(count, k + max(k, 32))
    if backend == "faiss":
        return _faiss_neighbors(normalised, k, candidates, chunk_size, device)

    low = None if matmul_dtype is None else normalised.to(matmul_dtype)
    result = torch.empty(count, k, dtype=torch.long, device=device)
    for start in range(0, count, chunk_size):
        chunk = normalised[start : start + chunk_size]
        self_indices = torch.arange(start, start + chunk.shape[0], device=device)
        if low is None:
            selected = _select_top_k(chunk @ normalised.T, k, self_indices)
        else:
            nominees = (low[start : start + chunk_size] @ low.T).topk(candidates, dim=1).indices
            selected = _rescored_top_k(chunk, normalised, nominees, self_indices, k)
        result[start : start + chunk.shape[0]] = selected
    return result.cpu()


def _faiss_neighbors(
    normalised: torch.Tensor, k: int, candidates: int, chunk_size: int, device: torch.device
) -> torch.Tensor:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "nearest_neighbors(backend='faiss') needs the faiss package (pip install faiss-cpu, or a faiss GPU "
            "build for CUDA); backend='torch' (the default) needs nothing more"
        ) from error
    import numpy as np

    data = np.ascontiguousarray(normalised.float().cpu().numpy())
    index = faiss.IndexFlatIP(data.shape[1])
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, device.index or 0, index)
    index.add(data)
    result = torch.empty(data.shape[0], k, dtype=torch.long)
    for start in range(0, data.shape[0], chunk_size):
        _, found = index.search(data[start : start + chunk_size], candidates)
        nominees = torch.from_numpy(found).to(device=device, dtype=torch.long)
        chunk = normalised[start : start + chunk_size]
        self_indices = torch.arange(start, start + chunk.shape[0], device=device)
        result[start : start + chunk.shape[0]] = _rescored_top_k(chunk, normalised, nominees, self_indices, k).cpu()
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
