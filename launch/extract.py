"""``ldm extract``: encode videos into WebDataset latent shards with any registered autoencoder.

    ldm extract --autoencoder NAME [--checkpoint DIR] --input PATH --output DIR
                [--frames T] [--height H] [--width W] [--fps F] [--shard-size N] [--verify K]
    torchrun --nproc_per_node 2 -m launch.cli extract ...      # same command, several ranks / nodes

The sorted input list is cut into shards of ``--shard-size`` clips; shard j goes to rank
j mod world_size. Each shard is written under a temporary name and renamed when complete, then its
sidecar JSON (counts, skipped inputs with reasons, channel statistics) marks it done, so a rerun
with the same arguments skips finished shards (with any number of ranks). Rank 0 merges the
sidecars into ``manifest.json``.

A text-guided autoencoder (``text_dim > 0``, e.g. ``cmvae-*-text``) encodes each clip with its
caption's embedding from ``--text-encoder`` (the same embedding is cached in the shard).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from autoencoders import Autoencoder, build, load_pretrained
from data import shards
from data.sources import VideoClipDataset, list_items
from data.video import VideoError, read_video
from launch import dist
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_json, dir_hash, read_json
from ldm.latent import Cond
from ldm.metrics import psnr

log = logging.getLogger("ldm.extract")


@dataclass(frozen=True)
class ExtractConfig:
    autoencoder: str | None
    input: str
    output: str
    checkpoint: str | None = None
    ae_path: str | None = None  # local diffusers folder, for --autoencoder diffusers:<Class>
    ae_subfolder: str | None = None
    captions: str | None = None
    frames: int = 17
    height: int = 64
    width: int = 64
    fps: float | None = None
    shard_size: int = 64
    batch_size: int = 4
    num_workers: int = 0
    text_encoder: str | None = None
    verify: int = 0
    device: str = "auto"
    seed: int = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", help="registered name (see `ldm list`); optional with --checkpoint")
    p.add_argument("--checkpoint", help="folder written by save_pretrained / `ldm train-ae` (OUTPUT/final)")
    p.add_argument("--ae-path", help="local diffusers model folder, with --autoencoder diffusers:<Class>")
    p.add_argument("--ae-subfolder", help="subfolder of --ae-path holding the VAE (e.g. vae)")
    p.add_argument("--input", required=True, help="folder of videos, a raw video .tar, a folder of tars or a brace pattern")
    p.add_argument("--captions", help="CSV/JSONL with path,caption,class_id (default: metadata.jsonl in the folder)")
    p.add_argument("--output", required=True, help="output folder for shards + manifest.json")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: native)")
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard")
    p.add_argument("--batch-size", type=int, default=4, help="clips per encoder call")
    p.add_argument("--num-workers", type=int, default=0, help="video decoding workers per rank")
    p.add_argument("--text-encoder", help="cache caption embeddings: builtin | t5:DIR | clip:DIR")
    p.add_argument("--verify", type=int, default=0, metavar="K", help="decode K random latents, report PSNR vs source")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    fields = {f for f in ExtractConfig.__dataclass_fields__}
    cfg = cfglib.from_dict(ExtractConfig, {k: v for k, v in vars(args).items() if k in fields})
    summary = extract(cfg)
    if dist.is_main():
        print(json.dumps({k: summary[k] for k in ("written", "skipped", "shards", "clips_per_s", "verify_psnr")}))
    return 0


def _load_autoencoder(cfg: ExtractConfig) -> tuple[Autoencoder, str, str | None]:
    if cfg.checkpoint:
        ae = load_pretrained(cfg.checkpoint)
        meta = read_json(Path(cfg.checkpoint) / "config.json")
        name = meta.get("name") or cfg.autoencoder or ae.family
        if cfg.autoencoder and meta.get("name") and cfg.autoencoder != meta["name"]:
            raise ValueError(f"--autoencoder {cfg.autoencoder} but the checkpoint holds {meta['name']}")
        return ae, name, dir_hash(cfg.checkpoint)
    if not cfg.autoencoder:
        raise ValueError("give --autoencoder NAME or --checkpoint DIR")
    if cfg.autoencoder.startswith("diffusers:"):
        if not cfg.ae_path:
            raise ValueError(f"--autoencoder {cfg.autoencoder} needs --ae-path (a local diffusers folder)")
        folder = Path(cfg.ae_path) / (cfg.ae_subfolder or "")
        return build(cfg.autoencoder, path=cfg.ae_path, subfolder=cfg.ae_subfolder), cfg.autoencoder, dir_hash(folder)
    warnings.warn(f"no --checkpoint: {cfg.autoencoder} has RANDOM weights (fine for pipeline and cost checks, "
                  "not for training a real denoiser)", stacklevel=2)
    torch.manual_seed(cfg.seed)
    return build(cfg.autoencoder), cfg.autoencoder, None


class _Clips(torch.utils.data.Dataset):
    """Decoded clips or the reason they could not be decoded (so workers never kill the run)."""

    def __init__(self, clips: VideoClipDataset, indices: list[int]):
        self.clips, self.indices = clips, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = self.indices[i]
        try:
            return {"index": idx, **self.clips[idx]}
        except VideoError as e:
            return {"index": idx, "error": str(e)}


def _first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def check_text_encoder(ae: Autoencoder, name: str, text_encoder, spec: str | None) -> None:
    """A text-guided autoencoder (``ae.text_dim > 0``) needs a text encoder of its width."""
    need = ae.text_dim
    if need and text_encoder is None:
        raise ValueError(f"{name} is text-guided (text_dim={need}) and encodes with the caption: pass "
                         "--text-encoder (the one it was trained with)")
    if need and text_encoder.dim != need:
        raise ValueError(f"--text-encoder {spec} gives {text_encoder.dim}-d embeddings, {name} takes {need}-d")


def _ae_cond(ae: Autoencoder, emb: torch.Tensor | None, mask: torch.Tensor | None,
             device: torch.device) -> Cond | None:
    """``cond`` for encode/decode: the caption embeddings for a text-guided autoencoder, else None."""
    if not ae.text_dim:
        return None
    return Cond(text=emb.to(device), text_mask=mask.to(device))


def _run_signature(cfg: ExtractConfig, name: str, ae: Autoencoder, ckpt_hash: str | None) -> dict[str, Any]:
    return {"autoencoder": name, "config_hash": cfglib.config_hash(ae.config), "checkpoint_hash": ckpt_hash,
            "video": {"frames": cfg.frames, "height": cfg.height, "width": cfg.width, "fps": cfg.fps},
            "text_encoder": cfg.text_encoder, "shard_size": cfg.shard_size}


def extract(cfg: ExtractConfig) -> dict[str, Any]:
    env = dist.init_distributed()
    device = dist.device_for(env, cfg.device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)

    ae, name, ckpt_hash = _load_autoencoder(cfg)
    ae.check_input(cfg.frames, cfg.height, cfg.width)  # clear error before any work
    ae = ae.to(device).eval()
    spec = ae.latent_spec(cfg.frames, cfg.height, cfg.width)
    text_encoder = None
    if cfg.text_encoder:
        from ldm.text import build_text_encoder
        text_encoder = build_text_encoder(cfg.text_encoder).to(device)
    check_text_encoder(ae, name, text_encoder, cfg.text_encoder)

    items = list_items(cfg.input, cfg.captions)
    if not items:
        raise ValueError(f"no videos found in {cfg.input}")
    clips = VideoClipDataset(items, cfg.frames, cfg.height, cfg.width, cfg.fps)
    n_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    mine = dist.shard_list(list(range(n_shards)), env.rank, env.world_size)
    signature = _run_signature(cfg, name, ae, ckpt_hash)

    todo = []
    for j in mine:  # temp files a killed run left for this rank's shards
        for stale in out.glob(f".shard-{j:06d}.*tmp"):
            stale.unlink(missing_ok=True)
        sidecar = out / f"shard-{j:06d}.json"
        keys = [it.key for it in items[j * cfg.shard_size:(j + 1) * cfg.shard_size]]
        if sidecar.exists():
            done = read_json(sidecar)
            if done["signature"] != signature or done["keys"] != keys:
                raise RuntimeError(f"{out} holds shards of a different extraction ({sidecar.name} differs in "
                                   "autoencoder/checkpoint/video spec/inputs); use a new --output folder")
            tar_ok = done["written"] == 0 or (out / shards.SHARD_NAME.format(j)).exists()
            if tar_ok:
                continue
        todo.append(j)

    n_clips = sum(len(items[j * cfg.shard_size:(j + 1) * cfg.shard_size]) for j in todo)
    bar = tqdm(total=n_clips, desc=f"extract r{env.rank}", unit="clip", disable=not dist.is_main())
    t0, encoded = time.perf_counter(), 0
    for j in todo:
        encoded += _extract_shard(j, cfg, items, clips, ae, text_encoder, spec, signature, out, device, bar)
    elapsed = time.perf_counter() - t0
    bar.close()

    dist.barrier()
    summary: dict[str, Any] = {"clips_per_s": encoded / elapsed if elapsed > 0 else 0.0, "verify_psnr": None}
    if dist.is_main():
        manifest = _merge_manifest(out, n_shards, signature, ae, spec, env.world_size, items,
                                   text_encoder.dim if text_encoder is not None else None, cfg)
        summary.update(written=manifest["counts"]["written"], skipped=manifest["counts"]["skipped"],
                       shards=len(manifest["shards"]))
        if cfg.verify > 0 and manifest["counts"]["written"] > 0:
            summary["verify_psnr"] = verify(out, ae, cfg, items, device, text_encoder)
            manifest["verify"] = {"k": cfg.verify, "psnr": summary["verify_psnr"]}
            atomic_write_json(out / shards.MANIFEST, manifest)
        print(f"extracted {encoded} clips in {elapsed:.1f}s on rank 0 ({summary['clips_per_s']:.2f} clips/s/rank); "
              f"{summary['written']} written, {summary['skipped']} skipped, {summary['shards']} shards -> {out}")
    dist.barrier()
    return summary


@torch.no_grad()
def _extract_shard(j: int, cfg: ExtractConfig, items: list, clips: VideoClipDataset, ae: Autoencoder,
                   text_encoder, spec, signature: dict, out: Path, device: torch.device, bar: tqdm) -> int:
    lo, hi = j * cfg.shard_size, min((j + 1) * cfg.shard_size, len(items))
    loader = torch.utils.data.DataLoader(_Clips(clips, list(range(lo, hi))), batch_size=1,
                                         num_workers=cfg.num_workers, collate_fn=_first)
    stats = shards.ChannelStats()
    samples, keys, skipped, text_tokens = [], [], [], 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal text_tokens
        if not pending:
            return
        video = torch.stack([p["video"] for p in pending]).to(device)  # (B, C, T, H, W)
        text, emb, mask = None, None, None
        if text_encoder is not None:
            emb, mask = text_encoder.encode([p["caption"] for p in pending])
            text = [e[m].cpu() for e, m in zip(emb, mask)]  # valid tokens only, (L_i, D)
            text_tokens += int(mask.sum())
        latent = ae.encode(video, _ae_cond(ae, emb, mask, device)).to("cpu", torch.float32)
        stats.update(latent)
        for b, (p, lat) in enumerate(zip(pending, latent.unbatch())):
            item = items[p["index"]]
            meta = {"index": p["index"], "key": item.key, "caption": p["caption"] or None,
                    "class_id": None if p["class_id"] < 0 else p["class_id"], "fps": cfg.fps,
                    "frames": cfg.frames, "height": cfg.height, "width": cfg.width,
                    "autoencoder": signature["autoencoder"]}
            samples.append(shards.encode_sample(lat, meta, None if text is None else text[b]))
            keys.append(f"{p['index']:09d}")
        pending.clear()

    for clip in loader:
        bar.update(1)
        if "error" in clip:
            skipped.append({"key": items[clip["index"]].key, "reason": clip["error"]})
            log.warning("skipping %s: %s", items[clip["index"]].key, clip["error"])
            continue
        pending.append(clip)
        if len(pending) >= cfg.batch_size:
            flush()
        bar.set_postfix(clips_per_s=f"{bar.format_dict['rate'] or 0:.2f}")
    flush()

    if samples:
        shards.write_shard(out / shards.SHARD_NAME.format(j), samples, keys)
    atomic_write_json(out / f"shard-{j:06d}.json", {
        "signature": signature, "keys": [it.key for it in items[lo:hi]], "written": len(samples),
        "skipped": skipped, "stats": stats.to_json(), "text_tokens": text_tokens})
    return len(samples) + len(skipped)


def _merge_manifest(out: Path, n_shards: int, signature: dict, ae: Autoencoder, spec, world_size: int,
                    items: list, text_dim: int | None, cfg: ExtractConfig) -> dict[str, Any]:
    stats, skipped, shard_list, written, text_tokens = shards.ChannelStats(), [], [], 0, 0
    for j in range(n_shards):
        side = read_json(out / f"shard-{j:06d}.json")
        stats.merge(shards.ChannelStats.from_json(side["stats"]))
        skipped.extend(side["skipped"])
        written += side["written"]
        text_tokens += side["text_tokens"]
        if side["written"]:
            shard_list.append({"name": shards.SHARD_NAME.format(j), "count": side["written"]})
    manifest = {
        **signature, "family": ae.family, "config": cfglib.to_dict(ae.config),
        # where the weights were (runtime provenance; the hash above is what identifies them) and the
        # seed that drew random weights when no checkpoint was given
        "checkpoint": str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None, "seed": cfg.seed,
        "ae_path": str(Path(cfg.ae_path).resolve()) if cfg.ae_path else None, "ae_subfolder": cfg.ae_subfolder,
        "latent_spec": spec.to_dict(), "form": spec.form,
        "counts": {"inputs": len(items), "written": written, "skipped": len(skipped)},
        "stats": stats.summary(), "skipped": skipped, "shards": shard_list,
        "text_dim": text_dim, "text_tokens": round(text_tokens / written) if written else 0,
        "world_size": world_size,
        "num_classes": max((it.class_id for it in items if it.class_id is not None), default=-1) + 1,
        "input_problems": list(getattr(items, "problems", [])),
    }
    atomic_write_json(out / shards.MANIFEST, manifest)
    return manifest


@torch.no_grad()
def verify(out: Path, ae: Autoencoder, cfg: ExtractConfig, items: list, device: torch.device,
           text_encoder=None) -> float:
    """Decode K random stored latents and compare with the re-decoded source clips (mean PSNR, dB).
    A text-guided autoencoder decodes with the caption's embedding."""
    samples = shards.read_all(out)
    rng = random.Random(cfg.seed)
    chosen = rng.sample(samples, min(cfg.verify, len(samples)))
    values = []
    for s in chosen:
        item = items[s["meta"]["index"]]
        video = read_video(item.load_bytes(), cfg.frames, cfg.height, cfg.width, cfg.fps)[None].to(device)
        cond = None
        if ae.text_dim:
            emb, mask = text_encoder.encode([s["cond"]["caption"]])
            cond = _ae_cond(ae, emb, mask, device)
        recon = ae.decode(s["latent"].to(device), cond).clamp(-1, 1)
        values.append(float(psnr(recon.cpu(), video.cpu())[0]))
    mean = sum(values) / len(values)
    print(f"verify: decoded {len(values)} latents, PSNR vs source {mean:.2f} dB")
    return mean

