"""Unpickling with an explicit allowlist of globals: nothing outside it is ever imported or called.

`pickle.load` executes whatever callables a file names. apctl reads third-party pickles (EDM
checkpoints, CIFAR-10 batches), so every load goes through `restricted_load`, which

1. lists every GLOBAL / STACK_GLOBAL opcode with `pickletools.genops` *before* unpickling and
   refuses the file, naming each offending global, if any is outside the allowlist;
2. unpickles with a `find_class` that resolves only allowlisted names (defence in depth).
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, Callable, Mapping

from apctl.errors import ApctlError

Allowlist = Mapping[tuple[str, str], Any]


def referenced_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle refers to, in order, found without executing it.

    STACK_GLOBAL takes its two names from the two most recent string pushes; pickles written
    by protocol ≥ 4 memoize those strings, so memo lookups are tracked too.
    """
    found: list[tuple[str, str]] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    last_pushed_string = False
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            pushed_string = False
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
                pushed_string = True
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if last_pushed_string else None
                pushed_string = last_pushed_string
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = strings[-1] if last_pushed_string else None
                pushed_string = last_pushed_string
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                value = memo.get(arg)
                if isinstance(value, str):
                    strings.append(value)
                    pushed_string = True
            elif name == "STACK_GLOBAL":
                if len(strings) < 2:
                    raise ApctlError("pickle uses STACK_GLOBAL with names that cannot be resolved statically")
                found.append((strings[-2], strings[-1]))
            last_pushed_string = pushed_string
    except ApctlError:
        raise
    except Exception as exc:  # pickletools raises ValueError and friends on truncated data
        raise ApctlError(f"not a readable pickle ({exc})") from None
    return found


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allowed: Allowlist, persistent_load: Callable | None):
        super().__init__(file, encoding="latin1")
        self._allowed = allowed
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ApctlError(f"refused to load pickle: it calls {module}.{name}, which is not allowed") from None


def restricted_load(data: bytes, allowed: Allowlist, *, what: str = "pickle",
                    persistent_load: Callable | None = None) -> Any:
    """Unpickle `data`, resolving globals only through `allowed` ((module, name) → object).

    Raises ApctlError naming every global outside the allowlist before anything is unpickled.
    """
    refused = sorted({f"{m}.{n}" for m, n in referenced_globals(data) if (m, n) not in allowed})
    if refused:
        raise ApctlError(f"refused to load {what}: it references {', '.join(refused)}, outside the allowlist")
    try:
        return _AllowlistUnpickler(io.BytesIO(data), allowed, persistent_load).load()
    except ApctlError:
        raise
    except Exception as exc:
        raise ApctlError(f"{what} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
