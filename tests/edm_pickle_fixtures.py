"""Write pickles in NVlabs/edm's exact persistence structure, and hostile pickles, for the tests.

Neither `torch_utils` nor `dnnlib` is importable here: the names EDM pickles refer to are written
as GLOBAL / STACK_GLOBAL opcodes by hand (`EDMStylePickler.save_global`), so the files are what
EDM's training loop writes, while nothing in this process could load them the ordinary way.
Everything else (parameters, tensors, legacy storage bytes, ModuleDict, OrderedDict, numpy
scalars, sets) is pickled by the real torch / numpy / pickle code.
"""

from __future__ import annotations

import copy
import math
import io
import pickle
import struct
import types
from collections import OrderedDict

import numpy as np
import torch

# --- names written by hand --------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):  # only its name is ever written
    raise AssertionError("never called")


class EasyDict(dict):  # pickles as dnnlib.util.EasyDict
    pass


def _numpy1_scalar(dtype, data):  # pickles as numpy.core.multiarray.scalar (numpy 1 spelling)
    raise AssertionError("never called")


FAKE_GLOBALS = {
    id(_reconstruct_persistent_obj): ("torch_utils.persistence", "_reconstruct_persistent_obj"),
    id(EasyDict): ("dnnlib.util", "EasyDict"),
    id(_numpy1_scalar): ("numpy.core.multiarray", "scalar"),
}


class PersistentStandIn:
    """A non-module persistent object (EDMLoss, AugmentPipe) with the given class name and state."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state


def marker_source(marker_path: str, env_var: str) -> str:
    """Module source that leaves a trace (a file and an environment variable) if it is ever executed."""
    return (
        "# Stand-in for training/networks.py: executing this module leaves a trace.\n"
        "import os\n"
        f"open({marker_path!r}, 'w').write('module_src was executed')\n"
        f"os.environ[{env_var!r}] = '1'\n"
        "class EDMPrecond: pass\n"
    )


class EDMStylePickler(pickle._Pickler):
    """Pickles apctl networks the way `torch_utils.persistence` pickles EDM's.

    Every module from `apctl.networks` (and every PersistentStandIn) becomes the call
    `torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta = {type, version,
    module_src, class_name, state}; `state` is the instance __dict__ with `_init_args` and
    `_init_kwargs` as the persistence decorator records them.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, protocol: int, module_src: str, *, ordered: bool = False, numpy1: bool = False):
        super().__init__(file, protocol=protocol)
        self.module_src = module_src
        self.ordered = ordered
        self.numpy1 = numpy1

    def save_global(self, obj, name=None):
        ref = FAKE_GLOBALS.get(id(obj))
        if ref is None:
            return super().save_global(obj, name)
        module, qualname = ref
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
        self.memoize(obj)

    dispatch[types.FunctionType] = save_global

    def _state(self, module: torch.nn.Module) -> dict:
        state = dict(module.__dict__)
        init_kwargs = state.pop("init_kwargs", None)
        if init_kwargs is None:  # sub-modules: record constructor arguments the way EDM's would look
            init_kwargs = {"in_channels": getattr(module, "in_channels", 0)}
            if hasattr(module, "skip_scale"):
                init_kwargs.update(skip_scale=np.float64(module.skip_scale), init=dict(init_mode="xavier_uniform"),
                                   init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))
        state["_init_args"] = ()
        state["_init_kwargs"] = copy.deepcopy(init_kwargs)
        if self.ordered:  # torch ≤ 1.13 kept these as OrderedDicts
            for key in ("_parameters", "_buffers", "_modules"):
                state[key] = OrderedDict(state[key])
        return state

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith("apctl.networks"):
            meta = dict(type="class", version=6, module_src=self.module_src, class_name=type(obj).__name__,
                        state=self._state(obj))
            return _reconstruct_persistent_obj, (meta,)
        if isinstance(obj, PersistentStandIn):
            meta = dict(type="class", version=6, module_src=self.module_src, class_name=obj.class_name,
                        state=obj.state)
            return _reconstruct_persistent_obj, (meta,)
        if self.ordered and type(obj) is torch.nn.ModuleDict:
            state = dict(obj.__dict__)
            for key in ("_parameters", "_buffers", "_modules"):
                state[key] = OrderedDict(state[key])
            return copyreg_newobj, (torch.nn.ModuleDict,), state
        if self.numpy1 and isinstance(obj, np.generic):
            return _numpy1_scalar, (obj.dtype, obj.tobytes())
        return NotImplemented


def copyreg_newobj(cls, *args):  # the pickler recognises the name and writes NEWOBJ
    return cls.__new__(cls, *args)


copyreg_newobj.__name__ = "__newobj__"


def edm_pickle_bytes(net: torch.nn.Module, *, protocol: int = 4, module_src: str = "# source\n",
                     ordered: bool = False, numpy1: bool = False, easydict: bool = False) -> bytes:
    """The bytes of an EDM network pickle {ema, loss_fn, augment_pipe, dataset_kwargs} around `net`."""
    dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/tiny.zip",
                          use_labels=True, xflip=False, cache=True, resolution=16, max_size=100)
    data = dict(
        ema=net,
        loss_fn=PersistentStandIn("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
        augment_pipe=PersistentStandIn("AugmentPipe", dict(p=0.12, xflip=1e8, yflip=1.0, scale=np.float64(1.0))),
        dataset_kwargs=EasyDict(dataset_kwargs) if easydict else dataset_kwargs,
    )
    buf = io.BytesIO()
    EDMStylePickler(buf, protocol, module_src, ordered=ordered, numpy1=numpy1).dump(data)
    return buf.getvalue()


# --- hostile pickles, written opcode by opcode ------------------------------------------------

def _str2(s: str) -> bytes:  # protocol 2 BINUNICODE
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _str4(s: str) -> bytes:  # protocol 4 SHORT_BINUNICODE
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def _call2(module: str, name: str, *args: bytes) -> bytes:
    """Protocol 2: module.name(*args) via GLOBAL + TUPLE + REDUCE (args are opcode snippets)."""
    return (pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.MARK + b"".join(args) + pickle.TUPLE
            + pickle.REDUCE)


def _proto2(body: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def _proto4(body: bytes) -> bytes:
    return pickle.PROTO + b"\x04" + body + pickle.STOP


def hostile_pickles(marker: str) -> dict[str, tuple[bytes, str]]:
    """name → (pickle bytes, the global the refusal must name). Each would create `marker` if run."""
    touch_py = f"open({marker!r}, 'w').close()"
    shell = f"touch {marker}"
    list_touch = pickle.MARK + _str2("touch") + _str2(marker) + pickle.LIST
    out: dict[str, tuple[bytes, str]] = {
        "os.system": (_proto2(_call2("os", "system", _str2(shell))), "os.system"),
        "posix.system": (_proto2(_call2("posix", "system", _str2(shell))), "posix.system"),
        "builtins.eval": (_proto2(_call2("builtins", "eval", _str2(touch_py))), "builtins.eval"),
        "builtins.exec": (_proto2(_call2("builtins", "exec", _str2(touch_py))), "builtins.exec"),
        # getattr(pathlib.Path(marker), 'touch')()
        "builtins.getattr": (_proto2(
            pickle.GLOBAL + b"builtins\ngetattr\n" + pickle.MARK + _call2("pathlib", "Path", _str2(marker))
            + _str2("touch") + pickle.TUPLE + pickle.REDUCE + pickle.EMPTY_TUPLE + pickle.REDUCE), "builtins.getattr"),
        "subprocess.Popen": (_proto2(_call2("subprocess", "Popen", list_touch)), "subprocess.Popen"),
        "subprocess.check_output": (_proto2(_call2("subprocess", "check_output", list_touch)),
                                    "subprocess.check_output"),
        "importlib.import_module": (_proto2(_call2("importlib", "import_module", _str2("apctl_hostile_marker"))),
                                    "importlib.import_module"),
        "__builtin__.eval protocol 0": (
            b"c__builtin__\neval\n(V" + touch_py.encode("raw_unicode_escape") + b"\ntR.", "__builtin__.eval"),
        "__builtin__.eval protocol 2": (_proto2(_call2("__builtin__", "eval", _str2(touch_py))), "__builtin__.eval"),
        "runpy._run_code": (_proto2(_call2("runpy", "_run_code", _str2(touch_py), pickle.EMPTY_DICT)),
                            "runpy._run_code"),
        # STACK_GLOBAL whose names come back from the memo
        "STACK_GLOBAL from memoized strings": (_proto4(
            _str4("os") + pickle.MEMOIZE + _str4("system") + pickle.MEMOIZE + pickle.POP + pickle.POP
            + pickle.BINGET + b"\x00" + pickle.BINGET + b"\x01" + pickle.STACK_GLOBAL
            + _str4(shell) + pickle.TUPLE1 + pickle.REDUCE), "os.system"),
        # allowlisted names pushed last, then popped: a scanner reading "the last two strings" is fooled
        "STACK_GLOBAL behind popped decoys": (_proto4(
            _str4("os") + _str4("system") + _str4("collections") + _str4("OrderedDict") + pickle.POP + pickle.POP
            + pickle.STACK_GLOBAL + _str4(shell) + pickle.TUPLE1 + pickle.REDUCE), "os.system"),
        # names as Python 2 strings (SHORT_BINSTRING), which unpickle to str under latin1
        "STACK_GLOBAL from Python 2 strings": (_proto4(
            _str4("collections") + _str4("OrderedDict") + pickle.POP + pickle.POP
            + pickle.SHORT_BINSTRING + b"\x02os" + pickle.SHORT_BINSTRING + b"\x06system" + pickle.STACK_GLOBAL
            + _str4(shell) + pickle.TUPLE1 + pickle.REDUCE), "os.system"),
        # protocol 0 INST opcode: imports and calls os.system without any GLOBAL opcode
        "INST os.system": (b"(V" + shell.encode() + b"\nios\nsystem\n.", "os.system"),
        "unknown class": (_proto2(_call2("training.networks", "EDMPrecond")), "training.networks.EDMPrecond"),
        "torch.load": (_proto2(_call2("torch", "load", _str2(marker))), "torch.load"),
        "pickle.loads nested": (_proto2(_call2("pickle", "loads", pickle.SHORT_BINBYTES + bytes([9]) + b"cos\nsys\n.")),
                                "pickle.loads"),
        "_pickle.loads nested": (_proto2(_call2("_pickle", "loads", pickle.SHORT_BINBYTES + b"\x01.")), "_pickle.loads"),
        "os.system inside an EDM persistent object's state": (_proto4(
            _str4("torch_utils.persistence") + _str4("_reconstruct_persistent_obj") + pickle.STACK_GLOBAL
            + pickle.EMPTY_DICT + _str4("state") + _call2("os", "system", _str2(shell)) + pickle.SETITEM
            + pickle.TUPLE1 + pickle.REDUCE), "os.system"),
    }
    return out


def build_on_global_pickle(module: str = "torch._utils", name: str = "_rebuild_parameter") -> bytes:
    """BUILD applied to an allowlisted global itself: setattr(global, '__defaults__', ('pwned',))."""
    return _proto2(pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.NONE + pickle.EMPTY_DICT
                   + _str2("__defaults__") + _str2("pwned") + pickle.TUPLE1 + pickle.SETITEM + pickle.TUPLE2
                   + pickle.BUILD)


def extension_code_pickle(code: int) -> bytes:
    """A protocol 2 pickle calling the global registered as extension `code`."""
    return _proto2(pickle.EXT2 + struct.pack("<H", code) + pickle.MARK + _str2("true") + pickle.TUPLE + pickle.REDUCE)


# --- an independent OpenAI ADM reference (guided-diffusion UNetModel as in consistency_models/CTM) ---
# Written from the ADM structure (resblock_updown=True, use_scale_shift_norm=True, heads of 64
# channels, qkv rows laid out (three, head, channel), 1×1 attention convs stored as conv1d), not
# from apctl's mapping, so comparing the two checks the mapping.


def adm_state_dict(mc: int, mult: list[int], nb: int, attn_ds: set[int], num_classes: int, in_ch: int = 3,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return torch.randn(*shape, generator=gen) * (scale if scale is not None else fan_in ** -0.5)

    sd: dict[str, torch.Tensor] = {}
    emb = 4 * mc

    def norm(p, c):
        sd[f"{p}.weight"] = 1 + 0.1 * rnd(c, scale=1.0)
        sd[f"{p}.bias"] = 0.1 * rnd(c, scale=1.0)

    def res(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"] = rnd(cout, cin, 3, 3), 0.1 * rnd(cout, scale=1.0)
        sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"] = rnd(2 * cout, emb), 0.1 * rnd(2 * cout, scale=1.0)
        norm(f"{p}.out_layers.0", cout)
        sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"] = rnd(cout, cout, 3, 3), 0.1 * rnd(cout, scale=1.0)
        if cin != cout:
            sd[f"{p}.skip_connection.weight"] = rnd(cout, cin, 1, 1)
            sd[f"{p}.skip_connection.bias"] = 0.1 * rnd(cout, scale=1.0)

    def attn(p, c):
        norm(f"{p}.norm", c)
        sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"] = rnd(3 * c, c, 1), 0.1 * rnd(3 * c, scale=1.0)
        sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"] = rnd(c, c, 1), 0.1 * rnd(c, scale=1.0)

    sd["time_embed.0.weight"], sd["time_embed.0.bias"] = rnd(emb, mc), 0.1 * rnd(emb, scale=1.0)
    sd["time_embed.2.weight"], sd["time_embed.2.bias"] = rnd(emb, emb), 0.1 * rnd(emb, scale=1.0)
    if num_classes:
        sd["label_emb.weight"] = rnd(num_classes, emb, scale=1.0)
    ch = mc * mult[0]
    sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"] = rnd(ch, in_ch, 3, 3), 0.1 * rnd(ch, scale=1.0)
    chans, k, ds = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nb):
            res(f"input_blocks.{k}.0", ch, mc * m)
            ch = mc * m
            if ds in attn_ds:
                attn(f"input_blocks.{k}.1", ch)
            chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            res(f"input_blocks.{k}.0", ch, ch)
            chans.append(ch)
            k += 1
            ds *= 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    k = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nb + 1):
            res(f"output_blocks.{k}.0", ch + chans.pop(), mc * m)
            ch = mc * m
            sub = 1
            if ds in attn_ds:
                attn(f"output_blocks.{k}.1", ch)
                sub = 2
            if level and i == nb:
                res(f"output_blocks.{k}.{sub}", ch, ch)
                ds //= 2
            k += 1
    norm("out.0", ch)
    sd["out.2.weight"], sd["out.2.bias"] = rnd(in_ch, ch, 3, 3), 0.1 * rnd(in_ch, scale=1.0)
    return sd


def adm_forward(sd, x, timesteps, y, mc: int, mult: list[int], nb: int, attn_ds: set[int],
                head_channels: int = 64) -> torch.Tensor:
    F = torch.nn.functional

    def gn(h, p):
        return F.group_norm(h.float(), 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def res(h, emb, p, up=False, down=False):
        x_ = h
        hh = F.silu(gn(h, f"{p}.in_layers.0"))
        if up:
            hh, x_ = F.interpolate(hh, scale_factor=2, mode="nearest"), F.interpolate(x_, scale_factor=2, mode="nearest")
        if down:
            hh, x_ = F.avg_pool2d(hh, 2), F.avg_pool2d(x_, 2)
        hh = F.conv2d(hh, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[..., None, None]
        scale, shift = e.chunk(2, dim=1)
        hh = gn(hh, f"{p}.out_layers.0") * (1 + scale) + shift
        hh = F.conv2d(F.silu(hh), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
        if f"{p}.skip_connection.weight" in sd:
            x_ = F.conv2d(x_, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
        return x_ + hh

    def attn(h, p):
        b, c, hgt, wid = h.shape
        heads, d = c // head_channels, head_channels
        qkv = F.conv1d(gn(h, f"{p}.norm").reshape(b, c, -1), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
        q, k, v = qkv.reshape(b, 3, heads, d, -1).unbind(1)
        s = d ** -0.25
        w = torch.einsum("bhct,bhcs->bhts", q * s, k * s).softmax(dim=-1)
        a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, c, -1)
        out = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
        return h + out.reshape(b, c, hgt, wid)

    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(temb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if "label_emb.weight" in sd:
        emb = emb + sd["label_emb.weight"][y]
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    hs, k, ds = [h], 1, 1
    for level, _m in enumerate(mult):
        for _ in range(nb):
            h = res(h, emb, f"input_blocks.{k}.0")
            if ds in attn_ds:
                h = attn(h, f"input_blocks.{k}.1")
            hs.append(h)
            k += 1
        if level != len(mult) - 1:
            h = res(h, emb, f"input_blocks.{k}.0", down=True)
            hs.append(h)
            k += 1
            ds *= 2
    h = res(attn(res(h, emb, "middle_block.0"), "middle_block.1"), emb, "middle_block.2")
    k = 0
    for level, _m in list(enumerate(mult))[::-1]:
        for i in range(nb + 1):
            h = res(torch.cat([h, hs.pop()], dim=1), emb, f"output_blocks.{k}.0")
            sub = 1
            if ds in attn_ds:
                h = attn(h, f"output_blocks.{k}.1")
                sub = 2
            if level and i == nb:
                h = res(h, emb, f"output_blocks.{k}.{sub}", up=True)
                ds //= 2
            k += 1
    h = F.silu(gn(h, "out.0"))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)
