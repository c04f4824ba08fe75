"""PiCIE training (METHODS 2.3, 2.6): the recipe's options, streaming k-means, one epoch's clustering and labelling,
and a tiny CPU run through the shared loop (train, resume bit-for-bit, DataLoader workers, reload, evaluate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import ResNetBackbone, ResNetConfig

from hf_useg import PicieConfig, PicieForUnsupervisedSegmentation
from hf_useg.clustering import kmeans, minibatch_kmeans_update
from hf_useg.data import ProcessedSegmentationDataset, make_synthetic_scenes
from hf_useg.image_processing import protocol_image_processor
from hf_useg.models.picie import training_picie
from hf_useg.models.picie.augmentation import apply_geometric, draw_view_parameters, make_picie_views
from hf_useg.models.picie.training_picie import (
    PicieEpochState,
    PicieRecipe,
    PicieTrainingOptions,
    StreamingKMeans,
    cluster_epoch,
    recluster_without_augmentation,
)
from hf_useg.training import latest_checkpoint, load_training_arguments, resolve_recipe_options, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "picie_tiny.yaml"
OLD_CONFIG = REPO / "tests" / "fixtures" / "picie_old_config.json"  # config.json written by the trainer before recipes
CPU = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Tiny tensors: on a shared 2-core machine, intra-op thread synchronisation makes these runs ~10x slower with
    # 2 threads than with 1 (the results are the same).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_resnet() -> ResNetConfig:
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic")


def unit_vectors(n: int, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# options and config


def test_options_defaults_are_the_released_coco_setting_and_presets_the_released_runs():
    options = PicieTrainingOptions()
    assert (options.kmeans_init_batches, options.kmeans_iterations, options.cluster_batch_size) == (20, 20, 256)
    assert (options.learning_rate, options.batch_size, options.resolution, options.num_epochs) == (1e-4, 128, 320, 10)
    assert options.max_steps is None and options.val_every is None and options.eval_resolution == 320
    assert options.base_resolution_factor == 2 and options.final_recluster and options.kmeans_init_max_vectors is None
    assert not options.released_augmentation and options.greyscale_probability == 0.2
    assert PicieTrainingOptions.from_preset("cocostuff27").learning_rate == 1e-4
    assert PicieTrainingOptions.from_preset("cityscapes27").learning_rate == 1e-3
    assert PicieRecipe(None, options).default_max_steps(7) == 70  # epochs -> steps


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(crop_scale_min=0.0), "crop scales"),
        (dict(crop_scale_min=0.8, crop_scale_max=0.6), "crop scales"),
        (dict(hue=0.7), "hue"),
        (dict(blur_radius_min=2.0, blur_radius_max=1.0), "blur_radius_max"),
        (dict(color_jitter_probability=1.5), "color_jitter_probability"),
        (dict(released_augmentation=True, blur_probability=1.0), "blur_probability"),
        (dict(learning_rate=0), "learning_rate must be > 0"),
        (dict(learning_rate="fast"), "learning_rate must be a number"),
        (dict(num_epochs=0), "num_epochs must be >= 1"),
        (dict(cluster_batch_size=0), "cluster_batch_size must be >= 1"),
        (dict(kmeans_init_max_vectors=0), "kmeans_init_max_vectors"),
    ],
)
def test_options_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PicieTrainingOptions(**kwargs)


def test_kmeans_vector_cap_is_checked_against_the_number_of_clusters():
    args = load_training_arguments(None, method="picie", kmeans_init_max_vectors=2)
    with pytest.raises(ValueError, match="kmeans_init_max_vectors"):
        PicieRecipe(args, resolve_recipe_options(args)).build_model(tiny_resnet(), num_classes=3)


def test_a_config_written_before_the_recipe_still_loads(tmp_path):
    old = json.loads(OLD_CONFIG.read_text())
    assert old["is_fitted"] and old["learning_rate"] == 1e-4 and old["cluster_batch_size"] == 8  # a real old file
    config = PicieConfig.from_json_file(str(OLD_CONFIG))
    assert (config.fpn_dim, config.num_clusters, config.backbone_config.model_type) == (8, 3, "vit")
    saved = config.to_dict()
    for name in ("is_fitted", "learning_rate", "num_epochs", "cluster_batch_size", "brightness", "resolution"):
        assert name not in saved and not hasattr(config, name), name
    # fitted = the weights hold centroids (the old flag is ignored): an old model folder reloads fitted
    model = PicieForUnsupervisedSegmentation(config)
    assert not model.is_fitted
    model.set_centroids(F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1))
    model.save_pretrained(tmp_path)
    shutil.copy(OLD_CONFIG, tmp_path / "config.json")
    reloaded = PicieForUnsupervisedSegmentation.from_pretrained(tmp_path)
    assert reloaded.is_fitted and torch.equal(reloaded.centroids, model.centroids)


# ----------------------------------------------------------------------------------------------------------------
# streaming k-means


def test_streaming_kmeans_is_kmeans_on_the_first_batches_then_online_updates():
    batches = [unit_vectors(30, seed=i) for i in range(4)]
    stream = StreamingKMeans(3, init_batches=2, num_iterations=7, seed=5)
    for batch in batches:
        stream.partial_fit(batch)
    init = kmeans(
        torch.cat(batches[:2]), 3, metric="euclidean", num_iterations=7, init="random", tolerance=0.0, seed=5
    )
    centroids, counts = init.centroids, torch.bincount(init.labels, minlength=3).double()
    assert counts.sum() == 60
    for batch in batches[2:]:
        centroids, counts = minibatch_kmeans_update(centroids, counts, batch)
    torch.testing.assert_close(stream.finalize(), centroids, rtol=0, atol=0)
    torch.testing.assert_close(stream.counts, counts, rtol=0, atol=0)
    assert stream.num_updates == 2 and stream.counts.dtype == torch.float64


def test_streaming_kmeans_with_fewer_batches_and_a_vector_cap():
    short = StreamingKMeans(2, init_batches=5, num_iterations=3, seed=0)
    short.partial_fit(unit_vectors(10))
    assert not short.initialized and short.finalize().shape == (2, 4) and short.counts.sum() == 10
    capped = StreamingKMeans(2, init_batches=2, num_iterations=3, seed=0, max_init_vectors=8)
    capped.partial_fit(unit_vectors(50, seed=1))
    capped.partial_fit(unit_vectors(50, seed=2))
    assert capped.counts.sum() == 8  # 4 vectors kept per initialisation batch
    with pytest.raises(ValueError, match="no vectors"):
        StreamingKMeans(2, init_batches=1, num_iterations=1).finalize()
    with pytest.raises(ValueError, match=r"\[N, C\] batch"):
        StreamingKMeans(2, init_batches=1, num_iterations=1).partial_fit(torch.zeros(0, 4))


# ----------------------------------------------------------------------------------------------------------------
# one epoch's clustering


# the clustering schedule of these tests
OPTIONS = PicieTrainingOptions(cluster_batch_size=2, kmeans_init_batches=2, kmeans_iterations=4)


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    config = PicieConfig(backbone_config=tiny_resnet(), fpn_dim=6, num_clusters=3)
    model = PicieForUnsupervisedSegmentation(config)
    scenes = make_synthetic_scenes(9, 32, 3, seed=0)
    items = ProcessedSegmentationDataset(scenes, protocol_image_processor(32), 3, with_labels=False)
    return model, items


def test_cluster_epoch_runs_minibatch_kmeans_then_labels_every_pixel(tiny_setup, monkeypatch):
    model, items = tiny_setup
    calls = []

    def spy(centroids, counts, vectors):
        calls.append(vectors.shape)
        return minibatch_kmeans_update(centroids, counts, vectors)

    monkeypatch.setattr(training_picie, "minibatch_kmeans_update", spy)
    params = draw_view_parameters(len(items), seed=0, epoch=0)
    model.train()
    tensors, stats = cluster_epoch(
        model, items, params, epoch=0, seed=0, resolution=16, accelerator=CPU, options=OPTIONS
    )
    assert model.training, "the model's mode is restored after the passes"
    # 9 images in batches of 2 -> 5 batches: 2 initialise the k-means, 3 are online updates, for each view
    assert len(calls) == 6
    assert sorted(shape[0] for shape in calls) == [16, 16, 32, 32, 32, 32]  # 16 px per image, last batch 1 image
    assert set(tensors) == {"centroids1", "centroids2", "weights1", "weights2", "labels1", "labels2"}
    assert tensors["labels1"].shape == (9, 4, 4) and tensors["labels1"].dtype == torch.uint8

    # labels = nearest centroid (squared L2) of the features recomputed independently for every image
    model.eval()
    pixel_values = torch.stack([items[i]["pixel_values"] for i in range(len(items))])
    images = pixel_values * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (images + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)).clamp(0, 1)
    with torch.no_grad():
        view1, view2 = make_picie_views(images, params, 16)
        z1 = F.normalize(model.fpn_features(view1), dim=1)
        z2 = F.normalize(apply_geometric(model.fpn_features(view2), params.geometric, (4, 4)), dim=1)
    for view, z in ((1, z1), (2, z2)):
        centroids = tensors[f"centroids{view}"]
        distances = ((z[:, None] - centroids[None, :, :, None, None]) ** 2).sum(2)  # [N, K, h, w]
        assert torch.equal(distances.argmin(1), tensors[f"labels{view}"].long())
        counts = torch.bincount(tensors[f"labels{view}"].long().flatten(), minlength=3).float()
        torch.testing.assert_close(tensors[f"weights{view}"], counts / counts.sum())  # released: frequency
    assert 0 < stats["cluster/kmeans_loss1"] < 4


def test_cluster_epoch_balanced_weights_and_overclustering(tiny_setup):
    model, items = tiny_setup
    model.config.cluster_weighting, model.config.overclustering, model.config.num_overclusters = "balanced", True, 5
    try:
        params = draw_view_parameters(len(items), seed=1, epoch=2)
        tensors, _ = cluster_epoch(
            model, items, params, epoch=2, seed=1, resolution=16, accelerator=CPU, options=OPTIONS
        )
    finally:
        model.config.cluster_weighting, model.config.overclustering = "frequency", False
    assert tensors["over_centroids1"].shape == (5, 6) and int(tensors["over_labels2"].max()) < 5
    counts = torch.bincount(tensors["labels1"].long().flatten(), minlength=3).double()
    inverse = torch.where(counts > 0, 1 / counts.clamp_min(1), torch.zeros_like(counts))
    torch.testing.assert_close(tensors["weights1"], (inverse / inverse.sum()).float())


def test_final_reclustering_is_streaming_kmeans_on_the_unaugmented_features(tiny_setup):
    model, items = tiny_setup
    centroids = recluster_without_augmentation(model, items, seed=0, accelerator=CPU, options=OPTIONS)
    assert torch.equal(
        centroids, recluster_without_augmentation(model, items, seed=0, accelerator=CPU, options=OPTIONS)
    )
    # the same procedure by hand: seeded order, batches of cluster_batch_size, features of the items as they are
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(training_picie._derived_seed(0, -1, 2)))
    stream = StreamingKMeans(3, init_batches=2, num_iterations=4, seed=training_picie._derived_seed(0, -1, 3))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), 2):
            batch = torch.stack([items[int(i)]["pixel_values"] for i in order[start : start + 2]])
            code = model.compute_code(batch)
            stream.partial_fit(code.permute(0, 2, 3, 1).reshape(-1, 6))
    torch.testing.assert_close(centroids, stream.finalize(), rtol=1e-5, atol=1e-6)


def test_epoch_state_round_trip_and_targets():
    state = PicieEpochState()
    state.epoch = 3
    state.tensors = {"centroids1": torch.randn(2, 4), "labels1": torch.randint(0, 2, (5, 3, 3), dtype=torch.uint8)}
    restored = PicieEpochState()
    restored.load_state_dict(state.state_dict())
    assert restored.epoch == 3 and torch.equal(restored.tensors["labels1"], state.tensors["labels1"])
    targets = restored.targets(torch.tensor([4, 0]), torch.device("cpu"))
    assert targets["labels1"].dtype == torch.long and torch.equal(
        targets["labels1"][0], state.tensors["labels1"][4].long()
    )


def test_build_model_reads_presets_and_yaml_numbers():
    # training settings written under model: (as earlier releases did) become recipe options
    args = load_training_arguments(
        None, method="picie", preset="cityscapes27", model={"brightness": 0, "learning_rate": "2e-3", "fpn_dim": 8}
    )
    recipe = PicieRecipe(args, resolve_recipe_options(args))
    config = recipe.build_model(tiny_resnet(), num_classes=5).config
    assert config.num_clusters == 5 and config.fpn_dim == 8 and config.dataset_name == "cityscapes27"
    options = recipe.options
    assert options.brightness == 0.0 and isinstance(options.brightness, float) and options.learning_rate == 2e-3
    assert config.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    preset = load_training_arguments(None, method="picie", preset="cityscapes27")
    assert resolve_recipe_options(preset).learning_rate == 1e-3


# ----------------------------------------------------------------------------------------------------------------
# end to end through the trainer (tiny ResNet saved locally: an offline "backbone" folder)


@pytest.fixture(scope="module")
def resnet_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-resnet")
    torch.manual_seed(0)
    ResNetBackbone(tiny_resnet()).save_pretrained(path)
    return path


def _args(output: Path, backbone: Path, **overrides):
    return load_training_arguments(TINY, output_dir=str(output), backbone=str(backbone), **overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, resnet_folder):
    output = tmp_path_factory.mktemp("full")
    summary = train(_args(output, resnet_folder))
    return output, summary


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_run_trains_clusters_every_epoch_and_saves_a_fitted_model(uninterrupted):
    output, summary = uninterrupted
    model_dir = output / "model"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json"):
        assert (model_dir / name).exists(), name
    assert summary["steps"] == 8 and summary["method"] == "picie"
    assert 0.0 <= summary["cluster_mean_iou"] <= 1.0 and "linear_accuracy" not in summary
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "picie" and "is_fitted" not in config and "learning_rate" not in config
    assert load_file(str(model_dir / "model.safetensors"))["centroids"].any()  # fitted
    lines = _metrics(output)
    assert [line["cluster/epoch"] for line in lines if "cluster/epoch" in line] == [0.0, 1.0]  # 6 steps per epoch
    assert any("train/within" in line for line in lines) and any("val/cluster_mean_iou" in line for line in lines)
    assert latest_checkpoint(output).name == "checkpoint-00000008"
    # the final model holds the re-clustered centroids (no augmentation), not the last epoch's
    epoch_state = torch.load(latest_checkpoint(output) / "custom_checkpoint_0.pkl", weights_only=False)
    assert epoch_state["epoch"] == 1 and epoch_state["tensors"]["labels1"].shape[0] == 24
    final = load_file(str(model_dir / "model.safetensors"))["centroids"]
    assert final.shape == (3, 8) and not torch.equal(final, epoch_state["tensors"]["centroids1"])


@pytest.mark.slow
@pytest.mark.parametrize("stop", [4, 6])  # mid-epoch (labels from the checkpoint), epoch boundary (re-clustered)
def test_resume_matches_the_uninterrupted_run(uninterrupted, resnet_folder, tmp_path, stop):
    full_output, _ = uninterrupted
    train(_args(tmp_path, resnet_folder, max_steps=stop, save_every=stop))
    assert latest_checkpoint(tmp_path).name == f"checkpoint-{stop:08d}"
    summary = train(_args(tmp_path, resnet_folder, resume_from_checkpoint="latest"))
    assert summary["steps"] == 8
    expected, resumed = (
        load_file(str(full_output / "model" / "model.safetensors")),
        load_file(str(tmp_path / "model" / "model.safetensors")),
    )
    assert expected.keys() == resumed.keys() and "fpn.lateral.0.weight" in expected
    for key in expected:  # BatchNorm statistics, FPN, backbone and final centroids
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    epochs = [line["cluster/epoch"] for line in _metrics(tmp_path) if "cluster/epoch" in line]
    assert epochs == [0.0, 1.0], "a resumed run reuses the checkpoint's clustering instead of redoing epoch 0"


@pytest.mark.slow
def test_dataloader_workers_train_the_same_model(uninterrupted, resnet_folder, tmp_path):
    full_output, _ = uninterrupted
    train(_args(tmp_path, resnet_folder, num_workers=2))
    expected = load_file(str(full_output / "model" / "model.safetensors"))
    with_workers = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert expected.keys() == with_workers.keys()
    for key in expected:
        # worker processes run torch on one thread: equal up to float rounding
        torch.testing.assert_close(with_workers[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert _metrics(tmp_path) == _metrics(full_output)


@pytest.mark.slow
def test_saved_model_reloads_and_evaluates(uninterrupted):
    import hf_useg
    from hf_useg.inference import evaluate_segmenter

    output, summary = uninterrupted
    model = hf_useg.PicieForUnsupervisedSegmentation.from_pretrained(output / "model")
    assert model.config.fpn_dim == 8 and model.is_fitted
    scenes = make_synthetic_scenes(8, 32, 3, seed=1)  # the trainer's generated validation split (24 // 4, >= 8)
    results = evaluate_segmenter(model, scenes, protocol_image_processor(32), 3, flip_tta=False, progress=False)
    assert results["cluster"]["accuracy"] == pytest.approx(summary["cluster_accuracy"])
    assert set(results) == {"cluster"}


@pytest.mark.slow
def test_the_tiny_config_as_shipped_trains_on_a_random_vit(tmp_path):
    summary = train(load_training_arguments(TINY, output_dir=str(tmp_path), max_steps=2))
    assert summary["steps"] == 2 and "randomly initialised ViT" in summary["backbone"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["backbone_config"]["model_type"] == "vit" and "is_fitted" not in config
    assert load_file(str(tmp_path / "model" / "model.safetensors"))["centroids"].any()  # fitted
