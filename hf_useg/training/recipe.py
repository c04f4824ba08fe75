"""What a method tells the training loop: the `Recipe` interface, its options, and the batches the loop hands it.

The loop (`hf_useg.training.loop`) owns everything every method shares; a recipe says only what is particular to
its method. A recipe:

* declares its training settings as a dataclass (`options_class`, a subclass of [`RecipeOptions`]) with the
  published settings as named presets (``presets = {"cocostuff27": {...}}``);
* builds its model (`build_model`), its optimizer (`make_optimizer`) and the DataLoader of one epoch
  (`train_dataloader`, a real `torch.utils.data.DataLoader` over the loop's deterministic `StepBatchSampler`, so
  ``num_workers`` is honoured);
* computes the loss of one batch (`training_step`);
* may replace the segmentation defaults of the run's data (`load_data`), model (`create_model`, `processors`),
  evaluation (`has_validation`, `evaluate`: periodic and final) and saved folders (`save_model`, `model_card`) —
  a detection recipe does;
* may hook in where its method needs to: `setup` (once, before the optimizer), `on_epoch_start` (e.g. PiCIE's
  re-clustering), `before_optimizer_step` / `after_optimizer_step` (e.g. DINO's gradient clipping and EMA
  teacher), `on_log`, `finalize` (after the last step: fit a k-means baseline, re-cluster, export a backbone) and
  `extra_evaluation` (method-specific numbers for the summary).

A recipe keeps its own state (a kNN table, an epoch's clustering) and never changes the loop's. State that must
survive a resume is returned by `checkpoint_objects` (objects with ``state_dict``/``load_state_dict``, saved with
every checkpoint).

Example: a toy method (see the README's "Add a method").

```python
>>> import torch
>>> from dataclasses import dataclass
>>> from hf_useg.training import Recipe, RecipeOptions, TrainingStepOutput
>>> @dataclass
... class ToyOptions(RecipeOptions):
...     learning_rate: float = 1e-3
>>> class ToyRecipe(Recipe):
...     options_class = ToyOptions
...     def build_model(self, backbone_config, num_classes): ...
...     def make_optimizer(self, model):
...         return torch.optim.Adam(model.parameters(), lr=self.options.learning_rate)
...     def train_dataloader(self, batches): ...
...     def training_step(self, model, batch):
...         return TrainingStepOutput(loss=model(**batch).loss)
```
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch.utils.data import Sampler

from ..configuration_utils import preset_values

__all__ = [
    "BatchIndex",
    "Evaluation",
    "ItemsByBatchIndex",
    "Recipe",
    "RecipeOptions",
    "StepBatchSampler",
    "TrainingData",
    "TrainingRun",
    "TrainingStepOutput",
    "step_generator",
    "step_seed",
]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one training step on one process: everything random in a step derives from it, so a resumed
    run draws exactly what the uninterrupted one drew."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def step_generator(index: BatchIndex) -> torch.Generator:
    """A fresh generator for the data choices of ``index``'s step (the same one in any DataLoader worker)."""
    return torch.Generator().manual_seed(index.seed)


class BatchIndex(NamedTuple):
    """One item of a training batch, as the loop's sampler hands it to a recipe's dataset.

    ``index``: the item in the training set; ``step``: the (micro-)step the batch is for; ``seed``: that step's
    seed on this process (`step_seed`); ``position`` / ``batch_size``: where the item sits in its batch. A dataset
    that draws per-batch randomness in a worker rebuilds the step's generator with `step_generator` and takes its
    ``position``-th draw.
    """

    index: int
    step: int
    seed: int
    position: int
    batch_size: int


class StepBatchSampler(Sampler[list[BatchIndex]]):
    """Deterministic, resumable batches: epoch ``e`` is ``randperm(N)`` from a generator seeded with ``seed + e``,
    cut into global batches of ``batch_size * world_size`` (the last partial batch dropped); process ``rank`` takes
    its slice. ``start(epoch, first_batch, first_step)`` resumes mid-epoch without loading the skipped items.

    Example:

    ```python
    >>> sampler = StepBatchSampler(10, batch_size=4, seed=0)
    >>> sampler.batches_per_epoch
    2
    >>> [[item.index for item in batch] for batch in sampler] == [[item.index for item in batch] for batch in sampler]
    True
    ```
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < batch_size * world_size:
            raise ValueError(
                f"the training set has {num_items} items, fewer than one batch of {batch_size} x {world_size} "
                "process(es): lower batch_size or add images"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.first_batch, self.first_step = 0, 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def start(self, epoch: int, first_batch: int = 0, first_step: int | None = None) -> None:
        self.epoch, self.first_batch = epoch, first_batch
        self.first_step = epoch * self.batches_per_epoch + first_batch if first_step is None else first_step

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch

    def __iter__(self) -> Iterator[list[BatchIndex]]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_size = self.batch_size * self.world_size
        for offset, batch in enumerate(range(self.first_batch, self.batches_per_epoch)):
            chunk = order[batch * global_size : (batch + 1) * global_size]
            indices = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            step = self.first_step + offset
            seed = step_seed(self.seed, step, self.rank)
            yield [BatchIndex(index, step, seed, position, len(indices)) for position, index in enumerate(indices)]


class ItemsByBatchIndex(torch.utils.data.Dataset):
    """A map-style dataset indexed by the loop's [`BatchIndex`] items (``items[key.index]``), for recipes whose
    items need nothing of the step; with ``with_key`` an item comes as ``(key, item)``, for a collate that draws
    from the batch's step generator.

    Example:

    ```python
    >>> items = ItemsByBatchIndex(["a", "b", "c"])
    >>> items[BatchIndex(index=2, step=0, seed=0, position=0, batch_size=1)]
    'c'
    ```
    """

    def __init__(self, items, with_key: bool = False):
        self.items, self.with_key = items, with_key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: BatchIndex):
        item = self.items[key.index]
        return (key, item) if self.with_key else item


class TrainingData(NamedTuple):
    """The data of a run (`Recipe.load_data`): the splits, and the classes of the labelled task (0 and ``[]`` for
    label-free methods on unnamed data)."""

    train_set: Any
    val_set: Any
    num_classes: int
    class_names: list[str]


@dataclass
class Evaluation:
    """What `Recipe.evaluate` returns.

    Attributes:
        values: the headline numbers (logged as ``val/<name>``, added to the run summary).
        score: higher is better; the best periodic evaluation's model is kept in ``best/``.
        results: the raw results (for reports and the model card).
        summary: what else a final evaluation adds to the run summary (its protocol, image count, tables).
    """

    values: dict[str, float]
    score: float
    results: Any = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingStepOutput:
    """What `Recipe.training_step` returns: the loss to minimise and named values to log (as ``train/<name>``)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """YAML reads ``1`` as an int and ``1e-3`` as a string: turn them into the float a field is typed with."""
    arms = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if float in arms and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError as error:
                raise ValueError(f"{name} must be a number, got {value!r}") from error
    return value


@dataclass
class RecipeOptions:
    """The training schedule every method has. A recipe subclasses it with its own settings (learning rates,
    augmentation, k-means schedule) and names its published settings in ``presets``.

    ``max_steps=None`` lets the recipe derive the length (`Recipe.default_max_steps`, e.g. PiCIE's epochs);
    ``val_every=None`` validates once per epoch.
    """

    max_steps: int | None = None
    batch_size: int = 32
    resolution: int = 224
    eval_resolution: int = 320
    val_every: int | None = 100

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # options that usually may change when a run is resumed (max_steps, val_every) but not for this method
    fixed_on_resume: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            setattr(self, item.name, _coerce(getattr(self, item.name), hints[item.name], item.name))
        for name in ("max_steps", "batch_size", "resolution", "eval_resolution", "val_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("batch_size", "resolution", "eval_resolution", "val_every"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be >= 1, got 0")

    @classmethod
    def field_names(cls) -> set[str]:
        return {item.name for item in dataclasses.fields(cls)}

    @classmethod
    def from_preset(cls, preset: str | None = None, **overrides: Any) -> RecipeOptions:
        """The options of ``preset`` (None: the class defaults) with ``overrides``; unknown names are an error."""
        unknown = sorted(set(overrides) - cls.field_names())
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} option(s) {unknown}; valid options are {sorted(cls.field_names())}"
            )
        if preset is None:
            return cls(**overrides)
        return cls(**preset_values(cls.presets, preset, overrides, cls.__name__))


@dataclass(frozen=True)
class TrainingRun:
    """What the loop tells a recipe about the run (read-only): the arguments, the accelerator, the data, the
    processors at the training and evaluation resolutions, and where outputs go."""

    args: Any
    accelerator: Any
    train_set: Any
    val_set: Any
    num_classes: int
    class_names: list[str]
    train_processor: Any
    eval_processor: Any

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def show_progress(self) -> bool:
        return bool(self.args.progress and self.accelerator.is_main_process)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Recipe(abc.ABC):
    """A method's training, for the shared loop (see the module docstring for when each hook runs).

    Attributes:
        options_class: the dataclass of the method's training settings.
        label_free: True for methods that train on images only and produce no segmenter (DINO pretraining):
            the loop then needs no ``num_classes``, skips validation and the segmentation evaluation, and
            `finalize` saves the result.
        find_unused_parameters: True when a step may leave parameters without gradients beyond the probes (IIC
            trains one head per step): distributed training must not wait for them.
        progress_name: the progress-bar title.
    """

    options_class: ClassVar[type[RecipeOptions]] = RecipeOptions
    label_free: ClassVar[bool] = False
    find_unused_parameters: ClassVar[bool] = False
    progress_name: ClassVar[str] = "train"

    def __init__(self, args: Any, options: RecipeOptions):
        self.args = args
        self.options = options
        self.run: TrainingRun | None = None

    # -- required -------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_model(self, backbone_config: Any, num_classes: int):
        """The method's model (random weights; the loop loads pretrained backbone weights afterwards)."""

    @abc.abstractmethod
    def make_optimizer(self, model) -> torch.optim.Optimizer | None:
        """The optimizer (None for methods without gradient steps, e.g. a k-means baseline)."""

    @abc.abstractmethod
    def train_dataloader(self, batches: StepBatchSampler) -> torch.utils.data.DataLoader:
        """A DataLoader over ``batches`` (``batch_sampler=batches``, ``num_workers=self.args.num_workers``): each
        item of a batch is a [`BatchIndex`]."""

    @abc.abstractmethod
    def training_step(self, model, batch) -> TrainingStepOutput:
        """Loss (and logs) of one batch, the batch already on the model's device. Runs with torch's global RNG
        seeded for the step."""

    # -- the run's data, model, evaluation and saved folders (segmentation defaults) --------------------------------

    def load_data(self) -> TrainingData:
        """The run's splits and classes. Default: a segmentation dataset (`load_splits`)."""
        from .data import load_splits

        return TrainingData(*load_splits(self.args, self.label_free))

    def create_model(self, num_classes: int) -> tuple[Any, str]:
        """``(model, backbone description)``. Default: `build_model` on ``--backbone`` (pretrained weights loaded)."""
        from .data import build_model

        return build_model(self.args, self, num_classes)

    def processors(self, model) -> tuple[Any, Any]:
        """``(train_processor, eval_processor)`` handed to the recipe through `TrainingRun`. Default: the protocol
        processors at ``resolution`` / ``eval_resolution``."""
        from .data import protocol_processor

        patch = model.backbone.patch_size
        return (
            protocol_processor(self.options.resolution, patch),
            protocol_processor(self.options.eval_resolution, patch),
        )

    def has_validation(self, val_set) -> bool:
        """Whether the run can be evaluated on ``val_set``. Default: a labelled segmentation split."""
        return not self.label_free and val_set is not None and "label" in val_set.column_names

    def evaluate(self, model, final: bool) -> Evaluation:
        """Evaluate ``model`` on the validation split: periodically during training (``final=False``: at most
        ``max_val_images`` images, no test-time augmentation) and once at the end (``final=True``: every image,
        with ``final_flip_tta`` / ``final_crf``). Default: the cluster and linear probes with Hungarian matching;
        the final evaluation also names the clusters after their matched classes."""
        from ..inference import evaluate_segmenter, format_per_class_table, summarize

        run, args = self.run, self.args
        results = evaluate_segmenter(
            model,
            run.val_set,
            run.eval_processor,
            run.num_classes,
            batch_size=args.eval_batch_size,
            flip_tta=final and args.final_flip_tta,
            crf=final and args.final_crf,
            max_images=None if final else args.max_val_images,
            accelerator=run.accelerator,
            progress=final and run.show_progress,
        )
        values = summarize(results)
        evaluation = Evaluation(values=values, score=values["cluster_mean_iou"], results=results)
        if final:
            model.set_cluster_names(results["cluster"]["assignment"], run.class_names)
            evaluation.summary = {
                "eval_protocol": {
                    "resolution": self.options.eval_resolution,
                    "crop": "center",
                    "flip_tta": args.final_flip_tta,
                    "crf": args.final_crf,
                    "matching": "hungarian",
                    "precision": str(run.accelerator.mixed_precision),
                    "split": args.val_split if args.dataset != "synthetic" else "generated val",
                    "images": len(run.val_set),
                },
                "per_class_table": format_per_class_table(results, run.class_names),
            }
        return evaluation

    def model_card(self, model, summary: dict[str, Any], evaluation: Evaluation | None) -> str:
        """The generated model card of the final model folder."""
        from ..hub import generate_model_card
        from ..hub.cards import CONFUSION_FIGURE

        results = evaluation.results if evaluation is not None else None
        card = generate_model_card(
            model,
            summary=summary,
            results=results,
            class_names=self.run.class_names,
            confusion_figure=CONFUSION_FIGURE if results is not None else None,
        )
        return str(card)

    def save_model(self, model, path: Path, extra_files: dict[str, str], evaluation: Evaluation | None = None) -> None:
        """Write a model folder (``best/`` and the final ``model/``; main process only), atomically. Default: the
        model, its whole-image processor, ``extra_files`` and, after a final evaluation, its report files and the
        confusion-matrix figure the card shows."""
        from ..hub.cards import CONFUSION_FIGURE
        from ..image_processing import whole_image_processor
        from ..inference import write_evaluation_report
        from ..report import write_confusion_figure
        from .checkpointing import save_model_folder

        processor = whole_image_processor(self.options.eval_resolution, model.backbone.patch_size)
        save_model_folder(model, processor, path, extra_files)
        if evaluation is not None and evaluation.results is not None:
            write_evaluation_report(evaluation.results, path, self.run.class_names)
            write_confusion_figure(evaluation.results, self.run.class_names, path / CONFUSION_FIGURE)

    # -- optional -------------------------------------------------------------------------------------------------

    @property
    def num_train_items(self) -> int:
        """Items per epoch (what the sampler draws from). Default: the training split's length."""
        return len(self.run.train_set)

    def setup(self, model, run: TrainingRun) -> None:
        """Once, after the model is built and before the optimizer: keep ``run`` and prepare data-side state."""
        self.run = run

    def default_max_steps(self, steps_per_epoch: int) -> int:
        raise ValueError(f"max_steps is required for {type(self).__name__}")

    def checkpoint_objects(self) -> list[Any]:
        return []

    def on_epoch_start(self, model, epoch: int, step: int) -> dict[str, float]:
        """Before the first step of each epoch (also when a run resumes mid-epoch); returns values to log."""
        return {}

    def before_optimizer_step(self, model, optimizer, step: int) -> None:
        """After backward, before the optimizer step ``step`` (0-based): set scheduled values, edit gradients."""
        return None

    def after_optimizer_step(self, model, step: int) -> None:
        """After the optimizer step ``step`` (0-based), e.g. an EMA update."""
        return None

    def on_log(self, logs: dict[str, float], step: int) -> None:
        """Called with the values logged at a logging step (reduced over processes)."""
        return None

    def finalize(self, model) -> dict[str, Any]:
        """After the last step, before the final evaluation; returns values for the run summary."""
        return {}

    def extra_evaluation(self, model) -> dict[str, Any]:
        """Method-specific numbers for the summary after the shared final evaluation (e.g. IIC's head A)."""
        return {}
