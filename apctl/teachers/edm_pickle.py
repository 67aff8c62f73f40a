"""Read NVlabs/edm network pickles (`edm-*.pkl`, `network-snapshot-*.pkl`) without running them.

File format (checked against NVlabs/edm `torch_utils/persistence.py`, `training/training_loop.py`):

* The file is `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))` with
  Python's default protocol (4 since Python 3.8). `ema` is the network (EDMPrecond, VPPrecond,
  VEPrecond or iDDPMPrecond around a SongUNet or DhariwalUNet) in eval mode, on the CPU, with
  `requires_grad=False`. `loss_fn` (EDMLoss/VPLoss/VELoss) and `augment_pipe` (AugmentPipe or None)
  are persistent objects too, but not modules. `dataset_kwargs` is a plain dict.
* Every instance of a `@persistent_class` pickles as the call
  `torch_utils.persistence._reconstruct_persistent_obj(meta)`, with
  `meta = {'type': 'class', 'version': 6, 'module_src': <source of the defining module>,
  'class_name': <name>, 'state': <the instance __dict__>}`. Loading it normally exec's
  `module_src`; here it is only hashed (sha256 of its UTF-8 bytes).
* A module's state holds `_parameters`, `_buffers`, `_modules` (OrderedDicts in files written by
  torch ≤ 1.13, dicts later), `_non_persistent_buffers_set` (a set), hook OrderedDicts,
  `_init_args` / `_init_kwargs` (the constructor arguments, recorded by the persistence decorator
  for every persistent module) and plain attributes. numpy float64 scalars occur (e.g.
  `skip_scale=np.sqrt(0.5)` and `init_weight=np.sqrt(...)` in sub-modules' `_init_kwargs`).
* Parameters are `torch._utils._rebuild_parameter(tensor, requires_grad, OrderedDict())`, tensors
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`
  and storages `torch.storage._load_from_bytes(b)`, where `b` is a legacy (non-zip) `torch.save`
  image of that one storage. Stock children (`enc`/`dec`) are `torch.nn.ModuleDict`s, pickled with
  NEWOBJ + BUILD.

`read_edm_pickle` resolves exactly the globals in `edm_allowlist()`, every one mapped to a stub or a
checked wrapper (nothing from `torch_utils`/`dnnlib` is imported or needed), then walks `ema` into a
state_dict whose keys equal `ema.state_dict()`'s.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from apctl.errors import ApctlError
from apctl.safe_pickle import restricted_load

__all__ = [
    "EDMPickleContents",
    "PersistentObject",
    "ModuleContainer",
    "edm_allowlist",
    "parse_edm_pickle",
    "read_edm_pickle",
    "PERSISTENCE_RECONSTRUCTOR",
]

PERSISTENCE_RECONSTRUCTOR = ("torch_utils.persistence", "_reconstruct_persistent_obj")


@dataclass
class EDMPickleContents:
    """What an EDM pickle holds, as plain data.

    class_name:        the network's class (e.g. 'EDMPrecond').
    init_kwargs:       its constructor keyword arguments, JSON-ready (numpy scalars → Python numbers,
                       tuples → lists, EasyDict → dict).
    state_dict:        name → tensor, keys and values as `ema.state_dict()` would give them.
    module_src_sha256: class name → sha256 (hex) of the embedded module source, for every
                       persistent object in the file (network, sub-modules, loss, augment pipe).
    extras:            persistence version, the other top-level entries (loss_fn / augment_pipe
                       as {class_name, attributes}, dataset_kwargs), the top-level keys.
    init_args:         positional constructor arguments (EDM records `()`).
    """

    class_name: str
    init_kwargs: dict[str, Any]
    state_dict: dict[str, Any]
    module_src_sha256: dict[str, str]
    extras: dict[str, Any] = field(default_factory=dict)
    init_args: tuple = ()


class PersistentObject:
    """Stands in for one persistent object: its class name, its state and its source's hash."""

    __slots__ = ("class_name", "module_src_sha256", "state", "version")

    def __init__(self, class_name: str, module_src_sha256: str, state: dict, version: int):
        self.class_name = class_name
        self.module_src_sha256 = module_src_sha256
        self.state = state
        self.version = version

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r})"


class ModuleContainer:
    """Stands in for a stock torch container (ModuleDict / ModuleList / Sequential): keeps its state."""

    class_name = "Module"

    def __init__(self) -> None:
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ApctlError(f"EDM pickle: torch.nn.{self.class_name} has a malformed state")
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleContainer({self.class_name!r})"


class _ModuleDict(ModuleContainer):
    class_name = "ModuleDict"


class _ModuleList(ModuleContainer):
    class_name = "ModuleList"


class _Sequential(ModuleContainer):
    class_name = "Sequential"


# --- checked stand-ins for the callables a pickle may name ----------------------------------


class _Reconstructor:
    """`_reconstruct_persistent_obj(meta)` that never executes `meta['module_src']`."""

    def __init__(self) -> None:
        self.hashes: dict[str, str] = {}
        self._by_src: dict[str, str] = {}
        self.versions: set = set()

    def __call__(self, meta: Any) -> PersistentObject:
        if not isinstance(meta, dict):
            raise ApctlError("EDM pickle: a persistent object's metadata is not a dict")
        missing = [k for k in ("type", "module_src", "class_name", "state") if k not in meta]
        if missing:
            raise ApctlError(f"EDM pickle: a persistent object's metadata lacks {', '.join(missing)}")
        if meta["type"] != "class":
            raise ApctlError(f"EDM pickle: unsupported persistent object type {meta['type']!r}")
        src, class_name, state = meta["module_src"], meta["class_name"], meta["state"]
        if not isinstance(src, str) or not isinstance(class_name, str):
            raise ApctlError("EDM pickle: module_src and class_name must be strings")
        if state is None:
            state = {}
        if not isinstance(state, dict):
            raise ApctlError(f"EDM pickle: the state of {class_name} is not a dict")
        digest = self._by_src.get(src)
        if digest is None:
            digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
            self._by_src[src] = digest
        key, n = class_name, 2
        while self.hashes.get(key, digest) != digest:  # same class name, different source
            key, n = f"{class_name}#{n}", n + 1
        self.hashes[key] = digest
        version = meta.get("version")
        self.versions.add(version)
        return PersistentObject(class_name, digest, state, version)


def _load_storage(data: Any):
    """`torch.storage._load_from_bytes`, through torch's own weights-only unpickler."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise ApctlError("EDM pickle: an embedded storage is not a byte string")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ApctlError(f"EDM pickle: an embedded tensor storage is unreadable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise ApctlError(f"EDM pickle: an embedded storage holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    import torch
    from torch._utils import _rebuild_tensor_v2 as rebuild

    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise ApctlError("EDM pickle: a tensor is built from something that is not a storage")
    if metadata:
        raise ApctlError("EDM pickle: tensors with extra metadata (conjugate/negative bits) are not supported")
    try:
        return rebuild(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride),
                       bool(requires_grad), OrderedDict())  # hooks from the file are dropped
    except ApctlError:
        raise
    except Exception as exc:
        raise ApctlError(f"EDM pickle: a tensor does not fit its storage ({exc})") from None


def _rebuild_parameter(data, requires_grad, backward_hooks=None):
    import torch

    if not isinstance(data, torch.Tensor):
        raise ApctlError("EDM pickle: a parameter is built from something that is not a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


def _numpy_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise ApctlError("EDM pickle: numpy object scalars are not allowed")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise ApctlError("EDM pickle: malformed numpy scalar")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _numpy_dtype(spec, align=False, copy=True):
    import numpy as np

    if not isinstance(spec, str):
        raise ApctlError("EDM pickle: numpy dtypes must be named by a string")
    return np.dtype(spec, bool(align), True)  # always a fresh copy: BUILD then fills it in


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    """How protocol ≤ 2 pickles written by Python 3 spell a bytes object: encode(str, 'latin1')."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise ApctlError("EDM pickle: only latin1-encoded byte strings are allowed")
    return obj.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise ApctlError("EDM pickle: bytes(...) is only allowed without arguments")
    return b""


def _set(items=()):
    return set(items)


def edm_allowlist(reconstructor: Callable | None = None) -> dict[tuple[str, str], Any]:
    """The globals an EDM pickle may name, each mapped to a stub or a checked wrapper."""
    allowed: dict[tuple[str, str], Any] = {
        PERSISTENCE_RECONSTRUCTOR: reconstructor if reconstructor is not None else _Reconstructor(),
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("torch.nn.modules.container", "ModuleDict"): _ModuleDict,
        ("torch.nn.modules.container", "ModuleList"): _ModuleList,
        ("torch.nn.modules.container", "Sequential"): _Sequential,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2
        ("numpy", "dtype"): _numpy_dtype,
        ("dnnlib.util", "EasyDict"): dict,
        # Only protocol ≤ 3 pickles need these (EDM writes protocol 4, which has EMPTY_SET/BINBYTES):
        ("builtins", "set"): _set,
        ("__builtin__", "set"): _set,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
    }
    return allowed


# --- walking the reconstructed objects ------------------------------------------------------


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """JSON-ready copy of a recorded constructor argument."""
    import numpy as np

    if depth > 32:
        raise ApctlError(f"EDM pickle: {where} is nested more than 32 deep")
    if isinstance(value, np.generic):  # before float: np.float64 subclasses float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ApctlError(f"EDM pickle: {where} has a non-string key {k!r:.40}")
            out[k] = _plain(v, where, depth + 1)
        return out
    raise ApctlError(f"EDM pickle: {where} holds an unsupported value of type {type(value).__name__}")


def _summary(obj: Any, where: str) -> Any:
    """loss_fn / augment_pipe as {class_name, attributes} (plain attributes only)."""
    if obj is None:
        return None
    if isinstance(obj, PersistentObject):
        attrs = {}
        for k, v in obj.state.items():
            try:
                attrs[k] = _plain(v, where)
            except ApctlError:
                attrs[k] = f"<{type(v).__name__}>"
        return {"class_name": obj.class_name, "attributes": attrs}
    try:
        return _plain(obj, where)
    except ApctlError:
        return f"<{type(obj).__name__}>"


def _module_state(obj: Any, path: str) -> dict:
    if isinstance(obj, (PersistentObject, ModuleContainer)):
        return getattr(obj, "state", None) or {}
    raise ApctlError(f"EDM pickle: {path or 'ema'} is a {type(obj).__name__}, not a module")


def _collect(obj: Any, prefix: str, out: dict, depth: int = 0) -> None:
    import torch

    if depth > 64:
        raise ApctlError("EDM pickle: modules nested more than 64 deep")
    path = prefix[:-1]
    state = _module_state(obj, path)
    params = state.get("_parameters") or {}
    buffers = state.get("_buffers") or {}
    modules = state.get("_modules") or {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for kind, table in (("parameter", params), ("buffer", buffers), ("submodule table", modules)):
        if not isinstance(table, dict):
            raise ApctlError(f"EDM pickle: the {kind}s of {path or 'ema'} are not a dict")
    for name, value in params.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ApctlError(f"EDM pickle: parameter {prefix}{name} is not a tensor")
        out[prefix + name] = value.detach()
    for name, value in buffers.items():
        if value is None or name in non_persistent:
            continue
        if not isinstance(value, torch.Tensor):
            raise ApctlError(f"EDM pickle: buffer {prefix}{name} is not a tensor")
        out[prefix + name] = value.detach()
    for name, child in modules.items():
        if child is None:
            continue
        _collect(child, f"{prefix}{name}.", out, depth + 1)


def parse_edm_pickle(data: bytes, what: str = "EDM pickle") -> EDMPickleContents:
    """Parse the bytes of an EDM network pickle (see the module docstring)."""
    reconstructor = _Reconstructor()
    top = restricted_load(data, edm_allowlist(reconstructor), what=what)
    if isinstance(top, PersistentObject):  # a bare pickled network
        top = {"ema": top}
    if not isinstance(top, dict) or "ema" not in top:
        raise ApctlError(f"{what} is a pickle but not an EDM network pickle (no 'ema' entry); accepted: "
                         "EDM network pickles (*.pkl), apctl teachers (*.safetensors + *.json)")
    ema = top["ema"]
    if not isinstance(ema, PersistentObject):
        raise ApctlError(f"{what}: 'ema' is not an EDM persistent network")
    state = ema.state
    init_kwargs = state.get("_init_kwargs")
    if init_kwargs is None:
        raise ApctlError(f"{what}: the network did not record its constructor arguments (_init_kwargs)")
    init_kwargs = _plain(init_kwargs, f"{ema.class_name}._init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise ApctlError(f"{what}: _init_kwargs is not a dict")
    init_args = tuple(_plain(list(state.get("_init_args") or ()), f"{ema.class_name}._init_args"))
    state_dict: dict = {}
    _collect(ema, "", state_dict)
    if not state_dict:
        raise ApctlError(f"{what}: the network holds no parameters")
    extras = {
        "persistence_version": sorted(v for v in reconstructor.versions if isinstance(v, int)),
        "top_level_keys": sorted(str(k) for k in top),
        "loss_fn": _summary(top.get("loss_fn"), "loss_fn"),
        "augment_pipe": _summary(top.get("augment_pipe"), "augment_pipe"),
        "dataset_kwargs": _summary(top.get("dataset_kwargs"), "dataset_kwargs"),
    }
    return EDMPickleContents(
        class_name=ema.class_name,
        init_kwargs=init_kwargs,
        state_dict=state_dict,
        module_src_sha256=dict(reconstructor.hashes),
        extras=extras,
        init_args=init_args,
    )


def read_edm_pickle(path: str | Path) -> EDMPickleContents:
    """Read an EDM `*.pkl` from disk (the whole file is read into memory)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ApctlError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_edm_pickle(data, what=f"EDM pickle {path}")
