"""`ldm extract`: shards + manifest from real (synthetic) videos, resume, bad inputs, 2 ranks."""
import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from data import shards
from data.manifest import load_manifest
from data.synth import NUM_CLASSES, synth_dataset
from data.video import write_frames
from launch import extract as extract_verb
from launch.cli import main as ldm
from ldm.errors import UserError
from ldm.text import build_text_encoder, fingerprint
from procs import torchrun

AE = "kl2d-f8c4-debug"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    synth_dataset(out, num=7, frames=8, size=32, fps=8, seed=0)
    return out


def _extract(videos, out, *extra):
    return ldm(["extract", "--autoencoder", AE, "--input", str(videos), "--output", str(out), "--frames", "8",
                "--height", "32", "--width", "32", "--shard-size", "3", "--batch-size", "2", *extra])


def test_extract_writes_shards_and_manifest(videos, tmp_path):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert _extract(videos, tmp_path / "lat", "--verify", "2", "--text-encoder", "builtin") == 0
    m = load_manifest(tmp_path / "lat")
    assert (m.counts.inputs, m.counts.written, m.counts.skipped) == (7, 7, 0)
    assert [s["name"] for s in m.shards] == [shards.SHARD_NAME.format(j) for j in range(3)]
    assert m.latent_spec["latent_shape"] == {"z": [4, 8, 4, 4]} and m.form == "grid"
    assert len(m.stats["z"]["mean"]) == 4 and all(s > 0 for s in m.stats["z"]["std"])
    assert m.num_classes == NUM_CLASSES and m.text_dim > 0 and m.verify["k"] == 2  # a synthetic set's whole id space
    assert m.text_fingerprint == fingerprint(build_text_encoder("builtin"))  # `ldm sample` checks its encoder by it
    samples = shards.read_all(tmp_path / "lat")
    meta = [json.loads(line) for line in (videos / "metadata.jsonl").read_text().splitlines()]
    assert [s["cond"]["caption"] for s in samples] == [r["caption"] for r in sorted(meta, key=lambda r: r["key"])]
    assert samples[0]["latent"].logvar["z"].shape == samples[0]["latent"]["z"].shape
    assert samples[0]["cond"]["text_emb"].shape[-1] == m.text_dim
    # the latents decode back to clips of the requested size
    import autoencoders
    torch.manual_seed(0)
    ae = autoencoders.build(AE)
    assert ae.decode(samples[0]["latent"]).shape == (1, 3, 8, 32, 32)


def test_class_count_declared_or_counted(videos, tmp_path):
    from types import SimpleNamespace

    from launch.extract import ExtractConfig, class_count

    items = [SimpleNamespace(key=f"v{i}", class_id=c) for i, c in enumerate([3, None, 7])]
    cfg = ExtractConfig(input=str(tmp_path), output=str(tmp_path / "o"))  # not a synthetic set
    assert class_count(cfg, items) == 8  # the largest label + 1
    assert class_count(ExtractConfig(input=str(videos), output="o"), items) == NUM_CLASSES
    sharded = tmp_path / "sharded"  # a synthetic set in shards, given as one shard or a brace pattern
    synth_dataset(sharded, num=2, frames=2, size=16, layout="shards", shard_size=1)
    for given in ("shard-000000.tar", "shard-{000000..000001}.tar"):
        assert class_count(ExtractConfig(input=str(sharded / given), output="o"), items) == NUM_CLASSES
    assert class_count(dataclasses.replace(cfg, num_classes=20), items) == 20
    assert class_count(cfg, [SimpleNamespace(key="v", class_id=None)]) == 0
    with pytest.raises(UserError, match="v2 has class id 7, outside --num-classes 5"):
        class_count(dataclasses.replace(cfg, num_classes=5), items)
    with pytest.raises(UserError, match="--num-classes 5: no video of .* has a class id"):
        class_count(dataclasses.replace(cfg, num_classes=5), items[1:2])
    # through the verb: refused before the output folder appears
    with pytest.raises(UserError, match="outside --num-classes 3"), pytest.warns(UserWarning, match="RANDOM"):
        _extract(videos, tmp_path / "few", "--num-classes", "3")
    assert not (tmp_path / "few").exists()


def test_data_list_describes_and_checks_a_latent_folder(videos, tmp_path, capsys):
    import shutil

    from launch.cli import console

    with pytest.warns(UserWarning, match="RANDOM"):
        _extract(videos, tmp_path / "lat", "--text-encoder", "builtin")
    capsys.readouterr()
    assert console(["data", "list", "--input", str(tmp_path / "lat"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "7 clips from 7 videos in 3 shards, 0 videos skipped" in out
    assert f"{AE} (kl2d), RANDOM weights (seed 0); encoded in fp32" in out
    assert "clips: 8x32x32, played at 8 fps" in out and "latent (grid): z:4x8x4x4" in out
    assert "conditioning: builtin embeddings" in out and f"{NUM_CLASSES} class ids" in out
    assert "z: per-channel std" in out and "all good" in out
    bad = tmp_path / "bad"  # a truncated shard and a sample whose latent has the wrong shape
    shutil.copytree(tmp_path / "lat", bad)
    blob = (bad / "shard-000001.tar").read_bytes()
    (bad / "shard-000001.tar").write_bytes(blob[: len(blob) // 2])
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["latent_spec"]["latent_shape"]["z"] = [4, 8, 2, 2]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert console(["data", "list", "--input", str(bad), "--check"]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: truncated or unreadable after" in out
    assert "shard-000000.tar: sample 000000000: part 'z' has shape (4, 8, 4, 4), expected (4, 8, 2, 2)" in out
    (bad / "manifest.json").unlink()  # sidecars without a manifest: an unfinished extraction
    assert console(["data", "list", "--input", str(bad)]) == 2
    assert "unfinished `ldm extract` output" in capsys.readouterr().err
    assert console(["data", "list", "--input", str(tmp_path / "lat"), "--frames", "8"]) == 2
    assert "holds latent shards" in capsys.readouterr().err


def test_resume_skips_finished_shards_and_matches(videos, tmp_path):
    _extract(videos, tmp_path / "a")
    digest = shards.raw_bytes_digest(tmp_path / "a")
    manifest = load_manifest(tmp_path / "a")
    # simulate a run killed after shard 0: shard 1 never finished, shard 2 left a temp file
    (tmp_path / "a" / "shard-000001.tar").unlink()
    (tmp_path / "a" / "shard-000001.json").unlink()
    (tmp_path / "a" / "shard-000002.json").unlink()
    (tmp_path / "a" / ".shard-000002.tar.tmp").write_bytes(b"partial")
    (tmp_path / "a" / ".manifest.json.0123abcd.tmp").write_bytes(b"{")  # killed while rank 0 wrote the manifest
    (tmp_path / "a" / ".shard-000002.json.0123abcd.tmp").write_bytes(b"{")
    mtime0 = (tmp_path / "a" / "shard-000000.tar").stat().st_mtime_ns
    _extract(videos, tmp_path / "a")
    assert (tmp_path / "a" / "shard-000000.tar").stat().st_mtime_ns == mtime0  # not redone
    assert shards.raw_bytes_digest(tmp_path / "a") == digest
    assert load_manifest(tmp_path / "a") == manifest
    assert not list((tmp_path / "a").glob(".*tmp"))  # what the killed run left is gone
    with pytest.raises(UserError, match=r"other settings or inputs \(fps: null -> 4.0\)"):
        _extract(videos, tmp_path / "a", "--fps", "4")


def test_bad_inputs_are_skipped_with_reasons(videos, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    for f in sorted((videos / "videos").glob("*.mp4"))[:2]:
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("not a video")
    good = sorted((videos / "videos").glob("*.mp4"))[2].read_bytes()
    (bad / "truncated.mp4").write_bytes(good[: len(good) // 3])
    _extract(bad, tmp_path / "lat", "--frames", "8")
    m = load_manifest(tmp_path / "lat")
    assert m.counts.inputs == 5 and m.counts.written + m.counts.skipped == 5
    reasons = {s["key"]: s["reason"] for s in m.skipped}
    assert {"empty", "text"} <= set(reasons) and all(reasons.values())
    assert m.counts.written >= 2


def test_bad_frame_count_is_a_clear_error(videos, tmp_path):
    with pytest.raises(ValueError, match="1 \\+ 4k|frames"):
        ldm(["extract", "--autoencoder", "causal3d-f4x8c4-debug", "--input", str(videos), "--output",
             str(tmp_path / "x"), "--frames", "8", "--height", "32", "--width", "32"])


@pytest.mark.dist
def test_two_ranks_equal_one_rank(videos, tmp_path):
    _extract(videos, tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(2, "extract", "--autoencoder", AE, "--input", str(videos), "--output",
           str(tmp_path / "two"), "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "3",
           "--batch-size", "2")
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert shards.raw_bytes_digest(tmp_path / "two").keys() == shards.raw_bytes_digest(tmp_path / "one").keys()
    a, b = shards.read_all(tmp_path / "one"), shards.read_all(tmp_path / "two")
    assert [s["meta"] for s in a] == [s["meta"] for s in b]
    for x, y in zip(a, b):  # other thread counts may round differently
        torch.testing.assert_close(x["latent"]["z"], y["latent"]["z"], rtol=1e-4, atol=1e-5)
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert two.world_size == 2
    assert dataclasses.replace(two, world_size=1, stats={}) == dataclasses.replace(one, world_size=1, stats={})
    torch.testing.assert_close(torch.tensor(two.stats["z"]["mean"]), torch.tensor(one.stats["z"]["mean"]))


@pytest.mark.slow
@pytest.mark.dist
def test_a_rerun_spreads_the_shards_left_over_every_rank(videos, tmp_path):
    """A rank (node) that failed leaves its shards undone; the rerun gives them to every rank, not to the
    rank that had them (was: shard j on rank j mod world_size, the others idle), with the same bytes."""
    _extract(videos, tmp_path / "one", "--shard-size", "1")
    _extract(videos, tmp_path / "two", "--shard-size", "1")
    for j in (1, 3, 5):  # rank 1's shards of a 2-rank run, lost
        for suffix in ("tar", "json"):
            (tmp_path / "two" / f"shard-{j:06d}.{suffix}").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(2, "extract", "--autoencoder", AE, "--input", str(videos), "--output", str(tmp_path / "two"),
                   "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "1")
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "extracted 2 clips in" in r.stdout  # rank 0: shards 1 and 5 (rank 1: shard 3)
    assert shards.raw_bytes_digest(tmp_path / "two") == shards.raw_bytes_digest(tmp_path / "one")


# ---------------------------------------------------------------------------------------------
# several clips per video
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """Four synthetic videos of 24 frames (3 s at 8 fps) and one of 6 frames (shorter than a window)."""
    out = tmp_path_factory.mktemp("long")
    synth_dataset(out, num=4, frames=24, size=32, fps=8, seed=1)
    write_frames(out / "videos" / "zz_short.mp4", np.zeros((6, 32, 32, 3), np.uint8), fps=8)
    return out


def _keys(out) -> list[str]:
    return [raw["__key__"] for url in shards.shard_urls(out) for raw in shards.iter_shard(url)]


def test_clips_per_video(long_videos, tmp_path):
    _extract(long_videos, tmp_path / "k3", "--clips-per-video", "3", "--shard-size", "2", "--batch-size", "1",
             "--verify", "2")
    m = load_manifest(tmp_path / "k3")
    assert m.video.clips_per_video == 3 and m.video.clip_stride is None
    assert (m.counts.inputs, m.counts.written, m.counts.skipped) == (5, 12, 1) and m.verify["k"] == 2
    assert m.skipped == ({"key": "videos/zz_short", "reason": "too short: has 6 frames at 8 fps, need 8 frames"},)
    assert [s["count"] for s in m.shards] == [6, 6]                       # shard j: all clips of videos 2j, 2j+1
    assert _keys(tmp_path / "k3") == [shards.clip_key(i, f) for i in range(4) for f in (0, 8, 16)]
    metas = [s["meta"] for s in shards.read_all(tmp_path / "k3")]
    assert [(x["index"], x["clip"], x["start_frame"], x["start_s"]) for x in metas[:3]] == \
        [(0, 0, 0, 0.0), (0, 1, 8, 1.0), (0, 2, 16, 2.0)]
    # one clip per video (the default) keeps its keys, and its clip is the first window's
    _extract(long_videos, tmp_path / "k1", "--shard-size", "2", "--batch-size", "1")
    one = {raw["__key__"]: raw for url in shards.shard_urls(tmp_path / "k1") for raw in shards.iter_shard(url)}
    three = {raw["__key__"]: raw for url in shards.shard_urls(tmp_path / "k3") for raw in shards.iter_shard(url)}
    assert sorted(one) == [f"{i:09d}" for i in range(4)]
    assert all(one[k]["latent.safetensors"] == three[k]["latent.safetensors"] for k in one)
    assert set(json.loads(one["000000000"]["json"])) == {"index", "key", "caption", "class_id", "fps", "frames",
                                                         "height", "width", "autoencoder", "source_fps"}


def test_every_window_is_stable_across_batch_sizes_workers_and_resume(long_videos, tmp_path):
    every = ("--clip-stride", "4", "--fps", "8")                            # windows at 0, 4, 8, 12, 16
    _extract(long_videos, tmp_path / "a", *every)
    _extract(long_videos, tmp_path / "workers", *every, "--num-workers", "2")
    _extract(long_videos, tmp_path / "b3", *every, "--batch-size", "3")
    digest = shards.raw_bytes_digest(tmp_path / "a")
    assert shards.raw_bytes_digest(tmp_path / "workers") == digest          # workers change no byte
    a, b = shards.read_all(tmp_path / "a"), shards.read_all(tmp_path / "b3")
    assert _keys(tmp_path / "a") == _keys(tmp_path / "b3") and len(a) == 20
    assert [s["meta"] for s in a] == [s["meta"] for s in b]
    assert [s["meta"]["start_frame"] for s in a[:5]] == [0, 4, 8, 12, 16]
    for x, y in zip(a, b):                                                  # batch size: float rounding only
        torch.testing.assert_close(x["latent"]["z"], y["latent"]["z"], rtol=1e-4, atol=1e-5)
    manifest = load_manifest(tmp_path / "a")
    assert manifest.video.clips_per_video == 0 and manifest.video.clip_stride == 4
    (tmp_path / "a" / "shard-000001.tar").unlink()                          # a run killed before shard 1
    (tmp_path / "a" / "shard-000001.json").unlink()
    _extract(long_videos, tmp_path / "a", *every)
    assert shards.raw_bytes_digest(tmp_path / "a") == digest
    assert load_manifest(tmp_path / "a") == manifest
    with pytest.raises(UserError, match=r"\(clip_stride: 4 -> 8\)"):
        _extract(long_videos, tmp_path / "a", "--clip-stride", "8", "--fps", "8")


@pytest.mark.parametrize("flags, match", [(["--clips-per-video", "2", "--clip-stride", "4"], "give one of them"),
                                          (["--clips-per-video", "-1"], ">= 0"), (["--clip-stride", "0"], ">= 1")])
def test_contradictory_clip_flags_are_rejected(long_videos, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        _extract(long_videos, tmp_path / "x", *flags)
    assert not (tmp_path / "x").exists()


@pytest.mark.dist
def test_windows_two_ranks_equal_one_rank(long_videos, tmp_path):
    args = ["--clips-per-video", "0", "--clip-stride", "6", "--shard-size", "1"]
    _extract(long_videos, tmp_path / "one", *args)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(2, "extract", "--autoencoder", AE, "--input", str(long_videos), "--output", str(tmp_path / "two"),
                   "--frames", "8", "--height", "32", "--width", "32", "--batch-size", "2", *args)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _keys(tmp_path / "two") == _keys(tmp_path / "one")
    assert len(_keys(tmp_path / "one")) == 4 * 3 and len(set(_keys(tmp_path / "one"))) == 12
    a, b = shards.read_all(tmp_path / "one"), shards.read_all(tmp_path / "two")
    assert [s["meta"] for s in a] == [s["meta"] for s in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x["latent"]["z"], y["latent"]["z"], rtol=1e-4, atol=1e-5)


def test_diffusers_vae_from_a_local_folder(videos, tmp_path):
    from diffusers import AutoencoderKL

    from autoencoders import resolve_record
    torch.manual_seed(0)
    raw = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                        layers_per_block=1, scaling_factor=0.5)
    raw.save_pretrained(tmp_path / "sd" / "vae")
    with pytest.raises(ValueError, match="--ae-path"):
        ldm(["extract", "--autoencoder", "diffusers:AutoencoderKL", "--input", str(videos), "--output", str(tmp_path / "x")])
    ldm(["extract", "--autoencoder", "diffusers:AutoencoderKL", "--ae-path", str(tmp_path / "sd"), "--ae-subfolder",
         "vae", "--input", str(videos), "--output", str(tmp_path / "lat"), "--frames", "8", "--height", "32",
         "--width", "32", "--shard-size", "4"])
    m = load_manifest(tmp_path / "lat")
    assert m.latent_spec["latent_shape"] == {"z": [4, 8, 16, 16]} and m.counts.written == 7
    assert m.autoencoder.checkpoint_hash is not None and m.autoencoder.subfolder == "vae"
    ae = resolve_record(m.autoencoder).model  # what `ldm sample` rebuilds from the export's record
    sample = shards.read_all(tmp_path / "lat")[0]
    with torch.no_grad():
        assert ae.decode(sample["latent"]).shape == (1, 3, 8, 32, 32)


def test_workers_batch_size_and_dtype(videos, tmp_path):
    """Decoding workers change no byte of the shards; another batch size changes latents only within
    float rounding; bf16 (the model cast to bf16) stays close to fp32, is recorded, and a folder of fp32
    shards refuses to be resumed in bf16."""
    _extract(videos, tmp_path / "ref")
    _extract(videos, tmp_path / "workers", "--num-workers", "2")
    assert shards.raw_bytes_digest(tmp_path / "workers") == shards.raw_bytes_digest(tmp_path / "ref")
    _extract(videos, tmp_path / "batch5", "--batch-size", "5")
    ref = shards.read_all(tmp_path / "ref")
    for a, b in zip(ref, shards.read_all(tmp_path / "batch5")):
        torch.testing.assert_close(a["latent"]["z"], b["latent"]["z"], atol=1e-5, rtol=1e-5)
    _extract(videos, tmp_path / "bf16", "--dtype", "bf16")
    m = load_manifest(tmp_path / "bf16")
    assert m.dtype == "bf16" and load_manifest(tmp_path / "ref").dtype == "fp32"
    low = shards.read_all(tmp_path / "bf16")
    assert low[0]["latent"]["z"].dtype == torch.float32  # stored as fp32 whatever the compute precision
    for a, b in zip(ref, low):
        err = (a["latent"]["z"] - b["latent"]["z"]).abs().max() / a["latent"]["z"].abs().max()
        assert 0 < err < 0.05  # bf16 has 8 mantissa bits: close, but not identical
    with pytest.raises(UserError, match='compute_dtype: "fp32" -> "bf16"'):
        _extract(videos, tmp_path / "ref", "--dtype", "bf16")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        _extract(videos, tmp_path / "fp16", "--dtype", "fp16")


def test_compiled_encoder_one_shape_same_latents(videos, tmp_path, monkeypatch):
    """``--compile true``: the encoder is compiled once before the first batch, for the full batch; a
    shard's shorter last batch (shard size 3, batch 2: batches of 2 + 1) is padded to it, so nothing
    recompiles, and the latents are the eager run's (the backend here runs the captured graph as it
    is: 1e-5; inductor's fused kernels are tested in tests/test_compile.py)."""
    from autoencoders.base import Autoencoder

    graphs = []

    def counting(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.ndim == 5])
        return gm.forward

    compile_encode = Autoencoder.compile_encode
    monkeypatch.setattr(Autoencoder, "compile_encode", lambda self, mode=None: compile_encode(self, mode, counting))
    torch._dynamo.reset()
    try:
        _extract(videos, tmp_path / "eager")
        summary = extract_verb.extract(extract_verb.ExtractConfig(
            input=str(videos), output=str(tmp_path / "compiled"), autoencoder=AE, frames=8, height=32, width=32,
            shard_size=3, batch_size=2, compile=True))
    finally:
        torch._dynamo.reset()
    assert graphs == [[(2, 3, 8, 32, 32)]] and summary["compile_s"] > 0 and summary["written"] == 7
    eager, compiled = shards.read_all(tmp_path / "eager"), shards.read_all(tmp_path / "compiled")
    assert [s["meta"]["key"] for s in compiled] == [s["meta"]["key"] for s in eager]
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b["latent"]["z"], a["latent"]["z"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b["latent"].logvar["z"], a["latent"].logvar["z"], atol=1e-5, rtol=1e-5)
    # a rerun into the folder with the other setting resumes it: compiling changes no binding
    assert _extract(videos, tmp_path / "compiled") == 0


def test_compiled_text_guided_encoder_is_compiled_for_the_captions_it_encodes(videos, tmp_path, monkeypatch):
    """``--compile`` with a text-guided encoder: the warm-up compiles with caption embeddings of the text
    encoder's length (it pads every caption to it), so the real batches run that graph and nothing compiles
    again (warmed up with 8 tokens, the first real batch compiled a second graph)."""
    from autoencoders.base import Autoencoder

    captions = []

    def counting(gm, example_inputs):  # each graph's caption-embedding input (B, L, text dim)
        captions.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.ndim == 3
                         and t.shape[-1] == 256])
        return gm.forward

    compile_encode = Autoencoder.compile_encode
    monkeypatch.setattr(Autoencoder, "compile_encode", lambda self, mode=None: compile_encode(self, mode, counting))
    torch._dynamo.reset()
    try:
        summary = extract_verb.extract(extract_verb.ExtractConfig(
            input=str(videos), output=str(tmp_path / "text"), autoencoder="cmvae-z4-text-debug", frames=8,
            height=32, width=32, shard_size=3, batch_size=2, compile=True, text_encoder="builtin"))
    finally:
        torch._dynamo.reset()
    assert captions == [[(2, 64, 256)]] and summary["written"] == 7  # builtin text encoder: 64 tokens of 256


@pytest.mark.parametrize("name", ["cmvae-z4-text-debug", "mtcvae-c4-debug"])
def test_padded_batch_gives_each_clip_its_latent(name):
    """The compiled encoder's padding (`encode_loop.padded`, `first_clips`): a batch filled up with
    copies of its last clip, caption embeddings too, gives its real clips their own latents, for a
    text-guided encoder and for a variable-rate one (varlen latents with their lengths and rates)."""
    import autoencoders
    from aes import example_batch
    from launch.encode_loop import first_clips, padded

    torch.manual_seed(0)
    ae = autoencoders.build(name).eval()
    video, cond = example_batch(ae)
    with torch.no_grad():
        alone = ae.encode(video, cond)
        filled_video, filled_cond = padded(video, cond, 5)
        filled = first_clips(ae.encode(filled_video, filled_cond), 2)
    assert filled_video.shape[0] == 5 and torch.equal(filled_video[4], video[1])
    assert (cond is None) == (filled_cond is None) and (cond is None or torch.equal(filled_cond.text[3], cond.text[1]))
    assert filled.form == alone.form and filled.batch_size == 2
    for part in ("parts", "logvar", "aux"):
        got, want = getattr(filled, part), getattr(alone, part)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


def test_decoding_workers_fit_the_shared_memory(videos, tmp_path, monkeypatch, caplog):
    """A container's small /dev/shm (Docker's default 64 MB), which the decoding workers hand their clips over in:
    as many workers as their clips decoded ahead fit in half of it (shared by the ranks of the machine), none
    when not one fits, said in one line with what to give; the same shards (was: a worker killed by a bus error
    midway through the run)."""
    import data.video as video

    per_unit = 3 * 8 * 32 * 32  # one 8x32x32 uint8 clip a loader item
    assert video.fit_shared_memory(4, lambda w: w * per_unit, path=tmp_path)[1] is None  # a disk's worth free
    monkeypatch.setattr(video, "shared_memory_free", lambda path=video.SHARED_MEMORY: 5 * per_unit)
    assert video.fit_shared_memory(4, lambda w: w * per_unit)[0] == 2  # 2.5 clips fit in half of 5
    workers, said = video.fit_shared_memory(4, lambda w: w * per_unit, ranks=2)  # 1.25 clips each: one worker
    assert workers == 1 and "/dev/shm has 0 MiB free" in said and "for each of the 2 ranks" in said
    assert "--shm-size" in said and video.fit_shared_memory(0, lambda w: 1)[0] == 0
    monkeypatch.setattr(video, "shared_memory_free", lambda path=video.SHARED_MEMORY: None)  # nothing to read
    assert video.fit_shared_memory(4, lambda w: 10**15) == (4, None)

    _extract(videos, tmp_path / "ref")
    monkeypatch.setattr(video, "shared_memory_free", lambda path=video.SHARED_MEMORY: 2**17)  # no worker fits
    with caplog.at_level("WARNING", logger="ldm.extract"):
        summary = extract_verb.extract(extract_verb.ExtractConfig(
            input=str(videos), output=str(tmp_path / "small"), autoencoder=AE, frames=8, height=32, width=32,
            shard_size=3, batch_size=2, num_workers=2))
    assert summary["num_workers"] == 0
    assert any("0 worker(s) instead of 2" in r.getMessage() for r in caplog.records)
    assert shards.raw_bytes_digest(tmp_path / "small") == shards.raw_bytes_digest(tmp_path / "ref")


def test_uint8_clips_write_the_shards_float_clips_write(tmp_path, monkeypatch):
    """Every clip travels from the decoder to the encoder as uint8, at the target size, a center crop
    away or resized (resized ones were float32: the resize now runs on the 8-bit pixels); the
    shards are byte for byte those of every clip as float32 (was: all float32)."""
    from launch import encode_loop

    rng = np.random.default_rng(0)
    # at the target size, resized, at it, a center crop away from it: both forms in the first batch of 2
    for i, (h, w) in enumerate(((32, 32), (48, 48), (32, 32), (32, 40))):
        write_frames(tmp_path / "v" / f"{i}.mp4", rng.integers(0, 256, (8, h, w, 3), np.uint8), fps=8)
    # the batches as they come: --batch-size 2, --shard-size 3 (batches never span shards): 2 + 1, then 1
    seen, to_float = [], encode_loop._ShardEncoder.to_float
    monkeypatch.setattr(encode_loop._ShardEncoder, "to_float", lambda self, clips: seen.append(clips.dtype)
                        or to_float(self, clips))
    with pytest.warns(UserWarning, match="RANDOM weights"):
        _extract(tmp_path / "v", tmp_path / "uint8")
    assert seen == [torch.uint8] * 3
    monkeypatch.setattr(encode_loop, "UINT8_CLIPS", False)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        _extract(tmp_path / "v", tmp_path / "float")
    assert seen[3:] == [torch.float32] * 3
    assert shards.raw_bytes_digest(tmp_path / "uint8") == shards.raw_bytes_digest(tmp_path / "float")
    assert [p.read_bytes() for p in sorted((tmp_path / "uint8").glob("shard-*.json"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "float").glob("shard-*.json"))]


def test_summary_separates_the_fill_from_the_steady_rate(videos, tmp_path, monkeypatch):
    """The wait for the first batch of decoded clips (worker start-up, first reads) is reported as
    ``fill_s`` and left out of ``steady_clips_per_s``; ``clips_per_s`` is the whole loop."""
    import time

    from data.sources import VideoClipDataset
    from launch.extract import ExtractConfig, extract

    slow_first, read = 0.6, VideoClipDataset.read_windows

    def read_windows(self, index, windows, **kw):  # the first video is slow to open, the rest are not
        if index == 0:
            time.sleep(slow_first)
        return read(self, index, windows, **kw)

    monkeypatch.setattr(VideoClipDataset, "read_windows", read_windows)
    cfg = ExtractConfig(autoencoder=AE, input=str(videos), output=str(tmp_path / "lat"), frames=8, height=32,
                        width=32, shard_size=3, batch_size=2, num_workers=0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        summary = extract(cfg)
    assert summary["written"] == 7 and (summary["batch_size"], summary["num_workers"]) == (2, 0)
    assert summary["fill_s"] >= slow_first
    elapsed = 7 / summary["clips_per_s"]
    assert summary["steady_clips_per_s"] == pytest.approx(7 / (elapsed - summary["fill_s"]), rel=1e-6)
    assert summary["steady_clips_per_s"] > summary["clips_per_s"]


def test_a_decoding_limited_run_says_so_an_encoder_limited_one_does_not(videos, tmp_path, monkeypatch, capsys):
    """When the encode loop waits for decoded clips most of its time after the first batch, a GPU
    run's summary says so in one line with the figures and what to do (not a CPU run's: its cores
    decode and encode both), and the JSON summary records the share (was: nothing: a fast encoder on the GPU waited for 8 workers and the user was not told).
    Decoding is made slow (0.3 s a clip), then encoding (0.5 s a batch): many times the real work."""
    import time

    from autoencoders.kl2d import KL2D
    from data.sources import VideoClipDataset
    from launch.encode_loop import DECODE_BOUND_SHARE, decoding_limit

    read, encode = VideoClipDataset.read_windows, KL2D.encode

    def slow_read(self, index, windows, **kw):
        time.sleep(0.3)
        return read(self, index, windows, **kw)

    def slow_encode(self, video, cond=None):
        time.sleep(0.5)
        return encode(self, video, cond)

    def run(out: str) -> tuple[list[str], dict]:
        capsys.readouterr()
        with pytest.warns(UserWarning, match="RANDOM weights"):
            assert _extract(videos, tmp_path / out) == 0  # 7 clips in batches of 2, 0 workers on the CPU
        lines = capsys.readouterr().out.splitlines()
        return [line for line in lines if line.startswith("decoding limited")], json.loads(lines[-1])

    with monkeypatch.context() as m:
        m.setattr(VideoClipDataset, "read_windows", slow_read)
        said, summary = run("slow-decode")
    assert summary["decode_wait_share"] > DECODE_BOUND_SHARE
    parts = summary["loop_ms_per_clip"]  # where the loop's time went: waiting for the 0.3 s reads
    assert parts["decode_wait"] > 150 and parts["decode_wait"] > 2 * (parts["queue"] + parts["store"])
    assert said == []  # on the CPU decoding and encoding share the cores: no advice to add workers there
    # what a GPU run prints from the same figures (0 workers, batches of 2: the CPU's run above)
    said = [decoding_limit({**summary, "num_workers": 0, "batch_size": 2}, summary["written"], 8, torch.device("cuda"))]
    assert len(said) == 1 and re.fullmatch(
        r"decoding limited this extraction: after the first batch the encoder waited for decoded clips \d+% of the "
        r"time on rank 0 \(0 decoding worker\(s\), \d+ CPU core\(s\) per rank\); about \d+ workers? would keep it "
        r"busy: give (--num-workers \d+.*|each rank more CPU cores)", said[0])
    with monkeypatch.context() as m:
        m.setattr(KL2D, "encode", slow_encode)
        said, summary = run("slow-encode")
    assert said == [] and 0 <= summary["decode_wait_share"] < DECODE_BOUND_SHARE
    parts = summary["loop_ms_per_clip"]  # queueing the batches: the CPU's encode, 0.5 s a batch of 2
    assert parts["queue"] > 200 and parts["queue"] > 2 * parts["decode_wait"]
    assert sum(v for k, v in parts.items() if k != "steady") <= parts["steady"] * 1.01


def test_the_decoding_limit_line_names_the_workers_to_give():
    """The workers that would keep the encoder busy (if decoding scales with them) and what to give
    with the cores at hand; nothing below DECODE_BOUND_SHARE or over fewer than 3 batches."""
    from launch.encode_loop import decoding_limit

    def line(share, workers, cores, encoded=48):
        return decoding_limit({"decode_wait_share": share, "num_workers": workers, "batch_size": 8}, encoded, cores,
                              torch.device("cuda"))

    # h3ae-8x32x32 on the H100: 8 workers fed 162 clips/s, the encoder takes 454 (waited ~64 %)
    assert line(0.64, 8, 16).endswith("waited for decoded clips 64% of the time on rank 0 (8 decoding worker(s), "
                                      "16 CPU core(s) per rank); about 23 workers would keep it busy: give "
                                      "--num-workers 16 and more CPU cores per rank")
    assert line(0.5, 4, 16).endswith("about 8 workers would keep it busy: give --num-workers 8")
    assert line(0.75, 0, 8).endswith("(0 decoding worker(s), 8 CPU core(s) per rank); about 3 workers would keep it "
                                     "busy: give --num-workers 3")
    assert line(0.4, 8, 8).endswith("about 14 workers would keep it busy: give each rank more CPU cores")
    assert line(0.3, 0, 8).endswith("about 1 worker would keep it busy: give --num-workers 1")
    assert line(0.2, 8, 16) is None and line(None, 8, 16) is None and line(0.9, 8, 16, encoded=23) is None
    assert decoding_limit({"decode_wait_share": 0.9, "num_workers": 0, "batch_size": 8}, 48, 8,
                          torch.device("cpu")) is None  # the CPU's cores decode and encode both


def test_auto_workers_and_batch_size_on_the_cpu():
    from launch.extract import auto_batch_size, auto_workers

    cpu = torch.device("cpu")
    assert auto_workers(-1, cpu, 1) == 0 and auto_workers(3, cpu, 1) == 3
    assert 1 <= auto_workers(-1, torch.device("cuda"), 2) <= 16
    with pytest.raises(ValueError, match="num-workers"):
        auto_workers(-2, cpu, 1)
    assert auto_batch_size(0, None, None, cpu, torch.float32, None) == 4
    assert auto_batch_size(7, None, None, cpu, torch.float32, None) == 7
    with pytest.raises(ValueError, match="batch-size"):
        auto_batch_size(-1, None, None, cpu, torch.float32, None)


def test_decoded_clips_in_flight_are_about_two_batches_whatever_the_worker_count():
    """The loader keeps ~2 encoder batches of clips ready across all its workers, at least 2 items
    each (was: 2 batches per worker: 16 workers x 2 x 64 clips at GPU batch 64)."""
    from launch.encode_loop import prefetch_per_worker

    for batch, per_item, workers in ((64, 1, 16), (64, 1, 15), (64, 4, 8), (8, 1, 15), (8, 1, 1), (4, 16, 2)):
        each = prefetch_per_worker(batch, per_item, workers)
        assert each >= 2 and workers * each * per_item >= 2 * batch
        assert each == 2 or workers * (each - 1) * per_item < 2 * batch  # not more than needed
    assert prefetch_per_worker(64, 1, 16) == 8  # 128 clips in all (was 128 per worker)


def test_a_loader_item_hands_several_clips_over_in_one_tensor(videos):
    """Consecutive units share a loader item, their clips stacked in one tensor (each tensor a worker
    hands over costs the main process a round trip to it: one per clip held a fast encoder back); the
    clips come out in order, each equal to its own decoding, a unit's error in its place."""
    from data.sources import VideoClipDataset, list_items
    from data.video import Window
    from launch.encode_loop import _Clips, _first, _unpack, clips_per_item, group_units

    first = [Window(0, 0, 0.0)]
    two = [Window(0, 0, 0.0), Window(1, 1, 0.125)]  # the second starts a frame late: past the 8-frame videos' end
    units = [(0, first), (1, "cannot be read"), (2, first), (3, first), (4, two), (5, first), (6, two)]
    groups = group_units(units, 2)
    assert groups == [units[0:2], units[2:4], [units[4]], [units[5]], [units[6]]]
    assert [len(g) for g in group_units(units, 8)] == [6, 1]  # 7 clips, then 2
    assert group_units(units, 1) == [[u] for u in units]
    assert clips_per_item(64, 3 * 17 * 256 * 256) == 8 and clips_per_item(2, 3 * 17 * 256 * 256) == 2
    assert clips_per_item(64, 3 * 49 * 720 * 1280) == 1  # large clips travel alone

    clips = VideoClipDataset(list_items(videos), 8, 32, 32, None)
    loader = torch.utils.data.DataLoader(_Clips(clips, groups, True), batch_size=1, num_workers=1, collate_fn=_first)
    items = list(loader)
    assert [tuple(it["pixels"].shape) for it in items] == [(n, 3, 8, 32, 32) for n in (1, 2, 1, 1, 1)]
    got = [c for it in items for c in _unpack(it)]
    assert [(c["index"], c["window"]) for c in got] == [(i, w) for i, ws in units
                                                         for w in ([None] if isinstance(ws, str) else ws)]
    assert [k for k, c in enumerate(got) if "error" in c] == [1, 5, 8]
    assert got[1]["error"] == "cannot be read" and not any("video" in got[k] for k in (1, 5, 8))
    for c in got:
        if "error" not in c:
            alone = clips.read_windows(c["index"], [c["window"]], uint8=True)[0]["video"]
            assert c["video"].dtype == torch.uint8 and torch.equal(c["video"], alone)


def test_decoding_workers_count_the_cores_this_process_may_use_and_the_ranks_on_its_node(monkeypatch):
    """A SLURM job given 4 cores of a 128-core node, 2 ranks on it out of 16: 1 decoding worker
    each, beside its loop (was: min(8, 128 cores / 16 ranks of every node) = 8, on 4 cores)."""
    from launch.dist import DistEnv
    from launch.dist import local_ranks
    from launch.extract import auto_workers, cores_per_rank

    import data.video
    monkeypatch.setattr(data.video, "cgroup_cpu_quota", lambda: None)  # the machine's own quota aside
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    env = DistEnv(rank=5, world_size=16, local_rank=1, source="torchrun")
    assert local_ranks(env) == 2 and cores_per_rank(2) == 2
    assert auto_workers(-1, torch.device("cuda"), local_ranks(env)) == 1  # a core each for the loop
    # one rank on a 16-core machine (the H100 of the README): 15 decoders (was: 8, the rest idle while
    # h3ae waited for clips); 128 cores: at most 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert auto_workers(-1, torch.device("cuda"), 1) == 15
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    assert auto_workers(-1, torch.device("cuda"), 1) == 16 and auto_workers(-1, torch.device("cuda"), 8) == 15
    # a container's CPU quota (docker --cpus 6, a Kubernetes limit of 5.5) on all 128 cores: 5 decoders
    monkeypatch.setattr(data.video, "cgroup_cpu_quota", lambda: 5.5)
    assert cores_per_rank(1) == 6 and auto_workers(-1, torch.device("cuda"), 1) == 5
    monkeypatch.setattr(data.video, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_ranks(env) == 16 and cores_per_rank(16) == 1  # no launcher said: every rank is taken as local
    # srun without torchrun: this node's entry of the step's tasks per node (8 on nodes 0-1, 4 on node 2)
    slurm = DistEnv(rank=17, world_size=20, local_rank=1, source="slurm")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2),4")
    for node, tasks in (("0", 8), ("1", 8), ("2", 4)):
        monkeypatch.setenv("SLURM_NODEID", node)
        assert local_ranks(slurm) == tasks
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "garbled")
    assert local_ranks(slurm) == 20  # unreadable: every rank, as before


def test_config_file_matches_the_flags(videos, tmp_path):
    """``ldm extract --config FILE.yaml [flags] [KEY=VALUE]`` (what demo/compare's pipeline runner
    passes under torchrun) writes what the flags write."""
    _extract(videos, tmp_path / "flags")
    (tmp_path / "x.yaml").write_text(f"autoencoder: {AE}\ninput: {videos}\nframes: 8\nheight: 32\nwidth: 32\n"
                                     "shard_size: 5\nbatch_size: 2\n")
    assert ldm(["extract", "--config", str(tmp_path / "x.yaml"), "--output", str(tmp_path / "yaml"),
                "shard_size=3"]) == 0
    assert shards.raw_bytes_digest(tmp_path / "yaml") == shards.raw_bytes_digest(tmp_path / "flags")
    assert load_manifest(tmp_path / "yaml").shard_size == 3
    with pytest.raises(ValueError, match="unknown key"):
        ldm(["extract", "--config", str(tmp_path / "x.yaml"), "--output", str(tmp_path / "z"), "shards=3"])


def test_inputs_at_mixed_frame_rates_are_warned_about(tmp_path):
    """Scraped videos at 24 / 25 / 60 fps without --fps: each clip keeps its own rate (a motion
    spans 2.5x more frames in one than another) and the manifest names one rate. Said at the start
    (was: nothing); rates within 10 % (24 / 25) are one rate."""
    from data.sources import list_items
    from launch.extract import mixed_rates

    frames = np.zeros((4, 16, 16, 3), np.uint8)
    for name, fps in (("a.mp4", 24), ("b.mp4", 25)):
        write_frames(tmp_path / name, frames, fps=fps)
    (tmp_path / "broken.mp4").write_text("not a video")
    assert mixed_rates(list_items(tmp_path)) is None
    write_frames(tmp_path / "c.mp4", frames, fps=60)
    warning = mixed_rates(list_items(tmp_path))
    assert warning.startswith("the inputs play at different frame rates (24 to 60 fps in the first 3 read)")
    assert "give --fps F" in warning


def test_captions_cut_to_the_text_encoders_length_are_reported(videos, tmp_path, caplog, capsys):
    """A caption longer than the text encoder's max_length (the builtin's 64 byte tokens) is cut:
    a warning names the first, the summary counts them (was: cut without a word)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, video in enumerate(sorted(videos.glob("**/*.mp4"))[:3]):
        (folder / f"v{i}.mp4").write_bytes(video.read_bytes())
    (folder / "v0.txt").write_text("a red circle moving left " * 10)  # 250 bytes
    (folder / "v1.txt").write_text("a blue square")
    with pytest.warns(UserWarning, match="RANDOM"):
        summary = extract_verb.extract(extract_verb.ExtractConfig(
            autoencoder=AE, input=str(folder), output=str(tmp_path / "lat"), frames=8, height=32, width=32,
            text_encoder="builtin", batch_size=2))
    assert summary["captions_cut"] == 1
    assert "are cut to them (builtin; first: v0)" in caplog.text
    assert "1 caption(s) filled the text encoder's 64 tokens" in capsys.readouterr().out


def _write_vfr(path, gaps_ms, size=16):
    """An H.264 MP4 whose frames are ``gaps_ms`` apart (a phone's variable frame rate)."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i, gap in enumerate(gaps_ms):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += gap
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_source_frame_rates_are_recorded_and_variable_rates_named(tmp_path, caplog, capsys):
    """Videos at 24 and 30 fps and one at a variable rate, without --fps: each sample's metadata
    keeps its video's `source_fps`, `ldm data list` shows how many clips came from each rate and
    names the variable-rate input, and one warning names it (was: one clip_fps and nothing else;
    a variable rate went unnoticed). Shards written before (no counts) still list."""
    from data.video import frame_timing

    frames = np.zeros((4, 16, 16, 3), np.uint8)
    for name, fps in (("a.mp4", 24), ("b.mp4", 30), ("c.mp4", 30)):
        write_frames(tmp_path / "in" / name, frames, fps=fps)
    _write_vfr(tmp_path / "in" / "phone.mp4", [33, 33, 100, 17, 50, 33])
    assert frame_timing(tmp_path / "in" / "b.mp4") == (30.0, False)
    assert frame_timing(tmp_path / "in" / "phone.mp4")[1]
    gif = tmp_path / "g.gif"
    write_frames(gif, np.zeros((8, 16, 16, 3), np.uint8), fps=30)  # centisecond delays 3, 4, 3: not variable
    assert not frame_timing(gif)[1]
    out = tmp_path / "lat"
    with pytest.warns(UserWarning, match="RANDOM"):
        extract_verb.extract(extract_verb.ExtractConfig(autoencoder=AE, input=str(tmp_path / "in"),
                                                        output=str(out), frames=4, height=16, width=16,
                                                        shard_size=2))
    rates = {s["meta"]["key"]: s["meta"]["source_fps"] for s in shards.read_all(out)}
    assert rates["a"] == 24.0 and rates["b"] == rates["c"] == 30.0 and rates["phone"] > 0
    assert load_manifest(out).video.clip_fps in set(rates.values())  # was 27: the mean of 24 and 30
    warned = [r.getMessage() for r in caplog.records if "variable frame rate" in r.getMessage()]
    assert len(warned) == 1 and "(phone," in warned[0] and "give --fps F" in warned[0]
    capsys.readouterr()
    assert ldm(["data", "list", "--input", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "source frame rates (read at their own rate, consecutive frames): 30 fps: 2 clips, 24 fps: 1 clip, " \
        in listed and "variable frame rate: 1 input(s) (phone): their clips' motion speed varies" in listed
    for j in (0, 1):  # shards of an extraction before the counts: said, then nothing to show
        side = out / f"shard-00000{j}.json"
        record = json.loads(side.read_text())
        del record["source_fps"], record["variable_rate"]
        side.write_text(json.dumps(record))
        assert ldm(["data", "list", "--input", str(out), "--check"]) == 0
        listed = capsys.readouterr().out
        assert "all good" in listed
        if j == 0:
            assert ": 1 clip (2 clips of shards written before the rates were counted)" in listed
        else:
            assert "source frame rates" not in listed and "variable frame rate" not in listed
