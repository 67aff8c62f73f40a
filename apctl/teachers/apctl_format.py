"""apctl's own teacher format: `<stem>.safetensors` + `<stem>.json` (format_version 1).

* `<stem>.safetensors`: the network's full `state_dict()` (parameters and persistent buffers,
  EDM names), plus string metadata {apctl_format_version, class_name, fingerprint}.
* `<stem>.json`: {"format_version": 1, "class_name", "init_kwargs", "source": {"format", "file"},
  "source_sha256" (sha256 of the imported file), "fingerprint", "parameter_count",
  "module_src_sha256" (EDM pickles: class → sha256 of the embedded source)}. The file is strict
  JSON (`apctl.strict_json`): a non-finite float in `init_kwargs` (EDM's default sigma_max = inf) is
  written as the string "inf" ("-inf", "nan"), which the reader turns back into the float. Files
  written before that, with the non-standard token `Infinity`, still load, to the same fingerprint
  (it is computed from the float values, not from the file's text).

Either file may be given to `load_apctl_teacher`; the other must sit next to it with the same stem.
The fingerprint is `apctl.teachers.bundle.compute_fingerprint`; a recorded one that differs from
the loaded weights' is refused.
"""

from __future__ import annotations

from pathlib import Path

from apctl.errors import ApctlError, MissingFileError, first_line
from apctl.files import MAX_WEIGHTS_BYTES, atomic_path, check_input_file, read_json_bounded, write_safetensors
from apctl.strict_json import decode_nonfinite, dumps, encode_nonfinite
from apctl.teachers.bundle import TeacherBundle, compute_fingerprint
from apctl.teachers.rebuild import build_and_load

FORMAT_VERSION = 1


def teacher_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) paths of an apctl teacher given either of them (or a bare stem)."""
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _read_json(json_path: Path) -> dict:
    if not json_path.exists():
        raise MissingFileError(f"{json_path} is missing: an apctl teacher is a .safetensors file plus a .json "
                               "file with the same stem")
    meta = read_json_bounded(json_path, "teacher description")
    if not isinstance(meta, dict):
        raise ApctlError(f"{json_path} is not an apctl teacher description (expected a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ApctlError(f"{json_path}: unsupported teacher format_version {version!r} (this apctl reads "
                         f"{FORMAT_VERSION})")
    if not isinstance(meta.get("class_name"), str) or not isinstance(meta.get("init_kwargs"), dict):
        raise ApctlError(f"{json_path}: class_name (string) and init_kwargs (object) are required")
    return meta


def read_architecture(path: Path) -> dict:
    """{"class_name", "init_kwargs"} of an apctl teacher from its JSON alone (the weights are not read)."""
    meta = _read_json(teacher_paths(path)[1])
    return {"class_name": meta["class_name"], "init_kwargs": decode_nonfinite(meta["init_kwargs"])}


def load_apctl_teacher(path: Path) -> TeacherBundle:
    """Load an apctl teacher from its .safetensors or .json (module docstring); checks the fingerprint."""
    from safetensors.torch import load_file

    weights_path, json_path = teacher_paths(path)
    meta = _read_json(json_path)
    if not weights_path.exists():
        raise MissingFileError(f"{weights_path} is missing (described by {json_path})")
    check_input_file(weights_path, MAX_WEIGHTS_BYTES, "teacher weights")
    try:
        state_dict = load_file(str(weights_path), device="cpu")
    except Exception as exc:
        raise ApctlError(f"{weights_path} is corrupt or truncated ({first_line(exc)})") from None
    arch = {"class_name": meta["class_name"], "init_kwargs": decode_nonfinite(meta["init_kwargs"])}
    network = build_and_load(arch["class_name"], arch["init_kwargs"], state_dict, str(weights_path))
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


def save_teacher(bundle: TeacherBundle, out_path: str | Path) -> tuple[Path, Path]:
    """Write `<stem>.safetensors` and `<stem>.json`; returns their paths.

    Both files are written to temporary names first and renamed into place at the end
    (`apctl.files.atomic_path`), so an error leaves any existing files untouched. Overwrites
    existing files (the CLI checks first).
    """
    if Path(out_path).suffix not in (".safetensors", ""):
        raise ApctlError(f"teacher output must end in .safetensors, got {out_path}")
    weights_path, json_path = teacher_paths(out_path)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in bundle.network.state_dict().items()}
    arch = {"class_name": bundle.arch["class_name"], "init_kwargs": bundle.arch["init_kwargs"]}
    fingerprint = compute_fingerprint(state_dict, arch)
    meta = {
        "format_version": FORMAT_VERSION,
        "class_name": arch["class_name"],
        "init_kwargs": encode_nonfinite(arch["init_kwargs"], "string"),
        "source": bundle.source or {"format": bundle.source_format, "file": ""},
        "source_sha256": bundle.source_sha256,
        "fingerprint": fingerprint,
        "parameter_count": bundle.parameter_count,
        "module_src_sha256": bundle.module_src_sha256,
    }
    if "trained_by" in bundle.extras:     # `apctl teacher train`: the config and step that made it
        meta["trained_by"] = bundle.extras["trained_by"]
    try:
        text = dumps(meta, indent=2, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise ApctlError(f"teacher description is not JSON-serialisable: {exc}") from None
    try:
        # JSON outermost: the weights are renamed into place first, the JSON last.
        with atomic_path(json_path) as tmp_json, atomic_path(weights_path) as tmp_weights:
            write_safetensors(tmp_weights, state_dict, metadata={
                "apctl_format_version": str(FORMAT_VERSION), "class_name": arch["class_name"],
                "fingerprint": fingerprint})
            tmp_json.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise ApctlError(f"cannot write {weights_path}: {exc.strerror or exc}") from None
    except Exception as exc:  # safetensors refuses e.g. tensors that share memory
        raise ApctlError(f"cannot write {weights_path}: {first_line(exc)}") from None
    bundle.fingerprint = fingerprint
    return weights_path, json_path
