"""Official IV-VAE checkpoints -> ``ivvae`` (autoencoders/ivvae_weights.py) and the ``ldm convert``
verb, without the released files: the test writes a state dict with the official names and shapes
(tests/official_ivvae.py enumerates them the way the public ``VAutoencoder3d`` does) and checks that
the converted model reproduces the public forward pass (the same reference, run chunk by chunk as
the public code does) and that wrong files give clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from autoencoders import build, load_pretrained
from autoencoders.ivvae_weights import OFFICIAL_STATS
from autoencoders.sources import convert
from launch.cli import console
from launch.cli import main as ldm
from ldm.checkpoint import read_state_dict
from ldm.errors import UserError
from official_ivvae import OfficialIVVAE, official_shapes, official_state_dict, parameter_count

# the public code's VAutoencoder3d sizes (counted from its modules; equal to the enumeration here)
OFFICIAL_PARAMS = {"ivvae-z4": 107_170_842, "ivvae-z8": 107_379_150, "ivvae-z16": 107_798_550,
                   "ivvae-z16-dim96": 241_854_742}
DEBUG = dict(mult=(1, 2, 2, 2), nrb=1)  # the layout of the ivvae-*-debug twins (dim 8, or 12 for dim96)


def _video(frames: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny official-named checkpoint (the ivvae-z16-debug shapes) written as a .pth file."""
    sd = official_state_dict(8, 16, DEBUG["mult"], DEBUG["nrb"], seed=1)
    path = tmp_path_factory.mktemp("ivvae") / "ivvae_z16_dim8.pth"
    torch.save(sd, path)
    return sd, path


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_registered_configs_have_the_official_names_sizes(name):
    """Parameter for parameter the official model: the count (and, through the mapping, every shape)."""
    z, dim = (16, 96) if name.endswith("dim96") else (int(name.split("-z")[1]), 64)
    with torch.device("meta"):
        model = build(name)
    assert model.num_parameters() == parameter_count(dim, z) == OFFICIAL_PARAMS[name]


def test_conversion_reproduces_the_public_forward(official):
    sd, path = official
    result = convert("ivvae-official", path, "ivvae-z16-debug")
    model, ref = result.model, OfficialIVVAE(sd, **DEBUG)
    x = _video()
    with torch.no_grad():
        key_mean, key_logvar, motion_mean, motion_logvar = model.encoder_moments(x).chunk(4, dim=1)
        ref_mean, ref_logvar = ref.encode(x)
        torch.testing.assert_close(torch.cat([key_mean, motion_mean], 1), ref_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.cat([key_logvar, motion_logvar], 1), ref_logvar, atol=1e-4, rtol=1e-4)
        lat = model.encode(x)  # the contract: posterior mean, no scale for a debug target
        torch.testing.assert_close(lat["z"], ref_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.decode(lat), ref.decode(ref_mean), atol=1e-4, rtol=1e-4)
    assert ref_mean.abs().max() > 0.1 and ref.decode(ref_mean).abs().max() > 0.1  # not trivially zero


def test_the_fuse_permutation_matters(official):
    """The equality above can fail: the same model with the official fuse columns NOT permuted
    (read in the public order as if it were ours) gives other latents."""
    sd, path = official
    model = convert("ivvae-official", path, "ivvae-z16-debug").model
    x = _video()
    with torch.no_grad():
        good = model.encode(x)["z"]
        model.encoder.head.fuse.weight.copy_(sd["encoder.head.2.PAC_conv.conv.weight"])
        assert (model.encode(x)["z"] - good).abs().max() > 1e-2


def test_family_target_finds_the_registered_shapes_and_paper_names_get_the_released_statistics(official, monkeypatch):
    sd, path = official
    result = convert("ivvae-official", path, "ivvae")
    assert result.name == "ivvae-z16-debug" and result.model.config.latent_scale == (1.0,)
    monkeypatch.setitem(OFFICIAL_STATS, "ivvae-z16-debug", (0.5, 0.25))
    model = convert("ivvae-official", path, "ivvae-z16-debug").model
    assert model.config.latent_scale == (0.5,) and model.config.latent_shift == (0.25,)
    x = _video()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)["z"], 0.5 * (OfficialIVVAE(sd, **DEBUG).encode(x)[0] - 0.25),
                                   atol=1e-4, rtol=1e-4)


def test_wrong_or_truncated_checkpoints_are_clear_errors(official, tmp_path):
    sd, path = official
    truncated = {k: v for i, (k, v) in enumerate(sd.items()) if i % 7}
    save_file(truncated, tmp_path / "truncated.safetensors")
    with pytest.raises(ValueError, match=r"tensor\(s\) missing from the checkpoint: \[conv1.conv_2d.bias, decoder"):
        convert("ivvae-official", tmp_path / "truncated.safetensors", "ivvae-z16-debug")
    extra = dict(sd, **{"encoder.extra.weight": torch.zeros(3)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"in the checkpoint but not used: \[encoder.extra.weight\]"):
        convert("ivvae-official", tmp_path / "extra.safetensors", "ivvae-z16-debug")
    with pytest.raises(ValueError, match="with the wrong shape"):
        convert("ivvae-official", path, "ivvae-z4-debug")  # another latent width
    with pytest.raises(ValueError, match="match none"):
        save_file(official_state_dict(4, 16, DEBUG["mult"], DEBUG["nrb"]), tmp_path / "dim4.safetensors")
        convert("ivvae-official", tmp_path / "dim4.safetensors", "ivvae")
    with pytest.raises(ValueError, match="is a 'kl2d'"):
        convert("ivvae-official", path, "kl2d-f8c4-debug")
    torch.save({"state_dict": sd, "note": object()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(tmp_path / "pickled.ckpt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lightning.ckpt")
    assert set(read_state_dict(tmp_path / "lightning.ckpt")) == set(sd)  # a Lightning file is unwrapped


def test_official_names_are_the_public_ones():
    """Spot checks of the enumeration against names of the public code's modules."""
    names = official_shapes(64, 16)
    for key, shape in {"encoder.conv1.conv_3d.weight": (64, 3, 3, 3, 3), "encoder.downsamples.9.Attention_2d.to_qkv.weight":
                       (768, 256, 1, 1), "encoder.head.2.PAC_conv.conv.weight": (32, 192, 1, 1),
                       "decoder.upsamples.6.time_conv.weight": (512, 256, 1, 1, 1), "conv2.conv_3d.weight": (8, 16, 1, 1, 1),
                       "decoder.head.2.conv_2d.weight": (3, 128, 3, 3)}.items():
        assert names[key] == shape, key


def test_ldm_convert_writes_a_folder_the_other_verbs_read(official, tmp_path, capsys):
    sd, path = official
    out = tmp_path / "converted"
    assert ldm(["convert", "--source", "ivvae-official", "--path", str(path), "--target", "ivvae",
                "--output", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["family"] == "ivvae" and meta["name"] == "ivvae-z16-debug"
    model = load_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(_video())["z"], OfficialIVVAE(sd, **DEBUG).encode(_video())[0],
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="already holds a model"):
        ldm(["convert", "--source", "ivvae-official", "--path", str(path), "--target", "ivvae", "--output", str(out)])
    capsys.readouterr()
    assert console(["convert", "--source", "ivvae-official", "--path", str(path), "--target", "kl2d",
                    "--output", str(tmp_path / "other")]) == 2  # a user error: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("ldm convert: error: ivvae-official") and "'kl2d'" in err and len(err.splitlines()) == 1


def test_convert_saved_inflates_a_trained_image_vae(tmp_path, capsys):
    """`ldm convert --source saved`: the image VAE a kl2d run saved -> the registered video VAE by
    the family's initialiser (IVVAE.from_kl2d), the same weights as calling it in Python."""
    from autoencoders.ivvae import IVVAE

    torch.manual_seed(0)
    image = build("kl2d-ivvae-z16-debug")
    image.save_pretrained(tmp_path / "image", "kl2d-ivvae-z16-debug")
    assert ldm(["convert", "--source", "saved", "--path", str(tmp_path / "image"), "--target", "ivvae-z16-debug",
                "--output", str(tmp_path / "video")]) == 0
    video, expected = load_pretrained(tmp_path / "video"), IVVAE.from_kl2d(image, "ivvae-z16-debug")
    assert video.config == expected.config
    got, want = video.state_dict(), expected.state_dict()
    inflated = [k for k in want if ".qkv." not in k]  # attention q/k/v start fresh (random) in from_kl2d
    assert got.keys() == want.keys() and len(inflated) > len(want) // 2
    assert all(torch.equal(got[k], want[k]) for k in inflated)
    # the same family needs no conversion; a pair without an initialiser names the known ones
    for target, message in (("kl2d-ivvae-z16-debug", "already holds a 'kl2d'"),
                            ("h3ae-4x16x16-debug", "no initialiser of a 'h3ae' from a 'kl2d'; known: "),
                            # was: "build it with IVVAE.from_kl2d", Python for a command-line user
                            ("ivvae-z4-debug", "'latent_channels': (4, 16)}; the family as the target")):
        assert console(["convert", "--source", "saved", "--path", str(tmp_path / "image"), "--target", target,
                        "--output", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a torch checkpoint of tensors"):
        read_state_dict(tmp_path / "junk.pth")


def test_ablation_variants_never_take_the_released_weights(tmp_path):
    """The Z=8 ablation variants (plain causal convs: the released z8 shapes with another forward)
    never receive the released weights: ``--target ivvae`` finds the paper's model alone, and naming a
    variant says which switch differs (was: "23 tensor(s) with the wrong shape", the 3D kernels read
    as 2D ones)."""
    save_file(official_state_dict(8, 8, DEBUG["mult"], DEBUG["nrb"], seed=1), tmp_path / "z8.safetensors")
    assert convert("ivvae-official", tmp_path / "z8.safetensors", "ivvae").name == "ivvae-z8-debug"
    for name, switch in (("ivvae-z8-causal-debug", "'temporal_padding': 'causal'"),
                         ("ivvae-z8-3d3d-debug", "'key_branch': '3d'")):
        with pytest.raises(UserError, match=f"official IV-VAE layout.*{switch}.*pass one of those or --target ivvae"):
            convert("ivvae-official", tmp_path / "z8.safetensors", name)
