"""Spatial tiling with blended seams for grid autoencoders (``Autoencoder.enable_tiling``).

A large frame is cut into overlapping square tiles; each tile goes through the family's own
``_encode`` (video tile -> latent tile) or ``_decode`` (latent tile -> video tile), and the tile
outputs are blended over the overlaps into one output of exactly the untiled shape. The work any
layer sees is one tile (times the clip's frames), so activation memory stops growing with H x W.

The idea is diffusers' ``AutoencoderKL.enable_tiling`` (``tile_sample_min_size`` = our ``tile``,
``tile_overlap_factor`` * tile = our ``overlap``, linear cross-fades in ``blend_v`` / ``blend_h``);
this module differs in three ways, all in `tile_spans` / `blend_weights`:

- the last tile on an axis is moved back to end at the border, so every tile has the full size
  (no thin leftover tiles) and the output is the untiled shape without padding;
- every output position is a normalised weighted average of the tiles that cover it, each tile's
  weight a separable linear ramp across its overlaps (1 inside, cross-fading over the overlap);
- ``margin``: output positions within ``margin`` of a tile's inner edge get weight 0 (the ramp
  runs over the middle ``overlap - 2 * margin`` of the overlap). Those are the positions whose
  receptive field a tile cuts off (they see zero padding instead of the neighbour's pixels).

Exactness: a tile's output at a position equals the untiled output when that position's receptive
field lies inside the tile and the network has no frame-wide operations. So for a model whose
receptive field reaches ``r`` output positions (latent cells when encoding, pixels when decoding),
``margin >= r`` makes tiled == untiled: every weight that is not zero sits on an exact value and the
weights sum to 1 (tests/test_tiling.py). The real families are not such models: GroupNorm takes its
statistics over the whole frame and the mid-block attention looks at every position, so a tile sees
other statistics and context than the full frame; there tiling is an approximation, measured in
README "Tiling for large frames".

All settings are in video pixels and must be multiples of the spatial factor ``f``: a latent tile
is ``tile / f`` cells. Every tensor made here is created on the input's device.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldm.latent import Cond, Latent

if TYPE_CHECKING:
    from autoencoders.base import Autoencoder

Span = tuple[int, int]  # [start, end) along one axis


@dataclass(frozen=True)
class Tiling:
    """Tile settings in video pixels: square tiles of ``tile``, neighbours sharing ``overlap``
    pixels, and ``margin`` pixels at each inner tile edge left out of the blend."""

    tile: int
    overlap: int
    margin: int = 0

    def check(self, spatial_factor: int, family: str) -> None:
        """Raise ValueError for settings this autoencoder cannot tile with."""
        f = spatial_factor
        for name in ("tile", "overlap", "margin"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{family}: tiling {name} must be an int (pixels), got {value!r}")
        if self.tile <= 0 or self.tile % f:
            raise ValueError(f"{family}: tile must be a positive multiple of the spatial factor {f}, got {self.tile}")
        if self.overlap < 0 or self.overlap % f or self.overlap >= self.tile:
            raise ValueError(f"{family}: overlap must be a multiple of the spatial factor {f} in [0, tile={self.tile}), "
                             f"got {self.overlap}")
        if self.margin < 0 or self.margin % f or 2 * self.margin > self.overlap:
            raise ValueError(f"{family}: margin must be a multiple of the spatial factor {f} with 2 * margin <= "
                             f"overlap={self.overlap}, got {self.margin}")

    def scaled(self, factor: int) -> "Tiling":
        """The same settings in latent cells (pixels / ``factor``)."""
        return Tiling(self.tile // factor, self.overlap // factor, self.margin // factor)


def parse_tile(spec: str) -> tuple[int, int | None]:
    """A CLI ``--tile`` value, ``TILE`` or ``TILE:OVERLAP`` in video pixels -> ``(tile, overlap)``,
    overlap None when not given."""
    try:
        parts = [int(x) for x in spec.split(":")]
    except ValueError:
        raise ValueError(f"--tile must be TILE or TILE:OVERLAP in pixels (e.g. 256 or 256:64), got {spec!r}") from None
    if len(parts) not in (1, 2):
        raise ValueError(f"--tile must be TILE or TILE:OVERLAP in pixels (e.g. 256 or 256:64), got {spec!r}")
    return parts[0], parts[1] if len(parts) == 2 else None


def configure_inference(ae: "Autoencoder", tile: str | None = None, chunk_frames: int | None = None) -> None:
    """The memory knobs of the inference verbs (``--tile``, ``--chunk-frames``) on ``ae``. The default
    overlap is ``TILE / 4`` rounded down to a multiple of the spatial factor, so a bare ``TILE`` the
    model takes always gives an overlap it takes."""
    if tile:
        size, overlap = parse_tile(tile)
        if overlap is None:
            f = ae.spatial_factor if ae.spatial_tiling else 1  # a model that cannot tile says so in enable_tiling
            overlap = size // 4 // f * f
        ae.enable_tiling(size, overlap)
    if chunk_frames:
        ae.set_chunk_frames(chunk_frames)


def tile_spans(size: int, tile: int, overlap: int) -> list[Span]:
    """The tiles covering ``[0, size)``: starts every ``tile - overlap``, the last one moved back to end
    at ``size`` (so neighbours overlap by ``overlap`` or more and every tile is ``tile`` long); one
    span ``[0, size)`` when the axis fits in a tile."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def blend_weights(spans: list[Span], margin: int, device: torch.device) -> list[Tensor]:
    """One 1-D float32 weight per span, over that span: 1 inside, a linear ramp across each overlap
    with a neighbour (0 for the ``margin`` positions at the tile's inner edge), normalised so the
    weights of the spans covering a position sum to 1."""
    total = torch.zeros(spans[-1][1], device=device)
    weights = []
    for i, (s, e) in enumerate(spans):
        y = torch.arange(e - s, device=device, dtype=torch.float32)
        w = torch.ones_like(y)
        if i > 0:  # ramp up over the overlap with the previous tile
            ramp = spans[i - 1][1] - s - 2 * margin + 1
            w = torch.minimum(w, ((y - margin + 1) / ramp).clamp(0, 1))
        if i < len(spans) - 1:  # ramp down over the overlap with the next tile
            ramp = e - spans[i + 1][0] - 2 * margin + 1
            w = torch.minimum(w, ((e - s - margin - y) / ramp).clamp(0, 1))
        total[s:e] += w
        weights.append(w)
    return [w / total[s:e] for w, (s, e) in zip(weights, spans)]


def _blend(run: Callable[[Span, Span], dict[str, Tensor]], rows: list[Span], cols: list[Span],
           out_rows: list[Span], out_cols: list[Span], margin: int, device: torch.device) -> dict[str, Tensor]:
    """Run every tile (``run(row_span, col_span)`` -> named ``B c t h w`` tensors covering
    ``out_rows[i] x out_cols[j]``) and sum the outputs weighted by `blend_weights`, in float32 at
    least (bf16 weights would not sum to 1), returned in the tiles' dtype."""
    wy, wx = blend_weights(out_rows, margin, device), blend_weights(out_cols, margin, device)
    out: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for (row, (ys, ye)), w_row in zip(zip(rows, out_rows), wy):
        for (col, (xs, xe)), w_col in zip(zip(cols, out_cols), wx):
            parts = run(row, col)
            w = w_row[:, None] * w_col[None, :]  # (h_tile, w_tile)
            for name, v in parts.items():
                if v.shape[-2:] != w.shape:
                    raise ValueError(f"a tile gave {name} of spatial size {tuple(v.shape[-2:])}, expected "
                                     f"{tuple(w.shape)}: the model's output does not follow its spatial factor")
                if name not in out:
                    dtypes[name] = v.dtype
                    out[name] = v.new_zeros(*v.shape[:-2], out_rows[-1][1], out_cols[-1][1],
                                            dtype=torch.promote_types(v.dtype, torch.float32))
                out[name][..., ys:ye, xs:xe] += v * w  # (B, c, t, h_tile, w_tile)
    return {name: x.to(dtypes[name]) for name, x in out.items()}


def _crop_cond(cond: Cond | None, size: tuple[int, int], rows: Span, cols: Span) -> Cond | None:
    """``cond`` for one pixel tile: ``first_frame`` pixels (H3AE's image condition) are cropped to the
    tile; text and class ids are global and pass unchanged."""
    if cond is None or cond.first_frame is None:
        return cond
    frame = cond.first_frame
    if tuple(frame.shape[-2:]) != size:
        raise ValueError(f"tiling crops cond.first_frame to each tile, so it must have the video's height and "
                         f"width {size}, got {tuple(frame.shape[-2:])}")
    return dataclasses.replace(cond, first_frame=frame[..., rows[0]:rows[1], cols[0]:cols[1]])


def tiled_encode(ae: "Autoencoder", video: Tensor, cond: Cond | None, tiling: Tiling) -> Latent:
    """``ae._encode`` tile by tile: ``B C T H W`` -> a grid latent of the untiled shape (mean and
    log-variance blended alike)."""
    f, (height, width) = ae.spatial_factor, video.shape[-2:]
    rows, cols = tile_spans(height, tiling.tile, tiling.overlap), tile_spans(width, tiling.tile, tiling.overlap)
    if len(rows) == len(cols) == 1:
        return ae._encode(video, cond)

    def run(r: Span, c: Span) -> dict[str, Tensor]:
        latent = ae._encode(video[..., r[0]:r[1], c[0]:c[1]], _crop_cond(cond, (height, width), r, c))
        if latent.form != "grid" or latent.aux:
            raise ValueError(f"{ae.family}: tiling needs a grid latent without side information")
        return {**{f"parts.{k}": v for k, v in latent.parts.items()},
                **{f"logvar.{k}": v for k, v in latent.logvar.items()}}

    def down(spans: list[Span]) -> list[Span]:
        return [(s // f, e // f) for s, e in spans]

    out = _blend(run, rows, cols, down(rows), down(cols), tiling.margin // f, video.device)
    pick = lambda prefix: {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}  # noqa: E731
    return Latent(pick("parts."), form="grid", logvar=pick("logvar."))


def tiled_decode(ae: "Autoencoder", latent: Latent, cond: Cond | None, tiling: Tiling) -> Tensor:
    """``ae._decode`` on latent tiles of ``tile / f`` cells: grid latent -> ``B C T H W`` of the
    untiled shape."""
    f, cells = ae.spatial_factor, tiling.scaled(ae.spatial_factor)
    if latent.form != "grid" or "z" not in latent.parts or latent["z"].ndim != 5:
        raise ValueError(f"{ae.family}: tiled decode expects a grid latent with part 'z' (B c t h w), got form "
                         f"{latent.form!r} with parts {latent.shapes()}")
    h, w = latent["z"].shape[-2:]
    rows, cols = tile_spans(h, cells.tile, cells.overlap), tile_spans(w, cells.tile, cells.overlap)
    if len(rows) == len(cols) == 1:
        return ae._decode(latent, cond)

    def up(spans: list[Span]) -> list[Span]:
        return [(s * f, e * f) for s, e in spans]

    def run(r: Span, c: Span) -> dict[str, Tensor]:
        crop = lambda d: {k: v[..., r[0]:r[1], c[0]:c[1]] for k, v in d.items()}  # noqa: E731
        tile = latent.replace(crop(latent.parts), logvar=crop(latent.logvar))
        (pr,), (pc,) = up([r]), up([c])
        return {"video": ae._decode(tile, _crop_cond(cond, (h * f, w * f), pr, pc))}

    return _blend(run, rows, cols, up(rows), up(cols), tiling.margin, latent["z"].device)["video"]
