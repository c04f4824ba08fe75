"""StegoConfig: defaults = the COCO-Stuff-27 release, presets = METHODS 1.2 table, validation, round trips."""

from __future__ import annotations

import json

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError
from tiny_configs import tiny_vit_config
from transformers import PreTrainedConfig, ViTConfig

from hf_useg.models.stego.configuration_stego import StegoConfig
from hf_useg.models.stego.training_stego import StegoTrainingOptions

LOSS_FIELDS = {
    "pos_intra_weight": 0.1,
    "pos_inter_weight": 1.0,
    "neg_inter_weight": 0.1538476246415498,
    "pos_intra_shift": 0.12,
    "pos_inter_shift": 0.2,
    "neg_inter_shift": 1.0,
    "pointwise": True,
    "zero_clamp": True,
    "stabilize": False,
    "feature_samples": 11,
    "neg_samples": 5,
    "correspondence_weight": 1.0,
    "dim": 90,
    "num_classes": 27,
    "extra_clusters": 0,
    "projection_type": "nonlinear",
    "dropout": 0.1,
}


def tiny_vit() -> ViTConfig:
    # transformers' LayerNorm eps (1e-12), not DINO's: the backbone-dict tests below tell the two apart
    return tiny_vit_config(num_hidden_layers=2, layer_norm_eps=1e-12)


def test_defaults_are_the_cocostuff_release():
    config = StegoConfig()
    for name, value in LOSS_FIELDS.items():
        assert getattr(config, name) == value, name
        assert type(getattr(config, name)) is type(value), name
    assert isinstance(config, PreTrainedConfig) and config.model_type == "stego"
    vit = config.backbone_config
    assert isinstance(vit, ViTConfig)
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (vit.patch_size, vit.image_size, vit.layer_norm_eps, vit.qkv_bias) == (8, 224, 1e-6, True)
    assert config.pos_embed_interpolation == "auto"
    # the training settings of the release are the recipe's defaults, not config fields
    options = StegoTrainingOptions()
    assert (options.num_neighbors, options.crop_ratio, options.five_crop) == (7, 0.5, True)
    assert (options.resolution, options.eval_resolution, options.val_every) == (224, 320, 100)
    assert (options.head_learning_rate, options.probe_learning_rate) == (5e-4, 5e-3)
    assert (options.max_steps, options.batch_size) == (7000, 32)
    assert not any(hasattr(config, name) for name in ("max_steps", "batch_size", "head_learning_rate", "five_crop"))
    assert config.backbone_name == "facebook/dino-vitb8"
    # The loss fields alone build an equal config.
    assert StegoConfig(**LOSS_FIELDS).to_dict() == config.to_dict()


# METHODS 1.2 table, written out again independently of the presets in the package.
TABLE = {
    "cocostuff27": dict(
        hidden=768, heads=12, dim=90, steps=7000, batch=32, five=True, pointwise=True, classes=27,
        w=(0.1538476246415498, 1.0, 0.1), b=(1.0, 0.2, 0.12),
    ),
    "cityscapes27": dict(
        hidden=768, heads=12, dim=100, steps=7000, batch=32, five=True, pointwise=False, classes=27,
        w=(0.9058762625226623, 0.577453483136995, 1.0),
        b=(0.31361241889448443, 0.1754346515479633, 0.45828472207),
    ),
    "potsdam3": dict(
        hidden=384, heads=6, dim=70, steps=5000, batch=16, five=False, pointwise=True, classes=3,
        w=(0.63, 0.25, 0.67), b=(0.76, 0.02, 0.08),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_match_the_methods_table(name):
    row = TABLE[name]
    config = StegoConfig.for_dataset(name)
    assert config.backbone_config.hidden_size == row["hidden"]
    assert config.backbone_config.num_attention_heads == row["heads"]
    assert config.backbone_config.intermediate_size == 4 * row["hidden"]
    assert config.backbone_config.patch_size == 8 and config.backbone_config.layer_norm_eps == 1e-6
    options = StegoTrainingOptions.from_preset(name)
    assert (config.dim, options.max_steps, options.batch_size) == (row["dim"], row["steps"], row["batch"])
    assert (options.five_crop, config.pointwise, config.num_classes) == (
        row["five"],
        row["pointwise"],
        row["classes"],
    )
    assert (config.neg_inter_weight, config.pos_inter_weight, config.pos_intra_weight) == row["w"]
    assert (config.neg_inter_shift, config.pos_inter_shift, config.pos_intra_shift) == row["b"]
    # common values
    assert (config.zero_clamp, config.stabilize, config.feature_samples, config.neg_samples) == (
        True,
        False,
        11,
        5,
    )
    assert (config.extra_clusters, options.resolution, options.head_learning_rate) == (0, 224, 5e-4)
    assert config.dataset_name == name
    assert config.num_labels == row["classes"]


def test_preset_overrides_and_unknown_name():
    config = StegoConfig.for_dataset("potsdam3", backbone_config=tiny_vit(), dim=12, extra_clusters=2)
    assert config.backbone_config.hidden_size == 32 and config.dim == 12
    assert StegoTrainingOptions.from_preset("potsdam3", max_steps=10).max_steps == 10
    assert config.num_clusters == 5 and config.pointwise is True
    # presets are not shared mutable state
    StegoConfig.for_dataset("cocostuff27").backbone_config.hidden_size = 1
    assert StegoConfig.for_dataset("cocostuff27").backbone_config.hidden_size == 768
    with pytest.raises(
        ValueError, match="unknown STEGO preset 'coco'; available: cityscapes27, cocostuff27, potsdam3"
    ):
        StegoConfig.for_dataset("coco")


def test_stabalize_spelling_is_accepted():
    assert StegoConfig(stabalize=True).stabilize is True
    assert "stabalize" not in StegoConfig(stabalize=True).to_dict()
    # a config dict written by STEGO's code
    assert StegoConfig.from_dict({"stabalize": True, "dim": 70}).stabilize is True


def test_id2label_and_num_labels():
    config = StegoConfig(num_classes=3, extra_clusters=2, backbone_config=tiny_vit())
    assert config.num_clusters == 5 and config.num_labels == 5
    assert config.id2label == {0: "cluster_0", 1: "cluster_1", 2: "cluster_2", 3: "cluster_3", 4: "cluster_4"}
    assert config.label2id["cluster_4"] == 4
    named = StegoConfig(num_classes=2, id2label={0: "sky", 1: "road"})
    assert named.id2label == {0: "sky", 1: "road"} and named.label2id == {"sky": 0, "road": 1}
    assert StegoConfig(num_classes=4, num_labels=4).num_labels == 4
    with pytest.raises(ValueError, match="id2label has 2 entries but the model has num_clusters = 3"):
        StegoConfig(num_classes=3, id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match=r"num_labels \(5\) must equal num_clusters"):
        StegoConfig(num_classes=3, num_labels=5)


def test_save_load_round_trip(tmp_path):
    config = StegoConfig.for_dataset(
        "cityscapes27", backbone_config=tiny_vit(), stabilize=True, id2label={i: f"c{i}" for i in range(27)}
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "stego" and saved["backbone_config"]["model_type"] == "vit"
    assert saved["neg_inter_shift"] == 0.31361241889448443
    loaded = StegoConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.id2label[26] == "c26" and isinstance(loaded.backbone_config, ViTConfig)
    assert loaded.backbone_config.hidden_size == 32


def test_backbone_config_dict():
    # a dict without model_type overrides the default DINO ViT-B/8 (keeping DINO's LayerNorm eps)
    config = StegoConfig(backbone_config={"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536})
    assert isinstance(config.backbone_config, ViTConfig)
    assert (config.backbone_config.hidden_size, config.backbone_config.patch_size) == (384, 8)
    assert config.backbone_config.layer_norm_eps == 1e-6
    full = StegoConfig(backbone_config=tiny_vit().to_dict())
    assert full.backbone_config.hidden_size == 32 and full.backbone_config.layer_norm_eps == 1e-12


def test_int_values_for_float_fields_are_accepted(tmp_path):
    """Float fields are typed `float | int` (YAML writes `1` for 1.0); the loss computes the same with either."""
    config = StegoConfig(pos_intra_weight=1, neg_inter_shift=0, correspondence_weight=2)
    assert (config.pos_intra_weight, config.neg_inter_shift, config.correspondence_weight) == (1.0, 0.0, 2.0)
    config.save_pretrained(tmp_path)
    assert StegoConfig.from_pretrained(tmp_path).correspondence_weight == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"projection_type": "mlp"}, ValueError, "projection_type must be one of"),
        ({"pos_embed_interpolation": "bicubic"}, ValueError, "pos_embed_interpolation must be one of"),
        ({"dim": 0}, ValueError, "dim must be > 0"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        ({"extra_clusters": -1}, ValueError, "extra_clusters must be >= 0"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"feature_samples": 0}, ValueError, "feature_samples must be >= 1"),
        ({"neg_samples": 0}, ValueError, "neg_samples must be >= 1"),
        ({"dim": 90.0}, StrictDataclassFieldValidationError, "'dim' expected int, got float"),
        ({"num_classes": True}, StrictDataclassFieldValidationError, "'num_classes' expected int, got bool"),
        ({"pointwise": 1}, StrictDataclassFieldValidationError, "'pointwise' expected bool, got int"),
        ({"pos_inter_shift": "0.2"}, StrictDataclassFieldValidationError, "'pos_inter_shift' with value '0.2'"),
        ({"stabilize": "yes"}, StrictDataclassFieldValidationError, "'stabilize' expected bool, got str"),
        ({"backbone_name": 3}, StrictDataclassFieldValidationError, "'backbone_name' with value 3"),
    ],
)
def test_validation_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        StegoConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop_ratio": 0.0}, r"crop_ratio must be in \(0, 1\]"),
        ({"head_learning_rate": 0.0}, "head_learning_rate and probe_learning_rate must be > 0"),
        ({"num_neighbors": 0}, "num_neighbors must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_training_option_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StegoTrainingOptions(**kwargs)
