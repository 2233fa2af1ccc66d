"""Video decoding and encoding with PyAV.

``read_video`` turns any container/codec that PyAV (FFmpeg) reads into the platform's clip format,
a ``(C=3, T, H, W)`` float32 tensor in [-1, 1]:

1. frames are decoded lazily (decoding stops as soon as the requested frames are known);
2. temporal resampling by timestamps: output frame ``i`` is the source frame whose presentation
   time is nearest to ``start + i / fps`` (``fps=None`` keeps the native rate: consecutive frames
   from ``start`` on);
3. each frame is turned upright when the stream says so (phone videos: the display matrix, or an
   older ``rotate`` tag; quarter turns), then resized with antialiasing so that it covers
   ``height x width`` with its aspect ratio kept (the shorter side, relative to the target, fits
   exactly), and center-cropped. The resize runs on the 8-bit frames (torch's antialiased bilinear
   on uint8: several times faster than on float32 frames, within one level of 255 of it), so every
   clip is 8-bit pixels until it is scaled to [-1, 1].

``read_clips`` gives several windows of one video in one decoding pass (seeking over the gaps where
the container allows it; ``read_clips_timed`` adds the video's `frame_timing` from the same opening);
`Windows` says which windows (``--clips-per-video K`` / ``--clip-stride S``) and `plan_windows`
places them from the container header.

Anything that cannot give the requested clip raises `VideoError` whose message starts with the
reason (``"not a readable video"``, ``"no video stream"``, ``"zero frames"``, ``"too short"``,
``"corrupt or truncated"``, ``"file not found"``, ``"empty file"``, ``"unknown frame rate"``), so callers (extraction, datasets)
can skip the input and report why.

``write_video`` writes ``.mp4`` (H.264 via libx264, yuv420p, so even sizes) and ``.gif``
(FFmpeg's encoder, an adaptive palette per frame, every frame kept). Files are written to a
temporary name and renamed when complete.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from einops import rearrange
from PIL import Image
from torch import Tensor
from torch.utils.data import get_worker_info

from ldm.errors import checking

MP4_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")
GIF_SUFFIXES = (".gif",)
DEFAULT_CRF = 18  # libx264 constant rate factor: 18 is visually near-lossless, small files
LARGE_FRAME = 640 * 360  # frames of at least this many pixels get threaded decoding/encoding

# what a clip's pixels are for a given video and clip settings: raised when the reading changes them, so that
# folders made by an earlier reading are told apart (`ldm extract` binds its output to it). 1: resized on float32
# frames; 2: on their 8-bit pixels (within one level of 255 of 1's)
READING_VERSION = 2

# PyAV raises FFmpegError subclasses (most also subclass OSError/ValueError); UnicodeDecodeError
# can come out of metadata parsing of garbage input.
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError)


class VideoError(Exception):
    """A video input that cannot give the requested clip; ``str(e)`` starts with the reason."""


def _reason(e: Exception) -> str:
    """FFmpeg's words for an error, without the errno and file name PyAV adds around them."""
    return getattr(e, "strerror", None) or str(e)


# --------------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------------
class NamedBytes(bytes):
    """A video's encoded bytes with where they come from (``shard.tar:member.mp4``, a file's path):
    what a `VideoError` about them names."""

    name: str

    def __new__(cls, data: bytes, name: str) -> NamedBytes:
        named = super().__new__(cls, data)
        named.name = name
        return named


def _source_name(src: str | Path | bytes) -> str:
    """A video input as its errors name it: a path, the name of `NamedBytes`, or the size of other bytes."""
    if isinstance(src, NamedBytes):
        return src.name
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
        raise _cut_short(src, VideoError(f"not a readable video: {name} ({_reason(e)})")) from e
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise _cut_short(src, VideoError(f"no video stream in {name} (streams: {', '.join(kinds)})"))
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx.width * ctx.height < LARGE_FRAME:
        ctx.thread_count = 1  # small frames: decoder threads cost more than they save
    else:
        stream.thread_type = "AUTO"
        ctx.thread_count = _decoder_threads()
    return container, stream


def _decoder_threads() -> int:
    """Decoder threads for a large frame: FFmpeg's choice (0: one per core it may use) in the main
    process; in one of N DataLoader worker processes (``ldm extract``'s decoding workers) its share of
    the cores this process may use (a SLURM ``--cpus-per-task`` or taskset limit, as FFmpeg counts
    them; not every core of the machine), ``cores // N``. Frame threads decode ahead, and a clip stops
    early: per process, 16 threads (a 16-core machine's choice) halved the clips/s of 17-frame 720p /
    512 clips on a 2-core machine, against one thread. The decoded pixels do not depend on the threads."""
    worker = get_worker_info()
    if worker is None:
        return 0
    return max(1, usable_cores() // worker.num_workers)


def usable_cores() -> int:
    """The CPU cores this process may run on, not every core of the machine: the cores it is pinned
    to (a SLURM ``--cpus-per-task``, ``taskset``, a container's cpuset) and at most its cgroup's CPU
    time quota (``docker --cpus``, a Kubernetes CPU limit), rounded up."""
    pinned = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(pinned, math.ceil(quota))) if quota is not None else pinned


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use per period (``cpu.max`` of cgroup v2,
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` of v1), the lowest along its cgroup's path up to the
    root; None when no quota is set or none can be read (not Linux)."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":               # v2: 0::/path
            mounts, read = [root, root / "unified"], _cpu_max
        elif "cpu" in controllers.split(","):  # v1: N:cpu,cpuacct:/path
            mounts, read = [root / controllers, root / "cpu"], _cfs_quota
        else:
            continue
        for mount in mounts:
            # a container sees its own cgroup at the mount's root (the path is the host's name for it)
            parts = Path(path.lstrip("/")).parts
            for depth in range(len(parts), -1, -1):
                quota = read(mount.joinpath(*parts[:depth]))
                if quota is not None:
                    quotas.append(quota)
    return min(quotas) if quotas else None


def _cpu_max(folder: Path) -> float | None:
    """cgroup v2 ``cpu.max``: ``"QUOTA PERIOD"`` or ``"max PERIOD"`` (no limit)."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)


def _cfs_quota(folder: Path) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1: no limit) over ``cpu.cfs_period_us``."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


SHARED_MEMORY = Path("/dev/shm")  # where DataLoader workers hand tensors over on Linux (POSIX shared memory)
SHARED_MEMORY_SHARE = 0.5  # of its free bytes, what a machine's decoding workers may hold (the rest: other users)


def shared_memory_free(path: Path = SHARED_MEMORY) -> int | None:
    """Bytes free in the shared memory that DataLoader workers hand their tensors over in (a container's
    ``/dev/shm``: Docker's default is 64 MB); None where there is none to read (not Linux)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def fit_shared_memory(workers: int, in_flight: Callable[[int], int], ranks: int = 1,
                      path: Path = SHARED_MEMORY, words: tuple[str, str, str] = ("decoding workers", "clips",
                                                                                 "decoded ahead")
                      ) -> tuple[int, str | None]:
    """The most decoding workers, at most ``workers``, whose tensors in flight (``in_flight(w)`` bytes with ``w``
    workers: those decoded and waiting) fit this process's share of the free shared memory
    (`SHARED_MEMORY_SHARE` of it over the ``ranks`` on the machine), and why fewer when fewer (None otherwise).
    0 when not even one fits: the main process decodes, with no shared memory. Was: a worker killed by a bus
    error ("out of shared memory") midway through a run in a container with Docker's 64 MB. ``words``: the
    message's names of the workers, what they hand over and how (``ldm train``: shard readers, latent batches,
    read ahead)."""
    free = shared_memory_free(path)
    if workers <= 0 or free is None:
        return workers, None
    budget = SHARED_MEMORY_SHARE * free / max(ranks, 1)
    if in_flight(workers) <= budget:
        return workers, None
    fit = next((w for w in range(workers - 1, 0, -1) if in_flight(w) <= budget), 0)
    per_rank = f" for each of the {ranks} ranks on this machine" if ranks > 1 else ""
    kind, items, ahead = words
    return fit, (f"{path} has {free / 2**20:.0f} MiB free, the shared memory {kind} hand {items} over in: "
                 f"{fit} worker(s) instead of {workers}, whose {items} {ahead} would take ~"
                 f"{in_flight(workers) / 2**20:.0f} MiB{per_rank}; give the container more (docker run --shm-size 16g; "
                 "Kubernetes: an emptyDir volume of medium Memory at /dev/shm) for full speed")


def _cut_short(src: str | Path | bytes, error: VideoError) -> VideoError:
    """``error``, unless ``src`` is an MP4/MOV file (it starts with an ``ftyp`` box) whose last
    top-level box runs past the end of the file: then an error that says it was cut short. An
    interrupted download or copy of a video whose index (``moov``) comes last looks like this, and
    FFmpeg finds no valid data, no video stream or no frame in it."""
    try:
        f = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else open(src, "rb")
    except OSError:
        return error                                       # unreadable: FFmpeg's own reason stands
    with f:
        end, pos = f.seek(0, io.SEEK_END), 0
        while pos + 8 <= end:
            f.seek(pos)
            head = f.read(16)
            size, box = int.from_bytes(head[:4], "big"), head[4:8]
            if pos == 0 and box != b"ftyp":
                return error
            if size == 1 and len(head) == 16:
                size = int.from_bytes(head[8:16], "big")   # 64-bit size
            if size < 8:
                return error                               # 0: runs to the end; < 8: no box structure
            if pos + size > end:
                return VideoError(f"corrupt or truncated: {_source_name(src)} ends inside its "
                                  f"{box.decode('latin-1')!r} box ({end - pos} of {size} bytes): an "
                                  "interrupted download or copy")
            pos += size
    return error


def _native_fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def probe(src: str | Path | bytes) -> dict[str, Any]:
    """Container facts without decoding pixels: ``dict(frames, fps, width, height, duration, codec)``.

    ``frames`` comes from the container header when it has it, otherwise from counting the video
    packets (demuxing only). ``duration`` is in seconds, the video stream's own: measured from the
    packets' timestamps when they are counted (Matroska/WebM, MPEG-PS: their headers have no count
    and no or a rough duration), else from the header. ``width``/``height`` are the stored size,
    before rotation metadata turns the frames upright. A GIF's ``fps`` is its frames over its
    duration (its delays are whole centiseconds: 30 fps alternates 3 and 4; FFmpeg's rate would
    say 33.3 from the first one).
    """
    container, stream = _open(src)
    try:
        fps = _native_fps(stream)
        frames = int(stream.frames or 0)
        span = None
        if frames == 0:
            first = end = None
            try:
                for p in container.demux(stream):
                    if p.size <= 0:
                        continue
                    frames += 1
                    if p.pts is not None:
                        first = p.pts if first is None else min(first, p.pts)
                        end = max(end if end is not None else p.pts, p.pts + (p.duration or 0))
            except _AV_ERRORS as e:
                raise VideoError(f"corrupt or truncated: demuxing {_source_name(src)} failed ({_reason(e)})") from e
            if first is not None and end > first:
                span = float((end - first) * stream.time_base)
        if span is not None:
            duration = span
        elif stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = frames / fps if fps else 0.0
        ctx = stream.codec_context
        if ctx.name == "gif" and frames and duration > 0:   # the header rate is a guess from its first delays
            fps = frames / duration
        return dict(frames=frames, fps=fps, width=int(ctx.width), height=int(ctx.height),
                    duration=duration, codec=ctx.name)
    finally:
        container.close()


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
SEEK_GAP_S = 2.0  # read_clips seeks ahead when the next window starts this many seconds past the last decoded frame


def _rotate_tag(stream: Any) -> int:
    """Degrees counterclockwise from a ``rotate`` stream tag (older muxers/demuxers; the tag counts
    clockwise degrees, e.g. ``90`` for a phone held upright); 0 without one."""
    for key, value in stream.metadata.items():
        if key.lower() == "rotate":
            try:
                return -round(float(value))
            except ValueError:
                return 0
    return 0


class _Decoded:
    """One decoded source frame; converted to an upright RGB array only if it is picked (once).

    Upright: the frame's display matrix (``VideoFrame.rotation``, degrees counterclockwise, e.g.
    -90 for a phone video shot upright; FFmpeg attaches the stream's matrix to every frame), or else
    the stream's ``rotate`` tag, is applied in quarter turns (flips in the matrix are ignored).
    The conversion to RGB is swscale's (``VideoFrame.to_ndarray(format="rgb24")``), through the
    reader's one single-threaded converter (see `_Reader`).
    """

    __slots__ = ("time", "_frame", "_rgb", "_tag", "_convert")

    def __init__(self, time: float, frame: Any, tag: int, convert: VideoReformatter) -> None:
        self.time, self._frame, self._rgb, self._tag, self._convert = time, frame, None, tag, convert

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            turns = round((self._frame.rotation or self._tag) / 90) % 4
            rgb = self._convert.reformat(self._frame, format="rgb24", threads=1).to_ndarray()  # (h, w, 3)
            self._rgb = np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
            self._frame = None
        return self._rgb


class _Reader:
    """The frames of a video stream in presentation order, ``time`` in seconds from the first frame.

    ``seek(t)`` (only with ``seekable=True``) jumps to the keyframe at or before ``t`` so that the
    next frames cover ``t`` again; frames up to the last one already returned are never returned
    twice. A demuxer that lands past ``t`` (imprecise seeking) makes the reader reopen the video and
    decode on from the start, without seeking again: seeking never changes which frames come out.
    A decoding error ends the stream early and is kept in ``error``.

    Its frames are converted to RGB by one swscale context on one thread (``convert``): a frame's
    own ``to_ndarray(format=...)`` sets up a new context per frame, with as many threads as the
    machine has cores (FFmpeg's default), which cost more than the conversion of a small frame
    (~1.4 ms against 0.03 ms per 256x256 frame on 2 cores; more on many). The pixels are the same.
    """

    def __init__(self, src: str | Path | bytes, seekable: bool = False) -> None:
        self.src, self.name = src, _source_name(src)
        self.container, self.stream = _open(src)
        self.native = _native_fps(self.stream)
        self.tag = _rotate_tag(self.stream)
        self.n = 0                          # frames decoded
        self.seeks = 0                      # successful seeks
        self.t0: float | None = None        # absolute time of the first frame
        self.last: float | None = None      # time of the last frame returned
        self.seekable = seekable and self.native is not None
        self._skip_to: float | None = None  # after a seek: drop frames up to here (already returned)
        self.error: VideoError | None = None
        self._ahead: _Decoded | None = None
        self.pts: list[int] | None = []     # the first packets' timestamps (`timing`); None after a seek
        self._packets = self.container.demux(self.stream)
        self._frames = self._decoded()
        self.convert = VideoReformatter()

    def close(self) -> None:
        self._frames.close()
        self.container.close()

    def _decoded(self) -> Iterator[Any]:
        """``container.decode(stream)``, its packets' timestamps noted on the way (`timing`)."""
        for packet in self._packets:
            self._note(packet)
            yield from packet.decode()

    def _note(self, packet: Any) -> None:
        if self.pts is not None and len(self.pts) < VFR_PACKETS and packet.size > 0 and packet.pts is not None:
            self.pts.append(packet.pts)

    def timing(self) -> tuple[float | None, bool]:
        """`frame_timing` of the video, from the packets demuxed so far and the next ones (demuxed,
        not decoded) instead of opening the video again; after a seek or an error, `frame_timing`."""
        if self.pts is None or self.error is not None:
            return frame_timing(self.src)
        try:
            while len(self.pts) < VFR_PACKETS:
                packet = next(self._packets, None)
                if packet is None:
                    break
                self._note(packet)
        except _AV_ERRORS:
            return frame_timing(self.src)
        return _source_rate(self.src, self.stream), _variable_rate(self.pts)

    def _decode(self) -> _Decoded | None:
        try:
            frame = next(self._frames, None)
        except _AV_ERRORS as e:
            raise VideoError(f"corrupt or truncated: decoding {self.name} failed after {self.n} frames "
                             f"({_reason(e)})") from e
        if frame is None:
            return None
        if frame.time is None:
            self.seekable = False           # no timestamps: times are counted, seeking would lose count
            t = self.n / self.native if self.native else float(self.n)
        else:
            t = frame.time
        self.t0 = t if self.t0 is None else self.t0
        self.n += 1
        return _Decoded(t - self.t0, frame, self.tag, self.convert)

    def next(self) -> _Decoded | None:
        """The next frame, None at the end of the stream (or after a decoding error)."""
        cur, self._ahead = self._ahead, None
        while True:
            try:
                cur = cur or self._decode()
            except VideoError as e:
                self.error, cur = e, None
            if cur is None or self._skip_to is None or cur.time > self._skip_to + 1e-9:
                break
            cur = None
        self._skip_to = None
        if cur is not None:
            self.last = cur.time
        return cur

    def seek(self, t: float) -> None:
        """Continue from the keyframe at or before ``t`` (seconds from the first frame), if allowed."""
        if not self.seekable or self.t0 is None or self.last is None:
            return
        self._frames.close()
        self.pts = None
        try:
            self.container.seek(math.floor((t + self.t0) / float(self.stream.time_base)), stream=self.stream)
            self._packets = self.container.demux(self.stream)
            self._frames = self._decoded()
            landed = self._decode()
        except (*_AV_ERRORS, VideoError):
            landed = None           # the reopened reader below meets a real decoding error again
        if landed is not None and landed.time <= t + 1e-9:
            self.seeks += 1
            self._ahead, self._skip_to = landed, self.last
            return
        self.container.close()          # landed past t (or failed): decode from the start instead
        self.container, self.stream = _open(self.src)
        self._packets = self.container.demux(self.stream)
        self._frames = self._decoded()
        self.seekable, self.n, self.t0, self._skip_to = False, 0, None, self.last

    def frames_seen(self) -> int:
        """Frames up to the last one returned (counted, or from its time after a seek)."""
        if self.seeks and self.native and self.last is not None:
            return round(self.last * self.native) + 1
        return self.n


def _pick_nearest(reader: _Reader, targets: list[float]) -> list[_Decoded]:
    """For increasing ``targets`` (seconds), the source frame whose time is nearest to each (ties go
    to the earlier frame); fewer than ``targets`` when the video ends first."""
    chosen: list[_Decoded] = []
    prev: _Decoded | None = None
    while len(chosen) < len(targets):
        if reader.last is not None and targets[len(chosen)] - reader.last > SEEK_GAP_S:
            reader.seek(targets[len(chosen)])
        cur = reader.next()
        if cur is None:
            break
        while len(chosen) < len(targets) and targets[len(chosen)] <= cur.time + 1e-9:
            target = targets[len(chosen)]
            # the nearer of (prev, cur); ties go to the earlier frame
            near_prev = prev is not None and target - prev.time <= cur.time - target + 1e-9
            chosen.append(prev if near_prev else cur)
        prev = cur
    if prev is not None and len(chosen) < len(targets) and reader.error is None:
        # targets just past the last frame are still nearest to it (within half a source frame)
        half = 0.5 / reader.native if reader.native else (0.5 * prev.time / (reader.n - 1) if reader.n > 1 else 0.0)
        while len(chosen) < len(targets) and targets[len(chosen)] - prev.time <= half + 1e-9:
            chosen.append(prev)
    return chosen


def _pick_consecutive(reader: _Reader, starts: list[float], frames: int) -> list[list[_Decoded]]:
    """Native rate: for increasing ``starts`` (seconds), ``frames`` consecutive source frames from
    the one nearest to each start; a window the video ends inside comes back short."""
    half = 0.5 / reader.native if reader.native else 0.0       # half a source frame, in seconds
    windows: list[list[_Decoded]] = [[] for _ in starts]
    opened, done = 0, 0             # windows that found their first frame / that are complete
    while done < len(starts):
        if opened == done and reader.last is not None and starts[opened] - half - reader.last > SEEK_GAP_S:
            reader.seek(starts[opened] - half)
        cur = reader.next()
        if cur is None:
            break
        while opened < len(starts) and cur.time >= starts[opened] - half - 1e-9:
            opened += 1
        for w in windows[done:opened]:
            w.append(cur)
        while done < opened and len(windows[done]) == frames:
            done += 1
    return windows


def _zero_frames(reader: _Reader) -> VideoError:
    return _cut_short(reader.src, VideoError(f"zero frames: {reader.name} has a video stream but no decodable frame"))


def _failure(reader: _Reader, frames: int, fps: float | None, start: float) -> VideoError:
    """Why a window came back short: a decoding error, no frame at all, or the video ends first."""
    if reader.error is not None:
        return reader.error
    if reader.n == 0:
        return _zero_frames(reader)
    rate = f"{reader.native:g}" if reader.native else "unknown"
    need = f"need {frames}" + (f" frames at {fps:g} fps" if fps is not None else " frames")
    if start:
        need += f" from t={start:g}s"
    return VideoError(f"too short: has {reader.frames_seen()} frames at {rate} fps, {need}")


def resize_center_crop(video: Tensor, height: int, width: int) -> Tensor:
    """Resize ``(T, C, h, w)`` float frames (or uint8 ones: torch's 8-bit kernel), aspect kept, to
    cover ``height x width``; center-crop.

    Downscaling is antialiased (bilinear with an area-aware kernel).
    """
    h, w = video.shape[-2:]
    nh, nw = _cover_size(h, w, height, width)
    if (nh, nw) != (h, w):
        video = F.interpolate(video, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[..., top:top + height, left:left + width]


def _cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The size ``h x w`` frames are resized to (aspect kept) before the center crop to ``height x
    width``; ``(h, w)`` itself when the crop alone does it (a video already at the short side)."""
    scale = max(height / h, width / w)
    return max(height, round(h * scale)), max(width, round(w * scale))


def _unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 values -> float32 in [-1, 1]: the float ops of every clip."""
    out = frames.astype(np.float32)
    out /= 127.5
    out -= 1.0
    return out


# each uint8 value's float32 through `_unit_range`, for `uint8_to_float` on an accelerator
UINT8_VALUES = torch.from_numpy(_unit_range(np.arange(256, dtype=np.uint8)))


def uint8_to_float(clip: Tensor, values: Tensor) -> Tensor:
    """A uint8 clip of ``read_clips_timed(uint8=True)`` -> the float32 clip in [-1, 1] it stands for,
    bit for bit, on the clip's device (``values``: `UINT8_VALUES` on that device); a float32 clip as it is.

    On the CPU the decoder's own ops (numpy: several times faster there than torch's); elsewhere a
    lookup of their values, not the ops again: CUDA divides a tensor by a Python number as a product
    with its reciprocal (a different float for many of the 256 values)."""
    if clip.dtype != torch.uint8:
        return clip
    if clip.device.type == "cpu":
        return torch.from_numpy(_unit_range(clip.numpy()))
    return values[clip.int()]


def _to_clip(picked: list[np.ndarray], height: int, width: int, uint8: bool = False) -> Tensor:
    """RGB uint8 frames ``(h, w, 3)`` -> a ``(3, T, H, W)`` float32 clip in [-1, 1]; with ``uint8``
    the clip's uint8 pixels (`uint8_to_float` makes them the float32 clip, bit for bit). Frames
    already at ``height x width``, or a center crop away from it (a video stored at the short side),
    are cropped alone; others are resized one at a time (a stream may change resolution midway) by
    `resize_center_crop` on their uint8 pixels (channels-last, as decoded: torch's 8-bit kernel)."""
    sizes = {f.shape[:2] for f in picked}
    (h, w) = next(iter(sizes))
    if len(sizes) == 1 and _cover_size(h, w, height, width) == (h, w):  # no resize: the crop alone
        top, left = (h - height) // 2, (w - width) // 2   # the crop `resize_center_crop` takes
        frames = np.stack([f[top:top + height, left:left + width] for f in picked]).transpose(3, 0, 1, 2)
    else:
        frames = np.stack([resize_center_crop(torch.from_numpy(f).permute(2, 0, 1)[None], height, width)[0].numpy()
                           for f in picked], axis=1)                       # (3, T, H, W) uint8
    return torch.from_numpy(frames if uint8 else _unit_range(frames))      # (3, T, H, W)


def _check_size(frames: int, height: int, width: int, fps: float | None) -> None:
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"frames, height and width must be >= 1, got {frames}, {height}, {width}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")


def upright_size(src: str | Path | bytes) -> tuple[int, int]:
    """``(height, width)`` of the frames as shown, rotation metadata applied (a phone video held
    upright is taller than wide; `probe` gives the stored size). Decodes the first frame only."""
    reader = _Reader(src)
    try:
        first = reader.next()
        if first is None:
            raise reader.error or VideoError(f"no frame in {reader.name}")
        h, w = first.rgb().shape[:2]
        return int(h), int(w)
    finally:
        reader.close()


def read_video(src: str | Path | bytes, frames: int, height: int, width: int, fps: float | None = None,
               start: float = 0.0, uint8: bool = False) -> Tensor:
    """Decode a clip of ``frames`` frames at ``fps`` (None: native rate) from ``start`` seconds.

    Frames are decoded lazily and turned upright (display matrix / ``rotate`` tag). Returns a
    ``(3, T, H, W)`` float32 tensor in [-1, 1] (``uint8=True``: its uint8 pixels, which
    `uint8_to_float` turns into that tensor bit for bit). Raises `VideoError` (see module doc).
    """
    _check_size(frames, height, width, fps)
    if start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    reader = _Reader(src)
    try:
        if fps is not None:
            picked = _pick_nearest(reader, [start + i / fps for i in range(frames)])
        else:
            picked = _pick_consecutive(reader, [start], frames)[0]
        if len(picked) < frames:
            raise _failure(reader, frames, fps, start)
        return _to_clip([p.rgb() for p in picked], height, width, uint8)
    finally:
        reader.close()


def read_clips(src: str | Path | bytes, frames: int, height: int, width: int, fps: float | None = None,
               starts: Sequence[int] = (0,)) -> list[Tensor | VideoError]:
    """Several windows of one video in one decoding pass: window ``k`` is the clip ``read_video``
    gives from output frame ``starts[k]`` (at ``fps``, or the native rate: ``start = starts[k] / fps``
    seconds), so ``starts=[0]`` is exactly ``read_video``'s first clip.

    ``starts`` must increase; windows may overlap (shared frames are decoded once). Across a gap of
    more than ``SEEK_GAP_S`` seconds the reader seeks to the keyframe before the next window where
    the container allows it (the frames are the same either way). Returns one ``(3, T, H, W)``
    tensor per window, or the `VideoError` of a window the video cannot give (too short, corrupt
    past that point); raises `VideoError` when the video cannot be read at all.
    """
    return _read_clips(src, frames, height, width, fps, starts)[0]


def read_clips_timed(src: str | Path | bytes, frames: int, height: int, width: int, fps: float | None = None,
                     starts: Sequence[int] = (0,), uint8: bool = False
                     ) -> tuple[list[Tensor | VideoError], tuple[float | None, bool]]:
    """`read_clips` and the video's `frame_timing`, from one opening of the video: the packets the
    decoding demuxed give the timing (``ldm extract`` records it with every clip). ``uint8=True``
    (``ldm extract``'s loader: a quarter of the bytes to the main process and the device) gives each
    clip as its uint8 pixels, ``(3, T, H, W)`` torch.uint8, which `uint8_to_float` turns into the
    float32 clip bit for bit."""
    return _read_clips(src, frames, height, width, fps, starts, timing=True, uint8=uint8)


def _read_clips(src: str | Path | bytes, frames: int, height: int, width: int, fps: float | None,
                starts: Sequence[int], timing: bool = False, uint8: bool = False
                ) -> tuple[list[Tensor | VideoError], Any]:
    _check_size(frames, height, width, fps)
    starts = [int(s) for s in starts]
    if not starts or starts[0] < 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"starts must be increasing output frame indices >= 0, got {starts}")
    reader = _Reader(src, seekable=True)
    try:
        if fps is not None:
            wanted = sorted({(s + i) / fps for s in starts for i in range(frames)})
            at = dict(zip(wanted, _pick_nearest(reader, wanted)))
            windows = [[at[(s + i) / fps] for i in range(frames) if (s + i) / fps in at] for s in starts]
        else:
            if reader.native is None and starts != [0]:
                raise VideoError(f"unknown frame rate: cannot place windows after the first in {reader.name}")
            windows = _pick_consecutive(reader, [s / reader.native if s else 0.0 for s in starts], frames)
        clips = [_to_clip([p.rgb() for p in w], height, width, uint8) if len(w) == frames
                 else _failure(reader, frames, fps, s / (fps or reader.native or 1.0)) for s, w in zip(starts, windows)]
        return clips, (reader.timing() if timing else None)
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------
# windows: several clips per video
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    """Which windows of ``frames`` output frames (at the chosen fps) a video gives as clips.

    - ``clips_per_video=K >= 1`` (default 1): K evenly spaced windows, the first at frame 0 and the
      last ending with the video (rounded to whole frames). K=1 is the first frames only. A video
      with fewer than K window positions gives one clip per position.
    - ``clips_per_video=0``: every window that fits, one starting every ``stride`` output frames
      (default ``frames``: back to back without overlap; a smaller stride overlaps, a larger one
      leaves gaps).

    A ``stride`` with ``K >= 1`` is contradictory (K spaces its windows evenly) and rejected;
    `from_flags` reads the CLI, where ``--clip-stride S`` alone means ``K=0``.
    """

    clips_per_video: int = 1
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.clips_per_video < 0:
            raise ValueError(f"clips per video must be >= 0 (0 = every window that fits), got {self.clips_per_video}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"clip stride must be >= 1 output frame, got {self.stride}")
        if self.stride is not None and self.clips_per_video >= 1:
            raise ValueError(f"--clips-per-video {self.clips_per_video} spaces its windows evenly, --clip-stride "
                             f"{self.stride} fixes their spacing: give one of them (--clip-stride S alone, or "
                             "with --clips-per-video 0, takes every window that fits, S frames apart)")

    @classmethod
    def from_flags(cls, clips_per_video: int | None, stride: int | None) -> "Windows":
        """``--clips-per-video`` / ``--clip-stride`` as given (None = not given); `UserError` when
        they are out of range or contradict each other."""
        if clips_per_video is None:
            clips_per_video = 0 if stride is not None else 1
        with checking():
            return cls(clips_per_video, stride)

    @property
    def first_only(self) -> bool:
        """One clip per video, its first frames: nothing to plan (no probing)."""
        return self.clips_per_video == 1

    def starts(self, length: int, frames: int) -> list[int]:
        """First output frame of each window of a video offering ``length`` output frames."""
        if length < frames:
            return []
        last = length - frames                              # the last start that fits
        k = self.clips_per_video
        if k == 0:
            return list(range(0, last + 1, self.stride or frames))
        if k == 1:
            return [0]
        # c * last / (k - 1) rounded half up, in integers; duplicates (short videos) dropped
        return sorted({(2 * c * last + k - 1) // (2 * (k - 1)) for c in range(k)})


class Window(NamedTuple):
    """One window of a video: its place among the video's windows, first output frame, start time."""
    clip: int
    start: int
    start_s: float


def output_frames(source_frames: int, native: float | None, fps: float | None, duration: float | None = None) -> int:
    """Output frames a video of ``source_frames`` frames at ``native`` fps offers at ``fps`` (None:
    the native rate): output frame ``i`` (time ``i / fps``) must lie within half a source frame of
    the last frame, as in `read_video`. With ``duration`` (seconds, `probe`'s) a variable-rate video
    counts as long as it plays (its header rate is often only its fastest), else the header's
    constant rate is assumed."""
    if fps is None or not native:
        return source_frames
    if duration:
        source_frames = max(source_frames, round(duration * native, 6))
    return math.floor((source_frames - 0.5) * fps / native + 1e-9) + 1 if source_frames else 0


def plan_windows(src: str | Path | bytes, frames: int, fps: float | None, windows: Windows) -> list[Window]:
    """The windows of one video (from its header: `probe`, no decoding); VideoError when it cannot
    be read or not even one window fits (``"too short: ..."``)."""
    info = probe(src)
    if info["frames"] == 0:
        raise _cut_short(src, VideoError(f"zero frames: {_source_name(src)} has a video stream but no frame"))
    rate = fps if fps is not None else info["fps"]
    starts = windows.starts(output_frames(info["frames"], info["fps"], fps, info["duration"]), frames)
    if not starts:
        native = f"{info['fps']:g}" if info["fps"] else "unknown"
        at = f" frames at {fps:g} fps" if fps is not None else " frames"
        raise VideoError(f"too short: has {info['frames']} frames at {native} fps, need {frames}{at}")
    if not rate:
        starts = starts[:1]     # without a frame rate only the first window can be placed
    return [Window(k, s, s / rate if s else 0.0) for k, s in enumerate(starts)]


def check_video(src: str | Path | bytes) -> dict[str, Any]:
    """Decode every frame of a video (no pixel conversion) and return its `probe` facts plus
    ``decoded``, the frames that came out. VideoError (the reasons of the module doc) when it cannot
    be opened, a frame fails to decode, or fewer frames decode than its header announces (a file
    cut short after its index), or it plays clearly shorter than the duration its header gives its
    video track (Matroska / WebM, which keep no frame count: a download cut short).
    ``ldm data list --check`` runs this on every input."""
    info = probe(src)
    reader = _Reader(src)
    try:
        announced = _track_duration(reader.stream)
        while reader.next() is not None:
            pass
    finally:
        reader.close()
    if reader.error is not None:
        raise reader.error
    if reader.n == 0:
        raise _zero_frames(reader)
    if reader.n < info["frames"]:
        raise VideoError(f"corrupt or truncated: {reader.name} decodes {reader.n} of the {info['frames']} frames "
                         "its header announces")
    plays = reader.last + (1 / reader.native if reader.native else 0.0)
    if announced is not None and plays < announced - max(0.5, 0.05 * announced):
        raise VideoError(f"corrupt or truncated: {reader.name} plays {plays:.2f} s of the {announced:.2f} s its "
                         "header announces")
    return {**info, "decoded": reader.n}


VFR_PACKETS = 64  # frame_timing looks at the timestamps of this many frames from the start


def frame_timing(src: str | Path | bytes, packets: int = VFR_PACKETS) -> tuple[float | None, bool]:
    """``(native frame rate, variable)`` from the container alone (demuxing, no decoding): the rate as
    `probe` gives it (`_source_rate`), and whether the first ``packets`` frames are unevenly spaced
    (`_variable_rate`). A video whose packets cannot be read counts as constant."""
    container, stream = _open(src)
    try:
        rate, pts = _source_rate(src, stream), []
        try:
            for p in container.demux(stream):
                if p.size > 0 and p.pts is not None:
                    pts.append(p.pts)
                if len(pts) == packets:
                    break
        except _AV_ERRORS:
            return rate, False
    finally:
        container.close()
    return rate, _variable_rate(pts)


def _source_rate(src: str | Path | bytes, stream: Any) -> float | None:
    """A video's native frame rate as `probe` gives it: the header's, but a GIF's from its frames
    and duration (`probe` reads them)."""
    if stream.codec_context.name != "gif":
        return _native_fps(stream)
    try:
        return probe(src)["fps"]
    except VideoError:
        return _native_fps(stream)


def _variable_rate(pts: list[int]) -> bool:
    """Whether the gaps between these frame timestamps differ by more than 10 % (plus one tick of
    rounding) of their median: a variable frame rate (phone / screen recordings), whose frames read
    at the native rate are not evenly spaced in time. Without timestamps: constant."""
    pts = sorted(pts)  # decode order -> presentation order (B-frames)
    steps = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    if not steps:
        return False
    mid = sorted(steps)[len(steps) // 2]
    return any(abs(step - mid) > 0.1 * mid + 1 for step in steps)


def _track_duration(stream: Any) -> float | None:
    """Seconds from a video track's ``DURATION`` tag (``00:01:02.500000000``, Matroska / WebM muxers
    write it per track), None without one."""
    value = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    try:
        h, m, sec = str(value).split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return None


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
    """GIF with FFmpeg's encoder, one adaptive 256-colour palette per frame (Pillow's median cut).

    Every frame is kept, repeated ones too (Pillow's own GIF writer merges identical consecutive
    frames into one longer frame, so a still or paused clip lost frames). GIF delays are whole
    centiseconds: frame ``i`` starts at ``round(100 * i / fps)``, so delays alternate (12, 13, ...
    at 8 fps) and no drift builds up over a long clip. A GIF plays at most 100 fps: a faster video's
    frames all last 1 cs (it plays slower; its MP4 keeps the rate)."""
    t, h, w, _ = frames.shape
    cs = Fraction(1, 100)
    starts = [round(100 * i / min(fps, 100)) for i in range(t + 1)]    # centiseconds; 1 at most 100 fps
    delay = {a: b - a for a, b in zip(starts, starts[1:])}       # frame start -> its delay
    palette = np.full((256, 4), 255, dtype=np.uint8)             # ARGB, opaque
    with av.open(target, mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "pal8"
        stream.codec_context.time_base = cs
        # whole frames: FFmpeg's inter-frame optimisations compare palette indices, not colours, so with
        # a palette per frame a frame whose indices match the last one's was dropped for it
        stream.options = {"gifflags": "0"}
        for i in range(t):
            image = Image.fromarray(frames[i]).convert("P", palette=Image.Palette.ADAPTIVE)
            colors = np.frombuffer(bytes(image.getpalette() or []), dtype=np.uint8).reshape(-1, 3)
            palette[:, 1:] = 0
            palette[: len(colors), 1:] = colors
            frame = av.VideoFrame.from_ndarray((np.asarray(image), palette), format="pal8")
            frame.pts, frame.time_base = starts[i], cs
            _mux_timed(container, stream.encode(frame), delay)
        _mux_timed(container, stream.encode(None), delay)


def _mux_timed(container: Any, packets: list, delay: dict[int, int]) -> None:
    for packet in packets:
        packet.duration = delay[packet.pts]   # the last frame's delay too (FFmpeg would guess it)
        container.mux(packet)


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
