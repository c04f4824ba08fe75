"""Dense CRF (METHODS 0.7): STEGO's recipe checked against pydensecrf called by hand, plus batching and the
uint8 reconstruction of normalised images."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_useg.crf import denormalize_to_uint8, dense_crf, dense_crf_batch

try:
    from pydensecrf import densecrf
except ImportError:  # the optional extra hf-useg[crf]
    densecrf = None

needs_crf = pytest.mark.skipif(densecrf is None, reason="pydensecrf not installed (pip install hf-useg[crf])")


def crf_by_hand(image_for_library: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
    """METHODS 0.7 written out against the library directly; the image is passed exactly as given."""
    num_labels = logits.shape[0]
    height, width = image_for_library.shape[:2]
    upsampled = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(upsampled, dim=0).numpy()
    unary = (-np.log(np.clip(probs, 1e-5, None))).reshape(num_labels, -1).astype(np.float32)
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image_for_library), compat=4)
    return torch.from_numpy(np.array(crf.inference(10))).reshape(num_labels, height, width)


def gradient_image(height: int = 40, width: int = 60) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 4, yy * 6, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)


def two_region_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = np.zeros((40, 60, 3), dtype=np.int64)
    image[:, :30] = (40, 90, 160)
    image[:, 30:] = (200, 150, 60)
    image = np.clip(image + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((40, 60), dtype=np.int64)
    labels[:, 30:] = 1
    return image, labels


@needs_crf
def test_marginals_shape_and_normalisation():
    g = torch.Generator().manual_seed(0)
    image = gradient_image(24, 36)
    logits = torch.randn(5, 3, 4, generator=g)
    q = dense_crf(image, logits)
    assert q.shape == (5, 24, 36) and q.dtype == torch.float32 and q.device == logits.device
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(0), torch.ones(24, 36), atol=1e-5, rtol=0)
    # numpy logits, a PIL image and a uint8 tensor give the same result
    assert torch.equal(dense_crf(Image.fromarray(image), logits.numpy()), q)
    assert torch.equal(dense_crf(torch.from_numpy(image), logits), q)


@needs_crf
def test_crf_cleans_up_a_noisy_two_region_segmentation():
    image, labels = two_region_image()
    g = torch.Generator().manual_seed(0)
    clean = F.one_hot(torch.from_numpy(labels), 2).permute(2, 0, 1).float()
    logits = clean + 1.5 * torch.randn(2, 40, 60, generator=g)
    before = (logits.argmax(0).numpy() == labels).mean()
    after = (dense_crf(image, logits).argmax(0).numpy() == labels).mean()
    # measured: 0.686 -> 0.999
    assert before < 0.75
    assert after > 0.99


@needs_crf
def test_image_reaches_the_library_in_bgr_order():
    image = gradient_image()
    logits = 0.3 * torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1))
    q = dense_crf(image, logits)
    bgr = crf_by_hand(image[:, :, ::-1], logits)
    rgb = crf_by_hand(image, logits)
    torch.testing.assert_close(q, bgr, atol=1e-6, rtol=0)
    # The channel order matters for the library (measured: up to ~0.95 here); so this test can tell them
    # apart.
    assert (q - rgb).abs().max() > 0.3


@needs_crf
def test_crf_parameters_are_passed_through():
    image = gradient_image(20, 30)
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    zero_iterations = dense_crf(image, logits, num_iterations=0)
    # no mean-field step: Q is the softmax of -unary = the clipped, renormalised probabilities
    probs = torch.softmax(F.interpolate(logits[None], size=(20, 30), mode="bilinear", align_corners=False)[0], 0)
    clipped = probs.clamp_min(1e-5)
    torch.testing.assert_close(zero_iterations, clipped / clipped.sum(0), atol=1e-6, rtol=1e-5)
    no_pairwise = dense_crf(image, logits, gaussian_compat=0, bilateral_compat=0)
    torch.testing.assert_close(no_pairwise, zero_iterations, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(dense_crf(image, logits, bilateral_srgb=30.0), dense_crf(image, logits), atol=1e-3)


def test_denormalize_truncates_known_values():
    # 255 * mean = (123.675, 116.28, 103.275); 255 * (mean + std) = (182.07, 173.4, 160.905)
    zeros = denormalize_to_uint8(torch.zeros(3, 2, 2))
    assert zeros.dtype == np.uint8 and zeros.shape == (2, 2, 3)
    assert zeros[1, 1].tolist() == [123, 116, 103]
    assert denormalize_to_uint8(torch.ones(3, 1, 1))[0, 0].tolist() == [182, 173, 160]
    # out of range saturates (STEGO's `.byte()` would wrap around modulo 256)
    assert denormalize_to_uint8(torch.full((3, 1, 1), -10.0))[0, 0].tolist() == [0, 0, 0]
    assert denormalize_to_uint8(torch.full((3, 1, 1), 10.0))[0, 0].tolist() == [255, 255, 255]
    # batch layout and numpy input; custom mean/std
    batch = denormalize_to_uint8(np.zeros((2, 3, 4, 5), dtype=np.float32))
    assert batch.shape == (2, 4, 5, 3) and (batch[..., 0] == 123).all()
    assert denormalize_to_uint8(torch.zeros(3, 1, 1), mean=(0.5,) * 3, std=(0.5,) * 3)[0, 0].tolist() == [127] * 3


def test_denormalize_of_a_normalised_image_is_the_image_or_one_less():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (3, 40, 40)).astype(np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    normalised = (torch.from_numpy(original).float() / 255 - mean) / std  # ToTensor + Normalize
    rebuilt = denormalize_to_uint8(normalised).transpose(2, 0, 1)
    diff = original.astype(np.int64) - rebuilt.astype(np.int64)
    assert set(np.unique(diff)) <= {0, 1}
    # truncation, not rounding: a visible share ends one lower (rounding would give the original everywhere)
    assert 0.05 < (diff == 1).mean() < 0.95


@needs_crf
def test_batch_equals_loop_of_singles_and_pool_equals_serial():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 24, 32, 3), dtype=np.uint8)
    images[0] = gradient_image(24, 32)
    logits = torch.randn(5, 4, 3, 4, generator=torch.Generator().manual_seed(3))
    serial = dense_crf_batch(images, logits)
    assert serial.shape == (5, 4, 24, 32)
    for i in range(5):
        assert torch.equal(serial[i], dense_crf(images[i], logits[i]))
    pooled = dense_crf_batch(list(images), logits.numpy(), num_workers=2, chunksize=2)
    torch.testing.assert_close(pooled, serial, rtol=1e-5, atol=1e-6)  # computed in other processes
    # the kept pool is reused and parameters reach the workers
    torch.testing.assert_close(
        dense_crf_batch(images, logits, num_workers=2, num_iterations=3),
        dense_crf_batch(images, logits, num_iterations=3),
        rtol=1e-5,
        atol=1e-6,
    )


def test_errors():
    image = gradient_image(8, 8)
    logits = torch.randn(3, 2, 2)
    with pytest.raises(TypeError, match="must be a uint8"):
        dense_crf(image.astype(np.float32), logits)
    with pytest.raises(ValueError, match="looks channels-first"):
        dense_crf(np.ascontiguousarray(image.transpose(2, 0, 1)[:, :, :7]), logits)
    with pytest.raises(ValueError, match=r"must be \[H, W, 3\] RGB"):
        dense_crf(image[:, :, 0], logits)
    with pytest.raises(TypeError, match="logits must be floating point"):
        dense_crf(image, logits.long())
    with pytest.raises(ValueError, match=r"logits must be \[K, h, w\]"):
        dense_crf(image, logits[0])
    with pytest.raises(ValueError, match="at least 2 classes"):
        dense_crf(image, logits[:1])
    with pytest.raises(ValueError, match="num_iterations must be an int >= 0"):
        dense_crf(image, logits, num_iterations=-1)
    with pytest.raises(ValueError, match="bilateral_srgb must be > 0"):
        dense_crf(image, logits, bilateral_srgb=0)
    images = np.stack([image, image])
    with pytest.raises(ValueError, match="got 2 images but logits for 3"):
        dense_crf_batch(images, torch.randn(3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"logits must be \[B, K, h, w\]"):
        dense_crf_batch(images, logits)
    with pytest.raises(ValueError, match="same size"):
        dense_crf_batch([image, gradient_image(8, 9)], torch.randn(2, 3, 2, 2))
    with pytest.raises(TypeError, match=r"images\[1\] must be a uint8"):
        dense_crf_batch([image, image.astype(np.int32)], torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        dense_crf_batch(images, torch.randn(2, 3, 2, 2), num_workers=-1)
    with pytest.raises(TypeError, match="unknown CRF parameter"):
        dense_crf_batch(images, torch.randn(2, 3, 2, 2), sxy=3)
    with pytest.raises(ValueError, match=r"pixel_values must be \[3, H, W\]"):
        denormalize_to_uint8(torch.zeros(1, 4, 4))
    with pytest.raises(TypeError, match="floating point"):
        denormalize_to_uint8(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match=r"install hf-useg\[crf\]"):
        dense_crf(gradient_image(8, 8), torch.randn(2, 2, 2))
