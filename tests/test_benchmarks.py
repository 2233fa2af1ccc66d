"""The GPU benchmarks run their own code at toy size on the CPU (``--device cpu``), so they do not
first break on a GPU machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from procs import process_env

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=process_env())


def test_gpu_dit_tiny_on_cpu(tmp_path):
    out = tmp_path / "dit.json"
    proc = _run(["benchmarks/gpu_dit.py", "--device", "cpu", "--tiny", "--compile-backend", "aot_eager",
                 "--tokens", "64", "--batches", "2", "--sample-batches", "2", "--steps", "1", "--warmup", "1",
                 "--modes", "ref-autocast,ours-bf16,ref-bf16", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"ref-autocast", "ours-bf16", "ref-bf16"}
    for r in rows.values():
        assert r["step_s"] > 0 and r["forward_s"] > 0 and r["tokens"] == 64 and r["mfu"] is None
    assert rows["ref-autocast"]["train_speedup_vs_ref"] == 1.0


@pytest.mark.slow  # the dit part of `TOY=1 bash benchmarks/gpu_session.sh`, the dry run to do before a GPU call
def test_gpu_dit_ldm_train_profile_on_cpu(tmp_path):
    """The ``--ldm-train`` part: a real shard folder, `ldm train`'s logged rates and its profile."""
    from data.synth import synth_dataset
    from launch.cli import main as ldm

    synth_dataset(tmp_path / "videos", num=4, frames=8, size=32, fps=8, seed=0)
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "videos"), "--output",
             str(tmp_path / "lat"), "--frames", "8", "--height", "32", "--width", "32"])
    out = tmp_path / "dit.json"
    proc = _run(["benchmarks/gpu_dit.py", "--device", "cpu", "--tiny", "--compile-backend", "none", "--tokens", "64",
                 "--batches", "2", "--sample-batches", "2", "--steps", "1", "--warmup", "1", "--modes", "ref-bf16",
                 "--ldm-train", str(tmp_path / "lat"), "--ldm-train-dit", "dit-debug", "--ldm-train-batch", "2",
                 "--ldm-train-steps", "4", "--ldm-train-profile", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text())["ldm_train"]
    assert "error" not in run, run.get("error")
    assert run["last"]["step"] == 4 and run["last"]["samples_per_s"] > 0
    assert run["profile"]["top"] and any(r["name"].startswith("aten::") for r in run["profile"]["top"])
    assert set(run["profile"]["phases_ms_per_step"]) == {"data", "forward", "sync", "backward", "step", "ema"}
    assert "ms" in proc.stdout and "per step: data " in proc.stdout


def test_gpu_check_debug_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(["benchmarks/gpu_check.py", "--device", "cpu", "--debug", "--skip-pipeline", "--frames", "9",
                 "--size", "32", "--autoencoders", "kl2d-f8c4-debug,mtcvae-c4-debug", "--cudnn-benchmark",
                 "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    uint8, *rows = json.loads(out.read_text())
    assert uint8["part"] == "uint8 clips" and uint8["lookup_bit_identical"] and uint8["ok"]
    assert [r["name"] for r in rows] == ["kl2d-f8c4-debug", "mtcvae-c4-debug"] and all(r["ok"] for r in rows)
    assert all(r["cudnn_benchmark"] for r in rows)
    assert "ok   ae kl2d-f8c4-debug" in proc.stdout


def test_extraction_benchmark_on_cpu():
    """`benchmarks/extraction.py`: decode alone, encode alone and the extraction loop (whole and
    steady) of one autoencoder, as JSON (stdout nothing else: ldm extract's lines, such as its "decoding
    limited" advice, go to stderr), the efficiencies computed from the rates beside them."""
    proc = _run(["benchmarks/extraction.py", "--clips", "4", "--frames", "9", "--size", "32", "--source-size", "48",
                 "--autoencoders", "kl2d-f8c4-debug", "--workers", "-1", "--batch-sizes", "2", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, = json.loads(proc.stdout)
    assert "extracted 4 clips" in proc.stderr
    assert row["source_size"] == 48  # every clip resized from 48x48 videos, as most real videos are
    run, = row["extract"]
    encode = row["encode_clips_per_s"]["2"]
    assert row["decode_clips_per_s"]["-1"] > 0 and encode > 0 and run["fill_s"] > 0
    assert (run["workers"], run["workers_used"]) == (-1, 0)  # ldm extract's auto: no reader processes on the CPU
    assert run["efficiency_vs_encode"] == run["extract_clips_per_s"] / encode
    assert run["steady_efficiency_vs_encode"] == run["steady_clips_per_s"] / encode
    assert run["steady_clips_per_s"] > run["extract_clips_per_s"] > 0
    assert row["compile"] is False and run["compile_s"] is None  # --compile: the encoder compiled, its time
    host, one = row["host"], row["host"]["decode_one_clip"]
    assert 1 <= host["usable_cores"] <= host["cpus"] and one["clips_per_s"] > 0
    assert one["wall_ms"] == pytest.approx(1e3 / one["clips_per_s"]) and one["user_ms"] + one["sys_ms"] > 0


@pytest.mark.slow  # as `TOY=1 bash benchmarks/gpu_session.sh`, the dry run to do before a GPU call
def test_gpu_session_script_runs_the_parts_it_is_given(tmp_path):
    """`benchmarks/gpu_session.sh` at toy size on the CPU (TOY=1), two of its parts (PARTS): their
    files and nothing of the others."""
    env = process_env(TOY="1", OUT=str(tmp_path), PARTS="ae cudnn", PY=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autoencoders-cudnn-benchmark.json", "autoencoders.json"]
    assert all(r["ok"] for r in json.loads((tmp_path / "autoencoders.json").read_text()))
    assert "=== [" in proc.stdout and "done" in proc.stdout


def test_tiling_benchmark_takes_each_models_shortest_clip():
    """``--frames 0`` is 1 + the temporal factor for a causal model (h3ae-8x32x32: 9; it was 5, a traceback)."""
    proc = _run(["benchmarks/tiling.py", "--autoencoders", "h3ae-8x32x32-debug,causal3d-f4x8c4-debug", "--size", "64",
                 "--tiles", "32:0:0", "--device", "cpu", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    assert sorted({(r["autoencoder"], r["frames"]) for r in rows}) == [("causal3d-f4x8c4-debug", 5),
                                                                     ("h3ae-8x32x32-debug", 9)]
