"""Dense CRF (METHODS 0.7): STEGO's recipe checked against pydensecrf called by hand, plus batching and the
uint8 reconstruction of normalised images."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_useg import crf as crf_module
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


# --- the torch backend -------------------------------------------------------------------------------------------


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Colour gradients, a few flat rectangles and pixel noise (std 3 = the bilateral kernel's colour width)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    a, b, c = rng.uniform(40, 215, 3)
    image = np.stack([a + 60 * xx, b + 60 * yy, c + 60 * (xx - yy)], axis=-1)
    for _ in range(4):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[
            top : top + rng.integers(height // 6, height // 2), left : left + rng.integers(width // 6, width // 2)
        ] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def agreement(q: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(fraction of pixels whose argmax matches, mean |dQ|)."""
    return (q.argmax(-3) == reference.argmax(-3)).float().mean().item(), (q - reference).abs().mean().item()


@needs_crf
def test_torch_backend_matches_the_reference():
    images = np.stack([photo_like(48, 64, seed) for seed in range(3)])
    logits = 2 * torch.randn(3, 6, 6, 8, generator=torch.Generator().manual_seed(4))
    reference = dense_crf_batch(images, logits)
    q = dense_crf_batch(images, logits, backend="torch")
    assert q.shape == (3, 6, 48, 64) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(1), torch.ones(3, 48, 64), atol=1e-5, rtol=0)
    # the separable Gaussian is the one approximation (measured here: 99.5% agreement, mean |dQ| 3e-4)
    argmax, mean_dq = agreement(q, reference)
    assert argmax > 0.98 and mean_dq < 2e-3
    # every kernel on the lattice, in float32: pydensecrf's filtering reproduced to float rounding
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crf_module, "_MAX_CONVOLUTION_SXY", 0.0)
        patch.setattr(crf_module, "_message_dtype", lambda device_type: torch.float32)
        exact = dense_crf_batch(images, logits, backend="torch")
    torch.testing.assert_close(exact, reference, atol=1e-4, rtol=0)
    # other parameters (a wider Gaussian on the convolution path, a wider one on a lattice, other colour widths)
    for params in ({"gaussian_sxy": 3.0, "bilateral_srgb": 13.0}, {"gaussian_sxy": 5.0, "bilateral_sxy": 20.0}):
        argmax, mean_dq = agreement(
            dense_crf_batch(images, logits, backend="torch", **params), dense_crf_batch(images, logits, **params)
        )
        assert argmax > 0.98 and mean_dq < 3e-3, params


@needs_crf
def test_torch_backend_zero_iterations_and_no_pairwise_terms():
    image = photo_like(20, 30, 5)
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    reference = dense_crf(image, logits, num_iterations=0)
    torch.testing.assert_close(dense_crf(image, logits, backend="torch", num_iterations=0), reference)
    no_pairwise = dense_crf(image, logits, backend="torch", gaussian_compat=0, bilateral_compat=0)
    torch.testing.assert_close(no_pairwise, reference, atol=1e-6, rtol=1e-5)


def test_torch_batch_equals_loop_of_singles():
    images = np.stack([photo_like(24, 32, seed) for seed in range(4)])
    images[3] = images[0]  # identical images in one batch never share lattice points
    logits = torch.randn(4, 5, 3, 4, generator=torch.Generator().manual_seed(6))
    batch = dense_crf_batch(images, logits, backend="torch")
    for i in range(4):
        torch.testing.assert_close(batch[i], dense_crf(images[i], logits[i], backend="torch"), atol=1e-6, rtol=0)
    # chunked, a list of images, a uint8 tensor: the same
    torch.testing.assert_close(dense_crf_batch(images, logits, backend="torch", chunksize=3), batch, atol=1e-6, rtol=0)
    torch.testing.assert_close(dense_crf_batch(list(images), logits, backend="torch"), batch, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        dense_crf_batch(torch.from_numpy(images), logits.numpy(), backend="torch"), batch, atol=1e-6, rtol=0
    )


def test_torch_batch_in_worker_threads_equals_loop_and_restores_the_thread_count():
    images = np.stack([photo_like(24, 32, seed) for seed in range(5)])
    logits = torch.randn(5, 4, 3, 4, generator=torch.Generator().manual_seed(9))
    singles = torch.stack([dense_crf(image, logit, backend="torch") for image, logit in zip(images, logits)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # 5 images over 3 worker threads, each single-threaded
        batch = dense_crf_batch(images, logits, backend="torch")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(batch, singles, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_torch_backend_takes_any_float_logits(dtype):
    images = np.stack([photo_like(16, 24, 7)])
    logits = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(7)).to(dtype)
    q = dense_crf_batch(images, logits, backend="torch")
    assert q.dtype == torch.float32 and q.device == logits.device
    torch.testing.assert_close(q, dense_crf_batch(images, logits.float(), backend="torch"), atol=1e-6, rtol=0)


@needs_crf
@pytest.mark.parametrize(
    "params",
    [
        {"bilateral_compat": 200.0},  # energies past exp's range: the iteration is redone with the maximum shifted
        {"gaussian_compat": -5.0},  # negative messages: always shifted
    ],
)
def test_torch_backend_extreme_compat_matches_the_reference(params):
    images = np.stack([photo_like(32, 40, seed) for seed in range(2)])
    logits = 2 * torch.randn(2, 5, 4, 5, generator=torch.Generator().manual_seed(10))
    q = dense_crf_batch(images, logits, backend="torch", **params)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2, 32, 40), atol=1e-5, rtol=0)
    argmax, mean_dq = agreement(q, dense_crf_batch(images, logits, **params))
    assert argmax > 0.98 and mean_dq < 5e-3


@needs_crf
def test_torch_backend_takes_logits_far_apart():
    # neighbouring patches' logits 200 apart: the unary's shortcut (the upsampled maximum) underflows, redone exactly
    images = np.stack([photo_like(24, 32, 11)])
    logits = torch.zeros(1, 3, 3, 4)
    logits[0, 0, :, :2] = 200.0
    logits[0, 1, :, 2:] = 200.0
    logits[0, 2, 1] = -300.0
    q = dense_crf_batch(images, logits, backend="torch", num_iterations=0)
    torch.testing.assert_close(q, dense_crf_batch(images, logits, num_iterations=0), atol=1e-6, rtol=0)
    argmax, _ = agreement(dense_crf_batch(images, logits, backend="torch"), dense_crf_batch(images, logits))
    assert argmax > 0.99


@pytest.mark.skipif(
    crf_module._message_dtype("cpu") != torch.bfloat16, reason="bfloat16 messages only on CPUs with bf16 instructions"
)
def test_bfloat16_messages_agree_with_float32():
    images = np.stack([photo_like(48, 64, seed) for seed in range(2)])
    logits = 2 * torch.randn(2, 6, 6, 8, generator=torch.Generator().manual_seed(12))
    q = dense_crf_batch(images, logits, backend="torch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crf_module, "_message_dtype", lambda device_type: torch.float32)
        exact = dense_crf_batch(images, logits, backend="torch")
    argmax, mean_dq = agreement(q, exact)
    assert argmax > 0.995 and mean_dq < 5e-4


def test_torch_backend_gpu_code_path_on_cpu():
    # what differs on a GPU, run here: torch's searchsorted, float32 messages, the per-pixel maximum before exp,
    # the whole batch in one pass
    images = np.stack([photo_like(40, 56, seed) for seed in range(3)])
    logits = 2 * torch.randn(3, 5, 5, 7, generator=torch.Generator().manual_seed(13))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crf_module, "_message_dtype", lambda device_type: torch.float32)
        cpu_path = dense_crf_batch(images, logits, backend="torch")
        patch.setattr(crf_module, "_search_sorted", torch.searchsorted)
        patch.setattr(crf_module, "_exp_without_maximum", lambda device_type: False)
        gpu_path = dense_crf_batch(images, logits, backend="torch", chunksize=3)
    torch.testing.assert_close(gpu_path, cpu_path, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda():
    images = np.stack([photo_like(40, 56, seed) for seed in range(2)])
    logits = torch.randn(2, 5, 5, 7, generator=torch.Generator().manual_seed(8))
    on_cpu = dense_crf_batch(images, logits, backend="torch")
    q = dense_crf_batch(torch.from_numpy(images).cuda(), logits.cuda().half(), backend="torch")
    assert q.device.type == "cuda" and q.dtype == torch.float32
    with pytest.MonkeyPatch.context() as patch:  # float32 messages on the CPU too, as on CUDA
        patch.setattr(crf_module, "_message_dtype", lambda device_type: torch.float32)
        reference = dense_crf_batch(images, logits.half().float(), backend="torch")
    argmax, mean_dq = agreement(q.cpu(), reference)
    assert argmax > 0.999 and mean_dq < 1e-4
    assert dense_crf(images[0], logits[0].cuda(), backend="torch").device.type == "cuda"
    assert on_cpu.device.type == "cpu"


def test_torch_backend_errors():
    image = photo_like(8, 8, 0)
    images = np.stack([image, image])
    logits = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_crf(image, logits[0], backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_crf_batch(images, logits, backend="densecrf")
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\] RGB, got shape \(2, 8, 8, 4\)"):
        dense_crf_batch(np.concatenate([images, images[..., :1]], -1), logits, backend="torch")
    with pytest.raises(ValueError, match="looks channels-first"):
        dense_crf_batch(torch.from_numpy(images).permute(0, 3, 1, 2), logits, backend="torch")
    with pytest.raises(TypeError, match="images must be a uint8"):
        dense_crf_batch(torch.from_numpy(images).float(), logits, backend="torch")
    with pytest.raises(ValueError, match="got 2 images but logits for 3"):
        dense_crf_batch(images, torch.randn(3, 3, 2, 2), backend="torch")
    with pytest.raises(ValueError, match="same size"):
        dense_crf_batch([image, photo_like(8, 9, 0)], logits, backend="torch")
    with pytest.raises(ValueError, match="num_workers is for the pydensecrf backend"):
        dense_crf_batch(images, logits, backend="torch", num_workers=2)
    with pytest.raises(ValueError, match="chunksize must be an int >= 1"):
        dense_crf_batch(images, logits, backend="torch", chunksize=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dense_crf(image, logits[0, :1], backend="torch")
    with pytest.raises(ValueError, match=r"logits must be \[B, K, h, w\]"):
        dense_crf_batch(images, logits[0], backend="torch")
    with pytest.raises(TypeError, match="logits must be floating point"):
        dense_crf_batch(images, logits.to(torch.int64), backend="torch")
    with pytest.raises(TypeError, match="image must be a uint8"):
        dense_crf(image.astype(np.float32), logits[0], backend="torch")
