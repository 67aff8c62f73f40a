"""A loaded teacher network with its architecture, provenance and fingerprint.

Fingerprint: sha256 over, for every state_dict entry in sorted key order, the key (UTF-8), a NUL,
the dtype name (e.g. 'torch.float32'), a NUL, the shape as JSON, a NUL and the tensor's raw
little-endian bytes in C order; followed by the arch JSON
`json.dumps({"class_name": ..., "init_kwargs": ...}, sort_keys=True, separators=(",", ":"))`.
It identifies the function the network computes, independent of the file it came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class TeacherBundle:
    """A loaded teacher network with its architecture and provenance.

    network:       the rebuilt apctl module (eval mode, CPU).
    arch:          {"class_name": str, "init_kwargs": dict}, enough for `build_network`.
    source_format: "edm-pickle" | "apctl" | "openai-adm".
    fingerprint:   `compute_fingerprint(network.state_dict(), arch)` (module docstring).
    source:        {"format", "file"} of the file originally imported (kept across re-saves).
    source_sha256: sha256 of that original file's bytes.
    module_src_sha256: class name → sha256 of the source an EDM pickle embedded (never executed).
    extras:        format-specific details (EDM: loss_fn, augment_pipe, dataset_kwargs, …;
                   OpenAI ADM: the detected UNet layout and the time label used).
    """

    network: Any
    arch: dict
    source_format: str
    fingerprint: str
    source: dict = field(default_factory=dict)
    source_sha256: str = ""
    module_src_sha256: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    @classmethod
    def imported(cls, network: Any, arch: dict, source_format: str, file_name: str, source_sha256: str,
                 **fields: Any) -> "TeacherBundle":
        """The bundle of a network just imported from `file_name` (a `source_format` file with that
        sha256): fingerprint computed from the network, source recorded; `fields` as the dataclass's."""
        return cls(network=network, arch=arch, source_format=source_format,
                   fingerprint=compute_fingerprint(network.state_dict(), arch),
                   source={"format": source_format, "file": file_name}, source_sha256=source_sha256, **fields)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.network.parameters())


def arch_json(arch: Mapping[str, Any]) -> str:
    """Canonical JSON of {class_name, init_kwargs} (the part of the fingerprint that is not weights)."""
    return json.dumps({"class_name": arch["class_name"], "init_kwargs": arch["init_kwargs"]},
                      sort_keys=True, separators=(",", ":"))


def compute_fingerprint(state_dict: Mapping[str, Any], arch: Mapping[str, Any]) -> str:
    """sha256 over the sorted state_dict tensors and the arch JSON (format in the module docstring)."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(key.encode("utf-8") + b"\0")
        h.update(str(t.dtype).encode() + b"\0")
        h.update(json.dumps(list(t.shape)).encode() + b"\0")
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        h.update(raw.numpy().data)
    h.update(arch_json(arch).encode("utf-8"))
    return h.hexdigest()
