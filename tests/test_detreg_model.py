"""CutMixDetregConfig / CutMixDetregForPretraining (METHODS 5) on tiny configs: DETReg's defaults, forward and
backward, the frozen encoder and backbone, checkpoints, and the weight transfer to a fine-tuning detector."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_configs import tiny_detreg_config, tiny_resnet_config, tiny_vit_config
from transformers import AutoBackbone, DeformableDetrConfig, DeformableDetrForObjectDetection

from hf_useg import CutMixDetregConfig, CutMixDetregForPretraining
from hf_useg.models.detreg import init_deformable_detr_heads

CROP = 32  # tiny_detreg_config's object_crop_size


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: more threads only add overhead (and stall on a busy shared machine)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(boxes_per_image=(3, 2), size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(boxes_per_image), 3, size, size, generator=generator)
    labels = [
        {
            "class_labels": torch.zeros(n, dtype=torch.long),
            "boxes": torch.rand(n, 4, generator=generator) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1]),
        }
        for n in boxes_per_image
    ]
    crops = [torch.randn(n, 3, CROP, CROP, generator=generator) for n in boxes_per_image]
    return pixel_values, labels, crops


def _settings(config: dict) -> dict:
    """A config dict without what loading records (the folder, the weights' dtype)."""
    return {
        key: _settings(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in ("_name_or_path", "dtype")
    }


@pytest.fixture
def model() -> CutMixDetregForPretraining:
    torch.manual_seed(0)
    return CutMixDetregForPretraining(tiny_detreg_config())


# ----------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_detregs():
    config = CutMixDetregConfig()
    detector = config.detector_config
    assert isinstance(detector, DeformableDetrConfig)
    assert (detector.num_queries, detector.d_model, detector.encoder_layers, detector.decoder_layers) == (
        300,
        256,
        6,
        6,
    )
    assert (detector.with_box_refine, detector.two_stage, detector.num_labels) == (False, False, 1)
    backbone = detector.backbone_config
    assert backbone.model_type == "resnet" and list(backbone.hidden_sizes) == [256, 512, 1024, 2048]
    assert list(backbone.depths) == [3, 4, 6, 3] and list(backbone.out_features) == ["stage2", "stage3", "stage4"]
    assert (config.class_cost, config.bbox_cost, config.giou_cost) == (2, 5, 2)
    weights = (config.objectness_loss_weight, config.bbox_loss_weight, config.giou_loss_weight)
    assert weights == (2, 5, 2) and config.object_embedding_loss_weight == 1
    assert (config.focal_alpha, config.auxiliary_loss, config.freeze_backbone) == (0.25, True, True)
    assert (config.object_encoder_config, config.object_embedding_head_layers, config.object_crop_size) == (
        None,
        2,
        128,
    )
    assert config.box_source == "cutmix"

    reloaded = CutMixDetregConfig.from_dict(json.loads(config.to_json_string()))
    assert reloaded.to_dict() == config.to_dict()
    # a dict without a backbone gets DETReg's ResNet-50, not transformers' timm default
    assert (
        CutMixDetregConfig(detector_config={"num_queries": 100}).detector_config.backbone_config.model_type == "resnet"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"box_source": "edge_boxes"}, "box_source must be one of"),
        ({"detector_config": {"use_timm_backbone": True}}, "never a timm backbone"),
        ({"detector_config": {"backbone": "resnet50"}}, "never a timm backbone"),
        ({"detector_config": {"two_stage": True, "with_box_refine": True}}, "two_stage=True is not supported"),
        ({"bbox_loss_weight": -1}, "bbox_loss_weight must be >= 0"),
        ({"class_cost": 0, "bbox_cost": 0, "giou_cost": 0}, "can't all be 0"),
        ({"focal_alpha": 1.5}, "focal_alpha"),
        ({"object_encoder_stage": "stage9"}, "one of the encoder's stages"),
        ({"object_encoder_config": {"model_type": "vit"}, "object_encoder_stage": "stage2"}, "has no stages"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CutMixDetregConfig(**kwargs)


def test_config_keeps_the_callers_detector_config():
    detector = DeformableDetrConfig(backbone_config=tiny_resnet_config(out_features=["stage4"]), num_labels=5)
    config = CutMixDetregConfig(detector_config=detector)
    assert config.detector_config.num_labels == 1 and detector.num_labels == 5


# ----------------------------------------------------------------------------------------------------------------
# forward, backward, frozen parts


def test_forward_backward(model):
    pixel_values, labels, crops = _batch()
    model.train()
    out = model(pixel_values, labels=labels, box_crops=crops)
    assert out.logits.shape == (2, 10, 1) and out.pred_boxes.shape == (2, 10, 4)
    assert out.object_embeddings.shape == (2, 10, 24) and model.config.object_embedding_dim == 24
    assert [t.shape for t in out.target_object_embeddings] == [(3, 24), (2, 24)]
    assert len(out.auxiliary_outputs) == 1 and [len(q) for q, _ in out.matched_indices] == [3, 2]
    assert {
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "loss_ce_0",
        "loss_bbox_0",
        "loss_giou_0",
        "loss_object_embedding",
    } <= set(out.loss_dict)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    named = dict(model.named_parameters())
    assert named["object_embedding_head.layers.0.weight"].grad is not None
    assert named["detector.model.decoder.layers.0.encoder_attn.value_proj.weight"].grad is not None
    assert named["detector.bbox_embed.0.layers.0.weight"].grad is not None

    # without crops: detection losses only; without labels: predictions only
    no_crops = model(pixel_values, labels=labels)
    assert "loss_object_embedding" not in no_crops.loss_dict and no_crops.target_object_embeddings is None
    assert model(pixel_values).loss is None
    # no auxiliary loss: the last layer's terms only
    last_only = CutMixDetregForPretraining(tiny_detreg_config(auxiliary_loss=False))
    assert not any(name.endswith("_0") for name in last_only(pixel_values, labels=labels).loss_dict)
    assert isinstance(model(pixel_values, labels=labels, return_dict=False), tuple)


def test_mixed_precision(model):
    pixel_values, labels, crops = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(pixel_values, labels=labels, box_crops=crops)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def test_frozen_encoder_and_backbone(model):
    pixel_values, labels, crops = _batch()
    model.train()
    model(pixel_values, labels=labels, box_crops=crops).loss.backward()
    for name, parameter in model.object_encoder.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
    backbone = model.detector.model.backbone
    assert list(backbone.parameters())
    for name, parameter in backbone.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
    assert not any(module.training for module in model.object_encoder.modules())
    assert not any(module.training for module in backbone.modules())
    assert model.detector.model.encoder.training and model.object_embedding_head.training
    # a model that trains its backbone: transformers' default (stem and first stage frozen)
    unfrozen = CutMixDetregForPretraining(tiny_detreg_config(freeze_backbone=False)).train()
    trainable = [name for name, p in unfrozen.detector.model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("stages.0" not in name and "embedder" not in name for name in trainable)
    assert not any(p.requires_grad for p in unfrozen.object_encoder.parameters())


@pytest.mark.parametrize("with_box_refine", [False, True])
def test_per_layer_predictions_match_the_detector(with_box_refine):
    model = CutMixDetregForPretraining(tiny_detreg_config(detector_overrides={"with_box_refine": with_box_refine}))
    model.eval()
    pixel_values, _, _ = _batch()
    out = model(pixel_values)
    reference = model.detector(pixel_values)
    # two forward passes: floats compared with a tolerance (another CPU may pick another kernel)
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred_boxes, reference.pred_boxes, rtol=1e-5, atol=1e-6)


def test_deformable_detr_head_initialisation(model):
    assert torch.allclose(model.detector.class_embed[0].bias, torch.tensor([-4.59512]), atol=1e-5)  # p = 0.01
    last = model.detector.bbox_embed[0].layers[-1]
    assert last.weight.abs().sum() == 0 and last.bias.tolist() == [0.0, 0.0, -2.0, -2.0]


def test_object_encoder_is_the_detector_backbone(model):
    model.eval()
    crops = torch.randn(3, 3, CROP, CROP)

    def backbone_embedding():
        return model.detector.model.backbone.model(crops).feature_maps[-1].mean(dim=(2, 3))

    torch.testing.assert_close(
        model.embed_box_crops([crops[:1], crops[1:]]), [backbone_embedding()[:1], backbone_embedding()[1:]]
    )
    # new backbone weights (e.g. loaded by hand): the encoder follows after init_object_encoder_from_detector_backbone
    with torch.no_grad():
        for parameter in model.detector.model.backbone.parameters():
            parameter.mul_(1.5)
    assert not torch.allclose(torch.cat(model.embed_box_crops([crops])), backbone_embedding())
    model.init_object_encoder_from_detector_backbone()
    torch.testing.assert_close(torch.cat(model.embed_box_crops([crops])), backbone_embedding())


def test_load_backbone_weights(model, tmp_path):
    torch.manual_seed(1)
    pretrained = AutoBackbone.from_config(tiny_resnet_config(out_features=["stage4"]))
    pretrained.save_pretrained(tmp_path)
    model.load_backbone_weights(str(tmp_path))
    expected = pretrained.state_dict()
    for name, tensor in model.detector.model.backbone.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    for name, tensor in model.object_encoder.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_other_object_encoders():
    stage2 = CutMixDetregForPretraining(tiny_detreg_config(object_encoder_stage="stage2"))
    assert stage2.config.object_embedding_dim == 16  # the tiny ResNet's stage-2 width
    assert stage2.embed_box_crops([torch.randn(2, 3, CROP, CROP)])[0].shape == (2, 16)

    vit = CutMixDetregForPretraining(tiny_detreg_config(object_encoder_config=tiny_vit_config()))
    assert vit.config.object_embedding_dim == 32
    pixel_values, labels, crops = _batch()
    out = vit(pixel_values, labels=labels, box_crops=crops)
    assert out.object_embeddings.shape == (2, 10, 32) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="load_object_encoder_weights"):
        vit.init_object_encoder_from_detector_backbone()
    with pytest.raises(ValueError, match="object_embedding_dim=7"):
        CutMixDetregForPretraining(tiny_detreg_config(object_embedding_dim=7))


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and the weight transfer


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded, info = CutMixDetregForPretraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model.state_dict()
    assert set(reloaded.state_dict()) == set(expected)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert _settings(reloaded.config.to_dict()) == _settings(model.config.to_dict())
    # still frozen after loading
    assert not any(p.requires_grad for p in reloaded.detector.model.backbone.parameters())
    assert not any(p.requires_grad for p in reloaded.object_encoder.parameters())
    assert sum(p.requires_grad for p in reloaded.parameters()) == sum(p.requires_grad for p in model.parameters())
    model.eval(), reloaded.eval()
    pixel_values, labels, crops = _batch()
    torch.testing.assert_close(
        reloaded(pixel_values, labels=labels, box_crops=crops).loss,
        model(pixel_values, labels=labels, box_crops=crops).loss,
    )


def test_weight_transfer_to_a_finetuning_detector(model, tmp_path):
    with torch.no_grad():  # weights unlike any fresh initialisation
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = tmp_path / "detector"
    assert model.save_detector_for_finetuning(folder) == folder
    assert sorted(path.name for path in tmp_path.iterdir()) == ["detector"]  # atomic: no temporary folder left
    assert json.loads((folder / "config.json").read_text())["model_type"] == "deformable_detr"

    id2label = {0: "raccoon", 1: "dog", 2: "cat"}
    detector, info = DeformableDetrForObjectDetection.from_pretrained(
        folder, num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()}, output_loading_info=True
    )
    class_keys = {name for name in detector.state_dict() if name.startswith("class_embed.")}
    assert class_keys and set(info["missing_keys"]) == class_keys
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert detector.config.num_labels == 3 and detector.config.id2label == id2label
    assert detector.class_embed[0].weight.shape == (3, 32)

    pretrained = model.detector.state_dict()
    for name, tensor in detector.state_dict().items():
        if name not in class_keys:
            assert torch.equal(tensor, pretrained[name]), name
    # only the detector: neither the object-embedding head nor the encoder is written
    assert not any(name.startswith(("object_", "detector.")) for name in detector.state_dict())

    # Deformable DETR's prior-probability bias for the new class head; the pretrained box heads untouched
    init_deformable_detr_heads(detector, box_heads=False)
    assert torch.allclose(detector.class_embed[0].bias, torch.full((3,), -4.59512), atol=1e-5)
    assert torch.equal(detector.bbox_embed[0].layers[-1].bias, pretrained["bbox_embed.0.layers.2.bias"])


# ----------------------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_clear_errors(model):
    pixel_values, labels, crops = _batch()
    with pytest.raises(ValueError, match="2 box crops for 3 boxes"):
        model(pixel_values, labels=labels, box_crops=[crops[0][:2], crops[1]])
    with pytest.raises(ValueError, match=r"must be \[boxes, 3, 32, 32\]"):
        model(pixel_values, labels=labels, box_crops=[torch.randn(3, 3, 16, 16), crops[1]])
    with pytest.raises(ValueError, match="box_crops has 1 entries"):
        model(pixel_values, labels=labels, box_crops=crops[:1])
    with pytest.raises(ValueError, match="need the labels"):
        model(pixel_values, box_crops=crops)
    with pytest.raises(ValueError, match="labels has 1 entries"):
        model(pixel_values, labels=labels[:1])
    with pytest.raises(ValueError, match="normalised"):
        model(pixel_values, labels=[{"boxes": torch.tensor([[0.5, 0.5, 1.5, 0.2]])}, labels[1]])
    with pytest.raises(ValueError, match="objectness"):
        model(pixel_values, labels=[{**labels[0], "class_labels": torch.ones(3, dtype=torch.long)}, labels[1]])
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        model(pixel_values[:, :1])
    with pytest.raises(TypeError, match="list with one"):
        model(pixel_values, labels=labels, box_crops=torch.randn(2, 3, 3, CROP, CROP))
