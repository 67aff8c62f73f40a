"""The two UNet families of EDM: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM).

Constructor arguments, defaults, module names, parameter/buffer names and shapes follow NVlabs/edm
`training/networks.py`, so an EDM checkpoint's state dict loads with `strict=True`. The only
addition is the optional `extra_emb` argument of `forward` (see below); with `extra_emb=None`
both networks compute exactly EDM's function.

Both networks map (x, c_noise, labels) to F(x) of the same spatial size:

    emb   = MLP(embed(c_noise) [+ label and augmentation terms])        conditioning vector
    skips = encoder(x, emb)                                              one tensor per block
    F     = decoder(skips, emb)                                          concatenating skips

`extra_emb` — a tensor of shape [B, emb_channels] or [1, emb_channels], emb_channels =
model_channels · channel_mult_emb — is added to the *pre-activation* of the embedding MLP's last
stage, i.e. right before its final SiLU:

    SongUNet:      emb = silu(map_layer1(h) + extra_emb)
    DhariwalUNet:  emb = silu(map_layer1(h) + map_label(labels) + extra_emb)

(for ADM this is the same place the class label enters). The two-time CTM student passes its
second time through it; a zero `extra_emb` leaves the output bit-for-bit unchanged.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from apctl.networks.edm_layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock

__all__ = ["SongUNet", "DhariwalUNet"]


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Classifier-free-guidance label dropout: zero each sample's label vector with probability p."""
    if not (training and p):
        return labels
    keep = (torch.rand([labels.shape[0], 1], device=labels.device) >= p).to(labels.dtype)
    return labels * keep


def _add_extra(pre: torch.Tensor, extra_emb: torch.Tensor | None) -> torch.Tensor:
    return pre if extra_emb is None else pre + extra_emb.to(pre.dtype)


class SongUNet(nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021) as configured in EDM.

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
            decoder_type='standard', resample_filter=[1,1].
    NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
            decoder_type='standard', resample_filter=[1,3,3,1].

    Level ℓ works at resolution img_resolution / 2^ℓ with model_channels · channel_mult[ℓ]
    channels. Encoder entries are named `{r}x{r}_conv` (level 0 input conv), `{r}x{r}_down`,
    `{r}x{r}_block{i}` and the auxiliary input path `{r}x{r}_aux_down|aux_skip|aux_residual`;
    decoder entries `{r}x{r}_in0|in1` (bottleneck), `{r}x{r}_up`, `{r}x{r}_block{i}` and the
    auxiliary output path `{r}x{r}_aux_up|aux_norm|aux_conv`. The output is the sum of the
    aux_conv outputs (one, at full resolution, for the 'standard' decoder).
    """

    def __init__(self,
                 img_resolution: int,
                 in_channels: int,
                 out_channels: int,
                 label_dim: int = 0,
                 augment_dim: int = 0,
                 model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4,
                 num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10,
                 label_dropout: float = 0,
                 embedding_type: str = "positional",
                 channel_mult_noise: int = 1,
                 encoder_type: str = "standard",
                 decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', not {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', not {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', not {decoder_type!r}")
        super().__init__()
        channel_mult = list(channel_mult)
        attn_resolutions = list(attn_resolutions)
        resample_filter = list(resample_filter)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.emb_channels = emb_channels = model_channels * channel_mult_emb
        self.noise_channels = noise_channels = model_channels * channel_mult_noise

        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        blk = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                   eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                   init=init, init_zero=init_zero, init_attn=init_attn)

        # Embedding MLP.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `c` is the running feature width, `c_aux` the width of the auxiliary input path.
        self.enc = nn.ModuleDict()
        c = c_aux = in_channels
        for level, mult in enumerate(channel_mult):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels, kernel=3, **init)
                c = model_channels
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{r}x{r}_aux_down"] = Conv2d(c_aux, c_aux, kernel=0, down=True,
                                                           resample_filter=resample_filter)
                    self.enc[f"{r}x{r}_aux_skip"] = Conv2d(c_aux, c, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{r}x{r}_aux_residual"] = Conv2d(c_aux, c, kernel=3, down=True,
                                                               resample_filter=resample_filter,
                                                               fused_resample=True, **init)
                    c_aux = c
            for i in range(num_blocks):
                c_new = model_channels * mult
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, c_new, attention=(r in attn_resolutions), **blk)
                c = c_new
        skip_widths = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level in range(last, -1, -1):
            mult = channel_mult[level]
            r = img_resolution >> level
            if level == last:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **blk)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **blk)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **blk)
            for i in range(num_blocks + 1):
                c_in = c + skip_widths.pop()
                c = model_channels * mult
                attn = (i == num_blocks) and (r in attn_resolutions)
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(c_in, c, attention=attn, **blk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    self.dec[f"{r}x{r}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                         resample_filter=resample_filter)
                self.dec[f"{r}x{r}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{r}x{r}_aux_conv"] = Conv2d(c, out_channels, kernel=3, **init_zero)

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                  augment_labels: torch.Tensor | None = None,
                  extra_emb: torch.Tensor | None = None) -> torch.Tensor:
        """emb = silu(L1(silu(L0(e))) + extra_emb), e = swap(embed(c_noise)) + L_y(√d·y) + L_a(a).

        `swap` exchanges the cos and sin halves of the noise embedding (as EDM does).
        """
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            y = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(_add_extra(self.map_layer1(emb), extra_emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, extra_emb: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embedding(noise_labels, class_labels, augment_labels, extra_emb)

        # Encoder: the aux entries refine the most recent skip with the (down-sampled) input.
        skips: list[torch.Tensor] = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder: the aux entries accumulate the image-space output.
        out = None
        h = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                h = block(x)
            elif "aux_conv" in name:
                h = block(F.silu(h))
                out = h if out is None else h + out
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as configured in EDM.

    Adaptive group-norm blocks (scale/shift from the embedding), multi-head attention with 64
    channels per head at `attn_resolutions`, nearest/average 2× resampling, 3×3 output conv after
    a final GroupNorm + SiLU. Module names: `map_*`, `enc.{r}x{r}_conv|down|block{i}`,
    `dec.{r}x{r}_in0|in1|up|block{i}`, `out_norm`, `out_conv`.
    """

    def __init__(self,
                 img_resolution: int,
                 in_channels: int,
                 out_channels: int,
                 label_dim: int = 0,
                 augment_dim: int = 0,
                 model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4,
                 num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10,
                 label_dropout: float = 0):
        super().__init__()
        channel_mult = list(channel_mult)
        attn_resolutions = list(attn_resolutions)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.emb_channels = emb_channels = model_channels * channel_mult_emb
        self.noise_channels = model_channels

        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        blk = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Embedding MLP.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = nn.ModuleDict()
        c = in_channels
        for level, mult in enumerate(channel_mult):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels * mult, kernel=3, **init)
                c = model_channels * mult
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **blk)
            for i in range(num_blocks):
                c_new = model_channels * mult
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, c_new, attention=(r in attn_resolutions), **blk)
                c = c_new
        skip_widths = [m.out_channels for m in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level in range(last, -1, -1):
            mult = channel_mult[level]
            r = img_resolution >> level
            if level == last:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **blk)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **blk)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **blk)
            for i in range(num_blocks + 1):
                c_in = c + skip_widths.pop()
                c = model_channels * mult
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(c_in, c, attention=(r in attn_resolutions), **blk)
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, kernel=3, **init_zero)

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                  augment_labels: torch.Tensor | None = None,
                  extra_emb: torch.Tensor | None = None) -> torch.Tensor:
        """emb = silu(L1(silu(L0(embed(c_noise) + L_a(a)))) + L_y(y) + extra_emb)."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        return F.silu(_add_extra(emb, extra_emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, extra_emb: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embedding(noise_labels, class_labels, augment_labels, extra_emb)
        skips: list[torch.Tensor] = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
