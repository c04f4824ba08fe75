"""IIC's data pipeline (colour jitter in torch, flip views with their affine), head alternation, the training
recipe (options and presets, build, views in the DataLoader, train, resume bit-for-bit, reload, evaluate) and the
two-head evaluation with IID+ (also split over two processes)."""

import colorsys
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_configs import tiny_vit_config

from hf_useg.evaluation import UnsupervisedSegmentationMetric, fit_and_score
from hf_useg.models.iic import IicConfig, IicForUnsupervisedSegmentation, color_jitter, head_for_step, make_iic_views
from hf_useg.models.iic.training_iic import (
    IicRecipe,
    IicTrainingOptions,
    IicViewCollator,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    evaluate_iic_heads,
    hsv_to_rgb,
    rgb_to_hsv,
)
from hf_useg.training import (
    BatchIndex,
    latest_checkpoint,
    load_training_arguments,
    resolve_recipe_options,
    step_generator,
    train,
)
from hf_useg.training import build_model as loop_build_model

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


def _recipe(**overrides) -> IicRecipe:
    args = load_training_arguments(None, method="iic", **overrides)
    return IicRecipe(args, resolve_recipe_options(args))


def test_build_model_picks_the_trunk_from_the_backbone_option():
    # learning_rate under model: (files of the previous release) is a recipe option now
    recipe = _recipe(model={"vgg_channels": [4, 4, 8, 8, 8, 8], "learning_rate": "1e-4", "lamb_b": 2})
    assert recipe.args.recipe == {"learning_rate": "1e-4"} and "learning_rate" not in recipe.args.model
    config = recipe.build_model(None, 11).config
    assert config.trunk == "vgg" and config.num_classes == 11 and config.num_overclusters == 33
    assert recipe.options.learning_rate == 1e-4 and config.lamb_b == 2.0  # YAML strings/ints become numbers
    vit = tiny_vit_config(image_size=224, layer_norm_eps=1e-12)
    assert _recipe().build_model(vit, 4).config.trunk == "backbone"
    preset = _recipe(preset="cocostuff3", model={"vgg_channels": [4, 4, 8, 8, 8, 8]})
    assert (
        preset.build_model(None, 3).config.num_overclusters == 15 and preset.build_model(None, 3).config.lamb_b == 1.5
    )
    assert preset.options.batch_size == 120 and preset.options.mask_unlabelled
    with pytest.raises(ValueError, match="backbone: none"):
        _recipe(model={"trunk": "vgg"}).build_model(vit, 4)
    with pytest.raises(ValueError, match="needs a backbone"):
        _recipe(model={"trunk": "backbone"}).build_model(None, 4)
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        _recipe(model={"learning_rate": "fast"})


def test_backbone_none_is_refused_for_methods_that_need_a_backbone():
    class NeedsBackbone(IicRecipe):  # a recipe whose model always has an HF backbone
        def build_model(self, backbone_config, num_classes):
            vit = tiny_vit_config(patch_size=16, image_size=224, layer_norm_eps=1e-12)
            return IicForUnsupervisedSegmentation(IicConfig(backbone_config=vit, num_classes=num_classes))

    args = load_training_arguments(None, method="iic", backbone="none")
    with pytest.raises(ValueError, match="needs one"):
        loop_build_model(args, NeedsBackbone(args, resolve_recipe_options(args)), 3)


def test_options_hold_the_released_training_settings():
    defaults = IicTrainingOptions()
    assert (defaults.learning_rate, defaults.batch_size, defaults.resolution, defaults.eval_resolution) == (
        1e-4,
        120,
        128,
        128,
    )
    assert (defaults.max_steps, defaults.val_every, defaults.flip_p, defaults.mask_unlabelled) == (
        20000,
        500,
        0.5,
        False,
    )
    assert (defaults.jitter_brightness, defaults.jitter_contrast, defaults.jitter_saturation, defaults.jitter_hue) == (
        0.4,
        0.4,
        0.4,
        0.125,
    )
    assert (defaults.head_a_first, defaults.head_a_steps, defaults.head_b_steps) == (False, None, None)
    coco = IicTrainingOptions.from_preset("cocostuff3")
    assert (coco.learning_rate, coco.batch_size, coco.resolution, coco.mask_unlabelled) == (1e-4, 120, 128, True)
    potsdam = IicTrainingOptions.from_preset("potsdam3", max_steps=5)
    assert (potsdam.learning_rate, potsdam.resolution, potsdam.eval_resolution, potsdam.jitter_hue) == (
        1e-5,
        200,
        200,
        0.1,
    )
    assert potsdam.max_steps == 5 and potsdam.batch_size == 75 and potsdam.mask_unlabelled
    assert set(IicTrainingOptions.presets) == {"cocostuff3", "potsdam3"}
    assert IicTrainingOptions(flip_p=1, learning_rate="1e-3").flip_p == 1.0  # YAML ints and strings
    # the YAML files: training settings at the top level, the architecture under model:
    args = load_training_arguments(TINY)
    assert args.recipe["learning_rate"] == 1e-3 and args.recipe["head_a_steps"] == 2 and args.recipe["max_steps"] == 8
    assert "learning_rate" not in args.model and args.model["num_overclusters"] == 9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(flip_p=1.5), "flip_p"),
        (dict(jitter_hue=0.7), "jitter_hue"),
        (dict(jitter_contrast=-0.1), "jitter_contrast"),
        (dict(head_a_steps=0), "head_a_steps"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_option_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IicTrainingOptions(**kwargs)


def test_the_collate_builds_the_views_of_the_step_generator_and_names_the_head():
    torch.manual_seed(0)
    items = [
        {"pixel_values": torch.randn(3, 8, 8), "labels": torch.randint(-1, 4, (8, 8)), "index": i} for i in range(3)
    ]
    options = IicTrainingOptions(mask_unlabelled=True, flip_p=0.7)
    keys = [BatchIndex(index=i, step=4, seed=1234, position=i, batch_size=3) for i in range(3)]
    collate = IicViewCollator(
        options, MEAN.flatten().tolist(), STD.flatten().tolist(), 3, head_a_steps=2, head_b_steps=3
    )
    batch = collate(list(zip(keys, items)))
    pixel_values = torch.stack([item["pixel_values"] for item in items])
    labels = torch.stack([item["labels"] for item in items])
    views = make_iic_views(
        pixel_values, step_generator(keys[0]), flip_p=0.7, labels=labels, num_classes=3, mask_unlabelled=True
    )
    assert batch["head"] == head_for_step(4, 2, 3) == "A"
    for name in ("pixel_values", "pixel_values_pair", "affine2_to_1", "mask"):
        assert torch.equal(batch[name], getattr(views, name)), name
    # with gradient accumulation the head follows the optimizer step
    accumulated = IicViewCollator(options, MEAN.flatten().tolist(), STD.flatten().tolist(), 3, 2, 3, accumulation=2)
    assert accumulated(list(zip(keys, items)))["head"] == head_for_step(2, 2, 3) == "B"


# --------------------------------------------------------------------------------------------------------------
# end to end through the training loop


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
def test_dataloader_workers_train_the_same_model(uninterrupted, tmp_path):
    # the views are built in the DataLoader's collate from the step's generator: the workers draw what the main
    # process draws
    full_output, _ = uninterrupted
    train(load_training_arguments(TINY, output_dir=str(tmp_path / "workers"), num_workers=2))
    expected = load_file(str(full_output / "model" / "model.safetensors"))
    actual = load_file(str(tmp_path / "workers" / "model" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    # worker processes run torch on one thread (the jitter's means may round differently): float tolerance
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    logged, reference = (
        [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for folder in (tmp_path / "workers", full_output)
    )
    assert [sorted(line) for line in logged] == [sorted(line) for line in reference]
    for line, expected_line in zip(logged, reference):
        assert line == pytest.approx(expected_line, rel=1e-5, abs=1e-6)


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


_HEADS_SCRIPT = """
import json, os, sys

import numpy as np
import torch
from accelerate import Accelerator

from hf_useg.data import make_synthetic_scenes
from hf_useg.image_processing import protocol_image_processor
from hf_useg.models.iic import IicConfig, IicForUnsupervisedSegmentation
from hf_useg.models.iic.training_iic import evaluate_iic_heads

accelerator = Accelerator()
torch.manual_seed(0)
config = IicConfig(vgg_channels=[8, 8, 16, 16, 16, 16], num_classes=3, num_overclusters=7, displacement=2)
model = IicForUnsupervisedSegmentation(config).eval()
val = make_synthetic_scenes(5, 32, 3, seed=11)  # 5 images, batches of 2: 2 processes would need padding
fit = make_synthetic_scenes(7, 32, 3, seed=12)
results = evaluate_iic_heads(
    model, val, protocol_image_processor(32), 3, fit_dataset=fit, batch_size=2, accelerator=accelerator
)
if accelerator.is_main_process:
    matrices = {name: np.asarray(values["confusion_matrix"]).tolist() for name, values in results.items()}
    with open(sys.argv[1], "w") as handle:
        json.dump({"world_size": accelerator.num_processes, "confusion": matrices}, handle)
accelerator.wait_for_everyone()
# gloo's threads torn down by the interpreter's exit can abort a rank ("terminate called without an active
# exception"); training/train.py ends multi-process runs the same way
os._exit(0)
"""


@pytest.mark.slow
def test_head_evaluation_over_two_cpu_processes_counts_every_image_once(tmp_path):
    """Both heads' confusion matrices (and IID+'s) from 2 processes (`accelerate launch`, gloo on the CPU) equal
    the single-process ones: each process scores its own images, no padding duplicates."""
    script = tmp_path / "heads.py"
    script.write_text(textwrap.dedent(_HEADS_SCRIPT))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), str(script), str(tmp_path / "two.json")]
    double = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert set(one["confusion"]) == {
        "head_b_hungarian",
        "head_a_majority",
        "head_b_hungarian_iid_plus",
        "head_a_majority_iid_plus",
    }
    assert two["confusion"] == one["confusion"]
    assert np.asarray(one["confusion"]["head_a_majority"]).sum() == 5 * 32 * 32  # every labelled pixel, once
