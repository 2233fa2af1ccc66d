"""Synthetic attribute videos: one colored shape moving in a straight line over a dark background.

The offline stand-in for WebVid/UCF-101 and the demo's data. Every clip has KNOWN attributes, so
generated videos can be scored later by `data.attributes` (which reads them back from pixels):

- shape: circle, square, triangle (apex up), diamond
- color: red, green, blue, yellow, magenta, cyan, white (saturated palette, small per-clip jitter)
- direction: left, right, up, down (+ up-left, up-right, down-left, down-right with diagonals)
- speed: slow (35-50 % of the free travel range over the clip) or fast (80-100 %); speed is relative
  to the frame so that any frames/size combination fits
- background: solid (dark), gradient (dark linear), noise (dark, low-contrast smooth texture)

The object never leaves the frame: its size is 26-34 % of the shorter side and the start point is
drawn so that the whole path fits with a 1-pixel margin.

Class ids index (shape, color, direction) in the fixed ordering ``SHAPES x COLORS x DIRECTIONS``
(shape-major, direction fastest)::

    class_id = (SHAPES.index(shape) * len(COLORS) + COLORS.index(color)) * len(DIRECTIONS)
               + DIRECTIONS.index(direction)

so ids do not depend on which subset a dataset uses (``NUM_CLASSES`` = 4 * 7 * 8 = 224).

Determinism: sample ``i`` of a set with seed ``s`` draws everything from generators seeded by
``(s, i)`` (attributes: a class-balanced permutation per block of samples, seeded by
``(s, block)``), so any subset of a set regenerates pixel-identically.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data.video import encode_video, write_frames
from ldm.checkpoint import atomic_write_json
from ldm.errors import UserError, checking

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 250),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 230),
    "white": (240, 240, 240),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
CARDINAL: tuple[str, ...] = ("left", "right", "up", "down")
DIAGONAL: tuple[str, ...] = ("up-left", "up-right", "down-left", "down-right")
DIRECTIONS: tuple[str, ...] = CARDINAL + DIAGONAL
# unit steps in image coordinates (x to the right, y downwards)
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}
SPEEDS: tuple[str, ...] = ("slow", "fast")
SPEED_TRAVEL: dict[str, tuple[float, float]] = {"slow": (0.35, 0.5), "fast": (0.8, 1.0)}
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise")
NUM_CLASSES = len(SHAPES) * len(COLORS) * len(DIRECTIONS)

RADIUS_RANGE = (0.13, 0.17)   # object half-extent as a fraction of the shorter frame side
MARGIN = 1.0                  # pixels kept free between the object's extent and the frame border
COLOR_JITTER = 12             # +- per channel around the palette color


# --------------------------------------------------------------------------------------------
# class ids and captions
# --------------------------------------------------------------------------------------------
def _index(name: str, values: Sequence[str], kind: str) -> int:
    try:
        return values.index(name)
    except ValueError:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(values)}") from None


def class_id(shape: str, color: str, direction: str) -> int:
    """Index of (shape, color, direction) in ``SHAPES x COLORS x DIRECTIONS`` (see module doc)."""
    s, c, d = _index(shape, SHAPES, "shape"), _index(color, COLORS, "color"), _index(direction, DIRECTIONS, "direction")
    return (s * len(COLORS) + c) * len(DIRECTIONS) + d


def class_space(input: str | Path) -> int:
    """``NUM_CLASSES`` when ``input`` (a folder, or a video / shard file or brace pattern in one) is a
    set written by `synth_dataset` (its folder holds ``synth.json``), else 0: a synthetic set's class
    ids index the whole space, whichever of them its clips happen to use."""
    path = Path(input)
    folder = path if path.is_dir() else path.parent
    return NUM_CLASSES if (folder / "synth.json").is_file() else 0


def class_attributes(cid: int) -> dict[str, str]:
    """Inverse of `class_id`: ``dict(shape, color, direction)``."""
    if not 0 <= int(cid) < NUM_CLASSES:
        raise ValueError(f"class id {cid} out of range [0, {NUM_CLASSES})")
    rest, d = divmod(int(cid), len(DIRECTIONS))
    s, c = divmod(rest, len(COLORS))
    return dict(shape=SHAPES[s], color=COLORS[c], direction=DIRECTIONS[d])


def caption(attrs: Mapping[str, Any], detailed: bool = False) -> str:
    """``"a red circle moving left"``; ``detailed`` adds speed and background when present."""
    text = f"a {attrs['color']} {attrs['shape']} moving {attrs['direction']}"
    if detailed:
        if "speed" in attrs:
            text += " slowly" if attrs["speed"] == "slow" else " fast"
        if "background" in attrs:
            text += f" on a dark {attrs['background']} background"
    return text


_FILLER = {"a", "an", "the", "moving", "going", "is", "on", "towards", "toward", "to", "dark", "background",
           "and"}


def parse_attributes(text: str | Sequence[str]) -> dict[str, str]:
    """Read (shape, color, direction) from words in any order: ``"a red circle moving up left"``,
    ``"red circle left"``, ``("red", "circle", "up-left")``. A vertical plus a horizontal word make a
    diagonal. Unknown words are an error; attributes not mentioned are absent from the result.
    """
    words = (text.lower().replace("-", " ").replace(",", " ").split() if isinstance(text, str)
             else [w for part in text for w in str(part).lower().replace("-", " ").split()])
    out: dict[str, str] = {}
    vertical = horizontal = None
    for w in words:
        if w in SHAPES or w in COLORS:
            key = "shape" if w in SHAPES else "color"
            if key in out and out[key] != w:
                raise ValueError(f"two {key}s in {text!r}: {out[key]} and {w}")
            out[key] = w
        elif w in ("up", "down"):
            vertical = w
        elif w in ("left", "right"):
            horizontal = w
        elif w in ("slow", "slowly", "fast", "quickly"):
            out["speed"] = "slow" if w.startswith("slow") else "fast"
        elif w in BACKGROUNDS:
            out["background"] = w
        elif w not in _FILLER:
            raise ValueError(f"unknown word {w!r} in {text!r}; shapes: {SHAPES}, colors: {COLORS}, "
                             f"directions: {DIRECTIONS}")
    if vertical or horizontal:
        out["direction"] = "-".join(x for x in (vertical, horizontal) if x)
    return out


def parse_combo(combo: str | Sequence[str]) -> tuple[str, str, str]:
    """A held-out combination as ``(color, shape, direction)``; all three must be named."""
    attrs = parse_attributes(combo)
    missing = [k for k in ("color", "shape", "direction") if k not in attrs]
    if missing:
        raise ValueError(f"combination {combo!r} must name a color, a shape and a direction; missing {missing}")
    return attrs["color"], attrs["shape"], attrs["direction"]


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, cx: np.ndarray | float, cy: np.ndarray | float,
              r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a shape of half-extent ``r`` centered on its
    bounding box at (cx, cy). The triangle points up with its base at the bottom."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / math.sqrt(2.0)
    if shape == "triangle":
        # apex (0, -r), base corners (+-r, r): the three edges' signed distances, max = inside test
        base = dy - r
        side = (2.0 * np.abs(dx) - dy - r) / math.sqrt(5.0)
        return np.maximum(base, side)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


# offset from the bounding-box center to the area centroid, in units of r (triangle: r / 3 lower)
CENTROID_OFFSET: dict[str, tuple[float, float]] = {s: (0.0, 1.0 / 3.0 if s == "triangle" else 0.0) for s in SHAPES}


def shape_alpha(shape: str, cx: np.ndarray | float, cy: np.ndarray | float, r: float, height: int,
                width: int) -> np.ndarray:
    """Antialiased coverage in [0, 1] of a shape on a pixel grid: ``(H, W)``, or ``(T, H, W)`` when
    ``cx``/``cy`` are arrays of length T. Pixel centers sit at integer + 0.5."""
    cx = np.asarray(cx, dtype=np.float64)[..., None, None]
    cy = np.asarray(cy, dtype=np.float64)[..., None, None]
    y = np.arange(height, dtype=np.float64)[:, None] + 0.5   # (H, 1): broadcast against x, no grid built
    x = np.arange(width, dtype=np.float64) + 0.5             # (W,)
    return np.clip(0.5 - shape_sdf(shape, x, y, cx, cy, r), 0.0, 1.0)


def _background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A static dark background (H, W, 3) float in [0, 255]."""
    if kind == "solid":
        return np.broadcast_to(rng.uniform(8, 50, size=3), (height, width, 3)).copy()
    if kind == "gradient":
        c0, c1 = rng.uniform(5, 60, size=3), rng.uniform(5, 60, size=3)
        angle = rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        p = x * math.cos(angle) + y * math.sin(angle)
        p = (p - p.min()) / max(p.max() - p.min(), 1e-6)
        return c0 + (c1 - c0) * p[..., None]
    if kind == "noise":
        base = rng.uniform(18, 45, size=3)
        grid = torch.from_numpy(rng.standard_normal((1, 1, 5, 5)))
        smooth = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)[0, 0].numpy()
        smooth = smooth / max(smooth.std(), 1e-6)
        amp = rng.uniform(5, 10) * (1 + 0.3 * rng.uniform(-1, 1, size=3))
        return np.clip(base + smooth[..., None] * amp, 0, 255)
    raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_frame_size(height: int, width: int) -> None:
    if min(height, width) < 12:
        raise ValueError(f"frames of {height}x{width} are too small for the synthetic shapes (>= 12 px)")


def plan_motion(direction: str, speed: str, frames: int, height: int, width: int,
                rng: np.random.Generator | int | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """Draw an object half-extent and a straight path that stays inside the frame.

    Returns ``(r, cx, cy)`` with ``cx``/``cy`` of shape (T,): bounding-box centers per frame.
    """
    rng = _as_rng(rng)
    if direction not in DIRECTION_VECTORS:
        raise ValueError(f"unknown direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    if speed not in SPEED_TRAVEL:
        raise ValueError(f"unknown speed {speed!r}; known: {', '.join(SPEEDS)}")
    _check_frame_size(height, width)
    r = rng.uniform(*RADIUS_RANGE) * min(height, width)
    lo = r + MARGIN
    hi_x, hi_y = width - r - MARGIN, height - r - MARGIN
    vx, vy = DIRECTION_VECTORS[direction]
    free = min(hi if v else math.inf for v, hi in ((vx, hi_x - lo), (vy, hi_y - lo)))
    travel = rng.uniform(*SPEED_TRAVEL[speed]) * free
    s = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)

    def path(v: int, hi: float) -> np.ndarray:
        if v == 0:
            return np.full(frames, rng.uniform(lo, hi))
        start = rng.uniform(lo, hi - travel) if v > 0 else rng.uniform(lo + travel, hi)
        return start + v * travel * s

    return r, path(vx, hi_x), path(vy, hi_y)


def render_clip(attrs: Mapping[str, str], frames: int, height: int, width: int,
                rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Draw one clip: uint8 ``(T, H, W, 3)``.

    ``attrs`` needs shape, color and direction; speed and background are drawn from ``rng`` when
    absent. Object size, path, exact color and background details come from ``rng`` (a Generator
    or a seed), so the same attrs + seed give identical pixels.
    """
    rng = _as_rng(rng)
    for key in ("shape", "color", "direction"):
        if key not in attrs:
            raise ValueError(f"render_clip needs attrs[{key!r}]; got {dict(attrs)}")
    if attrs["color"] not in PALETTE:
        raise ValueError(f"unknown color {attrs['color']!r}; known: {', '.join(COLORS)}")
    speed = attrs.get("speed") or SPEEDS[rng.integers(len(SPEEDS))]
    background = attrs.get("background") or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    r, cx, cy = plan_motion(attrs["direction"], speed, frames, height, width, rng)
    color = np.clip(np.asarray(PALETTE[attrs["color"]], dtype=np.float64)
                    + rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=3), 0, 255)
    bg = _background(background, height, width, rng)                     # (H, W, 3)
    alpha = shape_alpha(attrs["shape"], cx, cy, r, height, width)[..., None]  # (T, H, W, 1)
    clip = bg[None] * (1.0 - alpha) + color * alpha                      # (T, H, W, 3)
    return np.clip(np.round(clip), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
def _subset(values: Sequence[str] | None, known: Sequence[str], kind: str, default: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(default if values is None else values)
    for v in chosen:
        _index(v, tuple(known), kind)
    if not chosen:
        raise ValueError(f"no {kind} selected")
    return tuple(v for v in known if v in chosen)


def combinations(shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                 directions: Sequence[str] | None = None, diagonals: bool = False,
                 holdout: Iterable[str | Sequence[str]] = (), include_holdout: bool = False) -> list[dict[str, Any]]:
    """The (shape, color, direction) combinations a set draws from, in class-id order, each with
    ``class_id`` and ``holdout`` (True for a held-out combination kept by ``include_holdout``)."""
    shapes = _subset(shapes, SHAPES, "shape", SHAPES)
    colors = _subset(colors, COLORS, "color", COLORS)
    directions = _subset(directions, DIRECTIONS, "direction", DIRECTIONS if diagonals else CARDINAL)
    held = {parse_combo(h) for h in holdout}
    for c, s, d in held:
        if s not in shapes or c not in colors or d not in directions:
            raise ValueError(f"held-out combination '{c} {s} {d}' is not among the selected attributes")
    out = []
    for s, c, d in itertools.product(shapes, colors, directions):
        is_held = (c, s, d) in held
        if is_held and not include_holdout:
            continue
        out.append(dict(shape=s, color=c, direction=d, class_id=class_id(s, c, d), holdout=is_held))
    if not out:
        raise ValueError("every combination is held out; nothing to generate")
    return out


def sample_attributes(seed: int, index: int, combos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Attributes of sample ``index``: class-balanced (each block of ``len(combos)`` consecutive
    samples holds every combination once, in an order seeded by ``(seed, block)``); speed and
    background from a generator seeded by ``(seed, index)``."""
    block, pos = divmod(index, len(combos))
    order = np.random.default_rng([seed, 1, block]).permutation(len(combos))
    attrs = dict(combos[int(order[pos])])
    rng = np.random.default_rng([seed, 0, index])
    attrs["speed"] = SPEEDS[rng.integers(len(SPEEDS))]
    attrs["background"] = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    attrs["caption"] = caption(attrs)
    return attrs


def synth_clip(seed: int, index: int, combos: Sequence[Mapping[str, Any]], frames: int, height: int,
               width: int) -> tuple[dict[str, Any], np.ndarray]:
    """Sample ``index`` of a set: ``(attrs, uint8 (T, H, W, 3))``, independent of other samples."""
    attrs = sample_attributes(seed, index, combos)
    return attrs, render_clip(attrs, frames, height, width, np.random.default_rng([seed, 2, index]))


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """Everything that determines a synthetic set's content (saved as ``synth.json``)."""
    num: int
    frames: int
    height: int
    width: int
    fps: float
    seed: int
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    directions: tuple[str, ...]
    holdout: tuple[tuple[str, str, str], ...]
    include_holdout: bool
    layout: str


def synth_dataset(output: str | Path, num: int, frames: int = 17, size: int = 64, fps: float = 8,
                  seed: int = 0, layout: str = "folder", holdout: Iterable[str | Sequence[str]] = (),
                  include_holdout: bool = False, shard_size: int = 1000,
                  shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                  directions: Sequence[str] | None = None, diagonals: bool = False,
                  height: int | None = None, width: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write ``num`` synthetic clips to ``output`` and return a summary dict.

    layout "folder": ``videos/<key>.mp4`` + ``metadata.jsonl`` (one row per clip: key, file, caption,
    class_id, shape, color, direction, speed, background, frames, fps, height, width, holdout).
    layout "shards": raw WebDataset video shards ``shard-%06d.tar`` of ``shard_size`` samples, each
    sample ``<key>.mp4`` + ``<key>.json`` (the metadata row) + ``<key>.txt`` (caption) + ``<key>.cls``,
    written by ``webdataset.ShardWriter`` under a temporary name and renamed when complete.
    Both write ``synth.json`` (the spec when the run starts, the spec and counts when it ends). A
    folder set rerun with the same arguments reuses the clips already written (they are
    deterministic); a folder holding another set, or files this function did not write (no
    ``synth.json``: e.g. a real data set's ``metadata.jsonl`` or ``shard-000000.tar``), is refused.
    """
    with checking():  # everything the caller asked for is checked before the folder is made
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if frames < 2:
            raise ValueError(f"frames must be >= 2 (motion needs two frames), got {frames}")
        if layout not in ("folder", "shards"):
            raise ValueError(f"unknown layout {layout!r}; expected 'folder' or 'shards'")
        if layout == "shards" and shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        height, width = height or size, width or size
        _check_frame_size(height, width)
        combos = combinations(shapes, colors, directions, diagonals, holdout, include_holdout)
        spec = SynthSpec(num=num, frames=frames, height=height, width=width, fps=float(fps), seed=seed,
                         shapes=tuple(sorted({c["shape"] for c in combos}, key=SHAPES.index)),
                         colors=tuple(sorted({c["color"] for c in combos}, key=COLORS.index)),
                         directions=tuple(sorted({c["direction"] for c in combos}, key=DIRECTIONS.index)),
                         holdout=tuple(sorted(parse_combo(h) for h in holdout)),
                         include_holdout=include_holdout, layout=layout)
    out = Path(output)
    spec_path = out / "synth.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text()).get("spec")
        if old != json.loads(json.dumps(dataclasses.asdict(spec))):
            raise UserError(f"{out} already holds a different synthetic set (see {spec_path}); "
                            "choose another output directory or delete it")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} holds files that `ldm data synth` did not write (no synth.json); choose a new or "
                        "empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_path, {"spec": dataclasses.asdict(spec)})  # binds the folder while clips are written
    indices: Iterable[int] = range(num)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="synth", unit="clip")
    rows: list[dict[str, Any]] = []

    def row_for(i: int, attrs: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
        return dict(key=f"{i:06d}", **extra, caption=attrs["caption"], class_id=attrs["class_id"],
                    shape=attrs["shape"], color=attrs["color"], direction=attrs["direction"],
                    speed=attrs["speed"], background=attrs["background"], frames=frames, fps=float(fps),
                    height=height, width=width, holdout=attrs["holdout"])

    shards: list[str] = []
    if layout == "folder":
        (out / "videos").mkdir(exist_ok=True)
        for i in indices:
            file = f"videos/{i:06d}.mp4"
            if (out / file).exists():  # written by an earlier run of the same spec
                attrs = sample_attributes(seed, i, combos)
            else:
                attrs, clip = synth_clip(seed, i, combos, frames, height, width)
                write_frames(out / file, clip, fps)
            rows.append(row_for(i, attrs, file=file))
        tmp = out / ".metadata.jsonl.partial"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out / "metadata.jsonl")
    else:
        _write_shards(out, indices, shard_size, shards, rows,
                      lambda i: synth_clip(seed, i, combos, frames, height, width), row_for, fps)
    summary = dict(spec=dataclasses.asdict(spec), count=len(rows), shards=shards,
                   classes=len({r["class_id"] for r in rows}),
                   holdout_emitted=sum(r["holdout"] for r in rows))
    atomic_write_json(spec_path, summary)
    summary["output"] = str(out)
    return summary


def _write_shards(out: Path, indices: Iterable[int], shard_size: int, shards: list[str],
                  rows: list[dict[str, Any]], make: Any, row_for: Any, fps: float) -> None:
    """Raw video shards via webdataset.ShardWriter; a shard gets its final name only once closed."""
    import webdataset as wds

    for stale in out.glob("shard-*.tar.partial"):
        stale.unlink()

    def finish(name: str) -> None:
        final = name[: -len(".partial")]
        os.replace(name, final)
        shards.append(Path(final).name)

    sink = wds.ShardWriter(str(out / "shard-%06d.tar.partial"), maxcount=shard_size, post=finish, verbose=0)
    try:
        for i in indices:
            attrs, clip = make(i)
            row = row_for(i, attrs)
            rows.append(row)
            sink.write({"__key__": row["key"], "mp4": encode_video(clip, fps),
                        "json": json.dumps(row).encode(), "txt": row["caption"].encode(),
                        "cls": str(row["class_id"]).encode()})
    except BaseException:
        sink.post = None  # an interrupted shard must not be renamed to its final name
        sink.close()
        for partial in out.glob("shard-*.tar.partial"):
            partial.unlink()
        raise
    sink.close()
