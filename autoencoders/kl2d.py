"""KL-2D: the frame-wise SD-style KL-VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", Sec. 3.1 and App. G).

Each frame is encoded on its own (time folded into the batch): 8x spatial compression by three
stride-2 downsamplings, a double-z head predicting the posterior mean and log-variance of ``c``
latent channels, and the mirrored decoder. The video latent is the stack of the frame latents,
``z: B c T H/8 W/8`` (VCPR = 64). It is the "content VAE" baseline and Hi-VAE's base encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import AEConfig, Autoencoder, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, ConvDecoder, ConvEncoder, check_latent_stats, grid_z,
                                 split_moments)
from ldm.latent import Cond, Latent, LatentSpec


@dataclass(frozen=True)
class KL2DConfig(AEConfig):
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; 2x down between levels
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more, as SD)
    attention: bool = True  # self-attention in the mid block
    norm_groups: int = 32
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
        arch = dict(base_channels=config.base_channels, channel_mult=config.channel_mult,
                    num_res_blocks=config.num_res_blocks, dims=2, groups=config.norm_groups,
                    attention=config.attention, dropout=config.dropout)
        z = config.latent_channels
        check_latent_stats(config, z)
        self.encoder = ConvEncoder(config.in_channels, 2 * z, **arch)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = ConvDecoder(z, config.in_channels, **arch)

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

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        frames = video.shape[2]
        x = rearrange(video, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        moments = self.quant_conv(self.encoder(x))  # (B*T, 2c, h, w)
        mean, logvar = split_moments(moments, self.config.logvar_clamp)
        mean = rearrange(mean, "(b t) c h w -> b c t h w", t=frames)  # (B, c, T, h, w)
        logvar = rearrange(logvar, "(b t) c h w -> b c t h w", t=frames)  # (B, c, T, h, w)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        z = grid_z(latent, self.config.latent_channels, self.family)
        frames = z.shape[2]
        h = rearrange(z, "b c t h w -> (b t) c h w")  # (B*T, c, h, w)
        x = self.decoder(self.post_quant_conv(h))  # (B*T, C, H, W)
        return rearrange(x, "(b t) c h w -> b c t h w", t=frames)  # (B, C, T, H, W)


_SD = dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention=True, norm_groups=32)
_DEBUG = dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention=True, norm_groups=8)

register("kl2d-f8c4", KL2D, KL2DConfig(latent_channels=4, **_SD))
register("kl2d-f8c16", KL2D, KL2DConfig(latent_channels=16, **_SD))
register("kl2d-f8c4-debug", KL2D, KL2DConfig(latent_channels=4, **_DEBUG))
register("kl2d-f8c16-debug", KL2D, KL2DConfig(latent_channels=16, **_DEBUG))
