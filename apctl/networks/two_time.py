"""The two-time CTM student for images: an EDM denoiser that also sees the target time s.

    D_θ(x, t, s, y) = c_skip(t) · x + c_out(t) · F_θ(c_in(t) · x, c_noise(t), y, extra_emb = E(c_noise(s)))

with EDM's scalings (c_skip, c_out, c_in, c_noise) of `EDMPrecond` evaluated at t, and

    E(c) = W₁ · silu(W₀ · embed(c) + b₀) + b₁,      W₁ = 0, b₁ = 0 at initialisation,

where `embed` is a fresh embedding of the same kind and width as the UNet's own noise embedding
(positional for DDPM++/ADM, random Fourier for NCSN++). E's output has the UNet's embedding
width and enters just before the last SiLU of the UNet's embedding MLP (see `edm_unets`).
Because E ≡ 0 at initialisation, D_θ(x, t, s, y) equals the teacher's D(x; t, y) bit-for-bit for
every s.

Only `EDMPrecond` bases (with apctl's SongUNet or DhariwalUNet inside) are supported: the CTM
parameterisation in apctl is defined through EDM's inner scalings. VP/VE/iDDPM teachers must be
used as teachers only.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from apctl.errors import ApctlError
from apctl.networks.edm_layers import FourierEmbedding, Linear, PositionalEmbedding
from apctl.networks.edm_precond import EDMPrecond
from apctl.networks.edm_unets import DhariwalUNet, SongUNet

__all__ = ["SEmbedding", "TwoTimeDenoiser"]


class SEmbedding(nn.Module):
    """E(c) = layer1(silu(layer0(embed(c)))): [B] → [B, emb_channels]; `layer1` starts at zero."""

    def __init__(self, embed: nn.Module, noise_channels: int, emb_channels: int):
        super().__init__()
        self.embed = embed
        self.layer0 = Linear(noise_channels, emb_channels, init_mode="xavier_uniform")
        self.layer1 = Linear(emb_channels, emb_channels, init_mode="xavier_uniform", init_weight=0, init_bias=0)

    @property
    def last_layer(self) -> Linear:
        return self.layer1

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.layer1(F.silu(self.layer0(self.embed(c_noise))))


def _fresh_embedding_like(unet: nn.Module) -> tuple[nn.Module, int]:
    """A new noise embedding of the same type and width as `unet.map_noise`, and its width."""
    src = unet.map_noise
    if isinstance(src, PositionalEmbedding):
        return PositionalEmbedding(src.num_channels, max_positions=src.max_positions, endpoint=src.endpoint), src.num_channels
    if isinstance(src, FourierEmbedding):
        width = 2 * src.freqs.numel()
        return FourierEmbedding(width), width
    raise ApctlError(f"TwoTimeDenoiser: unsupported noise embedding {type(src).__name__}")


class TwoTimeDenoiser(nn.Module):
    """D_θ(x, t, s, labels) around an owned `EDMPrecond` (`self.net`) plus `self.s_embedding`.

    State-dict keys: the wrapped EDMPrecond's keys under `net.` (so `net.model.…`) and the
    s-embedding's under `s_embedding.` (`layer0.*`, `layer1.*`, and `embed.freqs` for NCSN++).
    `student.net.load_state_dict(teacher.state_dict(), strict=True)` loads a teacher's weights.

    `s` is clamped to at least `s_floor` before c_noise(s) = k·ln(s)/4 is embedded, so s = 0 (the
    clean end of the trajectory) is a valid target time. k is the base's `noise_label_scale`
    (taken from `self.net.scalings`), so s is labelled exactly as the teacher labels t (k = 1000,
    250·ln s, for OpenAI's ADM teachers, as CTM's `time_embed_s` input). `t` must be positive, as
    for the teacher.
    """

    def __init__(self, base: EDMPrecond, *, copy_base: bool = True, s_floor: float = 1e-4):
        super().__init__()
        if not isinstance(base, EDMPrecond):
            raise ApctlError(
                f"TwoTimeDenoiser needs an EDMPrecond network to wrap, got {type(base).__name__}; "
                "import or rebuild the teacher as EDMPrecond (VP/VE/iDDPM teachers cannot be students)")
        if not isinstance(base.model, (SongUNet, DhariwalUNet)):
            raise ApctlError(
                f"TwoTimeDenoiser needs apctl's SongUNet or DhariwalUNet inside EDMPrecond, got {type(base.model).__name__}")
        if s_floor <= 0:
            raise ValueError("s_floor must be positive")
        self.net = copy.deepcopy(base) if copy_base else base
        self.net.requires_grad_(True)
        self.s_floor = float(s_floor)
        unet = self.net.model
        like = next(iter(unet.parameters()))
        embed, width = _fresh_embedding_like(unet)
        self.s_embedding = SEmbedding(embed, width, unet.emb_channels).to(device=like.device)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: EDMPrecond, **kwargs: Any) -> "TwoTimeDenoiser":
        """A student initialised from a deep copy of `teacher` (the teacher is left untouched)."""
        return cls(teacher, copy_base=True, **kwargs)

    @classmethod
    def from_init_kwargs(cls, init_kwargs: Mapping[str, Any], **kwargs: Any) -> "TwoTimeDenoiser":
        """A freshly initialised student whose base is `EDMPrecond(**init_kwargs)` (for resuming)."""
        return cls(EDMPrecond(**dict(init_kwargs)), copy_base=False, **kwargs)

    @property
    def init_kwargs(self) -> dict:
        """The wrapped EDMPrecond's constructor arguments (what a checkpoint records to rebuild it)."""
        return dict(self.net.init_kwargs)

    def output_weight(self) -> nn.Parameter:
        """The weight of the UNet's last output convolution (SongUNet: the full-resolution `aux_conv`;
        DhariwalUNet: `out_conv`), where CTM's adaptive DSM weight compares gradient norms."""
        unet = self.net.model
        if isinstance(unet, DhariwalUNet):
            return unet.out_conv.weight
        last = [name for name in unet.dec if name.endswith("aux_conv")][-1]
        return unet.dec[last].weight

    def freeze_s_embedding(self) -> None:
        """Keep E ≡ 0 (its last layer starts at zero) by taking the s-embedding out of training, so that
        D_θ(x, t, s) = D_θ(x, t) for every s: a one-time denoiser, as ECT trains."""
        self.s_embedding.requires_grad_(False)

    # ---- the function ----------------------------------------------------------------------
    def embed_s(self, s: torch.Tensor) -> torch.Tensor:
        """E(c_noise(max(s, s_floor))), shape [B, emb_channels]; c_noise is the base's (scale included)."""
        s = s.to(torch.float32).reshape(-1).clamp_min(self.s_floor)
        c_noise_s = self.net.scalings(s)[3]
        return self.s_embedding(c_noise_s)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None = None,
                **model_kwargs: Any) -> torch.Tensor:
        """D_θ(x, t, s, labels) with x: [B, C, H, W], t, s: [B] (or broadcastable), labels: [B, label_dim] or None."""
        t = torch.as_tensor(t, device=x.device)
        s = torch.as_tensor(s, device=x.device)
        return self.net(x, t, labels, extra_emb=self.embed_s(s), **model_kwargs)
