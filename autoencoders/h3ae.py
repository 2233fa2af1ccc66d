"""H3AE: a high-compression video VAE with a 2D spatial stage, a 3D causal spatial-temporal stage and
block-causal 3D attention at the bottleneck, trained with the omni (first-frame) objective and the
latent consistency loss (Wu et al., "H3AE: High Compression, High Speed, and High Quality
AutoEncoder for Video Diffusion Models", arXiv:2504.10567). No public code exists; Sec. 3 and the
appendix (Tab. 9, App. D/E) are the spec.

Architecture (Sec. 3.1, Fig. 2, Tab. 9). The encoder is a stem convolution then one *column* per
entry of Tab. 9, each a strided 3x3(x3) convolution into the column's width followed by its blocks:

    S columns   (Conv2D, frame by frame)      1x2x2 downsampling, ResBlocks
    ST columns  (causal Conv3D)               2x2x2 or 1x2x2 downsampling, ResBlocks
    Attn column (at the bottleneck only)      2x2x2 or 1x2x2 downsampling, block-causal attention blocks

then norm -> SiLU -> 1x1x1 conv to the posterior moments. Every column downsamples once, which is
what App. D describes for 8x32x32 (two 1x2x2 downsamplings in the S stage, three 2x2x2 in the ST
stage, i.e. one per column) and puts the attention at the latent resolution, "the bottleneck
position with the highest compression ratio" with 1/32 of CogVideoX's tokens. The decoder mirrors
it: 1x1x1 conv from the latent, then per column (deepest first) its blocks plus one (SD-VAE style)
and a PixelShuffle upsampling out of it (a 1x1(x1) conv to ``r_t*4`` times the channels of the
next column, then depth-to-space over (t, h, w); the ``r_t - 1`` sub-frames before frame 0 are
dropped, so ``1 + k`` frames become ``1 + 2k``), and norm -> SiLU -> conv to pixels. An attention
block is a residual block whose first layer is the attention: ``x + Attn(norm(x))`` then
``x + Conv3D(SiLU(norm(x)))``. Normalisation is PixelNorm (Karras et al. 2018, Sec. 4.2: no
parameters) with GroupNorm / LayerNorm selectable for the Tab. 1 ablation; every norm works per
position or per frame, so the model is causal.

Reading of Tab. 9 (what the parameter counts settled). Tab. 9 gives widths and block counts only.
It leaves open the PixelShuffle conv's kernel, the latent convs' kernel, whether the decoder has
N or N + 1 blocks per column, and what an attention block holds. ``benchmarks/h3ae_params.py``
counts every combination of these (and a few more: channel change in the downsampling or the first
block, shuffle to C_in*r, SD mid blocks) analytically, exactly as ``build`` does, against Tab. 3.
The reading above (``shuffle_kernel=1, latent_kernel=1, decoder_extra_blocks=1, attn_ffn="conv"``)
is the best one for 4x16x16 and 8x32x32 together:

    config      this code   Tab. 3     residual
    4x16x16      66.73 M    67.16 M    -0.6 %
    8x32x32     195.56 M   196.51 M    -0.5 %
    8x64x64     444.35 M   643.76 M    -31 %

(the first reading, 3x3x3 shuffle and latent convs, N blocks, attention + MLP-4 blocks, gave
75.9 / 149.4 / 411.3 M). No reading fits 8x64x64 too: the paper's 8x64x64 - 8x32x32 is 447 M,
while the only column Tab. 9 adds, ST-3 Conv3D 512x8, is 16-18 ResBlocks of 14.2 M plus
resampling convs (231-276 M over all 3,456 readings of the search); reaching 447 M takes 512-wide
ResBlocks twice as large, which would also double the 256-wide ones that pin 4x16x16 at 67 M.
The printed Tab. 9 is kept and the residual stands. Tab. 1 (ablations of 8x32x32, paper / this
code): z=128 195 / 195.4 M, GN or LN 197 / 195.6 M, no attention (its blocks as 512-wide Conv3D
ResBlocks) 316 / 298.0 M; the 3D spatial stage row (189 M, fewer than the 2D model) and the
interpolation row (169 M) cannot be met by any reading (a 3D S stage only adds weights; a 1x1
shuffle conv is lighter than the 3x3 conv after an interpolation: 198.8 M here), and contradict
the text calling PixelShuffle's overhead "negligible".

Causality. All 3D convolutions pad the past with copies of the first frame ("repeated causal
padding", App. D), temporal strides keep the first frame alone, and the attention mask is block
causal (a frame's tokens see their own and earlier frames). A clip of ``1 + r*k`` frames becomes
``1 + k`` latent frames; latent frame ``j`` depends on input frames ``<= r*j`` only; decoded frame
``m`` depends on latent frames ``<= ceil(m / r)`` only. The first frame is encoded alone, which is
why the first-frame features of the omni objective can be read off the clip's own encoder pass.

Training objectives (``train_forward``):

- Omni objective (Sec. 3.2, Eq. 1): with probability ``omni_prob`` per sample the input of decoder
  column ``i`` becomes ``(z_i + e_{N-i}) / 2``, ``e`` being the encoder's output of the symmetric
  column for the first frame (broadcast over time). At inference the same weights decode plainly
  (``decode(latent)``) or image-conditioned (``decode(latent, Cond(first_frame=pixels))``).
- Latent consistency (Sec. 3.3, Eq. 3): the reconstruction is re-encoded with the encoder's
  weights frozen and ``KL(q(z|x) || q(z'|x_hat))`` is added; gradients reach the decoder (through
  ``x_hat``) and never the frozen re-encoding. The "pixel consistency" variant of App. E (Tab. 10)
  decodes the re-encoding with frozen weights too and takes the L1 distance to ``x_hat``. Either is
  switched on after ``consistency_start`` training steps, counted by the persistent buffer
  ``train_steps`` (one per ``train_forward`` in training mode, i.e. one per ``ldm train-ae`` step;
  it travels with checkpoints and ``--init``), as the paper applies it in the final 10K of 80K
  iterations.

Sliced inference (Sec. 3.1.1): the S stage works frame by frame, so ``set_frame_chunk(n)`` runs it
on ``n`` frames at a time in encode and decode (same result, bounded high-resolution memory).

Guesses (details the paper leaves open: what this code does, then the alternative; no public code
exists, so none is settled by code; the Tab. 9 reading above is the largest one):

- Latent consistency weight: 1.0 (``consistency_weight``). The paper's Eq. 2 weights only the KL
  (lambda) and gives L_LC no weight. Alternative: another weight, e.g. lambda of the KL.
- Latent consistency normalisation: Eq. 3's sum over latent elements divided by the input
  elements per sample, batch mean (the KL term's normalisation in ``autoencoders.losses``).
  Alternative: Eq. 3's plain sum, or a mean per latent element (about 68x larger than ours for
  8x32x32 at 17x256x256 with 256 channels).
- Latent consistency target: ``q(z|x)`` is detached, so L_LC trains the decoder (through
  ``x_hat``) and never the encoder. The paper only says the re-encoding's weights are frozen.
  Alternative: let L_LC's gradient reach the encoder through ``q(z|x)`` too.
- First-frame features broadcast to all frames: the first frame's encoder feature (one frame) is
  added to EVERY frame of the symmetric decoder feature, ``(z_i + e_{N-i}) / 2`` at each time
  step. Eq. 1 does not say how one frame meets T frames. Alternative: fuse only the frames that
  come from latent frame 0 (the other frames keep ``z_i``).
- Omni draw: one Bernoulli(p) per sample decides for all decoder columns at once. Eq. 1 writes
  the choice per block. Alternative: an independent draw per column.
- Symmetric pairs: the input of decoder column ``i`` (before its blocks) is fused with the output
  of encoder column ``i`` (same width and resolution). Alternative: the encoder column's input, or
  the decoder column's output.
- 8x64x64: its four ST downsamplings halve time in the first three columns. Alternative: another
  column is the spatial-only one.
- 3D RoPE: the head dimension split over (t, h, w) by ``ldm.layers.rope_axes``. Alternative: another
  split, or RoPE on space only (time is handled by the causal mask).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from autoencoders.base import AEConfig, AEOutput, Autoencoder, causal_grid_spec, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, CausalConv3d, ResBlock, check_latent_stats, group_norm,
                                 grid_z, split_moments)
from ldm.attention import attention
from ldm.latent import Cond, Latent, LatentSpec
from ldm.layers import Mlp, Rope3D, SelfAttention, apply_rope

NORMS = ("pixel", "group", "layer")
UPSAMPLES = ("shuffle", "interpolate")
CONSISTENCY = ("none", "latent", "pixel")
ATTN_FFN = ("conv", "mlp")


@dataclass(frozen=True)
class H3AEConfig(AEConfig):
    """Tab. 9 as data: one entry per column (width, number of blocks). ``st_temporal`` has one flag
    per ST column plus one for the attention column: whether its downsampling also halves time.

    Besides the architecture it holds the family's training objective (``train_forward`` is the
    only place the trainer asks the model for its loss terms): ``omni_prob`` (p of Eq. 1),
    ``consistency`` ("latent" = Eq. 3, "pixel" = App. E, "none"), its weight and start step.
    """

    latent_channels: int = 256
    spatial_widths: tuple[int, ...] = (32, 64)
    spatial_blocks: tuple[int, ...] = (2, 2)
    st_widths: tuple[int, ...] = (128, 256)
    st_blocks: tuple[int, ...] = (2, 8)
    st_temporal: tuple[bool, ...] = (True, True)
    attn_width: int = 0  # 0: no attention column
    attn_blocks: int = 0
    attn_heads: int = 8
    attn_ffn: str = "conv"  # second layer of an attention block: "conv" (causal 3x3x3 Conv3D) | "mlp"
    mlp_ratio: float = 4.0  # hidden width of the "mlp" variant
    shuffle_kernel: int = 1  # kernel of the conv feeding the PixelShuffle (1 | 3)
    latent_kernel: int = 1  # kernel of the convs to the posterior moments and from the latent (1 | 3)
    decoder_extra_blocks: int = 1  # the decoder has N + this blocks per column (SD-VAE style: N + 1)
    norm: str = "pixel"  # "pixel" (PixelNorm) | "group" (per-frame GroupNorm) | "layer" (LayerNorm over channels)
    norm_groups: int = 32
    upsample: str = "shuffle"  # "shuffle" (PixelShuffle / depth-to-space) | "interpolate" (nearest + conv)
    spatial_3d: bool = False  # Tab. 1 ablation: causal Conv3D instead of Conv2D in the S stage
    omni_prob: float = 0.5  # Tab. 4 trains with p = 0.5
    consistency: str = "latent"
    consistency_weight: float = 1.0
    consistency_start: int = 70_000  # Sec. 4: LC loss in the final 10K of 80K iterations
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP

    def __post_init__(self) -> None:
        for kind, widths, blocks in (("spatial", self.spatial_widths, self.spatial_blocks),
                                     ("st", self.st_widths, self.st_blocks)):
            if not widths or len(widths) != len(blocks):
                raise ValueError(f"{kind}_widths {widths} and {kind}_blocks {blocks} need the same, non-zero length")
            if any(w < 1 for w in widths) or any(n < 0 for n in blocks):
                raise ValueError(f"{kind}_widths must be >= 1 and {kind}_blocks >= 0, got {widths}, {blocks}")
        if (self.attn_width > 0) != (self.attn_blocks > 0):
            raise ValueError(f"attn_width ({self.attn_width}) and attn_blocks ({self.attn_blocks}) must both be "
                             "0 (no attention column) or both positive")
        columns = len(self.st_widths) + (self.attn_blocks > 0)
        if len(self.st_temporal) != columns:
            raise ValueError(f"st_temporal needs one flag per ST column and attention column ({columns}), "
                             f"got {self.st_temporal}")
        if self.attn_blocks:
            if self.attn_width % self.attn_heads:
                raise ValueError(f"attn_width {self.attn_width} is not divisible by attn_heads {self.attn_heads}")
            head = self.attn_width // self.attn_heads
            if head % 2 or head < 6:
                raise ValueError(f"3D RoPE needs an even head dim >= 6, got {head} "
                                 f"(attn_width {self.attn_width} / {self.attn_heads} heads)")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {self.upsample!r}")
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"consistency must be one of {CONSISTENCY}, got {self.consistency!r}")
        if not 0.0 <= self.omni_prob <= 1.0:
            raise ValueError(f"omni_prob must be in [0, 1], got {self.omni_prob}")
        if not (self.consistency_weight >= 0 and math.isfinite(self.consistency_weight)):
            raise ValueError(f"consistency_weight must be a finite value >= 0, got {self.consistency_weight}")
        if self.consistency_start < 0:
            raise ValueError(f"consistency_start must be >= 0, got {self.consistency_start}")
        if self.attn_ffn not in ATTN_FFN:
            raise ValueError(f"attn_ffn must be one of {ATTN_FFN}, got {self.attn_ffn!r}")
        if self.shuffle_kernel not in (1, 3) or self.latent_kernel not in (1, 3):
            raise ValueError(f"shuffle_kernel and latent_kernel must be 1 or 3, got {self.shuffle_kernel}, "
                             f"{self.latent_kernel}")
        if self.decoder_extra_blocks < 0:
            raise ValueError(f"decoder_extra_blocks must be >= 0, got {self.decoder_extra_blocks}")
        if self.latent_channels < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"need latent_channels >= 1 and mlp_ratio > 0, got {self.latent_channels}, "
                             f"{self.mlp_ratio}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Width of every column, S then ST then attention."""
        return self.spatial_widths + self.st_widths + ((self.attn_width,) if self.attn_blocks else ())

    @property
    def temporal(self) -> tuple[bool, ...]:
        """Per column: whether its downsampling halves time."""
        return (False,) * len(self.spatial_widths) + tuple(bool(t) for t in self.st_temporal)

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.widths)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal)


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------
class PixelNorm(nn.Module):
    """``x / sqrt(mean_c(x^2) + eps)`` at every position (Karras et al. 2018, "Progressive Growing
    of GANs", Sec. 4.2): no parameters, no statistics across positions or frames."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channel-first map (``B C H W`` or ``B C T H W``), per position."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def make_norm(kind: str, channels: int, groups: int = 32) -> nn.Module:
    """The normalisation of Tab. 1: "pixel" (default), "group" (per frame) or "layer"."""
    if kind == "pixel":
        return PixelNorm()
    if kind == "group":
        return group_norm(channels, groups)
    if kind == "layer":
        return ChannelLayerNorm(channels, eps=1e-6)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


# ------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------
class StridedDown(nn.Module):
    """Downsampling by a strided 3x3 convolution into ``out_channels`` (App. D): per frame
    (``dims=2``, 1x2x2) or causal 3x3x3 with stride ``(2 if temporal else 1, 2, 2)``, which maps
    ``1 + 2k`` frames to ``1 + k`` with output frame ``j`` seeing input frames ``<= 2j``."""

    def __init__(self, in_channels: int, out_channels: int, dims: int, temporal: bool):
        super().__init__()
        if dims == 2 and temporal:
            raise ValueError("a 2D (per frame) downsampling cannot halve time")
        self.temporal = temporal
        self.conv = (nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1) if dims == 2 else
                     CausalConv3d(in_channels, out_channels, 3, stride=(2 if temporal else 1, 2, 2)))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"downsampling needs even height and width, got {tuple(x.shape[-2:])}")
        if self.temporal and (x.shape[2] - 1) % 2:
            raise ValueError(f"temporal downsampling needs 1 + 2k frames, got {x.shape[2]}")
        return self.conv(x)


def _icnr_(conv: nn.Module, factor: int) -> None:
    """Initialise a conv feeding a depth-to-space of ``factor`` sub-positions so that all of them
    start equal (ICNR, Aitken et al. 2017): no checkerboard at initialisation."""
    w = conv.weight
    base = torch.empty(w.shape[0] // factor, *w.shape[1:], device=w.device, dtype=w.dtype)
    nn.init.kaiming_uniform_(base, a=math.sqrt(5))  # nn.Conv's default
    with torch.no_grad():
        w.copy_(base.repeat_interleave(factor, dim=0))  # channel c * factor + s <- kernel c
        if conv.bias is not None:
            conv.bias.copy_(conv.bias[::factor].repeat_interleave(factor))


class ShuffleUp(nn.Module):
    """PixelShuffle upsampling (Sec. 3.1.1, Tab. 1): a ``kernel`` (1 or 3) conv to ``out * r_t * 4``
    channels then depth-to-space over (h, w), and over t when ``temporal`` (3D depth-to-space).
    Temporally the ``r_t - 1`` sub-frames before frame 0 are dropped: ``1 + k`` frames -> ``1 + 2k``
    with frame 0 kept alone and every output frame depending on input frames up to its own position
    only. With ``kernel=1`` (the reading the paper's parameter counts support) each input position
    expands linearly into its own ``r_t x 2 x 2`` cell, a stride-2 transposed convolution."""

    def __init__(self, in_channels: int, out_channels: int, dims: int, temporal: bool, kernel: int = 1):
        super().__init__()
        if dims == 2 and temporal:
            raise ValueError("a 2D (per frame) upsampling cannot double time")
        self.rt = 2 if temporal else 1
        factor = self.rt * 4
        self.conv = (nn.Conv2d(in_channels, out_channels * factor, kernel, padding=kernel // 2) if dims == 2 else
                     CausalConv3d(in_channels, out_channels * factor, kernel))
        _icnr_(self.conv, factor)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if h.ndim == 4:
            return F.pixel_shuffle(h, 2)  # (N, C, 2H, 2W)
        h = rearrange(h, "b (c rt rh rw) t h w -> b c (t rt) (h rh) (w rw)", rt=self.rt, rh=2, rw=2)
        return h[:, :, self.rt - 1:]  # (B, C, 1 + rt*(T-1), 2H, 2W)


class InterpolateUp(nn.Module):
    """The interpolation baseline of Tab. 1: nearest 2x (time: each frame repeated, the copy before
    frame 0 dropped, ``1 + k -> 1 + 2k``) then a 3x3(x3) conv to ``out_channels``. ``kernel`` is
    accepted for a common signature with `ShuffleUp` and not used (the conv after an interpolation
    needs a spatial kernel to mix the copies)."""

    def __init__(self, in_channels: int, out_channels: int, dims: int, temporal: bool, kernel: int = 3):
        super().__init__()
        if dims == 2 and temporal:
            raise ValueError("a 2D (per frame) upsampling cannot double time")
        self.temporal = temporal
        self.conv = (nn.Conv2d(in_channels, out_channels, 3, padding=1) if dims == 2 else
                     CausalConv3d(in_channels, out_channels, 3))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C', 2H, 2W)
        h = F.interpolate(x, scale_factor=(2.0 if self.temporal else 1.0, 2.0, 2.0), mode="nearest")
        return self.conv(h[:, :, 1:] if self.temporal else h)  # (B, C', 1 + 2(T-1) | T, 2H, 2W)


# ------------------------------------------------------------------------------------------
# Block-causal 3D attention (the bottleneck column)
# ------------------------------------------------------------------------------------------
def block_causal_mask(frames: int, tokens_per_frame: int, device: torch.device | str | None = None) -> Tensor:
    """``(N, N)`` bool mask over tokens flattened as (t h w), True = may attend: a token sees every
    token of its own frame and of earlier frames (Sec. 3.1.1, Fig. 2 right)."""
    t = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame)  # (N,)
    return t[:, None] >= t[None, :]


def grid_positions(frames: int, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """``(T*H*W, 3)`` integer (t, h, w) positions in (t h w) order."""
    axes = [torch.arange(n, device=device) for n in (frames, height, width)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (N, 3)


class BlockCausalSelfAttention(SelfAttention):
    """`ldm.layers.SelfAttention` (QK-norm, 3D RoPE, the ``ldm.attention`` entry point, so
    ``set_attention_backend`` applies) called with a dense block-causal mask instead of ids."""

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.norm(q, k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        o = attention(q, k, v, backend=self.backend, mask=mask)  # (B, H, N, d)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


class CausalAttentionBlock(nn.Module):
    """Two residual layers on a ``B C T H W`` map: ``x + Attn(norm(x))``, the attention over all
    (t, h, w) tokens under the block-causal mask, then ``x + Conv3D(SiLU(norm(x)))`` (``ffn="conv"``:
    a ResBlock whose first convolution is the attention, the reading the paper's parameter counts
    support) or ``x + MLP(norm(x))`` (``ffn="mlp"``, a transformer block)."""

    def __init__(self, dim: int, heads: int, norm: Callable[[int], nn.Module], ffn: str = "conv",
                 mlp_ratio: float = 4.0):
        super().__init__()
        if ffn not in ATTN_FFN:
            raise ValueError(f"ffn must be one of {ATTN_FFN}, got {ffn!r}")
        self.norm1 = norm(dim)
        self.attn = BlockCausalSelfAttention(dim, heads, qk_norm=True)
        self.norm2 = norm(dim)
        self.ffn = CausalConv3d(dim, dim, 3) if ffn == "conv" else Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        t, h = x.shape[2], x.shape[3]
        tokens = rearrange(self.norm1(x), "b c t h w -> b (t h w) c")  # (B, N, C)
        x = x + rearrange(self.attn(tokens, rope, mask), "b (t h w) c -> b c t h w", t=t, h=h)
        if isinstance(self.ffn, CausalConv3d):
            return x + self.ffn(F.silu(self.norm2(x)))
        tokens = rearrange(self.norm2(x), "b c t h w -> b (t h w) c")  # (B, N, C)
        return x + rearrange(self.ffn(tokens), "b (t h w) c -> b c t h w", t=t, h=h)


class CausalAttentionStack(nn.Module):
    """The attention column's blocks; RoPE and the mask are built once per call for the map's grid."""

    def __init__(self, dim: int, blocks: int, heads: int, norm: Callable[[int], nn.Module], ffn: str = "conv",
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList([CausalAttentionBlock(dim, heads, norm, ffn, mlp_ratio) for _ in range(blocks)])
        self.rope = Rope3D(dim // heads)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"3D causal attention expects B C T H W, got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        rope = self.rope(grid_positions(t, h, w, x.device))
        mask = block_causal_mask(t, h * w, x.device)
        for block in self.blocks:
            x = block(x, rope, mask)
        return x


# ------------------------------------------------------------------------------------------
# Encoder and decoder
# ------------------------------------------------------------------------------------------
def _fold(x: Tensor) -> Tensor:
    return rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)


def _unfold(x: Tensor, frames: int) -> Tensor:
    return rearrange(x, "(b t) c h w -> b c t h w", t=frames)  # (B, C, T, H, W)


def _fuse(h: Tensor, first: Tensor, use: Tensor | None) -> Tensor:
    """Eq. 1: ``(z_i + e_{N-i}) / 2`` for the samples in ``use`` (all when None); ``first`` is the
    first frame's encoder feature ``B C 1 h w``, broadcast over the frames of ``h`` (``B C T h w``,
    or frames folded into the batch, ``(B T) C h w``)."""
    b, c, _, height, width = first.shape
    if h.ndim == 4:
        ok = h.shape[0] % b == 0 and tuple(h.shape[1:]) == (c, height, width)
    else:
        ok = h.shape[:2] == first.shape[:2] and h.shape[3:] == first.shape[3:]
    if not ok:
        raise ValueError(f"first-frame feature {tuple(first.shape)} does not match decoder feature {tuple(h.shape)}")
    if h.ndim == 4:
        frames = h.shape[0] // b
        e = repeat(first[:, :, 0], "b c h w -> (b t) c h w", t=frames)  # (B*T, C, h, w)
        m = None if use is None else repeat(use, "b -> (b t) 1 1 1", t=frames)
    else:
        e, m = first, None if use is None else use.view(-1, 1, 1, 1, 1)
    fused = (h + e) / 2
    return fused if m is None else torch.where(m, fused, h)


class _Column(nn.Module):
    def __init__(self, resample: nn.Module, blocks: nn.Module):
        super().__init__()
        self.resample = resample
        self.blocks = blocks


def _check_chunk(chunk: int | None, dims: int) -> None:
    if chunk is None:
        return
    if chunk < 1:
        raise ValueError(f"frame chunk must be >= 1, got {chunk}")
    if dims == 3:
        raise ValueError("sliced (frame-chunked) inference needs the 2D spatial stage (spatial_3d=False)")


def _column_blocks(cfg: H3AEConfig, i: int, dims: int, norm: Callable[[int], nn.Module], extra: int = 0) -> nn.Module:
    """The blocks of column ``i`` (Tab. 9) plus ``extra`` (the decoder's): ResBlocks for S and ST
    columns, the attention stack last."""
    width = cfg.widths[i]
    counts = cfg.spatial_blocks + cfg.st_blocks
    if i < len(counts):
        return nn.Sequential(*[ResBlock(width, width, dims, norm=norm) for _ in range(counts[i] + extra)])
    return CausalAttentionStack(width, cfg.attn_blocks + extra, cfg.attn_heads, norm, cfg.attn_ffn, cfg.mlp_ratio)


class H3AEEncoder(nn.Module):
    """Stem conv, then per column a strided downsampling into its width and its blocks, then
    norm -> SiLU -> causal conv to ``2 * latent_channels`` moments."""

    def __init__(self, cfg: H3AEConfig):
        super().__init__()
        norm = functools.partial(make_norm, cfg.norm, groups=cfg.norm_groups)
        self.spatial_dims = 3 if cfg.spatial_3d else 2
        widths, n_s = cfg.widths, len(cfg.spatial_widths)
        self.conv_in = (nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1) if self.spatial_dims == 2 else
                        CausalConv3d(cfg.in_channels, widths[0], 3))
        columns, prev = [], widths[0]
        for i, w in enumerate(widths):
            dims = self.spatial_dims if i < n_s else 3
            columns.append(_Column(StridedDown(prev, w, dims, cfg.temporal[i]), _column_blocks(cfg, i, dims, norm)))
            prev = w
        self.spatial = nn.ModuleList(columns[:n_s])
        self.st = nn.ModuleList(columns[n_s:])
        self.norm_out = norm(prev)
        self.conv_out = CausalConv3d(prev, 2 * cfg.latent_channels, cfg.latent_kernel)

    def forward(self, x: Tensor, chunk: int | None = None, features: bool = True) -> tuple[Tensor, list[Tensor]]:
        """``x: B C T H W`` -> (moments ``B 2c t h w``, first-frame output of every column
        ``[B C_i 1 h_i w_i]``, empty unless ``features``). ``chunk`` runs the 2D spatial stage on
        that many frames at a time."""
        _check_chunk(chunk, self.spatial_dims)
        frames = x.shape[2]
        step = frames if chunk is None else chunk
        feats: list[Tensor] = []
        outs = []
        for t0 in range(0, frames, step):
            n = min(step, frames - t0)
            h = x[:, :, t0:t0 + n]
            h = _fold(h) if self.spatial_dims == 2 else h
            h = self.conv_in(h)
            for col in self.spatial:
                h = col.blocks(col.resample(h))
                if features and t0 == 0:
                    feats.append((_unfold(h, n) if h.ndim == 4 else h)[:, :, :1])
            outs.append(_unfold(h, n) if h.ndim == 4 else h)
        h = torch.cat(outs, 2) if len(outs) > 1 else outs[0]  # (B, C, T, H/fs, W/fs)
        for col in self.st:
            h = col.blocks(col.resample(h))
            if features:
                feats.append(h[:, :, :1])
        return self.conv_out(F.silu(self.norm_out(h))), feats


class H3AEDecoder(nn.Module):
    """Causal conv from the latent, then per column (deepest first) the first-frame fusion of Eq. 1
    when features are given, its blocks and a PixelShuffle upsampling out of it, then norm -> SiLU
    -> conv to pixels."""

    def __init__(self, cfg: H3AEConfig):
        super().__init__()
        norm = functools.partial(make_norm, cfg.norm, groups=cfg.norm_groups)
        up_cls = ShuffleUp if cfg.upsample == "shuffle" else InterpolateUp
        self.spatial_dims = 3 if cfg.spatial_3d else 2
        widths, n_s = cfg.widths, len(cfg.spatial_widths)
        self.conv_in = CausalConv3d(cfg.latent_channels, widths[-1], cfg.latent_kernel)
        columns = []
        for i, w in enumerate(widths):  # column i upsamples back to the resolution and width of column i - 1
            dims = self.spatial_dims if i < n_s else 3
            up = up_cls(w, widths[max(i - 1, 0)], dims, cfg.temporal[i], cfg.shuffle_kernel)
            columns.append(_Column(up, _column_blocks(cfg, i, dims, norm, cfg.decoder_extra_blocks)))
        self.spatial = nn.ModuleList(columns[:n_s])  # index i = column i (applied in reverse)
        self.st = nn.ModuleList(columns[n_s:])
        self.norm_out = norm(widths[0])
        self.conv_out = (nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1) if self.spatial_dims == 2 else
                         CausalConv3d(widths[0], cfg.in_channels, 3))

    def forward(self, z: Tensor, first: list[Tensor] | None = None, use: Tensor | None = None,
                chunk: int | None = None) -> Tensor:
        """``z: B c t h w`` -> ``B C (1 + r(t-1)) H W``. ``first``: the first frame's encoder
        features per column (as `H3AEEncoder` returns them) to fuse (Eq. 1) into the samples
        where ``use`` (``B`` bool; None = all) is True; None decodes plainly."""
        _check_chunk(chunk, self.spatial_dims)
        n_s = len(self.spatial)
        if first is not None and len(first) != n_s + len(self.st):
            raise ValueError(f"need first-frame features for {n_s + len(self.st)} columns, got {len(first)}")
        h = self.conv_in(z)
        for i in reversed(range(len(self.st))):
            col = self.st[i]
            if first is not None:
                h = _fuse(h, first[n_s + i], use)
            h = col.resample(col.blocks(h))
        frames = h.shape[2]
        step = frames if chunk is None else chunk
        outs = []
        for t0 in range(0, frames, step):
            n = min(step, frames - t0)
            f = h[:, :, t0:t0 + n]
            f = _fold(f) if self.spatial_dims == 2 else f
            for i in reversed(range(n_s)):
                col = self.spatial[i]
                if first is not None:
                    f = _fuse(f, first[i], use)
                f = col.resample(col.blocks(f))
            f = self.conv_out(F.silu(self.norm_out(f)))
            outs.append(_unfold(f, n) if f.ndim == 4 else f)
        return torch.cat(outs, 2) if len(outs) > 1 else outs[0]  # (B, C, T, H, W)


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------
def gaussian_kl(mean_p: Tensor, logvar_p: Tensor, mean_q: Tensor, logvar_q: Tensor) -> Tensor:
    """``KL(N(mean_p, exp(logvar_p)) || N(mean_q, exp(logvar_q)))`` of diagonal Gaussians summed over
    all non-batch axes, per sample ``(B,)``: Eq. 3 of H3AE,
    ``0.5 * sum((mu_p - mu_q)^2 / s_q^2 + s_p^2 / s_q^2 - 1 - log(s_p^2 / s_q^2))``."""
    ratio = logvar_p - logvar_q
    kl = 0.5 * ((mean_p - mean_q).pow(2) * torch.exp(-logvar_q) + ratio.exp() - 1.0 - ratio)
    return kl.flatten(1).sum(1)


# ------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------
@register_family
class H3AE(Autoencoder):
    """H3AE: ``B C (1+rk) H W -> z: B c (1+k) H/f W/f`` with ``f = 2 ** columns`` and
    ``r = 2 ** (temporal downsamplings)``; see the module docstring."""

    family = "h3ae"
    config_cls = H3AEConfig
    spatial_tiling = True
    first_frame_decoding = True  # Sec. 3.2: one set of weights decodes plainly or with the first frame (I2V)

    def __init__(self, config: H3AEConfig):
        super().__init__(config)
        check_latent_stats(config, config.latent_channels)
        self.encoder = H3AEEncoder(config)
        self.decoder = H3AEDecoder(config)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))  # drives consistency_start
        self.frame_chunk: int | None = None

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    def set_frame_chunk(self, frames: int | None) -> None:
        """Sliced inference: run the 2D spatial stage on ``frames`` frames at a time (None: all)."""
        _check_chunk(frames, self.encoder.spatial_dims)
        self.frame_chunk = frames

    def set_chunk_frames(self, frames: int | None) -> None:
        """The contract's name for sliced inference (``set_frame_chunk``; 0: one shot, as None)."""
        self.set_frame_chunk(frames or None)

    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        return causal_grid_spec(self, frames, height, width, self.temporal_factor, self.spatial_factor,
                                self.config.latent_channels, rule=" (fully causal: the first frame alone)")

    def _posterior(self, moments: Tensor) -> Latent:
        mean, logvar = split_moments(moments, self.config.logvar_clamp)  # each (B, c, t, h, w)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        moments, _ = self.encoder(video, self.frame_chunk, features=False)
        return self._posterior(moments)

    def first_frame_features(self, first_frame: Tensor, z: Tensor | None = None) -> list[Tensor]:
        """Encoder features of every column for ``first_frame: B C 1 H W`` pixels in [-1, 1] (the
        image condition of Eq. 1); checked against the latent ``z`` it will be decoded with."""
        c = self.config.in_channels
        if first_frame.ndim != 5 or first_frame.shape[1] != c or first_frame.shape[2] != 1:
            raise ValueError(f"cond.first_frame must be B {c} 1 H W pixels, got {tuple(first_frame.shape)}")
        if z is not None:
            f = self.spatial_factor
            want = (z.shape[0], z.shape[3] * f, z.shape[4] * f)
            got = (first_frame.shape[0], *first_frame.shape[3:])
            if got != want:
                raise ValueError(f"cond.first_frame has batch/height/width {got}, the latent needs {want}")
        self.check_input(1, *first_frame.shape[3:])
        return self.encoder(first_frame, None)[1]

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        z = grid_z(latent, self.config.latent_channels, self.family)
        first = None
        if cond is not None and cond.first_frame is not None:
            first = self.first_frame_features(cond.first_frame.to(z.dtype), z)
        return self.decoder(z, first, None, self.frame_chunk)  # (B, C, T, H, W)

    # --- training ------------------------------------------------------------------------
    def schedule_warnings(self, steps_left: int) -> list[str]:
        """The consistency loss never switches on when ``consistency_start`` lies beyond the run's
        last step (``train_steps`` counts the steps this model has trained, ``--init`` runs included)."""
        cfg, done = self.config, int(self.train_steps)
        if cfg.consistency == "none" or cfg.consistency_start < done + steps_left:
            return []
        return [f"the {cfg.consistency} consistency loss starts after {cfg.consistency_start} training steps "
                f"(consistency_start) and this run ends after {done + steps_left}: it never applies. The paper "
                f"applies it in the last 10K of 80K steps; e.g. --ae-config consistency_start="
                f"{done + steps_left - max(steps_left // 8, 1)}, or consistency=none to train without it"]

    def consistency_active(self) -> bool:
        cfg = self.config
        return cfg.consistency != "none" and int(self.train_steps) >= cfg.consistency_start

    def _frozen(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Call ``module`` with its parameters detached: gradients reach the inputs, never its weights."""
        params = {name: p.detach() for name, p in module.named_parameters()}
        return torch.func.functional_call(module, params, args, kwargs)

    def latent_consistency_loss(self, posterior: Latent, recon: Tensor) -> Tensor:
        """Eq. 3: ``KL(q(z|x) || q(z'|x_hat))`` with ``z'`` from re-encoding ``recon`` with the encoder's
        weights frozen and ``q(z|x)`` (``posterior``, from the training forward) as a fixed target;
        summed over latent elements, divided by the input elements per sample and averaged over the
        batch (the normalisation of the KL term in ``autoencoders.losses``)."""
        moments, _ = self._frozen(self.encoder, recon, self.frame_chunk, features=False)
        mean_f, logvar_f = split_moments(moments, self.config.logvar_clamp)
        real = posterior["z"].detach().float(), posterior.logvar["z"].detach().float()
        kl = gaussian_kl(*real, mean_f.float(), logvar_f.float())  # (B,), in float32 under autocast too
        return (kl / recon[0].numel()).mean()

    def pixel_consistency_loss(self, recon: Tensor) -> Tensor:
        """App. E's "pixel consistency" variant: the whole VAE with frozen weights reconstructs
        ``recon`` again (posterior mean, plain decoding) and the mean L1 distance to ``recon``
        (a fixed target) is the loss."""
        moments, _ = self._frozen(self.encoder, recon, self.frame_chunk, features=False)
        mean_f, _ = split_moments(moments, self.config.logvar_clamp)
        again = self._frozen(self.decoder, mean_f, None, None, self.frame_chunk)
        return (again - recon.detach()).abs().mean()

    def train_forward(self, video: Tensor, cond: Cond | None = None,
                      generator: torch.Generator | None = None) -> AEOutput:
        """Encode, sample, decode with the omni objective (Eq. 1: each sample gets the first frame's
        encoder features with probability ``omni_prob``; they come from this clip's own causal
        encoder pass, where frame 0 is encoded alone), plus the consistency term once
        ``train_steps >= consistency_start``. ``cond`` is not used: the condition of Eq. 1 is the
        clip's own first frame."""
        cfg = self.config
        moments, feats = self.encoder(video, self.frame_chunk, features=cfg.omni_prob > 0)
        posterior = self._posterior(moments)
        z = posterior.sample(generator)["z"]
        use = None
        if cfg.omni_prob > 0:
            use = torch.rand(video.shape[0], generator=generator, device=video.device) < cfg.omni_prob
        recon = self.decoder(z, feats if use is not None else None, use, self.frame_chunk)
        losses: dict[str, Tensor] = {}
        if self.consistency_active() and cfg.consistency_weight > 0:
            if cfg.consistency == "latent":
                losses["latent_consistency"] = cfg.consistency_weight * self.latent_consistency_loss(posterior, recon)
            else:
                losses["pixel_consistency"] = cfg.consistency_weight * self.pixel_consistency_loss(recon)
        if self.training:
            self.train_steps += 1
        return AEOutput(recon=recon, posterior=posterior, losses=losses)


# Tab. 9: S stage Conv2D 32x2, 64x2; ST stage Conv3D 128x2, 256x8|6, (512x8); attention 512x8, 8 heads.
# The config defaults carry the reading fitted to Tab. 3's parameter counts (module docstring).
_S = dict(spatial_widths=(32, 64), spatial_blocks=(2, 2))
register("h3ae-4x16x16", H3AE, H3AEConfig(**_S, st_widths=(128, 256), st_blocks=(2, 8), st_temporal=(True, True)))
register("h3ae-8x32x32", H3AE, H3AEConfig(**_S, st_widths=(128, 256), st_blocks=(2, 6),
                                          attn_width=512, attn_blocks=8, st_temporal=(True, True, True)))
# 8x64x64 has four ST downsamplings for three temporal ones; the first three columns halve time, as
# in 8x32x32 (the paper does not say which one is spatial only).
register("h3ae-8x64x64", H3AE, H3AEConfig(**_S, st_widths=(128, 256, 512), st_blocks=(2, 6, 8),
                                          attn_width=512, attn_blocks=8, st_temporal=(True, True, True, False)))

# Debug twins: same columns, factors, latent channels and reading; tiny widths, one block per column
# (two in the decoder), and the consistency loss from step 150 (the last quarter of a 200-step CPU run).
_D = dict(spatial_widths=(8, 16), spatial_blocks=(1, 1), consistency_start=150)
register("h3ae-4x16x16-debug", H3AE, H3AEConfig(**_D, st_widths=(16, 32), st_blocks=(1, 1), st_temporal=(True, True)))
register("h3ae-8x32x32-debug", H3AE, H3AEConfig(**_D, st_widths=(16, 32), st_blocks=(1, 1),
                                                attn_width=64, attn_blocks=1, st_temporal=(True, True, True)))
register("h3ae-8x64x64-debug", H3AE, H3AEConfig(**_D, st_widths=(16, 32, 32), st_blocks=(1, 1, 1),
                                                attn_width=64, attn_blocks=1, st_temporal=(True, True, True, False)))
