"""`pipeline("image-segmentation", model=DIR)` on every `*ForUnsupervisedSegmentation` model after `import hf_useg`.

The reference for the masks is computed independently of the pipeline: the saved whole-image processor ->
`model.predict(..., output_size=<feature map size>, flip_tta=False)` -> bilinear upsampling (``align_corners=False``)
to the input image's size -> argmax; and the same from the forward's ``logits``. The pipeline reads the forward
(no flip TTA, no CRF: those are `predict`'s and the Space's).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segmenter_tester import check_pipeline_segments
from tiny_configs import tiny_vit_config
from transformers import AutoModelForSemanticSegmentation, pipeline

from hf_useg import DinoForUnsupervisedSegmentation, StegoForUnsupervisedSegmentation
from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor, whole_image_processor
from hf_useg.registry import methods

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "training" / "configs" / "stego_tiny.yaml"


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory) -> Path:
    """A tiny STEGO model trained on the generated scenes (2 steps), saved the way training saves it."""
    from hf_useg.training import load_training_arguments, train

    output_dir = tmp_path_factory.mktemp("stego-tiny")
    args = load_training_arguments(
        TINY_CONFIG, output_dir=str(output_dir), max_steps=2, val_every=100, save_every=100, synthetic_num_images=8
    )
    return Path(train(args)["model_dir"])


def _scene(height: int, width: int, seed: int = 3) -> Image.Image:
    from hf_useg.data import make_synthetic_scenes

    return make_synthetic_scenes(1, (height, width), num_classes=3, seed=seed)[0]["image"]


def test_trained_stego_folder_in_pipeline(trained_model_dir):
    segmenter = pipeline("image-segmentation", model=str(trained_model_dir))
    model = segmenter.model
    assert type(model).__name__ == "StegoForUnsupervisedSegmentation"
    assert isinstance(segmenter.image_processor, UnsupervisedSegmentationImageProcessor)
    assert not segmenter.image_processor.do_center_crop  # masks cover the whole image
    # the names the Hungarian matching gave the clusters
    assert sorted(model.config.id2label.values()) == [f"synthetic-class-{i}" for i in range(3)]
    image = _scene(45, 70)  # non-square, not a multiple of the patch size
    segments = check_pipeline_segments(segmenter, image, predict_equal=True)
    assert all(segment["mask"].size == (70, 45) for segment in segments)


def test_pipeline_batch_of_images_of_different_sizes(trained_model_dir):
    segmenter = pipeline("image-segmentation", model=str(trained_model_dir))
    images = [_scene(40, 56, seed=1), _scene(64, 33, seed=2)]
    results = segmenter(images)
    assert len(results) == 2
    for image, segments in zip(images, results):
        assert {segment["mask"].size for segment in segments} == {image.size}
        coverage = sum(np.asarray(segment["mask"], dtype=np.int64) for segment in segments)
        assert (coverage == 255).all()


def test_pipeline_logs_no_unsupported_model_error(trained_model_dir):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    pipeline_logger = logging.getLogger("transformers.pipelines.base")
    pipeline_logger.addHandler(handler)
    try:
        pipeline("image-segmentation", model=str(trained_model_dir))
    finally:
        pipeline_logger.removeHandler(handler)
    assert not [r for r in records if "not supported" in r.getMessage()]


def test_pipeline_rejects_instance_subtask(trained_model_dir):
    segmenter = pipeline("image-segmentation", model=str(trained_model_dir))
    with pytest.raises(ValueError, match="Subtask instance is not supported"):
        segmenter(_scene(32, 40), subtask="instance")


# ----------------------------------------------------------------------------------------------------------------
# every registered segmentation model


def _save_tiny_model(config_class, model_class, folder: Path) -> None:
    torch.manual_seed(0)
    model = model_class(config_class(backbone_config=tiny_vit_config()))
    # methods whose clusters come from k-means need fitted centroids before they can segment
    if hasattr(model, "fit") and hasattr(model, "is_fitted"):
        model.fit([torch.randn(4, 3, 32, 32)], progress=False)
    elif hasattr(model, "set_centroids"):
        model.set_centroids(F.normalize(torch.randn(model.centroids.shape), dim=1))
    model.eval()
    num_clusters = model(torch.randn(1, 3, 32, 32)).logits.shape[1]
    model.set_cluster_names(
        np.arange(num_clusters), [f"{config_class.model_type}-part-{i}" for i in range(num_clusters)]
    )
    model.save_pretrained(folder)
    whole_image_processor(32, 8).save_pretrained(folder)


# every method of hf_useg.registry that serves the image-segmentation pipeline (a new method is covered as soon as
# its folder declares it); each method's own model test also runs tests/segmenter_tester.py's pipeline check
SEGMENTATION_METHODS = [spec for spec in methods().values() if spec.pipeline_task == "image-segmentation"]


@pytest.mark.parametrize("spec", SEGMENTATION_METHODS, ids=[spec.name for spec in SEGMENTATION_METHODS])
def test_every_segmentation_model_works_in_pipeline(spec, tmp_path):
    config_class, model_class = spec.load_config_class(), spec.load_model_class()
    assert config_class.model_type == spec.model_type
    _save_tiny_model(config_class, model_class, tmp_path)
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path)) is model_class
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    assert type(segmenter.model) is model_class
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 51, 3), dtype=np.uint8))
    # STEGO and DINO k-means return cluster log-probabilities from forward, as predict does; a method whose
    # logits are unnormalised is only held to its forward
    with torch.no_grad():
        logits = segmenter.model(torch.randn(1, 3, 32, 32)).logits
    log_probabilities = torch.allclose(logits.logsumexp(1), torch.zeros(()), atol=1e-5)
    assert log_probabilities or model_class not in (StegoForUnsupervisedSegmentation, DinoForUnsupervisedSegmentation)
    segments = check_pipeline_segments(segmenter, image, predict_equal=log_probabilities)
    assert all(segment["label"].startswith(f"{config_class.model_type}-part-") for segment in segments)
