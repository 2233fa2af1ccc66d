"""Cross-modal video VAE (autoencoders/crossmodal.py): shapes in video and image mode, image mode
never touching a temporal parameter, zero-initialised temporal and text paths, text required at
decode time, save/load, training steps, `train_autoencoder` with text + joint image-video batches +
a 3D GAN after warm-up, extraction with text, and the DiT sampling path. Tiny debug configs, CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from einops import rearrange

from aes import one_step
from autoencoders import REGISTRY, build, describe, load_pretrained
from autoencoders.crossmodal import CrossModalVAE, PatchCrossAttention, TemporalConv, TemporalSelfAttention
from autoencoders.losses import AELoss, AELossConfig
from ldm.errors import UserError
from ldm.latent import Cond
from ldm.text import build_text_encoder
from procs import process_env

T, S = 8, 32  # debug clips: 8 frames (2 latent frames), 32x32 (4x4 latent)
PAPER = ("cmvae-z4", "cmvae-z16", "cmvae-z4-text", "cmvae-z16-text", "cmvae-z4-simultaneous",
         "cmvae-z4-sequential")
DEBUG = [n + "-debug" for n in PAPER]


def _model(name: str, **overrides) -> CrossModalVAE:
    torch.manual_seed(0)
    return build(name, **overrides).eval()


def _video(frames: int = T, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, S, S, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def text_encoder():
    return build_text_encoder("builtin")


def _cond(encoder, prompts: list[str]) -> Cond:
    emb, mask = encoder.encode(prompts)
    return Cond(text=emb, text_mask=mask)


def _perturb(model: torch.nn.Module, kind: type, std: float = 0.05) -> None:
    """Give every zero-initialised output projection of ``kind`` modules random weights (as
    training would)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, kind):
                w = m.conv.weight if kind is TemporalConv else m.proj.weight if kind is TemporalSelfAttention \
                    else m.attn.proj.weight
                w.copy_(torch.randn(w.shape, generator=g) * std)


# ------------------------------------------------------------------------------------------
# Registry, paper-size shapes and costs
# ------------------------------------------------------------------------------------------
def test_registry_names_and_debug_twins():
    for name in PAPER:
        assert name in REGISTRY and name + "-debug" in REGISTRY
        full, debug = describe(name, 16, 256, 256), describe(name + "-debug", 16, 256, 256)
        assert full["latent_shape"]["z"] == debug["latent_shape"]["z"]
        assert full["vcpr"] == debug["vcpr"] == 256.0  # 4x8x8
        c = 16 if "z16" in name else 4
        assert full["latent_shape"]["z"] == [c, 4, 32, 32]
    assert REGISTRY["cmvae-z4-text"][1].text_dim == 1024  # Flan-T5-large
    assert REGISTRY["cmvae-z4-text-debug"][1].text_dim == build_text_encoder("builtin").dim


def test_paper_configs_run_on_meta_with_exact_shapes():
    """The paper-size models build and run encode/decode on the meta device (no memory): exact
    latent and output shapes, parameter counts in the expected range."""
    counts = {}
    for name in ("cmvae-z4", "cmvae-z16-text", "cmvae-z4-simultaneous", "cmvae-z4-sequential"):
        with torch.device("meta"):
            model = build(name).eval()
            cond = Cond(text=torch.empty(1, 100, 1024), text_mask=torch.ones(1, 100, dtype=torch.bool))
            with torch.no_grad():
                lat = model.encode(torch.empty(1, 3, 16, 128, 128), cond)
                out = model.decode(lat, cond)
                img = model.encode(torch.empty(1, 3, 1, 128, 128), cond)
        c = 16 if "z16" in name else 4
        assert tuple(lat["z"].shape) == (1, c, 4, 16, 16) and tuple(lat.logvar["z"].shape) == (1, c, 4, 16, 16)
        assert tuple(out.shape) == (1, 3, 16, 128, 128) and tuple(img["z"].shape) == (1, c, 1, 16, 16)
        counts[name] = model.num_parameters()
    assert 300e6 < counts["cmvae-z4"] < 400e6
    assert counts["cmvae-z16-text"] > counts["cmvae-z4"] + 50e6  # the text cross-attention layers
    assert counts["cmvae-z4-sequential"] < counts["cmvae-z4-simultaneous"] < counts["cmvae-z4"]


def test_sequential_first_stage_is_the_sd_vae():
    """Option 2's first stage has no temporal layer: the SD-VAE's parameter count exactly
    (diffusers AutoencoderKL with the SD config, both on the meta device)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        sd = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                     down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4)
        ours = build("cmvae-z4-sequential")
    spatial = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("temporal_ae."))
    assert spatial == sum(p.numel() for p in sd.parameters())
    assert {n.split(".")[0] for n, _ in ours.temporal_parameters()} == {"temporal_ae"}


# ------------------------------------------------------------------------------------------
# Shapes, image mode, bad inputs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DEBUG)
def test_shapes_video_and_image_mode(name, text_encoder):
    model = _model(name)
    c = model.config.latent_channels
    cond = _cond(text_encoder, ["a red circle moving left", "a blue square"]) if model.text_dim else None
    with torch.no_grad():
        for frames, t in ((T, 2), (1, 1), (12, 3)):
            x = _video(frames)
            lat = model.encode(x, cond)
            assert lat["z"].shape == (2, c, t, S // 8, S // 8) == (2, *model.latent_spec(frames, S, S).parts["z"])
            assert lat.logvar["z"].shape == lat["z"].shape
            assert model.decode(lat, cond).shape == x.shape
    for frames in (4, 6, 9):  # a video needs 4k frames with k >= 2; one frame is an image
        with pytest.raises(ValueError, match="multiple of 4"):
            model.latent_spec(frames, S, S)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(_video()[..., :20], cond)


def test_image_mode_touches_no_temporal_parameter(text_encoder):
    """A T = 1 batch runs the first stage alone: every temporal parameter (temporal convs and
    attention, the temporal AE and its text layers) gets no gradient, every other one does; a video
    batch reaches all of them."""
    model = _model("cmvae-z4-text-debug").train()
    temporal = dict(model.temporal_parameters())
    kinds = {next(s for s in n.split(".") if s.startswith("temporal")) for n in temporal}
    assert kinds == {"temporal1", "temporal2", "temporal_skip", "temporal_attn", "temporal_ae"}
    cond = _cond(text_encoder, ["a red circle", "a green star"])
    loss_fn = AELoss(AELossConfig())
    for frames in (1, T):
        model.zero_grad(set_to_none=True)
        x = _video(frames)
        out = model.train_forward(x, cond, torch.Generator().manual_seed(0))
        loss_fn.generator_loss(x, out, step=0)[0].backward()
        for n, p in model.named_parameters():
            if frames == 1 and n in temporal:
                assert p.grad is None, n
            else:
                assert p.grad is not None, n


def test_image_mode_is_the_frame_wise_first_stage():
    """Encoding the frames of a clip as images equals the spatial stage without temporal layers,
    frame by frame; and the innermost latent of an image is the first-stage posterior."""
    model = _model("cmvae-z4-debug")
    x = _video(1, batch=3)
    with torch.no_grad():
        lat = model.encode(x)
        mean, logvar = model.spatial_posterior(x, None, temporal=False)
        one = model.encode(x[1:2])
    assert torch.equal(lat["z"], mean) and torch.equal(lat.logvar["z"], logvar)
    torch.testing.assert_close(one["z"], lat["z"][1:2], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Zero-initialised temporal and text paths
# ------------------------------------------------------------------------------------------
def _image_gap(model: CrossModalVAE, x: torch.Tensor) -> tuple[float, float]:
    """Largest difference between the video-mode first stage and the image VAE applied frame by
    frame (encoder mean, decoder output)."""
    frames = rearrange(x, "b c t h w -> (b t) c 1 h w")  # (T, C, 1, H, W)
    with torch.no_grad():
        video_mean, _ = model.spatial_posterior(x, None, temporal=True)
        image_mean, _ = model.spatial_posterior(frames, None, temporal=False)
        video_out = model.spatial_decode(video_mean, None, temporal=True)
        image_out = model.spatial_decode(image_mean, None, temporal=False)
    enc = (video_mean - rearrange(image_mean, "(b t) c 1 h w -> b c t h w", b=1)).abs().max().item()
    dec = (video_out - rearrange(image_out, "(b t) c 1 h w -> b c t h w", b=1)).abs().max().item()
    return enc, dec


def test_fresh_temporal_layers_are_the_identity():
    """With zero-initialised temporal convs and temporal attention and per-frame norms
    (``norm="frame"``), the video-mode first stage of a fresh model IS the per-frame image VAE
    (encoder and decoder). Once those layers have weights (as after training) it is not, so the check
    can fail."""
    model = _model("cmvae-z4-debug", norm="frame")
    x = _video(T, batch=1)
    enc, dec = _image_gap(model, x)
    assert enc < 1e-5 and dec < 1e-5, (enc, dec)
    _perturb(model, TemporalConv)
    enc, dec = _image_gap(model, x)
    assert enc > 1e-3 and dec > 1e-3, (enc, dec)
    model = _model("cmvae-z4-debug", norm="frame")
    _perturb(model, TemporalSelfAttention, std=0.5)  # the temporal attention alone also breaks it
    assert min(_image_gap(model, x)) > 1e-4


def test_clip_norm_keeps_the_promise_on_static_clips_only():
    """The public code's clip-wise GroupNorm (the registered configs): a fresh model is the image VAE
    on a static clip (every frame the same statistics), not on a moving one."""
    model = _model("cmvae-z4-debug")
    still = _video(1, batch=1).expand(-1, -1, T, -1, -1).contiguous()
    assert max(_image_gap(model, still)) < 1e-5
    assert min(_image_gap(model, _video(T, batch=1))) > 1e-3


def test_text_path_starts_as_noop_then_changes_the_reconstruction(text_encoder):
    model = _model("cmvae-z4-text-debug")
    x = _video(T, batch=1)
    a, b = _cond(text_encoder, ["a red circle moving left"]), _cond(text_encoder, ["a blue triangle moving up"])
    with torch.no_grad():
        la, lb = model.encode(x, a), model.encode(x, b)
        assert torch.equal(la["z"], lb["z"])
        assert torch.equal(model.decode(la, a), model.decode(la, b))
        _perturb(model, PatchCrossAttention)
        la, lb = model.encode(x, a), model.encode(x, b)
        assert (la["z"] - lb["z"]).abs().max() > 1e-3
        ra, rb = model.decode(la, a), model.decode(la, b)
        assert (ra - rb).abs().max() > 1e-3
        # padding tokens are masked out: changing them changes nothing
        noisy = Cond(text=a.text + (~a.text_mask)[..., None] * torch.randn_like(a.text), text_mask=a.text_mask)
        torch.testing.assert_close(model.decode(la, noisy), ra)


def test_decode_requires_the_text_it_was_trained_with(text_encoder):
    model = _model("cmvae-z4-text-debug")
    x = _video(T, batch=2)
    cond = _cond(text_encoder, ["one", "two"])
    with torch.no_grad():
        lat = model.encode(x, cond)
        for bad, match in ((None, "text-guided"), (Cond(), "text-guided"),
                           (Cond(text=torch.zeros(2, 5, 1024)), r"\(B, L, 256\)"),
                           (Cond(text=torch.zeros(3, 5, 256)), "3 text embeddings for a batch of 2"),
                           (Cond(text=torch.zeros(2, 5, 256), text_mask=torch.ones(2, 5)), "text_mask must be bool")):
            with pytest.raises(ValueError, match=match):
                model.decode(lat, bad)
        with pytest.raises(ValueError, match="text-guided"):
            model.encode(x)
        # a model without text guidance ignores the text the DiT sampling path passes
        plain = _model("cmvae-z4-debug")
        lat = plain.encode(x)
        assert torch.equal(plain.decode(lat, cond), plain.decode(lat))


def test_save_load_round_trip(tmp_path, text_encoder):
    model = _model("cmvae-z4-text-debug")
    _perturb(model, PatchCrossAttention)
    _perturb(model, TemporalConv)
    model.save_pretrained(tmp_path / "ae", name="cmvae-z4-text-debug")
    loaded = load_pretrained(tmp_path / "ae").eval()
    assert loaded.config == model.config and isinstance(loaded, CrossModalVAE)
    x, cond = _video(T, batch=1), _cond(text_encoder, ["a yellow star"])
    with torch.no_grad():
        assert torch.equal(loaded.encode(x, cond)["z"], model.encode(x, cond)["z"])
        lat = model.encode(x, cond)
        assert torch.equal(loaded.decode(lat, cond), model.decode(lat, cond))


def test_text_model_starts_from_a_trained_model_without_text(tmp_path, text_encoder):
    """Sec. 4.1: the cross-modal phase starts from the video VAE trained without text. `ldm convert
    --source saved --target cmvae-z4-text` copies every tensor and leaves the text layers fresh, so
    at step 0 the text model reconstructs exactly as the model it came from; a folder of another
    layout or a target without text is refused in one line."""
    from autoencoders.sources import convert_saved
    plain = _model("cmvae-z4-debug", latent_scale=(0.5,), latent_shift=(0.1,))
    _perturb(plain, TemporalConv)  # as after training: not a fresh model
    plain.save_pretrained(tmp_path / "plain", name="cmvae-z4-debug")
    model = convert_saved(tmp_path / "plain", "cmvae-z4-text-debug").model.eval()
    assert model.config.text_dim and model.config.latent_scale == (0.5,) and model.config.latent_shift == (0.1,)
    x, cond = _video(T, batch=1), _cond(text_encoder, ["a green square moving down"])
    with torch.no_grad():
        lat = model.encode(x, cond)
        assert torch.equal(lat["z"], plain.encode(x)["z"])
        assert torch.equal(model.decode(lat, cond), plain.decode(lat))
    for target, match in (("cmvae-z16-text-debug", "latent_channels"), ("cmvae-z4-debug", "--init as it is")):
        with pytest.raises(UserError, match=match):
            convert_saved(tmp_path / "plain", target)


@pytest.mark.parametrize("name", ["cmvae-z4-debug", "cmvae-z4-simultaneous-debug", "cmvae-z4-sequential-debug"])
def test_one_train_step_lowers_the_loss(name):
    """Video and image batches: one AdamW step on the training loss (L1 + KL) lowers it (same
    batch, same posterior noise)."""
    model = _model(name).train()
    loss_fn = AELoss(AELossConfig(kl_weight=1e-6))
    for frames in (T, 1):
        x = _video(frames, batch=2)

        def loss() -> torch.Tensor:
            out = model.train_forward(x, None, torch.Generator().manual_seed(0))
            return loss_fn.generator_loss(x, out, step=0)[0]

        before, after = one_step(model, loss)
        assert after < before, (frames, before, after)


def test_kl_regularises_only_the_innermost_latent():
    """For a video the posterior the trainer regularises is the temporal AE's (T/4 x H/8 x W/8);
    for an image it is the first stage's."""
    model = _model("cmvae-z4-debug").train()
    out = model.train_forward(_video(T), None, torch.Generator().manual_seed(0))
    assert set(out.posterior.logvar) == {"z"} and out.posterior.logvar["z"].shape == (2, 4, T // 4, 4, 4)
    with torch.no_grad():
        mean, _ = model.temporal_posterior(model.spatial_posterior(_video(T), None, True)[0], None)
    assert mean.shape == out.posterior["z"].shape
    out = model.train_forward(_video(1), None)
    assert out.posterior.logvar["z"].shape == (2, 4, 1, 4, 4)


# ------------------------------------------------------------------------------------------
# Trainer (text + joint image-video + 3D GAN after warm-up), extraction, sampling
# ------------------------------------------------------------------------------------------
def test_trainer_image_steps_are_seeded_and_fold_frames():
    from launch.train_ae import TrainAEConfig, frames_as_images, is_image_step

    cfg = TrainAEConfig(data="x", output="y", autoencoder="cmvae-z4-debug", image_ratio=0.2, seed=3)
    steps = [is_image_step(cfg, s) for s in range(2000)]
    assert steps == [is_image_step(cfg, s) for s in range(2000)]  # a function of (seed, step)
    assert 0.17 < sum(steps) / len(steps) < 0.23
    assert not any(is_image_step(TrainAEConfig(data="x", output="y", autoencoder="cmvae-z4-debug"), s)
                   for s in range(100))
    video = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3, 4, 2, 2)
    cond = Cond(text=torch.randn(2, 5, 7), text_mask=torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool())
    images, icond = frames_as_images(video, cond)
    assert images.shape == (8, 3, 1, 2, 2) and torch.equal(images[5, :, 0], video[1, :, 1])
    assert torch.equal(icond.text[5], cond.text[1]) and torch.equal(icond.text_mask[3], cond.text_mask[0])
    with pytest.raises(ValueError, match="image_ratio"):
        TrainAEConfig(data="x", output="y", autoencoder="cmvae-z4-debug", image_ratio=1.5)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from data.synth import synth_dataset

    out = tmp_path_factory.mktemp("cmvae_clips")
    synth_dataset(out, num=4, frames=T, size=S, fps=8, seed=0)
    return out


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory) -> tuple[Path, dict]:
    from launch.train_ae import TrainAEConfig, train_autoencoder

    out = tmp_path_factory.mktemp("cmvae_run")
    cfg = TrainAEConfig(data=str(clips), output=str(out), autoencoder="cmvae-z4-text-debug", text_encoder="builtin",
                        image_ratio=0.3, gan=True, disc_kind="3d", disc_start=16, frames=T, height=S, width=S,
                        batch_size=2, lr=3e-3, steps=22, log_every=1, save_every=100, sample_every=100,
                        num_workers=0, progress=False, latent_stats_clips=2)
    return out, train_autoencoder(cfg)


def test_train_autoencoder_with_text_joint_batches_and_video_gan(trained, text_encoder):
    out, summary = trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 22 and summary["text_encoder"] == "builtin"
    image = [r["image_step"] == 1.0 for r in log]
    assert 2 <= sum(image) <= 12  # joint image-video batches, ~30 % images
    video_rec = [r["rec"] for r, im in zip(log, image) if not im]
    assert sum(video_rec[-3:]) / 3 < 0.7 * sum(video_rec[:3]) / 3, video_rec  # the video loss falls
    assert all("g_adv" not in r for r in log[:16]) and all("g_adv" in r and "d_loss" in r for r in log[16:])
    assert (out / "samples" / "step-00000022.png").is_file()
    ae = load_pretrained(out / "final").eval()
    assert ae.config.text_dim == 256 and len(ae.config.latent_scale) == 4  # measured latent statistics
    x = _video(T, batch=1)
    a, b = _cond(text_encoder, ["a red circle moving left"]), _cond(text_encoder, ["a blue square moving up"])
    with torch.no_grad():
        lat = ae.encode(x, a)
        assert (ae.decode(lat, a) - ae.decode(lat, b)).abs().max() > 1e-4  # training gave the text path weights
        with pytest.raises(ValueError, match="text-guided"):
            ae.decode(lat)


def test_final_records_its_text_encoder_and_another_is_refused(trained, text_encoder, tmp_path):
    """train-ae writes the text encoder into final/config.json; extract / reconstruct / eval recon
    (``check_text_encoder``) then refuse an encoder of the same width that embeds differently."""
    import shutil

    from ldm.text import fingerprint
    final = trained[0] / "final"
    record = json.loads((final / "config.json").read_text())["text_encoder"]
    assert record["spec"] == "builtin" and record["dim"] == 256
    assert record["fingerprint"] == pytest.approx(list(fingerprint(text_encoder)))
    ae = load_pretrained(final)
    ae.check_text_encoder(text_encoder, "builtin")  # the same encoder passes
    other = tmp_path / "other"  # as if trained with another 256-d encoder
    shutil.copytree(final, other)
    meta = json.loads((other / "config.json").read_text())
    meta["text_encoder"] = {**record, "spec": "t5:/models/elsewhere",
                            "fingerprint": [-v for v in record["fingerprint"]]}
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"embeds captions differently .* \(t5:/models/elsewhere\): pass that one"):
        load_pretrained(other).check_text_encoder(text_encoder, "builtin")
    meta.pop("text_encoder")  # folders saved before this (or converted ones) are not checked
    (other / "config.json").write_text(json.dumps(meta))
    load_pretrained(other).check_text_encoder(text_encoder, "builtin")


def test_trainer_rejects_missing_or_mismatched_text_encoder(clips, tmp_path):
    from launch.train_ae import TrainAEConfig, train_autoencoder

    base = dict(data=str(clips), output=str(tmp_path / "run"), frames=T, height=S, width=S, steps=1,
                num_workers=0, progress=False)
    with pytest.raises(ValueError, match="--text-encoder"):
        train_autoencoder(TrainAEConfig(autoencoder="cmvae-z4-text-debug", **base))
    with pytest.raises(ValueError, match="takes no text"):
        train_autoencoder(TrainAEConfig(autoencoder="cmvae-z4-debug", text_encoder="builtin", **base))
    with pytest.raises(ValueError, match="text_dim=256"):  # the builtin encoder gives 256-d embeddings
        train_autoencoder(TrainAEConfig(autoencoder="cmvae-z4-text-debug", ae_config=("text_dim=128",),
                                        text_encoder="builtin", **base))


def test_extract_encodes_with_the_caption(trained, clips, tmp_path, text_encoder):
    from data import shards
    from data.manifest import load_manifest
    from launch.extract import ExtractConfig, extract

    final = trained[0] / "final"
    cfg = ExtractConfig(autoencoder=None, checkpoint=str(final), input=str(clips), output=str(tmp_path / "lat"),
                        frames=T, height=S, width=S, shard_size=2, batch_size=2, text_encoder="builtin", verify=1)
    summary = extract(cfg)
    assert summary["written"] == 4 and summary["verify_psnr"] is not None
    manifest = load_manifest(tmp_path / "lat")
    assert manifest.latent_spec["latent_shape"] == {"z": [4, 2, 4, 4]} and manifest.text_dim == 256
    sample = shards.read_all(tmp_path / "lat")[0]
    ae = load_pretrained(final).eval()
    from data.sources import VideoClipDataset, list_items
    items = list_items(clips)
    video = VideoClipDataset(items, T, S, S)[sample["meta"]["index"]]["video"][None]
    with torch.no_grad():
        own = ae.encode(video, _cond(text_encoder, [sample["cond"]["caption"]]))["z"]
        other = ae.encode(video, _cond(text_encoder, ["something else entirely"]))["z"]
    torch.testing.assert_close(sample["latent"]["z"], own, atol=1e-4, rtol=1e-4)
    assert (own - other).abs().max() > 1e-5  # so the stored latent really used the caption
    with pytest.raises(ValueError, match="--text-encoder"):
        extract(ExtractConfig(autoencoder=None, checkpoint=str(final), input=str(clips), output=str(tmp_path / "x"),
                              frames=T, height=S, width=S))


def test_the_caption_length_trained_with_is_kept_by_extract_and_reconstruct(trained, clips, tmp_path):
    """train-ae --text-max-length N embeds captions at N tokens and final/ records the length (the encoder's
    own without the flag); extract and reconstruct embed at that length for the model; extract refuses
    another --text-max-length for it (one encoder embeds for the model and for the DiT)."""
    import shutil

    from data import shards
    from data.manifest import load_manifest
    from launch.extract import ExtractConfig, extract
    from launch.reconstruct import caption_cond
    from launch.train_ae import TrainAEConfig, train_autoencoder

    final = trained[0] / "final"
    assert json.loads((final / "config.json").read_text())["text_encoder"]["max_length"] == 64  # builtin's own
    assert load_pretrained(final).text_length() == 64 and _model("cmvae-z4-text-debug").text_length() is None
    base = dict(data=str(clips), frames=T, height=S, width=S, num_workers=0, progress=False,
                autoencoder="cmvae-z4-text-debug", text_encoder="builtin")
    for bad, match in ((1, ">= 2 tokens"), (-3, ">= 2 tokens")):
        with pytest.raises(ValueError, match=match):
            TrainAEConfig(output=str(tmp_path / "bad"), text_max_length=bad, **base)
    with pytest.raises(ValueError, match="give --text-encoder too"):
        TrainAEConfig(output=str(tmp_path / "bad"), **{**base, "text_encoder": None}, text_max_length=12)
    run = tmp_path / "short"
    train_autoencoder(TrainAEConfig(output=str(run), text_max_length=12, steps=1, latent_stats_clips=2, **base))
    short = load_pretrained(run / "final").eval()
    assert short.text_length() == 12

    cond = caption_cond(short, "short", "a red circle moving left", "builtin", torch.device("cpu"))
    assert cond.text.shape[1] == 12
    kw = dict(autoencoder=None, checkpoint=str(run / "final"), input=str(clips), frames=T, height=S, width=S,
              shard_size=2, batch_size=2, text_encoder="builtin")
    extract(ExtractConfig(output=str(tmp_path / "lat"), **kw))
    assert load_manifest(tmp_path / "lat").text_max_length == 12
    assert all(s["cond"]["text_emb"].shape[0] <= 12 for s in shards.read_all(tmp_path / "lat"))
    extract(ExtractConfig(output=str(tmp_path / "lat12"), text_max_length=12, **kw))  # the same length: fine
    with pytest.raises(UserError, match="trained with captions of 12 tokens and encodes with them: "
                                        "--text-max-length must be 12 or left out for it, got 20"):
        extract(ExtractConfig(output=str(tmp_path / "lat20"), text_max_length=20, **kw))
    assert not (tmp_path / "lat20").exists()
    shutil.rmtree(run)


def test_dit_sampling_path_decodes_with_the_prompt(text_encoder):
    """launch.sample.generate passes the prompt's embedding to decode: a text-guided model decodes
    with it. Sampled by class id or unconditionally, it decodes with the prompts when given, else
    with the empty caption (what extraction gives an uncaptioned clip); it needs the text encoder."""
    import dit
    from launch.sample import generate, sample_latents
    from ldm.samplers import SamplingConfig

    ae = _model("cmvae-z4-text-debug")
    spec = ae.latent_spec(T, S, S)
    torch.manual_seed(0)
    model = dit.build("dit-debug", spec, text_dim=text_encoder.dim).eval()
    video = generate(model, ae, {}, prompts=["a red circle"], frames=T, height=S, width=S,
                     sampling=SamplingConfig(steps=2), text_encoder=text_encoder, progress=False)
    assert video.shape == (1, 3, T, S, S) and torch.isfinite(video).all()
    classes = dit.build("dit-debug", spec, num_classes=3).eval()
    kw = dict(frames=T, height=S, width=S, sampling=SamplingConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="text-guided: its decoder needs the text encoder"):
        generate(classes, ae, {}, class_ids=[1], **kw)
    for how in ({"class_ids": [1, 2]}, {"count": 2}):
        latent, cond = sample_latents(classes, ae, {}, text_encoder=text_encoder, **how, **kw)
        assert torch.equal(cond.text, _cond(text_encoder, ["", ""]).text)
        with torch.no_grad():
            assert torch.equal(generate(classes, ae, {}, text_encoder=text_encoder, **how, **kw),
                               ae.decode(latent, cond).clamp(-1, 1))
    _, cond = sample_latents(classes, ae, {}, class_ids=[1], prompts=["a red circle"], text_encoder=text_encoder, **kw)
    # the class DiT ignores the prompt, the decoder reads it
    assert torch.equal(cond.text, _cond(text_encoder, ["a red circle"]).text)


@pytest.mark.dist
@pytest.mark.slow
def test_two_rank_joint_training_with_text(clips, tmp_path):
    """2 DDP ranks: image steps leave the temporal layers without gradients on every rank (DDP
    is told to expect unused parameters) and both ranks take the same image steps."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    env = process_env(OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "launch.cli", "train-ae", "--autoencoder", "cmvae-z4-text-debug", "--text-encoder", "builtin",
           "--image-ratio", "0.5", "--data", str(clips), "--output", str(out), "--frames", str(T),
           "--height", str(S), "--width", str(S), "--batch-size", "1", "--steps", "6", "--log-every", "1",
           "--save-every", "100", "--num-workers", "0", "--latent-stats-clips", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {r["image_step"] for r in log} == {0.0, 1.0}  # the mean over ranks: they agree on every step
