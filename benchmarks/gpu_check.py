"""GPU smoke check: every full-size autoencoder, then ``ldm extract``, a few ``ldm train`` steps with
DeepSpeed bf16 and ``ldm sample``, each part one line (``make gpu-check``; a few minutes on one GPU).

    python benchmarks/gpu_check.py [--size 256] [--frames 17] [--json OUT.json] [--skip-pipeline]
    python benchmarks/gpu_check.py --device cpu --debug     # the same code on the CPU, -debug twins

First, ``ldm extract``'s uint8 clips: made float32 on the device, the same floats as on the CPU and no
host sync (`check_uint8_clips`). Autoencoders: each registered full-size model (``--debug``: the ``-debug`` twins) is built on the
device, cast to ``--dtype`` (bf16 by default on CUDA) and runs encode then decode on a random clip
of ``--frames x --size x --size`` (the nearest length and size it takes); the line gives encode and
decode frames/s (after one warm-up call), peak memory and whether the output is finite and of the
input's shape. Weights are random: speed and memory do not depend on them. The pipeline part runs
the CLI in subprocesses: ``ldm data synth`` -> ``ldm extract`` (``--pipeline-ae``) -> ``ldm train``
(``--pipeline-dit``, DeepSpeed ZeRO-2, engine.precision auto = bf16 on CUDA, model.compile auto) ->
``ldm sample``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autoencoders  # noqa: E402
from autoencoders.base import REGISTRY  # noqa: E402
from launch.dist import compute_dtype  # noqa: E402
from ldm.latent import Cond  # noqa: E402


def clip_size(ae, frames: int, size: int) -> tuple[int, int]:
    """The nearest (frames, size) at or above the request that ``ae`` accepts."""
    for f in range(frames, frames + 64):
        for s in range(size, size + 257, 8):
            try:
                ae.check_input(f, s, s)
                return f, s
            except ValueError:
                continue
    raise ValueError(f"no clip size near {frames}x{size}x{size} fits")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def check_autoencoder(name: str, frames: int, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        ae = autoencoders.build(name)
    ae = ae.to(dtype).eval()
    build_s = time.perf_counter() - t0
    f, s = clip_size(ae, frames, size)
    video = (torch.rand(1, 3, f, s, s, device=device) * 2 - 1).to(dtype)
    cond = None
    if ae.text_dim:
        cond = Cond(text=torch.randn(1, 16, ae.text_dim, device=device, dtype=dtype),
                    text_mask=torch.ones(1, 16, dtype=torch.bool, device=device))
    latent = ae.encode(video, cond)  # warm-up (cuDNN picks algorithms)
    ae.decode(latent, cond)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    latent = ae.encode(video, cond)
    _sync(device)
    t1 = time.perf_counter()
    out = ae.decode(latent, cond)
    _sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ok = tuple(out.shape) == tuple(video.shape) and bool(torch.isfinite(out.float()).all())
    row = {"part": "autoencoder", "name": name, "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "frames": f, "size": s, "params_m": ae.num_parameters() / 1e6,
           "encode_fps": f / (t1 - t0), "decode_fps": f / (t2 - t1), "peak_gib": peak, "ok": ok,
           "latent": {k: list(v.shape[1:]) for k, v in latent.parts.items()}, "build_s": build_s}
    del ae, video, latent, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _cli(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - t0


def pipeline(tmp: Path, ae: str, dit: str, frames: int, size: int, clips: int, steps: int, device: str,
             timeout: float, batch: int = 8, sample_compile: str = "auto") -> list[dict]:
    rows = []

    def step(part: str, args: list[str], **extra) -> bool:
        try:
            proc, secs = _cli(args, timeout)
        except subprocess.TimeoutExpired:
            rows.append({"part": part, "ok": False, "error": f"timed out after {timeout:.0f} s"})
            return False
        row = {"part": part, "ok": proc.returncode == 0, "seconds": secs, **extra}
        if proc.returncode != 0:
            row["error"] = (proc.stderr or proc.stdout)[-1500:]
        rows.append(row)
        return row["ok"]

    if not step("synth", ["data", "synth", "--output", str(tmp / "videos"), "--num", str(clips), "--frames",
                          str(frames), "--size", str(size)]):
        return rows
    if not step("extract", ["extract", "--autoencoder", ae, "--input", str(tmp / "videos"), "--output",
                            str(tmp / "latents"), "--frames", str(frames), "--height", str(size), "--width",
                            str(size), "--text-encoder", "builtin", "--device", device], autoencoder=ae):
        return rows
    rows[-1]["clips_per_s"] = clips / rows[-1]["seconds"]
    manifest = json.loads((tmp / "latents" / "manifest.json").read_text())
    rows[-1]["dtype"] = manifest.get("dtype")
    if not step("train", ["train", "--config", str(ROOT / "launch/configs/train-debug.yaml"),
                          f"data.shards={tmp / 'latents'}", f"output={tmp / 'dit'}", f"model.dit={dit}",
                          f"steps={steps}", f"save_every={steps}", f"log_every={max(1, steps // 2)}",
                          f"data.batch_size={batch}", "universal_checkpoints=false"], dit=dit):
        return rows
    log = [json.loads(line) for line in (tmp / "dit" / "log.jsonl").read_text().splitlines()]
    rows[-1].update(loss=log[-1]["loss"], samples_per_s=log[-1]["samples_per_s"], mfu=log[-1]["mfu"],
                    tflops_per_s=log[-1]["tflops_per_s"], tokens_per_s=log[-1]["tokens_per_s"])
    rows[-1]["log"] = log
    if step("sample", ["sample", "--checkpoint", str(tmp / "dit"), "--prompt", "a red circle moving left",
                       "--prompt", "a blue square moving up", "--steps", "10", "--output", str(tmp / "samples"),
                       "--device", device, "--compile", sample_compile]):
        rows[-1]["videos"] = len(list((tmp / "samples").glob("*.mp4")))
        rows[-1]["ok"] = rows[-1]["videos"] == 2
    return rows


def line(row: dict) -> str:
    status = "ok  " if row.get("ok") else "FAIL"
    if row["part"] == "autoencoder":
        mem = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
        return (f"{status} ae {row['name']:24s} {row['frames']}x{row['size']}x{row['size']}  "
                f"encode {row['encode_fps']:8.1f} fps  decode {row['decode_fps']:8.1f} fps  peak {mem}  "
                f"({row['params_m']:.0f}M params)")
    if not row.get("ok"):
        return f"{status} {row['part']}: {row.get('error', '')[-600:]}"
    extra = {k: v for k, v in row.items() if k not in ("part", "ok", "log")}
    return f"{status} {row['part']}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in extra.items())


def check_uint8_clips(device: torch.device) -> dict:
    """`ldm extract`'s clips reach the device as uint8 and become float32 there by
    a lookup (`data.video.uint8_to_float`): the same floats as the CPU's decoder for all 256 values,
    with no host sync (CUDA's sync debug mode set to error). Also counts the values that recomputing
    ``x.float() / 127.5 - 1`` on the device would get wrong (why it is a lookup)."""
    from data.video import UINT8_VALUES, uint8_to_float

    clip = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(3, 2, 16, 16).contiguous()
    ref = uint8_to_float(clip, UINT8_VALUES)
    on_device = clip.to(device)
    values = UINT8_VALUES.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = uint8_to_float(on_device, values)
        recomputed = on_device.float() / 127.5 - 1.0
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    same = torch.equal(out.cpu(), ref)
    return {"part": "uint8 clips", "ok": same, "lookup_bit_identical": same,
            "recomputed_values_differing": int((recomputed.cpu() != ref)[0, 0].sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--debug", action="store_true", help="the -debug twins instead of the full-size models")
    p.add_argument("--autoencoders", help="comma-separated names (default: every registered one of the kind)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-autoencoders", action="store_true")
    p.add_argument("--sample-compile", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--pipeline-ae", default="causal3d-f4x8c4")
    p.add_argument("--pipeline-dit", default="dit-B")
    p.add_argument("--pipeline-size", type=int, default=128)
    p.add_argument("--pipeline-clips", type=int, default=32)
    p.add_argument("--pipeline-steps", type=int, default=10)
    p.add_argument("--pipeline-batch", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300, help="seconds per pipeline command")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms per shape (torch.backends.cudnn.benchmark; "
                        "off in the platform): for an A/B of the autoencoders' FPS and peak memory")
    p.add_argument("--json", help="write every row here")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    names = [] if args.skip_autoencoders else (args.autoencoders.split(",") if args.autoencoders else sorted(
        n for n, (cls, _) in REGISTRY.items() if cls.__module__.startswith("autoencoders.")
        and n.endswith("-debug") == args.debug))
    rows = []
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"dtype {dtype}, cudnn.benchmark {args.cudnn_benchmark}", flush=True)
    rows.append(check_uint8_clips(device))
    print(line(rows[-1]), flush=True)
    for name in names:
        try:
            row = check_autoencoder(name, args.frames, args.size, device, dtype)
        except Exception as e:  # one line per part, whatever happens
            row = {"part": "autoencoder", "name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(line(row) if "error" not in row else f"FAIL ae {name}: {row['error']}", flush=True)
    if not args.skip_pipeline:
        ae = args.pipeline_ae + ("-debug" if args.debug else "")
        dit = "dit-debug" if args.debug else args.pipeline_dit
        with tempfile.TemporaryDirectory() as tmp:
            for row in pipeline(Path(tmp), ae, dit, args.frames, args.pipeline_size, args.pipeline_clips,
                                args.pipeline_steps, args.device, args.timeout, args.pipeline_batch,
                                args.sample_compile):
                rows.append(row)
                print(line(row), flush=True)
    failed = [r for r in rows if not r.get("ok")]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
