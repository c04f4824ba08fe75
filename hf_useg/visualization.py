"""Colour segmentations and draw them over images (demo outputs, the Space, figures)."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["color_palette", "colorize", "overlay", "side_by_side"]


def color_palette(num_colors: int, seed: int = 0) -> np.ndarray:
    """``[num_colors, 3]`` uint8 colours, well separated for small counts and deterministic."""
    base = np.array(
        [
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
            [250, 190, 212],
            [0, 128, 128],
            [220, 190, 255],
            [170, 110, 40],
            [255, 250, 200],
            [128, 0, 0],
            [170, 255, 195],
            [128, 128, 0],
            [255, 215, 180],
            [0, 0, 128],
            [128, 128, 128],
        ],
        dtype=np.uint8,
    )
    if num_colors <= len(base):
        return base[:num_colors].copy()
    extra = np.random.default_rng(seed).integers(0, 256, size=(num_colors - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def colorize(segmentation: np.ndarray, palette: np.ndarray | None = None, ignore_color=(0, 0, 0)) -> np.ndarray:
    """An ``[H, W]`` int map to an ``[H, W, 3]`` uint8 image; ids outside the palette get ``ignore_color``."""
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2:
        raise ValueError(f"segmentation must be a 2-D map, got shape {segmentation.shape}")
    if palette is None:
        palette = color_palette(int(segmentation.max(initial=0)) + 1)
    valid = (segmentation >= 0) & (segmentation < len(palette))
    image = np.empty((*segmentation.shape, 3), dtype=np.uint8)
    image[:] = np.asarray(ignore_color, dtype=np.uint8)
    image[valid] = palette[segmentation[valid]]
    return image


def overlay(image: np.ndarray | Image.Image, segmentation: np.ndarray, palette=None, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured segmentation over an RGB image of the same size."""
    image = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    colours = colorize(segmentation, palette)
    if image.shape != colours.shape:
        raise ValueError(f"image {image.shape} and segmentation {segmentation.shape} sizes differ")
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def side_by_side(*panels: np.ndarray, gap: int = 4) -> Image.Image:
    """Concatenate ``[H, W, 3]`` panels horizontally with a white gap."""
    height = max(panel.shape[0] for panel in panels)
    parts = []
    for index, panel in enumerate(panels):
        padded = np.full((height, panel.shape[1], 3), 255, dtype=np.uint8)
        padded[: panel.shape[0]] = panel
        parts.append(padded)
        if index < len(panels) - 1:
            parts.append(np.full((height, gap, 3), 255, dtype=np.uint8))
    return Image.fromarray(np.concatenate(parts, axis=1))
