"""``ldm extract``: encode videos into WebDataset latent shards with any registered autoencoder.

    ldm extract --autoencoder NAME [--checkpoint DIR] --input PATH --output DIR
                [--frames T] [--height H] [--width W] [--fps F] [--shard-size N] [--verify K]
                [--clips-per-video K | --clip-stride S]
    ldm extract --config extract.yaml [KEY=VALUE ...]          # the same settings as an ExtractConfig YAML
    torchrun --nproc_per_node 2 -m launch.cli extract ...      # same command, several ranks / nodes

Class ids come from the captions (a ``class_id`` / ``label`` column) or, with ``--classes folder|FILE``,
from each video's top-level folder (UCF-101 / Kinetics / ImageNet layouts; a class list such as
classInd.txt fixes the 0-based ids); ``--split FILE`` keeps the videos a list names (trainlist01.txt);
see `data.sources`. The class names and the clips per class go into the manifest.

The autoencoder comes from ``autoencoders.resolve`` (a registered name, a saved folder, or a
source such as ``diffusers:<Class>`` with its local folder in ``--ae-path``).

The sorted input list is cut into shards of ``--shard-size`` videos; shard j (all the clips of its
videos) goes to one rank: the k-th shard not done yet to rank k mod world_size. A video gives one
clip (its first frames) or, with ``--clips-per-video K`` / ``--clip-stride S``, several windows
(`data.video.Windows`) decoded in one pass; a clip's key is ``data.shards.clip_key(video index, first frame)``, the same for any
number of ranks, workers or batch size. Each shard is written under a temporary name and renamed
when complete, then its sidecar JSON (counts, skipped inputs with reasons, channel statistics)
marks it done, so a rerun with the same arguments skips finished shards (with any number of
ranks). Rank 0 merges the sidecars into ``manifest.json`` (a typed ``data.manifest.Manifest``) and
prints every skipped input with its reason. An extraction that wrote no clip at all removes what
it wrote and fails (`UserError`, exit status 2). Every argument, the autoencoder and the input list
are checked before the output folder is made (when encoding starts; locked for the run, `launch.runs.claim_folder`).

A text-guided autoencoder (``text_dim > 0``, e.g. ``cmvae-*-text``) encodes each clip with its
caption's embedding from ``--text-encoder`` (the same embedding is cached in the shard).

This file plans the run, writes shards and merges the manifest; the encode loop (decode, encode
on the device, hand each shard to the writer) is `launch.encode_loop`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from autoencoders import LOADERS, Autoencoder, record_of, resolve
from autoencoders.tiling import configure_inference
from data import shards
from data.manifest import MANIFEST, Counts, Manifest
from data.sources import VideoClipDataset, list_items
from data.synth import class_space
from data.video import READING_VERSION, VideoError, Windows, fit_shared_memory, probe, read_clips, usable_cores
from launch import dist, runs
from launch.cli import Stopped, config_flag, switch_value
from launch.encode_loop import ShardBuffer, ae_cond, bytes_in_flight, clip_bytes, decoding_limit, loader_items
from launch.encode_loop import mean_clips, plan_units
from launch.encode_loop import encode_shards as _extract_shards  # `_extract` calls it by this name (tests wrap it)
from launch.engine import resolve_switch
from ldm import config as cfglib
from ldm.artifacts import AERecord, ClipSpec
from ldm.checkpoint import atomic_write_json, read_json
from ldm.errors import UserError, checking
from ldm.latent import Cond
from ldm.layers import ENCODE_COMPILE_MODES
from ldm.metrics import psnr
from ldm.text import absolute_spec, check_text_max_length, fingerprint, same_fingerprint

log = logging.getLogger("ldm.extract")


@dataclass(frozen=True)
class ExtractConfig:
    input: str
    output: str
    autoencoder: str | None = None  # registered or source name (autoencoders.resolve); optional with checkpoint
    checkpoint: str | None = None
    ae_path: str | None = None  # a source's local folder, e.g. a diffusers model for diffusers:<Class>
    ae_subfolder: str | None = None
    captions: str | None = None
    classes: str | None = None  # "folder" or a class list file (data.sources): each video's class is its folder
    split: str | None = None  # a list of the videos to take (UCF-101 trainlist01.txt)
    frames: int = 17
    height: int = 64
    width: int = 64
    fps: float | None = None
    shard_size: int = 64
    batch_size: int = 0  # clips per encoder call; 0 = auto (4 on the CPU, sized to the GPU's free memory)
    num_workers: int = -1  # video decoding workers per rank; -1 = auto (0 on the CPU, up to 8 per GPU)
    text_encoder: str | None = None
    text_max_length: int = 0  # tokens captions are cut / padded to; 0 = the encoder's (T5 120, CLIP 77, UMT5 512, builtin 64)
    verify: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16: the encoder runs in it
    tile: str | None = None  # spatial tiling of the encoder, "TILE[:OVERLAP]" pixels (large frames)
    chunk_frames: int = 0  # streaming encode this many frames at a time (IV-VAE, H3AE, causal3d, kl2d, opensora); 0 = one shot
    seed: int = 0
    clips_per_video: int | None = None  # None: 1, or 0 with clip_stride (data.video.Windows.from_flags)
    clip_stride: int | None = None
    num_classes: int = 0  # class-id space of the DiT's class embedding; 0 = the data's (`class_count`)
    compile: bool | str = False  # torch.compile the encoder (Autoencoder.compile_encode): true | false | auto (CUDA)
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs | reduce-overhead (ENCODE_COMPILE_MODES)


# settings that may differ when an extraction is run again into its folder (they do not change
# the latents); every other ExtractConfig key binds the folder (runs.check_binding). ``dtype`` is
# bound as the precision it resolves to.
HARMLESS = ("output", "batch_size", "num_workers", "verify", "device", "chunk_frames", "dtype", "compile",
            "compile_mode")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``[--config FILE.yaml] [flags] [KEY=VALUE ...]``: the flags are shorthands of ``ExtractConfig``
    keys and win over the YAML; dotted overrides win over both."""
    def a(*names: str, **kw: Any) -> None:
        config_flag(p, ExtractConfig, *names, **kw)

    p.add_argument("--config", help="an ExtractConfig YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. shard_size=128")
    p.add_argument(runs.ALLOW_FLAG, dest="allow_change", action="append", metavar="KEY[,KEY]",
                   help=runs.ALLOW_HELP + " (finished shards that differ are encoded again)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (YAML) and exit; reads and writes nothing")
    a("--autoencoder", help=f"registered name (see `ldm list`; optional with --checkpoint) or "
                            f"{' / '.join(k + ':<what>' for k in sorted(LOADERS))} with --ae-path")
    a("--checkpoint", help="folder written by save_pretrained / `ldm train-ae` (OUTPUT/final)")
    a("--ae-path", help="local folder of a source's weights, e.g. a diffusers model with --autoencoder "
                        "diffusers:<Class>")
    a("--ae-subfolder", help="subfolder of --ae-path holding the VAE (e.g. vae)")
    a("--input", help="folder of videos, a raw video .tar, a folder of tars or a brace pattern")
    a("--captions", help="CSV/JSONL with path,caption,class_id (default: metadata.jsonl in the folder)")
    a("--classes", metavar="folder|FILE",
      help="class of each video from its top-level folder (UCF-101/<Class>/...): 'folder' numbers the folders in "
           "sorted order from 0; a class list (UCF-101 classInd.txt '1 ApplyEyeMakeup') fixes the ids: "
           "its first number is id 0 (classInd's 1 -> 0). The names are kept for `ldm sample --class NAME`")
    a("--split", metavar="FILE",
      help="encode only the videos this list names, paths relative to --input (UCF-101 trainlist01.txt)")
    a("--output", help="output folder for shards + manifest.json")
    a("--frames", type=int)
    a("--height", type=int)
    a("--width", type=int)
    a("--fps", type=float, help="resample to this frame rate (default: native)")
    a("--shard-size", type=int, help="videos per shard (= clips per shard with one clip per video)")
    a("--batch-size", type=int,
      help="clips per encoder call (default 0 = auto: 4 on the CPU; on a GPU as many as half its free memory "
           "holds, measured on one clip, at most 64)")
    a("--num-workers", type=int,
      help="video decoding worker processes per rank (default -1 = auto: 0 on the CPU; with a GPU the usable "
           "cores / ranks on the node, less one, at most 16)")
    a("--tile", help="encode large frames in blended spatial tiles: TILE or TILE:OVERLAP pixels (e.g. 512:128); "
                     "grid autoencoders only")
    a("--chunk-frames", type=int,
      help="stream long clips this many frames at a time, same latents as one shot (IV-VAE, H3AE, causal3d, kl2d, opensora)")
    a("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
      help="precision the autoencoder runs in (weights and activations): auto = bf16 on CUDA, fp32 on the CPU. "
           "Latents are stored as fp32 either way")
    a("--compile", type=switch_value, metavar="true|false|auto",
      help="torch.compile the autoencoder's encode: fused kernels, fewer launches (for an encoder that launches "
           "many small kernels, as H3AE). One compile per run before the first batch (seconds to minutes; the last "
           "batch of a shard is padded to the full batch, so there is one shape); the same latents within float "
           "rounding. auto = on for CUDA. Default false")
    a("--compile-mode", choices=list(ENCODE_COMPILE_MODES),
      help="torch.compile mode for --compile: reduce-overhead also replays each batch's kernels as one CUDA graph")
    a("--text-encoder", help="cache caption embeddings: builtin | t5:DIR | clip:DIR")
    a("--text-max-length", type=int, metavar="N",
      help="tokens the captions are cut or padded to, as the DiT you train expects (e.g. 300 for Open-Sora's T5, 226 "
           "for CogVideoX's); default 0 = the encoder's own: T5 120, CLIP 77, UMT5 512, builtin 64. Recorded: "
           "`ldm sample` cuts prompts to it")
    a("--num-classes", type=int, metavar="N",
      help="class ids the data's labels index, 0..N-1 (default 0 = from the data: the whole id space of a "
           "`ldm data synth` set, else the largest id + 1)")
    a("--verify", type=int, metavar="K", help="decode K random latents, report PSNR vs source")
    a("--device", choices=["auto", "cpu", "cuda"])
    a("--seed", type=int, help="seed of random weights (registered name, no checkpoint)")
    a("--clips-per-video", type=int, metavar="K",
      help="K evenly spaced windows per video (default 1: the first frames; 0: every non-overlapping window "
           "that fits)")
    a("--clip-stride", type=int, metavar="S",
      help="every window that fits, one starting every S output frames (instead of K)")


def check_config(cfg: ExtractConfig) -> None:
    """The numbers of an extraction are usable (`UserError` naming the flag otherwise)."""
    positive = {"--frames": cfg.frames, "--height": cfg.height, "--width": cfg.width, "--shard-size": cfg.shard_size}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--verify": cfg.verify, "--chunk-frames": cfg.chunk_frames, "--batch-size": cfg.batch_size,
                        "--num-classes": cfg.num_classes}.items():
        if value < 0:
            raise UserError(f"{flag} must be >= 0, got {value}" + (" (0 = auto)" if flag == "--batch-size" else ""))
    if cfg.num_workers < -1:
        raise UserError(f"--num-workers must be >= 0 or -1 (auto), got {cfg.num_workers}")
    check_text_max_length(cfg.text_max_length, cfg.text_encoder)
    with checking("--compile"):
        resolve_switch(cfg.compile, torch.device("cpu"), "compile")
    if cfg.compile_mode not in ENCODE_COMPILE_MODES:
        raise UserError(f"--compile-mode must be one of {', '.join(ENCODE_COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if cfg.fps is not None and not cfg.fps > 0:
        raise UserError(f"--fps must be > 0 (or left out for the native rate), got {cfg.fps}")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder (new, or an earlier run of this extraction)")


def run(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k in ExtractConfig.__dataclass_fields__}
    if args.print_config:
        with checking():
            print(cfglib.resolved_yaml(args.config, ExtractConfig, args.overrides, values=flags), end="")
        return 0
    summary = extract(cfglib.load_yaml(args.config, ExtractConfig, args.overrides, values=flags),
                      runs.parse_allow(args.allow_change))
    if dist.is_main():
        keys = ("written", "skipped", "shards", "clips_per_s", "steady_clips_per_s", "decode_wait_share",
                "loop_ms_per_clip", "compile_s", "verify_psnr")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0


def load_autoencoder(cfg: ExtractConfig) -> tuple[Autoencoder, AERecord]:
    """The model to encode with and its record (what the manifest stores to rebuild it)."""
    if cfg.checkpoint and cfg.ae_path:
        raise ValueError("give --checkpoint (our saved folder) or --ae-path (a source's folder), not both")
    weights = cfg.checkpoint or cfg.ae_path
    found = resolve(cfg.autoencoder, weights, subfolder=cfg.ae_subfolder, seed=cfg.seed)
    return found.model, record_of(found, weights, cfg.ae_subfolder, cfg.seed)


def _run_signature(cfg: ExtractConfig, record: AERecord, dtype: torch.dtype,
                   text_fp: list[float] | None) -> dict[str, Any]:
    """What the shards of one extraction share: a rerun into the same folder must match it."""
    return {"autoencoder": record.name, "config_hash": record.config_hash, "checkpoint_hash": record.checkpoint_hash,
            "video": cfglib.to_dict(_clip_spec(cfg)), "text_encoder": cfg.text_encoder, "text_fingerprint": text_fp,
            "shard_size": cfg.shard_size, "dtype": dist.dtype_name(dtype), "tile": cfg.tile}


READING_HINT = ("an earlier version of the platform read its clips (resized ones differ by at most one level of "
                "255): allowed, the change keeps its finished shards and reads the others the new way")
TEXT_FINGERPRINT = "text_encoder.fingerprint"  # its binding key: --allow-change text_encoder covers it


def run_binding(cfg: ExtractConfig, record: AERecord, dtype: torch.dtype, items: list,
                text_fp: list[float] | None) -> dict[str, Any]:
    """What the output folder is bound to: the settings except ``HARMLESS``, the autoencoder
    (name, config and weights hashes), the precision, the inputs (how many, a hash of their keys),
    the text encoder's fingerprint (`bound_fingerprint`) and the video reading's version
    (`data.video.READING_VERSION`: a folder begun by an earlier reading is not finished by another)."""
    keys = [it.key for it in items]
    facts = {"model": {"name": record.name, "config_hash": record.config_hash,
                       "checkpoint_hash": record.checkpoint_hash},
             "compute_dtype": dist.dtype_name(dtype), TEXT_FINGERPRINT: text_fp,
             "inputs": f"{len(keys)} (keys sha256 {hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:16]})",
             "labels": labels_digest(items), "reading": READING_VERSION}
    return runs.binding_record(cfglib.to_dict(cfg), HARMLESS, facts)


def labels_digest(items: list) -> str:
    """A hash of the captions and class ids of ``items`` (what their samples' text, text embeddings
    and labels come from): a captions file edited between runs is a change, not a mix."""
    text = "\n".join(json.dumps([it.caption, it.class_id]) for it in items)
    return f"captions and class ids sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def bound_fingerprint(out: Path, text_encoder) -> tuple[list[float] | None, list[float] | None]:
    """The text encoder's fingerprint (`ldm.text.fingerprint`) as this run binds the folder, and the
    one the folder recorded (its run.json's, else its manifest's; None if neither has one: a folder
    made before, which resumes as it is). The recorded one when the encoder still gives it
    (`same_fingerprint`: another device moves the last digits), so a folder whose encoder was
    replaced between an interrupted run and its rerun is refused instead of mixing encoders."""
    recorded = None
    try:
        if (out / runs.BINDING).is_file():
            recorded = read_json(out / runs.BINDING)["record"].get(TEXT_FINGERPRINT)
        if recorded is None and (out / MANIFEST).is_file():
            recorded = read_json(out / MANIFEST).get("text_fingerprint")
    except (ValueError, KeyError, TypeError, AttributeError):  # unreadable: check_binding says so
        pass
    # rank 0's: every rank's shards record the same one (GPUs may differ in the last digit)
    current = dist.broadcast_object(None if text_encoder is None else list(fingerprint(text_encoder)))
    if current is not None and recorded and same_fingerprint(current, recorded):
        current = list(recorded)
    return current, recorded


def class_count(cfg: ExtractConfig, items: list) -> int:
    """The manifest's ``num_classes`` (the DiT's class embedding has that many rows): ``--num-classes``,
    else the whole id space of a synthetic set (`data.synth.class_space`: its clips may not use every
    id, and the attribute benchmark asks for all of them), else the classes of a class list
    (``--classes classInd.txt``: all of them, also those without a video here), else the largest
    label + 1 (0: no labels)."""
    labelled = max((it.class_id for it in items if it.class_id is not None), default=-1) + 1
    names = getattr(items, "class_names", ())
    declared = cfg.num_classes or class_space(cfg.input) or len(names)
    if cfg.num_classes and cfg.num_classes < len(names):
        raise UserError(f"--num-classes {cfg.num_classes}: the class list names {len(names)} classes (ids 0 to "
                        f"{len(names) - 1}); give --num-classes {len(names)} or more, or leave it out")
    if cfg.num_classes and not labelled:
        raise UserError(f"--num-classes {cfg.num_classes}: no video of {cfg.input} has a class id (a class_id or label "
                        "column of the captions, or a shard's .cls)")
    if declared and labelled > declared:
        worst = next(it for it in items if it.class_id == labelled - 1)
        raise UserError(f"{worst.key} has class id {labelled - 1}, outside --num-classes {declared} (ids 0 to "
                        f"{declared - 1}); give a larger --num-classes, or 0 to count them from the data")
    return declared or labelled


def _clip_spec(cfg: ExtractConfig) -> ClipSpec:
    windows = Windows.from_flags(cfg.clips_per_video, cfg.clip_stride)
    return ClipSpec(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps,
                    clips_per_video=windows.clips_per_video, clip_stride=windows.stride)


MAX_AUTO_WORKERS = 16  # decoding workers per rank by default on a GPU


def auto_workers(requested: int, device: torch.device, local_world: int) -> int:
    """``-1``: no worker processes on the CPU (the encoder needs the cores), else one decoder per
    core of this rank but one (left to the loop, the pinning and the shard writer), at most
    `MAX_AUTO_WORKERS`: an autoencoder that encodes faster than video decodes (h3ae) is fed by
    every core, one that encodes slower leaves the workers waiting on a full queue."""
    if requested >= 0:
        return requested
    if requested != -1:
        raise ValueError(f"--num-workers must be >= 0 or -1 (auto), got {requested}")
    if device.type != "cuda":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, cores_per_rank(local_world) - 1))


def cores_per_rank(local_world: int) -> int:
    """The CPU cores this process may run on (`data.video.usable_cores`) shared among the
    ``local_world`` ranks on this machine (at least 1)."""
    return max(1, usable_cores() // max(local_world, 1))


def auto_batch_size(requested: int, ae: Autoencoder, cfg: ExtractConfig, device: torch.device,
                    dtype: torch.dtype, text: tuple[int, int] | None) -> int:
    """``0``: 4 on the CPU; on a GPU, encode one clip, measure its activation memory and take as
    many clips as half the free memory holds (at most 64)."""
    if requested > 0:
        return requested
    if requested < 0:
        raise ValueError(f"--batch-size must be >= 1 or 0 (auto), got {requested}")
    if device.type != "cuda":
        return 4
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        ae.encode(*blank_clips(1, cfg, device, dtype, text))
    torch.cuda.synchronize(device)
    per_clip = max(torch.cuda.max_memory_allocated(device) - base, 1)
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(64, max(1, 0.5 * free // per_clip)))


def blank_clips(n: int, cfg: ExtractConfig, device: torch.device, dtype: torch.dtype,
                text: tuple[int, int] | None) -> tuple[torch.Tensor, Cond | None]:
    """``n`` black clips of the extraction's size and, for a text-guided encoder (``text``: `caption_shape`),
    caption embeddings of the shape the run's text encoder gives: what `auto_batch_size` measures and
    `compile_encoder` compiles with (another caption length would compile again at the first batch)."""
    video = torch.zeros(n, 3, cfg.frames, cfg.height, cfg.width, device=device, dtype=dtype)
    cond = Cond(text=torch.zeros(n, *text, device=device, dtype=dtype),
                text_mask=torch.ones(n, text[0], dtype=torch.bool, device=device)) if text else None
    return video, cond


def caption_shape(run: ExtractRun) -> tuple[int, int] | None:
    """``(tokens, dim)`` of each clip's caption embeddings for a text-guided encoder (the text encoder pads
    or cuts every caption to its ``max_length``), None for the others."""
    if not run.ae.text_dim:
        return None
    return run.text_encoder.max_length, run.ae.text_dim


@torch.no_grad()
def compile_encoder(run: ExtractRun, batch: int) -> float:
    """``--compile``: compile the encoder (`Autoencoder.compile_encode`) and run it on a full batch of
    blank clips, once (twice with CUDA graphs: the second call records them), so the first real batch
    finds it compiled; the seconds that took."""
    t0 = time.perf_counter()
    run.ae.compile_encode(run.cfg.compile_mode)
    clips = blank_clips(batch, run.cfg, run.device, run.dtype, caption_shape(run))
    for _ in range(2 if run.cfg.compile_mode == "reduce-overhead" else 1):
        run.ae.encode(*clips)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return time.perf_counter() - t0


def extract(cfg: ExtractConfig, allow_change: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the extraction ``cfg``; ``allow_change``: keys of the binding that may differ from the
    extraction the output folder holds (its differing shards are encoded again)."""
    out = Path(cfg.output)
    made_output = not out.exists()  # made by this run: removed again if it ends holding nothing
    stop = _StopOnSigterm()
    try:
        return _extract(cfg, allow_change, stop)
    except BaseException:
        if stop.signal is None:
            raise
        raise _stopped(out, stop.signal) from None  # whatever the signal broke (a wait on a rank that stopped)
    finally:
        stop.close()
        runs.release_folder(out, made=made_output)


class _StopOnSigterm:
    """SIGTERM (a scheduler's preemption or time limit, ``scancel``, torchrun stopping its ranks)
    stops the extraction as Ctrl-C does: the shard being written is finished (`_extract_shards`
    waits for its writer), the shard being encoded is dropped, and `extract` raises `Stopped`.
    A second SIGTERM is ignored. Installed from the main thread only; ``close`` puts the earlier
    handlers back.

    Inside ``held()`` a SIGTERM or a first Ctrl-C is noted and raised (`Stopped`, KeyboardInterrupt)
    when the block ends; a second Ctrl-C interrupts at once. The encode loop receives its decoded
    clips in it: a stop in the middle of that exchange (each tensor's file descriptor is handed over
    through a connection to the worker) broke the connection and the worker printed a
    ``ConnectionResetError`` traceback."""

    def __init__(self) -> None:
        import signal
        import threading

        self.signal: str | None = None
        self._previous: Any = None
        self._previous_int: Any = None
        self._holding = False
        self._interrupted = False  # a Ctrl-C inside held()
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous_int = signal.signal(signal.SIGINT, self._handle_int)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal = "SIGTERM"
            if not self._holding:
                raise Stopped(self.signal)

    def _handle_int(self, signum: int, frame) -> None:
        if not self._holding or self._interrupted:  # the second: at once, whatever the workers do
            raise KeyboardInterrupt
        self._interrupted = True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block a SIGTERM or a first Ctrl-C does not interrupt: they are raised when it ends."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self.signal is not None:
            raise Stopped(self.signal)
        if self._interrupted:
            raise KeyboardInterrupt

    def close(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None


def _stopped(out: Path, signal_name: str) -> Stopped:
    """The `Stopped` of an extraction a signal ended: on rank 0 (every rank gets the signal) one line
    with the complete shards in ``out`` (each has its sidecar), none on the others."""
    if not dist.is_main():
        return Stopped(signal_name)
    done = len(list(out.glob("shard-[0-9]*.json"))) if out.is_dir() else 0
    return Stopped(signal_name, f"stopped by {signal_name}: {done} complete shard(s) kept in {out} (the shards "
                                f"being encoded are dropped); run the same command to resume")


# ------------------------------------------------------------------------------------------
# the extraction: `_extract` reads top to bottom as set-up -> plan this rank's shards -> encode them
# -> wait for every rank -> merge and verify (rank 0) -> wait for rank 0. `_extract_shards` is the
# encode loop (`launch.encode_loop`: decode, encode on the device, hand each shard to
# `_write_shard_files`); a stop (SIGTERM, Ctrl-C) is handled around all of it by `extract`. Where to
# change what: a field of each sample's JSON in `encode_loop._sample_meta`; a step on the clips before
# the encoder in `encode_loop._ShardEncoder.encode_pending`; a per-shard count in `ShardBuffer` and
# `_write_shard_files` (and its sum over shards in `_merge_manifest`).
# ------------------------------------------------------------------------------------------
@dataclass
class ExtractRun:
    """What the set-up builds once and every later step reads: the config, this process's place, the
    encoders, the inputs and the output folder's binding."""

    cfg: ExtractConfig
    env: dist.DistEnv
    out: Path
    device: torch.device
    dtype: torch.dtype  # the encoder runs in it
    ae: Autoencoder
    record: AERecord
    spec: Any  # the autoencoder's latent spec for the clips
    text_encoder: Any  # None without --text-encoder
    items: list
    windows: Windows
    clips: VideoClipDataset
    n_shards: int
    signature: dict[str, Any]  # what every shard records (`_run_signature`)
    since: dict[str, Any]  # what a shard or run.json of an earlier version stands for
    binding: runs.Binding


def _extract(cfg: ExtractConfig, allow_change: tuple[str, ...], stop: _StopOnSigterm) -> dict[str, Any]:
    run = set_up(cfg, allow_change)
    todo = plan_shards(run)
    cfg, env = run.cfg, run.env
    workers = auto_workers(cfg.num_workers, run.device, dist.local_ranks(env))
    batch = auto_batch_size(cfg.batch_size, run.ae, cfg, run.device, run.dtype, caption_shape(run)) if todo else 1
    compiled_s = None
    if todo and resolve_switch(cfg.compile, run.device, "compile"):
        compiled_s = compile_encoder(run, batch)
        log.info("ldm extract: the encoder compiled for batches of %d in %.1f s", batch, compiled_s)
    S = cfg.shard_size
    units = plan_units(run.clips, [i for j in todo for i in range(j * S, min((j + 1) * S, len(run.items)))],
                       run.windows, workers, held=stop.held)
    n_clips = sum(1 if isinstance(w, str) else len(w) for _, w in units)
    size = clip_bytes(cfg)
    per_item = mean_clips(loader_items(units, batch, size))
    workers, fewer = fit_shared_memory(workers, lambda w: bytes_in_flight(w, batch, per_item, size),
                                       dist.local_ranks(env))
    if fewer and dist.is_main():
        log.warning("ldm extract: %s", fewer)
    bar = tqdm(total=n_clips, desc=f"extract r{env.rank}", unit="clip", disable=not dist.is_main())
    t0 = time.perf_counter()
    try:
        encoded, first_queued, decode_wait, spent = _extract_shards(run, units, batch, workers, bar,
                                                             write=functools.partial(_write_shard_files, run=run),
                                                             held=stop.held)
    finally:  # also on a stop: what is printed next starts on a line of its own
        bar.close()
    elapsed = time.perf_counter() - t0

    _wait_for_the_other_ranks()  # for the slowest rank's shards (uneven videos): up to LDM_WAIT_TIMEOUT_S
    # fill: the wait for the first batch of decoded clips (worker start-up, first reads), paid once per
    # run; the steady rate leaves it out and is what a long extraction approaches
    fill = (first_queued - t0) if first_queued is not None else 0.0
    steady = elapsed - fill
    # of the steady time, the share the encode loop waited for decoded clips (None: no batch was encoded)
    wait_share = decode_wait / steady if first_queued is not None and steady > 0 else None
    summary: dict[str, Any] = {"clips_per_s": encoded / elapsed if elapsed > 0 else 0.0,
                               "steady_clips_per_s": encoded / steady if steady > 0 else 0.0,
                               "decode_wait_share": wait_share, "fill_s": fill, "batch_size": batch,
                               "num_workers": workers, "verify_psnr": None, "compile_s": compiled_s,
                               # where the loop's steady time went, per clip: what is left of steady / clips
                               # is unpacking, the progress bar, shard hand-offs and waits for the GIL
                               "loop_ms_per_clip": {k: 1e3 * v / max(encoded, 1)
                                                    for k, v in {"decode_wait": decode_wait, **spent,
                                                                 "steady": steady}.items()}}
    if dist.is_main():
        manifest = merge_and_verify(run, summary)
        report(run, summary, manifest, encoded, elapsed)
    _wait_for_the_other_ranks()  # rank 0 merges and verifies alone (--verify K decodes K clips)
    if not summary.get("written", 1):
        raise UserError(f"no clip was written: all {len(run.items)} inputs were skipped (reasons above); fix or "
                        f"replace the inputs, or change --frames/--fps/--clips-per-video, and run again")
    return summary


def set_up(cfg: ExtractConfig, allow_change: tuple[str, ...]) -> ExtractRun:
    """Every check (flags, the autoencoder and text encoder, the input list, the folder's binding),
    then the output folder claimed and the end-of-run wait group opened."""
    windows = Windows.from_flags(cfg.clips_per_video, cfg.clip_stride)  # contradictory flags: clear error first
    check_config(cfg)
    out = Path(cfg.output)
    runs.check_free(out)  # a live extraction's folder: refused before the autoencoder is loaded
    env = dist.init_distributed()
    device, dtype, ae, record, text_encoder = load_encoders(cfg, env)
    spec = ae.latent_spec(cfg.frames, cfg.height, cfg.width)

    items = list_items(cfg.input, cfg.captions, cfg.classes, cfg.split)
    if not items:
        raise UserError(f"no videos found in {cfg.input}")
    class_count(cfg, items)  # a label outside --num-classes: clear error before any work
    mixed = mixed_rates(items) if cfg.fps is None and env.rank == 0 else None
    if mixed:
        log.warning(mixed)
    clips = VideoClipDataset(items, cfg.frames, cfg.height, cfg.width, cfg.fps)
    n_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    text_fp, recorded_fp = bound_fingerprint(out, text_encoder)
    since = {"text_fingerprint": recorded_fp or text_fp}  # what a shard or run.json of an earlier version stands for
    signature = _run_signature(cfg, record, dtype, text_fp)
    binding = runs.check_binding(out, run_binding(cfg, record, dtype, items, text_fp), allow_change,
                                 defaults={**runs.defaults_of(ExtractConfig),
                                           TEXT_FINGERPRINT: since["text_fingerprint"],
                                           "labels": labels_digest(items), "reading": 1},
                                 hints={"reading": READING_HINT})
    # no second extraction into the folder while this one lives (rank 0 holds it for every rank of the run);
    # the folder appears here, after every check
    runs.claim_folder(out)
    dist.open_wait_group()  # the end-of-run waits: a rank may finish hours before the last one
    return ExtractRun(cfg, env, out, device, dtype, ae, record, spec, text_encoder, items, windows, clips, n_shards,
                      signature, since, binding)


def load_encoders(cfg: ExtractConfig, env: dist.DistEnv) -> tuple[torch.device, torch.dtype, Autoencoder, AERecord,
                                                                  Any]:
    """The device and precision, the autoencoder on them (checked against the clip size, with its
    tiling / chunking) and its record, and the text encoder (None without ``--text-encoder``)."""
    with checking():
        device = dist.device_for(env, cfg.device)
        dtype = dist.compute_dtype(cfg.dtype, device)
        ae, record = load_autoencoder(cfg)
    name = record.name
    caveat = ae.latent_caveat()
    if caveat and env.rank == 0:
        log.warning("%s is %s", name, caveat)
    with checking(f"--frames {cfg.frames} --height {cfg.height} --width {cfg.width}"):
        ae.check_input(cfg.frames, cfg.height, cfg.width)  # clear error before any work
    with checking():
        configure_inference(ae, cfg.tile, cfg.chunk_frames)
    ae = ae.to(device=device, dtype=dtype).eval()
    text_encoder = None
    if cfg.text_encoder:
        from ldm.text import build_text_encoder
        # the length the DiT to train expects (--text-max-length), else the one a text-guided autoencoder
        # was trained with, else the encoder's own
        trained = ae.text_length()
        if cfg.text_max_length and trained not in (None, cfg.text_max_length):
            raise UserError(f"{name} was trained with captions of {trained} tokens and encodes with them: "
                            f"--text-max-length must be {trained} or left out for it, got {cfg.text_max_length} "
                            "(the DiT then trains on the same embeddings)")
        with checking("--text-encoder"):
            text_encoder = build_text_encoder(cfg.text_encoder, max_length=cfg.text_max_length or trained).to(device)
        text_encoder.warned_cut = True  # a cut caption is reported here: one warning naming it, a count at the end
    with checking():
        ae.check_text_encoder(text_encoder, cfg.text_encoder, name)
    return device, dtype, ae, record, text_encoder


def plan_shards(run: ExtractRun) -> list[int]:
    """This rank's shards to encode. Rank 0 finds the shards not done (or that differ, with an allowed
    change) and removes the temp files a killed run left; every rank takes every world_size-th of
    them: a rerun after a node failed, or on another number of ranks, spreads the rest over all ranks
    (was: shard j on rank j mod world_size, idle when done)."""
    out, env = run.out, run.env
    error, remaining = None, []
    if env.rank == 0:
        try:
            remaining = _shards_to_do(out, run.n_shards, run.cfg, run.items, run.signature, run.since, run.binding)
        except UserError as e:
            error = str(e)
        for stale in out.glob(".shard-*tmp"):  # temp files a killed run left (no rank writes yet)
            stale.unlink(missing_ok=True)
        for name in (MANIFEST, runs.BINDING):  # and those of the files rank 0 alone writes
            for stale in out.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
    error, remaining = dist.broadcast_object((error, remaining))
    if error:
        raise UserError(error)
    return dist.shard_list(remaining, env.rank, env.world_size)


def merge_and_verify(run: ExtractRun, summary: dict[str, Any]) -> Manifest:
    """On rank 0, once every rank's shards are written: shards beyond this run's removed, the sidecars
    merged into the manifest, the binding recorded, the counts into ``summary``, then ``--verify``."""
    cfg, out, text_encoder = run.cfg, run.out, run.text_encoder
    _remove_shards_beyond(out, run.n_shards)
    manifest = _merge_manifest(run)
    if manifest.counts.written and (run.binding.changes or not (out / runs.BINDING).exists()):
        run.binding.write()  # allowed changes recorded (also for a folder of an earlier version)
    summary.update(written=manifest.counts.written, skipped=manifest.counts.skipped, shards=len(manifest.shards))
    if text_encoder is not None:
        summary["captions_cut"] = sum(read_json(out / f"shard-{j:06d}.json").get("captions_cut", 0)
                                      for j in range(run.n_shards) if (out / f"shard-{j:06d}.json").is_file())
    if cfg.verify > 0 and manifest.counts.written > 0:
        summary["verify_psnr"] = verify(out, run.ae, cfg, run.items, run.device, text_encoder, run.dtype)
        cfglib.replace(manifest, verify={"k": cfg.verify, "psnr": summary["verify_psnr"]}).write(out)
    return manifest


def report(run: ExtractRun, summary: dict[str, Any], manifest: Manifest, encoded: int, elapsed: float) -> None:
    """On rank 0: the closing lines (rate, counts, skipped inputs, cut captions); a run that wrote no
    clip removes what it wrote (`_extract` then fails)."""
    out = run.out
    print(f"extracted {encoded} clips in {elapsed:.1f}s on rank 0 ({summary['clips_per_s']:.2f} clips/s/rank, "
          f"{summary['steady_clips_per_s']:.2f} after the first batch); "
          f"{summary['written']} written, {summary['skipped']} skipped, {summary['shards']} shards -> {out}"
          + ("" if summary["compile_s"] is None else f" (the encoder compiled in {summary['compile_s']:.1f}s before)"))
    limit = decoding_limit(summary, encoded, cores_per_rank(dist.local_ranks(run.env)), run.device)
    if limit:
        print(limit)
    print_skipped(list(manifest.skipped))
    if summary.get("captions_cut"):
        print(f"{summary['captions_cut']} caption(s) filled the text encoder's {run.text_encoder.max_length} "
              "tokens and were cut to them: the DiT sees only their beginning")
    if not manifest.counts.written:
        _remove_empty_run(out, run.n_shards)


def _shards_to_do(out: Path, n_shards: int, cfg: ExtractConfig, items: list, signature: dict, since: dict,
                  binding: runs.Binding) -> list[int]:
    """The shards of ``out`` to encode: not done (no sidecar, or its tar missing), or done with another
    signature, inputs or labels (with an allowed change; a folder of a different extraction is a
    `UserError`)."""
    todo = []
    for j in range(n_shards):
        sidecar = out / f"shard-{j:06d}.json"
        keys = [it.key for it in items[j * cfg.shard_size:(j + 1) * cfg.shard_size]]
        labels = labels_digest(items[j * cfg.shard_size:(j + 1) * cfg.shard_size])
        if sidecar.exists():
            done = read_json(sidecar)
            old = {**since, **done["signature"]}
            differ = [k for k in sorted(set(old) | set(signature)) if old.get(k) != signature.get(k)]
            differ += ["inputs"] if done["keys"] != keys else []
            differ += ["labels"] if done.get("labels", labels) != labels else []  # none: a shard of an earlier version
            if differ and not binding.changes:  # a folder of an extraction made before run.json existed
                raise UserError(f"{out} holds shards of a different extraction ({sidecar.name}: {', '.join(differ)} "
                                "differ); give a new --output folder")
            tar_ok = done["written"] == 0 or (out / shards.SHARD_NAME.format(j)).exists()
            if tar_ok and not differ:
                continue
        todo.append(j)
    return todo


def _wait_for_the_other_ranks() -> None:
    """`dist.wait_all`, with a rank that stopped (disk full, out of memory, killed) or never came one line
    on the ranks that waited for it (was: gloo's traceback, ``Connection closed by peer``)."""
    try:
        dist.wait_all()
    except RuntimeError as e:
        why = re.sub(r"^\[[^\]]*\]\s*", "", str(e)).split(". ")[0]  # gloo's source location left out
        raise UserError(f"another rank of this extraction stopped (its own error is in its output) or did not "
                        f"finish within {dist.WAIT_TIMEOUT_ENV} ({why}); the complete shards are kept: rerun the "
                        "same command to resume") from None


SKIPPED_SHOWN = 20  # skipped inputs printed at the end of a run (all of them are in manifest.json)


def print_skipped(skipped: list[dict[str, Any]]) -> None:
    """The skipped inputs of a run with their reasons, at most ``SKIPPED_SHOWN`` of them."""
    if not skipped:
        return
    print(f"skipped {len(skipped)}:")
    for s in skipped[:SKIPPED_SHOWN]:
        where = f" (clip {s['clip']} at frame {s['start_frame']})" if "start_frame" in s else ""
        print(f"  - {s['key']}{where}: {s['reason']}")
    if len(skipped) > SKIPPED_SHOWN:
        print(f"  ... {len(skipped) - SKIPPED_SHOWN} more in {MANIFEST} (\"skipped\")")


def _remove_shards_beyond(out: Path, n_shards: int) -> None:
    """Shards ``>= n_shards`` (tar and sidecar) of an earlier extraction into ``out`` with more
    shards (an allowed change of ``shard_size`` or of the inputs): the trainer reads every
    ``shard-*.tar`` of the folder, so they would repeat or add clips the manifest does not hold."""
    if not out.is_dir():
        return
    for p in out.glob("shard-*"):
        m = re.fullmatch(r"shard-(\d{6})\.(tar|json)", p.name)
        if m and int(m.group(1)) >= n_shards:
            p.unlink(missing_ok=True)


def _remove_empty_run(out: Path, n_shards: int) -> None:
    """An extraction that wrote no clip: remove its sidecars and manifest (a rerun must not take
    the inputs as done); `extract` removes the folder when this run made it and nothing else is in it."""
    for j in range(n_shards):
        (out / f"shard-{j:06d}.json").unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    (out / runs.BINDING).unlink(missing_ok=True)


def _write_shard_files(buf: ShardBuffer, run: ExtractRun) -> None:
    """The shard's tar (atomic rename), then its sidecar, which marks it done. ``run.json`` is
    written with the first shard, so a run that fails before writing one binds nothing. Runs in the
    background writer thread."""
    cfg, items, signature, out, binding = run.cfg, run.items, run.signature, run.out, run.binding
    out.mkdir(parents=True, exist_ok=True)
    if binding.changes or not (out / runs.BINDING).exists():
        binding.write()
    lo, hi = buf.index * cfg.shard_size, min((buf.index + 1) * cfg.shard_size, len(items))
    if buf.samples:
        shards.write_shard(out / shards.SHARD_NAME.format(buf.index), buf.samples, buf.keys)
    else:  # an allowed change that leaves the shard empty: its earlier tar must not be read
        (out / shards.SHARD_NAME.format(buf.index)).unlink(missing_ok=True)
    atomic_write_json(out / f"shard-{buf.index:06d}.json", {
        "signature": signature, "keys": [it.key for it in items[lo:hi]], "labels": labels_digest(items[lo:hi]),
        "written": len(buf.samples),
        "skipped": buf.skipped, "stats": buf.stats.to_json(), "text_tokens": buf.text_tokens,
        "captions_cut": buf.captions_cut, "class_counts": {str(k): v for k, v in sorted(buf.class_counts.items())},
        "source_fps": buf.source_fps, "variable_rate": buf.variable_rate})


def _merge_manifest(run: ExtractRun) -> Manifest:
    """The shard sidecars summed into ``manifest.json``: counts, channel statistics, skipped inputs,
    clips per class, the clips' rate; written and returned."""
    out, n_shards, items, text_encoder, cfg = run.out, run.n_shards, run.items, run.text_encoder, run.cfg
    stats, skipped, shard_list, written, text_tokens = shards.ChannelStats(), [], [], 0, 0
    num_classes = class_count(cfg, items)
    per_class: list[int] | None = [0] * num_classes  # None: a shard written before the counts were kept
    variable: list[str] = []
    for j in range(n_shards):
        side = read_json(out / f"shard-{j:06d}.json")
        variable += side.get("variable_rate", [])  # not in shards written before it was kept
        if per_class is not None and "class_counts" in side:
            for k, v in side["class_counts"].items():
                per_class[int(k)] += v
        else:
            per_class = None
        stats.merge(shards.ChannelStats.from_json(side["stats"]))
        skipped.extend(side["skipped"])
        written += side["written"]
        text_tokens += side["text_tokens"]
        if side["written"]:
            shard_list.append({"name": shards.SHARD_NAME.format(j), "count": side["written"]})
    skipped_keys = {s["key"] for s in skipped}
    if variable and cfg.fps is None:
        log.warning(variable_rate_warning(variable))
    # the rate the clips play at (`ldm sample` writes videos at it): --fps, else the inputs' own
    clip_fps = cfg.fps or native_fps([it for it in items if it.key not in skipped_keys])
    manifest = Manifest(
        autoencoder=run.record, video=cfglib.replace(_clip_spec(cfg), clip_fps=clip_fps),
        latent_spec=run.spec.to_dict(), form=run.spec.form,
        counts=Counts(inputs=len(items), written=written, skipped=len(skipped)),
        stats=stats.summary(), shards=tuple(shard_list), skipped=tuple(skipped),
        input_problems=tuple(getattr(items, "problems", [])),
        text_encoder=absolute_spec(cfg.text_encoder) if cfg.text_encoder else None,  # `ldm sample` runs anywhere
        text_dim=text_encoder.dim if text_encoder is not None else None,
        text_fingerprint=run.signature["text_fingerprint"],
        text_max_length=text_encoder.max_length if text_encoder is not None else None,
        text_tokens=round(text_tokens / written) if written else 0,
        num_classes=num_classes, class_names=tuple(getattr(items, "class_names", ())),
        class_counts=tuple(per_class) if per_class and sum(per_class) else (),
        shard_size=cfg.shard_size, dtype=run.signature["dtype"], tile=cfg.tile, world_size=run.env.world_size)
    manifest = Manifest.from_dict(manifest.to_dict())  # JSON-normalised (what readers see), and checked
    manifest.write(out)
    return manifest


def variable_rate_warning(keys: list[str], show: int = 3) -> str:
    """Without ``--fps``: the inputs with a variable frame rate, whose clips take consecutive frames."""
    more = f" and {len(keys) - show} more" if len(keys) > show else ""
    return (f"{len(keys)} input(s) have a variable frame rate ({', '.join(keys[:show])}{more}, listed under "
            "variable_rate in the shard-*.json files) and --fps is not given: their clips take consecutive frames "
            "whatever the time between them, so motion speeds up and slows down within a clip; give --fps F to "
            "pick frames by their timestamps")


def source_rates(out: str | Path) -> tuple[dict[str, int], list[str]]:
    """An extraction folder's clips per source frame rate ("24", "29.97", "unknown") and its inputs with a
    variable frame rate, from the shard sidecars (those written before they were counted add nothing)."""
    rates: dict[str, int] = {}
    variable: list[str] = []
    for side in sorted(Path(out).glob("shard-*.json")):
        record = read_json(side)
        for rate, n in record.get("source_fps", {}).items():
            rates[rate] = rates.get(rate, 0) + n
        variable += record.get("variable_rate", [])
    return dict(sorted(rates.items(), key=_by_clips)), variable


def _by_clips(rate_count: tuple[str, int]) -> tuple[int, float]:
    """Most clips first, then the higher rate ("unknown" last)."""
    rate, n = rate_count
    return -n, -float(rate) if rate != "unknown" else 0.0


def native_rates(items: list, limit: int = 8) -> list[float]:
    """The native frame rates of the first ``limit`` readable ``items`` (container headers only)."""
    rates = []
    for it in items:
        try:
            rate = probe(it.readable())["fps"]
        except VideoError:
            continue
        if rate:
            rates.append(rate)
        if len(rates) == limit:
            break
    return rates


def native_fps(items: list, limit: int = 8) -> float | None:
    """The median native frame rate of the first ``limit`` readable ``items`` (of an even count the
    lower middle one: a rate some input has, not 27 between 24 and 30), None when none has one."""
    rates = native_rates(items, limit)
    return statistics.median_low(rates) if rates else None


def mixed_rates(items: list, limit: int = 8) -> str | None:
    """Without ``--fps``: a warning when the first ``limit`` readable inputs play at rates more than
    10 % apart (scraped or phone videos: 24, 30, 60 fps, ...), None when they agree."""
    rates = native_rates(items, limit)
    if not rates or max(rates) <= 1.1 * min(rates):
        return None
    return (f"the inputs play at different frame rates ({min(rates):g} to {max(rates):g} fps in the first "
            f"{len(rates)} read) and --fps is not given: each clip keeps its video's own rate, so one motion "
            "spans different numbers of frames, and `ldm sample` plays every clip at one rate; give --fps F "
            "to resample every video to F fps")


@torch.no_grad()
def verify(out: Path, ae: Autoencoder, cfg: ExtractConfig, items: list, device: torch.device,
           text_encoder=None, dtype: torch.dtype = torch.float32) -> float:
    """Decode K random stored latents and compare with the re-decoded source clips (mean PSNR, dB).
    A text-guided autoencoder decodes with the caption's embedding."""
    samples = shards.read_all(out)
    rng = random.Random(cfg.seed)
    chosen = rng.sample(samples, min(cfg.verify, len(samples)))
    values = []
    for s in chosen:
        item = items[s["meta"]["index"]]
        clip = read_clips(item.load_bytes(), cfg.frames, cfg.height, cfg.width, cfg.fps,
                          [s["meta"].get("start_frame", 0)])[0]
        if isinstance(clip, VideoError):
            raise clip
        video = clip[None].to(device)
        cond = None
        if ae.text_dim:
            emb, mask = text_encoder.encode([s["cond"]["caption"]])
            cond = ae_cond(ae, emb, mask, device, dtype)
        recon = ae.decode(s["latent"].to(device, dtype), cond).float().clamp(-1, 1)
        values.append(float(psnr(recon.cpu(), video.cpu())[0]))
    mean = sum(values) / len(values)
    print(f"verify: decoded {len(values)} latents, PSNR vs source {mean:.2f} dB")
    return mean

