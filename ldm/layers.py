"""Shared transformer layers: timestep embedding, 3D RoPE, RMSNorm / QK-norm, adaLN-Zero blocks.

Used by the video DiT (``dit/``) and by diffusion decoders inside autoencoders (Hi-VAE), so they
take what every token sequence in the platform has: hidden states ``x: (B, N, D)``, integer
positions ``(B, N, 3)`` or ``(N, 3)`` over (t, h, w), and optional sequence ids ``(B, N)`` (sample
index per token, -1 for padding) — one description for padded, packed and token-set sequences.

References: DiT (Peebles & Xie 2023: adaLN-Zero, Sec. 3.2; timestep MLP), RoFormer (Su et al.
2021, Eq. 34 for the rotation), SD3 (Esser et al. 2024: RMS QK-norm), PixArt-alpha
(Chen et al. 2023: cross-attention to text between self-attention and MLP).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.attention import attention, check_backend, eager_attention

LAYOUTS = ("full", "spatial", "temporal")


# ------------------------------------------------------------------------------------------
# Timestep embedding
# ------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Transformer / ADM): ``[cos(t w_i), sin(t w_i)]`` with
    ``w_i = max_period^(-i / (dim/2))``. ``t: (B,)`` float -> ``(B, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid of ``t * t_scale`` -> Linear-SiLU-Linear (DiT's timestep MLP).
    ``t_scale = 1000`` puts flow times on the frequency range the sinusoid was designed for."""

    def __init__(self, dim: int, freq_dim: int = 256, t_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.t_scale = freq_dim, t_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for m in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t * self.t_scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


# ------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * g`` over the last dim (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class QKNorm(nn.Module):
    """RMS-normalise queries and keys per head before the dot product (SD3, Esser et al. 2024): keeps
    attention logits bounded in mixed precision."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.q = RMSNorm(head_dim)
        self.k = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q(q), self.k(k)


# ------------------------------------------------------------------------------------------
# 3D rotary position embedding
# ------------------------------------------------------------------------------------------
def rope_axes(head_dim: int, axes: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """``axes`` checked (three positive even dims summing to ``head_dim``), or by default a split of
    the head dim over (t, h, w): equal even shares for h and w, the rest to t (e.g. 64 -> (24, 20,
    20), 72 -> (24, 24, 24), 16 -> (8, 4, 4)). ValueError when the head dim cannot be split."""
    if axes is not None:
        axes = tuple(axes)
        if len(axes) != 3 or sum(axes) != head_dim or any(a % 2 or a <= 0 for a in axes):
            raise ValueError(f"RoPE axes {axes} must be three positive even dims summing to the head dim {head_dim}")
        return axes
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dim >= 6, got {head_dim}")
    share = (head_dim // 3) // 2 * 2
    return head_dim - 2 * share, share, share


class Rope3D(nn.Module):
    """Rotary embedding over integer (t, h, w) positions (RoFormer Eq. 34, one frequency bank per
    axis). The head dim is split into ``axes = (d_t, d_h, d_w)`` (even, summing to the head dim);
    channel pair ``(i, i + d/2)`` is rotated by ``pos[axis(i)] * theta^(-2j / d_axis)``.
    Positions may be any integers (negative, gaps, repeats), so padded, packed and token-set
    sequences all work."""

    def __init__(self, head_dim: int, axes: tuple[int, int, int] | None = None, theta: float = 10000.0):
        super().__init__()
        axes = rope_axes(head_dim, axes)
        self.head_dim, self.axes, self.theta = head_dim, axes, theta
        inv = [theta ** (-torch.arange(0, a, 2, dtype=torch.float64) / a) for a in axes]
        axis_of = torch.cat([torch.full((a // 2,), i) for i, a in enumerate(axes)])
        self.register_buffer("inv_freq", torch.cat(inv).float(), persistent=False)  # (d/2,)
        self.register_buffer("axis_of", axis_of, persistent=False)  # (d/2,)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, N, 3)`` or ``(N, 3)`` int positions -> ``(cos, sin)``, each ``(B|1, 1, N, d)`` over the
        whole head dim, laid out for `apply_rope`: ``cos = [cos | cos]``, ``sin = [-sin | sin]`` of the
        ``d/2`` angles (computed once per forward pass, shared by every layer's queries and keys)."""
        if positions.shape[-1] != 3 or positions.ndim not in (2, 3):
            raise ValueError(f"positions must be (N, 3) or (B, N, 3), got {tuple(positions.shape)}")
        if positions.is_floating_point():
            raise ValueError("RoPE positions must be integers")
        if positions.ndim == 2:
            positions = positions[None]
        angles = positions.float()[..., self.axis_of] * self.inv_freq  # (B, N, d/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate ``x: (B, H, N, d)`` by ``rope = (cos, sin)`` from ``Rope3D`` (in float32): channel pair
    ``(x1, x2) = (x[i], x[i + d/2])`` becomes ``(x1 cos - x2 sin, x2 cos + x1 sin)``, computed as
    ``x * [cos | cos] + [x2 | x1] * [-sin | sin]``: the same floats as those two lines to the bit, in
    four kernels instead of seven (eager runs launch each; h3ae's encoder is launch-bound on a GPU)."""
    cos, sin = rope
    xf = x.float()
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos + torch.cat([x2, x1], -1) * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------
# Token layout shared by the blocks of one forward pass
# ------------------------------------------------------------------------------------------
def group_ids(positions: Tensor, seq_ids: Tensor | None, axes: tuple[int, ...]) -> Tensor:
    """Ids grouping tokens that share their sequence and their positions on ``axes``:
    ``axes=(0,)`` groups a frame (spatial attention), ``axes=(1, 2)`` a spatial site across frames
    (temporal attention). Padding (``seq_ids < 0``) gets -1. Returns ``(B, N)`` long."""
    if positions.ndim == 2:
        B = 1 if seq_ids is None else seq_ids.shape[0]
        positions = positions[None].expand(B, -1, -1)
    B, N, _ = positions.shape
    seq = torch.zeros(B, N, dtype=torch.long, device=positions.device) if seq_ids is None else seq_ids.long()
    key = torch.cat([seq[..., None], positions[..., list(axes)].long()], -1).reshape(B * N, -1)  # (B*N, 1+len(axes))
    ids = torch.unique(key, dim=0, return_inverse=True)[1].reshape(B, N)
    return torch.where(seq >= 0, ids, -1)


def fold_groups(x: Tensor, layout: str, sizes: tuple[int, ...]) -> Tensor:
    """Spatial / temporal groups of a grid sequence as a dense batch: ``x: (B, H, N, d)`` whose
    rows are ``len(sizes)`` blocks of ``T x S_g`` tokens (frame-major, ``T = N / sum(sizes)``),
    concatenated -> ``(B*T, H, sum(sizes), d)`` for ``"spatial"`` (frame t of every block),
    ``(B*sum(sizes), H, T, d)`` for ``"temporal"`` (each site of each block across the frames).
    ``T`` comes from the shape, so a compiled caller does not specialise on it."""
    B, H, N, d = x.shape
    frames = N // sum(sizes)
    if len(sizes) == 1:
        g = x.reshape(B, H, frames, sizes[0], d)
    else:
        g = torch.cat([p.reshape(B, H, frames, s, d) for p, s in zip(x.split([frames * s for s in sizes], 2), sizes)],
                      3)  # (B, H, T, S, d)
    if layout == "spatial":
        return rearrange(g, "b h t s d -> (b t) h s d")
    return rearrange(g, "b h t s d -> (b s) h t d")


def unfold_groups(o: Tensor, layout: str, sizes: tuple[int, ...], batch: int) -> Tensor:
    """Inverse of `fold_groups`: ``(batch*G, H, n, d)`` -> ``(batch, H, N, d)``."""
    if layout == "spatial":
        g = rearrange(o, "(b t) h s d -> b h t s d", b=batch)
    else:
        g = rearrange(o, "(b s) h t d -> b h t s d", b=batch)
    B, H, frames, _, d = g.shape
    if len(sizes) == 1:
        return g.reshape(B, H, frames * sizes[0], d)
    return torch.cat([p.reshape(B, H, frames * s, d) for p, s in zip(g.split(list(sizes), 3), sizes)], 2)


@dataclass
class TokenLayout:
    """What every block of one forward needs about the sequence: positions ``(B|1, N, 3)``,
    sequence ids ``(B, N)`` (None = each row is one complete sequence, the fast path with no
    mask), precomputed RoPE, and the per-sample conditioning index for packed rows.

    ``grids = (T, (S_1, ..., S_k))``, when the producer knows it, says every row is ``k`` blocks of
    ``T x S_g`` tokens, frame-major, concatenated, with no padding, whose spatial groups are frame
    ``t`` of every block and whose temporal groups are each site of each block. Spatial / temporal
    attention then reshapes into a dense batch (`fold_groups`) instead of gathering by ids: no host
    syncs, and the block stays one compiled graph. It must describe the same groups as
    ``ids(layout)`` (tests compare both)."""

    positions: Tensor
    seq_ids: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    cond_index: Tensor | None = None  # (B, N) index into per-sample conditioning rows (packed)
    grids: tuple[int, tuple[int, ...]] | None = None
    _groups: dict[str, Tensor | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.grids is not None:
            frames, sizes = self.grids
            if self.seq_ids is not None or frames * sum(sizes) != self.positions.shape[-2]:
                raise ValueError(f"grids {self.grids} must cover the {self.positions.shape[-2]} tokens of rows "
                                 "without padding (seq_ids None)")

    def fold(self, layout: str) -> tuple[str, tuple[int, ...]] | None:
        """``(layout, sizes)`` for `fold_groups` when ``layout``'s groups are dense, else None."""
        if layout == "full" or self.grids is None:
            return None
        return (layout, self.grids[1])

    def ids(self, layout: str) -> Tensor | None:
        """Attention ids for a block layout: ``"full"`` (the sequence), ``"spatial"`` (tokens of
        one frame: same t), ``"temporal"`` (tokens of one spatial site: same h, w)."""
        if layout == "full":
            return self.seq_ids
        if layout not in self._groups:
            if layout not in LAYOUTS:
                raise ValueError(f"unknown attention layout {layout!r}; expected one of {LAYOUTS}")
            self._groups[layout] = group_ids(self.positions, self.seq_ids, (0,) if layout == "spatial" else (1, 2))
        return self._groups[layout]


# ------------------------------------------------------------------------------------------
# Attention modules and the block
# ------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 3D RoPE through ``ldm.attention``.

    ``attention_wrapper`` (default None) is a seam for code outside the model: a callable
    ``fn(attend, q, k, v) -> o`` run in place of ``attend(q, k, v)`` on the rotated ``(B, H, N, d)``
    heads, where ``attend`` is this module's attention call. Sequence parallelism
    (``launch.sequence_parallel``) uses it to exchange q/k/v across ranks; the module itself stays
    single-device and its parameters are unchanged."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.backend = heads, "auto"
        self.attention_wrapper: Callable[..., Tensor] | None = None
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads) if qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, seq_ids: Tensor | None = None,
                fold: tuple[str, tuple[int, ...]] | None = None) -> Tensor:
        """``seq_ids``: which tokens attend together (None = the whole row); ``fold``: the same as
        dense groups (`TokenLayout.fold`), used instead of ``seq_ids``."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if self.norm is not None:
            q, k = self.norm(q, k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if fold is not None:  # on the whole sequence (after a sequence-parallel exchange)
                B = q.shape[0]
                q, k, v = (fold_groups(t, *fold) for t in (q, k, v))
                return unfold_groups(attention(q, k, v, backend=self.backend), *fold, B)  # (B, H, N, d)
            return attention(q, k, v, backend=self.backend, seq_ids=seq_ids)  # (B, H, N, d)

        o = attend(q, k, v) if self.attention_wrapper is None else self.attention_wrapper(attend, q, k, v)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Queries from the sequence, keys/values from a context (text) of width ``context_dim``;
    ``kv_seq_ids`` marks the context tokens each query may see (-1 = masked out). ``inner_dim``
    (default ``dim``) is the width of the attention itself, ``heads * head_dim``: wide queries
    (patchified feature maps) attend in a narrower space and are projected back to ``dim``.
    ``qkv_bias=False`` drops the biases of the query/key/value projections."""

    def __init__(self, dim: int, context_dim: int, heads: int, qk_norm: bool = True,
                 inner_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        inner = dim if inner_dim is None else inner_dim
        if inner % heads:
            raise ValueError(f"attention width {inner} is not divisible by heads {heads}")
        self.heads, self.backend = heads, "auto"
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * inner, bias=qkv_bias)
        self.norm = QKNorm(inner // heads) if qk_norm else None
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor, seq_ids: Tensor | None = None,
                kv_seq_ids: Tensor | None = None) -> Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        if self.norm is not None:
            q, k = self.norm(q, k)
        if seq_ids is not None and kv_seq_ids is None:
            kv_seq_ids = torch.zeros(context.shape[:2], dtype=torch.long, device=context.device)
        o = attention(q, k, v, backend=self.backend, seq_ids=seq_ids, kv_seq_ids=kv_seq_ids)  # (B, H, N, d)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` (DiT Sec. 3.2)."""
    return x * (1 + scale) + shift


def expand_modulation(mod: Tensor, cond_index: Tensor | None) -> Tensor:
    """Per-sample modulation ``(B, k)`` -> per-row ``(B, 1, k)``, or per-token ``(B, N, k)`` when
    ``cond_index`` (packed rows holding several samples) is given."""
    return mod[:, None] if cond_index is None else mod[cond_index.clamp(min=0)]


class TransformerBlock(nn.Module):
    """DiT block with adaLN-Zero (DiT Sec. 3.2) plus optional cross-attention (PixArt-alpha):

        x = x + g1 * SelfAttn(modulate(LN(x), b1, s1))      # RoPE, QK-norm, layout ids
        x = x + CrossAttn(LN'(x), context)                   # optional; masked context
        x = x + g2 * MLP(modulate(LN(x), b2, s2))

    ``(b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))`` with the Linear zero-initialised, so a fresh
    block is the identity. ``layout`` picks which tokens attend together: ``"full"`` (the whole
    sequence), ``"spatial"`` (within a frame) or ``"temporal"`` (across frames at one site).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 qk_norm: bool = True, layout: str = "full", cond_dim: int | None = None):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown attention layout {layout!r}; expected one of {LAYOUTS}")
        self.layout = layout
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, qk_norm)
        self.cross = CrossAttention(dim, context_dim, heads, qk_norm) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Linear(cond_dim or dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.compiled_core: Callable[..., Tensor] | None = None  # set by compile_blocks

    def forward(self, x: Tensor, c: Tensor, layout: TokenLayout, context: Tensor | None = None,
                context_ids: Tensor | None = None) -> Tensor:
        """``x: (B, N, D)``; ``c: (B, D)`` conditioning per row (per sample when
        ``layout.cond_index`` is set); ``context: (B, L, Dc)`` with ``context_ids: (B, L)``
        (sample id per context token, -1 masked; None = all visible)."""
        if self.cross is not None and context is None:
            raise ValueError("this block has cross-attention: give a context")
        fold = layout.fold(self.layout)
        ids = None if fold is not None else layout.ids(self.layout)
        args = (x, c, layout.rope, ids, layout.seq_ids, layout.cond_index, context, context_ids, fold)
        return self.core(*args) if self.compiled_core is None else self.compiled_core(self, *args)

    def core(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None, ids: Tensor | None,
             seq_ids: Tensor | None, cond_index: Tensor | None, context: Tensor | None,
             context_ids: Tensor | None, fold: tuple[str, tuple[int, ...]] | None = None) -> Tensor:
        """The block's math on plain tensors (``ids``: attention ids of this block's layout, or
        ``fold``: its dense groups; ``seq_ids``: sequence ids for the cross-attention queries): the
        region that ``compile_blocks`` compiles, with no Python objects to guard on besides the
        tensors and ``fold``'s sizes."""
        mod = expand_modulation(self.ada(F.silu(c)), cond_index)  # (B, 1|N, 6D)
        b1, s1, g1, b2, s2, g2 = mod.chunk(6, -1)
        x = x + g1 * self.attn(modulate(self.norm1(x), b1, s1), rope, ids, fold)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, seq_ids, context_ids)
        return x + g2 * self.mlp(modulate(self.norm2(x), b2, s2))


class FinalLayer(nn.Module):
    """DiT's output head: adaLN (shift, scale from c) -> Linear, both zero-initialised so the
    network's first prediction is exactly zero."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(cond_dim or dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)
        for m in (self.ada, self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, c: Tensor, cond_index: Tensor | None = None) -> Tensor:
        shift, scale = expand_modulation(self.ada(F.silu(c)), cond_index).chunk(2, -1)
        return self.linear(modulate(self.norm(x), shift, scale))


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Route every attention module under ``module`` through ``backend`` (see ``ldm.attention``)."""
    check_backend(backend)
    for m in module.modules():
        if isinstance(m, (SelfAttention, CrossAttention)):
            m.backend = backend


RECOMPILE_LIMIT = 16
# torch.compile modes the trainers, samplers and `ldm extract` accept: inductor's default (cuBLAS matmuls, fused
# elementwise kernels), or Triton matmul templates autotuned per shape with the elementwise work
# fused into their epilogues (compiles take minutes; CUDA graphs stay off: shapes vary, and
# DeepSpeed's hooks run between blocks)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# an autoencoder's encode (`ldm extract --compile`) runs one shape again and again, no backward: CUDA graphs
# too ("reduce-overhead": the batch's kernels replayed with one launch)
ENCODE_COMPILE_MODES = (*COMPILE_MODES, "reduce-overhead")


def torch_compile_mode(mode: str | None, allowed: tuple[str, ...] = COMPILE_MODES) -> str | None:
    """``mode`` (one of ``allowed``, None = ``"default"``) as ``torch.compile`` takes it."""
    if (mode or "default") not in allowed:
        raise ValueError(f"compile mode must be one of {allowed}, got {mode!r}")
    return None if mode in (None, "default") else mode


def compile_blocks(module: nn.Module, dynamic: bool | None = None, mode: str | None = None,
                   backend: str | Callable = "inductor") -> int:
    """Regional compilation: compile ``TransformerBlock.core`` once with ``torch.compile`` and let
    every block under ``module`` run it (returns how many). All blocks share one compiled function:
    dynamo treats their parameters as inputs, so one compile serves the whole trunk, and a new token
    count or batch recompiles once with dynamic sizes instead of once per shape (``dynamic=None``).
    Only the tensor math is compiled: the layout's id computation, the attention kernels that
    need host-side bookkeeping (packed or padded ids, flash-attn, xformers) and sequence-parallel
    hooks stay eager; dense spatial / temporal groups (`TokenLayout.grids`) are compiled in.
    Parameters, state dicts and checkpoints are unchanged; ``uncompile_blocks`` undoes it.

    The shared function has one graph per block kind (full, spatial, temporal) and size regime
    (the first sizes, dynamic sizes, batch 1, one frame): dynamo's per-function recompile limit
    is raised to ``RECOMPILE_LIMIT`` (from its default 8) so a factorised trunk does not fall back
    to eager after its warm-up. ``mode``: one of `COMPILE_MODES` (None = ``"default"``)."""
    mode = torch_compile_mode(mode)
    import torch._dynamo  # the compiler: imported when something is compiled, not at every start-up

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    eager_attention()  # the eager part of attention, marked for the compiler before it traces a block
    fn = torch.compile(TransformerBlock.core, dynamic=dynamic, mode=mode, backend=backend)
    blocks = [m for m in module.modules() if isinstance(m, TransformerBlock)]
    for blk in blocks:
        blk.compiled_core = fn
    return len(blocks)


def uncompile_blocks(module: nn.Module) -> None:
    """Run every ``TransformerBlock`` under ``module`` eagerly again."""
    for m in module.modules():
        if isinstance(m, TransformerBlock):
            m.compiled_core = None
