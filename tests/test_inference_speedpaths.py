"""The fast inference paths: SDPA attention by default (eager only for attention maps), the backbone under autocast
(`backbone_autocast`, ``predict(autocast_dtype=...)``, ``evaluate_segmenter(dtype=...)``, ``hf-useg evaluate
--dtype``), batching (batch-size-independent scores, the pipeline's ``batch_size``) and DataLoader workers.
CPU-only unless marked; tiny random models and images."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import tiny_dinov2_config, tiny_vit_config

from hf_useg import (
    DinoForUnsupervisedSegmentation,
    DinoSegmentationConfig,
    IicConfig,
    IicForUnsupervisedSegmentation,
    StegoConfig,
    StegoForUnsupervisedSegmentation,
)
from hf_useg.backbones import FeatureBackbone, backbone_autocast, resolve_autocast_dtype
from hf_useg.cli import main
from hf_useg.image_processing import protocol_image_processor, whole_image_processor
from hf_useg.inference import evaluate_segmenter

NUM_CLASSES = 3
TINY_IIC = dict(vgg_channels=[8, 8, 16, 16, 16, 16], num_classes=3, num_overclusters=7)


def _stego(layers: int = 2, seed: int = 0) -> StegoForUnsupervisedSegmentation:
    torch.manual_seed(seed)
    config = StegoConfig(backbone_config=tiny_vit_config(num_hidden_layers=layers), dim=8, num_classes=NUM_CLASSES)
    return StegoForUnsupervisedSegmentation(config).eval()


@pytest.fixture(scope="module")
def scenes():
    from hf_useg.data import make_synthetic_scenes

    return make_synthetic_scenes(num_images=6, image_size=40, num_classes=NUM_CLASSES, seed=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stego-speed")
    _stego().save_pretrained(folder)
    whole_image_processor(32, 8).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# SDPA attention


@pytest.mark.parametrize("config", [tiny_vit_config(), tiny_dinov2_config()], ids=["vit", "dinov2"])
def test_backbone_uses_sdpa_and_eager_only_for_attention_maps(config):
    backbone = FeatureBackbone(config, frozen=True)
    assert backbone.model.config._attn_implementation == "sdpa"
    pixels = torch.randn(2, 3, 32, 40)
    with_maps = backbone(pixels, output_cls_attention=True)
    assert with_maps.cls_attention.shape == (2, 2, 4, 5)
    assert backbone.model.config._attn_implementation == "sdpa"  # switched back after the call
    torch.testing.assert_close(backbone(pixels).feature_map, with_maps.feature_map, rtol=1e-4, atol=1e-5)


def test_sdpa_features_match_eager_ones():
    torch.manual_seed(0)
    sdpa = FeatureBackbone(tiny_vit_config(num_hidden_layers=2), frozen=True)
    eager = FeatureBackbone(tiny_vit_config(num_hidden_layers=2, attn_implementation="eager"), frozen=True)
    eager.load_state_dict(sdpa.state_dict())
    assert eager.model.config._attn_implementation == "eager"
    pixels = torch.randn(2, 3, 48, 40)
    torch.testing.assert_close(sdpa(pixels).feature_map, eager(pixels).feature_map, rtol=1e-4, atol=1e-5)


def test_loaded_models_keep_sdpa(model_dir, tmp_path):
    loaded = StegoForUnsupervisedSegmentation.from_pretrained(model_dir)
    assert loaded.backbone.model.config._attn_implementation == "sdpa"
    FeatureBackbone(tiny_vit_config()).model.save_pretrained(tmp_path / "vit")
    assert FeatureBackbone.from_pretrained(str(tmp_path / "vit")).model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# autocast


def test_resolve_autocast_dtype():
    assert resolve_autocast_dtype("auto", "cpu") is None
    assert resolve_autocast_dtype("float32", "cpu") is None
    assert resolve_autocast_dtype(None, "cpu") is None
    assert resolve_autocast_dtype(torch.float32, "cpu") is None
    assert resolve_autocast_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_autocast_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 autocast is for GPUs"):
        resolve_autocast_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="one of auto, float32, bfloat16, float16, got 'fp8'"):
        resolve_autocast_dtype("fp8", "cpu")
    with pytest.raises(ValueError, match="torch.int8"):
        resolve_autocast_dtype(torch.int8, "cpu")
    with pytest.raises(TypeError, match="a name"):
        resolve_autocast_dtype(16, "cpu")


def test_every_predict_takes_the_autocast_dtype():
    """The methods that override `predict` (DINO k-means and attention modes, IIC) pass ``autocast_dtype`` on: the
    DINO backbone runs in bfloat16 (other values, argmax mostly the same), IIC's own trunk is no FeatureBackbone
    (identical values)."""
    torch.manual_seed(0)
    config = DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=NUM_CLASSES)
    kmeans = DinoForUnsupervisedSegmentation(config).eval()
    kmeans.fit([torch.randn(4, 3, 32, 32)], progress=False)
    pixels = torch.randn(2, 3, 32, 32)
    full, half = kmeans.predict(pixels), kmeans.predict(pixels, autocast_dtype="bfloat16")
    assert not torch.equal(full.cluster_log_probs, half.cluster_log_probs)
    assert (full.cluster_log_probs.argmax(1) == half.cluster_log_probs.argmax(1)).float().mean() > 0.9
    attention = DinoForUnsupervisedSegmentation(
        DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=NUM_CLASSES, mode="attention")
    )
    masks = attention.eval().predict(pixels, autocast_dtype=torch.bfloat16)
    assert type(masks) is type(attention.predict(pixels))
    iic = IicForUnsupervisedSegmentation(IicConfig(**TINY_IIC)).eval()
    torch.testing.assert_close(
        iic.predict(pixels, autocast_dtype="bfloat16").cluster_log_probs, iic.predict(pixels).cluster_log_probs
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_is_a_half_precision_on_cuda():
    major = torch.cuda.get_device_capability()[0]
    assert resolve_autocast_dtype("auto", "cuda") == (torch.bfloat16 if major >= 8 else torch.float16)


def test_backbone_autocast_runs_the_backbone_in_bfloat16_and_returns_float32():
    torch.manual_seed(0)
    backbone = FeatureBackbone(tiny_vit_config(num_hidden_layers=2), frozen=True)
    pixels = torch.randn(2, 3, 32, 32)
    full = backbone(pixels)
    with backbone_autocast(torch.bfloat16):
        half = backbone(pixels)
        with_maps = backbone(pixels, output_cls_attention=True)  # eager attention, also under autocast
        inner_full = backbone(pixels, autocast_dtype=torch.float32)
        with backbone_autocast(torch.float32):
            nested_full = backbone(pixels)
    explicit = backbone(pixels, autocast_dtype=torch.bfloat16)
    after = backbone(pixels)
    for value in (half.feature_map, half.cls_token, with_maps.feature_map, with_maps.cls_attention):
        assert value.dtype == torch.float32
    # bf16 matmuls: close to the float32 features, but clearly not float32 ones (so autocast did run)
    scale = full.feature_map.abs().max()
    for value in (half, with_maps, explicit):
        difference = (value.feature_map - full.feature_map).abs().max()
        assert 1e-4 * scale < difference < 0.05 * scale
    torch.testing.assert_close(explicit.feature_map, half.feature_map, rtol=1e-6, atol=1e-6)
    for value in (inner_full, nested_full, after):  # full precision again
        torch.testing.assert_close(value.feature_map, full.feature_map, rtol=1e-6, atol=1e-6)


def test_backbone_autocast_is_per_thread():
    torch.manual_seed(0)
    backbone = FeatureBackbone(tiny_vit_config(), frozen=True)
    pixels = torch.randn(1, 3, 32, 32)
    full = backbone(pixels).feature_map
    seen = []
    with backbone_autocast(torch.bfloat16):
        thread = threading.Thread(target=lambda: seen.append(backbone(pixels).feature_map))
        thread.start()
        thread.join()
    torch.testing.assert_close(seen[0], full, rtol=1e-6, atol=1e-6)


def test_backbone_autocast_rejects_other_dtypes():
    with pytest.raises(ValueError, match="torch.int64"), backbone_autocast(torch.int64):
        pass
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        FeatureBackbone(tiny_vit_config())(torch.randn(1, 3, 32, 32), autocast_dtype=torch.float64)


def test_predict_under_bfloat16_autocast_agrees_with_float32():
    model = _stego()
    pixels = torch.randn(4, 3, 32, 48)
    full = model.predict(pixels, output_size=(40, 60))
    half = model.predict(pixels, output_size=(40, 60), autocast_dtype="bfloat16")
    assert half.cluster_log_probs.dtype == torch.float32 and half.linear_log_probs.dtype == torch.float32
    torch.testing.assert_close(half.cluster_log_probs.logsumexp(1), torch.zeros(4, 40, 60), rtol=0, atol=1e-5)
    agreement = (half.cluster_log_probs.argmax(1) == full.cluster_log_probs.argmax(1)).float().mean()
    assert agreement > 0.95
    assert not torch.equal(half.cluster_log_probs, full.cluster_log_probs)
    # "auto" on the CPU is float32
    torch.testing.assert_close(model.predict(pixels, output_size=(40, 60), autocast_dtype="auto"), full)


def test_model_loaded_in_bfloat16_runs_under_autocast():
    model = _stego().to(torch.bfloat16)
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with backbone_autocast(torch.bfloat16):
        features = model.backbone(pixels).feature_map
        prediction = model.predict(pixels)
    assert features.dtype == torch.bfloat16  # the parameters' dtype, so the bfloat16 heads accept it
    assert prediction.cluster_log_probs.shape == (2, NUM_CLASSES, 32, 32)


# ----------------------------------------------------------------------------------------------------------------
# evaluate_segmenter


def _evaluate(model, scenes, **options):
    processor = protocol_image_processor(32)
    return evaluate_segmenter(model, scenes, processor, NUM_CLASSES, progress=False, **options)


def test_scores_do_not_depend_on_the_batch_size(scenes):
    model = _stego()
    one = _evaluate(model, scenes, batch_size=1, dtype="float32")
    four = _evaluate(model, scenes, batch_size=4, dtype="float32")  # batches of 4 and 2
    for probe in ("cluster", "linear"):
        a, b = (np.asarray(result[probe]["confusion_matrix"]) for result in (one, four))
        # every labelled pixel counted once in both
        np.testing.assert_array_equal(a.sum(0), b.sum(0))
        assert a.sum() == len(scenes) * 32 * 32
        # the same predictions up to float rounding of differently batched matmuls (in practice: identical)
        assert np.abs(a - b).sum() <= 2e-3 * a.sum()


def test_dataloader_workers_give_the_same_counts(scenes):
    model = _stego()
    inline = _evaluate(model, scenes, batch_size=4, num_workers=0)
    workers = _evaluate(model, scenes, batch_size=4, num_workers=2)
    for probe in ("cluster", "linear"):
        np.testing.assert_array_equal(inline[probe]["confusion_matrix"], workers[probe]["confusion_matrix"])


def test_evaluate_in_bfloat16_on_the_cpu(scenes):
    model = _stego()
    full = _evaluate(model, scenes, batch_size=3)  # "auto": float32 on the CPU
    half = _evaluate(model, scenes, batch_size=3, dtype=torch.bfloat16)
    a, b = (np.asarray(result["cluster"]["confusion_matrix"]) for result in (full, half))
    np.testing.assert_array_equal(a.sum(0), b.sum(0))
    assert np.abs(a - b).sum() <= 0.05 * a.sum()


def test_evaluate_refuses_bad_speed_options(scenes):
    model = _stego()
    with pytest.raises(ValueError, match="float16 autocast is for GPUs"):
        _evaluate(model, scenes, dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        _evaluate(model, scenes, dtype="half")
    with pytest.raises(ValueError, match="num_workers must be at least 0, got -1"):
        _evaluate(model, scenes, num_workers=-1)


def test_evaluate_kmeans_model_with_attention_switching_backbone(scenes):
    """A model whose backbone is used for attention maps elsewhere still evaluates under autocast."""
    torch.manual_seed(0)
    model = DinoForUnsupervisedSegmentation(
        DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=NUM_CLASSES)
    )
    model.fit([torch.randn(4, 3, 32, 32)], progress=False)
    result = _evaluate(model, scenes, batch_size=4, dtype="bfloat16")
    assert np.asarray(result["cluster"]["confusion_matrix"]).sum() == len(scenes) * 32 * 32
    assert model.backbone.model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluate_on_cuda_matches_the_cpu(scenes):
    cpu = _evaluate(_stego(), scenes, batch_size=4, dtype="float32", device="cpu")
    cuda = _evaluate(_stego(), scenes, batch_size=4, num_workers=2, device="cuda")  # bf16 autocast, pinned memory
    a, b = (np.asarray(result["cluster"]["confusion_matrix"]) for result in (cpu, cuda))
    np.testing.assert_array_equal(a.sum(0), b.sum(0))
    assert np.abs(a - b).sum() <= 0.05 * a.sum()


# ----------------------------------------------------------------------------------------------------------------
# hf-useg evaluate / compare


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    from hf_useg.data import save_synthetic_scenes

    root = tmp_path_factory.mktemp("scenes")
    return save_synthetic_scenes(root / "scenes", num_images=4, image_size=32, num_classes=3, seed=1, split="val")


def _cli(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_dtype_and_workers_are_used_and_recorded(model_dir, scenes_dir, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    code, out, err = _cli(
        capsys, "evaluate", str(model_dir), "--dataset", str(scenes_dir), "--quiet", "--device", "cpu",
        "--dtype", "bfloat16", "--num-workers", "1", "--batch-size", "3", "--output-dir", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((out_dir / "eval_results.json").read_text())
    assert record["evaluation"]["inference"] == {"device": "cpu", "dtype": "bfloat16"}
    # the same numbers as evaluate_segmenter with those options on the model folder's protocol processor
    from hf_useg.data import load_segmentation_dataset
    from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor, as_protocol_processor

    processor = as_protocol_processor(UnsupervisedSegmentationImageProcessor.from_pretrained(model_dir))
    direct = evaluate_segmenter(
        StegoForUnsupervisedSegmentation.from_pretrained(model_dir),
        load_segmentation_dataset(str(scenes_dir), "val"),
        processor,
        3,
        batch_size=3,
        dtype="bfloat16",
        progress=False,
    )
    for probe in ("cluster", "linear"):
        np.testing.assert_array_equal(record[probe]["confusion_matrix"], direct[probe]["confusion_matrix"])


def test_cli_crf_backend_torch_agrees_with_the_reference(model_dir, scenes_dir, tmp_path, capsys):
    """``--crf --crf-backend torch`` scores the torch CRF's marginals: (nearly) the same confusion counts as the
    pydensecrf reference, and the backend is recorded with the protocol."""
    pytest.importorskip("pydensecrf.densecrf")
    records = {}
    for backend in ("pydensecrf", "torch"):
        out_dir = tmp_path / backend
        code, out, err = _cli(
            capsys, "evaluate", str(model_dir), "--dataset", str(scenes_dir), "--quiet", "--device", "cpu",
            "--crf", "--crf-backend", backend, "--output-dir", str(out_dir),
        )  # fmt: skip
        assert code == 0, err
        records[backend] = json.loads((out_dir / "eval_results.json").read_text())
        assert records[backend]["evaluation"]["protocol"]["crf_backend"] == backend
    for probe in ("cluster_crf", "linear_crf"):
        reference = np.asarray(records["pydensecrf"][probe]["confusion_matrix"])
        torch_counts = np.asarray(records["torch"][probe]["confusion_matrix"])
        assert reference.sum() == torch_counts.sum() == 4 * 32 * 32
        # pixels that moved between cells, at most 2% of them (the torch CRF agrees on ~99.9% of real pixels)
        assert np.abs(reference - torch_counts).sum() / 2 <= 0.02 * reference.sum()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dtype", "float16", "--device", "cpu"], "--dtype float16 on cpu: float16 autocast is for GPUs"),
        (["--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
    ],
)
def test_cli_refuses_bad_speed_options(model_dir, scenes_dir, capsys, arguments, message):
    code, out, err = _cli(capsys, "evaluate", str(model_dir), "--dataset", str(scenes_dir), *arguments)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-useg: ") and message in lines[0]


def test_cli_refuses_an_unknown_dtype(model_dir, scenes_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(model_dir), "--dataset", str(scenes_dir), "--dtype", "fp8"])
    assert exit_info.value.code == 2
    assert "argument --dtype: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_names_a_missing_gpu(model_dir, scenes_dir, capsys):
    code, _, err = _cli(capsys, "evaluate", str(model_dir), "--dataset", str(scenes_dir), "--device", "cuda")
    assert code == 2 and "--device cuda: this PyTorch has no CUDA GPU to run on" in err


def test_compare_takes_the_speed_options(model_dir, scenes_dir, tmp_path, capsys):
    code, out, err = _cli(
        capsys, "compare", str(model_dir), "--dataset", str(scenes_dir), "--quiet", "--device", "cpu",
        "--dtype", "bfloat16", "--num-workers", "1", "--output-dir", str(tmp_path / "report"),
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "report" / "report.md").is_file()


# ----------------------------------------------------------------------------------------------------------------
# the image-segmentation pipeline


def _masks(results) -> list[list[np.ndarray]]:
    return [[np.asarray(segment["mask"]) for segment in segments] for segments in results]


def test_pipeline_batches_and_honours_the_dtype(model_dir):
    from transformers import pipeline

    import hf_useg  # noqa: F401  (registers the Auto classes)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    segmenter = pipeline("image-segmentation", model=str(model_dir))
    assert segmenter.model.backbone.model.config._attn_implementation == "sdpa"
    one_by_one = segmenter(images)
    batched = segmenter(images, batch_size=3)
    assert [[s["label"] for s in r] for r in batched] == [[s["label"] for s in r] for r in one_by_one]
    for a, b in zip(_masks(one_by_one), _masks(batched)):
        for mask_a, mask_b in zip(a, b):
            np.testing.assert_array_equal(mask_a, mask_b)
    half = pipeline("image-segmentation", model=str(model_dir), dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    for segments in half(images, batch_size=2):
        coverage = sum(np.asarray(segment["mask"], dtype=np.int64) for segment in segments)
        assert (coverage == 255).all()  # the masks tile each image
