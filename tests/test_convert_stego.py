"""STEGO checkpoint conversion (METHODS 1.5), checked against the independent plain-torch STEGO in
tests/reference_stego.py on the same weights.

The checkpoints are synthetic but in the released format: random weights under the real key names and shapes
(``net.model.*`` DINO ViT, ``net.cluster1/2``, both cluster probes, ``linear_probe``, ``decoder``) and a
Lightning checkpoint dict whose ``hyper_parameters["cfg"]`` is pickled through classes that carry OmegaConf's
real module/class names (``omegaconf.dictconfig.DictConfig``, ``omegaconf.nodes.AnyNode``,
``omegaconf.base.ContainerMetadata``, ``typing.Any``, ...) and whose callback state is keyed by a
``pytorch_lightning`` class, as the releases are. Those fake modules exist only while the file is written:
the loader must read it without them (and without OmegaConf or Lightning installed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import re
import struct
import sys
import types
import typing
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from reference_dino_vit import ReferenceDinoViT
from reference_stego import ReferenceStego, reference_crf, stego_uint8_image

from hf_useg import StegoForUnsupervisedSegmentation, UnsupervisedSegmentationImageProcessor
from hf_useg.cli import main as cli_main
from hf_useg.convert import (
    convert_stego_checkpoint,
    convert_stego_state_dict,
    load_checkpoint,
    stego_config_from_checkpoint,
    stego_training_options_from_checkpoint,
)
from hf_useg.convert.checkpoint_io import CheckpointStandIn, find_checkpoint_globals

TOL = 1e-4
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# A STEGO training config as the COCO-Stuff release stores it (plus a ViT-S backbone for speed).
STEGO_CFG = {
    "output_root": "../",
    "pytorch_data_dir": "/datadrive/pytorch-data",
    "experiment_name": "exp1",
    "num_workers": 24,
    "max_steps": 7000,
    "batch_size": 32,
    "num_neighbors": 7,
    "dataset_name": "cocostuff27",
    "dir_dataset_name": None,
    "has_labels": False,
    "crop_type": "five",
    "crop_ratio": 0.5,
    "res": 224,
    "loader_crop_type": "center",
    "extra_clusters": 2,
    "use_true_labels": False,
    "model_type": "vit_small",
    "arch": "dino",
    "dino_feat_type": "feat",
    "projection_type": "nonlinear",
    "dino_patch_size": 8,
    "granularity": 1,
    "continuous": True,
    "dim": 70,
    "dropout": True,
    "zero_clamp": True,
    "lr": "5e-4",  # YAML 1.1 reads 5e-4 as a string
    "pretrained_weights": None,
    "stabalize": True,
    "stop_at_zero": True,
    "pointwise": True,
    "feature_samples": 11,
    "neg_samples": 5,
    "aug_alignment_weight": 0.0,
    "correspondence_weight": 1.0,
    "neg_inter_weight": 0.1538476246415498,
    "pos_inter_weight": 1,
    "pos_intra_weight": 0.1,
    "neg_inter_shift": 1,
    "pos_inter_shift": 0.2,
    "pos_intra_shift": 0.12,
    "val_freq": 100,
    "crf_samples": 1000,
    "color_space": "rgb",
    "reset_probe_steps": None,
    "n_images": 5,
    "some_list": [1, 2, 3],  # exercises ListConfig (released configs have no list)
}


# ---------------------------------------------------------------------------------------------------------
# fake OmegaConf / Lightning classes, pickled under the real names
# ---------------------------------------------------------------------------------------------------------


def _fake_library_modules() -> dict[str, types.ModuleType]:
    """Classes with OmegaConf's and Lightning's module/class names and pickled state (omegaconf 2.1: nodes and
    containers pickle their ``__dict__`` without ``_flags_cache``; metadata are dataclasses)."""
    modules = {
        name: types.ModuleType(name)
        for name in (
            "omegaconf",
            "omegaconf.base",
            "omegaconf.nodes",
            "omegaconf.dictconfig",
            "omegaconf.listconfig",
            "pytorch_lightning",
            "pytorch_lightning.callbacks",
            "pytorch_lightning.callbacks.model_checkpoint",
        )
    }

    @dataclasses.dataclass
    class Metadata:
        ref_type: typing.Any
        object_type: typing.Any
        optional: bool
        key: typing.Any
        flags: dict | None = None
        flags_root: bool = False
        resolver_cache: dict = dataclasses.field(default_factory=lambda: defaultdict(dict))

    @dataclasses.dataclass
    class ContainerMetadata(Metadata):
        key_type: typing.Any = None
        element_type: typing.Any = None

    class Node:
        def __getstate__(self):
            state = dict(self.__dict__)
            state.pop("_flags_cache", None)
            return state

    class Container(Node):
        pass

    class AnyNode(Node):
        pass

    class DictConfig(Container):
        pass

    class ListConfig(Container):
        pass

    class ModelCheckpoint:
        pass

    placements = {
        "omegaconf.base": (Metadata, ContainerMetadata, Node, Container),
        "omegaconf.nodes": (AnyNode,),
        "omegaconf.dictconfig": (DictConfig,),
        "omegaconf.listconfig": (ListConfig,),
        "pytorch_lightning.callbacks.model_checkpoint": (ModelCheckpoint,),
    }
    for module_name, classes in placements.items():
        for cls in classes:
            cls.__module__ = module_name
            cls.__qualname__ = cls.__name__
            setattr(modules[module_name], cls.__name__, cls)
    return modules


def _omegaconf(modules, value, parent=None, key=None):
    """Wrap a plain value the way ``OmegaConf.create`` does (containers of ``AnyNode``s with parent links)."""
    base, nodes = modules["omegaconf.base"], modules["omegaconf.nodes"]
    if isinstance(value, (dict, list)):
        cls = modules["omegaconf.dictconfig"].DictConfig if isinstance(value, dict) else None
        cls = cls or modules["omegaconf.listconfig"].ListConfig
        node = cls()
        node._metadata = base.ContainerMetadata(
            ref_type=typing.Any,
            object_type=dict if isinstance(value, dict) else list,
            optional=True,
            key=key,
            flags={},
            key_type=typing.Any if isinstance(value, dict) else int,
            element_type=typing.Any if isinstance(value, dict) else typing.Dict[str, typing.Any],  # noqa: UP006
        )
        node._parent = parent
        node._flags_cache = {"readonly": None}
        items = value.items() if isinstance(value, dict) else enumerate(value)
        content = {k: _omegaconf(modules, v, node, k) for k, v in items}
        node._content = content if isinstance(value, dict) else list(content.values())
        return node
    node = nodes.AnyNode()
    node._metadata = base.Metadata(ref_type=typing.Any, object_type=None, optional=True, key=key, flags={})
    node._parent = parent
    node._val = value
    node._flags_cache = None
    return node


def _lightning_checkpoint(state_dict, cfg, n_classes, modules=None):
    """A checkpoint dict laid out like PyTorch Lightning 1.4's ``dump_checkpoint`` for STEGO's module."""
    hparams_cfg = _omegaconf(modules, cfg) if modules is not None else cfg
    callbacks = {}
    if modules is not None:
        model_checkpoint = modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint
        callbacks[model_checkpoint] = {
            "monitor": "test/cluster/mIoU",
            "best_model_score": torch.tensor(0.282),
            "best_model_path": "/checkpoints/cocostuff27/epoch=1-step=7000.ckpt",
            "current_score": torch.tensor(0.281),
            "dirpath": "/checkpoints/cocostuff27",
        }
    first = next(iter(state_dict.values()))
    return {
        "epoch": 1,
        "global_step": 7000,
        "pytorch-lightning_version": "1.4.9",
        "state_dict": OrderedDict(state_dict),
        "callbacks": callbacks,
        "optimizer_states": [{"state": {0: {"step": 7000, "exp_avg": torch.zeros_like(first)}}, "param_groups": []}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"n_classes": n_classes, "cfg": hparams_cfg},
    }


def save_with_fake_libraries(path: Path, build) -> None:
    """``torch.save(build(modules), path)`` while fake ``omegaconf``/``pytorch_lightning`` modules exist."""
    modules = _fake_library_modules()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        torch.save(build(modules), path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# ---------------------------------------------------------------------------------------------------------
# synthetic STEGO weights
# ---------------------------------------------------------------------------------------------------------


def stego_state_dict(
    *, embed_dim, depth, dim, n_classes, extra_clusters, seed, patch=8, nonlinear=True
) -> dict[str, torch.Tensor]:
    """Random weights under the key names and shapes of STEGO's LightningModule (DinoFeaturizer ``net``)."""
    vit = ReferenceDinoViT(
        img_size=224, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=embed_dim // 64
    ).randomize(seed, pos_std=0.5)
    sd = {f"net.model.{key}": value for key, value in vit.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)

    def rand(*shape, scale=None):
        fan_in = shape[1] if len(shape) > 1 else shape[0]
        return torch.randn(shape, generator=generator) * (scale or 1 / math.sqrt(fan_in))

    sd["net.cluster1.0.weight"] = rand(dim, embed_dim, 1, 1)
    sd["net.cluster1.0.bias"] = rand(dim, scale=0.1)
    if nonlinear:
        sd["net.cluster2.0.weight"] = rand(embed_dim, embed_dim, 1, 1)
        sd["net.cluster2.0.bias"] = rand(embed_dim, scale=0.1)
        sd["net.cluster2.2.weight"] = rand(dim, embed_dim, 1, 1)
        sd["net.cluster2.2.bias"] = rand(dim, scale=0.1)
    sd["train_cluster_probe.clusters"] = rand(n_classes, dim, scale=1.0)
    sd["cluster_probe.clusters"] = rand(n_classes + extra_clusters, dim, scale=1.0)
    sd["linear_probe.weight"] = rand(n_classes, dim, 1, 1)
    sd["linear_probe.bias"] = rand(n_classes, scale=0.1)
    sd["decoder.weight"] = rand(embed_dim, dim, 1, 1)
    sd["decoder.bias"] = rand(embed_dim, scale=0.1)
    return sd


def normalized_images(batch: int, height: int, width: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Smooth uint8 RGB images with edges, and their ImageNet-normalised tensors (float32)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(batch):
        channels = []
        for _ in range(3):
            a, b, c = rng.uniform(-0.2, 0.2, 3)
            field = 128 + 90 * np.sin(a * x + b * y + c * 10) + 40 * (x > rng.integers(width // 4, width))
            channels.append(field + rng.normal(0, 6, field.shape))
        images.append(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    images = np.stack(images)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return images, (tensor - MEAN) / STD


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are small: one intra-op thread is as fast on an idle machine and several times faster on
    a loaded one (thread oversubscription), which keeps this file well under its time budget."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small(tmp_path_factory, _one_thread):
    """A ViT-S/8 (depth 2) STEGO checkpoint written with fake OmegaConf/Lightning classes."""
    sd = stego_state_dict(embed_dim=384, depth=2, dim=70, n_classes=27, extra_clusters=2, seed=0)
    path = tmp_path_factory.mktemp("stego") / "cocostuff27_vit_small_test.ckpt"
    save_with_fake_libraries(path, lambda modules: _lightning_checkpoint(sd, STEGO_CFG, 27, modules))
    model = convert_stego_checkpoint(path)
    return {"path": path, "state_dict": sd, "model": model, "reference": ReferenceStego(sd)}


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------


def test_loader_reads_omegaconf_checkpoint_without_the_libraries(small):
    imported = {name: name in sys.modules for name in ("omegaconf", "pytorch_lightning")}
    found = find_checkpoint_globals(small["path"])
    assert {"omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode", "omegaconf.base.ContainerMetadata"} <= found
    assert {"typing.Any", "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"} <= found
    ckpt = load_checkpoint(small["path"])
    assert {name: name in sys.modules for name in imported} == imported  # the loader imported neither
    cfg = ckpt["hyper_parameters"]["cfg"]
    assert type(cfg) is dict and cfg == STEGO_CFG  # every value, the nested list and the Nones
    assert ckpt["hyper_parameters"]["n_classes"] == 27
    assert torch.equal(ckpt["state_dict"]["net.cluster1.0.weight"], small["state_dict"]["net.cluster1.0.weight"])
    (callback_class,) = ckpt["callbacks"]
    assert issubclass(callback_class, CheckpointStandIn)
    assert callback_class._stand_in_for == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert float(ckpt["callbacks"][callback_class]["best_model_score"]) == pytest.approx(0.282)


def test_loader_refuses_unknown_globals_without_running_them(tmp_path):
    """A pickled object of a module outside the allow-list is refused before unpickling; its code never runs,
    even though the module is importable while loading."""
    calls = []
    evil = types.ModuleType("evil_payload")

    class Payload:
        def __reduce__(self):
            return (evil.run, ("rm -rf /",))

    def run(command):
        calls.append(command)

    run.__module__, run.__qualname__ = evil.__name__, "run"
    evil.run = run
    sys.modules["evil_payload"] = evil
    try:
        path = tmp_path / "evil.ckpt"
        torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"cfg": Payload()}}, path)
        with pytest.raises(ValueError, match=r"refusing to unpickle.*evil_payload\.run"):
            load_checkpoint(path)
        with pytest.raises(ValueError, match=r"refusing to unpickle.*evil_payload\.run"):
            convert_stego_checkpoint(path)
        assert calls == []
    finally:
        sys.modules.pop("evil_payload", None)


# ---------------------------------------------------------------------------------------------------------
# config and architecture
# ---------------------------------------------------------------------------------------------------------


def test_config_from_checkpoint(small):
    config = small["model"].config
    vit = config.backbone_config
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads) == (384, 2, 6)
    assert vit.intermediate_size == 1536
    assert (vit.patch_size, vit.image_size, vit.layer_norm_eps, vit.qkv_bias) == (8, 224, 1e-6, True)
    assert config.pos_embed_interpolation == "dino"
    assert (config.dim, config.num_classes, config.extra_clusters, config.num_clusters) == (70, 27, 2, 29)
    assert config.projection_type == "nonlinear"
    assert config.stabilize is True and config.pointwise is True and config.zero_clamp is True  # from `stabalize`
    assert config.neg_inter_weight == 0.1538476246415498 and config.pos_inter_weight == 1.0
    assert (config.pos_intra_weight, config.neg_inter_shift, config.pos_inter_shift, config.pos_intra_shift) == (
        0.1,
        1.0,
        0.2,
        0.12,
    )
    assert (config.feature_samples, config.neg_samples) == (11, 5)
    # the training settings of the release are the recipe's, written beside the model
    options = stego_training_options_from_checkpoint(load_checkpoint(small["path"]))
    assert (options.num_neighbors, options.crop_ratio) == (7, 0.5)
    assert (options.five_crop, options.resolution, options.max_steps, options.batch_size) == (True, 224, 7000, 32)
    assert options.head_learning_rate == 5e-4 and options.val_every == 100
    assert not hasattr(config, "max_steps")
    assert config.dataset_name == "cocostuff27"
    assert config.backbone_name is None  # a 2-layer ViT is no DINO release
    assert config.id2label == {i: f"cluster_{i}" for i in range(29)}
    assert not small["model"].training


def test_vit_base_shapes_without_config_match_reference(tmp_path, caplog):
    """ViT-B-shaped weights (12 heads, 768 wide; depth 1 for speed) in a checkpoint whose cfg is a plain dict
    that contradicts the tensors: the architecture comes from the tensors, with a warning."""
    sd = stego_state_dict(embed_dim=768, depth=1, dim=90, n_classes=27, extra_clusters=0, seed=3)
    path = tmp_path / "cityscapes_vit_base_test.ckpt"
    cfg = {"dataset_name": "cityscapes", "dim": 100, "model_type": "vit_base", "dino_patch_size": 8}
    torch.save(_lightning_checkpoint(sd, cfg, 27), path)
    with caplog.at_level("WARNING", logger="hf_useg.convert.stego"):
        model = convert_stego_checkpoint(path)
    assert "dim=100" in caplog.text and "using the weights" in caplog.text
    config = model.config
    assert (config.backbone_config.hidden_size, config.backbone_config.num_attention_heads) == (768, 12)
    assert (config.dim, config.num_clusters, config.dataset_name) == (90, 27, "cityscapes27")
    reference = ReferenceStego(sd)
    _, x = normalized_images(1, 32, 48, seed=5)  # 4x6 patches: the 28x28 position grid is interpolated
    assert (model.compute_code(x) - reference.code(x)).abs().max() <= TOL
    prediction = model.predict(x)
    cluster, linear = reference.log_probs(x, (32, 48))
    assert (prediction.cluster_log_probs - cluster).abs().max() <= TOL
    assert (prediction.linear_log_probs - linear).abs().max() <= TOL


def test_twelve_layer_vit_base_gets_the_dino_backbone_name():
    sd = stego_state_dict(embed_dim=768, depth=1, dim=90, n_classes=27, extra_clusters=0, seed=3)
    for i in range(1, 12):  # blocks 1..11 share block 0's tensors: only the names and shapes matter here
        for key in [k for k in sd if k.startswith("net.model.blocks.0.")]:
            sd[key.replace("blocks.0.", f"blocks.{i}.")] = sd[key]
    config = stego_config_from_checkpoint({"state_dict": sd})
    assert config.backbone_config.num_hidden_layers == 12
    assert config.backbone_name == "facebook/dino-vitb8"
    assert config.dataset_name is None and config.stabilize is False  # no cfg: StegoConfig defaults


def test_linear_projection_from_a_bare_state_dict(small):
    """A bare state dict (no Lightning wrapper, no cfg) without ``net.cluster2``: a linear projection."""
    sd = {key: value for key, value in small["state_dict"].items() if not key.startswith("net.cluster2.")}
    model = convert_stego_checkpoint(sd)
    assert model.config.projection_type == "linear" and model.segmentation_head.nonlinear is None
    _, x = normalized_images(1, 64, 48, seed=2)
    assert (model.compute_code(x) - ReferenceStego(sd).code(x)).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------------------
# outputs equal the original model's
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (160, 224)])
def test_features_and_code_match_reference(small, size):
    _, x = normalized_images(1, *size, seed=sum(size))
    model, reference = small["model"], small["reference"]
    features = model.extract_features(x)
    assert features.shape == (1, 384, size[0] // 8, size[1] // 8)
    assert (features - reference.features(x)).abs().max() <= TOL
    code = model.compute_code(x)
    assert code.shape == (1, 70, size[0] // 8, size[1] // 8)
    assert (code - reference.code(x)).abs().max() <= TOL
    assert code.std() > 0.1  # not a degenerate comparison


def test_log_probs_after_flip_tta_and_upsampling_match_reference(small):
    _, x = normalized_images(2, 160, 224, seed=11)
    prediction = small["model"].predict(x, flip_tta=True)
    cluster, linear = small["reference"].log_probs(x, (160, 224))
    assert prediction.cluster_log_probs.shape == (2, 29, 160, 224)
    assert prediction.linear_log_probs.shape == (2, 27, 160, 224)
    assert (prediction.cluster_log_probs - cluster).abs().max() <= TOL
    assert (prediction.linear_log_probs - linear).abs().max() <= TOL
    # the flip TTA is really exercised: without it the outputs differ
    no_tta = small["model"].predict(x, flip_tta=False)
    assert (no_tta.cluster_log_probs - cluster).abs().max() > 100 * TOL


def test_crf_marginals_match_reference(small):
    """Dense-CRF marginals after flip TTA and upsampling, with the image rebuilt from the normalised tensor by
    STEGO's truncation. The cluster probe's marginals are compared end to end. The linear probe's confident
    logits make the mean-field iterations ill-conditioned (a 1e-7 relative change of the log-probabilities moves
    Q by up to ~7e-5 in pydensecrf's float32), so its marginals are compared given the same log-probabilities,
    which are themselves checked against the reference here, and end to end with that conditioning allowed for."""
    images, x = normalized_images(2, 48, 64, seed=21)
    truncated = np.stack([stego_uint8_image(item) for item in x])
    assert (truncated != images).any()  # STEGO's truncation changes some pixel values
    prediction = small["model"].predict(x, crf=True)
    cluster, linear = small["reference"].log_probs(x, (48, 64))
    assert (prediction.linear_log_probs - linear).abs().max() <= TOL
    for i in range(2):
        q_cluster = reference_crf(x[i], cluster[i])
        assert np.abs(prediction.cluster_crf_probs[i].numpy() - q_cluster).max() <= TOL
        q_linear_same_input = reference_crf(x[i], prediction.linear_log_probs[i])
        assert np.abs(prediction.linear_crf_probs[i].numpy() - q_linear_same_input).max() <= 1e-6
        q_linear = reference_crf(x[i], linear[i])
        assert np.abs(prediction.linear_crf_probs[i].numpy() - q_linear).max() <= 2e-3
    # the CRF changed the prediction somewhere, so the comparison is not of two copies of the input
    assert (prediction.cluster_crf_probs.argmax(1) != prediction.cluster_log_probs.argmax(1)).any()
    # and the image matters: with the original (untruncated) uint8 images the marginals differ
    original = small["model"].predict(x[:1], crf=True, images=images[:1])
    assert (original.cluster_crf_probs - prediction.cluster_crf_probs[:1]).abs().max() > 10 * TOL


# ---------------------------------------------------------------------------------------------------------
# model folder, CLI, labels
# ---------------------------------------------------------------------------------------------------------


def test_output_dir_round_trip(small, tmp_path):
    out = tmp_path / "stego-cocostuff27"
    model = convert_stego_checkpoint(small["path"], out)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "training_options.json"} <= {
        p.name for p in out.iterdir()
    }
    released = json.loads((out / "training_options.json").read_text())
    assert (released["max_steps"], released["batch_size"], released["five_crop"]) == (7000, 32, True)
    reloaded = StegoForUnsupervisedSegmentation.from_pretrained(out)
    _, x = normalized_images(1, 64, 96, seed=4)
    expected = model.predict(x)
    got = reloaded.predict(x)
    # two separately built models (oneDNN / BLAS may pick other kernels for the reloaded weights): a float tolerance
    torch.testing.assert_close(got.cluster_log_probs, expected.cluster_log_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.linear_log_probs, expected.linear_log_probs, rtol=1e-5, atol=1e-6)
    processor = UnsupervisedSegmentationImageProcessor.from_pretrained(out)
    assert processor.size["shortest_edge"] == 320 and not processor.do_center_crop and processor.size_divisor == 8
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "hf_useg"
    assert "stego" in card.data.tags
    assert "cocostuff27_vit_small_test.ckpt" in card.text
    assert "0: electronic" in card.text and "26: water" in card.text  # the linear probe's COCO-Stuff classes


def test_cli_convert_round_trip(small, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert cli_main(["convert", "stego", str(small["path"]), str(out)]) == 0
    reloaded = StegoForUnsupervisedSegmentation.from_pretrained(out)
    for name, value in small["model"].state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert str(out) in capsys.readouterr().out


def test_id2label(small):
    names = [f"segment {i}" for i in range(29)]
    model = convert_stego_checkpoint(small["path"], id2label=names)
    assert model.config.id2label[28] == "segment 28" and model.config.label2id["segment 3"] == 3
    with pytest.raises(ValueError, match="29 cluster-probe outputs"):
        convert_stego_checkpoint(small["path"], id2label=names[:27])


# ---------------------------------------------------------------------------------------------------------
# not a STEGO checkpoint
# ---------------------------------------------------------------------------------------------------------


def test_clear_errors_for_other_checkpoints(small, tmp_path):
    dino = {key[len("net.model.") :]: v for key, v in small["state_dict"].items() if key.startswith("net.model.")}
    torch.save(dino, tmp_path / "dino.pth")
    with pytest.raises(ValueError, match="not a STEGO checkpoint: found a bare DINO/timm ViT state dict"):
        convert_stego_checkpoint(tmp_path / "dino.pth")

    picie = {
        "epoch": 10,
        "args": __import__("argparse").Namespace(arch="resnet18", K_train=27, res=320),
        "state_dict": {"module.backbone.conv1.weight": torch.zeros(64, 3, 7, 7)},
        "classifier1_state_dict": {"module.weight": torch.zeros(27, 128, 1, 1)},
        "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(picie, tmp_path / "picie.pkl")
    assert load_checkpoint(tmp_path / "picie.pkl")["args"].K_train == 27  # argparse.Namespace via a stand-in
    with pytest.raises(ValueError, match="not a STEGO checkpoint: found a PiCIE checkpoint"):
        convert_stego_checkpoint(tmp_path / "picie.pkl")

    other = {"pytorch-lightning_version": "1.4.9", "state_dict": {"encoder.weight": torch.zeros(2)}}
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"Lightning checkpoint of another model \(state_dict keys: encoder.weight"):
        convert_stego_checkpoint(tmp_path / "other.ckpt")

    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        convert_stego_checkpoint(tmp_path / "notes.txt")
    with open(tmp_path / "plain.pkl", "wb") as handle:  # a bare pickle, not torch.save
        pickle.dump({"a": 1}, handle)
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        convert_stego_checkpoint(tmp_path / "plain.pkl")
    with pytest.raises(FileNotFoundError):
        convert_stego_checkpoint(tmp_path / "missing.ckpt")

    broken = copy.copy(small["state_dict"])
    broken["cluster_probe.clusters"] = broken["cluster_probe.clusters"][:20]  # fewer clusters than classes
    with pytest.raises(ValueError, match="20 rows, fewer than the 27 classes"):
        convert_stego_checkpoint({"state_dict": broken})
    unknown = dict(small["state_dict"], **{"net.cluster3.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown STEGO head weights.*net.cluster3.weight"):
        convert_stego_checkpoint(unknown)


# ---------------------------------------------------------------------------------------------------------
# incomplete, non-finite or damaged STEGO checkpoints
# ---------------------------------------------------------------------------------------------------------


def _tiny_stego_state_dict() -> dict[str, torch.Tensor]:
    return stego_state_dict(embed_dim=64, depth=2, dim=8, n_classes=3, extra_clusters=1, seed=3)


@pytest.mark.parametrize(
    "key",
    [
        "cluster_probe.clusters",
        "linear_probe.bias",
        "net.cluster1.0.bias",
        "net.cluster2.2.weight",
        "net.model.cls_token",
        "net.model.norm.bias",
        "net.model.blocks.1.attn.qkv.bias",
        "net.model.blocks.0.mlp.fc2.weight",
    ],
)
def test_stego_checkpoint_missing_one_key_names_it(key):
    sd = _tiny_stego_state_dict()
    del sd[key]
    incomplete = rf"incomplete STEGO checkpoint: missing \['{re.escape(key)}'\]"
    with pytest.raises(ValueError, match=incomplete):
        convert_stego_checkpoint({"pytorch-lightning_version": "1.4.9", "state_dict": sd})
    with pytest.raises(ValueError, match=incomplete):
        convert_stego_checkpoint(sd)  # a bare state dict of STEGO's LightningModule
    with pytest.raises(ValueError, match=incomplete):
        stego_config_from_checkpoint({"state_dict": sd})
    with pytest.raises(ValueError, match=rf"incomplete STEGO state dict: missing \['{re.escape(key)}'\]"):
        convert_stego_state_dict(sd)


def test_stego_checkpoint_file_missing_cluster_probe_is_not_called_another_model(tmp_path):
    sd = _tiny_stego_state_dict()
    del sd["cluster_probe.clusters"], sd["net.model.blocks.1.norm1.weight"]
    path = tmp_path / "partial.ckpt"
    save_with_fake_libraries(path, lambda modules: _lightning_checkpoint(sd, STEGO_CFG, 3, modules))
    with pytest.raises(ValueError) as err:
        convert_stego_checkpoint(path)
    assert "incomplete STEGO checkpoint: missing ['net.model.blocks.1.norm1.weight', 'cluster_probe.clusters']" in str(
        err.value
    )
    assert "another model" not in str(err.value)


def test_non_finite_stego_weights_are_refused_with_their_names():
    sd = _tiny_stego_state_dict()
    sd["net.cluster1.0.weight"][0, 0] = float("nan")
    sd["net.model.blocks.0.mlp.fc1.weight"][1, 2] = float("inf")
    sd["decoder.weight"][:] = float("nan")  # dropped at conversion: not checked
    with pytest.raises(
        ValueError,
        match=r"non-finite values \(NaN or inf\) in \['net.model.blocks.0.mlp.fc1.weight', 'net.cluster1.0.weight'\]"
        r".*allow_non_finite=True",
    ):
        convert_stego_checkpoint(dict(sd))
    model = convert_stego_checkpoint(dict(sd), allow_non_finite=True)
    assert torch.isnan(model.segmentation_head.linear.weight[0, 0])
    del sd["net.cluster1.0.weight"]  # an incomplete checkpoint is reported as such first
    with pytest.raises(ValueError, match=r"incomplete STEGO checkpoint: missing \['net.cluster1.0.weight'\]"):
        convert_stego_checkpoint(sd)


def test_bit_flipped_stego_checkpoint_is_reported_as_corrupted(tmp_path):
    sd = _tiny_stego_state_dict()
    path = tmp_path / "flipped.ckpt"
    save_with_fake_libraries(path, lambda modules: _lightning_checkpoint(sd, STEGO_CFG, 3, modules))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        tensors = [i for i in archive.infolist() if "/data/" in i.filename]
        info = max(tensors, key=lambda i: i.file_size)  # the largest tensor's bytes
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 101] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"flipped\.ckpt is corrupted: archive member '{re.escape(info.filename)}'"):
        convert_stego_checkpoint(path)


def test_cli_convert_of_a_bad_file_is_one_line_with_exit_status_2(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("not a checkpoint")
    assert cli_main(["convert", "stego", str(not_a_checkpoint), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hf-useg: ") and error.endswith(f"(convert stego {not_a_checkpoint})\n")
    assert len(error.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_convert_refuses_non_finite_weights_unless_allowed(tmp_path, capsys):
    sd = _tiny_stego_state_dict()
    sd["net.cluster1.0.weight"][0, 0] = float("nan")
    path = tmp_path / "diverged.ckpt"
    torch.save({"state_dict": sd}, path)
    assert cli_main(["convert", "stego", str(path), str(tmp_path / "refused")]) == 2
    assert "non-finite values (NaN or inf) in ['net.cluster1.0.weight']" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert cli_main(["convert", "stego", str(path), str(tmp_path / "kept"), "--allow-non-finite"]) == 0
    assert (tmp_path / "kept" / "model.safetensors").exists()
