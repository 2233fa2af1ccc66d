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

This file is the verb and its loop; what the loop calls lives beside it:

    launch/train_config.py      the settings (`TrainConfig` and its sections), ``HARMLESS``, `check_config`
    launch/train_flow.py        one batch's loss: per-sample draws, `flow_step_loss`, `StepInputs`, `prepare_step`
    launch/train_data.py        the reader's start, shape-bucket batch sizes, the `Prefetcher` thread
    launch/train_checkpoint.py  checkpoints, the export, `resume`, the ``model.init`` weights
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import dit
from data.manifest import Manifest, load_manifests, shard_folders
from data.shards import LatentShards, as_batched
from data.video import fit_shared_memory
from dit import Export
from launch import dist, runs
from launch.engine import (EMA, DeviceClip, apply_activation_checkpointing, clips_on_device, deepspeed_config,
                           deepspeed_patches_undone, import_muon_uncompiled, mfu, peak_flops,
                           quiet_deepspeed_deprecations, resolve_precision, resolve_switch, safe_checkpoint_engine,
                           skip_cpu_shm_kernel, slow_engine_warning)
from launch.train_checkpoint import export_context, init_weights, norm_change, resume, save_checkpoint, write_export
from launch.train_config import TrainConfig, check_config, check_val_shards, data_mix, make_dit_config, mix_rates
from launch.train_data import (READER_PREFETCH, Prefetcher, batch_bytes, bucket_batch_sizes, reader_start,
                               resume_stream)
from launch.train_flow import (StepInputs, batch_cond, flow_step_loss, latent_norm_stats, per_sample_normal,
                               prepare_step, sample_generators, standardized, varlen_lengths)
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_json
from ldm.errors import UserError, checking
from ldm.layers import compile_blocks

# re-exported: tests and scripts import these from launch.train
from launch.train_config import FlowConfig  # noqa: F401
from launch.train_flow import flow_draws  # noqa: F401

log = logging.getLogger("ldm.train")


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
# over timesteps in `flow_step_loss` (launch/train_flow.py); a quantity logged every log_every
# steps in `log_step`.
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
    clip: DeviceClip | None = None  # gradient clipping and the non-finite step's skip on the device (ZeRO-1/2)
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
    pending: list[torch.Tensor] = field(default_factory=list)  # per step: (mean loss, 1.0 if the update was skipped)
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
            train_step(run, progress, inputs, stop, profiler.phase)
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
    run.engine, run.ema, run.clip = build_engine(run)
    run.peak = peak_flops(cfg.engine)
    return run


def build_engine(run: TrainRun) -> tuple[Any, EMA, DeviceClip | None]:
    """The DiT (``model.init`` weights, activation checkpointing, sequence parallelism), AdamW and
    the LR schedule in a DeepSpeed engine, its blocks compiled, the EMA of its weights, and the
    gradient clipping on the device where DeepSpeed's would read the norm on the host (`DeviceClip`)."""
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
    ds_cfg = deepspeed_config(cfg.engine, cfg.data.batch_size, cfg.optim.grad_accum, cfg.optim.grad_clip)
    on_device = clips_on_device(ds_cfg)
    # fused AdamW on GPUs (one kernel over all tensors) and wherever it clips on the device (CPUs too);
    # DeepSpeed's ZeRO keeps fp32 master weights for it
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda" or on_device)
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: runs.lr_factor(
        step, o.warmup_steps, o.schedule, cfg.steps, o.min_lr_ratio))
    quiet_deepspeed_deprecations()
    import_muon_uncompiled()  # before DeepSpeed's optimizers import it, compiling functions `ldm train` never calls
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
    return engine, EMA(engine.module, cfg.ema_decay, zero3), DeviceClip(engine, cfg.optim.grad_clip) if on_device else None


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
    # the readers hand their batches over in shared memory: as many as fit in it (Docker's 64 MB /dev/shm)
    largest = max([cfg.data.batch_size, *(data.buckets or {}).values()])  # the largest batch of any bucket
    workers, fewer = fit_shared_memory(cfg.data.num_workers, lambda w: w * READER_PREFETCH * batch_bytes(manifest, largest),
                                       dist.local_ranks(run.env), words=("shard readers", "latent batches", "read ahead"))
    if fewer and dist.is_main():
        log.warning("ldm train: %s", fewer)
    loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=as_batched, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         prefetch_factor=READER_PREFETCH if workers else None,
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


def train_step(run: TrainRun, progress: Progress, inputs: Prefetcher, stop: runs.StopRequest,
               phase: Callable[[str], contextlib.AbstractContextManager] = runs.unprofiled) -> None:
    """One optimizer step over ``optim.grad_accum`` micro-batches: the loss (`flow_step_loss`),
    backward, DeepSpeed's step, the EMA. The GPU's fast path: one host read per micro-batch (the
    finite / stop flags, one collective); the step's mean loss stays on the device in ``pending``.
    ``phase(name)`` brackets each part for the profiler (`runs.StepProfiler.phase`)."""
    cfg, engine = run.cfg, run.engine
    engine.train()
    progress.lr = engine.get_lr()[0]  # this step's update's (the scheduler moves on after it)
    loss_sum, micro = torch.zeros((), device=run.device), 0
    while micro < cfg.optim.grad_accum:
        with phase("data"):
            batch = next(inputs).to(run.device)
        progress.position += cfg.data.batch_size * run.dp_world  # samples of the global stream one micro-batch reads
        progress.work += batch.work
        progress.samples += batch.latent.batch_size
        progress.read += batch.sources
        progress.stream["epoch"], progress.stream["epoch_start"] = batch.stream  # rank 0's is saved: not past position
        with phase("forward"):
            loss = flow_step_loss(engine, batch.latent, batch.cond, cfg.flow, batch.draws, engine.module.null_cond,
                                  pack=cfg.model.pack)
        # a non-finite loss on any rank drops this micro-batch on every rank (no backward, no
        # step: DeepSpeed's accumulation stays aligned); too many in a row stop the run. This is
        # the loop's one host sync per micro-batch: backward must not start on a bad loss. The
        # same read tells every rank whether any was asked to stop (SIGTERM, Ctrl-C).
        with phase("sync"):
            finite = stop.agree(loss)
        progress.stopping = stop.agreed
        try:
            applied = progress.nonfinite.check(finite, progress.step + 1, "batch dropped")
        except RuntimeError:
            inputs.close()
            raise
        if not applied:
            progress.dropped += 1
            continue
        with phase("backward"):
            engine.backward(loss)
        with phase("step"):
            engine.step()
        loss_sum += loss.detach().float() / cfg.optim.grad_accum
        micro += 1
    progress.step += 1
    with phase("ema"):
        run.ema.update(engine.module)
    skipped = run.clip.take() if run.clip is not None else None  # the same on every rank: the norm is global
    progress.pending.append(torch.stack([dist.all_reduce_mean(loss_sum), loss_sum.new_zeros(()) if skipped is None
                                         else skipped.to(loss_sum.dtype)]))


def read_pending(run: TrainRun, progress: Progress) -> list[float]:
    """The steps' mean losses and skip flags still on the device (``pending``), read on the host
    (one sync): the losses go to ``progress.losses`` and are returned; the skips are added to
    DeepSpeed's count of skipped updates (``engine.skipped_steps``, kept in its checkpoints; its own
    checks count there too: fp32 runs, ZeRO-0 and -3)."""
    if not progress.pending:
        return []
    rows = torch.stack(progress.pending).tolist()
    progress.pending.clear()
    losses, skipped = [r[0] for r in rows], round(sum(r[1] for r in rows))
    progress.losses += losses
    if skipped:
        run.engine.skipped_steps += skipped
        log.warning("%d update(s) skipped by step %d: the gradient norm was not finite (weights and AdamW's "
                    "state left as they were)", skipped, progress.step)
    return losses


def log_step(run: TrainRun, progress: Progress, logger: runs.RunLog, bar) -> None:
    """Every ``log_every`` steps (and the last): the losses of the steps since the last log read
    from the device, and the step's loss, LR, gradient norm and throughput logged. A new quantity
    logged per step goes in the dict given to ``logger.log`` (log.jsonl and TensorBoard)."""
    loss_mean = read_pending(run, progress)[-1]
    bar.set_postfix(loss=f"{loss_mean:.4f}")
    now, step = time.perf_counter(), progress.step
    # every rank of a sequence-parallel group counts the same samples: mean x dp_world = all work
    work = torch.cat([progress.work, progress.work.new_tensor([progress.samples])])
    tokens_s, flops_s, samples_s = (dist.all_reduce_mean(work) * run.dp_world
                                    / max(now - progress.t_last, 1e-9)).tolist()
    progress.work.zero_()
    progress.samples = 0
    grad_norm = run.clip.norm if run.clip is not None else run.engine.get_global_grad_norm()
    logger.log(step, {"loss": loss_mean, "lr": progress.lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "samples_per_s": samples_s,
                      "tokens_per_s": tokens_s,
                      "tflops_per_s": flops_s / 1e12,
                      "mfu": mfu(flops_s / run.env.world_size, run.peak),
                      "peak_memory_gib": runs.peak_memory_gib(run.device),
                      "skipped_steps": run.engine.skipped_steps})
    progress.t_last = now


def validate_step(run: TrainRun, progress: Progress, held_out: HeldOut, logger: runs.RunLog) -> None:
    """The validation loss on the held-out batches, logged as val_loss."""
    loss = validation_loss(run.engine, itertools.islice(held_out.data, held_out.rounds), run.cfg, run.dcfg,
                           run.latent_norm, run.engine.module.null_cond, run.device)
    progress.val_losses.append((progress.step, loss))
    logger.log(progress.step, {"val_loss": loss}, group="val")


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
            n, lengths = latent.batch_size, varlen_lengths(latent)
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


def checkpoint_step(run: TrainRun, progress: Progress) -> None:
    """A checkpoint (and the export) of this step; the losses not yet read are read first."""
    read_pending(run, progress)
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
               "dropped_batches": progress.dropped, "skipped_steps": run.engine.skipped_steps,
               "val_losses": val_losses, "read": dict(read_by)}
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
