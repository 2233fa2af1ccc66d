"""Contract tests of the KL-2D and causal-3D families and of the shared blocks (tiny configs, CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aes import one_step
from autoencoders import REGISTRY, build, describe, load_pretrained
from autoencoders.blocks import (CausalConv3d, FrameGroupNorm, TemporalDownsample, TemporalUpsample,
                                 kl_standard_normal, latent_kl)

OURS = ("kl2d", "causal3d")
DEBUG = sorted(n for n, (cls, _) in REGISTRY.items() if cls.family in OURS and n.endswith("-debug"))
FULL = sorted(n for n, (cls, _) in REGISTRY.items() if cls.family in OURS and not n.endswith("-debug"))
# (frames, height, width) inputs each family accepts
SIZES = {"kl2d": [(1, 16, 16), (3, 16, 24), (2, 32, 8)], "causal3d": [(1, 16, 16), (5, 16, 24), (9, 8, 16)]}


def _model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(name, **overrides).eval()


def _causal(name: str) -> torch.nn.Module:
    """A causal3d debug model with per-frame norms: CogVideoX's clip-wise GroupNorm (causal3d-cogvideox)
    is causal only chunk by chunk (tests/test_diffusers_weights.py), everything else in its layout
    (latent-modulated norms, deep temporal upsampling, chunked streaming) is causal frame by frame."""
    return _model(name, **({"norm": "group"} if REGISTRY[name][1].norm == "clip" else {}))


def _video(frames: int, height: int, width: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def test_registry_names():
    for family, factors in (("kl2d", ["f8c4", "f8c16"]), ("causal3d", ["f4x8c4", "f4x8c16"])):
        for f in factors:
            assert f"{family}-{f}" in REGISTRY and f"{family}-{f}-debug" in REGISTRY


@pytest.mark.parametrize("name", FULL)
def test_debug_twin_has_same_compression(name):
    full, debug = describe(name), describe(name + "-debug")
    assert full["latent_shape"]["z"] == debug["latent_shape"]["z"]
    assert full["vcpr"] == debug["vcpr"]


def test_kl2d_f8c4_matches_sd_vae_architecture():
    """Same widths, depth and heads as the SD-VAE: the parameter count of diffusers' AutoencoderKL
    with the SD config (both built on the meta device, no memory)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        sd = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                     down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4)
        ours = build("kl2d-f8c4")
    assert ours.num_parameters() == sum(p.numel() for p in sd.parameters())


@pytest.mark.parametrize("name", DEBUG)
def test_shapes_match_latent_spec(name):
    model = _model(name)
    family = REGISTRY[name][0].family
    for frames, height, width in SIZES[family]:
        x = _video(frames, height, width, batch=2)
        with torch.no_grad():
            latent = model.encode(x)
            recon = model.decode(latent)
        spec = model.latent_spec(frames, height, width)
        assert latent.form == spec.form == "grid"
        assert latent.shapes() == spec.parts
        assert tuple(latent.logvar["z"].shape) == tuple(latent["z"].shape)
        assert recon.shape == x.shape
        c, t, h, w = spec.parts["z"]
        assert spec.vcpr == pytest.approx(frames / t * height / h * width / w)
        assert spec.input_shape == (3, frames, height, width)


@pytest.mark.parametrize("name", DEBUG)
def test_encode_is_deterministic_posterior_mean(name):
    model = _model(name)
    frames, height, width = SIZES[REGISTRY[name][0].family][1]
    x = _video(frames, height, width)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(x)
        sampled = a.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["z"], b["z"], rtol=0, atol=0)
    torch.testing.assert_close(a.logvar["z"], b.logvar["z"], rtol=0, atol=0)
    assert not torch.equal(sampled["z"], a["z"])  # the mean is not a sample
    assert latent_kl(a).shape == (1,)


@pytest.mark.parametrize("name", DEBUG)
def test_save_load_round_trip(name, tmp_path):
    model = _model(name, latent_scale=(0.7,), latent_shift=(0.05,))
    model.save_pretrained(tmp_path, name=name)
    loaded = load_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    frames, height, width = SIZES[REGISTRY[name][0].family][1]
    x = _video(frames, height, width)
    with torch.no_grad():
        la, lb = model.encode(x), loaded.encode(x)
        ya, yb = model.decode(la), loaded.decode(lb)
    torch.testing.assert_close(la["z"], lb["z"], rtol=0, atol=0)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)


@pytest.mark.parametrize("name", DEBUG)
def test_clear_errors_for_bad_input(name):
    model = _model(name)
    family = REGISTRY[name][0].family
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(_video(1, 12, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.latent_spec(1, 16, 0)
    with pytest.raises(ValueError, match="channels"):
        model.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="B C T H W"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="expected z"):
        model.decode(model.encode(_video(1, 16, 16)).replace({"z": torch.zeros(1, 7, 1, 2, 2)}))
    with pytest.raises(ValueError, match="frame"):
        model.latent_spec(0, 16, 16)
    if family == "causal3d":
        for frames in (2, 4, 6, 8, 16):
            with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
                model.encode(_video(frames, 16, 16))


@pytest.mark.parametrize("name", [n for n in DEBUG if n.startswith("causal3d")])
def test_causal3d_encoder_is_causal(name):
    """Latent frame j sees input frames <= 4j only: perturbing frame s leaves latent frames j < s/4
    unchanged and changes latent frame ceil(s/4)."""
    model = _causal(name)
    x = _video(9, 16, 16)
    with torch.no_grad():
        z = model.encode(x)["z"]
        for s in (1, 4, 5, 8):
            x2 = x.clone()
            x2[:, :, s] += 0.5
            z2 = model.encode(x2)["z"]
            first = math.ceil(s / 4)
            torch.testing.assert_close(z2[:, :, :first], z[:, :, :first], rtol=0, atol=0)
            assert not torch.allclose(z2[:, :, first], z[:, :, first])


@pytest.mark.parametrize("name", [n for n in DEBUG if n.startswith("causal3d")])
def test_causal3d_decoder_is_causal(name):
    """Latent frame j decodes to frames 4j-3..4j: perturbing it leaves frames < 4j-3 unchanged."""
    model = _causal(name)
    with torch.no_grad():
        latent = model.encode(_video(9, 16, 16))
        y = model.decode(latent)
        for j in (1, 2):
            z2 = latent["z"].clone()
            z2[:, :, j] += 0.5
            y2 = model.decode(latent.replace({"z": z2}))
            keep = 4 * j - 3
            torch.testing.assert_close(y2[:, :, :keep], y[:, :, :keep], rtol=0, atol=0)
            assert not torch.allclose(y2[:, :, keep], y[:, :, keep])


def test_kl2d_is_framewise():
    model = _model("kl2d-f8c4-debug")
    x = _video(3, 16, 16)
    with torch.no_grad():
        z = model.encode(x)["z"]
        z1 = model.encode(x[:, :, 1:2])["z"]
    torch.testing.assert_close(z[:, :, 1:2], z1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DEBUG)
def test_one_training_step_lowers_the_loss(name):
    model = _model(name).train()
    frames, height, width = SIZES[REGISTRY[name][0].family][1]
    x = _video(frames, height, width, batch=2)

    def loss_fn() -> torch.Tensor:
        out = model.train_forward(x, generator=torch.Generator().manual_seed(0))
        return F.l1_loss(out.recon, x) + 1e-6 * latent_kl(out.posterior).mean()

    before, after = one_step(model, loss_fn, optimizer=torch.optim.Adam)
    assert after < before


@pytest.mark.parametrize("name", DEBUG)
def test_latent_scale_and_shift_round_trip(name):
    c = REGISTRY[name][1].latent_channels
    raw = _model(name)
    shift = tuple(0.1 * (i + 1) for i in range(c))
    for scale in ((0.5,), tuple(0.5 + 0.25 * i for i in range(c))):
        scaled = _model(name, latent_scale=scale, latent_shift=shift)
        scaled.load_state_dict(raw.state_dict())
        x = _video(*SIZES[REGISTRY[name][0].family][1])
        with torch.no_grad():
            r, s = raw.encode(x), scaled.encode(x)
            s_t = torch.tensor(scale).view(1, -1, 1, 1, 1)
            b_t = torch.tensor(shift).view(1, -1, 1, 1, 1)
            torch.testing.assert_close(s["z"], (r["z"] - b_t) * s_t)
            torch.testing.assert_close(s.logvar["z"], r.logvar["z"] + 2 * torch.log(s_t).expand_as(r["z"]))
            torch.testing.assert_close(scaled.decode(s), raw.decode(r), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="latent_shift"):
        build(name, latent_shift=(0.0,) * (c + 1))
    with pytest.raises(ValueError, match="non-zero"):
        build(name, latent_scale=(0.0,))


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError, match="unknown override"):
        build("kl2d-f8c4-debug", widths=3)


# --- blocks ---------------------------------------------------------------------------------
def test_causal_conv_pads_the_past_with_the_first_frame():
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, 3)
    x = torch.randn(1, 2, 4, 5, 5)
    padded = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)  # two copies of frame 0
    ref = F.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(conv(x), ref)
    assert conv(x).shape == (1, 3, 4, 5, 5)


@pytest.mark.parametrize("factor", [2, 4])
def test_temporal_resamplers_keep_the_first_frame_alone(factor):
    torch.manual_seed(0)
    down, up = TemporalDownsample(4, factor), TemporalUpsample(4, factor)
    for k in range(3):
        x = torch.randn(1, 4, 1 + factor * k, 2, 2)
        assert down(x).shape[2] == 1 + k
        assert up(down(x)).shape[2] == 1 + factor * k
    with pytest.raises(ValueError, match="frames"):
        down(torch.randn(1, 4, factor, 2, 2))
    # output 0 of the downsampler depends on frame 0 only; upsampled frame 0 on latent frame 0 only
    x = torch.randn(1, 4, 1 + 2 * factor, 2, 2)
    x2 = x.clone()
    x2[:, :, 1:] += 1.0
    torch.testing.assert_close(down(x2)[:, :, 0], down(x)[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(up(x2)[:, :, 0], up(x)[:, :, 0], rtol=0, atol=0)


def test_frame_group_norm_is_per_frame():
    torch.manual_seed(0)
    norm = FrameGroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 5, 5)
    per_frame = torch.stack([F.group_norm(x[:, :, t], 2, norm.weight, norm.bias, norm.eps) for t in range(3)], 2)
    torch.testing.assert_close(norm(x), per_frame)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl_standard_normal(mean, logvar), ref)
