"""``ldm train``'s settings and the checks a run passes before any work: the frozen config
dataclasses (one per YAML section: ``data``, ``model``, ``flow``, ``optim``, ``val``, with
``engine`` from `launch.engine` and ``profile`` from `launch.runs`), ``HARMLESS`` (the keys a resumed
run may change), what the run folder is bound to (`run_binding`), the value and input checks
(`check_ranges`, `check_val_shards`, `data_mix`, ...) and `check_config`, which runs them all.

A new training key: a field with a default in its section's dataclass here, and its use in the
loop (`launch/train.py`); a key that cannot change the result also goes into ``HARMLESS``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dit
from data.manifest import Manifest, load_manifest, load_manifests, shard_folders
from data.shards import content_fingerprint, shard_urls
from launch import dist, runs
from launch.engine import EngineConfig, deepspeed_config, resolve_precision, resolve_switch
from launch.train_checkpoint import init_weights
from ldm import config as cfglib
from ldm.errors import UserError, check_min, checking
from ldm.layers import COMPILE_MODES

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
