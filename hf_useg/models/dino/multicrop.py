"""DINO's multi-crop augmentation (METHODS 4.1) in PIL + torch, without torchvision.

Every view is a random-resized crop (bicubic) followed by DINO's photometric pipeline:

* all views: horizontal flip (p=0.5), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a
  random order; p=0.8), grayscale (p=0.2);
* global view 1: Gaussian blur (p=1.0); global view 2: blur (p=0.1) and solarisation (p=0.2); further global
  views alternate between these two recipes;
* local views: blur (p=0.5);
* then ``ToTensor`` and ImageNet normalisation.

Blur radii are drawn uniformly in [0.1, 2.0] and applied with `PIL.ImageFilter.GaussianBlur`, as DINO does. The
crops, the PIL colour jitter and the normalisation are `hf_useg.augmentation`'s.
Every random choice comes from the `torch.Generator` handed to the call, so a seeded generator reproduces the views
exactly (what makes resumed training runs bit-exact).

Example:

```python
>>> import torch
>>> from PIL import Image
>>> from hf_useg.models.dino.multicrop import DinoMultiCropAugmentation
>>> augment = DinoMultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=3)
>>> views = augment(Image.new("RGB", (64, 48), (120, 30, 200)), generator=torch.Generator().manual_seed(0))
>>> views["global_crops"].shape, views["local_crops"].shape
(torch.Size([2, 3, 32, 32]), torch.Size([3, 3, 16, 16]))
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from ...augmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    chance,
    normalize_images,
    pil_to_tensor,
    random_resized_crop_box,
    uniform,
)
from ...augmentation import color_jitter_pil as color_jitter

__all__ = [
    "DinoMultiCropAugmentation",
    "MultiCropDataset",
    "collate_multicrop",
    "color_jitter",
    "random_resized_crop_box",
]


class DinoMultiCropAugmentation:
    """DINO's ``DataAugmentationDINO``: ``global_crops_number`` global and ``local_crops_number`` local views of one
    image (see the module docstring for the photometric pipeline).

    Args:
        global_crops_scale: area fraction range of the global crops (DINO: 0.4-1).
        local_crops_scale: area fraction range of the local crops (DINO: 0.05-0.4).
        local_crops_number: local views per image (DINO: 8; 0 for none).
        global_crops_size: side of the global views in pixels (DINO: 224).
        local_crops_size: side of the local views in pixels (DINO: 96).
        global_crops_number: global views per image (DINO: 2).
        color_jitter_probability, grayscale_probability: of every view (DINO: 0.8, 0.2).
        solarization_probability: of the second global view (DINO: 0.2).
        mean, std: normalisation (ImageNet's).

    Calling it with a PIL image (any mode; converted to RGB) and a generator returns
    ``{"global_crops": [G, 3, S, S], "local_crops": [L, 3, s, s]}`` float tensors.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_number: int = 2,
        color_jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        solarization_probability: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if global_crops_number < 1 or local_crops_number < 0:
            raise ValueError(
                f"need >= 1 global and >= 0 local crops, got {global_crops_number} and {local_crops_number}"
            )
        if global_crops_size < 1 or local_crops_size < 1:
            raise ValueError(f"crop sizes must be >= 1, got {global_crops_size} and {local_crops_size}")
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
        self.global_crops_scale = tuple(float(s) for s in global_crops_scale)
        self.local_crops_scale = tuple(float(s) for s in local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_number = int(global_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        for name, value in (
            ("color_jitter_probability", color_jitter_probability),
            ("grayscale_probability", grayscale_probability),
            ("solarization_probability", solarization_probability),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.color_jitter_probability = float(color_jitter_probability)
        self.grayscale_probability = float(grayscale_probability)
        self.solarization_probability = float(solarization_probability)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def from_config(cls, config, options) -> DinoMultiCropAugmentation:
        """The augmentation of a run: the number of views from the model's [`DinoPretrainingConfig`], their
        sizes and scales from the recipe's `DinoPretrainingTrainingOptions`."""
        return cls(
            global_crops_scale=options.global_crops_scale,
            local_crops_scale=options.local_crops_scale,
            local_crops_number=config.local_crops_number,
            global_crops_size=options.global_crops_size,
            local_crops_size=options.local_crops_size,
            global_crops_number=config.global_crops_number,
            color_jitter_probability=options.color_jitter_probability,
            grayscale_probability=options.grayscale_probability,
            solarization_probability=options.solarization_probability,
        )

    def _view(
        self,
        image: Image.Image,
        size: int,
        scale: tuple[float, float],
        blur_probability: float,
        solarize_probability: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        left, top, crop_w, crop_h = random_resized_crop_box(image.width, image.height, scale, generator=generator)
        view = image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        if chance(0.5, generator):
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        if chance(self.color_jitter_probability, generator):
            view = color_jitter(view, 0.4, 0.4, 0.2, 0.1, generator=generator)
        if chance(self.grayscale_probability, generator):
            view = view.convert("L").convert("RGB")
        if chance(blur_probability, generator):
            view = view.filter(ImageFilter.GaussianBlur(radius=uniform(0.1, 2.0, generator)))
        if chance(solarize_probability, generator):
            view = ImageOps.solarize(view, threshold=128)
        return normalize_images(pil_to_tensor(view), self.mean, self.std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if not isinstance(image, Image.Image):
            raise TypeError(f"DinoMultiCropAugmentation takes a PIL image, got {type(image).__name__}")
        image = image.convert("RGB")
        global_crops = [
            self._view(
                image,
                self.global_crops_size,
                self.global_crops_scale,
                blur_probability=1.0 if index % 2 == 0 else 0.1,
                solarize_probability=0.0 if index % 2 == 0 else self.solarization_probability,
                generator=generator,
            )
            for index in range(self.global_crops_number)
        ]
        local_crops = [
            self._view(image, self.local_crops_size, self.local_crops_scale, 0.5, 0.0, generator)
            for _ in range(self.local_crops_number)
        ]
        size = self.local_crops_size
        return {
            "global_crops": torch.stack(global_crops),
            "local_crops": torch.stack(local_crops) if local_crops else torch.empty(0, 3, size, size),
        }


class MultiCropDataset(torch.utils.data.Dataset):
    """Multi-crop views of a `datasets.Dataset` (or any sequence of dicts with an image column), indexed by
    ``(index, seed)`` pairs: item ``(i, s)`` is the augmentation of image ``i`` with a generator seeded with ``s``,
    so the views do not depend on which DataLoader worker computes them."""

    def __init__(self, dataset, augmentation: DinoMultiCropAugmentation, image_column: str = "image"):
        self.dataset = dataset
        self.augmentation = augmentation
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        image = self.dataset[int(index)][self.image_column]
        return self.augmentation(image, generator=torch.Generator().manual_seed(int(seed)))


def collate_multicrop(items: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    """Stack views into the model's inputs: ``pixel_values`` ``[B, G, 3, S, S]`` and ``local_pixel_values``
    ``[B, L, 3, s, s]`` (None when there are no local crops)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    local = torch.stack([item["local_crops"] for item in items])
    return {
        "pixel_values": torch.stack([item["global_crops"] for item in items]),
        "local_pixel_values": local if local.shape[1] > 0 else None,
    }
