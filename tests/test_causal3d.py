"""causal3d's IV-VAE switches (norm="rms", upsample_shrink, temporal_padding="group", quant_conv) and the
registered IV-VAE baseline, Table 4's (A) and (A) + group causal conv, with its initialisation from an
image VAE (Sec. 3.1; tiny configs, CPU). The registry-wide tests (tests/test_autoencoders.py: shapes,
save/load, causality by latent frame; test_contract.py) run on the -debug twins too."""
from __future__ import annotations

import pytest
import torch

import autoencoders.blocks as blocks
from autoencoders import REGISTRY, build, describe, load_pretrained
from autoencoders.blocks import CausalConv3d, ChannelRMSNorm, GroupCausalConv3d, TemporalDownsample
from autoencoders.causal3d import Causal3D
from launch.cli import console
from launch.cli import main as ldm

BASELINE = "causal3d-ivvae-baseline-z8"
VARIANTS = (BASELINE + "-debug", BASELINE + "-gc-debug")


def _model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(name, **overrides).eval()


def _video(frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def test_baseline_has_the_papers_parameter_count_with_or_without_group_causal_conv():
    """Table 4: (A) has 127M parameters at Z = 8 and group causal convolution leaves the count
    unchanged (same tensors, same shapes); 344 of them are the quant convs its image VAE has."""
    plain, grouped = describe(BASELINE)["params"], describe(BASELINE + "-gc")["params"]
    assert plain == grouped == 126_642_355 + 16 * 17 + 8 * 9
    assert abs(plain - 127e6) / 127e6 < 0.005
    with torch.device("meta"):
        shapes = [{k: v.shape for k, v in build(n).state_dict().items()} for n in VARIANTS]
    assert shapes[0] == shapes[1]
    assert REGISTRY[BASELINE][1].latent_channels == 8 and describe(BASELINE)["latent_shape"]["z"] == [8, 5, 32, 32]


def test_switches_build_rms_norms_a_shrinking_upsampler_and_group_convs_at_each_levels_group_size():
    plain, grouped = (_model(n) for n in VARIANTS)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
    assert sum(isinstance(m, ChannelRMSNorm) for m in plain.modules()) > 0
    assert [s.resample.conv.out_channels * 2 for s in plain.decoder.stages[:-1]] == \
        [s.resample.conv.in_channels for s in plain.decoder.stages[:-1]]  # each upsampler halves the width
    # plain: every 3x3x3 convolution causal; -gc: every one a GCConv (the resamplers stay causal)
    assert not any(isinstance(m, GroupCausalConv3d) for m in plain.modules())
    assert all(isinstance(m, TemporalDownsample) or m.kernel_size == (3, 1, 1)
               for m in grouped.modules() if isinstance(m, CausalConv3d))
    enc, dec = grouped.encoder, grouped.decoder
    levels = lambda stages: [{b.conv1.group for b in s.blocks} | {b.conv2.group for b in s.blocks}  # noqa: E731
                             for s in stages]
    # time halves at the two deepest boundaries: groups of 4, 4, 2, then 1 frame per latent frame
    assert (enc.conv_in.group, levels(enc.stages), enc.mid.res1.conv1.group, enc.conv_out.group) == \
        (4, [{4}, {4}, {2}, {1}], 1, 1)
    assert (dec.conv_in.group, dec.mid.res2.conv2.group, levels(dec.stages), dec.conv_out.group) == \
        (1, 1, [{1}, {2}, {4}, {4}], 4)


def _first_level(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's features at full frame rate (conv_in and the first level's ResBlocks)."""
    h = model.encoder.conv_in(x)
    for block in model.encoder.stages[0].blocks:
        h = block(h)
    return h


@pytest.mark.parametrize("name", VARIANTS)
def test_causal_features_see_the_past_and_group_causal_features_see_their_whole_group(name):
    """Plain causal: feature frame t is independent of every later frame. Group causal: frame 0 and
    the groups 1-4, 5-8 are independent of later groups, and a group's frames see each other."""
    model = _model(name)
    x = _video(9)
    with torch.no_grad():
        h = _first_level(model, x)
        for s in (1, 3, 4, 6):
            x2 = x.clone()
            x2[:, :, s] += 0.5
            h2 = _first_level(model, x2)
            start = s if name == VARIANTS[0] else 1 + 4 * ((s - 1) // 4)  # the first frame s can reach
            torch.testing.assert_close(h2[:, :, :start], h[:, :, :start], rtol=0, atol=0)
            assert (h2[:, :, start] - h[:, :, start]).abs().max() > 1e-4


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("grad", [False, True])
def test_chunked_encode_and_decode_equal_one_shot(name, grad, monkeypatch):
    """--chunk-frames streams both variants with the one-shot result (the group convolutions' cache
    holds the previous group's last frame), in inference (several frame windows per call) and with
    autograd."""
    monkeypatch.setattr(blocks, "FRAME_CHUNK_ELEMENTS", 700)
    model = _model(name)
    x = _video(21)
    with torch.set_grad_enabled(grad):
        latent = model.encode(x)
        y = model.decode(latent)
        for frames in (4, 8):  # chunks of 1 + 4 + 4 + ... frames, and 5 | 8 | 8
            model.set_chunk_frames(frames)
            chunked = model.encode(x)
            torch.testing.assert_close(chunked["z"], latent["z"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.decode(latent), y, atol=1e-5, rtol=1e-5)
        model.set_chunk_frames(None)


def test_quant_convs_are_off_by_default_and_wrap_the_latent():
    """``quant_conv`` (the baseline's, as its image VAE's): 1x1x1 convs after the encoder and before the
    decoder, also when streamed; off, existing models keep their tensors."""
    assert not any("quant_conv" in k for k in _model("causal3d-f4x8c4-debug").state_dict())
    model = _model(VARIANTS[0])
    x = _video(9)
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(x))
        torch.testing.assert_close(model.encoder_moments(x), moments, rtol=0, atol=0)
        z = moments[:, :8]
        torch.testing.assert_close(model.decoder_video(z), model.decoder(model.post_quant_conv(z)), rtol=0, atol=0)
        model.set_chunk_frames(4)
        torch.testing.assert_close(model.encoder_moments(x), moments, rtol=1e-5, atol=1e-5)


def test_switches_are_checked():
    for override, match in ((dict(temporal_padding="grouped"), "temporal_padding must be one of"),
                            (dict(norm="layer"), "norm must be 'group', 'clip' or 'rms'")):
        with pytest.raises(ValueError, match=match):
            build("causal3d-f4x8c4-debug", **override)
    model = _model(VARIANTS[1])
    extra = {1: [TemporalDownsample(32)]}  # MTC-VAE's further resamplers would regroup the frames
    with pytest.raises(ValueError, match="temporal_padding='causal'"):
        model.encoder_moments(_video(9), extra)


# --- initialisation from the image VAE (Sec. 3.1) -------------------------------------------
def _image_vae(name: str = "kl2d-ivvae-z16-dim96-debug") -> torch.nn.Module:
    """The debug twin of (A)'s image VAE (8 latent channels) with non-trivial norms, biases and quant convs."""
    torch.manual_seed(0)
    model = build(name).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", [*VARIANTS, None])
def test_inflated_model_is_the_image_vae_on_images_static_videos_and_each_groups_last_frame(name):
    """At step 0 an image, and every frame of a static video, reconstruct as the image VAE does; on a
    moving video latent frame j is the image latent of frame 4j, decoded over its group's 4 frames
    (both variants, and the image VAE's own layout: ``--target causal3d``, here an SD-style GroupNorm
    one). Tolerance 1e-5 (float32 rounding; measured ~2e-6)."""
    image = _image_vae("kl2d-f8c4-debug" if name is None else "kl2d-ivvae-z16-dim96-debug")
    model = Causal3D.from_kl2d(image, name).eval()
    if name is not None:
        assert model.config == REGISTRY[name][1]
    tol = dict(rtol=0, atol=1e-5)
    x = _video(9)
    static = x[:, :, :1].expand(-1, -1, 9, -1, -1)
    with torch.no_grad():
        for clip in (x[:, :, :1], static):
            torch.testing.assert_close(model.decode(model.encode(clip)), image.decode(image.encode(clip)), **tol)
        lat, ref = model.encode(x), image.encode(x[:, :, [0, 4, 8]])
        torch.testing.assert_close(lat["z"], ref["z"], **tol)
        torch.testing.assert_close(lat.logvar["z"], ref.logvar["z"], **tol)
        torch.testing.assert_close(model.decode(lat), image.decode(ref)[:, :, [0, 1, 1, 1, 1, 2, 2, 2, 2]], **tol)
    with torch.no_grad():  # a fresh model is nowhere near it
        assert (Causal3D(model.config).eval().decode(lat) - model.decode(lat)).abs().mean() > 0.1


def test_the_full_size_baseline_takes_the_papers_image_vae():
    """(A) and (A) + GCConv at full size take kl2d-ivvae-z16-dim96 (checked on the meta device); every
    tensor filled, the image VAE's latent statistics kept."""
    with torch.device("meta"):
        image = build("kl2d-ivvae-z16-dim96")
        for name in (BASELINE, BASELINE + "-gc"):
            assert Causal3D.from_kl2d(image, name).config == REGISTRY[name][1]
    stats = dict(latent_scale=tuple(range(1, 9)), latent_shift=(0.5,))
    model = Causal3D.from_kl2d(build("kl2d-ivvae-z16-dim96-debug", **stats), VARIANTS[0])
    assert (model.config.latent_scale, model.config.latent_shift) == (stats["latent_scale"], stats["latent_shift"])


def test_a_mismatched_image_vae_is_refused_in_one_line(tmp_path, capsys):
    """Another Z or width, or a target without the quant convs the image VAE has (its post-quant conv
    would not fold into conv_in exactly), is refused naming the fields, before anything is written."""
    with pytest.raises(ValueError, match=r"'latent_channels': \(8, 4\), 'base_channels': \(12, 8\)"):
        Causal3D.from_kl2d(build("kl2d-ivvae-z8-debug"), VARIANTS[0])
    with pytest.raises(ValueError, match=r"{'quant_conv': \(False, True\)}"):
        Causal3D.from_kl2d(build("kl2d-f8c4-debug"), "causal3d-f4x8c4-debug")  # same layout, no quant convs
    build("kl2d-ivvae-z8-debug").save_pretrained(tmp_path / "z4", "kl2d-ivvae-z8-debug")
    assert console(["convert", "--source", "saved", "--path", str(tmp_path / "z4"), "--target", VARIANTS[1],
                    "--output", str(tmp_path / "video")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "does not match the image VAE" in err and "kl2d-ivvae-z16-dim96" in err
    assert not (tmp_path / "video").exists()


def test_ldm_convert_saved_writes_the_inflated_baseline(tmp_path):
    """``ldm convert --source saved --path IMAGE_VAE --target causal3d-ivvae-baseline-z8-gc``: the saved
    video VAE loads back as the registered model and reconstructs an image as the image VAE."""
    image = _image_vae()
    image.save_pretrained(tmp_path / "image", "kl2d-ivvae-z16-dim96-debug")
    assert ldm(["convert", "--source", "saved", "--path", str(tmp_path / "image"), "--target", VARIANTS[1],
                "--output", str(tmp_path / "video")]) == 0
    video = load_pretrained(tmp_path / "video").eval()
    assert isinstance(video, Causal3D) and video.config == REGISTRY[VARIANTS[1]][1]
    x = _video(1)
    with torch.no_grad():
        torch.testing.assert_close(video.decode(video.encode(x)), image.decode(image.encode(x)), rtol=0, atol=1e-5)
