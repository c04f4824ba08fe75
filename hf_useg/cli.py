"""The ``hf-useg`` console script.

hf-useg evaluate MODEL --dataset PATH_OR_ID --split val [--num-classes N] [--crf] [--output-dir DIR]
hf-useg demo [--output-dir DIR]
hf-useg push MODEL_DIR REPO_ID [--private] [--token TOKEN] [--keep-card]   (or: push spaces/ REPO_ID --space)
hf-useg convert stego CHECKPOINT OUTPUT_DIR [--backbone-name HUB_ID]

This module imports only the standard library at import time; each command imports what it needs.
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


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an officially released checkpoint into a model folder (`hf_useg.convert`)."""
    from .convert import convert_stego_checkpoint

    converters = {"stego": convert_stego_checkpoint}
    try:
        model = converters[args.method](args.checkpoint, args.output_dir, backbone_name=args.backbone_name)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"hf-useg convert: {error}") from error
    config = model.config
    print(
        f"converted {args.method} checkpoint {args.checkpoint} -> {args.output_dir} "
        f"({type(model).__name__}, {config.num_clusters} clusters, {config.num_classes} classes)"
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a model folder (or, with --space, the Gradio Space folder) to the Hub (`hf_useg.hub`)."""
    from .hub import push_model_folder, push_space_folder

    private = True if args.private else None  # None: a new repository is public, an existing one keeps its setting
    try:
        if args.space:
            info = push_space_folder(
                args.folder,
                args.repo_id,
                private=private,
                token=args.token,
                include_package=not args.no_package,
                model_dirs=args.with_model or (),
                commit_message=args.commit_message,
            )
        else:
            if args.with_model or args.no_package:
                raise SystemExit("hf-useg push: --with-model and --no-package only apply with --space")
            info = push_model_folder(
                args.folder,
                args.repo_id,
                private=private,
                token=args.token,
                card="keep" if args.keep_card else "regenerate",
                revision=args.revision,
                commit_message=args.commit_message,
            )
    except (ValueError, OSError) as error:  # bad folders; HTTP, auth and offline errors of huggingface_hub
        raise SystemExit(f"hf-useg push: {error}") from error
    print(f"pushed {args.folder} -> {info.repo_url} ({info.commit_url})")
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

    demo = commands.add_parser(
        "demo",
        help="train STEGO briefly, evaluate it and write a model folder (offline by default; BACKBONE/DATA env)",
    )
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--steps", type=int, default=None)
    demo.set_defaults(func=cmd_demo)

    push = commands.add_parser("push", help="upload a model folder (or the Space folder, --space) to the Hub")
    push.add_argument("folder", help="model folder (config.json, weights, image processor) or, with --space, spaces/")
    push.add_argument("repo_id", help="the Hub repository, e.g. me/stego-camvid")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in user's, or HF_TOKEN)")
    push.add_argument("--space", action="store_true", help="push the folder as a Gradio Space")
    push.add_argument(
        "--keep-card", action="store_true", help="upload the folder's README.md instead of regenerating it"
    )
    push.add_argument("--revision", default=None, help="branch to push to (model repositories)")
    push.add_argument("--commit-message", default=None)
    push.add_argument(
        "--with-model", action="append", metavar="MODEL_DIR", help="(--space) bundle a model folder into the Space"
    )
    push.add_argument("--no-package", action="store_true", help="(--space) do not bundle the hf_useg source")
    push.set_defaults(func=cmd_push)

    convert = commands.add_parser("convert", help="convert a released checkpoint into a model folder")
    convert.add_argument("method", choices=["stego"], help="the method whose checkpoint it is")
    convert.add_argument("checkpoint", help="the released checkpoint file (e.g. cocostuff27_vit_base_5.ckpt)")
    convert.add_argument("output_dir", help="model folder to write (from_pretrained / pipeline loads it)")
    convert.add_argument("--backbone-name", default=None, help="Hub id of the backbone (default: inferred)")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Everything heavy (torch, transformers, the models) is imported after parsing: `--help` and argument
    # errors are answered at once.
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import hf_useg

    hf_useg._register_auto_classes()  # the console script defers it to here (see `hf_useg/__init__.py`)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
