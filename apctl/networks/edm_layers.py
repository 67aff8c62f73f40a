"""Layers of the EDM networks (Karras et al. 2022, "Elucidating the Design Space ...", App. F).

Written for apctl from the paper and the published architecture descriptions. Parameter and
buffer *names and shapes* follow NVlabs/edm `training/networks.py` so that the state dicts of
NVIDIA's checkpoints load with `strict=True`; the code itself is apctl's own.

Conventions shared by every layer here:

* weights are stored in float32 and cast to the input's dtype at call time (EDM runs the UNet in
  fp16 on CUDA only; on CPU everything is fp32);
* a layer created inside `with torch.device("meta"):` allocates nothing, which lets tests build
  the 300M-parameter ADM network just to inspect its state dict.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "weight_init",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "attention_weights",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
]


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A random tensor of `shape` drawn with one of four standard variance rules.

        xavier_uniform : U(-1, 1) · sqrt(6 / (fan_in + fan_out))
        xavier_normal  : N(0, 1)  · sqrt(2 / (fan_in + fan_out))
        kaiming_uniform: U(-1, 1) · sqrt(3 / fan_in)
        kaiming_normal : N(0, 1)  · sqrt(1 / fan_in)
    """
    shape = list(shape)
    if mode == "xavier_uniform":
        return (torch.rand(shape) * 2 - 1) * math.sqrt(6 / (fan_in + fan_out))
    if mode == "xavier_normal":
        return torch.randn(shape) * math.sqrt(2 / (fan_in + fan_out))
    if mode == "kaiming_uniform":
        return (torch.rand(shape) * 2 - 1) * math.sqrt(3 / fan_in)
    if mode == "kaiming_normal":
        return torch.randn(shape) * math.sqrt(1 / fan_in)
    raise ValueError(f"unknown weight init mode {mode!r}")


class Linear(nn.Module):
    """y = x Wᵀ + b, with W: [out_features, in_features] and b: [out_features] (optional).

    Initial values: W = init_weight · weight_init(mode), b = init_bias · weight_init(mode).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


def _resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR kernel f fᵀ / (Σf)², shaped [1, 1, n, n] (unit DC gain)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(taps), len(taps))


class Conv2d(nn.Module):
    """k×k convolution with optional 2× FIR up- or downsampling.

    kernel = 0 gives a pure resampler (no weight, no bias). With `up` / `down` the normalised FIR
    kernel f fᵀ/(Σf)² is a persistent buffer `resample_filter` of shape [1, 1, n, n]:

        down:  x ↦ conv(depthwise_stride2(x, f), W)
        up:    x ↦ conv(depthwise_transposed_stride2(x, 4 f), W)

    `fused_resample` performs the convolution at the high resolution instead (for `down`: conv
    first, then filter+decimate; for `up`: upsample with the padding of both, then an unpadded
    conv), exactly as the residual NCSN++ encoder expects.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        # Registered (as None) even without resampling, so the attribute always exists.
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            c = self.in_channels
            x = F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            c = self.out_channels
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2)
        else:
            c = self.in_channels
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with G = min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax_k(qᵀk / sqrt(c)) for q, k of shape [N, c, L]; returns [N, L_q, L_k].

    Computed in float32 whatever the input dtype, and returned in q's dtype.
    """
    scale = 1 / math.sqrt(k.shape[1])
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k * scale).to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Pre-activation residual block conditioned on an embedding, with optional self-attention.

        h   = conv0(silu(norm0(x)))                                  (2× up/down inside conv0)
        h   = silu(norm1(h) · (1 + scale) + shift)   if adaptive_scale, (scale, shift) = affine(emb)
              silu(norm1(h + affine(emb)))           otherwise
        y   = skip_scale · (conv1(dropout(h)) + skip(x))             skip = identity unless shape changes
        y   = skip_scale · (proj(attn(norm2(y))) + y)                if attention (heads = num_heads)

    One class covers DDPM++, NCSN++ and ADM; the configurations differ only in the arguments.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int,
                 up: bool = False, down: bool = False, attention: bool = False,
                 num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0,
                 skip_scale: float = 1, eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1×1 projection when channels change (or when asked to); otherwise a bare resampler.
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            n, c = x.shape[0], x.shape[1]
            # qkv channels are laid out as [head][channel-in-head][q|k|v].
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = self.proj(a.reshape(*x.shape)) + x
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Transformer / DDPM style).

        ω_i = max_positions^(-i / D'),  i = 0 … C/2 − 1,   D' = C/2 − 1 if endpoint else C/2
        emb(x) = [cos(x ω), sin(x ω)]                       shape [B, C]
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): emb(x) = [cos(2π x ω), sin(2π x ω)], ω ~ N(0, scale²).

    ω is the persistent buffer `freqs` of shape [num_channels // 2].
    """

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
