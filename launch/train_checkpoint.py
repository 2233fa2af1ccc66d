"""What an ``ldm train`` run writes and reads back: its checkpoints (DeepSpeed's own state + the
EMA + ``trainer.json`` in a `launch.runs` checkpoint folder, optionally the topology-independent
universal state), the export of the EMA weights ``ldm sample`` loads, `resume` from the newest
intact checkpoint, the weights of ``model.init`` and the latent normalisation of the last start.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

import dit
from data.manifest import Manifest
from dit import Export, save_export
from launch import dist, runs
from launch.engine import EMA, gather_universal, run_clipping_kept, scatter_universal
from ldm.checkpoint import atomic_write_json, load_tensors, read_json, save_tensors
from ldm.errors import UserError, checking

log = logging.getLogger("ldm.train")


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
                with run_clipping_kept(engine):
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
