"""``ldm reconstruct``: video in -> video out + PSNR/SSIM, with and without a checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import autoencoders
from autoencoders import build
from data.video import probe, read_video, write_video
from launch import reconstruct
from ldm.errors import UserError
from ldm.latent import Cond
from ldm.metrics import psnr

FRAMES, SIZE = 5, 32


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A smooth moving gradient (easy to reconstruct) at 8 fps."""
    path = tmp_path_factory.mktemp("recon") / "in.mp4"
    t = torch.arange(FRAMES).view(1, FRAMES, 1, 1).float()
    x = torch.linspace(-1, 1, SIZE).view(1, 1, 1, SIZE)
    channels = [torch.sin(3 * x + 0.3 * t), torch.cos(2 * x - 0.2 * t), 0.5 * x + 0 * t]
    video = torch.cat(channels).expand(3, FRAMES, SIZE, SIZE)  # (3, T, H, W)
    write_video(path, video.clamp(-1, 1) * 0.8, fps=8)
    return path


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    reconstruct.add_arguments(parser)
    return reconstruct.run(parser.parse_args(argv))


def _args(clip: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(clip), "--output", str(out), "--frames", str(FRAMES), "--height", str(SIZE),
            "--width", str(SIZE), "--device", "cpu", *extra]


def test_random_weights_warn_and_write_video(clip, tmp_path, capsys):
    out = tmp_path / "rec.mp4"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert _run(_args(clip, out, "--autoencoder", "kl2d-f8c4-debug")) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "SSIM" in text and "dB" in text
    assert read_video(out, FRAMES, SIZE, SIZE).shape == (3, FRAMES, SIZE, SIZE)
    assert probe(out)["fps"] == pytest.approx(8.0)


def test_checkpoint_json_metrics_and_side_by_side(clip, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "ae"
    build("causal3d-f4x8c4-debug").save_pretrained(ckpt, name="causal3d-f4x8c4-debug")
    out = tmp_path / "rec.gif"
    assert _run(_args(clip, out, "--checkpoint", str(ckpt), "--side-by-side", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["autoencoder"] == "causal3d-f4x8c4-debug"
    assert result["latent_shape"] == {"z": [4, 2, SIZE // 8, SIZE // 8]}
    # the metrics printed are those of the written reconstruction against the decoded input
    video = read_video(clip, FRAMES, SIZE, SIZE)
    both = read_video(out, FRAMES, SIZE, 2 * SIZE)  # (3, T, H, 2W): input | reconstruction
    assert torch.allclose(both[..., :SIZE], video, atol=0.1)  # GIF palette quantisation
    assert 0 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1
    # an identity "reconstruction" scores PSNR inf / SSIM 1 with the same metric code
    from ldm.metrics import psnr, ssim
    assert ssim(video[None], video[None]).item() == pytest.approx(1.0)
    assert torch.isinf(psnr(video[None], video[None])).all()


def test_trained_checkpoint_beats_random_weights(clip, tmp_path, capsys):
    """Fifteen Adam steps on the clip itself must lift PSNR well above random weights."""
    torch.manual_seed(0)
    ae = build("kl2d-f8c4-debug")
    before = reconstruct.reconstruct(ae, read_video(clip, FRAMES, SIZE, SIZE), torch.device("cpu"))[1]["psnr"]
    video = read_video(clip, FRAMES, SIZE, SIZE)[None]
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    ae.train()
    for _ in range(15):
        out = ae.train_forward(video, generator=torch.Generator().manual_seed(0))
        loss = (out.recon - video).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = tmp_path / "trained"
    ae.save_pretrained(ckpt, name="kl2d-f8c4-debug")
    assert _run(_args(clip, tmp_path / "rec.mp4", "--checkpoint", str(ckpt), "--autoencoder", "kl2d-f8c4-debug",
                      "--json")) == 0
    after = json.loads(capsys.readouterr().out)["psnr"]
    assert after > before + 5, (before, after)


def test_bad_requests_fail_clearly(clip, tmp_path):
    ckpt = tmp_path / "ae"
    build("kl2d-f8c4-debug").save_pretrained(ckpt, name="kl2d-f8c4-debug")
    with pytest.raises(ValueError, match="holds 'kl2d-f8c4-debug'"):
        _run(_args(clip, tmp_path / "a.mp4", "--checkpoint", str(ckpt), "--autoencoder", "causal3d-f4x8c4-debug"))
    with pytest.raises(ValueError, match="suffix"):
        _run(_args(clip, tmp_path / "a.avi", "--autoencoder", "kl2d-f8c4-debug"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        _run(_args(clip, tmp_path / "a.mp4", "--checkpoint", str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="multiples of 8"):
        _run(_args(clip, tmp_path / "a.mp4", "--autoencoder", "kl2d-f8c4-debug", "--height", "20"))
    with pytest.raises(ValueError, match="give --autoencoder"):
        _run(_args(clip, tmp_path / "a.mp4"))
    no_frames = ["--input", str(clip), "--output", str(tmp_path / "a.mp4"), "--autoencoder", "kl2d-f8c4-debug",
                 "--height", "20", "--device", "cpu"]  # the default length: the error names the size asked for
    with pytest.raises(ValueError, match=r"\(5 frames\) at --height 20 --width 32: kl2d: height and width must be"), \
            pytest.warns(UserWarning, match="RANDOM"):
        _run(no_frames)
    assert not list(tmp_path.glob("a.*"))


def test_default_frames_blames_what_is_wrong():
    """Without --frames, the longest clip the video holds that the model takes; when there is none,
    the model's rule that is broken: the size where clips of these frames fit at a size it takes
    (was: the frame rule, for 8 frames at a size H3AE does not take), else the frame rule."""
    h3ae, mtcvae = build("h3ae-4x16x16-debug"), build("mtcvae-c4-debug")
    assert reconstruct.default_frames(h3ae, 8, 48, 64) == 5  # 1 + 4k
    with pytest.raises(ValueError, match="multiples of 16, got 40x56"):
        reconstruct.default_frames(h3ae, 8, 40, 56)
    with pytest.raises(ValueError, match="multiple of 17 frames .* got 8"):
        reconstruct.default_frames(mtcvae, 8, 40, 56)


def test_text_guided_autoencoder_takes_the_prompt(clip, tmp_path, capsys):
    """A text-guided model encodes and decodes with the caption: the prompt changes the output (its
    zero-initialised text layers are given weights here), and a missing prompt is a clear error."""
    torch.manual_seed(0)
    ae = build("cmvae-z4-text-debug")
    with torch.no_grad():
        for n, p in ae.named_parameters():
            if ".text." in n and not p.any():
                p.normal_(0, 0.5)
    ckpt = tmp_path / "ae"
    ae.save_pretrained(ckpt, name="cmvae-z4-text-debug")
    psnrs = []
    for i, prompt in enumerate(["a red circle moving left", "a blue square moving up"]):
        assert _run(_args(clip, tmp_path / f"r{i}.mp4", "--checkpoint", str(ckpt), "--prompt", prompt,
                          "--text-encoder", "builtin", "--json", "--frames", "1")) == 0
        psnrs.append(json.loads(capsys.readouterr().out)["psnr"])
    assert psnrs[0] != psnrs[1]
    with pytest.raises(ValueError, match="text-guided"):
        _run(_args(clip, tmp_path / "a.mp4", "--checkpoint", str(ckpt), "--frames", "1"))
    with pytest.raises(ValueError, match="not text-guided"):
        _run(_args(clip, tmp_path / "a.mp4", "--autoencoder", "kl2d-f8c4-debug", "--prompt", "x"))


def test_memory_knobs_tile_and_chunk_frames(clip, tmp_path, capsys):
    """``--tile`` runs the autoencoder on blended tiles (close to one shot), ``--chunk-frames``
    streams a family that can (IV-VAE: the very same reconstruction) and is refused by one that
    cannot; ``--dtype bf16`` runs the model in bf16 on the CPU too."""
    def metrics(*extra):
        torch.manual_seed(0)  # the same random weights in every run
        assert _run(_args(clip, tmp_path / "o.mp4", "--json", "--overwrite", *extra)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    one = metrics("--autoencoder", "kl2d-f8c4-debug")
    tiled = metrics("--autoencoder", "kl2d-f8c4-debug", "--tile", "16:8")
    assert abs(tiled["psnr"] - one["psnr"]) < 3.0 and tiled["psnr"] != one["psnr"]
    low = metrics("--autoencoder", "kl2d-f8c4-debug", "--dtype", "bf16")
    assert low["dtype"] == "bf16" and abs(low["psnr"] - one["psnr"]) < 3.0  # random weights, 10-12 dB
    a = metrics("--autoencoder", "ivvae-z4-debug")
    b = metrics("--autoencoder", "ivvae-z4-debug", "--chunk-frames", "4")
    assert b["psnr"] == pytest.approx(a["psnr"], abs=1e-3)
    assert (a["tile"], a["chunk_frames"], tiled["tile"], b["chunk_frames"]) == (None, None, "16:8", 4)  # recorded
    with pytest.raises(ValueError, match="no chunked.*spatial tiling"):  # clip-wise norms: chunks would change it
        _run(_args(clip, tmp_path / "o.mp4", "--autoencoder", "odvae-c4-debug", "--chunk-frames", "4", "--overwrite"))
    with pytest.raises(ValueError, match="no chunked.*takes no spatial tiling either"):  # was advised to tile
        _run(_args(clip, tmp_path / "o.mp4", "--autoencoder", "hivae-debug", "--chunk-frames", "4", "--overwrite"))
    with pytest.raises(ValueError, match="--tile must be"):
        _run(_args(clip, tmp_path / "o.mp4", "--autoencoder", "kl2d-f8c4-debug", "--tile", "big", "--overwrite"))


def test_default_frame_count_fits_a_short_video(clip, tmp_path, capsys):
    """Without --frames: 17, or from a shorter video the longest clip the autoencoder takes (a
    causal 4x model 1 + 4k frames); an explicit --frames that the video lacks stays an error."""
    def frames_used(*extra):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.mp4"
        argv = ["--input", str(clip), "--output", str(out), "--height", str(SIZE), "--width", str(SIZE),
                "--device", "cpu", "--json", *extra]
        with pytest.warns(UserWarning, match="RANDOM weights"):
            assert _run(argv) == 0
        result = json.loads(capsys.readouterr().out)
        assert probe(out)["frames"] == result["frames"]
        return result["frames"]

    assert frames_used("--autoencoder", "causal3d-f4x8c4-debug") == 5  # the whole 5-frame clip
    assert frames_used("--autoencoder", "kl2d-f8c4-debug", "--fps", "4") == 3  # 5 frames at 8 fps -> 3 at 4
    assert frames_used("--autoencoder", "causal3d-f4x8c4-debug", "--fps", "4") == 1
    with pytest.raises(UserError, match="mtcvae: needs a multiple of 17 frames"):
        frames_used("--autoencoder", "mtcvae-c4-debug")
    with pytest.raises(UserError, match="too short"):
        frames_used("--autoencoder", "kl2d-f8c4-debug", "--frames", "6")


def test_multi_rate_autoencoder_reports_rates_vcpr_and_keyframe_accuracy(tmp_path, capsys):
    """MTC-VAE's reconstruction comes with what its paper reports beside PSNR: the segment rates the
    selector chose, the VCPR they give (Tab. 1) and the keyframe predictor's accuracy (Acc.)."""
    clip = tmp_path / "two-segments.mp4"
    t = torch.arange(34).view(1, 34, 1, 1).float()
    x = torch.linspace(-1, 1, SIZE).view(1, 1, 1, SIZE)
    channels = [torch.sin(3 * x + 0.2 * t), torch.cos(2 * x + 0 * t), 0.5 * x + 0 * t]
    write_video(clip, torch.cat(channels).expand(3, 34, SIZE, SIZE) * 0.8, fps=8)
    out = tmp_path / "rec.mp4"
    argv = ["--input", str(clip), "--output", str(out), "--autoencoder", "mtcvae-c4-debug", "--device", "cpu"]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert _run([*argv, "--frames", "34", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["rates"]) == 2 and set(result["rates"]) <= {4, 8, 16}
    assert result["vcpr"] == sum(64 * c for c in result["rates"]) / 2
    assert 0.0 <= result["keyframe_accuracy"] <= 1.0
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert _run([*argv, "--frames", "34", "--overwrite"]) == 0
    assert f"VCPR {result['vcpr']:.1f}" in capsys.readouterr().out


def test_first_frame_decodes_image_conditioned(clip, tmp_path, capsys):
    """H3AE's I2V reconstruction (Tab. 4): --first-frame decodes with the clip's own first frame, the
    same as decode(latent, Cond(first_frame=...)); a model without it refuses the flag in one line."""
    torch.manual_seed(0)
    ckpt = tmp_path / "h3ae"
    build("h3ae-4x16x16-debug").save_pretrained(ckpt, name="h3ae-4x16x16-debug")
    results = {}
    for extra in ((), ("--first-frame",)):
        out = tmp_path / f"rec{len(extra)}.mp4"
        assert _run(_args(clip, out, "--checkpoint", str(ckpt), "--json", *extra)) == 0
        results[extra] = json.loads(capsys.readouterr().out)
    plain, i2v = results[()], results[("--first-frame",)]
    assert i2v["first_frame"] is True and plain["first_frame"] is False
    ae = autoencoders.load_pretrained(ckpt).eval()
    video = read_video(clip, FRAMES, SIZE, SIZE)[None]
    with torch.no_grad():
        latent = ae.encode(video)
        want = ae.decode(latent, Cond(first_frame=video[:, :, :1])).clamp(-1, 1)
    assert i2v["psnr"] == pytest.approx(float(psnr(want, video)[0]), abs=1e-4)
    assert i2v["psnr"] != pytest.approx(plain["psnr"], abs=1e-3)
    with pytest.warns(UserWarning, match="RANDOM"), \
            pytest.raises(UserError, match="--first-frame: kl2d-f8c4-debug does not decode with a first frame"):
        _run(_args(clip, tmp_path / "o.mp4", "--autoencoder", "kl2d-f8c4-debug", "--first-frame"))


def test_default_size_is_the_videos_own_when_small(clip, tmp_path, capsys):
    """Without --height/--width: a video that fits in 256x256 at its own size, rounded down to a
    size the autoencoder takes (was: upscaled to 256x256); a larger one at 256x256 as before."""
    def size_used(video, ae):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.mp4"
        with pytest.warns(UserWarning, match="RANDOM weights"):
            assert _run(["--input", str(video), "--output", str(out), "--autoencoder", ae, "--device", "cpu",
                         "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (probe(out)["height"], probe(out)["width"]) == (result["height"], result["width"])
        return result["height"], result["width"]

    assert size_used(clip, "kl2d-f8c4-debug") == (SIZE, SIZE)
    odd = tmp_path / "odd.mp4"  # 44 x 70: not a multiple of 8
    write_video(odd, torch.zeros(3, 3, 44, 70), fps=8)
    assert size_used(odd, "kl2d-f8c4-debug") == (40, 64)
    assert size_used(odd, "hivae-s-debug") == (32, 64)  # its debug twin takes multiples of 16
    tiny = tmp_path / "tiny.mp4"
    write_video(tiny, torch.zeros(3, 3, 12, 12), fps=8)
    assert size_used(tiny, "hivae-s-debug") == (256, 256)  # smaller than any size it takes: upscaled
    big = tmp_path / "big.mp4"
    write_video(big, torch.zeros(3, 3, 264, 320), fps=8)
    assert size_used(big, "kl2d-f8c4-debug") == (256, 256)


def test_weights_flags_take_the_names_extract_uses():
    """``--ae-path`` / ``--ae-subfolder`` (as ``ldm extract`` and ``eval recon`` name them) are
    ``--checkpoint`` / ``--subfolder`` here, so a command moved between verbs keeps working."""
    parser = argparse.ArgumentParser()
    reconstruct.add_arguments(parser)
    base = ["--input", "in.mp4", "--output", "out.mp4", "--autoencoder", "diffusers:AutoencoderKL"]
    ours = parser.parse_args(base + ["--checkpoint", "pipe", "--subfolder", "vae"])
    theirs = parser.parse_args(base + ["--ae-path", "pipe", "--ae-subfolder", "vae"])
    assert vars(ours) == vars(theirs) and (ours.checkpoint, ours.subfolder) == ("pipe", "vae")
