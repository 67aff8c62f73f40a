"""EDM networks (SongUNet, DhariwalUNet, their preconditioners) and the two-time CTM student."""

from apctl.networks.edm_precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from apctl.networks.edm_unets import DhariwalUNet, SongUNet
from apctl.networks.registry import (
    EDM_PRESET_KWARGS,
    NETWORK_CLASSES,
    build_network,
    build_preset,
    count_parameters,
)
from apctl.networks.two_time import TwoTimeDenoiser

__all__ = [
    "SongUNet",
    "DhariwalUNet",
    "EDMPrecond",
    "VPPrecond",
    "VEPrecond",
    "iDDPMPrecond",
    "TwoTimeDenoiser",
    "NETWORK_CLASSES",
    "EDM_PRESET_KWARGS",
    "build_network",
    "build_preset",
    "count_parameters",
]
