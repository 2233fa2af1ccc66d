"""Cost accounting: FLOPs and peak training memory of any network, at any scale, without a GPU.

Conventions (every report that uses this module states them):

- **FLOPs = 2 x multiply-accumulates.** A ``(m, k) @ (k, n)`` product costs ``2mkn``; a
  convolution ``2 x output elements x (C_in / groups) x kernel volume``. Element-wise work
  (normalisation, activations, softmax, RoPE, the optimizer update) is not counted: it is memory
  bound and small next to the matrix products.
- **Attention is counted** (``4 N_q N_k d`` per head forward: scores and the weighted sum). On CPU
  ``torch.utils.flop_counter.FlopCounterMode`` silently counts ZERO for
  ``F.scaled_dot_product_attention``, whose CPU kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``) has no formula; ``flop_counter()``
  registers that kernel and its backward with the counter's own SDPA formulas. Causal masks are
  not discounted (as in the counter's CUDA formulas).
- **Forward vs training step.** A training step is forward + backward: ~3x the forward for the
  matrix products (the backward computes the input and the weight gradients); SDPA's backward,
  which recomputes the scores as FlashAttention does, costs 2.5x its forward.
- **Per sample** means batch size 1, as in Hi-VAE's Appendix C.2.

Memory: ``train_step_memory`` runs optimizer steps under ``PeakMemory``, a ``TorchDispatchMode``
(the extension point ``FlopCounterMode`` uses) that counts every live tensor storage once, from
the op that made it until it is freed. Under ``FakeTensorMode`` (``fake_mode()``) no tensor
storage is allocated, so a 28-layer DiT at 32k tokens is measured on a laptop in seconds. Fake
tensors follow the CPU dispatch: SDPA takes the CPU flash kernel, which keeps only the output and
the log-sum-exp for backward, as the CUDA flash / memory-efficient kernels do. The tracker rounds
every storage up to 512 bytes as the CUDA caching allocator does; it does not model allocator
fragmentation, the CUDA context or cuBLAS workspaces, so a measured
``torch.cuda.max_memory_allocated`` is expected a few percent higher (``cuda_train_step_memory``
measures it on a GPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FLOP_CONVENTION = ("FLOPs = 2 x multiply-accumulates (matmuls, convolutions, attention scores and weighted sums; "
                   "element-wise ops and the optimizer not counted); per sample = batch size 1; "
                   "train step = forward + backward")

_aten = torch.ops.aten


def _sdpa_cpu_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# The CPU SDPA kernels FlopCounterMode lacks (it has the CUDA flash / efficient / cuDNN ones).
SDPA_CPU_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def flop_counter() -> _fc.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts SDPA on CPU (and on fake CPU tensors)."""
    return _fc.FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FORMULAS)


@dataclass(frozen=True)
class FlopCount:
    total: int
    by_op: dict[str, int]  # aten op name -> FLOPs


def count_flops(fn: Callable[[], Any], repeats_of: nn.Module | None = None) -> tuple[Any, FlopCount]:
    """Run ``fn()`` under ``flop_counter()``: ``(its result, FlopCount)``.

    ``repeats_of`` (fake tensors only): a submodule of this module called again with the same
    input signature (tensor shapes / dtypes / devices, int / bool / str values; float values do not
    count) is not run again: its FLOPs are counted again and fake outputs of the recorded shapes
    returned. A diffusion decoder's sampling loop then costs one step of dispatch instead of
    ``steps x 2`` (CFG). Valid for modules whose cost follows from their input shapes (not for
    data-dependent shapes)."""
    with flop_counter() as counter, _RepeatMemo(repeats_of, counter) as memo:
        out = fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    for k, v in memo.extra.items():
        by_op[k] = by_op.get(k, 0) + v
    return out, FlopCount(int(counter.get_total_flops()) + sum(memo.extra.values()), by_op)


_NOT_MEMOIZABLE = object()


def _signature(x: Any) -> Any:
    """A hashable description of a call argument that fixes its cost (see ``count_flops``): shapes,
    dtypes and devices of tensors, plus the values of real integer / bool tensors (lengths, rates,
    ids: they may steer the computation); float values do not count (a timestep's value does not
    change a network's cost)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, Tensor):
        values = None
        if not isinstance(x, FakeTensor) and not x.is_floating_point() and not x.is_complex():
            values = tuple(x.flatten().tolist())
        return ("T", tuple(x.shape), x.dtype, str(x.device), values)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, tuple((f.name, _signature(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, Mapping):
        return ("M", tuple((k, _signature(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_signature(v) for v in x))
    if isinstance(x, float):
        return "float"
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return ("id", id(x))  # anything else: only the very same object repeats


def _out_spec(x: Any) -> Any:
    """Fake tensors -> (shape, stride, dtype, device); dict / list / tuple kept; anything else (a
    real tensor, whose values may matter downstream, or another object) is not memoizable."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, Tensor):
        if not isinstance(x, FakeTensor):
            return _NOT_MEMOIZABLE
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
    if isinstance(x, dict):
        specs = {k: _out_spec(v) for k, v in x.items()}
        return _NOT_MEMOIZABLE if any(v is _NOT_MEMOIZABLE for v in specs.values()) else ("D", type(x), specs)
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
        specs = [_out_spec(v) for v in x]
        return _NOT_MEMOIZABLE if any(v is _NOT_MEMOIZABLE for v in specs) else ("L", type(x), specs)
    if x is None or isinstance(x, (bool, int, float, str)):
        return ("V", x)
    return _NOT_MEMOIZABLE


def _rebuild(spec: Any) -> Any:
    kind = spec[0]
    if kind == "T":
        from torch._guards import active_fake_mode
        from torch._subclasses.fake_tensor import FakeTensor

        _, shape, stride, dtype, device = spec
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return t if isinstance(t, FakeTensor) else active_fake_mode().from_tensor(t)  # small ones stay fake
    if kind == "D":
        return spec[1]({k: _rebuild(v) for k, v in spec[2].items()})
    if kind == "L":
        return spec[1](_rebuild(v) for v in spec[2])
    return spec[1]


class _RepeatMemo:
    """Wraps the ``forward`` of every submodule of ``root`` for the duration of a count: the first
    call with a signature runs (its FLOPs by op recorded), repeats are counted from the record."""

    def __init__(self, root: nn.Module | None, counter: _fc.FlopCounterMode):
        self.root, self.counter = root, counter
        self.extra: dict[str, int] = {}
        self.records: dict[tuple, tuple[Any, dict[str, int]]] = {}

    def _flops(self) -> dict[str, int]:
        """FLOPs so far by op: counted by the counter plus replayed."""
        out = {str(k): int(v) for k, v in self.counter.get_flop_counts().get("Global", {}).items()}
        for k, v in self.extra.items():
            out[k] = out.get(k, 0) + v
        return out

    def _wrap(self, module: nn.Module) -> None:
        forward = module.forward

        def memo_forward(*args, **kwargs):
            key = (id(module), _signature(args), _signature(kwargs))
            if key in self.records:
                spec, flops = self.records[key]
                for k, v in flops.items():
                    self.extra[k] = self.extra.get(k, 0) + v
                return _rebuild(spec)
            before = self._flops()
            out = forward(*args, **kwargs)
            spec = _out_spec(out)
            if spec is not _NOT_MEMOIZABLE:
                after = self._flops()
                delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
                self.records[key] = (spec, delta)
            return out

        module.forward = memo_forward

    def __enter__(self) -> "_RepeatMemo":
        if self.root is None:
            return self
        from torch._guards import active_fake_mode

        if active_fake_mode() is None:
            raise ValueError("count_flops(repeats_of=...) replays fake outputs: call it under fake_mode()")
        modules = list(self.root.modules())
        patched = [type(m).__name__ for m in modules if "forward" in m.__dict__]
        if patched:
            raise ValueError(f"{patched[0]} already has an instance-level forward")
        self.modules = modules
        for m in modules:
            self._wrap(m)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.root is not None:
            for m in self.modules:
                m.__dict__.pop("forward", None)


SMALL_REAL_LIMIT = 4096  # elements of a floating tensor
INDEX_REAL_LIMIT = 1 << 24  # elements of an integer / bool tensor (positions, ids, masks)


@contextlib.contextmanager
def fake_mode(small_real: bool = False) -> Iterator[None]:
    """``FakeTensorMode``: tensors made inside carry shapes, dtypes and devices but no storage, so
    modules of any size can be built, run and counted without memory.

    ``small_real``: tensors made from Python values alone (a sampler's timestep schedule, segment
    lengths and rates, token positions and attention ids) of at most ``SMALL_REAL_LIMIT`` floating
    or ``INDEX_REAL_LIMIT`` integer / bool elements, and everything computed from such tensors
    alone, are real, so code that reads them back (``float(t)``, ``.tolist()``, ``torch.unique``)
    runs; all else, weights and activations included, stays fake. Used to count autoencoder
    decoders whose control flow reads such tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not small_real:
        with FakeTensorMode():
            yield
        return
    with FakeTensorMode(allow_non_fake_inputs=True), _SmallReal():
        yield


class _SmallReal(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
        if any(isinstance(x, FakeTensor) for x in inputs):
            return func(*args, **kwargs)
        if inputs:  # only real (hence small) inputs: compute for real
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)  # a factory: fake first, real again if small
        if all(x.numel() <= (SMALL_REAL_LIMIT if x.is_floating_point() else INDEX_REAL_LIMIT)
               for x in tree_leaves(out) if isinstance(x, Tensor)):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return out


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations", "temporary")
ALLOCATION_BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    breakdown: dict[str, int]  # what was alive at the peak, by CATEGORIES
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "breakdown": dict(self.breakdown), "method": self.method}


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class PeakMemory(TorchDispatchMode):
    """The peak of live tensor memory on one device while ops run inside this mode, and what was
    alive at that peak by category (one of ``CATEGORIES``).

    Every distinct untyped storage on ``device`` counts once, its bytes rounded up to
    ``ALLOCATION_BLOCK``: from when it is first seen (``add``-ed up front, or the output of an op run
    inside) until Python frees it (a weakref callback on the storage object, which lives as long as
    the storage). An op's new outputs count in the category of ``phase`` (set by the caller:
    "activations" in the forward, "temporary" in the backward from the loss's gradient on,
    "optimizer" in the optimizer step);
    ``add(t, category)`` re-labels a storage already counted (a gradient, an optimizer state). Works
    on fake tensors (nothing allocated) and on real ones on any device. Storage ``resize_`` (which
    bypasses dispatch) and non-strided tensors are not seen."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self.phase = "activations"
        self.live: dict[int, tuple[Any, str, int]] = {}  # id(storage) -> (weakref, category, bytes)
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = self.peak = 0
        self.at_peak = dict(self.current)

    def add(self, t: Tensor, category: str | None = None) -> None:
        """Count ``t``'s storage in ``category``, moving it there if it is counted already. With
        ``category=None`` (an op's output) a new storage counts in the current ``phase`` and one
        counted already keeps its category (a view, an in-place result) at its current size."""
        if t.device != self.device or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        size = -(-storage.nbytes() // ALLOCATION_BLOCK) * ALLOCATION_BLOCK
        entry = self.live.get(id(storage))
        if entry is None:
            ref = weakref.ref(storage, functools.partial(self._freed, id(storage)))
            category = category or self.phase
        else:
            ref, old, old_size = entry
            if category in (None, old) and size == old_size:
                return
            category = category or old
            self.current[old] -= old_size
            self.total -= old_size
        self.live[id(storage)] = (ref, category, size)
        self.current[category] += size
        self.total += size
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.current)

    def _freed(self, key: int, ref: Any) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[0] is ref:
            del self.live[key]
            self.current[entry[1]] -= entry[2]
            self.total -= entry[2]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.add(t)
        return out


def prime_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (Adam's moments appear in its first step) with one step on
    zero gradients, outside any tracking. Meant for fake tensors: on real ones, weight decay moves
    the weights by ``lr * weight_decay``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], Tensor],
                      iterations: int = 2) -> MemoryEstimate:
    """Peak memory of ``iterations`` training steps, each ``loss_fn().backward(); optimizer.step();
    optimizer.zero_grad(set_to_none=True)``, by ``PeakMemory`` on the parameters' device.

    Breakdown at the peak: the model's parameters and buffers and the optimizer's state (counted
    from the start), gradients (each ``p.grad`` once accumulated), and what the ops made in each
    phase: activations (``loss_fn``, which should create its inputs), temporary (backward: the
    activations' gradients), optimizer (the step's own temporaries too). Adam's state appears in
    the first step, so the steady-state peak needs 2 iterations, or 1 after ``prime_optimizer``.
    Build the model, optimizer and inputs inside one ``fake_mode()`` to allocate nothing; with
    real tensors the same call tracks real allocations (on any device)."""
    if iterations < 1 or (iterations < 2 and not optimizer.state):
        raise ValueError(f"{iterations} iteration(s) of an optimizer without state: the steady-state peak needs "
                         "2 (Adam's state appears in the first step), or 1 after prime_optimizer()")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    device = params[0].device  # Adam's step counters may sit on the CPU beside CUDA parameters: not counted
    tracker = PeakMemory(device)

    def add_optimizer_state() -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, Tensor):
                    tracker.add(value, "optimizer")

    for p in params:
        tracker.add(p, "params")
        if p.grad is not None:
            tracker.add(p.grad, "grads")
    for b in model.buffers():
        tracker.add(b, "buffers")
    add_optimizer_state()
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.add(p.grad, "grads"))
             for p in params if p.requires_grad]
    try:
        with tracker:
            for _ in range(iterations):
                tracker.phase = "activations"
                loss = loss_fn()
                tracker.phase = "temporary"
                loss.backward()
                tracker.phase = "optimizer"
                optimizer.step()
                add_optimizer_state()  # the state the first step creates
                optimizer.zero_grad(set_to_none=True)
                del loss
    finally:
        for hook in hooks:
            hook.remove()
    kind = "FakeTensorMode + ldm.cost.PeakMemory" if _is_fake(params[0]) else f"ldm.cost.PeakMemory on {device}"
    method = (f"{kind}: live tensor storages at the peak of a steady-state {type(optimizer).__name__} step, "
              f"{params[0].dtype}, each rounded up to {ALLOCATION_BLOCK} B; no allocator fragmentation / CUDA context")
    return MemoryEstimate(tracker.peak, dict(tracker.at_peak), method)


def cuda_train_step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], Tensor],
                           iterations: int = 3) -> MemoryEstimate:
    """Measured peak on a GPU: ``reset_peak_memory_stats``, ``iterations`` (>= 2) steps,
    synchronize, ``max_memory_allocated`` (minus nothing: the model and optimizer count)."""
    if iterations < 2:
        raise ValueError(f"iterations must be >= 2 (Adam state appears in the first step), got {iterations}")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"cuda_train_step_memory needs a model on a CUDA device, got {device}")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(iterations):
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    return MemoryEstimate(peak, {}, f"torch.cuda.max_memory_allocated over {iterations} "
                                    f"{type(optimizer).__name__} steps on {torch.cuda.get_device_name(device)}")


def adam_model_state_bytes(num_params: int, bytes_per_param: int = 16) -> int:
    """The rule of thumb for fp32 AdamW: weights 4 + gradients 4 + two moments 8 = 16 B/param."""
    return num_params * bytes_per_param


# ------------------------------------------------------------------------------------------
# analytic count: the one FLOP model of a transformer block (the cross-check of the counter,
# the trainer's TFLOP/s and MFU, Hi-VAE's cost breakdown)
# ------------------------------------------------------------------------------------------
def transformer_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0, *, context: int = 0,
                            attn_group: int | None = None, cond_dim: int | None = None,
                            self_attn: bool = True) -> tuple[int, int]:
    """``(linear, attention)`` forward FLOPs (2 x MAC) of one adaLN transformer block
    (``ldm.layers.TransformerBlock``) on ONE sequence of N = ``tokens`` tokens of width d = ``dim``:

        adaLN modulation 12 c d (c = ``cond_dim``, default d), MLP 4 N d F (F = int(d * mlp_ratio)),
        self-attention: QKV + output projections 8 N d^2, scores + weighted sum 4 N g d over groups
        of g = ``attn_group`` tokens (default N: full attention),
        cross-attention to M = ``context`` tokens: 4 N d^2 + 4 M d^2, scores + sum 4 N M d.

    ``linear`` is every matrix product with weights, ``attention`` the scores and weighted sums."""
    n, d, ffn = tokens, dim, int(dim * mlp_ratio)
    g = n if attn_group is None else attn_group
    linear = 2 * (d if cond_dim is None else cond_dim) * 6 * d + 2 * 2 * n * d * ffn
    attention = 0
    if self_attn:
        linear += 2 * n * d * 3 * d + 2 * n * d * d
        attention += 4 * n * g * d
    if context:
        linear += 2 * n * d * d + 2 * context * d * 2 * d + 2 * n * d * d
        attention += 4 * n * context * d
    return linear, attention


def dit_trunk_flops(depth: int, hidden: int, tokens: int, mlp_ratio: float = 4.0, context: int = 0) -> int:
    """Forward FLOPs of one sample through ``depth`` DiT blocks (full attention, cross-attention to
    ``context`` tokens); embeddings and heads are left out. A training step is ~3x the forward."""
    return depth * sum(transformer_block_flops(tokens, hidden, mlp_ratio, context=context))


def dit_forward_flops_analytic(depth: int, hidden: int, groups: Sequence[tuple[int, int]], mlp_ratio: float = 4.0,
                               freq_dim: int = 256, text_tokens: int = 0, text_dim: int = 0) -> int:
    """Exact forward FLOPs (2 x MAC) of one sample through an adaLN-Zero DiT with full attention.

    ``groups``: ``(tokens, token_dim)`` per token group (patch features in = out). The trunk is
    ``dit_trunk_flops`` over N = all tokens (with cross-attention to M = 1 + text_tokens context
    tokens when there is text: the learned empty-text token + the caption), plus the patch
    embeddings 2 N_g p_g d, the output heads 2 N_g d p_g + 4 d^2 each, the timestep MLP
    2 freq d + 2 d^2 and the text projection 2 L text_dim d + 2 L d^2. (For r = 4 the trunk is
    the familiar 24 N d^2 + 4 N^2 d per layer.)
    """
    n = sum(t for t, _ in groups)
    d = hidden
    total = dit_trunk_flops(depth, d, n, mlp_ratio, context=1 + text_tokens if text_dim else 0)
    if text_dim:
        total += 2 * text_tokens * text_dim * d + 2 * text_tokens * d * d
    total += sum(2 * t * p * d + 2 * t * d * p + 2 * d * 2 * d for t, p in groups)  # embeddings, heads
    total += 2 * freq_dim * d + 2 * d * d  # timestep MLP
    return total
