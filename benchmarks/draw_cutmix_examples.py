"""Draw the pseudo-box sources of CutMix-DETReg on real photos: the figure of the README.

    python benchmarks/draw_cutmix_examples.py [--data ../shared/data/raccoon] [--seed 0] [--base raccoon-12.jpg]
        [--output docs/images/cutmix_composite.png]

Four panels: the unlabelled base image, its CutMix composite (pastes cut from other raccoon photos; the boxes are
the kept pastes), the random-box control (the same box law on the unmodified image, same seed, hence the same
boxes) and DETReg's Selective Search boxes (top 30; skipped without OpenCV). Prints what it wrote; skips with a
message when the data folder is missing (a fresh clone has no ../shared).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_RACCOON = REPO_ROOT.parent / "shared" / "data" / "raccoon"
# Small panels keep the PNG light in the repository.
PANEL_LONG_SIDE = 420


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = PANEL_LONG_SIDE / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        return np.asarray(image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_RACCOON, help="raccoon folder (images/ + CSV files)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "images" / "cutmix_composite.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="raccoon-12.jpg", help="file name of the base image in the train split")
    parser.add_argument("--donors", type=int, default=8, help="number of other train images to cut pastes from")
    args = parser.parse_args()

    if not (args.data / "images").is_dir():
        print(f"skipped: no raccoon data at {args.data} (only developer machines have ../shared); pass --data")
        return 0

    from matplotlib.figure import Figure
    from PIL import Image

    from hf_useg.data import load_detection_dataset
    from hf_useg.models.detreg.box_sources import CutMixComposer, random_boxes, selective_search_boxes
    from hf_useg.visualization import draw_boxes, draw_composite

    train = load_detection_dataset(args.data, split="train")
    names = train["file_name"]
    if args.base not in names:
        print(f"error: {args.base} is not in the train split of {args.data}", file=sys.stderr)
        return 1
    images_root = args.data / "images"
    base = _load_rgb(images_root / args.base)
    donor_names = [name for name in names if name != args.base][: args.donors]
    donors = [_load_rgb(images_root / name) for name in donor_names]

    composer = CutMixComposer()
    composite = composer(base, donors, np.random.default_rng(args.seed))
    control = random_boxes(*base.shape[:2], np.random.default_rng(args.seed))

    figure = Figure(figsize=(13.0, 10.0 * base.shape[0] / base.shape[1] + 0.8), layout="constrained")
    axes = figure.subplots(2, 2)
    draw_boxes(base, np.zeros((0, 4)), ax=axes[0, 0], title=f"base image ({args.base}, unlabelled)")
    draw_composite(composite, ax=axes[0, 1])
    draw_boxes(
        base,
        control,
        ax=axes[1, 0],
        labels=[str(index) for index in range(len(control))],
        title=f"random-box control: the same law and seed, {len(control)} boxes, no pasted content",
    )
    try:
        proposals = selective_search_boxes(base, top_k=30)
        draw_boxes(base, proposals, ax=axes[1, 1], linewidth=1.2, title="Selective Search (DETReg): top 30 boxes")
    except ImportError as error:
        axes[1, 1].set_axis_off()
        axes[1, 1].text(0.5, 0.5, f"Selective Search skipped:\n{error}", ha="center", va="center", wrap=True)
    figure.suptitle(
        f"CutMix-DETReg pseudo-boxes (seed {args.seed}; donors: {len(donors)} other raccoon train photos)",
        fontsize=12,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    # A dithered 256-colour palette makes the PNG much lighter, with little visible change at this size.
    rendered = Image.open(buffer).convert("RGB")
    palette = rendered.quantize(256, method=Image.Quantize.MEDIANCUT)
    rendered.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(args.output, optimize=True)
    print(
        f"wrote {args.output} ({args.output.stat().st_size // 1024} KiB): base {args.base}, "
        f"{composite.num_pasted} pastes, {len(composite.boxes)} kept boxes (visible "
        f"{', '.join(f'{value:.0%}' for value in composite.visible_fraction)}), {len(control)} random boxes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
