"""PiCIE loss (METHODS 2.3–2.5) against hand-computed values and an independent reference written from the
text with explicit per-pixel log-softmax loops."""

from __future__ import annotations

import math

import pytest
import torch

from hf_useg.models.picie.loss_picie import (
    PicieLossOutput,
    PicieOverclusteringLossOutput,
    overclustering_loss_weights,
    picie_cluster_weights,
    picie_loss,
    picie_loss_with_overclustering,
)

# ----------------------------------------------------------------------------------------------------------
# Reference (METHODS 2.4): ẑ = z / ||z||, s_k = <ẑ, μ_k>, ℓ = logsumexp(s) − s_y, CE = Σ w_y ℓ / Σ w_y
# ----------------------------------------------------------------------------------------------------------


def ref_ce(z, mu, y, w=None, ignore_index=-100):
    batch, _, height, width = z.shape
    num, den = 0.0, 0.0
    for b in range(batch):
        for u in range(height):
            for v in range(width):
                target = int(y[b, u, v])
                if target == ignore_index:
                    continue
                vec = z[b, :, u, v]
                vec = vec / torch.sqrt((vec * vec).sum()).clamp_min(1e-12)
                scores = (mu * vec[None, :]).sum(dim=1)  # s_k = <ẑ, μ_k>
                top = scores.detach().max()
                log_sum_exp = top + torch.log(torch.exp(scores - top).sum())
                weight = 1.0 if w is None else float(w[target])
                num = num + weight * (log_sum_exp - scores[target])
                den += weight
    return num / den


def ref_picie(z1, z2, mu1, mu2, y1, y2, w1=None, w2=None, ignore_index=-100, swap_weights=False):
    """`swap_weights=True` is the *wrong* pairing (w¹ with y² targets, w² with y¹ targets)."""
    wa, wb = (w2, w1) if swap_weights else (w1, w2)
    mu1, mu2 = mu1.detach(), mu2.detach()
    within = (ref_ce(z1, mu1, y1, wa, ignore_index) + ref_ce(z2, mu2, y2, wb, ignore_index)) / 2
    cross = (ref_ce(z1, mu2, y2, wb, ignore_index) + ref_ce(z2, mu1, y1, wa, ignore_index)) / 2
    return (within + cross) / 2, within, cross


def random_inputs(batch, channels, height, width, k, dtype=torch.float64, seed=0, ignore_fraction=0.0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, channels, height, width, generator=gen, dtype=dtype) * 3
    z2 = z1 + torch.randn(batch, channels, height, width, generator=gen, dtype=dtype)
    mu1 = torch.randn(k, channels, generator=gen, dtype=dtype)
    mu2 = torch.randn(k, channels, generator=gen, dtype=dtype) * 2
    y1 = torch.randint(0, k, (batch, height, width), generator=gen)
    y2 = torch.randint(0, k, (batch, height, width), generator=gen)
    if ignore_fraction:
        y1[torch.rand(y1.shape, generator=gen) < ignore_fraction] = -100
        y2[torch.rand(y2.shape, generator=gen) < ignore_fraction] = -100
    w1 = torch.rand(k, generator=gen, dtype=dtype) + 0.1
    w2 = torch.rand(k, generator=gen, dtype=dtype) * 5 + 0.1
    return z1, z2, mu1, mu2, y1, y2, w1, w2


# ----------------------------------------------------------------------------------------------------------
# Hand-computed
# ----------------------------------------------------------------------------------------------------------


def test_hand_computed_single_pixel():
    # z¹ = (3, 4) -> ẑ¹ = (0.6, 0.8); z² = (0, 2) -> ẑ² = (0, 1); μ¹ = I; μ² = diag(2, 0.5); y¹ = 0, y² = 1.
    # logits: ẑ¹μ¹ = (0.6, 0.8), ẑ²μ² = (0, 0.5), ẑ¹μ² = (1.2, 0.4), ẑ²μ¹ = (0, 1); softplus(x) = ln(1+eˣ)
    #   CE(z¹, μ¹, y¹=0) = ln(e^.6 + e^.8) − 0.6 = softplus(0.2)  = 0.7981388693815918
    #   CE(z², μ², y²=1) = ln(1 + e^.5) − 0.5    = softplus(−0.5) = 0.4740769841801067
    #   CE(z¹, μ², y²=1) = ln(e^1.2 + e^.4) − .4 = softplus(0.8)  = 1.1711006659477778
    #   CE(z², μ¹, y¹=0) = ln(1 + e) − 0         = softplus(1)    = 1.3132616875182228
    z1 = torch.tensor([3.0, 4.0], dtype=torch.float64).view(1, 2, 1, 1)
    z2 = torch.tensor([0.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    mu1 = torch.eye(2, dtype=torch.float64)
    mu2 = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    y1 = torch.zeros(1, 1, 1, dtype=torch.long)
    y2 = torch.ones(1, 1, 1, dtype=torch.long)
    out = picie_loss(z1, z2, mu1, mu2, y1, y2)
    assert isinstance(out, PicieLossOutput)
    assert out.within.item() == pytest.approx((0.7981388693815918 + 0.4740769841801067) / 2, rel=1e-14, abs=0)
    assert out.cross.item() == pytest.approx((1.1711006659477778 + 1.3132616875182228) / 2, rel=1e-14, abs=0)
    assert out.loss.item() == pytest.approx(0.9391445517569248, rel=1e-14, abs=0)
    # one pixel per CE: any weights cancel in the weighted mean
    out_w = picie_loss(z1, z2, mu1, mu2, y1, y2, torch.tensor([5.0, 1.0]), torch.tensor([1.0, 7.0]))
    assert out_w.loss.item() == pytest.approx(0.9391445517569248, rel=1e-14, abs=0)


def test_hand_computed_weighted_mean():
    # both views identical -> within = cross = loss = one CE. Two pixels, μ = I, w = (3, 1):
    #   pixel A: ẑ = (0.6, 0.8), y = 0 -> ℓ = softplus(0.2) = 0.7981388693815918
    #   pixel B: ẑ = (0, 1),     y = 1 -> ℓ = softplus(−1)  = 0.31326168751822286
    #   weighted mean (3 ℓ_A + 1 ℓ_B) / (3 + 1) = 0.6769195739157496 (unweighted: 0.5556902784499073)
    z = torch.tensor([[3.0, 0.0], [4.0, 2.0]], dtype=torch.float64).view(1, 2, 1, 2)
    mu = torch.eye(2, dtype=torch.float64)
    y = torch.tensor([[[0, 1]]])
    w = torch.tensor([3.0, 1.0], dtype=torch.float64)
    out = picie_loss(z, z.clone(), mu, mu.clone(), y, y.clone(), w, w.clone())
    for value in (out.loss, out.within, out.cross):
        assert value.item() == pytest.approx(0.6769195739157496, rel=1e-14, abs=0)
    unweighted = picie_loss(z, z.clone(), mu, mu.clone(), y, y.clone())
    assert unweighted.loss.item() == pytest.approx((0.7981388693815918 + 0.31326168751822286) / 2, rel=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Reference comparisons
# ----------------------------------------------------------------------------------------------------------

CONFIGS = [
    # batch, channels, h, w, K, weighted, ignore_fraction
    (1, 2, 2, 2, 2, False, 0.0),
    (2, 5, 3, 4, 3, True, 0.0),
    (2, 8, 4, 3, 6, True, 0.2),
    (3, 4, 2, 5, 27, False, 0.3),
    (1, 16, 3, 3, 10, True, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_matches_reference_with_gradients(config, dtype):
    batch, channels, height, width, k, weighted, ignore_fraction = config
    z1, z2, mu1, mu2, y1, y2, w1, w2 = random_inputs(
        batch, channels, height, width, k, seed=k, ignore_fraction=ignore_fraction
    )
    if not weighted:
        w1 = w2 = None
    z1 = z1.requires_grad_(True)
    z2 = z2.requires_grad_(True)
    ref_loss, ref_within, ref_cross = ref_picie(z1, z2, mu1, mu2, y1, y2, w1, w2)
    r1, r2 = torch.autograd.grad(ref_loss, (z1, z2))

    a1 = z1.detach().to(dtype).requires_grad_(True)
    a2 = z2.detach().to(dtype).requires_grad_(True)
    cast = (lambda t: None) if w1 is None else (lambda t: t.to(dtype))
    out = picie_loss(a1, a2, mu1.to(dtype), mu2.to(dtype), y1, y2, cast(w1), cast(w2))
    g1, g2 = torch.autograd.grad(out.loss, (a1, a2))
    assert out.loss.dtype == dtype
    tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out.loss.double(), ref_loss, **tol)
    torch.testing.assert_close(out.within.double(), ref_within, **tol)
    torch.testing.assert_close(out.cross.double(), ref_cross, **tol)
    gtol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(g1.double(), r1, **gtol)
    torch.testing.assert_close(g2.double(), r2, **gtol)
    assert r1.abs().max() > 0 and r2.abs().max() > 0


def test_weights_follow_the_labels_view():
    # y¹ and y² use different classes at different pixels and w¹ ≠ w², so pairing w¹ with y² targets
    # (the wrong way) changes every term.
    z1, z2, mu1, mu2, y1, y2, _, _ = random_inputs(2, 4, 3, 3, 3, seed=11)
    w1 = torch.tensor([10.0, 1.0, 0.2], dtype=torch.float64)
    w2 = torch.tensor([0.2, 1.0, 10.0], dtype=torch.float64)
    out = picie_loss(z1, z2, mu1, mu2, y1, y2, w1, w2)
    right = ref_picie(z1, z2, mu1, mu2, y1, y2, w1, w2)
    wrong = ref_picie(z1, z2, mu1, mu2, y1, y2, w1, w2, swap_weights=True)
    for got, expected, other in zip((out.loss, out.within, out.cross), right, wrong):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
        assert abs(got.item() - other.item()) > 1e-2


def test_weighted_vs_unweighted():
    z1, z2, mu1, mu2, y1, y2, w1, w2 = random_inputs(2, 6, 4, 4, 5, seed=5)
    plain = picie_loss(z1, z2, mu1, mu2, y1, y2)
    uniform = picie_loss(z1, z2, mu1, mu2, y1, y2, torch.full((5,), 0.3), torch.full((5,), 7.0))
    torch.testing.assert_close(uniform.loss, plain.loss, rtol=1e-12, atol=0)
    weighted = picie_loss(z1, z2, mu1, mu2, y1, y2, w1, w2)
    rescaled = picie_loss(z1, z2, mu1, mu2, y1, y2, 4 * w1, 0.5 * w2)  # weighted *mean*: scale-free
    torch.testing.assert_close(rescaled.loss, weighted.loss, rtol=1e-12, atol=0)
    assert abs(weighted.loss.item() - plain.loss.item()) > 1e-3


def test_no_gradient_to_centroids_and_they_are_untouched():
    z1, z2, mu1, mu2, y1, y2, w1, w2 = random_inputs(2, 4, 3, 3, 4, seed=2)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    mu1.requires_grad_(True)
    mu2.requires_grad_(True)
    before = (mu1.detach().clone(), mu2.detach().clone())
    out = picie_loss(z1, z2, mu1, mu2, y1, y2, w1.requires_grad_(True), w2)
    out.loss.backward()
    assert mu1.grad is None and mu2.grad is None and w1.grad is None
    assert z1.grad is not None and z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    torch.testing.assert_close(mu1.detach(), before[0], rtol=0, atol=0)
    torch.testing.assert_close(mu2.detach(), before[1], rtol=0, atol=0)


def test_features_normalised_inside_centroids_not():
    z1, z2, mu1, mu2, y1, y2, _, _ = random_inputs(2, 4, 3, 3, 4, seed=3)
    base = picie_loss(z1, z2, mu1, mu2, y1, y2).loss
    scale = torch.rand(2, 1, 3, 3, dtype=torch.float64) * 10 + 0.1  # per-pixel positive rescaling
    torch.testing.assert_close(picie_loss(z1 * scale, z2 / scale, mu1, mu2, y1, y2).loss, base, rtol=1e-12, atol=0)
    # no temperature / centroid normalisation: scaling μ changes the logits' scale and the loss
    assert abs(picie_loss(z1, z2, 3 * mu1, 3 * mu2, y1, y2).loss.item() - base.item()) > 1e-2


def test_ignore_index():
    z1, z2, mu1, mu2, y1, y2, w1, w2 = random_inputs(2, 4, 3, 4, 3, seed=9)
    y1_ignored, y2_ignored = y1.clone(), y2.clone()
    y1_ignored[0, 0] = -1
    y2_ignored[1, :, 1] = -1
    out = picie_loss(z1, z2, mu1, mu2, y1_ignored, y2_ignored, w1, w2, ignore_index=-1)
    expected = ref_picie(z1, z2, mu1, mu2, y1_ignored, y2_ignored, w1, w2, ignore_index=-1)[0]
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-13)
    assert abs(out.loss.item() - picie_loss(z1, z2, mu1, mu2, y1, y2, w1, w2).loss.item()) > 1e-4
    with pytest.raises(ValueError, match=r"cluster ids in \[0, 3\)"):
        picie_loss(z1, z2, mu1, mu2, y1_ignored, y2_ignored)  # -1 is not the default ignore_index (-100)


# ----------------------------------------------------------------------------------------------------------
# Weights and "+H"
# ----------------------------------------------------------------------------------------------------------


def test_picie_cluster_weights():
    counts = torch.tensor([1, 3, 0, 4])
    torch.testing.assert_close(picie_cluster_weights(counts), torch.tensor([1 / 8, 3 / 8, 0.0, 1 / 2]))
    # inverse counts (1, 1/3, –, 1/4) over their sum 19/12 -> (12, 4, 0, 3) / 19
    balanced = picie_cluster_weights(counts, mode="balanced")
    torch.testing.assert_close(balanced, torch.tensor([12 / 19, 4 / 19, 0.0, 3 / 19]))
    # every non-empty cluster carries the same total weight n_k w_k
    totals = (counts * balanced)[counts > 0]
    torch.testing.assert_close(totals, torch.full_like(totals, 12 / 19))
    double = picie_cluster_weights(torch.tensor([2.0, 6.0]), mode="balanced")
    assert double.dtype == torch.float32
    torch.testing.assert_close(double, torch.tensor([0.75, 0.25]))


def test_picie_cluster_weights_errors():
    with pytest.raises(ValueError, match="mode"):
        picie_cluster_weights(torch.tensor([1, 2]), mode="inverse")
    with pytest.raises(ValueError, match="non-negative"):
        picie_cluster_weights(torch.tensor([1, -2]))
    with pytest.raises(ValueError, match="all zero"):
        picie_cluster_weights(torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        picie_cluster_weights(torch.ones(2, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        picie_cluster_weights([1, 2])


def test_overclustering_loss_weights():
    w1, w2 = overclustering_loss_weights(27, 100)
    assert w1 == pytest.approx(math.log(100) / (math.log(27) + math.log(100)), rel=1e-15)
    assert w1 == pytest.approx(0.5828586, abs=1e-7) and w2 == pytest.approx(0.4171414, abs=1e-7)
    assert w1 + w2 == pytest.approx(1.0, abs=1e-15)
    assert overclustering_loss_weights(100, 27) == pytest.approx((w2, w1), rel=1e-15)
    assert overclustering_loss_weights(5, 5) == (0.5, 0.5)
    with pytest.raises(ValueError, match=">= 2"):
        overclustering_loss_weights(1, 100)
    with pytest.raises(TypeError, match="int"):
        overclustering_loss_weights(27, 100.0)


def test_picie_loss_with_overclustering():
    z1, z2, mu1, mu2, y1, y2, w1, w2 = random_inputs(2, 4, 3, 3, 3, seed=21)
    _, _, over1, over2, oy1, oy2, ow1, ow2 = random_inputs(2, 4, 3, 3, 10, seed=22)
    out = picie_loss_with_overclustering(z1, z2, mu1, mu2, y1, y2, over1, over2, oy1, oy2, w1, w2, ow1, ow2)
    assert isinstance(out, PicieOverclusteringLossOutput)
    main = picie_loss(z1, z2, mu1, mu2, y1, y2, w1, w2)
    over = picie_loss(z1, z2, over1, over2, oy1, oy2, ow1, ow2)
    a = math.log(10) / (math.log(3) + math.log(10))
    assert out.main_weight == pytest.approx(a, rel=1e-15) and out.over_weight == pytest.approx(1 - a, rel=1e-14)
    torch.testing.assert_close(out.loss, a * main.loss + (1 - a) * over.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.main.loss, main.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.over.cross, over.cross, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_errors():
    z1, z2, mu1, mu2, y1, y2, w1, w2 = random_inputs(2, 4, 3, 3, 3, seed=1)
    with pytest.raises(ValueError, match="4-D"):
        picie_loss(z1[0], z2[0], mu1, mu2, y1[0], y2[0])
    with pytest.raises(ValueError, match="same shape"):
        picie_loss(z1, z2[:, :, :2], mu1, mu2, y1, y2)
    with pytest.raises(TypeError, match="floating point"):
        picie_loss(z1.long(), z2.long(), mu1, mu2, y1, y2)
    with pytest.raises(ValueError, match=r"centroids1.*\[K, C\] with C = 4"):
        picie_loss(z1, z2, mu1[:, :3], mu2, y1, y2)
    with pytest.raises(ValueError, match="centroids1` and `centroids2"):
        picie_loss(z1, z2, mu1, torch.cat([mu2, mu2]), y1, y2)
    with pytest.raises(ValueError, match=r"labels2.*\[B, h, w\]"):
        picie_loss(z1, z2, mu1, mu2, y1, y2[:, :2])
    with pytest.raises(TypeError, match="labels1.*long"):
        picie_loss(z1, z2, mu1, mu2, y1.int(), y2)
    with pytest.raises(ValueError, match=r"labels1.*cluster ids in \[0, 3\)"):
        picie_loss(z1, z2, mu1, mu2, y1 + 3, y2)
    with pytest.raises(ValueError, match="labels2.*no pixel"):
        picie_loss(z1, z2, mu1, mu2, y1, torch.full_like(y2, -100))
    with pytest.raises(ValueError, match=r"weights1.*\[K\] = \[3\]"):
        picie_loss(z1, z2, mu1, mu2, y1, y2, torch.ones(4), w2)
    with pytest.raises(ValueError, match="weights2.*non-negative"):
        picie_loss(z1, z2, mu1, mu2, y1, y2, w1, -w2)
    with pytest.raises(TypeError, match="weights1.*floating"):
        picie_loss(z1, z2, mu1, mu2, y1, y2, torch.ones(3, dtype=torch.long), w2)
    with pytest.raises(ValueError, match="weights2.*zero total weight"):
        picie_loss(z1, z2, mu1, mu2, y1, torch.zeros_like(y2), w1, torch.tensor([0.0, 1.0, 1.0]))
