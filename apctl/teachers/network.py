"""A trained EDM network behind the teacher interface D(x, σ, labels)."""

from __future__ import annotations

import torch
from torch import nn


class NetworkTeacher:
    """Wraps an EDM-preconditioned network (EDMPrecond, VPPrecond, VEPrecond), frozen, in eval mode."""

    dtype = torch.float32
    exact = False

    def __init__(self, network: nn.Module, fingerprint: str, source: str = ""):
        self.network = network.eval().requires_grad_(False)
        self._fingerprint = fingerprint
        self.source = source
        self.label_dim = int(getattr(network, "label_dim", 0))
        self.shape = (int(network.img_channels), int(network.img_resolution), int(network.img_resolution))
        self.dim = self.shape[0] * self.shape[1] * self.shape[2]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # σ may be a Python number or a tensor anywhere; it and the labels are taken to x's device.
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if labels is not None:
            labels = labels.to(x.device)
        return self.network(x.float(), sigma, labels)

    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def sample(self, n, generator=None, labels=None) -> torch.Tensor:
        raise TypeError("a network teacher has no exact samples; integrate its ODE (apctl.sampling.teacher_sample)")

    def to(self, device) -> "NetworkTeacher":
        self.network.to(device)
        return self
