"""Load a diffusion teacher from any of the formats apctl accepts, and save it in apctl's own.

Accepted inputs (recognised by content, not by file name):

* ``edm-pickle``: an NVlabs/edm network pickle (`edm-*.pkl`, `network-snapshot-*.pkl`), read with
  `apctl.teachers.edm_pickle` (nothing in it is executed), rebuilt with
  `apctl.networks.build_network`, loaded with `strict=True`.
* ``apctl``: `teacher.safetensors` + `teacher.json` written by `save_teacher`. Either file may be
  given; the other must sit next to it with the same stem.
* ``openai-adm``: a plain torch state_dict of OpenAI's guided-diffusion `UNetModel` trained with
  EDM's preconditioning (CTM's ImageNet-64 teacher `edm_imagenet64_ema.pt`, loaded with
  `torch.load(weights_only=True)`). Its weights are mapped onto `DhariwalUNet`
  (`adm_to_dhariwal_state_dict`) and it becomes `EDMPrecond(img_resolution=64,
  model_type='DhariwalUNet', sigma_data=0.5, noise_label_scale=1000, ...)`, loaded with
  `strict=True` and forward-checked. `noise_label_scale=1000` makes EDMPrecond feed the UNet
  c_noise = 1000·¼·ln σ = 250·ln σ, the time label OpenAI/CTM use (a 1000× factor inside the
  fixed positional embedding's cos/sin that no weight mapping could absorb).

  What was checked against sony/ctm's code (read, not copied: `code/cm/karras_diffusion.py`,
  `unet.py`, `nn.py`, `script_util.py` at ff12be7e; `code/cm_train.py` at 2e40d9c8;
  `code/cm/image_datasets.py` at b62096cd; `code/cmd/ImageNet64/cmd-AWS/M20_w1.sh` at 3e3ccf6b):

  - The teacher is `UNetModel` built by `create_model` with CTM's ImageNet-64 options
    (`--teacher_model_path=.../edm_imagenet64_ema.pt --class_cond=True --num_classes=1000`;
    192 channels, channel_mult (1, 2, 3, 4), 3 res blocks, attention at 32/16/8, 64 channels
    per head, use_scale_shift_norm, resblock_updown, learn_sigma=False, training_mode='teacher',
    so no time_embed_s / emb_layers_s) and loaded with a plain strict `load_state_dict` of the
    file: the file is a bare state_dict with those keys.
  - Teacher call (`get_denoised_and_G(..., ctm=False, teacher=True)`):
    `model(c_in * x, rescaling_t(σ), s=None, teacher=True, y=y)` with
    `rescaling_t(σ) = 1000 * 0.25 * log(σ + 1e-44)`, `c_in = 1/√(σ² + σ_d²)`, and EDM's
    `c_skip = σ_d²/(σ² + σ_d²)`, `c_out = σ σ_d/√(σ² + σ_d²)`; D = c_skip x + c_out F.
    σ_d = `args.sigma_data` = 0.5 (CTM's default; the ImageNet-64 command read does not set it).
    For σ ≥ ~1e-37 the 1e-44 vanishes in float32 (CTM never calls the teacher at σ = 0), and
    fl(1000·(ln σ/4)) = fl(250·ln σ) exactly, so the time label is bit-identical.
  - Time embedding `timestep_embedding`: [cos(t ω), sin(t ω)], ω_i = exp(−ln(10⁴) i/half),
    i < half = model_channels/2 — the same function as DhariwalUNet's PositionalEmbedding
    (max_positions 10⁴, endpoint False); float32 rounding of ω differs in the last bit.
  - Class labels: `y` is an int64 [N] tensor, `label_emb = nn.Embedding(1000, 4·192)` added to
    the time embedding before the blocks' SiLU; DhariwalUNet's `map_label` (Linear without bias
    on a one-hot row) is the same map, so apctl labels must be one-hot rows. CTM's loader
    numbers classes by the sorted synset-id file-name prefixes (guided-diffusion's convention).
  - Attention: `AttentionBlock` defaults to `attention_type='flash'` (create_model does not
    override it) and `QKVFlashAttention` reads the qkv conv's output rows as
    `(three, heads, 64)` ("b (three h d) s -> b s three h d"), softmax scale 1/√64; that is the
    layout `adm_to_dhariwal_state_dict` assumes. The other ordering (`QKVAttentionLegacy`,
    (heads, three, d)) is known to give broken samples with the released checkpoints (sony/ctm
    issue #5, openai/consistency_models PR #37). GroupNorm is 32 groups, eps 1e-5, in float32.

  Assumed, not verifiable without the file or OpenAI's training run:
  - that `edm_imagenet64_ema.pt` really is the 64×64 model above (the resolution is not in the
    weights; apctl assumes 64 for every ADM state_dict) and was trained with flash attention's
    qkv layout (only its loading/usage in CTM and the reports above say so);
  - that OpenAI trained it with the same class numbering as CTM's loader (sorted synset ids);
  - that a file given to apctl is that checkpoint: any ADM state_dict the mapping accepts is
    imported this way (CTM students with `time_embed_s`, learned sigma, conv resampling, no
    scale-shift norm, < 128-channel GroupNorms are refused; the layout and resolution are not
    otherwise checked against the 192-channel ImageNet-64 configuration);
  - CTM runs the teacher in fp16 on GPU (`convert_to_fp16`, flash attention needs fp16); apctl
    runs it in float32 (use_fp16=False), so outputs differ from CTM's by fp16 rounding only;
  - sigma_min/sigma_max are left at EDM's EDMPrecond defaults (0, inf); CTM samples in
    [0.002, 80]. Unconditional use (labels=None → a zero label row) is a function the ADM
    teacher never computed.

apctl format (format_version 1):

* `<stem>.safetensors`: the network's full `state_dict()` (parameters and persistent buffers,
  EDM names), plus string metadata {apctl_format_version, class_name, fingerprint}.
* `<stem>.json`: {"format_version": 1, "class_name", "init_kwargs", "source": {"format", "file"},
  "source_sha256" (sha256 of the imported file), "fingerprint", "parameter_count",
  "module_src_sha256" (EDM pickles: class → sha256 of the embedded source)}. `init_kwargs` may
  hold `Infinity` (EDM's default sigma_max), as Python's json writes and reads it.

Fingerprint: sha256 over, for every state_dict entry in sorted key order, the key (UTF-8), a NUL,
the dtype name (e.g. 'torch.float32'), a NUL, the shape as JSON, a NUL and the tensor's raw
little-endian bytes in C order; followed by the arch JSON
`json.dumps({"class_name": ..., "init_kwargs": ...}, sort_keys=True, separators=(",", ":"))`.
It identifies the function the network computes, independent of the file it came from.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from apctl.errors import ApctlError
from apctl.packages import file_digest

__all__ = [
    "TeacherBundle",
    "FORMAT_VERSION",
    "ACCEPTED_FORMATS",
    "load_teacher",
    "save_teacher",
    "teacher_paths",
    "compute_fingerprint",
    "arch_json",
    "detect_format",
    "adm_to_dhariwal_state_dict",
    "adm_edm_precond_kwargs",
]

FORMAT_VERSION = 1
ACCEPTED_FORMATS = ("EDM network pickle (*.pkl)", "apctl teacher (*.safetensors + *.json)",
                    "OpenAI EDM-trained ADM state_dict (edm_imagenet64_ema.pt)")
_ACCEPTED = "; ".join(ACCEPTED_FORMATS)
# OpenAI's EDM-trained ADM checkpoints: what the weights do not record.
ADM_IMG_RESOLUTION = 64          # edm_imagenet64_ema.pt
ADM_NOISE_LABEL_SCALE = 1000.0   # c_noise = 1000 * 0.25 * ln(sigma)
ADM_SIGMA_DATA = 0.5
# A legacy torch.save file starts with its magic number pickled at protocol 2.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


@dataclass
class TeacherBundle:
    """A loaded teacher network with its architecture and provenance.

    network:       the rebuilt apctl module (eval mode, CPU).
    arch:          {"class_name": str, "init_kwargs": dict}, enough for `build_network`.
    source_format: "edm-pickle" | "apctl" | "openai-adm".
    fingerprint:   see the module docstring.
    source:        {"format", "file"} of the file originally imported (kept across re-saves).
    source_sha256: sha256 of that original file's bytes.
    module_src_sha256: class name → sha256 of the source an EDM pickle embedded (never executed).
    extras:        format-specific details (EDM: loss_fn, augment_pipe, dataset_kwargs, …;
                   OpenAI ADM: the detected UNet layout and the time label used).
    """

    network: Any
    arch: dict
    source_format: str
    fingerprint: str
    source: dict = field(default_factory=dict)
    source_sha256: str = ""
    module_src_sha256: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.network.parameters())


# --- fingerprint ----------------------------------------------------------------------------


def arch_json(arch: Mapping[str, Any]) -> str:
    """Canonical JSON of {class_name, init_kwargs} (the part of the fingerprint that is not weights)."""
    return json.dumps({"class_name": arch["class_name"], "init_kwargs": arch["init_kwargs"]},
                      sort_keys=True, separators=(",", ":"))


def compute_fingerprint(state_dict: Mapping[str, Any], arch: Mapping[str, Any]) -> str:
    """sha256 over the sorted state_dict tensors and the arch JSON (format in the module docstring)."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(key.encode("utf-8") + b"\0")
        h.update(str(t.dtype).encode() + b"\0")
        h.update(json.dumps(list(t.shape)).encode() + b"\0")
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        h.update(raw.numpy().data)
    h.update(arch_json(arch).encode("utf-8"))
    return h.hexdigest()


# --- helpers --------------------------------------------------------------------------------



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def teacher_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) paths of an apctl teacher given either of them (or a bare stem)."""
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < (1 << 31) and head[8:9] == b"{"


def detect_format(path: str | Path) -> str:
    """'apctl' | 'edm-pickle' | 'torch-zip' | 'pickle' | 'unknown', from the file's first bytes."""
    path = Path(path)
    if path.suffix == ".json":
        return "apctl"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ApctlError(f"cannot read {path}: {exc.strerror or exc}") from None
    if _looks_like_safetensors(head):
        return "apctl"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _unknown(path: Path, why: str = "") -> ApctlError:
    detail = f" ({why})" if why else ""
    return ApctlError(f"{path}: not a teacher file apctl can read{detail}; accepted: {_ACCEPTED}")


def _positional_to_kwargs(class_name: str, args: tuple, kwargs: dict) -> dict:
    if not args:
        return kwargs
    from apctl.networks import NETWORK_CLASSES

    cls = NETWORK_CLASSES.get(class_name.rsplit(".", 1)[-1])
    if cls is None:
        raise ApctlError(f"unknown network class {class_name!r}")
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    except TypeError as exc:
        raise ApctlError(f"cannot match {class_name}'s recorded constructor arguments: {exc}") from None
    out = dict(bound.arguments)
    out.pop("self", None)
    extra = out.pop("model_kwargs", None) or {}
    out.update(extra)
    return out


def _check_state_dict(network, state_dict: Mapping[str, Any], what: str) -> None:
    own = network.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ApctlError(f"{what}: weights do not match the {type(network).__name__} built from its "
                         f"init_kwargs: {'; '.join(parts)}")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ApctlError(f"{what}: {key} has shape {list(value.shape)}, the network expects "
                             f"{list(own[key].shape)}")


def _has_meta_tensors(network) -> bool:
    import torch

    for module in network.modules():
        for value in list(module._parameters.values()) + list(module._buffers.values()) + list(vars(module).values()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                return True
    return False


def _build(class_name: str, init_kwargs: dict, what: str, device=None):
    from apctl.networks import build_network

    try:
        return build_network(class_name, init_kwargs, device=device)
    except ApctlError as exc:
        raise ApctlError(f"{what}: {exc}") from None
    except Exception as exc:  # the constructor rejected a recorded argument
        raise ApctlError(f"{what}: cannot build {class_name} from its init_kwargs "
                         f"({type(exc).__name__}: {_first_line(exc)})") from None


def _build_and_load(class_name: str, init_kwargs: dict, state_dict: Mapping[str, Any], what: str):
    """Rebuild the network and load `state_dict` with strict=True, then check one forward pass.

    The module is first built on the meta device and the weights assigned (no random
    initialisation of weights that are overwritten anyway); networks whose constructors compute
    values from tensors (VPPrecond, iDDPMPrecond) or keep tensors outside the state_dict are
    built normally and the weights copied in.
    """
    network = None
    try:
        network = _build(class_name, init_kwargs, what, device="meta")
    except ApctlError:
        pass
    if network is not None:
        _check_state_dict(network, state_dict, what)
        own = network.state_dict()
        try:
            network.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True, assign=True)
        except RuntimeError as exc:
            raise ApctlError(f"{what}: load_state_dict failed: {_first_line(exc)}") from None
        if _has_meta_tensors(network):
            network = None
    if network is None:
        network = _build(class_name, init_kwargs, what)
        _check_state_dict(network, state_dict, what)
        try:
            network.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise ApctlError(f"{what}: load_state_dict failed: {_first_line(exc)}") from None
    network.eval().requires_grad_(False)
    _forward_check(network, what)
    return network


def _forward_check(network, what: str) -> None:
    """One small forward pass: the output must have the input's shape and be finite."""
    import torch

    res = int(getattr(network, "img_resolution", 0) or 0)
    ch = int(getattr(network, "img_channels", 0) or 0)
    if not res or not ch:
        return
    label_dim = int(getattr(network, "label_dim", 0) or 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, ch, res, res, generator=gen)
    labels = torch.nn.functional.one_hot(torch.tensor([0]), label_dim).float() if label_dim else None
    try:
        with torch.no_grad():
            if hasattr(network, "sigma_data") or hasattr(network, "round_sigma"):
                out = network(x, torch.tensor([1.0]), labels)
            else:  # a raw UNet
                out = network(x, torch.zeros(1), labels)
    except Exception as exc:
        raise ApctlError(f"{what}: the rebuilt network fails on a test input: {_first_line(exc)}") from None
    if out.shape[0] != 1 or tuple(out.shape[2:]) != tuple(x.shape[2:]):
        raise ApctlError(f"{what}: the rebuilt network returns shape {list(out.shape)} for input {list(x.shape)}")
    if not torch.isfinite(out).all():
        raise ApctlError(f"{what}: the rebuilt network returns non-finite values on a test input")


# --- the formats ----------------------------------------------------------------------------


def _load_edm_pickle(path: Path, data: bytes) -> TeacherBundle:
    from apctl.teachers.edm_pickle import parse_edm_pickle

    what = f"EDM pickle {path}"
    try:
        contents = parse_edm_pickle(data, what=what)
    except ApctlError as exc:
        if "not a readable pickle" in str(exc) or "corrupt or truncated" in str(exc):
            raise ApctlError(f"{exc}; accepted: {_ACCEPTED}") from None
        raise
    init_kwargs = _positional_to_kwargs(contents.class_name, contents.init_args, contents.init_kwargs)
    class_name = contents.class_name
    network = _build_and_load(class_name, init_kwargs, contents.state_dict, what)
    arch = {"class_name": class_name, "init_kwargs": init_kwargs}
    return TeacherBundle(
        network=network,
        arch=arch,
        source_format="edm-pickle",
        fingerprint=compute_fingerprint(network.state_dict(), arch),
        source={"format": "edm-pickle", "file": path.name},
        source_sha256=hashlib.sha256(data).hexdigest(),
        module_src_sha256=dict(contents.module_src_sha256),
        extras=dict(contents.extras),
    )


def _read_json(json_path: Path) -> dict:
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ApctlError(f"{json_path} is missing: an apctl teacher is a .safetensors file plus a .json "
                         "file with the same stem") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ApctlError(f"{json_path} is not readable JSON ({_first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise ApctlError(f"{json_path} is not an apctl teacher description (expected a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ApctlError(f"{json_path}: unsupported teacher format_version {version!r} (this apctl reads "
                         f"{FORMAT_VERSION})")
    if not isinstance(meta.get("class_name"), str) or not isinstance(meta.get("init_kwargs"), dict):
        raise ApctlError(f"{json_path}: class_name (string) and init_kwargs (object) are required")
    return meta


def _load_apctl(path: Path) -> TeacherBundle:
    from safetensors.torch import load_file

    weights_path, json_path = teacher_paths(path)
    meta = _read_json(json_path)
    if not weights_path.exists():
        raise ApctlError(f"{weights_path} is missing (described by {json_path})")
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except Exception as exc:
        raise ApctlError(f"{weights_path} is corrupt or truncated ({_first_line(exc)})") from None
    arch = {"class_name": meta["class_name"], "init_kwargs": meta["init_kwargs"]}
    network = _build_and_load(arch["class_name"], arch["init_kwargs"], state_dict, str(weights_path))
    fingerprint = compute_fingerprint(network.state_dict(), arch)
    recorded = meta.get("fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise ApctlError(f"{weights_path} does not match {json_path}: fingerprint {fingerprint[:16]}… "
                         f"!= recorded {str(recorded)[:16]}… (file changed or mixed up)")
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    return TeacherBundle(
        network=network,
        arch=arch,
        source_format="apctl",
        fingerprint=fingerprint,
        source=dict(source),
        source_sha256=str(meta.get("source_sha256") or ""),
        module_src_sha256=dict(meta.get("module_src_sha256") or {}),
        extras={},
    )


def _load_torch_file(path: Path) -> TeacherBundle:
    """A torch.save file: only OpenAI's ADM state_dict is expected here."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unknown(path, f"torch.load(weights_only=True) refused it: {_first_line(exc)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and any(isinstance(k, str) and k.startswith("input_blocks.") for k in obj):
        return _load_openai_adm(path, obj)
    raise _unknown(path, "a torch file that is neither an EDM pickle nor an ADM state_dict")


def adm_edm_precond_kwargs(unet_kwargs: Mapping[str, Any]) -> dict:
    """EDMPrecond init_kwargs for an OpenAI EDM-trained ADM whose DhariwalUNet kwargs are `unet_kwargs`.

    σ_d = 0.5, c_noise = 1000·¼·ln σ (`noise_label_scale=1000`), float32 (see the module docstring).
    """
    unet = dict(unet_kwargs)
    if unet.pop("in_channels") != unet.pop("out_channels"):
        raise ApctlError("ADM state_dict: EDMPrecond needs as many output channels as input channels")
    return dict(img_resolution=unet.pop("img_resolution"), img_channels=unet_kwargs["in_channels"],
                label_dim=unet.pop("label_dim"), use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                sigma_data=ADM_SIGMA_DATA, model_type="DhariwalUNet", noise_label_scale=ADM_NOISE_LABEL_SCALE,
                **unet)


def _adm_buffers(init_kwargs: Mapping[str, Any]) -> dict:
    """The constant buffers DhariwalUNet has and ADM files lack: the 2× resample filters.

    ADM resamples by 2×2 average pooling and nearest-neighbour upsampling, which is
    DhariwalUNet's FIR filter f fᵀ/(Σf)² with f = (1, 1): a [1, 1, 2, 2] kernel of 1/4.
    """
    import torch

    from apctl.networks import build_network

    skeleton = build_network("EDMPrecond", init_kwargs, device="meta")
    params = {name for name, _ in skeleton.named_parameters()}
    out = {}
    for name, value in skeleton.state_dict().items():
        if name in params:
            continue
        if not name.endswith(".resample_filter") or tuple(value.shape) != (1, 1, 2, 2):
            raise ApctlError(f"ADM state_dict: DhariwalUNet buffer {name} {list(value.shape)} has no ADM "
                             "counterpart")
        out[name] = torch.full((1, 1, 2, 2), 0.25)
    return out


def _load_openai_adm(path: Path, adm: Mapping[str, Any]) -> TeacherBundle:
    what = f"OpenAI ADM state_dict {path}"
    try:
        unet_kwargs, mapped = adm_to_dhariwal_state_dict(adm, img_resolution=ADM_IMG_RESOLUTION)
        init_kwargs = adm_edm_precond_kwargs(unet_kwargs)
        state_dict = {f"model.{name}": t for name, t in mapped.items()}
        state_dict.update(_adm_buffers(init_kwargs))
    except ApctlError as exc:
        raise ApctlError(f"{path}: {exc}") from None
    network = _build_and_load("EDMPrecond", init_kwargs, state_dict, what)
    arch = {"class_name": "EDMPrecond", "init_kwargs": dict(network.init_kwargs)}
    layout = {k: unet_kwargs[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions",
                                           "label_dim")}
    return TeacherBundle(
        network=network,
        arch=arch,
        source_format="openai-adm",
        fingerprint=compute_fingerprint(network.state_dict(), arch),
        source={"format": "openai-adm", "file": path.name},
        source_sha256=file_digest(path),
        extras={"adm_layout": layout, "time_label": "1000 * 0.25 * ln(sigma)",
                "assumed_img_resolution": ADM_IMG_RESOLUTION},
    )


def load_teacher(path: str | Path) -> TeacherBundle:
    """Load a teacher from an EDM pickle, an apctl .safetensors/.json pair or an OpenAI EDM-trained
    ADM state_dict (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise ApctlError(f"{path} is a directory; give a teacher file ({_ACCEPTED})")
    if not path.exists() and path.suffix not in (".json", ".safetensors"):
        raise ApctlError(f"{path} does not exist")
    kind = detect_format(path) if path.exists() else "apctl"
    if kind == "apctl":
        return _load_apctl(path)
    if kind == "torch-zip":
        return _load_torch_file(path)
    if kind == "pickle":
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ApctlError(f"cannot read {path}: {exc.strerror or exc}") from None
        if data.startswith(_LEGACY_TORCH_MAGIC):  # torch.save(..., _use_new_zipfile_serialization=False)
            del data
            return _load_torch_file(path)
        # Any other pickle goes through the EDM allowlist, which names whatever it refuses.
        return _load_edm_pickle(path, data)
    # Protocol 0/1 pickles have no header: anything that scans as a pickle gets the same treatment.
    from apctl.safe_pickle import referenced_globals

    try:
        data = path.read_bytes()
        referenced_globals(data)
    except (OSError, ApctlError):
        raise _unknown(path) from None
    return _load_edm_pickle(path, data)


def save_teacher(bundle: TeacherBundle, out_path: str | Path) -> tuple[Path, Path]:
    """Write `<stem>.safetensors` and `<stem>.json`; returns their paths.

    Both files are written to temporary names first and renamed into place at the end, so an
    error leaves any existing files untouched. Overwrites existing files (the CLI checks first).
    """
    from safetensors.torch import save_file

    if Path(out_path).suffix not in (".safetensors", ""):
        raise ApctlError(f"teacher output must end in .safetensors, got {out_path}")
    weights_path, json_path = teacher_paths(out_path)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in bundle.network.state_dict().items()}
    arch = {"class_name": bundle.arch["class_name"], "init_kwargs": bundle.arch["init_kwargs"]}
    fingerprint = compute_fingerprint(state_dict, arch)
    meta = {
        "format_version": FORMAT_VERSION,
        "class_name": arch["class_name"],
        "init_kwargs": arch["init_kwargs"],
        "source": bundle.source or {"format": bundle.source_format, "file": ""},
        "source_sha256": bundle.source_sha256,
        "fingerprint": fingerprint,
        "parameter_count": bundle.parameter_count,
        "module_src_sha256": bundle.module_src_sha256,
    }
    try:
        text = json.dumps(meta, indent=2, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise ApctlError(f"teacher description is not JSON-serialisable: {exc}") from None
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_w = tmp_j = None
    try:
        fd, tmp_w = tempfile.mkstemp(prefix=f".{weights_path.name}.", dir=weights_path.parent)
        os.close(fd)
        save_file(state_dict, tmp_w, metadata={"apctl_format_version": str(FORMAT_VERSION),
                                               "class_name": arch["class_name"], "fingerprint": fingerprint})
        fd, tmp_j = tempfile.mkstemp(prefix=f".{json_path.name}.", dir=json_path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp_w, weights_path)
        tmp_w = None
        os.replace(tmp_j, json_path)
        tmp_j = None
    except OSError as exc:
        raise ApctlError(f"cannot write {weights_path}: {exc.strerror or exc}") from None
    except Exception as exc:  # safetensors refuses e.g. tensors that share memory
        raise ApctlError(f"cannot write {weights_path}: {_first_line(exc)}") from None
    finally:
        for tmp in (tmp_w, tmp_j):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    bundle.fingerprint = fingerprint
    return weights_path, json_path


# --- OpenAI ADM (guided-diffusion UNetModel) → EDM DhariwalUNet ------------------------------


def adm_to_dhariwal_state_dict(adm: Mapping[str, Any], img_resolution: int = 64,
                               channels_per_head: int = 64) -> tuple[dict, dict]:
    """Map an OpenAI ADM state_dict (resblock_updown, use_scale_shift_norm, heads of
    `channels_per_head` channels, qkv laid out (three, head, channel) as in openai/consistency_models
    and sony/ctm) onto DhariwalUNet's parameter names.

    Returns (DhariwalUNet init kwargs, {name: tensor}) covering every DhariwalUNet *parameter*
    (its constant resample-filter buffers are not in ADM files). The image resolution is not
    recorded in ADM weights and must be given. Raises ApctlError for layouts DhariwalUNet cannot
    express (conv resampling, no scale-shift norm, learned sigma, fewer than 128 channels, …).
    """
    used: set[str] = set()

    def get(key: str):
        if key not in adm:
            raise ApctlError(f"ADM state_dict lacks {key}")
        used.add(key)
        return adm[key]

    def has_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in adm)

    if has_prefix("time_embed_s.") or any(".emb_layers_s." in key for key in adm):
        raise ApctlError("ADM state_dict holds CTM student parts (time_embed_s / emb_layers_s); "
                         "it is a CTM student, not an EDM-trained teacher")
    mc = int(get("time_embed.0.weight").shape[1])
    emb = int(get("time_embed.0.weight").shape[0])
    in_ch = int(get("input_blocks.0.0.weight").shape[1])
    out_ch = int(get("out.2.weight").shape[0])
    label_dim = int(adm["label_emb.weight"].shape[0]) if "label_emb.weight" in adm else 0
    if emb % mc:
        raise ApctlError("ADM state_dict: embedding width is not a multiple of model_channels")
    if out_ch != in_ch:
        raise ApctlError(f"ADM state_dict has {out_ch} output channels for {in_ch} input channels "
                         "(learned sigma); EDMPrecond needs equal counts")
    if any(".op.weight" in k for k in adm) or any(k.endswith(".conv.weight") and "blocks" in k for k in adm):
        raise ApctlError("ADM state_dict uses convolutional resampling (resblock_updown=False); "
                         "DhariwalUNet resamples inside residual blocks only")
    n_in = 1 + max(int(k.split(".")[1]) for k in adm if k.startswith("input_blocks."))
    n_out = 1 + max(int(k.split(".")[1]) for k in adm if k.startswith("output_blocks."))

    def is_resblock(prefix: str) -> bool:
        return f"{prefix}.in_layers.0.weight" in adm

    def is_attn(prefix: str) -> bool:
        return f"{prefix}.qkv.weight" in adm

    # Output blocks ending in an extra (upsampling) resblock mark level boundaries.
    ups = []
    for k in range(n_out):
        subs = sorted({int(key.split(".")[2]) for key in adm if key.startswith(f"output_blocks.{k}.")})
        if subs and subs[-1] > 0 and is_resblock(f"output_blocks.{k}.{subs[-1]}"):
            ups.append(k)
    levels = len(ups) + 1
    if n_out % levels:
        raise ApctlError("ADM state_dict: output blocks do not split evenly into levels")
    num_blocks = n_out // levels - 1
    if n_in != levels * (num_blocks + 1):
        raise ApctlError("ADM state_dict: input and output block counts do not describe one UNet")

    def out_width(prefix: str) -> int:
        return int(get(f"{prefix}.out_layers.3.weight").shape[0])

    channel_mult, attn_res = [], set()
    for level in range(levels):
        first = 1 + level * (num_blocks + 1)
        width = out_width(f"input_blocks.{first}.0")
        if width % mc:
            raise ApctlError("ADM state_dict: a level's width is not a multiple of model_channels")
        channel_mult.append(width // mc)
        if is_attn(f"input_blocks.{first}.1"):
            attn_res.add(img_resolution >> level)
    enc_res = [img_resolution >> level for level in range(levels)]
    kwargs = dict(img_resolution=img_resolution, in_channels=in_ch, out_channels=out_ch, label_dim=label_dim,
                  augment_dim=0, model_channels=mc, channel_mult=channel_mult, channel_mult_emb=emb // mc,
                  num_blocks=num_blocks, attn_resolutions=sorted(attn_res, reverse=True), dropout=0.0)

    out: dict[str, Any] = {}

    def put(dst: str, src: str, transform=None):
        t = get(src)
        out[dst] = transform(t) if transform is not None else t

    def as_conv2d(t):  # consistency_models stores 1×1 attention convs as conv1d weights
        return t if t.dim() == 4 else t.reshape(*t.shape, *([1] * (4 - t.dim())))

    def res_block(dst: str, src: str, width_in: int, width_out: int):
        if not is_resblock(src):
            raise ApctlError(f"ADM state_dict: {src} is not a residual block")
        if int(get(f"{src}.emb_layers.1.weight").shape[0]) != 2 * width_out:
            raise ApctlError("ADM state_dict: residual blocks without scale-shift norm "
                             "(use_scale_shift_norm=False) cannot be expressed by DhariwalUNet")
        for w in (width_in, width_out):
            if w < 128:
                raise ApctlError(f"ADM state_dict: {w}-channel GroupNorm (32 groups) differs from "
                                 "DhariwalUNet's (min(32, C/4) groups) below 128 channels")
        for a, b in (("norm0", "in_layers.0"), ("conv0", "in_layers.2"), ("affine", "emb_layers.1"),
                     ("norm1", "out_layers.0"), ("conv1", "out_layers.3")):
            put(f"{dst}.{a}.weight", f"{src}.{b}.weight")
            put(f"{dst}.{a}.bias", f"{src}.{b}.bias")
        if f"{src}.skip_connection.weight" in adm:
            put(f"{dst}.skip.weight", f"{src}.skip_connection.weight", as_conv2d)
            put(f"{dst}.skip.bias", f"{src}.skip_connection.bias")

    def attention(dst: str, src: str, width: int):
        if width % channels_per_head:
            raise ApctlError(f"ADM state_dict: {width} channels do not split into heads of {channels_per_head}")
        heads, d = width // channels_per_head, channels_per_head
        put(f"{dst}.norm2.weight", f"{src}.norm.weight")
        put(f"{dst}.norm2.bias", f"{src}.norm.bias")
        w = as_conv2d(get(f"{src}.qkv.weight"))  # rows (three, head, d) → EDM's (head, d, three)
        out[f"{dst}.qkv.weight"] = w.reshape(3, heads, d, *w.shape[1:]).permute(1, 2, 0, 3, 4, 5).reshape(w.shape)
        out[f"{dst}.qkv.bias"] = get(f"{src}.qkv.bias").reshape(3, heads, d).permute(1, 2, 0).reshape(-1)
        put(f"{dst}.proj.weight", f"{src}.proj_out.weight", as_conv2d)
        put(f"{dst}.proj.bias", f"{src}.proj_out.bias")

    put("map_layer0.weight", "time_embed.0.weight")
    put("map_layer0.bias", "time_embed.0.bias")
    put("map_layer1.weight", "time_embed.2.weight")
    put("map_layer1.bias", "time_embed.2.bias")
    if label_dim:
        put("map_label.weight", "label_emb.weight", lambda t: t.t().contiguous())
    top = enc_res[0]
    put(f"enc.{top}x{top}_conv.weight", "input_blocks.0.0.weight")
    put(f"enc.{top}x{top}_conv.bias", "input_blocks.0.0.bias")

    # Encoder: per level, num_blocks blocks, then (not on the last level) a downsampling block,
    # which EDM files under the next level's name.
    k, width = 1, mc * channel_mult[0]
    skips = [width]
    for level, mult in enumerate(channel_mult):
        res = enc_res[level]
        for i in range(num_blocks):
            new = mc * mult
            res_block(f"enc.{res}x{res}_block{i}", f"input_blocks.{k}.0", width, new)
            width = new
            if is_attn(f"input_blocks.{k}.1"):
                attention(f"enc.{res}x{res}_block{i}", f"input_blocks.{k}.1", width)
            skips.append(width)
            k += 1
        if level != levels - 1:
            nxt = enc_res[level + 1]
            res_block(f"enc.{nxt}x{nxt}_down", f"input_blocks.{k}.0", width, width)
            skips.append(width)
            k += 1
    # Middle: resblock + attention, resblock.
    low = enc_res[-1]
    res_block(f"dec.{low}x{low}_in0", "middle_block.0", width, width)
    attention(f"dec.{low}x{low}_in0", "middle_block.1", width)
    res_block(f"dec.{low}x{low}_in1", "middle_block.2", width, width)
    # Decoder: per level (deepest first), num_blocks + 1 blocks; the last one of every level but
    # the top ends in an upsampling resblock, which EDM files under the next level's name.
    k = 0
    for level in reversed(range(levels)):
        res = enc_res[level]
        for i in range(num_blocks + 1):
            new = mc * channel_mult[level]
            src = f"output_blocks.{k}"
            res_block(f"dec.{res}x{res}_block{i}", f"{src}.0", width + skips.pop(), new)
            width = new
            sub = 1
            if is_attn(f"{src}.1"):
                attention(f"dec.{res}x{res}_block{i}", f"{src}.1", width)
                sub = 2
            if level and i == num_blocks:
                up = enc_res[level - 1]
                res_block(f"dec.{up}x{up}_up", f"{src}.{sub}", width, width)
            k += 1
    put("out_norm.weight", "out.0.weight")
    put("out_norm.bias", "out.0.bias")
    put("out_conv.weight", "out.2.weight")
    put("out_conv.bias", "out.2.bias")
    from apctl.networks import build_network

    reference = build_network("DhariwalUNet", kwargs, device="meta")
    expected = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    got = {name: tuple(t.shape) for name, t in out.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
        raise ApctlError(f"ADM state_dict does not map onto DhariwalUNet: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, shape mismatches {shapes[:3]}")
    unused = sorted(set(adm) - used)
    if unused:
        raise ApctlError(f"ADM state_dict holds {len(unused)} entries DhariwalUNet has no place for "
                         f"(e.g. {', '.join(unused[:3])})")
    return kwargs, {name: t.detach() for name, t in out.items()}
