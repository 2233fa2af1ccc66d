"""``ldm train-ae``: train any registered autoencoder on videos.

The loop reads top to bottom: batch -> ``train_forward`` -> `AELoss` -> backward -> clip -> AdamW
step -> (discriminator step) -> log -> sample grid -> checkpoint. One process, or ``torchrun`` /
``srun`` with DistributedDataParallel (gloo on CPU, nccl on GPU).

Outputs under ``--output``::

    log.jsonl                       one line per logged step (loss terms, lr, grad norm, clips/s, bucket),
                                    one per validation (val.data: held-out PSNR / SSIM / LPIPS, `validate`)
    tensorboard/                    the same numbers, tags train/KEY and val/KEY (as ldm train's)
    samples/step-00000100.png       originals (odd rows) vs reconstructions (even rows), a few frames
    checkpoints/step-00000100/      model.safetensors + config.json (loadable by load_pretrained),
                                    optimizer.safetensors + optimizer.json, [discriminator.*,
                                    disc_optimizer.*], rng.safetensors, trainer.json, MANIFEST.json
    checkpoints/latest              name of the newest complete checkpoint (written last)
    final/                          Autoencoder.save_pretrained (what extract/reconstruct take)
    summary.json

Settings: ``--config FILE.yaml`` (``TrainAEConfig`` keys; the papers' recipes in
``launch/configs/recipes/``), then the flags (shorthands of the same keys), then dotted
``KEY=VALUE`` overrides -- the config system of ``ldm train``. ``--print-config`` prints the
resolved settings as YAML and exits (nothing is read or written).

The learning rate is a pure function of the step (``runs.lr_at``, as in ``ldm train``): linear
warm-up, then ``--lr`` constant or (``--schedule cosine``) decaying to ``min_lr_ratio`` x LR at
``--steps``, and from each ``--lr-drop STEP:LR`` on, that LR as the base (H3AE: 1e-4, 1e-5 for the
last 10K of 80K iterations; Hi-VAE: 5K warm-up, then cosine). AdamW with ``betas`` /
``weight_decay``; the discriminator's with ``disc_betas`` (VideoVAE+: (0.5, 0.9)).

Staged autoencoders (``Autoencoder.stages``: Hi-VAE, MTC-VAE) train stage by stage from the CLI:
``--stage 1`` from the registered name with its trained base ``--base-checkpoint BASE_RUN/final``
(``load_base``: Hi-VAE's frozen kl2d, MTC-VAE's causal3d), then ``--init STAGE1_RUN/final --stage
2`` into a new ``--output`` (never back: ``--init`` at an earlier stage than the folder's is refused);
a resumed run keeps its checkpoint's stage.
Models whose steps leave some parameters unused declare ``ddp_find_unused_parameters = True``.

Text-guided autoencoders (``--text-encoder``) get each clip's caption embedding in ``cond``; joint
image-video training (``--image-ratio``) trains a share of the steps on the batch's frames as
single images (T = 1). Shape buckets (``buckets``, `data.buckets`) give each step a clip length and
size drawn by ``(seed, step)`` and weight its GAN terms by the bucket's ``disc_weight``.

Checkpoints are written, verified and rotated by ``launch.runs`` (shared with ``ldm train``): a
half-written or corrupt checkpoint is skipped (with its reason) in favour of the previous one.
Resuming restores weights, optimizer moments, every RNG stream and each rank's data position: on
CPU with a fixed seed the loss sequence equals that of an uninterrupted run. On another number of
ranks it needs the same global batch (``--batch-size`` x ranks) or an allowed ``batch_size``
change, and goes on from the clips every rank had read (``carried_position``).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from autoencoders import FAMILIES, REGISTRY, Autoencoder, build, resolve
from autoencoders.base import saved_config
from autoencoders.losses import REC_LOSSES, AELoss, AELossConfig
from autoencoders.resolve import check_saved_name
from data.buckets import BucketSchedule
from data.sources import VideoClipDataset, list_items
from data.video import VideoError, video_to_uint8
from launch import dist, runs
from launch.cli import config_flag
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_bytes, atomic_write_json, dir_hash, load_tensors, read_json
from ldm.errors import MissingInput, UserError, check_min, checking
from ldm.latent import Cond
from ldm.metrics import LPIPS, reconstruction_scores

log = logging.getLogger("ldm.train_ae")

# files every train-ae checkpoint holds (runs.verify_checkpoint)
REQUIRED_FILES = ("model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                  "trainer.json")
# settings that may change when a run is resumed; every other TrainAEConfig key binds the run
# folder (runs.check_binding). ``stage`` is checked against the checkpoint's (AETrainer._resume_stage).
HARMLESS = ("output", "log_every", "save_every", "sample_every", "keep", "num_workers", "resume", "device",
            "progress", "max_nonfinite", "latent_stats_clips", "stage", "profile", "val")


@dataclass(frozen=True)
class ValConfig:
    """Held-out reconstruction metrics over training (``ldm train``'s ``val`` for the DiT's loss)."""

    data: str = ""  # held-out videos (a folder or raw video shards, as --data); "" = no validation
    split: str = ""  # a list of the videos of val.data to take (UCF-101 testlist01.txt), as --split
    every: int = 0  # steps between validations; 0 = at every checkpoint (save_every) and the last step
    clips: int = 16  # its first clips (in list order), read once at frames x height x width


@dataclass(frozen=True)
class TrainAEConfig:
    """Everything one ``ldm train-ae`` run needs (the YAML keys; the CLI flags are shorthands)."""

    data: str
    output: str
    captions: str | None = None  # CSV/JSONL with path,caption (as `ldm extract --captions`); default: metadata.jsonl
    split: str | None = None  # a list of the videos of `data` to train on (UCF-101 trainlist01.txt), as extract's
    autoencoder: str | None = None  # registry name; optional when --init names a saved model
    init: str | None = None  # folder written by save_pretrained to start from
    stage: int | None = None  # training stage of a staged autoencoder (Autoencoder.stages); None: the model's own
    base_checkpoint: str | None = None  # save_pretrained folder of the base it starts from (Autoencoder.load_base)
    ae_config: tuple[str, ...] = ()  # KEY=VALUE overrides of the registered config (with init: of the saved one, same weight shapes)
    frames: int = 17
    height: int = 256
    width: int = 256
    fps: float | None = None
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0  # linear LR warm-up steps (the LR is a function of the step: nothing to save)
    schedule: str = "constant"  # after warm-up: constant | cosine (to min_lr_ratio x lr at `steps`; runs.lr_factor)
    min_lr_ratio: float = 0.1  # cosine: the final LR as a fraction of the base LR
    lr_drop: tuple[tuple[int, float], ...] = ()  # (step, lr): from that step on the base LR is lr (runs.lr_at)
    steps: int = 1000
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    loss: str = "l1"
    kl_weight: float = 1e-6
    lpips_vgg: str | None = None
    lpips_heads: str | None = None
    lpips_weight: float = 1.0
    dwt_weight: float = 0.0  # L1 on 3D Haar wavelet coefficients (H3AE Tab. 5's DWT loss; autoencoders.losses)
    gan: bool = False
    gan_weight: float = 0.5
    disc_kind: str = "2d"
    disc_start: int = 0
    disc_betas: tuple[float, float] | None = None  # the discriminator's AdamW betas; None: `betas`
    text_encoder: str | None = None  # builtin | t5:DIR | clip:DIR: caption embeddings for text-guided AEs
    image_ratio: float = 0.0  # fraction of steps that train on the batch's frames as images (joint training)
    # shape buckets (data.buckets): [frames, height, width, probability, disc_weight] each; a step draws
    # one, its clips are read at that shape, its GAN weight is x disc_weight. () = frames x height x width
    buckets: tuple[tuple[int | float, ...], ...] = ()
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 500
    keep: int = 3  # checkpoints kept, >= 1 as ldm train's keep_checkpoints (1: no fallback, see add_arguments)
    num_workers: int = 2
    seed: int = 0
    resume: str = "auto"  # auto | no | a checkpoint folder
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast; CUDA only)
    latent_stats_clips: int = 32  # clips used to set latent_scale/shift of the final model; 0 keeps them
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    progress: bool = True
    profile: runs.ProfileConfig = field(default_factory=runs.ProfileConfig)  # torch.profiler window -> OUTPUT/profile
    val: ValConfig = field(default_factory=ValConfig)  # PSNR / SSIM (/ LPIPS) on held-out clips, in log.jsonl

    def __post_init__(self) -> None:
        if self.autoencoder is None and self.init is None:
            raise ValueError("give --autoencoder NAME or --init DIR (or both)")
        if self.autoencoder is not None and self.autoencoder not in REGISTRY:
            if self.autoencoder in FAMILIES and self.init is None:
                raise ValueError(f"autoencoder {self.autoencoder!r} is a family: with --init it checks the folder's "
                                 "family; without, give a registered name (see `ldm list`)")
            if self.autoencoder not in FAMILIES:
                raise ValueError(f"unknown autoencoder {self.autoencoder!r}; registered: {sorted(REGISTRY)}")
        positive = ("frames", "height", "width", "batch_size", "steps", "log_every", "save_every", "sample_every",
                    "max_nonfinite")
        check_min({name: getattr(self, name) for name in positive}, 1)
        check_min({"warmup": self.warmup, "num_workers": self.num_workers, "disc_start": self.disc_start,
                   "latent_stats_clips": self.latent_stats_clips, "profile.start": self.profile.start,
                   "profile.steps": self.profile.steps, "val.every": self.val.every}, 0)
        check_min({"val.clips": self.val.clips, "keep": self.keep}, 1)
        if self.schedule not in runs.SCHEDULES:
            raise ValueError(f"schedule must be one of {runs.SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("betas", "disc_betas"):
            betas = getattr(self, name)
            if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
                raise ValueError(f"{name} must be two numbers in [0, 1), got {betas}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, max_grad_norm >= 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.max_grad_norm}")
        drops = [tuple(d) for d in self.lr_drop]
        if any(len(d) != 2 for d in drops):
            raise ValueError(f"lr_drop entries must be (step, lr) pairs, got {self.lr_drop}")
        steps_at = [int(at) for at, _ in drops]
        if any(at < 1 for at in steps_at) or steps_at != sorted(set(steps_at)):
            raise ValueError(f"lr_drop steps must be >= 1 and strictly increasing, got {steps_at}")
        if not all(float(v) > 0 for _, v in drops):
            raise ValueError(f"lr_drop learning rates must be > 0, got {[v for _, v in drops]}")
        object.__setattr__(self, "lr_drop", tuple((int(at), float(v)) for at, v in drops))  # JSON lists -> pairs
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"stage must be >= 0, got {self.stage}")
        if not 0.0 <= self.image_ratio <= 1.0:
            raise ValueError(f"image_ratio must be in [0, 1], got {self.image_ratio}")
        if self.buckets:
            object.__setattr__(self, "buckets", tuple(tuple(b) for b in self.buckets))  # JSON lists -> tuples
            self.bucket_schedule()  # validates every entry
            if self.image_ratio > 0:
                raise ValueError("give images as a 1-frame bucket (e.g. [1, 256, 256, 0.2, 1.0]) rather than "
                                 "image_ratio together with buckets")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.loss not in REC_LOSSES:
            raise ValueError(f"loss must be one of {REC_LOSSES}, got {self.loss!r}")
        if (self.lpips_vgg is None) != (self.lpips_heads is None):
            raise ValueError("LPIPS needs both --lpips-vgg (backbone) and --lpips-heads (linear heads)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self.loss_config()  # the loss weights and disc settings, checked by AELossConfig before any work

    def learning_rate(self, step: int) -> float:
        """LR of the update with 0-based index ``step`` (``runs.lr_at``, the schedule of ``ldm train``
        too): warm-up, then constant or cosine, times the piecewise ``lr_drop`` base LR."""
        return runs.lr_at(step, self.lr, self.lr_drop, warmup=self.warmup, schedule=self.schedule,
                          total_steps=self.steps, min_lr_ratio=self.min_lr_ratio)

    def loss_config(self, disc_weight: float = 1.0) -> AELossConfig:
        """The autoencoder loss; ``disc_weight`` (a bucket's) multiplies the GAN weight."""
        return AELossConfig(rec=self.loss, kl_weight=self.kl_weight,
                            lpips_weight=self.lpips_weight if self.lpips_vgg else 0.0, dwt_weight=self.dwt_weight,
                            gan_weight=self.gan_weight * disc_weight if self.gan else 0.0, disc_kind=self.disc_kind,
                            disc_start=self.disc_start)

    def bucket_schedule(self) -> BucketSchedule:
        """The clip shape of each step: ``buckets``, or ``frames x height x width`` on every step."""
        if self.buckets:
            return BucketSchedule.from_spec(self.buckets, self.seed)
        return BucketSchedule.single(self.frames, self.height, self.width, self.seed)


# ------------------------------------------------------------------------------------------
# Data: an endless, resumable stream of batches for this rank
# ------------------------------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of epoch ``epoch``: a seeded permutation of ``range(n)``, split
    round-robin over ranks, cut into full batches (a rank's last partial batch is dropped)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    mine = dist.shard_list(torch.randperm(n, generator=g).tolist(), rank, world)
    return [mine[i:i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


def carried_position(positions: list[tuple[int, int]], old_global: int, new_global: int) -> tuple[int, int]:
    """The ``(epoch, batch)`` every rank of another topology resumes from, given each saved rank's
    ``(epoch, next batch)`` and the global batches (clips per step over all ranks) before and now.
    Ranks split an epoch's permutation round-robin (`epoch_batches`), so ``b`` batches on every
    rank are its first ``b x old_global`` clips: the new ranks start at the batch that holds the
    next one (the least advanced rank counts; a clip may be read twice, none is passed over)."""
    epoch, batch = min(positions)
    return epoch, batch * old_global // new_global


Shape = tuple[int, int, int]  # (frames, height, width) of a batch's clips


class _PositionSampler:
    """Batch sampler over epochs from a saved position ``(epoch, batch)``. Every index it yields
    is ``(clip index, epoch, batch, shape)`` so the consumer knows the position of each batch even
    though DataLoader workers prefetch ahead; ``shape`` is the bucket of the step the batch is
    meant for (``schedule.at(next_step)``; the trainer moves ``next_step`` back when it drops a
    batch of unreadable clips)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, epoch: int, batch: int,
                 schedule: BucketSchedule, step: int):
        self.args = (n, batch_size, seed, rank, world)
        self.epoch, self.batch = epoch, batch
        self.schedule, self.next_step = schedule, step

    def __iter__(self) -> Iterator[list[tuple[int, int, int, Shape]]]:
        n, bs, seed, rank, world = self.args
        epoch, start = self.epoch, self.batch
        while True:
            batches = epoch_batches(n, bs, epoch, seed, rank, world)
            for b in range(start, len(batches)):
                shape = self.schedule.at(self.next_step).shape
                self.next_step += 1
                yield [(i, epoch, b, shape) for i in batches[b]]
            epoch, start = epoch + 1, 0


class _SkipBad(Dataset):
    """Wraps VideoClipDataset: reads clip ``i`` at the index's shape; a clip that raises VideoError
    becomes an error record (its key and reason) instead of killing the loader."""

    def __init__(self, dataset: VideoClipDataset, keys: list[str]):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: tuple[int, int, int, Shape]) -> dict[str, Any]:
        i, epoch, batch, shape = index
        try:
            item = self.dataset.read(i, *shape)
        except VideoError as e:
            return {"error": str(e), "key": self.keys[i], "index": index}
        return {"video": item["video"], "caption": item["caption"], "key": self.keys[i], "index": index}


def _without_step(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "step"}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "video" in s]
    return {"video": torch.stack([s["video"] for s in good]) if good else None,  # (B, C, T, H, W)
            "keys": [s["key"] for s in good], "captions": [s["caption"] for s in good],
            "errors": [(s["key"], s["error"]) for s in samples if "error" in s],
            "indices": [s["index"] for s in samples], "pos": samples[0]["index"][1:3],
            "shape": samples[0]["index"][3]}


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------
class _TrainForward(nn.Module):
    """``forward`` = ``Autoencoder.train_forward``, so DistributedDataParallel sees one call."""

    def __init__(self, ae: Autoencoder):
        super().__init__()
        self.ae = ae

    def forward(self, video: Tensor, generator: torch.Generator, cond: Cond | None = None):
        return self.ae.train_forward(video, cond, generator)


def _build_model(cfg: TrainAEConfig, stage: int | None = None) -> tuple[Autoencoder, str]:
    """The autoencoder to train: ``--init`` or the registered ``--autoencoder`` (with overrides)
    from ``autoencoders.resolve``; then, for a family that starts from a pretrained base
    (``base_family``), the base from ``--base-checkpoint``; then, for a staged family (``stages``),
    the training stage ``stage`` (default ``cfg.stage``; None keeps the model's own)."""
    overrides = cfglib.apply_dotted({}, list(cfg.ae_config))
    ae, name, _ = resolve(cfg.autoencoder, cfg.init, overrides=None if cfg.init else overrides, seed=None,
                          warn_random=False)
    if cfg.init is not None and overrides:
        ae = ae.with_config(**overrides)  # settings of the saved model that keep its weights' shapes
    stage = cfg.stage if stage is None else stage
    if cfg.base_checkpoint is not None:
        with checking():  # a family without a base, a base of another family or architecture
            ae.load_base(cfg.base_checkpoint)
    elif ae.base_family and cfg.init is None:
        log.warning("%s starts from a RANDOM %s base: pass --base-checkpoint (a trained %s's OUTPUT/final) for "
                    "a usable model", name, ae.base_family, ae.base_family)
    if stage is not None:
        with checking():  # a family not trained in stages
            ae = ae.with_stage(stage)
    return ae, name


def is_image_step(cfg: TrainAEConfig, step: int) -> bool:
    """Whether step ``step`` trains on images (joint image-video training, e.g. the cross-modal VAE's
    8:2 video:image ratio = ``image_ratio`` 0.2): a draw seeded by (seed, step), so every rank agrees
    and a resumed run repeats the sequence."""
    if cfg.image_ratio <= 0.0 or cfg.image_ratio >= 1.0:
        return cfg.image_ratio >= 1.0
    return random.Random(cfg.seed * 1_000_003 + step).random() < cfg.image_ratio


def frames_as_images(video: Tensor, cond: Cond | None) -> tuple[Tensor, Cond | None]:
    """``B C T H W`` clips -> ``(B T) C 1 H W`` single-frame images, each keeping its clip's text."""
    frames = video.shape[2]
    images = rearrange(video, "b c t h w -> (b t) c 1 h w")  # (B*T, C, 1, H, W)
    if cond is None or cond.text is None:
        return images, cond
    mask = None if cond.text_mask is None else cond.text_mask.repeat_interleave(frames, 0)  # (B*T, L)
    return images, Cond(text=cond.text.repeat_interleave(frames, 0), text_mask=mask)  # (B*T, L, D)



def save_grid(originals: Tensor, recons: Tensor, path: Path, max_frames: int = 4) -> None:
    """PNG grid: for each clip a row of originals then a row of reconstructions, ``max_frames``
    evenly spaced frames per row. Inputs ``B C T H W`` in [-1, 1]."""
    t = originals.shape[2]
    idx = sorted({round(i * (t - 1) / max(1, max_frames - 1)) for i in range(min(max_frames, t))})
    rows = []
    for o, r in zip(originals, recons):
        for v in (o, r):
            frames = video_to_uint8(v[:, idx].cpu())  # (F, H, W, C)
            rows.append(torch.cat(list(frames), dim=1))  # (H, F*W, C)
    grid = torch.cat(rows, dim=0).numpy()  # (2B*H, F*W, C)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


@torch.no_grad()
def measure_latent_stats(ae: Autoencoder, videos: list[Tensor], device: torch.device,
                         conds: list[Cond | None] | None = None) -> dict[str, tuple[float, ...]]:
    """``latent_scale`` / ``latent_shift`` that make the encoded latents zero-mean, unit-variance:
    per channel when every part is a ``B c t h w`` grid with the same channels, else one value.
    Composed with the current ones (encode already applies them). ``conds``: one ``cond`` per
    video (text embeddings for text-guided autoencoders)."""
    ae.eval()
    conds = conds if conds is not None else [None] * len(videos)
    lats = [ae.encode(v[None].to(device), c).unbatch()[0] for v, c in zip(videos, conds)]
    parts = [t for lat in lats for t in lat.parts.values()]
    # per channel needs >= 2 values of each channel (one 1-frame latent pixel has one: pooled then)
    per_channel = (all(t.ndim == 5 for t in parts) and len({t.shape[1] for t in parts}) == 1
                   and sum(t[:, 0].numel() for t in parts) >= 2)
    if per_channel:
        flat = torch.cat([t.transpose(0, 1).flatten(1) for t in parts], dim=1).double()  # (c, N)
        mean, std = flat.mean(1), flat.std(1)
    else:
        flat = torch.cat([t.flatten() for t in parts]).double()
        if flat.numel() < 2:
            log.warning("latent statistics need at least 2 latent values; the current ones are kept")
            return {"latent_scale": tuple(ae.config.latent_scale), "latent_shift": tuple(ae.config.latent_shift)}
        mean, std = flat.mean()[None], flat.std()[None]
    std = std.clamp_min(1e-6)
    old_s = torch.tensor(ae.config.latent_scale, dtype=torch.float64)
    old_b = torch.tensor(ae.config.latent_shift, dtype=torch.float64)
    # encode gives z' = (z - b) * s; we want (z' - m) / d = (z - (b + m / s)) * (s / d)
    return {"latent_scale": tuple((old_s / std).tolist()),
            "latent_shift": tuple((old_b + mean / old_s).tolist())}


class AETrainer:
    def __init__(self, cfg: TrainAEConfig, env: dist.DistEnv, binding: runs.Binding | None = None):
        self.cfg, self.env, self.binding = cfg, env, binding
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self.device = dist.device_for(env, cfg.device)
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise ValueError("--precision bf16 needs a CUDA device")
        self.main = env.rank == 0
        self.stop: runs.StopRequest | None = None  # set while `run` trains (SIGTERM / Ctrl-C: a graceful stop)
        self.stopping = False  # some rank was asked to stop: this step is the last, with a checkpoint

        self.resumed_from: str | None = None
        self.rejected: list[dict[str, str]] = []
        self.resume_path = self._find_resume()  # before the model: a resumed run keeps its stage
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.ae, self.name = _build_model(cfg, self._resume_stage())
        self.schedule = cfg.bucket_schedule()
        self.ae.check_input(cfg.frames, cfg.height, cfg.width)  # fail before any work
        for bucket in self.schedule.buckets:
            self.ae.check_input(*bucket.shape)
        if cfg.image_ratio > 0:
            self.ae.check_input(1, cfg.height, cfg.width)
        self.ae.to(self.device).train()
        self.text_encoder = self._build_text_encoder()
        lpips = None
        if cfg.lpips_vgg:
            lpips = LPIPS.from_files("vgg", cfg.lpips_vgg, cfg.lpips_heads)
        self.loss_fn = AELoss(cfg.loss_config(), self.ae.config.in_channels, lpips).to(self.device)
        self.val_lpips = lpips.to(self.device).eval() if lpips is not None else None  # a validation metric too
        self.val_clips: list[tuple[Tensor, str]] = []  # this rank's share of the held-out clips (`_read_val_clips`)
        self.val_records: list[dict[str, Any]] = []
        self.logger: runs.RunLog | None = None  # log.jsonl + TensorBoard while `run` trains
        with checking("--gan"):  # a family whose decoder has no weight for the adaptive GAN weight (Hi-VAE)
            self.last_layer = self.ae.last_layer() if self.loss_fn.discriminator is not None else None
        # image steps leave the temporal layers unused, and a model may declare parameters that some
        # steps do not use (class attribute ``ddp_find_unused_parameters``): DDP must not wait for them
        unused = cfg.image_ratio > 0 or self.schedule.has_images or self.ae.ddp_find_unused_parameters
        if unused and dist.is_initialized() and env.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(_TrainForward(self.ae), find_unused_parameters=True,
                                                 device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = dist.wrap_ddp(_TrainForward(self.ae), self.device)
        self.opt = torch.optim.AdamW(self.ae.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.disc, self.d_opt = None, None
        if self.loss_fn.discriminator is not None:
            self.disc = dist.wrap_ddp(self.loss_fn.discriminator, self.device)
            self.d_opt = torch.optim.AdamW(self.loss_fn.discriminator.parameters(), lr=cfg.lr,
                                           betas=cfg.disc_betas or cfg.betas, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + env.rank)

        items = training_videos(cfg)
        if len(items) // env.world_size < cfg.batch_size:
            raise UserError(f"{cfg.data}: {len(items)} clips cannot fill a batch of {cfg.batch_size} on each of "
                            f"{env.world_size} rank(s); give a smaller --batch-size")
        self.keys = [it.key for it in items]
        self.dataset = VideoClipDataset(items, cfg.frames, cfg.height, cfg.width, fps=cfg.fps)
        self.reader = _SkipBad(self.dataset, self.keys)
        self.sampler: _PositionSampler | None = None
        self.step, self.pos = 0, (0, 0)
        self.skipped: dict[str, str] = {}

    def _build_text_encoder(self):
        """The frozen text encoder a text-guided autoencoder trains with (None otherwise)."""
        spec = self.cfg.text_encoder
        if spec and not self.ae.text_dim:
            raise ValueError(f"--text-encoder {spec}: {self.name} takes no text")
        encoder = None
        if spec:
            from ldm.text import absolute_spec, build_text_encoder, fingerprint
            with checking("--text-encoder"):
                encoder = build_text_encoder(spec, device=self.device)
            # what final/ records: extract / reconstruct / eval recon then refuse another encoder
            self.ae.trained_text_encoder = {"spec": absolute_spec(spec), "dim": encoder.dim,
                                            "fingerprint": list(fingerprint(encoder))}
        self.ae.check_text_encoder(encoder, spec, self.name)
        return encoder

    def _text_cond(self, captions: list[str]) -> Cond | None:
        if self.text_encoder is None:
            return None
        emb, mask = self.text_encoder.encode(captions)
        return Cond(text=emb.to(self.device), text_mask=mask.to(self.device))

    # --- checkpoints -----------------------------------------------------------------------
    def save(self) -> None:
        rng_tensors, rng_meta = runs.rng_state(self.generator)
        rank_state = {"rank": self.env.rank, "data": {"epoch": self.pos[0], "batch": self.pos[1]},
                      "rng": rng_meta, "skipped": self.skipped}
        gathered = dist.all_gather_object((rank_state, {k: v.cpu() for k, v in rng_tensors.items()}))
        if self.main:
            opt_t, opt_j = runs.optimizer_to_files(self.opt)
            files: dict[str, Any] = {
                "model.safetensors": self.ae.state_dict(),
                "config.json": {"family": self.ae.family, "name": self.name,
                                "config": cfglib.to_dict(self.ae.config)},
                "optimizer.safetensors": opt_t, "optimizer.json": opt_j,
                "rng.safetensors": {f"rank{r}.{k}": v for r, (_, ts) in enumerate(gathered) for k, v in ts.items()},
                "trainer.json": {"format": runs.FORMAT, "step": self.step, "world_size": self.env.world_size,
                                 "autoencoder": self.name, "settings": cfglib.to_dict(self.cfg),
                                 "ranks": [s for s, _ in gathered]},
            }
            if self.loss_fn.discriminator is not None:
                d_t, d_j = runs.optimizer_to_files(self.d_opt)
                files.update({"discriminator.safetensors": self.loss_fn.discriminator.state_dict(),
                              "disc_optimizer.safetensors": d_t, "disc_optimizer.json": d_j})
            try:
                runs.write_checkpoint(self.ckpt_root, self.step, files, self.cfg.keep)
            except runs.WRITE_ERRORS as e:  # disk full, quota, I/O error
                raise runs.write_failed(self.ckpt_root, self.step, e) from e
        dist.barrier()

    def load(self, path: Path) -> None:
        trainer = read_json(path / "trainer.json")
        if trainer.get("format") != runs.FORMAT:
            raise ValueError(f"{path}: checkpoint format {trainer.get('format')} != {runs.FORMAT}")
        meta = read_json(path / "config.json")
        if meta["family"] != self.ae.family or meta["config"] != cfglib.to_dict(self.ae.config):
            raise ValueError(f"{path}: the checkpoint's autoencoder config differs from this run's "
                             f"({meta['family']} {meta['config']} vs {self.ae.family} "
                             f"{cfglib.to_dict(self.ae.config)})")
        self.ae.load_state_dict(load_tensors(path / "model.safetensors", self.device))
        runs.optimizer_from_files(self.opt, load_tensors(path / "optimizer.safetensors", self.device),
                             read_json(path / "optimizer.json"))
        if self.loss_fn.discriminator is not None:
            if (path / "discriminator.safetensors").is_file():
                disc_sd = load_tensors(path / "discriminator.safetensors", self.device)
                self.loss_fn.discriminator.load_state_dict(disc_sd)
                runs.optimizer_from_files(self.d_opt, load_tensors(path / "disc_optimizer.safetensors", self.device),
                                     read_json(path / "disc_optimizer.json"))
            else:
                log.warning("%s has no discriminator: the GAN starts from a fresh one", path)
        self.step = trainer["step"]
        ranks, rank = trainer["ranks"], self.env.rank
        saved = ranks[rank % len(ranks)]
        rng = load_tensors(path / "rng.safetensors")
        prefix = f"rank{saved['rank']}."
        runs.set_rng_state(self.generator, {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)},
                           saved["rng"])
        old_global = trainer["settings"]["batch_size"] * len(ranks)
        if (len(ranks), old_global) == (self.env.world_size, self.cfg.batch_size * self.env.world_size):
            self.pos = (saved["data"]["epoch"], saved["data"]["batch"])  # exact: the same ranks go on
            self.skipped = dict(saved["skipped"])
            self.resumed_from = str(path)
            return
        # another topology (allowed by _find_resume): every rank goes on from the clips all ranks had read
        self.pos = carried_position([(r["data"]["epoch"], r["data"]["batch"]) for r in ranks], old_global,
                                    self.cfg.batch_size * self.env.world_size)
        if rank >= len(ranks):  # a rank the checkpoint did not have: posterior noise of its own
            self.generator.manual_seed((self.cfg.seed * 1_000_003 + rank) * 1_000_003 + self.step)
        self.skipped = {k: v for r in ranks for k, v in r["skipped"].items()}
        self.resumed_from = str(path)
        if self.main:
            log.warning("%s was written by %d rank(s) x batch %d, this run has %d x %d: the epoch goes on from its "
                        "clip %d (the loss sequence is not that of an uninterrupted run)", path, len(ranks),
                        old_global // len(ranks), self.env.world_size, self.cfg.batch_size,
                        self.pos[1] * self.cfg.batch_size * self.env.world_size)

    def _find_resume(self) -> Path | None:
        """The checkpoint this run resumes from (``--resume``), None to start fresh."""
        mode = self.cfg.resume
        if mode == "no":
            return None
        if mode == "auto":
            # rank 0 verifies (hashing every file once), every rank loads the same checkpoint
            found = runs.find_checkpoint(self.ckpt_root, REQUIRED_FILES) if self.main else None
            path, self.rejected = dist.broadcast_object(found)
            for r in self.rejected:
                log.warning("checkpoint %s rejected: %s", r["path"], r["reason"])
            if path is None:
                if self.rejected:
                    raise UserError(f"no valid checkpoint under {self.ckpt_root} (all rejected, see above); "
                                    "give a new --output to start over")
                return None
        else:
            path = Path(mode)
            reason = runs.verify_checkpoint(path, REQUIRED_FILES) if path.is_dir() else "not a folder"
            if reason is not None:
                raise UserError(f"--resume {path}: {reason}")
        trainer = read_json(path / "trainer.json")
        ranks, batch = trainer["world_size"], trainer["settings"]["batch_size"]
        world = self.env.world_size
        if ranks != world and batch == self.cfg.batch_size:  # before the model is built
            keep = (f"--batch-size {ranks * batch // world} --allow-change batch_size to keep its global batch, or "
                    if ranks * batch % world == 0 else "")
            raise UserError(f"{path} was written by {ranks} rank(s) x --batch-size {batch} (a global batch of "
                            f"{ranks * batch} clips), this run has {world}: resume it with {keep}another "
                            "--batch-size N --allow-change batch_size for another global batch (the LR is not "
                            f"rescaled), or with {ranks} process(es)")
        return path

    def _resume_stage(self) -> int | None:
        """The stage to build the model at: ``--stage``, else the resumed checkpoint's (a staged run
        resumed without ``--stage`` stays in its stage). A ``--stage`` other than the checkpoint's is
        an error: a new stage starts a new run from ``--init RUN/final``."""
        if self.resume_path is None:
            return self.cfg.stage
        meta = read_json(self.resume_path / "config.json")
        family = FAMILIES.get(meta.get("family"))
        saved = meta["config"].get("stage") if family is not None and family.stages else None
        if self.cfg.stage is not None and saved is not None and saved != self.cfg.stage:
            raise UserError(f"{self.resume_path} was trained at stage {saved}, not --stage {self.cfg.stage}: "
                             f"resume with --stage {saved}, or start stage {self.cfg.stage} as a new run "
                             f"(--init {self.out / 'final'} --stage {self.cfg.stage} --output NEW_DIR)")
        return self.cfg.stage if self.cfg.stage is not None else saved

    def maybe_resume(self) -> None:
        """Load the checkpoint found at start-up, if any."""
        if self.resume_path is None:
            return
        self.load(self.resume_path)
        if self.main:  # as ldm train says it: a run that started over would look the same otherwise
            print(f"resumed from {self.resume_path} at step {self.step}", flush=True)

    # --- one optimisation step ---------------------------------------------------------------
    def train_step(self, video: Tensor, cond: Cond | None = None) -> dict[str, Tensor] | None:
        """One generator (+ discriminator) update; None when the loss was not finite (skipped). On an
        image step (``is_image_step``) the clips' frames are trained on as single images. The GAN
        terms are weighted by the step's bucket's ``disc_weight``."""
        cfg = self.cfg
        image_step = is_image_step(cfg, self.step)
        disc_weight = self.schedule.at(self.step).disc_weight
        self.loss_fn.config = cfg.loss_config(disc_weight)  # this step's GAN weight (the rest is fixed)
        if image_step:
            video, cond = frames_as_images(video, cond)
        lr = cfg.learning_rate(self.step)
        for opt in filter(None, (self.opt, self.d_opt)):
            for group in opt.param_groups:
                group["lr"] = lr
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
        with autocast:
            out = self.model(video, self.generator, cond)
            total, logs = self.loss_fn.generator_loss(video, out, self.step, self.last_layer, self.ae.recon_trained)
        # one read per step: is the loss finite on every rank, and was any rank asked to stop
        asked = self.stop.flag(total.device) if self.stop is not None else total.new_zeros((), dtype=torch.float32)
        flags = torch.stack([torch.isfinite(total).float(), asked])
        finite, stop = dist.all_reduce_mean(flags).tolist()
        if stop > 0 and not self.stopping:
            self.stopping = True
            if self.stop is not None:
                self.stop.heard()  # rank 0 says so when only another rank was signalled
        if finite < 1.0:
            return None
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.ae.parameters(), cfg.max_grad_norm or math.inf)
        if not torch.isfinite(grad_norm):
            return None
        self.opt.step()
        logs["grad_norm"] = grad_norm.detach()
        if cfg.image_ratio > 0:
            logs["image_step"] = torch.tensor(float(image_step), device=video.device)
        if self.loss_fn.gan_active(self.step) and disc_weight > 0:
            with autocast:
                d_loss, d_logs = self.loss_fn.discriminator_loss(video, out.recon, disc=self.disc)
            self.d_opt.zero_grad(set_to_none=True)
            (disc_weight * d_loss).backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.loss_fn.discriminator.parameters(), cfg.max_grad_norm)
            self.d_opt.step()
            logs.update(d_logs)
            logs["disc_weight"] = torch.tensor(disc_weight, device=video.device)
        return logs

    # --- the loop ----------------------------------------------------------------------------
    def _loader(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        self.sampler = _PositionSampler(len(self.keys), cfg.batch_size, cfg.seed, self.env.rank,
                                        self.env.world_size, *self.pos, self.schedule, self.step)
        loader = DataLoader(self.reader, batch_sampler=self.sampler, collate_fn=_collate,
                            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
                            persistent_workers=False, worker_init_fn=runs.reader_ignores_interrupts)
        return iter(loader)

    def _next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """Next batch with at least one readable clip, read at this step's bucket shape; bad clips
        (unreadable, or too short for the bucket) are logged once and skipped."""
        per_epoch = max(1, len(self.keys) // self.env.world_size // self.cfg.batch_size)
        shape = self.schedule.at(self.step).shape
        for _ in range(2 * per_epoch + 1):
            batch = next(batches)
            epoch, b = batch["pos"]
            self.pos = (epoch, b + 1)
            if batch["shape"] != shape:  # prefetched for the next step before a batch was dropped: read again
                batch = _collate([self.reader[(i, epoch, b, shape)] for i, *_ in batch["indices"]])
            for key, reason in batch["errors"]:
                if key not in self.skipped:
                    self.skipped[key] = reason
                    log.warning("skipping %s: %s", key, reason)
            if batch["video"] is not None:
                return batch
            self.sampler.next_step -= 1  # this step still needs its batch: later batches shift one step back
        key, reason = next(iter(self.skipped.items()), ("-", "-"))
        raise UserError(f"no clip of {self.cfg.data} readable at {'x'.join(map(str, shape))} (frames x height x "
                        f"width) in two epochs: {len(self.skipped)} skipped (e.g. {key}: {reason}; all in the log "
                        "above); give clips the videos hold (--frames, --fps, buckets) or other videos")

    def _sample_clips(self, n: int) -> tuple[list[Tensor], list[str]]:
        """The first ``n`` readable clips and their captions."""
        clips, captions = [], []
        for i in range(len(self.keys)):
            try:
                item = self.dataset[i]
            except VideoError:
                continue
            clips.append(item["video"])
            captions.append(item["caption"])
            if len(clips) == n:
                break
        return clips, captions

    def _read_val_clips(self) -> list[tuple[Tensor, str]]:
        """This rank's share (round-robin) of the held-out clips: the first ``val.clips`` of
        ``val.data`` with their captions, read once at ``frames x height x width`` so every
        validation sees the same pixels; an unreadable one is skipped with a warning."""
        cfg = self.cfg
        items = held_out_videos(cfg)[:cfg.val.clips]
        dataset = VideoClipDataset(items, cfg.frames, cfg.height, cfg.width, fps=cfg.fps)
        mine = []
        for i in dist.shard_list(list(range(len(items))), self.env.rank, self.env.world_size):
            try:
                item = dataset[i]
            except VideoError as e:
                log.warning("val.data: skipping %s: %s", items[i].key, e)
                continue
            mine.append((item["video"], item["caption"]))
        readable = dist.all_reduce_mean(torch.tensor([float(len(mine))], device=self.device)).item()
        if readable == 0:
            raise UserError(f"val.data {cfg.val.data}: none of its first {len(items)} clips is readable at "
                            f"{cfg.frames}x{cfg.height}x{cfg.width} (frames x height x width; warnings above); "
                            "give held-out videos that hold such clips")
        return mine

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """PSNR / SSIM (/ LPIPS with ``--lpips-vgg``) of the held-out clips encoded and decoded as
        ``ldm eval recon`` does (deterministic encode, fp32, ``ldm.metrics.reconstruction_scores``),
        averaged over every clip of every rank (a clip whose PSNR is infinite, a perfect one, is
        left out of the PSNR mean, as in ``eval recon``)."""
        self.ae.eval()
        sums = torch.zeros(5, dtype=torch.float64)  # finite PSNR sum, finite PSNR clips, SSIM sum, LPIPS sum, clips
        for i in range(0, len(self.val_clips), self.cfg.batch_size):
            chunk = self.val_clips[i:i + self.cfg.batch_size]
            video = torch.stack([v for v, _ in chunk]).to(self.device)  # (B, C, T, H, W)
            cond = self._text_cond([c for _, c in chunk])
            scores = reconstruction_scores(video, self.ae.decode(self.ae.encode(video, cond), cond).clamp(-1, 1),
                                           self.val_lpips)
            finite = torch.isfinite(scores["psnr"])
            lpips = scores["lpips"].double().sum() if "lpips" in scores else 0.0
            sums += torch.tensor([scores["psnr"][finite].sum().item(), finite.sum().item(),
                                  scores["ssim_per_frame"].mean(1).sum().item(), float(lpips), len(chunk)],
                                 dtype=torch.float64)
        self.ae.train()
        psnr_sum, psnr_n, ssim_sum, lpips_sum, n = (dist.all_reduce_mean(sums.to(self.device))
                                                    * self.env.world_size).tolist()
        record: dict[str, Any] = {"step": self.step, "val_psnr": psnr_sum / psnr_n if psnr_n else math.inf,
                                  "val_ssim": ssim_sum / n}
        if self.val_lpips is not None:
            record["val_lpips"] = lpips_sum / n
        record["val_clips"] = round(n)
        return record

    @torch.no_grad()
    def _write_samples(self, clips: list[Tensor], captions: list[str]) -> None:
        self.ae.eval()
        video = torch.stack(clips).to(self.device)  # (B, C, T, H, W)
        cond = self._text_cond(captions)
        recon = self.ae.decode(self.ae.encode(video, cond), cond).clamp(-1, 1)
        self.ae.train()
        save_grid(video, recon, self.out / "samples" / f"{runs.step_dir_name(self.step)}.png")

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        runs.claim_folder(self.out)  # no second run into it while this one lives
        self.maybe_resume()
        if cfg.val.data:
            self.val_clips = self._read_val_clips()
        start_step = self.step
        if self.main:  # a scheduled change after the last step would never happen (a shortened recipe)
            late = [at for at, _ in cfg.lr_drop if int(at) >= cfg.steps]
            if late:
                log.warning("lr_drop at step(s) %s: after the run's last step %d, it never applies (give "
                            "--lr-drop STEP:LR below --steps)", late, cfg.steps)
            for message in self.ae.schedule_warnings(max(cfg.steps - self.step, 0)):
                log.warning("%s", message)
        log_path = self.out / "log.jsonl"
        sample_clips: list[Tensor] = []
        sample_captions: list[str] = []
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.binding is not None:
                self.binding.write()
            sample_clips, sample_captions = self._sample_clips(2)
        self.logger = runs.RunLog(self.out, self.step, enabled=self.main)
        dist.barrier()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.main and cfg.progress),
                   desc=f"train-ae {self.name}", unit="step", dynamic_ncols=True)
        batches = self._loader() if self.step < cfg.steps else iter(())
        losses: list[float] = []
        nonfinite = runs.NonFiniteGuard(cfg.max_nonfinite)
        self.train_time = 0.0  # seconds in training steps, for the summary's rates
        profiler = runs.StepProfiler(cfg.profile, self.out / "profile", self.env.rank, self.step,
                                     self.device.type == "cuda")
        self.stop, self.stopping = runs.StopRequest(), False
        try:
            self._train_steps(batches, bar, nonfinite, profiler, losses, sample_clips, sample_captions)
        finally:
            self.stop.close()
            bar.close()  # an error's line then starts on a line of its own
            self.logger.close()
        profiler.close()
        del batches  # stops the loader's workers before the final export
        if self.stopping and self.step < cfg.steps:
            if self.main:
                print(self.stop.message(self.step, cfg.steps, self.ckpt_root), flush=True)
            return {"stopped": self.stop.cause, "steps": self.step}
        return self._finish(start_step, losses, self.train_time, log_path)

    def _train_steps(self, batches, bar, nonfinite, profiler, losses: list[float],
                     sample_clips: list[Tensor], sample_captions: list[str]) -> None:
        cfg = self.cfg
        clips_since, t_since = 0, time.perf_counter()
        while self.step < cfg.steps and not self.stopping:
            t0 = time.perf_counter()
            batch = self._next_batch(batches)
            video = batch["video"].to(self.device, non_blocking=True)
            logs = self.train_step(video, self._text_cond(batch["captions"]))
            self.step += 1
            profiler.step()
            clips_since += video.shape[0]
            nonfinite.check(logs is not None, self.step)
            self.train_time += time.perf_counter() - t0
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or self.stopping:
                record = self._log_record(logs, clips_since, time.perf_counter() - t_since, nonfinite.total)
                clips_since, t_since = 0, time.perf_counter()
                if self.main:
                    self.logger.log(self.step, _without_step(record))
                    if "loss" in record:
                        losses.append(record["loss"])
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
            if cfg.val.data and (self.step % (cfg.val.every or cfg.save_every) == 0 or self.step == cfg.steps) \
                    and not self.stopping:
                self.val_records.append(self.validate())
                if self.main:
                    self.logger.log(self.step, _without_step(self.val_records[-1]), "val")
            if self.main and sample_clips and (self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                self._write_samples(sample_clips, sample_captions)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps or self.stopping:
                self.save()

    def _log_record(self, logs: dict[str, Tensor] | None, clips: int, seconds: float, skipped: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "epoch": self.pos[0], "lr": self.cfg.learning_rate(self.step - 1),
                                  "bucket": list(self.schedule.at(self.step - 1).shape)}
        # every rank reaches this point on the same steps; a skipped step is skipped everywhere
        if logs is not None:
            keys = sorted(logs)
            mean = dist.all_reduce_mean(torch.stack([logs[k].float().to(self.device) for k in keys]))
            record.update({k: float(v) for k, v in zip(keys, mean.tolist())})
        clips_t = torch.tensor([float(clips)], device=self.device)
        total_clips = dist.all_reduce_mean(clips_t).item() * self.env.world_size
        record.update({"clips_per_s": total_clips / max(seconds, 1e-9), "nonfinite_steps": skipped,
                       "skipped_clips": len(self.skipped)})
        return record

    def _finish(self, start_step: int, losses: list[float], train_time: float, log_path: Path) -> dict[str, Any]:
        cfg = self.cfg
        stats: dict[str, tuple[float, ...]] = {}
        skipped = {}
        for part in dist.all_gather_object(self.skipped):
            skipped.update(part)
        final = self.out / "final"
        if self.main:
            if cfg.latent_stats_clips:
                clips, captions = self._sample_clips(cfg.latent_stats_clips)
                if clips:
                    stats = measure_latent_stats(self.ae, clips, self.device, [self._text_cond([c]) for c in captions])
                    self.ae.config = cfglib.replace(self.ae.config, **stats)
            try:
                self.ae.save_pretrained(final, name=self.name)
            except runs.WRITE_ERRORS as e:  # disk full, quota, I/O error: the checkpoint is there
                raise runs.write_failed(final, self.step, e, "the final model",
                                        f"the checkpoint of step {self.step} is saved and a rerun writes final/") from e
        steps_done = self.step - start_step
        summary = {
            "autoencoder": self.name, "steps": self.step, "start_step": start_step, "steps_run": steps_done,
            "world_size": self.env.world_size, "device": str(self.device),
            "resumed_from": self.resumed_from, "rejected_checkpoints": self.rejected,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "steps_per_s": steps_done / train_time if train_time > 0 else None,
            "clips_per_s": steps_done * cfg.batch_size * self.env.world_size / train_time if train_time > 0 else None,
            "skipped_clips": skipped, "latent_stats": {k: list(v) for k, v in stats.items()},
            "text_encoder": cfg.text_encoder, "image_ratio": cfg.image_ratio, "stage": self.ae.stage,
            "val": self.val_records,
            "final": str(final), "log": str(log_path), "checkpoints": str(self.ckpt_root),
        }
        if self.main:
            atomic_write_json(self.out / "summary.json", summary)
        dist.barrier()
        return summary


def training_videos(cfg: TrainAEConfig):
    """The videos of ``--data`` (with ``--captions``), those ``--split`` names when it is given."""
    return list_items(cfg.data, cfg.captions, split=cfg.split)


def held_out_videos(cfg: TrainAEConfig):
    """The videos of ``val.data``, those ``val.split`` names when it is given."""
    return list_items(cfg.val.data, split=cfg.val.split or None)


def run_binding(cfg: TrainAEConfig) -> dict[str, Any]:
    """What the run folder is bound to: the settings except ``HARMLESS``, the videos (how many,
    and a hash of their names) and the weights hash of ``init`` / ``base_checkpoint``."""
    keys = [it.key for it in training_videos(cfg)]
    facts = {"videos": f"{len(keys)} (names sha256 {hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:16]})"}
    for key in ("init", "base_checkpoint"):
        if getattr(cfg, key) is not None:
            facts[f"{key}_weights"] = dir_hash(getattr(cfg, key))
    return runs.binding_record(cfglib.to_dict(cfg), HARMLESS, facts)


def check_run_folder(cfg: TrainAEConfig, allow_change: tuple[str, ...] = ()) -> runs.Binding:
    """The output folder may take this run: no earlier run's checkpoints are replaced
    (``--resume no`` into a folder that has some), and a folder of an earlier run -- or the run
    of ``--resume CHECKPOINT`` -- was made by the same settings and inputs (`runs.check_binding`;
    an earlier run that left no checkpoint and no final/ binds nothing, `runs.holds_training`)."""
    out = Path(cfg.output)
    if cfg.resume == "no" and runs.checkpoints(out / "checkpoints"):
        raise UserError(f"--resume no: {out} holds checkpoints of an earlier run, which this run would replace; "
                        f"give a new --output to start over (or move {out / 'checkpoints'} away)")
    record = run_binding(cfg)
    if cfg.resume not in ("auto", "no"):
        source = Path(cfg.resume).resolve().parent.parent  # RUN/checkpoints/step-N -> RUN
        if source != out.resolve():
            runs.check_binding(source, record, allow_change, new_folder="--resume CHECKPOINT of a run like this one",
                               defaults=runs.defaults_of(TrainAEConfig))
    return runs.check_binding(out, record, allow_change, defaults=runs.defaults_of(TrainAEConfig),
                              holds_work=runs.holds_training(out))


def train_autoencoder(cfg: TrainAEConfig, allow_change: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train per ``cfg`` (single process, or every rank of a torchrun/srun job) and return the
    run summary (steps, first/last logged loss, throughput, skipped clips, paths).
    ``allow_change``: keys of the binding that may differ from the run the output folder holds."""
    binding = check_run_folder(cfg, allow_change)  # before any process group or folder
    runs.check_free(cfg.output)  # a live run's folder: refused before the model takes GPU memory
    owns_group = not dist.is_initialized()
    env = dist.init_distributed()
    try:
        return AETrainer(cfg, env, binding).run()
    finally:
        runs.release_folder(cfg.output)
        if owns_group:
            dist.cleanup()


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``[--config FILE.yaml] [flags] [KEY=VALUE ...]``: each flag is a shorthand of a
    ``TrainAEConfig`` key and wins over the YAML; dotted overrides win over both. Flags not given
    do not touch the YAML's values (defaults come from ``TrainAEConfig``)."""
    def a(*names: str, **kw: Any) -> None:
        config_flag(parser, TrainAEConfig, *names, **kw)

    parser.add_argument("--config",
                        help="train-ae YAML (TrainAEConfig keys), or a recipe by name (hivae-stage1; "
                             "launch/configs/recipes/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (YAML) and exit; reads and writes nothing")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides (YAML values), e.g. steps=2000 lr_drop=[[70000,1e-5]]; "
                             "val.data=HELD_OUT_VIDEOS [val.every=N val.clips=16]: held-out PSNR / SSIM in log.jsonl")
    parser.add_argument(runs.ALLOW_FLAG, dest="allow_change", action="append", metavar="KEY[,KEY]",
                        help=runs.ALLOW_HELP)
    a("--autoencoder", choices=sorted(REGISTRY), help="registered autoencoder to train")
    a("--init", help="start from a folder written by save_pretrained (e.g. another run's final/)")
    a("--ae-config", dest="ae_config", action="append", metavar="KEY=VALUE",
      help="override a field of the registered config (repeatable); with --init, of the saved one, for fields "
           "that keep the weights' shapes (e.g. MTC-VAE train_rates=random, Hi-VAE kl_free_bits=1)")
    a("--stage", type=int, choices=(0, 1, 2),
      help="training stage of a staged autoencoder: Hi-VAE 1 = global motion module + decoder, 2 = detailed "
           "module + decoder (global module frozen); MTC-VAE 1 = new sampling layers, 2 = keyframe embedding + "
           "predictor (+ decoder), 0 = everything. Start stage 2 from the stage-1 run: --init RUN/final --stage 2. "
           "Default: the model's own; a resumed run keeps its checkpoint's")
    a("--base-checkpoint", metavar="DIR",
      help="the trained base a staged autoencoder starts from (a save_pretrained folder, e.g. a train-ae "
           "OUTPUT/final): Hi-VAE's frozen kl2d, MTC-VAE's causal3d")
    a("--data", help="folder of videos or raw video shards (data.sources.list_items)")
    a("--captions", help="CSV/JSONL with path,caption for the videos of --data (default: metadata.jsonl in the "
                         "folder); text-guided autoencoders train with them")
    a("--split", metavar="FILE",
      help="train on the videos this list names, paths relative to --data (UCF-101 trainlist01.txt; as `ldm "
           "extract --split`); val.split=FILE takes the held-out videos of val.data the same way")
    a("--output", help="run folder (checkpoints, samples, log, final/)")
    a("--frames", type=int, help="clip length")
    a("--height", type=int)
    a("--width", type=int)
    a("--fps", type=float, help="resample clips to this rate (default: native)")
    a("--batch-size", type=int, help="clips per rank per step")
    a("--lr", type=float)
    a("--weight-decay", type=float)
    a("--warmup", type=int, help="linear LR warm-up steps")
    a("--schedule", choices=runs.SCHEDULES,
      help="LR after warm-up: constant, or cosine to min_lr_ratio x LR at --steps")
    a("--min-lr-ratio", type=float, help="cosine schedule: final LR as a fraction of --lr")
    a("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="AdamW betas of the autoencoder")
    a("--disc-betas", type=float, nargs=2, metavar=("B1", "B2"),
      help="AdamW betas of the discriminator (default: --betas)")
    a("--lr-drop", dest="lr_drop", type=_parse_lr_drop, action="append", metavar="STEP:LR",
      help="from update STEP on (0-based; the log's steps > STEP) the LR is LR (repeatable, piecewise constant "
           "after warm-up; H3AE: --lr 1e-4 --lr-drop 70000:1e-5 --steps 80000)")
    a("--steps", type=int, help="total optimizer steps, resume continues up to it")
    a("--max-grad-norm", type=float, help="gradient clipping (0: off)")
    a("--loss", choices=REC_LOSSES, help="reconstruction loss")
    a("--kl-weight", type=float, help="weight of the KL term (SD convention: KL summed over latents / input elements)")
    a("--lpips-vgg", help="torchvision VGG16 weights file for the LPIPS term")
    a("--lpips-heads", help="the lpips package's vgg.pth linear heads")
    a("--lpips-weight", type=float)
    a("--dwt-weight", type=float, help="weight of an L1 loss on 3D Haar wavelet coefficients (H3AE Tab. 5's DWT loss)")
    a("--gan", action="store_true", help="add a PatchGAN discriminator (hinge loss, adaptive weight)")
    a("--gan-weight", type=float)
    a("--disc-kind", choices=("2d", "3d"))
    a("--disc-start", type=int, help="step at which the GAN switches on")
    a("--text-encoder", help="caption embeddings for a text-guided autoencoder: builtin | t5:DIR | clip:DIR")
    a("--image-ratio", type=float,
      help="fraction of steps that train on the batch's frames as single images (joint image-video training; "
           "the cross-modal VAE paper uses 0.2)")
    a("--log-every", type=int)
    a("--save-every", type=int)
    a("--sample-every", type=int)
    # the older checkpoints go only once the new one is sealed (launch.runs.commit), so 1 is safe against a kill
    # or a full disk while writing; more guard against a sealed one damaged later (a crash before the page cache
    # reached the disk, a disk error): resume then falls back to the one before
    a("--keep", type=int, help="checkpoints to keep (default 3; >= 1, as ldm train's keep_checkpoints: with 1 a "
                               "checkpoint damaged after it was written has no fallback)")
    a("--num-workers", type=int)
    a("--seed", type=int)
    a("--resume", help="auto (default): newest valid checkpoint under OUTPUT/checkpoints; no: start from step 0 (an "
                       "OUTPUT holding checkpoints is refused); or a checkpoint folder")
    a("--device", choices=("auto", "cpu", "cuda"))
    a("--precision", choices=("fp32", "bf16"))
    a("--latent-stats-clips", type=int,
      help="clips used to set the final model's latent_scale/shift (0: keep the config's)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar (default: a bar on rank 0)")


def _parse_lr_drop(text: str) -> tuple[int, float]:
    """``STEP:LR`` -> ``(STEP, LR)`` for ``--lr-drop``."""
    step, sep, lr = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(step), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEP:LR (e.g. 70000:1e-5)") from None


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in TrainAEConfig.__dataclass_fields__}


def config_from_args(args: argparse.Namespace) -> TrainAEConfig:
    """``--config`` YAML, then the flags given, then the ``KEY=VALUE`` overrides."""
    return cfglib.load_yaml(args.config, TrainAEConfig, args.overrides, values=_flags(args))


def _resolved_yaml(args: argparse.Namespace) -> str:
    """``--print-config``: the settings ``config_from_args`` resolves, as YAML (``data`` / ``output``
    may still be unset: a recipe leaves them to the command line)."""
    with checking():
        return cfglib.resolved_yaml(args.config, TrainAEConfig, args.overrides, values=_flags(args))


def check_inputs(cfg: TrainAEConfig) -> None:
    """What a run reads is there and fits, before any process group, model or folder: the output
    path, the ``--init`` / ``--base-checkpoint`` folders, the videos, and the clip size for the
    autoencoder (built on the meta device: no weights). `UserError` otherwise."""
    out = Path(cfg.output)
    runs.check_output_layout(out, "--output ", ("checkpoints", "final", "samples", "tensorboard", "profile"),
                             ("log.jsonl", "summary.json", runs.BINDING))
    for flag, path in (("--lpips-vgg", cfg.lpips_vgg), ("--lpips-heads", cfg.lpips_heads)):
        if path is not None and not Path(path).is_file():
            raise MissingInput(f"{flag} {path}: no such file (the LPIPS weights, local files: README, LPIPS)")
    saved = {}
    for flag, path in (("--base-checkpoint", cfg.base_checkpoint), ("--init", cfg.init)):
        if path is not None:
            try:
                saved[flag] = saved_config(path)
            except UserError as e:  # say which folder (a recipe names them; its header says how to make them)
                raise type(e)(f"{flag}: {e}") from None
    meta = saved.get("--init")
    if meta is not None:
        with checking("--init"):  # --autoencoder NAME with --init: the folder must hold it
            check_saved_name(cfg.init, meta, cfg.autoencoder)
    videos = training_videos(cfg)  # a missing --data, --captions or --split file is one line here
    if cfg.val.split and not cfg.val.data:
        raise UserError(f"val.split {cfg.val.split} without val.data: give val.data=FOLDER, the videos it lists from")
    if cfg.val.split and not Path(cfg.val.split).is_file():
        raise MissingInput(f"val.split {cfg.val.split}: split list file not found")
    if cfg.val.data:
        try:
            held_out = held_out_videos(cfg)
        except UserError as e:  # say which setting: --data's message reads the same
            raise type(e)(f"val.data: {e}") from None
        if not held_out:
            raise UserError(f"val.data {cfg.val.data}: no videos found; give a folder of held-out videos")
        both = {it.key for it in videos} & {it.key for it in held_out[:cfg.val.clips]}
        if Path(cfg.val.data).resolve() == Path(cfg.data).resolve() and both:
            log.warning("val.data is --data (%s) and %d of the validation clips are training clips (e.g. %s), not "
                        "held out; give val.split=LIST of videos --split leaves out", cfg.data, len(both), min(both))
    with checking(f"--ae-config {' '.join(cfg.ae_config)}" if cfg.ae_config else None), torch.device("meta"):
        overrides = cfglib.apply_dotted({}, list(cfg.ae_config))
        if meta is not None:
            init = FAMILIES[meta["family"]].from_config_dict(meta["config"])
            ae = init.with_config(**overrides) if overrides else init  # an architecture change stops here
        else:
            ae = build(cfg.autoencoder, **overrides)
    with checking(f"--frames {cfg.frames} --height {cfg.height} --width {cfg.width}"), torch.device("meta"):
        ae.check_input(cfg.frames, cfg.height, cfg.width)
        if cfg.image_ratio > 0:
            ae.check_input(1, cfg.height, cfg.width)
    stage = cfg.stage if cfg.stage is not None else ae.stage  # --ae-config stage=N trains that stage too
    if stage == 2 and meta is None and ae.stages:  # stage 2 freezes what stage 1 trains
        raise UserError(f"--stage 2 trains on a stage-1 model: from {cfg.autoencoder} what stage 1 trains would stay "
                        "untrained and frozen; run --stage 1 first, then --init STAGE1_RUN/final --stage 2")
    if cfg.base_checkpoint is not None and meta is not None and ae.base_family:
        raise UserError(f"--base-checkpoint with --init: {cfg.init} holds the {ae.base_family} base its modules were "
                        "trained on, and another would replace it under them; leave out --base-checkpoint (it "
                        "starts a model from --autoencoder NAME)")
    saved_stage = init.stage if meta is not None else None
    if stage and saved_stage and stage < saved_stage:  # stage 0 (everything) may start from any stage
        raise UserError(f"--init {cfg.init} is a stage-{saved_stage} {ae.family} model: --stage {stage} after "
                        f"stage {saved_stage} would retrain stage {stage}'s part over it and leave stage "
                        f"{saved_stage}'s training stale; to train stage {stage} longer, resume its run or --init "
                        f"STAGE{stage}_RUN/final --stage {stage}; to go on with stage {saved_stage}, leave "
                        "out --stage")
    for bucket in cfg.bucket_schedule().buckets:
        with checking(f"bucket {list(bucket.shape)}"), torch.device("meta"):
            ae.check_input(*bucket.shape)


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        print(_resolved_yaml(args), end="")
        return 0
    with checking():
        cfg = config_from_args(args)
    check_inputs(cfg)
    env = dist.dist_env()
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"[rank {env.rank}] %(levelname)s %(message)s" if env.world_size > 1
                        else "%(levelname)s %(message)s")
    summary = train_autoencoder(cfg, runs.parse_allow(args.allow_change))
    if summary.get("stopped"):
        return runs.stopped_exit_code(summary)
    if env.rank == 0:
        shown = {k: summary[k] for k in ("autoencoder", "steps", "first_loss", "last_loss", "steps_per_s",
                                         "clips_per_s", "final")}
        if summary["val"]:  # the last validation of this run
            shown["val"] = summary["val"][-1]
        print(json.dumps(shown))
        if summary["skipped_clips"]:
            print(f"skipped {len(summary['skipped_clips'])} unreadable clip(s); see {summary['log']} "
                  "and summary.json", file=sys.stderr)
    return 0
