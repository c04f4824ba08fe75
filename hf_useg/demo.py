"""`make demo`: train STEGO for a short schedule, compare it with the DINO-feature k-means baseline on the same
backbone, and write a model folder, overlays and a per-class table.

By default it runs offline: the generated synthetic scenes and a small randomly initialised ViT (both named as
such in the output). ``BACKBONE=facebook/dino-vits8`` (a Hub id or a local folder) and ``DATA=<hub id or folder>``
(with ``NUM_CLASSES``) switch to real ones. A Hub id is downloaded when the Hub answers a quick probe (a few
seconds at most); when it does not, or when the user set ``HF_HUB_OFFLINE=1``, the demo says so and falls back to
the offline default.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .training import RANDOM_BACKBONES, TrainingArguments, load_splits, load_training_arguments, train

DEFAULT_BACKBONE = "random-vit-tiny"


_TRUE = ("1", "on", "yes", "true")


def _user_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` set to a true value, as `huggingface_hub` reads
    it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@functools.cache
def _hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the Hub answers; otherwise why not (HF_HUB_OFFLINE, or the probe's error). One quick HTTPS request
    to the Hub's API (``HF_ENDPOINT``, proxies from the environment), at most `timeout` seconds."""
    if _user_offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # the Hub answered (e.g. 429): it is reachable
    except (OSError, ValueError) as error:  # URLError, timeouts, DNS failures, a malformed HF_ENDPOINT
        reason = getattr(error, "reason", None) or error
        return f"the Hugging Face Hub ({endpoint}) is not reachable: {reason}"


def _hub_reachable(timeout: float = 3.0) -> bool:
    return _hub_unreachable_reason(timeout) is None


def _go_offline() -> None:
    # nothing below should try the network again (and wait for it)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def _pick_backbone(requested: str | None) -> tuple[str, str | None]:
    if not requested or requested in RANDOM_BACKBONES or Path(requested).exists():
        return requested or DEFAULT_BACKBONE, None
    reason = _hub_unreachable_reason()
    if reason is None:
        return requested, None
    _go_offline()
    return (
        DEFAULT_BACKBONE,
        f"{reason}; cannot download the backbone {requested!r}. Falling back to the offline default "
        f"{DEFAULT_BACKBONE} (a randomly initialised ViT, not a pretrained one).",
    )


def _pick_data(requested: str | None) -> tuple[str, str | None]:
    if not requested or requested == "synthetic" or Path(requested).exists():
        return requested or "synthetic", None
    reason = _hub_unreachable_reason()
    if reason is None:
        return requested, None
    _go_offline()
    return (
        "synthetic",
        f"{reason}; cannot download the dataset {requested!r}. Falling back to the generated synthetic scenes "
        "(not real data).",
    )


def _write_overlays(model_dir: Path, args: TrainingArguments, output_dir: Path, count: int = 4) -> list[Path]:
    from transformers import AutoModel

    import hf_useg  # noqa: F401

    from .image_processing import UnsupervisedSegmentationImageProcessor
    from .visualization import color_palette, colorize, overlay, side_by_side

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = UnsupervisedSegmentationImageProcessor.from_pretrained(model_dir)
    _, val, num_classes, class_names = load_splits(args)
    palette = color_palette(max(num_classes, model.config.num_labels))
    paths = []
    for index in range(min(count, len(val))):
        example = val[index]
        encoded = processor(example["image"], segmentation_maps=example["label"], return_tensors="pt")
        prediction = model.predict(encoded["pixel_values"]).cluster_log_probs.argmax(1)[0].numpy()
        # show clusters in the colour of the class they were matched to
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        class_ids = {name: i for i, name in enumerate(class_names)}
        mapped = np.array([class_ids.get(name, -1) for name in names])[prediction]
        mean = np.asarray(processor.image_mean)[:, None, None]
        std = np.asarray(processor.image_std)[:, None, None]
        image = ((encoded["pixel_values"][0].numpy() * std + mean).clip(0, 1) * 255).round().astype(np.uint8)
        image = image.transpose(1, 2, 0)
        labels = encoded["labels"][0].numpy()
        labels = np.where(labels < num_classes, labels, -1)
        figure = side_by_side(image, overlay(image, mapped, palette, alpha=0.75), colorize(labels, palette))
        path = output_dir / f"overlay_{index}.png"
        figure.resize((figure.width * 3, figure.height * 3), resample=0).save(path)
        paths.append(path)
    return paths


def run_demo(output_dir: str | os.PathLike = "demo_output", steps: int | None = None) -> dict:
    """Run the main job and print a summary; returns the STEGO and k-means summaries."""
    output_dir = Path(output_dir)
    notes = []
    backbone, note = _pick_backbone(os.environ.get("BACKBONE"))
    if note:
        notes.append(note)
    data, note = _pick_data(os.environ.get("DATA"))
    if note:
        notes.append(note)
    if not os.environ.get("BACKBONE") and not os.environ.get("DATA"):
        notes.append(
            "offline defaults (no BACKBONE/DATA given); e.g. BACKBONE=facebook/dino-vits8 DATA=<hub id or folder> "
            "NUM_CLASSES=<n> make demo uses a pretrained DINO and real data"
        )
    for line in notes:
        print(f"[hf_useg demo] {line}", flush=True)
    synthetic = data == "synthetic"
    real_backbone = backbone not in RANDOM_BACKBONES
    resolution = 64 if synthetic and not real_backbone else 224
    common = dict(
        dataset=data,
        backbone=backbone,
        num_classes=None if synthetic else int(os.environ.get("NUM_CLASSES", "0")) or None,
        resolution=resolution,
        eval_resolution=resolution if synthetic else 320,
        seed=0,
        max_val_images=None if synthetic else 100,
        synthetic_num_images=96,
        synthetic_num_classes=4,
        synthetic_image_size=64 if resolution == 64 else 256,
        eval_batch_size=16,
        overwrite_output_dir=True,  # a rerun of the demo replaces the previous one
    )
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(
        f"[hf_useg demo] backbone: {backbone}{'' if real_backbone else ' (randomly initialised ViT, offline default)'}"
    )
    print(f"[hf_useg demo] data: {'generated synthetic scenes (not real data)' if synthetic else data}")

    stego_args = load_training_arguments(
        None,
        method="stego",
        output_dir=str(output_dir / "stego"),
        max_steps=steps or (150 if synthetic else 500),
        batch_size=16,
        val_every=50,
        save_every=50,
        model={"dim": 32 if not real_backbone else 70, "pointwise": True},
        cache_backbone_features=True,
        **common,
    )
    stego = train(stego_args)
    kmeans_args = load_training_arguments(None, method="dino_kmeans", output_dir=str(output_dir / "kmeans"), **common)
    kmeans = train(kmeans_args)

    overlays = _write_overlays(Path(stego["model_dir"]), stego_args, output_dir)
    table = stego.pop("per_class_table", "")
    kmeans.pop("per_class_table", None)
    (output_dir / "summary.json").write_text(json.dumps({"stego": stego, "dino_kmeans": kmeans}, indent=2))
    print()
    print("=" * 78)
    print("hf_useg demo summary")
    print("=" * 78)
    for line in notes:
        print(f"note: {line}")
    print(f"data:     {stego['dataset']}")
    print(f"backbone: {stego['backbone']}")
    print(f"STEGO:    {stego['steps']} steps in {stego['train_seconds']} s")
    print(table)
    print()
    print(f"{'method':<24}{'cluster acc':>14}{'cluster mIoU':>14}{'linear mIoU':>14}")
    for name, result in (("STEGO", stego), ("DINO-feature k-means", kmeans)):
        linear = result.get("linear_mean_iou")
        print(
            f"{name:<24}{100 * result.get('cluster_accuracy', float('nan')):>13.1f}%"
            f"{100 * result.get('cluster_mean_iou', float('nan')):>13.1f}%"
            + (f"{100 * linear:>13.1f}%" if linear is not None else f"{'-':>14}")
        )
    print()
    print(f"model folder: {stego['model_dir']} (config.json, model.safetensors, preprocessor_config.json, README.md)")
    print(f"overlays:     {', '.join(str(p) for p in overlays)} (image | prediction | ground truth)")
    print(f"summary:      {output_dir / 'summary.json'}")
    return {"stego": stego, "dino_kmeans": kmeans}
