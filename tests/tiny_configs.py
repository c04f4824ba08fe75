"""The tiny random backbone configs the tests build models on (a few thousand parameters, milliseconds a forward).

Plain functions, so module-level use works (``from tiny_configs import tiny_vit_config``); `conftest.py` exposes
the same configs as fixtures. Every call returns a fresh config: tests may modify it.

Example:

```python
>>> tiny_vit_config().hidden_size, tiny_vit_config(num_hidden_layers=2).num_hidden_layers
(32, 2)
```
"""

from __future__ import annotations

import copy

from transformers import Dinov2Config, ResNetConfig, ViTConfig

__all__ = [
    "TINY_DETREG_DETECTOR_KWARGS",
    "TINY_RESNET_KWARGS",
    "TINY_VIT_KWARGS",
    "tiny_detreg_config",
    "tiny_dinov2_config",
    "tiny_resnet_config",
    "tiny_vit_config",
]

# A DINO-like ViT (LayerNorm eps 1e-6): 32 channels, 1 layer, 2 heads, 8x8 patches, 32x32 native size (4x4 grid).
TINY_VIT_KWARGS = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
    "image_size": 32,
    "layer_norm_eps": 1e-6,
}

# A ResNet-18-shaped (basic blocks) ResNet with one block per stage: strides 4, 4, 8, 16, 32 (stem, stage1-4).
TINY_RESNET_KWARGS = {
    "embedding_size": 8,
    "hidden_sizes": [8, 16, 16, 24],
    "depths": [1, 1, 1, 1],
    "layer_type": "basic",
}


def tiny_vit_config(**overrides) -> ViTConfig:
    """`TINY_VIT_KWARGS` with ``overrides`` (e.g. ``num_hidden_layers=2``)."""
    return ViTConfig(**{**TINY_VIT_KWARGS, **overrides})


def tiny_dinov2_config(**overrides) -> Dinov2Config:
    """A DINOv2 ViT of the `tiny_vit_config` width and depth (DINOv2's defaults otherwise: ``mlp_ratio=4``, LayerNorm
    eps 1e-6)."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
    return Dinov2Config(**{**{key: TINY_VIT_KWARGS[key] for key in keys}, **overrides})


def tiny_resnet_config(**overrides) -> ResNetConfig:
    """`TINY_RESNET_KWARGS` with ``overrides`` (e.g. ``out_features=["stage2"]``)."""
    return ResNetConfig(**{**copy.deepcopy(TINY_RESNET_KWARGS), **overrides})


# A Deformable DETR on the tiny ResNet (stages 2-4 + one extra level): d_model 32, 1 encoder + 2 decoder layers (so
# the auxiliary loss has a layer), 2 heads, 2 sampling points, 10 queries; for 64x64 images in batches of 2 or more
# (at 64 px the stride-64 level is 1x1, and its GroupNorm of one channel per group needs more than one value).
TINY_DETREG_DETECTOR_KWARGS = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "encoder_n_points": 2,
    "decoder_n_points": 2,
    "num_queries": 10,
    "num_feature_levels": 4,
}


def tiny_detreg_config(detector_overrides: dict | None = None, **overrides):
    """A `CutMixDetregConfig` on `TINY_DETREG_DETECTOR_KWARGS` (``detector_overrides`` update those) with 32x32 box
    crops; its object encoder is a copy of the tiny ResNet (24-dimensional embeddings). ``overrides`` go to the
    config (e.g. ``box_source="random"``)."""
    from transformers import DeformableDetrConfig

    from hf_useg import CutMixDetregConfig

    detector = DeformableDetrConfig(
        backbone_config=tiny_resnet_config(out_features=["stage2", "stage3", "stage4"]),
        **{**TINY_DETREG_DETECTOR_KWARGS, **(detector_overrides or {})},
    )
    return CutMixDetregConfig(**{"detector_config": detector, "object_crop_size": 32, **overrides})
