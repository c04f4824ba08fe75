"""STEGO's correlation loss against an independent loop-by-loop reference written from METHODS 1.2."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from hf_useg.models.stego.configuration_stego import StegoConfig
from hf_useg.models.stego.loss_stego import (
    StegoCorrelationLoss,
    StegoLossOutput,
    norm,
    sample_grid,
    super_perm,
    tensor_correlation,
)

# ----------------------------------------------------------------------------------------------------------
# Reference: explicit loops over images, sample points and pairs, in float64, straight from the METHODS text.
# ----------------------------------------------------------------------------------------------------------


def ref_bilinear(fmap: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of ``fmap [C, H, W]`` at (x, y) in [-1, 1]: -1/1 are the centres of the border pixels
    (align_corners=True), points outside are moved onto the border."""
    _, height, width = fmap.shape
    px = min(max((x + 1) / 2 * (width - 1), 0.0), width - 1)
    py = min(max((y + 1) / 2 * (height - 1), 0.0), height - 1)
    x0, y0 = math.floor(px), math.floor(py)
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    wx, wy = px - x0, py - y0
    return (
        (1 - wx) * (1 - wy) * fmap[:, y0, x0]
        + wx * (1 - wy) * fmap[:, y0, x1]
        + (1 - wx) * wy * fmap[:, y1, x0]
        + wx * wy * fmap[:, y1, x1]
    )


def ref_sample(fmap: torch.Tensor, coords: torch.Tensor) -> list[list[torch.Tensor]]:
    """points[a][b] = unit vector of the map at coords[b, a] (the transposed convention)."""
    size = coords.shape[0]
    points = []
    for a in range(size):
        row = []
        for b in range(size):
            v = ref_bilinear(fmap, float(coords[b, a, 0]), float(coords[b, a, 1]))
            row.append(v / torch.clamp(torch.sqrt((v * v).sum()), min=1e-10))
        points.append(row)
    return points


def ref_pair_terms(f1, f2, c1, c2, shift: float, cfg: StegoConfig) -> list[torch.Tensor]:
    """All loss elements of one pair type ; f1/f2/c1/c2 are lists (over images) of sampled grids."""
    num_images, size = len(f1), len(f1[0])
    positions = [(h, w) for h in range(size) for w in range(size)]
    feat = {}
    for n in range(num_images):
        for h, w in positions:
            for i, j in positions:
                feat[n, h, w, i, j] = float((f1[n][h][w] * f2[n][i][j]).sum())
    if cfg.pointwise:
        global_mean = sum(feat.values()) / len(feat)
        for n in range(num_images):
            for h, w in positions:
                row_mean = sum(feat[n, h, w, i, j] for i, j in positions) / len(positions)
                for i, j in positions:
                    feat[n, h, w, i, j] = feat[n, h, w, i, j] - row_mean + global_mean
    terms = []
    for n in range(num_images):
        for h, w in positions:
            for i, j in positions:
                s = (c1[n][h][w] * c2[n][i][j]).sum()
                s = torch.clamp(s, min=0.0 if cfg.zero_clamp else -9999.0)
                if cfg.stabilize:
                    s = torch.clamp(s, max=0.8)
                terms.append(-s * (feat[n, h, w, i, j] - shift))
    return terms


def ref_loss(features, features_pos, code, code_pos, coords1, coords2, neg_perms, cfg):
    num_images = features.shape[0]
    f = [ref_sample(features[n], coords1[n]) for n in range(num_images)]
    c = [ref_sample(code[n], coords1[n]) for n in range(num_images)]
    f_pos = [ref_sample(features_pos[n], coords2[n]) for n in range(num_images)]
    c_pos = [ref_sample(code_pos[n], coords2[n]) for n in range(num_images)]
    self_terms = ref_pair_terms(f, f, c, c, cfg.pos_intra_shift, cfg)
    knn_terms = ref_pair_terms(f, f_pos, c, c_pos, cfg.pos_inter_shift, cfg)
    rand_terms = []
    for perm in neg_perms.tolist():
        f_neg = [ref_sample(features[perm[n]], coords2[n]) for n in range(num_images)]
        c_neg = [ref_sample(code[perm[n]], coords2[n]) for n in range(num_images)]
        rand_terms += ref_pair_terms(f, f_neg, c, c_neg, cfg.neg_inter_shift, cfg)
    pos_intra = torch.stack(self_terms).mean()
    pos_inter = torch.stack(knn_terms).mean()
    neg_inter = torch.stack(rand_terms).mean()
    total = cfg.correspondence_weight * (
        cfg.pos_intra_weight * pos_intra + cfg.pos_inter_weight * pos_inter + cfg.neg_inter_weight * neg_inter
    )
    return total, pos_intra, pos_inter, neg_inter


SETTINGS = {
    "cocostuff27": StegoConfig.for_dataset("cocostuff27"),
    "cityscapes27": StegoConfig.for_dataset("cityscapes27"),
    "potsdam3": StegoConfig.for_dataset("potsdam3"),
    "no_zero_clamp_stabilize": StegoConfig(
        zero_clamp=False, stabilize=True, pointwise=True, pos_intra_shift=0.3, pos_inter_shift=-0.1,
        neg_inter_shift=0.5, pos_intra_weight=0.7, pos_inter_weight=0.4, neg_inter_weight=1.3,
    ),
    "no_clamps_no_pointwise": StegoConfig(
        zero_clamp=False, stabilize=False, pointwise=False, pos_intra_shift=0.0, pos_inter_shift=0.05,
        neg_inter_shift=0.25, correspondence_weight=2.5,
    ),
    "both_clamps_no_pointwise": StegoConfig(
        zero_clamp=True, stabilize=True, pointwise=False, pos_intra_shift=0.6, pos_inter_shift=0.4,
        neg_inter_shift=-0.2, pos_intra_weight=1.0, pos_inter_weight=0.0, neg_inter_weight=2.0,
    ),
}  # fmt: skip


def make_inputs(num_images: int, seed: int, pos_size=(5, 6), num_perms: int = 5, size: int = 3):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, 4, 5, 6, generator=g, dtype=torch.float64)
    features_pos = torch.randn(num_images, 4, *pos_size, generator=g, dtype=torch.float64)
    code = torch.randn(num_images, 3, 5, 6, generator=g, dtype=torch.float64)
    code_pos = torch.randn(num_images, 3, *pos_size, generator=g, dtype=torch.float64)
    coords1 = torch.rand(num_images, size, size, 2, generator=g, dtype=torch.float64) * 2 - 1
    coords2 = torch.rand(num_images, size, size, 2, generator=g, dtype=torch.float64) * 2 - 1
    coords1[0, 0, 0] = torch.tensor([-1.0, 1.0])  # exact corners are legal sample points
    coords2[-1, -1, -1] = torch.tensor([1.0, 1.0])
    neg_perms = torch.stack([super_perm(num_images, generator=g) for _ in range(num_perms)])
    return features, features_pos, code, code_pos, coords1, coords2, neg_perms


@pytest.mark.parametrize("name", list(SETTINGS))
def test_matches_loop_reference_values_and_gradients(name):
    cfg = SETTINGS[name]
    num_images = 2 if name == "both_clamps_no_pointwise" else 3
    pos_size = (4, 7) if name == "potsdam3" else (5, 6)
    features, features_pos, code, code_pos, coords1, coords2, neg_perms = make_inputs(
        num_images, seed=len(name), pos_size=pos_size
    )

    code32 = code.float().requires_grad_(True)
    code_pos32 = code_pos.float().requires_grad_(True)
    out = StegoCorrelationLoss(cfg)(
        features.float(),
        features_pos.float(),
        code32,
        code_pos32,
        coords1.float(),
        coords2.float(),
        neg_perms,
    )
    out.loss.backward()

    code64 = code.clone().requires_grad_(True)
    code_pos64 = code_pos.clone().requires_grad_(True)
    # The module samples at float32 coordinates; give the reference the same points.
    ref = ref_loss(
        features,
        features_pos,
        code64,
        code_pos64,
        coords1.float().double(),
        coords2.float().double(),
        neg_perms,
        cfg,
    )
    ref[0].backward()

    for got, want in zip((out.loss, out.pos_intra, out.pos_inter, out.neg_inter), ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(code32.grad.double(), code64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(code_pos32.grad.double(), code_pos64.grad, rtol=1e-4, atol=1e-6)
    assert code64.grad.abs().sum() > 0
    # code_pos only enters through the kNN term
    assert (code_pos64.grad.abs().sum() > 0) == (cfg.pos_inter_weight != 0)


def test_settings_exercise_the_clamps():
    """The reference settings above really reach both clamps (otherwise the clamp checks would be vacuous)."""
    inputs = [t.float() if t.is_floating_point() else t for t in make_inputs(3, seed=0)]
    out = StegoCorrelationLoss(SETTINGS["no_clamps_no_pointwise"])(*inputs, output_correlations=True)
    raw = out.pos_inter_correlation
    assert (raw < 0).any() and (raw > 0.8).any()
    clamped = StegoCorrelationLoss(SETTINGS["both_clamps_no_pointwise"])(*inputs, output_correlations=True)
    torch.testing.assert_close(clamped.pos_inter_correlation, raw.clamp(0, 0.8))


# ----------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------------------


def _one_point_case(code_right):
    """N=1, S=1. Image features: left (1, 0), right (0, 2); partner features (3, 4) (a 1x1 map).
    Image code: left (1, 0, 0), right ``code_right``; partner code (0.8, 0.6, 0).
    coords1 = the left pixel, coords2 = the right pixel (the random partner of the only image is itself)."""
    features = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]
    features_pos = torch.tensor([[[[3.0]], [[4.0]]]])
    code = torch.tensor([[[[1.0, code_right[0]]], [[0.0, code_right[1]]], [[0.0, code_right[2]]]]])
    code_pos = torch.tensor([[[[0.8]], [[0.6]], [[0.0]]]])
    coords1 = torch.tensor([[[[-1.0, 0.0]]]])
    coords2 = torch.tensor([[[[1.0, 0.0]]]])
    return features, features_pos, code, code_pos, coords1, coords2, torch.zeros(1, 1, dtype=torch.long)


def test_hand_computed_single_point():
    # self: F = 1, S = 1 -> -(1 - 0.12) = -0.88
    # kNN:  F = cos((1,0), (3,4)) = 0.6, S = cos((1,0,0), (0.8,0.6,0)) = 0.8 -> -0.8 * (0.6 - 0.2) = -0.32
    # rand: F = cos((1,0), (0,2)) = 0, S = cos((1,0,0), (0.6,0,0.8)) = 0.6 -> -0.6 * (0 - 1.0) = 0.6
    # total = 0.1 * -0.88 + 1.0 * -0.32 + 0.1538476246415498 * 0.6 = -0.31569142521507012
    out = StegoCorrelationLoss(StegoConfig())(*_one_point_case((0.6, 0.0, 0.8)))
    assert isinstance(out, StegoLossOutput)
    assert out.pos_intra.item() == pytest.approx(-0.88, abs=1e-6)
    assert out.pos_inter.item() == pytest.approx(-0.32, abs=1e-6)
    assert out.neg_inter.item() == pytest.approx(0.6, abs=1e-6)
    assert out.loss.item() == pytest.approx(-0.31569142521507012, abs=1e-6)


def test_hand_computed_zero_clamp_and_stabilize():
    # Random partner code (-0.6, 0, 0.8): S = -0.6. zero_clamp -> 0 -> term 0; without: -(-0.6)(0 - 1) = -0.6.
    case = _one_point_case((-0.6, 0.0, 0.8))
    assert StegoCorrelationLoss(StegoConfig())(*case).neg_inter.item() == pytest.approx(0.0, abs=1e-7)
    assert StegoCorrelationLoss(StegoConfig(zero_clamp=False))(*case).neg_inter.item() == pytest.approx(-0.6, abs=1e-6)
    # stabilize: self S = 1 -> 0.8: -0.8 * 0.88 = -0.704; kNN S = 0.8 stays.
    out = StegoCorrelationLoss(StegoConfig(stabilize=True))(*case)
    assert out.pos_intra.item() == pytest.approx(-0.704, abs=1e-6)
    assert out.pos_inter.item() == pytest.approx(-0.32, abs=1e-6)


@pytest.mark.parametrize(
    ("pointwise", "stabilize", "expected"),
    [(False, False, -0.523), (True, False, -0.50425), (False, True, -0.413)],
)
def test_hand_computed_pointwise_two_by_two(pointwise, stabilize, expected):
    """Self term with S=2 on a 1x2 map: features left (1,0), right (0,1); code left (1,0), right (0.6,0.8).
    coords [[L, L], [L, R]] samples the points {L, L, L, R}.
    F rows: an L point sees [1, 1, 1, 0] (mean .75), the R point [0, 0, 0, 1] (mean .25); global mean .625.
    Code correlation rows: L -> [1, 1, 1, .6], R -> [.6, .6, .6, 1]. Shift b = 0.12.
    plain:     L row = -3 * .88 + .6 * .12 = -2.568 (x3), R row = 3 * .072 - .88 = -.664
               -> -8.368 / 16 = -.523
    pointwise: F_L = [.875, .875, .875, -.125], F_R = [.375, .375, .375, 1.375]
               L row = -3 * .755 + .6 * .245 = -2.118 (x3), R row = -3 * .6 * .255 - 1.255 = -1.714
               -> -8.068 / 16 = -.50425
    stabilize: code rows L -> [.8, .8, .8, .6], R -> [.6, .6, .6, .8]
               L row = -3 * .704 + .072 = -2.04 (x3), R row = .216 - .704 = -.488 -> -6.608 / 16 = -.413"""
    features = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    code = torch.tensor([[[[1.0, 0.6]], [[0.0, 0.8]]]])
    left, right = [-1.0, 0.3], [1.0, -0.7]  # y is irrelevant on a one-row map
    coords = torch.tensor([[[left, left], [left, right]]])
    cfg = StegoConfig(pointwise=pointwise, stabilize=stabilize)
    out = StegoCorrelationLoss(cfg)(
        features, features, code, code, coords, coords, torch.zeros(1, 1, dtype=torch.long)
    )
    assert out.pos_intra.item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Helpers and conventions
# ----------------------------------------------------------------------------------------------------------


def test_sample_grid_transposed_convention_on_asymmetric_map():
    height, width = 3, 4
    fmap = torch.zeros(1, 2, height, width)
    fmap[0, 0] = torch.arange(height).view(height, 1).float()  # channel 0 = row index
    fmap[0, 1] = torch.arange(width).view(1, width).float()  # channel 1 = column index
    # coords[0, b, a] = (x, y); x -> column (width), y -> row (height)
    coords = torch.tensor(
        [
            [[[-1.0, -1.0], [1.0, -1.0]], [[-1.0, 1.0], [1.0 / 3.0, 0.0]]],
        ]
    )
    out = sample_grid(fmap, coords)
    assert out.shape == (1, 2, 2, 2)
    # output (a, b) comes from coords[b, a]
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0]  # coords[0,0]: top-left
    assert out[0, :, 1, 0].tolist() == pytest.approx([0.0, 3.0])  # coords[0,1]: top-right
    assert out[0, :, 0, 1].tolist() == pytest.approx([2.0, 0.0])  # coords[1,0]: bottom-left
    # coords[1,1] = (1/3, 0): column (1/3 + 1)/2 * 3 = 2, row 1
    assert out[0, :, 1, 1].tolist() == pytest.approx([1.0, 2.0])
    # outside [-1, 1]: border padding
    far = sample_grid(fmap, torch.tensor([[[[5.0, -5.0]]]]))
    assert far.flatten().tolist() == pytest.approx([0.0, 3.0])


def test_loss_correlations_follow_the_transposed_convention():
    """pos_intra_correlation[n, h, w, i, j] correlates the code at coords1[n, w, h] with the code at
    coords1[n, j, i]."""
    g = torch.Generator().manual_seed(3)
    code = torch.randn(1, 3, 4, 5, generator=g)
    features = torch.randn(1, 4, 4, 5, generator=g)
    coords = torch.tensor([[[[-1.0, -1.0], [1.0, -1.0]], [[-1.0, 1.0], [1.0, 1.0]]]])
    corners = {(-1, -1): (0, 0), (1, -1): (0, 4), (-1, 1): (3, 0), (1, 1): (3, 4)}  # (x, y) -> (row, col)
    out = StegoCorrelationLoss(StegoConfig(zero_clamp=False))(
        features,
        features,
        code,
        code,
        coords,
        coords,
        torch.zeros(1, 1, dtype=torch.long),
        output_correlations=True,
    )
    unit = code[0] / code[0].norm(dim=0, keepdim=True)
    for h in range(2):
        for w in range(2):
            for i in range(2):
                for j in range(2):
                    r1, c1 = corners[tuple(int(v) for v in coords[0, w, h].tolist())]
                    r2, c2 = corners[tuple(int(v) for v in coords[0, j, i].tolist())]
                    want = (unit[:, r1, c1] * unit[:, r2, c2]).sum()
                    assert out.pos_intra_correlation[0, h, w, i, j].item() == pytest.approx(want.item(), abs=1e-6)


def test_norm_and_tensor_correlation():
    x = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 2, 1, 2)  # vectors (3, 0) and (4, 0)
    assert norm(x).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    zero = torch.zeros(1, 3, 1, 1)
    assert torch.equal(norm(zero), zero)  # eps keeps zero vectors at zero instead of NaN
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 2, 1, 2)  # a[:, 0, 0] = (1, 3), a[:, 0, 1] = (2, 4)
    b = torch.tensor([5.0, 6.0]).view(1, 2, 1, 1)
    corr = tensor_correlation(a, b)
    assert corr.shape == (1, 1, 2, 1, 1)
    assert corr.flatten().tolist() == [1 * 5 + 3 * 6, 2 * 5 + 4 * 6]


@pytest.mark.parametrize(
    ("randperm", "expected"),
    [
        ([0, 1, 2], [1, 2, 0]),
        ([0, 2, 1], [1, 2, 1]),  # repeats: not a permutation
        ([1, 0, 2], [1, 0, 0]),
        ([1, 2, 0], [1, 2, 0]),
        ([2, 0, 1], [2, 0, 1]),
        ([2, 1, 0], [2, 2, 0]),
    ],
)
def test_super_perm_rule_on_every_permutation_of_three(monkeypatch, randperm, expected):
    monkeypatch.setattr(torch, "randperm", lambda size, **kwargs: torch.tensor(randperm))
    assert super_perm(3).tolist() == expected


def test_super_perm_properties():
    g = torch.Generator().manual_seed(0)
    counts = Counter(tuple(super_perm(3, generator=g).tolist()) for _ in range(3000))
    # Distribution implied by the rule over the 6 equally likely randperms (table above).
    assert set(counts) == {(1, 2, 0), (1, 2, 1), (1, 0, 0), (2, 0, 1), (2, 2, 0)}
    assert counts[(1, 2, 0)] / 3000 == pytest.approx(2 / 6, abs=0.04)
    for key in [(1, 2, 1), (1, 0, 0), (2, 0, 1), (2, 2, 0)]:
        assert counts[key] / 3000 == pytest.approx(1 / 6, abs=0.04)
    for size in (2, 5, 8):
        for _ in range(50):
            p = super_perm(size, generator=g)
            assert p.dtype == torch.long and ((p >= 0) & (p < size)).all()
            assert not (p == torch.arange(size)).any()  # never paired with itself
    assert super_perm(1).tolist() == [0]
    assert super_perm(2).tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------------------
# Module behaviour
# ----------------------------------------------------------------------------------------------------------


def test_no_gradient_into_features_and_default_draws():
    cfg = StegoConfig(feature_samples=4, neg_samples=3)
    features = torch.randn(3, 6, 5, 5, requires_grad=True)
    features_pos = torch.randn(3, 6, 5, 5, requires_grad=True)
    code = torch.randn(3, 4, 5, 5, requires_grad=True)
    code_pos = torch.randn(3, 4, 5, 5, requires_grad=True)
    loss_fn = StegoCorrelationLoss(cfg)
    assert len(list(loss_fn.parameters())) == 0
    out = loss_fn(features, features_pos, code, code_pos, output_correlations=True)
    out.loss.backward()
    assert features.grad is None and features_pos.grad is None
    assert code.grad is not None and code_pos.grad is not None
    assert out.pos_intra_correlation.shape == (3, 4, 4, 4, 4)
    assert out.neg_inter_correlation.shape == (3, 3, 4, 4, 4, 4)

    # The draws come from the generator: the same seed reproduces the loss, another seed changes it.
    def run(seed):
        return loss_fn(features, features_pos, code, code_pos, generator=torch.Generator().manual_seed(seed)).loss

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_total_is_weighted_sum_and_config_read_at_call_time():
    features, features_pos, code, code_pos, coords1, coords2, neg_perms = (
        t.float() if t.is_floating_point() else t for t in make_inputs(3, seed=7)
    )
    cfg = StegoConfig()
    loss_fn = StegoCorrelationLoss(cfg)
    out = loss_fn(features, features_pos, code, code_pos, coords1, coords2, neg_perms)
    manual = 0.1 * out.pos_intra + 1.0 * out.pos_inter + 0.1538476246415498 * out.neg_inter
    torch.testing.assert_close(out.loss, manual)
    cfg.correspondence_weight = 3.0
    tripled = loss_fn(features, features_pos, code, code_pos, coords1, coords2, neg_perms)
    torch.testing.assert_close(tripled.loss, 3 * out.loss)


def test_float32_under_autocast_and_half_inputs():
    features, features_pos, code, code_pos, coords1, coords2, neg_perms = (
        t.float() if t.is_floating_point() else t for t in make_inputs(2, seed=11)
    )
    loss_fn = StegoCorrelationLoss(StegoConfig())
    want = loss_fn(features, features_pos, code, code_pos, coords1, coords2, neg_perms).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(features, features_pos, code, code_pos, coords1, coords2, neg_perms).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_errors():
    loss_fn = StegoCorrelationLoss(StegoConfig(feature_samples=3))
    f, c = torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="features_pos has batch size 3"):
        loss_fn(f, torch.randn(3, 4, 5, 5), c, c)
    with pytest.raises(ValueError, match="code has batch size 1"):
        loss_fn(f, f, c[:1], c)
    with pytest.raises(ValueError, match=r"features must be \[batch, channels, height, width\]"):
        loss_fn(f[0], f, c, c)
    with pytest.raises(ValueError, match="features_pos has 5 channels"):
        loss_fn(f, torch.randn(2, 5, 5, 5), c, c)
    with pytest.raises(ValueError, match="code_pos has 2 channels"):
        loss_fn(f, f, c, torch.randn(2, 2, 5, 5))
    with pytest.raises(TypeError, match="floating point"):
        loss_fn(f, f, c.long(), c)
    with pytest.raises(ValueError, match=r"coords1 must be \[N=2, S, S, 2\]"):
        loss_fn(f, f, c, c, coords1=torch.rand(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"coords2 must be \[N=2, S, S, 2\]"):
        loss_fn(f, f, c, c, coords2=torch.rand(1, 3, 3, 2))
    with pytest.raises(ValueError, match="must match"):
        loss_fn(f, f, c, c, coords1=torch.rand(2, 3, 3, 2), coords2=torch.rand(2, 4, 4, 2))
    with pytest.raises(ValueError, match=r"neg_perms must be \[num_pairings, N=2\]"):
        loss_fn(f, f, c, c, neg_perms=torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\)"):
        loss_fn(f, f, c, c, neg_perms=torch.full((5, 2), 2, dtype=torch.long))
    with pytest.raises(TypeError, match="long"):
        loss_fn(f, f, c, c, neg_perms=torch.zeros(5, 2))
