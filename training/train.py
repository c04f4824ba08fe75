#!/usr/bin/env python
"""Train any hf_useg method with Accelerate.

    accelerate launch training/train.py --config training/configs/stego_cocostuff27.yaml
    accelerate launch training/train.py --method stego --dataset ../shared/data/camvid11 --num_classes 11 \
        --backbone facebook/dino-vits8 --output_dir outputs/stego-camvid
    accelerate launch training/train.py --config ... --resume_from_checkpoint latest

Options given on the command line override the YAML file. Besides the shared options, every method has its
recipe options (``--method stego --help`` lists STEGO's: ``--head_learning_rate``, ``--cache_backbone_features``,
...); ``--set dim=70`` overrides a field of the method's config (or a recipe option). Runs on one GPU, many GPUs
(``--multi_gpu``), or the CPU, with ``--mixed_precision bf16`` when wanted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml
from accelerate import PartialState
from transformers import HfArgumentParser

from hf_useg.registry import get_method, method_names
from hf_useg.training import TrainingArguments, load_training_arguments, train


def build_parser(method: str | None) -> HfArgumentParser:
    """The shared `TrainingArguments` and, when the method is known, its recipe options, plus ``--config`` and
    ``--set``. Every default is suppressed: only what the command line gives overrides the YAML file."""
    dataclasses = [TrainingArguments]
    if method is not None:
        dataclasses.append(get_method(method).load_recipe_class().options_class)
    parser = HfArgumentParser(dataclasses, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    parser.add_argument("--config", help="YAML file of training options (see training/configs)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the method config (or a recipe option); VALUE is read as YAML",
    )
    return parser


def _method(argv: list[str]) -> str | None:
    """The method named by ``--method`` or by the ``--config`` file (None when neither names one)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.method:
        return known.method
    if known.config:
        loaded = yaml.safe_load(open(known.config).read()) or {}
        return loaded.get("method", "stego") if isinstance(loaded, dict) else None
    return "stego"


def main(argv: list[str] | None = None) -> int:
    """Train; a mistake in the options, the data or the output folder is one line on stderr and exit status 2
    (``--debug`` shows the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return _train(argv)
    except (ValueError, OSError) as error:
        if debug:
            raise
        message = " ".join(str(error).split())
        print(f"train.py: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _train(argv: list[str]) -> int:
    method = _method(argv)
    if method not in method_names():
        method = None  # TrainingArguments names the valid methods
    parser = build_parser(method)
    options = vars(parser.parse_args(argv))
    config_path = options.pop("config", None)
    model = options.pop("model", {})
    model = json.loads(model) if isinstance(model, str) else dict(model)
    for item in options.pop("set"):
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        model[key] = yaml.safe_load(value)  # recipe options among them are routed to the recipe
    args = load_training_arguments(config_path, model=model or None, **options)
    summary = train(args)
    state = PartialState()
    if state.is_main_process:  # one summary, not one per process (their lines would interleave)
        table = summary.pop("per_class_table", None)
        if table:
            print(table)
        print(json.dumps(summary), flush=True)
    if state.num_processes > 1:
        # everything is written: skip the destructors of the distributed objects, which can deadlock in gloo
        # (see hf_useg.training.loop._end)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
