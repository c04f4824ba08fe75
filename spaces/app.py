"""Gradio Space for `hf_useg`: segment an image without labels and look at what the backbone attends to.

Upload an image (or pick one of the generated example scenes), choose a method and one of the offered models, and
see the segmentation as an annotated image with a legend (segment names from the model's ``config.id2label``), with
or without horizontal-flip test-time augmentation and the dense CRF, plus the last-layer CLS attention of every head
of the (DINO) ViT backbone.

Run it locally (offline with a local model folder)::

    python spaces/app.py --model outputs/stego-tiny/model [--model another/folder-or-hub-id] [--port 7860]

The app serves only the models it offers; ``--allow-custom-models`` lets visitors type any local folder or Hub id
(off by default, and off on a Space, which runs ``app.py`` without arguments). The work of one request is bounded:
uploads over ``MAX_UPLOAD_PIXELS`` are refused before they are decoded, the segmented image is at most
``MAX_IMAGE_SIDE`` pixels on its longer side, the backbone sees at most ``MAX_TOKENS`` patch tokens (the aspect ratio
is kept), the attention gallery is computed from a smaller input when ``heads * tokens**2`` would exceed
``MAX_ATTENTION_ENTRIES``, and a bounded queue runs ``CONCURRENCY`` requests at a time (each limit can be set by the
``HF_USEG_*`` variable of the same name).

On a Space, the models come from the ``HF_USEG_MODELS`` variable (Hub ids or folders separated by commas) and from
the ``models/*`` folders uploaded beside this file (``hf-useg push spaces/ me/demo --space --with-model DIR``).
In Python, ``demo = build_demo(["path/to/model"])`` returns the `gr.Blocks` app unlaunched (what the tests use).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

logger = logging.getLogger("hf_useg.space")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError as error:
        raise ValueError(f"{name} must be an integer, got {value!r}") from error


APP_DIR = Path(__file__).resolve().parent
MODELS_ENV = "HF_USEG_MODELS"
# Uploads are downscaled so that their longer side is at most this (the dense CRF is linear in the pixel count).
MAX_IMAGE_SIDE = _env_int("HF_USEG_MAX_IMAGE_SIDE", 640)
# Uploads with more pixels are refused from their header, before anything is decoded (decompression bombs).
MAX_UPLOAD_PIXELS = _env_int("HF_USEG_MAX_UPLOAD_PIXELS", 50_000_000)
# Patch tokens of one backbone pass: the whole-image processor resizes the *shorter* side to the model resolution,
# so without this cap a 640x80 upload would give a ViT-S/8 12,800 tokens (minutes of CPU, GBs of attention).
MAX_TOKENS = _env_int("HF_USEG_MAX_TOKENS", 2500)
# heads * tokens^2 of the attention view behind the gallery (24M float32 entries = 96 MB); above it the maps are
# computed from a smaller input.
MAX_ATTENTION_ENTRIES = _env_int("HF_USEG_MAX_ATTENTION_ENTRIES", 24_000_000)
QUEUE_SIZE = _env_int("HF_USEG_QUEUE_SIZE", 64)  # requests waiting beyond this are turned away ("queue full")
CONCURRENCY = _env_int("HF_USEG_CONCURRENCY", 2)  # requests segmented at the same time
MAX_FILE_SIZE = os.environ.get("HF_USEG_MAX_FILE_SIZE", "25mb")  # uploads above it are refused by Gradio
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
    # one request at a time per model: the backbone's attention view switches the model's attention implementation
    # to eager and back, which another thread's forward would see half-way
    lock: threading.Lock = field(default_factory=threading.Lock)


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


_LOAD_LOCK = threading.Lock()  # concurrent first requests for one model load it once


def load_model(name: str) -> LoadedModel:
    """Load a segmentation model and its whole-image processor (cached, four at most)."""
    with _LOAD_LOCK:
        return _load_model(name)


@functools.lru_cache(maxsize=4)
def _load_model(name: str) -> LoadedModel:
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
    input_size: tuple[int, int] = (0, 0)  # (height, width) of the backbone input


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


def _token_grid(height: int, width: int, max_tokens: int) -> tuple[int, int]:
    """The largest ``(rows, cols)`` patch grid with ``rows * cols <= max_tokens`` and (as far as whole patches
    allow) the aspect ratio of ``height x width``."""
    scale = math.sqrt(max_tokens / (height * width))
    # the shorter side is rounded down, the longer one then follows the aspect ratio (rounding both would distort
    # a sliver: 3.4 rows -> 3 but 730 columns kept)
    if height <= width:
        rows = max(1, math.floor(height * scale))
        return rows, max(1, min(max_tokens // rows, round(width * rows / height)))
    cols = max(1, math.floor(width * scale))
    return max(1, min(max_tokens // cols, round(height * cols / width))), cols


def backbone_input_size(loaded: LoadedModel, image: Image.Image) -> tuple[int, int] | None:
    """``(height, width)`` the backbone is given for ``image`` when the model's processor would exceed
    ``MAX_TOKENS`` patch tokens (aspect ratio kept, multiples of the patch size); ``None`` when the processor's own
    size is within the cap."""
    from hf_useg.image_processing import resize_output_size

    patch = int(loaded.model.backbone.patch_size)
    height, width = resize_output_size(image.height, image.width, loaded.processor.size)
    divisor = loaded.processor.size_divisor or 1
    height, width = (max(divisor, int(math.floor(n / divisor + 0.5)) * divisor) for n in (height, width))
    if math.ceil(height / patch) * math.ceil(width / patch) <= MAX_TOKENS:
        return None
    rows, cols = _token_grid(height, width, MAX_TOKENS)
    return rows * patch, cols * patch


def attention_maps(
    loaded: LoadedModel, pixel_values, size: tuple[int, int]
) -> tuple[list[tuple[Image.Image, str]], tuple[int, int] | None]:
    """Last-layer CLS attention of every head, each as a heat map at ``size = (width, height)`` (patches shown as
    blocks), and the ``(height, width)`` of a reduced input when ``heads * tokens**2`` of ``pixel_values`` would
    exceed ``MAX_ATTENTION_ENTRIES`` (``None`` otherwise). No maps for backbones without a CLS token."""
    import torch
    import torch.nn.functional as F

    backbone = loaded.model.backbone
    if not getattr(backbone, "is_token_model", False):
        return [], None
    patch = int(backbone.patch_size)
    rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    heads = int(backbone.num_attention_heads or 1)
    reduced = None
    if heads * (rows * cols) ** 2 > MAX_ATTENTION_ENTRIES:
        rows, cols = _token_grid(rows, cols, max(1, math.isqrt(MAX_ATTENTION_ENTRIES // heads)))
        reduced = (rows * patch, cols * patch)
        pixel_values = F.interpolate(pixel_values, size=reduced, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        attention = backbone(pixel_values, output_cls_attention=True).cls_attention[0].float().cpu().numpy()
    maps = []
    for head, values in enumerate(attention):
        image = Image.fromarray(_heat_map(values)).resize(size, Image.NEAREST)
        maps.append((image, f"head {head}"))
    return maps, reduced


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any PIL mode; 16/32-bit integer and float images (no fixed 0-255 range) are min-max scaled."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(values.round().astype(np.uint8))
    return image.convert("RGB")


def _downscale(image: Image.Image) -> Image.Image:
    if max(image.size) > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR, reducing_gap=3.0)
    return image


_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def open_image(path: str | os.PathLike) -> Image.Image:
    """An uploaded file as an RGB image of at most ``MAX_IMAGE_SIDE`` pixels per side, with a clear `ValueError` for
    files that are not images and for images over ``MAX_UPLOAD_PIXELS`` (checked from the header, before decoding;
    JPEGs are decoded at a reduced scale)."""
    name = Path(path).name
    try:
        image = Image.open(path)
    except UnidentifiedImageError as error:
        raise ValueError(
            f"{name!r} is not an image this app can read (use PNG, JPEG, WebP, BMP, TIFF or GIF)"
        ) from error
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name!r} is too large: {error}") from error
    except OSError as error:
        raise ValueError(f"cannot read the upload {name!r}: {error}") from error
    with image:
        width, height = image.size
        if width * height > MAX_UPLOAD_PIXELS:
            raise ValueError(
                f"the image is {width}×{height} ({width * height / 1e6:.0f} megapixels); this app accepts at most "
                f"{MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels"
            )
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            image.draft(
                "RGB", (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
            )  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that fits
            image = _downscale(_to_rgb(image))
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
            raise ValueError(f"cannot decode the image {name!r} (damaged or unsupported): {error}") from error
    transpose = _EXIF_TRANSPOSE.get(orientation)  # what `ImageOps.exif_transpose` does, on the small image
    return image.transpose(transpose) if transpose is not None else image


def _as_rgb_image(image: Any) -> Image.Image:
    if image is None:
        raise ValueError("upload an image or pick an example first")
    if isinstance(image, (str, Path)):
        return _downscale(open_image(image))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"unsupported image type {type(image).__name__}")
    return _downscale(_to_rgb(image))


def segment(
    image: Any, model_name: str, probe: str = "cluster", crf: bool = False, flip_tta: bool = True
) -> Segmentation:
    """Segment ``image`` (a PIL image, an array or a file path) with the model's evaluation pipeline (`predict`:
    flip TTA -> upsampled code -> probe -> optional dense CRF) at the image's own size, downscaled to at most
    ``MAX_IMAGE_SIDE`` per side; the backbone sees at most ``MAX_TOKENS`` patch tokens.

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
    capped = backbone_input_size(loaded, image)
    kwargs = {} if capped is None else {"size": {"height": capped[0], "width": capped[1]}}
    pixel_values = loaded.processor(image, return_tensors="pt", **kwargs)["pixel_values"]
    size = (image.height, image.width)
    with loaded.lock:
        prediction = loaded.model.predict(
            pixel_values, output_size=size, flip_tta=flip_tta, crf=crf, images=np.asarray(image)[None]
        )
    if probe == "cluster":
        scores, labels = prediction.cluster_crf_probs if crf else prediction.cluster_log_probs, loaded.cluster_labels
    else:
        scores, labels = prediction.linear_crf_probs if crf else prediction.linear_log_probs, loaded.linear_labels
    label_map = scores.argmax(1)[0].cpu().numpy()
    seconds = time.perf_counter() - start
    with loaded.lock:
        attention, attention_input = attention_maps(loaded, pixel_values, image.size)
    present = np.unique(label_map)
    info = (
        f"**{loaded.method}** · `{loaded.name}` · {probe} probe · flip TTA {'on' if flip_tta else 'off'} · "
        f"CRF {'on' if crf else 'off'}  \n{image.width}×{image.height} px (backbone input "
        f"{pixel_values.shape[-1]}×{pixel_values.shape[-2]}) · {len(present)} segments · {seconds:.2f} s"
    )
    if capped is not None:
        info += f"  \nThe backbone input was reduced to stay within {MAX_TOKENS} patch tokens."
    if attention_input is not None:
        info += f"  \nAttention maps from a {attention_input[1]}×{attention_input[0]} input (memory bound)."
    if not attention:
        info += "  \nThis backbone has no CLS token: no attention maps."
    all_names = loaded.cluster_labels + (loaded.linear_labels or [])
    return Segmentation(image, label_map, list(labels), attention, info, all_names, tuple(pixel_values.shape[-2:]))


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


def _save_pil_to_cache_atomically() -> None:
    """Make Gradio write image outputs atomically.

    Gradio (6.31) saves every PIL/array output at a content-hash path with ``Path.write_bytes``: identical requests
    (same image, same model) write the same files, and one response truncates and rewrites a file while another
    response is still streaming it — the client gets a truncated body (2-3 of 30 identical concurrent requests
    failed). Writing to a temporary name and renaming it into place leaves a reader with a complete copy; the path
    and the bytes are what Gradio's function produces. Idempotent; affects this process's Gradio only.
    """
    from gradio import processing_utils

    if getattr(processing_utils.save_pil_to_cache, "hf_useg_atomic", False):
        return

    def save_pil_to_cache(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = processing_utils.encode_pil_to_bytes(img, format)
        directory = Path(cache_dir) / processing_utils.hash_bytes(data)
        directory.mkdir(exist_ok=True, parents=True)
        target = (directory / f"{name}.{format}").resolve()
        descriptor, staging = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            os.chmod(staging, 0o644)
            os.replace(staging, target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return str(target)

    save_pil_to_cache.hf_useg_atomic = True
    processing_utils.save_pil_to_cache = save_pil_to_cache


def _explain_unreadable_uploads(component) -> None:
    """Make an image input answer an unreadable upload with a message for the visitor: Gradio's own check (PIL
    cannot open it) raises a bare exception, shown as an unexplained "Error". The instance's method is wrapped,
    not subclassed: Gradio writes a ``.pyi`` stub beside the module of every component subclass."""
    import gradio as gr

    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError as error:
            raise gr.Error(f"the image is too large: {error}") from error
        except Exception as error:  # PIL.UnidentifiedImageError and the like
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(
                f"{name!r} is not an image this app can read (use PNG, JPEG, WebP, BMP, TIFF or GIF)"
            ) from error

    component.preprocess = preprocess


def _user_message(error: BaseException) -> str:
    """What the visitor reads for a failed request (the traceback goes to the server log only)."""
    import torch

    if isinstance(error, (ValueError, TypeError, ImportError)):  # the app's own messages name the problem
        return str(error)
    out_of_memory = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    if isinstance(error, out_of_memory) or "can't allocate memory" in str(error):
        return "not enough memory to segment this image: try a smaller image, or without the dense CRF"
    return f"the segmentation failed ({type(error).__name__}); try another image or model"


def build_demo(
    model_dirs: Sequence[str | os.PathLike] = (),
    examples_dir: str | os.PathLike | None = None,
    allow_custom_models: bool = False,
):
    """The Gradio app (a `gr.Blocks`, queued, not launched). ``model_dirs``: model folders or Hub ids offered first
    (see `discover_models`); ``examples_dir``: where the example scenes are written (default: a new temp folder);
    ``allow_custom_models``: whether visitors may type any other local folder or Hub id (off: only the offered
    models are ever loaded).

    The segmentation is also an API endpoint, ``/segment(image, model, probe, crf, flip_tta) -> (annotated image,
    attention gallery, info)``; at most ``CONCURRENCY`` requests run at once and ``QUEUE_SIZE`` wait.

    Example:

    ```python
    >>> demo = build_demo(["outputs/stego-tiny/model"])                              # doctest: +SKIP
    >>> demo.launch(server_name="127.0.0.1", prevent_thread_lock=True)              # doctest: +SKIP
    ```
    """
    import gradio as gr

    _save_pil_to_cache_atomically()
    models = discover_models(model_dirs)
    methods = {name: method_of(name) for name in models}
    examples = make_example_images(examples_dir or tempfile.mkdtemp(prefix="hf_useg_examples_"))

    def models_for(method: str):
        choices = [name for name in models if method in (ALL_METHODS, methods[name])]
        return gr.Dropdown(choices=choices, value=choices[0] if choices else None)

    def run(image, model_name, probe, crf, flip_tta):
        model_name = (model_name or "").strip()
        if model_name and not allow_custom_models and model_name not in models:
            shown = model_name if len(model_name) <= 80 else model_name[:77] + "..."
            raise gr.Error(f"{shown!r} is not one of the models this app offers: choose one from the list")
        try:
            result = segment(image, model_name, probe, bool(crf), bool(flip_tta))
            base, pairs, color_map = annotations(result)
        except Exception as error:
            if not isinstance(error, (ValueError, TypeError)):
                logger.exception("segmentation failed")
            raise gr.Error(_user_message(error)) from error
        return gr.AnnotatedImage(value=(base, pairs), color_map=color_map), result.attention, result.info

    model_label = "Model (a listed one, a local folder or a Hub id)" if allow_custom_models else "Model"
    with gr.Blocks(title="hf_useg — unsupervised segmentation") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                # a file path: the app opens the upload itself (size checked before decoding)
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Image",
                    sources=["upload", "clipboard"],
                    elem_id="input-image",
                )
                _explain_unreadable_uploads(image)
                method = gr.Dropdown(
                    choices=[ALL_METHODS] + sorted(set(methods.values())), value=ALL_METHODS, label="Method"
                )
                model = gr.Dropdown(
                    choices=models,
                    value=models[0] if models else None,
                    allow_custom_value=allow_custom_models,
                    label=model_label,
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
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hf_useg Gradio app")
    parser.add_argument("--model", action="append", default=[], help="model folder or Hub id (repeatable)")
    parser.add_argument("--host", default=None, help="address to listen on (default: 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument(
        "--allow-custom-models",
        action="store_true",
        help="let visitors load any local model folder or Hub id typed into the model box (off by default: it "
        "loads arbitrary paths and repositories on this machine; never on a public Space)",
    )
    args = parser.parse_args(argv)
    host = args.host or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    if args.allow_custom_models:
        logger.warning("--allow-custom-models: visitors can load any local folder or Hub id")
    demo = build_demo(args.model, allow_custom_models=args.allow_custom_models)
    demo.launch(server_name=host, server_port=args.port, share=args.share, max_file_size=MAX_FILE_SIZE)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
