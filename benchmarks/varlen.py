"""Variable-length latents in the DiT: padded vs packed throughput, and MTC-VAE vs fixed 4x latents.

    python benchmarks/varlen.py [--dit dit-S] [--size 64] [--segments 3] [--clips 16] [--batch-size 8]
                                [--selector h264] [--checkpoint DIR] [--steps 10] [--device cpu] [--json]

Clips: synthetic videos of ``--segments`` 17-frame segments, each still, slow or fast (a colored
shape on a textured background; a still segment holds one frame), encoded by MTC-VAE
(``mtcvae-c4-debug`` with random weights and the ``--selector`` quality function, or a trained
``--checkpoint``; the PSNR selector is only meaningful with trained weights).

(A) DiT training steps (forward + backward) on variable-length batches of those latents: tokens/s
    counting valid tokens, padded rows (padding mask) vs one packed row (``VideoDiT(pack=True)``),
    and their ratio.
(B) The paper's Tab. 2 idea: the same clips as MTC latents (the selector's rates) vs fixed 4x
    latents (every segment at the base rate): mean latent frames, average VCPR (mean over segments,
    the paper's convention) and the DiT's sampling time per generated video frame (``--steps``
    Euler steps, batches packed); speed-up = time(4x) / time(MTC).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import autoencoders
import dit
from data.synth import render_clip
from ldm import config as cfglib
from ldm import samplers
from ldm.latent import Cond, Latent

SEG = 17
MOTIONS = ("still", "slow", "fast")


def synth_clips(n: int, segments: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[list[str]]]:
    """``(n, 3, segments * 17, size, size)`` in [-1, 1] and each clip's per-segment motion."""
    rng = np.random.default_rng(seed)
    clips, motions = [], []
    for i in range(n):
        parts, kinds = [], []
        for s in range(segments):
            kind = MOTIONS[rng.integers(len(MOTIONS))]
            attrs = dict(shape=("circle", "square", "triangle")[rng.integers(3)], color=("red", "green", "blue")[s % 3],
                         direction=("left", "right", "up", "down")[rng.integers(4)],
                         speed="fast" if kind == "fast" else "slow", background="noise")
            frames = torch.from_numpy(render_clip(attrs, SEG, size, size, int(rng.integers(1 << 30))))
            if kind == "still":
                frames = frames[:1].expand(SEG, -1, -1, -1)
            parts.append(frames)
            kinds.append(kind)
        clips.append(torch.cat(parts).permute(3, 0, 1, 2).float() / 127.5 - 1)  # (C, T, H, W)
        motions.append(kinds)
    return torch.stack(clips), motions


def batches(latents: list[Latent], size: int) -> list[Latent]:
    return [Latent.collate(latents[i:i + size]) for i in range(0, len(latents), size)]


def valid_tokens(latent: Latent, patch: tuple[int, int, int]) -> int:
    _, _, _, h, w = latent["z"].shape
    frames = (-(-latent.aux["length"] // patch[0])).sum().item()
    return int(frames * -(-h // patch[1]) * -(-w // patch[2]))


def train_tokens_per_s(model, data: list[Latent], pack: bool, iters: int, device: str) -> float:
    """Valid tokens per second of forward + backward (velocity MSE on valid frames)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step's cost without changing weights
    tokens, seconds = 0, 0.0
    for i in range(iters + 1):
        lat = data[i % len(data)].to(device)
        t = torch.rand(lat.batch_size, device=device)
        start = time.perf_counter()
        v = model(lat, t, Cond(), pack=pack)
        valid = lat.padding_mask()[:, None, :, None, None]
        loss = ((v["z"] - lat["z"]) ** 2 * valid).sum() / valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first call warms up
            seconds += time.perf_counter() - start
            tokens += valid_tokens(lat, model.config.patch)
    return tokens / seconds


@torch.no_grad()
def sampling_seconds(model, data: list[Latent], steps: int, device: str) -> float:
    """Seconds to sample every latent of ``data`` (same shapes) with ``steps`` Euler steps, packed."""
    def packed(x, t, cond):
        return model(x, t, cond, pack=True)

    samplers.sample(packed, data[0].to(device), Cond(), steps=1)  # warm-up
    start = time.perf_counter()
    for lat in data:
        noise = Latent({"z": torch.randn_like(lat["z"])}, "varlen", aux=dict(lat.aux)).to(device)
        samplers.sample(packed, noise, Cond(), steps=steps)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default="dit-S")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--segments", type=int, default=3)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--selector", default="h264", choices=("psnr", "h264", "random"))
    p.add_argument("--checkpoint", help="a trained MTC-VAE folder (default: mtcvae-c4-debug, random weights)")
    p.add_argument("--iters", type=int, default=6, help="timed training steps per path")
    p.add_argument("--steps", type=int, default=10, help="Euler steps per sample in (B)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.checkpoint:
        ae = autoencoders.load_pretrained(args.checkpoint)
        ae.config = cfglib.replace(ae.config, selector=args.selector)
    else:
        ae = autoencoders.build("mtcvae-c4-debug", selector=args.selector)
    ae = ae.eval()
    clips, motions = synth_clips(args.clips, args.segments, args.size)
    t0 = time.perf_counter()
    with torch.no_grad():
        rates = ae.choose_rates(clips)
        mtc = [ae.encode_at(clips[i:i + 1], rates[i:i + 1]) for i in range(args.clips)]
        base = [ae.encode_at(clips[i:i + 1], torch.full_like(rates[i:i + 1], ae.config.rates[0]))
                for i in range(args.clips)]
    encode_s = time.perf_counter() - t0
    mtc = [Latent({"z": x["z"]}, "varlen", aux={"length": x.aux["length"]}) for x in mtc]
    base = [Latent({"z": x["z"]}, "varlen", aux={"length": x.aux["length"]}) for x in base]

    c, t_max, h, w = ae.latent_spec(args.segments * SEG, args.size, args.size).parts["z"]
    model = dit.build(args.dit, {"z": (c, t_max, h, w)}).to(args.device)
    mtc_batches, base_batches = batches(mtc, args.batch_size), batches(base, args.batch_size)

    model.train()
    padded = max(train_tokens_per_s(model, mtc_batches, False, args.iters, args.device) for _ in range(2))
    packed = max(train_tokens_per_s(model, mtc_batches, True, args.iters, args.device) for _ in range(2))
    model.eval()
    t_mtc = min(sampling_seconds(model, mtc_batches, args.steps, args.device) for _ in range(2))
    t_base = min(sampling_seconds(model, base_batches, args.steps, args.device) for _ in range(2))

    f = ae.spatial_factor
    per_segment = [r * f * f for r in rates.flatten().tolist()]
    lengths = torch.cat([x.aux["length"] for x in mtc]).float()
    padding = 1 - lengths.sum().item() / sum(b.batch_size * b["z"].shape[2] for b in mtc_batches)
    video_frames = args.clips * args.segments * SEG
    counts = {m: {str(r): 0 for r in ae.config.rates} for m in MOTIONS}
    for kinds, rs in zip(motions, rates.tolist()):
        for kind, r in zip(kinds, rs):
            counts[kind][str(r)] += 1
    result = {
        "device": args.device, "dit": args.dit, "params": model.num_parameters(), "selector": args.selector,
        "clips": args.clips, "clip_frames": args.segments * SEG, "size": args.size, "batch_size": args.batch_size,
        "rates_by_motion": counts, "encode_s": encode_s,
        "train_tokens_per_s_padded": padded, "train_tokens_per_s_packed": packed,
        "packed_over_padded": packed / padded, "padding_fraction": padding,
        "latent_frames_mtc": lengths.mean().item(), "latent_frames_4x": float(t_max),
        "vcpr_mtc": sum(per_segment) / len(per_segment), "vcpr_4x": float(ae.config.rates[0] * f * f),
        "sample_s_per_frame_mtc": t_mtc / video_frames, "sample_s_per_frame_4x": t_base / video_frames,
        "speedup_mtc_over_4x": t_base / t_mtc,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.clips} clips of {args.segments}x{SEG} frames at {args.size}^2, {args.dit} "
          f"({result['params'] / 1e6:.1f}M) on {args.device}, selector {args.selector}")
    print(f"  rates by motion            {counts}")
    print(f"  (A) train tokens/s padded  {padded:10.0f}   packed {packed:10.0f}   "
          f"ratio {result['packed_over_padded']:.2f}x  (padding {100 * padding:.0f}% of padded tokens)")
    print(f"  (B) latent frames          MTC {result['latent_frames_mtc']:.2f} vs 4x {t_max}; "
          f"VCPR {result['vcpr_mtc']:.1f} vs {result['vcpr_4x']:.0f}")
    print(f"      sampling s/frame       MTC {result['sample_s_per_frame_mtc']:.5f} vs 4x "
          f"{result['sample_s_per_frame_4x']:.5f}   speed-up {result['speedup_mtc_over_4x']:.2f}x")


if __name__ == "__main__":
    main()
