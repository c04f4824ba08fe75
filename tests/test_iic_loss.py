"""IIC segmentation loss (METHODS 3.1) against an independent reference written from the text: explicit
Python loops over displacements with slicing (no conv), an explicit bilinear sampler (no grid_sample), and
hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_useg.models.iic.loss_iic import IIC_EPS, _displacement_joints, iic_segmentation_loss

EPS = 2.220446049250313e-16  # float64 machine epsilon, written out


# ----------------------------------------------------------------------------------------------------------
# Reference implementation (from the METHODS 3.1 text)
# ----------------------------------------------------------------------------------------------------------


def ref_affine_resample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear, zero padding, align_corners=False: output pixel (u, v) has normalised centre
    (X, Y) = ((2v+1)/W − 1, (2u+1)/H − 1); it reads the input at theta @ (X, Y, 1), i.e. at pixel coordinates
    px = ((x_s + 1) W − 1)/2, py = ((y_s + 1) H − 1)/2."""
    batch_size, _, height, width = x.shape
    ys = (2 * torch.arange(height, dtype=x.dtype) + 1) / height - 1
    xs = (2 * torch.arange(width, dtype=x.dtype) + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    outputs = []
    for b in range(batch_size):
        a = theta[b].to(x.dtype)
        src_x = a[0, 0] * grid_x + a[0, 1] * grid_y + a[0, 2]
        src_y = a[1, 0] * grid_x + a[1, 1] * grid_y + a[1, 2]
        px = ((src_x + 1) * width - 1) / 2
        py = ((src_y + 1) * height - 1) / 2
        x0, y0 = torch.floor(px), torch.floor(py)
        out = torch.zeros_like(x[b])
        for cx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            for cy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
                cxi = cx.clamp(0, width - 1).long()
                cyi = cy.clamp(0, height - 1).long()
                out = out + x[b][:, cyi, cxi] * (wx * wy * inside)
        outputs.append(out)
    return torch.stack(outputs)


def ref_joint(x1: torch.Tensor, x2: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """P̃_t(i, j) = Σ_b Σ_{u,v} x1[b, i, u+dy, v+dx] · x2[b, j, u, v] over the (u, v) where both exist."""
    _, _, height, width = x1.shape
    u0, u1 = max(0, -dy), min(height, height - dy)
    v0, v1 = max(0, -dx), min(width, width - dx)
    k = x1.shape[1]
    if u0 >= u1 or v0 >= v1:
        return x1.new_zeros(k, k)
    a = x1[:, :, u0 + dy : u1 + dy, v0 + dx : v1 + dx]
    b = x2[:, :, u0:u1, v0:v1]
    return (a[:, :, None] * b[:, None, :]).sum(dim=(0, 3, 4))


def ref_information(p: torch.Tensor, lamb: float) -> torch.Tensor:
    p = (p + p.t()) / 2
    p_i = p.sum(dim=1)
    p_j = p.sum(dim=0)
    p = torch.where(p < EPS, torch.full_like(p, EPS), p)
    p_i = torch.where(p_i < EPS, torch.full_like(p_i, EPS), p_i)
    p_j = torch.where(p_j < EPS, torch.full_like(p_j, EPS), p_j)
    return (p * (torch.log(p) - lamb * torch.log(p_i)[:, None] - lamb * torch.log(p_j)[None, :])).sum()


def ref_loss(x1, x2, theta=None, mask=None, T=0, lamb=1.0, uncollapsed=True, differentiate_norm=None):
    """`differentiate_norm` None = as specified (uncollapsed: yes, condensed: no); True/False forces it."""
    if differentiate_norm is None:
        differentiate_norm = uncollapsed
    if theta is not None:
        x2 = ref_affine_resample(x2, theta)
    if mask is not None:
        m = mask.to(x1.dtype)[:, None]
        x1, x2 = x1 * m, x2 * m
    joints = [ref_joint(x1, x2, dy, dx) for dy in range(-T, T + 1) for dx in range(-T, T + 1)]

    def normalise(p):
        norm = p.sum()
        return p / (norm if differentiate_norm else float(norm.detach()))

    if uncollapsed:
        info = [ref_information(normalise(p), lamb) for p in joints]
        return -sum(info) / len(info)
    return -ref_information(normalise(sum(joints)), lamb)


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------

HFLIP = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def general_affine(angle: float, scale: float, tx: float, ty: float, flip: bool = False) -> list[list[float]]:
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    f = -1.0 if flip else 1.0
    return [[f * c, -s, tx], [f * s, c, ty]]


# name, B, K, H, W, T, lamb, affine (None | matrix for all | "random"), mask
CASES = [
    ("identity-none", 2, 3, 6, 6, 0, 1.0, None, False),
    ("hflip-mask-T1-lamb1.5", 2, 5, 7, 8, 1, 1.5, HFLIP, True),
    ("affine-mask-T3", 2, 7, 9, 9, 3, 1.0, general_affine(0.3, 0.8, 0.1, -0.15), True),
    ("affine-T3-K15-lamb1.5", 3, 15, 8, 10, 3, 1.5, general_affine(-0.2, 1.1, -0.05, 0.2, flip=True), False),
    ("identity-matrix-mask-T10", 2, 4, 12, 12, 10, 1.0, IDENTITY, True),
    ("hflip-T0-K10-lamb1.5", 2, 10, 5, 6, 0, 1.5, HFLIP, False),
    ("per-sample-affines-boolmask-T1", 3, 3, 6, 7, 1, 1.0, "random", True),
]


def make_inputs(case, dtype, seed=0):
    _, batch, k, height, width, _, _, affine, use_mask = case
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, height, width, generator=gen, dtype=torch.float64) * 2
    x1 = logits.softmax(dim=1)
    x2 = (logits + torch.randn(logits.shape, generator=gen, dtype=torch.float64)).softmax(dim=1)
    theta = None
    if affine == "random":
        theta = torch.stack(
            [
                torch.tensor(general_affine(0.4 * b - 0.3, 0.9 + 0.1 * b, 0.05 * b, -0.1, flip=b % 2 == 1))
                for b in range(batch)
            ]
        ).to(torch.float64)
    elif affine is not None:
        theta = torch.tensor(affine, dtype=torch.float64).expand(batch, 2, 3).clone()
    mask = None
    if use_mask:
        mask = torch.rand(batch, height, width, generator=gen) > 0.3
        if affine != "random":
            mask = mask.to(torch.float64)
    x1 = x1.to(dtype).requires_grad_(True)
    x2 = x2.to(dtype).requires_grad_(True)
    return x1, x2, theta, mask


def loss_and_grads(fn, x1, x2, **kwargs):
    x1 = x1.detach().clone().requires_grad_(True)
    x2 = x2.detach().clone().requires_grad_(True)
    out = fn(x1, x2, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    g1, g2 = torch.autograd.grad(loss, (x1, x2))
    return out, g1, g2


def test_reference_sampler_matches_grid_sample():
    # sanity check of the test's own bilinear sampler against torch (the implementation uses torch's)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    theta = torch.tensor([general_affine(0.3, 0.8, 0.1, -0.15), general_affine(1.0, 1.3, -0.4, 0.3, True)])
    grid = F.affine_grid(theta.double(), list(x.shape), align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(ref_affine_resample(x, theta), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [0, 1, 3])
def test_displacement_joints_match_definition(T):
    # P̃_t(i, j) = Σ_b Σ_{u,v} x1[b, i, u+dy, v+dx] x2[b, j, u, v]: fails if input/filter or the t sign were
    # swapped (asymmetric inputs, rectangular map).
    gen = torch.Generator().manual_seed(T)
    x1 = torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    x2 = torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    joints = _displacement_joints(x1, x2, T)
    assert joints.shape == (2 * T + 1, 2 * T + 1, 3, 3)
    for dy in range(-T, T + 1):
        for dx in range(-T, T + 1):
            torch.testing.assert_close(joints[dy + T, dx + T], ref_joint(x1, x2, dy, dx), rtol=1e-12, atol=1e-12)
    if T > 0:
        assert not torch.allclose(joints[T + 1, T], ref_joint(x1, x2, -1, 0))


@pytest.mark.parametrize("uncollapsed", [True, False], ids=["uncollapsed", "condensed"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_float64(case, uncollapsed):
    x1, x2, theta, mask = make_inputs(case, torch.float64)
    T, lamb = case[5], case[6]
    (loss, loss_no_lamb), g1, g2 = loss_and_grads(
        iic_segmentation_loss,
        x1,
        x2,
        affine2_to_1=theta,
        mask=mask,
        displacement=T,
        lamb=lamb,
        uncollapsed=uncollapsed,
    )
    ref, r1, r2 = loss_and_grads(ref_loss, x1, x2, theta=theta, mask=mask, T=T, lamb=lamb, uncollapsed=uncollapsed)
    ref_no_lamb = ref_loss(x1.detach(), x2.detach(), theta, mask, T, 1.0, uncollapsed)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_no_lamb, ref_no_lamb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, r1, rtol=1e-8, atol=1e-10 * r1.abs().max().item())
    torch.testing.assert_close(g2, r2, rtol=1e-8, atol=1e-10 * r2.abs().max().item())
    assert r1.abs().max() > 0 and r2.abs().max() > 0


@pytest.mark.parametrize("uncollapsed", [True, False], ids=["uncollapsed", "condensed"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float32_matches_float64_reference(case, uncollapsed):
    x1, x2, theta, mask = make_inputs(case, torch.float64)
    T, lamb = case[5], case[6]
    theta32 = None if theta is None else theta.float()
    (loss, loss_no_lamb), g1, g2 = loss_and_grads(
        iic_segmentation_loss,
        x1.float(),
        x2.float(),
        affine2_to_1=theta32,
        mask=mask,
        displacement=T,
        lamb=lamb,
        uncollapsed=uncollapsed,
    )
    ref, r1, r2 = loss_and_grads(ref_loss, x1, x2, theta=theta, mask=mask, T=T, lamb=lamb, uncollapsed=uncollapsed)
    assert loss.dtype == torch.float32 and g1.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g1.double(), r1, rtol=1e-3, atol=1e-4 * r1.abs().max().item())
    torch.testing.assert_close(g2.double(), r2, rtol=1e-3, atol=1e-4 * r2.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# Hand-computed values
# ----------------------------------------------------------------------------------------------------------


def one_hot_maps(classes: list[list[list[int]]], k: int) -> torch.Tensor:
    """[B][H][W] class ids -> one-hot [B, K, H, W] float64."""
    return F.one_hot(torch.tensor(classes), k).permute(0, 3, 1, 2).to(torch.float64)


@pytest.mark.parametrize("uncollapsed", [True, False])
def test_perfect_agreement_two_clusters_is_minus_ln2(uncollapsed):
    # two 1x1 images, one in each cluster, both views identical: P = diag(1/2, 1/2), p = (1/2, 1/2),
    # I = ln 2, plus the two clamped off-diagonal entries eps (ln eps − 2 ln 1/2).
    x = one_hot_maps([[[0]], [[1]]], 2)
    loss, loss_no_lamb = iic_segmentation_loss(x, x.clone(), uncollapsed=uncollapsed)
    expected = -(math.log(2) + 2 * EPS * (math.log(EPS) + 2 * math.log(2)))
    assert loss.item() == pytest.approx(expected, rel=1e-15, abs=1e-17)
    assert loss_no_lamb.item() == pytest.approx(expected, rel=1e-15, abs=1e-17)
    assert loss.item() != pytest.approx(-math.log(2), rel=1e-15, abs=1e-17)  # the clamp terms are there


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_collapsed_single_cluster_clamp_terms(dtype):
    # every pixel in cluster 0: P = [[1, 0], [0, 0]], unclamped marginals (1, 0) -> clamped (1, eps).
    # I = P00·0 + P01 (ln eps − ln 1 − ln eps) + P10 (…) + P11 (ln eps − 2 ln eps) = −eps ln eps,
    # so loss = eps ln eps ≈ −8.0e-15 — in float32 too, since the clamp is float64's eps (float32's
    # eps 1.19e-7 would give −1.9e-6; marginals from the clamped P would give another value).
    x = one_hot_maps([[[0, 0], [0, 0]]], 2).to(dtype)
    loss, _ = iic_segmentation_loss(x, x.clone())
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(EPS * math.log(EPS), rel=1e-6, abs=0)


def test_independent_views_give_zero_and_lambda_adds_entropy():
    # uniform outputs: P = 1/4 everywhere, p = 1/2: I(λ) = ln(1/4) − 2λ ln(1/2) = (2λ − 2) ln 2
    x = torch.full((1, 2, 3, 3), 0.5, dtype=torch.float64)
    loss, loss_no_lamb = iic_segmentation_loss(x, x.clone(), lamb=1.5, displacement=1)
    assert loss_no_lamb.item() == pytest.approx(0.0, abs=1e-15)
    assert loss.item() == pytest.approx(-math.log(2), rel=1e-14, abs=0)


def test_hand_computed_displacements_checkerboard():
    # 2x2 checkerboard, K=2, both views equal, T=1. Per displacement:
    #   t=(0,0): P = diag(1/2, 1/2) -> I = ln 2 + 2 eps (ln eps + 2 ln 2)
    #   4 axis neighbours: always the other class, P = antidiag(1/2, 1/2) -> the same I
    #   4 diagonals: one pair of equal class, P = one entry 1 -> I = −eps ln eps (three clamped entries)
    # condensed: the sum of the 9 joints is [[4, 4], [4, 4]] -> uniform -> I = 0.
    x = one_hot_maps([[[0, 1], [1, 0]]], 2)
    i_agree = math.log(2) + 2 * EPS * (math.log(EPS) + 2 * math.log(2))
    i_single = -EPS * math.log(EPS)
    loss, _ = iic_segmentation_loss(x, x.clone(), displacement=1, uncollapsed=True)
    assert loss.item() == pytest.approx(-(5 * i_agree + 4 * i_single) / 9, rel=1e-15, abs=1e-17)
    loss, _ = iic_segmentation_loss(x, x.clone(), displacement=1, uncollapsed=False)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)


def test_hand_computed_condensed_row_displacement():
    # 1x2 map [class 0, class 1], T=1: dx=0 gives diag(1, 1), dx=+1 gives [1, 0], dx=−1 gives [0, 1];
    # the sum is all ones -> uniform -> loss 0 (while T=0 alone would be −ln 2).
    x = one_hot_maps([[[0, 1]]], 2)
    loss, _ = iic_segmentation_loss(x, x.clone(), displacement=1, uncollapsed=False)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    loss, _ = iic_segmentation_loss(x, x.clone(), displacement=0, uncollapsed=False)
    expected = -(math.log(2) + 2 * EPS * (math.log(EPS) + 2 * math.log(2)))
    assert loss.item() == pytest.approx(expected, rel=1e-15, abs=1e-17)


def test_hflip_realigns_view2():
    # view 2 is the flipped view 1; with A = hflip the loss equals the unflipped self-comparison,
    # without A it does not.
    gen = torch.Generator().manual_seed(3)
    x1 = (torch.randn(2, 4, 6, 8, generator=gen, dtype=torch.float64) * 3).softmax(dim=1)
    theta = torch.tensor(HFLIP, dtype=torch.float64).expand(2, 2, 3)
    aligned, _ = iic_segmentation_loss(x1, x1.clone(), displacement=1)
    flipped, _ = iic_segmentation_loss(x1, x1.flip(-1), affine2_to_1=theta, displacement=1)
    unaligned, _ = iic_segmentation_loss(x1, x1.flip(-1), displacement=1)
    assert flipped.item() == pytest.approx(aligned.item(), rel=1e-12, abs=0)
    assert unaligned.item() > aligned.item() + 0.01


def test_mask_zeroes_pixels():
    gen = torch.Generator().manual_seed(4)
    x1 = torch.rand(1, 3, 4, 4, generator=gen, dtype=torch.float64).softmax(dim=1)
    x2 = torch.rand(1, 3, 4, 4, generator=gen, dtype=torch.float64).softmax(dim=1)
    mask = torch.ones(1, 4, 4, dtype=torch.float64)
    mask[:, :, 2:] = 0
    with_mask, _ = iic_segmentation_loss(x1, x2, mask=mask)
    cropped, _ = iic_segmentation_loss(x1[..., :2].contiguous(), x2[..., :2].contiguous())
    assert with_mask.item() == pytest.approx(cropped.item(), rel=1e-12, abs=0)
    x1 = x1.detach().requires_grad_(True)
    loss, _ = iic_segmentation_loss(x1, x2, mask=mask)
    (grad,) = torch.autograd.grad(loss, x1)
    assert torch.all(grad[..., 2:] == 0) and grad[..., :2].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Normaliser gradients (METHODS: "getting either wrong changes the gradients by 40–2400%")
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uncollapsed", [True, False], ids=["uncollapsed", "condensed"])
def test_normaliser_gradient_convention(uncollapsed):
    case = CASES[2]
    x1, x2, theta, mask = make_inputs(case, torch.float64, seed=7)
    kwargs = {"theta": theta, "mask": mask, "T": case[5], "lamb": case[6], "uncollapsed": uncollapsed}
    (loss, _), g1, g2 = loss_and_grads(
        iic_segmentation_loss,
        x1,
        x2,
        affine2_to_1=theta,
        mask=mask,
        displacement=case[5],
        lamb=case[6],
        uncollapsed=uncollapsed,
    )
    right, r1, r2 = loss_and_grads(ref_loss, x1, x2, differentiate_norm=uncollapsed, **kwargs)
    wrong, w1, w2 = loss_and_grads(ref_loss, x1, x2, differentiate_norm=not uncollapsed, **kwargs)
    # same value either way, different gradients; the implementation has the specified ones
    torch.testing.assert_close(right, wrong, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, right, rtol=1e-10, atol=0)
    torch.testing.assert_close(g1, r1, rtol=1e-8, atol=1e-10 * r1.abs().max().item())
    torch.testing.assert_close(g2, r2, rtol=1e-8, atol=1e-10 * r2.abs().max().item())
    for got, other in ((g1, w1), (g2, w2)):
        assert ((got - other).norm() / got.norm()).item() > 0.1


# ----------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("uncollapsed", [True, False])
def test_loss_is_nonpositive_on_random_inputs(seed, uncollapsed):
    gen = torch.Generator().manual_seed(100 + seed)
    k = 2 + seed * 3
    x1 = (torch.randn(2, k, 9, 9, generator=gen) * (seed + 0.5)).softmax(dim=1)
    x2 = (torch.randn(2, k, 9, 9, generator=gen) * (seed + 0.5)).softmax(dim=1)
    mask = (torch.rand(2, 9, 9, generator=gen) > 0.2).float()
    theta = torch.tensor(general_affine(0.1 * seed, 1.0, 0.1, 0.0, flip=seed % 2 == 0)).expand(2, 2, 3)
    for lamb in (1.0, 1.5):
        loss, loss_no_lamb = iic_segmentation_loss(
            x1, x2, affine2_to_1=theta, mask=mask, displacement=seed, lamb=lamb, uncollapsed=uncollapsed
        )
        assert loss.item() <= 1e-6 and loss_no_lamb.item() <= 1e-6
        # λ > 1 adds (λ − 1)(H(p_i) + H(p_j)) ≥ 0 to the information
        assert loss.item() <= loss_no_lamb.item() + 1e-6
        assert loss.dtype == torch.float32


def test_eps_is_float64_machine_epsilon_even_in_float32():
    assert IIC_EPS == EPS
    # 2.22e-16 is a normal float32 (not float32's own epsilon 1.19e-7): the clamp changes a float32 value
    # only below 2.22e-16, so a joint entry of 1e-10 is used as is and one of 0 becomes 2.22e-16.
    assert torch.tensor(IIC_EPS, dtype=torch.float32).item() == pytest.approx(EPS, rel=1e-7, abs=0)
    x1 = one_hot_maps([[[0]], [[1]]], 2).float()
    loss32, _ = iic_segmentation_loss(x1, x1.clone())
    loss64, _ = iic_segmentation_loss(x1.double(), x1.double())
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-6, abs=0)


def test_lambda_one_returns_equal_pair_and_gradients_flow():
    x1, x2, theta, mask = make_inputs(CASES[1], torch.float64)
    loss, loss_no_lamb = iic_segmentation_loss(x1, x2, theta, mask, displacement=1, lamb=1.0)
    assert loss.item() == loss_no_lamb.item()
    loss.backward()
    assert x1.grad is not None and x2.grad is not None


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_errors():
    x = torch.rand(2, 3, 5, 5).softmax(dim=1)
    with pytest.raises(ValueError, match="4-D"):
        iic_segmentation_loss(x[0], x[0])
    with pytest.raises(ValueError, match="same shape"):
        iic_segmentation_loss(x, x[:, :2])
    with pytest.raises(TypeError, match="same dtype"):
        iic_segmentation_loss(x, x.double())
    with pytest.raises(TypeError, match="floating-point"):
        iic_segmentation_loss(x.long(), x.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        iic_segmentation_loss(x.numpy(), x)
    with pytest.raises(ValueError, match="displacement.*>= 0"):
        iic_segmentation_loss(x, x, displacement=-1)
    with pytest.raises(TypeError, match="displacement"):
        iic_segmentation_loss(x, x, displacement=1.5)
    with pytest.raises(ValueError, match="smaller than the map size"):
        iic_segmentation_loss(x, x, displacement=5, uncollapsed=True)
    iic_segmentation_loss(x, x, displacement=5, uncollapsed=False)  # fine: the sum over t is non-empty
    with pytest.raises(ValueError, match=r"mask.*\[B, H, W\]"):
        iic_segmentation_loss(x, x, mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"mask.*\[B, H, W\]"):
        iic_segmentation_loss(x, x, mask=torch.ones(1, 5, 5))
    with pytest.raises(ValueError, match=r"affine2_to_1.*\[B, 2, 3\]"):
        iic_segmentation_loss(x, x, affine2_to_1=torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match=r"affine2_to_1.*\[B, 2, 3\]"):
        iic_segmentation_loss(x, x, affine2_to_1=torch.tensor(HFLIP))
    with pytest.raises(ValueError, match="empty joint"):
        iic_segmentation_loss(x, x, mask=torch.zeros(2, 5, 5), uncollapsed=False)
    with pytest.raises(ValueError, match="empty joint"):
        iic_segmentation_loss(x, x, mask=torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="non-negative"):
        iic_segmentation_loss(x - 0.5, x)
