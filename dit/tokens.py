"""Latent <-> token adapters: any ``Latent`` becomes a list of typed token groups and back.

One group per latent part (ARCHITECTURE.md, "the latent contract"):

- a grid part ``(B, c, t, h, w)`` is zero-padded to a multiple of its patch ``(pt, ph, pw)`` and
  patchified into ``nt * nh * nw`` tokens of ``pt * ph * pw * c`` features, at integer positions
  ``(t, h, w)`` in patch units; the crop is remembered, so ``detokenize`` restores the exact shape;
- a token-set part ``(B, f, n, c)`` (Hi-VAE global/detailed motion) passes through as ``f * n``
  tokens of ``c`` features at positions ``(s * f, n, 0)``, where the time stride
  ``s = ceil(F / f)`` (``set_time_strides``) spreads its ``f`` slots over the ``F`` slots of the
  longest token set, so the parts share one clock: Hi-VAE's global slot ``f`` (``f_g = T / 2``)
  sits at frame ``2 f``, beside detailed slot ``2 f`` (``f_d = T``), and the content grid
  ``(c, 1, h, w)`` at ``t = 0`` is the first frame. With a single token set (or none) ``s = 1``;
- a variable-length latent (``Latent.form == "varlen"``, grid parts padded along t, valid frames in
  ``aux["length"]``) yields a ``(B, N)`` validity mask; frames past a sample's length are zeroed on
  the way in and on the way out. ``packing`` turns the padded rows into one packed row
  (valid tokens of all samples concatenated, with sequence ids and ``cu_seqlens``).

The adapter has no weights; each group's input projection and output head live in the model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ldm.attention import cu_seqlens_from_lengths
from ldm.latent import Latent, part_tokens

GRID, SET = "grid", "set"


@dataclass(frozen=True)
class PartSpec:
    """How one latent part becomes tokens: ``kind`` grid (``c t h w``) or set (``f n c``)."""

    name: str
    kind: str
    channels: int
    patch: tuple[int, int, int] = (1, 1, 1)

    @property
    def token_dim(self) -> int:
        return self.channels * math.prod(self.patch)


def part_specs(parts: Mapping[str, tuple[int, ...]], patch: tuple[int, int, int] = (1, 2, 2),
               part_patch: Mapping[str, tuple[int, int, int]] | None = None) -> list[PartSpec]:
    """Specs from per-sample part shapes (``LatentSpec.parts``): 4-D shapes are grids patchified
    with ``part_patch.get(name, patch)``, 3-D shapes are token sets."""
    part_patch = dict(part_patch or {})
    unknown = set(part_patch) - set(parts)
    if unknown:
        raise ValueError(f"part_patch names unknown parts {sorted(unknown)}; parts are {sorted(parts)}")
    specs = []
    for name, shape in parts.items():
        if len(shape) == 4:
            p = tuple(part_patch.get(name, patch))
            if len(p) != 3 or any(int(x) < 1 for x in p):
                raise ValueError(f"patch for part {name!r} must be three positive ints, got {p}")
            specs.append(PartSpec(name, GRID, int(shape[0]), p))
        elif len(shape) == 3:
            if name in part_patch:
                raise ValueError(f"part {name!r} is a token set (f n c): it takes no patch")
            specs.append(PartSpec(name, SET, int(shape[2])))
        else:
            raise ValueError(f"part {name!r} has shape {shape}: neither a grid (c t h w) nor a token set (f n c)")
    return specs


def count_tokens(parts: Mapping[str, tuple[int, ...]], specs: list[PartSpec]) -> int:
    """Tokens the adapter makes for per-sample part shapes (``ldm.latent.part_tokens``)."""
    by_name = {s.name: s for s in specs}
    return sum(part_tokens(shape, by_name[name].patch) for name, shape in parts.items())


def set_time_strides(slots: Mapping[str, int]) -> dict[str, int]:
    """Temporal position stride of each token-set part from its slot count ``f`` (``slots``):
    ``ceil(F / f)`` with ``F`` the largest ``f``, the smallest integer stride ``s`` with
    ``ceil(F / s) = f``. Exact for parts made by striding the longest one's time axis by ``s`` when
    ``s`` divides ``F``, and for ``s = 2`` at any ``F`` (Hi-VAE: ``f_g = ceil(T / 2)``)."""
    longest = max(slots.values(), default=1)
    return {name: -(-longest // f) for name, f in slots.items()}


@dataclass
class GroupLayout:
    """Where one group sits in the concatenated sequence and how to undo its tokenisation."""

    spec: PartSpec
    shape: tuple[int, ...]  # per-sample part shape without channels: (t, h, w) or (f, n)
    grid: tuple[int, int, int]  # tokens along (t, h, w); (f, n, 1) for sets
    offset: int
    length: int
    time_stride: int = 1  # temporal position of token (t, ., .) is time_stride * t (sets: set_time_strides)


@dataclass
class Tokens:
    """A batch as token groups: per-group features ``(B, N_g, token_dim)``, positions ``(B, N, 3)``
    over the concatenated sequence, and ``valid: (B, N)`` (None when every token is real)."""

    features: dict[str, Tensor]
    groups: list[GroupLayout]
    positions: Tensor
    valid: Tensor | None
    lengths: Tensor | None

    @property
    def num_tokens(self) -> int:
        return sum(g.length for g in self.groups)

    def group(self, name: str) -> GroupLayout:
        for g in self.groups:
            if g.spec.name == name:
                return g
        raise KeyError(f"no token group {name!r}; groups are {[g.spec.name for g in self.groups]}")

    def split(self, x: Tensor) -> dict[str, Tensor]:
        """``(B, N, ...)`` over the whole sequence -> per-group slices."""
        return {g.spec.name: x[:, g.offset:g.offset + g.length] for g in self.groups}


def _frame_mask(lengths: Tensor, t: int) -> Tensor:
    return torch.arange(t, device=lengths.device)[None] < lengths[:, None]  # (B, t)


def tokenize(x: Mapping[str, Tensor], specs: list[PartSpec], lengths: Tensor | None = None) -> Tokens:
    """Turn latent parts into token groups, in the order of ``specs``. ``lengths`` (valid frames
    per sample) defaults to ``aux["length"]`` of a varlen ``Latent``."""
    if lengths is None and isinstance(x, Latent) and x.form == "varlen":
        lengths = x.aux["length"]
    parts = dict(x.parts) if isinstance(x, Latent) else dict(x)
    names = [s.name for s in specs]
    if set(parts) != set(names):
        raise ValueError(f"latent parts {sorted(parts)} do not match the model's parts {sorted(names)}")
    B = parts[names[0]].shape[0]
    if lengths is not None:
        lengths = lengths.to(torch.long)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must be ({B},), got {tuple(lengths.shape)}")
    strides = set_time_strides({s.name: max(1, parts[s.name].shape[1]) for s in specs
                                if s.kind == SET and parts[s.name].ndim == 4})
    features, groups, positions, valid = {}, [], [], []
    offset = 0
    for s in specs:
        v = parts[s.name]
        if v.shape[0] != B:
            raise ValueError(f"part {s.name!r} has batch {v.shape[0]}, expected {B}")
        if s.kind == GRID:
            if v.ndim != 5 or v.shape[1] != s.channels:
                raise ValueError(f"grid part {s.name!r} must be (B, {s.channels}, t, h, w), got {tuple(v.shape)}")
            T, H, W = v.shape[2:]
            pt, ph, pw = s.patch
            if lengths is not None:
                v = v * _frame_mask(lengths, T)[:, None, :, None, None].to(v.dtype)
            v = F.pad(v, (0, -W % pw, 0, -H % ph, 0, -T % pt))
            grid = (-(-T // pt), -(-H // ph), -(-W // pw))
            features[s.name] = rearrange(v, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
            shape = (T, H, W)
        else:
            if v.ndim != 4 or v.shape[3] != s.channels:
                raise ValueError(f"token-set part {s.name!r} must be (B, f, n, {s.channels}), got {tuple(v.shape)}")
            if lengths is not None:
                raise ValueError(f"varlen latents are supported for grid parts only; {s.name!r} is a token set")
            grid = (v.shape[1], v.shape[2], 1)
            features[s.name] = rearrange(v, "b f n c -> b (f n) c")
            shape = tuple(v.shape[1:3])
        stride = strides.get(s.name, 1)
        axes = [torch.arange(n, device=v.device) for n in grid]
        axes[0] = axes[0] * stride
        pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (N_g, 3)
        positions.append(pos)
        n = pos.shape[0]
        if lengths is not None:
            frames = -(-lengths // s.patch[0])  # valid patch-frames per sample
            valid.append(pos[None, :, 0] < frames[:, None])  # (B, N_g)
        groups.append(GroupLayout(s, shape, grid, offset, n, stride))
        offset += n
    pos = torch.cat(positions)[None].expand(B, -1, -1)  # (B, N, 3)
    return Tokens(features, groups, pos, torch.cat(valid, 1) if lengths is not None else None, lengths)


def detokenize(features: Mapping[str, Tensor], tokens: Tokens) -> dict[str, Tensor]:
    """Inverse of ``tokenize`` for the groups named in ``features`` (``(B, N_g, token_dim)`` each):
    un-patchify, crop the padding, zero frames past each sample's length."""
    out = {}
    for name, f in features.items():
        g = tokens.group(name)
        s = g.spec
        if f.shape[1:] != (g.length, s.token_dim):
            raise ValueError(f"group {name!r} needs features (B, {g.length}, {s.token_dim}), got {tuple(f.shape)}")
        if s.kind == GRID:
            nt, nh, nw = g.grid
            pt, ph, pw = s.patch
            v = rearrange(f, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                          t=nt, h=nh, w=nw, pt=pt, ph=ph, pw=pw)
            T, H, W = g.shape
            v = v[:, :, :T, :H, :W]  # (B, c, T, H, W)
            if tokens.lengths is not None:
                v = v * _frame_mask(tokens.lengths, T)[:, None, :, None, None].to(v.dtype)
        else:
            v = rearrange(f, "b (f n) c -> b f n c", f=g.grid[0], n=g.grid[1])
        out[name] = v
    return out


@dataclass
class Packing:
    """Padded rows ``(B, N)`` <-> one packed row ``(1, T)`` of the valid tokens, sample by sample."""

    valid: Tensor  # (B, N) bool
    seq_ids: Tensor  # (1, T) sample index of each packed token
    cu_seqlens: Tensor  # (B + 1,) int32
    max_seqlen: int

    def pack(self, x: Tensor) -> Tensor:
        """``(B, N, ...)`` -> ``(1, T, ...)``."""
        return x[self.valid][None]

    def unpack(self, x: Tensor) -> Tensor:
        """``(1, T, ...)`` -> ``(B, N, ...)`` with zeros at padding."""
        out = x.new_zeros(*self.valid.shape, *x.shape[2:])
        return out.index_put((self.valid,), x[0])


def packing(valid: Tensor) -> Packing:
    """Build the packing of a ``(B, N)`` validity mask."""
    counts = valid.sum(1)  # (B,)
    rows = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)
    return Packing(valid, rows[valid][None], cu_seqlens_from_lengths(counts), int(counts.max()))


__all__ = ["GRID", "SET", "PartSpec", "part_specs", "count_tokens", "set_time_strides", "GroupLayout",
           "Tokens", "tokenize", "detokenize", "Packing", "packing"]
