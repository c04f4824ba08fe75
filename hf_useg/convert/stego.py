"""Convert STEGO's released PyTorch Lightning checkpoints into [`StegoForUnsupervisedSegmentation`] models
(METHODS 1.5).

A released checkpoint (``cocostuff27_vit_base_5.ckpt``, ``cityscapes_vit_base_1.ckpt``, ``potsdam_test.ckpt``)
holds ``state_dict`` and ``hyper_parameters`` (``n_classes`` and the training config, an OmegaConf
``DictConfig``). It is read with [`~hf_useg.convert.checkpoint_io.load_checkpoint`], which never runs
foreign code and needs neither OmegaConf nor Lightning.

| STEGO (Lightning module)                   | `StegoForUnsupervisedSegmentation`                      |
|--------------------------------------------|---------------------------------------------------------|
| ``net.model.*`` (DINO/timm ViT)            | ``backbone.model.*`` (`ViTModel`, [`convert_dino_vit_state_dict`]) |
| ``net.cluster1.0.*``                       | ``segmentation_head.linear.*``                          |
| ``net.cluster2.0.*``, ``net.cluster2.2.*`` | ``segmentation_head.nonlinear.0.*``, ``.nonlinear.2.*`` |
| ``cluster_probe.clusters``                 | ``cluster_probe.clusters``                              |
| ``linear_probe.*``                         | ``linear_probe.*``                                      |
| ``train_cluster_probe.*``, ``decoder.*``   | dropped (unused at inference)                           |

The architecture comes from the tensors: the ViT (hidden size, patch size, depth, MLP width, position grid;
heads = hidden / 64, LayerNorm eps 1e-6, DINO's position-embedding interpolation), the code dimension, the
projection type (``nonlinear`` when ``net.cluster2`` exists), the classes (rows of ``linear_probe.weight``)
and the extra clusters (rows of ``cluster_probe.clusters`` minus the classes). The training hyper-parameters
(loss weights and shifts, ``pointwise``, ``zero_clamp``, ``stabalize``, sampling, crops, resolution, steps,
...) come from ``hyper_parameters["cfg"]`` when present; a config that contradicts the tensors is reported
with a warning and the tensors win. STEGO's ``dropout`` config entry is a flag (whether the loss sees
dropped-out features), not the probability, which STEGO fixes at 0.1: the converted config keeps 0.1.

**Labels.** ``config.id2label`` names the *cluster-probe* outputs, which is what the ``image-segmentation``
pipeline reads. Cluster ids are not class ids (the paper's numbers come from a Hungarian matching of clusters
to classes on the evaluation set), so they stay ``cluster_<i>`` unless ``id2label`` is given, e.g. after
evaluating the model and calling ``model.set_cluster_names(assignment, class_names)``. The *linear probe* was
trained with labels, so its outputs are the dataset's classes in order; for ``cocostuff27``, ``cityscapes27``
and ``potsdam3`` their names (from ``hf_useg/resources/label_maps.json``) are listed in the model card.

Example:

```python
>>> from hf_useg.convert import convert_stego_checkpoint
>>> model = convert_stego_checkpoint("cocostuff27_vit_base_5.ckpt", "stego-cocostuff27")  # doctest: +SKIP
>>> model.config.backbone_config.hidden_size, model.config.dim, model.config.num_clusters  # doctest: +SKIP
(768, 90, 27)
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.stego import StegoConfig, StegoForUnsupervisedSegmentation
from ..models.stego.training_stego import StegoTrainingOptions
from .checkpoint_io import load_checkpoint
from .dino_vit import convert_dino_vit_state_dict, expected_dino_vit_keys, vit_config_from_dino_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "convert_stego_checkpoint",
    "convert_stego_state_dict",
    "stego_config_from_checkpoint",
    "stego_training_options_from_checkpoint",
]

_BACKBONE_PREFIX = "net.model."
_HEAD_RENAMES = {
    "net.cluster1.0.weight": "segmentation_head.linear.weight",
    "net.cluster1.0.bias": "segmentation_head.linear.bias",
    "net.cluster2.0.weight": "segmentation_head.nonlinear.0.weight",
    "net.cluster2.0.bias": "segmentation_head.nonlinear.0.bias",
    "net.cluster2.2.weight": "segmentation_head.nonlinear.2.weight",
    "net.cluster2.2.bias": "segmentation_head.nonlinear.2.bias",
    "cluster_probe.clusters": "cluster_probe.clusters",
    "linear_probe.weight": "linear_probe.weight",
    "linear_probe.bias": "linear_probe.bias",
}
# The head and probes every STEGO (DinoFeaturizer) checkpoint has; net.cluster2.* only with a nonlinear projection.
_REQUIRED_HEAD = (
    "net.cluster1.0.weight",
    "net.cluster1.0.bias",
    "cluster_probe.clusters",
    "linear_probe.weight",
    "linear_probe.bias",
)
_NONLINEAR_HEAD = ("net.cluster2.0.weight", "net.cluster2.0.bias", "net.cluster2.2.weight", "net.cluster2.2.bias")
# Keys that only STEGO's LightningModule has (besides the ViT under net.model.).
_STEGO_MARKERS = ("net.cluster1.", "net.cluster2.", "cluster_probe.", "train_cluster_probe.", "linear_probe.")
# Parts of STEGO's LightningModule that inference does not use.
_UNUSED_PREFIXES = ("train_cluster_probe.", "decoder.")

# STEGO's dataset names -> the package's benchmark names (hf_useg/resources/label_maps.json).
_DATASETS = {
    "cocostuff27": "cocostuff27",
    "cityscapes": "cityscapes27",
    "cityscapes27": "cityscapes27",
    "potsdam": "potsdam3",
    "potsdamraw": "potsdam3",
    "potsdam3": "potsdam3",
}
_DINO_WIDTHS = {384: ("vit_small", "s"), 768: ("vit_base", "b")}

# STEGO config key -> (StegoConfig field, kind). Only training hyper-parameters: inference never reads them.
_CFG_FIELDS = {
    "pointwise": ("pointwise", bool),
    "zero_clamp": ("zero_clamp", bool),
    "stabalize": ("stabilize", bool),
    "stabilize": ("stabilize", bool),
    "feature_samples": ("feature_samples", int),
    "neg_samples": ("neg_samples", int),
    "correspondence_weight": ("correspondence_weight", float),
    "pos_intra_weight": ("pos_intra_weight", float),
    "pos_inter_weight": ("pos_inter_weight", float),
    "neg_inter_weight": ("neg_inter_weight", float),
    "pos_intra_shift": ("pos_intra_shift", float),
    "pos_inter_shift": ("pos_inter_shift", float),
    "neg_inter_shift": ("neg_inter_shift", float),
    "num_neighbors": ("num_neighbors", int),
    "crop_ratio": ("crop_ratio", float),
    "res": ("resolution", int),
    "max_steps": ("max_steps", int),
    "batch_size": ("batch_size", int),
    "val_freq": ("val_every", int),
    "lr": ("head_learning_rate", float),
}


# ------------------------------------------------------------------------------------------------------------
# recognising the checkpoint
# ------------------------------------------------------------------------------------------------------------


def _sample_keys(mapping: Mapping, count: int = 8) -> str:
    keys = [str(key) for key in list(mapping)[:count]]
    return ", ".join(keys) + (", ..." if len(mapping) > count else "")


def _describe(checkpoint: Any) -> str:
    """What a checkpoint that is not STEGO's looks like, for the error message."""
    if not isinstance(checkpoint, Mapping):
        return f"a pickled {type(checkpoint).__name__}, not a checkpoint dict"
    if not checkpoint:
        return "an empty dict"
    inner = checkpoint.get("state_dict")
    keys = [str(key) for key in (inner if isinstance(inner, Mapping) else checkpoint)]
    if "classifier1_state_dict" in checkpoint or any(key.startswith("module.backbone.") for key in keys):
        return (
            "a PiCIE checkpoint (ResNet-18 + FPN under 'module.backbone.'/'module.decoder.', k-means centroids "
            "in 'classifier1_state_dict'): it is not a STEGO model"
        )
    if "cls_token" in keys and any(key.startswith("blocks.") for key in keys):
        return (
            "a bare DINO/timm ViT state dict (a backbone, no STEGO head or probes): load it with "
            "hf_useg.convert.convert_dino_vit_state_dict"
        )
    if any(key.startswith("backbone.model.") for key in keys):
        return "an hf_useg model state dict (already converted): load the model folder with from_pretrained"
    if "net.cluster1.0.weight" in keys and "net.model.cls_token" not in keys:
        return (
            "a STEGO checkpoint without a DINO ViT under 'net.model.' (e.g. arch 'feature-pyramid'), which "
            "this converter does not support"
        )
    if isinstance(inner, Mapping):
        kind = "a PyTorch Lightning checkpoint" if "pytorch-lightning_version" in checkpoint else "a checkpoint"
        return f"{kind} of another model (state_dict keys: {_sample_keys(inner)})"
    return f"a dict with keys {_sample_keys(checkpoint)}"


def _has_dino_vit(keys: Sequence[str]) -> bool:
    return any(key.startswith(("net.model.blocks.", "net.model.patch_embed.")) for key in keys) or (
        "net.model.cls_token" in keys
    )


def _is_stego(keys: Sequence[str]) -> bool:
    """Whether the weights are STEGO's (a DINO ViT under ``net.model.`` and STEGO's head or probes), complete
    or not."""
    return _has_dino_vit(keys) and any(key.startswith(_STEGO_MARKERS) for key in keys)


def _missing_stego_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """The weights a STEGO checkpoint with this ViT depth and projection type must have but ``state_dict`` lacks."""
    keys = [str(key) for key in state_dict]
    backbone = [key[len(_BACKBONE_PREFIX) :] for key in keys if key.startswith(_BACKBONE_PREFIX)]
    expected = [_BACKBONE_PREFIX + key for key in expected_dino_vit_keys(backbone)] + list(_REQUIRED_HEAD)
    if any(key.startswith("net.cluster2.") for key in keys):
        expected += _NONLINEAR_HEAD
    present = set(keys)
    return [key for key in expected if key not in present]


def _incomplete(what: str, missing: list[str]) -> ValueError:
    shown = missing if len(missing) <= 20 else [*missing[:20], f"... ({len(missing)} in all)"]
    return ValueError(
        f"incomplete STEGO {what}: missing {shown}. The checkpoint is STEGO's but lacks these weights (a truncated or "
        "partial save?); the model cannot be built without them"
    )


def _split_checkpoint(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, hyper_parameters)`` of a STEGO checkpoint (a Lightning checkpoint or a bare state dict of
    STEGO's LightningModule); `ValueError` naming what was found otherwise, or the missing weights of a STEGO
    checkpoint that lacks some."""
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    hyper_parameters: Any = {}
    if isinstance(state_dict, Mapping):
        hyper_parameters = checkpoint.get("hyper_parameters") or {}
    elif isinstance(checkpoint, Mapping) and _is_stego([str(key) for key in checkpoint]):
        state_dict = checkpoint
    if not isinstance(state_dict, Mapping) or not _is_stego([str(key) for key in state_dict]):
        raise ValueError(f"not a STEGO checkpoint: found {_describe(checkpoint)}")
    missing = _missing_stego_keys(state_dict)
    if missing:
        raise _incomplete("checkpoint", missing)
    if not isinstance(hyper_parameters, Mapping):
        raise ValueError(
            f"STEGO checkpoint: hyper_parameters is a {type(hyper_parameters).__name__}, expected a mapping"
        )
    for key, value in state_dict.items():
        if (key.startswith("net.") or key in _HEAD_RENAMES) and not isinstance(value, torch.Tensor):
            raise ValueError(f"STEGO checkpoint: {key} is a {type(value).__name__}, expected a tensor")
    return dict(state_dict), dict(hyper_parameters)


# ------------------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------------------


def convert_stego_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the weights of STEGO's LightningModule (``ckpt["state_dict"]``) to
    `StegoForUnsupervisedSegmentation` names (table in the module docstring); the fused ``qkv`` of each ViT
    block is split into ``q_proj``/``k_proj``/``v_proj``.

    ``train_cluster_probe.*`` and ``decoder.*`` are dropped; other keys outside ``net.`` are dropped with a
    warning; an unknown key under ``net.`` (a head this converter does not know) is a `ValueError`, and so is a
    STEGO state dict that lacks weights (they are named).

    Example:

    ```python
    >>> ckpt = load_checkpoint("potsdam_test.ckpt")  # doctest: +SKIP
    >>> weights = convert_stego_state_dict(ckpt["state_dict"])  # doctest: +SKIP
    >>> weights["segmentation_head.linear.weight"].shape  # doctest: +SKIP
    torch.Size([70, 384, 1, 1])
    ```
    """
    if not _is_stego([str(key) for key in state_dict]):
        raise ValueError(f"not a STEGO state dict: found {_describe(dict(state_dict))}")
    missing = _missing_stego_keys(state_dict)
    if missing:
        raise _incomplete("state dict", missing)
    converted = {
        f"backbone.model.{key}": value
        for key, value in convert_dino_vit_state_dict(state_dict, prefix=_BACKBONE_PREFIX).items()
    }
    unknown_head, dropped = [], []
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE_PREFIX):
            continue
        if key in _HEAD_RENAMES:
            converted[_HEAD_RENAMES[key]] = value.detach().clone().contiguous()
        elif key.startswith("net."):
            unknown_head.append(key)
        elif not key.startswith(_UNUSED_PREFIXES):
            dropped.append(key)
    if unknown_head:
        raise ValueError(f"unknown STEGO head weights (not a DinoFeaturizer head): {sorted(unknown_head)}")
    if dropped:
        logger.warning("STEGO checkpoint: ignoring weights not used at inference: %s", sorted(dropped))
    return converted


# ------------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------------


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"STEGO checkpoint: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _cfg_value(name: str, value: Any, kind: type) -> Any:
    """A config value as ``kind``, or None (with a warning) when it cannot be read as one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "5e-4" as a string
            return float(value)
        except ValueError:
            pass
    logger.warning("STEGO config: ignoring %s=%r (expected a %s)", name, value, kind.__name__)
    return None


def _warn_mismatch(what: str, cfg_value: Any, tensor_value: Any) -> None:
    logger.warning(
        "STEGO checkpoint: the config says %s=%r but the weights have %r; using the weights",
        what,
        cfg_value,
        tensor_value,
    )


def _dataset_name(cfg: Mapping[str, Any]) -> str | None:
    name = cfg.get("dataset_name")
    if not isinstance(name, str):
        return None
    return _DATASETS.get(name, name)


def _released_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters of STEGO's ``cfg`` under our names (config fields and training options together)."""
    fields: dict[str, Any] = {}
    for key, (field, kind) in _CFG_FIELDS.items():
        if key in cfg and cfg[key] is not None:
            value = _cfg_value(key, cfg[key], kind)
            if value is not None:
                fields[field] = value
    if isinstance(cfg.get("crop_type"), str):
        fields["five_crop"] = cfg["crop_type"] == "five"
    return fields


def stego_training_options_from_checkpoint(checkpoint: Mapping[str, Any]) -> StegoTrainingOptions:
    """The training settings of a released STEGO checkpoint (``hyper_parameters["cfg"]``: steps, batch size,
    crops, kNN partners, learning rate), as [`StegoTrainingOptions`]; defaults where the checkpoint says nothing.

    Example:

    ```python
    >>> options = stego_training_options_from_checkpoint(load_checkpoint("potsdam_test.ckpt"))  # doctest: +SKIP
    >>> options.max_steps, options.batch_size  # doctest: +SKIP
    (5000, 16)
    ```
    """
    _, hyper_parameters = _split_checkpoint(checkpoint)
    cfg = hyper_parameters.get("cfg") or {}
    names = StegoTrainingOptions.field_names()
    return StegoTrainingOptions(
        **{k: v for k, v in _released_fields(cfg if isinstance(cfg, Mapping) else {}).items() if k in names}
    )


def stego_config_from_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    backbone_name: str | None = None,
) -> StegoConfig:
    """The [`StegoConfig`] of a loaded STEGO checkpoint: architecture from the tensors, loss hyper-parameters from
    ``hyper_parameters["cfg"]`` when present (module docstring); its training settings are
    [`stego_training_options_from_checkpoint`]'s.

    Args:
        checkpoint: a loaded Lightning checkpoint (or a bare STEGO state dict).
        id2label: names of the cluster-probe outputs (default ``cluster_<i>``).
        backbone_name: Hub id of the backbone the model was trained on (default: the DINO release matching the
            tensors, e.g. ``facebook/dino-vitb8`` for a 12-layer ViT-B/8, else None).

    Example:

    ```python
    >>> config = stego_config_from_checkpoint(load_checkpoint("potsdam_test.ckpt"))  # doctest: +SKIP
    >>> config.backbone_config.hidden_size, config.dim, config.num_classes  # doctest: +SKIP
    (384, 70, 3)
    ```
    """
    state_dict, hyper_parameters = _split_checkpoint(checkpoint)
    cfg = hyper_parameters.get("cfg") or {}
    if not isinstance(cfg, Mapping):
        raise ValueError(
            f"STEGO checkpoint: hyper_parameters['cfg'] is a {type(cfg).__name__}, expected a mapping "
            "(an OmegaConf DictConfig or a dict)"
        )

    backbone_config = vit_config_from_dino_state_dict(state_dict, prefix=_BACKBONE_PREFIX)
    hidden, patch = backbone_config.hidden_size, backbone_config.patch_size
    dim, in_channels = _shape(state_dict, "net.cluster1.0.weight", 4)[:2]
    if in_channels != hidden:
        raise ValueError(f"STEGO checkpoint: net.cluster1.0.weight takes {in_channels} channels, the ViT has {hidden}")
    nonlinear = "net.cluster2.0.weight" in state_dict
    if nonlinear:
        first, second = _shape(state_dict, "net.cluster2.0.weight", 4), _shape(state_dict, "net.cluster2.2.weight", 4)
        if first[:2] != (hidden, hidden) or second[:2] != (dim, hidden):
            raise ValueError(
                f"STEGO checkpoint: net.cluster2 has shapes {first} and {second}, expected ({hidden}, {hidden}, 1, 1) "
                f"and ({dim}, {hidden}, 1, 1)"
            )
    num_classes, probe_dim = _shape(state_dict, "linear_probe.weight", 4)[:2]
    num_clusters, cluster_dim = _shape(state_dict, "cluster_probe.clusters", 2)
    if probe_dim != dim or cluster_dim != dim:
        raise ValueError(
            f"STEGO checkpoint: the probes take {probe_dim} (linear) and {cluster_dim} (cluster) channels but the "
            f"code has {dim}"
        )
    if num_clusters < num_classes:
        raise ValueError(
            f"STEGO checkpoint: cluster_probe.clusters has {num_clusters} rows, fewer than the {num_classes} classes "
            "of linear_probe.weight"
        )
    extra_clusters = num_clusters - num_classes

    # The config is informative for the architecture: report contradictions, trust the tensors.
    if "n_classes" in hyper_parameters and hyper_parameters["n_classes"] != num_classes:
        _warn_mismatch("n_classes", hyper_parameters["n_classes"], num_classes)
    if cfg.get("continuous", True) and "dim" in cfg and cfg["dim"] != dim:
        _warn_mismatch("dim", cfg["dim"], dim)
    if "extra_clusters" in cfg and cfg["extra_clusters"] != extra_clusters:
        _warn_mismatch("extra_clusters", cfg["extra_clusters"], extra_clusters)
    if "projection_type" in cfg and cfg["projection_type"] != ("nonlinear" if nonlinear else "linear"):
        _warn_mismatch("projection_type", cfg["projection_type"], "nonlinear" if nonlinear else "linear")
    arch = _DINO_WIDTHS.get(hidden, (None, None))[0]
    if "model_type" in cfg and cfg["model_type"] != arch:
        _warn_mismatch("model_type", cfg["model_type"], f"hidden size {hidden}")
    if "dino_patch_size" in cfg and cfg["dino_patch_size"] != patch:
        _warn_mismatch("dino_patch_size", cfg["dino_patch_size"], patch)

    fields = _released_fields(cfg)

    if backbone_name is None and hidden in _DINO_WIDTHS and patch in (8, 16):
        if backbone_config.num_hidden_layers == 12 and backbone_config.intermediate_size == 4 * hidden:
            backbone_name = f"facebook/dino-vit{_DINO_WIDTHS[hidden][1]}{patch}"

    if id2label is not None:
        names = dict(enumerate(id2label)) if not isinstance(id2label, Mapping) else dict(id2label)
        if sorted(names) != list(range(num_clusters)) or not all(isinstance(v, str) for v in names.values()):
            raise ValueError(
                f"id2label must name the {num_clusters} cluster-probe outputs 0..{num_clusters - 1} with strings, "
                f"got {len(names)} entries"
            )
        id2label = {int(key): value for key, value in names.items()}

    return StegoConfig(
        backbone_config=backbone_config.to_dict(),
        pos_embed_interpolation="dino",
        backbone_name=backbone_name,
        dataset_name=_dataset_name(cfg),
        dim=dim,
        num_classes=num_classes,
        extra_clusters=extra_clusters,
        projection_type="nonlinear" if nonlinear else "linear",
        id2label=id2label,
        **fields,
    )


# ------------------------------------------------------------------------------------------------------------
# the converter
# ------------------------------------------------------------------------------------------------------------


def _class_names(dataset_name: str | None, num_classes: int) -> list[str] | None:
    if dataset_name is None:
        return None
    from ..data import load_label_maps

    entry = load_label_maps().get(dataset_name)
    names = entry.get("class_names") if isinstance(entry, dict) else None
    return list(names) if names and len(names) == num_classes else None


def _write_model_folder(
    model: StegoForUnsupervisedSegmentation,
    output_dir: str | os.PathLike,
    source: str,
    dataset_label: str | None,
    training_options: StegoTrainingOptions,
) -> None:
    from ..hub import generate_model_card
    from ..image_processing import whole_image_processor

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    model.save_pretrained(output_dir)
    whole_image_processor(training_options.eval_resolution, model.patch_size).save_pretrained(output_dir)
    # the released training settings, for `training/train.py --config` (the config describes the model only)
    (output_dir / "training_options.json").write_text(json.dumps(dataclasses.asdict(training_options), indent=2))

    class_names = _class_names(config.dataset_name, config.num_classes)
    summary = {
        "method": "stego",
        "backbone": config.backbone_name or "DINO ViT (weights from the checkpoint)",
        "dataset": dataset_label or config.dataset_name or "unknown data",
    }
    card = generate_model_card(model, summary=summary, class_names=class_names)
    linear_names = (
        ", ".join(f"{i}: {name}" for i, name in enumerate(class_names))
        if class_names
        else f"{config.num_classes} classes of the training dataset, in its label order"
    )
    card.text += (
        "\n\n## Conversion\n\n"
        f"Converted from STEGO's released checkpoint `{source}` with `hf-useg convert stego` "
        "(`hf_useg.convert.convert_stego_checkpoint`). `model.predict` computes STEGO's evaluation outputs "
        "(flip TTA on the code, bilinear upsampling, cluster probe `log_softmax(2 * cosine)`, linear probe, "
        "optional dense CRF).\n\n"
        "Cluster ids are not class ids: `config.id2label` names the cluster-probe outputs `cluster_<i>` until "
        "they are matched to classes (Hungarian matching on labelled data, then `model.set_cluster_names`). "
        f"The linear probe (`linear_logits`) predicts the training dataset's classes: {linear_names}.\n"
    )
    card.save(output_dir / "README.md")


def _check_finite(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN/inf in the weights the model keeps (the dropped training-only parts are not checked)."""
    bad = [
        key
        for key, value in state_dict.items()
        if (key.startswith("net.") or key in _HEAD_RENAMES)
        and (value.is_floating_point() or value.is_complex())
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise ValueError(
            f"STEGO checkpoint has non-finite values (NaN or inf) in {bad}: a diverged run or a damaged file. "
            "Pass allow_non_finite=True to convert it anyway (research use only)"
        )


def convert_stego_checkpoint(
    checkpoint_path: str | os.PathLike | Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    *,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    backbone_name: str | None = None,
    allow_non_finite: bool = False,
) -> StegoForUnsupervisedSegmentation:
    """Convert a released STEGO checkpoint into a [`StegoForUnsupervisedSegmentation`] (module docstring).

    Args:
        checkpoint_path: the Lightning ``.ckpt`` file (read safely with
            [`~hf_useg.convert.checkpoint_io.load_checkpoint`]), or an already loaded checkpoint dict.
        output_dir: when given, a folder that ``StegoForUnsupervisedSegmentation.from_pretrained`` (and the
            ``image-segmentation`` pipeline) loads: ``config.json``, ``model.safetensors``, the image processor
            (whole image, shorter side 320, sides multiples of the patch size) and a generated model card
            (``README.md``).
        id2label: names of the cluster-probe outputs (default ``cluster_<i>``: clusters are not classes).
        backbone_name: Hub id of the DINO backbone, for the config and the card (default: inferred).
        allow_non_finite: convert weights holding NaN or infinite values instead of refusing them (research use,
            e.g. inspecting a diverged run; such a model's predictions are meaningless).

    Returns:
        The converted model, in eval mode.

    Raises:
        `ValueError` for a file or object that is not a STEGO checkpoint (the message says what was found), a
        STEGO checkpoint that lacks weights (named), weights with NaN/inf values (named), a damaged file, or
        one that references classes outside the loader's allow-list.

    Example:

    ```python
    >>> model = convert_stego_checkpoint("potsdam_test.ckpt", "stego-potsdam3")  # doctest: +SKIP
    >>> prediction = model.predict(pixel_values, crf=True)  # doctest: +SKIP
    ```
    """
    if isinstance(checkpoint_path, Mapping):
        checkpoint, source = checkpoint_path, "<in-memory checkpoint>"
    else:
        checkpoint, source = load_checkpoint(checkpoint_path), Path(checkpoint_path).name
    config = stego_config_from_checkpoint(checkpoint, id2label=id2label, backbone_name=backbone_name)
    state_dict, hyper_parameters = _split_checkpoint(checkpoint)
    if not allow_non_finite:
        _check_finite(state_dict)
    weights = convert_stego_state_dict(state_dict)

    model = StegoForUnsupervisedSegmentation(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:  # cannot happen for a checkpoint that passed the checks above
        raise ValueError(f"converted STEGO weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.eval()

    if output_dir is not None:
        cfg = hyper_parameters.get("cfg") or {}
        original = cfg.get("dataset_name") if isinstance(cfg, Mapping) else None
        label = config.dataset_name
        if isinstance(original, str) and original != label:
            label = f"{label} (STEGO's '{original}')"
        _write_model_folder(model, output_dir, source, label, stego_training_options_from_checkpoint(checkpoint))
    return model
