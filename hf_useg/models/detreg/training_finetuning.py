"""Fine-tuning a Deformable DETR on labelled boxes (method ``detection_finetune``): the downstream half of
CutMix-DETReg (METHODS 5), and the "no pretraining" control when no pretrained detector is given.

    accelerate launch training/train.py --config training/configs/detection_finetune_raccoon.yaml \\
        --pretrained_detector outputs/detreg-cutmix-raccoon/detector

The data are a detection dataset in the `datasets` object-detection layout (``image``, ``objects: {bbox
[x, y, w, h] pixels, category}``; COCO json, VOC xml and CSV folders load into it, see
`hf_useg.data.load_detection_dataset`). The model is a plain `transformers` `DeformableDetrForObjectDetection`:
the pretrained detector's weights are loaded with its class head dropped (only ``class_embed.*`` start from
scratch), or, without one, the transformer starts from scratch on ``--backbone``. Validation and the final
evaluation report both evaluators the field uses (COCO AP and DETReg's VOC07 AP); the saved folder works in
``pipeline("object-detection")``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from ...training.recipe import (
    Evaluation,
    ItemsByBatchIndex,
    StepBatchSampler,
    TrainingData,
    TrainingStepOutput,
    step_generator,
)
from .modeling_detreg import init_deformable_detr_heads
from .training_detreg import PRETRAINING_INFO, DetrScheduleOptions, DetrScheduleRecipe, detector_config_kwargs

logger = logging.getLogger(__name__)

__all__ = ["DetectionFinetuningOptions", "DetectionFinetuningRecipe", "weighted_detection_loss"]

_SCORES = ("voc07_ap", "voc07_ap50", "coco_ap", "coco_ap50")


def weighted_detection_loss(loss_dict: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted total of a DETR ``loss_dict`` over every decoder layer (``loss_ce``, ``loss_ce_0``, ...).

    transformers' Deformable DETR loss weighs the classification term with a hard-coded 1; Deformable DETR and
    DETReg weigh it 2, so the total is recomputed from the per-term losses.

    ```python
    >>> import torch
    >>> terms = {"loss_ce": torch.tensor(1.0), "loss_ce_0": torch.tensor(1.0), "loss_bbox": torch.tensor(0.5),
    ...          "cardinality_error": torch.tensor(3.0)}
    >>> weighted_detection_loss(terms, {"loss_ce": 2.0, "loss_bbox": 5.0})
    tensor(6.5000)
    ```
    """
    total = None
    for name, value in loss_dict.items():
        term = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        if term in weights:
            weighted = weights[term] * value
            total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError(f"none of the loss terms {sorted(weights)} is in the loss dict {sorted(loss_dict)}")
    return total


@dataclass
class DetectionFinetuningOptions(DetrScheduleOptions):
    """Fine-tuning settings; defaults are Deformable DETR's / DETReg's fine-tuning (`DetrScheduleOptions`' schedule,
    the backbone at 2e-5).

    Attributes:
        pretrained_detector: the ``detector`` folder written by CutMix-DETReg pretraining (``--method
            cutmix_detreg``); None trains the detector's transformer from scratch on ``--backbone``.
        resolution / eval_resolution: the shorter image side in training / evaluation (DETR's 800).
        backbone_learning_rate: the backbone's learning rate (the rest takes ``learning_rate``).
        class_loss_weight, bbox_loss_weight, giou_loss_weight: the loss weights (Deformable DETR's 2 / 5 / 2).
        score: the validation number that picks ``best/`` (one of ``voc07_ap``, ``voc07_ap50``, ``coco_ap``,
            ``coco_ap50``).
    """

    eval_resolution: int = 800
    val_every: int | None = None
    pretrained_detector: str | None = None
    backbone_learning_rate: float = 2e-5
    class_loss_weight: float = 2.0
    bbox_loss_weight: float = 5.0
    giou_loss_weight: float = 2.0
    score: str = "voc07_ap"

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # DETReg's VOC07+12 fine-tuning (Bar et al., 2022)
        "voc": {},
    }

    def __post_init__(self):
        super().__post_init__()
        if self.score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {self.score!r}")


class _FinetuningBatches:
    """Collate of a fine-tuning batch: a random horizontal flip per image (drawn from the step's generator),
    then Deformable DETR's processor (resize, normalise, boxes to normalised cxcywh) image by image, padded with a
    pixel mask (`pad_images`).

    Each image goes through the processor alone: given a batch, transformers' processor pads it and renormalises
    the boxes to the padded canvas, whereas the model predicts (and evaluation and pretraining read) boxes relative
    to each image's unpadded region."""

    def __init__(self, processor, horizontal_flip: float):
        self.processor, self.horizontal_flip = processor, horizontal_flip

    def __call__(self, keyed_items: list) -> dict[str, Any]:
        from ...detection_inference import coco_annotations, pad_images

        generator = step_generator(keyed_items[0][0])
        flips = torch.rand(len(keyed_items), generator=generator) < self.horizontal_flip
        images, labels = [], []
        for (key, example), flip in zip(keyed_items, flips.tolist()):
            image = np.asarray(example["image"].convert("RGB"))
            annotation = coco_annotations(example, image_id=key.index)
            if flip:
                image = image[:, ::-1].copy()
                for box in annotation["annotations"]:
                    x, y, w, h = box["bbox"]
                    box["bbox"] = [image.shape[1] - x - w, y, w, h]
            encoded = self.processor(images=[image], annotations=[annotation], do_pad=False, return_tensors="pt")
            images.append(encoded["pixel_values"][0])
            target = encoded["labels"][0]
            labels.append({"class_labels": target["class_labels"], "boxes": target["boxes"]})
        pixel_values, pixel_mask = pad_images(images)
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}


class DetectionFinetuningRecipe(DetrScheduleRecipe):
    """Supervised fine-tuning of `DeformableDetrForObjectDetection` on a detection dataset (see the module)."""

    options_class = DetectionFinetuningOptions
    progress_name = "fine-tune detector"

    # -- data, model --------------------------------------------------------------------------------------------

    def load_data(self) -> TrainingData:
        from ...data import detection_class_names, load_detection_dataset

        args = self.args
        train = load_detection_dataset(args.dataset, args.train_split)
        val = load_detection_dataset(args.dataset, args.val_split) if args.val_split else None
        class_names = list(args.class_names or detection_class_names(train))
        num_classes = args.num_classes or len(class_names)
        if num_classes < 1:
            raise ValueError(f"{args.dataset} names no object classes: give num_classes or class_names")
        if len(class_names) < num_classes:
            class_names = [f"class_{i}" for i in range(num_classes)]
        self.class_names = class_names[:num_classes]
        return TrainingData(train, val, num_classes, self.class_names)

    def build_model(self, backbone_config, num_classes: int):
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

        kwargs = detector_config_kwargs(backbone_config, self.args.model)
        model = DeformableDetrForObjectDetection(DeformableDetrConfig(**{**kwargs, "num_labels": num_classes}))
        init_deformable_detr_heads(model)
        return model

    def create_model(self, num_classes: int) -> tuple[Any, str]:
        from transformers import DeformableDetrForObjectDetection

        from ...training.data import load_backbone

        class_names = self.class_names
        labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
        source = self.options.pretrained_detector
        if source is None:
            backbone_config, backbone_weights, description = load_backbone(self.args.backbone)
            if backbone_config is None:
                raise ValueError("detection_finetune needs an HF backbone (--backbone), not 'none'")
            torch.manual_seed(self.args.seed)
            model = self.build_model(backbone_config, num_classes)
            model.config.update(labels)
            if backbone_weights is not None:
                model.model.backbone.model.load_state_dict(backbone_weights)
            return model, f"{description}; detector transformer from scratch (no pretraining)"
        if self.args.model:
            raise ValueError(
                "model: overrides cannot change a pretrained detector's architecture; drop them or drop "
                "pretrained_detector"
            )
        path = Path(source)
        if not (path / "config.json").exists():
            raise ValueError(f"pretrained_detector {source!r} is not a model folder (no config.json)")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "deformable_detr":
            raise ValueError(
                f"pretrained_detector {source!r} holds a {model_type!r} model, not a Deformable DETR detector: give "
                "the `detector` folder that cutmix_detreg pretraining writes"
            )
        torch.manual_seed(self.args.seed)
        model, info = DeformableDetrForObjectDetection.from_pretrained(
            path, num_labels=num_classes, ignore_mismatched_sizes=True, output_loading_info=True, **labels
        )
        # the class head may be new (missing from a pretraining `detector` folder, or of another size in a
        # fine-tuned detector's); any other difference means the folder is not this architecture's weights
        missing = sorted(key for key in info["missing_keys"] if not key.startswith("class_embed."))
        unexpected = sorted(info["unexpected_keys"])
        mismatched = sorted(
            key
            for key in (item[0] if isinstance(item, tuple) else item for item in info["mismatched_keys"])
            if not key.startswith("class_embed.")
        )
        if missing or unexpected or mismatched:
            raise ValueError(
                f"pretrained_detector {source!r}: its weights do not match its config.json (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, mismatched {mismatched[:5]}); only the class head may be new"
            )
        init_deformable_detr_heads(model, box_heads=False)  # the new class head starts at probability 0.01
        pretraining = path / PRETRAINING_INFO
        described = json.loads(pretraining.read_text()) if pretraining.exists() else {}
        self.pretraining = described
        box_source = described.get("box_source", "unknown box source")
        return model, f"CutMix-DETReg pretrained detector ({box_source}) from {source}; class head new"

    def processors(self, model) -> tuple[Any, Any]:
        from ...detection_inference import detection_image_processor

        return (
            detection_image_processor(self.options.resolution),
            detection_image_processor(self.options.eval_resolution),
        )

    # -- training -----------------------------------------------------------------------------------------------

    def make_optimizer(self, model) -> torch.optim.Optimizer:
        options = self.options
        backbone = [p for n, p in model.named_parameters() if p.requires_grad and ".backbone." in f".{n}"]
        others = [p for n, p in model.named_parameters() if p.requires_grad and ".backbone." not in f".{n}"]
        groups = [{"params": others, "lr": options.learning_rate, "base_lr": options.learning_rate}]
        if backbone:
            rate = options.backbone_learning_rate
            groups.append({"params": backbone, "lr": rate, "base_lr": rate})
        return torch.optim.AdamW(groups, lr=options.learning_rate, weight_decay=options.weight_decay)

    def train_dataloader(self, batches: StepBatchSampler) -> DataLoader:
        return DataLoader(
            ItemsByBatchIndex(self.run.train_set, with_key=True),
            batch_sampler=batches,
            num_workers=self.args.num_workers,
            collate_fn=_FinetuningBatches(self.run.train_processor, self.options.horizontal_flip),
        )

    def training_step(self, model, batch) -> TrainingStepOutput:
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        options = self.options
        weights = {
            "loss_ce": options.class_loss_weight,
            "loss_bbox": options.bbox_loss_weight,
            "loss_giou": options.giou_loss_weight,
        }
        loss = weighted_detection_loss(outputs.loss_dict, weights)
        logs = {name: outputs.loss_dict[name].detach() for name in weights}
        return TrainingStepOutput(loss=loss, logs=logs)

    def finalize(self, model) -> dict[str, Any]:
        described = getattr(self, "pretraining", None)
        if self.options.pretrained_detector is None:
            return {"pretraining": None}
        box_source = (described or {}).get("box_source", "an unknown box source")
        return {
            "pretraining": f"CutMix-DETReg pretraining with {box_source} pseudo-boxes",
            "pretrained_detector": self.options.pretrained_detector,
        }

    # -- evaluation, saving -------------------------------------------------------------------------------------

    def has_validation(self, val_set) -> bool:
        return val_set is not None and "objects" in val_set.column_names

    def evaluate(self, model, final: bool) -> Evaluation:
        from ...detection_inference import EVALUATORS, evaluate_detector

        run, args = self.run, self.args
        results = evaluate_detector(
            model,
            run.val_set,
            run.eval_processor,
            batch_size=args.eval_batch_size,
            max_images=None if final else args.max_val_images,
            accelerator=run.accelerator,
            progress=final and run.show_progress,
        )
        values = {
            f"{evaluator}_{name}": float(results[evaluator][name])
            for evaluator in EVALUATORS
            for name in ("ap", "ap50", "ap75")
        }
        score = values[self.options.score]
        evaluation = Evaluation(values=values, score=-math.inf if math.isnan(score) else score, results=results)
        if final:
            evaluation.summary = {
                "eval_protocol": {
                    "split": args.val_split,
                    "images": results["images"],
                    "resolution": f"shorter side {self.options.eval_resolution}",
                    "evaluators": dict(EVALUATORS),
                    "detections_per_image": 100,
                },
            }
        return evaluation

    def model_card(self, model, summary: dict[str, Any], evaluation: Evaluation | None) -> str:
        from ...hub.cards import generate_detection_model_card

        return generate_detection_model_card(summary, class_names=self.run.class_names)

    def save_model(self, model, path: Path, extra_files: dict[str, str], evaluation: Evaluation | None = None):
        from ...training.checkpointing import save_model_folder

        if evaluation is not None:
            extra_files = {**extra_files, "eval_results.json": json.dumps(evaluation.results, indent=2)}
        save_model_folder(model, self.run.eval_processor, path, extra_files)
