"""Tiny fake autoencoders, one per latent form, to prove the contract carries each end to end."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from autoencoders.base import REGISTRY, AEConfig, Autoencoder, register, register_family
from ldm.latent import Latent, LatentSpec


@dataclass(frozen=True)
class FakeConfig(AEConfig):
    channels: int = 4
    spatial: int = 4


@register_family
class FakeGridAE(Autoencoder):
    """Grid form: 4x spatial average pooling into c channels (no temporal compression)."""

    family = "fake-grid"
    config_cls = FakeConfig

    def __init__(self, config: FakeConfig):
        super().__init__(config)
        self.proj = torch.nn.Conv3d(3, 2 * config.channels, 1)
        self.back = torch.nn.Conv3d(config.channels, 3, 1)

    def latent_spec(self, frames, height, width):
        s, c = self.config.spatial, self.config.channels
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}")
        return LatentSpec("grid", {"z": (c, frames, height // s, width // s)}, (3, frames, height, width),
                          vcpr=float(s * s))

    def _encode(self, video, cond):
        s = self.config.spatial
        h = self.proj(F.avg_pool3d(video, (1, s, s)))
        mean, logvar = h.chunk(2, dim=1)
        return Latent({"z": mean}, "grid", {"z": logvar.clamp(-10, 2)})

    def _decode(self, latent, cond):
        s = self.config.spatial
        return F.interpolate(self.back(latent["z"]), scale_factor=(1, s, s))


@register_family
class FakeTokenAE(Autoencoder):
    """Token-set form (Hi-VAE shaped): content latent of frame 0 + global and detailed motion tokens."""

    family = "fake-tokens"
    config_cls = FakeConfig

    def __init__(self, config: FakeConfig):
        super().__init__(config)
        self.glob = torch.nn.Linear(3, 2 * 8)
        self.det = torch.nn.Linear(3, 2 * 16)

    def latent_spec(self, frames, height, width):
        s, c = self.config.spatial, self.config.channels
        return LatentSpec("tokens", {"content": (c, 1, height // s, width // s), "global": (4, 2, 8),
                                     "detailed": (frames - 1, 4, 16)}, (3, frames, height, width))

    def _encode(self, video, cond):
        s, c = self.config.spatial, self.config.channels
        content = F.avg_pool3d(video[:, :, :1], (1, s, s)).repeat(1, (c + 2) // 3, 1, 1, 1)[:, :c]
        pooled = video.mean(dim=(3, 4))  # (B, C, T)
        g = self.glob(rearrange(F.adaptive_avg_pool1d(pooled, 8), "b c (f n) -> b f n c", f=4))
        d = self.det(repeat(pooled[:, :, 1:], "b c t -> b t n c", n=4))
        (gm, gl), (dm, dl) = g.chunk(2, -1), d.chunk(2, -1)
        return Latent({"content": content, "global": gm, "detailed": dm}, "tokens",
                      {"global": gl.clamp(-10, 2), "detailed": dl.clamp(-10, 2)})

    def _decode(self, latent, cond):
        content = latent["content"][:, :3]
        b, _, _, h, w = content.shape
        t = latent["detailed"].shape[1] + 1
        s = self.config.spatial
        video = F.interpolate(content, scale_factor=(1, s, s)).expand(b, 3, t, h * s, w * s)
        return video + latent["global"].mean() * 0


@register_family
class FakeVarlenAE(Autoencoder):
    """Variable-length form (MTC-VAE shaped): each 4-frame segment keeps 1 latent frame if it is
    static and 2 if it moves, so the latent length depends on the content."""

    family = "fake-varlen"
    config_cls = FakeConfig

    def latent_spec(self, frames, height, width):
        s, c = self.config.spatial, self.config.channels
        if frames % 4:
            raise ValueError("frames must be a multiple of 4")
        return LatentSpec("varlen", {"z": (c, frames // 2, height // s, width // s)}, (3, frames, height, width))

    def _encode(self, video, cond):
        s, c = self.config.spatial, self.config.channels
        items = []
        for v in video:  # (C, T, H, W)
            segs, rates, keys = [], [], []
            for seg in v.split(4, dim=1):
                moving = bool((seg[:, 1:] - seg[:, :1]).abs().mean() > 1e-3)
                keep = seg[:, ::2] if moving else seg[:, :1]
                segs.append(F.avg_pool3d(keep[None], (1, s, s))[0])
                rates.append(2 if moving else 4)
                keys += [True] + [False] * (keep.shape[1] - 1)
            z = torch.cat(segs, dim=1)
            z = z.repeat((c + 2) // 3, 1, 1, 1)[:c]
            items.append(Latent({"z": z[None]}, "varlen", {}, {
                "length": torch.tensor([z.shape[1]]), "rates": torch.tensor([rates]),
                "keyframe": torch.tensor([keys])}))
        return Latent.collate(items)

    def _decode(self, latent, cond):
        outs = []
        s = self.config.spatial
        for lat in latent.unbatch():
            frames = []
            z = lat["z"][0, :3]
            pos = 0
            for rate in [r for r in lat.aux["rates"][0].tolist() if r > 0]:  # 0 = padding
                n = 2 if rate == 2 else 1
                seg = z[:, pos:pos + n]
                frames.append(seg.repeat_interleave(4 // n, dim=1))
                pos += n
            outs.append(F.interpolate(torch.cat(frames, 1)[None], scale_factor=(1, s, s))[0])
        return torch.stack(outs)


FAKES = {"fake-grid-debug": FakeGridAE, "fake-tokens-debug": FakeTokenAE, "fake-varlen-debug": FakeVarlenAE}
for _name, _cls in FAKES.items():
    if _name not in REGISTRY:
        register(_name, _cls, FakeConfig())
