"""Released diffusers VAEs as starting points (issue "real weights, part 2"): tiny random diffusers
models built here, saved to a local folder and converted. ``kl2d`` holds an ``AutoencoderKL`` and
``causal3d`` an ``AutoencoderKLCogVideoX`` exactly; the research families start from the converted
models (cross-modal VAE inflated from an SD VAE, Hi-VAE's frozen content VAE, MTC-VAE on CogVideoX's
VAE); wrong folders and configurations are clear errors."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

from autoencoders import build, load_pretrained
from autoencoders.hivae import build_hivae
from autoencoders.mtcvae import convert as to_mtcvae
from autoencoders.sources import convert
from launch.cli import main as ldm
from ldm import config as cfglib

diffusers = pytest.importorskip("diffusers")

# kl2d-f8c4-debug's layout (so Hi-VAE and cmvae-z4-debug can take it) and SD-3.5's (no quant convs)
SD = dict(block_out_channels=(16, 32, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8)
SD3 = dict(block_out_channels=(16, 32, 32, 32), latent_channels=16, layers_per_block=1, norm_num_groups=8,
           use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
# the tiny CogVideoX, and one with causal3d-cogvideox-debug's layout
COG = dict(block_out_channels=(32, 32, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=2)
COG_DEBUG = dict(block_out_channels=(16, 32, 32, 32), latent_channels=16, layers_per_block=1, norm_num_groups=8)


def _jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (fresh diffusers models have unit norms, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(tmp_path, name: str, model: torch.nn.Module):
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def _sd(**config) -> torch.nn.Module:
    n = len(config["block_out_channels"])
    return _jitter(diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                           up_block_types=("UpDecoderBlock2D",) * n, **config))


def _video(frames: int, height: int = 16, width: int = 16, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {"sd": _save(root, "sd", _sd(**SD)), "sd3": _save(root, "sd3", _sd(**SD3)),
            "cog": _save(root, "cog", _jitter(diffusers.AutoencoderKLCogVideoX(**COG))),
            "cog_debug": _save(root, "cog_debug", _jitter(diffusers.AutoencoderKLCogVideoX(**COG_DEBUG), seed=1))}


# ------------------------------------------------------------------------------------------
# kl2d <- AutoencoderKL
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sd", "sd3"])
def test_kl2d_reproduces_autoencoderkl(folders, case):
    source = diffusers.AutoencoderKL.from_pretrained(folders[case]).eval()
    result = convert("diffusers:AutoencoderKL", folders[case], "kl2d")
    model, cfg = result.model, result.model.config
    assert cfg.quant_conv == (case == "sd") and cfg.latent_channels == source.config.latent_channels
    scale, shift = source.config.scaling_factor, source.config.shift_factor or 0.0
    assert cfg.latent_scale == (scale,) and cfg.latent_shift == (shift,)
    assert model.num_parameters() == sum(p.numel() for p in source.parameters())
    x = _video(3, 24, 40, batch=2)  # non-square, several frames (frame-wise)
    frames = rearrange(x, "b c t h w -> (b t) c h w")
    with torch.no_grad():
        post = source.encode(frames).latent_dist
        lat = model.encode(x)
        ref = rearrange(post.mean, "(b t) c h w -> b c t h w", b=2)
        torch.testing.assert_close(lat["z"], (ref - shift) * scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(lat), rearrange(source.decode(post.mean).sample, "(b t) c h w -> b c t h w", b=2),
                                   atol=1e-5, rtol=1e-5)


def test_registered_kl2d_target_is_checked_against_the_folder(folders):
    assert convert("diffusers:AutoencoderKL", folders["sd"], "kl2d-f8c4-debug").name == "kl2d-f8c4-debug"
    assert convert("diffusers:AutoencoderKL", folders["sd3"], "kl2d-f8c16-sd3-debug").name == "kl2d-f8c16-sd3-debug"
    with pytest.raises(ValueError, match=r"kl2d-f8c4: base_channels: 128 \(theirs 16\)"):
        convert("diffusers:AutoencoderKL", folders["sd"], "kl2d-f8c4")
    with pytest.raises(ValueError, match="quant_conv: True .theirs False"):
        convert("diffusers:AutoencoderKL", folders["sd3"], "kl2d-f8c16-debug")


def test_wrong_folders_and_configs_are_clear_errors(folders, tmp_path):
    with pytest.raises(ValueError, match="holds a AutoencoderKLCogVideoX, not a AutoencoderKL"):
        convert("diffusers:AutoencoderKL", folders["cog"], "kl2d")
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a AutoencoderKLCogVideoX"):
        convert("diffusers:AutoencoderKLCogVideoX", folders["sd"], "causal3d")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        convert("diffusers:AutoencoderKL", tmp_path / "nothing", "kl2d")
    (tmp_path / "pipeline" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="its VAE is the vae/ subfolder"):
        convert("diffusers:AutoencoderKL", tmp_path / "pipeline", "kl2d")
    (tmp_path / "notes.txt").write_text("mine")  # an --output that is a file: one line, the file kept
    with pytest.raises(ValueError, match="--output .*notes.txt is a file"):
        ldm(["convert", "--source", "diffusers:AutoencoderKL", "--path", str(folders["sd"]), "--target", "kl2d",
             "--output", str(tmp_path / "notes.txt")])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    odd = _save(tmp_path, "odd", _sd(**dict(SD, act_fn="gelu")))
    with pytest.raises(ValueError, match="act_fn 'gelu'"):
        convert("diffusers:AutoencoderKL", odd, "kl2d")
    with pytest.raises(ValueError, match="fills 'kl2d'.*target 'h3ae'"):
        convert("diffusers:AutoencoderKL", folders["sd"], "h3ae")


# ------------------------------------------------------------------------------------------
# causal3d <- AutoencoderKLCogVideoX
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 9, 17, 33])
def test_causal3d_reproduces_cogvideox(folders, frames):
    """1 + 8k frames: the encoder's chunks of 8 (the first holding the remainder) and the decoder's
    chunks of 2 latent frames, with GroupNorm statistics per chunk, as diffusers runs them."""
    source = diffusers.AutoencoderKLCogVideoX.from_pretrained(folders["cog"]).eval()
    model = convert("diffusers:AutoencoderKLCogVideoX", folders["cog"], "causal3d").model
    assert model.num_parameters() > sum(p.numel() for p in source.parameters())  # + resampler weights
    x = _video(frames)
    with torch.no_grad():
        post = source.encode(x).latent_dist
        lat = model.encode(x)
        torch.testing.assert_close(lat["z"], post.mean * source.config.scaling_factor, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lat.logvar["z"], post.logvar + 2 * torch.log(torch.tensor(source.config.scaling_factor)),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(lat), source.decode(post.mean).sample, atol=1e-5, rtol=1e-5)


def test_cogvideox_statistics_are_per_chunk(folders):
    """The check above can fail: without chunks (one pass, clip statistics over all frames) the
    latents differ; with per-frame norms chunks change nothing (the streaming state is exact)."""
    model = convert("diffusers:AutoencoderKLCogVideoX", folders["cog"], "causal3d").model
    x = _video(17)
    one_pass = type(model)(cfglib.replace(model.config, chunk_latent_frames=0)).eval()
    one_pass.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (one_pass.encode(x)["z"] - model.encode(x)["z"]).abs().max() > 1e-3
        # chunk causality: frames of the second chunk (9..16) leave the first chunk's latents alone
        x2 = x.clone()
        x2[:, :, 12] += 1.0
        a, b = model.encode(x)["z"], model.encode(x2)["z"]
        assert torch.equal(a[:, :, :3], b[:, :, :3]) and (a[:, :, 3:] - b[:, :, 3:]).abs().max() > 1e-3
    frame = build("causal3d-cogvideox-debug", norm="group").eval()
    one_shot = build("causal3d-cogvideox-debug", norm="group", chunk_latent_frames=0).eval()
    one_shot.load_state_dict(frame.state_dict())
    ours = build("causal3d-f4x8c4-debug").eval()
    reference = build("causal3d-f4x8c4-debug").eval()
    reference.load_state_dict(ours.state_dict())
    ours.set_chunk_frames(4)  # the inference verbs' --chunk-frames
    with torch.no_grad():
        for chunked, whole in ((frame, one_shot), (ours, reference)):
            la, lb = chunked.encode(_video(25)), whole.encode(_video(25))
            torch.testing.assert_close(la["z"], lb["z"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(chunked.decode(la), whole.decode(la), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="part of the model"):
        model.set_chunk_frames(8)


def test_registered_cogvideox_target(folders):
    assert convert("diffusers:AutoencoderKLCogVideoX", folders["cog_debug"], "causal3d-cogvideox-debug").name \
        == "causal3d-cogvideox-debug"
    with pytest.raises(ValueError, match="does not have the architecture of causal3d-cogvideox-debug"):
        convert("diffusers:AutoencoderKLCogVideoX", folders["cog"], "causal3d-cogvideox-debug")
    with torch.device("meta"):  # the registered full config is CogVideoX-2b/5b's layout, parameter for parameter
        ours, theirs = build("causal3d-cogvideox"), diffusers.AutoencoderKLCogVideoX()
        resamplers = sum(p.numel() for n, p in ours.named_parameters() if ".temporal_" in n)
    assert ours.num_parameters() - resamplers == sum(p.numel() for p in theirs.parameters())


# ------------------------------------------------------------------------------------------
# the research families start from converted weights
# ------------------------------------------------------------------------------------------
def test_mtcvae_from_cogvideox_keeps_its_4x_path(folders, tmp_path):
    source = diffusers.AutoencoderKLCogVideoX.from_pretrained(folders["cog_debug"]).eval()
    assert ldm(["convert", "--source", "diffusers:AutoencoderKLCogVideoX", "--path", str(folders["cog_debug"]),
                "--target", "causal3d-cogvideox-debug", "--output", str(tmp_path / "base")]) == 0
    model = to_mtcvae(load_pretrained(tmp_path / "base")).eval()  # what --base-checkpoint --stage 1 builds
    direct = convert("diffusers:AutoencoderKLCogVideoX", folders["cog_debug"], "mtcvae-c16-cogvideox-debug")
    assert direct.model.config == model.config and direct.name == "mtcvae-c16-cogvideox-debug"
    seg = _video(17, batch=2)
    with torch.no_grad():
        post = source.encode(seg).latent_dist
        mean, _ = model.encode_segments(seg, 4)
        torch.testing.assert_close(mean, post.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode_segments(mean, 4), source.decode(post.mean).sample, atol=1e-5, rtol=1e-5)
        for rate in (8, 16):  # the new levels start as further pair means / repeats
            z, _ = model.encode_segments(seg, rate)
            assert z.shape[2] == 1 + 16 // rate and model.decode_segments(z, rate).shape == seg.shape


def test_cmvae_first_stage_inflated_from_a_converted_sd_vae(folders):
    source = diffusers.AutoencoderKL.from_pretrained(folders["sd"]).eval()
    result = convert("diffusers:AutoencoderKL", folders["sd"], "cmvae-z4-debug")
    model = result.model.eval()
    assert result.name == "cmvae-z4-debug" and any("inflated" in n for n in result.notes)
    x = _video(8, 32, 32)
    still = x[:, :, :1].expand(-1, -1, 8, -1, -1).contiguous()
    with torch.no_grad():
        image = source.encode(x[:, :, 0]).latent_dist.mean
        torch.testing.assert_close(model.encode(x[:, :, :1])["z"][:, :, 0], image, atol=1e-5, rtol=1e-5)  # image mode
        mean, _ = model.spatial_posterior(still, None, temporal=True)  # a static clip: the image VAE per frame
        torch.testing.assert_close(mean, image[:, :, None].expand_as(mean), atol=1e-5, rtol=1e-5)
        out = model.spatial_decode(mean, None, temporal=True)
        torch.testing.assert_close(out[:, :, 3], source.decode(image).sample, atol=1e-5, rtol=1e-5)
        frame = convert("diffusers:AutoencoderKL", folders["sd"], "kl2d").model
        frame_model = type(model).from_kl2d(frame, "cmvae-z4-debug", norm="frame").eval()
        moving, _ = frame_model.spatial_posterior(x, None, temporal=True)  # per-frame norms: any clip
        ref = rearrange(source.encode(rearrange(x, "b c t h w -> (b t) c h w")).latent_dist.mean, "t c h w -> 1 c t h w")
        torch.testing.assert_close(moving, ref, atol=1e-5, rtol=1e-5)
    sd3 = convert("diffusers:AutoencoderKL", folders["sd3"], "cmvae-z16-debug")  # SD-3.5 -> the 16-channel model
    assert not sd3.model.config.quant_conv
    with pytest.raises(ValueError, match="does not fit cmvae-z16-debug"):
        convert("diffusers:AutoencoderKL", folders["sd"], "cmvae-z16-debug")


def test_hivae_content_vae_from_a_converted_sd_vae(folders, tmp_path):
    assert ldm(["convert", "--source", "diffusers:AutoencoderKL", "--path", str(folders["sd"]), "--target", "kl2d",
                "--output", str(tmp_path / "sd")]) == 0
    hivae = build_hivae("hivae-s-debug", base_checkpoint=tmp_path / "sd")
    source = diffusers.AutoencoderKL.from_pretrained(folders["sd"]).eval()
    x = _video(2, 32, 32)
    with torch.no_grad():
        z = hivae.base.encode(x)["z"]
        ref = source.encode(rearrange(x, "b c t h w -> (b t) c h w")).latent_dist.mean * source.config.scaling_factor
    torch.testing.assert_close(z, rearrange(ref, "t c h w -> 1 c t h w"), atol=1e-5, rtol=1e-5)
    assert hivae.config.base.latent_scale == (source.config.scaling_factor,)
    assert load_pretrained(tmp_path / "sd").config == hivae.config.base


def test_ivvae_from_a_converted_image_vae(folders):
    result = convert("diffusers:AutoencoderKL", folders["sd"], "ivvae")  # the GroupNorm variant of SD's widths
    model, kl2d = result.model.eval(), convert("diffusers:AutoencoderKL", folders["sd"], "kl2d").model
    assert model.config.latent_channels == 8 and model.config.norm == "group"
    x = _video(5, 32, 32)
    with torch.no_grad():
        lat = model.encode(x)
        torch.testing.assert_close(lat["z"][:, :4], kl2d.encode(x[:, :, [0, 1]])["z"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match the image VAE"):
        convert("diffusers:AutoencoderKL", folders["sd"], "ivvae-z8-debug")  # RMSNorm layout: needs kl2d-ivvae-*
