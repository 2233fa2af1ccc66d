"""What survives what: extraction killed with SIGKILL at random points, disk full while writing a
shard, and a suite of corrupt inputs through `ldm extract`."""
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data import shards
from data.manifest import load_manifest
from data.synth import synth_dataset
from data.video import write_frames
from launch.cli import main as ldm
from procs import free_port, one_thread

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--autoencoder", "kl2d-f8c4-debug", "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "2",
        "--batch-size", "2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    synth_dataset(out, num=16, frames=8, size=32, fps=8, seed=0)
    return out


def _complete_tars(folder: Path) -> None:
    """Every shard under its final name reads to the end (no partial shard is ever visible)."""
    for tar in folder.glob("shard-*.tar"):
        with tarfile.open(tar) as tf:
            assert tf.getmembers(), tar


@pytest.mark.dist
def test_extraction_killed_five_times_ends_identical(videos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def cmd(out):  # one clip per shard: many points to be killed at
        return [sys.executable, "-m", "launch.cli", "extract", *ARGS, "--shard-size", "1", "--input", str(videos),
                "--output", str(out)]

    with one_thread(), pytest.warns(UserWarning, match="RANDOM"):  # the reference, in this process
        assert ldm(cmd(tmp_path / "ref")[3:]) == 0
    rng = random.Random(0)
    kills = 0
    for _ in range(5):  # each attempt is killed at a random moment after it finished one more shard
        before = len(list((tmp_path / "run").glob("shard-*.json")))
        proc = subprocess.Popen(cmd(tmp_path / "run"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list((tmp_path / "run").glob("shard-*.json"))) <= before:
            time.sleep(0.005)
        # a short random wait: a shard takes tens of milliseconds now, so a longer one let a run of
        # 16 shards finish before its fifth kill
        time.sleep(rng.uniform(0.0, 0.01))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        _complete_tars(tmp_path / "run")
    assert kills >= 4  # the attempts were cut short
    done = subprocess.run(cmd(tmp_path / "run"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shards.raw_bytes_digest(tmp_path / "run") == shards.raw_bytes_digest(tmp_path / "ref")
    a, b = load_manifest(tmp_path / "run"), load_manifest(tmp_path / "ref")
    assert a == b
    assert not list((tmp_path / "run").glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_to_every_rank_keeps_the_complete_shards_and_exits_143(videos, tmp_path):
    """SLURM's preemption SIGTERMs every rank: each finishes the shard it is writing and exits with
    143, rank 0 says so in one line, and the same command extracts the rest (was: the ranks died
    silently, killed by the signal)."""

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "launch.cli", "extract", *ARGS, "--shard-size", "1", "--input", str(videos),
           "--output", str(tmp_path / "lat")]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    while all(p.poll() is None for p in procs) and len(list((tmp_path / "lat").glob("shard-*.json"))) < 2:
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [143, 143], err0[-2000:] + err1[-2000:]
    said = [line for line in err0.splitlines() if line.startswith("ldm extract: stopped by SIGTERM: ")]
    assert len(said) == 1 and "run the same command to resume" in said[0], err0[-2000:]
    assert "stopped by" not in err1 and "Traceback" not in err0 + err1
    _complete_tars(tmp_path / "lat")
    assert not list((tmp_path / "lat").glob(".*tmp")) and not (tmp_path / "lat" / "manifest.json").exists()
    kept = len(list((tmp_path / "lat").glob("shard-*.json")))  # rank 1 may finish its shard after rank 0 counts
    assert 2 <= int(said[0].split()[5]) <= kept < 16
    ldm(["extract", *ARGS, "--shard-size", "1", "--input", str(videos), "--output", str(tmp_path / "lat")])
    assert load_manifest(tmp_path / "lat").counts.written == 16


# a signal while the main process takes a decoded clip from a worker ("handover": each tensor's file descriptor
# comes through a connection to the worker's resource sharer, opened with a handshake; the 6th one is cut by it),
# or while it forks its first worker ("fork": in the handlers Python runs in the parent after a fork)
_SIGNAL_WHILE_WORKERS_RUN = """
import multiprocessing.connection as mpc
import os, signal, sys
from launch.cli import console
name, where = sys.argv[1:3]
MAIN, answer, calls = os.getpid(), mpc.answer_challenge, [0]
def answer_stopped(connection, authkey):
    if os.getpid() == MAIN:
        calls[0] += 1
        if calls[0] == 6:
            signal.raise_signal(getattr(signal, name))
    return answer(connection, authkey)
def forked():
    calls[0] += 1
    if calls[0] == 1:
        signal.raise_signal(getattr(signal, name))
if where == "handover":
    mpc.answer_challenge = answer_stopped
else:
    os.register_at_fork(after_in_parent=forked)
sys.exit(console(["extract", *sys.argv[3:]]))
"""


@pytest.mark.parametrize("name, where, extra", [
    ("SIGTERM", "handover", ()), ("SIGTERM", "fork", ()),
    pytest.param("SIGINT", "handover", (), marks=pytest.mark.slow),
    pytest.param("SIGTERM", "fork", ("--clip-stride", "8"), marks=pytest.mark.slow)])  # the planning workers
def test_a_stop_with_decoding_workers_exits_without_a_traceback(videos, tmp_path, name, where, extra):
    """A SIGTERM or Ctrl-C that comes while a decoded clip is handed over from a worker, or while a
    worker is forked, stops the extraction with its one line and 143 / 130, the same command finishes
    it, and the shards are those of a run without workers (was: the handover was cut, and the worker
    printed a ConnectionResetError traceback; in a fork, `Exception ignored in` and a traceback)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*ARGS, *extra, "--num-workers", "1", "--input", str(videos), "--output", str(tmp_path / "lat")]
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_WORKERS_RUN, name, where, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    said = "ldm extract: interrupted" if name == "SIGINT" else "ldm extract: stopped by SIGTERM: "
    assert proc.returncode == (130 if name == "SIGINT" else 143) and said in proc.stderr, proc.stderr[-3000:]
    _complete_tars(tmp_path / "lat")
    assert (0 if where == "fork" else 1) <= len(list((tmp_path / "lat").glob("shard-*.json"))) < 8
    ldm(["extract", *args])
    ldm(["extract", *ARGS, *extra, "--num-workers", "0", "--input", str(videos), "--output", str(tmp_path / "ref")])
    assert shards.raw_bytes_digest(tmp_path / "lat") == shards.raw_bytes_digest(tmp_path / "ref")
    assert load_manifest(tmp_path / "lat").counts.written == 16


# a decoding worker that dies at the 11th video: killed by the kernel (as for lack of memory), or by a bug
_WORKER_DIES = """
import os, signal, sys
from torch.utils.data import get_worker_info
from launch import encode_loop
from launch.cli import console
decode = encode_loop._Clips._decode
def dies(self, unit):
    if get_worker_info() is not None and unit[0] == 10:
        if sys.argv[1] == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ZeroDivisionError("a bug in a decoding worker")
    return decode(self, unit)
encode_loop._Clips._decode = dies
sys.exit(console(["extract", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("how", ["killed", "bug"])
def test_a_decoding_worker_that_dies_ends_the_run(videos, tmp_path, how):
    """A decoding worker killed by the kernel (its out-of-memory killer) ends `ldm extract` with one line saying
    what to do, exit status 1; an error raised in a worker (a bug) with its traceback; either way the process
    exits, the complete shards stay and the same command finishes them (was: the traceback, then the process
    never exited: the other worker ignores SIGTERM, and Python's exit waited for it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*ARGS, "--num-workers", "2", "--input", str(videos), "--output", str(tmp_path / "lat")]
    proc = subprocess.run([sys.executable, "-c", _WORKER_DIES, how, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    if how == "killed":
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "ldm extract: error: a reader process (decoding videos or reading shards) died, most often killed" \
            in proc.stderr and "the same command resumes" in proc.stderr, proc.stderr[-3000:]
    else:
        assert "ZeroDivisionError: a bug in a decoding worker" in proc.stderr
        assert "is killed by signal" not in proc.stderr, proc.stderr[-3000:]  # no second traceback at exit
    if (tmp_path / "lat").exists():
        _complete_tars(tmp_path / "lat")
    ldm(["extract", *args])
    ldm(["extract", *ARGS, "--input", str(videos), "--output", str(tmp_path / "ref")])
    assert shards.raw_bytes_digest(tmp_path / "lat") == shards.raw_bytes_digest(tmp_path / "ref")


# planning that takes a while: each video's windows read by the planning workers in 0.1 s
_SLOW_PLANNING = """
import sys, time
from launch import encode_loop
from launch.cli import console
plan = encode_loop._Plans.__getitem__
def slow(self, i):
    time.sleep(0.1)
    return plan(self, i)
encode_loop._Plans.__getitem__ = slow
sys.exit(console(["extract", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_sigterm_to_the_whole_job_step_while_workers_plan(videos, tmp_path):
    """SLURM's preemption SIGTERMs every process of the job step, the planning workers (windows from
    the headers) too: they leave the stop to the main process, which says its one line and exits 143
    (was: a worker killed by the signal, and `DataLoader worker ... is killed by signal` from the
    main process's clean-up)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*ARGS, "--clip-stride", "8", "--num-workers", "1", "--input", str(videos), "--output",
            str(tmp_path / "lat")]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PLANNING, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and not subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).stdout:
        time.sleep(0.02)  # until the planning worker runs: 1.6 s of planning are left
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert "ldm extract: stopped by SIGTERM: 0 complete shard(s)" in err
    ldm(["extract", *args])
    assert load_manifest(tmp_path / "lat").counts.written == 16


_RANK_1_DISK_FULL = """
import errno, os, sys
from data import shards
from launch.cli import console
class DiskFull:
    def __getattr__(self, name):
        return getattr(os, name)
    @staticmethod
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
if os.environ["RANK"] == "1":
    shards.os = DiskFull()
sys.exit(console(["extract", *sys.argv[1:]]))
"""


@pytest.mark.slow
@pytest.mark.dist
def test_a_rank_whose_disk_fills_up_stops_the_others_with_one_line_each(videos, tmp_path):
    """Rank 1 cannot write its shard: it says so; rank 0, waiting for it at the end, says that another
    rank stopped and that its complete shards are kept (was: gloo's `Connection closed by peer`
    traceback)."""

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-c", _RANK_1_DISK_FULL, *ARGS, "--input", str(videos), "--output", str(tmp_path / "lat")]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": "0"}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    assert "No space left on device" in err1 and "Traceback" not in err0 + err1, err0[-2000:] + err1[-2000:]
    assert procs[0].returncode == 2 and "ldm extract: error: another rank of this extraction stopped" in err0
    _complete_tars(tmp_path / "lat")
    assert len(list((tmp_path / "lat").glob("shard-*.tar"))) == 4  # rank 0's: shards 0, 2, 4, 6
    ldm(["extract", *ARGS, "--input", str(videos), "--output", str(tmp_path / "lat")])
    assert load_manifest(tmp_path / "lat").counts.written == 16


def test_disk_full_leaves_no_partial_shard(videos, tmp_path, monkeypatch):
    calls = {"n": 0}

    class DiskFillsUp:  # os as data/shards.py sees it, with the second shard's fsync failing
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fsync(fd):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.fsync(fd)

    monkeypatch.setattr(shards, "os", DiskFillsUp())
    with pytest.raises(OSError, match="writing shard .*shard-000001.tar failed: No space left on device"):
        ldm(["extract", *ARGS, "--input", str(videos), "--output", str(tmp_path / "lat")])
    assert (tmp_path / "lat" / "shard-000000.tar").exists()
    assert not (tmp_path / "lat" / "shard-000001.tar").exists() and not list((tmp_path / "lat").glob(".*tmp"))
    monkeypatch.setattr(shards, "os", os)  # space freed: the same command finishes the job
    ldm(["extract", *ARGS, "--input", str(videos), "--output", str(tmp_path / "lat")])
    assert load_manifest(tmp_path / "lat").counts.written == 16


def test_corrupt_input_suite(videos, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = sorted((videos / "videos").glob("*.mp4"))
    for f in good[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    data = good[3].read_bytes()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (src / "zero.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("this is not a video\n")
    frames = np.zeros((1, 32, 32, 3), np.uint8)
    write_frames(src / "one_frame.mp4", frames, fps=8)
    write_frames(src / "short.mp4", np.zeros((4, 32, 32, 3), np.uint8), fps=8)
    import av  # an audio-only file: no video stream a decoder could read
    with av.open(str(src / "audio_only.mp4"), "w") as c:
        stream = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.rate = 8000
        for packet in stream.encode(frame):
            c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    rows = [{"path": f.name, "caption": f"clip {i}", "class_id": i} for i, f in enumerate(good[:3])]
    rows += [{"path": "missing.mp4", "caption": "gone"}, {"caption": "no path at all"}]
    (src / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ldm(["extract", *ARGS, "--input", str(src), "--captions", str(src / "captions.jsonl"), "--output",
                str(tmp_path / "lat")]) == 0
    m = load_manifest(tmp_path / "lat")
    reasons = {s["key"]: s["reason"] for s in m.skipped}
    assert m.counts.written == 3
    assert set(reasons) == {"truncated", "zero", "text", "one_frame", "short", "audio_only"}
    assert all(reasons.values()) and "short" in reasons["short"] or "frames" in reasons["short"]
    assert m.counts.written + m.counts.skipped == m.counts.inputs == 9
    assert len(m.input_problems) >= 2  # the caption rows naming no existing file


def test_skip_reasons_of_tar_members_name_the_shard_and_member(videos, tmp_path, caplog):
    """A bad video inside a raw tar shard is named ``shard.tar:member`` in the skip line and the
    manifest's skip list, also when a decoding worker read it (was: ``<N bytes>``)."""
    good = sorted((videos / "videos").glob("*.mp4"))[0].read_bytes()
    members = {"clip_0000.mp4": good, "clip_0042.mp4": good[: len(good) // 3], "clip_0043.mp4": b"not a video",
               "clip_0044.mp4": b""}
    with tarfile.open(tmp_path / "shard-00003.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ldm(["extract", *ARGS, "--num-workers", "1", "--input", str(tmp_path / "shard-00003.tar"), "--output",
         str(tmp_path / "lat")])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # put back
    reasons = {s["key"]: s["reason"] for s in load_manifest(tmp_path / "lat").skipped}
    assert set(reasons) == {"clip_0042", "clip_0043", "clip_0044"}
    for key, reason in reasons.items():
        assert f"shard-00003.tar:{key}.mp4" in reason and "bytes>" not in reason, reason
        assert f"skipping {key}: {reason}" in caplog.text
