"""Tests of the shared augmentation module (`hf_useg.augmentation`): torch colour ops by hand, per-image factor
tensors against python floats, HSV round trips, crop/flip geometry, the PIL jitter's draws, normalisation."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from hf_useg import augmentation as aug
from hf_useg.augmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIL_GREY_WEIGHTS,
    TORCHVISION_GREY_WEIGHTS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    color_jitter_pil,
    denormalize_images,
    draw_color_jitter,
    gaussian_blur,
    hsv_to_rgb,
    normalize_images,
    pil_to_tensor,
    resample_crops,
    rgb_to_grey,
    rgb_to_hsv,
    square_crop_box,
)


def test_imagenet_statistics_are_defined_once():
    assert list(IMAGENET_MEAN) == list(IMAGENET_DEFAULT_MEAN) and list(IMAGENET_STD) == list(IMAGENET_DEFAULT_STD)
    from hf_useg import crf
    from hf_useg.models.dino import multicrop
    from hf_useg.models.iic import configuration_iic

    for module in (crf, multicrop, configuration_iic):
        assert module.IMAGENET_MEAN is IMAGENET_MEAN and module.IMAGENET_STD is IMAGENET_STD


def test_colour_adjustments_by_hand():
    image = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(adjust_brightness(image, 1.5).flatten(), torch.tensor([0.3, 0.6, 0.9]).double())
    torch.testing.assert_close(adjust_brightness(image, 2.0).flatten(), torch.tensor([0.4, 0.8, 1.0]).double())
    grey_tv = 0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6  # 0.36298
    grey_pil = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
    torch.testing.assert_close(rgb_to_grey(image).item(), grey_pil)
    torch.testing.assert_close(rgb_to_grey(image, TORCHVISION_GREY_WEIGHTS).item(), grey_tv)
    expected = 0.5 * torch.tensor([0.2, 0.4, 0.6]).double() + 0.5 * grey_tv
    torch.testing.assert_close(adjust_saturation(image, 0.5).flatten(), expected)
    # one pixel: its mean grey level is its grey level, so contrast blends like saturation
    torch.testing.assert_close(adjust_contrast(image, 0.5).flatten(), expected)
    expected_pil = 0.5 * torch.tensor([0.2, 0.4, 0.6]).double() + 0.5 * grey_pil
    torch.testing.assert_close(adjust_contrast(image, 0.5, PIL_GREY_WEIGHTS).flatten(), expected_pil)
    # hue: (0.2, 0.4, 0.6) is hue 7/12; half a turn gives hue 1/12 = (0.6, 0.4, 0.2)
    for formula in ("sectors", "closed_form"):
        torch.testing.assert_close(
            adjust_hue(image, 0.5, formula=formula).flatten(), torch.tensor([0.6, 0.4, 0.2]).double()
        )


def test_rgb_hsv_round_trip_and_colorsys():
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    pixels[0, :, 0, 0] = 0.5  # grey
    pixels[0, :, 0, 1] = 0.0  # black
    pixels[0, :, 0, 2] = torch.tensor([0.8, 0.8, 0.2], dtype=torch.float64)  # red == green is the maximum
    hsv = rgb_to_hsv(pixels)
    for y in range(6):
        for x in range(5):
            expected = colorsys.rgb_to_hsv(*pixels[1, :, y, x].tolist())
            torch.testing.assert_close(hsv[1, :, y, x], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(hsv_to_rgb(hsv), pixels)
    torch.testing.assert_close(hsv_to_rgb(hsv, formula="closed_form"), pixels)
    with pytest.raises(ValueError, match="formula"):
        hsv_to_rgb(hsv, formula="lut")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_two_hsv_formulas_agree_to_rounding(dtype):
    hsv = rgb_to_hsv(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=dtype))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(hsv_to_rgb(hsv), hsv_to_rgb(hsv, formula="closed_form"), rtol=0, atol=8 * eps)


def test_per_image_factor_tensors_match_python_floats():
    # float64, so that `1 - f` is the same number whether f is a python float or a tensor element
    images = torch.rand(4, 3, 8, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    factors = [0.0, 0.55, 1.0, 1.4]
    shifts = [-0.5, -0.1, 0.0, 0.3]
    cases = [
        (adjust_brightness, factors, {}),
        (adjust_contrast, factors, {}),
        (adjust_contrast, factors, {"grey_weights": PIL_GREY_WEIGHTS}),
        (adjust_saturation, factors, {}),
        (adjust_hue, shifts, {}),
        (adjust_hue, shifts, {"formula": "closed_form"}),
    ]
    for function, values, kwargs in cases:
        batched = function(images, torch.tensor(values, dtype=torch.float64), **kwargs)
        one_by_one = torch.stack([function(image, value, **kwargs) for image, value in zip(images, values)])
        assert torch.equal(batched, one_by_one), (function.__name__, kwargs)
    # a 0-dim tensor acts as one factor for everything
    torch.testing.assert_close(adjust_brightness(images, torch.tensor(0.5)), adjust_brightness(images, 0.5))


def test_color_jitter_replays_draw_color_jitter():
    image = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(3))
    out = color_jitter(image, torch.Generator().manual_seed(5), 0.4, 0.0, 0.2, 0.1)
    generator = torch.Generator().manual_seed(5)
    order, factors = draw_color_jitter(generator, 0.4, 0.0, 0.2, 0.1)
    assert factors[1] is None and all(f is not None for i, f in enumerate(factors) if i != 1)
    assert 0.6 <= factors[0] <= 1.4 and 0.8 <= factors[2] <= 1.2 and -0.1 <= factors[3] <= 0.1
    expected = image
    for index in order:
        if factors[index] is not None:
            expected = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)[index](
                expected, factors[index]
            )
    assert torch.equal(out, expected)
    # the skipped contrast drew nothing: randperm + 3 float64 draws
    replay = torch.Generator().manual_seed(5)
    torch.randperm(4, generator=replay)
    torch.rand(3, generator=replay, dtype=torch.float64)
    assert torch.equal(generator.get_state(), replay.get_state())


def test_pil_jitter_shares_the_draws_and_matches_the_torch_operations():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(4)
    out = color_jitter_pil(image, 0.4, 0.4, 0.2, 0.1, generator=generator)
    # same draw order as the torch jitter, every factor drawn, in the default dtype
    replay = torch.Generator().manual_seed(4)
    order, factors = draw_color_jitter(replay, 0.4, 0.4, 0.2, 0.1, skip_disabled=False, dtype=None)
    assert torch.equal(generator.get_state(), replay.get_state())
    expected = image
    for index in order:
        if index == 3:
            expected = aug.adjust_hue_pil(expected, factors[3])
        else:
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[index]
            expected = enhancer(expected).enhance(factors[index])
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    # the PIL operations are the torch ones up to uint8 rounding
    x = pil_to_tensor(image)
    brightened = pil_to_tensor(ImageEnhance.Brightness(image).enhance(1.3))
    torch.testing.assert_close(brightened, adjust_brightness(x, 1.3), rtol=0, atol=1 / 255)
    desaturated = pil_to_tensor(ImageEnhance.Color(image).enhance(0.6))
    torch.testing.assert_close(desaturated, adjust_saturation(x, 0.6, PIL_GREY_WEIGHTS), rtol=0, atol=2 / 255)


def test_square_crop_box_and_flip_geometry():
    params = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.3, 0.7], [0.25, 0.5, 0.5]], dtype=torch.float64)
    boxes = square_crop_box(params[:, 0], params[:, 1], params[:, 2])
    expected = torch.tensor([[0.5, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.375, 0.375, 0.25, 0.25]]).double()
    torch.testing.assert_close(boxes, expected)

    grid = torch.arange(64.0).view(1, 1, 8, 8).expand(3, 1, 8, 8)
    not_flipped = torch.zeros(3, dtype=torch.bool)
    flipped = torch.ones(3, dtype=torch.bool)
    # boxes on pixel edges at the crop's own size: exact slices (bottom-left quarter, whole image, centre 2x2)
    crops = resample_crops(grid[:1], boxes[:1], not_flipped[:1], (4, 4))
    assert torch.equal(crops[0, 0], grid[0, 0, 4:, :4])
    assert torch.equal(resample_crops(grid[:1], boxes[1:2], not_flipped[:1], (8, 8))[0], grid[0])
    assert torch.equal(resample_crops(grid[:1], boxes[2:], not_flipped[:1], (2, 2))[0, 0], grid[0, 0, 3:5, 3:5])
    # a flip mirrors the crop, whatever the box
    for size in ((4, 4), (3, 5)):
        torch.testing.assert_close(
            resample_crops(grid, boxes, flipped, size), resample_crops(grid, boxes, not_flipped, size).flip(-1)
        )
    # mixed flags flip only their items
    mixed = torch.tensor([True, False, True])
    out = resample_crops(grid, boxes, mixed, (4, 4))
    reference = resample_crops(grid, boxes, not_flipped, (4, 4))
    torch.testing.assert_close(out[1], reference[1])
    torch.testing.assert_close(out[0], reference[0].flip(-1))
    # the same box on a half-resolution copy gives the half-resolution crop (G commutes with downsampling)
    smooth = torch.linspace(0, 1, 16).view(1, 1, 1, 16) + torch.linspace(0, 1, 16).view(1, 1, 16, 1)
    box = square_crop_box(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([1.0]))
    full = resample_crops(smooth, box, torch.tensor([True]), (4, 4))
    half = resample_crops(F.avg_pool2d(smooth, 2), box, torch.tensor([True]), (4, 4))
    torch.testing.assert_close(full, half, rtol=0, atol=1e-6)


def test_resample_crops_passes_gradients():
    features = torch.rand(2, 4, 6, 6, requires_grad=True)
    boxes = square_crop_box(torch.tensor([0.5, 0.8]), torch.tensor([0.1, 0.9]), torch.tensor([0.4, 0.2]))
    resample_crops(features, boxes, torch.tensor([True, False]), (3, 3)).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_normalisation_round_trip_and_pil_to_tensor():
    image = Image.fromarray(np.array([[[255, 0, 51], [128, 64, 32]]], dtype=np.uint8))
    x = pil_to_tensor(image)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 2)
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([128, 64, 32]) / 255.0)
    normalised = normalize_images(x)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalised, (x - mean) / std)
    torch.testing.assert_close(denormalize_images(normalised), x)
    batch = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(
        denormalize_images(normalize_images(batch, (0.5,) * 3, (0.2,) * 3), (0.5,) * 3, (0.2,) * 3), batch
    )
    assert denormalize_images(torch.full((3, 1, 1), 100.0)).max() == 1.0  # clamped


def test_gaussian_blur_batched_equals_per_image():
    images = torch.rand(3, 3, 10, 12, generator=torch.Generator().manual_seed(6))
    batched = gaussian_blur(images, 1.1)
    assert torch.equal(batched, torch.stack([gaussian_blur(image, 1.1) for image in images]))
    torch.testing.assert_close(batched.mean(dim=(-2, -1)), images.mean(dim=(-2, -1)), rtol=0, atol=0.05)
