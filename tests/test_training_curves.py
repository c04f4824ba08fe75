"""Training curves: `plot_training_curves` draws metrics.jsonl, and every training run writes training_curves.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from hf_useg.training import load_training_arguments, train  # noqa: E402
from hf_useg.visualization import plot_training_curves, read_metrics  # noqa: E402


def test_curves_plot_every_logged_series(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 10, "train/loss": 2.0, "train/pos_intra": 0.5},
        {"step": 20, "train/loss": 1.0, "train/pos_intra": 0.25, "val/cluster_mean_iou": 0.4},
        {"step": 30, "train/loss": 0.5, "train/pos_intra": 0.2},
        {"step": 40, "train/loss": 0.4, "train/pos_intra": 0.1, "val/cluster_mean_iou": 0.5},
    ]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_metrics(metrics) == lines
    figure = plot_training_curves(metrics, tmp_path / "curves.png", title="run")
    training, validation = figure.axes
    assert [line.get_label() for line in training.lines] == ["loss", "pos_intra"]
    assert list(training.lines[0].get_xdata()) == [10, 20, 30, 40]
    assert list(training.lines[0].get_ydata()) == [2.0, 1.0, 0.5, 0.4]
    assert training.get_yscale() == "log"  # all positive
    assert list(validation.lines[0].get_xdata()) == [20, 40]
    assert list(validation.lines[0].get_ydata()) == [0.4, 0.5]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_without_validation_have_one_panel_and_linear_scale_for_negative_losses():
    figure = plot_training_curves([{"step": 1, "train/loss": -0.5}, {"step": 2, "train/loss": -0.7}])
    assert len(figure.axes) == 1 and figure.axes[0].get_yscale() == "linear"


def test_nothing_logged_is_a_clear_error():
    with pytest.raises(ValueError, match="logged nothing"):
        plot_training_curves([{"step": 1}])


def test_a_training_run_writes_its_curves(tmp_path):
    args = load_training_arguments(
        Path(__file__).resolve().parents[1] / "training" / "configs" / "stego_tiny.yaml",
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        log_every=2,
        val_every=4,
        progress=False,
    )
    train(args)
    curves = tmp_path / "run" / "training_curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_code_statistics_get_their_own_panel():
    lines = [
        {"step": 1, "train/loss": 1.0, "train/code_corr_neg_mean": 0.3, "train/feat_above_shift_intra": 0.9},
        {"step": 2, "train/loss": 0.8, "train/code_corr_neg_mean": 0.4, "train/feat_above_shift_intra": 0.8},
    ]
    loss, statistics = plot_training_curves(lines).axes
    assert [line.get_label() for line in loss.lines] == ["loss"]
    assert sorted(line.get_label() for line in statistics.lines) == ["code_corr_neg_mean", "feat_above_shift_intra"]
