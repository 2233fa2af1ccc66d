"""data.video: decode/encode round trips, timestamp resampling, resize + crop, every VideoError,
several windows per video (positions, one decoding pass with seeking), rotation metadata."""
from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

import data.video as video_mod
from data.video import (VideoError, Window, Windows, encode_video, frame_timing, output_frames, plan_windows, probe,
                        read_clips, read_clips_timed, read_video, resize_center_crop, upright_size, video_to_uint8,
                        write_frames, write_video)

STEP = 10  # frame i is filled with gray level i * STEP, so decoded pixels say which frame came back


def indexed_frames(n: int, height: int = 32, width: int = 48) -> np.ndarray:
    frames = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = i * STEP
    return frames


def frame_indices(video: torch.Tensor) -> list[int]:
    gray = (video.mean(dim=(0, 2, 3)) + 1) * 127.5   # (T,)
    return [round(float(g) / STEP) for g in gray]


@pytest.fixture(scope="module")
def clip12(tmp_path_factory) -> str:
    """24 frames at 12 fps (2 s), frame index drawn in the pixels."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_frames(path, indexed_frames(24), fps=12)
    return str(path)


def test_mp4_round_trip_native_rate(clip12):
    v = read_video(clip12, 24, 32, 48)
    assert v.shape == (3, 24, 32, 48) and v.dtype == torch.float32
    assert -1.0 <= float(v.min()) and float(v.max()) <= 1.0
    assert frame_indices(v) == list(range(24))


@pytest.mark.parametrize("fps, expected", [
    (6, [0, 2, 4, 6, 8, 10, 12, 14]),     # downsample x2
    (5, [0, 2, 5, 7, 10, 12]),            # non-integer ratio: nearest of k/12 to i/5
    (24, [0, 0, 1, 1, 2, 2, 3, 3]),       # upsample: repeats (ties go to the earlier frame)
])
def test_fps_resampling_picks_nearest_frames(clip12, fps, expected):
    assert frame_indices(read_video(clip12, len(expected), 32, 48, fps=fps)) == expected


def test_start_offset(clip12):
    assert frame_indices(read_video(clip12, 4, 32, 48, start=1.0)) == [12, 13, 14, 15]
    assert frame_indices(read_video(clip12, 3, 32, 48, fps=4, start=0.5)) == [6, 9, 12]


def test_bytes_input_equals_path_input(clip12):
    with open(clip12, "rb") as f:
        data = f.read()
    assert torch.equal(read_video(data, 8, 16, 16, fps=6), read_video(clip12, 8, 16, 16, fps=6))


def test_gif_round_trip(tmp_path):
    path = tmp_path / "clip.gif"
    write_frames(path, indexed_frames(12), fps=10)  # GIF delays are centiseconds: 10 fps is exact
    info = probe(path)
    assert info["codec"] == "gif" and info["frames"] == 12 and info["fps"] == pytest.approx(10)
    assert frame_indices(read_video(path, 12, 32, 48)) == list(range(12))
    assert frame_indices(read_video(path, 6, 32, 48, fps=5)) == [0, 2, 4, 6, 8, 10]


def test_frame_timing_gives_a_gifs_rate_as_probe_does(tmp_path):
    """One GIF rate, its frames over its duration (was: frame_timing had its own, from the gaps
    between the first frames: 30.4 fps where probe says 29.6 for 8 frames at 30 fps, 27 cs)."""
    path = tmp_path / "clip.gif"
    write_frames(path, indexed_frames(8), fps=30)                  # delays 3, 4, 3, 3, 4, 3, 3, 4 cs
    assert frame_timing(path) == (probe(path)["fps"], False)
    assert probe(path)["fps"] == pytest.approx(8 / 0.27)


def test_write_video_float_round_trip(tmp_path):
    t = torch.linspace(-0.8, 0.8, 8)
    y = torch.linspace(-1, 1, 32)[:, None]
    x = torch.linspace(-1, 1, 48)[None, :]
    video = torch.stack([(0.5 * (x + y) + s).clamp(-1, 1) for s in t])                 # (T, H, W)
    video = torch.stack([video, video.flip(-1), -video]).mul(0.9)                      # (3, T, H, W)
    write_video(tmp_path / "v.mp4", video, fps=8)
    back = read_video(tmp_path / "v.mp4", 8, 32, 48)
    assert (back - video).abs().mean() < 0.03
    assert video_to_uint8(video).shape == (8, 32, 48, 3) and video_to_uint8(video).dtype == torch.uint8


def test_probe(clip12):
    info = probe(clip12)
    assert info == dict(frames=24, fps=12.0, width=48, height=32, duration=pytest.approx(2.0), codec="h264")


def test_resize_keeps_aspect_and_center_crops(tmp_path):
    frames = np.zeros((4, 40, 120, 3), np.uint8)
    frames[:, :, :60] = 255                       # left half white, right half black
    write_frames(tmp_path / "wide.mp4", frames, fps=8)
    v = read_video(tmp_path / "wide.mp4", 4, 20, 20)   # 40x120 -> 20x60 -> center 20 columns
    assert v.shape == (3, 4, 20, 20)
    assert float(v[..., :9].mean()) > 0.9 and float(v[..., 11:].mean()) < -0.9
    tall = resize_center_crop(torch.rand(2, 3, 50, 10), 16, 8)   # upscaling + crop
    assert tall.shape == (2, 3, 16, 8)


def test_encode_video_bytes_decode():
    data = encode_video(indexed_frames(6), fps=6)
    assert data[4:8] == b"ftyp"
    assert frame_indices(read_video(data, 6, 32, 48)) == list(range(6))
    assert encode_video(indexed_frames(3), fps=6, format="gif")[:3] == b"GIF"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty file"):
        read_video(tmp_path / "empty.mp4", 4, 16, 16)
    with pytest.raises(VideoError, match="empty file"):
        read_video(b"", 4, 16, 16)


def test_text_file_named_mp4(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 20)
    with pytest.raises(VideoError, match=r"^not a readable video: \S*notes.mp4 \(Invalid data found when processing input\)$"):
        read_video(tmp_path / "notes.mp4", 4, 16, 16)


def test_unreadable_file_keeps_ffmpegs_reason(tmp_path, monkeypatch):
    """A file Python may not open (permissions) while looking for an MP4 cut short: FFmpeg's reason
    stands (was: a PermissionError traceback out of the check)."""
    (tmp_path / "notes.mp4").write_text("not a video")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(video_mod, "open", refuse, raising=False)
    with pytest.raises(VideoError, match="not a readable video"):
        read_video(tmp_path / "notes.mp4", 4, 16, 16)


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="file not found"):
        read_video(tmp_path / "nope.mp4", 4, 16, 16)


def test_truncated_mp4(clip12, tmp_path):
    """An MP4 with its index (``moov``) last, cut short anywhere (an interrupted download): the
    reason says so, as a file or as bytes (was: "not a readable video (Invalid data ...)" or "no
    video stream (streams: data)", as for a file that is no video at all)."""
    data = Path(clip12).read_bytes()
    for cut in (len(data) // 3, len(data) - 100):   # inside the frames ('mdat'), inside the index
        (tmp_path / "cut.mp4").write_bytes(data[:cut])
        for src in (tmp_path / "cut.mp4", data[:cut]):
            with pytest.raises(VideoError, match=r"corrupt or truncated: .* ends inside its '(mdat|moov)' box"):
                read_video(src, 8, 16, 16)


def test_truncated_stream_is_read_lazily(tmp_path):
    """Matroska keeps its header in front: a cut file still gives its first frames, because
    decoding stops once enough frames are read; asking for all frames is a clear error."""
    frames = (np.random.default_rng(0).random((40, 32, 32, 3)) * 255).astype(np.uint8)
    write_frames(tmp_path / "full.mkv", frames, fps=10)
    data = (tmp_path / "full.mkv").read_bytes()
    cut = data[: int(len(data) * 0.6)]
    assert read_video(cut, 4, 32, 32).shape == (3, 4, 32, 32)
    with pytest.raises(VideoError, match="too short|corrupt"):
        read_video(cut, 40, 32, 32)


def test_too_short(clip12):
    with pytest.raises(VideoError, match=r"too short: has 24 frames at 12 fps, need 13 frames at 6 fps"):
        read_video(clip12, 13, 16, 16, fps=6)
    with pytest.raises(VideoError, match=r"too short: has 24 frames at 12 fps, need 25"):
        read_video(clip12, 25, 16, 16)
    with pytest.raises(VideoError, match="too short"):
        read_video(clip12, 2, 16, 16, start=3.0)


def test_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(800) / 5) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    with pytest.raises(VideoError, match="no video stream"):
        read_video(path, 4, 16, 16)


def test_zero_frames(tmp_path):
    path = tmp_path / "empty.avi"   # AVI writes its header (with the video stream) up front
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=Fraction(8))
        s.width, s.height, s.pix_fmt = 32, 32, "yuvj420p"
        c.start_encoding()
    with pytest.raises(VideoError, match="zero frames"):
        read_video(path, 4, 16, 16)
    with pytest.raises(VideoError, match="zero frames"):          # was: "too short: has 0 frames"
        plan_windows(path, 4, None, Windows(2))


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_frames(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="suffix"):
        write_frames(tmp_path / "x.avi2", np.zeros((2, 32, 32, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_frames(tmp_path / "x.mp4", np.zeros((2, 32, 32, 3), np.float32), fps=8)
    write_frames(tmp_path / "odd.gif", np.zeros((2, 31, 33, 3), np.uint8), fps=8)   # GIF takes any size
    assert not list(tmp_path.glob(".*partial*"))


def test_read_video_rejects_bad_arguments(clip12):
    with pytest.raises(ValueError):
        read_video(clip12, 0, 16, 16)
    with pytest.raises(ValueError):
        read_video(clip12, 4, 16, 16, fps=0)
    with pytest.raises(ValueError):
        read_video(io.BytesIO(b"x").getvalue(), 4, 16, 16, start=-1)


# ---------------------------------------------------------------------------------------------
# several windows per video
# ---------------------------------------------------------------------------------------------
def test_window_positions():
    assert Windows().starts(40, 17) == [0]                                   # K=1: the first frames
    assert Windows(3).starts(40, 17) == [0, 12, 23]                          # first at 0, last ends the video
    assert Windows(2).starts(17, 17) == [0]                                  # one position: one clip
    assert Windows(5).starts(19, 17) == [0, 1, 2]                            # fewer positions than K
    assert Windows(0).starts(40, 8) == [0, 8, 16, 24, 32]                    # K=0: back to back, all that fit
    assert Windows(0).starts(39, 8) == [0, 8, 16, 24]
    assert Windows(0, stride=3).starts(20, 8) == [0, 3, 6, 9, 12]            # overlapping
    assert Windows(0, stride=12).starts(40, 8) == [0, 12, 24]                # gaps
    assert all(Windows(k, s).starts(7, 8) == [] for k, s in [(1, None), (3, None), (0, None), (0, 2)])
    assert Windows.from_flags(None, None) == Windows(1) and Windows.from_flags(None, 4) == Windows(0, 4)
    assert Windows.from_flags(0, 4) == Windows(0, 4) and Windows.from_flags(3, None) == Windows(3)


@pytest.mark.parametrize("k, stride, match", [
    (2, 4, "give one of them"), (1, 4, "give one of them"), (-1, None, ">= 0"), (0, 0, ">= 1")])
def test_contradictory_window_flags_are_rejected(k, stride, match):
    with pytest.raises(ValueError, match=match):
        Windows.from_flags(k, stride)


def test_output_frames_agrees_with_the_decoder(clip12):
    for fps, frames in [(None, 24), (6, 12), (5, 10), (24, 48), (7, 14)]:
        n = output_frames(24, 12.0, fps)
        assert n == frames
        assert read_video(clip12, n, 16, 16, fps=fps).shape[1] == n
        with pytest.raises(VideoError, match="too short"):
            read_video(clip12, n + 1, 16, 16, fps=fps)


def test_plan_windows(clip12):
    assert plan_windows(clip12, 8, None, Windows(3)) == [Window(0, 0, 0.0), Window(1, 8, 8 / 12), Window(2, 16, 16 / 12)]
    assert [w.start for w in plan_windows(clip12, 4, 6, Windows(0))] == [0, 4, 8]
    assert plan_windows(clip12, 4, 6, Windows(0))[1].start_s == pytest.approx(4 / 6)
    with pytest.raises(VideoError, match=r"too short: has 24 frames at 12 fps, need 13 frames at 6 fps"):
        plan_windows(clip12, 13, 6, Windows(3))


def short_gop_mp4(n: int, fps: int = 12, gop: int = 6, fmt: str = "mp4") -> bytes:
    """``indexed_frames``-style video whose frame i has gray level i % 25 * STEP, a keyframe every ``gop``."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.codec_context.gop_size = gop
        for i in range(n):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((32, 48, 3), i % 25 * STEP, np.uint8), format="rgb24")))
        c.mux(s.encode(None))
    return buf.getvalue()


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    return short_gop_mp4(120)    # 10 s at 12 fps, a keyframe every half second


def _readers(monkeypatch) -> list:
    made = []

    class Spy(video_mod._Reader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(video_mod, "_Reader", Spy)
    return made


@pytest.mark.parametrize("fps, starts", [(None, [0, 37, 75, 112]), (5, [0, 20, 40]), (24, [0, 3, 150, 228]),
                                         (None, [0, 2, 4, 60, 61])])   # overlapping windows
def test_read_clips_decodes_once_and_equals_one_read_per_window(long_clip, monkeypatch, fps, starts):
    made = _readers(monkeypatch)
    clips = read_clips(long_clip, 8, 32, 48, fps, starts)
    assert made[0].seeks >= 1 and made[0].n < 120                  # skipped the gaps, decoded each frame once
    for start, clip in zip(starts, clips):
        ref = read_video(long_clip, 8, 32, 48, fps=fps, start=start / (fps or 12))   # linear decoding
        assert torch.equal(clip, ref), start
    nearest = [math.ceil((starts[1] + i) * 12 / (fps or 12) - 0.5) for i in range(8)]   # ties: the earlier frame
    assert frame_indices(clips[1]) == [i % 25 for i in nearest]


def test_read_clips_first_window_is_read_video(clip12):
    for fps in (None, 5, 24):
        assert torch.equal(read_clips(clip12, 8, 16, 16, fps, [0])[0], read_video(clip12, 8, 16, 16, fps=fps))


def test_read_clips_without_precise_seeking_gives_the_same_frames(monkeypatch):
    """MPEG-TS seeks by byte estimates: the reader notices it landed past the window, reopens and
    decodes on from the start; the frames are the same as reading each window alone."""
    data = short_gop_mp4(120, fmt="mpegts")
    made = _readers(monkeypatch)
    clips = read_clips(data, 6, 32, 48, None, [0, 60, 100])
    assert not made[0].seekable      # gave up seeking after the first try
    for start, clip in zip([0, 60, 100], clips):
        assert torch.equal(clip, read_video(data, 6, 32, 48, start=start / 12))


def test_read_clips_window_past_the_end_fails_alone(long_clip):
    first, last = read_clips(long_clip, 8, 16, 16, None, [0, 115])
    assert first.shape == (3, 8, 16, 16)
    assert isinstance(last, VideoError) and str(last).startswith("too short")
    with pytest.raises(ValueError, match="increasing"):
        read_clips(long_clip, 8, 16, 16, None, [8, 0])
    with pytest.raises(VideoError, match="empty file"):
        read_clips(b"", 8, 16, 16, None, [0])


# ---------------------------------------------------------------------------------------------
# the clip tensors are pinned: a faster decode path must give the same bits as the plain one

def _reference_clip(src: bytes, frames: int, height: int, width: int) -> torch.Tensor:
    """The plain decode: the first ``frames`` frames, each to RGB by its own ``to_ndarray``,
    frames of one size as one uint8 batch resized to cover (antialiased, torch's 8-bit kernel) and
    center-cropped, the clip scaled to [-1, 1] at once."""
    with av.open(io.BytesIO(src)) as c:
        rgb = [f.to_ndarray(format="rgb24") for _, f in zip(range(frames), c.decode(video=0))]
    out = torch.empty(frames, 3, height, width)
    for size in {f.shape for f in rgb}:
        idx = [i for i, f in enumerate(rgb) if f.shape == size]
        x = torch.from_numpy(np.stack([rgb[i] for i in idx])).permute(0, 3, 1, 2)   # (n, 3, h, w) uint8
        h, w = size[:2]
        nh, nw = max(height, round(h * max(height / h, width / w))), max(width, round(w * max(height / h, width / w)))
        if (nh, nw) != (h, w):
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - height) // 2, (nw - width) // 2
        out[idx] = x[..., top:top + height, left:left + width].float()
    return (out / 127.5 - 1.0).permute(1, 0, 2, 3)                                # (3, T, H, W)


def test_decoding_workers_share_the_cores(tmp_path, monkeypatch):
    """A large frame's decoder in one of N DataLoader workers gets ``cores // N`` threads, of the cores
    this process may use (was: one per core in every worker; frame threads decode ahead of a clip that
    stops early; then cores // N of the machine's, not of the job's). Same frames."""
    path = tmp_path / "large.mp4"
    write_frames(path, np.random.default_rng(0).integers(0, 256, (3, 360, 640, 3), dtype=np.uint8), fps=8)

    def threads() -> int:
        container, stream = video_mod._open(path)
        container.close()
        return stream.codec_context.thread_count

    plain = read_video(path, 3, 36, 64)
    assert threads() == 0                                           # the main process: FFmpeg's choice
    monkeypatch.setattr(video_mod, "get_worker_info", lambda: SimpleNamespace(num_workers=4))
    # the cores this process may use (SLURM --cpus-per-task, taskset), not the machine's: 8 of 128 for 4 workers
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(video_mod, "cgroup_cpu_quota", lambda: None)  # the machine's own quota aside
    assert threads() == 2
    assert torch.equal(read_video(path, 3, 36, 64), plain)


def test_usable_cores_read_a_cgroup_cpu_quota_v2_and_v1(tmp_path, monkeypatch):
    """A container limited to CPU time (``docker --cpus``, a Kubernetes limit) sees every core of the
    machine in its affinity; its quota caps the cores (was: 8 workers' decoders on a 2-CPU quota)."""
    own = tmp_path / "cgroup"
    v2 = tmp_path / "fs"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    own.write_text("0::/kubepods/pod1\n")
    assert video_mod.cgroup_cpu_quota(v2, own) is None                    # no cpu.max anywhere
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert video_mod.cgroup_cpu_quota(v2, own) is None                    # "max": no limit
    (v2 / "kubepods" / "cpu.max").write_text("250000 100000\n")       # a parent's limit applies too
    assert video_mod.cgroup_cpu_quota(v2, own) == 2.5
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    assert video_mod.cgroup_cpu_quota(v2, own) == 1.5                     # the lowest along the path
    own.write_text("0::/elsewhere\n")                                  # a container: its own cgroup at the root
    (v2 / "cpu.max").write_text("400000 100000\n")
    assert video_mod.cgroup_cpu_quota(v2, own) == 4.0
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    own.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("-1\n")
    assert video_mod.cgroup_cpu_quota(v1, own) is None                    # -1: no limit
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("300000\n")
    assert video_mod.cgroup_cpu_quota(v1, own) == 3.0
    assert video_mod.cgroup_cpu_quota(v1, tmp_path / "absent") is None   # not Linux / unreadable
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(video_mod, "cgroup_cpu_quota", lambda: 2.5)
    assert video_mod.usable_cores() == 3                                  # rounded up, under the 16 pinned
    monkeypatch.setattr(video_mod, "cgroup_cpu_quota", lambda: 0.2)
    assert video_mod.usable_cores() == 1
    monkeypatch.setattr(video_mod, "cgroup_cpu_quota", lambda: 64.0)
    assert video_mod.usable_cores() == 16                                 # the pinned cores when fewer


def _textured_ts(parts: list[tuple[int, int, int]]) -> bytes:
    """MPEG-TS of random frames whose size changes between parts ``(frames, height, width)``."""
    rng, data, first = np.random.default_rng(0), b"", 0
    for n, h, w in parts:
        buf = io.BytesIO()
        with av.open(buf, "w", format="mpegts") as c:
            s = c.add_stream("libx264", rate=8)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
                frame.pts, frame.time_base = first + i, Fraction(1, 8)
                c.mux(s.encode(frame))
            c.mux(s.encode(None))
        data, first = data + buf.getvalue(), first + n + 8    # the next part starts clearly later
    return data


@pytest.mark.parametrize("kind, frames, height, width", [
    ("mp4", 6, 32, 48),        # the target size: no resize
    ("mp4", 6, 20, 20),        # resized (antialiased) and center-cropped
    ("mp4", 6, 32, 32),        # at the short side: center-cropped alone
    ("gif", 5, 16, 16),        # palette frames
    ("ts", 6, 24, 24),         # the resolution changes midway
])
def test_clips_are_bit_identical_to_the_plain_decode(kind, frames, height, width):
    """Whatever the reader does to be fast (one swscale context for all frames, resizing frame by
    frame), its clips keep the plain decode's bits: at the target size, cropped alone, resized, from palette
    frames, across a resolution change."""
    rng = np.random.default_rng(1)
    textured = rng.integers(0, 256, (6, 32, 48, 3), dtype=np.uint8)
    src = (encode_video(textured, fps=8, format=kind) if kind != "ts"
           else _textured_ts([(3, 32, 48), (3, 40, 40)]))
    clip = read_video(src, frames, height, width)
    assert clip.dtype == torch.float32 and clip.shape == (3, frames, height, width)
    assert torch.equal(clip, _reference_clip(src, frames, height, width))
    assert torch.equal(read_clips(src, frames, height, width, None, [0])[0], clip)


# ---------------------------------------------------------------------------------------------
# rotation metadata (phone videos)
# ---------------------------------------------------------------------------------------------
def portrait() -> np.ndarray:
    """An upright 48x32 (portrait) picture: red top, green bottom left, blue bottom right."""
    img = np.zeros((48, 32, 3), np.uint8)
    img[:24] = (255, 0, 0)
    img[24:, :16] = (0, 255, 0)
    img[24:, 16:] = (0, 0, 255)
    return img


def assert_upright(video: torch.Tensor) -> None:
    x = video_to_uint8(video)[0].float()                           # (48, 32, 3), first frame
    assert x.shape == (48, 32, 3)
    for region, color in [(x[4:20, 4:28], (255, 0, 0)), (x[28:44, 2:12], (0, 255, 0)), (x[28:44, 20:30], (0, 0, 255))]:
        assert (region.mean(dim=(0, 1)) - torch.tensor(color, dtype=torch.float32)).abs().max() < 40, color


def _write_stored(path, stored: np.ndarray, fmt: str, rotation: int | None = None, tag: str | None = None) -> None:
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=Fraction(8))
        s.height, s.width = stored.shape[:2]
        s.pix_fmt = "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)   # display matrix (coded side data), as phones write it
        if tag is not None:
            s.metadata["rotate"] = tag         # the older `rotate` tag (clockwise degrees)
        for _ in range(4):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(stored), format="rgb24")))
        c.mux(s.encode(None))


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_display_matrix_rotation_is_applied(tmp_path, rotation):
    """A phone stores the sensor's picture and a display matrix saying how to turn it (ffprobe:
    "displaymatrix: rotation of -90.00 degrees" for one held upright); PyAV reads it back as
    ``VideoFrame.rotation`` (degrees counterclockwise). Frames must come out upright."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix (VideoStream.set_display_rotation)")
    stored = np.rot90(portrait(), -rotation // 90)            # what the camera stored
    path = tmp_path / "phone.mp4"
    _write_stored(path, stored, "mp4", rotation=rotation)
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).rotation % 360 == rotation % 360   # the metadata is really in the file
    assert_upright(read_video(path, 4, 48, 32))
    assert_upright(read_clips(path, 2, 48, 32, None, [0, 2])[1])
    assert upright_size(path) == (48, 32) and (probe(path)["height"], probe(path)["width"]) == stored.shape[:2]


@pytest.mark.parametrize("rotation", [90, -90])
def test_phone_video_at_its_upright_size_comes_upright_as_uint8(tmp_path, rotation):
    """``ldm extract`` at a phone video's own upright size (48x32 here, stored 32x48 with a display
    matrix) takes the uint8 path, no resize: the frames are turned before the size check, and the
    uint8 clips are the upright float32 clips of `read_clips` bit for bit, with its `frame_timing`."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix (VideoStream.set_display_rotation)")
    path = tmp_path / "phone.mp4"
    _write_stored(path, np.rot90(portrait(), -rotation // 90), "mp4", rotation=rotation)
    clips, timing = read_clips_timed(path, 2, 48, 32, None, [0, 2], uint8=True)
    assert [(c.dtype, c.shape) for c in clips] == [(torch.uint8, (3, 2, 48, 32))] * 2
    floats = [video_mod.uint8_to_float(c, video_mod.UINT8_VALUES) for c in clips]
    assert all(torch.equal(a, b) for a, b in zip(floats, read_clips(path, 2, 48, 32, None, [0, 2])))
    assert_upright(floats[1])
    assert timing == frame_timing(path) == (8.0, False)


def test_rotate_tag_is_applied(tmp_path):
    """Matroska keeps a stream's ``rotate`` tag (as older FFmpeg versions wrote it when remuxing
    phone videos): 90 means "turn 90 degrees clockwise to display"."""
    stored = np.rot90(portrait(), 1)                           # portrait turned counterclockwise
    path = tmp_path / "tagged.mkv"
    _write_stored(path, stored, "matroska", tag="90")
    assert_upright(read_video(path, 4, 48, 32))
    assert upright_size(path) == (48, 32)
    _write_stored(tmp_path / "plain.mkv", np.ascontiguousarray(portrait()), "matroska")
    assert_upright(read_video(tmp_path / "plain.mkv", 4, 48, 32))   # no metadata: unchanged


@pytest.mark.parametrize("suffix, codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9"), (".webm", "libvpx")])
def test_containers_without_a_frame_count_are_counted_and_read(tmp_path, suffix, codec):
    """Matroska / WebM headers carry no frame count (``stream.frames == 0``): ``probe`` counts the
    packets, and the frames, windows and rate come out as from an MP4 of the same frames."""
    path = tmp_path / f"clip{suffix}"
    try:
        with av.open(str(path), "w") as out:
            stream = out.add_stream(codec, rate=12)
            stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
            for frame in indexed_frames(24):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
    except (av.error.FFmpegError, ValueError) as e:  # an encoder this PyAV build lacks
        pytest.skip(f"{codec}: {e}")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # the case under test
    info = probe(str(path))
    assert (info["frames"], info["fps"], info["width"], info["height"]) == (24, 12.0, 48, 32)
    assert frame_indices(read_video(str(path), 24, 32, 48)) == list(range(24))
    first, late = read_clips(str(path), 6, 32, 48, 6, [0, 6])  # 6 fps: every other frame
    assert frame_indices(first) == [0, 2, 4, 6, 8, 10] and frame_indices(late) == [12, 14, 16, 18, 20, 22]
    with pytest.raises(VideoError, match="too short"):
        read_video(str(path), 25, 32, 48)


def test_variable_frame_rate_mkv_windows_follow_the_timestamps(tmp_path):
    """A variable-rate Matroska video (phones slow down in the dark) has no frame count and a header
    rate that is only its fastest: 10 frames 1/30 s apart, then 10 frames 1/10 s apart (1.23 s).
    At 10 fps it gives 13 frames; `probe` measures its span from the packets and `plan_windows`
    places windows over all of it (was: "too short: has 20 frames at 30 fps", from the count)."""
    path = tmp_path / "vfr.mkv"
    times_ms = [round(1000 * (i / 30 if i < 10 else 1 / 3 + (i - 10) / 10)) for i in range(20)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for frame, ms in zip(indexed_frames(20), times_ms):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts, f.time_base = ms, Fraction(1, 1000)
            out.mux(stream.encode(f))
        out.mux(stream.encode())
    info = probe(str(path))
    assert info["frames"] == 20 and info["duration"] == pytest.approx(1.233 + 1 / 30, abs=2e-3)
    n = output_frames(info["frames"], info["fps"], 10, info["duration"])
    assert n == 13
    assert read_video(str(path), n, 16, 16, fps=10).shape[1] == n
    with pytest.raises(VideoError, match="too short"):
        read_video(str(path), n + 1, 16, 16, fps=10)
    windows = plan_windows(str(path), 9, 10, Windows(2))
    assert [w.start for w in windows] == [0, 4]
    assert all(isinstance(c, torch.Tensor) for c in read_clips(str(path), 9, 16, 16, 10, [w.start for w in windows]))


def _vfr_mkv(path) -> str:
    """10 frames 1/30 s apart, then 10 frames 1/10 s apart (a phone slowing down in the dark)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, frame in enumerate(indexed_frames(20)):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts, f.time_base = round(1000 * (i / 30 if i < 10 else 1 / 3 + (i - 10) / 10)), Fraction(1, 1000)
            out.mux(stream.encode(f))
        out.mux(stream.encode())
    return str(path)


def test_read_clips_timed_opens_the_video_once(tmp_path, long_clip, monkeypatch):
    """The frame timing `ldm extract` records with each clip comes from the packets its decoding
    demuxed (was: `frame_timing` opened every video a second time, ~15 % of a small clip's time);
    after a seek it is read as before. Clips and timing are those of `read_clips` + `frame_timing`."""
    gif = tmp_path / "clip.gif"
    write_frames(gif, indexed_frames(8), fps=30)
    opened = []
    real_open = video_mod._open
    monkeypatch.setattr(video_mod, "_open", lambda src: opened.append(src) or real_open(src))
    for src, starts, opens in [(long_clip, [0], 1), (_vfr_mkv(tmp_path / "vfr.mkv"), [0], 1),
                               (str(gif), [0], 2),             # + probe, for a GIF's rate
                               (long_clip, [0, 100], 2)]:      # sought to the second window: + frame_timing
        expected, plain = frame_timing(src), read_clips(src, 8, 16, 16, None, starts)
        opened.clear()
        clips, timing = read_clips_timed(src, 8, 16, 16, None, starts)
        assert timing == expected and len(opened) == opens
        assert all(torch.equal(a, b) for a, b in zip(clips, plain)) and len(clips) == len(starts)
    assert frame_timing(tmp_path / "vfr.mkv") == (30.0, True)


def noise_video(path, codec: str, **options: str) -> bytes:
    """40 frames of noise at 25 fps (1.6 s; noise: every frame a sizeable packet), written to
    ``path`` with muxer ``options``; returns the file's bytes."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for _ in range(40):
            c.mux(s.encode(av.VideoFrame.from_ndarray((rng.random((32, 48, 3)) * 255).astype(np.uint8), format="rgb24")))
        c.mux(s.encode(None))
    return path.read_bytes()


def test_faststart_mp4_cut_short_is_found_by_check_video(tmp_path):
    """An MP4 with its index first (``movflags=faststart``, as web servers want) cut short opens and
    decodes its first frames; `check_video` finds where it breaks, in FFmpeg's words (was: with
    PyAV's ``[Errno 1094995529] ...: 'avcodec_send_packet()'`` around them)."""
    # faststart rewrites the file at the end: a real file, not bytes
    data = noise_video(tmp_path / "web.mp4", "libx264", movflags="faststart")
    assert data[4:8] == b"ftyp" and b"moov" in data[:4096]                # the index comes first
    with pytest.raises(VideoError, match="corrupt or truncated") as info:
        video_mod.check_video(data[: int(len(data) * 0.6)])
    assert "Errno" not in str(info.value) and "avcodec" not in str(info.value)


def test_webm_cut_short_is_found_by_check_video(tmp_path):
    """WebM / Matroska keep no frame count, so a download cut short decodes cleanly to where it
    stops; its video track's DURATION tag says how long it should play (was: reported good)."""
    data = noise_video(tmp_path / "web.webm", "libvpx")
    assert video_mod.check_video(data)["decoded"] == 40
    with pytest.raises(VideoError, match=r"corrupt or truncated: .* plays 0\.\d\d s of the 1\.60 s its header announces"):
        video_mod.check_video(data[: int(len(data) * 0.6)])
