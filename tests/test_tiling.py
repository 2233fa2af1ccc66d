"""Spatial tiling (``Autoencoder.enable_tiling``, autoencoders/tiling.py): exact where the blend
leaves out every position whose receptive field a tile cuts, within a stated PSNR for the real
families, untiled shapes for any size, clear errors, and work bounded by the tile."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import autoencoders
from autoencoders.base import AEConfig, Autoencoder
from autoencoders.tiling import blend_weights, configure_inference, tile_spans
from data.synth import combinations, synth_clip
from ldm.latent import Cond, Latent, LatentSpec
from ldm.metrics import psnr

import fakes  # noqa: F401  (registers the fake autoencoders)


def _video(frames: int, height: int, width: int) -> torch.Tensor:
    """Synthetic sample 0 of seed 0 (a shape moving over a textured background): ``1 3 T H W`` in [-1, 1]."""
    _, pixels = synth_clip(0, 0, combinations(), frames, height, width)  # uint8 (T, H, W, 3)
    return torch.from_numpy(pixels).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def _psnr_vs(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of ``x`` against ``reference`` with the reference's value range as the peak."""
    return float(psnr(x, reference, data_range=float(reference.max() - reference.min())).min())


# ------------------------------------------------------------------------------------------
# tile placement and blend weights
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,tile,overlap,margin", [(5, 16, 4, 0), (16, 16, 4, 0), (37, 16, 4, 2), (100, 16, 8, 4),
                                                      (100, 16, 0, 0), (41, 16, 12, 6), (17, 16, 2, 1)])
def test_spans_cover_full_tiles_and_weights_sum_to_one(size, tile, overlap, margin):
    spans = tile_spans(size, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(e - s == min(tile, size) for s, e in spans)  # every tile full size, none past the border
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and overlap <= e0 - s1 < tile  # at least the asked overlap, never a whole tile
    weights = blend_weights(spans, margin, torch.device("cpu"))
    total = torch.zeros(size)
    for i, ((s, e), w) in enumerate(zip(spans, weights)):
        assert w.shape == (e - s,) and bool((w >= 0).all())
        if i > 0:  # nothing within the margin of an inner edge
            assert bool((w[:margin] == 0).all())
        if i < len(spans) - 1:
            assert bool((w[e - s - margin:] == 0).all())
        total[s:e] += w
    torch.testing.assert_close(total, torch.ones(size))


def test_two_tile_blend_is_a_linear_cross_fade():
    """Two tiles overlapping by 4 with no margin: the second tile's weight rises 1/5, 2/5, 3/5, 4/5
    over the overlap (diffusers' ``blend_h`` shape, without its zero weight on the first column)."""
    first, second = blend_weights(tile_spans(12, 8, 4), 0, torch.device("cpu"))
    torch.testing.assert_close(second[:4], torch.tensor([0.2, 0.4, 0.6, 0.8]))
    torch.testing.assert_close(first[4:], torch.tensor([0.8, 0.6, 0.4, 0.2]))


# ------------------------------------------------------------------------------------------
# exactness on a model with a known, local receptive field
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeConfig(AEConfig):
    latent_channels: int = 3


class LocalProbe(Autoencoder):
    """A grid autoencoder with a local receptive field and no frame-wide operation (no norm, no
    attention), 4x spatial compression. Encoder: 3x3 conv (pixels), 4x4 stride-4 patch conv, 3x3
    conv (cells). Decoder: 3x3 conv (cells), 4x nearest upsampling, 3x3 conv (pixels); all with
    zero padding, 1 in time.

    Reach (how far inside a tile its cut edge changes outputs): latent cell ``i`` of a tile reads
    cells ``i-1..i+1`` of the patch conv, whose cell 0 reads the zero-padded pixel -1; cells 0 and
    1 are wrong, cell 2 is exact: reach 2 cells = 8 pixels. Decoded pixel ``p`` reads upsampled
    pixels ``p-1..p+1`` (pixel -1 is padding), from cells ``(p-1)//4 .. (p+1)//4`` of the first
    conv, whose cell 0 reads the padded cell -1: exact from ``p = 5`` on, reach 5 pixels. So with
    ``margin = 8`` every position that keeps a weight is computed exactly by its tile, and the
    weights sum to 1: tiled == untiled. With ``margin = 4`` the encoder's cell 1 (pixels 4..7)
    keeps weight and differs."""

    family = "local-probe"
    config_cls = ProbeConfig
    spatial_tiling = True
    spatial_factor = 4

    def __init__(self, config: ProbeConfig):
        super().__init__(config)
        c = config.latent_channels
        conv = lambda i, o: nn.Conv3d(i, o, (1, 3, 3), padding=(0, 1, 1))  # noqa: E731
        self.enc = nn.Sequential(conv(3, 8), nn.GELU(), nn.Conv3d(8, 8, (1, 4, 4), stride=(1, 4, 4)), nn.GELU(),
                                 conv(8, 2 * c))
        self.dec = nn.Sequential(conv(c, 8), nn.GELU(), nn.Upsample(scale_factor=(1, 4, 4)), conv(8, 3))

    def latent_spec(self, frames: int, height: int, width: int) -> LatentSpec:
        if height % 4 or width % 4:
            raise ValueError("height and width must be multiples of 4")
        c = self.config.latent_channels
        return LatentSpec("grid", {"z": (c, frames, height // 4, width // 4)}, (3, frames, height, width))

    def _encode(self, video, cond):
        mean, logvar = self.enc(video).chunk(2, dim=1)
        return Latent({"z": mean}, "grid", {"z": logvar})

    def _decode(self, latent, cond):
        return self.dec(latent["z"])


def _probe(dtype=torch.float32) -> LocalProbe:
    torch.manual_seed(0)
    return LocalProbe(ProbeConfig(latent_scale=(0.7,), latent_shift=(0.1,))).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tiled_equals_untiled_when_margin_covers_the_receptive_field(dtype):
    ae = _probe(dtype)
    video = _video(2, 44, 60).to(dtype)  # not a multiple of the tile: 3 x 4 tiles of 24 pixels
    ref = ae.encode(video)
    ref_video = ae.decode(ref)
    ae.enable_tiling(tile=24, overlap=16, margin=8)
    tiled = ae.encode(video)
    assert tiled["z"].dtype == dtype and tiled["z"].shape == ref["z"].shape
    # bf16: the convolutions of a tile and of the frame may round differently; the blend is float32
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(tiled["z"], ref["z"], **tol)
    torch.testing.assert_close(tiled.logvar["z"], ref.logvar["z"], **tol)
    tiled_video = ae.decode(ref)
    assert tiled_video.dtype == dtype
    torch.testing.assert_close(tiled_video, ref_video, **tol)

    ae.enable_tiling(tile=24, overlap=16, margin=4)  # margin below the encoder's reach of 8 pixels
    assert (ae.encode(video)["z"] - ref["z"]).abs().max() > 1e-3


def test_tiling_follows_the_input_device():
    """On the meta device every tensor tiling makes must be on the input's device, or torch raises
    (a CPU tensor inside would be the bug that breaks CUDA)."""
    with torch.device("meta"):
        ae = LocalProbe(ProbeConfig())
        kl = autoencoders.build("kl2d-f8c4-debug")
    for model, frames in ((ae, 2), (kl, 1)):
        model.enable_tiling(tile=48, overlap=16, margin=8)
        video = torch.zeros(1, 3, frames, 72, 88, device="meta")  # 2 x 3 tiles
        latent = model.encode(video)
        assert latent["z"].device.type == "meta"
        assert model.decode(latent).shape == video.shape


# ------------------------------------------------------------------------------------------
# the real families: shapes, PSNR against untiled, conditions
# ------------------------------------------------------------------------------------------
# name -> (frames, latent dB, video dB): the PSNR (peak = the untiled output's range) that tiling
# keeps on a 96 x 96 synthetic clip in 64-pixel tiles overlapping by 32 (2 x 2 tiles), for the latent
# (tiled encode) and the video (tiled decode of the untiled latent); random weights, seed 0. The
# bounds sit about 3 dB under what `benchmarks/tiling.py --size 96` measures (README "Tiling for
# large frames").
FAMILIES = {"kl2d-f8c4-debug": (1, 19.0, 22.0), "causal3d-f4x8c4-debug": (5, 20.0, 25.0),
            "ivvae-z16-debug": (5, 24.0, 23.0), "h3ae-4x16x16-debug": (5, 22.0, 23.0),
            "cmvae-z4-debug": (8, 15.0, 21.0), "odvae-c4-debug": (5, 21.0, 23.0),
            "opensora-v12-debug": (17, 21.5, 23.5)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_real_families_within_stated_psnr(name):
    frames, latent_db, video_db = FAMILIES[name]
    torch.manual_seed(0)
    ae = autoencoders.build(name).eval()
    video = _video(frames, 96, 96)
    with torch.no_grad():
        ref = ae.encode(video)
        ref_video = ae.decode(ref)
        ae.enable_tiling(tile=64, overlap=32)
        tiled, tiled_video = ae.encode(video), ae.decode(ref)
    assert tiled["z"].shape == ref["z"].shape and tiled.logvar["z"].shape == ref.logvar["z"].shape
    assert tiled_video.shape == ref_video.shape == video.shape
    assert _psnr_vs(tiled["z"], ref["z"]) >= latent_db
    assert _psnr_vs(tiled_video, ref_video) >= video_db


def test_overlap_and_blend_beat_hard_seams():
    """The same 64-pixel tiles of a 128 x 128 clip with 32 pixels of overlap blended, against no
    overlap (hard seams at 64): the blend must be clearly closer to the untiled result (measured
    +4.2 dB latent, +3.2 dB video)."""
    torch.manual_seed(0)
    ae = autoencoders.build("h3ae-4x16x16-debug").eval()
    video = _video(5, 128, 128)
    with torch.no_grad():
        ref = ae.encode(video)
        ref_video = ae.decode(ref)
        results = {}
        for overlap in (32, 0):
            ae.enable_tiling(tile=64, overlap=overlap)
            results[overlap] = (_psnr_vs(ae.encode(video)["z"], ref["z"]), _psnr_vs(ae.decode(ref), ref_video))
    assert results[32][0] > results[0][0] + 2 and results[32][1] > results[0][1] + 2, results


def test_sizes_that_are_not_a_multiple_of_the_tile_and_frames_that_fit_one_tile():
    torch.manual_seed(0)
    ae = autoencoders.build("kl2d-f8c4-debug").eval()
    with torch.no_grad():
        video = _video(2, 72, 40)
        ref = ae.encode(video)
        ae.enable_tiling(tile=32, overlap=8)
        tiled = ae.encode(video)
        assert tiled["z"].shape == ref["z"].shape == (1, 4, 2, 9, 5)
        assert ae.decode(tiled).shape == video.shape
        small = _video(2, 32, 24)  # fits in one tile: the untiled path, bit for bit
        tiled_small = ae.encode(small)
        tiled_small_video = ae.decode(tiled_small)
        ae.disable_tiling()
        assert torch.equal(tiled_small["z"], ae.encode(small)["z"])
        assert torch.equal(tiled_small_video, ae.decode(tiled_small))


def test_h3ae_image_condition_is_cropped_with_the_tile():
    torch.manual_seed(0)
    ae = autoencoders.build("h3ae-4x16x16-debug").eval()
    video = _video(5, 96, 64)
    cond = Cond(first_frame=video[:, :, :1])
    with torch.no_grad():
        latent = ae.encode(video)
        ref = ae.decode(latent, cond)
        ae.enable_tiling(tile=64, overlap=32)
        tiled = ae.decode(latent, cond)
        assert tiled.shape == ref.shape and _psnr_vs(tiled, ref) >= 20
        with pytest.raises(ValueError, match="first_frame.*height and width"):
            ae.decode(latent, Cond(first_frame=video[:, :, :1, :64]))


def test_text_guided_cmvae_tiles_with_its_caption():
    torch.manual_seed(0)
    ae = autoencoders.build("cmvae-z4-text-debug").eval()
    cond = Cond(text=torch.randn(1, 5, ae.text_dim), text_mask=torch.ones(1, 5, dtype=torch.bool))
    video = _video(1, 96, 64)  # image mode: the text layers work the same per frame
    with torch.no_grad():
        ref = ae.encode(video, cond)
        ae.enable_tiling(tile=64, overlap=32)
        tiled = ae.encode(video, cond)
        assert tiled["z"].shape == ref["z"].shape and _psnr_vs(tiled["z"], ref["z"]) >= 15
        assert ae.decode(tiled, cond).shape == video.shape


def test_diffusers_wrappers_tile_with_the_generic_blend():
    diffusers = pytest.importorskip("diffusers")
    from autoencoders.pretrained import DiffusersAE, DiffusersAEConfig

    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                    latent_channels=4, layers_per_block=1).eval()
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    ae = DiffusersAE(DiffusersAEConfig(class_name="AutoencoderKL", model_config=config), model=model)
    video = _video(2, 64, 48)
    with torch.no_grad():
        ref = ae.encode(video)
        ref_video = ae.decode(ref)
        ae.enable_tiling(tile=32, overlap=16)
        tiled = ae.encode(video)
        assert tiled["z"].shape == ref["z"].shape and _psnr_vs(tiled["z"], ref["z"]) >= 20
        assert _psnr_vs(ae.decode(ref), ref_video) >= 20
    assert not model.use_tiling  # the diffusers model's own tiling stays off


# ------------------------------------------------------------------------------------------
# settings and work
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(tile=20), "tile must be a positive multiple of the spatial factor 8"),
    (dict(tile=0), "tile must be a positive multiple"),
    (dict(tile=64, overlap=64), r"overlap must be a multiple of the spatial factor 8 in \[0, tile=64\)"),
    (dict(tile=64, overlap=12), "overlap must be a multiple"),
    (dict(tile=64, overlap=-8), "overlap must be"),
    (dict(tile=64, overlap=16, margin=16), "2 \\* margin <= overlap=16"),
    (dict(tile=64, overlap=16, margin=4), "margin must be a multiple"),
    (dict(tile=64.0), "tile must be an int"),
])
def test_invalid_settings_are_clear_errors(kwargs, message):
    with torch.device("meta"):
        ae = autoencoders.build("kl2d-f8c4-debug")
    with pytest.raises(ValueError, match=message):
        ae.enable_tiling(**kwargs)
    assert ae.tiling is None  # nothing half-set


@pytest.mark.parametrize("name", ["fake-tokens-debug", "fake-varlen-debug", "mtcvae-c4-debug"])
def test_tiling_refused_where_the_latent_is_not_one_grid(name):
    with torch.device("meta"):
        ae = autoencoders.build(name)
    with pytest.raises(ValueError, match="spatial tiling applies to autoencoders whose latent is one grid"):
        ae.enable_tiling(tile=64, overlap=16)


def _largest_conv_input(ae: Autoencoder, fn) -> int:
    """Run ``fn()`` and return the largest H*W any convolution of ``ae`` was given."""
    seen = [0]

    def hook(module, args):
        seen[0] = max(seen[0], args[0].shape[-2] * args[0].shape[-1])

    handles = [m.register_forward_pre_hook(hook) for m in ae.modules()
               if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen[0]


@pytest.mark.parametrize("name,frames", [("kl2d-f8c4-debug", 1), ("causal3d-f4x8c4-debug", 1)])
def test_every_convolution_sees_at_most_a_tile(name, frames):
    """The work is bounded by the tile: in tiled encode/decode of a 128 x 96 frame no convolution
    gets a larger input than when the whole frame is one 32 x 32 tile."""
    torch.manual_seed(0)
    ae = autoencoders.build(name).eval()
    big, one_tile = _video(frames, 128, 96), _video(frames, 32, 32)
    with torch.no_grad():
        tile_enc = _largest_conv_input(ae, lambda: ae.encode(one_tile))
        tile_latent = ae.encode(one_tile)
        tile_dec = _largest_conv_input(ae, lambda: ae.decode(tile_latent))
        latent = ae.encode(big)
        assert _largest_conv_input(ae, lambda: ae.decode(latent)) > tile_dec
        assert _largest_conv_input(ae, lambda: ae.encode(big)) > tile_enc  # untiled sees the frame
        ae.enable_tiling(tile=32, overlap=16)
        assert _largest_conv_input(ae, lambda: ae.encode(big)) == tile_enc
        assert _largest_conv_input(ae, lambda: ae.decode(latent)) == tile_dec


@pytest.mark.parametrize("name,tile,overlap", [("h3ae-4x16x16-debug", "32", 0), ("h3ae-8x64x64-debug", "128", 0),
                                               ("h3ae-8x32x32-debug", "256", 64), ("kl2d-f8c4-debug", "64", 16)])
def test_a_bare_tile_gets_an_overlap_the_model_takes(name, tile, overlap):
    """``--tile TILE``: the default overlap (TILE / 4) is rounded down to the model's spatial factor
    (it was rounded to 8, so `--tile 32` on a 16x model failed on an overlap the user never gave)."""
    with torch.device("meta"):
        ae = autoencoders.build(name)
    configure_inference(ae, tile)
    assert (ae.tiling.tile, ae.tiling.overlap) == (int(tile), overlap)
    with torch.device("meta"):
        hivae = autoencoders.build("hivae-debug")
    with pytest.raises(ValueError, match="spatial tiling applies to autoencoders whose latent is one grid"):
        configure_inference(hivae, tile)
