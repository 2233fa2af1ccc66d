"""Causal-3D: a 3D causal-convolution KL-VAE in the style of CogVideoX's VAE (arXiv:2408.06072,
Sec. 2.1) and OD-VAE (arXiv:2409.01199, Sec. 3).

Every convolution is causal in time (`CausalConv3d`: the past is padded with copies of the first
frame), GroupNorm and the mid-block attention work per frame, and the two temporal 2x
downsamplings keep the first frame alone, so a clip of ``1 + 4k`` frames becomes ``1 + k`` latent
frames (the first latent frame is an image latent) and latent frame ``j`` depends on input frames
``<= 4j`` only; decoding is causal in the same sense. Compression: 4x time, 8x space (VCPR 256 for
long clips). It is the base that MTC-VAE converts: the temporal resamplers live in their own lists
``encoder.temporal_down`` / ``decoder.temporal_up`` (one slot per resolution boundary, `nn.Identity`
where time is not resampled) so extra 2x layers can be added in empty slots.

CogVideoX's VAE itself (diffusers ``AutoencoderKLCogVideoX``) is a causal3d with four options, the
registered ``causal3d-cogvideox``: GroupNorm over the frames of each processed chunk (``norm="clip"``),
decoder norms modulated by the latent (``spatial_norm``, `blocks.SpatialNorm`), time upsampled at the
decoder's two DEEPEST boundaries (``temporal_up``), and chunked processing (``chunk_latent_frames=2``:
the encoder takes 8 frames at a time, the decoder 2 latent frames, the remainder going to the first
chunk, every causal conv carrying its past across chunks) -- with clip norms the chunks define the
statistics, exactly as diffusers runs it. CogVideoX resamples time without parameters (the mean of
each pair of frames; each frame twice); our learned `TemporalDownsample` / `TemporalUpsample` hold
those exactly (`average_resamplers`), which also gives MTC-VAE trainable copies to start from.
``ldm convert --source diffusers:AutoencoderKLCogVideoX`` reproduces the diffusers model for clips of
``1 + 8k`` frames (odd latent lengths, the ones its decoder maps back to ``1 + 4k`` frames).

IV-VAE's baseline (Wu et al., "Improved Video VAE for Latent Video Diffusion Model", Sec. 3.1 and
Table 4's row (A), "the baseline method Causal VAE") is a causal3d with three more switches, each
off by default: ``norm="rms"`` (channel RMSNorm, Sec. 3.5), ``upsample_shrink`` (the spatial
upsampler halves the width, Sec. 3.5) and ``temporal_padding="group"`` (Table 4's "(A) + group
causal conv": every 3x3x3 convolution a `GroupCausalConv3d`, Sec. 3.2, at its level's frame-group
size 4 / 2 / 1; the temporal resamplers stay causal). Registered as ``causal3d-ivvae-baseline-z8``
and ``causal3d-ivvae-baseline-z8-gc``. From the paper: Z = 8 (Sec. 4.4), base width 96 (Sec. 4.2),
2 attention blocks (Sec. 3.4: "from 2 to 7"), 4x8x8, RMSNorm and the shrinking upsampler (Sec. 3.5
describes them as changes for "the 3D causal VAE"), 127M parameters (Sec. 4.4). Our guesses, the
layout of IV-VAE's public code at width 96: channel_mult (1, 2, 4, 4), 2 ResBlocks per level (3 in
the decoder), time downsampled at the two deepest boundaries, one mid-block attention in the encoder
and one in the decoder, a plain 3x3x3 head (no TMPE): 126.6M. The group-causal padding of a frame
group of one (the fully compressed levels) is a 3-tap window [previous frame, frame, zero], which
keeps the parameters unchanged as Table 4 says; the alternative, a 2D convolution there (IV-VAE's
KTC units, Sec. 3.3), would not.

As the paper (Sec. 3.1, and Sec. 4.4 for every Table 4 row), the baseline starts from an image VAE
with the same Z: ``Causal3D.from_kl2d`` / ``ldm convert --source saved --target
causal3d-ivvae-baseline-z8`` (`inflate_kl2d`) takes a ``kl2d-ivvae-z16-dim96`` (8 latent channels,
width 96, RMSNorm, shrinking upsampler: the same layout). Each 3x3 kernel goes to the current frame's
tap: ``[0, 0, W]`` in a causal conv (the paper), ``[0, W, 0]`` in a GCConv (our reading: the tap that
sees only its own frame); the new temporal resamplers take ``[0, 0, I]`` too: the downsampler keeps
the later frame of each pair, the upsampler repeats each frame. At step 0 the model is the image VAE
applied to frame 0 and to the last frame of each group of 4 (latent frame ``j`` = its latent of frame
``4j``), each decoded frame repeated over its group: an image and every frame of a static video are
reconstructed as the image VAE does, up to float rounding (~2e-6); in a moving video frames ``4j-3 ..
4j-1`` get frame ``4j``'s reconstruction. The image VAE's quant convs are why the baseline has
``quant_conv=True``: the encoder's would fold exactly into ``conv_out``, the decoder's post-quant conv
not into ``conv_in`` (its bias would reach the zero-padded border); IV-VAE's public code (SD-VAE's
lineage) has both too. Guess (ours, then the alternative): the downsampler keeps the later frame of
a pair (as ``[0, 0, W]`` does) - or the pair's mean (CogVideoX, `average_resamplers`; equal on a
static video) or the earlier one (the group's first frame, IV-VAE's keyframe). ``--target causal3d``
inflates any kl2d (an SD VAE too, GroupNorm per frame: OD-VAE's tail initialisation) into a causal3d
of its own layout.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autoencoders.base import REGISTRY, AEConfig, Autoencoder, causal_grid_spec, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, TEMPORAL_PADDINGS, CausalConv3d, ConvDecoder, ConvEncoder,
                                 GroupCausalConv3d, StreamCache, TemporalDownsample, TemporalUpsample,
                                 check_latent_stats, chunk_spans, grid_z, split_moments)
from autoencoders.ivvae_layers import inflate_at
from autoencoders.kl2d import KL2D, KL2DConfig
from autoencoders.sources import Conversion, KeyMap, compare, open_diffusers, register_initialiser, register_source
from ldm import config as cfglib
from ldm.errors import UserError
from ldm.latent import Cond, Latent, LatentSpec


@dataclass(frozen=True)
class Causal3DConfig(AEConfig):
    latent_channels: int = 16
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; 2x spatial down between levels
    temporal_down: tuple[bool, ...] = (True, True, False)  # per boundary: also 2x down in time
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more)
    attention: bool = True  # per-frame self-attention in the mid block
    norm_groups: int = 32
    # per-frame GroupNorm (causal) | "clip": over the frames of each chunk (CogVideoX) | "rms": channel
    # RMSNorm (IV-VAE Sec. 3.5)
    norm: str = "group"
    spatial_norm: bool = False  # decoder norms modulated by the latent (CogVideoX)
    temporal_up: tuple[bool, ...] = ()  # decoder: per boundary, upsample time; () = mirror temporal_down
    upsample_shrink: bool = False  # the decoder's spatial upsamplers halve the width (IV-VAE Sec. 3.5)
    # 1x1x1 convs around the latent, as kl2d's (SD-VAE's): an image VAE with them inflates exactly (from_kl2d)
    quant_conv: bool = False
    # 3x3x3 convolutions: "causal" (frame t sees frames <= t) | "group": IV-VAE's GCConv (Sec. 3.2),
    # bidirectional inside a frame group (4 / 2 / 1 frames as time is compressed), causal between groups
    temporal_padding: str = "causal"
    # 0: one pass; n > 0: n latent frames per chunk (encoder: n * rate frames), the remainder first,
    # causal state carried across. With per-frame norms the result is the same; with clip norms the
    # chunks define the statistics (CogVideoX: 2)
    chunk_latent_frames: int = 0
    dropout: float = 0.0
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP


@register_family
class Causal3D(Autoencoder):
    """Causal 3D KL-VAE: ``B C (1+rk) H W -> z: B c (1+k) H/f W/f`` with ``r = 2 ** sum(temporal_down)``
    and ``f = 2 ** (len(channel_mult) - 1)``."""

    family = "causal3d"
    config_cls = Causal3DConfig
    spatial_tiling = True

    def __init__(self, config: Causal3DConfig):
        super().__init__(config)
        boundaries = len(config.channel_mult) - 1
        for name in ("temporal_down", "temporal_up"):
            flags = getattr(config, name)
            if len(flags) != boundaries and not (name == "temporal_up" and not flags):
                raise ValueError(f"{name} needs one flag per resolution boundary ({boundaries}), got {flags}")
        if config.temporal_up and sum(config.temporal_up) != sum(config.temporal_down):
            raise ValueError(f"the decoder must upsample time as often as the encoder downsamples it: "
                             f"temporal_up={config.temporal_up}, temporal_down={config.temporal_down}")
        if config.norm not in ("group", "clip", "rms") or config.chunk_latent_frames < 0:
            raise ValueError(f"norm must be 'group', 'clip' or 'rms' and chunk_latent_frames >= 0, got "
                             f"{config.norm!r}, {config.chunk_latent_frames}")
        if config.temporal_padding not in TEMPORAL_PADDINGS:
            raise ValueError(f"temporal_padding must be one of {TEMPORAL_PADDINGS} (group causal GCConv, plain "
                             f"causal conv), got {config.temporal_padding!r}")
        arch = dict(base_channels=config.base_channels, channel_mult=config.channel_mult,
                    num_res_blocks=config.num_res_blocks, dims=3, groups=config.norm_groups,
                    attention=config.attention, dropout=config.dropout, norm=config.norm,
                    temporal_padding=config.temporal_padding)
        z = config.latent_channels
        check_latent_stats(config, z)
        self.encoder = ConvEncoder(config.in_channels, 2 * z, temporal=config.temporal_down, **arch)
        self.decoder = ConvDecoder(z, config.in_channels, temporal=config.temporal_up or config.temporal_down,
                                   spatial_norm=config.spatial_norm, upsample_shrink=config.upsample_shrink, **arch)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1) if config.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv3d(z, z, 1) if config.quant_conv else nn.Identity()

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.config.temporal_down)

    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        return causal_grid_spec(self, frames, height, width, self.temporal_factor, self.spatial_factor,
                                self.config.latent_channels)

    def encoder_moments(self, video: Tensor, extra: Mapping[int, Sequence[nn.Module]] | None = None) -> Tensor:
        """Encoder (and quant conv) output ``B 2c t h w`` (``extra``: further temporal downsamplers per
        slot, MTC-VAE), in one pass or chunk by chunk (``config.chunk_latent_frames``)."""
        self._check_extra(extra)
        n = self.config.chunk_latent_frames
        if not n:
            return self.quant_conv(self.encoder(video, extra))
        rate = self.temporal_factor * 2 ** sum(len(v) for v in (extra or {}).values())
        cache = StreamCache()
        moments = torch.cat([self.encoder(video[:, :, s:e], extra, cache)
                             for s, e in chunk_spans(video.shape[2], n * rate)], dim=2)  # (B, 2c, t, h, w)
        return self.quant_conv(moments)

    def decoder_video(self, z: Tensor, extra: Mapping[int, Sequence[nn.Module]] | None = None) -> Tensor:
        """(Post-quant conv and) decoder ``B c t h w -> B C T H W`` (``extra``: further temporal upsamplers
        per slot), in one pass or ``config.chunk_latent_frames`` latent frames at a time."""
        self._check_extra(extra)
        z = self.post_quant_conv(z)
        n = self.config.chunk_latent_frames
        if not n:
            return self.decoder(z, extra)
        cache = StreamCache()
        return torch.cat([self.decoder(z[:, :, s:e], extra, cache) for s, e in chunk_spans(z.shape[2], n)], dim=2)

    def _check_extra(self, extra: Mapping[int, Sequence[nn.Module]] | None) -> None:
        if extra and self.config.temporal_padding == "group":
            raise ValueError(f"{self.family}: further temporal resamplers (MTC-VAE) would change the frame groups of "
                             "temporal_padding='group'; use temporal_padding='causal'")

    @classmethod
    def from_kl2d(cls, image_vae: KL2D, target: str | None = None) -> "Causal3D":
        """A causal3d initialised from a ``kl2d`` image VAE with the same latent channels (`inflate_kl2d`,
        IV-VAE Sec. 3.1): the registered ``target`` (``causal3d-ivvae-baseline-z8``, whose layout the
        image VAE must have: ``kl2d-ivvae-z16-dim96``), or by default the image VAE's own layout
        (`config_from_kl2d`). The latent statistics are the image VAE's (at step 0 its latents)."""
        if target is not None and (target not in REGISTRY or REGISTRY[target][0] is not cls):
            raise ValueError(f"{target!r} is not a registered {cls.family}")
        config = REGISTRY[target][1] if target is not None else config_from_kl2d(image_vae.config)
        model = cls(config)
        inflate_kl2d(model, image_vae, target or cls.family)  # first: a mismatch names its fields, not the stats'
        c = image_vae.config
        model.config = cfglib.replace(model.config, latent_scale=c.latent_scale, latent_shift=c.latent_shift)
        return model

    def set_chunk_frames(self, frames: int | None) -> None:
        """Stream long clips ``frames`` video frames at a time (a multiple of the temporal factor; the
        remainder joins the first chunk) with the one-shot result, for per-frame norms. With clip
        norms (CogVideoX) the chunks define the statistics: they are part of the model."""
        r = self.temporal_factor
        if self.config.norm == "clip":
            raise ValueError(f"{self.family}: with clip-wise norms the chunks ({self.config.chunk_latent_frames} latent "
                             "frames, as CogVideoX) are part of the model; use spatial tiling for memory")
        if frames and (frames < r or frames % r):  # None or 0: one shot, as every streaming family
            raise ValueError(f"{self.family}: chunk frames must be a positive multiple of {r}, got {frames}")
        self.config = cfglib.replace(self.config, chunk_latent_frames=(frames or 0) // r)

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        mean, logvar = split_moments(self.encoder_moments(video), self.config.logvar_clamp)  # each (B, c, t, h, w)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        return self.decoder_video(grid_z(latent, self.config.latent_channels, self.family))  # (B, C, T, H, W)


def average_resamplers(model: nn.Module) -> None:
    """Set every 2x temporal resampler of ``model`` to CogVideoX's parameter-free one: a
    `TemporalDownsample` to the mean of each pair (kernel ``[0, 1/2, 1/2]`` over frames
    ``2j-2, 2j-1, 2j``; frame 0 stays itself), a `TemporalUpsample` to repeating each frame
    (both sub-frames copy the current frame; frame 0 stays alone)."""
    _identity_resamplers(model, {1: 0.5, 2: 0.5})


def current_frame_resamplers(model: nn.Module) -> None:
    """Set every 2x temporal resampler of ``model`` to IV-VAE Sec. 3.1's inflation ``[0, 0, I]``: a
    `TemporalDownsample` keeps the current (later) frame of each pair, ``2j`` (frame 0 stays itself),
    so two of them keep frame ``4j`` of each group of four; a `TemporalUpsample` repeats each frame."""
    _identity_resamplers(model, {2: 1.0})


@torch.no_grad()
def _identity_resamplers(model: nn.Module, down_taps: Mapping[int, float]) -> None:
    """Every 2x `TemporalDownsample` of ``model`` to ``sum_tap down_taps[tap] * frame(tap)`` per
    channel (taps 0, 1, 2 = frames ``2j-2, 2j-1, 2j``), every `TemporalUpsample` to repeating the
    current frame into both sub-frames; zero biases."""
    for m in model.modules():
        if isinstance(m, (TemporalDownsample, TemporalUpsample)) and m.factor != 2:
            raise ValueError(f"only 2x resamplers have CogVideoX's form, got x{m.factor}")
        if isinstance(m, TemporalDownsample):
            c = m.conv.in_channels
            eye = torch.eye(c, dtype=m.conv.weight.dtype, device=m.conv.weight.device)
            m.conv.weight.zero_()
            for tap, weight in down_taps.items():
                m.conv.weight[:, :, tap, 0, 0] = eye * weight
            m.conv.bias.zero_()
        elif isinstance(m, TemporalUpsample):
            c = m.conv.in_channels
            w = torch.zeros_like(m.conv.weight)  # (c * 2, c, 3, 1, 1), output channel 2 * i + sub-frame
            idx = torch.arange(c, device=w.device)
            for sub in range(2):
                w[2 * idx + sub, idx, 2, 0, 0] = 1.0  # time index 2 = the current frame (causal)
            m.conv.weight.copy_(w)
            m.conv.bias.zero_()


# ------------------------------------------------------------------------------------------
# IV-VAE Sec. 3.1: a kl2d image VAE -> causal3d (the baseline's initialisation)
# ------------------------------------------------------------------------------------------
def config_from_kl2d(image: KL2DConfig) -> Causal3DConfig:
    """The causal3d of an image VAE's own layout (``--target causal3d``): its widths, depth, norm,
    upsampler, quant convs and latent channels; time halved at the two finest boundaries (causal3d's
    default, as CogVideoX / OD-VAE)."""
    levels = len(image.channel_mult)
    return Causal3DConfig(in_channels=image.in_channels, latent_channels=image.latent_channels,
                          base_channels=image.base_channels, channel_mult=tuple(image.channel_mult),
                          temporal_down=tuple(i < 2 for i in range(levels - 1)), num_res_blocks=image.num_res_blocks,
                          attention=image.attention, norm_groups=image.norm_groups, norm=image.norm,
                          upsample_shrink=image.upsample_shrink, quant_conv=image.quant_conv, dropout=image.dropout,
                          logvar_clamp=image.logvar_clamp)


def _check_inflatable(config: Causal3DConfig, image: KL2DConfig, target: str) -> None:
    """ValueError in one line naming every field where ``config`` cannot hold the image VAE exactly."""
    expect = dict(in_channels=image.in_channels, latent_channels=image.latent_channels,
                  base_channels=image.base_channels, channel_mult=tuple(image.channel_mult),
                  num_res_blocks=image.num_res_blocks, attention=image.attention, norm=image.norm,
                  upsample_shrink=image.upsample_shrink, spatial_norm=False)
    if image.norm == "group":
        expect["norm_groups"] = image.norm_groups
    if image.quant_conv:  # the post-quant conv does not fold into conv_in at the borders (zero padding)
        expect["quant_conv"] = True
    wrong = {k: (getattr(config, k), v) for k, v in expect.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"{target} does not match the image VAE for an exact inflation (field: (ours, needed)): "
                         f"{wrong}; Table 4's baseline causal3d-ivvae-baseline-z8[-gc] takes an image VAE like "
                         "kl2d-ivvae-z16-dim96 (8 latent channels, width 96); --target causal3d keeps the image "
                         "VAE's own layout")


@torch.no_grad()
def inflate_kl2d(model: Causal3D, image_vae: KL2D, target: str = "causal3d") -> None:
    """Fill ``model`` from a ``kl2d`` image VAE with the same latent channels (IV-VAE Sec. 3.1).

    Every 3x3 convolution takes the 2D kernel at the tap of the current frame: ``[0, 0, W]`` in a
    causal conv (the paper's rule), ``[0, W, 0]`` in a GCConv (a group sees only its own frame
    there; the paper's GCConv rows do not say); 1x1 convs, norms, attention and spatial resamplers
    are copied; the temporal resamplers take the same rule with ``W = I`` (`current_frame_resamplers`:
    the downsampler keeps the later frame of each pair, the upsampler repeats a frame). An image
    VAE without quant convs gives identity ones. At step 0 the model is therefore the image VAE on
    frames 0 and ``4j`` (latent frame ``j``), each decoded latent frame repeated over its group's
    four frames: an image, and every frame of a static video, reconstruct as the image VAE does
    (exactly but for float rounding). Raises ValueError when the layouts do not match.
    """
    _check_inflatable(model.config, image_vae.config, target)
    current_frame_resamplers(model)
    km = KeyMap(image_vae.state_dict(), "the image VAE")
    modules = dict(model.named_modules())
    for key, ref in model.state_dict().items():
        owner, kind = key.rsplit(".", 1)
        if ".temporal_down." in key or ".temporal_up." in key:  # new layers, set above
            km.put(key, ref.clone())
        elif owner in ("quant_conv", "post_quant_conv") and not km.has(key):  # identity 1x1x1 convs
            km.put(key, torch.eye(ref.shape[0], dtype=ref.dtype, device=ref.device).view(ref.shape)
                   if kind == "weight" else torch.zeros_like(ref))
        else:
            w = km.take(key)
            if w.ndim + 1 == ref.ndim:  # a 2D kernel into a 3D one, at the current frame's tap
                conv = modules[owner]
                tap = conv.time_pad if isinstance(conv, (CausalConv3d, GroupCausalConv3d)) else 0
                w = inflate_at(w, ref.shape[2], tap)
            km.put(key, w)
    km.load_into(model)


@register_initialiser("causal3d", "kl2d")
def from_converted_kl2d(base: KL2D, target: str) -> tuple[Causal3D, str]:
    """``ldm convert --target causal3d[-NAME]`` from an image VAE (IV-VAE Sec. 3.1): `Causal3D.from_kl2d`."""
    model = Causal3D.from_kl2d(base, None if target == "causal3d" else target)
    return model, ("causal3d inflated from the kl2d (IV-VAE Sec. 3.1: kernels at the current frame's tap): at step 0 "
                   "it is the image VAE on frame 0 and on each group's last frame, repeated over the group")


# ------------------------------------------------------------------------------------------
# diffusers AutoencoderKLCogVideoX -> causal3d
# ------------------------------------------------------------------------------------------
def config_from_cogvideox(c: Mapping[str, Any], scale: tuple[float, ...], shift: tuple[float, ...]) -> Causal3DConfig:
    """The causal3d config of a diffusers ``AutoencoderKLCogVideoX`` config, or a ValueError naming
    what causal3d cannot hold."""
    widths, groups = list(c["block_out_channels"]), int(c.get("norm_num_groups", 32))
    levels = len(widths)
    problems = []
    if c.get("in_channels", 3) != c.get("out_channels", 3):
        problems.append(f"in_channels {c.get('in_channels')} != out_channels {c.get('out_channels')}")
    if any(t != "CogVideoXDownBlock3D" for t in c["down_block_types"]) or \
            any(t != "CogVideoXUpBlock3D" for t in c["up_block_types"]):
        problems.append("block types other than CogVideoXDownBlock3D / CogVideoXUpBlock3D")
    if c.get("act_fn", "silu") != "silu" or float(c.get("norm_eps", 1e-6)) != 1e-6:
        problems.append(f"act_fn {c.get('act_fn')!r} / norm_eps {c.get('norm_eps')} (only silu, 1e-6)")
    if any(w % widths[0] for w in widths) or any(w % groups for w in widths):
        problems.append(f"widths {widths} must be multiples of the first and of norm_num_groups {groups}")
    if float(c.get("temporal_compression_ratio", 4)) != 4 or levels < 3:
        problems.append(f"temporal_compression_ratio {c.get('temporal_compression_ratio')} with {levels} levels "
                        "(every released CogVideoX VAE: 4, four levels)")
    if c.get("use_quant_conv") or c.get("use_post_quant_conv"):
        problems.append("quant convs (no released CogVideoX VAE has them)")
    if problems:
        raise UserError("causal3d cannot hold this AutoencoderKLCogVideoX: " + "; ".join(problems))
    down = tuple(i < 2 for i in range(levels - 1))  # compress_time in the two finest down blocks
    up = tuple(levels - 2 - b < 2 for b in range(levels - 1))  # ... and in the two deepest up blocks
    return Causal3DConfig(in_channels=int(c.get("in_channels", 3)), latent_scale=scale, latent_shift=shift,
                          latent_channels=int(c["latent_channels"]), base_channels=widths[0],
                          channel_mult=tuple(w // widths[0] for w in widths), temporal_down=down, temporal_up=up,
                          num_res_blocks=int(c["layers_per_block"]), attention=False, norm_groups=groups,
                          norm="clip", spatial_norm=True, chunk_latent_frames=2)


def cogvideox_key(ours: str) -> str:
    """The diffusers ``AutoencoderKLCogVideoX`` name of one of our causal3d tensors."""
    side, rest = ours.split(".", 1)
    blocks, resamplers = ("down_blocks", "downsamplers") if side == "encoder" else ("up_blocks", "upsamplers")
    rest = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.skip\.", rf"{blocks}.\1.resnets.\2.conv_shortcut.", rest)
    rest = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", rf"{blocks}.\1.resnets.\2.", rest)
    rest = re.sub(r"^stages\.(\d+)\.resample\.conv\.", rf"{blocks}.\1.{resamplers}.0.conv.", rest)
    rest = re.sub(r"^mid\.res([12])\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}.", rest)
    rest = re.sub(r"(conv_in|conv_out|conv1|conv2)\.(weight|bias)$", r"\1.conv.\2", rest)  # causal convs wrap a conv
    rest = re.sub(r"(norm1|norm2|norm_out)\.norm\.", r"\1.norm_layer.", rest)  # SpatialNorm
    rest = re.sub(r"\.scale\.(weight|bias)$", r".conv_y.conv.\1", rest)
    rest = re.sub(r"\.shift\.(weight|bias)$", r".conv_b.conv.\1", rest)
    return f"{side}.{rest}"


@register_source("diffusers:AutoencoderKLCogVideoX", family="causal3d",
                 reads="a local diffusers AutoencoderKLCogVideoX folder (a CogVideoX pipeline's vae/)")
def convert_cogvideox(path: Path, target: str) -> Conversion:
    """A causal3d holding the diffusers ``AutoencoderKLCogVideoX`` in the local folder ``path``:
    its tensors renamed, its parameter-free temporal resamplers as `average_resamplers`;
    ``target`` ``causal3d`` or a registered causal3d it must match (``causal3d-cogvideox``)."""
    source, name, config = open_diffusers("AutoencoderKLCogVideoX", path, target, "causal3d", config_from_cogvideox)
    model = Causal3D(config).eval()
    average_resamplers(model)
    km = KeyMap(source.state_dict(), f"{path} as causal3d")
    for key, value in model.state_dict().items():
        km.put(key, value.clone() if ".temporal_" in key else km.take(cogvideox_key(key)))
    km.load_into(model)
    f = model.spatial_factor  # 17 frames: two encoder chunks (9 + 8), two decoder chunks (3 + 2)
    x = torch.rand(1, config.in_channels, 17, 2 * f, 2 * f, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post = source.encode(x).latent_dist
        lat = model._encode(x, None)
        note = compare([("mean", lat["z"], post.mean), ("logvar", lat.logvar["z"], post.logvar),
                        ("decode", model._decode(lat, None), source.decode(post.mean).sample)], str(path))
    return Conversion(model, name, [f"latent scale/shift from the diffusers config: {config.latent_scale} / {config.latent_shift}",
                                    "temporal resamplers: CogVideoX's pair mean / frame repeat as weights", note])


# CogVideoX's VAE widths (128, 256, 256, 512); two ResBlocks per level as the SD-VAE.
_FULL = dict(base_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention=True, norm_groups=32)
_DEBUG = dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention=True, norm_groups=8)

register("causal3d-f4x8c4", Causal3D, Causal3DConfig(latent_channels=4, **_FULL))
register("causal3d-f4x8c16", Causal3D, Causal3DConfig(latent_channels=16, **_FULL))
register("causal3d-f4x8c4-debug", Causal3D, Causal3DConfig(latent_channels=4, **_DEBUG))
register("causal3d-f4x8c16-debug", Causal3D, Causal3DConfig(latent_channels=16, **_DEBUG))
# CogVideoX's VAE (CogVideoX-2b / -5b / 1.5: the same layout; their latent scales differ and come
# with the weights): three ResBlocks per level, no mid attention, the four options above
_COGVIDEOX = dict(latent_channels=16, temporal_down=(True, True, False), temporal_up=(False, True, True),
                  attention=False, norm="clip", spatial_norm=True, chunk_latent_frames=2)
register("causal3d-cogvideox", Causal3D, Causal3DConfig(base_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=3,
                                                          norm_groups=32, **_COGVIDEOX))
register("causal3d-cogvideox-debug", Causal3D, Causal3DConfig(base_channels=16, channel_mult=(1, 2, 2, 2),
                                                                num_res_blocks=1, norm_groups=8, **_COGVIDEOX))
# IV-VAE's baseline, Table 4's (A) "Causal VAE" at Z = 8, and (A) + group causal conv (module docstring:
# width 96, RMSNorm, the shrinking upsampler and Z = 8 are the paper's; the layout is our guess), with
# the quant convs of its image VAE (kl2d-ivvae-z16-dim96, or the debug twin's: width 12), which it
# inflates from exactly (Causal3D.from_kl2d)
_IVVAE_BASELINE = dict(latent_channels=8, temporal_down=(False, True, True), attention=True, norm="rms",
                       upsample_shrink=True, quant_conv=True)
for _padding, _suffix in (("causal", ""), ("group", "-gc")):
    register(f"causal3d-ivvae-baseline-z8{_suffix}", Causal3D,
             Causal3DConfig(base_channels=96, channel_mult=(1, 2, 4, 4), num_res_blocks=2, temporal_padding=_padding,
                            **_IVVAE_BASELINE))
    register(f"causal3d-ivvae-baseline-z8{_suffix}-debug", Causal3D,
             Causal3DConfig(base_channels=12, channel_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_padding=_padding,
                            **_IVVAE_BASELINE))
