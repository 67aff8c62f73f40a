"""Build EDM networks by class name from the keyword arguments EDM pickles record.

An EDM network pickle stores each module's class name and the keyword arguments it was built with
(`_init_kwargs`); `build_network(class_name, init_kwargs)` rebuilds the same module from apctl's
own classes, ready for `load_state_dict(..., strict=True)`.

`EDM_PRESET_KWARGS` holds those keyword arguments for EDM's released checkpoints, reconstructed
from EDM's `train.py` (network options for `--arch=ddpmpp|ncsnpp|adm`, `--augment>0` sets
`augment_dim=9`, `--dropout`, `--cres`, `--fp16`) and the exact per-model options of the README's
"training configurations" table, plus small configurations that run on a CPU.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import nn

from apctl.errors import ApctlError
from apctl.networks.edm_precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from apctl.networks.edm_unets import DhariwalUNet, SongUNet

__all__ = [
    "NETWORK_CLASSES",
    "EDM_PRESET_KWARGS",
    "build_network",
    "build_preset",
    "count_parameters",
]

NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    "EDMPrecond": EDMPrecond,
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "iDDPMPrecond": iDDPMPrecond,
    "SongUNet": SongUNet,
    "DhariwalUNet": DhariwalUNet,
}

# The module path EDM pickles use for these classes; accepted as a prefix of `class_name`.
_EDM_MODULE = "training.networks."


def _resolve(class_name: str) -> type[nn.Module]:
    name = class_name[len(_EDM_MODULE):] if class_name.startswith(_EDM_MODULE) else class_name
    try:
        return NETWORK_CLASSES[name]
    except KeyError:
        raise ApctlError(
            f"unknown network class {class_name!r}; supported: {', '.join(NETWORK_CLASSES)}") from None


def build_network(class_name: str, init_kwargs: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
    """`class_name(**init_kwargs)` for one of `NETWORK_CLASSES` (optionally 'training.networks.'-prefixed).

    `device='meta'` builds the module without allocating or initialising any weights.
    """
    cls = _resolve(class_name)
    kwargs = copy.deepcopy(dict(init_kwargs))
    try:
        if device is None:
            return cls(**kwargs)
        with torch.device(device):
            return cls(**kwargs)
    except TypeError as exc:
        raise ApctlError(f"cannot build {class_name} from the given init_kwargs: {exc}") from None


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (buffers excluded; shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


# --- EDM's released checkpoints ------------------------------------------------------------

def _edm(img_resolution: int, label_dim: int, **kw: Any) -> dict:
    base = dict(img_resolution=img_resolution, img_channels=3, label_dim=label_dim, use_fp16=False,
                sigma_min=0, sigma_max=math.inf, sigma_data=0.5)
    base.update(kw)
    return base


# train.py --arch=ddpmpp (DDPM++) and --arch=ncsnpp (NCSN++); default --augment=0.12 → augment_dim=9.
_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
_NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
               channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
_ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4])

EDM_PRESET_KWARGS: dict[str, dict[str, Any]] = {
    # README: --cond=1 --arch=ddpmpp (defaults: --dropout=0.13 --augment=0.12 --fp16=0)
    "edm-cifar10-32x32-cond-vp.pkl": _edm(32, 10, **_DDPMPP, augment_dim=9, dropout=0.13),
    # README: --cond=0 --arch=ddpmpp
    "edm-cifar10-32x32-uncond-vp.pkl": _edm(32, 0, **_DDPMPP, augment_dim=9, dropout=0.13),
    # README: --cond=1/0 --arch=ncsnpp
    "edm-cifar10-32x32-cond-ve.pkl": _edm(32, 10, **_NCSNPP, augment_dim=9, dropout=0.13),
    "edm-cifar10-32x32-uncond-ve.pkl": _edm(32, 0, **_NCSNPP, augment_dim=9, dropout=0.13),
    # README: --cond=0 --arch=ddpmpp|ncsnpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15
    "edm-ffhq-64x64-uncond-vp.pkl": _edm(64, 0, **{**_DDPMPP, "channel_mult": [1, 2, 2, 2]}, augment_dim=9, dropout=0.05),
    "edm-ffhq-64x64-uncond-ve.pkl": _edm(64, 0, **{**_NCSNPP, "channel_mult": [1, 2, 2, 2]}, augment_dim=9, dropout=0.05),
    # README: as FFHQ with --dropout=0.25
    "edm-afhqv2-64x64-uncond-vp.pkl": _edm(64, 0, **{**_DDPMPP, "channel_mult": [1, 2, 2, 2]}, augment_dim=9, dropout=0.25),
    "edm-afhqv2-64x64-uncond-ve.pkl": _edm(64, 0, **{**_NCSNPP, "channel_mult": [1, 2, 2, 2]}, augment_dim=9, dropout=0.25),
    # README: --cond=1 --arch=adm --dropout=0.10 --augment=0 --fp16=1 (no augmentation → no augment_dim)
    "edm-imagenet-64x64-cond-adm.pkl": _edm(64, 1000, **_ADM, dropout=0.10, use_fp16=True),
    # CPU-sized configurations (apctl's own, for tests and CPU presets).
    "tiny-songunet-16": _edm(16, 10, **{**_DDPMPP, "model_channels": 32, "channel_mult": [1, 2]},
                             num_blocks=1, attn_resolutions=[8], dropout=0.0),
    "tiny-songunet-16-uncond": _edm(16, 0, **{**_DDPMPP, "model_channels": 32, "channel_mult": [1, 2]},
                                    num_blocks=1, attn_resolutions=[8], dropout=0.0),
    # The CPU image preset's student (digits-img): a quarter of tiny-songunet-16's convolution cost.
    "cpu-songunet-16": _edm(16, 10, **{**_DDPMPP, "model_channels": 16, "channel_mult": [1, 2]},
                            num_blocks=1, attn_resolutions=[8], dropout=0.0),
    "tiny-adm-16": _edm(16, 10, model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[8], dropout=0.0),
}


def build_preset(name: str, device: torch.device | str | None = None) -> nn.Module:
    """The (freshly initialised) network of preset `name` from `EDM_PRESET_KWARGS`."""
    if name not in EDM_PRESET_KWARGS:
        raise ApctlError(f"unknown network preset {name!r}; known: {', '.join(EDM_PRESET_KWARGS)}")
    return build_network("EDMPrecond", EDM_PRESET_KWARGS[name], device=device)
