"""Strict JSON for every file and line apctl writes: no `NaN`, `Infinity` or `-Infinity` tokens, which
Python's json writes by default but the JSON standard (and most other readers) refuse.

Two conventions for a non-finite float:

* `nonfinite="null"` (logs, metrics.jsonl, `eval --json`): written as null. A loss that went NaN
  reads back as None; nothing is rebuilt from these numbers.
* `nonfinite="string"` (network architectures, which must rebuild exactly, e.g. EDM's
  `sigma_max = inf`): written as the strings "inf", "-inf" and "nan"; `decode_nonfinite` turns
  exactly those strings back into floats. No network constructor takes one of those strings as a
  string, so the decoding is unambiguous where it is applied (architecture keyword arguments).

Old files written with the `Infinity` token still load: Python's json reads it.
"""

from __future__ import annotations

import json
import math
from typing import Any

NONFINITE_STRINGS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _encode(value: Any, nonfinite: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        if nonfinite == "null":
            return None
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode(v, nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, nonfinite) for v in value]
    return value


def encode_nonfinite(value: Any, nonfinite: str = "null") -> Any:
    """`value` (nested dicts, lists, tuples) with every non-finite float replaced by None or by its string."""
    if nonfinite not in ("null", "string"):
        raise ValueError(f"nonfinite must be 'null' or 'string', got {nonfinite!r}")
    return _encode(value, nonfinite)


def decode_nonfinite(value: Any) -> Any:
    """The inverse of `encode_nonfinite(…, "string")`: "inf", "-inf" and "nan" back into floats."""
    if isinstance(value, str) and value in NONFINITE_STRINGS:
        return NONFINITE_STRINGS[value]
    if isinstance(value, dict):
        return {k: decode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_nonfinite(v) for v in value]
    return value


def dumps(value: Any, *, nonfinite: str = "null", default=None, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN/Infinity (module docstring). `default` converts other objects
    (e.g. numpy or torch scalars via float) before the non-finite check."""
    if default is not None:
        value = json.loads(json.dumps(value, default=default))    # objects → plain numbers, once
    return json.dumps(encode_nonfinite(value, nonfinite), allow_nan=False, **kwargs)
