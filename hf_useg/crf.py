"""Dense CRF post-processing (Krähenbühl & Koltun's fully connected CRF, mean field), as used by STEGO and its
successors (METHODS 0.7).

The reference backend is `pydensecrf` (install it with ``pip install hf-useg[crf]``, which pulls the
``pydensecrf2`` build of the same library). [`dense_crf`] reproduces STEGO's recipe exactly: the logits are
bilinearly upsampled (``align_corners=False``) to the image size, turned into probabilities with a softmax,
the unary is ``-log(clip(p, 1e-5))``, and the image is handed to the library in **BGR** order (the library's
permutohedral lattice makes the result depend on the channel order, so this matters).

The exact pixel values matter too. Pass the original uint8 image when you have it: it is used as is. When you
only have the ImageNet-normalised tensor the model saw, rebuild the image with [`denormalize_to_uint8`], which
does what STEGO does (un-normalise, multiply by 255, truncate) and therefore gives STEGO's numbers; its values
can be one lower than the original image's.

[`dense_crf_batch`] runs many images, optionally in a pool of worker processes.

``backend="torch"`` (both functions) runs the same model in PyTorch on the logits' device (CPU or GPU), without
`pydensecrf` or worker processes: the bilateral kernel on a permutohedral lattice built as the library builds its
own (messages equal to float rounding in float32), the Gaussian kernel by a separable convolution with the
library's measured kernel (the approximation: 99.93% of the pixels keep the reference's argmax on CamVid, mean
|dQ| 5e-5). On CPUs with bfloat16 instructions the messages are filtered in bfloat16 (same agreement). Per CPU
core it takes ~0.25 s for a 320x320 image with 27 labels, the reference 0.44 s on an idle Zen 4 core and 0.55-0.7 s
on a busy machine (`benchmarks/bench_crf.py`); a batch is spread over ``torch.get_num_threads()`` cores. The
reference stays the default.

Example:

```python
>>> import numpy as np, torch
>>> from hf_useg.crf import dense_crf
>>> image = np.zeros((64, 64, 3), dtype=np.uint8); image[:, 32:] = 200   # two regions
>>> logits = torch.randn(3, 8, 8)                                        # [K, h, w], e.g. patch resolution
>>> q = dense_crf(image, logits)                                         # marginals [K, H, W]
>>> q.shape, bool(torch.allclose(q.sum(0), torch.ones(64, 64), atol=1e-4))
(torch.Size([3, 64, 64]), True)
>>> prediction = q.argmax(0)
```
"""

from __future__ import annotations

import atexit
import functools
import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .augmentation import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "dense_crf",
    "dense_crf_batch",
    "denormalize_to_uint8",
    "shutdown_crf_workers",
]

# METHODS 0.7 (STEGO's values).
_DEFAULTS = {
    "num_iterations": 10,
    "gaussian_sxy": 1.0,
    "gaussian_compat": 3.0,
    "bilateral_sxy": 67.0,
    "bilateral_srgb": 3.0,
    "bilateral_compat": 4.0,
}


def _import_densecrf():
    try:
        from pydensecrf import densecrf
    except ImportError as err:
        raise ImportError(
            "the dense CRF needs the `pydensecrf` library: install hf-useg[crf] (pip install pydensecrf2)"
        ) from err
    return densecrf


def denormalize_to_uint8(
    pixel_values: torch.Tensor | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Rebuild uint8 RGB images from normalised pixel values the way STEGO does before its CRF.

    Computes ``x * std + mean``, multiplies by 255 and **truncates** to uint8 (no rounding), in float32. For
    pixel values normalised from a uint8 image this gives the original value or one less (float rounding puts
    about half of the values just below the integer). Values are clamped to ``[0, 255]`` before truncation:
    for inputs in ``(-1, 256)`` after scaling, which covers everything normalised from a real image, this
    equals STEGO's conversion; STEGO's own ``.byte()`` cast would wrap larger values around modulo 256 (e.g.
    256 -> 0) where this saturates.

    Args:
        pixel_values (`torch.Tensor` or `np.ndarray` of shape `[3, H, W]` or `[B, 3, H, W]`):
            Normalised images, channels first (RGB).
        mean, std (`Sequence[float]`, *optional*): the normalisation's per-channel mean and std (ImageNet).

    Returns:
        `np.ndarray` of dtype uint8 and shape `[H, W, 3]` or `[B, H, W, 3]` (RGB).

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.crf import denormalize_to_uint8
    >>> denormalize_to_uint8(torch.zeros(3, 1, 1))[0, 0].tolist()     # 255 * mean = 123.675, 116.28, 103.275
    [123, 116, 103]
    ```
    """
    x = torch.as_tensor(pixel_values)
    if not x.is_floating_point():
        raise TypeError(f"pixel_values must be a floating point (normalised) tensor, got {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"pixel_values must be [3, H, W] or [B, 3, H, W], got shape {tuple(x.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must have 3 values (one per channel)")
    x = x.detach().float()
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    x = x.mul(std_t).add(mean_t).mul(255).clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def _check_image(image: Any, name: str = "image", *, batched: bool = False) -> np.ndarray | torch.Tensor:
    """A uint8 RGB image `[H, W, 3]` (`[B, H, W, 3]` when `batched`). Tensors stay tensors, on their device;
    anything else (numpy, PIL) becomes a numpy array."""
    if isinstance(image, torch.Tensor):
        image = image.detach()
        is_uint8 = image.dtype == torch.uint8
    else:
        image = np.asarray(image)
        is_uint8 = image.dtype == np.uint8
    layout = "[B, H, W, 3]" if batched else "[H, W, 3]"
    if not is_uint8:
        raise TypeError(
            f"{name} must be a uint8 {layout} RGB array, got dtype {image.dtype}; "
            "for a normalised tensor use hf_useg.crf.denormalize_to_uint8"
        )
    shape = tuple(image.shape)
    ndim = 4 if batched else 3
    if len(shape) != ndim or shape[-1] != 3:
        hint = f" (it looks channels-first: pass {layout})" if len(shape) == ndim and shape[-3] == 3 else ""
        raise ValueError(f"{name} must be {layout} RGB, got shape {shape}{hint}")
    if shape[-3] < 1 or shape[-2] < 1:
        raise ValueError(f"{name} is empty: shape {shape}")
    return image


def _as_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    return image.cpu().numpy() if isinstance(image, torch.Tensor) else image


def _as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))


def _check_logits(logits: Any, ndim: int, name: str = "logits") -> torch.Tensor:
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or np.ndarray, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    if logits.ndim != ndim:
        layout = "[K, h, w]" if ndim == 3 else "[B, K, h, w]"
        raise ValueError(f"{name} must be {layout}, got shape {tuple(logits.shape)}")
    if logits.shape[-3] < 2:
        raise ValueError(f"{name} must have at least 2 classes (K = shape[{ndim - 3}]), got {logits.shape[-3]}")
    return logits


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown CRF parameter(s) {sorted(unknown)}; expected {sorted(_DEFAULTS)}")
    params = {**_DEFAULTS, **params}
    iterations = params["num_iterations"]
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"num_iterations must be an int >= 0, got {iterations!r}")
    for key in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
        if not params[key] > 0:
            raise ValueError(f"{key} must be > 0, got {params[key]!r}")
    return params


def _unary(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """STEGO's unary: ``-log(clip(softmax(upsample(logits)), 1e-5))`` in float32, as ``[K, H * W]``."""
    logits = logits.detach().float()
    upsampled = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(upsampled, dim=0).cpu().numpy()
    unary = -np.log(np.clip(probs, 1e-5, 1.0))
    return np.ascontiguousarray(unary.reshape(probs.shape[0], -1), dtype=np.float32)


def _crf_worker(task: tuple[np.ndarray, np.ndarray, dict[str, Any]]) -> np.ndarray:
    """Mean-field inference for one image. Takes and returns numpy only (no torch objects cross processes)."""
    image_bgr, unary, params = task
    densecrf = _import_densecrf()
    height, width = image_bgr.shape[:2]
    num_labels = unary.shape[0]
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params["gaussian_sxy"], compat=params["gaussian_compat"])
    crf.addPairwiseBilateral(
        sxy=params["bilateral_sxy"],
        srgb=params["bilateral_srgb"],
        rgbim=image_bgr,
        compat=params["bilateral_compat"],
    )
    q = crf.inference(params["num_iterations"])
    return np.asarray(q, dtype=np.float32).reshape(num_labels, height, width)


def _task(image: np.ndarray, logits: torch.Tensor, params: dict[str, Any]):
    image_bgr = np.ascontiguousarray(image[:, :, ::-1])
    return image_bgr, _unary(logits, image.shape[0], image.shape[1]), params


# ---------------------------------------------------------------------------------------------------------------
# The torch backend: the same mean field as pydensecrf's DenseCRF2D (Potts, symmetric kernel normalisation), with
# the bilateral kernel filtered by a permutohedral lattice (Adams et al. 2010) built exactly the way the library
# builds it, and the Gaussian kernel by a separable convolution whose taps are the library's lattice kernel.
# ---------------------------------------------------------------------------------------------------------------


class _Lattice(NamedTuple):
    """A permutohedral lattice over the features of every pixel of a batch, stored for ``F.embedding_bag`` (on
    CPU fbgemm's gather-and-sum kernel, the fastest way torch has to add up rows picked by index).

    Splatting is a weighted sum per lattice point over the (pixel, vertex) pairs touching it (bags grouped by
    point), each blur step a weighted sum of a point and its neighbours along one lattice axis (missing
    neighbours left out), slicing a weighted sum per pixel over the d + 1 vertices of its simplex."""

    num_points: int
    splat_pixels: torch.Tensor  # [P * (d + 1)] the pixel of each (pixel, vertex) pair, grouped by lattice point
    splat_weights: torch.Tensor  # [P * (d + 1)] its barycentric weight
    splat_offsets: torch.Tensor  # [M] where each lattice point's group starts
    slice_points: torch.Tensor  # [P * (d + 1)] the simplex vertices of each pixel, pixel by pixel
    slice_weights: torch.Tensor  # [P, d + 1] barycentric weights times the library's scale 1 / (1 + 2^-d)
    slice_offsets: torch.Tensor  # [P] = arange(P) * (d + 1)
    blur: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per axis: (points, offsets, weights 1 or 0.5)


def _search_sorted(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    if sorted_values.device.type == "cpu":
        # numpy's binary search starts from the previous answer while the queries increase (here they do, row by
        # row): several times faster than torch's on CPU
        return torch.from_numpy(np.searchsorted(sorted_values.numpy(), queries.numpy()))
    return torch.searchsorted(sorted_values, queries)


def _build_lattice(features: torch.Tensor, group_size: int) -> _Lattice:
    """The permutohedral lattice of `features` `[P, d]` (float32, already divided by the kernel widths; the
    transposed view of a `[d, P]` tensor is read fastest), in groups of `group_size` consecutive pixels that never
    share a lattice point (one group per image).

    Every step reproduces pydensecrf's ``Permutohedral::init`` in float32 (elevation, rounding to the nearest
    remainder-0 point, ranks, barycentric weights, vertex keys), so the same pixels land on the same lattice
    points with the same weights. Vertex keys are packed into int64 codes; one sort gives the lattice points,
    each pixel's vertices and the splat groups, and neighbours along each axis are found by binary search
    among the sorted codes."""
    num_pixels, d = features.shape
    device = features.device
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], dtype=torch.float32)
    cf = features.T.contiguous() * scale.to(device)[:, None]  # [d, P]: one row per coordinate
    # elevate onto the hyperplane sum(x) = 0 of R^(d+1), in the library's order of float operations
    elevated = torch.empty(d + 1, num_pixels, device=device)
    running = torch.zeros(num_pixels, device=device)
    for j in range(d, 0, -1):
        torch.sub(running, cf[j - 1] * j, out=elevated[j])
        running = running + cf[j - 1]
    elevated[0] = running
    # nearest remainder-0 lattice point (round half to even, as SSE rounding does) and the simplex's ranks
    down = float(np.float32(1.0 / (d + 1)))
    rounded = torch.round(elevated * down)
    rem0 = rounded * (d + 1)
    diff = elevated - rem0
    rank = rounded.sum(0).to(torch.int16).expand(d + 1, num_pixels).clone()
    for i in range(d):  # the library's pairwise comparisons (ties to the later coordinate)
        for j in range(i + 1, d + 1):
            less = diff[i] < diff[j]
            rank[i] += less
            rank[j] += ~less
    wrap = (rank < 0).to(torch.int16) - (rank > d).to(torch.int16)
    rank += (d + 1) * wrap
    rem0 += (d + 1) * wrap  # still exact integers in float32
    rank = rank.to(torch.int64)
    # Barycentric weights: with s the coordinates' (elevated - rem0) / (d + 1) placed by rank, vertex r's weight is
    # s[d - r] - s[d - r + 1] and vertex 0's is s[d] + (1 - s[0]), the library's sums term for term.
    by_rank = torch.empty(d + 1, num_pixels, device=device).scatter_(0, rank, (elevated - rem0) * down)
    bary = torch.empty(d + 1, num_pixels, device=device)  # [vertex, P]
    torch.add(by_rank[d], 1 - by_rank[0], out=bary[0])
    for r in range(1, d + 1):
        torch.sub(by_rank[d - r], by_rank[d - r + 1], out=bary[r])

    # integer keys of the d + 1 vertices (their first d coordinates) packed into int64 codes, mixed radix;
    # rem0 is rounded * (d + 1) moved by at most d + 1, and the margin leaves room for the neighbours' keys too
    margin = 3 * (d + 1)
    low = rounded[:d].amin(1).to(torch.int64) * (d + 1) - margin
    sizes = (rounded[:d].amax(1).to(torch.int64) * (d + 1) + margin - low + 1).tolist()
    strides = [math.prod(sizes[i + 1 :]) for i in range(d)] + [0]
    group_stride = math.prod(sizes)
    num_groups = max(num_pixels // group_size, 1)
    if group_stride * num_groups >= 2**62:
        raise ValueError("the CRF features span too large a range for the lattice's int64 keys")
    stride_t = torch.tensor(strides, dtype=torch.int64, device=device)
    codes = torch.empty(d + 1, num_pixels, dtype=torch.int64, device=device)  # [vertex, P]
    torch.sum((rem0[:d].to(torch.int64) - low[:, None]) * stride_t[:d, None], 0, out=codes[0])
    if num_groups > 1:
        codes[0].view(num_groups, group_size).add_(torch.arange(num_groups, device=device)[:, None] * group_stride)
    # vertex r = vertex r - 1 + 1 on every coordinate, - d on the one of rank d - r + 1
    stride_of_rank = torch.zeros(d + 1, num_pixels, dtype=torch.int64, device=device)
    stride_of_rank.scatter_(0, rank, stride_t[:, None].expand(d + 1, num_pixels))
    for r in range(1, d + 1):
        torch.sub(codes[r - 1] + sum(strides), stride_of_rank[d - r + 1] * (d + 1), out=codes[r])

    # One stable sort of all the (vertex, pixel) codes: the lattice points, each pixel's vertices, the splat groups
    # (a point's pixels in vertex-then-pixel order; the library adds them in pixel order, equal to float rounding).
    sorted_codes, order = torch.sort(codes.view(-1), stable=True)
    index_type = torch.int32 if num_pixels * (d + 1) < 2**31 else torch.int64  # int32: faster bags
    points, point_of_sorted, group_sizes = torch.unique_consecutive(
        sorted_codes, return_inverse=True, return_counts=True
    )
    num_points = len(points)
    slice_points = torch.empty(d + 1, num_pixels, dtype=index_type, device=device)
    slice_points.view(-1).scatter_(0, order, point_of_sorted.to(index_type))

    # Blur: along each axis a point gets itself plus half of each of its two neighbours that exist. Neighbour 1
    # along an axis: every key coordinate - 1 except + d on the axis itself; neighbour 2 the opposite, so b is a's
    # neighbour 1 exactly when a is b's neighbour 2 and one search finds both.
    shifts = torch.tensor([(d + 1) * strides[axis] - sum(strides) for axis in range(d + 1)], device=device)
    target = points + shifts[:, None]  # [d + 1, M], each row increasing
    at = _search_sorted(points, target).to(device).clamp_(max=num_points - 1)
    missing = num_points  # a spare row of the neighbour tables, whose own neighbours are missing too
    neighbours = torch.full((d + 1, num_points + 1, 3), missing, dtype=index_type, device=device)
    neighbours[:, :num_points, 0] = torch.arange(num_points, device=device, dtype=index_type)
    neighbours[:, :num_points, 1] = torch.where(points[at] == target, at, missing)
    # neighbour 2 by sending every point to its neighbour 1 (missing ones land in the spare row)
    neighbours[:, :, 2].scatter_(1, neighbours[:, :num_points, 1].to(torch.int64), neighbours[:, :num_points, 0])
    neighbours[:, missing, 2] = missing
    # Two axes' steps at once, one bag per point: (b after a)[v] = sum over u in b's slots of v, x in a's slots of
    # u of w_b w_a g[x] with both present, which is what the library's two passes add up (3 passes instead of 6).
    half = torch.tensor([1.0, 0.5, 0.5], device=device)
    blur = []
    for first_axis in range(0, d + 1, 2):
        slots, weights = neighbours[first_axis, :num_points], half  # [M, 3]
        if first_axis < d:
            second = neighbours[first_axis + 1, :num_points].reshape(-1).to(torch.int64)
            slots, weights = neighbours[first_axis].index_select(0, second), (half[:, None] * half).view(-1)
        slots = slots.reshape(num_points, -1)  # [M, 3 or 9]
        present = slots != missing
        kept = present.view(-1).nonzero().squeeze(1)
        bag_sizes = present.sum(1, dtype=index_type)
        entries = slots.view(-1).index_select(0, kept)
        blur.append((entries, bag_sizes.cumsum(0, dtype=index_type) - bag_sizes, weights.repeat(num_points)[kept]))

    alpha = float(np.float32(1.0 / (1.0 + 2.0 ** (-d))))
    return _Lattice(
        num_points=num_points,
        splat_pixels=order.to(index_type).remainder_(num_pixels),
        splat_weights=bary.view(-1).index_select(0, order),
        splat_offsets=(group_sizes.cumsum(0) - group_sizes).to(index_type),
        slice_points=slice_points.T.reshape(-1),
        slice_weights=(bary * alpha).T.contiguous(),
        slice_offsets=torch.arange(0, num_pixels * (d + 1), d + 1, device=device, dtype=index_type),
        blur=blur,
    )


def _lattice_filter(
    lattice: _Lattice,
    values: torch.Tensor,
    splat_weights: torch.Tensor | None = None,
    slice_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Splat `values` `[P, C]` onto the lattice, blur along every axis, slice back: `[P, C]` (the library's
    ``Permutohedral::compute``), in the dtype of `values`. Other weights (with the kernel normalisation folded
    in) may replace the lattice's own."""
    dtype = values.dtype
    splat_weights = lattice.splat_weights if splat_weights is None else splat_weights
    slice_weights = lattice.slice_weights if slice_weights is None else slice_weights
    grid = F.embedding_bag(
        lattice.splat_pixels, values, lattice.splat_offsets, mode="sum", per_sample_weights=splat_weights.to(dtype)
    )
    for points, offsets, weights in lattice.blur:
        grid = F.embedding_bag(points, grid, offsets, mode="sum", per_sample_weights=weights.to(dtype))
    return F.embedding_bag(
        lattice.slice_points,
        grid,
        lattice.slice_offsets,
        mode="sum",
        per_sample_weights=slice_weights.to(dtype).view(-1),
    )


def _lattice_norm(lattice: _Lattice) -> torch.Tensor:
    """pydensecrf's NORMALIZE_SYMMETRIC factor ``n = 1 / sqrt(K 1)`` per pixel, `[P]`."""
    ones = torch.ones(lattice.slice_offsets.numel(), 1, device=lattice.slice_weights.device)
    return torch.rsqrt(_lattice_filter(lattice, ones).squeeze(1) + 1e-20)


# Above this Gaussian width (pixels) the Gaussian kernel is filtered on its own lattice instead of a convolution.
_MAX_CONVOLUTION_SXY = 4.0


# Gaussian taps below this fraction of the largest are dropped (see `_gaussian_taps`).
_MIN_TAP = 1e-2


@functools.lru_cache(maxsize=8)
def _gaussian_taps(sxy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D taps (vertical, horizontal) of a separable filter equal to pydensecrf's Gaussian kernel of width `sxy`.

    The library filters a regular pixel grid on a 2-D permutohedral lattice, whose kernel is close to, but not,
    a Gaussian (and varies slightly with the position on the lattice). This measures it: impulse responses at
    256 positions of a grid, averaged, and the best rank-one (separable) fit of the mean."""
    radius = math.ceil(4 * sxy) + 1
    side = 4 * radius + 16
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    features = torch.stack([xx.reshape(-1) / sxy, yy.reshape(-1) / sxy], 1).float()
    lattice = _build_lattice(features, side * side)
    centres = [(y, x) for y in range(2 * radius, 2 * radius + 16) for x in range(2 * radius, 2 * radius + 16)]
    impulses = torch.zeros(side * side, len(centres))
    impulses[[y * side + x for y, x in centres], torch.arange(len(centres))] = 1.0
    responses = _lattice_filter(lattice, impulses).T.reshape(len(centres), side, side)
    mean = torch.stack(
        [responses[i, y - radius : y + radius + 1, x - radius : x + radius + 1] for i, (y, x) in enumerate(centres)]
    ).mean(0)
    u, s, vh = torch.linalg.svd(mean.double())
    vertical, horizontal = (u[:, 0] * s[0].sqrt()).float(), (vh[0] * s[0].sqrt()).float()
    if vertical.sum() < 0:
        vertical, horizontal = -vertical, -horizontal
    # The lattice's kernel has a finite support; the taps at its ends are tiny too (sxy 1: 7 taps, the outer two
    # 0.7% of the centre) and are dropped below 1% of the centre: 5 taps there, 30% less convolution, and the
    # argmax agreement with the reference stays 99.93% (mean |dQ| 5.4e-5 with 5 taps, 5.5e-5 with 7, CamVid).
    used = (vertical.abs() > _MIN_TAP * vertical.abs().max()) | (horizontal.abs() > _MIN_TAP * horizontal.abs().max())
    reach = int((torch.arange(-radius, radius + 1)[used]).abs().max())
    return vertical[radius - reach : radius + reach + 1], horizontal[radius - reach : radius + reach + 1]


def _pixel_grid(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return xx.reshape(-1), yy.reshape(-1)


# oneDNN's bfloat16 depthwise convolution hangs on kernels of 15 taps or more (torch 2.13, Zen 4): wider Gaussian
# kernels are convolved in float32
_MAX_BFLOAT16_TAPS = 13


@functools.cache
def _message_dtype(device_type: str) -> torch.dtype:
    """The dtype the messages are filtered in. bfloat16 on CPUs with bf16 instructions: it halves the bytes the
    lattice's gathers move and oneDNN's bf16 depthwise convolution is several times faster there than its float32
    one (0.26 against 0.33 CPU s per 320x320 image in all, Zen 4), while the argmax agreement with the reference
    does not change (99.93% either way on CamVid, mean |dQ| 5.4e-5 against 5.1e-5: sums are accumulated in
    float32, only the values between the steps are rounded). float32 elsewhere, GPUs included."""
    if device_type == "cpu":
        is_supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch >= 2.3
        if is_supported is not None and is_supported() and torch.backends.mkldnn.is_available():
            return torch.bfloat16
    return torch.float32


def _with_dtype(lattice: _Lattice, dtype: torch.dtype) -> _Lattice:
    blur = [(points, offsets, weights.to(dtype)) for points, offsets, weights in lattice.blur]
    return lattice._replace(blur=blur)


def _exp_without_maximum(device_type: str) -> bool:
    """Whether the loop's softmax takes exp() of the energies without subtracting each pixel's maximum first: on
    CPU, where that maximum is a slow reduction over the short label axis (not on GPU, where it costs nothing).
    -unary is <= 0 with a maximum over the labels >= -log K, and the messages (>= 0 when every compat is) do not
    reach exp's overflow for any sane compat; should a pixel's sum over the labels not be a finite positive
    number, the iteration is redone the safe way."""
    return device_type == "cpu"


@torch.no_grad()
def _torch_crf(images: torch.Tensor, logits: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Mean field on a batch: `images` `[B, H, W, 3]` uint8 RGB and `logits` `[B, K, h, w]` on one device;
    returns the marginals `[B, K, H, W]` float32 (what [`dense_crf_batch`] computes with ``backend="torch"``).

    pydensecrf's update is ``Q = softmax(-unary + sum over kernels of compat * n * K(n * Q))`` (Potts, symmetric
    normalisation n = 1 / sqrt(K 1)). With the Gaussian kernel as a convolution the loop carries ``Q * n_g`` and
    computes ``energy = t * (B(Q * n_g) + conv(Q * n_g)) - unary`` with ``t = compat_g * n_g``, the bilateral
    term B's normalisation and compat and the factors 1 / n_g, 1 / t folded into its splat and slice weights."""
    batch, height, width, _ = images.shape
    num_labels = logits.shape[1]
    device = logits.device
    pixels = height * width
    num_pixels = batch * pixels
    # everything is pixel-major, [B * H * W, K], a pixel's labels contiguous (channels-last memory)
    logits = logits.float()
    upsampled = F.interpolate(
        logits.contiguous(memory_format=torch.channels_last),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    shifted = upsampled.permute(0, 2, 3, 1).reshape(num_pixels, num_labels)
    # softmax and log-softmax without a reduction over the labels per pixel (slow on CPU): the upsampled maximum
    # of the logits bounds every upsampled logit (bilinear weights are convex) and is cheap to get
    upper = F.interpolate(logits.amax(1, keepdim=True), size=(height, width), mode="bilinear", align_corners=False)
    shifted.sub_(upper.view(num_pixels, 1))
    q = torch.exp(shifted)
    total = q.sum(1, keepdim=True)
    if not bool(total.min() > 1e-20):  # logits so far apart that exp lost precision: the per-pixel maximum then
        shifted.sub_(shifted.amax(1, keepdim=True))
        total = torch.exp(shifted, out=q).sum(1, keepdim=True)
    log_clipped = shifted.sub_(total.log()).clamp_(min=math.log(1e-5))  # = -unary = log(clip(softmax, 1e-5))
    q.mul_(total.reciprocal_()).clamp_(min=1e-5)
    q.mul_(q.sum(1, keepdim=True).reciprocal_())  # = softmax(-unary), the library's starting point
    iterations = params["num_iterations"]
    compat_b, compat_g = params["bilateral_compat"], params["gaussian_compat"]
    if iterations == 0 or (compat_b == 0 and compat_g == 0):
        return q.view(batch, height, width, num_labels).permute(0, 3, 1, 2).contiguous()

    dtype = _message_dtype(device.type)
    # per pixel: the loop filters Q * carry and multiplies the sum of the messages by energy_scale
    carry = energy_scale = None
    gaussian_sxy = params["gaussian_sxy"]
    by_convolution = gaussian_sxy <= _MAX_CONVOLUTION_SXY
    xx, yy = _pixel_grid(height, width, device)
    if compat_g != 0 and by_convolution:
        vertical, horizontal = _gaussian_taps(float(gaussian_sxy))
        taps_x = horizontal.to(device).view(1, 1, 1, -1).expand(num_labels, 1, 1, -1).contiguous()
        taps_y = vertical.to(device).view(1, 1, -1, 1).expand(num_labels, 1, -1, 1).contiguous()
        pad = horizontal.numel() // 2

        def convolve(x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] -> [B, H, W, C], depthwise, channels last
            channels = x.shape[-1]
            x = F.conv2d(x.permute(0, 3, 1, 2), taps_x[:channels].to(x.dtype), padding=(0, pad), groups=channels)
            return F.conv2d(x, taps_y[:channels].to(x.dtype), padding=(pad, 0), groups=channels).permute(0, 2, 3, 1)

        if horizontal.numel() > _MAX_BFLOAT16_TAPS:
            dtype = torch.float32
        norm_g = torch.rsqrt(convolve(torch.ones(1, height, width, 1, device=device)) + 1e-20)
        carry = norm_g.expand(batch, height, width, 1).reshape(num_pixels, 1)
        energy_scale = carry * compat_g
        taps_x, taps_y = taps_x.to(dtype), taps_y.to(dtype)
    elif compat_g != 0:  # one lattice serves every image: they share the positions
        positions = torch.stack([xx / gaussian_sxy, yy / gaussian_sxy], 1)
        gaussian = _with_dtype(_build_lattice(positions, pixels), dtype)
        norm_g = _lattice_norm(gaussian)
        gaussian_splat = (gaussian.splat_weights * norm_g[gaussian.splat_pixels]).to(dtype)
        gaussian_slice = (gaussian.slice_weights * (norm_g * compat_g)[:, None]).to(dtype)

    if compat_b != 0:
        sxy, srgb = params["bilateral_sxy"], params["bilateral_srgb"]
        rgb = images.to(device).reshape(num_pixels, 3)
        channels = [rgb[:, channel].float() / srgb for channel in (2, 1, 0)]  # the library sees BGR (STEGO)
        features = torch.stack([(xx / sxy).repeat(batch), (yy / sxy).repeat(batch), *channels])  # [5, P]
        bilateral = _with_dtype(_build_lattice(features.T, pixels), dtype)
        norm_b = _lattice_norm(bilateral)[:, None]
        splat_scale, slice_scale = norm_b, norm_b * compat_b
        if carry is not None:
            splat_scale, slice_scale = splat_scale / carry, slice_scale / energy_scale
        splat_b = (bilateral.splat_weights * splat_scale.squeeze(1)[bilateral.splat_pixels]).to(dtype)
        slice_b = (bilateral.slice_weights * slice_scale).to(dtype)

    shift_maximum = not _exp_without_maximum(device.type) or min(compat_b, compat_g) < 0
    if energy_scale is None:
        energy_scale = torch.ones(num_pixels, 1, device=device)
    state = q if carry is None else q.mul_(carry)  # Q * carry
    state_low = state.to(dtype)
    energy = state if dtype != torch.float32 else torch.empty_like(state)
    for iteration in range(iterations):
        messages = []
        if compat_b != 0:
            messages.append(_lattice_filter(bilateral, state_low, splat_b, slice_b))
        if compat_g != 0 and by_convolution:
            smoothed = convolve(state_low.view(batch, height, width, num_labels))
            messages.append(smoothed.reshape(num_pixels, num_labels))
        elif compat_g != 0:
            per_position = state_low.view(batch, pixels, num_labels).transpose(0, 1).reshape(pixels, -1)
            smoothed = _lattice_filter(gaussian, per_position, gaussian_splat, gaussian_slice)
            messages.append(smoothed.view(pixels, batch, num_labels).transpose(0, 1).reshape(num_pixels, num_labels))
        message = messages[0]
        for other in messages[1:]:
            message.add_(other)
        for shift in (shift_maximum, True):
            if message.dtype == energy.dtype:
                torch.addcmul(log_clipped, message, energy_scale, out=energy)
            else:  # mixed-dtype arithmetic would convert into a temporary
                torch.addcmul(log_clipped, energy.copy_(message), energy_scale, out=energy)
            if shift:
                energy.sub_(energy.amax(1, keepdim=True))
            weights = energy.exp_()
            total = weights.sum(1, keepdim=True)
            if shift:
                break
            smallest, largest = torch.aminmax(total)
            if smallest > 0 and largest < math.inf:
                break
        scale = total.reciprocal_()
        if iteration == iterations - 1:
            break
        weights.mul_(scale if carry is None else scale.mul_(carry))
        if dtype == torch.float32:
            state_low, energy = weights, state_low  # the old state's memory takes the next energies
        else:
            state_low.copy_(weights)
    out = torch.empty(batch, num_labels, height, width, device=device)
    torch.mul(
        weights.view(batch, height, width, num_labels),
        scale.view(batch, height, width, 1),
        out=out.permute(0, 2, 3, 1),
    )
    return out


_BACKENDS = ("pydensecrf", "torch")


def _check_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def dense_crf(
    image: np.ndarray | torch.Tensor,
    logits: torch.Tensor | np.ndarray,
    *,
    backend: str = "pydensecrf",
    num_iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
) -> torch.Tensor:
    """Dense CRF marginals of one image, STEGO's recipe (METHODS 0.7).

    Args:
        image (`np.ndarray` of shape `[H, W, 3]`, uint8, RGB):
            The image (also accepted: a PIL image or a uint8 HWC tensor). Used as is; it is reversed to BGR
            before it reaches the library, as STEGO does.
        logits (`torch.Tensor` or `np.ndarray` of shape `[K, h, w]`):
            Class scores (logits or log-probabilities) at any resolution, any float dtype; bilinearly upsampled
            to `H x W` in float32.
        backend (`str`, *optional*, defaults to `"pydensecrf"`):
            ``"pydensecrf"``: the reference library. ``"torch"``: the same model in PyTorch on the logits'
            device (see [`dense_crf_batch`]).
        num_iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat:
            Mean-field iterations and the two pairwise kernels' parameters (STEGO's defaults).

    Returns:
        `torch.Tensor` of shape `[K, H, W]`, float32: the marginals Q (summing to 1 over K), on the logits'
        device (CPU for numpy logits). The prediction is ``Q.argmax(0)``.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from hf_useg.crf import dense_crf
    >>> image = np.zeros((32, 32, 3), dtype=np.uint8); image[:, 16:] = 200
    >>> logits = torch.randn(3, 4, 4)
    >>> q = dense_crf(image, logits, backend="torch")
    >>> q.shape, (dense_crf(image, logits).argmax(0) == q.argmax(0)).float().mean().item() > 0.95
    (torch.Size([3, 32, 32]), True)
    ```
    """
    params = _check_params(
        {
            "num_iterations": num_iterations,
            "gaussian_sxy": gaussian_sxy,
            "gaussian_compat": gaussian_compat,
            "bilateral_sxy": bilateral_sxy,
            "bilateral_srgb": bilateral_srgb,
            "bilateral_compat": bilateral_compat,
        }
    )
    _check_backend(backend)
    image = _check_image(image)
    logits = _check_logits(logits, ndim=3)
    if backend == "torch":
        return _torch_crf_chunks(_as_tensor(image)[None], logits[None], params)[0]
    _import_densecrf()
    q = _crf_worker(_task(_as_numpy(image), logits, params))
    return torch.from_numpy(q).to(logits.device)


# One pool per worker count, reused across calls (starting workers costs seconds).
_EXECUTORS: dict[int, ProcessPoolExecutor] = {}


def _executor(num_workers: int) -> ProcessPoolExecutor:
    executor = _EXECUTORS.get(num_workers)
    if executor is None:
        # Never fork the calling process: forking a process whose torch/OpenMP threads are running can
        # deadlock the child (the hangs STEGO users report). A forkserver forks from a clean single-threaded
        # server that has imported only this module; spawn (e.g. on Windows) starts fresh interpreters.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["hf_useg.crf"])
        else:
            context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(max_workers=num_workers, mp_context=context)
        _EXECUTORS[num_workers] = executor
    return executor


def shutdown_crf_workers() -> None:
    """Stop the worker processes [`dense_crf_batch`] keeps for reuse (also done at interpreter exit)."""
    while _EXECUTORS:
        _, executor = _EXECUTORS.popitem()
        executor.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_crf_workers)


# On CPU the torch backend runs about this many pixel-label values at a time (one 320x320 image, several small
# ones): its passes over [pixels, K] tensors are memory-bound, and bigger chunks were slower per image (measured
# 1, 2, 4, 8 images of 320x320 per chunk: 0.26, 0.28, 0.31, 0.36 CPU s per image at K = 27, one thread).
_CPU_CHUNK_VALUES = 2**21
# ... and its worker threads hold at most this many values' chunks at once (each needs ~40 bytes per value)
_CPU_VALUES_IN_FLIGHT = 2**26


def _torch_crf_chunks(
    images: torch.Tensor, logits: torch.Tensor, params: dict[str, Any], chunksize: int | None = None
) -> torch.Tensor:
    """[`_torch_crf`] over chunks of `chunksize` images (default: the whole batch on GPU; on CPU about
    `_CPU_CHUNK_VALUES` values, and at least one chunk per thread when the batch allows).

    On CPU every chunk runs single-threaded, the chunks in ``torch.get_num_threads()`` worker threads: one image's
    operations are too short for torch's intra-op threads, whose every operation ends with a barrier; on a CPU
    shared with other busy processes a thread that is not scheduled holds all the others up (measured on a loaded
    2-core machine: 2 threads 5-30x slower than 1). Images in separate threads never wait on each other, so a
    batch goes as fast as the cores it gets, and a single image runs on one core. ``torch.set_num_threads`` is
    set to 1 for the call (in the worker threads and, when it runs the work itself, the calling thread) and
    restored afterwards."""
    batch, height, width = images.shape[:3]
    device = logits.device
    if chunksize is None:
        if device.type != "cpu":
            chunksize = batch
        else:
            chunksize = max(1, _CPU_CHUNK_VALUES // (height * width * logits.shape[1]))
            chunksize = min(chunksize, math.ceil(batch / torch.get_num_threads()))
    starts = range(0, batch, chunksize)

    def run(start: int) -> torch.Tensor:
        return _torch_crf(images[start : start + chunksize], logits[start : start + chunksize], params)

    if device.type != "cpu":
        chunks = [run(start) for start in starts]
    else:
        threads = torch.get_num_threads()
        values = chunksize * height * width * logits.shape[1]
        workers = min(threads, len(starts), max(1, _CPU_VALUES_IN_FLIGHT // values))

        def run_single_threaded(start: int) -> torch.Tensor:
            torch.set_num_threads(1)  # this thread's own setting (OpenMP), and the default of new threads
            return run(start)

        try:
            if workers == 1:
                chunks = [run_single_threaded(start) for start in starts]
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="dense_crf") as pool:
                    chunks = list(pool.map(run_single_threaded, starts))
        finally:
            torch.set_num_threads(threads)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def dense_crf_batch(
    images: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    logits: torch.Tensor | np.ndarray,
    *,
    backend: str = "pydensecrf",
    num_workers: int = 0,
    chunksize: int | None = None,
    **crf_kwargs: Any,
) -> torch.Tensor:
    """[`dense_crf`] over a batch: in PyTorch on the logits' device, or with `pydensecrf` serially or in a pool
    of worker processes.

    ``backend="torch"`` runs the same mean field as the library (Potts model, symmetric kernel normalisation,
    the unary and BGR colour features of [`dense_crf`]) in the calling process, on CPU or GPU, with no worker
    processes. The bilateral kernel is filtered on a permutohedral lattice built exactly as the library builds its
    own (so its messages match the library's to float rounding in float32); the Gaussian kernel by a separable
    convolution with taps measured from the library's lattice, the approximation (the library's Gaussian kernel
    varies slightly with the position on its lattice; above ``gaussian_sxy`` 4 a lattice is used for it too). On
    CPUs with bfloat16 instructions (``avx512_bf16``) the values between the filtering steps are bfloat16, sums
    float32. On CamVid images the argmax agrees with the reference on 99.93% of the pixels (mean |dQ| 5e-5).
    Results do not depend on how a batch is split. On GPU the whole batch goes at once. On CPU each image runs
    single-threaded and the batch's images are spread over ``torch.get_num_threads()`` worker threads: torch's
    intra-op threads do not pay on one image's short operations and wait on each other on a CPU shared with
    other busy processes (there 5-30x slower than one thread). ``torch.set_num_threads`` is 1 for the call and
    restored afterwards; a single image uses one core.

    With ``backend="pydensecrf"`` up-sampling and softmax run in the calling process (on the logits' device);
    only numpy arrays (the BGR image and the unary) go to the workers, which just run `pydensecrf` on them.
    Results equal a loop of [`dense_crf`] calls exactly. Workers are started with the ``forkserver`` method
    (``spawn`` where that is unavailable), never by forking the caller, and are kept for the next call;
    [`shutdown_crf_workers`] stops them. As with any forkserver/spawn pool (e.g. a `DataLoader` with workers),
    the workers re-import the calling script, so a script that uses ``num_workers > 0`` needs the usual
    ``if __name__ == "__main__":`` guard (and code read from stdin cannot use workers).

    Args:
        images (`np.ndarray` or `torch.Tensor` of shape `[B, H, W, 3]`, or a sequence of `[H, W, 3]`, uint8 RGB):
            The images, all the same size. With the torch backend a tensor may already sit on the logits' device.
        logits (`torch.Tensor` or `np.ndarray` of shape `[B, K, h, w]`): class scores, any float dtype.
        backend (`str`, *optional*, defaults to `"pydensecrf"`): ``"pydensecrf"`` (the reference) or ``"torch"``.
        num_workers (`int`, *optional*, defaults to 0): `pydensecrf` worker processes; 0 runs in the calling
            process. Not used by the torch backend (which must get 0).
        chunksize (`int`, *optional*): images per task sent to a worker (default: spread evenly); with the torch
            backend, images per pass (default: the whole batch on GPU; on CPU a few megabytes of values, at most
            the batch's share of one thread).
        crf_kwargs: the CRF parameters of [`dense_crf`].

    Returns:
        `torch.Tensor` of shape `[B, K, H, W]`, float32, on the logits' device.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from hf_useg.crf import dense_crf_batch
    >>> images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    >>> q = dense_crf_batch(images, torch.randn(4, 5, 4, 4), num_workers=2)
    >>> q.shape
    torch.Size([4, 5, 32, 32])
    >>> dense_crf_batch(images, torch.randn(4, 5, 4, 4, dtype=torch.bfloat16), backend="torch").dtype
    torch.float32
    ```
    """
    params = _check_params(crf_kwargs)
    _check_backend(backend)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, 3] or a list of [H, W, 3], got shape {tuple(images.shape)}")
        images = _check_image(images, name="images", batched=True)
    else:
        images = [_check_image(image, name=f"images[{i}]") for i, image in enumerate(images)]
        if len({tuple(image.shape) for image in images}) > 1:
            sizes = sorted({tuple(image.shape) for image in images})
            raise ValueError(f"images must all have the same size, got {sizes}")
    logits = _check_logits(logits, ndim=4)
    if len(images) != logits.shape[0]:
        raise ValueError(f"got {len(images)} images but logits for {logits.shape[0]}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
    if backend == "torch" and num_workers:
        raise ValueError("num_workers is for the pydensecrf backend; the torch backend runs in this process")
    if backend == "pydensecrf":
        _import_densecrf()

    batch_size, num_labels = logits.shape[:2]
    if batch_size == 0:
        return torch.empty(0, num_labels, 0, 0, device=logits.device)
    height, width = images[0].shape[:2]
    if backend == "torch":
        if isinstance(images, list):
            images = torch.stack([_as_tensor(image).to(logits.device) for image in images])
        return _torch_crf_chunks(_as_tensor(images), logits, params, chunksize)

    images = [_as_numpy(image) for image in images]
    out = torch.empty(batch_size, num_labels, height, width, dtype=torch.float32)
    if num_workers == 0:
        for i, image in enumerate(images):
            out[i] = torch.from_numpy(_crf_worker(_task(image, logits[i], params)))
        return out.to(logits.device)

    chunksize = chunksize or max(1, math.ceil(batch_size / (4 * num_workers)))
    # Prepare and send a window of images at a time so that unaries for a huge batch never all sit in memory.
    window = 2 * num_workers * chunksize
    executor = _executor(num_workers)
    try:
        for start in range(0, batch_size, window):
            stop = min(start + window, batch_size)
            tasks = [_task(images[i], logits[i], params) for i in range(start, stop)]
            for i, q in enumerate(executor.map(_crf_worker, tasks, chunksize=chunksize), start=start):
                out[i] = torch.from_numpy(q)
    except BrokenProcessPool as err:
        _EXECUTORS.pop(num_workers, None)
        raise RuntimeError(
            "a dense-CRF worker process died: out of memory, or the calling script runs dense_crf_batch at "
            'import time without an `if __name__ == "__main__":` guard (workers re-import the main module, '
            "as with any forkserver/spawn pool). Retry with fewer num_workers, or num_workers=0"
        ) from err
    return out.to(logits.device)
