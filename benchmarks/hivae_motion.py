"""Does the Hi-VAE decoder use the motion latents? Train a ``-debug`` Hi-VAE on synthetic moving-shape
clips (`data.synth`) on CPU, then decode held-out clips with their own motion and with another clip's.

    python benchmarks/hivae_motion.py --output OUT [--base DIR] [--stage1-steps 2400] [--stage2-steps 900]
                                      [--set kl_free_bits=1.0 posterior_init_logvar=-4.0 ...] [--json OUT/result.json]

The defaults are the recipe under which both motion modules learned on CPU: free bits (1 nat per
motion element) and narrow initial posteriors (log-variance -4) on top of the debug twin, 2400
stage-1 + 900 stage-2 steps at LR 3e-3 (about 12 CPU minutes on one core with ``--base``). With
the twin's plain settings (``--set`` with nothing after it) or 600 stage-1 steps the global module
stays collapsed and only the detailed motion carries the direction.

In these clips the first frame (the content latent) fixes shape, color, background and start point;
only the direction (left/right/up/down) and speed must come from the motion latents. Per held-out
clip the decoder samples (``decode``, the config's Euler steps and guidance, seed 0):

- ``own``: its own content + own motion;
- ``swapped``: its own content + the motion of a clip moving in the OPPOSITE direction;
- ``global`` / ``detailed``: own content + only that motion (the other is the null token; paper Fig. 5);
- ``null``: no motion at all (what the decoder guesses from the first frame alone; the start point
  already hints at the direction, as a fast object starts far from the side it moves to).

Each is decoded with every ``--guidance`` weight (default 1 and the paper's 5).

Reported: PSNR against the clip, and the direction that `data.attributes.read_attributes` (no
weights) reads from the decoded video: accuracy vs the clip's own direction, and for ``swapped``
how often it follows the OTHER clip's direction (chance 25 %). Also the posterior diagnostics
(KL per motion element, spread of the posterior means across clips relative to the posterior
std, a nearest-centroid direction probe on the global means) and the velocity loss at fixed noise
levels with own vs swapped motion (deterministic: the loss gap says how much the decoder relies on
the motion, before any sampling). The ceiling is the base VAE's reconstruction (``base`` row).

Base VAE: ``--base DIR`` (a ``save_pretrained`` folder of ``kl2d-f8c4-debug``); without it one is
trained first with ``launch.train_ae.train_autoencoder`` on ``--base-clips`` written clips and saved
under ``OUTPUT/base`` (reused by the next run with the same OUTPUT). CPU time is
``time.process_time`` of this process (run with OMP_NUM_THREADS=1 for one core).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autoencoders.hivae import HiVAE, build_hivae
from data.attributes import read_attributes
from data.synth import CARDINAL, combinations, synth_clip
from ldm import flow
from ldm.latent import Latent
from ldm.metrics import psnr

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def make_clips(num: int, seed: int, frames: int, size: int) -> tuple[Tensor, list[dict[str, Any]]]:
    """``num`` class-balanced synthetic clips ``(N, 3, T, H, W)`` in [-1, 1] and their attributes."""
    combos = combinations(directions=CARDINAL)
    videos, attrs = [], []
    for i in range(num):
        a, clip = synth_clip(seed, i, combos, frames, size, size)  # (T, H, W, 3) uint8
        videos.append(torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1)  # (3, T, H, W)
        attrs.append(a)
    return torch.stack(videos), attrs


def opposite_partner(attrs: list[dict[str, Any]]) -> list[int]:
    """For each clip, the nearest other clip (cyclically) moving in the opposite direction."""
    n = len(attrs)
    out = []
    for i, a in enumerate(attrs):
        want = OPPOSITE[a["direction"]]
        j = next((i + k) % n for k in range(1, n + 1) if attrs[(i + k) % n]["direction"] == want)
        out.append(j)
    return out


def train_base(output: Path, steps: int, clips: int, frames: int, size: int, seed: int) -> Path:
    """A ``kl2d-f8c4-debug`` trained on written synthetic clips (the repo's AE trainer)."""
    from data.synth import synth_dataset
    from launch.train_ae import TrainAEConfig, train_autoencoder

    final = output / "base" / "final"
    if final.exists():
        return final
    synth_dataset(output / "base-videos", num=clips, frames=frames, size=size, fps=8, seed=seed)
    train_autoencoder(TrainAEConfig(data=str(output / "base-videos"), output=str(output / "base"),
                                    autoencoder="kl2d-f8c4-debug", frames=frames, height=size, width=size,
                                    batch_size=8, steps=steps, lr=2e-3, warmup=50, kl_weight=1e-6, num_workers=0,
                                    log_every=50, save_every=steps, sample_every=10 ** 9, progress=False,
                                    latent_stats_clips=32, seed=seed))
    return final


def train_stage(model: HiVAE, videos: Tensor, stage: int, steps: int, batch: int, lr: float,
                generator: torch.Generator, log_every: int = 100) -> list[dict[str, float]]:
    """``steps`` AdamW steps of ``stage`` (linear warm-up over 50 steps, gradient clipping 1)."""
    model.set_stage(stage)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    window: dict[str, list[float]] = {"flow": [], "kl_motion": []}
    curve = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(0, len(videos), (batch,), generator=generator)
        out = model.train_forward(videos[idx], None, generator)
        loss = sum(out.losses.values())  # what the AE trainer minimises
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k in window:
            window[k].append(float(out.losses[k].detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"stage": stage, "step": step + 1, **{k: round(float(np.mean(v)), 4) for k, v in window.items()}}
            curve.append(row)
            print(json.dumps(row), flush=True)
            window = {k: [] for k in window}
    model.eval()
    return curve


@torch.no_grad()
def posterior_stats(model: HiVAE, videos: Tensor, attrs: list[dict[str, Any]], train_videos: Tensor,
                    train_attrs: list[dict[str, Any]]) -> dict[str, Any]:
    """KL per element, spread of the means across clips / mean posterior std, and a nearest-centroid
    direction probe (centroids of the training clips' global means, accuracy on ``videos``)."""
    lat = model.encode(videos)
    out: dict[str, Any] = {}
    for part in ("global", "detailed"):
        mu, logvar = lat[part], lat.logvar[part]
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)
        out[part] = {"kl_per_element": round(float(kl.mean()), 4),
                     "mean_spread_over_std": round(float(mu.std(0).mean() / logvar.mul(0.5).exp().mean()), 3),
                     "posterior_std": round(float(logvar.mul(0.5).exp().mean()), 4)}
    train_mu = model.encode(train_videos)["global"].flatten(1)
    dirs = [a["direction"] for a in train_attrs]
    names = sorted(set(dirs))
    cents = torch.stack([train_mu[[i for i, d in enumerate(dirs) if d == n]].mean(0) for n in names])
    pred = torch.cdist(lat["global"].flatten(1), cents).argmin(1)
    hits = [names[p] == a["direction"] for p, a in zip(pred, attrs)]
    out["global"]["direction_probe"] = round(float(np.mean(hits)), 3)
    return out


@torch.no_grad()
def flow_gap(model: HiVAE, videos: Tensor, partner: list[int], times=(0.5, 0.8, 0.95)) -> dict[str, dict[str, float]]:
    """Velocity MSE on the held-out clips at fixed t with fixed noise: own motion, partner's motion,
    no motion (null). ``motion`` is both after stage 2, global after stage 1."""
    lat = model.encode(videos)
    cond, null = model.motion_condition(lat)
    swap = {**cond, "global": cond["global"][partner], "detailed": cond["detailed"][partner]}
    z = model.base.encode(videos)["z"]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(z.shape, generator=g)
    out = {}
    for t in times:
        tt = torch.full((len(videos),), t)
        x_t = flow.interpolate({"z": z}, {"z": noise}, tt)
        target = noise - z
        row = {}
        for name, c in (("own", cond), ("swapped", swap), ("null", null)):
            row[name] = round(float((model.decoder(x_t, tt, c)["z"] - target).pow(2).mean()), 4)
        out[f"t={t:g}"] = row
    return out


def direction_of(video: Tensor) -> str:
    return read_attributes(video, directions=CARDINAL)["direction"]


@torch.no_grad()
def decode_eval(model: HiVAE, videos: Tensor, attrs: list[dict[str, Any]], partner: list[int],
                steps: int | None, guidance: float | None, batch: int = 16) -> dict[str, dict[str, float]]:
    lat = model.encode(videos)
    swapped = lat.replace({**lat.parts, "global": lat["global"][partner], "detailed": lat["detailed"][partner]})
    own_dir = [a["direction"] for a in attrs]
    other_dir = [own_dir[j] for j in partner]
    runs = {"own": (lat, "both"), "swapped": (swapped, "both"), "global": (lat, "global"),
            "detailed": (lat, "detailed"), "null": (lat, None)}
    if model.config.stage == 1:
        runs = {"own": (lat, "global"), "swapped": (swapped, "global"), "null": (lat, None)}
    if guidance != 1.0:
        runs.pop("null")  # guidance does not change the null decode
    out = {}
    for name, (latent, motion) in runs.items():
        clips = []
        for s in range(0, len(videos), batch):
            part = Latent({k: v[s:s + batch] for k, v in latent.parts.items()}, form="tokens")
            if motion is None:  # no motion: guidance 1 with both motions replaced by the null tokens
                cond, null = model.motion_condition(part, "both")
                clips.append(_sample_null(model, part, null, steps))
            else:
                clips.append(model.decode(part, motion=motion, steps=steps, guidance=guidance))
        rec = torch.cat(clips).clamp(-1, 1)
        read = [direction_of(v) for v in rec]
        row = {"psnr": round(float(psnr(rec, videos).mean()), 2),
               "direction_acc": round(float(np.mean([r == d for r, d in zip(read, own_dir)])), 3)}
        if name == "swapped":
            row["follows_other"] = round(float(np.mean([r == d for r, d in zip(read, other_dir)])), 3)
        out[name] = row
    return out


def _sample_null(model: HiVAE, latent: Latent, null: dict[str, Tensor], steps: int | None) -> Tensor:
    from ldm import samplers

    cfg = model.config
    T, h, w = latent["detailed"].shape[1], latent["content"].shape[3], latent["content"].shape[4]
    noise = samplers.initial_noise({"z": (cfg.base.latent_channels, T, h, w)}, latent.batch_size, seed=0)
    z = samplers.euler(model.decoder, noise, null, steps=steps or cfg.sample_steps, shift=cfg.timestep_shift)["z"]
    return model.base.decode(Latent({"z": z}, form="grid"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the base VAE, the trained Hi-VAE and result.json")
    p.add_argument("--base", default=None, help="a trained kl2d-f8c4-debug save_pretrained folder")
    p.add_argument("--base-steps", type=int, default=1200)
    p.add_argument("--base-clips", type=int, default=512)
    p.add_argument("--autoencoder", default="hivae-s-debug")
    p.add_argument("--set", nargs="*", default=["kl_free_bits=1.0", "posterior_init_logvar=-4.0"],
                   metavar="KEY=VALUE", help="Hi-VAE config overrides (python literals; default: free bits + "
                   "narrow initial posteriors; give --set alone for the registered config)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--eval-clips", type=int, default=32)
    p.add_argument("--stage1-steps", type=int, default=2400)
    p.add_argument("--stage2-steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default: the config's)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0],
                   help="CFG weights to decode with (the paper's is 5; 1 = no guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here (default OUTPUT/result.json)")
    args = p.parse_args(argv)

    import ast
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    base = Path(args.base) if args.base else train_base(out_dir, args.base_steps, args.base_clips, args.frames,
                                                         args.size, args.seed)
    t_base = time.process_time() - t0

    train_v, train_a = make_clips(args.train_clips, args.seed, args.frames, args.size)
    eval_v, eval_a = make_clips(args.eval_clips, args.seed + 1000, args.frames, args.size)
    partner = opposite_partner(eval_a)
    torch.manual_seed(args.seed)
    model = build_hivae(args.autoencoder, base_checkpoint=base, **overrides).eval()
    g = torch.Generator().manual_seed(args.seed)
    result: dict[str, Any] = {"args": vars(args), "overrides": overrides, "base_cpu_s": round(t_base, 1)}
    with torch.no_grad():
        rec = model.base.decode(model.base.encode(eval_v)).clamp(-1, 1)
    result["base"] = {"psnr": round(float(psnr(rec, eval_v).mean()), 2),
                      "direction_acc": round(float(np.mean([direction_of(v) == a["direction"]
                                                            for v, a in zip(rec, eval_a)])), 3)}
    result["first_frame_repeat_psnr"] = round(float(psnr(eval_v[:, :, :1].expand_as(eval_v), eval_v).mean()), 2)
    print(json.dumps({k: result[k] for k in ("base", "first_frame_repeat_psnr")}), flush=True)
    result["curve"] = []
    for stage, steps in ((1, args.stage1_steps), (2, args.stage2_steps)):
        if steps == 0:
            continue
        t1 = time.process_time()
        result["curve"] += train_stage(model, train_v, stage, steps, args.batch, args.lr, g)
        result[f"stage{stage}_cpu_s"] = round(time.process_time() - t1, 1)
        result[f"stage{stage}"] = {"posterior": posterior_stats(model, eval_v, eval_a, train_v, train_a),
                                   "flow_gap": flow_gap(model, eval_v, partner)}
        print(json.dumps({f"stage{stage}": result[f"stage{stage}"]}), flush=True)
    t1 = time.process_time()
    result["decode"] = {f"cfg{w:g}": decode_eval(model, eval_v, eval_a, partner, args.sample_steps, w)
                        for w in args.guidance}
    result["decode_cpu_s"] = round(time.process_time() - t1, 1)
    result["total_cpu_s"] = round(time.process_time() - t0, 1)
    print(json.dumps({"decode": result["decode"], "total_cpu_s": result["total_cpu_s"]}), flush=True)
    model.save_pretrained(out_dir / "hivae", name=args.autoencoder)
    path = Path(args.json) if args.json else out_dir / "result.json"
    path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
