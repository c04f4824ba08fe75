"""The pseudo-box sources of CutMix-DETReg (`hf_useg.models.detreg.box_sources`, METHODS.md section 5): the CutMix
composite's boxes against its pixels, the occlusion rule, the box law's statistics, determinism, feathering, the
random-box control, Selective Search, and the drawing helpers."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hf_useg.models.detreg.box_sources import (
    CutMixComposer,
    CutMixComposite,
    _visible_fractions,
    boxes_to_normalized_cxcywh,
    random_boxes,
    selective_search_boxes,
)

BASE_COLOUR = (0, 0, 0)
DONOR_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220)]
KEEP_ALL = 1.0  # occlusion_threshold that keeps every paste


def _constant_donors() -> list[np.ndarray]:
    # different sizes and aspects, one distinct colour each: a pixel's colour says which donor it shows
    sizes = [(40, 60), (90, 30), (50, 50), (25, 80), (70, 70), (33, 47)]
    return [np.full((*size, 3), colour, np.uint8) for size, colour in zip(sizes, DONOR_COLOURS)]


def _topmost_map(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    topmost = np.full((height, width), -1)
    for index, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        topmost[y1:y2, x1:x2] = index
    return topmost


def _textured(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- the composite: boxes exactly where the pastes are -------------------------------------------------------


def test_boxes_are_exactly_where_the_visible_pastes_are():
    height, width = 48, 64
    base = np.full((height, width, 3), BASE_COLOUR, np.uint8)
    composer = CutMixComposer(occlusion_threshold=KEEP_ALL)
    for seed in range(40):
        composite = composer(base, _constant_donors(), np.random.default_rng(seed))
        boxes = composite.boxes
        assert composite.num_pasted == len(boxes) == len(composite.pastes) == len(composite.donor_indices)
        assert boxes.dtype == np.float32 and np.array_equal(boxes, np.round(boxes))
        topmost = _topmost_map(boxes, height, width)
        expected = np.array(BASE_COLOUR, np.uint8)[None, None].repeat(height, 0).repeat(width, 1)
        for index, donor in enumerate(composite.donor_indices):
            expected[topmost == index] = DONOR_COLOURS[donor]
            x1, y1, x2, y2 = boxes[index].astype(int)
            # the un-blended paste: the donor's (constant) content at the box's size
            assert composite.pastes[index].shape == (y2 - y1, x2 - x1, 3)
            assert (composite.pastes[index] == DONOR_COLOURS[donor]).all()
            assert composite.visible_fraction[index] == pytest.approx(
                (topmost == index).mean() * height * width / ((x2 - x1) * (y2 - y1))
            )
        # every pixel: base outside the boxes, the topmost paste's donor colour inside
        np.testing.assert_array_equal(composite.image, expected)


def test_unblended_pastes_equal_the_donor_content():
    # one paste of exactly the donor's size and aspect, crop scale 1: the paste is the whole donor, unresized
    composer = CutMixComposer(max_pastes=1, area_range=(0.25, 0.25), aspect_range=(1.0, 1.0), donor_crop_scale=(1, 1))
    base, donor = _textured(1, 100, 100), _textured(2, 50, 50)
    for seed in range(5):
        composite = composer(base, [donor], np.random.default_rng(seed))
        ((x1, y1, x2, y2),) = composite.boxes.astype(int)
        assert (x2 - x1, y2 - y1) == (50, 50)
        np.testing.assert_array_equal(composite.pastes[0], donor)
        np.testing.assert_array_equal(composite.image[y1:y2, x1:x2], donor)
        outside = np.ones((100, 100), bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(composite.image[outside], base[outside])
    # a resized crop: a bilinear resize of a part of the donor (a horizontal ramp stays a monotone ramp in range)
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 200).astype(np.uint8)[None, :, None], 120, 0), 3, 2)
    composite = CutMixComposer(max_pastes=4)(base, [ramp], np.random.default_rng(3))
    for paste in composite.pastes:
        row = paste[paste.shape[0] // 2, :, 0].astype(int)
        assert (np.diff(row) >= -1).all()
        assert (paste == paste[:, :, :1]).all() and (paste == paste[:1]).all()  # grey, constant down the columns


# -- the occlusion rule --------------------------------------------------------------------------------------


def test_visible_fractions_of_constructed_overlaps():
    earlier = [0, 0, 10, 10]
    # a later rectangle hides 60% / 40% / exactly 50% of the earlier one
    for later, visible in (([0, 0, 6, 10], 0.4), ([0, 0, 4, 10], 0.6), ([5, 0, 20, 10], 0.5)):
        fractions = _visible_fractions(np.array([earlier, later]), 20, 20)
        assert fractions.tolist() == pytest.approx([visible, 1.0])
    # two later rectangles hide 30% each, together 60% (their overlap counted once)
    fractions = _visible_fractions(np.array([earlier, [0, 0, 3, 10], [7, 0, 10, 10], [0, 0, 3, 10]]), 20, 20)
    assert fractions[0] == pytest.approx(0.4)


def test_occlusion_rule_drops_the_pastes_hidden_by_more_than_half():
    base = np.zeros((40, 40, 3), np.uint8)
    donors = _constant_donors()
    seen_dropped = seen_kept_occluded = 0
    for seed in range(150):
        everything = CutMixComposer(occlusion_threshold=KEEP_ALL)(base, donors, np.random.default_rng(seed))
        ruled = CutMixComposer()(base, donors, np.random.default_rng(seed))
        hidden = 1.0 - everything.visible_fraction
        kept = hidden <= 0.5
        np.testing.assert_array_equal(ruled.boxes, everything.boxes[kept])
        np.testing.assert_array_equal(ruled.visible_fraction, everything.visible_fraction[kept])
        assert ruled.donor_indices == [d for d, keep in zip(everything.donor_indices, kept) if keep]
        # dropping a box leaves its pixels: the images are the same
        np.testing.assert_array_equal(ruled.image, everything.image)
        assert ruled.num_pasted == everything.num_pasted
        seen_dropped += int((~kept).sum())
        seen_kept_occluded += int(((hidden > 0) & (hidden < 0.5)).sum())
    # both sides of the rule were exercised (the last paste is never hidden, so the first case needs K >= 2)
    assert seen_dropped > 20 and seen_kept_occluded > 20


# -- the box law ---------------------------------------------------------------------------------------------


def test_box_law_statistics():
    height, width = 300, 400
    generator = np.random.default_rng(0)
    counts, log_areas, log_aspects = [], [], []
    for _ in range(3000):
        boxes = random_boxes(height, width, generator, occlusion_threshold=None)
        counts.append(len(boxes))
        assert ((boxes[:, :2] >= 0) & (boxes[:, 2:] <= [width, height]) & (boxes[:, 2:] > boxes[:, :2])).all()
        box_widths, box_heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        log_areas += np.log(box_widths * box_heights / (height * width)).tolist()
        log_aspects += np.log(box_widths / box_heights).tolist()
    # K ~ U{1..8}: each value about 1/8 of the draws
    frequencies = np.bincount(counts, minlength=9)[1:] / len(counts)
    assert set(counts) == set(range(1, 9)) and np.all(np.abs(frequencies - 1 / 8) < 0.03)
    # log-area ~ U[log 0.02, log 0.5] and log-aspect ~ U[log 1/3, log 3] (rounding to pixels blurs the edges)
    for values, low, high in ((log_areas, 0.02, 0.5), (log_aspects, 1 / 3, 3.0)):
        values = np.asarray(values)
        assert values.min() > math.log(low) - 0.05 and values.max() < math.log(high) + 0.05
        histogram = np.histogram(values, bins=5, range=(math.log(low), math.log(high)))[0] / len(values)
        assert np.all(np.abs(histogram - 0.2) < 0.04), histogram


def test_box_positions_are_uniform_inside_the_image():
    generator = np.random.default_rng(1)
    corners = np.concatenate(
        [
            random_boxes(200, 300, generator, max_boxes=1, area_range=(0.06, 0.06), aspect_range=(2.25, 2.25))
            for _ in range(2000)
        ]
    )
    sizes = corners[:, 2:] - corners[:, :2]
    assert (sizes == [90, 40]).all()  # sqrt(0.06 * 200 * 300 * 2.25) = 90, sqrt(0.06 * 200 * 300 / 2.25) = 40
    # x1 ~ U{0..210}, y1 ~ U{0..160}
    for values, high in ((corners[:, 0], 210), (corners[:, 1], 160)):
        assert values.min() < 3
        assert values.max() > high - 3 and values.max() <= high
        assert abs(values.mean() - high / 2) < high * 0.03
        assert np.all(np.abs(np.histogram(values, bins=4, range=(0, high + 1))[0] / len(values) - 0.25) < 0.04)


def test_random_boxes_follow_the_composer_law_and_seed():
    base = np.zeros((60, 80, 3), np.uint8)
    donors = _constant_donors()
    for seed in range(30):
        composite = CutMixComposer()(base, donors, np.random.default_rng(seed))
        np.testing.assert_array_equal(random_boxes(60, 80, np.random.default_rng(seed)), composite.boxes)
        everything = CutMixComposer(occlusion_threshold=KEEP_ALL)(base, donors, np.random.default_rng(seed))
        np.testing.assert_array_equal(
            random_boxes(60, 80, np.random.default_rng(seed), occlusion_threshold=None), everything.boxes
        )
    custom = dict(area_range=(0.1, 0.2), aspect_range=(0.5, 2.0))
    composite = CutMixComposer(max_pastes=3, **custom)(base, donors, np.random.default_rng(7))
    np.testing.assert_array_equal(
        random_boxes(60, 80, np.random.default_rng(7), max_boxes=3, **custom), composite.boxes
    )


def test_determinism_given_the_seed():
    base, donors = _textured(0, 50, 70), [_textured(1, 40, 40), _textured(2, 64, 30)]
    composer = CutMixComposer(feather=2)
    first, again = composer(base, donors, np.random.default_rng(5)), composer(base, donors, np.random.default_rng(5))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.boxes, again.boxes)
    assert first.donor_indices == again.donor_indices
    assert all(np.array_equal(a, b) for a, b in zip(first.pastes, again.pastes))
    other = composer(base, donors, np.random.default_rng(6))
    assert not np.array_equal(first.image, other.image)
    np.testing.assert_array_equal(base, _textured(0, 50, 70))  # the base is not modified


def test_feathering_only_changes_border_pixels():
    feather = 3
    base, donors = _textured(10, 64, 64), [_textured(11, 50, 50), _textured(12, 30, 90)]
    for seed in range(10):
        hard = CutMixComposer(occlusion_threshold=KEEP_ALL)(base, donors, np.random.default_rng(seed))
        soft = CutMixComposer(occlusion_threshold=KEEP_ALL, feather=feather)(base, donors, np.random.default_rng(seed))
        np.testing.assert_array_equal(hard.boxes, soft.boxes)
        assert all(np.array_equal(a, b) for a, b in zip(hard.pastes, soft.pastes))  # pastes stay un-blended
        border_band = np.zeros((64, 64), bool)
        for x1, y1, x2, y2 in hard.boxes.astype(int):
            border_band[y1:y2, x1:x2] = True
            border_band[y1 + feather : y2 - feather, x1 + feather : x2 - feather] = False
        changed = (hard.image != soft.image).any(axis=2)
        assert changed.any()
        assert not (changed & ~border_band).any()
    # a paste's outermost ring is blended half-way at feather=1: alpha = (0 + 1) / (1 + 1)
    composer = CutMixComposer(max_pastes=1, area_range=(0.25, 0.25), aspect_range=(1, 1), feather=1)
    black, white = np.zeros((40, 40, 3), np.uint8), np.full((20, 20, 3), 255, np.uint8)
    composite = composer(black, [white], np.random.default_rng(0))
    ((x1, y1, x2, y2),) = composite.boxes.astype(int)
    region = composite.image[y1:y2, x1:x2, 0]
    assert (region[0] == 128).all() and (region[:, -1] == 128).all() and (region[1:-1, 1:-1] == 255).all()


# -- conversions and inputs ----------------------------------------------------------------------------------


def test_normalized_cxcywh_numpy_and_torch():
    boxes = np.array([[0, 0, 100, 50], [10, 20, 30, 60]], np.float32)
    expected = [[0.25, 0.25, 0.5, 0.5], [0.1, 0.4, 0.1, 0.4]]
    np.testing.assert_allclose(boxes_to_normalized_cxcywh(boxes, height=100, width=200), expected, rtol=1e-6)
    converted = boxes_to_normalized_cxcywh(torch.tensor(boxes), 100, 200)
    assert isinstance(converted, torch.Tensor) and converted.dtype == torch.float32
    torch.testing.assert_close(converted, torch.tensor(expected))
    assert boxes_to_normalized_cxcywh(np.zeros((0, 4)), 10, 10).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        boxes_to_normalized_cxcywh(np.zeros((2, 3)), 10, 10)


def test_inputs_and_parameters_are_checked():
    base = Image.fromarray(_textured(0, 30, 40)).convert("L")  # PIL images of any mode are made RGB
    composite = CutMixComposer()(base, [Image.fromarray(_textured(1, 20, 20))], np.random.default_rng(0))
    assert isinstance(composite, CutMixComposite) and composite.image.shape == (30, 40, 3)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        CutMixComposer()(base, [base], torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        random_boxes(10, 10, 0)
    with pytest.raises(ValueError, match="at least one donor"):
        CutMixComposer()(base, [], np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        CutMixComposer()(np.zeros((10, 10), np.uint8), [base], np.random.default_rng(0))
    for bad in (
        {"max_pastes": 0},
        {"area_range": (0.5, 0.1)},
        {"area_range": (0.1, 1.5)},
        {"aspect_range": (0, 3)},
        {"occlusion_threshold": 1.5},
        {"feather": -1},
        {"donor_crop_scale": (0, 1)},
    ):
        with pytest.raises(ValueError):
            CutMixComposer(**bad)


# -- Selective Search ----------------------------------------------------------------------------------------


def test_selective_search_boxes_inside_the_image():
    cv2 = pytest.importorskip("cv2", reason="the selective-search extra (opencv-contrib-python-headless) is missing")
    if not hasattr(cv2, "ximgproc"):
        pytest.skip("OpenCV without the contrib modules (ximgproc)")
    image = np.zeros((90, 150, 3), np.uint8)
    image[10:50, 20:70] = (200, 40, 40)
    image[40:85, 90:140] = (40, 40, 220)
    image += _textured(0, 90, 150) // 16
    for top_k, resize in ((30, 128), (5, 128), (10, None)):
        boxes = selective_search_boxes(Image.fromarray(image), top_k=top_k, resize=resize)
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and 0 < len(boxes) <= top_k
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 150).all() and (boxes[:, 3] <= 90).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert cv2.getNumThreads() == 1
    with pytest.raises(ValueError, match="top_k"):
        selective_search_boxes(image, top_k=0)


def test_selective_search_without_the_extra_names_it(monkeypatch):
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2" or name.startswith("cv2."):
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "cv2", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(ImportError, match=r"pip install 'hf-useg\[selective-search\]'"):
        selective_search_boxes(np.zeros((20, 20, 3), np.uint8))


# -- drawing -------------------------------------------------------------------------------------------------


def test_draw_composite_and_boxes(tmp_path):
    pytest.importorskip("matplotlib", reason="the detection extra (matplotlib) is missing")
    from hf_useg.visualization import draw_boxes, draw_composite

    composite = CutMixComposer()(_textured(0, 60, 80), [_textured(1, 30, 30)], np.random.default_rng(0))
    ax = draw_composite(composite)
    assert len(ax.patches) == len(composite.boxes) and len(ax.texts) == len(composite.boxes)
    assert "boxes kept" in ax.get_title()
    ax.figure.savefig(tmp_path / "composite.png")
    assert Image.open(tmp_path / "composite.png").size[0] > 100
    ax = draw_boxes(_textured(0, 60, 80), torch.tensor([[1.0, 2.0, 30.0, 40.0]]), labels=["x"], title="t")
    assert len(ax.patches) == 1 and ax.texts[0].get_text() == "x"
    with pytest.raises(ValueError, match="1 labels for 2 boxes"):
        draw_boxes(_textured(0, 60, 80), [[0, 0, 5, 5], [1, 1, 4, 4]], labels=["x"])
