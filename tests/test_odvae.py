"""OD-VAE (autoencoders/odvae.py): Open-Sora-Plan v1.2.0's released VAE -> ``odvae`` and the
``ldm convert`` verb, without the released files: the test writes the official folder (config.json
+ diffusion_pytorch_model.safetensors) with random tensors under the official names and shapes
(tests/official_odvae.py enumerates them the way the public Encoder / Decoder build them) and checks
that the converted model reproduces the public forward pass re-derived from the official names."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from autoencoders import REGISTRY, build, load_pretrained
from autoencoders.odvae import LATENT_SCALE, SpaceTimeDownsample, SpaceTimeUpsample
from autoencoders.sources import convert
from launch.cli import console
from launch.cli import main as ldm
from official_odvae import OfficialODVAE, official_config, official_shapes, official_state_dict, parameter_count

DEBUG = dict(hidden=16, z=4, mult=(1, 2, 2, 2), nrb=1)  # odvae-c4-debug's layout


def _video(frames: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _folder(path, sd, config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, path / "diffusion_pytorch_model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny official vae/ folder (the odvae-c4-debug shapes) and its tensors."""
    sd = official_state_dict(DEBUG["hidden"], DEBUG["z"], DEBUG["mult"], DEBUG["nrb"], seed=1)
    config = official_config(DEBUG["hidden"], DEBUG["z"], DEBUG["mult"], DEBUG["nrb"])
    return sd, _folder(tmp_path_factory.mktemp("odvae") / "vae", sd, config)


def test_the_registered_model_has_the_released_size():
    """Parameter for parameter the released CausalVAEModel_D4_4x8x8 (the count, and through the
    mapping every shape: the conversion below is strict)."""
    with torch.device("meta"):
        model = build("odvae-c4")
    assert model.num_parameters() == parameter_count(128, 4) == 239_189_991
    assert REGISTRY["odvae-c4"][1].latent_scale == (LATENT_SCALE,)
    spec = model.latent_spec(17, 256, 256)
    assert spec.parts["z"] == (4, 5, 32, 32) and spec.vcpr == pytest.approx(17 / 5 * 64)


def test_conversion_reproduces_the_public_forward(official):
    sd, path = official
    result = convert("odvae-official", path, "odvae-c4-debug")
    model, ref = result.model, OfficialODVAE(sd, DEBUG["mult"], DEBUG["nrb"])
    assert result.name == "odvae-c4-debug" and model.config.latent_scale == (LATENT_SCALE,)
    for frames in (9, 1):  # a clip and an image
        x = _video(frames)
        with torch.no_grad():
            moments = ref.encode_moments(x)
            mean, logvar = moments.chunk(2, dim=1)
            lat = model.encode(x)  # the contract: the posterior mean, scaled as Open-Sora-Plan scales it
            torch.testing.assert_close(lat["z"], LATENT_SCALE * mean, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(lat.logvar["z"], logvar + 2 * torch.log(torch.tensor(LATENT_SCALE)),
                                       atol=1e-5, rtol=1e-4)
            recon = model.decode(lat)
            torch.testing.assert_close(recon, ref.decode(mean), atol=1e-5, rtol=1e-4)
        assert recon.shape == x.shape and mean.abs().max() > 0.1 and recon.abs().max() > 0.1  # not trivially zero


def test_the_mapping_can_fail(official):
    """The equality above can fail: q and k of the mid attention swapped in the fused conv, or the
    decoder's interpolating upsampler replaced by nearest-neighbour frames, give other outputs."""
    sd, path = official
    model = convert("odvae-official", path, "odvae-c4-debug").model
    x = _video()
    with torch.no_grad():
        good, lat = model._encode(x, None).parts["z"], model._encode(x, None)
        qkv = model.encoder.mid.attn.qkv.weight
        c = qkv.shape[1]
        qkv.copy_(torch.cat([qkv[c:2 * c], qkv[:c], qkv[2 * c:]]))
        assert (model._encode(x, None).parts["z"] - good).abs().max() > 1e-3
        up = next(m for m in model.decoder.modules() if isinstance(m, SpaceTimeUpsample))
        decoded = model._decode(lat, None)
        up.forward = lambda h, _up=up: _up.conv(h.repeat_interleave(2, 3).repeat_interleave(2, 4)[:, :, [0] + [
            1 + i // 2 for i in range(2 * (h.shape[2] - 1))]])
        assert (model._decode(lat, None) - decoded).abs().max() > 1e-3


def test_space_time_resamplers_keep_the_first_frame_alone():
    """1 + 2k frames <-> 1 + k: the downsampler's frame j sees input frames <= 2j; the upsampler's
    first output frame is latent frame 0's alone, its later frames depend on later latents too."""
    torch.manual_seed(0)
    down, up = SpaceTimeDownsample(4), SpaceTimeUpsample(4)
    x = torch.randn(1, 4, 9, 8, 8)
    y = down(x)
    assert y.shape == (1, 4, 5, 4, 4)
    x2 = x.clone()
    x2[:, :, 5:] += 1  # frames >= 5 change: outputs 0..2 (inputs <= 4) do not
    torch.testing.assert_close(down(x2)[:, :, :3], y[:, :, :3])
    assert (down(x2)[:, :, 3] - y[:, :, 3]).abs().max() > 1e-3
    z = torch.randn(1, 4, 3, 4, 4)
    out = up(z)
    assert out.shape == (1, 4, 5, 8, 8)
    z2 = z.clone()
    z2[:, :, 2] += 1
    torch.testing.assert_close(up(z2)[:, :, 0], out[:, :, 0])
    with pytest.raises(ValueError, match="1 \\+ 2k frames"):
        down(torch.randn(1, 4, 8, 8, 8))


def test_family_target_and_a_bare_state_dict_find_the_registered_model(official, tmp_path):
    sd, path = official
    assert convert("odvae-official", path, "odvae").name is None  # a folder: its own config
    torch.save(sd, tmp_path / "odvae.pt")
    result = convert("odvae-official", tmp_path / "odvae.pt", "odvae")
    assert result.name == "odvae-c4-debug" and result.model.config.latent_scale == (LATENT_SCALE,)


def test_wrong_layouts_and_files_are_clear_errors(official, tmp_path):
    sd, path = official
    v11 = official_config(DEBUG["hidden"], DEBUG["z"], DEBUG["mult"], DEBUG["nrb"])
    v11["encoder_temporal_downsample"] = ["", "TimeDownsampleRes2x", "TimeDownsampleRes2x", ""]
    with pytest.raises(ValueError, match="not OD-VAE's released layout.*encoder_temporal_downsample"):
        convert("odvae-official", _folder(tmp_path / "v11", sd, v11), "odvae")
    sd_vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
    with pytest.raises(ValueError, match="_class_name AutoencoderKL, hidden_size None\\) is not Open-Sora-Plan's CausalVAEModel"):
        convert("odvae-official", _folder(tmp_path / "sd", sd, sd_vae), "odvae")
    with pytest.raises(ValueError, match="decoder_attention': '\\(missing\\)'"):  # its default is AttnBlock3D
        convert("odvae-official", _folder(tmp_path / "old", sd, {k: v for k, v in official_config(**DEBUG).items()
                                                                 if k != "decoder_attention"}), "odvae")
    older = {k: v for k, v in official_config(**DEBUG).items() if k != "use_quant_layer"}  # written before it existed
    assert convert("odvae-official", _folder(tmp_path / "older", sd, older), "odvae-c4-debug").name == "odvae-c4-debug"
    with pytest.raises(ValueError, match="does not have the architecture of odvae-c4"):
        convert("odvae-official", path, "odvae-c4")  # the debug widths against the released ones
    truncated = {k: v for i, (k, v) in enumerate(sd.items()) if i % 5}
    with pytest.raises(ValueError, match=r"missing from the checkpoint"):
        convert("odvae-official", _folder(tmp_path / "cut", truncated, official_config(**DEBUG)), "odvae")
    with_loss = dict(sd, **{"loss.discriminator.main.0.weight": torch.zeros(2)})
    result = convert("odvae-official", _folder(tmp_path / "loss", with_loss, official_config(**DEBUG)), "odvae")
    assert any("dropped 1 tensor(s): the training loss" in n for n in result.notes)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(official_config(**DEBUG)))
    with pytest.raises(ValueError, match="holds no weights file"):
        convert("odvae-official", tmp_path / "empty", "odvae")
    with pytest.raises(ValueError, match="has no config.json"):
        convert("odvae-official", tmp_path, "odvae")


def test_official_names_are_the_public_ones():
    """Spot checks of the enumeration against names and shapes of the released model's tensors."""
    names = official_shapes(128, 4)
    for key, shape in {"encoder.conv_in.weight": (128, 3, 3, 3),
                       "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
                       "encoder.down.1.downsample.conv.conv.weight": (256, 256, 3, 3, 3),
                       "encoder.down.2.block.0.conv1.conv.weight": (512, 256, 3, 3, 3),
                       "encoder.mid.attn_1.q.conv.weight": (512, 512, 1, 1, 1),
                       "quant_conv.conv.weight": (8, 8, 1, 1, 1), "decoder.up.1.upsample.conv.conv.weight":
                       (256, 256, 1, 3, 3), "decoder.up.3.upsample.conv.conv.weight": (512, 512, 3, 3, 3),
                       "decoder.up.0.block.0.nin_shortcut.conv.weight": (128, 256, 1, 1, 1),
                       "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3)}.items():
        assert names[key] == shape, key


def test_ldm_convert_writes_a_folder_the_other_verbs_read(official, tmp_path, capsys):
    sd, path = official
    out = tmp_path / "converted"
    assert ldm(["convert", "--source", "odvae-official", "--path", str(path), "--target", "odvae-c4-debug",
                "--output", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["family"] == "odvae" and meta["name"] == "odvae-c4-debug"
    model = load_pretrained(out).eval()
    with torch.no_grad():
        mean = OfficialODVAE(sd, DEBUG["mult"], DEBUG["nrb"]).encode_moments(_video()).chunk(2, 1)[0]
        torch.testing.assert_close(model.encode(_video())["z"], LATENT_SCALE * mean, atol=1e-5, rtol=1e-4)
    capsys.readouterr()
    assert console(["convert", "--source", "odvae-official", "--path", str(path), "--target", "causal3d",
                    "--output", str(tmp_path / "wrong")]) == 2
    assert "odvae-official fills 'odvae'" in capsys.readouterr().err and not (tmp_path / "wrong").exists()
