"""Extraction and shard-reading throughput, measured in one run.

    python benchmarks/extraction.py [--clips 64] [--frames 9] [--size 64] [--autoencoders kl2d-f8c4-debug,...]

Prints, per autoencoder: extraction clips/s (video decode + encode + shard write, one process),
and the shard reader's samples/s (decode + validate + collate) with 0 and 2 DataLoader workers,
plus the ratio reader / extraction (how many times faster a trainer can read latents than make them).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from data.shards import LatentShards, collate
from data.synth import synth_dataset
from launch.extract import ExtractConfig, extract


def reader_rate(path: Path, workers: int, batch: int = 16) -> float:
    ds = LatentShards(str(path), shuffle=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=collate, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for _ in range(3):  # three epochs
        for b in loader:
            n += b["latent"].batch_size
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--autoencoders", default="kl2d-f8c4-debug,causal3d-f4x8c4-debug")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_dataset(tmp / "videos", num=args.clips, frames=args.frames, size=args.size, fps=8, seed=0)
        for name in args.autoencoders.split(","):
            out = tmp / name
            cfg = ExtractConfig(autoencoder=name, input=str(tmp / "videos"), output=str(out), frames=args.frames,
                                height=args.size, width=args.size, shard_size=16, batch_size=8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                extract(cfg)
                extract_rate = args.clips / (time.perf_counter() - t0)
            r0, r2 = reader_rate(out, 0), reader_rate(out, 2)
            rows.append({"autoencoder": name, "clips": args.clips, "extract_clips_per_s": extract_rate,
                         "reader_samples_per_s_w0": r0, "reader_samples_per_s_w2": r2,
                         "reader_over_extract": r0 / extract_rate})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"clips: {args.clips} x {args.frames}x{args.size}x{args.size}, threads: {torch.get_num_threads()}")
    print(f"{'autoencoder':26s} {'extract clip/s':>14s} {'read/s (0 wk)':>14s} {'read/s (2 wk)':>14s} {'read/extract':>13s}")
    for r in rows:
        print(f"{r['autoencoder']:26s} {r['extract_clips_per_s']:14.1f} {r['reader_samples_per_s_w0']:14.1f} "
              f"{r['reader_samples_per_s_w2']:14.1f} {r['reader_over_extract']:12.1f}x")


if __name__ == "__main__":
    main()
