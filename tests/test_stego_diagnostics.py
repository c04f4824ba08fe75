"""STEGO's correlation diagnostics: the samples are the loss's own correlations (one shared function), the figure
draws exactly those samples, the calibrated shifts are `calibrate_shifts`'s, the collapse rule, and the code
statistics training logs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_configs import tiny_vit_config

from hf_useg.backbones import FeatureBackbone
from hf_useg.data import global_descriptors, make_synthetic_scenes, nearest_neighbors
from hf_useg.data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from hf_useg.image_processing import protocol_image_processor
from hf_useg.models.stego import StegoConfig, StegoCorrelationLoss, training_stego
from hf_useg.models.stego.diagnostics import (
    StegoDiagnostics,
    diagnose_feature_correlations,
    format_diagnostics,
    net_pull,
    plot_correlation_histograms,
    save_diagnostics,
    stego_correlation_diagnostics,
)
from hf_useg.models.stego.loss_stego import correlation_samples, draw_correlation_points
from hf_useg.models.stego.training_stego import calibrate_shifts, calibration_items

TINY_STEGO = Path(__file__).resolve().parents[1] / "training" / "configs" / "stego_tiny.yaml"
SMALL = dict(feature_samples=4, neg_samples=3)  # 4x4 points: small tensors, every path exercised


def _features(num_items: int = 6, seed: int = 0) -> torch.Tensor:
    """Unrelated random maps: low correlations, as DINO-like as a test gets."""
    return torch.randn(num_items, 16, 5, 6, generator=torch.Generator().manual_seed(seed))


def _scenes(num_items: int = 8, common: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Two-segment "scenes" of 4 classes (left and right halves) plus noise; ``common`` adds a direction every
    class shares, raising all correlations the way a random or briefly trained ViT has them."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    shared = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    prototypes = prototypes + common * shared
    maps = torch.empty(num_items, 16, 5, 6)
    for i in range(num_items):
        left, right = torch.randperm(4, generator=generator)[:2]
        maps[i, :, :, :3] = prototypes[left, :, None, None]
        maps[i, :, :, 3:] = prototypes[right, :, None, None]
    return maps + 0.3 * torch.randn(maps.shape, generator=generator)


def _knn(features: torch.Tensor, k: int = 4) -> torch.Tensor:
    return nearest_neighbors(global_descriptors(features), k)


def _loss_draws(features: torch.Tensor, knn: torch.Tensor, config: StegoConfig, num_neighbors: int, seed: int):
    """The partners and draws `diagnose_feature_correlations` documents: ranks, then the loss's own draws."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, num_neighbors + 1, (features.shape[0],), generator=generator)
    partners = knn[torch.arange(features.shape[0]), ranks]
    draws = draw_correlation_points(features.shape[0], config.feature_samples, config.neg_samples, generator=generator)
    return partners, draws


@pytest.mark.parametrize("pointwise", [True, False])
def test_diagnostics_samples_are_the_loss_feature_correlations(pointwise):
    config = StegoConfig(pointwise=pointwise, **SMALL)
    features = _features()
    knn = _knn(features)
    diagnostics = diagnose_feature_correlations(features, knn, config=config, num_neighbors=2, seed=3)

    partners, (coords1, coords2, neg_perms) = _loss_draws(features, knn, config, num_neighbors=2, seed=3)
    code = torch.randn(6, 3, 5, 6)
    out = StegoCorrelationLoss(config)(
        features, features[partners], code, code.roll(1, 0), coords1, coords2, neg_perms, output_correlations=True
    )
    assert set(diagnostics.samples) == set(out.feature_correlations) == {"intra", "knn", "neg"}
    for name, sample in diagnostics.samples.items():
        # the same function on the same tensors (a tolerance: separate calls may get other kernels elsewhere)
        torch.testing.assert_close(sample, out.feature_correlations[name], rtol=1e-6, atol=1e-6, msg=name)
    assert diagnostics.samples["neg"].shape == (3, 6, 4, 4, 4, 4)


def test_code_path_is_the_same_function():
    """On the code (no centring, no clamp), the loss's code correlations are `correlation_samples` too."""
    config = StegoConfig(pointwise=False, zero_clamp=False, stabilize=False, **SMALL)
    generator = torch.Generator().manual_seed(1)
    features, code, code_pos = (torch.randn(5, channels, 4, 4, generator=generator) for channels in (8, 3, 3))
    coords1, coords2, neg_perms = draw_correlation_points(5, 4, 3, generator=generator)
    out = StegoCorrelationLoss(config)(
        features, features, code, code_pos, coords1, coords2, neg_perms, output_correlations=True
    )
    samples = correlation_samples(code, code_pos, coords1=coords1, coords2=coords2, neg_perms=neg_perms)
    torch.testing.assert_close(out.pos_intra_correlation, samples["intra"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.pos_inter_correlation, samples["knn"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.neg_inter_correlation, samples["neg"], rtol=1e-6, atol=1e-6)
    # the statistics training logs are reductions of these tensors
    stats = StegoCorrelationLoss(config)(
        features, features, code, code_pos, coords1, coords2, neg_perms, output_statistics=True
    ).statistics
    assert stats["code_corr_neg_mean"] == samples["neg"].mean()
    assert stats["feat_above_shift_knn"] == (out.feature_correlations["knn"] > config.pos_inter_shift).float().mean()
    assert StegoCorrelationLoss(config)(features, features, code, code_pos).statistics is None  # off by default


def test_calibrated_shifts_are_calibrate_shifts():
    config = StegoConfig(**SMALL)
    features = _features(num_items=8, seed=2)
    knn = _knn(features)
    diagnostics = diagnose_feature_correlations(features, knn, config=config, seed=5)
    sample, partners = calibration_items(8, knn)
    assert partners == knn[sample, 1].tolist()
    expected = calibrate_shifts(features[sample], pointwise=True, seed=5, partner_features=features[partners])
    assert diagnostics.calibrated_shifts == expected


def test_end_to_end_on_a_backbone_measures_the_processed_images():
    torch.manual_seed(0)
    backbone = FeatureBackbone(tiny_vit_config(), frozen=True)
    dataset = make_synthetic_scenes(6, 48, 3, seed=1)
    config = StegoConfig(**SMALL)
    diagnostics = stego_correlation_diagnostics(
        backbone, dataset, config=config, resolution=32, num_images=6, five_crop=False, knn_k=4, seed=2, device="cpu"
    )
    items = ProcessedSegmentationDataset(dataset, protocol_image_processor(32), with_labels=False)
    with torch.no_grad():
        features = backbone(collate_segmentation_batch([items[i] for i in range(6)])["pixel_values"]).feature_map
    expected = diagnose_feature_correlations(features, _knn(features), config=config, seed=2)
    assert diagnostics.num_items == 6
    for name in expected.samples:
        torch.testing.assert_close(diagnostics.samples[name], expected.samples[name])
    assert diagnostics.calibrated_shifts == pytest.approx(expected.calibrated_shifts)
    # five crops (training's default): each image gives five items
    cropped = stego_correlation_diagnostics("random-vit-micro", dataset, config=config, resolution=32, num_images=2)
    assert cropped.num_items == 10 and "random-vit-micro" in cropped.backbone
    json.dumps(cropped.to_dict())  # report-ready


def test_histograms_draw_the_samples(tmp_path):
    features = _scenes(seed=4)
    diagnostics = diagnose_feature_correlations(features, _knn(features), config=StegoConfig(**SMALL))
    path = tmp_path / "correlations.png"
    figure = plot_correlation_histograms(diagnostics, path, bins=40)
    assert path.stat().st_size > 0
    panels = [axes for axes in figure.axes if axes.get_label() in diagnostics.samples]
    assert [axes.get_label() for axes in panels] == ["intra", "knn", "neg"]
    for axes in panels:
        name = axes.get_label()
        (patch,) = axes.patches
        heights, edges = patch.get_data().values, patch.get_data().edges
        values = diagnostics.samples[name].flatten().double().numpy()
        np.testing.assert_array_equal(heights, np.histogram(values, bins=edges)[0] / values.size)
        assert heights.sum() == pytest.approx(1.0)  # every pair is in a bin
        lines = {line.get_label().split(" = ")[0]: line.get_xdata()[0] for line in axes.lines}
        shift_name = {"intra": "pos_intra_shift", "knn": "pos_inter_shift", "neg": "neg_inter_shift"}[name]
        assert lines[f"configured {shift_name}"] == diagnostics.shifts[name]
        if name != "neg":
            assert lines["calibrated (--calibrate_shifts true)"] == diagnostics.calibrated_shifts[shift_name]
        assert axes.get_ylabel() and axes.get_legend() is not None
    assert "feature correlation" in panels[-1].get_xlabel()
    assert "STEGO feature correlations" in figure.get_suptitle()
    # what a CLI writes: the figure, the terminal text and the numbers
    paths = save_diagnostics(diagnostics, tmp_path / "report")
    assert paths["text"].read_text().strip() == format_diagnostics(diagnostics)
    assert json.loads(paths["json"].read_text())["net_pull"] == pytest.approx(diagnostics.net_pull)
    assert paths["figure"].stat().st_size > 0


def test_collapse_warning_fires_on_high_correlations_only():
    coco = StegoConfig(**SMALL)  # the released COCO-Stuff shifts 0.12 / 0.2 / 1.0
    high = _scenes()  # medians above 0.5, like the CamVid ViTs on which these shifts collapse the code
    collapsing = diagnose_feature_correlations(high, _knn(high), config=coco)
    assert collapsing.statistics["knn"]["median"] > 0.5
    assert collapsing.net_pull["total"] > 0 and len(collapsing.warnings) == 1
    assert "collapse" in collapsing.warnings[0] and "calibrated" in collapsing.warnings[0]
    # the rule is the sign of the net pull, recomputable from the reported means and the config
    means = {name: stats["mean"] for name, stats in collapsing.statistics.items()}
    assert net_pull(means, collapsing.shifts, collapsing.weights) == collapsing.net_pull
    calibrated = {**collapsing.shifts, "intra": collapsing.calibrated_shifts["pos_intra_shift"]}
    calibrated["knn"] = collapsing.calibrated_shifts["pos_inter_shift"]
    assert collapsing.calibrated_net_pull == net_pull(means, calibrated, collapsing.weights)["total"]

    # well posed: the positive shifts at the medians of their terms (each term pulls half of its pairs together)
    medians = {
        "pos_intra_shift": collapsing.statistics["intra"]["median"],
        "pos_inter_shift": collapsing.statistics["knn"]["median"],
    }
    well_posed = diagnose_feature_correlations(high, _knn(high), config=StegoConfig(**SMALL, **medians))
    assert well_posed.statistics["knn"]["pulled_together"] == pytest.approx(0.5, abs=0.01)
    assert well_posed.warnings == [] and well_posed.net_pull["total"] < 0
    low = _features(num_items=8)  # unrelated random features: low correlations, the COCO shifts are fine
    assert diagnose_feature_correlations(low, _knn(low), config=coco).warnings == []


def test_format_diagnostics_names_shifts_medians_and_warnings():
    high = _scenes()
    diagnostics = diagnose_feature_correlations(high, _knn(high), config=StegoConfig(**SMALL), backbone_name="vit")
    assert isinstance(diagnostics, StegoDiagnostics)
    text = format_diagnostics(diagnostics)
    assert text.startswith("STEGO feature correlations of vit")
    assert f"{diagnostics.statistics['knn']['median']:.3f}" in text
    assert f"{diagnostics.calibrated_shifts['pos_inter_shift']:.4f}" in text
    assert "0.120" in text and "1.000" in text  # the configured shifts
    assert "WARNING: the code will collapse" in text


def test_training_logs_the_code_statistics_and_warns_once(tmp_path, monkeypatch, caplog):
    from hf_useg.training import load_training_arguments, train

    monkeypatch.setattr(training_stego, "CODE_COLLAPSE_THRESHOLD", -1.0)  # any code "collapses": the warning path
    with caplog.at_level(logging.WARNING, logger=training_stego.__name__):
        train(
            load_training_arguments(
                TINY_STEGO,
                output_dir=str(tmp_path),
                max_steps=2,
                log_every=1,
                val_every=100,
                cache_backbone_features=True,
            )
        )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in logged] == [1, 2]
    for line in logged:
        for name in ("intra", "knn", "neg"):
            assert -1.0 <= line[f"train/code_corr_{name}_mean"] <= 1.0
            assert 0.0 <= line[f"train/feat_above_shift_{name}"] <= 1.0
        assert not math.isclose(line["train/code_corr_intra_mean"], line["train/code_corr_neg_mean"])
    warnings = [record for record in caplog.records if "collapsing" in record.getMessage()]
    assert len(warnings) == 1 and "step 2" in warnings[0].getMessage()  # once, at the check step (the last)


def test_cli_diagnose_writes_the_figure_and_warns(tmp_path, capsys):
    from hf_useg.cli import main

    output = tmp_path / "diagnose"
    args = ["diagnose", "stego", "--backbone", "random-vit-micro", "--dataset", "synthetic", "--resolution", "32"]
    assert main([*args, "--num-images", "4", "--output-dir", str(output), "--quiet"]) == 0
    captured = capsys.readouterr()
    paths = json.loads(captured.out.strip().splitlines()[-1])
    assert Path(paths["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(Path(paths["json"]).read_text())
    assert "calibrated shifts" in captured.err and Path(paths["text"]).read_text().strip() in captured.err
    assert saved["shifts"] == {"intra": 0.12, "knn": 0.2, "neg": 1.0}  # the COCO release's, the default config
