"""CTM's training rules as sony/ctm's code applies them, each against an independent statement.

The statements are those of docs/reference_code.md (cited below by section and by the reference
code's file and lines as docs/reference_code.md cites them: C10 = Kim-Dongjun/ctm-cifar10 @ 7dc068f3, IN = sony/ctm
@ 87cca3be). The expected values are enumerated or derived here (tests/oracles.py for the index laws), never
read back from apctl.

Measured (seeds fixed below): 150 000 weighted draws give E[k] = 11.658 (35/3 = 11.667) and P(i = 0) = 0.2931
(0.2935), chi-square 1004 on 968 dof; KS p-values of the DSM σ law: ramp half 0.31 / 0.25 / 0.94 / 0.85 and
lognormal half 0.95 / 0.14 / 0.71 for b = 1 / 3 / 8 / 2001 (b = 1 has no lognormal row), all-lognormal 0.80.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import oracles
from apctl.presets import load_config
from apctl.networks.edm_layers import UNetBlock
from apctl.networks.mlp import TwoTimeMLP
from apctl.networks.registry import EDM_PRESET_KWARGS
from apctl.networks.student import set_dropout
from apctl.objectives.consistency import CTMObjective, adaptive_weight, ctm_indices, dsm_sigmas
from apctl.preconditioning import CTMPrecond
from apctl.preconditioning.table import CoefficientTable, jump_on_grid
from apctl.sampling import heun_step
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher
from apctl.training.ema import ema_update, frozen_copy
from apctl.training.step import shared_generator

F64 = torch.float64
N, K = 18, 17
GRID = oracles.karras(N)
GRID32 = torch.as_tensor(GRID, dtype=F64).float().double()
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
MU = torch.tensor([0.4, -0.3, 0.2], dtype=F64)
C = torch.tensor([0.3, 0.5, 0.8], dtype=F64)


def gaussian_teacher() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(MU[None].numpy(), C[None].numpy())


class SquaredL2(nn.Module):
    def forward(self, a, b):
        return (a - b).pow(2).flatten(1).mean(1)


def gens(seed: int):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(50_000 + seed)


# === a. the (i, k, j) law ==================================================================================

def _weighted_draws(steps: int, batch: int, seed: int = 0):
    gen, shared = gens(seed)
    out = [ctm_indices(N, K, batch, "weighted", gen, shared) for _ in range(steps)]
    i, k, j = (torch.stack([o[n] for o in out]) for n in range(3))        # (steps, batch)
    return i, k, j, torch.tensor([o[3] for o in out])


def test_weighted_law_is_ctms_joint_law():
    """sony/ctm cm/karras_diffusion.py `get_num_heun_step` (L132–158, 'weighted': p(k) = k/Σk on 1…K) and
    cm/resample.py `sample_t` (L47–68: i | k ~ U{0…N−1−k}) and `sample_s` (L70–82: j | i, k ~ U{i+k…N−1})
    [docs/reference_code.md §1]: the joint law of one row's (i, k, j) over 150 000 steps (batch 1, independent draws) equals the
    exact enumeration oracles.ctm_weighted_index_law(18, 17) (chi-square and total variation, tolerance from the
    sample size); E[k] = 35/3 and P(i = 0) = 0.2935 within 5 standard errors."""
    from test_heart_objectives import assert_joint_law

    i, k, j, k_max = _weighted_draws(150_000, 1)
    i, k, j = i[:, 0], k[:, 0], j[:, 0]
    assert torch.equal(k, k_max)
    chi2, dof, tv = assert_joint_law(i, k, j, oracles.ctm_weighted_index_law(N, K), N)
    e_k, p_i0 = float(k.double().mean()), float((i == 0).double().mean())
    print(f"weighted law: chi2 {chi2:.0f} (dof {dof}), TV {tv:.4f}, E[k] = {e_k:.4f}, P(i=0) = {p_i0:.4f}")
    var_k = K * (K + 1) / 2 - (35 / 3) ** 2                             # E[k²] = Σk³/Σk = K(K+1)/2
    assert abs(e_k - 35 / 3) <= 5 * math.sqrt(var_k / len(k))
    p0 = sum(m / 153 / (N - m) for m in range(1, K + 1))
    assert abs(p_i0 - p0) <= 5 * math.sqrt(p0 * (1 - p0) / len(i))


def test_one_k_per_step_shared_by_the_batch_and_the_ranks():
    """sony/ctm cm/train_util.py `CMTrainLoop.forward_backward` L1024–1030: k is drawn once per step and
    broadcast from rank 0 to every rank and microbatch [docs/reference_code.md §1]. So: every row of a batch has the same k;
    two ranks (different per-rank generators, the same shared generator) get the same k but their own i, j;
    k changes across steps, and over 20 000 steps of training.step.shared_generator(seed, step) its law is
    p(k) = k/153 (chi-square)."""
    for step in range(30):
        a = ctm_indices(N, K, 64, "weighted", torch.Generator().manual_seed(1), shared_generator(0, step))
        b = ctm_indices(N, K, 64, "weighted", torch.Generator().manual_seed(2), shared_generator(0, step))
        assert torch.all(a[1] == a[1][0]) and a[3] == int(a[1][0])
        assert torch.equal(a[1], b[1]) and a[3] == b[3]
        if a[3] < N - 2:                                                     # own i per rank (k = 17: i = 0 only)
            assert not torch.equal(a[0], b[0])
        assert torch.all(a[0] + a[1] <= N - 1) and torch.all((a[2] >= a[0] + a[1]) & (a[2] <= N - 1))
    ks = torch.tensor([ctm_indices(N, K, 2, "weighted", torch.Generator().manual_seed(0), shared_generator(7, s))[3]
                       for s in range(20_000)])
    counts = torch.bincount(ks, minlength=K + 1)[1:].double()
    expected = len(ks) * torch.arange(1, K + 1, dtype=F64) / 153
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 <= (K - 1) + 6 * math.sqrt(2 * (K - 1)), chi2
    assert len(set(ks[:50].tolist())) > 5


# === b. the DSM σ law =======================================================================================

def _ramp_coordinate(sigma: torch.Tensor) -> torch.Tensor:
    return (sigma ** (1 / RHO) - SIGMA_MAX ** (1 / RHO)) / (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))


RAMP_LOW = (SIGMA_MAX ** (1 / RHO) + 0.7 * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO   # σ at r = 0.7


@pytest.mark.parametrize("batch", [1, 3, 8, 2001])
def test_halflognormal_sigma_law(batch):
    """sony/ctm cm/resample.py `HalfLogNormalHalfUniformSampler` (L206–229) with `diffusion_mult` = 0.7
    [docs/reference_code.md §4]: of a batch of b, ⌊b/2⌋ σ have ln σ ~ N(−1.2, 1.2²) and the other b − ⌊b/2⌋ lie on the
    continuous Karras ρ-ramp at r ~ U[0, 0.7), so σ ∈ (0.31828, 80]. apctl assigns the halves by the parity of a
    row's index in the global batch (odd: lognormal), so that a row's σ law does not depend on the micro-batch it
    falls in (objectives/consistency.py); CTM's counts per batch are the same. Collected over repeated draws to ≥ 6000 per
    half: KS of ln σ against N(−1.2, 1.2) and of r/0.7 against U[0, 1); odd b too (b = 1: no lognormal row)."""
    assert RAMP_LOW == pytest.approx(0.31828, abs=1e-5)
    gen = torch.Generator().manual_seed(batch)
    reps = max(1, 6000 // max(1, batch // 2))
    draws = torch.stack([dsm_sigmas(batch, "halflognormal", 0.7, gen) for _ in range(reps)])
    assert draws.dtype == F64 and draws.shape == (reps, batch)
    half = batch // 2
    odd = torch.arange(batch) % 2 == 1
    assert int(odd.sum()) == half
    ramp = draws[:, ~odd].flatten()
    assert torch.all(ramp > RAMP_LOW) and torch.all(ramp <= SIGMA_MAX)
    r = _ramp_coordinate(ramp)
    ks_r = stats.kstest((r / 0.7).numpy(), "uniform")
    print(f"b={batch}: ramp half n={len(r)}, KS p={ks_r.pvalue:.3f}", end="")
    assert ks_r.pvalue > 1e-3
    if half:
        logn = draws[:, odd].flatten().log()
        ks_l = stats.kstest(logn.numpy(), "norm", args=(-1.2, 1.2))
        print(f"; lognormal half n={len(logn)}, KS p={ks_l.pvalue:.3f}", end="")
        assert ks_l.pvalue > 1e-3
        # and it is not the ramp law: a lognormal half has σ below 0.318 (P ≈ 0.5)
        assert float((draws[:, odd] < RAMP_LOW).double().mean()) > 0.3
    print()


def test_lognormal_sigma_law_is_all_lognormal():
    """EDM's training σ law (EDM training/loss.py EDMLoss, P_mean = −1.2, P_std = 1.2), which CTM uses on half the
    batch [docs/reference_code.md §4]: with law "lognormal" every row's ln σ ~ N(−1.2, 1.2²) (KS on 20 001 draws, odd batch), and
    a σ law of another name is refused."""
    sigma = dsm_sigmas(20_001, "lognormal", 0.7, torch.Generator().manual_seed(3))
    ks = stats.kstest(sigma.log().numpy(), "norm", args=(-1.2, 1.2))
    print(f"lognormal: KS p={ks.pvalue:.3f}")
    assert ks.pvalue > 1e-3
    with pytest.raises(Exception):
        dsm_sigmas(4, "uniform", 0.7, torch.Generator())


# === c. the adaptive DSM weight =============================================================================

def _two_layer(seed: int):
    g = torch.Generator().manual_seed(seed)
    W1, b1 = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    W2 = torch.randn(2, 5, generator=g, dtype=F64).requires_grad_(True)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    ya, yb = torch.randn(7, 2, generator=g, dtype=F64), torch.randn(7, 2, generator=g, dtype=F64)
    return W1, b1, W2, x, ya, yb


def test_adaptive_weight_by_hand():
    """sony/ctm cm/karras_diffusion.py `calculate_adaptive_weight` (L103–108) [docs/reference_code.md §2]: λ = ‖∂L_a/∂W‖ /
    (‖∂L_b/∂W‖ + 1e-4), clamped to [0, 1e4], detached. For y = W₂·tanh(W₁x + b₁) and L_a = mean‖y − y_a‖²,
    L_b = ½·mean‖y − y_b‖² (means over all B·m entries) the gradients w.r.t. W₂ are (2/Bm)(y − y_a)ᵀh and
    (1/Bm)(y − y_b)ᵀh in closed form; λ from them equals adaptive_weight's. Then the epsilon (a gradient of norm
    1e-4 halves the ratio against ε = 0), the upper clamp, the lower end (zero gradient → 0), and no gradient
    in the result."""
    W1, b1, W2, x, ya, yb = _two_layer(0)
    h = torch.tanh(x @ W1.T + b1)
    y = h @ W2.T
    n = y.numel()
    loss_a, loss_b = (y - ya).pow(2).mean(), 0.5 * (y - yb).pow(2).mean()
    ga = (2 / n) * (y - ya).detach().T @ h
    gb = (1 / n) * (y - yb).detach().T @ h
    lam = adaptive_weight(loss_a, loss_b, W2)
    assert float(lam) == pytest.approx(float(ga.norm() / (gb.norm() + 1e-4)), rel=1e-6)
    assert not lam.requires_grad and lam.grad_fn is None
    loss_a.backward()                                                       # the graph was retained
    assert torch.allclose(W2.grad, ga, rtol=1e-12)

    # ε: L_b = c·Σ W₂ ⊙ P with ‖c·P‖ = 1e-4 → ratio ‖g_a‖/2e-4 (with ε = 0 it would be ‖g_a‖/1e-4)
    P = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    P = P / P.norm()
    y = torch.tanh(x @ W1.T + b1) @ W2.T
    small_a = 1e-3 * y.sum() / y.detach().sum().abs()                     # a gradient of modest norm
    ga_norm = float(torch.autograd.grad(small_a, W2, retain_graph=True)[0].norm())
    lam = adaptive_weight(small_a, 1e-4 * (W2 * P).sum(), W2)
    assert float(lam) == pytest.approx(ga_norm / 2e-4, rel=1e-5)
    assert float(lam) < 1e4
    # upper clamp: ‖g_b‖ = 0 and ‖g_a‖ > 1 → ‖g_a‖/1e-4 > 1e4 → 1e4
    zero_grad_b = (y - y.detach()).pow(2).mean()                          # depends on W₂, gradient exactly 0 here
    big_a = 10 * (y - ya).pow(2).mean()
    assert float(torch.autograd.grad(big_a, W2, retain_graph=True)[0].norm()) > 1
    assert float(adaptive_weight(big_a, zero_grad_b, W2)) == 1e4
    # lower end: a zero gradient of L_a gives exactly 0
    assert float(adaptive_weight(zero_grad_b, 0.5 * (y - yb).pow(2).mean(), W2)) == 0.0


def _mlp_student():
    torch.manual_seed(0)
    student = TwoTimeMLP((3,), hidden=16, depth=2, embed_dim=8)
    with torch.no_grad():
        for p in student.head.parameters():
            p.normal_(0, 0.1)
    return student, frozen_copy(student)


def _objective(**kw):
    return CTMObjective(gaussian_teacher(), CTMPrecond(), GRID, SquaredL2(), **kw)


def test_logged_dsm_weight_is_the_gradient_norm_ratio_at_the_output_layer():
    """sony/ctm cm/karras_diffusion.py `calculate_adaptive_weight` on the output conv's weight, applied to the
    DSM term only, loss = L_CTM + λ·L_DSM (cm/train_util.py forward_backward L1076–1093) [docs/reference_code.md §2]. With a
    TwoTimeMLP student and the same generators: the gradient of the fixed-weight-0 loss w.r.t.
    student.output_weight() is ∇L_CTM, that of the fixed-weight-1 loss minus it is ∇L_DSM; the logged adaptive λ
    is clamp(‖∇L_CTM‖/(‖∇L_DSM‖ + 1e-4), 0, 1e4) of those, the loss is ctm + λ·dsm from the logs, and with
    dsm_weighting = "fixed" the logged weight is dsm_weight."""
    student, target = _mlp_student()
    x0 = gaussian_teacher().sample(64, torch.Generator().manual_seed(1)).float()
    W = student.output_weight()
    assert W is student.head.weight

    def grad_w(**kw):
        loss, logs = _objective(**kw)(student, target, x0, None, *gens(5))
        return torch.autograd.grad(loss, W)[0], logs

    g_ctm, logs0 = grad_w(dsm_weighting="fixed", dsm_weight=0.0)
    g_both, logs1 = grad_w(dsm_weighting="fixed", dsm_weight=1.0)
    g_dsm = g_both - g_ctm
    expected = min(max(float(g_ctm.double().norm() / (g_dsm.double().norm() + 1e-4)), 0.0), 1e4)
    loss, logs = _objective(dsm_weighting="adaptive")(student, target, x0, None, *gens(5))
    assert float(logs["ctm"]) == float(logs0["ctm"]) and float(logs["dsm"]) == float(logs1["dsm"])   # same draw
    print(f"adaptive λ = {float(logs['dsm_weight']):.4f}, recomputed {expected:.4f}")
    assert float(logs["dsm_weight"]) == pytest.approx(expected, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(logs["ctm"] + logs["dsm_weight"] * logs["dsm"]), rel=1e-6)
    assert not logs["dsm_weight"].requires_grad
    _, logs = _objective(dsm_weighting="fixed", dsm_weight=0.37)(student, target, x0, None, *gens(5))
    assert float(logs["dsm_weight"]) == pytest.approx(0.37)


# === d. the target's inner network ==========================================================================

class ScalarNet(nn.Module):
    """D(x, t, s) = θ·x; records (x, t, s, grad enabled) of every call."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=F64))
        self.calls = []

    def forward(self, x, t, s, labels=None):
        self.calls.append((x.detach().clone(), t.double(), s.double(), torch.is_grad_enabled()))
        return self.theta * x


def _coef(a, b):
    """CTM's (f, g) = (t_b/t_a, 1 − t_b/t_a) from the exact float64 grid, rounded to float32."""
    ratio = torch.as_tensor(GRID, dtype=F64)[b] / torch.as_tensor(GRID, dtype=F64)[a]
    return ratio.float().double(), (1 - ratio).float().double()


def _index(sigma):
    idx = (sigma[:, None] - GRID32[None]).abs().argmin(1)
    assert torch.equal(GRID32[idx], sigma)
    return idx


@pytest.mark.parametrize("target_inner", ["student", "target"])
def test_target_inner_network_and_gradient_paths(target_inner):
    """sony/ctm cm/karras_diffusion.py `get_ctm_target` (L270–286, ctm_target_inner_type = 'model_sg': the
    current θ without gradient; outer jump θ⁻) and `get_ctm_estimate` (L244–268: inner θ with gradient, outer
    θ⁻ = target_model with requires_grad off but not under no_grad) [docs/reference_code.md §3]. Student D = θx, target D⁻ = θ⁻x
    (θ ≠ θ⁻, both as parameters): the goal is recomputed by hand from the recorded x_t and grid indices — x̂_u by
    a loop of heun_step over the grid's float32 σ, then (f + gθ̄)·x̂_u from u to s with θ̄ = θ ("student") or θ⁻
    ("target"), then (f + gθ⁻) from s to σ_min — and the inner goal pass runs without autograd. The gradients
    are those of the estimate alone: ∂L/∂θ = 2·mean((est − goal)·β·g_in·x_t) (through the outer θ⁻ jump's
    factor β = f + gθ⁻) and ∂L/∂θ⁻ = 2·mean((est − goal)·g_out·y) with y the estimate's inner output — no term
    from the goal."""
    theta, theta_minus = 0.3, 0.8
    teacher = gaussian_teacher()
    x0 = teacher.sample(48, torch.Generator().manual_seed(2))
    student, target = ScalarNet(theta), ScalarNet(theta_minus)
    obj = _objective(dsm_weighting="fixed", dsm_weight=0.0, target_inner=target_inner)
    loss, _ = obj(student, target, x0, None, *gens(3))
    x_t, t, s, grad_on = student.calls[0]
    assert grad_on
    i, j = _index(t), _index(s)
    k = ctm_indices(N, K, 48, "weighted", *gens(3))[1]                     # the same draw: k of this step
    x_u = x_t.clone()
    for b in range(48):
        for m in range(int(i[b]), int(i[b] + k[b])):
            x_u[b:b + 1] = heun_step(teacher, x_u[b:b + 1], GRID32[m:m + 1], GRID32[m + 1:m + 2])
    inner_net = student if target_inner == "student" else target
    goal_inner_call = inner_net.calls[1] if target_inner == "student" else target.calls[1]
    assert torch.allclose(goal_inner_call[0], x_u, rtol=1e-12, atol=1e-12)   # x̂_u: k Heun steps from t_i
    assert torch.equal(_index(goal_inner_call[1]), i + k) and torch.equal(_index(goal_inner_call[2]), j)
    assert not goal_inner_call[3]                                          # no autograd in the goal
    theta_bar = theta if target_inner == "student" else theta_minus
    f_in, g_in = _coef(i + k, j)
    f_out, g_out = _coef(j, torch.full_like(j, N - 1))
    beta = (f_out + g_out * theta_minus)[:, None]
    goal = beta * (f_in + g_in * theta_bar)[:, None] * x_u
    f_e, g_e = _coef(i, j)
    y = (f_e + g_e * theta)[:, None] * x_t
    est = beta * y
    assert float(loss.detach()) == pytest.approx(float((est - goal).pow(2).mean()), rel=1e-10)
    # the other choice of θ̄ gives a different goal: the test tells the two apart
    other = beta * (f_in + g_in * (theta_minus + theta - theta_bar))[:, None] * x_u
    assert float((est - other).pow(2).mean()) != pytest.approx(float(loss.detach()), rel=1e-4)
    d_theta, d_minus = torch.autograd.grad(loss, [student.theta, target.theta])
    assert float(d_theta) == pytest.approx(float((2 * (est - goal) * beta * g_e[:, None] * x_t).mean()), rel=1e-9)
    assert float(d_minus) == pytest.approx(float((2 * (est - goal) * g_out[:, None] * y).mean()), rel=1e-9)


def test_frozen_target_gets_no_gradient():
    """As the run builds it (training.ema.frozen_copy, CTM's target_model.requires_grad_(False)) [docs/reference_code.md §3]: after
    backward through a full CTM loss (adaptive λ) the target's parameters have no gradient, the student's do."""
    student, target = _mlp_student()
    x0 = gaussian_teacher().sample(32, torch.Generator().manual_seed(1)).float()
    loss, _ = _objective(target_inner="student")(student, target, x0, None, *gens(4))
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in student.parameters())


# === e. train mode and dropout ==============================================================================

def _songunet_student(rate: float):
    from apctl.networks.two_time import TwoTimeDenoiser

    torch.manual_seed(0)
    student = TwoTimeDenoiser.from_init_kwargs(EDM_PRESET_KWARGS["cpu-songunet-16"])
    with torch.no_grad():                       # EDM zero-initialises conv1 and the output conv: dropout would not show
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    set_dropout(student, rate)
    return student


def test_dropout_is_active_in_train_mode_only():
    """C10 cm/networks.py SongUNet (dropout 0.13, applied with training=self.training, L207) with the student in
    train mode (cm_train.py L78) [docs/reference_code.md §5]: a SongUNet two-time student with dropout 0.3 gives two different
    outputs for the same input in train mode and identical ones in eval mode."""
    student = _songunet_student(0.3)
    x = torch.randn(2, EDM_PRESET_KWARGS["cpu-songunet-16"]["img_channels"], 16, 16,
                    generator=torch.Generator().manual_seed(0))
    t, s = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.1])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 2]), 10).float()
    student.train()
    with torch.no_grad():
        assert not torch.equal(student(x, t, s, labels), student(x, t, s, labels))
        student.eval()
        assert torch.equal(student(x, t, s, labels), student(x, t, s, labels))


def test_set_dropout_sets_every_block_and_negative_keeps():
    """StudentConfig.dropout: rate ≥ 0 sets every residual block's rate; rate < 0 keeps the architecture's own —
    EDM's CIFAR-10 DDPM++ has 0.13 in every UNetBlock (EDM train.py --dropout default, which CTM's SongUNet
    default matches, docs/reference_code.md §5), checked on the meta device."""
    student = _songunet_student(0.25)
    blocks = [m for m in student.modules() if isinstance(m, UNetBlock)]
    assert blocks and all(b.dropout == 0.25 for b in blocks)
    set_dropout(student, -1.0)
    assert all(b.dropout == 0.25 for b in blocks)
    set_dropout(student, 0.0)
    assert all(b.dropout == 0.0 for b in blocks)
    from apctl.networks.registry import build_network

    cifar = build_network("EDMPrecond", EDM_PRESET_KWARGS["edm-cifar10-32x32-cond-vp.pkl"], device="meta")
    set_dropout(cifar, -1.0)
    cifar_blocks = [m for m in cifar.modules() if isinstance(m, UNetBlock)]
    assert cifar_blocks and all(b.dropout == 0.13 for b in cifar_blocks)


def _digits_run(tmp_path, *extra):
    from apctl.training.run import prepare

    cfg, _ = load_config("digits-img", ['precond.kind="ctm"', "training.batch_size=4", "training.iterations=2",
                                        "training.eval_every=0", "run.threads=1", *extra])
    return prepare(cfg, tmp_path / "run")


def test_prepare_puts_student_and_target_in_train_mode_and_ema_in_eval(tmp_path):
    """C10 cm_train.py L78 (student train), L130 and train_util.py L581 (target train), L95/L614 (teacher eval)
    [docs/reference_code.md §5]; apctl's evaluation EMA samples in eval mode: prepare() on the digits-img preset (shrunk, CTM
    preconditioning so no statistics) with student.dropout = 0.2 gives student and target in train mode in every
    submodule, the EMA in eval mode in every submodule, and every UNetBlock of all three at rate 0.2."""
    run = _digits_run(tmp_path, "student.dropout=0.2")
    for net, mode in ((run.student, True), (run.target, True), (run.ema, False)):
        assert all(m.training == mode for m in net.modules())
        blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
        assert blocks and all(b.dropout == 0.2 for b in blocks)


# === f. skipped fp16 steps ==================================================================================

def _net(fill: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(F64)
    with torch.no_grad():
        for n, p in enumerate(net.parameters()):
            p.copy_(fill * (1 + n) + torch.arange(p.numel(), dtype=F64).reshape(p.shape) / 7)
    net.train()
    net(torch.randn(8, 3, dtype=F64))                                       # moves the running statistics
    return net


def test_ema_update_skips_a_step_not_taken():
    """C10 cm/train_util.py `run_step` L981–989: the EMA and target updates run only if the fp16 step was taken
    [docs/reference_code.md §7]. took = False leaves every parameter and buffer bit-identical; took = True gives μ·old + (1 − μ)·new
    per entry (to float32 precision: ema_update forms the weight (1 − μ)·took in float32, exact for the float32
    parameters of a run) and copies the buffers."""
    ema, net = _net(2.0), _net(-5.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, net, 0.9, torch.tensor(False))
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    ema_update(ema, net, 0.9, torch.tensor(True))
    for (name, p), (_, q) in zip(ema.named_parameters(), net.named_parameters()):
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * q, rtol=1e-7, atol=1e-7), name
    for (name, b), (_, c) in zip(ema.named_buffers(), net.named_buffers()):
        assert torch.equal(b, c), name


def _toy_run(tmp_path, *extra):
    from apctl.training.run import prepare

    cfg, _ = load_config("toy2d-ctm", ["training.batch_size=32", "run.threads=1", "training.eval_every=0", *extra])
    return prepare(cfg, tmp_path / "run")


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_train_step_with_a_non_finite_gradient_skips_target_and_ema(tmp_path):
    """C10 cm/fp16_util.py MixedPrecisionTrainer (an inf/NaN gradient → step not taken) and train_util.py
    `run_step` (no EMA/target update then) [docs/reference_code.md §7]: one train_step with precision fp16 (GradScaler enabled, CPU)
    and an inf injected into one student gradient (a hook) leaves student, target and EMA bit-identical, logs
    skipped = 1 and lowers the loss scale; the next, clean step is taken (skipped = 0) and moves the target to
    μ·θ⁻ + (1 − μ)·θ."""
    from apctl.training.step import train_step

    run = _toy_run(tmp_path, 'training.precision="fp16"')
    assert run.scaler.is_enabled()
    student0, target0, ema0 = _state(run.student), _state(run.target), _state(run.ema)
    scale0 = run.scaler.get_scale()
    p = run.student.output_weight()
    handle = p.register_hook(lambda g: torch.full_like(g, float("inf")))
    logs = train_step(run, 0, run.student)
    handle.remove()
    assert float(logs["skipped"]) == 1.0 and not math.isfinite(float(logs["grad_norm"]))
    for before, net in ((student0, run.student), (target0, run.target), (ema0, run.ema)):
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert run.scaler.get_scale() < scale0
    logs = train_step(run, 1, run.student)
    assert float(logs["skipped"]) == 0.0
    mu = run.cfg.objective.target_ema
    new = _state(run.student)
    assert any(not torch.equal(new[k], student0[k]) for k in new)
    for k, v in run.target.state_dict().items():
        assert torch.allclose(v, mu * target0[k] + (1 - mu) * new[k], rtol=1e-6, atol=1e-7), k


# === g. the coefficient table ================================================================================

def test_ctm_table_is_the_exact_ratio_in_float32():
    """CTM's 'euler' outer parametrisation G = (s/t)·x + (1 − s/t)·g_θ (C10 cm/karras_diffusion.py L74–85) [docs/reference_code.md
    §3], tabulated on the grid: f[a, b] = float32(t_b/t_a), g[a, b] = float32(1 − t_b/t_a) from the float64 grid,
    bit for bit, for every a ≤ b; the diagonal is exactly (1, 0); below it zeros; σ = float32(grid)."""
    table = CoefficientTable(CTMPrecond(), GRID)
    assert table.f.dtype == torch.float32 and torch.equal(table.sigma.double(), GRID32)
    for a in range(N):
        for b in range(N):
            if b < a:
                assert table.f[a, b] == 0 and table.g[a, b] == 0
                continue
            ratio = GRID[b] / GRID[a]
            assert table.f[a, b] == np.float32(ratio) and table.g[a, b] == np.float32(1 - ratio), (a, b)
        assert table.f[a, a] == 1.0 and table.g[a, a] == 0.0


def test_analytic_table_is_the_coefficients_at_the_exact_grid():
    """Analytic-Precond (Zheng et al. 2025) tabulated: each entry is float32 of precond.coefficients(t_a, t_b)
    called alone at the exact float64 grid values, and the diagonal is (1, 0) (a jump of length 0 is the
    identity), for N(μ, 0.5²I) statistics."""
    precond = oracles.gaussian_precond(0.5, "backward")
    grid = oracles.karras(8)
    table = CoefficientTable(precond, grid)
    for a in range(8):
        for b in range(a, 8):
            f, g = precond.coefficients(torch.tensor(grid[a], dtype=F64), torch.tensor(grid[b], dtype=F64))
            assert table.f[a, b] == f.float() and table.g[a, b] == g.float(), (a, b)
        assert table.f[a, a] == 1.0 and table.g[a, a] == 0.0


def test_jump_on_grid_is_f_x_plus_g_D():
    """G(x, t_a, t_b) = f·x + g·D_θ(x, t_a, t_b) (docs/reference_code.md §3, the euler jump), per row with the table's (f, g), and
    the network is called with (σ_a, σ_b) as float32 grid values."""
    table = CoefficientTable(CTMPrecond(), GRID)
    a, b = torch.tensor([0, 3, 17, 5]), torch.tensor([17, 9, 17, 5])
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    net = ScalarNet(0.45)
    out = jump_on_grid(table, net, x, a, b)
    f, g = _coef(a, b)
    D = 0.45 * x
    assert torch.allclose(out, f[:, None] * x + g[:, None] * D, rtol=1e-15, atol=0)
    assert torch.equal(out[2], x[2]) and torch.equal(out[3], x[3])
    assert torch.equal(net.calls[0][1], GRID32[a]) and torch.equal(net.calls[0][2], GRID32[b])


# === h. no host synchronisation in a step ===================================================================

# Host draws the step is allowed to read (CPU tensors from CPU generators, documented in their docstrings).
HOST_READS = {("consistency.py", "weighted_teacher_steps"), ("consistency.py", "ctm_indices"),
              ("guard.py", "step_is_finite")}


def _guard(name, original):
    def guarded(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame and Path(frame.f_code.co_filename).name in ("_tensor.py", "_tensor_str.py", "overrides.py"):
            frame = frame.f_back
        where = Path(frame.f_code.co_filename)
        if "torch" in where.parts or (where.name, frame.f_code.co_name) in HOST_READS:
            return original(self, *args, **kwargs)
        raise AssertionError(f"host read of a tensor value: Tensor.{name} from {where}:{frame.f_lineno} "
                             f"({frame.f_code.co_name})")
    return guarded


def test_train_step_reads_no_tensor_value_on_the_host(tmp_path, monkeypatch):
    """sony/ctm reads nothing back either, but the statement here is apctl's (training/step.py docstring:
    "Nothing here reads a device value on the host"). One fp32 CTM train_step (toy2d-ctm via prepare, CPU)
    runs with Tensor.item / tolist / nonzero / __bool__ / __int__ / __index__ / __float__ / __format__ and
    torch.nonzero patched to fail when called from anywhere but torch's own code, the two host-draw
    functions (weighted_teacher_steps, ctm_indices) and the guard's one read of whether to take the step
    (guard.step_is_finite, as GradScaler.step reads found_inf). Limitations: on a CPU a device tensor cannot be told from
    a host one, so the rule is by call site; reads inside torch (e.g. an optimizer's CPU step counter, or
    GradScaler.step's found_inf.item() under fp16, hence fp32 here) and implicit syncs in C++ (boolean-mask
    indexing) are not seen."""
    from apctl.training.step import train_step

    run = _toy_run(tmp_path)
    train_step(run, 0, run.student)                                          # warm-up outside the guard
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__index__", "__float__", "__format__"):
        monkeypatch.setattr(torch.Tensor, name, _guard(name, getattr(torch.Tensor, name)))
    original_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda t, *a, **kw: _guard("nonzero", lambda s, *b, **c: original_nonzero(s, *b, **c))(t, *a, **kw))
    with pytest.raises(AssertionError, match="host read"):                  # the guard itself works
        float(torch.ones(()).sum())
    logs = train_step(run, 1, run.student)
    monkeypatch.undo()
    assert math.isfinite(float(logs["loss"])) and float(logs["skipped"]) == 0.0


# === presets: the paper runs use CTM's rules ================================================================

# Written from docs/reference_code.md (C10 cm/script_util.py defaults, L26–45, L87, L31–32; §4 and §5;
# §6 `load_data(random_flip=True)`), not from apctl's config defaults. Effective student dropout: CIFAR-10's
# SongUNet default 0.13 (C10 networks.py L299, docs/reference_code.md §5); ImageNet's UNetModel dropout 0.0 (docs/reference_code.md §5, IN launch
# script); FFHQ has no CTM run, so the architecture's own rate (EDM's --dropout=0.05) is apctl's choice.
CTM_KEYS = {"teacher_steps_law": "weighted", "dsm_weighting": "adaptive", "dsm_sigma_law": "halflognormal",
            "dsm_uniform_fraction": 0.7, "target_inner": "student"}
PAPER_DROPOUT = {"cifar10-cond": 0.13, "cifar10-uncond": 0.13, "ffhq64": 0.05, "imagenet64": 0.0}
PRESETS = list(PAPER_DROPOUT)


def _preset(name):
    return load_config(name)[0]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("key", list(CTM_KEYS))
def test_paper_presets_use_ctms_objective_rules(preset, key):
    """sony/ctm code defaults (C10 cm/script_util.py: heun_step_strategy 'weighted' L31, apply_adaptive_weight
    True L42, diffusion_schedule_sampler 'halflognormal' and diffusion_mult 0.7 L44–45, ctm_target_inner_type
    'model_sg' L27), which the launch scripts do not change [docs/reference_code.md, table and §1–§4]."""
    assert getattr(_preset(preset).objective.ctm, key) == CTM_KEYS[key]


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_effective_student_dropout(preset):
    """Note §5: the student's dropout as CTM trains it — the preset's student.dropout if ≥ 0, else the
    architecture's own (apctl.networks.registry.EDM_PRESET_KWARGS[network]["dropout"])."""
    cfg = _preset(preset)
    rate = cfg.student.dropout if cfg.student.dropout >= 0 else EDM_PRESET_KWARGS[cfg.student.network]["dropout"]
    assert rate == PAPER_DROPOUT[preset]
    if preset.startswith("cifar10"):
        assert cfg.student.dropout < 0                     # through the architecture's own 0.13


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_flip_horizontally(preset):
    """C10/IN cm/image_datasets.py `load_data(random_flip=True)` (L23, L26), not overridden by cm_train.py:
    horizontal flips with p = 0.5 for CIFAR-10 and ImageNet [docs/reference_code.md §6] (apctl applies it to the FFHQ preset too,
    which extends cifar10-cond)."""
    assert _preset(preset).data.xflip is True
