"""One attention entry point for every model in the platform (STYLE.md 6).

``attention(q, k, v, ...)`` computes softmax(q k^T * scale + mask) v  (Vaswani et al. 2017, Eq. 1)
with tensors in the layout ``(B, heads, N, d)`` — batch, heads, sequence, head dim — for queries
(``N = Nq``) and keys/values (``N = Nk``). The output has the layout of ``q``.

Which tokens may attend to which is given in one of three ways, combinable where a backend allows:

- ``mask``: a bool tensor broadcastable to ``(B, heads, Nq, Nk)``; True = may attend.
- ``seq_ids`` / ``kv_seq_ids``: ``(B, Nq)`` / ``(B, Nk)`` integer ids. A query attends to the keys
  of its own row with the same id; id ``-1`` marks padding. This one form covers padded batches
  (ids 0 / -1), packed sequences (several samples concatenated in one row, ids 0, 1, 2, ...) and
  grouped attention (tokens grouped by frame or by spatial position). ``kv_seq_ids`` defaults to
  ``seq_ids`` (self-attention); ``kv_seq_ids`` alone is a key-padding mask (every key with an id
  >= 0 is visible to every query of its row).
- ``cu_seqlens``: ``(S + 1,)`` cumulative lengths of S sequences packed along N with ``B == 1`` —
  flash-attn's varlen convention, for self-attention. Other backends turn it into ``seq_ids``.

``causal=True`` lets a query see keys at the same or earlier index (within its sequence when ids
are given); it is defined for self-attention (``Nq == Nk``) only.

A query that may attend to no key at all (padding, or a sequence with no keys) gets a zero output
on every backend, so padded batches never produce NaNs.

Backends (``backend=``): ``"sdpa"`` (default; ``torch.nn.functional.scaled_dot_product_attention``;
ids are served by gathering each sequence into a padded group, so packed and grouped attention cost
what the groups cost), ``"flash"`` (FlashAttention-3 when installed, else flash-attn 2; fp16/bf16 on CUDA; ids and ``cu_seqlens`` via its
varlen kernel; no arbitrary masks), ``"xformers"`` (``memory_efficient_attention`` on CUDA; ids via
block-diagonal biases), ``"flex"`` (``torch.nn.attention.flex_attention`` with a block mask built from
the ids / mask / causality; compiled on CUDA, eager elsewhere — torch has no FlexAttention
backward on CPU, so there it serves inference and tests), ``"math"`` (the reference: explicit
float32 softmax over a dense mask), and ``"auto"`` (`auto_choice`: a varlen kernel -- flash, then
xformers -- for calls with ids when installed; FlashAttention-3, else sdpa, for plain calls).
Naming a backend that is not installed or cannot run this call is an error that says why — never a
silent fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "flash", "xformers", "flex", "math")
_HALF = (torch.float16, torch.bfloat16)


class AttentionBackendError(RuntimeError):
    """An explicitly named attention backend is missing or cannot run the given call."""


# ------------------------------------------------------------------------------------------
# Optional kernels, imported lazily
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Flash:
    """flash-attn's two entry points, from FlashAttention-3 (``flash_attn_interface``, Hopper) when
    installed, else FlashAttention-2 (``flash_attn``); both take ``(B, N, H, d)`` / packed
    ``(T, H, d)`` tensors and the same leading arguments."""

    func: object
    varlen_func: object
    version: int


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # FA3 releases return (out, lse) or out


@functools.cache
def _flash_module() -> _Flash | None:
    try:
        import flash_attn_interface as fa3
        return _Flash(fa3.flash_attn_func, fa3.flash_attn_varlen_func, 3)
    except ImportError:
        pass
    try:
        import flash_attn
    except ImportError:
        return None
    return _Flash(flash_attn.flash_attn_func, flash_attn.flash_attn_varlen_func, 2)


# Which optional kernels are installed, known without importing them, so that ``"auto"`` resolves
# with plain Python inside a compiled region.
_INSTALLED = {name: any(importlib.util.find_spec(m) is not None for m in mods)
              for name, mods in (("flash", ("flash_attn_interface", "flash_attn")),
                                 ("flash3", ("flash_attn_interface",)), ("xformers", ("xformers",)))}


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


@functools.cache
def _flex_module():
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:
        return None
    return flex


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_module().flex_attention, dynamic=False)


def unusable_reason(backend: str, q: Tensor, mask: Tensor | None = None) -> str | None:
    """Why ``backend`` cannot run attention on tensors like ``q`` (with a dense ``mask``), or None."""
    if backend not in BACKENDS or backend == "auto":
        return f"unknown attention backend {backend!r}; expected one of {BACKENDS[1:]} or 'auto'"
    if backend in ("sdpa", "math"):
        return None
    if backend == "flex":
        return None if _flex_module() is not None else (
            "flex needs torch.nn.attention.flex_attention (torch >= 2.5); this torch is " + torch.__version__)
    if backend == "flash":
        if _flash_module() is None:
            return "flash_attn is not installed (pip install flash-attn; or FlashAttention-3's flash_attn_interface)"
        if not q.is_cuda:
            return "flash_attn runs on CUDA tensors only"
        if q.dtype not in _HALF:
            return f"flash_attn needs float16 or bfloat16, got {q.dtype}"
        if q.shape[-1] > 256:
            return f"flash_attn supports head dims up to 256, got {q.shape[-1]}"
        if mask is not None:
            return "flash_attn takes no arbitrary masks; use seq_ids/cu_seqlens or backend 'sdpa'/'flex'"
        return None
    # xformers
    if _xformers_ops() is None:
        return "xformers is not installed (pip install xformers)"
    if not q.is_cuda:
        return "xformers memory_efficient_attention is used on CUDA tensors only"
    return None


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run plain (unmasked) attention on ``device`` with ``dtype``."""
    out = ["sdpa", "math"] + (["flex"] if _flex_module() is not None else [])
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        probe = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)
        out += [b for b in ("flash", "xformers") if unusable_reason(b, probe) is None]
    return out


def check_backend(backend: str) -> None:
    """Raise for a backend name that is unknown or whose library is not installed (device checks
    happen per call)."""
    if backend == "auto":
        return
    if backend not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    missing = {"flash": _flash_module, "xformers": _xformers_ops, "flex": _flex_module}.get(backend)
    if missing is not None and missing() is None:
        raise AttentionBackendError(f"attention backend {backend!r} is not installed")


# ------------------------------------------------------------------------------------------
# Helpers on ids
# ------------------------------------------------------------------------------------------
def seq_ids_from_cu_seqlens(cu_seqlens: Tensor, n: int) -> Tensor:
    """``(S+1,)`` cumulative lengths -> ``(1, n)`` ids (tokens past ``cu_seqlens[-1]`` get -1)."""
    pos = torch.arange(n, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:].to(torch.long), pos, right=True)  # (n,)
    return torch.where(pos < cu_seqlens[-1], ids, -1)[None]


def cu_seqlens_from_lengths(lengths: Tensor) -> Tensor:
    """``(S,)`` lengths -> ``(S+1,)`` int32 cumulative lengths (flash-attn varlen convention)."""
    return F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


@dataclass
class _Segments:
    """Tokens of each (row, id) sequence gathered together: the unpadded layout of a call."""

    q_index: Tensor  # (Tq,) indices into the flattened (B*Nq) queries, grouped by sequence
    k_index: Tensor  # (Tk,)
    q_counts: Tensor  # (S,)
    k_counts: Tensor  # (S,)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num(self) -> int:
        return self.q_counts.numel()

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """What a backend derives from the segments (sizes read on the host, gather indices), made
        once and reused by every call with the same ids (every block of a forward)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


# the segments of the last few ids pairs: every block of a forward passes the same ids tensors, so
# the grouping (and its host syncs) happens once per forward, not once per block
_SEGMENTS_CACHE: list[tuple[weakref.ref, weakref.ref, int, int, _Segments]] = []


def _segments(q_ids: Tensor, kv_ids: Tensor) -> _Segments:
    """Group queries and keys by (row, id); sequences present on only one side are dropped (their
    queries get zero output). Cached by the ids tensors' identity and version."""
    for q_ref, k_ref, q_version, k_version, seg in _SEGMENTS_CACHE:
        if q_ref() is q_ids and k_ref() is kv_ids and (q_ids._version, kv_ids._version) == (q_version, k_version):
            return seg
    seg = _group_segments(q_ids, kv_ids)
    _SEGMENTS_CACHE.insert(0, (weakref.ref(q_ids), weakref.ref(kv_ids), q_ids._version, kv_ids._version, seg))
    del _SEGMENTS_CACHE[4:]
    return seg


def _group_segments(q_ids: Tensor, kv_ids: Tensor) -> _Segments:
    B = q_ids.shape[0]
    span = int(torch.maximum(q_ids.max(), kv_ids.max()).clamp(min=0).item()) + 1
    rows = torch.arange(B, device=q_ids.device)[:, None]
    qkey = torch.where(q_ids >= 0, rows * span + q_ids, -1).flatten()  # (B*Nq,)
    kkey = torch.where(kv_ids >= 0, rows * span + kv_ids, -1).flatten()  # (B*Nk,)
    q_ok = (qkey >= 0) & torch.isin(qkey, kkey[kkey >= 0])
    k_ok = (kkey >= 0) & torch.isin(kkey, qkey[qkey >= 0])
    q_index = torch.nonzero(q_ok).squeeze(1)
    q_index = q_index[torch.argsort(qkey[q_index], stable=True)]
    k_index = torch.nonzero(k_ok).squeeze(1)
    k_index = k_index[torch.argsort(kkey[k_index], stable=True)]
    _, q_counts = torch.unique_consecutive(qkey[q_index], return_counts=True)
    _, k_counts = torch.unique_consecutive(kkey[k_index], return_counts=True)
    return _Segments(q_index, k_index, q_counts, k_counts)


def _to_tokens(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B*N, H, d)."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B * N, H, d)  # (B*N, H, d)


def _from_tokens(flat: Tensor, B: int, N: int) -> Tensor:
    """(B*N, H, d) -> (B, H, N, d)."""
    return flat.reshape(B, N, *flat.shape[1:]).transpose(1, 2)  # (B, H, N, d)


def _dense_mask(B: int, Nq: int, Nk: int, device: torch.device, mask: Tensor | None,
                q_ids: Tensor | None, kv_ids: Tensor | None, causal: bool) -> Tensor | None:
    """Everything folded into one bool mask broadcastable to (B, H, Nq, Nk)."""
    out = None if mask is None else mask.to(torch.bool)
    if q_ids is not None:
        same = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] >= 0)  # (B, Nq, Nk)
        out = same[:, None] if out is None else out & same[:, None]
    if causal:
        tri = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()
        out = tri if out is None else out & tri
    return out


# ------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------
def auto_backend(q: Tensor, mask: Tensor | None = None, grouped: bool = False) -> str:
    """What ``"auto"`` runs for queries like ``q`` (``grouped``: the call has ``seq_ids`` or
    ``cu_seqlens``); see `auto_choice`."""
    return auto_choice(cuda=q.is_cuda, half=q.dtype in _HALF, head_dim=q.shape[-1], masked=mask is not None,
                       grouped=grouped, installed=_INSTALLED)


def auto_choice(*, cuda: bool, half: bool, head_dim: int, masked: bool, grouped: bool,
                installed: dict[str, bool]) -> str:
    """The ``"auto"`` policy. Grouped calls (packed / padded / per-frame ids) go to a varlen kernel
    when one is installed -- flash-attn (3 or 2), then xformers' block-diagonal one -- which skips
    the padding SDPA's grouping pays for. A plain call goes to FlashAttention-3 when installed, else
    SDPA, never to flash-attn 2 or xformers: SDPA already runs the best of cuDNN / flash-2 /
    memory-efficient for a plain call (cuDNN's was 1.7x its flash-2 on an H200 at head dim 72) and is
    traced into a compiled block, while an optional kernel breaks the graph around it. Masks and
    key-padding-only calls (``kv_seq_ids`` without ``seq_ids``) are SDPA's."""
    flash_ok = cuda and half and head_dim <= 256 and not masked
    if grouped:
        if installed.get("flash") and flash_ok:
            return "flash"
        if installed.get("xformers") and cuda and not masked:
            return "xformers"
        return "sdpa"
    return "flash" if installed.get("flash3") and flash_ok else "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "sdpa", mask: Tensor | None = None,
              causal: bool = False, seq_ids: Tensor | None = None, kv_seq_ids: Tensor | None = None,
              cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
              scale: float | None = None) -> Tensor:
    """Scaled dot-product attention over ``(B, heads, N, d)`` tensors; see the module docstring.

    ``max_seqlen`` is the longest sequence in ``cu_seqlens`` (computed when omitted).
    ``scale`` defaults to ``1 / sqrt(d)``.

    Two cases are plain SDPA calls that ``torch.compile`` traces into the surrounding graph: no
    mask or ids, and a key-padding mask alone (``kv_seq_ids`` only: cross-attention to a padded
    caption). Every other case runs eagerly (``torch.compiler.disable``): the id bookkeeping reads
    sizes on the host, and the optional kernels are opaque to the compiler.
    """
    if backend == "auto" and q.ndim == 4:
        backend = auto_backend(q, mask, grouped=seq_ids is not None or cu_seqlens is not None)
    sdpa = (backend == "sdpa" and seq_ids is None and cu_seqlens is None
            and q.ndim == k.ndim == v.ndim == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape == v.shape and k.shape[-1] == q.shape[-1])
    simple = sdpa and mask is None
    if simple and kv_seq_ids is None and not (causal and q.shape[2] != k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)  # (B, H, Nq, d)
    if simple and not causal and kv_seq_ids is not None and kv_seq_ids.shape == (k.shape[0], k.shape[2]):
        key_ok = (kv_seq_ids >= 0)[:, None, None, :]  # (B, 1, 1, Nk)
        has_key = key_ok.any(-1, keepdim=True)  # (B, 1, 1, 1): a row with no visible key gets zeros
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok | ~has_key, scale=scale)
        return out * has_key.to(out.dtype)  # (B, H, Nq, d)
    if sdpa and not causal and kv_seq_ids is None and mask is not None and mask.dtype == torch.bool:
        return _sdpa_masked(q, k, v, mask, scale)
    return eager_attention()(q, k, v, backend=backend, mask=mask, causal=causal, seq_ids=seq_ids,
                             kv_seq_ids=kv_seq_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale)


_EAGER_ATTENTION: Callable[..., Tensor] | None = None


def eager_attention() -> Callable[..., Tensor]:
    """`_attention` behind ``torch.compiler.disable`` (the compiler runs it eagerly), made on first use
    and by `ldm.layers.compile_blocks` before it compiles: a decorator would import the compiler
    with this module, about a second of every process's start-up (extraction, sampling, a CPU
    training run, each rank of a test) where nothing is compiled."""
    global _EAGER_ATTENTION
    if _EAGER_ATTENTION is None:
        _EAGER_ATTENTION = torch.compiler.disable(_attention)
    return _EAGER_ATTENTION


def _attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str, mask: Tensor | None, causal: bool,
               seq_ids: Tensor | None, kv_seq_ids: Tensor | None, cu_seqlens: Tensor | None,
               max_seqlen: int | None, scale: float | None) -> Tensor:
    """Everything but the plain SDPA call: checks, masks, ids, and the optional kernels."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, heads, N, d) tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Nq, d = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[2] != v.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on batch, "
                         "heads or key length")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"q, k and v need the same head dim, got {d}, {k.shape[3]}, {v.shape[3]}")
    Nk = k.shape[2]
    if causal and Nq != Nk:
        raise ValueError(f"causal attention is defined for self-attention only (Nq={Nq}, Nk={Nk})")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (True = attend), got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, (B, H, Nq, Nk))
        except RuntimeError:
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to {(B, H, Nq, Nk)}") from None
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (B|1, H|1, Nq|1, Nk|1)
    if cu_seqlens is not None:
        if seq_ids is not None or kv_seq_ids is not None:
            raise ValueError("give either cu_seqlens or seq_ids, not both")
        if B != 1 or Nq != Nk:
            raise ValueError("cu_seqlens describes packed self-attention: B must be 1 and Nq == Nk")
    if seq_ids is not None and seq_ids.shape != (B, Nq):
        raise ValueError(f"seq_ids {tuple(seq_ids.shape)} must be ({B}, {Nq})")
    if kv_seq_ids is not None and kv_seq_ids.shape != (B, Nk):
        raise ValueError(f"kv_seq_ids {tuple(kv_seq_ids.shape)} must be ({B}, {Nk})")
    if seq_ids is None and kv_seq_ids is not None:
        if causal:
            raise ValueError("causal attention with separate kv_seq_ids is not defined; use seq_ids only")
        if backend in ("sdpa", "math"):
            # A pure key-padding mask: a dense (B, 1, 1, Nk) mask needs no gathering.
            key_ok = (kv_seq_ids >= 0)[:, None, None, :]
            mask, kv_seq_ids = key_ok if mask is None else mask & key_ok, None
        else:
            seq_ids = torch.zeros(B, Nq, dtype=torch.long, device=q.device)
            kv_seq_ids = torch.where(kv_seq_ids >= 0, 0, -1)
    elif seq_ids is not None:
        if kv_seq_ids is None:
            if Nq != Nk:
                raise ValueError("seq_ids alone describe self-attention; pass kv_seq_ids for cross-attention")
            kv_seq_ids = seq_ids
        elif causal:
            raise ValueError("causal attention with separate kv_seq_ids is not defined; use seq_ids only")
    if seq_ids is not None:
        seq_ids, kv_seq_ids = seq_ids.long(), kv_seq_ids.long()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    reason = unusable_reason(backend, q, mask)
    if reason is not None:
        raise AttentionBackendError(f"attention backend {backend!r} cannot run this call: {reason}")

    if backend == "flash":
        return _flash(q, k, v, causal, seq_ids, kv_seq_ids, cu_seqlens, max_seqlen, scale)
    if cu_seqlens is not None:
        seq_ids = kv_seq_ids = seq_ids_from_cu_seqlens(cu_seqlens, Nq)
    if backend == "math":
        return _math(q, k, v, _dense_mask(B, Nq, Nk, q.device, mask, seq_ids, kv_seq_ids, causal), scale)
    if backend == "flex":
        return _flex(q, k, v, mask, seq_ids, kv_seq_ids, causal, scale)
    if backend == "xformers":
        return _xformers(q, k, v, mask, seq_ids, kv_seq_ids, causal, scale)
    return _sdpa(q, k, v, mask, seq_ids, kv_seq_ids, causal, scale)


# ------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------
def _masked_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with no allowed key: open them (so kernels stay finite) and report them for zeroing."""
    has_key = mask.any(-1, keepdim=True)  # (.., Nq, 1)
    return mask | ~has_key, has_key


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # (B, H, Nq, Nk)
    if mask is None:
        return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float()).to(q.dtype)
    mask, has_key = _masked_rows(mask)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1) * has_key
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)  # (B, H, Nq, d)


def _sdpa_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None) -> Tensor:
    """SDPA under a dense bool ``mask`` (a row with no allowed key gives zeros): shape checks and
    tensor ops only, so a compiled caller keeps it in its graph. `attention` calls it for a mask
    alone, `_sdpa` with the ids and causality folded in (`_dense_mask`)."""
    B, H, Nq, _ = q.shape
    try:
        torch.broadcast_shapes(mask.shape, (B, H, Nq, k.shape[2]))
    except RuntimeError:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to {(B, H, Nq, k.shape[2])}") from None
    mask, has_key = _masked_rows(mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, Nq, d)
    return out * has_key.to(out.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_ids: Tensor | None,
          kv_ids: Tensor | None, causal: bool, scale: float) -> Tensor:
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if mask is not None:
        return _sdpa_masked(q, k, v, _dense_mask(B, Nq, Nk, q.device, mask, q_ids, kv_ids, causal), scale)
    if q_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    # Gather every (row, id) sequence into a padded group and attend within groups.
    seg = _segments(q_ids, kv_ids)
    out = q.new_zeros(B * Nq, H, q.shape[-1])
    if seg.num == 0:
        return _from_tokens(out, B, Nq)
    Lq, Lk, gq, gk, rq, rk, key_ok = seg.memo("sdpa", lambda: _group_plan(seg))

    def group(x: Tensor, index: Tensor, g: Tensor, r: Tensor, L: int) -> Tensor:
        flat = _to_tokens(x)[index]  # (T, H, d)
        return flat.new_zeros(seg.num, L, H, x.shape[-1]).index_put((g, r), flat).transpose(1, 2)  # (S, H, L, d)

    qg, kg, vg = group(q, seg.q_index, gq, rq, Lq), group(k, seg.k_index, gk, rk, Lk), group(v, seg.k_index, gk, rk, Lk)
    gmask = key_ok[:, None, None, :]  # (S, 1, 1, Lk)
    if causal:
        gmask = gmask & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=gmask, scale=scale)  # (S, H, Lq, d)
    out = out.index_put((seg.q_index,), og.transpose(1, 2)[gq, rq])
    return _from_tokens(out, B, Nq)


def _group_plan(seg: _Segments) -> tuple[int, int, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Where each token of ``seg`` goes in padded ``(S, L)`` groups: the longest group of queries and
    of keys (read on the host), group and rank of every query / key token, and the valid keys."""
    device = seg.q_counts.device
    Lq, Lk = int(seg.q_counts.max()), int(seg.k_counts.max())
    groups = torch.arange(seg.num, device=device)
    gq = torch.repeat_interleave(groups, seg.q_counts)  # (Tq,)
    gk = torch.repeat_interleave(groups, seg.k_counts)  # (Tk,)
    rq = torch.arange(gq.numel(), device=device) - (torch.cumsum(seg.q_counts, 0) - seg.q_counts)[gq]
    rk = torch.arange(gk.numel(), device=device) - (torch.cumsum(seg.k_counts, 0) - seg.k_counts)[gk]
    key_ok = torch.arange(Lk, device=device)[None] < seg.k_counts[:, None]  # (S, Lk)
    return Lq, Lk, gq, gk, rq, rk, key_ok


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_ids: Tensor | None,
          kv_ids: Tensor | None, causal: bool, scale: float) -> Tensor:
    flex = _flex_module()
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if mask is None and q_ids is None and not causal:
        block_mask = None
    else:
        dense = None if mask is None else mask.expand(B, H, Nq, Nk)
        heads = None if mask is None or mask.shape[1] == 1 else H

        def mask_mod(b, h, qi, ki):
            ok = qi >= 0
            if q_ids is not None:
                ok = ok & (q_ids[b, qi] == kv_ids[b, ki]) & (q_ids[b, qi] >= 0)
            if causal:
                ok = ok & (qi >= ki)
            if dense is not None:
                ok = ok & dense[b, h, qi, ki]
            return ok

        block_mask = flex.create_block_mask(mask_mod, B, heads, Nq, Nk, device=q.device)
    fn = _compiled_flex() if q.is_cuda else flex.flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale)


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, q_ids: Tensor | None, kv_ids: Tensor | None,
           cu_seqlens: Tensor | None, max_seqlen: int | None, scale: float) -> Tensor:
    fa = _flash_module()
    B, H, Nq, d = q.shape
    if q_ids is None and cu_seqlens is None:
        out = _first(fa.func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             softmax_scale=scale, causal=causal))  # (B, Nq, H, d)
        return out.transpose(1, 2)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        L = int((cu[1:] - cu[:-1]).max()) if max_seqlen is None else int(max_seqlen)
        T = int(cu[-1])  # tokens past the last sequence get zeros
        packed = _first(fa.varlen_func(*(x[0, :, :T].transpose(0, 1) for x in (q, k, v)),
                                       cu, cu, L, L, softmax_scale=scale, causal=causal))  # (T, H, d)
        out = q.new_zeros(Nq, H, d)
        out[:T] = packed
        return out.transpose(0, 1)[None]  # (1, H, Nq, d)
    seg = _segments(q_ids, kv_ids)
    out = q.new_zeros(B * Nq, H, d)
    if seg.num == 0:
        return _from_tokens(out, B, Nq)
    cu_q, cu_k, Lq, Lk = seg.memo("flash", lambda: (cu_seqlens_from_lengths(seg.q_counts),
                                                    cu_seqlens_from_lengths(seg.k_counts),
                                                    int(seg.q_counts.max()), int(seg.k_counts.max())))
    packed = _first(fa.varlen_func(
        _to_tokens(q)[seg.q_index], _to_tokens(k)[seg.k_index], _to_tokens(v)[seg.k_index],
        cu_q, cu_k, Lq, Lk, softmax_scale=scale, causal=causal))  # (Tq, H, d)
    return _from_tokens(out.index_put((seg.q_index,), packed), B, Nq)


def _xformers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_ids: Tensor | None,
              kv_ids: Tensor | None, causal: bool, scale: float) -> Tensor:
    xops = _xformers_ops()
    bias_mod = xops.fmha.attn_bias
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if mask is not None:
        dense = _dense_mask(B, Nq, Nk, q.device, mask, q_ids, kv_ids, causal).expand(B, H, Nq, Nk)
        dense, has_key = _masked_rows(dense)
        # xformers wants the bias' last dim stride aligned to 8: allocate padded, then slice.
        pad = (-Nk) % 8
        bias = q.new_zeros(B, H, Nq, Nk + pad)[..., :Nk]
        bias.masked_fill_(~dense, float("-inf"))
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, scale=scale)  # (B, Nq, H, d)
        return out.transpose(1, 2) * has_key.to(q.dtype)
    if q_ids is None:
        bias = bias_mod.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, scale=scale)
        return out.transpose(1, 2)
    seg = _segments(q_ids, kv_ids)
    out = q.new_zeros(B * Nq, H, d)
    if seg.num == 0:
        return _from_tokens(out, B, Nq)
    cls = bias_mod.BlockDiagonalCausalMask if causal else bias_mod.BlockDiagonalMask
    bias = cls.from_seqlens(*seg.memo("lengths", lambda: (seg.q_counts.tolist(), seg.k_counts.tolist())))
    packed = xops.memory_efficient_attention(
        _to_tokens(q)[seg.q_index][None], _to_tokens(k)[seg.k_index][None], _to_tokens(v)[seg.k_index][None],
        attn_bias=bias, scale=scale)[0]  # (Tq, H, d)
    return _from_tokens(out.index_put((seg.q_index,), packed), B, Nq)
