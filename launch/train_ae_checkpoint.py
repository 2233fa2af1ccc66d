"""The checkpoints of an ``ldm train-ae`` run: `AECheckpoints`, the base class of
`launch.train_ae.AETrainer` that saves and loads them and finds the one a run resumes from (and the
stage it resumes at). Written, verified and rotated by `launch.runs` (shared with ``ldm train``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from autoencoders import FAMILIES
from launch import dist, runs
from launch.train_ae_data import carried_position
from ldm import config as cfglib
from ldm.checkpoint import load_tensors, read_json
from ldm.errors import UserError

log = logging.getLogger("ldm.train_ae")

# files every train-ae checkpoint holds (runs.verify_checkpoint)
REQUIRED_FILES = ("model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                  "trainer.json")


class AECheckpoints:
    """The checkpoint half of `AETrainer` (launch/train_ae.py): `save` this step's checkpoint,
    `load` one, `_find_resume` the one a run resumes from, `_resume_stage` the stage it builds the
    model at. The methods read and set the trainer's attributes (``cfg``, ``env``, ``main``,
    ``out``, ``ckpt_root``, ``ae``, ``name``, ``opt``, ``d_opt``, ``loss_fn``, ``generator``,
    ``step``, ``pos``, ``skipped``, ``resume_path``, ``resumed_from``, ``rejected``)."""

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
