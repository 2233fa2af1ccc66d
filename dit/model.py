"""``VideoDiT``: one diffusion transformer for every latent form (grid, token sets, varlen).

The latent is turned into typed token groups by ``dit.tokens`` (one group per latent part, plus
optional clean first-frame tokens for image-to-video); each group has its own input projection,
type embedding and zero-initialised output head, and all groups share one token sequence with
integer (t, h, w) positions for 3D RoPE. The trunk is DiT (Peebles & Xie 2023) with adaLN-Zero
(Sec. 3.2) conditioned on the timestep and an optional class label (embedding table with a null
row for classifier-free guidance), plus optional cross-attention to projected text embeddings
(PixArt-alpha). Networks take ``(x, t, cond)`` only (STYLE.md 5): the flow path, loss and
samplers are in ``ldm.flow`` / ``ldm.samplers``.

Variable-length batches run either padded (rows of ``(B, N)`` with a padding mask) or packed
(``pack=True``: the valid tokens of all samples in one row, attention restricted per sample by
sequence ids — flash-attn varlen / FlexAttention / grouped SDPA). Both give the same result.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dit.config import FIRST_FRAME, DiTConfig
from dit.tokens import GRID, PartSpec, Tokens, count_tokens, detokenize, packing, part_specs, tokenize
from ldm.latent import Cond, Latent
from ldm.cost import transformer_block_flops
from ldm.layers import (FinalLayer, Rope3D, TimestepEmbedder, TokenLayout, TransformerBlock, group_ids,
                        set_attention_backend)


def sincos_embedding_3d(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed absolute position embedding of integer ``(t, h, w)`` positions ``(..., 3)`` ->
    ``(..., dim)`` float32: the sin-cos embedding of DiT (Peebles & Xie 2023, Sec. 3.2, after
    Vaswani et al. 2017, Sec. 3.5) per axis, on ``dim - 2 s``, ``s``, ``s`` channels (``s`` the
    largest even number <= dim / 3), frequencies ``base^(-i / half)``."""
    share = (dim // 3) // 2 * 2
    out = []
    for axis, d in enumerate((dim - 2 * share, share, share)):
        half = d // 2
        freq = base ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / max(half, 1))
        angle = positions[..., axis].double()[..., None] * freq  # (..., half)
        out += [angle.sin(), angle.cos()]
    return torch.cat(out, -1).float()


class VideoDiT(nn.Module):
    """Denoiser ``v = f(x_t, t, cond)`` returning one velocity per latent part, in the part's shape."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not config.parts:
            raise ValueError("DiTConfig.parts is empty: build the DiT for a latent "
                             "(dit.registry.build(name, latent_parts=...))")
        self.config = config
        self._trunk_flops: dict[tuple, int] = {}  # trunk_flops per sample shape
        D = config.hidden
        self.specs = part_specs(config.parts, config.patch, config.part_patch)
        self.first_frame_spec = (PartSpec(FIRST_FRAME, GRID, config.first_frame_channels, (1, *config.patch[1:]))
                                 if config.first_frame_channels else None)
        in_specs = self.specs + ([self.first_frame_spec] if self.first_frame_spec else [])
        self.embed = nn.ModuleDict({s.name: nn.Linear(s.token_dim, D) for s in in_specs})
        # keyed by name, so a config whose parts come back in another order (JSON) loads the same
        self.type_embed = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(D)) for s in in_specs})
        self.t_embed = TimestepEmbedder(D, config.freq_dim)
        self.class_embed = nn.Embedding(config.num_classes + 1, D) if config.num_classes else None  # last row: null
        if config.text_dim:
            self.text_proj = nn.Sequential(nn.Linear(config.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
            self.text_null = nn.Parameter(torch.zeros(1, D))  # always-visible context token (empty text)
        else:
            self.text_proj, self.text_null = None, None
        self.rope = Rope3D(config.head_dim, config.rope_axes, config.rope_theta)
        layouts = (["full"] * config.depth if config.attn_layout == "full"
                   else ["spatial" if i % 2 == 0 else "temporal" for i in range(config.depth)])
        self.blocks = nn.ModuleList([
            TransformerBlock(D, config.heads, config.mlp_ratio, context_dim=D if config.text_dim else None,
                             qk_norm=config.qk_norm, layout=layout) for layout in layouts])
        self.heads = nn.ModuleDict({s.name: FinalLayer(D, s.token_dim) for s in self.specs})
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, N(0, 0.02) embeddings and timestep MLP,
        zero adaLN modulation and zero output heads (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for p in self.type_embed.values():
            nn.init.normal_(p, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        if self.text_null is not None:
            nn.init.normal_(self.text_null, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada.weight)
            nn.init.zeros_(blk.ada.bias)
        for head in self.heads.values():
            for lin in (head.ada, head.linear):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # --- helpers ---------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_tokens(self, parts: Mapping[str, tuple[int, ...]]) -> int:
        """Tokens per sample for per-sample part shapes (``LatentSpec.parts``), without I2V tokens."""
        return count_tokens(parts, self.specs)

    def trunk_flops(self, parts: Mapping[str, tuple[int, ...]], context: int = 0) -> int:
        """Forward FLOPs of ONE sample of per-sample part shapes ``parts`` through the blocks
        (`ldm.cost.transformer_block_flops`; cross-attention to ``context`` tokens), each block's
        attention over its own groups: the whole sequence (``full``: 4 N^2 d), or the sum over its
        groups of 4 g^2 d -- frames (``spatial``), sites across the frames (``temporal``).
        Embeddings and heads are left out; a training step is ~3x. Cached per shape."""
        key = (tuple(sorted((k, tuple(v)) for k, v in parts.items())), context)
        if key not in self._trunk_flops:
            tokens = tokenize({k: torch.zeros(1, *v) for k, v in parts.items()}, self.specs)
            n, d = tokens.positions.shape[-2], self.config.hidden
            linear, attention = transformer_block_flops(n, d, self.config.mlp_ratio, context=context)
            pairs = {"full": n * n}  # (query, key) pairs of one block's self-attention
            for layout in {blk.layout for blk in self.blocks} - {"full"}:
                ids = group_ids(tokens.positions[0], None, (0,) if layout == "spatial" else (1, 2))
                pairs[layout] = int((torch.bincount(ids.flatten()) ** 2).sum())
            self._trunk_flops[key] = sum(linear + attention + 4 * d * (pairs[blk.layout] - n * n)
                                         for blk in self.blocks)
        return self._trunk_flops[key]

    def set_attention_backend(self, backend: str) -> None:
        """Route all attention through ``backend`` (``ldm.attention.BACKENDS``)."""
        set_attention_backend(self, backend)

    def null_cond(self, cond: Cond | None, drop: Tensor | None = None) -> Cond:
        """The null condition for CFG (and condition dropout in training): class -> null class,
        text -> fully masked (only the learned empty-text token stays visible), for the samples
        where ``drop`` (``(B,)`` bool) is True, or all when ``drop`` is None. A first frame
        (image-to-video) is kept: guidance is over class and text."""
        cond = cond if cond is not None else Cond()
        if drop is None:
            return Cond(text=None if cond.text is None else torch.zeros_like(cond.text),
                        text_mask=None if cond.text is None else torch.zeros(cond.text.shape[:2], dtype=torch.bool,
                                                                              device=cond.text.device),
                        first_frame=cond.first_frame,
                        class_id=None if cond.class_id is None else torch.full_like(cond.class_id, -1))
        drop = drop.to(torch.bool)
        text = text_mask = class_id = None
        if cond.text is not None:
            text = torch.where(drop[:, None, None], torch.zeros_like(cond.text), cond.text)
            mask = cond.text_mask if cond.text_mask is not None else torch.ones(
                cond.text.shape[:2], dtype=torch.bool, device=cond.text.device)
            text_mask = mask & ~drop[:, None]
        if cond.class_id is not None:
            class_id = torch.where(drop, torch.full_like(cond.class_id, -1), cond.class_id)
        return Cond(text=text, text_mask=text_mask, first_frame=cond.first_frame, class_id=class_id)

    def _condition(self, t: Tensor, cond: Cond, B: int) -> Tensor:
        """adaLN input: timestep embedding + class embedding (null row for ``class_id < 0``)."""
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        c = self.t_embed(t)  # (B, D)
        if self.class_embed is None:
            if cond.class_id is not None:
                raise ValueError("this DiT has no class conditioning (num_classes=0) but got class ids; "
                                 "pass Cond(class_id=None)")
            return c
        null = self.config.num_classes
        if cond.class_id is None:
            ids = torch.full((B,), null, dtype=torch.long, device=t.device)
        else:
            ids = cond.class_id.long()
        if ids.shape != (B,):
            raise ValueError(f"class_id must have shape ({B},), got {tuple(ids.shape)}")
        # -1 (and num_classes itself) select the null row; larger ids fail in the embedding lookup.
        return c + self.class_embed(torch.where(ids < 0, null, ids))

    def _context(self, cond: Cond, B: int) -> tuple[Tensor | None, Tensor | None]:
        """Projected text ``(B, 1 + L, D)`` with the empty-text token first, and the context ids
        ``(B, 1 + L)`` (0 visible, -1 masked; None when nothing is masked)."""
        if self.text_proj is None:
            if cond.text is not None:
                raise ValueError("this DiT has no text conditioning (text_dim=0) but got text embeddings")
            return None, None
        null = self.text_null.expand(B, 1, -1)
        if cond.text is None:
            return null, None
        if cond.text.ndim != 3 or cond.text.shape[0] != B or cond.text.shape[2] != self.config.text_dim:
            raise ValueError(f"text must be (B={B}, L, {self.config.text_dim}), got {tuple(cond.text.shape)}")
        ctx = torch.cat([null, self.text_proj(cond.text.to(null.dtype))], 1)  # (B, 1+L, D)
        if cond.text_mask is None:
            return ctx, None
        if cond.text_mask.shape != cond.text.shape[:2]:
            raise ValueError(f"text_mask {tuple(cond.text_mask.shape)} does not match text "
                             f"{tuple(cond.text.shape[:2])}")
        visible = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=ctx.device), cond.text_mask.bool()], 1)
        return ctx, torch.where(visible, 0, -1)

    # --- forward ---------------------------------------------------------------------------
    def tokenize(self, x: Mapping[str, Tensor], cond: Cond | None = None) -> Tokens:
        """The token groups of a batch: the latent parts, then the clean first frame when given."""
        cond = cond if cond is not None else Cond()
        parts = dict(x.parts) if isinstance(x, Latent) else dict(x)
        lengths = x.aux["length"] if isinstance(x, Latent) and x.form == "varlen" else None
        specs = list(self.specs)
        if cond.first_frame is not None:
            if self.first_frame_spec is None:
                raise ValueError("this DiT has no image-to-video input (first_frame_channels=0) but got a first frame")
            ff = cond.first_frame
            if ff.ndim != 5 or ff.shape[1:3] != (self.config.first_frame_channels, 1):
                raise ValueError(f"first_frame must be a latent (B, {self.config.first_frame_channels}, 1, h, w), "
                                 f"got {tuple(ff.shape)}")
            parts[FIRST_FRAME] = ff
            specs.append(self.first_frame_spec)
        return tokenize(parts, specs, lengths)

    def forward(self, x: Mapping[str, Tensor], t: Tensor, cond: Cond | None = None, *,
                pack: bool = False) -> dict[str, Tensor]:
        """``x``: noisy latent parts (a ``Latent`` or a dict; a varlen ``Latent`` carries
        ``aux["length"]``), ``t``: ``(B,)`` flow times, ``cond``: ``Cond`` (class_id ``(B,)`` with
        -1 = none, text ``(B, L, text_dim)`` + text_mask, first_frame latent). Returns velocities
        with the shapes of ``x``'s parts (zero past each varlen sample's length)."""
        cond = cond if cond is not None else Cond()
        tokens = self.tokenize(x, cond)
        B = tokens.positions.shape[0]
        dtype = self.type_embed[self.specs[0].name].dtype  # the model's compute dtype (e.g. bf16 under DeepSpeed)
        h = torch.cat([self.embed[g.spec.name](tokens.features[g.spec.name].to(dtype)) + self.type_embed[g.spec.name]
                       for g in tokens.groups], 1)  # (B, N, D)
        if self.config.abs_pos:
            h = h + sincos_embedding_3d(tokens.positions, h.shape[-1]).to(h.dtype)  # (B, N, D)
        c = self._condition(t, cond, B)  # (B, D)
        context, context_ids = self._context(cond, B)

        if pack:
            valid = tokens.valid
            if valid is None:
                valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            pk = packing(valid)
            h = pk.pack(h)  # (1, T, D)
            positions = pk.pack(tokens.positions)  # (1, T, 3)
            layout = TokenLayout(positions, pk.seq_ids, self.rope(positions), cond_index=pk.seq_ids)
            if context is not None:
                rows = torch.arange(B, device=h.device)[:, None].expand(B, context.shape[1])
                ids = rows if context_ids is None else torch.where(context_ids >= 0, rows, -1)
                context, context_ids = context.reshape(1, -1, context.shape[-1]), ids.reshape(1, -1)  # (1, B*(1+L), D)
        else:
            seq_ids = None if tokens.valid is None else torch.where(tokens.valid, 0, -1)
            # one grid or token set without padding: spatial / temporal groups are dense reshapes
            g = tokens.groups[0].grid
            grids = (g[0], (g[1] * g[2],)) if seq_ids is None and len(tokens.groups) == 1 else None
            layout = TokenLayout(tokens.positions, seq_ids, self.rope(tokens.positions), grids=grids)

        for blk in self.blocks:
            h = blk(h, c, layout, context, context_ids)
        if pack:
            h = pk.unpack(h)  # (B, N, D)
        groups = tokens.split(h)
        out = {s.name: self.heads[s.name](groups[s.name], c).to(tokens.features[s.name].dtype) for s in self.specs}
        return detokenize(out, tokens)

