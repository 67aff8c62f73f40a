"""Building the two-time student D_θ(x, t, s) a config asks for, fresh or from a checkpoint's architecture."""

from __future__ import annotations

from typing import Any

from torch import nn

from apctl.config import Config
from apctl.errors import ApctlError
from apctl.networks.mlp import TwoTimeMLP


def student_architecture(cfg: Config, shape: tuple[int, ...], label_dim: int, teacher=None) -> dict[str, Any]:
    """Plain data that rebuilds the student's modules (saved in every checkpoint)."""
    st = cfg.student
    if st.kind == "mlp":
        return {"kind": "mlp", "shape": list(shape), "label_dim": label_dim, "hidden": st.hidden,
                "depth": st.depth, "embed_dim": st.embed_dim}
    network = getattr(teacher, "network", None)
    if st.init_from_teacher and network is not None:
        return {"kind": "unet", "init_kwargs": dict(network.init_kwargs)}
    from apctl.networks.registry import EDM_PRESET_KWARGS

    if st.network not in EDM_PRESET_KWARGS:
        raise ApctlError(f"student.network: unknown network preset {st.network!r} (known: {', '.join(EDM_PRESET_KWARGS)})")
    kwargs = dict(EDM_PRESET_KWARGS[st.network])
    if st.init_from_teacher:
        return {"kind": "unet", "init_kwargs": kwargs}  # the teacher's own architecture (planned without its file)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ApctlError(f"student.kind = 'unet' needs square images, got data shape {tuple(shape)}")
    kwargs.update(img_channels=shape[0], img_resolution=shape[1], label_dim=label_dim)
    return {"kind": "unet", "init_kwargs": kwargs}


def build_student(arch: dict[str, Any], teacher=None, init_from_teacher: bool = False) -> nn.Module:
    if arch["kind"] == "mlp":
        return TwoTimeMLP(tuple(arch["shape"]), arch["label_dim"], arch["hidden"], arch["depth"], arch["embed_dim"])
    from apctl.networks.two_time import TwoTimeDenoiser

    if init_from_teacher and getattr(teacher, "network", None) is not None:
        return TwoTimeDenoiser.from_teacher(teacher.network)
    return TwoTimeDenoiser.from_init_kwargs(arch["init_kwargs"])
