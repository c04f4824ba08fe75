"""Safe loading of third-party training checkpoints (PyTorch Lightning + OmegaConf, argparse, ...).

Released checkpoints are pickles. Besides tensors they reference classes of the libraries that wrote them:
a STEGO Lightning checkpoint stores its training config as an OmegaConf ``DictConfig`` (classes in
``omegaconf.dictconfig``, ``omegaconf.nodes``, ``omegaconf.base``, with ``typing.Any`` inside), its callback
states keyed by ``pytorch_lightning`` classes; PiCIE's checkpoint stores an ``argparse.Namespace``. Unpickling
such a file with plain `pickle` would import those libraries and run whatever the file names.

[`load_checkpoint`] never does that. It first checks the CRC-32 of every member of a zip checkpoint (a damaged
file is reported as corrupted instead of loading wrong tensors) and lists every global the pickle references
(statically, following its stack and memo without running it; a global it cannot resolve, e.g. one named
through computed values, is refused), then loads with ``torch.load(weights_only=True)`` and a minimal
allow-list in which each referenced class of a known checkpoint-writing library is replaced by an inert
stand-in: a class that only records the arguments and state it is given and has no other behaviour. Any
other global (``os.system``, ``builtins.eval``, an unknown module's class, ...) makes it raise a `ValueError`
naming it, before anything is unpickled. Neither OmegaConf nor Lightning needs to be installed. OmegaConf
containers in the result are then turned into plain ``dict``/``list`` values, so
``ckpt["hyper_parameters"]["cfg"]["dim"]`` works.

Example:

```python
>>> from hf_useg.convert.checkpoint_io import load_checkpoint
>>> ckpt = load_checkpoint("cocostuff27_vit_base_5.ckpt")  # doctest: +SKIP
>>> ckpt["hyper_parameters"]["cfg"]["model_type"], ckpt["state_dict"]["net.cluster1.0.weight"].shape  # doctest: +SKIP
('vit_base', torch.Size([90, 768, 1, 1]))
```
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import pickletools
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["CheckpointStandIn", "find_checkpoint_globals", "load_checkpoint", "to_plain"]

# Modules whose classes may appear in a training checkpoint as metadata; they are replaced by inert
# stand-ins. numpy scalars/arrays (e.g. a logged metric) become stand-ins too: their values are not needed.
_STAND_IN_MODULES = (
    "omegaconf",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "typing",
    "argparse",
    "pathlib",
    "numpy",
)
# Plain builtins that pickles reference by name (e.g. OmegaConf's `object_type=dict`); constructing them runs
# no foreign code.
_SAFE_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "bytes")
}
# Globals `torch.load(weights_only=True)` itself allows (tensor rebuilders, dtypes, storages, ...).
_TORCH_HANDLED = ("collections.OrderedDict", "collections.Counter", "_codecs.encode")
# How many pickles precede the storage data in torch's legacy (non-zip) format: magic number, protocol
# version, system info, the object, the storage keys.
_LEGACY_PICKLES = 5


class CheckpointStandIn:
    """Inert placeholder for a class (or other global) referenced by a checkpoint.

    It records what unpickling hands it: ``_args`` (constructor arguments) and the pickled state as
    attributes (so an ``argparse.Namespace`` stand-in still has ``.lr``, an OmegaConf node ``._val``).
    ``_stand_in_for`` is the dotted name of the global it replaces.
    """

    _stand_in_for = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        instance = object.__new__(cls)
        instance.__dict__["_args"] = args
        return instance

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        fields = ", ".join(key for key in self.__dict__ if not key.startswith("__"))
        return f"<stand-in for {self._stand_in_for} ({fields})>"


_STAND_IN_CLASSES: dict[str, type[CheckpointStandIn]] = {}


def _stand_in_class(full_name: str) -> type[CheckpointStandIn]:
    if full_name not in _STAND_IN_CLASSES:
        name = full_name.rsplit(".", 1)[-1]
        _STAND_IN_CLASSES[full_name] = type(name, (CheckpointStandIn,), {"_stand_in_for": full_name})
    return _STAND_IN_CLASSES[full_name]


def _empty_dict(*args: Any) -> dict:
    # collections.defaultdict(factory) -> a plain dict (the weights-only unpickler only fills plain dicts)
    return {}


def _stand_in_getitem(container: Any, key: Any) -> CheckpointStandIn:
    # operator.getitem, used to pickle typing generics such as Dict[str, Any]
    return _stand_in_class("operator.getitem")(container, key)


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    # copyreg._reconstructor (protocol < 2 pickles of plain objects): only for stand-ins
    if not (isinstance(cls, type) and issubclass(cls, CheckpointStandIn)):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls.__new__(cls)


def _normalize_global(module: str, name: str) -> str:
    """Python-2 names mapped the way the unpickler maps them (``__builtin__`` -> ``builtins``, ...)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _UnresolvablePickle(ValueError):
    """The static scan met something it cannot follow (the message says what and where)."""


# Opcodes that push a string: STACK_GLOBAL reads the module and the name from two of them.
_STRING_OPCODES = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
}
# Opcodes that call (or instantiate) what lies on the stack: the callable must be a global the scan resolved.
_CALLING_OPCODES = {"REDUCE": 1, "NEWOBJ": 1, "NEWOBJ_EX": 2, "BUILD": 1}


def _globals_in_pickle(stream: io.BufferedIOBase) -> set[str]:
    """Follow one pickle's opcodes on a simulated stack and memo, without constructing anything.

    Every stack entry is ``("str", text)``, ``("global", "module.name")`` or None (any other object). Memo
    writes and reads (PUT/BINPUT/LONG_BINPUT/MEMOIZE, GET/BINGET/LONG_BINGET) keep what they store, so a
    STACK_GLOBAL fed through the memo is resolved like a direct one. Raises `_UnresolvablePickle` for a global
    built from anything but two plain strings, a call (REDUCE, NEWOBJ, OBJ) whose target is not a resolved
    global, a BUILD that would set attributes on a global, and extension-registry globals (EXT1/2/4): a
    ``torch.save`` file never needs them.
    """
    found: set[str] = set()
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def refuse(reason: str, position: int | None) -> _UnresolvablePickle:
        return _UnresolvablePickle(f"{reason} (pickle opcode at byte {position})")

    def pop() -> Any:
        if not stack:
            raise IndexError("pickle stack underflow")
        return stack.pop()

    def pop_mark() -> list[Any]:
        nonlocal stack
        items, stack = stack, metastack.pop()
        return items

    def is_kind(entry: Any, kind: str) -> bool:
        return isinstance(entry, tuple) and entry[0] == kind

    for opcode, arg, position in pickletools.genops(stream):
        name = opcode.name
        if name in _STRING_OPCODES:
            stack.append(("str", arg) if isinstance(arg, str) else None)
        elif name == "GLOBAL":
            module, attribute = arg.split(" ", 1)
            found.add(_normalize_global(module, attribute))
            stack.append(("global", _normalize_global(module, attribute)))
        elif name == "STACK_GLOBAL":
            attribute, module = pop(), pop()
            if not (is_kind(module, "str") and is_kind(attribute, "str")):
                raise refuse("STACK_GLOBAL names a global through values that are not plain strings", position)
            full_name = _normalize_global(module[1], attribute[1])
            found.add(full_name)
            stack.append(("global", full_name))
        elif name == "INST":
            module, attribute = arg.split(" ", 1)
            found.add(_normalize_global(module, attribute))
            pop_mark()
            stack.append(None)
        elif name == "OBJ":
            items = pop_mark()
            if not items or not is_kind(items[0], "global"):
                raise refuse("OBJ instantiates something that is not a named global", position)
            stack.append(None)
        elif name in _CALLING_OPCODES:
            for _ in range(_CALLING_OPCODES[name]):
                pop()
            target = pop()
            if name == "BUILD":
                if is_kind(target, "global"):
                    raise refuse(f"BUILD sets state on the global {target[1]}", position)
            elif not is_kind(target, "global"):
                raise refuse(f"{name} calls something that is not a named global", position)
            stack.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise refuse(f"{name} names a global through the copyreg extension registry", position)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not stack:
                raise IndexError("memo write from an empty stack")
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            if not stack:
                raise IndexError("memo write from an empty stack")
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise refuse(f"{name} reads memo entry {arg}, which was never written", position)
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(stack[-1] if stack else pop())
        elif name == "MARK":
            metastack.append(stack)
            stack = []
        elif name == "POP":
            if stack:
                stack.pop()
            else:
                pop_mark()
        elif name == "STOP":
            break
        else:
            before = opcode.stack_before
            if pickletools.markobject in before:
                pop_mark()
                for _ in range(before.index(pickletools.markobject)):
                    pop()
            else:
                for _ in before:
                    pop()
            stack.extend(None for _ in opcode.stack_after)
    return found


def _check_archive(path: str, archive: zipfile.ZipFile) -> None:
    """Read every member of a zip checkpoint, checking its CRC-32: torch.load does not, so a damaged file would
    load with wrong tensors."""
    for info in archive.infolist():
        try:
            with archive.open(info) as member:
                while member.read(1 << 22):
                    pass
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
            raise ValueError(
                f"{path} is corrupted: archive member {info.filename!r} does not match its CRC-32 checksum or cannot "
                f"be read ({error}); download or copy the file again"
            ) from error


def find_checkpoint_globals(path: str | os.PathLike) -> set[str]:
    """Every global (``module.name``) the pickle of a ``torch.save`` file references, found by reading its
    opcodes on a simulated stack and memo (nothing is unpickled).

    Raises `ValueError` for a file that is not a ``torch.save`` checkpoint, for a zip checkpoint whose members
    fail their CRC-32 check ("corrupted"), and for a pickle that names a global in a way the scan cannot
    resolve ("refusing to unpickle"), e.g. through computed values; such a file is never loaded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    not_a_checkpoint = ValueError(
        f"{path} is not a PyTorch checkpoint (a torch.save / Lightning .ckpt file): it is neither a torch zip "
        "archive nor a pickle"
    )
    if zipfile.is_zipfile(path):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as error:
            raise ValueError(f"{path} is corrupted: its zip directory cannot be read ({error})") from error
        with archive:
            _check_archive(path, archive)
            # torch's writer names it "<archive>/data.pkl"; scan every candidate so that the one torch reads is
            # among them
            records = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not records:
                raise not_a_checkpoint
            pickles = [archive.read(name) for name in records]
        found: set[str] = set()
        for data in pickles:
            try:
                found |= _globals_in_pickle(io.BytesIO(data))
            except _UnresolvablePickle as error:
                raise _refusal(path, error) from None
            except Exception as error:  # a corrupt pickle: genops raises ValueError/IndexError/...
                raise not_a_checkpoint from error
        return found
    found = set()
    with open(path, "rb") as stream:
        try:
            for _ in range(_LEGACY_PICKLES):
                found |= _globals_in_pickle(stream)
        except _UnresolvablePickle as error:
            raise _refusal(path, error) from None
        except Exception as error:
            raise not_a_checkpoint from error
    return found


def _refusal(path: str, error: _UnresolvablePickle) -> ValueError:
    return ValueError(
        f"refusing to unpickle {path}: {error}. A torch.save / Lightning checkpoint names its classes directly; "
        "this file hides what it would import or call, so it is not loaded"
    )


def _allow_list(names: Iterable[str], extra_stand_ins: Iterable[str]) -> list[tuple[Any, str]]:
    extra = set(extra_stand_ins)
    allowed, refused = [], []
    for full_name in sorted(names):
        module = full_name.rsplit(".", 1)[0]
        root = module.split(".", 1)[0]
        if root == "torch" or full_name in _TORCH_HANDLED:
            continue  # torch's weights-only unpickler decides (tensors, storages, dtypes)
        if full_name.startswith("builtins.") and full_name[len("builtins.") :] in _SAFE_BUILTINS:
            allowed.append((_SAFE_BUILTINS[full_name[len("builtins.") :]], full_name))
        elif full_name == "collections.defaultdict":
            allowed.append((_empty_dict, full_name))
        elif full_name in ("operator.getitem", "_operator.getitem"):
            allowed.append((_stand_in_getitem, full_name))
        elif full_name == "copyreg._reconstructor":
            allowed.append((_reconstructor, full_name))
        elif full_name.endswith(".AttributeDict") and root in ("pytorch_lightning", "lightning"):
            allowed.append((dict, full_name))  # Lightning's dict subclass for hyper-parameters
        elif root in _STAND_IN_MODULES or full_name in extra:
            allowed.append((_stand_in_class(full_name), full_name))
        else:
            refused.append(full_name)
    if refused:
        raise ValueError(
            f"refusing to unpickle this checkpoint: it references {refused}, which are neither tensors nor "
            f"metadata classes of {', '.join(_STAND_IN_MODULES)} (these are read through inert stand-ins). "
            "If you trust the file, pass extra_stand_ins=[...] with those names."
        )
    return allowed


def to_plain(value: Any) -> Any:
    """Turn OmegaConf containers (stand-ins) into plain ``dict``/``list`` values, recursively through dicts,
    lists and tuples; value nodes become their value. Anything else is returned unchanged."""
    return _to_plain(value, set())


def _to_plain(value: Any, active: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if id(value) in active:  # a reference cycle (e.g. a node's parent): leave it
        return value
    active.add(id(value))
    try:
        if isinstance(value, CheckpointStandIn) and value._stand_in_for.startswith("omegaconf."):
            if "_content" in value.__dict__:  # DictConfig / ListConfig
                return _to_plain(value.__dict__["_content"], active)
            if "_val" in value.__dict__:  # AnyNode, StringNode, IntegerNode, ...
                return _to_plain(value.__dict__["_val"], active)
            return value
        if isinstance(value, dict):
            return {_to_plain(key, active): _to_plain(item, active) for key, item in value.items()}
        if isinstance(value, list):
            return [_to_plain(item, active) for item in value]
        if isinstance(value, tuple):
            return tuple(_to_plain(item, active) for item in value)
        return value
    finally:
        active.discard(id(value))


def _unpickler_reason(error: Exception) -> str:
    """The reason of a `torch.load` failure without torch's advice to retry with unsafe loading (this loader
    exists so that no file is ever unpickled that way)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.split(" Please use `torch.serialization", 1)[0].split("\n\nCheck the documentation", 1)[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line]
    return " ".join(lines) or f"the weights-only unpickler refused the file ({type(error).__name__})"


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    extra_stand_ins: Iterable[str] = (),
) -> Any:
    """Load a ``torch.save`` / Lightning checkpoint without running foreign code (see the module docstring).

    Args:
        path: the checkpoint file.
        map_location: where tensors go (default CPU).
        extra_stand_ins: further globals (``"module.Class"``) to read through inert stand-ins, for a trusted
            file that references classes outside the built-in list.

    Returns:
        The unpickled object (for a Lightning checkpoint a dict with ``state_dict``, ``hyper_parameters``, ...),
        with OmegaConf containers turned into plain dicts/lists and other foreign objects as
        [`CheckpointStandIn`] instances.

    Raises:
        `ValueError` when the file is not a checkpoint, is corrupted (a zip member fails its CRC-32 check; the
        member is named), names a global the static scan cannot resolve, or references a global outside the
        allow-list.

    Example:

    ```python
    >>> ckpt = load_checkpoint("potsdam_test.ckpt")  # doctest: +SKIP
    >>> ckpt["hyper_parameters"]["n_classes"]  # doctest: +SKIP
    3
    ```
    """
    if not hasattr(torch.serialization, "safe_globals"):
        raise ImportError("load_checkpoint needs torch >= 2.5 (torch.serialization.safe_globals)")
    allowed = _allow_list(find_checkpoint_globals(path), extra_stand_ins)
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"cannot load {os.fspath(path)} safely: torch's weights-only unpickler stopped: {_unpickler_reason(error)}"
        ) from None
    except RuntimeError as error:  # e.g. a truncated zip archive
        raise ValueError(
            f"{os.fspath(path)} is not a readable PyTorch checkpoint: {_unpickler_reason(error)}"
        ) from None
    return to_plain(checkpoint) if isinstance(checkpoint, (Mapping, list, tuple)) else checkpoint
