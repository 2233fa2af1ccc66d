"""IV-VAE: keyframe-based temporal compression with group causal convolution (Wu et al., "Improved
Video VAE for Latent Video Diffusion Model", 2024; the layers are in ``ivvae_layers.py``).

A clip of ``1 + 4k`` frames becomes ``1 + k`` latent frames at 8x spatial compression (4x8x8,
Table 1). Frame 0 is encoded alone (an image); every later latent frame holds one *frame group* of
4 frames. The latent has ``Z`` channels: the first ``Z/2`` come from the *key* branch (2D
convolutions that keep the first frame of each group, the keyframe: Sec. 3.3), the last ``Z/2``
from the *motion* branch (3D group causal convolutions with strided temporal downsampling). The
decoder mirrors it; the output takes frame 0 and each group's first frame from the key head and the
other frames from the motion head.

What makes it IV-VAE, with where each piece lives:

- KTC unit (Sec. 3.3, Fig. 2b): `KTCConv`, `BranchNorm`, `KTCResBlock` — two branches writing half
  the channels each, each half normalised on its own; after full temporal compression both are 2D.
- GCConv (Sec. 3.2, Fig. 2a): `GroupCausalConv3d` — bidirectional inside a frame group, causal
  between groups, frame 0 its own group; the group size follows the temporal rate (4, 2, 1).
- TMPE (Sec. 3.4, Fig. 2c): `ParallelAtrousConv` as the encoder's last layer (a 1x1 branch and
  3x3 branches with dilations 1, 3, 6, 9, 12, as the public code) and attention blocks at the fully
  compressed level (``tmpe_attention``).
- RMSNorm instead of GroupNorm everywhere (Sec. 3.5), channel shrinking in the spatial upsampler
  (Sec. 3.5, ``upsample_shrink``).
- Initialisation from a lower-dimension image VAE (Sec. 3.3, Fig. 1a): ``IVVAE.from_kl2d`` loads a
  ``kl2d`` model with ``Z/2`` channels into both branches (centre-inflated for the 3D one) so that at
  step 0 the model already compresses time 2x by keyframes: latent channels ``[0, Z/2)`` are the
  image latent of each group's keyframe, ``[Z/2, Z)`` that of the group's third frame. The paper's
  image VAE has the same modifications (RMSNorm, shrinking upsampler: ``kl2d-ivvae-z*``), so it
  inflates into the registered ``ivvae-z*`` (``IVVAE.from_kl2d(image_vae, "ivvae-z16")``); an SD-style
  GroupNorm image VAE (e.g. a converted SD VAE) gives the GroupNorm variant of its own widths.
- Cache mechanism (Sec. 4.5.2, Table 7): with ``chunk_frames = c`` the encoder sees frame 0 alone
  and then chunks of ``c`` frames (the decoder 1 latent frame, then ``c/4``), every GCConv carrying
  its last input frame to the next chunk in a `StreamCache`: the result equals one-shot processing
  and the working memory no longer grows with the video. ``benchmarks/ivvae_cache.py`` measures it.

Ablations (Sec. 4.4, Tables 4 and 5, all at Z = 8): ``temporal_padding="causal"`` makes every 3D
convolution a plain causal one (Table 4's rows without group causal convolution; same parameters),
``tmpe_attention=False`` with ``pac_dilations=()`` removes TMPE (the mid-block attentions and a 3x3
head remain: 103.9M, the paper's 104M), ``key_branch="3d"`` makes the key branch a GCConv3D like the
motion one (Table 5's "3D+3D": 135.7M, +26.4 %; the paper says +23 %). They are registered as
``ivvae-z8-causal``, ``-notmpe``, ``-causal-notmpe``, ``-3d3d``. Table 4's baseline unit (A), a single
3D branch of width 96 with 2 attention blocks, is another model, not a switch of this one (no
``[key | motion]`` halves anywhere: norms, attention, resamplers, latent layout, output selection,
inflation from a same-Z image VAE all differ): it is ``causal3d-ivvae-baseline-z8`` (and ``-gc`` with
group causal convolution) in ``autoencoders/causal3d.py``.

Where the paper and the public inference code (MIT, read for facts, nothing copied) differ, this
follows the code: temporal downsampling at the two deepest boundaries (``temporal_down = (False,
True, True)``); attention blocks: one entering the deepest level, one after each of its ResBlocks
and the mid-block one in the encoder, one after each deepest ResBlock plus the mid-block one in the
decoder (8 in all at 2 ResBlocks per level; the paper's text says 7); the upsampler halves the width.
The registered ``ivvae-z4/z8/z16/z16-dim96`` hold the released weights exactly (``ldm convert
--source ivvae-official``, ``ivvae_weights.py``): same parameters (107.17 / 107.38 / 107.80 /
241.85 M), ZeroPad2d((0, 1, 0, 1)) before each stride-2 conv, RMS norms as ``F.normalize * sqrt(C)``.
The public code's latent statistics belong to its weights (z4 1.3196/0.1250, z8 1.0940/-0.0322,
z16 0.9697/-0.1553, z16-dim96 0.7619/-0.0483 as scale/shift): the converter writes them into the
config; the registered configs have none (``ldm train-ae`` measures our own).

Guesses (details the paper leaves open: what this code does, then the alternative; "code:" marks
what the public inference code settles, which this file follows):

- The motion half's frame at initialisation: the frame at group position ``r/2`` (the third of
  four). The paper only says the new temporal layers are set "elaborately" so the branches see two
  different frames. Alternative: the group's last (or second) frame.
- The new parts at initialisation: cross-branch weights zero, new attention blocks identities
  (zero output projection), the TMPE head passing its dilation-1 branch, the motion upsampler
  copying a frame into both sub-frames, GCConvs centre-inflated (``[0, W, 0]``: the current frame).
  Alternative: random initialisation of the new parts; ``[0, 0, W]`` (the causal baseline's
  inflation, which in a GCConv reads the next frame).
- Training losses: MAE + LPIPS + KL (Sec. 4.1) with weights the paper does not give: the trainer's
  ``kl_weight`` (1e-6 by default) and ``lpips_weight`` (1.0); the last phase's 3D discriminator and
  its per-resolution weights are not given either (the trainer's PatchGAN). Alternative: any
  other weights; the training recipe is not public.
- Latent scale / shift: measured by ``ldm train-ae`` on the training data; code: the released
  weights carry their own (the converter writes them). Alternative: none (scale 1, shift 0).
- code: temporal downsampling at the two deepest boundaries, 8 attention blocks (the paper's text
  says 7), the width-halving upsampler, ZeroPad2d((0, 1, 0, 1)) before stride-2 convs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoders.base import REGISTRY, AEConfig, Autoencoder, causal_grid_spec, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, CausalConv3d, ChannelRMSNorm, ResBlock, SpatialSelfAttention,
                                 check_latent_stats, grid_z)
from autoencoders.ivvae_layers import (KEY_BRANCHES, NORMS, TEMPORAL_PADDINGS, BranchAttention, BranchNorm,
                                       BranchSpatialDownsample, BranchSpatialUpsample, GroupCausalConv3d,
                                       KeyframeDownsample, KeyframeUpsample, KTCConv, KTCResBlock, ParallelAtrousConv,
                                       StreamCache, inflate_at, keyframe_select, starts_video)
from autoencoders.kl2d import KL2D
from autoencoders.sources import register_initialiser
from ldm import config as cfglib
from ldm.latent import Cond, Latent, LatentSpec


@dataclass(frozen=True)
class IVVAEConfig(AEConfig):
    latent_channels: int = 16  # Z: [0, Z/2) key (2D) branch, [Z/2, Z) motion (3D) branch
    dim: int = 64  # base width of EACH branch (Sec. 4.2: 64 for both the 2D conv and the GCConv)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; 2x spatial down between levels
    temporal_down: tuple[bool, ...] = (False, True, True)  # per boundary: also 2x down in time
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more)
    tmpe_attention: bool = True  # Sec. 3.4: attention blocks at the fully compressed level
    pac_dilations: tuple[int, ...] = (1, 3, 6, 9, 12)  # Sec. 3.4 PAC head; () = a plain 3x3 head
    norm: str = "rms"  # "rms" (Sec. 3.5) | "group": kl2d's per-frame GroupNorm (exact inflation)
    norm_groups: int = 32  # for norm="group"
    upsample_shrink: bool = True  # Sec. 3.5: the spatial upsampler halves the width
    # Ablation switches (Sec. 4.4; the defaults are the paper's model and the released weights'):
    temporal_padding: str = "group"  # 3D convs: "group" GCConv (Sec. 3.2) | "causal" plain causal (Table 4)
    key_branch: str = "2d"  # KTC key branch: "2d" (Sec. 3.3) | "3d": a 3D conv like the motion one (Table 5)
    dropout: float = 0.0
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP
    # Not architecture but a memory knob that leaves every output unchanged: 0 = one shot; c > 0 =
    # encode frame 0, then chunks of c frames (decode 1 latent frame, then chunks of c/4) with caches.
    chunk_frames: int = 0

    def __post_init__(self) -> None:
        if self.latent_channels < 2 or self.latent_channels % 2:
            raise ValueError(f"latent_channels must be even (two branches), got {self.latent_channels}")
        if self.dim < 1 or not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"need dim >= 1 and positive channel_mult, got {self.dim}, {self.channel_mult}")
        if len(self.temporal_down) != len(self.channel_mult) - 1:
            raise ValueError(f"temporal_down needs one flag per resolution boundary "
                             f"({len(self.channel_mult) - 1}), got {self.temporal_down}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.temporal_padding not in TEMPORAL_PADDINGS:
            raise ValueError(f"temporal_padding must be one of {TEMPORAL_PADDINGS} (group causal GCConv, plain "
                             f"causal conv), got {self.temporal_padding!r}")
        if self.key_branch not in KEY_BRANCHES:
            raise ValueError(f"key_branch must be one of {KEY_BRANCHES} (the KTC key branch's convolution), "
                             f"got {self.key_branch!r}")
        if any(d < 1 for d in self.pac_dilations):
            raise ValueError(f"pac_dilations must be positive, got {self.pac_dilations}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        r = self.temporal_factor
        if self.chunk_frames < 0 or self.chunk_frames % r:
            raise ValueError(f"chunk_frames must be 0 (one shot) or a positive multiple of the temporal "
                             f"factor {r}, got {self.chunk_frames}")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_down)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def level_groups(self) -> list[int]:
        """Frame-group size at each level: the temporal factor at full rate, halved by every
        temporal downsampling, 1 (fully compressed, 2D) at the deepest level."""
        groups = [self.temporal_factor]
        for down in self.temporal_down:
            groups.append(groups[-1] // 2 if down else groups[-1])
        return groups

    def widths(self) -> list[int]:
        """Total channels (key + motion) at each level."""
        return [2 * self.dim * m for m in self.channel_mult]


class _MidBlock(nn.Module):
    """ResBlock -> attention -> ResBlock at the fully compressed level (both branches 2D)."""

    def __init__(self, channels: int, norm: str, groups: int, dropout: float):
        super().__init__()
        self.res1 = KTCResBlock(channels, channels, 1, norm, groups, dropout)
        self.attn = BranchAttention(channels, norm, groups)
        self.res2 = KTCResBlock(channels, channels, 1, norm, groups, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class IVVAEEncoder(nn.Module):
    """KTC encoder (Fig. 2d, left): conv_in, per level ``num_res_blocks`` KTC ResBlocks (+ TMPE
    attention at the deepest level), per boundary a per-branch spatial 2x downsample and, where
    ``temporal_down``, a keyframe temporal 2x downsample; mid block; norm -> SiLU -> PAC head writing
    ``[key: mean, logvar | motion: mean, logvar]`` (``2Z`` channels)."""

    def __init__(self, cfg: IVVAEConfig):
        super().__init__()
        widths, groups = cfg.widths(), cfg.level_groups()
        arch = dict(norm=cfg.norm, groups=cfg.norm_groups)
        conv = dict(padding=cfg.temporal_padding, key=cfg.key_branch)  # the ablation switches (Sec. 4.4)
        deepest = len(widths) - 1
        self.conv_in = KTCConv(cfg.in_channels, widths[0], 3, groups[0], **conv)
        self.blocks, self.attentions = nn.ModuleList(), nn.ModuleList()
        self.down_spatial, self.down_temporal = nn.ModuleList(), nn.ModuleList()
        ch = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(KTCResBlock(ch, w, groups[i], dropout=cfg.dropout, **arch, **conv))
                ch = w
            self.blocks.append(nn.ModuleList(blocks))
            tmpe = cfg.tmpe_attention and i == deepest
            self.attentions.append(nn.ModuleList(
                [BranchAttention(ch, **arch) for _ in range(cfg.num_res_blocks)] if tmpe else []))
            if i < deepest:
                self.down_spatial.append(BranchSpatialDownsample(ch))
                self.down_temporal.append(KeyframeDownsample(ch, groups[i]) if cfg.temporal_down[i] else nn.Identity())
        # TMPE: one attention block as soon as time and space are fully compressed
        self.entry_attention = BranchAttention(ch, **arch) if cfg.tmpe_attention and deepest > 0 else None
        self.mid = _MidBlock(ch, cfg.norm, cfg.norm_groups, cfg.dropout)
        self.norm_out = BranchNorm(ch, cfg.norm, cfg.norm_groups)
        z2 = 2 * cfg.latent_channels
        self.head: nn.Module = (ParallelAtrousConv(ch, z2, cfg.pac_dilations) if cfg.pac_dilations
                                else KTCConv(ch, z2, 3, groups[-1]))

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        h = self.conv_in(x, cache)
        for i, (blocks, attns) in enumerate(zip(self.blocks, self.attentions)):
            for j, block in enumerate(blocks):
                h = block(h, cache)
                if len(attns):
                    h = attns[j](h)
            if i < len(self.down_spatial):
                h = self.down_spatial[i](h)
                if isinstance(self.down_temporal[i], KeyframeDownsample):
                    h = self.down_temporal[i](h, cache)
                if i == len(self.down_spatial) - 1 and self.entry_attention is not None:
                    h = self.entry_attention(h)
        h = self.mid(h)
        return self.head(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class IVVAEDecoder(nn.Module):
    """KTC decoder (Fig. 2d, right): conv_in, mid block, per level from the deepest
    ``num_res_blocks + 1`` KTC ResBlocks (+ TMPE attention at the deepest level), then the keyframe
    temporal 2x upsample (where the encoder downsampled) and the per-branch spatial 2x upsample;
    norm -> SiLU -> a KTC conv writing ``[key RGB | motion RGB]``, assembled by `keyframe_select`."""

    def __init__(self, cfg: IVVAEConfig):
        super().__init__()
        widths, groups = cfg.widths(), cfg.level_groups()
        arch = dict(norm=cfg.norm, groups=cfg.norm_groups)
        conv = dict(padding=cfg.temporal_padding, key=cfg.key_branch)  # the ablation switches (Sec. 4.4)
        deepest = len(widths) - 1
        self.group = groups[0]
        ch = widths[-1]
        self.conv_in = KTCConv(cfg.latent_channels, ch, 3, groups[-1])
        self.mid = _MidBlock(ch, cfg.norm, cfg.norm_groups, cfg.dropout)
        self.blocks, self.attentions = nn.ModuleList(), nn.ModuleList()
        self.up_temporal, self.up_spatial = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):  # deepest level first: blocks[j] is level deepest - j
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(KTCResBlock(ch, widths[i], groups[i], dropout=cfg.dropout, **arch, **conv))
                ch = widths[i]
            self.blocks.append(nn.ModuleList(blocks))
            tmpe = cfg.tmpe_attention and i == deepest
            self.attentions.append(nn.ModuleList(
                [BranchAttention(ch, **arch) for _ in range(cfg.num_res_blocks + 1)] if tmpe else []))
            if i > 0:
                self.up_temporal.append(KeyframeUpsample(ch) if cfg.temporal_down[i - 1] else nn.Identity())
                out = ch // 2 if cfg.upsample_shrink else ch
                self.up_spatial.append(BranchSpatialUpsample(ch, out))
                ch = out
        self.norm_out = BranchNorm(ch, cfg.norm, cfg.norm_groups)
        self.head = KTCConv(ch, 2 * cfg.in_channels, 3, groups[0], **conv)

    def forward(self, z: Tensor, cache: StreamCache | None = None) -> Tensor:
        start = starts_video(self, cache)
        h = self.mid(self.conv_in(z, cache))
        for j, (blocks, attns) in enumerate(zip(self.blocks, self.attentions)):
            for k, block in enumerate(blocks):
                h = block(h, cache)
                if len(attns):
                    h = attns[k](h)
            if j < len(self.up_spatial):
                if isinstance(self.up_temporal[j], KeyframeUpsample):
                    h = self.up_temporal[j](h, cache)
                h = self.up_spatial[j](h)
        key, motion = self.head(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()), cache).chunk(2, dim=1)
        return keyframe_select(key, motion, self.group, start)  # (B, C, T, H, W)


@register_family
class IVVAE(Autoencoder):
    """IV-VAE: ``B C (1+rk) H W -> z: B Z (1+k) H/f W/f`` (``r = 4``, ``f = 8`` for the paper's
    configs); latent channels ``[0, Z/2)`` from the keyframe branch, ``[Z/2, Z)`` from the motion
    branch."""

    family = "ivvae"
    config_cls = IVVAEConfig
    spatial_tiling = True

    def __init__(self, config: IVVAEConfig):
        super().__init__(config)
        z = config.latent_channels
        check_latent_stats(config, z)
        self.encoder = IVVAEEncoder(config)
        self.quant = KTCConv(2 * z, 2 * z, 1)  # 1x1 per branch: [key moments | motion moments]
        self.post_quant = KTCConv(z, z, 1)
        self.decoder = IVVAEDecoder(config)

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    def last_layer(self) -> tuple[Tensor, Tensor]:
        """The output head's two weights, for the adaptive GAN weight: the key half writes each
        group's keyframe (all of a 1-frame clip), the motion half the other 3 of every 4 frames."""
        return self.decoder.head.key.weight, self.decoder.head.motion.weight

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        return causal_grid_spec(self, frames, height, width, self.temporal_factor, self.spatial_factor,
                                self.config.latent_channels, rule=": frame 0 is its own group, then groups")

    def encoder_moments(self, video: Tensor, chunk_frames: int | None = None) -> Tensor:
        """Encoder + quant output ``B 2Z t h w`` = ``[key mean, key logvar | motion mean, motion
        logvar]``. ``chunk_frames`` (default: the config's) > 0 streams frame 0, then chunks of that
        many frames through a `StreamCache`; the result equals the one-shot one."""
        chunk = self.config.chunk_frames if chunk_frames is None else chunk_frames
        if chunk < 0 or chunk % self.temporal_factor:
            raise ValueError(f"chunk_frames must be 0 or a multiple of {self.temporal_factor}, got {chunk}")
        if not chunk:
            return self.quant(self.encoder(video))
        cache, r, frames = StreamCache(), self.temporal_factor, video.shape[2]
        out: Tensor | None = None
        for s, e in _spans(frames, chunk):
            h = self.encoder(video[:, :, s:e], cache)  # (B, 2Z, t_chunk, h, w)
            if out is None:
                out = h.new_empty(*h.shape[:2], 1 + (frames - 1) // r, *h.shape[3:])
            t0 = 0 if s == 0 else 1 + (s - 1) // r
            out[:, :, t0:t0 + h.shape[2]] = h
        return self.quant(out)

    def decoder_video(self, z: Tensor, chunk_frames: int | None = None) -> Tensor:
        """post-quant + decoder: ``B Z t h w -> B C (1 + r(t-1)) H W``; chunked like `encoder_moments`
        (latent frame 0, then ``chunk_frames / r`` latent frames per chunk)."""
        chunk = self.config.chunk_frames if chunk_frames is None else chunk_frames
        if chunk < 0 or chunk % self.temporal_factor:
            raise ValueError(f"chunk_frames must be 0 or a multiple of {self.temporal_factor}, got {chunk}")
        h = self.post_quant(z)
        if not chunk:
            return self.decoder(h)
        cache, r, t = StreamCache(), self.temporal_factor, z.shape[2]
        out: Tensor | None = None
        for s, e in _spans(t, chunk // r):
            x = self.decoder(h[:, :, s:e], cache)  # (B, C, frames_chunk, H, W)
            if out is None:
                out = x.new_empty(*x.shape[:2], 1 + r * (t - 1), *x.shape[3:])
            f0 = 0 if s == 0 else 1 + r * (s - 1)
            out[:, :, f0:f0 + x.shape[2]] = x
        return out

    def set_chunk_frames(self, frames: int | None) -> None:
        """The cache mechanism (Sec. 4.5.2): frame 0, then ``frames`` frames per chunk (a multiple
        of the temporal factor); the same output as one shot."""
        self.config = cfglib.replace(self.config, chunk_frames=frames or 0)

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        key_mean, key_logvar, mot_mean, mot_logvar = self.encoder_moments(video).chunk(4, dim=1)
        mean = torch.cat([key_mean, mot_mean], dim=1)  # (B, Z, t, h, w): keyframe channels first
        logvar = torch.cat([key_logvar, mot_logvar], dim=1).clamp(*self.config.logvar_clamp)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        return self.decoder_video(grid_z(latent, self.config.latent_channels, self.family))

    # --- initialisation from a lower-dimension image VAE (Sec. 3.3, Fig. 1a) ----------------
    @classmethod
    def from_kl2d(cls, image_vae: KL2D, target: str | None = None, **overrides) -> "IVVAE":
        """An IV-VAE with ``2c`` latent channels initialised from a ``kl2d`` model with ``c`` channels
        in both branches (`inflate_kl2d`): the registered ``target`` (e.g. ``"ivvae-z16"``, whose
        layout the image VAE must have: ``kl2d-ivvae-z16``), or by default the image VAE's own layout
        (its widths, depth, norm and upsampler). The latent statistics are the image VAE's, once per
        branch (at step 0 both halves are its latents). ``overrides`` change other config fields."""
        c = image_vae.config
        stats = {k: v if len(v) == 1 else v + v for k, v in
                 (("latent_scale", c.latent_scale), ("latent_shift", c.latent_shift))}
        if target is not None:
            if target not in REGISTRY or REGISTRY[target][0] is not cls:
                raise ValueError(f"{target!r} is not a registered IV-VAE")
            config = REGISTRY[target][1]
        else:
            levels = len(c.channel_mult)
            temporal = (False,) * max(0, levels - 3) + (True,) * min(2, levels - 1)
            config = IVVAEConfig(in_channels=c.in_channels, latent_channels=2 * c.latent_channels, dim=c.base_channels,
                                 channel_mult=c.channel_mult, temporal_down=temporal, num_res_blocks=c.num_res_blocks,
                                 norm=c.norm, norm_groups=c.norm_groups, upsample_shrink=c.upsample_shrink,
                                 dropout=c.dropout, logvar_clamp=c.logvar_clamp)
        model = cls(cfglib.replace(config, **overrides))
        inflate_kl2d(model, image_vae)  # first: a layout mismatch names its fields, not the statistics' length
        model.config = cfglib.replace(model.config, **{**stats, **overrides})
        return model


def _spans(frames: int, chunk: int) -> list[tuple[int, int]]:
    """Chunk boundaries: frame 0 alone, then ``chunk`` frames at a time (the last may be shorter)."""
    return [(0, 1)] + [(s, min(s + chunk, frames)) for s in range(1, frames, chunk)]


# ------------------------------------------------------------------------------------------
# Inflation of a kl2d image VAE into both branches
# ------------------------------------------------------------------------------------------
def _ktc_from_conv(dst: KTCConv, src: nn.Conv2d, split_input: bool = True) -> None:
    """Key half = ``src`` reading the key half of the input, motion half = ``src`` reading the motion
    half; cross-branch weights zero; a 3D branch gets ``src`` inflated to look at the current frame only
    (`_inflated`). ``split_input=False`` when both branches read the same input (the RGB video)."""
    w, b = src.weight, src.bias
    if split_input:
        zero = torch.zeros_like(w)
        w_key, w_motion = torch.cat([w, zero], dim=1), torch.cat([zero, w], dim=1)
    else:
        w_key = w_motion = w
    _copy(dst.key, _inflated(dst.key, w_key), b)
    _copy(dst.motion, _inflated(dst.motion, w_motion), b)


def _inflated(conv: nn.Module, weight_2d: Tensor) -> Tensor:
    """``weight_2d`` for ``conv``: as is for a 2D conv; for a 3D one at the tap of the current frame,
    the centre of a GCConv (``[0, W, 0]``, Sec. 3.3) or the last tap of a causal conv (``[0, 0, W]``,
    Sec. 3.1), so the 3D branch starts as the 2D one."""
    if isinstance(conv, GroupCausalConv3d):
        return inflate_at(weight_2d, conv.kernel_size[0], conv.time_pad)
    if isinstance(conv, CausalConv3d):
        return inflate_at(weight_2d, conv.kernel_size[0], conv.kernel_size[0] - 1)
    return weight_2d


def _copy(dst: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    if dst.weight.shape != weight.shape:
        raise ValueError(f"cannot inflate: weight {tuple(weight.shape)} into {tuple(dst.weight.shape)}")
    dst.weight.copy_(weight)
    if getattr(dst, "bias", None) is not None:
        if bias is None:
            dst.bias.zero_()
        else:
            dst.bias.copy_(bias)


def _norm_from(dst: nn.Module, src: nn.Module) -> None:
    """Both halves of a `BranchNorm` (or a single norm) take ``src``'s parameters: GroupNorm affines,
    or the RMSNorm scale (a group BranchNorm holds two GroupNorms, an RMS one a scale per half)."""
    if isinstance(src, ChannelRMSNorm):
        norm = dst.norm if isinstance(dst, BranchNorm) else dst
        if not isinstance(norm, ChannelRMSNorm):
            raise ValueError("exact inflation of an RMSNorm image VAE needs norm='rms'")
        _copy(norm, src.weight.repeat(norm.halves), None)
        return
    targets = list(dst.norm) if isinstance(dst, BranchNorm) and dst.kind == "group" else [dst]
    for norm in targets:
        if not isinstance(norm, nn.GroupNorm) or norm.num_groups != src.num_groups:
            raise ValueError("exact inflation of a GroupNorm image VAE needs norm='group' with its norm_groups")
        _copy(norm, src.weight, src.bias)


def _res_from(dst: KTCResBlock, src: ResBlock) -> None:
    _norm_from(dst.norm1, src.norm1)
    _ktc_from_conv(dst.conv1, src.conv1)
    _norm_from(dst.norm2, src.norm2)
    _ktc_from_conv(dst.conv2, src.conv2)
    if (dst.skip is None) != isinstance(src.skip, nn.Identity):
        raise ValueError("cannot inflate: residual shortcuts differ")
    if dst.skip is not None:
        _ktc_from_conv(dst.skip, src.skip)


def _attention_from(dst: BranchAttention, src: nn.Module) -> None:
    """Both halves take ``src`` (a kl2d `SpatialSelfAttention`); an `nn.Identity` (or a new TMPE
    block) becomes an identity: zero output projection, so the residual passes the input through."""
    for half in (dst.key, dst.motion):
        if isinstance(src, SpatialSelfAttention):
            _norm_from(half.norm, src.norm)
            _copy(half.qkv, src.qkv.weight, src.qkv.bias)
            _copy(half.proj, src.proj.weight, src.proj.bias)
        else:
            half.proj.weight.zero_()
            half.proj.bias.zero_()


def _as_conv(layer: nn.Module, channels: int) -> nn.Module:
    """``layer``, or for an image VAE without quant convs (``nn.Identity``) the identity 1x1 conv."""
    if not isinstance(layer, nn.Identity):
        return layer
    conv = nn.Conv2d(channels, channels, 1)
    conv.weight.copy_(_eye_conv(conv.weight))
    conv.bias.zero_()
    return conv


def _eye_conv(weight: Tensor) -> Tensor:
    """``eye(C_out, C_in)`` shaped like a 1x...x1 convolution weight."""
    return torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device).view(
        weight.shape[0], weight.shape[1], *([1] * (weight.ndim - 2)))


@torch.no_grad()
def inflate_kl2d(model: IVVAE, image_vae: KL2D) -> None:
    """Initialise ``model`` from a ``kl2d`` image VAE with half its latent channels (Sec. 3.3).

    Both branches become copies of the image VAE with zero cross-branch weights: 2D layers copy the
    2D weights, GCConvs get them centre-inflated (``[0, W, 0]`` over time). The new temporal layers
    are set so the two branches see two different frames of each group ("by elaborately setting the
    weights of the newly added temporal upsampling and downsampling layers of the two branches, the
    network is initially able to independently process two different frames within a frame group
    to achieve 2x temporal compression"): the key half keeps the group's first frame by design; the
    motion half's strided convs pick the first frame of each pair and, at the last temporal
    downsampling, the second, i.e. the frame at group position ``r/2`` (the third of four); the
    motion upsampler copies a frame into both sub-frames. The TMPE head passes only its dilation-1
    branch (which takes the image VAE's output conv) and new attention blocks start as identities.

    At step 0 the IV-VAE therefore encodes latent frame ``j >= 1`` as ``[E(x_key) | E(x_mid)]`` and
    decodes it to ``[D(.)_key, D(.)_mid x (r - 1)]`` (``E``, ``D``: the image VAE); frame 0 is the
    image VAE's reconstruction of frame 0. Raises ValueError when the layouts do not match exactly.
    """
    c, ic = model.config, image_vae.config
    expect = dict(in_channels=ic.in_channels, latent_channels=2 * ic.latent_channels, dim=ic.base_channels,
                  channel_mult=tuple(ic.channel_mult), num_res_blocks=ic.num_res_blocks, norm=ic.norm,
                  upsample_shrink=ic.upsample_shrink)
    if ic.norm == "group":
        expect["norm_groups"] = ic.norm_groups
    wrong = {k: (getattr(c, k), v) for k, v in expect.items() if getattr(c, k) != v}
    if wrong or not ic.attention:
        raise ValueError(f"IV-VAE config does not match the image VAE for an exact inflation "
                         f"(field: (ours, needed)): {wrong or {'image VAE attention': (True, False)}}; the family "
                         "as the target (--target ivvae, IVVAE.from_kl2d without one) keeps the image VAE's layout; "
                         "the paper's layouts take an image VAE like kl2d-ivvae-z16")
    if c.pac_dilations and 1 not in c.pac_dilations:
        raise ValueError(f"the PAC head needs a dilation-1 branch to take the image VAE's output conv, "
                         f"got {c.pac_dilations}")
    enc, ienc = model.encoder, image_vae.encoder
    _ktc_from_conv(enc.conv_in, ienc.conv_in, split_input=False)
    n_temporal, seen = sum(c.temporal_down), 0
    for i, stage in enumerate(ienc.stages):
        for block, src in zip(enc.blocks[i], stage.blocks):
            _res_from(block, src)
        for attn in enc.attentions[i]:
            _attention_from(attn, nn.Identity())
        if i < len(enc.down_spatial):
            for half in (enc.down_spatial[i].key, enc.down_spatial[i].motion):
                _copy(half.conv, stage.resample.conv.weight, stage.resample.conv.bias)
            down = enc.down_temporal[i]
            if isinstance(down, KeyframeDownsample):
                seen += 1
                pick = 1 if seen == n_temporal else 0  # first of each pair, the second at the last level
                w = torch.zeros_like(down.conv.weight)
                w[:, :, pick] = _eye_conv(down.conv.weight[:, :, 0])
                _copy(down.conv, w, None)
    if enc.entry_attention is not None:
        _attention_from(enc.entry_attention, nn.Identity())
    for dst_mid, src_mid in ((enc.mid, ienc.mid), (model.decoder.mid, image_vae.decoder.mid)):
        _res_from(dst_mid.res1, src_mid.res1)
        _attention_from(dst_mid.attn, src_mid.attn)
        _res_from(dst_mid.res2, src_mid.res2)
    _norm_from(enc.norm_out, ienc.norm_out)
    if isinstance(enc.head, ParallelAtrousConv):
        head, out = enc.head, enc.head.fuse.out_channels
        _copy(head.point, torch.zeros_like(head.point.weight), None)
        for d, conv in zip(head.dilations, head.atrous):
            if d == 1:
                tmp = KTCConv(conv.in_channels, conv.out_channels, 3, 1)
                _ktc_from_conv(tmp, ienc.conv_out)
                _copy(conv, torch.cat([tmp.key.weight, tmp.motion.weight]), torch.cat([tmp.key.bias, tmp.motion.bias]))
            else:
                _copy(conv, torch.zeros_like(conv.weight), None)
        fuse = torch.zeros_like(head.fuse.weight)
        slot = 1 + head.dilations.index(1)  # the fuse input is [1x1 branch, atrous branches...]
        fuse[:, slot * out:(slot + 1) * out] = _eye_conv(fuse[:, :out])
        _copy(head.fuse, fuse, None)
    else:
        _ktc_from_conv(enc.head, ienc.conv_out)
    _ktc_from_conv(model.quant, _as_conv(image_vae.quant_conv, 2 * ic.latent_channels))
    _ktc_from_conv(model.post_quant, _as_conv(image_vae.post_quant_conv, ic.latent_channels))

    dec, idec = model.decoder, image_vae.decoder
    _ktc_from_conv(dec.conv_in, idec.conv_in)
    for j, stage in enumerate(idec.stages):
        for block, src in zip(dec.blocks[j], stage.blocks):
            _res_from(block, src)
        for attn in dec.attentions[j]:
            _attention_from(attn, nn.Identity())
        if j < len(dec.up_spatial):
            up = dec.up_temporal[j]
            if isinstance(up, KeyframeUpsample):  # both sub-frames copy the frame
                _copy(up.conv, torch.cat([_eye_conv(up.conv.weight[:up.conv.out_channels // 2])] * 2), None)
            for half in (dec.up_spatial[j].key, dec.up_spatial[j].motion):
                _copy(half, stage.resample.conv.weight, stage.resample.conv.bias)
    _norm_from(dec.norm_out, idec.norm_out)
    _ktc_from_conv(dec.head, idec.conv_out)


@register_initialiser("ivvae", "kl2d")
def from_converted_kl2d(base: KL2D, target: str) -> tuple[IVVAE, str]:
    """``ldm convert --target ivvae[-NAME]`` from a converted image VAE: `IVVAE.from_kl2d`."""
    model = IVVAE.from_kl2d(base, None if target == "ivvae" else target)
    return model, (f"ivvae with {model.config.latent_channels} latent channels inflated from the converted kl2d "
                   "(Sec. 3.3): at step 0 it compresses time 2x by keyframes")


# ------------------------------------------------------------------------------------------
# Registry: the paper's configs (Table 1 / Table 6) and tiny debug twins (same 4x8x8 factors)
# ------------------------------------------------------------------------------------------
_PAPER = dict(channel_mult=(1, 2, 4, 4), temporal_down=(False, True, True), num_res_blocks=2)
_DEBUG = dict(channel_mult=(1, 2, 2, 2), temporal_down=(False, True, True), num_res_blocks=1)

for _z in (4, 8, 16):
    register(f"ivvae-z{_z}", IVVAE, IVVAEConfig(latent_channels=_z, dim=64, **_PAPER))
    register(f"ivvae-z{_z}-debug", IVVAE, IVVAEConfig(latent_channels=_z, dim=8, **_DEBUG))
register("ivvae-z16-dim96", IVVAE, IVVAEConfig(latent_channels=16, dim=96, **_PAPER))
register("ivvae-z16-dim96-debug", IVVAE, IVVAEConfig(latent_channels=16, dim=12, **_DEBUG))

# The paper's Z = 8 ablations (Sec. 4.4, Tables 4 and 5), each ivvae-z8 with switches flipped (not
# released: train them with `ldm train-ae`, or inflate the paper's image VAE into them with
# `IVVAE.from_kl2d(kl2d, "ivvae-z8-causal")` / `ldm convert --source saved --target ivvae-z8-causal`)
IVVAE_ABLATIONS = {
    "causal": dict(temporal_padding="causal"),  # Table 4: plain causal 3D convs instead of GCConv
    "notmpe": dict(tmpe_attention=False, pac_dilations=()),  # Table 4: w/o TMPE (2 attentions, 3x3 head)
    "causal-notmpe": dict(temporal_padding="causal", tmpe_attention=False, pac_dilations=()),  # Table 4: KTC alone
    "3d3d": dict(key_branch="3d"),  # Table 5: the key branch a GCConv3D as well
}
for _name, _switches in IVVAE_ABLATIONS.items():
    register(f"ivvae-z8-{_name}", IVVAE, IVVAEConfig(latent_channels=8, dim=64, **_PAPER, **_switches))
    register(f"ivvae-z8-{_name}-debug", IVVAE, IVVAEConfig(latent_channels=8, dim=8, **_DEBUG, **_switches))
