"""Outer preconditionings of the two-time student G(x, t, s) = f(t, s)·x + g(t, s)·D_θ(x, t, s)."""

from apctl.preconditioning.coefficients import (
    AnalyticPrecond,
    CMPrecond,
    CTMPrecond,
    Preconditioning,
)

__all__ = ["AnalyticPrecond", "CMPrecond", "CTMPrecond", "Preconditioning"]
