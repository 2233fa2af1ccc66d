import math

import pytest
import torch

from ldm import flow, samplers


def _parts(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"z": torch.randn(B, 2, 3, 4, 4, generator=g), "tok": torch.randn(B, 2, 5, 3, generator=g)}


def test_path_endpoints_and_shared_t():
    x0, eps = _parts(seed=0), _parts(seed=1)
    t = torch.tensor([0.0, 1.0, 0.25])
    xt = flow.interpolate(x0, eps, t)
    for k in x0:
        assert torch.equal(xt[k][0], x0[k][0])  # t = 0 is data
        assert torch.equal(xt[k][1], eps[k][1])  # t = 1 is noise
        torch.testing.assert_close(xt[k][2], 0.75 * x0[k][2] + 0.25 * eps[k][2])


def test_velocity_is_time_derivative_and_x0_recovers():
    x0, eps = _parts(seed=2), _parts(seed=3)
    t, h = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    a, b = flow.interpolate(x0, eps, t), flow.interpolate(x0, eps, t + h)
    v = flow.velocity_target(x0, eps)
    for k in x0:
        torch.testing.assert_close((b[k] - a[k]) / h, v[k], atol=2e-3, rtol=1e-3)
    rec = flow.predict_x0(a, v, t)
    for k in x0:
        torch.testing.assert_close(rec[k], x0[k], atol=1e-5, rtol=1e-5)


def test_mismatched_parts_raise():
    x0 = _parts()
    with pytest.raises(ValueError, match="parts differ"):
        flow.interpolate(x0, {"z": x0["z"]}, torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        flow.interpolate(x0, _parts(seed=1), torch.zeros(2))


def test_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(flow.shift_timesteps(t, 1.0), t)
    s = flow.shift_timesteps(t, 3.0)
    assert s[0] == 0 and s[-1] == 1
    assert torch.all(s[1:-1] > t[1:-1]) and torch.all(s[1:] > s[:-1])
    torch.testing.assert_close(s[5], torch.tensor(3 * 0.5 / (1 + 2 * 0.5)))
    for shift in (1.18, 1.32, 1.57):  # exact ends in float32 (was: 1.0000001 or 0.9999999 at t = 1)
        assert flow.shift_timesteps(torch.tensor([0.0, 1.0]), shift).tolist() == [0.0, 1.0]
    assert flow.shift_for_tokens(4096, 1024) == 2.0
    with pytest.raises(ValueError):
        flow.shift_timesteps(t, 0.0)


def test_sample_timesteps():
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    u = flow.sample_timesteps(4000, generator=g())
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.03
    assert torch.equal(u, flow.sample_timesteps(4000, generator=g()))
    ln = flow.sample_timesteps(4000, distribution="logit_normal", loc=1.0, scale=0.5, generator=g())
    assert abs(ln.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02
    logit = torch.logit(ln.double())  # N(loc, scale): loc the mean, scale the standard deviation
    assert abs(logit.mean().item() - 1.0) < 0.03 and abs(logit.std().item() - 0.5) < 0.02
    shifted = flow.sample_timesteps(4000, shift=3.0, generator=g())
    assert shifted.mean() > u.mean() + 0.1
    for dist in flow.TIMESTEP_DISTRIBUTIONS:  # training's shift is the sampling schedule's (SD3 uses one for both)
        plain = flow.sample_timesteps(64, distribution=dist, generator=g())
        torch.testing.assert_close(flow.sample_timesteps(64, distribution=dist, shift=3.0, generator=g()),
                                   flow.shift_timesteps(plain, 3.0))
    uniform = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(samplers.timestep_schedule(5, 3.0), flow.shift_timesteps(uniform, 3.0))
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        flow.sample_timesteps(3, distribution="beta")


def test_flow_loss_mean_over_all_parts_and_mask():
    pred, tgt = _parts(seed=4), _parts(seed=5)
    loss = flow.flow_loss(pred, tgt)
    assert loss.shape == (3,)
    se = sum(((pred[k] - tgt[k]) ** 2).flatten(1).sum(1) for k in pred)
    n = sum(pred[k][0].numel() for k in pred)
    torch.testing.assert_close(loss, se / n)

    # varlen: frames past the length do not count, whatever they hold
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    mask = {"z": flow.expand_mask(valid, pred["z"], 2)}
    masked = flow.flow_loss(pred, tgt, mask)
    noisy = dict(pred)
    noisy["z"] = torch.where(mask["z"], pred["z"], pred["z"] + 100.0)
    torch.testing.assert_close(flow.flow_loss(noisy, tgt, mask), masked)
    z_se = (((pred["z"] - tgt["z"]) ** 2) * mask["z"]).flatten(1).sum(1)
    tok_se = ((pred["tok"] - tgt["tok"]) ** 2).flatten(1).sum(1)
    count = valid.sum(1) * 2 * 16 + pred["tok"][0].numel()
    torch.testing.assert_close(masked, (z_se + tok_se) / count)
    with pytest.raises(ValueError, match="unknown parts"):
        flow.flow_loss(pred, tgt, {"nope": valid})
    with pytest.raises(ValueError, match="does not match"):
        flow.expand_mask(valid, pred["z"], 3)
