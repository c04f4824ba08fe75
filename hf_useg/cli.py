"""The ``hf-useg`` console script.

hf-useg evaluate MODEL --dataset PATH_OR_ID --split val [--num-classes N] [--crf] [--output-dir DIR]
    [--device cuda] [--batch-size N] [--num-workers N] [--dtype auto|float32|bfloat16|float16]
    (an object detector, e.g. a fine-tuned Deformable DETR, is scored on a detection dataset with COCO and VOC07 AP)
hf-useg demo [--output-dir DIR]
hf-useg push MODEL_DIR REPO_ID [--private] [--token TOKEN] [--keep-card]   (or: push spaces/ REPO_ID --space)
hf-useg convert stego CHECKPOINT OUTPUT_DIR [--backbone-name HUB_ID]

This module imports only the standard library at import time; each command imports what it needs.

Problems with the arguments, the data or the model are reported as one line, ``hf-useg: <what is wrong>
(<where>)``, with exit code 2; ``--debug`` shows the traceback instead. ``accelerate launch ... -m hf_useg.cli
evaluate ...`` splits the evaluation images over the processes; only the main process writes and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A problem with the user's arguments, data or model: `main` reports it as one line and exits with code 2."""


# Errors `main` reports as one line (``--debug`` shows the traceback): argument and data problems surface as
# these from the loaders (ValueError, TypeError for unreadable columns; OSError covers missing files, PIL's
# unreadable images and ConnectionError).
_REPORTED_ERRORS = (CliError, ValueError, TypeError, OSError)

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _check_model_argument(name_or_path: str) -> None:
    """Fail at once (before any import) on a local model path that does not exist or is not a model folder."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CliError(f"the model {name_or_path!r} is a file, not a model folder (config.json + weights)")
        if not (path / "config.json").is_file():
            raise CliError(f"{name_or_path!r} is not a model folder: it has no config.json")
        return
    looks_like_a_path = (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.endswith(("/", os.sep))
        or not _HUB_ID_RE.match(name_or_path)
        or ".." in name_or_path
    )
    if looks_like_a_path:
        raise CliError(f"the model folder {name_or_path!r} does not exist")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            raise CliError(
                f"{name_or_path!r} is not an existing model folder, and the Hugging Face Hub is offline "
                "(HF_HUB_OFFLINE=1) with no cached copy of it as a Hub id"
            )


def _load_model_config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        if Path(name_or_path).expanduser().exists():
            raise CliError(f"cannot load a model config from {name_or_path!r}: {error}") from error
        raise CliError(
            f"{name_or_path!r} is neither an existing model folder nor a model the Hugging Face Hub has "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    except ValueError as error:  # e.g. a config.json of an unknown model_type
        raise CliError(f"cannot load a model config from {name_or_path!r}: {error}") from error


def _load_model(name_or_path: str, config, quiet: bool = False):
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    import hf_useg  # noqa: F401  (registers the Auto classes)

    bars = transformers_logging.is_progress_bar_enabled()
    if quiet and bars:
        transformers_logging.disable_progress_bar()  # "Loading weights" on stderr
    try:
        model = AutoModel.from_pretrained(name_or_path, config=config)
    finally:
        if quiet and bars:
            transformers_logging.enable_progress_bar()
    if not hasattr(model, "predict"):
        raise CliError(
            f"{name_or_path!r} is a {type(model).__name__}, not an hf_useg segmentation model "
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


def _check_evaluate_arguments(args: argparse.Namespace) -> None:
    """The numeric options and the model path, checked before anything heavy is imported."""
    for option, minimum in (
        ("num_classes", 1),
        ("resolution", 1),
        ("batch_size", 1),
        ("max_images", 1),
        ("crf_workers", 0),
        ("num_workers", 0),
        ("report_examples", 1),
    ):
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise CliError(f"--{option.replace('_', '-')} must be at least {minimum}, got {value}")
    if _launched_processes() > 1 and args.device:
        raise CliError("--device does not apply under accelerate launch (each process uses its own device)")
    for model in getattr(args, "models", None) or [args.model]:
        _check_model_argument(model)


def _inference_settings(args: argparse.Namespace, accelerator=None) -> tuple[Any, Any, int]:
    """``(device, autocast dtype or None, DataLoader workers)`` of a segmentation evaluation: ``--device`` (default:
    the accelerator's device, else the GPU when there is one, else the CPU), ``--dtype`` resolved for that device,
    ``--num-workers`` (default: none on the CPU, up to 8 per process on a GPU)."""
    import torch

    from .backbones import resolve_autocast_dtype

    if accelerator is not None:
        device = accelerator.device
    elif args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            raise CliError(f"--device {args.device!r} is not a device (e.g. cpu, cuda, cuda:1): {error}") from error
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: this PyTorch has no CUDA GPU to run on (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    try:
        autocast_dtype = resolve_autocast_dtype(args.dtype, device)
    except ValueError as error:
        raise CliError(f"--dtype {args.dtype} on {device}: {error}") from error
    num_workers = args.num_workers
    if num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = 1 if accelerator is None else accelerator.num_processes
        num_workers = min(8, max(1, cpus // processes - 1)) if device.type == "cuda" else 0
    return device, autocast_dtype, num_workers


def _dtype_name(autocast_dtype: Any) -> str:
    return "float32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch.")


def _launched_processes() -> int:
    """The number of processes `accelerate launch` (or torchrun) started this one among; 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _object_detector_type(name_or_path: str) -> str | None:
    """The ``model_type`` of ``name_or_path`` when it is an object detector (a type `AutoModelForObjectDetection`
    loads, e.g. ``deformable_detr``), else None. Only its config.json is read (a Hub id's from the Hub or its
    cache); a config that cannot be read here is left to the segmentation path, which reports it."""
    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            config_file = path / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(name_or_path, "config.json"))
        model_type = json.loads(config_file.read_text()).get("model_type")
    except Exception:  # anything unreadable here is reported by the segmentation path's loaders
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

    return model_type if model_type in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES else None


# options of segmentation evaluation, with the value that means "not given"
_SEGMENTATION_ONLY_OPTIONS = {
    "num_classes": None,
    "dtype": "auto",
    "matching": "hungarian",
    "crf": False,
    "crf_workers": 0,
    "crf_backend": "pydensecrf",
    "image_column": None,
    "label_column": None,
}


def _load_detection_processor(name_or_path: str, model_type: str, resolution: int | None, quiet: bool):
    """The detector's saved image processor (its shorter side set to ``resolution`` when given); a Deformable DETR
    saved without one gets DETR's (shorter side 800, or ``resolution``)."""
    from transformers import AutoImageProcessor

    from .detection_inference import detection_image_processor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        if model_type != "deformable_detr":
            raise CliError(f"{name_or_path!r} has no image processor saved with it ({error})") from error
        if not quiet:
            print(f"note: {name_or_path} has no image processor; using Deformable DETR's", file=sys.stderr)
        return detection_image_processor(resolution or 800)
    if resolution is not None:
        if "shortest_edge" not in (getattr(processor, "size", None) or {}):
            raise CliError(f"--resolution (the shorter side) does not apply to {type(processor).__name__}")
        detection_image_processor(resolution)  # (checks it)
        processor.size = {"shortest_edge": resolution, "longest_edge": round(resolution * 1333 / 800)}
    return processor


def _check_detection_classes(config, dataset) -> list[str]:
    """The dataset's class names, which must be the model's labels (same ids) when both name them."""
    from .data import detection_class_names

    try:
        names = detection_class_names(dataset)
    except ValueError:  # integer categories without names: nothing to compare
        return []
    labels = {int(key): str(value) for key, value in (config.id2label or {}).items()}
    named = any(value != f"LABEL_{key}" for key, value in labels.items())
    if named and [labels.get(index) for index in range(len(names))] != names:
        model_names = [labels[key] for key in sorted(labels)]
        raise CliError(
            f"the dataset's classes {names} are not the model's {model_names} (the same names in the same order): "
            "its category ids would not mean the model's labels"
        )
    return names


def _evaluate_detector(args: argparse.Namespace, model_type: str) -> int:
    """`cmd_evaluate` for an object detector: COCO and VOC07 AP on a detection dataset (`evaluate_detector`)."""
    from .data import load_detection_dataset

    given = [
        f"--{name.replace('_', '-')}"
        for name, unset in _SEGMENTATION_ONLY_OPTIONS.items()
        if getattr(args, name) != unset
    ]
    if given:
        raise CliError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for segmentation models only: {args.model!r} is "
            f"an object detector ({model_type}), scored with COCO and VOC07 AP"
        )
    # the data first, so that its problems are reported before the model loads
    dataset = load_detection_dataset(args.dataset, args.split, require_objects=True)

    accelerator = None
    if _launched_processes() > 1:
        from accelerate import Accelerator

        accelerator = Accelerator()
    main_process = accelerator is None or accelerator.is_main_process

    from transformers import AutoModelForObjectDetection
    from transformers.utils import logging as transformers_logging

    from .detection_inference import EVALUATORS, evaluate_detector

    config = _load_model_config(args.model)
    class_names = _check_detection_classes(config, dataset)
    bars = transformers_logging.is_progress_bar_enabled()
    if args.quiet and bars:
        transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForObjectDetection.from_pretrained(args.model, config=config)
    finally:
        if args.quiet and bars:
            transformers_logging.enable_progress_bar()
    if args.device:
        model.to(args.device)
    processor = _load_detection_processor(args.model, model_type, args.resolution, args.quiet)
    results = evaluate_detector(
        model,
        dataset,
        processor,
        batch_size=args.batch_size,
        max_images=args.max_images,
        num_workers=args.num_workers or 0,
        accelerator=accelerator,
        progress=not args.quiet and main_process,
    )
    if not main_process:
        return 0
    num_images = results["images"]
    size = getattr(processor, "size", None) or {}
    evaluation = {
        "model": args.model,
        "model_type": model_type,
        "task": "object-detection",
        "dataset": args.dataset,
        "split": args.split,
        "num_images": num_images,
        "split_size": len(dataset),
        "complete": num_images == len(dataset),
        "class_names": class_names,
        "protocol": {
            "resolution": f"shorter side {size['shortest_edge']}" if "shortest_edge" in size else dict(size),
            "detections_per_image": 100,
            "evaluators": dict(EVALUATORS),
        },
        "processes": 1 if accelerator is None else accelerator.num_processes,
    }
    output_dir = Path(args.output_dir or Path("outputs") / "eval" / Path(args.model).name)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"coco": results["coco"], "voc07": results["voc07"], "images": num_images, "evaluation": evaluation}
    (output_dir / "eval_results.json").write_text(json.dumps(record, indent=2))
    if not args.quiet:
        lines = [f"{'evaluator':<10}{'AP':>8}{'AP50':>8}{'AP75':>8}   (percent)"]
        for name, description in EVALUATORS.items():
            values = "".join(f"{100 * results[name][key]:>8.2f}" for key in ("ap", "ap50", "ap75"))
            lines.append(f"{name:<10}{values}   {description}")
        print("\n".join(lines), file=sys.stderr)
        if not evaluation["complete"]:
            print(f"note: {num_images} of the {len(dataset)} images of the split (--max-images)", file=sys.stderr)
        print(f"results: {output_dir / 'eval_results.json'}", file=sys.stderr)
    line = {"model": args.model, "dataset": args.dataset, "split": args.split, "num_images": num_images}
    line.update({f"{name}_{key}": results[name][key] for name in EVALUATORS for key in ("ap", "ap50", "ap75")})
    print(json.dumps(line))
    return 0


def _segmentation_data(args: argparse.Namespace, model_path: str | None = None) -> tuple[Any, int, list[str]]:
    """``(dataset, num_classes, class_names)`` of ``--dataset``/``--split`` for scoring segmentation models;
    ``--num-classes``, the dataset's metadata or the config of ``model_path`` name the classes."""
    from .data import load_segmentation_dataset, segmentation_metadata

    dataset = load_segmentation_dataset(
        args.dataset,
        args.split,
        num_classes=args.num_classes,
        image_column=args.image_column,
        label_column=args.label_column,
        require_labels=True,
    )
    metadata = segmentation_metadata(dataset)
    num_classes = args.num_classes or metadata.get("num_classes")
    class_names = metadata.get("class_names")
    if num_classes is None:
        config = _load_model_config(model_path) if model_path and not class_names else None
        num_classes = len(class_names) if class_names else getattr(config, "num_classes", None)
        if not num_classes:
            raise CliError(f"--num-classes is required: neither the dataset {args.dataset!r} nor the model names it")
    if not class_names or len(class_names) < num_classes:
        class_names = [f"class_{i}" for i in range(num_classes)]
    return dataset, num_classes, list(class_names)[:num_classes]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a model on a labelled dataset; under ``accelerate launch`` the images are split over the processes
    and only the main process writes and prints. An object detector is scored on a detection dataset instead
    (`_evaluate_detector`)."""
    detector_type = _object_detector_type(args.model)
    if detector_type is not None:
        if args.report:
            raise CliError("--report is for segmentation models; a detector's results are in eval_results.json")
        return _evaluate_detector(args, detector_type)
    # `main` checked the arguments; the data next, so that its problems are reported before the model loads.
    dataset, num_classes, class_names = _segmentation_data(args, args.model)
    config = _load_model_config(args.model)

    accelerator = None
    if _launched_processes() > 1:
        from accelerate import Accelerator

        accelerator = Accelerator()
    main_process = accelerator is None or accelerator.is_main_process
    device, autocast_dtype, num_workers = _inference_settings(args, accelerator)

    from .inference import evaluate_segmenter, format_per_class_table, summarize, write_evaluation_report

    model = _load_model(args.model, config, quiet=args.quiet)
    model.to(device)
    processor = _load_processor(args.model, args.resolution)
    results = evaluate_segmenter(
        model,
        dataset,
        processor,
        num_classes,
        batch_size=args.batch_size,
        flip_tta=not args.no_flip_tta,
        crf=args.crf,
        crf_workers=args.crf_workers,
        crf_backend=args.crf_backend,
        matching=args.matching,
        max_images=args.max_images,
        num_workers=num_workers,
        device=device,
        dtype=autocast_dtype or "float32",
        progress=not args.quiet and main_process,
        accelerator=accelerator,
    )
    if not main_process:
        return 0
    num_images = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    evaluation = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "num_images": num_images,
        "split_size": len(dataset),
        "complete": num_images == len(dataset),
        "num_classes": num_classes,
        "protocol": {
            "resolution": int(processor.crop_size["height"]),
            "crop": "center",
            "flip_tta": not args.no_flip_tta,
            "crf": args.crf,
            **({"crf_backend": args.crf_backend} if args.crf else {}),
            "matching": args.matching,
        },
        "processes": 1 if accelerator is None else accelerator.num_processes,
        "inference": {"device": device.type, "dtype": _dtype_name(autocast_dtype)},
    }
    output_dir = Path(args.output_dir or Path("outputs") / "eval" / Path(args.model).name)
    csv_path = write_evaluation_report(results, output_dir, class_names, evaluation=evaluation)
    if not args.quiet:
        print(format_per_class_table(results, class_names), file=sys.stderr)
        if not evaluation["complete"]:
            print(f"note: {num_images} of the {len(dataset)} images of the split (--max-images)", file=sys.stderr)
        print(f"per-class results: {csv_path}", file=sys.stderr)
    line = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "num_images": num_images,
        **summarize(results),
    }
    if args.report:
        from .report import ModelReport, describe_model, model_display_name, predict_examples, write_comparison_report

        examples = predict_examples(
            model,
            dataset,
            processor,
            num_classes,
            num_examples=args.report_examples,
            flip_tta=not args.no_flip_tta,
            batch_size=args.batch_size,
            device=device,
            dtype=autocast_dtype or "float32",
        )
        report = ModelReport(
            name=model_display_name(args.model),
            **describe_model(model, args.model),
            results=results,
            protocol=_protocol(processor, args, num_images),
            examples=examples,
        )
        path = write_comparison_report(
            [report], args.report, class_names=class_names, protocol={"dataset": args.dataset, "split": args.split}
        )
        if not args.quiet:
            print(f"report: {path}", file=sys.stderr)
    print(json.dumps(line))
    return 0


def _protocol(processor, args: argparse.Namespace, num_images: int) -> dict[str, Any]:
    from .report import evaluation_protocol

    return evaluation_protocol(
        processor, flip_tta=not args.no_flip_tta, crf=args.crf, matching=args.matching, num_images=num_images
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Evaluate several segmentation models on one split with the shared protocol and write a report folder
    (report.md, report.html, figures, results.json)."""
    from .report import evaluate_for_report, model_display_name, write_comparison_report

    for model_path in args.models:
        if _object_detector_type(model_path) is not None:
            raise CliError(f"{model_path} is an object detector: compare takes segmentation models")
    dataset, num_classes, class_names = _segmentation_data(args)
    device, autocast_dtype, num_workers = _inference_settings(args)
    names = [model_display_name(path) for path in args.models]
    if len(set(names)) != len(names):
        names = [str(path) for path in args.models]
    reports = []
    for model_path, name in zip(args.models, names):
        config = _load_model_config(model_path)
        model = _load_model(model_path, config, quiet=args.quiet)
        model.to(device)
        processor = _load_processor(model_path, args.resolution)
        if not args.quiet:
            print(f"evaluating {name}", file=sys.stderr)
        reports.append(
            evaluate_for_report(
                model,
                dataset,
                processor,
                num_classes,
                name=name,
                model_path=model_path,
                batch_size=args.batch_size,
                flip_tta=not args.no_flip_tta,
                crf=args.crf,
                crf_workers=args.crf_workers,
                crf_backend=args.crf_backend,
                matching=args.matching,
                max_images=args.max_images,
                num_examples=args.report_examples,
                num_workers=num_workers,
                device=device,
                dtype=autocast_dtype or "float32",
                progress=not args.quiet,
            )
        )
    path = write_comparison_report(
        reports, args.output_dir, class_names=class_names, protocol={"dataset": args.dataset, "split": args.split}
    )
    print(json.dumps({"report": str(path), "models": names}))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """STEGO's correlation diagnostics: the three feature-correlation distributions of a backbone on a dataset,
    the configured and calibrated shifts, and a warning when the configured shifts would collapse the code."""
    from .models.stego.diagnostics import format_diagnostics, save_diagnostics, stego_correlation_diagnostics

    if args.dataset == "synthetic":
        from .data import make_synthetic_scenes

        dataset = make_synthetic_scenes(64, 64, 4, seed=args.seed)
    else:
        dataset = args.dataset
    diagnostics = stego_correlation_diagnostics(
        args.backbone,
        dataset,
        config=args.config,
        split=args.split,
        resolution=args.resolution,
        num_images=args.num_images,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    paths = save_diagnostics(diagnostics, args.output_dir)
    print(format_diagnostics(diagnostics), file=sys.stderr)
    print(json.dumps({name: str(path) for name, path in paths.items()}))
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
        model = converters[args.method](
            args.checkpoint,
            args.output_dir,
            backbone_name=args.backbone_name,
            allow_non_finite=args.allow_non_finite,
        )
    except (ValueError, OSError) as error:  # not a checkpoint of this method, unsafe or damaged, missing
        raise CliError(f"{error} (convert {args.method} {args.checkpoint})") from error
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
                raise CliError("--with-model and --no-package only apply with --space (push)")
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
        raise CliError(f"{error} (push {args.folder} to {args.repo_id})") from error
    print(f"pushed {args.folder} -> {info.repo_url} ({info.commit_url})")
    return 0


def _add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and protocol options `evaluate` and `compare` share."""
    parser.add_argument("--dataset", required=True, help="Hub id, datasets folder, Parquet, or images/labels folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="shorter side + center crop; detectors: the shorter side (default: the model's processor)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader processes that prepare the next batches while the model runs (default: 0 on the CPU, up to "
        "8 on a GPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="autocast dtype of the frozen backbone; heads and metric stay float32 (default: auto = bfloat16 on a "
        "GPU, float32 on the CPU; float16 is for GPUs; detectors: float32 only)",
    )
    parser.add_argument("--matching", choices=["hungarian", "majority", "none"], default="hungarian")
    parser.add_argument("--crf", action="store_true", help="also score the dense-CRF refined predictions")
    parser.add_argument("--crf-workers", type=int, default=0, help="pydensecrf worker processes (0: this one)")
    parser.add_argument(
        "--crf-backend",
        choices=["pydensecrf", "torch"],
        default="pydensecrf",
        help="the reference library (default) or the batched PyTorch CRF on the model's device (hf_useg.crf)",
    )
    parser.add_argument("--no-flip-tta", action="store_true", help="disable horizontal-flip test-time augmentation")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the GPU when there is one)")
    parser.add_argument("--image-column", default=None, help="the dataset's image column (default: found by name)")
    parser.add_argument("--label-column", default=None, help="the dataset's label column (default: found by name)")
    parser.add_argument("--report-examples", type=int, default=4, help="images in the report's examples grid")
    parser.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-useg", description="Unsupervised semantic segmentation on the HF stack")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    # on every command too (`hf-useg evaluate ... --debug`); SUPPRESS keeps a top-level --debug
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    evaluate = commands.add_parser(
        "evaluate",
        parents=[common],
        help="score a model on a labelled dataset (shared protocol; detectors: COCO and VOC07 AP)",
        description=(
            "Score a segmentation model (cluster and linear probes, mIoU) on a segmentation dataset, or an object "
            "detector (AutoModelForObjectDetection, e.g. a fine-tuned Deformable DETR) on a detection dataset with "
            "COCO AP and DETReg's VOC07 AP. --num-classes, --matching, --crf, --crf-workers, --crf-backend, --dtype, "
            "--image-column and --label-column are for segmentation models only."
        ),
    )
    evaluate.add_argument("model", help="model folder or Hub id")
    _add_scoring_arguments(evaluate)
    evaluate.add_argument(
        "--output-dir", default=None, help="where eval_results.json (and, segmentation, per_class_iou.csv) go"
    )
    evaluate.add_argument(
        "--report", default=None, metavar="DIR", help="also write a report folder (report.md/html, figures)"
    )
    evaluate.set_defaults(func=cmd_evaluate)

    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="evaluate several segmentation models on one split and write a comparison report",
        description=(
            "Evaluate each model folder with the shared protocol (cluster probe with Hungarian matching, linear "
            "probe) on one split and write report.md, a self-contained report.html, per-class IoU bars, each "
            "model's confusion matrix after matching, a grid of example predictions and results.json."
        ),
    )
    compare.add_argument("models", nargs="+", help="model folders or Hub ids")
    _add_scoring_arguments(compare)
    compare.add_argument("--output-dir", default="outputs/compare", help="the report folder")
    compare.set_defaults(func=cmd_compare)

    diagnose = commands.add_parser(
        "diagnose",
        parents=[common],
        help="STEGO's correlation diagnostics: how to choose the shifts for a backbone and dataset",
        description=(
            "Draw the distributions of a backbone's intra-image, kNN-partner and negative feature correlations (as "
            "STEGO's loss samples them) with the configured shifts, print the shifts --calibrate_shifts would pick "
            "and warn when the configured shifts make the loss reward a collapsed code."
        ),
    )
    diagnose.add_argument("method", choices=["stego"], help="the method whose loss is diagnosed")
    diagnose.add_argument(
        "--backbone", required=True, help="Hub id or folder of a backbone, or a RANDOM_BACKBONES name"
    )
    diagnose.add_argument(
        "--dataset", required=True, help="Hub id, datasets folder, Parquet, images folder, or 'synthetic'"
    )
    diagnose.add_argument("--split", default="train")
    diagnose.add_argument(
        "--config", default=None, help="a StegoConfig preset (cocostuff27, ...) or a model folder; default COCO's"
    )
    diagnose.add_argument("--resolution", type=int, default=224)
    diagnose.add_argument("--num-images", type=int, default=32, help="images measured (five crops each)")
    diagnose.add_argument("--seed", type=int, default=0)
    diagnose.add_argument("--device", default=None)
    diagnose.add_argument("--output-dir", default="outputs/diagnose", help="where the figure, text and JSON go")
    diagnose.add_argument("--quiet", action="store_true")
    diagnose.set_defaults(func=cmd_diagnose)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="train STEGO briefly, evaluate it and write a model folder (offline by default; BACKBONE/DATA env)",
    )
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--steps", type=int, default=None)
    demo.set_defaults(func=cmd_demo)

    push = commands.add_parser(
        "push", parents=[common], help="upload a model folder (or the Space folder, --space) to the Hub"
    )
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

    convert = commands.add_parser(
        "convert", parents=[common], help="convert a released checkpoint into a model folder"
    )
    convert.add_argument("method", choices=["stego"], help="the method whose checkpoint it is")
    convert.add_argument("checkpoint", help="the released checkpoint file (e.g. cocostuff27_vit_base_5.ckpt)")
    convert.add_argument("output_dir", help="model folder to write (from_pretrained / pipeline loads it)")
    convert.add_argument("--backbone-name", default=None, help="Hub id of the backbone (default: inferred)")
    convert.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert even when weights hold NaN/inf (research use: e.g. inspecting a diverged run)",
    )
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
    try:
        if args.func in (cmd_evaluate, cmd_compare):
            _check_evaluate_arguments(args)  # before the imports below
        import hf_useg

        hf_useg._register_auto_classes()  # the console script defers it to here (see `hf_useg/__init__.py`)
        status = args.func(args)
    except _REPORTED_ERRORS as error:
        if args.debug:
            raise
        print(f"hf-useg: {_one_line(error)}", file=sys.stderr)
        return 2
    if _launched_processes() > 1:
        # everything is written: skip the interpreter's teardown of gloo's threads, which can abort a rank
        # ("terminate called without an active exception") or hang it (see hf_useg.training.loop._end)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _one_line(error: BaseException) -> str:
    """The error's message on one line (the type's name when it has none)."""
    message = " ".join(str(error).split())
    if isinstance(error, KeyError) or not message:
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return message


if __name__ == "__main__":
    sys.exit(main())
