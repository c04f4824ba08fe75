"""UnsupervisedSegmentationImageProcessor: the METHODS 0.2 protocol on hand-checkable examples."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, PreTrainedConfig
from transformers.image_processing_utils import BaseImageProcessor

from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor, resize_output_size

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalised(rgb_uint8: np.ndarray) -> np.ndarray:
    """What the protocol's ToTensor + Normalize give for an HWC uint8 array, as CHW."""
    return ((rgb_uint8.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)


def unnormalise(pixel_values: np.ndarray) -> np.ndarray:
    """CHW normalised floats back to HWC uint8."""
    return np.rint((pixel_values.transpose(1, 2, 0) * STD + MEAN) * 255).astype(np.int64)


@pytest.fixture()
def processor() -> UnsupervisedSegmentationImageProcessor:
    return UnsupervisedSegmentationImageProcessor()


def test_defaults_are_the_protocol(processor):
    assert isinstance(processor, BaseImageProcessor)
    assert processor.do_resize and processor.size.shortest_edge == 320 and processor.resample == 0  # NEAREST
    assert processor.do_center_crop and (processor.crop_size.height, processor.crop_size.width) == (320, 320)
    assert processor.do_rescale and processor.rescale_factor == 1 / 255
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(processor.image_std) == (0.229, 0.224, 0.225)
    assert processor.size_divisor == 8


def test_hand_checked_resize_and_crop(processor):
    # 6 rows x 4 columns; pixel (r, c) holds 10 * (4r + c) + channel
    ids = np.arange(24).reshape(6, 4)
    image = (10 * ids[..., None] + np.arange(3)).astype(np.uint8)
    # shortest edge 4 -> 2, so 6 -> int(2 * 6 / 4) = 3 rows; nearest keeps rows 1, 3, 5 and columns 1, 3;
    # a 2x2 center crop of 3 rows starts at row round(0.5) = 0
    batch = processor(image, segmentation_maps=ids, size={"shortest_edge": 2}, crop_size=2, return_tensors="pt")
    expected_ids = np.array([[5, 7], [13, 15]])
    assert batch["labels"].dtype == torch.int64
    np.testing.assert_array_equal(batch["labels"][0].numpy(), expected_ids)
    expected_pixels = normalised((10 * expected_ids[..., None] + np.arange(3)).astype(np.uint8))
    assert batch["pixel_values"].shape == (1, 3, 2, 2) and batch["pixel_values"].dtype == torch.float32
    np.testing.assert_allclose(batch["pixel_values"][0].numpy(), expected_pixels, atol=1e-6)


def test_center_crop_rounds_like_torchvision(processor):
    # torchvision's CenterCrop: top = int(round((H - h) / 2)) with Python's round (half to even)
    for rows, top in [(5, 2), (7, 2), (4, 1), (9, 4)]:  # (5-2)/2 = 1.5 -> 2 (floor would give 1)
        ids = np.arange(rows * 2).reshape(rows, 2)
        out = processor(ids.astype(np.uint8), segmentation_maps=ids, do_resize=False, crop_size=2)
        np.testing.assert_array_equal(out["labels"][0], ids[top : top + 2])
        np.testing.assert_array_equal(unnormalise(out["pixel_values"][0])[..., 0], ids[top : top + 2])


def test_crop_larger_than_image_pads(processor):
    ids = np.array([[1, 2, 3]])
    out = processor(np.full((1, 3, 3), 255, np.uint8), segmentation_maps=ids, do_resize=False, crop_size=3)
    np.testing.assert_array_equal(out["labels"][0], [[-1, -1, -1], [1, 2, 3], [-1, -1, -1]])
    pixels = out["pixel_values"][0]
    np.testing.assert_allclose(pixels[:, 0, 0], -MEAN / STD, atol=1e-6)  # zero padding, then normalised
    np.testing.assert_allclose(pixels[:, 1, 1], (1 - MEAN) / STD, atol=1e-6)


def test_default_protocol_on_a_camvid_sized_image(processor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    labels = image[..., 1].astype(np.int64) % 12
    out = processor(PIL.Image.fromarray(image), segmentation_maps=PIL.Image.fromarray(labels.astype(np.uint8)))
    assert resize_output_size(360, 480, {"shortest_edge": 320}) == (320, 426)
    resized = np.asarray(PIL.Image.fromarray(image).resize((426, 320), PIL.Image.NEAREST))
    left = round((426 - 320) / 2)
    np.testing.assert_allclose(out["pixel_values"][0], normalised(resized[:, left : left + 320]), atol=1e-6)
    np.testing.assert_array_equal(out["labels"][0], resized[:, left : left + 320, 1] % 12)


def test_labels_stay_aligned_with_pixels():
    processor = UnsupervisedSegmentationImageProcessor(size=20, crop_size=16)
    rng = np.random.default_rng(1)
    for height, width in [(37, 53), (61, 29), (100, 100), (23, 90)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for crop in (True, False):
            out = processor(image, segmentation_maps=image[..., 0].astype(np.int32) * 7, do_center_crop=crop)
            np.testing.assert_array_equal(out["labels"][0], unnormalise(out["pixel_values"][0])[..., 0] * 7)


def test_normalisation_values(processor):
    out = processor(
        np.array([[[255, 0, 51]]], dtype=np.uint8), do_resize=False, do_center_crop=False, size_divisor=None
    )
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]  # 2.2489, -2.0357, -0.9156
    np.testing.assert_allclose(out["pixel_values"][0][:, 0, 0], expected, atol=1e-6)
    raw = processor(
        np.array([[[255, 0, 51]]], dtype=np.uint8), do_resize=False, do_center_crop=False, do_normalize=False
    )
    np.testing.assert_allclose(raw["pixel_values"][0][:, 0, 0], [1.0, 0.0, 0.2], atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# input types and colour modes


def process_one(processor, image, **kwargs) -> np.ndarray:
    kwargs = {
        "do_resize": False,
        "do_center_crop": False,
        "size_divisor": None,
        "do_normalize": False,
        **kwargs,
    }
    return np.rint(processor(image, **kwargs)["pixel_values"][0] * 255).astype(np.int64)


def test_grey_rgba_and_palette_images(processor):
    grey = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = process_one(processor, PIL.Image.fromarray(grey, mode="L"))
    assert out.shape == (3, 2, 2) and all((out[c] == grey).all() for c in range(3))
    np.testing.assert_array_equal(process_one(processor, grey), out)  # 2-D numpy = grey

    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)
    # alpha is dropped, not composited: the transparent pixel keeps its colour
    expected = rgba[..., :3].transpose(2, 0, 1)
    np.testing.assert_array_equal(process_one(processor, PIL.Image.fromarray(rgba, mode="RGBA")), expected)
    np.testing.assert_array_equal(process_one(processor, rgba), expected)

    palette = PIL.Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    out = process_one(processor, palette)
    np.testing.assert_array_equal(out[:, 0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[:, 1, 0], [0, 255, 0])
    np.testing.assert_array_equal(out[:, 1, 1], [0, 0, 255])

    binary = PIL.Image.fromarray(np.array([[True, False]]))
    np.testing.assert_array_equal(process_one(processor, binary)[:, 0], [[255, 0]] * 3)


def test_numpy_torch_and_batch_inputs_agree(processor):
    image = np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    kwargs = {"size": 16, "crop_size": 16}
    reference = processor(PIL.Image.fromarray(image), **kwargs)["pixel_values"][0]
    np.testing.assert_array_equal(processor(image, **kwargs)["pixel_values"][0], reference)
    np.testing.assert_array_equal(
        processor(torch.from_numpy(image).permute(2, 0, 1), **kwargs)["pixel_values"][0], reference
    )
    np.testing.assert_array_equal(processor(image.astype(np.int64), **kwargs)["pixel_values"][0], reference)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    np.testing.assert_array_equal(
        processor(chw, input_data_format="channels_first", **kwargs)["pixel_values"][0], reference
    )
    batch = processor(np.stack([image, image[::-1]]), return_tensors="pt", **kwargs)["pixel_values"]
    assert batch.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(batch[0].numpy(), reference)
    floats = processor(image.astype(np.float32) / 255, do_rescale=False, **kwargs)["pixel_values"][0]
    np.testing.assert_allclose(floats, reference, atol=1e-5)


def test_unsupported_inputs_raise(processor):
    with pytest.raises(ValueError, match="unsupported PIL image mode 'I;16'"):
        processor(PIL.Image.fromarray(np.zeros((4, 4), dtype=np.uint16)))
    with pytest.raises(ValueError, match="unsupported PIL image mode 'F'"):
        processor(PIL.Image.fromarray(np.zeros((4, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="got 2 with shape"):
        processor(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="input_data_format='channels_first'"):
        processor(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="float images"):
        processor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="8-bit values 0-255"):
        processor(np.full((8, 8, 3), 300, dtype=np.int16))
    with pytest.raises(TypeError, match="unsupported image type"):
        processor([{"image": 1}])
    with pytest.raises(ValueError, match="do_pad is not supported"):
        processor(np.zeros((8, 8, 3), dtype=np.uint8), do_pad=True)


def test_segmentation_map_errors(processor):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="got 2 images but 1 segmentation maps"):
        processor([image, image], segmentation_maps=[np.zeros((8, 8), np.int64)])
    with pytest.raises(ValueError, match="segmentation map 0 is 8x6 but its image is 8x8"):
        processor(image, segmentation_maps=np.zeros((8, 6), np.int64))
    with pytest.raises(ValueError, match="PIL mode 'RGB' is not a single-channel class-id map"):
        processor(image, segmentation_maps=PIL.Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="integer class ids"):
        processor(image, segmentation_maps=np.zeros((8, 8), np.float32))
    # accepted forms: HW1 numpy, 1HW torch, 16-bit PIL
    for labels in (
        np.ones((8, 8, 1), np.int64),
        torch.ones(1, 8, 8, dtype=torch.long),
        PIL.Image.fromarray(np.ones((8, 8), np.uint16)),
    ):
        out = processor(image, segmentation_maps=labels, size=8, crop_size=8, return_tensors="pt")
        assert out["labels"].shape == (1, 8, 8) and (out["labels"] == 1).all()


# ------------------------------------------------------------------------------------------------------------
# whole image (no crop) for the pipeline


def test_without_crop_sizes_are_multiples_of_the_divisor():
    processor = UnsupervisedSegmentationImageProcessor(do_center_crop=False)
    # PIL size is (width, height): 500x333 -> shorter side 320, longer int(320 * 500 / 333) = 480
    assert processor(PIL.Image.new("RGB", (500, 333)))["pixel_values"][0].shape == (3, 320, 480)
    # 37x53 with size 20: 20 x int(20 * 53 / 37) = 20 x 28, rounded to the nearest multiples of 8: 24 x 32
    image = np.zeros((37, 53, 3), np.uint8)
    assert processor(image, size=20)["pixel_values"][0].shape == (3, 24, 32)
    assert processor(image, size=20, size_divisor=14)["pixel_values"][0].shape == (3, 14, 28)
    assert processor(image, size=20, size_divisor=None)["pixel_values"][0].shape == (3, 20, 28)
    assert processor(image, do_resize=False)["pixel_values"][0].shape == (3, 40, 56)
    # different sizes cannot become one tensor
    with pytest.raises(ValueError, match="cannot be stacked"):
        processor([image, np.zeros((64, 64, 3), np.uint8)], size=20, return_tensors="pt")
    assert len(processor([image, np.zeros((64, 64, 3), np.uint8)], size=20)["pixel_values"]) == 2


# ------------------------------------------------------------------------------------------------------------
# post-processing


def test_post_process_semantic_segmentation(processor):
    # [1, 2, 2, 2]: class 0 on the left column, class 1 on the right
    logits = torch.tensor([[[[3.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    maps = processor.post_process_semantic_segmentation(SimpleNamespace(logits=logits))
    assert len(maps) == 1 and maps[0].dtype == torch.int64
    np.testing.assert_array_equal(maps[0], [[0, 1], [0, 1]])
    # bilinear (align_corners=False) to 2x8: output column j samples source x = (j + 0.5) * 2 / 8 - 0.5
    # (clamped to [0, 1]); class 1 wins where t > 3 (1 - t), i.e. x > 0.75: j = 5 (x = 0.875), 6, 7
    maps = processor.post_process_semantic_segmentation({"logits": logits}, target_sizes=[(2, 8)])
    np.testing.assert_array_equal(maps[0], [[0, 0, 0, 0, 0, 1, 1, 1]] * 2)
    batch = torch.randn(3, 5, 4, 6)
    sizes = torch.tensor([[8, 12], [3, 3], [4, 6]])
    maps = processor.post_process_semantic_segmentation(SimpleNamespace(logits=batch), target_sizes=sizes)
    assert [tuple(m.shape) for m in maps] == [(8, 12), (3, 3), (4, 6)]
    expected = F.interpolate(batch[:1], size=(8, 12), mode="bilinear", align_corners=False).argmax(1)[0]
    assert torch.equal(maps[0], expected) and torch.equal(maps[2], batch[2].argmax(0))
    with pytest.raises(ValueError, match="got 1 target sizes for a batch of 3"):
        processor.post_process_semantic_segmentation(SimpleNamespace(logits=batch), target_sizes=[(2, 2)])
    with pytest.raises(ValueError, match=r"\[batch, classes, height, width\]"):
        processor.post_process_semantic_segmentation(SimpleNamespace(logits=batch[0]))


# ------------------------------------------------------------------------------------------------------------
# serialisation


class _ToySegmenterConfig(PreTrainedConfig):
    model_type = "hf_useg_test_image_processing_toy"


def test_save_and_load_round_trip(tmp_path):
    processor = UnsupervisedSegmentationImageProcessor(
        size={"shortest_edge": 224}, crop_size=224, do_center_crop=False, size_divisor=14
    )
    processor.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert stored["image_processor_type"] == "UnsupervisedSegmentationImageProcessor"
    assert stored["size"] == {"shortest_edge": 224} and stored["size_divisor"] == 14 and stored["resample"] == 0
    loaded = UnsupervisedSegmentationImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loaded(image)["pixel_values"][0], processor(image)["pixel_values"][0])
    assert processor(image)["pixel_values"][0].shape == (3, 224, 308)  # 224 x int(224 * 70 / 50) = 313 -> 308

    # once registered for a model type (hf_useg/__init__.py does so for each method), AutoImageProcessor
    # resolves the class from preprocessor_config.json's image_processor_type
    AutoImageProcessor.register(
        _ToySegmenterConfig, slow_image_processor_class=UnsupervisedSegmentationImageProcessor, exist_ok=True
    )
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto) is UnsupervisedSegmentationImageProcessor and auto.to_dict() == processor.to_dict()
