"""Extraction and shard-reading throughput, measured in one run.

    python benchmarks/extraction.py [--clips 64] [--frames 9] [--size 64] [--source-size S]
                                    [--autoencoders kl2d-f8c4-debug,...]
                                    [--device cuda --dtype bf16] [--workers 0,2] [--batch-sizes 1,8]
                                    [--compile [--compile-mode reduce-overhead]]

Prints, per autoencoder:
- where the time goes: video decoding alone (clips/s through the same DataLoader, per worker
  count) and the autoencoder's own batched encode alone (clips/s on clips already on the device, at
  the same dtype, per batch size);
- ``ldm extract`` per (workers, batch size): clips/s of its loop (decode + encode + shard write,
  after the model is built; the wall-clock rate with set-up is printed too), and its efficiency:
  extraction clips/s / encode-only clips/s at the same batch size (the goal on a GPU is >= 0.8);
  the same for the steady rate, which leaves out the fill (the wait for the first batch of decoded
  clips: worker start-up and first reads, paid once per run, so a run of a few batches understates
  what a long extraction reaches);
  the share of the steady time the encode loop waited for decoded clips (`decode_wait_share`: high
  means decoding, not the encoder, sets the rate) and where the loop's time went per clip
  (`loop_ms_per_clip`: waiting for decoded clips, queueing the batch (on a GPU the encoder's launch
  time), waiting for the device, storing the samples; of `steady`, the rest is unpacking, hand-offs
  and waits for the GIL);
  the speed-up of workers and of batching over the first (workers, batch) pair;
- with ``--compile``, all of it with the encoder compiled (``ldm extract --compile``, the encode alone
  through the same `Autoencoder.compile_encode`), and each extraction's compile time (``compile_s``,
  before its loop: not in its rates);
- the shard reader's samples/s (decode + validate + collate) with 0 and 2 DataLoader workers, and
  reader / extraction (how many times faster a trainer can read latents than make them);
- the host (`host`): CPU model, cores (all, pinned, the cgroup's CPU quota, what ``ldm extract``
  counts), load, and what one clip's decoding costs in this process: wall, user and system CPU ms
  and page faults, so decoding rates from two machines can be told apart (a slower core, a CPU
  quota, a costly kernel: the H100 rows of the README decoded ~7x slower per process than the
  2-core CPU machine, before a frame's RGB conversion stopped starting a thread per core).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not
from autoencoders import build
from data.shards import LatentShards, collate
from data.sources import VideoClipDataset, list_items
from data.synth import synth_dataset
from data.video import cgroup_cpu_quota, read_clips_timed, read_video, usable_cores
from launch import dist
from launch.extract import ExtractConfig, auto_workers, extract
from ldm.layers import ENCODE_COMPILE_MODES


def reader_rate(path: Path, workers: int, batch: int = 16) -> float:
    ds = LatentShards(str(path), shuffle=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=collate, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for _ in range(3):  # three epochs
        for b in loader:
            n += b["latent"].batch_size
    return n / (time.perf_counter() - t0)


def decode_rate(folder: Path, frames: int, size: int, workers: int) -> float:
    """Clips/s of video decoding alone (PyAV, resize, crop) through a DataLoader like extract's."""
    items = list_items(folder)
    ds = VideoClipDataset(items, frames, size, size, None)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=lambda b: b[0])
    t0 = time.perf_counter()
    n = sum(1 for _ in loader)
    return n / (time.perf_counter() - t0)


def host_facts(folder: Path, frames: int, size: int) -> dict:
    """The machine's CPU and what decoding one clip costs in this process (the uint8 path of
    ``ldm extract``'s workers, each video read twice: the first pass warms the caches and is not counted)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    files = [it.load_bytes() for it in list_items(folder)]
    for data in files:
        read_clips_timed(data, frames, size, size, uint8=True)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for data in files:
        read_clips_timed(data, frames, size, size, uint8=True)
    wall, r1, n = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF), len(files)
    return {"cpu_model": model, "cpus": os.cpu_count(),
            "pinned": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cgroup_cpu_quota": cgroup_cpu_quota(), "usable_cores": usable_cores(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "decode_one_clip": {"clips_per_s": n / wall, "wall_ms": 1e3 * wall / n,
                                "user_ms": 1e3 * (r1.ru_utime - r0.ru_utime) / n,
                                "sys_ms": 1e3 * (r1.ru_stime - r0.ru_stime) / n,
                                "page_faults": (r1.ru_minflt - r0.ru_minflt + r1.ru_majflt - r0.ru_majflt) / n}}


@torch.no_grad()
def encode_rate(name: str, clips: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype,
                compile_mode: str | None = None) -> float:
    """Clips/s of the autoencoder's batched encode alone, clips already on the device (compiled first
    in ``compile_mode``, if given)."""
    torch.manual_seed(0)
    ae = build(name).to(device=device, dtype=dtype).eval()
    if compile_mode:
        ae.compile_encode(compile_mode)
    video = clips.to(device, dtype)
    run = lambda i: ae.encode(video[i:i + batch])  # noqa: E731
    run(0)  # warm-up (cuDNN picks its algorithms; the compile)
    run(0)  # (CUDA graphs are recorded at the second call)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(0, video.shape[0] - batch + 1, batch):
        run(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n = (video.shape[0] // batch) * batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=64, help="the clips' height and width")
    p.add_argument("--source-size", type=int, default=None,
                   help="the videos' height and width (default: --size; larger: every clip is resized, as most "
                        "real videos are)")
    p.add_argument("--autoencoders", default="kl2d-f8c4-debug,causal3d-f4x8c4-debug")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--workers", default="0,2", help="decoding worker counts to compare (-1: ldm extract's auto)")
    p.add_argument("--batch-sizes", default="1,8", help="encoder batch sizes to compare")
    p.add_argument("--compile", action="store_true", help="the encoder compiled (ldm extract --compile true)")
    p.add_argument("--compile-mode", default="default", choices=list(ENCODE_COMPILE_MODES))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = dist.compute_dtype(args.dtype, device)
    worker_counts = [int(w) for w in args.workers.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_dataset(tmp / "videos", num=args.clips, frames=args.frames, size=args.source_size or args.size, fps=8,
                      seed=0)
        decode = {w: decode_rate(tmp / "videos", args.frames, args.size, auto_workers(w, device, 1))
                  for w in worker_counts}
        host = host_facts(tmp / "videos", args.frames, args.size)
        clips = torch.stack([read_video(it.load_bytes(), args.frames, args.size, args.size)
                             for it in list_items(tmp / "videos")])
        for name in args.autoencoders.split(","):
            mode = args.compile_mode if args.compile else None
            encode = {b: encode_rate(name, clips, b, device, dtype, mode) for b in batch_sizes}
            runs = []
            for w in worker_counts:
                for b in batch_sizes:
                    out = tmp / f"{name}-w{w}-b{b}"
                    cfg = ExtractConfig(autoencoder=name, input=str(tmp / "videos"), output=str(out),
                                        frames=args.frames, height=args.size, width=args.size, shard_size=16,
                                        batch_size=b, num_workers=w, device=args.device, dtype=args.dtype,
                                        compile=args.compile, compile_mode=args.compile_mode)
                    # with --json, stdout is the JSON only: ldm extract's lines (its "decoding limited" advice
                    # too) go to stderr
                    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
                        warnings.simplefilter("ignore")
                        t0 = time.perf_counter()
                        summary = extract(cfg)
                        wall = args.clips / (time.perf_counter() - t0)
                    # the loop rate (decode + encode + write, after the model is built and moved) is the
                    # one to compare with the encoder alone; the wall rate adds the fixed set-up
                    # and the steady rate leaves out the fill (the wait for the first batch of decoded clips)
                    rate, steady = summary["clips_per_s"], summary["steady_clips_per_s"]
                    runs.append({"workers": w, "workers_used": summary["num_workers"], "batch": b,
                                 "extract_clips_per_s": rate, "wall_clips_per_s": wall,
                                 "efficiency_vs_encode": rate / encode[b], "fill_s": summary["fill_s"],
                                 "steady_clips_per_s": steady, "steady_efficiency_vs_encode": steady / encode[b],
                                 "decode_wait_share": summary["decode_wait_share"],
                                 "loop_ms_per_clip": summary["loop_ms_per_clip"], "compile_s": summary["compile_s"]})
            base = next(r["extract_clips_per_s"] for r in runs
                        if r["workers"] == worker_counts[0] and r["batch"] == batch_sizes[0])
            for r in runs:
                r["speedup"] = r["extract_clips_per_s"] / base
            best = max(runs, key=lambda r: r["extract_clips_per_s"])
            out = tmp / f"{name}-w{best['workers']}-b{best['batch']}"
            r0, r2 = reader_rate(out, 0), reader_rate(out, 2)
            rows.append({"autoencoder": name, "clips": args.clips, "source_size": args.source_size or args.size,
                         "device": args.device, "dtype": dist.dtype_name(dtype),
                         "compile": args.compile and args.compile_mode,
                         "decode_clips_per_s": decode,
                         "encode_clips_per_s": encode, "extract": runs,
                         "extract_clips_per_s": best["extract_clips_per_s"],
                         "reader_samples_per_s_w0": r0, "reader_samples_per_s_w2": r2,
                         "reader_over_extract": r0 / best["extract_clips_per_s"], "host": host})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"clips: {args.clips} x {args.frames}x{args.size}x{args.size} (from {args.source_size or args.size}-pixel "
          f"videos), {args.device} {dist.dtype_name(dtype)}"
          f"{f', encoder compiled ({args.compile_mode})' if args.compile else ''}, "
          f"threads: {torch.get_num_threads()}")
    if rows:
        h, d = rows[0]["host"], rows[0]["host"]["decode_one_clip"]
        print(f"host: {h['cpu_model']}, {h['cpus']} cores, {h['pinned']} pinned, quota {h['cgroup_cpu_quota']}, "
              f"{h['usable_cores']} usable, load {h['loadavg_1m']}; one clip's decoding here: {d['wall_ms']:.2f} ms "
              f"(user {d['user_ms']:.2f}, system {d['sys_ms']:.2f}, {d['page_faults']:.0f} page faults)")
    for r in rows:
        print(f"\n{r['autoencoder']}: decode alone " + ", ".join(f"{v:.1f} clip/s ({w} wk)"
                                                        for w, v in r["decode_clips_per_s"].items())
              + "; encode alone " + ", ".join(f"{v:.1f} clip/s (batch {b})" for b, v in r["encode_clips_per_s"].items()))
        print(f"  {'workers':>7s} {'batch':>5s} {'extract clip/s':>14s} {'(wall)':>7s} {'vs encode':>9s} {'speed-up':>8s} "
              f"{'fill s':>6s} {'steady':>7s} {'vs encode':>9s} {'waited':>6s}")
        for x in r["extract"]:
            print(f"  {x['workers']:7d} {x['batch']:5d} {x['extract_clips_per_s']:14.1f} {x['wall_clips_per_s']:7.1f} "
                  f"{x['efficiency_vs_encode']:9.2f} {x['speedup']:7.2f}x {x['fill_s']:6.2f} "
                  f"{x['steady_clips_per_s']:7.1f} {x['steady_efficiency_vs_encode']:9.2f} "
                  f"{'-' if x['decode_wait_share'] is None else format(x['decode_wait_share'], '6.0%'):>6s}")
            print("          loop ms/clip: " + ", ".join(f"{k} {v:.2f}" for k, v in x["loop_ms_per_clip"].items()))
        print(f"  reader {r['reader_samples_per_s_w0']:.1f} / {r['reader_samples_per_s_w2']:.1f} samples/s "
              f"(0 / 2 workers): {r['reader_over_extract']:.1f}x the best extraction")


if __name__ == "__main__":
    main()
