import pytest
import torch
import torch.nn.functional as F
from segmenter_tester import UnsupervisedSegmenterTesterMixin
from tiny_configs import tiny_dinov2_config, tiny_vit_config

import hf_useg
from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation


def tiny_model(**overrides) -> StegoForUnsupervisedSegmentation:
    torch.manual_seed(0)
    config = StegoConfig(backbone_config=tiny_vit_config(), dim=6, num_classes=3, **overrides)
    return StegoForUnsupervisedSegmentation(config)


class TestStegoSegmenter(UnsupervisedSegmenterTesterMixin):
    """The common checks (tests/segmenter_tester.py), with extra clusters: K = num_classes + extra_clusters = 5."""

    model_class = StegoForUnsupervisedSegmentation
    predict_matches_forward = True

    def make_model(self):
        return tiny_model(extra_clusters=2)


def test_forward_shapes_and_loss_parts():
    model = tiny_model()
    labels = torch.randint(0, 3, (2, 32, 32))
    out = model(torch.randn(2, 3, 32, 32), labels=labels, pixel_values_pos=torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3, 4, 4) and out.linear_logits.shape == (2, 3, 4, 4)
    assert out.code.shape == (2, 6, 4, 4) and out.features.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out.logits.exp().sum(1), torch.ones(2, 4, 4))
    expected = out.correlation_loss + out.cluster_probe_loss + out.linear_probe_loss
    torch.testing.assert_close(out.loss, expected)
    # without the kNN partner there is no training loss, only the probes' outputs
    assert model(torch.randn(1, 3, 32, 32)).loss is None


def test_probes_do_not_train_the_head_and_backbone_is_frozen():
    model = tiny_model()
    model.train()
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model(pixel_values, labels=torch.randint(0, 3, (2, 32, 32)), pixel_values_pos=pixel_values.flip(0))
    (out.cluster_probe_loss + out.linear_probe_loss).backward()
    assert all(p.grad is None for p in model.segmentation_head.parameters())
    assert model.cluster_probe.clusters.grad is not None and model.linear_probe.weight.grad is not None
    model.zero_grad()
    out = model(pixel_values, pixel_values_pos=pixel_values.flip(0))
    out.correlation_loss.backward()
    assert model.segmentation_head.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not model.backbone.training  # frozen backbone stays in eval mode


def test_linear_probe_loss_ignores_invalid_labels():
    model = tiny_model().eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    labels = torch.full((1, 32, 32), -1)
    labels[0, :16] = 2
    code = model.compute_code(pixel_values)
    _, loss = model.probe_losses(code, labels)
    logits = F.interpolate(model.linear_probe(code), size=(32, 32), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(logits[0, :, :16].permute(1, 2, 0).reshape(-1, 3), torch.full((16 * 32,), 2))
    torch.testing.assert_close(loss, expected)
    labels_void = torch.full((1, 32, 32), 7)  # >= num_classes: ignored
    _, loss = model.probe_losses(code, labels_void)
    assert loss.item() == 0.0


def test_predict_follows_stego_evaluation_order():
    model = tiny_model().eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        code = model.segmentation_head(model.backbone(pixel_values).feature_map)
        code_flipped = model.segmentation_head(model.backbone(pixel_values.flip(-1)).feature_map).flip(-1)
        averaged = F.interpolate((code + code_flipped) / 2, size=(40, 48), mode="bilinear", align_corners=False)
        inner = torch.einsum(
            "bchw,kc->bkhw", F.normalize(averaged, dim=1), F.normalize(model.cluster_probe.clusters, dim=1)
        )
        expected_cluster = torch.log_softmax(2 * inner, dim=1)
        expected_linear = torch.log_softmax(model.linear_probe(averaged), dim=1)
    prediction = model.predict(pixel_values, output_size=(40, 48))
    torch.testing.assert_close(prediction.cluster_log_probs, expected_cluster)
    torch.testing.assert_close(prediction.linear_log_probs, expected_linear)
    no_tta = model.predict(pixel_values, flip_tta=False)
    assert no_tta.cluster_log_probs.shape == (2, 3, 32, 32)
    assert not torch.allclose(no_tta.cluster_log_probs, model.predict(pixel_values).cluster_log_probs)


def test_predict_with_crf_returns_marginals():
    pytest.importorskip("pydensecrf")
    model = tiny_model().eval()
    prediction = model.predict(torch.randn(1, 3, 32, 32), crf=True)
    assert prediction.cluster_crf_probs.shape == (1, 3, 32, 32)
    torch.testing.assert_close(prediction.cluster_crf_probs.sum(1), torch.ones(1, 32, 32), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="images for the CRF"):
        model.predict(torch.randn(1, 3, 32, 32), crf=True, images=torch.zeros(1, 16, 16, 3, dtype=torch.uint8).numpy())


def test_cluster_names_and_extra_clusters_survive_reload(tmp_path):
    # the round trip itself (weights exact, Auto classes, outputs) is TestStegoSegmenter's
    model = tiny_model(extra_clusters=2).eval()
    model.set_cluster_names([2, 0, -1, 1, -1], ["road", "sky", "car"])
    model.save_pretrained(tmp_path)
    loaded = hf_useg.StegoForUnsupervisedSegmentation.from_pretrained(tmp_path)
    assert loaded.config.id2label == {0: "car", 1: "road", 2: "unmatched_2", 3: "sky", 4: "unmatched_4"}
    assert loaded.config.label2id["car"] == 0 and loaded.config.label2id["road"] == 1
    assert loaded.cluster_probe.clusters.shape == (5, 6)
    torch.testing.assert_close(loaded.cluster_probe.clusters, model.cluster_probe.clusters, rtol=0, atol=0)


def test_loading_a_checkpoint_of_another_method_fails_clearly(tmp_path):
    config = hf_useg.DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=3)
    hf_useg.DinoForUnsupervisedSegmentation(config).save_pretrained(tmp_path)
    with pytest.raises((ValueError, TypeError, OSError), match="(?i)dino_segmentation|stego"):
        StegoForUnsupervisedSegmentation.from_pretrained(tmp_path)


def test_dinov2_backbone_works():
    torch.manual_seed(0)
    backbone = tiny_dinov2_config(patch_size=14, image_size=28)
    model = StegoForUnsupervisedSegmentation(StegoConfig(backbone_config=backbone, dim=5, num_classes=2))
    out = model(torch.randn(2, 3, 42, 28), pixel_values_pos=torch.randn(2, 3, 42, 28))
    assert out.code.shape == (2, 5, 3, 2) and torch.isfinite(out.loss)
    assert model.predict(torch.randn(1, 3, 28, 28)).cluster_log_probs.shape == (1, 2, 28, 28)


def test_mismatched_positive_pair_is_named():
    # channels, patch-size multiples and dtype: TestStegoSegmenter
    model = tiny_model()
    with pytest.raises(ValueError, match="must match"):
        model(torch.randn(2, 3, 32, 32), pixel_values_pos=torch.randn(1, 3, 32, 32))


def test_for_dataset_presets_build_models():
    config = StegoConfig.for_dataset("potsdam3", num_classes=3)
    assert config.dim == 70 and config.backbone_config.hidden_size == 384
    config.backbone_config = tiny_vit_config()
    model = StegoForUnsupervisedSegmentation(config)
    assert model.segmentation_head.linear.out_channels == 70
