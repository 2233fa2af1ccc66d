"""Hi-VAE (tiny -debug configs, 8 frames, 32x32, CPU): shapes and the paper's compression rate,
frequency split, masking, single-motion decoding, two-stage freezing, save/load, a training step
lowers the loss, the AE trainer runs both stages, cost accounting, and the motion generator
(extract -> `ldm train` -> `generate`) with class and text conditioning."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dit
from autoencoders import REGISTRY, build, describe, load_pretrained
from autoencoders.blocks import latent_kl
from autoencoders.hivae import (HiVAE, build_hivae, frequency_split, gaussian_blur, lowpass_mask, motion_kl,
                                random_keep)
from ldm import config as cfglib
from ldm import samplers
from ldm.latent import Cond, Latent, normalize

NAMES = ("hivae-s", "hivae", "hivae-l")
ROOT = Path(__file__).resolve().parents[1]


def _model(name: str = "hivae-s-debug", **overrides) -> HiVAE:
    torch.manual_seed(0)
    return build(name, **overrides).eval()


def _video(frames: int = 8, size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1


def _moving_square(batch: int = 2, frames: int = 8, size: int = 32) -> torch.Tensor:
    """A learnable clip: a bright square moving right on a dark background."""
    v = torch.full((batch, 3, frames, size, size), -0.8)
    for b in range(batch):
        for t in range(frames):
            x = 2 + 2 * t + 3 * b
            v[b, :, t, 8:18, x:x + 10] = 0.8
    return v


def _wake(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give zero-initialised (adaLN-Zero) weights, and ones that have barely moved from zero in a few
    training steps, random values, so an untrained network's output depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() < 1e-3:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------------------------------
# configs, shapes, compression
# ------------------------------------------------------------------------------------------
def test_paper_compression_rates():
    s = describe("hivae-s", 16, 256, 256)
    assert s["latent_shape"] == {"content": [4, 1, 32, 32], "global": [8, 8, 4], "detailed": [16, 16, 8]}
    assert s["motion_elements"] == 2304 and math.prod(s["input_shape"]) == 3_145_728
    assert s["motion_compression_rate"] == 2304 / 3_145_728  # the paper's 0.07 %
    assert s["compression_rate"] == (2304 + 4096) / 3_145_728  # with the content latent our generator models
    assert describe("hivae", 16, 256, 256)["motion_elements"] == 8 * 8 * 8 + 16 * 16 * 16  # 0.14 %
    assert describe("hivae-l", 16, 256, 256)["motion_elements"] == 8 * 8 * 8 + 16 * 16 * 32  # 0.27 %


@pytest.mark.parametrize("name", NAMES)
def test_debug_twin_has_the_same_latent(name):
    full, debug = describe(name, 16, 256, 256), describe(name + "-debug", 16, 256, 256)
    assert full["latent_shape"] == debug["latent_shape"]
    assert full["motion_compression_rate"] == debug["motion_compression_rate"]


def test_paper_size_configs_build_on_meta_with_paper_parameter_counts():
    cls, cfg = REGISTRY["hivae"]
    with torch.device("meta"):
        model = cls(cfg)
    cost = model.cost(16, 256, 256)
    assert 600e6 < cost["params"]["decoder"] < 700e6  # App. A.1: 640 M
    assert 20e6 < cost["params"]["detailed"] < 30e6  # App. A.1: ~25 M per motion module
    assert cost["flops"]["decoder_passes"] == 40  # 20 Euler steps x (cond + null) for CFG
    assert cost["flops"]["decode"] == 40 * cost["flops"]["decoder_forward"] + cost["flops"]["base_decode"]
    assert cost["tokens"]["decoder"] == 16 * (16 * 16 + 16)  # frames x (patches + detailed tokens)


def test_shapes_match_latent_spec():
    model = _model()
    video = _video()
    spec = model.latent_spec(8, 32, 32)
    latent = model.encode(video)
    assert latent.form == "tokens" and latent.shapes() == spec.parts
    assert set(latent.logvar) == {"content", "global", "detailed"}
    assert spec.parts == {"content": (4, 1, 4, 4), "global": (4, 8, 4), "detailed": (8, 16, 8)}
    with torch.no_grad():
        assert model.decode(latent, steps=2).shape == video.shape
    odd = model.encode(_video(frames=5, size=16, batch=1))  # any length: f_g = ceil(T / 2)
    assert odd.shapes() == model.latent_spec(5, 16, 16).parts and odd["global"].shape[1] == 3


def test_encode_is_deterministic_and_content_is_the_first_frame():
    model = _model()
    video = _video()
    a, b = model.encode(video), model.encode(video)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    torch.testing.assert_close(a["content"], model.base.encode(video[:, :, :1])["z"])
    torch.testing.assert_close(model.encode_content(video[:, :, 0]), a["content"])


def test_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="multiples of 16"):
        model.latent_spec(8, 40, 40)  # 5x5 latent, global patch 2
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(_video(size=30))
    lat = model.encode(_video())
    with pytest.raises(ValueError, match="detailed must be"):
        model.decode(lat.replace({**lat.parts, "detailed": lat["detailed"][:, :, :3]}))
    with pytest.raises(ValueError, match="global must be"):
        model.decode(lat.replace({**lat.parts, "global": lat["global"][:, :2]}))
    with pytest.raises(ValueError, match="tokens latent"):
        model.decode(Latent({"z": torch.zeros(1, 4, 8, 4, 4)}))
    with pytest.raises(ValueError, match="motion must be"):
        model.decode(lat, motion="fast")
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        build("hivae-s-debug", stage=3)
    with pytest.raises(ValueError, match="unknown override"):
        build("hivae-s-debug", gloabl_tokens=4)
    with pytest.raises(ValueError, match="without --gan"):
        model.last_layer()
    with pytest.raises(ValueError, match="kl_free_bits"):
        build("hivae-s-debug", kl_free_bits=-0.1)


# ------------------------------------------------------------------------------------------
# frequency split, masking, blur
# ------------------------------------------------------------------------------------------
def test_low_and_high_pass_reconstruct_the_input():
    z = torch.randn(2, 4, 8, 6, 10, dtype=torch.float64)
    low, high = frequency_split(z, 0.6, 0.6)
    torch.testing.assert_close(low + high, z)
    mask = lowpass_mask(8, 6, 10, 0.6, 0.6)
    assert mask.shape == (8, 6, 6) and mask[0, 0, 0] == 1 and mask.max() == 1
    # DC passes the low-pass untouched; the highest frequency is attenuated by exp(-0.5 * 3 / 0.36)
    const = torch.full((1, 1, 8, 6, 10), 3.0)
    torch.testing.assert_close(frequency_split(const, 0.6, 0.6)[0], const)
    t, y, x = torch.meshgrid(torch.arange(8), torch.arange(6), torch.arange(10), indexing="ij")
    checker = ((-1.0) ** (t + y + x))[None, None]
    low, high = frequency_split(checker, 0.6, 0.6)
    torch.testing.assert_close(low, checker * math.exp(-0.5 * 3 / 0.36))
    assert high.abs().mean() > low.abs().mean()


def test_random_spatial_mask_keeps_30_to_50_percent_out():
    g = torch.Generator().manual_seed(0)
    counts = set()
    for _ in range(50):
        keep = random_keep(3, 16, (0.3, 0.5), g, torch.device("cpu"))
        counts.add(keep.shape[1])
        assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)  # distinct positions
        assert (keep.diff(dim=1) > 0).all() and keep.max() < 16
    assert counts <= set(range(8, 12)) and len(counts) > 1  # 16 * (1 - [0.3, 0.5]) rounded


def test_global_module_sees_only_kept_positions():
    model = _model()
    z = torch.randn(1, 4, 8, 4, 4)
    keep = torch.tensor([[0, 3]])
    mean, _ = model.global_encoder(z, keep)
    z2 = z.clone()
    z2[..., 0:2, 2:4] += 5  # position 1 (row 0, col 1 of the 2x2 positions) is masked out
    torch.testing.assert_close(model.global_encoder(z2, keep)[0], mean)
    z2[..., 0:2, 0:2] += 5  # position 0 is kept
    assert not torch.allclose(model.global_encoder(z2, keep)[0], mean)


def test_gaussian_blur_keeps_constants_and_removes_detail():
    v = _video(batch=1)
    blurred = gaussian_blur(v, 1.0)
    torch.testing.assert_close(gaussian_blur(torch.full_like(v, 0.3), 1.0), torch.full_like(v, 0.3))
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * v.diff(dim=-1).abs().mean()
    assert gaussian_blur(v, 0.0) is v


# ------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------
def test_decode_with_only_global_or_only_detailed_motion():
    model = _model(stage=2)
    _wake(model.decoder)
    lat = model.encode(_video())
    with torch.no_grad():
        both = model.decode(lat, steps=3)
        again = model.decode(lat, steps=3)
        glob = model.decode(lat, steps=3, motion="global")
        det = model.decode(lat, steps=3, motion="detailed")
        other_seed = model.decode(lat, steps=3, seed=1)
    torch.testing.assert_close(both, again)  # seeded noise: decode is deterministic
    for v in (glob, det):
        assert v.shape == both.shape and torch.isfinite(v).all()
        assert not torch.allclose(v, both)
    assert not torch.allclose(glob, det) and not torch.allclose(both, other_seed)


def test_decoder_uses_each_motion_and_ignores_dropped_ones():
    model = _model(stage=2)
    _wake(model.decoder)
    lat = model.encode(_video())
    cond, null = model.motion_condition(lat, "both")
    x = {"z": torch.randn(2, 4, 8, 4, 4)}
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        v = model.decoder(x, t, cond)["z"]
        for part in ("global", "detailed"):
            moved = {**cond, part: cond[part] + 1.0}
            assert not torch.allclose(model.decoder(x, t, moved)["z"], v)
            dropped = {**null, part: cond[part] + 1.0}  # a dropped motion has no influence
            torch.testing.assert_close(model.decoder(x, t, dropped)["z"], model.decoder(x, t, null)["z"])
        # the Temporal Align Block mixes frames: perturbing frame 0 changes frame 5's velocity
        x2 = {"z": x["z"].clone()}
        x2["z"][:, :, 0] += 1.0
        assert not torch.allclose(model.decoder(x2, t, cond)["z"][:, :, 5], v[:, :, 5])


def test_stage1_decodes_with_global_motion_by_default():
    model = _model()  # stage 1
    _wake(model.decoder)
    lat = model.encode(_video())
    with torch.no_grad():
        torch.testing.assert_close(model.decode(lat, steps=2), model.decode(lat, steps=2, motion="global"))


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def test_train_forward_terms():
    model = _model().train()
    video = _video()
    out = model.train_forward(video, None, torch.Generator().manual_seed(0))
    assert set(out.losses) == {"flow", "kl_motion"} and out.recon.shape == video.shape
    assert not out.recon.requires_grad and out.losses["flow"].requires_grad
    assert set(out.posterior.parts) == {"content", "global"} and set(out.posterior.logvar) == {"global"}
    g = out.posterior
    kl = 0.5 * (g["global"] ** 2 + g.logvar["global"].exp() - 1 - g.logvar["global"]).flatten(1).sum(1).mean()
    torch.testing.assert_close(out.losses["kl_motion"], model.config.kl_weight * kl)
    assert REGISTRY["hivae-s"][1].kl_weight == 1e-3  # the paper's weight on the paper configs
    model.set_stage(2)
    out = model.train_forward(video, None, torch.Generator().manual_seed(0))
    assert set(out.posterior.logvar) == {"global", "detailed"}


def test_free_bits_kl_spares_elements_below_the_threshold():
    mu = torch.tensor([[[0.0, 2.0]], [[0.0, 2.0]]], requires_grad=True)  # (B=2, 1, 2): KL 0 and 2 nats
    logvar = torch.zeros(2, 1, 2, requires_grad=True)
    post = Latent({"content": torch.zeros(2, 4, 1, 2, 2), "global": mu}, form="tokens", logvar={"global": logvar})
    torch.testing.assert_close(motion_kl(post), latent_kl(post).mean())  # no free bits: the plain KL
    kl = motion_kl(post, free_bits=0.5)
    torch.testing.assert_close(kl, torch.tensor(0.5 + 2.0))  # max(0, 0.5) + max(2, 0.5)
    kl.backward()
    assert mu.grad[:, 0, 0].abs().max() == 0 and logvar.grad[:, 0, 0].abs().max() == 0  # below: no pull to the prior
    torch.testing.assert_close(mu.grad[:, 0, 1], torch.tensor([1.0, 1.0]))  # above: d/dmu of mu^2 / 2, batch mean


def test_posterior_init_logvar_starts_the_motion_posteriors_narrow():
    video = _video()
    for init in (0.0, -4.0):
        with torch.no_grad():
            lat = _model(posterior_init_logvar=init).encode(video)
        for part in ("global", "detailed"):
            assert abs(float(lat.logvar[part].mean()) - init) < 1.0, (part, init)


@pytest.mark.parametrize("free_bits", [0.0, 10.0])
@pytest.mark.parametrize("stage,part", [(1, "global"), (2, "detailed")])
def test_tiny_kl_weight_still_collapses_an_ignored_posterior_under_adam_unless_free_bits(stage, part, free_bits):
    """Why the debug twins use free bits: when the decoder ignores the motion (early training), the KL
    is the only consistent gradient on the posterior, and Adam's normalised steps make its weight
    irrelevant: even 1e-4 widens a narrow posterior back towards the prior within steps. Below the
    free-bits threshold the KL has no gradient and the posterior stays as it is."""
    model = _model(stage=stage, kl_weight=1e-4, posterior_init_logvar=-4.0, kl_free_bits=free_bits).train()
    video = _moving_square()
    with torch.no_grad():
        before = model.encode(video).logvar[part].mean()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(6):  # the KL term alone: a decoder that ignores the motion adds no gradient here
        out = model.train_forward(video, None, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.losses["kl_motion"].backward()
        opt.step()
    with torch.no_grad():
        rise = float(model.encode(video).logvar[part].mean() - before)
    if free_bits:
        assert abs(rise) < 1e-3, rise
    else:
        assert rise > 0.5, rise


def _flow_loss(model: HiVAE, video: torch.Tensor, seeds=range(4)) -> float:
    total = 0.0
    for s in seeds:
        total += float(model.train_forward(video, None, torch.Generator().manual_seed(s)).losses["flow"])
    return total / len(seeds)


@pytest.mark.parametrize("stage", [1, 2])
def test_training_steps_lower_the_loss_and_stage_freezing(stage):
    model = _model(stage=stage, cond_dropout=0.0, part_dropout=0.0).train()
    video = _moving_square()
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    with torch.no_grad():
        before = _flow_loss(model, video)
    for step in range(12):
        out = model.train_forward(video, None, torch.Generator().manual_seed(100 + step))
        loss = out.losses["flow"] + out.losses["kl_motion"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _flow_loss(model, video)
    assert after < 0.9 * before, (before, after)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before_params[n])}
    assert not any(n.startswith("base.") for n in changed)  # the base VAE is frozen
    if stage == 1:
        assert any(n.startswith("global_encoder.") for n in changed)
        assert not any(n.startswith("detailed_encoder.") or n.startswith("decoder.detailed_in") for n in changed)
    else:  # global frozen, detailed trained
        assert not any(n.startswith("global_encoder.") for n in changed)
        assert any(n.startswith("detailed_encoder.") for n in changed)
    assert any(n.startswith("decoder.") for n in changed)
    assert not model.base.training  # stays in eval mode


def test_save_load_round_trip(tmp_path):
    model = _model(stage=2)
    _wake(model.decoder)
    model.save_pretrained(tmp_path / "m", name="hivae-s-debug")
    loaded = load_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, HiVAE) and loaded.config == model.config and loaded.config.stage == 2
    video = _video()
    a, b = model.encode(video), loaded.encode(video)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with torch.no_grad():
        torch.testing.assert_close(model.decode(a, steps=2), loaded.decode(b, steps=2))
    assert not any(p.requires_grad for p in loaded.global_encoder.parameters())


def test_base_checkpoint_and_stage_init_folders(tmp_path):
    torch.manual_seed(3)
    base = build("kl2d-f8c4-debug", latent_scale=(0.5,))
    base.save_pretrained(tmp_path / "base", name="kl2d-f8c4-debug")
    model = build_hivae("hivae-s-debug", base_checkpoint=tmp_path / "base")
    assert model.config.base.latent_scale == (0.5,)
    for (n, p), q in zip(model.base.state_dict().items(), base.state_dict().values()):
        torch.testing.assert_close(p, q, msg=n)
    video = _video()
    torch.testing.assert_close(model.encode(video)["content"], base.encode(video[:, :, :1])["z"])
    build("kl2d-f8c16-debug").save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="does not match"):
        build_hivae("hivae-s-debug", base_checkpoint=tmp_path / "wrong")
    with pytest.raises(KeyError, match="not a registered Hi-VAE"):
        build_hivae("kl2d-f8c4-debug")
    # stage 1 with the base, saved -> loaded and switched to stage 2 (train-ae's --init DIR --stage 2)
    build_hivae("hivae-s-debug", base_checkpoint=tmp_path / "base").save_pretrained(tmp_path / "s1", "hivae-s-debug")
    s1, s2 = load_pretrained(tmp_path / "s1"), load_pretrained(tmp_path / "s1").with_stage(2)
    assert (s1.config.stage, s2.config.stage) == (1, 2) and s2.config.base.latent_scale == (0.5,)
    for (n, p), q in zip(s1.state_dict().items(), s2.state_dict().values()):
        torch.testing.assert_close(p, q, msg=n)


def test_convert_into_hivae_points_to_base_checkpoint(tmp_path):
    """``ldm convert`` into Hi-VAE from its base's family (a saved kl2d, an SD VAE folder) says the kl2d
    is the frozen base of ``train-ae --base-checkpoint`` (was: "no initialiser", "fills 'kl2d'")."""
    from autoencoders.sources import convert, convert_saved
    from ldm.errors import UserError

    build("kl2d-f8c4-debug").save_pretrained(tmp_path / "kl", name="kl2d-f8c4-debug")
    with pytest.raises(UserError, match="hivae is not converted from a kl2d: .* give this folder as it is to `ldm "
                                        "train-ae --autoencoder hivae-s-debug --base-checkpoint DIR --stage 1`"):
        convert_saved(tmp_path / "kl", "hivae-s-debug")
    with pytest.raises(UserError, match="convert to --target kl2d and give that folder to `ldm train-ae "
                                        "--autoencoder hivae --base-checkpoint"):
        convert("diffusers:AutoencoderKL", tmp_path, "hivae")  # the family is refused before the folder is read


def test_ae_trainer_runs_both_stages(tmp_path):
    from data.synth import synth_dataset
    from launch.train_ae import TrainAEConfig, train_autoencoder

    synth_dataset(tmp_path / "videos", num=4, frames=8, size=32, fps=8, seed=0)
    common = dict(data=str(tmp_path / "videos"), frames=8, height=32, width=32, batch_size=2, steps=2,
                  kl_weight=0.0, log_every=1, save_every=2, sample_every=2, num_workers=0, latent_stats_clips=2,
                  progress=False)
    s1 = train_autoencoder(TrainAEConfig(output=str(tmp_path / "s1"), autoencoder="hivae-s-debug", **common))
    assert s1["last_loss"] is not None and (tmp_path / "s1" / "samples" / "step-00000002.png").exists()
    # the logged loss is Eq. 11 (velocity MSE + weighted motion KL): the detached one-step L1 `rec` is
    # logged beside it, outside the total
    for line in (tmp_path / "s1" / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            assert row["rec"] > 0.01 and row["loss"] == pytest.approx(row["flow"] + row["kl_motion"], rel=1e-5)
    s2 = train_autoencoder(TrainAEConfig(output=str(tmp_path / "s2"), init=s1["final"], stage=2, **common))
    one, two = load_pretrained(s1["final"]), load_pretrained(s2["final"])
    assert two.config.stage == 2
    for (n, p), q in zip(one.global_encoder.state_dict().items(), two.global_encoder.state_dict().values()):
        torch.testing.assert_close(p, q, msg=n)  # stage 2 leaves the global module unchanged
    assert not torch.equal(one.detailed_encoder.out.weight, two.detailed_encoder.out.weight)


# ------------------------------------------------------------------------------------------
# cost
# ------------------------------------------------------------------------------------------
def test_cost_matches_counted_flops():
    """The analytic transformer FLOPs equal torch's count of every weight multiply (CPU attention
    kernels are not counted by FlopCounterMode, so the comparison is on the linear part)."""
    model = _model(stage=2)
    cost = model.cost(8, 32, 32)
    video = _video(batch=1)
    z = model.base.encode(video)["z"]
    low, high = frequency_split(z, 0.6, 0.6)
    with FlopCounterMode(display=False) as fc:
        model.global_encoder(low)
    assert fc.get_total_flops() == cost["detail"]["global"]["linear"]
    with FlopCounterMode(display=False) as fc:
        model.detailed_encoder(high)
    assert fc.get_total_flops() == cost["detail"]["detailed"]["linear"]
    lat = model.encode(video)
    cond, _ = model.motion_condition(lat)
    with FlopCounterMode(display=False) as fc:
        model.decoder({"z": z}, torch.tensor([0.3]), cond)
    assert fc.get_total_flops() == cost["detail"]["decoder"]["linear"]
    with FlopCounterMode(display=False) as fc:
        model.base.decode(model.base.encode(video))
    assert fc.get_total_flops() == cost["flops"]["base_encode"] + cost["flops"]["base_decode"]


def test_ldm_cost_counts_the_diffusion_decoder_like_the_analytic_cost():
    from launch.cost import decode_flops

    model = _model()
    spec = model.latent_spec(8, 32, 32)
    assert decode_flops("hivae-s-debug", spec) == model.cost(8, 32, 32)["flops"]["decode"]


# ------------------------------------------------------------------------------------------
# the motion generator: the generic DiT on Hi-VAE token-set latents
# ------------------------------------------------------------------------------------------
def test_dit_on_hivae_latents_uses_class_text_and_first_frame():
    model = _model()
    spec = model.latent_spec(8, 32, 32)
    torch.manual_seed(0)
    net = dit.build("dit-debug", spec, num_classes=5, text_dim=16, first_frame_channels=4)
    _wake(net)
    lat = model.encode(_video())
    t = torch.full((2,), 0.4)
    text = torch.randn(2, 3, 16)
    cond = Cond(text=text, text_mask=torch.ones(2, 3, dtype=torch.bool), class_id=torch.tensor([1, 2]))
    with torch.no_grad():
        v = net(lat, t, cond)
        assert {k: tuple(x.shape) for k, x in v.items()} == {k: tuple(x.shape) for k, x in lat.items()}
        other_class = net(lat, t, Cond(text=cond.text, text_mask=cond.text_mask, class_id=torch.tensor([3, 4])))
        other_text = net(lat, t, Cond(text=text + 1, text_mask=cond.text_mask, class_id=cond.class_id))
        null = net(lat, t, net.null_cond(cond))
        for part in ("global", "detailed", "content"):
            for w in (other_class, other_text, null):
                assert not torch.allclose(w[part], v[part])
        # image-to-video: the given first frame's content latent as clean conditioning tokens
        i2v = net(lat, t, Cond(class_id=cond.class_id, first_frame=model.encode_content(_video()[:, :, 0])))
        assert i2v["content"].shape == lat["content"].shape and not torch.allclose(i2v["detailed"], v["detailed"])


@pytest.fixture(scope="module")
def hivae_latents(tmp_path_factory):
    from data.synth import synth_dataset
    from launch.cli import main as ldm

    base = tmp_path_factory.mktemp("hivae")
    synth_dataset(base / "videos", num=6, frames=8, size=32, fps=8, seed=0)
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["extract", "--autoencoder", "hivae-s-debug", "--input", str(base / "videos"), "--output",
             str(base / "lat"), "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "3",
             "--text-encoder", "builtin"])
    return base / "lat"


def test_motion_generator_extract_train_generate(hivae_latents, tmp_path):
    from data.manifest import load_manifest
    from launch.cli import main as ldm
    from autoencoders import resolve_record
    from dit import load_export
    from launch.sample import generate
    from launch.train import TrainConfig, train
    from ldm.samplers import SamplingConfig
    from ldm.text import build_text_encoder

    manifest = load_manifest(hivae_latents)
    assert manifest.form == "tokens" and manifest.counts.written == 6
    assert manifest.latent_spec["latent_shape"] == {"content": [4, 1, 4, 4], "global": [4, 8, 4],
                                                       "detailed": [8, 16, 8]}
    assert set(manifest.stats) == {"content", "global", "detailed"}
    assert len(manifest.stats["global"]["std"]) == 4 and len(manifest.stats["detailed"]["std"]) == 8
    cfg = cfglib.load_yaml(ROOT / "launch" / "configs" / "train-hivae-debug.yaml", TrainConfig,
                           [f"data.shards={hivae_latents}", f"output={tmp_path / 'gen'}", "data.batch_size=2",
                            "data.shuffle=4", "steps=3", "save_every=3", "log_every=1", "optim.warmup_steps=1"])
    run = train(cfg)
    assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
    net, context = load_export(tmp_path / "gen")
    assert net.config.num_classes == manifest.num_classes > 0 and net.config.text_dim > 0
    assert {s.name: s.kind for s in net.specs} == {"content": "grid", "global": "set", "detailed": "set"}
    with pytest.warns(UserWarning, match="RANDOM"):  # the fixture extracted with seeded random weights
        ae = resolve_record(context.autoencoder).model.eval()
    assert isinstance(ae, HiVAE)
    encoder = build_text_encoder(context.text_encoder)
    videos = generate(net, ae, context.latent_norm, prompts=["a red circle moving left", "a blue square"],
                      class_ids=[0, 1], frames=8, height=32, width=32, sampling=SamplingConfig(steps=2, guidance=5.0),
                      text_encoder=encoder, progress=False)
    assert videos.shape == (2, 3, 8, 32, 32) and torch.isfinite(videos).all()

    # image-to-video: the generator keeps the given first frame's content latent, samples the motion
    frame = _moving_square(batch=2)[:, :, 0]
    stats = context.latent_norm
    given = normalize(Latent({"content": ae.encode_content(frame)}, "tokens"), stats)["content"]
    spec = ae.latent_spec(8, 32, 32)
    x = Latent(samplers.initial_noise(spec.parts, 2, seed=0), "tokens")
    cond = Cond(class_id=torch.tensor([0, 1]))
    _wake(net)  # a 3-step EMA export is still ~zero-initialised
    with torch.no_grad():
        out = samplers.euler(samplers.known_part_velocity(net, "content", given, x["content"]), x, cond, steps=3,
                             guidance_scale=5.0, null_cond=net.null_cond(cond))
        torch.testing.assert_close(out["content"], given, atol=1e-5, rtol=1e-5)
        free = samplers.euler(net, x, cond, steps=3, guidance_scale=5.0, null_cond=net.null_cond(cond))
        assert not torch.allclose(out["detailed"], free["detailed"])  # the motion depends on the given frame
        video = ae.decode(normalize(out, stats, inverse=True), steps=2)
    assert video.shape == (2, 3, 8, 32, 32)

    # the CLI: prompts -> MP4 + GIF through the Hi-VAE's diffusion decoder
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["sample", "--checkpoint", str(tmp_path / "gen"), "--prompt", "a red circle moving left", "--steps", "2",
             "--guidance", "5", "--output", str(tmp_path / "s")])
    assert (tmp_path / "s" / "0000.mp4").stat().st_size > 0 and (tmp_path / "s" / "0000.gif").exists()
