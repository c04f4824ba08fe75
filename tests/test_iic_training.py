"""IIC's data pipeline (colour jitter in torch, flip views with their affine), head alternation, the trainer recipe
(build, train, resume bit-for-bit, reload, evaluate) and the two-head evaluation with IID+."""

import colorsys
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import ViTConfig

from hf_useg.evaluation import UnsupervisedSegmentationMetric, fit_and_score
from hf_useg.models.iic import IicForUnsupervisedSegmentation, color_jitter, head_for_step, make_iic_views
from hf_useg.models.iic.training_iic import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    build_model,
    evaluate_iic_heads,
    hsv_to_rgb,
    rgb_to_hsv,
)
from hf_useg.trainer import latest_checkpoint, load_training_arguments, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "iic_tiny.yaml"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
IDENTITY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


# --------------------------------------------------------------------------------------------------------------
# colour jitter


def test_hsv_conversions_match_colorsys():
    torch.manual_seed(0)
    pixels = torch.rand(3, 5, 7, dtype=torch.float64)
    pixels[:, 0, 0] = 0.5  # grey: hue and saturation 0
    pixels[:, 0, 1] = 0.0  # black
    pixels[:, 0, 2] = torch.tensor([0.8, 0.8, 0.2])  # red == green is the maximum
    hsv = rgb_to_hsv(pixels)
    for y in range(5):
        for x in range(7):
            expected = colorsys.rgb_to_hsv(*pixels[:, y, x].tolist())
            torch.testing.assert_close(hsv[:, y, x], torch.tensor(expected, dtype=torch.float64))
            rgb = colorsys.hsv_to_rgb(*hsv[:, y, x].tolist())
            torch.testing.assert_close(hsv_to_rgb(hsv)[:, y, x], torch.tensor(rgb, dtype=torch.float64))
    torch.testing.assert_close(hsv_to_rgb(hsv), pixels)


def test_adjustments_by_hand():
    image = torch.tensor([[[0.2, 0.8]], [[0.4, 0.6]], [[0.6, 0.1]]])  # [3, 1, 2]
    torch.testing.assert_close(
        adjust_brightness(image, 1.5), torch.tensor([[[0.3, 1.0]], [[0.6, 0.9]], [[0.9, 0.15]]])
    )
    grey = 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]  # torchvision's weights
    mean = grey.mean()
    torch.testing.assert_close(adjust_contrast(image, 0.5), 0.5 * image + 0.5 * mean)
    torch.testing.assert_close(adjust_saturation(image, 0.0), grey.expand(3, 1, 2))
    torch.testing.assert_close(adjust_saturation(image, 1.2), (1.2 * image - 0.2 * grey).clamp(0, 1))
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    torch.testing.assert_close(adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1))
    torch.testing.assert_close(adjust_hue(red, -1 / 3), torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1))


def test_color_jitter_draws_order_then_factors_from_the_generator():
    torch.manual_seed(0)
    image = torch.rand(3, 6, 6)
    out = color_jitter(image, torch.Generator().manual_seed(5), 0.4, 0.3, 0.2, 0.1)
    # the documented draw order, replayed by hand
    generator = torch.Generator().manual_seed(5)
    order = torch.randperm(4, generator=generator).tolist()
    draws = [float(torch.rand((), generator=generator, dtype=torch.float64)) for _ in range(4)]
    factors = [0.6 + 0.8 * draws[0], 0.7 + 0.6 * draws[1], 0.8 + 0.4 * draws[2], -0.1 + 0.2 * draws[3]]
    expected = image
    for index in order:
        expected = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)[index](expected, factors[index])
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, image)
    other = color_jitter(image, torch.Generator().manual_seed(6), 0.4, 0.3, 0.2, 0.1)
    assert not torch.allclose(out, other)
    # strength 0 everywhere: nothing changes (and no factor is drawn)
    assert torch.equal(color_jitter(image, torch.Generator().manual_seed(5), 0, 0, 0, 0), image)


# --------------------------------------------------------------------------------------------------------------
# views


def test_flip_only_views_and_their_affine_recover_view_one():
    torch.manual_seed(0)
    pixel_values = (torch.rand(3, 3, 8, 10) - MEAN) / STD  # normalised images (view 2 is built in [0, 1])
    no_jitter = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    views = make_iic_views(pixel_values, torch.Generator().manual_seed(0), flip_p=1.0, **no_jitter)
    assert views.flipped.tolist() == [True] * 3 and views.pixel_values is pixel_values
    torch.testing.assert_close(views.pixel_values_pair, pixel_values.flip(-1))  # only un/re-normalisation rounding
    assert views.affine2_to_1.tolist() == [[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]] * 3
    grid = F.affine_grid(views.affine2_to_1, list(pixel_values.shape), align_corners=False)
    warped = F.grid_sample(views.pixel_values_pair, grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(warped, pixel_values, atol=1e-5, rtol=0)
    assert torch.equal(views.mask, torch.ones(3, 8, 10))
    kept = make_iic_views(pixel_values, torch.Generator().manual_seed(0), flip_p=0.0, **no_jitter)
    assert not kept.flipped.any() and torch.equal(kept.affine2_to_1, IDENTITY.expand(3, 2, 3))
    torch.testing.assert_close(kept.pixel_values_pair, pixel_values)


def test_views_jitter_view_two_in_image_space_and_are_deterministic():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8)
    pixel_values = (images - MEAN) / STD
    views = make_iic_views(pixel_values, torch.Generator().manual_seed(3))
    again = make_iic_views(pixel_values, torch.Generator().manual_seed(3))
    assert torch.equal(views.pixel_values_pair, again.pixel_values_pair) and torch.equal(views.flipped, again.flipped)
    # replay: per image, the jitter draws, then the flip draw
    generator = torch.Generator().manual_seed(3)
    for index in range(4):
        jittered = color_jitter(images[index], generator, 0.4, 0.4, 0.4, 0.125)
        flip = float(torch.rand((), generator=generator, dtype=torch.float64)) < 0.5
        assert flip == bool(views.flipped[index])
        expected = (jittered - MEAN) / STD
        torch.testing.assert_close(views.pixel_values_pair[index], expected.flip(-1) if flip else expected)
        row = -1.0 if flip else 1.0
        assert views.affine2_to_1[index].tolist() == [[row, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_flip_probability_is_respected():
    views = make_iic_views(torch.zeros(400, 3, 2, 2), torch.Generator().manual_seed(0), flip_p=0.5)
    assert 0.42 < views.flipped.float().mean().item() < 0.58
    views = make_iic_views(torch.zeros(100, 3, 2, 2), torch.Generator().manual_seed(0), flip_p=0.1)
    assert views.flipped.float().mean().item() < 0.2


def test_mask_unlabelled_keeps_valid_label_pixels_only():
    labels = torch.tensor([[[0, 1], [-1, 3]]])
    views = make_iic_views(
        torch.zeros(1, 3, 2, 2), torch.Generator(), labels=labels, num_classes=3, mask_unlabelled=True
    )
    assert views.mask.tolist() == [[[1.0, 1.0], [0.0, 0.0]]]
    with pytest.raises(ValueError, match="mask_unlabelled needs the training labels"):
        make_iic_views(torch.zeros(1, 3, 2, 2), torch.Generator(), mask_unlabelled=True)
    with pytest.raises(ValueError, match="labels must be"):
        make_iic_views(
            torch.zeros(1, 3, 2, 2), torch.Generator(), labels=labels[:, :1], num_classes=3, mask_unlabelled=True
        )
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        make_iic_views(torch.zeros(3, 2, 2), torch.Generator())
    with pytest.raises(ValueError, match="flip_p"):
        make_iic_views(torch.zeros(1, 3, 2, 2), torch.Generator(), flip_p=2.0)


# --------------------------------------------------------------------------------------------------------------
# alternation and model building


def test_head_alternation():
    assert [head_for_step(s, 3, 2) for s in range(10)] == list("BBAAABBAAA")
    assert [head_for_step(s, 1, 2, head_a_first=True) for s in range(6)] == list("ABBABB")
    with pytest.raises(ValueError, match="phase lengths"):
        head_for_step(0, 0, 1)


def _args(**kwargs):
    return SimpleNamespace(**{"model": {}, "preset": None, **kwargs})


def test_build_model_picks_the_trunk_from_the_backbone_option():
    model = build_model(
        _args(model={"vgg_channels": [4, 4, 8, 8, 8, 8], "learning_rate": "1e-4", "lamb_b": 2}), None, 11
    )
    config = model.config
    assert config.trunk == "vgg" and config.num_classes == 11 and config.num_overclusters == 33
    assert config.learning_rate == 1e-4 and config.lamb_b == 2.0  # YAML strings/ints become floats
    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8)
    assert build_model(_args(), vit, 4).config.trunk == "backbone"
    preset = build_model(_args(preset="cocostuff3", model={"vgg_channels": [4, 4, 8, 8, 8, 8]}), None, 3)
    assert preset.config.num_overclusters == 15 and preset.config.lamb_b == 1.5
    with pytest.raises(ValueError, match="backbone: none"):
        build_model(_args(model={"trunk": "vgg"}), vit, 4)
    with pytest.raises(ValueError, match="needs a backbone"):
        build_model(_args(model={"trunk": "backbone"}), None, 4)
    with pytest.raises(ValueError, match="model.learning_rate must be a number"):
        build_model(_args(model={"learning_rate": "fast"}), None, 4)


def test_backbone_none_is_refused_for_methods_that_need_a_backbone():
    from hf_useg.trainer import build_model as trainer_build_model

    with pytest.raises(ValueError, match="needs one"):
        trainer_build_model(load_training_arguments(None, method="dino_kmeans", backbone="none"), 3)


# --------------------------------------------------------------------------------------------------------------
# end to end through the trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("iic-full")
    summary = train(load_training_arguments(TINY, output_dir=str(output)))
    return output, summary


@pytest.mark.slow
def test_tiny_run_trains_both_heads_and_writes_a_model_folder(uninterrupted):
    output, summary = uninterrupted
    model_dir = output / "model"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json"):
        assert (model_dir / name).exists(), name
    assert summary["method"] == "iic" and summary["steps"] == 8
    assert summary["backbone"] == "none (trunk trained from scratch)"
    # the trainer's final evaluation is head B with Hungarian matching; the recipe adds head A and IID+
    assert summary["head_b_hungarian_accuracy"] == pytest.approx(summary["cluster_accuracy"])
    for key in ("head_a_majority", "head_a_majority_iid_plus", "head_b_hungarian_iid_plus"):
        assert 0.0 <= summary[f"{key}_accuracy"] <= 1.0 and 0.0 <= summary[f"{key}_mean_iou"] <= 1.0
    saved = json.loads((model_dir / "training_summary.json").read_text())
    assert saved["head_a_majority_accuracy"] == summary["head_a_majority_accuracy"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "iic" and config["trunk"] == "vgg" and config["backbone_config"] is None
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = {line["step"]: line for line in lines if "train/loss" in line}
    # phases of 2 steps, head B first: steps 1-2 B, 3-4 A, 5-6 B, 7-8 A (logged every 2 steps)
    assert [("train/loss_head_b" in losses[s]) for s in (2, 4, 6, 8)] == [True, False, True, False]
    assert all(line["train/loss"] < 0 for line in losses.values())  # -MI
    assert any("val/cluster_mean_iou" in line for line in lines)
    assert latest_checkpoint(output).name == "checkpoint-00000008"


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    full_output, _ = uninterrupted
    interrupted = tmp_path / "resumed"
    train(load_training_arguments(TINY, output_dir=str(interrupted), max_steps=4))
    assert latest_checkpoint(interrupted).name == "checkpoint-00000004"
    summary = train(load_training_arguments(TINY, output_dir=str(interrupted), resume_from_checkpoint="latest"))
    assert summary["steps"] == 8
    expected = load_file(str(full_output / "model" / "model.safetensors"))
    resumed = load_file(str(interrupted / "model" / "model.safetensors"))
    assert expected.keys() == resumed.keys() and any("running_mean" in key for key in expected)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_reloaded_model_evaluates_both_heads_with_iid_plus(uninterrupted):
    from hf_useg.data import make_synthetic_scenes
    from hf_useg.image_processing import protocol_image_processor
    from hf_useg.inference import evaluate_segmenter

    output, _ = uninterrupted
    model = IicForUnsupervisedSegmentation.from_pretrained(output / "model").eval()
    assert model.config.vgg_channels == [8, 8, 16, 16, 16, 16]
    processor = protocol_image_processor(32)
    val = make_synthetic_scenes(6, 32, 3, seed=11)
    fit = make_synthetic_scenes(6, 32, 3, seed=12)
    results = evaluate_iic_heads(model, val, processor, 3, fit_dataset=fit, batch_size=4)
    reference = evaluate_segmenter(model, val, processor, 3, batch_size=4, progress=False)["cluster"]
    np.testing.assert_array_equal(results["head_b_hungarian"]["confusion_matrix"], reference["confusion_matrix"])
    assert results["head_b_hungarian"]["accuracy"] == reference["accuracy"]
    # head A: majority matching of predict(head="A"), built independently here
    metric = UnsupervisedSegmentationMetric(3, num_clusters=9, matching="majority")
    for start in range(0, 6, 3):
        batch = [
            processor(val[i]["image"], segmentation_maps=val[i]["label"], return_tensors="pt")
            for i in (start, start + 1, start + 2)
        ]
        pixel_values = torch.cat([b["pixel_values"] for b in batch])
        labels = torch.cat([b["labels"] for b in batch]).long()
        labels[labels >= 3] = -1
        metric.update(model.predict(pixel_values, head="A").cluster_log_probs.argmax(1), labels)
    head_a = metric.compute()
    np.testing.assert_array_equal(results["head_a_majority"]["confusion_matrix"], head_a["confusion_matrix"])
    assert results["head_a_majority"]["accuracy"] == pytest.approx(head_a["accuracy"])
    # IID+: the matching fitted on `fit` and applied to `val`
    fit_only = evaluate_iic_heads(model, fit, processor, 3, batch_size=4)
    expected = fit_and_score(fit_only["head_a_majority"]["confusion_matrix"], head_a["confusion_matrix"], "majority")
    np.testing.assert_array_equal(results["head_a_majority_iid_plus"]["assignment"], expected["assignment"])
    assert results["head_a_majority_iid_plus"]["accuracy"] == pytest.approx(expected["accuracy"])
