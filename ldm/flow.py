"""Rectified flow / flow matching: the path, the target, timestep sampling and the loss.

Math only, no networks (STYLE.md 5). Convention used everywhere in this platform:

    x_t = (1 - t) * x_0 + t * eps,   t in [0, 1],  t = 0 is data, t = 1 is pure noise      (1)
    v   = d x_t / d t = eps - x_0                                                           (2)

(Liu et al. 2022, "Flow straight and fast", Eq. 1; Lipman et al. 2022; SD3, Esser et al. 2024,
Sec. 2 with the same direction of t). A denoiser predicts ``v``; sampling integrates (2) from
t = 1 to t = 0 (see ``ldm.samplers``). Hi-VAE writes the velocity the other way round
(``z - eps``, time running from noise to data); the two differ only in the sign of t.

Every function works on a mapping of named tensors (one per latent part), so multi-part latents
(Hi-VAE's content + global + detailed) are noised with the SAME t per sample across parts, and
the loss is one mean over all elements of all parts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching ``like``'s rank."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape (B,) with B={like.shape[0]}, got {tuple(t.shape)}")
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _check_same_parts(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str) -> None:
    if set(a) != set(b):
        raise ValueError(f"{what}: parts differ ({sorted(a)} vs {sorted(b)})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{what}: part {k!r} has shapes {tuple(a[k].shape)} vs {tuple(b[k].shape)}")


def sample_noise(like: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Standard normal noise with the shape, dtype and device of each part of ``like``."""
    return {k: torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype) for k, v in like.items()}


def interpolate(x0: Mapping[str, Tensor], noise: Mapping[str, Tensor], t: Tensor) -> dict[str, Tensor]:
    """The linear path, Eq. (1): ``x_t = (1 - t) x_0 + t eps`` with one ``t`` (B,) per sample."""
    _check_same_parts(x0, noise, "interpolate")
    return {k: (1 - _bcast(t, x)) * x + _bcast(t, x) * noise[k] for k, x in x0.items()}


def velocity_target(x0: Mapping[str, Tensor], noise: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The regression target, Eq. (2): ``v = eps - x_0``."""
    _check_same_parts(x0, noise, "velocity_target")
    return {k: noise[k] - x for k, x in x0.items()}


def predict_x0(x_t: Mapping[str, Tensor], v: Mapping[str, Tensor], t: Tensor) -> dict[str, Tensor]:
    """The clean estimate implied by a velocity: ``x_0 = x_t - t v`` (from Eqs. 1-2)."""
    _check_same_parts(x_t, v, "predict_x0")
    return {k: x - _bcast(t, x) * v[k] for k, x in x_t.items()}


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Resolution/length shift of SD3 (Esser et al. 2024, "resolution-dependent shifting of
    timestep schedules"):
    ``t' = s t / (1 + (s - 1) t)`` (their Eq. 23 with ``s = sqrt(m / n)``). ``s > 1`` moves mass
    towards noise (t -> 1), as larger latents need; ``s = 1`` is the identity. Maps [0, 1] onto itself
    monotonically; computed as the equal ``t / (t + (1 - t) / s)``, which gives exactly 0 and 1 at
    the ends and never more than 1 in floating point (the first form gives 1.0000001 for some s)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return t / (t + (1 - t) / shift)


def shift_for_tokens(tokens: int, base_tokens: int) -> float:
    """SD3's shift for a sequence of ``tokens`` relative to a reference of ``base_tokens``:
    ``s = sqrt(tokens / base_tokens)`` (the ratio of resolutions m/n under the square root)."""
    if tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be positive, got {tokens} and {base_tokens}")
    return math.sqrt(tokens / base_tokens)


def sample_timesteps(n: int, *, distribution: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                     shift: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Draw ``n`` training timesteps in (0, 1).

    - ``"uniform"``: t ~ U(0, 1).
    - ``"logit_normal"``: t = sigmoid(u), u ~ N(loc, scale) (SD3, Esser et al. 2024, "logit-normal sampling").
    Then the resolution/length ``shift`` is applied (``shift_timesteps``).
    """
    if distribution == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif distribution == "logit_normal":
        if scale <= 0:
            raise ValueError(f"logit_normal scale must be positive, got {scale}")
        t = torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown timestep distribution {distribution!r}; expected one of {TIMESTEP_DISTRIBUTIONS}")
    return shift_timesteps(t, shift)


def expand_mask(mask: Tensor, like: Tensor, axis: int) -> Tensor:
    """Lift a ``(B, n)`` per-frame/per-token mask onto ``like`` whose axis ``axis`` has length n,
    e.g. a varlen padding mask ``(B, t)`` onto a part ``B c t h w`` with ``axis=2``."""
    if mask.ndim != 2 or mask.shape[0] != like.shape[0] or mask.shape[1] != like.shape[axis]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match axis {axis} of {tuple(like.shape)}")
    shape = [1] * like.ndim
    shape[0], shape[axis] = mask.shape
    return mask.view(shape)


def flow_loss(pred: Mapping[str, Tensor], target: Mapping[str, Tensor],
              mask: Mapping[str, Tensor] | None = None) -> Tensor:
    """Per-sample flow-matching loss ``|| v_pred - v ||^2`` averaged over every non-batch element
    of every part (conditional flow matching, Lipman et al. 2022, Eq. 9). Returns ``(B,)``.

    ``mask`` (optional) maps part names to bool tensors broadcastable to the part (True = counts),
    e.g. ``expand_mask(latent.padding_mask(), z, 2)`` for varlen latents; padded elements are
    excluded from both the sum and the count. Parts missing from ``mask`` count fully.
    """
    _check_same_parts(pred, target, "flow_loss")
    mask = dict(mask or {})
    unknown = set(mask) - set(pred)
    if unknown:
        raise ValueError(f"flow_loss: mask given for unknown parts {sorted(unknown)}")
    total = count = None
    for k, p in pred.items():
        err = (p.float() - target[k].float()) ** 2
        if k in mask:
            m = mask[k].to(torch.bool).expand_as(err)
            err = err * m
            n = m.flatten(1).sum(1).to(err.dtype)  # (B,)
        else:
            n = torch.full((err.shape[0],), err[0].numel(), dtype=err.dtype, device=err.device)
        s = err.flatten(1).sum(1)  # (B,)
        total = s if total is None else total + s
        count = n if count is None else count + n
    if total is None:
        raise ValueError("flow_loss needs at least one part")
    return total / count.clamp(min=1)
