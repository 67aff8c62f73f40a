"""estimate_statistics (math note §3) against closed forms (§4.1, §4.2) and exact mixture quantities;
the statistics file format.

Measured on this machine (fixed seeds):
* diagonal Gaussian, Hutchinson l: max |l̂ − l| = 7e-16.
* diagonal Gaussian d = 8, μ ≠ 0, 2048 samples: median |ŝ − s| = 1.7e-3, max 2.4e-2 at σ_min (one-sided
  np.gradient for l' at the grid end), interior max 1.1e-2; ŝ(σ_min) = −1.976 (closed form −2.000).
* isotropic Gaussian: median |ŝ + 2l| = 2.0e-3, max 2.5e-2 (again the end point).
* ring GMM: 'fd' vs 'jvp' s agree to 3.6e-7 relative.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from apctl.errors import ApctlError
from apctl.preconditioning.statistics import (
    PrecondStatistics,
    StatisticsSettings,
    estimate_statistics,
    load_statistics,
    statistics_match,
)
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher
from oracles import jacobian_trace, jvp, ring_teacher

C_DIAG = np.array([0.2, 0.3, 0.4, 0.5, 0.5, 0.6, 0.7, 0.8])
MU_DIAG = np.array([0.5, -0.3, 0.2, 0.0, 0.4, -0.6, 0.1, 0.3])




def _closed_form_diag(lam, c, mu):
    """§4.2 in the eigenbasis (here the coordinate basis): exact l and s of N(μ, diag c²)."""
    t2 = np.exp(-2 * lam)[:, None]
    c2, m = c[None] ** 2, mu[None]
    a = c2 / (c2 + t2)
    da = 2 * a * (1 - a)
    l, dl = a.mean(1, keepdims=True), da.mean(1, keepdims=True)
    V = c2 + t2
    P, Q = a - l, (1 - a) * m
    dP, dQ = (da - dl) - (a - l) * (1 - a), ((a - l) * (1 - a) - da) * m
    E_gdg = P * dP * (V + m * m) + (P * dQ + dP * Q) * m + Q * dQ
    E_gg = P * P * (V + m * m) + 2 * P * Q * m + Q * Q
    return l[:, 0], E_gdg.sum(1) / E_gg.sum(1)


@pytest.fixture(scope="module")
def diag_stats():
    T = GaussianMixtureTeacher(MU_DIAG[None], C_DIAG[None])
    x0 = T.sample(2048, torch.Generator().manual_seed(10))
    settings = StatisticsSettings(n_points=120, n_samples=2048, batch_size=1024, seed=0)
    return estimate_statistics(T, x0, None, settings, T.fingerprint())


def test_closed_form_sanity():
    """The §4.2 closed form reduces to s = −2l for an isotropic Gaussian (checks the test's own oracle)."""
    lam = np.linspace(-4.4, 6.2, 50)
    l, s = _closed_form_diag(lam, np.full(3, 0.5), np.array([0.3, -0.2, 0.7]))
    np.testing.assert_allclose(l, 0.25 / (0.25 + np.exp(-2 * lam)), rtol=1e-14)
    np.testing.assert_allclose(s, -2 * l, rtol=1e-10, atol=1e-14)


def test_hutchinson_is_exact_for_diagonal_gaussian(diag_stats):
    l, _ = _closed_form_diag(diag_stats.lam, C_DIAG, MU_DIAG)
    np.testing.assert_allclose(diag_stats.lam, np.linspace(-math.log(80), -math.log(0.002), 120), rtol=1e-14)
    assert np.abs(diag_stats.l - l).max() <= 1e-10


def test_s_matches_closed_form_for_diagonal_gaussian(diag_stats):
    _, s = _closed_form_diag(diag_stats.lam, C_DIAG, MU_DIAG)
    err = np.abs(diag_stats.s - s)
    assert np.median(err) <= 5e-3, np.median(err)        # measured 1.7e-3 (lead: 3.4e-3 with 4096 samples)
    assert err[2:-2].max() <= 0.03, err[2:-2].max()        # measured 1.1e-2
    assert err.max() <= 0.05, err.max()                    # measured 2.4e-2 (σ_min end)
    # the ridge guard: at σ_min the exact s is −2; a 1e-8·Σ‖x‖² ridge would pull it towards 0
    assert s[-1] == pytest.approx(-2.0, abs=1e-3)
    assert abs(diag_stats.s[-1] + 2.0) <= 0.05, diag_stats.s[-1]
    assert abs(diag_stats.s[0]) <= 1e-3                    # s(σ_max) ≈ 0


def test_isotropic_gaussian_s_is_minus_two_l():
    c, mu = 0.5, np.array([0.4, -0.3, 0.2, 0.1])
    T = GaussianMixtureTeacher(mu[None], [c])
    x0 = T.sample(512, torch.Generator().manual_seed(3))
    st = estimate_statistics(T, x0, None, StatisticsSettings(n_samples=512, batch_size=512), T.fingerprint())
    l = c * c / (c * c + np.exp(-2 * st.lam))
    assert np.abs(st.l - l).max() <= 1e-10
    err = np.abs(st.s + 2 * l)
    assert np.median(err) <= 5e-3 and err.max() <= 0.05, (np.median(err), err.max())   # measured 2.0e-3, 2.5e-2
    # l' stored as an extra: second-order central differences of the exact dl/dλ = 2l(1 − l)
    dl = np.asarray(st.extras["l_prime"])
    assert np.abs(dl - 2 * l * (1 - l)).max() <= 0.02


def test_fd_derivative_agrees_with_jvp():
    T = ring_teacher()
    x0 = T.sample(256, torch.Generator().manual_seed(4))
    out = {}
    for derivative in ("jvp", "fd"):
        settings = StatisticsSettings(n_points=40, n_samples=256, batch_size=128, derivative=derivative)
        out[derivative] = estimate_statistics(T, x0, None, settings, T.fingerprint())
    np.testing.assert_array_equal(out["jvp"].l, out["fd"].l)
    rel = np.abs(out["fd"].s - out["jvp"].s) / np.maximum(1.0, np.abs(out["jvp"].s))
    assert rel.max() <= 1e-5, rel.max()                   # measured 3.6e-7
    assert out["jvp"].s.max() > 0.1 and out["jvp"].s.min() < -1.9      # a non-trivial curve was compared
    with pytest.raises(ApctlError):
        estimate_statistics(T, x0, None, StatisticsSettings(n_points=8, n_samples=256, derivative="bogus"), "x")


def test_gmm_l_matches_exact_mean_trace():
    """Hutchinson l̂ against the exact mean trace over the same x_t = x_0 + σε (note §3.2).

    The ε and probes are re-drawn here in the documented CRN order (ε first, then the probes, from
    torch.Generator().manual_seed(settings.seed))."""
    T = ring_teacher()
    M, d = 512, 2
    x0 = T.sample(M, torch.Generator().manual_seed(6))
    settings = StatisticsSettings(n_points=30, n_samples=M, batch_size=200, seed=5)
    st = estimate_statistics(T, x0, None, settings, T.fingerprint())
    gen = torch.Generator().manual_seed(settings.seed)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    probes = (torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1).double()
    e1 = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(M, 2)
    worst_z = 0.0
    for k, lam in enumerate(st.lam):
        sigma = math.exp(-lam)
        x = x0 + sigma * eps
        sig = torch.full((M,), sigma, dtype=torch.float64)
        exact = float(jacobian_trace(T, x, sig).mean()) / d
        # Rademacher Hutchinson variance for a symmetric 2×2 Jacobian: 2·Σ_{i≠j} J_ij² = 4·J_12²
        J12 = jvp(T, x, sig, e1)[:, 1]
        se = float((4 * J12 ** 2).sum().sqrt()) / (M * d)
        assert abs(st.l[k] - exact) <= 5 * se + 1e-12, (sigma, st.l[k], exact, se)
        worst_z = max(worst_z, abs(st.l[k] - exact) / (se + 1e-300))
        # and it is exactly the Hutchinson average with those probes
        hutch = float((probes * jvp(T, x, sig, probes)).sum()) / (M * d)
        assert st.l[k] == pytest.approx(min(max(hutch, 0.0), 1.0), abs=1e-12)
    assert 0 < worst_z


def test_class_conditional_statistics_run_and_use_labels():
    means = np.array([[0.5, 0.0], [-0.5, 0.0]])
    T = GaussianMixtureTeacher(means, [0.1, 0.1], classes=[0, 1])
    cls = torch.tensor([0, 1] * 64)
    x0 = T.sample(128, torch.Generator().manual_seed(0), labels=cls)
    onehot = torch.nn.functional.one_hot(cls, 2).double()
    settings = StatisticsSettings(n_points=12, n_samples=128, batch_size=50)
    st = estimate_statistics(T, x0, onehot, settings, T.fingerprint())
    # with labels each class is a single isotropic Gaussian: l = c²/(c² + σ²) exactly
    np.testing.assert_allclose(st.l, 0.01 / (0.01 + np.exp(-2 * st.lam)), rtol=0, atol=1e-12)
    unconditional = estimate_statistics(T, x0, None, settings, T.fingerprint())
    assert np.abs(unconditional.l - st.l).max() > 0.05


# --- storage ---------------------------------------------------------------------------------

def _example_stats():
    rng = np.random.default_rng(0)
    lam = np.linspace(-4.38, 6.21, 7)
    return PrecondStatistics(lam, rng.random(7) * (1 + 1e-9), rng.standard_normal(7) / 3, "gmm-0123abcd",
                             StatisticsSettings(n_points=7).key(), extras={"l_prime": rng.random(7).tolist(), "note": "é"})


def test_save_load_round_trip(tmp_path):
    st = _example_stats()
    path = tmp_path / "sub" / "stats.safetensors"
    st.save(path)
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    back = load_statistics(path)
    for name in ("lam", "l", "s"):
        a, b = getattr(st, name), getattr(back, name)
        assert b.dtype == np.float64 and a.tobytes() == b.tobytes(), name
    assert back.teacher_fingerprint == st.teacher_fingerprint
    assert back.settings == st.settings and back.extras == st.extras
    np.testing.assert_array_equal(back.sigma, np.exp(-st.lam))


def test_statistics_match():
    settings = StatisticsSettings(n_points=7)
    st = _example_stats()
    assert statistics_match(st, "gmm-0123abcd", settings)
    assert statistics_match(st, "gmm-0123abcd", StatisticsSettings(n_points=7, batch_size=3))   # does not change numbers
    assert not statistics_match(st, "gmm-ffffffff", settings)
    for change in (dict(n_samples=1024), dict(seed=1), dict(derivative="fd"), dict(ridge=1e-8), dict(fd_step=1e-2),
                   dict(sigma_min=0.001), dict(n_points=8)):
        assert not statistics_match(st, "gmm-0123abcd", StatisticsSettings(**{"n_points": 7, **change})), change


def test_statistics_match_after_round_trip(tmp_path):
    st = _example_stats()
    st.save(tmp_path / "s.safetensors")
    assert statistics_match(load_statistics(tmp_path / "s.safetensors"), "gmm-0123abcd", StatisticsSettings(n_points=7))


def test_loading_other_files_raises(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(ApctlError):
        load_statistics(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.txt"
    text.write_text("not a tensor file")
    with pytest.raises(ApctlError):
        load_statistics(text)
    other = tmp_path / "weights.safetensors"
    save_file({"lam": np.zeros(3), "l": np.zeros(3), "s": np.zeros(3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ApctlError):
        load_statistics(other)
    partial = tmp_path / "partial.safetensors"
    save_file({"lam": np.zeros(3), "l": np.zeros(3)}, str(partial),
              metadata={"format": "apctl-precond-statistics", "settings": json.dumps({})})
    with pytest.raises(ApctlError):
        load_statistics(partial)
