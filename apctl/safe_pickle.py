"""Unpickling with an explicit allowlist of globals: nothing outside it is ever imported or called.

`pickle.load` executes whatever callables a file names. apctl reads third-party pickles (EDM
checkpoints, CIFAR-10 batches), so every load goes through `restricted_load`, which

1. simulates the unpickler's stack with `pickletools.genops` *before* unpickling, lists every
   global the pickle would resolve (GLOBAL, STACK_GLOBAL, INST, EXT1/2/4) and refuses the file,
   naming each offending global, if any is outside the allowlist; it also refuses a BUILD applied
   to a global itself (which would `setattr` on an allowlisted class or function);
2. unpickles with a `find_class` that resolves only allowlisted names (defence in depth).
"""

from __future__ import annotations

import copyreg
import io
import pickle
import pickletools
from typing import Any, Callable, Mapping

from apctl.errors import ApctlError, UnreadablePickleError, UnsafePickleError

Allowlist = Mapping[tuple[str, str], Any]


class _Str(str):
    """A string constant on the simulated stack (the only operands STACK_GLOBAL may take)."""


class _Global:
    """The object a GLOBAL / STACK_GLOBAL / INST pushed, as it sits on the simulated stack."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


_MARK = object()  # a MARK on the simulated stack
_OTHER = object()  # any value the scan does not need to know
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING",  # Python 2 str: decoded to str (latin1)
                         "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})


def _scan(data: bytes, what: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Simulate the unpickler's stack and memo without creating anything.

    Returns every (module, name) the pickle would resolve, in order, and the names of globals a
    BUILD opcode would modify in place (`setattr` on a class or function named by the pickle).
    STACK_GLOBAL takes its operands from the real top of the stack (which may come from a memo
    lookup, a DUP, a Python 2 string, or sit under popped values); operands that are not string
    constants cannot be resolved statically and make the pickle unreadable. `what` names the
    pickle in that error (prefixed as "{what}: "), so every error of `restricted_load` names it.
    """
    found: list[tuple[str, str]] = []
    built_on: list[str] = []
    stack: list[object] = []
    memo: dict[int, object] = {}

    def top() -> object:  # as CPython: values below the innermost MARK are out of reach
        if not stack or stack[-1] is _MARK:
            raise ValueError(f"{name} with nothing above the mark")
        return stack[-1]

    def pop() -> object:
        value = top()
        stack.pop()
        return value

    def pop_to_mark() -> None:
        while stack and stack[-1] is not _MARK:
            stack.pop()
        if not stack:
            raise ValueError(f"{name} without a MARK")
        stack.pop()

    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS:
            stack.append(_Str(arg))
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
            stack.append(_Global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = pop(), pop()
            if not (isinstance(module, _Str) and isinstance(attr, _Str)):
                where = f"{what}: " if what else ""
                raise UnsafePickleError(f"{where}pickle uses STACK_GLOBAL with names that cannot be resolved "
                                        "statically")
            found.append((str(module), str(attr)))
            stack.append(_Global(str(module), str(attr)))
        elif name == "INST":  # protocol 0/1: imports module.name and instantiates it
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
            pop_to_mark()
            stack.append(_OTHER)
        elif name in ("EXT1", "EXT2", "EXT4"):  # a global named through copyreg's extension registry
            module_name = copyreg._inverted_registry.get(arg)
            found.append(module_name if module_name else ("<extension code>", str(arg)))
            stack.append(_OTHER)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = top()
        elif name == "MEMOIZE":
            memo[len(memo)] = top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise ValueError(f"memo key {arg} missing")
            stack.append(memo[arg])
        elif name == "DUP":
            stack.append(top())
        elif name == "POP":  # pops a value, or the mark on top (as CPython does)
            if not stack:
                raise ValueError("POP on an empty stack")
            stack.pop()
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "BUILD":
            pop()  # the state
            target = pop()
            if isinstance(target, _Global):
                built_on.append(f"{target.module}.{target.name}")
            stack.append(target)
        else:  # generic effect from pickletools' opcode table
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                for _ in range(before.index(pickletools.markobject)):
                    pop()
            else:
                for _ in before:
                    pop()
            stack.extend(_OTHER for _ in op.stack_after)
    return found, built_on


def referenced_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle refers to, in order, found without executing it.

    Covers GLOBAL, INST (protocols 0/1), STACK_GLOBAL (protocol ≥ 4, whose two names are taken from
    a simulated stack, so memoized strings, DUP, Python 2 strings and popped decoys are handled)
    and EXT1/2/4 (copyreg extension codes; unregistered codes are listed as '<extension code>.N').
    """
    try:
        return _scan(data)[0]
    except ApctlError:
        raise
    except Exception as exc:  # pickletools raises ValueError and friends on truncated data
        raise UnreadablePickleError(f"not a readable pickle ({exc})") from None


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allowed: Allowlist, persistent_load: Callable | None, what: str):
        super().__init__(file, encoding="latin1")
        self._allowed = allowed
        self._what = what
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused to load {self._what}: it calls {module}.{name}, which is not "
                                    "allowed") from None


def restricted_load(data: bytes, allowed: Allowlist, *, what: str = "pickle",
                    persistent_load: Callable | None = None) -> Any:
    """Unpickle `data`, resolving globals only through `allowed` ((module, name) → object).

    Raises UnsafePickleError naming every global outside the allowlist before anything is unpickled,
    UnreadablePickleError for truncated or corrupt data; every message names `what`.
    """
    try:
        found, built_on = _scan(data, what)
    except ApctlError:
        raise
    except Exception as exc:  # pickletools raises ValueError and friends on truncated data
        raise UnreadablePickleError(f"{what} is not a readable pickle ({exc})") from None
    refused = sorted({f"{m}.{n}" for m, n in found if (m, n) not in allowed})
    if refused:
        raise UnsafePickleError(f"refused to load {what}: it references {', '.join(refused)}, outside the allowlist")
    if built_on:
        raise UnsafePickleError(f"refused to load {what}: it would set attributes on {', '.join(sorted(set(built_on)))}")
    try:
        return _AllowlistUnpickler(io.BytesIO(data), allowed, persistent_load, what).load()
    except ApctlError:
        raise
    except Exception as exc:
        raise UnreadablePickleError(f"{what} is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def numpy_array_allowlist() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array needs (ndarray, dtype, _reconstruct), under both module names.

    numpy 2 pickles name numpy._core, numpy 1 pickles name numpy.core; either may appear in a file
    and both must resolve to whichever the installed numpy provides.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


def load_torch_file(path, what: str, hint: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: torch's own allowlist (tensors and containers).

    A refused or unreadable file raises ApctlError "cannot read {what} {path} as a tensor-only torch
    file (<exception type>); {hint}".
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ApctlError(f"cannot read {what} {path} as a tensor-only torch file ({type(exc).__name__}); "
                         f"{hint}") from None
