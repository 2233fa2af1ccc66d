"""Sequence parallelism for long video token sequences (DeepSpeed-Ulysses; Jacobs et al. 2023, Sec. 3).

The ranks of a group run one ``VideoDiT`` forward together on the same batch. Each rank holds
``N / P`` of the ``N`` tokens through the transformer blocks; each self-attention exchanges its
queries, keys and values with one all-to-all so that every rank sees the *whole* sequence for
``H / P`` of the heads, attends, and exchanges the output back (a second all-to-all) to its own
tokens with all heads. Everything else in a block (adaLN, QK-norm, RoPE, cross-attention to the
text, the MLP) is per token and runs on the local slice; the text context is replicated and needs
no exchange. After the last block the slices are all-gathered, so the output heads and the model
output are the same on every rank.

Everything is applied from ``launch/``: forward hooks on the blocks split the hidden states and the
``TokenLayout`` (positions, sequence ids, RoPE tables, packed conditioning index) after embedding
and gather after the last block, and each ``SelfAttention.attention_wrapper`` runs the exchange.
The model code stays single-device and its parameters and ``state_dict`` are unchanged.

A token count that the group size does not divide is padded with masked tokens (sequence id -1:
no attention to or from them, dropped at the gather). The head count must be divisible by the group
size.

Gradients: the final all-gather's backward sums over the group, so each rank's parameter gradient
is ``P`` times its tokens' share for the block parameters and the whole gradient for the output
heads; the *mean* over the group is exactly the single-process gradient. DDP / DeepSpeed already
average over data-parallel ranks, so when the sequence-parallel ranks are among them (the usual set-up:
every rank of a group reads the same batch) nothing else is needed; without them call
``SequenceParallel.average_gradients()`` after ``backward()``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.layers import SelfAttention, TokenLayout


# ------------------------------------------------------------------------------------------
# Differentiable collectives
# ------------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0: chunk ``j`` goes to rank ``j``; the output's chunk ``i``
    came from rank ``i``. The map is its own adjoint, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: torch_dist.ProcessGroup) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        torch_dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        torch_dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _GatherTokens(torch.autograd.Function):
    """All-gather equal slices along dim 1 (tokens); backward: sum the gradients over ranks and keep
    this rank's slice (a reduce-scatter; all-reduce + slice on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: torch_dist.ProcessGroup) -> Tensor:
        ctx.group = group
        size = torch_dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        torch_dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 1)  # (B, P*n, D)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        group = ctx.group
        size, rank = torch_dist.get_world_size(group), torch_dist.get_rank(group)
        if torch_dist.get_backend(group) == "gloo":
            total = grad.contiguous().clone()
            torch_dist.all_reduce(total, group=group)
            return total.chunk(size, 1)[rank].contiguous(), None
        chunks = [c.contiguous() for c in grad.chunk(size, 1)]  # P x (B, n, D)
        out = torch.empty_like(chunks[rank])
        torch_dist.reduce_scatter(out, chunks, group=group)
        return out, None


def _seq_to_heads(qkv: Tensor, group: torch_dist.ProcessGroup, size: int) -> Tensor:
    """``(3, B, H, n, d)`` local tokens, all heads -> ``(3, B, H/P, N, d)`` all tokens, this rank's heads."""
    x = rearrange(qkv, "t b (p h) n d -> p t b h n d", p=size)  # head group p goes to rank p
    x = _AllToAll.apply(x, group)  # chunk p now holds rank p's tokens of our heads
    return rearrange(x, "p t b h n d -> t b h (p n) d")


def _heads_to_seq(o: Tensor, group: torch_dist.ProcessGroup, size: int) -> Tensor:
    """``(B, H/P, N, d)`` -> ``(B, H, n, d)``: the inverse exchange of ``_seq_to_heads``."""
    x = rearrange(o, "b h (p n) d -> p b h n d", p=size)  # token slice p goes back to rank p
    x = _AllToAll.apply(x, group)  # chunk p now holds rank p's heads of our tokens
    return rearrange(x, "p b h n d -> b (p h) n d")


class _UlyssesExchange:
    """``SelfAttention.attention_wrapper``: all-to-all q/k/v to full sequences with ``H/P`` heads,
    attend, all-to-all back. Not an ``nn.Module``, so the model's modules and state are unchanged."""

    def __init__(self, group: torch_dist.ProcessGroup, size: int):
        self.group, self.size = group, size

    def __call__(self, attend: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        qkv = _seq_to_heads(torch.stack([q, k, v]), self.group, self.size)  # (3, B, H/P, N, d)
        o = attend(qkv[0], qkv[1], qkv[2])  # (B, H/P, N, d)
        return _heads_to_seq(o, self.group, self.size)  # (B, H, n, d)

    def __deepcopy__(self, memo: dict) -> "_UlyssesExchange":
        return self  # process groups are shared handles (a deep-copied model, e.g. an EMA copy, reuses it)


# ------------------------------------------------------------------------------------------
# The sharded token layout
# ------------------------------------------------------------------------------------------
@dataclass
class ShardedLayout(TokenLayout):
    """One rank's slice of a ``TokenLayout``: ``positions``, ``seq_ids``, ``rope`` and ``cond_index``
    are the local (padded) slice, used by the per-token parts of a block (RoPE on local q/k, the
    cross-attention's query ids, adaLN of packed rows). ``ids(layout)`` returns the *full* padded
    sequence's attention ids, because the self-attention runs on the whole sequence after the
    all-to-all; they are computed once on the full layout, so spatial / temporal groups agree
    across ranks."""

    full: TokenLayout | None = None
    batch: int = 1
    pad: int = 0

    def ids(self, layout: str) -> Tensor | None:
        if layout not in self._groups:
            ids = self.full.ids(layout)  # (B|1, N) or None
            if ids is not None and ids.shape[0] != self.batch:
                ids = ids.expand(self.batch, -1)
            if self.pad:
                if ids is None:
                    n = self.full.positions.shape[-2]
                    ids = torch.zeros(self.batch, n, dtype=torch.long, device=self.full.positions.device)
                ids = F.pad(ids, (0, self.pad), value=-1)  # (B, N + pad)
            self._groups[layout] = ids
        return self._groups[layout]


def _slice_tokens(x: Tensor, dim: int, pad: int, rank: int, size: int, value: float = 0) -> Tensor:
    """Pad ``x`` along ``dim`` by ``pad`` entries of ``value`` and keep this rank's equal slice."""
    if pad:
        widths = [0, 0] * (x.ndim - 1 - dim) + [0, pad]
        x = F.pad(x, widths, value=value)
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n)


def shard_layout(layout: TokenLayout, batch: int, rank: int, size: int) -> ShardedLayout:
    """This rank's ``ShardedLayout`` of ``layout`` for a group of ``size`` ranks (``batch`` rows)."""
    n = layout.positions.shape[-2]
    pad = (-n) % size
    tok = layout.positions.ndim - 2  # token dim of the positions: (N, 3) or (B, N, 3)
    seq_ids = layout.seq_ids
    if seq_ids is None and pad:
        seq_ids = torch.zeros(batch, n, dtype=torch.long, device=layout.positions.device)
    rope = None
    if layout.rope is not None:
        cos, sin = layout.rope  # each (B|1, 1, N, d)
        rope = (_slice_tokens(cos, 2, pad, rank, size, 1.0), _slice_tokens(sin, 2, pad, rank, size, 0.0))
    return ShardedLayout(
        positions=_slice_tokens(layout.positions, tok, pad, rank, size),
        seq_ids=None if seq_ids is None else _slice_tokens(seq_ids, 1, pad, rank, size, -1),
        rope=rope,
        cond_index=None if layout.cond_index is None else _slice_tokens(layout.cond_index, 1, pad, rank, size),
        full=layout, batch=batch, pad=pad)


# ------------------------------------------------------------------------------------------
# Applying it to a model
# ------------------------------------------------------------------------------------------
class SequenceParallel:
    """The handle ``apply_sequence_parallel`` returns: the group, this rank's place in it, the
    installed hooks (``remove()`` restores the single-device model) and ``average_gradients()``."""

    def __init__(self, model: nn.Module, group: torch_dist.ProcessGroup):
        self.model, self.group = model, group
        self.size, self.rank = torch_dist.get_world_size(group), torch_dist.get_rank(group)
        self._current: tuple[TokenLayout, ShardedLayout] | None = None
        self._handles: list[Any] = []
        self._attns: list[SelfAttention] = []

    def __deepcopy__(self, memo: dict) -> "SequenceParallel":
        return self

    # --- hooks -----------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict, *, first: bool) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        in_args = len(args) > 2
        layout = args[2] if in_args else kwargs.get("layout")
        if isinstance(layout, ShardedLayout):
            return tuple(args), kwargs  # already sharded by the caller
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"sequence parallelism expects blocks called as blk(x, c, layout, ...), got {type(layout)}")
        if first:
            x = args[0]  # (B, N, D)
            sharded = shard_layout(layout, x.shape[0], self.rank, self.size)
            args[0] = _slice_tokens(x, 1, sharded.pad, self.rank, self.size)  # (B, n, D)
            self._current = (layout, sharded)
        elif self._current is None or self._current[0] is not layout:
            raise RuntimeError("sequence parallelism: the blocks must run in order, starting with the first "
                               "(its hook splits the tokens)")
        else:
            sharded = self._current[1]
        if in_args:
            args[2] = sharded
        else:
            kwargs["layout"] = sharded
        return tuple(args), kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        if self._current is None:
            return out  # the caller passed a ShardedLayout and gathers itself
        sharded = self._current[1]
        self._current = None
        full = _GatherTokens.apply(out, self.group)  # (B, N + pad, D)
        return full[:, :full.shape[1] - sharded.pad] if sharded.pad else full  # (B, N, D)

    # --- public ----------------------------------------------------------------------------
    def average_gradients(self) -> None:
        """Mean of every parameter gradient over the group (in place): the single-process gradient.
        Not needed when DDP / DeepSpeed already average over ranks that include this group."""
        for p in self.model.parameters():
            if p.grad is not None:
                torch_dist.all_reduce(p.grad, group=self.group)
                p.grad /= self.size

    def remove(self) -> None:
        """Undo ``apply_sequence_parallel``: the model runs single-device again."""
        for h in self._handles:
            h.remove()
        for attn in self._attns:
            attn.attention_wrapper = None
        self._handles, self._attns, self._current = [], [], None


def apply_sequence_parallel(model: nn.Module, group: torch_dist.ProcessGroup | None = None) -> SequenceParallel:
    """Run ``model`` (a ``VideoDiT``, or any module with ``blocks`` of ``TransformerBlock`` called as
    ``blk(x, c, layout, context, context_ids)``) sequence-parallel over ``group`` (default: all
    ranks). Every rank of the group must call the model with the same inputs; the outputs are the
    same on every rank. Apply before wrapping in DDP / DeepSpeed (the parameters are untouched)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise RuntimeError("sequence parallelism needs an initialised process group "
                           "(launch.dist.init_distributed under torchrun)")
    group = group if group is not None else torch_dist.group.WORLD
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no transformer blocks (model.blocks) to run sequence-parallel")
    sp = SequenceParallel(model, group)
    attns = [m for blk in blocks for m in blk.modules() if isinstance(m, SelfAttention)]
    for attn in attns:
        if attn.heads % sp.size:
            raise ValueError(f"sequence parallelism over {sp.size} ranks splits the attention heads: "
                             f"{attn.heads} heads are not divisible by {sp.size}")
        if attn.attention_wrapper is not None:
            raise RuntimeError("this model already has an attention wrapper (sequence parallelism applied twice?)")
    if sp.size == 1:
        return sp
    exchange = _UlyssesExchange(group, sp.size)
    for attn in attns:
        attn.attention_wrapper = exchange
    sp._attns = attns
    for i, blk in enumerate(blocks):
        hook = _BoundHook(sp, first=i == 0)
        sp._handles.append(blk.register_forward_pre_hook(hook, with_kwargs=True))
    sp._handles.append(blocks[len(blocks) - 1].register_forward_hook(sp._post_hook, with_kwargs=True))
    return sp


class _BoundHook:
    """A picklable / deep-copyable pre-hook bound to one block position."""

    def __init__(self, sp: SequenceParallel, first: bool):
        self.sp, self.first = sp, first

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return self.sp._pre_hook(module, args, kwargs, first=self.first)


def sequence_parallel_group(size: int) -> torch_dist.ProcessGroup:
    """This rank's group of ``size`` consecutive ranks (ranks ``[k*size, (k+1)*size)``); every rank
    must call it. The world size must be a multiple of ``size``."""
    world = torch_dist.get_world_size()
    if size < 1 or world % size:
        raise ValueError(f"sequence-parallel size {size} must divide the world size {world}")
    group, _ = torch_dist.new_subgroups(size)
    return group
