"""IV-VAE reconstruction of growing videos: one shot vs cache mechanism vs overlapping clips
(the paper's Table 7, Sec. 4.5.2), peak memory and time, measured in one run.

    python benchmarks/ivvae_cache.py [--autoencoder ivvae-z16-debug] [--frames 17,65,129] [--size 64]
                                     [--device auto] [--json]

Methods (reconstruction = encode to the posterior mean, then decode):

- ``one-shot``: the whole clip through encoder and decoder at once.
- ``cache``: frame 0 alone, then 4-frame chunks (the decoder: latent frame 0, then one latent frame
  per chunk), every group-causal conv carrying its last input frame to the next chunk
  (``chunk_frames=4``). Exactly the one-shot result (the max difference is printed).
- ``overlap``: the usual baseline — independent 5-frame clips that overlap by one frame
  (0-4, 4-8, ...), each reconstructed on its own, the overlapped frame dropped from all but the
  first. Not equal to one shot (its max difference is printed too) and it encodes extra frames.

How memory is measured. On CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the
memory allocated before it (input video and weights excluded). On CPU the process RSS is useless
(the allocator keeps freed pages) and ``tracemalloc`` cannot see torch's allocations, so a
``TorchDispatchMode`` (`LiveTensorBytes`) watches every aten op: each storage an op creates is
counted until it is freed (a weak reference to the storage says when), and the peak of the live
total over op boundaries is reported. This is the CPU analogue of ``max_memory_allocated`` — bytes
of live tensors, including the output video — except that scratch buffers a kernel allocates and
frees inside one op (e.g. convolution workspaces) are invisible. Time is measured in a separate
call without the tracker (its per-op bookkeeping would penalise the many small ops of chunking).
Weights are random: memory, time and the exactness of the cache do not depend on their values.
``peak-output`` is the working memory besides the reconstruction itself: flat for the cache.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autoencoders import build
from autoencoders.ivvae import IVVAE

MiB = 2 ** 20


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while the mode is active and still alive (see the
    module docstring). Storages made before entering (weights, the input video) are not counted,
    nor are views of them."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):  # storages freed since the last op
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        # a result sharing an input's storage (a view, an in-place or out= op) allocates nothing
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in inputs and ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def one_shot(model: IVVAE, video: Tensor) -> Tensor:
    """Encode to the posterior mean and decode, the way ``model.config.chunk_frames`` says."""
    return model.decode(model.encode(video))


def overlapping(model: IVVAE, video: Tensor, clip: int = 5) -> Tensor:
    """Independent clips of ``clip`` frames with a one-frame overlap; the overlapped (first) frame
    of every clip but the first is dropped after reconstruction."""
    frames = video.shape[2]
    out = torch.empty_like(video)
    out[:, :, :clip] = one_shot(model, video[:, :, :clip])
    for s in range(clip - 1, frames - 1, clip - 1):
        out[:, :, s + 1:s + clip] = one_shot(model, video[:, :, s:s + clip])[:, :, 1:]
    return out


METHODS = ("one-shot", "cache", "overlap")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(fn: Callable[[Tensor], Tensor], video: Tensor, repeats: int = 1) -> tuple[Tensor, float, int]:
    """(reconstruction ``fn(video)``, seconds (best of ``repeats``), peak bytes)."""
    device = video.device
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(video)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        del out
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(video)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with LiveTensorBytes() as tracker:
            out = fn(video)
        peak = tracker.peak
    return out, best, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder", default="ivvae-z16-debug",
                   help="an ivvae-* registry name (ivvae-z16: the paper's model of Table 7)")
    p.add_argument("--frames", default="17,65,129", help="comma-separated clip lengths (1 + 4k each)")
    p.add_argument("--size", type=int, default=64, help="height = width (multiple of 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 needs CUDA (paper: BF16)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement (best is kept)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    model = build(args.autoencoder).to(device, dtype).eval()
    if not isinstance(model, IVVAE):
        raise SystemExit(f"{args.autoencoder} is not an IV-VAE")
    streaming = build(args.autoencoder, chunk_frames=4).to(device, dtype).eval()  # same weights, 1 + 4 + 4 ...
    streaming.load_state_dict(model.state_dict())
    fns = {"one-shot": lambda v: one_shot(model, v), "cache": lambda v: one_shot(streaming, v),
           "overlap": lambda v: overlapping(model, v)}
    lengths = [int(f) for f in args.frames.split(",")]
    for f in lengths:
        model.check_input(f, args.size, args.size)
    rows: list[dict[str, Any]] = []
    if not args.json:
        print(f"{args.autoencoder} ({model.num_parameters() / 1e6:.1f}M params), {args.size}x{args.size}, "
              f"{device}, {args.dtype}, {torch.get_num_threads()} thread(s); peak = live tensor bytes "
              f"({'max_memory_allocated' if device.type == 'cuda' else 'LiveTensorBytes dispatch tracker'})")
        print(f"{'frames':>6s} {'method':>9s} {'peak MiB':>10s} {'output':>7s} {'peak-output':>12s} "
              f"{'time s':>8s} {'x one-shot mem':>15s} {'max|diff|':>10s}", flush=True)
    for frames in lengths:
        g = torch.Generator().manual_seed(frames)
        video = (torch.rand(1, 3, frames, args.size, args.size, generator=g) * 2 - 1).to(device, dtype)
        reference = None
        for method in args.methods.split(","):
            try:
                out, seconds, peak = measure(fns[method], video, args.repeats)
            except torch.OutOfMemoryError as e:
                rows.append({"frames": frames, "method": method, "error": f"out of memory: {str(e).splitlines()[0]}"})
                print(f"{frames:6d} {method:>9s} out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            if reference is None:
                reference = out.float()
            r = {"frames": frames, "method": method, "seconds": seconds, "peak_mib": peak / MiB,
                 "output_mib": out.numel() * out.element_size() / MiB,
                 "max_abs_diff_vs_one_shot": float((out.float() - reference).abs().max())}
            rows.append(r)
            del out
            if not args.json:
                base = next(r for r in rows if r["frames"] == frames and "peak_mib" in r)  # first method measured
                print(f"{frames:6d} {method:>9s} {r['peak_mib']:10.1f} {r['output_mib']:7.1f} "
                      f"{r['peak_mib'] - r['output_mib']:12.1f} {seconds:8.2f} "
                      f"{r['peak_mib'] / base['peak_mib']:15.2f} {r['max_abs_diff_vs_one_shot']:10.2e}", flush=True)
    if args.json:
        print(json.dumps({"autoencoder": args.autoencoder, "size": args.size, "device": str(device),
                          "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
