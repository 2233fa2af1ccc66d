"""A stand-in accelerator for CPU-only machines: tensors that say they live on another device.

``OffDevice`` (a ``TorchDispatchMode``) and ``OffDeviceTensor`` run every op on real CPU data but
report ``device("meta")`` and enforce CUDA's rule for mixing devices: an op that takes a tensor on
the stand-in device and a CPU tensor with one or more dimensions fails with the error CUDA gives
("Expected all tensors to be on the same device"). CPU scalars (0-d tensors) may mix, CPU index
tensors may index, and copies between devices are allowed, as on CUDA. So code that creates a
tensor on the CPU inside a forward (``torch.arange(n)`` instead of ``torch.arange(n,
device=x.device)``) fails here as it would on a GPU, while values, ``.item()``, data-dependent
shapes and autograd all work (unlike PyTorch's meta device or ``FakeTensorMode``, which have no
values; a ``FakeTensorMode`` with a fake cuda device was tried too: it cannot run ``.item()``).

    with OffDevice():
        model = model.to(OFF)
        out = model(x.to(OFF))           # real numbers; mixed devices raise as on CUDA
        out.cpu()                        # back to plain CPU tensors

    with OffDevice() as dev:
        ...
    dev.syncs                            # where CUDA would wait for the device (see `HOST_SYNCS`)
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

OFF = torch.device("meta")  # the device the stand-in tensors report
aten = torch.ops.aten

# ops that may take tensors of both devices on CUDA: copies and indexing with CPU indices
_MIXING_ALLOWED = {aten._to_copy.default, aten.copy_.default, aten.index.Tensor, aten.index_put_.default,
                   aten.index_put.default, aten._index_put_impl_.default, aten._unsafe_index.Tensor,
                   aten._unsafe_index_put.default}


# ops that make the host wait for the device on CUDA: a value read on the host, or an output whose
# shape depends on the values (boolean-mask indexing goes through ``nonzero``; counted below)
HOST_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
              aten.repeat_interleave.Tensor, aten.bincount.default}
_counters: list[Counter] = []  # the entered `OffDevice` modes' sync counters


def _count_sync(what: str) -> None:
    for c in _counters:
        c[what] += 1


class OffDeviceTensor(torch.Tensor):
    """A CPU tensor (``inner``) that reports ``OFF`` as its device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                               storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                               device=OFF, requires_grad=inner.requires_grad)
        r.inner = inner
        return r

    def __repr__(self) -> str:
        return f"OffDeviceTensor({self.inner!r})"

    def tolist(self):  # a copy to the host, as on CUDA (``.numpy()`` stays an error, as on CUDA)
        _count_sync("tolist")
        return self.inner.tolist()

    # Python lists as indices become index tensors in C++ on the indexed tensor's device, copied
    # there below the dispatcher (no values on "meta"): hand them over as CPU tensors, as CUDA may.
    def __getitem__(self, index):
        return super().__getitem__(_index_tensors(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_index_tensors(index), value)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _index_tensors(index):
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(_index_tensors(i) for i in index)
    return index


def _targets_off(device) -> bool:
    return device is not None and torch.device(device).type == OFF.type


def _run(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    off_in = any(isinstance(a, OffDeviceTensor) for a in flat)
    if off_in and func not in _MIXING_ALLOWED:
        cpu = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, OffDeviceTensor) and a.dim() > 0]
        if cpu:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{OFF} and cpu! ({func}: a CPU tensor of shape {tuple(cpu[0].shape)})")
    if any(type(a) is torch.Tensor and a.is_meta for a in flat):
        raise RuntimeError(f"{func} got a tensor without values (a real meta tensor): some C++ conversion made it "
                           "on the stand-in device below the dispatcher; extend tests/offdevice.py for it")
    to_off = _targets_off(kwargs.get("device"))
    if off_in and _counters:
        _note_sync(func, args, kwargs, to_off)
    unwrap = lambda a: a.inner if isinstance(a, OffDeviceTensor) else a  # noqa: E731
    args2, kwargs2 = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    if to_off:
        kwargs2 = dict(kwargs2, device=torch.device("cpu"))
    out = func(*args2, **kwargs2)
    if func is aten._to_copy.default:
        wrap = to_off or (off_in and kwargs.get("device") is None)
    else:
        wrap = off_in or to_off
    if not wrap:
        return out
    return tree_map(lambda o: OffDeviceTensor(o) if type(o) is torch.Tensor else o, out)


def _note_sync(func, args, kwargs, to_off: bool) -> None:
    if func in HOST_SYNCS and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
        _count_sync(str(func.overloadpacket.__name__))
    elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default) \
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
        _count_sync("boolean index")
    elif func is aten._to_copy.default and not to_off and kwargs.get("device") is not None:
        _count_sync("copy to host")
    elif func is aten.copy_.default and not isinstance(args[0], OffDeviceTensor):
        _count_sync("copy to host")


class OffDevice(TorchDispatchMode):
    """Within it, factories asked for ``device=OFF`` make ``OffDeviceTensor`` s. ``torch.tensor``
    and ``torch.as_tensor`` copy Python data without dispatching, so they are wrapped too.

    ``syncs`` counts, by kind, the operations on stand-in tensors that would make the host wait for
    the device on CUDA (`HOST_SYNCS`, boolean-mask indexing, copies to the host, ``tolist``)."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    def __enter__(self):
        self._saved = torch.tensor, torch.as_tensor

        def from_data(make):
            def wrapped(data, *args, device=None, **kwargs):
                if _targets_off(device):
                    return OffDeviceTensor(make(data, *args, **kwargs))
                return make(data, *args, device=device, **kwargs)
            return wrapped

        torch.tensor, torch.as_tensor = from_data(torch.tensor), from_data(torch.as_tensor)
        _counters.append(self.syncs)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._saved
        del _counters[next(i for i, c in enumerate(_counters) if c is self.syncs)]  # by identity, not ==:
        # an empty counter equals every other empty one
        return super().__exit__(*exc)


def off(x):
    """Move a tensor, a module or a nested structure of tensors to the stand-in device (inside
    ``OffDevice``)."""
    if isinstance(x, torch.nn.Module):
        return x.to(OFF)
    return tree_map(lambda t: t.to(OFF) if isinstance(t, torch.Tensor) else t, x)


class HostReads(TorchDispatchMode):
    """Counts, in ``n``, the host reads of plain CPU tensors that would make the host wait for a GPU:
    the ops of `HOST_SYNCS` (``.item()``, ``bool()``, data-dependent shapes) and ``.tolist()`` (which
    bypasses the dispatcher). For code that cannot run on the stand-in device (a DeepSpeed engine);
    copies to the host are not seen on CPU tensors. ``ops`` counts every op dispatched, by name."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in HOST_SYNCS
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.ops = Counter()
        self._tolist = tolist = torch.Tensor.tolist

        def counted(t, *args, **kwargs):
            self.n += 1
            return tolist(t, *args, **kwargs)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
