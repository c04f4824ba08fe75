"""The Space (`spaces/app.py`) under hostile or heavy use: very wide, very tall and huge images (the work per
request is bounded: the patch tokens the backbone sees are capped, uploads over the pixel limit are refused before
decoding), files that are not images, model names the app does not offer, and 50 identical concurrent requests
through `gradio_client` on 127.0.0.1 (every answer complete)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from space_app import load_space_app
from tiny_configs import tiny_vit_config

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason="the Space tests need gradio (pip install hf-useg[gradio])")
pytest.importorskip("gradio_client", reason="the Space tests need gradio (pip install hf-useg[gradio])")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from hf_useg import DinoForUnsupervisedSegmentation, DinoSegmentationConfig  # noqa: E402
from hf_useg.image_processing import whole_image_processor  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return load_space_app("hf_useg_space_app_limits")


def _tiny_dino(folder: Path, resolution: int) -> Path:
    torch.manual_seed(0)
    model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=3))
    model.fit([torch.randn(4, 3, 32, 32)], progress=False)
    model.save_pretrained(folder)
    whole_image_processor(resolution, 8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_320(tmp_path_factory) -> Path:
    """Patch 8 at resolution 320, the converted STEGO/DINO ViT-S/8 setting: a 640x80 image would be 12,800 tokens."""
    return _tiny_dino(tmp_path_factory.mktemp("dino320") / "model", 320)


@pytest.fixture(scope="module")
def model_32(tmp_path_factory) -> Path:
    return _tiny_dino(tmp_path_factory.mktemp("dino32") / "model", 32)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A real model folder on the server that the app does not offer."""
    return _tiny_dino(tmp_path_factory.mktemp("other") / "not-offered", 32)


def _served(app, models, tmp_path_factory, **kwargs):
    demo = app.build_demo([str(m) for m in models], examples_dir=tmp_path_factory.mktemp("examples"), **kwargs)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    return demo


@pytest.fixture(scope="module")
def served(app, model_32, tmp_path_factory):
    demo = _served(app, [model_32], tmp_path_factory)
    try:
        yield demo, Client(demo.local_url, verbose=False, max_workers=50)
    finally:
        demo.close()


def _record_backbone_inputs(model) -> tuple[list[tuple[int, int]], object]:
    shapes = []
    handle = model.backbone.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    return shapes, handle


@pytest.mark.parametrize("size", [(640, 80), (80, 640), (640, 3)], ids=["wide", "tall", "sliver"])
def test_wide_and_tall_images_see_a_capped_number_of_tokens(app, model_320, size):
    width, height = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    loaded = app.load_model(str(model_320))
    uncapped = loaded.processor(image, return_tensors="pt")["pixel_values"].shape[-2:]
    assert (uncapped[0] // 8) * (uncapped[1] // 8) > app.MAX_TOKENS  # what the model would see without the cap

    shapes, handle = _record_backbone_inputs(loaded.model)
    try:
        result = app.segment(image, str(model_320), "cluster", crf=False, flip_tta=True)
    finally:
        handle.remove()
    assert len(shapes) == 3  # flip TTA (two passes) and the attention view
    for input_height, input_width in shapes:
        assert input_height % 8 == 0 and input_width % 8 == 0
        assert (input_height // 8) * (input_width // 8) <= app.MAX_TOKENS
        # the aspect ratio is kept, up to whole patches (rounded down)
        assert input_width / input_height == pytest.approx(width / height, rel=0.1) or input_height == 8
    assert result.input_size == shapes[0]
    assert result.label_map.shape == (height, width) and result.image.size == (width, height)
    assert f"within {app.MAX_TOKENS} patch tokens" in result.info
    assert [caption for _, caption in result.attention] == ["head 0", "head 1"]
    assert all(heat.size == (width, height) for heat, _ in result.attention)


def test_ordinary_images_keep_the_processor_size(app, model_320):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 144, 3), dtype=np.uint8))
    result = app.segment(image, str(model_320), "cluster", crf=False, flip_tta=False)
    expected = app.load_model(str(model_320)).processor(image, return_tensors="pt")["pixel_values"].shape[-2:]
    assert result.input_size == tuple(expected) == (320, 480)
    assert "patch tokens" not in result.info


def test_attention_maps_are_computed_at_reduced_size_over_the_budget(app, model_320, monkeypatch):
    monkeypatch.setattr(app, "MAX_ATTENTION_ENTRIES", 2 * 300**2)  # 2 heads: at most 300 tokens
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (96, 144, 3), dtype=np.uint8))
    loaded = app.load_model(str(model_320))
    shapes, handle = _record_backbone_inputs(loaded.model)
    try:
        result = app.segment(image, str(model_320), "cluster", crf=False, flip_tta=False)
    finally:
        handle.remove()
    (segment_h, segment_w), (attention_h, attention_w) = shapes
    assert (segment_h // 8) * (segment_w // 8) == 2400  # the segmentation keeps the full input
    assert (attention_h // 8) * (attention_w // 8) <= 300
    assert attention_w / attention_h == pytest.approx(1.5, rel=0.1)
    assert f"Attention maps from a {attention_w}×{attention_h} input" in result.info
    assert len(result.attention) == 2 and all(heat.size == (144, 96) for heat, _ in result.attention)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb's header) and one row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
        + chunk(b"IEND", b"")
    )
    return path


def test_huge_and_broken_uploads_are_refused_with_a_message(app, served, model_32, tmp_path):
    _, client = served
    bomb = _png_header_only(tmp_path / "bomb.png", 10_000, 7_000)  # 70 megapixels, never decoded
    with pytest.raises(ValueError, match=r"10000×7000 \(70 megapixels\); this app accepts at most 50 megapixels"):
        app.open_image(bomb)
    with pytest.raises(AppError, match="accepts at most 50 megapixels"):
        client.predict(handle_file(str(bomb)), str(model_32), "cluster", False, False, api_name="/segment")
    # over twice PIL's own limit: refused by PIL when Gradio first opens the upload
    bigger = _png_header_only(tmp_path / "bigger.png", 20_000, 10_000)
    with pytest.raises(AppError, match="the image is too large: Image size \\(200000000 pixels\\) exceeds limit"):
        client.predict(handle_file(str(bigger)), str(model_32), "cluster", False, False, api_name="/segment")

    text = tmp_path / "notes.txt"
    text.write_text("not an image\n" * 20)
    with pytest.raises(AppError, match=r"'notes.txt' is not an image this app can read") as raised:
        client.predict(handle_file(str(text)), str(model_32), "cluster", False, False, api_name="/segment")
    assert "Traceback" not in str(raised.value)

    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:400])
    with pytest.raises(AppError, match=r"cannot decode the image 'truncated.png' \(damaged or unsupported\)"):
        client.predict(handle_file(str(truncated)), str(model_32), "cluster", False, False, api_name="/segment")


def test_large_jpeg_is_decoded_small_and_segmented(app, served, model_32, tmp_path):
    _, client = served
    path = tmp_path / "large.jpg"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (2000, 3000, 3), dtype=np.uint8)).save(path, quality=70)
    image = app.open_image(path)
    assert image.size == (app.MAX_IMAGE_SIDE, round(app.MAX_IMAGE_SIDE * 2 / 3)) and image.mode == "RGB"
    annotated, gallery, info = client.predict(
        handle_file(str(path)), str(model_32), "cluster", False, False, api_name="/segment"
    )
    assert Image.open(annotated["value"]["image"]).size == image.size
    assert f"{image.width}×{image.height} px" in info and len(gallery) == 2


def test_models_the_app_does_not_offer_are_refused_unless_allowed(
    app, served, model_32, other_model, monkeypatch, tmp_path_factory
):
    _, client = served
    image = tmp_path_factory.mktemp("upload") / "scene.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    loaded_names = []
    real_load = app._load_model
    monkeypatch.setattr(app, "_load_model", lambda name: loaded_names.append(name) or real_load(name))
    for name in (str(other_model), "tester/any-hub-repo", "/etc"):
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(handle_file(str(image)), name, "cluster", False, False, api_name="/segment")
    assert loaded_names == []  # nothing was loaded, nothing about the server's paths was revealed

    demo = _served(app, [model_32], tmp_path_factory, allow_custom_models=True)
    try:
        custom = Client(demo.local_url, verbose=False)
        _, _, info = custom.predict(
            handle_file(str(image)), str(other_model), "cluster", False, False, api_name="/segment"
        )
        assert f"`{other_model}`" in info and loaded_names == [str(other_model)]
        with pytest.raises(AppError, match="cannot load the model 'tester/not-downloadable'"):
            custom.predict(
                handle_file(str(image)), "tester/not-downloadable", "cluster", False, False, api_name="/segment"
            )
    finally:
        demo.close()


def test_run_refuses_unoffered_models_itself(app, model_32, tmp_path):
    demo = app.build_demo([str(model_32)], examples_dir=tmp_path)
    run = next(fn.fn for fn in demo.fns.values() if fn.api_name == "segment")
    import gradio as gr

    with pytest.raises(gr.Error, match="is not one of the models this app offers"):
        run(None, "tester/any-hub-repo", "cluster", False, False)


def test_queue_is_bounded(app, served):
    demo, _ = served
    assert demo._queue.max_size == app.QUEUE_SIZE == 64
    assert demo._queue.default_concurrency_limit == app.CONCURRENCY == 2


def _answer_arrays(answer) -> list[np.ndarray]:
    annotated, gallery, _ = answer
    files = [annotated["value"]["image"]] + [a["image"] for a in annotated["value"]["annotations"]]
    files += [item["image"] for item in gallery]
    arrays = []
    for path in files:
        with Image.open(path) as image:
            image.load()  # a truncated file raises here
            arrays.append(np.asarray(image))
    return arrays


def test_fifty_identical_concurrent_requests_are_all_answered_completely(served, model_32, tmp_path):
    _, client = served
    image = tmp_path / "same.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (96, 144, 3), dtype=np.uint8)).save(image)
    jobs = [
        client.submit(handle_file(str(image)), str(model_32), "cluster", False, True, api_name="/segment")
        for _ in range(50)
    ]
    answers, failures = [], []
    for job in jobs:
        try:
            answers.append(_answer_arrays(job.result(timeout=300)))
        except Exception as error:  # noqa: BLE001 (count every kind of failure)
            failures.append(f"{type(error).__name__}: {error}")
    assert failures == [], f"{len(failures)} of 50 failed: {failures[:3]}"
    first = answers[0]
    assert len(first) == 1 + 3 + 2 or len(first) >= 4  # base image, masks, two attention heads
    for arrays in answers[1:]:
        assert len(arrays) == len(first)
        for got, expected in zip(arrays, first):
            np.testing.assert_array_equal(got, expected)
