"""DINO-feature k-means "training" recipe for `hf_useg.trainer`: fit the centroids on the training images."""

from __future__ import annotations

from torch.utils.data import DataLoader

from ...data.processing import collate_segmentation_batch
from .configuration_dino import DinoSegmentationConfig
from .modeling_dino import DinoForUnsupervisedSegmentation

__all__ = ["build_model", "train"]


def build_model(args, backbone_config, num_classes: int) -> DinoForUnsupervisedSegmentation:
    config = DinoSegmentationConfig(backbone_config=backbone_config, num_clusters=num_classes, **args.model)
    return DinoForUnsupervisedSegmentation(config)


def train(context) -> DinoForUnsupervisedSegmentation:
    model = context.model
    loader = DataLoader(
        context.train_items(),
        batch_size=context.args.eval_batch_size,
        collate_fn=collate_segmentation_batch,
        num_workers=context.args.num_workers,
    )
    model.fit(
        loader,
        vectors_per_image=context.args.kmeans_vectors_per_image,
        seed=context.args.seed,
        progress=context.show_progress,
    )
    return model
