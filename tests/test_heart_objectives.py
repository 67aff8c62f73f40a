"""The rules of the consistency objectives (apctl/objectives/consistency.py), through their public methods.

Each test checks one statement of the module docstring (CTM, Kim et al. 2024; CD, Song et al. 2023)
against something computed independently here: the exact index law enumerated in tests/oracles.py,
Heun's step on a linear ODE in closed form, the exact Gaussian flow, the EDM weight's unit loss for
N(μ, σ_d²I) data, and networks whose output is a known function of one scalar parameter. Rows of a
batch are followed through calls that recording networks see, not by replaying the objective's RNG.

Measured here: the uniform CTM law on N = 18, K = 17 has E[k] = 5.0 and P(i = 0) = 1/17 ≈ 0.059;
CTM's weighted law (p(k) ∝ k) has E[k] = 35/3 ≈ 11.67 and P(i = 0) ≈ 0.294. Heun on the 18-point grid vs
the exact flow of N(μ, diag c²): worst relative error of the contraction 6.5% (17 steps 80 → σ_min), 4× smaller
with twice the steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import oracles
from apctl.objectives.consistency import CDObjective, CTMObjective
from apctl.preconditioning import CTMPrecond
from apctl.preconditioning.jump import jump
from apctl.sampling import heun_step
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher
from apctl.training.ema import frozen_copy

F64 = torch.float64
SIGMA_D = 0.5
N, K = 18, 17
GRID = oracles.karras(N)
SIGMA_MIN = float(GRID[-1])


def f32(values) -> torch.Tensor:
    """Float64 values rounded to float32 and back: the objective keeps its grid and its (f, g) table in float32
    (the table's entries are the exact float64 values cast to float32; tests/test_ctm_rules.py checks that)."""
    return torch.as_tensor(values, dtype=F64).float().double()


GRID32 = f32(GRID)                                   # σ as the networks and the teacher see it


def grid_index(sigma: torch.Tensor) -> torch.Tensor:
    """The grid index of each (float32-valued) σ a network was called with."""
    index = (sigma.double()[:, None] - GRID32[None]).abs().argmin(1)
    assert torch.equal(GRID32[index], sigma.double())
    return index


def ctm_coefficients(a: torch.Tensor, b: torch.Tensor):
    """CTM's (f, g) = (t_b/t_a, 1 − t_b/t_a) from the exact float64 grid, rounded to float32."""
    ratio = torch.as_tensor(GRID, dtype=F64)[b] / torch.as_tensor(GRID, dtype=F64)[a]
    return f32(ratio), f32(1 - ratio)


class SquaredL2F64(nn.Module):
    """mean_i (a_i − b_i)² per sample, in the inputs' dtype (float64 here, so differences stay exact)."""

    def forward(self, a, b):
        return (a - b).pow(2).flatten(1).mean(1)


# --- the one place objectives are constructed --------------------------------------------------------

def make_ctm(teacher, precond=None, n: int = N, k: int = K, dsm_weight: float = 1.0, distance=None,
             law: str = "weighted", weighting: str = "fixed", sigma_law: str = "halflognormal",
             target_inner: str = "student") -> CTMObjective:
    """CTM with a fixed DSM weight by default (the scalar test networks have no output layer for the adaptive one)."""
    return CTMObjective(teacher, precond or CTMPrecond(), oracles.karras(n), distance or SquaredL2F64(),
                        max_teacher_steps=k, teacher_steps_law=law, dsm_weighting=weighting, dsm_weight=dsm_weight,
                        dsm_sigma_law=sigma_law, target_inner=target_inner, sigma_data=SIGMA_D)


def gens(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(per-rank generator, shared generator) of one step."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000 + seed)


def make_cd(teacher, precond=None, n: int = N, distance=None) -> CDObjective:
    return CDObjective(teacher, precond or CTMPrecond(), oracles.karras(n), distance or SquaredL2F64())


# --- helpers -------------------------------------------------------------------------------------

MU = torch.tensor([0.4, -0.3, 0.2], dtype=F64)
C = torch.tensor([0.3, 0.5, 0.8], dtype=F64)


def gaussian_teacher() -> GaussianMixtureTeacher:
    return GaussianMixtureTeacher(MU[None].numpy(), C[None].numpy())


class ScalarNet(nn.Module):
    """D(x, t, s) = θ·x with one scalar parameter θ; remembers every call's (x, t, s) and the grad mode."""

    def __init__(self, theta: float, trainable: bool = True):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=F64), requires_grad=trainable)
        self.calls = []

    def forward(self, x, t, s, labels=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), s.detach().clone()))
        return self.theta * x


class RecordingTeacher:
    """A teacher that forwards to another and records whether autograd was on at each call."""

    def __init__(self, inner):
        self.inner, self.dtype, self.grad_modes = inner, inner.dtype, []

    def __call__(self, x, sigma, labels=None):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.inner(x, sigma, labels)


def _inner_call(net: ScalarNet):
    """The student's inner-jump call of a CTM step with target_inner = "target" (t > s in every row); its DSM
    call has t == s in every row."""
    calls = [c for c in net.calls if not torch.equal(c[1], c[2])]
    assert len(calls) == 1, len(calls)
    return calls[0]


def _ctm_outer_factor(s_index: torch.Tensor, theta_minus: float) -> torch.Tensor:
    """G_{θ⁻}(y, s, σ_min) = β·y for D⁻ = θ⁻·x under CTM: β = f + g·θ⁻ with (f, g) = (σ_min/s, 1 − σ_min/s) in
    float32; at s = σ_min that is (1, 0), so β = 1 (the jump is made and is the identity)."""
    f, g = ctm_coefficients(s_index, torch.full_like(s_index, N - 1))
    return f + g * theta_minus


# --- (1) CTM's index law --------------------------------------------------------------------------

def test_oracles_module_is_ours():
    """`import oracles` finds tests/oracles.py (not some installed module; torch-fidelity ships `tests`)."""
    from pathlib import Path

    assert Path(oracles.__file__).resolve().parent == Path(__file__).resolve().parent


@pytest.mark.parametrize("law", [oracles.ctm_uniform_index_law, oracles.ctm_weighted_index_law])
def test_index_law_oracles_are_distributions(law):
    """Both enumerated laws sum to 1 exactly and respect the support i + k ≤ j ≤ N − 1, 1 ≤ k ≤ K; on N = 18,
    K = 17 the weighted law (p(k) ∝ k) has E[k] = Σk²/Σk = 35/3 and P(i = 0) = Σ_k p(k)/(N − k); the uniform
    law has E[k] = 5 and P(i = 0) = 1/17."""
    table = law(N, K)
    assert sum(table.values()) == 1
    assert all(1 <= k <= K and 0 <= i and i + k <= j <= N - 1 and p > 0 for (i, k, j), p in table.items())
    e_k = float(sum(p * k for (i, k, j), p in table.items()))
    p_i0 = float(sum(p for (i, k, j), p in table.items() if i == 0))
    print(f"{law.__name__}: E[k] = {e_k:.4f}, P(i=0) = {p_i0:.4f}")
    if law is oracles.ctm_weighted_index_law:
        assert e_k == pytest.approx(35 / 3, rel=1e-12)
        assert p_i0 == pytest.approx(sum(k / 153 / (N - k) for k in range(1, 18)), rel=1e-12)
        assert p_i0 == pytest.approx(0.2935, abs=1e-4)
    else:
        assert e_k == pytest.approx(5.0, rel=1e-12) and p_i0 == pytest.approx(1 / 17, rel=1e-12)
    small = law(4, 2)                 # by hand for N = 4, K = 2
    if law is oracles.ctm_uniform_index_law:
        assert small[(0, 1, 1)] == pytest.approx(1 / 3 * 1 / 2 * 1 / 3) and small[(2, 1, 3)] == pytest.approx(1 / 3)
    else:
        assert small[(0, 2, 2)] == pytest.approx(2 / 3 * 1 / 2 * 1 / 2) and small[(2, 1, 3)] == pytest.approx(1 / 9)


def assert_joint_law(i, k, j, law, n_grid):
    """The empirical joint law of n draws (i, k, j) is the enumerated `law`: nothing outside its support,
    chi-square within 6 sd of its dof, total variation within its expectation + 3/√n."""
    n = len(i)
    code = lambda a, b, c: (a * n_grid + b) * n_grid + c          # noqa: E731
    counts = torch.bincount(code(i, k, j), minlength=n_grid ** 3).double()
    cells = torch.tensor([code(*key) for key in law])
    p = torch.tensor([float(v) for v in law.values()], dtype=F64)
    assert counts.sum() == counts[cells].sum()                    # nothing outside the support
    obs, exp = counts[cells], n * p
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(law) - 1
    assert chi2 <= dof + 6 * math.sqrt(2 * dof), (chi2, dof)
    tv = 0.5 * float((obs / n - p).abs().sum())
    expected_tv = 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())
    assert tv <= expected_tv + 3 / math.sqrt(n), (tv, expected_tv)
    return chi2, dof, tv


@pytest.mark.parametrize("n_grid, k_max", [(18, 17), (18, 3), (6, 17)])
def test_sample_indices_follow_the_uniform_law(n_grid, k_max):
    """law = "uniform" (apctl's former per-sample law): (i, k, j) from sample_indices are always in the support,
    and the empirical joint law of 400 000 draws is the enumerated ctm_uniform_index_law; the returned chain
    length is the batch's largest k."""
    n = 400_000
    i, k, j, k_max_drawn = make_ctm(gaussian_teacher(), n=n_grid, k=k_max, law="uniform").sample_indices(n, *gens(0))
    assert (i >= 0).all() and (i <= n_grid - 2).all()
    assert (k >= 1).all() and (k <= k_max).all() and (i + k <= n_grid - 1).all()
    assert (j >= i + k).all() and (j <= n_grid - 1).all()
    assert k_max_drawn == int(k.max())
    assert_joint_law(i, k, j, oracles.ctm_uniform_index_law(n_grid, k_max), n_grid)


# --- (2) which tensors carry gradient ------------------------------------------------------------------

def _ctm_loss(student, target, teacher, x0, seed, dsm_weight=0.0, **kw):
    return make_ctm(teacher, dsm_weight=dsm_weight, **kw)(student, target, x0, None, *gens(seed))


@pytest.mark.parametrize("weighting, dsm_weight", [("fixed", 0.0), ("fixed", 1.0), ("adaptive", 1.0)])
@pytest.mark.parametrize("target_inner", ["student", "target"])
def test_ctm_gradient_reaches_the_student_only(weighting, dsm_weight, target_inner):
    """With a real student (TwoTimeMLP) and its frozen EMA target: the student gets a non-zero gradient,
    from the consistency term alone too (fixed weight 0); the target's parameters get none; the teacher runs
    without autograd."""
    from apctl.networks.mlp import TwoTimeMLP

    torch.manual_seed(0)
    student = TwoTimeMLP((3,), hidden=16, depth=2, embed_dim=8)
    with torch.no_grad():
        for p in student.head.parameters():                  # the zero-initialised head would hide the body
            p.normal_(0, 0.1)
    target = frozen_copy(student)
    teacher = RecordingTeacher(gaussian_teacher())
    x0 = gaussian_teacher().sample(64, torch.Generator().manual_seed(1)).float()
    loss, _ = _ctm_loss(student, target, teacher, x0, seed=2, dsm_weight=dsm_weight, weighting=weighting,
                        target_inner=target_inner)
    loss.backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0
    assert all(p.grad is None for p in target.parameters())
    assert teacher.grad_modes and not any(teacher.grad_modes)


@pytest.mark.parametrize("theta, theta_minus", [(0.3, 0.8), (1.2, -0.4)])
def test_ctm_consistency_gradient_flows_through_the_student_jump_only(theta, theta_minus):
    """target_inner = "target" (the goal is θ⁻ only): student D = θ·x, target D⁻ = θ⁻·x, CTM coefficients: the
    estimate is β(s)·(f + g·θ)·x_t with (f, g) the float32 (s/t, 1 − s/t), and the goal does not depend on θ, so
    the loss is a quadratic in θ with curvature 2·mean(β²g²x_t²) (from the inputs the student saw). Autograd
    equals the central difference, and the second difference equals that curvature — it would not if the goal
    or the outer jump depended on θ."""
    teacher = gaussian_teacher()
    x0 = teacher.sample(32, torch.Generator().manual_seed(3))

    def loss_at(th, record=False):
        student, target = ScalarNet(th), ScalarNet(theta_minus, trainable=False)
        loss, logs = _ctm_loss(student, target, teacher, x0, seed=4, target_inner="target")
        assert loss.dtype == F64 and logs["loss"] == pytest.approx(loss.item())
        return (loss, student, target) if record else loss.item()

    loss, student, target = loss_at(theta, record=True)
    (grad,) = torch.autograd.grad(loss, student.theta)
    h = 1e-3
    central = (loss_at(theta + h) - loss_at(theta - h)) / (2 * h)
    assert float(grad) == pytest.approx(central, rel=1e-9, abs=1e-12)
    x_t, t, s = _inner_call(student)
    a, b = grid_index(t), grid_index(s)
    beta = _ctm_outer_factor(b, theta_minus)
    _, g = ctm_coefficients(a, b)
    curvature = 2 * float((beta[:, None] ** 2 * g[:, None] ** 2 * x_t ** 2).mean())
    second = (loss_at(theta + h) - 2 * loss.item() + loss_at(theta - h)) / h ** 2
    assert second == pytest.approx(curvature, rel=1e-6)
    assert len(target.calls) == 3          # the estimate's outer jump, the goal's inner and outer jumps


# --- (3) boundary rows of the outer jump --------------------------------------------------------------

def test_to_sigma_min_keeps_boundary_rows_and_jumps_the_others():
    """G(x, t_a, σ_min) for grid indices a: rows with a = N − 1 (already at σ_min) come back bit-identical
    (f = 1, g = 0: the jump is made and is the identity, no branch), the others are f·x + g·θx with (f, g) the
    float32 (σ_min/t_a, 1 − σ_min/t_a) by hand; the network sees every row at (t_a, σ_min). All-boundary batches
    too, and the off-grid float64 jump agrees to float32 precision."""
    obj = make_ctm(gaussian_teacher())
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    a = torch.tensor([N - 1, 3, N - 1, 16, 0])
    net = ScalarNet(0.7)
    out = obj.to_sigma_min(net, x, a, None)
    f, g = ctm_coefficients(a, torch.full_like(a, N - 1))
    for r in range(5):
        if a[r] == N - 1:
            assert torch.equal(out[r], x[r])
        else:
            assert torch.allclose(out[r], f[r] * x[r] + g[r] * 0.7 * x[r], rtol=1e-14, atol=0)
    (_, t_seen, s_seen), = net.calls
    assert torch.equal(t_seen.double(), GRID32[a]) and torch.all(s_seen.double() == GRID32[-1])
    assert torch.equal(obj.to_sigma_min(net, x, torch.full((5,), N - 1), None), x)
    above = torch.full((5,), 5)
    exact = jump(CTMPrecond(), ScalarNet(0.7), x, torch.full((5,), float(GRID[5]), dtype=F64),
                 torch.full((5,), SIGMA_MIN, dtype=F64))
    assert torch.allclose(obj.to_sigma_min(net, x, above, None), exact, rtol=1e-6)


# --- (4) the teacher's Heun steps ------------------------------------------------------------------------

def _heun_factor(t: float, u: float) -> torch.Tensor:
    """Heun's step on dy/dσ = a(σ)·y, a = σ/(c² + σ²) (the PF-ODE of N(μ, diag c²) for y = x − μ), multiplies y by
    1 + h(a_t + a_u)/2 + h²·a_t·a_u/2, h = u − t (Euler predictor, trapezoidal corrector, expanded)."""
    a_t, a_u, h = t / (C ** 2 + t ** 2), u / (C ** 2 + u ** 2), u - t
    return 1 + h * (a_t + a_u) / 2 + h * h * a_t * a_u / 2


ROWS = [(0, 1), (0, 17), (3, 5), (10, 7), (16, 1), (5, 2), (12, 3)]     # (start index i, steps k) per row


def _start(seed: int) -> torch.Tensor:
    return MU + 80.0 * torch.randn(len(ROWS), 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _steps(obj, x, scale: int = 1):
    i = scale * torch.tensor([i for i, _ in ROWS])
    k = scale * torch.tensor([k for _, k in ROWS])
    return obj.teacher_steps(x, i, k, int(k.max()), None)


def test_teacher_steps_per_row_start_and_count():
    """k Heun steps from grid index i, per row with different (i, k) in one batch: each row equals (a) the
    closed-form Heun product Π factor(t_m, t_{m+1}) over m = i … i+k−1 applied to x − μ and (b) a loop of single
    heun_step calls, at the grid's float32 values, so every row starts and stops at its own index (rows that are
    done keep their value while the longest row continues)."""
    teacher = gaussian_teacher()
    x = _start(6)
    out = _steps(make_ctm(teacher), x)
    grid = [float(v) for v in GRID32]
    for b, (i, k) in enumerate(ROWS):
        factor = torch.ones(3, dtype=F64)
        y = x[b:b + 1]
        for m in range(i, i + k):
            factor = factor * _heun_factor(grid[m], grid[m + 1])
            y = heun_step(teacher, y, torch.tensor([grid[m]], dtype=F64), torch.tensor([grid[m + 1]], dtype=F64))
        assert torch.allclose(out[b], MU + factor * (x[b] - MU), rtol=1e-12, atol=1e-12), (i, k)
        assert torch.allclose(out[b], y[0], rtol=1e-13, atol=1e-13), (i, k)


def test_teacher_steps_approach_the_exact_flow_at_second_order():
    """Against the exact flow t_i → t_{i+k} of N(μ, diag c²): the (2N − 1)-point Karras grid contains the N-point
    grid at its even indices, so (2i, 2k) on it covers the same interval with half the steps; Heun's error
    shrinks by ~4 (second order; asserted ≥ 2 for every row), and on the N-point grid it stays below 10%
    (measured worst 6.5%, the 17-step row 80 → σ_min)."""
    teacher = gaussian_teacher()
    x = _start(7)
    i, k = torch.tensor([i for i, _ in ROWS]), torch.tensor([k for _, k in ROWS])
    coarse = _steps(make_ctm(teacher, n=N), x)
    fine = _steps(make_ctm(teacher, n=2 * N - 1), x, scale=2)
    exact = oracles.gaussian_flow(x, GRID32[i], GRID32[i + k], MU, C)
    err_coarse = ((coarse - exact) / (exact - MU)).abs().amax(1)         # relative error of the contraction
    err_fine = ((fine - exact) / (exact - MU)).abs().amax(1)
    print("Heun relative error per row, N and 2N − 1 points:", err_coarse.tolist(), err_fine.tolist())
    assert (err_coarse <= 0.1).all(), err_coarse
    assert (err_coarse >= 2 * err_fine).all(), (err_coarse, err_fine)


# --- (5) the DSM term ------------------------------------------------------------------------------------

class ExactStudent(nn.Module):
    """D(x, t, s) = the teacher's exact denoiser at σ = t (ignores s)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.dummy = nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, x, t, s, labels=None):
        return self.teacher.denoise(x, t) + 0 * self.dummy


@pytest.mark.parametrize("sigma_law", ["halflognormal", "lognormal"])
def test_dsm_of_the_exact_denoiser_is_the_irreducible_error(sigma_law):
    """Dirac data at one point: the exact denoiser is that point, DSM = 0. Data N(μ, σ_d²I): the posterior
    variance per dimension is σ_d²σ²/(σ_d² + σ²), and EDM's weight (σ² + σ_d²)/(σσ_d)² turns it into exactly 1 for
    every σ (whatever the σ law), so the DSM term is a mean of B·d squared standard normals: 1 within
    5·√(2/(B·d))."""
    point = torch.tensor([[0.3, -0.7, 1.1]], dtype=F64)
    dirac = GaussianMixtureTeacher(point.numpy(), [0.0])
    x0 = dirac.sample(256, torch.Generator().manual_seed(7))
    _, logs = make_ctm(dirac, sigma_law=sigma_law)(ExactStudent(dirac), ExactStudent(dirac), x0, None, *gens(8))
    assert logs["dsm"] <= 1e-12, logs
    gauss = GaussianMixtureTeacher(MU[None].numpy(), [SIGMA_D])
    B = 8192
    x0 = gauss.sample(B, torch.Generator().manual_seed(9))
    _, logs = make_ctm(gauss, sigma_law=sigma_law)(ExactStudent(gauss), ExactStudent(gauss), x0, None, *gens(10))
    assert abs(logs["dsm"] - 1.0) <= 5 * math.sqrt(2 / (B * 3)), logs
    # and a student that is not the denoiser (D = x) is clearly worse: w·σ² ≥ 1 per dimension
    _, logs = make_ctm(gauss, sigma_law=sigma_law)(ScalarNet(1.0), ScalarNet(1.0, False), x0, None, *gens(10))
    assert logs["dsm"] >= 2.0, logs


# --- (6) CD -----------------------------------------------------------------------------------------------

def test_cd_index_law_one_teacher_step_and_sigma_min():
    """CD: t = t_i with i ~ U{0 … N−2} (chi-square over N − 1 cells); the goal's input is one Heun step from
    x_t to u = t_{i+1}; estimate and goal both jump to σ_min in every row (goal rows with u = σ_min come back as
    x̂_u itself: f = 1, g = 0); the loss is the mean distance of the two, by hand for D = θ·x, D⁻ = θ⁻·x."""
    teacher = gaussian_teacher()
    B = 20_000
    x0 = teacher.sample(B, torch.Generator().manual_seed(11))
    student, target = ScalarNet(0.6), ScalarNet(0.9, trainable=False)
    loss, _ = make_cd(teacher)(student, target, x0, None, *gens(12))
    assert len(student.calls) == 1
    x_t, t, s = student.calls[0]
    assert torch.all(s.double() == GRID32[-1])
    i = grid_index(t)
    counts = torch.bincount(i, minlength=N).double()
    assert counts[N - 1] == 0
    chi2 = float(((counts[:N - 1] - B / (N - 1)) ** 2 / (B / (N - 1))).sum())
    assert chi2 <= (N - 2) + 6 * math.sqrt(2 * (N - 2)), chi2
    x_u = heun_step(teacher, x_t, GRID32[i], GRID32[i + 1])
    (xg, tg, sg), = target.calls
    assert torch.allclose(xg, x_u, rtol=1e-13, atol=1e-13)
    assert torch.equal(tg.double(), GRID32[i + 1]) and torch.all(sg.double() == GRID32[-1])
    f, g = ctm_coefficients(i, torch.full_like(i, N - 1))
    estimate = (f + g * 0.6)[:, None] * x_t
    goal = _ctm_outer_factor(i + 1, 0.9)[:, None] * x_u
    assert loss.item() == pytest.approx(float((estimate - goal).pow(2).mean()), rel=1e-10)
