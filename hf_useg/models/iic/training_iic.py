"""IIC's training recipe (METHODS 3.2) and its evaluation of both heads (METHODS 3.3).

* Views (built in the DataLoader's collate, from the step's generator): view 1 is the processed image; view 2 is a
  colour-jittered copy (brightness, contrast, saturation, hue in random order, like torchvision's `ColorJitter`,
  written in torch) flipped horizontally with probability `flip_p`; `affine2_to_1` negates the x row for flipped
  items; the mask is all ones (or the valid-label pixels with `mask_unlabelled`).
* Alternation: steps are cut into phases of `head_b_steps` steps training head B and `head_a_steps` steps
  training head A (head B first unless `head_a_first`); a phase of `None` steps is one pass over the training set,
  which is IIC's alternation of full epochs. The head of a step depends on the step number only, so resuming is
  exact.
* One Adam optimiser over every trainable parameter, constant learning rate (as IIC). Parameters of the head not
  trained in a step get no gradient and Adam leaves them (and their moments) untouched.
* The logged loss is −MI: **negative**, and lower is better.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...augmentation import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    hsv_to_rgb,
    rgb_to_hsv,
)
from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from ...evaluation import UnsupervisedSegmentationMetric, fit_and_score
from ...inference import evaluation_loader
from ...training.recipe import (
    BatchIndex,
    ItemsByBatchIndex,
    Recipe,
    RecipeOptions,
    StepBatchSampler,
    TrainingStepOutput,
    step_generator,
)
from .configuration_iic import IMAGENET_MEAN, IMAGENET_STD, IicConfig
from .modeling_iic import IicForUnsupervisedSegmentation

logger = logging.getLogger(__name__)

__all__ = [
    "IicRecipe",
    "IicTrainingOptions",
    "IicViews",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "evaluate_iic_heads",
    "head_for_step",
    "hsv_to_rgb",
    "make_iic_views",
    "rgb_to_hsv",
]


# ---------------------------------------------------------------------------------------------------------------
# view pairs


@dataclass
class IicViews:
    """A batch of IIC view pairs: `pixel_values` (view 1), `pixel_values_pair` (view 2), `affine2_to_1` `[B, 2, 3]`
    (view 2 -> view 1; x row negated for flipped items), `mask` `[B, H, W]` (float 0/1) and `flipped` `[B]` bool."""

    pixel_values: torch.Tensor
    pixel_values_pair: torch.Tensor
    affine2_to_1: torch.Tensor
    mask: torch.Tensor
    flipped: torch.Tensor


def make_iic_views(
    pixel_values: torch.Tensor,
    generator: torch.Generator,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.125,
    flip_p: float = 0.5,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    mask_unlabelled: bool = False,
) -> IicViews:
    """IIC's view pair for a batch of normalised images `[B, 3, H, W]` (METHODS 3.2), deterministic given
    `generator`.

    For each image in turn: [`color_jitter`] draws (on the image un-normalised to [0, 1], re-normalised after),
    then one uniform draw `u`; the image is flipped horizontally when `u < flip_p`, and its `affine2_to_1` is then
    `[[-1, 0, 0], [0, 1, 0]]` (identity otherwise), so `grid_sample(view2, affine_grid(affine2_to_1))` is view 1's
    geometry. View 1 is `pixel_values` unchanged. The mask is all ones; with `mask_unlabelled` it is 1 only where
    `0 <= labels < num_classes` (what IIC's released code does on COCO-Stuff-3 / Potsdam).

    Example:

    ```python
    >>> import torch
    >>> views = make_iic_views(torch.randn(2, 3, 16, 16), torch.Generator().manual_seed(0))
    >>> views.pixel_values_pair.shape, views.affine2_to_1.shape, views.mask.shape
    (torch.Size([2, 3, 16, 16]), torch.Size([2, 2, 3]), torch.Size([2, 16, 16]))
    ```
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a [B, 3, H, W] tensor of normalised RGB images, got {shape}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    batch, _, height, width = pixel_values.shape
    dtype, device = pixel_values.dtype, pixel_values.device
    mean = torch.tensor(image_mean, dtype=dtype, device=device).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=dtype, device=device).view(3, 1, 1)

    pairs, flipped = [], []
    for image in pixel_values:
        jittered = color_jitter((image * std + mean).clamp(0.0, 1.0), generator, brightness, contrast, saturation, hue)
        view = (jittered - mean) / std
        flip = float(torch.rand((), generator=generator, dtype=torch.float64)) < flip_p
        pairs.append(view.flip(-1) if flip else view)
        flipped.append(flip)
    flipped = torch.tensor(flipped, dtype=torch.bool, device=device)
    affine = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=dtype, device=device).repeat(batch, 1, 1)
    affine[flipped, 0, :] *= -1.0

    if mask_unlabelled:
        if labels is None or num_classes is None:
            raise ValueError("mask_unlabelled needs the training labels and num_classes")
        if tuple(labels.shape) != (batch, height, width):
            raise ValueError(f"labels must be [B, H, W] = {[batch, height, width]}, got {list(labels.shape)}")
        mask = ((labels >= 0) & (labels < num_classes)).to(device=device, dtype=dtype)
    else:
        mask = torch.ones(batch, height, width, dtype=dtype, device=device)
    return IicViews(
        pixel_values=pixel_values,
        pixel_values_pair=torch.stack(pairs),
        affine2_to_1=affine,
        mask=mask,
        flipped=flipped,
    )


def head_for_step(step: int, head_a_steps: int, head_b_steps: int, head_a_first: bool = False) -> str:
    """Which head step `step` (0-based) trains: phases of `head_b_steps` (head B) and `head_a_steps` (head A)
    steps alternate, head B first unless `head_a_first`.

    Example:

    ```python
    >>> [head_for_step(s, head_a_steps=2, head_b_steps=1) for s in range(6)]
    ['B', 'A', 'A', 'B', 'A', 'A']
    ```
    """
    if head_a_steps < 1 or head_b_steps < 1:
        raise ValueError(f"phase lengths must be >= 1, got head_a_steps={head_a_steps}, head_b_steps={head_b_steps}")
    first, first_len, second = ("A", head_a_steps, "B") if head_a_first else ("B", head_b_steps, "A")
    return first if step % (head_a_steps + head_b_steps) < first_len else second


# ---------------------------------------------------------------------------------------------------------------
# recipe


@dataclass
class IicTrainingOptions(RecipeOptions):
    """IIC's training settings (the model's architecture and loss weights are [`IicConfig`]'s).

    Args:
        max_steps, batch_size, resolution, eval_resolution, val_every:
            The schedule (defaults: 20000 steps, our choice; IIC's COCO-Stuff-3 batch of 120 at 128 px; validation
            every 500 steps).
        learning_rate: Adam learning rate, constant (1e-4 COCO-Stuff, 1e-5 Potsdam-3).
        jitter_brightness, jitter_contrast, jitter_saturation, jitter_hue:
            Colour jitter of view 2 (defaults 0.4, 0.4, 0.4, 0.125): factors uniform in `[max(0, 1 - s), 1 + s]`
            (hue: shift uniform in `[-s, s]`), applied in a random order, like torchvision's `ColorJitter`.
        flip_p: Probability that view 2 is flipped horizontally.
        mask_unlabelled:
            Leave out of the loss the pixels whose training label is invalid (outside `[0, num_classes)`). This is
            what IIC's released code does on COCO-Stuff-3 and Potsdam (the labels choose which pixels train); it
            is off by default because it uses labels. The `cocostuff3`/`potsdam3` presets turn it on.
        head_a_first: Training alternates head-B and head-A phases; IIC's default starts with head B.
        head_a_steps, head_b_steps:
            Length of each phase in (optimizer) steps; `None` means one pass over the training set (IIC's
            alternation of full epochs, with `head_A_epochs = head_B_epochs = 1`).

    The presets are IIC's released runs (xu-ji/IIC model 555, `"cocostuff3"`: lr 1e-4, batch 120, 128 px; model
    545, `"potsdam3"`: lr 1e-5, batch 75, 200 px, jitter 0.1), both with `mask_unlabelled`.

    Example:

    ```python
    >>> from hf_useg.models.iic.training_iic import IicTrainingOptions
    >>> options = IicTrainingOptions.from_preset("potsdam3", max_steps=10)
    >>> options.learning_rate, options.batch_size, options.jitter_hue, options.max_steps
    (1e-05, 75, 0.1, 10)
    ```
    """

    max_steps: int | None = 20000
    batch_size: int = 120
    resolution: int = 128
    eval_resolution: int = 128
    val_every: int | None = 500
    learning_rate: float = 1e-4
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.4
    jitter_saturation: float = 0.4
    jitter_hue: float = 0.125
    flip_p: float = 0.5
    mask_unlabelled: bool = False
    head_a_first: bool = False
    head_a_steps: int | None = None
    head_b_steps: int | None = None

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "cocostuff3": {
            "learning_rate": 1e-4,
            "batch_size": 120,
            "resolution": 128,
            "eval_resolution": 128,
            "mask_unlabelled": True,
        },
        "potsdam3": {
            "learning_rate": 1e-5,
            "batch_size": 75,
            "resolution": 200,
            "eval_resolution": 200,
            "jitter_brightness": 0.1,
            "jitter_contrast": 0.1,
            "jitter_saturation": 0.1,
            "jitter_hue": 0.1,
            "mask_unlabelled": True,
        },
    }

    def __post_init__(self):
        super().__post_init__()
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("head_a_steps", "head_b_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be >= 1 or None (one pass over the data), got {value!r}")
        for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.jitter_hue <= 0.5:
            raise ValueError(f"jitter_hue must be in [0, 0.5], got {self.jitter_hue}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")


@dataclass
class IicViewCollator:
    """Collate of IIC's training DataLoader (runs in its workers): stacks the processed items of one batch, builds
    their [`make_iic_views`] from the batch's step generator (`step_generator`, the generator the step's data
    choices always came from) and names the head the step trains (`head_for_step` of the optimizer step
    ``key.step // accumulation``).

    Example:

    ```python
    >>> import torch
    >>> from hf_useg.training import BatchIndex
    >>> collate = IicViewCollator(IicTrainingOptions(), IMAGENET_MEAN, IMAGENET_STD, 3, 1, 1)
    >>> keys = [BatchIndex(index=i, step=1, seed=7, position=i, batch_size=2) for i in range(2)]
    >>> batch = collate([(key, {"pixel_values": torch.zeros(3, 8, 8), "index": key.index}) for key in keys])
    >>> batch["head"], batch["pixel_values_pair"].shape
    ('A', torch.Size([2, 3, 8, 8]))
    ```
    """

    options: IicTrainingOptions
    image_mean: Sequence[float]
    image_std: Sequence[float]
    num_classes: int
    head_a_steps: int
    head_b_steps: int
    accumulation: int = 1

    def __call__(self, batch: list[tuple[BatchIndex, dict]]) -> dict[str, Any]:
        keys = [key for key, _ in batch]
        if len({key.seed for key in keys}) != 1:
            raise ValueError("the items of a batch must come from one step")
        collated = collate_segmentation_batch([item for _, item in batch])
        options = self.options
        views = make_iic_views(
            collated["pixel_values"],
            step_generator(keys[0]),
            brightness=options.jitter_brightness,
            contrast=options.jitter_contrast,
            saturation=options.jitter_saturation,
            hue=options.jitter_hue,
            flip_p=options.flip_p,
            image_mean=self.image_mean,
            image_std=self.image_std,
            labels=collated.get("labels"),
            num_classes=self.num_classes,
            mask_unlabelled=options.mask_unlabelled,
        )
        step = keys[0].step // self.accumulation
        return {
            "pixel_values": views.pixel_values,
            "pixel_values_pair": views.pixel_values_pair,
            "affine2_to_1": views.affine2_to_1,
            "mask": views.mask,
            "head": head_for_step(step, self.head_a_steps, self.head_b_steps, options.head_a_first),
        }


class IicRecipe(Recipe):
    """IIC (Ji et al., ICCV 2019): two heads on one trunk trained with the IIC loss between an image and its
    colour-jittered, possibly flipped copy (see the module docstring).

    What is particular to IIC: the view pair is built in the DataLoader (`IicViewCollator`); each step trains one
    head (A or B, by the step number), so `find_unused_parameters` is set for DDP; `backbone: none` trains the
    paper's VGG trunk from scratch; `extra_evaluation` adds head A (majority matching) and IID+ (matchings fitted on
    the labelled training split) to the summary.

    Example:

    ```python
    >>> from hf_useg.training import load_training_arguments, train
    >>> args = load_training_arguments("training/configs/iic_tiny.yaml", output_dir="outputs/iic")  # doctest: +SKIP
    >>> train(args)["head_a_majority_accuracy"]                                                   # doctest: +SKIP
    ```
    """

    options_class = IicTrainingOptions
    find_unused_parameters = True
    progress_name = "train iic"

    def build_model(self, backbone_config, num_classes: int) -> IicForUnsupervisedSegmentation:
        """`backbone: none` (no backbone config) gives the paper's VGG trunk from scratch; any other backbone gives
        `trunk="backbone"`. Without a preset and without `model.num_overclusters`, head A gets `3 * num_classes`
        outputs."""
        overrides = dict(self.args.model)
        overrides["num_classes"] = num_classes
        trunk = overrides.get("trunk")
        if backbone_config is None:
            if trunk == "backbone":
                raise ValueError(
                    "model.trunk 'backbone' needs a backbone: set `backbone:` to a Hub id, folder or random-vit-*"
                )
            overrides["trunk"] = "vgg"
        else:
            if trunk == "vgg":
                raise ValueError(
                    "model.trunk 'vgg' is the paper's network trained from scratch: set `backbone: none` in the config"
                )
            overrides["trunk"] = "backbone"
            overrides["backbone_config"] = backbone_config
        if self.args.preset:
            return IicForUnsupervisedSegmentation(IicConfig.for_dataset(self.args.preset, **overrides))
        overrides.setdefault("num_overclusters", 3 * num_classes)
        return IicForUnsupervisedSegmentation(IicConfig(**overrides))

    def setup(self, model, run) -> None:
        super().setup(model, run)
        self.image_mean, self.image_std = list(model.config.image_mean), list(model.config.image_std)
        self.items = ProcessedSegmentationDataset(run.train_set, run.train_processor, run.num_classes)
        if self.options.mask_unlabelled and not self.items.with_labels:
            raise ValueError("mask_unlabelled=True needs training labels, and the training set has none")

    def make_optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.options.learning_rate)

    def train_dataloader(self, batches: StepBatchSampler) -> DataLoader:
        accumulation = self.args.gradient_accumulation_steps
        steps_per_epoch = max(1, batches.batches_per_epoch // accumulation)
        collate = IicViewCollator(
            self.options,
            self.image_mean,
            self.image_std,
            self.run.num_classes,
            head_a_steps=self.options.head_a_steps or steps_per_epoch,
            head_b_steps=self.options.head_b_steps or steps_per_epoch,
            accumulation=accumulation,
        )
        return DataLoader(
            ItemsByBatchIndex(self.items, with_key=True),
            batch_sampler=batches,
            num_workers=self.args.num_workers,
            collate_fn=collate,
        )

    def training_step(self, model, batch: dict[str, Any]) -> TrainingStepOutput:
        head = batch["head"]
        output = model(
            pixel_values=batch["pixel_values"],
            pixel_values_pair=batch["pixel_values_pair"],
            affine2_to_1=batch["affine2_to_1"],
            mask=batch["mask"],
            head=head,
        )
        suffix = head.lower()
        logs = {
            f"loss_head_{suffix}": output.loss.detach(),
            f"loss_no_lamb_head_{suffix}": output.loss_no_lamb.detach(),
        }
        return TrainingStepOutput(loss=output.loss, logs=logs)

    def extra_evaluation(self, model) -> dict[str, float | None]:
        """Both heads on the validation split (`head_a_majority_*`, `head_b_hungarian_*`) and, when the training
        split is labelled, IID+ (`*_iid_plus_*`, matching fitted on the training split). Same protocol as the
        loop's final evaluation (eval resolution, `final_flip_tta`)."""
        run = self.run
        if run.val_set is None or "label" not in run.val_set.column_names:
            return {}
        fit_dataset = run.train_set if "label" in run.train_set.column_names else None
        results = evaluate_iic_heads(
            model,
            run.val_set,
            run.eval_processor,
            run.num_classes,
            fit_dataset=fit_dataset,
            batch_size=self.args.eval_batch_size,
            flip_tta=self.args.final_flip_tta,
            accelerator=run.accelerator,
            progress=run.show_progress,
        )
        summary = {}
        for name, values in results.items():
            for key in ("accuracy", "mean_iou"):
                value = float(values[key])
                summary[f"{name}_{key}"] = None if math.isnan(value) else value
        return summary


# ---------------------------------------------------------------------------------------------------------------
# evaluation of both heads


@torch.no_grad()
def _head_confusions(
    model: IicForUnsupervisedSegmentation,
    dataset,
    image_processor,
    num_classes: int,
    *,
    batch_size: int,
    flip_tta: bool,
    max_images: int | None,
    device,
    accelerator,
    progress: bool,
    desc: str,
) -> dict[str, torch.Tensor]:
    # each process scores its own images (no padding duplicates); the confusion matrices are summed after
    loader = evaluation_loader(
        dataset, image_processor, num_classes, batch_size=batch_size, max_images=max_images, accelerator=accelerator
    )
    if accelerator is not None:
        device = accelerator.device
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    config = model.config
    metrics = {
        "A": UnsupervisedSegmentationMetric(num_classes, config.num_overclusters, "majority", device=device),
        "B": UnsupervisedSegmentationMetric(num_classes, config.num_classes, "hungarian", device=device),
    }
    for batch in tqdm(loader, desc=desc, disable=not progress):
        labels = batch["labels"].to(device)
        log_probs_a, log_probs_b = model.predict_heads(
            batch["pixel_values"].to(device), output_size=tuple(labels.shape[-2:]), flip_tta=flip_tta
        )
        metrics["A"].update(log_probs_a.argmax(1), labels)
        metrics["B"].update(log_probs_b.argmax(1), labels)
    for metric in metrics.values():
        if accelerator is not None:
            metric.sync()
    return {head: metric.confusion_matrix.cpu() for head, metric in metrics.items()}


def evaluate_iic_heads(
    model: IicForUnsupervisedSegmentation,
    dataset,
    image_processor,
    num_classes: int,
    *,
    fit_dataset=None,
    batch_size: int = 8,
    flip_tta: bool = True,
    max_images: int | None = None,
    max_fit_images: int | None = None,
    device: str | torch.device | None = None,
    accelerator=None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """IIC's evaluation of both heads on a labelled `dataset` (METHODS 3.3), with one trunk pass per image.

    Returns metric dicts (as `UnsupervisedSegmentationMetric.compute()`): `"head_b_hungarian"` (head B, one-to-one
    Hungarian matching fitted on `dataset` itself) and `"head_a_majority"` (head A, many-to-one majority
    matching). With `fit_dataset` (e.g. the training split, labelled) also IIC's IID+ mode:
    `"head_b_hungarian_iid_plus"` and `"head_a_majority_iid_plus"`, whose matchings are fitted on `fit_dataset`
    and scored on `dataset` (`hf_useg.evaluation.fit_and_score`).

    Example:

    ```python
    >>> results = evaluate_iic_heads(model, val_set, processor, 11, fit_dataset=train_set)  # doctest: +SKIP
    >>> results["head_a_majority"]["accuracy"], results["head_a_majority_iid_plus"]["accuracy"]  # doctest: +SKIP
    ```
    """
    kwargs = dict(batch_size=batch_size, flip_tta=flip_tta, device=device, accelerator=accelerator, progress=progress)
    confusion = _head_confusions(
        model, dataset, image_processor, num_classes, max_images=max_images, desc="evaluate iic heads", **kwargs
    )
    results = {
        "head_b_hungarian": fit_and_score(confusion["B"], confusion["B"], "hungarian"),
        "head_a_majority": fit_and_score(confusion["A"], confusion["A"], "majority"),
    }
    if fit_dataset is not None:
        fit = _head_confusions(
            model, fit_dataset, image_processor, num_classes, max_images=max_fit_images, desc="fit iic", **kwargs
        )
        results["head_b_hungarian_iid_plus"] = fit_and_score(fit["B"], confusion["B"], "hungarian")
        results["head_a_majority_iid_plus"] = fit_and_score(fit["A"], confusion["A"], "majority")
    return results
