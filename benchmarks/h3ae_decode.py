"""H3AE decoding cost: the 2D spatial stage vs an all-3D (causal Conv3D everywhere) decoder, per config.

    python benchmarks/h3ae_decode.py [--frames 17] [--size 512] [--cpu-size 128] [--repeats 2]
                                     [--configs h3ae-4x16x16,h3ae-8x32x32,h3ae-8x64x64] [--json out.json]

For every config (and its ``spatial_3d=True`` twin, the "3D" row of the paper's Tab. 1) it reports
the parameter count and the exact decode FLOPs of a ``--frames`` x ``--size``^2 clip (counted on the
meta device, no weights allocated), then times decoding with random weights:

- with a CUDA device: decode frames per second at ``--size`` (bf16 autocast, batch 1; the paper's
  Tab. 3 reports 269.8 FPS for 4x16x16 on an A100 at 17x512x512), peak memory, and the same with
  sliced decoding (the 2D stage one frame at a time);
- on CPU: CPU seconds per clip (``time.process_time``, so other processes sharing the cores do not
  inflate it; run with OMP_NUM_THREADS=1 for single-core numbers) at ``--cpu-size`` (a full
  512x512 decode takes minutes on a laptop CPU) and the 2D / all-3D time ratio, plus the debug
  twins' encode / decode times.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from autoencoders import build
from ldm.latent import Latent


def decode_flops(name: str, frames: int, size: int, **overrides) -> tuple[int, int]:
    """(decode FLOPs of one clip, parameters), on the meta device."""
    with torch.device("meta"):
        model = build(name, **overrides).eval()
        t, h, w = model.latent_spec(frames, size, size).parts["z"][1:]
        z = torch.empty(1, model.config.latent_channels, t, h, w)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.decode(Latent({"z": z}))
    return counter.get_total_flops(), model.num_parameters()


def _clock(device: torch.device):
    return time.perf_counter if device.type == "cuda" else time.process_time


def time_decode(model, frames: int, size: int, device: torch.device, repeats: int,
                chunk: int | None = None) -> dict[str, float]:
    """Seconds per decode of one clip (best of ``repeats`` after a warm-up; CPU seconds on CPU) and
    CUDA peak memory."""
    clock = _clock(device)
    model.set_frame_chunk(chunk)
    t, h, w = model.latent_spec(frames, size, size).parts["z"][1:]
    z = torch.randn(1, model.config.latent_channels, t, h, w, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    best = float("inf")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), autocast:
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = clock()
            model.decode(Latent({"z": z}))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                best = min(best, clock() - t0)
    out = {"seconds": best, "fps": frames / best}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    model.set_frame_chunk(None)
    return out


def time_debug(name: str, frames: int, repeats: int) -> dict[str, float]:
    """CPU seconds to encode / decode one clip of side 2f with a debug twin."""
    torch.manual_seed(0)
    model = build(name).eval()
    side = 2 * model.spatial_factor
    video = torch.rand(1, 3, frames, side, side) * 2 - 1
    enc = dec = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.process_time()
            latent = model.encode(video)
            t1 = time.process_time()
            model.decode(latent)
            t2 = time.process_time()
            if i > 0:
                enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
    return {"size": side, "params": model.num_parameters(), "encode_s": enc, "decode_s": dec}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="h3ae-4x16x16,h3ae-8x32x32,h3ae-8x64x64")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=512, help="resolution of the FLOP count and of GPU timing")
    p.add_argument("--cpu-size", type=int, default=128, help="resolution of CPU timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size if cuda else args.cpu_size
    results = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
               "frames": args.frames, "flop_size": args.size, "timing_size": size, "configs": {}}
    for name in args.configs.split(","):
        row = {}
        for label, s3 in (("2d", False), ("3d", True)):
            flops, params = decode_flops(name, args.frames, args.size, spatial_3d=s3)
            torch.manual_seed(0)
            model = build(name, spatial_3d=s3).to(device).eval()
            timing = time_decode(model, args.frames, size, device, args.repeats)
            row[label] = {"params": params, "decode_tflop": flops / 1e12, **timing}
            if cuda and not s3:
                row["2d_sliced"] = time_decode(model, args.frames, size, device, args.repeats, chunk=1)
            del model
            peak = f", peak {timing['peak_gib']:.2f} GiB" if "peak_gib" in timing else ""
            print(f"{name:14s} {label}: {params / 1e6:7.2f}M params, {flops / 1e12:6.3f} TFLOP/clip @ "
                  f"{args.frames}x{args.size}^2, {timing['seconds'] * 1e3:9.1f} ms/clip @ {size}^2 "
                  f"({timing['fps']:.1f} FPS){peak}", flush=True)
        row["ratio_2d_vs_3d"] = {"flops": row["2d"]["decode_tflop"] / row["3d"]["decode_tflop"],
                                 "time": row["2d"]["seconds"] / row["3d"]["seconds"]}
        print(f"{name:14s} 2D-stage / all-3D decode: FLOPs {row['ratio_2d_vs_3d']['flops']:.3f}, "
              f"time {row['ratio_2d_vs_3d']['time']:.3f}", flush=True)
        results["configs"][name] = row
    if not cuda:
        results["debug"] = {}
        for name in args.configs.split(","):
            d = time_debug(name + "-debug", args.frames, args.repeats)
            results["debug"][name + "-debug"] = d
            print(f"{name + '-debug':20s} {d['params'] / 1e6:.2f}M params, {args.frames}x{d['size']}^2: "
                  f"encode {d['encode_s'] * 1e3:.1f} ms, decode {d['decode_s'] * 1e3:.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
