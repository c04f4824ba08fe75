"""The controlled CutMix-DETReg experiment on the raccoon photos (issue 11): does detector pretraining with CutMix
pseudo-boxes help, and does the pasted content matter?

For each seed and each arm — ``none`` (no pretraining), ``cutmix`` (the thesis), ``random`` (the same box law on
the unmodified image: the control) and ``selective_search`` (DETReg's original) — the detector of
``training/configs/detreg_cutmix_raccoon.yaml`` is pretrained on the 160 raccoon *train* images without their boxes
(the same number of steps for every pretraining arm), then fine-tuned on the labelled train split
(``training/configs/detection_finetune_raccoon.yaml``, the same steps for every arm) and evaluated once on the 40
test images with both evaluators (COCO AP and DETReg's VOC07 AP). No model selection on the test split.

    .venv/bin/python benchmarks/detreg_raccoon_experiment.py --seeds 0 1 --output-dir outputs/detreg-raccoon

(About 1 h on 2 CPU cores. The README's table ran one process per seed with ``OMP_NUM_THREADS=1``, each
``--seeds N`` into the same ``--output-dir``, then the command above, which reuses the finished runs and writes the
table; two threads per process on a machine shared with other work was 4x slower.)

Runs already finished in ``--output-dir`` are reused (the experiment resumes). Prints a Markdown table (mean ± std
over seeds, per arm) and writes ``results.json`` and ``table.md``. A difference below twice the seed spread is
reported as inconclusive.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "raccoon"
PRETRAIN_CONFIG = ROOT / "training" / "configs" / "detreg_cutmix_raccoon.yaml"
FINETUNE_CONFIG = ROOT / "training" / "configs" / "detection_finetune_raccoon.yaml"
ARMS = ("none", "cutmix", "random", "selective_search")
METRICS = ("voc07_ap", "voc07_ap50", "voc07_ap75", "coco_ap", "coco_ap50", "coco_ap75")


def _run(config: Path, output_dir: Path, **overrides) -> dict:
    from hf_useg.training import load_training_arguments, train

    summary_file = output_dir / "experiment_summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    args = load_training_arguments(
        config, output_dir=str(output_dir), overwrite_output_dir=True, progress=False, **overrides
    )
    started = time.time()
    summary = train(args)
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary_file.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_arm(arm: str, seed: int, options: argparse.Namespace) -> dict:
    import yaml

    folder = Path(options.output_dir) / f"{arm}-seed{seed}"
    common = dict(dataset=str(options.data), seed=seed, resolution=options.resolution)
    finetune = dict(common, max_steps=options.finetune_steps, val_every=options.finetune_steps)
    if arm == "none":
        detector = yaml.safe_load(PRETRAIN_CONFIG.read_text())["model"]["detector_config"]
        finetune.update(model=detector, recipe={"pretrained_detector": None})
        pretrain_seconds = 0.0
    else:
        pretrained = _run(
            PRETRAIN_CONFIG,
            folder / "pretrain",
            box_source=arm,
            max_steps=options.pretrain_steps,
            save_every=options.pretrain_steps,
            **common,
        )
        finetune["pretrained_detector"] = pretrained["detector_dir"]
        pretrain_seconds = pretrained["wall_seconds"]
    result = _run(FINETUNE_CONFIG, folder / "finetune", eval_resolution=options.resolution, **finetune)
    row = {"arm": arm, "seed": seed, "pretrain_seconds": pretrain_seconds, "finetune_seconds": result["wall_seconds"]}
    row.update({name: result[name] for name in METRICS})
    row["test_images"] = result["eval_protocol"]["images"]
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[dict]) -> str:
    arms = [arm for arm in ARMS if any(row["arm"] == arm for row in rows)]
    header = "| arm | seeds | " + " | ".join(METRICS) + " | pretrain s | fine-tune s |"
    lines = [header, "|" + "---|" * (len(METRICS) + 4)]
    for arm in arms:
        mine = [row for row in rows if row["arm"] == arm]
        cells = []
        for name in METRICS:
            mean, std = _mean_std([100 * row[name] for row in mine])
            cells.append(f"{mean:.2f} ± {std:.2f}")
        seconds = [statistics.fmean(row[key] for row in mine) for key in ("pretrain_seconds", "finetune_seconds")]
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + f" | {seconds[0]:.0f} | {seconds[1]:.0f} |")
    return "\n".join(lines)


def verdicts(rows: list[dict], metric: str = "voc07_ap50") -> list[str]:
    """``A vs B``: the difference of the means against twice the larger seed spread."""
    lines = []
    for first, second in (("cutmix", "random"), ("cutmix", "none"), ("cutmix", "selective_search")):
        a = [100 * row[metric] for row in rows if row["arm"] == first]
        b = [100 * row[metric] for row in rows if row["arm"] == second]
        if len(a) < 2 or len(b) < 2:
            continue
        (mean_a, std_a), (mean_b, std_b) = _mean_std(a), _mean_std(b)
        difference, spread = mean_a - mean_b, 2 * max(std_a, std_b)
        verdict = "inconclusive" if abs(difference) < spread else ("better" if difference > 0 else "worse")
        lines.append(
            f"{first} vs {second} on {metric}: {difference:+.2f} points (2x seed spread {spread:.2f}) -> {verdict}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--resolution", type=int, default=192)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "detreg-raccoon-experiment")
    options = parser.parse_args(argv)
    if not options.data.exists():
        print(f"skipped: the raccoon data are not at {options.data} (../shared/data/raccoon)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for seed in options.seeds:
        for arm in options.arms:
            started = time.time()
            rows.append(run_arm(arm, seed, options))
            print(f"{arm} seed {seed}: {json.dumps(rows[-1])} ({time.time() - started:.0f} s)", flush=True)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    (options.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    notes = verdicts(rows)
    (options.output_dir / "table.md").write_text(text + "\n\n" + "\n".join(notes) + "\n")
    print(text)
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
