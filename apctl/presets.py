"""Presets: TOML files of config data, found by name, layered and validated into a `Config`.

A preset may start with `extends = "NAME"` to inherit another preset and change a few keys; the
command line adds layers on top (plain paths from --teacher/--data, then each `--set key=value`).
Layers merge table by table; where a table's `kind` changes, the old kind's section is dropped.
Each layer is validated on the merged whole, so an error names the layer that caused it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from apctl.config import Config, ConfigError, config_from_dict, validate
from apctl.errors import ApctlError
from apctl.files import read_bounded

PRESET_DIR_ENV = "APCTL_PRESETS"


# A preset is a few kilobytes; its `extends` chain a few files deep.
MAX_PRESET_BYTES = 1 << 20
MAX_EXTENDS_DEPTH = 32
MAX_NAME_CHARS = 255


def _read_toml(path: Path) -> dict:
    import tomli

    data = read_bounded(path, MAX_PRESET_BYTES, "preset")
    try:
        return tomli.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApctlError(f"{path}: not UTF-8 text (byte {exc.start}); presets are UTF-8 TOML") from None
    except tomli.TOMLDecodeError as exc:
        raise ApctlError(f"{path}: not valid TOML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ApctlError(f"{path}: not valid TOML (nested too deeply)") from None


def preset_dirs() -> list[Path]:
    """Where preset names are looked up: $APCTL_PRESETS, ./presets, then the presets shipped with apctl
    (the repository's presets/ for a clone, <prefix>/share/apctl/presets for a wheel)."""
    dirs = []
    if os.environ.get(PRESET_DIR_ENV):
        dirs.append(Path(os.environ[PRESET_DIR_ENV]))
    dirs.append(Path.cwd() / "presets")
    dirs.append(Path(__file__).resolve().parent.parent / "presets")     # a clone / editable install
    dirs.append(Path(sys.prefix) / "share" / "apctl" / "presets")        # a wheel install
    seen, unique = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def available_presets() -> list[str]:
    names = set()
    for d in preset_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def find_preset(name_or_path: str) -> Path:
    """A preset by file path (anything ending in .toml) or by name in `preset_dirs()`."""
    if len(name_or_path) > 4096 or any(len(part) > MAX_NAME_CHARS for part in name_or_path.split(os.sep)):
        raise ApctlError(f"preset name too long ({len(name_or_path)} characters): {name_or_path[:60]}…")
    if "\0" in name_or_path:
        raise ApctlError("preset name contains a NUL character")
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ApctlError(f"preset file not found: {path}")
        return path
    for d in preset_dirs():
        candidate = d / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    raise ApctlError(f"unknown preset '{name_or_path}' (available: {', '.join(available_presets()) or 'none'}; "
                     f"looked in {', '.join(str(d) for d in preset_dirs())})")


def _merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, table by table. Where a table's `kind` changes, the section of
    the old kind (a sub-table named after it, e.g. [objective.ctm]) is dropped, not inherited."""
    out = dict(base)
    old_kind, new_kind = base.get("kind"), override.get("kind")
    if isinstance(old_kind, str) and new_kind is not None and new_kind != old_kind and isinstance(out.get(old_kind), dict):
        del out[old_kind]
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _load_layers(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in chain:
        raise ApctlError(f"{path}: 'extends' forms a cycle")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise ApctlError(f"{path}: 'extends' chain deeper than {MAX_EXTENDS_DEPTH} presets")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(str(path), "extends", "expected a preset name")
    try:
        parent_path = (path.parent / parent) if parent.endswith(".toml") else find_preset(parent)
        if not parent_path.is_file():
            raise ApctlError(f"file not found: {parent_path}")
    except ConfigError:
        raise
    except ApctlError as exc:
        raise ConfigError(str(path), "extends", str(exc)) from None
    return _merge(_load_layers(parent_path, chain + (path.resolve(),)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' → (['a', 'b'], value), the value read as TOML (bare words are strings)."""
    import tomli

    if "=" not in text:
        raise ApctlError(f"--set expects key=value, got {text[:80]!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or any(not part for part in key.split(".")) or len(key) > MAX_NAME_CHARS:
        raise ApctlError(f"--set expects a dotted key like training.lr, got {key[:80]!r}")
    try:
        value = tomli.loads(f"v = {raw}")["v"]
    except tomli.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ApctlError(f"--set {key}: value nested too deeply") from None
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(preset: str, overrides: list[str] = (), paths: dict | None = None) -> tuple[Config, Path]:
    """The validated Config of a preset (name or .toml path), then `paths` (plain values from
    command-line flags such as --teacher and --data, e.g. {"teacher": {"file": ...}}), then the
    `--set key=value` overrides, in that order.

    Keys, types, ranges and sections are checked layer by layer on the merged whole (so an error
    names the layer that caused it); the preset must also pass the cross-field rules on its own. The
    command-line layers are checked against those rules together, once, at the end — a rule broken
    by one `--set` may be mended by the next (grid_points=6 then ctm.max_teacher_steps=3).
    """
    path = find_preset(preset)
    data = _load_layers(path)
    cfg = config_from_dict(data, str(path))
    layers = [("command-line paths", paths)] if paths else []
    layers += [(f"--set {text}", _nest(*parse_override(text))) for text in overrides]
    for source, layer in layers:
        data = _merge(data, layer)
        cfg = config_from_dict(data, source, cross_field=False)
    if layers:
        validate(cfg, " ".join(source for source, _ in layers))
    return cfg, path


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML, saved with every run (re-loadable with `load_config`)."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())
