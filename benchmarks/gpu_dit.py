"""Our DiT against a plain DiT reference, side by side in one run: training step and sampling
forward at several token counts, plus ``ldm train``'s own logged throughput on a shard folder (run
first).

    python benchmarks/gpu_dit.py --json OUT.json                       # on a GPU: dit-XL size
    python benchmarks/gpu_dit.py --device cpu --tiny --compile-backend aot_eager   # toy size, seconds
    python benchmarks/gpu_dit.py --ldm-train SHARDS_DIR --ldm-train-dit dit-XL     # + `ldm train`'s MFU
    python benchmarks/gpu_dit.py ... --ldm-train-profile 3    # + where `ldm train`'s step time goes

The reference is defined here from the DiT paper (Peebles & Xie 2023, Sec. 3.2 and App.): a
stack of blocks ``x + g1 * Attn(modulate(LN(x), b1, s1))``, ``x + g2 * MLP(modulate(LN(x), b2,
s2))`` with LayerNorm without affine, adaLN-Zero modulation from the timestep + class embedding,
multi-head attention through ``scaled_dot_product_attention``, GELU(tanh) MLP of ratio 4, a linear
patch embedding and the adaLN final layer -- the same width, depth, heads and token count as ours,
trained with the same fused AdamW in the same precision. Ours is ``dit.VideoDiT`` (3D RoPE, QK-norm,
typed token groups) on a grid latent with patch (1, 2, 2), with regional compilation
(``ldm.layers.compile_blocks``) unless ``--no-compile``.

Rows (``--modes``): ``ref-autocast`` (fp32 weights, bf16 autocast: the reference code's usual
set-up), ``ref-bf16`` (bf16 weights), ``ours-bf16`` (bf16 weights, compiled: what ``ldm train``
runs on a GPU, where DeepSpeed keeps the fp32 master weights), ``ours-autocast`` (fp32 weights,
bf16 autocast, compiled), ``ours-eager`` (bf16 weights, not compiled), ``ours-autotune`` (bf16
weights, compiled with ``max-autotune-no-cudagraphs``: Triton matmul templates with fused epilogues;
minutes of compilation). On the CPU every mode runs
in fp32. For each: seconds per training step (forward, backward, optimizer), tokens/s, TFLOP/s
(2 x multiply-adds of the trunk as ``ldm.cost.dit_trunk_flops`` counts them, a step = 3
forwards), MFU against the device's dense bf16 peak, peak memory; and the forward alone at the
sampling batch. Ratios are speed-ups over ``ref-autocast`` measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dit  # noqa: E402
from launch.engine import PEAK_TFLOPS  # noqa: E402
from ldm.cost import dit_trunk_flops  # noqa: E402
from ldm.latent import Cond  # noqa: E402
from ldm.layers import compile_blocks, timestep_embedding  # noqa: E402

NUM_CLASSES = 1000


# ------------------------------------------------------------------------------------------
# The plain reference
# ------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b1, s1, g1, b2, s2, g2 = self.ada(c).chunk(6, -1)
        B, N, D = x.shape
        qkv = self.qkv(modulate(self.norm1(x), b1, s1)).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + g1[:, None] * self.proj(o)
        h = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), b2, s2)), approximate="tanh"))
        return x + g2[:, None] * h


class RefDiT(nn.Module):
    """DiT (Peebles & Xie 2023) on pre-patchified tokens ``(B, N, in_dim)``."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, num_classes: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.t_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, in_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_mlp(timestep_embedding(t * 1000, 256).to(self.embed.weight.dtype)) + self.y_embed(y)
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_ada(c).chunk(2, -1)
        return self.final(modulate(self.final_norm(h), shift, scale))


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------
def grid_for(tokens: int) -> tuple[int, int, int]:
    """A latent grid (t, h, w) whose (1, 2, 2) patching gives ``tokens`` tokens."""
    side = 2 * int(math.sqrt(tokens / 16))  # 16 frames when it divides
    t = tokens // (side // 2) ** 2
    if t * (side // 2) ** 2 != tokens:
        raise ValueError(f"{tokens} tokens is not 16 frames x a square grid; pick a power of 4 times 16")
    return t, side, side


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_pair(mode: str, size: dict, channels: int, device: torch.device, compile_backend: str | None,
               dynamic: bool | None = None):
    """(model, make_inputs(B, tokens), forward(model, inputs), autocast flag) for one mode."""
    cuda = device.type == "cuda"
    bf16_params = cuda and mode in ("ref-bf16", "ours-bf16", "ours-eager", "ours-autotune")
    autocast = cuda and mode in ("ref-autocast", "ours-autocast")
    if mode.startswith("ref"):
        model = RefDiT(channels * 4, size["hidden"], size["depth"], size["heads"], NUM_CLASSES)

        def make(B: int, tokens: int):
            dtype = torch.bfloat16 if bf16_params else torch.float32  # the reference takes tokens in its dtype
            return (torch.randn(B, tokens, channels * 4, device=device, dtype=dtype), torch.rand(B, device=device),
                    torch.randint(0, NUM_CLASSES, (B,), device=device))

        def forward(m, inp):
            return m(*inp).float().square().mean()
    else:
        model = dit.build(size["dit"], {"z": (channels, 16, 32, 32)}, num_classes=NUM_CLASSES,
                          **({k: size[k] for k in ("hidden", "depth", "heads")} if size.get("override") else {}))

        def make(B: int, tokens: int):
            t, h, w = grid_for(tokens)
            return ({"z": torch.randn(B, channels, t, h, w, device=device)}, torch.rand(B, device=device),
                    Cond(class_id=torch.randint(0, NUM_CLASSES, (B,), device=device)))

        def forward(m, inp):
            return m(*inp)["z"].float().square().mean()
    model = model.to(device=device, dtype=torch.bfloat16 if bf16_params else torch.float32)
    if mode.startswith("ours") and mode != "ours-eager" and compile_backend:
        compile_blocks(model, backend=compile_backend, dynamic=dynamic,
                       mode="max-autotune-no-cudagraphs" if mode == "ours-autotune" else None)
    return model, make, forward, autocast


def measure(mode: str, size: dict, tokens: int, batch: int, sample_batch: int, steps: int, warmup: int,
            device: torch.device, compile_backend: str | None, peak: float | None, dynamic: bool | None = None) -> dict:
    """Train-step and sampling-forward figures of one mode at one token count."""
    torch.manual_seed(0)
    model, make, forward, autocast = build_pair(mode, size, 4, device, compile_backend, dynamic)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast) if device.type == "cuda" else None
    inp = make(batch, tokens)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with amp if amp is not None else torch.enable_grad():
            loss = forward(model, inp)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    first = time.perf_counter() - t0  # includes compilation
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    peak_mem = _peak_gib(device)
    flops = 3 * batch * dit_trunk_flops(size["depth"], size["hidden"], tokens, 4.0)
    row = {"mode": mode, "tokens": tokens, "batch": batch, "step_s": dt, "tokens_per_s": batch * tokens / dt,
           "tflops_per_s": flops / dt / 1e12, "mfu": flops / dt / peak if peak else None, "peak_gib": peak_mem,
           "warmup_s": first}
    del opt
    model.zero_grad(set_to_none=True)
    # sampling: the forward alone, no autograd
    sinp = make(sample_batch, tokens)
    with torch.inference_mode(), (amp if amp is not None else torch.enable_grad()):
        for _ in range(max(1, warmup)):
            forward(model, sinp)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            forward(model, sinp)
        _sync(device)
    row.update(sample_batch=sample_batch, forward_s=(time.perf_counter() - t0) / steps)
    del model, inp, sinp
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def attention_kernels(size: dict, tokens_list: list[int], device: torch.device, steps: int) -> list[dict]:
    """Forward + backward time of SDPA's kernels alone (flash, cuDNN, memory-efficient) at the
    trunk's head count and head dim: which kernel the attention itself should use."""
    if device.type != "cuda":
        return []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    H, d = size["heads"], size["hidden"] // size["heads"]
    for tokens in tokens_list:
        B = max(1, 16384 * 2 // tokens)
        q, k, v = (torch.randn(B, H, tokens, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        for name, kernel in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                             ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                def run():
                    if kernel is None:
                        o = F.scaled_dot_product_attention(q, k, v)
                    else:
                        with sdpa_kernel(kernel):
                            o = F.scaled_dot_product_attention(q, k, v)
                    o.sum().backward()
                run()
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    run()
                _sync(device)
                dt = (time.perf_counter() - t0) / steps
                flops = 3 * 4 * B * H * tokens * tokens * d
                out.append({"tokens": tokens, "batch": B, "kernel": name, "fwd_bwd_s": dt, "tflops_per_s": flops / dt / 1e12})
            except RuntimeError as e:
                out.append({"tokens": tokens, "kernel": name, "error": str(e).splitlines()[0][:200]})
    return out


def ldm_train(shards: str, dit_name: str, batch: int, steps: int, out_dir: Path, extra: list[str],
              profile: int = 0) -> dict:
    """Run ``ldm train`` on a shard folder and read back its own logged throughput; with
    ``profile`` > 0, also its profile of that many steps before the last (``OUTPUT/profile``)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "launch.cli", "train", "--config", str(root / "launch/configs/train-debug.yaml"),
           f"data.shards={shards}", f"output={out_dir}", f"model.dit={dit_name}", f"data.batch_size={batch}",
           f"steps={steps}", f"save_every={10 * steps}", f"log_every={max(1, steps // 3)}", "model.text_cond=false",
           "universal_checkpoints=false", "ema_decay=0.9999", *extra]
    if profile:
        cmd += [f"profile.start={max(steps - profile - 1, 1)}", f"profile.steps={profile}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "wall_s": wall}
    logs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    out = {"dit": dit_name, "batch": batch, "steps": steps, "wall_s": wall, "log": logs, "last": logs[-1]}
    ops = out_dir / "profile" / "ops-rank0.json"
    if profile and ops.is_file():
        out["profile"] = json.loads(ops.read_text())
        out["profile"]["top"] = out["profile"]["top"][:25]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy size (hidden 64, depth 2) for a CPU check")
    p.add_argument("--dit", default="dit-XL")
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--batches", default="32,8,2", help="training batch per token count")
    p.add_argument("--sample-batches", default="64,16,4", help="forward-only batch per token count")
    p.add_argument("--modes", default="ref-autocast,ref-bf16,ours-bf16,ours-autocast")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for ours ('none': eager)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic sizes from the start (fewer compiles "
                   "over the token counts; `ldm train` compiles static sizes first)")
    p.add_argument("--attention", action="store_true", help="also time SDPA's kernels alone")
    p.add_argument("--ldm-train", metavar="SHARDS", help="also run `ldm train` on this shard folder")
    p.add_argument("--ldm-train-dit", default="dit-XL")
    p.add_argument("--ldm-train-batch", type=int, default=8)
    p.add_argument("--ldm-train-steps", type=int, default=30)
    p.add_argument("--ldm-train-extra", nargs="*", default=[], help="more dotted overrides for `ldm train`")
    p.add_argument("--ldm-train-profile", type=int, default=0, metavar="N",
                   help="profile N steps of `ldm train` before its last (top operators by device time in the JSON)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    device = torch.device(args.device)
    if args.tiny:
        size = {"dit": "dit-debug", "hidden": 64, "depth": 2, "heads": 4, "override": True}
    else:
        cfg = dit.REGISTRY[args.dit]
        size = {"dit": args.dit, "hidden": cfg.hidden, "depth": cfg.depth, "heads": cfg.heads}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)
    backend = None if args.no_compile or args.compile_backend == "none" else args.compile_backend
    tokens = [int(x) for x in args.tokens.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    sbatches = [int(x) for x in args.sample_batches.split(",")]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": size, "peak_tflops": peak / 1e12 if peak else None, "rows": []}
    # `ldm train` first (in its own process, so its memory is gone after): the headline figure
    # survives a call cut short in the side-by-side rows
    if args.ldm_train:
        with tempfile.TemporaryDirectory() as tmp:
            result["ldm_train"] = ldm_train(args.ldm_train, args.ldm_train_dit, args.ldm_train_batch,
                                            args.ldm_train_steps, Path(tmp) / "run", args.ldm_train_extra,
                                            args.ldm_train_profile)
        print(json.dumps({k: v for k, v in result["ldm_train"].items() if k not in ("log", "profile")}), flush=True)
        prof = result["ldm_train"].get("profile", {})
        if prof.get("steps_wall_us"):
            busy = prof.get("device_busy_share")
            print(f"  profiled steps: {prof['steps_wall_us'] / 1e3:.1f} ms wall"
                  + (f", the GPU busy {busy:.1%} of it (the rest it waited for the host)" if busy else ""))
        phases = prof.get("phases_ms_per_step") or {}
        if phases:
            order = [p for p in ("data", "forward", "sync", "backward", "step", "ema") if p in phases]
            print("  per step: " + ", ".join(f"{p} {phases[p]:.1f} ms" for p in order)
                  + f" (sum {sum(phases.values()):.1f} ms)")
        for row in prof.get("top", [])[:15]:
            print(f"  {row['share']:6.1%} {row['self_us'] / 1e3:9.1f} ms {row['calls']:6d}x  {row['name'][:90]}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    if args.attention:
        result["attention"] = attention_kernels(size, tokens, device, args.steps)
        for row in result["attention"]:
            print(json.dumps(row), flush=True)
    for n, b, sb in zip(tokens, batches, sbatches):
        for mode in args.modes.split(","):
            try:
                row = measure(mode, size, n, b, sb, args.steps, args.warmup, device, backend, peak,
                              True if args.dynamic else None)
            except torch.OutOfMemoryError as e:
                row = {"mode": mode, "tokens": n, "batch": b, "error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # partial results survive a timeout
                Path(args.json).write_text(json.dumps(result, indent=2))
    for n in tokens:
        rows = {r["mode"]: r for r in result["rows"] if r["tokens"] == n and "error" not in r}
        ref = rows.get("ref-autocast")
        for r in rows.values():
            if ref:
                r["train_speedup_vs_ref"] = ref["step_s"] / r["step_s"]
                r["forward_speedup_vs_ref"] = ref["forward_s"] / r["forward_s"]
                if ref["peak_gib"]:
                    r["memory_vs_ref"] = r["peak_gib"] / ref["peak_gib"]
    print(f"\n{'mode':14} {'tokens':>6} {'batch':>5} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6} "
          f"{'fwd s':>8} {'train x':>7} {'fwd x':>6}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['mode']:14} {r['tokens']:>6} {r['batch']:>5} {r['error']}")
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['mode']:14} {r['tokens']:>6} {r['batch']:>5} {r['step_s']:8.4f} {r['tflops_per_s']:8.1f} "
              f"{fmt(r['mfu'], '6.1%')} {fmt(r['peak_gib'], '6.1f')} {r['forward_s']:8.4f} "
              f"{fmt(r.get('train_speedup_vs_ref'), '7.2f')} {fmt(r.get('forward_speedup_vs_ref'), '6.2f')}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
