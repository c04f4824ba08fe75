"""Safe loading of third-party training checkpoints (PyTorch Lightning + OmegaConf, argparse, ...).

Released checkpoints are pickles. Besides tensors they reference classes of the libraries that wrote them:
a STEGO Lightning checkpoint stores its training config as an OmegaConf ``DictConfig`` (classes in
``omegaconf.dictconfig``, ``omegaconf.nodes``, ``omegaconf.base``, with ``typing.Any`` inside), its callback
states keyed by ``pytorch_lightning`` classes; PiCIE's checkpoint stores an ``argparse.Namespace``. Unpickling
such a file with plain `pickle` would import those libraries and run whatever the file names.

[`load_checkpoint`] never does that. It first lists every global the pickle references (statically, without
running it), then loads with ``torch.load(weights_only=True)`` and a minimal allow-list in which each
referenced class of a known checkpoint-writing library is replaced by an inert stand-in: a class that only
records the arguments and state it is given and has no other behaviour. Any other global (``os.system``,
``builtins.eval``, an unknown module's class, ...) makes it raise a `ValueError` naming it, before anything
is unpickled. Neither OmegaConf nor Lightning needs to be installed. OmegaConf containers in the result are
then turned into plain ``dict``/``list`` values, so ``ckpt["hyper_parameters"]["cfg"]["dim"]`` works.

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


def _globals_in_pickle(stream: io.BufferedIOBase) -> set[str]:
    found = set()
    recent_strings: list[str] = []
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            found.add(_normalize_global(module, name))
        elif opcode.name == "STACK_GLOBAL" and len(recent_strings) >= 2:
            found.add(_normalize_global(recent_strings[-2], recent_strings[-1]))
        if isinstance(arg, str):
            recent_strings.append(arg)
        if opcode.name == "STOP":
            break
    return found


def find_checkpoint_globals(path: str | os.PathLike) -> set[str]:
    """Every global (``module.name``) the pickle of a ``torch.save`` file references, found by reading its
    opcodes (nothing is unpickled). Raises `ValueError` for a file that is not a ``torch.save`` checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    not_a_checkpoint = ValueError(
        f"{path} is not a PyTorch checkpoint (a torch.save / Lightning .ckpt file): it is neither a torch zip "
        "archive nor a pickle"
    )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            records = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not records:
                raise not_a_checkpoint
            # torch's writer names it "<archive>/data.pkl"; take the shortest match (not a nested one)
            data = archive.read(min(records, key=len))
        try:
            return _globals_in_pickle(io.BytesIO(data))
        except Exception as error:  # a corrupt pickle: genops raises ValueError/IndexError/...
            raise not_a_checkpoint from error
    found: set[str] = set()
    with open(path, "rb") as stream:
        try:
            for _ in range(_LEGACY_PICKLES):
                found |= _globals_in_pickle(stream)
        except Exception as error:
            raise not_a_checkpoint from error
    return found


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
        `ValueError` when the file is not a checkpoint or references a global outside the allow-list.

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
        raise ValueError(f"cannot load {os.fspath(path)} safely: {error}") from error
    except RuntimeError as error:  # e.g. a truncated zip archive
        raise ValueError(f"{os.fspath(path)} is not a readable PyTorch checkpoint: {error}") from error
    return to_plain(checkpoint) if isinstance(checkpoint, (Mapping, list, tuple)) else checkpoint
