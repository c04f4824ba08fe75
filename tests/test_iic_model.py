"""IicConfig / IicForUnsupervisedSegmentation: config checks, Sobel input by hand, shapes, loss wiring against
`iic_segmentation_loss`, prediction order, initialisation and save/load round trips."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassFieldValidationError
from segmenter_tester import RELOAD_TOLERANCE, UnsupervisedSegmenterTesterMixin
from tiny_configs import tiny_vit_config

import hf_useg  # noqa: F401  (registers the Auto classes)
from hf_useg import IicConfig, IicForUnsupervisedSegmentation
from hf_useg.models.iic import iic_segmentation_loss, iic_trunk_input, sobel_channels

TINY_VGG = dict(vgg_channels=[8, 8, 16, 16, 16, 16], num_classes=3, num_overclusters=7, displacement=2)
TINY_VIT = tiny_vit_config()  # shared by the config tests below, never modified
FLIP = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_model(**overrides) -> IicForUnsupervisedSegmentation:
    torch.manual_seed(0)
    return IicForUnsupervisedSegmentation(IicConfig(**{**TINY_VGG, **overrides})).eval()


# --------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_the_paper_trunk_and_presets_the_released_runs():
    config = IicConfig()
    assert config.trunk == "vgg" and config.backbone_config is None
    assert config.vgg_channels == [64, 128, 256, 256, 512, 512] and config.vgg_dilations == [1, 1, 1, 1, 2, 2]
    assert config.input_mode == "rgb_sobel" and config.displacement == 10 and config.uncollapsed
    assert config.num_labels == 3 and config.id2label == {0: "cluster_0", 1: "cluster_1", 2: "cluster_2"}
    coco = IicConfig.for_dataset("cocostuff3")
    assert (coco.num_overclusters, coco.lamb_a, coco.lamb_b, coco.input_mode) == (15, 1.0, 1.5, "rgb_sobel")
    potsdam = IicConfig.for_dataset("potsdam3", num_sub_heads=2)
    assert (potsdam.num_overclusters, potsdam.lamb_b, potsdam.input_mode) == (24, 1.5, "rgb")
    assert potsdam.num_sub_heads == 2
    # the released runs' training settings are the recipe's presets (tests/test_iic_training.py)
    assert not any(hasattr(coco, name) for name in ("learning_rate", "batch_size", "jitter_hue", "mask_unlabelled"))
    with pytest.raises(ValueError, match="unknown IIC preset 'coco'"):
        IicConfig.for_dataset("coco")


def test_trunk_follows_backbone_config_and_defaults_to_dino_vits8():
    assert IicConfig(backbone_config=TINY_VIT).trunk == "backbone"
    config = IicConfig(trunk="backbone")
    assert config.backbone_config.hidden_size == 384 and config.backbone_config.layer_norm_eps == 1e-6
    partial = IicConfig(trunk="backbone", backbone_config={"num_hidden_layers": 2})
    assert partial.backbone_config.num_hidden_layers == 2 and partial.backbone_config.patch_size == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(trunk="vgg", backbone_config=TINY_VIT), "takes no backbone_config"),
        (dict(trunk="resnet"), "trunk must be one of"),
        (dict(input_mode="rgbd"), "input_mode must be one of"),
        (dict(vgg_dilations=[1, 2]), "one positive dilation per conv"),
        (dict(vgg_pool_after=7), "vgg_pool_after"),
        (dict(num_sub_heads=2, eval_sub_head=2), "eval_sub_head"),
        (dict(displacement=-1), "displacement must be >= 0"),
        (dict(lamb_b=0.0), "lamb_b must be > 0"),
        (dict(id2label={0: "a"}), "id2label has 1 entries"),
        (dict(num_labels=5), "num_labels"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IicConfig(**kwargs)


def test_field_types_are_checked():
    with pytest.raises(StrictDataclassFieldValidationError, match="lamb_b"):
        IicConfig(lamb_b="1.5")
    with pytest.raises(StrictDataclassFieldValidationError, match="vgg_channels"):
        IicConfig(vgg_channels=[8.0, 8.0, 16.0])
    assert IicConfig(lamb_a=2).lamb_a == 2  # YAML ints are numbers too


def test_a_config_json_of_the_previous_release_loads_without_its_training_settings():
    # written by the release before the training recipes (IIC tiny run): it still holds learning_rate, max_steps,
    # the jitter, the head alternation...; those are the recipe's options now and are dropped on load
    path = Path(__file__).parent / "fixtures" / "iic_old_config.json"
    saved = json.loads(path.read_text())
    assert saved["learning_rate"] == 0.001 and saved["head_a_steps"] == 2 and saved["max_steps"] == 20000
    config = IicConfig.from_pretrained(path)
    assert (config.vgg_channels, config.num_overclusters, config.displacement) == ([8, 8, 16, 16, 16, 16], 9, 2)
    assert config.id2label[2] == "synthetic-class-2" and config.backbone_name == saved["backbone_name"]
    for name in (
        "learning_rate",
        "max_steps",
        "batch_size",
        "jitter_hue",
        "flip_p",
        "mask_unlabelled",
        "head_a_steps",
    ):
        assert not hasattr(config, name), name
        assert name not in config.to_dict(), name


# --------------------------------------------------------------------------------------------------------------
# Sobel input


def test_sobel_channels_by_hand():
    # a grey image (R = G = B, weights sum to 1) with a vertical step between columns 1 and 2
    grey = torch.zeros(1, 1, 4, 4)
    grey[..., 2:] = 1.0
    sobel = sobel_channels(grey.expand(1, 3, 4, 4), image_mean=[0.0] * 3, image_std=[1.0] * 3)
    # x: (left - right) weighted 1, 2, 1 down the rows; zero padding outside
    assert sobel[0, 0, 1].tolist() == [0.0, -4.0, -4.0, 4.0]
    assert sobel[0, 0, 0].tolist() == [0.0, -3.0, -3.0, 3.0]  # top row: only rows 0 and 1 exist
    # y: (top - bottom) weighted 1, 2, 1 across the columns
    assert sobel[0, 1, 0].tolist() == [0.0, -1.0, -3.0, -3.0]  # row -1 is padding, row 1 counts negatively
    assert sobel[0, 1, 1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert sobel[0, 1, 3].tolist() == [0.0, 1.0, 3.0, 3.0]


def test_sobel_uses_luma_weights_of_the_unnormalised_image():
    red = torch.zeros(1, 3, 3, 3)
    red[:, 0] = 1.0  # pure red in [0, 1]
    normalised = (red - IMAGENET_MEAN) / IMAGENET_STD
    sobel = sobel_channels(
        normalised, image_mean=IMAGENET_MEAN.flatten().tolist(), image_std=IMAGENET_STD.flatten().tolist()
    )
    # grey = 0.299 everywhere: x at the centre is 0, at the left border (padding - 0.299) * (1 + 2 + 1)
    torch.testing.assert_close(sobel[0, 0, 1], torch.tensor([-4 * 0.299, 0.0, 4 * 0.299]))
    torch.testing.assert_close(sobel[0, 1, :, 1], torch.tensor([-4 * 0.299, 0.0, 4 * 0.299]))


def test_trunk_input_channel_layout():
    pixel_values = torch.randn(2, 3, 6, 6)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    sobel = sobel_channels(pixel_values, mean, std)
    five = iic_trunk_input(pixel_values, "rgb_sobel", mean, std)
    assert five.shape == (2, 5, 6, 6)
    assert torch.equal(five[:, :3], pixel_values) and torch.equal(five[:, 3:], sobel)
    assert torch.equal(iic_trunk_input(pixel_values, "sobel", mean, std), sobel)
    assert iic_trunk_input(pixel_values, "rgb", mean, std) is pixel_values
    model = tiny_model()
    assert model.backbone.layers[0].in_channels == 5
    assert tiny_model(input_mode="rgb").backbone.layers[0].in_channels == 3


# --------------------------------------------------------------------------------------------------------------
# shapes and errors


def test_vgg_trunk_layout_and_shapes():
    model = tiny_model()
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 16, 16]
    assert [c.dilation[0] for c in convs] == [1, 1, 1, 1, 2, 2] and all(c.bias is None for c in convs)
    kinds = [type(m).__name__ for m in model.backbone.layers]
    assert kinds[:7] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert model.patch_size == 2
    out = model(torch.randn(2, 3, 20, 24))
    assert out.loss is None and out.features.shape == (2, 16, 10, 12) and out.code.shape == (2, 16, 10, 12)
    assert out.logits.shape == (2, 3, 10, 12) and out.overcluster_logits.shape == (2, 7, 10, 12)
    torch.testing.assert_close(out.logits.exp().sum(1), torch.ones(2, 10, 12))


def test_backbone_trunk_shapes_projection_and_freezing():
    torch.manual_seed(0)
    model = IicForUnsupervisedSegmentation(
        IicConfig(backbone_config=TINY_VIT, num_classes=4, num_overclusters=12, projection_dim=6, displacement=1)
    )
    assert model.patch_size == 8
    pixel_values = torch.randn(2, 3, 32, 40)
    out = model(pixel_values, pixel_values_pair=pixel_values.flip(-1), affine2_to_1=FLIP.expand(2, 2, 3), head="B")
    assert out.features.shape == (2, 32, 4, 5) and out.code.shape == (2, 6, 4, 5)
    assert out.logits.shape == (2, 4, 4, 5) and out.overcluster_logits.shape == (2, 12, 4, 5)
    out.loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen by default
    assert model.projection.conv.weight.grad is not None
    unfrozen = IicForUnsupervisedSegmentation(IicConfig(backbone_config=TINY_VIT, freeze_backbone=False))
    assert all(p.requires_grad for p in unfrozen.backbone.parameters())


def test_bad_training_inputs_are_named():
    # channels, dtype and patch-size multiples: TestIicVggSegmenter / TestIicBackboneSegmenter
    model = tiny_model()
    with pytest.raises(ValueError, match="head must be 'A'"):
        model(torch.randn(1, 3, 16, 16), head="C")
    with pytest.raises(ValueError, match="pixel_values_pair .* must match"):
        model(torch.randn(1, 3, 16, 16), pixel_values_pair=torch.randn(1, 3, 16, 18))
    with pytest.raises(ValueError, match="pass pixel_values_pair"):
        model(torch.randn(1, 3, 16, 16), affine2_to_1=FLIP[None])
    with pytest.raises(ValueError, match="head must be 'A'"):
        model.predict(torch.randn(1, 3, 16, 16), head="b")


# --------------------------------------------------------------------------------------------------------------
# loss wiring


def _reference_loss(model, view1, view2, head, affine, mask, size):
    """The IIC loss computed by hand from the model's own softmax outputs."""
    config = model.config
    sub_heads = (model.head_a if head == "A" else model.head_b).sub_heads
    lamb = config.lamb_a if head == "A" else config.lamb_b
    losses = []
    for conv in sub_heads:
        probs = []
        for view in (view1, view2):
            features = model.backbone(torch.cat([view, sobel_channels(view, config.image_mean, config.image_std)], 1))
            p = F.conv2d(features, conv.weight).softmax(dim=1)
            probs.append(F.interpolate(p, size=size, mode="bilinear", align_corners=False))
        losses.append(
            iic_segmentation_loss(
                probs[0], probs[1], affine, mask, config.displacement, lamb=lamb, uncollapsed=config.uncollapsed
            )[0]
        )
    return torch.stack(losses).mean()


@pytest.mark.parametrize("head", ["A", "B"])
def test_model_loss_equals_iic_loss_on_its_softmax_outputs(head):
    model = tiny_model(lamb_a=1.2, lamb_b=1.5, num_sub_heads=2, uncollapsed=False)
    torch.manual_seed(1)
    view1, view2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    affine = torch.stack([FLIP, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])])
    mask = (torch.rand(2, 16, 16) > 0.3).float()
    out = model(view1, pixel_values_pair=view2, affine2_to_1=affine, mask=mask, head=head)
    with torch.no_grad():
        expected = _reference_loss(model, view1, view2, head, affine, mask, (16, 16))
    torch.testing.assert_close(out.loss, expected)
    assert out.loss < 0  # -MI
    # loss_no_lamb is the lamb = 1 loss, which rewards entropic marginals less
    assert out.loss_no_lamb > out.loss


def test_loss_at_feature_resolution_resizes_an_input_size_mask():
    model = tiny_model(loss_at_input_resolution=False, displacement=1)
    torch.manual_seed(2)
    view1, view2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, 16)
    mask[:, :, :8] = 1.0
    out = model(view1, pixel_values_pair=view2, mask=mask, head="B")
    with torch.no_grad():
        probs = [model.head_probs(v, "B") for v in (view1, view2)]
    mask_small = torch.zeros(2, 8, 8)
    mask_small[:, :, :4] = 1.0
    expected, _ = iic_segmentation_loss(probs[0], probs[1], None, mask_small, 1, lamb=1.0)
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="mask"):
        model(view1, pixel_values_pair=view2, mask=torch.ones(2, 5, 5))


def test_a_head_b_step_trains_trunk_and_head_b_only():
    model = tiny_model().train()
    view1 = torch.randn(2, 3, 16, 16)
    out = model(view1, pixel_values_pair=view1.flip(-1), affine2_to_1=FLIP.expand(2, 2, 3), head="B")
    assert not out.logits.requires_grad and not out.overcluster_logits.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in model.head_a.parameters())
    assert model.head_b.sub_heads[0].weight.grad.abs().sum() > 0
    assert model.backbone.layers[0].weight.grad.abs().sum() > 0
    # without a pair the outputs keep their graph (e.g. for a supervised probe on top)
    assert model(view1).logits.requires_grad


def test_identical_views_give_minus_the_mutual_information_of_the_pixel_joint():
    # T = 0, no transform, no mask: the joint is the mean over pixels of p p^T (METHODS 3.1, last line)
    model = tiny_model(displacement=0, lamb_b=1.0, loss_at_input_resolution=False)
    with torch.no_grad():
        model.head_b.sub_heads[0].weight.mul_(50.0)  # confident outputs: the MI is far from 0
    view = torch.randn(4, 3, 16, 16)
    loss = model(view, pixel_values_pair=view, head="B").loss
    with torch.no_grad():
        probs = model.head_probs(view, "B").double().permute(0, 2, 3, 1).reshape(-1, 3)
    joint = probs.T @ probs / probs.shape[0]
    marginal = joint.sum(1)
    mutual_information = (joint * (joint / marginal[:, None] / marginal[None, :]).log()).sum()
    torch.testing.assert_close(loss.double(), -mutual_information, atol=1e-5, rtol=1e-5)
    assert -math.log(3) - 1e-6 <= loss.item() < -0.1


# --------------------------------------------------------------------------------------------------------------
# prediction


def test_predict_averages_probabilities_and_upsamples_them():
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        probs = model.head_probs(pixel_values, "B")
        probs_flip = model.head_probs(pixel_values.flip(-1), "B").flip(-1)
        expected = F.interpolate((probs + probs_flip) / 2, size=(20, 24), mode="bilinear", align_corners=False).log()
        iic_order = F.interpolate(probs, size=(16, 16), mode="bilinear", align_corners=False).log()
    prediction = model.predict(pixel_values, output_size=(20, 24))
    torch.testing.assert_close(prediction.cluster_log_probs, expected)
    assert prediction.linear_log_probs is None
    # without TTA: IIC's own evaluation, softmax -> bilinear upsample
    torch.testing.assert_close(model.predict(pixel_values, flip_tta=False).cluster_log_probs, iic_order)


def test_head_a_predictions_and_predict_heads_agree():
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 16, 16)
    head_a = model.predict(pixel_values, head="A").cluster_log_probs
    head_b = model.predict(pixel_values).cluster_log_probs
    assert head_a.shape == (2, 7, 16, 16) and head_b.shape == (2, 3, 16, 16)
    both = model.predict_heads(pixel_values)
    torch.testing.assert_close(both[0], head_a)
    torch.testing.assert_close(both[1], head_b)
    with model.use_head("A"):
        assert model.compute_code(pixel_values).shape == (2, 7, 8, 8)
    assert model.compute_code(pixel_values).shape == (2, 3, 8, 8)  # back to head B


# --------------------------------------------------------------------------------------------------------------
# initialisation and round trips


def test_convs_use_kaiming_normal_fan_in_and_batchnorm_starts_at_identity():
    torch.manual_seed(0)
    model = IicForUnsupervisedSegmentation(IicConfig(vgg_channels=[64, 128, 256, 256, 256, 256]))
    conv = model.backbone.layers[-3]
    assert isinstance(conv, torch.nn.Conv2d)
    fan_in = conv.in_channels * 9
    assert abs(conv.weight.std().item() / math.sqrt(2.0 / fan_in) - 1.0) < 0.02
    assert abs(conv.weight.mean().item()) < 1e-3
    head = model.head_b.sub_heads[0].weight
    assert abs(head.std().item() / math.sqrt(2.0 / 256) - 1.0) < 0.15
    norm = model.backbone.layers[1]
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0) and torch.all(norm.running_var == 1)


class TestIicVggSegmenter(UnsupervisedSegmenterTesterMixin):
    """The common checks (tests/segmenter_tester.py) on the VGG trunk (stride 2, BatchNorm statistics in the state,
    two sub-heads); the round trip also keeps head A's predictions."""

    model_class = IicForUnsupervisedSegmentation
    image_size = (16, 16)
    odd_image_size = (15, 16)
    output_size = (20, 24)
    predict_matches_forward = True

    def make_model(self):
        return tiny_model(num_sub_heads=2)

    def check_reloaded(self, model, reloaded, pixel_values):
        assert reloaded.config.trunk == model.config.trunk
        torch.testing.assert_close(
            reloaded.predict(pixel_values, head="A").cluster_log_probs,
            model.predict(pixel_values, head="A").cluster_log_probs,
            **RELOAD_TOLERANCE,
        )


class TestIicBackboneSegmenter(TestIicVggSegmenter):
    """The same on a ViT trunk with a projection."""

    image_size = (32, 32)
    odd_image_size = (30, 32)
    output_size = (20, 28)

    def make_model(self):
        torch.manual_seed(0)
        return IicForUnsupervisedSegmentation(IicConfig(backbone_config=tiny_vit_config(), projection_dim=6))
