"""``DiTConfig``: the architecture of a ``VideoDiT`` as a frozen dataclass (STYLE.md 3). The model
(``dit/model.py``) and the registry (``dit/registry.py``) both import it; neither imports the other
lazily."""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm.layers import rope_axes

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
        try:
            rope_axes(self.head_dim, self.rope_axes)
        except ValueError as e:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} = head dim {self.head_dim}: {e} (choose "
                             "hidden and heads for an even head dim >= 6, or rope_axes)") from None
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
