"""Training at scale (issue 11): micro-batches and accumulation, per-sample draws, the learning-rate schedule,
the guarded step, metrics across ranks, TensorBoard, and DDP hygiene (weights checked equal, two nodes).

Each test states its independent fact: a split batch draws what the whole batch draws (row by row); the
accumulated gradient is the global batch's mean, so 1 process × 4 micro-batches, 2 processes × 2 (two torchrun
"nodes" meeting through a c10d rendezvous on localhost) and 1 × 1 end at the same weights up to float
rounding (tolerance below); the schedule is the closed form of training/schedule.py's docstring, evaluated
by hand here; a non-finite step leaves every tensor as it was; metrics.jsonl parses as strict JSON.
CTM's adaptive DSM weight is computed per micro-batch (as in CTM's code), so the weight-equality runs use
the fixed weight (`objective.ctm.dsm_weighting = "fixed"`), where the objective is linear in the rows.
About 60 s of CPU, most of it the two torchrun processes.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apctl.config import TrainingConfig
from apctl.draws import GeneratorDraws, RowDraws, SMALL_ROW
from apctl.errors import ApctlError

# Float32 sums of the same rows in different groupings differ by rounding only: after 4 RAdam steps (its
# first steps are un-normalised momentum steps, so nothing amplifies a small gradient difference) the
# weights agree to ~1e-10 here; the stated tolerance leaves four orders of magnitude of room. Hence RAdam
# below, not toy2d's Adam: Adam's first step is lr·g/(|g| + ε) per entry, which turns a rounding-sized
# difference in a near-zero gradient entry into a difference of up to lr in the weight (1e-5 seen).
RTOL, ATOL = 1e-5, 1e-6

TOY = ['precond.kind="ctm"', "training.eval_every=0", "run.threads=1", "training.batch_size=8",
       "training.iterations=4", "training.log_every=2", "training.checkpoint_every=2",
       'objective.ctm.dsm_weighting="fixed"', 'training.optimizer="radam"', "training.betas=[0.9, 0.999]",
       'training.lr_schedule="constant"']   # runs here are extended on resume; toy2d's decaying lr would refuse that


def _run(tmp_path: Path, name: str, *overrides: str):
    from apctl.presets import load_config
    from apctl.training.run import prepare, train

    cfg, _ = load_config("toy2d", [*TOY, *overrides])
    run = train(prepare(cfg, tmp_path / name))
    run.close()                  # release the run directory's lock, as the CLI does, so it can be resumed
    return run


def _weights(run) -> dict[str, torch.Tensor]:
    nets = {"student": run.student, "target": run.target, "ema": run.ema}
    return {f"{n}.{k}": v.detach().clone() for n, net in nets.items() for k, v in net.state_dict().items()}


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    bad = [k for k in a if not torch.allclose(a[k], b[k], rtol=RTOL, atol=ATOL)]
    assert not bad, f"{what}: {bad[:4]} differ (max |Δ| {worst:.2e})"


# --- per-sample draws -------------------------------------------------------------------------------------

@pytest.mark.parametrize("row_shape", [(), (2,), (3, 16, 16)])
def test_row_draws_of_a_split_batch_are_the_whole_batch_rows(row_shape):
    """Rows [a, b) of a step draw the values those rows draw when the whole batch is drawn at once, draw after
    draw (small draws: one generator per draw; large ones, 3·16·16 > SMALL_ROW values: one per row)."""
    total, key = 12, (5, 17)
    assert (math.prod(row_shape) > SMALL_ROW) == (len(row_shape) == 3)

    def draws(rows):
        d = RowDraws(key, rows, total)
        probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
        return [d.randn(row_shape), d.rand(row_shape, dtype=torch.float64), d.randint(7), d.categorical(probs),
                d.randn(row_shape)]

    whole = draws(range(total))
    for parts in ([range(0, 4), range(4, 8), range(8, 12)], [range(0, 6), range(6, 12)], [range(0, 1), range(1, 12)]):
        pieces = [draws(rows) for rows in parts]
        for n, value in enumerate(whole):
            assert torch.equal(torch.cat([p[n] for p in pieces]), value), (parts, n)
    assert not torch.equal(whole[0], whole[4])                         # successive draws are not repeats
    other_step = RowDraws((5, 18), range(total), total).randn(row_shape)
    assert not torch.equal(other_step, whole[0])


def test_categorical_draw_follows_the_probabilities():
    """The inverse-CDF draw of RowDraws: frequencies over 40,000 rows within 5 standard errors of the
    probabilities, zero-probability classes never drawn, per-row probabilities honoured row by row."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 40_000
    k = RowDraws((1, 2), range(n), n).categorical(probs)
    freq = torch.bincount(k, minlength=4).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert torch.all((freq - probs.double()).abs() <= 5 * se + 1e-12), freq
    per_row = torch.zeros(6, 4)
    per_row[torch.arange(6), torch.tensor([3, 0, 2, 2, 1, 3])] = 1.0
    assert RowDraws((1, 3), range(6), 6).categorical(per_row).tolist() == [3, 0, 2, 2, 1, 3]


def test_generator_draws_are_the_plain_torch_calls():
    """GeneratorDraws keeps the streams of code that passes a torch.Generator (statistics, samples): each draw
    is the torch call with that generator."""
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d = GeneratorDraws(a, 5)
    assert torch.equal(d.randn((2,)), torch.randn((5, 2), generator=b))
    assert torch.equal(d.randint(9), torch.randint(0, 9, (5,), generator=b))
    probs = torch.tensor([0.5, 0.5])
    assert torch.equal(d.categorical(probs), torch.multinomial(probs, 5, replacement=True, generator=b))


# --- micro-batches and accumulation -------------------------------------------------------------------------

def test_micro_batches_split_each_rank_share_as_edm_does():
    """Rank r holds rows [r·B/W, (r + 1)·B/W); batch_per_device 0 or ≥ the share is one micro-batch (EDM's
    batch_gpu rule); one that does not divide the share, or a batch that does not divide over the ranks, is
    refused with one line naming the key."""
    from apctl.training.step import micro_batches

    assert micro_batches(16, 2, 1, 0) == [range(8, 16)]
    assert micro_batches(16, 2, 1, 99) == [range(8, 16)]
    assert micro_batches(16, 2, 0, 4) == [range(0, 4), range(4, 8)]
    assert micro_batches(16, 1, 0, 2) == [range(a, a + 2) for a in range(0, 16, 2)]
    with pytest.raises(ApctlError, match=r"training.batch_per_device = 3 .* 8 rows"):
        micro_batches(16, 2, 0, 3)
    with pytest.raises(ApctlError, match="training.batch_size = 7"):
        micro_batches(7, 2, 0, 0)


def test_micro_batches_change_only_float_rounding(tmp_path):
    """1 process × 4 micro-batches of 2 and 1 × 1 batch of 8: the same weights (θ, θ⁻, EMA) after 4 steps within
    the stated tolerance, and the same logged losses (the micro-batch logs are weighted by their rows)."""
    one = _run(tmp_path, "one", "training.batch_per_device=0")
    four = _run(tmp_path, "four", "training.batch_per_device=2")
    _assert_close(_weights(one), _weights(four), "1 × 1 vs 1 × 4")
    for a, b in zip(one.history, four.history):
        for key in ("loss", "ctm", "dsm", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_resume_with_micro_batches_is_exact(tmp_path):
    """A run of 4 steps in micro-batches of 2 stopped after its step-2 checkpoint and re-run ends bit-identical to
    the uninterrupted run (a resume = a re-run; batch_per_device may even change on resume, rounding only)."""
    straight = _run(tmp_path, "straight", "training.batch_per_device=2")
    _run(tmp_path, "resumed", "training.batch_per_device=2", "training.iterations=2")
    resumed = _run(tmp_path, "resumed", "training.batch_per_device=2")
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if torch.is_tensor(sa[i][k]))


# --- two nodes × one process, 2 micro-batches each ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, cli):
    """Two torchrun invocations (`--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d`, one per "node") meeting on
    localhost, training the same run directory: 2 processes × 2 micro-batches of 2."""
    import importlib.util

    import torch.distributed as dist

    if importlib.util.find_spec("torch.distributed.run") is None or not dist.is_gloo_available():
        pytest.skip("torchrun with gloo is not available in this torch build")
    ws = tmp_path_factory.mktemp("two-nodes")
    port = _free_port()
    args = ["distill", "--out", "run", *[a for s in TOY for a in ("--set", s)], "--set", "training.batch_per_device=2"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "apctl-test",
                               "-m", "apctl.cli.main", *args],
                              cwd=ws, env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    return ws / "run", outputs


@pytest.mark.slow
def test_two_nodes_share_one_run_and_write_once(two_nodes):
    run_dir, outputs = two_nodes
    assert sum(out.count("run directory: run") for out in outputs) == 1, outputs   # the summary: rank 0 only
    assert all("Traceback" not in out for out in outputs)
    assert [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4]


@pytest.mark.slow
def test_two_processes_by_two_micro_batches_equal_one_by_four(two_nodes, tmp_path):
    """The 2 × 2 checkpoint of step 4 against an in-process 1 × 4 run: same weights within the tolerance; and the
    logged interval means (averaged over the logging interval and over ranks) are the 1-process ones."""
    from safetensors.torch import load_file

    run_dir, _ = two_nodes
    four = _run(tmp_path, "four", "training.batch_per_device=2")
    tensors = load_file(str(run_dir / "checkpoints" / "ckpt-0000004.safetensors"))
    _assert_close({k: v for k, v in tensors.items() if k.split(".")[0] in ("student", "target", "ema")},
                  _weights(four), "2 × 2 vs 1 × 4")
    logged = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(logged, four.history):
        for key in ("loss", "ctm", "dsm", "grad_norm", "skipped"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


# --- DDP hygiene: the weights are compared across ranks -----------------------------------------------------

def _check_weights_worker(rank: int, store: str, out: str) -> None:
    """Rank r: equal networks (seed 1 on both ranks), then different ones (seed 1 + r)."""
    import torch.distributed as dist

    from apctl.training import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    messages = []
    for seed in (1, 1 + rank):
        torch.manual_seed(seed)
        try:
            distributed.check_same_weights({"student": torch.nn.Linear(3, 2), "target": None}, 7)
            messages.append("same")
        except ApctlError as exc:
            messages.append(str(exc))
    Path(f"{out}.{rank}").write_text(json.dumps(messages))
    dist.destroy_process_group()


def test_ranks_with_different_weights_are_refused(tmp_path):
    """Two gloo processes holding equal networks pass; different ones both stop with one line naming the
    network and the step."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    mp.start_processes(_check_weights_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, start_method="fork")
    for rank in range(2):
        same, different = json.loads(Path(f"{out}.{rank}").read_text())
        assert same == "same"
        assert "\n" not in different and "different student weights at step 7" in different, different


# --- the learning-rate schedule -----------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_is_the_closed_form(schedule):
    """lr(k) for T = 10, W = 3, lr = 0.5, floor 0.2, by hand: warm-up 1/3, 2/3, 1 of lr on k = 0, 1, 2; then
    progress p = (k − 3)/7 from 0, decaying to 0.2·lr at k = T."""
    from apctl.training.schedule import learning_rate

    tc = TrainingConfig(iterations=10, lr=0.5, lr_warmup=3, lr_schedule=schedule, lr_floor=0.2)
    for k in range(12):
        warm = min(1.0, (k + 1) / 3)
        p = min(1.0, max(0.0, (k - 3) / 7))
        decay = {"constant": 1.0, "linear": 0.2 + 0.8 * (1 - p), "cosine": 0.2 + 0.8 * (1 + math.cos(math.pi * p)) / 2}
        assert learning_rate(tc, k) == pytest.approx(0.5 * warm * decay[schedule], rel=1e-12), k
    assert learning_rate(tc, 10) == pytest.approx(0.5 * (0.2 if schedule != "constant" else 1.0))
    assert learning_rate(TrainingConfig(lr=0.3), 0) == 0.3                  # no warm-up: the paper's constant rate


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learning_rate_holds_for_the_fraction_lr_hold(schedule):
    """With lr_hold = 0.5 after a warm-up W = 2 (T = 10): the warm-up, lr held on 2 ≤ k ≤ 6 (the decay starts
    at D = 2 + 0.5·8 = 6), then the decay over p = (k − 6)/4 to lr_floor·lr at k = T; lr_hold = 0 is no hold."""
    from apctl.training.schedule import learning_rate

    tc = TrainingConfig(iterations=10, lr=0.5, lr_warmup=2, lr_hold=0.5, lr_schedule=schedule, lr_floor=0.1)
    for k in range(11):
        warm = min(1.0, (k + 1) / 2)
        p = min(1.0, max(0.0, (k - 6) / 4))
        decay = 0.1 + 0.9 * ((1 - p) if schedule == "linear" else (1 + math.cos(math.pi * p)) / 2)
        assert learning_rate(tc, k) == pytest.approx(0.5 * warm * decay, rel=1e-12), k
    assert [learning_rate(tc, k) for k in (2, 5, 6)] == [0.5, 0.5, 0.5] and learning_rate(tc, 7) < 0.5
    none = TrainingConfig(iterations=10, lr=0.5, lr_warmup=3, lr_hold=0.0, lr_schedule=schedule)
    assert learning_rate(none, 3) == 0.5 and learning_rate(none, 4) < 0.5


def test_run_applies_and_checkpoints_the_scheduled_rate(tmp_path):
    """A 4-step run with a 2-step warm-up and cosine decay to 0.1·lr: each logged lr and the lr in each checkpoint's
    optimizer param_groups is lr(k) of the step just taken (k = step − 1)."""
    from apctl.training.schedule import learning_rate

    run = _run(tmp_path, "lr", "training.lr_warmup=2", 'training.lr_schedule="cosine"', "training.lr_floor=0.1",
               "training.lr_hold=0", "training.log_every=1")                # no hold: toy2d's own would hold step 2
    tc = run.cfg.training
    assert [h["lr"] for h in run.history] == [learning_rate(tc, k) for k in range(4)]
    assert run.history[0]["lr"] < run.history[1]["lr"] > run.history[3]["lr"]       # up, then down
    for step in (2, 4):
        meta = json.loads((run.checkpoint_dir / f"ckpt-{step:07d}.json").read_text())
        assert [g["lr"] for g in meta["optimizer"]["param_groups"]] == [learning_rate(tc, step - 1)]


def test_extending_a_run_with_a_decaying_schedule_is_refused_with_the_reason(tmp_path):
    """A cosine run of 4 steps cannot be resumed as a 6-step run (its decay ends at step 4): one error naming
    training.iterations and why, the checkpoint untouched; with the same length it resumes."""
    from apctl.errors import ApctlError
    from apctl.presets import load_config
    from apctl.training.run import prepare

    run = _run(tmp_path, "cos", 'training.lr_schedule="cosine"')
    saved = (run.checkpoint_dir / "ckpt-0000004.safetensors").read_bytes()
    cfg, _ = load_config("toy2d", [*TOY, 'training.lr_schedule="cosine"', "training.iterations=6"])
    with pytest.raises(ApctlError, match=r"\(training\.iterations\) \(a cosine lr_schedule ends at training\.iterations"):
        prepare(cfg, tmp_path / "cos")
    assert (run.checkpoint_dir / "ckpt-0000004.safetensors").read_bytes() == saved
    cfg, _ = load_config("toy2d", [*TOY, 'training.lr_schedule="cosine"'])
    resumed = prepare(cfg, tmp_path / "cos")
    assert resumed.step == 4
    resumed.close()


# --- the guarded step ---------------------------------------------------------------------------------------

def _state(run) -> dict[str, torch.Tensor]:
    out = _weights(run)
    for i, s in run.optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_non_finite_gradient_skips_the_step_without_a_scaler(tmp_path, precision):
    """As GradScaler does for fp16: an inf injected into one gradient (a hook) leaves θ, the optimizer state, θ⁻
    and the EMA bit-identical and logs skipped = 1; the next clean step is taken."""
    from apctl.presets import load_config
    from apctl.training.run import prepare
    from apctl.training.step import train_step

    cfg, _ = load_config("toy2d", [*TOY, f'training.precision="{precision}"'])
    run = prepare(cfg, tmp_path / "run")
    train_step(run, 0, run.student)                      # the optimizer state exists from here on
    before = _state(run)
    handle = run.student.output_weight().register_hook(lambda g: torch.full_like(g, float("nan")))
    logs = train_step(run, 1, run.student)
    handle.remove()
    assert float(logs["skipped"]) == 1.0
    after = _state(run)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert float(train_step(run, 2, run.student)["skipped"]) == 0.0
    taken = _state(run)
    for prefix in ("student.", "target.", "ema."):
        assert any(not torch.equal(taken[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert all(taken[k] == after[k] + 1 for k in after if k.startswith("optim.") and k.endswith(".step"))


def test_non_finite_state_is_never_checkpointed(tmp_path):
    """save() with a NaN in the EMA refuses with one line naming the tensor and writes nothing."""
    from apctl.training.run import save

    run = _run(tmp_path, "run", "training.iterations=2")
    files = sorted(p.name for p in run.checkpoint_dir.iterdir())
    with torch.no_grad():
        next(run.ema.parameters())[0] = float("nan")
    with pytest.raises(ApctlError, match=r"step 2: ema\.\S+ hold non-finite") as info:
        save(run)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == files


def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line(tmp_path, cli):
    """training.lr = 1e30 (RAdam's first step moves each weight by ~lr): the loss turns non-finite, the steps are
    skipped, and after training.max_skipped_steps = 3 in a row `apctl distill` exits 1 with one line naming the
    step; every checkpoint on disk holds finite tensors and metrics.jsonl is strict JSON with the non-finite
    values as null, named under "nonfinite"."""
    from safetensors.torch import load_file

    sets = [a for s in [*TOY, "training.iterations=40", "training.lr=1e30", "training.max_skipped_steps=3",
                        "training.log_every=1"] for a in ("--set", s)]
    result = cli(["distill", "--out", "run", *sets], tmp_path)
    message = cli.user_error(result, "training stopped at step", "training.max_skipped_steps")
    lines = [_strict_json(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stop = lines[-1]["step"]
    assert f"at step {stop}:" in message and stop < 40
    assert [ln["skipped"] for ln in lines[-3:]] == [1.0, 1.0, 1.0]
    assert lines[-1]["loss"] is None and "loss" in lines[-1]["nonfinite"]
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    assert checkpoints
    for path in checkpoints:
        bad = [k for k, v in load_file(str(path)).items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, (path.name, bad[:4])
        _strict_json(path.with_suffix(".json").read_text())


# --- metrics ------------------------------------------------------------------------------------------------

def test_metrics_lines_carry_throughput_and_memory(tmp_path):
    """images/s = steps·batch / elapsed, s/kimg = 1000 / (images/s), it/s·batch = images/s, a positive peak memory."""
    run = _run(tmp_path, "run")
    for h in run.history:
        assert h["images_per_s"] == pytest.approx(h["it_per_s"] * 8, rel=1e-9)
        assert h["s_per_kimg"] == pytest.approx(1000 / h["images_per_s"], rel=1e-9)
        assert h["peak_memory_mb"] > 0 and h["skipped"] == 0.0


def test_json_safe_names_the_non_finite_values():
    from apctl.training.guard import json_safe

    logs = {"loss": float("nan"), "grad_norm": float("inf"), "step": 3, "lr": 0.1}
    line = json.dumps(json_safe(logs), allow_nan=False)
    assert _strict_json(line) == {"loss": None, "grad_norm": None, "step": 3, "lr": 0.1,
                                  "nonfinite": ["loss", "grad_norm"]}
    assert json_safe({"loss": 1.0}) == {"loss": 1.0}


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_sink_mirrors_the_numeric_finite_values():
    from apctl.training.tensorboard_sink import TensorBoardSink

    writer = FakeWriter()
    sink = TensorBoardSink(writer)
    sink.write({"loss": 0.5, "grad_norm": float("nan"), "step": 4, "time": 1e9, "lr": 1e-3, "nonfinite": ["x"]})
    sink.close()
    assert writer.scalars == [("train/loss", 0.5, 4), ("train/lr", 1e-3, 4)] and writer.closed


def test_tensorboard_without_the_package_is_one_line_before_anything_is_written(tmp_path):
    import importlib.util

    from apctl.presets import load_config
    from apctl.training.run import prepare

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    cfg, _ = load_config("toy2d", [*TOY, "training.tensorboard=true"])
    with pytest.raises(ApctlError, match="needs the tensorboard package") as info:
        prepare(cfg, tmp_path / "run")
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
