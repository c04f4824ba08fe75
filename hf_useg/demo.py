"""`make demo`: train STEGO for a short schedule, compare it with the DINO-feature k-means baseline on the same
backbone, and write both model folders, the comparison report of `hf-useg compare` and a summary that says why
each number is what it is.

By default it runs offline: the generated synthetic scenes and a small randomly initialised ViT (both named as
such in the output); the scenes are also written as a folder (``<output_dir>/synthetic-scenes``) that
`hf-useg evaluate` re-scores. ``BACKBONE=facebook/dino-vits8`` (a Hub id or a local folder) and
``DATA=<hub id or folder>`` (with ``NUM_CLASSES``) switch to real ones, with the same report. A Hub id is
downloaded when the Hub answers a quick probe (a few seconds at most); when it does not, or when the user set
``HF_HUB_OFFLINE=1``, the demo says so and falls back to the offline default.

STEGO is trained the way the README tells users to on a backbone that is not DINO: its positive shifts calibrated
to the backbone (``--calibrate_shifts true``; on the random ViT the released COCO-Stuff shifts collapse the code,
see `hf-useg diagnose stego`), and its cluster probe initialised by k-means of the first batch's code
(``--cluster_probe_init kmeans``; from N(0, 1) centroids the probe can leave a class without a centroid).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import shlex
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from .training import RANDOM_BACKBONES, TrainingArguments, load_training_arguments, train

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


# The offline default: generated scenes of 4 classes at 64 px on the random ViT (patch 8: 8x8 patches an image).
SYNTHETIC_CLASSES = 4
SYNTHETIC_TRAIN_IMAGES = 96
# STEGO within two points of mIoU of the baseline "matches" it (a few dozen evaluation images: closer is noise);
# the linear probe that close to the cluster probe means the clustering left little of the code unused
MATCH_TOLERANCE = 0.02
# calibrated shifts this far above the released COCO-Stuff ones (0.12 / 0.20) put most feature pairs above them
RELEASED_SHIFT_MARGIN = 0.2
# the re-score of the saved folder must give the training's final numbers (up to float noise of another batch size)
RESCORE_TOLERANCE = 1e-4


def _uses_released_shifts(backbone: str) -> bool:
    """Whether STEGO's released shifts fit the backbone: they were tuned on DINO (v1) ViTs; any other backbone
    gets calibrated shifts (the README's advice, ``--calibrate_shifts true``)."""
    return "dino-vit" in backbone.lower()


def _synthetic_val_images(args: TrainingArguments) -> int:
    return max(8, args.synthetic_num_images // 4)  # the val split `load_splits` generates for "synthetic"


def _save_demo_data(args: TrainingArguments, folder: Path) -> Path:
    """The generated train and val scenes of ``args`` (the generator and seeds `load_splits` uses) as an
    images/labels folder pair with ``classes.json``, which `hf-useg evaluate` and `hf-useg compare` read."""
    from .data import save_synthetic_scenes

    common = dict(image_size=args.synthetic_image_size, num_classes=args.synthetic_num_classes)
    save_synthetic_scenes(folder, args.synthetic_num_images, seed=args.seed, split="train", **common)
    save_synthetic_scenes(folder, _synthetic_val_images(args), seed=args.seed + 1, split="val", **common)
    return folder


def _write_report(
    model_dirs: list[str], dataset: str, split: str, num_classes: int | None, report_dir: Path
) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """`hf-useg compare` of the demo's models (the command itself, so the report is the one a user gets):
    ``(report.md, its results.json "models" entries, the command's arguments)``."""
    from .cli import build_parser, cmd_compare

    argv = ["compare", *model_dirs, "--dataset", dataset, "--split", split, "--output-dir", str(report_dir)]
    if num_classes:
        argv += ["--num-classes", str(num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):  # its one JSON line; the demo prints its own summary
        cmd_compare(build_parser().parse_args([*argv, "--quiet"]))
    record = json.loads((report_dir / "results.json").read_text())
    return report_dir / "report.md", record["models"], argv


def _command(argv: list[str]) -> str:
    return "hf-useg " + " ".join(shlex.quote(str(part)) for part in argv)


def _validations(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, val/cluster_mean_iou)`` of a run's periodic validations (``metrics.jsonl``)."""
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    key = "val/cluster_mean_iou"
    return [(int(line["step"]), float(line[key])) for line in lines if key in line]


def _last_logged(run_dir: Path, key: str) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line.strip()]
    values = [value for value in values if value is not None]
    return float(values[-1]) if values else None


def _border_error_share(
    model_dir: str, dataset: str, split: str, num_classes: int, assignment: list[int], radius: int
) -> float | None:
    """The share of a model's wrongly classified pixels (cluster probe, after its matching ``assignment``) that lie
    within ``radius`` pixels of a class border of the label map, over the whole split; None without errors."""
    import torch.nn.functional as F
    from transformers import AutoModel

    from .data import load_segmentation_dataset
    from .image_processing import UnsupervisedSegmentationImageProcessor, as_protocol_processor
    from .report import matched_prediction, predict_examples

    images = load_segmentation_dataset(dataset, split, num_classes=num_classes)
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = as_protocol_processor(UnsupervisedSegmentationImageProcessor.from_pretrained(model_dir))
    examples = predict_examples(model, images, processor, num_classes, num_examples=len(images))
    errors = near_border = 0
    for label, clusters in zip(examples.labels, examples.predictions):
        label = torch.as_tensor(label)
        edge = torch.zeros_like(label, dtype=torch.bool)
        for dim in (0, 1):
            step = label.diff(dim=dim) != 0
            edge.narrow(dim, 0, step.shape[dim]).logical_or_(step)
            edge.narrow(dim, 1, step.shape[dim]).logical_or_(step)
        near = F.max_pool2d(edge[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
        wrong = (torch.as_tensor(matched_prediction(clusters, assignment)) != label) & (label >= 0)
        errors += int(wrong.sum())
        near_border += int((wrong & near).sum())
    return near_border / errors if errors else None


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _explain_kmeans(kmeans: dict[str, Any], context: dict[str, Any]) -> str:
    miou = _percent(kmeans.get("cluster_mean_iou"))
    if context["synthetic"] and not context["real_backbone"]:
        border = context.get("kmeans_border_errors")
        misses = (
            f"{100 * border:.0f}% of the pixels it gets wrong lie within half a patch ({context['patch'] // 2} px) "
            "of a cell border"
            if border is not None
            else "it gets no pixel wrong"
        )
        return (
            f"k-means scores {miou} with no training because the generated scenes' classes differ by flat colour and "
            f"stripes, which even a randomly initialised ViT's patch features keep apart; {misses}, where a grid of "
            f"{context['grid']} patches per image cannot follow the cells."
        )
    kind = "randomly initialised " if not context["real_backbone"] else ""
    return (
        f"k-means scores {miou} with no training: it clusters the frozen patch features of the {kind}backbone "
        f"{context['backbone']} into {kmeans.get('num_classes')} groups, so the number is how far those features "
        "alone separate the classes."
    )


def _explain_stego(stego: dict[str, Any], kmeans: dict[str, Any], context: dict[str, Any]) -> str:
    score, baseline = stego.get("cluster_mean_iou", float("nan")), kmeans.get("cluster_mean_iou", float("nan"))
    difference = score - baseline
    if abs(difference) <= MATCH_TOLERANCE:
        outcome = "separates the classes as well as the raw features do: it matches the k-means baseline"
        outcome += f" ({_percent(baseline)})"
    elif difference > 0:
        outcome = "separates the classes better than the raw features do: it beats the k-means baseline"
        outcome += f" by {100 * difference:.1f} points"
    else:
        outcome = f"trails the k-means baseline by {100 * -difference:.1f} points"
    if context["calibrated"]:
        intra, inter = context["pos_intra_shift"], context["pos_inter_shift"]
        released = (
            "sit far below them and pull every code together"
            if min(intra, inter) > 0.2 + RELEASED_SHIFT_MARGIN
            else "were tuned on DINO's"
        )
        shifts = (
            f"the positive shifts calibrated to this backbone's median feature correlations ({intra:.2f} / "
            f"{inter:.2f}; the released COCO-Stuff 0.12 / 0.20 {released}"
        )
        if context.get("neg_code_correlation") is not None:
            shifts += f"; these leave random image pairs at code correlation {context['neg_code_correlation']:.2f}"
        shifts += ")"
    else:
        shifts = "STEGO's released shifts (tuned on DINO)"
    linear = stego.get("linear_mean_iou")
    ceiling = ""
    if linear is not None:
        ceiling = f"; the linear probe trained with labels on the same code reaches {_percent(linear)}"
        if abs(linear - score) <= MATCH_TOLERANCE:
            ceiling += ", so little is left for any clustering of this code to gain"
    return (
        f"STEGO scores {_percent(score)}: its {context['dim']}-dimensional code, trained for {stego.get('steps')} "
        f"steps on the same frozen features with {shifts} and a cluster probe started from k-means of the code, "
        f"{outcome}{ceiling}."
    )


def _explain_folders(stego_dir: Path, stego: dict[str, Any]) -> str:
    """Which STEGO folder holds which weights, and why the reported numbers are the last step's."""
    steps = stego.get("steps")
    best = stego_dir / "best" / "best_metrics.json"
    if not best.exists():
        return f"{stego_dir / 'model'} holds the weights after the last step ({steps}), the ones scored above."
    best_step = json.loads(best.read_text())["step"]
    validations = dict(_validations(stego_dir))
    if best_step == steps:
        return (
            f"{stego_dir / 'model'} holds the weights after the last step ({steps}), the ones scored above; "
            f"{stego_dir / 'best'} is the same step (its best periodic validation)."
        )
    return (
        f"{stego_dir / 'model'} holds the weights after the last step ({steps}), the ones scored above; "
        f"{stego_dir / 'best'} holds step {best_step}'s, whose periodic validation (no flip TTA) scored "
        f"{_percent(validations.get(best_step))} against {_percent(validations.get(steps))} for the last step on the "
        "same images: picked by looking at the evaluation images themselves, it is kept for inspection but not "
        "reported as the result."
    )


def run_demo(
    output_dir: str | os.PathLike = "demo_output", steps: int | None = None, *, synthetic_images: int | None = None
) -> dict[str, Any]:
    """Run the main job and print a summary; returns what ``summary.json`` holds.

    Args:
        output_dir: where the model folders (``stego/``, ``kmeans/``), the generated data (``synthetic-scenes/``),
            the report (``report/``) and ``summary.json`` go; a rerun replaces them.
        steps: STEGO's training steps (default: 150 on the generated scenes, 500 on real data).
        synthetic_images: training images of the generated scenes (default 96; the val split is a quarter, at
            least 8).
    """
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
    num_classes = None if synthetic else int(os.environ.get("NUM_CLASSES", "0")) or None
    common = dict(
        dataset=data,
        backbone=backbone,
        num_classes=num_classes,
        resolution=resolution,
        eval_resolution=resolution if synthetic else 320,
        seed=0,
        max_val_images=None if synthetic else 100,
        synthetic_num_images=synthetic_images or SYNTHETIC_TRAIN_IMAGES,
        synthetic_num_classes=SYNTHETIC_CLASSES,
        synthetic_image_size=64 if resolution == 64 else 256,
        eval_batch_size=16,
        overwrite_output_dir=True,  # a rerun of the demo replaces the previous one
    )
    calibrated = not _uses_released_shifts(backbone)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(
        f"[hf_useg demo] backbone: {backbone}{'' if real_backbone else ' (randomly initialised ViT, offline default)'}"
    )
    print(f"[hf_useg demo] data: {'generated synthetic scenes (not real data)' if synthetic else data}")

    dim = 70 if real_backbone else 32
    stego_args = load_training_arguments(
        None,
        method="stego",
        output_dir=str(output_dir / "stego"),
        max_steps=steps or (150 if synthetic else 500),
        batch_size=16,
        val_every=50,
        save_every=50,
        model={"dim": dim, "pointwise": True},
        cache_backbone_features=True,
        calibrate_shifts=calibrated,
        cluster_probe_init="kmeans",
        **common,
    )
    if synthetic:
        data_dir = _save_demo_data(stego_args, output_dir / "synthetic-scenes")
        eval_dataset, split, images = str(data_dir), "val", _synthetic_val_images(stego_args)
    else:
        eval_dataset, split, images = data, stego_args.val_split, None
    stego = train(stego_args)
    kmeans_args = load_training_arguments(None, method="dino_kmeans", output_dir=str(output_dir / "kmeans"), **common)
    kmeans = train(kmeans_args)
    stego.pop("per_class_table", None)
    kmeans.pop("per_class_table", None)

    # the comparison report, re-scoring both saved models from the data a user can point hf-useg at
    print("[hf_useg demo] writing the comparison report (hf-useg compare)", flush=True)
    model_dirs = [stego["model_dir"], kmeans["model_dir"]]
    report, reported, compare_argv = _write_report(model_dirs, eval_dataset, split, num_classes, output_dir / "report")
    differences = [
        abs(entry["summary"][key] - result[key])
        for entry, result in zip(reported, (stego, kmeans))
        for key in ("cluster_accuracy", "cluster_mean_iou", "linear_accuracy", "linear_mean_iou")
        if key in entry["summary"] and key in result
    ]
    reproduced = max(differences, default=float("inf")) <= RESCORE_TOLERANCE
    evaluate_argv = ["evaluate", stego["model_dir"], "--dataset", eval_dataset, "--split", split]
    if num_classes:
        evaluate_argv += ["--num-classes", str(num_classes)]
    evaluate_argv += ["--output-dir", str(output_dir / "eval" / "stego")]
    images = images or reported[0]["protocol"].get("images")

    stego_config = json.loads((Path(stego["model_dir"]) / "config.json").read_text())
    patch = int(stego_config.get("backbone_config", {}).get("patch_size") or 8)
    grid = common["eval_resolution"] // patch
    context = {
        "synthetic": synthetic,
        "real_backbone": real_backbone,
        "backbone": backbone,
        "calibrated": calibrated,
        "dim": dim,
        "grid": f"{grid}x{grid}",
        "patch": patch,
        "pos_intra_shift": stego_config.get("pos_intra_shift"),
        "pos_inter_shift": stego_config.get("pos_inter_shift"),
        "neg_code_correlation": _last_logged(output_dir / "stego", "train/code_corr_neg_mean"),
    }
    if synthetic and not real_backbone:
        context["kmeans_border_errors"] = _border_error_share(
            kmeans["model_dir"],
            eval_dataset,
            split,
            SYNTHETIC_CLASSES,
            reported[1]["results"]["cluster"]["assignment"],
            radius=patch // 2,
        )
    why = {"stego": _explain_stego(stego, kmeans, context), "dino_kmeans": _explain_kmeans(kmeans, context)}
    folders = _explain_folders(output_dir / "stego", stego)
    setup = {
        "data": stego["dataset"],
        "backbone": stego["backbone"],
        "split": split if not synthetic else f"val (generated with seed {stego_args.seed + 1})",
        "images": images,
        "resolution": common["eval_resolution"],
        "seed": stego_args.seed,
        "stego_options": {"calibrate_shifts": calibrated, "cluster_probe_init": "kmeans", "dim": dim},
    }
    if synthetic:
        setup["train_images"] = stego_args.synthetic_num_images
        setup["data_folder"] = eval_dataset
    record = {
        "setup": setup,
        "stego": {**stego, "why": why["stego"]},
        "dino_kmeans": {**kmeans, "why": why["dino_kmeans"]},
        "folders": {
            "stego_model": stego["model_dir"],
            "stego_best": str(output_dir / "stego" / "best"),
            "kmeans_model": kmeans["model_dir"],
            "explanation": folders,
        },
        "report": str(report),
        "compare_command": _command(compare_argv),
        "evaluate_command": _command(evaluate_argv),
        "rescored": {"reproduced": reproduced, "max_difference": max(differences, default=None)},
    }
    (output_dir / "summary.json").write_text(json.dumps(record, indent=2))

    print()
    print("=" * 78)
    print("hf_useg demo summary")
    print("=" * 78)
    for line in notes:
        print(f"note: {line}")
    print(f"data:      {stego['dataset']}")
    if synthetic:
        print(
            f"           train {setup['train_images']} images (seed {stego_args.seed}), val {images} images "
            f"(seed {stego_args.seed + 1}), {stego_args.synthetic_image_size}x{stego_args.synthetic_image_size} px, "
            f"{SYNTHETIC_CLASSES} classes; saved in {eval_dataset}"
        )
    print(f"backbone:  {stego['backbone']}")
    print(
        f"evaluated: {split} split, {images} images at {common['eval_resolution']} px, flip TTA, Hungarian matching"
        f" (seed {stego_args.seed}); STEGO {stego['steps']} steps in {stego['train_seconds']} s"
    )
    print()
    print(f"{'method':<24}{'cluster acc':>14}{'cluster mIoU':>14}{'linear mIoU':>14}")
    for name, result in (("STEGO", stego), ("k-means baseline", kmeans)):
        print(
            f"{name:<24}{_percent(result.get('cluster_accuracy')):>14}{_percent(result.get('cluster_mean_iou')):>14}"
            f"{_percent(result.get('linear_mean_iou')):>14}"
        )
    print()
    print(f"why STEGO:   {why['stego']}")
    print(f"why k-means: {why['dino_kmeans']}")
    print(f"folders:     {folders}")
    print()
    print(f"report:      {report} (also report.html: table, per-class IoU, confusion matrices, examples)")
    print(f"             the same as: {_command(compare_argv)}")
    print(f"re-score:    {_command(evaluate_argv)}")
    if reproduced:
        print("             (the report re-scored both saved models from that data: the numbers above, unchanged)")
    else:
        print(
            f"             warning: re-scoring the saved models gave numbers up to {max(differences, default=0):.2g} "
            "away from the training's final evaluation"
        )
    print(f"summary:     {output_dir / 'summary.json'}")
    return record
