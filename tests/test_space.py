"""The Gradio Space (`spaces/app.py`): launched at 127.0.0.1 with tiny local models and called through
`gradio_client`, the way the Space's API is used. The references are computed here, independently of the app,
with the model's own `predict` on the saved image processor's output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from space_app import load_space_app
from tiny_configs import tiny_vit_config

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gradio_client = pytest.importorskip(
    "gradio_client", reason="the Space tests need gradio (pip install hf-useg[gradio])"
)
pytest.importorskip("gradio", reason="the Space tests need gradio (pip install hf-useg[gradio])")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from hf_useg import DinoForUnsupervisedSegmentation, DinoSegmentationConfig  # noqa: E402
from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor, whole_image_processor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "training" / "configs" / "stego_tiny.yaml"


def load_app():
    return load_space_app("hf_useg_space_app")


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def stego_dir(tmp_path_factory) -> Path:
    from hf_useg.training import load_training_arguments, train

    output_dir = tmp_path_factory.mktemp("stego-tiny")
    args = load_training_arguments(
        TINY_CONFIG, output_dir=str(output_dir), max_steps=2, val_every=100, save_every=100, synthetic_num_images=8
    )
    return Path(train(args)["model_dir"])


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dino") / "dino-kmeans"
    backbone = tiny_vit_config(layer_norm_eps=1e-12)
    torch.manual_seed(0)
    model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=backbone, num_clusters=3))
    model.fit([torch.randn(4, 3, 32, 32)], progress=False)
    model.save_pretrained(folder)
    whole_image_processor(32, 8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(app, stego_dir, dino_dir, tmp_path_factory):
    """(client, example image paths) of the app launched on a free local port."""
    examples_dir = tmp_path_factory.mktemp("examples")
    demo = app.build_demo([str(stego_dir), str(dino_dir)], examples_dir=examples_dir)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield Client(demo.local_url, verbose=False), sorted(examples_dir.glob("*.png"))
    finally:
        demo.close()


def _reference(model_dir: Path, image: Image.Image, probe: str, crf: bool, flip_tta: bool) -> tuple[np.ndarray, list]:
    """Segment ids and names from the model's own evaluation pipeline at the image's size."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = UnsupervisedSegmentationImageProcessor.from_pretrained(model_dir)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    prediction = model.predict(
        pixel_values,
        output_size=(image.height, image.width),
        flip_tta=flip_tta,
        crf=crf,
        images=np.asarray(image)[None],
    )
    scores = {
        ("cluster", False): prediction.cluster_log_probs,
        ("cluster", True): prediction.cluster_crf_probs,
        ("linear", False): prediction.linear_log_probs,
        ("linear", True): prediction.linear_crf_probs,
    }[(probe, crf)]
    return scores.argmax(1)[0].numpy(), model


def _decode(output) -> tuple[Image.Image, dict[str, np.ndarray], dict[str, str]]:
    """The AnnotatedImage output: base image, label -> RGBA mask pixels, label -> colour."""
    assert output["__type__"] == "update"
    value = output["value"]
    masks = {a["label"]: np.asarray(Image.open(a["image"]).convert("RGBA")) for a in value["annotations"]}
    assert len(masks) == len(value["annotations"]), "one legend entry per label"
    return Image.open(value["image"]).convert("RGB"), masks, output["color_map"]


def _check_annotations(output, image: Image.Image, reference: np.ndarray, names: list[str], opacity: float) -> list:
    base, masks, color_map = _decode(output)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(image))  # the input, untouched (PNG)
    assert set(masks) == {names[i] for i in np.unique(reference)}
    union = np.full(reference.shape, -1)
    for label, rgba in masks.items():
        inside = rgba[..., 3] > 0
        assert (union[inside] == -1).all(), "masks overlap"
        union[inside] = names.index(label)
        color = tuple(int(color_map[label][i : i + 2], 16) for i in (1, 3, 5))
        assert (rgba[inside][:, :3] == color).all()
        assert (rgba[inside][:, 3] == round(255 * opacity)).all()
    np.testing.assert_array_equal(union, reference)
    # legend order: largest segment first
    areas = [int((rgba[..., 3] > 0).sum()) for rgba in masks.values()]
    assert areas == sorted(areas, reverse=True)
    return list(masks)


def test_segment_endpoint_cluster_probe_with_flip_tta(app, served, stego_dir):
    client, examples = served
    assert len(examples) == 3
    image = Image.open(examples[0]).convert("RGB")
    assert image.size == (144, 96)  # the generated example scenes are not square
    annotated, gallery, info = client.predict(
        handle_file(examples[0]), str(stego_dir), "cluster", False, True, api_name="/segment"
    )
    reference, model = _reference(stego_dir, image, "cluster", crf=False, flip_tta=True)
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    labels = _check_annotations(annotated, image, reference, names, app.MASK_OPACITY)
    assert all(label.startswith("synthetic-class-") for label in labels)
    assert "**STEGO**" in info and "cluster probe" in info and "flip TTA on" in info and "CRF off" in info
    assert "144×96 px" in info

    # one attention map per head of the last layer, at the image's size; the brightest block is the most
    # attended patch of that head
    assert [item["caption"] for item in gallery] == ["head 0", "head 1"]
    processor = UnsupervisedSegmentationImageProcessor.from_pretrained(stego_dir)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        attention = model.backbone(pixel_values, output_cls_attention=True).cls_attention[0].numpy()
    for head, item in enumerate(gallery):
        heat = np.asarray(Image.open(item["image"]).convert("RGB")).astype(np.int64)
        assert heat.shape == (96, 144, 3)
        rows, cols = attention[head].shape
        # block centres of the nearest-upsampled grid
        centres = heat[(np.arange(rows) * 96 + 48) // rows][:, (np.arange(cols) * 144 + 72) // cols].sum(-1)
        assert np.unravel_index(centres.argmax(), centres.shape) == np.unravel_index(
            attention[head].argmax(), attention[head].shape
        )


def test_segment_endpoint_linear_probe_with_crf(app, served, stego_dir):
    pytest.importorskip("pydensecrf", reason="the CRF toggle needs pydensecrf (pip install hf-useg[crf])")
    client, examples = served
    image = Image.open(examples[1]).convert("RGB")
    annotated, gallery, info = client.predict(
        handle_file(examples[1]), str(stego_dir), "linear", True, False, api_name="/segment"
    )
    reference, model = _reference(stego_dir, image, "linear", crf=True, flip_tta=False)
    # linear-probe outputs are class ids; the app names them through the cluster matching
    class_names = [f"synthetic-class-{i}" for i in range(model.config.num_classes)]
    _check_annotations(annotated, image, reference, class_names, app.MASK_OPACITY)
    assert "linear probe" in info and "CRF on" in info and "flip TTA off" in info


def test_segment_endpoint_other_method_and_errors(app, served, dino_dir, stego_dir):
    client, examples = served
    image = Image.open(examples[2]).convert("RGB")
    annotated, _, info = client.predict(
        handle_file(examples[2]), str(dino_dir), "cluster", False, False, api_name="/segment"
    )
    reference, model = _reference(dino_dir, image, "cluster", crf=False, flip_tta=False)
    _check_annotations(annotated, image, reference, [f"cluster_{i}" for i in range(3)], app.MASK_OPACITY)
    assert "**DINO-feature k-means**" in info
    with pytest.raises(AppError, match="DINO-feature k-means models have no linear probe"):
        client.predict(handle_file(examples[2]), str(dino_dir), "linear", False, True, api_name="/segment")
    # only the offered models are served (custom names: tests/test_space_limits.py)
    with pytest.raises(AppError, match="tester/not-downloadable is not in the list of choices"):
        client.predict(
            handle_file(examples[2]), "tester/not-downloadable", "cluster", False, True, api_name="/segment"
        )
    with pytest.raises(AppError, match="upload an image or pick an example first"):
        client.predict(None, str(stego_dir), "cluster", False, True, api_name="/segment")


def test_discover_models_and_methods(app, stego_dir, dino_dir, monkeypatch):
    monkeypatch.setenv(app.MODELS_ENV, f" tester/stego-hub , {dino_dir},")
    assert app.discover_models([str(stego_dir)])[:3] == [str(stego_dir), "tester/stego-hub", str(dino_dir)]
    assert app.method_of(str(stego_dir)) == "STEGO"
    assert app.method_of(str(dino_dir)) == "DINO-feature k-means"
    assert app.method_of("tester/stego-hub") == "Hub model"


def test_large_uploads_are_downscaled(app, stego_dir):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 1400, 3), dtype=np.uint8))
    result = app.segment(image, str(stego_dir), "cluster", crf=False, flip_tta=False)
    assert result.image.size == (app.MAX_IMAGE_SIDE, app.MAX_IMAGE_SIDE // 2)
    assert result.label_map.shape == (app.MAX_IMAGE_SIDE // 2, app.MAX_IMAGE_SIDE)
    with pytest.raises(ValueError, match="probe must be one of"):
        app.segment(image, str(stego_dir), "kmeans")


def test_command_line_launches_build_demo(app, monkeypatch):
    launched = {}

    class FakeDemo:
        def launch(self, **kwargs):
            launched.update(kwargs)

    def fake_build_demo(models, allow_custom_models=False):
        launched.update(models=models, allow_custom_models=allow_custom_models)
        return FakeDemo()

    monkeypatch.setattr(app, "build_demo", fake_build_demo)
    monkeypatch.delenv("SPACE_ID", raising=False)
    app.main(["--model", "a/folder", "--model", "tester/hub-model", "--port", "7999"])
    assert launched == {
        "models": ["a/folder", "tester/hub-model"],
        "allow_custom_models": False,
        "server_name": "127.0.0.1",
        "server_port": 7999,
        "share": False,
        "max_file_size": app.MAX_FILE_SIZE,
    }
    monkeypatch.setenv("SPACE_ID", "tester/space")
    launched.clear()
    app.main([])  # what a Space runs: custom models stay off
    assert launched["server_name"] == "0.0.0.0" and launched["models"] == []
    assert launched["allow_custom_models"] is False
    launched.clear()
    app.main(["--allow-custom-models"])
    assert launched["allow_custom_models"] is True


def test_space_settings_and_requirements():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(REPO_ROOT / "spaces" / "README.md")
    settings = card.data
    assert settings.sdk == "gradio"
    assert (REPO_ROOT / "spaces" / settings.app_file).is_file()
    assert len(settings.short_description) <= 60  # the Hub's limit
    requirements = (REPO_ROOT / "spaces" / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in requirements if "==" in line and not line.startswith("#"))
    assert pins["gradio"] == settings.sdk_version  # the SDK the Space runs is the one the app is written for
    names = {re.split(r"[<>=\[ ]", line)[0] for line in requirements if line and not line.startswith("#")}
    assert {"torch", "transformers", "huggingface_hub", "datasets", "pydensecrf2"} <= names


@pytest.mark.slow  # a fresh interpreter importing transformers
def test_package_does_not_import_gradio():
    code = "import sys, hf_useg, hf_useg.hub, hf_useg.cli; print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
