"""Shared helpers for the CLI, config and end-to-end recipe tests.

There is deliberately no tests/__init__.py (torch-fidelity installs a top-level package named
`tests`), so the helpers are handed out as fixtures rather than imported. Plain helper modules of
this directory (`oracles`, `edm_pickle_fixtures`) are imported by their own names: this directory is
put first on sys.path below (under names no installed distribution uses: see test_oracles_module_is_ours).

The CLI is exercised through its real entry point, `python -m apctl.cli.main …`, in a subprocess:
`apctl.cli.main.main()` is where an `ApctlError` becomes one red line on stderr and exit code 1, and
the subprocess also proves that the command line parses the way a user types it.

Threads: this process pins torch to one thread unless OMP_NUM_THREADS says otherwise, and CLI
subprocesses get OMP_NUM_THREADS=1 unless the caller set it. On the shared 2-core machine (other
processes keep its load average at 3–4) torch's default of 2 threads oversubscribes the cores:
the rest of the suite (265 tests: everything but test_config/test_cli/test_recipes) took 390 s and
401 s with OMP_NUM_THREADS unset, and 132 s and 141 s with `torch.set_num_threads(1)` (two runs each,
alternating). With OMP_NUM_THREADS=1 in the environment (the recommended way to run the tests) the
call is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
PRESET_DIR = REPO / "presets"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: wide, uncoloured rich output; one OMP thread by default."""
    env = dict(os.environ)
    env.pop("APCTL_PRESETS", None)       # presets come from the repository, not from the caller's setup
    # The code under test is this checkout's, whichever apctl is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("WORLD_SIZE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(COLUMNS="250", NO_COLOR="1", TERM="dumb", PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


def run_cli(args, cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`apctl ARGS` as a user runs it (the real `main()`), from `cwd`; text output captured."""
    cmd = [sys.executable, "-m", "apctl.cli.main", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


class Background:
    """`apctl ARGS` running in the background; stdout/stderr go to files in cwd (no pipe to fill up)."""

    def __init__(self, args, cwd: Path, log_name: str, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", "apctl.cli.main", *map(str, args)]
        self.out_path, self.err_path = cwd / f"{log_name}.out", cwd / f"{log_name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(self.args, cwd=cwd, env=env or cli_env(), stdout=out, stderr=err)

    def result(self, timeout: float = 900) -> subprocess.CompletedProcess:
        """Wait for it (killing it on timeout) and return it as a CompletedProcess."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return subprocess.CompletedProcess(self.args, self.proc.returncode, self.out_path.read_text(),
                                           self.err_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_cli_parallel(jobs, *, workers: int = 2) -> list[subprocess.CompletedProcess]:
    """Independent `(args, cwd)` CLI calls, `workers` at a time (the machine has 2 cores); results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_cli(job[0], job[1]), jobs))


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


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (mtime_ns, size, sha256) and directory under `root`, by relative path: equal snapshots
    before and after a command prove it modified, created and deleted nothing there."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ("dir",)
    return out


class Cli:
    """The fixture object: `cli(args, cwd)`, plus the assertion helpers above."""

    run = staticmethod(run_cli)
    parallel = staticmethod(run_cli_parallel)
    background = Background
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
