"""STEGO's backbone-feature cache: the float16 memory-mapped file on disk (round trip, header, reuse, atomic write,
disk-space check), the collator reading it in DataLoader workers, and the backbone's autocast dtype."""

from __future__ import annotations

import errno
import json
import os
import pickle
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from tiny_configs import tiny_vit_config
from torch.utils.data import DataLoader, Dataset

from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation
from hf_useg.data import global_descriptors, nearest_neighbors
from hf_useg.models.stego import training_stego
from hf_useg.models.stego.training_stego import (
    FeatureCache,
    StegoPairCollator,
    StegoPairs,
    StegoTrainingOptions,
    compute_feature_cache,
    feature_cache_bytes,
    frozen_backbone_features,
    load_or_compute_feature_cache,
    resolve_backbone_dtype,
)
from hf_useg.training.recipe import StepBatchSampler

REPO = Path(__file__).resolve().parents[1]
TINY_STEGO = REPO / "training" / "configs" / "stego_tiny.yaml"
NUM_ITEMS = 7


class _Items(Dataset):
    """Processed-looking items: ``pixel_values [3, 32, 32]`` and labels with ignored (-1) pixels."""

    num_classes = 3

    def __init__(self, num_items: int = NUM_ITEMS):
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(num_items, 3, 32, 32, generator=generator)
        self.labels = torch.randint(-1, 3, (num_items, 32, 32), generator=generator)

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def _model() -> StegoForUnsupervisedSegmentation:
    torch.manual_seed(0)
    return StegoForUnsupervisedSegmentation(
        StegoConfig(backbone_config=tiny_vit_config(), dim=4, num_classes=3)
    ).eval()


def _cache(model, items, directory: Path, **kwargs) -> FeatureCache:
    # batches of 3 over 7 items: a partial last batch
    return compute_feature_cache(
        model, items, batch_size=3, device="cpu", progress=False, directory=directory, **kwargs
    )


def test_disk_cache_round_trip_header_and_pickling(tmp_path):
    model, items = _model(), _Items()
    cache = _cache(model, items, tmp_path / "cache", key="abc")
    with torch.no_grad():
        expected = model.extract_features(items.pixel_values)  # one batch of 7: a separate computation

    assert cache.on_disk and len(cache) == NUM_ITEMS and cache.feature_shape == (32, 4, 4)
    assert cache.dtype == torch.float16
    gathered = cache.gather([6, 0, 3])
    assert gathered.dtype == torch.float16 and gathered.shape == (3, 32, 4, 4)
    # float16 keeps 11 significant bits: relative rounding below 2**-11
    torch.testing.assert_close(gathered.float(), expected[[6, 0, 3]], rtol=2**-10, atol=1e-5)
    torch.testing.assert_close(cache.features.float(), expected, rtol=2**-10, atol=1e-5)
    # descriptors come from the float32 maps, before the rounding
    torch.testing.assert_close(cache.descriptors, global_descriptors(expected), rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.gather_labels([6, 0, 3]), items.labels[[6, 0, 3]])  # -1 survives the uint8 storage
    assert torch.equal(cache.labels, items.labels)

    header = json.loads((tmp_path / "cache" / "header.json").read_text())
    assert header["num_items"] == NUM_ITEMS and header["feature_shape"] == [32, 4, 4]
    assert header["dtype"] == "float16" and header["key"] == "abc" and header["backbone_dtype"] == "float32"
    assert header["labels"] == {"shape": [32, 32], "dtype": "uint8", "ignore": 255}
    sizes = {path.name: path.stat().st_size for path in (tmp_path / "cache").iterdir()}
    assert sizes["features.bin"] == NUM_ITEMS * 32 * 4 * 4 * 2
    assert sizes["descriptors.bin"] == NUM_ITEMS * 32 * 4
    assert sizes["labels.bin"] == NUM_ITEMS * 32 * 32
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # the temporary folder was renamed into place

    cache.gather([1])  # maps open in this process
    state = pickle.dumps(cache)
    assert len(state) < 4096  # the path and header, never the arrays
    restored = pickle.loads(state)
    assert torch.equal(restored.gather([5, 2]), cache.gather([5, 2]))
    assert torch.equal(FeatureCache.open(tmp_path / "cache").gather([4]), cache.gather([4]))


def test_float32_disk_cache_holds_the_backbone_values(tmp_path):
    model, items = _model(), _Items()
    cache = _cache(model, items, tmp_path / "cache", dtype="float32")
    with torch.no_grad():
        expected = model.extract_features(items.pixel_values)
    assert cache.dtype == torch.float32
    torch.testing.assert_close(cache.gather(range(NUM_ITEMS)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dtype must be one of"):
        _cache(model, items, tmp_path / "other", dtype="int8")


def test_ram_cache_gathers_the_same_way():
    features = torch.randn(5, 4, 2, 2)
    labels = torch.randint(-1, 3, (5, 8, 8)).to(torch.int16)
    cache = FeatureCache(features, labels)
    assert not cache.on_disk and len(cache) == 5 and cache.feature_shape == (4, 2, 2)
    assert torch.equal(cache.gather([3, 1]), features[[3, 1]])
    assert cache.gather_labels([2]).dtype == torch.long and torch.equal(cache.gather_labels([2]), labels[[2]].long())
    torch.testing.assert_close(cache.descriptors, global_descriptors(features))
    assert FeatureCache(features).gather_labels([0]) is None
    with pytest.raises(ValueError, match="labels has 4 rows, features 5"):
        FeatureCache(features, labels[:4])


def test_a_resumed_run_reuses_the_cache(tmp_path, monkeypatch):
    model, items = _model(), _Items()
    accelerator = Accelerator(cpu=True)
    kwargs = dict(directory=tmp_path / "cache", accelerator=accelerator, batch_size=3, progress=False)
    first = load_or_compute_feature_cache(model, items, **kwargs)
    written = (tmp_path / "cache" / "features.bin").stat().st_mtime_ns

    def no_backbone(*args, **kwargs):
        raise AssertionError("the cache must be read, not recomputed")

    monkeypatch.setattr(training_stego, "frozen_backbone_features", no_backbone)
    again = load_or_compute_feature_cache(model, items, **kwargs)
    assert torch.equal(again.gather(range(NUM_ITEMS)), first.gather(range(NUM_ITEMS)))
    assert (tmp_path / "cache" / "features.bin").stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="has 7 items, the training set 6"):
        load_or_compute_feature_cache(model, _Items(6), **kwargs)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model, items = _model(), _Items()
    calls = []
    real = training_stego.frozen_backbone_features

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("backbone died")
        return real(*args, **kwargs)

    monkeypatch.setattr(training_stego, "frozen_backbone_features", dies_on_the_second_batch)
    with pytest.raises(RuntimeError, match="backbone died"):
        _cache(model, items, tmp_path / "cache")
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(training_stego, "frozen_backbone_features", real)

    def disk_full(files, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training_stego, "_write_arrays", disk_full)
    with pytest.raises(OSError, match="filled up while writing the backbone feature cache.*cache_backbone_features"):
        _cache(model, items, tmp_path / "cache")
    assert os.listdir(tmp_path) == []


def test_the_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    model, items = _model(), _Items()
    # by hand: 7 items x 32 x 4 x 4 float16 maps + 7 x 32 float32 descriptors + 7 x 32 x 32 uint8 labels
    needed = 7 * 32 * 4 * 4 * 2 + 7 * 32 * 4 + 7 * 32 * 32
    assert feature_cache_bytes(7, (32, 4, 4), (32, 32)) == needed
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(training_stego.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError) as caught:
        _cache(model, items, tmp_path / "deep" / "cache")
    message = str(caught.value)
    assert f"{needed:,} bytes" in message and "1,000 bytes" in message and str(tmp_path) in message
    assert "7 items x 32 x 4 x 4 x 2 bytes of float16" in message
    assert "--cache_backbone_features false" in message
    assert os.listdir(tmp_path) == []
    # every process of a run checks before the barrier: the same error from load_or_compute_feature_cache
    with pytest.raises(OSError, match="the backbone feature cache needs"):
        load_or_compute_feature_cache(
            model, items, directory=tmp_path / "cache", accelerator=Accelerator(cpu=True), batch_size=3
        )
    monkeypatch.setattr(training_stego.shutil, "disk_usage", lambda path: usage(10**6, 0, needed))
    assert _cache(model, items, tmp_path / "cache").on_disk  # exactly enough


def test_a_damaged_cache_is_named(tmp_path):
    _cache(_model(), _Items(), tmp_path / "cache")
    with open(tmp_path / "cache" / "features.bin", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ValueError, match="features.bin has 100 bytes where its header says 7168.*delete"):
        FeatureCache.open(tmp_path / "cache")
    (tmp_path / "cache" / "header.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a version-1 hf_useg feature cache"):
        FeatureCache.open(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="holds no feature cache"):
        FeatureCache.open(tmp_path / "missing")


def test_collator_reads_the_memory_map_in_a_dataloader_worker(tmp_path):
    items = _Items()
    cache = _cache(_model(), items, tmp_path / "cache")
    knn = nearest_neighbors(cache.descriptors, 4)
    pairs = StegoPairs(items, knn, num_neighbors=3, cache=cache)
    sampler = StepBatchSampler(len(items), batch_size=3, seed=0)
    loader = DataLoader(pairs, batch_sampler=sampler, collate_fn=StegoPairCollator(cache), num_workers=1)
    batches = list(loader)
    assert len(batches) == 2
    for batch, keys in zip(batches, sampler):
        indices = [key.index for key in keys]
        partners = [pairs[key]["partner"] for key in keys]  # the step's draws, replayed in this process
        assert sorted(batch) == ["backbone_features", "backbone_features_pos", "labels"]
        assert batch["backbone_features"].dtype == torch.float16
        assert torch.equal(batch["backbone_features"], cache.gather(indices))
        assert torch.equal(batch["backbone_features_pos"], cache.gather(partners))
        assert torch.equal(batch["labels"], items.labels[indices])


def test_backbone_dtype_resolution_and_autocast():
    assert resolve_backbone_dtype("auto", "cpu") is None
    assert resolve_backbone_dtype("float32", "cpu") is None
    assert resolve_backbone_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_backbone_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="backbone_dtype must be one of"):
        resolve_backbone_dtype("fp8", "cpu")
    with pytest.raises(ValueError, match="backbone_dtype must be one of"):
        StegoTrainingOptions(backbone_dtype="half")
    with pytest.raises(ValueError, match="feature_cache_dtype must be one of"):
        StegoTrainingOptions(feature_cache_dtype="bfloat16")
    assert StegoTrainingOptions().cache_backbone_features  # the cache is the default path

    model, items = _model(), _Items()
    with torch.no_grad():
        exact = frozen_backbone_features(model, items.pixel_values)
        half = frozen_backbone_features(model, items.pixel_values, torch.bfloat16)
    assert half.dtype == torch.float32 and not torch.equal(half, exact)  # autocast ran, the output is float32
    torch.testing.assert_close(half, exact, rtol=0.05, atol=0.05)  # bfloat16 keeps 8 significant bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_runs_the_backbone_in_bfloat16(tmp_path):
    model, items = _model().cuda(), _Items()
    dtype = resolve_backbone_dtype("auto", "cuda")
    assert dtype in (torch.bfloat16, torch.float16)
    cache = compute_feature_cache(
        model, items, batch_size=3, device="cuda", progress=False, directory=tmp_path / "c", backbone_dtype=dtype
    )
    with torch.no_grad():
        expected = model.extract_features(items.pixel_values.cuda()).cpu()
    torch.testing.assert_close(cache.gather(range(NUM_ITEMS)).float(), expected, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------- training


def _train(output: Path, **overrides) -> list[dict]:
    from hf_useg.training import load_training_arguments, train

    train(load_training_arguments(TINY_STEGO, output_dir=str(output), val_every=100, log_every=1, **overrides))
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "train/loss" in line]


@pytest.mark.slow
def test_training_caches_on_disk_and_a_resumed_run_reuses_it(tmp_path, monkeypatch):
    _train(tmp_path, max_steps=2, save_every=2)
    caches = list((tmp_path / "feature_cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("features-")
    header = json.loads((caches[0] / "header.json").read_text())
    assert header["dtype"] == "float16" and header["num_items"] == 24 * 5  # five crops of 24 images

    def no_recompute(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the feature cache")

    monkeypatch.setattr(training_stego, "compute_feature_cache", no_recompute)
    logged = _train(tmp_path, max_steps=4, save_every=2, resume_from_checkpoint="latest")
    assert [line["step"] for line in logged] == [1, 2, 3, 4]


@pytest.mark.slow
def test_cached_float16_training_follows_the_released_way(tmp_path):
    """The default path (float16 cache on disk) against the released code's (float32 backbone on every step): the
    same steps on the same pairs, losses within float16 rounding; a float32 cache gives the very same run."""
    released = _train(tmp_path / "released", max_steps=4, cache_backbone_features=False, backbone_dtype="float32")
    cached32 = _train(tmp_path / "cached32", max_steps=4, feature_cache_dtype="float32")
    cached16 = _train(tmp_path / "cached16", max_steps=4)
    assert not (tmp_path / "released" / "feature_cache").exists()
    for name in ("train/loss", "train/correlation_loss", "train/linear_probe_loss"):
        for ref, same, half in zip(released, cached32, cached16):
            assert same[name] == pytest.approx(ref[name], rel=1e-5, abs=1e-6), name
            assert half[name] == pytest.approx(ref[name], rel=1e-3, abs=1e-4), name


@pytest.mark.slow
def test_training_without_cache_runs_the_backbone_under_autocast(tmp_path):
    fp32 = _train(tmp_path / "fp32", max_steps=2, cache_backbone_features=False, backbone_dtype="float32")
    bf16 = _train(tmp_path / "bf16", max_steps=2, cache_backbone_features=False, backbone_dtype="bfloat16")
    for exact, half in zip(fp32, bf16):
        assert half["train/loss"] != exact["train/loss"]  # the backbone ran in bfloat16
        assert half["train/loss"] == pytest.approx(exact["train/loss"], rel=0.05)
