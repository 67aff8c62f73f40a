"""`apctl teacher train`: EDM's denoiser loss on the training engine, the teacher file it writes, and the
path teacher train → distill --teacher → sample → eval.

Oracles: for data N(μ, s²·I) the minimiser of EDM's loss at every σ is the posterior mean
D*(x, σ) = μ + s²/(s² + σ²)·(x − μ) (Karras et al. 2022, eq. 2 and App. B.3); EDM's weight makes the
loss of D* equal to d·s²σ²/(s² + σ²)·λ(σ) per sample, λ(σ) = (σ² + σ_d²)/(σ·σ_d)².
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from apctl.objectives.edm import EDMObjective

SIGMA_D = 0.5


class AffineDenoiser(nn.Module):
    """D(x, σ) = a(σ)·x + b(σ), a and b small MLPs of ln σ: a family that contains the Gaussian's D*."""

    def __init__(self, d: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1 + d))

    def forward(self, x, sigma, labels=None):
        out = self.body(sigma.log().view(-1, 1).float())
        return torch.sigmoid(out[:, :1]) * x + out[:, 1:]


def gaussian_denoiser(x, sigma, mu, s):
    return mu + (s ** 2 / (s ** 2 + sigma ** 2)).view(-1, 1) * (x - mu)


def test_edm_loss_of_the_exact_denoiser_is_its_closed_form():
    """E[λ(σ)·‖D*(x_0 + n, σ) − x_0‖²] = λ(σ)·d·s²σ²/(s² + σ²) at every σ; the objective's Monte-Carlo
    mean over its own σ draws matches the same expectation taken over σ ~ lognormal(−1.2, 1.2)."""
    d, s = 4, 0.3
    mu = torch.tensor([0.5, -0.2, 0.1, 0.0])
    exact = lambda x, sigma, labels=None: gaussian_denoiser(x, sigma, mu, s)  # noqa: E731
    objective = EDMObjective()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(40):
        x0 = mu + s * torch.randn(2048, d, generator=gen)
        loss, _ = objective(exact, None, x0, None, gen, None)
        losses.append(float(loss))
    sig = torch.exp(torch.randn(400_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.2 - 1.2)
    expected = float(((sig ** 2 + SIGMA_D ** 2) / (sig * SIGMA_D) ** 2 * d * s ** 2 * sig ** 2 / (s ** 2 + sig ** 2)).mean())
    assert math.isclose(sum(losses) / len(losses), expected, rel_tol=0.03), (sum(losses) / len(losses), expected)


def test_edm_loss_trains_a_denoiser_to_the_gaussian_posterior_mean():
    """Training an affine family on N(μ, s²I) with EDM's loss lowers the loss and lands near D* at σ across
    the lognormal's bulk: RMS(D − D*) below 5 % of the data's scale s (a constant denoiser D = μ is off by
    s²/√(s² + σ²)·… — 16 % of s at σ = 1, 28 % at σ = 0.3 — so the bound is not met by chance)."""
    torch.manual_seed(0)
    d, s = 4, 0.3
    mu = torch.tensor([0.5, -0.2, 0.1, 0.0])
    net = AffineDenoiser(d)
    objective = EDMObjective()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1500):
        x0 = mu + s * torch.randn(256, d, generator=gen)
        loss, _ = objective(net, None, x0, None, gen, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-100:]) / 100 < 0.5 * sum(losses[:100]) / 100
    for sigma_value in (0.1, 0.3, 1.0):         # the bulk of ln σ ~ N(−1.2, 1.2²): median 0.30, ±1 std 0.09 … 1.0
        sigma = torch.full((512,), sigma_value)
        xs = mu + (s ** 2 + sigma_value ** 2) ** 0.5 * torch.randn(512, d, generator=gen)
        with torch.no_grad():
            got = net(xs, sigma)
        want = gaussian_denoiser(xs, sigma, mu, s)
        err = (got - want).pow(2).mean().sqrt() / s
        assert err < 0.05, (sigma_value, float(err))


# ------------------------------------------------------------------------------------------------
# Through the CLI, on a tiny configuration (8×8 digits).

TINY_TEACHER = ["data.resolution=8", "training.iterations=6", "training.batch_size=8", "training.log_every=3",
                "training.checkpoint_every=3"]
TINY_DISTILL = ["data.resolution=8", "training.iterations=4", "training.batch_size=4", "training.log_every=2",
                "training.eval_every=2", "training.checkpoint_every=2", "precond.statistics.n_points=8",
                "precond.statistics.n_samples=16", "precond.statistics.batch_size=16", "eval.n_samples=16",
                "eval.teacher_steps=8"]


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, cli):
    ws = tmp_path_factory.mktemp("teacher")
    result = cli.ok(cli(["teacher", "train", "--preset", "digits-teacher", "--out", "T", *_sets(TINY_TEACHER)], ws))
    return ws, result


def test_teacher_train_writes_a_teacher_file_apctl_accepts(trained_teacher, cli):
    ws, result = trained_teacher
    weights, meta_path = ws / "T" / "teacher.safetensors", ws / "T" / "teacher.json"
    assert weights.is_file() and meta_path.is_file() and (ws / "T" / "samples.png").is_file()
    assert "teacher.safetensors" in result.stdout
    meta = json.loads(meta_path.read_text())
    assert meta["class_name"] == "EDMPrecond" and meta["init_kwargs"]["img_resolution"] == 8
    assert meta["init_kwargs"]["img_channels"] == 1 and meta["init_kwargs"]["label_dim"] == 10
    assert meta["trained_by"]["step"] == 6 and meta["trained_by"]["config"]["objective"]["kind"] == "edm"
    # The weights are the evaluation EMA of the last checkpoint, and the fingerprint is theirs.
    from safetensors.torch import load_file

    from apctl.checkpoints import load_checkpoint
    from apctl.teachers.importers import load_teacher

    ema = load_checkpoint(ws / "T").group("ema")
    saved = load_file(str(weights))
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in saved)
    assert load_teacher(weights).fingerprint == meta["fingerprint"]
    imported = cli.ok(cli(["teacher", "import", str(weights), "-o", "again.safetensors"], ws))
    assert json.loads((ws / "again.json").read_text())["fingerprint"] == meta["fingerprint"], imported.stdout


def test_teacher_train_then_distill_sample_eval(trained_teacher, cli):
    ws, _ = trained_teacher
    teacher = ws / "T" / "teacher.safetensors"
    cli.ok(cli(["distill", "--preset", "digits-net", "--teacher", teacher, "--out", "S", *_sets(TINY_DISTILL)], ws))
    ckpt = json.loads(sorted((ws / "S" / "checkpoints").glob("ckpt-*.json"))[-1].read_text())
    assert ckpt["step"] == 4 and ckpt["student"]["kind"] == "unet"
    assert ckpt["student"]["init_kwargs"]["img_resolution"] == 8      # the teacher's architecture
    cli.ok(cli(["sample", "--ckpt", "S", "--nfe", "2", "--n", "8", "-o", "s.npz"], ws))
    out = cli.ok(cli(["eval", "--ckpt", "S", "--nfe", "1,2", "--n", "8", "--teacher-steps", "4", "--json"], ws))
    report = json.loads(out.stdout)
    assert set(report["results"]) == {"nfe=1", "nfe=2"}
    assert all(math.isfinite(r["alignment_rms"]) for r in report["results"].values())


def test_teacher_training_resumes_bit_identically(tmp_path, cli):
    """3 + 3 iterations (interrupted by a shorter first run, then re-run) = 6 uninterrupted."""
    from apctl.checkpoints import load_checkpoint

    base = [o for o in TINY_TEACHER if not o.startswith("training.iterations")]
    jobs = [(["teacher", "train", "--preset", "digits-teacher", "--out", "A", *_sets(base + ["training.iterations=6"])],
             tmp_path),
            (["teacher", "train", "--preset", "digits-teacher", "--out", "B", *_sets(base + ["training.iterations=3"])],
             tmp_path)]
    for result in cli.parallel(jobs):
        cli.ok(result)
    second = cli.ok(cli(["teacher", "train", "--preset", "digits-teacher", "--out", "B",
                         *_sets(base + ["training.iterations=6"])], tmp_path))
    assert "resuming" in second.stdout
    a, b = load_checkpoint(tmp_path / "A"), load_checkpoint(tmp_path / "B")
    assert a.step == b.step == 6
    assert a.tensors.keys() == b.tensors.keys()
    assert not any(k.startswith("target.") for k in a.tensors), "teacher training keeps no target network"
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_presets_of_the_other_command_get_one_clear_line(tmp_path, cli):
    line = cli.user_error(cli(["teacher", "train", "--preset", "toy2d"], tmp_path), "toy2d", "objective.kind")
    assert "edm" in line
    cli.user_error(cli(["distill", "--preset", "digits-teacher"], tmp_path), "apctl teacher train")
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "digits-teacher"\n[student]\nkind = "unet"\n')
    cli.user_error(cli(["teacher", "train", "--preset", bad], tmp_path), "student.kind")
    assert not (tmp_path / "runs").exists()


def test_a_teacher_that_does_not_fit_the_data_is_one_line_before_any_work(trained_teacher, cli):
    """An 8×8, 10-class teacher with 16×16 digits, or with unlabelled digits: refused naming both, nothing written."""
    ws, _ = trained_teacher
    teacher = ws / "T" / "teacher.safetensors"
    small = [o for o in TINY_DISTILL if not o.startswith("data.resolution")]
    line = cli.user_error(cli(["distill", "--preset", "digits-net", "--teacher", teacher, "--out", "wrong-size",
                               *_sets(small + ["data.resolution=16"])], ws), "(1, 8, 8)", "(1, 16, 16)")
    assert "teacher" in line
    cli.user_error(cli(["distill", "--preset", "digits-net", "--teacher", teacher, "--out", "no-labels",
                        *_sets(TINY_DISTILL + ["data.class_conditional=false"])], ws), "10 classes", "no labels")
    assert not (ws / "wrong-size").exists() and not (ws / "no-labels").exists()


def test_the_shipped_teacher_is_what_its_command_describes():
    """teachers/digits-teacher.safetensors was made by `apctl teacher train --preset digits-teacher` (the JSON
    records that run's resolved config and final step): its config is the preset's as shipped (keys added to
    apctl since, absent from the record, read at their defaults), its
    architecture is the one that preset builds for 16×16 digits, its fingerprint is that of the weights in the
    file, and it fits the 4 MiB budget for a file in the repository."""
    from pathlib import Path

    from safetensors.torch import load_file

    from apctl.networks.student import student_architecture
    from apctl.presets import load_config
    from apctl.teachers import find_teacher_file
    from apctl.teachers.bundle import compute_fingerprint

    weights = Path(__file__).resolve().parent.parent / "teachers" / "digits-teacher.safetensors"
    assert find_teacher_file("digits-teacher.safetensors").resolve() == weights.resolve()
    assert weights.stat().st_size <= 4 * 2 ** 20
    meta = json.loads(weights.with_suffix(".json").read_text())
    cfg, _ = load_config("digits-teacher")
    from apctl.config import config_from_dict

    assert config_from_dict(meta["trained_by"]["config"]).to_dict() == cfg.to_dict()
    assert meta["trained_by"]["step"] == cfg.training.iterations
    arch = {"class_name": "EDMPrecond", "init_kwargs": student_architecture(cfg.student, (1, 16, 16), 10)["init_kwargs"]}
    assert {"class_name": meta["class_name"], "init_kwargs": meta["init_kwargs"]} == arch
    assert compute_fingerprint(load_file(str(weights)), arch) == meta["fingerprint"]
