"""OD-VAE: the omni-dimensional video compressor of Open-Sora-Plan v1.2 (Chen et al., "OD-VAE: An
Omni-dimensional Video Compressor for Improving Latent Video Diffusion Model", arXiv:2409.01199),
with its released weights (``ldm convert --source odvae-official``). MTC-VAE's ch=4 model starts
from it (MTC-VAE Sec. 4.1), and MTC-VAE, IV-VAE (239M in its table) and VideoVAE+ ("Open-Sora-Plan
(OD VAE)") compare against it.

A 4x8x8 3D VAE with causal convolutions and 4 latent channels (``1 + 4k`` frames -> ``1 + k`` latent
frames, VCPR 256). Its clip-wise norms (and the decoder's interpolation) make neither side causal:
latent frame 0 depends on every frame encoded with it, as in the public model. Where it differs from our ``causal3d`` (CogVideoX's layout), all from the released
``config.json`` and the public code (Sec. 3.1 describes the tail initialisation from an SD VAE that
explains the 2D start):

- the encoder's first two levels are 2D (``conv_in`` and the ResBlocks run on each frame, with
  per-frame GroupNorm, the inflated SD-VAE blocks); from the third level on every block is 3D with
  GroupNorm over the whole clip, as the mid blocks, the mid attention's norm and the output norms;
- time and space are downsampled together at the two deepest boundaries: one causal 3x3x3
  convolution of stride 2 (`SpaceTimeDownsample`), the first boundary being SD's 2D downsampler;
- the decoder (all 3D) upsamples the two deepest boundaries by interpolation: frame 0 bilinearly,
  the later frames trilinearly (2x in time and space, so output frames ``2m, 2m + 1`` blend input
  frames ``m`` and ``m + 1``), then a causal 3x3x3 conv (`SpaceTimeUpsample`); the last boundary is
  per-frame nearest + 3x3 conv;
- 1x1x1 quant convs around the latent; the latents are scaled by 0.18215 (Open-Sora-Plan's
  ``CausalVAEModelWrapper``).

With clip-wise norms the statistics span the frames processed together. ``encode`` / ``decode``
process a clip in one pass, the public ``CausalVAEModel.encode`` / ``decode`` without tiling (how the
paper's reconstruction figures are made at 17x256x256); the public sampling scripts enable its
tiling (33-frame chunks and 256-pixel tiles) for long, large videos: ours bounds memory with its
own spatial tiling (``--tile``); chunked streaming is refused (the chunks would change the
statistics). The converter checks the released config (v1.1.0's ``TimeDownsampleRes2x`` layout is
another model) and maps every tensor by name (``tests/official_odvae.py`` re-derives the public
forward from the official names).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import REGISTRY, AEConfig, Autoencoder, causal_grid_spec, register, register_family
from autoencoders.blocks import (LOGVAR_CLAMP, CausalConv3d, MidBlock, ResBlock, SpatialDownsample, SpatialUpsample,
                                 Stage, check_latent_stats, clip_group_norm, grid_z, group_norm, split_moments)
from autoencoders.sources import Conversion, KeyMap, register_source, registered_target, resolve_target
from ldm import config as cfglib
from ldm.checkpoint import read_state_dict
from ldm.errors import UserError
from ldm.latent import Cond, Latent, LatentSpec

LATENT_SCALE = 0.18215  # Open-Sora-Plan v1.2's CausalVAEModelWrapper: z * 0.18215


@dataclass(frozen=True)
class ODVAEConfig(AEConfig):
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; 2x spatial down between levels
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more)
    levels_2d: int = 2  # the encoder's first levels whose ResBlocks run per frame (2D)
    norm_groups: int = 32
    dropout: float = 0.0
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP


def _clip(h: Tensor, frames: int) -> Tensor:
    """A map as a clip ``B C T H W``: frames folded into the batch (``(B T) C H W``) are unfolded."""
    return h if h.ndim == 5 else rearrange(h, "(b t) c h w -> b c t h w", t=frames)


class SpaceTimeDownsample(nn.Module):
    """2x down in time and space with one 3x3x3 convolution of stride 2 (``Spatial2xTime2x3DDownsample``):
    the bottom / right edge padded by one zero pixel, the past by two copies of the first frame, so
    ``1 + 2k`` frames give ``1 + k`` (output frame ``j`` sees input frames ``2j-2 .. 2j``, pixel ``i``
    sees ``2i .. 2i+2``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if (x.shape[2] - 1) % 2 or x.shape[3] % 2 or x.shape[4] % 2:
            raise ValueError(f"SpaceTimeDownsample needs 1 + 2k frames and even sides, got {tuple(x.shape[2:])}")
        x = F.pad(x, (0, 1, 0, 1))
        x = torch.cat([x[:, :, :1].expand(-1, -1, 2, -1, -1), x], dim=2)  # (B, C, 2 + T, H + 1, W + 1)
        return self.conv(x)


class SpaceTimeUpsample(nn.Module):
    """2x up in time and space by interpolation, then a causal 3x3x3 conv (``Spatial2xTime2x3DUpsample``):
    frame 0 is upsampled bilinearly on its own, frames ``1..k`` trilinearly together (``1 + k`` frames
    give ``1 + 2k``: output frame 1 is input frame 1's, frames ``2m, 2m + 1`` blend input frames ``m``
    and ``m + 1``, the last is frame ``k``'s)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        up = F.interpolate(x[:, :, :1], scale_factor=(1, 2, 2), mode="trilinear")  # (B, C, 1, 2H, 2W)
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 2, 2), mode="trilinear")  # (B, C, 2(T-1), 2H, 2W)
            up = torch.cat([up, rest], dim=2)
        return self.conv(up)


class ODVAEEncoder(nn.Module):
    """conv_in (2D) -> one level per width (``num_res_blocks`` ResBlocks, 2D for the first ``levels_2d``
    levels, then a 2x downsample: SD's 2D one at the first boundary, `SpaceTimeDownsample` at the
    others) -> mid block (3D, attention over each frame's pixels) -> norm -> SiLU -> causal conv_out."""

    def __init__(self, c: ODVAEConfig):
        super().__init__()
        widths, groups = [c.base_channels * m for m in c.channel_mult], c.norm_groups
        frame_norm = lambda ch: group_norm(ch, groups)  # noqa: E731  (per frame; 2D maps)
        clip_norm = lambda ch: clip_group_norm(ch, groups)  # noqa: E731
        self.levels_2d = c.levels_2d
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        levels, ch = [], widths[0]
        for i, w in enumerate(widths):
            two_d = i < c.levels_2d
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, w, 2 if two_d else 3, groups, c.dropout, frame_norm if two_d else clip_norm))
                ch = w
            resample = (nn.Identity() if i == len(widths) - 1 else SpatialDownsample(ch) if i == 0
                        else SpaceTimeDownsample(ch))
            levels.append(Stage(blocks, resample))
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(ch, 3, groups, True, c.dropout, clip_norm, clip_norm)
        self.norm_out = clip_group_norm(ch, groups)
        self.conv_out = CausalConv3d(ch, 2 * c.latent_channels, 3)

    def forward(self, video: Tensor) -> Tensor:
        frames = video.shape[2]
        h = self.conv_in(rearrange(video, "b c t h w -> (b t) c h w"))  # frames: (B*T, C, H, W)
        for i, level in enumerate(self.levels):
            for block in level.blocks:
                h = block(h if i < self.levels_2d else _clip(h, frames))
            h = level.resample(h if isinstance(level.resample, (SpatialDownsample, nn.Identity)) else _clip(h, frames))
        h = self.mid(_clip(h, frames))  # (B, C, t, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))


class ODVAEDecoder(nn.Module):
    """causal conv_in -> mid block -> one level per width from the deepest (``num_res_blocks + 1`` 3D
    ResBlocks, then the 2x upsample to the level above: `SpaceTimeUpsample` at the two deepest
    boundaries, per-frame nearest + conv at the first) -> norm -> SiLU -> causal conv_out. Every norm
    is over the clip."""

    def __init__(self, c: ODVAEConfig):
        super().__init__()
        widths, groups = [c.base_channels * m for m in c.channel_mult], c.norm_groups
        clip_norm = lambda ch: clip_group_norm(ch, groups)  # noqa: E731
        ch = widths[-1]
        self.conv_in = CausalConv3d(c.latent_channels, ch, 3)
        self.mid = MidBlock(ch, 3, groups, True, c.dropout, clip_norm, clip_norm)
        levels = []
        for i in reversed(range(len(widths))):  # deepest first
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[i], 3, groups, c.dropout, clip_norm))
                ch = widths[i]
            resample = nn.Identity() if i == 0 else SpatialUpsample(ch) if i == 1 else SpaceTimeUpsample(ch)
            levels.append(Stage(blocks, resample))
        self.levels = nn.ModuleList(levels)  # levels[j] works at level len(widths) - 1 - j
        self.norm_out = clip_group_norm(ch, groups)
        self.conv_out = CausalConv3d(ch, c.in_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, T, H, W)


@register_family
class ODVAE(Autoencoder):
    """OD-VAE: ``B C (1+4k) H W -> z: B c (1+k) H/8 W/8`` (module docstring)."""

    family = "odvae"
    config_cls = ODVAEConfig
    spatial_tiling = True

    def __init__(self, config: ODVAEConfig):
        super().__init__(config)
        if len(config.channel_mult) != 4 or not 1 <= config.levels_2d <= 2:
            raise ValueError(f"odvae has four levels (time and space downsampled together at the two deepest "
                             f"boundaries) and 1 or 2 2D levels, got channel_mult={config.channel_mult}, "
                             f"levels_2d={config.levels_2d}")
        z = config.latent_channels
        check_latent_stats(config, z)
        self.encoder = ODVAEEncoder(config)
        self.decoder = ODVAEDecoder(config)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv3d(z, z, 1)

    spatial_factor = 8
    temporal_factor = 4

    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        return causal_grid_spec(self, frames, height, width, self.temporal_factor, self.spatial_factor,
                                self.config.latent_channels)

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        moments = self.quant_conv(self.encoder(video))  # (B, 2c, t, h, w)
        mean, logvar = split_moments(moments, self.config.logvar_clamp)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        return self.decoder(self.post_quant_conv(grid_z(latent, self.config.latent_channels, self.family)))


# ------------------------------------------------------------------------------------------
# The released weights: Open-Sora-Plan v1.2.0's vae/ (config.json + diffusion_pytorch_model.safetensors)
# ------------------------------------------------------------------------------------------
# the released config.json's layout fields (what the model above is); the widths and depth are read
RELEASED_LAYOUT = {
    "attn_resolutions": [], "double_z": True, "use_quant_layer": True, "q_conv": "CausalConv3d",
    "encoder_conv_in": "Conv2d", "encoder_conv_out": "CausalConv3d", "encoder_attention": "AttnBlock3DFix",
    "encoder_resnet_blocks": ["ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"],
    "encoder_spatial_downsample": ["Downsample", "Spatial2xTime2x3DDownsample", "Spatial2xTime2x3DDownsample", ""],
    "encoder_temporal_downsample": ["", "", "", ""], "encoder_mid_resnet": "ResnetBlock3D",
    "decoder_conv_in": "CausalConv3d", "decoder_conv_out": "CausalConv3d", "decoder_attention": "AttnBlock3DFix",
    "decoder_resnet_blocks": ["ResnetBlock3D"] * 4,
    "decoder_spatial_upsample": ["", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample", "Spatial2xTime2x3DUpsample"],
    "decoder_temporal_upsample": ["", "", "", ""], "decoder_mid_resnet": "ResnetBlock3D",
}


# the public v1.2.0 constructor's defaults where they are the released layout: a config.json written
# before one of these arguments existed (use_quant_layer came a day before the release) leaves it out
PUBLIC_DEFAULTS = {"attn_resolutions": [], "double_z": True, "use_quant_layer": True, "q_conv": "CausalConv3d",
                   "encoder_conv_out": "CausalConv3d", "encoder_mid_resnet": "ResnetBlock3D",
                   "decoder_conv_in": "CausalConv3d", "decoder_conv_out": "CausalConv3d",
                   "decoder_resnet_blocks": ["ResnetBlock3D"] * 4, "decoder_mid_resnet": "ResnetBlock3D"}


def config_from_official(c: Mapping[str, Any]) -> ODVAEConfig:
    """Our config of a public ``CausalVAEModel`` config.json, or a UserError naming each field whose
    layout is not the released OD-VAE's (every other CausalVAEModel layout is another model; a field
    left out counts as the public constructor's default)."""
    if c.get("_class_name", "CausalVAEModel") != "CausalVAEModel" or "hidden_size" not in c:
        raise UserError(f"this config.json (_class_name {c.get('_class_name')}, hidden_size {c.get('hidden_size')}) is "
                        "not Open-Sora-Plan's CausalVAEModel: pass the vae/ folder of Open-Sora-Plan v1.2.0")
    c = {**PUBLIC_DEFAULTS, **c}
    wrong = {k: c.get(k, "(missing)") for k, v in RELEASED_LAYOUT.items() if c.get(k) != v}
    z = int(c.get("z_channels", 4))
    if int(c.get("embed_dim", z)) != z:
        wrong["embed_dim"] = c.get("embed_dim")
    if len(c.get("hidden_size_mult", (1, 2, 4, 4))) != 4 or c.get("hidden_size_mult", (1,))[0] != 1:
        wrong["hidden_size_mult"] = c.get("hidden_size_mult")  # conv_in writes hidden_size channels: mult[0] is 1
    if wrong:
        raise UserError(f"this CausalVAEModel is not OD-VAE's released layout (Open-Sora-Plan v1.2.0): {wrong}; "
                        f"odvae holds {RELEASED_LAYOUT} (v1.1.0's TimeDownsampleRes2x VAE is another model)")
    return ODVAEConfig(latent_channels=z, base_channels=int(c.get("hidden_size", 128)),
                       channel_mult=tuple(int(m) for m in c.get("hidden_size_mult", (1, 2, 4, 4))),
                       num_res_blocks=int(c.get("num_res_blocks", 2)), latent_scale=(LATENT_SCALE,))


def map_official(km: KeyMap, model: ODVAE) -> None:
    """Fill ``km`` with our names from the official ones (the layout in the module docstring): causal
    convs hold their ``nn.Conv3d`` under ``.conv``; the mid attention's q, k, v 1x1x1 convs become one
    qkv conv; the last upsampler's (1, 3, 3) causal conv a 2D one."""
    def conv(ours: str, theirs: str, causal: bool, flat: bool = False) -> None:
        for kind in ("weight", "bias"):
            t = km.take(f"{theirs}{'.conv' if causal else ''}.{kind}")
            km.put(f"{ours}.{kind}", _drop_time(t) if flat and kind == "weight" else t)

    def norm(ours: str, theirs: str) -> None:
        for kind in ("weight", "bias"):
            km.put(f"{ours}.{kind}", km.take(f"{theirs}.{kind}"))

    def res(ours: str, theirs: str, causal: bool, block: ResBlock) -> None:
        norm(f"{ours}.norm1", f"{theirs}.norm1")
        norm(f"{ours}.norm2", f"{theirs}.norm2")
        conv(f"{ours}.conv1", f"{theirs}.conv1", causal)
        conv(f"{ours}.conv2", f"{theirs}.conv2", causal)
        if not isinstance(block.skip, nn.Identity):
            conv(f"{ours}.skip", f"{theirs}.nin_shortcut", causal)

    def mid(side: str) -> None:
        res(f"{side}.mid.res1", f"{side}.mid.block_1", True, getattr(model, side).mid.res1)
        res(f"{side}.mid.res2", f"{side}.mid.block_2", True, getattr(model, side).mid.res2)
        a = f"{side}.mid.attn_1"
        norm(f"{side}.mid.attn.norm", f"{a}.norm")
        for kind in ("weight", "bias"):  # q, k, v (C, C, 1, 1, 1) each -> one (3C, C, 1, 1) conv
            km.put(f"{side}.mid.attn.qkv.{kind}", _drop_time(torch.cat([km.take(f"{a}.{p}.conv.{kind}") for p in "qkv"])))
        conv(f"{side}.mid.attn.proj", f"{a}.proj_out", True, flat=True)

    enc, dec = model.encoder, model.decoder
    conv("encoder.conv_in", "encoder.conv_in", False)
    for i, level in enumerate(enc.levels):
        for j, block in enumerate(level.blocks):
            res(f"encoder.levels.{i}.blocks.{j}", f"encoder.down.{i}.block.{j}", i >= enc.levels_2d, block)
        if not isinstance(level.resample, nn.Identity):
            conv(f"encoder.levels.{i}.resample.conv", f"encoder.down.{i}.downsample.conv",
                 isinstance(level.resample, SpaceTimeDownsample))
    mid("encoder")
    norm("encoder.norm_out", "encoder.norm_out")
    conv("encoder.conv_out", "encoder.conv_out", True)
    conv("quant_conv", "quant_conv", True)
    conv("post_quant_conv", "post_quant_conv", True)
    conv("decoder.conv_in", "decoder.conv_in", True)
    mid("decoder")
    top = len(dec.levels) - 1
    for j, level in enumerate(dec.levels):
        i = top - j  # the public code's level index
        for k, block in enumerate(level.blocks):
            res(f"decoder.levels.{j}.blocks.{k}", f"decoder.up.{i}.block.{k}", True, block)
        if not isinstance(level.resample, nn.Identity):
            conv(f"decoder.levels.{j}.resample.conv", f"decoder.up.{i}.upsample.conv", True,
                 flat=isinstance(level.resample, SpatialUpsample))
    norm("decoder.norm_out", "decoder.norm_out")
    conv("decoder.conv_out", "decoder.conv_out", True)
    km.drop_prefix("loss.", "the training loss (LPIPS, discriminator)")


def _drop_time(t: Tensor) -> Tensor:
    """A (1, k, k) causal conv's kernel ``(O, I, 1, k, k)`` as a 2D one ``(O, I, k, k)`` (others as they are)."""
    return t[:, :, 0] if t.ndim == 5 else t


def _weights_file(folder: Path) -> Path:
    found = [folder / n for n in ("diffusion_pytorch_model.safetensors", "model.safetensors") if (folder / n).is_file()]
    found += sorted(p for p in folder.iterdir() if p.suffix in (".ckpt", ".pt", ".pth", ".bin"))
    if not found:
        raise UserError(f"{folder} holds no weights file (diffusion_pytorch_model.safetensors, or a .ckpt / .pt "
                        f"state dict) beside its config.json")
    return found[0]


@register_source("odvae-official", family="odvae",
                 reads="Open-Sora-Plan v1.2.0's vae/ folder (config.json + diffusion_pytorch_model.safetensors) "
                       "or its state-dict file")
def convert_official(path: Path, target: str) -> Conversion:
    """An OD-VAE holding the released weights at ``path``: a folder (its config.json checked and read,
    ``target`` ``odvae`` or a registered name of that layout) or a state-dict file alone (the
    registered OD-VAE whose shapes it has)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: pass Open-Sora-Plan's vae/ folder or the weights file")
        name, config = resolve_target(target, "odvae", config_from_official(json.loads((path / "config.json")
                                                                                      .read_text())),
                                      "odvae-official")
        state = read_state_dict(_weights_file(path))
    else:
        state = read_state_dict(path)
        name = registered_target(state, target, ODVAE, map_official, f"odvae-official {path}")
        config = cfglib.replace(REGISTRY[name][1], latent_scale=(LATENT_SCALE,))
    model = ODVAE(config)
    km = KeyMap(state, f"{path} as {name or 'odvae'}")
    map_official(km, model)
    km.load_into(model)
    notes = [f"{len(km.used)} official tensors -> {len(km.out)} of {name or 'odvae'} "
             f"({model.num_parameters():,} parameters); latent scale {LATENT_SCALE} (Open-Sora-Plan's)"]
    if km.dropped:
        notes.append(km.dropped_summary())
    return Conversion(model.eval(), name, notes)


# The released model (Open-Sora-Plan v1.2.0 vae/config.json: CausalVAEModel_D4_4x8x8)
register("odvae-c4", ODVAE, ODVAEConfig(latent_scale=(LATENT_SCALE,)))
# the debug twin: 32 groups as the released config says, gcd(width, 32) of them at its widths 16 and 32
register("odvae-c4-debug", ODVAE, ODVAEConfig(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                                              latent_scale=(LATENT_SCALE,)))
