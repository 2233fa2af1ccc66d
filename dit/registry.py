"""DiT configs and the registry: ``build(name, latent_parts=..., **overrides)`` is the only way
scripts make denoisers (STYLE.md 4).

Sizes follow the DiT paper (Peebles & Xie 2023, Table 1): S 12x384 (6 heads), B 12x768 (12),
L 24x1024 (16), XL 28x1152 (16), all with MLP ratio 4. ``dit-standard`` is Hi-VAE's standardized
cost DiT (Hi-VAE Appendix C.2: 8 layers, 8 heads, hidden 512, FFN 2048, full self-attention over
all tokens). ``dit-debug`` is tiny, for CPU tests and the demo.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ldm import config as cfglib
from ldm.checkpoint import atomic_write_json, load_tensors, read_json, save_tensors
from ldm.latent import LatentSpec

if TYPE_CHECKING:
    from dit.model import VideoDiT

ATTN_LAYOUTS = ("full", "factorized")
FIRST_FRAME = "first_frame"  # reserved group name for the clean image-to-video tokens


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a ``VideoDiT`` (no paths, dtypes or parallel flags).

    ``parts`` maps each latent part to its per-sample shape as in ``LatentSpec.parts``: grids
    ``(c, t, h, w)`` (patchified with ``part_patch.get(name, patch)``) and token sets ``(f, n, c)``.
    Only channels and kinds shape the weights; t/h/w/f/n are the reference size (positions are
    RoPE, so other sizes run too). ``num_classes = 0`` / ``text_dim = 0`` /
    ``first_frame_channels = 0`` switch class, text and image-to-video conditioning off.
    ``attn_layout``: ``"full"`` 3D attention in every block, or ``"factorized"``: blocks alternate
    spatial (within a frame) and temporal (across frames) attention. ``abs_pos``: besides RoPE
    (relative offsets only), tokens get DiT's fixed sin-cos embedding of their absolute position,
    extended to (t, h, w), so a token knows where in the clip it is (e.g. early or late frame).
    """

    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    patch: tuple[int, int, int] = (1, 2, 2)
    parts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    part_patch: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    num_classes: int = 0
    text_dim: int = 0
    first_frame_channels: int = 0
    attn_layout: str = "full"
    abs_pos: bool = False  # add a fixed 3D sin-cos embedding of the (t, h, w) positions to the tokens
    qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_axes: tuple[int, int, int] | None = None
    freq_dim: int = 256

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.abs_pos and self.hidden % 2:
            raise ValueError(f"abs_pos needs an even hidden size (sin-cos pairs), got {self.hidden}")
        if self.attn_layout not in ATTN_LAYOUTS:
            raise ValueError(f"attn_layout {self.attn_layout!r} is not one of {ATTN_LAYOUTS}")
        if FIRST_FRAME in self.parts:
            raise ValueError(f"a latent part may not be named {FIRST_FRAME!r} (reserved for image-to-video tokens)")
        for name, shape in self.parts.items():
            if len(shape) not in (3, 4) or any(int(s) < 1 for s in shape):
                raise ValueError(f"part {name!r}: shape {shape} is neither a grid (c t h w) nor a token set (f n c)")
        if min(self.num_classes, self.text_dim, self.first_frame_channels) < 0:
            raise ValueError("num_classes, text_dim and first_frame_channels must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


REGISTRY: dict[str, DiTConfig] = {
    "dit-debug": DiTConfig(hidden=64, depth=2, heads=4),
    "dit-S": DiTConfig(hidden=384, depth=12, heads=6),
    "dit-B": DiTConfig(hidden=768, depth=12, heads=12),
    "dit-L": DiTConfig(hidden=1024, depth=24, heads=16),
    "dit-XL": DiTConfig(hidden=1152, depth=28, heads=16),
    "dit-standard": DiTConfig(hidden=512, depth=8, heads=8, mlp_ratio=4.0, attn_layout="full"),
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
          **overrides: Any) -> "VideoDiT":
    """Build registered DiT ``name`` for a latent (see ``make_config``)."""
    from dit.model import VideoDiT  # the model module imports DiTConfig from here

    return VideoDiT(make_config(name, latent_parts, **overrides))


def num_parameters(cfg: DiTConfig) -> int:
    """Parameter count of a config, computed on the meta device (no memory allocated)."""
    from dit.model import VideoDiT

    with torch.device("meta"):
        return VideoDiT(cfg).num_parameters()


def describe(name: str, latent_parts: LatentSpec | Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Registry entry as a JSON-able dict (for ``ldm list``): architecture and parameter count for
    ``latent_parts`` (default: one 4-channel grid part 4x32x32)."""
    cfg = make_config(name, latent_parts if latent_parts is not None else {"z": (4, 4, 32, 32)})
    return {"name": name, "hidden": cfg.hidden, "depth": cfg.depth, "heads": cfg.heads,
            "ffn": int(cfg.hidden * cfg.mlp_ratio), "patch": list(cfg.patch), "attn_layout": cfg.attn_layout,
            "params": num_parameters(cfg), "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}


def save_pretrained(model: "VideoDiT", path: str | Path, name: str | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (never pickle)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "model.safetensors", model.state_dict())
    atomic_write_json(path / "config.json", {"kind": "dit", "name": name, "config": cfglib.to_dict(model.config)})


def load_pretrained(path: str | Path, strict: bool = True) -> "VideoDiT":
    """Load a folder written by ``save_pretrained``."""
    from dit.model import VideoDiT

    path = Path(path)
    meta = read_json(path / "config.json")
    if meta.get("kind") != "dit":
        raise ValueError(f"{path} does not hold a DiT checkpoint (config.json kind={meta.get('kind')!r})")
    model = VideoDiT(cfglib.from_dict(DiTConfig, meta["config"]))
    model.load_state_dict(load_tensors(path / "model.safetensors"), strict=strict)
    return model
