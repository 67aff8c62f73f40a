"""Teacher import: EDM pickles read without executing them, apctl's safetensors format, the CLI."""

from __future__ import annotations

import copyreg
import hashlib
import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from apctl.errors import ApctlError
from apctl.networks import build_network, build_preset
from apctl.safe_pickle import referenced_globals, restricted_load
from apctl.teachers import edm_pickle as ep
from apctl.teachers.edm_pickle import parse_edm_pickle, read_edm_pickle
from apctl.teachers.apctl_format import save_teacher
from apctl.teachers.bundle import compute_fingerprint
from apctl.teachers.importers import load_teacher
from apctl.teachers.openai_adm import adm_to_dhariwal_state_dict

from edm_pickle_fixtures import (
    adm_forward,
    adm_state_dict,
    build_on_global_pickle,
    edm_pickle_bytes,
    extension_code_pickle,
    hostile_pickles,
    marker_source,
)

ENV_MARKER = "APCTL_TEST_MODULE_SRC_EXECUTED"


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    from apctl.networks import EDM_PRESET_KWARGS

    def without_edm_sigmas(preset):
        return {k: v for k, v in EDM_PRESET_KWARGS[preset].items() if k not in ("sigma_min", "sigma_max", "sigma_data")}

    builders = {
        "tiny-songunet-16": lambda: build_preset("tiny-songunet-16"),
        "tiny-adm-16": lambda: build_preset("tiny-adm-16"),
        "tiny-vp": lambda: build_network("VPPrecond", without_edm_sigmas("tiny-songunet-16-uncond")),
        "tiny-iddpm": lambda: build_network("iDDPMPrecond", without_edm_sigmas("tiny-adm-16")),
    }
    out = {}
    for preset, build in builders.items():
        net = build().eval()
        with torch.no_grad():  # non-trivial weights everywhere (EDM zero-initialises some convs)
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        out[preset] = net
    return out


@pytest.fixture()
def marker(tmp_path):
    path = tmp_path / "module_src_ran"
    os.environ.pop(ENV_MARKER, None)
    yield path
    assert not path.exists(), "embedded code was executed"
    assert ENV_MARKER not in os.environ, "embedded code was executed"


def write_pickle(tmp_path, net, marker, name="net.pkl", **kw):
    src = marker_source(str(marker), ENV_MARKER)
    path = tmp_path / name
    path.write_bytes(edm_pickle_bytes(net, module_src=src, **kw))
    return path, src


def sample_inputs(net):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, net.img_channels, net.img_resolution, net.img_resolution, generator=gen)
    sigma = torch.tensor([0.02, 1.0, 40.0])
    labels = torch.eye(net.label_dim)[[0, 3, 7]] if net.label_dim else None
    return x, sigma, labels


# --- the fixture itself ---------------------------------------------------------------------


def test_fixture_is_a_real_edm_pickle_that_needs_torch_utils(nets, tmp_path, marker):
    assert importlib.util.find_spec("torch_utils") is None and importlib.util.find_spec("dnnlib") is None
    path, src = write_pickle(tmp_path, nets["tiny-songunet-16"], marker, protocol=4)
    data = path.read_bytes()
    names = set(referenced_globals(data))
    assert ("torch_utils.persistence", "_reconstruct_persistent_obj") in names
    assert {("torch.storage", "_load_from_bytes"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"), ("torch.nn.modules.container", "ModuleDict"),
            ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")} <= names
    assert data.count(src.encode()) == 1  # one source text, memoized, as EDM's files
    with pytest.raises(ModuleNotFoundError, match="torch_utils"):
        pickle.loads(data)  # the ordinary way fails here (and would exec module_src where it works)


def test_marker_source_would_leave_a_trace_if_executed(tmp_path):
    other = tmp_path / "proof"
    exec(compile(marker_source(str(other), "APCTL_TEST_PROOF"), "<edm module_src>", "exec"), {})
    assert other.exists() and os.environ.pop("APCTL_TEST_PROOF") == "1"


# --- EDM pickles ------------------------------------------------------------------------------

VARIANTS = {
    "songunet-p4": dict(preset="tiny-songunet-16", protocol=4),
    "songunet-p2-torch112-numpy1": dict(preset="tiny-songunet-16", protocol=2, ordered=True, numpy1=True,
                                        easydict=True),
    "adm-p4-torch112-easydict": dict(preset="tiny-adm-16", protocol=4, ordered=True, easydict=True),
    "adm-p2": dict(preset="tiny-adm-16", protocol=2),
    "vp-songunet-p4": dict(preset="tiny-vp", protocol=4),
    "iddpm-adm-p4": dict(preset="tiny-iddpm", protocol=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_edm_pickle_round_trip(variant, nets, tmp_path, marker):
    cfg = dict(VARIANTS[variant])
    net = nets[cfg.pop("preset")]
    path, src = write_pickle(tmp_path, net, marker, **cfg)
    data = path.read_bytes()
    names = set(referenced_globals(data))
    if cfg["protocol"] == 2:
        assert ("__builtin__", "set") in names and ("_codecs", "encode") in names
    if cfg.get("numpy1"):
        assert ("numpy.core.multiarray", "scalar") in names
    if cfg.get("easydict"):
        assert ("dnnlib.util", "EasyDict") in names

    bundle = load_teacher(path)
    assert bundle.source_format == "edm-pickle"
    assert bundle.arch == {"class_name": type(net).__name__, "init_kwargs": net.init_kwargs}
    assert "noise_label_scale" not in bundle.arch["init_kwargs"]  # EDM's kwargs, nothing added
    assert not bundle.network.training
    source = net.state_dict()
    imported = bundle.network.state_dict()
    assert list(imported) == list(source)
    for key, value in source.items():
        assert torch.equal(imported[key], value), key
    digest = hashlib.sha256(src.encode()).hexdigest()
    assert set(bundle.module_src_sha256.values()) == {digest}
    assert {type(net).__name__, "UNetBlock", "Conv2d", "EDMLoss", "AugmentPipe"} <= set(bundle.module_src_sha256)
    assert bundle.extras["persistence_version"] == [6]
    assert bundle.extras["loss_fn"]["class_name"] == "EDMLoss"
    assert bundle.extras["augment_pipe"]["attributes"]["scale"] == 1.0
    assert bundle.extras["dataset_kwargs"]["max_size"] == 100
    x, sigma, labels = sample_inputs(net)
    with torch.no_grad():
        assert torch.equal(bundle.network(x, sigma, labels), net(x, sigma, labels))


def test_sub_module_numpy_scalars_are_reconstructed(nets, tmp_path, marker):
    path, _ = write_pickle(tmp_path, nets["tiny-songunet-16"], marker, protocol=4)
    top = restricted_load(path.read_bytes(), ep.edm_allowlist(), what="test")
    block = top["ema"].state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["16x16_block0"]
    assert isinstance(block, ep.PersistentObject) and block.class_name == "UNetBlock"
    skip_scale = block.state["_init_kwargs"]["skip_scale"]
    assert isinstance(skip_scale, np.float64) and skip_scale == pytest.approx(np.sqrt(0.5))


def test_missing_weight_is_refused(nets, tmp_path, marker):
    net = nets["tiny-songunet-16"]
    path, _ = write_pickle(tmp_path, net, marker)
    top = restricted_load(path.read_bytes(), ep.edm_allowlist(), what="test")
    contents = read_edm_pickle(path)
    assert contents.class_name == "EDMPrecond" and contents.init_kwargs == net.init_kwargs
    assert contents.init_args == () and list(contents.state_dict) == list(net.state_dict())
    del contents.state_dict["model.map_layer0.bias"]
    from apctl.teachers.rebuild import build_and_load

    with pytest.raises(ApctlError, match="1 missing .*model.map_layer0.bias") as exc:
        build_and_load("EDMPrecond", contents.init_kwargs, contents.state_dict, "test")
    one_line(exc)
    assert top["ema"].class_name == "EDMPrecond"


# --- hostile pickles --------------------------------------------------------------------------


HOSTILE = list(hostile_pickles("/nonexistent"))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_pickle_is_refused_naming_the_global(case, tmp_path):
    marker = tmp_path / "pwned"
    data, name = hostile_pickles(str(marker))[case]
    sys.modules.pop("apctl_hostile_marker", None)
    with pytest.raises(ApctlError) as exc:
        parse_edm_pickle(data)
    assert name in one_line(exc)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(ApctlError) as exc:
        load_teacher(path)
    msg = one_line(exc)
    assert name in msg and str(path) in msg
    assert not marker.exists()
    assert "apctl_hostile_marker" not in sys.modules


def test_hostile_payloads_would_run_without_the_allowlist(tmp_path):
    """The payloads are live: plain pickle.loads does create the marker (checked on a harmless one)."""
    marker = tmp_path / "proof"
    data, _ = hostile_pickles(str(marker))["builtins.eval"]
    pickle.loads(data)
    assert marker.exists()


def test_static_scan_sees_through_stack_tricks():
    cases = hostile_pickles("/x")
    for case in ("STACK_GLOBAL from memoized strings", "STACK_GLOBAL behind popped decoys",
                 "STACK_GLOBAL from Python 2 strings", "INST os.system"):
        assert referenced_globals(cases[case][0]) == [("os", "system")], case


def test_build_on_an_allowlisted_global_is_refused():
    defaults = ep._rebuild_parameter.__defaults__
    with pytest.raises(ApctlError, match=r"set attributes on torch\._utils\._rebuild_parameter") as exc:
        parse_edm_pickle(build_on_global_pickle())
    one_line(exc)
    assert ep._rebuild_parameter.__defaults__ == defaults


def test_extension_codes_are_resolved_or_refused():
    code = 0x7A11
    copyreg.add_extension("os", "system", code)
    try:
        assert referenced_globals(extension_code_pickle(code)) == [("os", "system")]
        with pytest.raises(ApctlError, match=r"os\.system"):
            parse_edm_pickle(extension_code_pickle(code))
    finally:
        copyreg.remove_extension("os", "system", code)
    with pytest.raises(ApctlError, match="extension code"):
        parse_edm_pickle(extension_code_pickle(code))


def test_storage_bytes_go_through_weights_only_load(tmp_path):
    evil = hostile_pickles(str(tmp_path / "pwned"))["builtins.eval"][0]
    with pytest.raises(ApctlError, match="storage is unreadable") as exc:
        ep._load_storage(evil)
    one_line(exc)
    assert not (tmp_path / "pwned").exists()
    import io

    buf = io.BytesIO()
    torch.save({"not": "a storage"}, buf, _use_new_zipfile_serialization=False)
    with pytest.raises(ApctlError, match="not a storage"):
        ep._load_storage(buf.getvalue())


def test_numpy_object_scalars_are_refused():
    with pytest.raises(ApctlError, match="object scalars"):
        ep._numpy_scalar(np.dtype("O"), b"\0" * 8)


# --- apctl format, fingerprint ----------------------------------------------------------------


def test_safetensors_round_trip_and_fingerprint(nets, tmp_path, marker):
    net = nets["tiny-adm-16"]
    pkl, _ = write_pickle(tmp_path, net, marker)
    bundle = load_teacher(pkl)
    weights, meta_path = save_teacher(bundle, tmp_path / "teacher.safetensors")
    assert weights.name == "teacher.safetensors" and meta_path.name == "teacher.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == 1 and meta["class_name"] == "EDMPrecond"
    # strict JSON: EDM's sigma_max = inf is the string "inf", which the reader turns back into the float
    assert meta["init_kwargs"] == dict(net.init_kwargs, sigma_max="inf") and net.init_kwargs["sigma_max"] == float("inf")
    assert meta["source"] == {"format": "edm-pickle", "file": "net.pkl"}
    assert meta["source_sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert meta["fingerprint"] == bundle.fingerprint

    for given in (weights, meta_path):
        again = load_teacher(given)
        assert again.source_format == "apctl" and again.fingerprint == bundle.fingerprint
        assert again.source_sha256 == meta["source_sha256"] and again.module_src_sha256 == bundle.module_src_sha256
    x, sigma, labels = sample_inputs(net)
    with torch.no_grad():
        assert torch.equal(again.network(x, sigma, labels), net(x, sigma, labels))

    # re-saving an apctl teacher keeps the fingerprint and the provenance
    w2, j2 = save_teacher(again, tmp_path / "copy.safetensors")
    assert json.loads(j2.read_text())["source_sha256"] == meta["source_sha256"]
    assert load_teacher(w2).fingerprint == bundle.fingerprint

    # the fingerprint follows the weights and the architecture, not dict order
    sd = dict(net.state_dict())
    arch = bundle.arch
    assert compute_fingerprint(sd, arch) == bundle.fingerprint
    assert compute_fingerprint(dict(reversed(list(sd.items()))), arch) == bundle.fingerprint
    changed = dict(sd)
    changed["model.out_conv.bias"] = sd["model.out_conv.bias"].clone()
    changed["model.out_conv.bias"][0] += 1e-3
    assert compute_fingerprint(changed, arch) != bundle.fingerprint
    assert compute_fingerprint(sd, {**arch, "init_kwargs": {**arch["init_kwargs"], "sigma_data": 0.6}}) != bundle.fingerprint

    # a changed weight file no longer matches its JSON
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in changed.items()}, str(weights))
    with pytest.raises(ApctlError, match="does not match") as exc:
        load_teacher(weights)
    one_line(exc)


def test_corrupt_and_unknown_files_give_one_line(nets, tmp_path, marker):
    net = nets["tiny-songunet-16"]
    pkl, _ = write_pickle(tmp_path, net, marker)
    bundle = load_teacher(pkl)
    weights, meta_path = save_teacher(bundle, tmp_path / "teacher.safetensors")

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "trunc.json").write_text(meta_path.read_text())
    with pytest.raises(ApctlError, match="corrupt or truncated") as exc:
        load_teacher(truncated)
    assert str(truncated) in one_line(exc)

    cut_pkl = tmp_path / "cut.pkl"
    cut_pkl.write_bytes(pkl.read_bytes()[:100_000])
    with pytest.raises(ApctlError, match="not a readable pickle") as exc:
        load_teacher(cut_pkl)
    assert str(cut_pkl) in one_line(exc) and "accepted" in str(exc.value)

    for name, content in (("random.bin", bytes(range(256)) * 16), ("empty.pkl", b""), ("text.pt", b"hello world\n")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ApctlError) as exc:
            load_teacher(path)
        msg = one_line(exc)
        assert str(path) in msg and "accepted" in msg and "EDM network pickle" in msg

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    with pytest.raises(ApctlError, match="not an EDM network pickle") as exc:
        load_teacher(plain)
    assert str(plain) in one_line(exc)

    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(weights.read_bytes())
    with pytest.raises(ApctlError, match="lonely.json is missing") as exc:
        load_teacher(lonely)
    one_line(exc)

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    (tmp_path / "bad.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(ApctlError, match="not readable JSON") as exc:
        load_teacher(bad_json)
    one_line(exc)

    with pytest.raises(ApctlError, match="does not exist"):
        load_teacher(tmp_path / "nope.pkl")


# --- OpenAI ADM -------------------------------------------------------------------------------


def test_adm_mapping_matches_an_independent_adm_forward():
    mc, mult, nb, attn_ds = 128, [1, 2], 1, {2}
    adm = adm_state_dict(mc, mult, nb, attn_ds, num_classes=5)
    kwargs, mapped = adm_to_dhariwal_state_dict(adm, img_resolution=8)
    assert kwargs["attn_resolutions"] == [4] and kwargs["channel_mult"] == [1, 2] and kwargs["num_blocks"] == 1
    unet = build_network("DhariwalUNet", kwargs).eval()
    full = unet.state_dict()
    assert set(mapped) == {name for name, _ in unet.named_parameters()}
    full.update(mapped)
    unet.load_state_dict(full, strict=True)
    # with 2 and 4 heads the qkv rows really are permuted
    assert not torch.equal(mapped["dec.4x4_in0.qkv.weight"].flatten(), adm["middle_block.1.qkv.weight"].flatten())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([250 * np.log(0.5), 250 * np.log(20.0)], dtype=torch.float32)
    y = torch.tensor([1, 4])
    with torch.no_grad():
        ref = adm_forward(adm, x, t, y, mc, mult, nb, attn_ds)
        out = unet(x, t, torch.nn.functional.one_hot(y, 5).float())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# A synthetic edm_imagenet64_ema.pt: the reference ADM layout at the smallest width the mapping
# accepts (128 channels), two levels, attention at 2× downsampling, 5 classes. The file is
# imported as a 64×64 model (load_teacher's forward check runs at 64×64); the comparisons below
# feed 8×8 inputs (every layer is resolution-agnostic), which keeps them fast on a CPU.
ADM_TINY = dict(mc=128, mult=[1, 2], nb=1, attn_ds={2}, num_classes=5)


@pytest.fixture(scope="module")
def adm_teacher(tmp_path_factory):
    cfg = ADM_TINY
    adm = adm_state_dict(cfg["mc"], cfg["mult"], cfg["nb"], cfg["attn_ds"], num_classes=cfg["num_classes"])
    path = tmp_path_factory.mktemp("adm") / "edm_imagenet64_ema.pt"
    torch.save(adm, path)
    return adm, path, load_teacher(path)


def adm_reference_denoiser(adm, x, sigma, y, sigma_data=0.5):
    """D(x, σ) = c_skip x + c_out F(c_in x, 250 ln σ, y), F the reference ADM, as CTM calls its teacher."""
    cfg = ADM_TINY
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s * sigma_data / (s ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (s ** 2 + sigma_data ** 2).sqrt()
    t = 1000 * 0.25 * torch.log(sigma + 1e-44)  # CTM's rescaling_t
    F = adm_forward(adm, c_in * x, t, y, cfg["mc"], cfg["mult"], cfg["nb"], cfg["attn_ds"])
    return c_skip * x + c_out * F


ADM_SIGMAS = torch.tensor([0.002, 0.05, 0.7, 6.0, 80.0])
ADM_LABELS = torch.tensor([0, 4, 2, 1, 3])


def adm_inputs():
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(len(ADM_SIGMAS), 3, 8, 8, generator=gen)
    return (0.5 ** 2 + ADM_SIGMAS.reshape(-1, 1, 1, 1) ** 2).sqrt() * noise


def test_openai_adm_file_imports_as_the_ctm_teacher_denoiser(adm_teacher, tmp_path):
    from apctl.networks import EDMPrecond

    adm, path, bundle = adm_teacher
    net = bundle.network
    assert bundle.source_format == "openai-adm" and isinstance(net, EDMPrecond) and not net.training
    assert bundle.source == {"format": "openai-adm", "file": "edm_imagenet64_ema.pt"}
    assert bundle.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    kw = bundle.arch["init_kwargs"]
    assert bundle.arch["class_name"] == "EDMPrecond" and kw == net.init_kwargs
    assert (kw["img_resolution"], kw["img_channels"], kw["label_dim"], kw["model_type"]) == (64, 3, 5, "DhariwalUNet")
    assert kw["noise_label_scale"] == 1000.0 and kw["sigma_data"] == 0.5 and kw["use_fp16"] is False
    assert bundle.parameter_count == sum(t.numel() for t in adm.values())

    # the time label is CTM's 1000 * 0.25 * log(sigma + 1e-44), bit for bit
    sig = torch.exp(torch.linspace(-7, 5, 1001))
    assert torch.equal(net.scalings(sig)[3], 1000 * 0.25 * torch.log(sig + 1e-44))

    x, labels = adm_inputs(), torch.nn.functional.one_hot(ADM_LABELS, 5).float()
    with torch.no_grad():
        ref = adm_reference_denoiser(adm, x, ADM_SIGMAS, ADM_LABELS)
        out = net(x, ADM_SIGMAS, labels)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # the same weights with EDM's own label ln(σ)/4 are a different function
        with torch.device("meta"):
            edm_label = EDMPrecond(**{**kw, "noise_label_scale": 1.0})
        assert "noise_label_scale" not in edm_label.init_kwargs
        edm_label.load_state_dict(net.state_dict(), strict=True, assign=True)
        c_out = net.scalings(ADM_SIGMAS)[1]
        off = (edm_label.eval()(x, ADM_SIGMAS, labels) - ref).abs().flatten(1).amax(1) / c_out  # in units of F
    assert (off > 0.1).all()

    # apctl format round trip keeps the scale (JSON) and the fingerprint
    weights, meta_path = save_teacher(bundle, tmp_path / "adm.safetensors")
    meta = json.loads(meta_path.read_text())
    assert meta["init_kwargs"]["noise_label_scale"] == 1000.0 and meta["source"]["format"] == "openai-adm"
    again = load_teacher(weights)  # same fingerprint: same weights, same init_kwargs, same function
    assert again.fingerprint == bundle.fingerprint and again.network.noise_label_scale == 1000.0


def test_two_time_student_of_the_imported_adm_teacher(adm_teacher):
    from apctl.networks import TwoTimeDenoiser

    _, _, bundle = adm_teacher
    teacher = bundle.network
    student = TwoTimeDenoiser.from_teacher(teacher).eval()
    assert student.init_kwargs["noise_label_scale"] == 1000.0
    s = torch.tensor([0.0, 0.002, 0.5, 3.0, 79.0])
    # s is labelled like the teacher's t: 250 ln(max(s, s_floor)) goes into the s-embedding
    expected = 1000 * 0.25 * torch.log(s.clamp_min(student.s_floor))
    with torch.no_grad():
        assert torch.equal(student.embed_s(s), student.s_embedding(expected))
    x, labels = adm_inputs(), torch.nn.functional.one_hot(ADM_LABELS, 5).float()
    with torch.no_grad():
        want = teacher(x, ADM_SIGMAS, labels)
        assert torch.equal(student(x, ADM_SIGMAS, s, labels), want)
    with torch.device("meta"):
        resumed = TwoTimeDenoiser.from_init_kwargs(student.init_kwargs)
    assert resumed.net.noise_label_scale == 1000.0
    assert set(resumed.state_dict()) == set(student.state_dict())


def test_noise_label_scale_adds_nothing_by_default(nets):
    """EDM pickles' kwargs stay as they were (the round trips above also check this, see `VARIANTS`)."""
    from apctl.networks import EDMPrecond
    from apctl.teachers.rebuild import positional_to_kwargs

    net = nets["tiny-adm-16"]
    kw = dict(net.init_kwargs)
    assert "noise_label_scale" not in kw and net.noise_label_scale == 1.0
    with torch.device("meta"):
        assert EDMPrecond(**kw).init_kwargs == kw
        assert EDMPrecond(**kw, noise_label_scale=1).init_kwargs == kw
        scaled = EDMPrecond(**kw, noise_label_scale=1000)
    assert scaled.init_kwargs == {**kw, "noise_label_scale": 1000.0}
    assert {k: tuple(v.shape) for k, v in scaled.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in net.state_dict().items()}
    sigma = torch.tensor([0.02, 1.0, 40.0])
    assert torch.equal(net.scalings(sigma)[3], sigma.log() / 4)
    assert torch.equal(scaled.scalings(sigma)[3], 250 * sigma.log())
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="noise_label_scale"), torch.device("meta"):
            EDMPrecond(**kw, noise_label_scale=bad)
    # EDM's positional constructor arguments still bind as in EDM (the new argument is keyword-only)
    names = ["img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data",
             "model_type"]
    rest = {k: v for k, v in kw.items() if k not in names}
    assert positional_to_kwargs("EDMPrecond", tuple(kw[n] for n in names), rest) == kw


def test_adm_layouts_apctl_cannot_express_are_refused(tmp_path):
    adm = adm_state_dict(128, [1, 2], 1, {2}, num_classes=5)
    broken = dict(adm)
    broken["input_blocks.1.0.op.weight"] = torch.zeros(1)
    with pytest.raises(ApctlError, match="convolutional resampling"):
        adm_to_dhariwal_state_dict(broken)
    student = dict(adm)
    student["time_embed_s.0.weight"] = adm["time_embed.0.weight"]
    path = tmp_path / "ctm_student.pt"
    torch.save(student, path)
    with pytest.raises(ApctlError, match="CTM student") as exc:
        load_teacher(path)
    assert str(path) in one_line(exc)
    learned_sigma = dict(adm)
    learned_sigma["out.2.weight"] = torch.cat([adm["out.2.weight"]] * 2)
    learned_sigma["out.2.bias"] = torch.cat([adm["out.2.bias"]] * 2)
    path = tmp_path / "learned_sigma.pt"
    torch.save(learned_sigma, path)
    with pytest.raises(ApctlError, match="learned sigma") as exc:
        load_teacher(path)
    assert str(path) in one_line(exc)


# --- CLI --------------------------------------------------------------------------------------


def run_cli(args):
    import typer
    from typer.testing import CliRunner

    from apctl.cli.teacher import app as teacher_app

    root = typer.Typer(pretty_exceptions_enable=False)

    @root.callback()
    def _root() -> None:
        """apctl (test wrapper)."""

    root.add_typer(teacher_app, name="teacher")
    result = CliRunner().invoke(root, args, env={"COLUMNS": "200"}, prog_name="apctl")
    if isinstance(result.exception, ApctlError):  # what the lead's main wrapper does
        return 1, result.stdout, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, ""


def test_cli_import(nets, tmp_path, marker):
    pkl, src = write_pickle(tmp_path, nets["tiny-songunet-16"], marker)
    out = tmp_path / "out" / "teacher.safetensors"
    code, stdout, err = run_cli(["teacher", "import", str(pkl), "-o", str(out)])
    assert code == 0, err
    meta_path = out.with_suffix(".json")
    assert out.exists() and meta_path.exists()
    meta = json.loads(meta_path.read_text())
    n_params = sum(p.numel() for p in nets["tiny-songunet-16"].parameters())
    for text in ("edm-pickle", "EDMPrecond", f"{n_params:,}", meta["fingerprint"],
                 hashlib.sha256(src.encode()).hexdigest()[:12], str(out), str(meta_path)):
        assert text in stdout, text

    before = (out.read_bytes(), meta_path.read_bytes())
    code, _, err = run_cli(["teacher", "import", str(pkl), "-o", str(out)])
    assert code == 1 and "--force" in err and "\n" not in err
    assert (out.read_bytes(), meta_path.read_bytes()) == before

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(hostile_pickles(str(tmp_path / "pwned"))["os.system"][0])
    code, _, err = run_cli(["teacher", "import", str(bad), "-o", str(out), "--force"])
    assert code == 1 and "os.system" in err
    assert (out.read_bytes(), meta_path.read_bytes()) == before
    assert not (tmp_path / "pwned").exists()

    code, stdout, err = run_cli(["teacher", "import", str(out), "-o", str(tmp_path / "again.safetensors")])
    assert code == 0, err
    assert "apctl" in stdout and meta["fingerprint"] in stdout

    code, _, err = run_cli(["teacher", "import", str(pkl), "-o", str(out), "--force"])
    assert code == 0, err
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_cli_help():
    code, stdout, _ = run_cli(["teacher", "--help"])
    assert code == 0 and "import" in stdout


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_stack_simulation_accepts_ordinary_pickles(protocol):
    """The static scan must not reject (or misread) plain data at any protocol."""
    import codecs

    shared = ["shared", 1.5, None]
    loop: list = ["loop"]
    loop.append(loop)
    obj = {"a": (1, 2, (3,)), "b": [shared, shared], "c": {1, 2}, "d": frozenset({"x"}), "e": b"\x00\xff",
           "f": "é ü", "g": loop, "h": True, "i": 2 ** 70, "j": bytearray(b"ab")}
    allowed = {(m, n): f for m in ("builtins", "__builtin__")
               for n, f in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray), ("bytes", bytes))}
    allowed[("_codecs", "encode")] = codecs.encode
    data = pickle.dumps(obj, protocol=protocol)
    assert all(pair in allowed for pair in referenced_globals(data))
    back = restricted_load(data, allowed, what="test")
    assert back["a"] == obj["a"] and back["b"][0] is back["b"][1] and back["g"][1] is back["g"]
    assert back["c"] == {1, 2} and back["e"] == b"\x00\xff" and back["f"] == "é ü" and back["j"] == b"ab"
