"""DINO self-distillation pretraining (METHODS 4.1): loss, centering, EMA, schedules, head, multi-crop, the recipe
options, and a tiny CPU run through the training loop whose exported backbone loads into STEGO."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tiny_configs import tiny_vit_config

from hf_useg import DinoForSelfSupervisedPretraining, DinoPretrainingConfig, StegoForUnsupervisedSegmentation
from hf_useg.augmentation import IMAGENET_MEAN, IMAGENET_STD
from hf_useg.augmentation import adjust_hue_pil as _adjust_hue
from hf_useg.backbones import FeatureBackbone
from hf_useg.models.dino import DinoHead, DinoLoss
from hf_useg.models.dino.modeling_dino_pretraining import (
    WeightNormLinear,
    clip_gradients_per_parameter,
    cosine_schedule,
    dino_schedule,
    linear_warmup,
)
from hf_useg.models.dino.multicrop import (
    DinoMultiCropAugmentation,
    collate_multicrop,
    color_jitter,
    random_resized_crop_box,
)
from hf_useg.models.dino.training_dino_pretraining import DinoPretrainingRecipe, DinoPretrainingTrainingOptions
from hf_useg.training import latest_checkpoint, load_training_arguments, train
from hf_useg.training import loop as training_loop

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "dino_pretrain_tiny.yaml"
# config.json of a model saved by the release before the recipes (training settings still in the config)
OLD_CONFIG = REPO / "tests" / "fixtures" / "dino_pretraining_config.json"

MICRO_VIT = tiny_vit_config()


def tiny_config(**overrides) -> DinoPretrainingConfig:
    values = dict(
        backbone_config=MICRO_VIT,
        out_dim=16,
        head_hidden_dim=24,
        head_bottleneck_dim=8,
        local_crops_number=2,
    )
    values.update(overrides)
    return DinoPretrainingConfig(**values)


def tiny_options(**overrides) -> DinoPretrainingTrainingOptions:
    return DinoPretrainingTrainingOptions(**{"global_crops_size": 32, "local_crops_size": 16, **overrides})


def tiny_model(**overrides) -> DinoForSelfSupervisedPretraining:
    torch.manual_seed(0)
    return DinoForSelfSupervisedPretraining(tiny_config(**overrides))


# -- loss ---------------------------------------------------------------------------------------------------------


def test_loss_hand_computed_two_prototypes():
    loss = DinoLoss(out_dim=2, student_temp=0.1)
    loss.center.copy_(torch.tensor([[0.3, -0.2]]))
    # teacher - center = [0.04 log 3, 0] -> softmax(/0.04) = [3/4, 1/4] for both global views
    teacher = (torch.tensor([0.04 * math.log(3), 0.0]) + loss.center[0]).reshape(1, 1, 2).repeat(2, 1, 1)
    # student / 0.1 = [0, log 3] -> log_softmax = [log 1/4, log 3/4] on every view
    student = torch.tensor([0.0, 0.1 * math.log(3)]).reshape(1, 1, 2).repeat(3, 1, 1)
    out = loss(student, teacher, teacher_temp=0.04)
    cross_entropy = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert out.loss.item() == pytest.approx(cross_entropy, rel=1e-6)
    assert out.teacher_entropy.item() == pytest.approx(entropy, rel=1e-6)
    assert out.kl_divergence.item() == pytest.approx(cross_entropy - entropy, rel=1e-5)
    assert out.teacher_batch_entropy.item() == pytest.approx(entropy, rel=1e-6)  # every row is the same


def test_batch_entropy_tells_diverse_sharp_targets_from_a_one_hot_collapse():
    loss = DinoLoss(out_dim=4)
    student = torch.zeros(3, 2, 4)
    diverse = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]).expand(2, 2, 4)  # two images, two prototypes
    out = loss(student, diverse, teacher_temp=0.001)
    assert out.teacher_entropy.item() == pytest.approx(0.0, abs=1e-6)
    assert out.teacher_batch_entropy.item() == pytest.approx(math.log(2), rel=1e-6)
    same = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(2, 2, 4)
    assert loss(student, same, teacher_temp=0.001).teacher_batch_entropy.item() == pytest.approx(0.0, abs=1e-6)


def test_centering_and_sharpening():
    loss = DinoLoss(out_dim=2)
    teacher = torch.tensor([1.0, 0.0]).reshape(1, 1, 2).repeat(2, 1, 1)
    student = torch.zeros(2, 1, 2)  # uniform student: loss = cross-entropy with a uniform = log 2 for any teacher
    # no center: softmax([1, 0] / 0.04) is practically one-hot
    assert loss(student, teacher, 0.04).teacher_entropy.item() == pytest.approx(0.0, abs=1e-9)
    # centred on the teacher output itself: uniform teacher, entropy log 2
    loss.center.copy_(torch.tensor([[1.0, 0.0]]))
    assert loss(student, teacher, 0.04).teacher_entropy.item() == pytest.approx(math.log(2), rel=1e-6)
    # sharpening: a lower temperature, a lower entropy; (t - c) = [0.5, 0]: softmax([0.5, 0] / 0.5) = [e/(e+1), ...]
    loss.center.zero_()
    teacher = torch.tensor([0.5, 0.0]).reshape(1, 1, 2).repeat(2, 1, 1)
    p = math.e / (math.e + 1)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert loss(student, teacher, 0.5).teacher_entropy.item() == pytest.approx(expected, rel=1e-6)
    assert loss(student, teacher, 0.04).teacher_entropy.item() < expected


def reference_dino_loss(student, teacher, center, student_temp, teacher_temp, skip_same_view=True):
    """From the METHODS text, with explicit loops in float64."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    total, pairs = 0.0, 0
    for g in range(teacher.shape[0]):
        q = F.softmax((teacher[g] - center) / teacher_temp, dim=-1)
        for v in range(student.shape[0]):
            if v == g and skip_same_view:
                continue
            log_p = F.log_softmax(student[v] / student_temp, dim=-1)
            total += (-(q * log_p).sum(-1)).mean().item()
            pairs += 1
    return total / pairs, pairs


def test_loss_skips_same_view_pairs():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 3, 7, generator=generator)  # 2 global + 3 local views, batch 3, 7 prototypes
    teacher = torch.randn(2, 3, 7, generator=generator)
    student[0] = teacher[0]  # a same-view pair would be the cheapest one: it must not count
    loss = DinoLoss(out_dim=7, student_temp=0.1)
    loss.center.copy_(torch.randn(1, 7, generator=generator))
    expected, pairs = reference_dino_loss(student, teacher, loss.center, 0.1, 0.05)
    assert pairs == 2 * 4
    value = loss(student, teacher, 0.05).loss.item()
    assert value == pytest.approx(expected, rel=1e-5)
    with_same_view, pairs = reference_dino_loss(student, teacher, loss.center, 0.1, 0.05, skip_same_view=False)
    assert pairs == 2 * 5 and value != pytest.approx(with_same_view, rel=1e-3)


def test_loss_rejects_mismatched_views():
    loss = DinoLoss(out_dim=4)
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(3, 2, 4), torch.randn(2, 3, 4), 0.04)
    with pytest.raises(ValueError, match="at least two views"):
        loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4), 0.04)


# -- center -------------------------------------------------------------------------------------------------------


def test_center_update_formula():
    loss = DinoLoss(out_dim=2, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[1.0, 2.0]]))
    teacher = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[5.0, 2.0], [7.0, 6.0]]])  # mean over views, batch: [4, 3]
    loss.update_center(teacher)
    torch.testing.assert_close(loss.center, torch.tensor([[0.9 * 1 + 0.1 * 4, 0.9 * 2 + 0.1 * 3]]))


def test_center_update_averages_over_processes(monkeypatch):
    """With torch.distributed initialised, the batch mean is over every process: simulate a second process whose
    teacher outputs sum to [8, 0] over 4 rows."""
    loss = DinoLoss(out_dim=2, center_momentum=0.5)
    other = torch.tensor([[8.0, 0.0]])

    def all_reduce(tensor):
        tensor.add_(other)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    loss.update_center(torch.tensor([[[0.0, 4.0], [0.0, 4.0]], [[0.0, 4.0], [0.0, 4.0]]]))  # sums to [0, 16]
    torch.testing.assert_close(loss.center, torch.tensor([[0.5 * 8 / 8, 0.5 * 16 / 8]]))


def test_forward_updates_the_center_in_training_mode_only():
    model = tiny_model()
    views = torch.randn(3, 2, 3, 32, 32), torch.randn(3, 2, 3, 16, 16)
    model.eval()
    out = model(*views)
    assert torch.equal(model.dino_loss.center, torch.zeros(1, 16))
    model.train()
    out = model(*views)
    expected = 0.1 * out.teacher_output.reshape(-1, 16).mean(0, keepdim=True)
    torch.testing.assert_close(model.dino_loss.center, expected)
    assert out.student_output.shape == (4, 3, 16) and out.teacher_output.shape == (2, 3, 16)
    # the teacher starts as a copy of the student: its outputs are the student's on the global views
    torch.testing.assert_close(out.teacher_output, out.student_output[:2])


def test_first_batch_center_init_centers_the_first_step():
    """``center_init="first_batch"``: the first loss is computed with the batch's own mean as the center (which
    removes a bias shared by the batch's outputs), then the EMA update runs from there; a center that was updated
    is never re-initialised (a resumed run needs no flag)."""
    teacher = torch.tensor([[[5.0, 5.1], [5.1, 5.0]]])  # [1 view, 2 images, 2 prototypes], offset 5 shared
    student = torch.zeros(2, 2, 2)
    biased = teacher + torch.tensor([1.0, 0.0])
    zeros, first = DinoLoss(2, center_init="zeros"), DinoLoss(2, center_init="first_batch")
    assert zeros(student, biased, 0.04).teacher_batch_entropy < 1e-6  # every image on prototype 0
    out = first(student, biased, 0.04)
    # with the batch mean [6.05, 5.05] removed: softmax([-0.05, 0.05] / 0.04) and its mirror image -> batch mean 1/2
    torch.testing.assert_close(out.teacher_batch_entropy, torch.tensor(math.log(2)))
    first.update_center(biased)
    torch.testing.assert_close(first.center, torch.tensor([[6.05, 5.05]]))  # EMA of a center equal to the mean
    first.center.copy_(torch.tensor([[1.0, 0.0]]))
    first(student, biased, 0.04)
    torch.testing.assert_close(first.center, torch.tensor([[1.0, 0.0]]))  # not re-initialised
    first.eval()
    first.center.zero_()
    first(student, biased, 0.04)
    assert not first.center.any()  # evaluation never sets it
    with pytest.raises(ValueError, match="center_init"):
        DinoLoss(2, center_init="mean")
    with pytest.raises(ValueError, match="center_init"):
        tiny_config(center_init="ones")
    assert tiny_model(center_init="first_batch").dino_loss.center_init == "first_batch"


# -- teacher ------------------------------------------------------------------------------------------------------


def test_teacher_gets_no_gradients_and_follows_the_student_by_ema():
    model = tiny_model()
    model.train()
    out = model(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16))
    out.loss.backward()
    teacher = list(model.teacher_backbone.parameters()) + list(model.teacher_head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert all(p.grad is not None for p in model.backbone.parameters())
    torch.optim.SGD([p for g in model.parameter_groups() for p in g["params"]], lr=0.5).step()

    student_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    teacher_state = {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()}
    head_student = model.head.mlp[0].weight.clone()
    head_teacher = model.teacher_head.mlp[0].weight.clone()
    assert not torch.equal(head_student, head_teacher)
    model.update_teacher(0.9)
    for name, value in model.teacher_backbone.state_dict().items():
        torch.testing.assert_close(value, 0.9 * teacher_state[name] + 0.1 * student_state[name])
    torch.testing.assert_close(model.teacher_head.mlp[0].weight, 0.9 * head_teacher + 0.1 * head_student)
    model.update_teacher(0.0)  # momentum 0: a copy
    torch.testing.assert_close(model.teacher_head.mlp[0].weight, head_student)
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


# -- schedules ----------------------------------------------------------------------------------------------------


def test_cosine_schedule_and_warmup_formulas():
    assert cosine_schedule(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(25, 100, 0.996, 1.0) == pytest.approx(1 - 0.002 * (1 + math.cos(math.pi / 4)))
    assert cosine_schedule(100, 100, 0.996, 1.0) == 1.0
    # warm-up 10 steps from 0 to 1e-3, then cosine over the 90 others down to 1e-6
    assert cosine_schedule(5, 100, 1e-3, 1e-6, warmup_steps=10) == pytest.approx(5e-4)
    assert cosine_schedule(10, 100, 1e-3, 1e-6, warmup_steps=10) == pytest.approx(1e-3)
    assert cosine_schedule(55, 100, 1e-3, 1e-6, warmup_steps=10) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == linear_warmup(99, 30, 0.04, 0.07) == 0.07
    assert linear_warmup(0, 0, 0.04, 0.07) == 0.07
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=11)


def test_dino_schedule_in_epochs():
    options = tiny_options(
        learning_rate=5e-4,
        min_lr=1e-6,
        warmup_epochs=2.0,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=3.0,
        freeze_last_layer_epochs=1.0,
    )

    def schedule(step):  # the teacher temperature warms up to the model config's teacher_temp
        return dino_schedule(options, step, 100, 10, 512, teacher_temp=0.07)

    # 10 steps per epoch, 100 steps, global batch 512: peak lr 1e-3 reached at step 20
    at = [schedule(step) for step in (0, 9, 10, 15, 20, 60)]
    assert [s.learning_rate for s in at[:5]] == pytest.approx([0.0, 4.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert at[5].learning_rate == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert [s.freeze_last_layer for s in at] == [True, True, False, False, False, False]
    assert [s.teacher_temp for s in at] == pytest.approx([0.04, 0.049, 0.05, 0.055, 0.06, 0.07])
    assert at[0].momentum == pytest.approx(0.996) and at[0].weight_decay == pytest.approx(0.04)
    assert schedule(50).momentum == pytest.approx(0.998)
    assert schedule(50).weight_decay == pytest.approx(0.22)


# -- head ---------------------------------------------------------------------------------------------------------


def test_weight_normalised_last_layer_keeps_unit_prototypes():
    torch.manual_seed(0)
    layer = WeightNormLinear(8, 5, fixed_norm=True)
    layer.weight_v.data.mul_(torch.arange(1, 6).float()[:, None])  # rows of different norms
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(5))
    assert not layer.weight_g.requires_grad
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ (layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)).T)
    optimizer = torch.optim.AdamW([layer.weight_v], lr=0.1, weight_decay=0.5)
    layer(x).pow(2).sum().backward()
    optimizer.step()
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(5))
    free = WeightNormLinear(8, 5, fixed_norm=False)
    assert free.weight_g.requires_grad

    head = DinoHead(12, 5, hidden_dim=16, bottleneck_dim=8)
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3
    out = head(torch.randn(4, 12) * 100)
    # unit bottleneck and unit prototypes: outputs are cosines
    assert out.abs().max() <= 1 + 1e-5


def test_parameter_groups_and_last_layer():
    model = tiny_model()
    regularized, not_regularized = model.parameter_groups()
    assert not_regularized["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    student = ids(list(model.backbone.parameters()) + list(model.head.parameters()))
    assert ids(regularized["params"]) | ids(not_regularized["params"]) == student - {
        id(model.head.last_layer.weight_g)
    }
    assert all(p.ndim > 1 for p in regularized["params"])
    assert id(model.head.last_layer.weight_v) in ids(regularized["params"])
    assert ids(model.last_layer_parameters()) == ids(model.head.last_layer.parameters())
    free = tiny_model(norm_last_layer=False)
    assert id(free.head.last_layer.weight_g) in ids(p for g in free.parameter_groups() for p in g["params"])


def test_per_parameter_gradient_clipping():
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    norms = clip_gradients_per_parameter([big, small], max_norm=2.5)
    assert norms == pytest.approx([5.0, 0.5])
    torch.testing.assert_close(big.grad, torch.tensor([1.5, 2.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4]))


# -- collapse -----------------------------------------------------------------------------------------------------


def test_collapse_is_reported(caplog):
    model = tiny_model()
    log_k = math.log(16)
    assert model.collapse_status(0.001) == "one-hot"
    assert model.collapse_status(log_k - 0.001) == "uniform"
    assert model.collapse_status(0.5 * log_k) is None
    # sharp per-image targets spread over prototypes are healthy; the same prototype for every image is not
    assert model.collapse_status(0.001, teacher_batch_entropy=0.5 * log_k) is None
    assert model.collapse_status(0.001, teacher_batch_entropy=0.001) == "one-hot"
    # a teacher flattened by a huge temperature is a uniform collapse
    model.train()
    out = model(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16), teacher_temp=1e4)
    assert out.teacher_entropy.item() == pytest.approx(log_k, abs=1e-4)
    with caplog.at_level(logging.WARNING):
        assert model.warn_if_collapsed(out.teacher_entropy.item(), out.kl_divergence.item(), step=7) == "uniform"
    assert "uniform collapse at step 7" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert model.warn_if_collapsed(0.5 * log_k, 0.3) is None
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        assert model.warn_if_collapsed(0.01, 0.0, teacher_batch_entropy=0.02) == "one-hot"
    assert "one-hot collapse" in caplog.text


# -- config -------------------------------------------------------------------------------------------------------


def test_config_validation_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="model_type 'vit'"):
        DinoPretrainingConfig(backbone_config={"model_type": "dinov2"})
    with pytest.raises(ValueError, match="at least 2 views"):
        tiny_config(global_crops_number=1, local_crops_number=0)
    with pytest.raises(ValueError, match="student_temp must be > 0"):
        tiny_config(student_temp=0)
    with pytest.raises(Exception, match="teacher_temp"):  # typed float | int: a string is refused
        tiny_config(teacher_temp="0.04")
    default = DinoPretrainingConfig()
    assert (default.backbone_config.hidden_size, default.backbone_config.patch_size) == (384, 16)
    assert (default.out_dim, default.local_crops_number, default.teacher_temp) == (65536, 8, 0.04)
    model = tiny_model(local_crops_number=3, student_temp=0.2)
    model.dino_loss.center.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = DinoForSelfSupervisedPretraining.from_pretrained(tmp_path)
    assert (loaded.config.local_crops_number, loaded.config.student_temp) == (3, 0.2)
    torch.testing.assert_close(loaded.dino_loss.center, torch.full((1, 16), 0.25))
    for (name, value), loaded_value in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(value, loaded_value), name


def test_forward_rejects_wrong_views():
    model = tiny_model()
    with pytest.raises(ValueError, match="2 views"):
        model(torch.randn(2, 3, 3, 32, 32), torch.randn(2, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="local_pixel_values are required"):
        model(torch.randn(2, 2, 3, 32, 32))


# -- multi-crop ---------------------------------------------------------------------------------------------------


def _photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_multicrop_reads_sizes_from_the_options_and_views_from_the_config():
    augment = DinoMultiCropAugmentation.from_config(
        tiny_config(global_crops_number=3, local_crops_number=1),
        tiny_options(
            global_crops_size=24, local_crops_size=8, global_crops_scale=[0.5, 1], local_crops_scale=(0.1, 0.2)
        ),
    )
    assert (augment.global_crops_number, augment.local_crops_number) == (3, 1)
    assert (augment.global_crops_size, augment.local_crops_size) == (24, 8)
    assert augment.global_crops_scale == (0.5, 1.0) and augment.local_crops_scale == (0.1, 0.2)
    views = augment(_photo(), torch.Generator().manual_seed(0))
    assert views["global_crops"].shape == (3, 3, 24, 24) and views["local_crops"].shape == (1, 3, 8, 8)


def test_multicrop_is_deterministic_per_seed():
    augment = DinoMultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    first = augment(_photo(), torch.Generator().manual_seed(3))
    again = augment(_photo(), torch.Generator().manual_seed(3))
    other = augment(_photo(), torch.Generator().manual_seed(4))
    assert first["global_crops"].shape == (2, 3, 32, 32) and first["local_crops"].shape == (3, 3, 16, 16)
    assert torch.equal(first["global_crops"], again["global_crops"])
    assert torch.equal(first["local_crops"], again["local_crops"])
    assert not torch.equal(first["global_crops"], other["global_crops"])
    batch = collate_multicrop([first, other])
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32) and batch["local_pixel_values"].shape == (2, 3, 3, 16, 16)
    no_local = DinoMultiCropAugmentation(global_crops_size=16, local_crops_number=0)(_photo())
    assert collate_multicrop([no_local])["local_pixel_values"] is None
    with pytest.raises(TypeError, match="PIL"):
        augment(np.zeros((8, 8, 3), np.uint8))


def test_photometric_probabilities_come_from_the_options():
    """With colour jitter, grayscale and solarisation at probability 0, a local view of a flat-coloured image is
    that colour exactly (crops, flips and blurs of a flat image change nothing)."""
    options = tiny_options(
        global_crops_size=16,
        local_crops_size=8,
        color_jitter_probability=0.0,
        grayscale_probability=0.0,
        solarization_probability=0.0,
    )
    augment = DinoMultiCropAugmentation.from_config(tiny_config(local_crops_number=4), options)
    assert (augment.color_jitter_probability, augment.grayscale_probability) == (0.0, 0.0)
    views = augment(Image.new("RGB", (40, 30), (200, 40, 90)), torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.tensor([200, 40, 90]).view(3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(views["local_crops"], expected.expand(4, 3, 8, 8), atol=1e-5, rtol=0)
    grey = DinoMultiCropAugmentation(
        global_crops_size=8,
        local_crops_size=8,
        local_crops_number=8,
        color_jitter_probability=0.0,
        grayscale_probability=1.0,
    )
    local = grey(Image.new("RGB", (20, 20), (200, 40, 90)), torch.Generator().manual_seed(0))["local_crops"]
    unnormalised = local * std + mean
    torch.testing.assert_close(unnormalised[:, 0], unnormalised[:, 1], atol=1e-5, rtol=0)  # R == G
    torch.testing.assert_close(unnormalised[:, 1], unnormalised[:, 2], atol=1e-5, rtol=0)  # G == B
    with pytest.raises(ValueError, match="grayscale_probability"):
        DinoMultiCropAugmentation(grayscale_probability=1.5)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, width, height = random_resized_crop_box(480, 360, (0.05, 0.4), generator=generator)
        assert 0 <= left and left + width <= 480 and 0 <= top and top + height <= 360
        area = width * height / (480 * 360)
        assert 0.045 <= area <= 0.41
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
    # an impossible request falls back to the largest centred box of a valid ratio
    assert random_resized_crop_box(100, 10, (1.0, 1.0), generator=generator) == (43, 0, 13, 10)


def test_color_jitter_identity_and_hue():
    image = Image.fromarray(np.array([[[200, 100, 50], [10, 20, 30]]], dtype=np.uint8))
    same = color_jitter(image, 0.0, 0.0, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(same), np.asarray(image))
    # a hue shift of half the colour circle turns red into cyan (PIL's HSV: hue 0 -> 128 of 256)
    cyan = np.asarray(_adjust_hue(Image.new("RGB", (1, 1), (255, 0, 0)), 0.5))[0, 0].tolist()
    assert cyan[0] == 0 and min(cyan[1:]) >= 245 and max(cyan) == 255
    # hue factors are drawn in [-hue, hue]: a pure red moves along the circle but keeps value 255
    generator = torch.Generator().manual_seed(0)
    shifted = [
        np.asarray(color_jitter(Image.new("RGB", (1, 1), (255, 0, 0)), 0, 0, 0, 0.5, generator))[0, 0]
        for _ in range(5)
    ]
    assert all(pixel.max() == 255 for pixel in shifted) and any(pixel.tolist() != [255, 0, 0] for pixel in shifted)


# -- a tiny run through the trainer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A plain folder of images, no labels and no classes file."""
    folder = tmp_path_factory.mktemp("photos")
    for index in range(12):
        _photo(48, 40, seed=index).save(folder / f"photo_{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("dino-full")
    summary = train(load_training_arguments(TINY, dataset=str(image_folder), output_dir=str(output)))
    return output, summary


@pytest.mark.slow
def test_tiny_run_exports_a_backbone_that_stego_loads(uninterrupted):
    output, summary = uninterrupted
    assert summary["steps"] == 6 and summary["backbone_dir"] == str(output / "backbone")
    assert math.isfinite(summary["final_loss"]) and summary["final_teacher_entropy"] > 0
    assert json.loads((output / "pretraining_summary.json").read_text())["num_train_images"] == 12
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert {"train/teacher_entropy", "train/teacher_batch_entropy", "train/kl_divergence"} <= set(lines[0])

    backbone_dir = output / "backbone"
    assert json.loads((backbone_dir / "config.json").read_text())["architectures"] == ["ViTModel"]
    exported = load_file(str(backbone_dir / "model.safetensors"))
    full = load_file(str(output / "model" / "model.safetensors"))
    for name, value in exported.items():
        assert torch.equal(value, full[f"teacher_backbone.model.{name}"]), name
    # the teacher, not the student, is exported (they differ after training)
    assert any(not torch.equal(v, full[f"backbone.model.{k}"]) for k, v in exported.items())

    stego = StegoForUnsupervisedSegmentation.from_pretrained_backbone(str(backbone_dir), dim=8, num_classes=3)
    teacher = DinoForSelfSupervisedPretraining.from_pretrained(output / "model").teacher_backbone.model.state_dict()
    loaded = stego.backbone.model.state_dict()
    assert loaded.keys() == teacher.keys()
    for name, value in teacher.items():
        assert torch.equal(loaded[name], value), name
    features = stego.backbone(torch.randn(1, 3, 32, 48)).feature_map
    assert features.shape == (1, 32, 4, 6) and torch.isfinite(features).all()
    assert FeatureBackbone.from_pretrained(str(backbone_dir)).hidden_size == 32


class _Interrupted(Exception):
    pass


def _assert_same_weights(output: Path, reference: Path, exact: bool = True) -> None:
    """``exact``: bit-equal (a resumed run in this process); else equal up to float rounding (views computed in
    DataLoader worker processes, whose torch uses one thread: reductions may round differently)."""
    weights = load_file(str(output / "model" / "model.safetensors"))
    expected = load_file(str(reference / "model" / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name, value in expected.items():  # student, teacher, heads and the center
        if exact:
            assert torch.equal(weights[name], value), name
        else:
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_resumed_run_is_bit_exact(uninterrupted, image_folder, tmp_path, monkeypatch):
    """Kill the same 6-step run after its step-3 checkpoint, resume it: every tensor equals the uninterrupted run's
    (the schedules depend on max_steps, so the interrupted run must be the same run, not a 3-step one)."""
    full_output, full_summary = uninterrupted
    output = tmp_path / "resumed"
    original = training_loop.save_checkpoint

    def save_then_crash(accelerator, output_dir, state, keep):
        path = original(accelerator, output_dir, state, keep)
        if state["step"] == 3:
            raise _Interrupted
        return path

    monkeypatch.setattr(training_loop, "save_checkpoint", save_then_crash)
    with pytest.raises(_Interrupted):
        train(load_training_arguments(TINY, dataset=str(image_folder), output_dir=str(output)))
    monkeypatch.setattr(training_loop, "save_checkpoint", original)
    assert not (output / "model").exists() and latest_checkpoint(output) is not None
    summary = train(
        load_training_arguments(
            TINY, dataset=str(image_folder), output_dir=str(output), resume_from_checkpoint="latest"
        )
    )
    assert summary["steps"] == 6
    _assert_same_weights(output, full_output)
    final = {key: value for key, value in summary.items() if key.startswith("final_")}
    assert final and final == {key: value for key, value in full_summary.items() if key.startswith("final_")}
    # resuming a finished run (no step left) still reports the last logged metrics and the steps
    again = train(
        load_training_arguments(
            TINY, dataset=str(image_folder), output_dir=str(output), resume_from_checkpoint="latest"
        )
    )
    assert {key: again[key] for key in final} == final
    assert "steps: 6 x 4 images" in (output / "backbone" / "README.md").read_text()
    _assert_same_weights(output, full_output)


@pytest.mark.slow
def test_dataloader_workers_build_the_same_views(uninterrupted, image_folder, tmp_path):
    """The augmentation seeds come from each item's BatchIndex inside the dataset: 2 workers train the same
    weights as the main process alone."""
    full_output, _ = uninterrupted
    output = tmp_path / "workers"
    train(load_training_arguments(TINY, dataset=str(image_folder), output_dir=str(output), num_workers=2))
    _assert_same_weights(output, full_output, exact=False)


def test_trainer_rejects_options_that_do_not_apply(tmp_path):
    with pytest.raises(ValueError, match="resolution does not apply to dino_pretrain: set global_crops_size"):
        train(load_training_arguments(TINY, output_dir=str(tmp_path), resolution=64))
    with pytest.raises(ValueError, match="eval_resolution does not apply to dino_pretrain"):
        train(load_training_arguments(TINY, output_dir=str(tmp_path), eval_resolution=64))
    with pytest.raises(ValueError, match="preset does not apply to dino_pretrain"):
        train(load_training_arguments(TINY, output_dir=str(tmp_path), preset="cocostuff27"))
    with pytest.raises(ValueError, match="max_grad_norm does not apply to dino_pretrain: set clip_grad"):
        train(load_training_arguments(TINY, output_dir=str(tmp_path), max_grad_norm=1.0))
    with pytest.raises(ValueError, match="unknown dino_pretrain model option"):
        train(load_training_arguments(TINY, output_dir=str(tmp_path), model={"local_crop_number": 3}))
    with pytest.raises(ValueError, match="multiple of the backbone patch size"):
        train(load_training_arguments(TINY, output_dir=str(tmp_path), local_crops_size=12))
    assert not (tmp_path / "model").exists()


# -- recipe options -----------------------------------------------------------------------------------------------


def test_training_options_defaults_and_validation():
    options = DinoPretrainingTrainingOptions()
    assert (options.max_steps, options.batch_size, options.resolution, options.eval_resolution) == (
        125100,
        64,
        None,
        None,
    )
    assert (options.global_crops_size, options.local_crops_size) == (224, 96)
    assert (options.global_crops_scale, options.local_crops_scale) == ([0.4, 1.0], [0.05, 0.4])
    assert (options.learning_rate, options.min_lr, options.warmup_epochs, options.clip_grad) == (5e-4, 1e-6, 10.0, 3.0)
    assert (options.weight_decay, options.weight_decay_end, options.momentum_teacher) == (0.04, 0.4, 0.996)
    assert DinoPretrainingRecipe.options_class is DinoPretrainingTrainingOptions and DinoPretrainingRecipe.label_free
    # YAML integers become floats
    coerced = DinoPretrainingTrainingOptions(clip_grad=0, global_crops_scale=[0.5, 1])
    assert coerced.clip_grad == 0.0 and isinstance(coerced.clip_grad, float)
    assert coerced.global_crops_scale == [0.5, 1.0] and all(isinstance(v, float) for v in coerced.global_crops_scale)
    with pytest.raises(ValueError, match="resolution does not apply"):
        DinoPretrainingTrainingOptions(resolution=224)
    with pytest.raises(ValueError, match="global_crops_scale"):
        tiny_options(global_crops_scale=(0.5, 0.4))
    with pytest.raises(ValueError, match="momentum_teacher"):
        tiny_options(momentum_teacher=1.5)
    with pytest.raises(ValueError, match="clip_grad must be >= 0"):
        tiny_options(clip_grad=-1)
    with pytest.raises(ValueError, match="solarization_probability must be in"):
        tiny_options(solarization_probability=-0.1)
    with pytest.raises(ValueError, match="unknown DinoPretrainingTrainingOptions option"):
        DinoPretrainingTrainingOptions.from_preset(None, resolutoin=3)


def test_training_settings_of_older_files_are_recipe_options():
    """Files written for the release before the recipes kept the training settings under model: (the camvid
    config's layout): they are read as recipe options, the model keeps its fields."""
    args = load_training_arguments(
        None,
        method="dino_pretrain",
        model={"out_dim": 32, "learning_rate": 0.02, "global_crops_size": 96, "teacher_temp": 0.02},
    )
    assert args.model == {"out_dim": 32, "teacher_temp": 0.02}
    assert args.recipe == {"learning_rate": 0.02, "global_crops_size": 96}


def test_old_config_json_still_loads(tmp_path):
    """A config.json saved by the release before the recipes (learning rates, crops, steps in the config)."""
    saved = json.loads(OLD_CONFIG.read_text())
    assert saved["learning_rate"] == 0.005 and saved["max_steps"] == 125100 and saved["global_crops_size"] == 32
    config = DinoPretrainingConfig.from_pretrained(OLD_CONFIG)
    assert (config.out_dim, config.head_hidden_dim, config.local_crops_number) == (64, 48, 2)
    assert config.teacher_temp == 0.07
    assert config.backbone_config.hidden_size == 32
    for name in ("learning_rate", "max_steps", "batch_size", "global_crops_size", "momentum_teacher", "clip_grad"):
        assert not hasattr(config, name), name
    config.save_pretrained(tmp_path)
    assert "learning_rate" not in json.loads((tmp_path / "config.json").read_text())
    model = DinoForSelfSupervisedPretraining(config)
    out = model(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16))
    assert out.student_output.shape == (4, 2, 64)


@pytest.mark.parametrize(
    "path", sorted((REPO / "training" / "configs").glob("dino_pretrain_*.yaml")), ids=lambda p: p.stem
)
def test_configs_split_into_model_and_recipe(path):
    from hf_useg.training import resolve_recipe_options

    args = load_training_arguments(path)
    options = resolve_recipe_options(args)
    assert isinstance(options, DinoPretrainingTrainingOptions) and options.resolution is None
    config_fields = set(DinoPretrainingConfig.__dataclass_fields__)
    assert set(args.model) <= config_fields and not set(args.recipe) & config_fields
    assert options.max_steps >= 1 and options.global_crops_size % 8 == 0
