"""Load a diffusion teacher from any of the formats apctl accepts: recognise the format, dispatch.

Accepted inputs (recognised by content, not by file name; `detect_format`):

* ``edm-pickle``: an NVlabs/edm network pickle (`edm-*.pkl`, `network-snapshot-*.pkl`), read with
  `apctl.teachers.edm_pickle` (nothing in it is executed), rebuilt with
  `apctl.networks.build_network`, loaded with `strict=True`.
* ``apctl``: `teacher.safetensors` + `teacher.json` written by `save_teacher`
  (`apctl.teachers.apctl_format`). Either file may be given; the other must sit next to it.
* ``openai-adm``: a plain torch state_dict of OpenAI's guided-diffusion `UNetModel` trained with
  EDM's preconditioning (CTM's ImageNet-64 teacher `edm_imagenet64_ema.pt`), loaded with
  `torch.load(weights_only=True)` and mapped onto EDMPrecond + DhariwalUNet
  (`apctl.teachers.openai_adm`, which records what was checked and what is assumed).

Every format ends in `apctl.teachers.rebuild.build_and_load` (strict load + forward check) and a
`TeacherBundle` with the fingerprint of `apctl.teachers.bundle`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from apctl.errors import ApctlError, MissingFileError, UnreadablePickleError, UnsafePickleError, first_line
from apctl.files import MAX_WEIGHTS_BYTES, check_input_file, read_bounded
from apctl.teachers.apctl_format import load_apctl_teacher
from apctl.teachers.bundle import TeacherBundle
from apctl.teachers.openai_adm import load_openai_adm
from apctl.teachers.rebuild import build_and_load, positional_to_kwargs

ACCEPTED_FORMATS = ("EDM network pickle (*.pkl)", "apctl teacher (*.safetensors + *.json)",
                    "OpenAI EDM-trained ADM state_dict (edm_imagenet64_ema.pt)")
_ACCEPTED = "; ".join(ACCEPTED_FORMATS)
# A legacy torch.save file starts with its magic number pickled at protocol 2.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < (1 << 31) and head[8:9] == b"{"


def detect_format(path: str | Path) -> str:
    """'apctl' | 'torch-zip' | 'pickle' | 'unknown', from the file's first bytes (a .json is 'apctl')."""
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


def _load_edm_pickle(path: Path, data: bytes) -> TeacherBundle:
    from apctl.teachers.edm_pickle import parse_edm_pickle

    what = f"EDM pickle {path}"
    try:
        contents = parse_edm_pickle(data, what=what)
    except UnreadablePickleError as exc:
        raise UnreadablePickleError(f"{exc}; accepted: {_ACCEPTED}") from None
    init_kwargs = positional_to_kwargs(contents.class_name, contents.init_args, contents.init_kwargs)
    class_name = contents.class_name
    network = build_and_load(class_name, init_kwargs, contents.state_dict, what)
    arch = {"class_name": class_name, "init_kwargs": init_kwargs}
    return TeacherBundle.imported(network, arch, "edm-pickle", path.name, hashlib.sha256(data).hexdigest(),
                                  module_src_sha256=dict(contents.module_src_sha256), extras=dict(contents.extras))


def _check_torch_zip(path: Path) -> None:
    """A torch.save zip holds its members stored, not compressed: a compressed member (a zip bomb
    inflates 1 MB into gigabytes) or declared sizes beyond the bound are refused before torch reads it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _unknown(path, f"a damaged zip archive: {first_line(exc)}") from None
    for info in members:
        if info.compress_type != zipfile.ZIP_STORED:
            raise _unknown(path, f"member {info.filename[:80]} is compressed; torch.save stores its members uncompressed")
    total = sum(info.file_size for info in members)
    if total > MAX_WEIGHTS_BYTES:
        raise _unknown(path, f"its members declare {total:,} bytes, more than the {MAX_WEIGHTS_BYTES:,} apctl reads")


def _load_torch_file(path: Path) -> TeacherBundle:
    """A torch.save file: only OpenAI's ADM state_dict is expected here."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unknown(path, f"torch.load(weights_only=True) refused it: {first_line(exc)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and any(isinstance(k, str) and k.startswith("input_blocks.") for k in obj):
        return load_openai_adm(path, obj)
    raise _unknown(path, "a torch file that is neither an EDM pickle nor an ADM state_dict")


def read_architecture(path: str | Path) -> dict | None:
    """{"format", "class_name", "init_kwargs"} of a teacher file without building its network (for the
    `--dry-run` plan): an apctl teacher's JSON, or an EDM pickle's recorded constructor arguments (the
    pickle is parsed, nothing executed, no network built). None for OpenAI's ADM state_dict, whose
    layout is only known after mapping its weights. Errors as `load_teacher`'s."""
    path = Path(path)
    if path.is_dir():
        raise ApctlError(f"{path} is a directory; give a teacher file ({_ACCEPTED})")
    kind = detect_format(path) if path.exists() else "apctl"
    if kind == "apctl":
        from apctl.teachers.apctl_format import read_architecture as read_apctl

        return dict(read_apctl(path), format="apctl")
    if kind == "torch-zip":
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ApctlError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data.startswith(_LEGACY_TORCH_MAGIC):
        return None
    from apctl.teachers.edm_pickle import parse_edm_pickle

    try:
        contents = parse_edm_pickle(data, what=f"EDM pickle {path}")
    except UnreadablePickleError as exc:
        raise UnreadablePickleError(f"{exc}; accepted: {_ACCEPTED}") from None
    return {"format": "edm-pickle", "class_name": contents.class_name,
            "init_kwargs": positional_to_kwargs(contents.class_name, contents.init_args, contents.init_kwargs)}


def load_teacher(path: str | Path) -> TeacherBundle:
    """Load a teacher from an EDM pickle, an apctl .safetensors/.json pair or an OpenAI EDM-trained
    ADM state_dict (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise ApctlError(f"{path} is a directory; give a teacher file ({_ACCEPTED})")
    if not path.exists() and path.suffix not in (".json", ".safetensors"):
        raise MissingFileError(f"{path} does not exist")
    if path.exists() and path.suffix != ".json":
        check_input_file(path, MAX_WEIGHTS_BYTES, "teacher file")     # not a FIFO, device or endless file
    kind = detect_format(path) if path.exists() else "apctl"
    if kind == "apctl":
        return load_apctl_teacher(path)
    if kind == "torch-zip":
        _check_torch_zip(path)
        return _load_torch_file(path)
    if kind == "pickle":
        data = read_bounded(path, MAX_WEIGHTS_BYTES, "teacher file")
        if data.startswith(_LEGACY_TORCH_MAGIC):  # torch.save(..., _use_new_zipfile_serialization=False)
            del data
            return _load_torch_file(path)
        # Any other pickle goes through the EDM allowlist, which names whatever it refuses.
        return _load_edm_pickle(path, data)
    # Protocol 0/1 pickles have no header: anything that scans as a pickle gets the same treatment.
    from apctl.safe_pickle import referenced_globals

    data = read_bounded(path, MAX_WEIGHTS_BYTES, "teacher file")
    try:
        referenced_globals(data)
    except (UnsafePickleError, UnreadablePickleError):
        raise _unknown(path) from None
    return _load_edm_pickle(path, data)
