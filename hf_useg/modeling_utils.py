"""Pieces shared by every `*ForUnsupervisedSegmentation` model: typed outputs, the thin `PreTrainedModel`
base, and the evaluation-time `predict` (flip TTA -> bilinear upsample -> probes -> optional dense CRF)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)

__all__ = [
    "CheckedLoadingMixin",
    "UnsupervisedSegmentationPreTrainedModel",
    "UnsupervisedSegmenterOutput",
    "UnsupervisedSegmentationPrediction",
    "check_pixel_values",
]


def backbone_precision(
    autocast_dtype: str | torch.dtype | None, device: torch.device
) -> contextlib.AbstractContextManager:
    """The context `predict` runs its backbone passes in: nothing for `None` (an enclosing
    `hf_useg.backbones.backbone_autocast` block, if any, applies), else that block with ``autocast_dtype`` resolved
    for ``device`` (``"float32"`` / `torch.float32`: full precision, overriding an enclosing block)."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    from .backbones import backbone_autocast, resolve_autocast_dtype

    return backbone_autocast(resolve_autocast_dtype(autocast_dtype, device) or torch.float32)


@dataclass
class UnsupervisedSegmenterOutput(ModelOutput):
    """Output of every `*ForUnsupervisedSegmentation.forward`.

    Args:
        loss: training loss of the method (when the forward computes one), else None.
        logits: cluster log-probabilities ``[B, K, h, w]`` at feature resolution (what the
            ``image-segmentation`` pipeline reads).
        linear_logits: linear-probe logits ``[B, num_classes, h, w]`` when the model has a linear probe.
        code: the learned embedding ``[B, D, h, w]`` (the backbone features for zero-training baselines).
        features: the backbone feature map ``[B, C, h, w]``.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    linear_logits: torch.FloatTensor | None = None
    code: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None


@dataclass
class UnsupervisedSegmentationPrediction(ModelOutput):
    """Output of `predict`: log-probabilities ``[B, K, H, W]`` at the requested output size, and the dense-CRF
    marginals ``Q`` (probabilities, summing to one over ``K``) when ``crf=True``."""

    cluster_log_probs: torch.FloatTensor | None = None
    linear_log_probs: torch.FloatTensor | None = None
    cluster_crf_probs: torch.FloatTensor | None = None
    linear_crf_probs: torch.FloatTensor | None = None


def check_pixel_values(pixel_values: torch.Tensor, patch_size: int | None = None, num_channels: int = 3) -> None:
    """Raise a clear error for input that no model here can segment correctly."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channels, expected {num_channels} (RGB); convert grayscale or"
            " RGBA images to RGB first (UnsupervisedSegmentationImageProcessor does)"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a normalised float tensor, got {pixel_values.dtype}; "
            "use UnsupervisedSegmentationImageProcessor to turn images into pixel_values"
        )
    if patch_size is not None:
        height, width = pixel_values.shape[-2:]
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {patch_size}: crop or resize it to a "
                f"multiple of {patch_size} (the image processor's center crop or size_divisor does)"
            )


def _name_some(names: Sequence[str], limit: int = 20) -> str:
    shown = list(names[:limit]) + ([f"... ({len(names)} in all)"] if len(names) > limit else [])
    return str(shown)


class CheckedLoadingMixin:
    """``from_pretrained`` that refuses what would silently give a wrong model (a checkpoint of another method,
    missing weights, NaN/inf weights); mixed into every model base class of the package."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        allow_incomplete_weights: bool = False,
        allow_non_finite: bool = False,
        **kwargs,
    ):
        """`PreTrainedModel.from_pretrained`, refusing what would silently give a wrong model:

        * a checkpoint of another method (instead of transformers' warning followed by a confusing shape error);
        * weights the model has but the checkpoint lacks (transformers would initialise them randomly, e.g. a
          ``model.safetensors`` without ``cluster_probe.clusters``): a `ValueError` naming them;
        * parameters or buffers holding NaN or infinite values: a `ValueError` naming them.

        Args:
            allow_incomplete_weights: load anyway when weights are missing, leaving them at their initial values
                (research use, e.g. reusing a backbone; a warning names them).
            allow_non_finite: load anyway when weights hold NaN/inf (research use, e.g. inspecting a diverged run).
            args, kwargs: as for `PreTrainedModel.from_pretrained` (``output_loading_info=True`` still returns
                ``(model, loading_info)``).

        Example:

        ```python
        >>> model = StegoForUnsupervisedSegmentation.from_pretrained("stego-cocostuff27")  # doctest: +SKIP
        >>> partial = StegoForUnsupervisedSegmentation.from_pretrained(
        ...     "partial-folder", allow_incomplete_weights=True
        ... )  # doctest: +SKIP
        ```
        """
        expected = getattr(cls.config_class, "model_type", None)
        if expected and kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            try:
                config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path)
            except (OSError, ValueError):
                config_dict = {}
            found = config_dict.get("model_type")
            if found and found != expected:
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds a `{found}` model, not a `{expected}` one: load it with "
                    f"AutoModel.from_pretrained (after `import hf_useg`) or the matching class, or convert it first"
                )
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        missing = sorted(loading_info.get("missing_keys") or ())
        if missing and not allow_incomplete_weights:
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks weights of {cls.__name__}: {_name_some(missing)}. They would "
                "be left randomly initialised (or zero), so the model's outputs would be meaningless; the folder is "
                "incomplete or not this model's. Pass allow_incomplete_weights=True to load it anyway (research use)"
            )
        if missing:
            logger.warning(
                "%s: left at their initial values (allow_incomplete_weights=True): %s", cls.__name__, missing
            )
        if not allow_non_finite:
            non_finite = [
                name
                for name, tensor in model.state_dict().items()
                if (tensor.is_floating_point() or tensor.is_complex())
                and tensor.device.type != "meta"
                and not bool(torch.isfinite(tensor).all())
            ]
            if non_finite:
                raise ValueError(
                    f"{pretrained_model_name_or_path} has non-finite values (NaN or inf) in {_name_some(non_finite)}: "
                    "a diverged run or a damaged file. Pass allow_non_finite=True to load it anyway (research use)"
                )
        model.restore_frozen_parameters()
        return (model, loading_info) if output_loading_info else model

    # modules or parameters (dotted names) a model keeps without gradients besides its frozen `FeatureBackbone`s
    frozen_modules: tuple[str, ...] = ()

    def restore_frozen_parameters(self) -> None:
        """Give the frozen parts (every `FeatureBackbone` built with ``frozen=True`` and the modules named in
        ``frozen_modules``) ``requires_grad=False`` again: transformers 5.x loads each weight as a new parameter
        with ``requires_grad=True``, so a loaded STEGO would otherwise train its frozen backbone."""
        for module in self.modules():
            if getattr(module, "frozen", False) is True:
                module.requires_grad_(False)
        for name in self.frozen_modules:
            parameters = dict(self.named_parameters())
            (parameters[name] if name in parameters else self.get_submodule(name)).requires_grad_(False)


class UnsupervisedSegmentationPreTrainedModel(CheckedLoadingMixin, PreTrainedModel):
    """Thin base of every segmentation model here: weight init and the shared `predict` pipeline.

    Subclasses implement `compute_code(pixel_values) -> [B, D, h, w]` (the embedding that is flip-averaged and
    upsampled) and `probe_log_probs(code) -> (cluster_log_probs, linear_log_probs | None)`.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "segmenter"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The heads of the released methods use PyTorch's default initialisation; keep it (the guarded torch
        # init functions inside reset_parameters() leave loaded weights untouched).
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)):
            module.reset_parameters()
        elif hasattr(module, "reset_parameters") and module.__class__.__module__.startswith("hf_useg"):
            module.reset_parameters()

    # ----------------------------------------------------------------------------------------------------------
    # construction helpers
    @classmethod
    def from_pretrained_backbone(
        cls, backbone: str, config: PreTrainedConfig | None = None, **config_kwargs
    ) -> UnsupervisedSegmentationPreTrainedModel:
        """A fresh model (randomly initialised heads) on top of pretrained backbone weights.

        Example:

        ```python
        >>> model = StegoForUnsupervisedSegmentation.from_pretrained_backbone("facebook/dino-vits8", dim=70)
        ```
        """
        from .backbones import FeatureBackbone

        pretrained = FeatureBackbone.from_pretrained(backbone)
        if config is None:
            config = cls.config_class(backbone_config=pretrained.model.config.to_dict(), **config_kwargs)
        else:
            config.backbone_config = pretrained.model.config
            for key, value in config_kwargs.items():
                setattr(config, key, value)
        if hasattr(config, "backbone_name"):
            config.backbone_name = backbone
        model = cls(config)
        missing, unexpected = model.backbone.model.load_state_dict(pretrained.model.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"backbone weights of {backbone!r} do not fit: missing {missing}, unexpected {unexpected}"
            )
        return model

    def set_cluster_names(self, assignment: Sequence[int] | np.ndarray, class_names: Sequence[str]) -> None:
        """Name every cluster after the class it was matched to (``assignment[cluster] = class or -1``), so the
        pipeline and the Space can label segments. Unmatched clusters are called ``unmatched_<i>``."""
        names = {}
        for cluster, matched in enumerate(np.asarray(assignment).tolist()):
            if matched < 0 or matched >= len(class_names):
                names[cluster] = f"unmatched_{cluster}"
            else:
                names[cluster] = str(class_names[matched])
        self.config.id2label = names
        self.config.label2id = {}
        for cluster, name in names.items():
            self.config.label2id.setdefault(name, cluster)

    # ----------------------------------------------------------------------------------------------------------
    # evaluation
    def compute_code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probe_log_probs(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self,
        pixel_values: torch.Tensor,
        output_size: tuple[int, int] | None = None,
        flip_tta: bool = True,
        crf: bool = False,
        images: np.ndarray | Sequence[np.ndarray] | None = None,
        crf_workers: int = 0,
        autocast_dtype: str | torch.dtype | None = None,
        crf_backend: str = "pydensecrf",
    ) -> UnsupervisedSegmentationPrediction:
        """Segment a batch in the method's evaluation order (STEGO, METHODS 1.3).

        code = (code(x) + flip(code(flip(x)))) / 2 when ``flip_tta`` -> bilinear upsample (align_corners=False)
        to ``output_size`` (default: the input size) -> cluster/linear log-probabilities -> with ``crf=True`` the
        dense-CRF marginals.

        Args:
            images: uint8 RGB images ``[B, H, W, 3]`` at ``output_size`` for the CRF. When omitted they are rebuilt
                from ``pixel_values`` the way STEGO does (un-normalise, x255, truncate; METHODS 0.7), bilinearly
                resized first when ``output_size`` differs from the input size.
            crf_workers: CPU processes for the CRF (0 = in this process; ``crf_backend="pydensecrf"`` only).
            crf_backend: ``"pydensecrf"`` (the reference, default) or ``"torch"`` (`hf_useg.crf`'s batched PyTorch
                implementation of the same model, run on the logits' device).
            autocast_dtype: run the backbone under ``torch.autocast`` with this dtype (`torch.bfloat16`,
                `torch.float16`, or ``"auto"``: bfloat16 on a GPU, full precision on the CPU; see
                `hf_useg.backbones.resolve_autocast_dtype`); the heads and probes always run in the model's dtype.
                `None` (default) follows an enclosing `hf_useg.backbones.backbone_autocast` block, if any;
                ``"float32"`` / `torch.float32` runs the backbone at full precision.
        """
        precision = backbone_precision(autocast_dtype, pixel_values.device)
        was_training = self.training
        self.eval()
        try:
            with precision:
                code = self.compute_code(pixel_values)
                if flip_tta:
                    code = (code + self.compute_code(pixel_values.flip(-1)).flip(-1)) / 2
            size = tuple(output_size) if output_size is not None else tuple(pixel_values.shape[-2:])
            code = F.interpolate(code, size=size, mode="bilinear", align_corners=False)
            cluster_log_probs, linear_log_probs = self.probe_log_probs(code)
            prediction = UnsupervisedSegmentationPrediction(
                cluster_log_probs=cluster_log_probs, linear_log_probs=linear_log_probs
            )
            if crf:
                from .crf import denormalize_to_uint8, dense_crf_batch

                if images is None:
                    source = pixel_values
                    if tuple(source.shape[-2:]) != size:
                        source = F.interpolate(source, size=size, mode="bilinear", align_corners=False)
                    images = denormalize_to_uint8(source.float().cpu())
                images = np.asarray(images)
                if images.ndim != 4 or tuple(images.shape[1:3]) != size:
                    raise ValueError(
                        f"images for the CRF must be [B, {size[0]}, {size[1]}, 3] uint8, got shape {images.shape}"
                    )

                def refine(log_probs: torch.Tensor) -> torch.Tensor:
                    logits = log_probs.float() if crf_backend == "torch" else log_probs.float().cpu()
                    marginals = dense_crf_batch(images, logits, num_workers=crf_workers, backend=crf_backend)
                    return marginals.to(log_probs.device)

                prediction.cluster_crf_probs = refine(cluster_log_probs)
                if linear_log_probs is not None:
                    prediction.linear_crf_probs = refine(linear_log_probs)
            return prediction
        finally:
            self.train(was_training)
