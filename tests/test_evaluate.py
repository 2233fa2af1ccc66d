"""`ldm eval`: FVD / FID extractors loaded from user files (tiny scripted stand-ins saved and loaded
through the real loaders), reconstruction metrics, the attribute benchmark, the VBench bridge."""
import dataclasses
import hashlib
import json
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import autoencoders
import dit
from data.synth import render_clip, synth_dataset
from data.sources import list_items
from data.video import write_video
from launch import eval_attributes, eval_clips, eval_fd, eval_recon, eval_vbench
from launch.cli import main as ldm
from ldm import config as cfglib
from ldm import metrics
from ldm.artifacts import AERecord, ClipSpec
from ldm.metrics import LPIPS
from ldm.errors import UserError
from ldm.checkpoint import load_tensors
from ldm.samplers import SamplingConfig
from ldm.text import build_text_encoder


class TinyI3D(nn.Module):
    """The calling convention of StyleGAN-V's i3d_torchscript.pt; 5 features from clip statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(9, 5)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        dt = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))  # (B, 3) motion
        return self.lin(torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), dt], 1))


class TinyInception(nn.Module):
    """The calling convention of StyleGAN2-ADA's inception-2015-12-05.pt: uint8 frames in."""

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        f = x.float() / 255.0
        return torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], 1)  # (N, 6)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    torch.jit.save(torch.jit.script(TinyI3D()), str(d / "i3d_torchscript.pt"))
    torch.jit.save(torch.jit.script(TinyInception()), str(d / "inception-2015-12-05.pt"))
    torch.manual_seed(0)
    lp = LPIPS("alex")
    torch.save({f"features.{k}": torch.randn_like(v) * 0.05 for k, v in lp.features.state_dict().items()},
               d / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand_like(h.weight) for i, h in enumerate(lp.heads)}, d / "alex.pth")
    synth_dataset(d / "videos", num=6, frames=8, size=32, fps=8, seed=0)
    synth_dataset(d / "other", num=6, frames=8, size=32, fps=8, seed=5, colors=["white"])
    return d


def test_extractor_loaders(files, tmp_path):
    ext = metrics.load_i3d(files / "i3d_torchscript.pt")
    assert ext.dim == 5 and ext.sha256 == hashlib.sha256((files / "i3d_torchscript.pt").read_bytes()).hexdigest()
    assert ext.describe()["weights"] == "i3d_torchscript.pt"
    assert metrics.load_inception(files / "inception-2015-12-05.pt").dim == 6
    with pytest.raises(FileNotFoundError, match="missing_i3d.pt"):
        metrics.load_i3d(tmp_path / "missing_i3d.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        metrics.load_i3d(tmp_path / "state_dict.pt")
    with pytest.raises(ValueError, match="unknown FVD extractor"):
        metrics.load_i3d(files / "i3d_torchscript.pt", kind="videomae")
    # the two files swapped: one line each (were RuntimeError tracebacks from the TorchScript call)
    with pytest.raises(UserError, match="inception-2015-12-05.pt does not run as an FVD extractor"):
        metrics.load_i3d(files / "inception-2015-12-05.pt")
    with pytest.raises(UserError, match="i3d_torchscript.pt does not run as the FID Inception"):
        metrics.load_inception(files / "i3d_torchscript.pt")


def test_fvd_preprocessing():
    v = torch.full((2, 3, 20, 32, 48), 0.3)
    x = metrics.fvd_preprocess(v)
    assert x.shape == (2, 3, 16, 224, 224)
    assert torch.allclose(x, torch.full_like(x, round(1.3 * 127.5) / 127.5 - 1))  # quantised to [0, 255]
    ramp = torch.linspace(-1, 1, 48).expand(1, 3, 16, 32, 48)
    y = metrics.fvd_preprocess(ramp)
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6 and (y[..., 1:] >= y[..., :-1] - 1e-6).all()  # not cropped
    with pytest.raises(ValueError, match="16 frames"):
        metrics.fvd_preprocess(torch.zeros(1, 3, 8, 32, 32))


def test_frechet_distance_of_features(files):
    ext = metrics.load_i3d(files / "i3d_torchscript.pt")
    torch.manual_seed(1)
    a = torch.rand(12, 3, 16, 24, 24) * 2 - 1
    acc = metrics.fvd_accumulator(ext, batch=5)
    acc.update("real", a[:7])
    acc.update("real", a[7:])  # streamed
    acc.update("fake", a)
    same = acc.result("fvd")
    assert abs(same["fvd"]) < 1e-6 and same["n_real"] == same["n_fake"] == 12 and same["frames"] == 16
    assert same["sha256"] == ext.sha256 and "unbiased" in same["covariance"]
    acc2 = metrics.fvd_accumulator(ext)
    acc2.update("real", a)
    acc2.update("fake", (a * 0.5).clamp(-1, 1))
    assert acc2.result("fvd")["fvd"] > 1e-3


def test_position_ssim():
    per = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.6]])  # causal: frame 0 alone, groups of 4
    out = eval_recon.position_ssim(per, group=4, start=1)
    assert out["lead"] == [1.0] and out["positions"] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    with pytest.raises(ValueError):
        eval_recon.position_ssim(per, group=0)


def test_eval_recon_cli(files, tmp_path, capsys):
    out = tmp_path / "recon.json"
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(files / "videos"), "--frames", "8",
             "--height", "32", "--width", "32", "--lpips-net", "alex", "--lpips-backbone", str(files / "alexnet.pth"),
             "--lpips-heads", str(files / "alex.pth"), "--i3d", str(files / "i3d_torchscript.pt"), "--fvd-frames",
             "8", "--frame-group", "4", "--grid", str(tmp_path / "grid.png"), "--output", str(out), "--device", "cpu"])
    r = json.loads(out.read_text())
    assert r["clips"] == 6 and r["autoencoder"] == "kl2d-f8c4-debug" and r["skipped"] == []
    assert np.isfinite(r["psnr_db"]["mean"]) and 0 < r["ssim"]["mean"] < 1 and r["lpips"]["mean"] > 0
    assert r["rfvd"]["n_real"] == 6 and r["rfvd"]["frames"] == 8 and r["rfvd"]["rfvd"] > 0
    assert len(r["ssim_per_position"]["positions"]) == 4 and len(r["ssim_per_position"]["per_frame"]) == 8
    assert r["lpips"]["heads_sha256"] == hashlib.sha256((files / "alex.pth").read_bytes()).hexdigest()
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(capsys.readouterr().out)["clips"] == 6


class _TinyFlow(nn.Module):
    """The contract of `ldm eval recon --flow-net`: two frames (N, 3, H, W) in [0, 1] -> (N, 2, H, W) flow."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([(b - a).mean(1, keepdim=True), (b - a)[:, 1:2]], 1)


def test_eval_recon_flolpips_with_a_users_flow_network(files, tmp_path):
    """``--flow-net FILE`` (H3AE Tab. 4 / 5 report FloLPIPS): FloLPIPS per clip beside LPIPS, the flow network's
    sha256 recorded; one line, before any work, for a flow network without the LPIPS files, a missing file, a file
    that is not a flow network, or clips of one frame (was: no FloLPIPS)."""
    flow = tmp_path / "flow.pt"
    torch.jit.save(torch.jit.script(_TinyFlow()), str(flow))
    args = ["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(files / "videos"), "--frames", "8",
            "--height", "32", "--width", "32", "--device", "cpu"]
    lpips = ["--lpips-net", "alex", "--lpips-backbone", str(files / "alexnet.pth"), "--lpips-heads",
             str(files / "alex.pth")]
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(args + lpips + ["--flow-net", str(flow), "--output", str(out)])
    r = json.loads(out.read_text())
    assert r["flolpips"]["n"] == 6 and r["flolpips"]["mean"] > 0 and r["flolpips"]["net"] == "alex"
    assert r["flolpips"]["flow_net_sha256"] == hashlib.sha256(flow.read_bytes()).hexdigest() and r["lpips"]["n"] == 6
    for extra, error in [([], "--flow-net adds FloLPIPS, LPIPS weighted by where the motion differs: give "
                               "--lpips-backbone"),
                         (lpips, r"--flow-net .*nope.pt: file not found"),
                         (lpips, "i3d_torchscript.pt does not run as an optical-flow network"),
                         (lpips, "FloLPIPS compares the motion between frames; the clips have 1 frame")]:
        given = {"not found": tmp_path / "nope.pt", "i3d": files / "i3d_torchscript.pt"}
        path = next((v for k, v in given.items() if k in error), flow)
        frames = ["--frames", "1"] if "1 frame" in error else []
        with pytest.raises(UserError, match=error):
            ldm(args + extra + frames + ["--flow-net", str(path), "--output", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_eval_recon_tiles_and_chunks(files, tmp_path):
    def recon(name, *extra):
        with pytest.warns(UserWarning, match="RANDOM"):
            ldm(["eval", "recon", "--autoencoder", "causal3d-f4x8c4-debug", "--input", str(files / "videos"),
                 "--frames", "5", "--height", "32", "--width", "32", "--num", "2", "--output", str(tmp_path / name),
                 "--device", "cpu", *extra])
        return json.loads((tmp_path / name).read_text())

    plain, chunked = recon("plain.json"), recon("chunked.json", "--chunk-frames", "4")
    assert (chunked["chunk_frames"], chunked["tile"], plain["chunk_frames"]) == (4, None, 0)
    assert chunked["psnr_db"]["mean"] == pytest.approx(plain["psnr_db"]["mean"], abs=1e-3)  # causal streaming
    tiled = recon("tiled.json", "--tile", "16:8")
    assert tiled["tile"] == "16:8" and tiled["psnr_db"]["mean"] != plain["psnr_db"]["mean"]
    with pytest.raises(UserError, match="tile must be a positive multiple of the spatial factor 8, got 12"):
        recon("bad.json", "--tile", "12")
    assert not (tmp_path / "bad.json").exists()


def test_eval_recon_default_size_is_the_first_videos(files, tmp_path):
    """Without --height/--width, as `ldm reconstruct`: the 32x32 videos at 32x32 (was: upscaled to
    256x256, PSNR measured on the upscaled frames), from the first video that can be read."""
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(files / "videos"), "--frames", "8",
             "--num", "2", "--output", str(tmp_path / "r.json"), "--device", "cpu"])
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["height"], r["width"], r["clips"]) == (32, 32, 2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.mp4").write_bytes(b"not a video")
    with pytest.raises(UserError, match="no video can be read to set the defaults .*a: not a readable video.*give "
                                        "--frames and --height and --width"), \
            pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "bad"),
             "--output", str(tmp_path / "b.json"), "--device", "cpu"])
    # a broken first video among good ones: the defaults come from the next (was: the same error)
    good = next(p for p in sorted((files / "videos").rglob("*")) if p.suffix == ".mp4")
    (tmp_path / "bad" / "b.mp4").write_bytes(good.read_bytes())
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "bad"), "--frames", "8",
             "--output", str(tmp_path / "b.json"), "--device", "cpu"])
    r = json.loads((tmp_path / "b.json").read_text())
    assert (r["height"], r["width"], r["clips"]) == (32, 32, 1)


def test_eval_recon_default_frames_are_reconstructs(files, tmp_path, capsys):
    """Without --frames, as `ldm reconstruct`: the longest clip of at most 17 frames that the first
    video holds and the autoencoder takes (was: always 17, so the 8-frame videos gave no clip, and
    an autoencoder that takes no 17-frame clip, cmvae, failed)."""
    for ae, frames in [("causal3d-f4x8c4-debug", 5), ("cmvae-z4-debug", 8), ("kl2d-f8c4-debug", 8)]:
        with pytest.warns(UserWarning, match="RANDOM"):
            ldm(["eval", "recon", "--autoencoder", ae, "--input", str(files / "videos"), "--num", "2",
                 "--output", str(tmp_path / f"{ae}.json"), "--device", "cpu"])
        r = json.loads((tmp_path / f"{ae}.json").read_text())
        assert (r["frames"], r["clips"]) == (frames, 2), ae
        assert f"clips of {frames} frames" in capsys.readouterr().err


class _IdentityAE(autoencoders.Autoencoder):
    """The pixels are the latent: a perfect reconstruction."""
    family = "identity-test"

    def __init__(self):
        super().__init__(autoencoders.AEConfig())

    def latent_spec(self, frames, height, width):
        from ldm.latent import LatentSpec
        return LatentSpec("grid", {"z": (3, frames, height, width)}, (3, frames, height, width))

    def _encode(self, video, cond):
        from ldm.latent import Latent
        return Latent({"z": video})

    def _decode(self, latent, cond):
        return latent["z"]


def test_recon_metrics_are_right_for_a_perfect_autoencoder(files):
    r = eval_recon.evaluate_reconstruction(_IdentityAE(), str(files / "videos"), 8, 32, 32, frame_group=2)
    assert r["ssim"]["mean"] == pytest.approx(1.0) and r["psnr_db"]["infinite"] == 6
    assert r["ssim_per_position"]["positions"] == pytest.approx([1.0, 1.0])


def test_lpips_file_errors_name_the_file(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(files / "videos"), "--output",
             str(tmp_path / "r.json"), "--lpips-net", "alex", "--lpips-backbone", str(tmp_path / "nope.pth"),
             "--lpips-heads", str(files / "alex.pth")])


# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A DiT export with RANDOM weights over a random kl2d-f8c4-debug (no training needed)."""
    d = tmp_path_factory.mktemp("run")
    cls, config = autoencoders.REGISTRY["kl2d-f8c4-debug"]
    spec = cls(config).latent_spec(8, 32, 32)
    dcfg = dit.make_config("dit-debug", spec, text_dim=build_text_encoder("builtin").dim, num_classes=224)
    torch.manual_seed(0)
    model = dit.VideoDiT(dcfg)
    context = dit.Export(autoencoder=AERecord(name="kl2d-f8c4-debug", family="kl2d", config=cfglib.to_dict(config)),
                         video=ClipSpec(8, 32, 32), latent_spec=spec.to_dict(), form="grid", text_encoder="builtin")
    dit.save_export(d / "export", model.state_dict(), dcfg, context)
    return d


def _load(run_dir):
    model, context = dit.load_export(run_dir)
    with pytest.warns(UserWarning, match="RANDOM"):
        ae = autoencoders.resolve_record(context.autoencoder).model.eval()
    return model, ae, context


def test_attribute_suite():
    suite = eval_attributes.attribute_suite(["circle", "square"], ["red"], ["left", "right"],
                                            holdout=["red circle right"])
    assert [s["prompt"] for s in suite] == ["a red circle moving left", "a red circle moving right",
                                            "a red square moving left", "a red square moving right"]
    assert [s["holdout"] for s in suite] == [False, True, False, False]
    assert len(eval_attributes.attribute_suite()) == 4 * 7 * 4


def test_attribute_benchmark_scores_what_is_generated(run_dir, monkeypatch):
    model, ae, context = _load(run_dir)
    suite = eval_attributes.attribute_suite(["circle", "square"], ["red", "blue"], ["left", "right"],
                                            holdout=["red circle right"])
    def perfect(model, ae, context, prompts=None, class_ids=None, frames=8, height=32, width=32, seed=0, **kw):
        from data.synth import parse_attributes
        clips = [render_clip(parse_attributes(p), frames, height, width, seed + i) for i, p in enumerate(prompts)]
        return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1

    monkeypatch.setattr(eval_attributes, "generate", perfect)
    r = eval_attributes.attribute_benchmark(model, ae, context, suite, per_prompt=2, frames=8, height=32, width=32,
                                            batch_size=3)
    assert r["accuracy"] == {"shape": 1.0, "color": 1.0, "direction": 1.0, "all": 1.0, "n": 16}
    assert r["accuracy_holdout"]["n"] == 2 and r["chance"]["color"] == 0.5 and r["chance"]["all"] == 0.125
    assert r["conditioning"] == {"text": True, "class": False}

    def wrong_color(*a, prompts=None, **kw):
        return perfect(*a, prompts=[p.replace("red", "x").replace("blue", "red").replace("x", "blue")
                                    for p in prompts], **kw)

    monkeypatch.setattr(eval_attributes, "generate", wrong_color)
    r = eval_attributes.attribute_benchmark(model, ae, context, suite, per_prompt=1, frames=8, height=32, width=32)
    assert r["accuracy"]["color"] == 0.0 and r["accuracy"]["shape"] == 1.0 and r["accuracy"]["all"] == 0.0


def test_eval_gen_attributes_cli(run_dir, tmp_path, capsys):
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "gen", "--checkpoint", str(run_dir), "--output", str(tmp_path / "g"), "--attributes",
             "--per-prompt", "1", "--shapes", "circle", "square", "--colors", "red", "--directions", "left", "right",
             "--steps", "2", "--use-class", "--device", "cpu", "--tile", "16:8"])
    result = json.loads((tmp_path / "g" / "result.json").read_text())
    assert result["tile"] == "16:8"
    r = result["attributes"]
    assert r["accuracy"]["n"] == 4 and len(r["rows"]) == 4 and r["conditioning"] == {"text": True, "class": True}
    assert all((tmp_path / "g" / "attribute_videos" / row["file"]).exists() for row in r["rows"])
    assert r["sample_s_per_video"] > 0


def test_eval_gen_refuses_class_ids_the_dit_does_not_know(run_dir, tmp_path):
    model, context = dit.load_export(run_dir)
    few = tmp_path / "few"  # the same DiT with 40 classes: the suite's ids reach 219
    dcfg = dataclasses.replace(model.config, num_classes=40)
    dit.save_export(few / "export", dit.VideoDiT(dcfg).state_dict(), dcfg, context)
    args = ["eval", "gen", "--checkpoint", str(few), "--output", str(tmp_path / "g"), "--attributes", "--use-class",
            "--steps", "1", "--device", "cpu"]
    with pytest.raises(UserError, match=r"class ids up to 219 \('a white diamond moving down'\), but this DiT knows "
                                        r"40 classes \(ids 0 to 39\)"), pytest.warns(UserWarning, match="RANDOM"):
        ldm(args)
    assert not (tmp_path / "g").exists()
    with pytest.warns(UserWarning, match="RANDOM"):  # a suite within its classes runs
        ldm(args + ["--per-prompt", "1", "--shapes", "circle", "--colors", "red", "--directions", "left"])
    assert json.loads((tmp_path / "g" / "result.json").read_text())["attributes"]["accuracy"]["n"] == 1


def test_fvd_fid_of_generated_folders(files, run_dir, tmp_path, monkeypatch):
    model, ae, context = _load(run_dir)
    i3d, inc = metrics.load_i3d(files / "i3d_torchscript.pt"), metrics.load_inception(files / "inception-2015-12-05.pt")
    kw = dict(frames=8, height=32, width=32, num=None, i3d=i3d, inception=inc, fvd_frames=8)
    same = eval_fd.generation_fd(model, ae, context, str(files / "videos"), samples=str(files / "videos"), **kw)
    assert abs(same["fvd"]["fvd"]) < 1e-6 and abs(same["fid"]["fid"]) < 1e-6 and same["fid"]["n_real"] == 6 * 8
    other = eval_fd.generation_fd(model, ae, context, str(files / "videos"), samples=str(files / "other"), **kw)
    assert other["fvd"]["fvd"] > 1e-3 and other["fid"]["fid"] > 1e-3
    sampled = eval_fd.generation_fd(model, ae, context, str(files / "videos"), sampling=SamplingConfig(steps=2),
                                    **kw)  # from the captions
    assert sampled["fvd"]["n_fake"] == 6 and sampled["fvd"]["fvd"] > 0
    # --use-class: a DiT conditioned on class and text samples each clip with its caption and class id
    real, calls = eval_fd.generate, []
    monkeypatch.setattr(eval_fd, "generate",
                        lambda *a, **k: calls.append((k["prompts"], k["class_ids"])) or real(*a, **k))
    eval_fd.generation_fd(model, ae, context, str(files / "videos"), sampling=SamplingConfig(steps=1), use_class=True,
                          **{**kw, "inception": None})
    ids = [it.class_id for it in list_items(str(files / "videos"))]
    assert [c for _, cs in calls for c in cs] == ids and all(p for p, _ in calls) and min(ids) >= 0


def test_fd_reads_a_sample_folder_s_gif_twins_once(files, run_dir, tmp_path):
    model, ae, context = _load(run_dir)
    samples = tmp_path / "samples"  # as `ldm sample` writes them: NNNN.mp4 + NNNN.gif
    samples.mkdir()
    for i, video in enumerate(sorted((files / "videos").rglob("*.mp4"))):
        clip = eval_vbench.read_native(video)
        write_video(samples / f"{i:04d}.mp4", clip, 8)
        write_video(samples / f"{i:04d}.gif", clip, 8)
    i3d = metrics.load_i3d(files / "i3d_torchscript.pt")
    kw = dict(frames=8, height=32, width=32, i3d=i3d, inception=None, fvd_frames=8, samples=str(samples))
    out = eval_fd.generation_fd(model, ae, context, str(files / "videos"), num=None, **kw)["fvd"]
    assert out["n_fake"] == 6 and abs(out["fvd"]) < 1e-2  # were 12 (each clip twice)
    assert eval_fd.generation_fd(model, ae, context, str(files / "videos"), num=3, **kw)["fvd"]["n_fake"] == 3


def test_fd_with_too_few_readable_clips_is_an_entry_naming_the_skipped(files, run_dir, tmp_path):
    model, ae, context = _load(run_dir)
    short = tmp_path / "short"  # generated at 4 frames, evaluated at 8: every sample is skipped
    short.mkdir()
    for i, video in enumerate(sorted((files / "videos").rglob("*.mp4"))[:3]):
        write_video(short / f"{i:04d}.mp4", eval_vbench.read_native(video)[:, :4], 8)
    i3d, inc = metrics.load_i3d(files / "i3d_torchscript.pt"), metrics.load_inception(files / "inception-2015-12-05.pt")
    out = eval_fd.generation_fd(model, ae, context, str(files / "videos"), frames=8, height=32, width=32, num=None,
                                i3d=i3d, inception=inc, fvd_frames=8,
                                samples=str(short))  # was: a covariance ValueError
    assert out["fvd"] == {"error": "FVD needs >= 2 clips on each side, got 6 reference and 0 generated (see skipped)"}
    assert "FID needs >= 2 frames" in out["fid"]["error"]
    assert len(out["skipped"]) == 3 and "too short" in out["skipped"][0]  # were lost: []


def test_eval_gen_fvd_longer_than_the_clips_is_one_line_before_any_folder(files, run_dir, tmp_path):
    argv = ["eval", "gen", "--checkpoint", str(run_dir), "--reference", str(files / "videos"), "--i3d",
            str(files / "i3d_torchscript.pt"), "--output", str(tmp_path / "g"), "--device", "cpu"]
    with pytest.raises(UserError, match="--fvd-frames 16: the clips have 8 frames"), \
            pytest.warns(UserWarning, match="RANDOM"):  # was: a traceback after sampling, and an empty --output
        ldm(argv)
    assert not (tmp_path / "g").exists()


def test_fd_of_a_class_only_dit_needs_class_ids_in_the_reference(files, run_dir, tmp_path):
    model, context = dit.load_export(run_dir)
    cls_only = dataclasses.replace(model.config, text_dim=0)
    dit.save_export(tmp_path / "export", dit.VideoDiT(cls_only).state_dict(), cls_only,
                    dataclasses.replace(context, text_encoder=None, text_dim=None))
    plain = tmp_path / "plain"  # videos without metadata: no class ids
    plain.mkdir()
    for video in sorted((files / "videos").rglob("*.mp4"))[:2]:
        (plain / video.name).write_bytes(video.read_bytes())
    with pytest.raises(UserError, match="a clip has no class id and this DiT is class-conditioned only"), \
            pytest.warns(UserWarning, match="RANDOM"):  # was: a traceback after the output folder was made
        ldm(["eval", "gen", "--checkpoint", str(tmp_path), "--reference", str(plain), "--i3d",
             str(files / "i3d_torchscript.pt"), "--fvd-frames", "8", "--output", str(tmp_path / "g"),
             "--device", "cpu"])
    assert not (tmp_path / "g").exists()


def test_fd_of_an_unconditional_dit(files, run_dir, tmp_path):
    model, context = dit.load_export(run_dir)
    plain = dataclasses.replace(model.config, num_classes=0, text_dim=0)  # trained on unlabelled videos
    dit.save_export(tmp_path / "export", dit.VideoDiT(plain).state_dict(), plain,
                    dataclasses.replace(context, text_encoder=None, text_dim=None, num_classes=0))
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "gen", "--checkpoint", str(tmp_path), "--reference", str(files / "videos"), "--i3d",
             str(files / "i3d_torchscript.pt"), "--fvd-frames", "8", "--frames", "8", "--steps", "1",
             "--output", str(tmp_path / "g"), "--device", "cpu"])
    fd = json.loads((tmp_path / "g" / "result.json").read_text())["fd"]
    assert fd["fvd"]["n_fake"] == 6 and fd["fvd"]["fvd"] > 0
    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([{"prompt_en": "a red circle moving left", "dimension": ["color"]}]))
    with pytest.raises(UserError, match="--vbench: VBench prompts need a text-conditioned DiT"), \
            pytest.warns(UserWarning, match="RANDOM"):  # was: a traceback, and an empty --output folder
        ldm(["eval", "gen", "--checkpoint", str(tmp_path), "--vbench", "--vbench-info", str(info), "--output",
             str(tmp_path / "v"), "--device", "cpu"])
    assert not (tmp_path / "v").exists()


def test_fd_reads_clips_at_the_training_rate(files, run_dir, monkeypatch):
    model, ae, context = _load(run_dir)
    rates, read = [], eval_clips.iter_clips
    monkeypatch.setattr(eval_clips, "iter_clips", lambda input, frames, h, w, fps, num, *rest:
                        rates.append(fps) or read(input, frames, h, w, fps, num, *rest))
    at4 = dataclasses.replace(context, video=ClipSpec(8, 32, 32, fps=4.0))  # trained on clips resampled to 4 fps
    kw = dict(frames=4, height=32, width=32, num=None, i3d=metrics.load_i3d(files / "i3d_torchscript.pt"),
              inception=None, fvd_frames=4, samples=str(files / "videos"))
    r = eval_fd.generation_fd(model, ae, at4, str(files / "videos"), **kw)
    assert rates == [4.0, 4.0] and r["read_fps"] == 4.0 and r["fvd"]["n_real"] == 6  # 8 frames at 8 fps hold 4 at 4
    rates.clear()
    r = eval_fd.generation_fd(model, ae, context, str(files / "videos"), **kw)
    assert r["read_fps"] is None and rates == [None] * 2


def test_vbench_aggregate_known_answers():
    best = {d: hi for d, (lo, hi) in metrics.VBENCH_NORMALIZE.items()}
    agg = metrics.vbench_aggregate(best)
    assert agg["quality"] == pytest.approx(1) and agg["semantic"] == pytest.approx(1)
    assert agg["total"] == pytest.approx(1)
    mixed = {d: (lo if d in metrics.VBENCH_QUALITY else hi) for d, (lo, hi) in metrics.VBENCH_NORMALIZE.items()}
    agg = metrics.vbench_aggregate({k.replace("_", " "): v for k, v in mixed.items()})  # VBench's own key style
    assert agg["quality"] == pytest.approx(0) and agg["total"] == pytest.approx(1 / 5)
    half = dict(best, dynamic_degree=0.0)  # weight 0.5 of 6.5 in Quality
    assert metrics.vbench_aggregate(half)["quality"] == pytest.approx(6 / 6.5)
    part = metrics.vbench_aggregate({"temporal_flickering": 0.9})
    assert part["total"] is None and "subject_consistency" in part["missing"]
    assert part["normalized"]["temporal_flickering"] == pytest.approx((0.9 - 0.6293) / (1 - 0.6293))
    with pytest.raises(ValueError, match="unknown VBench dimension"):
        metrics.vbench_aggregate({"beauty": 1.0})


def test_temporal_flickering():
    static = np.full((5, 8, 8, 3), 77, dtype=np.uint8)
    assert metrics.temporal_flickering(static) == 1.0
    flip = np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 255)] * 2).astype(np.uint8)
    assert metrics.temporal_flickering(flip) == 0.0
    steps = np.stack([np.full((8, 8, 3), 10 * t) for t in range(4)]).astype(np.uint8)
    assert metrics.temporal_flickering(steps) == pytest.approx(245 / 255)
    video = torch.from_numpy(steps).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W) in [-1, 1]
    assert metrics.temporal_flickering(video) == pytest.approx(245 / 255)


FAKE_VBENCH = '''
import argparse, json, os
p = argparse.ArgumentParser()
for a in ("--videos_path", "--output_path", "--full_json_dir", "--mode"):
    p.add_argument(a)
p.add_argument("--dimension", nargs="+")
a = p.parse_args()
names = sorted(os.listdir(a.videos_path))
info = json.load(open(a.full_json_dir))
assert all(f"{e['prompt_en']}-{k}.mp4" in names for e in info for k in range(2)), names
json.dump({d: [0.5, []] for d in a.dimension}, open(os.path.join(a.output_path, "results_x_eval_results.json"), "w"))
'''


def test_vbench_bridge(run_dir, tmp_path, monkeypatch):
    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([{"prompt_en": "a red circle moving left", "dimension": ["temporal_flickering"]},
                                {"prompt_en": "a blue square, frozen in time", "dimension": ["color", "scene"]}]))
    pkg = tmp_path / "fakevb" / "vbench" / "launch"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluate.py").write_text(FAKE_VBENCH)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fakevb"))
    model, ae, context = _load(run_dir)
    r = eval_vbench.vbench_bridge(model, ae, context, tmp_path / "out", info=info, dimensions=None, per_prompt=2,
                                  frames=8, height=32, width=32, sampling=SamplingConfig(steps=2),
                                  vbench_python=sys.executable)
    names = sorted(p.name for p in (tmp_path / "out" / "vbench_videos").iterdir())
    assert names == ["a blue square, frozen in time-0.mp4", "a blue square, frozen in time-1.mp4",
                     "a red circle moving left-0.mp4", "a red circle moving left-1.mp4"]
    assert 0 < r["temporal_flickering_inhouse"] <= 1 and r["dimensions"] == ["color", "scene", "temporal_flickering"]
    assert r["vbench_scores"] == {"color": 0.5, "scene": 0.5, "temporal_flickering": 0.5}
    assert r["aggregate"]["raw"]["temporal_flickering"] == 0.5  # VBench's own value wins when it ran
    assert r["aggregate"]["total"] is None and r["info_sha256"]
    # a video lost (a run killed while writing) is made again from its own seed, not its place in the batch
    lost = tmp_path / "out" / "vbench_videos" / "a red circle moving left-1.mp4"
    before = eval_vbench.read_native(lost).float()
    lost.unlink()
    again = eval_vbench.vbench_bridge(model, ae, context, tmp_path / "out", info=info,
                                      dimensions=["temporal_flickering"], per_prompt=2, frames=8, height=32, width=32,
                                      sampling=SamplingConfig(steps=2))  # videos reused, no vbench
    assert again["vbench_scores"] == {} and "not run" in again["vbench_note"]
    off = (eval_vbench.read_native(lost).float() - before).abs().mean()
    assert off < 1 / 255  # was: the seed of video 0 (~30 levels off)
    assert again["aggregate"]["raw"] == {"temporal_flickering": r["temporal_flickering_inhouse"]}
    # videos of other sampling settings are never reused: refused, or replaced when asked
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "vbench_videos").iterdir()}
    other = dict(info=info, dimensions=["temporal_flickering"], per_prompt=2, frames=8, height=32, width=32,
                 sampling=SamplingConfig(steps=3))
    with pytest.raises(UserError, match="holds videos of another DiT, autoencoder or sampling settings"):
        eval_vbench.vbench_bridge(model, ae, context, tmp_path / "out", **other)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "vbench_videos").iterdir()} == made
    eval_vbench.vbench_bridge(model, ae, context, tmp_path / "out", replace=True, **other)
    assert json.loads((tmp_path / "out" / "vbench_videos.json").read_text())["sampling"]["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "out" / "vbench_videos").iterdir()) == \
        ["a red circle moving left-0.mp4", "a red circle moving left-1.mp4"]


def test_vbench_info_is_found_or_named(tmp_path, monkeypatch):
    """``--vbench-info`` given, else the file inside an installed ``vbench``; each miss says what to pass."""
    with pytest.raises(FileNotFoundError, match="VBench prompt info not found"):
        eval_vbench.vbench_info_path(str(tmp_path / "none.json"))
    pkg = tmp_path / "site" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "vbench", raising=False)
    with pytest.raises(FileNotFoundError, match="the installed vbench has no VBench_full_info.json"):
        eval_vbench.vbench_info_path(None)
    (pkg / "VBench_full_info.json").write_text("[]")
    assert eval_vbench.vbench_info_path(None) == pkg / "VBench_full_info.json"
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    monkeypatch.delitem(sys.modules, "vbench", raising=False)
    with pytest.raises(FileNotFoundError, match="vbench is not installed here"):
        eval_vbench.vbench_info_path(None)


def test_inputs_are_checked_before_overwrite_clears_the_earlier_result(files, run_dir, tmp_path):
    info = tmp_path / "VBench_full_info.json"
    info.write_text(json.dumps([{"prompt_en": "a red circle moving left", "dimension": ["color"]}]))
    bad = {"empty": None, "unknown": '{"foo": [0.5, []]}', "garbled": "not json"}
    for name, text in bad.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "x_eval_results.json").write_text(text)
    args = ["eval", "gen", "--checkpoint", str(run_dir), "--vbench", "--vbench-info", str(info), "--vbench-per-prompt",
            "1", "--steps", "1", "--device", "cpu", "--output", str(tmp_path / "g")]
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(args)
    earlier = (tmp_path / "g" / "result.json").read_bytes()
    for extra, match in [(["--vbench-results", str(tmp_path / "empty")], "no \\*_eval_results.json"),
                         (["--vbench-results", str(tmp_path / "unknown")], "unknown VBench dimension"),
                         (["--vbench-results", str(tmp_path / "garbled")], "is not a VBench \\*_eval_results.json"),
                         (["--vbench-results", str(tmp_path / "none")], "--vbench-results .*not found"),
                         (["--vbench-dimensions", "foo"], "unknown VBench dimension"),
                         (["--reference", str(tmp_path / "empty"), "--i3d", str(files / "i3d_torchscript.pt"),
                           "--fvd-frames", "8"], "no videos"),
                         (["--reference", str(files / "videos"), "--samples", str(tmp_path / "empty"), "--i3d",
                           str(files / "i3d_torchscript.pt"), "--fvd-frames", "8"], "no videos")]:
        with warnings.catch_warnings(), pytest.raises(UserError, match=match):  # were tracebacks after the clearing
            warnings.simplefilter("ignore")
            ldm(args + ["--overwrite"] + extra)
        assert (tmp_path / "g" / "result.json").read_bytes() == earlier, extra


@pytest.mark.slow
@pytest.mark.dist
def test_eval_gen_on_two_ranks_gives_the_one_rank_fvd_and_fid(files, run_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m launch.cli eval gen --reference ...`: each rank samples and reads
    every other batch of the reference clips, their statistics are merged, rank 0 writes result.json
    (was: refused under a launcher). FVD / FID / the split-half floor equal the one-rank run's to
    1e-6 relative (the same clips and noise, merged sums in float64); the reference statistics that
    one rank cached are reused by two."""
    import os
    import subprocess
    from pathlib import Path

    from procs import torchrun

    args = ["eval", "gen", "--checkpoint", str(run_dir / "export"), "--reference", str(files / "videos"), "--i3d",
            str(files / "i3d_torchscript.pt"), "--inception", str(files / "inception-2015-12-05.pt"), "--fvd-frames",
            "8", "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(args + ["--output", str(tmp_path / "one"), "--reference-stats", str(tmp_path / "stats")])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for name, extra in [("two", ["--reference-stats", str(tmp_path / "stats2")]),
                        ("two-cached", ["--reference-stats", str(tmp_path / "stats")])]:
        r = subprocess.run(torchrun(2, *args, "--output", str(tmp_path / name), *extra), env=env, cwd=root,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count('"world_size": 2') == 1  # printed once, by rank 0
    one, two, cached = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("one", "two", "two-cached"))
    assert (one["world_size"], two["world_size"], cached["world_size"]) == (1, 2, 2)
    assert cached["fd"]["reference_stats"]["reused"] and not one["fd"]["reference_stats"]["reused"]
    (written,), (merged,) = (tmp_path / "stats").iterdir(), (tmp_path / "stats2").iterdir()  # by rank 0, merged
    assert written.name == merged.name
    a, b = load_tensors(written), load_tensors(merged)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-9) for k in a)
    for result in (two, cached):
        fd, ref = result["fd"], one["fd"]
        assert (fd["fvd"]["n_real"], fd["fvd"]["n_fake"], fd["fid"]["n_fake"]) == (6, 6, 6 * 8)
        assert fd["fvd"]["fvd"] == pytest.approx(ref["fvd"]["fvd"], rel=1e-6)
        assert fd["fid"]["fid"] == pytest.approx(ref["fid"]["fid"], rel=1e-6)
        assert fd["fvd"]["reference_split_half"]["fvd"] == pytest.approx(ref["fvd"]["reference_split_half"]["fvd"],
                                                                          rel=1e-6)
        assert fd["fvd"]["reference_split_half"]["n"] == ref["fvd"]["reference_split_half"]["n"] == [3, 3]


@pytest.mark.slow
@pytest.mark.dist
def test_eval_recon_on_two_ranks_gives_the_one_rank_scores(files, tmp_path):
    """`torchrun --nproc_per_node 2 -m launch.cli eval recon`: the ranks split the clips, rank 0
    writes the one-process scores (to 1e-6 relative) and grid (was: refused under a launcher)."""
    import os
    import subprocess
    from pathlib import Path

    from procs import torchrun

    args = ["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(files / "videos"), "--frames", "8",
            "--height", "32", "--width", "32", "--i3d", str(files / "i3d_torchscript.pt"), "--fvd-frames", "8",
            "--inception", str(files / "inception-2015-12-05.pt"), "--frame-group", "4", "--batch-size", "2",
            "--device", "cpu"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for name, cmd in [("one", [sys.executable, "-m", "launch.cli"]), ("two", torchrun(2))]:  # fresh processes:
        r = subprocess.run([*cmd, *args, "--output", str(tmp_path / f"{name}.json"), "--grid",  # the same weights
                            str(tmp_path / f"{name}.png")], env=env, cwd=root, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["clips"] == two["clips"] == 6 and two["rfvd"]["n_real"] == 6
    for key in ("psnr_db", "ssim"):
        assert two[key]["mean"] == pytest.approx(one[key]["mean"], rel=1e-6) and two[key]["n"] == 6
    assert two["rfvd"]["rfvd"] == pytest.approx(one["rfvd"]["rfvd"], rel=1e-6)
    assert two["rfid"]["rfid"] == pytest.approx(one["rfid"]["rfid"], rel=1e-6) and two["rfid"]["n_real"] == 48
    assert two["ssim_per_position"]["positions"] == pytest.approx(one["ssim_per_position"]["positions"], rel=1e-6)
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()


class _FrozenAE(_IdentityAE):
    """Decodes every frame as the clip's first: all motion lost, the first frame exact."""
    family = "frozen-test"

    def _decode(self, latent, cond):
        z = latent["z"]
        return z[:, :, :1].expand_as(z)


def test_eval_recon_temporal_error_is_the_motion_a_frozen_reconstruction_loses(files):
    """``temporal_error`` of `ldm eval recon` (RECON_METRICS): per clip, the mean grey levels (0..255) by which the
    reconstruction's frame-to-frame change differs from the clip's; a frozen decoder loses all of it."""
    from data.sources import VideoClipDataset

    r = eval_recon.evaluate_reconstruction(_FrozenAE(), str(files / "videos"), 8, 32, 32)
    clips = [c["video"].double() for c in VideoClipDataset(list_items(files / "videos"), 8, 32, 32, None)]
    motion = [float(c.diff(dim=1).abs().mean() * 127.5) for c in clips]  # (C, T, H, W): frame to frame, grey levels
    assert r["temporal_error"]["n"] == 6 and min(motion) > 0
    assert r["temporal_error"]["mean"] == pytest.approx(np.mean(motion), rel=1e-6)
    assert r["temporal_error"]["std"] == pytest.approx(np.std(motion), rel=1e-6)
    assert "temporal_error" not in eval_recon.evaluate_reconstruction(_FrozenAE(), str(files / "videos"), 1, 32, 32)


def test_eval_recon_information_preservation_is_iv_vae_s(files):
    """``info_preservation`` (IV-VAE App. A.1 Eq. 2, Fig. 1a): per clip ``1 - sum |x - x'| / sum |x|`` with pixels in
    [0, 1], and ``pooled``, the paper's sums over all clips (was: not measured)."""
    from data.sources import VideoClipDataset

    r = eval_recon.evaluate_reconstruction(_FrozenAE(), str(files / "videos"), 8, 32, 32)
    clips = [(c["video"].double() + 1) / 2 for c in VideoClipDataset(list_items(files / "videos"), 8, 32, 32, None)]
    errors = [float((c - c[:, :1]).abs().sum()) for c in clips]  # the frozen decoder's: every frame as the first
    totals = [float(c.sum()) for c in clips]
    assert r["info_preservation"]["mean"] == pytest.approx(np.mean([1 - e / t for e, t in zip(errors, totals)]))
    assert r["info_preservation"]["pooled"] == pytest.approx(1 - sum(errors) / sum(totals))
    assert 0 < r["info_preservation"]["pooled"] < 1


def test_eval_recon_reports_a_variable_rate_autoencoder_s_vcpr_and_keyframe_accuracy(tmp_path):
    """MTC-VAE (``variable_rate``): per clip, `rate_report`'s VCPR and keyframe accuracy, summarised over the clips
    as every RECON_METRICS entry (was: left out, only one clip's through `ldm reconstruct`); none for a fixed rate."""
    synth_dataset(tmp_path / "v", num=2, frames=17, size=32, fps=8, seed=0)
    ae = autoencoders.build("mtcvae-c4-debug").eval()
    r = eval_recon.evaluate_reconstruction(ae, str(tmp_path / "v"), 17, 32, 32, batch_size=2)
    from data.sources import VideoClipDataset
    x = torch.stack([c["video"] for c in VideoClipDataset(list_items(tmp_path / "v"), 17, 32, 32, None)])
    with torch.no_grad():
        reports = ae.rate_report(ae.encode(x))
    vcpr, acc = [rep["vcpr"] for rep in reports], [rep["keyframe_accuracy"] for rep in reports]
    assert r["vcpr"]["n"] == r["keyframe_accuracy"]["n"] == 2
    assert (r["vcpr"]["mean"], r["vcpr"]["std"]) == (pytest.approx(np.mean(vcpr)), pytest.approx(np.std(vcpr)))
    assert r["keyframe_accuracy"]["mean"] == pytest.approx(np.mean(acc)) and 0 <= np.mean(acc) <= 1
    fixed = eval_recon.evaluate_reconstruction(autoencoders.build("kl2d-f8c4-debug"), str(tmp_path / "v"), 8, 32, 32)
    assert "vcpr" not in fixed and "keyframe_accuracy" not in fixed


def test_eval_recon_first_frame_is_reconstructs_image_to_video_decode(files, tmp_path):
    """``--first-frame`` (H3AE Tab. 4): each clip decoded with its own first frame, as `ldm reconstruct --first-frame`
    (was: no such flag, only the plain decode); refused in one line for an autoencoder without first-frame decoding."""
    from data.sources import VideoClipDataset
    from launch.reconstruct import reconstruct

    torch.manual_seed(0)
    ae = autoencoders.build("h3ae-4x16x16-debug").eval()
    i2v = eval_recon.evaluate_reconstruction(ae, str(files / "videos"), 5, 32, 32, num=1, first_frame=True)
    plain = eval_recon.evaluate_reconstruction(ae, str(files / "videos"), 5, 32, 32, num=1)
    clip = VideoClipDataset(list_items(files / "videos"), 5, 32, 32, None)[0]["video"]
    want = [reconstruct(ae, clip, torch.device("cpu"), first_frame=f)[1]["psnr"] for f in (True, False)]
    assert (i2v["first_frame"], plain["first_frame"]) == (True, False)
    assert [i2v["psnr_db"]["mean"], plain["psnr_db"]["mean"]] == pytest.approx(want, abs=1e-4)
    assert want[0] != pytest.approx(want[1], abs=1e-4)
    with pytest.raises(UserError, match="^--first-frame: kl2d-f8c4-debug does not decode with a first frame"), \
            pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(files / "videos"), "--first-frame",
             "--output", str(tmp_path / "r.json"), "--device", "cpu"])
    assert not (tmp_path / "r.json").exists()


def test_eval_recon_default_frames_come_from_the_video_not_its_gif_twin(tmp_path, capsys):
    """In an `ldm sample` folder (``0000.mp4`` + ``0000.gif``) the default clip comes from the MP4, the file read
    (was: from the GIF listed first, whose centisecond frame delays give 8 frames at 15 fps, so a causal VAE took
    clips of 5 frames of the 9)."""
    clip = torch.rand(3, 9, 32, 32) * 2 - 1
    for suffix in (".mp4", ".gif"):
        write_video(tmp_path / "s" / f"0000{suffix}", clip, 15.0)
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "causal3d-f4x8c4-debug", "--input", str(tmp_path / "s"), "--fps", "15",
             "--output", str(tmp_path / "r.json"), "--device", "cpu"])
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["frames"], r["clips"]) == (9, 1)
    assert "clips of 9 frames, as 0000.mp4 holds" in capsys.readouterr().err


def test_eval_recon_rfid(files, tmp_path, capsys):
    """``--inception``: rFID, the FID between every frame of the originals and of their reconstructions, with eval
    gen's FID extractor, N (frames) and a small-sample warning (was: no rFID, Hi-VAE Tab. 2's column)."""
    from data.sources import VideoClipDataset

    inception = metrics.load_inception(files / "inception-2015-12-05.pt")
    r = eval_recon.evaluate_reconstruction(_FrozenAE(), str(files / "videos"), 8, 32, 32, inception=inception)
    perfect = eval_recon.evaluate_reconstruction(_FrozenAE(), str(files / "videos"), 1, 32, 32, inception=inception)
    x = torch.stack([c["video"] for c in VideoClipDataset(list_items(files / "videos"), 8, 32, 32, None)])
    want = metrics.fid_accumulator(inception)
    want.update("real", x)
    want.update("fake", x[:, :, :1].expand_as(x))  # what the frozen decoder gives
    assert (r["rfid"]["n_real"], r["rfid"]["n_fake"], perfect["rfid"]["n_real"]) == (48, 48, 6)
    assert r["rfid"]["rfid"] == pytest.approx(want.result("rfid")["rfid"], rel=1e-6) and r["rfid"]["rfid"] > 0
    assert perfect["rfid"]["rfid"] == pytest.approx(0, abs=1e-9)  # 1-frame clips: the frozen decoder is exact
    assert r["rfid"]["extractor"] == "inception_torchscript" and "50000" in r["rfid"]["small_sample"]
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(files / "videos"), "--num", "2",
             "--inception", str(files / "inception-2015-12-05.pt"), "--output", str(tmp_path / "r.json"),
             "--device", "cpu"])
    assert json.loads((tmp_path / "r.json").read_text())["rfid"]["n_real"] == 16
    assert "ldm eval recon: warning: rfid: " in capsys.readouterr().err


class _Recording16(_FrozenAE):
    """Returns its input (spatial sizes: multiples of 16 only) and records every batch it encodes."""
    family = "recording16-test"

    def __init__(self):
        super().__init__()
        self.seen = []

    def check_input(self, frames, height, width):
        if height % 16 or width % 16:
            raise ValueError(f"sizes must be multiples of 16, got {height}x{width}")

    def _encode(self, video, cond):
        self.seen.append(video.clone())
        return super()._encode(video, cond)

    def _decode(self, latent, cond):
        return latent["z"]


def _mixed_sizes(folder, sizes, frames=5):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(sizes):
        write_video(folder / f"{i}.mp4", torch.rand(3, frames, h, w, generator=g) * 2 - 1, 8)
    return folder


def test_eval_recon_native_size_reads_each_clip_at_its_own_size(files, tmp_path, monkeypatch):
    """``--native-size`` (IV-VAE Tab. 1: Kinetics-600 / ActivityNet "with the original video resolution"): each clip at
    its own size, center-cropped to the largest the autoencoder takes, never resized, encoded in batches of one size,
    the sizes recorded; rFVD / rFID over the mixed sizes (was: no such flag, every clip resized to one size)."""
    videos = _mixed_sizes(tmp_path / "v", [(36, 52), (48, 48), (36, 52), (40, 56)])
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(videos), "--native-size",
             "--i3d", str(files / "i3d_torchscript.pt"), "--fvd-frames", "5", "--inception",
             str(files / "inception-2015-12-05.pt"), "--grid", str(tmp_path / "g.png"), "--output", str(out),
             "--device", "cpu"])
    r = json.loads(out.read_text())
    assert (r["native_size"], r["height"], r["width"], r["frames"], r["clips"]) == (True, None, None, 5, 4)
    assert r["sizes"] == {"40x56": 1, "48x48": 1, "32x48": 2}  # 36x52 cropped to multiples of 8
    assert r["source_sizes"] == {"40x56": 1, "48x48": 1, "36x52": 2} and "never resized" in r["read"]
    assert r["rfvd"]["n_real"] == 4 and np.isfinite(r["rfvd"]["rfvd"]) and r["rfid"]["n_real"] == 20
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"

    ae = _Recording16()  # multiples of 16: 36x52 -> 32x48, 40x56 -> 32x48, 48x48 stays; the pixels themselves
    looks = []  # each video's size is read once, to batch by size; the reading takes it (was: a second look)
    for module in (eval_recon, eval_clips):
        real = module.upright_size
        monkeypatch.setattr(module, "upright_size",
                            lambda src, real=real, m=module.__name__: looks.append(m) or real(src))
    r = eval_recon.evaluate_reconstruction(ae, str(videos), 5, None, None, native=True, batch_size=4)
    assert looks == ["launch.eval_recon"] * 4
    assert [tuple(x.shape) for x in ae.seen] == [(3, 3, 5, 32, 48), (1, 3, 5, 48, 48)]
    assert r["sizes"] == {"48x48": 1, "32x48": 3} and r["psnr_db"]["infinite"] == 4
    native = eval_vbench.read_native(videos / "3.mp4")[:, :5]  # 40x56, cropped 4 rows and 4 columns from each side
    assert torch.equal(ae.seen[0][2], native[:, :, 4:36, 4:52])
    with pytest.raises(UserError, match="^--native-size reads each clip at its own size; leave out --height"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(videos), "--native-size",
             "--height", "32", "--output", str(tmp_path / "x.json"), "--device", "cpu"])


def test_eval_clips_decoded_by_worker_processes_are_the_same_clips(files, tmp_path, monkeypatch, caplog):
    """``--num-workers`` (`ldm eval`'s video decoding in DataLoader processes, as `ldm extract`; 8-bit pixels sent,
    made float32 here): the same clips bit for bit, in the same order, the same skipped videos with their reasons,
    resized, at their own size (``--native-size``) or unreadable; the CLI's result is the same (was: every clip
    decoded in the evaluating process, between the model's batches)."""
    videos = _mixed_sizes(tmp_path / "v", [(36, 52), (48, 48), (12, 28), (40, 56)])
    (videos / "4.mp4").write_bytes(b"not a video")
    loaders, real = [], torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: loaders.append(k["num_workers"]) or real(*a, **k))
    for native in (None, _Recording16()):
        runs = []
        for workers in (0, 2):
            clips, skipped, n = eval_clips.iter_clips(str(videos), 5, 32, 32, None, None, native=native,
                                                      workers=workers, batch_size=2)
            runs.append(([(c["key"], c["index"], c["video"]) for c in clips], skipped, n))
        (one, skipped_one, n), (two, skipped_two, _) = runs
        assert n == 5 and [k for k, _, _ in one] == [k for k, _, _ in two] and skipped_one == skipped_two
        assert all(a.dtype == torch.float32 and torch.equal(a, b) for (_, _, a), (_, _, b) in zip(one, two))
        assert any("4.mp4" in s and "not a readable video" in s for s in skipped_one)
        if native is None:  # resized from their own sizes (12x28 too: upscaled), as a plain read gives them
            assert len(one) == 4 and all(v.shape == (3, 5, 32, 32) for _, _, v in one)
            from data.video import read_video
            assert torch.equal(one[0][2], read_video(videos / "0.mp4", 5, 32, 32))
        else:  # 12x28 holds no multiple of 16: skipped, naming why
            assert [tuple(v.shape[-2:]) for _, _, v in one] == [(32, 48), (48, 48), (32, 48)]
            assert any("2.mp4" in s and "takes no clip of 5 frames at 12x28" in s for s in skipped_one)

    results = []
    for workers in ("0", "2"):
        out = tmp_path / f"r{workers}.json"
        with pytest.warns(UserWarning, match="RANDOM"):
            ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(videos), "--frames", "5",
                 "--height", "32", "--width", "32", "--output", str(out), "--device", "cpu", "--num-workers", workers])
        results.append(json.loads(out.read_text()))
    assert loaders == [2, 2, 2]  # a loader of 2 processes for each reading with workers, none without
    import data.video as video  # a container's small /dev/shm: fewer workers (here none), said once
    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="ldm.eval"):
        m.setattr(video, "shared_memory_free", lambda path=video.SHARED_MEMORY: 2**16)
        clips, _, _ = eval_clips.iter_clips(str(videos), 5, 32, 32, None, None, workers=2, batch_size=2)
        assert [c["video"].shape for c in clips] == [(3, 5, 32, 32)] * 4 and loaders == [2, 2, 2]
    assert ["0 worker(s) instead of 2" in r.getMessage() for r in caplog.records] == [True]
    caplog.clear()  # at their own sizes, fitted at the largest clip (48x48, as the sizes read say): 2 workers at 32x32
    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="ldm.eval"):  # 2 x 2 ahead x 3 x 5 x 32 x 32
        m.setattr(video, "shared_memory_free", lambda path=video.SHARED_MEMORY: 2 * 100_000)  # bytes fit in half
        clips, _, _ = eval_clips.iter_clips(str(videos), 5, 32, 32, None, None, workers=2, batch_size=2)
        assert len(list(clips)) == 4 and loaders == [2, 2, 2, 2] and not caplog.records
        r = eval_recon.evaluate_reconstruction(_Recording16(), str(videos), 5, None, None, native=True, batch_size=2,
                                               workers=2)
        assert r["sizes"] == {"48x48": 1, "32x48": 2} and loaders[4:] == []
    assert ["0 worker(s) instead of 2" in r.getMessage() for r in caplog.records] == [True]
    keep = ("clips", "skipped", "psnr_db", "ssim", "info_preservation")
    assert {k: results[0][k] for k in keep} == {k: results[1][k] for k in keep} and results[0]["clips"] == 4
    with pytest.raises(UserError, match=r"^--num-workers must be >= -1, got -2 \(-1: auto\)"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--input", str(videos), "--output",
             str(tmp_path / "x.json"), "--num-workers", "-2"])
