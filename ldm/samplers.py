"""Stateless ODE samplers for rectified-flow models (STYLE.md 5).

The model is any callable ``model(x, t, cond) -> {part: velocity}`` where ``x`` maps part names
to ``(B, ...)`` tensors (a plain dict or an ``ldm.latent.Latent``, whose ``aux`` — e.g. varlen
lengths — is carried along unchanged), ``t`` is ``(B,)`` in [0, 1] and the velocity follows the
convention of ``ldm.flow``: ``dx/dt = v = eps - x_0`` with t = 1 noise and t = 0 data. Sampling
integrates from t = 1 down to t = 0 over a schedule ``1 = t_0 > t_1 > ... > t_N = 0``.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6, written for velocities and with the common
scale ``w = 1 + w_paper``): ``v = v_u + w (v_c - v_u)``, with the conditional and the
null-conditional calls batched together into one model call; ``w = 1`` is the plain conditional model.
With a guidance interval ``(lo, hi)`` (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval improves sample and distribution quality in diffusion models") guidance acts only at the
steps with ``lo < t <= hi``; the others are plain conditional calls (one model pass).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.flow import shift_timesteps
from ldm.latent import Cond, Latent

VelocityModel = Callable[[Mapping[str, Tensor], Tensor, Any], Mapping[str, Tensor]]
# callback(step, steps, t_next, x): called after every step with the state reached at t_next.
StepCallback = Callable[[int, int, float, Mapping[str, Tensor]], None]


def timestep_schedule(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """``steps + 1`` times from 1 to 0, uniform in t then shifted by ``shift_timesteps`` (SD3's
    resolution shift; ``shift > 1`` spends more steps near noise). Float64 ``i / steps``, so an
    unshifted time is the number a user writes (0.8, not float32's 0.8000000119) and a guidance
    interval's ``lo < t <= hi`` holds at its ends as written."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    uniform = torch.arange(steps, -1, -1, dtype=torch.float64, device=device) / steps
    return shift_timesteps(uniform, shift)


def initial_noise(shapes: Mapping[str, tuple[int, ...]], batch: int, *, seed: int | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Standard normal ``(batch, *shape)`` per part, reproducible from ``seed`` (a CPU generator is
    used so the same seed gives the same noise on every device) or from a given ``generator``."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    gen_device = generator.device if generator is not None else device
    return {k: torch.randn((batch, *shape), generator=generator, device=gen_device, dtype=dtype).to(device)
            for k, shape in shapes.items()}


def noise_per_seed(shapes: Mapping[str, tuple[int, ...]], seeds: Sequence[int], *,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Standard normal noise for one sample per seed, ``(len(seeds), *shape)`` per part: row i is
    ``initial_noise(shapes, 1, seed=seeds[i])`` (its own CPU generator), so a sample's noise depends on
    its seed alone, not on the batch it is drawn in, its row there or the device (the per-sample
    generators of diffusers pipelines)."""
    rows = [initial_noise(shapes, 1, seed=s, dtype=dtype) for s in seeds]
    return {k: torch.cat([r[k] for r in rows]).to(device) for k in shapes}


# ------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------
def _pad_tokens(x: Tensor, length: int) -> Tensor:
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], 1)


def concat_cond(a: Any, b: Any) -> Any:
    """Stack two conditions along the batch axis: ``None``, tensors, mappings of tensors, or
    ``Cond`` (text of different lengths is right-padded, with ``text_mask`` False on the padding)."""
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("cannot batch a condition with None; give the null condition explicitly")
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, Cond):
        fields = {}
        for f in dataclasses.fields(Cond):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if (x is None) != (y is None) and f.name != "text_mask":  # no mask = all visible
                raise ValueError(f"Cond.{f.name} is set in one condition and not in the other")
            fields[f.name] = x
        if a.text is not None:
            L = max(a.text.shape[1], b.text.shape[1])
            masks = [c.text_mask if c.text_mask is not None else
                     torch.ones(c.text.shape[:2], dtype=torch.bool, device=c.text.device) for c in (a, b)]
            fields["text"] = torch.cat([_pad_tokens(a.text, L), _pad_tokens(b.text, L)])
            fields["text_mask"] = torch.cat([_pad_tokens(m, L) for m in masks])
        for name in ("first_frame", "class_id"):
            if fields[name] is not None:
                fields[name] = torch.cat([getattr(a, name), getattr(b, name)])
        return Cond(**fields)
    if isinstance(a, Mapping):
        if set(a) != set(b):
            raise ValueError(f"conditions have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: concat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")


def _with_parts(x: Mapping[str, Tensor], parts: dict[str, Tensor]) -> Mapping[str, Tensor]:
    return x.replace(parts) if isinstance(x, Latent) else parts


def _twice(x: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    parts = {k: torch.cat([v, v]) for k, v in x.items()}
    if isinstance(x, Latent):
        return Latent(parts, x.form, {}, {k: torch.cat([v, v]) for k, v in x.aux.items()})
    return parts


def guided_velocity(model: VelocityModel, x: Mapping[str, Tensor], t: Tensor, cond: Any, null_cond: Any,
                    scale: float) -> dict[str, Tensor]:
    """CFG velocity ``v_u + scale (v_c - v_u)`` from ONE model call on the batch [cond; null_cond]."""
    B = t.shape[0]
    v = model(_twice(x), torch.cat([t, t]), concat_cond(cond, null_cond))
    return {k: u[B:] + scale * (u[:B] - u[B:]) for k, u in v.items()}


def _velocity_fn(model: VelocityModel, cond: Any, null_cond: Any, guidance_scale: float,
                 interval: tuple[float, float] = (0.0, 1.0)):
    if guidance_scale != 1.0 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a null_cond")

    def velocity(x: Mapping[str, Tensor], t: float) -> dict[str, Tensor]:
        tt = torch.full((next(iter(x.values())).shape[0],), t, device=next(iter(x.values())).device)
        if guidance_scale == 1.0 or not interval[0] < t <= interval[1]:
            v = dict(model(x, tt, cond))
        else:
            v = guided_velocity(model, x, tt, cond, null_cond, guidance_scale)
        if set(v) != set(x):
            raise ValueError(f"model returned parts {sorted(v)} for input parts {sorted(x)}")
        return v

    return velocity


# ------------------------------------------------------------------------------------------
# ODE solvers
# ------------------------------------------------------------------------------------------
def _schedule(steps: int, shift: float, schedule: Tensor | None) -> list[float]:
    if schedule is None:
        schedule = timestep_schedule(steps, shift)
    ts = [float(s) for s in schedule]
    if len(ts) < 2 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError("a timestep schedule must be strictly decreasing with at least two entries")
    return ts


def euler(model: VelocityModel, x: Mapping[str, Tensor], cond: Any = None, *, steps: int = 20,
          shift: float = 1.0, guidance_scale: float = 1.0, null_cond: Any = None,
          schedule: Tensor | None = None, callback: StepCallback | None = None,
          guidance_interval: tuple[float, float] = (0.0, 1.0)) -> Mapping[str, Tensor]:
    """Euler's method on the flow ODE ``dx/dt = v(x, t)`` (the sampler of rectified flow, Liu et
    al. 2022): ``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)`` from t = 1 (``x`` = noise)
    to t = 0. One model call per step (two batched with CFG). Returns the same type as ``x``."""
    ts = _schedule(steps, shift, schedule)
    velocity = _velocity_fn(model, cond, null_cond, guidance_scale, guidance_interval)
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        v = velocity(x, t)
        x = _with_parts(x, {k: xk + (t_next - t) * v[k] for k, xk in x.items()})
        if callback is not None:
            callback(i, len(ts) - 1, t_next, x)
    return x


def heun(model: VelocityModel, x: Mapping[str, Tensor], cond: Any = None, *, steps: int = 20,
         shift: float = 1.0, guidance_scale: float = 1.0, null_cond: Any = None,
         schedule: Tensor | None = None, callback: StepCallback | None = None,
         guidance_interval: tuple[float, float] = (0.0, 1.0)) -> Mapping[str, Tensor]:
    """Heun's second-order method (Karras et al. 2022, "Elucidating the design space", Alg. 1):
    an Euler predictor ``x' = x_i + h v(x_i, t_i)``, then the trapezoidal corrector
    ``x_{i+1} = x_i + h (v(x_i, t_i) + v(x', t_{i+1})) / 2`` with ``h = t_{i+1} - t_i``; as in
    Alg. 1 the last step into t = 0 is a plain Euler step. 2N - 1 model calls for N steps."""
    ts = _schedule(steps, shift, schedule)
    velocity = _velocity_fn(model, cond, null_cond, guidance_scale, guidance_interval)
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        v = velocity(x, t)
        x_pred = {k: xk + (t_next - t) * v[k] for k, xk in x.items()}
        if t_next > 0:
            v2 = velocity(_with_parts(x, x_pred), t_next)
            x_pred = {k: xk + (t_next - t) * 0.5 * (v[k] + v2[k]) for k, xk in x.items()}
        x = _with_parts(x, x_pred)
        if callback is not None:
            callback(i, len(ts) - 1, t_next, x)
    return x


SAMPLERS: dict[str, Callable[..., Mapping[str, Tensor]]] = {"euler": euler, "heun": heun}


def sample(model: VelocityModel, x: Mapping[str, Tensor], cond: Any = None, *, method: str = "euler",
           **kwargs: Any) -> Mapping[str, Tensor]:
    """Run the sampler named ``method`` (one of ``SAMPLERS``) from noise ``x``."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[method](model, x, cond, **kwargs)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a trained generator is sampled: the one set of settings ``ldm sample``, ``eval``,
    ``compare`` and ``demo`` share. ``guidance`` is the CFG scale (1 = off), ``guidance_interval``
    the ``(lo, hi)`` of t where it acts (``lo < t <= hi``; default everywhere), ``shift`` the
    timestep shift of the schedule, ``seed`` the seed of the first sample's initial noise (sample i:
    ``seed + i``, `noise_per_seed`)."""

    steps: int = 20
    guidance: float = 4.0
    shift: float = 1.0
    sampler: str = "euler"
    seed: int = 0
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")
        if not self.shift > 0:
            raise ValueError(f"the sampling shift must be > 0, got {self.shift}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {sorted(SAMPLERS)}")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"the guidance interval needs 0 <= lo < hi <= 1 (t = 1 is noise), got {lo}:{hi}")


def known_part_velocity(model: VelocityModel, name: str, value: Tensor, noise: Tensor) -> VelocityModel:
    """Wrap a velocity model so sampling keeps part ``name`` on the flow path of a GIVEN value
    ``c`` (normalised like the model's training data), ``x_t = (1 - t) c + t eps`` with ``eps =
    noise`` (that part of the initial noise): the model sees the noised given value at every step
    and the returned velocity of the part is ``eps - c``, which Euler integrates exactly along the
    path, ending at ``c``. The other parts are therefore sampled conditioned on it (replacement /
    imputation conditioning, Song et al. 2021, "Score-Based Generative Modeling through SDEs",
    Sec. 5 and App. I.2); e.g. image-to-video with Hi-VAE's first-frame ``content`` part. Works
    with CFG (the doubled batch is handled)."""
    if value.shape != noise.shape:
        raise ValueError(f"{name} value {tuple(value.shape)} and noise {tuple(noise.shape)} differ")

    def velocity(x, t: Tensor, cond: Any) -> dict[str, Tensor]:
        reps = x[name].shape[0] // value.shape[0]
        c = value.repeat(reps, *[1] * (value.ndim - 1))
        eps = noise.repeat(reps, *[1] * (noise.ndim - 1))
        tt = t.to(c.dtype).view(-1, *[1] * (c.ndim - 1))
        parts = {**x, name: (1 - tt) * c + tt * eps}
        v = dict(model(_with_parts(x, parts), t, cond))
        v[name] = (eps - c).to(v[name].dtype)
        return v

    return velocity
