"""The Space's Detection tab (`spaces/app.py`): detections of a tiny Deformable DETR folder drawn on the image
(checked against `pipeline("object-detection")` on the same folder), CutMix composites with the random-box control
and Selective Search (checked against `CutMixComposer` / `random_boxes` / `selective_search_boxes` called here), the
messages for bad input, and both endpoints through `gradio_client` on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from space_app import load_space_app
from tiny_configs import TINY_DETREG_DETECTOR_KWARGS, tiny_resnet_config, tiny_vit_config

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason="the Space tests need gradio (pip install hf-useg[gradio])")
pytest.importorskip("gradio_client", reason="the Space tests need gradio (pip install hf-useg[gradio])")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from hf_useg import DinoForUnsupervisedSegmentation, DinoSegmentationConfig  # noqa: E402
from hf_useg.detection_inference import detection_image_processor  # noqa: E402
from hf_useg.image_processing import whole_image_processor  # noqa: E402
from hf_useg.models.detreg import box_sources  # noqa: E402

CLASSES = {0: "raccoon", 1: "lamp"}


@pytest.fixture(scope="module")
def app():
    return load_space_app("hf_useg_space_app_detection")


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    """A tiny random Deformable DETR (HF ResNet backbone, two classes) saved as a fine-tuned detector is."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    folder = tmp_path_factory.mktemp("detector") / "raccoon-detector"
    config = DeformableDetrConfig(
        backbone_config=tiny_resnet_config(out_features=["stage2", "stage3", "stage4"]),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        id2label=CLASSES,
        label2id={name: index for index, name in CLASSES.items()},
        **TINY_DETREG_DETECTOR_KWARGS,
    )
    torch.manual_seed(0)
    DeformableDetrForObjectDetection(config).save_pretrained(folder)
    detection_image_processor(64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dino") / "dino-kmeans"
    torch.manual_seed(0)
    model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=3))
    model.fit([torch.randn(4, 3, 32, 32)], progress=False)
    model.save_pretrained(folder)
    whole_image_processor(32, 8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 144, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def donors() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), np.full((40, 40, 3), (20, 200, 90), np.uint8)]


def _outline_share(drawn: Image.Image, box, colour) -> float:
    """Share of the pixels on the bottom edge of ``box`` (as `draw_labelled_boxes` clips it) that have ``colour``."""
    pixels = np.asarray(drawn)
    height, width = pixels.shape[:2]
    left = int(np.clip(round(box[0]), 0, width - 1))
    right = int(np.clip(round(box[2]) - 1, left, width - 1))
    bottom = int(np.clip(round(box[3]) - 1, 0, height - 1))
    return float((pixels[bottom, left : right + 1] == colour).all(-1).mean())


def test_models_go_to_the_tab_of_their_kind(app, detector_dir, segmenter_dir, monkeypatch, tmp_path):
    import huggingface_hub

    hub_config = tmp_path / "config.json"
    hub_config.write_text('{"model_type": "detr", "architectures": ["DetrForObjectDetection"]}')
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if repo_id == "tester/detr":
            return str(hub_config)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    names = [str(segmenter_dir), str(detector_dir), "tester/detr", "tester/unreachable"]
    segmenters, detectors = app.split_models(names)
    assert segmenters == [str(segmenter_dir), "tester/unreachable"]  # unreadable: offered in both tabs
    assert detectors == [str(detector_dir), "tester/detr", "tester/unreachable"]
    assert asked == [("tester/detr", "config.json"), ("tester/unreachable", "config.json")]  # folders read locally
    assert app.method_display_name("deformable_detr") == "Deformable DETR fine-tuning"


def test_detections_match_the_object_detection_pipeline_and_are_drawn(app, detector_dir, scene):
    from transformers import pipeline

    result = app.detect(scene, str(detector_dir), threshold=0.5)
    expected = pipeline("object-detection", model=str(detector_dir))(scene, threshold=0.5)
    assert 1 <= len(expected) < 20  # 10 queries x 2 classes: the threshold keeps some (query, class) pairs
    expected = sorted(expected, key=lambda item: -item["score"])
    assert result.labels == [item["label"] for item in expected]
    np.testing.assert_allclose(result.scores, [item["score"] for item in expected], rtol=1e-5)
    # the pipeline truncates its boxes to integers
    truncated = [[item["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")] for item in expected]
    # (two forward passes: a box within float rounding of an integer may truncate either way)
    boxes, truncated = np.asarray(result.boxes), np.asarray(truncated)
    assert ((boxes - truncated > -1e-3) & (boxes - truncated < 1 + 1e-3)).all()
    assert [row[0] for row in result.rows()] == result.labels and len(result.rows()[0]) == 6
    assert "**Deformable DETR fine-tuning**" in result.info and "144×96 px (detector input 96×64)" in result.info

    # drawn on the image itself, the best box on top in its class colour
    assert result.drawn.size == scene.size and result.image is not scene
    colour = app.color_palette_rgb(len(CLASSES))[list(CLASSES.values()).index(result.labels[0])]
    assert _outline_share(result.drawn, result.boxes[0], colour) > 0.9
    changed = (np.asarray(result.drawn) != np.asarray(scene)).any(-1)
    assert 0 < changed.mean() < 0.5

    nothing = app.detect(scene, str(detector_dir), threshold=0.99)
    assert nothing.rows() == [] and "lower the threshold" in nothing.info
    np.testing.assert_array_equal(np.asarray(nothing.drawn), np.asarray(scene))


def test_detector_input_is_bounded(app, detector_dir, monkeypatch):
    rng = np.random.default_rng(2)
    # a sliver: the processor's own rule (longer side 107) would make it 0 pixels high
    sliver = Image.fromarray(rng.integers(0, 256, (2, 640, 3), dtype=np.uint8))
    result = app.detect(sliver, str(detector_dir), threshold=0.0)
    assert "detector input 107×1" in result.info and "too thin for the processor's size rule" in result.info
    # a square image at 64 px would leave the stride-64 level a single cell (Deformable DETR's GroupNorm refuses it)
    square = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    assert "padded" in app.detect(square, str(detector_dir), threshold=0.0).info
    loaded = app.load_detector(str(detector_dir))
    assert app.detector_input_size(loaded.processor, 96, 144) == ((64, 96), None)  # the processor's own size
    monkeypatch.setattr(app, "MAX_DETECTION_SIDE", 60)
    (size, note) = app.detector_input_size(loaded.processor, 96, 144)
    assert size == (40, 60) and "scaled to at most 60 px on its longer side" in note
    assert app.detector_input_size(loaded.processor, 40, 50)[0] == (48, 60)


def test_detection_errors_are_messages(app, detector_dir, segmenter_dir, scene, tmp_path):
    with pytest.raises(ValueError, match="upload an image or pick an example first"):
        app.detect(None, str(detector_dir))
    with pytest.raises(ValueError, match="the score threshold must be between 0 and 1, got 1.5"):
        app.detect(scene, str(detector_dir), threshold=1.5)
    with pytest.raises(ValueError, match="is a DINO-feature k-means model, not an object detector"):
        app.detect(scene, str(segmenter_dir))
    with pytest.raises(ValueError, match="cannot load the detector"):
        app.detect(scene, str(tmp_path / "missing"))
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(ValueError, match="'notes.txt' is not an image this app can read"):
        app.detect(str(text), str(detector_dir))


def test_cutmix_views_draw_each_box_source_deterministically(app, scene, donors):
    from hf_useg.models.detreg.box_sources import CutMixComposer, random_boxes, selective_search_boxes

    views = app.cutmix_views(scene, donors, seed=3, max_pastes=6)
    reference = CutMixComposer(max_pastes=6)(np.asarray(scene), donors, np.random.default_rng(3))
    np.testing.assert_array_equal(views.composite.image, reference.image)
    np.testing.assert_array_equal(views.composite.boxes, reference.boxes)
    assert len(reference.boxes) >= 1
    # the control: the same boxes on the unmodified image
    np.testing.assert_array_equal(views.random_boxes, random_boxes(96, 144, np.random.default_rng(3), max_boxes=6))
    np.testing.assert_array_equal(views.random_boxes, reference.boxes)

    (composite, composite_caption), (control, _), *rest = views.panels
    colours = app.color_palette_rgb(30)
    last = len(reference.boxes) - 1  # drawn last: its outline is whole
    assert _outline_share(composite, reference.boxes[last], colours[last]) == 1.0
    assert _outline_share(control, reference.boxes[last], colours[last]) == 1.0
    assert f"{len(reference.boxes)} pseudo-boxes" in composite_caption
    assert f"{reference.num_pasted} paste" in views.info and "Seed 3" in views.info
    try:
        box_sources._import_cv2()
    except ImportError:  # no OpenCV contrib modules: the third view is a note (next test)
        assert rest == []
    else:
        expected = selective_search_boxes(scene, top_k=30, seed=3)
        assert len(expected) == 30
        np.testing.assert_array_equal(views.selective_search_boxes, expected)
        assert len(rest) == 1 and "Selective Search" in rest[0][1]

    again = app.cutmix_views(scene, donors, seed=3, max_pastes=6)
    for (first, _), (second, _) in zip(views.panels, again.panels):
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    other = app.cutmix_views(scene, donors, seed=4, max_pastes=6)
    assert not np.array_equal(np.asarray(other.panels[0][0]), np.asarray(composite))


def test_cutmix_views_without_opencv_name_the_extra(app, scene, donors, monkeypatch):
    def missing():
        raise ImportError("No module named 'cv2'")

    monkeypatch.setattr(box_sources, "_import_cv2", missing)
    views = app.cutmix_views(scene, donors, seed=0)
    assert len(views.panels) == 2 and views.selective_search_boxes is None
    assert "pip install 'hf-useg[selective-search]'" in views.info


def test_cutmix_views_bad_input(app, scene, donors):
    with pytest.raises(ValueError, match="upload an image or pick an example first"):
        app.cutmix_views(None, donors)
    with pytest.raises(ValueError, match="at least one donor image"):
        app.cutmix_views(scene, [None])
    with pytest.raises(ValueError, match="the seed must be a whole number"):
        app.cutmix_views(scene, donors, seed=-1)
    with pytest.raises(ValueError, match="the number of pastes must be a whole number from 1 to 16"):
        app.cutmix_views(scene, donors, max_pastes=0)


def test_detection_tab_through_gradio_client(app, detector_dir, segmenter_dir, tmp_path_factory):
    examples_dir = tmp_path_factory.mktemp("examples")
    demo = app.build_demo([str(segmenter_dir), str(detector_dir)], examples_dir=examples_dir)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        examples = sorted(examples_dir.glob("*.png"))
        upload = handle_file(str(examples[0]))
        drawn, table, info = client.predict(upload, str(detector_dir), 0.3, api_name="/detect")
        direct = app.detect(str(examples[0]), str(detector_dir), 0.3)
        np.testing.assert_array_equal(np.asarray(Image.open(drawn).convert("RGB")), np.asarray(direct.drawn))
        assert table["headers"] == list(app.DETECTION_COLUMNS)
        assert [row[0] for row in table["data"]] == direct.labels
        np.testing.assert_allclose([row[1] for row in table["data"]], direct.scores, atol=1e-4)
        assert "144×96 px" in info

        gallery, composite_info = client.predict(upload, None, 5, 4, api_name="/composite")
        views = app.cutmix_views(str(examples[0]), [str(path) for path in examples], seed=5, max_pastes=4)
        assert [item["caption"] for item in gallery] == [caption for _, caption in views.panels]
        for item, (panel, _) in zip(gallery, views.panels):
            np.testing.assert_array_equal(np.asarray(Image.open(item["image"]).convert("RGB")), np.asarray(panel))
        assert composite_info == views.info and "3 donor images" in composite_info

        # each tab serves only its own offered models; bad input comes back as a message
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(upload, str(segmenter_dir), 0.5, api_name="/detect")
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(upload, str(detector_dir), "cluster", False, False, api_name="/segment")
        with pytest.raises(AppError, match="upload an image or pick an example first"):
            client.predict(None, str(detector_dir), 0.5, api_name="/detect")
        with pytest.raises(AppError, match="upload an image or pick an example first"):
            client.predict(None, None, 0, 8, api_name="/composite")
    finally:
        demo.close()
