"""Spatial tiling (``ae.enable_tiling``) against one-shot encode/decode: PSNR, time and peak memory.

    python benchmarks/tiling.py [--autoencoders kl2d-f8c4-debug,...] [--size 128] [--frames 0]
                                [--tiles 64:32:0,64:0:0] [--device auto] [--dtype fp32] [--json]

For every autoencoder (random weights, seed 0) and a synthetic clip (``data.synth``: a shape moving
over a textured background) of ``size x size``: the untiled latent and reconstruction, then for each
``tile:overlap:margin`` setting the tiled latent (``encode``) and the tiled decode of the untiled
latent, each compared with its untiled counterpart by PSNR with the untiled tensor's value range as
the peak (so latents and videos read alike). ``--frames 0`` takes each family's shortest video
(kl2d 1, causal 5, cmvae 8, opensora 17). Peak memory of the decode as `ivvae_cache.measure` takes it: CUDA
``max_memory_allocated`` above what was allocated before, or live tensor bytes on CPU (output
included). ``tests/test_tiling.py`` holds the PSNR bounds at the default setting.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import Tensor

from autoencoders import build
from data.synth import combinations, synth_clip
from ivvae_cache import MiB, measure
from ldm.metrics import psnr

SHORTEST = {"kl2d": 1, "cmvae": 8}  # others: the shortest video each takes (`Autoencoder.example_clip`)
DEFAULT = "kl2d-f8c4-debug,causal3d-f4x8c4-debug,ivvae-z16-debug,h3ae-4x16x16-debug,cmvae-z4-debug"


def clip(frames: int, size: int) -> Tensor:
    """Synthetic sample 0 of seed 0: ``1 3 T H W`` in [-1, 1]."""
    _, pixels = synth_clip(0, 0, combinations(), frames, size, size)  # uint8 (T, H, W, 3)
    return torch.from_numpy(pixels).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def psnr_vs(x: Tensor, reference: Tensor) -> float:
    """PSNR (dB) of ``x`` against ``reference``, peak = the reference's value range."""
    x, reference = x.float(), reference.float()
    return float(psnr(x, reference, data_range=float(reference.max() - reference.min())).min())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoders", default=DEFAULT, help="comma-separated registry names")
    p.add_argument("--size", type=int, default=128, help="height = width in pixels")
    p.add_argument("--frames", type=int, default=0, help="0: each family's shortest video")
    p.add_argument("--tiles", default="64:32:0,64:32:16,64:0:0",
                   help="comma-separated tile:overlap:margin settings in pixels")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    settings = [tuple(int(v) for v in s.split(":")) for s in args.tiles.split(",")]
    rows: list[dict[str, Any]] = []
    if not args.json:
        print(f"{args.size}x{args.size}, {device}, {args.dtype}; PSNR vs untiled (peak = untiled range)")
        print(f"{'autoencoder':>24s} {'frames':>6s} {'tile:ov:margin':>15s} {'latent dB':>10s} {'video dB':>9s} "
              f"{'decode s':>9s} {'decode peak MiB':>16s}", flush=True)
    for name in args.autoencoders.split(","):
        torch.manual_seed(0)
        ae = build(name).to(device, dtype).eval()
        frames = args.frames or SHORTEST.get(ae.family) or ae.example_clip()[0]
        video = clip(frames, args.size).to(device, dtype)
        with torch.no_grad():
            ref = ae.encode(video)
        decode = lambda z: ae.decode(ref.replace({"z": z}))  # noqa: E731  (measure takes a tensor)
        ref_video, seconds, peak = measure(decode, ref["z"])
        results = [("untiled", None, None, seconds, peak)]
        for tile, overlap, margin in settings:
            ae.enable_tiling(tile, overlap, margin)
            with torch.no_grad():
                latent = ae.encode(video)
            out, seconds, peak = measure(decode, ref["z"])
            results.append((f"{tile}:{overlap}:{margin}", psnr_vs(latent["z"], ref["z"]), psnr_vs(out, ref_video),
                            seconds, peak))
            ae.disable_tiling()
        for setting, latent_db, video_db, seconds, peak in results:
            rows.append({"autoencoder": name, "frames": frames, "size": args.size, "tiling": setting,
                         "latent_psnr_db": latent_db, "video_psnr_db": video_db, "decode_seconds": seconds,
                         "decode_peak_mib": peak / MiB})
            if not args.json:
                dbs = "" if latent_db is None else f"{latent_db:10.1f} {video_db:9.1f}"
                print(f"{name:>24s} {frames:6d} {setting:>15s} {dbs:>20s} {seconds:9.2f} {peak / MiB:16.1f}",
                      flush=True)
    if args.json:
        print(json.dumps({"device": str(device), "dtype": args.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
