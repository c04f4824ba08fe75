"""FeatureBackbone and the DINO-ViT converter, checked against the independent plain-torch DINO ViT in
tests/reference_dino_vit.py (METHODS 0.1 / 1.5)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from reference_dino_vit import ReferenceDinoViT
from safetensors.torch import save_file
from tiny_configs import tiny_dinov2_config, tiny_resnet_config, tiny_vit_config
from torch import nn
from transformers import (
    Dinov2WithRegistersConfig,
    DINOv3ViTConfig,
    ViTConfig,
    ViTModel,
)

from hf_useg.backbones import (
    BackboneFeatures,
    FeatureBackbone,
    dino_interpolate_pos_encoding,
    dino_vit_config,
    load_backbone_config,
)
from hf_useg.convert.dino_vit import (
    convert_dino_vit_state_dict,
    convert_vit_state_dict_to_dino,
    vit_config_from_dino_state_dict,
)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def reference_vit_config(**overrides) -> ViTConfig:
    """The shared tiny ViT shaped like the `TINY` reference: 2 layers, DINO's MLP ratio 4."""
    return tiny_vit_config(**{"num_hidden_layers": 2, "intermediate_size": 128, **overrides})


def backbone_from_reference(reference: ReferenceDinoViT, mode: str = "dino", **config_overrides) -> FeatureBackbone:
    state_dict = reference.state_dict()
    heads = reference.blocks[0].attn.num_heads
    config = vit_config_from_dino_state_dict(state_dict, num_attention_heads=heads, **config_overrides)
    backbone = FeatureBackbone(config, pos_embed_interpolation=mode).eval()
    backbone.model.load_state_dict(convert_dino_vit_state_dict(state_dict), strict=True)
    return backbone


@pytest.fixture(scope="module")
def tiny_reference() -> ReferenceDinoViT:
    return ReferenceDinoViT(**TINY).randomize(seed=0).eval()


@pytest.fixture(scope="module")
def tiny_backbone(tiny_reference) -> FeatureBackbone:
    return backbone_from_reference(tiny_reference, "dino")


# ------------------------------------------------------------------------------------------------------------
# features against the reference


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (24, 32), (16, 56), (64, 64)])
def test_dino_features_match_reference(tiny_reference, tiny_backbone, size):
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_reference.patch_features(pixels)
        out = tiny_backbone(pixels)
    assert isinstance(out, BackboneFeatures)
    assert out.feature_map.shape == (2, 32, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(out.feature_map, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cls_token, tiny_reference(pixels)[:, 0], atol=1e-5, rtol=0)


def test_transformers_interpolation_differs_off_native_size(tiny_reference):
    hf_mode = backbone_from_reference(tiny_reference, "transformers")
    with torch.no_grad():
        native = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(
            hf_mode(native).feature_map, tiny_reference.patch_features(native), atol=1e-5, rtol=0
        )
        pixels = torch.randn(1, 3, 48, 40)
        difference = (hf_mode(pixels).feature_map - tiny_reference.patch_features(pixels)).abs().max()
    assert difference > 1e-2  # the test above would catch a backbone that used HF's size=(h, w) resize


def test_dino_interpolation_formula():
    table = torch.randn(1, 1 + 4 * 4, 3, generator=torch.Generator().manual_seed(0))
    assert dino_interpolate_pos_encoding(table, 32, 32, patch_size=8) is table  # same grid: untouched
    out = dino_interpolate_pos_encoding(table, 48, 40, patch_size=8)
    assert out.shape == (1, 1 + 6 * 5, 3)
    torch.testing.assert_close(out[:, 0], table[:, 0])  # CLS entry is never resized
    grid = table[:, 1:].reshape(1, 4, 4, 3).permute(0, 3, 1, 2)
    by_scale = F.interpolate(grid, scale_factor=(6.1 / 4, 5.1 / 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], by_scale.permute(0, 2, 3, 1).reshape(1, 30, 3))
    by_size = F.interpolate(grid, size=(6, 5), mode="bicubic", align_corners=False)
    assert (by_size - by_scale).abs().max() > 1e-3
    # a constant table stays constant (bicubic weights sum to one)
    constant = torch.full((1, 17, 2), 0.25)
    torch.testing.assert_close(dino_interpolate_pos_encoding(constant, 80, 24, 8), torch.full((1, 31, 2), 0.25))
    with pytest.raises(ValueError, match="square grid"):
        dino_interpolate_pos_encoding(torch.randn(1, 1 + 12, 2), 48, 40, 8)


def test_vit_small_8_shaped_backbone_matches_reference():
    reference = ReferenceDinoViT(img_size=224, patch_size=8, embed_dim=384, depth=2, num_heads=6)
    reference = reference.randomize(seed=3, pos_std=0.1).eval()
    backbone = backbone_from_reference(reference, "auto")
    assert backbone.pos_embed_interpolation == "dino"
    assert backbone.num_attention_heads == 6 and backbone.patch_size == 8 and backbone.hidden_size == 384
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for size in [(224, 224), (320, 240)]:
            pixels = torch.randn(1, 3, *size, generator=generator)
            out = backbone(pixels).feature_map
            assert out.shape == (1, 384, size[0] // 8, size[1] // 8)
            torch.testing.assert_close(out, reference.patch_features(pixels), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# CLS attention


def test_cls_attention_matches_reference(tiny_reference, tiny_backbone):
    pixels = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = tiny_backbone(pixels, output_cls_attention=True)
        reference = tiny_reference.cls_attention(pixels)  # [B, heads, 1 + h*w], CLS key first
        without = tiny_backbone(pixels)
    assert out.cls_attention.shape == (2, 2, 6, 5)
    torch.testing.assert_close(out.cls_attention.flatten(2), reference[:, :, 1:], atol=1e-6, rtol=0)
    # the map leaves out only the CLS key: with it every head's weights sum to one
    totals = out.cls_attention.sum(dim=(2, 3)) + reference[:, :, 0]
    torch.testing.assert_close(totals, torch.ones(2, 2), atol=1e-5, rtol=0)
    assert (out.cls_attention.sum(dim=(2, 3)) < 1).all()
    # same features either way, and the attention implementation is restored afterwards
    torch.testing.assert_close(out.feature_map, without.feature_map, atol=1e-5, rtol=0)
    assert tiny_backbone.model.config._attn_implementation == "sdpa"
    assert without.cls_attention is None


# ------------------------------------------------------------------------------------------------------------
# modes, other families


def test_frozen_backbone_has_no_gradients_and_stays_in_eval():
    parent = nn.Module()
    parent.backbone = FeatureBackbone(reference_vit_config(hidden_dropout_prob=0.5), frozen=True)
    parent.head = nn.Linear(2, 2)
    parent.train()
    assert parent.head.training
    assert not parent.backbone.training and not any(m.training for m in parent.backbone.modules())
    assert not any(p.requires_grad for p in parent.backbone.parameters())
    pixels = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = parent.backbone(pixels)
    assert not out.feature_map.requires_grad
    torch.testing.assert_close(out.feature_map, parent.backbone(pixels).feature_map)  # dropout is off

    trainable = FeatureBackbone(reference_vit_config())
    trainable.train()
    assert trainable.training
    trainable(torch.randn(1, 3, 32, 32)).feature_map.sum().backward()
    assert trainable.model.layers[0].attention.q_proj.weight.grad is not None


def test_dinov2_backbone():
    config = tiny_dinov2_config(num_hidden_layers=2)
    backbone = FeatureBackbone(config).eval()
    assert backbone.pos_embed_interpolation == "transformers"
    pixels = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        out = backbone(pixels, output_cls_attention=True)
        tokens = backbone.model(pixels).last_hidden_state
    assert out.feature_map.shape == (2, 32, 6, 5)
    torch.testing.assert_close(out.feature_map.flatten(2).transpose(1, 2), tokens[:, 1:])
    torch.testing.assert_close(out.cls_token, tokens[:, 0])
    assert out.cls_attention.shape == (2, 2, 6, 5)
    assert ((out.cls_attention.sum(dim=(2, 3)) > 0.5) & (out.cls_attention.sum(dim=(2, 3)) < 1)).all()

    # the DINO formula is available for DINOv2 too (the release code's interpolate_offset=0.1)
    dino = FeatureBackbone(config, pos_embed_interpolation="dino").eval()
    dino.model.load_state_dict(backbone.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            dino(pixels[..., :32, :32]).feature_map, backbone(pixels[..., :32, :32]).feature_map
        )
        assert (dino(pixels).feature_map - out.feature_map).abs().max() > 1e-4


def test_register_tokens_are_dropped():
    config = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        num_register_tokens=4,
    )
    backbone = FeatureBackbone(config).eval()
    pixels = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        out = backbone(pixels, output_cls_attention=True)
        tokens = backbone.model(pixels).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 30
    torch.testing.assert_close(out.feature_map.flatten(2).transpose(1, 2), tokens[:, 5:])
    assert out.cls_attention.shape == (1, 2, 6, 5)
    with pytest.raises(ValueError, match="'dino' applies to"):
        FeatureBackbone(config, pos_embed_interpolation="dino")


def test_dinov3_backbone_shapes():
    config = DINOv3ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        num_register_tokens=2,
    )
    out = FeatureBackbone(config).eval()(torch.randn(1, 3, 48, 40), output_cls_attention=True)
    assert out.feature_map.shape == (1, 32, 6, 5) and out.cls_attention.shape == (1, 2, 6, 5)


def test_auto_backbone_resnet_uses_the_named_stage_or_the_last_one():
    config = tiny_resnet_config(out_features=["stage2", "stage3"])
    backbone = FeatureBackbone(config).eval()
    assert config.out_features == ["stage2", "stage3"]  # the caller's config is not modified
    assert backbone.model.out_features == ["stage4"]  # several stages named: the last stage
    assert backbone.patch_size == 32 and backbone.hidden_size == 24 and backbone.num_attention_heads is None
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = backbone(pixels)
        expected = backbone.model(pixels).feature_maps[-1]
    assert out.feature_map.shape == (2, 24, 2, 3)
    torch.testing.assert_close(out.feature_map, expected)
    assert out.cls_token is None and out.cls_attention is None
    with pytest.raises(ValueError, match="no CLS token"):
        backbone(pixels, output_cls_attention=True)
    with pytest.raises(ValueError, match="'dino' applies to"):
        FeatureBackbone(config, pos_embed_interpolation="dino")
    # exactly one stage named: that stage (stride 8 for stage2)
    stage2 = FeatureBackbone(tiny_resnet_config(out_features=["stage2"])).eval()
    assert stage2.model.out_features == ["stage2"]
    assert stage2.patch_size == 8 and stage2.hidden_size == 16
    with torch.no_grad():
        assert stage2(pixels).feature_map.shape == (2, 16, 8, 12)


def test_bad_inputs_raise_clear_errors(tiny_backbone):
    with pytest.raises(ValueError, match=r"image size 36x40 is not a multiple of the patch size 8"):
        tiny_backbone(torch.randn(1, 3, 36, 40))
    with pytest.raises(ValueError, match="must be 4-D"):
        tiny_backbone(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="1 channels, the backbone config expects 3"):
        tiny_backbone(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="float tensor"):
        tiny_backbone(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny_backbone([[0.0]])
    with pytest.raises(ValueError, match="pos_embed_interpolation must be one of"):
        FeatureBackbone(reference_vit_config(), pos_embed_interpolation="bilinear")
    with pytest.raises(ValueError, match="unsupported backbone config"):
        FeatureBackbone(__import__("transformers").BertConfig())


# ------------------------------------------------------------------------------------------------------------
# weights: names, save/load, from_pretrained


def test_parameter_names_and_state_dict_round_trip(tiny_backbone):
    parent = nn.Module()
    parent.backbone = tiny_backbone
    names = set(parent.state_dict())
    assert "backbone.model.embeddings.position_embeddings" in names
    assert "backbone.model.layers.1.attention.q_proj.weight" in names
    assert not any("pooler" in name for name in names)
    # the DINO interpolation does not change names: a plain ViTModel loads the weights and vice versa
    plain = ViTModel(tiny_backbone.config, add_pooling_layer=False)
    plain.load_state_dict(tiny_backbone.model.state_dict(), strict=True)
    copy = FeatureBackbone(tiny_backbone.config).eval()
    copy.load_state_dict(tiny_backbone.state_dict(), strict=True)
    pixels = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(copy(pixels).feature_map, tiny_backbone(pixels).feature_map)


def test_from_pretrained_local_folder_sets_dino_eps(tmp_path, tiny_reference, caplog):
    reference_backbone = backbone_from_reference(tiny_reference, "dino")
    stored = ViTModel(reference_vit_config(layer_norm_eps=1e-12), add_pooling_layer=False)
    stored.load_state_dict(reference_backbone.model.state_dict())
    stored.save_pretrained(tmp_path)

    with caplog.at_level(logging.WARNING):
        loaded = FeatureBackbone.from_pretrained(str(tmp_path), frozen=True)
    assert loaded.config.layer_norm_eps == 1e-6
    assert "layer_norm_eps=1e-12 replaced" in caplog.text
    assert loaded.frozen and loaded.pos_embed_interpolation == "dino"
    assert isinstance(loaded.model, ViTModel) and loaded.model.pooler is None
    pixels = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixels).feature_map, tiny_reference.patch_features(pixels), atol=1e-5, rtol=0
        )

    kept = FeatureBackbone.from_pretrained(str(tmp_path), layer_norm_eps=1e-12)
    assert kept.config.layer_norm_eps == 1e-12
    assert load_backbone_config(str(tmp_path)).layer_norm_eps == 1e-6
    assert load_backbone_config(str(tmp_path), layer_norm_eps=1e-5).layer_norm_eps == 1e-5


def test_from_pretrained_reads_transformers_4_weight_names(tmp_path):
    """Hub DINO checkpoints (facebook/dino-vits8, ...) were saved with transformers-4 names."""
    config = reference_vit_config()
    model = ViTModel(config, add_pooling_layer=False).eval()
    renames = [
        ("layers.", "encoder.layer."),
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ]
    legacy = {}
    for name, tensor in model.state_dict().items():
        for old, new in renames:
            name = name.replace(old, new)
        legacy[name] = tensor.clone()
    assert "encoder.layer.0.attention.attention.query.weight" in legacy
    config.save_pretrained(tmp_path)
    save_file(legacy, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    loaded = FeatureBackbone.from_pretrained(str(tmp_path)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixels).feature_map.flatten(2).transpose(1, 2), model(pixels).last_hidden_state[:, 1:]
        )


def test_from_pretrained_dinov2_and_resnet_folders(tmp_path):
    dinov2 = FeatureBackbone(tiny_dinov2_config()).eval()
    dinov2.model.save_pretrained(tmp_path / "dinov2")
    loaded = FeatureBackbone.from_pretrained(str(tmp_path / "dinov2")).eval()
    pixels = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).feature_map, dinov2(pixels).feature_map)

    resnet = FeatureBackbone(tiny_resnet_config(hidden_sizes=[8, 16], depths=[1, 1])).eval()
    resnet.model.save_pretrained(tmp_path / "resnet")
    loaded = FeatureBackbone.from_pretrained(str(tmp_path / "resnet")).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).feature_map, resnet(pixels).feature_map)
    assert loaded.patch_size == 8  # stem /4, stage1 /1, stage2 /2


def test_dino_vit_config_shapes():
    for arch, hidden, heads in [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)]:
        config = dino_vit_config(arch, patch_size=16)
        assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
            hidden,
            heads,
            4 * hidden,
        )
        assert config.num_hidden_layers == 12 and config.layer_norm_eps == 1e-6 and config.qkv_bias
        assert config.image_size == 224 and config.patch_size == 16 and config.hidden_act == "gelu"
    assert dino_vit_config(num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown DINO architecture 'vit_huge'"):
        dino_vit_config("vit_huge")


# ------------------------------------------------------------------------------------------------------------
# converter


def test_converter_splits_qkv_and_round_trips(tiny_reference):
    dino = tiny_reference.state_dict()
    hf = convert_dino_vit_state_dict(dino)
    assert set(hf) == set(ViTModel(reference_vit_config(), add_pooling_layer=False).state_dict())
    qkv_w, qkv_b = dino["blocks.1.attn.qkv.weight"], dino["blocks.1.attn.qkv.bias"]
    assert torch.equal(hf["layers.1.attention.q_proj.weight"], qkv_w[:32])
    assert torch.equal(hf["layers.1.attention.k_proj.weight"], qkv_w[32:64])
    assert torch.equal(hf["layers.1.attention.v_proj.weight"], qkv_w[64:])
    assert torch.equal(hf["layers.1.attention.v_proj.bias"], qkv_b[64:])
    assert torch.equal(hf["embeddings.position_embeddings"], dino["pos_embed"])
    assert torch.equal(hf["layernorm.weight"], dino["norm.weight"])
    assert hf["layers.0.attention.q_proj.weight"].data_ptr() != qkv_w.data_ptr()  # copies, not views

    back = convert_vit_state_dict_to_dino(hf)
    assert set(back) == set(dino)
    assert all(torch.equal(back[key], dino[key]) for key in dino)
    # and from a segmentation model's names
    prefixed = {f"backbone.model.{key}": value for key, value in hf.items()}
    prefixed["backbone.model.pooler.dense.weight"] = torch.zeros(2, 2)
    assert set(convert_vit_state_dict_to_dino(prefixed, prefix="backbone.model.")) == set(dino)


def test_converter_prefix_and_inferred_config():
    reference = ReferenceDinoViT(img_size=224, patch_size=8, embed_dim=128, depth=3, num_heads=2, qkv_bias=False)
    checkpoint = {f"net.model.{key}": value for key, value in reference.state_dict().items()}
    checkpoint["net.cluster1.0.weight"] = torch.zeros(70, 128, 1, 1)
    checkpoint["linear_probe.weight"] = torch.zeros(27, 70, 1, 1)
    config = vit_config_from_dino_state_dict(checkpoint, prefix="net.model.")
    assert config.hidden_size == 128 and config.num_attention_heads == 2  # hidden / 64
    assert (config.patch_size, config.image_size, config.num_hidden_layers) == (8, 224, 3)
    assert config.intermediate_size == 512 and config.num_channels == 3 and config.qkv_bias is False
    assert config.layer_norm_eps == 1e-6
    converted = convert_dino_vit_state_dict(checkpoint, prefix="net.model.")
    model = ViTModel(config, add_pooling_layer=False)
    model.load_state_dict(converted, strict=True)
    assert not any(key.startswith(("net.", "cluster", "linear")) for key in converted)


def test_converter_rejects_non_dino_state_dicts(tiny_reference):
    vit_names = ViTModel(reference_vit_config(), add_pooling_layer=False).state_dict()
    with pytest.raises(KeyError, match="not a DINO/timm ViT state dict: missing"):
        convert_dino_vit_state_dict(vit_names)
    with pytest.raises(KeyError, match="no key starts with prefix 'net.model.'"):
        convert_dino_vit_state_dict(tiny_reference.state_dict(), prefix="net.model.")
    extra = dict(tiny_reference.state_dict(), **{"head.weight": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match=r"not DINO ViT backbone weights.*head.weight"):
        convert_dino_vit_state_dict(extra)
    with pytest.raises(ValueError, match="not a multiple of 64"):
        vit_config_from_dino_state_dict(tiny_reference.state_dict())
    with pytest.raises(TypeError, match="mapping"):
        convert_dino_vit_state_dict([("cls_token", torch.zeros(1))])
    with pytest.raises(KeyError, match="not a ViTModel state dict"):
        convert_vit_state_dict_to_dino(tiny_reference.state_dict())


def test_cls_attention_is_thread_safe(tiny_backbone):
    """A served model answers several requests at once: concurrent attention and plain calls each get their own
    results (the eager-attention switch is serialised, the hook keeps only its thread's weights)."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [torch.randn(1 + i % 3, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    with torch.no_grad():
        expected = [tiny_backbone(x, output_cls_attention=True).cls_attention for x in inputs]

    def call(i):
        with torch.no_grad():
            if i % 2:
                return tiny_backbone(inputs[i]).feature_map.shape[0] == inputs[i].shape[0]
            return torch.allclose(tiny_backbone(inputs[i], output_cls_attention=True).cls_attention, expected[i])

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert all(pool.map(call, list(range(12)) * 4))
