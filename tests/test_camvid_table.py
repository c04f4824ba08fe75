"""benchmarks/camvid_table.py: aggregation and formatting on hand-made results, argument parsing, the planned
commands, and one end-to-end ``--quick`` run on the real CamVid data (slow; skipped without ../shared)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
table = load_script("benchmarks/camvid_table.py", "camvid_table")

NAN = math.nan


def _record(method, backbone, seed, accuracy, mean_iou, per_class, linear=None):
    return {
        "method": method,
        "backbone": backbone,
        "seed": seed,
        "cluster": {"accuracy": accuracy, "mean_iou": mean_iou, "per_class_iou": per_class},
        "linear": linear,
    }


def _records():
    linear0 = {"accuracy": 0.30, "mean_iou": 0.10, "per_class_iou": [0.1, 0.1, 0.1]}
    linear1 = {"accuracy": 0.40, "mean_iou": 0.12, "per_class_iou": [0.2, 0.0, 0.16]}
    return [
        # given out of order: the rows come in METHODS order, random before self-trained
        _record("stego", "self-trained", 1, 0.54, 0.16, [0.5, NAN, 0.2], linear1),
        _record("stego", "self-trained", 0, 0.50, 0.12, [0.3, NAN, 0.0], linear0),
        _record("kmeans", "random", 0, 0.45, 0.15, [0.4, 0.05, NAN]),
        _record("kmeans", "random", 1, 0.47, 0.17, [0.6, 0.15, 0.3]),
    ]


def test_mean_and_spread_by_number_of_seeds():
    mean, spread = table.mean_and_spread([0.50, 0.54])
    assert mean == pytest.approx(0.52) and spread == pytest.approx(0.02)  # half the range
    mean, spread = table.mean_and_spread([0.1, 0.2, 0.6])
    # sample std: deviations -0.2, -0.1, 0.3 -> sqrt(0.14 / 2)
    assert mean == pytest.approx(0.3) and spread == pytest.approx(math.sqrt(0.07))
    assert table.mean_and_spread([0.25]) == (0.25, None)
    assert table.mean_and_spread([NAN, 0.4]) == (0.4, None)  # an undefined IoU is left out
    mean, spread = table.mean_and_spread([NAN, None])
    assert math.isnan(mean) and spread is None


def test_spread_description():
    assert table.spread_description(1) == "one seed: no spread"
    assert "half the range" in table.spread_description(2)
    assert "sample standard deviation over the 3 seeds" in table.spread_description(3)
    with pytest.raises(ValueError):
        table.spread_description(0)


def test_aggregate_means_spreads_and_per_class():
    rows = table.aggregate(_records())
    assert [(row["method"], row["backbone"]) for row in rows] == [("kmeans", "random"), ("stego", "self-trained")]
    kmeans, stego = rows
    assert kmeans["seeds"] == [0, 1]
    assert kmeans["cluster"]["accuracy"]["mean"] == pytest.approx(0.46)
    assert kmeans["cluster"]["accuracy"]["spread"] == pytest.approx(0.01)
    assert kmeans["cluster"]["accuracy"]["values"] == [0.45, 0.47]  # in seed order
    assert kmeans["cluster"]["mean_iou"]["mean"] == pytest.approx(0.16)
    # per class: mean over the seeds where it is defined; None where undefined in every seed
    assert kmeans["cluster"]["per_class_iou"] == pytest.approx([0.5, 0.1, 0.3])
    assert kmeans["linear"] is None
    assert stego["cluster"]["per_class_iou"][1] is None
    assert stego["cluster"]["per_class_iou"][0] == pytest.approx(0.4)
    assert stego["linear"]["accuracy"]["mean"] == pytest.approx(0.35)
    assert stego["linear"]["mean_iou"]["spread"] == pytest.approx(0.01)


def test_aggregate_linear_probe_only_when_every_seed_has_one():
    records = _records()[:2]
    records[0]["linear"] = None
    assert table.aggregate(records)[0]["linear"] is None


def test_aggregate_rejects_a_seed_twice():
    records = _records()[2:]
    records[1]["seed"] = 0
    with pytest.raises(ValueError, match="seed listed twice"):
        table.aggregate(records)


def test_format_cell():
    assert table.format_cell({"mean": 0.52, "spread": 0.02}) == "52.0 ± 2.0"
    assert table.format_cell({"mean": 0.1234, "spread": None}) == "12.3"
    assert table.format_cell(None) == "—"
    assert table.format_cell({"mean": NAN, "spread": None}) == "—"


def test_main_table_markdown():
    text = table.main_table(table.aggregate(_records()))
    lines = text.splitlines()
    assert lines[0] == (
        "| method | backbone | cluster acc (%) | cluster mIoU (%) | linear acc (%) | linear mIoU (%) | seeds |"
    )
    assert lines[2] == "| DINO-feature k-means | random init | 46.0 ± 1.0 | 16.0 ± 1.0 | — | — | 0, 1 |"
    assert lines[3] == "| STEGO | self-trained (DINO) | 52.0 ± 2.0 | 14.0 ± 2.0 | 35.0 ± 5.0 | 11.0 ± 1.0 | 0, 1 |"


def test_per_class_table_markdown():
    text = table.per_class_table(table.aggregate(_records()), ["sky", "building", "pole"])
    lines = text.splitlines()
    assert lines[0] == "| class | DINO-feature k-means / random init | STEGO / self-trained (DINO) |"
    assert lines[2] == "| sky | 50.0 | 40.0 |"
    assert lines[3] == "| building | 10.0 | — |"
    assert lines[4] == "| pole | 30.0 | 10.0 |"
    assert lines[5] == "| mIoU | 16.0 | 14.0 |"
    with pytest.raises(ValueError, match="3 per-class IoUs for 2 class names"):
        table.per_class_table(table.aggregate(_records()), ["sky", "building"])


def test_format_seconds():
    assert table.format_seconds(42.4) == "42 s"
    assert table.format_seconds(750) == "12.5 min"
    assert table.format_seconds(3780) == "1 h 03 min"
    assert table.format_seconds(None) == "—"


def test_read_evaluation_of_hf_useg_evaluate_results(tmp_path):
    (tmp_path / "per_class_iou.csv").write_text("class_id,class_name,cluster_iou\n0,sky,0.5\n1,road,\n")
    results = {
        "cluster": {"accuracy": 0.6, "mean_iou": 0.5, "per_class_iou": [0.5, None], "assignment": [0, 1]},
        "evaluation": {"num_images": 101, "split_size": 101, "protocol": {"resolution": 320}},
    }
    record = table.read_evaluation(results, tmp_path)
    assert record["cluster"]["accuracy"] == 0.6
    assert record["cluster"]["per_class_iou"][0] == 0.5 and math.isnan(record["cluster"]["per_class_iou"][1])
    assert record["linear"] is None
    assert (record["num_images"], record["split_size"]) == (101, 101)
    assert record["class_names"] == ["sky", "road"]


def test_render_markdown_header_and_tables():
    rows = table.aggregate(_records())
    document = table.render_markdown(
        {
            "command": "python benchmarks/camvid_table.py --seeds 0 1",
            "setup": {
                "dataset": "/data/camvid11",
                "train_split": "train",
                "eval_split": "val",
                "eval_resolution": 320,
                "seeds": [0, 1],
                "quick": False,
                "max_train_images": None,
                "random_backbone": "random-vit-dino-tiny-16",
                "backbone_architecture": "ViT, 192 wide, 6 layers, 3 heads, patch 16",
                "self_trained_description": "the DINO teacher of `training/configs/dino_pretrain_camvid.yaml`",
                "recipes": {
                    "STEGO": {"config": "training/configs/stego_camvid.yaml", "overrides": ["--max_steps", "600"]}
                },
                "jobs": 2,
                "threads": 1,
            },
            "train_images": 367,
            "eval_images": {"evaluated": 101, "split_size": 101},
            "class_names": ["sky", "building", "pole"],
            "rows": rows,
            "timing": {"total_seconds": 3000.0, "steps_seconds": 5400.0, "reused_steps": 0},
            "machine": {"cpu_count": 2, "load_average_start": [1.5, 1, 1], "load_average_end": [2.25, 2, 2]},
        }
    )
    assert "`/data/camvid11` split `val`, 101 images (the whole split)" in document
    assert "center-cropped to 320 x 320" in document
    assert "split `train` (367 images)" in document
    assert "**Seeds**: 0, 1; mean ± half the range over the 2 seeds." in document
    assert "ViT, 192 wide, 6 layers, 3 heads, patch 16" in document
    assert "STEGO: `training/configs/stego_camvid.yaml`; overrides: `--max_steps 600`" in document
    assert "50.0 min for this command (the steps' own times add up to 1 h 30 min)" in document
    assert "load average 1.50 at the start, 2.25 at the end" in document
    assert table.main_table(rows) in document and table.per_class_table(rows, ["sky", "building", "pole"]) in document


def test_parse_args_defaults_and_quick(tmp_path):
    args = table.parse_args(["--output-dir", str(tmp_path)])
    assert args.seeds == [0, 1] and args.eval_resolution == 320 and args.max_eval_images is None
    assert args.methods == ["kmeans", "stego", "stego-kmeans-start", "picie", "iic"] and args.backbones == [
        "random",
        "self-trained",
    ]
    assert args.jobs >= 1 and args.threads >= 1
    quick = table.parse_args(["--quick", "--methods", "iic", "kmeans", "--seeds", "3"])
    assert (quick.eval_resolution, quick.max_train_images, quick.max_eval_images) == (64, 16, 8)
    assert quick.methods == ["kmeans", "iic"]  # table order
    assert table.parse_args(["--quick", "--eval-resolution", "96"]).eval_resolution == 96


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0", "0"],
        ["--seeds", "-1"],
        ["--eval-resolution", "0"],
        ["--methods", "dino"],
        ["--jobs", "0"],
        ["--pretrain-config", "/nonexistent.yaml"],
        ["--pretrained-backbone", "/nonexistent"],
        ["--dataset", "/nonexistent/camvid"],
    ],
)
def test_parse_args_rejects_bad_input(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        table.parse_args(argv)
    assert raised.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_plan_steps_commands_and_dependencies(tmp_path):
    args = table.parse_args(["--quick", "--seeds", "0", "--dataset", str(tmp_path), "--output-dir", str(tmp_path)])
    steps = table.plan_steps(args, tmp_path, "random-vit-dino-tiny-16")
    names = [step.name for step in steps]
    assert names[0] == "seed0/dino-pretrain"
    assert set(names) == {
        "seed0/dino-pretrain",
        *(
            f"seed0/{m}-{b}"
            for m in ("kmeans", "stego", "stego-kmeans-start", "picie")
            for b in ("random", "self-trained")
        ),
        "seed0/iic",
    }
    # everything self-trained waits for the pretraining and is started after what waits for nothing
    by_name = {step.name: step for step in steps}
    first_dependent = min(i for i, step in enumerate(steps) if step.depends)
    assert all(not step.depends for step in steps[:first_dependent])
    assert by_name["seed0/stego-self-trained"].depends == ("seed0/dino-pretrain",)
    assert by_name["seed0/stego-random"].depends == ()

    def option(command, name):
        return command[command.index(name) + 1]

    pretrain = by_name["seed0/dino-pretrain"].train_command
    assert option(pretrain, "--config").endswith("training/configs/dino_pretrain_camvid.yaml")
    assert by_name["seed0/dino-pretrain"].eval_command is None
    stego = by_name["seed0/stego-self-trained"].train_command
    assert option(stego, "--backbone") == str(tmp_path / "seed0" / "dino-pretrain" / "backbone")
    assert option(stego, "--seed") == "0" and option(stego, "--val_split") == ""
    assert option(stego, "--output_dir") == str(tmp_path / "seed0" / "stego-self-trained")
    assert option(stego, "--max_train_images") == "16"
    started = by_name["seed0/stego-kmeans-start-random"].train_command
    assert option(started, "--cluster_probe_init") == "kmeans" and "--cluster_probe_init" not in stego
    assert option(started, "--knn_cache_dir") == str(tmp_path / "seed0" / "stego-kmeans-start-random" / "knn_cache")
    assert option(by_name["seed0/kmeans-random"].train_command, "--backbone") == "random-vit-dino-tiny-16"
    assert "--backbone" not in by_name["seed0/iic"].train_command
    evaluate = by_name["seed0/iic"].eval_command
    assert evaluate[1:4] == ["-m", "hf_useg.cli", "evaluate"]
    assert option(evaluate, "--resolution") == "64" and option(evaluate, "--max-images") == "8"
    assert option(evaluate, "--split") == "val"


def test_plan_steps_with_a_given_backbone_skips_pretraining(tmp_path):
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "config.json").write_text("{}")
    args = table.parse_args(
        ["--methods", "kmeans", "--pretrained-backbone", str(backbone), "--dataset", str(tmp_path)]
    )
    steps = table.plan_steps(args, tmp_path / "out", "random-vit-dino-tiny-16")
    assert [step.name for step in steps] == [
        "seed0/kmeans-random",
        "seed0/kmeans-self-trained",
        "seed1/kmeans-random",
        "seed1/kmeans-self-trained",
    ]
    assert all(not step.depends for step in steps)
    assert steps[1].train_command[steps[1].train_command.index("--backbone") + 1] == str(backbone)


def test_backbone_architecture_checks_the_given_backbone(tmp_path):
    description, patch = table.backbone_architecture("random-vit-dino-tiny-16", None)
    assert description.startswith("ViT, 192 wide, 6 layers, 3 heads, patch 16") and patch == 16
    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 16})
    )
    with pytest.raises(table.TableError, match="give --random-backbone"):
        table.backbone_architecture("random-vit-dino-tiny-16", str(tmp_path))
    assert table.backbone_architecture("random-vit-small-16", str(tmp_path))[1] == 16
    with pytest.raises(table.TableError, match="not a RANDOM_BACKBONES name"):
        table.backbone_architecture("outputs/some-folder", None)


def test_a_failed_command_reports_its_log_tail(tmp_path):
    command = [sys.executable, "-c", "import sys; print('first'); print('the reason'); sys.exit(3)"]
    with pytest.raises(table.TableError) as raised:
        table.run_logged(command, tmp_path / "step.log", {}, table._Processes(), "training seed0/x")
    message = str(raised.value)
    assert "training seed0/x failed (exit status 3)" in message
    assert "the reason" in message and str(tmp_path / "step.log") in message
    assert (tmp_path / "step.log").read_text().startswith("$ ")


_FAKE_TRAIN = (
    "import pathlib, sys; model = pathlib.Path(sys.argv[1]) / 'model'; model.mkdir(parents=True, exist_ok=True); "
    "(model / 'training_summary.json').write_text('{}')"
)
_FAKE_EVALUATE = (
    "import json, pathlib, sys; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); "
    "(out / 'eval_results.json').write_text(json.dumps({'cluster': {'accuracy': 0.75, 'mean_iou': 0.5, "
    "'per_class_iou': [0.5, None]}, 'evaluation': {'num_images': 4, 'split_size': 4}})); "
    "(out / 'per_class_iou.csv').write_text('class_id,class_name,cluster_iou\\n0,sky,0.5\\n1,road,\\n')"
)


def _fake_step(tmp_path, extra=()):
    run_dir = tmp_path / "seed0" / "kmeans-random"
    return table.Step(
        name="seed0/kmeans-random",
        kind="train",
        config=tmp_path / "recipe.yaml",
        seed=0,
        method="kmeans",
        backbone="random",
        run_dir=run_dir,
        train_command=[sys.executable, "-c", _FAKE_TRAIN, str(run_dir), *extra],
        eval_command=[sys.executable, "-c", _FAKE_EVALUATE, str(run_dir / "eval")],
        eval_dir=run_dir / "eval",
        log_dir=tmp_path / "seed0" / "logs",
    )


def test_execute_step_runs_then_reuses_and_refuses_a_changed_run(tmp_path):
    (tmp_path / "recipe.yaml").write_text("method: dino_kmeans\n")
    said = []
    step = _fake_step(tmp_path)
    first = table.execute_step(step, {}, table._Processes(), said.append)
    assert first["train"]["reused"] is False and first["eval"]["reused"] is False
    assert first["cluster"]["accuracy"] == 0.75 and math.isnan(first["cluster"]["per_class_iou"][1])
    assert first["class_names"] == ["sky", "road"] and first["num_images"] == 4
    assert (tmp_path / "seed0" / "logs" / "kmeans-random.train.log").is_file()
    assert said[0] == "start seed0/kmeans-random"

    again = table.execute_step(step, {}, table._Processes(), said.append)
    assert again["train"]["reused"] and again["eval"]["reused"]
    assert again["train"]["seconds"] == first["train"]["seconds"]  # the time of the run that made it
    assert again["cluster"]["accuracy"] == 0.75 and again["cluster"]["per_class_iou"][0] == 0.5

    # another evaluation command (e.g. another resolution) evaluates again; another training command is refused
    other_eval = _fake_step(tmp_path)
    other_eval.eval_command.append("--other")
    assert table.execute_step(other_eval, {}, table._Processes(), said.append)["eval"]["reused"] is False
    with pytest.raises(table.TableError, match="holds a run made by another command"):
        table.execute_step(_fake_step(tmp_path, ["--max_steps", "9"]), {}, table._Processes(), said.append)
    # so is a recipe file that changed after the run
    (tmp_path / "recipe.yaml").write_text("method: dino_kmeans\nkmeans_init: 5\n")
    with pytest.raises(table.TableError, match="another version of"):
        table.execute_step(step, {}, table._Processes(), said.append)


@pytest.mark.slow
def test_quick_table_end_to_end_and_resume(camvid_root, tmp_path, capsys):
    """Pretraining, k-means on both backbones and their evaluation for 2 seeds on a few real CamVid images
    (about a minute), then the same command again, which reuses every finished step."""
    output = tmp_path / "table"
    argv = ["--quick", "--methods", "kmeans", "--seeds", "0", "1", "--dataset", str(camvid_root)]
    argv += ["--output-dir", str(output), "--jobs", "2", "--threads", "1"]
    assert table.main(argv) == 0
    record = json.loads((output / "table.json").read_text())
    rows = record["rows"]
    assert [(row["method"], row["backbone"]) for row in rows] == [("kmeans", "random"), ("kmeans", "self-trained")]
    for row in rows:
        assert row["seeds"] == [0, 1] and row["linear"] is None
        values = row["cluster"]["accuracy"]["values"]
        assert row["cluster"]["accuracy"]["spread"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert len(row["cluster"]["per_class_iou"]) == 11
    assert record["class_names"][:3] == ["sky", "building", "pole"]
    assert record["eval_images"] == {"evaluated": 8, "split_size": 101}
    assert record["setup"]["random_backbone"] == "random-vit-dino-tiny-16"
    steps = {step["name"]: step for step in record["steps"]}
    assert set(steps) == {
        f"seed{s}/{n}" for s in (0, 1) for n in ("dino-pretrain", "kmeans-random", "kmeans-self-trained")
    }
    assert all(not step["train"]["reused"] and step["train"]["seconds"] > 0 for step in steps.values())
    assert (output / "seed0" / "dino-pretrain" / "backbone" / "config.json").is_file()
    assert (output / "seed1" / "kmeans-self-trained" / "model" / "config.json").is_file()
    assert (output / "seed0" / "logs" / "kmeans-random.train.log").is_file()
    assert (output / "comparison-seed0" / "report.md").is_file()
    markdown = (output / "table.md").read_text()
    assert "8 images of 101" in markdown and "| DINO-feature k-means | random init |" in markdown
    # the self-trained arm runs on its seed's DINO teacher; the random-init arm differs from seed to seed
    from safetensors.torch import load_file

    teacher = load_file(output / "seed1" / "dino-pretrain" / "backbone" / "model.safetensors")
    kmeans = {
        s: {
            b: load_file(output / f"seed{s}" / f"kmeans-{b}" / "model" / "model.safetensors")
            for b in ("random", "self-trained")
        }
        for s in (0, 1)
    }
    assert all(kmeans[1]["self-trained"][f"backbone.model.{name}"].equal(value) for name, value in teacher.items())
    name = "backbone.model.embeddings.patch_embeddings.projection.weight"
    assert not kmeans[0]["random"][name].equal(kmeans[1]["random"][name])

    capsys.readouterr()
    assert table.main(argv) == 0  # everything reused: no training, the same numbers
    again = json.loads((output / "table.json").read_text())
    assert again["rows"] == rows
    assert all(step["train"]["reused"] and step.get("eval", {"reused": True})["reused"] for step in again["steps"])
    assert again["timing"]["reused_steps"] == 10
