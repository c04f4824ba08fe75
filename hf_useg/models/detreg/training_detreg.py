"""CutMix-DETReg pretraining recipe (method ``cutmix_detreg``, METHODS 5): DETReg's detector pretraining on
unlabelled images, with the pseudo-boxes of one of three box sources.

    accelerate launch training/train.py --config training/configs/detreg_cutmix_raccoon.yaml

* ``box_source: cutmix`` (the thesis): each image gets K ~ U{1..8} rectangles pasted from other images of the
  training set (`CutMixComposer`); the visible pastes are exact boxes, their embedding targets the frozen encoder's
  embedding of the un-blended pasted content.
* ``box_source: random``: the same box law on the unmodified image (the control: does pasted content matter?).
* ``box_source: selective_search``: DETReg's original, OpenCV's fast Selective Search on a 128 px thumbnail, the
  top 30 boxes recomputed at every load (``pip install 'hf-useg[selective-search]'``).

Any image dataset works (a plain folder of images, a detection dataset whose boxes are ignored). At the end the
pretraining model is saved to ``output_dir/model`` and the detector, ready for fine-tuning (``--method
detection_finetune --pretrained_detector output_dir/detector``), to ``output_dir/detector``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ...augmentation import normalize_images
from ...detection_inference import pad_images
from ...file_utils import atomic_file
from ...training.checkpointing import save_model_folder
from ...training.recipe import (
    BatchIndex,
    Recipe,
    RecipeOptions,
    StepBatchSampler,
    TrainingData,
    TrainingStepOutput,
)
from .configuration_detreg import BOX_SOURCES, DETREG_DETECTOR_KWARGS, CutMixDetregConfig

__all__ = [
    "CutMixDetregRecipe",
    "CutMixDetregTrainingOptions",
    "DetrScheduleOptions",
    "DetrScheduleRecipe",
    "DetregPretrainingItems",
    "detector_config_kwargs",
    "learning_rate_factor",
]

PRETRAINING_INFO = "hf_useg_pretraining.json"  # beside the exported detector: how it was pretrained


def detector_config_kwargs(backbone_config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DETReg's detector settings (`DETREG_DETECTOR_KWARGS`) on ``backbone_config`` (its stages 2-4 as the feature
    levels) with ``overrides``: the one recipe for the detector of both pretraining and the no-pretraining arm of
    fine-tuning, so that the arms of an experiment share an architecture."""
    backbone = backbone_config.__class__.from_dict(backbone_config.to_dict())
    stages = [name for name in getattr(backbone, "stage_names", []) if name != "stem"]
    if len(stages) < 3:
        raise ValueError(
            f"the detector's backbone needs at least 3 stages (a ResNet-style AutoBackbone), got "
            f"{type(backbone_config).__name__}; use e.g. --backbone random-resnet-18 or a ResNet checkpoint"
        )
    backbone.out_features = stages[-3:]  # (the setter aligns out_indices)
    return {**DETREG_DETECTOR_KWARGS, **(overrides or {}), "backbone_config": backbone}


@dataclass
class DetrScheduleOptions(RecipeOptions):
    """What DETR-style training (pretraining and fine-tuning) shares: batch 4 per GPU, the shorter image side at
    800 (the longer capped at 1333), AdamW 2e-4 with weight decay 1e-4, 50 epochs with a 10x learning-rate drop
    after 40, horizontal flips. Clip the gradient norm at 0.1 with ``max_grad_norm: 0.1`` (a `TrainingArguments`
    field).

    Attributes:
        epochs, lr_drop_epochs: the length when ``max_steps`` is not given, and when the learning rate drops 10x
            (None: never).
        horizontal_flip: the probability of flipping an image (and its boxes).
    """

    batch_size: int = 4
    resolution: int = 800
    epochs: float = 50.0
    lr_drop_epochs: float | None = 40.0
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    horizontal_flip: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.horizontal_flip <= 1.0:
            raise ValueError(f"horizontal_flip must be a probability in [0, 1], got {self.horizontal_flip}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


@dataclass
class CutMixDetregTrainingOptions(DetrScheduleOptions):
    """Pretraining settings; defaults are DETReg's (`DetrScheduleOptions`' schedule: 50 epochs on ImageNet-100;
    frozen backbone).

    Attributes:
        box_source: ``cutmix``, ``random`` or ``selective_search`` (recorded in the model config).
        max_boxes: the most pastes / random boxes per image (K ~ U{1..max_boxes}); area_range, aspect_range: the
            log-uniform laws of a box's area fraction and aspect (METHODS 5).
        occlusion_threshold: a paste hidden by later pastes over more than this fraction of its area is dropped.
        feather: pixels of linear alpha ramp at paste borders (0: hard pastes, the thesis' default).
        donor_images: other training images a CutMix composite takes its pastes from (each paste picks one; fewer
            images to decode per item than one per paste).
        selective_search_boxes: boxes kept per image (DETReg: the top 30).
    """

    box_source: str = "cutmix"
    max_boxes: int = 8
    area_range: tuple[float, float] = (0.02, 0.5)
    aspect_range: tuple[float, float] = (1 / 3, 3.0)
    occlusion_threshold: float = 0.5
    feather: int = 0
    selective_search_boxes: int = 30
    donor_images: int = 3

    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet100": {}}

    def __post_init__(self):
        super().__post_init__()
        if self.box_source not in BOX_SOURCES:
            raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {self.box_source!r}")
        if min(self.max_boxes, self.selective_search_boxes, self.donor_images) < 1:
            raise ValueError("max_boxes, selective_search_boxes and donor_images must be >= 1")
        self.area_range = _check_range("area_range", self.area_range, upper=1.0)
        self.aspect_range = _check_range("aspect_range", self.aspect_range)
        if not 0.0 < self.occlusion_threshold <= 1.0:
            raise ValueError(f"occlusion_threshold must be in (0, 1], got {self.occlusion_threshold}")


def _check_range(name: str, value, upper: float | None = None) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(f"{name} must be [min, max], got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not 0.0 < low <= high or (upper is not None and high > upper):
        raise ValueError(f"{name} must be [min, max] with 0 < min <= max{f' <= {upper}' if upper else ''}: {value!r}")
    return low, high


def resize_shorter_side(image: Image.Image, resolution: int) -> np.ndarray:
    """``image`` as uint8 RGB with its shorter side at ``resolution`` and its longer side at most
    ``resolution * 1333 / 800`` (DETR's sizing)."""
    image = image.convert("RGB")
    width, height = image.size
    scale = min(resolution / min(width, height), resolution * 1333 / 800 / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(image.resize(size, Image.BILINEAR))


class DetregPretrainingItems(torch.utils.data.Dataset):
    """The pretraining items of the loop's [`BatchIndex`] keys: an image with its pseudo-boxes and the crops of
    their content, drawn from the key's step generator (the same in any DataLoader worker)."""

    def __init__(self, images, options: CutMixDetregTrainingOptions, crop_size: int):
        from .box_sources import CutMixComposer

        self.images, self.options, self.crop_size = images, options, crop_size
        self.composer = CutMixComposer(
            max_pastes=options.max_boxes,
            area_range=options.area_range,
            aspect_range=options.aspect_range,
            occlusion_threshold=options.occlusion_threshold,
            feather=options.feather,
        )

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, index: int) -> np.ndarray:
        return resize_shorter_side(self.images[index]["image"], self.options.resolution)

    def _generator(self, key: BatchIndex) -> np.random.Generator:
        # one generator per item: its draws do not depend on what the batch's other items drew
        return np.random.default_rng([key.seed, key.position])

    def __getitem__(self, key: BatchIndex) -> dict[str, Any]:
        from .box_sources import random_boxes, selective_search_boxes

        options, generator = self.options, self._generator(key)
        image = self._image(key.index)
        height, width = image.shape[:2]
        if options.box_source == "cutmix":
            draws = generator.integers(0, len(self.images) - 1, options.donor_images).tolist()
            donors = [self._image(i if i < key.index else i + 1) for i in draws]  # never the base image
            composite = self.composer(image, donors, generator)
            image, boxes, contents = composite.image, composite.boxes, composite.pastes
        else:
            if options.box_source == "random":
                boxes = random_boxes(
                    height,
                    width,
                    generator,
                    max_boxes=options.max_boxes,
                    area_range=options.area_range,
                    aspect_range=options.aspect_range,
                    occlusion_threshold=options.occlusion_threshold,
                )
            else:
                seed = int(generator.integers(0, 2**32))
                boxes = selective_search_boxes(image, top_k=options.selective_search_boxes, seed=seed)
            contents = [_crop(image, box) for box in boxes]
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if generator.random() < options.horizontal_flip:
            image = image[:, ::-1].copy()
            contents = [content[:, ::-1].copy() for content in contents]
            boxes = boxes.copy()
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        return {
            "pixel_values": _normalise(image),
            "boxes": torch.from_numpy(_normalized_cxcywh(boxes, height, width)),
            "crops": torch.stack([_normalise(_resized(content, self.crop_size)) for content in contents])
            if contents
            else torch.zeros(0, 3, self.crop_size, self.crop_size),
        }


def _crop(image: np.ndarray, box) -> np.ndarray:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return image[max(0, y1) : max(y1 + 1, y2), max(0, x1) : max(x1 + 1, x2)]


def _resized(content: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(content)).resize((size, size), Image.BILINEAR))


def _normalise(image: np.ndarray) -> torch.Tensor:
    return normalize_images(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0)  # (a writable copy)


def _normalized_cxcywh(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    from .box_sources import boxes_to_normalized_cxcywh

    return np.asarray(boxes_to_normalized_cxcywh(boxes, height, width), dtype=np.float32).reshape(-1, 4)


def collate_pretraining_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad the images of a batch to a common size (with DETR's pixel mask); boxes and crops stay per image."""
    pixel_values, pixel_mask = pad_images([item["pixel_values"] for item in items])
    return {
        "pixel_values": pixel_values,
        "pixel_mask": pixel_mask,
        "labels": [
            {"class_labels": torch.zeros(len(item["boxes"]), dtype=torch.long), "boxes": item["boxes"]}
            for item in items
        ],
        "box_crops": [item["crops"] for item in items],
    }


def learning_rate_factor(recipe: Recipe, step: int) -> float:
    """0.1 from the optimizer step ``recipe.options.lr_drop_epochs`` epochs in on, else 1 (DETR's step drop).

    An epoch is the loop's: the training items cut into batches of ``batch_size`` per process, accumulated
    ``gradient_accumulation_steps`` times; `Recipe.default_max_steps` is told it only when ``max_steps`` is not
    given, so it is derived here otherwise."""
    drop = recipe.options.lr_drop_epochs
    if drop is None:
        return 1.0
    steps_per_epoch = getattr(recipe, "steps_per_epoch", None)
    if steps_per_epoch is None:
        batches = recipe.num_train_items // (recipe.options.batch_size * recipe.run.accelerator.num_processes)
        steps_per_epoch = max(1, batches // recipe.args.gradient_accumulation_steps)
    return 0.1 if step >= round(drop * steps_per_epoch) else 1.0


class DetrScheduleRecipe(Recipe):
    """What DETR-style recipes share: the length in epochs, the step learning-rate drop applied to every parameter
    group's ``base_lr``, and no segmentation processors."""

    options_class = DetrScheduleOptions

    def processors(self, model) -> tuple[Any, Any]:
        return None, None

    def default_max_steps(self, steps_per_epoch: int) -> int:
        self.steps_per_epoch = steps_per_epoch
        return max(1, round(self.options.epochs * steps_per_epoch))

    def before_optimizer_step(self, model, optimizer, step: int) -> None:
        factor = learning_rate_factor(self, step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


class CutMixDetregRecipe(DetrScheduleRecipe):
    """DETReg pretraining with CutMix / random / Selective Search pseudo-boxes (see the module docstring)."""

    options_class = CutMixDetregTrainingOptions
    label_free = True
    progress_name = "detreg pretraining"

    def load_data(self) -> TrainingData:
        from ...data import load_detection_dataset

        args = self.args
        train = load_detection_dataset(args.dataset, args.train_split)
        if self.options.box_source == "cutmix" and len(train) < 2:
            raise ValueError("cutmix pseudo-boxes paste other images: the training set needs at least 2 images")
        return TrainingData(train, None, 0, [])

    def build_model(self, backbone_config, num_classes: int):
        from .modeling_detreg import CutMixDetregForPretraining

        if backbone_config is None:
            raise ValueError("cutmix_detreg needs an HF backbone for its detector (--backbone), not 'none'")
        model_overrides = dict(self.args.model)
        detector = detector_config_kwargs(backbone_config, model_overrides.pop("detector_config", None))
        config = CutMixDetregConfig(detector_config=detector, box_source=self.options.box_source, **model_overrides)
        return CutMixDetregForPretraining(config)

    def create_model(self, num_classes: int) -> tuple[Any, str]:
        from ...training.data import load_backbone

        backbone_config, backbone_weights, description = load_backbone(self.args.backbone)
        torch.manual_seed(self.args.seed)
        model = self.build_model(backbone_config, num_classes)
        if backbone_weights is not None:
            model.detector.model.backbone.model.load_state_dict(backbone_weights)
        if model.config.object_encoder_config is None:
            model.init_object_encoder_from_detector_backbone()
        return model, description

    def make_optimizer(self, model) -> torch.optim.Optimizer:
        options = self.options
        parameters = [p for p in model.parameters() if p.requires_grad]
        group = {"params": parameters, "lr": options.learning_rate, "base_lr": options.learning_rate}
        return torch.optim.AdamW([group], lr=options.learning_rate, weight_decay=options.weight_decay)

    def train_dataloader(self, batches: StepBatchSampler) -> DataLoader:
        items = DetregPretrainingItems(self.run.train_set, self.options, self.unwrapped_crop_size)
        return DataLoader(
            items, batch_sampler=batches, num_workers=self.args.num_workers, collate_fn=collate_pretraining_items
        )

    def setup(self, model, run) -> None:
        super().setup(model, run)
        self.unwrapped_crop_size = model.config.object_crop_size
        if self.options.box_source == "cutmix" and len(run.train_set) < 2:  # (also after max_train_images)
            raise ValueError("cutmix pseudo-boxes paste other images: the training set needs at least 2 images")

    def training_step(self, model, batch) -> TrainingStepOutput:
        outputs = model(**batch)
        logs = {  # the last decoder layer's terms (``loss_ce_0``, ... are the auxiliary layers')
            name: value.detach()
            for name, value in outputs.loss_dict.items()
            if name.startswith("loss_") and not name.rsplit("_", 1)[-1].isdigit()
        }
        return TrainingStepOutput(loss=outputs.loss, logs=logs)

    def finalize(self, model) -> dict[str, Any]:
        run = self.run
        info = {
            "method": "cutmix_detreg",
            "box_source": self.options.box_source,
            "dataset": self.args.dataset,
            "train_images": len(run.train_set),
            "backbone": self.args.backbone,
        }
        if run.accelerator.is_main_process:
            save_model_folder(model, None, run.output_dir / "model")
            model.save_detector_for_finetuning(run.output_dir / "detector")
            with atomic_file(run.output_dir / "detector" / PRETRAINING_INFO) as tmp:
                tmp.write_text(json.dumps(info, indent=2))
        run.accelerator.wait_for_everyone()
        return {**info, "model_dir": str(run.output_dir / "model"), "detector_dir": str(run.output_dir / "detector")}
