"""The student's jump G(x, t, s) = f(t, s)·x + g(t, s)·D(x, t, s) (apctl/preconditioning/jump.py).

Independent statement: with a network whose output is known in closed form, D(x, t, s) = a·x + b·t + c·s,
and CTM's coefficients f = s/t, g = 1 − s/t (Kim et al. 2024; math note §1.4), G is computed here by hand
in Python floats, sample by sample. A second, made-up preconditioning checks that the coefficients come
from the `precond` passed in, not from a built-in formula.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apctl.preconditioning import CTMPrecond
from apctl.preconditioning.jump import jump

A, B_T, C_S = 0.7, -0.3, 2.5


class AffineNet(nn.Module):
    """D(x, t, s) = A·x + B_T·t + C_S·s per sample; records the labels it was given."""

    def forward(self, x, t, s, labels=None):
        self.labels = labels
        shape = (-1,) + (1,) * (x.dim() - 1)
        return A * x + B_T * t.to(x.dtype).view(shape) + C_S * s.to(x.dtype).view(shape)


class MadeUpPrecond:
    """f = t + s, g = t·s: not a real preconditioning, only distinguishable from CTM's."""

    def coefficients(self, t, s):
        t, s = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
        return t + s, t * s


def _by_hand(x_row: list[float], t: float, s: float, f: float, g: float) -> list[float]:
    return [f * v + g * (A * v + B_T * t + C_S * s) for v in x_row]


T_ROWS = [80.0, 5.0, 0.5, 0.3]
S_ROWS = [0.002, 1.0, 0.5, 0.01]


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 3, 3)])
def test_ctm_jump_by_hand_per_sample(shape):
    """Per-sample t, s (B,): each row equals (s/t)·x + (1 − s/t)·(A·x + B_T·t + C_S·s), also for image-shaped x."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, s = torch.tensor(T_ROWS, dtype=torch.float64), torch.tensor(S_ROWS, dtype=torch.float64)
    out = jump(CTMPrecond(), AffineNet(), x, t, s)
    assert out.shape == x.shape
    for b, (tb, sb) in enumerate(zip(T_ROWS, S_ROWS)):
        expect = _by_hand(x[b].flatten().tolist(), tb, sb, sb / tb, 1 - sb / tb)
        assert torch.allclose(out[b].flatten(), torch.tensor(expect, dtype=torch.float64), rtol=1e-14, atol=1e-14), b


def test_coefficients_come_from_the_given_precond():
    """With f = t + s, g = t·s the jump is (t + s)·x + t·s·D: whatever the preconditioning says."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t, s = torch.tensor(T_ROWS, dtype=torch.float64), torch.tensor(S_ROWS, dtype=torch.float64)
    out = jump(MadeUpPrecond(), AffineNet(), x, t, s)
    for b, (tb, sb) in enumerate(zip(T_ROWS, S_ROWS)):
        expect = _by_hand(x[b].tolist(), tb, sb, tb + sb, tb * sb)
        assert torch.allclose(out[b], torch.tensor(expect, dtype=torch.float64), rtol=1e-14, atol=1e-12), b


def test_boundary_t_equals_s_is_the_identity():
    """G(x, t, t) = x exactly (f = 1, g = 0), whatever D returns."""
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([80.0, 3.0, 0.5, 0.01, 0.002])
    assert torch.equal(jump(CTMPrecond(), AffineNet(), x, t, t.clone()), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_dtype_is_the_input_dtype(dtype):
    """Coefficients are computed in float64 but the jump comes back in x's dtype (float32 t and s too)."""
    x = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(3)).to(dtype)
    t, s = torch.tensor(T_ROWS), torch.tensor(S_ROWS)
    out = jump(CTMPrecond(), AffineNet(), x, t, s)
    assert out.dtype == dtype and out.shape == x.shape
    ref = jump(CTMPrecond(), AffineNet(), x.double(), t.double(), s.double())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_labels_reach_the_network():
    """The class labels given to the jump are the ones the network sees."""
    net = AffineNet()
    labels = torch.eye(4)
    jump(CTMPrecond(), net, torch.zeros(4, 3), torch.tensor(T_ROWS), torch.tensor(S_ROWS), labels)
    assert net.labels is labels
