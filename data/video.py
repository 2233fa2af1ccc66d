"""Video decoding and encoding with PyAV.

``read_video`` turns any container/codec that PyAV (FFmpeg) reads into the platform's clip format,
a ``(C=3, T, H, W)`` float32 tensor in [-1, 1]:

1. frames are decoded lazily (decoding stops as soon as the requested frames are known);
2. temporal resampling by timestamps: output frame ``i`` is the source frame whose presentation
   time is nearest to ``start + i / fps`` (``fps=None`` keeps the native rate: consecutive frames
   from ``start`` on);
3. each frame is resized with antialiasing so that it covers ``height x width`` with its aspect
   ratio kept (the shorter side, relative to the target, fits exactly), then center-cropped.

Anything that cannot give the requested clip raises `VideoError` whose message starts with the
reason (``"not a readable video"``, ``"no video stream"``, ``"zero frames"``, ``"too short"``,
``"corrupt or truncated"``, ``"file not found"``, ``"empty file"``), so callers (extraction, datasets)
can skip the input and report why.

``write_video`` writes ``.mp4`` (H.264 via libx264, yuv420p, so even sizes) and ``.gif`` (PIL,
adaptive palette per frame). Files are written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

MP4_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")
GIF_SUFFIXES = (".gif",)
DEFAULT_CRF = 18  # libx264 constant rate factor: 18 is visually near-lossless, small files
LARGE_FRAME = 640 * 360  # frames of at least this many pixels get threaded decoding/encoding

# PyAV raises FFmpegError subclasses (most also subclass OSError/ValueError); UnicodeDecodeError
# can come out of metadata parsing of garbage input.
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError)


class VideoError(Exception):
    """A video input that cannot give the requested clip; ``str(e)`` starts with the reason."""


# --------------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------------
def _source_name(src: str | Path | bytes) -> str:
    return f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _open(src: str | Path | bytes) -> tuple[Any, Any]:
    """Open ``src`` for reading and return ``(container, video_stream)``; VideoError if impossible."""
    name = _source_name(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoError(f"empty file (0 bytes): {name}")
        target: Any = io.BytesIO(bytes(src))
    else:
        path = Path(src)
        if not path.exists():
            raise VideoError(f"file not found: {name}")
        if path.is_dir():
            raise VideoError(f"not a readable video (a directory): {name}")
        if path.stat().st_size == 0:
            raise VideoError(f"empty file (0 bytes): {name}")
        target = str(path)
    try:
        container = av.open(target, mode="r")
    except _AV_ERRORS as e:
        raise VideoError(f"not a readable video: {name} ({e})") from e
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise VideoError(f"no video stream in {name} (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx.width * ctx.height < LARGE_FRAME:
        ctx.thread_count = 1  # small frames: decoder threads cost more than they save
    else:
        stream.thread_type = "AUTO"
    return container, stream


def _native_fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def probe(src: str | Path | bytes) -> dict[str, Any]:
    """Container facts without decoding pixels: ``dict(frames, fps, width, height, duration, codec)``.

    ``frames`` comes from the container header when it has it, otherwise from counting the video
    packets (demuxing only). ``duration`` is in seconds.
    """
    container, stream = _open(src)
    try:
        fps = _native_fps(stream)
        frames = int(stream.frames or 0)
        if frames == 0:
            try:
                frames = sum(1 for p in container.demux(stream) if p.size > 0)
            except _AV_ERRORS as e:
                raise VideoError(f"corrupt or truncated: demuxing {_source_name(src)} failed ({e})") from e
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = frames / fps if fps else 0.0
        ctx = stream.codec_context
        return dict(frames=frames, fps=fps, width=int(ctx.width), height=int(ctx.height),
                    duration=duration, codec=ctx.name)
    finally:
        container.close()


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
class _Decoded:
    """One decoded source frame; converted to an RGB array only if it is picked (once)."""

    __slots__ = ("time", "_frame", "_rgb")

    def __init__(self, time: float, frame: Any) -> None:
        self.time, self._frame, self._rgb = time, frame, None

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            self._rgb, self._frame = self._frame.to_ndarray(format="rgb24"), None
        return self._rgb


def _select_frames(container: Any, stream: Any, frames: int, fps: float | None, start: float,
                   name: str) -> list[np.ndarray]:
    """Decode lazily and return ``frames`` RGB uint8 arrays (h, w, 3) chosen by timestamp."""
    native = _native_fps(stream)
    half = 0.5 / native if native else 0.0          # half a source frame, in seconds
    targets = [start + i / fps for i in range(frames)] if fps is not None else None
    chosen: list[np.ndarray] = []
    n = 0                                           # source frames decoded so far
    t0: float | None = None                         # times are relative to the first frame
    prev: _Decoded | None = None
    try:
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else (n / native if native else float(n))
            t0 = t if t0 is None else t0
            cur = _Decoded(t - t0, frame)
            n += 1
            if targets is None:
                # native rate: consecutive frames from the one nearest to `start`
                if cur.time >= start - half - 1e-9:
                    chosen.append(cur.rgb())
            else:
                while len(chosen) < frames and targets[len(chosen)] <= cur.time + 1e-9:
                    target = targets[len(chosen)]
                    # the nearer of (prev, cur); ties go to the earlier frame
                    near_prev = prev is not None and target - prev.time <= cur.time - target + 1e-9
                    chosen.append((prev if near_prev else cur).rgb())
                prev = cur
            if len(chosen) == frames:
                break
    except _AV_ERRORS as e:
        raise VideoError(f"corrupt or truncated: decoding {name} failed after {n} frames ({e})") from e
    if n == 0:
        raise VideoError(f"zero frames: {name} has a video stream but no decodable frame")
    if targets is not None and prev is not None:
        # targets just past the last frame are still nearest to it (within half a source frame)
        if not native and n > 1:
            half = 0.5 * prev.time / (n - 1)
        while len(chosen) < frames and targets[len(chosen)] - prev.time <= half + 1e-9:
            chosen.append(prev.rgb())
    if len(chosen) < frames:
        rate = f"{native:g}" if native else "unknown"
        need = f"need {frames}" + (f" frames at {fps:g} fps" if fps is not None else " frames")
        if start:
            need += f" from t={start:g}s"
        raise VideoError(f"too short: has {n} frames at {rate} fps, {need}")
    return chosen


def resize_center_crop(video: Tensor, height: int, width: int) -> Tensor:
    """Resize ``(T, C, h, w)`` float frames, aspect kept, to cover ``height x width``; center-crop.

    Downscaling is antialiased (bilinear with an area-aware kernel).
    """
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(video, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[..., top:top + height, left:left + width]


def read_video(src: str | Path | bytes, frames: int, height: int, width: int, fps: float | None = None,
               start: float = 0.0) -> Tensor:
    """Decode a clip of ``frames`` frames at ``fps`` (None: native rate) from ``start`` seconds.

    Returns a ``(3, T, H, W)`` float32 tensor in [-1, 1]. Raises `VideoError` (see module doc).
    """
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"frames, height and width must be >= 1, got {frames}, {height}, {width}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")
    if start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    name = _source_name(src)
    container, stream = _open(src)
    try:
        picked = _select_frames(container, stream, frames, fps, start, name)
    finally:
        container.close()
    if all(f.shape[:2] == (height, width) for f in picked):
        out = np.stack(picked).transpose(3, 0, 1, 2).astype(np.float32)   # (3, T, H, W)
        out /= 127.5
        out -= 1.0
        return torch.from_numpy(out)
    # resize frames of one size together (a stream may change resolution midway)
    x = torch.empty(len(picked), 3, height, width)
    sizes = {f.shape for f in picked}
    for size in sizes:
        idx = [i for i, f in enumerate(picked) if f.shape == size]
        group = torch.from_numpy(np.stack([picked[i] for i in idx])).float()       # (n, h, w, 3)
        x[idx] = resize_center_crop(rearrange(group, "n h w c -> n c h w"), height, width)  # (n, 3, H, W)
    return rearrange(x.clamp_(0, 255) / 127.5 - 1.0, "t c h w -> c t h w").contiguous()  # (3, T, H, W)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def video_to_uint8(video: Tensor) -> Tensor:
    """``(C, T, H, W)`` float in [-1, 1] -> ``(T, H, W, C)`` uint8."""
    if video.ndim != 4:
        raise ValueError(f"expected a (C, T, H, W) video, got shape {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "c t h w -> t h w c").contiguous()         # (T, H, W, C)


def _as_uint8_frames(frames: np.ndarray | Tensor) -> np.ndarray:
    arr = frames.cpu().numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("cannot write a video with zero frames")
    return np.ascontiguousarray(arr)


def _encode_h264(target: Any, frames: np.ndarray, fps: float, fmt: str | None, crf: int) -> None:
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 (yuv420p) needs even height and width, got {h}x{w}; crop or resize "
                         "to even sizes or write a .gif")
    with av.open(target, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # mbtree off: with it, x264 output for the same frames occasionally differs from run to run
        # (seen on tiny frames); without it the same frames always give the same bytes.
        stream.options = {"crf": str(crf), "preset": "medium", "mbtree": "0"}
        if w * h < LARGE_FRAME:
            stream.codec_context.thread_count = 1  # small frames: threads cost more than they save
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _encode_gif(target: Any, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(target, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(10, round(1000 / fps)), loop=0, optimize=False, disposal=1)


def encode_video(frames: np.ndarray | Tensor, fps: float, format: str = "mp4", crf: int = DEFAULT_CRF) -> bytes:
    """Encode uint8 ``(T, H, W, 3)`` frames to MP4 (H.264) or GIF bytes (for shards)."""
    arr = _as_uint8_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    buf = io.BytesIO()
    if format == "mp4":
        _encode_h264(buf, arr, fps, "mp4", crf)
    elif format == "gif":
        _encode_gif(buf, arr, fps)
    else:
        raise ValueError(f"unknown video format {format!r}; expected 'mp4' or 'gif'")
    return buf.getvalue()


def write_frames(path: str | Path, frames: np.ndarray | Tensor, fps: float, crf: int = DEFAULT_CRF) -> None:
    """Write uint8 ``(T, H, W, 3)`` frames; the format follows the suffix (.mp4/.m4v/.mov/.mkv or .gif).

    The file appears under its final name only when complete (temporary name + rename).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MP4_SUFFIXES + GIF_SUFFIXES:
        raise ValueError(f"cannot write {path.name!r}: suffix must be one of {MP4_SUFFIXES + GIF_SUFFIXES}")
    arr = _as_uint8_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        if suffix in GIF_SUFFIXES:
            _encode_gif(str(tmp), arr, fps)
        else:
            _encode_h264(str(tmp), arr, fps, None, crf)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_video(path: str | Path, video: Tensor, fps: float, crf: int = DEFAULT_CRF) -> None:
    """Write a ``(C, T, H, W)`` video in [-1, 1]; .mp4 (H.264, even sizes) or .gif by suffix."""
    write_frames(path, video_to_uint8(video), fps, crf=crf)
