#!/usr/bin/env python
"""The like-for-like CamVid table (issue 14): every method trained on the same split and scored on the same
held-out split with one protocol, over several seeds.

    python benchmarks/camvid_table.py --seeds 0 1 --output-dir outputs/camvid-table
    python benchmarks/camvid_table.py --quick --methods kmeans --output-dir /tmp/camvid-table-quick   # ~1-3 min

For each seed ``s`` (every training run gets ``--seed s``):

1. DINO self-supervised pretraining of the backbone on the training split with the recipe of ``--pretrain-config``
   (default ``training/configs/dino_pretrain_camvid.yaml``, read as it is at run time; ``--pretrained-backbone DIR``
   reuses one backbone for every seed instead);
2. for each backbone — randomly initialised (the architecture named by the DINO config's ``backbone:``, e.g.
   ``random-vit-dino-tiny-16``, initialised with seed ``s``) and self-trained (the DINO teacher of step 1) —
   DINO-feature k-means (``dino_kmeans_camvid.yaml``), STEGO (``stego_camvid.yaml``) and PiCIE
   (``picie_camvid.yaml``). With the same seed, the random-init ViT is the very network the DINO pretraining of
   that seed starts from (``train.py`` seeds the model build with ``--seed``), so the two arms are a before/after
   pair;
3. IIC from scratch (``iic_camvid.yaml``: its own network, no backbone).

Each run is ``training/train.py --config <recipe>`` in a subprocess with the run's seed, backbone, output folder, the
dataset and training split of this command, no validation split (training never sees the evaluation images), and
the schedule overrides of `FULL_OVERRIDES` (the recipes' own schedules are sized for a GPU; everything else is the
recipe's). Every model is then scored by ``hf-useg evaluate`` on the whole evaluation split with one protocol: the
image's shorter side resized to ``--eval-resolution`` (default 320) and center-cropped to a square, so every
method's labels are scored on the same pixels at the same size; horizontal-flip TTA; the cluster probe with
Hungarian matching; the linear probe where the model has one (STEGO; "—" elsewhere).

Writes into ``--output-dir``:

* ``table.md``: the header (split, image count, resolution, seeds, backbone, recipes and overrides, run time,
  machine), the main table (method x backbone; cluster and linear accuracy / mIoU, mean ± spread over seeds) and
  the per-class IoU table (cluster probe, mean over seeds);
* ``table.json``: every number (per seed and aggregated), the exact commands, the time of each step and in total,
  the machine (CPU count, torch threads, load average);
* ``seed<s>/<run>/`` the training output folders (``model/``, checkpoints, ``metrics.jsonl``) with the evaluation
  in ``eval-<split>-<resolution>px/``, and ``seed<s>/logs/`` every command's log;
* ``comparison-seed<s>/``: ``hf_useg.report.write_comparison_report`` of the first seed's models (per-class IoU and
  confusion figures; skip with ``--no-figure``).

Finished runs and evaluations in ``--output-dir`` are reused, unfinished ones resumed from their last checkpoint,
so an interrupted table continues where it stopped; a run made by another command is an error (choose another
``--output-dir``; a recipe file edited since a run was made is one too). Independent runs go ``--jobs`` at a time
(default 2, with ``--threads`` = CPUs / jobs torch threads each: one per run on 2 cores, which avoids the
oversubscription `detreg_raccoon_experiment.py` saw with two threads per process on a shared machine).

Run time (2 seeds: 16 runs and 14 evaluations): about 45 min on 2 otherwise idle CPU cores, estimated from each run's
time measured with one thread at load average 3-6 (DINO pretraining 3.5 min, k-means 1 min, STEGO 600 steps 5 min,
PiCIE 3 epochs 8.5 min, IIC 0.5-2 min, each evaluation 0.5 min, IIC's 1.2 min); expect about 1 h on a machine
shared with other work. ``--quick`` took 2.5 min (``--methods kmeans``) and 5.5 min (everything) at load 5-8.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
DEFAULT_DATASET = ROOT.parent / "shared" / "data" / "camvid11"
DEFAULT_PRETRAIN_CONFIG = CONFIGS / "dino_pretrain_camvid.yaml"

METHODS = ("kmeans", "stego", "stego-kmeans-start", "picie", "iic")
# the methods that take a backbone (IIC trains its own trunk)
BACKBONE_METHODS = ("kmeans", "stego", "stego-kmeans-start", "picie")
BACKBONES = ("random", "self-trained")
METHOD_CONFIGS = {
    "kmeans": CONFIGS / "dino_kmeans_camvid.yaml",
    "stego": CONFIGS / "stego_camvid.yaml",
    "stego-kmeans-start": CONFIGS / "stego_camvid.yaml",
    "picie": CONFIGS / "picie_camvid.yaml",
    "iic": CONFIGS / "iic_camvid.yaml",
}
METHOD_NAMES = {
    "kmeans": "DINO-feature k-means",
    "stego": "STEGO",
    "stego-kmeans-start": "STEGO, cluster probe started by k-means",
    "picie": "PiCIE",
    "iic": "IIC",
}
BACKBONE_NAMES = {"random": "random init", "self-trained": "self-trained (DINO)", "none": "none (from scratch)"}
DASH = "—"

# Schedule overrides of the full table (on top of each recipe file): the recipes' own schedules are sized for a GPU
# (STEGO 2000 steps, PiCIE 20 epochs at 320 px). STEGO: the 600-step CPU setting of stego_camvid.yaml's comment
# (cached backbone features, shifts calibrated to the backbone); PiCIE: 3 epochs at 224 px (its final re-clustering
# stays at the recipe's eval_resolution); k-means fitted at 224 px like them. IIC and the DINO pretraining run their
# recipe files unchanged.
FULL_OVERRIDES: dict[str, list[str]] = {
    "pretrain": [],
    # k-means is fitted at the resolution STEGO and PiCIE train at (its recipe fits at its eval resolution, 320)
    "kmeans": "--resolution 224".split(),
    "stego": "--max_steps 600 --cache_backbone_features true --calibrate_shifts true".split(),
    # STEGO's cluster probe started from k-means of the first batch's code instead of N(0, 1) (issue 14, item 4)
    "stego-kmeans-start": (
        "--max_steps 600 --cache_backbone_features true --calibrate_shifts true --cluster_probe_init kmeans"
    ).split(),
    "picie": "--num_epochs 3 --resolution 224".split(),
    "iic": [],
}
# --quick: a few steps on a handful of small images, to test the pipeline (the numbers mean nothing; the DINO teacher
# barely leaves its initialisation in 2 steps, so the random-init and self-trained arms come out alike)
QUICK_OVERRIDES: dict[str, list[str]] = {
    "pretrain": "--max_steps 2 --batch_size 4 --global_crops_size 32 --local_crops_size 16".split(),
    "kmeans": "--resolution 64 --eval_resolution 64 --kmeans_iterations 10 --kmeans_init 1".split(),
    "stego": (
        "--max_steps 3 --batch_size 4 --resolution 64 --eval_resolution 64 --cache_backbone_features true "
        "--calibrate_shifts true --knn_k 8 --num_neighbors 3"
    ).split(),
    "stego-kmeans-start": (
        "--max_steps 3 --batch_size 4 --resolution 64 --eval_resolution 64 --cache_backbone_features true "
        "--calibrate_shifts true --knn_k 8 --num_neighbors 3 --cluster_probe_init kmeans"
    ).split(),
    "picie": (
        "--num_epochs 1 --batch_size 4 --resolution 64 --eval_resolution 64 --cluster_batch_size 8 "
        "--kmeans_init_batches 1"
    ).split(),
    "iic": "--max_steps 3 --batch_size 4".split(),
}
QUICK_EVAL_RESOLUTION = 64
QUICK_MAX_TRAIN_IMAGES = 16
QUICK_MAX_EVAL_IMAGES = 8
DEFAULT_EVAL_RESOLUTION = 320
LOG_TAIL_LINES = 40


class TableError(RuntimeError):
    """A mistake in the setup or a failed step: reported as one message (with the log's tail), exit status 1."""


# ----------------------------------------------------------------------------------------------------------------
# aggregation and formatting (pure functions: tested on hand-made result dicts)


def mean_and_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, spread)`` of one number over seeds: the spread is half the range for 2 seeds, the sample standard
    deviation for 3 or more, and None for 1. NaN values (undefined IoU) are left out; all NaN gives ``(nan, None)``.

    Example:

    ```python
    >>> mean_and_spread([0.50, 0.54])
    (0.52, 0.020000000000000018)
    ```
    """
    finite = [float(value) for value in values if value is not None and not math.isnan(float(value))]
    if not finite:
        return math.nan, None
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, None
    if len(finite) == 2:
        return mean, abs(finite[0] - finite[1]) / 2
    return mean, statistics.stdev(finite)


def spread_description(num_seeds: int) -> str:
    """What the ± of the tables is, for ``num_seeds`` seeds."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    if num_seeds == 1:
        return "one seed: no spread"
    if num_seeds == 2:
        return "mean ± half the range over the 2 seeds"
    return f"mean ± sample standard deviation over the {num_seeds} seeds"


def _row_order(method: str, backbone: str) -> tuple[int, int]:
    order = {name: index for index, name in enumerate((*BACKBONES, "none"))}
    return METHODS.index(method) if method in METHODS else len(METHODS), order.get(backbone, len(order))


def aggregate(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, backbone) from per-seed records.

    A record: ``{"method", "backbone", "seed", "cluster": {"accuracy", "mean_iou", "per_class_iou"},
    "linear": same or None}`` (fractions; per-class NaN or None where undefined). A row: ``{"method", "backbone",
    "seeds", "cluster": probe, "linear": probe or None}`` where a probe is ``{"accuracy": {"mean", "spread",
    "values"}, "mean_iou": {...}, "per_class_iou": [mean over seeds, None where undefined in every seed]}``. The
    linear probe is None unless every seed has one. Rows come in the order of `METHODS`, then random, self-trained.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["method"], record["backbone"]), []).append(record)
    rows = []
    for (method, backbone), group in sorted(groups.items(), key=lambda item: _row_order(*item[0])):
        group = sorted(group, key=lambda record: record["seed"])
        seeds = [record["seed"] for record in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{method} / {backbone}: seed listed twice in {seeds}")
        row: dict[str, Any] = {"method": method, "backbone": backbone, "seeds": seeds}
        for probe in ("cluster", "linear"):
            results = [record.get(probe) for record in group]
            if any(result is None for result in results):
                row[probe] = None
                continue
            row[probe] = {}
            for key in ("accuracy", "mean_iou"):
                values = [float(result[key]) for result in results]
                mean, spread = mean_and_spread(values)
                row[probe][key] = {"mean": mean, "spread": spread, "values": values}
            per_class = zip(*(result["per_class_iou"] for result in results))
            row[probe]["per_class_iou"] = [_none_if_nan(mean_and_spread(list(ious))[0]) for ious in per_class]
        rows.append(row)
    return rows


def _none_if_nan(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def format_cell(statistic: Mapping[str, Any] | None, digits: int = 1) -> str:
    """``"51.9 ± 0.3"`` (percent) from ``{"mean", "spread"}`` fractions; the mean alone without a spread; "—" for
    None (no such probe) or an undefined mean."""
    if statistic is None or statistic.get("mean") is None or math.isnan(statistic["mean"]):
        return DASH
    text = f"{100 * statistic['mean']:.{digits}f}"
    if statistic.get("spread") is not None:
        text += f" ± {100 * statistic['spread']:.{digits}f}"
    return text


def row_label(row: Mapping[str, Any]) -> tuple[str, str]:
    """``(method display name, backbone display name)`` of a row."""
    return METHOD_NAMES.get(row["method"], row["method"]), BACKBONE_NAMES.get(row["backbone"], row["backbone"])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table: method, backbone, cluster acc / mIoU, linear acc / mIoU (percent, mean ± spread), seeds."""
    header = [
        "method",
        "backbone",
        "cluster acc (%)",
        "cluster mIoU (%)",
        "linear acc (%)",
        "linear mIoU (%)",
        "seeds",
    ]
    body = []
    for row in rows:
        cells = list(row_label(row))
        for probe in ("cluster", "linear"):
            values = row.get(probe)
            cells += [format_cell(values and values["accuracy"]), format_cell(values and values["mean_iou"])]
        cells.append(", ".join(str(seed) for seed in row["seeds"]))
        body.append(cells)
    return markdown_table(header, body)


def per_class_table(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> str:
    """The Markdown table of per-class IoU of the cluster probe (percent, mean over seeds): one row per class, one
    column per (method, backbone), then the mIoU row."""
    header = ["class", *(f"{method} / {backbone}" for method, backbone in map(row_label, rows))]
    body = []
    for index, name in enumerate(class_names):
        cells = [name]
        for row in rows:
            ious = row["cluster"]["per_class_iou"]
            if len(ious) != len(class_names):
                raise ValueError(f"{row_label(row)}: {len(ious)} per-class IoUs for {len(class_names)} class names")
            cells.append(DASH if ious[index] is None else f"{100 * ious[index]:.1f}")
        body.append(cells)
    body.append(["mIoU", *(format_cell({"mean": row["cluster"]["mean_iou"]["mean"]}) for row in rows)])
    return markdown_table(header, body)


def format_seconds(seconds: float | None) -> str:
    """``"42 s"``, ``"12.5 min"`` or ``"1 h 03 min"``."""
    if seconds is None:
        return DASH
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def render_markdown(table: Mapping[str, Any]) -> str:
    """``table.md`` from the ``table.json`` record."""
    setup, machine = table["setup"], table["machine"]
    images = table["eval_images"]
    image_text = f"{images['evaluated']} images" + (
        " (the whole split)" if images["evaluated"] == images["split_size"] else f" of {images['split_size']}"
    )
    resolution = setup["eval_resolution"]
    seeds = setup["seeds"]
    lines = [
        "# CamVid: like-for-like table"
        + (" (--quick: a pipeline test, the numbers mean nothing)" if setup["quick"] else ""),
        "",
        f"* **Evaluation**: `{setup['dataset']}` split `{setup['eval_split']}`, {image_text}; the shorter side "
        f"resized to {resolution} px and center-cropped to {resolution} x {resolution} (the labels of every row "
        "scored on the same pixels at that size), horizontal-flip TTA, no CRF, float32; cluster probe: Hungarian "
        "matching of the clusters to the classes on the evaluated images; linear probe: trained with the training "
        f"split's labels (STEGO only, {DASH} elsewhere). `hf-useg evaluate`, percent.",
        f"* **Training**: split `{setup['train_split']}` ({table['train_images']} images), no validation split "
        "(no method sees the evaluation images before it is scored).",
        f"* **Seeds**: {', '.join(map(str, seeds))}; {spread_description(len(seeds))}.",
        f"* **Backbone**: {setup['backbone_architecture']}. Random init: `{setup['random_backbone']}` initialised "
        f"with each run's seed. Self-trained: {setup['self_trained_description']}.",
        "* **Recipes** (`training/train.py --config <file>` + the overrides; schedule overrides for a CPU):",
    ]
    for name, recipe in setup["recipes"].items():
        overrides = " ".join(recipe["overrides"]) or "none"
        lines.append(f"  * {name}: `{recipe['config']}`; overrides: `{overrides}`")
    common = f"--dataset <dataset> --train_split {setup['train_split']} --val_split '' --seed <s> --output_dir <run>"
    if setup.get("max_train_images") is not None:
        common += f" --max_train_images {setup['max_train_images']}"
    lines.append(
        f"  * every run: `{common}`; the segmentation runs `--num_classes` and `--backbone`, STEGO "
        "`--knn_cache_dir <run>/knn_cache` (where its kNN table is kept)"
    )
    timing = table["timing"]
    lines.append(
        f"* **Run time**: {format_seconds(timing['total_seconds'])} for this command"
        + (
            f" ({timing['reused_steps']} finished steps reused; all steps' own times add up to "
            f"{format_seconds(timing['steps_seconds'])})"
            if timing["reused_steps"]
            else f" (the steps' own times add up to {format_seconds(timing['steps_seconds'])})"
        )
        + f"; {machine['cpu_count']} CPUs, {setup['jobs']} run(s) at a time x {setup['threads']} torch thread(s), "
        f"load average {machine['load_average_start'][0]:.2f} at the start, {machine['load_average_end'][0]:.2f} "
        "at the end."
    )
    lines += [
        "",
        "## Results (%)",
        "",
        main_table(table["rows"]),
        "",
        f"Accuracy and mIoU in percent, {spread_description(len(seeds))}; {DASH}: the model has no linear probe.",
        "",
        "## Per-class IoU, cluster probe (%, mean over seeds)",
        "",
        per_class_table(table["rows"], table["class_names"]),
        "",
        f"{DASH}: the IoU is undefined in every seed (the class is in neither the labels nor the matched clusters).",
    ]
    if table.get("comparison_report"):
        lines += [
            "",
            f"Figures of seed {seeds[0]}'s models (per-class IoU, confusion matrices): "
            f"`{table['comparison_report']}`.",
        ]
    lines += ["", f"Every number, command and step time: `table.json`. Command: `{table['command']}`", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    parser.add_argument("--output-dir", default="outputs/camvid-table")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="images/<split> + labels/<split> folder")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--num-classes", type=int, default=11)
    parser.add_argument(
        "--eval-resolution",
        type=int,
        default=None,
        help=f"side of the evaluated center crop for every model (default {DEFAULT_EVAL_RESOLUTION}; "
        f"--quick: {QUICK_EVAL_RESOLUTION})",
    )
    parser.add_argument("--pretrain-config", default=str(DEFAULT_PRETRAIN_CONFIG), help="the DINO pretraining recipe")
    parser.add_argument(
        "--pretrained-backbone",
        default=None,
        metavar="DIR",
        help="reuse this self-trained backbone folder for every seed instead of pretraining",
    )
    parser.add_argument(
        "--random-backbone",
        default=None,
        help="RANDOM_BACKBONES name of the random-init arm (default: the DINO config's backbone:)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--quick", action="store_true", help="a few steps on a few small images (pipeline test)")
    parser.add_argument("--max-train-images", type=int, default=None, help=f"--quick: {QUICK_MAX_TRAIN_IMAGES}")
    parser.add_argument("--max-eval-images", type=int, default=None, help=f"--quick: {QUICK_MAX_EVAL_IMAGES}")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: 2, or 1 on one CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: CPUs / jobs)")
    parser.add_argument("--no-figure", action="store_true", help="skip the comparison report of the first seed")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments, filling the --quick and machine-dependent defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    args.methods = [method for method in METHODS if method in args.methods]
    args.backbones = [backbone for backbone in BACKBONES if backbone in args.backbones]
    if args.eval_resolution is None:
        args.eval_resolution = QUICK_EVAL_RESOLUTION if args.quick else DEFAULT_EVAL_RESOLUTION
    if args.quick:
        args.max_train_images = args.max_train_images or QUICK_MAX_TRAIN_IMAGES
        args.max_eval_images = args.max_eval_images or QUICK_MAX_EVAL_IMAGES
    for name in ("num_classes", "eval_resolution", "max_train_images", "max_eval_images", "eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    cpus = os.cpu_count() or 1
    args.jobs = args.jobs if args.jobs is not None else min(2, cpus)
    args.threads = args.threads if args.threads is not None else max(1, cpus // args.jobs)
    if args.pretrained_backbone is not None and not (Path(args.pretrained_backbone) / "config.json").is_file():
        parser.error(f"--pretrained-backbone {args.pretrained_backbone}: no backbone folder (no config.json there)")
    if not Path(args.pretrain_config).is_file():
        parser.error(f"--pretrain-config {args.pretrain_config}: no such file")
    dataset = Path(args.dataset).expanduser()
    if dataset.exists() or args.dataset.startswith((".", "/", "~")) or args.dataset.count("/") != 1:
        if not dataset.is_dir():
            parser.error(f"--dataset {args.dataset}: no such folder")
        args.dataset = str(dataset.resolve())
    return args


# ----------------------------------------------------------------------------------------------------------------
# the steps


@dataclasses.dataclass
class Step:
    """One training run (``kind`` "pretrain" or "train") and, for a segmentation model, its evaluation."""

    name: str
    kind: str
    config: Path
    seed: int
    method: str | None
    backbone: str | None
    run_dir: Path
    train_command: list[str]
    eval_command: list[str] | None
    eval_dir: Path | None
    log_dir: Path
    depends: tuple[str, ...] = ()

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def _load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise TableError(f"{path}: a training config must be a mapping of options")
    return loaded


def backbone_architecture(random_backbone: str, pretrained_backbone: str | None) -> tuple[str, int]:
    """``(description, patch size)`` of the random-init backbone ``random_backbone`` (a `RANDOM_BACKBONES` name);
    when a ``pretrained_backbone`` folder is given, it must have the same shape."""
    from hf_useg.training.data import RANDOM_BACKBONES

    if random_backbone not in RANDOM_BACKBONES:
        raise TableError(
            f"the random-init backbone {random_backbone!r} is not a RANDOM_BACKBONES name "
            f"({sorted(RANDOM_BACKBONES)}): give --random-backbone"
        )
    shape = RANDOM_BACKBONES[random_backbone]
    if shape.get("model_type", "vit") != "vit":
        raise TableError(f"--random-backbone {random_backbone!r} is not a ViT (the DINO pretraining trains a ViT)")
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    if pretrained_backbone is not None:
        config = json.loads((Path(pretrained_backbone) / "config.json").read_text())
        theirs = {key: config.get(key) for key in keys}
        ours = {key: shape[key] for key in keys}
        if theirs != ours:
            raise TableError(
                f"--pretrained-backbone {pretrained_backbone} is {theirs}, the random-init arm {random_backbone} is "
                f"{ours}: give --random-backbone with the same shape"
            )
    description = (
        f"ViT, {shape['hidden_size']} wide, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} "
        f"heads, patch {shape['patch_size']} (`{random_backbone}`)"
    )
    return description, int(shape["patch_size"])


def eval_folder_name(split: str, resolution: int, max_images: int | None) -> str:
    return f"eval-{split}-{resolution}px" + (f"-first{max_images}" if max_images else "")


def _make_step(
    args: argparse.Namespace,
    output_dir: Path,
    seed: int,
    name: str,
    config: Path,
    extra: Sequence[str],
    method: str | None = None,
    backbone: str | None = None,
    depends: Sequence[str] = (),
) -> Step:
    """One ``training/train.py`` run into ``<output_dir>/seed<seed>/<name>``, evaluated unless it is the DINO
    pretraining (``method`` None)."""
    seed_dir = output_dir / f"seed{seed}"
    run_dir = seed_dir / name
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(config)]
    command += ["--dataset", args.dataset, "--train_split", args.train_split, "--val_split", ""]
    command += ["--progress", "false", "--resume_from_checkpoint", "latest", "--overwrite_output_dir", "true"]
    if args.max_train_images is not None:
        command += ["--max_train_images", str(args.max_train_images)]
    command += ["--seed", str(seed), "--output_dir", str(run_dir), *extra]
    eval_command = eval_dir = None
    if method is not None:
        eval_dir = run_dir / eval_folder_name(args.eval_split, args.eval_resolution, args.max_eval_images)
        eval_command = [sys.executable, "-m", "hf_useg.cli", "evaluate", str(run_dir / "model")]
        eval_command += ["--dataset", args.dataset, "--split", args.eval_split, "--num-classes", str(args.num_classes)]
        eval_command += ["--resolution", str(args.eval_resolution), "--batch-size", str(args.eval_batch_size)]
        eval_command += ["--dtype", "float32", "--output-dir", str(eval_dir), "--quiet"]
        if args.max_eval_images is not None:
            eval_command += ["--max-images", str(args.max_eval_images)]
    return Step(
        name=f"seed{seed}/{name}",
        kind="pretrain" if method is None else "train",
        config=Path(config),
        seed=seed,
        method=method,
        backbone=backbone,
        run_dir=run_dir,
        train_command=command,
        eval_command=eval_command,
        eval_dir=eval_dir,
        log_dir=seed_dir / "logs",
        depends=tuple(depends),
    )


def plan_steps(args: argparse.Namespace, output_dir: Path, random_backbone: str) -> list[Step]:
    """Every step of the table, in the order they are started: the DINO pretrainings (what is self-trained waits
    for them), then the runs that wait for nothing, then the rest; the longest methods first within each group, so
    that parallel runs end together."""
    overrides = QUICK_OVERRIDES if args.quick else FULL_OVERRIDES
    uses_backbone = any(method in BACKBONE_METHODS for method in args.methods)
    needs_pretraining = uses_backbone and "self-trained" in args.backbones and args.pretrained_backbone is None
    pretrain, segmentation = [], []
    for seed in args.seeds:
        seed_dir = output_dir / f"seed{seed}"
        if needs_pretraining:
            config = Path(args.pretrain_config).resolve()
            pretrain.append(_make_step(args, output_dir, seed, "dino-pretrain", config, overrides["pretrain"]))
        backbone_paths = {"random": random_backbone}
        if args.pretrained_backbone is not None:
            backbone_paths["self-trained"] = str(Path(args.pretrained_backbone).resolve())
        else:
            backbone_paths["self-trained"] = str(seed_dir / "dino-pretrain" / "backbone")
        for method in ("picie", "stego", "stego-kmeans-start", "kmeans", "iic"):
            if method not in args.methods:
                continue
            config, extra = METHOD_CONFIGS[method], ["--num_classes", str(args.num_classes), *overrides[method]]
            if method == "iic":  # its own trunk (the recipe's backbone: none)
                segmentation.append(_make_step(args, output_dir, seed, "iic", config, extra, "iic", "none"))
                continue
            for backbone in args.backbones:
                name = f"{method}-{backbone}"
                run_extra = ["--backbone", backbone_paths[backbone], *extra]
                if method.startswith("stego"):  # the recipe's shared .cache/knn would outlive the table
                    run_extra += ["--knn_cache_dir", str(seed_dir / name / "knn_cache")]
                depends = [f"seed{seed}/dino-pretrain"] if backbone == "self-trained" and needs_pretraining else []
                segmentation.append(
                    _make_step(args, output_dir, seed, name, config, run_extra, method, backbone, depends)
                )
    independent = [step for step in segmentation if not step.depends]
    dependent = [step for step in segmentation if step.depends]
    return pretrain + independent + dependent


# ----------------------------------------------------------------------------------------------------------------
# running


class _Processes:
    """The subprocesses this script started, so that a failure or Ctrl-C ends exactly those."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped = False

    def start(self, command: list[str], log, env: Mapping[str, str]) -> subprocess.Popen:
        with self.lock:
            if self.stopped:
                raise TableError("stopped")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(env))
            self.running.add(process)
            return process

    def finish(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.running.discard(process)

    def stop_all(self) -> None:
        with self.lock:
            self.stopped = True
            for process in self.running:
                if process.poll() is None:
                    process.terminate()


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    # tqdm bars rewrite one line with carriage returns: keep each line's last state
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def run_logged(command: list[str], log_path: Path, env: Mapping[str, str], processes: _Processes, what: str) -> float:
    """Run ``command`` with its output in ``log_path``; its wall time in seconds. A non-zero exit is a
    `TableError` quoting the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(command)}\n\n")
        log.flush()
        process = processes.start(command, log, env)
        try:
            code = process.wait()
        finally:
            processes.finish(process)
    if code != 0:
        raise TableError(
            f"{what} failed (exit status {code}); the last lines of {log_path}:\n{_tail(log_path)}\n"
            f"command: {shlex.join(command)}"
        )
    return time.monotonic() - started


def _arguments(command: Sequence[str]) -> list[str]:
    """A command without the interpreter and script (what must match for a finished run to be reused)."""
    return list(command[2:])


def _train_finished(step: Step) -> bool:
    if step.kind == "pretrain":
        return (step.run_dir / "pretraining_summary.json").is_file() and (step.run_dir / "backbone").is_dir()
    return (step.model_dir / "training_summary.json").is_file()


STEP_RECORD = "table_step.json"
EVAL_RECORD = "table_eval.json"


def execute_step(step: Step, env: Mapping[str, str], processes: _Processes, say) -> dict[str, Any]:
    """Train (or reuse) and evaluate (or reuse) one step; its record for table.json."""
    record: dict[str, Any] = {"name": step.name, "kind": step.kind, "seed": step.seed}
    record_file = step.run_dir / STEP_RECORD
    saved = json.loads(record_file.read_text()) if record_file.is_file() else None
    config_sha256 = _file_sha256(step.config)
    if saved is not None and _train_finished(step):
        if _arguments(saved["command"]) != _arguments(step.train_command):
            raise TableError(
                f"{step.run_dir} holds a run made by another command:\n  {shlex.join(saved['command'])}\nnot\n  "
                f"{shlex.join(step.train_command)}\nchoose another --output-dir (or delete that folder)"
            )
        if saved.get("config_sha256") != config_sha256:
            raise TableError(
                f"{step.run_dir} was trained with another version of {step.config} (it changed since): choose "
                "another --output-dir (or delete that folder)"
            )
        record["train"] = {**saved, "command_line": shlex.join(saved["command"]), "reused": True}
    else:
        say(f"start {step.name}")
        log_path = step.log_dir / f"{step.run_dir.name}.train.log"
        seconds = run_logged(step.train_command, log_path, env, processes, f"training {step.name}")
        saved = {"command": step.train_command, "config_sha256": config_sha256}
        saved.update(seconds=round(seconds, 1), log=str(log_path))
        record_file.write_text(json.dumps(saved, indent=2))
        record["train"] = {**saved, "command_line": shlex.join(saved["command"]), "reused": False}
        say(f"trained {step.name} in {format_seconds(seconds)}")
    if step.eval_command is None:
        return record

    eval_record_file = step.eval_dir / EVAL_RECORD
    eval_saved = json.loads(eval_record_file.read_text()) if eval_record_file.is_file() else None
    results_file = step.eval_dir / "eval_results.json"
    if (
        eval_saved is not None
        and results_file.is_file()
        and _arguments(eval_saved["command"]) == _arguments(step.eval_command)
        and record["train"]["reused"]  # a model trained now is evaluated now
    ):
        record["eval"] = {**eval_saved, "command_line": shlex.join(eval_saved["command"]), "reused": True}
    else:
        log_path = step.log_dir / f"{step.run_dir.name}.{step.eval_dir.name}.log"
        seconds = run_logged(step.eval_command, log_path, env, processes, f"evaluating {step.name}")
        eval_saved = {"command": step.eval_command, "seconds": round(seconds, 1), "log": str(log_path)}
        eval_record_file.write_text(json.dumps(eval_saved, indent=2))
        record["eval"] = {**eval_saved, "command_line": shlex.join(eval_saved["command"]), "reused": False}
    results = json.loads(results_file.read_text())
    record.update(read_evaluation(results, step.eval_dir))
    record.update(method=step.method, backbone=step.backbone, run_dir=str(step.run_dir), eval_dir=str(step.eval_dir))
    cluster = record["cluster"]
    say(
        f"evaluated {step.name}: cluster acc {100 * cluster['accuracy']:.1f}% mIoU {100 * cluster['mean_iou']:.1f}% "
        f"({record['num_images']} images)"
    )
    return record


def read_evaluation(results: Mapping[str, Any], eval_dir: Path | None = None) -> dict[str, Any]:
    """The numbers of one ``hf-useg evaluate`` ``eval_results.json``: ``cluster`` and ``linear`` (or None) as
    ``{"accuracy", "mean_iou", "per_class_iou"}`` (per-class NaN where undefined), the image counts and protocol,
    and the class names of ``per_class_iou.csv`` beside it (when ``eval_dir`` is given)."""
    record: dict[str, Any] = {}
    for probe in ("cluster", "linear"):
        values = results.get(probe)
        record[probe] = (
            None
            if values is None
            else {
                "accuracy": float(values["accuracy"]),
                "mean_iou": float(values["mean_iou"]),
                "per_class_iou": [math.nan if iou is None else float(iou) for iou in values["per_class_iou"]],
            }
        )
    evaluation = results.get("evaluation") or {}
    record["num_images"] = evaluation.get("num_images")
    record["split_size"] = evaluation.get("split_size")
    record["protocol"] = evaluation.get("protocol")
    if eval_dir is not None and (eval_dir / "per_class_iou.csv").is_file():
        rows = (eval_dir / "per_class_iou.csv").read_text().splitlines()[1:]
        record["class_names"] = [row.split(",")[1] for row in rows if row]
    return record


def run_steps(steps: Sequence[Step], jobs: int, env: Mapping[str, str], say) -> dict[str, dict[str, Any]]:
    """Run the steps, ``jobs`` at a time, each once its dependencies are done; on the first failure the other
    running subprocesses are ended and the failure raised."""
    processes = _Processes()
    pending, done, records = list(steps), set(), {}
    running: dict[Future, Step] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            while pending or running:
                for step in list(pending):
                    if len(running) >= jobs:
                        break
                    if all(name in done for name in step.depends):
                        pending.remove(step)
                        running[pool.submit(execute_step, step, env, processes, say)] = step
                if not running:
                    raise TableError(f"steps waiting on steps that never run: {[s.name for s in pending]}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    step = running.pop(future)
                    records[step.name] = future.result()
                    done.add(step.name)
        except BaseException:
            processes.stop_all()
            for future in running:
                future.cancel()
            raise
    return records


# ----------------------------------------------------------------------------------------------------------------
# the report


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads_per_run": threads,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def comparison_report(records: Sequence[Mapping[str, Any]], output_dir: Path, args, class_names) -> str | None:
    """`hf_useg.report.write_comparison_report` of the first seed's models from their evaluation results (per-class
    IoU and confusion figures, no example images: nothing is evaluated again)."""
    import numpy as np

    from hf_useg.report import ModelReport, write_comparison_report

    seed = args.seeds[0]
    chosen = sorted(
        (record for record in records if record["seed"] == seed and "cluster" in record),
        key=lambda record: _row_order(record["method"], record["backbone"]),
    )
    if not chosen:
        return None
    reports = []
    for record in chosen:
        raw = json.loads((Path(record["eval_dir"]) / "eval_results.json").read_text())
        results = {}
        for probe in ("cluster", "linear"):
            if raw.get(probe) is None:
                continue
            values = dict(raw[probe])
            values["per_class_iou"] = np.array(
                [np.nan if iou is None else iou for iou in values["per_class_iou"]], dtype=float
            )
            values["confusion_matrix"] = np.asarray(values["confusion_matrix"])
            values["assignment"] = np.asarray(values["assignment"])
            results[probe] = values
        summary_file = Path(record["run_dir"]) / "model" / "training_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        protocol = dict(record.get("protocol") or {})
        protocol["images"] = record["num_images"]
        method, backbone = row_label(record)
        reports.append(
            ModelReport(
                name=f"{method} / {backbone}",
                method=method,
                backbone=str(summary.get("backbone", backbone)),
                steps=summary.get("steps"),
                results=results,
                protocol=protocol,
            )
        )
    folder = output_dir / f"comparison-seed{seed}"
    write_comparison_report(
        reports,
        folder,
        class_names=class_names,
        protocol={"dataset": args.dataset, "split": args.eval_split},
        title=f"CamVid table, seed {seed}",
    )
    return str(folder / "report.md")


def _count_train_images(args) -> int | None:
    try:
        from hf_useg.data import load_segmentation_dataset

        count = len(load_segmentation_dataset(args.dataset, args.train_split, num_classes=args.num_classes))
    except Exception:  # only for the header
        return None
    return min(count, args.max_train_images) if args.max_train_images else count


def _file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_table(args, argv: Sequence[str], step_records, steps, started, load_start, random_backbone, arch):
    records = [step_records[step.name] for step in steps if step.kind == "train"]
    rows = aggregate(records)
    first = records[0]
    class_names = first.get("class_names") or [f"class_{i}" for i in range(args.num_classes)]
    counts = {(record["num_images"], record["split_size"]) for record in records}
    if len(counts) != 1:
        raise TableError(f"the models were evaluated on different image counts: {sorted(counts)}")
    overrides = QUICK_OVERRIDES if args.quick else FULL_OVERRIDES
    recipes = {}
    if any(step.kind == "pretrain" for step in steps):
        recipes["DINO pretraining"] = {"config": _relative(args.pretrain_config), "overrides": overrides["pretrain"]}
    for method in args.methods:
        recipes[METHOD_NAMES[method]] = {"config": _relative(METHOD_CONFIGS[method]), "overrides": overrides[method]}
    if args.pretrained_backbone is not None:
        self_trained = f"`{args.pretrained_backbone}` (given; the same backbone for every seed)"
    else:
        self_trained = (
            f"the DINO teacher of `{_relative(args.pretrain_config)}` (sha256 "
            f"{_file_sha256(args.pretrain_config)[:12]}), pretrained per seed on the training split"
        )
    step_seconds = 0.0
    reused = 0
    for record in step_records.values():
        for part in ("train", "eval"):
            if part in record:
                step_seconds += record[part]["seconds"] or 0.0
                reused += bool(record[part]["reused"])
    table: dict[str, Any] = {
        "command": shlex.join(["python", _relative(__file__), *argv]),
        "setup": {
            "dataset": args.dataset,
            "train_split": args.train_split,
            "eval_split": args.eval_split,
            "num_classes": args.num_classes,
            "eval_resolution": args.eval_resolution,
            "flip_tta": True,
            "matching": "hungarian",
            "seeds": args.seeds,
            "methods": args.methods,
            "backbones": args.backbones,
            "quick": args.quick,
            "max_train_images": args.max_train_images,
            "max_eval_images": args.max_eval_images,
            "random_backbone": random_backbone,
            "backbone_architecture": arch,
            "pretrained_backbone": args.pretrained_backbone,
            "pretrain_config": _relative(args.pretrain_config),
            "pretrain_config_sha256": _file_sha256(args.pretrain_config),
            "pretrain_config_text": Path(args.pretrain_config).read_text(),
            "self_trained_description": self_trained,
            "recipes": recipes,
            "jobs": args.jobs,
            "threads": args.threads,
        },
        "train_images": _count_train_images(args),
        "eval_images": {"evaluated": first["num_images"], "split_size": first["split_size"]},
        "class_names": class_names,
        "spread": spread_description(len(args.seeds)),
        "rows": rows,
        "runs": records,
        "steps": [step_records[step.name] for step in steps],
        "timing": {
            "total_seconds": round(time.time() - started, 1),
            "steps_seconds": round(step_seconds, 1),
            "reused_steps": reused,
        },
        "machine": {**machine_info(args.threads), "load_average_start": load_start},
    }
    return table, class_names


def _relative(path: str | os.PathLike) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started, load_start = time.time(), list(os.getloadavg())
    output_dir = Path(args.output_dir).resolve()
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    try:
        pretrain_config = _load_yaml(args.pretrain_config)
        if pretrain_config.get("method") != "dino_pretrain":
            raise TableError(f"{args.pretrain_config} is not a dino_pretrain config (method: dino_pretrain)")
        random_backbone = args.random_backbone or str(pretrain_config.get("backbone"))
        arch, patch = backbone_architecture(random_backbone, args.pretrained_backbone)
        if args.eval_resolution % patch:
            raise TableError(f"--eval-resolution {args.eval_resolution} is not a multiple of the patch size {patch}")
        steps = plan_steps(args, output_dir, random_backbone)
        output_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        # everything is local: fail at once rather than after retries if something reaches for the Hub
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        say(f"{len(steps)} runs, {args.jobs} at a time x {args.threads} thread(s), into {output_dir}")
        step_records = run_steps(steps, args.jobs, env, say)
        table, class_names = build_table(args, argv, step_records, steps, started, load_start, random_backbone, arch)
        if not args.no_figure:
            table["comparison_report"] = comparison_report(table["runs"], output_dir, args, class_names)
    except TableError as error:
        print(f"camvid_table.py: {error}", file=sys.stderr)
        return 1
    table["timing"]["total_seconds"] = round(time.time() - started, 1)
    table["machine"]["load_average_end"] = list(os.getloadavg())
    from hf_useg.inference import _jsonable  # NaN -> null, numpy values -> Python

    (output_dir / "table.json").write_text(json.dumps(_jsonable(table), indent=2, default=str))  # Paths as text
    markdown = render_markdown(table)
    (output_dir / "table.md").write_text(markdown)
    print(markdown)
    say(f"wrote {output_dir / 'table.md'} and table.json in {format_seconds(table['timing']['total_seconds'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
