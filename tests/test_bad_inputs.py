"""Every bad input ends in one line: generated bad configs and bad files, run through the real entry point.

The cases are generated, not listed: every leaf key of the config schema gets values of the wrong type
and out of its range or choices; run names that would leave runs/; hostile presets (not UTF-8, nested
too deep, endless `extends` chains, over-long names, FIFOs, devices); and a set of bad files (FIFO,
/dev/zero, directory, empty, random bytes, a zip bomb, truncated or mismatched checkpoints, statistics
with broken metadata, datasets with extreme labels) fed to every command that reads such a file.

Each case calls `apctl.cli.main.main` in-process (sys.argv patched, SystemExit caught) on a worker
thread with a timeout, from a workspace whose every file is fingerprinted before and after, and
asserts: exit code 1 or 2, exactly one line on stderr, no "Traceback", no hang, nothing created or
changed in the workspace.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import threading
import typing
import zipfile
from pathlib import Path

import pytest
import torch

from apctl import config as config_module
from tiny_runs import TINY_TOY2D

TIMEOUT = 30.0


# ------------------------------------------------------------------------------------------------
# The workspace: a real tiny run (checkpoint pair, statistics) and the files the cases mutate


TINY = TINY_TOY2D + """[training]
iterations = 2
batch_size = 8
log_every = 1
checkpoint_every = 1
eval_every = 0
"""


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under `root` with its kind, size and modification time (what 'nothing changed' means)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from apctl.presets import load_config
    from apctl.training.run import prepare, train

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "tiny.toml").write_text(TINY)
    cfg, _ = load_config(str(root / "tiny.toml"))
    run = prepare(cfg, root / "run")
    train(run)
    run.close()
    ckpt = root / "run" / "checkpoints" / "ckpt-0000002.json"
    files = root / "files"
    files.mkdir()
    _write_bad_files(files, ckpt, root / "run" / "precond_stats.safetensors")
    os.mkfifo(root / "fifo.toml")
    return root


def _write_bad_files(files: Path, ckpt: Path, stats: Path) -> None:
    from safetensors.torch import load_file

    from apctl.files import write_safetensors

    fifo = files / "fifo.pkl"
    os.mkfifo(fifo)
    (files / "empty.pkl").write_bytes(b"")
    (files / "random.pkl").write_bytes(os.urandom(4096))
    (files / "dir.pkl").mkdir()
    (files / "text.safetensors").write_bytes(b"not safetensors at all")
    (files / "header.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{")
    (files / "notutf8.json").write_bytes(b'{"format_version": 1, "class_name": "\xff\xfe"}')
    (files / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (files / "list.json").write_text("[1, 2, 3]")
    # A 1 MB zip bomb posing as a torch file: one deflated member of 200 MB of zeros.
    with zipfile.ZipFile(files / "bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (200 << 20))
    # A pickle of a dict nested 100,000 deep (the unpickler builds it without recursion).
    deep = io.BytesIO()
    deep.write(b"\x80\x04")
    for _ in range(100_000):
        deep.write(b"}\x8c\x01k")       # EMPTY_DICT, SHORT_BINUNICODE 'k'
    deep.write(b"N")                    # None innermost
    deep.write(b"s" * 100_000 + b".")   # SETITEM back out
    (files / "deep.pkl").write_bytes(deep.getvalue())

    # Checkpoints: the real pair, each mutated in one way.
    meta = json.loads(ckpt.read_text())
    tensors = load_file(str(ckpt.with_suffix(".safetensors")))

    def pair(name: str, meta_: dict | str, tensors_: dict | None = None, weights_bytes: bytes | None = None):
        folder = files / "ckpts"
        folder.mkdir(exist_ok=True)
        j = folder / f"{name}.json"
        j.write_text(meta_ if isinstance(meta_, str) else json.dumps(meta_))
        w = j.with_suffix(".safetensors")
        if weights_bytes is not None:
            w.write_bytes(weights_bytes)
        elif tensors_ is not None:
            write_safetensors(w, tensors_)

    for key in ("version", "step", "config", "student"):
        pair(f"missing-{key}", {k: v for k, v in meta.items() if k != key}, tensors)
        pair(f"mistyped-{key}", dict(meta, **{key: "x" if key != "config" else [1]}), tensors)
    huge_grid = json.loads(json.dumps(meta))
    huge_grid["config"]["objective"]["grid_points"] = 10 ** 9
    pair("grid-1e9", huge_grid, tensors)
    pair("no-precond-tensors", meta, {k: v for k, v in tensors.items() if not k.startswith("precond.")})
    ctm = json.loads(json.dumps(meta))
    ctm["config"]["precond"]["kind"] = "ctm"
    pair("says-ctm-has-precond", ctm, tensors)
    wider = json.loads(json.dumps(meta))
    wider["student"]["hidden"] = 24
    pair("arch-mismatch", wider, tensors)
    pair("arch-huge", dict(meta, student=dict(meta["student"], depth=10 ** 23)), tensors)
    pair("negative-step", dict(meta, step=-3), tensors)
    pair("bad-json", '{"format": "apctl-checkpoint", ', tensors)
    pair("truncated", meta, weights_bytes=ckpt.with_suffix(".safetensors").read_bytes()[:500])
    pair("weights-missing", meta)
    pair("no-ema", meta, {k: v for k, v in tensors.items() if not k.startswith("ema.")})

    # Statistics files with broken contents.
    from safetensors import safe_open

    with safe_open(str(stats), framework="numpy") as fh:
        smeta, arrays = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    sdir = files / "stats"
    sdir.mkdir()
    write_safetensors(sdir / "settings-not-json.safetensors", arrays, dict(smeta, settings="{not json"))
    write_safetensors(sdir / "extras-a-list.safetensors", arrays, dict(smeta, extras="[1, 2]"))
    write_safetensors(sdir / "no-format.safetensors", arrays, {k: v for k, v in smeta.items() if k != "format"})
    write_safetensors(sdir / "shape-mismatch.safetensors", dict(arrays, s=arrays["s"][:3]), smeta)
    write_safetensors(sdir / "scalar-lam.safetensors", dict(arrays, lam=arrays["lam"][:1].reshape(())), smeta)
    write_safetensors(sdir / "too-many-points.safetensors",
                      {k: torch.zeros(200_001, dtype=torch.float64) for k in ("lam", "l", "s")}, smeta)

    # Datasets (EDM folder layout) with bad dataset.json files.
    import numpy as np
    import PIL.Image

    for name, labels in {"label-huge": 10 ** 12, "label-negative": -1, "label-float": 1.5,
                         "label-vector": [0, 1], "label-string": "cat"}.items():
        d = files / "data" / name
        (d / "00000").mkdir(parents=True)
        for i in range(2):
            PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / "00000" / f"img{i:08d}.png")
        (d / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 0],
                                                               ["00000/img00000001.png", labels]]}))
    d = files / "data" / "labels-not-utf8"
    (d / "00000").mkdir(parents=True)
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "00000" / "img00000000.png")
    (d / "dataset.json").write_bytes(b'{"labels": "\xff"}')
    d = files / "data" / "labels-deep"
    (d / "00000").mkdir(parents=True)
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "00000" / "img00000000.png")
    (d / "dataset.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (files / "data" / "fifo-image").mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(files / "data" / "fifo-image" / "a.png")
    os.mkfifo(files / "data" / "fifo-image" / "b.png")


# ------------------------------------------------------------------------------------------------
# Generated cases


def _leaf_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        target = inner[0] if typing.get_origin(hint) is typing.Union and inner else hint
        if dataclasses.is_dataclass(target):
            if f.name in getattr(cls, "KINDS", {}) and f.name != "ctm":
                continue                  # sections of inactive kinds: the toy2d preset runs ctm
            yield from _leaf_fields(target, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint, f.metadata


def _bad_values(hint, meta) -> list[str]:
    """TOML values that this field must refuse."""
    origin = typing.get_origin(hint) or hint
    bad = []
    if origin is bool:
        bad += ["1", '"yes"']
    elif origin is int:
        bad += ['"3"', "1.5", "[1]"]
    elif origin is float:
        bad += ['"0.1"', "[0.1]", "nan", "inf"]
    elif origin is str:
        bad += ["3", "[1]", "{a = 1}"]
    elif origin is list:
        bad += ['"x"', "3"]
    if "choices" in meta:
        bad.append('"no-such-choice"')
    if meta.get("min") is not None:
        bad.append(str(meta["min"] - (1 if origin is int else 1.5)))
    if meta.get("max") is not None:
        bad.append(str(meta["max"] * 10 + 1))
    return bad


def _config_cases():
    cases = []
    for key, hint, meta in _leaf_fields(config_module.Config):
        if key in ("teacher.stds",):     # Any: a number or a list, checked by `validate`
            continue
        for value in _bad_values(hint, meta):
            cases.append((f"set {key}={value}", ["distill", "--set", f"{key}={value}", "--out", "out"]))
    for name in ["../escape", "/abs/path", "", ".", "..", "a/b", "x" * 300, "nul\0byte"]:
        cases.append((f"run.name={name[:20]!r}", ["distill", "--set", f"run.name={json.dumps(name)}"]))
    for text in ["no-equals", "=3", "a..b=1", "training.lr=[[[[" + "[" * 5000, "nosuch.key=1",
                 "training.nosuch=1", "training=3", "objective.cd.x=1", "x" * 300 + "=1"]:
        cases.append((f"--set {text[:24]}", ["distill", "--set", text, "--out", "out"]))
    return cases


def _write_presets(root: Path) -> None:
    presets = root / "presets"
    presets.mkdir(exist_ok=True)
    made = {
        "latin1.toml": "[run]\nname = 'caf\xe9'\n".encode("latin-1"),
        "deep.toml": b"a = " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
        "deep-tables.toml": b"[" + b".".join([b"t"] * 5000) + b"]\nx = 1\n",
        "invalid.toml": b"[run\nname = \n",
        "big.toml": b"# " + b"x" * (2 << 20) + b"\n",
        "unknown-table.toml": b'extends = "toy2d"\n[nosuch]\nx = 1\n',
        "extends-missing.toml": b'extends = "no-such-preset-anywhere"\n',
        "extends-number.toml": b"extends = 3\n",
        "cycle-a.toml": b'extends = "cycle-b.toml"\n',
        "cycle-b.toml": b'extends = "cycle-a.toml"\n',
    }
    for i in range(100):      # a chain of 100 presets, each extending the next
        made[f"chain{i}.toml"] = (f'extends = "chain{i + 1}.toml"\n' if i < 99 else 'extends = "toy2d"\n').encode()
    for name, data in made.items():
        (presets / name).write_bytes(data)


def _out_cases(root: Path):
    tiny = str(root / "tiny.toml")
    return [
        ("--out empty", ["distill", "--preset", tiny, "--out", ""]),
        ("--out blank", ["distill", "--preset", tiny, "--out", "  "]),
        ("--out existing file", ["distill", "--preset", tiny, "--out", "tiny.toml"]),
        ("--out under a file", ["distill", "--preset", tiny, "--out", "tiny.toml/sub"]),
        ("--out /dev/null", ["distill", "--preset", tiny, "--out", "/dev/null"]),
        ("--out /proc/self", ["distill", "--preset", tiny, "--out", "/proc/self"]),
        ("--out /proc/new", ["distill", "--preset", tiny, "--out", "/proc/apctl-run"]),
        ("--out /sys", ["distill", "--preset", tiny, "--out", "/sys/apctl-run"]),
        ("teacher train --out empty", ["teacher", "train", "--out", ""]),
    ]


BAD_TEACHERS = ["fifo.pkl", "empty.pkl", "random.pkl", "dir.pkl", "text.safetensors", "header.safetensors",
                "notutf8.json", "deep.json", "list.json", "bomb.pt", "deep.pkl", "missing.pkl"]
BAD_CHECKPOINTS = ["missing-version", "missing-step", "missing-config", "missing-student", "mistyped-version",
                   "mistyped-step", "mistyped-config", "mistyped-student", "grid-1e9", "no-precond-tensors",
                   "says-ctm-has-precond", "arch-mismatch", "arch-huge", "negative-step", "bad-json", "truncated",
                   "weights-missing", "no-ema"]
BAD_STATS = ["settings-not-json", "extras-a-list", "no-format", "shape-mismatch", "scalar-lam", "too-many-points"]
BAD_DATA = ["label-huge", "label-negative", "label-float", "label-vector", "label-string", "labels-not-utf8",
            "labels-deep", "fifo-image"]


def _file_cases(root: Path):
    f = root / "files"
    cases = []
    for name in BAD_TEACHERS:
        p = str(f / name)
        cases += [
            (f"teacher import {name}", ["teacher", "import", p, "--output", "out/t.safetensors"]),
            (f"distill --teacher {name}", ["distill", "--preset", "digits-net", "--teacher", p, "--out", "out"]),
            (f"precond compute --teacher {name}", ["precond", "compute", "--preset", "digits-net", "--teacher", p,
                                                   "--output", "out/s.safetensors"]),
        ]
    for name in ["fifo.pkl", "random.pkl", "text.safetensors", "deep.json", "list.json", "dir.pkl"]:
        p = str(f / name)
        cases += [(f"sample --ckpt {name}", ["sample", "--ckpt", p, "--out", "out/x.npz"]),
                  (f"eval --ckpt {name}", ["eval", "--ckpt", p, "--n", "8"]),
                  (f"precond inspect {name}", ["precond", "inspect", p]),
                  (f"distill --data {name}", ["distill", "--preset", "digits", "--data", p, "--out", "out"])]
    for name in BAD_CHECKPOINTS:
        p = str(f / "ckpts" / f"{name}.json")
        cases += [(f"sample ckpt {name}", ["sample", "--ckpt", p, "--out", "out/x.npz", "--n", "4"]),
                  (f"eval ckpt {name}", ["eval", "--ckpt", p, "--n", "8", "--nfe", "1", "--teacher-steps", "2"])]
    for name in BAD_STATS:
        p = str(f / "stats" / f"{name}.safetensors")
        cases += [(f"precond inspect {name}", ["precond", "inspect", p]),
                  (f"precond plot {name}", ["precond", "plot", p, "--output", "out/p.png"]),
                  (f"distill statistics_file {name}", ["distill", "--preset", str(root / "tiny.toml"), "--set",
                                                       f"precond.statistics_file={json.dumps(p)}", "--out", "out"])]
    for name in BAD_DATA:
        p = str(f / "data" / name)
        cases += [(f"distill --data {name}", ["distill", "--preset", "digits", "--data", p, "--out", "out"]),
                  (f"teacher train --data {name}", ["teacher", "train", "--data", p, "--out", "out"])]
    return cases


def _all_cases():
    # The workspace path is known only once the fixture runs: cases name it through a placeholder.
    root = Path("{root}")
    return _config_cases() + _preset_cases_placeholder() + [
        (name, argv) for name, argv in _out_cases(root) + _file_cases(root)]


def _preset_cases_placeholder():
    names = ["latin1.toml", "deep.toml", "deep-tables.toml", "invalid.toml", "big.toml", "unknown-table.toml",
             "extends-missing.toml", "extends-number.toml", "cycle-a.toml", "cycle-b.toml", "chain0.toml"]
    cases = [(f"preset {n}", ["distill", "--preset", f"{{root}}/presets/{n}", "--out", "out"]) for n in names]
    return cases + [
        ("preset fifo", ["distill", "--preset", "{root}/fifo.toml", "--out", "out"]),
        ("preset /dev/zero", ["distill", "--preset", "/dev/zero", "--out", "out"]),
        ("preset directory", ["distill", "--preset", "{root}/presets/", "--out", "out"]),
        ("preset long name", ["distill", "--preset", "p" * 300, "--out", "out"]),
        ("preset long path", ["distill", "--preset", "/".join(["d" * 200] * 30) + ".toml", "--out", "out"]),
        ("preset unknown", ["distill", "--preset", "no-such-preset", "--out", "out"]),
    ]


CASES = _all_cases()


def test_there_are_at_least_200_cases():
    assert len(CASES) >= 200, len(CASES)


def _run_main(argv: list[str]) -> tuple[int | None, BaseException | None]:
    """apctl.cli.main.main() with `argv`, on this thread; (exit code, unexpected exception)."""
    from apctl.cli.main import main

    old = sys.argv
    sys.argv = ["apctl", *argv]
    try:
        main()
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 1), None
    except BaseException as exc:       # noqa: BLE001 — a traceback is exactly what the test must catch
        return None, exc
    finally:
        sys.argv = old
    return 0, None


@pytest.fixture(scope="module")
def prepared(workspace):
    _write_presets(workspace)
    return workspace


@pytest.mark.parametrize("name,argv", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(prepared, name, argv, capsys, monkeypatch):
    root = prepared
    argv = [a.replace("{root}", str(root)) for a in argv]
    monkeypatch.chdir(root)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("APCTL_PRESETS", "")
    before = _tree(root)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(_run_main(argv)), daemon=True)
    worker.start()
    worker.join(TIMEOUT)
    assert not worker.is_alive(), f"apctl {' '.join(argv)[:200]} still running after {TIMEOUT} s (a hang)"
    code, exc = result[0]
    err = capsys.readouterr().err
    assert exc is None, f"uncaught {type(exc).__name__}: {exc}"
    assert "Traceback" not in err, err
    assert code in (1, 2), f"exit code {code}; stderr: {err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err[:2000]}"
    assert _tree(root) == before, "files were created or changed"
