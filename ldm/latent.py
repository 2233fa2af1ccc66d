"""The latent contract's data types: `Latent`, `LatentSpec` and `Cond`.

Every autoencoder returns a `Latent` and every denoiser reads one, so the three latent forms of
the platform fit in one type (see ARCHITECTURE.md):

| form       | parts (batched)                                                   | aux                        |
|------------|-------------------------------------------------------------------|----------------------------|
| "grid"     | ``z: B c t h w``                                                  | -                          |
| "tokens"   | ``content: B c 1 h w``, ``global: B f_g n_g c_g``, ``detailed: ..`` | -                          |
| "varlen"   | ``z: B c t_max h w`` padded along t                               | ``length: B``, ``keyframe: B t_max``, ``rates: B S`` |

A `Latent` is a mapping from part name to tensor. ``logvar`` holds the posterior log-variance of the
parts that have one (the parts themselves are the posterior mean), so shards can store the
posterior and the trainer can sample from it. ``aux`` holds per-sample side information that is not
denoised (valid lengths, segment rates, keyframe marks).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

FORMS = ("grid", "tokens", "varlen")
VARLEN_AXIS = 2  # the padded time axis of a batched varlen part: B c t h w


@dataclass
class Latent(Mapping):
    parts: dict[str, Tensor]
    form: str = "grid"
    logvar: dict[str, Tensor] = field(default_factory=dict)
    aux: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"unknown latent form {self.form!r}; expected one of {FORMS}")
        if not self.parts:
            raise ValueError("a Latent needs at least one part")
        unknown = set(self.logvar) - set(self.parts)
        if unknown:
            raise ValueError(f"logvar given for parts that do not exist: {sorted(unknown)}")
        if self.form == "varlen" and "length" not in self.aux:
            raise ValueError("a varlen Latent needs aux['length'] (valid frames per sample)")

    # --- mapping over parts --------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self.parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def batch_size(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-part shapes without the batch axis."""
        return {k: tuple(v.shape[1:]) for k, v in self.parts.items()}

    def replace(self, parts: dict[str, Tensor] | None = None, **kw) -> "Latent":
        return Latent(parts=dict(self.parts if parts is None else parts),
                      form=kw.get("form", self.form),
                      logvar=dict(kw.get("logvar", self.logvar)),
                      aux=dict(kw.get("aux", self.aux)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "Latent":
        """Move every tensor to ``device``; cast floating parts/logvar (not aux) to ``dtype``."""
        def move(d: dict[str, Tensor], cast: bool) -> dict[str, Tensor]:
            return {k: v.to(device=device, dtype=dtype if cast and v.is_floating_point() else None,
                            non_blocking=non_blocking) for k, v in d.items()}
        return Latent(move(self.parts, True), self.form, move(self.logvar, True), move(self.aux, False))

    def pin_memory(self) -> "Latent":
        """Page-locked copies of every tensor (CPU), so host-to-GPU copies can run asynchronously
        (``to(device, non_blocking=True)``); ``DataLoader(pin_memory=True)`` calls this too."""
        pin = lambda d: {k: v.pin_memory() for k, v in d.items()}  # noqa: E731
        return Latent(pin(self.parts), self.form, pin(self.logvar), pin(self.aux))

    def sample(self, generator: torch.Generator | None = None) -> "Latent":
        """Draw z ~ N(mean, exp(logvar)) for the parts that carry a posterior."""
        parts = {}
        for k, mean in self.parts.items():
            if k in self.logvar:
                eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                parts[k] = mean + torch.exp(0.5 * self.logvar[k]) * eps
            else:
                parts[k] = mean
        return Latent(parts, self.form, {}, dict(self.aux))

    # --- batching ------------------------------------------------------------------------
    def unbatch(self) -> list["Latent"]:
        """Split into per-sample latents (batch axis kept as size 1); varlen parts are trimmed."""
        out = []
        for i in range(self.batch_size):
            sl = lambda d: {k: v[i:i + 1] for k, v in d.items()}  # noqa: E731
            parts, logvar, aux = sl(self.parts), sl(self.logvar), sl(self.aux)
            if self.form == "varlen":
                n = int(self.aux["length"][i])
                parts = {k: v.narrow(VARLEN_AXIS, 0, n) for k, v in parts.items()}
                logvar = {k: v.narrow(VARLEN_AXIS, 0, n) for k, v in logvar.items()}
                if "keyframe" in aux:
                    aux["keyframe"] = aux["keyframe"][:, :n]
            out.append(Latent(parts, self.form, logvar, aux))
        return out

    @staticmethod
    def collate(items: list["Latent"]) -> "Latent":
        """Stack per-sample latents (each with batch 1) into one batch; varlen parts are padded
        with zeros along t and ``aux['length']`` records the valid frames."""
        if not items:
            raise ValueError("cannot collate an empty list of latents")
        form = items[0].form
        if any(x.form != form or set(x.parts) != set(items[0].parts) for x in items):
            raise ValueError("cannot collate latents of different forms or parts")
        if form != "varlen":
            cat = lambda key: {k: torch.cat([getattr(x, key)[k] for x in items]) for k in getattr(items[0], key)}  # noqa: E731
            return Latent(cat("parts"), form, cat("logvar"), cat("aux"))
        t_max = max(next(iter(x.parts.values())).shape[VARLEN_AXIS] for x in items)

        def pad_t(v: Tensor, axis: int) -> Tensor:
            n = v.shape[axis]
            if n == t_max:
                return v
            shape = list(v.shape)
            shape[axis] = t_max - n
            return torch.cat([v, v.new_zeros(shape)], dim=axis)

        parts = {k: torch.cat([pad_t(x.parts[k], VARLEN_AXIS) for x in items]) for k in items[0].parts}
        logvar = {k: torch.cat([pad_t(x.logvar[k], VARLEN_AXIS) for x in items]) for k in items[0].logvar}
        aux = {}
        for k in items[0].aux:
            vals = [x.aux[k] for x in items]
            if k == "keyframe":
                vals = [pad_t(v, 1) for v in vals]
            elif len({tuple(v.shape) for v in vals}) > 1:  # ragged side info, e.g. segment rates
                width = max(v.shape[1] for v in vals)
                vals = [torch.cat([v, v.new_zeros(v.shape[0], width - v.shape[1])], 1) for v in vals]
            aux[k] = torch.cat(vals)
        return Latent(parts, form, logvar, aux)

    def padding_mask(self) -> Tensor | None:
        """``B t_max`` bool, True where a varlen frame is valid; None for fixed forms."""
        if self.form != "varlen":
            return None
        t_max = next(iter(self.parts.values())).shape[VARLEN_AXIS]
        return torch.arange(t_max, device=self.aux["length"].device)[None] < self.aux["length"][:, None]


def channel_dim(x: Tensor, batched: bool = True) -> int:
    """Channel axis of a latent part: grid ``(B) c t h w`` -> the c axis; token set ``(B) f n c`` -> last."""
    grid_ndim = 5 if batched else 4
    return (1 if batched else 0) if x.ndim == grid_ndim else x.ndim - 1


def normalize(latent: Latent, stats: dict[str, dict[str, list[float]]], inverse: bool = False) -> Latent:
    """Per-channel standardisation ``(z - mean) / std`` of every part with statistics (as an
    extraction manifest records them: ``{part: {"mean": [...], "std": [...]}}``); ``inverse``
    undoes it. Parts without statistics pass unchanged; log-variances are shifted accordingly."""
    parts, logvar = dict(latent.parts), dict(latent.logvar)
    for name, st in stats.items():
        if name not in parts:
            continue
        x = parts[name]
        cdim = channel_dim(x)
        shape = [1] * x.ndim
        shape[cdim] = x.shape[cdim]
        mean = torch.tensor(st["mean"], dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(st["std"], dtype=x.dtype, device=x.device).clamp_min(1e-6).view(shape)
        parts[name] = x * std + mean if inverse else (x - mean) / std
        if name in logvar:
            logvar[name] = logvar[name] + (2 if inverse else -2) * torch.log(std)
    return latent.replace(parts, logvar=logvar)


def parts_text(parts: Mapping[str, Sequence[int]] | None) -> str:
    """Per-part shapes as people read them: ``z:4x5x32x32`` (Hi-VAE: ``content:4x1x32x32,
    global:9x8x8, ...``); ``-`` for none."""
    if not parts:
        return "-"
    return ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in parts.items())


def part_tokens(shape: tuple[int, ...], patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens one latent part makes for a DiT (the platform's one token count): a grid part
    ``c t h w`` is patchified with ``patch = (pt, ph, pw)``, ceil per axis as the DiT pads; a
    token-set part ``f n c`` passes through as ``f * n`` tokens."""
    if len(shape) == 4:
        return math.prod(math.ceil(n / p) for n, p in zip(shape[1:], patch))
    if len(shape) == 3:
        return shape[0] * shape[1]
    raise ValueError(f"part shape {shape} is neither a grid (c t h w) nor a token set (f n c)")


@dataclass(frozen=True)
class LatentSpec:
    """Shape arithmetic of one autoencoder at one input size (no weights involved).

    ``parts`` maps a part name to its per-sample shape (no batch axis). Grid parts are ``c t h w``,
    token-set parts are ``f n c``. ``compression_rate`` follows Hi-VAE Appendix C.1: latent elements
    used downstream divided by input elements; ``compression_factor`` is its inverse.
    """

    form: str
    parts: dict[str, tuple[int, ...]]
    input_shape: tuple[int, int, int, int]  # C T H W
    vcpr: float | None = None  # T/t * H/h * W/w where a single grid applies

    @property
    def latent_elements(self) -> int:
        return sum(math.prod(s) for s in self.parts.values())

    @property
    def input_elements(self) -> int:
        return math.prod(self.input_shape)

    @property
    def compression_rate(self) -> float:
        return self.latent_elements / self.input_elements

    @property
    def compression_factor(self) -> float:
        return self.input_elements / self.latent_elements

    def tokens(self, patch: tuple[int, int, int] = (1, 2, 2),
               part_patch: Mapping[str, tuple[int, int, int]] | None = None) -> int:
        """Tokens a DiT with grid patching ``patch`` (``part_patch`` per part) sees (`part_tokens`)."""
        part_patch = part_patch or {}
        return sum(part_tokens(shape, part_patch.get(name, patch)) for name, shape in self.parts.items())

    def mismatch(self, latent: Latent) -> str | None:
        """What in a batched ``latent`` disagrees with this spec (form, part names, per-sample part
        and log-variance shapes; a varlen part may be shorter along its time axis), None if nothing."""
        if latent.form != self.form or set(latent.parts) != set(self.parts):
            return (f"form {latent.form!r} with parts {sorted(latent.parts)}, declared {self.form!r} with "
                    f"{sorted(self.parts)}")
        for name, want in self.parts.items():
            for what, t in (("part", latent.parts[name]), ("logvar of", latent.logvar.get(name))):
                got = None if t is None else tuple(t.shape[1:])
                if got is None or got == tuple(want):
                    continue
                t_axis = VARLEN_AXIS - 1  # per-sample time axis of a varlen part
                shorter = (self.form == "varlen" and len(got) == len(want) > t_axis and got[t_axis] <= want[t_axis]
                           and got[:t_axis] + got[t_axis + 1:] == tuple(want[:t_axis]) + tuple(want[t_axis + 1:]))
                if not shorter:
                    return f"{what} {name!r} has shape {got}, declared {tuple(want)}"
        return None

    def to_dict(self, patch: tuple[int, int, int] = (1, 2, 2)) -> dict:
        return {"form": self.form, "latent_shape": {k: list(v) for k, v in self.parts.items()},
                "input_shape": list(self.input_shape), "latent_elements": self.latent_elements,
                "compression_rate": self.compression_rate, "compression_factor": self.compression_factor,
                "vcpr": self.vcpr, "tokens": self.tokens(patch)}


@dataclass
class Cond:
    """What an encoder/decoder may be conditioned on.

    text: ``B L D`` embeddings with ``text_mask: B L`` (True = real token); first_frame: ``B C 1 H W``
    pixels or features of the first frame (H3AE omni objective, Hi-VAE content frame, I2V).
    """

    text: Tensor | None = None
    text_mask: Tensor | None = None
    first_frame: Tensor | None = None
    class_id: Tensor | None = None
