"""What makes an `ldm eval` number reportable: which clips it was measured on (a seeded random
subset across classes, UCF-101's test split), how many (and a warning below the protocol's size),
and, for FVD over training, the same reference statistics for every checkpoint."""
import json

import pytest
import torch

from launch.cli import main as ldm
from ldm import metrics
from ldm.errors import UserError
from test_classes import _avi
from test_evaluate import _load, files, run_dir  # noqa: F401 (fixtures)

CLASSES = ["ApplyEyeMakeup", "Basketball", "YoYo"]


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """UCF-101's layout, 3 classes x 3 videos (groups 1-2 test, 8 train), with its split lists."""
    root = tmp_path_factory.mktemp("ucf")
    (root / "lists").mkdir()
    test = []
    for i, c in enumerate(CLASSES):
        (root / "UCF-101" / c).mkdir(parents=True)
        for g in (1, 2, 8):
            _avi(root / "UCF-101" / c / f"v_{c}_g{g:02d}_c01.avi", 40 + 60 * i + g)
            test += [f"{c}/v_{c}_g{g:02d}_c01.avi"] if g < 8 else []
    (root / "lists" / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    (root / "lists" / "testlist01.txt").write_text("".join(f"{x}\n" for x in test))
    return root


def _recon(tmp_path, name, *flags):
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "recon", "--autoencoder", "kl2d-f8c4-debug", "--frames", "8", "--height", "32", "--width", "32",
             "--device", "cpu", "--output", str(tmp_path / name), *flags])
    return json.loads((tmp_path / name).read_text())


def test_eval_recon_takes_a_seeded_random_subset_across_classes(ucf, tmp_path):
    """``--num`` is a random N seeded by ``--seed`` (was: the first N sorted, all ApplyEyeMakeup);
    ``--classes`` / ``--split`` as on eval gen; the JSON says how the clips were chosen."""
    r = _recon(tmp_path, "a.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--classes", "folder")
    assert r["clips"] == 3 and r["input_clips"]["chosen"] == "random 3 of 9 (seed 0)"
    assert r["input_clips"]["classes_covered"] != "1 of 3"
    again = _recon(tmp_path, "b.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--classes", "folder")
    assert again["psnr_db"] == r["psnr_db"] and again["input_clips"] == r["input_clips"]  # the same clips each run
    other = _recon(tmp_path, "c.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--seed", "1")
    assert other["input_clips"]["chosen"] == "random 3 of 9 (seed 1)" and other["psnr_db"] != r["psnr_db"]
    first = _recon(tmp_path, "e.json", "--input", str(ucf / "UCF-101"), "--num", "3", "--first", "--classes", "folder")
    assert first["input_clips"] | {"classes": None} == {"classes": None, "split": None, "listed": 9, "used": 3,
                                                        "chosen": "first 3 of 9 in listing order",
                                                        "classes_covered": "1 of 3"}  # as train-ae's val.clips
    lists = ucf / "lists"
    split = _recon(tmp_path, "d.json", "--input", str(ucf / "UCF-101"), "--classes", str(lists / "classInd.txt"),
                   "--split", str(lists / "testlist01.txt"))
    assert split["clips"] == 6 and split["input_clips"] | {"classes": None, "split": None} == {
        "classes": None, "split": None, "listed": 6, "used": 6, "chosen": "all", "classes_covered": "3 of 3"}
    assert (split["read_fps"], split["dtype"]) == (None, "fp32") and "center-cropped" in split["read"]


def test_frechet_results_say_n_and_warn_below_the_protocol_size(files, monkeypatch):
    ext = metrics.load_i3d(files / "i3d_torchscript.pt")
    clips = torch.rand(6, 3, 8, 16, 16) * 2 - 1
    acc = metrics.fvd_accumulator(ext, frames=8)
    acc.update("real", clips)
    acc.update("fake", clips[:4])
    r = acc.result("fvd")
    assert (r["n_real"], r["n_fake"], r["protocol_n"]) == (6, 4, 2048)
    assert r["small_sample"].startswith("measured on 6 reference and 4 generated clips, fewer than the usual 2048")
    monkeypatch.setattr(metrics, "FVD_PROTOCOL_N", 4)
    at = metrics.fvd_accumulator(ext, frames=8)
    at.stats = acc.stats
    assert "small_sample" not in at.result("fvd") and at.result("fvd")["fvd"] == r["fvd"]


def test_eval_gen_records_sampling_precision_and_warns_at_small_n(files, run_dir, tmp_path, capsys):
    """FVD's result carries what made the generated clips (sampler settings, seed, dtype, batch
    size) and says when N is below the protocol's (was: none of them; a 4-clip FVD looked final)."""
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["eval", "gen", "--checkpoint", str(run_dir), "--reference", str(files / "videos"), "--num", "4",
             "--i3d", str(files / "i3d_torchscript.pt"), "--fvd-frames", "8", "--steps", "1", "--seed", "3",
             "--batch-size", "2", "--device", "cpu", "--output", str(tmp_path / "g")])
    r = json.loads((tmp_path / "g" / "result.json").read_text())
    assert (r["dtype"], r["batch_size"]) == ("fp32", 2) and len(r["dit_weights"]["sha256"]) == 64
    assert r["fd"]["sampling"]["steps"] == 1 and r["fd"]["sampling"]["seed"] == 3
    assert r["fd"]["read"] == ("each frame resized to cover the clip size, aspect kept (bilinear, antialiased, on its "
                               "8-bit pixels), then center-cropped")
    assert r["fd"]["fvd"]["n_fake"] == 4 and "fewer than the usual 2048" in r["fd"]["fvd"]["small_sample"]
    assert "ldm eval gen: warning: fvd: measured on 4 reference and 4 generated clips" in capsys.readouterr().err


def test_reference_stats_are_kept_and_reused_for_another_checkpoint(files, run_dir, tmp_path, monkeypatch):
    """FVD over training: with ``reference_stats`` the reference side is read and featurised once;
    a later evaluation of the same clips under the same protocol reuses it (the same number, the
    reference not decoded, its skipped clips still listed); another protocol or a replaced video
    is computed afresh (was: every checkpoint decoded and featurised the whole reference again)."""
    from launch import eval_clips, eval_fd
    from ldm.samplers import SamplingConfig

    model, ae, context = _load(run_dir)
    ref = tmp_path / "ref"
    ref.mkdir()
    for video in sorted((files / "videos").rglob("*.mp4"))[:4]:
        (ref / video.name).write_bytes(video.read_bytes())
    (ref / "zz-broken.mp4").write_bytes(b"not a video")
    i3d = metrics.load_i3d(files / "i3d_torchscript.pt")
    kw = dict(frames=8, height=32, width=32, num=None, i3d=i3d, inception=None, sampling=SamplingConfig(steps=1),
              batch_size=2, reference_stats=tmp_path / "stats")
    first = eval_fd.generation_fd(model, ae, context, str(ref), fvd_frames=8, **kw)
    assert first["reference_stats"]["reused"] is False and len(list((tmp_path / "stats").iterdir())) == 1
    read, clips = [], eval_clips.iter_clips
    monkeypatch.setattr(eval_clips, "iter_clips", lambda input, *a: read.append(input) or clips(input, *a))
    again = eval_fd.generation_fd(model, ae, context, str(ref), fvd_frames=8, **kw)
    assert again["reference_stats"] == first["reference_stats"] | {"reused": True} and read == []
    assert again["fvd"] == first["fvd"] and again["skipped"] == first["skipped"] and len(first["skipped"]) == 1
    assert eval_fd.generation_fd(model, ae, context, str(ref), fvd_frames=4, **kw)["reference_stats"]["reused"] is False
    (ref / "zz-broken.mp4").write_bytes(b"still not a video, but another file")
    assert eval_fd.generation_fd(model, ae, context, str(ref), fvd_frames=8, **kw)["reference_stats"]["reused"] is False
    assert read == [str(ref)] * 2 and len(list((tmp_path / "stats").iterdir())) == 3
    for f in (tmp_path / "stats").iterdir():
        f.write_bytes(b"junk")
    with pytest.raises(UserError, match="--reference-stats: .* cannot be read .*delete it"):
        eval_fd.generation_fd(model, ae, context, str(ref), fvd_frames=8, **kw)
    with pytest.raises(UserError, match="--reference-stats .* is a file; give a folder"):
        ldm(["eval", "gen", "--checkpoint", str(run_dir), "--reference", str(ref), "--i3d",
             str(files / "i3d_torchscript.pt"), "--fvd-frames", "8", "--reference-stats", str(f), "--output",
             str(tmp_path / "g")])


def test_eval_gen_records_which_weights_and_step(run_dir, tmp_path):
    """A result names the weights it sampled (file and sha256) and, for a kept checkpoint
    ``RUN/checkpoints/step-N``, its step (was: only the path given)."""
    import hashlib
    import shutil

    from ldm.checkpoint import read_json

    from launch import evaluate as ev

    export = run_dir / "export"
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000030"
    step.mkdir(parents=True)
    shutil.copy(export / "model.safetensors", step / "ema.safetensors")
    (step / "trainer.json").write_text(json.dumps({"step": 30}))
    (run / "config.json").write_text(json.dumps({"dit": read_json(export / "config.json"),
                                                 "export": read_json(export / "training.json")}))
    sha = hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()
    assert ev.dit_weights(run_dir) == {"file": str(export / "model.safetensors"), "sha256": sha}
    assert ev.dit_weights(step) == {"file": str(step / "ema.safetensors"), "sha256": sha, "step": 30}


def test_attribute_accuracy_comes_with_its_interval(run_dir, monkeypatch):
    """An accuracy over a few samples per prompt carries its 95% Wilson interval (was: a bare
    fraction: 4 of 4 right read as 100%, though the model's may be 51%)."""
    from launch import eval_attributes

    assert eval_attributes.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert eval_attributes.wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert eval_attributes.wilson_interval(4, 4) == pytest.approx([0.5101, 1.0], abs=1e-4)
    with pytest.raises(ValueError):
        eval_attributes.wilson_interval(3, 2)
    model, ae, context = _load(run_dir)
    suite = eval_attributes.attribute_suite(["circle"], ["red", "blue"], ["left", "right"])
    monkeypatch.setattr(eval_attributes, "generate",
                        lambda *a, prompts=None, **k: torch.zeros(len(prompts), 3, 8, 32, 32))
    r = eval_attributes.attribute_benchmark(model, ae, context, suite, per_prompt=1, frames=8, height=32, width=32)
    assert r["accuracy"]["shape"] == 1.0 and r["accuracy_ci95"]["shape"] == pytest.approx([0.5101, 1.0], abs=1e-4)


class StepMotion(torch.nn.Module):
    """An FVD stand-in that sees motion per frame step: its mean and its least (0 for a repeated frame)."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        d = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (B, T - 1)
        return torch.stack([d.mean(1), d.min(1).values], 1) * 10


def test_an_ldm_sample_folder_is_read_frame_by_frame_whatever_its_playback_fps(files, run_dir, tmp_path):
    """``ldm sample --fps 4`` of a DiT trained at 8 fps writes the same frames to play slower; FVD
    reads them one by one (was: resampled to 8 fps, each frame twice: a slowed-down clip scored)."""
    import dataclasses

    from data.video import write_video
    from launch import eval_fd, eval_vbench
    from ldm.artifacts import ClipSpec

    model, ae, context = _load(run_dir)
    at8 = dataclasses.replace(context, video=ClipSpec(8, 32, 32, fps=8.0))
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, video in enumerate(sorted((files / "videos").rglob("*.mp4"))):
        write_video(samples / f"{i:04d}.mp4", eval_vbench.read_native(video), 4)
    (samples / "index.json").write_text(json.dumps([{"file": f"{i:04d}.mp4", "fps": 4} for i in range(6)]))
    torch.jit.save(torch.jit.script(StepMotion()), str(tmp_path / "motion.pt"))
    kw = dict(frames=8, height=32, width=32, num=None, i3d=metrics.load_i3d(tmp_path / "motion.pt"),
              inception=None, fvd_frames=8, samples=str(samples))
    r = eval_fd.generation_fd(model, ae, at8, str(files / "videos"), **kw)
    assert r["read_fps"] == 8.0 and r["samples_read_fps"] is None
    assert r["fvd"]["n_fake"] == 6 and r["fvd"]["fvd"] < 1e-2  # was 0.22: every other step without motion


def test_fvd_reports_the_split_half_floor_of_the_reference(files):
    """FVD's result carries the distance between two halves of the reference clips (alternate
    clips, whatever the batches): about what a perfect model would score at this N (was: no scale
    for the bias at small N)."""
    ext = metrics.load_i3d(files / "i3d_torchscript.pt")
    torch.manual_seed(2)
    clips = torch.rand(11, 3, 8, 16, 16) * 2 - 1
    acc = metrics.fvd_accumulator(ext, frames=8)
    for part in (clips[:3], clips[3:4], clips[4:]):  # odd batch boundaries
        acc.update("real", part)
    acc.update("fake", clips)
    half = acc.result("fvd")["reference_split_half"]
    feats = metrics._i3d_features(ext, metrics.fvd_preprocess(clips, 8))
    want = metrics.frechet_distance(*metrics.gaussian_stats(feats[0::2]), *metrics.gaussian_stats(feats[1::2]))
    assert half["n"] == [6, 5] and half["fvd"] == pytest.approx(want, rel=1e-6) and half["fvd"] > 0
    assert "two halves of the reference clips" in half["meaning"]


def test_reference_seed_keeps_the_reference_clips_across_sampling_seeds(files, run_dir, tmp_path):
    """Error bars over sampling seeds: ``--reference-seed`` fixes which ``--num`` reference clips
    are used while ``--seed`` changes the noise (was: --seed changed both), so the statistics of
    the reference are reused."""
    def fd(*flags):
        out = tmp_path / "g"
        with pytest.warns(UserWarning, match="RANDOM"):
            ldm(["eval", "gen", "--checkpoint", str(run_dir), "--reference", str(files / "videos"), "--num", "3",
                 "--i3d", str(files / "i3d_torchscript.pt"), "--fvd-frames", "8", "--steps", "1", "--device", "cpu",
                 "--reference-stats", str(tmp_path / "stats"), "--output", str(out), "--overwrite", *flags])
        return json.loads((out / "result.json").read_text())["fd"]

    base = fd("--seed", "0")
    other = fd("--seed", "7", "--reference-seed", "0")
    assert other["reference_clips"] == base["reference_clips"] and other["reference_clips"]["chosen"] == \
        "random 3 of 6 (seed 0)"
    assert other["reference_stats"]["reused"] and other["sampling"]["seed"] == 7 and other["fvd"] != base["fvd"]
    assert fd("--seed", "7")["reference_clips"]["chosen"] == "random 3 of 6 (seed 7)"


def test_eval_gen_frame_change_of_each_side(files, run_dir, tmp_path):
    """``fd.frame_change`` (GEN_CLIP_METRICS): per clip, the mean grey levels (0..255) by which consecutive frames
    differ, for the reference and the generated clips; the reference's is kept with ``--reference-stats``."""
    from data.video import write_video
    from launch import eval_fd
    from ldm.samplers import SamplingConfig

    model, ae, context = _load(run_dir)
    (tmp_path / "ref").mkdir(), (tmp_path / "still").mkdir()
    blink = torch.full((3, 8, 32, 32), -1.0)
    blink[:, 1::2] = -0.6  # every other frame 51 grey levels brighter: 51 between any two frames
    for i in range(3):
        write_video(tmp_path / "ref" / f"{i}.gif", blink, 8)
    for i in range(2):
        write_video(tmp_path / "still" / f"{i}.mp4", torch.full((3, 8, 32, 32), 0.2), 8)  # still clips: 0 change
    kw = dict(frames=8, height=32, width=32, num=None, i3d=metrics.load_i3d(files / "i3d_torchscript.pt"),
              inception=None, fvd_frames=8, sampling=SamplingConfig(steps=1), batch_size=2,
              reference_stats=tmp_path / "stats")
    r = eval_fd.generation_fd(model, ae, context, str(tmp_path / "ref"), samples=str(tmp_path / "still"), **kw)
    assert r["frame_change"] == {"reference": {"mean": pytest.approx(51.0), "std": pytest.approx(0.0), "n": 3,
                                               "infinite": 0},
                                 "generated": {"mean": 0.0, "std": 0.0, "n": 2, "infinite": 0}}
    again = eval_fd.generation_fd(model, ae, context, str(tmp_path / "ref"), **kw)  # sampled now, the reference kept
    assert again["reference_stats"]["reused"] and again["frame_change"]["reference"] == r["frame_change"]["reference"]
    assert again["frame_change"]["generated"]["n"] == 3 and again["frame_change"]["generated"]["mean"] >= 0


def test_kept_reference_statistics_follow_the_clip_metrics(tmp_path, monkeypatch):
    """A metric added to `GEN_CLIP_METRICS` names another reference-statistics file, so its
    reference side is measured (was: the kept file was reused and the new metric had no reference
    side, unsaid)."""
    from data.sources import VideoItem
    from launch import eval_fd

    video = tmp_path / "a.mp4"
    video.write_bytes(b"not decoded here")
    items = [VideoItem(key="a", path=video)]
    before = eval_fd.reference_stats_file(tmp_path / "stats", items, {}, 8, 32, 32, None)
    assert eval_fd.reference_stats_file(tmp_path / "stats", items, {}, 8, 32, 32, None) == before
    monkeypatch.setitem(eval_fd.GEN_CLIP_METRICS, "brightness", (lambda clips: clips.mean((1, 2, 3, 4)), 1))
    assert eval_fd.reference_stats_file(tmp_path / "stats", items, {}, 8, 32, 32, None) != before
