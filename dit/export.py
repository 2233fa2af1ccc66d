"""A trained DiT ready for sampling: ``export/`` of an ``ldm train`` run.

The folder holds the EMA weights in ``save_pretrained``'s format (``model.safetensors`` +
``config.json``) and ``training.json``, the typed `Export` context: the autoencoder the DiT was
trained for (an `AERecord`), the clips and latent spec of its training data, the per-part latent
statistics the trainer standardised with (sampling undoes them), and the text encoder of the
cached caption embeddings. ``load_export`` gives both back; ``ldm sample`` / ``eval`` /
``compare`` / ``demo`` read nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dit.config import DiTConfig
from dit.model import VideoDiT
from dit.registry import load_pretrained, save_state
from ldm import config as cfglib
from ldm.artifacts import AERecord, ClipSpec, load_versioned, migrate_v1_record
from ldm.checkpoint import atomic_write_json, read_json
from ldm.errors import MissingInput, UserError

TRAINING_JSON = "training.json"


@dataclass(frozen=True)
class Export:
    autoencoder: AERecord
    video: ClipSpec
    latent_spec: dict[str, Any]  # LatentSpec.to_dict() of the training latents
    form: str
    latent_norm: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # part -> mean / std
    text_encoder: str | None = None
    text_dim: int | None = None
    text_fingerprint: tuple[float, ...] | None = None  # ldm.text.fingerprint at extraction
    text_max_length: int | None = None  # its token length at extraction (None: recorded before it was)
    text_tokens: int = 0
    num_classes: int = 0
    class_names: tuple[str, ...] = ()  # name of each class id, from the extraction (`ldm sample --class NAME`)
    flow_shift: float = 1.0  # the timestep shift it was trained with (flow.shift); sampling's default
    mixed_shapes: bool = False  # trained on several clip shapes (buckets): `video` is only the first folder's
    version: int = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str = TRAINING_JSON) -> "Export":
        return load_versioned(cls, data, what, {1: _from_v1})

    def to_dict(self) -> dict[str, Any]:
        return cfglib.to_dict(self)


_V1_DROPPED = ("stats",)  # version 1 also copied the manifest's raw statistics (latent_norm has what is used)


def _from_v1(d: dict[str, Any]) -> dict[str, Any]:
    return migrate_v1_record({k: v for k, v in d.items() if k not in _V1_DROPPED})


def load_text_encoder(export: Export, device: str | torch.device | None = None, spec: str | None = None):
    """The text encoder the DiT's caption embeddings came from (``export.text_encoder``, recorded at
    extraction; or ``spec``, the same model in another folder: ``--text-encoder``) at the token length they
    were cut to (``export.text_max_length``; the encoder's default for exports that predate it), checked
    against the recorded width and fingerprint: a folder that moved or holds another model is a
    `UserError` that says so."""
    from ldm.text import absolute_spec, build_text_encoder, fingerprint, same_fingerprint

    if spec is None:
        where = (f"the text encoder the training captions were embedded with ({export.text_encoder!r}, recorded at "
                 "extraction)")
        moved, now, other = ("put that folder back where it was, or give its new place with --text-encoder SPEC",
                             "now ", "that folder holds another model than at extraction")
    else:
        where = f"--text-encoder {spec}"
        moved, now, other = ("give the folder of the model the DiT was trained with", "",
                             f"not the model the DiT was trained with ({export.text_encoder!r} at extraction)")
        if not export.text_fingerprint:
            raise UserError(f"{where}: this DiT's export records no fingerprint of its text encoder (made before "
                            f"they were recorded), so another folder cannot be checked; put {export.text_encoder!r} "
                            "back where it was")
        spec = absolute_spec(spec)
    try:
        encoder = build_text_encoder(spec or export.text_encoder, max_length=export.text_max_length, device=device)
    except (ValueError, FileNotFoundError) as e:  # the folder moved or holds something else now
        kind = MissingInput if isinstance(e, FileNotFoundError) else UserError
        raise kind(f"{where} cannot be loaded ({str(e).rstrip('.')}); {moved}") from None
    if export.text_dim and encoder.dim != export.text_dim:
        raise UserError(f"{where} {now}gives {encoder.dim}-d embeddings, the DiT was trained on {export.text_dim}-d: "
                        f"{other}")
    if export.text_fingerprint and not same_fingerprint(fingerprint(encoder), export.text_fingerprint):
        raise UserError(f"{where} {now}embeds a probe prompt differently than at extraction: {other} (or another "
                        "tokenizer)")
    return encoder


def save_export(path: str | Path, state: dict[str, torch.Tensor], config: DiTConfig, context: Export) -> None:
    """EMA weights ``state`` of a DiT with ``config`` + ``training.json`` into ``path``."""
    save_state(path, state, config)
    atomic_write_json(Path(path) / TRAINING_JSON, context.to_dict())


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[VideoDiT, Export]:
    """The DiT of an export folder (or of a run folder's ``export/``), in eval mode on ``device``,
    and its `Export` context."""
    path = Path(path)
    if (path / "export").is_dir():
        path = path / "export"
    if not (path / TRAINING_JSON).exists():
        raise FileNotFoundError(f"{path} is not an `ldm train` export (no {TRAINING_JSON})")
    context = Export.from_dict(read_json(path / TRAINING_JSON), what=str(path / TRAINING_JSON))
    return load_pretrained(path).to(device).eval(), context
