"""The autoencoder contract (the spine of the platform) and the registry.

Every autoencoder, ours or a wrapped diffusers model, is an `Autoencoder`:

- ``encode(video, cond=None) -> Latent``: ``video`` is ``B C T H W`` in [-1, 1]; the parts are the
  posterior MEAN (deterministic), ``Latent.logvar`` keeps the posterior log-variance for storage;
  sampling happens in the trainer (``Latent.sample``).
- ``decode(latent, cond=None) -> video`` in [-1, 1] (not clamped).
- ``latent_spec(frames, height, width) -> LatentSpec``: shape arithmetic only.
- ``train_forward(video, cond) -> AEOutput``: what the AE trainer optimises; families with their own
  objectives (diffusion decoders, consistency losses) override it and return extra loss terms.
- ``enable_tiling(tile, overlap, margin)`` / ``disable_tiling()``: ``encode`` and ``decode`` work on
  overlapping spatial tiles blended at the seams (``tiling.py``), for the families that declare
  ``spatial_tiling`` (one grid part ``z`` at ``spatial_factor``). ``train_forward`` never tiles.

Latent scaling: ``config.latent_scale`` / ``config.latent_shift`` (one value, or one per channel of
grid part ``z``) are applied inside ``encode``/``decode`` as ``(z - shift) * scale``, so the
statistics live in the config, never in scripts. Measured per-channel statistics of a dataset live
in the extraction manifest.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from autoencoders.tiling import Tiling, tiled_decode, tiled_encode
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_json, load_tensors, read_json, save_tensors
from ldm.errors import MissingInput, UserError
from ldm.latent import Cond, Latent, LatentSpec


@dataclass(frozen=True)
class AEConfig:
    """Fields every autoencoder config has (subclasses add their architecture)."""

    in_channels: int = 3
    latent_scale: tuple[float, ...] = (1.0,)
    latent_shift: tuple[float, ...] = (0.0,)


@dataclass
class AEOutput:
    recon: Tensor  # B C T H W
    posterior: Latent  # mean + logvar, for the KL term
    losses: dict[str, Tensor] = field(default_factory=dict)  # family-specific terms, already weighted


class Autoencoder(nn.Module):
    family: ClassVar[str] = ""
    config_cls: ClassVar[type] = AEConfig
    # --- what the family can do: declared here, never probed with hasattr --------------------
    # True when a training step can leave parameters without gradients (DDP must not wait for them)
    ddp_find_unused_parameters: ClassVar[bool] = False
    # True when the latent is one grid part ``z: B c t H/f W/f`` with ``f = self.spatial_factor`` (an
    # attribute such families have) whose cells depend mostly on nearby pixels: enable_tiling applies
    spatial_tiling: ClassVar[bool] = False
    # training stages (``config.stage`` values ``with_stage`` takes); () = trained in one go
    stages: ClassVar[tuple[int, ...]] = ()
    # family of the pretrained autoencoder ``load_base`` starts from ("" = none)
    base_family: ClassVar[str] = ""
    # ``encode_content(image)`` gives a first frame's ``content`` latent (image-to-video)
    content_encoding: ClassVar[bool] = False
    # variable-length latents at a chosen temporal rate (``varlen_length``)
    variable_rate: ClassVar[bool] = False
    # ``decode(latent, Cond(first_frame=pixels))`` also reads the clip's first frame (image-to-video
    # reconstruction, H3AE's omni objective); plain ``decode(latent)`` stays available
    first_frame_decoding: ClassVar[bool] = False
    # ``train_forward``'s ``recon`` carries gradients to the weights, so the trainer's pixel terms
    # (reconstruction, LPIPS) train the model; False (Hi-VAE: a detached one-step estimate of a
    # diffusion decoder) logs them as progress measures, outside the total the model minimises
    recon_trained: ClassVar[bool] = True

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.tiling: Tiling | None = None
        # a text-guided model's training text encoder: {"spec", "dim", "fingerprint"} (ldm.text.fingerprint),
        # set by `ldm train-ae`, saved in config.json, checked by check_text_encoder
        self.trained_text_encoder: dict[str, Any] | None = None

    # --- to implement -------------------------------------------------------------------
    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        raise NotImplementedError

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        raise NotImplementedError

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        raise NotImplementedError

    def example_latent(self, spec: LatentSpec, batch: int = 1) -> Latent:
        """A random latent of ``spec`` (``batch`` samples) carrying the ``aux`` its decoder reads, for
        uses that need its shapes, not its values (counting a decode's FLOPs on fake tensors): a
        varlen latent gets its ``length``."""
        parts = {k: torch.randn(batch, *s) for k, s in spec.parts.items()}
        aux = {}
        if spec.form == "varlen":
            aux = {"length": torch.full((batch,), next(iter(spec.parts.values()))[1], dtype=torch.long)}
        return Latent(parts, spec.form, aux=aux)

    # --- the contract --------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        """Width of the caption embeddings a text-guided autoencoder takes in ``cond.text`` at
        encode and decode (0, the default: the model takes no text)."""
        return int(getattr(self.config, "text_dim", 0))

    def schedule_warnings(self, steps_left: int) -> list[str]:
        """Warnings about the model's own step-scheduled training terms for a run with ``steps_left``
        training steps to go (e.g. H3AE's consistency loss starting after the run ends); none here."""
        return []

    @property
    def stage(self) -> int | None:
        """The training stage of a staged family (``config.stage``), None for the others."""
        return self.config.stage if self.stages else None

    def latent_caveat(self) -> str | None:
        """Why this model's latents are not yet worth training a DiT on (``ldm extract`` logs it),
        None when they are: a staged model before the stage that trains part of its latent."""
        return None

    def with_stage(self, stage: int) -> "Autoencoder":
        """This model set up to train stage ``stage`` (the same object, or a converted one when a
        stage changes the architecture, as MTC-VAE's EMA in stage 2)."""
        raise ValueError(f"{self.family} is not trained in stages; --stage applies to "
                         f"{families_with(lambda c: c.stages)}")

    def with_config(self, **overrides: Any) -> "Autoencoder":
        """This model (its weights) with config fields changed that keep every weight's shape:
        how it trains or decodes (Hi-VAE's ``kl_free_bits``, MTC-VAE's ``train_rates``, ...). A
        field that changes the architecture is a `UserError` naming the weights that no longer fit."""
        detail = None
        try:
            model = type(self)(cfglib.replace(self.config, **overrides))
        except ValueError:  # a wrong value says so (raised here); else the saved latent statistics no longer fit
            if {"latent_scale", "latent_shift"} & set(overrides):
                raise
            type(self)(cfglib.replace(self.config, **overrides, latent_scale=(1.0,), latent_shift=(0.0,)))
            detail = "its latent statistics have another number of channels"
        else:
            try:
                model.load_state_dict(self.state_dict(), strict=True)
            except RuntimeError as e:
                detail = str(e).split("\n", 1)[-1].strip().splitlines()[0]
        if detail is not None:
            raise UserError(f"config overrides {sorted(overrides)} change {self.family}'s architecture, so the saved "
                            f"weights no longer fit ({detail}); start from the registered name instead")
        return model

    def load_base(self, path: str | Path) -> None:
        """Load the pretrained base this model starts from (``base_family``) from a
        ``save_pretrained`` folder."""
        raise ValueError(f"{self.family} has no frozen base autoencoder; --base-checkpoint applies to "
                         f"{families_with(lambda c: c.base_family)}")

    def encode_content(self, image: Tensor) -> Tensor:
        """``(B, C, H, W)`` frames -> the ``content`` latent part (families with ``content_encoding``)."""
        raise ValueError(f"{self.family} has no content (first-frame) latent to encode an image into")

    def varlen_length(self, frames: int, rate: float) -> int:
        """Latent frames of a ``frames``-frame clip at average temporal rate ``rate`` (families with
        ``variable_rate``)."""
        raise ValueError(f"{self.family} compresses every clip at one fixed rate; a rate budget needs a "
                         "variable-rate autoencoder (MTC-VAE)")

    def last_layer(self) -> Tensor | tuple[Tensor, ...]:
        """The weight the adaptive GAN weight differentiates (taming Eq. 7): by default the last
        trainable weight matrix of ``self.decoder``; families without one override it (several
        weights when the output is written by parallel heads)."""
        decoder = getattr(self, "decoder", None)
        if not isinstance(decoder, nn.Module):
            raise ValueError(f"{type(self).__name__} has no .decoder module: the adaptive GAN weight needs "
                             "last_layer() (or train without --gan)")
        weights = [p for p in decoder.parameters() if p.ndim > 1 and p.requires_grad]
        if not weights:
            raise ValueError(f"{type(self).__name__}.decoder has no trainable weight matrix")
        return weights[-1]

    def check_text_encoder(self, encoder: Any, spec: str | None = None, name: str | None = None) -> None:
        """A text-guided model (``text_dim > 0``) encodes and decodes with caption embeddings: it
        needs ``encoder`` (an ``ldm.text`` encoder, built from ``spec``) of its width. Other models
        take any (extraction caches embeddings for the DiT) or none."""
        need, name = self.text_dim, name or self.family
        if need and encoder is None:
            raise UserError(f"{name} is text-guided (text_dim={need}) and encodes with the caption: pass "
                             "--text-encoder builtin | t5:DIR | clip:DIR (the one it was trained with)")
        if need and encoder.dim != need:
            raise UserError(f"--text-encoder {spec} gives {encoder.dim}-d embeddings, {name} takes {need}-d "
                             f"(to train with this encoder, build it with --ae-config text_dim={encoder.dim})")
        trained = self.trained_text_encoder
        if need and trained and trained.get("fingerprint"):
            from ldm.text import fingerprint, same_fingerprint
            if not same_fingerprint(fingerprint(encoder), trained["fingerprint"]):
                raise UserError(f"--text-encoder {spec} embeds captions differently from the encoder {name} was "
                                f"trained with ({trained.get('spec')}): pass that one")

    def text_length(self) -> int | None:
        """The tokens captions were cut or padded to when this text-guided model was trained (`ldm
        train-ae --text-max-length`, recorded in its folder); None: not recorded (a registered or
        converted model, or a folder from before), the text encoder's own length."""
        trained = self.trained_text_encoder
        return trained.get("max_length") if self.text_dim and trained else None

    def example_clip(self) -> tuple[int, int, int]:
        """The smallest ``(frames, height, width)`` of at least 32x32 pixels this model takes,
        preferring a video (2 or more frames) to an image: the clip the contract tests
        (tests/test_contract.py, tests/test_device.py) run every registered config on (smaller
        frames leave 1x1 latents). Found with ``check_input`` (shape arithmetic, no weights)."""
        for side in (32, 64, 128, 256, 512):
            for frames in [*range(2, 65), 1]:
                try:
                    self.check_input(frames, side, side)
                except ValueError:
                    continue
                return frames, side, side
        raise ValueError(f"{self.family}: check_input takes no clip of 1 to 64 frames at 32x32 to 512x512")

    def check_input(self, frames: int, height: int, width: int) -> None:
        """Raise ValueError for an input size this autoencoder cannot take (default: whatever
        ``latent_spec`` rejects)."""
        self.latent_spec(frames, height, width)

    def encode(self, video: Tensor, cond: Cond | None = None) -> Latent:
        if video.ndim != 5:
            raise ValueError(f"encode expects B C T H W video, got shape {tuple(video.shape)}")
        if video.shape[1] != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} channels, got {video.shape[1]}")
        self.check_input(*video.shape[2:])
        latent = tiled_encode(self, video, cond, self.tiling) if self.tiling is not None else self._encode(video, cond)
        wrong = self.latent_spec(*video.shape[2:]).mismatch(latent)
        if wrong:  # a bug of the family: every verb sizes shards, DiTs and costs from latent_spec
            raise RuntimeError(f"{self.family}: encode of a {tuple(video.shape)} video gives a latent whose {wrong} "
                               f"by latent_spec; fix latent_spec or _encode in {type(self).__module__}")
        return self._scale(latent, forward=True)

    def compile_encode(self, mode: str | None = None, backend: str | Callable = "inductor") -> None:
        """From now on ``encode`` runs the family's ``_encode`` through ``torch.compile`` (``ldm extract
        --compile``): elementwise work fused around the convolutions and matmuls, fewer kernel launches
        for an encoder that launches many small ones (H3AE). ``dynamic=False``: one graph per input
        shape, so give it one (the extraction pads its last batch to the full one). The checks, the
        latent scaling and tiling stay eager; weights and state dicts are unchanged. ``mode``: one
        of `ldm.layers.ENCODE_COMPILE_MODES` (``reduce-overhead``: CUDA graphs, recorded at the second
        call of a shape)."""
        from ldm.layers import ENCODE_COMPILE_MODES, torch_compile_mode

        self._encode = torch.compile(type(self)._encode.__get__(self), dynamic=False, backend=backend,
                                     mode=torch_compile_mode(mode, ENCODE_COMPILE_MODES))

    @property
    def encode_compiled(self) -> bool:
        """``compile_encode`` was called."""
        return "_encode" in self.__dict__

    def encode_work(self, video: Tensor, cond: Cond | None = None) -> Any:
        """The work of one ``encode`` that shapes alone can follow, for ``ldm cost``'s encoder FLOPs:
        ``encode`` itself, unless the family's encoder picks something from the pixels (MTC-VAE's
        rate per segment); then the work it does whatever it picks."""
        return self.encode(video, cond)

    def decode(self, latent: Latent, cond: Cond | None = None) -> Tensor:
        if self.tiling is not None:
            return tiled_decode(self, self._scale(latent, forward=False), cond, self.tiling)
        return self._decode(self._scale(latent, forward=False), cond)

    def enable_tiling(self, tile: int = 256, overlap: int = 64, margin: int = 0) -> None:
        """From now on ``encode`` / ``decode`` run on square tiles of ``tile`` video pixels (``tile / f``
        latent cells) whose neighbours share ``overlap`` pixels, blended with linear ramps over the
        overlap; ``margin`` pixels at each inner tile edge are left out of the blend. The output has
        the untiled shape; frames that fit in one tile are not tiled. All three are multiples of the
        spatial factor, ``overlap < tile`` and ``2 * margin <= overlap`` (ValueError otherwise).
        Recommended: ``tile`` as large as memory allows (256 or more), ``overlap = tile / 4``."""
        if not self.spatial_tiling:
            raise ValueError(f"{self.family}: spatial tiling applies to autoencoders whose latent is one grid "
                             f"following the frame and that declare it ({families_with(lambda c: c.spatial_tiling)}; "
                             "a family sets spatial_tiling = True and has a spatial_factor); this one does not")
        tiling = Tiling(tile, overlap, margin)
        tiling.check(self.spatial_factor, self.family)
        self.tiling = tiling

    def disable_tiling(self) -> None:
        """Back to one-shot ``encode`` / ``decode``."""
        self.tiling = None

    def set_chunk_frames(self, frames: int | None) -> None:
        """Encode and decode long clips ``frames`` video frames at a time with the same result as
        one shot (bounded memory), where the family streams causally: IV-VAE's cache mechanism,
        H3AE's sliced spatial stage. ``None`` or 0: one shot. Families that cannot stream say so."""
        instead = ("bound memory with spatial tiling (--tile, enable_tiling) or a larger device" if self.spatial_tiling
                   else "it takes no spatial tiling either: run long clips on a larger device")
        streams = families_with(lambda c: c.set_chunk_frames is not Autoencoder.set_chunk_frames)
        raise ValueError(f"{self.family}: no chunked (streaming) encode/decode (--chunk-frames: {streams}); {instead}")

    def train_forward(self, video: Tensor, cond: Cond | None = None,
                      generator: torch.Generator | None = None) -> AEOutput:
        posterior = self._encode(video, cond)
        recon = self._decode(posterior.sample(generator), cond)
        return AEOutput(recon=recon, posterior=posterior)

    # --- scaling -------------------------------------------------------------------------
    def _scale(self, latent: Latent, forward: bool) -> Latent:
        scale, shift = self.config.latent_scale, self.config.latent_shift
        if scale == (1.0,) and shift == (0.0,):
            return latent
        parts, logvar = dict(latent.parts), dict(latent.logvar)
        for name in parts:
            x = parts[name]
            s = torch.tensor(scale, dtype=x.dtype, device=x.device)
            b = torch.tensor(shift, dtype=x.dtype, device=x.device)
            if x.ndim == 5:  # per-channel (or single) statistics on B c t h w
                s, b = s.view(1, -1, 1, 1, 1), b.view(1, -1, 1, 1, 1)
            parts[name] = (x - b) * s if forward else x / s + b
            if name in logvar:
                logvar[name] = logvar[name] + (2 if forward else -2) * torch.log(s.abs())
        return latent.replace(parts, logvar=logvar)

    # --- persistence ---------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, name: str | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(path / "model.safetensors", self.state_dict())
        extra = {"text_encoder": self.trained_text_encoder} if self.trained_text_encoder else {}
        atomic_write_json(path / "config.json", {"family": self.family, "name": name,
                                                 "config": cfglib.to_dict(self.config), **extra})

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> "Autoencoder":
        return cls(cfglib.from_dict(cls.config_cls, data))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def causal_grid_spec(ae: "Autoencoder", frames: int, height: int, width: int, temporal: int, spatial: int,
                     channels: int, rule: str = "") -> LatentSpec:
    """The latent spec of a causal grid VAE (first frame alone, then groups of ``temporal``):
    ``1 + temporal*k`` frames -> ``1 + k`` latent frames, ``spatial``x downsampling; clear errors
    for sizes it cannot take (``rule`` adds the family's own words to the frame error)."""
    f, r = spatial, temporal
    if frames < 1 or (frames - 1) % r:
        raise ValueError(f"{ae.family}: needs 1 + {r}k frames (1, {1 + r}, {1 + 2 * r}, ...){rule}, got {frames}")
    if height <= 0 or width <= 0 or height % f or width % f:
        raise ValueError(f"{ae.family}: height and width must be positive multiples of {f}, got {height}x{width}")
    t = 1 + (frames - 1) // r
    return LatentSpec(form="grid", parts={"z": (channels, t, height // f, width // f)},
                      input_shape=(ae.config.in_channels, frames, height, width), vcpr=frames / t * f * f)


# ------------------------------------------------------------------------------------------
# Registry: names -> (family class, frozen config). `build(name, **overrides)` is the only way
# scripts make autoencoders.
# ------------------------------------------------------------------------------------------
FAMILIES: dict[str, type[Autoencoder]] = {}
REGISTRY: dict[str, tuple[type[Autoencoder], Any]] = {}
# run-time loaders of external weights: "<prefix>:<what>" names (diffusers:AutoencoderKL wraps a
# local diffusers folder) -> a loader taking ``(what, path=<local folder>, subfolder=None, **overrides)``.
# (Released checkpoints converted into our families are the weight sources of ``sources.py``.)
LOADERS: dict[str, Callable[..., Autoencoder]] = {}


def families_with(can: Callable[[type[Autoencoder]], Any]) -> str:
    """The registered families whose class ``can`` do something, for messages: "h3ae, ivvae"."""
    return ", ".join(sorted(f for f, c in FAMILIES.items() if can(c))) or "none"


def register_family(cls: type[Autoencoder]) -> type[Autoencoder]:
    """Class decorator: ``cls.family`` names the class in saved ``config.json`` files
    (``load_pretrained`` rebuilds it by that name), so each family has its own."""
    if not cls.family:
        raise ValueError(f"{cls.__name__} has no family name")
    known = FAMILIES.get(cls.family)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"{cls.__name__}: family {cls.family!r} is already {known.__name__} ({known.__module__}); "
                         f"give {cls.__name__} its own `family = ...` (a subclass inherits its parent's)")
    FAMILIES[cls.family] = cls
    return cls


def register(name: str, cls: type[Autoencoder], config: Any) -> None:
    if name in REGISTRY:
        raise ValueError(f"autoencoder {name!r} registered twice")
    if FAMILIES.get(cls.family) is not cls:
        raise ValueError(f"autoencoder {name!r}: {cls.__name__} is not a registered family (load_pretrained could "
                         f"not rebuild it): decorate the class with @register_family")
    if not isinstance(config, cls.config_cls):
        raise ValueError(f"autoencoder {name!r}: config is a {type(config).__name__}, {cls.__name__} takes "
                         f"{cls.config_cls.__name__} (its config_cls)")
    REGISTRY[name] = (cls, config)


def register_loader(prefix: str, load: Callable[..., Autoencoder]) -> None:
    """Register a run-time loader of external weights: ``build("<prefix>:<what>", path=DIR, ...)``
    calls ``load(what, path=DIR, ...)`` (``diffusers``: ``what`` is the diffusers class)."""
    if prefix in LOADERS:
        raise ValueError(f"autoencoder loader {prefix!r} registered twice")
    LOADERS[prefix] = load


def loader_of(name: str) -> str | None:
    """The loader prefix of a ``<prefix>:<what>`` name, None for any other name."""
    prefix, sep, _ = name.partition(":")
    return prefix if sep and prefix in LOADERS else None


def build(name: str, **overrides: Any) -> Autoencoder:
    """Build a registered autoencoder (random weights), or load one from a registered source:
    ``<prefix>:<what>`` with ``path=<local dir>`` (``diffusers:AutoencoderKLWan``)."""
    loader = loader_of(name)
    if loader is not None:
        return LOADERS[loader](name.split(":", 1)[1], **overrides)
    if name not in REGISTRY:
        raise KeyError(f"unknown autoencoder {name!r}; registered: {sorted(REGISTRY)} "
                       f"(or {' / '.join(f'{p}:<what>' for p in sorted(LOADERS))} with path=DIR)")
    cls, config = REGISTRY[name]
    return cls(cfglib.replace(config, **overrides))


def _diffusers_class_of(path: Path) -> str | None:
    """The ``_class_name`` a diffusers model folder's config.json names (None: not one)."""
    try:
        name = read_json(path / "config.json").get("_class_name")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def saved_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a folder written by ``save_pretrained``; a `UserError` that says what
    the folder is instead (missing, a file, a DiT export, a ``train-ae`` run folder, something
    else) and what to pass."""
    path = Path(path)
    wanted = "a folder with config.json + model.safetensors written by save_pretrained (e.g. a `ldm train-ae` run's final/)"
    if not path.exists():
        raise MissingInput(f"autoencoder checkpoint {path} not found (expected {wanted})")
    if not path.is_dir():
        raise UserError(f"autoencoder checkpoint {path} is a file; expected {wanted}")
    if (path / "training.json").is_file() or (path / "export" / "training.json").is_file():
        raise UserError(f"{path} is a DiT (an `ldm train` run or export), not an autoencoder: pass it to `ldm sample "
                        f"--checkpoint`; here give the autoencoder's own folder ({wanted})")
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        raise UserError(f"{path} is a `ldm train-ae` run folder; give its final/ folder: {path / 'final'}")
    diffusers_class = _diffusers_class_of(path)
    if diffusers_class:
        from autoencoders.sources import SOURCES  # sources.py builds on this module

        source = f"diffusers:{diffusers_class}"
        convert = (f", or convert it into ours with `ldm convert --source {source} --path {path} --target NAME "
                   "--output DIR`") if source in SOURCES else ""
        raise UserError(f"{path} is a diffusers {diffusers_class} folder, not one of ours: ldm extract / reconstruct "
                        f"/ eval run it as --autoencoder {source} with the folder as its path{convert}")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path} is not {wanted}")
    try:
        meta = read_json(path / "config.json")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "family" not in meta or "config" not in meta:
        raise UserError(f"{path / 'config.json'} is not an autoencoder's config (no 'family'/'config'): not {wanted}")
    if meta["family"] not in FAMILIES:
        raise UserError(f"{path}: unknown autoencoder family {meta['family']!r}; known: {sorted(FAMILIES)}")
    return meta


def load_pretrained(path: str | Path, strict: bool = True) -> Autoencoder:
    """Load a folder written by ``save_pretrained`` (safetensors + JSON config)."""
    path = Path(path)
    meta = saved_config(path)
    family = meta["family"]
    model = FAMILIES[family].from_config_dict(meta["config"])
    model.load_state_dict(load_tensors(path / "model.safetensors"), strict=strict)
    model.trained_text_encoder = meta.get("text_encoder")
    return model


def meta_model(cls: type[Autoencoder], config: AEConfig) -> Autoencoder:
    """``cls(config)`` on the meta device (no weights allocated) for what needs only its shapes and
    parameter count (`describe`, ``ldm list``, ``ldm cost``), built once per (class, config): both
    verbs ask for each model at several clip lengths, and a full-size model takes ~0.1 s to build.
    Do not change the result (it is shared)."""
    try:
        hash(config)
    except TypeError:  # a config with a list or dict field: built each time
        return _build_on_meta(cls, config)
    return _cached_meta_model(cls, config)


def _build_on_meta(cls: type[Autoencoder], config: AEConfig) -> Autoencoder:
    with torch.device("meta"):
        return cls(config)


_cached_meta_model = functools.lru_cache(maxsize=256)(_build_on_meta)


def describe(name: str, frames: int = 17, height: int = 256, width: int = 256) -> dict[str, Any]:
    """Registry entry as JSON-able dict: family, parameter count, config, and the latent spec at a
    reference size."""
    cls, config = REGISTRY[name]
    model = meta_model(cls, config)  # latent_spec is arithmetic on the config
    try:
        spec = model.latent_spec(frames, height, width).to_dict()
    except ValueError as e:
        spec = {"error": str(e)}
    return {"name": name, "family": cls.family, "params": model.num_parameters(),
            "reference_input": [config.in_channels, frames, height, width],
            **spec, "config": json.loads(json.dumps(dataclasses.asdict(config)))}
