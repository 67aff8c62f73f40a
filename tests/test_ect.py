"""ECT's loss as locuslab/ect's code computes it (`training/loss.py` ECMLoss; docs/reference_code.md, "ECT"),
each rule against an independent statement: the gap schedule in closed form, the goal and weight recomputed
here from the same draws, exact zeros where ECT's invariants demand them, and the run around it (a one-time
student, no θ⁻, resume by re-running).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from apctl.config import ECTObjectiveConfig
from apctl.errors import ApctlError
from apctl.networks.registry import EDM_PRESET_KWARGS
from apctl.networks.student import set_dropout
from apctl.objectives import ect as ect_module
from apctl.objectives.ect import ECTObjective, r_of_t, stage_of
from apctl.presets import load_config

SIGMA_D = 0.5
KW = EDM_PRESET_KWARGS["cpu-songunet-16"]


# === the gap schedule ==========================================================================================

def r_oracle(t: float, stage: int, q: float, k: float, b: float, mapping: str) -> float:
    """ECT's mapping function, written from the paper's statement: Δt/t = n(t)/q^(stage+1)."""
    n = 1 + k / (1 + math.exp(b * t)) if mapping == "sigmoid" else 1.0
    return max(0.0, t * (1 - n / q ** (stage + 1)))


@pytest.mark.parametrize("mapping", ["sigmoid", "const"])
@pytest.mark.parametrize("q,k,b", [(2.0, 8.0, 1.0), (4.0, 8.0, 1.0), (256.0, 3.0, 0.5)])
def test_r_is_the_mapping_function(mapping, q, k, b):
    cfg = ECTObjectiveConfig(mapping=mapping, q=q, k=k, b=b)
    t = torch.tensor(np.geomspace(1e-4, 300.0, 97), dtype=torch.float64)
    for stage in range(8):
        got = r_of_t(t, stage, cfg)
        want = torch.tensor([r_oracle(float(v), stage, q, k, b, mapping) for v in t], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
        assert bool(((got >= 0) & (got <= t)).all())


def test_stage_zero_of_the_cifar_recipe_denoises_up_to_ln_7():
    """q = 2, k = 8, b = 1: at stage 0, r = 0 exactly when n(t)/2 ≥ 1, i.e. 8·sigmoid(−t) ≥ 1, i.e. t ≤ ln 7;
    at stage 7 the gap Δt/t falls to n(t)/256 → 1/256 for large t."""
    cfg = ECTObjectiveConfig()
    edge = math.log(7.0)
    t = torch.tensor([0.01, 1.0, edge * (1 - 1e-9), edge * (1 + 1e-9), 3.0], dtype=torch.float64)
    r = r_of_t(t, 0, cfg)
    assert r[:3].eq(0).all() and r[3:].gt(0).all()
    big = torch.tensor([200.0], dtype=torch.float64)
    assert float((big - r_of_t(big, 7, cfg)) / big) == pytest.approx(1 / 256, rel=1e-12)


def test_the_stage_steps_up_every_stage_iterations():
    assert [stage_of(step, 3) for step in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert stage_of(199_999, 25_000) == 7


# === the loss on one batch =====================================================================================

def _student(rate: float):
    from apctl.networks.two_time import TwoTimeDenoiser

    torch.manual_seed(0)
    student = TwoTimeDenoiser.from_init_kwargs(KW)
    with torch.no_grad():        # EDM zero-initialises conv1 and the output conv: dropout would not show
        for name, p in student.named_parameters():
            if not name.startswith("s_embedding"):
                p.add_(0.05 * torch.randn_like(p))
    set_dropout(student, rate)
    student.freeze_s_embedding()
    return student.train()


def _batch(n: int = 3, channels: int = KW["img_channels"]):
    g = torch.Generator().manual_seed(7)
    x0 = 0.5 * torch.randn(n, channels, 16, 16, generator=g)
    labels = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float()
    return x0, labels


def _draws(seed: int, x0: torch.Tensor):
    """The objective's draws, repeated from the same generator: t (float64, per row), then ε."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(x0.shape[0], generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    return z, eps


def _objective(**keys) -> ECTObjective:
    return ECTObjective(ECTObjectiveConfig(**keys))


def test_the_goal_is_the_model_at_r_on_the_same_noise(monkeypatch):
    """r = t/2 forced: loss = mean (1/t² + 1/σ_d²)·(√(Σ(D(x₀ + tε, t) − D(x₀ + rε, r))² + c²) − c), with the same
    ε in both points (dropout off, so D is a function)."""
    monkeypatch.setattr(ect_module, "r_of_t", lambda t, stage, cfg: t / 2)
    student = _student(0.0)
    x0, labels = _batch()
    objective = _objective(weighting="edm", huber_c=0.06, p_mean=0.0, p_std=0.5)
    loss, _ = objective(student, None, x0, labels, torch.Generator().manual_seed(3), None, 0)
    z, eps = _draws(3, x0)
    t = (z * 0.5 + 0.0).exp().float()
    r = t / 2
    s = torch.full_like(t, 0.002)
    with torch.no_grad():
        a = student(x0 + t.view(-1, 1, 1, 1) * eps, t, s, labels)
        b = student(x0 + r.view(-1, 1, 1, 1) * eps, r, s, labels)
    d = ((a - b).pow(2).flatten(1).sum(1) + 0.06 ** 2).sqrt() - 0.06
    want = ((1 / t ** 2 + 1 / SIGMA_D ** 2) * d).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


def test_r_zero_makes_the_goal_the_clean_image(monkeypatch):
    """r ≡ 0: the loss is denoising score matching with ECT's metric and weight, mean ‖D(x₀ + tε, t) − x₀‖₂ / t."""
    monkeypatch.setattr(ect_module, "r_of_t", lambda t, stage, cfg: torch.zeros_like(t))
    student = _student(0.0)
    x0, labels = _batch()
    loss, logs = _objective()(student, None, x0, labels, torch.Generator().manual_seed(4), None, 0)
    z, eps = _draws(4, x0)
    t = (z * 2.0 - 1.1).exp().float()
    with torch.no_grad():
        a = student(x0 + t.view(-1, 1, 1, 1) * eps, t, torch.full_like(t, 0.002), labels)
    want = ((a - x0).pow(2).flatten(1).sum(1).sqrt() / t).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(logs["clean_goal_fraction"]) == 1.0


def test_a_zero_gap_gives_exactly_zero_loss_and_gradient_under_dropout(monkeypatch):
    """r = t with dropout 0.3 in train mode: the goal's pass draws the estimate's dropout masks, so the two
    outputs are bit-identical and the loss and every gradient are exactly 0 (c > 0, where d has a gradient
    at 0; weight "edm", finite at r = t). Without rewinding the generators the same setting gives a
    positive loss: the masks differ."""
    monkeypatch.setattr(ect_module, "r_of_t", lambda t, stage, cfg: t.clone())
    student = _student(0.3)
    x0, labels = _batch()
    objective = _objective(weighting="edm", huber_c=0.06)
    loss, _ = objective(student, None, x0, labels, torch.Generator().manual_seed(5), None, 0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)

    monkeypatch.setattr(ect_module, "same_dropout_masks", lambda device: contextlib.nullcontext())
    loss, _ = objective(student, None, x0, labels, torch.Generator().manual_seed(5), None, 0)
    assert float(loss.detach()) > 0


def test_the_stage_comes_from_the_step():
    """The same draws at steps 0 and stage_iterations give pairs of stage 0 and 1: a different loss."""
    student = _student(0.0)
    x0, labels = _batch()
    objective = _objective(stage_iterations=10, p_mean=1.5, p_std=0.1)     # t ≈ 4.5: r > 0 at both stages
    with torch.no_grad():
        losses = [float(objective(student, None, x0, labels, torch.Generator().manual_seed(6), None, step)[0])
                  for step in (0, 9, 10)]
    assert losses[0] == losses[1] != losses[2]


# === the run around it =========================================================================================

ECT_RUN = ["training.batch_size=2", "training.eval_every=0", "run.threads=1", "training.checkpoint_every=2",
           "objective.ect.stage_iterations=2", "training.log_every=1"]


def _prepare(tmp_path, *extra):
    from apctl.training.run import prepare

    cfg, _ = load_config("digits-ect", [*ECT_RUN, *extra])
    return prepare(cfg, tmp_path)


def test_an_ect_run_keeps_a_one_time_student_and_no_target(tmp_path):
    """prepare(): no θ⁻; the s-embedding is out of training; after two steps D_θ(x, t, s) is still the same for
    every s, while the rest of the network has moved."""
    from apctl.training.step import train_step

    run = _prepare(tmp_path)
    assert run.target is None
    assert not any(p.requires_grad for p in run.student.s_embedding.parameters())
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    for step in range(2):
        train_step(run, step, run.student)
    moved = [k for k, v in run.student.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and not any(k.startswith("s_embedding") for k in moved)
    x0, labels = _batch(2, channels=run.data_source.shape[0])
    t = torch.tensor([3.0, 0.5])
    run.student.eval()
    with torch.no_grad():
        outs = [run.student(x0, t, torch.full_like(t, s), labels) for s in (0.002, 0.3, 2.0)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    run.close()


def test_an_ect_run_resumed_equals_one_run_through(tmp_path, cli):
    """4 iterations (two stages) in one go, and 2 then 2 more by re-running: the same weights, bit for bit."""
    from resume_checks import assert_same_weights, whole_and_split

    whole, split = whole_and_split(cli, tmp_path, "digits-ect", ECT_RUN, 4, 2)
    assert whole.step == split.step == 4
    assert_same_weights(whole, split)
    assert not whole.group("target")


def test_an_ect_checkpoint_has_no_target_weights_to_sample(tmp_path, cli):
    from apctl.training.trained import load_trained_student

    sets = [a for s in [*ECT_RUN, "training.iterations=2"] for a in ("--set", s)]
    cli.ok(cli(["distill", "--preset", "digits-ect", "--out", "run", *sets], tmp_path))
    assert load_trained_student(tmp_path / "run").net is not None
    with pytest.raises(ApctlError, match="no 'target' weights"):
        load_trained_student(tmp_path / "run", weights="target")


def test_the_plan_states_ects_law_and_no_ctm_rows(tmp_path, cli):
    out = cli.ok(cli(["distill", "--preset", "digits-ect", "--dry-run", "--set", "objective.ect.huber_c=0.06"], tmp_path)).stdout
    flat = " ".join(out.split())
    assert "ECT: ln t ~ N(-1.1, 2²)" in flat and "n(t) = 1 + 8·sigmoid(−1·t)" in flat
    assert "stage j = ⌊step / 100⌋" in flat and "√(‖Δ‖² + 0.06²) − 0.06" in flat and "weight 1/(t − r)" in flat
    for row in ("target EMA", "max teacher Heun steps", "CTM rules"):
        assert row not in out
