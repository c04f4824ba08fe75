"""Image processor for the unsupervised-segmentation models: the STEGO/PiCIE evaluation protocol (METHODS 0.2)
as defaults, segmentation maps processed alongside, and `post_process_semantic_segmentation` for the
``image-segmentation`` pipeline.

Example:

```python
>>> import numpy as np
>>> from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor
>>> processor = UnsupervisedSegmentationImageProcessor()
>>> image = np.zeros((360, 480, 3), dtype=np.uint8)
>>> labels = np.zeros((360, 480), dtype=np.uint8)
>>> batch = processor(image, segmentation_maps=labels, return_tensors="pt")
>>> batch["pixel_values"].shape, batch["labels"].shape, batch["labels"].dtype
(torch.Size([1, 3, 320, 320]), torch.Size([1, 320, 320]), torch.int64)
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    load_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack

__all__ = [
    "UnsupervisedSegmentationImageProcessor",
    "as_protocol_processor",
    "protocol_image_processor",
    "whole_image_processor",
]

# PIL modes that `Image.convert("RGB")` maps from 8-bit values (alpha is dropped, palettes are looked up).
_PIL_RGB_CONVERTIBLE = {
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
}
# PIL modes accepted for segmentation maps (single channel of class ids).
_PIL_LABEL_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"}
# Value given to label pixels that a center crop larger than the (resized) map has to pad: "ignore".
LABEL_PAD_VALUE = -1


class UnsupervisedSegmentationImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        When `do_center_crop=False`, images (and maps) are resized so that height and width are multiples of
        `size_divisor` (the backbone's patch size). `None` disables it.
    """

    size_divisor: int | None


class UnsupervisedSegmentationImageProcessor(PilBackend):
    r"""
    Pre-processing of the STEGO/PiCIE evaluation protocol (METHODS 0.2), with segmentation maps.

    Defaults: resize the shorter side to 320 with **nearest-neighbour** interpolation (STEGO uses nearest even
    for images; the longer side becomes ``int(320 * long / short)``, as torchvision's `Resize`), center-crop
    320×320 (torchvision's `CenterCrop` offsets ``round((H - 320) / 2)``, zero padding when the image is
    smaller), rescale by 1/255, normalise with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
    0.225). Training used a resolution of 224: ``size={"shortest_edge": 224}, crop_size=224``.

    Segmentation maps get the same nearest resize and crop (never rescaled or normalised) and come back as
    ``labels`` (int64); pixels a crop has to pad get -1 (ignored by the metric).

    With ``do_center_crop=False`` (what the ``image-segmentation`` pipeline wants: the whole image), the
    shorter side is resized to ``size`` and then both sides are rounded to the nearest multiple of
    ``size_divisor`` (default 8) — in one resize, so nothing of the image is cut off and the predicted map
    stays aligned with the input after `post_process_semantic_segmentation` upsamples it (the aspect ratio
    changes by less than ``size_divisor / 2`` pixels per side).

    Inputs: PIL images, NumPy arrays (``HWC`` or ``HW``; ``NHWC`` for a batch), torch tensors (``CHW`` or
    ``HW``; ``NCHW`` for a batch), strings (paths/URLs, via `transformers.image_utils.load_image`), or lists
    of these. ``input_data_format`` overrides the channel layout of arrays and tensors. Colour rule
    (``do_convert_rgb``):

    * PIL: modes ``1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, LAB, HSV`` go through
      ``Image.convert("RGB")`` — grey is replicated, palettes are looked up, **alpha is dropped (not
      composited)**, exactly like the datasets' ``Image.open(path).convert("RGB")``. 16/32-bit integer and
      float modes (``I``, ``I;16``, ``F``) raise a `ValueError`: they have no fixed 0–255 range (PIL's
      ``convert("RGB")`` would clip them to 255, not scale them). `hf_useg.data.load_segmentation_dataset`
      rejects such images too, naming the file. The ``image-segmentation`` pipeline cannot: transformers'
      ``load_image`` converts every input to RGB before this processor sees it, so convert 16-bit images to
      8 bits yourself before passing them to a pipeline.
    * arrays/tensors: 1 channel is replicated to 3, 3 channels are RGB, a 4th (alpha) channel is dropped;
      2 or 5+ channels raise. Values must be integers in 0–255 (uint8); float inputs are accepted only with
      ``do_rescale=False`` (already in 0–1).

    Segmentation maps: 2-D integer class-id maps (PIL modes ``1, L, P, I, I;16``; arrays ``HW``, ``HW1``,
    ``1HW``; a 3-D array or a list is a batch). Colour-coded (RGB) maps raise.

    Example:

    ```python
    >>> from PIL import Image
    >>> processor = UnsupervisedSegmentationImageProcessor(do_center_crop=False, size=320)
    >>> processor(Image.new("RGB", (500, 333)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 320, 480])
    ```
    """

    valid_kwargs = UnsupervisedSegmentationImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.NEAREST
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 320}
    default_to_square = False
    crop_size = {"height": 320, "width": 320}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    size_divisor = 8

    def __init__(self, **kwargs: Unpack[UnsupervisedSegmentationImageProcessorKwargs]):
        super().__init__(**kwargs)

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any | None = None,
        **kwargs: Unpack[UnsupervisedSegmentationImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Pre-process images (and optionally their segmentation maps) into ``pixel_values`` ``[B, 3, H, W]``
        float32 and ``labels`` ``[B, H, W]`` int64. Any class attribute (``size``, ``crop_size``,
        ``do_center_crop``, …) can be overridden per call.

        segmentation_maps (`ImageInput`, *optional*):
            Class-id maps, one per image, of the same size as their image.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    # --------------------------------------------------------------------------------------------------------
    def _preprocess_image_like_inputs(
        self,
        images: Any,
        segmentation_maps: Any | None = None,
        *,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        return_tensors: str | None = None,
        do_resize: bool = True,
        size: SizeDict | None = None,
        resample: PILImageResampling | int | None = None,
        do_center_crop: bool = True,
        crop_size: SizeDict | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        size_divisor: int | None = None,
        do_pad: bool | None = None,
        data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> BatchFeature:
        if do_pad:
            raise ValueError("do_pad is not supported; use do_center_crop or size_divisor")
        if data_format is not None and ChannelDimension(data_format) != ChannelDimension.FIRST:
            raise ValueError(f"only channels-first output is supported, got data_format={data_format!r}")
        if size_divisor is not None and (not isinstance(size_divisor, int) or size_divisor < 1):
            raise ValueError(f"size_divisor must be a positive int or None, got {size_divisor!r}")
        layout = None if input_data_format is None else ChannelDimension(input_data_format)
        resample = PILImageResampling.NEAREST if resample is None else PILImageResampling(resample)

        raw_images = _as_list(images, batch_ndim=4, what="images")
        arrays = [self._image_to_array(image, bool(do_convert_rgb), bool(do_rescale), layout) for image in raw_images]
        raw_maps = None
        if segmentation_maps is not None:
            raw_maps = _as_list(segmentation_maps, batch_ndim=3, what="segmentation_maps")
            if len(raw_maps) != len(arrays):
                raise ValueError(f"got {len(arrays)} images but {len(raw_maps)} segmentation maps")

        pixel_values, labels = [], []
        for index, array in enumerate(arrays):
            target = self._target_size(array.shape[:2], do_resize, size, do_center_crop, size_divisor)
            image = _resize(array, target, resample)
            if do_center_crop:
                image = _center_crop(image, crop_size, fill=0)
            image = image.astype(np.float32)
            if do_rescale:
                image = image * np.float32(rescale_factor)
            if do_normalize:
                image = (image - _per_channel(image_mean, image.shape[-1])) / _per_channel(image_std, image.shape[-1])
            pixel_values.append(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))

            if raw_maps is not None:
                label = _label_to_array(raw_maps[index], index)
                if label.shape != array.shape[:2]:
                    raise ValueError(
                        f"segmentation map {index} is {label.shape[0]}x{label.shape[1]} but its image is "
                        f"{array.shape[0]}x{array.shape[1]}"
                    )
                label = _resize(label[..., None], target, PILImageResampling.NEAREST)[..., 0]
                if do_center_crop:
                    label = _center_crop(label, crop_size, fill=LABEL_PAD_VALUE)
                labels.append(label.astype(np.int64))

        if return_tensors is not None and len({tuple(p.shape) for p in pixel_values}) > 1:
            sizes = sorted({tuple(p.shape[1:]) for p in pixel_values})
            raise ValueError(
                f"images of different processed sizes {sizes} cannot be stacked into one tensor: process "
                "them one at a time, use do_center_crop=True, or return_tensors=None"
            )
        data = {"pixel_values": pixel_values}
        if raw_maps is not None:
            data["labels"] = labels
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _target_size(
        image_size: tuple[int, int],
        do_resize: bool,
        size: SizeDict | None,
        do_center_crop: bool,
        size_divisor: int | None,
    ) -> tuple[int, int]:
        height, width = image_size
        if do_resize:
            if size is None:
                raise ValueError("do_resize=True needs a size")
            height, width = resize_output_size(height, width, size)
        if not do_center_crop and size_divisor is not None:
            height, width = (
                max(size_divisor, int(math.floor(n / size_divisor + 0.5)) * size_divisor) for n in (height, width)
            )
        return height, width

    @staticmethod
    def _image_to_array(
        image: Any, convert_rgb: bool, do_rescale: bool, layout: ChannelDimension | None
    ) -> np.ndarray:
        """One raw image → ``HWC`` array (uint8, or float32 for float input with ``do_rescale=False``)."""
        if isinstance(image, str):
            image = load_image(image)
        if isinstance(image, PIL.Image.Image):
            if convert_rgb:
                if image.mode not in _PIL_RGB_CONVERTIBLE:
                    raise ValueError(
                        f"unsupported PIL image mode {image.mode!r}: 16/32-bit integer and float images have "
                        "no fixed 0-255 range; scale them to 8 bits and convert to RGB first"
                    )
                image = image.convert("RGB")
            array = np.array(image)
            if array.dtype == bool:
                array = array.astype(np.uint8) * 255
            return array if array.ndim == 3 else array[..., None]
        if isinstance(image, torch.Tensor):
            array = image.detach().cpu().numpy()
            default_layout = ChannelDimension.FIRST
        elif isinstance(image, np.ndarray):
            array = image
            default_layout = ChannelDimension.LAST
        else:
            raise TypeError(
                f"unsupported image type {type(image).__name__}: pass PIL images, numpy arrays, torch tensors or paths"
            )
        if array.ndim == 2:
            array = array[..., None]
        elif array.ndim == 3:
            if (layout or default_layout) == ChannelDimension.FIRST:
                array = array.transpose(1, 2, 0)
        else:
            raise ValueError(f"an image must be 2-D or 3-D, got shape {tuple(array.shape)}")
        channels = array.shape[-1]
        if convert_rgb:
            if channels not in (1, 3, 4):
                hint = ""
                if layout is None and array.shape[0] in (1, 3, 4):
                    other = "channels_first" if default_layout == ChannelDimension.LAST else "channels_last"
                    hint = f" (if the array's channels are on the other axis pass input_data_format={other!r})"
                raise ValueError(
                    f"an image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels} with shape "
                    f"{tuple(image.shape)}{hint}"
                )
            array = np.repeat(array, 3, axis=-1) if channels == 1 else array[..., :3]
        if np.issubdtype(array.dtype, np.floating):
            if do_rescale:
                raise ValueError(
                    f"float images ({array.dtype}) are ambiguous: pass uint8 values in 0-255, or set "
                    "do_rescale=False for float images already in 0-1"
                )
            return array.astype(np.float32)
        if array.dtype == bool:
            return array.astype(np.uint8) * 255
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"unsupported image dtype {array.dtype}")
        if array.dtype != np.uint8:
            if array.size and (array.min() < 0 or array.max() > 255):
                raise ValueError(
                    f"integer images must hold 8-bit values 0-255, got {array.dtype} in [{array.min()}, "
                    f"{array.max()}]; scale them to uint8 first"
                )
            array = array.astype(np.uint8)
        return array

    # --------------------------------------------------------------------------------------------------------
    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Turn model outputs into class-id maps: ``outputs.logits`` ``[B, K, h, w]`` are upsampled bilinearly
        (``align_corners=False``) to each ``target_sizes[i] = (height, width)`` and arg-maxed over ``K``;
        without ``target_sizes`` the maps stay at ``h x w``. Returns ``B`` int64 tensors ``[height, width]``.

        Example:

        ```python
        >>> from types import SimpleNamespace
        >>> logits = torch.randn(2, 5, 4, 6)
        >>> maps = UnsupervisedSegmentationImageProcessor().post_process_semantic_segmentation(
        ...     SimpleNamespace(logits=logits), target_sizes=[(8, 12), (3, 3)])
        >>> [tuple(m.shape) for m in maps]
        [(8, 12), (3, 3)]
        ```
        """
        logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"outputs.logits must be a [batch, classes, height, width] tensor, got {shape}")
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        if len(target_sizes) != logits.shape[0]:
            raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {logits.shape[0]} logits")
        maps = []
        for logit, target in zip(logits, target_sizes):
            height, width = (int(v) for v in target)
            resized = F.interpolate(logit[None].float(), size=(height, width), mode="bilinear", align_corners=False)
            maps.append(resized[0].argmax(dim=0))
        return maps


# ------------------------------------------------------------------------------------------------------------
def resize_output_size(height: int, width: int, size: SizeDict | Mapping[str, int]) -> tuple[int, int]:
    """Output ``(height, width)`` of a resize to ``size``: ``{"height", "width"}`` exactly, or
    ``{"shortest_edge"}`` (optionally with ``"longest_edge"`` as a cap) the way torchvision's `Resize`
    computes it: the shorter side becomes ``shortest_edge`` and the longer
    ``int(shortest_edge * long / short)``.

    Example:

    ```python
    >>> resize_output_size(360, 480, {"shortest_edge": 320})
    (320, 426)
    ```
    """
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    if get("shortest_edge"):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(get("shortest_edge")), int(get("shortest_edge") * long / short)
        max_size = get("longest_edge")
        if max_size and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), int(max_size)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    raise ValueError(f"size must have 'shortest_edge' or 'height' and 'width', got {dict(size)}")


def _as_list(inputs: Any, batch_ndim: int, what: str) -> list:
    """Split ``inputs`` into single images/maps: lists and tuples element-wise, arrays/tensors with
    ``batch_ndim`` dimensions along the first axis."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"no {what} given")
        return list(inputs)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == batch_ndim:
        # a [1, H, W] / [H, W, 1] map is one map, not a batch of 1-pixel-wide maps
        if what == "segmentation_maps" and inputs.shape[-1] == 1 and isinstance(inputs, np.ndarray):
            return [inputs]
        return list(inputs)
    return [inputs]


def _label_to_array(label: Any, index: int) -> np.ndarray:
    if isinstance(label, PIL.Image.Image):
        if label.mode not in _PIL_LABEL_MODES:
            raise ValueError(
                f"segmentation map {index}: PIL mode {label.mode!r} is not a single-channel class-id map "
                "(use L, P, I or I;16; convert colour-coded labels to class ids first)"
            )
        array = np.array(label)
    elif isinstance(label, torch.Tensor):
        array = label.detach().cpu().numpy()
    elif isinstance(label, np.ndarray):
        array = label
    else:
        raise TypeError(f"segmentation map {index}: unsupported type {type(label).__name__}")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != 2:
        raise ValueError(
            f"segmentation map {index} must be a 2-D class-id map, got shape {tuple(array.shape)} "
            "(colour-coded labels must be converted to class ids first)"
        )
    if array.dtype == bool:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"segmentation map {index} must hold integer class ids, got dtype {array.dtype}")
    info = np.iinfo(np.int32)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"segmentation map {index} has class ids outside the int32 range")
    return array


def _resize(array: np.ndarray, size: tuple[int, int], resample: PILImageResampling) -> np.ndarray:
    """Resize an ``HWC`` array with PIL (so nearest neighbour picks the same source pixels as torchvision's
    `Resize` on PIL images): uint8 RGB/grey directly, anything else channel by channel as 32-bit
    ``I``/``F``."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    if array.dtype == np.uint8 and array.shape[-1] in (1, 3):
        mode = "RGB" if array.shape[-1] == 3 else "L"
        image = PIL.Image.fromarray(array if mode == "RGB" else array[..., 0], mode=mode)
        resized = np.asarray(image.resize((width, height), resample=resample))
        return resized if resized.ndim == 3 else resized[..., None]
    integer = np.issubdtype(array.dtype, np.integer)
    work_dtype, mode = (np.int32, "I") if integer else (np.float32, "F")
    channels = []
    for channel in range(array.shape[-1]):
        image = PIL.Image.fromarray(np.ascontiguousarray(array[..., channel], dtype=work_dtype), mode=mode)
        channels.append(np.asarray(image.resize((width, height), resample=resample)))
    return np.stack(channels, axis=-1).astype(array.dtype if integer else np.float32)


def _center_crop(array: np.ndarray, crop_size: SizeDict | Mapping[str, int] | None, fill: int) -> np.ndarray:
    """torchvision's `CenterCrop` on an ``HW[C]`` array: pad with ``fill`` to the crop size when smaller (the
    extra pixel of an odd padding goes right/bottom), then take the top-left corner
    ``[round((H - h) / 2), round((W - w) / 2)]`` (Python's round, half to even)."""
    if crop_size is None:
        raise ValueError("do_center_crop=True needs a crop_size")
    get = crop_size.get if isinstance(crop_size, Mapping) else lambda key: getattr(crop_size, key, None)
    crop_h, crop_w = get("height"), get("width")
    if not crop_h or not crop_w:
        raise ValueError(f"crop_size must have 'height' and 'width', got {dict(crop_size)}")
    height, width = array.shape[:2]
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        padding = [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, padding, mode="constant", constant_values=fill)
        height, width = array.shape[:2]
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return array[top : top + crop_h, left : left + crop_w]


def _per_channel(values: float | Sequence[float] | None, channels: int) -> np.ndarray:
    if values is None:
        raise ValueError("do_normalize=True needs image_mean and image_std")
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, channels)
    if array.size != channels:
        raise ValueError(f"image_mean/image_std have {array.size} values for {channels}-channel images")
    return array


def protocol_image_processor(resolution: int, **kwargs) -> UnsupervisedSegmentationImageProcessor:
    """The evaluation protocol's processor (METHODS 0.2): shorter side to ``resolution`` (nearest), center crop
    ``resolution x resolution``, ImageNet normalisation.

    Example:

    ```python
    >>> processor = protocol_image_processor(320)
    >>> processor.crop_size["height"], processor.do_center_crop
    (320, True)
    ```
    """
    return UnsupervisedSegmentationImageProcessor(
        size={"shortest_edge": resolution},
        crop_size={"height": resolution, "width": resolution},
        do_center_crop=True,
        **kwargs,
    )


def whole_image_processor(resolution: int, size_divisor: int, **kwargs) -> UnsupervisedSegmentationImageProcessor:
    """The processor saved with models, for the ``image-segmentation`` pipeline and the Space: no crop (the mask
    covers the whole image), shorter side to ``resolution``, both sides resized to multiples of ``size_divisor``
    (the backbone's patch size)."""
    return UnsupervisedSegmentationImageProcessor(
        size={"shortest_edge": resolution}, do_center_crop=False, size_divisor=size_divisor, **kwargs
    )


def as_protocol_processor(processor: UnsupervisedSegmentationImageProcessor) -> UnsupervisedSegmentationImageProcessor:
    """The protocol (center-crop) version of a saved processor, at its ``shortest_edge`` resolution."""
    size = processor.size
    resolution = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    if resolution is None:
        resolution = processor.crop_size["height"]
    return protocol_image_processor(
        int(resolution), image_mean=processor.image_mean, image_std=processor.image_std, resample=processor.resample
    )
