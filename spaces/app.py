"""Gradio Space for `hf_useg`: segment an image without labels and look at what the backbone attends to.

Upload an image (or pick one of the generated example scenes), choose a method and a model — a local model folder
or any Hub id typed into the box — and see the segmentation as an annotated image with a legend (segment names from
the model's ``config.id2label``), with or without horizontal-flip test-time augmentation and the dense CRF, plus
the last-layer CLS attention of every head of the (DINO) ViT backbone.

Run it locally (offline with a local model folder)::

    python spaces/app.py --model outputs/stego-tiny/model [--model another/folder-or-hub-id] [--port 7860]

On a Space, the models come from the ``HF_USEG_MODELS`` variable (Hub ids or folders separated by commas) and from
the ``models/*`` folders uploaded beside this file (``hf-useg push spaces/ me/demo --space --with-model DIR``).
In Python, ``demo = build_demo(["path/to/model"])`` returns the `gr.Blocks` app unlaunched (what the tests use).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

APP_DIR = Path(__file__).resolve().parent
MODELS_ENV = "HF_USEG_MODELS"
# Uploads are downscaled so that their longer side is at most this (the dense CRF is linear in the pixel count).
MAX_IMAGE_SIDE = int(os.environ.get("HF_USEG_MAX_IMAGE_SIDE", "640"))
PROBES = ("cluster", "linear")
MASK_OPACITY = 0.6  # the image shows through the coloured segments
ALL_METHODS = "all methods"

INTRO = """# hf_useg — unsupervised semantic segmentation

Segments are found **without labels**: the cluster probe groups pixels by the model's learned features, and each
cluster is named after the class it was matched to during evaluation (`config.id2label`). The linear probe is the
supervised reference. Flip TTA averages the prediction with that of the mirrored image; the dense CRF snaps
segment borders to image edges. The gallery shows where each attention head of the last backbone layer looks
(CLS query)."""

# stops of a dark-to-bright colour map for attention heat maps (black -> purple -> orange -> light yellow)
_HEAT_STOPS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
    dtype=np.float32,
)


# ----------------------------------------------------------------------------------------------------------------
# models


def discover_models(model_dirs: Sequence[str | os.PathLike] = ()) -> list[str]:
    """The models the app offers: ``model_dirs``, then ``HF_USEG_MODELS`` (comma-separated Hub ids or folders),
    then every ``models/*`` folder beside this file that holds a ``config.json``; duplicates removed."""
    names = [str(name) for name in model_dirs]
    names += [name.strip() for name in os.environ.get(MODELS_ENV, "").split(",") if name.strip()]
    bundled = APP_DIR / "models"
    if bundled.is_dir():
        names += [str(path) for path in sorted(bundled.iterdir()) if (path / "config.json").is_file()]
    return list(dict.fromkeys(names))


def method_of(name: str) -> str:
    """The method's display name of a model (read from a local folder's config; Hub ids are read on load)."""
    config_path = Path(name) / "config.json"
    if not config_path.is_file():
        return "Hub model"
    return method_display_name(json.loads(config_path.read_text()).get("model_type", "unknown"))


def method_display_name(model_type: str) -> str:
    """The registry's display name of the method whose models have ``model_type`` (the type itself otherwise)."""
    from hf_useg.registry import method_for_model_type

    spec = method_for_model_type(model_type)
    return spec.display_name if spec is not None else model_type


@dataclass
class LoadedModel:
    name: str
    model: Any
    processor: Any
    method: str
    cluster_labels: list[str]
    linear_labels: list[str] | None


def _linear_labels(name: str, model) -> list[str] | None:
    """Class names of the linear probe's outputs: the cluster names matched to each class id (from the folder's
    ``eval_results.json`` assignment), ``class_<i>`` where unknown."""
    num_classes = getattr(model.config, "num_classes", None)
    if getattr(model, "linear_probe", None) is None or not num_classes:
        return None
    names = {}
    results = Path(name) / "eval_results.json"
    if results.is_file():
        assignment = json.loads(results.read_text()).get("cluster", {}).get("assignment") or []
        for cluster, class_id in enumerate(assignment):
            if class_id is not None and 0 <= class_id < num_classes and cluster in model.config.id2label:
                names[class_id] = str(model.config.id2label[cluster])
    return [names.get(i, f"class_{i}") for i in range(num_classes)]


@functools.lru_cache(maxsize=4)
def load_model(name: str) -> LoadedModel:
    """Load a segmentation model and its whole-image processor (cached)."""
    from transformers import AutoModel

    import hf_useg  # noqa: F401  (registers the models with the Auto classes)
    from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor, whole_image_processor

    name = name.strip()
    if not name:
        raise ValueError("choose a model: a local model folder or a Hub id")
    try:
        model = AutoModel.from_pretrained(name)
    except Exception as error:  # offline Hub ids, missing folders, foreign checkpoints: say what failed
        raise ValueError(f"cannot load the model {name!r}: {error}") from error
    if not hasattr(model, "predict"):
        raise ValueError(f"{name!r} is a {type(model).__name__}, not an hf_useg segmentation model")
    model.eval()
    patch = model.backbone.patch_size
    try:
        processor = UnsupervisedSegmentationImageProcessor.from_pretrained(name)
    except OSError:
        processor = whole_image_processor(320, patch)
    if processor.do_center_crop:  # a protocol (center-crop) processor: segment the whole image instead
        size = processor.size
        resolution = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        processor = whole_image_processor(int(resolution or 320), patch)
    id2label = model.config.id2label
    cluster_labels = [str(id2label.get(i, f"cluster_{i}")) for i in range(len(id2label))]
    method = method_display_name(model.config.model_type)
    return LoadedModel(name, model, processor, method, cluster_labels, _linear_labels(name, model))


# ----------------------------------------------------------------------------------------------------------------
# segmentation


@dataclass
class Segmentation:
    image: Image.Image  # the (possibly downscaled) RGB image that was segmented
    label_map: np.ndarray  # [H, W] segment ids
    labels: list[str]  # name of each segment id
    attention: list[tuple[Image.Image, str]]  # one heat map per head, with a caption
    info: str
    all_names: list[str]  # every segment name the model can output (either probe): fixes the colours


def _palette_hex(count: int) -> list[str]:
    from hf_useg.visualization import color_palette

    return ["#{:02x}{:02x}{:02x}".format(*color) for color in color_palette(count).tolist()]


def _heat_map(values: np.ndarray) -> np.ndarray:
    """A 2-D array -> uint8 RGB heat map (min-max normalised)."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    position = scaled * (len(_HEAT_STOPS) - 1)
    index = np.clip(np.floor(position).astype(int), 0, len(_HEAT_STOPS) - 2)
    fraction = (position - index)[..., None]
    colors = _HEAT_STOPS[index] * (1 - fraction) + _HEAT_STOPS[index + 1] * fraction
    return colors.round().astype(np.uint8)


def attention_maps(loaded: LoadedModel, pixel_values, size: tuple[int, int]) -> list[tuple[Image.Image, str]]:
    """Last-layer CLS attention of every head, each as a heat map at ``size = (width, height)`` (patches shown as
    blocks). Empty for backbones without a CLS token."""
    import torch

    backbone = loaded.model.backbone
    if not getattr(backbone, "is_token_model", False):
        return []
    with torch.no_grad():
        attention = backbone(pixel_values, output_cls_attention=True).cls_attention[0].float().cpu().numpy()
    maps = []
    for head, values in enumerate(attention):
        image = Image.fromarray(_heat_map(values)).resize(size, Image.NEAREST)
        maps.append((image, f"head {head}"))
    return maps


def _as_rgb_image(image: Any) -> Image.Image:
    if image is None:
        raise ValueError("upload an image or pick an example first")
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"unsupported image type {type(image).__name__}")
    image = image.convert("RGB")
    if max(image.size) > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    return image


def segment(
    image: Any, model_name: str, probe: str = "cluster", crf: bool = False, flip_tta: bool = True
) -> Segmentation:
    """Segment ``image`` with the model's evaluation pipeline (`predict`: flip TTA -> upsampled code -> probe ->
    optional dense CRF) at the image's own size.

    Example:

    ```python
    >>> result = segment(Image.open("street.jpg"), "outputs/stego/model", crf=True)   # doctest: +SKIP
    >>> result.labels[result.label_map[0, 0]]                                          # doctest: +SKIP
    'sky'
    ```
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    image = _as_rgb_image(image)
    loaded = load_model(model_name)
    if probe == "linear" and loaded.linear_labels is None:
        raise ValueError(f"{loaded.method} models have no linear probe: use the cluster probe")
    start = time.perf_counter()
    pixel_values = loaded.processor(image, return_tensors="pt")["pixel_values"]
    size = (image.height, image.width)
    prediction = loaded.model.predict(
        pixel_values, output_size=size, flip_tta=flip_tta, crf=crf, images=np.asarray(image)[None]
    )
    if probe == "cluster":
        scores, labels = prediction.cluster_crf_probs if crf else prediction.cluster_log_probs, loaded.cluster_labels
    else:
        scores, labels = prediction.linear_crf_probs if crf else prediction.linear_log_probs, loaded.linear_labels
    label_map = scores.argmax(1)[0].cpu().numpy()
    seconds = time.perf_counter() - start
    attention = attention_maps(loaded, pixel_values, image.size)
    present = np.unique(label_map)
    info = (
        f"**{loaded.method}** · `{loaded.name}` · {probe} probe · flip TTA {'on' if flip_tta else 'off'} · "
        f"CRF {'on' if crf else 'off'}  \n{image.width}×{image.height} px (backbone input "
        f"{pixel_values.shape[-1]}×{pixel_values.shape[-2]}) · {len(present)} segments · {seconds:.2f} s"
    )
    if not attention:
        info += "  \nThis backbone has no CLS token: no attention maps."
    all_names = loaded.cluster_labels + (loaded.linear_labels or [])
    return Segmentation(image, label_map, list(labels), attention, info, all_names)


def annotations(result: Segmentation) -> tuple[Image.Image, list[tuple[np.ndarray, str]], dict[str, str]]:
    """``(image, [(mask, label)], color_map)`` for `gr.AnnotatedImage`: one mask per segment present, largest
    first; a name keeps its colour whichever probe produced it."""
    names = sorted(set(result.labels) | set(result.all_names))
    palette = dict(zip(names, _palette_hex(len(names))))
    ids, counts = np.unique(result.label_map, return_counts=True)
    pairs, color_map = [], {}
    for segment_id in ids[np.argsort(-counts, kind="stable")].tolist():
        label = result.labels[segment_id]
        mask = (result.label_map == segment_id).astype(np.float32) * MASK_OPACITY
        if label in color_map:  # two ids with one name (e.g. majority matching): one legend entry
            index = [existing for _, existing in pairs].index(label)
            pairs[index] = (np.maximum(pairs[index][0], mask), label)
            continue
        pairs.append((mask, label))
        color_map[label] = palette[label]
    return result.image, pairs, color_map


# ----------------------------------------------------------------------------------------------------------------
# example images


def make_example_images(directory: str | os.PathLike, count: int = 3, size: tuple[int, int] = (96, 144)) -> list[Path]:
    """Write ``count`` generated scenes (``hf_useg.data.make_synthetic_scenes``, not real photos) as PNG files,
    picking scenes that show at least three classes."""
    from hf_useg.data import make_synthetic_scenes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scenes = make_synthetic_scenes(4 * count, size, num_classes=4, seed=11)
    varied = [row["image"] for row in scenes if len(np.unique(np.asarray(row["label"]))) >= 3]
    paths = []
    for index, image in enumerate((varied + [row["image"] for row in scenes])[:count]):
        path = directory / f"generated_scene_{index}.png"
        image.save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# the app


def build_demo(model_dirs: Sequence[str | os.PathLike] = (), examples_dir: str | os.PathLike | None = None):
    """The Gradio app (a `gr.Blocks`, not launched). ``model_dirs``: model folders or Hub ids offered first (see
    `discover_models`); ``examples_dir``: where the example scenes are written (default: a new temp folder).

    The segmentation is also an API endpoint, ``/segment(image, model, probe, crf, flip_tta) -> (annotated image,
    attention gallery, info)``.

    Example:

    ```python
    >>> demo = build_demo(["outputs/stego-tiny/model"])                              # doctest: +SKIP
    >>> demo.launch(server_name="127.0.0.1", prevent_thread_lock=True)              # doctest: +SKIP
    ```
    """
    import gradio as gr

    models = discover_models(model_dirs)
    methods = {name: method_of(name) for name in models}
    examples = make_example_images(examples_dir or tempfile.mkdtemp(prefix="hf_useg_examples_"))

    def models_for(method: str):
        choices = [name for name in models if method in (ALL_METHODS, methods[name])]
        return gr.Dropdown(choices=choices, value=choices[0] if choices else None)

    def run(image, model_name, probe, crf, flip_tta):
        try:
            result = segment(image, model_name or "", probe, bool(crf), bool(flip_tta))
        except (ValueError, TypeError, ImportError) as error:
            raise gr.Error(str(error)) from error
        base, pairs, color_map = annotations(result)
        return gr.AnnotatedImage(value=(base, pairs), color_map=color_map), result.attention, result.info

    with gr.Blocks(title="hf_useg — unsupervised segmentation") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="input-image")
                method = gr.Dropdown(
                    choices=[ALL_METHODS] + sorted(set(methods.values())), value=ALL_METHODS, label="Method"
                )
                model = gr.Dropdown(
                    choices=models,
                    value=models[0] if models else None,
                    allow_custom_value=True,
                    label="Model (a listed one, a local folder or a Hub id)",
                    elem_id="model",
                )
                probe = gr.Radio(list(PROBES), value="cluster", label="Probe")
                with gr.Row():
                    flip_tta = gr.Checkbox(value=True, label="Flip TTA")
                    crf = gr.Checkbox(value=False, label="Dense CRF")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                gr.Examples(
                    examples=[[str(path)] for path in examples],
                    inputs=[image],
                    label="Examples (generated scenes, not real photos)",
                )
            with gr.Column(scale=1):
                annotated = gr.AnnotatedImage(label="Segmentation", show_legend=True, format="png", elem_id="result")
                info = gr.Markdown(label="Details", elem_id="info")
        attention = gr.Gallery(
            label="Last-layer CLS attention, one map per head",
            columns=6,
            fit_columns=False,
            height=260,
            object_fit="contain",
            format="png",
            elem_id="attention",
        )
        method.change(models_for, inputs=method, outputs=model, api_name=False)
        button.click(
            run, inputs=[image, model, probe, crf, flip_tta], outputs=[annotated, attention, info], api_name="segment"
        )
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hf_useg Gradio app")
    parser.add_argument("--model", action="append", default=[], help="model folder or Hub id (repeatable)")
    parser.add_argument("--host", default=None, help="address to listen on (default: 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = parser.parse_args(argv)
    host = args.host or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    build_demo(args.model).launch(server_name=host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
