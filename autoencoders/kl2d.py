"""KL-2D: the frame-wise SD-style KL-VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3.1 and App. G).

Each frame is encoded on its own (time folded into the batch): 8x spatial compression by three
stride-2 downsamplings, a double-z head predicting the posterior mean and log-variance of ``c``
latent channels, and the mirrored decoder. The video latent is the stack of the frame latents,
``z: B c T H/8 W/8`` (VCPR = 64). It is the "content VAE" baseline and Hi-VAE's base encoder.

Weight-compatible with diffusers' ``AutoencoderKL`` (SD-1.x/2.x, SDXL, SD-3.5 and FLUX VAEs):
``ldm convert --source diffusers:AutoencoderKL --path SD_VAE_DIR --target kl2d`` reads widths, depth,
groups, latent channels, mid-block attention, quant convs (SD-3.5 / FLUX have none) and the latent
scale/shift from the diffusers config and reproduces the diffusers model (`convert_diffusers`). The
IV-VAE image VAE (Sec. 3.5 of that paper: RMSNorm, shrinking upsamplers) is a kl2d too
(``kl2d-ivvae-*``), so ``IVVAE.from_kl2d`` can inflate it into the registered ``ivvae-z*`` exactly.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import AEConfig, Autoencoder, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, ConvDecoder, ConvEncoder, check_latent_stats, grid_z,
                                 in_frame_chunks, split_moments)
from autoencoders.sources import Conversion, KeyMap, compare, open_diffusers, register_source
from ldm.errors import UserError
from ldm.latent import Cond, Latent, LatentSpec


@dataclass(frozen=True)
class KL2DConfig(AEConfig):
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; 2x down between levels
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more, as SD)
    attention: bool = True  # self-attention in the mid block
    norm_groups: int = 32
    norm: str = "group"  # GroupNorm (SD) | "rms": channel RMSNorm (the IV-VAE image VAE)
    upsample_shrink: bool = False  # the spatial upsampler halves the width (the IV-VAE image VAE)
    quant_conv: bool = True  # 1x1 convs around the latent (SD-1/2/XL; SD-3.5 and FLUX have none)
    dropout: float = 0.0
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP


@register_family
class KL2D(Autoencoder):
    """Frame-wise KL-VAE: ``B C T H W -> z: B c T H/f W/f`` with ``f = 2 ** (len(channel_mult) - 1)``."""

    family = "kl2d"
    config_cls = KL2DConfig
    spatial_tiling = True

    def __init__(self, config: KL2DConfig):
        super().__init__(config)
        if len(config.channel_mult) < 1:
            raise ValueError("channel_mult needs at least one level")
        if config.norm not in ("group", "rms"):
            raise ValueError(f"norm must be 'group' or 'rms', got {config.norm!r}")
        arch = dict(base_channels=config.base_channels, channel_mult=config.channel_mult,
                    num_res_blocks=config.num_res_blocks, dims=2, groups=config.norm_groups,
                    attention=config.attention, dropout=config.dropout, norm=config.norm)
        z = config.latent_channels
        check_latent_stats(config, z)
        self.encoder = ConvEncoder(config.in_channels, 2 * z, **arch)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if config.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.quant_conv else nn.Identity()
        self.decoder = ConvDecoder(z, config.in_channels, upsample_shrink=config.upsample_shrink, **arch)
        self.frame_chunk: int | None = None  # frames per pass in inference (set_chunk_frames); None: all

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        f = self.spatial_factor
        if frames < 1:
            raise ValueError(f"{self.family}: need at least one frame, got {frames}")
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"{self.family}: height and width must be positive multiples of {f}, "
                             f"got {height}x{width}")
        c = self.config.latent_channels
        return LatentSpec(form="grid", parts={"z": (c, frames, height // f, width // f)},
                          input_shape=(self.config.in_channels, frames, height, width), vcpr=float(f * f))

    def set_chunk_frames(self, frames: int | None) -> None:
        """Encode and decode ``frames`` frames at a time (the frames are independent: the one-shot
        result in bounded memory); None or 0: all at once."""
        if frames is not None and frames < 0:
            raise ValueError(f"{self.family}: chunk frames must be positive (0 or None: one shot), got {frames}")
        self.frame_chunk = frames or None

    def _moments(self, video: Tensor) -> Tensor:
        frames = video.shape[2]
        moments = self.quant_conv(self.encoder(rearrange(video, "b c t h w -> (b t) c h w")))  # (B*T, 2c, h, w)
        return rearrange(moments, "(b t) c h w -> b c t h w", t=frames)  # (B, 2c, T, h, w)

    def _frames(self, z: Tensor) -> Tensor:
        frames = z.shape[2]
        x = self.decoder(self.post_quant_conv(rearrange(z, "b c t h w -> (b t) c h w")))  # (B*T, C, H, W)
        return rearrange(x, "(b t) c h w -> b c t h w", t=frames)  # (B, C, T, H, W)

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        mean, logvar = split_moments(in_frame_chunks(self._moments, video, self.frame_chunk),
                                     self.config.logvar_clamp)  # each (B, c, T, h, w)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        z = grid_z(latent, self.config.latent_channels, self.family)
        return in_frame_chunks(self._frames, z, self.frame_chunk)  # (B, C, T, H, W)


# ------------------------------------------------------------------------------------------
# diffusers AutoencoderKL -> kl2d
# ------------------------------------------------------------------------------------------
def config_from_diffusers(c: Mapping[str, Any], scale: tuple[float, ...], shift: tuple[float, ...]) -> KL2DConfig:
    """The kl2d config of a diffusers ``AutoencoderKL`` config, or a ValueError naming what kl2d
    cannot hold."""
    widths = list(c["block_out_channels"])
    groups = int(c.get("norm_num_groups", 32))
    problems = []
    if c.get("in_channels", 3) != c.get("out_channels", 3):
        problems.append(f"in_channels {c.get('in_channels')} != out_channels {c.get('out_channels')}")
    if any(t != "DownEncoderBlock2D" for t in c["down_block_types"]) or any(t != "UpDecoderBlock2D" for t in c["up_block_types"]):
        problems.append(f"block types {c['down_block_types']} / {c['up_block_types']} (only DownEncoderBlock2D / UpDecoderBlock2D)")
    if c.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn {c.get('act_fn')!r} (only silu)")
    if any(w % widths[0] for w in widths):
        problems.append(f"block_out_channels {widths} are not multiples of the first")
    if any(w % groups for w in widths):
        problems.append(f"norm_num_groups {groups} does not divide every width {widths}")
    quant, post = c.get("use_quant_conv", True), c.get("use_post_quant_conv", True)
    if quant != post:
        problems.append(f"use_quant_conv={quant} but use_post_quant_conv={post}")
    if problems:
        raise UserError("kl2d cannot hold this AutoencoderKL: " + "; ".join(problems))
    return KL2DConfig(in_channels=int(c.get("in_channels", 3)), latent_scale=scale, latent_shift=shift,
                      latent_channels=int(c["latent_channels"]), base_channels=widths[0],
                      channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=int(c["layers_per_block"]),
                      attention=bool(c.get("mid_block_add_attention", True)), norm_groups=groups, quant_conv=bool(quant))


def diffusers_key(ours: str) -> str:
    """The diffusers ``AutoencoderKL`` name of one of our kl2d / ConvEncoder-ConvDecoder tensors
    (the mid-block attention's fused ``qkv`` is handled by the caller)."""
    side, rest = ours.split(".", 1)
    if side not in ("encoder", "decoder"):
        return ours  # quant_conv, post_quant_conv
    blocks = "down_blocks" if side == "encoder" else "up_blocks"
    resamplers = "downsamplers" if side == "encoder" else "upsamplers"
    rest = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.skip\.", rf"{blocks}.\1.resnets.\2.conv_shortcut.", rest)
    rest = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", rf"{blocks}.\1.resnets.\2.", rest)
    rest = re.sub(r"^stages\.(\d+)\.resample\.conv\.", rf"{blocks}.\1.{resamplers}.0.conv.", rest)
    rest = re.sub(r"^mid\.res1\.", "mid_block.resnets.0.", rest)
    rest = re.sub(r"^mid\.res2\.", "mid_block.resnets.1.", rest)
    rest = re.sub(r"^mid\.attn\.norm\.", "mid_block.attentions.0.group_norm.", rest)
    rest = re.sub(r"^mid\.attn\.proj\.", "mid_block.attentions.0.to_out.0.", rest)
    rest = re.sub(r"^norm_out\.", "conv_norm_out.", rest)
    return f"{side}.{rest}"


def map_diffusers(km: KeyMap, model: nn.Module) -> None:
    """Fill the kl2d ``model`` from the diffusers ``AutoencoderKL`` names in
    ``km``: 1-to-1 renames; the mid-block attention's ``to_q/to_k/to_v`` (linear layers) become our
    fused 1x1 ``qkv`` and ``to_out.0`` our 1x1 ``proj``."""
    for key, ref in model.state_dict().items():
        if ".mid.attn.qkv." in key:
            side, kind = key.split(".")[0], key.rsplit(".", 1)[1]
            parts = [km.take(f"{side}.mid_block.attentions.0.to_{p}.{kind}") for p in "qkv"]
            t = torch.cat(parts) if all(p.numel() for p in parts) else parts[0]
        else:
            t = km.take(diffusers_key(key))
        km.put(key, t.reshape(ref.shape) if t.numel() == ref.numel() else t)


@register_source("diffusers:AutoencoderKL", family="kl2d",
                 reads="a local diffusers AutoencoderKL folder (an SD-1.x/2.x, SDXL, SD-3.5 or FLUX pipeline's vae/)")
def convert_diffusers(path: Path, target: str) -> Conversion:
    """A kl2d holding the diffusers ``AutoencoderKL`` in the local folder ``path`` exactly; ``target``
    ``kl2d`` (the config the folder implies) or a registered kl2d it must match."""
    source, name, config = open_diffusers("AutoencoderKL", path, target, "kl2d", config_from_diffusers)
    model = KL2D(config).eval()
    km = KeyMap(source.state_dict(), f"{path} as kl2d")
    map_diffusers(km, model)
    km.load_into(model)
    f = model.spatial_factor
    x = torch.rand(2, config.in_channels, 1, 4 * f, 4 * f, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post = source.encode(x[:, :, 0]).latent_dist
        lat = model._encode(x, None)
        note = compare([("mean", lat["z"][:, :, 0], post.mean), ("logvar", lat.logvar["z"][:, :, 0], post.logvar),
                        ("decode", model._decode(lat, None)[:, :, 0], source.decode(post.mean).sample)], str(path))
    return Conversion(model, name, [f"latent scale/shift from the diffusers config: {config.latent_scale} / {config.latent_shift}", note])


_SD = dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention=True, norm_groups=32)
_DEBUG = dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention=True, norm_groups=8)

register("kl2d-f8c4", KL2D, KL2DConfig(latent_channels=4, **_SD))
register("kl2d-f8c16", KL2D, KL2DConfig(latent_channels=16, **_SD))
register("kl2d-f8c4-debug", KL2D, KL2DConfig(latent_channels=4, **_DEBUG))
register("kl2d-f8c16-debug", KL2D, KL2DConfig(latent_channels=16, **_DEBUG))
# SD-3.5 / FLUX layout: 16 channels and no quant convs (SD-1.x/2.x and SDXL: kl2d-f8c4)
register("kl2d-f8c16-sd3", KL2D, KL2DConfig(latent_channels=16, quant_conv=False, **_SD))
register("kl2d-f8c16-sd3-debug", KL2D, KL2DConfig(latent_channels=16, quant_conv=False, **_DEBUG))
# IV-VAE's image VAEs (Sec. 3.5: RMSNorm, shrinking upsamplers) with half the latent channels of the
# ivvae-z* they initialise (IVVAE.from_kl2d); the ivvae-z*-debug twins' widths for the debug ones
for _z, _dim, _name in ((4, 64, "z4"), (8, 64, "z8"), (16, 64, "z16"), (16, 96, "z16-dim96")):
    _iv = dict(latent_channels=_z // 2, norm="rms", upsample_shrink=True, attention=True)
    register(f"kl2d-ivvae-{_name}", KL2D, KL2DConfig(base_channels=_dim, channel_mult=(1, 2, 4, 4), num_res_blocks=2, **_iv))
    register(f"kl2d-ivvae-{_name}-debug", KL2D,
             KL2DConfig(base_channels=_dim // 8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, **_iv))
