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
from apctl.teachers.importers import (
    adm_to_dhariwal_state_dict,
    compute_fingerprint,
    load_teacher,
    save_teacher,
)

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
    from apctl.teachers.importers import _build_and_load

    with pytest.raises(ApctlError, match="1 missing .*model.map_layer0.bias") as exc:
        _build_and_load("EDMPrecond", contents.init_kwargs, contents.state_dict, "test")
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
    assert meta["init_kwargs"] == net.init_kwargs
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


def test_adm_state_dict_file_is_recognised_but_refused(tmp_path):
    adm = adm_state_dict(128, [1, 2], 1, {2}, num_classes=5)
    path = tmp_path / "edm_imagenet64_ema.pt"
    torch.save(adm, path)
    with pytest.raises(ApctlError, match="ADM state_dict recognised .* not importable") as exc:
        load_teacher(path)
    msg = one_line(exc)
    assert str(path) in msg and "250" in msg
    broken = dict(adm)
    broken["input_blocks.1.0.op.weight"] = torch.zeros(1)
    with pytest.raises(ApctlError, match="convolutional resampling"):
        adm_to_dhariwal_state_dict(broken)


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
