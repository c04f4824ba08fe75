"""Accelerate training loop shared by every method (`training/train.py` is its command line).

What it does, for a demanding user: loads data through `hf_useg.data`, builds the model (pretrained or random
backbone), trains with deterministic per-step randomness, validates every ``val_every`` steps (cluster and
linear mIoU through the shared metric, logged to Accelerate trackers and ``metrics.jsonl``), keeps the best
model, writes resumable checkpoints atomically every ``save_every`` steps (``resume_from_checkpoint="latest"``
continues bit-for-bit), and ends with a ``save_pretrained`` folder holding the image processor, ``id2label`` from
the Hungarian matching, the evaluation results and a generated model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from .data.processing import ProcessedSegmentationDataset
from .image_processing import UnsupervisedSegmentationImageProcessor, protocol_image_processor, whole_image_processor
from .inference import evaluate_segmenter, format_per_class_table, summarize, write_evaluation_report

logger = logging.getLogger(__name__)

__all__ = ["TrainingArguments", "TrainingContext", "latest_checkpoint", "load_training_arguments", "train"]

# `backbone:` values meaning "no HF backbone": the method trains its own trunk from scratch (IIC's VGG net)
SCRATCH_BACKBONES = ("none", "scratch")

RANDOM_BACKBONES = {
    # name -> config kwargs (ViTConfig unless "model_type" says otherwise); randomly initialised, for offline
    # demos, tests and baselines (named as such in outputs)
    "random-resnet-18": dict(
        model_type="resnet",
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        out_features=["stage3"],
    ),
    "random-vit-tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        patch_size=8,
        image_size=64,
        layer_norm_eps=1e-6,
    ),
    "random-vit-micro": dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        layer_norm_eps=1e-6,
    ),
    # the shape of training/configs/dino_pretrain_camvid.yaml's backbone (random-init baseline of that experiment)
    "random-vit-dino-tiny-16": dict(
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        patch_size=16,
        image_size=96,
        layer_norm_eps=1e-6,
    ),
    "random-vit-small-8": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=8,
        image_size=224,
        layer_norm_eps=1e-6,
    ),
    # DINO ViT-S/16, e.g. the student of training/configs/dino_pretrain_vits16.yaml (pretraining from scratch)
    "random-vit-small-16": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        image_size=224,
        layer_norm_eps=1e-6,
    ),
}


@dataclass
class TrainingArguments:
    """Everything `train` needs; YAML configs in ``training/configs`` hold these keys.

    ``model`` holds overrides of the method's config (e.g. ``{"dim": 70}``); ``preset`` picks published
    hyper-parameters (``StegoConfig.for_dataset``). ``None`` for a schedule value means "the method config's".
    """

    method: str = "stego"
    dataset: str = "synthetic"
    train_split: str = "train"
    val_split: str | None = "val"
    num_classes: int | None = None
    class_names: list[str] | None = None
    image_column: str | None = None
    label_column: str | None = None
    backbone: str = "random-vit-tiny"
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "outputs/run"
    max_steps: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 8
    resolution: int | None = None
    eval_resolution: int | None = None
    five_crop: bool | None = None
    val_every: int | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    max_val_images: int | None = None
    max_train_images: int | None = None
    resume_from_checkpoint: str | None = None
    seed: int = 0
    num_workers: int = 0
    knn_cache_dir: str | None = None
    knn_k: int = 30
    cache_backbone_features: bool = False
    calibrate_shifts: bool = False
    report_to: list[str] = field(default_factory=list)
    log_every: int = 10
    final_crf: bool = False
    final_flip_tta: bool = True
    kmeans_vectors_per_image: int | None = 256
    synthetic_num_images: int = 48
    synthetic_image_size: int = 64
    synthetic_num_classes: int = 4
    progress: bool = True

    def __post_init__(self):
        if self.method not in RECIPES:
            raise ValueError(f"method must be one of {sorted(RECIPES)}, got {self.method!r}")
        for name in ("max_steps", "batch_size", "resolution", "eval_resolution", "val_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.save_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("save_every and keep_checkpoints must be >= 1")


def load_training_arguments(path: str | os.PathLike | None = None, **overrides) -> TrainingArguments:
    """Read a YAML config (keys = `TrainingArguments` fields) and apply ``overrides`` (None values skipped;
    ``model`` overrides are merged key by key)."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a training config must be a mapping of options, got {type(loaded).__name__}")
        values.update(loaded)
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; valid options are {sorted(known)}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "model":
            values["model"] = {**values.get("model", {}), **value}
        else:
            values[key] = value
    return TrainingArguments(**values)


# ---------------------------------------------------------------------------------------------------------------
# data


def _load_splits(args: TrainingArguments):
    from .data import load_segmentation_dataset, make_synthetic_scenes

    if args.dataset == "synthetic":
        num_classes = args.synthetic_num_classes
        train = make_synthetic_scenes(
            args.synthetic_num_images, args.synthetic_image_size, num_classes, seed=args.seed
        )
        val = make_synthetic_scenes(
            max(8, args.synthetic_num_images // 4), args.synthetic_image_size, num_classes, seed=args.seed + 1
        )
        class_names = args.class_names or [f"synthetic-class-{i}" for i in range(num_classes)]
        return train, val, num_classes, class_names
    kwargs = dict(num_classes=args.num_classes, image_column=args.image_column, label_column=args.label_column)
    train = load_segmentation_dataset(args.dataset, args.train_split, **kwargs)
    val = load_segmentation_dataset(args.dataset, args.val_split, **kwargs) if args.val_split else None
    num_classes = args.num_classes or _num_classes_from_dataset(train)
    class_names = args.class_names or _class_names_from_dataset(train)
    if num_classes is None:
        if class_names is None:
            if _label_free(args.method):  # e.g. DINO pretraining on a plain folder of images
                return train, val, 0, []
            raise ValueError("num_classes is required for this dataset (it does not name its classes)")
        num_classes = len(class_names)
    if class_names is None or len(class_names) < num_classes:
        class_names = [f"class_{i}" for i in range(num_classes)]
    return train, val, num_classes, list(class_names)[:num_classes]


def _num_classes_from_dataset(dataset) -> int | None:
    from .data import segmentation_metadata

    return segmentation_metadata(dataset).get("num_classes")


def _class_names_from_dataset(dataset) -> list[str] | None:
    from .data import segmentation_metadata

    names = segmentation_metadata(dataset).get("class_names")
    return list(names) if names else None


class StepSampler(Sampler[list[int]]):
    """Deterministic batches: epoch ``e`` is ``randperm(N)`` from a generator seeded with ``seed + e``, cut into
    global batches of ``batch_size * world_size`` (last partial batch dropped); process ``rank`` takes its slice.
    ``start(epoch, batch)`` resumes mid-epoch without loading the skipped items."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < batch_size * world_size:
            raise ValueError(
                f"the training set has {num_items} items, fewer than one batch of {batch_size} x {world_size} "
                "process(es): lower batch_size or add images"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.first_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def start(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, first_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_size = self.batch_size * self.world_size
        for batch in range(self.first_batch, self.batches_per_epoch):
            chunk = order[batch * global_size : (batch + 1) * global_size]
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------------------------
# models


def _backbone_config_and_weights(args: TrainingArguments):
    """(backbone config, state dict or None, human-readable description)."""
    from transformers import AutoConfig, ViTConfig

    from .backbones import FeatureBackbone

    if args.backbone in SCRATCH_BACKBONES:
        return None, None, "none (trunk trained from scratch)"
    if args.backbone in RANDOM_BACKBONES:
        kwargs = dict(RANDOM_BACKBONES[args.backbone])
        model_type = kwargs.pop("model_type", "vit")
        config = ViTConfig(**kwargs) if model_type == "vit" else AutoConfig.for_model(model_type, **kwargs)
        kind = {"vit": "ViT", "resnet": "ResNet"}.get(model_type, model_type)
        return config, None, f"{args.backbone} (randomly initialised {kind})"
    try:
        pretrained = FeatureBackbone.from_pretrained(args.backbone)
    except Exception as error:  # offline Hub ids, missing folders: say what failed
        raise ValueError(f"could not load the backbone {args.backbone!r}: {error}") from error
    return pretrained.model.config, pretrained.model.state_dict(), args.backbone


def build_model(args: TrainingArguments, num_classes: int):
    """The method's model on the requested backbone (pretrained weights loaded when the backbone has them)."""
    backbone_config, backbone_weights, description = _backbone_config_and_weights(args)
    torch.manual_seed(args.seed)
    model = recipe(args.method).build_model(args, backbone_config, num_classes)
    if backbone_config is None and getattr(model.config, "backbone_config", None) is not None:
        raise ValueError(
            f"backbone {args.backbone!r} means no HF backbone, but method {args.method!r} needs one; it is only for "
            "methods with a trunk trained from scratch (iic)"
        )
    model.config.backbone_name = description
    if backbone_weights is not None:
        model.backbone.model.load_state_dict(backbone_weights)
    return model, description


def _schedule(args: TrainingArguments, config) -> dict[str, Any]:
    def pick(name: str, default):
        value = getattr(args, name)
        return value if value is not None else getattr(config, name, default)

    return {
        "max_steps": pick("max_steps", 7000),
        "batch_size": pick("batch_size", 32),
        "resolution": pick("resolution", 224),
        "eval_resolution": pick("eval_resolution", 320),
        "five_crop": pick("five_crop", False),
        "val_every": pick("val_every", 100),
    }


def _processor(resolution: int, patch_size: int) -> UnsupervisedSegmentationImageProcessor:
    if resolution % patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the backbone patch size {patch_size}")
    return protocol_image_processor(resolution)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-*`` folder under ``output_dir/checkpoints`` (None if there is none)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").exists() and p.is_dir()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _save_checkpoint(accelerator, output_dir: Path, state: dict[str, Any], keep: int) -> Path:
    root = output_dir / "checkpoints"
    final = root / f"checkpoint-{state['step']:08d}"
    tmp = root / f".tmp-checkpoint-{state['step']:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a checkpoint folder is either complete or absent
        for old in sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save_model_folder(model, processor, path: Path, extra_files: dict[str, str] | None = None) -> None:
    """``save_pretrained`` of the model and its (whole-image) processor plus extra files, atomically."""
    tmp = path.parent / f".tmp-{path.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# the loop


# ---------------------------------------------------------------------------------------------------------------
# method recipes

# method name -> module with `build_model(args, backbone_config, num_classes)` and `train(context) -> model`
RECIPES = {
    "stego": "hf_useg.models.stego.training_stego",
    "dino_kmeans": "hf_useg.models.dino.training_dino",
    "iic": "hf_useg.models.iic.training_iic",
    "picie": "hf_useg.models.picie.training_picie",
    "dino_pretrain": "hf_useg.models.dino.training_dino_pretraining",
}


def _label_free(method: str) -> bool:
    """Recipes with a ``finalize(context, model) -> summary`` train on images only and save their own result (the
    trainer then skips num_classes, the segmentation evaluation and the model folder)."""
    return hasattr(recipe(method), "finalize")


def recipe(method: str):
    import importlib

    if method not in RECIPES:
        raise ValueError(f"method must be one of {sorted(RECIPES)}, got {method!r}")
    return importlib.import_module(RECIPES[method])


@dataclass
class TrainingContext:
    """What a method's ``train(context)`` gets: data, processors, the accelerator, and the shared behaviours
    (logging, validation with best-model keeping, atomic checkpoints, resuming, per-step seeding)."""

    args: TrainingArguments
    model: Any
    train_set: Any
    val_set: Any
    train_processor: UnsupervisedSegmentationImageProcessor
    eval_processor: UnsupervisedSegmentationImageProcessor
    saved_processor: UnsupervisedSegmentationImageProcessor
    num_classes: int
    class_names: list[str]
    schedule: dict[str, Any]
    accelerator: Any
    state: dict[str, Any] = field(
        default_factory=lambda: {"step": 0, "best_cluster_mean_iou": -1.0, "best_step": None}
    )

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def show_progress(self) -> bool:
        return bool(self.args.progress and self.accelerator.is_main_process)

    def train_items(self, processor=None, dataset=None) -> ProcessedSegmentationDataset:
        return ProcessedSegmentationDataset(
            self.train_set if dataset is None else dataset,
            processor or self.train_processor,
            self.num_classes,
        )

    def seed_step(self, step: int) -> torch.Generator:
        """Seed torch's global RNG for ``step`` (dropout, coordinates, permutations) and return a generator for
        the data choices of that step: a resumed run draws exactly what the uninterrupted one drew."""
        seed = _step_seed(self.args.seed, step, self.accelerator.process_index)
        torch.manual_seed(seed)
        return torch.Generator().manual_seed(seed)

    def sampler(self, num_items: int, batch_size: int) -> StepSampler:
        return StepSampler(
            num_items,
            batch_size,
            self.args.seed,
            self.accelerator.process_index,
            self.accelerator.num_processes,
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    def log_step(self, output, step: int, names: tuple[str, ...] = (), progress=None) -> None:
        """Every ``log_every`` steps (and the last): log ``output.loss`` and the named loss parts of a model output
        as ``train/<name>``, refusing a non-finite loss."""
        if step % self.args.log_every and step != self.schedule["max_steps"]:
            return
        values = {"train/loss": float(output.loss.detach())}
        for name in names:
            value = getattr(output, name, None)
            if value is not None:
                values[f"train/{name}"] = float(value.detach())
        self.check_finite(values["train/loss"], step)
        self.log(values, step)
        if progress is not None:
            progress.set_postfix(loss=f"{values['train/loss']:.4f}")

    def check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at step {step}; the last checkpoint is intact")

    def resume(self) -> bool:
        """Load the requested checkpoint (``"latest"`` or a path) into the prepared objects; True if resumed."""
        request = self.args.resume_from_checkpoint
        if not request:
            return False
        path = latest_checkpoint(self.output_dir) if request == "latest" else Path(request)
        if path is None:
            logger.warning("resume_from_checkpoint=latest but %s has no checkpoint: starting fresh", self.output_dir)
            return False
        if not (path / "trainer_state.json").exists():
            raise ValueError(f"{path} is not a complete hf_useg checkpoint (no trainer_state.json)")
        self.accelerator.load_state(str(path))
        self.state.update(json.loads((path / "trainer_state.json").read_text()))
        self.accelerator.print(f"resumed from {path} at step {self.state['step']}")
        return True

    def after_step(self, model, step: int) -> None:
        """Validate (every ``val_every``; keeps ``best/``) and checkpoint (every ``save_every`` and at the end)."""
        has_val = self.val_set is not None and "label" in self.val_set.column_names
        if has_val and step % self.schedule["val_every"] == 0:
            results = evaluate_segmenter(
                model,
                self.val_set,
                self.eval_processor,
                self.num_classes,
                batch_size=self.args.eval_batch_size,
                flip_tta=False,
                crf=False,
                max_images=self.args.max_val_images,
                accelerator=self.accelerator,
                progress=False,
            )
            model.train()
            values = {f"val/{k}": v for k, v in summarize(results).items()}
            self.log(values, step)
            if values["val/cluster_mean_iou"] > self.state["best_cluster_mean_iou"]:
                self.state["best_cluster_mean_iou"] = values["val/cluster_mean_iou"]
                self.state["best_step"] = step
                if self.accelerator.is_main_process:
                    _save_model_folder(
                        model,
                        self.eval_processor,
                        self.output_dir / "best",
                        {"best_metrics.json": json.dumps({"step": step, **values}, indent=2)},
                    )
                self.accelerator.wait_for_everyone()
        if step % self.args.save_every == 0 or step == self.schedule["max_steps"]:
            _save_checkpoint(self.accelerator, self.output_dir, dict(self.state), self.args.keep_checkpoints)


def train(args: TrainingArguments) -> dict[str, Any]:
    """Train (or fit) ``args.method`` and return a summary dict (also written to ``output_dir``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    output_dir = Path(args.output_dir)
    train_set, val_set, num_classes, class_names = _load_splits(args)
    if args.max_train_images is not None:
        train_set = train_set.select(range(min(args.max_train_images, len(train_set))))
    has_train_labels = "label" in train_set.column_names
    accelerator = Accelerator(
        log_with=args.report_to or None,
        project_dir=str(output_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not has_train_labels)],
    )
    model, backbone_description = build_model(args, num_classes)
    schedule = _schedule(args, model.config)
    patch = model.backbone.patch_size
    context = TrainingContext(
        args=args,
        model=model,
        train_set=train_set,
        val_set=val_set,
        train_processor=_processor(schedule["resolution"], patch),
        eval_processor=_processor(schedule["eval_resolution"], patch),
        saved_processor=whole_image_processor(schedule["eval_resolution"], patch),
        num_classes=num_classes,
        class_names=class_names,
        schedule=schedule,
        accelerator=accelerator,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    if args.report_to:
        accelerator.init_trackers("hf_useg", config={k: str(v) for k, v in dataclasses.asdict(args).items()})
    model.to(accelerator.device)
    start_time = time.time()
    trained = recipe(args.method).train(context)
    trained.eval()
    if _label_free(args.method):
        # no segmentation probes to evaluate: the recipe saves its own result (DINO pretraining: the backbone)
        summary = {
            "method": args.method,
            "backbone": backbone_description,
            "dataset": "generated synthetic scenes (not real data)" if args.dataset == "synthetic" else args.dataset,
            "steps": context.state["step"],
            "train_seconds": round(time.time() - start_time, 1),
            **recipe(args.method).finalize(context, trained),
        }
        accelerator.end_training()
        return summary

    # final evaluation with the full protocol, id2label from the matching, model folder
    summary: dict[str, Any] = {
        "method": args.method,
        "backbone": backbone_description,
        "dataset": "generated synthetic scenes (not real data)" if args.dataset == "synthetic" else args.dataset,
        "num_classes": num_classes,
        "steps": context.state["step"],
        "train_seconds": round(time.time() - start_time, 1),
    }
    results = None
    if val_set is not None and "label" in val_set.column_names:
        results = evaluate_segmenter(
            trained,
            val_set,
            context.eval_processor,
            num_classes,
            batch_size=args.eval_batch_size,
            flip_tta=args.final_flip_tta,
            crf=args.final_crf,
            max_images=args.max_val_images,
            accelerator=accelerator,
            progress=context.show_progress,
        )
        trained.set_cluster_names(results["cluster"]["assignment"], class_names)
        summary.update(summarize(results))
        summary["eval_protocol"] = {
            "resolution": schedule["eval_resolution"],
            "crop": "center",
            "flip_tta": args.final_flip_tta,
            "crf": args.final_crf,
            "matching": "hungarian",
            "precision": str(accelerator.mixed_precision),
            "split": args.val_split if args.dataset != "synthetic" else "generated val",
        }
        summary["per_class_table"] = format_per_class_table(results, class_names)
        final_evaluation = getattr(recipe(args.method), "final_evaluation", None)
        if final_evaluation is not None:  # method-specific extra numbers (e.g. IIC's head A, IID+)
            summary.update(final_evaluation(context, trained))
    if accelerator.is_main_process:
        from .hub import generate_model_card

        card = generate_model_card(trained, summary=summary, results=results, class_names=class_names)
        extra = {"training_summary.json": json.dumps(summary, indent=2), "README.md": str(card)}
        _save_model_folder(trained, context.saved_processor, output_dir / "model", extra)
        if results is not None:
            write_evaluation_report(results, output_dir / "model", class_names)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary["model_dir"] = str(output_dir / "model")
    return summary
