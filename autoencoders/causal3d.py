"""Causal-3D: a 3D causal-convolution KL-VAE in the style of CogVideoX's VAE (arXiv:2408.06072,
Sec. 2.1) and OD-VAE (arXiv:2409.01199, Sec. 3).

Every convolution is causal in time (`CausalConv3d`: the past is padded with copies of the first
frame), GroupNorm and the mid-block attention work per frame, and the two temporal 2x
downsamplings keep the first frame alone, so a clip of ``1 + 4k`` frames becomes ``1 + k`` latent
frames (the first latent frame is an image latent) and latent frame ``j`` depends on input frames
``<= 4j`` only; decoding is causal in the same sense. Compression: 4x time, 8x space (VCPR 256 for
long clips). It is the base that MTC-VAE converts: the temporal resamplers live in their own lists
``encoder.temporal_down`` / ``decoder.temporal_up`` (one slot per resolution boundary, `nn.Identity`
where time is not resampled) so extra 2x layers can be added in empty slots.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from autoencoders.base import AEConfig, Autoencoder, causal_grid_spec, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, ConvDecoder, ConvEncoder, check_latent_stats, grid_z,
                                 split_moments)
from ldm.latent import Cond, Latent, LatentSpec


@dataclass(frozen=True)
class Causal3DConfig(AEConfig):
    latent_channels: int = 16
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; 2x spatial down between levels
    temporal_down: tuple[bool, ...] = (True, True, False)  # per boundary: also 2x down in time
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more)
    attention: bool = True  # per-frame self-attention in the mid block
    norm_groups: int = 32
    dropout: float = 0.0
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP


@register_family
class Causal3D(Autoencoder):
    """Causal 3D KL-VAE: ``B C (1+rk) H W -> z: B c (1+k) H/f W/f`` with ``r = 2 ** sum(temporal_down)``
    and ``f = 2 ** (len(channel_mult) - 1)``."""

    family = "causal3d"
    config_cls = Causal3DConfig
    spatial_tiling = True

    def __init__(self, config: Causal3DConfig):
        super().__init__(config)
        if len(config.temporal_down) != len(config.channel_mult) - 1:
            raise ValueError(f"temporal_down needs one flag per resolution boundary "
                             f"({len(config.channel_mult) - 1}), got {config.temporal_down}")
        arch = dict(base_channels=config.base_channels, channel_mult=config.channel_mult,
                    num_res_blocks=config.num_res_blocks, dims=3, temporal=config.temporal_down,
                    groups=config.norm_groups, attention=config.attention, dropout=config.dropout)
        z = config.latent_channels
        check_latent_stats(config, z)
        self.encoder = ConvEncoder(config.in_channels, 2 * z, **arch)
        self.decoder = ConvDecoder(z, config.in_channels, **arch)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.config.temporal_down)

    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        return causal_grid_spec(self, frames, height, width, self.temporal_factor, self.spatial_factor,
                                self.config.latent_channels)

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        mean, logvar = split_moments(self.encoder(video), self.config.logvar_clamp)  # each (B, c, t, h, w)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        return self.decoder(grid_z(latent, self.config.latent_channels, self.family))  # (B, C, T, H, W)


# CogVideoX's VAE widths (128, 256, 256, 512); two ResBlocks per level as the SD-VAE.
_FULL = dict(base_channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention=True, norm_groups=32)
_DEBUG = dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention=True, norm_groups=8)

register("causal3d-f4x8c4", Causal3D, Causal3DConfig(latent_channels=4, **_FULL))
register("causal3d-f4x8c16", Causal3D, Causal3DConfig(latent_channels=16, **_FULL))
register("causal3d-f4x8c4-debug", Causal3D, Causal3DConfig(latent_channels=4, **_DEBUG))
register("causal3d-f4x8c16-debug", Causal3D, Causal3DConfig(latent_channels=16, **_DEBUG))
