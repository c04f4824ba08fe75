"""The shared training spine: arguments and their routing, the deterministic sampler, the registry, workers,
and configs written before the recipes existed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_useg.registry import get_method, method_for_model_type, method_names
from hf_useg.training import (
    BatchIndex,
    Recipe,
    StepBatchSampler,
    load_training_arguments,
    resolve_recipe_options,
    step_generator,
    step_seed,
    train,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
STEGO_TINY = REPO / "training" / "configs" / "stego_tiny.yaml"


def test_every_method_is_registered_once_with_loadable_classes():
    assert set(method_names()) >= {"stego", "picie", "iic", "dino_kmeans", "dino_pretrain"}
    for name in method_names():
        spec = get_method(name)
        config_class, model_class = spec.load_config_class(), spec.load_model_class()
        assert model_class.config_class is config_class
        assert issubclass(spec.load_recipe_class(), Recipe)
        assert method_for_model_type(spec.model_type) is spec
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("segformer")


def test_flat_options_are_routed_to_the_recipe_and_config_fields_to_the_model(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "method: stego\nmax_steps: 5\nmodel:\n  dim: 16\n  head_learning_rate: 0.001\nrecipe:\n  knn_k: 4\n"
    )
    args = load_training_arguments(config, batch_size=2, model={"pointwise": False})
    # head_learning_rate under model: is a training setting of older files: it goes to the recipe
    assert args.model == {"dim": 16, "pointwise": False}
    assert args.recipe == {"max_steps": 5, "head_learning_rate": 0.001, "knn_k": 4, "batch_size": 2}
    options = resolve_recipe_options(args)
    assert (options.max_steps, options.batch_size, options.head_learning_rate) == (5, 2, 1e-3)
    assert isinstance(options.head_learning_rate, float)


def test_presets_give_the_published_schedule_and_overrides_win():
    args = load_training_arguments(None, method="stego", preset="potsdam3")
    options = resolve_recipe_options(args)
    assert (options.max_steps, options.batch_size, options.five_crop) == (5000, 16, False)
    options = resolve_recipe_options(load_training_arguments(None, method="stego", preset="potsdam3", max_steps=3))
    assert options.max_steps == 3


def test_bad_options_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: stego\nlearning_rate_typo: 3\n")
    with pytest.raises(ValueError, match="learning_rate_typo"):
        load_training_arguments(bad)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        resolve_recipe_options(load_training_arguments(None, batch_size=0))
    with pytest.raises(ValueError, match="head_learning_rate must be a number"):
        resolve_recipe_options(load_training_arguments(None, head_learning_rate="fast"))
    with pytest.raises(ValueError, match="unknown StegoTrainingOptions preset 'nope'; available: cityscapes27"):
        type(resolve_recipe_options(load_training_arguments(None))).from_preset("nope")


def test_sampler_is_deterministic_resumable_and_split_over_processes():
    sampler = StepBatchSampler(10, batch_size=2, seed=3)
    first = [[item.index for item in batch] for batch in sampler]
    assert len(first) == 5 and sorted(sum(first, [])) == list(range(10))
    sampler.start(epoch=0, first_batch=3)
    assert [[item.index for item in batch] for batch in sampler] == first[3:]
    batch = next(iter(sampler))
    assert [item.step for item in batch] == [3, 3] and [item.position for item in batch] == [0, 1]
    assert batch[0].seed == step_seed(3, 3, 0)
    ranks = [StepBatchSampler(10, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    shares = [[[item.index for item in b] for b in s] for s in ranks]
    assert len(shares[0]) == 2 and not set(sum(shares[0], [])) & set(sum(shares[1], []))
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepBatchSampler(3, batch_size=2, seed=0, world_size=2)


def test_step_generator_is_the_step_seed():
    key = BatchIndex(index=0, step=7, seed=step_seed(1, 7, 0), position=0, batch_size=1)
    expected = torch.Generator().manual_seed(step_seed(1, 7, 0))
    assert torch.equal(torch.rand(4, generator=step_generator(key)), torch.rand(4, generator=expected))


def test_a_stego_config_written_before_the_recipes_still_loads(tmp_path):
    from hf_useg import StegoConfig

    old = json.loads((FIXTURES / "stego_config_v0.1.0.json").read_text())
    assert old["max_steps"] == 123 and old["head_learning_rate"] == 0.001  # the fixture has the old keys
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = StegoConfig.from_pretrained(tmp_path)
    assert (config.dim, config.num_classes, config.pos_intra_shift) == (8, 3, 0.08)
    assert not hasattr(config, "max_steps") and "max_steps" not in config.to_dict()


def test_a_dino_kmeans_model_saved_before_the_fitted_buffer_loads_fitted():
    from hf_useg import DinoForUnsupervisedSegmentation

    folder = FIXTURES / "dino_kmeans_v0.1.0"
    assert json.loads((folder / "config.json").read_text())["is_fitted"] is True
    model = DinoForUnsupervisedSegmentation.from_pretrained(folder)
    assert model.is_fitted
    assert torch.equal(model.cluster_probe.clusters, load_file(folder / "model.safetensors")["cluster_probe.clusters"])
    assert model.predict(torch.randn(1, 3, 16, 16)).cluster_log_probs.shape == (1, 2, 16, 16)


def test_dino_kmeans_fitted_state_is_saved_with_the_weights(tmp_path):
    from transformers import ViTConfig

    from hf_useg import DinoForUnsupervisedSegmentation, DinoSegmentationConfig

    tiny = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, patch_size=8, image_size=16
    )
    model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=tiny, num_clusters=2))
    model.save_pretrained(tmp_path / "unfitted")
    model.fit([torch.randn(2, 3, 16, 16)], progress=False)
    model.save_pretrained(tmp_path / "fitted")
    assert "is_fitted" not in json.loads((tmp_path / "fitted" / "config.json").read_text())
    assert DinoForUnsupervisedSegmentation.from_pretrained(tmp_path / "fitted").is_fitted
    assert not DinoForUnsupervisedSegmentation.from_pretrained(tmp_path / "unfitted").is_fitted


@pytest.mark.slow
def test_dataloader_workers_build_the_same_batches(tmp_path):
    """STEGO's pairs are drawn in the DataLoader: two workers train the model no worker trains (up to float
    rounding: worker processes run torch on one thread)."""
    common = dict(max_steps=3, val_every=100, save_every=100, synthetic_num_images=8, five_crop=False)
    train(load_training_arguments(STEGO_TINY, output_dir=str(tmp_path / "main"), **common))
    train(load_training_arguments(STEGO_TINY, output_dir=str(tmp_path / "workers"), num_workers=2, **common))
    main, workers = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("main", "workers"))
    for key in main:
        torch.testing.assert_close(workers[key], main[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_the_command_line_reads_the_yaml_then_its_own_options(tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "training" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "run"
    argv = ["--config", str(STEGO_TINY), "--output_dir", str(output), "--max_steps", "2", "--set", "dim=6"]
    argv += ["--cache_backbone_features", "true", "--val_every", "100", "--synthetic_num_images", "8"]
    assert script.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    saved = json.loads((output / "training_args.json").read_text())
    assert saved["model"] == {"dim": 6} and saved["recipe_options"]["cache_backbone_features"] is True
    assert saved["recipe_options"]["batch_size"] == 4  # from the YAML file
    assert json.loads((output / "model" / "config.json").read_text())["dim"] == 6


# ---------------------------------------------------------------------------------------------------------------
# a toy method, written the way the README's "Add a method" says, trained by the shared loop

from dataclasses import dataclass as _dataclass  # noqa: E402

from huggingface_hub.dataclasses import strict  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoConfig, PreTrainedConfig  # noqa: E402
from transformers.configuration_utils import SubConfigSpec  # noqa: E402

from hf_useg.backbones import FeatureBackbone  # noqa: E402
from hf_useg.clustering import ClusterProbe  # noqa: E402
from hf_useg.data.processing import ProcessedSegmentationDataset, collate_segmentation_batch  # noqa: E402
from hf_useg.modeling_utils import UnsupervisedSegmentationPreTrainedModel, UnsupervisedSegmenterOutput  # noqa: E402
from hf_useg.registry import MethodSpec, register_method  # noqa: E402
from hf_useg.training import ItemsByBatchIndex, RecipeOptions, TrainingStepOutput  # noqa: E402


@strict
class ToyConfig(PreTrainedConfig):
    model_type = "toy_segmenter"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit")}
    backbone_config: dict | PreTrainedConfig | None = None
    num_clusters: int = 3


class ToyForUnsupervisedSegmentation(UnsupervisedSegmentationPreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.backbone = FeatureBackbone(config.backbone_config, frozen=True)
        self.cluster_probe = ClusterProbe(self.backbone.hidden_size, config.num_clusters)
        self.post_init()

    def compute_code(self, pixel_values):
        return self.backbone(pixel_values).feature_map

    def probe_log_probs(self, code):
        return self.cluster_probe.log_probs(code, alpha=2.0), None

    def forward(self, pixel_values, labels=None, **kwargs):
        code = self.compute_code(pixel_values)
        loss, _ = self.cluster_probe(code.detach())
        return UnsupervisedSegmenterOutput(loss=loss, logits=self.cluster_probe.log_probs(code), code=code)


@_dataclass
class ToyOptions(RecipeOptions):
    learning_rate: float = 1e-2


class ToyRecipe(Recipe):
    options_class = ToyOptions

    def build_model(self, backbone_config, num_classes):
        return ToyForUnsupervisedSegmentation(ToyConfig(backbone_config=backbone_config, num_clusters=num_classes))

    def make_optimizer(self, model):
        return torch.optim.Adam(model.cluster_probe.parameters(), lr=self.options.learning_rate)

    def train_dataloader(self, batches):
        items = ProcessedSegmentationDataset(self.run.train_set, self.run.train_processor, self.run.num_classes)
        return DataLoader(
            ItemsByBatchIndex(items),
            batch_sampler=batches,
            collate_fn=collate_segmentation_batch,
            num_workers=self.args.num_workers,
        )

    def training_step(self, model, batch):
        return TrainingStepOutput(loss=model(batch["pixel_values"]).loss)


TOY = MethodSpec(
    name="toy",
    display_name="Toy",
    paper="nobody, never",
    description="A cluster probe on frozen features (a test of the spine).",
    config_class=f"{__name__}:ToyConfig",
    model_class=f"{__name__}:ToyForUnsupervisedSegmentation",
    recipe_class=f"{__name__}:ToyRecipe",
)


def test_a_toy_method_from_the_readme_trains_resumes_and_saves(tmp_path):
    register_method(TOY)
    summary = train(_toy_args(tmp_path / "full", max_steps=4, val_every=2))
    assert summary["steps"] == 4 and 0.0 <= summary["cluster_mean_iou"] <= 1.0
    train(_toy_args(tmp_path / "cut", max_steps=2, val_every=2))
    train(_toy_args(tmp_path / "cut", max_steps=4, val_every=2, resume_from_checkpoint="latest"))
    full, resumed = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "cut"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key

    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(tmp_path / "full" / "model")
    assert type(reloaded).__name__ == "ToyForUnsupervisedSegmentation"
    assert (tmp_path / "full" / "best" / "model.safetensors").exists()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Two micro-batches of 2 accumulated are the batch of 4 (the sampler cuts the same items; the toy loss is a
    mean over equal-sized batches), up to float rounding."""
    register_method(TOY)
    train(_toy_args(tmp_path / "batch4", batch_size=4))
    accumulated = train(_toy_args(tmp_path / "accumulated", batch_size=2, gradient_accumulation_steps=2))
    assert accumulated["steps"] == 3
    large, micro = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("batch4", "accumulated"))
    torch.testing.assert_close(micro["cluster_probe.clusters"], large["cluster_probe.clusters"], rtol=1e-5, atol=1e-6)
    # without accumulation the same micro-batches make 3 steps of their own: another model
    train(_toy_args(tmp_path / "batch2", batch_size=2))
    small = load_file(tmp_path / "batch2" / "model" / "model.safetensors")
    assert not torch.allclose(small["cluster_probe.clusters"], large["cluster_probe.clusters"], rtol=1e-5, atol=1e-6)


def _toy_args(output_dir, **overrides):
    values = dict(
        method="toy",
        backbone="random-vit-micro",
        synthetic_num_images=8,
        synthetic_image_size=32,
        synthetic_num_classes=3,
        resolution=32,
        eval_resolution=32,
        batch_size=4,
        val_every=100,
        save_every=2,
        log_every=1,
        max_steps=3,
        progress=False,
    )
    values.update(overrides)
    return load_training_arguments(None, output_dir=str(output_dir), **values)


def test_a_fresh_run_refuses_a_folder_holding_another_run_unless_told_to_replace_it(tmp_path):
    register_method(TOY)
    train(_toy_args(tmp_path))
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints, model, metrics.jsonl\).*--overwrite"):
        train(_toy_args(tmp_path, seed=1))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-00000002", "checkpoint-00000003"]
    train(_toy_args(tmp_path, seed=1, max_steps=1, overwrite_output_dir=True))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-00000001"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resuming_another_runs_checkpoint_names_the_difference(tmp_path):
    register_method(TOY)
    train(_toy_args(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"belongs to another run.*seed: checkpoint 0, this run 5"):
        train(_toy_args(tmp_path, seed=5, resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match=r"belongs to another run.*learning_rate: checkpoint 0.01, this run 0.5"):
        train(_toy_args(tmp_path, learning_rate=0.5, resume_from_checkpoint="latest"))
    # what may change: how long it trains, how it logs and saves
    summary = train(_toy_args(tmp_path, max_steps=4, save_every=4, resume_from_checkpoint="latest"))
    assert summary["steps"] == 4


def test_a_resumed_run_logs_no_step_twice_and_cleans_interrupted_writes(tmp_path):
    register_method(TOY)
    train(_toy_args(tmp_path))  # checkpoints at 2 and 3, metrics logged at 1, 2, 3
    stale = tmp_path / "checkpoints" / ".tmp-checkpoint-00000009"
    stale.mkdir()
    # resume from step 2 as if the run had died after logging step 3
    train(_toy_args(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoints" / "checkpoint-00000002")))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not stale.exists()


def test_a_typo_under_model_is_an_error_listing_the_config_fields(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("method: stego\nmodel:\n  dimm: 9\n")
    with pytest.raises(
        ValueError, match=r"unknown stego model option 'dimm'; the stego config's fields are \[.*'dim'"
    ):
        load_training_arguments(config)
    # STEGO's own spelling of a field, and training settings of older files, are still read
    args = load_training_arguments(None, method="stego", model={"stabalize": True, "max_steps": 3})
    assert args.model == {"stabalize": True} and args.recipe == {"max_steps": 3}


def test_the_command_line_reports_a_mistake_in_one_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "training" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert script.main(["--config", str(STEGO_TINY), "--output_dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("train.py: output_dir") and "already holds a run (metrics.jsonl)" in error
    assert len(error.splitlines()) == 1
    with pytest.raises(ValueError, match="already holds a run"):
        script.main(["--config", str(STEGO_TINY), "--output_dir", str(tmp_path), "--debug"])


def test_dino_pretraining_is_not_resumed_with_another_length(tmp_path):
    """DINO's cosine schedules span the whole run: another max_steps is another run."""
    tiny = REPO / "training" / "configs" / "dino_pretrain_tiny.yaml"
    train(load_training_arguments(tiny, output_dir=str(tmp_path), max_steps=2, save_every=2))
    with pytest.raises(
        ValueError, match=r"belongs to another run, refusing to resume it \(max_steps: checkpoint 2, this run 6\)"
    ):
        train(load_training_arguments(tiny, output_dir=str(tmp_path), resume_from_checkpoint="latest"))
