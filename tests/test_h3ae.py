"""H3AE (autoencoders/h3ae.py): shapes of every config, the causal frame rule, causality of encoder,
decoder and block-causal attention, the omni objective (plain and first-frame decoding with one set
of weights), the latent / pixel consistency losses and their gradient routing, sliced inference,
the norm / upsampling / all-3D ablations, save/load, training with ``train_autoencoder`` and
extraction with ``launch.extract``. Tiny debug configs on CPU; paper-size configs on the meta device."""
from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from aes import one_step
from autoencoders import REGISTRY, build, describe, load_pretrained
from autoencoders.h3ae import CausalAttentionStack, PixelNorm, block_causal_mask, gaussian_kl, make_norm
from ldm.latent import Cond, Latent
from ldm.layers import set_attention_backend

FULL = ("h3ae-4x16x16", "h3ae-8x32x32", "h3ae-8x64x64")
DEBUG = tuple(n + "-debug" for n in FULL)
FACTORS = {"h3ae-4x16x16": (4, 16), "h3ae-8x32x32": (8, 32), "h3ae-8x64x64": (8, 64)}


def _model(name: str = "h3ae-8x32x32-debug", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(name, **overrides).eval()


def _video(frames: int, height: int, width: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def _clip(model, groups: int = 2, batch: int = 1, seed: int = 1, size: int = 1) -> torch.Tensor:
    """A legal clip: 1 + r*groups frames, (size*f) x (size*f) pixels."""
    side = size * model.spatial_factor
    return _video(1 + model.temporal_factor * groups, side, side, batch, seed)


# ------------------------------------------------------------------------------------------
# Registry, configs, shapes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FULL)
def test_configs_have_tab9_factors_and_debug_twins(name):
    r, f = FACTORS[name]
    full, debug = describe(name, 17, 512, 512), describe(name + "-debug", 17, 512, 512)
    assert full["latent_shape"] == debug["latent_shape"] == {"z": [256, 1 + 16 // r, 512 // f, 512 // f]}
    assert full["vcpr"] == debug["vcpr"]
    assert build(name + "-debug", latent_channels=128).latent_spec(17, 512, 512).parts["z"][0] == 128


def test_tab9_columns():
    cfg = {n: REGISTRY[n][1] for n in FULL}
    for c in cfg.values():
        assert (c.spatial_widths, c.spatial_blocks, c.attn_heads, c.norm, c.upsample) == \
            ((32, 64), (2, 2), 8, "pixel", "shuffle")
    assert (cfg["h3ae-4x16x16"].st_widths, cfg["h3ae-4x16x16"].st_blocks, cfg["h3ae-4x16x16"].attn_blocks) == \
        ((128, 256), (2, 8), 0)
    assert (cfg["h3ae-8x32x32"].st_widths, cfg["h3ae-8x32x32"].st_blocks) == ((128, 256), (2, 6))
    assert (cfg["h3ae-8x64x64"].st_widths, cfg["h3ae-8x64x64"].st_blocks) == ((128, 256, 512), (2, 6, 8))
    for n in ("h3ae-8x32x32", "h3ae-8x64x64"):
        assert (cfg[n].attn_width, cfg[n].attn_blocks) == (512, 8)


@pytest.mark.parametrize("name", FULL)
def test_full_configs_build_and_run_on_meta(name):
    """Paper-size configs: exact encode/decode shapes at 17x512x512 and for a single image, and
    their parameter counts, without allocating weights."""
    with torch.device("meta"):
        model = build(name).eval()
        for frames in (17, 1):
            spec = model.latent_spec(frames, 512, 512)
            with torch.no_grad():
                latent = model.encode(torch.empty(1, 3, frames, 512, 512))
                assert tuple(latent["z"].shape[1:]) == spec.parts["z"]
                assert tuple(model.decode(latent).shape) == (1, 3, frames, 512, 512)
    assert 60e6 < model.num_parameters() < 500e6


# Tab. 3 parameter counts and what the adopted reading of Tab. 9 builds (benchmarks/h3ae_params.py
# counts the same analytically): 4x16x16 and 8x32x32 within 0.7 %; 8x64x64 cannot be reached by any
# reading consistent with the other two (module docstring) and stays 31 % short.
PAPER_PARAMS = {"h3ae-4x16x16": (67.16e6, 66_732_419, 0.007), "h3ae-8x32x32": (196.51e6, 195_557_123, 0.007),
                "h3ae-8x64x64": (643.76e6, 444_351_747, 0.315)}


def _meta_params(name: str, **overrides) -> int:
    with torch.device("meta"):
        return build(name, **overrides).num_parameters()


@pytest.mark.parametrize("name", FULL)
def test_parameter_counts_against_tab3(name):
    paper, exact, tolerance = PAPER_PARAMS[name]
    n = _meta_params(name)
    assert n == exact
    assert abs(n / paper - 1) < tolerance


def test_parameter_counts_of_tab1_variants_and_the_old_reading():
    """Tab. 1 rows of 8x32x32 the reading meets (z=128: 195 M; GN / LN: 197 M, both within 1 %), the
    no-attention row it approaches (316 M; blocks of the attention column as 512-wide Conv3D ResBlocks
    here: 298 M), and the first reading still reachable through the options."""
    assert abs(_meta_params("h3ae-8x32x32", latent_channels=128) / 195e6 - 1) < 0.01
    for norm in ("group", "layer"):
        assert abs(_meta_params("h3ae-8x32x32", norm=norm) / 197e6 - 1) < 0.01
    with torch.device("meta"):
        model = build("h3ae-8x32x32")
    attention = sum(p.numel() for p in model.encoder.st[-1].blocks.parameters())
    attention += sum(p.numel() for p in model.decoder.st[-1].blocks.parameters())
    resblock = 2 * (27 * 512 * 512 + 512)  # two causal 3x3x3 convs
    no_attention = model.num_parameters() - attention + (8 + 9) * resblock
    assert abs(no_attention / 316e6 - 1) < 0.06
    old = {n: _meta_params(n, **OLD_READING) for n in FULL}
    assert old == {"h3ae-4x16x16": 75_945_411, "h3ae-8x32x32": 149_356_739, "h3ae-8x64x64": 411_257_539}


@pytest.mark.parametrize("name", DEBUG)
def test_debug_shapes_match_latent_spec(name):
    model = _model(name)
    r, f = model.temporal_factor, model.spatial_factor
    for frames, height, width in ((1, f, f), (1 + r, 2 * f, f), (1 + 2 * r, f, 2 * f)):
        video = _video(frames, height, width, batch=2)
        with torch.no_grad():
            latent = model.encode(video)
            assert tuple(latent["z"].shape[1:]) == model.latent_spec(frames, height, width).parts["z"]
            assert latent.logvar["z"].shape == latent["z"].shape
            assert model.decode(latent).shape == video.shape


def test_frame_rule_and_bad_inputs_have_clear_errors():
    model = _model("h3ae-4x16x16-debug")
    with pytest.raises(ValueError, match=r"1 \+ 4k frames \(1, 5, 9, \.\.\.\) \(fully causal.*got 4"):
        model.latent_spec(4, 32, 32)
    with pytest.raises(ValueError, match="fully causal"):
        model.encode(_video(8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(_video(5, 24, 16))
    with pytest.raises(ValueError, match="B 256 t h w"):
        model.decode(Latent({"z": torch.zeros(1, 4, 2, 1, 1)}))
    latent = model.encode(_video(5, 32, 32))
    with pytest.raises(ValueError, match="first_frame must be B 3 1 H W"):
        model.decode(latent, Cond(first_frame=torch.zeros(1, 3, 2, 32, 32)))
    with pytest.raises(ValueError, match="the latent needs"):
        model.decode(latent, Cond(first_frame=torch.zeros(1, 3, 1, 16, 32)))
    for bad, match in ((dict(norm="batch"), "norm must be"), (dict(upsample="bilinear"), "upsample must be"),
                       (dict(consistency="lpips"), "consistency must be"), (dict(omni_prob=1.5), "omni_prob"),
                       (dict(attn_width=40, attn_blocks=1, st_temporal=(True, True, True)), "even head dim"),
                       (dict(st_temporal=(True,)), "one flag per ST column"),
                       (dict(attn_width=64), "both"), (dict(attn_ffn="swiglu"), "attn_ffn must be"),
                       (dict(shuffle_kernel=2), "must be 1 or 3"), (dict(latent_kernel=5), "must be 1 or 3"),
                       (dict(decoder_extra_blocks=-1), "decoder_extra_blocks")):
        with pytest.raises(ValueError, match=match):
            build("h3ae-4x16x16-debug", **bad)
    with pytest.raises(ValueError, match="unknown override"):
        build("h3ae-4x16x16-debug", heads=4)


# ------------------------------------------------------------------------------------------
# Causality
# ------------------------------------------------------------------------------------------
def _check_encoder_causal(model, size: int = 1) -> None:
    r = model.temporal_factor
    video = _clip(model, groups=2, size=size)
    with torch.no_grad():
        base = model.encode(video)["z"]
        for k in (1, r, r + 1):
            changed = video.clone()
            changed[:, :, k] += 0.5 * torch.randn(changed[:, :, k].shape, generator=torch.Generator().manual_seed(k))
            z = model.encode(changed)["z"]
            first_affected = -(-k // r)  # latent frame j sees input frames <= r*j
            torch.testing.assert_close(z[:, :, :first_affected], base[:, :, :first_affected], rtol=0, atol=1e-5)
            assert (z[:, :, first_affected] - base[:, :, first_affected]).abs().max() > 1e-4


def _check_decoder_causal(model) -> None:
    r = model.temporal_factor
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, model.config.latent_channels, 3, 1, 1, generator=g)
    with torch.no_grad():
        base = model.decode(Latent({"z": z}))
        for j in (1, 2):
            changed = z.clone()
            changed[:, :, j] += 1.0
            out = model.decode(Latent({"z": changed}))
            keep = 1 + r * (j - 1)  # decoded frame m depends on latent frames <= ceil(m / r)
            torch.testing.assert_close(out[:, :, :keep], base[:, :, :keep], rtol=0, atol=1e-5)
            assert (out[:, :, keep] - base[:, :, keep]).abs().max() > 1e-4


@pytest.mark.parametrize("name", DEBUG)
def test_encoder_and_decoder_are_causal(name):
    model = _model(name)
    _check_encoder_causal(model)
    _check_decoder_causal(model)


@pytest.mark.parametrize("ffn", ["conv", "mlp"])
def test_block_causal_mask_and_attention(ffn):
    mask = block_causal_mask(3, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    torch.manual_seed(0)
    stack = CausalAttentionStack(48, blocks=2, heads=8, norm=functools.partial(make_norm, "pixel"), ffn=ffn,
                                 mlp_ratio=2.0)
    x = torch.randn(2, 48, 4, 3, 2)
    with torch.no_grad():
        base = stack(x)
        changed = x.clone()
        changed[:, :, 2, 1, 1] += 1.0  # one token of frame 2
        out = stack(changed)
    torch.testing.assert_close(out[:, :, :2], base[:, :, :2], rtol=0, atol=1e-6)
    assert (out[:, :, 2:] - base[:, :, 2:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4  # frames 2 and 3 see it
    # every token of a frame sees the whole frame (global spatial receptive field)
    assert (out[:, :, 2, 0, 0] - base[:, :, 2, 0, 0]).abs().max() > 1e-4


def test_attention_backends_agree():
    model = _model("h3ae-8x32x32-debug")
    video = _clip(model, groups=2)
    with torch.no_grad():
        ref = model.decode(model.encode(video))
        for backend in ("math", "flex"):  # flex runs eagerly on CPU (torch warns it is unfused)
            set_attention_backend(model, backend)
            torch.testing.assert_close(model.decode(model.encode(video)), ref, rtol=1e-4, atol=1e-4)
    set_attention_backend(model, "sdpa")


# ------------------------------------------------------------------------------------------
# Ablation options
# ------------------------------------------------------------------------------------------
OLD_READING = dict(shuffle_kernel=3, latent_kernel=3, decoder_extra_blocks=0, attn_ffn="mlp")


@pytest.mark.parametrize("overrides", [dict(norm="group"), dict(norm="layer"), dict(upsample="interpolate"),
                                       dict(spatial_3d=True), OLD_READING])
def test_ablation_variants_are_causal(overrides):
    model = _model("h3ae-8x32x32-debug", **overrides)
    video = _clip(model, groups=1, batch=2)
    with torch.no_grad():
        assert model.decode(model.encode(video)).shape == video.shape
    _check_encoder_causal(model, size=2)  # GroupNorm needs more than one pixel per frame to pass signal
    _check_decoder_causal(model)


def test_pixel_norm_has_no_parameters_and_normalises_channels():
    x = torch.randn(2, 8, 3, 4, 4) * 5
    y = PixelNorm()(x)
    torch.testing.assert_close(y.pow(2).mean(1), torch.ones(2, 3, 4, 4), rtol=1e-4, atol=1e-4)
    n = {k: _model("h3ae-4x16x16-debug", norm=k).num_parameters() for k in ("pixel", "group", "layer")}
    assert n["pixel"] < n["group"] == n["layer"]
    assert not list(make_norm("pixel", 8).parameters())


# ------------------------------------------------------------------------------------------
# Sliced inference
# ------------------------------------------------------------------------------------------
def test_sliced_equals_unsliced():
    model = _model("h3ae-4x16x16-debug")
    video = _video(9, 32, 32, batch=2)
    cond = Cond(first_frame=video[:, :, :1])
    with torch.no_grad():
        latent = model.encode(video)
        plain, i2v = model.decode(latent), model.decode(latent, cond)
        for chunk in (1, 4):
            model.set_frame_chunk(chunk)
            torch.testing.assert_close(model.encode(video)["z"], latent["z"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.decode(latent), plain, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.decode(latent, cond), i2v, rtol=1e-5, atol=1e-5)
    model.set_frame_chunk(None)
    with pytest.raises(ValueError, match="2D spatial stage"):
        _model("h3ae-4x16x16-debug", spatial_3d=True).set_frame_chunk(2)
    with pytest.raises(ValueError, match=">= 1"):
        model.set_frame_chunk(0)


# ------------------------------------------------------------------------------------------
# Omni objective (Eq. 1)
# ------------------------------------------------------------------------------------------
def test_first_frame_features_come_from_the_clips_own_encoder_pass():
    """The encoder is causal, so frame 0 of every column equals encoding the first frame alone:
    train_forward reuses them, decode(cond=first_frame) recomputes them."""
    model = _model("h3ae-8x32x32-debug")
    video = _clip(model, groups=2, batch=2)
    with torch.no_grad():
        _, feats = model.encoder(video)
        alone = model.first_frame_features(video[:, :, :1])
    assert len(feats) == len(alone) == len(model.config.widths)
    for a, b in zip(feats, alone):
        assert a.shape[2] == 1
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_train_forward_fuses_with_probability_p():
    model = _model("h3ae-4x16x16-debug", consistency="none").train()
    video = _video(5, 32, 32, batch=4)
    with torch.no_grad():
        z_gen = torch.Generator().manual_seed(7)
        out = model.train_forward(video, generator=z_gen)
        g = torch.Generator().manual_seed(7)
        posterior = model._encode(video, None)
        z = posterior.sample(g)["z"]
        use = torch.rand(4, generator=g) < model.config.omni_prob
        _, feats = model.encoder(video)
        torch.testing.assert_close(out.recon, model.decoder(z, feats, use), rtol=1e-5, atol=1e-5)
        plain, fused = model.decoder(z), model.decoder(z, feats)
    for b in range(4):  # each sample is either the plain or the fused decoding
        want = fused[b] if use[b] else plain[b]
        torch.testing.assert_close(out.recon[b], want, rtol=1e-5, atol=1e-5)
    assert (plain - fused).abs().max() > 1e-3
    never = _model("h3ae-4x16x16-debug", omni_prob=0.0, consistency="none").train()
    with torch.no_grad():
        torch.testing.assert_close(never.train_forward(video, generator=torch.Generator().manual_seed(7)).recon,
                                   plain, rtol=1e-5, atol=1e-5)


def test_one_set_of_weights_decodes_plain_and_with_first_frame():
    """A short omni-objective run (p = 0.5) lowers the reconstruction error of both decodings."""
    model = _model("h3ae-4x16x16-debug", consistency="none").train()
    t = torch.arange(5).view(1, 1, 5, 1, 1).float()
    x = torch.arange(32).view(1, 1, 1, 1, 32).float()
    video = torch.tanh(torch.sin((x + 3 * t) / 5) * 2).expand(2, 3, 5, 32, 32).clone()  # moving stripes
    video[1] = -video[1]
    cond = Cond(first_frame=video[:, :, :1])

    def errors() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            latent = model.encode(video)
            e = [float((model.decode(latent, c) - video).abs().mean()) for c in (None, cond)]
        model.train()
        return e[0], e[1]

    before = errors()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        out = model.train_forward(video, generator=g)
        loss = (out.recon - video).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = errors()
    assert after[0] < 0.6 * before[0] and after[1] < 0.6 * before[1], (before, after)


# ------------------------------------------------------------------------------------------
# Latent consistency loss (Eq. 3) and the pixel variant (App. E)
# ------------------------------------------------------------------------------------------
def test_gaussian_kl_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mp, mq, lp, lq = (torch.randn(3, 4, 2, 2, 2, generator=g) for _ in range(4))
    ref = kl_divergence(Normal(mp, (0.5 * lp).exp()), Normal(mq, (0.5 * lq).exp())).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mp, lp, mq, lq), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gaussian_kl(mp, lp, mp, lp), torch.zeros(3))


def test_latent_consistency_zero_for_identical_posteriors_positive_otherwise():
    model = _model("h3ae-8x32x32-debug")
    video = _clip(model, groups=1, batch=2)
    with torch.no_grad():
        posterior = model._encode(video, None)
        same = float(model.latent_consistency_loss(posterior, video))
        other = float(model.latent_consistency_loss(posterior, video + 0.3 * torch.randn_like(video)))
        assert abs(same) < 1e-9 and other > 1e-6, (same, other)
        assert float(model.pixel_consistency_loss(video)) > 0


@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_consistency_gradients_reach_the_reconstruction_not_the_frozen_weights(kind):
    model = _model("h3ae-8x32x32-debug").train()
    video = _clip(model, groups=1)
    posterior = model._encode(video, None)
    recon = (video + 0.2 * torch.randn_like(video)).requires_grad_(True)
    loss = model.latent_consistency_loss(posterior, recon) if kind == "latent" else model.pixel_consistency_loss(recon)
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # frozen re-encoding, detached target


def test_consistency_term_in_train_forward_trains_the_decoder_only_through_the_reconstruction():
    model = _model("h3ae-8x32x32-debug", consistency_start=0, omni_prob=0.0).train()
    video = _clip(model, groups=1)
    out = model.train_forward(video, generator=torch.Generator().manual_seed(0))
    assert set(out.losses) == {"latent_consistency"} and float(out.losses["latent_consistency"].detach()) > 0
    # with the decoder's input cut, the term can only reach the decoder
    model.zero_grad()
    recon = model.decoder(out.posterior.sample(torch.Generator().manual_seed(0))["z"].detach())
    model.latent_consistency_loss(out.posterior, recon).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.decoder.parameters() if p.grad is not None) > 0


def test_consistency_switches_on_at_consistency_start():
    model = _model("h3ae-4x16x16-debug", consistency_start=2, consistency="pixel", consistency_weight=0.5).train()
    video = _video(5, 16, 16)
    keys = []
    for _ in range(4):
        with torch.no_grad():
            keys.append(sorted(model.train_forward(video).losses))
    assert keys == [[], [], ["pixel_consistency"], ["pixel_consistency"]]
    assert int(model.train_steps) == 4
    model.eval()
    with torch.no_grad():
        model.train_forward(video)
    assert int(model.train_steps) == 4  # only training-mode calls count
    assert "train_steps" in model.state_dict()


# ------------------------------------------------------------------------------------------
# Save / load, training, extraction
# ------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    model = _model("h3ae-8x64x64-debug", latent_channels=128, norm="layer")
    model.train_steps += 5
    model.save_pretrained(tmp_path / "ae", name="h3ae-8x64x64-debug")
    loaded = load_pretrained(tmp_path / "ae").eval()
    assert loaded.config == model.config and int(loaded.train_steps) == 5
    video = _clip(model, groups=1)
    cond = Cond(first_frame=video[:, :, :1])
    with torch.no_grad():
        latent = model.encode(video)
        torch.testing.assert_close(loaded.encode(video)["z"], latent["z"], rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(latent, cond), model.decode(latent, cond), rtol=0, atol=0)
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["family"] == "h3ae"


def test_one_train_step_lowers_the_loss():
    model = _model("h3ae-8x32x32-debug", consistency_start=0).train()
    video = _clip(model, groups=1, batch=2)

    def total() -> torch.Tensor:
        out = model.train_forward(video, generator=torch.Generator().manual_seed(0))
        return (out.recon - video).abs().mean() + sum(out.losses.values())

    before, after = one_step(model, total)
    assert after < before


def test_a_run_that_ends_before_the_consistency_start_is_warned(tmp_path, caplog):
    """A recipe shortened with --steps (80K -> 2) keeps consistency_start 70000 and lr_drop 70000:
    neither would ever apply, and the run says so before training (as it does for the debug twin)."""
    from data.synth import synth_dataset
    from launch.train_ae import TrainAEConfig, train_autoencoder

    model = build("h3ae-4x16x16-debug")  # consistency_start 150
    assert model.schedule_warnings(151) == []
    assert build("h3ae-4x16x16-debug", consistency="none").schedule_warnings(5) == []
    model.train_steps += 140  # an --init model that has trained 140 steps: 10 to go before the loss
    assert model.schedule_warnings(11) == []
    (message,) = model.schedule_warnings(10)
    assert "starts after 150 training steps" in message and "consistency_start=149" in message
    synth_dataset(tmp_path / "clips", num=2, frames=5, size=32, fps=8, seed=0)
    with caplog.at_level("WARNING", logger="ldm.train_ae"):
        train_autoencoder(TrainAEConfig(data=str(tmp_path / "clips"), output=str(tmp_path / "run"),
                                        autoencoder="h3ae-4x16x16-debug", frames=5, height=32, width=32, steps=2,
                                        lr_drop=((70000, 1e-5),), num_workers=0, progress=False,
                                        latent_stats_clips=2))
    assert "lr_drop at step(s) [70000]: after the run's last step 2" in caplog.text
    assert "starts after 150 training steps (consistency_start) and this run ends after 2" in caplog.text


def test_trains_with_train_autoencoder_and_extracts(tmp_path):
    from data.manifest import load_manifest
    from data.synth import synth_dataset
    from launch.extract import ExtractConfig, extract
    from launch.train_ae import TrainAEConfig, train_autoencoder

    clips = tmp_path / "clips"
    synth_dataset(clips, num=4, frames=8, size=32, fps=8, seed=0)
    out = tmp_path / "run"
    summary = train_autoencoder(TrainAEConfig(
        data=str(clips), output=str(out), autoencoder="h3ae-4x16x16-debug",
        ae_config=("consistency_start=20",), frames=5, height=32, width=32, batch_size=2, lr=2e-3, steps=30,
        log_every=1, save_every=30, sample_every=30, num_workers=0, progress=False, latent_stats_clips=4))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["rec"] for r in log]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert all("latent_consistency" not in r for r in log[:20]) and all("latent_consistency" in r for r in log[20:])
    assert load_pretrained(summary["final"]).train_steps == 30

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract(ExtractConfig(autoencoder=None, checkpoint=summary["final"], input=str(clips),
                                       output=str(tmp_path / "latents"), frames=5, height=32, width=32,
                                       shard_size=2, batch_size=2, verify=1, device="cpu"))
    assert result["written"] == 4 and result["verify_psnr"] > 5
    manifest = load_manifest(tmp_path / "latents")
    assert manifest.autoencoder.family == "h3ae" and manifest.latent_spec["latent_shape"] == {"z": [256, 2, 2, 2]}
