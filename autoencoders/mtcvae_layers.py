"""MTC-VAE's mechanisms apart from the network (Dong & Zhu, "MTC-VAE: Multi-Level Temporal
Compression with Content Awareness"; ``autoencoders/mtcvae.py`` assembles them):

- segment arithmetic of a causal VAE: a segment of ``T = 1 + r_max * k`` frames becomes
  ``1 + (T - 1) / c`` latent frames at temporal rate ``c``, and a latent segment of ``l`` frames
  decodes to ``1 + c * (l - 1)`` frames;
- the compression algorithm (Sec. 3.2, Eq. 1-3, Alg. 1): per segment a quality vector ``Q(c)``, the
  compression tolerance ``alpha`` and the rate maximising ``(1 - alpha) Q + alpha log2(c) w``; with
  the paper's alternative quality functions (H.264 size, random; Tab. 5);
- the keyframe predictor (Sec. 3.4 b) and the split of a concatenated latent at predicted keyframes
  with the low-confidence fallback (Sec. 8.1), Eq. 7;
- the flow-guided consistency loss (Sec. 3.5, Eq. 10-12) with a weight-free, differentiable
  coarse-to-fine Horn-Schunck optical flow (the paper uses a learned flow network; no weights may be
  downloaded here, and a classical flow in torch keeps gradients flowing into ``||df||_1``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PSNR_CAP = 60.0  # dB; a perfect reconstruction would be +inf and break the statistics of Eq. 3


# ------------------------------------------------------------------------------------------
# Segment arithmetic (causal: the first frame of a segment stays alone)
# ------------------------------------------------------------------------------------------
def segment_latent_frames(segment_frames: int, rate: int) -> int:
    """Latent frames of one ``segment_frames``-frame segment at temporal rate ``rate``: ``1 + (T-1)/c``."""
    if rate < 1 or (segment_frames - 1) % rate:
        raise ValueError(f"a {segment_frames}-frame segment cannot be compressed {rate}x in time "
                         f"(needs 1 + {rate}k frames)")
    return 1 + (segment_frames - 1) // rate


def decoded_frames(length: int, rate: int) -> int:
    """Frames a latent segment of ``length`` frames decodes to at rate ``rate``: ``1 + c (l - 1)``."""
    return 1 + rate * (length - 1)


# ------------------------------------------------------------------------------------------
# Compression algorithm (Sec. 3.2)
# ------------------------------------------------------------------------------------------
def compression_tolerance(quality: Tensor, reference: Sequence[float] | None = None) -> Tensor:
    """Eq. 3: ``alpha(x_i) = 1/2 (Qbar_i - Q_min) / (Q_max - Q_min) + 1/2 (1 - sigma_i / sigma_max)``.

    ``quality``: ``(N, R)``, the quality vector of each of N segments at the R rates. ``Q_min``,
    ``Q_max`` (over all rates and segments) and ``sigma_max`` (largest per-segment std) come from
    ``quality`` itself, or from ``reference = (Q_min, Q_max, sigma_max)`` measured on a dataset;
    with a reference, the terms are clipped to [0, 1]. A degenerate range (all equal) counts as the
    most tolerant value 1. The std is the population std over the R rates."""
    if quality.ndim != 2 or quality.shape[1] < 2:
        raise ValueError(f"quality must be (segments, rates>=2), got {tuple(quality.shape)}")
    q = quality.double()
    mean, sigma = q.mean(1), q.std(1, unbiased=False)
    if reference is not None:
        if len(reference) != 3:
            raise ValueError(f"reference must be (Q_min, Q_max, sigma_max), got {tuple(reference)}")
        q_min, q_max, s_max = (float(v) for v in reference)
    else:
        q_min, q_max, s_max = float(q.min()), float(q.max()), float(sigma.max())
    eps = 1e-9
    spread = ((mean - q_min) / (q_max - q_min)).clamp(0, 1) if q_max - q_min > eps else torch.ones_like(mean)
    steady = (1 - sigma / s_max).clamp(0, 1) if s_max > eps else torch.ones_like(mean)
    return 0.5 * spread + 0.5 * steady  # (N,)


def select_rates(quality: Tensor, rates: Sequence[int], weight: float = 1.5,
                 reference: Sequence[float] | None = None) -> Tensor:
    """Eq. 1-2: per segment ``c_i = argmax_c (1 - alpha_i) Q(c, x_i) + alpha_i log2(c) w`` over
    ``c in rates`` (the sum over segments separates into one argmax per segment). Returns ``(N,)``
    long rates."""
    if quality.shape[1] != len(rates):
        raise ValueError(f"quality has {quality.shape[1]} columns for {len(rates)} rates")
    alpha = compression_tolerance(quality, reference)[:, None]  # (N, 1)
    log_c = torch.tensor([math.log2(c) for c in rates], dtype=torch.float64, device=quality.device)[None]  # (1, R)
    score = (1 - alpha) * quality.double() + alpha * log_c * weight  # (N, R)
    return torch.tensor(list(rates), dtype=torch.long, device=quality.device)[score.argmax(1)]


def segment_psnr(recon: Tensor, video: Tensor) -> Tensor:
    """PSNR (dB, signals in [-1, 1]) per segment ``(N,)`` of ``(N, C, T, H, W)`` clips, capped at
    ``PSNR_CAP``: the quality function Q of the PSNR-based selector."""
    mse = (recon.clamp(-1, 1).double() - video.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).clamp(max=PSNR_CAP)


def h264_bytes(frames: Tensor, crf: int = 23) -> int:
    """Bytes libx264 spends on uint8 frames ``(T, H, W, 3)`` (one GOP, no container; ``mbtree`` off
    and one thread, so the same frames always give the same size)."""
    import av  # PyAV: the platform's video library (an optional import for this one selector)

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even height and width, got {h}x{w}")
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
    ctx.time_base, ctx.framerate = Fraction(1, 8), Fraction(8, 1)
    ctx.options = {"crf": str(crf), "preset": "medium", "mbtree": "0", "keyint": str(t + 1)}
    ctx.thread_count = 1
    arr = frames.cpu().numpy()
    size = 0
    for i in range(t):
        frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
        frame.pts = i
        size += sum(p.size for p in ctx.encode(frame))
    size += sum(p.size for p in ctx.encode(None))
    return size


def h264_temporal_bits(segment: Tensor, crf: int = 23) -> float:
    """Bits per pixel H.264 spends on what CHANGES in a ``(C, T, H, W)`` segment in [-1, 1]: the
    size of the segment minus the size of its first frame held for T frames (the codec's fixed
    per-frame cost and the texture of frame 0 cancel), over the ``(T - 1) H W`` later pixels."""
    c, t, h, w = segment.shape
    frames = rearrange(((segment.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8),
                       "c t h w -> t h w c")  # (T, H, W, 3)
    frozen = frames[:1].expand(t, -1, -1, -1).contiguous()
    return max(h264_bytes(frames, crf) - h264_bytes(frozen, crf), 0) * 8.0 / (max(t - 1, 1) * h * w)


def h264_quality(bits: Tensor, rates: Sequence[int], db_per_bit: float = 20.0, top: float = 40.0) -> Tensor:
    """Quality vectors ``(N, R)`` for the H.264 selector (Tab. 5): the paper names the codec's size
    as the alternative Q() but gives no formula, so we model the PSNR a segment would keep at rate c
    as falling linearly in ``log2(c / c_min)`` with a slope proportional to its temporal bits:
    ``Q(c) = top - db_per_bit * bits * log2(c / c_min)``. A frozen segment keeps ``top`` at every
    rate (alpha -> 1, highest rate); a busy one loses ``db_per_bit * bits`` dB per doubling."""
    octaves = torch.tensor([math.log2(c / rates[0]) for c in rates], dtype=torch.float64)  # (R,)
    return top - db_per_bit * bits.double()[:, None] * octaves[None]


# ------------------------------------------------------------------------------------------
# Keyframe predictor and splitting (Sec. 3.4)
# ------------------------------------------------------------------------------------------
class KeyframePredictor(nn.Module):
    """The linear keyframe predictor P (Sec. 3.4 b): a binary classifier that moves over the
    latent frames of Z and gives one logit per frame ("is this the first frame of a segment").

    Per latent frame it reads the channel statistics over space (mean and RMS deviation, ``2c``
    features, so it works at any latent size) and applies one linear map over a centred window of
    ``window`` frames (a Conv1d: still linear, and it sees the jump at a segment boundary).
    Frames past a sample's length are zeroed before the window reads them."""

    def __init__(self, channels: int, window: int = 3):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"the predictor window must be a positive odd number, got {window}")
        self.proj = nn.Conv1d(2 * channels, 1, window, padding=window // 2)

    @staticmethod
    def features(z: Tensor) -> Tensor:
        """``(B, c, t, h, w) -> (B, 2c, t)``: spatial mean and RMS deviation per channel and frame."""
        mean = z.mean(dim=(3, 4))  # (B, c, t)
        rms = (z - mean[..., None, None]).pow(2).mean(dim=(3, 4)).add(1e-6).sqrt()  # (B, c, t)
        return torch.cat([mean, rms], 1)

    def forward(self, z: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Keyframe logits ``(B, t)`` for latents ``(B, c, t, h, w)``."""
        if z.ndim != 5:
            raise ValueError(f"the keyframe predictor expects B c t h w latents, got {tuple(z.shape)}")
        f = self.features(z)
        if lengths is not None:
            valid = torch.arange(z.shape[2], device=z.device)[None] < lengths.to(z.device)[:, None]  # (B, t)
            f = f * valid[:, None].to(f.dtype)
        return self.proj(f)[:, 0]


@dataclass(frozen=True)
class Segment:
    """One latent segment of a concatenated latent: ``length`` frames from ``start``, decoded at
    temporal rate ``rate``; ``fallback`` when the rate came from the low-confidence rule."""

    start: int
    length: int
    rate: int
    fallback: bool = False

    @property
    def frames(self) -> int:
        return decoded_frames(self.length, self.rate)


def segments_from_rates(rates: Sequence[int], segment_frames: int) -> list[Segment]:
    """The segments of a latent whose (ground truth) segment rates are known; zeros are padding."""
    out, start = [], 0
    for c in rates:
        c = int(c)
        if c <= 0:
            continue
        n = segment_latent_frames(segment_frames, c)
        out.append(Segment(start, n, c))
        start += n
    return out


def split_segments(probs: Tensor, segment_frames: int, rates: Sequence[int], threshold: float = 0.5,
                   min_confidence: float = 0.6) -> list[Segment]:
    """Split one latent of ``t`` frames at predicted keyframes (Alg. 2: ``K = {i | p_i > threshold}``)
    and recover each segment's rate from its length (Eq. 7). Frame 0 always starts a segment.

    Fallback (Sec. 8.1): when a frame that decides the boundary (the frames after the segment
    start up to and including the next predicted keyframe) has confidence ``max(p, 1 - p)`` below
    ``min_confidence``, or the predicted length matches no rate, the segment takes the previous
    segment's rate (the base rate ``rates[0]`` for the first, the paper's 256x) and that rate's
    length (cut at the end of the latent). Every frame belongs to exactly one segment."""
    if probs.ndim != 1:
        raise ValueError(f"split_segments takes one sample's probabilities (t,), got {tuple(probs.shape)}")
    p = probs.detach().float().cpu()
    n = p.numel()
    by_length = {segment_latent_frames(segment_frames, c): int(c) for c in rates}
    out: list[Segment] = []
    i, prev = 0, None
    while i < n:
        later = (p[i + 1:] > threshold).nonzero()
        j = i + 1 + int(later[0]) if later.numel() else n  # next keyframe (or the end)
        deciding = p[i + 1:min(j + 1, n)]
        confident = deciding.numel() == 0 or bool(torch.maximum(deciding, 1 - deciding).min() >= min_confidence)
        length = j - i
        if confident and length in by_length:
            seg = Segment(i, length, by_length[length])
        else:
            rate = prev if prev is not None else int(rates[0])
            seg = Segment(i, min(segment_latent_frames(segment_frames, rate), n - i), rate, fallback=True)
        out.append(seg)
        prev = seg.rate
        i += seg.length
    return out


def keyframe_accuracy(probs: Tensor, labels: Tensor, threshold: float = 0.5) -> float:
    """Keyframe prediction accuracy (Sec. 4.1, "Acc."): correctly classified latent frames over all
    frames, with frame 0 a keyframe by definition. ``probs``/``labels``: ``(t,)`` of one sample."""
    pred = probs.detach().cpu() > threshold
    pred[0] = True
    return float((pred == labels.detach().cpu().bool()).float().mean())


# ------------------------------------------------------------------------------------------
# Flow-guided consistency loss (Sec. 3.5)
# ------------------------------------------------------------------------------------------
_HS_KERNEL = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def warp(image: Tensor, flow: Tensor) -> Tensor:
    """Sample ``image (N, C, H, W)`` at ``x + flow(x)`` (bilinear, border padding); ``flow (N, 2, H, W)``
    in pixels, channel 0 along x (width) and 1 along y. Differentiable in both arguments."""
    n, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=image.device, dtype=image.dtype),
                            torch.arange(w, device=image.device, dtype=image.dtype), indexing="ij")
    x, y = xs + flow[:, 0], ys + flow[:, 1]  # each (N, H, W)
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], -1)  # (N, H, W, 2)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return 0.5 * (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]), 0.5 * (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1])


def _neighbour_mean(u: Tensor) -> Tensor:
    return F.conv2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), _HS_KERNEL.to(u).view(1, 1, 3, 3))


def optical_flow(source: Tensor, target: Tensor, levels: int = 3, iters: int = 30,
                 smoothness: float = 0.5) -> Tensor:
    """Weight-free optical flow ``f`` with ``target(x + f(x)) ~ source(x)``: Horn & Schunck (1981,
    Eq. 9-10, Jacobi iterations with their 3x3 neighbour average) coarse to fine, warping
    ``target`` by the upsampled coarser flow at each level. Inputs ``(N, C, H, W)`` (channels are
    averaged to grey); output ``(N, 2, H, W)`` in pixels (x then y). Differentiable in both inputs."""
    if source.shape != target.shape or source.ndim != 4:
        raise ValueError(f"optical_flow needs two equal (N, C, H, W) batches, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    pyramid = [(source.mean(1, keepdim=True), target.mean(1, keepdim=True))]
    while len(pyramid) < levels and min(pyramid[-1][0].shape[-2:]) >= 16:
        pyramid.append(tuple(F.avg_pool2d(v, 2) for v in pyramid[-1]))
    flow = None
    for src, tgt in reversed(pyramid):
        if flow is None:
            flow = src.new_zeros(src.shape[0], 2, *src.shape[-2:])
        else:
            flow = 2 * F.interpolate(flow, size=src.shape[-2:], mode="bilinear", align_corners=True)
        moved = warp(tgt, flow)
        ix, iy = _gradients(0.5 * (src + moved))
        it = moved - src
        denom = smoothness ** 2 + ix ** 2 + iy ** 2
        u, v = torch.zeros_like(ix), torch.zeros_like(ix)
        for _ in range(iters):
            ub, vb = _neighbour_mean(u), _neighbour_mean(v)
            step = (ix * ub + iy * vb + it) / denom
            u, v = ub - ix * step, vb - iy * step
        flow = flow + torch.cat([u, v], 1)
    return flow


def flow_guided_loss(recon: Tensor, video: Tensor, levels: int = 3, iters: int = 30,
                     smoothness: float = 0.5) -> tuple[Tensor, Tensor]:
    """Eq. 11-12 per frame: ``df`` is the optical flow between the input frame and its
    reconstruction (``recon(x + df) ~ video(x)``), ``L_quality = ||warp(X_hat, df) - X||_1`` (the
    error left once the reconstruction is moved into place) and ``L_motion = ||df||_1`` (how far
    it had to move, pixels). Both are means; Eq. 10 is their sum. Inputs ``(B, C, T, H, W)``."""
    if recon.shape != video.shape or video.ndim != 5:
        raise ValueError(f"flow_guided_loss needs equal B C T H W clips, got {tuple(recon.shape)} "
                         f"and {tuple(video.shape)}")
    x = rearrange(video, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
    x_hat = rearrange(recon, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
    df = optical_flow(x, x_hat, levels, iters, smoothness)
    quality = (warp(x_hat, df) - x).abs().mean()
    motion = df.abs().mean()
    return quality, motion
