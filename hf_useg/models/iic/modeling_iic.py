"""IIC (Ji et al., ICCV 2019): invariant information clustering for segmentation (METHODS 3). Two heads on a shared
trunk: head A overclusters, head B has one output per class; both are trained to maximise the mutual information
between the cluster assignments of corresponding pixels of two views of an image."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ...backbones import FeatureBackbone
from ...modeling_utils import (
    UnsupervisedSegmentationPrediction,
    UnsupervisedSegmentationPreTrainedModel,
    UnsupervisedSegmenterOutput,
    check_pixel_values,
)
from .configuration_iic import IicConfig
from .loss_iic import iic_segmentation_loss

__all__ = [
    "IicForUnsupervisedSegmentation",
    "IicHead",
    "IicPreTrainedModel",
    "IicSegmenterOutput",
    "IicVggTrunk",
    "iic_trunk_input",
    "sobel_channels",
]

HEADS = ("A", "B")
# ITU-R 601 luma, what IIC's greyscale (OpenCV / PIL "L") uses.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


def sobel_channels(
    pixel_values: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]
) -> torch.Tensor:
    """IIC's Sobel input `[B, 2, H, W]` (x then y) from normalised RGB `pixel_values` `[B, 3, H, W]`.

    The image is un-normalised to [0, 1] (`x * std + mean`), turned to greyscale `0.299 R + 0.587 G + 0.114 B`,
    and cross-correlated (as `conv2d` does, zero padding 1) with `[[1, 0, -1], [2, 0, -2], [1, 0, -1]]` (x: left
    minus right) and `[[1, 2, 1], [0, 0, 0], [-1, -2, -1]]` (y: top minus bottom).

    Example:

    ```python
    >>> import torch
    >>> grey = torch.zeros(1, 3, 4, 4); grey[..., 2:] = 1.0          # a vertical edge, in [0, 1]
    >>> sobel_channels(grey, image_mean=[0, 0, 0], image_std=[1, 1, 1])[0, 0, 1].tolist()
    [0.0, -4.0, -4.0, 4.0]
    ```
    """
    shape = (1, 3, 1, 1)
    mean = torch.tensor(image_mean, dtype=pixel_values.dtype, device=pixel_values.device).view(shape)
    std = torch.tensor(image_std, dtype=pixel_values.dtype, device=pixel_values.device).view(shape)
    weights = torch.tensor(GREY_WEIGHTS, dtype=pixel_values.dtype, device=pixel_values.device).view(shape)
    grey = ((pixel_values * std + mean) * weights).sum(dim=1, keepdim=True)
    kernels = torch.tensor((SOBEL_X, SOBEL_Y), dtype=pixel_values.dtype, device=pixel_values.device).unsqueeze(1)
    return F.conv2d(grey, kernels, padding=1)


def iic_trunk_input(
    pixel_values: torch.Tensor, input_mode: str, image_mean: Sequence[float], image_std: Sequence[float]
) -> torch.Tensor:
    """The VGG trunk's input for `input_mode`: `"rgb"` -> `pixel_values`; `"sobel"` -> the 2 Sobel channels;
    `"rgb_sobel"` -> `[normalised R, G, B, Sobel x, Sobel y]` (5 channels). See [`sobel_channels`]."""
    if input_mode == "rgb":
        return pixel_values
    sobel = sobel_channels(pixel_values, image_mean, image_std)
    if input_mode == "sobel":
        return sobel
    if input_mode == "rgb_sobel":
        return torch.cat([pixel_values, sobel], dim=1)
    raise ValueError(f"input_mode must be 'rgb', 'sobel' or 'rgb_sobel', got {input_mode!r}")


@dataclass
class IicSegmenterOutput(UnsupervisedSegmenterOutput):
    """`UnsupervisedSegmenterOutput` of IIC.

    `logits` are head B's log-probabilities `[B, num_classes, h, w]` and `overcluster_logits` head A's
    `[B, num_overclusters, h, w]` (both of the `eval_sub_head`, at feature resolution). `loss` is the IIC loss of
    the trained head (−MI, so negative) and `loss_no_lamb` the same with λ = 1, averaged over sub-heads.
    """

    overcluster_logits: torch.FloatTensor | None = None
    loss_no_lamb: torch.FloatTensor | None = None


def _conv(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Conv2d:
    """A bias-free conv marked for IIC's Kaiming-normal initialisation (see `IicPreTrainedModel._init_weights`)."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, bias=False
    )
    conv.iic_kaiming_init = True
    return conv


class IicVggTrunk(nn.Module):
    """The paper's segmentation trunk: 3x3 convs (no bias) each followed by BatchNorm and ReLU, with a 2x2 max-pool
    after the first `pool_after` convs (defaults: channels 64, 128, pool, 256, 256, 512 dilation 2, 512 dilation 2).
    Output stride 2 (`patch_size`): inputs must have even height and width."""

    def __init__(self, in_channels: int, channels: Sequence[int], dilations: Sequence[int], pool_after: int):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, (out, dilation) in enumerate(zip(channels, dilations)):
            if index == pool_after:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            layers += [
                _conv(previous, out, kernel_size=3, dilation=dilation),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            previous = out
        if pool_after == len(channels):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.hidden_size = previous
        self.patch_size = 2

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class IicProjection(nn.Module):
    """Optional adaptor between trunk and heads: 1x1 conv (no bias), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _conv(in_channels, out_channels, kernel_size=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(features)))


class IicHead(nn.Module):
    """`num_sub_heads` independent 1x1 convs (no bias) to `num_outputs` cluster logits."""

    def __init__(self, in_channels: int, num_outputs: int, num_sub_heads: int = 1):
        super().__init__()
        self.sub_heads = nn.ModuleList(_conv(in_channels, num_outputs, kernel_size=1) for _ in range(num_sub_heads))

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        return [sub_head(code) for sub_head in self.sub_heads]


class IicPreTrainedModel(UnsupervisedSegmentationPreTrainedModel):
    config_class = IicConfig
    base_model_prefix = "iic"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # IIC initialises its convs with Kaiming-normal (fan_in, ReLU gain) and BatchNorm with 1 and 0 (done above).
        # The convs are tagged (not found through their parent: transformers skips parameter-less containers).
        if isinstance(module, nn.Conv2d) and getattr(module, "iic_kaiming_init", False):
            init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


class IicForUnsupervisedSegmentation(IicPreTrainedModel):
    """IIC for segmentation: trunk (paper VGG net from scratch, or an HF backbone) -> optional projection ->
    head A (`num_overclusters`) and head B (`num_classes`), 1x1 convs + softmax.

    `forward(pixel_values, pixel_values_pair=..., affine2_to_1=..., mask=..., head="A" | "B")` computes the IIC
    loss of that head between the two views: **the loss is −MI, so it is negative** (−ln K at best). Without
    `pixel_values_pair` there is no loss. `labels` are accepted for API uniformity and ignored (the training
    recipe turns them into a `mask` only with its `mask_unlabelled` option).

    Evaluation: `predict(pixel_values, head="B")` (the default; Hungarian matching) or `head="A"` (majority
    matching). `compute_code` returns the selected head's *softmax probabilities* (not logits), so `predict`
    averages probabilities under flip TTA, bilinearly upsamples probabilities and takes their log: with
    `flip_tta=False` this is exactly IIC's evaluation (softmax -> bilinear upsample -> argmax).

    Example:

    ```python
    >>> import torch
    >>> from hf_useg import IicConfig, IicForUnsupervisedSegmentation
    >>> config = IicConfig(vgg_channels=[8, 8, 16, 16, 16, 16], num_classes=3, num_overclusters=9, displacement=2)
    >>> model = IicForUnsupervisedSegmentation(config)
    >>> images = torch.randn(2, 3, 32, 32)
    >>> flip = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    >>> out = model(images, pixel_values_pair=images.flip(-1), affine2_to_1=flip, head="A")
    >>> out.logits.shape, out.overcluster_logits.shape, bool(out.loss < 0)
    (torch.Size([2, 3, 16, 16]), torch.Size([2, 9, 16, 16]), True)
    >>> model.predict(images, head="A").cluster_log_probs.shape
    torch.Size([2, 9, 32, 32])
    ```
    """

    def __init__(self, config: IicConfig):
        super().__init__(config)
        if config.trunk == "vgg":
            in_channels = {"rgb": 3, "sobel": 2, "rgb_sobel": 5}[config.input_mode]
            self.backbone = IicVggTrunk(in_channels, config.vgg_channels, config.vgg_dilations, config.vgg_pool_after)
        else:
            self.backbone = FeatureBackbone(
                config.backbone_config,
                pos_embed_interpolation=config.pos_embed_interpolation,
                frozen=config.freeze_backbone,
            )
        channels = self.backbone.hidden_size
        self.projection = None
        if config.projection_dim is not None:
            self.projection = IicProjection(channels, config.projection_dim)
            channels = config.projection_dim
        self.head_a = IicHead(channels, config.num_overclusters, config.num_sub_heads)
        self.head_b = IicHead(channels, config.num_classes, config.num_sub_heads)
        self._eval_head = "B"
        self.post_init()

    @property
    def patch_size(self) -> int:
        """Stride of the feature map (2 for the VGG trunk, the patch size of a ViT)."""
        return self.backbone.patch_size

    # ----------------------------------------------------------------------------------------------------------
    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Trunk feature map `[B, C, h, w]` of normalised RGB `pixel_values` (Sobel channels derived inside)."""
        check_pixel_values(pixel_values, self.backbone.patch_size, 3)
        if self.config.trunk == "vgg":
            inputs = iic_trunk_input(
                pixel_values, self.config.input_mode, self.config.image_mean, self.config.image_std
            )
            return self.backbone(inputs)
        return self.backbone(pixel_values).feature_map

    def _code(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.projection is None else self.projection(features)

    def _head(self, head: str) -> IicHead:
        if head not in HEADS:
            raise ValueError(f"head must be 'A' (overclustering) or 'B' (num_classes outputs), got {head!r}")
        return self.head_a if head == "A" else self.head_b

    def head_probs(self, pixel_values: torch.Tensor, head: str = "B") -> torch.Tensor:
        """Softmax of `head`'s `eval_sub_head` at feature resolution `[B, K, h, w]`."""
        logits = self._head(head).sub_heads[self.config.eval_sub_head](self._code(self.extract_features(pixel_values)))
        return logits.softmax(dim=1)

    @contextlib.contextmanager
    def use_head(self, head: str) -> Iterator[None]:
        """Within the block `compute_code` / `predict` (and so `hf_useg.inference.evaluate_segmenter`) use `head`.

        Example:

        ```python
        >>> with model.use_head("A"):                                                    # doctest: +SKIP
        ...     results = evaluate_segmenter(model, dataset, processor, num_classes, matching="majority")
        ```
        """
        self._head(head)
        previous, self._eval_head = self._eval_head, head
        try:
            yield
        finally:
            self._eval_head = previous

    def compute_code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selected head's softmax probabilities (head B unless inside `use_head("A")`): what `predict`
        flip-averages and upsamples."""
        return self.head_probs(pixel_values, self._eval_head)

    def probe_log_probs(self, code: torch.Tensor) -> tuple[torch.Tensor, None]:
        # `code` holds probabilities (averaged and/or bilinearly resized: still summing to one); IIC has no linear
        # probe.
        return code.clamp_min(torch.finfo(code.dtype).tiny).log(), None

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
        head: str = "B",
    ) -> UnsupervisedSegmentationPrediction:
        """`UnsupervisedSegmentationPreTrainedModel.predict` for head B (default) or head A (`head="A"`):
        probabilities (flip-averaged with `flip_tta`) -> bilinear upsample -> log. `cluster_log_probs` has
        `num_classes` (B) or `num_overclusters` (A) channels; `linear_log_probs` is `None`."""
        with self.use_head(head):
            return super().predict(
                pixel_values,
                output_size=output_size,
                flip_tta=flip_tta,
                crf=crf,
                images=images,
                crf_workers=crf_workers,
                autocast_dtype=autocast_dtype,
                crf_backend=crf_backend,
            )

    @torch.no_grad()
    def predict_heads(
        self, pixel_values: torch.Tensor, output_size: tuple[int, int] | None = None, flip_tta: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of head A and head B `[B, K_A | K_B, H, W]` in one trunk pass (per view), in `predict`'s
        order; `predict(head=...)` gives the same values one head at a time."""
        was_training = self.training
        self.eval()
        try:
            size = tuple(output_size) if output_size is not None else tuple(pixel_values.shape[-2:])

            def probs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                code = self._code(self.extract_features(images))
                index = self.config.eval_sub_head
                return (
                    self.head_a.sub_heads[index](code).softmax(dim=1),
                    self.head_b.sub_heads[index](code).softmax(dim=1),
                )

            outputs = probs(pixel_values)
            if flip_tta:
                flipped = probs(pixel_values.flip(-1))
                outputs = tuple((p + q.flip(-1)) / 2 for p, q in zip(outputs, flipped))
            return tuple(
                self.probe_log_probs(F.interpolate(p, size=size, mode="bilinear", align_corners=False))[0]
                for p in outputs
            )
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------------------------------------------------
    def _loss_mask(self, mask: torch.Tensor | None, size: tuple[int, int], input_size: tuple[int, int]):
        if mask is None or tuple(mask.shape[-2:]) == size or tuple(mask.shape[-2:]) != input_size:
            return mask  # the loss checks the shape and names a wrong one
        return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]

    def iic_loss(
        self,
        code: torch.Tensor,
        code_pair: torch.Tensor,
        head: str,
        input_size: tuple[int, int],
        affine2_to_1: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """IIC loss of `head` between the codes of two views, averaged over sub-heads: softmax -> (bilinear upsample
        to `input_size` when `config.loss_at_input_resolution`) -> `iic_segmentation_loss`. Returns
        `(loss, loss_no_lamb)`; both are −MI, i.e. negative."""
        config = self.config
        lamb = config.lamb_a if head == "A" else config.lamb_b
        module = self._head(head)
        size = tuple(input_size) if config.loss_at_input_resolution else tuple(code.shape[-2:])
        mask = self._loss_mask(mask, size, tuple(input_size))
        losses, losses_no_lamb = [], []
        for logits1, logits2 in zip(module(code), module(code_pair)):
            probs1, probs2 = logits1.softmax(dim=1), logits2.softmax(dim=1)
            if tuple(probs1.shape[-2:]) != size:
                probs1 = F.interpolate(probs1, size=size, mode="bilinear", align_corners=False)
                probs2 = F.interpolate(probs2, size=size, mode="bilinear", align_corners=False)
            loss, loss_no_lamb = iic_segmentation_loss(
                probs1,
                probs2,
                affine2_to_1=affine2_to_1,
                mask=mask,
                displacement=config.displacement,
                lamb=lamb,
                uncollapsed=config.uncollapsed,
            )
            losses.append(loss)
            losses_no_lamb.append(loss_no_lamb)
        return torch.stack(losses).mean(), torch.stack(losses_no_lamb).mean()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values_pair: torch.Tensor | None = None,
        affine2_to_1: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        head: str = "B",
        return_dict: bool | None = None,
        **kwargs,
    ) -> IicSegmenterOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `[B, 3, H, W]`):
                Normalised RGB images (view 1).
            labels (`torch.Tensor`, *optional*):
                Ignored (IIC is unsupervised).
            pixel_values_pair (`torch.Tensor` of shape `[B, 3, H, W]`, *optional*):
                View 2 (colour-jittered and possibly flipped copy, see `hf_useg.models.iic.make_iic_views`). When
                given, `loss` is computed; the returned `logits` / `overcluster_logits` are then detached
                monitoring outputs (gradients flow through `loss` only).
            affine2_to_1 (`torch.Tensor` of shape `[B, 2, 3]`, *optional*):
                Maps view 2 back to view 1 (`affine_grid` convention); identity when `None`.
            mask (`torch.Tensor` of shape `[B, H, W]` or the feature size, *optional*):
                Validity mask of view 1 (1 = pixel used by the loss). A mask at input size is resized (nearest) when
                the loss runs at feature resolution.
            head (`str`, *optional*, defaults to `"B"`):
                Which head the loss trains: `"A"` (overclustering, `lamb_a`) or `"B"` (`lamb_b`).
        """
        self._head(head)
        features = self.extract_features(pixel_values)
        code = self._code(features)
        loss = loss_no_lamb = None
        if pixel_values_pair is not None:
            if pixel_values_pair.shape != pixel_values.shape:
                raise ValueError(
                    f"pixel_values_pair {tuple(pixel_values_pair.shape)} must match pixel_values "
                    f"{tuple(pixel_values.shape)}"
                )
            code_pair = self._code(self.extract_features(pixel_values_pair))
            loss, loss_no_lamb = self.iic_loss(
                code, code_pair, head, tuple(pixel_values.shape[-2:]), affine2_to_1=affine2_to_1, mask=mask
            )
        elif affine2_to_1 is not None or mask is not None:
            raise ValueError("affine2_to_1 and mask describe a view pair: pass pixel_values_pair as well")
        index = self.config.eval_sub_head
        # With a pair the monitoring outputs carry no graph: under DDP an output that reaches the untrained head's
        # weights would make DDP wait for gradients that never come.
        with torch.set_grad_enabled(torch.is_grad_enabled() and pixel_values_pair is None):
            logits = torch.log_softmax(self.head_b.sub_heads[index](code), dim=1)
            overcluster_logits = torch.log_softmax(self.head_a.sub_heads[index](code), dim=1)
        return IicSegmenterOutput(
            loss=loss,
            logits=logits,
            code=code,
            features=features,
            overcluster_logits=overcluster_logits,
            loss_no_lamb=loss_no_lamb,
        )
