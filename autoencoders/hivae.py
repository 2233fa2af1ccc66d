"""Hi-VAE: video autoencoding with global and detailed motion and a conditional diffusion decoder
(Liu et al. 2025, "Hi-VAE: Efficient Video Autoencoding with Global and Detailed Motion").

A frozen per-frame image VAE (our ``kl2d``) gives the video latent ``z: B c T h w`` (Eq. 1); its
first frame is the content latent ``c``. A 3D FFT with a soft Gaussian mask splits ``z`` into a low-
and a high-frequency part (Eq. 3, 6). Two transformer modules compress them:

- the Global Motion Extraction Module (Sec. 3.1.1): the low-passed latent is patchified per frame,
  a random 30-50 % of the spatial positions is dropped in training, the positions are folded into
  the batch, and learnable queries ``q_g`` (``f_g = T/2`` slots x ``n_g`` tokens) cross-attend to
  each position's frames (Eq. 4-5); the per-position results are averaged over the positions and
  projected to a diagonal Gaussian over ``u_g: B f_g n_g c_g``;
- the Detailed Motion Extraction Module (Sec. 3.1.2): per frame, ``n_d`` learnable tokens are
  concatenated with the high-passed frame's tokens, self-attention mixes them (Eq. 7-8) and the
  learnable tokens become a Gaussian over ``u_d: B T n_d c_d``.

The Conditional Diffusion Decoder (Sec. 3.2) is a flow-matching DiT built from ``ldm.layers``: the
noisy latent concatenated with the repeated content latent (Eq. 9) is patchified, each frame's
detailed-motion tokens join that frame's self-attention, the global-motion tokens are a
cross-attention context, and every other block is the Temporal Align Block (self-attention across
frames per spatial site). It predicts the velocity (Eq. 10-12); ``decode`` integrates the flow ODE
with Euler steps and classifier-free guidance (App. A.2: 20 steps, weight 5), then the base decoder
turns ``z_hat`` into pixels. Two-stage training (Sec. 3.3): ``stage=1`` trains the global module
and the decoder (detailed motion always the null condition, optionally on blurred video);
``stage=2`` freezes the global module and trains the detailed module with the decoder.

The latent is a token set: ``content: B c 1 h w``, ``global: B f_g n_g c_g``, ``detailed: B T n_d c_d``.
Its compression rate follows App. C.1; ``HiVAELatentSpec`` reports it with the content latent (what
our generator models) and without it (the paper's number, e.g. 2304 / 3,145,728 for Hi-VAE (S)).

Conventions: ``ldm.flow`` runs time from data (t = 0) to noise (t = 1) with ``v = eps - z``; the
paper runs it the other way (``v = z - eps``); the two differ only in the sign of t.

Guesses (details the paper leaves open: what this code does, then the alternative; "code:" marks
what the authors' public code shows, from the shared notes on papers and code):

- Global positions to one latent: the per-position query outputs are averaged over the kept
  positions (invariant to how many are masked). Alternative: keep one ``u_g`` per position, or a
  learned pooling.
- Self-attention among the global queries: ours (the shared transformer block); code: none,
  cross-attention only. Alternative: drop it to match the code.
- Mask ratio: one ratio ``r ~ U(0.3, 0.5)`` per batch, so every sample keeps the same number of
  positions. Alternative: one ratio per sample (ragged batches).
- KL (lambda_KL = 1e-3, App. A.2): summed over the motion elements, batch mean. Alternative: mean
  per element (a weaker KL by the element count). ``kl_free_bits`` / ``posterior_init_logvar``
  (ours, off by default) counter the posterior collapse seen at CPU scale.
- Stage-1 blur: the paper trains stage 1 on "blurred video" without naming the blur: a per-frame
  Gaussian of sigma ``stage1_blur`` pixels, 0 (off) by default. Alternative: on, at a sigma of a
  few pixels, or another low-pass.
- Condition dropout: 10 % drops both motions (App. A.2); ``part_dropout`` = 5 % drops each motion
  on its own (ours, so single-motion decoding (Fig. 5) stays in distribution). Alternative: 0.
- Flow-matching times: uniform t, shift 1 (debug twins 3); the paper names 1000 training steps
  only. Alternative: logit-normal or shifted times.
- Decoder size: "16 layers, 640 M" read as 16 pairs (spatial block + Temporal Align Block) at
  width 1024: 675 M here (code: width 1024, 12 layers). Alternative: 16 blocks in all, alternating.
- Global slots: ``f_g = ceil(T / 2)``, slot f at frame 2f ("half the number of frames").
  Alternative: ``floor(T / 2)``, or slots centred between frame pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import REGISTRY, AEConfig, AEOutput, Autoencoder, load_pretrained, register, register_family
from autoencoders.blocks import LOGVAR_CLAMP, latent_kl
from autoencoders.kl2d import KL2D, KL2DConfig
from ldm import config as cfglib
from ldm import flow, samplers
from ldm.cost import transformer_block_flops
from ldm.latent import Cond, Latent, LatentSpec
from ldm.layers import FinalLayer, Rope3D, TimestepEmbedder, TokenLayout, TransformerBlock, timestep_embedding

MOTIONS = ("both", "global", "detailed")  # which motion latents decoding uses (paper Fig. 5)


@dataclass(frozen=True)
class HiVAEConfig(AEConfig):
    """Architecture of a Hi-VAE. ``base`` is the frozen per-frame VAE's config (its weights come
    from a checkpoint the user names at build time: ``build_hivae(..., base_checkpoint=DIR)``)."""

    base: KL2DConfig = field(default_factory=KL2DConfig)
    # frequency split (Eq. 3, 6): soft Gaussian low-pass with these cut-offs on normalised frequencies
    cutoff_spatial: float = 0.6
    cutoff_temporal: float = 0.6
    # global motion u_g: f_g x n_g x c_g with f_g = ceil(T / global_time_stride) ("half the frames")
    global_tokens: int = 8
    global_channels: int = 4
    global_time_stride: int = 2
    global_patch: int = 8  # latent pixels per side of one spatial position (32x32 latent -> 4x4)
    global_width: int = 512
    global_depth: int = 8
    global_heads: int = 8
    mask_ratio: tuple[float, float] = (0.3, 0.5)  # fraction of positions dropped in training, uniform
    # detailed motion u_d: T x n_d x c_d
    detailed_tokens: int = 16
    detailed_channels: int = 8
    detailed_patch: int = 2
    detailed_width: int = 512
    detailed_depth: int = 8
    detailed_heads: int = 8
    # conditional diffusion decoder: decoder_depth x (spatial block + Temporal Align Block)
    decoder_width: int = 1024
    decoder_depth: int = 16
    decoder_heads: int = 16
    decoder_patch: int = 2
    mlp_ratio: float = 4.0
    # training objective (Sec. 3.3, App. A.2)
    stage: int = 1  # 1: global module + decoder; 2: global frozen, detailed module + decoder
    kl_weight: float = 1e-3  # on the KL of the motion posteriors, summed over their elements
    kl_free_bits: float = 0.0  # nats per motion element (batch mean) below which the KL is not penalised
    posterior_init_logvar: float = 0.0  # initial log-variance of the motion posteriors (bias of the logvar head)
    cond_dropout: float = 0.1  # both motions -> null (classifier-free guidance)
    part_dropout: float = 0.05  # extra, independent per motion: decoding with one motion stays in-distribution
    timesteps: str = "uniform"  # ldm.flow.sample_timesteps distribution
    timestep_shift: float = 1.0  # SD3 shift of training and sampling times (> 1: more time near noise)
    stage1_blur: float = 0.0  # Gaussian sigma (pixels) of the stage-1 input blur; 0 = off
    # sampling in decode (App. A.2)
    sample_steps: int = 20
    guidance_scale: float = 5.0  # v = v_u + s (v_c - v_u); 1 = no guidance
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP


def _check_config(cfg: HiVAEConfig) -> None:
    if cfg.in_channels != cfg.base.in_channels:
        raise ValueError(f"hivae: in_channels {cfg.in_channels} != base in_channels {cfg.base.in_channels}")
    if len(cfg.latent_scale) != 1 or len(cfg.latent_shift) != 1:
        raise ValueError("hivae: latent_scale/latent_shift take one value (the parts have different channels)")
    if cfg.stage not in (1, 2):
        raise ValueError(f"hivae: stage must be 1 or 2, got {cfg.stage}")
    lo, hi = cfg.mask_ratio
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"hivae: mask_ratio must satisfy 0 <= lo <= hi < 1, got {cfg.mask_ratio}")
    for name in ("cutoff_spatial", "cutoff_temporal"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"hivae: {name} must be > 0, got {getattr(cfg, name)}")
    for name in ("cond_dropout", "part_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"hivae: {name} must be in [0, 1), got {getattr(cfg, name)}")
    positive = ("global_tokens", "global_channels", "global_time_stride", "global_patch", "global_depth",
                "detailed_tokens", "detailed_channels", "detailed_patch", "detailed_depth", "decoder_depth",
                "decoder_patch", "sample_steps")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"hivae: {name} must be >= 1, got {getattr(cfg, name)}")
    for prefix in ("global", "detailed", "decoder"):
        width, heads = getattr(cfg, f"{prefix}_width"), getattr(cfg, f"{prefix}_heads")
        if heads < 1 or width % heads:
            raise ValueError(f"hivae: {prefix}_width {width} is not divisible by {prefix}_heads {heads}")
    if cfg.timesteps not in flow.TIMESTEP_DISTRIBUTIONS:
        raise ValueError(f"hivae: timesteps must be one of {flow.TIMESTEP_DISTRIBUTIONS}, got {cfg.timesteps!r}")
    if not cfg.timestep_shift > 0:
        raise ValueError(f"hivae: timestep_shift must be > 0, got {cfg.timestep_shift}")
    if cfg.stage1_blur < 0 or cfg.kl_weight < 0 or cfg.guidance_scale < 0 or cfg.kl_free_bits < 0:
        raise ValueError("hivae: stage1_blur, kl_weight, kl_free_bits and guidance_scale must be >= 0")


# ------------------------------------------------------------------------------------------
# Frequency split (Eq. 3, 6) and small helpers
# ------------------------------------------------------------------------------------------
def lowpass_mask(frames: int, height: int, width: int, cutoff_spatial: float, cutoff_temporal: float,
                 device: torch.device | str | None = None) -> Tensor:
    """The soft Gaussian low-pass ``P`` of Eq. 3 on the ``rfftn`` grid of a ``(T, h, w)`` volume:
    ``exp(-0.5 ((f_t / d_t)^2 + (f_h / d_s)^2 + (f_w / d_s)^2))`` with every frequency normalised
    to [-1, 1) (``2 * fftfreq``; 0 = DC). Same values as the centred (fftshifted) mask of the
    authors' code for even sizes, symmetric for odd ones. Returns ``(T, h, w // 2 + 1)``."""
    ft = 2 * torch.fft.fftfreq(frames, device=device)
    fh = 2 * torch.fft.fftfreq(height, device=device)
    fw = 2 * torch.fft.rfftfreq(width, device=device)
    d2 = ((ft / cutoff_temporal)[:, None, None] ** 2 + (fh / cutoff_spatial)[None, :, None] ** 2
          + (fw / cutoff_spatial)[None, None, :] ** 2)
    return torch.exp(-0.5 * d2)


def frequency_split(z: Tensor, cutoff_spatial: float, cutoff_temporal: float) -> tuple[Tensor, Tensor]:
    """``z: (B, c, T, h, w)`` -> ``(z_low, z_high)``: ``IFFT3D(FFT3D(z) * P)`` (Eq. 3) and
    ``IFFT3D(FFT3D(z) * (1 - P))`` (Eq. 6) over (T, h, w), per channel, in float32 (float64 stays
    float64). The two sum to ``z``."""
    T, h, w = z.shape[-3:]
    spec = torch.fft.rfftn(z if z.dtype == torch.float64 else z.float(), dim=(-3, -2, -1))
    mask = lowpass_mask(T, h, w, cutoff_spatial, cutoff_temporal, z.device)
    low = torch.fft.irfftn(spec * mask, s=(T, h, w), dim=(-3, -2, -1))
    high = torch.fft.irfftn(spec * (1 - mask), s=(T, h, w), dim=(-3, -2, -1))
    return low.to(z.dtype), high.to(z.dtype)


def gaussian_blur(video: Tensor, sigma: float) -> Tensor:
    """Per-frame separable Gaussian blur of ``(B, C, T, H, W)`` (reflect padding, radius 3 sigma):
    the "blurred video data" of the first training stage (Sec. 3.3)."""
    if sigma <= 0:
        return video
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=video.dtype, device=video.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    B, C, T, H, W = video.shape
    if radius >= min(H, W):
        raise ValueError(f"blur sigma {sigma} is too large for {H}x{W} frames")
    frames = rearrange(video, "b c t h w -> (b t c) 1 h w")  # (B*T*C, 1, H, W)
    frames = F.conv2d(F.pad(frames, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    frames = F.conv2d(F.pad(frames, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return rearrange(frames, "(b t c) 1 h w -> b c t h w", b=B, t=T)  # (B, C, T, H, W)


def sincos(positions: Tensor, dim: int) -> Tensor:
    """Fixed sinusoidal embedding of ``(N, k)`` positions (any k axes): each axis gets an even share
    of ``dim`` (the remainder goes to the first) embedded with ``ldm.layers.timestep_embedding``.
    Returns ``(N, dim)`` float32."""
    k = positions.shape[-1]
    share = dim // k // 2 * 2
    dims = [dim - share * (k - 1)] + [share] * (k - 1)
    return torch.cat([timestep_embedding(positions[:, a].float(), d) for a, d in enumerate(dims)], -1)


def _grid(*sizes: int, device: torch.device | None = None) -> Tensor:
    """All integer coordinates of a grid of ``sizes``, row-major: ``(prod(sizes), len(sizes))``."""
    axes = [torch.arange(n, device=device) for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(sizes))


def _gaussian(moments: Tensor, clamp: tuple[float, float]) -> tuple[Tensor, Tensor]:
    mean, logvar = moments.chunk(2, -1)
    return mean, logvar.clamp(*clamp)


def _encoder_block(dim: int, heads: int, mlp_ratio: float, context_dim: int | None = None) -> TransformerBlock:
    """The shared DiT block as a plain pre-LN encoder block: conditioned on a constant (``cond_dim=1``,
    called with ones), its adaLN reduces to a learned LayerNorm affine and learned residual gates
    (12 * dim parameters). The gates start at 1 (not adaLN-Zero's 0), so a fresh encoder is an
    ordinary pre-LN transformer whose output already depends on its input."""
    blk = TransformerBlock(dim, heads, mlp_ratio, context_dim=context_dim, cond_dim=1)
    with torch.no_grad():
        blk.ada.bias.view(6, dim)[[2, 5]] = 1.0  # (shift1, scale1, gate1, shift2, scale2, gate2)
    return blk


def motion_kl(posterior: Latent, free_bits: float = 0.0) -> Tensor:
    """KL of the motion posteriors to N(0, I), summed over their elements, batch mean. With
    ``free_bits`` > 0 each element's batch-mean KL counts as at least ``free_bits`` nats ("free bits",
    Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow", Eq. 15, per
    element): an element below it gets no gradient, so the KL cannot pull an informative posterior
    back to the prior before the decoder has learned to use it."""
    if free_bits <= 0:
        return latent_kl(posterior).mean()
    total = None
    for name, logvar in posterior.logvar.items():
        mu = posterior.parts[name]
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)  # per element, batch mean
        part = kl.clamp_min(free_bits).sum()
        total = part if total is None else total + part
    return total if total is not None else next(iter(posterior.parts.values())).new_zeros(())


def _posterior_head(dim: int, channels: int, init_logvar: float) -> nn.Linear:
    """``Linear(dim, 2 * channels)`` to (mean, logvar) with the logvar bias set to ``init_logvar``."""
    head = nn.Linear(dim, 2 * channels)
    with torch.no_grad():
        head.bias[channels:] = init_logvar
    return head


def random_keep(batch: int, positions: int, ratio: tuple[float, float], generator: torch.Generator | None,
                device: torch.device) -> Tensor:
    """Indices of the spatial positions KEPT by the random mask M of Eq. 4: one masking ratio
    ``r ~ U(ratio)`` per batch (so every sample keeps the same count), ``round(S (1 - r))`` positions
    per sample chosen uniformly, at least one. Returns ``(B, S_keep)`` sorted long."""
    u = torch.rand(1, generator=generator, device=device)
    r = ratio[0] + (ratio[1] - ratio[0]) * float(u)
    keep = max(1, round(positions * (1 - r)))
    order = torch.rand(batch, positions, generator=generator, device=device).argsort(1)
    return order[:, :keep].sort(1).values


# ------------------------------------------------------------------------------------------
# Motion encoders
# ------------------------------------------------------------------------------------------
class GlobalMotionEncoder(nn.Module):
    """Global Motion Extraction Module (Sec. 3.1.1, Eq. 4-5).

    ``z_low: (B, c, T, h, w)`` -> per-frame patchify (``global_patch``) into ``S`` spatial positions
    with fixed (t, i, j) sinusoidal embeddings -> keep a subset of positions (training) -> fold the
    positions into the batch, ``z_g: (B*S, T, D)`` -> queries ``q_g`` (``n_g`` learnable tokens,
    repeated over the ``f_g`` time slots with a sinusoidal slot embedding, as the authors' code
    builds its per-frame tokens) run ``global_depth`` shared blocks: self-attention among the
    queries (the public code has none; ours is the shared block), cross-attention to ``z_g`` (Eq. 5),
    MLP -> mean over the positions -> LN -> Linear to the Gaussian over ``u_g: (B, f_g, n_g, c_g)``.
    The average over positions is our choice: the paper folds positions into the batch and leaves the
    reduction to one ``f_g x n_g x c_g`` latent unstated; a mean is invariant to how many are masked.
    """

    def __init__(self, latent_channels: int, cfg: HiVAEConfig):
        super().__init__()
        D = cfg.global_width
        self.cfg = cfg
        self.stem = nn.Conv2d(latent_channels, D, cfg.global_patch, stride=cfg.global_patch)
        self.queries = nn.Parameter(torch.randn(cfg.global_tokens, D) * 0.02)
        self.context_norm = nn.LayerNorm(D)
        self.blocks = nn.ModuleList([_encoder_block(D, cfg.global_heads, cfg.mlp_ratio, context_dim=D)
                                     for _ in range(cfg.global_depth)])
        self.norm_out = nn.LayerNorm(D)
        self.out = _posterior_head(D, cfg.global_channels, cfg.posterior_init_logvar)

    def forward(self, z_low: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``keep: (B, S_keep)`` indices of the positions to use (None = all). Returns (mean, logvar)."""
        cfg = self.cfg
        B, _, T = z_low.shape[:3]
        x = self.stem(rearrange(z_low, "b c t h w -> (b t) c h w"))  # (B*T, D, h', w')
        hp, wp = x.shape[-2:]
        x = rearrange(x, "(b t) d i j -> b (i j) t d", b=B)  # (B, S, T, D)
        pos = _grid(hp * wp, T, device=x.device)  # (S*T, 2): position index, frame
        ij = torch.stack([pos[:, 0] // wp, pos[:, 0] % wp], -1)
        emb = sincos(torch.cat([pos[:, 1:], ij], -1), x.shape[-1]).view(hp * wp, T, -1)  # (S, T, D)
        x = x + emb.to(x.dtype)
        if keep is not None:
            x = x.gather(1, keep[:, :, None, None].expand(-1, -1, T, x.shape[-1]))  # (B, S_keep, T, D)
        S = x.shape[1]
        context = self.context_norm(rearrange(x, "b s t d -> (b s) t d"))  # (B*S, T, D): Eq. 4
        f_g = math.ceil(T / cfg.global_time_stride)
        slots = torch.arange(f_g, device=x.device) * cfg.global_time_stride  # slot f starts at frame stride*f
        slot_pos = torch.stack([slots, torch.zeros_like(slots), torch.zeros_like(slots)], -1)  # the keys' t axis
        q = self.queries[None] + sincos(slot_pos, x.shape[-1])[:, None].to(x.dtype)  # (f_g, n_g, D)
        q = rearrange(q, "f n d -> (f n) d")[None].expand(B * S, -1, -1)  # (B*S, f_g*n_g, D)
        qpos = _grid(f_g, cfg.global_tokens, 1, device=x.device)
        layout = TokenLayout(qpos)
        ones = q.new_ones(B * S, 1)
        for blk in self.blocks:
            q = blk(q, ones, layout, context)  # Eq. 5
        q = rearrange(q, "(b s) n d -> b s n d", b=B).mean(1)  # (B, f_g*n_g, D)
        mean, logvar = _gaussian(self.out(self.norm_out(q)), cfg.logvar_clamp)  # (B, f_g*n_g, c_g) each
        split = lambda v: rearrange(v, "b (f n) c -> b f n c", f=f_g)  # noqa: E731
        return split(mean), split(logvar)


class DetailedMotionEncoder(nn.Module):
    """Detailed Motion Extraction Module (Sec. 3.1.2, Eq. 7-8).

    Per frame: patchify ``z_high`` (``detailed_patch``) with a fixed 2D sinusoidal embedding,
    prepend ``n_d`` learnable tokens ``q_d`` (shared tokens plus the frame's sinusoidal time
    embedding: per-frame tokens as in the authors' code, any clip length), run ``detailed_depth``
    self-attention blocks over the frame's sequence, keep the learnable tokens -> LN -> Linear to
    the Gaussian over ``u_d: (B, T, n_d, c_d)``. Frames do not see each other here."""

    def __init__(self, latent_channels: int, cfg: HiVAEConfig):
        super().__init__()
        D = cfg.detailed_width
        self.cfg = cfg
        self.stem = nn.Conv2d(latent_channels, D, cfg.detailed_patch, stride=cfg.detailed_patch)
        self.queries = nn.Parameter(torch.randn(cfg.detailed_tokens, D) * 0.02)
        self.blocks = nn.ModuleList([_encoder_block(D, cfg.detailed_heads, cfg.mlp_ratio)
                                     for _ in range(cfg.detailed_depth)])
        self.norm_out = nn.LayerNorm(D)
        self.out = _posterior_head(D, cfg.detailed_channels, cfg.posterior_init_logvar)

    def forward(self, z_high: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        B, _, T = z_high.shape[:3]
        x = self.stem(rearrange(z_high, "b c t h w -> (b t) c h w"))  # (B*T, D, h', w')
        hp, wp = x.shape[-2:]
        D = x.shape[1]
        x = rearrange(x, "n d i j -> n (i j) d") + sincos(_grid(hp, wp, device=x.device), D).to(x.dtype)
        frame_emb = sincos(torch.arange(T, device=x.device)[:, None], D).to(x.dtype)  # (T, D)
        q = self.queries[None] + frame_emb[:, None]  # (T, n_d, D)
        q = q[None].expand(B, -1, -1, -1).reshape(B * T, cfg.detailed_tokens, D)  # (B*T, n_d, D)
        h = torch.cat([q, x], 1)  # (B*T, n_d + h'w', D): Eq. 7
        layout = TokenLayout(torch.zeros(h.shape[1], 3, dtype=torch.long, device=h.device))
        ones = h.new_ones(B * T, 1)
        for blk in self.blocks:
            h = blk(h, ones, layout)  # Eq. 8
        mean, logvar = _gaussian(self.out(self.norm_out(h[:, :cfg.detailed_tokens])), cfg.logvar_clamp)
        split = lambda v: rearrange(v, "(b t) n c -> b t n c", b=B)  # noqa: E731
        return split(mean), split(logvar)


# ------------------------------------------------------------------------------------------
# The conditional diffusion decoder
# ------------------------------------------------------------------------------------------
class MotionDecoderDiT(nn.Module):
    """Conditional Diffusion Decoder (Sec. 3.2): velocity ``v = Dec(z_t, u_g, u_d, t)`` (Eq. 10).

    Tokens: the noisy latent concatenated with the repeated content latent (Eq. 9), patchified
    ``(1, p, p)``, plus each frame's ``n_d`` projected detailed-motion tokens; integer positions
    ``(t, i, j)`` for the frame tokens and ``(t, -1 - k, -1)`` for detailed token k (3D RoPE), and
    absolute sinusoidal embeddings (frame tokens: (t, i, j); detailed tokens: t, plus a learned
    embedding per token index) so cross-attention and the pairing of pixels with detailed tokens
    need no relative-position reasoning.
    ``decoder_depth`` pairs of shared adaLN-Zero blocks (timestep conditioning): a spatial block
    (self-attention within a frame: frame + detailed tokens; cross-attention to the projected
    global-motion tokens, which carry a slot-time and a token embedding) and a Temporal Align
    Block (self-attention across frames at each spatial site / detailed token index).

    The condition is a mapping ``content (B, c, 1, h, w)``, ``global (B, f_g, n_g, c_g)``,
    ``detailed (B, T, n_d, c_d)``, ``use_global`` / ``use_detailed`` ``(B,)`` bool: a motion that is
    not used is replaced by a learned null token (condition dropout, CFG, single-motion decoding).
    """

    def __init__(self, latent_channels: int, cfg: HiVAEConfig):
        super().__init__()
        D, p, c = cfg.decoder_width, cfg.decoder_patch, latent_channels
        self.cfg, self.channels = cfg, c
        self.x_embed = nn.Linear(2 * c * p * p, D)
        self.global_in = nn.Linear(cfg.global_channels, D)
        self.detailed_in = nn.Linear(cfg.detailed_channels, D)
        self.null_global = nn.Parameter(torch.randn(D) * 0.02)
        self.null_detailed = nn.Parameter(torch.randn(D) * 0.02)
        self.global_token_embed = nn.Parameter(torch.randn(cfg.global_tokens, D) * 0.02)
        self.detailed_token_embed = nn.Parameter(torch.randn(cfg.detailed_tokens, D) * 0.02)
        self.t_embed = TimestepEmbedder(D)
        self.rope = Rope3D(D // cfg.decoder_heads)
        blocks = []
        for _ in range(cfg.decoder_depth):
            blocks.append(TransformerBlock(D, cfg.decoder_heads, cfg.mlp_ratio, context_dim=D, layout="spatial"))
            blocks.append(TransformerBlock(D, cfg.decoder_heads, cfg.mlp_ratio, layout="temporal"))  # TAB
        self.blocks = nn.ModuleList(blocks)
        self.final = FinalLayer(D, c * p * p)

    def forward(self, x: dict[str, Tensor], t: Tensor, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg, p = self.cfg, self.cfg.decoder_patch
        z_t = x["z"]
        B, c, T, h, w = z_t.shape
        content = cond["content"]
        if content.shape != (B, c, 1, h, w):
            raise ValueError(f"content latent must be {(B, c, 1, h, w)}, got {tuple(content.shape)}")
        dtype = self.x_embed.weight.dtype
        inp = torch.cat([z_t, content.expand(-1, -1, T, -1, -1)], 1).to(dtype)  # (B, 2c, T, h, w): Eq. 9
        hx = self.x_embed(rearrange(inp, "b c t (i p) (j q) -> b (t i j) (p q c)", p=p, q=p))  # (B, T*N_f, D)
        D = hx.shape[-1]
        hi, wi = h // p, w // p
        hx = hx + sincos(_grid(T, hi, wi, device=hx.device), D).to(dtype)  # absolute (t, i, j)
        frame_t = sincos(torch.arange(T, device=hx.device)[:, None], D).to(dtype)  # (T, D)

        ud = cond["detailed"]
        n_d = ud.shape[2]
        hd = self.detailed_in(ud.to(dtype))  # (B, T, n_d, D)
        hd = torch.where(cond["use_detailed"].view(B, 1, 1, 1), hd, self.null_detailed)
        hd = hd + self.detailed_token_embed + frame_t[:, None]
        hd = rearrange(hd, "b t n d -> b (t n) d")  # (B, T*n_d, D)

        ug = cond["global"]
        f_g = ug.shape[1]
        hg = self.global_in(ug.to(dtype))  # (B, f_g, n_g, D)
        hg = torch.where(cond["use_global"].view(B, 1, 1, 1), hg, self.null_global)
        slots = torch.arange(f_g, device=hg.device)[:, None] * cfg.global_time_stride
        hg = hg + self.global_token_embed + sincos(slots, D).to(dtype)[:, None]
        context = rearrange(hg, "b f n d -> b (f n) d")  # (B, f_g*n_g, D)

        frame_pos = _grid(T, hi, wi, device=hx.device)  # (T*N_f, 3)
        dpos = _grid(T, n_d, device=hx.device)
        det_pos = torch.stack([dpos[:, 0], -1 - dpos[:, 1], torch.full_like(dpos[:, 0], -1)], -1)  # (T*n_d, 3)
        positions = torch.cat([frame_pos, det_pos])[None].expand(B, -1, -1)  # (B, T*(N_f + n_d), 3)
        # frame tokens and detailed tokens, T frames each: a frame's spatial group holds both
        layout = TokenLayout(positions, None, self.rope(positions[:1]), grids=(T, (hi * wi, n_d)))
        seq = torch.cat([hx, hd], 1)  # (B, T*(N_f + n_d), D)
        c_t = self.t_embed(t)  # (B, D)
        for blk in self.blocks:
            seq = blk(seq, c_t, layout, context if blk.cross is not None else None)
        out = self.final(seq[:, :T * hi * wi], c_t)  # (B, T*N_f, c*p*p)
        v = rearrange(out, "b (t i j) (p q c) -> b c t (i p) (j q)", t=T, i=hi, j=wi, p=p, q=p)  # (B, c, T, h, w)
        return {"z": v.to(z_t.dtype)}


# ------------------------------------------------------------------------------------------
# The latent spec with the paper's compression rate
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HiVAELatentSpec(LatentSpec):
    """``LatentSpec`` plus the rate of Hi-VAE App. C.1 without the content latent (the paper counts
    only the motion latents its generator models; ours also generates the content latent, so the
    plain ``compression_rate`` counts every part)."""

    content_parts: tuple[str, ...] = ("content",)

    @property
    def motion_elements(self) -> int:
        return sum(math.prod(s) for k, s in self.parts.items() if k not in self.content_parts)

    @property
    def motion_compression_rate(self) -> float:
        return self.motion_elements / self.input_elements

    @property
    def motion_compression_factor(self) -> float:
        return self.input_elements / self.motion_elements

    def to_dict(self, patch: tuple[int, int, int] = (1, 2, 2)) -> dict:
        return {**super().to_dict(patch), "motion_elements": self.motion_elements,
                "motion_compression_rate": self.motion_compression_rate,
                "motion_compression_factor": self.motion_compression_factor}


# ------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------
@register_family
class HiVAE(Autoencoder):
    """Hi-VAE behind the autoencoder contract (see the module docstring)."""

    family = "hivae"
    config_cls = HiVAEConfig
    stages = (1, 2)  # Sec. 3.3: 1 global motion module + decoder, 2 detailed motion module + decoder
    base_family = "kl2d"  # the frozen per-frame base VAE (load_base)
    content_encoding = True  # encode_content: a first frame's content latent (image-to-video)

    def __init__(self, config: HiVAEConfig):
        super().__init__(config)
        _check_config(config)
        c = config.base.latent_channels
        self.base = KL2D(config.base)
        self.global_encoder = GlobalMotionEncoder(c, config)
        self.detailed_encoder = DetailedMotionEncoder(c, config)
        self.decoder = MotionDecoderDiT(c, config)
        self._apply_stage()

    # --- stages and the frozen base ----------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        """Switch the training stage (Sec. 3.3) and which parameters train: stage 1 the global
        module and the decoder (not its detailed-motion input), stage 2 the detailed module and the
        decoder with the global module frozen. The base VAE is always frozen."""
        self.config = cfglib.replace(self.config, stage=stage)
        _check_config(self.config)
        self._apply_stage()

    def with_stage(self, stage: int) -> "HiVAE":
        self.set_stage(stage)
        return self

    def latent_caveat(self) -> str | None:
        if self.config.stage == 1:  # the detailed module trains in stage 2; the stage-1 decoder ignores its tokens
            return ("a stage-1 Hi-VAE: its detailed-motion tokens come from the detailed module, which stage 1 "
                    "leaves untrained (its decoder does not read them), so a DiT would learn noise there; train "
                    "stage 2 (ldm train-ae --init RUN/final --stage 2) and extract with its final/")
        return None

    def _apply_stage(self) -> None:
        stage = self.config.stage
        self.base.requires_grad_(False).eval()
        self.global_encoder.requires_grad_(stage == 1)
        self.detailed_encoder.requires_grad_(stage == 2)
        self.decoder.requires_grad_(True)
        self.decoder.detailed_in.requires_grad_(stage == 2)

    def train(self, mode: bool = True) -> "HiVAE":
        super().train(mode)
        self.base.eval()  # frozen: never in training mode
        return self

    def load_base(self, path: str | Path) -> None:
        """Load the frozen base VAE from a ``save_pretrained`` folder (e.g. ``ldm train-ae`` of
        ``kl2d-f8c4``: ``OUTPUT/final``); its config (with its measured latent scale/shift) becomes
        ``config.base``. The architecture must match the current base."""
        base = load_pretrained(path)
        if not isinstance(base, KL2D):
            raise ValueError(f"{path}: the Hi-VAE base must be a kl2d autoencoder, got family {base.family!r}")
        arch = lambda cfg: cfglib.replace(cfg, latent_scale=(1.0,), latent_shift=(0.0,))  # noqa: E731
        if arch(base.config) != arch(self.config.base):
            raise ValueError(f"{path}: base architecture {cfglib.to_dict(base.config)} does not match this "
                             f"Hi-VAE's {cfglib.to_dict(self.config.base)}")
        self.base.load_state_dict(base.state_dict())
        self.base.config = base.config
        self.config = cfglib.replace(self.config, base=base.config)
        self._apply_stage()

    recon_trained = False  # train_forward's recon is a detached one-step estimate: Eq. 11 is the whole loss

    def last_layer(self) -> Tensor:
        raise ValueError("hivae decodes by sampling a diffusion model: train it without --gan (its loss is "
                         "the flow-matching velocity loss, and the logged rec is a one-step estimate)")

    # --- shapes --------------------------------------------------------------------------------
    def latent_spec(self, frames: int, height: int, width: int) -> HiVAELatentSpec:
        cfg = self.config
        base = self.base.latent_spec(frames, height, width)
        c, T, h, w = base.parts["z"]
        f = self.base.spatial_factor
        for name in ("global_patch", "detailed_patch", "decoder_patch"):
            p = getattr(cfg, name)
            if h % p or w % p:
                raise ValueError(f"{self.family}: the {h}x{w} latent of a {height}x{width} clip is not divisible "
                                 f"by {name}={p}; use height and width that are multiples of {f * p}")
        parts = {"content": (c, 1, h, w),
                 "global": (math.ceil(T / cfg.global_time_stride), cfg.global_tokens, cfg.global_channels),
                 "detailed": (T, cfg.detailed_tokens, cfg.detailed_channels)}
        return HiVAELatentSpec(form="tokens", parts=parts, input_shape=(cfg.in_channels, frames, height, width))

    def _check_latent(self, latent: Latent) -> tuple[int, int, int]:
        """Validate a token-set latent; returns the clip's (frames, h, w) in latent pixels."""
        cfg = self.config
        if latent.form != "tokens" or not {"content", "global", "detailed"} <= set(latent.parts):
            raise ValueError(f"{self.family}: decode expects a tokens latent with parts content/global/detailed, "
                             f"got form {latent.form!r} with parts {sorted(latent.parts)}")
        content, ug, ud = latent["content"], latent["global"], latent["detailed"]
        c = cfg.base.latent_channels
        if content.ndim != 5 or content.shape[1:3] != (c, 1):
            raise ValueError(f"{self.family}: content must be (B, {c}, 1, h, w), got {tuple(content.shape)}")
        if ud.ndim != 4 or ud.shape[2:] != (cfg.detailed_tokens, cfg.detailed_channels):
            raise ValueError(f"{self.family}: detailed must be (B, T, {cfg.detailed_tokens}, "
                             f"{cfg.detailed_channels}), got {tuple(ud.shape)}")
        T = ud.shape[1]
        f_g = math.ceil(T / cfg.global_time_stride)
        if ug.shape[1:] != (f_g, cfg.global_tokens, cfg.global_channels):
            raise ValueError(f"{self.family}: global must be (B, {f_g}, {cfg.global_tokens}, {cfg.global_channels}) "
                             f"for {T} frames, got {tuple(ug.shape)}")
        if not content.shape[0] == ug.shape[0] == ud.shape[0]:
            raise ValueError(f"{self.family}: parts have different batch sizes")
        return T, content.shape[3], content.shape[4]

    # --- encoding --------------------------------------------------------------------------------
    def _base_posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            z = self.base.encode(video)
        return z["z"], z.logvar["z"]  # (B, c, T, h, w) each, in the base's scaled space

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        cfg = self.config
        z, z_logvar = self._base_posterior(video)
        low, high = frequency_split(z, cfg.cutoff_spatial, cfg.cutoff_temporal)
        g_mean, g_logvar = self.global_encoder(low)
        d_mean, d_logvar = self.detailed_encoder(high)
        return Latent({"content": z[:, :, :1], "global": g_mean, "detailed": d_mean}, form="tokens",
                      logvar={"content": z_logvar[:, :, :1], "global": g_logvar, "detailed": d_logvar})

    def encode_content(self, image: Tensor) -> Tensor:
        """The content latent of a first frame ``(B, C, H, W)`` or ``(B, C, 1, H, W)`` in [-1, 1], in
        the scaled space of ``encode``'s ``content`` part (image-to-video: replace the generated
        content with it before ``decode``)."""
        if image.ndim == 4:
            image = image[:, :, None]
        if image.ndim != 5 or image.shape[2] != 1:
            raise ValueError(f"encode_content expects (B, C, H, W) or (B, C, 1, H, W), got {tuple(image.shape)}")
        content, _ = self._base_posterior(image)
        return self._scale(Latent({"content": content}, form="tokens"), forward=True)["content"]

    # --- decoding --------------------------------------------------------------------------------
    def decode(self, latent: Latent, cond: Cond | None = None, *, motion: str | None = None,
               steps: int | None = None, guidance: float | None = None, seed: int = 0) -> Tensor:
        """Sample the video latent with the diffusion decoder (Euler, ``steps`` default
        ``config.sample_steps``; CFG ``guidance`` default ``config.guidance_scale``, the null condition
        drops both motions) from noise drawn with ``seed`` (the same for every clip of the batch, so a
        clip's decoding does not depend on its batch), then decode it with the base VAE.
        ``motion`` = ``"both"`` | ``"global"`` | ``"detailed"`` decodes with only that motion (the other
        becomes the null condition; paper Fig. 5). Default: both after stage 2, global after stage 1
        (whose decoder has never seen detailed motion). ``cond`` is not used (the decoder is
        conditioned on the latent alone)."""
        return self._sample(self._scale(latent, forward=False), motion, steps, guidance, seed)

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        return self._sample(latent, None, None, None, 0)

    def motion_condition(self, latent: Latent,
                         motion: str | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The decoder's condition for an (unscaled) latent and its null condition (both motions dropped)."""
        motion = motion or ("both" if self.config.stage == 2 else "global")
        if motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
        B = latent.batch_size
        device = latent["content"].device
        flag = lambda on: torch.full((B,), on, dtype=torch.bool, device=device)  # noqa: E731
        cond = {"content": latent["content"], "global": latent["global"], "detailed": latent["detailed"],
                "use_global": flag(motion in ("both", "global")), "use_detailed": flag(motion in ("both", "detailed"))}
        return cond, {**cond, "use_global": flag(False), "use_detailed": flag(False)}

    def _sample(self, latent: Latent, motion: str | None, steps: int | None, guidance: float | None,
                seed: int) -> Tensor:
        cfg = self.config
        T, h, w = self._check_latent(latent)
        steps = cfg.sample_steps if steps is None else steps
        guidance = cfg.guidance_scale if guidance is None else guidance
        cond, null = self.motion_condition(latent, motion)
        content = latent["content"]
        # every clip from the same noise: a clip decodes alike whatever batch it is in (ldm sample's seeds)
        noise = samplers.noise_per_seed({"z": (cfg.base.latent_channels, T, h, w)}, [seed] * latent.batch_size,
                                        device=content.device, dtype=content.dtype)
        z = samplers.euler(self.decoder, noise, cond, steps=steps, shift=cfg.timestep_shift, guidance_scale=guidance,
                           null_cond=null if guidance != 1.0 else None)["z"]
        return self.base.decode(Latent({"z": z}, form="grid"))

    # --- training (Eq. 11-12) ------------------------------------------------------------------
    def train_forward(self, video: Tensor, cond: Cond | None = None,
                      generator: torch.Generator | None = None) -> AEOutput:
        """One flow-matching step of the current stage. Losses (already weighted): ``flow`` (the
        velocity MSE, Eq. 11/12) and ``kl_motion`` (``kl_weight`` x KL of the motion posteriors,
        summed over their elements, batch mean). ``recon`` is the base decoding of the one-step
        estimate ``z_t - t v`` (detached: a cheap progress measure, not a training signal).
        ``posterior`` holds the motion posteriors and the content latent."""
        cfg = self.config
        self.check_input(*video.shape[2:])
        if cfg.stage == 1 and cfg.stage1_blur > 0:
            video = gaussian_blur(video, cfg.stage1_blur)
        z, _ = self._base_posterior(video)
        B, device = z.shape[0], z.device
        low, high = frequency_split(z, cfg.cutoff_spatial, cfg.cutoff_temporal)
        S = (z.shape[3] // cfg.global_patch) * (z.shape[4] // cfg.global_patch)
        keep = random_keep(B, S, cfg.mask_ratio, generator, device)
        g_mean, g_logvar = self.global_encoder(low, keep)
        posterior = Latent({"content": z[:, :, :1], "global": g_mean}, form="tokens", logvar={"global": g_logvar})
        if cfg.stage == 2:
            d_mean, d_logvar = self.detailed_encoder(high)
            posterior = posterior.replace({**posterior.parts, "detailed": d_mean},
                                          logvar={**posterior.logvar, "detailed": d_logvar})
        sample = posterior.sample(generator)
        if cfg.stage == 1:
            ud = z.new_zeros(B, z.shape[2], cfg.detailed_tokens, cfg.detailed_channels)
        else:
            ud = sample["detailed"]
        drop = torch.rand(B, generator=generator, device=device) < cfg.cond_dropout
        drop_g = torch.rand(B, generator=generator, device=device) < cfg.part_dropout
        drop_d = torch.rand(B, generator=generator, device=device) < cfg.part_dropout
        motion = {"content": z[:, :, :1], "global": sample["global"], "detailed": ud,
                  "use_global": ~(drop | drop_g), "use_detailed": ~(drop | drop_d) & (cfg.stage == 2)}
        t = flow.sample_timesteps(B, distribution=cfg.timesteps, shift=cfg.timestep_shift, generator=generator,
                                  device=device)
        noise = flow.sample_noise({"z": z}, generator)
        x_t = flow.interpolate({"z": z}, noise, t)
        v = self.decoder(x_t, t, motion)
        loss = flow.flow_loss(v, flow.velocity_target({"z": z}, noise)).mean()
        with torch.no_grad():
            z0 = flow.predict_x0(x_t, {"z": v["z"].detach()}, t)["z"]
            recon = self.base.decode(Latent({"z": z0}, form="grid"))
        kl = motion_kl(posterior, cfg.kl_free_bits)
        return AEOutput(recon=recon, posterior=posterior, losses={"flow": loss, "kl_motion": cfg.kl_weight * kl})

    # --- cost ----------------------------------------------------------------------------------
    def cost(self, frames: int, height: int, width: int, steps: int | None = None,
             guidance: float | None = None) -> dict[str, Any]:
        """Tokens and FLOPs (2 x multiply-adds) of one clip, from shapes alone: the base encoder and
        decoder (counted by torch's FlopCounterMode on the meta device, per frame), the motion
        modules, and decoding = ``steps`` decoder forwards (two with guidance != 1) + the base
        decoder. Transformer FLOPs are split into ``linear`` (every matrix multiply of weights) and
        ``attention`` (scores and weighted sums)."""
        cfg = self.config
        steps = cfg.sample_steps if steps is None else steps
        guidance = cfg.guidance_scale if guidance is None else guidance
        spec = self.latent_spec(frames, height, width)
        c, T, h, w = self.base.latent_spec(frames, height, width).parts["z"]
        base_enc, base_dec = _base_flops(cfg.base, height, width)
        g, d, dec = _motion_flops(cfg, c, T, h, w)
        passes = steps * (1 if guidance == 1.0 else 2)
        return {
            "latent": spec.to_dict(), "tokens": {"global_queries": g["tokens"], "global_positions": g["positions"],
                                                 "detailed_per_frame": d["tokens"], "decoder": dec["tokens"],
                                                 "decoder_context": dec["context"]},
            "params": {"base": sum(p.numel() for p in self.base.parameters()),
                       "global": sum(p.numel() for p in self.global_encoder.parameters()),
                       "detailed": sum(p.numel() for p in self.detailed_encoder.parameters()),
                       "decoder": sum(p.numel() for p in self.decoder.parameters())},
            "flops": {"base_encode": base_enc * T, "global": g["linear"] + g["attention"],
                      "detailed": d["linear"] + d["attention"], "decoder_forward": dec["linear"] + dec["attention"],
                      "decoder_passes": passes, "base_decode": base_dec * T,
                      "encode": base_enc * T + g["linear"] + g["attention"] + d["linear"] + d["attention"],
                      "decode": passes * (dec["linear"] + dec["attention"]) + base_dec * T},
            "detail": {"global": g, "detailed": d, "decoder": dec},
        }


def _base_flops(base: KL2DConfig, height: int, width: int) -> tuple[int, int]:
    """FLOPs of the base encoder and decoder on ONE frame, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = KL2D(base)
        frame = torch.empty(1, base.in_channels, 1, height, width)
        with FlopCounterMode(display=False) as enc:
            z = model.encode(frame)
        with FlopCounterMode(display=False) as dec:
            model.decode(z)
    return enc.get_total_flops(), dec.get_total_flops()


def _block_flops(rows: int, n: int, dim: int, mlp_ratio: float, group: int, cond_dim: int,
                 context: int = 0, self_attn: bool = True) -> tuple[int, int]:
    """(linear, attention) FLOPs of one shared TransformerBlock over ``rows`` sequences of ``n``
    tokens (``ldm.cost.transformer_block_flops``)."""
    linear, attention = transformer_block_flops(n, dim, mlp_ratio, context=context, attn_group=group,
                                                cond_dim=cond_dim, self_attn=self_attn)
    return rows * linear, rows * attention


def _motion_flops(cfg: HiVAEConfig, c: int, T: int, h: int, w: int) -> tuple[dict, dict, dict]:
    """Analytic FLOPs of the global module, the detailed module and one decoder forward (batch 1)."""
    # global: S positions x T frames as context, f_g * n_g queries per position
    D, pg = cfg.global_width, cfg.global_patch
    S = (h // pg) * (w // pg)
    Q = math.ceil(T / cfg.global_time_stride) * cfg.global_tokens
    lin, att = 2 * c * pg * pg * D * T * S, 0
    for _ in range(cfg.global_depth):
        a, b = _block_flops(S, Q, D, cfg.mlp_ratio, Q, 1, context=T)
        lin, att = lin + a, att + b
    lin += 2 * D * 2 * cfg.global_channels * Q
    glob = {"tokens": Q, "positions": S, "linear": lin, "attention": att}
    # detailed: T frames, n_d + patches tokens each
    D, pd = cfg.detailed_width, cfg.detailed_patch
    n = cfg.detailed_tokens + (h // pd) * (w // pd)
    lin, att = 2 * c * pd * pd * D * T * (n - cfg.detailed_tokens), 0
    for _ in range(cfg.detailed_depth):
        a, b = _block_flops(T, n, D, cfg.mlp_ratio, n, 1)
        lin, att = lin + a, att + b
    lin += 2 * D * 2 * cfg.detailed_channels * T * cfg.detailed_tokens
    det = {"tokens": n, "linear": lin, "attention": att}
    # decoder: frame + detailed tokens, global context
    D, p = cfg.decoder_width, cfg.decoder_patch
    nf = (h // p) * (w // p)
    N = T * (nf + cfg.detailed_tokens)
    L = math.ceil(T / cfg.global_time_stride) * cfg.global_tokens
    lin = 2 * (2 * c * p * p) * D * T * nf  # input patches
    lin += 2 * cfg.detailed_channels * D * T * cfg.detailed_tokens + 2 * cfg.global_channels * D * L
    lin += 2 * (256 * D + D * D)  # timestep MLP (freq_dim 256)
    att = 0
    for _ in range(cfg.decoder_depth):
        a, b = _block_flops(1, N, D, cfg.mlp_ratio, nf + cfg.detailed_tokens, D, context=L)
        a2, b2 = _block_flops(1, N, D, cfg.mlp_ratio, T, D)
        lin, att = lin + a + a2, att + b + b2
    lin += 2 * D * 2 * D + 2 * T * nf * D * c * p * p  # final adaLN + head
    dec = {"tokens": N, "context": L, "linear": lin, "attention": att}
    return glob, det, dec


# ------------------------------------------------------------------------------------------
# Builders: a Hi-VAE with trained base weights, and --init folders for the two stages
# ------------------------------------------------------------------------------------------
def build_hivae(name: str, base_checkpoint: str | Path | None = None, **overrides: Any) -> HiVAE:
    """Build registered Hi-VAE ``name`` (strict ``overrides``), with the frozen base VAE loaded from
    ``base_checkpoint`` (a ``save_pretrained`` folder of a matching ``kl2d``) when given. The path
    is a build-time argument, never part of the architecture config."""
    if name not in REGISTRY or REGISTRY[name][0] is not HiVAE:
        known = sorted(n for n, (cls, _) in REGISTRY.items() if cls is HiVAE)
        raise KeyError(f"{name!r} is not a registered Hi-VAE; known: {known}")
    model = HiVAE(cfglib.replace(REGISTRY[name][1], **overrides))
    if base_checkpoint is not None:
        model.load_base(base_checkpoint)
    return model


# ------------------------------------------------------------------------------------------
# Registry: the paper's S / N / L motion shapes (Sec. 4.3), paper-size modules (App. A.1: 8-layer
# 8-head motion modules, 16-layer decoder of ~640 M parameters), tiny -debug twins with the same
# motion shapes and compression.
# ------------------------------------------------------------------------------------------
_MOTION = {"hivae-s": dict(global_channels=4, detailed_channels=8),
           "hivae": dict(global_channels=8, detailed_channels=16),
           "hivae-l": dict(global_channels=8, detailed_channels=32)}
# The debug twins also train with a 10x smaller KL weight and a timestep shift of 3 (CPU-scale runs with the
# paper's 1e-3 collapsed the motion posteriors). benchmarks/hivae_motion.py measures whether the decoder reads
# the motion; kl_free_bits / posterior_init_logvar are the options against the collapse mechanism it found
# (under Adam any KL weight pulls a posterior the decoder ignores back to the prior).
_DEBUG = dict(global_width=32, global_depth=1, global_heads=2, global_patch=2, detailed_width=32,
              detailed_depth=1, detailed_heads=2, detailed_patch=2, decoder_width=64, decoder_depth=1,
              decoder_heads=4, decoder_patch=1, mlp_ratio=2.0, kl_weight=1e-4, timestep_shift=3.0)

for _name, _shape in _MOTION.items():
    register(_name, HiVAE, HiVAEConfig(base=REGISTRY["kl2d-f8c4"][1], global_tokens=8, detailed_tokens=16, **_shape))
    register(f"{_name}-debug", HiVAE, HiVAEConfig(base=REGISTRY["kl2d-f8c4-debug"][1], global_tokens=8,
                                                  detailed_tokens=16, **_shape, **_DEBUG))
