"""EDM networks: checkpoint-compatible names/shapes/counts, tiny forwards, the two-time student.

The big preset networks are only ever built on the meta device (no weights allocated). Their
reference state dicts below are derived in this file from EDM's architecture description
(NVlabs/edm `training/networks.py` + `train.py` + README training table), layer by layer,
without instantiating apctl's modules, so a wrong width, a missing skip projection or an
extra bias makes the tests fail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apctl.errors import ApctlError
from apctl.networks import (
    EDM_PRESET_KWARGS,
    DhariwalUNet,
    EDMPrecond,
    SongUNet,
    TwoTimeDenoiser,
    VEPrecond,
    VPPrecond,
    build_network,
    build_preset,
    count_parameters,
)
from apctl.networks.edm_layers import Conv2d
from apctl.networks.edm_precond import iDDPMPrecond

PRESETS = [
    "edm-cifar10-32x32-cond-vp.pkl",
    "edm-cifar10-32x32-uncond-vp.pkl",
    "edm-ffhq-64x64-uncond-vp.pkl",
    "edm-imagenet-64x64-cond-adm.pkl",
]


# ------------------------------------------------------------------------------------------
# Reference state dicts, written from EDM's architecture description.
#
# Per-layer rules (EDM training/networks.py):
#   Linear(i, o)        weight [o, i], bias [o] unless bias=False
#   Conv2d(i, o, k)     weight [o, i, k, k], bias [o] (none when k = 0); when resampling a
#                       buffer resample_filter [1, 1, n, n], n = len(filter taps)
#   GroupNorm(c)        weight [c], bias [c]
#   UNetBlock(i, o)     norm0(i), conv0(i→o, 3), affine(emb → o·(2 if adaptive)), norm1(o),
#                       conv1(o→o, 3); skip conv when i≠o or resampling, with a 1×1 kernel
#                       when i≠o or resample_proj else kernel 0; attention adds norm2(o),
#                       qkv(o→3o, 1), proj(o→o, 1)
# ------------------------------------------------------------------------------------------

BUFFER_NAMES = ("resample_filter", "freqs")


def _linear(sd, name, i, o, bias=True):
    sd[f"{name}.weight"] = (o, i)
    if bias:
        sd[f"{name}.bias"] = (o,)


def _conv(sd, name, i, o, k, taps=0):
    if k:
        sd[f"{name}.weight"] = (o, i, k, k)
        sd[f"{name}.bias"] = (o,)
    if taps:
        sd[f"{name}.resample_filter"] = (1, 1, taps, taps)


def _norm(sd, name, c):
    sd[f"{name}.weight"] = (c,)
    sd[f"{name}.bias"] = (c,)


def _block(sd, name, i, o, emb, *, attn=False, taps=0, adaptive, resample_proj):
    _norm(sd, f"{name}.norm0", i)
    _conv(sd, f"{name}.conv0", i, o, 3, taps)
    _linear(sd, f"{name}.affine", emb, o * (2 if adaptive else 1))
    _norm(sd, f"{name}.norm1", o)
    _conv(sd, f"{name}.conv1", o, o, 3)
    if i != o or taps:
        _conv(sd, f"{name}.skip", i, o, 1 if (i != o or resample_proj) else 0, taps)
    if attn:
        _norm(sd, f"{name}.norm2", o)
        _conv(sd, f"{name}.qkv", o, 3 * o, 1)
        _conv(sd, f"{name}.proj", o, o, 1)


def reference_songunet(res, label_dim, augment_dim, mc, mult, nb=4, attn_res=(16,), cmn=1,
                       fourier=False, encoder="standard", taps=2, out_ch=3, in_ch=3):
    """(state-dict shapes, enc names, dec names) of EDM's SongUNet ('standard' decoder)."""
    sd, enc, dec = {}, [], []
    emb, noise = mc * 4, mc * cmn
    blk = dict(adaptive=False, resample_proj=True)
    if fourier:
        sd["map_noise.freqs"] = (noise // 2,)
    if label_dim:
        _linear(sd, "map_label", label_dim, noise)
    if augment_dim:
        _linear(sd, "map_augment", augment_dim, noise, bias=False)
    _linear(sd, "map_layer0", noise, emb)
    _linear(sd, "map_layer1", emb, emb)
    c, caux, skips = in_ch, in_ch, []
    for lvl, m in enumerate(mult):
        r = res >> lvl
        if lvl == 0:
            enc.append(f"{r}x{r}_conv"); _conv(sd, f"enc.{enc[-1]}", c, mc, 3); c = mc; skips.append(c)
        else:
            enc.append(f"{r}x{r}_down"); _block(sd, f"enc.{enc[-1]}", c, c, emb, taps=taps, **blk); skips.append(c)
            if encoder == "residual":
                enc.append(f"{r}x{r}_aux_residual"); _conv(sd, f"enc.{enc[-1]}", caux, c, 3, taps); caux = c
        for i in range(nb):
            enc.append(f"{r}x{r}_block{i}")
            _block(sd, f"enc.{enc[-1]}", c, mc * m, emb, attn=r in attn_res, **blk); c = mc * m; skips.append(c)
    for lvl in reversed(range(len(mult))):
        r = res >> lvl
        if lvl == len(mult) - 1:
            dec += [f"{r}x{r}_in0", f"{r}x{r}_in1"]
            _block(sd, f"dec.{r}x{r}_in0", c, c, emb, attn=True, **blk)
            _block(sd, f"dec.{r}x{r}_in1", c, c, emb, **blk)
        else:
            dec.append(f"{r}x{r}_up"); _block(sd, f"dec.{dec[-1]}", c, c, emb, taps=taps, **blk)
        for i in range(nb + 1):
            cin = c + skips.pop(); c = mc * mult[lvl]
            dec.append(f"{r}x{r}_block{i}")
            _block(sd, f"dec.{dec[-1]}", cin, c, emb, attn=(i == nb and r in attn_res), **blk)
        if lvl == 0:
            dec += [f"{r}x{r}_aux_norm", f"{r}x{r}_aux_conv"]
            _norm(sd, f"dec.{r}x{r}_aux_norm", c)
            _conv(sd, f"dec.{r}x{r}_aux_conv", c, out_ch, 3)
    return sd, enc, dec


def reference_dhariwalunet(res, label_dim, mc=192, mult=(1, 2, 3, 4), nb=3, attn_res=(32, 16, 8), out_ch=3, in_ch=3):
    """(state-dict shapes, enc names, dec names) of EDM's DhariwalUNet without augmentation."""
    sd, enc, dec = {}, [], []
    emb = mc * 4
    blk = dict(adaptive=True, resample_proj=False)
    _linear(sd, "map_layer0", mc, emb)
    _linear(sd, "map_layer1", emb, emb)
    if label_dim:
        _linear(sd, "map_label", label_dim, emb, bias=False)
    c, skips = in_ch, []
    for lvl, m in enumerate(mult):
        r = res >> lvl
        if lvl == 0:
            enc.append(f"{r}x{r}_conv"); _conv(sd, f"enc.{enc[-1]}", c, mc * m, 3); c = mc * m
        else:
            enc.append(f"{r}x{r}_down"); _block(sd, f"enc.{enc[-1]}", c, c, emb, attn=False, taps=2, **blk)
        skips.append(c)
        for i in range(nb):
            enc.append(f"{r}x{r}_block{i}")
            _block(sd, f"enc.{enc[-1]}", c, mc * m, emb, attn=r in attn_res, **blk); c = mc * m; skips.append(c)
    for lvl in reversed(range(len(mult))):
        r = res >> lvl
        if lvl == len(mult) - 1:
            dec += [f"{r}x{r}_in0", f"{r}x{r}_in1"]
            _block(sd, f"dec.{r}x{r}_in0", c, c, emb, attn=True, **blk)
            _block(sd, f"dec.{r}x{r}_in1", c, c, emb, **blk)
        else:
            dec.append(f"{r}x{r}_up"); _block(sd, f"dec.{dec[-1]}", c, c, emb, taps=2, **blk)
        for i in range(nb + 1):
            cin = c + skips.pop(); c = mc * mult[lvl]
            dec.append(f"{r}x{r}_block{i}")
            _block(sd, f"dec.{dec[-1]}", cin, c, emb, attn=r in attn_res, **blk)
    _norm(sd, "out_norm", c)
    _conv(sd, "out_conv", c, out_ch, 3)
    return sd, enc, dec


# Architectures per EDM train.py (--arch ddpmpp/adm) and README's table of training options:
# CIFAR-10 DDPM++: cbase 128, cres 2,2,2, 4 blocks, attention at 16, augment_dim 9;
# FFHQ-64 DDPM++: --cres=1,2,2,2; ImageNet-64 ADM: cbase 192, cres 1,2,3,4, --augment=0.
REFERENCE = {
    "edm-cifar10-32x32-cond-vp.pkl": lambda: reference_songunet(32, 10, 9, 128, [2, 2, 2]),
    "edm-cifar10-32x32-uncond-vp.pkl": lambda: reference_songunet(32, 0, 9, 128, [2, 2, 2]),
    "edm-ffhq-64x64-uncond-vp.pkl": lambda: reference_songunet(64, 0, 9, 128, [1, 2, 2, 2]),
    "edm-imagenet-64x64-cond-adm.pkl": lambda: reference_dhariwalunet(64, 1000),
}

# Exact parameter counts: the sum over the reference layers above (closed form per layer); these
# integers are the authority. As a loose cross-check they are compared with the model sizes EDM
# reports in millions (paper appendix, hyperparameter table: ~55.7M CIFAR-10 DDPM++, ~61.8M
# FFHQ/AFHQ DDPM++, ~295.9M ImageNet ADM; figures quoted from the paper, not re-derived here).
EXPECTED_PARAMS = {
    "edm-cifar10-32x32-cond-vp.pkl": 55_735_299,
    "edm-cifar10-32x32-uncond-vp.pkl": 55_733_891,
    "edm-ffhq-64x64-uncond-vp.pkl": 61_805_571,
    "edm-imagenet-64x64-cond-adm.pkl": 295_899_267,
}
PAPER_MPARAMS = {
    "edm-cifar10-32x32-cond-vp.pkl": 55.73,
    "edm-cifar10-32x32-uncond-vp.pkl": 55.73,
    "edm-ffhq-64x64-uncond-vp.pkl": 61.80,
    "edm-imagenet-64x64-cond-adm.pkl": 295.90,
}


def _numel(shape):
    return math.prod(shape)


def _reference_param_count(ref_sd):
    return sum(_numel(s) for k, s in ref_sd.items() if not k.endswith(BUFFER_NAMES))


@pytest.fixture(scope="module")
def meta_presets():
    return {name: build_preset(name, device="meta") for name in PRESETS}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count(name, meta_presets):
    ref_sd, _, _ = REFERENCE[name]()
    assert _reference_param_count(ref_sd) == EXPECTED_PARAMS[name]
    assert count_parameters(meta_presets[name]) == EXPECTED_PARAMS[name]
    assert abs(EXPECTED_PARAMS[name] / 1e6 - PAPER_MPARAMS[name]) < 0.01


@pytest.mark.parametrize("name", PRESETS)
def test_preset_state_dict_matches_reference(name, meta_presets):
    net = meta_presets[name]
    ref_sd, enc, dec = REFERENCE[name]()
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    want = {f"model.{k}": v for k, v in ref_sd.items()}
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    # Encoder/decoder entries in EDM's order (the forward pass walks them in this order).
    assert list(net.model.enc.keys()) == enc
    assert list(net.model.dec.keys()) == dec


def test_preset_spot_shapes(meta_presets):
    """Hand-checked entries (widths worked out from the EDM configurations by hand)."""
    sd = {k: tuple(v.shape) for k, v in meta_presets["edm-cifar10-32x32-cond-vp.pkl"].state_dict().items()}
    expect = {
        "model.map_label.weight": (128, 10),
        "model.map_label.bias": (128,),
        "model.map_augment.weight": (128, 9),
        "model.map_layer0.weight": (512, 128),
        "model.map_layer1.weight": (512, 512),
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
        "model.enc.32x32_block0.affine.weight": (256, 512),
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.dec.8x8_in0.qkv.weight": (768, 256, 1, 1),
        "model.dec.8x8_block0.conv0.weight": (256, 512, 3, 3),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "model.dec.16x16_block4.proj.weight": (256, 256, 1, 1),
        "model.dec.32x32_block4.conv0.weight": (256, 384, 3, 3),
        "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
        "model.dec.32x32_aux_conv.bias": (3,),
    }
    assert {k: sd.get(k) for k in expect} == expect
    for absent in ["model.map_augment.bias", "model.enc.32x32_block1.skip.weight",
                   "model.enc.32x32_block0.qkv.weight", "model.dec.8x8_in1.qkv.weight",
                   "model.dec.16x16_block3.qkv.weight", "model.map_noise.freqs"]:
        assert absent not in sd
    assert "model.map_label.weight" not in meta_presets["edm-cifar10-32x32-uncond-vp.pkl"].state_dict()

    sd = {k: tuple(v.shape) for k, v in meta_presets["edm-ffhq-64x64-uncond-vp.pkl"].state_dict().items()}
    assert sd["model.enc.64x64_conv.weight"] == (128, 3, 3, 3)
    assert sd["model.dec.64x64_block0.conv0.weight"] == (128, 384, 3, 3)
    assert sd["model.dec.64x64_block4.conv0.weight"] == (128, 256, 3, 3)
    assert sd["model.dec.64x64_aux_conv.weight"] == (3, 128, 3, 3)

    sd = {k: tuple(v.shape) for k, v in meta_presets["edm-imagenet-64x64-cond-adm.pkl"].state_dict().items()}
    expect = {
        "model.map_layer0.weight": (768, 192),
        "model.map_label.weight": (768, 1000),
        "model.enc.64x64_conv.weight": (192, 3, 3, 3),
        "model.enc.64x64_block0.affine.weight": (384, 768),
        "model.enc.32x32_down.skip.resample_filter": (1, 1, 2, 2),
        "model.enc.32x32_block0.qkv.weight": (1152, 384, 1, 1),
        "model.enc.8x8_block2.qkv.weight": (2304, 768, 1, 1),
        "model.dec.64x64_block0.conv0.weight": (192, 576, 3, 3),
        "model.dec.64x64_block3.conv0.weight": (192, 384, 3, 3),
        "model.dec.32x32_block0.qkv.weight": (1152, 384, 1, 1),
        "model.out_norm.weight": (192,),
        "model.out_conv.weight": (3, 192, 3, 3),
    }
    assert {k: sd.get(k) for k in expect} == expect
    for absent in ["model.map_label.bias", "model.map_augment.weight", "model.enc.32x32_down.skip.weight",
                   "model.enc.64x64_block0.qkv.weight", "model.dec.64x64_block0.qkv.weight"]:
        assert absent not in sd


def test_ncsnpp_fourier_and_residual_encoder_names():
    net = build_preset("edm-cifar10-32x32-cond-ve.pkl", device="meta")
    ref_sd, enc, dec = reference_songunet(32, 10, 9, 128, [2, 2, 2], cmn=2, fourier=True, encoder="residual", taps=4)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == {f"model.{k}": v for k, v in ref_sd.items()}
    assert list(net.model.enc.keys()) == enc and list(net.model.dec.keys()) == dec
    assert got["model.map_noise.freqs"] == (128,)
    assert got["model.enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)
    assert got["model.enc.8x8_aux_residual.resample_filter"] == (1, 1, 4, 4)
    # Buffers are persistent exactly where EDM has them.
    assert "model.map_noise.freqs" in dict(net.named_buffers())


def test_preset_kwargs_are_edms():
    kw = EDM_PRESET_KWARGS["edm-cifar10-32x32-cond-vp.pkl"]
    assert kw["model_type"] == "SongUNet" and kw["channel_mult"] == [2, 2, 2] and kw["model_channels"] == 128
    assert kw["dropout"] == 0.13 and kw["augment_dim"] == 9 and kw["label_dim"] == 10
    assert kw["embedding_type"] == "positional" and kw["resample_filter"] == [1, 1]
    ffhq = EDM_PRESET_KWARGS["edm-ffhq-64x64-uncond-vp.pkl"]
    assert ffhq["channel_mult"] == [1, 2, 2, 2] and ffhq["dropout"] == 0.05 and ffhq["img_resolution"] == 64
    adm = EDM_PRESET_KWARGS["edm-imagenet-64x64-cond-adm.pkl"]
    assert adm["model_type"] == "DhariwalUNet" and adm["model_channels"] == 192
    assert adm["channel_mult"] == [1, 2, 3, 4] and "augment_dim" not in adm and adm["label_dim"] == 1000


# ------------------------------------------------------------------------------------------
# Tiny networks: forward behaviour.
# ------------------------------------------------------------------------------------------

def _jitter_(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised output layers no longer hide the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def _tiny_unet(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "song":
        return SongUNet(16, 3, 3, label_dim=10, augment_dim=9, model_channels=32, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[8], dropout=0.1, **kw)
    return DhariwalUNet(16, 3, 3, label_dim=10, augment_dim=9, model_channels=32, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[8], dropout=0.1)


@pytest.mark.parametrize("kind", ["song", "adm"])
def test_tiny_unet_forward(kind):
    net = _jitter_(_tiny_unet(kind)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    c_noise = torch.randn(4, generator=g)
    y = torch.eye(10)[[0, 1, 2, 3]]
    with torch.no_grad():
        a = net(x, c_noise, y)
        b = net(x, c_noise, y)
        other = net(x, c_noise, torch.eye(10)[[4, 5, 6, 7]])
        aug = net(x, c_noise, y, augment_labels=torch.randn(4, 9, generator=g))
        same = net(x, c_noise, y, extra_emb=torch.zeros(1, net.emb_channels))
        moved = net(x, c_noise, y, extra_emb=torch.ones(1, net.emb_channels))
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)                       # deterministic in eval mode
    assert (a - other).abs().amax() > 1e-4         # class labels matter
    assert (a - aug).abs().amax() > 1e-4           # augmentation labels matter
    assert torch.equal(a, same)                    # zero extra_emb is exactly EDM's forward
    assert (a - moved).abs().amax() > 1e-4
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, c_noise, y), a)   # dropout active in training


@pytest.mark.parametrize("encoder_type", ["standard", "skip", "residual"])
@pytest.mark.parametrize("decoder_type", ["standard", "skip"])
def test_songunet_all_encoder_decoder_types(encoder_type, decoder_type):
    net = SongUNet(16, 3, 2, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                   embedding_type="fourier", channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                   encoder_type=encoder_type, decoder_type=decoder_type).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 16, 16), torch.randn(2), None)
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()
    aux = [k for k in net.dec.keys() if "aux_conv" in k]
    assert aux == (["4x4_aux_conv", "8x8_aux_conv", "16x16_aux_conv"] if decoder_type == "skip" else ["16x16_aux_conv"])


def test_resampling_filters():
    x = torch.randn(2, 5, 8, 8)
    down = Conv2d(5, 5, kernel=0, down=True, resample_filter=[1, 1])
    up = Conv2d(5, 5, kernel=0, up=True, resample_filter=[1, 1])
    assert "resample_filter" in down.state_dict() and list(down.state_dict()) == ["resample_filter"]
    assert torch.allclose(down(x), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(up(x), F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)
    smooth = Conv2d(5, 5, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    const = torch.full((1, 5, 8, 8), 2.0)
    assert torch.allclose(smooth(const)[..., 1:-1, 1:-1], torch.full((1, 5, 2, 2), 2.0))
    plain = Conv2d(5, 7, kernel=3)
    assert set(plain.state_dict()) == {"weight", "bias"}  # no buffer without resampling


# ------------------------------------------------------------------------------------------
# Preconditioners.
# ------------------------------------------------------------------------------------------

def test_edm_precond_equation_and_labels():
    net = _jitter_(build_preset("tiny-songunet-16")).eval()
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.01, 1.0, 40.0])
    y = torch.eye(10)[[1, 2, 3]]
    with torch.no_grad():
        d = net(x, sigma, y)
        c_skip, c_out, c_in, c_noise = net.scalings(sigma.reshape(-1, 1, 1, 1))
        f = net.model(c_in * x, c_noise.flatten(), y)
    sd = 0.5
    assert torch.allclose(c_skip.flatten(), sd**2 / (sigma**2 + sd**2))
    assert torch.allclose(c_out.flatten(), sigma * sd / (sigma**2 + sd**2).sqrt())
    assert torch.allclose(c_in.flatten(), 1 / (sigma**2 + sd**2).sqrt())
    assert torch.allclose(c_noise.flatten(), sigma.log() / 4)
    assert torch.equal(d, c_skip * x + c_out * f)
    with torch.no_grad():  # no labels on a conditional net = the all-zero label
        assert torch.equal(net(x, sigma), net(x, sigma, torch.zeros(3, 10)))
    assert torch.equal(net.round_sigma(torch.tensor(0.3)), torch.tensor(0.3))


def test_fp16_flag_is_ignored_on_cpu():
    kw = dict(EDM_PRESET_KWARGS["tiny-adm-16"], use_fp16=True)
    net = build_network("EDMPrecond", kw).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), torch.eye(10)[:2])
    assert out.dtype == torch.float32


def test_vp_ve_iddpm_preconds():
    common = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4], dropout=0.0)
    vp = VPPrecond(**common).eval()
    t = torch.tensor([0.1, 0.5, 1.0])
    assert torch.allclose(vp.sigma_inv(vp.sigma(t)), t, atol=1e-5)
    assert vp.sigma_min == pytest.approx(float(vp.sigma(1e-5))) and vp.sigma_max == pytest.approx(float(vp.sigma(1.0)))
    c_skip, c_out, c_in, c_noise = vp.scalings(torch.tensor([2.0]))
    assert c_skip.item() == 1 and c_out.item() == -2 and c_in.item() == pytest.approx(1 / math.sqrt(5))
    ve = VEPrecond(**common).eval()
    c_skip, c_out, c_in, c_noise = ve.scalings(torch.tensor([2.0]))
    assert (c_skip.item(), c_out.item(), c_in.item(), c_noise.item()) == (1.0, 2.0, 1.0, 0.0)
    idd = iDDPMPrecond(**{**common, "model_type": "SongUNet"}).eval()
    assert idd.model.out_channels == 6 and idd.u.shape == (1001,)
    assert idd.sigma_max > 50 and 0 < idd.sigma_min < 0.01
    s = idd.round_sigma(torch.tensor([1.0, 10.0]))
    assert all((idd.u - v).abs().min() == 0 for v in s)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for net in (vp, ve, idd):
            assert net(x, torch.tensor([0.5, 5.0])).shape == x.shape


# ------------------------------------------------------------------------------------------
# Registry.
# ------------------------------------------------------------------------------------------

def test_build_network_unknown_class():
    with pytest.raises(ApctlError, match="NoSuchPrecond") as info:
        build_network("NoSuchPrecond", {})
    assert "EDMPrecond" in str(info.value)  # names the supported classes too


def test_build_network_names_and_bad_kwargs():
    kw = EDM_PRESET_KWARGS["tiny-songunet-16"]
    a = build_network("training.networks.EDMPrecond", kw, device="meta")
    assert isinstance(a, EDMPrecond) and isinstance(a.model, SongUNet)
    unet = build_network("DhariwalUNet", dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]), device="meta")
    assert isinstance(unet, DhariwalUNet)
    with pytest.raises(ApctlError, match="EDMPrecond"):
        build_network("EDMPrecond", dict(kw, not_an_arg=1), device="meta")
    with pytest.raises(ApctlError, match="model_type"):
        build_network("EDMPrecond", dict(kw, model_type="Transformer"), device="meta")


# ------------------------------------------------------------------------------------------
# Two-time student.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-songunet-16", "tiny-adm-16"])
def test_two_time_equals_teacher_at_init(preset):
    teacher = _jitter_(build_preset(preset)).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = TwoTimeDenoiser.from_teacher(teacher).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 16, 16, generator=g) * 2
    t = torch.tensor([0.02, 0.5, 3.0, 80.0])
    y = torch.eye(10)[[0, 3, 5, 9]]
    with torch.no_grad():
        ref = teacher(x, t, y)
        for s in [torch.zeros(4), t * 0.5, t, torch.full((4,), 0.002), torch.full((4,), 79.0)]:
            assert torch.equal(student(x, t, s, y), ref)
    # The teacher was copied, not shared or modified.
    assert all(p_s is not p_t for p_s, p_t in zip(student.net.parameters(), teacher.parameters()))
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())

    # Once the s-embedding's zero-initialised last layer moves, the output depends on s.
    with torch.no_grad():
        student.s_embedding.last_layer.weight.normal_(0, 0.5)
        student.s_embedding.last_layer.bias.normal_(0, 0.5)
        a = student(x, t, t * 0.1, y)
        b = student(x, t, t * 0.9, y)
    assert (a - b).abs().amax() > 1e-4


def test_two_time_state_dict_and_teacher_load():
    teacher = build_preset("tiny-songunet-16")
    student = TwoTimeDenoiser.from_teacher(teacher)
    t_keys = set(teacher.state_dict())
    s_keys = set(student.state_dict())
    extra = s_keys - {f"net.{k}" for k in t_keys}
    assert {f"net.{k}" for k in t_keys} <= s_keys
    assert extra == {"s_embedding.layer0.weight", "s_embedding.layer0.bias",
                     "s_embedding.layer1.weight", "s_embedding.layer1.bias"}
    assert student.s_embedding.layer1.weight.shape == (128, 128)   # UNet embedding width = 32·4
    assert torch.count_nonzero(student.s_embedding.layer1.weight) == 0
    # A teacher's (EDM-format) state dict loads into the wrapped network strictly.
    other = _jitter_(build_preset("tiny-songunet-16"), seed=7)
    student.net.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(student.net.model.map_layer0.weight, other.model.map_layer0.weight)
    # Whole-student round trip, and rebuilding from kwargs for resume.
    again = TwoTimeDenoiser.from_init_kwargs(student.init_kwargs)
    again.load_state_dict(student.state_dict(), strict=True)
    assert all(p.requires_grad for p in student.parameters())


def test_two_time_fourier_base_and_rejects_other_preconds():
    kw = dict(img_resolution=8, img_channels=3, model_type="SongUNet", embedding_type="fourier",
              channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1],
              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    student = TwoTimeDenoiser.from_teacher(EDMPrecond(**kw))
    assert "s_embedding.embed.freqs" in student.state_dict()
    with torch.no_grad():
        out = student(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    assert out.shape == (2, 3, 8, 8)
    vp = VPPrecond(**{k: v for k, v in kw.items()})
    with pytest.raises(ApctlError, match="EDMPrecond"):
        TwoTimeDenoiser.from_teacher(vp)


# ------------------------------------------------------------------------------------------
# The two-time MLP (toy2d's student) and its input gain.
# ------------------------------------------------------------------------------------------

def test_mlp_input_gain_is_a_scaled_first_layer():
    """D_θ with input gain g equals D_θ with gain 1 whose first-layer weights on x are g× larger (the
    contract in networks/mlp.py), at every (t, s); and at initialisation either is c_skip(t)·x."""
    from apctl.networks.mlp import TwoTimeMLP
    from apctl.schedules import SIGMA_DATA, c_skip

    torch.manual_seed(0)
    gained = TwoTimeMLP((2,), hidden=16, depth=3, embed_dim=8, input_gain=30.0)
    plain = TwoTimeMLP((2,), hidden=16, depth=3, embed_dim=8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g)
    t = torch.tensor([0.002, 0.1, 0.5, 2.0, 20.0, 80.0])
    s = t * torch.rand(6, generator=g)
    with torch.no_grad():
        assert torch.allclose(gained(x, t, s), c_skip(t[:, None], SIGMA_DATA) * x, rtol=0, atol=0)
        for p in gained.parameters():
            p.normal_(0, 0.3)
        plain.load_state_dict(gained.state_dict())
        plain.body[0].weight[:, :2] *= 30.0
        assert torch.allclose(gained(x, t, s), plain(x, t, s), rtol=1e-5, atol=1e-6)
        plain.load_state_dict(gained.state_dict())                 # the same weights without the gain differ
        assert (gained(x, t, s) - plain(x, t, s)).abs().amax() > 1e-2


def test_mlp_architecture_records_the_gain_and_old_checkpoints_rebuild_with_gain_one():
    """student_architecture saves student.input_gain; an architecture saved before the key existed builds
    the gain-1 network it was trained as."""
    from apctl.config import StudentConfig
    from apctl.networks.student import build_student, student_architecture

    arch = student_architecture(StudentConfig(kind="mlp", hidden=8, depth=2, embed_dim=4, input_gain=7.5), (2,), 0)
    assert arch["input_gain"] == 7.5 and build_student(arch).input_gain == 7.5
    del arch["input_gain"]
    assert build_student(arch).input_gain == 1.0


def test_mlp_relu_activation_is_the_stated_formula():
    """student.activation = "relu": F_θ = head(relu(W_d … relu(W_1·[g·c_in·x, emb(t), emb(s)] + b_1) … + b_d)),
    written out by hand from the module's weights, and D_θ = c_skip·x + c_out·F_θ."""
    from apctl.networks.mlp import TwoTimeMLP
    from apctl.schedules import SIGMA_DATA, c_in, c_noise, c_out, c_skip

    torch.manual_seed(0)
    net = TwoTimeMLP((2,), hidden=16, depth=3, embed_dim=8, input_gain=5.0, activation="relu")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=g)
    t = torch.tensor([0.002, 0.1, 0.5, 2.0, 20.0, 80.0])
    s = t * torch.rand(6, generator=g)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
        h = torch.cat([5.0 * c_in(t[:, None], SIGMA_DATA) * x, net.embed(c_noise(t)), net.embed(c_noise(s))], dim=1)
        for layer in net.body[0::2]:
            h = torch.clamp(h @ layer.weight.T + layer.bias, min=0.0)
        expected = c_skip(t[:, None], SIGMA_DATA) * x + c_out(t[:, None], SIGMA_DATA) * (h @ net.head.weight.T + net.head.bias)
        assert torch.allclose(net(x, t, s), expected, rtol=1e-5, atol=1e-6)
        silu = TwoTimeMLP((2,), hidden=16, depth=3, embed_dim=8, input_gain=5.0)
        silu.load_state_dict(net.state_dict())                     # the same weights under SiLU differ
        assert (silu(x, t, s) - net(x, t, s)).abs().amax() > 1e-2


def test_mlp_architecture_records_the_activation_and_old_checkpoints_rebuild_with_silu():
    from apctl.config import StudentConfig
    from apctl.networks.student import build_student, student_architecture

    arch = student_architecture(StudentConfig(kind="mlp", hidden=8, depth=2, embed_dim=4, activation="relu"), (2,), 0)
    assert arch["activation"] == "relu" and isinstance(build_student(arch).body[1], torch.nn.ReLU)
    del arch["activation"]
    assert isinstance(build_student(arch).body[1], torch.nn.SiLU)
