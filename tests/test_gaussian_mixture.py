"""The exact Gaussian-mixture teacher (math note §4.3–4.4) against independent computations.

The oracle is written here from scratch: log p_σ(x) of the noised mixture, and Tweedie's formula
D = x + σ²∇log p_σ by autograd; Jacobians, traces and total derivatives come from torch.func
applied to that reference (and, where asked for, to the teacher's own denoiser), never from the
closed forms. Those closed forms (Jacobian trace, JVP, total λ-derivative of the mixture) are test-only
oracles in tests/oracles.py, which other tests rely on: they are checked here. The Heun solver is checked
against the closed-form Gaussian flow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad, jacrev, jvp

from apctl.schedules import karras_sigmas
from apctl.sampling import heun_solve, heun_step
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher
import oracles

F64 = torch.float64




# --- the independent oracle ---------------------------------------------------------------------

class Mixture:
    """Plain description of a mixture, and its noised log-density written without apctl."""

    def __init__(self, means, stds, weights=None, classes=None):
        self.means = torch.as_tensor(np.asarray(means), dtype=F64)
        K, d = self.means.shape
        stds = torch.as_tensor(np.asarray(stds, dtype=np.float64), dtype=F64)
        self.stds = stds.reshape(K, 1).expand(K, d) if stds.dim() == 1 else stds.expand(K, d)
        w = torch.ones(K, dtype=F64) if weights is None else torch.as_tensor(np.asarray(weights), dtype=F64)
        self.weights = w / w.sum()
        self.classes = None if classes is None else torch.as_tensor(classes)
        self.teacher = GaussianMixtureTeacher(means, stds, weights=weights, classes=classes)

    def log_p(self, x, sigma, cls=None):
        """log p_σ(x) for one sample x (d,), scalar σ; restricted to class `cls` if given."""
        v = self.stds ** 2 + sigma ** 2
        log_n = -0.5 * (torch.log(2 * math.pi * v) + (x[None] - self.means) ** 2 / v).sum(1)
        log_w = self.weights.log()
        if cls is not None:
            log_w = torch.where(self.classes == cls, log_w, torch.full_like(log_w, -math.inf))
        return torch.logsumexp(log_w + log_n, 0)

    def D(self, x, sigma, cls=None):
        """Tweedie: x + σ²∇log p_σ(x), one sample."""
        return x + sigma ** 2 * grad(lambda y: self.log_p(y, sigma, cls))(x)

    def D_lam(self, x, lam, cls=None):
        return self.D(x, torch.exp(-lam), cls)


def _isotropic():
    return Mixture([[0.6, -0.2, 0.1], [-0.5, 0.4, 0.3], [0.1, 0.9, -0.7], [0.2, 0.2, 0.2]], [0.15, 0.3, 0.05, 0.4],
                   weights=[0.4, 0.3, 0.2, 0.1])


def _diagonal():
    return Mixture([[0.6, -0.2, 0.1], [-0.5, 0.4, 0.3], [0.1, 0.9, -0.7]],
                   [[0.1, 0.3, 0.2], [0.4, 0.05, 0.25], [0.2, 0.2, 0.6]], weights=[0.5, 0.3, 0.2])


def _dirac():
    rng = np.random.default_rng(3)
    return Mixture(rng.standard_normal((6, 3)) * 0.5, np.zeros(6))


def _classes():
    return Mixture([[0.6, -0.2, 0.1], [-0.5, 0.4, 0.3], [0.1, 0.9, -0.7], [0.2, 0.2, 0.2]], [0.15, 0.3, 0.05, 0.0],
                   classes=[0, 1, 1, 2])


MIXTURES = {"isotropic": _isotropic, "diagonal": _diagonal, "dirac": _dirac, "classes": _classes}
SIGMAS = [0.002, 0.05, 0.4, 3.0, 80.0]


def _points(m: Mixture, sigma: float, n: int = 5, seed: int = 0):
    """Noisy points near the data (x_0 + σε) and a couple of far-off ones."""
    gen = torch.Generator().manual_seed(seed)
    x0 = m.teacher.sample(n, gen)
    x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)
    far = torch.tensor([[2.0, -1.5, 1.0], [-3.0, 0.5, 2.5]], dtype=F64) * max(1.0, sigma)
    return torch.cat([x, far])


def _labels(m: Mixture, n: int):
    if m.classes is None:
        return None, [None] * n
    cls = torch.arange(n) % (int(m.classes.max()) + 1)
    return torch.nn.functional.one_hot(cls, int(m.classes.max()) + 1).to(F64), [int(c) for c in cls]


@pytest.mark.parametrize("kind", list(MIXTURES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_denoiser_is_tweedie(kind, sigma):
    m = MIXTURES[kind]()
    x = _points(m, sigma)
    onehot, cls = _labels(m, x.shape[0])
    D = m.teacher.denoise(x, torch.tensor(sigma, dtype=F64), onehot)
    ref = torch.stack([m.D(x[b], torch.tensor(sigma, dtype=F64), cls[b]) for b in range(x.shape[0])])
    scale = 1.0 + x.abs().max()
    assert torch.allclose(D, ref, rtol=0, atol=1e-10 * float(scale)), (D - ref).abs().max()


@pytest.mark.parametrize("kind", list(MIXTURES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_jacobian_trace_jvp_and_total_derivative(kind, sigma):
    m = MIXTURES[kind]()
    T = m.teacher
    x = _points(m, sigma, seed=1)
    B, d = x.shape
    onehot, cls = _labels(m, B)
    sig = torch.full((B,), sigma, dtype=F64)
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=F64)

    # autograd of the teacher's own denoiser: full (B, d, B, d) Jacobian, diagonal blocks
    J_teacher = torch.autograd.functional.jacobian(lambda y: T.denoise(y, sig, onehot), x)
    J_teacher = torch.stack([J_teacher[b, :, b, :] for b in range(B)])
    # the independent reference
    sig0 = torch.tensor(sigma, dtype=F64)
    J_ref = torch.stack([jacrev(lambda y, c=cls[b]: m.D(y, sig0, c))(x[b]) for b in range(B)])
    tol = 1e-8 * (1.0 + float(J_ref.abs().max()))
    assert torch.allclose(J_teacher, J_ref, rtol=0, atol=tol)

    trace = oracles.jacobian_trace(T, x, sig, onehot)
    assert trace.shape == (B,)
    assert torch.allclose(trace, torch.diagonal(J_ref, dim1=1, dim2=2).sum(1), rtol=0, atol=tol)
    assert torch.allclose(trace, torch.diagonal(J_teacher, dim1=1, dim2=2).sum(1), rtol=0, atol=tol)

    Ju = oracles.jvp(T, x, sig, u, onehot)
    assert torch.allclose(Ju, torch.einsum("bij,bj->bi", J_ref, u), rtol=0, atol=tol * (1 + float(u.abs().max())))

    # total λ-derivative along the PF-ODE: JVP of (x, λ) ↦ D(x, e^{−λ}) along (D − x, 1)  (note §4.5.6)
    total = oracles.total_derivative(T, x, sig, onehot)
    lam0 = torch.tensor(-math.log(sigma), dtype=F64)
    ref_total = []
    for b in range(B):
        Db = m.D(x[b], sig0, cls[b])
        _, dD = jvp(lambda y, lm, c=cls[b]: m.D_lam(y, lm, c), (x[b], lam0), (Db - x[b], torch.ones((), dtype=F64)))
        ref_total.append(dD)
    ref_total = torch.stack(ref_total)
    assert torch.allclose(total, ref_total, rtol=0, atol=1e-8 * (1.0 + float(ref_total.abs().max())))
    # and the same JVP taken through the teacher's own denoiser
    lam_b = torch.full((B,), -math.log(sigma), dtype=F64)
    D = T.denoise(x, sig, onehot)
    _, dD_teacher = jvp(lambda y, lm: T.denoise(y, torch.exp(-lm), onehot), (x, lam_b), (D - x, torch.ones_like(lam_b)))
    assert torch.allclose(total, dD_teacher, rtol=0, atol=1e-8 * (1.0 + float(ref_total.abs().max())))


def test_total_derivative_single_gaussian_closed_form():
    """N(μ, diag c²): D = μ + a ⊙ (x − μ), dD/dλ = a ⊙ (D − x) + 2a(1 − a) ⊙ (x − μ)."""
    mu = torch.tensor([0.4, -0.3, 0.2], dtype=F64)
    c = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    T = GaussianMixtureTeacher(mu[None].numpy(), c[None].numpy())
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    for sigma in SIGMAS:
        a = c ** 2 / (c ** 2 + sigma ** 2)
        D = mu + a * (x - mu)
        sig = torch.full((6,), sigma, dtype=F64)
        assert torch.allclose(T.denoise(x, sig), D, atol=1e-14)
        assert torch.allclose(oracles.jacobian_trace(T, x, sig), a.sum().expand(6), atol=1e-13)
        assert torch.allclose(oracles.total_derivative(T, x, sig), a * (D - x) + 2 * a * (1 - a) * (x - mu), atol=1e-12)


@pytest.mark.parametrize("kind", list(MIXTURES))
def test_per_sample_sigma_equals_row_by_row(kind):
    m = MIXTURES[kind]()
    T = m.teacher
    x = _points(m, 0.3, n=5, seed=4)                       # 7 rows
    B = x.shape[0]
    sig = torch.tensor([0.01, 0.3, 0.3, 2.0, 80.0, 0.002, 0.3], dtype=F64)
    onehot, _ = _labels(m, B)
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    batch = [T.denoise(x, sig, onehot), oracles.jacobian_trace(T, x, sig, onehot), oracles.jvp(T, x, sig, u, onehot),
             oracles.total_derivative(T, x, sig, onehot)]
    for b in range(B):
        lab = None if onehot is None else onehot[b:b + 1]
        xb, sb = x[b:b + 1], sig[b]
        rows = [T.denoise(xb, sb, lab), oracles.jacobian_trace(T, xb, sb, lab), oracles.jvp(T, xb, sb, u[b:b + 1], lab),
                oracles.total_derivative(T, xb, sb, lab)]
        for whole, row in zip(batch, rows):
            # atol: the Dirac trace at σ = 0.002 is ~1e-10 of pure round-off (ε·‖x − μ‖²/σ²)
            assert torch.allclose(whole[b:b + 1], row.reshape(whole[b:b + 1].shape), rtol=1e-11, atol=1e-9)


def test_data_shape_and_dtype_are_kept():
    T = GaussianMixtureTeacher(np.zeros((2, 4)) + [[0.1], [-0.1]], [0.3, 0.2], shape=(1, 2, 2))
    x = torch.randn(3, 1, 2, 2)
    out = T.denoise(x, torch.tensor(0.5))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert T.sample(5).shape == (5, 1, 2, 2)
    assert oracles.jvp(T, x, torch.tensor(0.5), torch.ones_like(x)).shape == x.shape
    assert oracles.total_derivative(T, x, torch.tensor(0.5)).shape == x.shape


# --- solver ---------------------------------------------------------------------------------

MU_G = torch.tensor([0.4, -0.2, 0.1], dtype=F64)
C_G = torch.tensor([0.3, 0.5, 0.8], dtype=F64)


def test_heun_is_second_order_on_a_gaussian():
    T = GaussianMixtureTeacher(MU_G[None].numpy(), C_G[None].numpy())
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = 80.0 * z
    exact = oracles.gaussian_flow(x, 80.0, 0.002, MU_G, C_G)
    errors = []
    for steps in (16, 32, 64, 128):
        out = heun_solve(T, x, karras_sigmas(steps + 1).tolist())
        errors.append(float((out - exact).pow(2).mean().sqrt()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 <= r <= 5.0 for r in ratios), (errors, ratios)      # measured 4.5, 4.3, 4.1
    assert errors[-1] <= 1e-3, errors


def test_heun_step_details():
    T = GaussianMixtureTeacher(MU_G[None].numpy(), C_G[None].numpy())
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.full((4,), 0.7, dtype=F64)
    # to σ = 0 only the Euler step is taken: x + (0 − t)(x − D)/t = D(x, t)
    assert torch.allclose(heun_step(T, x, t, torch.zeros(4, dtype=F64)), T.denoise(x, t), atol=1e-14)
    # one step is Euler predictor + trapezoidal corrector, written out by hand
    u = torch.full((4,), 0.5, dtype=F64)
    d_t = (x - T.denoise(x, t)) / 0.7
    xe = x + (0.5 - 0.7) * d_t
    d_u = (xe - T.denoise(xe, u)) / 0.5
    assert torch.allclose(heun_step(T, x, t, u), x + (0.5 - 0.7) * 0.5 * (d_t + d_u), atol=1e-14)
    # per-sample targets, including a zero one, in one batch
    mixed = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=F64)
    out = heun_step(T, x, t, mixed)
    assert torch.allclose(out[0::2], heun_step(T, x[0::2], t[0::2], u[0::2]), atol=1e-14)
    assert torch.allclose(out[1::2], T.denoise(x[1::2], t[1::2]), atol=1e-14)


# --- sampling ---------------------------------------------------------------------------------

def test_samples_have_the_mixture_moments():
    means = np.array([[1.0, -0.5], [-0.8, 0.3], [0.2, 1.2]])
    stds = np.array([[0.2, 0.4], [0.5, 0.1], [0.3, 0.3]])
    w = np.array([0.5, 0.3, 0.2])
    T = GaussianMixtureTeacher(means, stds, weights=w * 7)           # weights are normalised
    n = 40000
    x = T.sample(n, torch.Generator().manual_seed(0)).numpy()
    mean = w @ means
    cov = sum(w[k] * (np.diag(stds[k] ** 2) + np.outer(means[k], means[k])) for k in range(3)) - np.outer(mean, mean)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) <= 5 * se_mean), (x.mean(0), mean)
    assert np.abs(np.cov(x.T) - cov).max() <= 0.02, (np.cov(x.T), cov)
    same = T.sample(10, torch.Generator().manual_seed(3))
    assert torch.equal(same, T.sample(10, torch.Generator().manual_seed(3)))


def test_class_conditional_samples():
    means = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    T = GaussianMixtureTeacher(means, [0.1, 0.1, 0.0], classes=[0, 1, 1])
    labels = torch.tensor([0, 1] * 500)
    x = T.sample(1000, torch.Generator().manual_seed(0), labels=labels)
    nearest = torch.cdist(x, torch.tensor(means, dtype=F64)).argmin(1)
    assert torch.equal(torch.tensor([0, 1, 1])[nearest], labels)
    frac_dirac = float((nearest[1::2] == 2).double().mean())                   # class 1 splits 1:1
    assert abs(frac_dirac - 0.5) <= 0.08
    assert torch.equal(x[nearest == 2], torch.tensor([[0.0, 5.0]], dtype=F64).expand(int((nearest == 2).sum()), 2))


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(np.zeros((2, 2)), [0.1, -0.1])                  # negative std
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(np.zeros(2), [0.1, 0.1])                        # means not (K, d)
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(np.zeros((2, 2)), [0.1, 0.1], weights=[1.0])    # wrong weights shape
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(np.zeros((2, 2)), [0.1, 0.1], weights=[1.0, -1.0])
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(np.zeros((2, 2)), [0.1, 0.1], weights=[0.0, 0.0])
    with pytest.raises(ValueError):
        GaussianMixtureTeacher(np.zeros((2, 4)), [0.1, 0.1], shape=(3,))      # shape does not hold d
    with pytest.raises((ValueError, RuntimeError)):
        GaussianMixtureTeacher(np.zeros((2, 2)), np.ones(3))                   # stds neither (K,) nor (K, d)
    with pytest.raises((ValueError, RuntimeError)):
        GaussianMixtureTeacher(np.zeros((2, 2)), np.ones((2, 3)))
    T = GaussianMixtureTeacher(np.zeros((2, 2)), [0.1, 0.2])
    with pytest.raises((ValueError, RuntimeError)):
        T.denoise(torch.zeros(3, 3), torch.tensor(0.5))                        # wrong data dimension
    with pytest.raises((ValueError, RuntimeError)):
        T.denoise(torch.zeros(3, 2), torch.tensor([0.5, 0.2]))                 # σ neither scalar nor (B,)


def test_integer_class_labels_are_not_silently_misread():
    """POSSIBLE BUG (apctl/teachers/gaussian_mixture.py, `_class_mask`): the denoiser expects one-hot
    labels (B, C), but `sample` takes integer labels (n,). Integer labels passed to `denoise` are
    multiplied as a (B,) vector into the (C, K) membership matrix: when B == C this silently yields
    a wrong class mask (no error). Either reject them or honour them as class indices."""
    m = _classes()
    x = _points(m, 0.5, n=1, seed=2)                        # 3 rows = 3 classes
    cls = torch.tensor([0, 1, 2])
    onehot = torch.nn.functional.one_hot(cls, 3).to(F64)
    expected = m.teacher.denoise(x, torch.tensor(0.5), onehot)
    try:
        got = m.teacher.denoise(x, torch.tensor(0.5), cls)
    except (ValueError, RuntimeError, TypeError):
        return
    assert torch.allclose(got, expected), "integer labels were accepted but misread"
