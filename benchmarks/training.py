"""Training throughput from latent shards vs encoding the same clips on the fly, in one run.

    python benchmarks/training.py [--clips 32] [--frames 9] [--size 64] [--autoencoder kl2d-f8c4-debug]
                                  [--dit dit-debug] [--steps 20] [--batch-size 8]

Both paths run the same DiT step (rectified-flow loss, backward, AdamW) on the same clips; only
where the latents come from differs: (A) `LatentShards` (what `ldm train` does) or (B) decode the
MP4 + `autoencoder.encode` + text encoder every step. Prints samples/s of each and the ratio A/B,
and the shard reader's samples/s alone vs what the trainer consumes (reader / trainer > 1 means
the reader keeps up).
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import autoencoders
import dit
from data.manifest import load_manifest
from data.shards import LatentShards, collate
from data.sources import VideoClipDataset, list_items
from data.synth import synth_dataset
from launch.extract import ExtractConfig, extract
from launch.train_config import FlowConfig
from launch.train_flow import flow_draws, flow_step_loss, sample_generators
from ldm.latent import Cond, normalize
from ldm.text import build_text_encoder


def timed_steps(batches, model, opt, norm, steps: int) -> float:
    """samples/s over ``steps`` training steps (after one warm-up step) fed by ``batches``."""
    fcfg = FlowConfig()
    n, t0 = 0, None
    for i, (latent, cond) in enumerate(itertools.islice(batches, steps + 1)):
        if i == 1:
            t0 = time.perf_counter()
        gens = sample_generators(0, list(range(i * latent.batch_size, (i + 1) * latent.batch_size)))
        latent = normalize(latent, norm)
        loss = flow_step_loss(model, latent, cond, fcfg, flow_draws(latent, fcfg, gens), model.null_cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += latent.batch_size if i >= 1 else 0
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--autoencoder", default="kl2d-f8c4-debug")
    p.add_argument("--dit", default="dit-debug")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(tmp)
        synth_dataset(tmp / "videos", num=args.clips, frames=args.frames, size=args.size, fps=8, seed=0)
        extract(ExtractConfig(autoencoder=args.autoencoder, input=str(tmp / "videos"), output=str(tmp / "lat"),
                              frames=args.frames, height=args.size, width=args.size, shard_size=16, batch_size=8,
                              text_encoder="builtin"))
        manifest = load_manifest(tmp / "lat")
        parts = manifest.parts
        norm = {k: {"mean": s["mean"], "std": s["std"]} for k, s in manifest.stats.items()}
        torch.manual_seed(0)
        ae = autoencoders.build(args.autoencoder).eval()  # same seed as extraction's random weights
        text = build_text_encoder("builtin")

        def new_model():
            torch.manual_seed(0)
            model = dit.build(args.dit, parts, num_classes=manifest.num_classes, text_dim=text.dim)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

        def from_shards():
            loader = torch.utils.data.DataLoader(LatentShards(str(tmp / "lat"), epochs=None, shuffle=32),
                                                 batch_size=args.batch_size, collate_fn=collate)
            for b in loader:
                c = b["cond"]
                yield b["latent"], Cond(text=c["text_emb"], text_mask=c["text_mask"], class_id=c["class_id"])

        def on_the_fly():
            clips = VideoClipDataset(list_items(tmp / "videos"), args.frames, args.size, args.size)
            loader = torch.utils.data.DataLoader(clips, batch_size=args.batch_size, shuffle=True)
            while True:
                for b in loader:
                    with torch.no_grad():
                        latent = ae.encode(b["video"])
                        emb, mask = text.encode(list(b["caption"]))
                    # keep the same text length as the shards' padded embeddings would have
                    n = int(mask.sum(1).max())
                    yield latent, Cond(text=emb[:, :n], text_mask=mask[:, :n], class_id=b["class_id"])

        # alternate the two paths and keep each one's best round, so a busy machine biases neither
        shard_rate = fly_rate = 0.0
        for _ in range(2):
            shard_rate = max(shard_rate, timed_steps(from_shards(), *new_model(), norm, args.steps))
            fly_rate = max(fly_rate, timed_steps(on_the_fly(), *new_model(), norm, args.steps))
        reader = LatentShards(str(tmp / "lat"), epochs=3)
        t0 = time.perf_counter()
        n_read = sum(b["latent"].batch_size for b in torch.utils.data.DataLoader(
            reader, batch_size=args.batch_size, collate_fn=collate))
        read_rate = n_read / (time.perf_counter() - t0)
    result = {"autoencoder": args.autoencoder, "dit": args.dit, "batch_size": args.batch_size,
              "train_samples_per_s_shards": shard_rate, "train_samples_per_s_on_the_fly": fly_rate,
              "shards_over_on_the_fly": shard_rate / fly_rate, "reader_samples_per_s": read_rate,
              "reader_over_trainer": read_rate / shard_rate}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.autoencoder} -> {args.dit}, batch {args.batch_size}, {args.frames}x{args.size}x{args.size} clips, "
          f"threads {torch.get_num_threads()}")
    print(f"  training from shards      {shard_rate:8.1f} samples/s")
    print(f"  training, encode on fly   {fly_rate:8.1f} samples/s")
    print(f"  ratio shards / on-the-fly {result['shards_over_on_the_fly']:8.2f}x")
    print(f"  shard reader alone        {read_rate:8.1f} samples/s  ({result['reader_over_trainer']:.1f}x the trainer's consumption)")


if __name__ == "__main__":
    main()
