"""``ldm eval``: reconstruction quality of an autoencoder and generation quality of a trained DiT.

    ldm eval recon --autoencoder NAME --checkpoint DIR --input VIDEOS --frames 17 --height 256 --width 256 \\
                   [--lpips-backbone vgg16.pth --lpips-heads vgg.pth [--flow-net pwcnet.pt]] \\
                   [--i3d i3d_torchscript.pt] [--inception inception-2015-12-05.pt] [--first-frame] \\
                   [--frame-group 4 --group-start 1] \\
                   [--num 2048 --seed 0] [--classes folder|FILE --split FILE] \\
                   --output recon.json [--grid recon.png] [--overwrite]
    ldm eval gen --checkpoint RUN --output DIR [--overwrite] [--attributes --per-prompt 4] \\
                 [--reference VIDEOS --num 2048 --i3d i3d_torchscript.pt --inception inception-2015-12-05.pt \\
                  --reference-stats DIR] \\
                 [--vbench --vbench-info VBench_full_info.json --vbench-python /envs/vbench/bin/python]

This module is the verb: its flags (`add_arguments`), their checks before any work (`check_args`), and
`run_recon` / `run_gen`, which load the models, call the evaluations and write the result JSON. Each evaluation
lives in a module named after it:

- ``launch/eval_recon.py``: ``recon``, `evaluate_reconstruction`: the per-clip metrics of `RECON_METRICS`
  (PSNR, SSIM, LPIPS, temporal error, information preservation, VCPR and keyframe accuracy), rFVD, rFID, SSIM per
  frame position inside a frame group, the grid PNG.
- ``launch/eval_fd.py``: ``gen --reference``, `generation_fd`: FVD / FID against reference clips (the protocol
  in ``ldm.metrics``), kept reference statistics, the per-clip statistics of `GEN_CLIP_METRICS` on each side.
- ``launch/eval_attributes.py``: ``gen --attributes``, `attribute_benchmark`: the offline attribute benchmark.
- ``launch/eval_vbench.py``: ``gen --vbench``, `vbench_bridge`: VBench's prompt list, run in its own environment.
- ``launch/eval_clips.py``: what they share: which clips are read and how, batches, each rank's share.

To add a per-clip metric: compute it in ``ldm.metrics`` and add its line to the table of its command,
``eval_recon.RECON_METRICS`` or ``eval_fd.GEN_CLIP_METRICS`` (README's evaluation section says how). A new
protocol: a module of its own, called from `run_recon` / `run_gen` behind a flag of `add_arguments`.

Results are never replaced silently: an existing ``recon`` result file (or grid PNG), or a ``gen``
folder holding an earlier evaluation's results (`GEN_RESULTS`), is refused before any work unless
``--overwrite`` is given; ``gen --overwrite`` then removes the earlier results once the models are
loaded, except VBench videos made by the same DiT, autoencoder and sampling settings (recorded in
``vbench_videos.json``), which are reused: generating VBench's prompt list takes hours.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from autoencoders import Autoencoder, resolve, resolve_record
from autoencoders.tiling import configure_inference
from data.sources import list_items
from data.video import VideoError, output_frames, probe, upright_size
from dit import Export
from launch import dist
from launch.dist import compute_dtype, local_ranks
from launch.eval_attributes import attribute_benchmark, attribute_suite, check_suite_classes
from launch.eval_clips import native_size, without_gif_twins
from launch.eval_fd import CLASS_DISTS, generation_fd, reference_items
from launch.eval_recon import evaluate_reconstruction
from launch.eval_vbench import (VBENCH_RECORD, check_vbench_dit, read_vbench_results, vbench_bridge,
                                vbench_info_path, vbench_prompts)
from launch.extract import auto_workers
from launch.reconstruct import DEFAULT_FRAMES, default_frames, default_size
from launch.sample import (add_sampling_arguments, check_export, checkpoint_run, dit_conditioning, export_weights,
                           load_dit, playback_fps, sampling_from_args, sampling_text_encoder)
from ldm.checkpoint import atomic_write_json, file_sha256, read_json
from ldm.errors import MissingInput, UserError, check_min, checking
from ldm.metrics import (FLOW_CONTRACT, FVD_FRAMES, I3D_KINDS, LPIPS, load_flow_net, load_i3d, load_inception,
                         vbench_aggregate)


GEN_RESULTS = ("result.json", "attribute_videos", "vbench_videos", VBENCH_RECORD, "vbench_results")


def earlier_results(out: Path) -> list[str]:
    """What an earlier ``ldm eval gen`` left in ``out`` (names of `GEN_RESULTS`)."""
    return [name for name in GEN_RESULTS if (out / name).exists()]


def clear_earlier_results(out: Path, keep_vbench_videos: bool) -> None:
    """Remove an earlier ``ldm eval gen``'s results from ``out`` (nothing else in the folder);
    with ``keep_vbench_videos`` its VBench videos stay for `vbench_bridge` to reuse or replace."""
    for name in earlier_results(out):
        if keep_vbench_videos and name in ("vbench_videos", VBENCH_RECORD):
            continue
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="{recon,gen}")
    r = sub.add_parser("recon", help="reconstruction quality of an autoencoder")
    r.add_argument("--autoencoder", help="registered name (random weights without --checkpoint)")
    r.add_argument("--checkpoint", help="a save_pretrained / `ldm train-ae` folder")
    r.add_argument("--ae-path", help="local diffusers folder, with --autoencoder diffusers:<Class>")
    r.add_argument("--ae-subfolder")
    r.add_argument("--input", required=True, help="videos (folder, raw shards, as `ldm extract`)")
    r.add_argument("--frames", type=int, help="frames per clip (default: as `ldm reconstruct`, the longest clip of "
                   f"at most {DEFAULT_FRAMES} frames that the first readable video holds and the autoencoder takes)")
    r.add_argument("--height", type=int, help="(default: as `ldm reconstruct`, from the first readable video: its "
                   "own size when it fits in 256x256, rounded down to one the autoencoder takes; else 256)")
    r.add_argument("--width", type=int, help="(default: as --height)")
    r.add_argument("--native-size", action="store_true",
                   help="each clip at its own size, center-cropped to the largest the autoencoder takes, never resized "
                        "(IV-VAE's 'original video resolution'); batched by size, the sizes recorded")
    r.add_argument("--fps", type=float)
    r.add_argument("--num", type=int, help="evaluate a random N of the videos, seeded by --seed (all when fewer): "
                   "a sorted class-per-folder listing runs class by class, so the first N would cover a few classes")
    r.add_argument("--seed", type=int, default=0, help="which --num videos are chosen (recorded in input_clips)")
    r.add_argument("--first", action="store_true", help="take the first --num videos in listing order instead, as "
                   "`ldm train-ae`'s val.clips and `ldm cost --recon` do")
    r.add_argument("--classes", metavar="folder|FILE",
                   help="the videos' classes from their top-level folders, as `ldm extract --classes` (UCF-101: "
                        "classInd.txt); recorded, with the classes the chosen clips cover")
    r.add_argument("--split", metavar="FILE", help="only the videos this list names (UCF-101 testlist01.txt for rFVD)")
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--text-encoder", help="for a text-guided autoencoder: builtin | t5:DIR | clip:DIR")
    _metric_args(r)
    r.add_argument("--inception", help="rFID: StyleGAN2-ADA's TorchScript Inception (inception-2015-12-05.pt), every "
                   "frame of the originals against every frame of their reconstructions (Hi-VAE Tab. 2)")
    r.add_argument("--first-frame", action="store_true",
                   help="decode with each clip's first frame as the image condition (image-to-video reconstruction, "
                        "H3AE Tab. 4; autoencoders with first_frame_decoding)")
    r.add_argument("--frame-group", type=int, default=0, metavar="K",
                   help="also report SSIM per frame position inside groups of K frames (IV-VAE Fig. 1b)")
    r.add_argument("--group-start", type=int, default=0, help="first frame of the first group (1 for a causal VAE)")
    r.add_argument("--grid", help="reconstruction grid PNG (originals above reconstructions)")
    r.add_argument("--output", required=True, help="result JSON")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier result JSON (and --grid PNG)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision the autoencoder runs in (auto: bf16 on CUDA, fp32 on the CPU)")
    _memory_args(r, "encode and decode")
    _workers_arg(r)

    g = sub.add_parser("gen", help="generation quality of a trained DiT")
    g.add_argument("--checkpoint", required=True,
                   help="an `ldm train` run folder, its export/, or one of its checkpoints (RUN/checkpoints/step-N)")
    g.add_argument("--ae-checkpoint", "--ae-path", help="autoencoder weights (default: recorded at extraction; "
                   "--ae-path: as `ldm extract` names it)")
    g.add_argument("--text-encoder", metavar="SPEC", help="the text encoder the DiT was trained with, moved to "
                   "another folder (default: the spec recorded at extraction); checked against the recorded width "
                   "and fingerprint")
    g.add_argument("--output", required=True, help="output folder (result.json, videos)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier evaluation in --output (its VBench videos are reused "
                        "when the same DiT and sampling settings made them)")
    g.add_argument("--frames", type=int, help="default: the training clips'")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    add_sampling_arguments(g)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--fps", type=float,
                   help="frame rate of the written videos (default: the training clips' rate, as `ldm sample`)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision the DiT and the autoencoder run in (auto: bf16 on CUDA, fp32 on the CPU)")
    _memory_args(g, "decode")
    _workers_arg(g)
    g.add_argument("--attributes", action="store_true", help="the offline attribute benchmark")
    g.add_argument("--per-prompt", type=int, default=4)
    g.add_argument("--shapes", nargs="+")
    g.add_argument("--colors", nargs="+")
    g.add_argument("--directions", nargs="+")
    g.add_argument("--holdout", nargs="*", default=[], help="combinations held out of training, 'red circle left'")
    g.add_argument("--use-class", action="store_true",
                   help="condition on class ids too, for the attribute benchmark and FVD / FID (default: text if any; "
                        "a DiT trained on both samples as trained with it)")
    g.add_argument("--reference", help="reference videos for FVD / FID")
    g.add_argument("--classes", metavar="folder|FILE",
                   help="the reference clips' classes from their top-level folders, as `ldm extract --classes` "
                        "(UCF-101: the classInd.txt of the training data); matched to the DiT's classes by name")
    g.add_argument("--split", metavar="FILE", help="only the reference videos this list names (UCF-101 testlist01.txt)")
    g.add_argument("--class-dist", choices=CLASS_DISTS, default="reference",
                   help="classes of the generated clips of a class-conditional DiT: each reference clip's own "
                        "(default: distributed as the reference set) or the reference set's classes in equal shares")
    g.add_argument("--samples", help="already generated videos (instead of sampling one per reference clip)")
    g.add_argument("--reference-stats", metavar="DIR",
                   help="keep the reference clips' feature statistics in DIR and reuse them when the same clips are "
                        "evaluated under the same protocol again (another checkpoint of the run: no re-reading)")
    g.add_argument("--num", type=int, help="clips used for FVD / FID: a random N of the reference clips (seeded by "
                   "--seed; all when fewer) and as many generated (the first N of --samples)")
    g.add_argument("--reference-seed", type=int, metavar="K",
                   help="choose the --num reference clips with seed K instead of --seed: the same clips for every "
                        "--seed (error bars over sampling seeds)")
    _metric_args(g, lpips=False)
    g.add_argument("--inception", help="FID: StyleGAN2-ADA's TorchScript Inception (inception-2015-12-05.pt)")
    g.add_argument("--vbench", action="store_true", help="sample VBench's standard prompts and score them")
    g.add_argument("--vbench-info", help="VBench_full_info.json (default: from an installed vbench)")
    g.add_argument("--vbench-dimensions", nargs="+", help="default: every dimension")
    g.add_argument("--vbench-per-prompt", type=int, default=5)
    g.add_argument("--vbench-max-prompts", type=int, help="only the first N prompts (smoke runs)")
    g.add_argument("--vbench-python", help="python of the environment where vbench is installed")
    g.add_argument("--vbench-results", help="an existing VBench *_eval_results.json (or its folder) to aggregate")
    g.add_argument("--vbench-gpus", type=int, default=1)


def _memory_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--tile`` / ``--chunk-frames`` as on `ldm reconstruct` (`autoencoders.tiling.configure_inference`)."""
    p.add_argument("--tile", help=f"{what} large frames in blended spatial tiles: TILE or TILE:OVERLAP pixels")
    p.add_argument("--chunk-frames", type=int, default=0,
                   help="stream long clips this many frames at a time (IV-VAE, H3AE, causal3d, kl2d, opensora)")


def _workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=-1,
                   help="video decoding worker processes per rank, as `ldm extract` (default -1 = auto: 0 on the CPU; "
                        "with a GPU the usable cores / ranks on the node, less one, at most 16)")


def _metric_args(p: argparse.ArgumentParser, lpips: bool = True) -> None:
    if lpips:
        p.add_argument("--lpips-backbone", help="torchvision VGG16 / AlexNet weights file (e.g. vgg16-397923af.pth)")
        p.add_argument("--lpips-heads", help="the lpips package's linear heads (vgg.pth / alex.pth)")
        p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
        p.add_argument("--flow-net", metavar="FILE",
                       help="FloLPIPS too (LPIPS weighted by where the motion differs; with the LPIPS files, alex as "
                            f"defined): a TorchScript optical-flow network, {FLOW_CONTRACT} (e.g. a scripted PWC-Net)")
    p.add_argument("--i3d", help="FVD extractor file (default kind: i3d_torchscript.pt)")
    p.add_argument("--i3d-kind", default="i3d_torchscript", choices=I3D_KINDS)
    p.add_argument("--fvd-frames", type=int, default=FVD_FRAMES, help="frames per clip for FVD (reference: 16)")


def check_clip_frames(frames: int, fvd_frames: int | None = None, frame_group: int = 0, group_start: int = 0
                      ) -> None:
    """FVD's frames (``fvd_frames``, None: no FVD) and the SSIM frame groups fit in clips of
    ``frames`` frames; else a `UserError` naming the flag, before any work."""
    if fvd_frames is not None and fvd_frames > frames:
        raise UserError(f"--fvd-frames {fvd_frames}: the clips have {frames} frames; give --fvd-frames {frames} or "
                        "fewer (and report it: the reference FVD uses 16), or longer clips")
    if frame_group and group_start >= frames:
        raise UserError(f"--group-start {group_start}: the clips have {frames} frames; give a --group-start below "
                        f"{frames}")
    if frame_group and group_start + frame_group > frames:
        raise UserError(f"--frame-group {frame_group}: the clips have {frames - group_start} frames after "
                        f"--group-start {group_start}; give --frame-group {frames - group_start} or fewer")


def check_lpips_files(backbone: str | None, heads: str | None, flow_net: str | None = None) -> None:
    """LPIPS takes both files or neither, and FloLPIPS's ``--flow-net`` needs them (`UserError` otherwise)."""
    if bool(backbone) != bool(heads):
        raise UserError("LPIPS needs both --lpips-backbone and --lpips-heads")
    if flow_net and not backbone:
        raise UserError("--flow-net adds FloLPIPS, LPIPS weighted by where the motion differs: give "
                        "--lpips-backbone and --lpips-heads too (FloLPIPS is defined with --lpips-net alex)")


def check_args(args: argparse.Namespace) -> None:
    """The numbers, files and folders of an ``ldm eval`` command are usable, before any model is
    loaded or anything written (`UserError` naming the flag otherwise)."""
    gen = args.what == "gen"
    check_min({"--frames": args.frames, "--height": args.height, "--width": args.width, "--num": args.num,
               "--batch-size": args.batch_size, "--fvd-frames": args.fvd_frames,
               **({"--per-prompt": args.per_prompt, "--vbench-per-prompt": args.vbench_per_prompt,
                   "--vbench-gpus": args.vbench_gpus, "--vbench-max-prompts": args.vbench_max_prompts}
                  if gen else {})}, 1)
    check_min({"--chunk-frames": args.chunk_frames}, 0)
    check_min({"--num-workers": args.num_workers}, -1, " (-1: auto)")
    if not gen:
        check_min({"--frame-group": args.frame_group, "--group-start": args.group_start}, 0)
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps must be > 0, got {args.fps}")
    files = {"--i3d": args.i3d, "--inception": args.inception,
             **({} if gen else {"--lpips-backbone": args.lpips_backbone, "--lpips-heads": args.lpips_heads,
                                "--flow-net": args.flow_net})}
    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise MissingInput(f"{flag} {path}: " + ("a folder; give the file itself" if Path(path).is_dir() else
                                                     "file not found"))
    if not gen:
        if args.native_size and (args.height is not None or args.width is not None):
            raise UserError("--native-size reads each clip at its own size; leave out --height/--width (or "
                            "--native-size to resize every clip to one size)")
        check_lpips_files(args.lpips_backbone, args.lpips_heads, args.flow_net)
        if args.frames is not None:  # else checked once the autoencoder chose its default
            check_clip_frames(args.frames, args.fvd_frames if args.i3d else None, args.frame_group, args.group_start)
    out = Path(args.output)
    if gen:
        if out.is_file():
            raise UserError(f"--output {out} is a file; give a folder (result.json and videos go there)")
        earlier = earlier_results(out)
        if earlier and not args.overwrite:
            raise UserError(f"--output {out} holds the results of an earlier evaluation ({', '.join(earlier)}); "
                            "give --overwrite to replace them, or a new --output")
        for flag, path in {"--samples": args.samples, "--reference": args.reference,
                           "--vbench-results": args.vbench_results, "--vbench-info": args.vbench_info}.items():
            if path is not None and any(_inside(path, out / name) for name in earlier):
                raise UserError(f"{flag} {path} lies inside the earlier results that --overwrite replaces; move it "
                                f"out of {out} first, or give a new --output")
        check_export(args.checkpoint)
        for flag, path in {"--reference": args.reference, "--samples": args.samples,
                           "--ae-checkpoint": args.ae_checkpoint, "--vbench-results": args.vbench_results}.items():
            if path is not None and not Path(path).exists():
                raise MissingInput(f"{flag} {path}: not found")
        for flag, path in {"--reference": args.reference, "--samples": args.samples}.items():
            if path is not None:  # videos there, before --overwrite clears anything
                with checking(flag):
                    list_items(path, **({"classes": args.classes, "split": args.split} if flag == "--reference"
                                        else {}))
        for flag, value in {"--classes": args.classes, "--split": args.split,
                            "--reference-stats": args.reference_stats, "--reference-seed": args.reference_seed,
                            "--class-dist": None if args.class_dist == "reference" else args.class_dist}.items():
            if value is not None and not args.reference:
                raise UserError(f"{flag} is about the --reference videos; add --reference, or leave the flag out")
        if args.reference_stats is not None and Path(args.reference_stats).is_file():
            raise UserError(f"--reference-stats {args.reference_stats} is a file; give a folder (one statistics file "
                            "per reference and protocol goes there)")
        if not (args.attributes or args.reference or args.vbench):
            raise UserError("choose at least one of --attributes, --reference (FVD / FID), --vbench")
        if args.reference and not (args.i3d or args.inception):
            raise UserError("--reference needs --i3d (FVD) and/or --inception (FID)")
        for flag, value, needs in [("--samples", args.samples, args.reference), ("--i3d", args.i3d, args.reference),
                                   ("--inception", args.inception, args.reference),
                                   ("--vbench-results", args.vbench_results, args.vbench)]:
            if value is not None and not needs:  # was: ignored without a word
                needed = "--vbench" if flag == "--vbench-results" else "--reference"
                raise UserError(f"{flag} is used only with {needed}; add it, or leave the flag out")
        if args.attributes:
            with checking():
                attribute_suite(args.shapes, args.colors, args.directions, args.holdout)
    else:
        if out.is_dir():
            raise UserError(f"--output {out} is a folder; give the result JSON file to write")
        if args.grid is not None and Path(args.grid).is_dir():
            raise UserError(f"--grid {args.grid} is a folder; give the PNG file to write")
        for flag, path in {"--output": out, "--grid": args.grid}.items():
            if path is not None and Path(path).exists() and Path(args.input).exists() and \
                    Path(path).samefile(args.input):
                raise UserError(f"{flag} {path} is the --input video; give another file name")
            if path is not None and Path(path).exists() and not args.overwrite:
                raise UserError(f"{flag} {path} holds an earlier result; give --overwrite to replace it, or another "
                                "file name")
        if not Path(args.input).exists():
            raise MissingInput(f"--input {args.input}: not found")
        with checking("--input"):  # videos there, --classes / --split readable, before any model is loaded
            list_items(args.input, classes=args.classes, split=args.split)


def run(args: argparse.Namespace) -> int:
    env = dist.dist_env()
    if env.world_size > 1 and args.what == "gen" and (args.attributes or args.vbench or not args.reference):
        raise UserError(f"ldm eval gen on {env.world_size} ranks splits the clips of FVD / FID (--reference) alone; "
                        "run --attributes / --vbench as one process, without the launcher")
    check_args(args)
    env = dist.init_distributed()  # under torchrun / srun each rank takes its share of the clips
    with checking():
        device = dist.device_for(env, args.device)
    args.num_workers = auto_workers(args.num_workers, device, local_ranks(env))  # -1 (auto) resolved to a count
    if args.what == "recon":
        result = run_recon(args, device)
    else:
        result = run_gen(args, device)
    if env.rank != 0:  # rank 0 wrote the result and reports it
        return 0
    print(json.dumps(_summary(result), indent=2))
    for where, warning in _small_sample_warnings(result):
        print(f"ldm eval {args.what}: warning: {where}: {warning}", file=sys.stderr)
    return 0


def _small_sample_warnings(result: dict[str, Any], where: str = "") -> list[tuple[str, str]]:
    """``(metric, warning)`` of every Fréchet distance of ``result`` measured below its protocol's N."""
    found = []
    for k, v in result.items():
        if isinstance(v, dict):
            found += _small_sample_warnings(v, k)
        elif k == "small_sample":
            found.append((where, v))
    return found


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without per-video rows (those stay in the JSON file)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out[k] = _summary(v)
        elif k == "skipped" and len(v) > 3:  # all of them stay in the JSON file
            out[k] = v[:3] + [f"... {len(v)} in all"]
        elif k not in ("rows", "per_frame"):
            out[k] = v
    return out


def _recon_defaults(args: argparse.Namespace, ae: Autoencoder) -> None:
    """Fill ``--frames`` / ``--height`` / ``--width`` left out from the first readable video of ``--input``, as
    `ldm reconstruct` does: its own size (`default_size`) and the longest clip of at most 17 frames that it holds
    and the autoencoder takes (`default_frames`); of a video and its GIF twin, the video, as the clips are read."""
    missing = [f for f in ("frames", *(() if args.native_size else ("height", "width"))) if getattr(args, f) is None]
    items = without_gif_twins(list_items(args.input, classes=args.classes, split=args.split))
    if not items:
        raise UserError(f"--input {args.input}: no videos")
    for first in items:  # the first one that can be read: a broken one is skipped later
        try:
            src = first.readable()
            size = upright_size(src) if args.height is None or args.width is None else None
            info = probe(src) if args.frames is None else None
            break
        except VideoError as e:
            error = e
    else:
        raise UserError(f"--input {args.input}: no video can be read to set the defaults (the last: {first.key}: "
                        f"{error}); give " + " and ".join(f"--{f}" for f in missing))
    if args.native_size:  # the longest clip of at most 17 frames that it holds at its own (cropped) size
        available = output_frames(info["frames"], info["fps"], args.fps, info["duration"])
        args.frames = _native_frames(ae, available, *size, where=f"--input {args.input}: {first.key}")
        if dist.rank() == 0:
            print(f"ldm eval recon: clips of {args.frames} frames, as {first.key} holds (--frames for another "
                  "length)", file=sys.stderr)
        check_clip_frames(args.frames, args.fvd_frames if args.i3d else None, args.frame_group, args.group_start)
        return
    if size is not None:
        shown = default_size(ae, *size)
        args.height, args.width = args.height or shown[0], args.width or shown[1]
    if info is not None:  # the longest clip of at most 17 frames that it holds and the autoencoder takes
        available = output_frames(info["frames"], info["fps"], args.fps, info["duration"])
        with checking(f"--input {args.input}: {first.key} ({available} frames) at --height {args.height} "
                      f"--width {args.width}"):
            args.frames = default_frames(ae, available, args.height, args.width)
        if dist.rank() == 0:
            print(f"ldm eval recon: clips of {args.frames} frames, as {first.key} holds (--frames for another "
                  "length)", file=sys.stderr)
        check_clip_frames(args.frames, args.fvd_frames if args.i3d else None, args.frame_group, args.group_start)


def _native_frames(ae: Autoencoder, available: int, height: int, width: int, where: str) -> int:
    """The longest clip of at most ``DEFAULT_FRAMES`` frames, of ``available``, that ``ae`` takes at some
    `native_size` of a ``height x width`` video (`UserError` naming ``where`` when none)."""
    for n in range(min(DEFAULT_FRAMES, available), 0, -1):
        try:
            native_size(ae, n, height, width)
            return n
        except ValueError:
            continue
    raise UserError(f"{where} ({available} frames, {height}x{width}): {ae.family} takes no clip of 1 to "
                    f"{min(DEFAULT_FRAMES, available)} frames at its size; give --frames, or other videos")


def run_recon(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    lpips = None
    if args.lpips_backbone or args.lpips_heads:
        lpips = LPIPS.from_files(args.lpips_net, args.lpips_backbone, args.lpips_heads).to(device)
    with checking("--flow-net"):
        flow_net = load_flow_net(args.flow_net, device) if args.flow_net else None
    with checking("--i3d"):
        i3d = load_i3d(args.i3d, args.i3d_kind, device) if args.i3d else None  # fail early, before encoding
    with checking():
        inception = load_inception(args.inception, device) if args.inception else None
    with checking():
        ae, name, ckpt_hash = resolve(args.autoencoder, args.checkpoint or args.ae_path, subfolder=args.ae_subfolder)
    if args.first_frame and not ae.first_frame_decoding:
        raise UserError(f"--first-frame: {name} does not decode with a first frame (H3AE does); leave it out")
    if args.frames is None or not args.native_size and (args.height is None or args.width is None):
        _recon_defaults(args, ae)  # from the first video, as `ldm reconstruct`
    if flow_net is not None and args.frames < 2:
        raise UserError(f"--flow-net: FloLPIPS compares the motion between frames; the clips have {args.frames} "
                        "frame: give --frames 2 or more, or longer videos")
    if not args.native_size:  # else each clip's size is checked as it is read (`native_size`)
        with checking(f"--frames {args.frames} --height {args.height} --width {args.width}"):
            ae.check_input(args.frames, args.height, args.width)
    with checking():
        configure_inference(ae, args.tile, args.chunk_frames)
    text_encoder = None
    if args.text_encoder:
        from ldm.text import build_text_encoder
        with checking("--text-encoder"):
            text_encoder = build_text_encoder(args.text_encoder, max_length=ae.text_length(), device=device)
    with checking():
        ae.check_text_encoder(text_encoder, args.text_encoder, name)
    result = evaluate_reconstruction(ae, args.input, args.frames, args.height, args.width, fps=args.fps, num=args.num,
                                     seed=None if args.first else args.seed, classes=args.classes, split=args.split,
                                     batch_size=args.batch_size, device=device, lpips=lpips, i3d=i3d,
                                     fvd_frames=args.fvd_frames, frame_group=args.frame_group,
                                     group_start=args.group_start, text_encoder=text_encoder, grid=args.grid,
                                     dtype=compute_dtype(args.dtype, device), inception=inception,
                                     first_frame=args.first_frame, native=args.native_size,
                                     workers=args.num_workers, flow_net=flow_net)
    result = {"autoencoder": name, "checkpoint": args.checkpoint, "checkpoint_hash": ckpt_hash, "input": args.input,
              "tile": args.tile, "chunk_frames": args.chunk_frames, **result}
    if lpips is not None:
        result["lpips"]["backbone_sha256"] = file_sha256(args.lpips_backbone)
        result["lpips"]["heads_sha256"] = file_sha256(args.lpips_heads)
    if dist.rank() == 0:
        atomic_write_json(Path(args.output), result)
    return result


def dit_weights(checkpoint: str | Path) -> dict[str, Any]:
    """Which weights an evaluation sampled: the file (a run's export, or a kept checkpoint's EMA
    weights), its sha256 and, for a checkpoint, its training step: the x axis of FVD over training."""
    path = export_weights(checkpoint)[1]
    record: dict[str, Any] = {"file": str(path), "sha256": file_sha256(path)}
    if checkpoint_run(checkpoint) is not None:
        record["step"] = read_json(Path(checkpoint) / "trainer.json")["step"]
    return record


def _reference_seed(args: argparse.Namespace) -> int:
    return args.seed if args.reference_seed is None else args.reference_seed


def _check_gen_conditioning(args: argparse.Namespace, model, export: Export) -> None:
    """What ``--attributes`` and ``--reference`` condition the DiT on can be sampled: the suite's and the reference
    clips' class ids are within the DiT's classes, ``--class-dist`` applies; else a `UserError` (or `ValueError`
    from `dit_conditioning` / `check_suite_classes` / `reference_items`) before anything is written."""
    use_text, use_cls = False, False  # what --attributes and --reference condition on
    if (args.attributes or args.reference) and (model.config.text_dim or model.config.num_classes):
        use_text, use_cls = dit_conditioning(model, export, True if args.use_class else None)
    if args.attributes and use_cls:
        check_suite_classes(model, attribute_suite(args.shapes, args.colors, args.directions, args.holdout))
    if args.class_dist != "reference" and (args.samples is not None or use_text or not use_cls):
        raise UserError(f"--class-dist {args.class_dist}: classes are drawn only when this DiT samples the "
                        "reference by class ids alone (a class-conditional DiT without text, no --samples); "
                        "leave the flag out")
    if args.reference:  # class names the DiT does not know: before anything is written
        reference = reference_items(args.reference, export, num=args.num, seed=_reference_seed(args),
                                    classes=args.classes, split=args.split)[0]
    if args.reference and args.samples is None and use_cls:
        if any(it.class_id is None for it in reference):
            raise UserError(f"--reference {args.reference}: a clip has no class id and this DiT is "
                            + ("sampled with class ids (--use-class)" if use_text else "class-conditioned only")
                            + "; give clips with class ids (--classes for a folder per class, an `ldm data synth` "
                            "folder) or --samples")
        worst = max(reference, key=lambda it: it.class_id)
        if worst.class_id >= model.config.num_classes:
            raise UserError(f"--reference {args.reference}: {worst.key} has class id {worst.class_id}, outside "
                            f"this DiT's {model.config.num_classes} classes (ids 0 to "
                            f"{model.config.num_classes - 1}); give --classes the class list of its training data")


def run_gen(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    with checking():
        i3d = load_i3d(args.i3d, args.i3d_kind, device) if args.i3d else None
        inception = load_inception(args.inception, device) if args.inception else None
    with checking():
        info = vbench_info_path(args.vbench_info) if args.vbench else None
        dtype = compute_dtype(args.dtype, device)
        if args.vbench:  # read now: --overwrite clears the earlier results before the work
            vbench_prompts(info, args.vbench_dimensions)
    if args.vbench and args.vbench_results:
        with checking("--vbench-results"):
            vbench_aggregate(read_vbench_results(Path(args.vbench_results)))
    model, export = load_dit(args.checkpoint, device)
    model = model.to(dtype)
    with checking():
        ae = resolve_record(export.autoencoder, args.ae_checkpoint).model.to(device=device, dtype=dtype).eval()
    frames = args.frames or export.video.frames
    height, width = args.height or export.video.height, args.width or export.video.width
    with checking(f"--frames {frames} --height {height} --width {width}"):
        ae.check_input(frames, height, width)
    check_clip_frames(frames, args.fvd_frames if args.reference and args.i3d else None)
    with checking():
        configure_inference(ae, args.tile, args.chunk_frames)
        _check_gen_conditioning(args, model, export)
    if args.vbench:
        with checking("--vbench"):
            check_vbench_dit(model, export)
    text_encoder = None
    if args.text_encoder:  # the DiT's text encoder in another folder: loaded and checked before any work
        with checking():
            text_encoder = sampling_text_encoder(model, ae, export, True, device, args.text_encoder)
    sampling = sampling_from_args(args, export)
    fps = playback_fps(export.video, args.fps)  # of the written videos
    out = Path(args.output)
    if args.overwrite and dist.rank() == 0:  # the earlier results go only now that everything is checked and loaded
        clear_earlier_results(out, keep_vbench_videos=args.vbench)
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    common = dict(sampling=sampling, batch_size=args.batch_size, device=device, text_encoder=text_encoder)
    result: dict[str, Any] = {"checkpoint": args.checkpoint, "autoencoder": export.autoencoder.name,
                              "frames": frames, "height": height, "width": width, "tile": args.tile,
                              "chunk_frames": args.chunk_frames, "dtype": dist.dtype_name(dtype),
                              "batch_size": args.batch_size, "dit_weights": dit_weights(args.checkpoint),
                              "world_size": dist.world_size()}
    if args.attributes:
        suite = attribute_suite(args.shapes, args.colors, args.directions, args.holdout)
        (out / "attribute_videos").mkdir(exist_ok=True)
        result["attributes"] = attribute_benchmark(model, ae, export, suite, per_prompt=args.per_prompt,
                                                   frames=frames, height=height, width=width,
                                                   use_class=True if args.use_class else None,
                                                   save_dir=out / "attribute_videos", fps=fps, **common)
    if args.reference:
        result["fd"] = generation_fd(model, ae, export, args.reference, frames=frames, height=height, width=width,
                                     num=args.num, i3d=i3d, inception=inception, fvd_frames=args.fvd_frames,
                                     samples=args.samples, use_class=True if args.use_class else None,
                                     classes=args.classes, split=args.split, class_dist=args.class_dist,
                                     reference_stats=args.reference_stats, reference_seed=_reference_seed(args),
                                     workers=args.num_workers, **common)
    if args.vbench:
        result["vbench"] = vbench_bridge(model, ae, export, out, info=info, dimensions=args.vbench_dimensions,
                                         per_prompt=args.vbench_per_prompt, frames=frames, height=height,
                                         width=width, fps=fps, vbench_python=args.vbench_python,
                                         vbench_results=args.vbench_results, gpus=args.vbench_gpus,
                                         max_prompts=args.vbench_max_prompts, replace=args.overwrite, **common)
    if dist.rank() == 0:
        atomic_write_json(out / "result.json", result)
    return result
