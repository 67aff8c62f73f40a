"""OpenAI's EDM-trained ADM (guided-diffusion `UNetModel`) as an apctl `EDMPrecond` teacher.

A plain torch state_dict of OpenAI's guided-diffusion `UNetModel` trained with
EDM's preconditioning (CTM's ImageNet-64 teacher `edm_imagenet64_ema.pt`, loaded with
`torch.load(weights_only=True)`). Its weights are mapped onto `DhariwalUNet`
(`adm_to_dhariwal_state_dict`) and it becomes `EDMPrecond(img_resolution=64,
model_type='DhariwalUNet', sigma_data=0.5, noise_label_scale=1000, ...)`, loaded with
`strict=True` and forward-checked. `noise_label_scale=1000` makes EDMPrecond feed the UNet
c_noise = 1000·¼·ln σ = 250·ln σ, the time label OpenAI/CTM use (a 1000× factor inside the
fixed positional embedding's cos/sin that no weight mapping could absorb).

What was checked against sony/ctm's code (read, not copied: `code/cm/karras_diffusion.py`,
`unet.py`, `nn.py`, `script_util.py` at ff12be7e; `code/cm_train.py` at 2e40d9c8;
`code/cm/image_datasets.py` at b62096cd; `code/cmd/ImageNet64/cmd-AWS/M20_w1.sh` at 3e3ccf6b):

- The teacher is `UNetModel` built by `create_model` with CTM's ImageNet-64 options
  (`--teacher_model_path=.../edm_imagenet64_ema.pt --class_cond=True --num_classes=1000`;
  192 channels, channel_mult (1, 2, 3, 4), 3 res blocks, attention at 32/16/8, 64 channels
  per head, use_scale_shift_norm, resblock_updown, learn_sigma=False, training_mode='teacher',
  so no time_embed_s / emb_layers_s) and loaded with a plain strict `load_state_dict` of the
  file: the file is a bare state_dict with those keys.
- Teacher call (`get_denoised_and_G(..., ctm=False, teacher=True)`):
  `model(c_in * x, rescaling_t(σ), s=None, teacher=True, y=y)` with
  `rescaling_t(σ) = 1000 * 0.25 * log(σ + 1e-44)`, `c_in = 1/√(σ² + σ_d²)`, and EDM's
  `c_skip = σ_d²/(σ² + σ_d²)`, `c_out = σ σ_d/√(σ² + σ_d²)`; D = c_skip x + c_out F.
  σ_d = `args.sigma_data` = 0.5 (CTM's default; the ImageNet-64 command read does not set it).
  For σ ≥ ~1e-37 the 1e-44 vanishes in float32 (CTM never calls the teacher at σ = 0), and
  fl(1000·(ln σ/4)) = fl(250·ln σ) exactly, so the time label is bit-identical.
- Time embedding `timestep_embedding`: [cos(t ω), sin(t ω)], ω_i = exp(−ln(10⁴) i/half),
  i < half = model_channels/2 — the same function as DhariwalUNet's PositionalEmbedding
  (max_positions 10⁴, endpoint False); float32 rounding of ω differs in the last bit.
- Class labels: `y` is an int64 [N] tensor, `label_emb = nn.Embedding(1000, 4·192)` added to
  the time embedding before the blocks' SiLU; DhariwalUNet's `map_label` (Linear without bias
  on a one-hot row) is the same map, so apctl labels must be one-hot rows. CTM's loader
  numbers classes by the sorted synset-id file-name prefixes (guided-diffusion's convention).
- Attention: `AttentionBlock` defaults to `attention_type='flash'` (create_model does not
  override it) and `QKVFlashAttention` reads the qkv conv's output rows as
  `(three, heads, 64)` ("b (three h d) s -> b s three h d"), softmax scale 1/√64; that is the
  layout `adm_to_dhariwal_state_dict` assumes. The other ordering (`QKVAttentionLegacy`,
  (heads, three, d)) is known to give broken samples with the released checkpoints (sony/ctm
  issue #5, openai/consistency_models PR #37). GroupNorm is 32 groups, eps 1e-5, in float32.

Assumed, not verifiable without the file or OpenAI's training run:
- that `edm_imagenet64_ema.pt` really is the 64×64 model above (the resolution is not in the
  weights; apctl assumes 64 for every ADM state_dict) and was trained with flash attention's
  qkv layout (only its loading/usage in CTM and the reports above say so);
- that OpenAI trained it with the same class numbering as CTM's loader (sorted synset ids);
- that a file given to apctl is that checkpoint: any ADM state_dict the mapping accepts is
  imported this way (CTM students with `time_embed_s`, learned sigma, conv resampling, no
  scale-shift norm, < 128-channel GroupNorms are refused; the layout and resolution are not
  otherwise checked against the 192-channel ImageNet-64 configuration);
- CTM runs the teacher in fp16 on GPU (`convert_to_fp16`, flash attention needs fp16); apctl
  runs it in float32 (use_fp16=False), so outputs differ from CTM's by fp16 rounding only;
- sigma_min/sigma_max are left at EDM's EDMPrecond defaults (0, inf); CTM samples in
  [0.002, 80]. Unconditional use (labels=None → a zero label row) is a function the ADM
  teacher never computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from apctl.errors import ApctlError
from apctl.files import file_digest
from apctl.teachers.bundle import TeacherBundle
from apctl.teachers.rebuild import build_and_load

# What the weights of OpenAI's EDM-trained ADM checkpoints do not record.
ADM_IMG_RESOLUTION = 64          # edm_imagenet64_ema.pt
ADM_NOISE_LABEL_SCALE = 1000.0   # c_noise = 1000 * 0.25 * ln(sigma)
ADM_SIGMA_DATA = 0.5


def adm_to_dhariwal_state_dict(adm: Mapping[str, Any], img_resolution: int = 64,
                               channels_per_head: int = 64) -> tuple[dict, dict]:
    """Map an OpenAI ADM state_dict (resblock_updown, use_scale_shift_norm, heads of
    `channels_per_head` channels, qkv laid out (three, head, channel) as in openai/consistency_models
    and sony/ctm) onto DhariwalUNet's parameter names.

    Returns (DhariwalUNet init kwargs, {name: tensor}) covering every DhariwalUNet *parameter*
    (its constant resample-filter buffers are not in ADM files). The image resolution is not
    recorded in ADM weights and must be given. Raises ApctlError for layouts DhariwalUNet cannot
    express (conv resampling, no scale-shift norm, learned sigma, fewer than 128 channels, …).
    """
    used: set[str] = set()

    def get(key: str):
        if key not in adm:
            raise ApctlError(f"ADM state_dict lacks {key}")
        used.add(key)
        return adm[key]

    def has_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in adm)

    if has_prefix("time_embed_s.") or any(".emb_layers_s." in key for key in adm):
        raise ApctlError("ADM state_dict holds CTM student parts (time_embed_s / emb_layers_s); "
                         "it is a CTM student, not an EDM-trained teacher")
    mc = int(get("time_embed.0.weight").shape[1])
    emb = int(get("time_embed.0.weight").shape[0])
    in_ch = int(get("input_blocks.0.0.weight").shape[1])
    out_ch = int(get("out.2.weight").shape[0])
    label_dim = int(adm["label_emb.weight"].shape[0]) if "label_emb.weight" in adm else 0
    if emb % mc:
        raise ApctlError("ADM state_dict: embedding width is not a multiple of model_channels")
    if out_ch != in_ch:
        raise ApctlError(f"ADM state_dict has {out_ch} output channels for {in_ch} input channels "
                         "(learned sigma); EDMPrecond needs equal counts")
    if any(".op.weight" in k for k in adm) or any(k.endswith(".conv.weight") and "blocks" in k for k in adm):
        raise ApctlError("ADM state_dict uses convolutional resampling (resblock_updown=False); "
                         "DhariwalUNet resamples inside residual blocks only")
    n_in = 1 + max(int(k.split(".")[1]) for k in adm if k.startswith("input_blocks."))
    n_out = 1 + max(int(k.split(".")[1]) for k in adm if k.startswith("output_blocks."))

    def is_resblock(prefix: str) -> bool:
        return f"{prefix}.in_layers.0.weight" in adm

    def is_attn(prefix: str) -> bool:
        return f"{prefix}.qkv.weight" in adm

    # Output blocks ending in an extra (upsampling) resblock mark level boundaries.
    ups = []
    for k in range(n_out):
        subs = sorted({int(key.split(".")[2]) for key in adm if key.startswith(f"output_blocks.{k}.")})
        if subs and subs[-1] > 0 and is_resblock(f"output_blocks.{k}.{subs[-1]}"):
            ups.append(k)
    levels = len(ups) + 1
    if n_out % levels:
        raise ApctlError("ADM state_dict: output blocks do not split evenly into levels")
    num_blocks = n_out // levels - 1
    if n_in != levels * (num_blocks + 1):
        raise ApctlError("ADM state_dict: input and output block counts do not describe one UNet")

    def out_width(prefix: str) -> int:
        return int(get(f"{prefix}.out_layers.3.weight").shape[0])

    channel_mult, attn_res = [], set()
    for level in range(levels):
        first = 1 + level * (num_blocks + 1)
        width = out_width(f"input_blocks.{first}.0")
        if width % mc:
            raise ApctlError("ADM state_dict: a level's width is not a multiple of model_channels")
        channel_mult.append(width // mc)
        if is_attn(f"input_blocks.{first}.1"):
            attn_res.add(img_resolution >> level)
    enc_res = [img_resolution >> level for level in range(levels)]
    kwargs = dict(img_resolution=img_resolution, in_channels=in_ch, out_channels=out_ch, label_dim=label_dim,
                  augment_dim=0, model_channels=mc, channel_mult=channel_mult, channel_mult_emb=emb // mc,
                  num_blocks=num_blocks, attn_resolutions=sorted(attn_res, reverse=True), dropout=0.0)

    out: dict[str, Any] = {}

    def put(dst: str, src: str, transform=None):
        t = get(src)
        out[dst] = transform(t) if transform is not None else t

    def as_conv2d(t):  # consistency_models stores 1×1 attention convs as conv1d weights
        return t if t.dim() == 4 else t.reshape(*t.shape, *([1] * (4 - t.dim())))

    def res_block(dst: str, src: str, width_in: int, width_out: int):
        if not is_resblock(src):
            raise ApctlError(f"ADM state_dict: {src} is not a residual block")
        if int(get(f"{src}.emb_layers.1.weight").shape[0]) != 2 * width_out:
            raise ApctlError("ADM state_dict: residual blocks without scale-shift norm "
                             "(use_scale_shift_norm=False) cannot be expressed by DhariwalUNet")
        for w in (width_in, width_out):
            if w < 128:
                raise ApctlError(f"ADM state_dict: {w}-channel GroupNorm (32 groups) differs from "
                                 "DhariwalUNet's (min(32, C/4) groups) below 128 channels")
        for a, b in (("norm0", "in_layers.0"), ("conv0", "in_layers.2"), ("affine", "emb_layers.1"),
                     ("norm1", "out_layers.0"), ("conv1", "out_layers.3")):
            put(f"{dst}.{a}.weight", f"{src}.{b}.weight")
            put(f"{dst}.{a}.bias", f"{src}.{b}.bias")
        if f"{src}.skip_connection.weight" in adm:
            put(f"{dst}.skip.weight", f"{src}.skip_connection.weight", as_conv2d)
            put(f"{dst}.skip.bias", f"{src}.skip_connection.bias")

    def attention(dst: str, src: str, width: int):
        if width % channels_per_head:
            raise ApctlError(f"ADM state_dict: {width} channels do not split into heads of {channels_per_head}")
        heads, d = width // channels_per_head, channels_per_head
        put(f"{dst}.norm2.weight", f"{src}.norm.weight")
        put(f"{dst}.norm2.bias", f"{src}.norm.bias")
        w = as_conv2d(get(f"{src}.qkv.weight"))  # rows (three, head, d) → EDM's (head, d, three)
        out[f"{dst}.qkv.weight"] = w.reshape(3, heads, d, *w.shape[1:]).permute(1, 2, 0, 3, 4, 5).reshape(w.shape)
        out[f"{dst}.qkv.bias"] = get(f"{src}.qkv.bias").reshape(3, heads, d).permute(1, 2, 0).reshape(-1)
        put(f"{dst}.proj.weight", f"{src}.proj_out.weight", as_conv2d)
        put(f"{dst}.proj.bias", f"{src}.proj_out.bias")

    put("map_layer0.weight", "time_embed.0.weight")
    put("map_layer0.bias", "time_embed.0.bias")
    put("map_layer1.weight", "time_embed.2.weight")
    put("map_layer1.bias", "time_embed.2.bias")
    if label_dim:
        put("map_label.weight", "label_emb.weight", lambda t: t.t().contiguous())
    top = enc_res[0]
    put(f"enc.{top}x{top}_conv.weight", "input_blocks.0.0.weight")
    put(f"enc.{top}x{top}_conv.bias", "input_blocks.0.0.bias")

    # Encoder: per level, num_blocks blocks, then (not on the last level) a downsampling block,
    # which EDM files under the next level's name.
    k, width = 1, mc * channel_mult[0]
    skips = [width]
    for level, mult in enumerate(channel_mult):
        res = enc_res[level]
        for i in range(num_blocks):
            new = mc * mult
            res_block(f"enc.{res}x{res}_block{i}", f"input_blocks.{k}.0", width, new)
            width = new
            if is_attn(f"input_blocks.{k}.1"):
                attention(f"enc.{res}x{res}_block{i}", f"input_blocks.{k}.1", width)
            skips.append(width)
            k += 1
        if level != levels - 1:
            nxt = enc_res[level + 1]
            res_block(f"enc.{nxt}x{nxt}_down", f"input_blocks.{k}.0", width, width)
            skips.append(width)
            k += 1
    # Middle: resblock + attention, resblock.
    low = enc_res[-1]
    res_block(f"dec.{low}x{low}_in0", "middle_block.0", width, width)
    attention(f"dec.{low}x{low}_in0", "middle_block.1", width)
    res_block(f"dec.{low}x{low}_in1", "middle_block.2", width, width)
    # Decoder: per level (deepest first), num_blocks + 1 blocks; the last one of every level but
    # the top ends in an upsampling resblock, which EDM files under the next level's name.
    k = 0
    for level in reversed(range(levels)):
        res = enc_res[level]
        for i in range(num_blocks + 1):
            new = mc * channel_mult[level]
            src = f"output_blocks.{k}"
            res_block(f"dec.{res}x{res}_block{i}", f"{src}.0", width + skips.pop(), new)
            width = new
            sub = 1
            if is_attn(f"{src}.1"):
                attention(f"dec.{res}x{res}_block{i}", f"{src}.1", width)
                sub = 2
            if level and i == num_blocks:
                up = enc_res[level - 1]
                res_block(f"dec.{up}x{up}_up", f"{src}.{sub}", width, width)
            k += 1
    put("out_norm.weight", "out.0.weight")
    put("out_norm.bias", "out.0.bias")
    put("out_conv.weight", "out.2.weight")
    put("out_conv.bias", "out.2.bias")
    from apctl.networks import build_network

    reference = build_network("DhariwalUNet", kwargs, device="meta")
    expected = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    got = {name: tuple(t.shape) for name, t in out.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
        raise ApctlError(f"ADM state_dict does not map onto DhariwalUNet: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, shape mismatches {shapes[:3]}")
    unused = sorted(set(adm) - used)
    if unused:
        raise ApctlError(f"ADM state_dict holds {len(unused)} entries DhariwalUNet has no place for "
                         f"(e.g. {', '.join(unused[:3])})")
    return kwargs, {name: t.detach() for name, t in out.items()}


def adm_edm_precond_kwargs(unet_kwargs: Mapping[str, Any]) -> dict:
    """EDMPrecond init_kwargs for an OpenAI EDM-trained ADM whose DhariwalUNet kwargs are `unet_kwargs`.

    σ_d = 0.5, c_noise = 1000·¼·ln σ (`noise_label_scale=1000`), float32 (see the module docstring).
    """
    unet = dict(unet_kwargs)
    if unet.pop("in_channels") != unet.pop("out_channels"):
        raise ApctlError("ADM state_dict: EDMPrecond needs as many output channels as input channels")
    return dict(img_resolution=unet.pop("img_resolution"), img_channels=unet_kwargs["in_channels"],
                label_dim=unet.pop("label_dim"), use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                sigma_data=ADM_SIGMA_DATA, model_type="DhariwalUNet", noise_label_scale=ADM_NOISE_LABEL_SCALE,
                **unet)


def _adm_buffers(init_kwargs: Mapping[str, Any]) -> dict:
    """The constant buffers DhariwalUNet has and ADM files lack: the 2× resample filters.

    ADM resamples by 2×2 average pooling and nearest-neighbour upsampling, which is
    DhariwalUNet's FIR filter f fᵀ/(Σf)² with f = (1, 1): a [1, 1, 2, 2] kernel of 1/4.
    """
    import torch

    from apctl.networks import build_network

    skeleton = build_network("EDMPrecond", init_kwargs, device="meta")
    params = {name for name, _ in skeleton.named_parameters()}
    out = {}
    for name, value in skeleton.state_dict().items():
        if name in params:
            continue
        if not name.endswith(".resample_filter") or tuple(value.shape) != (1, 1, 2, 2):
            raise ApctlError(f"ADM state_dict: DhariwalUNet buffer {name} {list(value.shape)} has no ADM "
                             "counterpart")
        out[name] = torch.full((1, 1, 2, 2), 0.25)
    return out


def load_openai_adm(path: Path, adm: Mapping[str, Any]) -> TeacherBundle:
    """The teacher the ADM state_dict `adm` (read from `path`) describes: mapped onto DhariwalUNet,
    wrapped in EDMPrecond (`adm_edm_precond_kwargs`), loaded with strict=True and forward-checked."""
    what = f"OpenAI ADM state_dict {path}"
    try:
        unet_kwargs, mapped = adm_to_dhariwal_state_dict(adm, img_resolution=ADM_IMG_RESOLUTION)
        init_kwargs = adm_edm_precond_kwargs(unet_kwargs)
        state_dict = {f"model.{name}": t for name, t in mapped.items()}
        state_dict.update(_adm_buffers(init_kwargs))
    except ApctlError as exc:
        raise ApctlError(f"{path}: {exc}") from None
    network = build_and_load("EDMPrecond", init_kwargs, state_dict, what)
    arch = {"class_name": "EDMPrecond", "init_kwargs": dict(network.init_kwargs)}
    layout = {k: unet_kwargs[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions",
                                           "label_dim")}
    return TeacherBundle.imported(network, arch, "openai-adm", path.name, file_digest(path),
                                  extras={"adm_layout": layout, "time_label": "1000 * 0.25 * ln(sigma)",
                                          "assumed_img_resolution": ADM_IMG_RESOLUTION})
