"""The DINO-feature k-means baseline's recipe: no gradient steps; `finalize` fits the centroids on the training
images' patch features (METHODS 4.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from ...data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from ...training.recipe import Recipe, RecipeOptions, StepBatchSampler, TrainingStepOutput
from .configuration_dino import DinoSegmentationConfig
from .modeling_dino import DinoForUnsupervisedSegmentation

__all__ = ["DinoKMeansOptions", "DinoKMeansRecipe"]


@dataclass
class DinoKMeansOptions(RecipeOptions):
    """Fitting settings of the k-means baseline: the images at ``resolution`` (center crop), at most
    ``kmeans_vectors_per_image`` random patch vectors of each (None: all), cosine k-means with ``kmeans_init``
    restarts of ``kmeans_iterations`` iterations.

    Example:

    ```python
    >>> DinoKMeansOptions(kmeans_vectors_per_image=512).max_steps
    0
    ```
    """

    max_steps: int | None = 0
    kmeans_vectors_per_image: int | None = 256
    kmeans_iterations: int = 100
    kmeans_init: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps != 0:
            raise ValueError("dino_kmeans has no training steps (max_steps must be 0): it fits k-means once")


class DinoKMeansRecipe(Recipe):
    """Zero-training baseline: cosine k-means over the frozen backbone's patch features of the training images,
    fitted once after the (empty) loop; the loop then evaluates and saves the fitted model like any other."""

    options_class = DinoKMeansOptions
    options: DinoKMeansOptions

    def build_model(self, backbone_config, num_classes: int) -> DinoForUnsupervisedSegmentation:
        config = DinoSegmentationConfig(backbone_config=backbone_config, num_clusters=num_classes, **self.args.model)
        return DinoForUnsupervisedSegmentation(config)

    def make_optimizer(self, model) -> None:
        return None

    def train_dataloader(self, batches: StepBatchSampler) -> DataLoader:
        raise NotImplementedError("dino_kmeans takes no training steps")

    def training_step(self, model, batch) -> TrainingStepOutput:
        raise NotImplementedError("dino_kmeans takes no training steps")

    def finalize(self, model: DinoForUnsupervisedSegmentation) -> dict[str, Any]:
        run = self.run
        items = ProcessedSegmentationDataset(run.train_set, run.train_processor, run.num_classes)
        loader = DataLoader(
            items,
            batch_size=self.args.eval_batch_size,
            collate_fn=collate_segmentation_batch,
            num_workers=self.args.num_workers,
        )
        model.fit(
            loader,
            vectors_per_image=self.options.kmeans_vectors_per_image,
            num_iterations=self.options.kmeans_iterations,
            num_init=self.options.kmeans_init,
            seed=self.args.seed,
            progress=run.show_progress,
        )
        return {}
