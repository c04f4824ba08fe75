"""DINO / timm ViT weights ⇄ transformers-5 `ViTModel` weights.

DINO v1 checkpoints (and the backbone part of STEGO's Lightning checkpoints, under ``net.model.``) use the
parameter names of DINO's / timm's `VisionTransformer`. This module renames them for `ViTModel` (the model
that [`~hf_useg.backbones.FeatureBackbone`] wraps for ``model_type="vit"``), splits the fused ``qkv``
projection into ``q_proj``/``k_proj``/``v_proj`` (rows ``[q; k; v]``, METHODS 1.5), and infers the `ViTConfig`
from the tensors.

| DINO / timm                     | transformers 5 `ViTModel`                                   |
|---------------------------------|-------------------------------------------------------------|
| ``cls_token``                   | ``embeddings.cls_token``                                    |
| ``pos_embed``                   | ``embeddings.position_embeddings``                          |
| ``patch_embed.proj.*``          | ``embeddings.patch_embeddings.projection.*``                |
| ``blocks.i.norm1.*``            | ``layers.i.layernorm_before.*``                             |
| ``blocks.i.attn.qkv.*``         | ``layers.i.attention.{q_proj,k_proj,v_proj}.*`` (row split) |
| ``blocks.i.attn.proj.*``        | ``layers.i.attention.o_proj.*``                             |
| ``blocks.i.norm2.*``            | ``layers.i.layernorm_after.*``                              |
| ``blocks.i.mlp.fc1.*``/``fc2.*``| ``layers.i.mlp.fc1.*``/``fc2.*``                            |
| ``norm.*``                      | ``layernorm.*``                                             |

Example:

```python
>>> import torch
>>> from transformers import ViTModel
>>> from hf_useg.convert.dino_vit import convert_dino_vit_state_dict, vit_config_from_dino_state_dict
>>> ckpt = torch.load("dino_deitsmall8_pretrain.pth", weights_only=True)  # doctest: +SKIP
>>> config = vit_config_from_dino_state_dict(ckpt)  # doctest: +SKIP
>>> model = ViTModel(config, add_pooling_layer=False)  # doctest: +SKIP
>>> model.load_state_dict(convert_dino_vit_state_dict(ckpt))  # doctest: +SKIP
```
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch
from transformers import ViTConfig

__all__ = [
    "convert_dino_vit_state_dict",
    "convert_vit_state_dict_to_dino",
    "vit_config_from_dino_state_dict",
]

# DINO name (after the block prefix) -> ViTModel name; "attn.qkv" is handled separately (split in three).
_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of parameter names to tensors, got {type(state_dict).__name__}")
    stripped = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not stripped:
        sample = ", ".join(list(state_dict)[:5])
        raise KeyError(f"no key starts with prefix {prefix!r} (first keys: {sample})")
    for key, value in stripped.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{prefix}{key} is a {type(value).__name__}, expected a torch.Tensor")
    return stripped


def expected_dino_vit_keys(keys: Iterable[str]) -> list[str]:
    """Every weight name a DINO/timm ViT with the blocks found in ``keys`` (names without prefix) has: the
    embeddings, the final norm and, for blocks ``0..max``, each block's norms, attention and MLP (``qkv.bias``
    when any block has one, as in every DINO release)."""
    keys = set(keys)
    block_ids = {int(m.group(1)) for m in map(_BLOCK_KEY.match, keys) if m is not None}
    qkv_bias = any(key.endswith(".attn.qkv.bias") for key in keys)
    expected = list(_TOP_RENAMES)
    for index in range(max(block_ids, default=-1) + 1):
        parts = ["norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
        expected.append(f"blocks.{index}.attn.qkv.weight")
        if qkv_bias:
            expected.append(f"blocks.{index}.attn.qkv.bias")
        expected += [f"blocks.{index}.{part}.{kind}" for part in parts for kind in ("weight", "bias")]
    return expected


def _check_dino(weights: Mapping[str, torch.Tensor], prefix: str) -> None:
    missing = [key for key in _REQUIRED if key not in weights]
    if missing:
        sample = ", ".join(list(weights)[:5])
        raise KeyError(
            f"not a DINO/timm ViT state dict: missing {[prefix + key for key in missing]} (keys under prefix "
            f"{prefix!r} start with: {sample}). Pass prefix= for nested checkpoints ('net.model.' for STEGO)."
        )
    missing = [prefix + key for key in expected_dino_vit_keys(weights) if key not in weights]
    if missing:
        raise KeyError(f"incomplete DINO/timm ViT state dict: missing {missing}")


def convert_dino_vit_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a DINO/timm ViT state dict (keys under ``prefix``) to transformers-5 `ViTModel` names.

    Keys outside ``prefix`` are ignored (e.g. a STEGO checkpoint's heads when ``prefix="net.model."``); every
    key inside it must be a ViT backbone weight, otherwise a `ValueError` lists the unknown ones. The fused
    ``qkv`` weight ``[3D, D]`` (bias ``[3D]``) is split into rows ``[0, D)`` → q, ``[D, 2D)`` → k,
    ``[2D, 3D)`` → v. Returned tensors are fresh, contiguous copies (safe for `safetensors`).

    Example:

    ```python
    >>> sd = {"net.model.cls_token": torch.zeros(1, 1, 384), ...}  # doctest: +SKIP
    >>> convert_dino_vit_state_dict(sd, prefix="net.model.")["embeddings.cls_token"].shape  # doctest: +SKIP
    torch.Size([1, 1, 384])
    ```
    """
    weights = _strip_prefix(state_dict, prefix)
    _check_dino(weights, prefix)
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in weights.items():
        if key in _TOP_RENAMES:
            converted[_TOP_RENAMES[key]] = value.detach().clone().contiguous()
            continue
        match = _BLOCK_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, module, kind = match.groups()
        target = f"layers.{index}"
        if module == "attn.qkv":
            if value.shape[0] % 3 != 0:
                raise ValueError(f"{prefix}{key} has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{target}.attention.{name}.{kind}"] = chunk.detach().clone().contiguous()
        elif module in _BLOCK_RENAMES:
            converted[f"{target}.{_BLOCK_RENAMES[module]}.{kind}"] = value.detach().clone().contiguous()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not DINO ViT backbone weights (under prefix {prefix!r}): {sorted(unknown)[:10]}")
    return converted


def convert_vit_state_dict_to_dino(
    state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The inverse of [`convert_dino_vit_state_dict`]: transformers-5 `ViTModel` names (under ``prefix``, e.g.
    ``"backbone.model."``) back to DINO/timm names, with q/k/v concatenated into ``qkv``. The pooler, if
    present, is dropped (DINO has none).

    Example:

    ```python
    >>> dino_sd = convert_vit_state_dict_to_dino(model.backbone.model.state_dict())  # doctest: +SKIP
    ```
    """
    weights = _strip_prefix(state_dict, prefix)
    inverse_top = {value: key for key, value in _TOP_RENAMES.items()}
    inverse_block = {value: key for key, value in _BLOCK_RENAMES.items()}
    if "embeddings.cls_token" not in weights:
        raise KeyError(f"not a ViTModel state dict: no {prefix}embeddings.cls_token")
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in weights.items():
        if key in inverse_top:
            converted[inverse_top[key]] = value.detach().clone()
            continue
        if key.startswith("pooler."):
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, module, kind = match.groups()
        if module in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            qkv.setdefault((index, kind), {})[module.split(".")[1]] = value
        elif module in inverse_block:
            converted[f"blocks.{index}.{inverse_block[module]}.{kind}"] = value.detach().clone()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not ViTModel weights (under prefix {prefix!r}): {sorted(unknown)[:10]}")
    for (index, kind), parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise KeyError(f"layer {index}: incomplete q/k/v {kind}s, found only {sorted(parts)}")
        converted[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0
        ).detach()
    return converted


def vit_config_from_dino_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "", **overrides
) -> ViTConfig:
    """Infer the `ViTConfig` of a DINO/timm ViT from its tensors (METHODS 1.5).

    hidden size from ``cls_token``, patch size and channels from ``patch_embed.proj.weight``, depth from the
    number of blocks, MLP size from ``fc1``, ``qkv_bias`` from the presence of ``qkv.bias``, image size =
    √(position tokens − 1) · patch size, heads = hidden / 64 (DINO's ViT-S: 6, ViT-B: 12; pass
    ``num_attention_heads=`` for other head widths). LayerNorm eps is DINO's 1e-6. ``overrides`` win.

    Example:

    ```python
    >>> config = vit_config_from_dino_state_dict(torch.load("dino_deitsmall8_pretrain.pth"))  # doctest: +SKIP
    >>> config.hidden_size, config.patch_size, config.num_attention_heads, config.image_size  # doctest: +SKIP
    (384, 8, 6, 224)
    ```
    """
    weights = _strip_prefix(state_dict, prefix)
    _check_dino(weights, prefix)
    cls_token, pos_embed, proj = (
        weights["cls_token"],
        weights["pos_embed"],
        weights["patch_embed.proj.weight"],
    )
    if cls_token.dim() != 3 or cls_token.shape[:2] != (1, 1):
        raise ValueError(f"{prefix}cls_token has shape {tuple(cls_token.shape)}, expected (1, 1, hidden_size)")
    hidden_size = cls_token.shape[-1]
    if proj.dim() != 4 or proj.shape[0] != hidden_size or proj.shape[2] != proj.shape[3]:
        raise ValueError(
            f"{prefix}patch_embed.proj.weight has shape {tuple(proj.shape)}, expected ({hidden_size}, C, p, p)"
        )
    num_channels, patch_size = proj.shape[1], proj.shape[2]
    num_positions = pos_embed.shape[1] - 1
    grid = math.isqrt(num_positions)
    if pos_embed.dim() != 3 or grid * grid != num_positions or pos_embed.shape[-1] != hidden_size:
        raise ValueError(
            f"{prefix}pos_embed has shape {tuple(pos_embed.shape)}: expected (1, 1 + g*g, {hidden_size}) for "
            "a square grid of g x g patches"
        )
    block_ids = {int(m.group(1)) for m in map(_BLOCK_KEY.match, weights) if m is not None}
    if not block_ids or block_ids != set(range(len(block_ids))):
        raise ValueError(f"expected blocks 0..n-1 under {prefix!r}blocks., found {sorted(block_ids)}")
    depth = len(block_ids)
    fc1 = weights.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise KeyError(f"not a DINO/timm ViT state dict: missing {prefix}blocks.0.mlp.fc1.weight")
    if "num_attention_heads" not in overrides and hidden_size % 64 != 0:
        raise ValueError(
            f"hidden size {hidden_size} is not a multiple of 64 (DINO's head width): pass num_attention_heads="
        )
    kwargs = {
        "hidden_size": hidden_size,
        "num_hidden_layers": depth,
        "num_attention_heads": hidden_size // 64,
        "intermediate_size": fc1.shape[0],
        "patch_size": patch_size,
        "image_size": grid * patch_size,
        "num_channels": num_channels,
        "qkv_bias": "blocks.0.attn.qkv.bias" in weights,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    kwargs.update(overrides)
    return ViTConfig(**kwargs)
