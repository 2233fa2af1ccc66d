"""Official VideoVAE+ checkpoints -> ``cmvae`` (autoencoders/crossmodal_weights.py), without the
released files: the test writes state dicts with the official names and shapes
(tests/official_videovaeplus.py enumerates them as the public ``AutoencoderKL2plus1D_1dcnn`` does)
and checks that the converted model reproduces the public forward pass in video mode, image mode and
with text, and that wrong files give clear errors."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from autoencoders import build
from autoencoders.sources import convert
from ldm.latent import Cond
from official_videovaeplus import Layout, OfficialVideoVAEPlus, official_shapes, official_state_dict

# the public module's sizes (counted from its modules, equal to the enumeration): they include a
# temporal conv on every residual shortcut (99,114,240 parameters) that its forward runs only where
# the width changes, which ours holds only there
OFFICIAL_PARAMS = {"cmvae-z4": 484_901_107, "cmvae-z4-text": 590_774_771, "cmvae-z16": 485_689_043,
                   "cmvae-z16-text": 591_562_707}
UNUSED_PARAMS = 99_114_240


def _layout(name: str) -> Layout:
    """The official layout of a registered name (debug twins: our debug widths and text width)."""
    z, text = (16 if "z16" in name else 4), "text" in name
    if name.endswith("-debug"):
        return Layout(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z=z, quant_conv=z == 4, hidden=16, groups=8,
                      text_dim=256 if text else 0, heads=2, dim_head=16)
    return Layout(z=z, quant_conv=z == 4, text_dim=1024 if text else 0)


def _inputs(text_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 8, 32, 32, generator=g) * 2 - 1
    if not text_dim:
        return x, None, None, None
    ctx = torch.randn(1, 7, text_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    return x, ctx, mask, Cond(text=ctx, text_mask=mask.bool())


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_registered_configs_are_the_official_models(name):
    shapes = official_shapes(_layout(name))
    assert sum(math.prod(s) for s in shapes.values()) == OFFICIAL_PARAMS[name]
    unused = sum(math.prod(s) for k, s in shapes.items()
                 if ".conv3_tmp." in k and k.split(".conv3_tmp.")[0] + ".nin_shortcut.weight" not in shapes)
    with torch.device("meta"):
        ours = build(name).num_parameters()
    assert unused == UNUSED_PARAMS and ours == OFFICIAL_PARAMS[name] - UNUSED_PARAMS


@pytest.mark.parametrize("name", ["cmvae-z4-debug", "cmvae-z16-text-debug"])
def test_conversion_reproduces_the_public_forward(name, tmp_path):
    L = _layout(name)
    sd = official_state_dict(L, seed=1)
    sd["loss.logvar"] = torch.zeros(())  # the training loss rides along in the released files
    save_file(sd, tmp_path / "official.safetensors")
    result = convert("videovaeplus-official", tmp_path / "official.safetensors", "cmvae")
    assert result.name == name  # the family target finds the registered shapes
    assert any("conv3_tmp" in n for n in result.notes) and any("training loss" in n for n in result.notes)
    model, ref = result.model, OfficialVideoVAEPlus(sd, L)
    x, ctx, mask, cond = _inputs(L.text_dim)
    with torch.no_grad():
        lat = model.encode(x, cond)
        mean, logvar = ref.encode(x, ctx, mask)
        torch.testing.assert_close(lat["z"], mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lat.logvar["z"], logvar, atol=1e-4, rtol=1e-4)
        out, ref_out = model.decode(lat, cond), ref.decode(mean, ctx, mask)
        torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=2e-4)
        image = x[:, :, :1]
        torch.testing.assert_close(model.encode(image, cond)["z"], ref.encode_image(image, ctx, mask), atol=1e-4, rtol=1e-4)
    assert mean.abs().max() > 0.1 and ref_out.abs().max() > 0.1
    if cond is not None:  # the text path is live: another caption changes the latent
        other = Cond(text=torch.randn_like(cond.text), text_mask=cond.text_mask)
        with torch.no_grad():
            assert (model.encode(x, other)["z"] - lat["z"]).abs().max() > 1e-3


def test_wrong_checkpoints_are_clear_errors(tmp_path):
    sd = official_state_dict(_layout("cmvae-z4-debug"), seed=1)
    save_file(sd, tmp_path / "z4.safetensors")
    with pytest.raises(ValueError, match="no text layers .*--target cmvae-z4-debug, then .*--source saved"):
        convert("videovaeplus-official", tmp_path / "z4.safetensors", "cmvae-z4-text-debug")
    with pytest.raises(ValueError, match="in the checkpoint but not used: .*quant_conv"):  # the z16 model has none
        convert("videovaeplus-official", tmp_path / "z4.safetensors", "cmvae-z16-debug")
    del sd["decoder_temporal.conv_last.conv.bias"]
    save_file(sd, tmp_path / "truncated.safetensors")
    with pytest.raises(ValueError, match=r"1 tensor\(s\) missing from the checkpoint: \[decoder_temporal.conv_last.conv.bias\]"):
        convert("videovaeplus-official", tmp_path / "truncated.safetensors", "cmvae-z4-debug")
    with pytest.raises(ValueError, match="match none"):
        convert("videovaeplus-official", tmp_path / "truncated.safetensors", "cmvae")
    with pytest.raises(ValueError, match="layout needs"):
        convert("videovaeplus-official", tmp_path / "z4.safetensors", "cmvae-z4-simultaneous-debug")
