"""A run folder is bound to what made it (``launch.runs.check_binding``): ``ldm train``,
``ldm train-ae`` and ``ldm extract`` refuse to continue a folder whose settings or inputs differ --
one line naming each key ``old -> new`` and the two ways out, before anything is written -- and
``--allow-change KEY`` lets an intended change through (recorded in run.json). No checkpoint
another run wrote is deleted."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import shutil
import warnings
from pathlib import Path

import pytest

from data import shards
from data.synth import synth_dataset
from launch import runs
from launch.cli import console
from ldm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "launch" / "configs" / "train-debug.yaml"
AE = "kl2d-f8c4-debug"


def _ldm(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return console(argv)


def _extract(base: Path, out: Path, *extra: str, ae: str = AE) -> list[str]:
    return ["extract", "--autoencoder", ae, "--input", str(base / "videos"), "--output", str(out), "--frames", "8",
            "--height", "32", "--width", "32", "--shard-size", "3", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Videos, their latents from two autoencoders, and a 2-step DiT run on the first."""
    base = tmp_path_factory.mktemp("binding")
    synth_dataset(base / "videos", num=6, frames=8, size=32, fps=8, seed=0)
    assert _ldm(_extract(base, base / "lat")) == 0
    assert _ldm(_extract(base, base / "lat16", ae="kl2d-f8c16-debug")) == 0
    return base


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys, *needles: str) -> str:
    """``ldm ARGV`` exits 2 with one line holding every needle."""
    capsys.readouterr()
    assert _ldm(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1 and ": error: " in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _train(base: Path, out: Path, *over: str, allow: str | None = None) -> list[str]:
    return ["train", "--config", str(YAML), *(["--allow-change", allow] if allow else []),
            f"data.shards={base / 'lat'}", f"output={out}", "data.batch_size=2", "optim.warmup_steps=1",
            "save_every=2", "steps=2", *over]


def test_train_refuses_another_model_or_autoencoder_and_allows_a_longer_schedule(base, tmp_path, capsys):
    out = tmp_path / "dit"
    assert _ldm(_train(base, out)) == 0
    record = json.loads((out / runs.BINDING).read_text())["record"]
    assert record["model.dit"] == "dit-debug" and record["latents.autoencoder"] == AE and record["global_batch"] == 2
    before = _snapshot(out)
    # the cases: another DiT size (was: 120 warnings, restart at 0, old checkpoints rotated away) and
    # shards of another autoencoder (was: "resumed", trained on latents of another shape)
    _refused(_train(base, out, "model.overrides.hidden=32"), capsys,
             f"{out} holds a run made with other settings or inputs (model.overrides.hidden: (none) -> 32)",
             "give output=NEW_FOLDER for a new run, or --allow-change model.overrides.hidden")
    line = _refused(_train(base, out, f"data.shards={base / 'lat16'}"), capsys, "latents.content:",
                    'latents.autoencoder: "kl2d-f8c4-debug" -> "kl2d-f8c16-debug"', "latents.shapes.z:")
    assert "latents.config_hash" in line
    _refused(_train(base, out, "steps=3"), capsys, "steps: 2 -> 3", "--allow-change steps")
    _refused(_train(base, out, "steps=3", allow="step"), capsys, "--allow-change step: not a setting")
    assert _snapshot(out) == before  # refused before anything was written
    # harmless settings may change; an intended change goes through and is recorded
    assert _ldm(_train(base, out, "steps=3", "log_every=1", "keep_checkpoints=5", allow="steps")) == 0
    assert "resumed from" in capsys.readouterr().out
    saved = json.loads((out / runs.BINDING).read_text())
    assert saved["record"]["steps"] == 3 and saved["changes"][0]["changes"] == {"steps": [2, 3]}
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()][-1] == 3
    assert (out / "checkpoints" / "step-00000002").is_dir()  # the earlier run's checkpoint is still there
    # a folder made before run.json existed: resumed, and bound from now on
    (out / runs.BINDING).unlink()
    assert _ldm(_train(base, out, "steps=3")) == 0
    assert json.loads((out / runs.BINDING).read_text())["record"]["steps"] == 3
    _refused(_train(base, out, "steps=4"), capsys, "steps: 3 -> 4")


def _train_ae(base: Path, out: Path, *extra: str) -> list[str]:
    return ["train-ae", "--autoencoder", AE, "--data", str(base / "videos"), "--output", str(out), "--frames", "8",
            "--height", "32", "--width", "32", "--steps", "2", "--save-every", "2", "--sample-every", "100",
            "--latent-stats-clips", "0", "--num-workers", "0", "--no-progress", *extra]


def test_a_second_run_into_a_folder_in_use_is_refused(base, tmp_path, capsys, monkeypatch):
    """Two runs started into one folder (was: both trained, their checkpoints piled up as
    ``step-N.kept-1`` and one died with a FileNotFoundError traceback). The lock goes with its
    process, so a killed run never leaves the folder locked. Refused before a model is built
    (was, for train-ae: after it was on the device, taking the GPU memory the live run uses)."""
    import fcntl

    from launch import train as train_mod, train_ae
    runs_of = [(_train(base, tmp_path / "dit"), tmp_path / "dit"), (_train_ae(base, tmp_path / "ae"), tmp_path / "ae"),
               (_extract(base, tmp_path / "lat"), tmp_path / "lat")]  # extract: was two extractions mixing shards
    for argv, out in runs_of:
        out.mkdir()
        with open(out / runs.LOCK, "a+") as other:  # another process's lock (a lock of its own file description)
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            other.write("pid 4242 on node7 since 2026-12-05 06:00:00\n")
            other.flush()
            with monkeypatch.context() as m:
                m.setattr(train_ae, "_build_model", lambda *a: pytest.fail("model built"))
                m.setattr(train_mod.dist, "init_distributed", lambda *a: pytest.fail("process group made"))
                _refused(argv, capsys, f"{out} is in use by another run (pid 4242 on node7", "give ")
            assert sorted(p.name for p in out.iterdir()) == [runs.LOCK]  # nothing written
        assert _ldm(argv) == 0  # the holder has ended
        assert _ldm(argv) == 0  # and this run let go of it


FORKS_A_WORKER = """
import os, sys, time
from launch import runs
runs.claim_folder(sys.argv[1])
child = os.fork()
if child == 0:  # a DataLoader worker, busy decoding when its rank dies
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
sys.stdin.readline()  # the rank lives until the test says
"""


def test_a_folder_lock_goes_with_its_run_not_with_a_forked_worker(tmp_path):
    """A rank SIGKILLed while its forked DataLoader workers decode on for a few seconds (was: the
    workers kept the folder locked, and the rank torchrun --max-restarts started next was refused)."""
    import fcntl
    import os
    import subprocess
    import sys

    def locked() -> bool:
        with open(tmp_path / runs.LOCK, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    rank = subprocess.Popen([sys.executable, "-c", FORKS_A_WORKER, str(tmp_path)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    worker = int(rank.stdout.readline())
    try:
        assert locked()  # the rank holds it
        rank.stdin.close()
        rank.wait(timeout=60)  # the rank ends, its worker lives on
        os.kill(worker, 0)
        assert not locked()
    finally:
        os.kill(worker, 9)


def test_train_ae_run_that_stopped_before_a_checkpoint_binds_nothing(base, tmp_path, capsys):
    """Clips longer than every video: one line (was: a traceback), and the corrected command runs
    in the same folder (was: refused, "frames: 9 -> 8", by the run.json the failed run left)."""
    out = tmp_path / "ae"
    _refused(_train_ae(base, out, "--frames", "9"), capsys, "no clip of", "6 skipped", "too short")
    assert (out / runs.BINDING).is_file() and not (out / "checkpoints").exists()
    assert _ldm(_train_ae(base, out)) == 0
    assert json.loads((out / runs.BINDING).read_text())["record"]["frames"] == 8
    _refused(_train_ae(base, out, "--frames", "4"), capsys, "frames: 8 -> 4")  # now it holds a run


def test_train_ae_refuses_other_settings_and_never_replaces_an_earlier_run(base, tmp_path, capsys):
    out = tmp_path / "ae"
    assert _ldm(_train_ae(base, out)) == 0
    before = _snapshot(out)
    _refused(_train_ae(base, out, "--frames", "4"), capsys, "frames: 8 -> 4", "--output NEW_FOLDER",
             "--allow-change frames")
    _refused(_train_ae(base, out, "--lr", "3e-4"), capsys, "lr: 0.0001 -> 0.0003")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.mp4").write_bytes((base / "videos" / "videos" / "000000.mp4").read_bytes())
    _refused(_train_ae(base, out, "--data", str(other)), capsys, "videos: \"6 (names", "-> \"1 (names")
    # --resume no would start at step 0 and rotate the earlier run's checkpoints away
    _refused(_train_ae(base, out, "--resume", "no"), capsys, "--resume no:", "holds checkpoints of an earlier run")
    assert _snapshot(out) == before
    assert _ldm(_train_ae(base, out, "--steps", "3", "--log-every", "1", "--allow-change", "steps")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000002") and summary["steps"] == 3
    assert json.loads((out / runs.BINDING).read_text())["changes"][0]["changes"] == {"steps": [2, 3]}
    # a checkpoint of another run given with --resume is held to that run's binding
    _refused(_train_ae(base, tmp_path / "new", "--frames", "4", "--resume",
                       str(out / "checkpoints" / "step-00000002")), capsys, "frames: 8 -> 4")
    assert not (tmp_path / "new").exists()


def test_extract_refuses_another_extraction_and_redoes_shards_on_an_allowed_change(base, tmp_path, capsys):
    out = tmp_path / "lat"
    assert _ldm(_extract(base, out)) == 0
    before = _snapshot(out)
    _refused(_extract(base, out, "--fps", "4"), capsys, "fps: null -> 4.0", "--allow-change fps")
    _refused(_extract(base, out, ae="kl2d-f8c16-debug"), capsys, 'autoencoder: "kl2d-f8c4-debug" -> "kl2d-f8c16-debug"',
             "model.config_hash")
    assert _snapshot(out) == before
    assert _ldm(_extract(base, out, "--batch-size", "2")) == 0  # harmless: nothing redone
    assert {k: v for k, v in _snapshot(out).items() if k.endswith(".tar")} == \
        {k: v for k, v in before.items() if k.endswith(".tar")}
    assert _ldm(_extract(base, out, "--frames", "4", "--allow-change", "frames")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["video"]["frames"] == 4 and manifest["counts"]["written"] == 6
    assert all(json.loads((out / f"shard-00000{j}.json").read_text())["signature"]["video"]["frames"] == 4
               for j in (0, 1))
    assert json.loads((out / runs.BINDING).read_text())["changes"][0]["changes"] == {"frames": [8, 4]}


def test_an_allowed_change_to_fewer_shards_leaves_no_stale_shard(base, tmp_path):
    """--shard-size 3 -> 6 with --allow-change (was: shard-000001.tar of the old layout stayed, and
    the trainer, which reads every shard-*.tar of the folder, saw its clips twice)."""
    out = tmp_path / "lat"
    assert _ldm(_extract(base, out)) == 0
    assert len(shards.shard_urls(out)) == 2
    assert _ldm(_extract(base, out, "--shard-size", "6", "--allow-change", "shard_size")) == 0
    assert [Path(u).name for u in shards.shard_urls(out)] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.glob("shard-*.json")) == ["shard-000000.json"]
    assert len(shards.read_all(out)) == 6


def test_an_allowed_change_that_empties_a_shard_removes_its_tar(tmp_path):
    """A shard whose clips are all skipped after an allowed change (was: its earlier tar stayed and
    was trained on, with clips of the old settings)."""
    import numpy as np
    from data.video import write_frames
    for name, n in (("a", 8), ("b", 4)):
        write_frames(tmp_path / "videos" / f"{name}.mp4", np.zeros((n, 32, 32, 3), np.uint8), fps=8)
    argv = ["extract", "--autoencoder", AE, "--input", str(tmp_path / "videos"), "--output", str(tmp_path / "lat"),
            "--height", "32", "--width", "32", "--shard-size", "1"]
    assert _ldm([*argv, "--frames", "4"]) == 0 and len(shards.shard_urls(tmp_path / "lat")) == 2
    assert _ldm([*argv, "--frames", "8", "--allow-change", "frames"]) == 0
    assert [Path(u).name for u in shards.shard_urls(tmp_path / "lat")] == ["shard-000000.tar"]


def test_a_folder_of_an_earlier_version_is_checked_by_its_shards(base, tmp_path, capsys):
    out = tmp_path / "lat"
    assert _ldm(_extract(base, out)) == 0
    (out / runs.BINDING).unlink()  # made before run.json existed
    _refused(_extract(base, out, "--fps", "4"), capsys, "holds shards of a different extraction",
             "shard-000000.json: video differ")


def test_extract_binds_the_text_encoder_weights_not_only_its_folder(base, tmp_path, capsys):
    """A text encoder folder replaced between an interrupted extraction and its rerun (was: the rerun
    kept the finished shards and embedded the others with the new model: one folder, two encoders)."""
    from texts import save_t5
    t5, out = save_t5(tmp_path / "t5"), tmp_path / "lat"
    argv = _extract(base, out, "--text-encoder", f"t5:{t5}")
    assert _ldm(argv) == 0
    for name in ("shard-000001.tar", "shard-000001.json", "manifest.json"):  # as a run killed after shard 0 leaves it
        (out / name).unlink()
    save_t5(t5, seed=1)  # another model in the same folder
    before = _snapshot(out)
    _refused(argv, capsys, "text_encoder.fingerprint: [", "--allow-change text_encoder.fingerprint")
    assert _snapshot(out) == before
    assert _ldm([*argv, "--allow-change", "text_encoder"]) == 0  # intended: every shard embedded with the new one
    fp = json.loads((out / "manifest.json").read_text())["text_fingerprint"]
    assert [json.loads((out / f"shard-00000{j}.json").read_text())["signature"]["text_fingerprint"] for j in (0, 1)] \
        == [fp, fp]
    assert _snapshot(out)["shard-000000.tar"] != before["shard-000000.tar"]

    # a folder of an earlier version (no fingerprint in run.json or the sidecars) is checked by its manifest's
    record = json.loads((out / runs.BINDING).read_text())
    del record["record"]["text_encoder.fingerprint"]
    (out / runs.BINDING).write_text(json.dumps(record))
    for side in out.glob("shard-*.json"):
        done = json.loads(side.read_text())
        del done["signature"]["text_fingerprint"]
        side.write_text(json.dumps(done))
    tars = {k: v for k, v in _snapshot(out).items() if k.endswith(".tar")}
    assert _ldm(argv) == 0  # the same encoder: resumed, nothing encoded again
    assert {k: v for k, v in _snapshot(out).items() if k.endswith(".tar")} == tars
    save_t5(t5, seed=0)
    _refused(argv, capsys, "text_encoder.fingerprint: [")
    (out / "manifest.json").unlink()  # interrupted before its manifest: nothing recorded the encoder, it resumes
    assert _ldm(argv) == 0


def test_extract_binds_the_captions_and_class_ids(base, tmp_path, capsys):
    """A captions file edited between two runs into one folder (was: the finished shards kept the
    old captions and embeddings, the others took the new ones, without a word)."""
    videos, out = tmp_path / "videos", tmp_path / "lat"
    shutil.copytree(base / "videos", videos)
    argv = _extract(base, out, "--input", str(videos), "--text-encoder", "builtin")
    assert _ldm(argv) == 0
    rows = [json.loads(line) for line in (videos / "metadata.jsonl").read_text().splitlines()]
    rows[4]["caption"] = "a big red square moving up"  # a fix in shard 1 (videos 3 to 5)
    (videos / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _snapshot(out)
    _refused(argv, capsys, "labels: \"captions and class ids sha256 ", "--allow-change labels")
    assert _snapshot(out) == before
    assert _ldm([*argv, "--allow-change", "labels"]) == 0  # the shard that changed is made again
    after = _snapshot(out)
    assert after["shard-000000.tar"] == before["shard-000000.tar"] and after["shard-000001.tar"] != before["shard-000001.tar"]
    assert shards.read_all(out)[4]["meta"]["caption"] == "a big red square moving up"
    # a folder of an earlier version (no labels recorded) resumes
    record = json.loads((out / runs.BINDING).read_text())
    del record["record"]["labels"]
    (out / runs.BINDING).write_text(json.dumps(record))
    for side in out.glob("shard-*.json"):
        side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "labels"}))
    rows[4]["caption"] = "a small red square moving up"
    (videos / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _ldm(argv) == 0


def test_extract_binds_the_video_reading(base, tmp_path, capsys):
    """A folder begun by an earlier reading (its run.json says reading 1, or nothing: made before the
    reading was versioned) is not finished by another without a word: refused, naming the change;
    allowed, the finished shards are kept as they are and the change recorded."""
    from data.video import READING_VERSION
    out = tmp_path / "lat"
    argv = _extract(base, out)
    assert _ldm(argv) == 0
    assert json.loads((out / runs.BINDING).read_text())["record"]["reading"] == READING_VERSION
    record = json.loads((out / runs.BINDING).read_text())
    del record["record"]["reading"]  # an earlier version's folder
    (out / runs.BINDING).write_text(json.dumps(record))
    before = _snapshot(out)
    _refused(argv, capsys, f"reading: 1 -> {READING_VERSION}", "--allow-change reading",
             "keeps its finished shards")
    assert _snapshot(out) == before
    assert _ldm([*argv, "--allow-change", "reading"]) == 0
    assert {k: v for k, v in _snapshot(out).items() if k.endswith(".tar")} == \
        {k: v for k, v in before.items() if k.endswith(".tar")}
    assert json.loads((out / runs.BINDING).read_text())["changes"][0]["changes"] == {"reading": [1, READING_VERSION]}
    assert _ldm(argv) == 0  # bound to this reading now


def test_binding_unit(tmp_path):
    record = runs.binding_record({"steps": 2, "log_every": 1, "optim": {"lr": 1e-4, "betas": (0.9, 0.99)},
                                  "overrides": {}}, ("log_every",), {"data": {"clips": 3}})
    assert record == {"steps": 2, "optim.lr": 1e-4, "optim.betas": [0.9, 0.99], "data.clips": 3}
    runs.check_binding(tmp_path / "new", record).write()
    assert runs.check_binding(tmp_path / "new", record).changes == {}
    changed = dict(record, **{"optim.lr": 2e-4, "optim.betas": [0.9, 0.999]})
    with pytest.raises(UserError, match="optim.betas: .* -> .*; optim.lr: 0.0001 -> 0.0002"):
        runs.check_binding(tmp_path / "new", changed)
    assert set(runs.check_binding(tmp_path / "new", changed, ("optim",)).changes) == {"optim.betas", "optim.lr"}
    assert runs.parse_allow(["steps,optim.lr", " seed "]) == ("steps", "optim.lr", "seed")
    # a setting added after the folder was bound counts as its default there
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        steps: int = 2
        added: float = 0.5
    with_added = dict(record, added=0.5)
    assert runs.check_binding(tmp_path / "new", with_added, defaults=runs.defaults_of(Cfg)).changes == {}
    with pytest.raises(UserError, match=r"added: 0.5 -> 0.7"):
        runs.check_binding(tmp_path / "new", dict(record, added=0.7), defaults=runs.defaults_of(Cfg))
    # an earlier run that left nothing (holds_work=False) binds nothing; --allow-change is still checked
    assert runs.check_binding(tmp_path / "new", changed, holds_work=False).changes == {}
    with pytest.raises(UserError, match="--allow-change optim.lrr: not a setting"):
        runs.check_binding(tmp_path / "new", changed, ("optim.lrr",), holds_work=False)
    (tmp_path / "new" / runs.BINDING).write_text("{")
    with pytest.raises(UserError, match="cannot be read"):
        runs.check_binding(tmp_path / "new", record)


def test_train_run_that_left_no_checkpoint_binds_nothing(base, tmp_path, capsys):
    """A DiT run stopped before its first checkpoint (say, out of memory at step 1) leaves only
    run.json and logs: the corrected command starts in the same folder; once a checkpoint or an
    export is there, the folder belongs to its run."""
    out = tmp_path / "dit"
    assert _ldm(_train(base, out)) == 0
    assert runs.holds_training(out)
    for kept in ("checkpoints", "export"):
        shutil.rmtree(out / kept)
    assert not runs.holds_training(out) and (out / runs.BINDING).is_file()
    assert _ldm(_train(base, out, "data.batch_size=1")) == 0  # was refused: "global_batch: 2 -> 1"
    assert json.loads((out / runs.BINDING).read_text())["record"]["global_batch"] == 1
    _refused(_train(base, out, "data.batch_size=2"), capsys, "global_batch: 1 -> 2")


def test_an_intact_checkpoint_of_the_same_step_is_kept_aside(tmp_path):
    """A run that fell back past an intact checkpoint (it could not be loaded here) and reaches its
    step again keeps the old one as step-N.kept-1; a corrupt one is replaced."""
    root = tmp_path / "checkpoints"
    runs.write_checkpoint(root, 4, {"a.json": {"v": 1}}, keep=2)
    runs.write_checkpoint(root, 4, {"a.json": {"v": 2}}, keep=2)
    assert json.loads((root / "step-00000004" / "a.json").read_text()) == {"v": 2}
    assert json.loads((root / "step-00000004.kept-1" / "a.json").read_text()) == {"v": 1}
    (root / "step-00000004" / "a.json").write_text("torn")
    runs.write_checkpoint(root, 4, {"a.json": {"v": 3}}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000004.kept-1"]
    assert runs.checkpoints(root) == [root / "step-00000004"]


def test_a_pipeline_rerun_adds_to_the_log_of_the_earlier_run(tmp_path, monkeypatch):
    """`ldm compare` / `ldm demo` rerun into their folder: each verb's log keeps the earlier runs'
    output (was: truncated), and a failure shows this run's tail only."""
    from launch import pipeline
    from launch.train import TrainConfig

    class Failing:
        def __init__(self, cmd, stdout, **kw):
            stdout.write("this run failed\n")

        def wait(self):
            return 1

    monkeypatch.setattr(pipeline.subprocess, "Popen", Failing)
    log = tmp_path / "train.log"
    log.write_text("an earlier run's log\n")
    with pytest.raises(RuntimeError) as e:
        pipeline.run_verb("train", TrainConfig(), log, ranks=2)
    assert log.read_text().startswith("an earlier run's log\n$ ") and log.read_text().endswith("this run failed\n")
    assert "this run failed" in str(e.value) and "an earlier run" not in str(e.value)


def test_a_pipeline_stage_stopped_by_ctrl_c_keeps_its_checkpoint_and_stops_the_pipeline(tmp_path, monkeypatch):
    """Ctrl-C reaches the stage too: run_verb waits for it to finish its step and save (a second
    Ctrl-C kills it), then stops the pipeline; an in-process trainer that stopped stops it as well."""
    from launch import pipeline
    from launch.train import TrainConfig

    class Stage:
        made: list = []

        def __init__(self, cmd, stdout, **kw):
            self.waits, self.killed = 0, False
            Stage.made.append(self)

        def wait(self):
            self.waits += 1
            if self.waits <= Stage.interrupts:
                raise KeyboardInterrupt
            return 130

        def kill(self):
            self.killed = True

    monkeypatch.setattr(pipeline.subprocess, "Popen", Stage)
    for interrupts, killed, waits in ((1, False, 2), (2, True, 3)):  # waited for until it exits, or killed
        Stage.interrupts = interrupts
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_verb("train", TrainConfig(), tmp_path / "train.log", ranks=2)
        assert (Stage.made[-1].killed, Stage.made[-1].waits) == (killed, waits)
    monkeypatch.setattr(pipeline, "_function", lambda verb: lambda cfg: {"stopped": "SIGINT", "steps": 3})
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        pipeline.run_verb("train", TrainConfig(), tmp_path / "train.log", in_process=True)


def test_a_pipeline_rerun_with_another_config_keeps_the_earlier_config_file(tmp_path):
    """The config beside a stage's log is the earlier run's record: a rerun with the same config
    uses it, one with another config gets the next name (was: overwritten before the stage ran)."""
    from launch import pipeline

    log = tmp_path / "train.log"
    assert pipeline.config_file(log, "steps: 3\n") == tmp_path / "train.yaml"
    assert pipeline.config_file(log, "steps: 3\n") == tmp_path / "train.yaml"
    assert pipeline.config_file(log, "steps: 5\n") == tmp_path / "train.2.yaml"
    assert pipeline.config_file(log, "steps: 7\n") == tmp_path / "train.3.yaml"
    assert pipeline.config_file(log, "steps: 5\n") == tmp_path / "train.2.yaml"
    assert [(tmp_path / f).read_text() for f in ("train.yaml", "train.2.yaml", "train.3.yaml")] == \
        ["steps: 3\n", "steps: 5\n", "steps: 7\n"]


COMPARE = ["--synth", "8", "--shapes", "circle", "--colors", "red", "blue", "--directions", "left", "right",
           "--frames", "9", "--height", "32", "--width", "32", "--eval-clips", "2", "--sample-steps", "2",
           "--device", "cpu"]


def _state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compare_rerun_with_other_settings_is_refused_in_its_own_terms(tmp_path, capsys):
    """`ldm compare` binds its folder: a rerun with other flags, another training config or
    other inputs is refused before anything runs, naming compare's flags (was: the inner
    `ldm train` refusal, naming `output=` and `--allow-change`, which compare does not take, after
    extraction had run again); the same command resumes and writes the report again."""
    out = tmp_path / "cmp"
    argv = ["compare", "--autoencoders", AE, "--output", str(out), *COMPARE, "--dit-steps", "3",
            "--train", "data.batch_size=4", "data.shuffle=8"]
    assert _ldm(argv) == 0
    before = _state(out)
    capsys.readouterr()
    for extra, what in ((["--dit-steps", "5"], "--dit-steps: 3 -> 5"),
                        (["--train", "data.batch_size=4", "data.shuffle=8", "optim.lr=1e-3"],
                         "train.optim.lr: 0.0003 -> 0.001"),
                        (["--synth", "9"], "--synth: 8 -> 9")):
        assert _ldm(argv + extra) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and what in err[0], err
        assert err[0].endswith("give --overwrite to start again or a new --output for a new run"), err
        assert "--allow-change" not in err[0] and "output=" not in err[0]
        assert _state(out) == before  # refused before anything ran: not a byte or a time stamp changed
    assert _ldm(argv + ["--device", "cpu"]) == 0  # the same comparison: resumed, the report written again
    assert json.loads((out / "compare.json").read_text())["rows"][0]["dit"]["steps"] == 3
    assert json.loads((out / "run.json").read_text())["record"]["--dit-steps"] == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_pipeline_stage_stops_when_ldm_demo_or_compare_is_killed(tmp_path, signal_name):
    """`kill PID` (or -9) of `ldm demo` / `ldm compare` while a stage runs under torchrun: the stage's
    launcher gets SIGTERM, as its trainers would from a Ctrl-C (was: it trained on as an orphan
    into the folder the rerun resumes). The stage here is a `sleep` standing in for torchrun."""
    script = f"""
import subprocess
from pathlib import Path
from launch import pipeline
from launch.train import TrainConfig
real = subprocess.Popen
def stage(cmd, **kw):
    proc = real(["sleep", "60"], **kw)
    print(proc.pid, flush=True)
    return proc
pipeline.subprocess.Popen = stage
pipeline.run_verb("train", TrainConfig(), Path({str(tmp_path / 'train.log')!r}), ranks=2)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    child = int(parent.stdout.readline())
    parent.send_signal(getattr(signal, signal_name))
    parent.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the stage outlived the pipeline that started it"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
