"""Open-Sora 1.2's video VAE (Zheng et al., "Open-Sora: Democratizing Efficient Video Production for
All", 2024; hpcai-tech/Open-Sora v1.2.0, ``OpenSoraVAE_V1_2``), with its released weights (``ldm
convert --source opensora-official``): a baseline of four of the five papers ("OPS-VAE" in
VideoVAE+'s and MTC-VAE's tables, "OS VAE", 393M, in IV-VAE's, "OpenSora-1.2-VAE" in H3AE's).

Two VAEs in a row, 4x8x8 with 4 latent channels:

- the spatial VAE is SDXL's image VAE (a diffusers ``AutoencoderKL``: our ``kl2d`` layout) on every
  frame, its posterior mean (the public code draws a sample) times 0.18215;
- the temporal VAE (MAGVIT-v2 style) compresses those 4-channel frames 4x in time: causal 3D
  convolutions whose past is padded with ZEROS (``k_t - s`` frames; ``causal3d`` repeats the first
  frame), ResBlocks without conv biases, GroupNorm over the clip (torch's eps 1e-5), time halved by a
  stride-2 conv at the last two boundaries and doubled in the decoder by a conv to twice the
  channels unfolded into frames, no spatial resampling, no attention;
- clips go through the temporal VAE in independent micro-chunks of 17 frames (the public pipeline's
  ``micro_frame_size``), each padded in front with 3 zero frames to 20 and encoded to 5 latent frames;
  decoding drops the 3 padding frames. Clips are therefore 17k frames (or one image: 1 frame padded
  to 4, 1 latent frame); latent frame counts are 5k;
- the latents are standardised per channel with the released shift (-0.10, 0.34, 0.27, 0.98) and
  scale (3.85, 2.32, 2.33, 3.06): ``(z - shift) / scale``.

The converter maps every tensor by name (``tests/official_opensora.py`` re-derives the public
temporal forward from the official names; the spatial part is checked against diffusers'
``AutoencoderKL``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import REGISTRY, AEConfig, Autoencoder, register, register_family
from autoencoders.blocks import LOGVAR_CLAMP, Stage, check_latent_stats, grid_z, in_frame_chunks, split_moments
from autoencoders.kl2d import KL2D, KL2DConfig, map_diffusers
from autoencoders.sources import Conversion, KeyMap, register_source, registered_target
from ldm import config as cfglib
from ldm.checkpoint import read_state_dict
from ldm.errors import UserError
from ldm.latent import Cond, Latent, LatentSpec

SPATIAL_SCALE = 0.18215  # the public VideoAutoencoderKL: SDXL's VAE latents times 0.18215 (not SDXL's 0.13025)
RELEASED_SHIFT = (-0.10, 0.34, 0.27, 0.98)  # OpenSoraVAE_V1_2: (z - shift) / scale, per channel
RELEASED_SCALE = (3.85, 2.32, 2.33, 3.06)
MICRO_FRAMES = 17  # the public pipeline's micro_frame_size
TEMPORAL_FACTOR = 4


@dataclass(frozen=True)
class OpenSoraVAEConfig(AEConfig):
    latent_channels: int = 4  # the spatial VAE's latent = the temporal VAE's input and latent width
    # the spatial VAE (SDXL's AutoencoderKL layout)
    spatial_base_channels: int = 128
    spatial_channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    spatial_res_blocks: int = 2
    spatial_norm_groups: int = 32
    # the temporal VAE (VAE_Temporal_SD)
    temporal_base_channels: int = 128
    temporal_channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    temporal_res_blocks: int = 4
    temporal_down: tuple[bool, ...] = (False, True, True)  # per boundary: stride-2 time conv
    temporal_norm_groups: int = 32
    logvar_clamp: tuple[float, float] = LOGVAR_CLAMP


class ZeroCausalConv3d(nn.Conv3d):
    """A 3D convolution causal in time whose past is ``k_t - s`` ZERO frames (Open-Sora's MAGVIT-style
    ``CausalConv3d``; stride ``s`` in time only), space zero-padded "same"."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel, stride=(stride, 1, 1), bias=bias)
        p = kernel // 2
        self.padding_ = (p, p, p, p, kernel - stride, 0)  # (w, w, h, h, past, future)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.padding_))


class TemporalResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3x3 conv -> GroupNorm -> SiLU -> 3x3x3 conv (no conv biases), plus a 1x1x1
    skip conv where the width changes; norms over the clip, torch's default eps."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = ZeroCausalConv3d(in_channels, out_channels, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = ZeroCausalConv3d(out_channels, out_channels, bias=False)
        self.skip = ZeroCausalConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels \
            else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TimeUpsample(nn.Module):
    """2x in time: a causal 3x3x3 conv to twice the channels, each channel pair unfolded into two frames."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = ZeroCausalConv3d(channels, 2 * channels)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.conv(x), "b (c r) t h w -> b c (t r) h w", r=2)  # (B, C, 2T, H, W)


def _blocks(n: int, cin: int, cout: int, groups: int) -> list[nn.Module]:
    return [TemporalResBlock(cin if i == 0 else cout, cout, groups) for i in range(n)]


class TemporalEncoder(nn.Module):
    """conv_in -> per level ``res_blocks`` ResBlocks, then (but at the last) a stride-2 time conv where
    ``temporal_down`` says -> ``res_blocks`` more ResBlocks -> norm -> SiLU -> 1x1x1 conv to the moments."""

    def __init__(self, c: OpenSoraVAEConfig):
        super().__init__()
        widths, g, n = [c.temporal_base_channels * m for m in c.temporal_channel_mult], c.temporal_norm_groups, \
            c.temporal_res_blocks
        self.conv_in = ZeroCausalConv3d(c.latent_channels, widths[0], bias=False)
        levels, ch = [], widths[0]
        for i, w in enumerate(widths):
            down = i < len(widths) - 1 and c.temporal_down[i]
            levels.append(Stage(_blocks(n, ch, w, g), ZeroCausalConv3d(w, w, stride=2) if down else nn.Identity()))
            ch = w
        self.levels = nn.ModuleList(levels)
        self.mid = nn.Sequential(*_blocks(n, ch, ch, g))
        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = ZeroCausalConv3d(ch, 2 * c.latent_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class TemporalDecoder(nn.Module):
    """conv_in -> ``res_blocks`` ResBlocks -> per level from the deepest ``res_blocks`` ResBlocks, then
    (but at the first level) `TimeUpsample` where the encoder halved time -> norm -> SiLU -> conv_out."""

    def __init__(self, c: OpenSoraVAEConfig):
        super().__init__()
        widths, g, n = [c.temporal_base_channels * m for m in c.temporal_channel_mult], c.temporal_norm_groups, \
            c.temporal_res_blocks
        ch = widths[-1]
        self.conv_in = ZeroCausalConv3d(c.latent_channels, ch)
        self.mid = nn.Sequential(*_blocks(n, ch, ch, g))
        levels = []
        for i in reversed(range(len(widths))):  # deepest first
            up = i > 0 and c.temporal_down[i - 1]
            levels.append(Stage(_blocks(n, ch, widths[i], g), TimeUpsample(widths[i]) if up else nn.Identity()))
            ch = widths[i]
        self.levels = nn.ModuleList(levels)  # levels[j] works at level len(widths) - 1 - j
        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = ZeroCausalConv3d(ch, c.latent_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@register_family
class OpenSoraVAE(Autoencoder):
    """Open-Sora 1.2's VAE: ``B C T H W -> z: B 4 t H/8 W/8``, ``T = 17k -> t = 5k`` (or one frame ->
    one latent frame); see the module docstring."""

    family = "opensora"
    config_cls = OpenSoraVAEConfig
    spatial_tiling = True

    def __init__(self, config: OpenSoraVAEConfig):
        super().__init__(config)
        z = config.latent_channels
        if len(config.temporal_down) != len(config.temporal_channel_mult) - 1 or sum(config.temporal_down) != 2:
            raise ValueError(f"temporal_down needs one flag per boundary of temporal_channel_mult and two of them set "
                             f"(4x in time), got {config.temporal_down}")
        check_latent_stats(config, z)
        self.spatial = KL2D(KL2DConfig(in_channels=config.in_channels, latent_channels=z,
                                       base_channels=config.spatial_base_channels,
                                       channel_mult=config.spatial_channel_mult,
                                       num_res_blocks=config.spatial_res_blocks, norm_groups=config.spatial_norm_groups))
        self.temporal_encoder = TemporalEncoder(config)
        self.temporal_decoder = TemporalDecoder(config)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv3d(z, z, 1)
        self.frame_chunk: int | None = None  # frames per pass in inference (set_chunk_frames); None: all

    @property
    def spatial_factor(self) -> int:
        return self.spatial.spatial_factor

    def last_layer(self) -> Tensor:
        return self.spatial.decoder.conv_out.weight

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        f, c = self.spatial_factor, self.config.latent_channels
        if frames != 1 and (frames < 1 or frames % MICRO_FRAMES):
            raise ValueError(f"{self.family}: needs 17k frames (the micro-chunks of 17 frames Open-Sora encodes "
                             f"apart) or one image, got {frames}")
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"{self.family}: height and width must be positive multiples of {f}, got {height}x{width}")
        t = 1 if frames == 1 else frames // MICRO_FRAMES * _latent_frames(MICRO_FRAMES)
        return LatentSpec(form="grid", parts={"z": (c, t, height // f, width // f)},
                          input_shape=(self.config.in_channels, frames, height, width), vcpr=frames / t * f * f)

    def set_chunk_frames(self, frames: int | None) -> None:
        """Encode and decode ``frames`` frames at a time, a multiple of 17 (whole micro-chunks, which
        are encoded apart anyway: the one-shot result in bounded memory); None or 0: all at once."""
        if frames and (frames < 0 or frames % MICRO_FRAMES):
            raise ValueError(f"{self.family}: chunk frames must be a multiple of {MICRO_FRAMES} (its micro-chunks), "
                             f"got {frames}")
        self.frame_chunk = frames or None
        self.spatial.set_chunk_frames(frames)

    def _temporal_moments(self, x: Tensor) -> Tensor:
        """Spatial latents ``B c T h w`` (whole micro-chunks, or one frame) -> moments ``B 2c t h w``."""
        chunk = min(MICRO_FRAMES, x.shape[2])
        chunks = rearrange(x, "b c (k t) h w -> (b k) c t h w", t=chunk)  # micro-chunks, encoded apart
        pad = -chunk % TEMPORAL_FACTOR  # zero frames in front: 17 -> 20, 1 -> 4
        moments = self.quant_conv(self.temporal_encoder(F.pad(chunks, (0, 0, 0, 0, pad, 0))))
        return rearrange(moments, "(b k) c t h w -> b c (k t) h w", b=x.shape[0])

    def _video(self, z: Tensor) -> Tensor:
        """Latents ``B c t h w`` (whole micro-chunks of 5, or one frame) -> video ``B C T H W``."""
        per_chunk = min(_latent_frames(MICRO_FRAMES), z.shape[2])
        frames = 1 if z.shape[2] == 1 else MICRO_FRAMES
        chunks = rearrange(z, "b c (k t) h w -> (b k) c t h w", t=per_chunk)
        x = self.temporal_decoder(self.post_quant_conv(chunks))  # (B*k, c, 4t, h, w): padding frames first
        x = rearrange(x[:, :, x.shape[2] - frames:], "(b k) c t h w -> b c (k t) h w", b=z.shape[0])
        return self.spatial._decode(Latent({"z": x / SPATIAL_SCALE}, form="grid"), None)

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        x = self.spatial._encode(video, None).parts["z"] * SPATIAL_SCALE  # (B, c, T, h, w)
        moments = in_frame_chunks(self._temporal_moments, x, self.frame_chunk)  # (B, 2c, t, h, w)
        mean, logvar = split_moments(moments, self.config.logvar_clamp)
        return Latent({"z": mean}, form="grid", logvar={"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        z = grid_z(latent, self.config.latent_channels, self.family)
        chunk = self.frame_chunk and self.frame_chunk // MICRO_FRAMES * _latent_frames(MICRO_FRAMES)
        return in_frame_chunks(self._video, z, chunk)  # (B, C, T, H, W)


def _latent_frames(frames: int) -> int:
    return -(-frames // TEMPORAL_FACTOR)  # padded in front to a multiple of 4


# ------------------------------------------------------------------------------------------
# The released weights: hpcai-tech/OpenSora-VAE-v1.2 (model.safetensors)
# ------------------------------------------------------------------------------------------
SPATIAL_PREFIX = "spatial_vae.module."  # a diffusers AutoencoderKL (SDXL's VAE) under VideoAutoencoderKL
TEMPORAL_PREFIX = "temporal_vae."  # VAE_Temporal_SD


def map_temporal(km: KeyMap, model: OpenSoraVAE) -> None:
    """Fill our temporal VAE and quant convs from the public ``VAE_Temporal`` names (without the
    ``temporal_vae.`` prefix): its causal convs hold an ``nn.Conv3d`` under ``.conv``; ResBlocks'
    skip is ``conv3``; per level ``block_res_blocks.{level}.{j}``, the time convs ``conv_blocks`` (the
    encoder's at its level, the decoder's at the level below); the rest ``res_blocks``, ``norm1`` and
    ``conv2`` (encoder) / ``conv1`` (decoder)."""
    def put(ours: str, theirs: str, module: nn.Module) -> None:
        for kind, _ in module.named_parameters(recurse=False):
            km.put(f"{ours}.{kind}", km.take(f"{theirs}{'.conv' if isinstance(module, nn.Conv3d) else ''}.{kind}"))

    def block(ours: str, theirs: str, b: TemporalResBlock) -> None:
        for name, theirs_name in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                                  ("skip", "conv3")):
            if not isinstance(getattr(b, name), nn.Identity):
                put(f"{ours}.{name}", f"{theirs}.{theirs_name}", getattr(b, name))

    enc, dec = model.temporal_encoder, model.temporal_decoder
    put("temporal_encoder.conv_in", "encoder.conv_in", enc.conv_in)
    for i, level in enumerate(enc.levels):
        for j, b in enumerate(level.blocks):
            block(f"temporal_encoder.levels.{i}.blocks.{j}", f"encoder.block_res_blocks.{i}.{j}", b)
        if not isinstance(level.resample, nn.Identity):
            put(f"temporal_encoder.levels.{i}.resample", f"encoder.conv_blocks.{i}", level.resample)
    for j, b in enumerate(enc.mid):
        block(f"temporal_encoder.mid.{j}", f"encoder.res_blocks.{j}", b)
    put("temporal_encoder.norm_out", "encoder.norm1", enc.norm_out)
    put("temporal_encoder.conv_out", "encoder.conv2", enc.conv_out)
    put("quant_conv", "quant_conv", model.quant_conv)
    put("post_quant_conv", "post_quant_conv", model.post_quant_conv)
    put("temporal_decoder.conv_in", "decoder.conv1", dec.conv_in)
    for j, b in enumerate(dec.mid):
        block(f"temporal_decoder.mid.{j}", f"decoder.res_blocks.{j}", b)
    top = len(dec.levels) - 1
    for k, level in enumerate(dec.levels):
        i = top - k  # the public level index
        for j, b in enumerate(level.blocks):
            block(f"temporal_decoder.levels.{k}.blocks.{j}", f"decoder.block_res_blocks.{i}.{j}", b)
        if not isinstance(level.resample, nn.Identity):
            put(f"temporal_decoder.levels.{k}.resample.conv", f"decoder.conv_blocks.{i - 1}", level.resample.conv)
    put("temporal_decoder.norm_out", "decoder.norm1", dec.norm_out)
    put("temporal_decoder.conv_out", "decoder.conv_out", dec.conv_out)


def _split(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The release's tensors as (spatial, temporal, other) without their prefixes."""
    spatial = {k[len(SPATIAL_PREFIX):]: v for k, v in state.items() if k.startswith(SPATIAL_PREFIX)}
    temporal = {k[len(TEMPORAL_PREFIX):]: v for k, v in state.items() if k.startswith(TEMPORAL_PREFIX)}
    other = {k: v for k, v in state.items() if not k.startswith((SPATIAL_PREFIX, TEMPORAL_PREFIX))}
    if not spatial or not temporal:
        raise UserError(f"{path} is not Open-Sora 1.2's VAE: it needs tensors under {SPATIAL_PREFIX!r} (SDXL's VAE) "
                        f"and {TEMPORAL_PREFIX!r} (the temporal VAE); pass its model.safetensors (hpcai-tech/OpenSora-VAE-v1.2)")
    return spatial, temporal, other


def _fill(km_all: KeyMap, model: OpenSoraVAE) -> None:
    """`registered_target`'s check: every tensor of ``model`` from the release's names."""
    spatial, temporal, _ = _split(km_all.source, Path(km_all.what))
    km_s, km_t = KeyMap(spatial, "spatial"), KeyMap(temporal, "temporal")
    map_diffusers(km_s, model.spatial)
    map_temporal(km_t, model)
    for km, prefix, ours in ((km_s, SPATIAL_PREFIX, "spatial."), (km_t, TEMPORAL_PREFIX, "")):
        for key in km.used:
            km_all.take(prefix + key)
        for key in km.missing:
            km_all.missing.append(prefix + key)
        for key, value in km.out.items():
            km_all.put(ours + key, value)
    for key in ("scale", "shift"):  # the standardisation buffers, read into the config by the converter
        if km_all.has(key):
            km_all.take(key)


@register_source("opensora-official", family="opensora",
                 reads="Open-Sora 1.2's VAE weights (hpcai-tech/OpenSora-VAE-v1.2: model.safetensors, or its folder)")
def convert_official(path: Path, target: str) -> Conversion:
    """Open-Sora 1.2's VAE from its released ``model.safetensors`` (or the folder holding it):
    ``target`` ``opensora`` (the registered model whose shapes it has) or a registered name."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path} holds no model.safetensors: pass Open-Sora 1.2's VAE folder or its weights file")
    state = read_state_dict(file)
    _split(state, file)  # a clear error for another model's file
    name = registered_target(state, target, OpenSoraVAE, _fill, f"opensora-official {file}")
    shift = tuple(round(float(v), 6) for v in state["shift"].flatten()) if "shift" in state else RELEASED_SHIFT
    scale = tuple(round(float(v), 6) for v in state["scale"].flatten()) if "scale" in state else RELEASED_SCALE
    config = cfglib.replace(REGISTRY[name][1], latent_shift=shift, latent_scale=tuple(1.0 / s for s in scale))
    model = OpenSoraVAE(config)
    km = KeyMap(state, f"{file} as {name}")
    _fill(km, model)
    km.load_into(model)
    notes = [f"{len(km.used)} released tensors -> {len(km.out)} of {name} ({model.num_parameters():,} parameters); "
             f"latents standardised with shift {shift} and scale {scale}"]
    return Conversion(model.eval(), name, notes)


# The released model: SDXL's VAE + VAE_Temporal_SD (filters 128, (1, 2, 2, 4), 4 ResBlocks, time halved twice)
_STATS = dict(latent_shift=RELEASED_SHIFT, latent_scale=tuple(1.0 / s for s in RELEASED_SCALE))
register("opensora-v12", OpenSoraVAE, OpenSoraVAEConfig(**_STATS))
register("opensora-v12-debug", OpenSoraVAE, OpenSoraVAEConfig(
    spatial_base_channels=16, spatial_channel_mult=(1, 2, 2, 2), spatial_res_blocks=1, spatial_norm_groups=8,
    temporal_base_channels=16, temporal_channel_mult=(1, 2, 2, 2), temporal_res_blocks=1, temporal_norm_groups=8,
    **_STATS))
