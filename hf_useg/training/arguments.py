"""The arguments of a training run: `TrainingArguments` (what every method shares), the method's own
`RecipeOptions` (its schedule and training settings), and ``model`` overrides of the method's config.

A YAML file under ``training/configs`` holds all three: top-level keys are `TrainingArguments` fields or the
method's recipe options, ``model:`` holds config fields and ``recipe:`` may hold recipe options explicitly.
Training settings that older files kept under ``model:`` (learning rates, steps, ...) are read as recipe options.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainingArguments", "load_training_arguments", "resolve_recipe_options"]


@dataclass
class TrainingArguments:
    """What every training run takes (``training/train.py --help`` lists these and the method's recipe options).

    ``model`` holds overrides of the method's config (e.g. ``{"dim": 70}``), ``recipe`` overrides of its recipe
    options (e.g. ``{"max_steps": 600}``); ``preset`` picks published settings for both
    (``StegoConfig.for_dataset("cocostuff27")`` and the STEGO recipe's ``cocostuff27`` schedule).

    Example:

    ```python
    >>> from hf_useg.training import load_training_arguments
    >>> args = load_training_arguments(None, method="stego", max_steps=10, model={"dim": 16})
    >>> args.recipe, args.model
    ({'max_steps': 10}, {'dim': 16})
    ```
    """

    method: str = field(default="stego", metadata={"help": "the method (hf_useg.registry.method_names())"})
    dataset: str = field(
        default="synthetic", metadata={"help": "Hub id, datasets folder, Parquet files, images/+labels/ folder pair"}
    )
    train_split: str = "train"
    val_split: str | None = "val"
    num_classes: int | None = None
    class_names: list[str] | None = None
    image_column: str | None = None
    label_column: str | None = None
    backbone: str = field(
        default="random-vit-tiny",
        metadata={"help": "Hub id or folder of a backbone, a RANDOM_BACKBONES name, or 'none' (trunk from scratch)"},
    )
    preset: str | None = field(default=None, metadata={"help": "published settings of the method (config + recipe)"})
    model: dict | str | None = field(default_factory=dict, metadata={"help": "JSON overrides of the model config"})
    recipe: dict | str | None = field(default_factory=dict, metadata={"help": "JSON overrides of the recipe options"})
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace the run already in output_dir (else a fresh run refuses it)"}
    )
    eval_batch_size: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    max_val_images: int | None = field(
        default=None, metadata={"help": "images of each periodic validation (the final evaluation uses all)"}
    )
    max_train_images: int | None = None
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    seed: int = 0
    num_workers: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = field(default=None, metadata={"help": "clip the gradient norm (None: no clip)"})
    report_to: list[str] = field(default_factory=list)
    log_every: int = 10
    final_crf: bool = False
    final_flip_tta: bool = True
    synthetic_num_images: int = 48
    synthetic_image_size: int = 64
    synthetic_num_classes: int = 4
    progress: bool = True

    def __post_init__(self):
        from ..registry import get_method

        get_method(self.method)  # a clear error listing the methods
        for name in ("model", "recipe"):
            value = getattr(self, name)
            if value is None:
                value = {}
            elif isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping of options, got {value!r}")
            setattr(self, name, dict(value))
        if isinstance(self.max_grad_norm, int):
            self.max_grad_norm = float(self.max_grad_norm)
        for name in ("save_every", "keep_checkpoints", "eval_batch_size", "log_every", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# PreTrainedConfig's own fields (accepted under model:, not worth listing in an error)
_BASE_CONFIG_FIELDS = {
    "transformers_version",
    "architectures",
    "output_hidden_states",
    "return_dict",
    "dtype",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
}


def _argument_names() -> set[str]:
    return {item.name for item in dataclasses.fields(TrainingArguments)}


def _config_field_names(config_class) -> set[str]:
    return (
        {item.name for item in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    )


def load_training_arguments(path: str | os.PathLike | None = None, **overrides: Any) -> TrainingArguments:
    """Read a YAML config and apply ``overrides`` (None values skipped).

    Keys may be `TrainingArguments` fields, the method's recipe options (routed to ``recipe``), or ``model`` /
    ``recipe`` mappings (merged key by key). Keys under ``model`` that are recipe options rather than config fields
    (``learning_rate``, ``max_steps``, ... in files written for earlier releases) are routed to ``recipe``.
    Unknown keys are an error that lists the valid ones.
    """
    import yaml

    from ..registry import get_method

    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a training config must be a mapping of options, got {type(loaded).__name__}")
        values.update(loaded)
    flat = {key: value for key, value in overrides.items() if value is not None}
    method = flat.get("method", values.get("method", "stego"))
    spec = get_method(method)
    option_names = spec.load_recipe_class().options_class.field_names()
    config_names = _config_field_names(spec.load_config_class())
    argument_names = _argument_names()

    merged: dict[str, Any] = {"model": {}, "recipe": {}}
    config_keys = config_names | {"num_labels"} | set(getattr(spec.load_config_class(), "accepted_aliases", ()))
    for source_name, source in ((str(path), values), ("overrides", flat)):
        for key, value in source.items():
            if key in ("model", "recipe"):
                if isinstance(value, str):
                    value = json.loads(value)
                for inner, inner_value in (value or {}).items():
                    legacy = key == "model" and inner in option_names and inner not in config_names
                    if key == "model" and not legacy and inner not in config_keys:
                        own = sorted(config_names - _BASE_CONFIG_FIELDS)
                        raise ValueError(
                            f"{source_name}: unknown {method} model option {inner!r}; the {method} config's fields "
                            f"are {own} (training settings are the recipe's: {sorted(option_names)})"
                        )
                    merged["recipe" if key == "recipe" or legacy else "model"][inner] = inner_value
            elif key in argument_names:
                merged[key] = value
            elif key in option_names:
                merged["recipe"][key] = value
            else:
                raise ValueError(
                    f"{source_name}: unknown option {key!r}; valid options are {sorted(argument_names)} and the "
                    f"{method} recipe's {sorted(option_names)} (model config fields go under model:)"
                )
    return TrainingArguments(**merged)


def resolve_recipe_options(args: TrainingArguments):
    """The recipe options of ``args``: the preset's (when the recipe has one by that name), then ``args.recipe``."""
    from ..registry import get_method

    options_class = get_method(args.method).load_recipe_class().options_class
    preset = args.preset if args.preset in options_class.presets else None
    return options_class.from_preset(preset, **args.recipe)
