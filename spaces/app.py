"""Gradio Space for `hf_useg`: segment an image without labels, look at what the backbone attends to, detect objects
with a fine-tuned CutMix-DETReg detector and look at CutMix-DETReg's pseudo-boxes.

* **Segmentation** tab: upload an image (or pick one of the generated example scenes), choose a method and one of
  the offered models, and see the segmentation as an annotated image with a legend (segment names from the model's
  ``config.id2label``), with or without horizontal-flip test-time augmentation and the dense CRF, plus the
  last-layer CLS attention of every head of the (DINO) ViT backbone. When two or more segmentation models are
  offered, a second model segments the same image with the same settings and the two results are shown side by
  side, one class name in one colour in both panels (`compare_segmentations`).
* **Detection** tab: an offered object detector (a fine-tuned ``DeformableDetrForObjectDetection`` folder, or any
  ``*ForObjectDetection`` model) draws its boxes above a score threshold on the uploaded image, with class names
  and scores, and lists them in a table. Below, the same image is the base of a CutMix composite (pastes cut from a
  donor upload or the example scenes) with its pseudo-boxes, of the random-box control and of DETReg's Selective
  Search boxes (when OpenCV's contrib modules are installed), for any seed.

Run it locally (offline with local model folders)::

    python spaces/app.py --model outputs/stego-tiny/model --model outputs/raccoon-detector/model [--port 7860]

Each offered model goes to the tab of its kind (read from its ``config.json``). The app serves only the models it
offers; ``--allow-custom-models`` lets visitors type any local folder or Hub id (off by default, and off on a Space,
which runs ``app.py`` without arguments). The work of one request is bounded: uploads over ``MAX_UPLOAD_PIXELS`` are
refused before they are decoded, the processed image is at most ``MAX_IMAGE_SIDE`` pixels on its longer side, the
segmentation backbone sees at most ``MAX_TOKENS`` patch tokens (the aspect ratio is kept), the attention gallery is
computed from a smaller input when ``heads * tokens**2`` would exceed ``MAX_ATTENTION_ENTRIES``, the detector's
input is at most ``MAX_DETECTION_SIDE`` pixels on its longer side, and a bounded queue runs ``CONCURRENCY`` requests
at a time (each limit can be set by the ``HF_USEG_*`` variable of the same name).

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
import re
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
# the names a model gives its outputs before evaluation matches them to classes (hf_useg's ``cluster_<i>``,
# ``class_<i>`` of an unnamed linear probe, transformers' ``LABEL_<i>``): two models' ``cluster_0`` are unrelated
_PLACEHOLDER_NAME = re.compile(r"(?:cluster|class|LABEL)_\d+")
DETECTION_TASK = "object-detection"
DETECTION_THRESHOLD = 0.5  # default of the score slider
# The longer side of the detector's input (DETR's processors: shorter side 800, longer at most 1333); larger
# processor sizes are scaled down to it (Deformable DETR's cost is linear in pixels).
MAX_DETECTION_SIDE = _env_int("HF_USEG_MAX_DETECTION_SIDE", 1333)
MAX_DETECTIONS = 100  # (query, class) pairs kept before the threshold (Deformable DETR's post-processing)
SELECTIVE_SEARCH_TOP_K = 30  # DETReg's pseudo-boxes per image

INTRO = """# hf_useg — unsupervised semantic segmentation

Segments are found **without labels**: the cluster probe groups pixels by the model's learned features, and each
cluster is named after the class it was matched to during evaluation (`config.id2label`). The linear probe is the
supervised reference. Flip TTA averages the prediction with that of the mirrored image; the dense CRF snaps
segment borders to image edges. The gallery shows where each attention head of the last backbone layer looks
(CLS query)."""

COMPARE_INTRO = """### Compare two models

The image, probe, flip TTA and CRF settings above, segmented by the model above (**A**) and by a second model
(**B**), side by side. **Colours:** a class name has the same colour in both panels, so a class both models were
matched to during evaluation (e.g. *sky* in both) reads at a glance; unnamed clusters (`cluster_<i>`: a model's own
grouping, not matched to a class) have colours of their own, never shared with the other panel."""

ONE_MODEL_NOTE = """### Compare two models

*One segmentation model is offered: start the app with a second `--model FOLDER` (or add one to `HF_USEG_MODELS`)
to compare two models side by side on the same image.*"""

DETECTION_INTRO = """Boxes of an **object detector**: a `transformers` `DeformableDetrForObjectDetection` fine-tuned
from a CutMix-DETReg-pretrained detector (`hf-useg` detection fine-tuning), or any other `*ForObjectDetection` model
offered here. Each box shows its class and score; only boxes scoring above the threshold are kept."""

NO_DETECTOR_NOTE = """

*No detector is offered: start the app with `--model DETECTOR_FOLDER` (a fine-tuned detector folder) or add one to
`HF_USEG_MODELS`. The CutMix composites below work without one.*"""

COMPOSITE_INTRO = """### CutMix composites — the pseudo-boxes of CutMix-DETReg pretraining

On the image above: rectangles cut from a donor image are pasted on it and become exact pseudo-boxes (the label is
the box's index and its visible share; a paste hidden by more than half by later ones is dropped). The random-box
control draws the same boxes on the unmodified image (same law and seed); DETReg's Selective Search gives its own
boxes. Move the seed slider for another draw."""

DETECTION_COLUMNS = ("label", "score", "x1", "y1", "x2", "y2")

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
    model_name: str = ""
    method: str = ""


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
    image: Any,
    model_name: str,
    probe: str = "cluster",
    crf: bool = False,
    flip_tta: bool = True,
    with_attention: bool = True,
) -> Segmentation:
    """Segment ``image`` (a PIL image, an array or a file path) with the model's evaluation pipeline (`predict`:
    flip TTA -> upsampled code -> probe -> optional dense CRF) at the image's own size, downscaled to at most
    ``MAX_IMAGE_SIDE`` per side; the backbone sees at most ``MAX_TOKENS`` patch tokens. ``with_attention=False``
    skips the attention maps (``result.attention`` is then empty).

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
    attention, attention_input = [], None
    if with_attention:
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
    if with_attention and not attention:
        info += "  \nThis backbone has no CLS token: no attention maps."
    all_names = loaded.cluster_labels + (loaded.linear_labels or [])
    return Segmentation(
        image,
        label_map,
        list(labels),
        attention,
        info,
        all_names,
        tuple(pixel_values.shape[-2:]),
        loaded.name,
        loaded.method,
    )


def annotations(
    result: Segmentation, palette: dict[str, str] | None = None
) -> tuple[Image.Image, list[tuple[np.ndarray, str]], dict[str, str]]:
    """``(image, [(mask, label)], color_map)`` for `gr.AnnotatedImage`: one mask per segment present, largest
    first; a name keeps its colour whichever probe produced it. ``palette`` (name -> ``#rrggbb``, covering every
    name of the result) gives the colours instead, e.g. one of `shared_palettes`."""
    if palette is None:
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


def is_class_name(name: str) -> bool:
    """Whether a segment name names a class (evaluation matched the segment to it), not a placeholder such as
    ``cluster_3`` that only numbers a model's own outputs."""
    return _PLACEHOLDER_NAME.fullmatch(name) is None


def shared_palettes(results: Sequence[Segmentation]) -> list[dict[str, str]]:
    """One colour map (name -> ``#rrggbb``) per result, from one palette: a class name has the same colour in every
    result; a placeholder name (see `is_class_name`) gets a colour of its own in each result, used by no other name
    of any result (the ``cluster_0`` of two models are unrelated groupings)."""
    named: set[str] = set()
    own = []
    for result in results:
        names = set(result.labels) | set(result.all_names)
        named |= {name for name in names if is_class_name(name)}
        own.append(sorted(name for name in names if not is_class_name(name)))
    colors = _palette_hex(len(named) + sum(len(names) for names in own))
    shared = dict(zip(sorted(named), colors))
    palettes, start = [], len(shared)
    for names in own:
        palettes.append({**shared, **dict(zip(names, colors[start : start + len(names)]))})
        start += len(names)
    return palettes


def _short_name(name: str, limit: int = 48) -> str:
    """A model's name for a panel label: a local folder's last two parts (``stego-tiny/model``), a Hub id as is;
    long names keep their end."""
    path = Path(name)
    if path.exists() and len(path.parts) > 2:
        name = str(Path(*path.parts[-2:]))
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


@dataclass
class Comparison:
    results: tuple[Segmentation, Segmentation]  # model A's, model B's (same image, same settings)
    palettes: tuple[dict[str, str], dict[str, str]]  # one colour per class name across both (`shared_palettes`)
    panel_labels: tuple[str, str]  # "A · method · model" of each panel
    shared_classes: list[str]  # class names both models can output (same colour in both panels)
    info: str

    def panel(self, index: int) -> tuple[Image.Image, list[tuple[np.ndarray, str]], dict[str, str]]:
        """`annotations` of panel ``index`` (0: model A, 1: model B) in the shared colours."""
        return annotations(self.results[index], self.palettes[index])


def compare_segmentations(
    image: Any, model_a: str, model_b: str, probe: str = "cluster", crf: bool = False, flip_tta: bool = True
) -> Comparison:
    """Segment one ``image`` with two models and the same settings (`segment`, without attention maps): the image
    is opened and downscaled once, and each model's processor and token cap apply as for a single segmentation.
    The panels are coloured by `shared_palettes`: a class name both models output has one colour.

    Example:

    ```python
    >>> comparison = compare_segmentations("street.jpg", "outputs/stego/model", "outputs/km/model")  # doctest: +SKIP
    >>> comparison.shared_classes, comparison.panel(0)[2]["sky"] == comparison.panel(1)[2]["sky"]    # doctest: +SKIP
    (['road', 'sky'], True)
    ```
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    model_a, model_b = (model_a or "").strip(), (model_b or "").strip()
    if not model_a or not model_b:
        raise ValueError("choose two models to compare")
    if model_a == model_b:
        raise ValueError("choose two different models to compare (model B is model A)")
    image = _as_rgb_image(image)
    results = []
    for letter, name in (("A", model_a), ("B", model_b)):
        try:
            results.append(segment(image, name, probe, crf, flip_tta, with_attention=False))
        except ValueError as error:
            raise ValueError(f"model {letter}: {error}") from error
    first, second = results
    palettes = shared_palettes(results)
    labels = tuple(
        f"{letter} · {result.method} · {_short_name(result.model_name)}" for letter, result in zip("AB", results)
    )
    shared = sorted(
        {name for name in first.all_names if is_class_name(name)}
        & {name for name in second.all_names if is_class_name(name)}
    )
    shown = sorted(
        {first.labels[i] for i in np.unique(first.label_map)} & {second.labels[i] for i in np.unique(second.label_map)}
    )
    shown = [name for name in shown if is_class_name(name)]
    if shared:
        colours = f"Same colour, same class name in both panels: {', '.join(shared)}"
        colours += f" (in both here: {', '.join(shown)})." if shown else " (none is in both panels here)."
    else:
        colours = "The two models share no class name: no colour is shared between the panels."
    info = f"**A:** {first.info}\n\n**B:** {second.info}\n\n{colours}"
    return Comparison((first, second), (palettes[0], palettes[1]), labels, shared, info)


# ----------------------------------------------------------------------------------------------------------------
# detection


def _model_config(name: str) -> dict | None:
    """The ``config.json`` of a local folder or (downloaded) of a Hub id; ``None`` when it cannot be read."""
    path = Path(name) / "config.json"
    try:
        if path.is_file():
            return json.loads(path.read_text())
        if Path(name).exists():
            return None
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except Exception:  # offline, private, missing or damaged: the model is then offered in both tabs
        return None


def is_detector_config(config: dict) -> bool:
    """Whether a ``config.json`` is that of an object detector: a registry method serving ``object-detection``
    (``deformable_detr``: a fine-tuned CutMix-DETReg detector) or a ``*ForObjectDetection`` architecture."""
    from hf_useg.registry import method_for_model_type

    spec = method_for_model_type(str(config.get("model_type", "")))
    if spec is not None:
        return spec.pipeline_task == DETECTION_TASK
    return any(str(name).endswith("ForObjectDetection") for name in config.get("architectures") or ())


def split_models(models: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(segmentation models, detectors)`` of the offered ``models``, in their order. A model whose config cannot
    be read (an unreachable Hub id) is in both lists: loading it tells which it is."""
    segmenters, detectors = [], []
    for name in models:
        config = _model_config(name)
        if config is None or is_detector_config(config):
            detectors.append(name)
        if config is None or not is_detector_config(config):
            segmenters.append(name)
    return segmenters, detectors


@dataclass
class LoadedDetector:
    name: str
    model: Any
    processor: Any
    method: str
    note: str | None  # said under every result (e.g. the processor was not saved with the model)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request per model: bounds the memory


def load_detector(name: str) -> LoadedDetector:
    """Load an object detector (`AutoModelForObjectDetection`) and its saved image processor (cached, four at
    most). Without a saved processor, Deformable DETR's own (shorter side 800) is used and the result says so."""
    with _LOAD_LOCK:
        return _load_detector(name)


@functools.lru_cache(maxsize=4)
def _load_detector(name: str) -> LoadedDetector:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING

    import hf_useg  # noqa: F401  (registers the segmentation models, so that they are recognised and refused)
    from hf_useg.detection_inference import detection_image_processor

    name = name.strip()
    if not name:
        raise ValueError("choose a detector: a local model folder or a Hub id")
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as error:  # offline Hub ids, missing folders, foreign checkpoints: say what failed
        raise ValueError(f"cannot load the detector {name!r}: {error}") from error
    if type(config) not in MODEL_FOR_OBJECT_DETECTION_MAPPING:
        raise ValueError(
            f"{name!r} is a {method_display_name(config.model_type)} model, not an object detector (segmentation "
            "models are in the Segmentation tab)"
        )
    try:
        model = AutoModelForObjectDetection.from_pretrained(name).eval()
    except Exception as error:
        raise ValueError(f"cannot load the detector {name!r}: {error}") from error
    note = None
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError:
        processor = detection_image_processor(800)
        note = "No image processor was saved with this model: Deformable DETR's default (shorter side 800) is used."
    return LoadedDetector(name, model, processor, method_display_name(config.model_type), note)


def _size_entry(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def detector_input_size(processor, height: int, width: int) -> tuple[tuple[int, int], str | None]:
    """``((height, width), note)``: the size the detector is given for a ``height x width`` image — the
    processor's own (shorter side to ``shortest_edge``, longer side at most ``longest_edge``, as DETR) unless its
    longer side would exceed ``MAX_DETECTION_SIDE`` or a side would round to 0 pixels (a sliver); then the app
    scales the image itself (aspect ratio kept, sides at least 1 pixel) and ``note`` says why (None otherwise)."""
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    size = processor.size
    shortest, longest = _size_entry(size, "shortest_edge"), _size_entry(size, "longest_edge")
    if shortest:
        target = get_size_with_aspect_ratio((height, width), shortest, longest or shortest)
    elif _size_entry(size, "max_height") and _size_entry(size, "max_width"):
        target = get_image_size_for_max_height_width(
            (height, width), _size_entry(size, "max_height"), _size_entry(size, "max_width")
        )
    elif _size_entry(size, "height") and _size_entry(size, "width"):
        target = (_size_entry(size, "height"), _size_entry(size, "width"))
    else:
        target = (height, width)
    if min(target) >= 1 and max(target) <= MAX_DETECTION_SIDE:
        return (int(target[0]), int(target[1])), None
    scale = min(max(target) / max(height, width), MAX_DETECTION_SIDE / max(height, width))
    if max(target) > MAX_DETECTION_SIDE:
        note = f"The detector input was scaled to at most {MAX_DETECTION_SIDE} px on its longer side."
    else:
        note = "The image is too thin for the processor's size rule: it was scaled with at least 1 px per side."
    return (max(1, round(height * scale)), max(1, round(width * scale))), note


def _pad_to_two_cells(model, pixel_values, pixel_mask):
    """Pad (bottom/right, masked out as in a padded batch) an input whose coarsest feature map would be a single
    cell: Deformable DETR's extra levels end in a GroupNorm, which refuses one value per channel. The coarsest
    stride is 32 (ResNet stage 4) times 2 per extra level beyond the backbone's three."""
    import torch
    import torch.nn.functional as F

    levels = int(getattr(model.config, "num_feature_levels", 1) or 1)
    stride = 32 * 2 ** max(0, levels - 3)
    height, width = pixel_values.shape[-2:]
    if math.ceil(height / stride) * math.ceil(width / stride) >= 2:
        return pixel_values, pixel_mask, False
    pad = (0, stride + 1 - width, 0, 0) if width >= height else (0, 0, 0, stride + 1 - height)
    if pixel_mask is None:
        pixel_mask = pixel_values.new_ones((pixel_values.shape[0], height, width), dtype=torch.long)
    return F.pad(pixel_values, pad), F.pad(pixel_mask, pad), True


def color_palette_rgb(count: int) -> list[tuple[int, int, int]]:
    """`hf_useg.visualization.color_palette` as RGB tuples."""
    from hf_useg.visualization import color_palette

    return [tuple(int(c) for c in colour) for colour in color_palette(max(count, 1)).tolist()]


@dataclass
class Detections:
    image: Image.Image  # the (possibly downscaled) RGB image the boxes refer to
    drawn: Image.Image  # the image with the boxes, labels and scores
    boxes: np.ndarray  # [n, 4] xyxy pixels of ``image``, highest score first
    scores: np.ndarray  # [n]
    labels: list[str]  # class name of each box
    info: str

    def rows(self) -> list[list]:
        """One table row per box: label, score, x1, y1, x2, y2 (pixels of the shown image)."""
        return [
            [label, round(float(score), 4), *(round(float(v), 1) for v in box)]
            for label, score, box in zip(self.labels, self.scores, self.boxes)
        ]


def detect(image: Any, model_name: str, threshold: float = DETECTION_THRESHOLD) -> Detections:
    """Detect objects in ``image`` (a PIL image, an array or a file path; downscaled to at most
    ``MAX_IMAGE_SIDE`` per side) with a `transformers` object detector: the boxes whose score is above
    ``threshold`` (the detector's own post-processing, as ``pipeline("object-detection")``), drawn on the image with
    their class names and scores. The detector sees at most ``MAX_DETECTION_SIDE`` pixels on its longer side.

    Example:

    ```python
    >>> result = detect(Image.open("raccoon.jpg"), "outputs/raccoon-detector/model", threshold=0.5)  # doctest: +SKIP
    >>> result.labels[0], result.scores[0] > 0.5                                                    # doctest: +SKIP
    ('raccoon', True)
    ```
    """
    import inspect

    import torch

    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the score threshold must be between 0 and 1, got {threshold}")
    image = _as_rgb_image(image)
    loaded = load_detector(model_name)
    start = time.perf_counter()
    (input_height, input_width), size_note = detector_input_size(loaded.processor, image.height, image.width)
    kwargs = {"size": {"height": input_height, "width": input_width}} if size_note else {}
    encoded = loaded.processor(images=image, return_tensors="pt", **kwargs)
    pixel_values, pixel_mask, padded = _pad_to_two_cells(
        loaded.model, encoded["pixel_values"], encoded.get("pixel_mask")
    )
    forward = {"pixel_values": pixel_values}
    if pixel_mask is not None and "pixel_mask" in inspect.signature(loaded.model.forward).parameters:
        forward["pixel_mask"] = pixel_mask
    post_process = loaded.processor.post_process_object_detection
    extra = {"top_k": MAX_DETECTIONS} if "top_k" in inspect.signature(post_process).parameters else {}
    with loaded.lock, torch.no_grad():
        outputs = loaded.model(**forward)
    result = post_process(outputs, threshold=threshold, target_sizes=[(image.height, image.width)], **extra)[0]
    order = torch.argsort(result["scores"], descending=True, stable=True)
    scores = result["scores"][order].float().numpy()
    boxes = result["boxes"][order].float().numpy().reshape(-1, 4)
    label_ids = result["labels"][order].tolist()
    id2label = loaded.model.config.id2label
    labels = [str(id2label.get(label, f"class_{label}")) for label in label_ids]
    seconds = time.perf_counter() - start

    palette = color_palette_rgb(max(len(id2label), max(label_ids, default=0) + 1))
    # lowest score first, so that the best boxes lie on top
    drawn = draw_labelled_boxes(
        image,
        boxes[::-1],
        [f"{label} {score:.2f}" for label, score in zip(labels[::-1], scores[::-1])],
        [palette[label] for label in label_ids[::-1]],
    )
    info = (
        f"**{loaded.method}** · `{loaded.name}` · score > {threshold:.2f} · {len(boxes)} detection"
        f"{'' if len(boxes) == 1 else 's'}  \n{image.width}×{image.height} px (detector input "
        f"{encoded['pixel_values'].shape[-1]}×{encoded['pixel_values'].shape[-2]}) · {seconds:.2f} s"
    )
    if size_note:
        info += f"  \n{size_note}"
    if padded:
        info += "  \nThe input was padded (masked out) to give the coarsest feature map two cells."
    if loaded.note:
        info += f"  \n{loaded.note}"
    if not len(boxes):
        info += f"  \nNo box scores above {threshold:.2f}: lower the threshold to see the weaker ones."
    return Detections(image, drawn, boxes, scores, labels, info)


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_labelled_boxes(
    image: Image.Image,
    boxes,
    labels: Sequence[str] | None,
    colours: Sequence[tuple[int, int, int]],
) -> Image.Image:
    """A copy of ``image`` with each ``(x1, y1, x2, y2)`` pixel box (x2/y2 the exclusive edges, as everywhere in
    hf_useg) outlined in its colour and, with ``labels``, its label on a tag of that colour above the box (inside it
    when the box touches the top border). Boxes are drawn in order, later ones on top; parts outside the image are
    clipped. Line width and text size grow with the image."""
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(1, round(max(width, height) / 300))
    font = _font(max(10, round(max(width, height) / 45)))
    for index, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        left, top = int(np.clip(round(x1), 0, width - 1)), int(np.clip(round(y1), 0, height - 1))
        right, bottom = int(np.clip(round(x2) - 1, left, width - 1)), int(np.clip(round(y2) - 1, top, height - 1))
        colour = tuple(int(c) for c in colours[index])
        draw.rectangle((left, top, right, bottom), outline=colour, width=line)
        if labels is None:
            continue
        text = str(labels[index])
        text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), text, font=font)
        tag_width, tag_height = text_right - text_left + 4, text_bottom - text_top + 4
        tag_top = top - tag_height if top >= tag_height else top + line
        tag_left = max(0, min(left, width - tag_width))
        draw.rectangle((tag_left, tag_top, tag_left + tag_width - 1, tag_top + tag_height - 1), fill=colour)
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
        draw.text((tag_left + 2 - text_left, tag_top + 2 - text_top), text, fill=ink, font=font)
    return canvas


# ----------------------------------------------------------------------------------------------------------------
# CutMix composites


@dataclass
class CompositeViews:
    panels: list[tuple[Image.Image, str]]  # (drawn image, caption): composite, random boxes, Selective Search
    composite: Any  # the `CutMixComposite`
    random_boxes: np.ndarray
    selective_search_boxes: np.ndarray | None  # None: OpenCV's contrib modules are not installed
    info: str


def cutmix_views(image: Any, donors: Sequence[Any], seed: int = 0, max_pastes: int = 8) -> CompositeViews:
    """The three pseudo-box sources of CutMix-DETReg pretraining on one base image (a PIL image, an array or a file
    path; downscaled to at most ``MAX_IMAGE_SIDE`` per side):

    1. a CutMix composite (`CutMixComposer` with ``max_pastes``, rectangles cut from ``donors`` pasted on the base)
       with its pseudo-boxes, each labelled with its index and visible share;
    2. the random-box control (`random_boxes`, the same box law and seed: the same boxes, no pasted content);
    3. DETReg's Selective Search boxes (top `SELECTIVE_SEARCH_TOP_K`, 128 px, seeded) when OpenCV's contrib modules
       are installed; otherwise ``info`` names the install command.

    The same ``seed`` gives the same views.
    """
    from hf_useg.models.detreg.box_sources import CutMixComposer, random_boxes, selective_search_boxes

    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)  # sliders send floats
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"the seed must be a whole number between 0 and {2**32 - 1}, got {seed!r}")
    if isinstance(max_pastes, float) and max_pastes.is_integer():
        max_pastes = int(max_pastes)
    if isinstance(max_pastes, bool) or not isinstance(max_pastes, (int, np.integer)) or not 1 <= max_pastes <= 16:
        raise ValueError(f"the number of pastes must be a whole number from 1 to 16, got {max_pastes!r}")
    base = _as_rgb_image(image)
    donor_images = [_as_rgb_image(donor) for donor in donors if donor is not None]
    if not donor_images:
        raise ValueError("CutMix needs at least one donor image to cut rectangles from")
    composite = CutMixComposer(max_pastes=int(max_pastes))(base, donor_images, np.random.default_rng(seed))
    control = random_boxes(base.height, base.width, np.random.default_rng(seed), max_boxes=int(max_pastes))

    box_colours = color_palette_rgb(max(len(composite.boxes), len(control), SELECTIVE_SEARCH_TOP_K))
    shares = [f"{index}: {share:.0%}" for index, share in enumerate(composite.visible_fraction)]
    panels = [
        (
            draw_labelled_boxes(Image.fromarray(composite.image), composite.boxes, shares, box_colours),
            f"CutMix: {len(composite.boxes)} pseudo-boxes",
        ),
        (
            draw_labelled_boxes(base, control, [str(index) for index in range(len(control))], box_colours),
            f"Random boxes (control): {len(control)}",
        ),
    ]
    info = (
        f"Seed {seed} · {composite.num_pasted} paste{'s' if composite.num_pasted != 1 else ''} drawn, "
        f"{len(composite.boxes)} kept (a paste that later pastes hide by more than half is dropped) · "
        f"{len(donor_images)} donor image{'s' if len(donor_images) != 1 else ''} · base {base.width}×{base.height} px"
    )
    try:
        proposals = selective_search_boxes(base, top_k=SELECTIVE_SEARCH_TOP_K, seed=seed)
    except ImportError:
        proposals = None
        info += (
            "  \nSelective Search (DETReg's original boxes) needs OpenCV's contrib modules: "
            "`pip install 'hf-useg[selective-search]'`."
        )
    else:
        panels.append(
            (
                draw_labelled_boxes(base, proposals, None, box_colours),
                f"Selective Search: top {len(proposals)}",
            )
        )
    return CompositeViews(panels, composite, control, proposals, info)


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


def _user_message(error: BaseException, task: str = "segmentation") -> str:
    """What the visitor reads for a failed request (the traceback goes to the server log only); ``task`` names the
    request ("segmentation", "detection" or "composition")."""
    import torch

    if isinstance(error, (ValueError, TypeError, ImportError)):  # the app's own messages name the problem
        return str(error)
    out_of_memory = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    if isinstance(error, out_of_memory) or "can't allocate memory" in str(error):
        if task == "segmentation":
            return "not enough memory to segment this image: try a smaller image, or without the dense CRF"
        return f"not enough memory for the {task} of this image: try a smaller image"
    return f"the {task} failed ({type(error).__name__}); try another image or model"


def build_demo(
    model_dirs: Sequence[str | os.PathLike] = (),
    examples_dir: str | os.PathLike | None = None,
    allow_custom_models: bool = False,
):
    """The Gradio app (a `gr.Blocks`, queued, not launched): a Segmentation tab (with a side-by-side comparison of
    two models when two or more are offered) and a Detection tab (detections and CutMix composites).
    ``model_dirs``: model folders or Hub ids offered first (see `discover_models`; each goes to the tab of its kind,
    see `split_models`); ``examples_dir``: where the example scenes are written (default: a new temp folder);
    ``allow_custom_models``: whether visitors may type any other local folder or Hub id (off: only the offered
    models are ever loaded).

    The API endpoints: ``/segment(image, model, probe, crf, flip_tta) -> (annotated image, attention gallery,
    info)``, ``/compare(image, model_a, model_b, probe, crf, flip_tta) -> (annotated image A, annotated image B,
    info)`` (two models side by side, see `compare_segmentations`), ``/detect(image, detector, threshold) -> (image
    with boxes, table, info)`` and ``/composite(image, donor, seed, max_pastes) -> (gallery, info)``; at most
    ``CONCURRENCY`` requests run at once and ``QUEUE_SIZE`` wait.

    Example:

    ```python
    >>> demo = build_demo(["outputs/stego-tiny/model", "outputs/raccoon-detector/model"])    # doctest: +SKIP
    >>> demo.launch(server_name="127.0.0.1", prevent_thread_lock=True)                      # doctest: +SKIP
    ```
    """
    import gradio as gr

    _save_pil_to_cache_atomically()
    models, detectors = split_models(discover_models(model_dirs))
    methods = {name: method_of(name) for name in models}
    examples = make_example_images(examples_dir or tempfile.mkdtemp(prefix="hf_useg_examples_"))

    def models_for(method: str):
        choices = [name for name in models if method in (ALL_METHODS, methods[name])]
        return gr.Dropdown(choices=choices, value=choices[0] if choices else None)

    def check_offered(name: str, offered: list[str], kind: str) -> str:
        name = (name or "").strip()
        if name and not allow_custom_models and name not in offered:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise gr.Error(f"{shown!r} is not one of the {kind}s this app offers: choose one from the list")
        return name

    def run(image, model_name, probe, crf, flip_tta):
        model_name = check_offered(model_name, models, "model")
        try:
            result = segment(image, model_name, probe, bool(crf), bool(flip_tta))
            base, pairs, color_map = annotations(result)
        except Exception as error:
            if not isinstance(error, (ValueError, TypeError)):
                logger.exception("segmentation failed")
            raise gr.Error(_user_message(error)) from error
        return gr.AnnotatedImage(value=(base, pairs), color_map=color_map), result.attention, result.info

    def run_compare(image, model_a, model_b, probe, crf, flip_tta):
        model_a = check_offered(model_a, models, "model")
        model_b = check_offered(model_b, models, "model")
        if len(models) < 2 and not allow_custom_models:
            raise gr.Error("comparing needs two segmentation models: this app offers one")
        try:
            comparison = compare_segmentations(image, model_a, model_b, probe, bool(crf), bool(flip_tta))
            panels = [comparison.panel(index) for index in (0, 1)]
        except Exception as error:
            if not isinstance(error, (ValueError, TypeError)):
                logger.exception("comparison failed")
            raise gr.Error(_user_message(error)) from error
        return (
            *(
                gr.AnnotatedImage(value=(base, pairs), color_map=color_map, label=label)
                for (base, pairs, color_map), label in zip(panels, comparison.panel_labels)
            ),
            comparison.info,
        )

    def run_detection(image, detector_name, threshold):
        detector_name = check_offered(detector_name, detectors, "detector")
        if not detector_name:
            raise gr.Error(
                "no detector chosen: start the app with --model DETECTOR_FOLDER (a fine-tuned Deformable DETR)"
                if not detectors
                else "choose a detector from the list"
            )
        try:
            result = detect(image, detector_name, DETECTION_THRESHOLD if threshold is None else threshold)
        except Exception as error:
            if not isinstance(error, (ValueError, TypeError)):
                logger.exception("detection failed")
            raise gr.Error(_user_message(error, "detection")) from error
        return result.drawn, result.rows(), result.info

    def run_composite(image, donor, seed, max_pastes):
        donors = [donor] if donor is not None else [str(path) for path in examples]
        try:
            views = cutmix_views(image, donors, 0 if seed is None else seed, 8 if max_pastes is None else max_pastes)
        except Exception as error:
            if not isinstance(error, (ValueError, TypeError)):
                logger.exception("composition failed")
            raise gr.Error(_user_message(error, "composition")) from error
        return views.panels, views.info

    def image_input(elem_id: str, label: str = "Image"):
        # a file path: the app opens the upload itself (size checked before decoding)
        component = gr.Image(
            type="filepath", image_mode=None, label=label, sources=["upload", "clipboard"], elem_id=elem_id
        )
        _explain_unreadable_uploads(component)
        return component

    example_rows = [[str(path)] for path in examples]
    example_label = "Examples (generated scenes, not real photos)"
    custom = " (a listed one, a local folder or a Hub id)" if allow_custom_models else ""
    with gr.Blocks(title="hf_useg — unsupervised segmentation") as demo:
        with gr.Tabs():
            with gr.Tab("Segmentation", id="segmentation"):
                gr.Markdown(INTRO)
                with gr.Row():
                    with gr.Column(scale=1):
                        image = image_input("input-image")
                        method = gr.Dropdown(
                            choices=[ALL_METHODS] + sorted(set(methods.values())), value=ALL_METHODS, label="Method"
                        )
                        model = gr.Dropdown(
                            choices=models,
                            value=models[0] if models else None,
                            allow_custom_value=allow_custom_models,
                            label=f"Model{custom}",
                            elem_id="model",
                        )
                        probe = gr.Radio(list(PROBES), value="cluster", label="Probe")
                        with gr.Row():
                            flip_tta = gr.Checkbox(value=True, label="Flip TTA")
                            crf = gr.Checkbox(value=False, label="Dense CRF")
                        button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                        gr.Examples(examples=example_rows, inputs=[image], label=example_label)
                    with gr.Column(scale=1):
                        annotated = gr.AnnotatedImage(
                            label="Segmentation", show_legend=True, format="png", elem_id="result"
                        )
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
                can_compare = len(models) >= 2
                gr.Markdown(COMPARE_INTRO if can_compare else ONE_MODEL_NOTE, elem_id="compare-intro")
                with gr.Column(visible=can_compare, elem_id="compare"):
                    with gr.Row():
                        model_b = gr.Dropdown(
                            choices=models,
                            value=models[1] if can_compare else None,
                            allow_custom_value=allow_custom_models,
                            label=f"Model B{custom}",
                            elem_id="model-b",
                            scale=3,
                        )
                        compare_button = gr.Button("Compare A and B", elem_id="compare-button", scale=1)
                    with gr.Row():
                        panel_a = gr.AnnotatedImage(label="A", show_legend=True, format="png", elem_id="compare-a")
                        panel_b = gr.AnnotatedImage(label="B", show_legend=True, format="png", elem_id="compare-b")
                    compare_info = gr.Markdown(elem_id="compare-info")
            with gr.Tab("Detection", id="detection"):
                gr.Markdown(DETECTION_INTRO if detectors else DETECTION_INTRO + NO_DETECTOR_NOTE)
                with gr.Row():
                    with gr.Column(scale=1):
                        detection_image = image_input("detection-image")
                        detector = gr.Dropdown(
                            choices=detectors,
                            value=detectors[0] if detectors else None,
                            allow_custom_value=allow_custom_models,
                            label=f"Detector{custom}",
                            elem_id="detector",
                        )
                        threshold = gr.Slider(
                            0.0,
                            1.0,
                            value=DETECTION_THRESHOLD,
                            step=0.01,
                            label="Score threshold",
                            elem_id="threshold",
                        )
                        detect_button = gr.Button("Detect", variant="primary", elem_id="detect-button")
                        gr.Examples(examples=example_rows, inputs=[detection_image], label=example_label)
                    with gr.Column(scale=1):
                        detected = gr.Image(label="Detections", type="pil", format="png", elem_id="detections")
                        table = gr.Dataframe(
                            headers=list(DETECTION_COLUMNS),
                            datatype=["str"] + ["number"] * 5,
                            label="Detections (boxes in pixels of the shown image, best first)",
                            interactive=False,
                            elem_id="detection-table",
                        )
                        detection_info = gr.Markdown(elem_id="detection-info")
                gr.Markdown(COMPOSITE_INTRO)
                with gr.Row():
                    with gr.Column(scale=1):
                        donor = image_input("donor-image", "Donor image (optional; default: the example scenes)")
                        seed = gr.Slider(0, 999, value=0, step=1, label="Seed", elem_id="seed")
                        max_pastes = gr.Slider(1, 16, value=8, step=1, label="At most this many pastes")
                        compose_button = gr.Button("Compose", elem_id="compose-button")
                    with gr.Column(scale=2):
                        composites = gr.Gallery(
                            label="Pseudo-boxes on the image above",
                            columns=3,
                            height=360,
                            object_fit="contain",
                            format="png",
                            elem_id="composites",
                        )
                        composite_info = gr.Markdown(elem_id="composite-info")
        method.change(models_for, inputs=method, outputs=model, api_name=False)
        button.click(
            run, inputs=[image, model, probe, crf, flip_tta], outputs=[annotated, attention, info], api_name="segment"
        )
        compare_button.click(
            run_compare,
            inputs=[image, model, model_b, probe, crf, flip_tta],
            outputs=[panel_a, panel_b, compare_info],
            api_name="compare",
        )
        detect_button.click(
            run_detection,
            inputs=[detection_image, detector, threshold],
            outputs=[detected, table, detection_info],
            api_name="detect",
        )
        composite_inputs = [detection_image, donor, seed, max_pastes]
        compose_button.click(
            run_composite, inputs=composite_inputs, outputs=[composites, composite_info], api_name="composite"
        )
        seed.release(run_composite, inputs=composite_inputs, outputs=[composites, composite_info], api_name=False)
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
