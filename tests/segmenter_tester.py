"""`UnsupervisedSegmenterTesterMixin`: the checks every `*ForUnsupervisedSegmentation` model must pass.

A model test file runs them on its method with a small subclass (pytest collects the inherited ``test_*`` methods):

```python
class TestStegoSegmenter(UnsupervisedSegmenterTesterMixin):
    model_class = StegoForUnsupervisedSegmentation

    def make_model(self):
        return tiny_model()  # a tiny model, ready to segment (fitted where the method needs centroids)
```

Checks: the typed forward output and its ``logits`` ``[B, K, h, w]`` (``K = len(config.id2label)``, what the pipeline
names), `predict` at ``output_size`` with and without flip TTA, the save_pretrained/from_pretrained round trip
(state dicts exactly equal; outputs of the reloaded model equal up to `RELOAD_TOLERANCE`), the Auto classes after
``import hf_useg``, the ``image-segmentation`` pipeline on a saved folder, and clear errors for bad inputs.

Also the pipeline reference (`check_pipeline_segments`) that tests/test_pipeline.py uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation, pipeline

import hf_useg
from hf_useg import UnsupervisedSegmentationPrediction, UnsupervisedSegmenterOutput
from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor, whole_image_processor

__all__ = ["RELOAD_TOLERANCE", "UnsupervisedSegmenterTesterMixin", "check_pipeline_segments", "union_of_masks"]

# Floats computed by two separately built or loaded models (a reload, another process) are compared with this
# tolerance, never exactly: oneDNN / BLAS may pick another kernel for separately allocated (e.g. memory-mapped,
# differently aligned) weights, which changes results in the last bits (4.8e-7 seen on another x86 CPU). Weights,
# centroids and buffers themselves are compared exactly.
RELOAD_TOLERANCE: dict[str, float] = {"rtol": 1e-5, "atol": 1e-6}

# config entries that legitimately differ after a save/load round trip
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def union_of_masks(segments: list[dict], label2id: dict[str, int], size: tuple[int, int]) -> np.ndarray:
    """The label map the pipeline's masks describe; every pixel must be in exactly one mask."""
    width, height = size
    union = np.full((height, width), -1, dtype=np.int64)
    for segment in segments:
        mask = segment["mask"]
        assert mask.mode == "L" and mask.size == size
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) <= {0, 255}
        assert (union[pixels == 255] == -1).all(), "masks overlap"
        union[pixels == 255] = label2id[segment["label"]]
    assert (union >= 0).all(), "masks do not cover the image"
    return union


def _feature_size(model, pixel_values: torch.Tensor) -> tuple[int, int]:
    patch = getattr(model, "patch_size", None) or model.backbone.patch_size
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


def _reference_maps(model, processor, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(from the forward's logits, from `predict` at feature resolution without TTA), each bilinearly upsampled to
    the image size (``align_corners=False``) and arg-maxed, computed without the pipeline."""
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    feature_size = _feature_size(model, pixel_values)
    maps = []
    with torch.no_grad():
        logits = model(pixel_values).logits
    log_probs = model.predict(pixel_values, output_size=feature_size, flip_tta=False).cluster_log_probs
    for scores in (logits, log_probs):
        assert scores.shape[-2:] == feature_size
        upsampled = F.interpolate(scores, size=(image.height, image.width), mode="bilinear", align_corners=False)
        maps.append(upsampled.argmax(1)[0].numpy())
    return maps[0], maps[1]


def check_pipeline_segments(segmenter, image: Image.Image, predict_equal: bool | None = None) -> list[dict]:
    """Run ``segmenter`` on ``image`` and check its masks against the model's own forward (and `predict`).

    The masks must tile the image and equal the forward's ``logits`` upsampled and arg-maxed (the same model object
    computes both, so the maps are compared exactly); with ``predict_equal`` (default: when the forward returns
    log-probabilities) also `predict` at feature resolution without TTA. One segment per cluster present, in
    cluster order, named from ``id2label``, with no score.
    """
    model = segmenter.model
    segments = segmenter(image)
    id2label = model.config.id2label
    label2id = {name: cluster for cluster, name in id2label.items()}
    assert len(label2id) == len(id2label), "test models need distinct segment names"
    union = union_of_masks(segments, label2id, image.size)
    processor = UnsupervisedSegmentationImageProcessor.from_pretrained(model.name_or_path)
    reference, from_predict = _reference_maps(model, processor, image)
    np.testing.assert_array_equal(union, reference)
    if predict_equal is None:
        with torch.no_grad():
            logits = model(processor(image, return_tensors="pt")["pixel_values"]).logits
        predict_equal = torch.allclose(logits.logsumexp(1), torch.zeros(()), atol=1e-5)
    if predict_equal:  # models whose forward logits are predict's log-probabilities at feature resolution
        np.testing.assert_array_equal(union, from_predict)
    present = np.unique(reference).tolist()
    assert [segment["label"] for segment in segments] == [id2label[cluster] for cluster in present]
    assert all(segment["score"] is None for segment in segments)
    return segments


class UnsupervisedSegmenterTesterMixin:
    """Common checks of a `*ForUnsupervisedSegmentation` model; subclass it as ``Test<Method>Segmenter``.

    Subclasses set `model_class` and implement `make_model` (a tiny, seeded model ready to segment: fitted / with
    centroids where the method needs them). Optional: `image_size` (a multiple of the model's patch size),
    `odd_image_size` (not one, for the patch-size error; None where the model accepts any size), and
    `check_reloaded` for method-specific state that must survive a reload.
    """

    model_class: ClassVar[type]
    batch_size: ClassVar[int] = 2
    image_size: ClassVar[tuple[int, int]] = (32, 32)
    odd_image_size: ClassVar[tuple[int, int] | None] = (30, 32)
    output_size: ClassVar[tuple[int, int]] = (20, 28)
    # should `predict`'s log-probabilities at feature resolution, without TTA, arg-max like the forward's logits
    # (True for methods whose forward returns predict's log-probabilities); None: decide from the logits
    predict_matches_forward: ClassVar[bool | None] = None

    # --------------------------------------------------------------------------------------------------------------
    # to implement / override
    def make_model(self):
        raise NotImplementedError

    def check_reloaded(self, model, reloaded, pixel_values: torch.Tensor) -> None:
        """Method-specific checks of a reloaded model (the state dict and config are already compared)."""

    # --------------------------------------------------------------------------------------------------------------
    # helpers
    def pixel_values(self, batch_size: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1234)
        height, width = size or self.image_size
        return torch.randn(batch_size or self.batch_size, 3, height, width, generator=generator)

    def ready_model(self):
        model = self.make_model()
        assert type(model) is self.model_class, f"make_model built a {type(model).__name__}"
        return model.eval()

    @staticmethod
    def num_clusters(model) -> int:
        return len(model.config.id2label)

    @staticmethod
    def comparable_config(model) -> dict[str, Any]:
        """``config.to_dict()`` without the entries a save/load round trip changes (also in nested configs)."""

        def strip(value):
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
            return value

        return strip(model.config.to_dict())

    def assert_same_state(self, model, loaded) -> None:
        """Exactly the same parameters and buffers (weights, centroids, BatchNorm statistics) and config."""
        expected, got = model.state_dict(), loaded.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key].dtype == value.dtype, key
            assert torch.equal(got[key], value), key
        assert self.comparable_config(loaded) == self.comparable_config(model)

    def assert_same_outputs(self, model, loaded, pixel_values: torch.Tensor) -> None:
        """Forward logits and `predict` of two separately built models: equal up to `RELOAD_TOLERANCE`."""
        with torch.no_grad():
            torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, **RELOAD_TOLERANCE)
        expected, got = model.predict(pixel_values), loaded.predict(pixel_values)
        torch.testing.assert_close(got.cluster_log_probs, expected.cluster_log_probs, **RELOAD_TOLERANCE)
        if expected.linear_log_probs is None:
            assert got.linear_log_probs is None
        else:
            torch.testing.assert_close(got.linear_log_probs, expected.linear_log_probs, **RELOAD_TOLERANCE)

    def save(self, model, folder: Path) -> Path:
        """``model`` and the whole-image processor the pipeline and the Space load, as training saves them."""
        model.save_pretrained(folder)
        patch = getattr(model, "patch_size", None) or model.backbone.patch_size
        whole_image_processor(min(self.image_size), patch).save_pretrained(folder)
        return folder

    # --------------------------------------------------------------------------------------------------------------
    # forward
    def test_forward_returns_typed_output_with_logits_at_feature_resolution(self):
        model = self.ready_model()
        pixel_values = self.pixel_values()
        with torch.no_grad():
            output = model(pixel_values)
        assert isinstance(output, UnsupervisedSegmenterOutput)
        height, width = _feature_size(model, pixel_values)
        assert output.logits.shape == (self.batch_size, self.num_clusters(model), height, width)
        assert output.logits.is_floating_point() and torch.isfinite(output.logits).all()
        assert output.loss is None or output.loss.ndim == 0
        # ModelOutput keys and attributes agree (the pipeline reads output["logits"])
        assert output["logits"] is output.logits
        # the forward of a batch is the forward of each image
        with torch.no_grad():
            single = model(pixel_values[1:]).logits
        torch.testing.assert_close(single, output.logits[1:], rtol=1e-4, atol=1e-5)

    # --------------------------------------------------------------------------------------------------------------
    # predict
    @pytest.mark.parametrize("flip_tta", [True, False], ids=["flip_tta", "no_tta"])
    def test_predict_returns_log_probabilities_at_output_size(self, flip_tta):
        model = self.ready_model()
        pixel_values = self.pixel_values()
        num_clusters = self.num_clusters(model)
        prediction = model.predict(pixel_values, output_size=self.output_size, flip_tta=flip_tta)
        assert isinstance(prediction, UnsupervisedSegmentationPrediction)
        assert prediction.cluster_log_probs.shape == (self.batch_size, num_clusters, *self.output_size)
        assert torch.isfinite(prediction.cluster_log_probs).all()
        torch.testing.assert_close(
            prediction.cluster_log_probs.logsumexp(1), torch.zeros(self.batch_size, *self.output_size)
        )
        if prediction.linear_log_probs is not None:
            assert prediction.linear_log_probs.shape[:1] == (self.batch_size,)
            assert prediction.linear_log_probs.shape[2:] == self.output_size
        assert prediction.cluster_crf_probs is None and prediction.linear_crf_probs is None
        # default output size: the input size
        default = model.predict(pixel_values, flip_tta=flip_tta).cluster_log_probs
        assert default.shape == (self.batch_size, num_clusters, *self.image_size)

    def test_predict_runs_in_eval_mode_and_restores_train_mode(self):
        model = self.ready_model()
        pixel_values = self.pixel_values()
        expected = model.predict(pixel_values).cluster_log_probs
        model.train()
        got = model.predict(pixel_values).cluster_log_probs
        assert model.training
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)  # dropout etc. off in predict

    # --------------------------------------------------------------------------------------------------------------
    # save / load
    def test_save_pretrained_from_pretrained_round_trip(self, tmp_path):
        model = self.ready_model()
        pixel_values = self.pixel_values()
        # running statistics (BatchNorm) are part of the state
        model.train()
        with torch.no_grad():
            model(pixel_values)
        model.eval()
        model.save_pretrained(tmp_path)
        reloaded = self.model_class.from_pretrained(tmp_path).eval()
        assert type(reloaded) is self.model_class
        self.assert_same_state(model, reloaded)
        self.assert_same_outputs(model, reloaded, pixel_values)
        self.check_reloaded(model, reloaded, pixel_values)

    def test_auto_classes_load_the_saved_folder(self, tmp_path):
        model = self.ready_model()
        model.save_pretrained(tmp_path)
        assert hf_useg  # importing the package registers the Auto classes
        config = AutoConfig.from_pretrained(tmp_path)
        assert type(config) is self.model_class.config_class
        assert config.model_type == self.model_class.config_class.model_type
        pixel_values = self.pixel_values(batch_size=1)
        for auto in (AutoModel, AutoModelForSemanticSegmentation):
            loaded = auto.from_pretrained(tmp_path).eval()
            assert type(loaded) is self.model_class, auto.__name__
            self.assert_same_state(model, loaded)
            self.assert_same_outputs(model, loaded, pixel_values)

    # --------------------------------------------------------------------------------------------------------------
    # pipeline
    def test_image_segmentation_pipeline_on_a_saved_folder(self, tmp_path):
        model = self.ready_model()
        num_clusters = self.num_clusters(model)
        prefix = f"{model.config.model_type}-segment-"
        model.set_cluster_names(np.arange(num_clusters), [f"{prefix}{i}" for i in range(num_clusters)])
        self.save(model, tmp_path)
        segmenter = pipeline("image-segmentation", model=str(tmp_path))
        assert type(segmenter.model) is self.model_class
        assert isinstance(segmenter.image_processor, UnsupervisedSegmentationImageProcessor)
        # non-square, not a multiple of the patch size: the processor resizes, the masks come back at the image size
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 51, 3), dtype=np.uint8))
        segments = check_pipeline_segments(segmenter, image, predict_equal=self.predict_matches_forward)
        assert segments and all(segment["label"].startswith(prefix) for segment in segments)

    # --------------------------------------------------------------------------------------------------------------
    # bad inputs
    def test_wrong_channel_count_is_named(self):
        model = self.ready_model()
        height, width = self.image_size
        for channels in (1, 4):
            with pytest.raises(ValueError, match=f"{channels} channels, expected 3"):
                model(torch.randn(1, channels, height, width))
            with pytest.raises(ValueError, match=f"{channels} channels, expected 3"):
                model.predict(torch.randn(1, channels, height, width))

    def test_bad_tensor_rank_and_dtype_are_named(self):
        model = self.ready_model()
        height, width = self.image_size
        with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
            model(torch.randn(3, height, width))
        with pytest.raises(TypeError, match="float"):
            model(torch.zeros(1, 3, height, width, dtype=torch.uint8))

    def test_size_not_divisible_by_the_patch_size_is_named(self):
        if self.odd_image_size is None:
            pytest.skip("this model accepts any input size")
        model = self.ready_model()
        patch = getattr(model, "patch_size", None) or model.backbone.patch_size
        with pytest.raises(ValueError, match=f"not divisible by the patch size {patch}"):
            model(torch.randn(1, 3, *self.odd_image_size))
        with pytest.raises(ValueError, match=f"not divisible by the patch size {patch}"):
            model.predict(torch.randn(1, 3, *self.odd_image_size))
