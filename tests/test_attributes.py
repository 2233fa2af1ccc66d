"""data.attributes: >= 98 % per attribute after the MP4 round trip; graceful on blur, noise, blanks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.attributes import read_attributes, score
from data.synth import CARDINAL, COLORS, DIRECTIONS, SHAPES, combinations, synth_clip
from data.video import encode_video, read_video

SIZES = ((32, 32), (48, 48), (64, 64), (96, 96), (128, 128), (32, 48), (64, 96), (96, 64))


def round_trip_set(n: int, seed: int, diagonals: bool) -> tuple[list[torch.Tensor], list[dict]]:
    """``n`` clips over sizes 32..128 (square and not) and 8..32 frames, encoded to MP4 (H.264)
    and decoded back, with their ground-truth attributes."""
    combos = combinations(diagonals=diagonals)
    rng = np.random.default_rng(seed)
    videos, truth = [], []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        frames = int(rng.integers(8, 33))
        attrs, clip = synth_clip(seed, i, combos, frames, h, w)
        videos.append(read_video(encode_video(clip, fps=8), frames, h, w))
        truth.append(attrs)
    return videos, truth


@pytest.mark.parametrize("diagonals", [False, True], ids=["cardinal", "diagonal"])
def test_reader_accuracy_after_mp4_round_trip(diagonals):
    """200 clips in all (100 per direction set): every attribute >= 98 %."""
    videos, truth = round_trip_set(100, seed=11 + diagonals, diagonals=diagonals)
    result = score(videos, truth)
    assert result["n"] == 100 and result["found"] == 1.0
    for attr in ("shape", "color", "direction"):
        assert result[attr] >= 0.98, f"{attr} accuracy {result[attr]:.3f} < 0.98 ({result})"
    assert result["direction_chance"] == pytest.approx(1 / (8 if diagonals else 4))
    assert result["shape_chance"] == pytest.approx(1 / len(SHAPES))
    assert result["color_chance"] == pytest.approx(1 / len(COLORS))


def test_uint8_and_float_inputs_agree():
    attrs, clip = synth_clip(0, 3, combinations(), 12, 48, 64)
    as_float = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1   # (3, T, H, W)
    a, b = read_attributes(clip), read_attributes(as_float)
    assert (a["shape"], a["color"], a["direction"]) == (b["shape"], b["color"], b["direction"])
    assert (a["shape"], a["color"], a["direction"]) == (attrs["shape"], attrs["color"], attrs["direction"])
    assert a["found"] and 0.0 < a["confidence"] <= 1.0


def _blur(clip: np.ndarray, sigma: float) -> np.ndarray:
    k = int(2 * round(3 * sigma) + 1)
    g = torch.exp(-((torch.arange(k) - k // 2).float() ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    x = torch.from_numpy(clip).float().permute(0, 3, 1, 2).reshape(-1, 1, *clip.shape[1:3])  # (T*3, 1, H, W)
    x = F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), g.view(1, 1, 1, k) * g.view(1, 1, k, 1))
    return x.reshape(clip.shape[0], 3, *clip.shape[1:3]).permute(0, 2, 3, 1).numpy()        # (T, H, W, 3)


def test_template_blur_is_a_gaussian_with_replicated_edges():
    """The shape reader's blur (a stack of templates at once; two small matrix products, or sums of
    shifted copies on a long side) is a separable Gaussian over edge-replicated borders: the test's
    own conv2d blur to 1e-12."""
    from data.attributes import MATRIX_BLUR_MAX, _gauss_blur

    for sigma, (h, w) in itertools.product((1.0, 2.0), ((11, 17), (MATRIX_BLUR_MAX + 3, 40))):
        images = np.random.default_rng(h).random((3, h, w))
        k = int(np.ceil(3 * sigma))
        g = torch.exp(-0.5 * (torch.arange(-k, k + 1, dtype=torch.float64) / sigma) ** 2)
        g = g / g.sum()
        x = F.pad(torch.from_numpy(images)[:, None], (k, k, k, k), mode="replicate")   # (3, 1, h + 2k, w + 2k)
        want = F.conv2d(x, (g[:, None] * g[None, :])[None, None])[:, 0].numpy()        # (3, h, w)
        np.testing.assert_allclose(_gauss_blur(images, sigma), want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(_gauss_blur(images[1], sigma), want[1], rtol=0, atol=1e-12)
    assert _gauss_blur(images, 0.0) is images


def test_degrades_gracefully_on_blurry_noisy_clips():
    combos = combinations()
    rng = np.random.default_rng(0)
    clean_conf, noisy_conf, hits = [], [], {"shape": 0, "color": 0, "direction": 0}
    n = 40
    for i in range(n):
        attrs, clip = synth_clip(21, i, combos, 12, 64, 64)
        clean_conf.append(read_attributes(clip)["confidence"])
        bad = np.clip(_blur(clip, 1.5) + rng.normal(0, 15, clip.shape), 0, 255).round().astype(np.uint8)
        got = read_attributes(bad)
        noisy_conf.append(got["confidence"])
        for k in hits:
            hits[k] += got[k] == attrs[k]
    assert hits["color"] >= 0.95 * n and hits["direction"] >= 0.95 * n and hits["shape"] >= 0.8 * n, hits
    assert np.mean(noisy_conf) < np.mean(clean_conf)


@pytest.mark.parametrize("video", [
    np.zeros((8, 32, 32, 3), np.uint8),                                            # black
    np.full((8, 32, 32, 3), 200, np.uint8),                                        # flat gray
    np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8),    # pure noise
    torch.zeros(3, 4, 16, 16),                                                     # float, blank
], ids=["black", "gray", "noise", "float-blank"])
def test_blank_clips_give_a_guess_with_zero_confidence(video):
    got = read_attributes(video)
    assert not got["found"] and got["confidence"] == 0.0
    assert got["shape"] in SHAPES and got["color"] in COLORS and got["direction"] in CARDINAL


def test_single_frame_and_static_object():
    attrs, clip = synth_clip(2, 0, combinations(), 8, 48, 48)
    one = read_attributes(clip[:1])
    assert one["found"] and one["direction_confidence"] == 0.0
    assert (one["shape"], one["color"]) == (attrs["shape"], attrs["color"])
    static = read_attributes(np.repeat(clip[:1], 8, axis=0))   # object never moves: background from the plane fit
    assert static["found"] and static["color"] == attrs["color"] and static["shape"] == attrs["shape"]


def test_candidate_sets_and_errors():
    attrs, clip = synth_clip(5, 1, combinations(colors=["red", "blue"], directions=["up-left"]), 10, 48, 48)
    got = read_attributes(clip, colors=["red", "blue"], directions=DIRECTIONS)
    assert got["color"] == attrs["color"] and got["direction"] == "up-left"
    with pytest.raises(ValueError, match="unknown color"):
        read_attributes(clip, colors=["purple"])
    with pytest.raises(ValueError, match="expected uint8"):
        read_attributes(np.zeros((8, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="2 videos but 1 expected"):
        score([clip, clip], [attrs])


def test_score_counts_and_batched_input():
    combos = combinations()
    pairs = [synth_clip(9, i, combos, 8, 32, 32) for i in range(4)]
    batch = torch.stack([torch.from_numpy(c).permute(3, 0, 1, 2).float() / 127.5 - 1
                         for _, c in pairs])   # (B, 3, T, H, W)
    expected = [dict(a) for a, _ in pairs]
    expected[0]["color"] = "white" if expected[0]["color"] != "white" else "red"   # one wrong label
    del expected[1]["shape"]                                                        # one unlabeled
    result = score(batch, expected)
    assert result["color"] == 0.75 and result["shape"] == 1.0 and result["all"] == 0.75
    assert result["n"] == 4
