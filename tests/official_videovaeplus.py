"""A test-only reference of the public VideoVAE+ forward pass (VideoVerses/VideoVAEPlus
``AutoencoderKL2plus1D_1dcnn``), written from its semantics as plain functions over a state dict with
the OFFICIAL key names, so the converter (autoencoders/crossmodal_weights.py) can be checked without
the released files.

What it follows from the public code: GroupNorm over the whole clip everywhere in the first stage;
residual blocks with (1, 3, 3) convs each followed by a residual norm -> SiLU -> 3x3x3 temporal conv
(the shortcut's one only where the width changes, although every block holds one); the mid block's
per-frame attention with separate q/k/v and its temporal attention with relative-position tables
(including the public code's key-position term ``q_j . a_k(i - j)``); zero padding of one row/column
before each stride-2 conv; spatial-only nearest upsampling; text cross-attention on p x p patches
with bias-free q/k/v; the temporal autoencoder with replicate "same" padding, its transposed-conv
upsampling and the 4h -> 4h -> 2h decoder widths. Encoding takes posterior means (``mode()``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z: int = 4
    quant_conv: bool = True
    hidden: int = 128  # temporal AE width at full frame rate
    groups: int = 32
    text_dim: int = 0  # 0: no text layers
    heads: int = 8
    dim_head: int = 64
    max_distance: int = 64


def official_shapes(L: Layout) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def p(name, *shape):
        shapes[name] = shape

    def conv(name, o, i, *k, bias=True):
        p(name + ".weight", o, i, *k)
        if bias:
            p(name + ".bias", o)

    def norm(name, c):
        p(name + ".weight", c)
        p(name + ".bias", c)

    def tmp(name, c):
        norm(name + ".norm", c)
        conv(name + ".conv", c, c, 3, 3, 3)

    def res(name, ci, co):
        norm(name + ".norm1", ci)
        conv(name + ".conv1", co, ci, 1, 3, 3)
        tmp(name + ".conv1_tmp", co)
        norm(name + ".norm2", co)
        conv(name + ".conv2", co, co, 1, 3, 3)
        tmp(name + ".conv2_tmp", co)
        if ci != co:
            conv(name + ".nin_shortcut", co, ci, 1, 1, 1)
        tmp(name + ".conv3_tmp", co)  # held by every block

    def text(name, c, patch):
        d = c * patch * patch
        norm(name + ".norm", d)
        conv(name + ".to_q", L.heads * L.dim_head, d, bias=False)
        conv(name + ".to_k", L.heads * L.dim_head, L.text_dim, bias=False)
        conv(name + ".to_v", L.heads * L.dim_head, L.text_dim, bias=False)
        conv(name + ".to_out.0", d, L.heads * L.dim_head)

    def mid(name, c):
        res(name + ".block_1", c, c)
        norm(name + ".attn_1.norm", c)
        for k in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{k}", c, c, 1, 1, 1)
        norm(name + ".attn_1_tmp.norm", c)
        conv(name + ".attn_1_tmp.qkv", 3 * c, c, 1)
        p(name + ".attn_1_tmp.relative_position_k.embeddings_table", 2 * L.max_distance + 1, c)
        p(name + ".attn_1_tmp.relative_position_v.embeddings_table", 2 * L.max_distance + 1, c)
        conv(name + ".attn_1_tmp.proj_out", c, c, 1)
        res(name + ".block_2", c, c)

    n = len(L.ch_mult)
    widths = [L.ch * m for m in L.ch_mult]
    conv("encoder.conv_in", L.ch, 3, 1, 3, 3)
    ci = L.ch
    for i, w in enumerate(widths):
        for j in range(L.num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", ci, w)
            ci = w
            if L.text_dim:
                text(f"encoder.down.{i}.attn.{j}", w, 2 ** (n - 1 - i))
        if i < n - 1:
            conv(f"encoder.down.{i}.downsample.conv", w, w, 1, 3, 3)
    mid("encoder.mid", ci)
    norm("encoder.norm_out", ci)
    conv("encoder.conv_out", 2 * L.z, ci, 1, 3, 3)
    conv("decoder.conv_in", ci, L.z, 1, 3, 3)
    mid("decoder.mid", ci)
    for i in reversed(range(n)):
        for j in range(L.num_res_blocks + 1):
            res(f"decoder.up.{i}.block.{j}", ci, widths[i])
            ci = widths[i]
            if L.text_dim:
                text(f"decoder.up.{i}.attn.{j}", ci, 2 ** (n - 1 - i))
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", ci, ci, 1, 3, 3)
    norm("decoder.norm_out", ci)
    conv("decoder.conv_out", 3, ci, 1, 3, 3)
    if L.quant_conv:
        conv("quant_conv", 2 * L.z, 2 * L.z, 1, 1, 1)
        conv("post_quant_conv", L.z, L.z, 1, 1, 1)
    h = L.hidden
    conv("encoder_temporal.conv_in.conv", h, L.z, 3, 3, 3)
    for i in range(2):
        conv(f"encoder_temporal.mid_blocks.{i}.down.conv", h * 2 ** (i + 1), h * 2 ** i, 3, 3, 3)
        c = h * 2 ** (i + 1)
        for k in ("norm1", "norm2"):
            norm(f"encoder_temporal.mid_blocks.{i}.res.{k}", c)
        for k in ("conv1", "conv2"):
            conv(f"encoder_temporal.mid_blocks.{i}.res.{k}.conv", c, c, 3, 3, 3)
        if L.text_dim:
            text(f"encoder_temporal.mid_blocks.{i}.attn.0", c, 1)
    norm("encoder_temporal.final_block.0", 4 * h)
    conv("encoder_temporal.final_block.2.conv", 2 * L.z, 4 * h, 3, 3, 3)
    conv("decoder_temporal.conv_in.conv", 4 * h, L.z, 3, 3, 3)
    for i, (cin, cout) in enumerate(((4 * h, 4 * h), (4 * h, 2 * h))):
        p(f"decoder_temporal.mid_blocks.{i}.up.weight", cin, cout, 3, 3, 3)  # ConvTranspose3d: (in, out, ...)
        p(f"decoder_temporal.mid_blocks.{i}.up.bias", cout)
        for r in ("res1", "res2"):
            for k in ("norm1", "norm2"):
                norm(f"decoder_temporal.mid_blocks.{i}.{r}.{k}", cout)
            for k in ("conv1", "conv2"):
                conv(f"decoder_temporal.mid_blocks.{i}.{r}.{k}.conv", cout, cout, 3, 3, 3)
            if L.text_dim:
                text(f"decoder_temporal.mid_blocks.{i}.attn{r[-1]}.0", cout, 1)
    conv("decoder_temporal.conv_last.conv", L.z, 2 * h, 3, 3, 3)
    return shapes


def official_state_dict(L: Layout, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors under the official names (weights ~ N(0, 1/fan_in) scaled down for the
    residual temporal layers so activations stay O(1), norm affines near identity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in official_shapes(L).items():
        if len(shape) == 1:  # norm scales (the only 1-D weights) and biases
            out[name] = (1 + 0.1 * torch.randn(shape, generator=g)) if name.endswith("weight") \
                else 0.05 * torch.randn(shape, generator=g)
        elif "embeddings_table" in name:
            out[name] = 0.3 * torch.randn(shape, generator=g)
        else:  # a transposed conv (in, out, k...) sees in * k^3 / 2 inputs per output
            fan_in = shape[0] * math.prod(shape[2:]) / 2 if name.endswith("up.weight") else math.prod(shape[1:])
            out[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def parameter_count(L: Layout) -> int:
    return sum(math.prod(s) for s in official_shapes(L).values())


class OfficialVideoVAEPlus:
    """The public forward on an official-named state dict (video mode; images use `encode_image`)."""

    def __init__(self, sd: dict[str, Tensor], L: Layout):
        self.sd, self.L = sd, L

    def w(self, name: str) -> tuple[Tensor, Tensor | None]:
        return self.sd[name + ".weight"], self.sd.get(name + ".bias")

    def gn(self, name: str, x: Tensor, eps: float = 1e-6) -> Tensor:  # GroupNorm over the whole clip
        return F.group_norm(x, math.gcd(x.shape[1], self.L.groups), *self.w(name), eps=eps)

    def conv(self, name: str, x: Tensor, **kw) -> Tensor:
        return F.conv3d(x, *self.w(name), **kw)

    def same(self, name: str, x: Tensor, stride=(1, 1, 1)) -> Tensor:  # replicate "same" padding
        pads = []
        for k, s in zip((3, 3, 3)[::-1], stride[::-1]):
            total = k - s
            pads += [total // 2 + total % 2, total // 2]
        return F.conv3d(F.pad(x, pads, mode="replicate"), *self.w(name), stride=stride)

    def res(self, name: str, x: Tensor, temporal: bool) -> Tensor:
        tmp = lambda n, h: self.conv(n + ".conv", F.silu(self.gn(n + ".norm", h)), padding=1)  # noqa: E731
        h = self.conv(name + ".conv1", F.silu(self.gn(name + ".norm1", x)), padding=(0, 1, 1))
        if temporal:
            h = tmp(name + ".conv1_tmp", h) + h
        h = self.conv(name + ".conv2", F.silu(self.gn(name + ".norm2", h)), padding=(0, 1, 1))
        if temporal:
            h = tmp(name + ".conv2_tmp", h) + h
        if name + ".nin_shortcut.weight" in self.sd:
            x = self.conv(name + ".nin_shortcut", x)
            if temporal:
                x = tmp(name + ".conv3_tmp", x) + x
        return x + h

    def text(self, name: str, x: Tensor, context: Tensor, mask: Tensor | None, patch: int) -> Tensor:
        b, c, t, H, W = x.shape
        tok = rearrange(x, "b c t (h p) (w q) -> (b t) (h w) (p q c)", p=patch, q=patch)
        tok = F.layer_norm(tok, tok.shape[-1:], *self.w(name + ".norm"))
        ctx = context.repeat_interleave(t, dim=0)
        heads = self.L.heads
        q = rearrange(tok @ self.sd[name + ".to_q.weight"].T, "n l (h d) -> n h l d", h=heads)
        k = rearrange(ctx @ self.sd[name + ".to_k.weight"].T, "n l (h d) -> n h l d", h=heads)
        v = rearrange(ctx @ self.sd[name + ".to_v.weight"].T, "n l (h d) -> n h l d", h=heads)
        sim = q @ k.transpose(-1, -2) * self.L.dim_head ** -0.5
        if mask is not None:
            keep = mask.repeat_interleave(t, dim=0)[:, None, None, :] > 0.5
            sim = sim.masked_fill(~keep, -torch.finfo(sim.dtype).max)
        out = rearrange(sim.softmax(-1) @ v, "n h l d -> n l (h d)")
        out = F.linear(out, *self.w(name + ".to_out.0"))
        return rearrange(out, "(b t) (h w) (p q c) -> b c t (h p) (w q)", b=b, h=H // patch, p=patch, q=patch)

    def mid(self, name: str, x: Tensor, temporal: bool) -> Tensor:
        h = self.res(name + ".block_1", x, temporal)
        b, c, t, H, W = h.shape
        a = self.gn(name + ".attn_1.norm", h)
        q, k, v = (rearrange(self.conv(f"{name}.attn_1.{n}", a), "b c t h w -> (b t) (h w) c") for n in "qkv")
        o = (q @ k.transpose(1, 2) * c ** -0.5).softmax(-1) @ v
        h = h + self.conv(name + ".attn_1.proj_out", rearrange(o, "(b t) (h w) c -> b c t h w", b=b, h=H))
        if temporal:
            n = name + ".attn_1_tmp"
            s = rearrange(h, "b c t h w -> (b h w) c t")
            qkv = F.conv1d(F.group_norm(s, math.gcd(c, self.L.groups), *self.w(n + ".norm")), *self.w(n + ".qkv"))
            q, k, v = (u * c ** -0.25 if i < 2 else u for i, u in enumerate(qkv.chunk(3, 1)))
            pos = torch.arange(t)
            rel = (pos[None, :] - pos[:, None]).clamp(-self.L.max_distance, self.L.max_distance) + self.L.max_distance
            k_rp = self.sd[n + ".relative_position_k.embeddings_table"][rel]  # [query t, key s, c]
            v_rp = self.sd[n + ".relative_position_v.embeddings_table"][rel]
            wgt = torch.einsum("nct,ncs->nts", q, k)
            wgt = wgt + torch.einsum("nct,tsc->nst", q, k_rp)  # as the public code writes it
            wgt = wgt.softmax(-1)
            o = torch.einsum("nts,ncs->nct", wgt, v) + torch.einsum("nts,tsc->nct", wgt, v_rp)
            h = h + rearrange(F.conv1d(o, *self.w(n + ".proj_out")), "(b h w) c t -> b c t h w", b=b, h=H, w=W)
        return self.res(name + ".block_2", h, temporal)

    # --- stages ------------------------------------------------------------------------------
    def first_encoder(self, x, context, mask, temporal=True) -> Tensor:
        n, L = len(self.L.ch_mult), self.L
        h = self.conv("encoder.conv_in", x, padding=(0, 1, 1))
        for i in range(n):
            for j in range(L.num_res_blocks):
                h = self.res(f"encoder.down.{i}.block.{j}", h, temporal)
                if L.text_dim:
                    h = h + self.text(f"encoder.down.{i}.attn.{j}", h, context, mask, 2 ** (n - 1 - i))
            if i < n - 1:
                h = self.conv(f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=(1, 2, 2))
        h = self.mid("encoder.mid", h, temporal)
        h = self.conv("encoder.conv_out", F.silu(self.gn("encoder.norm_out", h)), padding=(0, 1, 1))
        return self.conv("quant_conv", h) if L.quant_conv else h

    def first_decoder(self, z, context, mask, temporal=True) -> Tensor:
        n, L = len(self.L.ch_mult), self.L
        if L.quant_conv:
            z = self.conv("post_quant_conv", z)
        h = self.mid("decoder.mid", self.conv("decoder.conv_in", z, padding=(0, 1, 1)), temporal)
        for i in reversed(range(n)):
            for j in range(L.num_res_blocks + 1):
                h = self.res(f"decoder.up.{i}.block.{j}", h, temporal)
                if L.text_dim:
                    h = h + self.text(f"decoder.up.{i}.attn.{j}", h, context, mask, 2 ** (n - 1 - i))
            if i > 0:
                t = h.shape[2]
                h = rearrange(F.interpolate(rearrange(h, "b c t h w -> b (c t) h w"), scale_factor=2.0, mode="nearest"),
                              "b (c t) h w -> b c t h w", t=t)
                h = self.conv(f"decoder.up.{i}.upsample.conv", h, padding=(0, 1, 1))
        return self.conv("decoder.conv_out", F.silu(self.gn("decoder.norm_out", h)), padding=(0, 1, 1))

    def temporal_res(self, name: str, x: Tensor) -> Tensor:
        h = self.same(name + ".conv1.conv", F.silu(self.gn(name + ".norm1", x)))
        return x + self.same(name + ".conv2.conv", F.silu(self.gn(name + ".norm2", h)))

    def temporal_encoder(self, z, context, mask) -> Tensor:
        h = self.same("encoder_temporal.conv_in.conv", z)
        for i in range(2):
            p = f"encoder_temporal.mid_blocks.{i}"
            h = self.temporal_res(p + ".res", self.same(p + ".down.conv", h, stride=(2, 1, 1)))
            if self.L.text_dim:
                h = self.text(p + ".attn.0", h, context, mask, 1) + h
        h = F.silu(self.gn("encoder_temporal.final_block.0", h))
        return self.same("encoder_temporal.final_block.2.conv", h)

    def temporal_decoder(self, z, context, mask) -> Tensor:
        h = self.same("decoder_temporal.conv_in.conv", z)
        for i in range(2):
            p = f"decoder_temporal.mid_blocks.{i}"
            h = F.conv_transpose3d(h, *self.w(p + ".up"), stride=(2, 1, 1), padding=1, output_padding=(1, 0, 0))
            for r in ("1", "2"):
                h = self.temporal_res(f"{p}.res{r}", h)
                if self.L.text_dim:
                    h = self.text(f"{p}.attn{r}.0", h, context, mask, 1) + h
        return self.same("decoder_temporal.conv_last.conv", h)

    @torch.no_grad()
    def encode(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Video mode: (mean, logvar) of the innermost posterior."""
        z1 = self.first_encoder(x, context, mask).chunk(2, 1)[0]
        mean, logvar = self.temporal_encoder(z1, context, mask).chunk(2, 1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def decode(self, z: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.first_decoder(self.temporal_decoder(z, context, mask), context, mask)

    @torch.no_grad()
    def encode_image(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Image mode (``mask_temporal``): the first stage without temporal layers; its posterior mean."""
        return self.first_encoder(x, context, mask, temporal=False).chunk(2, 1)[0]
