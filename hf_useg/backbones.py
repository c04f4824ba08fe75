"""Hugging Face backbones as dense feature extractors: pixels ``[B, 3, H, W]`` → feature map
``[B, C, H/p, W/p]`` (+ CLS token and last-layer CLS attention), with DINO's exact position-embedding
interpolation (METHODS 0.1).

Three families are wrapped behind one interface, [`FeatureBackbone`]:

* **DINO v1 ViTs** (``model_type="vit"``, e.g. ``facebook/dino-vits8``): `ViTModel` without pooler.
  Features are the patch tokens of the last block after the final LayerNorm (``last_hidden_state[:, 1:]``).
* **DINOv2 / DINOv3 ViTs** (``dinov2``, ``dinov2_with_registers``, ``dinov3_vit``): the base model from
  `AutoModel`; CLS and register tokens are dropped from the feature map.
* **any other `AutoBackbone`** (ResNet, ConvNeXt, Swin, …): the feature map of the stage its config's
  ``out_features`` names when it names one (default: the last stage); no CLS token.

Example:

```python
>>> import torch
>>> from hf_useg.backbones import FeatureBackbone, dino_vit_config
>>> backbone = FeatureBackbone(dino_vit_config("vit_small", patch_size=8, num_hidden_layers=2), frozen=True)
>>> out = backbone(torch.randn(1, 3, 320, 240), output_cls_attention=True)
>>> out.feature_map.shape, out.cls_token.shape, out.cls_attention.shape
(torch.Size([1, 384, 40, 30]), torch.Size([1, 384]), torch.Size([1, 6, 40, 30]))
```

Inference at the hardware's pace: the wrapped models use PyTorch's fused SDPA attention (transformers' default for
ViT/DINOv2; eager only for a call that asks for CLS attention maps), and [`backbone_autocast`] runs every
`FeatureBackbone` forward of a block under ``torch.autocast`` (bf16 on a GPU) while the features come out in the
parameters' dtype, so heads, losses and metrics stay in float32:

```python
>>> with backbone_autocast(torch.bfloat16):
...     features = backbone(torch.randn(1, 3, 64, 64)).feature_map
>>> features.dtype
torch.float32
```
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone, AutoConfig, AutoModel, PreTrainedConfig, ViTConfig, ViTModel
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
from transformers.models.vit.modeling_vit import ViTEmbeddings
from transformers.utils import ModelOutput, logging

from .configuration_utils import (  # noqa: F401  (re-exported: backbones is where users look for them)
    _INTERPOLATION_MODES,
    DINO_LAYER_NORM_EPS,
    check_pos_embed_interpolation,
    dino_vit_kwargs,
)

logger = logging.get_logger(__name__)
# serialises the eager-attention switch of `FeatureBackbone._run_with_last_attention` across threads
_ATTENTION_SWITCH = threading.RLock()
# the dtype `backbone_autocast` set for this thread / task (None: full precision); a ContextVar so that a served
# model answering several requests at once, or a training loop beside an evaluation, never see each other's setting
_AUTOCAST_DTYPE: ContextVar[torch.dtype | None] = ContextVar("hf_useg_backbone_autocast", default=None)

__all__ = [
    "AUTOCAST_DTYPE_NAMES",
    "BackboneFeatures",
    "FeatureBackbone",
    "backbone_autocast",
    "dino_interpolate_pos_encoding",
    "dino_vit_config",
    "load_backbone_config",
    "resolve_autocast_dtype",
]

# what `resolve_autocast_dtype` (and ``hf-useg evaluate --dtype``) accepts by name
AUTOCAST_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


# model types whose base model yields a token sequence [CLS, registers..., patches...]
_TOKEN_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit")
# model types whose embeddings interpolate a learned position-embedding table (where the DINO formula
# applies); dinov2_with_registers follows its release code (antialiased resize to the exact size) and dinov3
# uses RoPE.
_DINO_INTERPOLATION_MODEL_TYPES = ("vit", "dinov2")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


@dataclass
class BackboneFeatures(ModelOutput):
    """Output of [`FeatureBackbone`].

    Args:
        feature_map (`torch.FloatTensor` of shape `(batch_size, hidden_size, height // p, width // p)`):
            Patch tokens of the last layer after the final LayerNorm (ViTs), or the last stage's feature map.
        cls_token (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            The CLS token after the final LayerNorm; `None` for backbones without one.
        cls_attention (`torch.FloatTensor` of shape `(batch_size, num_heads, height // p, width // p)`):
            *optional*. Last-layer attention of the CLS query to every patch key (the CLS and register keys
            are left out, so a head's map sums to one minus the attention on those), when requested.
    """

    feature_map: torch.FloatTensor | None = None
    cls_token: torch.FloatTensor | None = None
    cls_attention: torch.FloatTensor | None = None


def dino_interpolate_pos_encoding(
    position_embeddings: torch.Tensor, height: int, width: int, patch_size: int | tuple[int, int]
) -> torch.Tensor:
    """DINO's position-embedding interpolation (METHODS 0.1) for an input of ``height x width`` pixels.

    ``position_embeddings`` ``[1, 1 + g*g, D]`` hold a CLS entry and a square ``g x g`` patch grid. For an
    input grid ``h x w`` other than ``g x g`` the patch part is resized bicubically (``align_corners=False``)
    with ``scale_factor=((h + 0.1) / g, (w + 0.1) / g)``: torch then uses that scale (not ``h / g``) to map
    output to input coordinates, which is what makes DINO's features differ from a resize to ``size=(h, w)``.
    The resize runs in float32. Returns ``[1, 1 + h*w, D]``; the input tensor itself when the grids match.

    Example:

    ```python
    >>> dino_interpolate_pos_encoding(torch.randn(1, 1 + 4 * 4, 8), 48, 40, patch_size=8).shape
    torch.Size([1, 31, 8])
    ```
    """
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    num_positions = position_embeddings.shape[1] - 1
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise ValueError(
            f"DINO interpolation needs a square grid of position embeddings, got {num_positions} patch positions"
        )
    h, w = height // patch_h, width // patch_w
    if (h, w) == (grid, grid):
        return position_embeddings
    dim = position_embeddings.shape[-1]
    patch_pos = position_embeddings[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((h + 0.1) / grid, (w + 0.1) / grid),
        mode="bicubic",
        align_corners=False,
    ).to(position_embeddings.dtype)
    if patch_pos.shape[-2:] != (h, w):  # cannot happen thanks to the +0.1; kept as DINO's own assertion
        raise RuntimeError(f"DINO interpolation produced a {tuple(patch_pos.shape[-2:])} grid instead of {(h, w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([position_embeddings[:, :1], patch_pos], dim=1)


class _DinoInterpolationMixin:
    """Swaps an HF embeddings module's `interpolate_pos_encoding` for DINO's formula; parameters and their
    names are untouched (only the module's class changes, see `FeatureBackbone._use_dino_interpolation`)."""

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return dino_interpolate_pos_encoding(self.position_embeddings, height, width, self.patch_embeddings.patch_size)


class DinoViTEmbeddings(_DinoInterpolationMixin, ViTEmbeddings):
    """`ViTEmbeddings` with DINO's position-embedding interpolation."""


class DinoDinov2Embeddings(_DinoInterpolationMixin, Dinov2Embeddings):
    """`Dinov2Embeddings` with DINO's position-embedding interpolation (also the DINOv2 release code's own,
    ``interpolate_offset=0.1`` without antialiasing)."""


_DINO_EMBEDDINGS = {ViTEmbeddings: DinoViTEmbeddings, Dinov2Embeddings: DinoDinov2Embeddings}


def dino_vit_config(arch: str = "vit_small", patch_size: int = 8, **overrides) -> ViTConfig:
    """The `ViTConfig` of a DINO v1 ViT: ``vit_tiny`` (192 wide, 3 heads), ``vit_small`` (384, 6) or
    ``vit_base`` (768, 12); depth 12, MLP 4x, LayerNorm eps 1e-6, ``qkv_bias``, image size 224, exact GELU,
    no dropout. ``overrides`` are any other `ViTConfig` fields (e.g. ``num_hidden_layers=2`` for tests).

    Example:

    ```python
    >>> config = dino_vit_config("vit_base", patch_size=16)
    >>> config.hidden_size, config.num_attention_heads, config.layer_norm_eps
    (768, 12, 1e-06)
    ```
    """
    return ViTConfig(**dino_vit_kwargs(arch, patch_size, **overrides))


def _apply_dino_eps(config: PreTrainedConfig, name_or_path: str, explicit: bool) -> PreTrainedConfig:
    if config.model_type == "vit" and not explicit and config.layer_norm_eps != DINO_LAYER_NORM_EPS:
        logger.warning(
            f"{name_or_path}: stored layer_norm_eps={config.layer_norm_eps} replaced by DINO's "
            f"{DINO_LAYER_NORM_EPS} (METHODS 0.1: with the stored value features differ by up to 6e-5). Pass "
            "layer_norm_eps=... to keep another value."
        )
        config.layer_norm_eps = DINO_LAYER_NORM_EPS
    return config


def load_backbone_config(name_or_path: str, **overrides) -> PreTrainedConfig:
    """Load a backbone config from a Hub id or a local folder (`AutoConfig`). DINO v1 checkpoints
    (``model_type="vit"``) get ``layer_norm_eps=1e-6`` (with a warning when the stored value differs), unless
    ``layer_norm_eps`` is among ``overrides``. ``overrides`` are config fields or Hub arguments
    (``revision``, …).

    Example:

    ```python
    >>> config = load_backbone_config("facebook/dino-vits8")  # doctest: +SKIP
    >>> config.layer_norm_eps  # doctest: +SKIP
    1e-06
    ```
    """
    config = AutoConfig.from_pretrained(name_or_path, **overrides)
    return _apply_dino_eps(config, name_or_path, explicit="layer_norm_eps" in overrides)


def _last_stage_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of an `AutoBackbone` config that outputs one stage: the one its ``out_features`` names when it names
    exactly one (e.g. ``ResNetConfig(out_features=["stage3"])`` for a stride-16 map), else the last stage."""
    stage_names = getattr(config, "stage_names", None)
    if not stage_names:
        raise ValueError(f"{type(config).__name__} is not a backbone config (no stage_names)")
    if len(list(getattr(config, "out_features", None) or [])) == 1:
        return config
    config = copy.deepcopy(config)
    config.out_indices = None
    config.out_features = [stage_names[-1]]
    return config


def _cuda_has_bfloat16(device: torch.device) -> bool:
    # native bf16 matmuls from Ampere (compute capability 8.0) on; torch.cuda.is_bf16_supported() also answers True
    # for older cards that only emulate it (slower than float32)
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_autocast_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype a frozen backbone should run under on ``device``; `None` for full float32.

    ``dtype`` is ``"auto"`` (bfloat16 on a CUDA GPU that computes it natively, float16 on an older GPU, float32
    elsewhere), a name of `AUTOCAST_DTYPE_NAMES`, a `torch.dtype` (float32, bfloat16 or float16) or `None`
    (float32). Raises a `ValueError` for other values and for a dtype the device cannot run: float16 on the CPU
    (PyTorch's CPU float16 kernels are slower than float32), bfloat16 on a GPU without native bfloat16.

    Example:

    ```python
    >>> resolve_autocast_dtype("auto", "cpu") is None, resolve_autocast_dtype("bfloat16", "cpu")
    (True, torch.bfloat16)
    ```
    """
    device = torch.device(device)
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in AUTOCAST_DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(AUTOCAST_DTYPE_NAMES)}, got {dtype!r}")
        if dtype == "auto":
            if device.type != "cuda":
                return None
            return torch.bfloat16 if _cuda_has_bfloat16(device) else torch.float16
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a name ({', '.join(AUTOCAST_DTYPE_NAMES)}) or a torch.dtype, got {dtype!r}")
    if dtype == torch.float32:
        return None
    if dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 autocast is for GPUs (on the CPU it is slower than float32): use bfloat16/float32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_has_bfloat16(device):
        raise ValueError(
            f"{torch.cuda.get_device_name(device)} has no native bfloat16 (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))} < 8.0): use float16 or float32"
        )
    return dtype


@contextlib.contextmanager
def backbone_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, every [`FeatureBackbone`] forward of this thread runs under ``torch.autocast`` with
    ``dtype`` on its input's device, and returns its features in its parameters' dtype (float32 for a float32
    model), so what follows the backbone (heads, losses, metrics) runs at full precision.

    ``dtype`` is `torch.bfloat16` or `torch.float16`; `None` or `torch.float32` run the backbone at full precision
    (an inner block overrides an outer one). Pick it for a device with [`resolve_autocast_dtype`]. A forward's own
    ``autocast_dtype`` argument takes precedence.

    Example:

    ```python
    >>> model = StegoForUnsupervisedSegmentation.from_pretrained("stego-cocostuff27").cuda()  # doctest: +SKIP
    >>> with backbone_autocast(torch.bfloat16):  # doctest: +SKIP
    ...     prediction = model.predict(pixel_values.cuda())
    ```
    """
    if dtype is not None and dtype != torch.float32 and dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"backbone_autocast takes torch.bfloat16, torch.float16, torch.float32 or None: {dtype!r}")
    token = _AUTOCAST_DTYPE.set(dtype)
    try:
        yield
    finally:
        _AUTOCAST_DTYPE.reset(token)


class FeatureBackbone(nn.Module):
    """A Hugging Face vision backbone as a dense feature extractor (see the module docstring).

    Args:
        config (`PreTrainedConfig`):
            A `ViTConfig` (DINO v1, wraps `ViTModel(add_pooling_layer=False)`), a DINOv2/DINOv3 config (wraps
            the base model), or any config `AutoBackbone` accepts (the last stage is used).
        pos_embed_interpolation (`str`, *optional*, defaults to `"auto"`):
            How position embeddings are resized for inputs other than the pretraining size: `"dino"` (METHODS
            0.1, DINO's ``scale_factor`` formula; for `vit` and `dinov2`), `"transformers"` (the model's own
            `interpolate_pos_encoding`) or `"auto"` (`"dino"` for `vit`, `"transformers"` otherwise).
        frozen (`bool`, *optional*, defaults to `False`):
            No gradients: parameters get ``requires_grad=False``, the module stays in eval mode when a parent
            calls ``.train()``, and `forward` runs under `torch.no_grad()`.
        model (`nn.Module`, *optional*):
            An already built model for `config` (what [`FeatureBackbone.from_pretrained`] passes); built from
            `config` with random weights when omitted.

    The wrapped model is ``self.model``: in a segmentation model its parameters are named
    ``backbone.model.<transformers names>``.

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...                    patch_size=8, image_size=32, layer_norm_eps=1e-6)
    >>> backbone = FeatureBackbone(config)
    >>> backbone(torch.randn(2, 3, 48, 40)).feature_map.shape
    torch.Size([2, 32, 6, 5])
    ```
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        pos_embed_interpolation: str = "auto",
        frozen: bool = False,
        model: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(config, PreTrainedConfig):
            raise TypeError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
        check_pos_embed_interpolation(pos_embed_interpolation)
        model_type = getattr(config, "model_type", "")
        self.is_token_model = model_type in _TOKEN_MODEL_TYPES
        if pos_embed_interpolation == "auto":
            pos_embed_interpolation = "dino" if model_type == "vit" else "transformers"
        if pos_embed_interpolation == "dino" and model_type not in _DINO_INTERPOLATION_MODEL_TYPES:
            raise ValueError(
                f"pos_embed_interpolation='dino' applies to {_DINO_INTERPOLATION_MODEL_TYPES} backbones (a "
                f"learned square position-embedding grid), not to model_type {model_type!r}; use "
                "'transformers' or 'auto'"
            )
        self.pos_embed_interpolation = pos_embed_interpolation

        if model is None:
            if model_type == "vit":
                model = ViTModel(config, add_pooling_layer=False)
            elif self.is_token_model:
                model = AutoModel.from_config(config)
            else:
                try:
                    model = AutoBackbone.from_config(_last_stage_config(config))
                except ValueError as error:
                    raise ValueError(
                        f"unsupported backbone config {type(config).__name__} (model_type {model_type!r}): "
                        "expected a ViT/DINOv2/DINOv3 config or one that transformers.AutoBackbone accepts "
                        f"({error})"
                    ) from error
        self.model = model
        self.config = model.config
        self._stride: int | None = None
        if self.is_token_model:
            self._num_prefix_tokens = 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)
            patch = self.config.patch_size
            patch_hw = (patch, patch) if isinstance(patch, int) else tuple(patch)
            if patch_hw[0] != patch_hw[1]:
                raise ValueError(f"only square patches are supported, got patch_size={patch}")
            self._stride = int(patch_hw[0])
            if pos_embed_interpolation == "dino":
                self._use_dino_interpolation()

        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def _use_dino_interpolation(self) -> None:
        embeddings = self.model.embeddings
        for base, dino_class in _DINO_EMBEDDINGS.items():
            if type(embeddings) is base:
                # same parameters, same names; only `interpolate_pos_encoding` changes
                embeddings.__class__ = dino_class
                return
        if not isinstance(embeddings, tuple(_DINO_EMBEDDINGS.values())):
            raise ValueError(f"cannot use DINO interpolation with {type(embeddings).__name__}")

    # --------------------------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        """The stride of the feature map in pixels (the patch size of a ViT)."""
        if self._stride is None:
            self._stride = self._measure_stride()
        return self._stride

    @property
    def hidden_size(self) -> int:
        """Channels ``C`` of the feature map."""
        if self.is_token_model:
            return int(self.config.hidden_size)
        return int(self.model.channels[-1])

    @property
    def num_attention_heads(self) -> int | None:
        """Heads of the last layer's attention (ViTs), `None` for other backbones."""
        return int(self.config.num_attention_heads) if self.is_token_model else None

    @property
    def num_channels(self) -> int | None:
        """Input channels the backbone expects (from its config)."""
        return getattr(self.config, "num_channels", None)

    @torch.no_grad()
    def _measure_stride(self) -> int:
        size = getattr(self.config, "image_size", 224)
        size = size if isinstance(size, int) else 224
        size = max(size, 64)
        parameter = next(self.model.parameters())
        dummy = torch.zeros(1, self.num_channels or 3, size, size, device=parameter.device, dtype=parameter.dtype)
        was_training = self.model.training
        self.model.eval()  # no BatchNorm statistics update from the probe
        try:
            height = self.model(dummy).feature_maps[-1].shape[-2]
        finally:
            self.model.train(was_training)
        if size % height != 0:
            raise ValueError(f"cannot infer the stride of {type(self.model).__name__}: {size} px -> {height} rows")
        return size // height

    def train(self, mode: bool = True) -> FeatureBackbone:
        """Like `nn.Module.train`, but a frozen backbone always stays in eval mode."""
        return super().train(False if self.frozen else mode)

    # --------------------------------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be 4-D [batch, channels, height, width], got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a float tensor (normalised images), got {pixel_values.dtype}; use the "
                "image processor to rescale and normalise uint8 images"
            )
        channels, height, width = pixel_values.shape[1:]
        if self.num_channels is not None and channels != self.num_channels:
            raise ValueError(f"pixel_values have {channels} channels, the backbone config expects {self.num_channels}")
        patch = self.patch_size
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {patch}: crop or resize "
                f"the images to multiples of {patch} (e.g. the image processor's size_divisor={patch})"
            )
        return height // patch, width // patch

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_cls_attention: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> BackboneFeatures:
        """Features of ``pixel_values`` ``[B, C_in, H, W]`` (``H``, ``W`` multiples of `patch_size`).

        With ``output_cls_attention=True`` (ViTs only) the last layer's CLS→patch attention is returned too;
        the model runs with eager attention for that call (SDPA cannot return attention weights).

        ``autocast_dtype`` (`torch.bfloat16` or `torch.float16`) runs the model under ``torch.autocast`` and returns
        the outputs in the parameters' dtype; `torch.float32` runs it at full precision; `None` (default) follows
        the enclosing [`backbone_autocast`] block, if any.
        """
        dtype = _AUTOCAST_DTYPE.get() if autocast_dtype is None else autocast_dtype
        if dtype is not None and dtype != torch.float32 and dtype not in _AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            if dtype not in _AUTOCAST_DTYPES:
                return self._forward(pixel_values, output_cls_attention)
            with torch.autocast(device_type=pixel_values.device.type, dtype=dtype):
                outputs = self._forward(pixel_values, output_cls_attention)
            output_dtype = next(self.model.parameters()).dtype
            return BackboneFeatures(
                **{key: value.to(output_dtype) for key, value in outputs.items() if value is not None}
            )

    def _forward(self, pixel_values: torch.Tensor, output_cls_attention: bool) -> BackboneFeatures:
        h, w = self._check_pixel_values(pixel_values)
        if not self.is_token_model:
            if output_cls_attention:
                raise ValueError(f"{type(self.model).__name__} has no CLS token: cls_attention is only for ViTs")
            return BackboneFeatures(feature_map=self.model(pixel_values).feature_maps[-1])

        kwargs = {"interpolate_pos_encoding": True} if self.config.model_type == "vit" else {}
        if output_cls_attention:
            outputs, attention = self._run_with_last_attention(pixel_values, kwargs)
        else:
            outputs, attention = self.model(pixel_values, **kwargs), None
        tokens = outputs.last_hidden_state
        batch = tokens.shape[0]
        patches = tokens[:, self._num_prefix_tokens :]
        feature_map = patches.transpose(1, 2).reshape(batch, patches.shape[-1], h, w)
        cls_attention = None
        if attention is not None:
            cls_attention = attention[:, :, 0, self._num_prefix_tokens :].reshape(batch, attention.shape[1], h, w)
        return BackboneFeatures(feature_map=feature_map, cls_token=tokens[:, 0], cls_attention=cls_attention)

    def _last_attention_module(self) -> nn.Module:
        target = type(self.model)._can_record_outputs.get("attentions")
        target = getattr(target, "target_class", target)
        modules = [
            module for module in self.model.modules() if isinstance(target, type) and isinstance(module, target)
        ]
        if not modules:
            raise ValueError(f"cannot find the attention layers of {type(self.model).__name__}")
        return modules[-1]

    def _run_with_last_attention(self, pixel_values: torch.Tensor, kwargs: dict) -> tuple[ModelOutput, torch.Tensor]:
        # Only the last layer's weights are kept (a forward hook), instead of output_attentions=True which
        # would hold every layer's [B, heads, N, N] matrix.
        # Thread-safe (a served model answers several requests at once): the switch to eager attention is made and
        # undone under one lock, and the hook keeps only this thread's attention weights.
        captured = []
        thread = threading.get_ident()

        def keep(module, args, out):
            if threading.get_ident() == thread:
                captured.append(out[1])

        with _ATTENTION_SWITCH:
            handle = self._last_attention_module().register_forward_hook(keep)
            previous = self.model.config._attn_implementation
            try:
                if previous != "eager":
                    self.model.set_attn_implementation("eager")
                outputs = self.model(pixel_values, **kwargs)
            finally:
                handle.remove()
                if previous != "eager":
                    self.model.set_attn_implementation(previous)
        if not captured or captured[-1] is None:
            raise RuntimeError(f"{type(self.model).__name__} returned no attention weights with eager attention")
        return outputs, captured[-1]

    # --------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str, pos_embed_interpolation: str = "auto", frozen: bool = False, **kwargs
    ) -> FeatureBackbone:
        """Load config and weights from a Hub id or a local folder: `ViTModel` for ``model_type="vit"``
        (DINO v1, with ``layer_norm_eps=1e-6``, see [`load_backbone_config`]), the base model for
        DINOv2/DINOv3, otherwise `AutoBackbone`. ``kwargs`` go to the model's ``from_pretrained`` (``dtype``,
        ``revision``, …); Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, …) are
        used for the config too, and ``layer_norm_eps`` overrides the config's.

        Example:

        ```python
        >>> backbone = FeatureBackbone.from_pretrained("facebook/dino-vits8", frozen=True)  # doctest: +SKIP
        ```
        """
        config_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        if "layer_norm_eps" in kwargs:
            config_kwargs["layer_norm_eps"] = kwargs.pop("layer_norm_eps")
        config = load_backbone_config(name_or_path, **config_kwargs)
        model_type = config.model_type
        if model_type == "vit":
            model = ViTModel.from_pretrained(name_or_path, config=config, add_pooling_layer=False, **kwargs)
        elif model_type in _TOKEN_MODEL_TYPES:
            model = AutoModel.from_pretrained(name_or_path, config=config, **kwargs)
        else:
            # AutoBackbone.from_pretrained itself asks the Hub whether the repo exists (fails offline and for
            # local folders in transformers 5.x), so resolve the backbone class from the config instead.
            if type(config) not in MODEL_FOR_BACKBONE_MAPPING:
                raise ValueError(
                    f"unsupported backbone {name_or_path!r} (model_type {model_type!r}): expected a "
                    "ViT/DINOv2/DINOv3 checkpoint or one that transformers.AutoBackbone accepts"
                )
            backbone_class = MODEL_FOR_BACKBONE_MAPPING[type(config)]
            model = backbone_class.from_pretrained(name_or_path, config=_last_stage_config(config), **kwargs)
        return cls(model.config, pos_embed_interpolation=pos_embed_interpolation, frozen=frozen, model=model)
