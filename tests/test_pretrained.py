"""The diffusers wrappers: tiny random diffusers VAEs saved to a temporary folder and loaded through
``build("diffusers:<Class>", path=...)``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoencoders import build, load_pretrained

diffusers = pytest.importorskip("diffusers")

KL_MEAN, KL_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]

# class -> (tiny config, expected normalisation (z -> normalised) written from the pipelines, frames to try)
CASES = {
    "AutoencoderKL": (  # SD3 / Flux convention: (z - shift_factor) * scaling_factor
        dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
             layers_per_block=1, scaling_factor=0.5, shift_factor=0.1),
        lambda z, m: (z - 0.1) * 0.5, (1, 3)),
    "AutoencoderKL-sdxl": (  # SDXL convention when latents_mean/std are set: (z - mean) * sf / std
        dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
             layers_per_block=1, scaling_factor=0.5, latents_mean=KL_MEAN, latents_std=KL_STD),
        lambda z, m: (z - _c(KL_MEAN)) * 0.5 / _c(KL_STD), (2,)),
    "AutoencoderDC": (  # Sana: z * scaling_factor; deterministic encoder
        dict(encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
             encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
             encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), encoder_block_types="ResBlock",
             decoder_block_types="ResBlock", latent_channels=4, attention_head_dim=8, scaling_factor=0.41),
        lambda z, m: z * 0.41, (1, 2)),
    "AutoencoderKLCogVideoX": (  # CogVideoX: z * scaling_factor
        dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
             scaling_factor=0.7),
        lambda z, m: z * 0.7, (1, 9, 17)),
    "AutoencoderKLLTXVideo": (  # LTX: (z - mean) * scaling_factor / std with the model's buffers
        dict(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
             layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), latent_channels=4,
             scaling_factor=0.9),
        lambda z, m: (z - _c(m.latents_mean)) * 0.9 / _c(m.latents_std), (1, 9, 17)),
    "AutoencoderKLWan": (  # Wan: (z - mean) / std
        dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=KL_MEAN,
             latents_std=KL_STD),
        lambda z, m: (z - _c(KL_MEAN)) / _c(KL_STD), (1, 5)),
    "AutoencoderKLHunyuanVideo": (  # HunyuanVideo: z * scaling_factor
        dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
             scaling_factor=0.476986),
        lambda z, m: z * 0.476986, (1, 5)),
}
SIZE = {"AutoencoderKLLTXVideo": 32}  # spatial factor 32; the others use 16 x 16 inputs


def _c(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1)


def _class(case: str) -> str:
    return case.split("-")[0]


def _raw_model(case: str):
    torch.manual_seed(0)
    model = getattr(diffusers, _class(case))(**CASES[case][0]).eval()
    if case == "AutoencoderKLLTXVideo":  # non-trivial statistics in the persistent buffers
        model.latents_mean.copy_(torch.tensor(KL_MEAN))
        model.latents_std.copy_(torch.tensor(KL_STD))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    out = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case)
        model = _raw_model(case)
        model.save_pretrained(folder)
        out[case] = (model, folder)
    return out


def _video(frames: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def _raw_encode(model, case: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The raw model's posterior mean / logvar as B c t h w (image models frame by frame)."""
    image = _class(case) in ("AutoencoderKL", "AutoencoderDC")
    inputs = [x[:, :, t] for t in range(x.shape[2])] if image else [x]
    means, logvars = [], []
    for inp in inputs:
        out = model.encode(inp)
        if _class(case) == "AutoencoderDC":
            means.append(out.latent)
        else:
            means.append(out.latent_dist.mean)
            logvars.append(out.latent_dist.logvar)
    if image:
        return torch.stack(means, 2), (torch.stack(logvars, 2) if logvars else None)
    return means[0], logvars[0]


def _raw_decode(model, case: str, z: torch.Tensor) -> torch.Tensor:
    if _class(case) in ("AutoencoderKL", "AutoencoderDC"):
        return torch.stack([model.decode(z[:, :, t]).sample for t in range(z.shape[2])], 2)
    return model.decode(z).sample


@pytest.mark.parametrize("case", list(CASES))
def test_wrapper_matches_the_raw_model(case, saved):
    raw, folder = saved[case]
    ae = build(f"diffusers:{_class(case)}", path=folder).eval()
    assert ae.family == "diffusers"
    normalise, frame_counts = CASES[case][1], CASES[case][2]
    size = SIZE.get(_class(case), 16)
    for frames in frame_counts:
        x = _video(frames, size)
        with torch.no_grad():
            latent = ae.encode(x)
            mean, logvar = _raw_encode(raw, case, x)
            recon = ae.decode(latent)
            raw_recon = _raw_decode(raw, case, mean)
        spec = ae.latent_spec(frames, size, size)
        assert latent.shapes() == spec.parts
        assert recon.shape == x.shape
        # encode returns the normalised posterior mean, decode undoes the normalisation
        torch.testing.assert_close(latent["z"], normalise(mean, raw), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(recon, raw_recon, rtol=1e-4, atol=1e-4)
        if logvar is None:
            assert latent.logvar == {}
        else:
            scale = torch.tensor(ae.config.latent_scale).view(1, -1, 1, 1, 1)
            torch.testing.assert_close(latent.logvar["z"], logvar + 2 * torch.log(scale), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo", "AutoencoderKL"])
def test_save_load_round_trip(case, saved, tmp_path):
    _, folder = saved[case]
    ae = build(f"diffusers:{_class(case)}", path=folder).eval()
    ae.save_pretrained(tmp_path / "ours", name=f"diffusers:{_class(case)}")
    loaded = load_pretrained(tmp_path / "ours").eval()
    assert loaded.config == ae.config
    x = _video(CASES[case][2][-1], SIZE.get(_class(case), 16))
    with torch.no_grad():
        a, b = ae.encode(x), loaded.encode(x)
        torch.testing.assert_close(a["z"], b["z"], rtol=0, atol=0)
        torch.testing.assert_close(ae.decode(a), loaded.decode(b), rtol=0, atol=0)


def test_frame_rules_and_sizes(saved):
    # class -> (temporal factor, spatial factor, frame step: T = 1 + step * k)
    expected = {"AutoencoderKLCogVideoX": (4, 8, 8), "AutoencoderKLWan": (4, 8, 4),
                "AutoencoderKLHunyuanVideo": (4, 8, 4), "AutoencoderKLLTXVideo": (8, 32, 8),
                "AutoencoderKL": (1, 2, 1), "AutoencoderDC": (1, 2, 1)}
    for name, (r, f, step) in expected.items():
        ae = build(f"diffusers:{name}", path=saved[name][1])
        frames = 1 + 2 * step
        spec = ae.latent_spec(frames, 2 * f, 3 * f)
        assert spec.parts["z"] == (4, 1 + (frames - 1) // r, 2, 3)
        assert spec.vcpr == pytest.approx(frames / spec.parts["z"][1] * f * f)
        if step > 1:
            with pytest.raises(ValueError, match=rf"1 \+ {step}k frames"):
                ae.latent_spec(1 + step // 2, f, f)
        with pytest.raises(ValueError, match=f"multiples of {f}"):
            ae.latent_spec(1, f + 1, f)


def test_ltx_timestep_conditioned_decoder(tmp_path):
    cfg = dict(CASES["AutoencoderKLLTXVideo"][0], timestep_conditioning=True)
    torch.manual_seed(0)
    raw = diffusers.AutoencoderKLLTXVideo(**cfg).eval()
    raw.save_pretrained(tmp_path)
    ae = build("diffusers:AutoencoderKLLTXVideo", path=tmp_path, decode_timestep=0.05).eval()
    x = _video(9, 32)
    with torch.no_grad():
        latent = ae.encode(x)
        mean = raw.encode(x).latent_dist.mean
        torch.testing.assert_close(ae.decode(latent), raw.decode(mean, torch.tensor([0.05])).sample,
                                   rtol=1e-4, atol=1e-5)


def test_overrides_and_subfolder(saved, tmp_path):
    raw, folder = saved["AutoencoderKLWan"]
    pipeline = tmp_path / "pipeline"
    raw.save_pretrained(pipeline / "vae")
    with pytest.raises(FileNotFoundError, match="its VAE is the vae/ subfolder"):
        build("diffusers:AutoencoderKLWan", path=pipeline)
    ae = build("diffusers:AutoencoderKLWan", path=pipeline, subfolder="vae", latent_scale=(2.0,),
               latent_shift=(0.5,)).eval()
    x = _video(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(x)["z"], (raw.encode(x).latent_dist.mean - 0.5) * 2.0)
    with pytest.raises(ValueError, match="cannot be overridden"):
        build("diffusers:AutoencoderKLWan", path=folder, model_config={})
    with pytest.raises(ValueError, match="unknown override"):
        build("diffusers:AutoencoderKLWan", path=folder, torch_dtype="bf16")
    with pytest.raises(ValueError, match="latent_scale"):
        build("diffusers:AutoencoderKLWan", path=folder, latent_scale=(1.0, 2.0))


def test_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        build("diffusers:AutoencoderKL", path=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build("diffusers:AutoencoderKL", path=tmp_path)
    with pytest.raises(ValueError, match="unsupported diffusers autoencoder class"):
        build("diffusers:AutoencoderTotallyNew", path=tmp_path)
    with pytest.raises(ValueError, match="needs path="):
        build("diffusers:AutoencoderKL")
    with pytest.raises(ValueError, match="holds a AutoencoderKLWan"):
        build("diffusers:AutoencoderKL", path=saved["AutoencoderKLWan"][1])
    assert json.loads((saved["AutoencoderKL"][1] / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    # a pipeline's text_encoder/ (a transformers config) and a VAE folder without its weights file
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        build("diffusers:AutoencoderKL", path=tmp_path, subfolder="text_encoder")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text((saved["AutoencoderKL"][1] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no file named"):
        build("diffusers:AutoencoderKL", path=tmp_path, subfolder="vae")
    # and the reverse: one of ours where a diffusers folder is expected (was: "a transformers model?")
    build("kl2d-f8c4-debug").save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="holds one of our own models \\(kl2d\\), not a diffusers one: give it to "
                                         "--checkpoint / --init as it is"):
        build("diffusers:AutoencoderKL", path=tmp_path / "ours")
    # a diffusers folder where one of ours is expected (--checkpoint, --init) says how to use it
    with pytest.raises(ValueError, match="is a diffusers AutoencoderKL folder, not one of ours.*ldm convert --source"):
        load_pretrained(saved["AutoencoderKL"][1])
    with pytest.raises(ValueError, match="as --autoencoder diffusers:AutoencoderKLWan with the folder as its path$"):
        load_pretrained(saved["AutoencoderKLWan"][1])
