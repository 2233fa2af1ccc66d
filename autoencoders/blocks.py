"""Convolutional building blocks shared by the VAE families.

Two kinds of feature maps flow through these blocks:

- frame maps ``B C H W`` (the frame-wise KL-2D VAE folds time into the batch), and
- clip maps ``B C T H W`` (causal 3D VAEs: CogVideoX / OD-VAE style).

Every block that sees a clip map is *causal in time*: output frame ``t`` depends on input frames
``<= t`` only. Normalisation and attention are therefore applied per frame (time folded into the
batch), convolutions pad the past by replicating the first frame (`CausalConv3d`), and the temporal
resamplers keep the first frame alone (``1 + r*k`` frames <-> ``1 + k``), as in CogVideoX
(arXiv:2408.06072, Sec. 2.1) and OD-VAE (arXiv:2409.01199, Sec. 3.1).

`ConvEncoder` / `ConvDecoder` assemble these blocks into the SD-style encoder/decoder pyramid
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", App. G) for
either kind of map. Their temporal resamplers are kept in their own lists (``temporal_down`` /
``temporal_up``, one slot per resolution boundary, `nn.Identity` where a boundary does not resample
time) so a family can add resamplers at further boundaries (MTC-VAE's 8x/16x variants) by copying
an existing one into an empty slot.

Released video VAEs differ from this causal default in two places, both available as options so
their weights can be held exactly: ``norm="clip"`` (GroupNorm statistics over every frame of the map,
as CogVideoX and VideoVAE+) and a decoder whose norms are modulated by the latent (`SpatialNorm`,
CogVideoX). With ``norm="clip"`` a model is causal only chunk by chunk: the `StreamCache` below lets
a family run its encoder/decoder over chunks of frames with the temporal state of every causal layer
carried across, which is what defines CogVideoX's statistics (and, with per-frame norms, gives the
one-shot result exactly with bounded memory).

IV-VAE's group causal convolution (`GroupCausalConv3d`: bidirectional inside a frame group, causal
between groups) replaces `CausalConv3d` in the pyramids with ``temporal_padding="group"``; the
``ivvae`` family builds its two-branch units from it too.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.latent import Latent

LOGVAR_CLAMP = (-30.0, 20.0)  # the usual clamp of a diagonal Gaussian posterior's log-variance


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


def _fold_frames(x: Tensor) -> tuple[Tensor, int | None]:
    """``B C T H W -> (B T) C H W`` (returns the frame count to unfold); 4-D maps pass through."""
    if x.ndim == 5:
        return rearrange(x, "b c t h w -> (b t) c h w"), x.shape[2]  # (B*T, C, H, W)
    if x.ndim == 4:
        return x, None
    raise ValueError(f"expected a B C H W or B C T H W map, got shape {tuple(x.shape)}")


def _unfold_frames(x: Tensor, frames: int | None) -> Tensor:
    if frames is None:
        return x
    return rearrange(x, "(b t) c h w -> b c t h w", t=frames)  # (B, C, T, H, W)


# ------------------------------------------------------------------------------------------
# Streaming state (chunk-by-chunk processing of a clip)
# ------------------------------------------------------------------------------------------
class StreamCache:
    """Per-layer state carried from one chunk of a video to the next (IV-VAE Sec. 4.5.2's cache
    mechanism; CogVideoX's ``conv_cache``).

    A causal convolution keeps the input frames its next window still needs; temporal resamplers and
    output selectors keep only the fact that the video has started (frame 0 is special). Keys are the
    layers themselves, so one cache serves one pass of one model over one video.
    """

    def __init__(self) -> None:
        self._state: dict[nn.Module, Tensor | None] = {}

    def started(self, layer: nn.Module) -> bool:
        """True when ``layer`` has already processed the start of the video."""
        return layer in self._state

    def get(self, layer: nn.Module) -> Tensor | None:
        return self._state.get(layer)

    def put(self, layer: nn.Module, value: Tensor | None) -> None:
        self._state[layer] = value

    def cached_bytes(self) -> int:
        """Bytes of the storages the cache keeps alive between chunks."""
        return sum(v.untyped_storage().nbytes() for v in self._state.values() if v is not None)


def in_frame_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None) -> Tensor:
    """``fn`` over ``x: B C T ...`` ``chunk`` frames at a time, the outputs joined along time (one call
    when ``chunk`` is None or covers the clip): ``fn(x)`` exactly where ``fn`` treats frames (or the
    chunks' frame groups) apart, in memory bounded by the chunk."""
    if not chunk or x.shape[2] <= chunk:
        return fn(x)
    return torch.cat([fn(x[:, :, s:s + chunk]) for s in range(0, x.shape[2], chunk)], dim=2)


def starts_video(layer: nn.Module, cache: StreamCache | None) -> bool:
    """Whether this call of ``layer`` begins the video (one-shot calls always do); marks it."""
    if cache is None:
        return True
    start = not cache.started(layer)
    if start:
        cache.put(layer, None)
    return start


def chunk_spans(frames: int, chunk: int) -> list[tuple[int, int]]:
    """CogVideoX's chunk schedule (diffusers ``AutoencoderKLCogVideoX._encode`` / ``_decode``): chunks
    of ``chunk`` frames, the remainder ``frames % chunk`` added to the FIRST chunk (which therefore
    starts the video with frame 0 plus whole groups); one chunk when ``frames < chunk``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n, rest = max(frames // chunk, 1), frames % chunk
    return [(0 if i == 0 else chunk * i + rest, min(chunk * (i + 1) + rest, frames)) for i in range(n)]


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------
NORMS = ("group", "clip", "rms")  # per-frame GroupNorm | GroupNorm over the clip | channel RMSNorm


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics never mix frames: a ``B C T H W`` map is normalised per frame
    (time folded into the batch), which keeps 3D encoders causal; ``B C H W`` maps as usual."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5:
            return super().forward(x)
        b = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, C, H, W)
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> FrameGroupNorm:
    """GroupNorm with ``gcd(channels, groups)`` groups, so tiny debug widths always divide."""
    return FrameGroupNorm(math.gcd(channels, groups), channels, eps=eps, affine=True)


def clip_group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm over a whole ``B C T H W`` clip (statistics across time too), as ``nn.GroupNorm``
    on a 5-D map: CogVideoX's and VideoVAE+'s norm; ``gcd(channels, groups)`` groups."""
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=eps, affine=True)


class ChannelRMSNorm(nn.Module):
    """``x / ||x||_2 * sqrt(C) * gamma`` over the channel axis of ``B C ...`` maps (= ``x / rms(x) *
    gamma``), at every pixel of every frame, so it never mixes frames (IV-VAE Sec. 3.5's reason to
    drop GroupNorm). The norm is `F.normalize`'s (eps 1e-12 on the L2 norm), as IV-VAE's public code,
    so released weights see the same values. ``halves=2`` normalises the two halves of the channels
    separately (IV-VAE's per-branch norm)."""

    def __init__(self, channels: int, halves: int = 1):
        super().__init__()
        if channels % halves:
            raise ValueError(f"{channels} channels cannot be cut into {halves} equal parts")
        self.halves = halves
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape, part = x.shape, x.shape[1] // self.halves
        h = x.reshape(shape[0], self.halves, part, *shape[2:])  # (B, r, C/r, ...)
        # F.normalize's rule through a norm reduction: no map of squares is materialised
        scale = math.sqrt(part) / torch.linalg.vector_norm(h, dim=2, keepdim=True).clamp_min(1e-12)  # (B, r, 1, ...)
        h = (h * scale).reshape(shape)
        weight = self.weight.view(1, -1, *([1] * (x.ndim - 2)))
        return h.mul_(weight) if not torch.is_grad_enabled() else h * weight  # in place without autograd


def norm_layer(kind: str, channels: int, groups: int = 32) -> nn.Module:
    """One normaliser of ``channels`` (see `NORMS`): per-frame GroupNorm, GroupNorm over the clip,
    or channel RMSNorm."""
    if kind == "group":
        return group_norm(channels, groups)
    if kind == "clip":
        return clip_group_norm(channels, groups)
    if kind == "rms":
        return ChannelRMSNorm(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def expand_latent(z: Tensor, size: Sequence[int], start: bool) -> Tensor:
    """Nearest-neighbour resize of a latent ``B c t h w`` to a feature map's ``(T, H, W)`` with the
    causal frame rule: when ``start`` (the chunk begins the video) latent frame 0 covers frame 0
    alone and every later latent frame ``(T - 1) / (t - 1)`` frames; otherwise each covers ``T / t``.
    For the power-of-two ratios of a VAE this equals CogVideoX's ``F.interpolate`` (first frame apart
    for odd ``T > 1``)."""
    t, (T, H, W) = z.shape[2], size
    if H % z.shape[3] or W % z.shape[4]:
        raise ValueError(f"cannot expand a {tuple(z.shape[3:])} latent to {H}x{W}")
    if start and t > 1:
        if (T - 1) % (t - 1):
            raise ValueError(f"cannot expand {t} latent frames (frame 0 alone) to {T} frames")
        z = torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave((T - 1) // (t - 1), dim=2)], dim=2)
    else:
        if T % t:
            raise ValueError(f"cannot expand {t} latent frames to {T} frames")
        z = z.repeat_interleave(T // t, dim=2)
    return z.repeat_interleave(H // z.shape[3], dim=3).repeat_interleave(W // z.shape[4], dim=4)


class SpatialNorm(nn.Module):
    """A norm modulated by the latent (Zheng et al. 2022, MoVQ, arXiv:2209.09002; CogVideoX's decoder):
    ``norm(x) * scale(z) + shift(z)`` with ``z`` resized to ``x`` by `expand_latent` and ``scale`` /
    ``shift`` pointwise convolutions of the latent."""

    def __init__(self, channels: int, latent_channels: int, kind: str = "clip", groups: int = 32):
        super().__init__()
        self.norm = norm_layer(kind, channels, groups)
        self.scale = nn.Conv3d(latent_channels, channels, 1)
        self.shift = nn.Conv3d(latent_channels, channels, 1)

    def forward(self, x: Tensor, z: Tensor, cache: StreamCache | None = None) -> Tensor:
        zq = expand_latent(z, x.shape[2:], starts_video(self, cache))  # (B, c, T, H, W)
        return self.norm(x) * self.scale(zq) + self.shift(zq)


def _norm(norm: nn.Module, x: Tensor, z: Tensor | None, cache: StreamCache | None) -> Tensor:
    if isinstance(norm, SpatialNorm):
        if z is None:
            raise ValueError("a latent-modulated norm (SpatialNorm) needs the latent z")
        return norm(x, z, cache)
    return norm(x)


# ------------------------------------------------------------------------------------------
# Convolutions
# ------------------------------------------------------------------------------------------
class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time.

    The past side is padded with ``k_t - 1`` copies of the first frame and the future side not at
    all, so output frame ``t`` sees input frames ``<= t`` only; space is zero-padded by ``k // 2``
    ("same"). With temporal stride ``s`` a clip of ``1 + s*k`` frames gives ``1 + k`` frames, the first
    of which depends on input frame 0 alone. Weights are those of a plain `nn.Conv3d`, so layers can
    be inflated from / copied into it directly.

    With a `StreamCache`, a later chunk is padded with the frames the previous chunk left for the
    next window (``k_t - s`` of them), so chunk by chunk equals one shot.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1, bias: bool = True):
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CausalConv3d needs odd spatial kernel sizes, got {(kt, kh, kw)}")
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=_triple(stride),
                         padding=(0, kh // 2, kw // 2), bias=bias)
        self.time_pad = kt - 1

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"CausalConv3d expects B C T H W, got shape {tuple(x.shape)}")
        if self.time_pad:
            past = cache.get(self) if cache is not None else None
            if past is None:  # the video starts here: pad with the first frame
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)  # (B, C, k_t - 1, H, W)
            x = torch.cat([past, x], dim=2)  # (B, C, P + T, H, W)
            if cache is not None:  # what the next window needs (a copy: a view would pin this chunk)
                s = self.stride[0]
                used = ((x.shape[2] - self.kernel_size[0]) // s + 1) * s
                cache.put(self, x[:, :, used:].clone())
        return super().forward(x)


def conv3x3(in_channels: int, out_channels: int, dims: int, temporal_padding: str = "causal",
            group: int = 1) -> nn.Module:
    """The 3x3 (2D) or 3x3x3 (3D) convolution of a block; in 3D causal (`CausalConv3d`) or, with
    ``temporal_padding="group"``, group causal at frame-group size ``group`` (`GroupCausalConv3d`)."""
    if temporal_padding not in TEMPORAL_PADDINGS:
        raise ValueError(f"temporal_padding must be one of {TEMPORAL_PADDINGS}, got {temporal_padding!r}")
    if dims == 2:
        return nn.Conv2d(in_channels, out_channels, 3, padding=1)
    if dims == 3:
        if temporal_padding == "group":
            return GroupCausalConv3d(in_channels, out_channels, 3, group)
        return CausalConv3d(in_channels, out_channels, 3)
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def conv1x1(in_channels: int, out_channels: int, dims: int) -> nn.Module:
    if dims == 2:
        return nn.Conv2d(in_channels, out_channels, 1)
    if dims == 3:
        return nn.Conv3d(in_channels, out_channels, 1)
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def _conv(conv: nn.Module, x: Tensor, cache: StreamCache | None) -> Tensor:
    return conv(x, cache) if isinstance(conv, (CausalConv3d, GroupCausalConv3d)) else conv(x)


# ------------------------------------------------------------------------------------------
# Group causal convolution (IV-VAE Sec. 3.2, Fig. 2a; shared by ivvae and causal3d)
# ------------------------------------------------------------------------------------------
# the temporal padding of a 3D convolution: "group" GCConv (IV-VAE Sec. 3.2) | "causal" `CausalConv3d`
TEMPORAL_PADDINGS = ("group", "causal")
FRAME_CHUNK_ELEMENTS = 2 ** 27  # elements of input per chunk of frames in inference (256 MiB in bf16)


def _inference() -> bool:
    """No autograd: outputs may be preallocated and filled chunk by chunk, ops may run in place."""
    return not torch.is_grad_enabled()


def _frame_step(x: Tensor, frames_axis: int = 2) -> int:
    """Frames per chunk so that one chunk of ``x`` holds about ``FRAME_CHUNK_ELEMENTS`` elements."""
    per_frame = max(1, x.numel() // max(1, x.shape[frames_axis]))
    return max(1, FRAME_CHUNK_ELEMENTS // per_frame)


def _check_groups(frames: int, group: int, start: bool, name: str) -> int:
    """Number of whole groups after the (optional) first frame; a clear error otherwise."""
    body = frames - 1 if start else frames
    if body < 0 or body % group:
        need = f"1 + {group}k" if start else f"a multiple of {group}"
        raise ValueError(f"{name}: needs {need} frames at group size {group}, got {frames}")
    return body // group


class GroupCausalConv3d(nn.Conv3d):
    """GCConv: a 3D convolution that is bidirectional inside a frame group and causal between groups.

    Time is cut into frame 0 (its own group) and groups of ``group`` frames. Each group is padded
    before with the ``P = (k_t - 1) / 2 <= group`` frames that precede it in the video (frame 0 pads
    itself, replicated when ``P > 1``) and after with ``P`` zero frames, then convolved on its own
    with the same weights (IV-VAE Sec. 3.2: "We pad the features of the previous frame before each frame
    group [...] the first image frame is padded using its own features. And we use zero padding
    after each frame group."). Space is zero-padded to "same". The temporal kernel must be odd;
    ``k_t = 1`` is a pointwise-in-time convolution with no grouping at all.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 group: int = 4, bias: bool = True):
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        if kt % 2 == 0 or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"GroupCausalConv3d needs odd kernel sizes, got {(kt, kh, kw)}")
        if group < 1 or kt // 2 > group:
            raise ValueError(f"group size must be >= 1 and >= the temporal padding {kt // 2}, got {group}")
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2), bias=bias)
        self.group = group
        self.time_pad = kt // 2

    def forward(self, x: Tensor, cache: StreamCache | None = None, out: Tensor | None = None) -> Tensor:
        """``x: (B, C, T, H, W)`` -> ``(B, C', T, H', W')``; with ``out`` (inference only) the result
        is written there."""
        if x.ndim != 5:
            raise ValueError(f"GroupCausalConv3d expects B C T H W, got shape {tuple(x.shape)}")
        if self.time_pad == 0:
            y = super().forward(x)
            return y if out is None else out.copy_(y)
        p, g = self.time_pad, self.group
        past = cache.get(self) if cache is not None else None
        start = past is None
        k = _check_groups(x.shape[2], g, start, "GroupCausalConv3d")
        first_out = None
        if start:  # frame 0 is a group of its own, padded before by itself and after by zeros
            first = x[:, :, :1]
            past = first.expand(-1, -1, p, -1, -1)  # (B, C, P, H, W)
            first_out = super().forward(torch.cat([past, first, torch.zeros_like(past)], dim=2))  # (B, C', 1, H, W)
        body = x[:, :, 1:] if start else x
        if cache is not None:  # the next chunk's past: a copy (a view would pin this chunk's input)
            cache.put(self, (body[:, :, -p:] if k else past).clone())
        if not k:
            return first_out if out is None else out.copy_(first_out)
        offset = 1 if start else 0
        groups = rearrange(body, "b c (k g) h w -> b k c g h w", g=g)
        if _inference():  # windows of a few groups at a time, written straight into the output
            if out is None:
                out = x.new_empty(x.shape[0], self.out_channels, x.shape[2], *x.shape[3:])  # stride 1, "same"
            if start:
                out[:, :, :1] = first_out
            step = max(1, _frame_step(body) // g)
            for j0 in range(0, k, step):
                j1 = min(k, j0 + step)
                before = past.unsqueeze(1) if j0 == 0 else groups[:, j0 - 1:j0, :, g - p:]
                left = torch.cat([before, groups[:, j0:j1 - 1, :, g - p:]], dim=1)  # (B, n, C, P, H, W)
                windows = torch.cat([left, groups[:, j0:j1], torch.zeros_like(left)], dim=3)  # (B, n, C, P+g+P, H, W)
                y = super().forward(rearrange(windows, "b n c t h w -> (b n) c t h w"))  # (B*n, C', g, H', W')
                rearrange(out[:, :, offset + j0 * g:offset + j1 * g], "b c (n g) h w -> b n c g h w", g=g).copy_(
                    rearrange(y, "(b n) c g h w -> b n c g h w", n=j1 - j0))
                del left, windows, y  # before the next chunk's are made
            return out
        # before group j: the last P frames of group j - 1 (P <= g), or the past for the first group
        left = torch.cat([past.unsqueeze(1), groups[:, :-1, :, g - p:]], dim=1)  # (B, k, C, P, H, W)
        zeros = body.new_zeros(body.shape[0], k, body.shape[1], p, *body.shape[3:])
        windows = torch.cat([left, groups, zeros], dim=3)  # (B, k, C, P + g + P, H, W)
        y = super().forward(rearrange(windows, "b k c t h w -> (b k) c t h w"))  # (B*k, C', g, H', W')
        out = y.new_empty(x.shape[0], y.shape[1], x.shape[2], *y.shape[3:])  # (B, C', T, H', W')
        if start:
            out[:, :, :1] = first_out
        rearrange(out[:, :, offset:], "b c (k g) h w -> b k c g h w", g=g).copy_(
            rearrange(y, "(b k) c g h w -> b k c g h w", k=k))
        return out


# ------------------------------------------------------------------------------------------
# Residual block and attention
# ------------------------------------------------------------------------------------------
NormFactory = Callable[[int], nn.Module]


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> dropout -> conv, plus a (1x1) skip.

    ``dims=2`` uses 3x3 convolutions on ``B C H W``; ``dims=3`` uses causal 3x3x3 convolutions on
    ``B C T H W`` with per-frame GroupNorm. ``norm`` (a factory ``channels -> module``) replaces the
    GroupNorm, e.g. by a parameter-free PixelNorm (H3AE), a clip GroupNorm or a `SpatialNorm` (then
    ``forward`` takes the latent ``z``). ``temporal_padding="group"`` makes the 3D convolutions group
    causal at frame-group size ``group`` (`GroupCausalConv3d`).
    """

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2, groups: int = 32,
                 dropout: float = 0.0, norm: NormFactory | None = None, temporal_padding: str = "causal",
                 group: int = 1):
        super().__init__()
        make_norm = norm if norm is not None else (lambda ch: group_norm(ch, groups))
        self.norm1 = make_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, dims, temporal_padding, group)
        self.norm2 = make_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels, dims, temporal_padding, group)
        self.skip = conv1x1(in_channels, out_channels, dims) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cache: StreamCache | None = None, z: Tensor | None = None) -> Tensor:
        h = _conv(self.conv1, F.silu(_norm(self.norm1, x, z, cache)), cache)
        h = _conv(self.conv2, self.dropout(F.silu(_norm(self.norm2, h, z, cache))), cache)
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (the SD-VAE mid-block attention),
    with `F.scaled_dot_product_attention`. A ``B C T H W`` map attends within each frame only, so it
    stays causal in time (its norm too unless ``norm`` makes it a clip GroupNorm)."""

    def __init__(self, channels: int, groups: int = 32, norm: NormFactory | None = None):
        super().__init__()
        self.norm = norm(channels) if norm is not None else group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, frames = _fold_frames(self.norm(x))
        height = h.shape[2]
        qkv = self.qkv(h)
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)  # each (N, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)
        # the 1x1 conv `proj` as the matmul it is, on the pixels as rows: as a conv of the channels-last
        # map below, its weight's gradient came with channels-last strides, which DDP copies into its
        # bucket every step with a warning (`ldm train-ae` on ranks)
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)  # (N, 1, HW, C)
        out = rearrange(out, "n 1 (h w) c -> n c h w", h=height)  # (N, C, H, W)
        return x + _unfold_frames(out, frames)


# ------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------
class SpatialDownsample(nn.Module):
    """2x spatial downsampling: one zero row/column padded at the bottom/right, then a stride-2 3x3
    convolution, per frame on clip maps (the SD-VAE's layout, kept by CogVideoX, IV-VAE and
    VideoVAE+: output pixel ``i`` sees input pixels ``2i .. 2i+2``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        h, frames = _fold_frames(x)
        if h.shape[-2] % 2 or h.shape[-1] % 2:
            raise ValueError(f"SpatialDownsample needs even height and width, got {tuple(h.shape[-2:])}")
        return _unfold_frames(self.conv(F.pad(h, (0, 1, 0, 1))), frames)


class SpatialUpsample(nn.Module):
    """2x nearest-neighbour spatial upsampling followed by a 3x3 convolution, per frame; with
    ``out_channels < channels`` the width shrinks here (IV-VAE Sec. 3.5)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h, frames = _fold_frames(x)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (N, C, 2H, 2W)
        return _unfold_frames(self.conv(h), frames)


class TemporalDownsample(nn.Module):
    """Causal ``factor``x temporal downsampling that keeps the first frame alone.

    A causal temporal convolution (kernel ``factor + 1`` over time, stride ``factor``) maps
    ``1 + factor*k`` frames to ``1 + k``: output 0 sees input frame 0 only, output ``j >= 1`` sees
    input frames ``factor*(j-1) .. factor*j``. (CogVideoX's parameter-free average of each pair is the
    factor-2 kernel ``[0, 1/2, 1/2]``: see ``causal3d.average_resamplers``.) A later chunk of a
    streamed video holds whole groups of ``factor`` frames.
    """

    def __init__(self, channels: int, factor: int = 2):
        super().__init__()
        if factor < 2:
            raise ValueError(f"temporal factor must be >= 2, got {factor}")
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, (factor + 1, 1, 1), stride=(factor, 1, 1))

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        frames, start = x.shape[2], starts_video(self, cache)
        if (frames - 1 if start else frames) % self.factor:
            need = f"1 + {self.factor}k" if start else f"a multiple of {self.factor}"
            raise ValueError(f"TemporalDownsample x{self.factor} needs {need} frames, got {frames}")
        return self.conv(x, cache)


class TemporalUpsample(nn.Module):
    """Causal ``factor``x temporal upsampling, the inverse frame rule of `TemporalDownsample`:
    ``1 + k`` frames -> ``1 + factor*k``.

    A causal temporal convolution predicts ``factor`` sub-frames per input frame (channels
    ``factor*C``), they are unfolded along time and the ``factor - 1`` sub-frames before frame 0 are
    dropped, so frame 0 is kept alone and input frame ``j >= 1`` yields output frames
    ``factor*(j-1)+1 .. factor*j`` (depending on input frames ``<= j`` only). A later chunk of a
    streamed video keeps all its sub-frames.
    """

    def __init__(self, channels: int, factor: int = 2):
        super().__init__()
        if factor < 2:
            raise ValueError(f"temporal factor must be >= 2, got {factor}")
        self.factor = factor
        self.conv = CausalConv3d(channels, channels * factor, (3, 1, 1))

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        start = starts_video(self, cache)
        h = self.conv(x, cache)  # (B, C*r, T, H, W)
        h = rearrange(h, "b (c r) t h w -> b c (t r) h w", r=self.factor)  # (B, C, T*r, H, W)
        return h[:, :, self.factor - 1:] if start else h  # (B, C, 1 + r*(T-1), H, W) at the start


def _temporal_layer(layer: nn.Module, h: Tensor, cache: StreamCache | None) -> Tensor:
    return layer(h, cache) if isinstance(layer, (TemporalDownsample, TemporalUpsample)) else layer(h)


# ------------------------------------------------------------------------------------------
# Encoder / decoder pyramids
# ------------------------------------------------------------------------------------------
class Stage(nn.Module):
    """One level of an encoder / decoder pyramid: its blocks, then the resampler to the next level
    (`nn.Identity` where there is none). ``forward`` runs both on a map that needs nothing else (the
    pyramids below pass a stream cache and a latent to their blocks themselves)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample

    def forward(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h)
        return self.resample(h)


class MidBlock(nn.Module):
    """ResBlock -> (spatial self-attention) -> ResBlock at the lowest resolution (time fully
    compressed: with ``temporal_padding="group"`` every frame is a group of its own)."""

    def __init__(self, channels: int, dims: int, groups: int, attention: bool, dropout: float = 0.0,
                 norm: NormFactory | None = None, attention_norm: NormFactory | None = None,
                 temporal_padding: str = "causal"):
        super().__init__()
        self.res1 = ResBlock(channels, channels, dims, groups, dropout, norm, temporal_padding)
        self.attn = SpatialSelfAttention(channels, groups, attention_norm) if attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, dims, groups, dropout, norm, temporal_padding)

    def forward(self, x: Tensor, cache: StreamCache | None = None, z: Tensor | None = None) -> Tensor:
        return self.res2(self.attn(self.res1(x, cache, z)), cache, z)


def _check_temporal(temporal: Sequence[bool], levels: int) -> tuple[bool, ...]:
    temporal = tuple(bool(t) for t in temporal)
    if len(temporal) != levels - 1:
        raise ValueError(f"need one temporal flag per resolution boundary ({levels - 1}), got {len(temporal)}")
    return temporal


def frame_groups(temporal: Sequence[bool]) -> list[int]:
    """Frame-group size at each level of a pyramid whose boundary ``i`` resamples time 2x where
    ``temporal[i]``: the frames one latent frame stands for at that level (IV-VAE Sec. 3.2: "for each
    temporal downsampling/upsampling [...] the frame group decreases/increases by the same factor")."""
    return [2 ** sum(temporal[i:]) for i in range(len(temporal) + 1)]


class ConvEncoder(nn.Module):
    """SD-style encoder: conv_in, one stage per channel multiplier (``num_res_blocks`` ResBlocks,
    then a 2x spatial downsample except at the last level), mid block, norm -> SiLU -> conv_out.

    ``dims=3`` builds the causal clip version; ``temporal[i]`` puts a 2x `TemporalDownsample` after
    the spatial downsample of boundary ``i`` (slot ``temporal_down[i]``, `nn.Identity` otherwise).
    ``norm`` is one of `NORMS` (default: per-frame GroupNorm). ``temporal_padding="group"`` makes every
    3x3x3 convolution group causal (`GroupCausalConv3d`) at its level's `frame_groups` size (the
    temporal resamplers stay causal, which is group causal too).
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, dims: int = 2, temporal: Sequence[bool] = (), groups: int = 32,
                 attention: bool = True, dropout: float = 0.0, norm: str = "group", temporal_padding: str = "causal"):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        temporal = _check_temporal(temporal or (False,) * (len(widths) - 1), len(widths))
        if dims == 2 and any(temporal):
            raise ValueError("a 2D encoder cannot downsample time")
        make_norm = lambda ch: norm_layer(norm, ch, groups)  # noqa: E731
        group = frame_groups(temporal)
        self.conv_in = conv3x3(in_channels, widths[0], dims, temporal_padding, group[0])
        stages, ch = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, w, dims, groups, dropout, make_norm, temporal_padding, group[i]))
                ch = w
            last = i == len(widths) - 1
            stages.append(Stage(blocks, nn.Identity() if last else SpatialDownsample(ch)))
        self.stages = nn.ModuleList(stages)
        self.temporal_down = nn.ModuleList(
            [TemporalDownsample(widths[i]) if t else nn.Identity() for i, t in enumerate(temporal)])
        self.mid = MidBlock(ch, dims, groups, attention, dropout, make_norm, make_norm, temporal_padding)
        self.norm_out = make_norm(ch)
        self.conv_out = conv3x3(ch, out_channels, dims, temporal_padding)

    def forward(self, x: Tensor, extra_temporal: Mapping[int, Sequence[nn.Module]] | None = None,
                cache: StreamCache | None = None) -> Tensor:
        """``extra_temporal[i]``: further resamplers run right after slot ``temporal_down[i]`` (in
        order), e.g. MTC-VAE's 8x/16x layers chosen per call. ``cache``: stream a chunk of a video
        (see `StreamCache`)."""
        extra = extra_temporal or {}
        h = _conv(self.conv_in, x, cache)
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                h = block(h, cache)
            h = stage.resample(h)
            if i < len(self.temporal_down):
                h = _temporal_layer(self.temporal_down[i], h, cache)
                for layer in extra.get(i, ()):
                    h = _temporal_layer(layer, h, cache)
        h = self.mid(h, cache)
        return _conv(self.conv_out, F.silu(self.norm_out(h)), cache)


class ConvDecoder(nn.Module):
    """Mirror of `ConvEncoder`: conv_in, mid block, one stage per level from the deepest
    (``num_res_blocks + 1`` ResBlocks, then the temporal and spatial 2x upsamples of the boundary
    below), norm -> SiLU -> conv_out. ``temporal[i]`` puts a 2x `TemporalUpsample` at boundary
    ``i`` (slot ``temporal_up[i]``; a mirror decoder uses the encoder's flags, CogVideoX upsamples
    time at the two DEEPEST boundaries while its encoder downsamples at the two finest).

    ``spatial_norm=True`` modulates every norm by the latent (`SpatialNorm`, CogVideoX);
    ``upsample_shrink=True`` halves the width in each spatial upsampler (IV-VAE Sec. 3.5);
    ``temporal_padding="group"``: group causal 3x3x3 convolutions, as in `ConvEncoder`.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, dims: int = 2, temporal: Sequence[bool] = (), groups: int = 32,
                 attention: bool = True, dropout: float = 0.0, norm: str = "group", spatial_norm: bool = False,
                 upsample_shrink: bool = False, temporal_padding: str = "causal"):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        temporal = _check_temporal(temporal or (False,) * (len(widths) - 1), len(widths))
        if dims == 2 and any(temporal):
            raise ValueError("a 2D decoder cannot upsample time")
        plain = lambda ch: norm_layer(norm, ch, groups)  # noqa: E731
        make_norm = (lambda ch: SpatialNorm(ch, in_channels, norm, groups)) if spatial_norm else plain
        ch, group = widths[-1], frame_groups(temporal)
        self.conv_in = conv3x3(in_channels, ch, dims, temporal_padding)
        self.mid = MidBlock(ch, dims, groups, attention, dropout, make_norm, plain, temporal_padding)
        stages, up_widths = [], {}
        for i in reversed(range(len(widths))):  # deepest level first
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[i], dims, groups, dropout, make_norm, temporal_padding, group[i]))
                ch = widths[i]
            up_widths[i - 1] = ch  # the width at boundary i - 1 (below this level)
            out = ch // 2 if upsample_shrink and i > 0 else ch
            stages.append(Stage(blocks, SpatialUpsample(ch, out) if i > 0 else nn.Identity()))
            ch = out
        self.stages = nn.ModuleList(stages)  # stages[j] works at level len(widths) - 1 - j
        self.temporal_up = nn.ModuleList(
            [TemporalUpsample(up_widths[i]) if t else nn.Identity() for i, t in enumerate(temporal)])
        self.norm_out = make_norm(ch)
        self.conv_out = conv3x3(ch, out_channels, dims, temporal_padding, group[0])

    def forward(self, z: Tensor, extra_temporal: Mapping[int, Sequence[nn.Module]] | None = None,
                cache: StreamCache | None = None) -> Tensor:
        """``extra_temporal[i]``: further resamplers run right before slot ``temporal_up[i]`` (in
        order), the mirror of the encoder's hook. ``cache``: stream a chunk of latent frames."""
        extra = extra_temporal or {}
        h = self.mid(_conv(self.conv_in, z, cache), cache, z)
        levels = len(self.stages)
        for j, stage in enumerate(self.stages):
            for block in stage.blocks:
                h = block(h, cache, z)
            boundary = levels - 2 - j  # the boundary between this level and the one above it
            if boundary >= 0:
                for layer in extra.get(boundary, ()):
                    h = _temporal_layer(layer, h, cache)
                h = _temporal_layer(self.temporal_up[boundary], h, cache)
            h = stage.resample(h)
        return _conv(self.conv_out, F.silu(_norm(self.norm_out, h, z, cache)), cache)


# ------------------------------------------------------------------------------------------
# Diagonal Gaussian posterior
# ------------------------------------------------------------------------------------------
def split_moments(moments: Tensor, clamp: tuple[float, float] = LOGVAR_CLAMP) -> tuple[Tensor, Tensor]:
    """Split the double-z head output ``B 2c ...`` into (mean, clamped logvar), each ``B c ...``."""
    if moments.shape[1] % 2:
        raise ValueError(f"moments need an even channel count (mean | logvar), got {moments.shape[1]}")
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(*clamp)


def kl_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all non-batch axes, per sample ``(B,)``:
    ``0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)`` (Kingma & Welling 2014, App. B)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def latent_kl(latent: Latent) -> Tensor:
    """Per-sample KL to N(0, I) of every part of ``latent`` that carries a posterior logvar ``(B,)``;
    zeros when no part has one (deterministic autoencoders)."""
    first = next(iter(latent.parts.values()))
    total = first.new_zeros(first.shape[0])
    for name, logvar in latent.logvar.items():
        total = total + kl_standard_normal(latent.parts[name], logvar)
    return total


def grid_z(latent: Latent, channels: int, family: str) -> Tensor:
    """The ``z: B c t h w`` part of a grid latent, with clear errors for anything else."""
    if latent.form != "grid" or "z" not in latent.parts:
        raise ValueError(f"{family}: decode expects a grid latent with part 'z', got form {latent.form!r} "
                         f"with parts {sorted(latent.parts)}")
    z = latent["z"]
    if z.ndim != 5 or z.shape[1] != channels:
        raise ValueError(f"{family}: expected z of shape B {channels} t h w, got {tuple(z.shape)}")
    return z


def check_latent_stats(config: Any, channels: int) -> None:
    """Raise ValueError unless ``config.latent_scale`` / ``latent_shift`` hold one value or one per
    latent channel, with finite non-zero scales."""
    for name in ("latent_scale", "latent_shift"):
        values = getattr(config, name)
        if len(values) not in (1, channels) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name}={values}: expected 1 or {channels} (latent channels) finite values")
    if any(v == 0 for v in config.latent_scale):
        raise ValueError(f"latent_scale must be non-zero, got {config.latent_scale}")
