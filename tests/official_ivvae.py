"""A test-only reference of the public IV-VAE code's forward pass (ali-vilab/iv-vae ``VAutoencoder3d``),
written from its semantics as plain functions over a state dict with the OFFICIAL key names, so the
converter (autoencoders/ivvae_weights.py) can be checked without the released files.

It follows the public code's own procedure, not ours: encoding runs frame 0 alone and then chunks of
4 frames, decoding one latent frame at a time, each group-causal conv padding a chunk with the last
frame of the previous one; a frame group is padded before with the previous group's last frame and
after with zeros; 2D-level blocks are single convolutions writing both halves; RMS norms are
``F.normalize * sqrt(C) * gamma``; the TMPE fuse reads ``[key halves | motion halves]``; the output
keeps frame 0 and every group's first frame from the key head.

`official_state_dict` draws random tensors under every official name with the official shape for a
config (dim, z, dim_mult, num_res_blocks); `parameter_count` gives the official size from the same
enumeration.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

DILATIONS = (0, 1, 3, 6, 9, 12)  # PAC_0 is the 1x1 branch


def official_shapes(dim: int, z: int, mult=(1, 2, 4, 4), nrb: int = 2) -> dict[str, tuple[int, ...]]:
    """Every official tensor name -> shape (temporal downsampling at the two deepest boundaries)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, *k):
        shapes[name + ".weight"] = (o, i, *k)
        shapes[name + ".bias"] = (o,)

    def sep3d(name, o, i, k):  # conv_2d + group-causal conv_3d, each writing o channels from i
        conv(name + ".conv_2d", o, i, k, k)
        conv(name + ".conv_3d", o, i, k, k, k)

    def res(name, ci, co, two_d):
        shapes[name + ".residual.0.gamma"] = (2 * ci, 1, 1, 1)
        shapes[name + ".residual.3.gamma"] = (2 * co, 1, 1, 1)
        if two_d:
            conv(name + ".residual.2.conv", 2 * co, 2 * ci, 3, 3)
            conv(name + ".residual.6.conv", 2 * co, 2 * co, 3, 3)
            if ci != co:
                conv(name + ".shortcut.conv", 2 * co, 2 * ci, 1, 1)
        else:
            sep3d(name + ".residual.2", co, 2 * ci, 3)
            sep3d(name + ".residual.6", co, 2 * co, 3)
            if ci != co:
                sep3d(name + ".shortcut", co, 2 * ci, 1)

    def attn(name, c):
        for half in ("Attention_2d", "Attention_3d"):
            shapes[f"{name}.{half}.norm.gamma"] = (c, 1, 1)
            conv(f"{name}.{half}.to_qkv", 3 * c, c, 1, 1)
            conv(f"{name}.{half}.proj", c, c, 1, 1)

    levels = len(mult)
    dims = [dim * u for u in (1, *mult)]
    sep3d("encoder.conv1", dim, 3, 3)
    idx = 0
    for i in range(levels):
        ci, co = dims[i], dims[i + 1]
        for _ in range(nrb):
            res(f"encoder.downsamples.{idx}", ci, co, i == levels - 1)
            idx += 1
            if i == levels - 1:
                attn(f"encoder.downsamples.{idx}", co)
                idx += 1
            ci = co
        if i < levels - 1:
            conv(f"encoder.downsamples.{idx}.resample_2d.1", co, co, 3, 3)
            conv(f"encoder.downsamples.{idx}.resample_3d.1", co, co, 3, 3)
            if i > 0:  # downsample3d at the two deepest boundaries
                conv(f"encoder.downsamples.{idx}.time_conv", co, co, 2, 1, 1)
            idx += 1
        if i == levels - 2:
            attn(f"encoder.downsamples.{idx}", co)
            idx += 1
    c = dims[-1]
    for side in ("encoder", "decoder"):
        res(f"{side}.middle.0", c, c, True)
        attn(f"{side}.middle.1", c)
        res(f"{side}.middle.2", c, c, True)
    shapes["encoder.head.0.gamma"] = (2 * c, 1, 1, 1)
    for d in DILATIONS:
        conv(f"encoder.head.2.PAC_{d}.conv", 2 * z, 2 * c, *((1, 1) if d == 0 else (3, 3)))
    conv("encoder.head.2.PAC_conv.conv", 2 * z, 2 * z * len(DILATIONS), 1, 1)
    sep3d("conv1", z, 2 * z, 1)
    sep3d("conv2", z // 2, z, 1)
    ddims = [dim * u for u in (mult[-1], *mult[::-1])]
    conv("decoder.conv1.conv", 2 * ddims[0], z, 3, 3)
    idx = 0
    for i in range(levels):
        ci, co = ddims[i] // (2 if i > 0 else 1), ddims[i + 1]
        for _ in range(nrb + 1):
            res(f"decoder.upsamples.{idx}", ci, co, i == 0)
            idx += 1
            if i == 0:
                attn(f"decoder.upsamples.{idx}", co)
                idx += 1
            ci = co
        if i < levels - 1:
            conv(f"decoder.upsamples.{idx}.resample_2d.1", co // 2, co, 3, 3)
            conv(f"decoder.upsamples.{idx}.resample_3d.1", co // 2, co, 3, 3)
            if i < 2:  # upsample3d at the two deepest boundaries
                conv(f"decoder.upsamples.{idx}.time_conv", 2 * co, co, 1, 1, 1)
            idx += 1
    shapes["decoder.head.0.gamma"] = (2 * dims[1], 1, 1, 1)
    sep3d("decoder.head.2", 3, 2 * dims[1], 3)
    return shapes


def official_state_dict(dim: int, z: int, mult=(1, 2, 4, 4), nrb: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors under the official names: weights ~ N(0, 1/fan_in), biases and norm scales
    around their usual values, so activations stay O(1) through the whole network."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in official_shapes(dim, z, mult, nrb).items():
        if name.endswith("gamma"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            out[name] = 0.05 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return out


def parameter_count(dim: int, z: int, mult=(1, 2, 4, 4), nrb: int = 2) -> int:
    return sum(math.prod(s) for s in official_shapes(dim, z, mult, nrb).values())


class OfficialIVVAE:
    """The public forward on an official-named state dict ``sd``."""

    def __init__(self, sd: dict[str, Tensor], mult=(1, 2, 4, 4), nrb: int = 2):
        self.sd, self.mult, self.nrb = sd, tuple(mult), nrb
        self.z = sd["conv1.conv_2d.weight"].shape[0]  # Z: the latent channels

    # --- layers ---------------------------------------------------------------------------
    def w(self, name: str) -> tuple[Tensor, Tensor]:
        return self.sd[name + ".weight"], self.sd[name + ".bias"]

    def frames2d(self, name: str, x: Tensor, **kw) -> Tensor:  # a 2D conv on every frame
        b = x.shape[0]
        y = F.conv2d(rearrange(x, "b c t h w -> (b t) c h w"), *self.w(name), **kw)
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)

    def gc3d(self, name: str, x: Tensor, group: int, cache: dict, key: str) -> Tensor:
        """Group-causal conv of one chunk; ``cache[key]`` holds the previous chunk's last frame."""
        w, bias = self.w(name)
        if w.shape[2] == 1:
            return F.conv3d(x, w, bias)
        past = cache.get(key)
        cache[key] = x[:, :, -1:]
        x = F.pad(x, (1, 1, 1, 1))
        if x.shape[2] == 1:  # a lone frame: [x, x, 0]
            return F.conv3d(torch.cat([x, x, torch.zeros_like(x)], 2), w, bias)
        assert past is not None, "a chunk of several frames continues a video"
        outs = []
        for start in range(0, x.shape[2], group):
            before = F.pad(past, (1, 1, 1, 1)) if start == 0 else x[:, :, start - 1:start]
            window = torch.cat([before, x[:, :, start:start + group], torch.zeros_like(before)], 2)
            outs.append(F.conv3d(window, w, bias))
        return torch.cat(outs, 2)

    def sep3d(self, name: str, x: Tensor, group: int, cache: dict) -> Tensor:
        k = self.sd[name + ".conv_2d.weight"].shape[-1]
        key = self.frames2d(name + ".conv_2d", x, padding=k // 2)
        return torch.cat([key, self.gc3d(name + ".conv_3d", x, group, cache, name)], 1)

    def sep2d(self, name: str, x: Tensor) -> Tensor:
        k = self.sd[name + ".conv.weight"].shape[-1]
        return self.frames2d(name + ".conv", x, padding=k // 2)

    def sep_rms(self, name: str, x: Tensor) -> Tensor:
        h = rearrange(x, "b (r c) t h w -> b r c t h w", r=2)
        h = rearrange(F.normalize(h, dim=2), "b r c t h w -> b (r c) t h w")
        return h * math.sqrt(x.shape[1] // 2) * self.sd[name + ".gamma"]

    def res(self, name: str, x: Tensor, group: int | None, cache: dict) -> Tensor:
        """``group`` None: a 2D-level block."""
        conv = (lambda n, h: self.sep2d(n, h)) if group is None else (lambda n, h: self.sep3d(n, h, group, cache))
        h = conv(name + ".residual.2", F.silu(self.sep_rms(name + ".residual.0", x)))
        h = conv(name + ".residual.6", F.silu(self.sep_rms(name + ".residual.3", h)))
        short = name + (".shortcut.conv.weight" if group is None else ".shortcut.conv_2d.weight")
        return h + (conv(name + ".shortcut", x) if short in self.sd else x)

    def attn(self, name: str, x: Tensor) -> Tensor:
        outs = []
        for half, part in zip(("Attention_2d", "Attention_3d"), x.chunk(2, 1)):
            n, (b, c, t, hh, ww) = f"{name}.{half}", part.shape
            h = rearrange(part, "b c t h w -> (b t) c h w")
            h = F.normalize(h, dim=1) * math.sqrt(c) * self.sd[n + ".norm.gamma"]
            q, k, v = rearrange(F.conv2d(h, *self.w(n + ".to_qkv")), "n (s c) h w -> s n 1 (h w) c", s=3)
            o = rearrange(F.scaled_dot_product_attention(q, k, v), "n 1 (h w) c -> n c h w", h=hh)
            outs.append(part + rearrange(F.conv2d(o, *self.w(n + ".proj")), "(b t) c h w -> b c t h w", b=b))
        return torch.cat(outs, 1)

    def down(self, name: str, x: Tensor, temporal: bool) -> Tensor:
        halves = [self.frames2d(f"{name}.resample_{k}.1", F.pad(p, (0, 1, 0, 1)), stride=2)
                  for k, p in zip(("2d", "3d"), x.chunk(2, 1))]
        if temporal and x.shape[2] != 1:
            halves = [halves[0][:, :, 0::2], F.conv3d(halves[1], *self.w(name + ".time_conv"), stride=(2, 1, 1))]
        return torch.cat(halves, 1)

    def up(self, name: str, x: Tensor, temporal: bool, first: bool) -> Tensor:
        if temporal and not first:
            key, motion = x.chunk(2, 1)
            motion = rearrange(F.conv3d(motion, *self.w(name + ".time_conv")), "b (r c) t h w -> b c (t r) h w", r=2)
            x = torch.cat([key.repeat_interleave(2, 2), motion], 1)
        b = x.shape[0]
        h = F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), scale_factor=2.0, mode="nearest-exact")
        halves = [F.conv2d(p, *self.w(f"{name}.resample_{k}.1"), padding=1) for k, p in zip(("2d", "3d"), h.chunk(2, 1))]
        return rearrange(torch.cat(halves, 1), "(b t) c h w -> b c t h w", b=b)

    # --- encoder / decoder on one chunk ---------------------------------------------------
    def encoder(self, x: Tensor, cache: dict) -> Tensor:
        levels, groups = len(self.mult), (4, 4, 2)
        h, idx = self.sep3d("encoder.conv1", x, 4, cache), 0
        for i in range(levels):
            for _ in range(self.nrb):
                h = self.res(f"encoder.downsamples.{idx}", h, None if i == levels - 1 else groups[i], cache)
                idx += 1
                if i == levels - 1:
                    h, idx = self.attn(f"encoder.downsamples.{idx}", h), idx + 1
            if i < levels - 1:
                h, idx = self.down(f"encoder.downsamples.{idx}", h, temporal=i > 0), idx + 1
            if i == levels - 2:
                h, idx = self.attn(f"encoder.downsamples.{idx}", h), idx + 1
        h = self.res("encoder.middle.0", h, None, cache)
        h = self.res("encoder.middle.2", self.attn("encoder.middle.1", h), None, cache)
        h = F.silu(self.sep_rms("encoder.head.0", h))
        branches = [self.frames2d(f"encoder.head.2.PAC_{d}.conv", h, padding=d, dilation=max(d, 1)) for d in DILATIONS]
        z = self.z
        fused = torch.cat([br[:, :z] for br in branches] + [br[:, z:] for br in branches], 1)
        return self.frames2d("encoder.head.2.PAC_conv.conv", fused)

    def decoder(self, x: Tensor, cache: dict, first: bool) -> Tensor:
        levels, groups = len(self.mult), (None, 2, 4, 4)
        h = self.res("decoder.middle.0", self.sep2d("decoder.conv1", x), None, cache)
        h = self.res("decoder.middle.2", self.attn("decoder.middle.1", h), None, cache)
        idx = 0
        for i in range(levels):
            for _ in range(self.nrb + 1):
                h, idx = self.res(f"decoder.upsamples.{idx}", h, groups[i], cache), idx + 1
                if i == 0:
                    h, idx = self.attn(f"decoder.upsamples.{idx}", h), idx + 1
            if i < levels - 1:
                h, idx = self.up(f"decoder.upsamples.{idx}", h, temporal=i < 2, first=first), idx + 1
        return self.sep3d("decoder.head.2", F.silu(self.sep_rms("decoder.head.0", h)), 4, cache)

    # --- the autoencoder ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each ``B Z t h w``, before the latent scale/shift."""
        cache: dict = {}
        chunks = [video[:, :, :1]] + list(video[:, :, 1:].split(4, dim=2))
        h = torch.cat([self.encoder(c, cache) for c in chunks], 2)
        h = torch.cat([self.frames2d("conv1.conv_2d", h), F.conv3d(h, *self.w("conv1.conv_3d"))], 1)
        q = self.z // 2
        mean = torch.cat([h[:, :q], h[:, 2 * q:3 * q]], 1)
        logvar = torch.cat([h[:, q:2 * q], h[:, 3 * q:]], 1)
        return mean, logvar

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        x = torch.cat([self.frames2d("conv2.conv_2d", z), F.conv3d(z, *self.w("conv2.conv_3d"))], 1)
        cache: dict = {}
        out = torch.cat([self.decoder(x[:, :, i:i + 1], cache, first=i == 0) for i in range(x.shape[2])], 2)
        key, motion = out.chunk(2, 1)
        body = torch.where((torch.arange(key.shape[2] - 1) % 4 == 0).view(1, 1, -1, 1, 1), key[:, :, 1:], motion[:, :, 1:])
        return torch.cat([key[:, :, :1], body], 2)
