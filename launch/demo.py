"""``ldm demo``: the whole platform end to end on a laptop CPU, with a report.

    ldm demo --output demo_out                 # the full demo (launch/configs/demo.yaml)
    ldm demo --output demo_out --quick         # the same pipeline with tiny numbers (tests, smoke checks)
    ldm demo --output demo_out --config my.yaml sample.guidance=6 dit.steps=2000

Stages, each timed:

1. ``synth``: the synthetic attribute videos (`data.synth`): a subset of shapes x colors x
   directions with a few (color, shape, direction) combinations held out of training, plus an
   evaluation set drawn with another seed that includes the held-out combinations;
2. ``train_ae``: a small autoencoder (`ldm train-ae`, DDP), ``ranks`` processes (torchrun);
3. ``extract``: latent shards with cached builtin text embeddings, ``ranks`` processes (torchrun);
4. ``train_dit``: a class- and text-conditioned DiT with DeepSpeed ZeRO-2, ``ranks`` processes
   (torchrun), rectified flow with independent class / text dropout so that text alone can guide;
5. ``sample``: a fixed prompt suite with classifier-free guidance: training combinations (text +
   class, and text only) and the held-out combinations (text only: their class ids were never
   trained), several seeds each;
6. ``score``: the weight-free attribute reader (`data.attributes`) on every generated video,
   on the evaluation clips and on their reconstructions (the reader's ceiling through the AE);
7. ``report``: ``report.md``, ``report.html`` (videos as MP4 + GIF, loss curves, accuracies vs
   chance, reconstruction PSNR/SSIM, stage timings) and ``report.json`` with the same numbers.

The output folder is bound to the settings (``run.json``): the same command resumes an interrupted
demo, keeping the stages it finished (``work/stages.json``); other settings are refused, naming
them (``--overwrite`` clears the folder and starts again).

The settings live in ``launch/configs/demo.yaml`` (``demo-quick.yaml`` for ``--quick``); the
``dit`` section is an `ldm train` config (``output`` and ``data.shards`` are set by the demo).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from data.attributes import read_attributes
from data.synth import CARDINAL, COLORS, SHAPES, caption, class_id, parse_combo, synth_dataset
from data.video import usable_cores
from autoencoders import build
from launch import runs
from launch.configs import CONFIG_DIR
from launch.extract import ExtractConfig
from launch.extract import check_config as check_extract
from launch.pipeline import Stages, run_verb
from launch.train_ae import TrainAEConfig
from launch.train_config import TrainConfig, check_ranges
from ldm import config as cfglib
from ldm.checkpoint import read_json
from ldm.errors import UserError, check_min, checking
from ldm.samplers import SamplingConfig

MARKER = ".ldm-demo"  # marks a folder written by `ldm demo` (so a rerun with --overwrite may clear it)
ATTRS = ("color", "direction", "shape")


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthStage:
    num: int = 528  # training clips
    eval_per_combo: int = 2  # evaluation clips per combination (held-out ones included), another seed
    frames: int = 8
    size: int = 32
    fps: float = 8.0
    seed: int = 0
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    directions: tuple[str, ...] = CARDINAL
    holdout: tuple[str, ...] = ()  # "color shape direction" combinations never shown in training


@dataclass(frozen=True)
class AEStage:
    autoencoder: str = "kl2d-f8c4-debug"
    frames: int = 0  # frames per training clip (0: synth.frames); a frame-wise AE learns as well from fewer
    steps: int = 1000
    batch_size: int = 8  # per rank
    lr: float = 2e-3
    warmup: int = 50
    kl_weight: float = 1e-6
    num_workers: int = 0  # decoding workers per rank


@dataclass(frozen=True)
class ExtractStage:
    shard_size: int = 64
    batch_size: int = 16
    text_encoder: str = "builtin"


@dataclass(frozen=True)
class SampleStage(SamplingConfig):
    """The sampling settings (``SamplingConfig``: steps, guidance, shift, sampler, seed) and the
    prompt suite."""

    steps: int = 25
    seen: tuple[str, ...] = ()  # training combinations to prompt ("color shape direction")
    seen_seeds: int = 3
    holdout_seeds: int = 6
    batch_size: int = 24
    fps: float = 8.0


@dataclass(frozen=True)
class DemoConfig:
    ranks: int = 2  # processes for extraction and DiT training
    synth: SynthStage = field(default_factory=SynthStage)
    autoencoder: AEStage = field(default_factory=AEStage)
    extract: ExtractStage = field(default_factory=ExtractStage)
    dit: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleStage = field(default_factory=SampleStage)

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        s = self.synth
        for values, known, kind in ((s.shapes, SHAPES, "shape"), (s.colors, COLORS, "color"),
                                    (s.directions, CARDINAL, "direction")):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"synth.{kind}s must be a non-empty subset of {known}, got {list(values)}")
        held = {parse_combo(h) for h in s.holdout}
        for combo in held | {parse_combo(c) for c in self.sample.seen}:
            c, sh, d = combo
            if c not in s.colors or sh not in s.shapes or d not in s.directions:
                raise ValueError(f"combination '{c} {sh} {d}' uses attributes outside synth.shapes/colors/directions")
        overlap = held & {parse_combo(c) for c in self.sample.seen}
        if overlap:
            raise ValueError(f"sample.seen names held-out combinations: {sorted(overlap)}")
        if not self.sample.seen and not held:
            raise ValueError("the prompt suite is empty: give sample.seen and/or synth.holdout")
        if min(self.sample.seen_seeds, self.sample.holdout_seeds, self.sample.steps, self.sample.batch_size) < 1:
            raise ValueError("sample.seen_seeds, holdout_seeds, steps and batch_size must be >= 1")
        shift = self.dit.flow.shift  # SD3 samples at the shift it trained with, as ldm sample does by default
        if self.sample.shift != shift:
            raise ValueError(f"sample.shift {self.sample.shift:g} differs from dit.flow.shift {shift:g}, the shift "
                             f"the DiT trains with: set sample.shift={shift:g} too")


def load_config(path: str | Path, overrides: list[str] = ()) -> DemoConfig:
    """A demo YAML with dotted overrides (unknown keys are errors)."""
    return cfglib.load_yaml(path, DemoConfig, list(overrides))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="report folder (report.md/.html/.json, videos, work/)")
    p.add_argument("--quick", action="store_true", help="tiny numbers: the same pipeline in well under 2 minutes")
    p.add_argument("--config", help="demo YAML (default: launch/configs/demo.yaml, demo-quick.yaml with --quick)")
    p.add_argument("--overwrite", action="store_true",
                   help="clear an earlier demo's --output folder (its checkpoints and report) and run again "
                   "(without it, the same settings resume that demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dit.steps=2000 sample.guidance=6")


def run(args: argparse.Namespace) -> int:
    path = args.config or CONFIG_DIR / ("demo-quick.yaml" if args.quick else "demo.yaml")
    with checking():
        cfg = load_config(path, args.overrides)
    try:
        report = run_demo(cfg, args.output, args.overwrite)
    except UserError:
        raise
    except (ValueError, OSError, RuntimeError) as e:  # a failed stage (its log is named)
        print(f"ldm demo: error: {e}", file=sys.stderr)
        return 1
    acc = report["accuracy"]
    print(f"demo finished in {report['timings_s']['total']:.0f}s -> {Path(args.output) / 'report.md'}")
    for group, r in acc.items():
        print(f"  {group:>16}: " + "  ".join(f"{a} {r[a]:.0%} (chance {r[a + '_chance']:.0%})" for a in ATTRS))
    return 0


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------
def _prepare_output(out: Path, overwrite: bool = False, binding: runs.Binding | None = None) -> None:
    """An empty (or new) folder, or one an earlier demo wrote: resumed when ``binding`` (the
    demo's settings, `check_config`) matches the one it records, cleared first with ``overwrite``;
    anything else is an error (nothing another run wrote is deleted unless asked)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file")
    if _entries(out):
        if not (out / MARKER).exists():
            raise FileExistsError(f"--output {out} is not empty and was not written by `ldm demo`; "
                                  "choose a new folder")
        if overwrite:  # all but the lock this demo holds (`runs.claim_folder`)
            for p in _entries(out):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif not (out / runs.BINDING).exists():  # a demo of a version that did not record its settings
            raise FileExistsError(f"--output {out} holds an earlier demo; give --overwrite to replace it "
                                  "or choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `ldm demo`; `ldm demo --overwrite` clears this folder\n")
    if binding is not None:
        binding.write()


def _entries(out: Path) -> list[Path]:
    """What ``out`` holds, but the lock file of a demo (`runs.claim_folder`)."""
    return [p for p in out.iterdir() if p.name != runs.LOCK] if out.is_dir() else []


def _ae_config(cfg: DemoConfig, work: Path) -> TrainAEConfig:
    """The `ldm train-ae` settings of the demo's autoencoder stage."""
    s, a = cfg.synth, cfg.autoencoder
    return TrainAEConfig(
        autoencoder=a.autoencoder, data=str(work / "videos"), output=str(work / "ae"), frames=a.frames or s.frames,
        height=s.size, width=s.size, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, steps=a.steps,
        kl_weight=a.kl_weight, log_every=max(1, min(10, a.steps // 10)), save_every=max(a.steps, 1),
        sample_every=max(a.steps, 1), num_workers=a.num_workers, seed=s.seed, device="cpu", progress=False)


def _extract_config(cfg: DemoConfig, work: Path) -> ExtractConfig:
    """The `ldm extract` settings of the demo's extraction stage."""
    s, e = cfg.synth, cfg.extract
    return ExtractConfig(
        checkpoint=str(work / "ae" / "final"), input=str(work / "videos"), output=str(work / "latents"),
        frames=s.frames, height=s.size, width=s.size, shard_size=e.shard_size, batch_size=e.batch_size,
        text_encoder=e.text_encoder, device="cpu")


def _dit_config(cfg: DemoConfig, work: Path) -> TrainConfig:
    """The `ldm train` settings of the demo's DiT stage."""
    return cfglib.replace(cfg.dit, output=str(work / "dit"),
                          data=cfglib.replace(cfg.dit.data, shards=str(work / "latents")))


@contextmanager
def _section(name: str) -> Iterator[None]:
    """A stage's settings rejected (any `ValueError`, a `UserError` included): one `UserError`
    that names the section of the demo YAML."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{name}: {e}") from e


def check_config(cfg: DemoConfig, out: Path, overwrite: bool = False) -> runs.Binding:
    """Every stage's settings and the output folder are usable before anything runs (`UserError`
    naming the key otherwise); returns the folder's binding to the settings: an earlier demo's
    folder is resumed only by the same settings (or cleared with ``overwrite``)."""
    check_min({"synth.num": cfg.synth.num, "synth.eval_per_combo": cfg.synth.eval_per_combo,
               "synth.frames": cfg.synth.frames, "synth.size": cfg.synth.size}, 1)
    with _section("autoencoder"):
        ae = _ae_config(cfg, out / "work")
        with torch.device("meta"):
            build(ae.autoencoder).check_input(ae.frames, ae.height, ae.width)
    with _section("extract"):
        check_extract(_extract_config(cfg, out / "work"))
    with _section("dit"):
        check_ranges(_dit_config(cfg, out / "work"))
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder for the report")
    if _entries(out) and not (out / MARKER).exists():
        raise UserError(f"--output {out} is not empty and was not written by `ldm demo`; choose a new folder")
    if (out / MARKER).exists() and not (out / runs.BINDING).exists() and not overwrite:
        raise UserError(f"--output {out} holds a demo of an earlier version (its settings are not recorded); "
                        "give --overwrite to replace it or choose a new folder")
    record = runs.binding_record(cfglib.to_dict(cfg), (), {})
    if overwrite:
        return runs.Binding(out, record)
    return runs.check_binding(out, record, new_folder="--overwrite to start again or a new --output",
                              allow_flag=None)


def _threads_per_rank(ranks: int) -> int:
    """The cores this process may use (pinned, under a container's quota) shared among the ranks."""
    return max(1, usable_cores() // ranks)


def _combo_attrs(combo: str) -> dict[str, str]:
    c, s, d = parse_combo(combo)
    return {"color": c, "shape": s, "direction": d}


def _read(video: torch.Tensor, s: SynthStage) -> dict[str, Any]:
    got = read_attributes(video, s.shapes, s.colors, s.directions)
    return {k: got[k] for k in (*ATTRS, "found", "confidence")}


def accuracy(rows: list[dict[str, Any]], s: SynthStage) -> dict[str, float]:
    """Per-attribute accuracy of reader outputs ``row["read"]`` vs ``row["want"]``, with chance
    (1 / number of candidates), ``all`` (all three right) and ``n``."""
    if not rows:
        raise ValueError("no videos to score")
    n = len(rows)
    out: dict[str, float] = {}
    for a in ATTRS:
        out[a] = sum(r["read"][a] == r["want"][a] for r in rows) / n
    out.update(color_chance=1 / len(s.colors), direction_chance=1 / len(s.directions),
               shape_chance=1 / len(s.shapes),
               all=sum(all(r["read"][a] == r["want"][a] for a in ATTRS) for r in rows) / n,
               all_chance=1 / (len(s.colors) * len(s.directions) * len(s.shapes)),
               found=sum(bool(r["read"]["found"]) for r in rows) / n, n=n)
    return out


STAGES = "stages.json"  # in work/: each finished stage's seconds and result (a rerun skips it)


def run_demo(cfg: DemoConfig, output: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage into ``output`` and return the report (also written as report.json).
    An earlier demo's ``output`` with the same settings is resumed: its finished stages are kept
    (``work/stages.json``), an interrupted one resumes from its own checkpoints (train-ae,
    extract, train) or runs again (the others); ``overwrite`` clears it first."""
    out = Path(output)
    binding = check_config(cfg, out, overwrite)
    runs.claim_folder(out, "a new --output")  # a demo running into it: refused before anything is cleared
    _prepare_output(out, overwrite, binding)
    work = out / "work"
    stages = Stages(work / STAGES, "demo")
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    s = cfg.synth
    report: dict[str, Any] = {"settings": cfglib.to_dict(cfg)}
    report["data"] = stages.run("synth", lambda: _synth(cfg, work))
    report["autoencoder"] = {**stages.run("train_ae", lambda: _train_ae(cfg, work, out)),
                             **stages.run("eval_ae", lambda: _eval_ae(cfg, work, out))}
    report["extract"] = stages.run("extract", lambda: _extract(cfg, work, out))
    report["dit"] = stages.run("train_dit", lambda: _train_dit(cfg, work, out))
    if "score" not in stages.done:  # the videos are scored in memory: sampled again unless scored
        stages.redo("sample")
    videos = stages.run("sample", lambda: _sample(cfg, work, out), keep_result=False)
    report["videos"] = stages.run("score", lambda: _score(videos, s))
    groups = list(dict.fromkeys(v["group"] for v in report["videos"]))
    report["accuracy"] = {g: accuracy([v for v in report["videos"] if v["group"] == g], s) for g in groups}
    report["resumed"] = stages.resumed
    with stages.timed("report"):
        _plot_losses(work, out)
        report["machine"] = {"cpus": os.cpu_count(), "ranks": cfg.ranks,
                             "threads_per_rank": _threads_per_rank(cfg.ranks),
                             "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
                             "torch": torch.__version__}
        report["timings_s"] = {**stages.seconds, "total": stages.earlier_seconds() + time.perf_counter() - t0}
        _write_reports(report, out)
    report["timings_s"] = {**stages.seconds, "total": stages.earlier_seconds() + time.perf_counter() - t0}
    _write_reports(report, out)  # again, with the report stage's own time in the table
    return report


def _synth(cfg: DemoConfig, work: Path) -> dict[str, Any]:
    """The training videos (holdout left out) and the evaluation videos (another seed, all combinations)."""
    s = cfg.synth
    train_set = synth_dataset(work / "videos", num=s.num, frames=s.frames, size=s.size, fps=s.fps, seed=s.seed,
                              shapes=s.shapes, colors=s.colors, directions=s.directions, holdout=s.holdout)
    n_combos = len(s.shapes) * len(s.colors) * len(s.directions)
    eval_set = synth_dataset(work / "eval", num=n_combos * s.eval_per_combo,
                             frames=s.frames, size=s.size, fps=s.fps, seed=s.seed + 1, shapes=s.shapes,
                             colors=s.colors, directions=s.directions, holdout=s.holdout, include_holdout=True)
    return {"train_clips": train_set["count"], "train_combinations": train_set["classes"],
            "eval_clips": eval_set["count"], "holdout": list(s.holdout)}


def _score(videos: list[dict[str, Any]], s: SynthStage) -> list[dict[str, Any]]:
    """The attribute reader on each sampled video (its tensor dropped from the row)."""
    for v in videos:
        v["read"] = _read(v.pop("video"), s)
        v["correct"] = {a: v["read"][a] == v["want"][a] for a in ATTRS}
    return videos


def _train_ae(cfg: DemoConfig, work: Path, out: Path) -> dict[str, Any]:
    """`ldm train-ae` (``train_autoencoder`` under DDP) on ``ranks`` processes (the losses from its
    log, which a resumed run continues: its summary covers the resumed steps only)."""
    a = cfg.autoencoder
    run_verb("train-ae", _ae_config(cfg, work), out / "logs" / "train_ae.log", ranks=cfg.ranks,
             threads=_threads_per_rank(cfg.ranks))
    summary = read_json(work / "ae" / "summary.json")
    _, losses = _read_log(work / "ae" / "log.jsonl", "loss")
    return {"name": a.autoencoder, "steps": summary["steps"], "world_size": summary["world_size"],
            "first_loss": losses[0], "last_loss": losses[-1],
            "steps_per_s": summary["steps_per_s"]}


@torch.no_grad()
def _eval_ae(cfg: DemoConfig, work: Path, out: Path) -> dict[str, Any]:
    """PSNR/SSIM of the trained AE on the evaluation clips (another seed; the held-out combinations
    among them), and the attribute reader on the clips and on their reconstructions."""
    from autoencoders import resolve
    from data.sources import VideoClipDataset, list_items
    from launch.train_ae import save_grid
    from ldm.metrics import psnr, ssim

    s = cfg.synth
    ae = resolve(checkpoint=work / "ae" / "final").model.eval()
    items = list_items(work / "eval")
    clips = VideoClipDataset(items, s.frames, s.size, s.size)
    videos = torch.stack([clips[i]["video"] for i in range(len(items))])  # (N, C, T, H, W)
    recon = torch.cat([ae.decode(ae.encode(videos[i:i + 16])).clamp(-1, 1) for i in range(0, len(videos), 16)])
    p, q = psnr(recon, videos), ssim(recon, videos)
    held = torch.tensor([bool(it.meta.get("holdout")) for it in items])
    want = [{a: it.meta[a] for a in ATTRS} for it in items]
    rows_orig = [{"read": _read(v, s), "want": w} for v, w in zip(videos, want)]
    rows_recon = [{"read": _read(v, s), "want": w} for v, w in zip(recon, want)]
    show = torch.cat([torch.nonzero(held).flatten()[:3], torch.nonzero(~held).flatten()[:3]])
    save_grid(videos[show], recon[show], out / "ae_reconstructions.png", max_frames=s.frames)
    result = {"eval_clips": len(items), "psnr": float(p.mean()), "ssim": float(q.mean()),
              "reader_on_clips": accuracy(rows_orig, s), "reader_on_reconstructions": accuracy(rows_recon, s)}
    if held.any():
        result.update(psnr_holdout=float(p[held].mean()), ssim_holdout=float(q[held].mean()))
    return result


def _extract(cfg: DemoConfig, work: Path, out: Path) -> dict[str, Any]:
    from data.manifest import load_manifest

    run_verb("extract", _extract_config(cfg, work), out / "logs" / "extract.log", ranks=cfg.ranks,
             threads=_threads_per_rank(cfg.ranks))
    m = load_manifest(work / "latents")
    return {"world_size": m.world_size, "written": m.counts.written, "skipped": m.counts.skipped,
            "shards": len(m.shards), "latent_shape": m.latent_spec["latent_shape"],
            "text_encoder": m.text_encoder, "text_dim": m.text_dim, "num_classes": m.num_classes}


def _train_dit(cfg: DemoConfig, work: Path, out: Path) -> dict[str, Any]:
    from dit import load_export

    tcfg = _dit_config(cfg, work)
    run_verb("train", tcfg, out / "logs" / "train.log", ranks=cfg.ranks, threads=_threads_per_rank(cfg.ranks))
    log = [r for r in map(json.loads, (work / "dit" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    ckpt = work / "dit" / "checkpoints"
    latest = ckpt / (ckpt / "latest").read_text().strip()
    model, _ = load_export(work / "dit")
    return {"steps": log[-1]["step"], "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "samples_per_s": sum(r["samples_per_s"] for r in log) / len(log),
            "params": model.num_parameters(), "config": cfglib.to_dict(model.config),
            "deepspeed": cfg.dit.engine.deepspeed,
            # ZeRO partitions the optimizer state: one file per rank proves the world size
            "zero_partitions": len(list(latest.glob("*optim_states.pt")))}


def _sample(cfg: DemoConfig, work: Path, out: Path) -> list[dict[str, Any]]:
    """The prompt suite: (group, combos, seeds, use class ids). Returns one row per video with the
    decoded ``video`` tensor (scored, then dropped)."""
    from autoencoders import resolve_record
    from dit import load_export
    from launch.sample import generate, save_videos
    from ldm.text import build_text_encoder

    s, p = cfg.synth, cfg.sample
    model, export = load_export(work / "dit")
    ae = resolve_record(export.autoencoder).model.eval()
    text_encoder = build_text_encoder(export.text_encoder)
    suites = []
    if p.seen:
        suites += [("seen_text_class", p.seen, p.seen_seeds, True, 0), ("seen_text", p.seen, p.seen_seeds, False, 0)]
    if s.holdout:
        suites.append(("heldout_text", s.holdout, p.holdout_seeds, False, 100_000))
    rows: list[dict[str, Any]] = []
    for group, combos, seeds, use_class, seed0 in suites:
        items = [(_combo_attrs(c), k) for c in combos for k in range(seeds)]
        videos = []
        for i in range(0, len(items), p.batch_size):
            chunk = items[i:i + p.batch_size]
            prompts = [caption(a) for a, _ in chunk]
            ids = [class_id(a["shape"], a["color"], a["direction"]) for a, _ in chunk] if use_class else None
            videos.append(generate(model, ae, export.latent_norm, prompts=prompts, class_ids=ids, frames=s.frames,
                                   height=s.size, width=s.size, sampling=p, seed_offset=seed0 + i,
                                   text_encoder=text_encoder, progress=False))
        video = torch.cat(videos)
        names = [f"{j:03d}-{a['color']}-{a['shape']}-{a['direction']}-s{k}" for j, (a, k) in enumerate(items)]
        save_videos(video, out / "videos" / group, names, p.fps)
        for (a, k), name, v in zip(items, names, video):
            rows.append({"group": group, "prompt": caption(a), "want": a, "seed_index": k,
                         "class_id": class_id(a["shape"], a["color"], a["direction"]) if use_class else None,
                         "mp4": f"videos/{group}/{name}.mp4", "gif": f"videos/{group}/{name}.gif", "video": v})
    return rows


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _read_log(path: Path, key: str) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _plot_losses(work: Path, out: Path) -> None:
    """``dit_loss.png`` (rectified-flow loss per step, with a moving average) and ``ae_loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, path, key, title in (("dit_loss.png", work / "dit" / "log.jsonl", "loss", "DiT: rectified-flow loss"),
                                   ("ae_loss.png", work / "ae" / "log.jsonl", "rec", "Autoencoder: L1 reconstruction loss")):
        steps, values = _read_log(path, key)
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.plot(steps, values, lw=0.8, alpha=0.5, label="logged")
        k = max(1, len(values) // 20)
        if k > 1:
            smooth = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, lw=1.6, label=f"mean of {k}")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


GROUP_TITLES = {"seen_text_class": "training combinations, text + class",
                "seen_text": "training combinations, text only",
                "heldout_text": "held-out combinations, text only"}


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _acc_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    rows = [(GROUP_TITLES.get(g, g), r) for g, r in report["accuracy"].items()]
    ae = report["autoencoder"]
    rows += [("evaluation clips (reader ceiling)", ae["reader_on_clips"]),
             ("AE reconstructions of them", ae["reader_on_reconstructions"])]
    return rows


def _summary_lines(report: dict[str, Any]) -> list[str]:
    st, ae, dit, ex = report["settings"], report["autoencoder"], report["dit"], report["extract"]
    s, d = st["synth"], report["data"]
    t = report["timings_s"]
    return [
        f"data: {d['train_clips']} training clips of {s['frames']} frames at {s['size']}x{s['size']} "
        f"({len(s['shapes'])} shapes x {len(s['colors'])} colors x {len(s['directions'])} directions, "
        f"{d['train_combinations']} combinations; held out: {', '.join(d['holdout']) or 'none'})",
        f"autoencoder: {ae['name']}, {ae['steps']} steps on {st['autoencoder']['frames'] or s['frames']}-frame clips "
        f"(DDP, {ae['world_size']} ranks); latent {ex['latent_shape']}",
        f"extraction: {ex['written']} clips on {ex['world_size']} ranks into {ex['shards']} shards, "
        f"{ex['text_encoder']} text embeddings cached (dim {ex['text_dim']})",
        f"DiT: {dit['params'] / 1e6:.2f} M parameters (hidden {dit['config']['hidden']}, depth "
        f"{dit['config']['depth']}, patch {dit['config']['patch']}), {dit['steps']} steps with DeepSpeed "
        f"{dit['deepspeed']} on {st['ranks']} ranks ({dit['zero_partitions']} optimizer partitions), "
        f"{dit['samples_per_s']:.0f} samples/s",
        f"sampling: {st['sample']['sampler']}, {st['sample']['steps']} steps, guidance {st['sample']['guidance']}",
        f"total wall time: {t['total']:.0f} s on {report['machine']['cpus']} CPU cores "
        f"(load average at start {report['machine']['load_average_start'][0]:.1f})"
        + (f"; resumed: {', '.join(report['resumed'])} done by an earlier run" if report["resumed"] else ""),
    ]


def _markdown(report: dict[str, Any]) -> str:
    ae = report["autoencoder"]
    lines = ["# `ldm demo` report", ""]
    lines += [f"- {x}" for x in _summary_lines(report)]
    lines += ["", "## Attribute accuracy (weight-free reader, vs chance)", "",
              "| videos | n | color | direction | shape | all three |", "|---|---|---|---|---|---|"]
    for title, r in _acc_rows(report):
        lines.append(f"| {title} | {r['n']} | {_pct(r['color'])} ({_pct(r['color_chance'])}) | "
                     f"{_pct(r['direction'])} ({_pct(r['direction_chance'])}) | "
                     f"{_pct(r['shape'])} ({_pct(r['shape_chance'])}) | {_pct(r['all'])} ({_pct(r['all_chance'])}) |")
    lines += ["", "Chance in parentheses. The held-out combinations were never seen in training (their class "
              "ids were never trained, so they are prompted by text only).", "",
              "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    lines += ["", "## Autoencoder", "",
              f"Reconstruction of {ae['eval_clips']} evaluation clips (drawn with another seed, the held-out "
              f"combinations among them): PSNR {ae['psnr']:.2f} dB, SSIM {ae['ssim']:.3f}"
              + (f"; held-out combinations only: PSNR {ae['psnr_holdout']:.2f} dB, SSIM {ae['ssim_holdout']:.3f}."
                 if "psnr_holdout" in ae else "."), "",
              "![AE loss](ae_loss.png)", "",
              "Originals (odd rows) and reconstructions (even rows), first three rows held-out combinations:", "",
              "![reconstructions](ae_reconstructions.png)", "",
              "## DiT", "", "![DiT loss](dit_loss.png)", ""]
    for group in report["accuracy"]:
        lines += [f"## Videos: {GROUP_TITLES.get(group, group)}", "",
                  f"All frames, one video per row: [grid](videos/{group}/grid.png)", "",
                  "| prompt | video | read back | right |", "|---|---|---|---|"]
        for v in (v for v in report["videos"] if v["group"] == group):
            read = " / ".join(v["read"][a] for a in ATTRS)
            marks = " ".join(("✓" if v["correct"][a] else "✗") + a[0] for a in ATTRS)
            lines.append(f"| {v['prompt']} (seed {v['seed_index']}) | ![]({v['gif']}) [mp4]({v['mp4']}) | "
                         f"{read} | {marks} |")
        lines.append("")
    lines += ["Logs: `logs/extract.log`, `logs/train.log`; numbers: `report.json`.", ""]
    return "\n".join(lines)


def _html(report: dict[str, Any]) -> str:
    e = html.escape
    ae = report["autoencoder"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ldm demo report</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}img.v,video{width:96px;image-rendering:pixelated}"
             ".ok{color:#080}.bad{color:#b00}", "</style></head><body><h1><code>ldm demo</code> report</h1><ul>"]
    parts += [f"<li>{e(x)}</li>" for x in _summary_lines(report)]
    parts += ["</ul><h2>Attribute accuracy (weight-free reader, vs chance)</h2><table><tr><th>videos</th><th>n</th>"
              "<th>color</th><th>direction</th><th>shape</th><th>all three</th></tr>"]
    for title, r in _acc_rows(report):
        cells = "".join(f"<td>{_pct(r[a])} <small>(chance {_pct(r[a + '_chance'])})</small></td>"
                        for a in (*ATTRS, "all"))
        parts.append(f"<tr><td>{e(title)}</td><td>{r['n']}</td>{cells}</tr>")
    parts += ["</table><h2>Stage timings</h2><table><tr><th>stage</th><th>seconds</th></tr>"]
    parts += [f"<tr><td>{e(k)}</td><td>{v:.1f}</td></tr>" for k, v in report["timings_s"].items()]
    held = (f"; held-out combinations only: PSNR {ae['psnr_holdout']:.2f} dB, SSIM {ae['ssim_holdout']:.3f}"
            if "psnr_holdout" in ae else "")
    parts += ["</table><h2>Autoencoder</h2>",
              f"<p>Reconstruction of {ae['eval_clips']} evaluation clips: PSNR {ae['psnr']:.2f} dB, "
              f"SSIM {ae['ssim']:.3f}{held}.</p>", "<img src='ae_loss.png'><br>",
              "<p>Originals (odd rows) and reconstructions (even rows):</p>",
              "<img src='ae_reconstructions.png' style='width:480px;image-rendering:pixelated'>",
              "<h2>DiT</h2><img src='dit_loss.png'>"]
    for group in report["accuracy"]:
        parts += [f"<h2>Videos: {e(GROUP_TITLES.get(group, group))}</h2>",
                  "<table><tr><th>prompt</th><th>MP4</th><th>GIF</th><th>read back</th></tr>"]
        for v in (v for v in report["videos"] if v["group"] == group):
            read = " ".join(f"<span class='{'ok' if v['correct'][a] else 'bad'}'>{e(v['read'][a])}</span>"
                            for a in ATTRS)
            parts.append(f"<tr><td>{e(v['prompt'])} <small>(seed {v['seed_index']})</small></td>"
                         f"<td><video src='{e(v['mp4'])}' autoplay loop muted playsinline></video></td>"
                         f"<td><img class='v' src='{e(v['gif'])}'></td><td>{read}</td></tr>")
        parts.append("</table>")
    parts.append("<p>Logs: logs/extract.log, logs/train.log; numbers: report.json.</p></body></html>")
    return "\n".join(parts)


def _write_reports(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    (out / "report.html").write_text(_html(report))
