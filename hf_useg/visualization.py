"""Colour segmentations and draw them over images (demo outputs, the Space, figures)."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = [
    "color_palette",
    "colorize",
    "draw_attention_heads",
    "draw_boxes",
    "draw_composite",
    "overlay",
    "plot_training_curves",
    "read_metrics",
    "side_by_side",
]


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


def _mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside, as in DINO's
    figures, which pad the mask before tracing its contour)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_attention_heads(
    image: np.ndarray | Image.Image,
    masks_or_maps,
    alpha: float = 0.5,
    palette: np.ndarray | None = None,
    contour: bool = True,
) -> Image.Image:
    """Draw every attention head in its own colour over ``image`` (DINO's attention figure, METHODS 4.2).

    Args:
        image: RGB image, PIL or uint8 ``[H, W, 3]``.
        masks_or_maps: ``[heads, h, w]`` (torch tensor or array) per-head **masks** (bool: each head's pixels are
            blended with its colour at ``alpha``, and with ``contour`` the mask boundary is drawn in the full
            colour) or **maps** (float: each head is blended with weight ``alpha * map / max(map)``, so a head's
            strongest patch gets ``alpha``). Maps or masks of another size than the image (e.g. the patch grid) are
            resized with nearest-neighbour interpolation.
        alpha: blending weight in [0, 1].
        palette: ``[>= heads, 3]`` uint8 colours (default: `color_palette`).
        contour: draw mask boundaries (masks only).

    Heads are drawn one after the other (head 0 first), so where masks overlap the later colours lie on top.
    Returns an RGB `PIL.Image` of the image's size.

    Example:

    ```python
    >>> import numpy as np
    >>> masks = np.zeros((2, 4, 4), dtype=bool); masks[0, :2, :2] = True; masks[1, 2:, 2:] = True
    >>> draw_attention_heads(np.full((32, 32, 3), 128, np.uint8), masks).size
    (32, 32)
    ```
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an RGB PIL image or a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if hasattr(masks_or_maps, "detach"):  # torch tensor
        masks_or_maps = masks_or_maps.detach().cpu().numpy()
    heads = np.asarray(masks_or_maps)
    if heads.ndim != 3:
        raise ValueError(
            f"masks_or_maps must be [heads, height, width] (one image's heads), got shape {heads.shape}; "
            "index the batch first, e.g. prediction.attention_masks[0]"
        )
    is_mask = heads.dtype == bool
    if not is_mask and not np.issubdtype(heads.dtype, np.floating):
        raise TypeError(f"masks_or_maps must be bool masks or float maps, got dtype {heads.dtype}")
    height, width = image.shape[:2]
    if heads.shape[1:] != (height, width):
        rows = np.arange(height) * heads.shape[1] // height
        cols = np.arange(width) * heads.shape[2] // width
        heads = heads[:, rows][:, :, cols]
    if palette is None:
        palette = color_palette(len(heads))
    palette = np.asarray(palette)
    if len(palette) < len(heads):
        raise ValueError(f"palette has {len(palette)} colours for {len(heads)} heads")

    canvas = image.astype(np.float64)
    for index, head in enumerate(heads):
        colour = palette[index].astype(np.float64)
        if is_mask:
            weight = head.astype(np.float64) * alpha
        else:
            peak = float(head.max(initial=0.0))
            weight = np.clip(head / peak, 0.0, 1.0) * alpha if peak > 0 else np.zeros_like(head, dtype=np.float64)
        canvas = canvas * (1.0 - weight[..., None]) + colour * weight[..., None]
        if is_mask and contour:
            canvas[_mask_boundary(head)] = colour
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


def draw_boxes(image, boxes, ax=None, labels=None, *, linewidth: float = 2.0, title: str | None = None):
    """Draw an image and its xyxy pixel boxes (one colour each, optional labels) on a matplotlib Axes.

    Args:
        image: RGB image, PIL or uint8 ``[H, W, 3]`` (or a grey ``[H, W]`` array).
        boxes: ``[n, 4]`` (x1, y1, x2, y2) in pixels, x2/y2 exclusive (`hf_useg.models.detreg.box_sources`);
            numpy array, torch tensor or nested lists.
        ax: the Axes to draw on; ``None`` makes a new `matplotlib.figure.Figure` (no pyplot, so it works with any
            backend, Agg included): save it with ``ax.figure.savefig(path)``.
        labels: one text per box, written at the box's top-left corner.
        linewidth: box outline width in points.
        title: Axes title.

    Returns the Axes.

    Example:

    ```python
    >>> import numpy as np
    >>> ax = draw_boxes(np.zeros((40, 60, 3), np.uint8), [[5, 5, 30, 20]], labels=["a box"])
    >>> len(ax.patches)
    1
    ```
    """
    from matplotlib.patches import Rectangle

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if hasattr(boxes, "detach"):  # torch tensor
        boxes = boxes.detach().cpu().numpy()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"{len(labels)} labels for {len(boxes)} boxes")
    if ax is None:
        from matplotlib.figure import Figure

        height, width = image.shape[:2]
        figure = Figure(figsize=(6.0, 6.0 * height / max(width, 1)), layout="constrained")
        ax = figure.add_subplot()
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    colours = color_palette(len(boxes)) / 255.0
    for index, (x1, y1, x2, y2) in enumerate(boxes):
        # pixel centres are at integer coordinates in imshow, pixel edges at half-integers
        ax.add_patch(
            Rectangle(
                (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colours[index], linewidth=linewidth
            )
        )
        if labels is not None:
            ax.text(
                x1 - 0.5,
                y1 - 0.5,
                str(labels[index]),
                color="black",
                fontsize=9,
                va="top",
                ha="left",
                bbox={"facecolor": colours[index], "edgecolor": "none", "pad": 1.5, "alpha": 0.85},
                clip_on=True,
            )
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=10)
    return ax


def draw_composite(composite, ax=None, *, title: str | None = None):
    """Draw a `hf_useg.models.detreg.box_sources.CutMixComposite`: the composite image and its pseudo-boxes, each
    labelled ``"<box index>: <visible share>"`` (the default title says so). Returns the Axes (see `draw_boxes`).

    Example:

    ```python
    >>> import numpy as np
    >>> from hf_useg.models.detreg.box_sources import CutMixComposer
    >>> composite = CutMixComposer()(np.zeros((64, 64, 3), np.uint8), [np.full((32, 32, 3), 255, np.uint8)],
    ...                              np.random.default_rng(0))
    >>> len(draw_composite(composite).patches) == len(composite.boxes)
    True
    ```
    """
    labels = [f"{index}: {visible:.0%}" for index, visible in enumerate(composite.visible_fraction)]
    if title is None:
        title = (
            f"CutMix composite: {composite.num_pasted} pasted, {len(composite.boxes)} boxes kept "
            "(label: box, visible share)"
        )
    return draw_boxes(composite.image, composite.boxes, ax=ax, labels=labels, title=title)


def read_metrics(path) -> list[dict]:
    """The lines of a run's ``metrics.jsonl`` (one dict per logged step)."""
    import json
    from pathlib import Path

    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# logged statistics that are not loss terms (STEGO's code correlations): drawn in their own panel
_DIAGNOSTIC_PREFIXES = ("train/code_corr_", "train/feat_above_shift_")


def plot_training_curves(metrics, path=None, *, title: str | None = None):
    """Loss and validation curves of a training run against its steps, as a matplotlib `Figure`.

    ``metrics``: a ``metrics.jsonl`` path or its parsed lines (`read_metrics`). One panel shows the ``train/*``
    loss and its terms (log scale when all are positive), one the logged training statistics that are not losses
    (STEGO's code correlations), when there are any, and one every ``val/*`` value (cluster / linear mIoU and
    accuracy for segmenters, AP for detectors) when the run validated. Written to ``path`` (PNG) when given.

    Example:

    ```python
    >>> lines = [{"step": 10, "train/loss": 2.0}, {"step": 20, "train/loss": 1.5, "val/cluster_mean_iou": 0.3}]
    >>> figure = plot_training_curves(lines)
    >>> [axes.get_ylabel() for axes in figure.axes]
    ['training loss (and terms)', 'validation (fraction)']
    ```
    """
    from matplotlib.figure import Figure

    lines = read_metrics(metrics) if not isinstance(metrics, list) else metrics
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in lines:
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)) and key.startswith(("train/", "val/")):
                steps, values = series.setdefault(key, ([], []))
                steps.append(line["step"])
                values.append(float(value))
    if not series:
        raise ValueError("no train/ or val/ values to plot: the run logged nothing yet")
    statistics = sorted(key for key in series if key.startswith(_DIAGNOSTIC_PREFIXES))
    training = sorted(
        (key for key in series if key.startswith("train/") and key not in statistics),
        key=lambda key: key != "train/loss",
    )
    validation = sorted(key for key in series if key.startswith("val/"))
    panels_wanted = [
        (training, "training loss (and terms)", {}),
        (statistics, "training statistics", {}),
        (validation, "validation (fraction)", {"marker": "o"}),
    ]
    panels_wanted = [panel for panel in panels_wanted if panel[0]]
    figure = Figure(figsize=(5.5 * len(panels_wanted), 4.0), layout="constrained")
    axes_row = figure.subplots(1, len(panels_wanted), squeeze=False)[0]
    for axes, (keys, label, style) in zip(axes_row, panels_wanted):
        for key in keys:
            steps, values = series[key]
            width = 2.0 if key == "train/loss" else 1.0
            axes.plot(steps, values, label=key.split("/", 1)[1], linewidth=width, **style)
        if keys is training and all(value > 0 for key in keys for value in series[key][1]):
            axes.set_yscale("log")
        axes.set(xlabel="step", ylabel=label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure
