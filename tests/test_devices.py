"""Correct on any device, proved without one: the engine's device paths run on *fake* CUDA tensors.

Inside `FakeTensorMode` a tensor made with device="cuda" (or moved there) carries no data but keeps its
device, and any op that mixes it with a (non-scalar) CPU tensor raises `FakeTensorDeviceMismatchError`,
as a real GPU would. A data-dependent host read (`.item()`, `bool(t)`, `.tolist()`, `.numpy()`) of a fake
tensor raises too, so a training step that runs here also reads no device value on the host.

Seams (test-only, each where the work is legitimately host-side or where fake tensors cannot go):
* host-side draws: CTM's index draw (`sample_indices`: a host integer k_max) and an image data set's
  batch (numpy indexing) run with fake mode suspended — their outputs are real CPU tensors that the step
  must move to the device itself (if it does not, the next op mixes devices and fails);
* the autograd engine cannot run a backward pass over fake CUDA tensors without a CUDA runtime
  (GraphTask::stash_current_streams asks the driver), so `Tensor.backward` and `torch.autograd.grad`
  are replaced by zero gradients made like their inputs (on the inputs' devices) — the forward pass,
  which fixes every device, runs in full, and so do clipping, the optimizer, the target and the EMA;
* Analytic-Precond's coefficients are evaluated from host numbers (scipy): on a fake CPU tensor they are
  computed with fake mode suspended, at placeholder times of the same shape (values do not matter here);
* the statistics' one host read at the end (`to_host`) returns placeholder zeros;
* the step's one host read (`guard.step_is_finite`: take the step?) checks that the loss and the gradient
  norm it is given are on the device and answers "take it".
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import apctl.preconditioning.statistics as statistics_module
from apctl.training import guard
from apctl.presets import load_config
from apctl.metrics.alignment import AlignmentProbe
from apctl.networks import EDM_PRESET_KWARGS, build_network
from apctl.preconditioning.build import compute_statistics
from apctl.preconditioning.coefficients import AnalyticPrecond
from apctl.preconditioning.table import CoefficientTable
from apctl.sampling import default_sigmas, student_sample, teacher_sample
from apctl.teachers.apctl_format import save_teacher
from apctl.teachers.bundle import TeacherBundle, compute_fingerprint
from apctl.training.run import prepare
from apctl.training.step import train_step

CUDA = torch.device("cuda", 0)      # fake tensors normalise "cuda" to cuda:0

# toy2d shrunk: a few statistics levels on a few samples, a small grid and batch.
TOY = ["precond.statistics.n_points=8", "precond.statistics.n_samples=16", "precond.statistics.batch_size=8",
       "objective.ctm.max_teacher_steps=3", "objective.grid_points=6", "training.batch_size=8",
       "student.hidden=16", "student.depth=2", "student.embed_dim=8", "eval.n_samples=8", "eval.teacher_steps=4",
       "training.eval_every=0", "run.threads=1"]
# A tiny unconditional 1-channel EDM teacher on 16×16 digits.
NET = ['data.class_conditional=false', 'teacher.kind="network"', 'student.init_from_teacher=true',
       "precond.statistics.n_points=8", "precond.statistics.n_samples=4", "precond.statistics.batch_size=2",
       "objective.ctm.max_teacher_steps=2", "objective.grid_points=5", "training.batch_size=2",
       "eval.n_samples=2", "eval.teacher_steps=2", "training.eval_every=0", "run.threads=1"]


# ------------------------------------------------------------------------------------------------
# The harness


def fake_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def _move_module(module: nn.Module, device) -> None:
    """Parameters and buffers to `device` (fake under the mode), as new Parameters (`.data` cannot
    take a fake tensor)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b.to(device)


def _move_objective(objective, device) -> None:
    """The objective's `.to` rebuilds its coefficient table from the preconditioning (host numbers):
    build it on the CPU outside the mode's reach, then move its tensors. (ECT's objective holds none.)"""
    if not hasattr(objective, "table"):
        return
    with unset_fake_temporarily():
        table = CoefficientTable(objective.precond, objective.grid.numpy())
    for name in ("f", "g", "sigma"):
        setattr(table, name, getattr(table, name).to(device))
    objective.table = table
    _move_module(objective.distance, device)


def move_run(run, device=CUDA) -> None:
    """Everything of a prepared (CPU) run to `device` — call inside the fake mode."""
    for net in (run.student, run.target, run.ema):
        if net is not None:
            _move_module(net, device)
    if run.teacher.network is not None:
        _move_module(run.teacher.network, device)
    else:
        run.teacher.to(device)
    _move_objective(run.objective, device)
    run.optimizer = type(run.optimizer)(run.student.parameters(), **{
        k: v for k, v in run.optimizer.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")})
    run.device = torch.device(device)


@contextmanager
def seams(monkeypatch, run=None):
    """The test-only seams of the module docstring, active inside a fake mode."""
    if run is not None:
        def backward(self, *args, **kwargs):
            assert _is_fake(self), "a real tensor reached backward inside the fake harness"
            for p in (p for p in run.student.parameters() if p.requires_grad):
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad + torch.zeros_like(p)

        monkeypatch.setattr(torch.Tensor, "backward", backward)
        objective = run.objective
        if hasattr(objective, "sample_indices"):
            draw = objective.sample_indices

            def host_draw(*args):
                with unset_fake_temporarily():
                    return draw(*args)

            monkeypatch.setattr(objective, "sample_indices", host_draw)
        if hasattr(run.data_source, "data"):        # an image data set: numpy indexing on the host
            sample = run.data_source.sample

            def host_sample(*args):
                with unset_fake_temporarily():
                    return sample(*args)

            monkeypatch.setattr(run.data_source, "sample", host_sample)

        def take_the_step(loss, grad_norm):
            assert loss.device == CUDA and grad_norm.device == CUDA, (loss.device, grad_norm.device)
            return True

        monkeypatch.setattr(guard, "step_is_finite", take_the_step)

    def grad(outputs, inputs, *args, **kwargs):
        inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
        return tuple(torch.zeros_like(i) for i in inputs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    # A GPU generator's state is read and set through the driver (torch.random.fork_rng, ECT's shared
    # dropout masks): record which devices' states a step saves and restores, and keep them on the host.
    states = {}

    def get_rng_state(device="cuda"):
        GENERATOR_STATES.append(("get", torch.device(device)))
        with unset_fake_temporarily():
            return states.get(torch.device(device), torch.zeros(16, dtype=torch.uint8))

    def set_rng_state(state, device="cuda"):
        GENERATOR_STATES.append(("set", torch.device(device)))
        states[torch.device(device)] = state

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    GENERATOR_STATES.clear()
    coefficients = AnalyticPrecond.coefficients

    def host_coefficients(self, t, s):
        if not (_is_fake(t) or _is_fake(s)):
            return coefficients(self, t, s)
        assert t.device.type == "cpu" and s.device.type == "cpu", "coefficients are computed on the CPU"
        shape = torch.broadcast_shapes(t.shape, s.shape)
        with unset_fake_temporarily():
            f, g = coefficients(self, torch.full(shape, 1.0, dtype=torch.float64), torch.full(shape, 0.5, dtype=torch.float64))
        return f, g

    monkeypatch.setattr(AnalyticPrecond, "coefficients", host_coefficients)
    def to_host(sums):
        _check_device(sums)
        with unset_fake_temporarily():
            return torch.zeros(sums.shape, dtype=torch.float64).numpy()

    monkeypatch.setattr(statistics_module, "to_host", to_host)
    yield


GENERATOR_STATES: list[tuple[str, torch.device]] = []      # ("get" | "set", device), in order (seams)


def _check_device(t, device=CUDA):
    assert t.device == device, f"expected a tensor on {device}, got {t.device}"


# ------------------------------------------------------------------------------------------------
# Runs


def _toy_run(tmp_path, objective="ctm", precond="analytic"):
    extra = [f'objective.kind="{objective}"', f'precond.kind="{precond}"']
    cfg, _ = load_config("toy2d", TOY + extra)
    return prepare(cfg, tmp_path / f"toy-{objective}-{precond}")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny unconditional 1-channel 16×16 EDMPrecond teacher, saved as an apctl safetensors teacher."""
    kwargs = dict(EDM_PRESET_KWARGS["tiny-songunet-16-uncond"], img_channels=1, model_channels=8, attn_resolutions=[])
    torch.manual_seed(0)
    net = build_network("EDMPrecond", kwargs).eval().requires_grad_(False)
    arch = {"class_name": "EDMPrecond", "init_kwargs": dict(net.init_kwargs)}
    path = tmp_path_factory.mktemp("device-teacher") / "apctl-test-device-teacher.safetensors"
    save_teacher(TeacherBundle(net, arch, "apctl", compute_fingerprint(net.state_dict(), arch),
                               source={"format": "test", "file": ""}), path)
    return path


def _network_run(tmp_path, teacher_file, objective="ctm", precond="analytic"):
    extra = [f'objective.kind="{objective}"', f'precond.kind="{precond}"', f'teacher.file="{teacher_file}"']
    net = [key for key in NET if objective == "ctm" or not key.startswith("objective.ctm.")]
    cfg, _ = load_config("digits-img", net + extra)
    return prepare(cfg, tmp_path / f"net-{objective}-{precond}")


def _fake_train_step(run, monkeypatch):
    with fake_mode(), seams(monkeypatch, run):
        move_run(run)
        before = [p for p in run.student.parameters()]
        logs = train_step(run, 0, run.student)
        for key, value in logs.items():
            assert value.device == CUDA, f"log {key!r} is on {value.device}"
        for net in (run.student, run.target, run.ema):
            for p in net.parameters() if net is not None else ():
                _check_device(p)
        assert all(p.grad is not None for p in before if p.requires_grad)
    return logs


# ------------------------------------------------------------------------------------------------
# The harness can fail


def test_the_harness_fails_on_a_cpu_tensor_among_cuda_tensors():
    with fake_mode():
        a = torch.randn(4, 3, device="cuda")
        b = torch.randn(4, 3, device="cuda")
        _check_device(a + b)
        with unset_fake_temporarily():
            cpu = torch.randn(4, 3)
        with pytest.raises(FakeTensorDeviceMismatchError):
            a + cpu
        with pytest.raises(FakeTensorDeviceMismatchError):
            a @ torch.randn(3, 2)                      # made inside the mode, on the CPU
        with pytest.raises(Exception):                # a host read of a device value
            float(a.sum())


def test_the_harness_fails_on_a_device_bug_in_the_engine(monkeypatch):
    """Reintroduce a real bug (the mixture drew its components on the CPU and indexed device means
    with them through a CPU noise tensor): the harness must catch it."""
    from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher

    teacher = GaussianMixtureTeacher([[0.0, 0.0], [1.0, 1.0]], [0.1, 0.1])

    def buggy_sample(self, n, generator=None, labels=None):
        k = torch.multinomial(self._host_log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)      # left on the CPU
        return self.means[k.to(self.device)] + self.variances[k.to(self.device)].sqrt() * noise

    monkeypatch.setattr(GaussianMixtureTeacher, "sample", buggy_sample)
    with fake_mode():
        teacher.to("cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            teacher.sample(8, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------
# Training steps


@pytest.mark.parametrize("objective,precond", [("ctm", "analytic"), ("ctm", "ctm"), ("cd", "analytic"), ("cd", "ctm")])
def test_training_step_on_the_device_exact_teacher(tmp_path, monkeypatch, objective, precond):
    run = _toy_run(tmp_path, objective, precond)
    logs = _fake_train_step(run, monkeypatch)
    assert "loss" in logs


@pytest.mark.parametrize("objective,precond", [("ctm", "ctm"), ("cd", "cm"), ("ect", "ctm")])
def test_training_step_on_the_device_network_teacher(tmp_path, monkeypatch, teacher_file, objective, precond):
    run = _network_run(tmp_path, teacher_file, objective, precond)
    logs = _fake_train_step(run, monkeypatch)
    assert "loss" in logs
    if objective == "ect":     # the goal's pass drew the estimate's dropout masks on the GPU, not only the CPU's
        assert GENERATOR_STATES == [("get", CUDA), ("set", CUDA)]


@pytest.mark.parametrize("transport", ["linear", "trig"])
@pytest.mark.parametrize("tangent", ["difference", "jvp"])
def test_an_isd_step_and_its_samples_on_the_device(tmp_path, monkeypatch, transport, tangent):
    """iSD's step (the velocity passes, the tangent outside autocast, the goal) and the flow map's σ view sampled
    by the engine's jump, on the device."""
    keys = [k for k in TOY if not k.startswith(("precond.", "objective.ctm."))]
    cfg, _ = load_config("toy2d-isd", keys + [f'student.transport="{transport}"', f'objective.isd.tangent="{tangent}"'])
    run = prepare(cfg, tmp_path / f"toy-isd-{transport}-{tangent}")
    logs = _fake_train_step(run, monkeypatch)
    assert {"fm", "sd", "loss"} <= logs.keys()
    with fake_mode(), seams(monkeypatch):
        z = torch.randn((8, *run.teacher.shape), generator=torch.Generator().manual_seed(0)).to("cuda")
        _check_device(student_sample(run.ema, run.precond, z, default_sigmas(2, run.grid)))


# ------------------------------------------------------------------------------------------------
# Statistics, sampling, the teacher sampler, the alignment probe


def test_statistics_run_on_the_teachers_device(tmp_path, monkeypatch):
    run = _toy_run(tmp_path, "ctm", "ctm")
    cfg = run.cfg.precond.statistics
    reads = []
    with fake_mode(), seams(monkeypatch):
        run.teacher.to("cuda")
        host = statistics_module.to_host
        monkeypatch.setattr(statistics_module, "to_host", lambda sums: (reads.append(sums.device), host(sums))[1])
        progress = []
        stats = compute_statistics(cfg, run.teacher, run.data_source, lambda done, total: progress.append((done, total)))
    assert reads == [CUDA]                          # one host read, of device sums
    assert progress[-1] == (cfg.n_points, cfg.n_points) and len(progress) == cfg.n_points
    assert len(stats.lam) == cfg.n_points


def test_statistics_run_on_a_network_teachers_device(tmp_path, monkeypatch, teacher_file):
    run = _network_run(tmp_path, teacher_file, "cd", "ctm")
    with fake_mode(), seams(monkeypatch, run):        # the data set's batch is a host-side draw
        _move_module(run.teacher.network, CUDA)
        stats = compute_statistics(run.cfg.precond.statistics, run.teacher, run.data_source)
    assert len(stats.lam) == run.cfg.precond.statistics.n_points


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("precond", ["analytic", "ctm"])
def test_student_sampling_on_the_device(tmp_path, monkeypatch, gamma, precond):
    run = _toy_run(tmp_path, "ctm", precond)
    with fake_mode(), seams(monkeypatch):
        _move_module(run.ema, CUDA)
        z = torch.randn((8, *run.teacher.shape), generator=torch.Generator().manual_seed(0)).to("cuda")
        x = student_sample(run.ema, run.precond, z, default_sigmas(2, run.grid), gamma=gamma,
                           generator=torch.Generator().manual_seed(1))
        _check_device(x)


def test_teacher_sampler_and_alignment_probe_on_the_device(tmp_path, monkeypatch):
    run = _toy_run(tmp_path, "cd", "ctm")
    with fake_mode(), seams(monkeypatch):
        run.teacher.to("cuda")
        z = torch.randn((4, *run.teacher.shape)).to("cuda")
        _check_device(teacher_sample(run.teacher, z, 3))
        probe = AlignmentProbe(run.teacher, run.teacher.shape, 4, 0, 3)
        assert probe.z.device.type == "cpu" and probe.reference.device.type == "cpu"


def test_network_teacher_sampler_and_probe_on_the_device(tmp_path, monkeypatch, teacher_file):
    run = _network_run(tmp_path, teacher_file, "cd", "ctm")
    with fake_mode(), seams(monkeypatch):
        _move_module(run.teacher.network, CUDA)
        _check_device(run.teacher(torch.randn((2, *run.teacher.shape)).to("cuda"), 1.0))   # σ as a host number
        probe = AlignmentProbe(run.teacher, run.teacher.shape, 2, 0, 2)
        assert probe.reference.device.type == "cpu"


def test_device_names(monkeypatch):
    from apctl.config import ConfigError
    from apctl.errors import ApctlError
    from apctl.training.run import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ApctlError, match="no CUDA device"):
            resolve_device(name, "--device")
    with pytest.raises(ApctlError, match="--device must be"):
        resolve_device("gpu", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ApctlError, match="only 2 CUDA"):
        resolve_device("cuda:2")
    cfg, _ = load_config("toy2d", ['run.device="cuda:3"'])
    assert cfg.run.device == "cuda:3"
    with pytest.raises(ConfigError, match="run.device"):
        load_config("toy2d", ['run.device="gpu"'])
