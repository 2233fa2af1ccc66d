"""A test-only reference of Open-Sora 1.2's temporal VAE (hpcai-tech/Open-Sora v1.2.0,
``VAE_Temporal_SD`` in ``opensora/models/vae/vae_temporal.py``), written from its semantics as plain
functions over a state dict with the OFFICIAL key names (without the release's ``temporal_vae.``
prefix), so the converter (autoencoders/opensora.py) can be checked without the released files. The
spatial half of the release is a diffusers ``AutoencoderKL``, which the tests run themselves.

The public procedure: every ``CausalConv3d`` pads the past with ``k_t - s`` ZERO frames and space
"same" (an ``nn.Conv3d`` under ``.conv``); ResBlocks are GroupNorm (eps 1e-5, over the clip) ->
SiLU -> conv (no bias), twice, plus ``conv3`` (1x1x1, no bias) where the width changes; the encoder
halves time with a stride-2 conv after the levels whose ``temporal_downsample`` flag is set; the
decoder doubles it with a conv to twice the channels unfolded as ``(C ts)`` -> frames; a clip is
padded in front with zeros to a multiple of 4 frames and the decoder's output loses as many.

`official_shapes` enumerates every official tensor name and shape for a config; `official_state_dict`
draws random tensors under them.
"""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from official_init import random_official


def official_shapes(filters: int = 128, mult=(1, 2, 2, 4), nrb: int = 4, down=(False, True, True),
                    z: int = 4) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, k, bias=True):
        shapes[f"{name}.conv.weight"] = (o, i, k, k, k)
        if bias:
            shapes[f"{name}.conv.bias"] = (o,)

    def res(name, ci, co):
        shapes[f"{name}.norm1.weight"] = shapes[f"{name}.norm1.bias"] = (ci,)
        conv(f"{name}.conv1", co, ci, 3, bias=False)
        shapes[f"{name}.norm2.weight"] = shapes[f"{name}.norm2.bias"] = (co,)
        conv(f"{name}.conv2", co, co, 3, bias=False)
        if ci != co:
            conv(f"{name}.conv3", co, ci, 1, bias=False)

    widths = [filters * m for m in mult]
    conv("encoder.conv_in", filters, z, 3, bias=False)
    ci = filters
    for i, w in enumerate(widths):
        for j in range(nrb):
            res(f"encoder.block_res_blocks.{i}.{j}", ci, w)
            ci = w
        if i < len(widths) - 1 and down[i]:
            conv(f"encoder.conv_blocks.{i}", w, w, 3)
    for j in range(nrb):
        res(f"encoder.res_blocks.{j}", ci, ci)
    shapes["encoder.norm1.weight"] = shapes["encoder.norm1.bias"] = (ci,)
    conv("encoder.conv2", 2 * z, ci, 1)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    conv("decoder.conv1", widths[-1], z, 3)
    for j in range(nrb):
        res(f"decoder.res_blocks.{j}", widths[-1], widths[-1])
    ci = widths[-1]
    for i in reversed(range(len(widths))):
        for j in range(nrb):
            res(f"decoder.block_res_blocks.{i}.{j}", ci, widths[i])
            ci = widths[i]
        if i > 0 and down[i - 1]:
            conv(f"decoder.conv_blocks.{i - 1}", 2 * ci, ci, 3)
    shapes["decoder.norm1.weight"] = shapes["decoder.norm1.bias"] = (ci,)
    conv("decoder.conv_out", z, ci, 3)
    return shapes


def official_state_dict(seed: int = 0, **config) -> dict[str, Tensor]:
    """Random tensors under the official names (`official_init.random_official`)."""
    return random_official(official_shapes(**config), seed)


class OfficialTemporalVAE:
    """The public temporal VAE's encode (mean, logvar) and decode over ``sd`` (functions, no modules)."""

    def __init__(self, sd: dict[str, Tensor], mult=(1, 2, 2, 4), nrb: int = 4, down=(False, True, True),
                 groups: int = 32):
        self.sd, self.levels, self.nrb, self.down, self.groups = sd, len(mult), nrb, down, groups

    def conv(self, name, x, stride=1):
        w, b = self.sd[f"{name}.conv.weight"], self.sd.get(f"{name}.conv.bias")
        k = w.shape[2]
        x = F.pad(x, (k // 2, k // 2, k // 2, k // 2, k - 1 + 1 - stride, 0))  # zeros in front, "same" in space
        return F.conv3d(x, w, b, stride=(stride, 1, 1))

    def norm(self, name, x):
        return F.group_norm(x, self.groups, self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], 1e-5)

    def res(self, name, x):
        h = self.conv(f"{name}.conv1", F.silu(self.norm(f"{name}.norm1", x)))
        h = self.conv(f"{name}.conv2", F.silu(self.norm(f"{name}.norm2", h)))
        return (self.conv(f"{name}.conv3", x) if f"{name}.conv3.conv.weight" in self.sd else x) + h

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``B 4 T h w`` spatial latents (one micro-chunk) -> (mean, clamped logvar)."""
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % 4, 0))
        h = self.conv("encoder.conv_in", x)
        for i in range(self.levels):
            for j in range(self.nrb):
                h = self.res(f"encoder.block_res_blocks.{i}.{j}", h)
            if i < self.levels - 1 and self.down[i]:
                h = self.conv(f"encoder.conv_blocks.{i}", h, stride=2)
        for j in range(self.nrb):
            h = self.res(f"encoder.res_blocks.{j}", h)
        h = self.conv("encoder.conv2", F.silu(self.norm("encoder.norm1", h)))
        mean, logvar = self.conv("quant_conv", h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, frames: int) -> Tensor:
        h = self.conv("decoder.conv1", self.conv("post_quant_conv", z))
        for j in range(self.nrb):
            h = self.res(f"decoder.res_blocks.{j}", h)
        for i in reversed(range(self.levels)):
            for j in range(self.nrb):
                h = self.res(f"decoder.block_res_blocks.{i}.{j}", h)
            if i > 0 and self.down[i - 1]:
                h = rearrange(self.conv(f"decoder.conv_blocks.{i - 1}", h), "b (c ts) t h w -> b c (t ts) h w", ts=2)
        x = self.conv("decoder.conv_out", F.silu(self.norm("decoder.norm1", h)))
        return x[:, :, -frames % 4:] if frames % 4 else x
