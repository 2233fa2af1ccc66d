"""`ldm train` with DeepSpeed: loss goes down, resume repeats an uninterrupted run exactly, a corrupt
checkpoint falls back to the previous one, ZeRO-2/3 on 2 ranks, export -> `ldm sample`."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.manifest import load_manifest
from data.synth import synth_dataset
from launch.cli import main as ldm
import dit
from dit import load_export
from launch.train import TrainConfig, check_config, train
from ldm import config as cfglib
from ldm.checkpoint import load_tensors
from ldm.errors import UserError
from procs import free_port, one_process, one_thread, process_env, tail, torchrun

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "launch" / "configs" / "train-debug.yaml"


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    synth_dataset(base / "videos", num=12, frames=8, size=32, fps=8, seed=0)
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(base / "videos"), "--output",
             str(base / "lat"), "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "4",
             "--text-encoder", "builtin"])
    return base / "lat"


def _cfg(latents, out, **over):
    items = [f"data.shards={latents}", f"output={out}", "data.batch_size=4", "data.shuffle=8", "log_every=1",
             "optim.warmup_steps=2", "optim.lr=0.001"] + [f"{k}={v}" for k, v in over.items()]
    return cfglib.load_yaml(YAML, TrainConfig, items)


def _log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def _losses(run):
    return [r["loss"] for r in _log(run) if "loss" in r]


def _val_losses(run):
    return [(r["step"], r["val_loss"]) for r in _log(run) if "val_loss" in r]


def _world_size(run):
    """The world size the run's latest checkpoint was written with."""
    ckpt = Path(run) / "checkpoints"
    return json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer.json").read_text())["world_size"]


def test_resume_repeats_the_uninterrupted_run(latents, tmp_path):
    full = train(_cfg(latents, tmp_path / "full", steps=6, save_every=3))
    assert len(full["losses"]) == 6 and all(map(torch.isfinite, torch.tensor(full["losses"])))
    train(_cfg(latents, tmp_path / "part", steps=4, save_every=4))
    stream = json.loads((tmp_path / "part" / "checkpoints" / "step-00000004" / "trainer.json").read_text())["stream"]
    assert (stream["epoch"], stream["epoch_start"]) == (1, 12)  # 16 of the 12-clip stream read: resumed in epoch 1
    resumed = train(_cfg(latents, tmp_path / "part", steps=6, save_every=3), allow_change=("steps",))
    assert resumed["losses"] == full["losses"][4:]  # exact, not approximately
    assert _losses(tmp_path / "part") == full["losses"]
    model, ctx = load_export(tmp_path / "part")
    ref, _ = load_export(tmp_path / "full")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    assert ctx.autoencoder.name == "kl2d-f8c4-debug" and set(ctx.latent_norm) == {"z"}


def _extract(videos, out, autoencoder="kl2d-f8c4-debug"):
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", autoencoder, "--input", str(videos), "--output", str(out), "--frames", "8",
             "--height", "32", "--width", "32", "--shard-size", "4", "--text-encoder", "builtin"])
    return out


def test_validation_loss_on_held_out_latents(latents, tmp_path):
    """val.shards: the flow loss on held-out clips at fixed timesteps, logged as val_loss at every
    val.every steps; it changes no training step, and a resumed run computes the same values."""
    synth_dataset(tmp_path / "videos", num=4, frames=8, size=32, fps=8, seed=1)
    held = _extract(tmp_path / "videos", tmp_path / "held")
    val = {"val.shards": held, "val.every": 2, "save_every": 2}
    full = train(_cfg(latents, tmp_path / "full", steps=4, **val))
    assert [s for s, _ in full["val_losses"]] == [2, 4] and all(map(math.isfinite, (v for _, v in full["val_losses"])))
    assert _val_losses(tmp_path / "full") == full["val_losses"] and _losses(tmp_path / "full") == full["losses"]
    assert full["val_losses"][0][1] != full["val_losses"][1][1]  # the model changed between them
    # 2 steps without validation, then resumed with it (a harmless change)
    train(_cfg(latents, tmp_path / "part", steps=2, save_every=2))
    train(_cfg(latents, tmp_path / "part", steps=4, **val), allow_change=("steps",))
    assert _losses(tmp_path / "part") == full["losses"]  # validation touched no weight, draw or data position
    assert _val_losses(tmp_path / "part") == full["val_losses"][1:]  # the same clips and draws: exact
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "full" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("val/val_loss")] == [2, 4]
    # mistakes are one line before any work
    for over, message in (({"val.shards": tmp_path / "none"}, "val.shards: .*none not found"),
                          ({"val.clips": 3}, "3 clips .* make no global batch of 4"),
                          ({"val.shards": _extract(tmp_path / "videos", tmp_path / "c16", "kl2d-f8c16-debug")},
                           "another autoencoder .kl2d-f8c16-debug."),
                          ({"data.buckets": True}, "val.shards with data.buckets")):
        with pytest.raises(UserError, match=message):
            train(_cfg(latents, tmp_path / "bad", steps=2, **{**val, **over}))
        assert not (tmp_path / "bad").exists()
    # held-out clips whose class ids name other classes (was: validated on, a loss of wrong labels)
    import shutil
    for folder, names in ((latents, ["Archery", "Basketball"]), (held, ["Basketball", "Archery"])):
        shutil.copytree(folder, tmp_path / "named" / folder.name)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest.update(num_classes=2, class_names=names, class_counts=[])
        (tmp_path / "named" / folder.name / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"val.shards names its classes differently than data.shards \(class id 0: "
                                        r"'Basketball' vs 'Archery'\): .* the same --classes list"):
        train(_cfg(tmp_path / "named" / latents.name, tmp_path / "bad", steps=2,
                   **{**val, "val.shards": tmp_path / "named" / held.name}))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_step_gets_posterior_samples_at_unit_variance(latents, tmp_path, monkeypatch, workers):
    """The reader's batches reach the step as read: z is drawn from the stored posterior and
    standardised with the posterior samples' std, so the DiT sees unit variance, and the zero-output
    DiT at step 1 has loss E|eps - z|^2 = 2 (was: the DataLoader rebuilt each Latent from its parts,
    dropping the logvar: the DiT trained on the means at variance ~0.02, loss ~1.04)."""
    import launch.train_flow as train_flow

    seen, real = [], train_flow.standardized
    monkeypatch.setattr(train_flow, "standardized", lambda latent, *a: seen.append(
        (bool(latent.logvar), real(latent, *a))) or seen[-1][1])
    summary = train(_cfg(latents, tmp_path / "r", steps=1, **{"data.num_workers": workers}))
    assert seen and all(has_logvar for has_logvar, _ in seen)
    z = torch.cat([out.parts["z"] for _, out in seen])
    assert z.var().item() == pytest.approx(1.0, abs=0.15)
    assert summary["losses"][0] == pytest.approx(2.0, abs=0.3)


def test_shard_readers_fit_the_shared_memory(latents, tmp_path, monkeypatch, caplog):
    """``data.num_workers`` readers hand their batches over in shared memory: in a container with
    little of it (Docker's 64 MB /dev/shm, against cached T5 embeddings of ~2 MB a clip) as many run as
    their batches read ahead fit in, and one line says so (was: a reader killed by a bus error); the
    losses are those of the run with the readers asked for (the global stream does not depend on them)."""
    from data import video
    from data.manifest import load_manifest
    from launch.train_data import READER_PREFETCH, batch_bytes

    manifest = load_manifest(latents)
    per_clip = 4 * (2 * 4 * 8 * 4 * 4 + manifest.text_max_length * manifest.text_dim)  # z 4x8x4x4 + logvar, text
    assert manifest.text_dim and batch_bytes(manifest, 4) == 4 * per_clip
    train(_cfg(latents, tmp_path / "ref", steps=3, **{"data.num_workers": 2}))
    one = READER_PREFETCH * batch_bytes(manifest, 4)  # what one reader holds
    monkeypatch.setattr(video, "shared_memory_free", lambda path=video.SHARED_MEMORY: int(2 * 1.5 * one))
    made, real = [], torch.utils.data.DataLoader
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: made.append(k["num_workers"]) or real(*a, **k))
    with caplog.at_level("WARNING", logger="ldm.train"):
        summary = train(_cfg(latents, tmp_path / "r", steps=3, **{"data.num_workers": 2}))
    assert made[0] == 1  # half the free shared memory holds one reader's batches, not two
    said = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(said) == 1 and "shard readers hand latent batches over in: 1 worker(s) instead of 2" in said[0]
    assert summary["losses"] == _losses(tmp_path / "ref")


def test_profiled_phases_on_a_gpu_are_device_time_from_cuda_events(tmp_path, monkeypatch):
    """The GPU branch of `StepProfiler.phase`, with stand-ins for CUDA events and the profiler: each
    phase is the device time from its start event to its end event (``elapsed_time``, ms), summed
    over its micro-batches and averaged over the window's steps; the device is synchronised once,
    when the window is written; steps outside the window record nothing."""
    import contextlib

    from launch import runs

    clock, synced = [0.0], []

    class Event:  # the device's clock: each record() reads it
        def __init__(self, enable_timing: bool):
            assert enable_timing

        def record(self):
            self.at = clock[0]

        def elapsed_time(self, end):
            return end.at - self.at

    class Profile:  # torch.profiler.profile: on_trace_ready when the window's last step ends
        def __init__(self, activities, on_trace_ready, schedule):
            self.ready, self.schedule, self.n = on_trace_ready, schedule, 0

        def start(self):
            pass

        def step(self):
            self.n += 1
            if self.n == 4:  # wait 1 + warm-up 1 + active 2 steps: the window ends with step 4
                self.ready(self)

        def export_chrome_trace(self, path):
            Path(path).write_text("{}")

        def key_averages(self):
            return Averages()

    class Averages(list):
        def table(self, sort_by, row_limit):
            return ""

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(clock[0]))
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.profiler, "record_function", lambda name: contextlib.nullcontext())
    prof = runs.StepProfiler(runs.ProfileConfig(start=2, steps=2), tmp_path, 0, first_step=0, cuda=True)
    for step in range(4):
        for micro in range(2):  # two micro-batches: 1 + 2 ms of forward each, outside the window too
            with prof.phase("forward"):
                clock[0] += 1.0 + step
        with prof.phase("ema"):
            clock[0] += 0.5
        prof.step()
    out = json.loads((tmp_path / "ops-rank0.json").read_text())
    # steps 3 and 4 (index 2, 3): forward 2 x 3 ms and 2 x 4 ms -> 7 ms per step; ema 0.5
    assert out["phases_ms_per_step"] == {"forward": 7.0, "ema": 0.5}
    assert len(synced) == 1 and "on the device" in (tmp_path / "ops-rank0.txt").read_text()


def test_profile_window_writes_a_trace_the_top_operators_and_the_phases(latents, tmp_path, monkeypatch):
    import launch.train as train_mod

    slow_ema, real_update = 0.03, train_mod.EMA.update  # a phase whose time is known: EMA + 30 ms
    monkeypatch.setattr(train_mod.EMA, "update", lambda self, m: (time.sleep(slow_ema), real_update(self, m)))
    train(_cfg(latents, tmp_path / "r", steps=5, **{"profile.start": 2, "profile.steps": 2}))
    prof = tmp_path / "r" / "profile"
    top = json.loads((prof / "ops-rank0.json").read_text())
    assert top["sorted_by"] == "self_cpu_time_total" and any(r["name"].startswith("aten::") for r in top["top"])
    assert 0.99 <= sum(r["share"] for r in top["top"]) or len(top["top"]) == 40
    assert top["steps_wall_us"] > 0 and top["device_busy_share"] is None  # the GPU's busy share: on a GPU
    trace = json.loads((prof / "trace-rank0.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2  # the window's steps (the step before them was the discarded warm-up)
    # where a step goes: each part of it per profiled step (wall time on the CPU), in the step's order,
    # together within the steps' wall time; the slowed EMA takes its 30 ms per step, not twice that
    phases, order = top["phases_ms_per_step"], ["data", "forward", "sync", "backward", "step", "ema"]
    assert sorted(phases) == sorted(order)
    assert all(ms > 0 for ms in phases.values())
    assert sum(phases.values()) <= top["steps_wall_us"] / 1e3 / 2
    assert 1e3 * slow_ema <= phases["ema"] < 1.5e3 * slow_ema
    spans = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("phase.")}
    assert spans == {f"phase.{name}" for name in phases}  # each a span in the trace too
    text = (prof / "ops-rank0.txt").read_text()
    assert "aten::" in text and [line.split()[1] for line in text.splitlines()[:6]] == order
    with pytest.raises(UserError, match="profile.steps"):
        train(_cfg(latents, tmp_path / "bad", **{"profile.steps": -1}))


def test_profile_top_rows_on_a_gpu_count_each_kernel_once():
    """A CUDA profile lists a CPU operator with the device time of the kernels it launched, the
    kernels themselves, and user annotations spanning them: the shares count the device's own
    events alone, so they add up to its busy time (was: operators and kernels both, ~2x; the H100
    profile of `ldm train` summed to 200 %)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from launch.runs import top_rows

    def ev(name, device, us, annotation=False):
        return SimpleNamespace(key=name, count=1, device_type=device, is_user_annotation=annotation,
                               self_device_time_total=us, self_cpu_time_total=1.0)

    events = [ev("ProfilerStep#3", DeviceType.CPU, 0.0), ev("aten::mm", DeviceType.CPU, 300.0),
              ev("nvjet_gemm_kernel", DeviceType.CUDA, 300.0),
              ev("aten::_cudnn_attention_backward", DeviceType.CPU, 600.0),
              ev("cudnn_sdpa_bprop_kernel", DeviceType.CUDA, 600.0), ev("Memcpy DtoD", DeviceType.CUDA, 100.0),
              ev("Optimizer.step#AdamW.step", DeviceType.CUDA, 100.0, annotation=True),
              ev("phase.backward", DeviceType.CPU, 0.0, annotation=True)]
    total, top = top_rows(events, "self_device_time_total", 40)
    assert total == 1000.0 and [r["name"] for r in top] == ["cudnn_sdpa_bprop_kernel", "nvjet_gemm_kernel",
                                                            "Memcpy DtoD"]
    assert [r["share"] for r in top] == [0.6, 0.3, 0.1]
    total, top = top_rows(events, "self_cpu_time_total", 40)  # on the CPU: every operator but the step's and
    assert total == 6.0 and len(top) == 6  # the phases' spans (`StepProfiler.phase`: reported apart)


def test_train_process_destroys_its_process_group_at_exit_and_loads_no_compiler_it_does_not_use(latents, tmp_path):
    """The group ``ldm train`` made is destroyed at interpreter exit, before the communicators'
    own teardown (where NCCL reports a never-destroyed group after the last step); not earlier,
    so an in-process caller can train again. An exit handler registered before training runs
    after ours (they run last-in first-out) and sees the group gone.
    The same run without ``model.compile`` loads no inductor: DeepSpeed's optimizers import its
    Muon module, which compiles functions at import (~3 CPU-s per rank), and `ldm train` imports
    it with compilation off; the user's ``TORCHDYNAMO_DISABLE`` is as it was and ``torch.compile``
    still compiles."""
    script = (
        "import atexit, json, os, sys, torch, torch.distributed as d\n"
        "atexit.register(lambda: print('group after exit handlers:', 'alive' if d.is_initialized() else 'destroyed'))\n"
        "from launch.cli import main\n"
        f"rc = main(['train', '--config', {str(YAML)!r}, 'data.shards={latents}', "
        f"'output={tmp_path / 'r'}', 'steps=1', 'data.batch_size=4'])\n"
        "fn = lambda x: x * 2\n"
        "print(json.dumps({'inductor': 'torch._inductor.compile_fx' in sys.modules, "
        "'muon': 'deepspeed.runtime.zero.muon.original_muon' in sys.modules, "
        "'env': os.environ.get('TORCHDYNAMO_DISABLE'), 'compiles': torch.compile(fn, backend='eager') is not fn}))\n"
        "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=process_env(TORCHDYNAMO_DISABLE="0"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tail(proc.stderr, 2000)
    assert "group after exit handlers: destroyed" in proc.stdout, tail(proc.stdout, 2000)
    checks = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert checks == {"inductor": False, "muon": True, "env": "0", "compiles": True}


def test_reader_workers_forked_or_spawned_change_no_loss(latents, tmp_path):
    """``data.num_workers``: shard reader processes, forked (CPU) or spawned (as on CUDA, here
    forced), give the same losses as reading in the prefetch thread, and the run ends."""
    ref = _losses_of(train(_cfg(latents, tmp_path / "w0", steps=4, save_every=4)))
    forked = _losses_of(train(_cfg(latents, tmp_path / "fork", steps=4, save_every=4, **{"data.num_workers": 2})))
    script = (
        "import sys\n"
        "import launch.train as T\n"
        "T.reader_start = lambda workers, device: 'spawn' if workers else None\n"
        "from launch.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(YAML)!r}, 'data.shards={latents}', 'output={tmp_path / 'spawn'}', "
        "'data.batch_size=4', 'data.shuffle=8', 'log_every=1', 'optim.warmup_steps=2', 'optim.lr=0.001', "
        "'steps=4', 'save_every=4', 'data.num_workers=2']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=process_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, tail(proc.stderr, 2000)
    assert ref == forked == _losses(tmp_path / "spawn") and len(ref) == 4


def _losses_of(summary):
    return _losses(summary["output"])


def test_train_never_synchronizes_the_device(latents, tmp_path, monkeypatch):
    """No explicit device synchronize in a training run: DeepSpeed's throughput timer (which
    synchronizes at every forward and step) is off unless a DeepSpeed JSON turns it on."""
    from deepspeed.accelerator import get_accelerator

    acc, calls = get_accelerator(), []
    real = acc.synchronize
    monkeypatch.setattr(acc, "synchronize", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(_cfg(latents, tmp_path / "r", steps=5, save_every=10))
    assert calls == []
    own = tmp_path / "timed.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "timers": {"throughput": {"enabled": True}}}))
    train(_cfg(latents, tmp_path / "t", steps=5, save_every=10, **{"engine.deepspeed": str(own)}))
    assert len(calls) == 2 * (5 - 2)  # the user's timer: start and stop of every step after its first two


def test_the_training_loop_reads_one_value_per_micro_batch(latents, tmp_path, monkeypatch):
    """Between log steps our code reads exactly one value from the device per micro-batch (the
    non-finite-loss guard: backward must not start on a bad loss); a value read on the host waits
    for the GPU. Counted on the main thread (the prefetch thread works on host tensors), in steps
    3-5 of a run that logs and saves only at its end; DeepSpeed's own reads are not ours to count."""
    import threading
    import traceback
    from collections import Counter

    from launch import runs

    ours, active = Counter(), [False]
    roots = ("/launch/", "/ldm/", "/dit/", "/data/", "/autoencoders/")

    def caller() -> str | None:
        for f in reversed(traceback.extract_stack()[:-2]):
            if "site-packages" in f.filename:
                return None  # a library's read (DeepSpeed's overflow and norm checks)
            if any(r in f.filename for r in roots):
                return f"{Path(f.filename).name}:{f.lineno}"
        return None

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
        def counting(*a, _real=getattr(torch.Tensor, name), **k):
            if active[0] and threading.current_thread() is threading.main_thread():
                where = caller()
                if where:
                    ours[where] += 1
            return _real(*a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)
    real_step, steps = runs.StepProfiler.step, [0]

    def step(self):
        steps[0] += 1
        active[0] = 2 <= steps[0] < 5  # from after step 2 to after step 5: steps 3, 4, 5
        return real_step(self)

    monkeypatch.setattr(runs.StepProfiler, "step", step)
    for accum in (1, 2):
        ours.clear()
        steps[0] = 0
        train(_cfg(latents, tmp_path / f"a{accum}", steps=6, log_every=100, save_every=100,
                   **{"optim.grad_accum": accum}))
        assert sum(ours.values()) == 3 * accum and len(ours) == 1, dict(ours)


def test_deepspeed_config_and_its_slow_settings():
    from launch.engine import EngineConfig, deepspeed_config, slow_engine_warning

    for stage, precision, slow in (("zero0", "bf16", True), ("zero0", "fp32", False), ("zero1", "bf16", False),
                                   ("zero2", "bf16", False)):
        ds = deepspeed_config(EngineConfig(deepspeed=stage, precision=precision), 4, 1, 1.0)
        assert ds["timers"] == {"throughput": {"enabled": False}}
        assert (slow_engine_warning(ds, stage) is not None) == slow
    assert "a device sync per parameter tensor" in slow_engine_warning(
        deepspeed_config(EngineConfig(deepspeed="zero0", precision="bf16"), 4, 1, 1.0), "zero0")


class _NanGrad(torch.autograd.Function):
    """The identity whose backward gives NaN: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("stage,precision,max_norm", [("zero2", "bf16", 0.01), ("zero1", "bf16", 0.01),
                                                      ("zero2", "fp32", 0.01), ("zero2", "bf16", 0.0)])
def test_zero_clips_and_skips_a_nonfinite_step_on_the_device(stage, precision, max_norm):
    """ZeRO-1/2: the gradient norm, gradient clipping and the skip of a step with a non-finite norm
    are done on the device (`DeviceClip`: one norm of the flat gradient partition, then fused AdamW's
    grad_scale / found_inf), not by DeepSpeed, whose step reads the norm on the host up to three
    times and takes it one parameter tensor at a time. The bf16 step reads nothing on the host and
    has no per-tensor norm; the norm is torch's ``clip_grad_norm_``'s and so is the clipped update
    (AdamW's first moment after one step is 0.1 x the clipped gradient); a NaN gradient leaves
    weights, moments and AdamW's step count as they were (also with clipping off, optim.grad_clip=0)."""
    import copy

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from launch.engine import DeviceClip, EngineConfig, clips_on_device, deepspeed_config, skip_cpu_shm_kernel
    from launch.train import _single_process_group
    from offdevice import HostReads

    _single_process_group()
    skip_cpu_shm_kernel()
    ds = deepspeed_config(EngineConfig(deepspeed=stage, precision=precision), 2, 1, max_norm)
    assert clips_on_device(ds) and ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["compute_grad_norm"] is False
    assert ds["bf16"] == ({"enabled": True, "check_grad_overflow": False} if precision == "bf16" else {"enabled": False})
    for other in ("zero0", "zero3"):  # DeepSpeed clips there itself
        assert deepspeed_config(EngineConfig(deepspeed=other, precision=precision), 2, 1, max_norm)[
            "gradient_clipping"] == max_norm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    ref = copy.deepcopy(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                                      config=ds, dist_init_required=False)
    clip = DeviceClip(engine, max_norm)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tol = dict(rtol=5e-2, atol=1e-4) if precision == "bf16" else dict(rtol=1e-5, atol=1e-7)
    names = [n for n, _ in model.named_parameters()]
    for step in range(3):
        x = torch.randn(4, 8)
        loss = engine(x.to(dtype)).float().pow(2).mean()
        engine.backward(_NanGrad.apply(loss) if step == 1 else loss)
        reads = HostReads()
        with reads:
            engine.step()
        skipped = clip.take()
        assert reads.ops["_foreach_norm"] == 1 and reads.ops["linalg_vector_norm"] == 0  # not one per tensor
        if precision == "bf16":
            assert reads.n == 0  # the step never waits for the device
            assert float(skipped) == float(step == 1)
        if step != 1:
            ref(x).pow(2).mean().backward()
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm or math.inf)
            torch.testing.assert_close(clip.norm, norm, **tol)
            assert not max_norm or norm > 5 * max_norm  # the clip matters
            ref_opt.step()
            ref_opt.zero_grad()
        for name, p, q in zip(names, engine.module.parameters(), ref.parameters()):
            torch.testing.assert_close(safe_get_full_fp32_param(p), q.detach(), **tol, msg=name)
            torch.testing.assert_close(safe_get_full_optimizer_state(p, "exp_avg"), ref_opt.state[q]["exp_avg"],
                                       **tol, msg=name)
    steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    assert steps == {2.0}  # the skipped step not counted (bias correction as if it never happened)


def test_a_checkpoint_written_with_deepspeeds_clipping_resumes_with_the_runs_clipping(tmp_path):
    """A ZeRO-2 checkpoint written while DeepSpeed clipped (``gradient_clipping`` 1.0, its own norm:
    runs before `DeviceClip`) loads into a run that clips on the device: loading it alone puts
    DeepSpeed's clipping back (a second clip on top of DeviceClip's) or, with ``compute_grad_norm:
    false``, refuses the checkpoint; `run_clipping_kept` loads it with this run's clipping."""
    import deepspeed
    from launch.engine import (DeviceClip, EngineConfig, deepspeed_config, run_clipping_kept, safe_checkpoint_engine,
                               skip_cpu_shm_kernel)
    from launch.train import _single_process_group

    _single_process_group()
    skip_cpu_shm_kernel()

    def engine(ds):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        e, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                                     config=ds, dist_init_required=False)
        e.checkpoint_engine = safe_checkpoint_engine(e._config)
        return e

    new = deepspeed_config(EngineConfig(deepspeed="zero2", precision="bf16"), 2, 1, 1.0)
    old = {**new, "gradient_clipping": 1.0,
           "zero_optimization": {**new["zero_optimization"], "compute_grad_norm": True}}
    written = engine(old)
    written.backward(written(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).mean())
    written.step()
    written.save_checkpoint(str(tmp_path), tag="s1")
    resumed = engine(new)
    DeviceClip(resumed, 1.0)
    with pytest.raises(ValueError, match="gradient clipping"):
        resumed.load_checkpoint(str(tmp_path), tag="s1")
    with run_clipping_kept(resumed):
        path, _ = resumed.load_checkpoint(str(tmp_path), tag="s1")
    assert path is not None and resumed.optimizer.clip_grad == 0.0 and resumed.optimizer.compute_grad_norm is False
    for p, q in zip(resumed.module.parameters(), written.module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetcher_keeps_order_and_raises_errors_at_their_item(depth):
    """The training loop's reader thread: items in order, made ``depth`` ahead (inline at 0); an error
    while making item i (a corrupt shard, a bad caption) is raised by the i-th ``next``, not lost
    in the thread and not a hang; ``close`` stops the thread."""
    from launch.train_data import Prefetcher

    def make(i):
        if i == 3:
            raise ValueError("bad sample 3")
        return i * 10

    made = []
    source = (made.append(i) or i for i in range(100))
    inputs = Prefetcher(source, make, depth, pin=False)
    assert [next(inputs) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(ValueError, match="bad sample 3"):
        next(inputs)
    inputs.close()
    assert len(made) <= 4 + depth  # reads at most `depth` ahead, and stops at the error
    if depth:
        assert not inputs.thread.is_alive()
        slow = Prefetcher(iter(range(10 ** 6)), lambda i: i, depth, pin=False)
        assert next(slow) == 0
        slow.close()  # a full queue does not keep the thread alive
        assert not slow.thread.is_alive()


def test_deepspeed_settings_from_accelerates_environment(monkeypatch, tmp_path):
    """`accelerate launch` passes its DeepSpeed plugin in the environment: a config file, or a ZeRO
    stage with offload devices; its mixed precision must agree with engine.precision."""
    from launch.engine import EngineConfig, deepspeed_config

    cfg = EngineConfig(deepspeed="accelerate", precision="bf16")
    with pytest.raises(ValueError, match="needs `accelerate launch`"):
        deepspeed_config(cfg, 4, 1, 1.0)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    ds = deepspeed_config(cfg, 4, 2, 1.0)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["bf16"]["enabled"] and ds["gradient_accumulation_steps"] == 2
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="mixed precision 'fp16'"):
        deepspeed_config(cfg, 4, 1, 1.0)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    ds = deepspeed_config(cfg, 4, 1, 1.0)  # the file wins over the stage variables; "auto" keys are ours
    assert ds["zero_optimization"] == {"stage": 1, "compute_grad_norm": False}  # the norm: DeviceClip's
    assert ds["train_micro_batch_size_per_gpu"] == 4


def test_corrupt_checkpoint_falls_back(latents, tmp_path):
    train(_cfg(latents, tmp_path / "r", steps=4, save_every=2))
    newest = tmp_path / "r" / "checkpoints" / "step-00000004"
    for f in newest.glob("*optim_states.pt"):
        f.write_bytes(b"garbage")
    out = train(_cfg(latents, tmp_path / "r", steps=5, save_every=5), allow_change=("steps",))
    assert len(out["losses"]) == 3  # resumed from step 2, not 4


def test_checkpoints_of_earlier_versions_resume_and_all_rejected_stops(latents, tmp_path):
    train(_cfg(latents, tmp_path / "old", steps=2, save_every=2))
    step = tmp_path / "old" / "checkpoints" / "step-00000002"
    (step / "trainer.json").rename(step / "complete.json")  # the layout before launch/runs.py: no manifest
    (step / "MANIFEST.json").unlink()
    assert len(train(_cfg(latents, tmp_path / "old", steps=3, save_every=3), allow_change=("steps",))["losses"]) == 1  # resumed at 2
    train(_cfg(latents, tmp_path / "bad", steps=2, save_every=2))
    (tmp_path / "bad" / "checkpoints" / "step-00000002" / "ema.safetensors").write_bytes(b"garbage")
    # not a silent start from step 0; one line, no traceback
    with pytest.raises(UserError, match="no usable checkpoint"):
        train(_cfg(latents, tmp_path / "bad", steps=3, save_every=3), allow_change=("steps",))


def test_loss_decreases(latents, tmp_path):
    # posterior means: a random-weight AE has a wide posterior whose samples are mostly unlearnable noise
    out = train(_cfg(latents, tmp_path / "r", steps=60, save_every=60,
                     **{"flow.cond_dropout": 0.0, "data.sample_posterior": "false"}))
    first, last = sum(out["losses"][:10]) / 10, sum(out["losses"][-10:]) / 10
    assert last < 0.9 * first, (first, last)
    logged = [r for r in _log(tmp_path / "r") if "loss" in r]
    assert logged and all(r["peak_memory_gib"] is None and r["mfu"] is None for r in logged)  # no GPU figures


def test_logged_peak_memory_is_the_allocators_peak_on_the_run_device(monkeypatch):
    from launch.runs import peak_memory_gib

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * 2 ** 29)
    assert peak_memory_gib(torch.device("cuda", 1)) == 1.5 and asked == [torch.device("cuda", 1)]
    assert peak_memory_gib(torch.device("cpu")) is None and len(asked) == 1


def test_config_errors(latents, tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        _cfg(latents, tmp_path, bogus=1)
    with pytest.raises(ValueError, match="unknown key"):
        _cfg(latents, tmp_path, **{"optim.lrr": 1})
    with pytest.raises(FileNotFoundError, match="DeepSpeed config"):
        train(_cfg(latents, tmp_path / "x", **{"engine.deepspeed": "zero9"}))
    cut = tmp_path / "cut.json"
    cut.write_text('{"zero_optimization": {"stage": 2,')  # a file cut short
    with pytest.raises(ValueError, match=f"DeepSpeed config {cut} is not valid JSON"):
        train(_cfg(latents, tmp_path / "y", **{"engine.deepspeed": str(cut)}))
    cut.write_text("[2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        train(_cfg(latents, tmp_path / "z", **{"engine.deepspeed": str(cut)}))


def test_sample_cli_writes_videos(latents, tmp_path):
    train(_cfg(latents, tmp_path / "r", steps=2, save_every=2, **{"flow.shift": 3.0}))
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--prompt", "a red circle moving left",
             "--prompt", "a blue square moving up", "--steps", "3", "--output", str(tmp_path / "s")])
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [x["prompt"] for x in index] == ["a red circle moving left", "a blue square moving up"]
    for x in index:
        assert (tmp_path / "s" / x["file"]).stat().st_size > 0
        assert (tmp_path / "s" / x["file"].replace(".mp4", ".gif")).exists()
    assert (tmp_path / "s" / "grid.png").exists()
    ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--class", "2", "--steps", "2", "--output", str(tmp_path / "c")])
    first = json.loads((tmp_path / "c" / "index.json").read_text())[0]
    assert first["frames"] == 8 and first["shift"] == 3.0  # the training clips' length, the training's shift
    assert (first["dtype"], first["tile"], first["chunk_frames"]) == ("fp32", None, None)
    ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--class", "2", "--steps", "2", "--dtype", "bf16", "--tile",
         "16:8", "--output", str(tmp_path / "knobs")])  # settings that change the video are recorded
    first = json.loads((tmp_path / "knobs" / "index.json").read_text())[0]
    assert (first["dtype"], first["tile"], first["chunk_frames"]) == ("bf16", "16:8", None)
    assert first["guidance_interval"] == [0.0, 1.0]
    ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--class", "2", "--steps", "2", "--guidance-interval",
         "0.2:0.8", "--output", str(tmp_path / "interval")])
    assert json.loads((tmp_path / "interval" / "index.json").read_text())[0]["guidance_interval"] == [0.2, 0.8]
    for bad, message in (("0.8", "give LO:HI"), ("0.9:0.1", "guidance interval needs 0 <= lo < hi <= 1")):
        with pytest.raises(UserError, match=message):
            ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--class", "2", "--guidance-interval", bad,
                 "--output", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    from PIL import Image
    import launch.sample
    launch.sample.GRID_VIDEOS, grid_videos = 2, launch.sample.GRID_VIDEOS  # the grid shows the run's first videos
    try:
        ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--class", "1", "--class", "2", "--class", "3", "--steps",
             "1", "--batch-size", "2", "--output", str(tmp_path / "g")])
    finally:
        launch.sample.GRID_VIDEOS = grid_videos
    assert len(json.loads((tmp_path / "g" / "index.json").read_text())) == 3
    assert Image.open(tmp_path / "g" / "grid.png").height == 2 * 32
    # a DiT conditioned on class and text samples with both: one class for every prompt, or one per prompt
    both = ["sample", "--checkpoint", str(tmp_path / "r"), "--prompt", "a red circle", "--prompt", "a blue square",
            "--steps", "1"]
    real, calls = launch.sample.generate, []
    launch.sample.generate = lambda *a, **k: calls.append((k["prompts"], k["class_ids"])) or real(*a, **k)
    try:
        ldm(both + ["--class", "3", "--output", str(tmp_path / "both")])
        ldm(both + ["--class", "3", "--class", "5", "--output", str(tmp_path / "pairs")])
        ldm(both + ["--output", str(tmp_path / "text")])
    finally:
        launch.sample.generate = real
    prompts = ["a red circle", "a blue square"]
    assert calls == [(prompts, [3, 3]), (prompts, [3, 5]), (prompts, None)]  # what reaches the DiT's condition
    index = {k: json.loads((tmp_path / k / "index.json").read_text()) for k in ("both", "pairs", "text")}
    assert [(x["prompt"], x["class_id"]) for x in index["both"]] == [("a red circle", 3), ("a blue square", 3)]
    assert [x["class_id"] for x in index["pairs"]] == [3, 5] and [x["class_id"] for x in index["text"]] == [None] * 2
    with pytest.raises(UserError, match="3 --class for 2 prompts"):
        ldm(both + ["--class", "1", "--class", "2", "--class", "3", "--output", str(tmp_path / "x")])
    with pytest.raises(UserError, match="give what to sample"):
        ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    for flag in ("--frames", "--num-frames"):  # --frames as on every verb; --num-frames its older name
        ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--class", "2", "--steps", "2", flag, "4",
             "--shift", "1.5", "--output", str(tmp_path / flag[2:])])
        first = json.loads((tmp_path / flag[2:] / "index.json").read_text())[0]
        assert first["frames"] == 4 and first["shift"] == 1.5


@pytest.mark.dist
def test_sample_on_two_ranks_splits_the_batches_and_writes_what_one_process_does(latents, tmp_path):
    """`torchrun ... ldm sample`: each rank samples every other batch into the one folder; videos,
    grid and index.json are byte-identical to one process's, --append included (was: every rank
    sampled everything, and one died on the folder the other had filled)."""
    train(_cfg(latents, tmp_path / "r", steps=1, save_every=1))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for out, nproc in [("one", 1), ("two", 2)]:
        for extra in ([], ["--append", "--seed", "5"]):  # 3 batches (one rank idle in the last round), then 2
            args = ["sample", "--checkpoint", str(tmp_path / "r"), "--class", "1", "--class", "2", "--class", "3",
                    "--num-per-prompt", "2" if not extra else "1", "--batch-size", "2", "--steps", "2",
                    "--output", str(tmp_path / out), *extra]
            if nproc == 1:  # in this process, at the ranks' one thread (float sums depend on the thread count)
                with one_thread(), pytest.warns(UserWarning, match="RANDOM"):
                    ldm(args)
                continue
            r = subprocess.run(torchrun(nproc, *args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, tail(r.stderr, 4000)
            assert r.stdout.count("wrote ") == 1, r.stdout  # rank 0 reports
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 2 * 9 + 3  # mp4 + gif each, 2 grids, index
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    assert [x["class_id"] for x in index] == [1, 1, 2, 2, 3, 3, 1, 2, 3]
    assert [x["seed"] for x in index] == [0, 1, 2, 3, 4, 5, 11, 12, 13]  # each video's own seed


def test_model_init_starts_from_a_trained_dit_and_a_resume_from_its_checkpoint(latents, tmp_path):
    """``model.init=RUN``: a new run starts from RUN's EMA weights (with ema_decay 1 its EMA never
    moves, so its export is RUN's exactly); resumed, it continues from its own checkpoint and no
    longer needs RUN; a DiT of another size, or a folder that is no DiT, is one line before any work."""
    from safetensors.torch import load_file
    train(_cfg(latents, tmp_path / "a", steps=2, save_every=2))
    train(_cfg(latents, tmp_path / "b", steps=1, save_every=1, ema_decay=1.0, **{"model.init": tmp_path / "a"}))
    a, b = (load_file(tmp_path / r / "export" / "model.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(_cfg(latents, tmp_path / "b").seed)  # b's weights without model.init, as the trainer seeds
    fresh = dit.VideoDiT(load_export(tmp_path / "a")[0].config).state_dict()
    assert not all(torch.equal(fresh[k], b[k]) for k in b)
    (tmp_path / "a").rename(tmp_path / "a-moved")  # a resumed run does not read model.init again
    train(_cfg(latents, tmp_path / "b", steps=2, save_every=1, ema_decay=1.0, **{"model.init": tmp_path / "a"}),
          allow_change=("steps",))
    assert _losses(tmp_path / "b")[-1] > 0
    with pytest.raises(UserError, match=r"model.init=.* is another DiT than this run's: .*model.overrides"):
        train(_cfg(latents, tmp_path / "c", steps=1, **{"model.init": tmp_path / "a-moved",
                                                        "model.overrides": '{"hidden": 96}'}))
    with pytest.raises(UserError, match=r"model.init .* not found"):
        train(_cfg(latents, tmp_path / "c", steps=1, **{"model.init": tmp_path / "a"}))
    (tmp_path / "a-moved" / "export" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"model.init=.*model.safetensors cannot be read"):
        train(_cfg(latents, tmp_path / "c", steps=1, **{"model.init": tmp_path / "a-moved"}))
    with pytest.raises(UserError, match=r"model.init .*videos is not a `ldm train` run folder or export"):
        train(_cfg(latents, tmp_path / "c", steps=1, **{"model.init": latents.parent / "videos"}))
    assert not (tmp_path / "c").exists()


def test_any_kept_checkpoint_samples_and_starts_a_run(latents, tmp_path):
    """``--checkpoint RUN/checkpoints/step-N`` samples that step's EMA weights (the newest one
    gives the run's export/ videos byte for byte), and ``model.init`` takes it too."""
    from safetensors.torch import load_file
    train(_cfg(latents, tmp_path / "r", steps=2, save_every=1, keep_checkpoints=2))
    videos = {}
    for name, path in (("run", tmp_path / "r"), ("step2", tmp_path / "r" / "checkpoints" / "step-00000002"),
                       ("step1", tmp_path / "r" / "checkpoints" / "step-00000001")):
        assert ldm(["sample", "--checkpoint", str(path), "--class", "2", "--steps", "2",
                    "--output", str(tmp_path / name)]) == 0
        videos[name] = (tmp_path / name / "0000.mp4").read_bytes()
    assert videos["step2"] == videos["run"] and videos["step1"] != videos["run"]
    step1 = tmp_path / "r" / "checkpoints" / "step-00000001"
    train(_cfg(latents, tmp_path / "b", steps=1, save_every=1, ema_decay=1.0, **{"model.init": step1}))
    a, b = load_file(step1 / "ema.safetensors"), load_file(tmp_path / "b" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="not a `ldm train` run folder or export"):
        ldm(["sample", "--checkpoint", str(tmp_path / "r" / "checkpoints"), "--class", "2", "--output",
             str(tmp_path / "x")])


def test_negative_prompt_replaces_the_null_text_of_guidance(latents, tmp_path):
    """``--negative-prompt``: CFG's unconditional branch reads its embedding, so a negative prompt
    equal to the prompt cancels guidance (v_neg + w (v_c - v_neg) = v_c: the guidance-1 sample),
    and another one changes the sample; it needs prompts and guidance > 1 (one line otherwise)."""
    import autoencoders
    from dits import randomize
    from launch.sample import sample_latents
    from ldm.samplers import SamplingConfig
    from ldm.text import build_text_encoder

    text = build_text_encoder("builtin")
    ae = autoencoders.build("kl2d-f8c4-debug")
    torch.manual_seed(0)
    model = randomize(dit.build("dit-debug", ae.latent_spec(4, 16, 16), text_dim=text.dim)).eval()  # not zero-init
    kw = dict(prompts=["a red circle moving left"], frames=4, height=16, width=16, text_encoder=text, progress=False)
    plain, _ = sample_latents(model, ae, {}, sampling=SamplingConfig(steps=2, guidance=1.0), **kw)
    cancelled, _ = sample_latents(model, ae, {}, sampling=SamplingConfig(steps=2, guidance=4.0),
                                  negative_prompt="a red circle moving left", **kw)
    guided, _ = sample_latents(model, ae, {}, sampling=SamplingConfig(steps=2, guidance=4.0), **kw)
    other, _ = sample_latents(model, ae, {}, sampling=SamplingConfig(steps=2, guidance=4.0),
                              negative_prompt="a blue square", **kw)
    assert torch.allclose(cancelled["z"], plain["z"], atol=1e-5)
    assert (other["z"] - guided["z"]).abs().max() > 1e-3 and (cancelled["z"] - guided["z"]).abs().max() > 1e-3
    train(_cfg(latents, tmp_path / "r", steps=1, save_every=1))
    base = ["sample", "--checkpoint", str(tmp_path / "r"), "--steps", "1", "--output", str(tmp_path / "s")]
    with pytest.raises(UserError, match="--negative-prompt goes with --prompt"):
        ldm([*base, "--class", "1", "--negative-prompt", "blurry"])
    with pytest.raises(UserError, match="give --guidance > 1"):
        ldm([*base, "--prompt", "a red circle", "--guidance", "1", "--negative-prompt", "blurry"])
    with pytest.warns(UserWarning, match="RANDOM"):
        ldm([*base, "--prompt", "a red circle", "--negative-prompt", "blurry"])
    assert json.loads((tmp_path / "s" / "index.json").read_text())[0]["negative_prompt"] == "blurry"


def test_unconditional_dit_samples(latents, tmp_path, capsys):
    """A DiT trained on neither captions nor class ids (unlabelled videos) samples with
    --unconditional; guidance does not apply (the same videos at any --guidance)."""
    train(_cfg(latents, tmp_path / "r", steps=2, save_every=2, **{"model.class_cond": False,
                                                                  "model.text_cond": False}))
    assert "--unconditional N --output DIR" in capsys.readouterr().out  # the closing hint
    runs = {}
    for guidance in ("1", "4"):
        ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--unconditional", "3", "--batch-size", "2", "--steps", "2",
             "--guidance", guidance, "--output", str(tmp_path / guidance)])
        runs[guidance] = json.loads((tmp_path / guidance / "index.json").read_text())
    assert [(x["prompt"], x["class_id"], x["guidance"], x["seed"]) for x in runs["4"]] == \
        [(None, None, 1.0, 0), (None, None, 1.0, 1), (None, None, 1.0, 2)]  # each video its own seed
    assert all((tmp_path / "1" / x["file"]).read_bytes() == (tmp_path / "4" / x["file"]).read_bytes()
               for x in runs["1"])
    with pytest.raises(UserError, match="trained without class ids"):
        ldm(["sample", "--checkpoint", str(tmp_path / "r"), "--class", "1", "--output", str(tmp_path / "c")])


@pytest.mark.dist
@pytest.mark.slow  # ZeRO-2 on 2 ranks stays in make test (srun, topology, SIGTERM); ZeRO-3 on 1 rank (topology)
def test_two_ranks_zero3(latents, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(2, "train", "--config", str(YAML), f"data.shards={latents}", f"output={tmp_path / 'r'}",
                   "data.batch_size=2", "steps=4", "save_every=2", "log_every=1", "engine.deepspeed=zero3")
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, tail(r.stderr, 4000)
    losses = _losses(tmp_path / "r")
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    model, _ = load_export(tmp_path / "r")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "heads" in n)  # trained past zero-init


def _srun(args: list[str], out: Path) -> str:
    """`ldm ARGS output=OUT` as `srun --ntasks 2` starts it without torchrun: each task has only SLURM's
    variables (its rank, the launch node's address) and the user's MASTER_PORT. Both tasks' output."""
    env = process_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_STEP_ID="0",
                      SLURM_LAUNCH_NODE_IPADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    tasks = [subprocess.Popen([sys.executable, "-m", "launch.cli", *args, f"output={out}"],
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    printed = [task.communicate(timeout=300)[0] for task in tasks]
    for task, text in zip(tasks, printed):
        assert task.returncode == 0, ("srun", tail(text))
    return "".join(printed)


_TWO_RANKS = ["data.batch_size=2", "steps=4", "save_every=2", "log_every=1", "optim.grad_clip=0.1"]


def _clipped_norms(run) -> list[float]:
    return [r["grad_norm"] for r in _log(run) if "loss" in r]


@pytest.mark.dist
def test_srun_tasks_train_as_one_process_does_and_resume_past_a_corrupt_checkpoint(latents, tmp_path):
    """2 tasks of `srun` (world size 2 in the checkpoint, ZeRO-2) train with the losses of one
    process over the same global batch, with gradient clipping that matters: the gradient norm,
    summed over the ranks' ZeRO-2 partitions, is the one process's. A corrupt newest checkpoint:
    both ranks resume from the one before, said once, and train the same steps again."""
    args = ["train", "--config", str(YAML), f"data.shards={latents}", *_TWO_RANKS]
    run = tmp_path / "srun"
    _srun(args, run)
    losses = _losses(run)
    assert _world_size(run) == 2
    one = one_process(cfglib.load_yaml(YAML, TrainConfig, [*args[3:], "data.batch_size=4",
                                                           f"output={tmp_path / 'one'}"]))
    assert len(one["losses"]) == 4 and losses == pytest.approx(one["losses"], rel=1e-5)
    assert min(_clipped_norms(tmp_path / "one")) > 0.1  # clipped at every step
    assert _clipped_norms(run) == pytest.approx(_clipped_norms(tmp_path / "one"), rel=1e-5)
    model, _ = load_export(run)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "heads" in n)  # trained past zero-init
    shard = next((run / "checkpoints" / "step-00000004").glob("zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-100])
    printed = _srun(args, run)
    assert printed.count("checkpoint step-00000004 rejected") == 1, tail(printed, 4000)
    assert "resumed from" in printed and "step 2 " in printed and _losses(run) == losses


@pytest.mark.dist
@pytest.mark.slow  # the same 2 ranks as srun's test, started by the launchers' own environments
def test_deepspeed_and_accelerate_launchers_train_two_ranks_as_one_process_does(latents, tmp_path):
    """Each launcher starts 2 ranks (world size 2 in the checkpoint) whose losses and clipped
    gradient norms are those of one process over the same global batch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["train", "--config", str(YAML), f"data.shards={latents}", *_TWO_RANKS]
    bindir = Path(sys.executable).parent
    runs = {
        "deepspeed": [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                      "launch.cli", *args],
        "accelerate": [str(bindir / "accelerate"), "launch", "--config_file",
                       str(ROOT / "launch" / "configs" / "accelerate-zero2.yaml"), "--main_process_port", str(free_port()),
                       "-m", "launch.cli", *args, "engine.deepspeed=accelerate"],
    }
    for name, cmd in runs.items():
        r = subprocess.run(cmd + [f"output={tmp_path / name}"], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (name, tail(r.stderr))
        assert _world_size(tmp_path / name) == 2
    one_process(cfglib.load_yaml(YAML, TrainConfig, [*args[3:], "data.batch_size=4", f"output={tmp_path / 'one'}"]))
    for name in runs:
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5), name
        assert _clipped_norms(tmp_path / name) == pytest.approx(_clipped_norms(tmp_path / "one"), rel=1e-5), name


def test_activation_checkpointing_and_accumulation_and_bf16(latents, tmp_path):
    base = train(_cfg(latents, tmp_path / "a", steps=3, save_every=3))["losses"]
    ckpt = train(_cfg(latents, tmp_path / "b", steps=3, save_every=3,
                      **{"engine.activation_checkpointing": "true"}))["losses"]
    assert ckpt == pytest.approx(base, rel=1e-5)  # recomputation changes memory, not the numbers
    accum = train(_cfg(latents, tmp_path / "c", steps=2, save_every=2, **{"optim.grad_accum": 2}))
    assert len(accum["losses"]) == 2
    bf16 = train(_cfg(latents, tmp_path / "d", steps=3, save_every=3, **{"engine.precision": "bf16"}))["losses"]
    assert all(map(torch.isfinite, torch.tensor(bf16))) and bf16[1:] != base[1:]  # bf16 really ran


def test_zero2_with_separate_gradients_trains_the_same(latents, tmp_path, monkeypatch):
    """`benchmarks/zero2-separate-grads.json` (ZeRO-2 with ``contiguous_gradients: false``, the GPU session's
    second `ldm train` variant) keeps one gradient copy per parameter tensor instead of two: it may change the
    step's speed and memory, not its numbers (bf16, the clipped gradient norms too)."""
    import deepspeed

    contiguous, initialize = [], deepspeed.initialize

    def recorded(*args, **kw):  # what each run's ZeRO optimizer really did
        out = initialize(*args, **kw)
        contiguous.append(out[0].optimizer.contiguous_gradients)
        return out

    monkeypatch.setattr(deepspeed, "initialize", recorded)
    bf16 = {"engine.precision": "bf16"}
    built_in = train(_cfg(latents, tmp_path / "zero2", steps=4, save_every=4, **bf16))
    separate = train(_cfg(latents, tmp_path / "separate", steps=4, save_every=4, **bf16,
                          **{"engine.deepspeed": ROOT / "benchmarks" / "zero2-separate-grads.json"}))
    assert contiguous == [True, False]
    assert separate["losses"] == built_in["losses"]
    assert _clipped_norms(tmp_path / "separate") == _clipped_norms(tmp_path / "zero2")


def _torchrun(latents, out, *over, nproc=2, allow=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(nproc, "train", "--config", str(YAML), *(["--allow-change", allow] if allow else []),
                   f"data.shards={latents}", f"output={out}",
                   "data.shuffle=8", "log_every=1", "optim.warmup_steps=2", "optim.lr=0.001", *over)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, tail(r.stderr, 4000)
    assert "all_gather_into_tensor` is deprecated" not in r.stderr  # DeepSpeed's call, hidden from the user
    return r.stdout


@pytest.mark.dist
def test_resume_on_another_topology(latents, tmp_path):
    """2 ranks x batch 2 (ZeRO-2) -> 1 rank x batch 4 (ZeRO-3) and back: the global batch, data
    position and per-sample randomness are the same, so the losses continue as those of one
    uninterrupted process (ZeRO-2, batch 4) and its validation losses."""
    val = (f"val.shards={latents}", "val.clips=4")  # the validation loss too: each rank half of the clips
    _torchrun(latents, tmp_path / "run", "data.batch_size=2", "steps=2", "save_every=2", *val)
    one_process(_cfg(latents, tmp_path / "ref", steps=6, save_every=2, **{"val.shards": latents, "val.clips": 4}))
    ref = _losses(tmp_path / "ref")
    linear = torch.nn.functional.linear
    one = train(_cfg(latents, tmp_path / "run", steps=4, save_every=2, **{"data.batch_size": 4,
                                                                          "engine.deepspeed": "zero3",
                                                                          "val.shards": latents, "val.clips": 4}),
                allow_change=("steps",))
    assert one["losses"] == pytest.approx(ref[2:4], rel=1e-4)
    assert one["val_losses"][0][1] == pytest.approx(_val_losses(tmp_path / "ref")[1][1], rel=1e-4)
    assert torch.nn.functional.linear is linear  # ZeRO-3's process-wide replacement is undone
    out = _torchrun(latents, tmp_path / "run", "data.batch_size=2", "steps=6", "save_every=2", *val, allow="steps")
    assert "universal state" in out
    assert _losses(tmp_path / "run") == pytest.approx(ref, rel=1e-4)
    assert [s for s, _ in _val_losses(tmp_path / "run")] == [2, 4, 6]
    assert [v for _, v in _val_losses(tmp_path / "run")] == pytest.approx([v for _, v in _val_losses(tmp_path / "ref")],
                                                                            rel=1e-4)


def _worker_pids(marker: str) -> list[int]:
    """PIDs of the training workers (not the torchrun agent) whose command line holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and marker in " ".join(cmd) and "launch.cli" in cmd and "torch.distributed.run" not in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.dist
@pytest.mark.slow  # a resume after a killed rank stays in make test (SIGTERM to one rank, torchrun killed)
def test_elastic_restart_after_a_rank_is_killed(latents, tmp_path):
    import signal
    import time
    args = ["data.batch_size=2", "steps=24", "save_every=5", "data.shuffle=8", "log_every=1"]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(2, "train", "--config", str(YAML), f"data.shards={latents}", f"output={out}",
                   "optim.warmup_steps=2", "optim.lr=0.001", *args, extra=("--max-restarts", "1"))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (out / "checkpoints" / "step-00000010" / "MANIFEST.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    pids = _worker_pids(str(out))
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, tail(stderr, 4000)
    assert "resumed from" in stdout
    one_process(_cfg(latents, tmp_path / "ref", steps=24, save_every=24))  # uninterrupted: batch 4 = 2 ranks x 2
    assert _losses(out) == pytest.approx(_losses(tmp_path / "ref"), rel=1e-5)


@pytest.mark.dist
def test_ranks_stop_with_a_checkpoint_when_torchrun_is_killed(latents, tmp_path):
    """SIGKILL to the torchrun agent alone (out of memory, ``kill -9``): its ranks stop after the
    step with a checkpoint (was: they trained on as orphans, into a folder a rerun then shared)."""
    import signal
    import time
    out = tmp_path / "orphans"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = torchrun(2, "train", "--config", str(YAML), f"data.shards={latents}", f"output={out}",
                   "data.batch_size=2", "steps=100000", "save_every=5", "log_every=1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    while not (out / "checkpoints" / "step-00000005" / "MANIFEST.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=120)  # the pipe closes when the last rank has exited
    finally:
        for pid in _worker_pids(str(out)):  # what a failure would leave running
            os.kill(pid, signal.SIGKILL)
    assert "stopped at step" in output and "(SIGTERM)" in output
    step = int(output.split("stopped at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step-{step:08d}" / "MANIFEST.json").is_file()


def _fails_in_one_line(latents, out, capsys) -> tuple[list[str], str]:
    """``ldm train`` of 4 steps (a checkpoint every 2) into ``out``, in this process: its argv and
    the one line it printed, exit status 1."""
    from launch.cli import console
    argv = ["train", "--config", str(YAML), f"data.shards={latents}", f"output={out}", "steps=4", "save_every=2",
            "data.batch_size=2"]
    capsys.readouterr()
    assert console(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("ldm", "Traceback"))]
    assert len(err) == 1, err
    return argv, err[0]


def test_each_rank_flushes_its_deepspeed_files_before_rank_0_seals_the_checkpoint(latents, tmp_path, monkeypatch):
    """The rank that wrote DeepSpeed's files (its optimizer shard) fsyncs them before the barrier
    after which rank 0 writes the rest and seals: on a shared file system only the writer's fsync
    flushes its node's cache (was: only rank 0's fsyncs in the seal, so a crash right after it could
    leave a sealed checkpoint with another node's shard cut short)."""
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    train(_cfg(latents, tmp_path / "r", steps=1, save_every=1))
    shards = sorted({p for p in events if p.endswith(".pt")})
    assert any("optim_states" in p for p in shards), events
    sealing = next(i for i, p in enumerate(events) if "ema.safetensors" in p)  # rank 0, after the barrier
    assert all(events.index(p) < sealing for p in shards), events


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line_and_the_run_resumes(latents, tmp_path, monkeypatch,
                                                                                      capsys):
    """What torch.save raises when the disk fills (was: that traceback, and a half-written
    ``.step-N.tmp`` left behind)."""
    from launch import train_checkpoint
    from launch.cli import console
    real = train_checkpoint.save_tensors

    def full_disk(path, *args, **kwargs):
        if "step-00000004" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13248 vs 13142")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(train_checkpoint, "save_tensors", full_disk)
    out = tmp_path / "r"
    argv, err = _fails_in_one_line(latents, out, capsys)
    assert err.startswith("ldm train: error: writing the checkpoint of step 4 into"), err
    assert "unexpected pos" in err and "MiB free there" in err and "run the same command to resume" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-00000002"]
    monkeypatch.setattr(train_checkpoint, "save_tensors", real)
    assert console(argv) == 0 and "resumed from" in capsys.readouterr().out


def test_a_full_disk_while_the_export_is_written_is_one_line_and_a_rerun_writes_it(latents, tmp_path, monkeypatch,
                                                                                     capsys):
    """The checkpoint of the last step fits, its export does not (was: safetensors' traceback; a
    rerun of the finished run wrote no export, and `ldm sample` read the step before's)."""
    from safetensors import SafetensorError

    from launch import train_checkpoint
    from launch.cli import console
    real = train_checkpoint.save_export

    calls = []

    def full_disk(*args):
        calls.append(args)
        if len(calls) == 2:  # the export of step 4
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args)

    monkeypatch.setattr(train_checkpoint, "save_export", full_disk)
    out = tmp_path / "r"
    argv, err = _fails_in_one_line(latents, out, capsys)
    assert err.startswith("ldm train: error: writing the export of step 4 into"), err
    assert "the checkpoint of step 4 is saved" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    monkeypatch.setattr(train_checkpoint, "save_export", real)
    assert console(argv) == 0
    saved = load_tensors(out / "checkpoints" / "step-00000004" / "ema.safetensors")
    model, _ = load_export(out)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)


def test_mixed_resolutions_train_in_buckets(latents, tmp_path):
    ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(latents.parent / "videos"), "--output",
         str(tmp_path / "big"), "--frames", "8", "--height", "48", "--width", "48", "--shard-size", "4",
         "--text-encoder", "builtin"])
    both = f"{latents},{tmp_path / 'big'}"
    with pytest.raises(ValueError, match="data.buckets=true"):
        train(_cfg(latents, tmp_path / "r", **{"data.shards": both}))
    out = train(_cfg(latents, tmp_path / "r", steps=6, save_every=6,
                     **{"data.shards": both, "data.buckets": "true", "data.bucket_batch": '{"z=4x8x6x6": 2}'}))
    assert len(out["losses"]) == 6 and all(map(torch.isfinite, torch.tensor(out["losses"])))
    # each step is one bucket's batch (4 small or 2 large samples): samples/s counts the samples read
    # (was: data.batch_size per step, twice the large steps' samples), so tokens per sample is a shape's
    model, _ = load_export(tmp_path / "r")
    per_sample = {model.num_tokens({"z": (4, 8, 4, 4)}), model.num_tokens({"z": (4, 8, 6, 6)})}
    ratios = [round(r["tokens_per_s"] / r["samples_per_s"], 6) for r in _log(tmp_path / "r") if "loss" in r]
    assert set(ratios) == per_sample, (ratios, per_sample)


def test_shard_folders_as_people_write_them(latents, tmp_path, caplog):
    """``data.shards=a,`` or ``a, b`` (was: the checks passed, then the reader took "" as the working
    folder and ``[rank0]: FileNotFoundError: no shard-*.tar files in .`` after the run folder was made).
    A folder listed twice trains (oversampling), with a warning saying so (was: silent)."""
    caplog.set_level("WARNING", logger="ldm.train")
    out = train(_cfg(latents, tmp_path / "r", steps=1, save_every=1, **{"data.shards": f"{latents}, {latents},"}))
    assert len(out["losses"]) == 1
    assert f"data.shards lists {latents.resolve()} 2 times" in caplog.text


def test_bucket_batches_cost_the_same_and_hold_no_more_tokens_than_the_cheapest(caplog):
    """``data.bucket_sizing: compute`` at dit-XL's width, shapes of 1k / 4k / 16k tokens:
    ``batch_size`` samples of the cheapest shape, every other bucket within one sample of the same
    FLOPs and with fewer tokens (attention makes a long clip cost more per token), so no bucket
    needs more activation memory; a shape of which one sample exceeds the budget gets 1, warned."""
    from types import SimpleNamespace

    from launch.train_config import DataConfig
    from launch.train_data import bucket_batch_sizes
    from ldm.cost import dit_trunk_flops

    shapes = [{"z": [4, t, 64, 64]} for t in (1, 4, 16)]  # 1024 / 4096 / 16384 tokens at patch 2
    manifest = SimpleNamespace(latent_shapes=shapes, latent_spec={"latent_shape": shapes[0]})
    model = SimpleNamespace(num_tokens=lambda parts: parts["z"][1] * 32 * 32,  # full attention, as dit-XL
                            trunk_flops=lambda parts: dit_trunk_flops(28, 1152, parts["z"][1] * 32 * 32))
    sizes = bucket_batch_sizes(manifest, DataConfig(batch_size=64, buckets=True), model)
    n = {f"z=4x{t}x64x64": t * 1024 for t in (1, 4, 16)}
    assert sizes["z=4x1x64x64"] == 64
    budget = 64 * dit_trunk_flops(28, 1152, 1024)
    for key, b in sizes.items():
        f = dit_trunk_flops(28, 1152, n[key])
        assert budget - f < b * f <= budget  # the same FLOPs, within one sample
        assert b * n[key] <= 64 * 1024  # no more tokens than the cheapest shape's batch
    assert sizes == {"z=4x1x64x64": 64, "z=4x4x64x64": 11, "z=4x16x64x64": 1}  # 64k, 45k, 16k tokens
    assert "one sample costs" not in caplog.text
    fixed = bucket_batch_sizes(manifest, DataConfig(batch_size=64, buckets=True, bucket_sizing="fixed"), model)
    assert fixed == {}  # every bucket falls back to batch_size
    over = bucket_batch_sizes(manifest, DataConfig(batch_size=2, buckets=True,
                                                          bucket_batch={"z=4x4x64x64": 3}), model)
    assert over["z=4x16x64x64"] == 1 and over["z=4x4x64x64"] == 3  # explicit entries win
    assert "bucket z=4x16x64x64: one sample costs" in caplog.text and "raise data.batch_size" in caplog.text


def test_nonfinite_losses_drop_batches_then_stop(latents, tmp_path, monkeypatch):
    import launch.train as T
    real, calls = T.flow_step_loss, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(T, "flow_step_loss", flaky)
    out = train(_cfg(latents, tmp_path / "r", steps=5, save_every=5))
    assert out["dropped_batches"] == 2 and len(out["losses"]) == 5
    assert all(map(torch.isfinite, torch.tensor(out["losses"])))
    monkeypatch.setattr(T, "flow_step_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    # a UserError: one line from the CLI, the advice in it (was: a RuntimeError traceback)
    with pytest.raises(UserError, match="non-finite losses in a row"):
        train(_cfg(latents, tmp_path / "s", steps=5, save_every=5, max_nonfinite=3))


def test_a_nonfinite_gradient_skips_the_update_and_a_step_reads_the_device_once(latents, tmp_path, monkeypatch):
    """`ldm train` in bf16 (ZeRO-2): a finite loss whose gradients are NaN skips that update on the
    device (counted in the log and the summary as ``skipped_steps``; the weights stay finite and the
    run goes on); a step reads the device on the host once per micro-batch (the loss's finiteness and
    the stop flag, `StopRequest.agree`), and DeepSpeed's step adds no read."""
    import launch.train as T
    from offdevice import HostReads

    real_loss, real_step, calls, reads = T.flow_step_loss, T.train_step, {"n": 0}, []

    def nan_grad_once(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return _NanGrad.apply(loss) if calls["n"] == 5 else loss  # step 3's second micro-batch

    def counted(*args, **kwargs):
        with HostReads() as seen:
            real_step(*args, **kwargs)
        reads.append(seen.n)

    monkeypatch.setattr(T, "flow_step_loss", nan_grad_once)
    monkeypatch.setattr(T, "train_step", counted)
    out = train(_cfg(latents, tmp_path / "r", steps=5, save_every=5, **{"engine.precision": "bf16",
                                                                        "optim.grad_accum": 2}))
    assert out["skipped_steps"] == 1 and out["dropped_batches"] == 0 and len(out["losses"]) == 5
    assert [r["skipped_steps"] for r in _log(tmp_path / "r") if "loss" in r] == [0, 0, 1, 1, 1]
    assert reads == [2] * 5, reads  # one per micro-batch
    weights = load_tensors(tmp_path / "r" / "export" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_corrupt_shards_are_skipped_and_training_goes_on(latents, tmp_path):
    import shutil
    import tarfile
    bad = tmp_path / "bad"
    shutil.copytree(latents, bad)
    first = bad / "shard-000000.tar"
    with tarfile.open(first) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(first, "w") as tf:  # sample 0 loses its latent, sample 1 gets NaN, one unsafe name
        for m, data in members:
            if m.name.startswith("000000000.latent"):
                continue
            if m.name.startswith("000000001.latent"):
                import safetensors.torch as st
                t = st.load(data)
                data = st.save({k: v * float("nan") for k, v in t.items()})
                m.size = len(data)
            tf.addfile(m, __import__("io").BytesIO(data))
        evil = tarfile.TarInfo("../evil/000000099.json")
        evil.size = 2
        tf.addfile(evil, __import__("io").BytesIO(b"{}"))
    last = sorted(bad.glob("shard-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:700])  # truncated tar
    out = train(_cfg(bad, tmp_path / "r", steps=6, save_every=6))
    assert len(out["losses"]) == 6 and all(map(torch.isfinite, torch.tensor(out["losses"])))
    assert out["skipped"]["bad_sample"] >= 3 and out["skipped"]["bad_shard"] >= 1


@pytest.mark.dist
def test_sequence_parallel_training_matches_one_rank(latents, tmp_path):
    args = ["data.batch_size=4", "steps=3", "save_every=3"]
    _torchrun(latents, tmp_path / "sp", *args, "model.sequence_parallel=2")
    one = train(_cfg(latents, tmp_path / "one", steps=3, save_every=3, **{"data.batch_size": 4}))
    assert _losses(tmp_path / "sp") == pytest.approx(one["losses"], rel=1e-4)


def test_varlen_draws_do_not_depend_on_the_batch_padding():
    """A varlen sample draws the same posterior noise, timestep, flow noise and dropout uniforms
    alone (padded to its own length) as beside a longer sample (padded to that one): runs on
    different rank counts / batch sizes see identical per-sample randomness."""
    from launch.train_config import FlowConfig
    from launch.train_flow import flow_draws, sample_generators, sample_posterior
    from ldm.latent import Latent

    def one(n: int, seed: int) -> Latent:
        g = torch.Generator().manual_seed(seed)
        mean = torch.randn(1, 4, n, 3, 3, generator=g)
        return Latent({"z": mean}, "varlen", {"z": torch.zeros_like(mean)}, {"length": torch.tensor([n])})

    a, b = one(3, 0), one(7, 1)
    alone, pair = Latent.collate([a]), Latent.collate([a, b])
    fcfg = FlowConfig()
    t1, n1, u1 = flow_draws(alone, fcfg, sample_generators(5, [10]))
    t2, n2, u2 = flow_draws(pair, fcfg, sample_generators(5, [10, 11]))
    assert torch.equal(t1, t2[:1]) and torch.equal(u1, u2[:1])
    assert torch.equal(n1["z"][0], n2["z"][0, :, :3]) and not n2["z"][0, :, 3:].any()
    assert n2["z"][1].std() > 0.5  # the long sample got real noise on all 7 frames
    z1 = sample_posterior(alone, sample_generators(5, [10])).parts["z"]
    z2 = sample_posterior(pair, sample_generators(5, [10, 11])).parts["z"]
    assert torch.equal(z1[0], z2[0, :, :3])


def test_throughput_counts_each_varlen_sample_at_its_length():
    import dit
    from launch.train_flow import batch_work
    from ldm.cost import dit_trunk_flops
    from ldm.latent import Latent

    model = dit.build("dit-debug", {"z": (4, 5, 8, 8)}, patch=(1, 2, 2))
    items = [Latent({"z": torch.zeros(1, 4, n, 8, 8)}, "varlen", {}, {"length": torch.tensor([n])}) for n in (2, 5)]
    tokens, flops = batch_work(model, Latent.collate(items), context=0).tolist()
    per_frame = 16  # (8 / 2) * (8 / 2) tokens
    assert tokens == (2 + 5) * per_frame  # not 2 x 5 padded frames
    cfg = model.config
    assert flops == pytest.approx(sum(3 * dit_trunk_flops(cfg.depth, cfg.hidden, n * per_frame, cfg.mlp_ratio)
                                      for n in (2, 5)))
    # factorised spatial / temporal attention is counted over its own groups, not the whole sequence
    fact = dit.build("dit-debug", {"z": (4, 5, 8, 8)}, patch=(1, 2, 2), attn_layout="factorized")
    _, fflops = batch_work(fact, Latent.collate(items), context=0).tolist()
    assert fflops == sum(3 * fact.trunk_flops({"z": (4, n, 8, 8)}) for n in (2, 5)) < flops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_of_fp32_and_bf16_weights(dtype):
    """The trainer's EMA: fp32 averages of the weights, bf16 weights (DeepSpeed's on a GPU) added
    as they are; both follow ``ema = d * ema + (1 - d) * w``."""
    from launch.engine import EMA

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)
    ema = EMA(model, 0.9, zero3=False)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        assert ema.shadow[n].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[n], 0.9 * start[n] + 0.1 * p.detach().float(), atol=1e-6, rtol=1e-6)


def test_stop_request_signals(caplog, monkeypatch):
    """SIGTERM or a first Ctrl-C only ask; a second Ctrl-C interrupts; the handlers are put back; only
    rank 0 says so."""
    import signal

    from launch import runs

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = runs.StopRequest()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGTERM"
        # a scheduler's SIGTERM: no "again" (was: "Ctrl-C again" when nobody had pressed Ctrl-C)
        assert "SIGTERM: stopping after this step with a checkpoint (Ctrl-C to stop at once)" in caplog.text
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher passing the stop on: still a request
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.close()
    stop = runs.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert "SIGINT: stopping after this step with a checkpoint (Ctrl-C again to stop at once)" in caplog.text
    finally:
        stop.close()
    for name in ("SIGUSR1", "SIGHUP"):  # SLURM's --signal=USR1@120; a closed terminal, or torchrun passing it on
        stop = runs.StopRequest()
        try:
            os.kill(os.getpid(), getattr(signal, name))
            assert stop.signal == name
        finally:
            stop.close()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started with nohup: a hang-up stays ignored
    try:
        stop = runs.StopRequest()
        os.kill(os.getpid(), signal.SIGHUP)
        assert not stop.requested
        stop.close()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    caplog.clear()  # the other ranks stop as quietly: rank 0 says it once (was: one line per rank)
    monkeypatch.setattr(runs.dist, "is_main", lambda: False)
    stop = runs.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and "stopping after this step" not in caplog.text
    finally:
        stop.close()
    assert runs.stopped_exit_code({"stopped": "SIGINT"}) == 130 and runs.stopped_exit_code({}) == 0
    assert runs.stopped_exit_code({"stopped": "a signal to another rank"}) == 143


def _wait_for_steps(run, n, proc, timeout=120):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        log = Path(run) / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {n} logged steps (exit {proc.poll()})")


@pytest.mark.dist
# nproc=1 runs under make test-slow: test_a_signal_to_the_process_group_stops_... checks one process's exit status
# and checkpoint, nproc=2 the resume
@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(latents, tmp_path, nproc):
    """A scheduler's SIGTERM (here to one rank only) stops every rank after the same step, with a
    checkpoint of that step (not the last save_every one), exit status 143; rerun, the run goes on
    from there with the losses of an uninterrupted run."""
    import signal

    import psutil

    # not the rank layout an in-process run of this test worker left in its environment
    env = process_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = ["train", "--config", str(YAML), f"data.shards={latents}", "data.batch_size=2", "log_every=1",
            "save_every=1000", "data.shuffle=8", "optim.warmup_steps=2"]
    run = tmp_path / "r"
    cmd = (torchrun(nproc, *args) if nproc > 1 else [sys.executable, "-m", "launch.cli", *args])
    proc = subprocess.Popen(cmd + ["steps=100000", f"output={run}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(run, 3, proc)
        workers = psutil.Process(proc.pid).children() if nproc > 1 else [psutil.Process(proc.pid)]
        workers[-1].send_signal(signal.SIGTERM)  # the last rank only
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    step = len(_losses(run))
    if nproc == 1:
        assert proc.returncode == 143, tail(out)
    else:  # torchrun reports its worker's status as a failure of its own
        assert proc.returncode != 0 and "exitcode  : 143" in out, tail(out)
    assert f"stopped at step {step} of 100000" in out
    assert out.count("stopping after this step with a checkpoint") == 1, tail(out)  # rank 0's, heard or not
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    resumed = subprocess.run(cmd + [f"steps={step + 2}", f"output={run}", "--allow-change", "steps"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, tail(resumed.stderr)
    # uninterrupted, in this process: one rank of the global batch
    one_process(cfglib.load_yaml(YAML, TrainConfig, [*args[3:], f"data.batch_size={2 * nproc}", f"steps={step + 2}",
                                                     f"output={tmp_path / 'u'}"]))
    assert _losses(run) == pytest.approx(_losses(tmp_path / "u"), rel=1e-5)


@pytest.mark.dist
# SIGINT and SIGUSR1 under make test-slow: test_stop_request_signals maps each to a stop in-process
@pytest.mark.parametrize("name", [pytest.param("SIGINT", marks=pytest.mark.slow), "SIGTERM",
                                  pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_a_signal_to_the_process_group_stops_with_readers_and_accumulation(latents, tmp_path, name):
    """A terminal's Ctrl-C reaches the whole foreground group, and SLURM's SIGTERM (preemption,
    time limit) or `--signal=USR1@120` every process of the job step, shard readers included: the
    trainer finishes its step (2 micro-batches, read as needed; the readers ignore these signals, so
    a reader that had no batch ready yet still delivers one), exits 128 + the signal's number
    without a traceback and leaves that step's checkpoint (was, for SIGTERM and SIGUSR1: the readers
    died, and the trainer with a DataLoader traceback and no checkpoint)."""
    import signal

    env = process_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--config", str(YAML),
                             f"data.shards={latents}", f"output={run}", "data.batch_size=2", "log_every=1",
                             "save_every=1000", "steps=100000", "data.num_workers=2", "optim.grad_accum=2",
                             "data.prefetch=0"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, like a terminal's foreground job
    try:
        _wait_for_steps(run, 3, proc)
        os.killpg(proc.pid, getattr(signal, name))
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    step = len(_losses(run))
    assert proc.returncode == 128 + getattr(signal, name), tail(out)
    assert f"stopped at step {step} of 100000 ({name})" in out and "Traceback" not in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"


def test_a_resume_with_another_lr_trains_with_it(latents, tmp_path):
    """optim.lr changed on resume (--allow-change optim.lr) is the LR of the next steps (was: the
    checkpoint's scheduler put the old base LR back, so the change was recorded and ignored)."""
    train(_cfg(latents, tmp_path / "r", steps=3, save_every=3))
    train(_cfg(latents, tmp_path / "r", steps=5, save_every=3, **{"optim.lr": 0.01, "optim.schedule": "cosine",
                                                                  "optim.min_lr_ratio": 0.5}),
          allow_change=("steps", "optim"))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    # warm-up of 2 steps, then a cosine over 5 steps at the new LR; step N's line has the LR of its
    # update, 0-based N - 1, as ldm train-ae's (was: the next update's)
    from launch.runs import lr_at
    assert lrs[:3] == pytest.approx([lr_at(s, 0.001, warmup=2) for s in (0, 1, 2)])
    assert lrs[3:] == pytest.approx([lr_at(s, 0.01, warmup=2, schedule="cosine", total_steps=5, min_lr_ratio=0.5)
                                     for s in (3, 4)])


def test_tensorboard_after_a_resume_behind_the_log_has_each_step_once(latents, tmp_path):
    """A run that logged past its newest checkpoint (killed, or that checkpoint was corrupt) and
    resumed: log.jsonl and TensorBoard show each step once, in order (was: TensorBoard kept the
    dead run's step 3 and showed 1, 2, 3, 3, 4)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    train(_cfg(latents, run, steps=3, save_every=2))
    shutil.rmtree(run / "checkpoints" / "step-00000003")  # as if killed after logging step 3
    train(_cfg(latents, run, steps=4, save_every=2), allow_change=("steps",))
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_resume_with_another_global_batch_reads_on_from_where_the_run_was(latents, tmp_path, monkeypatch):
    """--allow-change global_batch (data.batch_size 4 -> 2): the resumed run reads the stream from
    the 2 x 4 samples read so far (was: step x the new global batch, 2 x 2: samples read again)."""
    import launch.train as train_mod

    skips = []
    real = train_mod.LatentShards
    monkeypatch.setattr(train_mod, "LatentShards", lambda *a, **kw: skips.append(kw["skip"]) or real(*a, **kw))
    run = tmp_path / "r"
    train(_cfg(latents, run, steps=2, save_every=2))
    with pytest.raises(UserError, match=r"\(global_batch: 4 -> 2\); .* to keep 4 on 1 data-parallel rank\(s\), set "
                                        "data.batch_size x optim.grad_accum = 4"):  # was: no word on how to keep it
        check_config(_cfg(latents, run, steps=3, **{"data.batch_size": 2}), ("steps",))
    train(_cfg(latents, run, steps=3, save_every=3, **{"data.batch_size": 2}), allow_change=("steps", "global_batch"))
    assert skips == [0, 8]
    assert json.loads((run / "checkpoints" / "step-00000003" / "trainer.json").read_text())["position"] == 10


def test_data_weights_mix_the_folders_deterministically_and_the_closing_line_shows_the_mix(latents, tmp_path,
                                                                                           capsys, monkeypatch):
    """data.weights=[1,1] over 12 + 4 clips: half the stream from each folder (the big one read 2/3x,
    the small one 2x per epoch), the same losses when resumed, and the clips read per folder in the
    closing line (was: no mixing weights; data.shards only took every clip once per epoch)."""
    synth_dataset(tmp_path / "videos", num=4, frames=8, size=32, fps=8, seed=1)
    small = _extract(tmp_path / "videos", tmp_path / "small")
    mix = {"data.shards": f"{latents},{small}", "data.weights": "[1,1]"}
    full = train(_cfg(latents, tmp_path / "full", steps=4, save_every=4, **mix))
    assert full["read"] == {str(latents): 8, str(small): 8}  # one epoch of 16: 2 of the 3 big shards, 2 x the small
    out = capsys.readouterr().out
    assert "data mix: " in out and "(4 clips, each read 2x per epoch)" in out
    assert f"clips read by this run: {latents} 50.0% (8), {small} 50.0% (8)" in out
    # latents standardised with the statistics of the stream read: half of each folder's (was: pooled
    # by clip count, 3/4 of the big folder's)
    norm = load_export(tmp_path / "full")[1].latent_norm
    stats = [load_manifest(f).stats for f in (latents, small)]
    for part, want in norm.items():
        mean = [(a + b) / 2 for a, b in zip(stats[0][part]["mean"], stats[1][part]["mean"])]
        square = [sum(s[part]["sample_std"][i] ** 2 + s[part]["mean"][i] ** 2 for s in stats) / 2
                  for i in range(len(mean))]
        assert want["mean"] == pytest.approx(mean, rel=1e-9)
        assert want["std"] == pytest.approx([math.sqrt(q - m * m) for q, m in zip(square, mean)], rel=1e-9)
    from launch import runs
    with monkeypatch.context() as m:  # a job stopped (a time limit: SIGTERM) after step 1 shows the mix too
        m.setattr(runs.StopRequest, "requested", property(lambda self: True))
        train(_cfg(latents, tmp_path / "stopped", steps=4, save_every=4, **mix))
    out = capsys.readouterr().out
    assert "stopped at step 1 of 4" in out and f"clips read by this run: {latents} " in out
    train(_cfg(latents, tmp_path / "part", steps=2, save_every=2, **mix))
    resumed = train(_cfg(latents, tmp_path / "part", steps=4, save_every=2, **mix), allow_change=("steps",))
    assert resumed["losses"] == full["losses"][2:]
    for over, message in (({"data.weights": "[1]"}, "data.weights has 1 weights for the 2 folders"),
                          ({"data.weights": "[1,0]"}, r"data.weights must all be > 0, got \[1.0, 0.0\]"),
                          ({"data.split": "shard"}, "data.weights mixes the folders")):
        with pytest.raises(UserError, match=message):
            train(_cfg(latents, tmp_path / "bad", steps=2, **{**mix, **over}))
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "videos"), "--output",
             str(tmp_path / "untexted"), "--frames", "8", "--height", "32", "--width", "32"])
    with pytest.raises(UserError, match="untexted holds captions of text encoder None, .* of builtin"):
        train(_cfg(latents, tmp_path / "bad", steps=2, **{"data.shards": f"{latents},{tmp_path / 'untexted'}"}))
    assert not (tmp_path / "bad").exists()


def test_norm_change_measures_the_move_of_the_statistics_in_old_stds(tmp_path):
    from launch.train_checkpoint import norm_change
    config = tmp_path / "config.json"
    assert norm_change(config, {"z": {"mean": [0.0], "std": [1.0]}}) == 0.0  # a run that recorded none
    config.write_text(json.dumps({"export": {"latent_norm": {"z": {"mean": [0.0, 1.0], "std": [2.0, 1.0]}}}}))
    assert norm_change(config, {"z": {"mean": [0.1, 1.0], "std": [2.0, 1.03]}}) == pytest.approx(0.05)
    assert norm_change(config, {}) == math.inf  # data.normalize switched off


def test_a_moved_shard_folder_resumes_and_a_grown_one_reads_its_new_clips_from_the_next_epoch(latents, tmp_path,
                                                                                             capsys):
    """Shards copied to another path (node-local disk): the run resumes on them with one line and the
    losses of an uninterrupted run (was: refused, data.shards: OLD -> NEW, unless --allow-change).
    Other latents at the new path are refused as before; clips extracted into the folder while the
    run was paused are refused naming the way out, and with it a new epoch over all the clips starts
    at the next step. A folder bound by its path (before latents.content) resumes on that path."""
    import shutil

    first = tmp_path / "a"
    shutil.copytree(latents, first)
    full = train(_cfg(first, tmp_path / "full", steps=4, save_every=2))
    run = tmp_path / "run"
    train(_cfg(first, run, steps=2, save_every=2))
    legacy = tmp_path / "legacy"  # the same run as written before latents.content was bound
    shutil.copytree(run, legacy)
    saved = json.loads((legacy / "run.json").read_text())
    saved["record"].pop("latents.content")
    saved["record"]["data.shards"] = str(first)
    (legacy / "run.json").write_text(json.dumps(saved))
    moved = tmp_path / "nvme" / "a"
    shutil.copytree(first, moved)
    with pytest.raises(UserError, match=r"latents.content: \(none\) ->"):  # bound by its path: refused elsewhere
        check_config(_cfg(moved, legacy, steps=3), ("steps",))
    check_config(_cfg(first, legacy, steps=3), ("steps",))  # on its path it resumes
    shutil.rmtree(first)
    capsys.readouterr()
    resumed = train(_cfg(moved, run, steps=4, save_every=2), allow_change=("steps",))
    out = capsys.readouterr().out
    assert f"data.shards moved ({first} -> {moved}): the same latents" in out and "normalisation" not in out
    assert resumed["losses"] == full["losses"][2:]
    # 4 more videos extracted into the folder (the first 12 are the fixture's)
    synth_dataset(tmp_path / "videos16", num=16, frames=8, size=32, fps=8, seed=0)
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "videos16"), "--output",
             str(moved), "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "4", "--text-encoder",
             "builtin", "--allow-change", "input,inputs,labels"])
    with pytest.raises(UserError, match=r"latents.clips: 12 -> 16; latents.content: .* --allow-change "
                                        r"latents.clips,latents.content if .*; with the change allowed a new epoch"
                                        ):  # other latents: refused, path or not
        check_config(_cfg(moved, run, steps=6), ("steps",))
    capsys.readouterr()
    train(_cfg(moved, run, steps=6, save_every=2), allow_change=("steps", "latents.clips", "latents.content"))
    out = capsys.readouterr().out
    assert ("data.shards holds other latents than at step 4 (12 -> 16 clips): epoch 2 starts at the next step over "
            "all of them (the rest of epoch 1 is not read)") in out
    # the 16 clips' statistics standardise from step 5 on, said in one line (was: silently)
    assert "latent normalisation: the per-channel statistics of data.shards moved by up to " in out
    assert "from step 5 latents are standardised with the new ones" in out
    grown = load_manifest(moved).stats
    exported = load_export(run)[1].latent_norm
    assert {p: n["mean"] for p, n in exported.items()} == {p: s["mean"] for p, s in grown.items()}
    stream = json.loads((run / "checkpoints" / "step-00000006" / "trainer.json").read_text())["stream"]
    assert stream == {"shards": str(moved), "content": stream["content"], "clips": 16, "epoch": 2,
                      "epoch_start": 16}
