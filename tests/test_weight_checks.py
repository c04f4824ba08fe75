"""Loaders refuse corrupt, incomplete or unsafe weights (issue 12).

* `load_checkpoint`'s static pickle scan follows the memo (PUT/MEMOIZE/GET) and refuses what it cannot resolve,
  before `torch.load` runs; a zip member whose bytes fail their CRC-32 is reported as corrupted;
* `from_pretrained` of every segmentation model refuses a ``model.safetensors`` that lacks weights or holds
  NaN/inf, naming them, unless the research overrides are passed.

The hostile pickles are written opcode by opcode, so the tests do not depend on how `pickle` happens to encode
an object.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_configs import tiny_resnet_config, tiny_vit_config
from transformers import AutoModel

import hf_useg  # noqa: F401  (registers the Auto classes)
from hf_useg import (
    DinoForUnsupervisedSegmentation,
    DinoSegmentationConfig,
    IicConfig,
    IicForUnsupervisedSegmentation,
    PicieConfig,
    PicieForUnsupervisedSegmentation,
    StegoConfig,
    StegoForUnsupervisedSegmentation,
)
from hf_useg.convert.checkpoint_io import find_checkpoint_globals, load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------------------------------------
# hand-written pickles
# ---------------------------------------------------------------------------------------------------------


def _unicode(text: str) -> bytes:
    """SHORT_BINUNICODE ``text``."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


PROTO4, MEMOIZE, POP, STACK_GLOBAL, TUPLE1, REDUCE, STOP = b"\x80\x04", b"\x94", b"0", b"\x93", b"\x85", b"R", b"."


def _binunicode(text: str) -> bytes:
    """BINUNICODE ``text`` (the string opcode torch's weights-only unpickler reads)."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _binget(index: int) -> bytes:
    return b"h" + bytes([index])


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


# 'os' and 'system' are memoized and popped, 'builtins' 'dict' are pushed and popped last (what a scan that
# looks at the latest strings sees), then STACK_GLOBAL takes 'os' 'system' back from the memo: os.system("...").
MEMO_TRICK = (
    PROTO4
    + _unicode("os")
    + MEMOIZE
    + _unicode("system")
    + MEMOIZE
    + POP
    + POP
    + _unicode("builtins")
    + _unicode("dict")
    + POP
    + POP
    + _binget(0)
    + _binget(1)
    + STACK_GLOBAL
    + _unicode("echo pwned")
    + TUPLE1
    + REDUCE
    + STOP
)


def _torch_archive(path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save zip whose ``data.pkl`` is ``pickle_bytes`` (the other records from a real save)."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info, pickle_bytes if info.filename.endswith("/data.pkl") else source.read(info))
    return path


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if `torch.load` is reached: the static scan alone must refuse."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a file the static scan should have refused")

    monkeypatch.setattr(torch, "load", refuse)


def test_memo_trick_resolves_to_os_system_and_is_refused_before_torch_load(tmp_path, no_torch_load):
    path = _torch_archive(tmp_path / "memo.pt", MEMO_TRICK)
    assert find_checkpoint_globals(path) == {"os.system"}
    with pytest.raises(
        ValueError, match=r"refusing to unpickle this checkpoint: it references \['os\.system'\]"
    ) as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value).replace(str(path), "<path>")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # the module name comes out of a call (builtins.str("os")), not a plain string
        (
            _global("builtins", "str") + _unicode("os") + TUPLE1 + REDUCE + _unicode("system") + STACK_GLOBAL,
            "STACK_GLOBAL names a global through values that are not plain strings",
        ),
        # a memoized call result is called again: its target is not a named global
        (
            _global("builtins", "dict") + b")" + REDUCE + MEMOIZE + POP + _binget(0) + b")" + REDUCE,
            "REDUCE calls something that is not a named global",
        ),
        # copyreg's extension registry: code 1, whatever is registered there
        (b"\x82\x01" + b")" + REDUCE, "EXT1 names a global through the copyreg extension registry"),
        # reading a memo slot never written
        (_binget(7) + b")" + REDUCE, "BINGET reads memo entry 7, which was never written"),
    ],
    ids=["computed-name", "memoized-call-result", "extension-registry", "unwritten-memo"],
)
def test_static_scan_refuses_what_it_cannot_resolve(tmp_path, no_torch_load, body, reason):
    path = _torch_archive(tmp_path / "hidden.pt", PROTO4 + body + STOP)
    with pytest.raises(
        ValueError, match=rf"refusing to unpickle .*hidden\.pt: {reason} \(pickle opcode at byte \d+\)"
    ):
        find_checkpoint_globals(path)
    with pytest.raises(ValueError, match=reason) as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value).replace(str(path), "<path>")


def test_memoized_names_of_allowed_classes_still_load(tmp_path):
    """A protocol-2 pickle that reuses a memoized global (``argparse.Namespace`` twice) resolves to that class."""
    namespace = _global("argparse", "Namespace") + b"q\x00"  # GLOBAL + BINPUT 0
    body = (
        b"\x80\x02}q\x01("  # PROTO 2, EMPTY_DICT, BINPUT 1, MARK
        + _binunicode("a")
        + namespace
        + b")R}"  # () REDUCE, EMPTY_DICT
        + _binunicode("lr")
        + struct.pack(">cd", b"G", 0.1)  # BINFLOAT
        + b"sb"  # SETITEM, BUILD
        + _binunicode("b")
        + _binget(0)
        + b")R"
        + b"u."  # SETITEMS, STOP
    )
    path = _torch_archive(tmp_path / "namespaces.pt", body)
    assert find_checkpoint_globals(path) == {"argparse.Namespace"}
    loaded = load_checkpoint(path)
    assert loaded["a"].lr == pytest.approx(0.1) and loaded["b"]._stand_in_for == "argparse.Namespace"


def test_unpickler_failures_never_suggest_unsafe_loading(tmp_path):
    """What `torch.load(weights_only=True)` refuses (here a copyreg reconstruction of a plain dict, which the
    static scan lets through) is reported without torch's advice to retry unsafely."""
    body = _global("copyreg", "_reconstructor") + _global("builtins", "dict") + _global("builtins", "object")
    # copyreg._reconstructor(dict, object, None): PROTO 2, the three globals, NONE, TUPLE3, REDUCE
    path = _torch_archive(tmp_path / "rebuild.pt", b"\x80\x02" + body + b"N\x87" + REDUCE + STOP)
    with pytest.raises(ValueError, match=r"cannot load .*rebuild\.pt safely") as err:
        load_checkpoint(path, extra_stand_ins=["builtins.object"])
    message = str(err.value).replace(str(path), "<path>")
    assert "weights_only" not in message and "trust" not in message


# ---------------------------------------------------------------------------------------------------------
# corrupted archives
# ---------------------------------------------------------------------------------------------------------


def _flip_member_byte(path: Path, member_suffix: str, offset: int) -> str:
    """Flip one bit inside the stored bytes of the zip member ending in ``member_suffix``; returns its name."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    assert info.compress_type == zipfile.ZIP_STORED  # torch.save stores members uncompressed
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + offset] ^= 0x10
    path.write_bytes(bytes(data))
    return info.filename


def test_bit_flipped_tensor_bytes_are_reported_as_corrupted(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.arange(64, dtype=torch.float32)}}, path)
    member = _flip_member_byte(path, "/data/0", offset=4 * 10 + 3)  # the sign/exponent byte of w[10]
    assert torch.load(path, weights_only=True)["state_dict"]["w"][10] != 10  # torch reads the damage silently
    with pytest.raises(ValueError, match=rf"weights\.pt is corrupted: archive member '{member}' does not match"):
        load_checkpoint(path)


def test_bit_flipped_pickle_is_reported_as_corrupted(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    member = _flip_member_byte(path, "/data.pkl", offset=5)
    with pytest.raises(ValueError, match=rf"is corrupted: archive member '{member}'"):
        find_checkpoint_globals(path)


# ---------------------------------------------------------------------------------------------------------
# from_pretrained: missing and non-finite weights, for every method's model
# ---------------------------------------------------------------------------------------------------------


def _stego():
    return StegoForUnsupervisedSegmentation(StegoConfig(backbone_config=tiny_vit_config(), dim=8, num_classes=3))


def _picie():
    return PicieForUnsupervisedSegmentation(
        PicieConfig(backbone_config=tiny_resnet_config(), fpn_dim=6, num_clusters=3)
    )


def _iic():
    return IicForUnsupervisedSegmentation(
        IicConfig(vgg_channels=[8, 8, 16, 16, 16, 16], num_classes=3, num_overclusters=7, displacement=2)
    )


def _dino_kmeans():
    model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=3))
    model.fit([torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))], progress=False)
    return model


def _dino_pretraining():
    from hf_useg import DinoForSelfSupervisedPretraining, DinoPretrainingConfig

    config = DinoPretrainingConfig(
        backbone_config=tiny_vit_config(), out_dim=16, head_hidden_dim=8, head_bottleneck_dim=4, local_crops_number=0
    )
    return DinoForSelfSupervisedPretraining(config)


MODELS = {
    "stego": _stego,
    "picie": _picie,
    "iic": _iic,
    "dino_kmeans": _dino_kmeans,
    "dino_pretraining": _dino_pretraining,
}


def _save(model, folder: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def _rewrite(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("method", sorted(MODELS))
def test_every_method_loads_its_own_saved_folder(tmp_path, method):
    torch.manual_seed(0)
    model = MODELS[method]()
    _save(model, tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


@pytest.mark.parametrize("method", sorted(MODELS))
def test_frozen_parts_stay_frozen_after_loading(tmp_path, method):
    # transformers 5.x loads every weight as a new parameter with requires_grad=True: a loaded STEGO trained its
    # "frozen" backbone (22 more trainable tensors) until `restore_frozen_parameters`
    model = MODELS[method]()
    _save(model, tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert {name for name, parameter in loaded.named_parameters() if parameter.requires_grad} == trainable


def test_legacy_dino_kmeans_fixture_still_loads():
    model = AutoModel.from_pretrained(FIXTURES / "dino_kmeans_v0.1.0")
    assert isinstance(model, DinoForUnsupervisedSegmentation) and model.is_fitted


@pytest.mark.parametrize(
    ("method", "key"),
    [
        ("stego", "cluster_probe.clusters"),
        ("dino_kmeans", "cluster_probe.clusters"),
        ("picie", "centroids"),
        ("iic", "head_b.sub_heads.0.weight"),
        ("dino_pretraining", "teacher_head.last_layer.weight_v"),
    ],
)
def test_missing_weights_are_an_error_naming_them(tmp_path, method, key):
    torch.manual_seed(0)
    model = MODELS[method]()
    weights = _save(model, tmp_path)
    del weights[key]
    _rewrite(tmp_path, weights)
    missing = rf"lacks weights of {type(model).__name__}: \['{re.escape(key)}'\]"
    with pytest.raises(ValueError, match=missing + r".*allow_incomplete_weights=True"):
        type(model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=missing):
        AutoModel.from_pretrained(tmp_path)  # what `hf-useg evaluate` and the Space call
    loaded, info = AutoModel.from_pretrained(tmp_path, allow_incomplete_weights=True, output_loading_info=True)
    assert isinstance(loaded, type(model)) and set(info["missing_keys"]) == {key}


def test_non_finite_weights_are_an_error_naming_them(tmp_path):
    model = _stego()
    weights = _save(model, tmp_path)
    weights["segmentation_head.linear.weight"][0, 0] = float("nan")
    weights["linear_probe.bias"][1] = float("inf")
    _rewrite(tmp_path, weights)
    with pytest.raises(
        ValueError,
        match=r"non-finite values \(NaN or inf\) in \['segmentation_head\.linear\.weight', 'linear_probe\.bias'\]"
        r".*allow_non_finite=True",
    ):
        StegoForUnsupervisedSegmentation.from_pretrained(tmp_path)
    loaded = StegoForUnsupervisedSegmentation.from_pretrained(tmp_path, allow_non_finite=True)
    assert torch.isnan(loaded.segmentation_head.linear.weight[0, 0])


def test_non_finite_buffer_is_an_error(tmp_path):
    model = _picie()
    weights = _save(model, tmp_path)
    weights["centroids"][0, 0] = float("-inf")
    _rewrite(tmp_path, weights)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in \['centroids'\]"):
        PicieForUnsupervisedSegmentation.from_pretrained(tmp_path)
