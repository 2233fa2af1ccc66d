""""Which autoencoder": the one resolver every verb uses.

A reference is one of

- a **registered name** (``kl2d-f8c4``; ``ldm list``): the registered config, with RANDOM weights
  (a warning says so, on the first rank only) unless a ``checkpoint`` folder of ours is given too;
- **our checkpoint folder** (``save_pretrained``: ``config.json`` + ``model.safetensors``, e.g. a
  ``ldm train-ae`` run's ``final/``), as ``checkpoint=`` or as the reference itself; with a name
  too, the folder must hold that name (a folder ``ldm convert`` wrote for a family: a name of that family);
- a **loader name** ``<prefix>:<what>`` with ``checkpoint=`` a LOCAL folder (and ``subfolder``):
  external weights wrapped at run time by a loader registered with ``base.register_loader``
  (``diffusers``: ``diffusers:AutoencoderKLWan`` runs the diffusers model behind our contract);
- a **weight source** of ``sources.py`` (``ivvae-official``, ``videovaeplus-official``, ...) with
  ``checkpoint=`` its LOCAL released file or folder: converted into the family it fills, as
  ``ldm convert`` does (loader names win when a name is both: ``diffusers:AutoencoderKL`` wraps;
  ``ldm convert --source diffusers:AutoencoderKL`` makes a kl2d).

``resolve(ref, checkpoint) -> Resolved(model, name, weights_hash)``; ``weights_hash`` is the
``dir_hash`` of the weights folder (a file's sha256 for a released file; None for random weights)
and is what manifests record.
``resolve_record(record)`` rebuilds the model an extraction manifest / DiT export names (an
``ldm.artifacts.AERecord``), checking the weights against the recorded hash.
``config_of(ref)`` gives the class and config without any weights (shape arithmetic, costs).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from autoencoders import sources as weight_sources
from autoencoders.base import (FAMILIES, LOADERS, REGISTRY, Autoencoder, build, load_pretrained, loader_of,
                               saved_config)
from ldm import config as cfglib
from ldm.artifacts import AERecord
from ldm.checkpoint import dir_hash, file_sha256, read_json
from ldm.errors import MissingInput, UserError


class Resolved(NamedTuple):
    model: Autoencoder
    name: str  # registered / loader / weight-source name, or the name saved in the folder (else the family)
    weights_hash: str | None  # dir_hash of the weights folder (a file: its sha256); None: random weights


def _saved_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _weights_hash(path: str | Path) -> str:
    path = Path(path)
    return dir_hash(path) if path.is_dir() else file_sha256(path)[:16]


def _unknown(ref: str) -> KeyError:
    loaders = " / ".join(f"{p}:<what>" for p in sorted(LOADERS))
    return KeyError(f"unknown autoencoder {ref!r}: not registered (see `ldm list`), and neither a registered loader "
                    f"name ({loaders}), a weight source ({', '.join(sorted(weight_sources.SOURCES))}) nor a saved model "
                    "folder")


def _external(ref: str) -> bool:
    """``ref`` names external weights (a loader or a weight source) that need a local path."""
    return loader_of(ref) is not None or ref in weight_sources.SOURCES


def check_saved_name(checkpoint: str | Path, meta: dict[str, Any], ref: str | None) -> None:
    """A name given with a saved folder (``meta``: its `saved_config`) must be the one it holds (a
    converted folder, which keeps its family only: a name of that family), or its family's name (a
    recipe's ``autoencoder: mtcvae`` takes any MTC-VAE's folder); ValueError otherwise."""
    saved = meta.get("name")
    if ref in FAMILIES:  # a family's name, also where a registered model has the same name ("hivae")
        if meta["family"] != ref:
            raise ValueError(f"checkpoint {checkpoint} holds a {meta['family']!r} model"
                             + (f" ({saved!r})" if saved else "") + f", not a {ref!r} one; give a folder of the "
                             f"{ref} family")
        return
    if ref is not None and saved is not None and saved != ref:
        raise ValueError(f"checkpoint {checkpoint} holds {saved!r}, not {ref!r}; leave out the name or give the "
                         "right folder")
    if ref is not None and saved is None:  # a converted folder keeps its family only
        cls = REGISTRY[ref][0] if ref in REGISTRY else FAMILIES.get(ref)
        if cls is None:
            raise _unknown(ref)
        if cls is not FAMILIES[meta["family"]]:
            raise ValueError(f"checkpoint {checkpoint} holds a {meta['family']!r} model, not {ref!r} "
                             f"(a {cls.family!r}); leave out the name or give the right folder")


def resolve(ref: str | None = None, checkpoint: str | Path | None = None, *, subfolder: str | None = None,
            seed: int | None = 0, overrides: Mapping[str, Any] | None = None, warn_random: bool = True,
            expect_hash: str | None = None) -> Resolved:
    """The model ``ref`` / ``checkpoint`` name (see the module docstring). Random weights are drawn
    after ``torch.manual_seed(seed)`` (no reseeding with ``seed=None``); ``overrides`` are config
    fields of a registered name or a source's options; ``expect_hash`` must equal the weights'
    hash (the weights a manifest recorded)."""
    overrides = dict(overrides or {})
    if ref is not None and checkpoint is None and ref not in REGISTRY and not _external(ref):
        if not _saved_folder(ref):
            raise _unknown(ref)
        ref, checkpoint = None, ref  # a folder given as the reference
    if ref is not None and _external(ref) and checkpoint is None:
        raise UserError(f"{ref} loads weights from a local copy: give its path (--ae-path / --checkpoint)")
    if ref is not None and loader_of(ref) is not None:
        folder = Path(checkpoint) / subfolder if subfolder else Path(checkpoint)
        model = build(ref, path=checkpoint, subfolder=subfolder, **overrides)
        found = Resolved(model, ref, dir_hash(folder))
    elif ref is not None and ref in weight_sources.SOURCES:
        if overrides:
            raise UserError(f"config overrides {sorted(overrides)} do not apply to {ref}: the weights set the config")
        where = Path(checkpoint) / subfolder if subfolder else Path(checkpoint)
        if not where.exists():
            raise MissingInput(f"{ref}: no such file or folder {where}")
        conversion = weight_sources.convert(ref, where, weight_sources.SOURCES[ref].family)
        found = Resolved(conversion.model, ref, _weights_hash(where))
    elif checkpoint is not None:
        if overrides:
            raise ValueError(f"config overrides {sorted(overrides)} do not apply to a saved model: its config is used")
        if subfolder:
            checkpoint = Path(checkpoint) / subfolder
        meta = saved_config(checkpoint)  # a clear error for a DiT, a run folder, a missing folder
        check_saved_name(checkpoint, meta, ref)
        found = Resolved(load_pretrained(checkpoint), meta.get("name") or ref or meta["family"], dir_hash(checkpoint))
    elif ref is not None:
        if ref not in REGISTRY:
            raise _unknown(ref)
        if warn_random and first_process():
            warnings.warn(f"no checkpoint: {ref} has RANDOM weights (fine for pipeline and cost checks, not for "
                          "quality or training a denoiser)", stacklevel=2)
        if seed is not None:
            torch.manual_seed(seed)
        found = Resolved(build(ref, **overrides), ref, None)
    else:
        raise ValueError("give --autoencoder NAME, --checkpoint DIR, or both")
    if expect_hash is not None and found.weights_hash != expect_hash:
        raise ValueError(f"autoencoder weights {checkpoint} are not the ones the latents were extracted with "
                         f"(hash {found.weights_hash} != {expect_hash})")
    return found


def resolve_record(record: AERecord, checkpoint: str | Path | None = None) -> Resolved:
    """The autoencoder ``record`` names: its weights (``checkpoint`` replaces the recorded path;
    their hash must match the record's), or, for latents made with random weights, the same
    seeded random init of the recorded config."""
    path, subfolder = checkpoint or record.checkpoint, record.subfolder
    if checkpoint is not None and subfolder and not (Path(checkpoint) / subfolder).exists() \
            and _saved_folder(checkpoint):
        subfolder = None  # the model folder itself (a pipeline's vae/) given in place of the pipeline
    if path is not None:
        where = Path(path) / subfolder if subfolder else Path(path)
        if not where.exists():
            raise MissingInput(f"autoencoder weights {where} not found; " + (
                "pass the folder that holds them with --ae-checkpoint" if checkpoint is None else
                f"--ae-checkpoint {checkpoint}" + (f" (+ the recorded subfolder {subfolder})" if subfolder else "")))
        if _external(record.name):
            return resolve(record.name, path, subfolder=subfolder, expect_hash=record.checkpoint_hash)
        return resolve(None, path, subfolder=subfolder, expect_hash=record.checkpoint_hash)
    if record.family not in FAMILIES:
        raise KeyError(f"unknown autoencoder family {record.family!r}; known: {sorted(FAMILIES)}")
    if first_process():
        warnings.warn("the latents were extracted with a RANDOM autoencoder; rebuilding it from its seed",
                      stacklevel=2)
    torch.manual_seed(record.seed)
    return Resolved(FAMILIES[record.family].from_config_dict(record.config), record.name or record.family, None)


def first_process() -> bool:
    """Whether this process is the first rank of its launch, or runs alone: the random-weights warnings
    every rank would give are said once. Read from the launcher's environment (torchrun's ``RANK``, an
    srun step's ``SLURM_PROCID``, as `launch.dist.dist_env`), not from ``torch.distributed``, which
    model code does not import."""
    rank = os.environ.get("RANK") or (os.environ.get("SLURM_PROCID") if "SLURM_STEP_ID" in os.environ else None)
    return (rank or "0").strip() == "0"


def record_of(found: Resolved, checkpoint: str | Path | None = None, subfolder: str | None = None,
              seed: int = 0) -> AERecord:
    """The `AERecord` of a resolved model (what a manifest stores to rebuild it)."""
    model = found.model
    return AERecord(name=found.name, family=model.family, config=cfglib.to_dict(model.config),
                    config_hash=cfglib.config_hash(model.config),
                    checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None, subfolder=subfolder,
                    checkpoint_hash=found.weights_hash, seed=seed)


def config_of(ref: str) -> tuple[type[Autoencoder], Any]:
    """``(family class, config)`` of a registered name or a saved folder (its ``config.json``
    only): no weights are read."""
    if ref in REGISTRY:
        return REGISTRY[ref]
    if _external(ref):
        raise ValueError(f"{ref}: external weights bring their config; save the model with save_pretrained (or "
                         "`ldm convert` it) to cost it")
    if not _saved_folder(ref):
        if Path(ref).is_dir():
            saved_config(ref)  # says what the folder is instead (a train-ae run folder: its final/, ...)
        raise _unknown(ref)
    meta = read_json(Path(ref) / "config.json")
    family = meta.get("family")
    if family not in FAMILIES:
        saved_config(ref)  # says what the folder is instead (a DiT run, ...)
        raise KeyError(f"{ref}: unknown autoencoder family {family!r}; known: {sorted(FAMILIES)}")
    cls = FAMILIES[family]
    return cls, cfglib.from_dict(cls.config_cls, meta["config"])
