"""Image augmentation shared by the training recipes: colour jitter (torch and PIL), HSV conversion, greyscale,
Gaussian blur, crop boxes and flips, ImageNet normalisation.

The torch functions take RGB images in [0, 1] of shape ``[..., 3, H, W]``. The colour adjustments accept a python
float (one factor for everything) or a tensor of per-image factors ``[B]`` for a batch ``[B, 3, H, W]``.

Two variants are kept on purpose, so that every method reproduces its own numbers bit for bit:

* greyscale weights: torchvision's ``(0.2989, 0.587, 0.114)`` (IIC's jitter, the default of the ``adjust_*``
  functions) and PIL's ``convert("L")`` ``(0.299, 0.587, 0.114)`` (PiCIE, the default of [`rgb_to_grey`]);
* HSV -> RGB: by hue sector, as ``colorsys`` (``formula="sectors"``, IIC) or the closed form
  ``v - v s clamp(min(k, 4 - k), 0, 1)`` (``formula="closed_form"``, PiCIE); they agree to rounding.

DINO's pipeline works on PIL uint8 images: [`color_jitter_pil`] reproduces torchvision's ``ColorJitter`` on PIL
images. It draws its random order and factors like the torch [`color_jitter`] ([`draw_color_jitter`]), except that
it always draws all four factors, in the default dtype.

Example:

```python
>>> import torch
>>> from hf_useg.augmentation import adjust_brightness, normalize_images
>>> images = torch.full((2, 3, 4, 4), 0.5)
>>> adjust_brightness(images, torch.tensor([0.5, 4.0]))[:, 0, 0, 0]     # per-image factors, clamped to [0, 1]
tensor([0.2500, 1.0000])
>>> normalize_images(images).shape
torch.Size([2, 3, 4, 4])
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from .configuration_utils import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIL_GREY_WEIGHTS",
    "TORCHVISION_GREY_WEIGHTS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_hue_pil",
    "adjust_saturation",
    "chance",
    "color_jitter",
    "color_jitter_pil",
    "denormalize_images",
    "draw_color_jitter",
    "gaussian_blur",
    "hsv_to_rgb",
    "normalize_images",
    "pil_to_tensor",
    "random_resized_crop_box",
    "resample_crops",
    "rgb_to_grey",
    "rgb_to_hsv",
    "square_crop_box",
    "uniform",
]


PIL_GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, PIL's convert("L")
TORCHVISION_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (its contrast and saturation)

Factor = float | torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# random draws


def uniform(low: float, high: float, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> float:
    """``low + (high - low) * u`` with one ``u ~ U[0, 1)`` drawn from `generator` in `dtype` (the default dtype
    when omitted).

    Example:

    ```python
    >>> 2.0 <= uniform(2.0, 3.0, torch.Generator().manual_seed(0)) < 3.0
    True
    ```
    """
    return low + (high - low) * torch.rand((), generator=generator, dtype=dtype).item()


def chance(probability: float, generator: torch.Generator | None) -> bool:
    """One uniform draw ``< probability``.

    Always draws (even for probability 0 or 1), so the number of draws, and every later choice, does not depend on
    the outcome.

    Example:

    ```python
    >>> chance(1.0, torch.Generator().manual_seed(0)), chance(0.0, torch.Generator().manual_seed(0))
    (True, False)
    ```
    """
    return torch.rand((), generator=generator).item() < probability


def draw_color_jitter(
    generator: torch.Generator | None,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    *,
    skip_disabled: bool = True,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[list[int], list[float | None]]:
    """The random choices of torchvision's ``ColorJitter``, in its draw order: first the order of the four
    adjustments (``randperm(4)``), then the factors of brightness, contrast and saturation, uniform in
    ``[max(0, 1 - s), 1 + s]``, and the hue shift, uniform in ``[-s, s]`` (see [`uniform`] for `dtype`).

    With `skip_disabled`, an adjustment of strength 0 draws nothing and gets the factor `None`.

    Example:

    ```python
    >>> order, factors = draw_color_jitter(torch.Generator().manual_seed(0), 0.4, 0.0, 0.2, 0.1)
    >>> sorted(order), factors[1]
    ([0, 1, 2, 3], None)
    ```
    """
    order = torch.randperm(4, generator=generator).tolist()
    factors: list[float | None] = []
    for strength, is_hue in ((brightness, False), (contrast, False), (saturation, False), (hue, True)):
        if skip_disabled and not strength > 0:
            factors.append(None)
        elif is_hue:
            factors.append(uniform(-strength, strength, generator, dtype))
        else:
            factors.append(uniform(max(0.0, 1.0 - strength), 1.0 + strength, generator, dtype))
    return order, factors


# --------------------------------------------------------------------------------------------------------------
# colour operations on RGB images in [0, 1], [..., 3, H, W]


def _per_image(factor: Factor, images: torch.Tensor, trailing_dims: int = 3) -> Factor:
    """A tensor of per-image factors ``[B]`` -> images' dtype and device, shaped to broadcast over each image."""
    if not isinstance(factor, torch.Tensor):
        return factor
    factor = factor.to(device=images.device, dtype=images.dtype)
    return factor if factor.ndim == 0 else factor.reshape(-1, *([1] * trailing_dims))


def rgb_to_grey(images: torch.Tensor, weights: Sequence[float] = PIL_GREY_WEIGHTS) -> torch.Tensor:
    """Weighted sum of the channels, ``[..., 1, H, W]`` (PIL's ``convert("L")`` weights by default).

    Example:

    ```python
    >>> rgb_to_grey(torch.ones(2, 3, 4, 4)).shape
    torch.Size([2, 1, 4, 4])
    ```
    """
    red, green, blue = images.unbind(dim=-3)
    return (weights[0] * red + weights[1] * green + weights[2] * blue).unsqueeze(-3)


def adjust_brightness(images: torch.Tensor, factor: Factor) -> torch.Tensor:
    """``clamp(f x, 0, 1)``.

    Example:

    ```python
    >>> adjust_brightness(torch.tensor([0.2, 0.6]).view(1, 2, 1), 2.0).flatten()
    tensor([0.4000, 1.0000])
    ```
    """
    return (images * _per_image(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(
    images: torch.Tensor, factor: Factor, grey_weights: Sequence[float] = TORCHVISION_GREY_WEIGHTS
) -> torch.Tensor:
    """Blend with the mean grey level of each image: ``clamp(f x + (1 - f) mean(grey(x)), 0, 1)``.

    Example:

    ```python
    >>> adjust_contrast(torch.rand(2, 3, 4, 4), torch.tensor([0.0, 1.0])).shape
    torch.Size([2, 3, 4, 4])
    ```
    """
    factor = _per_image(factor, images)
    mean = rgb_to_grey(images, grey_weights).mean(dim=(-3, -2, -1), keepdim=True)
    return (factor * images + (1 - factor) * mean).clamp(0.0, 1.0)


def adjust_saturation(
    images: torch.Tensor, factor: Factor, grey_weights: Sequence[float] = TORCHVISION_GREY_WEIGHTS
) -> torch.Tensor:
    """Blend with the greyscale image: ``clamp(f x + (1 - f) grey(x), 0, 1)``.

    Example:

    ```python
    >>> out = adjust_saturation(torch.rand(3, 4, 4), 0.0)      # factor 0: grey in all three channels
    >>> bool((out[0] == out[1]).all() and (out[1] == out[2]).all())
    True
    ```
    """
    factor = _per_image(factor, images)
    return (factor * images + (1 - factor) * rgb_to_grey(images, grey_weights)).clamp(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV with every channel in [0, 1] (hue as a fraction of a turn; 0 for greys), as ``colorsys``.

    Example:

    ```python
    >>> rgb_to_hsv(torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)).flatten()   # green: a third of a turn
    tensor([0.3333, 1.0000, 1.0000])
    ```
    """
    red, green, blue = images.unbind(dim=-3)
    value = images.amax(dim=-3)
    delta = value - images.amin(dim=-3)
    saturation = torch.where(value > 0, delta / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    red_c, green_c, blue_c = (value - red) / safe, (value - green) / safe, (value - blue) / safe
    hue = torch.where(
        value == red, blue_c - green_c, torch.where(value == green, 2.0 + red_c - blue_c, 4.0 + green_c - red_c)
    )
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), 0.0)
    return torch.stack([hue, saturation, value], dim=-3)


def hsv_to_rgb(images: torch.Tensor, formula: str = "sectors") -> torch.Tensor:
    """Inverse of [`rgb_to_hsv`].

    ``formula="sectors"`` computes ``colorsys``' per-sector expressions; ``"closed_form"`` computes channel
    ``n = 5, 3, 1`` (R, G, B) as ``v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``. Both are exact
    up to rounding; IIC uses the first and PiCIE the second, each keeping its own numbers.

    Example:

    ```python
    >>> hsv_to_rgb(torch.tensor([1 / 3, 1.0, 1.0]).view(3, 1, 1)).flatten()
    tensor([0., 1., 0.])
    ```
    """
    if formula == "closed_form":
        hue, saturation, value = images[..., 0:1, :, :], images[..., 1:2, :, :], images[..., 2:3, :, :]
        n = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(3, 1, 1)
        k = torch.remainder(n + hue * 6.0, 6.0)
        return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    if formula != "sectors":
        raise ValueError(f"formula must be 'sectors' or 'closed_form', got {formula!r}")
    hue, saturation, value = images.unbind(dim=-3)
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = torch.remainder(sector, 6).long()
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    # per sector 0..5: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    red = torch.stack([value, q, p, p, t, value], dim=0)
    green = torch.stack([t, value, value, q, p, p], dim=0)
    blue = torch.stack([p, p, t, value, value, q], dim=0)
    index = sector.unsqueeze(0)
    return torch.stack([c.gather(0, index)[0] for c in (red, green, blue)], dim=-3)


def adjust_hue(images: torch.Tensor, shift: Factor, formula: str = "sectors") -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) in HSV space, clamped to [0, 1]; `formula` as in
    [`hsv_to_rgb`].

    Example:

    ```python
    >>> red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    >>> adjust_hue(red, torch.tensor([1 / 3])).flatten()       # red -> green
    tensor([0., 1., 0.])
    ```
    """
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[..., 0, :, :] + _per_image(shift, images, trailing_dims=2), 1.0)
    rotated = torch.stack([hue, hsv[..., 1, :, :], hsv[..., 2, :, :]], dim=-3)
    return hsv_to_rgb(rotated, formula=formula).clamp(0.0, 1.0)


def color_jitter(
    image: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.125,
) -> torch.Tensor:
    """torchvision-style ``ColorJitter`` of one image ``[3, H, W]`` in [0, 1], drawn from `generator`.

    Draws, in this order: a random order of the four adjustments (``randperm(4)``), then for each adjustment with
    a non-zero strength its factor (float64), uniform in ``[max(0, 1 - s), 1 + s]`` (hue: shift uniform in
    ``[-s, s]``); see [`draw_color_jitter`]. Adjustments of strength 0 are skipped (no draw). Works in float (IIC
    jitters uint8 PIL images), with torchvision's greyscale weights.

    Example:

    ```python
    >>> image = torch.rand(3, 8, 8)
    >>> out = color_jitter(image, torch.Generator().manual_seed(0))
    >>> out.shape, bool(out.min() >= 0 and out.max() <= 1)
    (torch.Size([3, 8, 8]), True)
    ```
    """
    order, factors = draw_color_jitter(generator, brightness, contrast, saturation, hue)
    functions = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for index in order:
        if factors[index] is not None:
            image = functions[index](image, factors[index])
    return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` (or ``[B, C, H, W]``) with standard deviation ``sigma`` pixels,
    kernel radius ``ceil(3 sigma)``, edges replicated. ``sigma <= 0`` returns the input.

    Written as weighted sums of shifted slices: a convolution would build a new kernel plan for every radius on the
    CPU, which costs far more than the blur itself.

    Example:

    ```python
    >>> flat = torch.full((3, 6, 6), 0.4)
    >>> torch.allclose(gaussian_blur(flat, 2.0), flat)
    True
    ```
    """
    if sigma <= 0:
        return image
    squeeze = image.ndim == 3
    x = image.unsqueeze(0) if squeeze else image
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    weights = (weights / weights.sum()).tolist()
    height, width = x.shape[-2:]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = sum(weight * x[..., :, i : i + width] for i, weight in enumerate(weights))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = sum(weight * x[..., i : i + height, :] for i, weight in enumerate(weights))
    return x.squeeze(0) if squeeze else x


# --------------------------------------------------------------------------------------------------------------
# colour operations on PIL images (DINO's pipeline, torchvision's ColorJitter on PIL)


def adjust_hue_pil(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue of a PIL RGB image by `shift` turns in PIL's 8-bit HSV (as torchvision on PIL images).

    Example:

    ```python
    >>> adjust_hue_pil(Image.new("RGB", (1, 1), (255, 0, 0)), 0.5).getpixel((0, 0))[0]   # red -> cyan
    0
    ```
    """
    hue, saturation, value = image.convert("HSV").split()
    shifted = (np.asarray(hue, dtype=np.int16) + int(round(shift * 255))) % 256
    hue = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def color_jitter_pil(
    image: Image.Image,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """torchvision's ``ColorJitter`` on a PIL RGB image: factors uniform in ``[1 - b, 1 + b]`` (brightness, contrast,
    saturation; contrast blends with the mean gray level, saturation with the grayscale image) and a hue shift
    uniform in ``[-hue, hue]`` of the colour circle, applied in a random order.

    The draws are [`draw_color_jitter`]'s with every factor drawn (also for strength 0) in the default dtype.

    Example:

    ```python
    >>> out = color_jitter_pil(Image.new("RGB", (4, 4), (200, 100, 50)), generator=torch.Generator().manual_seed(0))
    >>> out.size
    (4, 4)
    ```
    """
    order, factors = draw_color_jitter(
        generator, brightness, contrast, saturation, hue, skip_disabled=False, dtype=None
    )
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for operation in order:
        factor = factors[operation]
        if operation < 3:
            image = enhancers[operation](image).enhance(factor)
        elif factor != 0.0:
            image = adjust_hue_pil(image, factor)
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image -> float32 ``[3, H, W]`` in [0, 1] (``ToTensor``).

    Example:

    ```python
    >>> pil_to_tensor(Image.new("RGB", (5, 4), (255, 0, 51)))[:, 0, 0]
    tensor([1.0000, 0.0000, 0.2000])
    ```
    """
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))) / 255.0


# --------------------------------------------------------------------------------------------------------------
# crop boxes and flips


def random_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(left, top, crop_width, crop_height)`` in a ``width x height`` image.

    Like torchvision's ``RandomResizedCrop``: up to 10 tries of an area fraction uniform in ``scale`` and an aspect
    ratio log-uniform in ``ratio``; when none fits, the largest centred box whose ratio is clamped to ``ratio``.

    Example:

    ```python
    >>> random_resized_crop_box(100, 50, (0.4, 1.0), generator=torch.Generator().manual_seed(0))
    (56, 0, 41, 50)
    ```
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot crop an empty image ({width}x{height})")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1], generator)
        aspect = math.exp(uniform(log_ratio[0], log_ratio[1], generator))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = int(round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def square_crop_box(scale: torch.Tensor, position_y: torch.Tensor, position_x: torch.Tensor) -> torch.Tensor:
    """Crops of side ``scale`` (fraction of the image side) placed at ``position`` in [0, 1) of the free margin,
    ``[B, 4]`` = (top, left, height, width) as fractions of the image, so the same box applies at every resolution.

    Example:

    ```python
    >>> square_crop_box(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.0]))
    tensor([[0.5000, 0.0000, 0.5000, 0.5000]])
    ```
    """
    return torch.stack([(1 - scale) * position_y, (1 - scale) * position_x, scale, scale], dim=1)


def resample_crops(
    tensor: torch.Tensor, boxes: torch.Tensor, flipped: torch.Tensor, output_size: tuple[int, int]
) -> torch.Tensor:
    """Per item, the crop ``boxes[b]`` (fractions (top, left, height, width), e.g. [`square_crop_box`]) resized to
    ``output_size`` by bilinear sampling, then flipped horizontally where ``flipped[b]``. Works on images and on
    feature maps alike (gradients flow to ``tensor``).

    Output pixel ``j`` of ``n`` samples the relative position ``left + width * (j + 0.5) / n`` of the input (pixel
    centres, ``align_corners=False``), which is what cropping an integer box and `F.interpolate` do when the box
    falls on pixel edges; a flip mirrors the sampling positions inside the box, so cropping commutes with
    resolution changes up to interpolation error.

    Example:

    ```python
    >>> grid = torch.arange(16.0).view(1, 1, 4, 4)
    >>> resample_crops(grid, torch.tensor([[0.0, 0.5, 0.5, 0.5]]), torch.tensor([True]), (2, 2))[0, 0]
    tensor([[3., 2.],
            [7., 6.]])
    ```
    """
    out_height, out_width = (int(v) for v in output_size)
    box = boxes.detach().to(device=tensor.device, dtype=torch.float64)
    rows = (torch.arange(out_height, device=tensor.device, dtype=torch.float64) + 0.5) / out_height
    cols = (torch.arange(out_width, device=tensor.device, dtype=torch.float64) + 0.5) / out_width
    flip = flipped.to(device=tensor.device, dtype=torch.bool)
    cols = torch.where(flip[:, None], 1.0 - cols[None], cols[None])  # [B, W_out]
    y = 2.0 * (box[:, 0:1] + box[:, 2:3] * rows[None]) - 1.0  # [B, H_out], grid_sample's [-1, 1] coordinates
    x = 2.0 * (box[:, 1:2] + box[:, 3:4] * cols) - 1.0
    grid = torch.stack([x[:, None, :].expand(-1, out_height, -1), y[:, :, None].expand(-1, -1, out_width)], dim=-1).to(
        tensor.dtype
    )
    return F.grid_sample(tensor, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------------------------
# normalisation


def _mean_std(
    reference: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = {"device": reference.device, "dtype": reference.dtype}
    return torch.tensor(mean, **kwargs).view(3, 1, 1), torch.tensor(std, **kwargs).view(3, 1, 1)


def normalize_images(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """RGB in [0, 1] ``[..., 3, H, W]`` -> normalised ``pixel_values`` ``(x - mean) / std`` (ImageNet's by default).

    Example:

    ```python
    >>> normalize_images(torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).flatten()
    tensor([0., 0., 0.])
    ```
    """
    mean_t, std_t = _mean_std(images, mean, std)
    return (images - mean_t) / std_t


def denormalize_images(
    pixel_values: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Normalised ``pixel_values`` ``[..., 3, H, W]`` -> RGB in [0, 1] (clamped); inverse of [`normalize_images`].

    Example:

    ```python
    >>> denormalize_images(torch.zeros(3, 1, 1)).flatten()
    tensor([0.4850, 0.4560, 0.4060])
    ```
    """
    mean_t, std_t = _mean_std(pixel_values, mean, std)
    return (pixel_values * std_t + mean_t).clamp(0, 1)
