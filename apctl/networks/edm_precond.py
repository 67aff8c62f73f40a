"""Preconditioned denoisers D(x; σ) of EDM (Karras et al. 2022, Table 1) around a raw UNet F.

    D(x; σ) = c_skip(σ) · x + c_out(σ) · F(c_in(σ) · x, c_noise(σ), labels)

| class        | c_skip            | c_out                | c_in                 | c_noise                  |
|--------------|-------------------|----------------------|----------------------|--------------------------|
| VPPrecond    | 1                 | −σ                   | 1/√(σ²+1)            | (M−1) · σ⁻¹_VP(σ)        |
| VEPrecond    | 1                 | σ                    | 1                    | log(σ/2)                 |
| iDDPMPrecond | 1                 | −σ                   | 1/√(σ²+1)            | M−1−argmin_j |u_j − σ|   |
| EDMPrecond   | σ_d²/(σ²+σ_d²)    | σ·σ_d/√(σ²+σ_d²)     | 1/√(σ²+σ_d²)         | k · ln(σ)/4              |

k is EDMPrecond's `noise_label_scale` (1 in EDM; 1000 for OpenAI's EDM-trained ADM checkpoints,
which consistency_models / CTM feed `1000 * 0.25 * log(sigma)`). It is a constant of the
function, not a parameter: the state_dict does not change, and `init_kwargs` records it only
when it is not 1, so EDM pickles' `_init_kwargs` round-trip unchanged.

Constructor arguments and `forward` follow NVlabs/edm so an EDM pickle's `_init_kwargs` build the
same module; the UNet lives in `self.model`, so state-dict keys are `model.…`. Each instance keeps
its constructor arguments in `init_kwargs` (a plain dict, enough to rebuild it). The UNet runs in
fp16 only when `use_fp16` is set, `force_fp32` is not, and the input is on CUDA; on CPU it is
always fp32. Extra keyword arguments of `forward` (e.g. `augment_labels`, `extra_emb`) are passed
to the UNet unchanged.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from apctl.errors import ApctlError
from apctl.networks.edm_unets import DhariwalUNet, SongUNet

__all__ = ["EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "UNET_CLASSES", "build_unet"]

UNET_CLASSES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def build_unet(model_type: str, **kwargs) -> nn.Module:
    """The UNet named `model_type` ('SongUNet' or 'DhariwalUNet') built with `kwargs`."""
    try:
        cls = UNET_CLASSES[model_type]
    except KeyError:
        raise ApctlError(f"unknown model_type {model_type!r}; supported: {', '.join(UNET_CLASSES)}") from None
    return cls(**kwargs)


class _Precond(nn.Module):
    """Shared plumbing: input casting, label defaults, dtype choice, the D = c_skip x + c_out F rule.

    Each subclass defines `scalings(sigma) -> (c_skip, c_out, c_in, c_noise)`.
    """

    img_resolution: int
    img_channels: int
    label_dim: int
    use_fp16: bool
    model: nn.Module

    def _init_common(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool) -> None:
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def _labels(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """None when unconditional; a zero row when conditional and no labels are given (as EDM)."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def _model_dtype(self, x: torch.Tensor, force_fp32: bool) -> torch.dtype:
        use_half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        return torch.float16 if use_half else torch.float32

    def _output_slice(self, F_x: torch.Tensor) -> torch.Tensor:
        return F_x

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        labels = self._labels(class_labels, x)
        dtype = self._model_dtype(x, force_fp32)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f"UNet returned {F_x.dtype}, expected {dtype}")
        return c_skip * x + c_out * self._output_slice(F_x).to(torch.float32)

    def round_sigma(self, sigma):
        """Noise levels are continuous: σ is returned unchanged (as a tensor)."""
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """EDM's own preconditioning (Karras et al. 2022, Sec. 5 and Table 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", *, noise_label_scale: float = 1.0, **model_kwargs):
        super().__init__()
        # Keyword-only and after model_type, so EDM's positional constructor arguments bind as in EDM.
        noise_label_scale = float(noise_label_scale)
        if not (math.isfinite(noise_label_scale) and noise_label_scale > 0):
            raise ValueError(f"noise_label_scale must be a positive finite number, got {noise_label_scale!r}")
        self._init_common(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model_type = model_type
        self.noise_label_scale = noise_label_scale
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                sigma_data=sigma_data, model_type=model_type, **copy.deepcopy(model_kwargs))
        if noise_label_scale != 1.0:  # recorded only when set, so EDM's kwargs round-trip unchanged
            self.init_kwargs["noise_label_scale"] = noise_label_scale
        self.model = build_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def scalings(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at σ, each shaped like σ.

            c_skip = σ_d² / (σ² + σ_d²)     c_out   = σ σ_d / √(σ² + σ_d²)
            c_in   = 1 / √(σ² + σ_d²)       c_noise = k · ln(σ) / 4,  k = noise_label_scale

        With k = 1000, c_noise is bit-for-bit `1000 * 0.25 * log(sigma)` in float32 (ln σ / 4 is
        exact, so both round the same product once).
        """
        sigma = torch.as_tensor(sigma)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        scale = getattr(self, "noise_label_scale", 1.0)
        if scale != 1.0:
            c_noise = c_noise * scale
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021) with the continuous VP schedule

        σ(t) = √(exp(½ β_d t² + β_min t) − 1),   t ∈ [ε_t, 1].
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__()
        self._init_common(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model_type = model_type
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t,
                                model_type=model_type, **copy.deepcopy(model_kwargs))
        self.model = build_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def sigma(self, t):
        """σ(t) = √(exp(½ β_d t² + β_min t) − 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t(σ) = (√(β_min² + 2 β_d ln(1 + σ²)) − β_min) / β_d, the inverse of `sigma`."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def scalings(self, sigma: torch.Tensor):
        """c_skip = 1, c_out = −σ, c_in = 1/√(σ² + 1), c_noise = (M − 1) t(σ)."""
        sigma = torch.as_tensor(sigma)
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021), σ ∈ [σ_min, σ_max]."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet", **model_kwargs):
        super().__init__()
        self._init_common(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model_type = model_type
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                model_type=model_type, **copy.deepcopy(model_kwargs))
        self.model = build_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def scalings(self, sigma: torch.Tensor):
        """c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ / 2)."""
        sigma = torch.as_tensor(sigma)
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(_Precond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021) on its discrete noise levels u_j.

        ᾱ(j) = sin²(π j / (2 M (C₂ + 1))),   u_M = 0,
        u_{j−1} = √((u_j² + 1) / max(ᾱ(j−1)/ᾱ(j), C₁) − 1),   j = M … 1.

    The UNet predicts 2·img_channels channels (mean and variance); only the first half is used.
    The levels are the persistent buffer `u` of shape [M + 1].
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs):
        super().__init__()
        self._init_common(img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model_type = model_type
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, C_1=C_1, C_2=C_2, M=M, model_type=model_type, **copy.deepcopy(model_kwargs))
        self.model = build_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels * 2, label_dim=label_dim, **model_kwargs)
        u = torch.zeros(M + 1, device="cpu")
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u.to(torch.empty(0).device))
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j):
        """ᾱ(j) = sin²(½ π j / M / (C₂ + 1))."""
        j = torch.as_tensor(j, device="cpu")
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index: bool = False):
        """The nearest level u_j to each σ (or its index j when `return_index`)."""
        sigma = torch.as_tensor(sigma)
        d = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = d.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def scalings(self, sigma: torch.Tensor):
        """c_skip = 1, c_out = −σ, c_in = 1/√(σ² + 1), c_noise = M − 1 − j(σ)."""
        sigma = torch.as_tensor(sigma)
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def _output_slice(self, F_x: torch.Tensor) -> torch.Tensor:
        return F_x[:, : self.img_channels]

