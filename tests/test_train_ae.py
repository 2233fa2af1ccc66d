"""``ldm train-ae``: loss goes down, exact resume, corrupt-checkpoint fallback, final export, GAN and
LPIPS terms, 2-rank DDP. Tiny synthetic clips (5 frames, 32x32) and debug configs, CPU."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoencoders import build, load_pretrained
from autoencoders.losses import (AELoss, AELossConfig, PatchDiscriminator, adaptive_gan_weight, dwt_loss,
                                 haar_dwt3d, hinge_d_loss, kl_loss, reconstruction_loss)
from data.video import write_video
from launch import dist
from launch import runs
from launch.runs import find_checkpoint, optimizer_from_files, optimizer_to_files, write_checkpoint
from launch.train_ae import TrainAEConfig, add_arguments, config_from_args, train_autoencoder
from ldm.errors import MissingInput, UserError
from ldm.latent import Latent
from ldm.metrics import LPIPS
from procs import free_port, process_env

REPO = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 5, 32


def _write_clips(folder: Path, n: int = 6) -> Path:
    """n clips of a colored disc moving right at different speeds on a gray background, plus
    a text file named .mp4 that the trainer must skip."""
    folder.mkdir(parents=True, exist_ok=True)
    t = torch.arange(FRAMES).view(1, FRAMES, 1, 1).float()
    y = torch.arange(SIZE).view(1, 1, SIZE, 1).float()
    x = torch.arange(SIZE).view(1, 1, 1, SIZE).float()
    for i in range(n):
        color = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(i)) * 2 - 1
        cx = (SIZE / 4 + 2 * t * (1 + i % 3)) % SIZE
        disc = ((x - cx) ** 2 + (y - SIZE / 2) ** 2 < (SIZE / 6) ** 2).float()  # (1, T, H, W)
        video = -0.5 + disc * (color + 0.5)  # (3, T, H, W)
        write_video(folder / f"clip{i:02d}.mp4", video.clamp(-1, 1), fps=8)
    (folder / "broken.mp4").write_text("this is not a video")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return _write_clips(tmp_path_factory.mktemp("clips"))


def _cfg(data: Path, out: Path, **kw) -> TrainAEConfig:
    base = dict(data=str(data), output=str(out), autoencoder="kl2d-f8c4-debug", frames=FRAMES, height=SIZE,
                width=SIZE, batch_size=2, lr=2e-3, steps=30, log_every=1, save_every=3, sample_every=10,
                num_workers=0, progress=False, latent_stats_clips=4)
    base.update(kw)
    return TrainAEConfig(**base)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(clips, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("straight")
    return out, train_autoencoder(_cfg(clips, out))


def test_the_loader_carries_uint8_clips_that_become_the_float_clips(clips):
    """`ldm train-ae`'s loader reads each clip as its uint8 pixels (a quarter of the bytes through
    workers, pinned memory and the copy to the device); on the device they are the float32 clips
    a plain read gives, bit for bit, resized or not; an unreadable file is an error record."""
    from data.sources import VideoClipDataset, list_items
    from data.video import UINT8_VALUES, uint8_to_float
    from launch.train_ae_data import SkipBad, collate_clips

    items = list_items(clips)
    dataset = VideoClipDataset(items, FRAMES, SIZE, SIZE)
    reader = SkipBad(dataset, [it.key for it in items])
    for shape in ((FRAMES, SIZE, SIZE), (FRAMES - 1, SIZE // 2, SIZE // 2)):  # as stored, resized
        batch = collate_clips([reader[(i, 0, 0, shape)] for i in range(len(items))])
        assert batch["video"].dtype == torch.uint8 and [k for k, _ in batch["errors"]] == ["broken"]
        plain = torch.stack([dataset.read(i, *shape)["video"] for i, it in enumerate(items) if it.key != "broken"])
        assert torch.equal(uint8_to_float(batch["video"], UINT8_VALUES), plain)


def test_readers_fit_the_shared_memory(clips, tmp_path, monkeypatch, caplog):
    """The reader processes hand whole batches over in /dev/shm: with too little free (a container's 64 MB) the
    run reads with fewer (here none) and says so once, what to give included (was: a reader killed by a bus
    error)."""
    import data.video as video
    monkeypatch.setattr(video, "shared_memory_free", lambda path=video.SHARED_MEMORY: 2**16)
    with caplog.at_level("WARNING", logger="ldm.train_ae"):
        summary = train_autoencoder(_cfg(clips, tmp_path / "run", num_workers=2, steps=2, save_every=2,
                                         sample_every=2, latent_stats_clips=1))
    said = [r.getMessage() for r in caplog.records if "instead of 2" in r.getMessage()]
    assert len(said) == 1 and "0 worker(s) instead of 2" in said[0] and "--shm-size" in said[0]
    assert summary["steps_run"] == 2


def test_loss_decreases_and_run_outputs(straight):
    out, summary = straight
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    for key in ("loss", "rec", "kl", "lr", "grad_norm", "clips_per_s"):
        assert all(key in r for r in log), key
    assert all(r["peak_memory_gib"] is None for r in log)  # a GPU figure: none on the CPU
    losses = [r["loss"] for r in log]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert summary["first_loss"] == losses[0] and summary["last_loss"] == losses[-1]
    assert list(summary["skipped_clips"]) == ["broken"]
    assert "not a readable video" in summary["skipped_clips"]["broken"]
    assert (out / "samples" / "step-00000010.png").is_file() and (out / "samples" / "step-00000030.png").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-00000024", "step-00000027", "step-00000030"]  # keep=3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000030"


def test_final_export_loads_and_has_latent_stats(straight, clips):
    out, summary = straight
    ae = load_pretrained(out / "final")
    assert ae.family == "kl2d"
    assert json.loads((out / "final" / "config.json").read_text())["name"] == "kl2d-f8c4-debug"
    scale = ae.config.latent_scale
    assert len(scale) == 4 and list(scale) == summary["latent_stats"]["latent_scale"]
    from data.video import read_video
    video = torch.stack([read_video(clips / f"clip0{i}.mp4", FRAMES, SIZE, SIZE) for i in range(4)])
    with torch.no_grad():
        z = ae.encode(video)["z"]  # (B, c, T, h, w), the clips the statistics came from
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-3
    assert (z.transpose(0, 1).flatten(1).std(1) - 1).abs().max() < 1e-3
    # step checkpoints are save_pretrained folders too
    step = load_pretrained(out / "checkpoints" / "step-00000030")
    final_sd, step_sd = ae.state_dict(), step.state_dict()
    assert all(torch.equal(final_sd[k], step_sd[k]) for k in final_sd)


def test_resume_is_exact_and_corrupt_checkpoint_falls_back(straight, clips, tmp_path, capsys):
    ref = [r["loss"] for r in _log(straight[0])]
    out = tmp_path / "run"
    first = train_autoencoder(_cfg(clips, out, steps=3))
    assert first["resumed_from"] is None and "resumed from" not in capsys.readouterr().out
    second = train_autoencoder(_cfg(clips, out, steps=6), allow_change=("steps",))
    assert second["resumed_from"].endswith("step-00000003") and second["start_step"] == 3
    # printed, as ldm train does (was: a log.info nobody saw: a resume looked like a new run)
    assert f"resumed from {out / 'checkpoints' / 'step-00000003'} at step 3" in capsys.readouterr().out
    assert [r["loss"] for r in _log(out)] == ref[:6]  # bit-identical to the uninterrupted run
    # corrupt the newest checkpoint: the previous one is used and the sequence is still exact
    model_file = out / "checkpoints" / "step-00000006" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-7] ^= 0xFF
    model_file.write_bytes(bytes(data))
    third = train_autoencoder(_cfg(clips, out, steps=7), allow_change=("steps",))
    assert third["resumed_from"].endswith("step-00000003")
    assert len(third["rejected_checkpoints"]) == 1
    assert "sha256" in third["rejected_checkpoints"][0]["reason"]
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 8))  # lines past the resumed step were dropped
    assert [r["loss"] for r in log] == ref[:7]
    for step in runs.checkpoints(out / "checkpoints"):  # every checkpoint corrupt: one line, not a start from step 0
        (step / "MANIFEST.json").unlink()
    with pytest.raises(UserError, match="no valid checkpoint"):
        train_autoencoder(_cfg(clips, out, steps=8), allow_change=("steps",))
    with pytest.raises(UserError, match="--resume .*MANIFEST"):
        train_autoencoder(_cfg(clips, tmp_path / "other", steps=7, resume=str(step)))


def test_a_stop_asked_of_another_rank_is_announced_once(clips, tmp_path, monkeypatch, caplog):
    """The step's all-reduce brings a stop that only another rank was sent (here: this rank's flag
    raised without a signal): rank 0 says so once, and the run stops with a checkpoint of that step
    (was: nothing said until the closing line)."""
    from launch.train_ae import AETrainer

    real = AETrainer.train_step

    def train_step(self, video, cond=None):
        if self.step == 1:
            monkeypatch.setattr(runs.StopRequest, "flag", lambda stop, device: torch.ones((), device=device))
        return real(self, video, cond)

    monkeypatch.setattr(AETrainer, "train_step", train_step)
    caplog.set_level("WARNING")
    out = tmp_path / "run"
    result = train_autoencoder(_cfg(clips, out, steps=4))
    assert result == {"stopped": "a signal to another rank", "steps": 2}
    said = [r.getMessage() for r in caplog.records if "stopping after this step" in r.getMessage()]
    assert said == ["a signal to another rank: stopping after this step with a checkpoint"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"


def test_sigterm_stops_with_a_checkpoint_of_that_step_and_resumes_exactly(straight, clips, tmp_path, monkeypatch,
                                                                           capsys):
    """SIGTERM in the middle of step 5 (save_every 3, log_every 2): the step finishes, is logged and
    saved as step-5, no final/ is exported, the status is 143; the same command then resumes from
    step 5 with the losses of an uninterrupted run."""
    import signal

    from launch.train_ae import AETrainer

    real = AETrainer.train_step

    def train_step(self, video, cond=None):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, video, cond)

    monkeypatch.setattr(AETrainer, "train_step", train_step)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    first = train_autoencoder(_cfg(clips, out, steps=7, log_every=2))
    assert first == {"stopped": "SIGTERM", "steps": 5} and runs.stopped_exit_code(first) == 143
    assert "stopped at step 5 of 7 (SIGTERM)" in capsys.readouterr().out
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000005" and not (out / "final").exists()
    assert [r["step"] for r in _log(out)] == [2, 4, 5]  # the stop logs its step, off the log_every cadence
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with it
    monkeypatch.setattr(AETrainer, "train_step", real)
    second = train_autoencoder(_cfg(clips, out, steps=7, log_every=2))
    assert second["resumed_from"].endswith("step-00000005") and (out / "final").is_dir()
    ref = {r["step"]: r["loss"] for r in _log(straight[0])}
    assert [(r["step"], r["loss"]) for r in _log(out)] == [(s, ref[s]) for s in (2, 4, 5, 6, 7)]


def test_validation_on_held_out_clips_equals_eval_recon_and_may_be_added_on_resume(clips, tmp_path, caplog):
    """``val.data``: PSNR / SSIM of the held-out clips at every checkpoint and the last step, as
    lines of log.jsonl and the summary; at the last step they equal ``ldm eval recon`` of the
    final model on those clips. Added on resume (harmless), the resumed run's numbers equal the
    uninterrupted run's (was: no held-out metric during training)."""
    from launch.evaluate import evaluate_reconstruction
    from launch.train_ae_config import ValConfig, check_inputs

    val = ValConfig(data=str(clips))
    out = tmp_path / "with-val"
    summary = train_autoencoder(_cfg(clips, out, steps=4, save_every=2, latent_stats_clips=0, val=val))
    records = [r for r in _log(out) if "val_psnr" in r]
    assert [r["step"] for r in records] == [2, 4] and summary["val"] == records
    assert all(r["val_clips"] == 6 for r in records)  # the broken file is skipped
    assert [r["step"] for r in _log(out) if "loss" in r] == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(out / "tensorboard"))  # the same numbers, tagged as ldm train tags them
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("val/val_psnr")] == \
        [(r["step"], pytest.approx(r["val_psnr"], rel=1e-6)) for r in records]
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4]
    ref = evaluate_reconstruction(load_pretrained(out / "final"), str(clips), FRAMES, SIZE, SIZE)
    assert records[-1]["val_psnr"] == pytest.approx(ref["psnr_db"]["mean"], abs=1e-6)
    assert records[-1]["val_ssim"] == pytest.approx(ref["ssim"]["mean"], abs=1e-6)

    later = tmp_path / "val-on-resume"
    train_autoencoder(_cfg(clips, later, steps=4, save_every=2, latent_stats_clips=0))
    assert not [r for r in _log(later) if "val_psnr" in r]
    shutil.rmtree(later / "checkpoints" / "step-00000004")
    resumed = train_autoencoder(_cfg(clips, later, steps=4, save_every=2, latent_stats_clips=0, val=val))
    assert resumed["start_step"] == 2 and resumed["val"] == records[1:]
    # with an LPIPS network (--lpips-vgg; here a random AlexNet one) its mean is logged too, as eval recon's
    from launch.train_ae import AETrainer
    trainer = AETrainer(_cfg(clips, tmp_path / "lpips", val=ValConfig(data=str(clips), clips=3)), dist.dist_env())
    trainer.val_lpips, trainer.val_clips = LPIPS("alex"), trainer._read_val_clips()
    record = trainer.validate()
    ref = evaluate_reconstruction(trainer.ae, str(clips), FRAMES, SIZE, SIZE, num=3, lpips=trainer.val_lpips)
    assert record["val_clips"] == 2 and record["val_lpips"] == pytest.approx(ref["lpips"]["mean"], abs=1e-6)
    with pytest.raises(UserError, match="val.clips must be >= 1"):
        _cfg(clips, out, val=ValConfig(data=str(clips), clips=0))
    with pytest.raises(MissingInput, match="val.data: .*nowhere"):
        check_inputs(_cfg(clips, tmp_path / "x", val=ValConfig(data=str(tmp_path / "nowhere"))))
    with caplog.at_level("WARNING", logger="ldm.train_ae"):
        check_inputs(_cfg(clips, tmp_path / "x", val=val))
    assert "7 of the validation clips are training clips (e.g. broken), not held out" in caplog.text


def test_split_lists_choose_the_training_and_held_out_videos_of_one_folder(clips, tmp_path, caplog):
    """``--split trainlist`` trains on the videos a list names and ``val.split`` holds others of the
    same folder out (was: no --split: the whole folder, validation clips among the training ones)."""
    from launch.train_ae import AETrainer
    from launch.train_ae_config import ValConfig, check_inputs, run_binding
    (tmp_path / "train.txt").write_text("clip00.mp4 1\nclip01.mp4 1\nclip02.mp4 2\nclip03.mp4 2\n")  # UCF-101 style
    (tmp_path / "test.txt").write_text("clip04.mp4\nclip05.mp4\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(
        ["--data", str(clips), "--split", str(tmp_path / "train.txt"), "--output", str(tmp_path / "run"),
         "--autoencoder", "kl2d-f8c4-debug", "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
         f"val.data={clips}", f"val.split={tmp_path / 'test.txt'}"]))
    with caplog.at_level("WARNING", logger="ldm.train_ae"):
        check_inputs(cfg)
    assert "not held out" not in caplog.text
    assert run_binding(cfg)["videos"].startswith("4 ")
    trainer = AETrainer(cfg, dist.dist_env())
    assert trainer.keys == ["clip00", "clip01", "clip02", "clip03"] and len(trainer._read_val_clips()) == 2
    with caplog.at_level("WARNING", logger="ldm.train_ae"):  # held-out videos --split trains on: said
        check_inputs(dataclasses.replace(cfg, val=ValConfig(data=str(clips), split=str(tmp_path / "train.txt"))))
    assert "4 of the validation clips are training clips (e.g. clip00), not held out" in caplog.text
    with pytest.raises(MissingInput, match="--split .*nowhere.txt: split list file not found"):
        check_inputs(dataclasses.replace(cfg, split=str(tmp_path / "nowhere.txt")))
    with pytest.raises(MissingInput, match="val.split .*nowhere.txt: split list file not found"):
        check_inputs(dataclasses.replace(cfg, val=ValConfig(data=str(clips), split=str(tmp_path / "nowhere.txt"))))
    with pytest.raises(UserError, match="val.split .*test.txt without val.data"):
        check_inputs(dataclasses.replace(cfg, val=ValConfig(split=str(tmp_path / "test.txt"))))


def test_lr_drop_schedule(clips, tmp_path):
    cfg = _cfg(clips, tmp_path, lr=1e-4, warmup=4, lr_drop=[(6, 1e-5), (8, 1e-6)])  # lists as from JSON
    assert cfg.lr_drop == ((6, 1e-5), (8, 1e-6))
    expected = [2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6]
    assert [cfg.learning_rate(s) for s in range(10)] == pytest.approx(expected, rel=1e-12)
    h3ae = _cfg(clips, tmp_path, lr=1e-4, lr_drop=((70000, 1e-5),), steps=80000)  # H3AE: last 10K of 80K at 1e-5
    assert tuple(h3ae.learning_rate(s) for s in (0, 69999, 70000, 79999)) == (1e-4, 1e-4, 1e-5, 1e-5)
    assert [_cfg(clips, tmp_path, lr=3e-4, warmup=2).learning_rate(s) for s in range(3)] == [1.5e-4, 3e-4, 3e-4]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--data", "d", "--output", "o", "--autoencoder", "kl2d-f8c4-debug"]
    args = parser.parse_args(base + ["--lr-drop", "6:1e-5", "--lr-drop", "8:1e-6"])
    assert config_from_args(args).lr_drop == ((6, 1e-5), (8, 1e-6))
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--lr-drop", "6"])
    with pytest.raises(ValueError, match="strictly increasing"):
        _cfg(clips, tmp_path, lr_drop=((8, 1e-5), (6, 1e-6)))
    with pytest.raises(ValueError, match="must be > 0"):
        _cfg(clips, tmp_path, lr_drop=((8, 0.0),))


def test_config_file_then_flags_then_overrides(tmp_path):
    """``ldm train-ae --config FILE.yaml [flags] [KEY=VALUE ...]``: the config system of ``ldm train``
    (strict keys), flags as shorthands over the YAML, dotted overrides over both."""
    (tmp_path / "ae.yaml").write_text("data: videos\noutput: run\nautoencoder: kl2d-f8c4-debug\nlr: 1.0e-4\n"
                                      "steps: 80000\nlr_drop: [[70000, 1.0e-5]]\nbatch_size: 3\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "ae.yaml"), "--batch-size", "5", "--frames",
                                              "9", "steps=100", "frames=17"]))
    assert (cfg.data, cfg.lr, cfg.lr_drop, cfg.steps) == ("videos", 1e-4, ((70000, 1e-5),), 100)
    assert (cfg.batch_size, cfg.frames, cfg.height) == (5, 17, TrainAEConfig.__dataclass_fields__["height"].default)
    with pytest.raises(ValueError, match="unknown key"):
        config_from_args(parser.parse_args(["--config", str(tmp_path / "ae.yaml"), "lrr=1"]))
    with pytest.raises(ValueError, match="needs \\['data', 'output'\\]"):
        config_from_args(parser.parse_args(["--autoencoder", "kl2d-f8c4-debug"]))
    recipe = config_from_args(parser.parse_args(["--config", str(REPO / "launch" / "configs" / "recipes" / "h3ae.yaml"),
                                                 "--data", "d", "--output", "o"]))
    assert recipe.learning_rate(69999) == 1e-4 and recipe.learning_rate(70000) == 1e-5 and recipe.steps == 80000
    same = config_from_args(parser.parse_args(["--autoencoder", "kl2d-f8c4-debug", "--input", "d", "--output", "o"]))
    assert same.data == "d"  # --input, as every other verb spells it, is --data


def test_lr_drop_survives_resume(clips, tmp_path):
    out = tmp_path / "run"
    train_autoencoder(_cfg(clips, out, steps=2, save_every=2, lr_drop=((3, 1e-4),), latent_stats_clips=0))
    summary = train_autoencoder(_cfg(clips, out, steps=4, save_every=2, lr_drop=((3, 1e-4),), latent_stats_clips=0),
                                allow_change=("steps",))
    assert summary["resumed_from"].endswith("step-00000002")
    assert [r["lr"] for r in _log(out)] == [2e-3, 2e-3, 2e-3, 1e-4]
    groups = json.loads((out / "checkpoints" / "step-00000004" / "optimizer.json").read_text())["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4]  # the optimizer took the last step at the dropped LR


def test_half_written_checkpoints_are_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    files = {name: {"x": torch.full((3,), float(i))} for i, name in enumerate(
        ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])}
    files.update({"config.json": {"a": 1}, "optimizer.json": {"b": 2}, "trainer.json": {"c": 3}})
    for step in (1, 2, 3, 4):
        write_checkpoint(root, step, files, keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003", "step-00000004"]
    (root / "step-00000004" / "MANIFEST.json").unlink()  # killed before the manifest
    (root / "step-00000003" / "trainer.json").unlink()  # a file lost
    (root / ".step-00000005.tmp").mkdir()  # killed while writing: never a candidate
    path, rejected = find_checkpoint(root)
    assert path == root / "step-00000002"
    assert [Path(r["path"]).name for r in rejected] == ["step-00000004", "step-00000003"]
    assert "MANIFEST" in rejected[0]["reason"] and "trainer.json" in rejected[1]["reason"]
    for name in list(root.iterdir()):
        if name.name.startswith("step-"):
            shutil.rmtree(name)
    assert find_checkpoint(root) == (None, [])


def test_run_log_is_the_log_of_both_trainers(tmp_path, monkeypatch):
    """``runs.RunLog`` (was: a private logger in launch/train.py and a copy in train_ae.py): JSON
    lines, numbers to TensorBoard as train/KEY and val/KEY; a resumed run drops the lines past its
    step and hides the TensorBoard points past it; other ranks write nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    first = runs.RunLog(tmp_path, 0)
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step), "bucket": [1, 8, 8], "grad_norm": None, "flag": True})
    first.log(2, {"val_loss": 0.5}, "val")
    first.close()
    runs.RunLog(tmp_path / "other", 0, enabled=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()
    # TensorBoard reads event files in name order: time in seconds, host, pid, then a per-process counter as text
    # (a file numbered 10 sorts before one numbered 9): a resume is a new process, seconds later, as here
    import time
    later = time.time() + 2
    monkeypatch.setattr(time, "time", lambda: later)
    again = runs.RunLog(tmp_path, 2)  # resumed from a step-2 checkpoint: step 3 is logged again
    monkeypatch.undo()
    again.log(3, {"loss": 30.0})
    again.close()
    assert [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 1.0, "bucket": [1, 8, 8], "grad_norm": None, "flag": True},
        {"step": 2, "loss": 2.0, "bucket": [1, 8, 8], "grad_norm": None, "flag": True},
        {"step": 2, "val_loss": 0.5}, {"step": 3, "loss": 30.0}]
    board = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert sorted(board.Tags()["scalars"]) == ["train/loss", "val/val_loss"]
    assert [(e.step, e.value) for e in board.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_runs_log_truncation_nonfinite_policy_and_lr_schedule(tmp_path):
    """What both trainers share (``launch.runs``): the log cut back to the resumed step (torn lines
    dropped), the non-finite policy (``limit`` in a row stop the run, a finite step resets), the
    LR schedule (warm-up, constant / cosine, drops) and ``keep <= 0`` keeping every checkpoint."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo')
    runs.truncate_log(log, 3)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    guard = runs.NonFiniteGuard(3)
    assert [guard.check(f, i) for i, f in enumerate([True, False, False, True, False, False])] == \
        [True, False, False, True, False, False]
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 6"):
        guard.check(False, 6)
    assert guard.total == 5
    cosine = [runs.lr_factor(s, warmup=2, schedule="cosine", total_steps=6, min_lr_ratio=0.1)
              for s in (0, 1, 2, 4, 6, 9)]
    assert cosine == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert runs.lr_at(5, 1e-3, ((3, 1e-4),), warmup=2) == 1e-4
    with pytest.raises(ValueError, match="LR schedule"):
        runs.lr_factor(5, schedule="linear")
    for step in (1, 2, 3):
        runs.write_checkpoint(tmp_path / "all", step, {"trainer.json": {"step": step}}, keep=0)
    assert [p.name for p in runs.checkpoints(tmp_path / "all")] == ["step-00000003", "step-00000002", "step-00000001"]


def test_optimizer_state_round_trip_without_pickle():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, meta = optimizer_to_files(opt)
    meta = json.loads(json.dumps(meta))  # what the checkpoint stores
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    optimizer_from_files(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"] and fresh.param_groups[0]["betas"] == (0.5, 0.9)
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])


def test_gan_run_with_3d_discriminator(clips, tmp_path):
    out = tmp_path / "gan"
    summary = train_autoencoder(_cfg(clips, out, autoencoder="causal3d-f4x8c4-debug", steps=3, gan=True,
                                     disc_kind="3d", disc_start=1, save_every=10, latent_stats_clips=0))
    log = _log(out)
    assert "d_loss" not in log[0] and all("d_loss" in r and "g_adv" in r for r in log[1:])
    assert all(torch.isfinite(torch.tensor(r["gan_weight"])) for r in log[1:])
    files = {p.name for p in (out / "checkpoints" / "step-00000003").iterdir()}
    assert {"discriminator.safetensors", "disc_optimizer.safetensors", "disc_optimizer.json"} <= files
    assert load_pretrained(summary["final"]).family == "causal3d"


def test_bad_settings_fail_before_work(clips, tmp_path):
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        train_autoencoder(_cfg(clips, tmp_path / "a", autoencoder="causal3d-f4x8c4-debug", frames=4))
    with pytest.raises(ValueError, match="unknown autoencoder"):
        _cfg(clips, tmp_path / "b", autoencoder="nope")
    with pytest.raises(ValueError, match="keep must be >= 1"):  # as ldm train's keep_checkpoints
        _cfg(clips, tmp_path / "c", keep=0)
    with pytest.raises(ValueError, match="both --lpips-vgg"):
        _cfg(clips, tmp_path / "d", lpips_vgg="vgg.pth")
    with pytest.raises(ValueError, match="cannot fill a batch"):
        train_autoencoder(_cfg(clips, tmp_path / "e", batch_size=8))
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()


def test_keep_one_checkpoint_as_ldm_train_allows(clips, tmp_path):
    """``--keep 1`` (ldm train's keep_checkpoints may be 1) keeps only the newest checkpoint, which
    the run resumes from (was: refused, keep must be >= 2)."""
    out = tmp_path / "r"
    train_autoencoder(_cfg(clips, out, steps=3, save_every=1, keep=1, latent_stats_clips=0))
    assert [p.name for p in runs.checkpoints(out / "checkpoints")] == ["step-00000003"]
    resumed = train_autoencoder(_cfg(clips, out, steps=4, save_every=1, keep=1, latent_stats_clips=0),
                                allow_change=("steps",))
    assert resumed["start_step"] == 3 and [p.name for p in runs.checkpoints(out / "checkpoints")] == ["step-00000004"]


def test_captions_file_gives_the_trainer_its_captions(clips, tmp_path):
    """``--captions FILE`` (as ``ldm extract`` takes it) sets the captions a text-guided
    autoencoder trains with; a missing file is one line before any work."""
    from launch.train_ae import AETrainer
    rows = "path,caption\n" + "".join(f"clip{i:02d}.mp4,disc number {i}\n" for i in range(6))
    (tmp_path / "caps.csv").write_text(rows)
    trainer = AETrainer(_cfg(clips, tmp_path / "run", captions=str(tmp_path / "caps.csv")), dist.dist_env())
    assert {it.key: it.caption for it in trainer.dataset.items}["clip03"] == "disc number 3"
    assert all(it.caption is None for it in AETrainer(_cfg(clips, tmp_path / "run2"), dist.dist_env()).dataset.items)
    with pytest.raises(MissingInput, match="nope.csv"):
        train_autoencoder(_cfg(clips, tmp_path / "f", captions=str(tmp_path / "nope.csv")))
    assert not (tmp_path / "f").exists()


# --- losses -----------------------------------------------------------------------------------
def test_kl_and_reconstruction_normalisation():
    mean = torch.ones(2, 4, 3, 2, 2)
    lat = Latent({"z": mean}, "grid", {"z": torch.zeros_like(mean)})
    # 0.5 * mu^2 per latent element, summed (48), divided by input elements (3*3*16*16)
    assert torch.isclose(kl_loss(lat, 3 * 3 * 16 * 16), torch.tensor(0.5 * 48 / 2304))
    assert kl_loss(Latent({"z": mean}, "grid"), 10) == 0  # no posterior, no KL
    x, y = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert reconstruction_loss(x, y, "l1") == 2 and reconstruction_loss(x, y, "l2") == 4
    with pytest.raises(ValueError):
        reconstruction_loss(x, y, "l3")


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_discriminator_shapes_and_hinge(kind):
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, channels=8, layers=2, kind=kind)
    out = disc(torch.randn(2, 3, 5, 32, 32))
    assert out.shape[1] == 1 and out.shape[0] == (10 if kind == "2d" else 2)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # both margins met
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1


def test_generator_loss_terms_lpips_gradient_and_adaptive_weight():
    torch.manual_seed(0)
    ae = build("kl2d-f8c4-debug")
    lpips = LPIPS("alex")  # random trunk: only the wiring and the gradient path are checked here
    for head in lpips.heads:
        head.weight.data.uniform_(0.1, 1.0)
    loss_fn = AELoss(AELossConfig(lpips_weight=1.0, gan_weight=0.5, disc_start=0, disc_channels=8,
                                  disc_layers=2), lpips=lpips)
    video = torch.rand(1, 3, 2, 64, 64) * 2 - 1
    out = ae.train_forward(video, generator=torch.Generator().manual_seed(0))
    out.losses["extra"] = out.recon.mean() * 0 + 0.25  # a family term is added to the total
    total, logs = loss_fn.generator_loss(video, out, step=0, last_layer=ae.last_layer())
    expected = (logs["rec"] + logs["lpips"] + 1e-6 * logs["kl"] + logs["gan_weight"] * logs["g_adv"] + 0.25)
    assert torch.isclose(total.detach(), expected)
    assert logs["lpips"] > 0 and logs["gan_weight"] > 0
    nll, g = (out.recon ** 2).mean(), out.recon.mean()
    w = adaptive_gan_weight(nll, g, ae.last_layer())
    assert w.ndim == 0 and w >= 0 and not w.requires_grad and ae.last_layer().grad is None
    total.backward()
    grad = ae.last_layer().grad
    assert grad is not None and torch.isfinite(grad).all()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # G step leaves D alone
    with pytest.raises(ValueError, match="needs an LPIPS network"):
        AELoss(AELossConfig(lpips_weight=1.0))


def test_dwt_loss_term_from_the_cli():
    """H3AE Tab. 5's DWT loss: `--dwt-weight` adds w x mean |Haar3D(x) - Haar3D(x_hat)|; the 3D Haar
    level is orthonormal (energy kept, 8 sub-bands) and takes odd clip lengths (1 + 4k frames)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, 6, generator=g)
    bands = haar_dwt3d(x)
    assert bands.shape == (2, 3, 8, 3, 4, 3)
    even = torch.randn(1, 2, 4, 4, 4, generator=g)
    assert torch.isclose(haar_dwt3d(even).pow(2).sum(), even.pow(2).sum())
    flat = torch.full((1, 1, 2, 2, 2), 0.5)
    assert torch.allclose(haar_dwt3d(flat).flatten(), torch.tensor([0.5 * 8 ** 0.5] + [0.0] * 7))
    assert dwt_loss(x, x) == 0
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--autoencoder", "h3ae-4x16x16-debug", "--data", "d", "--output", "o",
                                              "--dwt-weight", "0.5"]))
    assert cfg.loss_config().dwt_weight == 0.5
    ae = build("h3ae-4x16x16-debug")
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    out = ae.train_forward(video, generator=torch.Generator().manual_seed(0))
    total, logs = AELoss(cfg.loss_config()).generator_loss(video, out, step=0)
    assert torch.isclose(logs["dwt"], dwt_loss(video, out.recon.detach()))
    assert torch.isclose(total.detach(), logs["rec"] + 0.5 * logs["dwt"] + 1e-6 * logs["kl"])


def test_adaptive_gan_weight_on_ivvae_images_reaches_the_key_head():
    """IV-VAE's output is written by two heads (keyframes / the rest): a 1-frame clip reaches only
    the key head, so a weight on the motion head alone was 0 on every image step."""
    torch.manual_seed(0)
    ae = build("ivvae-z4-debug")
    key, motion = ae.last_layer()
    for frames, reached in ((1, False), (5, True)):
        out = ae.train_forward(torch.rand(1, 3, frames, 32, 32) * 2 - 1, generator=torch.Generator().manual_seed(0))
        nll, g = out.recon.abs().mean(), (out.recon ** 2).mean()
        assert adaptive_gan_weight(nll, g, ae.last_layer()) > 0
        assert (adaptive_gan_weight(nll, g, motion) > 0) == reached


# --- distributed -------------------------------------------------------------------------------
def test_shard_list_covers_every_item_once():
    items = list(range(11))
    shards = [dist.shard_list(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items and max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [dist.shard_list(items, r, 3) for r in range(3)]
    with pytest.raises(ValueError):
        dist.shard_list(items, 3, 3)


def test_dist_env_reads_torchrun_and_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    assert dist.dist_env() == dist.DistEnv(0, 1, 0, "single")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    # an sbatch script or salloc shell: the allocation's task count, but not an srun step (was: rank
    # 0 of 8, so `ldm train` there waited for 7 ranks that never came)
    assert dist.dist_env() == dist.DistEnv(0, 1, 0, "single")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist.dist_env() == dist.DistEnv(3, 8, 1, "slurm")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.dist_env() == dist.DistEnv(1, 2, 1, "torchrun")  # torchrun wins inside an allocation
    # ranks set up by hand (a shell exporting RANK, whose parent may end first) do not stop with their
    # parent; those of torchrun / accelerate (TORCHELASTIC_RUN_ID) and DeepSpeed's launcher (CROSS_RANK) do
    for k in ("TORCHELASTIC_RUN_ID", "CROSS_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not dist.started_by_a_launcher()
    for k in ("TORCHELASTIC_RUN_ID", "CROSS_RANK"):
        monkeypatch.setenv(k, "0")
        assert dist.started_by_a_launcher()
        monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        dist.dist_env()


@pytest.mark.dist
def test_two_rank_ddp_run(clips, tmp_path):
    out = tmp_path / "ddp"
    env = process_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "launch.cli", "train-ae", "--autoencoder", "kl2d-f8c4-debug", "--data", str(clips),
           "--output", str(out), "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
           "--batch-size", "1", "--lr", "2e-3", "--steps", "4", "--log-every", "1", "--save-every", "2",
           "--num-workers", "0", "--gan", "--disc-start", "2", "--latent-stats-clips", "2", "--no-progress",
           f"val.data={clips}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    val = [r for r in _log(out) if "val_psnr" in r]  # each rank validates its share, the means are of all 6
    assert [(r["step"], r["val_clips"]) for r in val] == [(2, 6), (4, 6)]
    assert json.loads(proc.stdout.splitlines()[-1])["val"] == val[-1]
    log = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("d_loss" in r for r in log[2:])
    assert log[0]["clips_per_s"] > 0
    trainer = json.loads((out / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and [r["rank"] for r in trainer["ranks"]] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and list(summary["skipped_clips"]) == ["broken"]
    assert load_pretrained(out / "final").family == "kl2d"
    # lose the last checkpoint (as if killed before it) and tear the log: both ranks resume from
    # step 2 with their own data position and RNG, and steps 3-4 repeat exactly
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step-00000002")
    assert [(r["step"], r["loss"], r["d_loss"] if "d_loss" in r else None) for r in _log(out) if "loss" in r] == \
        [(r["step"], r["loss"], r["d_loss"] if "d_loss" in r else None) for r in log]
    assert [r for r in _log(out) if "val_psnr" in r] == val
    # on one rank: the same per-rank batch would halve the global batch, refused with what to give;
    # --batch-size 2 keeps it and the run goes on from step 4 (was: refused, resume with 2 processes)
    from launch.cli import main
    one = cmd[cmd.index("train-ae"):]
    with pytest.raises(UserError, match=r"written by 2 rank\(s\) x --batch-size 1 .* this run has 1: resume it "
                                        r"with --batch-size 2 --allow-change batch_size to keep its global batch"):
        main(one + ["--steps", "6", "--allow-change", "steps"])
    assert main(one + ["--steps", "6", "--batch-size", "2", "--allow-change", "steps,batch_size"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000004") and summary["world_size"] == 1
    assert list(summary["skipped_clips"]) == ["broken"]  # what every rank had skipped
    assert [r["step"] for r in _log(out) if "loss" in r] == list(range(1, 7))
    assert json.loads((out / "checkpoints" / "step-00000006" / "trainer.json").read_text())["world_size"] == 1


_UNUSED_PARAM_SCRIPT = """
import sys

import torch

from autoencoders.base import REGISTRY, register, register_family
from autoencoders.kl2d import KL2D


@register_family
class SpareKL2D(KL2D):
    family = "kl2d-spare"
    ddp_find_unused_parameters = sys.argv[1] == "declare"

    def __init__(self, config):
        super().__init__(config)
        self.spare = torch.nn.Linear(2, 2)  # never in the loss, like MTC-VAE's stage-dependent parts


register("kl2d-spare-debug", SpareKL2D, REGISTRY["kl2d-f8c4-debug"][1])
from launch.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
"""


def _spare_run(clips, tmp_path, mode: str) -> subprocess.CompletedProcess:
    """`ldm train-ae` of a model with a parameter outside the loss under 2-rank DDP; ``mode`` "declare" sets
    its class's ``ddp_find_unused_parameters = True``, "silent" leaves it False."""
    script = tmp_path / "spare.py"
    script.write_text(_UNUSED_PARAM_SCRIPT)
    env = process_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), mode, "train-ae", "--autoencoder", "kl2d-spare-debug", "--data",
           str(clips), "--output", str(tmp_path / mode), "--frames", str(FRAMES), "--height", str(SIZE),
           "--width", str(SIZE), "--batch-size", "1", "--steps", "3", "--save-every", "3", "--num-workers", "0",
           "--latent-stats-clips", "0", "--no-progress"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# under make test-slow with its negative control below; make test trains a model with unused parameters
# under 2-rank DDP in test_buckets.py (image buckets leave the temporal weights out)
@pytest.mark.dist
@pytest.mark.slow
def test_ddp_expects_unused_parameters_when_the_model_declares_them(clips, tmp_path):
    """A model with parameters outside the loss trains under 2-rank DDP when its class sets
    ``ddp_find_unused_parameters = True`` (the trainer passes find_unused_parameters=True)."""
    ok = _spare_run(clips, tmp_path, "declare")
    assert ok.returncode == 0, ok.stderr[-4000:]
    assert json.loads((tmp_path / "declare" / "summary.json").read_text())["steps"] == 3


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_fails_in_its_reducer_when_the_model_does_not_declare_unused_parameters(clips, tmp_path):
    """The same model without the declaration fails in DDP's reducer: the declaration is what the test
    above depends on (make test-slow)."""
    failed = _spare_run(clips, tmp_path, "silent")
    assert failed.returncode != 0 and "find_unused_parameters" in failed.stderr


def test_latent_stats_from_one_latent_pixel_are_pooled_or_kept():
    """One 1-frame clip at the smallest size gives one value per channel: the per-channel std is
    undefined (it was NaN), so the statistics are pooled over channels; one value keeps the old ones."""
    from launch.train_ae import measure_latent_stats

    torch.manual_seed(0)
    ae = build("kl2d-f8c4-debug")
    stats = measure_latent_stats(ae, [torch.rand(3, 1, 8, 8) * 2 - 1], torch.device("cpu"))
    assert len(stats["latent_scale"]) == 1 and all(math.isfinite(v) for v in stats["latent_scale"] + stats["latent_shift"])
    stats = measure_latent_stats(ae, [torch.rand(3, 2, 16, 16) * 2 - 1], torch.device("cpu"))
    assert len(stats["latent_scale"]) == ae.config.latent_channels


def test_profile_window(clips, tmp_path):
    """``profile.steps`` records that many steps with torch.profiler into OUTPUT/profile, as in ldm train."""
    out = tmp_path / "r"
    train_autoencoder(_cfg(clips, out, steps=3, profile=runs.ProfileConfig(start=1, steps=1)))
    top = json.loads((out / "profile" / "ops-rank0.json").read_text())["top"]
    assert any(r["name"].startswith("aten::") for r in top) and (out / "profile" / "trace-rank0.json").is_file()
    with pytest.raises(ValueError, match="profile"):
        _cfg(clips, out, profile=runs.ProfileConfig(steps=-1))


def test_resume_on_another_rank_count_is_one_line_before_the_model(clips, tmp_path, monkeypatch):
    """Resumed by another number of ranks with the same per-rank batch (so another global batch),
    a train-ae checkpoint is a `UserError` naming the batch that keeps the global batch, before any
    model is built (was: a ValueError traceback from the checkpoint loader, after the model was on
    the device)."""
    import launch.train_ae as train_ae
    out = tmp_path / "run"
    train_autoencoder(_cfg(clips, out, steps=3))
    monkeypatch.setattr(train_ae, "_build_model", lambda *a: pytest.fail("model built"))
    with pytest.raises(UserError, match=r"written by 1 rank\(s\) x --batch-size 2 \(a global batch of 2 "
                                        r"clips\), this run has 2: resume it with --batch-size 1 --allow-change"):
        train_ae.AETrainer(_cfg(clips, out, steps=6), dist.DistEnv(0, 2, 0, "torchrun"))
    with pytest.raises(UserError, match=r"this run has 3: resume it with another --batch-size N .* or with 1 process"):
        train_ae.AETrainer(_cfg(clips, out, steps=6), dist.DistEnv(0, 3, 0, "torchrun"))


def test_carried_position_reads_on_from_the_clips_every_rank_read():
    """Resumed on another topology, the new ranks read on from the first clip of the epoch that the
    saved ranks had not all read: none is passed over, fewer than one new global batch is read twice."""
    from launch.train_ae_data import carried_position, epoch_batches

    n, seed = 24, 3
    for (old_batch, old_world, done), (batch, world) in [((1, 2, 3), (2, 1)), ((2, 1, 3), (1, 2)),
                                                         ((1, 3, 3), (1, 2)), ((2, 2, 2), (1, 3))]:
        read = [i for r in range(old_world)
                for b in epoch_batches(n, old_batch, 1, seed, r, old_world)[:done] for i in b]
        epoch, start = carried_position([(1, done)] * old_world, old_batch * old_world, batch * world)
        rest = [i for r in range(world) for b in epoch_batches(n, batch, epoch, seed, r, world)[start:] for i in b]
        assert epoch == 1 and set(read) | set(rest) == set(range(n))
        assert len(read) + len(rest) - n < batch * world


def test_a_full_disk_while_final_is_written_is_one_line_and_a_rerun_writes_it(clips, tmp_path, monkeypatch):
    """The last checkpoint fits, final/ does not: an OSError the CLI prints as one line, naming
    final/ and saying the checkpoint is saved (was: safetensors' traceback); the same command
    writes final/."""
    from safetensors import SafetensorError

    from autoencoders.base import Autoencoder

    def full_disk(self, path, name=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "r"
    with monkeypatch.context() as m:
        m.setattr(Autoencoder, "save_pretrained", full_disk)
        with pytest.raises(OSError, match=r"writing the final model of step 2 into .*final failed \(SafetensorError"
                                          r".*the checkpoint of step 2 is saved"):
            train_autoencoder(_cfg(clips, out, steps=2, save_every=2))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert train_autoencoder(_cfg(clips, out, steps=2, save_every=2))["steps_run"] == 0
    assert load_pretrained(out / "final") is not None
