"""iSD's loss as SNU-VGILab/improvedSelfDistillation's code computes it (`methods/isd.py`; docs/reference_code.md,
"iSD"), each rule against an independent statement: the interpolants' velocities by autograd, the flow map of a
Gaussian in closed form (the self-distillation goal must reproduce it exactly, and the reference's trig tangent
does not), the jump in σ against the reference's own sampler loop, the time law by its CDF, the guidance goal
recomputed from the same draws, and the run around it (no θ⁻, resume by re-running).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from apctl.config import ISDObjectiveConfig, PrecondConfig
from apctl.draws import GeneratorDraws, RowDraws
from apctl.errors import ApctlError
from apctl.networks.flow_map import TRANSPORTS, TRIG_RATE, FlowMapMLP
from apctl.objectives.isd import ISDObjective, beta_a1, no_class_rows, tangent
from apctl.preconditioning.build import build_preconditioning
from apctl.presets import load_config
from apctl.sampling import student_sample


def _random_flow_map(transport: str, label_dim: int = 0, dtype=torch.float64) -> FlowMapMLP:
    """A FlowMapMLP whose head is not zero (F ≠ 0 and depends on t, s and x)."""
    torch.manual_seed(3)
    net = FlowMapMLP((2,), label_dim, hidden=32, depth=2, embed_dim=16, input_gain=2.0, transport=transport)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.5)
        net.head.bias.normal_(0, 0.1)
    return net.to(dtype)


# === the interpolants ==========================================================================================

@pytest.mark.parametrize("name", ["linear", "trig"])
def test_the_velocity_is_the_interpolants_time_derivative(name):
    """v = dx_t/dt (linear) or dx_t/dτ, τ = 1.57·t (trig), by autograd through x_t = α(t)·x_0 + β(t)·z."""
    transport = TRANSPORTS[name]
    gen = torch.Generator().manual_seed(0)
    x0, z = torch.randn(5, 2, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(5, 1, generator=gen, dtype=torch.float64).requires_grad_(True)
    alpha, beta = transport.coefficients(t)
    x_t = alpha * x0 + beta * z
    per_t = torch.stack([torch.autograd.grad(x_t[:, i].sum(), t, retain_graph=True)[0][:, 0] for i in range(2)], 1)
    rate = 1.0 if name == "linear" else TRIG_RATE
    torch.testing.assert_close(transport.velocity(x0, z, t.detach()), per_t / rate, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_sigma_is_beta_over_alpha(name):
    transport = TRANSPORTS[name]
    t = torch.linspace(0.0, 0.999, 50, dtype=torch.float64)
    alpha, beta = transport.coefficients(t)
    torch.testing.assert_close(transport.time_of_sigma(beta / alpha), t, rtol=0, atol=1e-12)


# === the map as a jump in σ ====================================================================================

@pytest.mark.parametrize("name", ["linear", "trig"])
def test_the_ctm_jump_of_the_denoiser_view_is_the_flow_map(name):
    """G(x̃, σ_t, σ_s) = (σ_s/σ_t)·x̃ + (1 − σ_s/σ_t)·D_θ equals X_θ(x_t, t, s)/α(s), the reference's map
    (linear x_t − (t − s)F, trig cos Δ·x_t − sin Δ·F, written out here), for every pair s < t."""
    net = _random_flow_map(name)
    precond = build_preconditioning(PrecondConfig(kind="ctm"))
    gen = torch.Generator().manual_seed(1)
    x_tilde = torch.randn(6, 2, generator=gen, dtype=torch.float64) * 3
    sigma_t = torch.tensor([80.0, 80.0, 5.0, 1.0, 0.3, 0.05], dtype=torch.float64)
    sigma_s = torch.tensor([0.002, 1.0, 4.9, 0.5, 0.0001, 0.002], dtype=torch.float64)
    f, g = precond.coefficients(sigma_t, sigma_s)
    with torch.no_grad():
        G = f.view(-1, 1) * x_tilde + g.view(-1, 1) * net(x_tilde, sigma_t, sigma_s)
        if name == "linear":
            t, s = sigma_t / (1 + sigma_t), sigma_s / (1 + sigma_s)
            alpha_t, alpha_s = 1 - t, 1 - s
            x_t = alpha_t.view(-1, 1) * x_tilde
            X = x_t - (t - s).view(-1, 1) * net(x_t, t, s, velocity=True)
        else:
            t, s = torch.atan(sigma_t) / 1.57, torch.atan(sigma_s) / 1.57
            alpha_t, alpha_s = torch.cos(1.57 * t), torch.cos(1.57 * s)
            x_t = alpha_t.view(-1, 1) * x_tilde
            d = (1.57 * (t - s)).view(-1, 1)
            X = torch.cos(d) * x_t - torch.sin(d) * net(x_t, t, s, velocity=True)
    torch.testing.assert_close(G, X / alpha_s.view(-1, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_few_step_sampling_is_the_references_sampler(name):
    """apctl's deterministic sampler over σ levels is the reference's loop x ← X_θ(x, t_i, t_{i+1}) over the
    same times, started from x_{t_0} = β(t_0)·z and read out as x̃ = x/α(t_N)."""
    net = _random_flow_map(name)
    precond = build_preconditioning(PrecondConfig(kind="ctm"))
    times = torch.tensor([0.99, 0.5, 0.2, 0.002], dtype=torch.float64)
    transport = TRANSPORTS[name]
    alpha, beta = transport.coefficients(times)
    sigmas = (beta / alpha).tolist()
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = student_sample(net, precond, z, sigmas)
    x = beta[0] * z
    with torch.no_grad():
        for now, nxt in zip(times[:-1], times[1:]):
            F = net(x, now.expand(7), nxt.expand(7), velocity=True)
            if name == "linear":
                x = x + (nxt - now) * F
            else:
                x = torch.cos((nxt - now) * 1.57) * x + torch.sin((nxt - now) * 1.57) * F
    torch.testing.assert_close(ours, x / alpha[-1], rtol=1e-9, atol=1e-9)


# === the self-distillation goal on a Gaussian's exact flow map =================================================

class ExactGaussianFlowMap(nn.Module):
    """The exact F of data N(0, c²·I): every marginal is N(0, m(t)²·I), so the flow map is X(x, t, s) =
    x·m(s)/m(t), with m² = α²c² + β²; F is X solved for (linear (x − X)/(t − s), trig (cos Δ·x − X)/sin Δ),
    and on the diagonal the velocity x·m'/m (per unit t, or per unit τ for trig)."""

    def __init__(self, transport: str, c: float):
        super().__init__()
        self.transport, self.c = TRANSPORTS[transport], c

    def m(self, t):
        alpha, beta = self.transport.coefficients(t)
        return (alpha ** 2 * self.c ** 2 + beta ** 2).sqrt()

    def forward(self, x, t, s, labels=None, velocity=True):
        t, s = t.reshape(-1, 1), s.reshape(-1, 1)
        X = x * self.m(s) / self.m(t)
        if self.transport.name == "linear":
            off = (x - X) / (t - s)
            growth = (t - (1 - t) * self.c ** 2) / self.m(t) ** 2          # m'/m per unit t
        else:
            d = 1.57 * (t - s)
            off = (torch.cos(d) * x - X) / torch.sin(d)
            tau = 1.57 * t
            growth = torch.sin(tau) * torch.cos(tau) * (1 - self.c ** 2) / self.m(t) ** 2   # m'/m per unit τ
        return torch.where(t > s, off, x * growth)


def _sd_on_the_exact_map(transport, **cfg):
    objective = ISDObjective(ISDObjectiveConfig(**cfg))
    exact = ExactGaussianFlowMap(transport, c=0.5)
    x0 = 0.5 * torch.randn(512, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, logs = objective(exact, None, x0, None, torch.Generator().manual_seed(5), None)
    return logs


@pytest.mark.parametrize("tangent_method, tol", [("jvp", 1e-24), ("difference", 1e-8)])   # seen: 8e-33, 9e-10
def test_the_exact_linear_flow_map_is_a_fixed_point(tangent_method, tol):
    """On the true flow map the goal T = v̂ − (t − s)·dF equals F: the SD term vanishes (to the difference's
    O(ε²)), while the FM term (v against E[v | x_t]) does not."""
    logs = _sd_on_the_exact_map("linear", tangent=tangent_method)
    assert float(logs["sd"]) < tol
    assert float(logs["fm"]) > 0.1


def test_the_exact_trig_flow_map_is_a_fixed_point_only_with_the_flows_own_rate():
    """trig: with ṫ = 1/1.57 (dF per unit τ, as v̂ is) the goal reproduces the true map; the reference code's
    ṫ = 1 over-weights ∂F/∂t by 1.57 and moves the goal off it."""
    consistent = _sd_on_the_exact_map("trig", tangent="jvp", trig_tangent="consistent")
    reference = _sd_on_the_exact_map("trig", tangent="jvp", trig_tangent="reference")
    assert float(consistent["sd"]) < 1e-24                     # seen: 4e-33
    assert float(reference["sd"]) > 1e-2                       # seen: 0.062, against FM 0.42 on the same map


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_on_the_diagonal_the_goal_is_the_models_velocity(name):
    """s = t: T = v̂ whatever F and dF are, so the SD term is zero there."""
    gen = torch.Generator().manual_seed(6)
    F, v_hat, x, dF = (torch.randn(9, 2, generator=gen, dtype=torch.float64) for _ in range(4))
    t = torch.rand(9, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(TRANSPORTS[name].eulerian_target(F, v_hat, x, dF, t, t), v_hat, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "trig"])
def test_the_central_difference_tangent_matches_forward_mode(name):
    """The released configs' difference (ε = 0.005) against torch.func.jvp on a random network, in float32."""
    net = _random_flow_map(name, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    x, direction = torch.randn(64, 2, generator=gen), torch.randn(64, 2, generator=gen)
    t = 0.2 + 0.7 * torch.rand(64, generator=gen)
    s = t * torch.rand(64, generator=gen)
    f = lambda *a: net(*a, velocity=True)       # noqa: E731
    exact = tangent(f, x, t, s, None, direction, 1.0, "jvp", 0.005)
    approx = tangent(f, x, t, s, None, direction, 1.0, "difference", 0.005)
    assert float((approx - exact).norm() / exact.norm()) < 2e-3


# === draws =====================================================================================================

def test_the_times_follow_beta_a_1():
    """The empirical CDF of u^(1/a) against Beta(a, 1)'s x^a (Kolmogorov–Smirnov, 1% level: 1.63/√n)."""
    n = 200_000
    draws = GeneratorDraws(torch.Generator().manual_seed(8), n)
    x = np.sort(beta_a1(draws, 0.8).numpy())
    ecdf_hi, ecdf_lo = np.arange(1, n + 1) / n, np.arange(n) / n
    cdf = x ** 0.8
    assert max(np.max(ecdf_hi - cdf), np.max(cdf - ecdf_lo)) < 1.63 / math.sqrt(n)


def test_the_rows_without_a_class_are_the_last_of_the_global_batch():
    """round(p·B) rows at the end of the batch of B, whichever micro-batch computes them (Python's round, as
    the reference's: round(2.5) = 2)."""
    whole = no_class_rows(RowDraws((0, 0), range(0, 10), 10), 0.25)
    assert whole.tolist() == [False] * 8 + [True] * 2
    parts = [no_class_rows(RowDraws((0, 0), range(a, a + 5), 10), 0.25) for a in (0, 5)]
    assert torch.cat(parts).tolist() == whole.tolist()
    assert no_class_rows(RowDraws((0, 0), range(0, 256), 256), 0.1).sum() == 26


# === the guidance goal =========================================================================================

class LabelVelocity(nn.Module):
    """F(x_t, t, s, y) = A·y: no dependence on x or the times, zero for the no-class vector."""

    def __init__(self):
        super().__init__()
        self.transport = TRANSPORTS["linear"]
        self.A = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)

    def forward(self, x, t, s, labels=None, velocity=True):
        return labels @ self.A.T


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_the_flow_matching_goal_is_the_guided_velocity(w):
    """FM = mean_i (F(x_t, t, t, y) − (u + w·(v − u)))², u = F(x_t, t, t, ∅) = 0 here, with the last round(0.1·B)
    rows trained without a class; v recomputed from the same draws (t, s from two Beta draws, then z)."""
    B = 20
    labels = torch.nn.functional.one_hot(torch.arange(B) % 2, 2).to(torch.float64)
    x0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    objective = ISDObjective(ISDObjectiveConfig(guidance=w))
    _, logs = objective(LabelVelocity(), None, x0, labels.clone(), torch.Generator().manual_seed(10), None)
    gen = torch.Generator().manual_seed(10)
    for _ in ("t", "s"):           # drawn first, as the objective draws them; F here does not depend on them
        torch.rand(B, generator=gen, dtype=torch.float64)
    z = torch.randn(B, 2, generator=gen).to(torch.float64)
    v = z - x0
    kept = labels.clone()
    kept[-2:] = 0
    F = kept @ LabelVelocity().A.T
    expected = ((F - w * v) ** 2).mean(1).mean()
    torch.testing.assert_close(logs["fm"], expected, rtol=1e-12, atol=1e-12)


def test_guidance_without_classes_is_one_line():
    objective = ISDObjective(ISDObjectiveConfig(guidance=2.0))
    with pytest.raises(ApctlError, match="guidance ≠ 1 needs class labels"):
        objective(ExactGaussianFlowMap("linear", 0.5), None, torch.zeros(4, 2, dtype=torch.float64), None,
                  torch.Generator().manual_seed(0), None)


# === the loss and its gradient =================================================================================

def test_the_loss_is_the_adaptively_weighted_sum_and_trains_f_at_both_times():
    """loss = mean ℓ/sg(ℓ + c)^p recomputed from the logged per-sample terms' definition; the gradient reaches
    the network through both passes (a step lowers neither term to NaN and moves every weight)."""
    net = _random_flow_map("linear")
    x0 = 0.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    cfg = ISDObjectiveConfig(adaptive_p=0.0)      # p = 0: the plain sum of the two means
    loss, logs = ISDObjective(cfg)(net, None, x0, None, torch.Generator().manual_seed(12), None)
    torch.testing.assert_close(loss.detach(), logs["fm"] + logs["sd"], rtol=1e-12, atol=0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in net.parameters())


# === the run around it =========================================================================================

ISD_RUN = ["training.eval_every=0", "training.log_every=1", "training.checkpoint_every=2", "eval.n_samples=64",
           "eval.teacher_steps=8"]


def test_an_isd_run_has_a_flow_map_student_and_no_target(tmp_path):
    from apctl.training.run import prepare
    from apctl.training.step import train_step

    cfg, _ = load_config("toy2d-isd", ISD_RUN)
    run = prepare(cfg, tmp_path)
    assert run.target is None and isinstance(run.student, FlowMapMLP)
    assert run.student.transport.name == "linear"
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    for step in range(2):       # the head starts at zero: the body moves from the second step on
        logs = train_step(run, step, run.student)
    assert {"fm", "sd", "loss"} <= logs.keys()
    assert all(not torch.equal(v, before[k]) for k, v in run.student.state_dict().items())
    run.close()


def test_an_isd_run_resumed_equals_one_run_through(tmp_path, cli):
    """4 iterations in one go, and 2 then 2 more by re-running: the same weights, bit for bit (a constant rate, so
    that the run can be extended)."""
    from resume_checks import assert_same_weights, whole_and_split

    whole, split = whole_and_split(cli, tmp_path, "toy2d-isd", [*ISD_RUN, 'training.lr_schedule="constant"'], 4, 2)
    assert whole.step == split.step == 4
    assert_same_weights(whole, split)
    assert not whole.group("target")


def test_a_trained_flow_map_samples_through_the_engine(tmp_path, cli):
    """The checkpoint rebuilds its FlowMapMLP (transport included) without the config, and `apctl sample` runs it."""
    from apctl.training.trained import load_trained_student

    sets = [a for s in [*ISD_RUN, "training.iterations=2", 'student.transport="trig"'] for a in ("--set", s)]
    out = cli.ok(cli(["distill", "--preset", "toy2d-isd", "--out", "run", *sets], tmp_path)).stdout
    # the progress line shows iSD's two terms, not its adaptively normalised total (≈ 1 by construction)
    assert re.search(r"distill  2/2 .* fm \d\S* · sd \d\S*", out) and " loss " not in out, out
    trained = load_trained_student(tmp_path / "run")
    assert isinstance(trained.net, FlowMapMLP) and trained.net.transport.name == "trig"
    cli.ok(cli(["sample", "--ckpt", str(tmp_path / "run"), "--nfe", "2", "--n", "16", "--out", str(tmp_path / "s.npz")], tmp_path))
    assert np.isfinite(np.load(tmp_path / "s.npz")["samples"]).all()


@pytest.mark.parametrize("sets, key, words", [
    (['objective.kind="isd"'], "student.kind", "trains student.kind = 'flow_map'"),
    (['student.kind="flow_map"'], "student.kind", "a flow map trains only with the isd objective"),
])
def test_isd_and_the_flow_map_come_together(sets, key, words):
    from apctl.config import ConfigError

    with pytest.raises(ConfigError, match=key) as info:
        load_config("toy2d", [*sets, 'precond.kind="ctm"'])
    assert words in str(info.value)


def test_isd_needs_ctms_coefficients():
    from apctl.config import ConfigError

    with pytest.raises(ConfigError, match="precond.kind") as info:
        load_config("toy2d-isd", ['precond.kind="analytic"'])
    assert "first-order jump" in str(info.value)


def test_the_plan_states_isds_law(tmp_path, cli):
    out = cli.ok(cli(["distill", "--preset", "toy2d-isd", "--dry-run", "--set", 'objective.isd.trig_tangent="consistent"',
                      "--set", 'student.transport="trig"'], tmp_path)).stdout
    flat = " ".join(out.split())
    assert "iSD (trig): t, s ~ Beta(0.8, 1) sorted" in flat and "ṫ = 1/1.57 (per unit τ)" in flat
    assert "FlowMapMLP (trig transport) 4×128" in flat
    linear = " ".join(cli.ok(cli(["distill", "--preset", "toy2d-isd", "--dry-run"], tmp_path)).stdout.split())
    assert "iSD (linear)" in linear and "central difference, ε = 0.005)" in linear and "ṫ" not in linear
    for row in ("target EMA", "max teacher Heun steps", "CTM rules"):
        assert row not in out


def test_micro_batches_change_an_isd_step_only_by_rounding(tmp_path):
    """One batch of 8 against 4 micro-batches of 2: every draw is keyed by the row's global index and ℓ is
    weighted per sample, so after 4 steps θ and the EMA agree to rounding (RAdam: see tests/test_scale.py on
    why not Adam's first step)."""
    from apctl.training.run import prepare, train

    def weights(name, per_device):
        sets = [*ISD_RUN, "training.batch_size=8", "training.iterations=4", f"training.batch_per_device={per_device}",
                'training.optimizer="radam"', "training.betas=[0.9, 0.999]", "run.threads=1"]
        cfg, _ = load_config("toy2d-isd", sets)
        run = train(prepare(cfg, tmp_path / name))
        run.close()
        return {f"{n}.{k}": v.clone() for n, net in (("student", run.student), ("ema", run.ema))
                for k, v in net.state_dict().items()}

    one, four = weights("one", 0), weights("four", 2)
    assert one.keys() == four.keys()
    assert all(torch.allclose(one[k], four[k], rtol=1e-5, atol=1e-6) for k in one)


@pytest.mark.slow
def test_two_processes_train_what_one_does_with_the_global_batchs_null_rows(tmp_path, cli):
    """torchrun, 2 processes (gloo) × 4 rows, against 1 process × the whole batch of 8, on the class-conditional
    ring with guidance w = 2 and 2 of the 8 rows without a class: the no-class rows are the last of the *global*
    batch (all on rank 1), so the two runs' weights agree within float rounding after 2 steps (choosing them in
    each rank's share instead drops rows on rank 0 too, and fails this)."""
    from test_distributed import _torchrun_or_skip, describe, torchrun

    from apctl.checkpoints import list_checkpoints, load_checkpoint

    _torchrun_or_skip()
    sets = [*ISD_RUN, "training.iterations=2", "training.batch_size=8", "teacher.classes=[0,0,1,1,2,2,3,3]",
            "data.class_conditional=true", "objective.isd.guidance=2", "objective.isd.label_dropout=0.25",
            "training.log_every=2"]
    args = ["distill", "--preset", "toy2d-isd", *[a for s in sets for a in ("--set", s)]]
    two = torchrun([*args, "--out", "two"], tmp_path, cli)
    assert two.returncode == 0, describe(two)
    cli.ok(cli([*args, "--out", "one"], tmp_path))
    a, b = (load_checkpoint(list_checkpoints(tmp_path / name / "checkpoints")[-1]) for name in ("two", "one"))
    assert a.step == b.step == 2
    for group in ("student", "ema"):
        x, y = a.group(group), b.group(group)
        assert x.keys() == y.keys()
        bad = [k for k in x if not torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6)]
        assert not bad, (group, bad[:4], max(float((x[k] - y[k]).abs().max()) for k in x))
    two_loss = [json.loads(ln)["loss"] for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one_loss = [json.loads(ln)["loss"] for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
