"""The extraction manifest: what an ``ldm extract`` output folder holds, typed.

``manifest.json`` (written last by rank 0, after every shard) records which autoencoder made the
latents (an `AERecord`: name, config, weights path and hash, or the seed of random weights), the
clips they were made from, the latent spec, counts, per-channel latent statistics, every skipped
input with its reason, the shards, the cached text embeddings, and the class names (index = class
id; from ``--classes`` or a captions column of names) with the clips written per class. `Manifest.from_dict` is strict
(unknown keys are errors) and versioned (version-1 manifests, with the record as flat keys, are
migrated on reading).
"""
from __future__ import annotations

import json
import math
from itertools import zip_longest
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm import config as cfglib
from ldm.artifacts import AERecord, ClipSpec, load_versioned, migrate_v1_record
from ldm.checkpoint import atomic_write_json, read_json

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Counts:
    inputs: int
    written: int
    skipped: int


@dataclass(frozen=True)
class Manifest:
    autoencoder: AERecord
    video: ClipSpec
    latent_spec: dict[str, Any]  # LatentSpec.to_dict() at the clip size
    form: str  # grid | tokens | varlen
    counts: Counts
    stats: dict[str, dict[str, Any]]  # per part: count, per-channel mean / std / sample_std
    shards: tuple[dict[str, Any], ...] = ()  # {"name": shard file, "count": samples}
    skipped: tuple[dict[str, Any], ...] = ()  # {"key", ["clip", "start_frame",] "reason"} per input not used
    input_problems: tuple[str, ...] = ()  # problems of the input listing (caption rows without files, ...)
    text_encoder: str | None = None  # spec of the cached caption embeddings
    text_dim: int | None = None
    text_fingerprint: tuple[float, ...] | None = None  # ldm.text.fingerprint of the encoder
    text_max_length: int | None = None  # its token length (None: a manifest from before it was recorded)
    text_tokens: int = 0  # mean caption length in tokens
    num_classes: int = 0
    class_names: tuple[str, ...] = ()  # name of each class id (index = id; fewer than num_classes or none)
    class_counts: tuple[int, ...] = ()  # written clips per class id, num_classes of them (empty: no class ids)
    shard_size: int = 64
    dtype: str = "fp32"  # the encoder's compute precision (latents are stored as fp32 either way)
    tile: str | None = None  # spatial tiling of the encoder, "TILE[:OVERLAP]" pixels
    world_size: int = 1
    verify: dict[str, Any] | None = None  # {"k", "psnr"} of ``--verify K``
    mixed_shapes: bool = False  # several folders merged with different latent shapes (buckets)
    latent_shapes: tuple[dict[str, list[int]], ...] = ()  # merged folders: every distinct latent_shape
    version: int = 2

    @property
    def parts(self) -> dict[str, tuple[int, ...]]:
        """Per-sample latent part shapes (``LatentSpec.parts``)."""
        return {k: tuple(v) for k, v in self.latent_spec["latent_shape"].items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str = "manifest") -> "Manifest":
        return load_versioned(cls, data, what, {1: migrate_v1_record})

    def to_dict(self) -> dict[str, Any]:
        return cfglib.to_dict(self)

    def write(self, folder: str | Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST, self.to_dict())


def load_manifest(path: str | Path) -> Manifest:
    """The manifest of an ``ldm extract`` output folder (or the ``manifest.json`` file itself)."""
    p = Path(path)
    p = p / MANIFEST if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"no {MANIFEST} at {p}: is this an `ldm extract` output folder?")
    return Manifest.from_dict(read_json(p), what=str(p))


def shard_folders(spec: str) -> list[str]:
    """The folders of a comma-separated ``data.shards`` (``a,b``, ``a, b``, ``a,``): spaces around
    the commas and empty entries dropped."""
    return [f.strip() for f in spec.split(",") if f.strip()]


def load_manifests(spec: str, weights: tuple[float, ...] = ()) -> Manifest:
    """The manifest of one extraction folder, or of several (comma-separated) merged: they must
    come from the same autoencoder (config and weights hash); counts add up, the per-channel
    statistics are those of the stream a trainer reads (``weights``: each folder's relative share of
    the clips, as ``data.weights``; none: every clip once, i.e. pooled by clip count) and
    ``mixed_shapes`` says whether the latent shapes differ."""
    folders = shard_folders(spec)
    if not folders:
        raise ValueError("data.shards is empty: give an `ldm extract` output folder")
    manifests = [load_manifest(f) for f in folders]
    first = manifests[0]
    for f, m in zip(folders[1:], manifests[1:]):
        if (m.autoencoder.config_hash, m.autoencoder.checkpoint_hash) != \
                (first.autoencoder.config_hash, first.autoencoder.checkpoint_hash):
            raise ValueError(f"{f} was extracted with another autoencoder than {folders[0]}; one run trains on one "
                             "autoencoder's latents")
    named = [(f, m.class_names) for f, m in zip(folders, manifests) if m.class_names]
    for f, names in named[1:]:
        if names != named[0][1]:
            i, a, b = next((i, a, b) for i, (a, b) in enumerate(zip_longest(names, named[0][1])) if a != b)
            raise ValueError(f"{f} names its classes differently than {named[0][0]} (class id {i}: {a!r} vs "
                             f"{b!r}): one id would mean two classes; extract both with the same --classes list")
    if len(manifests) == 1:
        return first
    shapes = {json.dumps(m.latent_spec["latent_shape"], sort_keys=True) for m in manifests}
    counts = Counts(**{k: sum(getattr(m.counts, k) for m in manifests) for k in ("inputs", "written", "skipped")})
    stats = {}
    for part in first.stats:
        n = [m.stats[part]["count"] for m in manifests]  # values per channel: the pool's weights without a mix
        if weights:  # a folder's share of the clips x its values per clip (its latents' size)
            n = [w / sum(weights) * c / max(m.counts.written, 1) for w, c, m in zip(weights, n, manifests)]
        total = sum(n)
        mean = [sum(c * m.stats[part]["mean"][i] for c, m in zip(n, manifests)) / total
                for i in range(len(first.stats[part]["mean"]))]
        stats[part] = {"count": sum(m.stats[part]["count"] for m in manifests), "mean": mean}
        for key in ("std", "sample_std"):  # pooled: E[x^2] - mean^2 over all folders
            stats[part][key] = [math.sqrt(max(sum(c * (m.stats[part][key][i] ** 2 + m.stats[part]["mean"][i] ** 2)
                                                  for c, m in zip(n, manifests)) / total - mean[i] ** 2, 0.0))
                                for i in range(len(mean))]
    return cfglib.replace(first, shards=tuple(s for m in manifests for s in m.shards), counts=counts, stats=stats,
                          num_classes=max(m.num_classes for m in manifests), mixed_shapes=len(shapes) > 1,
                          class_names=named[0][1] if named else (), class_counts=_merged_counts(manifests),
                          latent_shapes=tuple(json.loads(x) for x in sorted(shapes)))


def _merged_counts(manifests: list[Manifest]) -> tuple[int, ...]:
    """Clips per class id over several folders; empty when a folder with class ids did not count them."""
    if any(m.num_classes and not m.class_counts for m in manifests):
        return ()
    total = [0] * max(m.num_classes for m in manifests)
    for m in manifests:
        for i, n in enumerate(m.class_counts):
            total[i] += n
    return tuple(total) if sum(total) else ()
