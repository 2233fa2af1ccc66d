"""``ldm cost``: what each autoencoder costs a denoiser downstream, from shape arithmetic alone.

    ldm cost --all --frames 16 --height 256 --width 256 --dit dit-standard
    ldm cost --autoencoders kl2d-f8c4,causal3d-f4x8c16 --frames 65 --height 512 --width 512 \\
             --dit dit-XL --batch-size 4 --steps 50 --cfg --json --csv cost.csv --plot cost.png

Hi-VAE (Fig. 6, Appendix C.2) compares autoencoders by the cost of one "standardized DiT"
(``dit-standard``: 8 layers, 8 heads, hidden 512, FFN 2048) on their latents; this verb does it
for every registered autoencoder at any size. No weights are loaded and nothing is allocated: the
latent comes from ``latent_spec`` (built on the meta device), the DiT and the decoder run on fake
tensors (``ldm.cost``), so ``--all`` at 65x512x512 takes about two CPU-minutes on a laptop.

One row per autoencoder (``--json`` keys): ``ae_params`` (the autoencoder's parameters, as
``ldm list`` counts them), ``latent_shape``, ``latent_elements``,
``compression_rate`` (Hi-VAE's: latent elements / input elements), ``compression_factor`` (its
inverse), ``vcpr``, ``tokens`` (per clip, for the DiT's patching), ``dit_params``,
``dit_forward_flops`` (one forward, per sample), ``dit_forward_flops_analytic`` (the closed form,
full attention), ``dit_train_step_flops`` (forward + backward, per sample),
``dit_train_peak_memory_bytes`` (one fp32 AdamW training step at ``--batch-size``),
``ae_encode_flops`` (one clip's ``encode``: what ``ldm extract`` spends per clip; MTC-VAE's
PSNR selector's encodes and decodes at every rate; none for an encoder whose work depends on the
clip's values, with ``ae_encode_error`` saying so),
``ae_decode_flops`` (one clip; whatever ``decode`` runs, so a diffusion decoder's steps and
guidance are included), ``sample_flops`` (``steps x forward x (2 with --cfg) + decode``) and
``method`` (how the memory was obtained); with ``--measure`` (a GPU) also
``dit_train_peak_memory_bytes_measured`` and ``dit_train_step_seconds_measured``. FLOPs are 2 x
multiply-accumulates (``ldm.cost``).
An autoencoder that does not take ``--frames`` is costed at the nearest clip length it takes, as
``ldm list`` does (``input`` holds it, ``frames_note`` says why; ``@Nf`` in the table); one that
cannot take the size at all gets a row with ``error`` and null costs.

``--recon VIDEOS`` puts quality beside the cost: each saved autoencoder (a folder: its weights
are loaded) is measured as ``ldm eval recon`` measures it on the first ``--recon-clips`` of VIDEOS
at the row's own clip (``input``), adding ``psnr_db``, ``ssim`` (means) and ``recon_clips``; a row
without them (a registered name has random weights) says why in ``recon_error``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import autoencoders
import dit
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_bytes
from ldm.cost import (FLOP_CONVENTION, count_flops, dit_forward_flops_analytic, fake_mode, prime_optimizer,
                      train_step_memory)
from data.sources import list_items
from ldm.errors import MissingInput, UserError, check_min, checking
from launch.list_models import nearest, params_text
from ldm.latent import Cond, LatentSpec, part_tokens, parts_text

KEYS = ("autoencoder", "ae_params", "latent_shape", "latent_elements", "compression_rate", "compression_factor", "vcpr",
        "tokens", "dit_params", "dit_forward_flops", "dit_forward_flops_analytic", "dit_train_step_flops",
        "dit_train_peak_memory_bytes", "ae_encode_flops", "ae_decode_flops", "sample_flops", "method")


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--autoencoders", help="NAME[,NAME...]: registered names, or folders written by "
                       "save_pretrained / `ldm train-ae` (only their config.json is read)")
    which.add_argument("--all", action="store_true", help="every registered autoencoder")
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--dit", default="dit-standard", choices=sorted(dit.REGISTRY))
    p.add_argument("--dit-config", action="append", default=[], metavar="KEY=VALUE",
                   help="DiT config override, e.g. patch=[1,2,2] or depth=28 (repeatable)")
    p.add_argument("--batch-size", type=int, default=1, help="per-device batch of the training-memory estimate")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance: two forwards per step")
    p.add_argument("--text-tokens", type=int, default=0, help="cross-attention to this many text tokens (0 = none)")
    p.add_argument("--text-dim", type=int, default=4096, help="text embedding width (with --text-tokens)")
    p.add_argument("--measure", action="store_true",
                   help="on a GPU, also run the training step for real: measured peak memory and step time")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--plot", help="also write a PNG of FLOPs and memory vs compression rate")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv / --plot file")
    p.add_argument("--recon", metavar="VIDEOS",
                   help="also measure each saved autoencoder's reconstruction (PSNR / SSIM, as `ldm eval recon`) on "
                        "these held-out videos at its row's clip size (loads its weights; registered names have "
                        "random weights and get none)")
    p.add_argument("--recon-clips", type=int, default=8, help="with --recon: its first N clips (default: 8)")


def check_args(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The autoencoder names and DiT overrides of an ``ldm cost`` command, checked before any
    work (`UserError` naming the flag otherwise)."""
    check_min({"--frames": args.frames, "--height": args.height, "--width": args.width,
               "--batch-size": args.batch_size, "--steps": args.steps, "--text-dim": args.text_dim,
               "--recon-clips": args.recon_clips}, 1)
    check_min({"--text-tokens": args.text_tokens}, 0)
    if args.measure and not torch.cuda.is_available():
        raise UserError("--measure runs the training step on a GPU and none is visible here; leave it out for the "
                        "estimate (it needs no GPU)")
    names = (sorted(autoencoders.REGISTRY) if args.all
             else [n.strip() for n in args.autoencoders.split(",") if n.strip()])
    if not names:
        raise UserError("--autoencoders is empty: give NAME[,NAME...] (see `ldm list`) or --all")
    with checking("--autoencoders"):
        for name in names:
            autoencoders.config_of(name)
    refused = []
    for name in names:  # a size no autoencoder takes (nor one near it) is an error; with some, the others get a row
        try:
            nearest(args.frames, lambda n: latent_spec(name, n, args.height, args.width))
        except (ValueError, KeyError) as e:
            refused.append(f"{name}: {e}")
    if len(refused) == len(names):
        raise UserError(f"--frames {args.frames} --height {args.height} --width {args.width}: no autoencoder asked "
                        f"for takes this size ({refused[0]}{'; ...' if len(refused) > 1 else ''})")
    if args.recon is not None:
        if all(name in autoencoders.REGISTRY for name in names):
            raise UserError("--recon measures saved autoencoders (folders such as a train-ae RUN/final); registered "
                            "names have random weights: give --autoencoders FOLDER[,...]")
        with checking("--recon"):
            if not list_items(args.recon):
                raise UserError(f"--recon {args.recon}: no videos found")
    with checking("--dit-config"):
        overrides = cfglib.apply_dotted({}, args.dit_config)
        cfglib.replace(dit.REGISTRY[args.dit], **overrides)
    for flag, path in {"--csv": args.csv, "--plot": args.plot}.items():
        if path is not None and Path(path).is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file to write")
        if path is not None and not Path(path).parent.is_dir():
            raise MissingInput(f"{flag} {path}: folder {Path(path).parent} does not exist")
        if path is not None and Path(path).exists() and not args.overwrite:
            raise UserError(f"{flag} {path} exists; give --overwrite to replace it, or another file name")
    return names, overrides


def run(args: argparse.Namespace) -> int:
    names, overrides = check_args(args)
    t0 = time.perf_counter()
    rows = cost_table(names, args.frames, args.height, args.width, args.dit, batch_size=args.batch_size,
                      steps=args.steps, cfg=args.cfg, dit_overrides=overrides, text_tokens=args.text_tokens,
                      text_dim=args.text_dim, measure=args.measure)
    if args.recon:
        add_reconstruction(rows, args.recon, args.recon_clips)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(rows, args.plot, title=f"{args.dit} on {args.frames}x{args.height}x{args.width}, batch {args.batch_size}")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, args))
        recon = (f"; PSNR / SSIM: first {args.recon_clips} clips of {args.recon} at each row's clip, as `ldm eval "
                 "recon`" if args.recon else "")
        plural = "s" if len(rows) != 1 else ""
        print(f"({len(rows)} autoencoder{plural} in {time.perf_counter() - t0:.1f}s; {FLOP_CONVENTION}{recon})")
    return 0


# ------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------
def _meta_model(name: str) -> autoencoders.Autoencoder:
    """``name`` (``autoencoders.config_of``: a registered name or a saved folder) built on the meta
    device: its shapes and parameter count, no weights."""
    return autoencoders.meta_model(*autoencoders.config_of(name))


def latent_spec(name: str, frames: int, height: int, width: int) -> LatentSpec:
    """The latent spec of ``name`` at this size, computed on the meta device (no weights)."""
    return _meta_model(name).latent_spec(frames, height, width)


AE_TEXT_TOKENS = 64  # caption length for a text-guided decoder (the builtin text encoder's) when not given


def _caption(ae: autoencoders.Autoencoder, text_tokens: int) -> Cond:
    """A text-guided autoencoder's (``text_dim`` > 0) caption embedding of ``text_tokens`` tokens, else none."""
    if not ae.text_dim:
        return Cond()
    return Cond(text=torch.randn(1, text_tokens, ae.text_dim), text_mask=torch.ones(1, text_tokens, dtype=torch.bool))


def _ae_flops(name: str, what: str, run) -> int:
    """FLOPs of ``run(ae)`` (one clip's ``what``: encode or decode) for ``name`` built on fake tensors."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    cls, config = autoencoders.config_of(name)
    with fake_mode(small_real=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")  # deepcopy of fakes
        ae = cls(config).eval()
        try:
            with torch.no_grad():
                _, count = count_flops(lambda: run(ae), repeats_of=ae)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            data = "latent" if what == "decode" else "clip"
            raise ValueError(f"{what}'s work depends on the {data}'s values (a choice made from them; {e.func}): "
                             "its cost has no answer from shapes alone") from None
    return count.total


def decode_flops(name: str, spec: LatentSpec, text_tokens: int = AE_TEXT_TOKENS) -> int:
    """FLOPs of ``decode`` of one clip, on fake tensors (no weights, no memory). A text-guided
    decoder (``text_dim`` > 0) gets a caption embedding of ``text_tokens`` tokens."""
    return _ae_flops(name, "decode", lambda ae: ae.decode(ae.example_latent(spec, 1), _caption(ae, text_tokens)))


def encode_flops(name: str, frames: int, height: int, width: int, text_tokens: int = AE_TEXT_TOKENS) -> int:
    """FLOPs of ``encode`` of one ``frames x height x width`` clip (what ``ldm extract`` runs per
    clip; `Autoencoder.encode_work`: MTC-VAE's selector), on fake tensors; a text-guided encoder
    gets a caption embedding as ``decode_flops``."""
    return _ae_flops(name, "encode", lambda ae: ae.encode_work(torch.randn(1, 3, frames, height, width),
                                                               _caption(ae, text_tokens)))


def _dit_inputs(spec: LatentSpec, cfg: dit.DiTConfig, batch: int, text_tokens: int):
    x = {k: torch.randn(batch, *s) for k, s in spec.parts.items()}
    t = torch.rand(batch)
    cond = Cond(text=torch.randn(batch, text_tokens, cfg.text_dim)) if cfg.text_dim else None
    return x, t, cond


def dit_costs(spec: LatentSpec, cfg: dit.DiTConfig, batch_size: int, text_tokens: int) -> dict[str, Any]:
    """Parameters, forward and train-step FLOPs per sample and the peak memory of an fp32 AdamW
    training step at ``batch_size``, all on fake tensors."""
    with fake_mode():
        model = dit.VideoDiT(cfg)
        x, t, cond = _dit_inputs(spec, cfg, 1, text_tokens)
        with torch.no_grad():
            _, fwd = count_flops(lambda: model(x, t, cond))

        # foreach: the multi-tensor update GPUs run by default (and far fewer ops to dispatch)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def batch_loss() -> torch.Tensor:
            xb, tb, cb = _dit_inputs(spec, cfg, batch_size, text_tokens)
            out = model(xb, tb, cb)
            return sum((out[k] - xb[k]).pow(2).mean() for k in out)

        prime_optimizer(optimizer)  # Adam's state exists before the tracked step
        # the tracked step is counted too (every matmul is linear in the batch)
        memory, step = count_flops(lambda: train_step_memory(model, optimizer, batch_loss, iterations=1))
        params = model.num_parameters()
    return {"dit_params": params, "dit_forward_flops": fwd.total, "dit_train_step_flops": step.total // batch_size,
            "dit_train_peak_memory_bytes": memory.peak_bytes, "memory_breakdown": memory.breakdown,
            "method": memory.method}


def measured_dit_costs(spec: LatentSpec, cfg: dit.DiTConfig, batch_size: int, text_tokens: int) -> dict[str, Any]:
    """The same training step run for real on the GPU: measured peak memory and step time."""
    from ldm.cost import cuda_train_step_memory

    if not torch.cuda.is_available():
        raise RuntimeError("--measure needs a CUDA device (the estimate needs none)")
    device = torch.device("cuda")
    model = dit.VideoDiT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_fn() -> torch.Tensor:
        x, t, cond = _dit_inputs(spec, cfg, batch_size, text_tokens)
        x, t = {k: v.to(device) for k, v in x.items()}, t.to(device)
        cond = Cond(text=cond.text.to(device)) if cond is not None else None
        out = model(x, t, cond)
        return sum((out[k] - x[k]).pow(2).mean() for k in out)

    mem = cuda_train_step_memory(model, optimizer, loss_fn)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del model, optimizer
    torch.cuda.empty_cache()
    return {"dit_train_peak_memory_bytes_measured": mem.peak_bytes, "measured_method": mem.method,
            "dit_train_step_seconds_measured": sorted(times)[1]}


def _analytic(spec: LatentSpec, cfg: dit.DiTConfig, text_tokens: int) -> int | None:
    if cfg.attn_layout != "full":
        return None
    groups = [(part_tokens(spec.parts[s.name], s.patch), s.token_dim)
              for s in dit.part_specs(spec.parts, cfg.patch, cfg.part_patch)]
    return dit_forward_flops_analytic(cfg.depth, cfg.hidden, groups, cfg.mlp_ratio, cfg.freq_dim,
                                      text_tokens if cfg.text_dim else 0, cfg.text_dim)


def cost_table(names: list[str], frames: int, height: int, width: int, dit_name: str = "dit-standard", *,
               batch_size: int = 1, steps: int = 50, cfg: bool = False, dit_overrides: dict[str, Any] | None = None,
               text_tokens: int = 0, text_dim: int = 4096, measure: bool = False) -> list[dict[str, Any]]:
    """One row per autoencoder (see the module doc). DiT costs are shared between autoencoders
    with the same latent shapes."""
    if min(frames, height, width, batch_size, steps) < 1:
        raise ValueError("frames, height, width, batch size and steps must be >= 1")
    overrides = dict(dit_overrides or {})
    if text_tokens:
        overrides.setdefault("text_dim", text_dim)
    for name in names:
        autoencoders.config_of(name)  # an unknown name is an error, not a row
    cache: dict[str, dict[str, Any]] = {}
    rows = []
    for name in names:
        row: dict[str, Any] = {k: None for k in KEYS}
        row["autoencoder"] = name
        try:
            row["ae_params"] = _meta_model(name).num_parameters()  # as `ldm list` counts them
            used, spec, why = nearest(frames, lambda n: latent_spec(name, n, height, width))
        except (ValueError, KeyError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            continue
        if why is not None:  # costed at the nearest clip length it takes, as `ldm list` does
            row["frames_note"] = f"{used}f: {why}"
        dcfg = dit.make_config(dit_name, spec, **overrides)
        d = spec.to_dict(dcfg.patch)
        row.update(latent_shape=d["latent_shape"], latent_elements=d["latent_elements"],
                   compression_rate=d["compression_rate"], compression_factor=d["compression_factor"],
                   vcpr=d["vcpr"],
                   tokens=spec.tokens(dcfg.patch, dcfg.part_patch))
        key = json.dumps([cfglib.to_dict(dcfg), batch_size, text_tokens, measure], sort_keys=True)
        if key not in cache:
            costs = dit_costs(spec, dcfg, batch_size, text_tokens)
            costs["dit_forward_flops_analytic"] = _analytic(spec, dcfg, text_tokens)
            if measure:
                costs.update(measured_dit_costs(spec, dcfg, batch_size, text_tokens))
            cache[key] = costs
        row.update(cache[key])
        try:
            row["ae_encode_flops"] = encode_flops(name, used, height, width, text_tokens or AE_TEXT_TOKENS)
        except Exception as e:  # any family's encode that cannot run on fake tensors: report, do not crash
            row["ae_encode_error"] = f"{type(e).__name__}: {e}"
        try:
            row["ae_decode_flops"] = decode_flops(name, spec, text_tokens or AE_TEXT_TOKENS)
        except Exception as e:
            row["ae_decode_error"] = f"{type(e).__name__}: {e}"
        per_step = row["dit_forward_flops"] * (2 if cfg else 1)
        row["sample_flops"] = None if row["ae_decode_flops"] is None else steps * per_step + row["ae_decode_flops"]
        row.update(input=[used, height, width], dit=dit_name, batch_size=batch_size, steps=steps, cfg=cfg,
                   flops_convention=FLOP_CONVENTION)
        rows.append(row)
    return rows


def add_reconstruction(rows: list[dict[str, Any]], videos: str, clips: int) -> None:
    """Each row of a saved autoencoder gains ``psnr_db`` / ``ssim`` (means over ``recon_clips``)
    on the first ``clips`` of ``videos`` at the row's clip (``input``), measured by ``ldm eval
    recon``'s `evaluate_reconstruction` (on CUDA when there is one); any other row gets
    ``recon_error``: why it has none."""
    from launch.evaluate import evaluate_reconstruction
    from launch.extract import auto_workers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for row in rows:
        name = row["autoencoder"]
        if row.get("error"):
            continue
        if name in autoencoders.REGISTRY:
            row["recon_error"] = "a registered name has random weights: give its trained folder (e.g. RUN/final)"
            continue
        ae = autoencoders.load_pretrained(name)
        if ae.text_dim:
            row["recon_error"] = "text-guided: measure it with `ldm eval recon --text-encoder SPEC`"
            continue
        result = evaluate_reconstruction(ae, videos, *row["input"], num=clips, device=device,
                                         workers=auto_workers(-1, device, 1))  # `ldm eval`'s default: none on a CPU
        row.update(psnr_db=result["psnr_db"]["mean"], ssim=result["ssim"]["mean"], recon_clips=result["clips"])
        del ae
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------
def _shape(r: dict[str, Any]) -> str:
    """The latent column: per-part shapes, ``@Nf`` when costed at another clip length than asked."""
    return parts_text(r.get("latent_shape")) + (f" @{r['input'][0]}f" if r.get("frames_note") else "")


def _num(x: float | None, scale: float, fmt: str) -> str:
    """``x / scale`` in ``fmt`` ("-" for None, in its width); below 1, three significant digits, so
    small models keep their differences (0.0119 and 0.00531, not 0.0 and 0.0)."""
    width = int(fmt.split(".")[0] or 0)
    if x is None:
        return "-".rjust(width)
    v = x / scale
    return f"{v:.3g}".rjust(width) if 0 < abs(v) < 1 else format(v, fmt)


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace | None = None) -> str:
    """A fixed-width table (FLOPs in GFLOP/TFLOP, memory in GiB)."""
    name_w = max(26, *(len(r["autoencoder"]) for r in rows)) if rows else 26
    shape_w = max(24, *(len(_shape(r)) for r in rows)) if rows else 24  # Hi-VAE: 3 parts
    recon = any("psnr_db" in r or "recon_error" in r for r in rows)
    measured = any("dit_train_peak_memory_bytes_measured" in r for r in rows)  # --measure
    head = (f"{'autoencoder':{name_w}s} {'params':>7s} {'latent':{shape_w}s} {'rate':>8s} {'factor':>7s} {'vcpr':>5s} "
            f"{'tokens':>7s} {'fwd GF':>9s} {'train GF':>9s} {'mem GiB':>8s}"
            + (f" {'meas GiB':>8s} {'step s':>8s}" if measured else "")
            + f" {'enc GF':>9s} {'dec GF':>9s} {'sample TF':>10s}"
            + (f" {'PSNR dB':>8s} {'SSIM':>6s}" if recon else ""))
    lines = [head]
    for r in rows:
        params = "-" if r["ae_params"] is None else params_text(r["ae_params"])
        name = f"{r['autoencoder']:{name_w}s} {params:>7s}"
        if r.get("error"):
            lines.append(f"{name} {r['error']}")
            continue
        vcpr = f"{r['vcpr']:.0f}" if r["vcpr"] else "-"
        shape = _shape(r)
        lines.append(f"{name} {shape:{shape_w}s} {r['compression_rate']:8.5f} "
                     f"{r['compression_factor']:7.1f} {vcpr:>5s} {r['tokens']:7d} "
                     f"{_num(r['dit_forward_flops'], 1e9, '9.1f')} {_num(r['dit_train_step_flops'], 1e9, '9.1f')} "
                     f"{_num(r['dit_train_peak_memory_bytes'], 2 ** 30, '8.2f')} "
                     + (f"{_num(r.get('dit_train_peak_memory_bytes_measured'), 2 ** 30, '8.2f')} "
                        f"{_num(r.get('dit_train_step_seconds_measured'), 1, '8.3f')} " if measured else "")
                     + f"{_num(r['ae_encode_flops'], 1e9, '9.1f')} {_num(r['ae_decode_flops'], 1e9, '9.1f')} "
                       f"{_num(r['sample_flops'], 1e12, '10.2f')}"
                     + (f" {_num(r.get('psnr_db'), 1, '8.2f')} {_num(r.get('ssim'), 1, '6.3f')}" if recon else ""))
    for key, what in (("ae_encode_error", "enc GF"), ("ae_decode_error", "dec GF / sample TF"),
                      ("recon_error", "PSNR / SSIM")):
        unmeasured: dict[str, list[str]] = {}  # why a number is "-", once per reason
        for r in rows:
            if r.get(key):
                unmeasured.setdefault(r[key], []).append(r["autoencoder"])
        for reason, names in unmeasured.items():
            lines.append(f"{what} '-' for {', '.join(names)}: {reason}")
    for note in dict.fromkeys(r["frames_note"] for r in rows if r.get("frames_note")):  # once per distinct reason
        lines.append(f"@{note}")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    keys = list(KEYS) + sorted({k for r in rows for k in r} - set(KEYS) - {"memory_breakdown"})
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (parts_text(v) if k == "latent_shape" else json.dumps(v) if isinstance(v, (list, dict))
                        else v) for k, v in r.items()})
    atomic_write_bytes(path, f.getvalue().encode())  # the folder is made if needed


def plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """PNG: DiT FLOPs (forward and a training step, per sample) and training peak memory vs the
    compression rate, one labelled point per autoencoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error") and r["dit_forward_flops"] is not None]
    if not ok:
        raise ValueError("no autoencoder has costs to plot")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    rate = [r["compression_rate"] for r in ok]
    a1.scatter(rate, [r["dit_forward_flops"] / 1e9 for r in ok], label="forward", marker="o")
    a1.scatter(rate, [r["dit_train_step_flops"] / 1e9 for r in ok], label="train step (fwd+bwd)", marker="s")
    a2.scatter(rate, [r["dit_train_peak_memory_bytes"] / 2 ** 30 for r in ok], color="C2", marker="^")
    for ax, key, scale in ((a1, "dit_forward_flops", 1e9), (a2, "dit_train_peak_memory_bytes", 2 ** 30)):
        points: dict[tuple[float, float], list[str]] = {}  # autoencoders on the same point share one label
        for r in ok:
            xy = (float(f"{r['compression_rate']:.4g}"), float(f"{r[key] / scale:.3g}"))
            points.setdefault(xy, []).append(r["autoencoder"])
        for (x, y), names in points.items():
            ax.annotate("\n".join(names), (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points",
                        va="bottom")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compression rate (latent / input elements)")
        ax.grid(alpha=0.3, which="both")
    a1.set_ylabel("DiT GFLOPs per sample (2 x MAC)")
    a1.legend(fontsize=8)
    a2.set_ylabel(f"training peak memory, GiB (batch {ok[0]['batch_size']}, fp32 AdamW)")
    fig.suptitle(title or "downstream cost vs compression")
    fig.tight_layout()
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower() or "png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # the folder is made if needed
