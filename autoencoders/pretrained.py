"""Pretrained diffusers VAEs behind the latent contract, registered as the run-time loader
``diffusers``: ``build("diffusers:<Class>", path=DIR)``, ``resolve("diffusers:<Class>", checkpoint=DIR)``
(``ldm convert`` turns some of them into our own families instead: ``sources.py``).

The wrapper loads a diffusers autoencoder from a LOCAL folder (``local_files_only=True``; never a
hub) and offers the same face as our own families:

- ``encode`` returns the posterior mean as grid part ``z: B c t h w`` (``latent_dist.mean``) and its
  log-variance (``latent_dist.logvar``); deterministic encoders (DC-AE) have no log-variance.
  Image VAEs (``AutoencoderKL``, ``AutoencoderDC``) run per frame: ``t = T``.
- The model's own latent normalisation is applied inside encode/decode through
  ``config.latent_scale`` / ``latent_shift`` as ``(z - shift) * scale``, read once from the model at
  build time with the convention of the model's diffusers pipelines (see `normalisation`).
  Passing ``latent_scale=`` / ``latent_shift=`` to `build` replaces them (e.g. dataset statistics).
- ``latent_spec`` follows the model config's compression ratios with the causal frame rule
  ``T = 1 + r*k -> t = 1 + k`` (r = 4 for Wan / HunyuanVideo, 8 for LTX-Video; CogVideoX has r = 4
  but takes 1 + 8k frames, see `KINDS`).

Persistence: ``save_pretrained(dir)`` writes OUR format (``model.safetensors`` holding the diffusers
weights under ``model.`` + ``config.json`` embedding the diffusers model config and the
normalisation), so ``load_pretrained(dir)`` rebuilds the model without the original folder. To
export a plain diffusers folder, call ``wrapper.model.save_pretrained(dir)``.

``AutoencoderKLCosmos`` is not wrapped: its pipelines normalise with per-(channel, latent frame)
statistics and the scheduler's ``sigma_data``, which a per-channel (scale, shift) cannot express.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import AEConfig, Autoencoder, register_family, register_loader
from autoencoders.blocks import check_latent_stats, grid_z
from ldm import config as cfglib
from ldm.latent import Cond, Latent, LatentSpec


def _cfg(config: dict[str, Any], key: str, default: Any = None) -> Any:
    value = config.get(key)
    return default if value is None else value


@dataclass(frozen=True)
class _Kind:
    """How one diffusers class maps onto the contract (all read from the model config)."""

    image: bool  # an image VAE, applied frame by frame
    spatial: Callable[[dict[str, Any]], int]
    temporal: Callable[[dict[str, Any]], int]
    channels_key: str = "latent_channels"
    posterior: bool = True  # encode() returns latent_dist (mean + logvar) rather than .latent
    frame_step: int = 1  # T = 1 + frame_step * temporal * k (CogVideoX: odd latent frame counts only)


def _pyramid(key: str) -> Callable[[dict[str, Any]], int]:
    return lambda c: 2 ** (len(c[key]) - 1)


def _ltx_spatial(c: dict[str, Any]) -> int:  # AutoencoderKLLTXVideo.__init__
    return int(_cfg(c, "spatial_compression_ratio", c["patch_size"] * 2 ** sum(c["spatio_temporal_scaling"])))


def _ltx_temporal(c: dict[str, Any]) -> int:
    return int(_cfg(c, "temporal_compression_ratio",
                    c["patch_size_t"] * 2 ** sum(c["spatio_temporal_scaling"])))


def _wan_spatial(c: dict[str, Any]) -> int:  # AutoencoderKLWan: scale_factor_spatial (16 for Wan2.2)
    return int(_cfg(c, "scale_factor_spatial", 2 ** len(c["temperal_downsample"]) * _cfg(c, "patch_size", 1)))


def _wan_temporal(c: dict[str, Any]) -> int:
    return int(_cfg(c, "scale_factor_temporal", 2 ** sum(bool(t) for t in c["temperal_downsample"])))


KINDS: dict[str, _Kind] = {
    "AutoencoderKL": _Kind(image=True, spatial=_pyramid("block_out_channels"), temporal=lambda c: 1),
    "AutoencoderDC": _Kind(image=True, spatial=_pyramid("encoder_block_out_channels"), temporal=lambda c: 1,
                           posterior=False),
    # CogVideoX decodes the latent frames after the first in pairs (num_latent_frames_batch_size = 2), so
    # only an odd latent frame count decodes back to 1 + 4k frames: clips of 1 + 8k frames (49, 81, ...).
    "AutoencoderKLCogVideoX": _Kind(image=False, spatial=_pyramid("block_out_channels"),
                                    temporal=lambda c: int(c["temporal_compression_ratio"]), frame_step=2),
    "AutoencoderKLLTXVideo": _Kind(image=False, spatial=_ltx_spatial, temporal=_ltx_temporal),
    "AutoencoderKLWan": _Kind(image=False, spatial=_wan_spatial, temporal=_wan_temporal, channels_key="z_dim"),
    "AutoencoderKLHunyuanVideo": _Kind(image=False, spatial=lambda c: int(c["spatial_compression_ratio"]),
                                       temporal=lambda c: int(c["temporal_compression_ratio"])),
}


def _diffusers_class(class_name: str) -> type:
    if class_name not in KINDS:
        raise ValueError(f"unsupported diffusers autoencoder class {class_name!r}; supported: {sorted(KINDS)}")
    import diffusers
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"the installed diffusers {diffusers.__version__} has no class {class_name!r}")
    return cls


@dataclass(frozen=True)
class DiffusersAEConfig(AEConfig):
    class_name: str = "AutoencoderKL"
    model_config: dict[str, Any] = field(default_factory=dict)  # the diffusers model config (architecture)
    decode_timestep: float = 0.0  # timestep passed to timestep-conditioned LTX-Video decoders


def normalisation(class_name: str, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(latent_scale, latent_shift) such that ``(z - shift) * scale`` is what the model's diffusers
    pipelines feed the denoiser:

    - per-channel ``latents_mean`` / ``latents_std`` (config, or buffers for LTX-Video):
      ``(z - mean) * scaling_factor / std`` -- ``LTXPipeline._normalize_latents``
      (pipelines/ltx/pipeline_ltx.py), ``WanPipeline`` (``(z - mean) / std``, no scaling_factor;
      pipelines/wan/pipeline_wan.py), ``StableDiffusionXLPipeline`` when the VAE config has them;
    - otherwise ``(z - shift_factor) * scaling_factor`` -- ``StableDiffusion3Pipeline`` / ``FluxPipeline``
      (shift_factor), ``StableDiffusionPipeline``, ``CogVideoXPipeline.decode_latents``,
      ``HunyuanVideoPipeline``, ``SanaPipeline`` (DC-AE) with no shift. (CogVideoX's
      ``invert_scale_latents`` only concerns the image-conditioning latents of its I2V pipeline; its
      decode always divides by scaling_factor.)
    """
    config = model.config
    scaling = float(_cfg(config, "scaling_factor", 1.0))
    if class_name == "AutoencoderKLLTXVideo":
        mean = model.latents_mean.detach().float().cpu().tolist()  # persistent buffers, not config
        std = model.latents_std.detach().float().cpu().tolist()
    else:
        mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        if len(mean) != len(std):
            raise ValueError(f"{class_name}: latents_mean and latents_std differ in length ({len(mean)} vs {len(std)})")
        return tuple(scaling / float(s) for s in std), tuple(float(m) for m in mean)
    return (scaling,), (float(_cfg(config, "shift_factor", 0.0)),)


@register_family
class DiffusersAE(Autoencoder):
    """A diffusers autoencoder (``self.model``) behind the contract; see the module docstring."""

    family = "diffusers"
    config_cls = DiffusersAEConfig
    spatial_tiling = True

    def __init__(self, config: DiffusersAEConfig, model: nn.Module | None = None):
        super().__init__(config)
        cls = _diffusers_class(config.class_name)
        self.kind = KINDS[config.class_name]
        self.model = model if model is not None else cls.from_config(dict(config.model_config))
        if not isinstance(self.model, cls):
            raise TypeError(f"expected a {config.class_name}, got {type(self.model).__name__}")
        mc = config.model_config
        self.spatial_factor = self.kind.spatial(mc)
        self.temporal_factor = self.kind.temporal(mc)
        self.latent_channels = int(mc[self.kind.channels_key])
        if config.in_channels != int(_cfg(mc, "in_channels", 3)):
            raise ValueError(f"in_channels={config.in_channels} but the {config.class_name} takes "
                             f"{_cfg(mc, 'in_channels', 3)}")
        check_latent_stats(config, self.latent_channels)

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        f, r, name = self.spatial_factor, self.temporal_factor, f"diffusers:{self.config.class_name}"
        step = r * self.kind.frame_step
        if frames < 1 or (frames - 1) % step:
            raise ValueError(f"{name}: needs 1 + {step}k frames (1, {1 + step}, {1 + 2 * step}, ...), got {frames}")
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"{name}: height and width must be positive multiples of {f}, got {height}x{width}")
        t = 1 + (frames - 1) // r
        return LatentSpec(form="grid", parts={"z": (self.latent_channels, t, height // f, width // f)},
                          input_shape=(self.config.in_channels, frames, height, width),
                          vcpr=frames / t * f * f)

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        frames = video.shape[2]
        x = video.to(self.model.dtype)
        if self.kind.image:
            x = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
        out = self.model.encode(x)
        if self.kind.posterior:
            mean, logvar = out.latent_dist.mean, out.latent_dist.logvar
        else:
            mean, logvar = out.latent, None
        if self.kind.image:
            mean = rearrange(mean, "(b t) c h w -> b c t h w", t=frames)  # (B, c, T, h, w)
            if logvar is not None:
                logvar = rearrange(logvar, "(b t) c h w -> b c t h w", t=frames)  # (B, c, T, h, w)
        return Latent({"z": mean}, form="grid", logvar={} if logvar is None else {"z": logvar})

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        z = grid_z(latent, self.latent_channels, f"diffusers:{self.config.class_name}").to(self.model.dtype)
        if self.kind.image:
            frames = z.shape[2]
            x = self.model.decode(rearrange(z, "b c t h w -> (b t) c h w")).sample  # (B*T, C, H, W)
            return rearrange(x, "(b t) c h w -> b c t h w", t=frames)  # (B, C, T, H, W)
        if self.config.model_config.get("timestep_conditioning"):  # LTX-Video 0.9.1+ decoders
            temb = torch.full((z.shape[0],), self.config.decode_timestep, device=z.device, dtype=z.dtype)
            return self.model.decode(z, temb).sample
        return self.model.decode(z).sample


def load_diffusers(class_name: str, path: str | Path | None, subfolder: str | None = None) -> nn.Module:
    """The diffusers model ``class_name`` from the LOCAL folder ``path`` (never a hub), with clear
    errors for a missing folder, a pipeline folder without ``subfolder`` and a folder holding another
    class."""
    cls = _diffusers_class(class_name)
    if path is None:
        raise ValueError(f"diffusers:{class_name} needs path=<local diffusers folder>")
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers:{class_name}: no such directory {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = " (a pipeline folder: its VAE is the vae/ subfolder)" if (folder / "vae").is_dir() else ""
        raise FileNotFoundError(f"diffusers:{class_name}: {folder} has no config.json{hint}")
    try:
        saved = json.loads(config_file.read_text())
        saved_class = saved.get("_class_name")
    except (ValueError, AttributeError):
        raise ValueError(f"diffusers:{class_name}: {config_file} is not a JSON object") from None
    if saved_class is None and "family" in saved:  # save_pretrained's config.json
        raise ValueError(f"{folder} holds one of our own models ({saved['family']}), not a diffusers one: give it to "
                         "--checkpoint / --init as it is, or start another family from it with `ldm convert "
                         "--source saved`")
    if saved_class is None:
        raise ValueError(f"diffusers:{class_name}: {folder} is not a diffusers model folder (its config.json names "
                         "no _class_name; a transformers model such as a text encoder?)")
    if saved_class != class_name:
        raise ValueError(f"{folder} holds a {saved_class}, not a {class_name}")
    try:
        return cls.from_pretrained(str(Path(path)), subfolder=subfolder, local_files_only=True)
    except OSError as e:  # no weights file (diffusers names the file it looked for)
        raise FileNotFoundError(f"diffusers:{class_name}: {folder}: {str(e).splitlines()[0]}") from None


def build_diffusers(class_name: str, path: str | Path | None = None, subfolder: str | None = None,
                    **overrides: Any) -> DiffusersAE:
    """Load ``class_name`` (e.g. ``"AutoencoderKLWan"``) from the local diffusers folder ``path``
    (``subfolder`` e.g. ``"vae"`` inside a pipeline folder) and wrap it. ``overrides`` may set
    ``latent_scale``, ``latent_shift`` (replacing the model's normalisation) and ``decode_timestep``."""
    fixed = sorted(set(overrides) & {"class_name", "model_config", "in_channels"})
    if fixed:
        raise ValueError(f"diffusers:{class_name}: {fixed} come from the model folder and cannot be overridden")
    model = load_diffusers(class_name, path, subfolder)
    model_config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    scale, shift = normalisation(class_name, model)
    config = DiffusersAEConfig(in_channels=int(_cfg(model_config, "in_channels", 3)), latent_scale=scale,
                               latent_shift=shift, class_name=class_name,
                               model_config=json.loads(json.dumps(model_config)))
    config = cfglib.replace(config, **overrides)
    return DiffusersAE(config, model=model)


register_loader("diffusers", build_diffusers)
