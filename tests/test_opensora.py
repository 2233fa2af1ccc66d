"""Open-Sora 1.2's VAE (autoencoders/opensora.py) and ``ldm convert --source opensora-official``,
without the released files: the test writes a release-shaped ``model.safetensors`` -- a tiny diffusers
``AutoencoderKL`` under ``spatial_vae.module.`` and random tensors under the official temporal names
(tests/official_opensora.py enumerates them as the public ``VAE_Temporal`` builds them) -- and checks
the converted model against the public pipeline: diffusers for the spatial half, the reference for
the temporal half, micro-chunks of 17 frames, the released standardisation."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from autoencoders import build, load_pretrained
from autoencoders.opensora import RELEASED_SCALE, RELEASED_SHIFT, SPATIAL_SCALE, ZeroCausalConv3d
from autoencoders.sources import convert
from launch.cli import main as ldm
from official_opensora import OfficialTemporalVAE, official_shapes, official_state_dict

# opensora-v12-debug's layout: the spatial VAE as kl2d-f8c4-debug, the temporal one at width 16
TEMPORAL = dict(filters=16, mult=(1, 2, 2, 2), nrb=1)
SHIFT = torch.tensor([0.1, -0.2, 0.3, 0.0])[None, :, None, None, None]
SCALE = torch.tensor([2.0, 1.5, 3.0, 0.5])[None, :, None, None, None]


def _video(frames: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-shaped model.safetensors (its own shift / scale buffers), the diffusers spatial VAE
    and the temporal tensors."""
    torch.manual_seed(0)
    spatial = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                      block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                      norm_num_groups=8).eval()
    with torch.no_grad():
        for p in spatial.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    temporal = official_state_dict(seed=1, **TEMPORAL)
    state = {**{f"spatial_vae.module.{k}": v for k, v in spatial.state_dict().items()},
             **{f"temporal_vae.{k}": v for k, v in temporal.items()}, "shift": SHIFT.clone(), "scale": SCALE.clone()}
    folder = tmp_path_factory.mktemp("opensora") / "OpenSora-VAE-v1.2"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder, spatial, temporal, state


def _public(spatial, temporal, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The public pipeline on ``video`` (the spatial posterior mean where it draws a sample): the
    standardised latent, its log-variance and the decoded video."""
    ref, frames = OfficialTemporalVAE(temporal, TEMPORAL["mult"], TEMPORAL["nrb"], groups=8), video.shape[2]
    with torch.no_grad():
        f = video[0].permute(1, 0, 2, 3)  # (T, 3, H, W)
        xz = (spatial.encode(f).latent_dist.mean * SPATIAL_SCALE).permute(1, 0, 2, 3)[None]  # (1, 4, T, h, w)
        parts = [ref.encode(xz[:, :, i:i + 17]) for i in range(0, frames, 17)]
        mean, logvar = torch.cat([m for m, _ in parts], 2), torch.cat([v for _, v in parts], 2)
        per = mean.shape[2] if frames == 1 else 5
        decoded = torch.cat([ref.decode(mean[:, :, i:i + per], min(17, frames)) for i in range(0, mean.shape[2], per)], 2)
        video_out = spatial.decode(decoded[0].permute(1, 0, 2, 3) / SPATIAL_SCALE).sample.permute(1, 0, 2, 3)[None]
    return (mean - SHIFT) / SCALE, logvar - 2 * torch.log(SCALE), video_out


def test_the_registered_model_has_the_released_size():
    """Parameter for parameter SDXL's VAE (83,653,863) + the public VAE_Temporal_SD (309,687,144)."""
    with torch.device("meta"):
        model = build("opensora-v12")
    assert model.spatial.num_parameters() == 83_653_863
    assert model.num_parameters() - model.spatial.num_parameters() == sum(
        torch.Size(s).numel() for s in official_shapes().values()) == 309_687_144
    spec = model.latent_spec(51, 256, 256)
    assert spec.parts["z"] == (4, 15, 32, 32) and model.latent_spec(1, 64, 64).parts["z"] == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="17k frames"):
        model.latent_spec(16, 64, 64)
    assert model.config.latent_shift == RELEASED_SHIFT and model.config.latent_scale == tuple(1 / s for s in RELEASED_SCALE)


@pytest.mark.parametrize("frames", [17, 34, 1])  # one micro-chunk, two, an image
def test_conversion_reproduces_the_public_pipeline(release, frames):
    folder, spatial, temporal, _ = release
    result = convert("opensora-official", folder, "opensora")
    model = result.model
    assert result.name == "opensora-v12-debug"
    assert model.config.latent_shift == (0.1, -0.2, 0.3, 0.0) and model.config.latent_scale == (0.5, 1 / 1.5, 1 / 3, 2.0)
    x = _video(frames)
    want_z, want_logvar, want_video = _public(spatial, temporal, x)
    with torch.no_grad():
        lat = model.encode(x)
        got = model.decode(lat)
    torch.testing.assert_close(lat["z"], want_z, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lat.logvar["z"], want_logvar, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, want_video, atol=1e-4, rtol=1e-4)
    assert got.shape == x.shape and want_z.abs().max() > 0.1 and want_video.abs().max() > 0.1


def test_zero_padding_of_the_past_matters(release):
    """The equality above can fail: our causal3d's rule (the past as copies of the first frame)
    instead of Open-Sora's zeros gives other latents."""
    folder, spatial, temporal, _ = release
    model = convert("opensora-official", folder, "opensora").model
    x = _video(17)
    with torch.no_grad():
        good = model.encode(x)["z"]
        real = ZeroCausalConv3d.forward

        def first_frame_past(self, h):
            p = self.padding_
            h = torch.cat([h[:, :, :1].expand(-1, -1, p[4], -1, -1), h], 2) if p[4] else h
            return torch.nn.Conv3d.forward(self, torch.nn.functional.pad(h, p[:4]))

        ZeroCausalConv3d.forward = first_frame_past
        try:
            assert (model.encode(x)["z"] - good).abs().max() > 1e-3
        finally:
            ZeroCausalConv3d.forward = real


def test_wrong_files_are_clear_errors(release, tmp_path):
    folder, _, temporal, state = release
    save_file({k: v.contiguous() for k, v in temporal.items()}, tmp_path / "temporal_only.safetensors")
    with pytest.raises(ValueError, match="is not Open-Sora 1.2's VAE"):
        convert("opensora-official", tmp_path / "temporal_only.safetensors", "opensora")
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        convert("opensora-official", tmp_path, "opensora")
    cut = {k: v.contiguous() for i, (k, v) in enumerate(state.items()) if i % 9}
    save_file(cut, tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        convert("opensora-official", tmp_path / "cut.safetensors", "opensora-v12-debug")
    with pytest.raises(ValueError, match="match none"):
        convert("opensora-official", tmp_path / "cut.safetensors", "opensora")


def test_ldm_convert_writes_a_folder_the_other_verbs_read(release, tmp_path):
    folder, spatial, temporal, _ = release
    out = tmp_path / "converted"
    assert ldm(["convert", "--source", "opensora-official", "--path", str(folder / "model.safetensors"),
                "--target", "opensora-v12-debug", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["family"] == "opensora"
    model = load_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(_video(17))["z"], _public(spatial, temporal, _video(17))[0],
                                   atol=1e-5, rtol=1e-4)
