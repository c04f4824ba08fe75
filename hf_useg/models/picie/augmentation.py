"""PiCIE's views (METHODS 2.2) in plain torch: photometric changes P1/P2 and the geometric transform G (random
resized crop + horizontal flip), with every random choice drawn per image per epoch up front so that the clustering
passes and the training pass of an epoch see the same views, and a resumed run sees the same ones again.

View 1 is ``G(P1(x))`` (an image), view 2 is ``P2(x)``; its *features* get ``G`` (``z2 = G(f(P2(x)))``), so both
views' features share one pixel grid.

Example:

```python
>>> import torch
>>> from hf_useg.models.picie.augmentation import draw_view_parameters, make_picie_views
>>> params = draw_view_parameters(4, seed=0, epoch=0)
>>> images = torch.rand(4, 3, 64, 64)                      # RGB in [0, 1], the base crop
>>> view1, view2 = make_picie_views(images, params, resolution=32)
>>> view1.shape, view2.shape                               # ImageNet-normalised network inputs
(torch.Size([4, 3, 32, 32]), torch.Size([4, 3, 32, 32]))
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...augmentation import (
    PIL_GREY_WEIGHTS,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    denormalize_images,
    gaussian_blur,
    normalize_images,
    resample_crops,
    rgb_to_grey,
    square_crop_box,
)
from ...augmentation import adjust_hue as _adjust_hue

__all__ = [
    "PHOTOMETRIC_COLUMNS",
    "GEOMETRIC_COLUMNS",
    "PicieViewParameters",
    "adjust_hue",
    "apply_geometric",
    "crop_box",
    "apply_photometric",
    "denormalize_images",
    "draw_view_parameters",
    "gaussian_blur",
    "make_picie_views",
    "normalize_images",
    "rgb_to_grey",
]

PHOTOMETRIC_COLUMNS = ("brightness", "contrast", "saturation", "hue", "greyscale", "blur_radius")
GEOMETRIC_COLUMNS = ("crop_scale", "crop_top", "crop_left", "flip")


@dataclass
class PicieViewParameters:
    """The random choices of one epoch's views, one row per image (float64, on the CPU).

    Args:
        photometric1 (`torch.Tensor` of shape `[N, 6]`):
            P1: brightness, contrast and saturation factors (1 = unchanged), hue shift (0 = unchanged, fraction of
            the hue circle), greyscale (0/1), blur standard deviation in pixels (0 = no blur); see
            `PHOTOMETRIC_COLUMNS`.
        photometric2 (`torch.Tensor` of shape `[N, 6]`):
            P2, same columns.
        geometric (`torch.Tensor` of shape `[N, 4]`):
            G: crop side relative to the image, vertical and horizontal position of the crop in [0, 1) (fraction of
            the free margin), horizontal flip (0/1); see `GEOMETRIC_COLUMNS`.
    """

    photometric1: torch.Tensor
    photometric2: torch.Tensor
    geometric: torch.Tensor

    def __len__(self) -> int:
        return self.geometric.shape[0]

    def select(self, indices: Any) -> PicieViewParameters:
        """The rows of the given images (any index a tensor accepts)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return PicieViewParameters(self.photometric1[indices], self.photometric2[indices], self.geometric[indices])


def _option(options: Any, name: str) -> Any:
    """An augmentation setting of the PiCIE recipe's options (`PicieTrainingOptions`; its defaults, the paper's
    values, when ``options`` is None)."""
    if options is None:
        from .training_picie import PicieTrainingOptions  # (the recipe module imports this one)

        options = PicieTrainingOptions()
    return getattr(options, name)


def _view_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 104_729 + 97) % (2**63 - 1)


def draw_view_parameters(num_images: int, *, seed: int, epoch: int, options: Any = None) -> PicieViewParameters:
    """Draw the views of every image for one epoch (METHODS 2.2).

    Row ``i`` depends only on ``(seed, epoch, i)`` (a CPU generator seeded from ``seed`` and ``epoch`` fills the
    rows in order), so the clustering passes, the training pass and a resumed run all get the same views.

    P1 and P2 are independent. Each of brightness, contrast, saturation (factor ~ U(max(0, 1 - x), 1 + x)) and hue
    (shift ~ U(-x, x)) is applied with probability `color_jitter_probability`, greyscale with
    `greyscale_probability`, Gaussian blur (std ~ U(`blur_radius_min`, `blur_radius_max`)) with
    `blur_probability`. G: crop side ~ U(`crop_scale_min`, `crop_scale_max`) of the image side at a uniform
    position, then a horizontal flip with `flip_probability`.

    With ``options.released_augmentation`` the released code's behaviour replaces the paper's: no greyscale, and the
    blur std is ``|m (u - p) + min|`` with the blur coin ``u < p`` and ``m = (max - min) / (1 - p)``.

    Args:
        num_images (`int`): images in the training set.
        seed (`int`), epoch (`int`): the run's seed and the epoch.
        options ([`PicieTrainingOptions`], *optional*): the recipe options the augmentation settings are read
            from; the paper's defaults when omitted.

    Example:

    ```python
    >>> a = draw_view_parameters(10, seed=0, epoch=3)
    >>> b = draw_view_parameters(20, seed=0, epoch=3)
    >>> bool((a.geometric == b.geometric[:10]).all())
    True
    ```
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    generator = torch.Generator().manual_seed(_view_seed(seed, epoch))
    # 11 uniforms per photometric view + 4 for G, drawn row by row
    uniforms = torch.rand(num_images, 26, generator=generator, dtype=torch.float64)
    released = bool(_option(options, "released_augmentation"))
    p_jitter = float(_option(options, "color_jitter_probability"))

    def photometric(u: torch.Tensor) -> torch.Tensor:
        columns = []
        for offset, name in ((0, "brightness"), (2, "contrast"), (4, "saturation")):
            x = float(_option(options, name))
            low, high = max(0.0, 1.0 - x), 1.0 + x
            factor = low + (high - low) * u[:, offset + 1]
            columns.append(torch.where(u[:, offset] < p_jitter, factor, torch.ones_like(factor)))
        hue = float(_option(options, "hue"))
        shift = -hue + 2 * hue * u[:, 7]
        columns.append(torch.where(u[:, 6] < p_jitter, shift, torch.zeros_like(shift)))
        grey = (u[:, 8] < float(_option(options, "greyscale_probability"))).to(torch.float64)
        columns.append(torch.zeros_like(grey) if released else grey)
        p_blur = float(_option(options, "blur_probability"))
        low, high = float(_option(options, "blur_radius_min")), float(_option(options, "blur_radius_max"))
        coin = u[:, 9]
        if released:
            # the released code reuses the blur coin u < p for the radius: r = m (u - p) + min, and PIL's blur only
            # sees r² (a negative radius blurs like |r|)
            radius = ((high - low) / (1.0 - p_blur) * (coin - p_blur) + low).abs()
        else:
            radius = low + (high - low) * u[:, 10]
        columns.append(torch.where(coin < p_blur, radius, torch.zeros_like(radius)))
        return torch.stack(columns, dim=1)

    smin, smax = float(_option(options, "crop_scale_min")), float(_option(options, "crop_scale_max"))
    g = uniforms[:, 22:]
    geometric = torch.stack(
        [
            smin + (smax - smin) * g[:, 0],
            g[:, 1],
            g[:, 2],
            (g[:, 3] < float(_option(options, "flip_probability"))).to(torch.float64),
        ],
        dim=1,
    )
    return PicieViewParameters(photometric(uniforms[:, :11]), photometric(uniforms[:, 11:22]), geometric)


# --------------------------------------------------------------------------------------------------------------
# photometric transform P (the operations are hf_useg.augmentation's)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``shift[b]`` (fraction of the circle) in HSV space: PiCIE's numbers,
    [`hf_useg.augmentation.adjust_hue`] with the closed-form HSV -> RGB.

    Example:

    ```python
    >>> images = torch.rand(2, 3, 4, 4)
    >>> bool(torch.allclose(adjust_hue(images, torch.zeros(2)), images, atol=1e-6))    # no shift, same image
    True
    ```
    """
    return _adjust_hue(images, shift, formula="closed_form")


def _where(mask: torch.Tensor, changed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), changed, images)


def apply_photometric(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply P (rows of `PicieViewParameters.photometric1/2`) to RGB images in [0, 1], in the released order:
    brightness, contrast, saturation, hue, greyscale, blur; the result is clamped to [0, 1] after each colour step.
    An image whose parameter is the identity (factor 1, shift 0, no grey, radius 0) is left bit-for-bit unchanged
    by that step.

    * brightness f: ``x f``; contrast f: ``f x + (1 - f) mean(grey(x))``; saturation f: ``f x + (1 - f) grey(x)``;
      hue: shift in HSV; greyscale: ``grey(x)`` in all three channels; blur: [`gaussian_blur`].

    Args:
        images (`torch.Tensor` of shape `[B, 3, H, W]`): RGB in [0, 1].
        params (`torch.Tensor` of shape `[B, 6]`): see `PHOTOMETRIC_COLUMNS`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be RGB [B, 3, H, W], got shape {tuple(images.shape)}")
    if params.shape != (images.shape[0], len(PHOTOMETRIC_COLUMNS)):
        raise ValueError(f"params must be [{images.shape[0]}, {len(PHOTOMETRIC_COLUMNS)}], got {tuple(params.shape)}")
    params = params.to(images.device)
    brightness = params[:, 0] != 1
    if brightness.any():
        images = _where(brightness, adjust_brightness(images, params[:, 0]), images)
    contrast = params[:, 1] != 1
    if contrast.any():
        images = _where(contrast, adjust_contrast(images, params[:, 1], PIL_GREY_WEIGHTS), images)
    saturation = params[:, 2] != 1
    if saturation.any():
        images = _where(saturation, adjust_saturation(images, params[:, 2], PIL_GREY_WEIGHTS), images)
    hue = params[:, 3] != 0
    if hue.any():
        images = _where(hue, adjust_hue(images, params[:, 3]), images)
    greyscale = params[:, 4] != 0
    if greyscale.any():
        images = _where(greyscale, rgb_to_grey(images, PIL_GREY_WEIGHTS).expand_as(images), images)
    blur = params[:, 5] > 0
    if blur.any():
        images = torch.stack(
            [gaussian_blur(image, float(radius)) for image, radius in zip(images, params[:, 5].tolist())]
        )
    return images


# --------------------------------------------------------------------------------------------------------------
# geometric transform (applied to images and to feature maps alike)


def crop_box(params: torch.Tensor) -> torch.Tensor:
    """G's crop as fractions of the image, ``[B, 4]`` = (top, left, height, width): side ``scale``, offset
    ``(1 - scale) * position`` ([`hf_useg.augmentation.square_crop_box`]). The same box applies at every resolution
    (image, feature map)."""
    return square_crop_box(params[:, 0], params[:, 1], params[:, 2])


def apply_geometric(tensor: torch.Tensor, params: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """G: per item, the crop [`crop_box`] resized to ``output_size`` by bilinear sampling, then a horizontal flip
    when ``params[b, 3]`` is 1 ([`hf_useg.augmentation.resample_crops`]). Works on images and on feature maps alike
    (gradients flow to ``tensor``).

    The released code instead rounds an integer box separately at each resolution, so an image and its feature map
    get crops that differ by up to half a feature pixel; with the continuous box used here G commutes with
    downsampling up to interpolation error (METHODS 2.2: f(G(x)) ≈ G(f(x))).

    Args:
        tensor (`torch.Tensor` of shape `[B, C, H, W]`).
        params (`torch.Tensor` of shape `[B, 4]`): rows of `PicieViewParameters.geometric`.
        output_size (`tuple[int, int]`).
    """
    if tensor.ndim != 4:
        raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(tensor.shape)}")
    if params.ndim != 2 or params.shape != (tensor.shape[0], len(GEOMETRIC_COLUMNS)):
        raise ValueError(f"params must be [{tensor.shape[0]}, {len(GEOMETRIC_COLUMNS)}], got {tuple(params.shape)}")
    box = crop_box(params.detach().to(device=tensor.device, dtype=torch.float64))
    return resample_crops(tensor, box, params[:, 3] != 0, output_size)


# --------------------------------------------------------------------------------------------------------------
# the two views


def make_picie_views(
    images: torch.Tensor,
    params: PicieViewParameters,
    resolution: int,
    *,
    photometric_view1: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two network inputs of PiCIE (METHODS 2.2), ImageNet-normalised, ``[B, 3, resolution, resolution]``.

    * view 1 = ``G(P1(x))``: the crop of G is cut from the base image and resized to ``resolution``;
    * view 2 = ``P2(x)`` resized to ``resolution`` (bilinear with antialiasing, like PIL); G is applied to its
      *features* later (`apply_geometric` on the feature map).

    Args:
        images (`torch.Tensor` of shape `[B, 3, S, S]`): the base crops, RGB in [0, 1] (S = PiCIE's res2).
        params ([`PicieViewParameters`]): the rows of these images.
        resolution (`int`): side of the network inputs (PiCIE's res1).
        photometric_view1 (`bool`, *optional*, defaults to `True`): `False` leaves out P1 (the released code's
            training pass, see `PicieConfig.released_augmentation`).
    """
    if len(params) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but view parameters for {len(params)}")
    view1 = apply_photometric(images, params.photometric1) if photometric_view1 else images
    view1 = apply_geometric(view1, params.geometric, (resolution, resolution))
    view2 = apply_photometric(images, params.photometric2)
    if tuple(view2.shape[-2:]) != (resolution, resolution):
        view2 = F.interpolate(
            view2, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return normalize_images(view1), normalize_images(view2)
