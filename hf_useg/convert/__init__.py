"""Converters for officially released checkpoints (METHODS 1.5): STEGO's Lightning checkpoints and DINO/timm ViT
weights, read without unpickling arbitrary objects (`checkpoint_io`).

Example:

```python
>>> from hf_useg.convert import convert_stego_checkpoint
>>> model = convert_stego_checkpoint("cocostuff27_vit_base_5.ckpt", "stego-cocostuff27")  # doctest: +SKIP
```
"""

from __future__ import annotations

from .checkpoint_io import load_checkpoint
from .dino_vit import convert_dino_vit_state_dict, convert_vit_state_dict_to_dino, vit_config_from_dino_state_dict
from .stego import (
    convert_stego_checkpoint,
    convert_stego_state_dict,
    stego_config_from_checkpoint,
    stego_training_options_from_checkpoint,
)

__all__ = [
    "convert_dino_vit_state_dict",
    "convert_stego_checkpoint",
    "convert_stego_state_dict",
    "convert_vit_state_dict_to_dino",
    "load_checkpoint",
    "stego_config_from_checkpoint",
    "stego_training_options_from_checkpoint",
    "vit_config_from_dino_state_dict",
]
