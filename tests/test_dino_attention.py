"""DINO attention-mask baseline (METHODS 4.2): the 60% mass rule, the model's attention mode and the figure helper."""

import numpy as np
import pytest
import torch
from PIL import Image
from segmenter_tester import RELOAD_TOLERANCE
from tiny_configs import tiny_vit_config

from hf_useg import DinoForUnsupervisedSegmentation, DinoSegmentationConfig
from hf_useg.models.dino import DinoAttentionPrediction, attention_mass_mask
from hf_useg.visualization import color_palette, draw_attention_heads

TINY_VIT = tiny_vit_config(num_hidden_layers=2, num_attention_heads=4)


def tiny_model(**kwargs) -> DinoForUnsupervisedSegmentation:
    torch.manual_seed(0)
    config = DinoSegmentationConfig(backbone_config=TINY_VIT, num_clusters=3, mode="attention", **kwargs)
    return DinoForUnsupervisedSegmentation(config)


# -- the 60% rule -------------------------------------------------------------------------------------------------


def test_mass_mask_keeps_the_weight_that_crosses_the_threshold():
    # sorted: 0.4 (before: 0) , 0.3 (before: 0.4 < 0.6) kept; 0.2 (before: 0.7) and 0.1 dropped -> 0.7 kept
    mask = attention_mass_mask(torch.tensor([0.1, 0.4, 0.2, 0.3]), threshold=0.6)
    assert mask.tolist() == [False, True, False, True]


def test_mass_mask_stops_on_an_exact_60_percent_sum():
    # 3 + 3 = 6 = 0.6 * 10 exactly: the 2s are not needed
    assert attention_mass_mask(torch.tensor([3.0, 2.0, 3.0, 2.0]), 0.6).tolist() == [True, False, True, False]
    # just above 60% the 2s are needed, and equal weights are kept together (both 2s, not one of them)
    assert attention_mass_mask(torch.tensor([3.0, 2.0, 3.0, 2.0]), 0.61).tolist() == [True] * 4
    # the weights need not be normalised: the same vector scaled by 1/10 (0.6 of 1.0, in float64)
    mask = attention_mass_mask(torch.tensor([0.3, 0.2, 0.3, 0.2], dtype=torch.float64), 0.6)
    assert mask.tolist() == [True, False, True, False]


def test_mass_mask_keeps_ties_together_whatever_their_order():
    # 0.4 alone is below 0.6; the three 0.2s share the next rank: all kept (1.0 of the mass), never 1 or 2 of them
    weights = torch.tensor([0.2, 0.4, 0.2, 0.2])
    assert attention_mass_mask(weights, 0.6).tolist() == [True, True, True, True]
    # ties after the crossing are all dropped
    assert attention_mass_mask(torch.tensor([5.0, 1.0, 4.0, 1.0, 1.0]), 0.6).tolist() == [
        True,
        False,
        True,
        False,
        False,
    ]
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (30,), generator=generator).double()  # many ties
    for _ in range(5):
        order = torch.randperm(30, generator=generator)
        assert torch.equal(attention_mass_mask(values[order], 0.6), attention_mass_mask(values, 0.6)[order])


def test_mass_mask_matches_dinos_cumsum_rule_without_ties():
    """Reference written from DINO's visualize_attention: sort ascending, normalise, keep cumsum > 1 - threshold."""
    generator = torch.Generator().manual_seed(1)
    attention = torch.rand(2, 3, 50, generator=generator, dtype=torch.float64)
    for threshold in (0.3, 0.6, 0.9):
        expected = torch.zeros_like(attention, dtype=torch.bool)
        for b in range(2):
            for h in range(3):
                row = attention[b, h]
                values, order = torch.sort(row)
                cumulative = torch.cumsum(values / values.sum(), 0)
                expected[b, h, order] = cumulative > 1 - threshold
        assert torch.equal(attention_mass_mask(attention.float(), threshold), expected)
        kept = (attention * attention_mass_mask(attention, threshold)).sum(-1) / attention.sum(-1)
        assert (kept >= threshold).all()


def test_mass_mask_edges_and_bad_input():
    assert attention_mass_mask(torch.tensor([0.5, 0.0, 0.5]), 1.0).tolist() == [True, False, True]
    assert attention_mass_mask(torch.zeros(3), 0.6).tolist() == [False] * 3
    with pytest.raises(ValueError, match="non-negative"):
        attention_mass_mask(torch.tensor([0.5, -0.1]), 0.6)
    with pytest.raises(ValueError, match="threshold"):
        attention_mass_mask(torch.tensor([0.5, 0.5]), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        attention_mass_mask(torch.tensor([0.5, float("nan")]), 0.6)
    with pytest.raises(TypeError, match="floating"):
        attention_mass_mask(torch.tensor([1, 2]), 0.6)


# -- the model's attention mode -----------------------------------------------------------------------------------


def test_attention_mode_predicts_per_head_masks_without_fitting():
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 32, 48)
    prediction = model.predict(pixel_values, flip_tta=False)
    assert isinstance(prediction, DinoAttentionPrediction)
    assert prediction.cluster_log_probs is None
    assert prediction.attention_masks.shape == (2, 4, 32, 48) and prediction.attention_masks.dtype == torch.bool
    assert prediction.attention_maps.shape == (2, 4, 32, 48)

    attention = model.backbone(pixel_values, output_cls_attention=True).cls_attention  # [2, 4, 4, 6]
    expected_masks = attention_mass_mask(attention.flatten(2), 0.6).reshape(attention.shape)
    # every 8x8 patch is filled with its patch value
    assert torch.equal(prediction.attention_masks[:, :, ::8, ::8], expected_masks)
    assert torch.equal(prediction.attention_masks, expected_masks.repeat_interleave(8, 2).repeat_interleave(8, 3))
    torch.testing.assert_close(prediction.attention_maps[:, :, ::8, ::8], attention)
    # each head keeps at least 60% of its mass on the patch grid
    kept = (attention * expected_masks).flatten(2).sum(-1) / attention.flatten(2).sum(-1)
    assert (kept >= 0.6).all() and (kept < 1).all()


def test_attention_threshold_output_size_and_flip_tta():
    model = tiny_model(attention_threshold=0.3)
    pixel_values = torch.randn(1, 3, 32, 32)
    narrow = model.predict(pixel_values, flip_tta=False, output_size=(4, 4)).attention_masks
    wide = model.attention_masks(pixel_values, threshold=0.9, output_size=(4, 4)).attention_masks
    assert narrow.shape == (1, 4, 4, 4)
    assert (narrow <= wide).all() and wide.sum() > narrow.sum()  # a larger mass keeps a superset

    tta = model.predict(pixel_values, flip_tta=True, output_size=(4, 4))
    plain = model.backbone(pixel_values, output_cls_attention=True).cls_attention
    mirrored = model.backbone(pixel_values.flip(-1), output_cls_attention=True).cls_attention.flip(-1)
    average = (plain + mirrored) / 2
    torch.testing.assert_close(tta.attention_maps, average)
    assert torch.equal(tta.attention_masks, attention_mass_mask(average.flatten(2), 0.3).reshape(average.shape))


def test_attention_mode_bad_requests():
    model = tiny_model()
    with pytest.raises(ValueError, match="crf"):
        model.predict(torch.randn(1, 3, 32, 32), crf=True)
    with pytest.raises(ValueError, match="threshold"):
        model.attention_masks(torch.randn(1, 3, 32, 32), threshold=1.5)
    with pytest.raises(ValueError, match="patch size"):
        model.predict(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="mode"):
        DinoSegmentationConfig(backbone_config=TINY_VIT, mode="heads")
    # k-means mode still needs fitted centroids
    model.config.mode = "kmeans"
    with pytest.raises(ValueError, match="no fitted centroids"):
        model.predict(torch.randn(1, 3, 32, 32))


def test_attention_mode_survives_save_and_load(tmp_path):
    model = tiny_model(attention_threshold=0.5)
    model.save_pretrained(tmp_path)
    loaded = DinoForUnsupervisedSegmentation.from_pretrained(tmp_path)
    assert loaded.config.mode == "attention" and loaded.config.attention_threshold == 0.5
    pixel_values = torch.randn(1, 3, 32, 32)
    expected, got = model.predict(pixel_values), loaded.predict(pixel_values)
    # maps of two separately built models: equal up to the float tolerance; the masks (thresholded maps) exactly
    torch.testing.assert_close(got.attention_maps, expected.attention_maps, **RELOAD_TOLERANCE)
    assert torch.equal(got.attention_masks, expected.attention_masks)


# -- the figure ---------------------------------------------------------------------------------------------------


def test_draw_attention_heads_colours_each_mask():
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, :4, :4] = True  # head 0: top-left 4x4
    masks[1, 5:, 5:] = True  # head 1: bottom-right 3x3
    palette = np.array([[230, 25, 75], [0, 130, 200]], dtype=np.uint8)
    drawn = np.asarray(draw_attention_heads(image, masks, alpha=0.2, palette=palette))
    assert drawn.shape == (8, 8, 3)
    # interior: 0.8 * 100 + 0.2 * colour
    assert drawn[1, 1].tolist() == [126, 85, 95]
    assert drawn[6, 6].tolist() == [80, 106, 120]
    # boundary pixels (including along the image border) are drawn in the full colour
    for row, col in ((0, 0), (3, 1), (1, 3), (0, 2)):
        assert drawn[row, col].tolist() == [230, 25, 75]
    assert drawn[5, 5].tolist() == [0, 130, 200] and drawn[7, 7].tolist() == [0, 130, 200]
    # untouched elsewhere
    assert drawn[4, 4].tolist() == [100, 100, 100] and drawn[0, 7].tolist() == [100, 100, 100]
    assert drawn[2, 2].tolist() == [126, 85, 95]


def test_draw_attention_heads_upsamples_patch_maps():
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]])  # one head on a 2x2 grid -> 4x2 pixel blocks
    drawn = np.asarray(draw_attention_heads(image, maps, alpha=0.5, palette=np.array([[200, 100, 40]], np.uint8)))
    assert drawn.shape == (4, 8, 3)
    assert drawn[0, 5].tolist() == [100, 50, 20]  # the head's peak: weight alpha
    assert drawn[3, 0].tolist() == [50, 25, 10]  # half the peak: weight alpha / 2
    assert drawn[0, 0].tolist() == [0, 0, 0] and drawn[3, 7].tolist() == [0, 0, 0]


def test_draw_attention_heads_on_a_model_prediction_and_bad_input():
    model = tiny_model()
    prediction = model.predict(torch.randn(1, 3, 32, 32), flip_tta=False)
    figure = draw_attention_heads(np.zeros((32, 32, 3), np.uint8), prediction.attention_masks[0])
    assert figure.size == (32, 32)
    colours = {tuple(c) for c in np.asarray(figure).reshape(-1, 3).tolist()}
    assert colours & {tuple(c) for c in color_palette(4).tolist()}  # at least one head's contour colour
    with pytest.raises(ValueError, match="heads, height, width"):
        draw_attention_heads(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="palette"):
        draw_attention_heads(np.zeros((8, 8, 3), np.uint8), np.zeros((3, 8, 8), bool), palette=color_palette(2))
    with pytest.raises(TypeError, match="bool masks or float maps"):
        draw_attention_heads(np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8), np.int64))
    with pytest.raises(ValueError, match="uint8"):
        draw_attention_heads(np.zeros((8, 8, 3), np.float32), np.zeros((1, 8, 8), bool))
