"""Layers of IV-VAE (Wu et al., "Improved Video VAE for Latent Video Diffusion Model", 2024).

Every feature map of IV-VAE is ``[key half | motion half]`` along channels (Fig. 2b): the *key*
half comes from 2D convolutions (per frame, the image prior of the keyframes), the *motion* half
from 3D group causal convolutions. Each half is normalised on its own. The model is assembled in
``autoencoders/ivvae.py``; this file holds the parts:

- `StreamCache` (``blocks.py``): per-layer temporal state for chunk-by-chunk encoding/decoding (Sec. 4.5.2).
- `GroupCausalConv3d` (GCConv, Sec. 3.2; in ``blocks.py``, as ``causal3d`` uses it too): frames are
  grouped by the current temporal rate, the first frame is its own group; inside a group a plain
  (bidirectional) convolution, between groups causal padding from the previous group's last frames,
  zeros after the group.
- `KTCConv` (the KTC unit's convolution, Sec. 3.3): a 2D conv writing the key half and a GCConv
  writing the motion half, both reading every input channel; after full temporal compression the
  GCConv becomes a 2D conv (Sec. 3.3, last paragraph). The ablations' variants (Sec. 4.4) are
  switches of `temporal_conv`: plain causal 3D convs instead of GCConvs (Table 4, "w/o group causal
  conv": `blocks.CausalConv3d`), a 3D key branch like the motion one (Table 5, "3D+3D").
- `BranchNorm`: RMSNorm (Sec. 3.5) of each half separately, or the per-frame GroupNorm of the
  ``kl2d`` family (for an exact inflation of a kl2d checkpoint, see ``IVVAE.from_kl2d``).
- `KTCResBlock`, `BranchAttention`, the keyframe temporal resamplers `KeyframeDownsample` /
  `KeyframeUpsample`, the per-branch spatial resamplers, and the TMPE head `ParallelAtrousConv`
  (Sec. 3.4).

Inference memory (no autograd: ``torch.no_grad`` / ``inference_mode``): the layers write into
preallocated outputs frame-chunk by frame-chunk (``blocks.FRAME_CHUNK_ELEMENTS`` input elements at a
time), normalise and activate in place and add residuals in place, so a full-resolution level holds
about three feature maps at once instead of the ten a straightforward graph keeps (the window
copies of the group convolution, the two halves before their concatenation, the 4x nearest-upsampled
map). The results are the same ops on the same numbers; with autograd on, the plain path runs.

Group-causal contract shared by every layer here: a clip of ``1 + g*k`` frames at group size ``g``
is frame 0 followed by ``k`` groups; the output for a group depends on that group and the frames
before it only. With a `StreamCache`, the first call of a layer starts the video (frame 0 plus whole
groups) and later calls continue it (whole groups only), giving exactly the one-shot result.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoders.blocks import (TEMPORAL_PADDINGS, CausalConv3d, ChannelRMSNorm, GroupCausalConv3d,
                                 SpatialDownsample, StreamCache, _check_groups, _frame_step, _inference, group_norm,
                                 norm_layer, starts_video)
from ldm.attention import attention

NORMS = ("rms", "group")
KEY_BRANCHES = ("2d", "3d")  # the KTC key branch: 2D conv (Sec. 3.3) | a 3D conv like the motion one (Table 5)


def _frame_conv(conv: nn.Conv2d, x: Tensor, out: Tensor | None = None) -> Tensor:
    """Apply a 2D convolution to every frame of ``B C T H W``; in inference a chunk of frames at a
    time, into ``out`` when given."""
    b = x.shape[0]
    if not _inference():
        y = conv(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, C', H', W')
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)  # (B, C', T, H', W')
    step = _frame_step(x)
    for t0 in range(0, x.shape[2], step):
        y = conv(rearrange(x[:, :, t0:t0 + step], "b c t h w -> (b t) c h w"))  # (B*t, C', H', W')
        if out is None:
            out = y.new_empty(b, y.shape[1], x.shape[2], *y.shape[2:])
        out[:, :, t0:t0 + step] = rearrange(y, "(b t) c h w -> b c t h w", b=b)
        del y
    return out


def temporal_conv(in_channels: int, out_channels: int, kernel_size: int, group: int,
                  padding: str = "group") -> nn.Module:
    """The 3D convolution of a KTC branch at frame-group size ``group``: a `GroupCausalConv3d`
    (``padding="group"``, Sec. 3.2) or a plain `CausalConv3d` (``"causal"``: output frame ``t`` sees
    input frames ``<= t`` only, even inside a group; the "w/o group causal conv" rows of Table 4, the
    same weights); once time is fully compressed (``group == 1``) a 2D convolution (Sec. 3.3)."""
    if padding not in TEMPORAL_PADDINGS:
        raise ValueError(f"temporal_padding must be one of {TEMPORAL_PADDINGS}, got {padding!r}")
    if group == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    if padding == "group":
        return GroupCausalConv3d(in_channels, out_channels, kernel_size, group)
    return CausalConv3d(in_channels, out_channels, kernel_size)


def _branch_conv(conv: nn.Module, x: Tensor, cache: StreamCache | None, out: Tensor | None = None) -> Tensor:
    """Run one branch's convolution of any kind (`temporal_conv`, or a per-frame 2D conv) on
    ``B C T H W``, into ``out`` when given (inference). A `CausalConv3d` runs in one piece (it has no
    chunked inference path: the ablation variant trades the memory savings for simplicity)."""
    if isinstance(conv, GroupCausalConv3d):
        return conv(x, cache, out)
    if isinstance(conv, CausalConv3d):
        y = conv(x, cache)
        return y if out is None else out.copy_(y)
    return _frame_conv(conv, x, out)


class KTCConv(nn.Module):
    """The convolution of a KTC unit (Sec. 3.3, Fig. 2b): ``key`` (2D, per frame) writes the first
    ``out_channels / 2`` channels, ``motion`` writes the rest; both read every input channel.

    ``motion`` is a `GroupCausalConv3d` at group size ``group`` while frames are still grouped
    (``group > 1``) and a 2D convolution once time is fully compressed (``group == 1``, the
    paper's "we replace the GCConv3D in KTC Unit with a 2D convolution at this stage").
    Ablations (Sec. 4.4): ``padding="causal"`` makes the 3D convolutions plain causal ones (Table 4),
    ``key="3d"`` makes the key branch a 3D convolution like the motion one (Table 5's "3D+3D",
    2D again at ``group == 1``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, group: int = 1,
                 padding: str = "group", key: str = "2d"):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"a KTC convolution writes two halves: out_channels must be even, got {out_channels}")
        if key not in KEY_BRANCHES:
            raise ValueError(f"key_branch must be one of {KEY_BRANCHES}, got {key!r}")
        half, pad = out_channels // 2, kernel_size // 2
        self.group = group
        self.key: nn.Module = (nn.Conv2d(in_channels, half, kernel_size, padding=pad) if key == "2d"
                               else temporal_conv(in_channels, half, kernel_size, group, padding))
        self.motion = temporal_conv(in_channels, half, kernel_size, group, padding)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        if _inference():  # both halves written into one output
            half = self.key.out_channels
            out = x.new_empty(x.shape[0], 2 * half, *x.shape[2:])  # (B, C_out, T, H, W): stride 1, "same"
            _branch_conv(self.key, x, cache, out[:, :half])
            _branch_conv(self.motion, x, cache, out[:, half:])
            return out
        key = _branch_conv(self.key, x, cache)
        motion = _branch_conv(self.motion, x, cache)
        return torch.cat([key, motion], dim=1)  # (B, C_out, T, H, W)


# ------------------------------------------------------------------------------------------
# Normalisation (Sec. 3.5) and attention (Sec. 3.4)
# ------------------------------------------------------------------------------------------
def channel_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """One normaliser of ``channels``: RMS over channels, or the per-frame GroupNorm of kl2d."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    return norm_layer(kind, channels, groups)


class BranchNorm(nn.Module):
    """Normalise the key and the motion half separately (Fig. 2b: "separately normalized by
    RMS-Norm and concatenated"); ``kind="group"`` uses per-frame GroupNorm per half instead."""

    def __init__(self, channels: int, kind: str = "rms", groups: int = 32):
        super().__init__()
        if channels % 2:
            raise ValueError(f"BranchNorm needs an even channel count, got {channels}")
        self.kind = kind
        if kind == "rms":
            self.norm: nn.Module = ChannelRMSNorm(channels, halves=2)
        elif kind == "group":
            self.norm = nn.ModuleList([group_norm(channels // 2, groups), group_norm(channels // 2, groups)])
        else:
            raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "rms":
            return self.norm(x)
        key, motion = x.chunk(2, dim=1)
        return torch.cat([self.norm[0](key), self.norm[1](motion)], dim=1)


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame with a residual (the SD-VAE mid
    block attention, ``norm -> qkv -> attention -> proj``); time is folded into the batch, so it is
    causal in time. Goes through the platform's one attention entry point."""

    def __init__(self, channels: int, norm: str = "rms", groups: int = 32):
        super().__init__()
        self.norm = channel_norm(norm, channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, height = x.shape[0], x.shape[3]
        h = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        qkv = self.qkv(self.norm(h))
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)  # each (N, 1, HW, C)
        # the 1x1 conv `proj` as the matmul it is, on the pixels as rows (as `SpatialSelfAttention`): as a
        # conv of the channels-last map, its weight's gradient had channels-last strides on several threads
        out = F.linear(attention(q, k, v), self.proj.weight.flatten(1), self.proj.bias)  # (N, 1, HW, C)
        out = rearrange(out, "n 1 (h w) c -> n c h w", h=height)  # (N, C, H, W)
        return x + rearrange(out, "(b t) c h w -> b c t h w", b=b)


class BranchAttention(nn.Module):
    """Per-frame attention on each half separately (key pixels attend to key pixels, motion to
    motion), as the KTC layout keeps the halves apart everywhere but in the convolutions."""

    def __init__(self, channels: int, norm: str = "rms", groups: int = 32):
        super().__init__()
        self.key = FrameAttention(channels // 2, norm, groups)
        self.motion = FrameAttention(channels // 2, norm, groups)

    def forward(self, x: Tensor) -> Tensor:
        key, motion = x.chunk(2, dim=1)
        return torch.cat([self.key(key), self.motion(motion)], dim=1)


# ------------------------------------------------------------------------------------------
# Residual block
# ------------------------------------------------------------------------------------------
class KTCResBlock(nn.Module):
    """``norm -> SiLU -> KTC conv -> norm -> SiLU -> dropout -> KTC conv`` plus a 1x1 KTC skip when
    the width changes (the SD-VAE ResBlock with KTC units, Fig. 2d)."""

    def __init__(self, in_channels: int, out_channels: int, group: int, norm: str = "rms", groups: int = 32,
                 dropout: float = 0.0, padding: str = "group", key: str = "2d"):
        super().__init__()
        conv = dict(group=group, padding=padding, key=key)  # the KTCConv ablation switches
        self.norm1 = BranchNorm(in_channels, norm, groups)
        self.conv1 = KTCConv(in_channels, out_channels, 3, **conv)
        self.norm2 = BranchNorm(out_channels, norm, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = KTCConv(out_channels, out_channels, 3, **conv)
        self.skip = KTCConv(in_channels, out_channels, 1, **conv) if in_channels != out_channels else None

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        inplace = _inference()  # the normalised maps are fresh tensors: activate them in place
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace), cache)
        h = self.norm2(h)  # (the conv output is freed here, not after conv2)
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)), cache)
        skip = x if self.skip is None else self.skip(x, cache)
        return h.add_(skip) if inplace else skip + h


# ------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------
class BranchSpatialDownsample(nn.Module):
    """2x spatial downsampling of each half by its own stride-2 convolution (per frame)."""

    def __init__(self, channels: int):
        super().__init__()
        self.key = SpatialDownsample(channels // 2)
        self.motion = SpatialDownsample(channels // 2)

    def forward(self, x: Tensor) -> Tensor:
        key, motion = x.chunk(2, dim=1)
        return torch.cat([self.key(key), self.motion(motion)], dim=1)


class BranchSpatialUpsample(nn.Module):
    """2x nearest spatial upsampling + 3x3 conv of each half, per frame. With ``out_channels <
    channels`` the width shrinks here rather than in the next ResBlock (Sec. 3.5: "we shrink the
    channel number during spatial upsampling", -29 % peak memory at 480P in the paper)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        if channels % 2 or out_channels % 2:
            raise ValueError(f"BranchSpatialUpsample needs even widths, got {channels} -> {out_channels}")
        self.key = nn.Conv2d(channels // 2, out_channels // 2, 3, padding=1)
        self.motion = nn.Conv2d(channels // 2, out_channels // 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        if _inference():  # a chunk of frames at a time: the 4x larger nearest-upsampled map stays small
            half = self.key.out_channels
            out = x.new_empty(b, 2 * half, x.shape[2], 2 * x.shape[3], 2 * x.shape[4])  # (B, C_out, T, 2H, 2W)
            step = max(1, _frame_step(x) // 4)
            for t0 in range(0, x.shape[2], step):
                h = rearrange(x[:, :, t0:t0 + step], "b c t h w -> (b t) c h w")
                key, motion = F.interpolate(h, scale_factor=2.0, mode="nearest").chunk(2, dim=1)
                out[:, :half, t0:t0 + step] = rearrange(self.key(key), "(b t) c h w -> b c t h w", b=b)
                out[:, half:, t0:t0 + step] = rearrange(self.motion(motion), "(b t) c h w -> b c t h w", b=b)
                del h, key, motion
            return out
        h = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B*T, C, 2H, 2W)
        key, motion = h.chunk(2, dim=1)
        h = torch.cat([self.key(key), self.motion(motion)], dim=1)  # (B*T, C_out, 2H, 2W)
        return rearrange(h, "(b t) c h w -> b c t h w", b=b)


class KeyframeDownsample(nn.Module):
    """2x temporal downsampling of a KTC map (Sec. 3.3): the key half keeps the first frame of every
    pair (so after all downsamplings exactly the first frame of each group, the keyframe, is left);
    the motion half merges each pair by a (2, 1, 1) stride-2 convolution. Pairs never straddle two
    groups (the incoming group size is even), and frame 0 passes unchanged in both halves."""

    def __init__(self, channels: int, group: int):
        super().__init__()
        if group < 2 or group % 2:
            raise ValueError(f"KeyframeDownsample needs an even incoming group size, got {group}")
        self.group = group
        self.conv = nn.Conv3d(channels // 2, channels // 2, (2, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        start = starts_video(self, cache)
        _check_groups(x.shape[2], self.group, start, "KeyframeDownsample")
        body = x[:, :, 1:] if start else x
        if body.shape[2] == 0:  # a chunk holding frame 0 alone
            return x
        key, motion = body.chunk(2, dim=1)
        out = torch.cat([key[:, :, 0::2], self.conv(motion)], dim=1)  # (B, C, T_body / 2, H, W)
        return torch.cat([x[:, :, :1], out], dim=2) if start else out


class KeyframeUpsample(nn.Module):
    """2x temporal upsampling of a KTC map, the mirror of `KeyframeDownsample`: the key half repeats
    every frame twice, the motion half predicts two sub-frames per frame with a 1x1x1 convolution
    (``C/2 -> 2 * C/2`` channels unfolded along time); frame 0 is not upsampled."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels // 2, channels, 1)

    def forward(self, x: Tensor, cache: StreamCache | None = None) -> Tensor:
        start = starts_video(self, cache)
        body = x[:, :, 1:] if start else x
        if body.shape[2] == 0:  # a chunk holding latent frame 0 alone
            return x
        key, motion = body.chunk(2, dim=1)
        key = key.repeat_interleave(2, dim=2)  # (B, C/2, 2T, H, W)
        motion = rearrange(self.conv(motion), "b (r c) t h w -> b c (t r) h w", r=2)  # (B, C/2, 2T, H, W)
        out = torch.cat([key, motion], dim=1)
        return torch.cat([x[:, :, :1], out], dim=2) if start else out


# ------------------------------------------------------------------------------------------
# TMPE head (Sec. 3.4, Fig. 2c)
# ------------------------------------------------------------------------------------------
class ParallelAtrousConv(nn.Module):
    """PAC, the encoder's last layer (Sec. 3.4, after DeepLabV3+'s ASPP): a 1x1 branch and 3x3
    branches with the given dilation rates run in parallel on every frame; their outputs are
    concatenated and fused by a 1x1 convolution to ``out_channels``. Every branch reads all channels
    and writes ``[key | motion]`` halves (time is fully compressed here, so they are 2D)."""

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int]):
        super().__init__()
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be positive, got {tuple(dilations)}")
        self.dilations = tuple(dilations)
        self.point = nn.Conv2d(in_channels, out_channels, 1)
        self.atrous = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d)
                                    for d in self.dilations)
        self.fuse = nn.Conv2d(out_channels * (1 + len(self.dilations)), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        h = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        h = torch.cat([self.point(h)] + [conv(h) for conv in self.atrous], dim=1)  # (B*T, (1+n)*C_out, H, W)
        return rearrange(self.fuse(h), "(b t) c h w -> b c t h w", b=b)


def keyframe_select(key: Tensor, motion: Tensor, group: int, start: bool) -> Tensor:
    """Assemble the output video (Sec. 3.3): frame 0 and the first frame of every group from the
    key (2D) head, the other frames from the motion (3D) head. ``start``: the clip begins the video."""
    frames = key.shape[2]
    index = torch.arange(frames, device=key.device) - (1 if start else 0)
    from_key = (index % group == 0) | (index < 0)  # (T,)
    return torch.where(from_key.view(1, 1, -1, 1, 1), key, motion)


def inflate_center(weight_2d: Tensor, frames: int) -> Tensor:
    """A ``C_out C_in k k`` 2D kernel as a ``C_out C_in frames k k`` 3D kernel that only looks at
    the centre frame (I3D's "centre initialisation", Carreira & Zisserman 2017; IV-VAE Sec. 3.3)."""
    if frames % 2 == 0:
        raise ValueError(f"centre inflation needs an odd temporal kernel, got {frames}")
    return inflate_at(weight_2d, frames, frames // 2)


def inflate_at(weight_2d: Tensor, frames: int, tap: int) -> Tensor:
    """A ``C_out C_in k k`` 2D kernel as a ``C_out C_in frames k k`` 3D kernel that only looks at
    temporal tap ``tap`` (the current frame: the centre of a GCConv, the last tap ``[0, 0, W]`` of a
    causal conv, Sec. 3.1's inflation of the causal baseline)."""
    w = weight_2d.new_zeros(weight_2d.shape[0], weight_2d.shape[1], frames, *weight_2d.shape[2:])
    w[:, :, tap] = weight_2d
    return w


def count_gcconv(module: nn.Module) -> int:
    """Number of GCConv layers with a temporal kernel (each holds ``P_t`` cached frames when streaming)."""
    return sum(1 for m in module.modules() if isinstance(m, GroupCausalConv3d) and m.time_pad > 0)
