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
import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

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


def _check_image(image: Any, name: str = "image") -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(
            f"{name} must be a uint8 [H, W, 3] RGB array, got dtype {image.dtype}; "
            "for a normalised tensor use hf_useg.crf.denormalize_to_uint8"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (it looks channels-first: pass [H, W, 3])" if image.ndim == 3 and image.shape[0] == 3 else ""
        raise ValueError(f"{name} must be [H, W, 3] RGB, got shape {image.shape}{hint}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


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


def dense_crf(
    image: np.ndarray,
    logits: torch.Tensor | np.ndarray,
    *,
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
            Class scores (logits or log-probabilities) at any resolution; bilinearly upsampled to `H x W`.
        num_iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat:
            Mean-field iterations and the two pairwise kernels' parameters (STEGO's defaults).

    Returns:
        `torch.Tensor` of shape `[K, H, W]`, float32: the marginals Q (summing to 1 over K), on the logits'
        device (CPU for numpy logits). The prediction is ``Q.argmax(0)``.
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
    image = _check_image(image)
    logits = _check_logits(logits, ndim=3)
    _import_densecrf()
    q = _crf_worker(_task(image, logits, params))
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


def dense_crf_batch(
    images: np.ndarray | Sequence[np.ndarray],
    logits: torch.Tensor | np.ndarray,
    *,
    num_workers: int = 0,
    chunksize: int | None = None,
    **crf_kwargs: Any,
) -> torch.Tensor:
    """[`dense_crf`] over a batch, serially or in a pool of worker processes.

    Up-sampling and softmax run in the calling process (on the logits' device); only numpy arrays (the BGR
    image and the unary) go to the workers, which just run `pydensecrf` on them. Results equal a loop of
    [`dense_crf`] calls exactly. Workers are started with the ``forkserver`` method (``spawn`` where that is
    unavailable), never by forking the caller, and are kept for the next call; [`shutdown_crf_workers`] stops
    them. As with any forkserver/spawn pool (e.g. a `DataLoader` with workers), the workers re-import the
    calling script, so a script that uses ``num_workers > 0`` needs the usual ``if __name__ == "__main__":``
    guard (and code read from stdin cannot use workers).

    Args:
        images (`np.ndarray` of shape `[B, H, W, 3]` or a sequence of `[H, W, 3]`, uint8 RGB):
            The images, all the same size.
        logits (`torch.Tensor` or `np.ndarray` of shape `[B, K, h, w]`): class scores.
        num_workers (`int`, *optional*, defaults to 0): worker processes; 0 runs in the calling process.
        chunksize (`int`, *optional*): images per task sent to a worker (default: spread evenly).
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
    ```
    """
    params = _check_params(crf_kwargs)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, 3] or a list of [H, W, 3], got shape {tuple(images.shape)}")
        images = list(images)
    images = [_check_image(image, name=f"images[{i}]") for i, image in enumerate(images)]
    logits = _check_logits(logits, ndim=4)
    if len(images) != logits.shape[0]:
        raise ValueError(f"got {len(images)} images but logits for {logits.shape[0]}")
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"images must all have the same size, got {sorted({image.shape for image in images})}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
    _import_densecrf()

    batch_size, num_labels = logits.shape[:2]
    if batch_size == 0:
        return torch.empty(0, num_labels, 0, 0, device=logits.device)
    height, width = images[0].shape[:2]
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
