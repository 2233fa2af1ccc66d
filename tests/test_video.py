"""data.video: decode/encode round trips, timestamp resampling, resize + crop, every VideoError."""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from data.video import (VideoError, encode_video, probe, read_video, resize_center_crop, video_to_uint8,
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
    with pytest.raises(VideoError, match="not a readable video"):
        read_video(tmp_path / "notes.mp4", 4, 16, 16)


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="file not found"):
        read_video(tmp_path / "nope.mp4", 4, 16, 16)


def test_truncated_mp4(clip12):
    with open(clip12, "rb") as f:
        data = f.read()
    with pytest.raises(VideoError):
        read_video(data[: len(data) // 2], 8, 16, 16)


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
