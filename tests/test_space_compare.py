"""The Space's side-by-side comparison of two segmentation models (`compare_segmentations`, the ``/compare``
endpoint): both panels are the models' own single segmentations of the same image, labelled with the method and
model, and a class name has one colour in both panels while unnamed clusters never share a colour."""

from __future__ import annotations

import os
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
    return load_space_app("hf_useg_space_app_compare")


def _tiny_kmeans(folder: Path, seed: int, names: list[str] | None) -> Path:
    """A DINO k-means model with 3 clusters; ``names``: the class names evaluation matched them to (``None``: the
    unevaluated ``cluster_<i>``)."""
    torch.manual_seed(seed)
    labels = {"id2label": dict(enumerate(names))} if names else {}
    config = DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=3, **labels)
    model = DinoForUnsupervisedSegmentation(config)
    model.fit([torch.randn(4, 3, 32, 32)], progress=False)
    model.save_pretrained(folder)
    whole_image_processor(32, 8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    return {
        "a": _tiny_kmeans(root / "kmeans-a", 0, ["sky", "road", "car"]),
        "b": _tiny_kmeans(root / "kmeans-b", 1, ["road", "tree", "sky"]),
        "unnamed": _tiny_kmeans(root / "kmeans-unnamed", 2, None),
    }


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = np.zeros((48, 80, 3), dtype=np.uint8)
    pixels[:16] = (90, 150, 230)
    pixels[16:32, :40] = (40, 160, 60)
    pixels[32:] = (120, 120, 120)
    return Image.fromarray(np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8))


def _colors(color_map: dict[str, str]) -> dict[str, str]:
    return {name: color.lower() for name, color in color_map.items()}


def test_compare_panels_are_the_single_segmentations_in_shared_colours(app, models, image):
    comparison = app.compare_segmentations(image, str(models["a"]), str(models["b"]), "cluster", False, True)
    for result, name in zip(comparison.results, ("a", "b")):
        alone = app.segment(image, str(models[name]), "cluster", crf=False, flip_tta=True)
        np.testing.assert_array_equal(result.label_map, alone.label_map)  # same preprocessing, same caps
        assert result.labels == alone.labels and result.attention == []
        assert result.image.size == image.size
    assert comparison.panel_labels == (
        "A · DINO-feature k-means · compare0/kmeans-a",
        "B · DINO-feature k-means · compare0/kmeans-b",
    )
    assert comparison.shared_classes == ["road", "sky"]
    (_, pairs_a, colors_a), (_, pairs_b, colors_b) = comparison.panel(0), comparison.panel(1)
    # each legend is the names present in its panel, and a class name has one colour in both palettes
    for pairs, result in zip((pairs_a, pairs_b), comparison.results):
        assert {label for _, label in pairs} == {result.labels[i] for i in np.unique(result.label_map)}
    palette_a, palette_b = comparison.palettes
    assert palette_a["sky"] == palette_b["sky"] and palette_a["road"] == palette_b["road"]
    assert len({palette_a["sky"], palette_a["road"], palette_a["car"], palette_b["tree"]}) == 4
    for name in set(colors_a) & set(colors_b):
        assert colors_a[name] == colors_b[name]
    assert "Same colour, same class name in both panels: road, sky" in comparison.info
    assert "**A:**" in comparison.info and "**B:**" in comparison.info


def test_unnamed_clusters_never_share_a_colour(app, models, image):
    comparison = app.compare_segmentations(image, str(models["unnamed"]), str(models["a"]), "cluster", False, False)
    palette_unnamed, palette_named = comparison.palettes
    assert comparison.shared_classes == []
    own = [palette_unnamed[f"cluster_{i}"] for i in range(3)]
    assert len(set(own) | {palette_named[name] for name in ("sky", "road", "car")}) == 6
    assert "share no class name" in comparison.info
    # two unevaluated models: their cluster_0 are unrelated and coloured apart
    palettes = app.shared_palettes([comparison.results[0], comparison.results[0]])
    assert palettes[0]["cluster_0"] != palettes[1]["cluster_0"]
    assert not app.is_class_name("cluster_12") and not app.is_class_name("LABEL_0") and app.is_class_name("sky")


def test_compare_bad_input_messages(app, models, image):
    a, b = str(models["a"]), str(models["b"])
    with pytest.raises(ValueError, match="upload an image or pick an example first"):
        app.compare_segmentations(None, a, b)
    with pytest.raises(ValueError, match="choose two different models"):
        app.compare_segmentations(image, a, a)
    with pytest.raises(ValueError, match="model A: DINO-feature k-means models have no linear probe"):
        app.compare_segmentations(image, a, b, "linear")
    with pytest.raises(ValueError, match="model B: cannot load the model"):
        app.compare_segmentations(image, a, str(models["a"].parent / "missing"))
    with pytest.raises(ValueError, match="probe must be one of"):
        app.compare_segmentations(image, a, b, "kmeans")


def _decode(output) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """An AnnotatedImage update: its label, label -> RGBA mask pixels, label -> colour."""
    assert output["__type__"] == "update"
    masks = {a["label"]: np.asarray(Image.open(a["image"]).convert("RGBA")) for a in output["value"]["annotations"]}
    return output["label"], masks, _colors(output["color_map"])


def _components(demo) -> dict:
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def test_compare_endpoint_and_one_model_case(app, models, image, tmp_path_factory):
    upload = tmp_path_factory.mktemp("upload") / "scene.png"
    image.save(upload)
    a, b = str(models["a"]), str(models["b"])
    demo = app.build_demo([a, b], examples_dir=tmp_path_factory.mktemp("examples"))
    single = app.build_demo([a], examples_dir=tmp_path_factory.mktemp("examples-one"))
    try:
        demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        client = Client(demo.local_url, verbose=False)
        output_a, output_b, info = client.predict(
            handle_file(str(upload)), a, b, "cluster", False, True, api_name="/compare"
        )
        reference = app.compare_segmentations(image, a, b, "cluster", False, True)
        for output, result, label in zip((output_a, output_b), reference.results, reference.panel_labels):
            shown_label, masks, colors = _decode(output)
            assert shown_label == label
            union = np.full(result.label_map.shape, "", dtype=object)
            for name, rgba in masks.items():
                inside = rgba[..., 3] > 0
                union[inside] = name
                assert (rgba[inside][:, :3] == [int(colors[name][i : i + 2], 16) for i in (1, 3, 5)]).all()
            np.testing.assert_array_equal(union, np.asarray(result.labels, dtype=object)[result.label_map])
        for name in set(output_a["color_map"]) & set(output_b["color_map"]):
            assert _colors(output_a["color_map"])[name] == _colors(output_b["color_map"])[name]
        assert "Same colour, same class name" in info
        with pytest.raises(AppError, match="choose two different models"):
            client.predict(handle_file(str(upload)), a, a, "cluster", False, True, api_name="/compare")
        with pytest.raises(AppError, match="upload an image or pick an example first"):
            client.predict(None, a, b, "cluster", False, True, api_name="/compare")

        # one model offered: the comparison is hidden behind a note, and its endpoint says why it cannot run
        shown = _components(demo)
        assert shown["compare"].visible is True and shown["model-b"].value == b
        assert "Compare two models" in shown["compare-intro"].value
        hidden = _components(single)
        assert hidden["compare"].visible is False and hidden["model-b"].value is None
        assert "One segmentation model is offered" in hidden["compare-intro"].value
        single.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        with pytest.raises(AppError, match="comparing needs two segmentation models"):
            Client(single.local_url, verbose=False).predict(
                handle_file(str(upload)), a, a, "cluster", False, True, api_name="/compare"
            )
    finally:
        demo.close()
        single.close()
