"""CutMix-DETReg training end to end on tiny data (METHODS 5): pretraining with each pseudo-box source through
`hf_useg.training.train`, the detector folder it exports, fine-tuning from it (only the class head new), the final
COCO / VOC07 evaluation, the saved folder in ``pipeline("object-detection")`` and its card, bit-exact resuming,
and the pieces the recipes are made of (per-key pretraining items, CutMix boxes, flips, the fine-tuning batches,
the weighted loss, `evaluate_detector`).

The data is a CSV detection folder in the raccoon layout, built in ``tmp_path``: 8 images of 64-96 px with one
coloured rectangle each (6 train, 2 test); the detector is `tiny_configs.TINY_DETREG_DETECTOR_KWARGS` on the tiny
ResNet, registered as a random backbone for the run.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from tiny_configs import TINY_DETREG_DETECTOR_KWARGS, TINY_RESNET_KWARGS, tiny_resnet_config, tiny_vit_config
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

import hf_useg.training.data
from hf_useg.augmentation import IMAGENET_MEAN, IMAGENET_STD
from hf_useg.data import load_detection_dataset
from hf_useg.detection_inference import detection_image_processor, evaluate_detector, pad_images
from hf_useg.hub.cards import generate_detection_model_card
from hf_useg.models.detreg.training_detreg import (
    CutMixDetregRecipe,
    CutMixDetregTrainingOptions,
    DetregPretrainingItems,
    _resized,
    detector_config_kwargs,
)
from hf_useg.models.detreg.training_finetuning import (
    DetectionFinetuningRecipe,
    _FinetuningBatches,
    weighted_detection_loss,
)
from hf_useg.training import BatchIndex, load_training_arguments, resolve_recipe_options, step_seed, train

TINY_BACKBONE = "random-resnet-detreg-test"
CSV_HEADER = ["filename", "width", "height", "class", "xmin", "ymin", "xmax", "ymax"]
# (width, height, class, xmin, ymin, xmax, ymax) of each image; the last two are the test split
OBJECTS = [
    (64, 80, "green", 8, 10, 40, 50),
    (96, 64, "red", 30, 8, 90, 40),
    (80, 80, "green", 20, 20, 60, 70),
    (72, 96, "red", 5, 40, 50, 90),
    (96, 72, "green", 50, 10, 92, 60),
    (64, 64, "red", 10, 12, 44, 48),
    (88, 64, "green", 12, 6, 60, 50),
    (64, 90, "red", 16, 30, 56, 80),
]
COLOURS = {"green": (40, 200, 60), "red": (210, 40, 30)}


@pytest.fixture(scope="module", autouse=True)
def _tiny_backbone_one_thread():
    """Register the tiny ResNet as a ``--backbone`` name; tiny models run fastest on one thread."""
    patch = pytest.MonkeyPatch()
    kwargs = {
        "model_type": "resnet",
        **copy.deepcopy(TINY_RESNET_KWARGS),
        "out_features": ["stage2", "stage3", "stage4"],
    }
    patch.setitem(hf_useg.training.data.RANDOM_BACKBONES, TINY_BACKBONE, kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


def make_detection_folder(root: Path) -> Path:
    """The raccoon CSV layout: ``images/`` (PNG and JPEG), ``train_labels.csv`` and ``test_labels.csv``."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"train": [], "test": []}
    for index, (width, height, name, x1, y1, x2, y2) in enumerate(OBJECTS):
        pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
        pixels[y1:y2, x1:x2] = COLOURS[name]
        file_name = f"photo-{index}.{'jpg' if index % 2 else 'png'}"
        Image.fromarray(pixels).save(root / "images" / file_name)
        rows["train" if index < 6 else "test"].append([file_name, width, height, name, x1, y1, x2, y2])
    for split, split_rows in rows.items():
        with (root / f"{split}_labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            writer.writerows(split_rows)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_detection_folder(tmp_path_factory.mktemp("detection-data"))


def pretrain_args(data: Path, output_dir: Path, **overrides):
    values = dict(
        method="cutmix_detreg",
        dataset=str(data),
        train_split="train",
        backbone=TINY_BACKBONE,
        model={"object_crop_size": 32, "detector_config": dict(TINY_DETREG_DETECTOR_KWARGS)},
        resolution=64,
        batch_size=2,
        max_steps=2,
        log_every=1,
        progress=False,
        output_dir=str(output_dir),
    )
    return load_training_arguments(None, **{**values, **overrides})


def finetune_args(data: Path, output_dir: Path, **overrides):
    values = dict(
        method="detection_finetune",
        dataset=str(data),
        train_split="train",
        val_split="test",
        backbone=TINY_BACKBONE,
        resolution=64,
        eval_resolution=64,
        batch_size=2,
        eval_batch_size=2,
        max_steps=3,
        log_every=1,
        progress=False,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    val_split = values.pop("val_split")
    args = load_training_arguments(None, **values, val_split=val_split)
    args.val_split = val_split  # (load_training_arguments reads None as "the default split"; None: no validation)
    return args


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """``box source -> (summary, output_dir)`` of a 2-step pretraining run, each run once per module."""
    runs: dict[str, tuple[dict, Path]] = {}

    def run(box_source: str) -> tuple[dict, Path]:
        if box_source not in runs:
            output_dir = tmp_path_factory.mktemp(f"pretrain-{box_source}")
            runs[box_source] = (train(pretrain_args(data, output_dir, box_source=box_source)), output_dir)
        return runs[box_source]

    return run


@pytest.fixture(scope="module")
def finetuned(data, pretrained, tmp_path_factory) -> tuple[dict, Path]:
    """A 3-step fine-tuning of the CutMix-pretrained detector, evaluated on the test split."""
    _, pretraining = pretrained("cutmix")
    output_dir = tmp_path_factory.mktemp("finetune")
    summary = train(finetune_args(data, output_dir, pretrained_detector=str(pretraining / "detector")))
    return summary, output_dir


def _has_cv2() -> bool:
    try:
        import cv2

        return hasattr(cv2, "ximgproc")
    except ImportError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# pretraining through the spine


@pytest.mark.parametrize(
    "box_source",
    [
        "cutmix",
        "random",
        pytest.param(
            "selective_search",
            marks=pytest.mark.skipif(not _has_cv2(), reason="opencv-contrib (the selective-search extra) is missing"),
        ),
    ],
)
def test_pretraining_with_each_box_source_writes_the_model_and_the_detector(pretrained, box_source):
    from hf_useg import CutMixDetregConfig

    summary, output_dir = pretrained(box_source)
    assert summary["box_source"] == box_source and summary["steps"] == 2 and summary["train_images"] == 6
    assert summary["detector_dir"] == str(output_dir / "detector")
    config = CutMixDetregConfig.from_pretrained(output_dir / "model")
    assert config.box_source == box_source and config.detector_config.d_model == 32
    assert (output_dir / "model" / "model.safetensors").is_file()
    detector = json.loads((output_dir / "detector" / "config.json").read_text())
    assert detector["model_type"] == "deformable_detr" and detector["num_queries"] == 10
    info = json.loads((output_dir / "detector" / "hf_useg_pretraining.json").read_text())
    assert info["box_source"] == box_source and info["method"] == "cutmix_detreg" and info["train_images"] == 6
    logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [1, 2]
    for line in logged:
        assert {"train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou"} <= set(line)
        assert all(math.isfinite(value) for key, value in line.items() if key != "step")


def test_the_pretraining_model_folder_reloads(pretrained, tmp_path):
    from hf_useg import CutMixDetregForPretraining

    _, output_dir = pretrained("cutmix")
    model, info = CutMixDetregForPretraining.from_pretrained(output_dir / "model", output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.box_source == "cutmix"
    model.save_pretrained(tmp_path)  # saved again, the same weights
    saved, again = (load_file(folder / "model.safetensors") for folder in (output_dir / "model", tmp_path))
    assert saved.keys() == again.keys() and all(torch.equal(saved[key], again[key]) for key in saved)


def test_cutmix_needs_two_images_even_after_max_train_images(data, tmp_path):
    with pytest.raises(ValueError, match="the training set needs at least 2 images"):
        train(pretrain_args(data, tmp_path, max_train_images=1, batch_size=1))


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning from the pretrained detector


def test_only_the_class_head_is_new_and_everything_else_transfers(data, pretrained, tmp_path):
    _, pretraining = pretrained("cutmix")
    detector = pretraining / "detector"
    _, info = DeformableDetrForObjectDetection.from_pretrained(detector, num_labels=2, output_loading_info=True)
    assert info["missing_keys"] and all(key.startswith("class_embed.") for key in info["missing_keys"])
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # zero fine-tuning steps: the saved model is the pretrained detector plus a new class head
    summary = train(finetune_args(data, tmp_path, pretrained_detector=str(detector), max_steps=0, val_split=None))
    assert summary["steps"] == 0 and "cutmix" in summary["pretraining"]
    pretrained_weights = load_file(detector / "model.safetensors")
    finetuned_weights = load_file(tmp_path / "model" / "model.safetensors")
    shared = set(pretrained_weights) & set(finetuned_weights)
    assert len(shared) == len(pretrained_weights)
    for key in shared:
        assert torch.equal(pretrained_weights[key], finetuned_weights[key]), key
    assert {key for key in finetuned_weights if key not in shared} == {"class_embed.0.weight", "class_embed.0.bias"}
    assert finetuned_weights["class_embed.0.weight"].shape == (2, 32)


def test_finetuning_evaluates_with_both_evaluators(finetuned):
    summary, output_dir = finetuned
    assert summary["num_classes"] == 2 and summary["steps"] == 3
    assert summary["pretraining"] == "CutMix-DETReg pretraining with cutmix pseudo-boxes"
    for evaluator in ("coco", "voc07"):
        for name in ("ap", "ap50", "ap75"):
            value = summary[f"{evaluator}_{name}"]
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (evaluator, name, value)
    protocol = summary["eval_protocol"]
    assert protocol["images"] == 2 and protocol["split"] == "test"  # the test split's size
    assert set(protocol["evaluators"]) == {"coco", "voc07"}
    saved = json.loads((output_dir / "model" / "training_summary.json").read_text())
    assert saved["coco_ap"] == summary["coco_ap"] and saved["voc07_ap50"] == summary["voc07_ap50"]
    results = json.loads((output_dir / "model" / "eval_results.json").read_text())
    assert results["images"] == 2 and results["voc07"]["ap"] == summary["voc07_ap"]


def test_the_finetuned_folder_works_in_the_object_detection_pipeline(finetuned, data):
    from transformers import pipeline

    _, output_dir = finetuned
    folder = output_dir / "model"
    model = DeformableDetrForObjectDetection.from_pretrained(folder)
    assert model.config.id2label == {0: "green", 1: "red"}
    detector = pipeline("object-detection", model=str(folder))
    image = Image.open(data / "images" / "photo-6.png")
    detections = detector(image, threshold=0.0)
    assert detections, "no detections at threshold 0"
    assert {"score", "label", "box"} <= set(detections[0])
    assert {detection["label"] for detection in detections} <= {"green", "red"}
    assert set(detections[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}


def test_the_card_is_an_object_detection_card_with_the_measured_ap(finetuned):
    summary, output_dir = finetuned
    card = ModelCard.load(output_dir / "model" / "README.md")
    assert card.data.pipeline_tag == "object-detection" and card.data.library_name == "transformers"
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    saved = json.loads((output_dir / "model" / "training_summary.json").read_text())
    expected = {
        f"{e}_{n}": round(100 * saved[f"{e}_{n}"], 2) for e in ("coco", "voc07") for n in ("ap", "ap50", "ap75")
    }
    assert metrics == expected
    assert "cutmix pseudo-boxes" in card.text


def test_the_card_states_ap_in_percent():
    summary = {
        "coco_ap": 0.3125,
        "coco_ap50": 0.625,
        "coco_ap75": 0.25,
        "voc07_ap": 0.5,
        "voc07_ap50": 0.75,
        "voc07_ap75": 0.4375,
        "eval_protocol": {"split": "test", "images": 40},
        "pretraining": "CutMix-DETReg pretraining with random pseudo-boxes",
        "dataset": "../shared/data/raccoon",
    }
    card = ModelCard(generate_detection_model_card(summary, class_names=["raccoon"]))
    names = {result.metric_type: (result.metric_value, result.metric_name) for result in card.data.eval_results}
    assert names["coco_ap"] == (31.25, "COCO AP (%)") and names["voc07_ap75"] == (43.75, "VOC07 (DETReg) AP75 (%)")
    assert "| COCO AP | 31.25 | 62.50 | 25.00 |" in card.text
    assert "| VOC07 AP (DETReg) | 50.00 | 75.00 | 43.75 |" in card.text
    assert "random pseudo-boxes" in card.text and "raccoon" in card.text


def test_the_no_pretraining_arm_trains_the_same_architecture_from_scratch(data, tmp_path):
    summary = train(
        finetune_args(data, tmp_path, model=dict(TINY_DETREG_DETECTOR_KWARGS), max_steps=2, val_split=None)
    )
    assert summary["pretraining"] is None and summary["steps"] == 2
    assert "from scratch" in summary["backbone"]
    config = DeformableDetrConfig.from_pretrained(tmp_path / "model")
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_labels) == (32, 1, 2, 2)
    assert config.id2label == {0: "green", 1: "red"}
    assert "with no detector pretraining" in (tmp_path / "model" / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# a pretrained_detector that is not one: a clear error


@pytest.fixture(scope="module")
def stego_folder(tmp_path_factory) -> Path:
    from hf_useg import StegoConfig, StegoForUnsupervisedSegmentation

    folder = tmp_path_factory.mktemp("stego")
    StegoForUnsupervisedSegmentation(
        StegoConfig(backbone_config=tiny_vit_config(), dim=8, num_classes=3)
    ).save_pretrained(folder)
    return folder


def test_a_foreign_pretrained_detector_is_a_clear_error(data, pretrained, stego_folder, tmp_path):
    _, pretraining = pretrained("cutmix")

    def finetune_from(folder, **overrides):
        output_dir = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        return train(finetune_args(data, output_dir, pretrained_detector=str(folder), max_steps=1, **overrides))

    with pytest.raises(ValueError, match=r"holds a 'stego' model, not a Deformable DETR detector"):
        finetune_from(stego_folder)
    # the pretraining model rather than its exported detector
    with pytest.raises(ValueError, match=r"holds a 'cutmix_detreg' model.*give the `detector` folder"):
        finetune_from(pretraining / "model")
    with pytest.raises(ValueError, match=r"is not a model folder \(no config.json\)"):
        finetune_from(tmp_path)
    # a Deformable DETR whose weights are of another architecture than its config says
    other = tmp_path / "other-architecture"
    shutil.copytree(pretraining / "detector", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "encoder_layers": 2}))
    with pytest.raises(ValueError, match=r"do not match its config.json \(missing \['model.encoder.layers.1"):
        finetune_from(other)
    with pytest.raises(ValueError, match="cannot change a pretrained detector's architecture"):
        finetune_from(pretraining / "detector", model={"d_model": 64})


def test_a_finetuned_detector_with_other_classes_is_a_valid_start(data, finetuned, tmp_path):
    """A fine-tuned detector's class head (2 classes) is of another size for 1 class: it is replaced, not an error."""
    _, output_dir = finetuned
    summary = train(
        finetune_args(
            data,
            tmp_path,
            pretrained_detector=str(output_dir / "model"),
            class_names=["green"],
            num_classes=1,
            max_steps=0,
            val_split=None,
        )
    )
    assert summary["num_classes"] == 1
    assert load_file(tmp_path / "model" / "model.safetensors")["class_embed.0.weight"].shape == (1, 32)


# ----------------------------------------------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize("method", ["cutmix_detreg", "detection_finetune"])
def test_a_resumed_run_equals_the_uninterrupted_run(data, pretrained, tmp_path, method):
    if method == "cutmix_detreg":

        def args(output_dir, **values):
            return pretrain_args(data, output_dir, save_every=2, **values)

        compared = ("model", "detector")
    else:
        detector = str(pretrained("cutmix")[1] / "detector")

        def args(output_dir, **values):
            return finetune_args(
                data, output_dir, pretrained_detector=detector, val_split=None, save_every=2, **values
            )

        compared = ("model",)
    train(args(tmp_path / "full", max_steps=4))
    train(args(tmp_path / "cut", max_steps=2))  # killed at its checkpoint of step 2 ...
    summary = train(args(tmp_path / "cut", max_steps=4, resume_from_checkpoint="latest"))  # ... and continued
    assert summary["steps"] == 4
    for folder in compared:
        expected, resumed = (load_file(tmp_path / run / folder / "model.safetensors") for run in ("full", "cut"))
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), (folder, key)
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_the_learning_rate_drops_after_lr_drop_epochs_with_max_steps_given(data):
    for recipe_class, method in (
        (CutMixDetregRecipe, "cutmix_detreg"),
        (DetectionFinetuningRecipe, "detection_finetune"),
    ):
        args = load_training_arguments(
            None, method=method, max_steps=20, batch_size=2, lr_drop_epochs=1, learning_rate=1.0
        )
        recipe = recipe_class(args, resolve_recipe_options(args))
        recipe.run = SimpleNamespace(train_set=list(range(6)), accelerator=SimpleNamespace(num_processes=1))
        optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "base_lr": 1.0}], lr=1.0)
        rates = []
        for step in range(5):  # 6 images in batches of 2: 3 steps per epoch
            recipe.before_optimizer_step(None, optimizer, step)
            rates.append(optimizer.param_groups[0]["lr"])
        assert rates == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1]), method


# ----------------------------------------------------------------------------------------------------------------
# the pretraining items


def _items(data: Path, **options) -> DetregPretrainingItems:
    train_set = load_detection_dataset(data, "train")
    values = {"resolution": 64, "batch_size": 2, **options}
    return DetregPretrainingItems(train_set, CutMixDetregTrainingOptions(**values), crop_size=32)


def _key(index: int, position: int = 0, step: int = 3) -> BatchIndex:
    return BatchIndex(index=index, step=step, seed=step_seed(0, step, 0), position=position, batch_size=2)


def _differ(first: torch.Tensor, second: torch.Tensor) -> bool:
    return first.shape != second.shape or not torch.equal(first, second)


def _assert_same(first: dict, second: dict) -> None:
    for name in ("pixel_values", "boxes", "crops"):
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("box_source", ["cutmix", "random"])
def test_an_item_is_a_function_of_its_key(data, box_source):
    items = _items(data, box_source=box_source)
    item = items[_key(1)]
    _assert_same(item, items[_key(1)])
    _assert_same(item, _items(data, box_source=box_source)[_key(1)])  # another DataLoader worker
    # another position in the batch, another step: other draws
    assert _differ(item["boxes"], items[_key(1, position=1)]["boxes"])
    assert _differ(item["boxes"], items[_key(1, step=4)]["boxes"])
    assert len(item["crops"]) == len(item["boxes"]) >= 1 and item["crops"].shape[1:] == (3, 32, 32)


def _pixels(normalised: torch.Tensor) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of an ImageNet-normalised ``[3, H, W]`` tensor."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (normalised * std + mean).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_cutmix_boxes_are_normalised_cxcywh_of_the_visible_pastes(data):
    items = _items(data, box_source="cutmix", horizontal_flip=0.0)
    for key in (_key(0), _key(3, position=1), _key(5, step=9)):
        item = items[key]
        height, width = item["pixel_values"].shape[1:]
        boxes = item["boxes"]
        assert boxes.dtype == torch.float32 and ((boxes >= 0) & (boxes <= 1)).all()
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1
        )
        assert torch.allclose(xyxy, xyxy.round(), atol=1e-3)  # CutMix boxes are whole-pixel rectangles ...
        assert (
            (xyxy[:, :2] >= -1e-3).all() and (xyxy[:, 2] <= width + 1e-3).all() and (xyxy[:, 3] <= height + 1e-3).all()
        )
        # ... and the last paste, which nothing covers, is exactly what the image shows inside the last box
        x1, y1, x2, y2 = (int(v) for v in xyxy[-1].round().tolist())
        shown = _resized(_pixels(item["pixel_values"])[y1:y2, x1:x2], 32)
        np.testing.assert_array_equal(shown, _pixels(item["crops"][-1]))


@pytest.mark.parametrize("box_source", ["cutmix", "random"])
def test_a_horizontal_flip_flips_image_boxes_and_crops_together(data, box_source):
    key = _key(2, position=1)
    plain = _items(data, box_source=box_source, horizontal_flip=0.0)[key]
    flipped = _items(data, box_source=box_source, horizontal_flip=1.0)[key]
    assert torch.equal(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    assert torch.equal(flipped["crops"], plain["crops"].flip(-1))
    expected = plain["boxes"].clone()
    expected[:, 0] = 1 - expected[:, 0]
    torch.testing.assert_close(flipped["boxes"], expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning batches, loss


def test_finetuning_boxes_are_relative_to_each_unpadded_image(data):
    """A batch pads images of different shapes; each image's boxes stay normalised to its own size (what the model
    predicts and the evaluation reads), also after a flip."""
    train_set = load_detection_dataset(data, "train")
    keyed = [(_key(0, position=0), train_set[0]), (_key(1, position=1), train_set[1])]  # 64x80 and 96x64
    for flip in (0.0, 1.0):
        batch = _FinetuningBatches(detection_image_processor(64), horizontal_flip=flip)(keyed)
        pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
        assert pixel_mask.shape == (2, *pixel_values.shape[2:])
        for row, (_, example) in enumerate(keyed):
            width, height, _, x1, y1, x2, y2 = OBJECTS[row]
            if flip:
                x1, x2 = width - x2, width - x1
            expected = torch.tensor(
                [[(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]]
            )
            torch.testing.assert_close(batch["labels"][row]["boxes"], expected, atol=1e-4, rtol=0)
            assert batch["labels"][row]["class_labels"].tolist() == [example["objects"]["category"][0]]
        assert (pixel_mask.sum(dim=(1, 2)) < pixel_mask[0].numel()).all()  # both are padded (80x64, 64x96)


def test_pad_images_pads_bottom_right_with_a_mask():
    pixel_values, pixel_mask = pad_images([torch.full((3, 2, 5), 2.0), torch.full((3, 4, 3), 3.0)])
    assert pixel_values.shape == (2, 3, 4, 5) and pixel_mask.dtype == torch.long
    assert pixel_mask[0].tolist() == [[1] * 5, [1] * 5, [0] * 5, [0] * 5]
    assert pixel_mask[1].tolist() == [[1, 1, 1, 0, 0]] * 4
    assert pixel_values[0, :, :2].eq(2).all() and pixel_values[0, :, 2:].eq(0).all()
    assert pixel_values[1, :, :, :3].eq(3).all() and pixel_values[1, :, :, 3:].eq(0).all()


def test_weighted_detection_loss_by_hand():
    terms = {
        "loss_ce": torch.tensor(0.5),
        "loss_ce_0": torch.tensor(0.25),
        "loss_bbox": torch.tensor(0.1),
        "loss_bbox_0": torch.tensor(0.2),
        "loss_giou": torch.tensor(0.3),
        "loss_giou_0": torch.tensor(0.4),
        "cardinality_error": torch.tensor(7.0),
        "cardinality_error_0": torch.tensor(5.0),
    }
    # 2 x (0.5 + 0.25) + 5 x (0.1 + 0.2) + 2 x (0.3 + 0.4)
    total = weighted_detection_loss(terms, {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    torch.testing.assert_close(total, torch.tensor(4.4))
    with pytest.raises(ValueError, match="none of the loss terms"):
        weighted_detection_loss({"cardinality_error": torch.tensor(1.0)}, {"loss_ce": 2.0})


def test_weighted_detection_loss_with_transformers_weights_is_transformers_total():
    torch.manual_seed(0)
    kwargs = detector_config_kwargs(tiny_resnet_config(), dict(TINY_DETREG_DETECTOR_KWARGS))
    model = DeformableDetrForObjectDetection(DeformableDetrConfig(**{**kwargs, "num_labels": 2}))
    labels = [
        {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    outputs = model(pixel_values=torch.randn(2, 3, 64, 64), labels=labels)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0"} <= set(outputs.loss_dict)  # the auxiliary decoder layer
    total = weighted_detection_loss(outputs.loss_dict, {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    torch.testing.assert_close(total, outputs.loss)


# ----------------------------------------------------------------------------------------------------------------
# evaluate_detector on predictions we choose


class _ChosenDetector(torch.nn.Module):
    """Predicts the boxes it is given for each image (normalised cxcywh of the unpadded image, a label and a
    score per query), recognising an image by the unpadded size its pixel mask shows."""

    def __init__(self, predictions: dict[tuple[int, int], list[tuple[list[float], int, float]]], num_labels: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # (evaluate_detector finds the device on it)
        self.predictions, self.num_labels = predictions, num_labels
        self.queries = max(len(value) for value in predictions.values())

    def forward(self, pixel_values, pixel_mask):
        from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrObjectDetectionOutput

        batch = len(pixel_values)
        logits = torch.full((batch, self.queries, self.num_labels), -30.0)
        boxes = torch.full((batch, self.queries, 4), 0.05)
        for row in range(batch):
            size = (int(pixel_mask[row].any(1).sum()), int(pixel_mask[row].any(0).sum()))
            for query, (box, label, score) in enumerate(self.predictions[size]):
                logits[row, query, label] = math.log(score / (1 - score))
                boxes[row, query] = torch.tensor(box)
        return DeformableDetrObjectDetectionOutput(logits=logits, pred_boxes=boxes)


def test_evaluate_detector_gives_the_ap_of_chosen_predictions(data):
    test = load_detection_dataset(data, "test")  # photo-6: one green box; photo-7: one red box
    processor = detection_image_processor(64)

    def processed_size(index):
        return tuple(
            processor(images=test[index]["image"].convert("RGB"), return_tensors="pt")["pixel_values"].shape[-2:]
        )

    def normalised(index, dx=0.0):
        width, height, _, x1, y1, x2, y2 = OBJECTS[6 + index]
        return [(x1 + x2) / 2 / width + dx, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]

    green, red = 0, 1
    chosen = {
        # photo-6: its green box exactly (score 0.9) and a red box where nothing is (0.95)
        processed_size(0): [(normalised(0), green, 0.9), ([0.85, 0.1, 0.1, 0.1], red, 0.95)],
        # photo-7: its red box exactly, with a lower score (0.5)
        processed_size(1): [(normalised(1), red, 0.5)],
    }
    assert len(chosen) == 2 and processed_size(0) != processed_size(1)  # one of the two is padded in the batch
    model = _ChosenDetector(chosen, num_labels=2)
    results = evaluate_detector(model, test, processor, batch_size=2, progress=False)
    # green: one exact detection, AP 1 at every IoU threshold; red: a false positive ranked above the exact
    # detection, precision 1/2 at recall 1, so AP 1/2 (11-point VOC07 and 101-point COCO alike); mean 3/4
    assert results["images"] == 2
    for evaluator in ("coco", "voc07"):
        assert results[evaluator] == pytest.approx({"ap": 0.75, "ap50": 0.75, "ap75": 0.75}, abs=1e-6), evaluator
    # the same detections with the green box shifted by half its width: IoU 1/3, a miss at every threshold
    chosen[processed_size(0)][0] = (normalised(0, dx=0.25), green, 0.9)
    results = evaluate_detector(model, test, processor, batch_size=1, progress=False)
    for evaluator in ("coco", "voc07"):
        assert results[evaluator] == pytest.approx({"ap": 0.25, "ap50": 0.25, "ap75": 0.25}, abs=1e-6), evaluator
    assert evaluate_detector(model, test, processor, max_images=1, progress=False)["images"] == 1


# ----------------------------------------------------------------------------------------------------------------
# the real raccoon photos


@pytest.mark.slow
def test_pretrain_and_finetune_on_the_raccoon_photos(shared_data, tmp_path):
    raccoon = shared_data / "raccoon"
    if not (raccoon / "train_labels.csv").is_file():
        pytest.skip(f"the raccoon photos are not at {raccoon}")
    common = dict(dataset=str(raccoon), resolution=128, max_steps=3, save_every=100)
    pretraining = train(pretrain_args(raccoon, tmp_path / "pretrain", **common))
    assert pretraining["train_images"] == 160 and pretraining["box_source"] == "cutmix"
    summary = train(
        finetune_args(
            raccoon,
            tmp_path / "finetune",
            pretrained_detector=pretraining["detector_dir"],
            eval_resolution=128,
            eval_batch_size=4,
            **common,
        )
    )
    assert summary["num_classes"] == 1 and summary["eval_protocol"]["images"] == 40
    assert all(0.0 <= summary[f"{e}_{n}"] <= 1.0 for e in ("coco", "voc07") for n in ("ap", "ap50", "ap75"))
    card = ModelCard.load(tmp_path / "finetune" / "model" / "README.md")
    assert card.data.pipeline_tag == "object-detection"
