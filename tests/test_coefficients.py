"""Outer coefficients f(t, s), g(t, s): CTM, CM and Analytic-Precond (math note §2, oracle list §4.5).

Every expected value here is computed independently of apctl: closed forms of the math note
(§2.4, §4.1, §1.3), the note's printed reference table, an independent Gauss–Legendre quadrature
of the defining integrals (§2.3) with analytic antiderivatives for L and S, a second-order Taylor
expansion derived below, exact Gaussian flows, and exact PF-ODE trajectories of a Gaussian mixture
integrated with scipy's DOP853 (not apctl's solver).

Measured on this machine (kept here so a regression is visible in review):
* l ≡ s ≡ 0: max |Δ| 7e-15; isotropic Gaussian: max |Δcoef| 5e-14 (backward) / 1.5e-13 (forward).
* CTM's worst RMS one-jump error on the isotropic Gaussian (c = 0.5, N = 18 grid): 0.495 (80 → ε).
* 120-point tables: cubic max |Δcoef| 1.2e-7, linear 2.2e-4 (backward) / 5.3e-4 (forward).
* ring GMM (8 modes, std 0.08, radius 0.7, centre (0.3, −0.2)), statistics from estimate_statistics
  with 1024 samples: AP-B's landing-point gap beats CTM's on 0.82 of the 153 pairs (the losers are
  the landing levels s = 0.14 and 0.06 for every start t; an oracle-statistics run gives the same
  0.82, so this is the geometry, not the estimator), geometric-mean ratio 0.10.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from apctl.errors import ApctlError
from apctl.preconditioning import AnalyticPrecond, CMPrecond, CTMPrecond
from apctl.preconditioning.statistics import StatisticsSettings, estimate_statistics
from apctl.schedules import karras_sigmas
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher
from oracles import gaussian_denoiser, gaussian_flow, gaussian_l, gaussian_precond, karras, ring_teacher

SIGMA_MIN, SIGMA_MAX, SIGMA_D, RHO = 0.002, 80.0, 0.5, 7.0
N = 18


SIG = karras(N, SIGMA_MIN, SIGMA_MAX, RHO)
PAIRS = [(i, j) for i in range(N) for j in range(i + 1, N)]
assert len(PAIRS) == 153




def test_karras_grid_matches_note():
    printed = [80, 57.6, 40.8, 28.4, 19.4, 12.9, 8.40, 5.32, 3.26, 1.92, 1.09, 0.585, 0.296, 0.140, 0.060,
               0.023, 0.0075, 0.002]
    np.testing.assert_allclose(karras_sigmas(N), SIG, rtol=1e-13, atol=0)
    np.testing.assert_allclose(SIG, printed, rtol=0.011)


# --- independent reference: the defining integrals of §2.3 by Gauss–Legendre --------------------

_GL_X, _GL_W = np.polynomial.legendre.leggauss(40)


def _integrate(fn, a: float, b: float, piece: float = 0.25) -> float:
    n = max(1, math.ceil((b - a) / piece))
    edges = np.linspace(a, b, n + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    x = 0.5 * (hi - lo) * _GL_X[None] + 0.5 * (hi + lo)
    return float((0.5 * (hi - lo) * _GL_W[None] * fn(x)).sum())


def _reference(t, s, form, l, L, S):
    """(f, g) from §2.3 with analytic antiderivatives L = ∫l, S = ∫s."""
    lt, ls = -math.log(t), -math.log(s)
    if ls == lt:
        return 1.0, 0.0
    A = math.exp(-(ls - lt) + L(ls) - L(lt))
    anchor = ls if form == "backward" else lt
    B = _integrate(lambda x: np.exp(-(ls - x) + L(ls) - L(x) + S(x) - S(anchor)), lt, ls)
    if form == "backward":
        return A / (1 + l(ls) * B), B / (1 + l(ls) * B)
    return A - l(lt) * B, B


# A generic, non-trivial pair of curves with closed-form antiderivatives (l within (0, 1), s of both signs).
_l = lambda x: 0.45 + 0.4 * np.tanh(0.7 * x - 1)                      # noqa: E731
_L = lambda x: 0.45 * x + 0.4 / 0.7 * np.log(np.cosh(0.7 * x - 1))   # noqa: E731
_dl = lambda x: 0.4 * 0.7 / np.cosh(0.7 * x - 1) ** 2                # noqa: E731
_s = lambda x: 0.9 * np.sin(1.3 * x) - 0.5                           # noqa: E731
_S = lambda x: -0.9 / 1.3 * np.cos(1.3 * x) - 0.5 * x                # noqa: E731


def _gauss_closed(t, s, c, form):
    """§2.4(5): both forms for isotropic Gaussian data N(μ, c²I) with exact l and s = −2l."""
    r = (c * c + s * s) / (c * c + t * t)
    q = math.sqrt(r)
    if form == "backward":
        den = s * s + c * c * (1 - q)
        return s * s * q / den, (c * c + s * s) * (1 - q) / den
    return q - (c * c / (t * t)) * (1 - q), (c * c + t * t) * (1 - q) / (t * t)


# --- §4.5(1): l ≡ s ≡ 0 is exactly CTM --------------------------------------------------------

@pytest.mark.parametrize("form", ["backward", "forward"])
def test_zero_statistics_reduce_to_ctm(form):
    ap = AnalyticPrecond.from_functions(np.zeros_like, np.zeros_like, form=form)
    ctm = CTMPrecond()
    worst = 0.0
    for i, j in PAIRS:
        t, s = SIG[i], SIG[j]
        f, g = ap.pair(t, s)
        fc, gc = ctm.coefficients(t, s)
        assert float(fc) == s / t and float(gc) == 1 - s / t
        worst = max(worst, abs(f - s / t), abs(g - (1 - s / t)))
    assert worst <= 1e-8, worst


# --- generic curves: the implementation equals an independent quadrature of §2.3 -----------------

@pytest.mark.parametrize("form", ["backward", "forward"])
def test_generic_statistics_match_independent_quadrature(form):
    ap = AnalyticPrecond.from_functions(_l, _s, form=form)
    worst = 0.0
    for i, j in PAIRS:
        f, g = ap.pair(SIG[i], SIG[j])
        fr, gr = _reference(SIG[i], SIG[j], form, _l, _L, _S)
        worst = max(worst, abs(f - fr), abs(g - gr))
    assert worst <= 1e-8, worst


# --- §4.5(2): boundary and first-order consistency ---------------------------------------------

@pytest.mark.parametrize("form", ["backward", "forward"])
def test_boundary_is_exact(form):
    ap = AnalyticPrecond.from_functions(_l, _s, form=form)
    for t in list(SIG) + [SIGMA_MAX, SIGMA_MIN, 1.0]:
        assert ap.pair(float(t), float(t)) == (1.0, 0.0)
    f, g = ap.coefficients(torch.tensor(SIG), torch.tensor(SIG))
    assert torch.equal(f, torch.ones(N, dtype=torch.float64)) and torch.equal(g, torch.zeros(N, dtype=torch.float64))


def _second_order(form, lam_t, lam_s):
    """h² coefficients of f − (1 − h) and g − h, from a Taylor expansion of §2.3 (derived for this test).

    backward (l, l', s at λ_s): f = 1 − h + (1 + l − l' + l·s)/2·h²,  g = h − (1 + l + s)/2·h²
    forward  (l, l', s at λ_t): f = 1 − h + (1 − l + l' − l·s)/2·h²,  g = h − (1 − l − s)/2·h²
    """
    if form == "backward":
        l, dl, s = _l(lam_s), _dl(lam_s), _s(lam_s)
        return (1 + l - dl + l * s) / 2, -(1 + l + s) / 2
    l, dl, s = _l(lam_t), _dl(lam_t), _s(lam_t)
    return (1 - l + dl - l * s) / 2, -(1 - l - s) / 2


@pytest.mark.parametrize("form", ["backward", "forward"])
def test_first_order_consistency(form):
    ap = AnalyticPrecond.from_functions(_l, _s, form=form)
    for t in (50.0, 3.0, 0.3, 0.01):
        for h in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
            s = t * math.exp(-h)
            f, g = ap.pair(t, s)
            rf, rg = (f - (1 - h)) / h ** 2, (g - h) / h ** 2
            assert abs(rf) <= 2 and abs(rg) <= 2, (t, h, rf, rg)        # bounded (note: max 1.35)
            if h <= 1e-2:                                               # and converging to the Taylor term
                cf, cg = _second_order(form, -math.log(t), -math.log(s))
                assert abs(rf - cf) <= h + 1e-4 and abs(rg - cg) <= h + 1e-4, (t, h, rf, cf, rg, cg)


# --- §4.5(3): constant l, s = 0 ----------------------------------------------------------------

@pytest.mark.parametrize("form", ["backward", "forward"])
@pytest.mark.parametrize("lc", [0.25, 0.8])
def test_constant_l_closed_form(form, lc):
    ap = AnalyticPrecond.from_functions(lambda lam: np.full_like(lam, lc), np.zeros_like, form=form)
    worst = worst_sum = 0.0
    for i, j in PAIRS:
        t, s = SIG[i], SIG[j]
        r = (s / t) ** (1 - lc)
        if form == "forward":
            fe, ge = (r - lc) / (1 - lc), (1 - r) / (1 - lc)
        else:
            fe, ge = (1 - lc) * r / (1 - lc * r), (1 - r) / (1 - lc * r)
        f, g = ap.pair(t, s)
        worst = max(worst, abs(f - fe), abs(g - ge))
        worst_sum = max(worst_sum, abs(f + g - 1))
    assert worst <= 1e-8 and worst_sum <= 1e-8, (worst, worst_sum)


# --- §4.5(4): isotropic Gaussian N(μ, c²I), μ ≠ 0 ------------------------------------------------

C = 0.5
MU = torch.tensor([0.7, -0.4, 0.25, 1.1], dtype=torch.float64)


def _gauss_D(x, t):
    return gaussian_denoiser(x, t, MU, C)


def _gauss_flow(x, t, s):
    return gaussian_flow(x, t, s, MU, C)


def _gauss_precond(form, **kw):
    return gaussian_precond(C, form, **kw)


@pytest.mark.parametrize("form", ["backward", "forward"])
def test_gaussian_coefficients_and_jumps_are_exact(form):
    ap = _gauss_precond(form)
    z = torch.randn(512, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    worst_coef = worst_jump = worst_sum = 0.0
    for i, j in PAIRS:
        t, s = SIG[i], SIG[j]
        f, g = ap.pair(t, s)
        fe, ge = _gauss_closed(t, s, C, form)
        worst_coef = max(worst_coef, abs(f - fe), abs(g - ge))
        worst_sum = max(worst_sum, abs(f + g - 1))
        x_t = MU + math.sqrt(C * C + t * t) * z            # exact samples of q_t
        x_s = _gauss_flow(x_t, t, s)
        anchor = _gauss_D(x_s, s) if form == "backward" else _gauss_D(x_t, t)
        worst_jump = max(worst_jump, float((f * x_t + g * anchor - x_s).pow(2).mean().sqrt()))
    assert worst_coef <= 1e-8, worst_coef
    assert worst_jump <= 1e-8, worst_jump
    assert worst_sum <= 1e-8, worst_sum                     # f + g = 1 in this special case (§4.1)


def test_ctm_jump_is_not_exact_on_gaussian():
    """CTM's DDIM jump (s/t)·x_t + (1 − s/t)·D(x_t, t) misses the exact flow; note §4.1: worst RMS 0.49."""
    z = torch.randn(4096, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = {}
    for i, j in PAIRS:
        t, s = SIG[i], SIG[j]
        f, g = (float(v) for v in CTMPrecond().coefficients(t, s))
        x_t = MU + math.sqrt(C * C + t * t) * z
        errors[(i, j)] = float((f * x_t + g * _gauss_D(x_t, t) - _gauss_flow(x_t, t, s)).pow(2).mean().sqrt())
    worst_pair = max(errors, key=errors.get)
    # closed form of that RMS per dimension: |(s/t + (1 − s/t)·a_t)·√(c² + t²) − √(c² + s²)|
    t, s = SIG[worst_pair[0]], SIG[worst_pair[1]]
    closed = abs((s / t + (1 - s / t) * C * C / (C * C + t * t)) * math.sqrt(C * C + t * t) - math.sqrt(C * C + s * s))
    assert worst_pair == (0, N - 1)
    assert errors[worst_pair] == pytest.approx(closed, rel=0.03)
    assert 0.45 <= errors[worst_pair] <= 0.5, errors[worst_pair]


# §4.1 reference table (c = 0.5), computed at the printed (rounded) t and s.
TABLE = [
    (80, 0.002, 1.006261e-07, 1.000000, 0.006211, 0.993789, 0.000025, 0.999975),
    (80, 0.2964, 1.899482e-03, 0.998101, 0.007227, 0.992773, 0.003705, 0.996295),
    (80, 3.2568, 4.027596e-02, 0.959724, 0.041149, 0.958851, 0.040710, 0.959290),
    (8.4009, 0.2964, 1.892700e-02, 0.981073, 0.065769, 0.934231, 0.035282, 0.964718),
    (1.0882, 0.0599, 1.016239e-02, 0.989838, 0.298154, 0.701846, 0.055045, 0.944955),
    (0.2964, 0.0229, 1.281228e-02, 0.987188, 0.465895, 0.534105, 0.077260, 0.922740),
    (0.0229, 0.002, 1.514751e-02, 0.984852, 0.503556, 0.496444, 0.087336, 0.912664),
]


def _half_ulp_sci(value: float) -> float:
    """Half a unit in the last place of a value printed as d.dddddde±XX."""
    return 0.5 * 10.0 ** (math.floor(math.log10(abs(value))) - 6)


def test_reference_table_of_note():
    back, fwd, ctm = _gauss_precond("backward"), _gauss_precond("forward"), CTMPrecond()
    slack = 1e-9
    for t, s, fb, gb, ff, gf, fc, gc in TABLE:
        f, g = back.pair(t, s)
        assert abs(f - fb) <= _half_ulp_sci(fb) + 1e-13, (t, s, f, fb)
        assert abs(g - gb) <= 5e-7 + slack, (t, s, g, gb)
        f, g = fwd.pair(t, s)
        assert abs(f - ff) <= 5e-7 + slack and abs(g - gf) <= 5e-7 + slack, (t, s, f, g, ff, gf)
        f, g = (float(v) for v in ctm.coefficients(t, s))
        assert abs(f - fc) <= 5e-7 + slack and abs(g - gc) <= 5e-7 + slack, (t, s, f, g)


# --- §4.5(5): statistics tabulated on 120 λ points --------------------------------------------

@pytest.mark.parametrize("form", ["backward", "forward"])
def test_tabulated_statistics_cubic_vs_linear(form):
    lam = np.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), 120)
    lf = gaussian_l(C)
    z = torch.randn(256, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    worst = {}
    for interpolation in ("cubic", "linear"):
        ap = AnalyticPrecond(lam, lf(lam), -2 * lf(lam), form=form, interpolation=interpolation)
        coef = jump = 0.0
        for i, j in PAIRS:
            t, s = SIG[i], SIG[j]
            f, g = ap.pair(t, s)
            fe, ge = _gauss_closed(t, s, C, form)
            coef = max(coef, abs(f - fe), abs(g - ge))
            x_t = MU + math.sqrt(C * C + t * t) * z
            x_s = _gauss_flow(x_t, t, s)
            anchor = _gauss_D(x_s, s) if form == "backward" else _gauss_D(x_t, t)
            jump = max(jump, float((f * x_t + g * anchor - x_s).pow(2).mean().sqrt()))
        worst[interpolation] = (coef, jump)
    assert max(worst["cubic"]) <= 1e-6, worst
    assert 2e-5 <= worst["linear"][0] <= 2e-3, worst          # clearly worse: ~1e-4 (note: ~3e-4)
    assert worst["linear"][0] >= 50 * worst["cubic"][0], worst


# --- §4.5(7): estimated statistics on mixtures; CM coefficients ---------------------------------

def _dirac(points=32, d=8):
    rng = np.random.default_rng(0)
    return GaussianMixtureTeacher(0.5 * rng.standard_normal((points, d)) + 0.2, np.zeros(points), name="dirac")


def _stats(teacher, n_samples, seed):
    x0 = teacher.sample(n_samples, torch.Generator().manual_seed(seed))
    settings = StatisticsSettings(n_points=120, n_samples=n_samples, batch_size=n_samples, seed=seed)
    return estimate_statistics(teacher, x0, None, settings, teacher.fingerprint())


@pytest.fixture(scope="module")
def ring():
    teacher = ring_teacher()
    return teacher, _stats(teacher, 1024, 1)


@pytest.fixture(scope="module")
def dirac():
    teacher = _dirac()
    return teacher, _stats(teacher, 512, 1)


@pytest.mark.parametrize("which", ["ring", "dirac"])
def test_backward_form_bounds_and_epsilon_column(which, request):
    teacher, stats = request.getfixturevalue(which)
    l_eps = stats.l[-1]
    if which == "ring":
        assert l_eps >= 0.99, l_eps          # smooth at scale ε
    else:
        assert l_eps <= 1e-3, l_eps          # Dirac: posterior collapsed, l_ε ≈ 0
    back = AnalyticPrecond(stats.lam, stats.l, stats.s, form="backward")
    fwd = AnalyticPrecond(stats.lam, stats.l, stats.s, form="forward")
    f, g = back.table(SIG)
    ff, gf = fwd.table(SIG)
    iu = np.triu_indices(N, 1)
    l_s = back.l_at(-np.log(SIG))[None, :].repeat(N, 0)
    assert np.all(f[iu] >= 0) and np.all(f[iu] <= 1), (f[iu].min(), f[iu].max())
    assert np.all(g[iu] >= 0) and np.all(g[iu] <= 1 + 1e-12), (g[iu].min(), g[iu].max())
    assert np.all(g[iu] * l_s[iu] <= 1 + 1e-12), (g[iu] * l_s[iu]).max()
    assert np.all(np.isnan(f[np.tril_indices(N, -1)]))
    big = SIG >= 1
    eps_f, eps_g = f[big, -1], g[big, -1]
    ref_f, ref_g = SIGMA_MIN / SIG[big], 1 - SIGMA_MIN / SIG[big]
    dev = max(np.abs(eps_f - ref_f).max(), np.abs(eps_g - ref_g).max())
    assert dev <= 3e-3, dev                    # measured 1.7e-3 (ring), 2.4e-3 (Dirac)
    dev_fwd = max(np.abs(ff[big, -1] - ref_f).max(), np.abs(gf[big, -1] - ref_g).max())
    assert dev_fwd >= 0.2, dev_fwd              # forward form is not vanilla there (measured 0.49 / 1.45)
    # intermediate jumps do differ from CTM (ring: up to 0.41 in g per the note)
    ctm_g = 1 - SIG[None, :] / SIG[:, None]
    assert np.abs(g[iu] - ctm_g[iu]).max() >= 0.1


def test_cm_coefficients():
    cm = CMPrecond()
    eps = SIGMA_MIN
    for t in SIG[:-1]:
        f, g = (float(v) for v in cm.coefficients(t, eps))
        skip_cm = SIGMA_D ** 2 / ((t - eps) ** 2 + SIGMA_D ** 2)
        skip = SIGMA_D ** 2 / (t ** 2 + SIGMA_D ** 2)
        assert f == pytest.approx(skip_cm - (1 - eps / t) * skip, rel=1e-12, abs=1e-18)
        assert g == pytest.approx(1 - eps / t, rel=1e-14)
        rho = SIGMA_D ** 2 * (3 * t * t + SIGMA_D ** 2) / (t * t + SIGMA_D ** 2) ** 2
        if t >= 1:
            assert f == pytest.approx(eps / t * rho, rel=1e-2)          # f_CM = (ε/t)·ρ(t) + O(ε²)
        assert 0 < f <= 9 / 8 * eps / t * (1 + 1e-2)
    f1 = float(cm.coefficients(1.0, eps)[0])
    f80 = float(cm.coefficients(80.0, eps)[0])
    assert round(f1, 5) == 1.04e-3 and round(f80 / 1e-9, 1) == 2.9      # note §1.3 table
    for t in SIG:                                                       # boundary at s = t
        f, g = (float(v) for v in cm.coefficients(t, t))
        assert f == 1.0 and g == 0.0
    # general landing time s: σ_d²/((t − s)² + σ_d²) − (1 − s/t)·c_skip(t)
    for i, j in PAIRS:
        t, s = SIG[i], SIG[j]
        f, g = (float(v) for v in cm.coefficients(t, s))
        expect = SIGMA_D ** 2 / ((t - s) ** 2 + SIGMA_D ** 2) - (1 - s / t) * SIGMA_D ** 2 / (t ** 2 + SIGMA_D ** 2)
        assert f == pytest.approx(expect, rel=1e-12, abs=1e-16) and g == pytest.approx(1 - s / t, rel=1e-14)


# --- §4.5(8): landing-point gap on the ring GMM ------------------------------------------------

def _exact_trajectories(teacher, n, seed):
    """Exact samples of q_{t_i} at every grid level: x_80 = x_0 + 80ε pushed through dx/dλ = D − x (DOP853)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = teacher.sample(n, gen)
    x80 = x0 + SIGMA_MAX * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    d = x0.shape[1]

    def rhs(lam, y):
        x = torch.from_numpy(y).view(n, d)
        return (teacher.denoise(x, torch.full((n,), math.exp(-lam), dtype=torch.float64)) - x).reshape(-1).numpy()

    lam = -np.log(SIG)
    sol = solve_ivp(rhs, (lam[0], lam[-1]), x80.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-10,
                    t_eval=lam)
    assert sol.success
    return [torch.from_numpy(sol.y[:, k].copy()).view(n, d) for k in range(N)]


def test_landing_point_gap_backward_beats_ctm_on_ring(ring):
    teacher, stats = ring
    n = 256
    X = _exact_trajectories(teacher, n, seed=2)
    back = AnalyticPrecond(stats.lam, stats.l, stats.s, form="backward")
    gaps = {}
    for i, j in PAIRS:
        t, s = SIG[i], SIG[j]
        D_s = teacher.denoise(X[j], torch.full((n,), s, dtype=torch.float64))
        row = []
        for f, g in (back.pair(t, s), (s / t, 1 - s / t)):
            D_star = (X[j] - f * X[i]) / g                         # optimal student for (f, g)
            row.append(float((D_star - D_s).pow(2).mean().sqrt()))
        gaps[(i, j)] = row
    ratio = np.array([a / b for a, b in gaps.values()])
    wins = float((ratio < 1).mean())
    geo = float(np.exp(np.log(ratio).mean()))
    print(f"ring: AP-B beats CTM on {wins:.3f} of pairs, geometric-mean gap ratio {geo:.3f}")
    assert wins >= 0.75, wins                 # measured 0.82 (note §5.4, its ring: 0.97)
    assert geo <= 0.3, geo                    # measured 0.10 (note: 0.19)
    # representative pairs (note §5.5): 80 → 3.26, 28.4 → 1.09 and the single step 80 → ε
    for i, j in ((0, 8), (3, 10), (0, N - 1)):
        assert gaps[(i, j)][0] < 0.5 * gaps[(i, j)][1], ((i, j), gaps[(i, j)])
    assert gaps[(0, N - 1)][1] == pytest.approx(2.0e-3, rel=0.25)     # CTM's single-step gap (note: 2.0e-3)


# --- interface: broadcasting, agreement with .pair, errors ---------------------------------------

def test_coefficients_broadcast_and_agree_with_pair():
    ap = AnalyticPrecond.from_functions(_l, _s, form="backward")
    t = torch.tensor([[80.0], [5.0], [0.5]], dtype=torch.float64)
    s = torch.tensor([[0.002, 0.1, 0.3, 0.002]], dtype=torch.float64)
    f, g = ap.coefficients(t, s)
    assert f.shape == g.shape == (3, 4) and f.dtype == g.dtype == torch.float64
    for a in range(3):
        for b in range(4):
            fp, gp = ap.pair(float(t[a, 0]), float(s[0, b]))
            assert float(f[a, b]) == fp and float(g[a, b]) == gp
    f0, g0 = ap.coefficients(5.0, 0.1)
    assert f0.shape == () and float(f0) == ap.pair(5.0, 0.1)[0]
    f1, g1 = ap.coefficients(torch.tensor([5.0, 5.0, 1.0], dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    assert f1.shape == (3,) and float(f1[0]) == float(f1[1]) == ap.pair(5.0, 0.1)[0]
    fc, gc = CTMPrecond().coefficients(t, s)
    assert fc.shape == (3, 4) and torch.allclose(fc, (s / t).double()) and torch.allclose(gc, (1 - s / t).double())
    fm, gm = CMPrecond().coefficients(t, s)
    assert fm.shape == (3, 4)


def test_table_matches_pair():
    ap = AnalyticPrecond.from_functions(_l, _s, form="forward")
    grid = SIG[::3]
    f, g = ap.table(grid)
    for i in range(len(grid)):
        for j in range(len(grid)):
            if j < i:
                assert np.isnan(f[i, j]) and np.isnan(g[i, j])
            else:
                assert (f[i, j], g[i, j]) == ap.pair(float(grid[i]), float(grid[j]))


def test_errors():
    ap = AnalyticPrecond.from_functions(_l, _s)
    with pytest.raises(ApctlError):
        ap.pair(100.0, 1.0)                       # t above the statistics' σ range
    with pytest.raises(ApctlError):
        ap.pair(1.0, 0.001)                       # s below it
    with pytest.raises(ApctlError):
        ap.pair(0.5, 1.0)                         # t < s
    with pytest.raises(ApctlError):
        ap.pair(1.0, 0.0)
    with pytest.raises(ApctlError):
        ap.coefficients(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 1.0]))
    narrow = AnalyticPrecond.from_functions(_l, _s, sigma_min=0.01, sigma_max=10.0, points=2001)
    assert narrow.sigma_range == pytest.approx((0.01, 10.0))
    with pytest.raises(ApctlError):
        narrow.pair(80.0, 1.0)
    with pytest.raises(ApctlError):
        narrow.pair(1.0, SIGMA_MIN)
    lam = np.linspace(-4, 6, 10)
    with pytest.raises(ApctlError):
        AnalyticPrecond(lam, _l(lam), _s(lam), form="sideways")
    with pytest.raises(ApctlError):
        AnalyticPrecond(lam, _l(lam), _s(lam), interpolation="quintic")
    with pytest.raises(ApctlError):
        AnalyticPrecond(lam[::-1], _l(lam), _s(lam))
    with pytest.raises(ApctlError):
        AnalyticPrecond(lam, _l(lam)[:-1], _s(lam))
    bad = _l(lam)
    bad[3] = np.nan
    with pytest.raises(ApctlError):
        AnalyticPrecond(lam, bad, _s(lam))
