"""The ``hf-useg`` console script.

hf-useg evaluate MODEL --dataset PATH_OR_ID --split val [--num-classes N] [--crf] [--output-dir DIR]
hf-useg demo [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_model(name_or_path: str):
    from transformers import AutoConfig, AutoModel

    import hf_useg  # noqa: F401  (registers the Auto classes)

    try:
        AutoConfig.from_pretrained(name_or_path)
    except Exception as error:
        raise SystemExit(f"hf-useg: cannot load a model config from {name_or_path!r}: {error}") from error
    model = AutoModel.from_pretrained(name_or_path)
    if not hasattr(model, "predict"):
        raise SystemExit(
            f"hf-useg: {name_or_path!r} is a {type(model).__name__}, not an hf_useg segmentation model "
            "(expected e.g. StegoForUnsupervisedSegmentation)"
        )
    return model


def _load_processor(name_or_path: str, resolution: int | None):
    """The protocol processor (center crop) at ``resolution``, else at the saved processor's resolution."""
    from .image_processing import (
        UnsupervisedSegmentationImageProcessor,
        as_protocol_processor,
        protocol_image_processor,
    )

    if resolution is not None:
        return protocol_image_processor(resolution)
    try:
        return as_protocol_processor(UnsupervisedSegmentationImageProcessor.from_pretrained(name_or_path))
    except OSError:
        return protocol_image_processor(320)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_segmentation_dataset
    from .inference import evaluate_segmenter, format_per_class_table, summarize, write_evaluation_report

    model = _load_model(args.model)
    if args.device:
        model.to(args.device)
    processor = _load_processor(args.model, args.resolution)
    dataset = load_segmentation_dataset(args.dataset, args.split, num_classes=args.num_classes, require_labels=True)
    from .data import segmentation_metadata

    metadata = segmentation_metadata(dataset)
    num_classes = args.num_classes or metadata.get("num_classes")
    class_names = metadata.get("class_names")
    if num_classes is None:
        num_classes = len(class_names) if class_names else getattr(model.config, "num_classes", None)
        if num_classes is None:
            raise SystemExit("hf-useg: --num-classes is required (neither the dataset nor the model names it)")
    if not class_names or len(class_names) < num_classes:
        class_names = [f"class_{i}" for i in range(num_classes)]
    results = evaluate_segmenter(
        model,
        dataset,
        processor,
        num_classes,
        batch_size=args.batch_size,
        flip_tta=not args.no_flip_tta,
        crf=args.crf,
        crf_workers=args.crf_workers,
        matching=args.matching,
        max_images=args.max_images,
        progress=not args.quiet,
    )
    output_dir = Path(args.output_dir or Path("outputs") / "eval" / Path(args.model).name)
    csv_path = write_evaluation_report(results, output_dir, class_names[:num_classes])
    if not args.quiet:
        print(format_per_class_table(results, class_names[:num_classes]), file=sys.stderr)
        print(f"per-class results: {csv_path}", file=sys.stderr)
    line = {"model": args.model, "dataset": args.dataset, "split": args.split, **summarize(results)}
    print(json.dumps(line))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-useg", description="Unsupervised semantic segmentation on the HF stack")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    evaluate = commands.add_parser("evaluate", help="score a model on a labelled dataset (shared protocol)")
    evaluate.add_argument("model", help="model folder or Hub id")
    evaluate.add_argument("--dataset", required=True, help="Hub id, datasets folder, Parquet, or images/labels folder")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--num-classes", type=int, default=None)
    evaluate.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="shorter side + center crop (default: the model's processor)",
    )
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--matching", choices=["hungarian", "majority", "none"], default="hungarian")
    evaluate.add_argument("--crf", action="store_true", help="also score the dense-CRF refined predictions")
    evaluate.add_argument("--crf-workers", type=int, default=0)
    evaluate.add_argument("--no-flip-tta", action="store_true", help="disable horizontal-flip test-time augmentation")
    evaluate.add_argument("--max-images", type=int, default=None)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--output-dir", default=None, help="where eval_results.json and per_class_iou.csv go")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    demo = commands.add_parser("demo", help="train STEGO briefly, evaluate it and write a model folder (offline)")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--steps", type=int, default=None)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
