import pytest
import torch
import torch.nn.functional as F
from segmenter_tester import UnsupervisedSegmenterTesterMixin
from tiny_configs import tiny_vit_config

from hf_useg import DinoForUnsupervisedSegmentation, DinoSegmentationConfig
from hf_useg.evaluation import UnsupervisedSegmentationMetric


def tiny_model(num_clusters: int = 3) -> DinoForUnsupervisedSegmentation:
    torch.manual_seed(0)
    config = DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=num_clusters)
    return DinoForUnsupervisedSegmentation(config)


class TestDinoKmeansSegmenter(UnsupervisedSegmenterTesterMixin):
    """The common checks (tests/segmenter_tester.py) on a fitted model; the round trip keeps the centroids (exactly)
    and the fitted state."""

    model_class = DinoForUnsupervisedSegmentation
    predict_matches_forward = True

    def make_model(self):
        model = tiny_model()
        model.fit([torch.randn(3, 3, 32, 32)], progress=False)
        return model

    def check_reloaded(self, model, reloaded, pixel_values):
        assert reloaded.is_fitted
        torch.testing.assert_close(reloaded.cluster_probe.clusters, model.cluster_probe.clusters, rtol=0, atol=0)


def test_unfitted_model_refuses_to_predict():
    model = tiny_model()
    with pytest.raises(ValueError, match="no fitted centroids"):
        model.predict(torch.randn(1, 3, 32, 32))


def test_fit_gives_nearest_centroid_predictions():
    model = tiny_model()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    result = model.fit(batches, progress=False, num_init=2)
    assert model.is_fitted
    torch.testing.assert_close(model.cluster_probe.clusters, result.centroids)
    # k-means labels of the fitted vectors equal argmax cosine of the model's features (nearest centroid)
    features = torch.cat([model.backbone(b).feature_map for b in batches])
    vectors = features.permute(0, 2, 3, 1).reshape(-1, 32)
    expected = (F.normalize(vectors, dim=1) @ F.normalize(result.centroids, dim=1).T).argmax(1)
    assert torch.equal(result.labels, expected)
    prediction = model.predict(batches[0], flip_tta=False, output_size=(4, 4))
    assert torch.equal(prediction.cluster_log_probs.argmax(1).flatten(), expected[: 4 * 16])
    assert prediction.linear_log_probs is None


def test_fit_subsamples_vectors_and_rejects_empty_data():
    model = tiny_model()
    result = model.fit([torch.randn(2, 3, 32, 32)], vectors_per_image=5, progress=False)
    assert result.labels.shape == (10,)
    with pytest.raises(ValueError, match="empty"):
        tiny_model().fit([], progress=False)


def test_kmeans_on_features_separates_two_flat_colours():
    """Images made of two flat colours: the baseline must segment them perfectly (Hungarian accuracy 1)."""
    model = tiny_model(num_clusters=2)
    images, labels = [], []
    for i in range(6):
        label = torch.zeros(32, 32, dtype=torch.long)
        label[:, : 8 * (1 + i % 3)] = 1
        image = torch.where(
            label.bool(),
            torch.tensor([2.0, -1.0, 0.5])[:, None, None],
            torch.tensor([-1.5, 1.0, 0.0])[:, None, None],
        )
        images.append(image)
        labels.append(label)
    pixel_values, labels = torch.stack(images), torch.stack(labels)
    model.fit([pixel_values], progress=False)
    prediction = model.predict(pixel_values, flip_tta=False).cluster_log_probs.argmax(1)
    metric = UnsupervisedSegmentationMetric(num_classes=2)
    # compare at patch resolution where the boundary falls on patch edges
    metric.update(prediction[:, 4::8, 4::8], labels[:, 4::8, 4::8])
    assert metric.compute()["accuracy"] == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="num_clusters"):
        DinoSegmentationConfig(num_clusters=0)
    with pytest.raises(ValueError, match="mode"):
        DinoSegmentationConfig(mode="spectral")
