"""DiT configs and the registry: ``build(name, latent_parts=..., **overrides)`` is the only way
scripts make denoisers (STYLE.md 4).

Sizes follow the DiT paper (Peebles & Xie 2023, Table 1): S 12x384 (6 heads), B 12x768 (12),
L 24x1024 (16), XL 28x1152 (16), all with MLP ratio 4. ``dit-standard`` is Hi-VAE's standardized
cost DiT (Hi-VAE Appendix C.2: 8 layers, 8 heads, hidden 512, FFN 2048, full self-attention over
all tokens). ``dit-hivae`` is Hi-VAE's motion generator (App. A.3: 16 layers, hidden 1152; heads
and full 3D attention are guesses, see below) with its tiny twin ``dit-hivae-debug``. ``dit-debug``
is tiny, for CPU tests and the demo.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dit.config import DiTConfig
from dit.model import VideoDiT
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_json, load_tensors, read_json, save_tensors
from ldm.latent import LatentSpec

REGISTRY: dict[str, DiTConfig] = {
    "dit-debug": DiTConfig(hidden=64, depth=2, heads=4),
    "dit-S": DiTConfig(hidden=384, depth=12, heads=6),
    "dit-B": DiTConfig(hidden=768, depth=12, heads=12),
    "dit-L": DiTConfig(hidden=1024, depth=24, heads=16),
    "dit-XL": DiTConfig(hidden=1152, depth=28, heads=16),
    "dit-standard": DiTConfig(hidden=512, depth=8, heads=8, mlp_ratio=4.0, attn_layout="full"),
    # Hi-VAE App. A.3 gives 16 layers and hidden 1152 only. Guesses: 16 heads (DiT-XL's, head width 72)
    # and full 3D attention in every block, where the paper adds a temporal self-attention to each
    # layer (alternative: attn_layout="factorized", blocks alternating spatial and temporal attention)
    "dit-hivae": DiTConfig(hidden=1152, depth=16, heads=16, mlp_ratio=4.0, attn_layout="full"),
    "dit-hivae-debug": DiTConfig(hidden=64, depth=2, heads=4, mlp_ratio=4.0, attn_layout="full"),
}


def make_config(name: str, latent_parts: LatentSpec | Mapping[str, tuple[int, ...]] | None = None,
                **overrides: Any) -> DiTConfig:
    """The registered config ``name`` with its latent parts (a ``LatentSpec`` or its ``parts``)
    and strict overrides (unknown keys are errors)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown DiT {name!r}; registered: {sorted(REGISTRY)}")
    if latent_parts is not None:
        if "parts" in overrides:
            raise ValueError("give latent_parts or parts=, not both")
        parts = latent_parts.parts if isinstance(latent_parts, LatentSpec) else latent_parts
        overrides["parts"] = {k: tuple(int(s) for s in v) for k, v in parts.items()}
    cfg = cfglib.replace(REGISTRY[name], **overrides)
    if not cfg.parts:
        raise ValueError(f"DiT {name!r} needs latent_parts (the autoencoder's LatentSpec or its parts)")
    return cfg


def build(name: str, latent_parts: LatentSpec | Mapping[str, tuple[int, ...]] | None = None,
          **overrides: Any) -> VideoDiT:
    """Build registered DiT ``name`` for a latent (see ``make_config``)."""
    return VideoDiT(make_config(name, latent_parts, **overrides))


def num_parameters(cfg: DiTConfig) -> int:
    """Parameter count of a config, computed on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return VideoDiT(cfg).num_parameters()


def describe(name: str, latent_parts: LatentSpec | Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Registry entry as a JSON-able dict (for ``ldm list``): architecture and parameter count for
    ``latent_parts`` (default: one 4-channel grid part 4x32x32)."""
    cfg = make_config(name, latent_parts if latent_parts is not None else {"z": (4, 4, 32, 32)})
    return {"name": name, "hidden": cfg.hidden, "depth": cfg.depth, "heads": cfg.heads,
            "ffn": int(cfg.hidden * cfg.mlp_ratio), "patch": list(cfg.patch), "attn_layout": cfg.attn_layout,
            "params": num_parameters(cfg), "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}


def save_pretrained(model: VideoDiT, path: str | Path, name: str | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (never pickle)."""
    save_state(path, model.state_dict(), model.config, name)


def save_state(path: str | Path, state: dict[str, torch.Tensor], config: DiTConfig, name: str | None = None) -> None:
    """``save_pretrained`` of weights kept apart from a model (e.g. an EMA copy)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "model.safetensors", state)
    atomic_write_json(path / "config.json", {"kind": "dit", "name": name, "config": cfglib.to_dict(config)})


def load_pretrained(path: str | Path, strict: bool = True) -> VideoDiT:
    """Load a folder written by ``save_pretrained``."""
    path = Path(path)
    meta = read_json(path / "config.json")
    if meta.get("kind") != "dit":
        raise ValueError(f"{path} does not hold a DiT checkpoint (config.json kind={meta.get('kind')!r})")
    model = VideoDiT(cfglib.from_dict(DiTConfig, meta["config"]))
    model.load_state_dict(load_tensors(path / "model.safetensors"), strict=strict)
    return model
