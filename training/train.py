#!/usr/bin/env python
"""Train any hf_useg method with Accelerate.

    accelerate launch training/train.py --config training/configs/stego_cocostuff27.yaml
    accelerate launch training/train.py --method stego --dataset ../shared/data/camvid11 --num_classes 11 \
        --backbone facebook/dino-vits8 --output_dir outputs/stego-camvid
    accelerate launch training/train.py --config ... --resume_from_checkpoint latest

Options given on the command line override the YAML file; ``--set dim=70`` overrides a field of the method's
config. Runs on one GPU, many GPUs (``--multi_gpu``), or the CPU, with ``--mixed_precision bf16`` when wanted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

import yaml

from hf_useg.trainer import TrainingArguments, load_training_arguments, train


def _parse_value(text: str):
    return yaml.safe_load(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with TrainingArguments keys")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the method config",
    )
    hints = typing.get_type_hints(TrainingArguments)
    for field in dataclasses.fields(TrainingArguments):
        if field.name == "model":
            continue
        hint = str(hints[field.name])
        if "bool" in hint:
            parser.add_argument(f"--{field.name}", type=lambda s: bool(_parse_value(s)), default=None, metavar="BOOL")
        elif "list" in hint:
            parser.add_argument(f"--{field.name}", nargs="+", default=None)
        elif "int" in hint:
            parser.add_argument(f"--{field.name}", type=int, default=None)
        else:
            parser.add_argument(f"--{field.name}", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    config_path = options.pop("config")
    model_overrides = {}
    for item in options.pop("set"):
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        model_overrides[key] = _parse_value(value)
    args = load_training_arguments(config_path, model=model_overrides or None, **options)
    summary = train(args)
    table = summary.pop("per_class_table", None)
    if table:
        print(table)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
