"""Cross-modal video VAE: a temporal-aware spatial autoencoder, a lightweight temporal autoencoder,
text guidance and joint image-video training (Xing et al. 2024, "Large Motion Video Autoencoding
with Cross-modal Video VAE", the VideoVAE+ paper; public code read for facts, none copied).

Two stages, trained jointly (Sec. 3.2, "Our Solution", Eq. 2-4)::

    X (C, T, H, W) --E1--> Z1 (c, T, H/8, W/8) --E2--> Z2 (c', T/4, H/8, W/8)
    X_hat = D1(D2(Z2))

- E1/D1, the *temporal-aware spatial autoencoder* (`STEncoder` / `STDecoder`): the SD-VAE layout
  (Rombach et al. 2022, App. G) inflated to clips. Every 3x3 conv of a residual block is a (1, 3, 3)
  `nn.Conv3d` followed by a zero-initialised residual temporal convolution (`TemporalConv`,
  norm -> SiLU -> (3, 3, 3) conv): together the paper's STBlock3D (Fig. 3), here `STResBlock`. The
  middle block runs spatial self-attention per frame, then a zero-initialised temporal
  self-attention per pixel. 8x spatial compression, NO temporal compression.
- E2/D2, the *temporal autoencoder* (`TemporalEncoder` / `TemporalDecoder`): a lightweight 4x
  temporal compressor on Z1, non-causal with replicate padding: conv_in, then per 2x a stride-(2, 1, 1)
  3D conv doubling the width and one ResBlock; the decoder is asymmetric, each transposed-conv 2x
  upsampling followed by two ResBlocks ("hallucination ability", Sec. 3.2 option 2).
- The KL term regularises only the innermost latent Z2 (Sec. 3.5): ``Latent.logvar`` holds Z2's
  posterior. Z1's posterior is sampled during training as the public code does, without a KL.

Sec. 3.2's ablation (Tab. 3) is available as configs: option 1 (*simultaneous*: the inflated VAE
also halves time at its first two resolution boundaries, no temporal AE) and option 2
(*sequential*: the plain per-frame SD-VAE, no temporal layers, then the temporal AE).

Text guidance (Sec. 3.3): after every residual block of both stages a `PatchCrossAttention` lets the
feature map attend to the caption's text embeddings (keys and values, with the padding mask).
Features are cut into p x p patches with p = 8, 4, 2, 1 from the finest level of the spatial AE to
the coarsest (1 in the temporal AE), so every level asks (H/8)(W/8) queries per frame; LayerNorm,
8 heads x 64, a zero-initialised output projection and a residual add, so a fresh text path is
the identity. The paper's text says visual tokens give the values; the public code and this file
take keys AND values from the text (attention would otherwise have no text content to return).
A text-guided model needs the caption's embedding in ``cond`` at encode AND decode time
(``Cond(text=(B, L, D), text_mask=(B, L))`` from `ldm.text`; the DiT sampling path passes the
prompt's). Models without text ignore ``cond.text``.

Joint image-video training (Sec. 3.4): an input with T = 1 is an image. It bypasses every temporal
layer (temporal convs, temporal attention, option 1's temporal resamplers) and the temporal AE, so
the first stage works as an image VAE and its posterior is the one regularised. Videos therefore
need ``T = 4k`` frames with ``k >= 2`` (a latent with one frame always decodes as an image). The
video:image ratio of training is the trainer's ``--image-ratio`` (paper 8:2, i.e. 0.2), which folds
a batch's frames into an image batch.

Parameters of temporal layers live in modules whose names start with ``temporal``
(`CrossModalVAE.temporal_parameters`); image mode never touches them.

The registered ``cmvae-z4/z16(-text)`` are the public code's models layer for layer, so the
released weights load exactly (``ldm convert --source videovaeplus-official``, ``crossmodal_weights.py``):
GroupNorm over the whole clip (``norm="clip"``), the mid block's temporal attention with learned
relative-position tables (`TemporalSelfAttention`), a temporal decoder of widths ``4h -> 4h -> 2h``
(``h = temporal_channels``), one zero row/column padded before each stride-2 conv, bias-free q/k/v in
the text attention, and no quant convs for the 16-channel model (``quant_conv=False``: SD-3.5's VAE,
its initialisation, has none). The public module also holds a temporal conv on EVERY residual
shortcut that its forward uses only where the width changes; ours has it only there (the converter
drops the unused ones).

One deviation is kept as an option: ``norm="frame"`` normalises each frame on its own. Then image
mode and video frames see the same statistics and the zero-initialised temporal layers make a fresh
model exactly the per-frame image VAE on ANY clip; with the public clip-wise GroupNorm that holds for
images and static clips only (`CrossModalVAE.from_kl2d` inflates a converted SD VAE either way).

Guesses (details the paper leaves open: what this code does, then the alternative; "code:" marks
what the public code settles):

- Text attention: keys AND values from the text (code). The paper's text says visual tokens give
  the values. Alternative: the paper's wording (then attention returns no text content).
- Reconstruction loss: the paper mixes a pixel and a perceptual term "weighted by a
  hyperparameter"; the trainer computes L1 + ``lpips_weight`` x LPIPS with KL 1e-6 (code: L1 +
  LPIPS under a learned log-variance, KL 1e-6). Alternative: the code's learned-variance form.
- Discriminator: the paper says "3D GAN loss" for both models, which the recipe follows; code: a 3D
  PatchGAN for the 16-channel model and a 2D one for the 4-channel model. Alternative: the code's
  (the trainer's ``disc_kind``).
- Optimiser: code: Adam betas (0.5, 0.9); the trainer's ``betas`` default is (0.9, 0.999).
  Gradient clipping at norm 1.0 is the trainer's default for every family; neither the paper nor
  the code notes mention it. Alternative: clipping off (``max_grad_norm=0``).
- Clip lengths: videos need ``T = 4k`` with ``k >= 2``, because a one-frame latent always decodes
  as an image. Alternative: 4-frame clips as videos (then a one-frame latent would be ambiguous).
- ``norm="frame"`` (ours, off by default): per-frame GroupNorm instead of the code's clip-wise one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import REGISTRY, AEConfig, AEOutput, Autoencoder, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, SpatialDownsample, SpatialSelfAttention, SpatialUpsample,
                                 check_latent_stats, clip_group_norm, grid_z, norm_layer, split_moments)
from autoencoders.kl2d import KL2D
from autoencoders.sources import SOURCE_STATS, arch_diff, register_initialiser
from ldm import config as cfglib
from ldm.latent import Cond, Latent, LatentSpec
from ldm.layers import CrossAttention


@dataclass(frozen=True)
class CrossModalVAEConfig(AEConfig):
    """Architecture of one cross-modal video VAE (defaults: the paper's 4-channel model)."""

    latent_channels: int = 4  # c = c' (spatial and innermost latent channels, as in the public configs)
    # --- first stage: the SD-VAE layout, inflated ------------------------------------------------
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; 2x spatial down between levels
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more, as SD)
    norm_groups: int = 32
    norm: str = "clip"  # spatial-stage GroupNorm over the whole clip (public code) | "frame": per frame
    quant_conv: bool = True  # 1x1 convs around the first-stage latent (the 16-channel model has none)
    dropout: float = 0.0
    temporal_layers: bool = True  # STBlock3D temporal convs + mid-block temporal attention
    temporal_kernel: tuple[int, int, int] = (3, 3, 3)  # of the temporal convs (Tab. 4 ablation)
    temporal_attention_heads: int = 1
    temporal_attention_distance: int = 64  # relative positions are clipped to +-this many frames
    spatial_temporal_down: tuple[bool, ...] = (False, False, False)  # option 1: 2x time down per boundary
    # --- second stage: the temporal autoencoder ------------------------------------------------
    temporal_ae: bool = True
    temporal_factor: int = 4  # time compression of the temporal AE (a power of 2)
    temporal_channels: int = 128  # h: encoder width at full frame rate, doubled per 2x (decoder: 4h, 4h, 2h)
    temporal_decoder_blocks: int = 2  # ResBlocks after each decoder upsampling (the encoder has 1)
    # --- text guidance ---------------------------------------------------------------------------
    text_dim: int = 0  # width of the text embeddings; 0 = no text guidance (Flan-T5-large: 1024)
    text_heads: int = 8
    text_head_dim: int = 64
    text_in_temporal_ae: bool = True  # cross-attention after the temporal AE's ResBlocks too (p = 1)
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP


# ------------------------------------------------------------------------------------------
# Convolutions
# ------------------------------------------------------------------------------------------
SPATIAL_NORMS = {"clip": "clip", "frame": "group"}  # config.norm -> blocks.norm_layer kind


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    """The spatial stage's GroupNorm: over the whole clip (public code) or per frame."""
    if kind not in SPATIAL_NORMS:
        raise ValueError(f"norm must be one of {sorted(SPATIAL_NORMS)}, got {kind!r}")
    return norm_layer(SPATIAL_NORMS[kind], channels, groups)


def spatial_conv(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Conv3d:
    """The inflated 2D convolution: a (1, k, k) `nn.Conv3d` (a 2D SD-VAE weight ``(o, i, k, k)``
    loads as ``w[:, :, None]``)."""
    return nn.Conv3d(in_channels, out_channels, (1, kernel, kernel), padding=(0, kernel // 2, kernel // 2))


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


class SameConv3d(nn.Conv3d):
    """Non-causal 3D convolution with replicate "same" padding (the temporal AE's convolution):
    ``k - s`` border frames/pixels per axis, the larger half in front, so stride ``s`` maps an axis
    of ``n`` (a multiple of ``s``) to ``n / s``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1):
        k, s = _triple(kernel), _triple(stride)
        if any(a < b for a, b in zip(k, s)):
            raise ValueError(f"kernel {k} must not be smaller than stride {s}")
        super().__init__(in_channels, out_channels, k, stride=s, padding=0)
        pad: list[int] = []
        for a, b in reversed(list(zip(k, s))):  # F.pad lists the last axis first
            total = a - b
            pad += [total - total // 2, total // 2]
        self.same_pad = tuple(pad)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.same_pad, mode="replicate"))


class TemporalConv(nn.Module):
    """The temporal half of STBlock3D: norm -> SiLU -> 3D conv (kernel ``(k_t, k_h, k_w)``, zero
    padding), with weight and bias initialised to zero so ``h + TemporalConv(h)`` starts as ``h``."""

    def __init__(self, channels: int, kernel: tuple[int, int, int], groups: int):
        super().__init__()
        if any(k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(f"temporal_kernel must be three odd sizes, got {kernel}")
        self.norm = clip_group_norm(channels, groups)
        self.conv = nn.Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel))
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(x)))


class STResBlock(nn.Module):
    """SD-VAE residual block with every 3x3 conv inflated to (1, 3, 3) and followed by a residual
    `TemporalConv` (STBlock3D, Fig. 3); the 1x1 skip projection (when widths change) gets one too,
    as in the public code. ``temporal=False`` (image mode) skips the temporal convs: the block is
    then exactly the 2D block applied to each frame."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float,
                 temporal_kernel: tuple[int, int, int] | None, norm: str = "clip"):
        super().__init__()
        self.norm1 = _norm(norm, in_channels, groups)
        self.conv1 = spatial_conv(in_channels, out_channels)
        self.norm2 = _norm(norm, out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = spatial_conv(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        has_t = temporal_kernel is not None
        self.temporal1 = TemporalConv(out_channels, temporal_kernel, groups) if has_t else None
        self.temporal2 = TemporalConv(out_channels, temporal_kernel, groups) if has_t else None
        self.temporal_skip = (TemporalConv(out_channels, temporal_kernel, groups)
                              if has_t and self.skip is not None else None)

    def forward(self, x: Tensor, temporal: bool) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temporal and self.temporal1 is not None:
            h = h + self.temporal1(h)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if temporal and self.temporal2 is not None:
            h = h + self.temporal2(h)
        if self.skip is not None:
            x = self.skip(x)
            if temporal and self.temporal_skip is not None:
                x = x + self.temporal_skip(x)
        return x + h


# ------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------
@dataclass
class TextContext:
    """Text embeddings ``emb (B, L, D)`` and key ids ``kv_ids (B, L)`` (0 = token, -1 = padding;
    None when no mask was given: every token is real), as every `PatchCrossAttention` of one
    forward pass reads them."""

    emb: Tensor
    kv_ids: Tensor | None


class PatchCrossAttention(nn.Module):
    """Text cross-attention on a patchified feature map (Sec. 3.3).

    ``B C T H W`` is cut into ``p x p`` patches, each a token of width ``p*p*C`` (LayerNorm), the
    tokens of all frames query the text (keys and values, padding masked) through
    `ldm.layers.CrossAttention` with ``heads x head_dim`` inner width (bias-free q/k/v, as the public
    code), and the zero-initialised output projection is added back (residual). Putting every frame's queries in one row is the same as
    attending per frame: each query attends on its own.
    """

    def __init__(self, channels: int, patch: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.patch = patch
        dim = channels * patch * patch
        self.norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, context_dim, heads, qk_norm=False, inner_dim=heads * head_dim, qkv_bias=False)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: Tensor, text: TextContext) -> Tensor:
        _, _, t, height, width = x.shape
        p = self.patch
        if height % p or width % p:
            raise ValueError(f"text cross-attention with {p}x{p} patches needs a feature map divisible by {p}, "
                             f"got {height}x{width}")
        tokens = rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (ph pw c)", ph=p, pw=p)  # (B, T*h*w, p*p*C)
        out = self.attn(self.norm(tokens), text.emb, kv_seq_ids=text.kv_ids)  # (B, T*h*w, p*p*C)
        return x + rearrange(out, "b (t h w) (ph pw c) -> b c t (h ph) (w pw)", t=t, h=height // p, ph=p, pw=p)


class TemporalSelfAttention(nn.Module):
    """Self-attention along time at every pixel (the mid block's temporal attention), as the public
    code: GroupNorm over (channel group, time) of each pixel -> 1x1 qkv -> multi-head attention with
    learned relative-position tables for keys and values (Shaw et al. 2018; offsets clipped to
    ``+-max_distance`` frames) -> zero-initialised 1x1 projection, residual. Non-causal.

    The key-position term is the public code's: the logit of query frame ``i`` for key frame ``j``
    adds ``q_j . a_k(i - j)`` (the KEY frame's query vector with the offset ``i - j``, where Shaw et al.
    write ``q_i . a_k(j - i)``), so released weights see what they were trained with; values add
    ``sum_j w_ij a_v(j - i)``.
    """

    def __init__(self, channels: int, heads: int, groups: int = 32, max_distance: int = 64):
        super().__init__()
        if channels % heads:
            raise ValueError(f"temporal attention: {channels} channels are not divisible by {heads} heads")
        self.heads, self.max_distance = heads, max_distance
        head_dim = channels // heads
        self.norm = nn.GroupNorm(math.gcd(channels, groups), channels)  # (eps 1e-5, as the public code)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.rel_k = nn.Parameter(torch.empty(2 * max_distance + 1, head_dim))
        self.rel_v = nn.Parameter(torch.empty(2 * max_distance + 1, head_dim))
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.xavier_uniform_(self.rel_k)
        nn.init.xavier_uniform_(self.rel_v)
        for layer in (self.qkv, self.proj):  # zero-initialised: a fresh layer is the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _table(self, table: Tensor, t: int) -> Tensor:
        """``out[i, j] = table[clip(j - i) + max_distance]``: ``(T, T, head_dim)``."""
        pos = torch.arange(t, device=table.device)
        return table[(pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance]

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, height, width = x.shape
        h = rearrange(x, "b c t h w -> (b h w) c t")  # (N, C, T)
        q, k, v = rearrange(self.qkv(self.norm(h)), "n (three g d) t -> three (n g) d t",
                            three=3, g=self.heads)  # each (N*heads, d, T)
        scale = q.shape[1] ** -0.25
        q, k = q * scale, k * scale
        logits = torch.einsum("bdi,bdj->bij", q, k)  # (N*heads, T_query, T_key)
        logits = logits + torch.einsum("bdj,jid->bij", q, self._table(self.rel_k, t))  # the public code's term
        weights = logits.float().softmax(dim=-1).to(q.dtype)
        out = torch.einsum("bij,bdj->bdi", weights, v) + torch.einsum("bij,ijd->bdi", weights, self._table(self.rel_v, t))
        out = self.proj(rearrange(out, "(n g) d t -> n (g d) t", g=self.heads))  # (N, C, T)
        return x + rearrange(out, "(b h w) c t -> b c t h w", b=b, h=height, w=width)


class STMidBlock(nn.Module):
    """ResBlock -> spatial self-attention per frame -> temporal self-attention -> ResBlock."""

    def __init__(self, channels: int, cfg: CrossModalVAEConfig):
        super().__init__()
        kernel = cfg.temporal_kernel if cfg.temporal_layers else None
        self.res1 = STResBlock(channels, channels, cfg.norm_groups, cfg.dropout, kernel, cfg.norm)
        self.attn = SpatialSelfAttention(channels, cfg.norm_groups, lambda ch: _norm(cfg.norm, ch, cfg.norm_groups))
        self.temporal_attn = (TemporalSelfAttention(channels, cfg.temporal_attention_heads, cfg.norm_groups,
                                                    cfg.temporal_attention_distance) if cfg.temporal_layers else None)
        self.res2 = STResBlock(channels, channels, cfg.norm_groups, cfg.dropout, kernel, cfg.norm)

    def forward(self, x: Tensor, temporal: bool) -> Tensor:
        h = self.attn(self.res1(x, temporal))
        if temporal and self.temporal_attn is not None:
            h = self.temporal_attn(h)
        return self.res2(h, temporal)


# ------------------------------------------------------------------------------------------
# First stage: the temporal-aware spatial autoencoder
# ------------------------------------------------------------------------------------------
class TemporalDown(nn.Module):
    """Option 1's 2x temporal downsampling inside the inflated VAE: a stride-2 (3, 1, 1) conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = SameConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class TemporalUp(nn.Module):
    """Option 1's 2x temporal upsampling: repeat each frame, then a (3, 1, 1) conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = SameConv3d(channels, channels, (3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.repeat_interleave(2, dim=2))  # (B, C, 2T, H, W)


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], text: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.text = nn.ModuleList(text)  # one cross-attention after each block, or empty
        self.resample = resample


def _text_layer(channels: int, patch: int, cfg: CrossModalVAEConfig) -> PatchCrossAttention:
    return PatchCrossAttention(channels, patch, cfg.text_dim, cfg.text_heads, cfg.text_head_dim)


def _run_level(level: _Level, h: Tensor, text: TextContext | None, temporal: bool) -> Tensor:
    for i, block in enumerate(level.blocks):
        h = block(h, temporal)
        if text is not None and len(level.text):
            h = level.text[i](h, text)
    return h


class STEncoder(nn.Module):
    """E1: (1, 3, 3) conv_in, per level ``num_res_blocks`` STResBlocks (each followed by text
    cross-attention with patch ``2 ** (levels - 1 - i)``) and a 2x spatial downsample (option 1: also
    a 2x temporal one), mid block, GroupNorm -> SiLU -> (1, 3, 3) conv_out to ``out_channels``."""

    def __init__(self, cfg: CrossModalVAEConfig, out_channels: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        levels = len(widths)
        kernel = cfg.temporal_kernel if cfg.temporal_layers else None
        self.conv_in = spatial_conv(cfg.in_channels, widths[0])
        stages, ch = [], widths[0]
        for i, w in enumerate(widths):
            blocks, text = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(STResBlock(ch, w, cfg.norm_groups, cfg.dropout, kernel, cfg.norm))
                ch = w
                if cfg.text_dim:
                    text.append(_text_layer(ch, 2 ** (levels - 1 - i), cfg))
            stages.append(_Level(blocks, text, SpatialDownsample(ch) if i < levels - 1 else nn.Identity()))
        self.levels = nn.ModuleList(stages)
        self.temporal_down = nn.ModuleList(
            [TemporalDown(widths[i]) if down else nn.Identity() for i, down in enumerate(cfg.spatial_temporal_down)])
        self.mid = STMidBlock(ch, cfg)
        self.norm_out = _norm(cfg.norm, ch, cfg.norm_groups)
        self.conv_out = spatial_conv(ch, out_channels)

    def forward(self, x: Tensor, text: TextContext | None, temporal: bool) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            h = level.resample(_run_level(level, h, text, temporal))
            if temporal and i < len(self.temporal_down):
                h = self.temporal_down[i](h)
        h = self.mid(h, temporal)
        return self.conv_out(F.silu(self.norm_out(h)))


class STDecoder(nn.Module):
    """D1: mirror of `STEncoder`: (1, 3, 3) conv_in, mid block, per level from the deepest
    ``num_res_blocks + 1`` STResBlocks (+ text cross-attention, patch ``2 ** (levels - 1 - i)``),
    then (option 1) a 2x temporal and a 2x spatial upsample, GroupNorm -> SiLU -> conv_out."""

    def __init__(self, cfg: CrossModalVAEConfig, in_channels: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        levels = len(widths)
        kernel = cfg.temporal_kernel if cfg.temporal_layers else None
        ch = widths[-1]
        self.conv_in = spatial_conv(in_channels, ch)
        self.mid = STMidBlock(ch, cfg)
        stages = []
        for i in reversed(range(levels)):  # deepest level first
            blocks, text = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(STResBlock(ch, widths[i], cfg.norm_groups, cfg.dropout, kernel, cfg.norm))
                ch = widths[i]
                if cfg.text_dim:
                    text.append(_text_layer(ch, 2 ** (levels - 1 - i), cfg))
            stages.append(_Level(blocks, text, SpatialUpsample(ch) if i > 0 else nn.Identity()))
        self.levels = nn.ModuleList(stages)  # levels[j] works at resolution level (levels - 1 - j)
        self.temporal_up = nn.ModuleList(  # temporal_up[i] undoes the encoder's temporal_down[i]
            [TemporalUp(widths[i + 1]) if down else nn.Identity() for i, down in enumerate(cfg.spatial_temporal_down)])
        self.norm_out = _norm(cfg.norm, ch, cfg.norm_groups)
        self.conv_out = spatial_conv(ch, cfg.in_channels)

    def forward(self, z: Tensor, text: TextContext | None, temporal: bool) -> Tensor:
        h = self.mid(self.conv_in(z), temporal)
        n = len(self.levels)
        for j, level in enumerate(self.levels):
            h = _run_level(level, h, text, temporal)
            boundary = n - 2 - j  # between this level and the finer one above it
            if temporal and boundary >= 0:
                h = self.temporal_up[boundary](h)
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------
# Second stage: the lightweight temporal autoencoder
# ------------------------------------------------------------------------------------------
class TemporalResBlock(nn.Module):
    """GroupNorm (over the clip) -> SiLU -> 3x3x3 conv, twice, plus the identity; non-causal with
    replicate padding (`blocks.ResBlock` is causal by contract, so this one lives here)."""

    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = clip_group_norm(channels, groups)
        self.conv1 = SameConv3d(channels, channels, 3)
        self.norm2 = clip_group_norm(channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = SameConv3d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.dropout(F.silu(self.norm2(h))))


class _TemporalStage(nn.Module):
    def __init__(self, resample: nn.Module, blocks: list[nn.Module], text: list[nn.Module]):
        super().__init__()
        self.resample = resample
        self.blocks = nn.ModuleList(blocks)
        self.text = nn.ModuleList(text)

    def forward(self, h: Tensor, text: TextContext | None) -> Tensor:
        h = self.resample(h)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if text is not None and len(self.text):
                h = self.text[i](h, text)
        return h


class TemporalEncoder(nn.Module):
    """E2 (Eq. 3): conv_in to ``temporal_channels``, per 2x a stride-(2, 1, 1) 3x3x3 conv doubling
    the width and one ResBlock (+ text cross-attention with p = 1), GroupNorm -> SiLU -> conv to
    the posterior moments ``2c'``."""

    def __init__(self, cfg: CrossModalVAEConfig):
        super().__init__()
        steps = int(math.log2(cfg.temporal_factor))
        hidden, z = cfg.temporal_channels, cfg.latent_channels
        self.conv_in = SameConv3d(z, hidden, 3)
        stages = []
        for i in range(steps):
            cin, cout = hidden * 2 ** i, hidden * 2 ** (i + 1)
            text = [_text_layer(cout, 1, cfg)] if cfg.text_dim and cfg.text_in_temporal_ae else []
            stages.append(_TemporalStage(SameConv3d(cin, cout, 3, stride=(2, 1, 1)),
                                         [TemporalResBlock(cout, cfg.norm_groups, cfg.dropout)], text))
        self.stages = nn.ModuleList(stages)
        width = hidden * 2 ** steps
        self.norm_out = clip_group_norm(width, cfg.norm_groups)
        self.conv_out = SameConv3d(width, 2 * z, 3)

    def forward(self, z1: Tensor, text: TextContext | None) -> Tensor:
        h = self.conv_in(z1)
        for stage in self.stages:
            h = stage(h, text)
        return self.conv_out(F.silu(self.norm_out(h)))


class TemporalDecoder(nn.Module):
    """D2 (Eq. 4): conv_in to ``h * 2^s`` (the encoder's deepest width), per 2x a (3, 3, 3)
    transposed conv with stride (2, 1, 1) to ``h * 2^(s - i)`` and ``temporal_decoder_blocks``
    ResBlocks (each + text cross-attention), conv_out to c: widths 4h -> 4h -> 2h for 4x, as the
    public code (so the last stage is twice as wide as the encoder's first)."""

    def __init__(self, cfg: CrossModalVAEConfig):
        super().__init__()
        steps = int(math.log2(cfg.temporal_factor))
        hidden, z = cfg.temporal_channels, cfg.latent_channels
        width = hidden * 2 ** steps
        self.conv_in = SameConv3d(z, width, 3)
        stages, cin = [], width
        for i in range(steps):
            cout = hidden * 2 ** (steps - i)
            up = nn.ConvTranspose3d(cin, cout, 3, stride=(2, 1, 1), padding=1, output_padding=(1, 0, 0))  # T -> 2T
            blocks = [TemporalResBlock(cout, cfg.norm_groups, cfg.dropout) for _ in range(cfg.temporal_decoder_blocks)]
            text = ([_text_layer(cout, 1, cfg) for _ in blocks] if cfg.text_dim and cfg.text_in_temporal_ae else [])
            stages.append(_TemporalStage(up, blocks, text))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.conv_out = SameConv3d(cin, z, 3)

    def forward(self, z2: Tensor, text: TextContext | None) -> Tensor:
        h = self.conv_in(z2)
        for stage in self.stages:
            h = stage(h, text)
        return self.conv_out(h)


class TemporalAutoencoder(nn.Module):
    def __init__(self, cfg: CrossModalVAEConfig):
        super().__init__()
        self.encoder = TemporalEncoder(cfg)
        self.decoder = TemporalDecoder(cfg)


# ------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------
def _check_config(cfg: CrossModalVAEConfig) -> None:
    levels = len(cfg.channel_mult)
    if levels < 1 or any(m < 1 for m in cfg.channel_mult) or cfg.base_channels < 1:
        raise ValueError(f"need base_channels >= 1 and channel_mult of positive ints, got "
                         f"{cfg.base_channels}, {cfg.channel_mult}")
    if cfg.latent_channels < 1 or cfg.num_res_blocks < 1:
        raise ValueError(f"latent_channels and num_res_blocks must be >= 1, got {cfg.latent_channels}, "
                         f"{cfg.num_res_blocks}")
    if len(cfg.spatial_temporal_down) != levels - 1:
        raise ValueError(f"spatial_temporal_down needs one flag per resolution boundary ({levels - 1}), "
                         f"got {cfg.spatial_temporal_down}")
    if cfg.temporal_ae:
        f = cfg.temporal_factor
        if f < 2 or f & (f - 1):
            raise ValueError(f"temporal_factor must be a power of 2 >= 2, got {f}")
        if cfg.temporal_channels < 1 or cfg.temporal_decoder_blocks < 1:
            raise ValueError(f"temporal_channels and temporal_decoder_blocks must be >= 1, got "
                             f"{cfg.temporal_channels}, {cfg.temporal_decoder_blocks}")
    if cfg.text_dim < 0 or (cfg.text_dim and (cfg.text_heads < 1 or cfg.text_head_dim < 1)):
        raise ValueError(f"text_dim must be >= 0 (0 = no text) with positive text_heads/text_head_dim, got "
                         f"{cfg.text_dim}, {cfg.text_heads}, {cfg.text_head_dim}")
    check_latent_stats(cfg, cfg.latent_channels)


@register_family
class CrossModalVAE(Autoencoder):
    """``B C T H W -> z: B c T/r H/8 W/8`` (video, ``T = r*k``, ``k >= 2``) or ``B C 1 H W -> z: B c 1
    H/8 W/8`` (image mode), with ``r`` the total temporal compression (4 for the paper's models)."""

    family = "cmvae"
    config_cls = CrossModalVAEConfig
    spatial_tiling = True

    def __init__(self, config: CrossModalVAEConfig):
        super().__init__(config)
        _check_config(config)
        z = config.latent_channels
        self.encoder = STEncoder(config, 2 * z)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1) if config.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv3d(z, z, 1) if config.quant_conv else nn.Identity()
        self.decoder = STDecoder(config, z)
        self.temporal_ae = TemporalAutoencoder(config) if config.temporal_ae else None

    # --- shape arithmetic ------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Total time compression of a video: option 1's resamplers times the temporal AE's."""
        r = 2 ** sum(bool(d) for d in self.config.spatial_temporal_down)
        return r * (self.config.temporal_factor if self.config.temporal_ae else 1)

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        f, r = self.spatial_factor, self.temporal_factor
        if frames != 1 and (frames < 2 * r or frames % r):
            raise ValueError(f"{self.family}: needs 1 frame (an image) or a multiple of {r} frames, at least "
                             f"{2 * r} (a video), got {frames}")
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"{self.family}: height and width must be positive multiples of {f}, "
                             f"got {height}x{width}")
        t = 1 if frames == 1 else frames // r
        return LatentSpec(form="grid", parts={"z": (self.config.latent_channels, t, height // f, width // f)},
                          input_shape=(self.config.in_channels, frames, height, width),
                          vcpr=frames / t * f * f)

    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def temporal_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter of a temporal layer (temporal convs and attention, option 1's temporal
        resamplers, the temporal AE): the ones image mode never uses."""
        return [(n, p) for n, p in self.named_parameters() if any(s.startswith("temporal") for s in n.split("."))]

    # --- text ------------------------------------------------------------------------------------
    def _text(self, cond: Cond | None, batch: int, device: torch.device, when: str) -> TextContext | None:
        """The text context of a forward pass; None for a model without text guidance (which ignores
        any text in ``cond``). A text-guided model gets exactly what it was trained with or an error."""
        dim = self.config.text_dim
        if not dim:
            return None
        if cond is None or cond.text is None:
            raise ValueError(f"{self.family}: this autoencoder is text-guided (text_dim={dim}) and needs the "
                             f"caption's embedding to {when}: pass cond=Cond(text=emb (B, L, {dim}), text_mask="
                             "(B, L)) from the text encoder it was trained with (ldm.text.build_text_encoder)")
        emb = cond.text
        if emb.ndim != 3 or emb.shape[-1] != dim:
            raise ValueError(f"{self.family}: text embeddings must be (B, L, {dim}) (the text encoder this model was "
                             f"trained with), got {tuple(emb.shape)}")
        if emb.shape[0] not in (1, batch):
            raise ValueError(f"{self.family}: {emb.shape[0]} text embeddings for a batch of {batch}")
        mask = cond.text_mask
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(emb.shape[:2])):
            raise ValueError(f"{self.family}: text_mask must be bool of shape {tuple(emb.shape[:2])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        emb = emb.to(device=device, dtype=self.decoder.conv_out.weight.dtype).expand(batch, -1, -1)  # (B, L, D)
        if mask is None:
            return TextContext(emb, None)
        kv_ids = torch.where(mask.to(device), 0, -1).expand(batch, -1)  # (B, L)
        return TextContext(emb, kv_ids)

    # --- the two stages --------------------------------------------------------------------------
    def spatial_posterior(self, video: Tensor, text: TextContext | None, temporal: bool) -> tuple[Tensor, Tensor]:
        """E1 (Eq. 2) + quant conv: the first stage's posterior (mean, logvar), each ``B c T' h w``."""
        return split_moments(self.quant_conv(self.encoder(video, text, temporal)), self.config.logvar_clamp)

    def spatial_decode(self, z1: Tensor, text: TextContext | None, temporal: bool) -> Tensor:
        """D1: post-quant conv + the inflated decoder, ``B c T' h w -> B C T H W``."""
        return self.decoder(self.post_quant_conv(z1), text, temporal)

    def temporal_posterior(self, z1: Tensor, text: TextContext | None) -> tuple[Tensor, Tensor]:
        """E2 (Eq. 3): the innermost posterior (mean, logvar), each ``B c' T/4 h w``."""
        return split_moments(self.temporal_ae.encoder(z1, text), self.config.logvar_clamp)

    def temporal_decode(self, z2: Tensor, text: TextContext | None) -> Tensor:
        """D2: ``B c' T/4 h w -> B c T h w``."""
        return self.temporal_ae.decoder(z2, text)

    # --- the contract ----------------------------------------------------------------------------
    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        image = video.shape[2] == 1
        text = self._text(cond, video.shape[0], video.device, "encode")
        mean, logvar = self.spatial_posterior(video, text, temporal=not image)
        if not image and self.temporal_ae is not None:
            mean, logvar = self.temporal_posterior(mean, text)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        z = grid_z(latent, self.config.latent_channels, self.family)
        image = z.shape[2] == 1
        text = self._text(cond, z.shape[0], z.device, "decode")
        if not image and self.temporal_ae is not None:
            z = self.temporal_decode(z, text)
        return self.spatial_decode(z, text, temporal=not image)

    # --- initialisation from an image VAE (Sec. 3.2, Sec. 4: SD-1.4 for 4 channels, SD-3.5 for 16) ---
    @classmethod
    def from_kl2d(cls, image_vae: KL2D, target: str | None = None, **overrides: Any) -> "CrossModalVAE":
        """A cross-modal VAE whose first stage is ``image_vae`` inflated: every 2D conv as a (1, k, k)
        3D conv, norms, attention, resamplers and quant convs copied; the temporal convs and temporal
        attention keep their zero initialisation and the temporal AE its random one (the paper trains
        it from scratch). ``target``: a registered cmvae the image VAE must fit (``cmvae-z4`` for an
        SD-1.x VAE, ``cmvae-z16`` for SD-3.5's); default: a config with the image VAE's widths.

        A fresh model therefore equals the image VAE frame by frame in image mode, and in video mode
        for static clips (for any clip with ``norm="frame"``)."""
        c = image_vae.config
        if target is not None:
            if target not in REGISTRY or REGISTRY[target][0] is not cls:
                raise ValueError(f"{target!r} is not a registered cross-modal VAE")
            config = REGISTRY[target][1]
        else:
            config = CrossModalVAEConfig(in_channels=c.in_channels, latent_channels=c.latent_channels,
                                         base_channels=c.base_channels, channel_mult=c.channel_mult,
                                         num_res_blocks=c.num_res_blocks, norm_groups=c.norm_groups,
                                         quant_conv=c.quant_conv, dropout=c.dropout, logvar_clamp=c.logvar_clamp)
        config = cfglib.replace(config, **overrides)
        need = dict(in_channels=c.in_channels, latent_channels=c.latent_channels, base_channels=c.base_channels,
                    channel_mult=tuple(c.channel_mult), num_res_blocks=c.num_res_blocks, norm_groups=c.norm_groups,
                    quant_conv=c.quant_conv)
        wrong = {k: (getattr(config, k), v) for k, v in need.items() if getattr(config, k) != v}
        if c.norm != "group" or c.upsample_shrink or not c.attention:
            wrong["image VAE layout"] = ("GroupNorm, mid attention, no shrinking upsampler",
                                         f"norm={c.norm}, attention={c.attention}, upsample_shrink={c.upsample_shrink}")
        if wrong:
            raise ValueError(f"the image VAE does not fit {target or 'this config'} (field: (cmvae, image VAE)): {wrong}")
        model = cls(config)
        state, ours = image_vae.state_dict(), model.state_dict()
        missing = [k for k in state if k.replace(".stages.", ".levels.") not in ours]
        if missing:
            raise ValueError(f"cannot inflate: image VAE tensors without a place in the cross-modal VAE: {missing[:8]}")
        with torch.no_grad():
            for key, value in state.items():
                dst = ours[key.replace(".stages.", ".levels.")]
                dst.copy_(value.reshape(dst.shape))  # 2D kernels (o, i, k, k) as (o, i, 1, k, k)
        return model

    @classmethod
    def with_text(cls, model: "CrossModalVAE", target: str) -> "CrossModalVAE":
        """The text-guided registered ``target`` (e.g. ``cmvae-z4-text``) started from a trained model
        without text (Sec. 4.1: "for the cross-modal VAE, both models are initialized with their
        pretrained weights"): every tensor of ``model`` copied, the new text cross-attention layers
        fresh (zero output projections: at step 0 the model reconstructs exactly as ``model``)."""
        if target not in REGISTRY or REGISTRY[target][0] is not cls or not REGISTRY[target][1].text_dim:
            raise ValueError(f"{target!r} is not a registered text-guided cross-modal VAE (to go on training a model "
                             "without text, give its folder to --init as it is)")
        if model.config.text_dim:
            raise ValueError(f"the model is already text-guided (text_dim={model.config.text_dim}): give it to "
                             "--init as it is")
        config = REGISTRY[target][1]
        text_fields = ("text_dim", "text_heads", "text_head_dim", "text_in_temporal_ae")
        wrong = arch_diff(config, model.config, text_fields + SOURCE_STATS)
        if wrong:
            raise ValueError(f"the model does not fit {target} (field: ({target}, model)): {wrong}")
        out = cls(cfglib.replace(config, latent_scale=model.config.latent_scale,
                                 latent_shift=model.config.latent_shift))
        missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
        extra = [k for k in missing if ".text." not in k]
        if unexpected or extra:
            raise ValueError(f"cannot start {target} from the model: unplaced {unexpected[:4]}, unset {extra[:4]}")
        return out

    def train_forward(self, video: Tensor, cond: Cond | None = None,
                      generator: torch.Generator | None = None) -> AEOutput:
        """One training reconstruction. Images (T = 1) run the first stage alone and regularise its
        posterior; videos sample the first-stage posterior (no KL on it, as the public code), encode
        it with the temporal AE and return the innermost posterior for the KL (Sec. 3.5)."""
        self.check_input(*video.shape[2:])
        image = video.shape[2] == 1
        text = self._text(cond, video.shape[0], video.device, "train")
        mean, logvar = self.spatial_posterior(video, text, temporal=not image)
        if image or self.temporal_ae is None:
            posterior = Latent({"z": mean}, form="grid", logvar={"z": logvar})
            recon = self.spatial_decode(posterior.sample(generator)["z"], text, temporal=not image)
            return AEOutput(recon=recon, posterior=posterior)
        z1 = Latent({"z": mean}, form="grid", logvar={"z": logvar}).sample(generator)["z"]
        mean2, logvar2 = self.temporal_posterior(z1, text)
        posterior = Latent({"z": mean2}, form="grid", logvar={"z": logvar2})
        z1_hat = self.temporal_decode(posterior.sample(generator)["z"], text)
        return AEOutput(recon=self.spatial_decode(z1_hat, text, temporal=True), posterior=posterior)


@register_initialiser("cmvae", "kl2d")
def from_converted_kl2d(base: KL2D, target: str) -> tuple[CrossModalVAE, str]:
    """``ldm convert --target cmvae[-NAME]`` from a converted image VAE (e.g. SD-1.4's or SD-3.5's)."""
    model = CrossModalVAE.from_kl2d(base, None if target == "cmvae" else target)
    return model, ("cmvae first stage inflated from the converted kl2d (temporal layers zero, temporal AE fresh): "
                   "train it with ldm train-ae --init")


@register_initialiser("cmvae", "cmvae")
def from_cmvae_without_text(base: CrossModalVAE, target: str) -> tuple[CrossModalVAE, str]:
    """``ldm convert --source saved --path RUN/final --target cmvae-z4-text``: the paper's cross-modal phase
    starts from the video VAE trained without text (Sec. 4.1)."""
    return CrossModalVAE.with_text(base, target), ("every tensor copied; the text cross-attention layers fresh "
                                                   "(zero output: at step 0 it reconstructs as the model without text)")


# ------------------------------------------------------------------------------------------
# Registry: the paper's models (SD-VAE widths; 4 channels from SD-1.4, 16 from SD-3.5, both with the
# SD layout), their text-guided versions (Flan-T5-large, 1024-d), Tab. 3's two options, and tiny
# -debug twins with the same compression (4x8x8). A text model built for another text encoder
# takes ``text_dim=<its width>`` as an override (the builtin encoder: 256).
# ------------------------------------------------------------------------------------------
_PAPER = dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=32,
              temporal_channels=128)
_DEBUG = dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8,
              temporal_channels=16, text_heads=2, text_head_dim=16)
_T5_DIM, _BUILTIN_DIM = 1024, 256
_SIMULTANEOUS = dict(spatial_temporal_down=(True, True, False), temporal_ae=False)
_SEQUENTIAL = dict(temporal_layers=False)

for _z in (4, 16):
    _q = dict(latent_channels=_z, quant_conv=_z == 4)  # the 16-channel model (from SD-3.5) has no quant convs
    register(f"cmvae-z{_z}", CrossModalVAE, CrossModalVAEConfig(**_q, **_PAPER))
    register(f"cmvae-z{_z}-text", CrossModalVAE, CrossModalVAEConfig(**_q, text_dim=_T5_DIM, **_PAPER))
    register(f"cmvae-z{_z}-debug", CrossModalVAE, CrossModalVAEConfig(**_q, **_DEBUG))
    register(f"cmvae-z{_z}-text-debug", CrossModalVAE, CrossModalVAEConfig(**_q, text_dim=_BUILTIN_DIM, **_DEBUG))
for _name, _option in (("simultaneous", _SIMULTANEOUS), ("sequential", _SEQUENTIAL)):
    register(f"cmvae-z4-{_name}", CrossModalVAE, CrossModalVAEConfig(latent_channels=4, **_PAPER, **_option))
    register(f"cmvae-z4-{_name}-debug", CrossModalVAE, CrossModalVAEConfig(latent_channels=4, **_DEBUG, **_option))
