"""The fraction of samples beyond 3σ of the nearest mode: enumerated points and closed forms on exact samples."""

from __future__ import annotations

import math

import pytest
import torch

from apctl.errors import ApctlError
from apctl.metrics.alignment import AlignmentProbe
from apctl.metrics.mode_outliers import fraction_beyond, nearest_mode_distance
from apctl.teachers.gaussian_mixture import GaussianMixtureTeacher


def test_enumerated_points_isotropic_and_diagonal():
    """Hand-placed points: each one's Mahalanobis distance to each mode is known, the nearest counts."""
    f64 = dict(dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], **f64)
    stds = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 0.1]], **f64)
    points = torch.tensor([
        [2.9, 0.0],      # mode 0: 2.9                                   inside
        [3.1, 0.0],      # mode 0: 3.1, mode 1: 6.9 / 2 = 3.45           beyond
        [10.0, 5.9],     # mode 1: 5.9 / 2 = 2.95                        inside
        [10.0, -6.2],    # mode 1: 3.1                                   beyond
        [0.0, 10.35],    # mode 2: 0.35 / 0.1 = 3.5                      beyond
        [2.5, 10.1],     # mode 2: √(2.5² + 1²) = 2.69                  inside
        [5.0, 5.0],      # mode 0: √50 = 7.07, mode 1: √50 / 2 = 3.54, mode 2: √(25 + 2500) = 50.2     beyond
    ], **f64)
    expected = torch.tensor([2.9, 3.1, 2.95, 3.1, 3.5, math.hypot(2.5, 1.0), math.sqrt(50) / 2], **f64)
    distance = nearest_mode_distance(points, means, stds ** 2)
    torch.testing.assert_close(distance, expected, rtol=1e-9, atol=1e-12)
    assert fraction_beyond(points, means, stds ** 2) == pytest.approx(4 / 7, abs=1e-15)
    assert fraction_beyond(points, means, stds ** 2, n_sigma=3.2) == pytest.approx(2 / 7, abs=1e-15)


@pytest.mark.parametrize("stds, closed_form", [
    # One 2-D component: m² ~ χ²₂, P(m > 3) = exp(−9/2) = 0.0111, isotropic or diagonal alike.
    ([[0.5, 0.5]], math.exp(-4.5)),
    ([[0.3, 2.0]], math.exp(-4.5)),
    # One 3-D component: P(χ²₃ > 9) = erfc(3/√2) + √(2/π)·3·exp(−9/2).
    ([[0.2, 0.7, 1.5]], math.erfc(3 / math.sqrt(2)) + math.sqrt(2 / math.pi) * 3 * math.exp(-4.5)),
])
def test_exact_samples_of_one_component_match_the_chi_square_tail(stds, closed_form):
    d = len(stds[0])
    teacher = GaussianMixtureTeacher(torch.full((1, d), 0.4), stds)
    n = 200_000
    samples = teacher.sample(n, torch.Generator().manual_seed(0))
    standard_error = math.sqrt(closed_form * (1 - closed_form) / n)
    assert abs(fraction_beyond(samples, teacher.means, teacher.variances) - closed_form) < 4 * standard_error


def test_well_separated_ring_of_modes_keeps_the_single_component_tail():
    """Eight modes on a circle, 3σ-disks apart: a sample far from its own mode is still far from the others."""
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    means = torch.stack([angle.cos(), angle.sin()], 1) * 2.0
    teacher = GaussianMixtureTeacher(means, 0.1)
    n = 200_000
    fraction = fraction_beyond(teacher.sample(n, torch.Generator().manual_seed(1)), teacher.means, teacher.variances)
    assert abs(fraction - math.exp(-4.5)) < 4 * math.sqrt(math.exp(-4.5) / n)


def test_a_dirac_component_has_no_sigma():
    with pytest.raises(ApctlError, match="positive std"):
        fraction_beyond(torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_the_probe_reports_the_fraction_for_mixtures_with_a_sigma_only():
    """The probe counts a student's samples against the teacher's modes; the exact law's own fraction is its scale.
    A sample set placed exactly on the modes has none beyond; an empirical (Dirac) mixture gets no figure."""
    teacher = GaussianMixtureTeacher([[1.0, 0.0], [-1.0, 0.0]], 0.1)
    probe = AlignmentProbe(teacher, (2,), 4000, 0, 32)
    assert set(probe.beyond_3sigma) == {"teacher_ode", "exact"}
    assert probe.beyond_3sigma["exact"] == pytest.approx(math.exp(-4.5), abs=4 * math.sqrt(math.exp(-4.5) / 4000))
    on_modes = teacher.means.repeat(2000, 1).float()
    assert probe.measure(on_modes)["beyond_3sigma"] == 0.0
    assert probe.measure(on_modes + torch.tensor([0.0, 0.31]))["beyond_3sigma"] == 1.0
    dirac = AlignmentProbe(GaussianMixtureTeacher([[1.0, 0.0], [-1.0, 0.0]], 0.0), (2,), 16, 0, 8)
    assert dirac.beyond_3sigma == {} and "beyond_3sigma" not in dirac.measure(on_modes[:16])


def test_distill_logs_and_prints_the_fraction_that_eval_measures(tmp_path, cli):
    """A Gaussian-mixture run logs its probe's fractions beyond 3σ (the student's at 1 and 2 steps, the teacher
    ODE's) in metrics.jsonl and ends with the 2-step one; `apctl eval` on the same noise measures the same numbers."""
    import json

    sets = ["--set", "training.iterations=4", "--set", "training.eval_every=2", "--set", "eval.n_samples=256",
            "--set", "precond.statistics.n_samples=256"]
    out = cli.ok(cli(["distill", "--preset", "toy2d", "--out", "run", *sets], tmp_path)).stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    probed = [r for r in rows if "align_nfe2" in r]
    assert [r["step"] for r in probed] == [0, 2, 4]          # the untrained start, then every eval_every
    assert all({"beyond3_nfe1", "beyond3_nfe2", "beyond3_teacher_ode"} <= set(r) for r in probed)
    last = probed[-1]
    report = json.loads(cli.ok(cli(["eval", "--ckpt", "run", "--nfe", "1,2", "--json"], tmp_path)).stdout)
    assert report["n"] == 256
    for nfe in (1, 2):
        assert report["results"][f"nfe={nfe}"]["beyond_3sigma"] == last[f"beyond3_nfe{nfe}"]
    assert report["beyond_3sigma"]["teacher_ode"] == last["beyond3_teacher_ode"]
    assert (f"2-step samples beyond 3σ of a mode at step 4: {last['beyond3_nfe2']:.1%} "
            f"(teacher ODE {last['beyond3_teacher_ode']:.1%})") in out.replace("\n", " ")


def test_the_probe_logs_no_fraction_where_exact_samples_are_mostly_beyond_3_sigma():
    """In d dimensions exact samples lie beyond 3σ with probability P(χ²_d > 9): 1.1% in 2-D, ≈ 1 in 64-D. The
    probe gives the fractions only where they mean something (the exact law's own below one half)."""
    from types import SimpleNamespace

    import numpy as np

    from apctl.config import PrecondConfig
    from apctl.metrics.evaluation import training_probe
    from apctl.preconditioning.build import build_preconditioning

    class MeanDenoiser(torch.nn.Module):                      # D(x, t, s) = 0, the mixture's mean
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, s, labels=None):
            return torch.zeros_like(x)

    run = SimpleNamespace(ema=MeanDenoiser(), precond=build_preconditioning(PrecondConfig(kind="ctm")))
    for dim, logged in ((2, True), (64, False)):
        teacher = GaussianMixtureTeacher([[1.0] * dim, [-1.0] * dim], 0.1)
        logs = training_probe(teacher, (dim,), 0, 512, 0, 64, np.array([80.0, 1.0, 0.002]))(run)
        assert {"align_nfe1", "align_nfe2"} <= set(logs)
        assert {"beyond3_nfe1", "beyond3_nfe2", "beyond3_teacher_ode"} <= set(logs) if logged else \
            not any(k.startswith("beyond3") for k in logs), (dim, logs)
        if logged:                                             # every mean-denoised sample sits between the modes
            assert logs["beyond3_nfe2"] == 1.0 and logs["beyond3_teacher_ode"] < 0.05
    # `apctl eval` reads the same rule: no figure, and no column, for the 64-D mixture
    probe = AlignmentProbe(GaussianMixtureTeacher([[1.0] * 64, [-1.0] * 64], 0.1), (64,), 256, 0, 16)
    assert probe.beyond_3sigma == {} and "beyond_3sigma" not in probe.measure(probe.reference)
