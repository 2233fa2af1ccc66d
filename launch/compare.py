"""``ldm compare``: autoencoders side by side by what they cost a denoiser and what comes out.

    ldm compare --autoencoders kl2d-f8c4-debug,causal3d-f4x8c4-debug --synth 96 --output cmp \\
                --frames 9 --height 32 --width 32 --dit-steps 300            # a laptop, minutes
    ldm compare --autoencoders runs/ae-a/final,runs/ae-b/final --input /data/clips --output cmp \\
                --frames 17 --height 256 --width 256 --train-config my-dit.yaml --nproc 8 \\
                --i3d i3d_torchscript.pt --lpips-backbone vgg16.pth --lpips-heads vgg.pth   # a GPU node

For every autoencoder (a registered name, or a folder written by ``ldm train-ae`` /
``save_pretrained``), on the same clips: extract latents (``ldm extract``), train the same DiT
config for the same number of steps (``ldm train``), then measure reconstruction (PSNR / SSIM,
LPIPS, FloLPIPS, rFVD and rFID when their weights are given; ``--first-frame``: H3AE's image-to-video
reconstruction where an autoencoder decodes with a first frame), sampling time, the attribute accuracy of generated
videos (on synthetic attribute data: ``--synth`` or an ``ldm data synth`` folder) and FVD (with
``--i3d``), next to the analytic cost of ``ldm cost`` (tokens, FLOPs, estimated memory) for the
very DiT config trained. Registered names without weights can be trained first (``--ae-steps``);
otherwise their weights are random (a pipeline check, flagged in the report).

Writes ``compare.json`` (everything), ``compare.md`` (the side-by-side table) and ``cost.png``.
The output folder is bound to the comparison that made it (``run.json``, `launch.runs`): a rerun
with the same settings resumes its stages (each autoencoder's finished ones, in its ``stages.json``,
are kept) and writes the report again. The evaluation flags (`EVAL_ONLY`: ``--eval-input``,
``--eval-clips``, ``--i3d``, ``--lpips-*``, ``--flow-net``, ``--inception``, ``--first-frame``, ``--sample-steps``,
``--guidance``, ``--per-prompt``, ``--fvd-frames``) do not bind it: each autoencoder's recon stage
(reconstruction metrics) and generate stage (sampling, attributes, FVD) record what they depend on of
them and run again when that changed, the extraction and DiT kept; so does the cost stage (the cost row,
counted under FakeTensorMode: seconds for a debug model, minutes for a large one). Nor does ``--autoencoders``: each
autoencoder's row is bound on its own (``row.json``: its registered name or its folder's weights
hash), so a rerun may add autoencoders (only their rows run) or leave some out (reported without
them, their folders kept); a row whose autoencoder folder holds other weights is refused, naming it,
until ``--redo LABEL`` removes that row's folder and runs it again. A folder bound before rows were
(the whole list in its ``run.json``) resumes as before: its rows get their ``row.json`` from it
(`_earlier_rows`). A rerun with other training settings, another training config or other videos is
refused before anything runs, naming what differs: give ``--overwrite`` to start the folder again (it
removes the earlier comparison's own outputs, `_earlier_outputs`, and nothing else), or a new ``--output``.
Measured step time is the median wall time of a training step after the first (from the run's
log); measured peak memory is ``torch.cuda.max_memory_allocated`` over the training run (GPU, one
process per run; ``--nproc`` > 1 runs under torchrun and reports the estimate only).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

import autoencoders
from data.manifest import load_manifest
from data.video import READING_VERSION
from dit import load_export
from launch import cost as costlib
from launch import dist
from launch import evaluate as ev
from launch import runs
from launch.configs import config_path
from launch.extract import ExtractConfig, auto_workers, source_rates
from launch.list_models import params_text
from launch.pipeline import Stages, run_verb
from launch.train_ae import TrainAEConfig
from launch.train_config import TrainConfig, dit_overrides
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_bytes, atomic_write_json, dir_hash, file_sha256, read_json
from ldm.errors import MissingInput, UserError, check_min, checking
from ldm.metrics import FVD_FRAMES, load_flow_net, load_i3d, load_inception
from ldm.samplers import SamplingConfig

DEFAULT_TRAIN = "train-debug"  # a built-in config's name (launch.configs)
STAGES = "stages.json"  # in each autoencoder's folder: its finished stages (`launch.pipeline.Stages`)
ROW = "row.json"  # in each autoencoder's folder: what its row was made from (`_row_record`)
REPORT = ("compare.json", "compare.md", "cost.png")
TRASH = ".overwritten"  # `--overwrite` moves the earlier comparison here, then removes it (`_clear`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoders", required=True,
                   help="NAME|DIR[,NAME|DIR...]: registered names or saved autoencoder folders (a rerun into "
                   "--output may add some, run alone, or leave some out, their rows kept on disk)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="training videos (folder / raw shards as `ldm extract`; an `ldm data synth` "
                     "folder enables the attribute benchmark)")
    src.add_argument("--synth", type=int, metavar="N", help="generate N synthetic attribute clips into OUTPUT/data")
    p.add_argument("--shapes", nargs="+", help="with --synth: the shapes (default all)")
    p.add_argument("--colors", nargs="+", help="with --synth: the colors (default all)")
    p.add_argument("--directions", nargs="+", help="with --synth: the directions (default the four cardinal)")
    p.add_argument("--eval-input", help="held-out videos for reconstruction / FVD (default: a synthetic set drawn "
                   "with another seed, or a random --eval-clips of --input, seeded by --seed)")
    p.add_argument("--output", required=True)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--fps", type=float)
    p.add_argument("--ae-steps", type=int, default=0,
                   help="train each registered autoencoder without weights for N steps first (0: use as is)")
    p.add_argument("--train-config", default=DEFAULT_TRAIN, help="an `ldm train` YAML or a built-in one's name "
                   "(output and data.shards are set per autoencoder)")
    p.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides of the training YAML, e.g. model.dit=dit-S optim.lr=3e-4")
    p.add_argument("--dit-steps", type=int, help="training steps (overrides the YAML's steps)")
    p.add_argument("--nproc", type=int, default=1, help="processes for extraction and training (torchrun)")
    p.add_argument("--eval-clips", type=int, default=8)
    p.add_argument("--per-prompt", type=int, default=1, help="attribute benchmark: samples per prompt")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=SamplingConfig.guidance)
    p.add_argument("--lpips-backbone")
    p.add_argument("--lpips-heads")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--flow-net", metavar="FILE", help="FloLPIPS too, as `ldm eval recon --flow-net` (with the LPIPS "
                   "files): a TorchScript optical-flow network")
    p.add_argument("--i3d", help="FVD / rFVD extractor (i3d_torchscript.pt)")
    p.add_argument("--fvd-frames", type=int, default=FVD_FRAMES)
    p.add_argument("--inception", help="rFID over frames: StyleGAN2-ADA's TorchScript Inception "
                   "(inception-2015-12-05.pt), as `ldm eval recon --inception`")
    p.add_argument("--first-frame", action="store_true",
                   help="reconstruct with each clip's first frame where the autoencoder decodes with one (H3AE's "
                   "image-to-video reconstruction); the others decode plainly, said per row")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="start --output again: remove the earlier comparison there (its run.json, report, data/ and "
                   "each autoencoder's folder; nothing else), e.g. after changing the training settings")
    p.add_argument("--redo", metavar="LABEL[,LABEL...]",
                   help="remove these rows' folders and run their stages again, the other rows kept, e.g. after "
                   "replacing an autoencoder's weights (LABEL: the row's name in the report)")


# flags that may differ when a comparison is rerun into its folder; every other flag, the training
# config's content and the inputs bind it (the stages' own bindings would refuse the change anyway,
# naming flags `ldm compare` does not take). --autoencoders binds each row on its own (`ROW`): rows
# may be added or left out
HARMLESS = ("--output", "--device", "--train-config", "--train", "--overwrite", "--redo", "--autoencoders")
# what a folder's run.json held of its autoencoders before each row was bound on its own (`_earlier_rows`)
BOUND_BEFORE_ROWS = ("--autoencoders", "autoencoder_weights")
# flags that change only how each autoencoder is evaluated: they do not bind the folder; its recon and
# generate stages record what they depend on of them (`_eval_keys`) and run again when that differs,
# keeping the extraction and the DiT
EVAL_ONLY = ("--eval-input", "--eval-clips", "--per-prompt", "--sample-steps", "--guidance", "--lpips-backbone",
             "--lpips-heads", "--lpips-net", "--flow-net", "--i3d", "--fvd-frames", "--inception", "--first-frame")
EVAL_FILES = ("--lpips-backbone", "--lpips-heads", "--flow-net", "--i3d", "--inception")  # keyed by their sha256


def check_args(args: argparse.Namespace) -> tuple[list[dict[str, Any]], runs.Binding, dict[str, Any]]:
    """The numbers, files and autoencoders of an ``ldm compare`` command are usable, and an output
    folder of an earlier comparison was made by the same settings, before any work or folder
    (`UserError` naming the flag otherwise); returns the autoencoder entries, the binding and the
    evaluation settings (`_eval_settings`)."""
    args.train_config = config_path(args.train_config)  # a built-in name -> its file
    check_min({"--frames": args.frames, "--height": args.height, "--width": args.width, "--synth": args.synth,
               "--dit-steps": args.dit_steps, "--nproc": args.nproc, "--eval-clips": args.eval_clips,
               "--per-prompt": args.per_prompt, "--sample-steps": args.sample_steps,
               "--fvd-frames": args.fvd_frames}, 1)
    check_min({"--ae-steps": args.ae_steps, "--guidance": args.guidance}, 0)
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps must be > 0, got {args.fps}")
    if Path(args.output).is_file():
        raise UserError(f"--output {args.output} is a file; give a folder for the report")
    out = Path(args.output)
    if out.is_dir() and any(p.name not in (runs.LOCK, TRASH) for p in out.iterdir()) and \
            not (out / runs.BINDING).is_file():
        raise UserError(f"--output {args.output} is not empty and holds no `ldm compare` run (no {runs.BINDING}); "
                        "choose a new folder")
    earlier = runs.bound_record(out)
    is_compare = "--ae-steps" in earlier or "--autoencoders" in earlier  # a key of no other verb's run.json
    if (out / runs.BINDING).is_file() and not is_compare and (earlier or args.overwrite):
        raise UserError(f"--output {args.output}: its {runs.BINDING} is not an `ldm compare` run's (another verb's, "
                        "or unreadable); choose a new folder")
    paths = {"--input": args.input, "--eval-input": args.eval_input, "--train-config": args.train_config,
             "--lpips-backbone": args.lpips_backbone, "--lpips-heads": args.lpips_heads, "--flow-net": args.flow_net,
             "--i3d": args.i3d, "--inception": args.inception}
    for flag, path in paths.items():
        if path is not None and not Path(path).exists():
            raise MissingInput(f"{flag} {path}: not found")
    ev.check_clip_frames(args.frames, args.fvd_frames if args.i3d else None)
    ev.check_lpips_files(args.lpips_backbone, args.lpips_heads, args.flow_net)
    from data.sources import list_items
    inputs = {}
    for flag, folder in {"--input": args.input, "--eval-input": args.eval_input}.items():
        if folder is not None:
            with checking(flag):
                keys = [it.key for it in list_items(folder)]
            inputs[flag] = f"{len(keys)} (keys sha256 {hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:16]})"
    with checking("--train"):
        train_cfg = cfglib.load_yaml(args.train_config, TrainConfig, list(args.train))
    if args.synth:
        from data.synth import combinations
        with checking():
            combinations(args.shapes, args.colors, args.directions)
    with checking("--autoencoders"):
        entries = _entries(args.autoencoders)
    with checking(f"--frames {args.frames} --height {args.height} --width {args.width}"):
        for e in entries:  # every autoencoder must take the clip size before anything runs
            costlib.latent_spec(e["checkpoint"] or e["name"], args.frames, args.height, args.width)
    for e in entries:
        e["first_frame"] = bool(args.first_frame and autoencoders.config_of(e["checkpoint"] or e["name"])[0]
                                .first_frame_decoding)
    if args.first_frame and not any(e["first_frame"] for e in entries):
        raise UserError("--first-frame: none of --autoencoders decodes with a first frame (H3AE does); leave it out")
    redo = _items(args.redo or "")
    if redo and args.overwrite:
        raise UserError("--redo with --overwrite: --overwrite runs every row again; give one of them")
    for e in entries:
        e["row"] = _row_record(e)
    if not args.overwrite:
        _keep_labels(out, entries)
    labels = [e["label"] for e in entries]
    for label in redo:
        if label not in labels:
            raise UserError(f"--redo {label}: not a row of this comparison (its rows: {', '.join(labels)})")
    for e in entries:
        e["redo"] = e["label"] in redo
    settings = {"--" + k.replace("_", "-"): v for k, v in vars(args).items()
                if not k.startswith("_") and not callable(v) and k not in ("verb", "debug")}
    eval_input = inputs.pop("--eval-input", None)  # keys the evaluation stages, binds nothing
    facts = {"train": {k: v for k, v in cfglib.to_dict(train_cfg).items() if k != "output"}, "inputs": inputs}
    facts["train"]["data"].pop("shards", None)  # set per autoencoder
    record = runs.binding_record(settings, HARMLESS + EVAL_ONLY, facts)
    if args.overwrite:  # nothing of the earlier comparison is kept: nothing to match
        _check_outside(out, _earlier_outputs(out, labels), "--overwrite", entries, paths)
        return entries, runs.Binding(out, record), _eval_settings(settings, eval_input)
    hints = {f"inputs.{flag}": f"{flag} {paths[flag]} holds other videos than that run's" for flag in inputs}
    binding = runs.check_binding(args.output, record, new_folder="--overwrite to start again or a new --output",
                                 allow_flag=None, harmless=EVAL_ONLY + ("inputs.--eval-input",)  # bound before keyed
                                 + BOUND_BEFORE_ROWS, hints=hints)  # each row's own now: `_check_rows`
    _check_rows(out, entries)
    _check_outside(out, [out / _safe(e["label"]) for e in entries if e["redo"]], "--redo", entries, paths)
    return entries, binding, _eval_settings(settings, eval_input)


def _row_record(entry: dict[str, Any]) -> dict[str, Any]:
    """What an autoencoder's row is made from besides the settings every row shares (those bind the
    folder): a registered name, or a saved folder's weights (the hash of its files)."""
    return {"autoencoder": None if entry["checkpoint"] else entry["name"],
            "weights": dir_hash(entry["checkpoint"]) if entry["checkpoint"] else None}


def _item(entry: dict[str, Any]) -> str:
    """Which autoencoder an entry is, as rows record it: its registered name or its folder's absolute path."""
    return str(Path(entry["checkpoint"]).resolve()) if entry["checkpoint"] else entry["name"]


def _earlier_rows(out: Path) -> dict[str, dict[str, Any]]:
    """The rows an earlier comparison made in ``out``: folder name -> its ``record`` (`_row_record`),
    ``label`` and ``item`` (`_item`), from its ``row.json``, or for a folder bound before each row
    was, from ``run.json`` (the whole ``--autoencoders`` value and each saved folder's weights hash)."""
    rows: dict[str, dict[str, Any]] = {}
    old = runs.bound_record(out)
    if "--autoencoders" in old:
        items = _items(old["--autoencoders"])
        for item, label in zip(items, _labels(items)):
            registered = item in autoencoders.REGISTRY
            rows[_safe(label)] = {"record": {"autoencoder": item if registered else None,
                                             "weights": old.get(f"autoencoder_weights.{label}")},
                                  "label": label, "item": item if registered else str(Path(item).resolve())}
    for row in sorted(out.glob(f"*/{ROW}")):
        try:
            saved = read_json(row)
            rows[row.parent.name] = {"record": dict(saved["record"]), "label": saved["label"], "item": saved["item"]}
        except (OSError, ValueError, KeyError, TypeError):
            rows[row.parent.name] = {"record": {"autoencoder": None, "weights": f"(unreadable {row})"},
                                     "label": row.parent.name, "item": None}
    return rows


def _keep_labels(out: Path, entries: list[dict[str, Any]]) -> None:
    """Each autoencoder keeps the label of the row an earlier comparison made of it in ``out`` (of the
    same weights and folder, else of the same registered name or weights, else of the same folder:
    replaced weights, which `_check_rows` refuses), whatever else is given now; a new one gets the
    label a first run gives it (`_labels`), numbered on where an earlier row or one of this run has it.
    (`_labels` numbers every autoencoder by position when two share a name: adding or leaving out one
    would rename, and redo, every row.)"""
    earlier = _earlier_rows(out)
    kept: dict[int, str] = {}  # entry index -> the earlier row (folder name) it continues
    same = {"record": lambda e, r: r["record"] == e["row"], "item": lambda e, r: r["item"] == _item(e)}
    for ways in (("record", "item"), ("record",), ("item",)):  # a row of the same weights and folder first
        for i, e in enumerate(entries):
            found = [name for name, r in earlier.items()
                     if all(same[way](e, r) for way in ways) and name not in kept.values()]
            if i not in kept and found:
                kept[i] = found[0]
    for i, name in kept.items():
        entries[i]["label"] = earlier[name]["label"]
    used = set(earlier)
    for e in (e for i, e in enumerate(entries) if i not in kept):
        base, n = _labels([e["checkpoint"] or e["name"]])[0], 0
        while _safe(e["label"]) in used:
            e["label"], n = f"{n}-{base}", n + 1
        used.add(_safe(e["label"]))


def _check_rows(out: Path, entries: list[dict[str, Any]]) -> None:
    """Each autoencoder's row that an earlier comparison started in ``out`` was made from the same
    autoencoder (`_row_record`), unless ``--redo`` redoes it: `UserError` naming each row that was not."""
    earlier = _earlier_rows(out)
    differ = []
    for e in entries:
        old = earlier.get(_safe(e["label"]), {}).get("record")
        if e["redo"] or old is None or old == e["row"] or not (out / _safe(e["label"])).is_dir():
            continue
        if old["weights"] and e["row"]["weights"]:
            differ.append((e["label"], f"{e['checkpoint']} holds other weights than the row was made with"))
        else:
            said = [r["autoencoder"] or f"a saved folder, weights {r['weights']}" for r in (old, e["row"])]
            differ.append((e["label"], f"made from {said[0]}, now {said[1]}"))
    if differ:
        labels = [label for label, _ in differ]
        said = "; ".join(f"row {label}: {why}" for label, why in differ)
        raise UserError(f"{out} holds rows made from other autoencoders ({said}); give --redo "
                        f"{','.join(labels)} to redo {'that row' if len(labels) == 1 else 'those rows'} only (the "
                        "other rows kept), --overwrite to start the comparison again, or a new --output")


def _check_outside(out: Path, removed: list[Path], flag: str, entries: list[dict[str, Any]],
                   paths: dict[str, str | None]) -> None:
    """``flag`` (--overwrite, --redo) would remove no input: `UserError` for a file or folder given to
    this comparison (videos, configs, weights, an autoencoder an earlier comparison trained with
    ``--ae-steps``) that lies inside what it removes (``removed``: the earlier comparison's outputs)."""
    given = [(flag, path) for flag, path in paths.items() if path is not None]
    given += [("--autoencoders", e["checkpoint"]) for e in entries if e["checkpoint"]]
    for output in removed:
        for given_flag, path in given:
            if Path(path).resolve().is_relative_to(output.resolve()):
                raise UserError(f"{given_flag} {path} lies inside {output}, which {flag} removes (the earlier "
                                f"comparison's output); copy it out of {out} first, or give a new --output")


def _earlier_outputs(out: Path, labels: list[str]) -> list[Path]:
    """What an earlier comparison wrote into ``out``, which ``--overwrite`` removes: each
    autoencoder's folder (of ``labels`` and of the rows it made, `_earlier_rows`, those left out of
    its report included), the synthetic data, the report and, last, run.json; nothing else the folder
    holds."""
    names = list(dict.fromkeys([*map(_safe, labels), *_earlier_rows(out), "data", *REPORT, runs.BINDING]))
    return [out / name for name in names if (out / name).exists() or (out / name).is_symlink()]


def _clear(out: Path, labels: list[str]) -> None:
    """``--overwrite``: the earlier comparison's outputs (`_earlier_outputs`) moved into ``out/TRASH``
    one by one, run.json last, then removed. An interrupted clearing leaves each autoencoder's folder
    whole or gone (never a stages.json without the files it describes), and the folder bound to the
    earlier comparison until its run.json goes; the next run removes what TRASH still holds."""
    earlier = _earlier_outputs(out, labels)
    if not earlier:
        print(f"ldm compare: --overwrite: {out} holds no earlier comparison, nothing removed", file=sys.stderr,
              flush=True)
        return
    _remove(out, earlier)
    kept = sorted(p.name for p in out.iterdir() if p.name != runs.LOCK)
    print(f"ldm compare: --overwrite: removed the earlier comparison from {out} "
          f"({', '.join(p.name for p in earlier)})" + (f"; kept what it did not write: {', '.join(kept)}" if kept
                                                       else ""), file=sys.stderr, flush=True)


def _remove(out: Path, paths: list[Path]) -> None:
    """``paths`` (inside ``out``) moved into ``out/TRASH`` one by one, then removed: each one whole or gone."""
    (out / TRASH).mkdir()
    for path in paths:
        path.rename(out / TRASH / path.name)
    shutil.rmtree(out / TRASH)


def _redo(out: Path, entries: list[dict[str, Any]]) -> None:
    """``--redo``: the earlier folders of the rows it names removed (`_remove`), so that their stages
    run again; the other rows untouched."""
    rows = [out / _safe(e["label"]) for e in entries if e["redo"] and (out / _safe(e["label"])).exists()]
    if not rows:
        named = ", ".join(e["label"] for e in entries if e["redo"])
        print(f"ldm compare: --redo: {out} holds no earlier row of {named}, nothing removed", file=sys.stderr,
              flush=True)
        return
    _remove(out, rows)
    said = ", ".join(f"{p.name} ({p})" for p in rows)
    print(f"ldm compare: --redo: removed the earlier row{'s' * (len(rows) > 1)} {said}; the other rows kept",
          file=sys.stderr, flush=True)


def _bind_rows(out: Path, entries: list[dict[str, Any]]) -> list[str]:
    """Each row's ``row.json`` (`_row_record`): the given autoencoders' rows, and the rows a folder bound
    before rows were (`_earlier_rows`) holds, before run.json is written again without them. Returns
    the folders of earlier rows that are not given and hold more than their row.json (left out of the
    report, kept on disk)."""
    given = {_safe(e["label"]): {"record": e["row"], "label": e["label"], "item": _item(e)} for e in entries}
    earlier = _earlier_rows(out)
    left_out = []
    for name, row in {**earlier, **given}.items():
        if not (out / name).is_dir() and name not in given:
            continue
        (out / name).mkdir(parents=True, exist_ok=True)
        if not (out / name / ROW).is_file() or earlier.get(name) != row:
            atomic_write_json(out / name / ROW, {"format": runs.FORMAT, **row})
        if name not in given and any(p.name != ROW for p in (out / name).iterdir()):  # one it started
            left_out.append(name)
    return left_out


def run(args: argparse.Namespace) -> int:
    report = compare(args)
    print((Path(args.output) / "compare.md").read_text())
    print(f"compare finished in {report['seconds']:.0f}s -> {Path(args.output) / 'compare.md'}")
    for f in report["failed"]:
        print(f"ldm compare: {f['autoencoder']} failed ({f['error']}), left out of the report; its traceback: "
              f"{f['log']}; the same command reruns it, keeping every stage finished", file=sys.stderr)
    return 1 if report["failed"] else 0


# ------------------------------------------------------------------------------------------
def _entries(spec: str) -> list[dict[str, Any]]:
    """Each autoencoder: its label, registered name and/or checkpoint folder (``autoencoders.config_of``
    says whether an item is either). A folder's label is its own name, or its run's for a
    ``train-ae`` RUN/final."""
    out = []
    items = _items(spec)
    for item, label in zip(items, _labels(items)):
        autoencoders.config_of(item)  # unknown: a clear error before anything runs
        if item in autoencoders.REGISTRY:
            out.append({"label": label, "name": item, "checkpoint": None})
        else:
            out.append({"label": label, "name": read_json(Path(item) / "config.json").get("name"),
                        "checkpoint": str(item)})
    if not out:
        raise UserError("--autoencoders is empty: give NAME[,NAME...] (see `ldm list`) or saved folders")
    return out


def _items(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def _labels(items: list[str]) -> list[str]:
    """Each autoencoder's name in the report (and its folder's, `_safe`): a registered name as it is,
    a folder by its own name or its run's for a ``train-ae`` RUN/final; repeated names numbered."""
    labels = []
    for item in items:
        folder = Path(item).resolve()
        labels.append(item if item in autoencoders.REGISTRY else
                      folder.parent.name if folder.name == "final" else folder.name)
    return labels if len(set(labels)) == len(labels) else [f"{i}-{label}" for i, label in enumerate(labels)]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _data(args: argparse.Namespace, out: Path) -> tuple[str, str, dict[str, Any] | None]:
    """(training videos, evaluation videos, the synthetic spec when the data is synthetic)."""
    from data.synth import synth_dataset

    if args.synth:
        s = synth_dataset(out / "data" / "train", num=args.synth, frames=args.frames, height=args.height,
                          width=args.width, fps=args.fps or 8, seed=args.seed, shapes=args.shapes,
                          colors=args.colors, directions=args.directions)["spec"]
        train = str(out / "data" / "train")
    else:
        train = args.input
        spec_file = Path(train) / "synth.json"
        s = json.loads(spec_file.read_text())["spec"] if spec_file.is_file() else None
    if args.eval_input:
        return train, args.eval_input, s
    if s is not None:  # another seed, held-out combinations included; another --eval-clips: another folder
        folder = out / "data" / "eval"
        if (folder / "synth.json").is_file() and read_json(folder / "synth.json")["spec"]["num"] != args.eval_clips:
            folder = out / "data" / f"eval-{args.eval_clips}"
        synth_dataset(folder, num=args.eval_clips, frames=args.frames, height=args.height,
                      width=args.width, fps=args.fps or 8, seed=s["seed"] + 1000, shapes=s["shapes"],
                      colors=s["colors"], directions=s["directions"], holdout=[" ".join(h) for h in s["holdout"]],
                      include_holdout=True)
        return train, str(folder), s
    return train, train, None


def _train_ae(entry: dict[str, Any], args: argparse.Namespace, train_data: str, work: Path) -> dict[str, Any]:
    cfg = TrainAEConfig(data=train_data, output=str(work / "ae"), autoencoder=entry["name"], frames=args.frames,
                        height=args.height, width=args.width, batch_size=4, lr=1e-3, steps=args.ae_steps,
                        log_every=max(1, args.ae_steps // 10), save_every=args.ae_steps, sample_every=args.ae_steps,
                        num_workers=0, seed=args.seed, progress=False, device=args.device)
    summary = run_verb("train-ae", cfg, work / "train_ae.log", in_process=True)
    return {"steps": args.ae_steps, "first_loss": summary.get("first_loss"), "last_loss": summary.get("last_loss"),
            "final": summary["final"]}


def _extract(entry: dict[str, Any], args: argparse.Namespace, train_data: str, work: Path) -> dict[str, Any]:
    latents = work / "latents"
    cfg = ExtractConfig(autoencoder=None if entry["checkpoint"] else entry["name"], checkpoint=entry["checkpoint"],
                        input=train_data, output=str(latents), frames=args.frames, height=args.height,
                        width=args.width, fps=args.fps, text_encoder="builtin", device=args.device, seed=args.seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning is in the report
        run_verb("extract", cfg, work / "extract.log", ranks=args.nproc, in_process=args.nproc == 1)
    return {"seconds": time.perf_counter() - t0, "clips": load_manifest(latents).counts.written}


def _dit_config(args: argparse.Namespace, work: Path) -> TrainConfig:
    """The `ldm train` settings of one autoencoder's DiT (its latents in ``work/latents``)."""
    over = [f"output={work / 'dit'}", f"data.shards={work / 'latents'}", "log_every=1", "keep_checkpoints=1",
            *args.train]
    if args.dit_steps:
        over.append(f"steps={args.dit_steps}")
    cfg = cfglib.load_yaml(args.train_config, TrainConfig, over)
    return cfglib.replace(cfg, save_every=cfg.steps)


def _train_dit(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cfg = _dit_config(args, work)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    t0 = time.perf_counter()
    peak = None
    if cuda and args.nproc == 1:
        torch.cuda.reset_peak_memory_stats()
    run_verb("train", cfg, work / "train.log", ranks=args.nproc, in_process=args.nproc == 1)
    if cuda and args.nproc == 1:
        peak = int(torch.cuda.max_memory_allocated())
    seconds = time.perf_counter() - t0
    log = [r for r in map(json.loads, (work / "dit" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    per_step = cfg.data.batch_size * cfg.optim.grad_accum * args.nproc
    step_s = [per_step / r["samples_per_s"] for r in log[1:] if r.get("samples_per_s")]  # first step: warm-up
    return {"steps": cfg.steps, "batch_size": cfg.data.batch_size, "nproc": args.nproc, "seconds": seconds,
            "step_s_median": statistics.median(step_s) if step_s else None, "first_loss": log[0]["loss"],
            "last_loss": log[-1]["loss"], "peak_memory_bytes_measured": peak,
            "peak_memory_method": "torch.cuda.max_memory_allocated over the run (EMA and DeepSpeed buffers "
                                  "included)" if peak is not None else None}


def _loaded(work: Path, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """An autoencoder's trained DiT, its export, the autoencoder it trained on and its text encoder (or None)."""
    model, export = load_export(work / "dit", device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ae = autoencoders.resolve_record(export.autoencoder).model.to(device).eval()
    text_encoder = None
    if ae.text_dim:
        from ldm.text import build_text_encoder
        text_encoder = build_text_encoder("builtin", device=device)
    return model, export, ae, text_encoder


def _recon(entry: dict[str, Any], args: argparse.Namespace, eval_data: str, work: Path, lpips, i3d, inception,
           device: torch.device, flow_net=None) -> dict[str, Any]:
    """The recon stage: reconstruction quality on the evaluation clips."""
    _, _, ae, text_encoder = _loaded(work, device)
    return {"recon": ev.evaluate_reconstruction(ae, eval_data, args.frames, args.height, args.width, fps=args.fps,
                                                num=args.eval_clips, seed=args.seed, device=device, lpips=lpips,
                                                i3d=i3d,  # the same random clips as FVD's reference (its seed)
                                                fvd_frames=args.fvd_frames, text_encoder=text_encoder,
                                                grid=work / "recon_grid.png", inception=inception,
                                                first_frame=entry["first_frame"], workers=_readers(device),
                                                flow_net=flow_net)}


def _generate(args: argparse.Namespace, eval_data: str, synth: dict[str, Any] | None, work: Path, i3d,
              device: torch.device) -> dict[str, Any]:
    """The generate stage: sampling time, the attribute benchmark on synthetic data, FVD with ``i3d``."""
    model, export, ae, _ = _loaded(work, device)
    out: dict[str, Any] = {}
    # the shift the DiT trained with, as `ldm sample` and `eval gen` take it (SD3: one shift for both)
    sampling = SamplingConfig(steps=args.sample_steps, guidance=args.guidance, seed=args.seed, shift=export.flow_shift)
    clip = dict(frames=args.frames, height=args.height, width=args.width, sampling=sampling, device=device)
    if synth is not None:
        suite = ev.attribute_suite(synth["shapes"], synth["colors"], synth["directions"],
                                   [" ".join(h) for h in synth["holdout"]])
        shutil.rmtree(work / "samples", ignore_errors=True)  # an earlier run's (another --per-prompt: other files)
        (work / "samples").mkdir()
        out["attributes"] = ev.attribute_benchmark(model, ae, export, suite, per_prompt=args.per_prompt,
                                                   save_dir=work / "samples", **clip)
        out["sample_s_per_video"] = out["attributes"]["sample_s_per_video"]
    else:  # no attribute suite: time a few samples
        from launch.sample import generate, sampling_text_encoder

        text = bool(model.config.text_dim and export.text_encoder)
        n = max(1, min(args.eval_clips, 4))
        t0 = time.perf_counter()  # an unconditional DiT samples without guidance (one model call per step)
        generate(model, ae, export.latent_norm, prompts=["a video"] * n if text else None,
                 class_ids=[0] * n if not text and model.config.num_classes else None, count=n, progress=False,
                 text_encoder=sampling_text_encoder(model, ae, export, text, device), **clip)
        out["sample_s_per_video"] = (time.perf_counter() - t0) / n
    if i3d is not None:
        out["fvd"] = ev.generation_fd(model, ae, export, eval_data, num=args.eval_clips, i3d=i3d, inception=None,
                                      fvd_frames=args.fvd_frames, workers=_readers(device), **clip)["fvd"]
    return out


def _readers(device: torch.device) -> int:
    """The processes that decode the evaluation clips: `ldm eval`'s default (none on the CPU)."""
    return auto_workers(-1, device, 1)  # one process evaluates


def _sha(path: str | None) -> str | None:
    """A file setting as a stage key holds it: its content's sha256 (None: not given)."""
    if path is None:
        return None
    return file_sha256(path) if Path(path).is_file() else f"{path} (not found)"


def _eval_settings(settings: dict[str, Any], eval_input: str | None) -> dict[str, Any]:
    """`EVAL_ONLY`'s flags among ``settings`` (flag -> value), each file by its sha256 and --eval-input
    by its clips (count and keys' hash; None without it)."""
    return {**{f: settings.get(f) for f in EVAL_ONLY}, **{f: _sha(settings.get(f)) for f in EVAL_FILES},
            "--eval-input": eval_input}


def _eval_keys(s: dict[str, Any], first_frame: bool, synthetic: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys of an autoencoder's recon and generate stages (`Stages.run`): what each depends on of
    the evaluation settings ``s`` (`_eval_settings`; None: not used by the stage), and the video reading's
    version where the stage reads videos (`data.video.READING_VERSION`: results read by an earlier version are
    measured again, so that the rows of one table read their clips alike)."""
    lpips = bool(s["--lpips-backbone"] or s["--lpips-heads"])
    fvd = s["--i3d"] is not None
    recon = {"--eval-input": s["--eval-input"], "--eval-clips": s["--eval-clips"],
             "--lpips-backbone": s["--lpips-backbone"], "--lpips-heads": s["--lpips-heads"],
             "--lpips-net": s["--lpips-net"] if lpips else None, "--i3d": s["--i3d"],
             "--fvd-frames": s["--fvd-frames"] if fvd else None, "--inception": s["--inception"],
             "--first-frame": first_frame, "reading": READING_VERSION,
             **({"--flow-net": s["--flow-net"]} if s.get("--flow-net") else {})}  # absent: results made before it kept
    generate = {"--sample-steps": s["--sample-steps"], "--guidance": s["--guidance"],
                "--per-prompt": s["--per-prompt"] if synthetic else None,
                "--eval-clips": s["--eval-clips"] if fvd or not synthetic else None,  # FVD's clips, or those timed
                "--eval-input": s["--eval-input"] if fvd else None, "--i3d": s["--i3d"],
                "--fvd-frames": s["--fvd-frames"] if fvd else None, **({"reading": READING_VERSION} if fvd else {})}
    return recon, generate


def _earlier_settings(out: Path) -> dict[str, Any]:
    """The evaluation settings (`_eval_settings`) of the comparison that bound ``out`` when they bound
    it (its ``run.json`` holds them; flags it predates: their defaults)."""
    record = runs.bound_record(out)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    values = {f: record.get(f, parser.get_default(f[2:].replace("-", "_"))) for f in EVAL_ONLY}
    return _eval_settings(values, record.get("inputs.--eval-input"))


def _split_evaluate(path: Path, recon_key: dict[str, Any], generate_key: dict[str, Any]) -> None:
    """An autoencoder's ``stages.json`` from before the recon / generate split, with one evaluate
    stage, made into the two, keyed with what the earlier run had (``*_key``: from its ``run.json``;
    --inception / --first-frame from the evaluate stage's own ``eval_key``, where it has one), so
    that the same settings redo neither (its seconds go to recon)."""
    done = read_json(path) if path.is_file() else {}
    if "evaluate" not in done:
        return
    old = done.pop("evaluate")
    result = dict(old["result"])
    made = result.pop("eval_key", {})
    recon_key = {**recon_key, "--inception": made.get("inception_sha256"),
                 "--first-frame": made.get("first_frame", False)}
    done["recon"] = {"seconds": old["seconds"], "result": {"recon": result.pop("recon")}, "key": recon_key}
    done["generate"] = {"seconds": 0.0, "result": result, "key": generate_key}
    atomic_write_json(path, done)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison (see the module doc); returns the report also written as compare.json."""
    t_start = time.perf_counter()
    out = Path(args.output)
    entries, binding, settings = check_args(args)
    with checking():
        device = dist.device_for(dist.dist_env(), args.device)
        lpips = None
        if args.lpips_backbone or args.lpips_heads:
            from ldm.metrics import LPIPS
            lpips = LPIPS.from_files(args.lpips_net, args.lpips_backbone, args.lpips_heads).to(device)
        flow_net = load_flow_net(args.flow_net, device) if args.flow_net else None
        i3d = load_i3d(args.i3d, device=device) if args.i3d else None
        inception = load_inception(args.inception, device) if args.inception else None
    runs.claim_folder(out, "a new --output")  # a comparison running into it: refused before anything is written
    shutil.rmtree(out / TRASH, ignore_errors=True)  # what an interrupted --overwrite left
    if args.overwrite:
        _clear(out, [e["label"] for e in entries])
    if any(e["redo"] for e in entries):
        _redo(out, entries)
    synthetic = bool(args.synth) or (Path(args.input) / "synth.json").is_file()
    earlier = _earlier_settings(out)  # read before run.json is written again
    for e in entries:
        _split_evaluate(out / _safe(e["label"]) / STAGES, *_eval_keys(earlier, False, synthetic))
    left_out = _bind_rows(out, entries)  # before run.json: a folder bound before rows were has their records there
    if left_out:
        print(f"ldm compare: left out of the report (not in --autoencoders), kept on disk: "
              f"{', '.join(str(out / name) for name in left_out)}", file=sys.stderr, flush=True)
    binding.write()
    train_data, eval_data, synth = _data(args, out)
    def one(e: dict[str, Any]) -> dict[str, Any]:  # an autoencoder's row
        work = out / _safe(e["label"])
        stages = Stages(work / STAGES, f"compare {e['label']}")  # a rerun skips the stages finished
        row: dict[str, Any] = {"autoencoder": e["label"]}
        if e["checkpoint"] is None and args.ae_steps > 0:
            row["ae_training"] = stages.run("train_ae", lambda: _train_ae(e, args, train_data, work))
            e["checkpoint"] = row["ae_training"]["final"]
        row["checkpoint"] = e["checkpoint"]
        row["random_weights"] = e["checkpoint"] is None
        row["extract"] = stages.run("extract", lambda: _extract(e, args, train_data, work))
        row["dit"] = stages.run("train_dit", lambda: _train_dit(args, work))
        recon_key, generate_key = _eval_keys(settings, e["first_frame"], synth is not None)
        row.update(stages.run("recon", lambda: _recon(e, args, eval_data, work, lpips, i3d, inception, device,
                                                      flow_net),
                              key=recon_key))  # another key (an evaluation flag changed): made again
        row.update(stages.run("generate", lambda: _generate(args, eval_data, synth, work, i3d, device),
                              key=generate_key))
        manifest, tcfg = load_manifest(work / "latents"), _dit_config(args, work)
        overrides = dit_overrides(tcfg.model, manifest)
        cost = {"autoencoder": e["checkpoint"] or e["name"], "--frames": args.frames, "--height": args.height,
                "--width": args.width, "dit": tcfg.model.dit, "batch_size": tcfg.data.batch_size,
                "--sample-steps": args.sample_steps, "classifier-free guidance": args.guidance != 1.0,
                "dit_overrides": overrides, "text_tokens": manifest.text_tokens if "text_dim" in overrides else 0,
                "convention": costlib.FLOP_CONVENTION}  # counted under FakeTensorMode: seconds to minutes a row
        row["cost"] = {**stages.run("cost", lambda: costlib.cost_table(
            [cost["autoencoder"]], args.frames, args.height, args.width, cost["dit"], batch_size=cost["batch_size"],
            steps=args.sample_steps, cfg=cost["classifier-free guidance"], dit_overrides=overrides,
            text_tokens=cost["text_tokens"])[0],
            key=json.loads(json.dumps(cost))), "autoencoder": e["label"]}  # the key as stages.json records it
        row["resumed"] = stages.resumed
        (work / "error.log").unlink(missing_ok=True)  # an earlier run's failure, now redone
        return row

    rows, failed = [], []
    for e in entries:
        try:
            rows.append(one(e))
        except Exception as err:  # out of memory, unreadable weights, ...: the other autoencoders go on
            if len(entries) == 1:
                raise  # nothing else to report: the error as it is
            work = out / _safe(e["label"])
            work.mkdir(parents=True, exist_ok=True)
            (work / "error.log").write_text(traceback.format_exc())
            said = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            failed.append({"autoencoder": e["label"], "error": said, "log": str(work / "error.log")})
            print(f"[compare {e['label']}] failed: {said} (traceback in {work / 'error.log'}); "
                  "the others go on", file=sys.stderr, flush=True)
    if not rows:
        said = "; ".join(f"{f['autoencoder']}: {f['error']}" for f in failed)
        raise UserError(f"every autoencoder failed ({said}); tracebacks in each one's error.log")
    rates, variable = source_rates(out / _safe(rows[0]["autoencoder"]) / "latents")  # the same clips for every row
    report = {"settings": {k: v for k, v in vars(args).items() if not callable(v)}, "data": {
        "train": train_data, "eval": eval_data, "synthetic": synth, "source_fps": rates, "variable_rate": variable},
        "rows": rows, "failed": failed, "left_out": left_out,
        "machine": {"device": str(device), "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "cpus": os.cpu_count(), "torch": torch.__version__},
        "conventions": {"flops": costlib.FLOP_CONVENTION,
                        "step_time": "median wall time per training step after the first",
                        "memory_estimate": rows[0]["cost"]["method"] if rows else None}}
    costlib.plot([r["cost"] for r in rows], out / "cost.png",
                 title=f"{args.frames}x{args.height}x{args.width}, DiT {rows[0]['cost']['dit']}" if rows else "")
    report["seconds"] = time.perf_counter() - t_start
    atomic_write_json(out / "compare.json", report)
    atomic_write_bytes(out / "compare.md", markdown(report).encode())
    return report


def _f(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x / scale, fmt)


def _eval_note(report: dict[str, Any]) -> str:
    """Which clips the quality columns come from, and whether they are held out (without
    ``--eval-input``, plain videos are evaluated on the training clips themselves)."""
    data = report["data"]
    clips = next((r["recon"]["clips"] for r in report["rows"]), 0)
    held_out = Path(data["eval"]).resolve() != Path(data["train"]).resolve()
    where = "held out" if held_out else "the training videos, NOT held out: give --eval-input HELD_OUT"
    recon = next((r["recon"] for r in report["rows"]), {})
    optional = (("lpips", "LPIPS"), ("flolpips", "FloLPIPS"), ("rfvd", "rFVD"), ("rfid", "rFID"))
    measured = ", ".join(["PSNR", "SSIM"] + [name for key, name in optional if key in recon])
    fvd = " and FVD's reference" if any(r.get("fvd") for r in report["rows"]) else ""
    return f"Reconstruction ({measured}){fvd}: {clips} clips of {data['eval']} ({where})."


def _rate_note(recon: dict[str, Any]) -> str:
    """A variable-rate autoencoder's measured VCPR and keyframe accuracy over the evaluated clips (its
    compression rate column is the cost's, at the latent `ldm cost` takes); nothing for a fixed rate."""
    if "vcpr" not in recon:
        return ""
    acc = (recon.get("keyframe_accuracy") or {}).get("mean")
    return (f"; measured VCPR {recon['vcpr']['mean']:.0f} (std {recon['vcpr']['std']:.0f})"
            + (f", keyframe accuracy {acc:.0%}" if acc is not None else ""))


def _rates_note(data: dict[str, Any], fps: float | None) -> list[str]:
    """The training videos' source frame rates when they differ, and those with a variable rate
    (`launch.extract.source_rates`; a report of an earlier version has neither)."""
    rates, variable = data.get("source_fps") or {}, data.get("variable_rate") or []
    if len(rates) < 2 and not variable:
        return []
    said = [", ".join(f"{r} fps: {n} clip{'s' * (n != 1)}" for r, n in rates.items())] if len(rates) > 1 else []
    if variable:
        said.append(f"variable frame rate: {', '.join(variable[:3])}" + (" ..." if len(variable) > 3 else ""))
    why = (f"resampled to {fps:g} fps" if fps else
           "read at their own rates: one motion spans different numbers of frames; --fps F resamples them")
    return ["", f"Training videos' source frame rates ({why}): {'; '.join(said)}."]


def _attributes(r: dict[str, Any]) -> str:
    att = (r.get("attributes") or {}).get("accuracy")
    return "-" if not att else " / ".join(f"{att[a]:.0%}" for a in ("all", "color", "shape", "direction"))


# the table's columns: (header, the cell of a row, the result a row must have for the column to be shown:
# None always; LPIPS, rFVD, rFID, FVD and the attribute benchmark only when some row measured them)
COLUMNS: list[tuple[str, Any, Any]] = [
    ("params", lambda r: params_text(r["cost"]["ae_params"]), None),  # the autoencoder's, as `ldm list` / `ldm cost`
    ("compression rate (latent / input)", lambda r: f"{r['cost']['compression_rate']:.5f}", None),
    ("tokens", lambda r: f"{r['cost']['tokens']}", None),
    ("train step s", lambda r: _f(r["dit"]["step_s_median"], ".3f"), None),
    ("train peak GiB measured / est.", lambda r: f"{_f(r['dit']['peak_memory_bytes_measured'], '.3g', 2 ** 30)} / "
     f"{_f(r['cost']['dit_train_peak_memory_bytes'], '.3g', 2 ** 30)}", None),
    ("DiT fwd GFLOPs", lambda r: _f(r["cost"]["dit_forward_flops"], ".3g", 1e9), None),
    ("train step GFLOPs", lambda r: _f(r["cost"]["dit_train_step_flops"], ".3g", 1e9), None),
    ("sample s/video", lambda r: _f(r.get("sample_s_per_video"), ".2f"), None),
    ("encode GFLOPs", lambda r: _f(r["cost"].get("ae_encode_flops"), ".3g", 1e9), None),  # extraction's per clip
    ("decode GFLOPs", lambda r: _f(r["cost"]["ae_decode_flops"], ".3g", 1e9), None),
    ("PSNR dB", lambda r: _f(r["recon"]["psnr_db"]["mean"], ".2f"), None),
    ("SSIM", lambda r: _f(r["recon"]["ssim"]["mean"], ".3f"), None),
    ("LPIPS", lambda r: _f((r["recon"].get("lpips") or {}).get("mean"), ".3f"), lambda r: r["recon"].get("lpips")),
    ("FloLPIPS", lambda r: _f((r["recon"].get("flolpips") or {}).get("mean"), ".3f"),
     lambda r: r["recon"].get("flolpips")),
    ("rFVD", lambda r: _f((r["recon"].get("rfvd") or {}).get("rfvd"), ".1f"), lambda r: r["recon"].get("rfvd")),
    ("rFID", lambda r: _f((r["recon"].get("rfid") or {}).get("rfid"), ".1f"), lambda r: r["recon"].get("rfid")),
    ("attributes all / color / shape / direction", _attributes, lambda r: r.get("attributes")),
    ("FVD", lambda r: _f((r.get("fvd") or {}).get("fvd"), ".1f"), lambda r: r.get("fvd")),
]


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = report["rows"]
    columns = [(h, cell) for h, cell, has in COLUMNS if has is None or any(has(r) for r in rows)]
    read = f"resampled to {s['fps']:g} fps" if s.get("fps") else "each at its video's own frame rate (no --fps)"
    lines = ["# `ldm compare`", "",
             f"Clips {s['frames']}x{s['height']}x{s['width']}, {read}; the same DiT config and steps for every "
             f"autoencoder; device {report['machine']['device']}.", _eval_note(report), "",
             "| autoencoder | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        marks = [m for m, on in (("random weights", r["random_weights"]),
                                 ("first-frame decode", r["recon"].get("first_frame"))) if on]
        name = r["autoencoder"] + (f" ({', '.join(marks)})" if marks else "")
        lines.append(f"| {name} | " + " | ".join(cell(r) for _, cell in columns) + " |")
    chance = next((r["attributes"]["chance"] for r in report["rows"] if r.get("attributes")), None)
    lines += [""] * bool(report.get("failed")) + [
        f"**{f['autoencoder']} failed** ({f['error']}): not in the table; traceback in {_safe(f['autoencoder'])}"
        "/error.log." for f in report.get("failed", [])]
    if report.get("left_out"):
        lines += ["", f"Earlier rows kept in this folder, not in this report: {', '.join(report['left_out'])}."]
    lines += _rates_note(report["data"], s.get("fps"))
    lines += ["", f"{report['conventions']['flops']}. Estimated memory: {report['conventions']['memory_estimate']}. "
              f"Step time: {report['conventions']['step_time']}."]
    if chance:
        lines.append("Attribute chance: " + ", ".join(f"{k} {v:.0%}" for k, v in chance.items()) + ".")
    if any(r["random_weights"] for r in report["rows"]):
        lines.append("Autoencoders marked (random weights) had no checkpoint: their quality numbers are a pipeline "
                     "check, not a measurement (pass a trained folder or --ae-steps).")
    rfid = next((r["recon"]["rfid"] for r in rows if "small_sample" in (r["recon"].get("rfid") or {})), None)
    if rfid:
        lines.append(f"rFID over {rfid['n_real']} frames a side, fewer than FID's {rfid['protocol_n']}: biased upward, "
                     "comparable only between these rows.")
    if s.get("first_frame"):
        plain = [r["autoencoder"] for r in report["rows"] if not r["recon"].get("first_frame")]
        lines.append("Rows marked (first-frame decode) are reconstructed with each clip's first frame given to the "
                     "decoder (--first-frame, H3AE's image-to-video reconstruction)"
                     + (f"; {', '.join(plain)} cannot decode with one and decoded plainly." if plain else "."))
    lines += ["", "![cost](cost.png)", ""]
    for r in report["rows"]:
        lines.append(f"- {r['autoencoder']}: DiT loss {r['dit']['first_loss']:.3f} -> {r['dit']['last_loss']:.3f} "
                     f"in {r['dit']['steps']} steps; reconstructions: {_safe(r['autoencoder'])}/recon_grid.png"
                     + _rate_note(r["recon"]))
    return "\n".join(lines) + "\n"
