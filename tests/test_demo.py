"""`make demo` (`hf_useg.demo.run_demo`): the comparison report it ends with, the summary's explanations, and the
saved scenes that `hf-useg evaluate` re-scores to the same numbers; in a tiny configuration (2 STEGO steps on 16
generated images)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from hf_useg.cli import main
from hf_useg.demo import _explain_folders, _explain_stego, run_demo

_CONTEXT = {
    "synthetic": True,
    "real_backbone": False,
    "backbone": "random-vit-tiny",
    "calibrated": True,
    "dim": 32,
    "grid": "8x8",
    "patch": 8,
    "pos_intra_shift": 0.67,
    "pos_inter_shift": 0.68,
    "neg_code_correlation": 0.02,
}


@pytest.mark.parametrize(
    ("stego", "verdict"),
    [
        (0.945, "matches the k-means baseline (93.0%)"),
        (0.97, "beats the k-means baseline by 4.0 points"),
        (0.58, "trails the k-means baseline by 35.0 points"),
    ],
)
def test_the_stego_sentence_says_how_it_compares(stego, verdict):
    sentence = _explain_stego({"cluster_mean_iou": stego, "steps": 150}, {"cluster_mean_iou": 0.93}, _CONTEXT)
    assert verdict in sentence and f"{100 * stego:.1f}%" in sentence
    assert "median feature correlations (0.67 / 0.68; the released COCO-Stuff 0.12 / 0.20 sit far below" in sentence
    assert "code correlation 0.02" in sentence
    assert sentence.count(". ") == 0 and sentence.endswith(".")  # one sentence


def test_the_folders_sentence_names_model_and_best(tmp_path):
    run = tmp_path / "stego"
    (run / "best").mkdir(parents=True)
    (run / "best" / "best_metrics.json").write_text(json.dumps({"step": 100}))
    lines = [{"step": step, "val/cluster_mean_iou": value} for step, value in ((50, 0.5), (100, 0.9), (150, 0.8))]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    sentence = _explain_folders(run, {"steps": 150})
    assert f"{run / 'model'} holds the weights after the last step (150), the ones scored above" in sentence
    assert f"{run / 'best'} holds step 100's" in sentence and "90.0% against 80.0%" in sentence
    assert "not reported as the result" in sentence


@pytest.mark.slow
def test_demo_writes_the_report_explains_and_can_be_rescored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("BACKBONE", raising=False)
    monkeypatch.delenv("DATA", raising=False)
    output_dir = tmp_path / "demo"
    record = run_demo(output_dir, steps=2, synthetic_images=16)
    out = capsys.readouterr().out

    # the comparison report of both models, its path printed
    report = Path(record["report"])
    assert report == output_dir / "report" / "report.md" and report.is_file()
    for name in ("report.html", "examples.png", "per_class_iou.png", "results.json"):
        assert (report.parent / name).is_file()
    assert f"report:      {report}" in out and record["compare_command"] in out
    rows = json.loads((report.parent / "results.json").read_text())["models"]
    assert [row["name"] for row in rows] == ["stego/model", "kmeans/model"]
    assert all(row["backbone"] == "random-vit-tiny (randomly initialised ViT)" for row in rows)
    assert not list(output_dir.glob("overlay_*.png"))  # the report's examples grid replaces the blended overlays

    # the summary: the setup, one sentence per model, which folder holds what
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["setup"]["images"] == 8 and summary["setup"]["resolution"] == 64 and summary["setup"]["seed"] == 0
    assert summary["setup"]["stego_options"] == {"calibrate_shifts": True, "cluster_probe_init": "kmeans", "dim": 32}
    for key in ("stego", "dino_kmeans"):
        why = summary[key]["why"]
        assert f"{100 * summary[key]['cluster_mean_iou']:.1f}%" in why and why in out
    assert "calibrated to this backbone" in summary["stego"]["why"]
    assert "randomly initialised ViT" in summary["dino_kmeans"]["why"]
    assert summary["folders"]["explanation"].startswith(f"{output_dir / 'stego' / 'model'} holds the weights")
    assert summary["rescored"]["reproduced"]

    # the printed hf-useg evaluate command re-scores the saved scenes to the demo's numbers
    command = summary["evaluate_command"]
    assert command in out and f"--dataset {output_dir / 'synthetic-scenes'}" in command
    assert main([*shlex.split(command)[1:], "--quiet"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["num_images"] == 8
    for key in ("cluster_accuracy", "cluster_mean_iou", "linear_accuracy", "linear_mean_iou"):
        assert scored[key] == pytest.approx(summary["stego"][key], abs=1e-4), key

    # the k-means card names the random backbone, not a DINO one, and has a sane title
    card = (Path(summary["dino_kmeans"]["model_dir"]) / "README.md").read_text()
    assert "frozen DINO backbone" not in card and "dino_segmentation-segmentation" not in card
    assert "# DINO-feature k-means on generated synthetic scenes" in card and "randomly initialised ViT" in card
