"""Few-step student sampling, the teacher sampler, σ lists and the alignment metrics.

The "perfect students" below know only the exact Gaussian flow and denoiser, never apctl's
coefficients: for the backward Analytic-Precond form the optimal D_θ(x, t, s) is the teacher
denoiser at the exact landing point, D(Φ_{t→s}(x), s) (math note §2.3, exact for Gaussians);
for the forward form it is D(x, t); for CTM it is (Φ_{t→s}(x) − (s/t)·x)/(1 − s/t) (§1.4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apctl.errors import ApctlError
from apctl.metrics.alignment import rms, sliced_wasserstein
from apctl.preconditioning import CTMPrecond
from apctl.sampling import check_sigmas, default_sigmas, student_sample, teacher_sample
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher
from oracles import gaussian_denoiser, gaussian_flow, gaussian_precond, karras

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
C = 0.5
MU = torch.tensor([0.7, -0.4, 0.25], dtype=F64)


def _col(v, like):
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _flow(x, t, s):
    """Exact PF-ODE flow of N(μ, c²I) from σ = t to σ = s (per-sample tensors allowed)."""
    return gaussian_flow(x, t, s, MU, C)


def _D(x, t):
    return gaussian_denoiser(x, t, MU, C)


class Recorder:
    """A net that remembers its calls (t, s per call) and returns a given optimal denoiser."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, s, labels=None):
        assert t.shape == s.shape == (x.shape[0],)
        self.calls.append((t.clone(), s.clone()))
        return self.fn(x, t, s)


def _backward_student(x, t, s):
    return _D(_flow(x, t, s), s)


def _forward_student(x, t, s):
    return _D(x, t)


def _ctm_student(x, t, s):
    t_, s_ = _col(t, x), _col(s, x)
    return (_flow(x, t, s) - (s_ / t_) * x) / (1 - s_ / t_)


@pytest.fixture(scope="module")
def preconds():
    return {"backward": gaussian_precond(C, "backward"), "forward": gaussian_precond(C, "forward"), "ctm": CTMPrecond()}


STUDENTS = {"backward": _backward_student, "forward": _forward_student, "ctm": _ctm_student}


@pytest.mark.parametrize("kind", ["backward", "forward", "ctm"])
@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_perfect_student_reproduces_exact_flow(kind, nfe, preconds):
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(nfe), dtype=F64)
    sigmas = default_sigmas(nfe)
    net = Recorder(STUDENTS[kind])
    out = student_sample(net, preconds[kind], z, sigmas, gamma=0.0)
    exact = _flow(SIGMA_MAX * z, SIGMA_MAX, sigmas[-1])
    assert float((out - exact).abs().max()) <= 1e-9          # brief: 1e-6; measured ≤ 2.5e-13
    # γ = 0: every jump lands exactly on the next level, one network call per level
    assert len(net.calls) == nfe
    for (t, s), now, nxt in zip(net.calls, sigmas[:-1], sigmas[1:]):
        assert torch.all(t == now) and torch.all(s == nxt)


def test_a_wrong_student_is_not_exact(preconds):
    """Guard: the CTM-optimal denoiser used under AP-B coefficients does not reproduce the flow."""
    z = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = student_sample(Recorder(_ctm_student), preconds["backward"], z, default_sigmas(2))
    assert float((out - _flow(SIGMA_MAX * z, SIGMA_MAX, SIGMA_MIN)).pow(2).mean().sqrt()) > 1e-3


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_gamma_renoising_matches_documented_formula(gamma, preconds):
    z = torch.randn(128, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    sigmas = default_sigmas(4)
    net = Recorder(_backward_student)
    out = student_sample(net, preconds["backward"], z, sigmas, gamma=gamma, generator=torch.Generator().manual_seed(9))
    # by hand: s = √(1 − γ²)(σ_{n+1} − σ_min) + σ_min, exact jump, then + √(σ_{n+1}² − s²)·ξ
    gen = torch.Generator().manual_seed(9)
    x = SIGMA_MAX * z
    lands = []
    for now, nxt in zip(sigmas[:-1], sigmas[1:]):
        s = math.sqrt(1 - gamma ** 2) * (nxt - sigmas[-1]) + sigmas[-1]
        lands.append(s)
        x = _flow(x, now, s)
        if nxt ** 2 - s ** 2 > 0:
            x = x + math.sqrt(nxt ** 2 - s ** 2) * torch.randn(x.shape, generator=gen, dtype=F64)
    assert float((out - x).abs().max()) <= 1e-6
    assert [float(s[0]) for _, s in net.calls] == pytest.approx(lands, rel=1e-12)
    if gamma == 1.0:
        assert all(s == pytest.approx(SIGMA_MIN) for s in lands)
    # the samples are still distributed as q_{σ_min}: per-dimension std √(c² + σ_min²) ≈ 0.5
    assert float(out.std(0).mean()) == pytest.approx(math.sqrt(C * C + SIGMA_MIN ** 2), rel=0.15)


def test_gamma_out_of_range_raises(preconds):
    z = torch.zeros(2, 3, dtype=F64)
    for gamma in (-0.1, 1.5):
        with pytest.raises(ApctlError):
            student_sample(Recorder(_backward_student), preconds["backward"], z, default_sigmas(2), gamma=gamma)


def test_default_sigmas():
    for nfe in (1, 2, 3, 8):
        got = default_sigmas(nfe)
        assert len(got) == nfe + 1 and all(isinstance(v, float) for v in got)
        np.testing.assert_allclose(got, karras(nfe + 1), rtol=1e-13)
    assert default_sigmas(1) == pytest.approx([80.0, 0.002])
    grid = karras(18)
    snapped = default_sigmas(3, grid)
    expect = karras(4)
    for inner, free in zip(snapped[1:-1], expect[1:-1]):
        assert inner in grid.tolist()
        assert inner == grid[np.argmin(np.abs(np.log(grid) - np.log(free)))]
    assert snapped[0] == pytest.approx(80.0) and snapped[-1] == pytest.approx(0.002)
    with pytest.raises(ApctlError):
        default_sigmas(0)
    with pytest.raises(ApctlError):
        default_sigmas(-2)
    with pytest.raises(ApctlError):
        default_sigmas(6, np.array([80.0, 1.0, 0.002]))          # not enough distinct grid levels


def test_check_sigmas():
    assert check_sigmas([80, 1, 0.002]) == [80.0, 1.0, 0.002]
    assert check_sigmas(np.array([2.0, 1.0])) == [2.0, 1.0]
    for bad in ([80.0], [], [80.0, 80.0, 1.0], [1.0, 80.0], [80.0, 1.0, 2.0], [80.0, -1.0], [80.0, 0.0],
                [80.0, float("nan")], [float("inf"), 1.0]):
        with pytest.raises(ApctlError):
            check_sigmas(bad)
    with pytest.raises(ApctlError):
        student_sample(Recorder(_backward_student), CTMPrecond(), torch.zeros(2, 3, dtype=F64), [1.0, 2.0])


def test_teacher_sample_converges_to_exact_flow():
    T = GaussianMixtureTeacher(MU[None].numpy(), [C])
    z = torch.randn(128, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    exact = _flow(SIGMA_MAX * z, SIGMA_MAX, SIGMA_MIN)
    errors = [rms(teacher_sample(T, z, steps), exact) for steps in (16, 32, 64)]
    assert errors[0] / errors[1] >= 3.0 and errors[1] / errors[2] >= 3.0, errors
    assert errors[-1] <= 2e-3, errors
    out32 = teacher_sample(T, z.float(), 8)
    assert out32.dtype == torch.float32 and out32.shape == z.shape


def test_teacher_sample_walks_its_karras_levels_with_two_evaluations_a_step():
    """`steps` Heun steps σ_max → σ_min with no final step to 0: 2·steps evaluations, the predictor at
    each level of the (steps + 1)-level Karras schedule but the last, the corrector at each but the first."""
    T = GaussianMixtureTeacher(MU[None].numpy(), [C])
    seen = []

    class Counting:
        device, dtype = T.device, T.dtype

        def __call__(self, x, sigma, labels=None):
            seen.append(float(sigma[0]))
            return T(x, sigma, labels)

    steps = 4
    teacher_sample(Counting(), torch.randn(3, 3, dtype=F64), steps)
    levels = karras(steps + 1, SIGMA_MIN, SIGMA_MAX)
    assert len(seen) == 2 * steps
    assert seen[0::2] == pytest.approx(levels[:-1], rel=1e-12)
    assert seen[1::2] == pytest.approx(levels[1:], rel=1e-12)


# --- metrics ----------------------------------------------------------------------------------

def test_rms():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 2, 3, generator=gen), torch.randn(10, 2, 3, generator=gen)
    expect = math.sqrt(np.mean((a.double().numpy() - b.double().numpy()) ** 2))
    assert rms(a, b) == pytest.approx(expect, rel=1e-12)
    assert rms(a, a) == 0.0
    assert rms(torch.zeros(4), torch.full((4,), 3.0)) == pytest.approx(3.0)


def test_sliced_wasserstein():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 4, generator=gen, dtype=F64)
    b = torch.randn(300, 4, generator=gen, dtype=F64) * 1.3 + 0.2
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(300, generator=gen)]) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a), rel=1e-12)
    assert sliced_wasserstein(a, b) > 0.1
    # 1-D: the only direction is ±1, so SW₂ is the exact W₂ of the two samples
    x = torch.randn(200, 1, generator=gen, dtype=F64)
    shifted = (x + 0.7)[torch.randperm(200, generator=gen)]
    assert sliced_wasserstein(x, shifted) == pytest.approx(0.7, rel=1e-12)
    y = torch.rand(200, 1, generator=gen, dtype=F64) * 3
    w2 = math.sqrt(float(((x[:, 0].sort().values - y[:, 0].sort().values) ** 2).mean()))
    assert sliced_wasserstein(x, y) == pytest.approx(w2, rel=1e-12)
    # a shift v in d dimensions: W₂ along θ is |⟨v, θ⟩|, so SW₂² → ‖v‖²/d for many directions
    v = torch.tensor([0.3, -0.4, 0.0, 1.2], dtype=F64)
    sw = sliced_wasserstein(a, a + v, n_projections=4096)
    assert sw ** 2 == pytest.approx(float(v @ v) / 4, rel=0.08)
    assert sliced_wasserstein(a, b, seed=3) == sliced_wasserstein(a, b, seed=3)
    with pytest.raises(ValueError):
        sliced_wasserstein(a, b[:-1])
