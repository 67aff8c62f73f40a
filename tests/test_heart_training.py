"""The training loop's small rules: EMA updates, the optimizer's β, per-step generators, which config
changes a resume allows.

Each test states the independent fact it checks: the EMA definition θ_ema ← μ·θ_ema + (1 − μ)·θ
(apctl/training/ema.py) evaluated by hand and in closed form (μ^n), Adam's update rule written out for
two steps (apctl/training/optimizer.py), the architecture note's "each step's randomness comes from a
generator seeded by (seed, rank, step)", and the user guide's list of settings a resumed run may change
(docs/user_guide.md, "Resuming").
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from apctl.config import Config
from apctl.training.ema import ema_update, frozen_copy
from apctl.training.run import config_differences
from apctl.training.step import shared_generator, step_generator

F64 = torch.float64


def _net(fill: float) -> nn.Module:
    """Linear (parameters) + BatchNorm (parameters and buffers), every parameter entry distinct."""
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(F64)
    with torch.no_grad():
        for n, p in enumerate(net.parameters()):
            p.copy_(fill * (1 + n) + torch.arange(p.numel(), dtype=F64).reshape(p.shape) / 7)
    return net


# --- EMA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mu", [0.9, 0.999, 0.0])
def test_one_ema_update_is_the_convex_combination(mu):
    """After one update with decay μ each EMA entry equals μ·old + (1 − μ)·new, computed per entry by hand."""
    ema, net = _net(2.0), _net(-5.0)
    old = [p.detach().clone() for p in ema.parameters()]
    new = [p.detach().clone() for p in net.parameters()]
    ema_update(ema, net, mu)
    for p, o, w in zip(ema.parameters(), old, new):
        expect = torch.tensor([mu * a + (1 - mu) * b for a, b in zip(o.flatten().tolist(), w.flatten().tolist())],
                              dtype=F64).reshape(o.shape)
        assert torch.allclose(p, expect, rtol=1e-14, atol=1e-14), (p, expect)
    for p, w in zip(net.parameters(), new):              # the source network is not touched
        assert torch.equal(p, w)


def test_ema_buffers_are_copied_not_averaged():
    """Buffers (BatchNorm running statistics, counters) are taken over as they are, whatever μ."""
    ema, net = _net(1.0), _net(3.0)
    net.train()
    net(torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))   # moves net's running stats
    assert not torch.equal(dict(net.named_buffers())["1.running_mean"], dict(ema.named_buffers())["1.running_mean"])
    ema_update(ema, net, 0.99)
    for (name, b_ema), (_, b) in zip(ema.named_buffers(), net.named_buffers()):
        assert torch.equal(b_ema, b), name


def test_repeated_ema_updates_converge_geometrically():
    """With the network fixed at θ, n updates give θ + μ^n·(θ_ema,0 − θ) (closed form of the recursion)."""
    mu = 0.8
    ema, net = _net(4.0), _net(-1.0)
    start = [p.detach().clone() for p in ema.parameters()]
    for n in range(1, 41):
        ema_update(ema, net, mu)
        for p, p0, target in zip(ema.parameters(), start, net.parameters()):
            assert torch.allclose(p, target + mu ** n * (p0 - target), rtol=0, atol=1e-12), n


def test_frozen_copy_is_a_deep_copy_without_gradients():
    """frozen_copy: equal weights, requires_grad off, independent storage (changing one leaves the other)."""
    net = _net(1.5)
    frozen = frozen_copy(net)
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in net.parameters())            # the original keeps training
    for (name, a), (_, b) in zip(frozen.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    with torch.no_grad():
        next(frozen.parameters()).add_(1.0)
        frozen[1].running_mean.add_(1.0)
    assert torch.equal(next(net.parameters()), next(_net(1.5).parameters()))
    assert torch.equal(net[1].running_mean, torch.zeros(2, dtype=F64))


# --- the optimizer ----------------------------------------------------------------------------------

BETAS = ([0.9, 0.99], [0.5, 0.9], [0.9, 0.999])


def _adam_two_steps(g1: float, g2: float, lr: float, beta1: float, beta2: float, eps: float = 1e-8) -> float:
    """θ after two Adam steps from θ = 0 with gradients g1, g2, by the update rule written out:
    m_k = β₁·m_{k−1} + (1 − β₁)·g_k,  v_k = β₂·v_{k−1} + (1 − β₂)·g_k²,
    θ −= lr·(m_k/(1 − β₁^k)) / (√(v_k/(1 − β₂^k)) + ε)."""
    theta = m = v = 0.0
    for k, g in enumerate((g1, g2), start=1):
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        theta -= lr * (m / (1 - beta1 ** k)) / (math.sqrt(v / (1 - beta2 ** k)) + eps)
    return theta


@pytest.mark.parametrize("betas", BETAS)
def test_the_optimizer_takes_the_configured_betas(betas):
    """training.betas reaches the update: two Adam steps (gradients 1, then −3) land where the rule with those
    β puts them, and the β of the other rows would put them elsewhere."""
    from apctl.config import TrainingConfig
    from apctl.training.optimizer import build_optimizer

    theta = nn.Parameter(torch.zeros((), dtype=F64))
    optimizer = build_optimizer(TrainingConfig(optimizer="adam", betas=betas), [theta], lr=0.1)
    for g in (1.0, -3.0):
        optimizer.zero_grad()
        (g * theta).backward()
        optimizer.step()
    expected = _adam_two_steps(1.0, -3.0, 0.1, *betas)
    assert theta.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    others = [_adam_two_steps(1.0, -3.0, 0.1, *b) for b in BETAS if b != betas]
    assert all(abs(o - expected) > 1e-5 for o in others)      # the two-step rule is met to 1e-12 above
    radam = build_optimizer(TrainingConfig(optimizer="radam", betas=betas), [theta], lr=0.1)
    assert isinstance(radam, torch.optim.RAdam) and radam.defaults["betas"] == tuple(betas)


# --- per-step generators --------------------------------------------------------------------------

def _draws(seed, rank, step, n=2000):
    return torch.rand(n, generator=step_generator(seed, rank, step), dtype=F64)


def test_step_generator_is_deterministic():
    """The same (seed, rank, step) gives the same stream in a fresh generator (resume = re-run)."""
    for key in [(0, 0, 0), (3, 1, 12345), (2 ** 31 - 1, 7, 10 ** 7)]:
        assert torch.equal(_draws(*key), _draws(*key))


def test_step_generators_are_different_independent_streams():
    """Different (seed, rank, step), including permutations of the same numbers, give different,
    uncorrelated streams: |corr| of 2000 uniforms within 5/√2000 of 0 for every pair."""
    keys = list(itertools.product((0, 1, 2), repeat=3))               # (0,1,0) vs (0,0,1) vs (1,0,0) …
    streams = {key: _draws(*key) for key in keys}
    firsts = {float(s[0]) for s in streams.values()}
    assert len(firsts) == len(keys)
    z = torch.stack([(s - s.mean()) / s.std() for s in streams.values()])
    corr = (z @ z.T) / (z.shape[1] - 1)
    off = corr[~torch.eye(len(keys), dtype=torch.bool)]
    bound = 5 / z.shape[1] ** 0.5
    assert float(off.abs().max()) <= bound, float(off.abs().max())


def test_shared_generator_is_one_stream_per_step_for_every_rank():
    """shared_generator(seed, step) takes no rank (so every rank draws the same shared values, e.g. CTM's k),
    repeats for the same (seed, step), differs across steps and seeds, and differs from every rank's own
    step_generator stream."""
    draw = lambda g: torch.rand(64, generator=g, dtype=F64)                # noqa: E731
    assert torch.equal(draw(shared_generator(3, 7)), draw(shared_generator(3, 7)))
    streams = [draw(shared_generator(seed, step)) for seed in (0, 1) for step in (0, 1, 2)]
    assert len({float(s[0]) for s in streams}) == len(streams)
    assert all(not torch.equal(draw(shared_generator(3, 7)), draw(step_generator(3, rank, 7))) for rank in range(4))


# --- which config changes a resume accepts --------------------------------------------------------

# docs/user_guide.md: "Changing training.iterations (to extend a run), log_every, eval_every,
# checkpoint_every, keep_checkpoints or [eval] is allowed; any other change is refused with the keys that differ".
ALLOWED = {"run.threads", "training.iterations", "training.log_every", "training.eval_every", "training.checkpoint_every",
           "training.keep_checkpoints", "training.batch_per_device", "training.max_skipped_steps",
           "training.tensorboard", "training.snapshot_every"}


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [1]
    return "x"


def _with(d: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(d)
    *path, last = dotted.split(".")
    node = out
    for key in path:
        node = node[key]
    node[last] = value
    return out


def test_config_differences_follow_the_user_guide():
    """Every single-key change of the full config: the guide's resumable keys (and all of [eval]) are
    ignored, any other key is reported as exactly that dotted key."""
    base = Config().to_dict()
    leaves = dict(_leaves(base))
    assert ALLOWED <= set(leaves) and any(k.startswith("eval.") for k in leaves)
    for key, value in leaves.items():
        got = config_differences(base, _with(base, key, _changed(value)))
        allowed = key in ALLOWED or key.startswith("eval.")
        assert got == ([] if allowed else [key]), (key, got)


def test_keys_added_since_a_run_was_saved_are_unchanged_at_their_default():
    """A checkpoint written before a key existed resumes when the key holds its default, not otherwise."""
    base = Config().to_dict()
    old = _with(base, "training.lr", 1e-3)
    del old["training"]["lr_warmup"], old["training"]["lr_schedule"]
    assert config_differences(old, _with(base, "training.lr", 1e-3)) == []
    assert config_differences(old, _with(_with(base, "training.lr", 1e-3), "training.lr_warmup", 10)) == ["training.lr_warmup"]


def test_config_differences_reports_added_and_removed_keys_in_order():
    """Keys present on one side only differ too; the report is sorted; resumable keys stay ignored."""
    base = Config().to_dict()
    new = _with(_with(base, "training.lr", 1.0), "objective.target_ema", 0.5)
    new["training"]["extra_key"] = 1
    del new["run"]["seed"]
    new["training"]["iterations"] *= 2
    assert config_differences(base, new) == ["objective.target_ema", "run.seed", "training.extra_key", "training.lr"]
    assert config_differences(base, base) == []


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_decaying_schedule_fixes_the_number_of_iterations(schedule):
    """The guide: a decaying learning-rate schedule ends at training.iterations, so that key may not change on
    resume then (it may under the constant schedule, tested above)."""
    base = _with(Config().to_dict(), "training.lr_schedule", schedule)
    longer = _with(base, "training.iterations", base["training"]["iterations"] * 2)
    assert config_differences(base, longer) == ["training.iterations"]
    assert config_differences(base, _with(base, "training.log_every", 7)) == []
