"""``ldm train``: rectified-flow training of a DiT on latent shards with the DeepSpeed engine.

    ldm train --config launch/configs/train-debug.yaml data.shards=runs/latents steps=200
    torchrun --nproc_per_node 8 -m launch.cli train --config X.yaml          # one node
    torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:29500 ... -m launch.cli train --config X.yaml
    deepspeed --num_gpus 8 -m launch.cli train --config X.yaml

`_train` reads top to bottom: `set_up` (checks, process group, DiT, DeepSpeed engine, EMA) ->
`resume_progress` (newest checkpoint, place in the data stream) -> `open_data` -> per step
`train_step` (batch -> loss -> backward -> step -> EMA), `log_step`, `validate_step`,
`checkpoint_step` when due -> `finish`. A batch's loss: posterior sample + normalisation in
`prepare_step`, noise, timesteps and condition dropout in `flow_draws`, the velocity loss per sample
(where a weighting over timesteps goes) in `flow_step_loss`. Everything random is drawn from
per-sample generators seeded by (seed, the sample's place in the global data stream), and the
stream is deterministic in (seed, epoch), so a resumed run, or one on another number of ranks,
repeats an uninterrupted one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import dit
from data.manifest import Manifest, load_manifest, load_manifests, shard_folders
from data.shards import LatentShards, as_batched, content_fingerprint, shard_urls
from dit import Export, save_export
from launch import dist, runs
from launch.engine import (EMA, EngineConfig, apply_activation_checkpointing, deepspeed_config,
                           deepspeed_patches_undone, gather_universal, mfu, peak_flops, resolve_precision,
                           resolve_switch, safe_checkpoint_engine, scatter_universal, skip_cpu_shm_kernel,
                           slow_engine_warning)
from ldm import config as cfglib
from ldm import flow
from ldm.checkpoint import atomic_write_json, load_tensors, read_json, save_tensors
from ldm.errors import UserError, check_min, checking
from ldm.latent import VARLEN_AXIS, Cond, Latent, normalize
from ldm.layers import COMPILE_MODES, compile_blocks

log = logging.getLogger("ldm.train")


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # an `ldm extract` output folder, or several comma-separated (same autoencoder)
    weights: tuple[float, ...] = ()  # share of the stream per data.shards folder, e.g. [3, 1]; () = every clip once
    batch_size: int = 8  # per rank, per micro-step (with buckets: for the cheapest shape)
    shuffle: int = 256
    num_workers: int = 0  # DataLoader worker processes reading shards (0: read in the prefetch thread)
    prefetch: int = 2  # micro-batches prepared ahead by a background thread (read, draws, pinned); 0 = inline
    normalize: bool = True  # standardise latents with the manifest's per-channel statistics
    sample_posterior: bool = True  # z ~ N(mean, exp(logvar)) when the shards store a posterior
    split: str = "sample"  # "sample": every clip once per epoch across ranks; "shard": whole shards per rank
    buckets: bool = False  # batch by latent shape (mixed resolutions / lengths in one run)
    bucket_batch: dict[str, int] = field(default_factory=dict)  # per-bucket batch size, e.g. {"z=4x5x8x8": 8}
    bucket_sizing: str = "compute"  # compute: batch_size for the cheapest shape, fewer samples of costlier ones
    #                                 (equal DiT FLOPs per step, no more tokens); fixed: batch_size for all


@dataclass(frozen=True)
class ModelConfig:
    dit: str = "dit-debug"
    overrides: dict[str, Any] = field(default_factory=dict)  # DiTConfig fields (hidden, depth, patch, ...)
    init: str = ""  # start from the EMA weights of an `ldm train` run or export (progressive training)
    sequence_parallel: int = 1  # ranks that split one sample's tokens (DeepSpeed-Ulysses); a divisor of the world size
    class_cond: bool = True  # condition on class ids (count from the manifest)
    text_cond: bool = True  # condition on cached text embeddings (when the shards have them)
    pack: bool = False  # varlen batches as one packed row (valid tokens only) instead of padded rows
    compile: bool | str = "auto"  # regional torch.compile of the transformer blocks: true | false | auto (on for CUDA)
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs (ldm.layers.COMPILE_MODES)


@dataclass(frozen=True)
class FlowConfig:
    timesteps: str = "logit_normal"  # uniform | logit_normal
    loc: float = 0.0
    scale: float = 1.0
    shift: float = 1.0  # resolution/length shift of the timesteps (SD3); 1 = none
    cond_dropout: float = 0.1  # probability of the null condition (class and text), for classifier-free guidance
    class_dropout: float = 0.0  # extra, independent: drop only the class (so text alone can guide)
    text_dropout: float = 0.0  # extra, independent: drop only the text (so a class alone can guide)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    schedule: str = "constant"  # constant | cosine (after warm-up; runs.lr_factor)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass(frozen=True)
class ValConfig:
    shards: str = ""  # held-out `ldm extract` folder(s) of the training latents' autoencoder; "" = no validation
    every: int = 0  # steps between validation losses; 0 = at every checkpoint (save_every) and the last step
    clips: int = 256  # its first clips used, rounded down to whole global batches
    timesteps: int = 8  # the loss at t = (k + 0.5) / timesteps, k = 0..timesteps-1, averaged


@dataclass(frozen=True)
class TrainConfig:
    output: str = "runs/dit"
    steps: int = 1000
    seed: int = 0
    ema_decay: float = 0.999
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    max_nonfinite: int = 10  # non-finite losses in a row that stop the run (runs.NonFiniteGuard)
    universal_checkpoints: bool = True  # also save topology-independent state (resume on any world size/stage)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    profile: runs.ProfileConfig = field(default_factory=runs.ProfileConfig)  # torch.profiler window -> OUTPUT/profile
    val: ValConfig = field(default_factory=ValConfig)  # validation loss on held-out latents (logged as val_loss)


# settings that may change when a run is resumed; every other key of TrainConfig binds the run
# folder (runs.check_binding). The per-rank batch, accumulation and sequence parallelism follow
# the topology: the global batch they make is bound instead; the shard folders' path may change,
# their content (latents.content) is bound.
HARMLESS = ("output", "data.shards", "log_every", "save_every", "keep_checkpoints", "max_nonfinite",
            "universal_checkpoints", "data.num_workers", "data.prefetch", "data.batch_size", "optim.grad_accum",
            "model.sequence_parallel", "model.compile", "model.compile_mode", "engine.deepspeed",
            "engine.activation_checkpointing", "engine.peak_tflops", "engine.precision", "profile", "val")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="training YAML, or a built-in one by name (train-debug, hivae-generator)")
    p.add_argument(runs.ALLOW_FLAG, dest="allow_change", action="append", metavar="KEY[,KEY]", help=runs.ALLOW_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=4 engine.deepspeed=zero3")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML) and exit; reads and writes nothing")


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        with checking():
            print(cfglib.resolved_yaml(args.config, TrainConfig, args.overrides), end="")
        return 0
    cfg = cfglib.load_yaml(args.config, TrainConfig, args.overrides)
    summary = train(cfg, runs.parse_allow(args.allow_change))
    return runs.stopped_exit_code(summary)


def run_binding(cfg: TrainConfig, manifest: Manifest, world_size: int, precision: str) -> dict[str, Any]:
    """What the run folder is bound to: the settings except ``HARMLESS``, the global batch, the
    precision, and the latents (their autoencoder, its config and weights hashes, shapes, clips,
    and ``content_fingerprint`` of the folders: the same at another path)."""
    ae = manifest.autoencoder
    dp_world = max(world_size // cfg.model.sequence_parallel, 1)
    facts = {"global_batch": cfg.data.batch_size * cfg.optim.grad_accum * dp_world,
             "precision": precision,
             "latents": {"autoencoder": ae.name, "config_hash": ae.config_hash, "checkpoint_hash": ae.checkpoint_hash,
                         "shapes": list(manifest.latent_shapes) or manifest.latent_spec["latent_shape"],
                         "clips": manifest.counts.written,
                         "content": content_fingerprint(shard_folders(cfg.data.shards))}}
    return runs.binding_record(cfglib.to_dict(cfg), HARMLESS, facts)


def sample_generators(seed: int, positions: list[int]) -> list[torch.Generator]:
    """One generator per sample, seeded by the sample's place in the global data stream: a sample
    draws the same posterior noise, timestep, flow noise and dropout whatever rank or batch it is in,
    so runs on different topologies (and resumed runs) compute the same losses."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(p)) for p in positions]


def _per_sample(gens: list[torch.Generator], draw) -> torch.Tensor:
    return torch.stack([draw(g) for g in gens])


def per_sample_normal(gens: list[torch.Generator], like: torch.Tensor, lengths: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """N(0, 1) noise shaped like ``like`` ``(B, ...)``, sample i from ``gens[i]``. With ``lengths``
    (a varlen batch, parts padded along ``VARLEN_AXIS``) sample i is drawn at its own length and
    zero-padded, so its noise -- and every draw after it -- does not depend on the padded length,
    i.e. on which other samples share its batch (rank count, batch size)."""
    if lengths is None:
        return _per_sample(gens, lambda g: torch.randn(like.shape[1:], generator=g))
    out = torch.zeros(like.shape)
    for i, g in enumerate(gens):
        shape = list(like.shape[1:])
        shape[VARLEN_AXIS - 1] = int(lengths[i])
        out[i].narrow(VARLEN_AXIS - 1, 0, shape[VARLEN_AXIS - 1]).copy_(torch.randn(shape, generator=g))
    return out


def _lengths(latent: Latent) -> torch.Tensor | None:
    return latent.aux["length"].cpu() if latent.form == "varlen" else None


def sample_posterior(latent: Latent, gens: list[torch.Generator]) -> Latent:
    """z ~ N(mean, exp(logvar)) for the parts with a posterior, with per-sample generators."""
    parts = dict(latent.parts)
    for k, lv in latent.logvar.items():
        eps = per_sample_normal(gens, lv, _lengths(latent)).to(lv.device, lv.dtype)
        parts[k] = parts[k] + torch.exp(0.5 * lv) * eps
    return Latent(parts, latent.form, {}, dict(latent.aux))


def dit_overrides(model: ModelConfig, manifest: Manifest) -> dict[str, Any]:
    """``model.overrides`` plus the class and text conditioning the shards carry (unless switched off)."""
    overrides = dict(model.overrides)
    if model.class_cond and manifest.num_classes > 0:
        overrides.setdefault("num_classes", manifest.num_classes)
    if model.text_cond and manifest.text_dim:
        overrides.setdefault("text_dim", manifest.text_dim)
    return overrides


def make_dit_config(model: ModelConfig, manifest: Manifest) -> dit.DiTConfig:
    """The DiT config ``model`` names for the latents of ``manifest``."""
    return dit.make_config(model.dit, manifest.parts, **dit_overrides(model, manifest))


def latent_norm_stats(dcfg: DataConfig, manifest: Manifest) -> dict[str, dict[str, list[float]]]:
    """Per-part, per-channel mean/std the trainer standardises with (and sampling undoes): the
    manifest's statistics, with the std of posterior samples when z is sampled from the posterior."""
    if not dcfg.normalize:
        return {}
    key = "sample_std" if dcfg.sample_posterior else "std"
    return {part: {"mean": st["mean"], "std": st.get(key, st["std"])} for part, st in manifest.stats.items()}


def norm_change(config_json: Path, latent_norm: dict[str, dict[str, list[float]]]) -> float:
    """How far ``latent_norm`` is from the one the run's last start recorded in ``config.json``: the
    largest change of a channel's mean or std, in that channel's old std (0 when none is recorded)."""
    try:
        old = read_json(config_json)["export"]["latent_norm"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    if set(old) != set(latent_norm):
        return math.inf if old or latent_norm else 0.0
    return max((max(abs(nm - om), abs(ns - os_)) / max(os_, 1e-12)
                for part, new in latent_norm.items()
                for nm, ns, om, os_ in zip(new["mean"], new["std"], old[part]["mean"], old[part]["std"])), default=0.0)


def export_context(manifest: Manifest, latent_norm: dict[str, dict[str, list[float]]],
                   flow_shift: float = 1.0) -> Export:
    """What an export of this run records for sampling (``dit.Export``)."""
    return Export(autoencoder=manifest.autoencoder, video=manifest.video, latent_spec=manifest.latent_spec,
                  form=manifest.form, latent_norm=latent_norm, text_encoder=manifest.text_encoder,
                  text_dim=manifest.text_dim, text_fingerprint=manifest.text_fingerprint,
                  text_max_length=manifest.text_max_length,
                  text_tokens=manifest.text_tokens, num_classes=manifest.num_classes,
                  class_names=manifest.class_names, flow_shift=flow_shift, mixed_shapes=manifest.mixed_shapes)


def batch_cond(batch: dict, dcfg: dit.DiTConfig) -> Cond:
    c = batch["cond"]
    class_id = c["class_id"] if dcfg.num_classes else None
    text = text_mask = None
    if dcfg.text_dim:
        if "text_emb" not in c:
            raise ValueError("the DiT is text-conditioned but the shards have no cached text embeddings "
                             "(extract with --text-encoder, or set model.text_cond=false)")
        text, text_mask = c["text_emb"], c["text_mask"]
        # a clip without a caption trains the null text, as shards made since cache it (no tokens); older ones
        # cached the empty caption's tokens
        text_mask = text_mask & torch.tensor([bool(cap) for cap in c["caption"]], device=text_mask.device)[:, None]
        text = text * text_mask[..., None]
    return Cond(text=text, text_mask=text_mask, class_id=class_id)


def batch_work(model, latent: Latent, context: int) -> torch.Tensor:
    """``(tokens, training FLOPs)`` of one batch through the DiT trunk (`VideoDiT.trunk_flops`: each
    block's attention over its own groups), counted per sample at its real size: a varlen sample at
    its own length, a bucket at its own shape (not the manifest's)."""
    lengths = _lengths(latent)
    tokens = flops = 0.0
    for i in range(latent.batch_size):
        shape = {k: list(v.shape[1:]) for k, v in latent.parts.items()}
        if lengths is not None:
            for s in shape.values():
                s[VARLEN_AXIS - 1] = int(lengths[i])
        parts = {k: tuple(s) for k, s in shape.items()}
        tokens += model.num_tokens(parts)
        flops += 3 * model.trunk_flops(parts, context)
    return torch.tensor([tokens, flops], dtype=torch.float64)


def flow_draws(latent: Latent, fcfg: FlowConfig, gens: list[torch.Generator]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample random draws of one flow step, in a fixed order from each sample's generator:
    timestep ``t (B,)``, noise per part (varlen samples at their own length), and ``u (B, 3)``
    (uniforms deciding condition / class / text dropout)."""
    device = next(iter(latent.parts.values())).device
    t = torch.cat([flow.sample_timesteps(1, distribution=fcfg.timesteps, loc=fcfg.loc, scale=fcfg.scale,
                                         shift=fcfg.shift, generator=g) for g in gens]).to(device)
    noise = {k: per_sample_normal(gens, v, _lengths(latent)).to(device, v.dtype) for k, v in latent.parts.items()}
    u = _per_sample(gens, lambda g: torch.rand(3, generator=g)).to(device)  # (B, 3)
    return t, noise, u


def flow_step_loss(model, latent: Latent, cond: Cond, fcfg: FlowConfig,
                   draws: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor], null_cond,
                   pack: bool = False) -> torch.Tensor:
    """One rectified-flow loss on a batch (per-sample losses averaged). ``draws`` are the step's
    per-sample random draws ``(t, noise, u)`` from ``flow_draws``. ``null_cond(cond, drop)``
    replaces the condition of dropped samples (CFG training). ``pack``: the DiT runs the batch
    packed (``VideoDiT.forward(pack=True)``)."""
    t, noise, u = draws
    drop, drop_class, drop_text = u[:, 0] < fcfg.cond_dropout, u[:, 1] < fcfg.class_dropout, u[:, 2] < fcfg.text_dropout
    x_t = latent.replace(flow.interpolate(latent.parts, noise, t))
    cond = null_cond(cond, drop)
    if cond.class_id is not None and fcfg.class_dropout > 0:
        cond.class_id = torch.where(drop_class, -1, cond.class_id)
    if cond.text is not None and fcfg.text_dropout > 0:
        text_only = null_cond(Cond(text=cond.text, text_mask=cond.text_mask), drop_text)
        cond.text, cond.text_mask = text_only.text, text_only.text_mask
    v = model(x_t, t, cond, pack=True) if pack else model(x_t, t, cond)
    mask = None
    if latent.form == "varlen":
        valid = latent.padding_mask()
        mask = {k: flow.expand_mask(valid, p, 2) for k, p in latent.parts.items() if p.ndim == 5}
    per_sample = flow.flow_loss(v, flow.velocity_target(latent.parts, noise), mask)  # (B,): weight by t here
    return per_sample.mean()


@dataclass
class StepInputs:
    """One micro-batch made ready on the host: the latent (posterior-sampled, normalised), its
    condition, the flow draws ``(t, noise, u)`` and its ``(tokens, FLOPs)``; where its first clip is
    in the data stream (``(epoch, epoch_start)`` of its meta) and its clips per data.shards folder.
    Everything random here comes from the per-sample generators, so it can be prepared ahead in
    another thread."""

    latent: Latent
    cond: Cond
    draws: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]
    work: torch.Tensor
    stream: tuple[int, int] = (0, 0)
    sources: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))

    def pin_memory(self) -> "StepInputs":
        t, noise, u = self.draws
        pin = lambda x: None if x is None else x.pin_memory()  # noqa: E731
        return StepInputs(self.latent.pin_memory(), Cond(*(pin(x) for x in (self.cond.text, self.cond.text_mask,
                                                                             None, self.cond.class_id))),
                          (t.pin_memory(), {k: v.pin_memory() for k, v in noise.items()}, u.pin_memory()), self.work,
                          self.stream, self.sources)

    def to(self, device: torch.device) -> "StepInputs":
        """On ``device``; asynchronous from pinned memory."""
        move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        t, noise, u = self.draws
        return StepInputs(self.latent.to(device, non_blocking=True),
                          Cond(*(move(x) for x in (self.cond.text, self.cond.text_mask, None, self.cond.class_id))),
                          (move(t), {k: move(v) for k, v in noise.items()}, move(u)), self.work, self.stream,
                          self.sources)


def prepare_step(batch: dict, cfg: TrainConfig, dcfg: dit.DiTConfig, latent_norm: dict, model, context: int,
                 folders: int = 1) -> StepInputs:
    """A reader's batch -> ``StepInputs`` (host tensors): posterior sample, normalisation, flow
    draws, condition, work count, stream place, clips per folder (of ``folders``)."""
    meta = batch["meta"]
    gens = sample_generators(cfg.seed, [m["position"] for m in meta])
    latent = standardized(batch["latent"], cfg.data, latent_norm, gens)
    draws = flow_draws(latent, cfg.flow, gens)
    sources = torch.bincount(torch.tensor([m["source"] for m in meta]), minlength=folders).double()
    return StepInputs(latent, batch_cond(batch, dcfg), draws, batch_work(model, latent, context),
                      (meta[0]["epoch"], meta[0]["epoch_start"]), sources)


def standardized(latent: Latent, dcfg: DataConfig, latent_norm: dict, gens: list[torch.Generator]) -> Latent:
    """A batch's latent as the DiT sees it: a posterior sample (``data.sample_posterior``, drawn
    from the per-sample generators), standardised with the training statistics."""
    if dcfg.sample_posterior and latent.logvar:
        latent = sample_posterior(latent, gens)
    return normalize(latent, latent_norm)


def check_val_shards(cfg: TrainConfig, manifest: Manifest, dcfg: dit.DiTConfig, world: int) -> int:
    """``val.shards`` holds latents the run can be validated on (same autoencoder, latent shape and
    text encoder; class ids the DiT knows, named as data.shards names them), at least one global
    batch of them; `UserError` otherwise. Returns the clips used: ``val.clips`` rounded down to
    whole global batches."""
    if cfg.data.buckets:
        raise UserError("val.shards with data.buckets=true: the validation loss reads one latent shape; train "
                        "without buckets or leave val.shards empty")
    check_extract_folders("val.shards", cfg.val.shards)
    with checking("val.shards"):
        val = load_manifests(cfg.val.shards)
    ae, own = val.autoencoder, manifest.autoencoder
    if (ae.config_hash, ae.checkpoint_hash) != (own.config_hash, own.checkpoint_hash):
        raise UserError(f"val.shards was extracted with another autoencoder ({ae.name}) than data.shards "
                        f"({own.name}); validate on latents of the same weights")
    if val.mixed_shapes or val.parts != manifest.parts:
        raise UserError(f"val.shards holds latents of shape {val.latent_spec['latent_shape']}, data.shards "
                        f"{manifest.latent_spec['latent_shape']}; extract the held-out clips at the same size")
    if dcfg.text_dim and (val.text_encoder, val.text_fingerprint) != (manifest.text_encoder,
                                                                       manifest.text_fingerprint):
        raise UserError(f"val.shards holds captions of text encoder {val.text_encoder}, data.shards of "
                        f"{manifest.text_encoder}; extract the held-out clips with the same --text-encoder")
    if dcfg.num_classes and val.num_classes > dcfg.num_classes:
        raise UserError(f"val.shards holds class ids up to {val.num_classes - 1}; the DiT knows "
                        f"{dcfg.num_classes} classes")
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(val.class_names, manifest.class_names)) if a != b]
    if dcfg.num_classes and differ:
        i, a, b = differ[0]
        raise UserError(f"val.shards names its classes differently than data.shards (class id {i}: {a!r} vs {b!r}): "
                        "its ids would mean other classes; extract the held-out clips with the same --classes list")
    global_batch = cfg.data.batch_size * max(world // cfg.model.sequence_parallel, 1)
    used = min(cfg.val.clips, val.counts.written) // global_batch * global_batch
    if not used:
        raise UserError(f"val.shards: {min(cfg.val.clips, val.counts.written)} clips (val.clips "
                        f"{cfg.val.clips}, {val.counts.written} in the folders) make no global batch of "
                        f"{global_batch} (data.batch_size x data-parallel ranks)")
    return used


def validation_loss(engine, batches, cfg: TrainConfig, dcfg: dit.DiTConfig, latent_norm: dict, null_cond,
                    device: torch.device) -> float:
    """The flow loss on held-out ``batches`` (this rank's share), averaged over every rank, clip and
    the ``val.timesteps`` fixed timesteps, with the conditions kept (no dropout). A clip's posterior
    sample and noise come from generators seeded by its place in the held-out stream, so every
    evaluation sees the same draws and the curve shows the model, not the draws."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of per-clip losses, clips)
    k = cfg.val.timesteps
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            gens = sample_generators(cfg.seed, [m["position"] for m in batch["meta"]])
            latent = standardized(batch["latent"], cfg.data, latent_norm, gens)
            n, lengths = latent.batch_size, _lengths(latent)
            # the clips and conditions moved once; u = 1: no condition dropped
            held = StepInputs(latent, batch_cond(batch, dcfg), (torch.zeros(n), {}, torch.ones(n, 3)),
                              torch.zeros(2)).to(device)
            keep = held.draws[2]
            for i in range(k):
                t = torch.full((n,), (i + 0.5) / k, device=device)
                noise = {p: per_sample_normal(gens, v, lengths).to(device, v.dtype) for p, v in latent.parts.items()}
                loss = flow_step_loss(engine, held.latent, held.cond, cfg.flow, (t, noise, keep), null_cond,
                                      pack=cfg.model.pack)
                total += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=device)])
    engine.train()
    loss_sum, clips = dist.all_reduce_mean(total).tolist()
    return loss_sum / clips


def reader_start(workers: int, device: torch.device) -> str | None:
    """How the shard reader processes start: spawned on CUDA (processes forked after CUDA / NCCL
    threads exist can deadlock), the platform's default (fork on Linux) elsewhere."""
    return "spawn" if workers and device.type == "cuda" else None


class Prefetcher:
    """Runs ``make(item)`` over ``source`` in a background thread, ``depth`` items ahead (pinned
    when ``pin``), so reading shards and drawing noise overlap the GPU's work. Errors in the
    thread are raised in the caller at the item where they happened. ``depth=0``: inline."""

    _END = object()

    def __init__(self, source, make, depth: int, pin: bool):
        import queue
        import threading

        self.source, self.make, self.pin, self.depth = iter(source), make, pin, depth
        if depth > 0:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._fill, name="ldm-prefetch", daemon=True)
            self.thread.start()

    def _one(self):
        item = self.make(next(self.source))
        return item.pin_memory() if self.pin else item

    def _fill(self) -> None:
        import queue

        while not self.stop.is_set():
            try:
                item = self._one()
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self):
        if self.depth == 0:
            return self._one()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self.depth > 0:
            self.stop.set()
            self.thread.join(timeout=5)


def bucket_batch_sizes(manifest: Manifest, dcfg_data: DataConfig, model) -> dict[str, int]:
    """Per-shape batch sizes for bucketed training. ``compute``: every bucket's batch costs the
    same DiT FLOPs, so ranks stepping on different shapes finish together and long clips do not
    stall the others. ``batch_size`` is the batch of the cheapest shape: a longer shape costs more
    per token (attention is quadratic in tokens), so its equal-cost batch has fewer tokens and
    needs no more activation memory than the cheapest shape's batch, which is the one to size to
    the GPU. A shape of which even one sample costs more than that batch gets 1 (warned: its
    steps take longer and need more memory). ``fixed``: ``batch_size`` for every shape. Explicit
    ``bucket_batch`` entries win."""
    sizes: dict[str, int] = {}
    if dcfg_data.bucket_sizing not in ("compute", "fixed"):
        raise ValueError(f"data.bucket_sizing must be compute or fixed, got {dcfg_data.bucket_sizing!r}")
    if dcfg_data.bucket_sizing == "compute":
        shapes = manifest.latent_shapes or (manifest.latent_spec["latent_shape"],)
        cost: dict[str, tuple[int, int]] = {}  # key -> (tokens, forward FLOPs) of one sample
        for parts in shapes:
            key = ";".join(f"{k}={'x'.join(map(str, v))}" for k, v in sorted(parts.items()))
            shape = {k: tuple(v) for k, v in parts.items()}
            cost[key] = model.num_tokens(shape), model.trunk_flops(shape)
        n_min, f_min = min(cost.values(), key=lambda c: c[1])
        budget = dcfg_data.batch_size * f_min  # the FLOPs of every step
        for key, (n, f) in cost.items():
            sizes[key] = max(1, int(budget / f))
            if f > budget:
                log.warning("bucket %s: one sample costs %.1fx the FLOPs of a step of the cheapest shape's batch "
                            "(%d x %d tokens) and has %.1fx its tokens: its steps take longer and need more memory; "
                            "raise data.batch_size or set data.bucket_batch", key, f / budget,
                            dcfg_data.batch_size, n_min, n / (dcfg_data.batch_size * n_min))
    sizes.update(dcfg_data.bucket_batch)
    log.info("batch size per shape bucket: %s", ", ".join(f"{k}: {b}" for k, b in sizes.items()))
    return sizes


def init_weights(path: str, dcfg: dit.DiTConfig, manifest: Manifest, load: bool = True
                 ) -> dict[str, torch.Tensor] | None:
    """The EMA weights of the ``ldm train`` run or export at ``path`` (``model.init``) for a DiT of
    ``dcfg`` on ``manifest``'s latents (None with ``load=False``: only checked). Every parameter must
    be there with its shape; clip length and resolution may differ (RoPE positions, no learned
    position table), the autoencoder may not (`UserError` saying which)."""
    from launch.sample import check_export, export_weights
    from safetensors import safe_open

    check_export(path, flag="model.init")
    with checking(f"model.init={path}"):
        trained, weights = export_weights(path)
    if trained.autoencoder.config_hash != manifest.autoencoder.config_hash:
        raise UserError(f"model.init={path} was trained on latents of {trained.autoencoder.name}, data.shards holds "
                        f"latents of {manifest.autoencoder.name}: a DiT continues on its own autoencoder's latents")
    if trained.autoencoder.checkpoint_hash != manifest.autoencoder.checkpoint_hash:
        log.warning("model.init=%s was trained on latents of other %s weights than data.shards", path,
                    manifest.autoencoder.name)
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in dit.VideoDiT(dcfg).state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # missing, truncated or not safetensors (the Rust reader's own error types)
        raise UserError(f"model.init={path}: {weights} cannot be read ({e}); give a finished run's folder") from None
    wrong = [f"{k} {found[k]} (this DiT: {wanted[k]})" for k in wanted if k in found and found[k] != wanted[k]]
    missing, extra = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    if wrong or missing or extra:
        what = "; ".join(wrong[:2] + [f"missing {', '.join(missing[:2])}"] * bool(missing) +
                         [f"not in this DiT: {', '.join(extra[:2])}"] * bool(extra))
        raise UserError(f"model.init={path} is another DiT than this run's: {what} (it needs the same model.dit, "
                        "model.overrides and conditioning: class count, text width)")
    return load_tensors(weights) if load else None


def check_ranges(cfg: TrainConfig) -> None:
    """The numbers and choices of ``cfg`` are in range (`UserError` naming the key otherwise)."""
    check_min({"steps": cfg.steps, "log_every": cfg.log_every, "save_every": cfg.save_every,
               "keep_checkpoints": cfg.keep_checkpoints, "max_nonfinite": cfg.max_nonfinite,
               "data.batch_size": cfg.data.batch_size, "model.sequence_parallel": cfg.model.sequence_parallel,
               "optim.grad_accum": cfg.optim.grad_accum,
               **{f"data.bucket_batch.{k}": v for k, v in cfg.data.bucket_batch.items()}}, 1)
    check_min({"data.shuffle": cfg.data.shuffle, "data.num_workers": cfg.data.num_workers,
               "data.prefetch": cfg.data.prefetch, "optim.warmup_steps": cfg.optim.warmup_steps,
               "profile.start": cfg.profile.start, "profile.steps": cfg.profile.steps, "val.every": cfg.val.every},
              0)
    check_min({"val.clips": cfg.val.clips, "val.timesteps": cfg.val.timesteps}, 1)
    if not cfg.optim.lr > 0 or cfg.optim.weight_decay < 0 or cfg.optim.grad_clip < 0:
        raise UserError(f"need optim.lr > 0, optim.weight_decay >= 0, optim.grad_clip >= 0; got {cfg.optim.lr}, "
                        f"{cfg.optim.weight_decay}, {cfg.optim.grad_clip}")
    fractions = {"ema_decay": cfg.ema_decay, "optim.min_lr_ratio": cfg.optim.min_lr_ratio,
                 "flow.cond_dropout": cfg.flow.cond_dropout, "flow.class_dropout": cfg.flow.class_dropout,
                 "flow.text_dropout": cfg.flow.text_dropout, "optim.betas[0]": cfg.optim.betas[0],
                 "optim.betas[1]": cfg.optim.betas[1]}
    for key, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{key} must be in [0, 1], got {value}")
    if not cfg.flow.scale > 0 or not cfg.flow.shift > 0:
        raise UserError(f"flow.scale and flow.shift must be > 0, got {cfg.flow.scale}, {cfg.flow.shift}")
    choices = {"optim.schedule": (cfg.optim.schedule, ("constant", "cosine")),
               "flow.timesteps": (cfg.flow.timesteps, ("uniform", "logit_normal")),
               "data.split": (cfg.data.split, ("sample", "shard")),
               "data.bucket_sizing": (cfg.data.bucket_sizing, ("compute", "fixed")),
               "model.compile_mode": (cfg.model.compile_mode, COMPILE_MODES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def check_sequence_parallel(sp: int, world: int, heads: int) -> None:
    """``model.sequence_parallel`` fits the launch and the DiT (``UserError`` otherwise): it divides
    the world size, and the attention heads split over its ranks."""
    if world % sp:
        raise UserError(f"model.sequence_parallel={sp} must divide the world size {world} (the ranks "
                        f"launched); launch a multiple of {sp} ranks or give a divisor of {world}")
    if heads % sp:
        raise UserError(f"model.sequence_parallel={sp} splits the attention heads over its ranks: the DiT's "
                        f"{heads} heads are not divisible by {sp}; give a divisor of {heads} or other "
                        "model.overrides.heads")


def check_extract_folders(key: str, spec: str) -> None:
    """Each folder of ``spec`` (comma-separated) holds an extraction's manifest (`UserError` naming ``key``)."""
    for folder in shard_folders(spec):
        if not (Path(folder) / "manifest.json").is_file():
            what = "not found" if not Path(folder).exists() else "has no manifest.json"
            raise UserError(f"{key}: {folder} {what}; give an `ldm extract` output folder")


def data_mix(cfg: TrainConfig) -> list[tuple[str, int, float]]:
    """``(folder, clips, share of the stream)`` per folder of ``data.shards``, checked (`UserError`
    naming the key): one ``data.weights`` entry per folder, each > 0, and with text conditioning the
    same text encoder in every folder. Without weights a folder's share is its share of the clips."""
    folders = shard_folders(cfg.data.shards)
    with checking("data.shards"):
        manifests = [load_manifest(f) for f in folders]
    weights = cfg.data.weights
    if weights and len(weights) != len(folders):
        raise UserError(f"data.weights has {len(weights)} weights for the {len(folders)} folders of data.shards; "
                        "give one per folder, in the same order")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"data.weights must all be > 0, got {list(weights)}; leave a folder out of data.shards "
                        "to train without it")
    first = manifests[0]
    for folder, m in zip(folders[1:], manifests[1:]):
        if cfg.model.text_cond and (m.text_encoder, m.text_fingerprint) != (first.text_encoder, first.text_fingerprint):
            raise UserError(f"data.shards: {folder} holds captions of text encoder {m.text_encoder}, {folders[0]} of "
                            f"{first.text_encoder}; extract both with the same --text-encoder, or set "
                            "model.text_cond=false")
    clips = [max(m.counts.written, 1) for m in manifests]
    shares = weights or clips
    return [(f, n, w / sum(shares)) for f, n, w in zip(folders, clips, shares)]


def mix_rates(mix: list[tuple[str, int, float]], weighted: bool) -> tuple[float, ...]:
    """How many times per epoch each folder's clips are read to give its share of the stream, an
    epoch keeping the length of one pass over all folders; () without ``data.weights`` (each once)."""
    total = sum(n for _, n, _ in mix)
    return tuple(share * total / n for _, n, share in mix) if weighted else ()


def check_config(cfg: TrainConfig, allow_change: tuple[str, ...] = ()) -> runs.Binding:
    """Everything a run needs is usable before any work starts: value ranges, the shard folders
    and their manifests, the DiT for their latents, the DeepSpeed config, the output path, and a
    folder of an earlier run was made by these settings and latents (`UserError` naming the key
    otherwise). Returns the binding to record."""
    check_ranges(cfg)
    out = Path(cfg.output)
    runs.check_output_layout(out, "output=", ("checkpoints", "export", "tensorboard", "profile"),
                             ("log.jsonl", "config.json", runs.BINDING))
    check_extract_folders("data.shards", cfg.data.shards)
    data_mix(cfg)
    if cfg.data.weights and cfg.data.split == "shard":
        raise UserError("data.weights mixes the folders in the global stream of data.split=sample; "
                        "drop data.split=shard or data.weights")
    folders = [Path(f).resolve() for f in shard_folders(cfg.data.shards)]
    for folder in sorted({f for f in folders if folders.count(f) > 1}):
        log.warning("data.shards lists %s %d times: its clips are drawn %d times as often as the others' (list it "
                    "once unless that oversampling is meant)", folder, folders.count(folder), folders.count(folder))
    with checking():
        manifest = load_manifests(cfg.data.shards, cfg.data.weights)
        dcfg = make_dit_config(cfg.model, manifest)
        resolve_switch(cfg.model.compile, torch.device("cpu"), "model.compile")
        precision = resolve_precision(cfg.engine.precision, dist.device_for(dist.dist_env()))
        deepspeed_config(cfglib.replace(cfg.engine, precision=precision), cfg.data.batch_size, cfg.optim.grad_accum,
                         cfg.optim.grad_clip)
    if cfg.model.init and not runs.checkpoints(out / "checkpoints"):  # a resumed run continues its checkpoint
        init_weights(cfg.model.init, dcfg, manifest, load=False)
    world = dist.dist_env().world_size
    check_sequence_parallel(cfg.model.sequence_parallel, world, dcfg.heads)
    if cfg.val.shards:
        check_val_shards(cfg, manifest, dcfg, world)
    if cfg.data.split == "shard":  # each reader (data-parallel rank x loader worker) needs a shard of its own
        readers = world // cfg.model.sequence_parallel * max(1, cfg.data.num_workers)
        found = len(shard_urls(shard_folders(cfg.data.shards)))
        if found < readers:
            raise UserError(f"data.split=shard needs at least {readers} shards (data-parallel ranks x "
                            f"max(1, data.num_workers)), data.shards holds {found}; use data.split=sample, "
                            "fewer data.num_workers, or a smaller --shard-size at extraction")
    record = run_binding(cfg, manifest, world, precision)
    defaults, old = runs.defaults_of(TrainConfig), runs.bound_record(out)
    if old.get("data.shards") == cfg.data.shards:  # bound by its path before latents.content
        defaults["latents.content"] = record["latents.content"]
    dp = max(world // cfg.model.sequence_parallel, 1)
    hints = {"latents.content": "a copy of the same shards at another path needs no change; with the change allowed "
                                "a new epoch over all their clips starts at the resume"}
    if isinstance(old.get("global_batch"), int) and old["global_batch"] % dp == 0:
        hints["global_batch"] = (f"to keep {old['global_batch']} on {dp} data-parallel rank(s), set data.batch_size x "
                                 f"optim.grad_accum = {old['global_batch'] // dp}")
    return runs.check_binding(out, record, allow_change, new_folder="output=NEW_FOLDER", defaults=defaults,
                              holds_work=runs.holds_training(out), harmless=HARMLESS, hints=hints)


def train(cfg: TrainConfig, allow_change: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train per ``cfg``; ``allow_change``: keys of the binding that may differ from the run the
    output folder holds (``--allow-change``). Returns the summary (steps, logged losses, output,
    skipped samples, dropped batches, and ``stopped`` after a graceful stop)."""
    with deepspeed_patches_undone():
        try:
            return _train(cfg, allow_change)
        finally:
            runs.release_folder(cfg.output)


# ------------------------------------------------------------------------------------------
# the training loop: `_train` reads top to bottom as set-up -> resume -> data -> steps -> summary;
# each step is `train_step` (the loss and the update: the GPU's fast path), then `log_step`,
# `validate_step`, `checkpoint_step` when due. Where to change what: the loss and its weighting
# over timesteps in `flow_step_loss`; a quantity logged every log_every steps in `log_step`.
# ------------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """What the set-up builds once and every later part of a run reads: the resolved config, this
    process's place (device, data-parallel rank and world), the latents (manifest, DiT config,
    normalisation, export context, data mix) and the DeepSpeed engine with its EMA."""

    cfg: TrainConfig
    binding: runs.Binding
    env: dist.DistEnv
    device: torch.device
    out: Path
    manifest: Manifest
    dcfg: dit.DiTConfig
    latent_norm: dict[str, dict[str, list[float]]]
    context: Export
    content: Any  # the shards' names and sizes (latents.content of the binding)
    dp_rank: int
    dp_world: int
    engine: Any = None
    ema: EMA | None = None
    peak: float | None = None  # the device's peak FLOP/s (for the logged MFU), None when unknown
    mix: list[tuple[str, int, float]] = field(default_factory=list)


@dataclass
class Progress:
    """The loop's state that changes from step to step. Device tensors (``pending``: the per-step
    mean losses) are read on the host only by ``log_step`` / ``checkpoint_step`` (no per-step sync)."""

    step: int
    resumed_at: int
    dropped: int  # micro-batches dropped for non-finite losses
    position: int  # samples of the global stream read
    stream: dict[str, Any]  # what trainer.json records of the data stream
    nonfinite: runs.NonFiniteGuard
    work: torch.Tensor  # this rank's (tokens, training FLOPs) since the last log
    read: torch.Tensor  # this rank's clips per data.shards folder
    samples: int = 0  # this rank's samples since the last log (a shape bucket's batch is its own size)
    lr: float = 0.0  # the LR of the last step's update
    stopping: bool = False  # a stop was asked for (SIGTERM, Ctrl-C) on some rank
    losses: list[float] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    t_last: float = 0.0


@dataclass
class HeldOut:
    """The validation batches: every ``every`` steps, ``rounds`` batches of ``data`` (this rank's share)."""

    every: int
    rounds: int = 0
    data: Any = None


def _train(cfg: TrainConfig, allow_change: tuple[str, ...]) -> dict[str, Any]:
    run = set_up(cfg, allow_change)
    cfg = run.cfg  # with the precision resolved for the device
    progress, start = resume_progress(run)
    data, inputs, held_out = open_data(run, progress, start)
    logger = runs.RunLog(run.out, progress.step, enabled=dist.is_main())
    bar = tqdm(total=cfg.steps, initial=progress.step, desc="train", unit="step", disable=not dist.is_main())
    progress.t_last = time.perf_counter()
    profiler = runs.StepProfiler(cfg.profile, run.out / "profile", run.env.rank, progress.step,
                                 run.device.type == "cuda")
    stop = runs.StopRequest()
    try:
        while progress.step < cfg.steps and not progress.stopping:
            train_step(run, progress, inputs, stop)
            profiler.step()
            bar.update(1)
            step, last = progress.step, progress.step == cfg.steps
            if step % cfg.log_every == 0 or last or progress.stopping:  # a stop logs its last step
                log_step(run, progress, logger, bar)
            if cfg.val.shards and (step % held_out.every == 0 or last) and not progress.stopping:
                validate_step(run, progress, held_out, logger)
            if step % cfg.save_every == 0 or last or progress.stopping:
                checkpoint_step(run, progress)
    finally:
        stop.close()
        bar.close()  # an error's line then starts on a line of its own
    inputs.close()
    profiler.close()
    logger.close()
    return finish(run, progress, data, stop)


def set_up(cfg: TrainConfig, allow_change: tuple[str, ...]) -> TrainRun:
    """Checks, the process group, the latents' manifest (the same on every rank), then the engine."""
    import deepspeed

    binding = check_config(cfg, allow_change)
    runs.check_free(cfg.output, new_folder="output=NEW_FOLDER")  # a live run's folder: before any other work
    env = dist.init_distributed()
    if env.world_size == 1:
        _single_process_group()
    skip_cpu_shm_kernel()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    device = dist.device_for(env)
    cfg = cfglib.replace(cfg, engine=cfglib.replace(cfg.engine, precision=resolve_precision(cfg.engine.precision,
                                                                                            device)))
    manifest = load_manifests(cfg.data.shards, cfg.data.weights)
    latent_norm = latent_norm_stats(cfg.data, manifest)
    sp = cfg.model.sequence_parallel
    run = TrainRun(cfg, binding, env, device, Path(cfg.output), manifest, make_dit_config(cfg.model, manifest),
                   latent_norm, export_context(manifest, latent_norm, cfg.flow.shift),
                   binding.record["latents.content"], env.rank // sp, env.world_size // sp)
    if manifest.mixed_shapes and not cfg.data.buckets:
        raise UserError("the folders in data.shards hold latents of different shapes; set data.buckets=true "
                         "(and data.bucket_batch per shape) to train on them together")
    dist.check_same(json.dumps(cfglib.to_dict(cfg), sort_keys=True), "training config")
    # the shards' names and sizes: a node's incomplete copy differs
    dist.check_same(json.dumps([manifest.autoencoder.config_hash, cfglib.to_dict(manifest.counts),
                                list(manifest.shards), run.content], sort_keys=True), "latent shards (manifest)")
    run.engine, run.ema = build_engine(run)
    run.peak = peak_flops(cfg.engine)
    return run


def build_engine(run: TrainRun) -> tuple[Any, EMA]:
    """The DiT (``model.init`` weights, activation checkpointing, sequence parallelism), AdamW and
    the LR schedule in a DeepSpeed engine, its blocks compiled, and the EMA of its weights."""
    import deepspeed

    cfg, device, out = run.cfg, run.device, run.out
    use_compile = resolve_switch(cfg.model.compile, device, "model.compile")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = dit.VideoDiT(run.dcfg)
    if cfg.model.init and not runs.checkpoints(out / "checkpoints"):
        model.load_state_dict(init_weights(cfg.model.init, run.dcfg, run.manifest))
        if dist.is_main():
            log.info("started from the weights of %s (model.init)", cfg.model.init)
    if cfg.engine.activation_checkpointing:
        apply_activation_checkpointing(model.blocks)
    sp = cfg.model.sequence_parallel
    if sp > 1:  # consecutive ranks form a group that shares each batch and splits its tokens
        from launch.sequence_parallel import apply_sequence_parallel, sequence_parallel_group
        apply_sequence_parallel(model, sequence_parallel_group(sp))
    # no second run into the folder while this one lives; claimed before DeepSpeed puts the model on the device
    runs.claim_folder(out, new_folder="output=NEW_FOLDER")
    # fused AdamW on GPUs (one kernel over all tensors); DeepSpeed's ZeRO keeps fp32 master weights for it
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: runs.lr_factor(
        step, o.warmup_steps, o.schedule, cfg.steps, o.min_lr_ratio))
    ds_cfg = deepspeed_config(cfg.engine, cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.grad_clip)
    slow = slow_engine_warning(ds_cfg, cfg.engine.deepspeed)
    if slow and dist.is_main():
        log.warning(slow)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
                                           dist_init_required=False)
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    zero3 = ds_cfg["zero_optimization"]["stage"] == 3
    if use_compile:
        if zero3 or sp > 1:
            log.warning("model.compile is off: regional compilation runs with ZeRO stages 0-2 and without sequence "
                        "parallelism (their hooks gather parameters / exchange tokens inside the blocks)")
        else:
            compile_blocks(engine.module, mode=cfg.model.compile_mode)
    return engine, EMA(engine.module, cfg.ema_decay, zero3)


def resume_progress(run: TrainRun) -> tuple[Progress, tuple[int, int]]:
    """The newest checkpoint loaded (`resume`), the run's start recorded, and where the data
    stream goes on: the loop's state and the reader's ``start`` (`resume_stream`)."""
    cfg = run.cfg
    step, dropped, position, saved = resume(run.engine, run.ema, run.out, cfg.optim.lr)
    progress = Progress(step, step, dropped, position, {}, runs.NonFiniteGuard(cfg.max_nonfinite),
                        torch.zeros(2, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    if dist.is_main():
        record_start(run, step)
    if position is None:  # a checkpoint that did not record it: read with this run's batch
        progress.position = (step * cfg.optim.grad_accum + dropped) * cfg.data.batch_size * run.dp_world
    run.mix = mix = data_mix(cfg)
    progress.read = torch.zeros(len(mix), dtype=torch.float64)
    progress.stream = {"shards": cfg.data.shards, "content": run.content, "clips": run.manifest.counts.written}
    start, moved = resume_stream(saved, progress.stream, progress.position, cfg.data.split == "sample")
    if dist.is_main():
        if moved:
            print(moved, flush=True)
        if cfg.data.weights:
            print("data mix: " + ", ".join(f"{f} {share:.0%} ({n} clips, each read {r:.3g}x per epoch)"
                                           for (f, n, share), r in zip(mix, mix_rates(mix, True))), flush=True)
    return progress, start


def record_start(run: TrainRun, step: int) -> None:
    """On rank 0: the binding, a note when the latent normalisation moved since the last start, and
    ``config.json`` (the settings, the DiT config and the export context of this start)."""
    out, latent_norm = run.out, run.latent_norm
    out.mkdir(parents=True, exist_ok=True)
    if not (out / runs.BINDING).is_file() and runs.checkpoints(out / "checkpoints"):
        log.warning("%s has checkpoints but no %s (made before runs were bound): bound to this run's settings "
                    "from now on", out, runs.BINDING)
    run.binding.write()
    changed = norm_change(out / "config.json", latent_norm) if step else 0.0
    if changed > 1e-6:  # a grown folder, other data.weights or data.normalize allowed on resume
        if math.isinf(changed):
            print(f"latent normalisation switched {'on' if latent_norm else 'off'} (data.normalize) from step "
                  f"{step + 1} (exports record it)", flush=True)
        else:
            mixed = " (mixed)" if run.cfg.data.weights else ""
            print(f"latent normalisation: the per-channel statistics of data.shards{mixed} moved by "
                  f"up to {changed:.3g} std since the run last started; from step {step + 1} latents are "
                  "standardised with the new ones (exports record them)", flush=True)
    atomic_write_json(out / "config.json", {"train": cfglib.to_dict(run.cfg), "dit": cfglib.to_dict(run.dcfg),
                                            "export": run.context.to_dict()})


def open_data(run: TrainRun, progress: Progress, start: tuple[int, int]
              ) -> tuple[LatentShards, Prefetcher, HeldOut]:
    """The shard reader from the run's place in the one global stream (any topology resumes it, see
    LatentShards: the samples read so far, counted as they are read, so a resume with another global
    batch goes on from it), the prefetcher making `StepInputs` from it, and the held-out batches."""
    cfg, manifest, engine = run.cfg, run.manifest, run.engine
    parts = manifest.parts
    data = LatentShards(shard_folders(cfg.data.shards), rank=run.dp_rank, world_size=run.dp_world, seed=cfg.seed,
                        shuffle=cfg.data.shuffle, epochs=None, split=cfg.data.split,
                        skip=progress.position, rates=mix_rates(run.mix, bool(cfg.data.weights)), start=start,
                        batch_size=cfg.data.batch_size,
                        buckets=bucket_batch_sizes(manifest, cfg.data, engine.module) if cfg.data.buckets else None,
                        expect_shapes=parts if manifest.form != "varlen" and not cfg.data.buckets else None)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=as_batched, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         multiprocessing_context=reader_start(workers, run.device),
                                         worker_init_fn=runs.reader_ignores_interrupts)
    held_out = HeldOut(cfg.val.every or cfg.save_every)
    if cfg.val.shards:  # the same held-out batches at every evaluation: each rank its share of whole rounds
        held_out.rounds = check_val_shards(cfg, manifest, run.dcfg, run.env.world_size) // (cfg.data.batch_size *
                                                                                            run.dp_world)
        held_out.data = LatentShards(shard_folders(cfg.val.shards), rank=run.dp_rank, world_size=run.dp_world,
                                     seed=cfg.seed, batch_size=cfg.data.batch_size,
                                     expect_shapes=parts if manifest.form != "varlen" else None)
    text_context = 1 + manifest.text_tokens if run.dcfg.text_dim else 0  # the empty-text token + caption
    inputs = Prefetcher(loader, lambda b: prepare_step(b, cfg, run.dcfg, run.latent_norm, engine.module, text_context,
                                                      len(run.mix)),
                        cfg.data.prefetch, pin=run.device.type == "cuda")
    progress.stream["epoch"], progress.stream["epoch_start"] = start
    return data, inputs, held_out


def train_step(run: TrainRun, progress: Progress, inputs: Prefetcher, stop: runs.StopRequest) -> None:
    """One optimizer step over ``optim.grad_accum`` micro-batches: the loss (`flow_step_loss`),
    backward, DeepSpeed's step, the EMA. The GPU's fast path: one host read per micro-batch (the
    finite / stop flags, one collective); the step's mean loss stays on the device in ``pending``."""
    cfg, engine = run.cfg, run.engine
    engine.train()
    progress.lr = engine.get_lr()[0]  # this step's update's (the scheduler moves on after it)
    loss_sum, micro = torch.zeros((), device=run.device), 0
    while micro < cfg.optim.grad_accum:
        batch = next(inputs).to(run.device)
        progress.position += cfg.data.batch_size * run.dp_world  # samples of the global stream one micro-batch reads
        progress.work += batch.work
        progress.samples += batch.latent.batch_size
        progress.read += batch.sources
        progress.stream["epoch"], progress.stream["epoch_start"] = batch.stream  # rank 0's is saved: not past position
        loss = flow_step_loss(engine, batch.latent, batch.cond, cfg.flow, batch.draws, engine.module.null_cond,
                              pack=cfg.model.pack)
        # a non-finite loss on any rank drops this micro-batch on every rank (no backward, no
        # step: DeepSpeed's accumulation stays aligned); too many in a row stop the run. This is
        # the loop's one host sync per micro-batch: backward must not start on a bad loss. The
        # same read tells every rank whether any was asked to stop (SIGTERM, Ctrl-C).
        finite_mean, stop_mean = dist.all_reduce_mean(
            torch.stack([torch.isfinite(loss.detach()).float(), stop.flag(run.device)])).tolist()
        if stop_mean > 0 and not progress.stopping:
            progress.stopping = True
            stop.heard()
        try:
            applied = progress.nonfinite.check(finite_mean == 1.0, progress.step + 1, "batch dropped")
        except RuntimeError:
            inputs.close()
            raise
        if not applied:
            progress.dropped += 1
            continue
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float() / cfg.optim.grad_accum
        micro += 1
    progress.step += 1
    run.ema.update(engine.module)
    progress.pending.append(dist.all_reduce_mean(loss_sum.view(1)))


def log_step(run: TrainRun, progress: Progress, logger: runs.RunLog, bar) -> None:
    """Every ``log_every`` steps (and the last): the losses of the steps since the last log read
    from the device, and the step's loss, LR, gradient norm and throughput logged. A new quantity
    logged per step goes in the dict given to ``logger.log`` (log.jsonl and TensorBoard)."""
    done = torch.cat(progress.pending).tolist()
    progress.losses += done
    progress.pending.clear()
    loss_mean = done[-1]
    bar.set_postfix(loss=f"{loss_mean:.4f}")
    now, step = time.perf_counter(), progress.step
    # every rank of a sequence-parallel group counts the same samples: mean x dp_world = all work
    work = torch.cat([progress.work, progress.work.new_tensor([progress.samples])])
    tokens_s, flops_s, samples_s = (dist.all_reduce_mean(work) * run.dp_world
                                    / max(now - progress.t_last, 1e-9)).tolist()
    progress.work.zero_()
    progress.samples = 0
    grad_norm = run.engine.get_global_grad_norm()
    logger.log(step, {"loss": loss_mean, "lr": progress.lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "samples_per_s": samples_s,
                      "tokens_per_s": tokens_s,
                      "tflops_per_s": flops_s / 1e12,
                      "mfu": mfu(flops_s / run.env.world_size, run.peak)})
    progress.t_last = now


def validate_step(run: TrainRun, progress: Progress, held_out: HeldOut, logger: runs.RunLog) -> None:
    """The validation loss on the held-out batches, logged as val_loss."""
    loss = validation_loss(run.engine, itertools.islice(held_out.data, held_out.rounds), run.cfg, run.dcfg,
                           run.latent_norm, run.engine.module.null_cond, run.device)
    progress.val_losses.append((progress.step, loss))
    logger.log(progress.step, {"val_loss": loss}, group="val")


def checkpoint_step(run: TrainRun, progress: Progress) -> None:
    """A checkpoint (and the export) of this step; the losses not yet read are read first."""
    if progress.pending:
        progress.losses += torch.cat(progress.pending).tolist()
        progress.pending.clear()
    save_checkpoint(run.engine, run.ema, run.out, progress.step, progress.dropped, progress.position, progress.stream,
                    run.cfg.keep_checkpoints, run.dcfg, run.context, run.cfg.universal_checkpoints)


def finish(run: TrainRun, progress: Progress, data: LatentShards, stop: runs.StopRequest) -> dict[str, Any]:
    """After the loop: the export of a finished run started again, the clips read per folder, the
    closing line (or the stop's) on rank 0, and the summary `train` returns."""
    cfg, out, step = run.cfg, run.out, progress.step
    if step == progress.resumed_at and dist.is_main():  # a finished run again: its export (a full disk may have cut it)
        write_export(out, run.ema, run.dcfg, run.context, step)
    dist.barrier()
    # every rank of a sequence-parallel group reads the same clips: mean x dp_world = all clips read
    read_by = Counter()  # a folder listed twice in data.shards counts once
    for (folder, _, _), n in zip(run.mix, (dist.all_reduce_mean(progress.read) * run.dp_world).round().long().tolist()):
        read_by[folder] += n
    losses, val_losses = progress.losses, progress.val_losses
    summary = {"steps": step, "losses": losses, "output": str(out), "skipped": dict(data.skipped),
               "dropped_batches": progress.dropped, "val_losses": val_losses, "read": dict(read_by)}
    total = sum(read_by.values())
    mixed = ("\n  clips read by this run: " + ", ".join(f"{f} {n / total:.1%} ({n})" for f, n in read_by.items())
             if len(read_by) > 1 and total else "")  # a job stopped at its time limit shows it too
    if progress.stopping and step < cfg.steps:
        summary["stopped"] = stop.cause
        if dist.is_main():
            print(stop.message(step, cfg.steps, out) + mixed, flush=True)
    elif dist.is_main():
        last = f", last logged loss {losses[-1]:.4f}" if losses else ""
        last += f", validation loss {val_losses[-1][1]:.4f}" if val_losses else ""
        bad = f"; skipped {sum(data.skipped.values())} bad samples ({dict(data.skipped)})" if data.skipped else ""
        print(f"trained to step {step}{last} -> {out / 'export'}{bad}{mixed}\n"
              f"  sample it: ldm sample --checkpoint {out} {sample_conditions(run.dcfg, run.context)} --output DIR",
              flush=True)
    return summary


def sample_conditions(dcfg: dit.DiTConfig, context: Export) -> str:
    """The conditions of the closing line's `ldm sample` hint: ``--prompt`` and/or ``--class``
    (with the class names of the extraction when it kept them), else ``--unconditional``."""
    names = context.class_names
    example = f", e.g. {names[0]!r}" if names and " " in names[0] else f", e.g. {names[0]}" if names else ""
    how = (["--prompt TEXT"] if dcfg.text_dim and context.text_encoder else []) + \
        ([f"--class {'ID|NAME' if names else 'N'} (0 to {dcfg.num_classes - 1}{example})"] if dcfg.num_classes else [])
    return how[0] if len(how) == 1 else f"({' | '.join(how)})" if how else "--unconditional N"


def resume_stream(saved: dict[str, Any], stream: dict[str, Any], position: int, global_stream: bool
                  ) -> tuple[tuple[int, int], str | None]:
    """Where the reader of a run resumed from the checkpoint info ``saved`` starts
    (``LatentShards(start=...)``), and the line to print when data.shards changed since. The same
    latents (``stream["content"]``, at any path): the epoch in progress, from its first sample (the
    reader passes over the samples read, not every epoch before). Other latents (more clips
    extracted into the folder): a new epoch over all of them at ``position``; the rest of the
    epoch in progress is not read. From epoch 0: a checkpoint of an earlier version, or readers of
    their own shards (``global_stream=False``, data.split=shard), whose positions are their own."""
    old = saved.get("stream")
    if old is None:
        return (0, 0), None
    if old["content"] == stream["content"]:
        moved = (f"data.shards moved ({old['shards']} -> {stream['shards']}): the same latents (manifests, shard "
                 "names and sizes), read on from the same place") if old["shards"] != stream["shards"] else None
        in_epoch = global_stream and old["epoch_start"] <= position  # a bucket's first clip may be read ahead
        return ((old["epoch"], old["epoch_start"]) if in_epoch else (0, 0)), moved
    if not global_stream:
        return (0, 0), (f"data.shards holds other latents than at step {saved['step']} ({old['clips']} -> "
                        f"{stream['clips']} clips): each reader goes on after its share of the {position} samples "
                        "read, in the new stream")
    epoch = old["epoch"] + 1
    return (epoch, position), (f"data.shards holds other latents than at step {saved['step']} ({old['clips']} -> "
                               f"{stream['clips']} clips): epoch {epoch} starts at the next step over all of them "
                               f"(the rest of epoch {old['epoch']} is not read)")


def _single_process_group() -> None:
    """DeepSpeed needs a process group even for one process: a 1-rank group on a free port."""
    import os
    import socket

    import torch.distributed as torch_dist
    if torch_dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    dist.destroy_at_exit()


# ------------------------------------------------------------------------------------------
# checkpoints: DeepSpeed's own (model, optimizer, scheduler) + EMA safetensors + trainer.json in a
# `runs` checkpoint folder (hashed, renamed into place, rotated); exports of the EMA weights
# ------------------------------------------------------------------------------------------
REQUIRED_FILES = ("trainer.json", "ema.safetensors")
LEGACY_INFO = "complete.json"  # the trainer state of checkpoints written before launch/runs.py (no manifest)


def save_checkpoint(engine, ema: EMA, out: Path, step: int, dropped: int, position: int, stream: dict[str, Any],
                    keep: int, dcfg: dit.DiTConfig,
                    context: Export, universal: bool) -> None:
    """DeepSpeed's own checkpoint (fast resume on the same topology) + EMA + with ``universal`` the
    topology-independent state (any world size / ZeRO stage resumes it) + ``trainer.json``, sealed
    by ``runs.commit``; then the export of the EMA weights."""
    root = out / "checkpoints"
    tmp = runs.begin(root, step) if dist.is_main() else root / f".{runs.step_dir_name(step)}.tmp"
    dist.barrier()  # the folder exists before any rank writes into it
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step}, save_latest=False)
        engine.checkpoint_engine.flush()  # by the rank that wrote them: on disk before rank 0 seals them
    except runs.WRITE_ERRORS as e:
        raise runs.write_failed(root, step, e) from e
    tensors, meta = gather_universal(engine) if universal else ({}, {})  # a collective: every rank
    dist.barrier()  # every rank's DeepSpeed files are written and on disk
    if dist.is_main():
        try:
            if universal:
                save_tensors(tmp / "universal.safetensors", tensors)
            save_tensors(tmp / "ema.safetensors", ema.state_dict())
            atomic_write_json(tmp / "trainer.json", {
                "step": step, "dropped_batches": dropped, "position": position, "stream": stream,
                "world_size": dist.world_size(),
                "zero_stage": engine.zero_optimization_stage(),
                "universal": universal, "scheduler": engine.lr_scheduler.state_dict(), **meta})
            runs.commit(root, step, keep)
        except runs.WRITE_ERRORS as e:
            raise runs.write_failed(root, step, e) from e
        write_export(out, ema, dcfg, context, step)
    dist.barrier()


def write_export(out: Path, ema: EMA, dcfg: dit.DiTConfig, context: Export, step: int) -> None:
    """``OUTPUT/export/``: the EMA weights of ``step``, whose checkpoint is saved (a full disk is one line)."""
    try:
        save_export(out / "export", ema.state_dict(), dcfg, context)
    except runs.WRITE_ERRORS as e:
        raise runs.write_failed(out / "export", step, e, "the export",
                                f"the checkpoint of step {step} is saved and a rerun writes the export again") from e


def _schedule_from_config(engine, lr: float) -> None:
    """The loaded scheduler's base LR is the checkpoint's: put this run's ``lr`` in and set the LR of
    the next update from this run's schedule (the LambdaLR's function) at the loaded step."""
    sched = engine.lr_scheduler
    sched.base_lrs = [lr] * len(sched.base_lrs)
    sched._last_lr = [lr * fn(sched.last_epoch) for fn in sched.lr_lambdas]
    for group, value in zip(engine.optimizer.param_groups, sched._last_lr):
        group["lr"] = value


def resume(engine, ema: EMA, out: Path, lr: float) -> tuple[int, int, int | None, dict[str, Any]]:
    """Load the newest intact checkpoint; return its step, the micro-batches dropped for non-finite
    losses before it, the samples of the global stream read (None when the checkpoint did not
    record them) and its ``trainer.json``; (0, 0, 0, {}) when there is none. The LR schedule
    continues at the checkpoint's step with this run's settings (``lr``, warm-up, schedule,
    ``steps``), so an ``--allow-change optim.lr`` / ``steps`` takes effect.

    Rank 0 verifies the checkpoints against their manifests (``runs``); same world size and ZeRO
    stage: DeepSpeed's own checkpoint, otherwise the universal state (weights, Adam moments and
    step, LR schedule) is scattered into this engine. A checkpoint that fails to load on any rank
    is passed over (all ranks agree) for the previous one; when every checkpoint is rejected the run
    stops rather than start over. Checkpoints of earlier versions (``complete.json``, no manifest)
    are loaded unverified."""
    root = out / "checkpoints"
    found = runs.verified_checkpoints(root, REQUIRED_FILES) if dist.is_main() else None
    candidates, rejected = dist.broadcast_object(found)
    legacy = [Path(r["path"]) for r in rejected if (Path(r["path"]) / LEGACY_INFO).is_file()
              and not (Path(r["path"]) / runs.MANIFEST).exists()]
    candidates = sorted(candidates + legacy, key=runs.step_of, reverse=True)
    for r in rejected:
        if Path(r["path"]) not in legacy and dist.is_main():  # rank 0's verdict: said once, not once per rank
            log.warning("checkpoint %s rejected: %s", Path(r["path"]).name, r["reason"])
    for p in candidates:
        info = read_json(p / (LEGACY_INFO if p in legacy else "trainer.json"))
        ok = True
        try:
            if info["world_size"] == dist.world_size() and info["zero_stage"] == engine.zero_optimization_stage():
                path, _ = engine.load_checkpoint(str(root), tag=p.name)
                if path is None:
                    raise RuntimeError("DeepSpeed found nothing to load")
            elif info.get("universal"):
                scatter_universal(engine, load_tensors(p / "universal.safetensors"), info)
                engine.lr_scheduler.load_state_dict(info["scheduler"])
            else:
                raise RuntimeError(f"written by {info['world_size']} ranks with ZeRO-{info['zero_stage']} and "
                                   "without universal state; resume on that topology")
            ema.load_state_dict(load_tensors(p / "ema.safetensors"))
            _schedule_from_config(engine, lr)
        except Exception as e:  # a corrupt file of any kind: fall back to the previous checkpoint
            log.warning("checkpoint %s could not be loaded (%s: %s); trying an older one", p.name, type(e).__name__, e)
            ok = False
        if float(dist.all_reduce_mean(torch.tensor([float(ok)]))[0]) < 1.0:
            continue
        if dist.is_main():
            kind = "DeepSpeed" if info["world_size"] == dist.world_size() else "universal"
            print(f"resumed from {p} at step {info['step']} ({kind} state)")
        return int(info["step"]), int(info.get("dropped_batches", 0)), info.get("position"), info
    if rejected or candidates:
        raise UserError(f"no usable checkpoint under {root} (see the warnings above); move them away or give a "
                        "new output to start over")
    return 0, 0, 0, {}
