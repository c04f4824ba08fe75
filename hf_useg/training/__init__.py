"""Training: one Accelerate loop for every method, each method a `Recipe` found through `hf_useg.registry`.

```python
>>> from hf_useg.training import load_training_arguments, train
>>> args = load_training_arguments("training/configs/stego_tiny.yaml", output_dir="outputs/tiny")  # doctest: +SKIP
>>> summary = train(args)                                                                          # doctest: +SKIP
```
"""

from .arguments import TrainingArguments, load_training_arguments, resolve_recipe_options
from .checkpointing import latest_checkpoint, save_checkpoint, save_model_folder
from .data import RANDOM_BACKBONES, SCRATCH_BACKBONES, build_model, load_backbone, load_splits
from .loop import train
from .recipe import (
    BatchIndex,
    Evaluation,
    ItemsByBatchIndex,
    Recipe,
    RecipeOptions,
    StepBatchSampler,
    TrainingData,
    TrainingRun,
    TrainingStepOutput,
    step_generator,
    step_seed,
)

__all__ = [
    "RANDOM_BACKBONES",
    "SCRATCH_BACKBONES",
    "BatchIndex",
    "Evaluation",
    "ItemsByBatchIndex",
    "Recipe",
    "RecipeOptions",
    "StepBatchSampler",
    "TrainingArguments",
    "TrainingData",
    "TrainingRun",
    "TrainingStepOutput",
    "build_model",
    "latest_checkpoint",
    "load_backbone",
    "load_splits",
    "load_training_arguments",
    "resolve_recipe_options",
    "save_checkpoint",
    "save_model_folder",
    "step_generator",
    "step_seed",
    "train",
]
