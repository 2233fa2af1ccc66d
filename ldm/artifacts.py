"""Typed JSON artifacts that one verb writes and others read (the extraction manifest in
``data/manifest.py``, the DiT export in ``dit/export.py``): frozen dataclasses with a format
``version``, read by ``load_versioned`` (strict: unknown keys are errors; an older version is
migrated, a newer one refused), and the two records both carry: `AERecord` (which autoencoder,
which weights) and `ClipSpec` (the clip size the latents were made at).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ldm import config as cfglib

T = TypeVar("T")


def load_versioned(cls: type[T], data: dict[str, Any], what: str,
                   migrations: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] | None = None) -> T:
    """``cls`` (a frozen dataclass with a ``version`` field whose default is the current format)
    from its JSON. ``data`` without ``version`` is version 1. ``migrations[v]`` turns version ``v``
    into ``v + 1``."""
    current = cls.__dataclass_fields__["version"].default
    data = dict(data)
    version = int(data.pop("version", 1))
    if version > current:
        raise ValueError(f"{what} has format version {version}; this code reads versions up to {current} "
                         "(update the platform)")
    while version < current:
        step = (migrations or {}).get(version)
        if step is None:
            raise ValueError(f"{what} has format version {version}, which this code cannot read (current {current})")
        data = step(data)
        version += 1
    return cfglib.from_dict(cls, {**data, "version": current})


@dataclass(frozen=True)
class AERecord:
    """Which autoencoder made a set of latents, and with which weights: enough for
    ``autoencoders.resolve_record`` to rebuild the very same model.

    ``checkpoint``: the weights folder (a ``save_pretrained`` folder, or a source's local folder
    such as a diffusers model, with ``subfolder``); ``checkpoint_hash`` its ``dir_hash``. Without
    a checkpoint the weights were random, drawn after ``torch.manual_seed(seed)``."""

    name: str  # registered name, "<source>:<what>" (e.g. diffusers:AutoencoderKL), or the saved name
    family: str
    config: dict[str, Any] = field(default_factory=dict)  # the architecture config as JSON
    config_hash: str = ""
    checkpoint: str | None = None
    subfolder: str | None = None
    checkpoint_hash: str | None = None
    seed: int = 0

    @staticmethod
    def from_v1(d: dict[str, Any]) -> "AERecord":
        """The record in the flat layout of version-1 manifests and exports."""
        source = (d.get("autoencoder") or "").split(":", 1)[0] if ":" in (d.get("autoencoder") or "") else None
        return AERecord(name=d.get("autoencoder") or "", family=d["family"], config=d["config"],
                        config_hash=d.get("config_hash") or "",
                        checkpoint=d.get("ae_path") if source else d.get("checkpoint"),
                        subfolder=d.get("ae_subfolder") if source else None,
                        checkpoint_hash=d.get("checkpoint_hash"), seed=int(d.get("seed") or 0))


@dataclass(frozen=True)
class ClipSpec:
    """The clips latents were made from: frames, size, (resampled) frame rate, and the windows
    taken per video (``data.video.Windows``: K evenly spaced, or every window at a stride)."""

    frames: int
    height: int
    width: int
    fps: float | None = None
    clips_per_video: int = 1
    clip_stride: int | None = None
    clip_fps: float | None = None  # the rate the clips play at: fps, else the inputs' native rate (manifests)


V1_RECORD_KEYS = ("autoencoder", "family", "config", "config_hash", "checkpoint", "checkpoint_hash", "seed",
                  "ae_path", "ae_subfolder")


def migrate_v1_record(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept the autoencoder record as flat keys; version 2 nests it under ``autoencoder``
    (and reads the clip spec's known keys)."""
    record = AERecord.from_v1(d)
    rest = {k: v for k, v in d.items() if k not in V1_RECORD_KEYS}
    video = {k: v for k, v in rest["video"].items() if k in ClipSpec.__dataclass_fields__}
    return {**rest, "video": video, "autoencoder": cfglib.to_dict(record)}
