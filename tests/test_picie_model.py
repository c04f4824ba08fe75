"""PiCIE model (METHODS 2.1, 2.2, 2.4): config, FPN, centroid classifier, views, forward loss, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassFieldValidationError
from segmenter_tester import UnsupervisedSegmenterTesterMixin
from tiny_configs import tiny_resnet_config, tiny_vit_config

import hf_useg
from hf_useg import PicieConfig, PicieForUnsupervisedSegmentation
from hf_useg.models.picie import picie_loss, picie_loss_with_overclustering
from hf_useg.models.picie.augmentation import (
    PicieViewParameters,
    adjust_hue,
    apply_geometric,
    apply_photometric,
    denormalize_images,
    draw_view_parameters,
    gaussian_blur,
    make_picie_views,
    normalize_images,
    rgb_to_grey,
)
from hf_useg.models.picie.modeling_picie import PicieFeaturePyramid
from hf_useg.models.picie.training_picie import PicieTrainingOptions


def tiny_model(**overrides) -> PicieForUnsupervisedSegmentation:
    torch.manual_seed(0)
    kwargs = dict(backbone_config=tiny_resnet_config(), fpn_dim=6, num_clusters=3)
    kwargs.update(overrides)
    return PicieForUnsupervisedSegmentation(PicieConfig(**kwargs)).eval()


# ----------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_the_released_coco_setting():
    config = PicieConfig()
    backbone = config.backbone_config
    assert backbone.model_type == "resnet"
    assert list(backbone.depths) == [2, 2, 2, 2] and backbone.layer_type == "basic"
    assert list(backbone.hidden_sizes) == [64, 128, 256, 512] and backbone.embedding_size == 64
    assert backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert (config.fpn_dim, config.num_clusters, config.num_overclusters) == (128, 27, 100)
    assert not any(hasattr(config, name) for name in ("learning_rate", "cluster_batch_size", "is_fitted"))
    assert config.cluster_weighting == "frequency" and not config.overclustering
    assert len(config.id2label) == 27 and config.num_labels == 27
    assert PicieConfig.for_dataset("cityscapes27").dataset_name == "cityscapes27"
    with pytest.raises(ValueError, match="unknown PiCIE preset"):
        PicieConfig.for_dataset("potsdam3")


def test_config_widens_a_single_stage_backbone_and_reads_partial_dicts():
    single = tiny_resnet_config()  # AutoBackbone configs default to out_features=["stage4"]
    assert single.out_features == ["stage4"]
    config = PicieConfig(backbone_config=single)
    assert config.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert single.out_features == ["stage4"], "the caller's config must not be modified"
    two = PicieConfig(backbone_config=tiny_resnet_config(out_features=["stage2", "stage4"]))
    assert two.backbone_config.out_features == ["stage2", "stage4"]
    partial = PicieConfig(backbone_config={"depths": [1, 1, 1, 1]})  # overrides of ResNet-18
    assert list(partial.backbone_config.depths) == [1, 1, 1, 1]
    assert list(partial.backbone_config.hidden_sizes) == [64, 128, 256, 512]
    restored = PicieConfig.from_dict(config.to_dict())
    assert restored.backbone_config.out_features == config.backbone_config.out_features
    assert restored.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cluster_weighting="inverse"), "cluster_weighting"),
        (dict(num_clusters=1), "num_clusters must be >= 2"),
        (dict(fpn_dim=0), "fpn_dim must be >= 1"),
        (dict(overclustering=True, num_overclusters=1), "num_overclusters must be >= 2"),
        (dict(num_clusters=3, id2label={0: "a", 1: "b"}), "id2label has 2 entries"),
        (dict(num_clusters=3, num_labels=5), "num_labels"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PicieConfig(**kwargs)


def test_config_checks_field_types():
    with pytest.raises(StrictDataclassFieldValidationError, match="cluster_weighting"):
        PicieConfig(cluster_weighting=1)
    with pytest.raises(StrictDataclassFieldValidationError, match="fpn_dim"):
        PicieConfig(fpn_dim=12.5)
    with pytest.raises(ValueError, match="neither a ViT/DINOv2 config nor an AutoBackbone"):
        PicieConfig(backbone_config={"model_type": "bert"})


# ----------------------------------------------------------------------------------------------------------------
# FPN


def _reference_upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False written out: src = (i + 0.5) * in / out - 0.5, clamped at 0."""
    _, _, in_h, in_w = x.shape
    out = torch.zeros(x.shape[0], x.shape[1], *size, dtype=x.dtype)

    def taps(i, n_in, n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        low = min(int(math.floor(src)), n_in - 1)
        high = min(low + 1, n_in - 1)
        return low, high, src - low

    for i in range(size[0]):
        y0, y1, fy = taps(i, in_h, size[0])
        for j in range(size[1]):
            x0, x1, fx = taps(j, in_w, size[1])
            top = (1 - fx) * x[..., y0, x0] + fx * x[..., y0, x1]
            bottom = (1 - fx) * x[..., y1, x0] + fx * x[..., y1, x1]
            out[..., i, j] = (1 - fy) * top + fy * bottom
    return out


def test_fpn_is_lateral_convs_plus_top_down_bilinear_upsample_and_add():
    torch.manual_seed(0)
    fpn = PicieFeaturePyramid([3, 4, 5], dim=2)
    maps = [torch.randn(1, 3, 8, 6), torch.randn(1, 4, 4, 3), torch.randn(1, 5, 2, 2)]

    def lateral(i, x):  # 1x1 conv with bias, by hand
        conv = fpn.lateral[i]
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1)

    expected = lateral(2, maps[2])
    expected = _reference_upsample(expected, (4, 3)) + lateral(1, maps[1])
    expected = _reference_upsample(expected, (8, 6)) + lateral(0, maps[0])
    torch.testing.assert_close(fpn(maps), expected, rtol=1e-5, atol=1e-5)
    assert all(conv.bias is not None for conv in fpn.lateral)
    with pytest.raises(ValueError, match="expected 3 feature maps"):
        fpn(maps[:2])


def test_resnet_fpn_outputs_the_stride_4_map_of_all_stages():
    model = tiny_model()
    assert model.patch_size == 4
    assert [conv.in_channels for conv in model.fpn.lateral] == [8, 16, 16, 24]
    pixel_values = torch.randn(2, 3, 64, 48)
    maps = model.backbone_feature_maps(pixel_values)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 12), (8, 6), (4, 3), (2, 2)]
    output = model(pixel_values)
    assert output.code.shape == (2, 6, 16, 12) and output.features.shape == (2, 24, 2, 2)
    torch.testing.assert_close(output.code.norm(dim=1), torch.ones(2, 16, 12))
    assert output.logits is None and output.loss is None  # not fitted, no training inputs
    names = [name for name, _ in model.named_parameters()]
    assert any(name.startswith("backbone.model.encoder.stages.3") for name in names)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        model(torch.randn(1, 3, 62, 64))


def test_vit_backbone_gets_a_single_1x1_projection():
    model = tiny_model(backbone_config=tiny_vit_config(), freeze_backbone=True)
    assert len(model.fpn.lateral) == 1 and model.patch_size == 8
    code = model.compute_code(torch.randn(2, 3, 32, 40))
    assert code.shape == (2, 6, 4, 5)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.fpn.parameters())


# ----------------------------------------------------------------------------------------------------------------
# centroid classifier


def test_cluster_logits_are_dot_products_with_unnormalised_centroids_by_hand():
    model = tiny_model(fpn_dim=2)
    model.set_centroids(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    code = torch.tensor([0.6, 0.8]).view(1, 2, 1, 1)  # a unit vector
    logits = model.cluster_logits(code).flatten()
    torch.testing.assert_close(logits, torch.tensor([0.6, 1.6, -1.4]))  # no temperature, no normalisation of μ
    log_probs, linear = model.probe_log_probs(code)
    assert linear is None
    expected = torch.tensor([0.6, 1.6, -1.4]) - torch.logsumexp(torch.tensor([0.6, 1.6, -1.4]), 0)
    torch.testing.assert_close(log_probs.flatten(), expected)


def test_forward_logits_use_the_normalised_fpn_feature():
    model = tiny_model()
    centroids = torch.randn(3, 6) * 2
    model.set_centroids(centroids)
    pixel_values = torch.randn(2, 3, 32, 32)
    raw = model.fpn_features(pixel_values)
    unit = raw / raw.norm(dim=1, keepdim=True)
    expected = torch.log_softmax(torch.einsum("bchw,kc->bkhw", unit, centroids), dim=1)
    torch.testing.assert_close(model(pixel_values).logits, expected, rtol=1e-5, atol=1e-5)


def test_predict_equals_argmax_of_upsampled_logits():
    # PiCIE evaluates logits -> bilinear upsampling -> argmax; predict upsamples the code first (same, by linearity)
    model = tiny_model()
    model.set_centroids(torch.randn(3, 6))
    pixel_values = torch.randn(2, 3, 32, 32)
    logits = model.cluster_logits(model.compute_code(pixel_values))
    upsampled = F.interpolate(logits, size=(40, 36), mode="bilinear", align_corners=False)
    prediction = model.predict(pixel_values, output_size=(40, 36), flip_tta=False)
    torch.testing.assert_close(prediction.cluster_log_probs, torch.log_softmax(upsampled, 1), rtol=1e-4, atol=1e-5)
    assert prediction.linear_log_probs is None


def test_unfitted_model_refuses_to_predict_and_centroids_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="no fitted centroids"):
        model.predict(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"centroids must be \[3, 6\]"):
        model.set_centroids(torch.randn(4, 6))
    with pytest.raises(ValueError, match="finite"):
        model.set_centroids(torch.full((3, 6), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.set_centroids([[0.0] * 6] * 3)
    with pytest.raises(ValueError, match="all be zero"):
        model.set_centroids(torch.zeros(3, 6))
    assert not model.is_fitted


# ----------------------------------------------------------------------------------------------------------------
# training forward


def _targets(model, batch, size, k=3, over=False):
    torch.manual_seed(1)
    targets = {
        "centroids1": torch.randn(k, 6),
        "centroids2": torch.randn(k, 6),
        "labels1": torch.randint(0, k, (batch, *size)),
        "labels2": torch.randint(0, k, (batch, *size)),
        "weights1": torch.rand(k) + 0.1,
        "weights2": torch.rand(k) + 0.1,
    }
    if over:
        targets.update(
            over_centroids1=torch.randn(5, 6),
            over_centroids2=torch.randn(5, 6),
            over_labels1=torch.randint(0, 5, (batch, *size)),
            over_labels2=torch.randint(0, 5, (batch, *size)),
        )
    return targets


def test_forward_loss_is_picie_loss_on_view1_and_the_transformed_view2():
    model = tiny_model().train()
    view1, view2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    params = draw_view_parameters(2, seed=0, epoch=0).geometric
    targets = _targets(model, 2, (8, 8))
    output = model(view1, pixel_values_view2=view2, geometric_params=params, cluster_targets=targets)
    z1 = model.fpn_features(view1)
    z2 = apply_geometric(model.fpn_features(view2), params, (8, 8))
    expected = picie_loss(
        z1,
        z2,
        targets["centroids1"],
        targets["centroids2"],
        targets["labels1"],
        targets["labels2"],
        targets["weights1"],
        targets["weights2"],
    )
    torch.testing.assert_close(output.loss, expected.loss)
    torch.testing.assert_close(output.within, expected.within)
    torch.testing.assert_close(output.cross, expected.cross)
    output.loss.backward()
    assert model.fpn.lateral[0].weight.grad is not None
    assert model.backbone.model.embedder.embedder.convolution.weight.grad is not None  # the whole network trains
    assert model.centroids.grad is None and not model.centroids.requires_grad


def test_forward_overclustering_loss_is_the_log_k_weighted_sum():
    model = tiny_model().train()
    view1, view2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    params = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2, dtype=torch.float64)  # identity G
    targets = _targets(model, 2, (8, 8), over=True)
    output = model(view1, pixel_values_view2=view2, geometric_params=params, cluster_targets=targets)
    z1, z2 = model.fpn_features(view1), model.fpn_features(view2)
    expected = picie_loss_with_overclustering(
        z1,
        z2,
        targets["centroids1"],
        targets["centroids2"],
        targets["labels1"],
        targets["labels2"],
        targets["over_centroids1"],
        targets["over_centroids2"],
        targets["over_labels1"],
        targets["over_labels2"],
        weights1=targets["weights1"],
        weights2=targets["weights2"],
    )
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-5, atol=1e-6)
    w1, w2 = math.log(5) / (math.log(3) + math.log(5)), math.log(3) / (math.log(3) + math.log(5))
    torch.testing.assert_close(output.loss, w1 * output.main_loss + w2 * output.overclustering_loss)


def test_forward_training_inputs_are_checked():
    model = tiny_model()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="needs geometric_params and cluster_targets"):
        model(x, pixel_values_view2=x)
    params = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    bad = _targets(model, 1, (8, 8))
    del bad["labels2"]
    bad["typo"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['labels2'\], unknown \['typo'\]"):
        model(x, pixel_values_view2=x, geometric_params=params, cluster_targets=bad)
    with pytest.raises(ValueError, match="must match pixel_values"):
        model(x, pixel_values_view2=torch.randn(1, 3, 32, 36), geometric_params=params, cluster_targets=bad)


# ----------------------------------------------------------------------------------------------------------------
# save / load


class TestPicieSegmenter(UnsupervisedSegmenterTesterMixin):
    """The common checks (tests/segmenter_tester.py) on a ResNet PiCIE with centroids: output stride 4, so 30-pixel
    sides are refused too. The round trip keeps weights, BatchNorm statistics and centroids exactly, the fitted
    state and the multi-stage backbone; the reloaded model's predictions agree up to RELOAD_TOLERANCE (oneDNN may
    pick another convolution kernel for separately allocated weights: 4.8e-7 seen on another CPU)."""

    model_class = PicieForUnsupervisedSegmentation
    predict_matches_forward = True

    def make_model(self):
        model = tiny_model()
        model.set_centroids(F.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), dim=1))
        return model

    def check_reloaded(self, model, reloaded, pixel_values):
        assert hf_useg.PicieConfig is PicieConfig
        assert reloaded.is_fitted
        assert reloaded.config.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
        torch.testing.assert_close(reloaded.centroids, model.centroids, rtol=0, atol=0)


class TestPicieVitSegmenter(UnsupervisedSegmenterTesterMixin):
    """The common checks on PiCIE over a ViT (one feature map, the patch size as stride)."""

    model_class = PicieForUnsupervisedSegmentation
    predict_matches_forward = True

    def make_model(self):
        model = tiny_model(backbone_config=tiny_vit_config())
        model.set_centroids(F.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), dim=1))
        return model


# ----------------------------------------------------------------------------------------------------------------
# views (METHODS 2.2)


def test_view_parameters_depend_only_on_seed_epoch_and_index():
    a = draw_view_parameters(10, seed=3, epoch=2)
    b = draw_view_parameters(25, seed=3, epoch=2)
    for name in ("photometric1", "photometric2", "geometric"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name)[:10], rtol=0, atol=0)
    c = draw_view_parameters(10, seed=3, epoch=3)
    d = draw_view_parameters(10, seed=4, epoch=2)
    assert not torch.equal(a.geometric, c.geometric) and not torch.equal(a.geometric, d.geometric)
    assert not torch.equal(a.photometric1, a.photometric2)  # P1 and P2 are independent
    selected = b.select(torch.tensor([4, 1]))
    torch.testing.assert_close(selected.geometric, b.geometric[[4, 1]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_images"):
        draw_view_parameters(0, seed=0, epoch=0)


def test_view_parameters_follow_the_papers_distributions():
    params = draw_view_parameters(6000, seed=0, epoch=0)
    p = params.photometric1
    for column in range(3):  # brightness, contrast, saturation
        applied = p[:, column] != 1
        assert abs(applied.double().mean().item() - 0.8) < 0.03
        assert p[applied, column].min() >= 0.7 and p[applied, column].max() <= 1.3
    hue = p[:, 3]
    assert abs((hue != 0).double().mean().item() - 0.8) < 0.03 and hue.abs().max() <= 0.1
    assert abs(p[:, 4].mean().item() - 0.2) < 0.03  # greyscale
    radius = p[:, 5]
    assert abs((radius > 0).double().mean().item() - 0.5) < 0.03
    assert radius[radius > 0].min() >= 0.1 and radius.max() <= 2.0
    g = params.geometric
    assert g[:, 0].min() >= 0.5 and g[:, 0].max() <= 1.0
    assert g[:, 1:3].min() >= 0 and g[:, 1:3].max() < 1
    assert abs(g[:, 3].mean().item() - 0.5) < 0.03


def test_released_augmentation_has_no_greyscale_and_the_buggy_blur_radius():
    options = PicieTrainingOptions(released_augmentation=True)
    p = draw_view_parameters(6000, seed=0, epoch=0, options=options).photometric1
    assert (p[:, 4] == 0).all()
    radius = p[:, 5][p[:, 5] > 0]
    # r = 3.8 (u - 0.5) + 0.1 with u < 0.5: r in [-1.8, 0.1), blurring like |r|
    assert radius.max() <= 1.8 and radius.min() >= 0
    assert (radius < 0.1).double().mean() > 0.04  # impossible with the paper's U(0.1, 2)


def test_photometric_operations_by_hand():
    image = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    grey = 0.299 * 0.2 + 0.587 * 0.5 + 0.114 * 0.8
    torch.testing.assert_close(rgb_to_grey(image), torch.full((1, 1, 2, 2), grey))

    def run(column, value):
        params = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        params[0, column] = value
        return apply_photometric(image, params)[0, :, 0, 0]

    torch.testing.assert_close(run(0, 1.5), torch.tensor([0.3, 0.75, 1.0]))  # brightness, clamped at 1
    torch.testing.assert_close(run(1, 0.5), 0.5 * torch.tensor([0.2, 0.5, 0.8]) + 0.5 * grey)  # contrast
    torch.testing.assert_close(run(2, 0.0), torch.full((3,), grey))  # saturation 0 = grey
    torch.testing.assert_close(run(4, 1.0), torch.full((3,), grey))  # greyscale
    # hue: the image's hue rotates by half a turn (orange-blue becomes blue-orange), value and saturation kept
    torch.testing.assert_close(run(3, 0.5), torch.tensor([0.8, 0.5, 0.2]))
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(adjust_hue(red, torch.tensor([1 / 3])).flatten(), torch.tensor([0.0, 1.0, 0.0]))
    identity = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    random_image = torch.rand(1, 3, 5, 5)
    assert torch.equal(apply_photometric(random_image, identity), random_image)


def test_gaussian_blur_is_a_normalised_separable_gaussian():
    torch.manual_seed(0)
    image = torch.rand(3, 12, 10)
    sigma, radius = 1.3, 4
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    expected = F.conv2d(padded, (kernel[:, None] * kernel[None, :]).expand(3, 1, -1, -1), groups=3)[0]
    torch.testing.assert_close(gaussian_blur(image, sigma), expected, rtol=1e-5, atol=1e-5)
    flat = torch.full((3, 6, 6), 0.4)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    assert gaussian_blur(image, 0.0) is image


def test_geometric_crop_and_flip_by_hand():
    grid = torch.arange(64.0).view(1, 1, 8, 8)
    # scale 0.5 at the bottom-left: exactly rows 4..7, columns 0..3 when the output keeps the crop's size
    params = torch.tensor([[0.5, 1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(apply_geometric(grid, params, (4, 4))[0, 0], grid[0, 0, 4:, :4])
    flipped = torch.tensor([[0.5, 1.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(apply_geometric(grid, flipped, (4, 4))[0, 0], grid[0, 0, 4:, :4].flip(-1))
    identity = torch.tensor([[1.0, 0.3, 0.7, 0.0]], dtype=torch.float64)  # scale 1: the position is irrelevant
    torch.testing.assert_close(apply_geometric(grid, identity, (8, 8)), grid)
    # upsampling the 4x4 crop to 8x8 equals bilinear interpolation of the crop, except on the crop's inner edges
    # (top row, right column) where F.interpolate clamps while G samples the image just outside (a continuous box)
    expected = F.interpolate(grid[:, :, 4:, :4], size=(8, 8), mode="bilinear", align_corners=False)
    upsampled = apply_geometric(grid, params, (8, 8))
    torch.testing.assert_close(upsampled[..., 1:, :-1], expected[..., 1:, :-1])
    torch.testing.assert_close(upsampled[0, 0, 0, :-1], expected[0, 0, 0, :-1] - 0.25 * 8)  # a quarter row up


def test_geometric_transform_commutes_with_downsampling():
    # METHODS 2.2: view 2 applies G to the feature map; it must match G applied to the image, seen at the
    # feature resolution (here: 4x4 average pooling as the "feature extractor")
    size = 64
    ys, xs = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    image = torch.stack(
        [torch.sin(2 * math.pi * xs) + torch.cos(2 * math.pi * ys), torch.sin(2 * math.pi * (xs + ys)), xs * ys]
    )[None].repeat(32, 1, 1, 1)
    params = draw_view_parameters(32, seed=0, epoch=0).geometric
    image_first = F.avg_pool2d(apply_geometric(image, params, (size, size)), 4)
    features_first = apply_geometric(F.avg_pool2d(image, 4), params, (size // 4, size // 4))
    difference = (image_first - features_first).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.08  # signal range is 4
    # a wrong transform (e.g. the flip ignored) is far off
    no_flip = params.clone()
    no_flip[:, 3] = 0
    wrong = apply_geometric(F.avg_pool2d(image, 4), no_flip, (size // 4, size // 4))
    assert (image_first - wrong).abs().max() > 0.5


def test_views_are_reproducible_and_normalised():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    params = draw_view_parameters(3, seed=1, epoch=0)
    view1, view2 = make_picie_views(images, params, 16)
    again1, again2 = make_picie_views(images, params, 16)
    assert torch.equal(view1, again1) and torch.equal(view2, again2)
    other1, _ = make_picie_views(images, draw_view_parameters(3, seed=1, epoch=1), 16)
    assert not torch.equal(view1, other1)
    assert view1.shape == view2.shape == (3, 3, 16, 16)
    # with identity views, view 1 is the image resized; view 2 the antialiased resize
    identity = PicieViewParameters(
        photometric1=torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64),
        photometric2=torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64),
        geometric=torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64),
    )
    plain1, plain2 = make_picie_views(images, identity, 32)
    torch.testing.assert_close(denormalize_images(plain1), images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain2, normalize_images(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="view parameters for 3"):
        make_picie_views(torch.rand(2, 3, 32, 32), params, 16)
