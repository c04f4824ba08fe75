"""Pseudo-box sources of CutMix-DETReg pretraining (METHODS.md section 5): CutMix pastes, random boxes, Selective
Search.

* `CutMixComposer` pastes rectangles cut from other images onto a base image: the pastes' rectangles are exact
  pseudo-boxes, and their un-blended content gives the embedding targets (the thesis' method).
* `random_boxes` draws the same box law on the unmodified image (the control arm: same boxes, no pasted content).
* `selective_search_boxes` is DETReg's original source (OpenCV's fast Selective Search on a 128x128 thumbnail).

**Box convention.** Boxes are ``float32 [n, 4]`` arrays ``(x1, y1, x2, y2)`` in pixels with ``x2``/``y2``
*exclusive*: a box covers the pixel columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``, i.e. the coordinates are
those of the pixel edges, so ``x2 - x1`` is the width in pixels and `boxes_to_normalized_cxcywh` gives DETR's
normalised ``(cx, cy, w, h)`` without any +-1. CutMix and random boxes have integer coordinates.

**The box law** (shared by `CutMixComposer` and `random_boxes`, one sampler): ``K ~ U{1..max_boxes}`` boxes; each
with area fraction ``a ~ LogUniform(area_range)`` of the image and aspect ratio ``r = w / h ~
LogUniform(aspect_range)``, so ``w = round(sqrt(a * H * W * r))``, ``h = round(sqrt(a * H * W / r))`` (at least 1);
a pair ``(a, r)`` whose rectangle does not fit in the image is drawn again (up to 10 times, then the rectangle is
clipped to the image), so the law is the log-uniform one conditioned on fitting; the top-left corner is uniform
over the positions that keep the box inside the image. Boxes are drawn in paste order; **occlusion rule**: a box
that later boxes cover by more than ``occlusion_threshold`` of its area is dropped (the later boxes are kept
whether or not they are dropped themselves: their pixels are still pasted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "CutMixComposer",
    "CutMixComposite",
    "boxes_to_normalized_cxcywh",
    "random_boxes",
    "selective_search_boxes",
]

_FIT_ATTEMPTS = 10
_SELECTIVE_SEARCH_EXTRA = "pip install 'hf-useg[selective-search]'"


# -- the box law ---------------------------------------------------------------------------------------------


def _check_generator(generator) -> np.random.Generator:
    if not isinstance(generator, np.random.Generator):
        raise TypeError(
            f"generator must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), got "
            f"{type(generator).__name__}"
        )
    return generator


def _check_law(
    max_boxes: int, area_range: tuple[float, float], aspect_range: tuple[float, float], occlusion_threshold: float
) -> None:
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) or max_boxes < 1:
        raise ValueError(f"the maximum number of boxes must be an int >= 1, got {max_boxes!r}")
    low, high = area_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"area_range must satisfy 0 < low <= high <= 1 (fractions of the image), got {area_range}")
    low, high = aspect_range
    if not 0 < low <= high:
        raise ValueError(f"aspect_range must satisfy 0 < low <= high, got {aspect_range}")
    if not 0 <= occlusion_threshold <= 1:
        raise ValueError(f"occlusion_threshold must be in [0, 1], got {occlusion_threshold}")


def _log_uniform(generator: np.random.Generator, value_range: tuple[float, float], size: int) -> np.ndarray:
    return np.exp(generator.uniform(math.log(value_range[0]), math.log(value_range[1]), size=size))


def _sample_law_rectangles(
    height: int,
    width: int,
    generator: np.random.Generator,
    max_boxes: int,
    area_range: tuple[float, float],
    aspect_range: tuple[float, float],
) -> np.ndarray:
    """``int64 [K, 4]`` rectangles ``(x1, y1, x2, y2)`` (x2/y2 exclusive) of the box law, in drawing order."""
    count = int(generator.integers(1, max_boxes + 1))
    areas = _log_uniform(generator, area_range, count)
    aspects = _log_uniform(generator, aspect_range, count)
    rectangles = np.empty((count, 4), dtype=np.int64)
    for index in range(count):
        area, aspect = areas[index], aspects[index]
        for attempt in range(_FIT_ATTEMPTS + 1):
            box_width = max(1, round(math.sqrt(area * height * width * aspect)))
            box_height = max(1, round(math.sqrt(area * height * width / aspect)))
            if (box_width <= width and box_height <= height) or attempt == _FIT_ATTEMPTS:
                break
            area = float(_log_uniform(generator, area_range, 1)[0])
            aspect = float(_log_uniform(generator, aspect_range, 1)[0])
        box_width, box_height = min(box_width, width), min(box_height, height)
        x1 = int(generator.integers(0, width - box_width + 1))
        y1 = int(generator.integers(0, height - box_height + 1))
        rectangles[index] = (x1, y1, x1 + box_width, y1 + box_height)
    return rectangles


def _visible_fractions(rectangles: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fraction of each rectangle's pixels that no later rectangle covers."""
    topmost = np.full((height, width), -1, dtype=np.int64)
    for index, (x1, y1, x2, y2) in enumerate(rectangles):
        topmost[y1:y2, x1:x2] = index
    visible = np.bincount(topmost[topmost >= 0], minlength=len(rectangles))
    areas = (rectangles[:, 2] - rectangles[:, 0]) * (rectangles[:, 3] - rectangles[:, 1])
    return visible / np.maximum(areas, 1)


def _kept(visible_fraction: np.ndarray, occlusion_threshold: float) -> np.ndarray:
    # "hidden by more than the threshold" is dropped; exactly the threshold is kept
    return (1.0 - visible_fraction) <= occlusion_threshold + 1e-12


def random_boxes(
    height: int,
    width: int,
    generator: np.random.Generator,
    max_boxes: int = 8,
    area_range: tuple[float, float] = (0.02, 0.5),
    aspect_range: tuple[float, float] = (1 / 3, 3.0),
    occlusion_threshold: float | None = 0.5,
) -> np.ndarray:
    """Boxes of the CutMix box law on an unmodified ``height x width`` image: the random-box control arm.

    Same law, same sampler and same occlusion rule as `CutMixComposer` (``occlusion_threshold=None`` keeps every
    box), so the kept boxes have the distribution of CutMix's boxes and only the pasted content differs: with the
    same seed and parameters, ``random_boxes(h, w, rng)`` equals ``CutMixComposer(...)(base, donors, rng).boxes``
    (the composer draws its boxes first). Returns ``float32 [n, 4]`` xyxy pixels, x2/y2 exclusive, integer valued.

    Example:

    ```python
    >>> import numpy as np
    >>> boxes = random_boxes(240, 320, np.random.default_rng(0))
    >>> boxes.shape[1], bool((boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all())
    (4, True)
    ```
    """
    generator = _check_generator(generator)
    threshold = 1.0 if occlusion_threshold is None else occlusion_threshold
    _check_law(max_boxes, area_range, aspect_range, threshold)
    height, width = _check_size(height, width)
    rectangles = _sample_law_rectangles(height, width, generator, max_boxes, area_range, aspect_range)
    if occlusion_threshold is not None:
        rectangles = rectangles[_kept(_visible_fractions(rectangles, height, width), occlusion_threshold)]
    return rectangles.astype(np.float32)


def _check_size(height, width) -> tuple[int, int]:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return int(height), int(width)


def boxes_to_normalized_cxcywh(boxes, height: int, width: int):
    """xyxy pixel boxes (x2/y2 exclusive, as every source here gives) to DETR's normalised ``(cx, cy, w, h)``.

    Works on numpy arrays and torch tensors (returns the same kind, float32), shape ``[..., 4]``.

    Example:

    ```python
    >>> import numpy as np
    >>> boxes_to_normalized_cxcywh(np.array([[0, 0, 100, 50]]), height=100, width=200)
    array([[0.25, 0.25, 0.5 , 0.5 ]], dtype=float32)
    ```
    """
    scale_width, scale_height = float(width), float(height)
    if scale_width <= 0 or scale_height <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    shape = tuple(boxes.shape) if hasattr(boxes, "shape") else np.shape(boxes)
    if shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4], got {shape}")
    if hasattr(boxes, "detach"):  # torch tensor
        import torch

        boxes = boxes.to(torch.float32)
        x1, y1, x2, y2 = boxes.unbind(-1)
        stack = torch.stack
    else:
        boxes = np.asarray(boxes, dtype=np.float32)
        x1, y1, x2, y2 = np.moveaxis(boxes, -1, 0)

        def stack(parts, dim):
            return np.stack(parts, axis=dim).astype(np.float32)

    return stack(
        [
            (x1 + x2) / (2 * scale_width),
            (y1 + y2) / (2 * scale_height),
            (x2 - x1) / scale_width,
            (y2 - y1) / scale_height,
        ],
        -1,
    )


# -- CutMix --------------------------------------------------------------------------------------------------


@dataclass
class CutMixComposite:
    """What `CutMixComposer` returns: the composite image, its pseudo-boxes and the content behind them.

    Attributes:
        image: the composite, ``uint8 [H, W, 3]``.
        boxes: ``float32 [n, 4]`` xyxy pixels (x2/y2 exclusive, integer valued) of the kept pastes, in paste order.
        pastes: the un-blended pasted content of each kept box, ``uint8 [y2 - y1, x2 - x1, 3]`` (the embedding
            targets are computed from these; hidden parts included).
        donor_indices: index in ``donors`` of each kept box's donor image.
        visible_fraction: ``float [n]``: share of each kept box's pixels that no later paste covers.
        num_pasted: the number of pastes drawn (``K``, before the occlusion rule dropped any).
    """

    image: np.ndarray
    boxes: np.ndarray
    pastes: list[np.ndarray]
    donor_indices: list[int]
    visible_fraction: np.ndarray
    num_pasted: int


@dataclass
class CutMixComposer:
    """Paste rectangles cut from donor images onto a base image; the pastes' rectangles are exact pseudo-boxes.

    The box law and occlusion rule are those of the module docstring (METHODS.md section 5). The content of each
    paste is a *random resized crop* of a random donor (uniform over ``donors``): a crop with the paste's aspect
    ratio whose sides are ``s`` times those of the largest such crop in the donor, ``s ~ U(donor_crop_scale)``,
    at a uniform position, resized to the paste size (PIL bilinear, antialiased when shrinking). Pastes are drawn
    one after the other on a copy of the base; the boxes are the full rectangles of the pastes that survive the
    occlusion rule, whatever later pastes hide of them.

    With ``feather > 0`` a paste's outer ``feather`` pixels are blended with what lies below with a linear alpha
    ramp ``alpha = min(1, (d + 1) / (feather + 1))`` (``d``: distance in pixels to the paste's border, 0 on the
    border), so only pixels within ``feather`` of a paste border differ from the hard paste; boxes, occlusion and
    ``pastes`` do not change.

    Randomness comes only from the ``numpy.random.Generator`` given to each call: the same seed gives the same
    composite. The boxes are drawn first, so they equal `random_boxes` with the same seed and law.

    Example:

    ```python
    >>> import numpy as np
    >>> composer = CutMixComposer(max_pastes=3)
    >>> base = np.zeros((64, 96, 3), np.uint8)
    >>> donors = [np.full((50, 50, 3), 200, np.uint8), np.full((80, 40, 3), 90, np.uint8)]
    >>> composite = composer(base, donors, np.random.default_rng(0))
    >>> composite.image.shape, composite.boxes.shape[1], len(composite.pastes) == len(composite.boxes)
    ((64, 96, 3), 4, True)
    ```
    """

    max_pastes: int = 8
    area_range: tuple[float, float] = (0.02, 0.5)
    aspect_range: tuple[float, float] = (1 / 3, 3.0)
    occlusion_threshold: float = 0.5
    feather: int = 0
    donor_crop_scale: tuple[float, float] = field(default=(0.5, 1.0))

    def __post_init__(self) -> None:
        self.area_range = tuple(float(value) for value in self.area_range)
        self.aspect_range = tuple(float(value) for value in self.aspect_range)
        self.donor_crop_scale = tuple(float(value) for value in self.donor_crop_scale)
        _check_law(self.max_pastes, self.area_range, self.aspect_range, self.occlusion_threshold)
        if isinstance(self.feather, bool) or not isinstance(self.feather, (int, np.integer)) or self.feather < 0:
            raise ValueError(f"feather must be an int >= 0 (pixels), got {self.feather!r}")
        low, high = self.donor_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"donor_crop_scale must satisfy 0 < low <= high <= 1, got {self.donor_crop_scale}")

    def __call__(self, base, donors, generator: np.random.Generator) -> CutMixComposite:
        """Compose one image. ``base`` and each donor: ``uint8 [H, W, 3]`` arrays or PIL images (made RGB)."""
        generator = _check_generator(generator)
        canvas = _as_rgb_array(base, "base").copy()
        donor_arrays = [_as_rgb_array(donor, f"donors[{index}]") for index, donor in enumerate(donors)]
        if not donor_arrays:
            raise ValueError("CutMixComposer needs at least one donor image")
        height, width = canvas.shape[:2]
        rectangles = _sample_law_rectangles(
            height, width, generator, self.max_pastes, self.area_range, self.aspect_range
        )
        pastes, donor_indices = [], []
        for x1, y1, x2, y2 in rectangles:
            donor_index = int(generator.integers(len(donor_arrays)))
            paste = self._crop_resized(donor_arrays[donor_index], int(x2 - x1), int(y2 - y1), generator)
            self._paste(canvas, paste, int(x1), int(y1))
            pastes.append(paste)
            donor_indices.append(donor_index)
        visible = _visible_fractions(rectangles, height, width)
        kept = np.flatnonzero(_kept(visible, self.occlusion_threshold))
        return CutMixComposite(
            image=canvas,
            boxes=rectangles[kept].astype(np.float32),
            pastes=[pastes[index] for index in kept],
            donor_indices=[donor_indices[index] for index in kept],
            visible_fraction=visible[kept],
            num_pasted=len(rectangles),
        )

    def _crop_resized(
        self, donor: np.ndarray, paste_width: int, paste_height: int, generator: np.random.Generator
    ) -> np.ndarray:
        donor_height, donor_width = donor.shape[:2]
        aspect = paste_width / paste_height
        if donor_width / donor_height > aspect:
            largest_width, largest_height = donor_height * aspect, float(donor_height)
        else:
            largest_width, largest_height = float(donor_width), donor_width / aspect
        scale = generator.uniform(*self.donor_crop_scale)
        crop_width = min(donor_width, max(1, round(largest_width * scale)))
        crop_height = min(donor_height, max(1, round(largest_height * scale)))
        left = int(generator.integers(0, donor_width - crop_width + 1))
        top = int(generator.integers(0, donor_height - crop_height + 1))
        crop = donor[top : top + crop_height, left : left + crop_width]
        if crop.shape[:2] == (paste_height, paste_width):
            return crop.copy()
        return np.asarray(Image.fromarray(crop).resize((paste_width, paste_height), Image.BILINEAR))

    def _paste(self, canvas: np.ndarray, paste: np.ndarray, x1: int, y1: int) -> None:
        paste_height, paste_width = paste.shape[:2]
        region = canvas[y1 : y1 + paste_height, x1 : x1 + paste_width]
        if self.feather == 0:
            region[:] = paste
            return
        rows, cols = np.arange(paste_height), np.arange(paste_width)
        distance = np.minimum.outer(
            np.minimum(rows, paste_height - 1 - rows), np.minimum(cols, paste_width - 1 - cols)
        )
        alpha = np.minimum(1.0, (distance + 1) / (self.feather + 1))[..., None]
        blended = alpha * paste.astype(np.float64) + (1.0 - alpha) * region.astype(np.float64)
        region[:] = np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _as_rgb_array(image, name: str) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or min(array.shape[:2]) < 1:
        raise ValueError(f"{name} must be a PIL image or a uint8 [H, W, 3] array, got {array.dtype} {array.shape}")
    return array


# -- Selective Search ----------------------------------------------------------------------------------------


def _import_cv2():
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            f"selective_search_boxes needs OpenCV with its contrib modules: {_SELECTIVE_SEARCH_EXTRA} "
            "(opencv-contrib-python-headless)"
        ) from error
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(
            "the installed OpenCV has no ximgproc module (opencv-python without contrib): uninstall opencv-python "
            f"and {_SELECTIVE_SEARCH_EXTRA} (opencv-contrib-python-headless)"
        )
    # OpenCV's own thread pool inside DataLoader workers oversubscribes the cores (and can hang after fork).
    cv2.setNumThreads(1)
    return cv2


def selective_search_boxes(image, top_k: int = 30, resize: int | None = 128, seed: int | None = None) -> np.ndarray:
    """DETReg's pseudo-boxes: the first `top_k` proposals of OpenCV's fast Selective Search, xyxy pixels.

    As DETReg's ``selective_search``: the RGB image is resized to a ``resize x resize`` *square* thumbnail (aspect
    not kept; ``None`` runs on the full image, as DETReg's released box cache did), given to
    ``cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`` with ``switchToSelectiveSearchFast()`` (the RGB
    array as it is, like DETReg, although OpenCV reads it as BGR), and the first `top_k` proposals in OpenCV's
    order are scaled back to the image's pixels. Returns ``float32 [n <= top_k, 4]`` (x1, y1, x2, y2), x2/y2
    exclusive, inside the image.

    OpenCV ranks the proposals with C's ``rand()``, so two calls may give different boxes (DETReg relies on this
    for boxes re-drawn at every load). ``seed`` seeds C's ``rand()`` first (``srand``), so that a training step
    draws the same boxes when a run is resumed; None leaves it as it is. Sets
    ``cv2.setNumThreads(1)`` (process-wide) to keep DataLoader workers from oversubscribing the cores. Needs the
    ``selective-search`` extra (``opencv-contrib-python-headless``): without it this raises an `ImportError` that
    names the install command. About 0.1 s per image at 128 px.

    Example:

    ```python
    >>> import numpy as np
    >>> image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    >>> boxes = selective_search_boxes(image, top_k=10)  # doctest: +SKIP
    >>> boxes.shape[0] <= 10 and bool((boxes[:, 2] <= 160).all())  # doctest: +SKIP
    True
    ```
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize < 8):
        raise ValueError(f"resize must be None or an int >= 8 (pixels), got {resize!r}")
    cv2 = _import_cv2()
    if seed is not None:
        import ctypes

        ctypes.CDLL(None).srand(ctypes.c_uint(seed % 2**32))
    array = np.ascontiguousarray(_as_rgb_array(image, "image"))
    height, width = array.shape[:2]
    thumbnail = cv2.resize(array, (resize, resize)) if resize is not None else array
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(thumbnail)
    search.switchToSelectiveSearchFast()
    proposals = np.asarray(search.process(), dtype=np.float32).reshape(-1, 4)[:top_k]  # x, y, w, h
    if resize is not None:
        proposals = proposals * np.array([width, height, width, height], dtype=np.float32) / resize
    boxes = np.concatenate([proposals[:, :2], proposals[:, :2] + proposals[:, 2:]], axis=1)
    boxes = np.clip(boxes, 0, np.array([width, height, width, height], dtype=np.float32))
    return boxes.astype(np.float32)
