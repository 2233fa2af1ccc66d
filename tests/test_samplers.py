import math

import pytest
import torch

from ldm import flow, samplers
from ldm.latent import Cond, Latent


def test_schedule():
    s = samplers.timestep_schedule(4)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = samplers.timestep_schedule(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and torch.all(shifted[1:-1] > s[1:-1])
    with pytest.raises(ValueError):
        samplers.timestep_schedule(0)


class _Counting:
    """Zero velocity; records (batch, t) of every call, so a guided step shows as batch 2."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((t.shape[0], float(t[0])))
        return {"x": torch.zeros_like(x["x"])}


@pytest.mark.parametrize("shift", [0.1, 1.0, 1.18, 1.32, 1.57, math.sqrt(3), 3.0, 7.5])
def test_the_schedule_starts_at_one_and_ends_at_zero_for_any_shift(shift):
    """Exactly 1 and 0 at the ends, inside [0, 1] between, so the first step is at pure noise and, with
    the default guidance interval (t <= 1), guided (was: shift 1.32 started at t = 1.0000001, a
    time the model never trained on, and left that first step unguided)."""
    s = samplers.timestep_schedule(7, shift)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0 and torch.all(s[1:] < s[:-1])
    model = _Counting()
    samplers.euler(model, {"x": torch.ones(1, 1)}, torch.ones(1, 1), steps=4, shift=shift, guidance_scale=4.0,
                   null_cond=torch.zeros(1, 1))
    assert [b for b, _ in model.calls] == [2] * 4 and model.calls[0][1] == 1.0


def test_guidance_interval_ends_are_the_times_a_user_writes():
    """``--guidance-interval 0.1:0.8`` with 10 steps guides t = 0.8 ... 0.2 (``lo < t <= hi``) (was: the
    float32 times 0.8000000119 and 0.1000000015 left t = 0.8 unguided and guided t = 0.1)."""
    model = _Counting()
    samplers.euler(model, {"x": torch.ones(1, 1)}, torch.ones(1, 1), steps=10, guidance_scale=4.0,
                   null_cond=torch.zeros(1, 1), guidance_interval=(0.1, 0.8))
    assert [b for b, _ in model.calls] == [1, 1, 2, 2, 2, 2, 2, 2, 2, 1]


def test_initial_noise_is_seeded():
    shapes = {"z": (2, 3, 4, 4), "g": (2, 5, 3)}
    a = samplers.initial_noise(shapes, 2, seed=1)
    b = samplers.initial_noise(shapes, 2, seed=1)
    c = samplers.initial_noise(shapes, 2, seed=2)
    assert a["z"].shape == (2, 2, 3, 4, 4) and a["g"].shape == (2, 2, 5, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["z"], c["z"])


def _point_model(x0):
    """Exact velocity of the flow towards a single data point: v = (x - x0) / t."""
    def model(x, t, cond):
        return {k: (x[k] - x0[k]) / t.view(-1, *[1] * (x[k].ndim - 1)) for k in x}
    return model


def check_sampler(method) -> None:
    """What ``ldm sample`` relies on from every sampler of ``samplers.SAMPLERS``: a straight flow
    integrated exactly from t = 1 to 0 over the schedule (``steps`` and ``shift``, or ``schedule``),
    a ``Latent`` in gives a ``Latent`` out with its ``aux``, one callback per step ending at t = 0,
    and classifier-free guidance with ``w = 1`` equal to the conditional model."""
    x0 = {"z": torch.randn(2, 3, 4), "s": torch.randn(2, 5)}
    noise = samplers.initial_noise({"z": (3, 4), "s": (5,)}, 2, seed=0)
    for kw in ({"steps": 3, "shift": 2.0}, {"schedule": torch.tensor([1.0, 0.6, 0.1, 0.0])}):
        out = method(_point_model(x0), noise, None, **kw)
        for k in x0:
            torch.testing.assert_close(out[k], x0[k], atol=1e-5, rtol=1e-5)
    x = Latent({"z": torch.randn(2, 1, 3, 2, 2)}, "varlen", aux={"length": torch.tensor([3, 1])})
    for kw, steps in (({"steps": 4}, [(0, 4, 0.75), (1, 4, 0.5), (2, 4, 0.25), (3, 4, 0.0)]),
                      ({"schedule": torch.tensor([1.0, 0.6, 0.1, 0.0])}, [(0, 3, 0.6), (1, 3, 0.1), (2, 3, 0.0)])):
        seen = []
        out = method(lambda x, t, c: {"z": -x["z"]}, x, **kw, callback=lambda i, n, t, xs: seen.append((i, n, round(t, 6))))
        assert isinstance(out, Latent) and torch.equal(out.aux["length"], x.aux["length"])
        assert seen == steps, seen
    cond = torch.tensor([[1.0], [2.0]])
    plain = method(lambda x, t, c: {"z": x["z"] * c}, {"z": torch.ones(2, 1)}, cond, steps=3)
    guided = method(lambda x, t, c: {"z": x["z"] * c}, {"z": torch.ones(2, 1)}, cond, steps=3, guidance_scale=1.0,
                    null_cond=torch.zeros(2, 1))
    torch.testing.assert_close(plain["z"], guided["z"])


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_registered_sampler_keeps_the_contract(name):
    """A new entry of ``samplers.SAMPLERS`` is checked here with no test to write."""
    check_sampler(samplers.SAMPLERS[name])


def test_the_sampler_check_catches_a_broken_sampler():
    def no_callback(*args, callback=None, **kw):
        return samplers.euler(*args, **kw)

    def loses_aux(*args, **kw):
        return dict(samplers.euler(*args, **kw))

    def ignores_schedule(model, x, cond=None, *, schedule=None, **kw):
        return samplers.euler(model, x, cond, **kw)

    for broken in (no_callback, loses_aux, ignores_schedule):
        with pytest.raises(AssertionError):
            check_sampler(broken)


def test_heun_is_more_accurate_than_euler_on_a_curved_flow():
    model = lambda x, t, c: {"x": x["x"]}  # dx/dt = x  ->  x(0) = x(1) / e  # noqa: E731
    x1 = {"x": torch.ones(1, 1)}
    exact = torch.exp(torch.tensor(-1.0))
    err_e = (samplers.euler(model, x1, steps=10)["x"] - exact).abs().item()
    err_h = (samplers.heun(model, x1, steps=10)["x"] - exact).abs().item()
    assert err_h < err_e / 5


def _gaussian_flow(mu, sd):
    """The exact velocity of the flow of ``ldm.flow`` for data N(mu, sd^2): x_t = (1 - t) mu + sigma_t z,
    sigma_t^2 = (1 - t)^2 sd^2 + t^2, so v = -mu + sigma_t' / sigma_t (x - (1 - t) mu); noise eps at
    t = 1 ends at mu + sd eps at t = 0."""
    def model(x, t, cond):
        t = t.double().view(-1, 1)
        var = (1 - t) ** 2 * sd ** 2 + t ** 2
        return {"x": -mu + (t - (1 - t) * sd ** 2) / var * (x["x"] - (1 - t) * mu)}
    return model


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_samplers_converge_at_their_order_to_the_exact_flow(method, order, shift):
    """Halving the step halves Euler's error and quarters Heun's (2N - 1 calls, its last step into t = 0
    an Euler step) on a flow known in closed form, through both ends of the schedule."""
    eps = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = 1.5 + 0.3 * eps
    err = [(samplers.sample(_gaussian_flow(1.5, 0.3), {"x": eps}, method=method, steps=n, shift=shift)["x"]
            - exact).abs().max().item() for n in (32, 64)]
    assert 2 ** order * 0.85 < err[0] / err[1] < 2 ** order * 1.15, err


def test_the_optimum_of_the_training_loss_samples_the_data():
    """Training and sampling share one convention (which end is noise, the sign of v): the velocity that
    minimises the training loss, fitted by least squares at each t on ``flow.interpolate`` and
    ``flow.velocity_target`` (linear in x, the exact optimum for Gaussian data), carries noise to the data."""
    g = torch.Generator().manual_seed(0)
    data = {"x": 2.0 + 0.5 * torch.randn(20000, 1, generator=g, dtype=torch.float64)}
    noise = flow.sample_noise(data, g)
    target = flow.velocity_target(data, noise)["x"]

    def optimum(x, t, cond):
        x_t = flow.interpolate(data, noise, torch.full((20000,), float(t[0]), dtype=torch.float64))["x"]
        a, b = torch.linalg.lstsq(torch.cat([x_t, torch.ones_like(x_t)], 1), target).solution
        return {"x": a * x["x"] + b}

    start = {"x": torch.randn(4000, 1, generator=g, dtype=torch.float64)}
    for method in samplers.SAMPLERS:
        out = samplers.sample(optimum, start, method=method, steps=64, shift=2.0)["x"]
        assert abs(out.mean().item() - 2.0) < 0.05 and abs(out.std().item() - 0.5) < 0.05, method


def test_the_trainers_loss_is_least_at_the_velocity_the_samplers_integrate():
    """``ldm train``'s step loss (its path, target and t) is smallest at the exact velocity of the data's
    flow, the field ``test_samplers_converge_at_their_order_to_the_exact_flow`` integrates to the data;
    a velocity of the other direction of t, sign or scale scores worse."""
    from launch.train import FlowConfig, flow_step_loss

    g = torch.Generator().manual_seed(0)
    n = 20000
    latent = Latent({"x": 2.0 + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)})
    noise = {"x": torch.randn(n, 1, generator=g, dtype=torch.float64)}
    draws = (torch.rand(n, generator=g, dtype=torch.float64), noise, torch.ones(n, 3))  # (t, noise, no dropout)
    exact = _gaussian_flow(2.0, 0.5)
    others = {"t reversed": lambda x, t, c: exact(x, 1 - t, c), "negated": lambda x, t, c: {"x": -exact(x, t, c)["x"]},
              "scaled": lambda x, t, c: {"x": 1.1 * exact(x, t, c)["x"]},
              "offset": lambda x, t, c: {"x": exact(x, t, c)["x"] + 0.1}}
    loss = {name: flow_step_loss(model, latent, Cond(), FlowConfig(), draws, lambda c, drop: c).item()
            for name, model in {"exact": exact, **others}.items()}
    assert all(loss["exact"] < loss[name] for name in others), loss


class _CondModel:
    """Velocity = x * class scale + mean of (masked) text; counts calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(t.shape[0])
        scale = cond.class_id.float().view(-1, 1)
        m = cond.text_mask.float()[..., None]
        text = (cond.text * m).sum(1) / m.sum(1).clamp(min=1)
        return {"x": x["x"] * scale + text}


def test_cfg_batches_both_calls_and_scale_one_is_conditional():
    model = _CondModel()
    x = {"x": torch.randn(2, 3)}
    t = torch.full((2,), 0.5)
    cond = Cond(text=torch.randn(2, 4, 3), text_mask=torch.ones(2, 4, dtype=torch.bool), class_id=torch.tensor([2, 3]))
    null = Cond(text=torch.zeros(2, 1, 3), text_mask=torch.zeros(2, 1, dtype=torch.bool),
                class_id=torch.zeros(2, dtype=torch.long))
    v1 = samplers.guided_velocity(model, x, t, cond, null, 1.0)
    assert model.batches == [4]  # one call on [cond; null]
    torch.testing.assert_close(v1["x"], model(x, t, cond)["x"])
    v4 = samplers.guided_velocity(model, x, t, cond, null, 4.0)
    vc, vu = model(x, t, cond)["x"], model(x, t, null)["x"]
    torch.testing.assert_close(v4["x"], vu + 4.0 * (vc - vu))


def test_concat_cond_pads_text():
    a = Cond(text=torch.randn(1, 3, 2), class_id=torch.tensor([1]))
    b = Cond(text=torch.randn(1, 5, 2), text_mask=torch.ones(1, 5, dtype=torch.bool), class_id=torch.tensor([0]))
    c = samplers.concat_cond(a, b)
    assert c.text.shape == (2, 5, 2)
    assert c.text_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    with pytest.raises(ValueError, match="class_id"):
        samplers.concat_cond(a, Cond(text=torch.randn(1, 3, 2)))


def test_guidance_needs_null_cond_and_unknown_method():
    x = {"x": torch.randn(1, 2)}
    with pytest.raises(ValueError, match="null_cond"):
        samplers.euler(lambda x, t, c: x, x, steps=1, guidance_scale=3.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.sample(lambda x, t, c: x, x, method="rk4")
    with pytest.raises(ValueError, match="returned parts"):
        samplers.euler(lambda x, t, c: {"y": x["x"]}, x, steps=1)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_guidance_interval_guides_only_the_steps_inside_it(method):
    """Guidance acts at the steps with lo < t <= hi (one batched [cond; null] call), the others are
    plain conditional calls; (0, 1] is every step, an interval holding no step is guidance 1."""
    cond = Cond(text=torch.randn(2, 4, 3), text_mask=torch.ones(2, 4, dtype=torch.bool), class_id=torch.tensor([2, 3]))
    null = Cond(text=torch.zeros(2, 1, 3), text_mask=torch.zeros(2, 1, dtype=torch.bool),
                class_id=torch.zeros(2, dtype=torch.long))
    x = {"x": torch.randn(2, 3)}

    def run(scale, interval=None):
        model = _CondModel()
        kw = {} if interval is None else {"guidance_interval": interval}
        out = samplers.sample(model, x, cond, method=method, steps=4, guidance_scale=scale, null_cond=null, **kw)
        return out["x"], model.batches

    full, full_batches = run(4.0)
    torch.testing.assert_close(run(4.0, (0.0, 1.0))[0], full)
    assert set(full_batches) == {4}
    none, none_batches = run(4.0, (0.8, 0.9))  # the schedule 1, .75, .5, .25, 0 has no t in (0.8, 0.9]
    torch.testing.assert_close(none, run(1.0)[0])
    assert set(none_batches) == {2}
    part, part_batches = run(4.0, (0.3, 0.8))  # guided at t = .75 and .5 only
    ts = [1.0, 0.75, 0.5, 0.25] if method == "euler" else [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    assert part_batches == [4 if 0.3 < t <= 0.8 else 2 for t in ts]
    assert not torch.allclose(part, full) and not torch.allclose(part, none)
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(ValueError, match="guidance interval"):
            samplers.SamplingConfig(guidance_interval=bad)
