"""``ldm convert``: released weights -> our ``save_pretrained`` format.

    ldm convert --source SOURCE --path PATH --target NAME --output DIR

``SOURCE`` is a registered weight source (``autoencoders/sources.py``: ``ivvae-official``,
``videovaeplus-official``, ``diffusers:AutoencoderKL``, ``diffusers:AutoencoderKLCogVideoX``),
``PATH`` the local file or folder, ``NAME`` a registered autoencoder (its architecture is checked
against the source) or a family (the configuration the source implies; for a diffusers source also a
family it initialises, e.g. ``cmvae`` from an SD VAE). ``--source saved`` starts a family from a
model our own training saved (``RUN/final``) through that family's initialiser, e.g. IV-VAE's video
VAE inflated from the image VAE of ``recipes/ivvae-image.yaml``. ``DIR`` then works with ``--checkpoint`` of
extract / reconstruct / sample / eval and ``--init`` / ``--base-checkpoint`` of train-ae.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import autoencoders  # noqa: F401  (registers every family and source)
from autoencoders.sources import INITIALISERS, SAVED, SOURCES, convert, convert_saved, targets
from ldm.errors import UserError

log = logging.getLogger("ldm.convert")


def add_arguments(p: argparse.ArgumentParser) -> None:
    inits = ", ".join(sorted(f"{b} -> {f}" for f, b in INITIALISERS))
    p.add_argument("--source", required=True, choices=sorted(SOURCES) + [SAVED],
                   help="; ".join(f"{s.name}: {s.reads} -> {'/'.join(targets(s.name))}" for s in SOURCES.values())
                   + f"; {SAVED}: a folder our own training wrote (RUN/final) -> a family it initialises ({inits})")
    p.add_argument("--path", required=True, help="the local checkpoint file or folder")
    p.add_argument("--target", required=True, help="registered autoencoder (checked against the source) or family")
    p.add_argument("--output", required=True, help="folder to write (model.safetensors + config.json)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a new folder")
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise UserError(f"{out} already holds a model; choose a new --output folder")
    if args.source == SAVED:
        result = convert_saved(args.path, args.target)
    else:
        result = convert(args.source, args.path, args.target)
    result.model.save_pretrained(out, result.name)
    family = result.model.family
    log.info("converted %s (%s) -> %s %s, %s parameters, written to %s", args.path, args.source, family,
             result.name or "(config from the source)", f"{result.model.num_parameters():,}", out)
    for note in result.notes:
        log.info("  %s", note)
    return 0
