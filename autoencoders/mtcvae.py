"""MTC-VAE: multi-level temporal compression with content awareness (Dong & Zhu; the paper's
Sec. 3 and Algorithms 1-2). No public code exists; this follows the paper.

A fixed-rate causal 3D VAE (``causal3d``, 4x in time) is converted into one that compresses each
fixed-length segment of a clip at its own temporal rate ``c in {4, 8, 16}`` (Sec. 3.1):

- **Extra temporal layers.** Two more 2x temporal down/up-samplers, initialised as copies of the
  base's deepest temporal resampler (Sec. 3.5: "based on the nearby sampling layer of the
  pre-trained VAE and initialized with its parameters"), run right after it in the encoder and
  right before its mirror in the decoder; a segment at rate c uses the first ``log2(c/4)`` of them,
  the rest are skipped (Eq. 4). They sit in the base's deepest temporal slot rather than in an empty
  deeper one because only there do the widths match in every config (CogVideoX-sized decoders are
  wider at the empty boundary).
- **Compression algorithm** (Sec. 3.2, Eq. 1-3): per segment a quality vector Q(c) -- PSNR of the
  reconstruction at each rate (default), or the paper's alternatives H.264 size and random
  (Tab. 5) -- the tolerance alpha and the rate maximising ``(1-alpha) Q + alpha log2(c) w``.
- **Keyframe embedding** ``f_c`` (one learnable ``c``-vector per rate, Alg. 1's ``f_{c_i}``) added to
  the first latent frame of every segment (Eq. 5), segments concatenated along time (Eq. 6) into a
  variable-length latent (``Latent`` form ``"varlen"``: ``z``, ``aux`` length / keyframe / rates).
- **Decoding** (Sec. 3.4, Eq. 7-8): segments come from the stored rates when the latent has them,
  else from the linear keyframe predictor P (``KeyframePredictor``): split at predicted keyframes,
  rate from each segment's length, low-confidence fallback (Sec. 8.1); segments of equal (rate,
  length) are decoded in one batch. A latent segment of ``l`` frames at rate c decodes to
  ``1 + c (l - 1)`` frames (causal first frame), so the video's frame count follows the segments.
- **What the decoder sees**: the marked latent as it is, ``z + f_c`` on each segment's first frame
  (Eq. 5 is never undone: Alg. 1 decodes the marked ``z_i``, Alg. 2 the generated ``z_0``), in
  training and in ``decode`` alike, so the flow loss reaches ``f_c``. ``f_c`` starts at zero, so a
  converted model decodes exactly as its base until stage 2 trains ``f_c``. The older mode
  ``stage2_mode="decoder"`` takes ``f_c`` off before decoding (train and inference), so the
  decoder never sees it and only BCE trains it.
- **Two-step fine-tuning** (Sec. 3.5) as ``train_forward`` terms chosen by ``config.stage``:
  stage 1 trains the new sampling layers (``extra_down``, ``extra_up``) with the trainer's
  reconstruction + KL (+ GAN) at random 8x/16x rates; stage 2 trains ``f_c`` and P only (encoder,
  decoder and sampling layers frozen) with BCE (Eq. 9) and the flow-guided loss (Eq. 10-12) on top
  of the trainer's terms, at the rates of the compression algorithm (Alg. 1), with an EMA of the
  trained weights (decay 0.999) that ``save_pretrained`` writes. ``stage2_mode="decoder"`` (ours,
  the behaviour before) also trains the decoder and the extra up-samplers in stage 2, at random
  rates. Stage 0 (ours) trains everything with every term at once, to train from scratch.

The training objective is chosen in the config (``stage``, loss weights) because the AE trainer
hands every family's objective to ``train_forward``. From the CLI, as Hi-VAE: ``ldm train-ae
--autoencoder mtcvae-c4 --base-checkpoint CAUSAL3D_RUN/final --stage 1`` (``load_base``), then
``--init STAGE1_RUN/final --stage 2`` (``with_stage``; ``convert`` does the conversion).

Guesses (details the paper leaves open: what this code does, then the alternative; no public code
exists, so none is settled by code):

- f_c's initial value: zeros (the decoder reads it, so stage 1 and a converted model decode as the
  base). Alternative: a random direction of RMS 1 (what ``stage2_mode="decoder"`` uses).
- Stage 2's objective: the trainer's reconstruction + KL are kept beside BCE + flow (the paper
  calls BCE and flow "extra losses"), so the reconstruction reaches f_c too; weights
  ``bce_weight`` 1.0, ``flow_weight`` 0.1 (the paper gives none). Alternative: BCE + flow only, or
  other weights.
- Optical flow: a weight-free, differentiable Horn-Schunck flow (the paper: a learned flow network,
  RPKNet), from each input frame to its reconstruction. Alternative: a learned flow network from
  local weights.
- Keyframe predictor "linear": one Conv1d over a window of 3 latent frames on each frame's
  per-channel spatial mean and RMS deviation. Alternative: window 1, or a linear map of the whole
  flattened frame (tied to one latent size).
- Eq. 7 for a causal VAE: the rate of a segment of ``l`` latent frames is ``(T - 1) / (l - 1)``
  (the first frame stays alone); the paper writes ``T / l``.
- Eq. 3's Q_min, Q_max, sigma_max: from each clip's own segments. Alternative: a dataset-wide
  reference (``quality_reference``).
- The H.264 quality function: PSNR modelled as falling linearly in ``log2(c)`` with a slope
  proportional to the segment's temporal bits (the paper gives no formula). Alternative: measure
  the PSNR of an H.264 encode at each frame rate.
- PSNR capped at 60 dB in Q (a perfect reconstruction would be infinite).
- Stage 2's rates: the selector runs on the model being trained, every step. Alternative: rates
  chosen once (e.g. by the stage-1 model) and stored with the data. f_c and P learn only the rates
  the selector picks (an untrained model's flat Q picks the highest everywhere): ``train_rates=
  "random"`` covers every rate.
- The EMA (decay 0.999) covers the trained weights (f_c and P). Alternative: the whole model.
- The extra sampling layers sit in the base's deepest temporal slot (see above). Alternative: a new
  deeper slot.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoders.base import REGISTRY, AEOutput, load_pretrained, register, register_family
from autoencoders.blocks import split_moments
from autoencoders.sources import register_initialiser
# the base's widths, so each MTC config is its causal3d base plus the multi-level parts
from autoencoders.causal3d import _DEBUG, _FULL, Causal3D, Causal3DConfig
from autoencoders.mtcvae_layers import (KeyframePredictor, Segment, flow_guided_loss, h264_quality,
                                        h264_temporal_bits, keyframe_accuracy, segment_latent_frames, segment_psnr,
                                        segments_from_rates, select_rates, split_segments)
from ldm import config as cfglib
from ldm.latent import Cond, Latent, LatentSpec, part_tokens

SELECTORS = ("psnr", "h264", "random")
TRAIN_RATES = ("auto", "random", "selector")
STAGE1_SCOPES = ("sampling", "all")
STAGE2_MODES = ("paper", "decoder")


@dataclass(frozen=True)
class MTCVAEConfig(Causal3DConfig):
    """A ``Causal3DConfig`` (the base) plus the multi-level parts and the fine-tuning objective."""

    segment_frames: int = 17  # T: fixed segment length (the paper's 17-frame segments)
    rates: tuple[int, ...] = (4, 8, 16)  # temporal rates; rates[0] is the base's
    # compression algorithm (Sec. 3.2)
    selector: str = "psnr"  # quality function Q: psnr | h264 | random (Tab. 5)
    rate_weight: float = 1.5  # w of Eq. 1
    quality_reference: tuple[float, ...] = ()  # (Q_min, Q_max, sigma_max) of Eq. 3; () = each clip's own
    h264_crf: int = 23
    h264_db_per_bit: float = 20.0  # slope of the H.264 quality model (mtcvae_layers.h264_quality)
    selector_seed: int = 0  # the random selector's generator seed
    # keyframe predictor and splitting (Sec. 3.4, 8.1)
    predictor_window: int = 3
    keyframe_threshold: float = 0.5
    keyframe_confidence: float = 0.6
    # fine-tuning (Sec. 3.5): what train_forward optimises
    stage: int = 0  # 0: everything, all terms; 1: new sampling layers; 2: f_c + predictor
    stage1_scope: str = "sampling"  # stage 1 trains the new sampling layers, or "all" but f_c / P
    # "paper": the decoder reads the marked latent z + f_c (Eq. 5, Alg. 1-2) in training and at
    # inference; stage 2 trains f_c + P only (decoder frozen), at the selector's rates.
    # "decoder" (ours, the behaviour before): f_c is taken off before decoding, stage 2 also trains
    # the decoder and the extra up-samplers, at random rates; f_c starts as a random direction.
    stage2_mode: str = "paper"
    # segment rates in training: auto = stage 1 random among the new rates (Sec. 3.5), stage 2 the
    # selector's (Alg. 1; random with stage2_mode="decoder"), stage 0 random; or force random / selector
    train_rates: str = "auto"
    bce_weight: float = 1.0  # Eq. 9 (stages 0, 2)
    flow_weight: float = 0.1  # Eq. 10 (stages 0, 2)
    flow_levels: int = 3
    flow_iters: int = 30
    flow_smoothness: float = 0.5  # Horn-Schunck alpha for frames in [-1, 1]: accurate, bounded on garbage
    ema_decay: float = 0.999  # EMA of the stage-2 weights; 0 disables


@dataclass(frozen=True)
class MTCLatentSpec(LatentSpec):
    """``LatentSpec`` of a variable-rate latent: ``parts`` hold the LONGEST latent (every segment at
    the base rate, what a DiT must be able to hold); ``vcpr`` is the average VCPR for ``rate_mix``
    (the mean of the per-segment VCPRs, the paper's convention: a uniform random mix of 4/8/16 gives
    597.3, cf. Tab. 5's 598.1); ``vcpr_per_rate`` the nominal ``c * f * f`` per rate."""

    vcpr_per_rate: dict[int, float] = field(default_factory=dict)
    rate_mix: dict[int, float] = field(default_factory=dict)
    mix_latent_frames: float = 0.0  # expected latent frames per clip under rate_mix

    def to_dict(self, patch: tuple[int, int, int] = (1, 2, 2)) -> dict:
        c, _, h, w = self.parts["z"]
        mix_tokens = part_tokens((c, math.ceil(self.mix_latent_frames), h, w), patch)
        return {**super().to_dict(patch), "vcpr_per_rate": {str(k): v for k, v in self.vcpr_per_rate.items()},
                "rate_mix": {str(k): v for k, v in self.rate_mix.items()},
                "mix_latent_frames": self.mix_latent_frames, "mix_tokens": mix_tokens}


@register_family
class MTCVAE(Causal3D):
    """Multi-level temporal compression VAE: ``B C (N*T) H W`` -> varlen ``z: B c t_max h/f w/f``
    with ``t_b = sum_i (1 + (T - 1) / c_{b,i})`` valid frames per sample (``aux``: ``length (B,)``,
    ``keyframe (B, t_max)``, ``rates (B, N)``)."""

    family = "mtcvae"
    config_cls = MTCVAEConfig
    ddp_find_unused_parameters = True  # a step trains the rate levels its segments chose, not all of them
    spatial_tiling = False  # each segment's rate is chosen from the whole frame: tiles would disagree
    stages = (0, 1, 2)  # Sec. 3.5: 1 new sampling layers, 2 f_c + predictor; 0 (ours) everything
    base_family = "causal3d"  # the fixed-rate VAE the multi-level one is converted from (load_base)
    variable_rate = True

    def __init__(self, config: MTCVAEConfig):
        super().__init__(config)
        self._check_config(config)
        self.host = max(i for i, t in enumerate(config.temporal_down) if t)  # deepest temporal slot
        levels = len(config.rates) - 1
        self.extra_down = nn.ModuleList([copy.deepcopy(self.encoder.temporal_down[self.host]) for _ in range(levels)])
        self.extra_up = nn.ModuleList([copy.deepcopy(self.decoder.temporal_up[self.host]) for _ in range(levels)])
        c = config.latent_channels
        if config.stage2_mode == "paper":
            # zeros: the decoder reads z + f_c, so a converted model decodes exactly as its base and
            # stage 1 trains without a mark, as in the paper (f_c is introduced in stage 2)
            embed = torch.zeros(len(config.rates), c)
        else:
            # the decoder never sees f_c: one shared random direction of RMS 1 for every rate, so
            # the predictor has a mark to find from the first step; training separates them
            direction = torch.randn(c)
            embed = (direction / direction.norm() * math.sqrt(c)).repeat(len(config.rates), 1)
        self.keyframe_embed = nn.Parameter(embed)  # (R, c): f_c of each rate
        self.predictor = KeyframePredictor(c, config.predictor_window)
        self._set_trainable()
        self._ema_names: list[str] = []
        if config.stage == 2 and config.ema_decay > 0:
            self._ema_names = [n for n, p in self.named_parameters() if p.requires_grad]
            for n in self._ema_names:
                self.register_buffer(_ema_key(n), self.get_parameter(n).detach().clone())
            self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> "MTCVAE":
        """A saved config; one written before ``stage2_mode`` existed has ``stage2_decoder`` and
        ``train_rates="random"`` and was trained with f_c taken off before decoding: it loads as
        ``stage2_mode="decoder"``, so it decodes as it was trained."""
        if "stage2_decoder" in data:
            data = {k: v for k, v in data.items() if k != "stage2_decoder"}
            data["stage2_mode"] = "decoder"
        return super().from_config_dict(data)

    @staticmethod
    def _check_config(cfg: MTCVAEConfig) -> None:
        base = 2 ** sum(bool(t) for t in cfg.temporal_down)
        if base < 2:
            raise ValueError("the base must resample time in at least one slot (temporal_down)")
        rates = tuple(cfg.rates)
        if len(rates) < 2 or rates[0] != base or any(b != 2 * a for a, b in zip(rates, rates[1:])):
            raise ValueError(f"rates must start at the base's temporal rate {base} and double: e.g. "
                             f"{(base, 2 * base, 4 * base)}, got {rates}")
        if cfg.segment_frames < 1 + rates[-1] or (cfg.segment_frames - 1) % rates[-1]:
            raise ValueError(f"segment_frames must be 1 + {rates[-1]}k (k >= 1) so every rate fits, "
                             f"got {cfg.segment_frames}")
        choices = {"selector": SELECTORS, "train_rates": TRAIN_RATES, "stage1_scope": STAGE1_SCOPES,
                   "stage2_mode": STAGE2_MODES}
        for name, allowed in choices.items():
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
        if cfg.stage not in (0, 1, 2):
            raise ValueError(f"stage must be 0, 1 or 2, got {cfg.stage}")
        if cfg.stage == 1 and cfg.train_rates == "selector":
            raise ValueError("stage 1 trains the new sampling layers at their rates (train_rates='auto' or "
                             "'random'); the selector would pick the base rate from untrained layers")
        if cfg.quality_reference and len(cfg.quality_reference) != 3:
            raise ValueError(f"quality_reference is (Q_min, Q_max, sigma_max) or (), got {cfg.quality_reference}")
        if not 0 <= cfg.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
        if not 0 < cfg.keyframe_threshold < 1 or not 0.5 <= cfg.keyframe_confidence <= 1:
            raise ValueError("keyframe_threshold must be in (0, 1) and keyframe_confidence in [0.5, 1]")
        if min(cfg.bce_weight, cfg.flow_weight, cfg.rate_weight) < 0:
            raise ValueError("bce_weight, flow_weight and rate_weight must be >= 0")

    # --- trainable parts per stage ----------------------------------------------------------
    def _set_trainable(self) -> None:
        cfg = self.config
        if cfg.stage == 0:
            return
        self.requires_grad_(False)
        if cfg.stage == 1:
            train: list[nn.Module] = [self.extra_down, self.extra_up]
            if cfg.stage1_scope == "all":
                train += [self.encoder, self.decoder]
        else:  # Sec. 3.5: f_c + P; the old mode also the decoder and the extra up-samplers
            train = [self.predictor] + ([self.decoder, self.extra_up] if cfg.stage2_mode == "decoder" else [])
            self.keyframe_embed.requires_grad_(True)
        for m in train:
            m.requires_grad_(True)

    def with_stage(self, stage: int) -> "MTCVAE":
        """This model at ``stage`` (``convert``: weights kept; stage 2 adds the EMA, restarted)."""
        return self if stage == self.config.stage else convert(self, stage=stage)

    def load_base(self, path: str | Path) -> None:
        """Start from a trained fixed-rate ``causal3d`` (a ``save_pretrained`` folder with this
        model's base architecture): its weights and latent scale/shift, the extra sampling layers
        initialised from its deepest temporal resampler (Sec. 3.5)."""
        base = load_pretrained(path)
        if type(base) is not Causal3D:
            raise ValueError(f"{path}: the MTC-VAE base must be a causal3d autoencoder, got family {base.family!r}")
        arch = lambda cfg: {f.name: getattr(cfg, f.name) for f in fields(Causal3DConfig)  # noqa: E731
                            if f.name not in ("latent_scale", "latent_shift")}
        if arch(base.config) != arch(self.config):
            raise ValueError(f"{path}: base architecture {arch(base.config)} does not match this MTC-VAE's "
                             f"{arch(self.config)}")
        missing, unexpected = self.load_state_dict(base.state_dict(), strict=False)
        if unexpected or any(not k.startswith(("extra_down.", "extra_up.", "keyframe_embed", "predictor.", "ema_"))
                             for k in missing):
            raise ValueError(f"{path}: unexpected weights {unexpected[:5]}, missing {missing[:5]}")
        self.config = cfglib.replace(self.config, latent_scale=base.config.latent_scale,
                                     latent_shift=base.config.latent_shift)
        self.init_sampling_layers()
        self.reset_ema()

    def last_layer(self) -> Tensor:
        """The trained weight nearest the output, for the adaptive GAN weight: the decoder's
        output convolution, or (stage 1 on the sampling layers) the last new upsampler, or (stage 2
        with the decoder frozen) ``f_c``, the only trained weight the reconstruction depends on."""
        if self.decoder.conv_out.weight.requires_grad:
            return self.decoder.conv_out.weight
        if self.extra_up[0].conv.weight.requires_grad:
            return self.extra_up[0].conv.weight
        return self.keyframe_embed

    def init_sampling_layers(self) -> None:
        """Copy the base's deepest temporal resamplers into every extra layer (Sec. 3.5)."""
        with torch.no_grad():
            for layer in self.extra_down:
                layer.load_state_dict(self.encoder.temporal_down[self.host].state_dict())
            for layer in self.extra_up:
                layer.load_state_dict(self.decoder.temporal_up[self.host].state_dict())

    # --- EMA of the stage-2 weights (Sec. 3.5) ---------------------------------------------
    @torch.no_grad()
    def reset_ema(self) -> None:
        """Restart the EMA from the current weights (after loading other weights)."""
        for n in self._ema_names:
            getattr(self, _ema_key(n)).copy_(self.get_parameter(n))
        if self._ema_names:
            self.ema_steps.zero_()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema <- d ema + (1 - d) theta``; called at the start of each training step, so it
        folds in the weights the previous optimizer step produced (the first call copies)."""
        if not self._ema_names:
            return
        d = self.config.ema_decay if int(self.ema_steps) > 0 else 0.0
        for n in self._ema_names:
            getattr(self, _ema_key(n)).lerp_(self.get_parameter(n).detach(), 1.0 - d)
        self.ema_steps += 1

    def save_pretrained(self, path: str | Path, name: str | None = None) -> None:
        """Stage 2 writes its EMA weights (Sec. 3.5) as the model's; the live weights stay in
        memory. Trainer checkpoints (``state_dict``) keep both, so a resumed run is exact."""
        if not self._ema_names or int(self.ema_steps) == 0:
            return super().save_pretrained(path, name)
        live = {n: self.get_parameter(n).detach().clone() for n in self._ema_names}
        with torch.no_grad():
            for n in self._ema_names:
                self.get_parameter(n).copy_(getattr(self, _ema_key(n)))
            try:
                super().save_pretrained(path, name)
            finally:
                for n, v in live.items():
                    self.get_parameter(n).copy_(v)

    # --- shapes -------------------------------------------------------------------------------
    def segment_length(self, rate: int) -> int:
        """Latent frames of one segment at ``rate``."""
        return segment_latent_frames(self.config.segment_frames, rate)

    def example_latent(self, spec: LatentSpec, batch: int = 1) -> Latent:
        """The spec's latent (every segment at the base rate, the longest) with those rates in
        ``aux``, so ``decode`` splits it by them rather than by the keyframe predictor's reading of
        random values: a decode's cost at the base rate."""
        latent = super().example_latent(spec, batch)
        n = spec.input_shape[1] // self.config.segment_frames
        return latent.replace(aux={**latent.aux, "rates": torch.full((batch, n), self.config.rates[0])})

    def latent_spec(self, frames: int, height: int, width: int,
                    rate_mix: Mapping[int, float] | None = None) -> MTCLatentSpec:
        """Shapes for clips of ``frames = N * segment_frames``; ``rate_mix`` (rate -> share of
        segments, default all at the base rate) sets the average VCPR and expected length."""
        cfg, f = self.config, self.spatial_factor
        T = cfg.segment_frames
        if frames < T or frames % T:
            raise ValueError(f"{self.family}: needs a multiple of {T} frames (segments of {T}), got {frames}")
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"{self.family}: height and width must be positive multiples of {f}, "
                             f"got {height}x{width}")
        mix = dict(rate_mix) if rate_mix else {cfg.rates[0]: 1.0}
        unknown = set(mix) - set(cfg.rates)
        if unknown or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"rate_mix must give non-negative shares of the rates {cfg.rates}, got {mix}")
        total = sum(mix.values())
        mix = {int(c): v / total for c, v in sorted(mix.items())}
        n = frames // T
        per_rate = {int(c): float(c * f * f) for c in cfg.rates}
        return MTCLatentSpec(
            form="varlen", parts={"z": (cfg.latent_channels, n * self.segment_length(cfg.rates[0]),
                                        height // f, width // f)},
            input_shape=(cfg.in_channels, frames, height, width),
            vcpr=sum(p * per_rate[c] for c, p in mix.items()), vcpr_per_rate=per_rate, rate_mix=mix,
            mix_latent_frames=n * sum(p * self.segment_length(c) for c, p in mix.items()))

    def check_input(self, frames: int, height: int, width: int) -> None:
        self.latent_spec(frames, height, width)

    def varlen_length(self, frames: int, rate: float) -> int:
        """Latent frames for ``frames`` of video at an average temporal ``rate`` (a generation
        budget): ``N (1 + (T - 1) / rate)``, rounded, within the lengths the rates can produce."""
        cfg = self.config
        if not cfg.rates[0] <= rate <= cfg.rates[-1]:
            raise ValueError(f"rate budget {rate} is outside the rates {cfg.rates}")
        self.latent_spec(frames, self.spatial_factor, self.spatial_factor)  # checks the frame count
        return round(frames // cfg.segment_frames * (1 + (cfg.segment_frames - 1) / rate))

    # --- segments -------------------------------------------------------------------------------
    def _extra(self, rate: int, up: bool) -> dict[int, list[nn.Module]]:
        if rate not in self.config.rates:
            raise ValueError(f"rate {rate} is not one of {self.config.rates}")
        k = self.config.rates.index(rate)  # rates double: rate r uses the first log2(r / rates[0]) layers
        layers = list(self.extra_up[:k])[::-1] if up else list(self.extra_down[:k])
        return {self.host: layers} if layers else {}

    def encode_segments(self, segments: Tensor, rate: int) -> tuple[Tensor, Tensor]:
        """Eq. 4: posterior (mean, logvar) ``(n, c, 1 + (T-1)/rate, h, w)`` of ``(n, C, T, H, W)``
        segments, skipping the extra down-samplers ``rate`` does not use. No keyframe mark."""
        return split_moments(self.encoder_moments(segments, self._extra(rate, up=False)), self.config.logvar_clamp)

    def decode_segments(self, z: Tensor, rate: int) -> Tensor:
        """Eq. 8: ``(n, c, l, h, w)`` latent segments (no keyframe mark) -> ``(n, C, 1 + rate (l-1), H, W)``."""
        return self.decoder_video(z, self._extra(rate, up=True))

    def _segments(self, latent: Latent) -> list[list[Segment]]:
        """Segments of each sample of a raw (unscaled) varlen latent: from ``aux["rates"]`` when
        present, else from the keyframe predictor."""
        lengths = latent.aux["length"].tolist()
        if "rates" in latent.aux:
            out = [segments_from_rates(r.tolist(), self.config.segment_frames) for r in latent.aux["rates"]]
            for segs, n in zip(out, lengths):
                if sum(s.length for s in segs) != n:
                    raise ValueError(f"aux rates give {sum(s.length for s in segs)} latent frames, length is {n}")
            return out
        probs = torch.sigmoid(self.predictor(latent["z"], latent.aux["length"]))
        return [split_segments(p[:n], self.config.segment_frames, self.config.rates, self.config.keyframe_threshold,
                               self.config.keyframe_confidence) for p, n in zip(probs, lengths)]

    def _embed(self, rate: int, ref: Tensor) -> Tensor:
        """``f_c`` of ``rate`` as ``(1, c, 1, 1, 1)`` in ``ref``'s dtype."""
        return self.keyframe_embed[self.config.rates.index(rate)].to(ref.dtype)[None, :, None, None, None]

    def _keyframe_offsets(self, segments: list[list[Segment]], t: int, ref: Tensor) -> Tensor:
        """``f_c`` of each segment at its first frame, zeros elsewhere: ``(B, c, t, 1, 1)``."""
        index = torch.full((len(segments), t), -1, dtype=torch.long, device=ref.device)
        for b, segs in enumerate(segments):
            for s in segs:
                index[b, s.start] = self.config.rates.index(s.rate)
        emb = self.keyframe_embed.to(ref.dtype)[index.clamp_min(0)] * (index >= 0)[..., None].to(ref.dtype)  # (B, t, c)
        return rearrange(emb, "b t c -> b c t 1 1")

    def mark_keyframes(self, latent: Latent, segments: list[list[Segment]] | None = None,
                       sign: float = 1.0) -> Latent:
        """Eq. 5 on a raw varlen latent: add (``sign=-1``: remove) ``f_c`` at every segment's first frame."""
        segments = self._segments(latent) if segments is None else segments
        z = latent["z"]
        return latent.replace({"z": z + sign * self._keyframe_offsets(segments, z.shape[2], z)})

    # --- rate selection (Sec. 3.2) ------------------------------------------------------------
    @torch.no_grad()
    def quality_vectors(self, segments: Tensor, posteriors: dict[int, tuple[Tensor, Tensor]] | None = None
                        ) -> Tensor:
        """Q of Eq. 1 for ``(n, C, T, H, W)`` segments: ``(n, R)``. PSNR of the reconstruction at
        each rate (posterior mean), or the H.264 model; the random selector has none. The PSNR
        selector leaves each rate's posterior (mean, logvar) of every segment in ``posteriors``."""
        cfg = self.config
        if cfg.selector == "psnr":
            cols = []
            for c in cfg.rates:
                z, logvar = self.encode_segments(segments, c)  # (n, c, l, h, w)
                if posteriors is not None:
                    posteriors[c] = (z, logvar)
                if cfg.stage2_mode == "paper":  # Q of what decode gives: the keyframe marked (Eq. 5)
                    z = torch.cat([z[:, :, :1] + self._embed(c, z), z[:, :, 1:]], 2)
                cols.append(segment_psnr(self.decode_segments(z, c), segments))
            return torch.stack(cols, 1)  # (n, R)
        if cfg.selector == "h264":
            bits = torch.tensor([h264_temporal_bits(s, cfg.h264_crf) for s in segments])
            return h264_quality(bits, cfg.rates, cfg.h264_db_per_bit)
        raise ValueError("the random selector has no quality function")

    @torch.no_grad()
    def choose_rates(self, video: Tensor, generator: torch.Generator | None = None,
                     posteriors: dict[int, tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """The compression algorithm (Alg. 1): rates ``(B, N)`` for the N segments of each clip,
        by Eq. 1-3 over each clip's segments (or ``quality_reference``), or at random.
        ``posteriors``: filled by the PSNR selector (`quality_vectors`), for `_encode_at` to reuse."""
        cfg = self.config
        B, n = video.shape[0], video.shape[2] // cfg.segment_frames
        if cfg.selector == "random":
            g = generator or torch.Generator().manual_seed(cfg.selector_seed)
            idx = torch.randint(len(cfg.rates), (B, n), generator=g, device=g.device).cpu()
            return torch.tensor(cfg.rates)[idx]
        segs = rearrange(video, "b c (n t) h w -> (b n) c t h w", t=cfg.segment_frames)  # (B*N, C, T, H, W)
        q = self.quality_vectors(segs, posteriors).reshape(B, n, len(cfg.rates))
        ref = cfg.quality_reference or None
        return torch.stack([select_rates(q[b], cfg.rates, cfg.rate_weight, ref) for b in range(B)])

    # --- encode / decode --------------------------------------------------------------------------
    def _encode_at(self, video: Tensor, rates: Tensor, mark: bool = True,
                   posteriors: dict[int, tuple[Tensor, Tensor]] | None = None) -> Latent:
        """Every segment encoded at its rate (``posteriors``: each rate's posterior of every segment
        already computed, as the PSNR selector leaves them: taken instead of encoding again)."""
        cfg = self.config
        B, n = video.shape[0], video.shape[2] // cfg.segment_frames
        rates = torch.as_tensor(rates, dtype=torch.long).cpu()
        if rates.shape != (B, n):
            raise ValueError(f"rates must be (B={B}, segments={n}), got {tuple(rates.shape)}")
        bad = set(rates.unique().tolist()) - set(cfg.rates)
        if bad:
            raise ValueError(f"rates {sorted(bad)} are not among {cfg.rates}")
        segs = rearrange(video, "b c (n t) h w -> (b n) c t h w", t=cfg.segment_frames)  # (B*N, C, T, H, W)
        flat = rates.flatten()
        means: list[Tensor | None] = [None] * flat.numel()
        logvars: list[Tensor | None] = [None] * flat.numel()
        for c in flat.unique().tolist():  # every segment of a rate in one batch (in parallel)
            idx = (flat == c).nonzero().flatten().tolist()
            if posteriors and int(c) in posteriors:
                m, lv = (p[idx] for p in posteriors[int(c)])
            else:
                m, lv = self.encode_segments(segs[idx], int(c))
            for k, i in enumerate(idx):
                means[i], logvars[i] = m[k], lv[k]
        items = []
        for b in range(B):
            z = torch.cat(means[b * n:(b + 1) * n], 1)[None]  # (1, c, t_b, h, w)
            lv = torch.cat(logvars[b * n:(b + 1) * n], 1)[None]
            keys = torch.cat([torch.arange(self.segment_length(int(c))) == 0 for c in rates[b]])
            items.append(Latent({"z": z}, "varlen", {"z": lv}, {
                "length": torch.tensor([z.shape[2]]), "keyframe": keys[None], "rates": rates[b:b + 1].clone()}))
        latent = Latent.collate(items)
        latent = latent.replace(aux={k: v.to(video.device) for k, v in latent.aux.items()})
        return self.mark_keyframes(latent) if mark else latent

    def _encode(self, video: Tensor, cond: Cond | None) -> Latent:
        # the PSNR selector encodes every segment at every rate: without gradients, the chosen rates'
        # posteriors are taken from there (one encoder pass less of the 2R + 1 it runs for R rates)
        posteriors: dict[int, tuple[Tensor, Tensor]] | None = None if torch.is_grad_enabled() else {}
        return self._encode_at(video, self.choose_rates(video, posteriors=posteriors), posteriors=posteriors)

    def encode_work(self, video: Tensor, cond: Cond | None = None) -> Any:
        """For ``ldm cost``: the PSNR selector encodes and decodes every segment at each rate, and
        ``encode`` takes the chosen rates' posteriors from there (the choice and the keyframe marks add
        no matmul or convolution). Another selector's encode follows its choice: every segment at
        the base rate here (the longest latent), as `example_latent` does for decode."""
        if self.config.selector == "psnr":
            segs = rearrange(video, "b c (n t) h w -> (b n) c t h w", t=self.config.segment_frames)
            return self.quality_vectors(segs)
        B, n = video.shape[0], video.shape[2] // self.config.segment_frames
        return self.encode_at(video, torch.full((B, n), self.config.rates[0]), cond)

    def encode_at(self, video: Tensor, rates: Tensor, cond: Cond | None = None) -> Latent:
        """``encode`` with given segment rates ``(B, N)`` instead of the selector's."""
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects B {self.config.in_channels} T H W video, got {tuple(video.shape)}")
        self.check_input(*video.shape[2:])
        return self._scale(self._encode_at(video, rates), forward=True)

    def _decode_videos(self, latent: Latent) -> list[Tensor]:
        cfg = self.config
        if latent.form != "varlen" or "z" not in latent.parts:
            raise ValueError(f"{self.family}: decode expects a varlen latent with part 'z', got form "
                             f"{latent.form!r} with parts {sorted(latent.parts)}")
        z = latent["z"]
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"{self.family}: expected z of shape B {cfg.latent_channels} t h w, got {tuple(z.shape)}")
        segments = self._segments(latent)
        if cfg.stage2_mode == "decoder":  # the old mode: the decoder never sees f_c
            z = z - self._keyframe_offsets(segments, z.shape[2], z)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for b, segs in enumerate(segments):
            for k, s in enumerate(segs):
                groups.setdefault((s.rate, s.length), []).append((b, k))
        pieces: dict[tuple[int, int], Tensor] = {}
        for (rate, length), members in groups.items():  # equal (rate, length): one decoder call
            batch = torch.stack([z[b, :, segments[b][k].start:segments[b][k].start + length] for b, k in members])
            for (b, k), video in zip(members, self.decode_segments(batch, rate)):
                pieces[b, k] = video
        return [torch.cat([pieces[b, k] for k in range(len(segs))], 1) for b, segs in enumerate(segments)]

    def _decode(self, latent: Latent, cond: Cond | None) -> Tensor:
        videos = self._decode_videos(latent)
        frames = max(v.shape[1] for v in videos)
        # samples of different frame counts (predicted segments) are padded by holding the last
        # frame; decode_videos gives each at its own length
        return torch.stack([torch.cat([v, v[:, -1:].expand(-1, frames - v.shape[1], -1, -1)], 1) for v in videos])

    def decode_videos(self, latent: Latent, cond: Cond | None = None) -> list[Tensor]:
        """Decode each sample to its own frame count: a list of ``(C, T_b, H, W)``."""
        return self._decode_videos(self._scale(latent, forward=False))

    def split(self, latent: Latent) -> list[list[Segment]]:
        """The segments ``decode`` uses for an encoded (scaled) varlen latent: the stored rates, or
        the keyframe predictor's split when ``aux`` has no ``rates`` (a generated latent)."""
        return self._segments(self._scale(latent, forward=False))

    def keyframe_probs(self, latent: Latent) -> Tensor:
        """P's keyframe probabilities ``(B, t_max)`` for an encoded (scaled) varlen latent."""
        raw = self._scale(latent, forward=False)
        return torch.sigmoid(self.predictor(raw["z"], raw.aux["length"]))

    def rate_report(self, latent: Latent) -> list[dict[str, Any]]:
        """What Tab. 1 / Tab. 3-4 report beside PSNR, per sample of an encoded (scaled) varlen latent:
        ``rates`` of its segments, ``vcpr`` (the mean of the segments' ``c * f * f``, the convention
        of ``latent_spec``; Sec. 4.1's T/t * H/h * W/w per segment) and ``keyframe_accuracy`` (Sec.
        4.1's Acc.: latent frames whose keyframe call by P at ``keyframe_threshold`` is right / all
        latent frames, frame 0 a keyframe by definition), the last one only when ``aux`` holds the
        true keyframes (an encoded latent)."""
        f = self.spatial_factor
        probs = self.keyframe_probs(latent) if "keyframe" in latent.aux else None
        out = []
        for b, segs in enumerate(self.split(latent)):
            rates = [s.rate for s in segs]
            item: dict[str, Any] = {"rates": rates, "vcpr": sum(c * f * f for c in rates) / len(rates)}
            if probs is not None:
                n = int(latent.aux["length"][b])
                item["keyframe_accuracy"] = keyframe_accuracy(probs[b, :n], latent.aux["keyframe"][b, :n],
                                                              self.config.keyframe_threshold)
            out.append(item)
        return out

    def _scale(self, latent: Latent, forward: bool) -> Latent:
        out = super()._scale(latent, forward)
        if out is latent or latent.form != "varlen":
            return out
        valid = out.padding_mask()[:, None, :, None, None]  # padded frames stay exactly zero
        return out.replace({k: v * valid for k, v in out.parts.items()},
                           logvar={k: v * valid for k, v in out.logvar.items()})

    # --- training (Sec. 3.5, Alg. 1) ---------------------------------------------------------------
    def keyframe_bce(self, marked: Latent) -> Tensor:
        """Eq. 9: BCE of P on the valid frames of a raw, keyframe-marked varlen latent against
        ``aux["keyframe"]``."""
        logits = self.predictor(marked["z"], marked.aux["length"])
        valid = marked.padding_mask()
        return F.binary_cross_entropy_with_logits(logits[valid], marked.aux["keyframe"][valid].to(logits.dtype))

    def training_rates(self) -> str:
        """Where ``train_forward`` takes segment rates from: ``"random"`` or ``"selector"``
        (``train_rates="auto"``: the selector's in stage 2 as Alg. 1, random otherwise)."""
        cfg = self.config
        if cfg.train_rates != "auto":
            return cfg.train_rates
        return "selector" if cfg.stage == 2 and cfg.stage2_mode == "paper" else "random"

    def train_forward(self, video: Tensor, cond: Cond | None = None,
                      generator: torch.Generator | None = None) -> AEOutput:
        """One training forward per ``config.stage`` (Alg. 1): encode every segment at its rate
        (``training_rates``: random -- in stage 1 among the new rates only -- or the selector's),
        sample the posterior, mark keyframes (Eq. 5), decode with the true rates what ``decode``
        reads at inference (the marked latent; ``stage2_mode="decoder"``: f_c taken off). Stages 0
        and 2 add ``bce`` (Eq. 9) and ``flow`` (Eq. 10) to the trainer's reconstruction + KL; in
        stage 2 with the decoder frozen, ``flow`` and the reconstruction reach only ``f_c``."""
        cfg = self.config
        self.check_input(*video.shape[2:])
        if cfg.stage == 2:
            self._update_ema()
        if self.training_rates() == "random":
            # stage 1 fine-tunes at the new rates only (Sec. 3.5: "at compression rates of 8x8x8 and 16x8x8")
            choices = cfg.rates[1:] if cfg.stage == 1 else cfg.rates
            g = generator or torch.Generator().manual_seed(cfg.selector_seed)
            n = video.shape[2] // cfg.segment_frames
            idx = torch.randint(len(choices), (video.shape[0], n), generator=g, device=g.device).cpu()
            rates = torch.tensor(choices)[idx]
        else:
            rates = self.choose_rates(video, generator)
        posterior = self._encode_at(video, rates, mark=False)
        marked = self.mark_keyframes(posterior.sample(generator))
        losses: dict[str, Tensor] = {}
        if cfg.stage in (0, 2) and cfg.bce_weight > 0:
            losses["bce"] = cfg.bce_weight * self.keyframe_bce(marked)
        recon = torch.stack(self._decode_videos(marked))  # (B, C, T, H, W): true rates give every frame
        if cfg.stage in (0, 2) and cfg.flow_weight > 0:
            quality, motion = flow_guided_loss(recon, video, cfg.flow_levels, cfg.flow_iters, cfg.flow_smoothness)
            losses["flow"] = cfg.flow_weight * (quality + motion)
        return AEOutput(recon=recon, posterior=posterior, losses=losses)


def _ema_key(name: str) -> str:
    return "ema__" + name.replace(".", "__")


# ------------------------------------------------------------------------------------------
# Conversion: a trained causal3d -> MTC stage 1 -> MTC stage 2
# ------------------------------------------------------------------------------------------
def convert(model: Causal3D, **overrides: Any) -> MTCVAE:
    """A multi-level MTC-VAE from a fixed-rate ``causal3d`` model (weights copied, the extra
    sampling layers initialised from its deepest temporal resampler), or an MTC-VAE with new
    config fields (e.g. ``stage=2``; weights kept, the EMA restarted). ``overrides`` are
    ``MTCVAEConfig`` fields (default for a causal3d: stage 1)."""
    if isinstance(model, MTCVAE):
        config = cfglib.replace(model.config, **overrides)
    elif isinstance(model, Causal3D):
        base = {f.name: getattr(model.config, f.name) for f in fields(Causal3DConfig)}
        config = cfglib.replace(MTCVAEConfig(**base, stage=1), **overrides)
    else:
        raise TypeError(f"convert takes a causal3d or mtcvae model, got {type(model).__name__}")
    new = MTCVAE(config).to(next(model.parameters()).device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("ema_")]
    allowed = ("extra_down.", "extra_up.", "keyframe_embed", "predictor.", "ema_")
    if unexpected or any(not k.startswith(allowed) for k in missing):
        raise ValueError(f"cannot convert: unexpected weights {unexpected[:5]}, missing {missing[:5]}")
    if not isinstance(model, MTCVAE):
        new.init_sampling_layers()
    new.reset_ema()
    return new


@register_initialiser("mtcvae", "causal3d")
def from_causal3d(base: Causal3D, target: str) -> tuple[MTCVAE, str]:
    """``ldm convert --target mtcvae[-NAME]`` from a converted causal3d (e.g. CogVideoX's VAE): a
    stage-1 MTC-VAE on it (`convert`; a registered target gives its settings but stage 1, as
    ``--base-checkpoint``: stage 0 trains from nothing); it must have the base's architecture."""
    overrides: dict[str, Any] = {}
    if target != "mtcvae":
        registered = REGISTRY[target][1]
        base_fields = [f.name for f in fields(Causal3DConfig) if f.name not in ("latent_scale", "latent_shift")]
        diff = {k: (getattr(registered, k), getattr(base.config, k)) for k in base_fields
                if getattr(registered, k) != getattr(base.config, k)}
        if diff:
            raise ValueError(f"{target} is not built on this base: {diff} (field: (registered, base)); "
                             "use --target mtcvae to keep the base's configuration")
        overrides = {f.name: getattr(registered, f.name) for f in fields(MTCVAEConfig)
                     if f.name not in base_fields + ["latent_scale", "latent_shift", "stage"]}
    model = convert(base, **overrides)
    return model, f"mtcvae stage {model.config.stage} on the converted causal3d: its 4x path is the base model"


# The paper's two models: MTC-VAE(ch=4) (base OD-VAE) and MTC-VAE(ch=16) (base CogVideoX's VAE),
# here on our causal3d bases of the same latent widths; debug twins on the causal3d debug widths.
register("mtcvae-c4", MTCVAE, MTCVAEConfig(latent_channels=4, **_FULL))
register("mtcvae-c16", MTCVAE, MTCVAEConfig(latent_channels=16, **_FULL))
register("mtcvae-c4-debug", MTCVAE, MTCVAEConfig(latent_channels=4, **_DEBUG))
register("mtcvae-c16-debug", MTCVAE, MTCVAEConfig(latent_channels=16, **_DEBUG))
# MTC-VAE(ch=16) on CogVideoX's VAE itself (ldm convert --source diffusers:AutoencoderKLCogVideoX
# --target mtcvae-c16-cogvideox): the base's chunked clip statistics and averaging resamplers
for _suffix in ("", "-debug"):
    _base = REGISTRY[f"causal3d-cogvideox{_suffix}"][1]
    register(f"mtcvae-c16-cogvideox{_suffix}", MTCVAE,
             MTCVAEConfig(**{f.name: getattr(_base, f.name) for f in fields(Causal3DConfig)}, stage=1))
