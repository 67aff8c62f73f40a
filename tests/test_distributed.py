"""DistributedDataParallel on CPU (gloo): `torchrun --standalone --nproc_per_node=2 -m apctl.cli.main distill`.

The toy2d preset with CTM preconditioning (no statistics to estimate), 6 then 8 iterations: rank 0 alone
writes files (one metrics line per logged step, the checkpoints), re-running the same command resumes,
and a global batch that does not split over the processes is refused with one line. torchrun is launched
as `python -m torch.distributed.run` (the module behind the `torchrun` script), so its workers use this
interpreter rather than whichever `torchrun` is first on PATH. About 40 s on 2 shared cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

NPROC = 2
BASE = ["--set", "training.batch_size=8", "--set", "precond.kind=\"ctm\"", "--set", "training.eval_every=0",
        "--set", "training.log_every=2", "--set", "training.checkpoint_every=3",
        "--set", "training.lr_schedule=constant"]   # a run is extended from 6 to 8 iterations: toy2d's decaying lr would refuse


def _torchrun_or_skip() -> None:
    import torch.distributed as dist

    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is not available in this torch build")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")


def torchrun(args, cwd: Path, cli, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           "-m", "apctl.cli.main", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=cli.env(), capture_output=True, text=True, timeout=timeout)


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"$ {' '.join(map(str, result.args))}\nexit {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli):
    """The 6-iteration run, then the same command with iterations=8 (a resume), with what was on disk between."""
    _torchrun_or_skip()
    ws = tmp_path_factory.mktemp("ddp")
    first = torchrun(["distill", "--out", "run", "--set", "training.iterations=6", *BASE], ws, cli)
    assert first.returncode == 0, describe(first)
    run_dir = ws / "run"
    between = {
        "metrics": (run_dir / "metrics.jsonl").read_text(),
        "ckpt6": {p.name: sha(p) for p in (run_dir / "checkpoints").glob("ckpt-0000006.*")},
        "files": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
    }
    second = torchrun(["distill", "--out", "run", "--set", "training.iterations=8", *BASE], ws, cli)
    assert second.returncode == 0, describe(second)
    return {"ws": ws, "run": run_dir, "first": first, "second": second, "between": between}


def test_two_process_run_writes_once_from_rank_0(runs):
    first, between = runs["first"], runs["between"]
    assert "Traceback" not in first.stderr, describe(first)
    assert first.stdout.count("run directory:") == 1, describe(first)  # the summary: rank 0 only
    lines = [ln for ln in between["metrics"].splitlines() if ln.strip()]
    assert [json.loads(ln)["step"] for ln in lines] == [2, 4, 6], between["metrics"]
    for ln in lines:
        logs = json.loads(ln)
        assert {"loss", "ctm", "dsm", "step", "it_per_s"} <= logs.keys(), logs
    # checkpoint_every = 3, keep_checkpoints = 2 (toy2d's default): steps 3 and 6.
    assert between["files"] == ["ckpt-0000003.json", "ckpt-0000003.safetensors",
                                "ckpt-0000006.json", "ckpt-0000006.safetensors"], between["files"]
    assert len(between["ckpt6"]) == 2


def test_rerun_with_more_iterations_resumes(runs):
    second, between, run_dir = runs["second"], runs["between"], runs["run"]
    assert "Traceback" not in second.stderr, describe(second)
    assert second.stdout.count("resuming") == 1 and "from step 6" in second.stdout, describe(second)
    # Steps 7 and 8 appended, nothing logged twice, the first run's lines kept as they were.
    assert logged_steps(run_dir) == [2, 4, 6, 8]
    assert (run_dir / "metrics.jsonl").read_text().startswith(between["metrics"])
    # The step-6 checkpoint it resumed from is untouched; a fresh start would have rewritten it.
    assert {p.name: sha(p) for p in (run_dir / "checkpoints").glob("ckpt-0000006.*")} == between["ckpt6"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "ckpt-0000006.json", "ckpt-0000006.safetensors", "ckpt-0000008.json", "ckpt-0000008.safetensors"]
    meta = json.loads((run_dir / "checkpoints" / "ckpt-0000008.json").read_text())
    assert meta["step"] == 8 and meta["config"]["training"]["iterations"] == 8
    # The optimizer state went on from the restored one: 8 optimizer steps in all.
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "checkpoints" / "ckpt-0000008.safetensors"))
    steps = {float(v) for k, v in tensors.items() if k.startswith("optim.") and k.endswith(".step")}
    assert steps == {8.0}, steps


def test_batch_not_divisible_by_world_size_is_one_line(runs, cli):
    """training.batch_size = 7 over 2 processes: one 'error:' line (not one per rank), and refused before
    any work — no run directory, as for every other configuration error."""
    ws = runs["ws"]
    result = torchrun(["distill", "--out", "odd", "--set", "training.iterations=6", *BASE,
                       "--set", "training.batch_size=7"], ws, cli)
    assert result.returncode != 0, describe(result)
    # torchrun itself reports a failed worker with its own traceback (ChildFailedError); apctl's part is
    # the 'error:' lines of the workers.
    errors = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("error:")]
    problems = []
    if len(errors) != 1:
        problems.append(f"expected one 'error:' line, got {len(errors)}: {errors}")
    if not errors or "training.batch_size" not in errors[0] or "7" not in errors[0] or str(NPROC) not in errors[0]:
        problems.append(f"the error should name training.batch_size = 7 and the {NPROC} processes: {errors}")
    if (ws / "odd").exists():
        problems.append(f"a run directory was written before the refusal: {sorted(p.name for p in (ws / 'odd').iterdir())}")
    assert not problems, "\n".join(problems) + "\n" + describe(result)
