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

This file is the verb and its loop (`AETrainer`: ``run`` -> ``_train_steps`` -> ``train_step``);
beside it:

    launch/train_ae_config.py      the settings (`TrainAEConfig`, ``HARMLESS``), the flags, `check_inputs`
    launch/train_ae_data.py        the resumable batch stream of a rank, image steps
    launch/train_ae_checkpoint.py  `AECheckpoints`: save, load, which checkpoint to resume
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from autoencoders import Autoencoder, resolve
from autoencoders.losses import AELoss
from data.sources import VideoClipDataset
from data.video import UINT8_VALUES, VideoError, fit_shared_memory, uint8_to_float, video_to_uint8
from launch import dist, runs
from launch.train_ae_checkpoint import AECheckpoints
from launch.train_ae_config import (TrainAEConfig, print_config_yaml, check_inputs, check_run_folder, config_from_args,
                                   held_out_videos, training_videos)
from launch.train_ae_data import collate_clips, PositionSampler, SkipBad, frames_as_images, is_image_step
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_bytes, atomic_write_json
from ldm.errors import UserError, checking
from ldm.latent import Cond
from ldm.metrics import LPIPS, reconstruction_scores

# re-exported: `ldm train-ae`'s flags (launch.cli calls launch.train_ae.add_arguments)
from launch.train_ae_config import add_arguments  # noqa: F401

log = logging.getLogger("ldm.train_ae")
PREFETCH = 2  # batches each reader process keeps ready (DataLoader's default)


def _without_step(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "step"}


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


class AETrainer(AECheckpoints):
    """One ``ldm train-ae`` run on this rank: the model, its optimizers (and the discriminator's),
    the batch stream and the loop (`run` -> `_train_steps` -> `train_step`). Its checkpoints are
    `AECheckpoints` (launch/train_ae_checkpoint.py)."""

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
        self.reader = SkipBad(self.dataset, self.keys)  # uint8 clips: `uint8_to_float` on the device
        self.uint8_values = UINT8_VALUES.to(self.device)
        self.sampler: PositionSampler | None = None
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
                encoder = build_text_encoder(spec, max_length=self.cfg.text_max_length or None, device=self.device)
            # what final/ records: extract / reconstruct / eval recon then refuse another encoder and embed
            # captions at the same length (`Autoencoder.text_length`)
            self.ae.trained_text_encoder = {"spec": absolute_spec(spec), "dim": encoder.dim,
                                            "fingerprint": list(fingerprint(encoder)), "max_length": encoder.max_length}
        self.ae.check_text_encoder(encoder, spec, self.name)
        return encoder

    def _text_cond(self, captions: list[str]) -> Cond | None:
        if self.text_encoder is None:
            return None
        emb, mask = self.text_encoder.encode(captions)
        return Cond(text=emb.to(self.device), text_mask=mask.to(self.device))

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
        if self.stop is not None:
            finite = self.stop.agree(total)
            self.stopping = self.stop.agreed
        else:  # a step outside `run` (no signal handlers)
            finite = dist.all_reduce_mean(torch.isfinite(total.detach()).float().view(1)).item() == 1.0
        if not finite:
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
        self.sampler = PositionSampler(len(self.keys), cfg.batch_size, cfg.seed, self.env.rank,
                                        self.env.world_size, *self.pos, self.schedule, self.step)
        batch_bytes = cfg.batch_size * 3 * max(math.prod(b.shape) for b in self.schedule.buckets)  # uint8 clips
        workers, fewer = fit_shared_memory(cfg.num_workers, lambda w: w * PREFETCH * batch_bytes,
                                           dist.local_ranks(self.env))
        if fewer and self.env.rank == 0:
            log.warning("%s", fewer)
        loader = DataLoader(self.reader, batch_sampler=self.sampler, collate_fn=collate_clips,
                            num_workers=workers, pin_memory=self.device.type == "cuda",
                            prefetch_factor=PREFETCH if workers else None,
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
                batch = collate_clips([self.reader[(i, epoch, b, shape)] for i, *_ in batch["indices"]])
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
            video = uint8_to_float(batch["video"].to(self.device, non_blocking=True), self.uint8_values)
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
                       "skipped_clips": len(self.skipped), "peak_memory_gib": runs.peak_memory_gib(self.device)})
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


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        print(print_config_yaml(args), end="")
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
