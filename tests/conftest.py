"""Shared helpers for the CLI, config and end-to-end recipe tests.

There is deliberately no tests/__init__.py (torch-fidelity installs a top-level package named
`tests`), so the helpers are handed out as fixtures rather than imported.

The CLI is exercised through its real entry point, `python -m apctl.cli.main …`, in a subprocess:
`apctl.cli.main.main()` is where an `ApctlError` becomes one red line on stderr and exit code 1, and
the subprocess also proves that the command line parses the way a user types it.

Threads: CLI subprocesses get OMP_NUM_THREADS=1 unless the caller set it (a run pins its own threads
with `run.threads`; the toy presets do). This process keeps torch's default thread count: on this
2-core machine `torch.set_num_threads(1)` here made no measurable difference to the suite (the
in-process work of these tests is tiny and the heavy lifting happens in the subprocesses), so it is
not called — see the measurements in the report that introduced this file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO / "presets"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: wide, uncoloured rich output; one OMP thread by default."""
    env = dict(os.environ)
    env.pop("APCTL_PRESETS", None)       # presets come from the repository, not from the caller's setup
    env.pop("WORLD_SIZE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(COLUMNS="250", NO_COLOR="1", TERM="dumb", PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


def run_cli(args, cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`apctl ARGS` as a user runs it (the real `main()`), from `cwd`; text output captured."""
    cmd = [sys.executable, "-m", "apctl.cli.main", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"$ {' '.join(map(str, result.args[2:]))}\nexit {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")


def assert_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    return result


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, exactly one non-empty line on stderr, no traceback; returns that line."""
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, "expected one line on stderr\n" + describe(result)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in the error line\n" + describe(result)
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root`: (mtime_ns, size, sha256) by relative path, to prove nothing was touched."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


class Cli:
    """The fixture object: `cli(args, cwd)`, plus the assertion helpers above."""

    run = staticmethod(run_cli)
    env = staticmethod(cli_env)
    ok = staticmethod(assert_ok)
    user_error = staticmethod(assert_user_error)
    snapshot = staticmethod(snapshot)
    describe = staticmethod(describe)

    def __call__(self, args, cwd: Path, **kw) -> subprocess.CompletedProcess:
        return run_cli(args, cwd, **kw)


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def preset_dir() -> Path:
    return PRESET_DIR
