"""A test-only reference of OD-VAE's public forward pass (Open-Sora-Plan v1.2.0, ``CausalVAEModel``
with the released ``vae/config.json``: ``CausalVAEModel_D4_4x8x8``), written from its semantics as
plain functions over a state dict with the OFFICIAL key names, so the converter
(autoencoders/odvae.py) can be checked without the released files.

It follows the public code's own procedure, not ours: every causal convolution pads time with
``k - 1`` copies of the first frame (``CausalConv3d``: an ``nn.Conv3d`` under ``.conv``); the 2D
blocks (``conv_in``, ``ResnetBlock2D``, ``Downsample``) run on each frame with a per-frame GroupNorm;
everything 3D normalises over the whole clip (``Normalize`` = GroupNorm(32, eps 1e-6) on a 5-D map);
``Spatial2xTime2x3DDownsample`` pads the bottom/right by one zero pixel and convolves 3x3x3 with
stride 2; ``Spatial2xTime2x3DUpsample`` interpolates frame 0 bilinearly and the later frames
trilinearly (2x in time and space) before its causal conv; ``SpatialUpsample2x`` is per-frame
nearest plus a (1, 3, 3) causal conv; the mid attention (``AttnBlock3DFix``) attends over each
frame's pixels with q, k, v as separate 1x1x1 convs. The released config's layout: widths
``hidden_size * hidden_size_mult``, ``num_res_blocks`` blocks per encoder level (one more in the
decoder), 2D blocks at the first two encoder levels, time and space downsampled together at the
two deepest boundaries.

`official_config` is the released ``config.json`` for a width / depth; `official_state_dict` draws
random tensors under every official name with the official shape.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from official_init import random_official

EPS = 1e-6


def official_config(hidden: int = 128, z: int = 4, mult=(1, 2, 4, 4), nrb: int = 2) -> dict:
    """The v1.2.0 ``vae/config.json`` fields (the released one at the defaults)."""
    return {"_class_name": "CausalVAEModel", "hidden_size": hidden, "z_channels": z, "embed_dim": z,
            "hidden_size_mult": list(mult), "attn_resolutions": [], "dropout": 0.0, "resolution": 256,
            "double_z": True, "num_res_blocks": nrb, "q_conv": "CausalConv3d",
            "encoder_conv_in": "Conv2d", "encoder_conv_out": "CausalConv3d", "encoder_attention": "AttnBlock3DFix",
            "encoder_resnet_blocks": ["ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"],
            "encoder_spatial_downsample": ["Downsample", "Spatial2xTime2x3DDownsample",
                                           "Spatial2xTime2x3DDownsample", ""],
            "encoder_temporal_downsample": ["", "", "", ""], "encoder_mid_resnet": "ResnetBlock3D",
            "decoder_conv_in": "CausalConv3d", "decoder_conv_out": "CausalConv3d",
            "decoder_attention": "AttnBlock3DFix",
            "decoder_resnet_blocks": ["ResnetBlock3D"] * 4,
            "decoder_spatial_upsample": ["", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample",
                                         "Spatial2xTime2x3DUpsample"],
            "decoder_temporal_upsample": ["", "", "", ""], "decoder_mid_resnet": "ResnetBlock3D",
            "use_quant_layer": True}


def official_shapes(hidden: int, z: int, mult=(1, 2, 4, 4), nrb: int = 2) -> dict[str, tuple[int, ...]]:
    """Every official tensor name -> shape, as the public Encoder / Decoder build them."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, *k, causal=False):
        shapes[f"{name}{'.conv' if causal else ''}.weight"] = (o, i, *k)
        shapes[f"{name}{'.conv' if causal else ''}.bias"] = (o,)

    def norm(name, c):
        shapes[name + ".weight"] = (c,)
        shapes[name + ".bias"] = (c,)

    def res(name, ci, co, two_d):
        k = (3, 3) if two_d else (3, 3, 3)
        norm(name + ".norm1", ci)
        conv(name + ".conv1", co, ci, *k, causal=not two_d)
        norm(name + ".norm2", co)
        conv(name + ".conv2", co, co, *k, causal=not two_d)
        if ci != co:
            conv(name + ".nin_shortcut", co, ci, *((1, 1) if two_d else (1, 1, 1)), causal=not two_d)

    def attn(name, c):
        norm(name + ".norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1, 1, 1, causal=True)

    levels, widths = len(mult), [hidden * m for m in mult]
    conv("encoder.conv_in", hidden, 3, 3, 3)
    ci = hidden
    for i, w in enumerate(widths):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", ci, w, two_d=i < 2)
            ci = w
        if i == 0:
            conv(f"encoder.down.{i}.downsample.conv", w, w, 3, 3)
        elif i < levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", w, w, 3, 3, 3, causal=True)
    for side in ("encoder", "decoder"):
        res(f"{side}.mid.block_1", widths[-1], widths[-1], False)
        attn(f"{side}.mid.attn_1", widths[-1])
        res(f"{side}.mid.block_2", widths[-1], widths[-1], False)
    norm("encoder.norm_out", widths[-1])
    conv("encoder.conv_out", 2 * z, widths[-1], 3, 3, 3, causal=True)
    conv("quant_conv", 2 * z, 2 * z, 1, 1, 1, causal=True)
    conv("post_quant_conv", z, z, 1, 1, 1, causal=True)
    conv("decoder.conv_in", widths[-1], z, 3, 3, 3, causal=True)
    ci = widths[-1]
    for i in reversed(range(levels)):
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", ci, widths[i], False)
            ci = widths[i]
        if i == 1:
            conv(f"decoder.up.{i}.upsample.conv", ci, ci, 1, 3, 3, causal=True)
        elif i > 1:
            conv(f"decoder.up.{i}.upsample.conv", ci, ci, 3, 3, 3, causal=True)
    norm("decoder.norm_out", hidden)
    conv("decoder.conv_out", 3, hidden, 3, 3, 3, causal=True)
    return shapes


def official_state_dict(hidden: int, z: int, mult=(1, 2, 4, 4), nrb: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors under the official names (`official_init.random_official`)."""
    return random_official(official_shapes(hidden, z, mult, nrb), seed)


def parameter_count(hidden: int, z: int, mult=(1, 2, 4, 4), nrb: int = 2) -> int:
    return sum(math.prod(s) for s in official_shapes(hidden, z, mult, nrb).values())


class OfficialODVAE:
    """The public forward over an official state dict ``sd`` (no modules: functions of the tensors)."""

    def __init__(self, sd: dict[str, Tensor], mult=(1, 2, 4, 4), nrb: int = 2, groups: int = 32):
        self.sd, self.levels, self.nrb, self.groups = sd, len(mult), nrb, groups

    # --- the public modules, as functions ----------------------------------------------------
    def _w(self, name):
        return self.sd[name + ".weight"], self.sd[name + ".bias"]

    def causal_conv(self, name, x, stride=1, padding=None):
        w, b = self._w(name + ".conv")
        k = w.shape[2]
        pad = (0, w.shape[3] // 2, w.shape[4] // 2) if padding is None else padding
        x = torch.cat([x[:, :, :1].repeat(1, 1, k - 1, 1, 1), x], dim=2)  # first-frame padding of the past
        return F.conv3d(x, w, b, stride=stride, padding=pad)

    def per_frame(self, fn, x):
        b, t = x.shape[0], x.shape[2]
        y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, *x.shape[1:2], *x.shape[3:]))
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    def norm(self, name, x):  # Normalize: over the whole clip on a 5-D map, over the frame on a 4-D one
        w, b = self._w(name)  # 32 groups (gcd(C, 32) at a test's widths below 32)
        return F.group_norm(x, math.gcd(x.shape[1], self.groups), w, b, EPS)

    def resnet2d(self, name, x):  # on frames (B*T, C, H, W)
        h = F.conv2d(F.silu(self.norm(name + ".norm1", x)), *self._w(name + ".conv1"), padding=1)
        h = F.conv2d(F.silu(self.norm(name + ".norm2", h)), *self._w(name + ".conv2"), padding=1)
        if name + ".nin_shortcut.weight" in self.sd:
            x = F.conv2d(x, *self._w(name + ".nin_shortcut"))
        return x + h

    def resnet3d(self, name, x):
        h = self.causal_conv(name + ".conv1", F.silu(self.norm(name + ".norm1", x)))
        h = self.causal_conv(name + ".conv2", F.silu(self.norm(name + ".norm2", h)))
        if name + ".nin_shortcut.conv.weight" in self.sd:
            x = self.causal_conv(name + ".nin_shortcut", x)
        return x + h

    def attn(self, name, x):  # AttnBlock3DFix: per-frame attention, clip norm, q/k/v 1x1x1
        h = self.norm(name + ".norm", x)
        q, k, v = (self.causal_conv(f"{name}.{p}", h) for p in ("q", "k", "v"))
        b, c, t, hh, ww = q.shape
        q = q.permute(0, 2, 3, 4, 1).reshape(b * t, hh * ww, c)
        k = k.permute(0, 2, 1, 3, 4).reshape(b * t, c, hh * ww)
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # (bt, query, key)
        v = v.permute(0, 2, 1, 3, 4).reshape(b * t, c, hh * ww)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, t, c, hh, ww).permute(0, 2, 1, 3, 4)
        return x + self.causal_conv(name + ".proj_out", out)

    # --- encoder / decoder ------------------------------------------------------------------
    def encode_moments(self, x: Tensor) -> Tensor:
        """``B 3 T H W`` in [-1, 1] -> the quant conv's output ``B 2z t h w`` (mean, logvar)."""
        h = self.per_frame(lambda f: F.conv2d(f, *self._w("encoder.conv_in"), padding=1), x)
        for i in range(self.levels):
            for j in range(self.nrb):
                name = f"encoder.down.{i}.block.{j}"
                h = self.per_frame(lambda f: self.resnet2d(name, f), h) if i < 2 else self.resnet3d(name, h)
            if i == 0:
                h = self.per_frame(lambda f: F.conv2d(F.pad(f, (0, 1, 0, 1)), *self._w("encoder.down.0.downsample.conv"),
                                                      stride=2), h)
            elif i < self.levels - 1:
                h = self.causal_conv(f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1, 0, 0)), stride=2,
                                     padding=0)
        h = self.resnet3d("encoder.mid.block_2", self.attn("encoder.mid.attn_1", self.resnet3d("encoder.mid.block_1", h)))
        h = self.causal_conv("encoder.conv_out", F.silu(self.norm("encoder.norm_out", h)))
        return self.causal_conv("quant_conv", h)

    def decode(self, z: Tensor) -> Tensor:
        h = self.causal_conv("decoder.conv_in", self.causal_conv("post_quant_conv", z))
        h = self.resnet3d("decoder.mid.block_2", self.attn("decoder.mid.attn_1", self.resnet3d("decoder.mid.block_1", h)))
        for i in reversed(range(self.levels)):
            for j in range(self.nrb + 1):
                h = self.resnet3d(f"decoder.up.{i}.block.{j}", h)
            if i == 1:  # SpatialUpsample2x: nearest on (c t) folded maps, then a (1, 3, 3) causal conv
                b, c, t, hh, ww = h.shape
                up = F.interpolate(h.reshape(b, c * t, hh, ww), scale_factor=(2, 2), mode="nearest")
                h = self.causal_conv(f"decoder.up.{i}.upsample.conv", up.reshape(b, c, t, 2 * hh, 2 * ww))
            elif i > 1:  # Spatial2xTime2x3DUpsample
                first = F.interpolate(h[:, :, :1], scale_factor=(1, 2, 2), mode="trilinear")
                if h.shape[2] > 1:
                    rest = F.interpolate(h[:, :, 1:], scale_factor=(2, 2, 2), mode="trilinear")
                    first = torch.cat([first, rest], dim=2)
                h = self.causal_conv(f"decoder.up.{i}.upsample.conv", first)
        return self.causal_conv("decoder.conv_out", F.silu(self.norm("decoder.norm_out", h)))
