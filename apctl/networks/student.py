"""The two-time student D_θ(x, t, s) of the `[student]` section, fresh or from a checkpoint's architecture
(iSD's velocity flow map is one too: networks/flow_map.py).

`student_architecture` returns plain data (saved in every checkpoint) and `build_student` turns it
into modules, so a checkpoint rebuilds its student without the config that made it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from apctl.config import StudentConfig
from apctl.errors import ApctlError
from apctl.networks.mlp import TwoTimeMLP

MLP_KINDS = ("mlp", "flow_map")     # students over vectors: architecture = the MLP's keys, no image network


def student_architecture(cfg: StudentConfig, shape: tuple[int, ...], label_dim: int,
                         teacher_network: nn.Module | None = None) -> dict[str, Any]:
    """The student's architecture: an MLP for vectors; for images the teacher network's own
    architecture when starting from it (`init_from_teacher`; the preset's `network` when planning
    without the teacher file), else the preset network resized to the data."""
    if cfg.kind in MLP_KINDS:
        arch = {"kind": cfg.kind, "shape": list(shape), "label_dim": label_dim, "hidden": cfg.hidden,
                "depth": cfg.depth, "embed_dim": cfg.embed_dim, "input_gain": cfg.input_gain,
                "activation": cfg.activation}
        return arch if cfg.kind == "mlp" else dict(arch, transport=cfg.transport)
    if cfg.kind == "denoiser":
        return {"kind": "denoiser", "init_kwargs": _preset_resized(cfg.network, shape, label_dim)}
    if cfg.init_from_teacher and teacher_network is not None:
        return {"kind": "unet", "init_kwargs": dict(teacher_network.init_kwargs)}
    if cfg.init_from_teacher:
        return {"kind": "unet", "init_kwargs": _preset(cfg.network)}
    return {"kind": "unet", "init_kwargs": _preset_resized(cfg.network, shape, label_dim)}


def _preset(name: str) -> dict[str, Any]:
    from apctl.networks.registry import EDM_PRESET_KWARGS

    if name not in EDM_PRESET_KWARGS:
        raise ApctlError(f"student.network: unknown network preset {name!r} (known: {', '.join(EDM_PRESET_KWARGS)})")
    return dict(EDM_PRESET_KWARGS[name])


def _preset_resized(name: str, shape: tuple[int, ...], label_dim: int) -> dict[str, Any]:
    """The preset network's keyword arguments with the data's channels, resolution and classes."""
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ApctlError(f"student.network {name!r} needs square images, got data shape {tuple(shape)}")
    return dict(_preset(name), img_channels=shape[0], img_resolution=shape[1], label_dim=label_dim)


def build_student(arch: dict[str, Any], teacher_network: nn.Module | None = None) -> nn.Module:
    """The student of `arch`; with `teacher_network` a copy of it plus a zero-initialised s-embedding
    (so D_θ(x, t, s) = D_teacher(x, t) at the start), else freshly initialised."""
    if arch["kind"] == "mlp":
        return TwoTimeMLP(tuple(arch["shape"]), arch["label_dim"], arch["hidden"], arch["depth"], arch["embed_dim"],
                          input_gain=arch.get("input_gain", 1.0),      # both absent in checkpoints
                          activation=arch.get("activation", "silu"))   # saved before the keys existed
    if arch["kind"] == "flow_map":
        from apctl.networks.flow_map import FlowMapMLP

        return FlowMapMLP(tuple(arch["shape"]), arch["label_dim"], arch["hidden"], arch["depth"], arch["embed_dim"],
                          arch["input_gain"], arch["activation"], arch["transport"])
    if arch["kind"] == "denoiser":
        from apctl.networks.registry import build_network

        return build_network("EDMPrecond", arch["init_kwargs"])
    from apctl.networks.two_time import TwoTimeDenoiser

    if teacher_network is not None:
        return TwoTimeDenoiser.from_teacher(teacher_network)
    return TwoTimeDenoiser.from_init_kwargs(arch["init_kwargs"])


def parameter_count(arch: dict[str, Any]) -> int:
    """Parameters of the student `arch` describes, counted on the meta device (no memory, no initialisation)."""
    import torch

    from apctl.networks.registry import count_parameters

    with torch.device("meta"):
        return count_parameters(build_student(arch))


def student_data_shape(arch: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    """(per-sample shape, label_dim) a student of `arch` takes."""
    if arch["kind"] in MLP_KINDS:
        return tuple(arch["shape"]), arch["label_dim"]
    k = arch["init_kwargs"]
    return (k["img_channels"], k["img_resolution"], k["img_resolution"]), k.get("label_dim", 0)


def set_dropout(student: nn.Module, rate: float) -> None:
    """Set the dropout rate of every residual block (EDM's UNetBlock.dropout); rate < 0 keeps the
    architecture's own (0.13 for EDM's CIFAR-10 DDPM++, which CTM trains with)."""
    if rate < 0:
        return
    from apctl.networks.edm_layers import UNetBlock

    for module in student.modules():
        if isinstance(module, UNetBlock):
            module.dropout = rate
