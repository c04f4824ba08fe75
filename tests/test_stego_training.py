import pytest
import torch
from accelerate import Accelerator
from tiny_configs import tiny_vit_config

from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation
from hf_useg.data import expand_five_crops, global_descriptors, make_synthetic_scenes, nearest_neighbors
from hf_useg.data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from hf_useg.image_processing import protocol_image_processor
from hf_useg.models.stego.training_stego import _knn_cache_key, compute_feature_cache, compute_knn_table

TINY = tiny_vit_config()


def _model():
    torch.manual_seed(0)
    return StegoForUnsupervisedSegmentation(StegoConfig(backbone_config=TINY, dim=4, num_classes=3)).eval()


def _items(seed: int, five_crop: bool = False):
    dataset = make_synthetic_scenes(num_images=4, image_size=64, num_classes=3, seed=seed)
    source = dataset
    if five_crop:
        dataset = expand_five_crops(dataset)
    return source, ProcessedSegmentationDataset(dataset, protocol_image_processor(32), num_classes=3)


def test_knn_table_is_the_descriptor_top_k_and_is_reused_from_the_cache(tmp_path):
    model = _model()
    _, items = _items(0)
    accelerator = Accelerator(cpu=True)
    kwargs = dict(
        resolution=32, k=3, five_crop=False, cache_dir=tmp_path, batch_size=2, accelerator=accelerator, progress=False
    )
    table = compute_knn_table(model, items, **kwargs)
    batch = collate_segmentation_batch([items[i] for i in range(len(items))])
    with torch.no_grad():
        expected = nearest_neighbors(global_descriptors(model.extract_features(batch["pixel_values"])), 3)
    assert torch.equal(table, expected)
    assert table[:, 0].tolist() == list(range(4))  # rank 0 is the item itself
    cached = list(tmp_path.glob("knn-*.pt"))
    assert len(cached) == 1
    torch.save(torch.zeros_like(table), cached[0])  # a rerun must read the file, not recompute
    assert torch.equal(compute_knn_table(model, items, **kwargs), torch.zeros_like(table))
    # precomputed feature maps give the same table without touching the images
    features = compute_feature_cache(model, items, batch_size=2, device="cpu", progress=False)
    assert features.labels.shape == (4, 32, 32)
    assert torch.equal(
        compute_knn_table(model, items, **{**kwargs, "cache_dir": None}, features=features.features), expected
    )


def test_knn_cache_key_tells_five_crops_of_different_datasets_apart():
    model = _model()
    source_a, items_a = _items(0, five_crop=True)
    source_b, items_b = _items(1, five_crop=True)
    # the lazy five-crop index datasets look identical: only the source fingerprint separates them
    key_a = _knn_cache_key(model, items_a, 32, 3, True, source_a._fingerprint)
    key_b = _knn_cache_key(model, items_b, 32, 3, True, source_b._fingerprint)
    assert key_a != key_b
    assert key_a == _knn_cache_key(model, items_a, 32, 3, True, source_a._fingerprint)
    assert key_a != _knn_cache_key(model, items_a, 64, 3, True, source_a._fingerprint)


def test_calibrate_shifts_are_the_median_correlations():
    from hf_useg.models.stego.training_stego import calibrate_shifts

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 2, 3, generator=generator)
    unit = features / features.norm(dim=1, keepdim=True)
    intra, inter = [], []
    for n in range(3):
        a, b = unit[n].reshape(5, -1), unit[(n + 1) % 3].reshape(5, -1)
        intra.append(a.T @ a)  # [6 pixels, 6 pixels]
        inter.append(a.T @ b)
    intra, inter = torch.stack(intra), torch.stack(inter)
    plain = calibrate_shifts(features, pointwise=False)
    assert plain["pos_intra_shift"] == pytest.approx(float(intra.flatten().quantile(0.5)), abs=1e-6)
    assert plain["pos_inter_shift"] == pytest.approx(float(inter.flatten().quantile(0.5)), abs=1e-6)
    # pointwise: each query pixel's row is centred, then the global mean is added back (as in the loss)
    centred = inter - inter.mean(dim=2, keepdim=True) + inter.mean()
    pointwise = calibrate_shifts(features, pointwise=True)
    assert pointwise["pos_inter_shift"] == pytest.approx(float(centred.flatten().quantile(0.5)), abs=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        calibrate_shifts(features[:1])


@pytest.mark.slow
def test_training_with_calibrated_shifts_stores_them_in_the_config(tmp_path):
    import json
    from pathlib import Path

    from hf_useg.training import load_training_arguments, train

    tiny = Path(__file__).resolve().parents[1] / "training" / "configs" / "stego_tiny.yaml"
    summary = train(
        load_training_arguments(
            tiny, output_dir=str(tmp_path), max_steps=2, calibrate_shifts=True, cache_backbone_features=True
        )
    )
    config = json.loads((Path(summary["model_dir"]) / "config.json").read_text())
    default = StegoConfig()
    assert config["pos_intra_shift"] != default.pos_intra_shift
    assert -1.0 <= config["pos_intra_shift"] <= 1.0 and -1.0 <= config["pos_inter_shift"] <= 1.0
