"""Read (shape, color, direction) back from the pixels of a clip, with no learned weights.

The offline generation benchmark: a video generated for "a red circle moving left" should read
back as red / circle / left. The reader is hand-made image analysis of the synthetic world of
`data.synth` (one object over a static, dark, low-contrast background):

1. background: the per-pixel temporal median, where it agrees with a robust planar fit of the
   image (pixels always covered by a slow object fall back to the plane);
2. foreground: the RGB distance to the background ``D``; the object's contrast ``fg`` is the
   typical ``D`` of clearly-foreground pixels, and ``alpha = clip(D / fg, 0, 1)`` is a soft
   coverage map (exact for antialiased edges that blend object and background linearly);
   per frame, the object is the mass of ``alpha`` around the median of the hard mask
   (``D > fg / 2``), so stray blobs far away are ignored;
3. color: the mean color of interior pixels (alpha >= 0.9), brightness-normalised (each color
   divided by its largest channel), nearest palette entry;
4. direction: a least-squares line through the per-frame centroids; the displacement over the
   clip is matched to the nearest direction by angle;
5. shape: analysis by synthesis: each candidate shape is drawn with `data.synth.shape_alpha` at
   the observed centroid, with the size that gives the observed area (and +-8 %), and compared with
   the observed alpha by soft IoU; the best mean IoU over up to 8 frames wins.

Every attribute comes with a confidence in [0, 1] (a margin between the best and the second-best
answer); a blank clip gives a best guess with confidence 0 and ``found=False`` instead of an error.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from data.synth import (CARDINAL, CENTROID_OFFSET, COLORS, DIRECTION_VECTORS, DIRECTIONS, PALETTE, SHAPES,
                        shape_alpha)

# area of each shape in units of r^2 (r = half-extent of its bounding box, as data.synth draws it)
AREA_COEF: dict[str, float] = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
MIN_CONTRAST = 40.0   # RGB distance below which nothing counts as an object
MAX_SHAPE_FRAMES = 8  # frames used for template matching
BLUR_SIGMAS = (0.0, 1.0, 2.0)  # templates are also compared blurred, for soft (generated) videos
ATTRIBUTES = ("shape", "color", "direction")


def _frames(video: Tensor | np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1] -> float64 (T, H, W, 3) in [0, 255]."""
    x = video.detach().cpu().numpy() if isinstance(video, Tensor) else np.asarray(video)
    if x.ndim == 4 and x.dtype == np.uint8 and x.shape[-1] == 3:
        return x.astype(np.float64)
    if x.ndim == 4 and np.issubdtype(x.dtype, np.floating) and x.shape[0] == 3:
        return (np.clip(x.astype(np.float64), -1, 1).transpose(1, 2, 3, 0) + 1.0) * 127.5
    raise ValueError(f"expected uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1], got {x.dtype} {x.shape}")


def _plane_fit(img: np.ndarray, iters: int = 3) -> np.ndarray:
    """Robust least-squares plane ``a + b x + c y`` per channel of an (H, W, 3) image."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], 1)   # (HW, 3)
    values = img.reshape(-1, 3)                                               # (HW, 3)
    keep = np.ones(h * w, dtype=bool)
    for _ in range(iters):
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        resid = np.linalg.norm(values - design @ coef, axis=1)
        keep = resid <= max(12.0, 3.0 * float(np.median(resid[keep])))
        if keep.sum() < 3:
            break
    return (design @ coef).reshape(h, w, 3)


def _background(x: np.ndarray) -> np.ndarray:
    median = np.median(x, axis=0)                                             # (H, W, 3)
    plane = _plane_fit(median)
    agrees = np.linalg.norm(median - plane, axis=-1, keepdims=True) < MIN_CONTRAST
    return np.where(agrees, median, plane)


def _box3(d: np.ndarray) -> np.ndarray:
    """3x3 box filter over the last two axes (edges replicated)."""
    p = np.pad(d, [(0, 0)] * (d.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = d.shape[-2:]
    return sum(p[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _normalise(rgb: np.ndarray) -> np.ndarray:
    return rgb / np.maximum(rgb.max(axis=-1, keepdims=True), 1.0)


def _margin(best: float, second: float) -> float:
    return float(np.clip((best - second) / max(best + second, 1e-9), 0.0, 1.0))


def _read_color(rgb: np.ndarray, colors: Sequence[str]) -> tuple[str, float]:
    palette = _normalise(np.array([PALETTE[c] for c in colors], dtype=np.float64))
    dist = np.linalg.norm(palette - _normalise(rgb), axis=1)
    order = np.argsort(dist)
    if len(colors) == 1:
        return colors[0], 1.0
    return colors[order[0]], _margin(dist[order[1]], dist[order[0]])


def _read_direction(times: np.ndarray, centers: np.ndarray, frames: int,
                    directions: Sequence[str]) -> tuple[str, float, list[float]]:
    t = times - times.mean()
    velocity = (t[:, None] * (centers - centers.mean(0))).sum(0) / max(float((t ** 2).sum()), 1e-9)  # (2,) px/frame
    displacement = velocity * (frames - 1)
    resid = centers - centers.mean(0) - t[:, None] * velocity
    jitter = float(np.sqrt((resid ** 2).sum(1).mean())) if len(t) > 2 else 0.0
    units = np.array([DIRECTION_VECTORS[d] for d in directions], dtype=np.float64)
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    norm = float(np.linalg.norm(displacement))
    cos = units @ (displacement / max(norm, 1e-9))
    order = np.argsort(-cos)
    if len(directions) == 1:
        return directions[0], 1.0, displacement.tolist()
    spacing = max((float(units[i] @ units[j]) for i in range(len(units)) for j in range(len(units)) if i != j))
    angular = float(np.clip((cos[order[0]] - cos[order[1]]) / max(1.0 - spacing, 1e-9), 0.0, 1.0))
    steady = float(np.clip(norm / max(2.0, 4.0 * jitter), 0.0, 1.0))
    return directions[order[0]], angular * steady, displacement.tolist()


def _soft_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Soft IoU of ``a`` (h, w) with each image of ``b`` (..., h, w)."""
    return np.minimum(a, b).sum((-2, -1)) / np.maximum(np.maximum(a, b).sum((-2, -1)), 1e-9)


@functools.lru_cache(maxsize=None)
def _taps(sigma: float) -> tuple[int, np.ndarray]:
    """Half-width ``k = ceil(3 sigma)`` and the ``2k + 1`` normalised Gaussian taps."""
    k = int(math.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-k, k + 1) / sigma) ** 2)
    return k, g / g.sum()


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix ``M``: ``M @ v`` is ``v`` (length n) blurred by a Gaussian of ``sigma``, edges
    replicated (each tap that falls off an end reads the edge pixel)."""
    k, g = _taps(sigma)
    rows = np.repeat(np.arange(n), 2 * k + 1)                                     # (n * (2k + 1),)
    cols = np.clip(np.arange(n)[:, None] + np.arange(-k, k + 1), 0, n - 1).ravel()  # the tap each row reads
    m = np.zeros((n, n))
    np.add.at(m, (rows, cols), np.tile(g, n))
    return m


MATRIX_BLUR_MAX = 128  # longer sides: a sum of shifted copies (a matrix product's work grows with the side squared)


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (..., h, w) images (edges replicated), a stack of templates at once."""
    if sigma <= 0:
        return img
    h, w = img.shape[-2:]
    if max(h, w) <= MATRIX_BLUR_MAX:  # two small matrix products: the fewest numpy calls
        return _blur_matrix(h, sigma) @ img @ _blur_matrix(w, sigma).T
    k, g = _taps(sigma)
    p = img[..., np.clip(np.arange(-k, h + k), 0, h - 1), :]       # (..., h + 2k, w): edge rows repeated
    p = sum(g[i] * p[..., i:i + h, :] for i in range(2 * k + 1))    # (..., h, w)
    p = p[..., np.clip(np.arange(-k, w + k), 0, w - 1)]             # (..., h, w + 2k)
    return sum(g[i] * p[..., i:i + w] for i in range(2 * k + 1))   # (..., h, w)


def _read_shape(alphas: list[np.ndarray], centroids: list[tuple[float, float]], areas: list[float],
                shapes: Sequence[str]) -> tuple[str, float, dict[str, float]]:
    scores = {s: 0.0 for s in shapes}
    for alpha, (cx, cy), area in zip(alphas, centroids, areas):
        h, w = alpha.shape
        for s in shapes:
            r0 = math.sqrt(area / AREA_COEF[s])
            ox, oy = CENTROID_OFFSET[s]
            templates = np.stack([shape_alpha(s, cx - ox * r, cy - oy * r, r, h, w)
                                  for r in (0.92 * r0, r0, 1.08 * r0)])                     # (3, h, w)
            blurred = np.concatenate([_gauss_blur(templates, sigma) for sigma in BLUR_SIGMAS])  # (9, h, w)
            scores[s] += float(_soft_iou(alpha, blurred).max()) / len(alphas)
    ranked = sorted(shapes, key=lambda s: -scores[s])
    if len(shapes) == 1:
        return ranked[0], 1.0, scores
    s1, s2 = scores[ranked[0]], scores[ranked[1]]
    return ranked[0], float(np.clip((s1 - s2) / max(1.0 - s2, 0.05), 0.0, 1.0)), scores


def _track(x: np.ndarray, alpha_all: np.ndarray, hard: np.ndarray) -> tuple[list, ...]:
    """Per frame with an object: its time, alpha centroid (x, y), alpha crop around it (with the
    centroid in crop coordinates), area, and interior pixel colors. Stray blobs are ignored by
    keeping only the alpha within a disc around the median of the hard mask."""
    frames, height, width, _ = x.shape
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    times, centers, crops, areas, interior = [], [], [], [], []
    for t in range(frames):
        ys, xs = yy[hard[t]], xx[hard[t]]
        if ys.size < 2:
            continue
        my, mx = float(np.median(ys)), float(np.median(xs))
        radius = 2.0 * math.sqrt(ys.size / math.pi) + 2.0
        window = (yy - my) ** 2 + (xx - mx) ** 2 <= radius ** 2
        alpha = np.where(window, alpha_all[t], 0.0)
        area = float(alpha.sum())
        if area < 1.0:
            continue
        cy, cx = float((alpha * yy).sum() / area), float((alpha * xx).sum() / area)
        y0, y1 = max(0, int(cy - radius - 2)), min(height, int(cy + radius + 3))
        x0, x1 = max(0, int(cx - radius - 2)), min(width, int(cx + radius + 3))
        times.append(t)
        centers.append((cx, cy))
        crops.append((alpha[y0:y1, x0:x1], (cx - x0, cy - y0)))
        areas.append(area)
        interior.append(x[t][window & (alpha_all[t] >= 0.9)])
    return times, centers, crops, areas, interior


def read_attributes(video: Tensor | np.ndarray, shapes: Sequence[str] | None = None,
                    colors: Sequence[str] | None = None,
                    directions: Sequence[str] | None = None) -> dict[str, Any]:
    """Recover shape, color and direction of the moving object in one clip.

    ``video``: uint8 ``(T, H, W, 3)`` or float ``(3, T, H, W)`` in [-1, 1]. The candidate sets
    default to all shapes, all palette colors and the four cardinal directions.
    Returns ``dict(shape, color, direction, confidence, shape_confidence, color_confidence,
    direction_confidence, found, frames_found, contrast, displacement, shape_scores)``;
    ``confidence`` is the smallest of the three.
    """
    shapes = tuple(shapes or SHAPES)
    colors = tuple(colors or COLORS)
    directions = tuple(directions or CARDINAL)
    for values, known, kind in ((shapes, SHAPES, "shape"), (colors, COLORS, "color"),
                                (directions, DIRECTIONS, "direction")):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ValueError(f"unknown {kind}(s) {unknown}; known: {', '.join(known)}")
    x = _frames(video)                                                          # (T, H, W, 3)
    frames = x.shape[0]
    bg = _background(x)                                                         # (H, W, 3)
    dist = np.linalg.norm(x - bg, axis=-1)                                      # (T, H, W)
    smooth = _box3(dist)
    strong = dist[smooth > max(MIN_CONTRAST, 2.5 * float(np.median(smooth)))]
    guess = dict(shape=shapes[0], direction=directions[0], found=False, frames_found=0, contrast=0.0,
                 displacement=[0.0, 0.0], shape_scores={}, shape_confidence=0.0, color_confidence=0.0,
                 direction_confidence=0.0, confidence=0.0)
    if strong.size == 0:
        top = x.reshape(-1, 3)[np.argsort(dist.ravel())[-max(1, dist.size // 100):]]
        guess["color"] = _read_color(top.mean(0), colors)[0]
        return guess
    fg = float(np.percentile(strong, 75))
    alpha_all = np.clip(dist / fg, 0.0, 1.0)
    alpha_all[dist < 0.2 * fg] = 0.0
    times, centers, crops, areas, interior = _track(x, alpha_all, smooth > 0.5 * fg)
    if not times:
        guess["color"] = _read_color(x[dist >= 0.5 * fg].mean(0), colors)[0]
        guess["contrast"] = fg
        return guess
    inner = np.concatenate(interior)
    if inner.shape[0] == 0:  # tiny or blurred object: no pixel fully covered
        inner = np.concatenate([x[t][alpha_all[t] >= 0.5] for t in times])
    color, color_conf = _read_color(inner.mean(0), colors)
    if len(times) >= 2:
        direction, dir_conf, displacement = _read_direction(np.array(times, dtype=np.float64),
                                                           np.array(centers), frames, directions)
    else:
        direction, dir_conf, displacement = directions[0], 0.0, [0.0, 0.0]
    pick = np.unique(np.linspace(0, len(times) - 1, min(MAX_SHAPE_FRAMES, len(times))).round().astype(int))
    shape, shape_conf, scores = _read_shape([crops[i][0] for i in pick], [crops[i][1] for i in pick],
                                            [areas[i] for i in pick], shapes)
    return dict(shape=shape, color=color, direction=direction,
                confidence=min(shape_conf, color_conf, dir_conf), shape_confidence=shape_conf,
                color_confidence=color_conf, direction_confidence=dir_conf, found=True,
                frames_found=len(times), contrast=fg, displacement=displacement, shape_scores=scores)


def score(videos: Iterable[Tensor | np.ndarray] | Tensor, expected: Sequence[Mapping[str, Any]],
          shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None,
          directions: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy of `read_attributes` against ``expected`` (dicts with shape/color/direction).

    ``videos`` is a sequence of clips or one batched float tensor ``(B, 3, T, H, W)``. Candidate
    directions default to the cardinal four, or all eight when ``expected`` names a diagonal.
    Returns ``{attr: accuracy, attr + "_chance": 1 / #candidates, "all": all three right,
    "n": count, "found": fraction of clips where an object was found, "confidence": mean}``;
    an attribute missing from some expected rows is scored on the rows that name it.
    """
    clips = list(videos)
    if len(clips) != len(expected):
        raise ValueError(f"{len(clips)} videos but {len(expected)} expected rows")
    if not clips:
        raise ValueError("score needs at least one video")
    if directions is None:
        named = {e["direction"] for e in expected if "direction" in e}
        directions = DIRECTIONS if named - set(CARDINAL) else CARDINAL
    candidates = {"shape": tuple(shapes or SHAPES), "color": tuple(colors or COLORS),
                  "direction": tuple(directions)}
    hits = {a: 0 for a in ATTRIBUTES}
    counts = {a: 0 for a in ATTRIBUTES}
    all_right, found, confidence = 0, 0, 0.0
    for clip, want in zip(clips, expected):
        got = read_attributes(clip, candidates["shape"], candidates["color"], candidates["direction"])
        right = True
        for a in ATTRIBUTES:
            if a in want:
                counts[a] += 1
                hits[a] += got[a] == want[a]
                right &= got[a] == want[a]
        all_right += right
        found += got["found"]
        confidence += got["confidence"]
    out: dict[str, float] = {}
    for a in ATTRIBUTES:
        out[a] = hits[a] / counts[a] if counts[a] else float("nan")
        out[f"{a}_chance"] = 1.0 / len(candidates[a])
    out.update(all=all_right / len(clips), n=float(len(clips)), found=found / len(clips),
               confidence=confidence / len(clips))
    return out
