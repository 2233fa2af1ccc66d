"""Shape buckets in ``ldm train-ae`` (data/buckets.py): the seeded draw, one-line errors for bad
specs, runs over several shapes that resume into the same sequence, the per-bucket discriminator
weight, and the two bucket recipes (launch/configs/recipes/) at a debug size. Tiny clips, CPU."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.buckets import Bucket, BucketSchedule
from data.synth import synth_dataset
from launch import dist
from launch.train_ae import (AETrainer, TrainAEConfig, SkipBad, add_arguments, check_inputs, config_from_args,
                             train_autoencoder)
from ldm.errors import UserError, checking
from procs import process_env

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "launch" / "configs" / "recipes"
SHAPES = [[1, 32, 32, 1, 1.0], [5, 32, 32, 1, 0.5], [5, 16, 24, 1, 1.0]]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three 9-frame 32x32 clips and a file that is not a video."""
    root = tmp_path_factory.mktemp("bucket-clips")
    synth_dataset(root, num=3, frames=9, size=32, seed=1)
    (root / "videos" / "broken.mp4").write_text("not a video")
    return root


def _cfg(data: Path, out: Path, **kw) -> TrainAEConfig:
    base = dict(data=str(data), output=str(out), autoencoder="ivvae-z16-debug", frames=5, height=32, width=32,
                buckets=SHAPES, batch_size=1, steps=4, log_every=1, save_every=2, sample_every=100,
                num_workers=0, progress=False, latent_stats_clips=0, seed=5)
    base.update(kw)
    return TrainAEConfig(**base)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _args(*argv: str) -> TrainAEConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with checking():
        return config_from_args(parser.parse_args(list(argv)))


def test_draw_is_deterministic_and_follows_the_probabilities():
    spec = [[1, 8, 8, 1, 1.0], [5, 8, 8, 2, 1.0], [9, 16, 16, 1, 0.5]]
    a, b = BucketSchedule.from_spec(spec, seed=3), BucketSchedule.from_spec(spec, seed=3)
    seq = [a.index(s) for s in range(4000)]
    assert seq == [b.index(s) for s in range(4000)]  # same (seed, step): same bucket, on any rank
    assert seq[1000:1010] == [a.index(s) for s in range(1000, 1010)]  # no state: a resumed run repeats it
    assert seq != [BucketSchedule.from_spec(spec, seed=4).index(s) for s in range(4000)]
    assert a.probabilities == (0.25, 0.5, 0.25)  # weights are normalised
    counts = Counter(seq)
    for i, p in enumerate(a.probabilities):
        assert abs(counts[i] / len(seq) - p) < 0.03, (i, counts)
    assert a.at(7) == Bucket(*spec[a.index(7)]) and a.at(7).name == "x".join(map(str, spec[a.index(7)][:3]))
    single = BucketSchedule.single(17, 64, 64)
    assert {single.at(s).shape for s in range(50)} == {(17, 64, 64)} and not single.has_images


@pytest.mark.parametrize("override, message", [
    ("buckets=[[17, 32, 32, 1]]", "must be \\[frames, height, width, probability, disc_weight\\]"),
    ("buckets=[[17, 32, 32, 1, 1, 1]]", "must be \\[frames"),
    ("buckets=[[0, 32, 32, 1, 1]]", "whole numbers >= 1"),
    ("buckets=[[4.5, 32, 32, 1, 1]]", "whole numbers >= 1"),
    ("buckets=[[5, 32, 32, 0, 1]]", "probability must be > 0"),
    ("buckets=[[5, 32, 32, 1, -1]]", "disc_weight must be >= 0"),
    ("buckets=[[5, 32, 32, 1, 1], [5, 32, 32, 2, 1]]", "given twice"),
    ("buckets=[5, 32, 32, 1, 1]", "buckets"),
    ("image_ratio=0.2", "1-frame bucket"),
])
def test_bad_bucket_specs_are_one_line_errors(override, message):
    argv = ["--autoencoder", "ivvae-z16-debug", "--data", "d", "--output", "o", "buckets=[[5, 32, 32, 1, 1]]"]
    with pytest.raises(UserError, match=message) as e:
        _args(*argv, override)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bucket, message", [([4, 32, 32, 1, 1], "1 \\+ 4k"), ([5, 36, 32, 1, 1], "36")])
def test_buckets_the_model_cannot_take_fail_before_work(clips, tmp_path, bucket, message):
    cfg = _cfg(clips, tmp_path / "run", buckets=[SHAPES[0], bucket])
    with pytest.raises(UserError, match=f"bucket \\[{bucket[0]}, {bucket[1]}, 32\\]: ivvae: .*{message}") as e:
        check_inputs(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_run_trains_on_several_shapes_and_resume_repeats_the_sequence(clips, tmp_path, monkeypatch):
    # straight: 4 steps with loader workers. The batch of the broken file is dropped, so the batches
    # the workers already read for later steps are read again, in this process, at their new step's
    # shape (seed 5 makes those shapes differ)
    pid, main_reads = os.getpid(), []
    read = SkipBad.__getitem__

    def counted(self, index):
        if os.getpid() == pid:
            main_reads.append(index)
        return read(self, index)

    monkeypatch.setattr(SkipBad, "__getitem__", counted)
    straight = tmp_path / "straight"
    train_autoencoder(_cfg(clips, straight, num_workers=2))
    assert main_reads, "no batch was read again at its new shape"
    monkeypatch.undo()
    schedule = _cfg(clips, straight).bucket_schedule()
    log = _log(straight)
    shapes = [tuple(r["bucket"]) for r in log]
    assert shapes == [schedule.at(s).shape for s in range(4)] and len(set(shapes)) >= 2, shapes
    # interrupted after step 2, resumed to 4 (no workers): the same buckets and the same losses
    split = tmp_path / "split"
    train_autoencoder(_cfg(clips, split, steps=2))
    summary = train_autoencoder(_cfg(clips, split), allow_change=("steps",))
    assert summary["resumed_from"].endswith("step-00000002")
    resumed = _log(split)
    assert [tuple(r["bucket"]) for r in resumed] == shapes
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in log], rel=1e-5)
    with pytest.raises(UserError, match="buckets: "):  # the shapes bind the run folder (runs.check_binding)
        train_autoencoder(_cfg(clips, split, steps=6, buckets=SHAPES[:2]), allow_change=("steps",))


def _gan_trainer(clips: Path, out: Path, disc_weight: float) -> AETrainer:
    cfg = _cfg(clips, out, autoencoder="causal3d-f4x8c4-debug", buckets=[[5, 32, 32, 1, disc_weight]], gan=True,
               max_grad_norm=0.0)
    return AETrainer(cfg, dist.dist_env())


def test_disc_weight_multiplies_the_gan_terms(clips, tmp_path):
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    logs, grads = {}, {}
    for w in (1.0, 0.5):
        trainer = _gan_trainer(clips, tmp_path / str(w), w)
        logs[w] = trainer.train_step(video)
        grads[w] = torch.cat([p.grad.flatten() for p in trainer.loss_fn.discriminator.parameters()])
    # same weights, data and generator stream: the adaptive lambda is the same, the weight is halved
    assert logs[0.5]["disc_weight"] == 0.5 and logs[1.0]["disc_weight"] == 1.0
    assert logs[0.5]["gan_weight"].item() == pytest.approx(0.5 * logs[1.0]["gan_weight"].item(), rel=1e-5)
    assert logs[0.5]["d_loss"].item() == pytest.approx(logs[1.0]["d_loss"].item(), rel=1e-5)
    torch.testing.assert_close(grads[0.5], 0.5 * grads[1.0], rtol=1e-4, atol=1e-7)  # the D update too
    # a 0 weight: no GAN term in the generator loss and no discriminator update on that bucket
    trainer = _gan_trainer(clips, tmp_path / "0", 0.0)
    logs0 = trainer.train_step(video)
    assert logs0["gan_weight"].item() == 0.0 and "d_loss" not in logs0
    assert all(p.grad is None for p in trainer.loss_fn.discriminator.parameters())


@pytest.mark.parametrize("recipe, debug, buckets", [
    ("h3ae", "h3ae-8x32x32-debug", "[[1, 32, 32, 1, 1.0], [9, 32, 32, 1, 1.0]]"),
    ("ivvae-multires", "ivvae-z16-debug", "[[5, 32, 32, 1, 1.0], [1, 40, 32, 1, 0.5]]"),
])
def test_recipes_run_two_steps_at_a_debug_size(clips, tmp_path, recipe, debug, buckets):
    path = str(RECIPES / f"{recipe}.yaml")
    no_files = ("init=null", "lpips_vgg=null", "lpips_heads=null")  # no earlier stage's model nor LPIPS files here
    full = _args("--config", path, "--data", str(clips), "--output", str(tmp_path / "full"), *no_files)
    check_inputs(full)  # the paper-size buckets fit the paper-size model (meta device, no weights)
    assert len(full.buckets) >= 2
    cfg = _args("--config", path, "--data", str(clips), "--output", str(tmp_path / "run"), f"autoencoder={debug}",
                f"buckets={buckets}", "frames=1", "height=32", "width=32", "steps=2", "save_every=2",
                "sample_every=2", "log_every=1", "latent_stats_clips=0", "num_workers=0", "progress=false", *no_files)
    check_inputs(cfg)
    summary = train_autoencoder(cfg)
    assert summary["steps"] == 2 and (tmp_path / "run" / "final" / "config.json").is_file()
    log = _log(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert {tuple(r["bucket"]) for r in log} <= {tuple(b[:3]) for b in json.loads(buckets)}


@pytest.mark.dist
def test_two_ranks_train_the_same_buckets(clips, tmp_path):
    """torchrun, 2 ranks: image and video buckets under DDP (1-frame steps leave temporal weights
    unused), the 3D GAN at the bucket's weight; the log follows the (seed, step) draw."""
    out = tmp_path / "ddp"
    env = process_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "launch.cli", "train-ae", "--autoencoder", "ivvae-z16-debug", "--data", str(clips),
           "--output", str(out), "--frames", "5", "--height", "32", "--width", "32", "--steps", "4",
           "--log-every", "1", "--num-workers", "0", "--gan", "--disc-kind", "3d", "--latent-stats-clips", "0",
           "--seed", "5", "--no-progress", "buckets=[[1, 32, 32, 1, 1.0], [5, 32, 32, 1, 0.5]]"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    schedule = BucketSchedule.from_spec([[1, 32, 32, 1, 1.0], [5, 32, 32, 1, 0.5]], seed=5)
    log = _log(out)
    assert [tuple(r["bucket"]) for r in log] == [schedule.at(s).shape for s in range(4)]
    assert [r["disc_weight"] for r in log] == [schedule.at(s).disc_weight for s in range(4)]
    assert len({tuple(r["bucket"]) for r in log}) == 2


def test_a_bucket_longer_than_every_clip_stops_with_its_shape(clips, tmp_path):
    with pytest.raises(UserError, match="no clip of .* readable at 13x32x32 .*too short"):
        train_autoencoder(_cfg(clips, tmp_path / "run", buckets=[[13, 32, 32, 1, 1.0]], steps=1))
