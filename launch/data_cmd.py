"""``ldm data``: dataset tools.

- ``ldm data synth --output DIR --num N [--frames T] [--size S] [--fps F] [--seed K]
  [--layout folder|shards] [--holdout "red circle left" ...] [--diagonals] ...``: write the synthetic
  attribute video set (see `data.synth`).
- ``ldm data list --input PATH [--captions FILE] [--classes folder|FILE] [--split FILE] [--frames T
  [--fps F] [--clips-per-video K | --clip-stride S]] [--check]``: what `data.sources.list_items` finds in
  an input (count, captions, class ids and names with the videos per class, problems), to check a folder
  or shards before extraction (an ``ldm extract`` output folder: its manifest, with the clips per
  class); with ``--frames``, how many clips each video gives with those `ldm extract` settings (from
  the container headers); with
  ``--check``, every video is decoded to its end and the broken ones (truncated, not a video, no
  video stream, ...) are listed with their reason (exit status 1 when there are any).
"""
from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from data.manifest import MANIFEST
from data.sources import list_items
from data.synth import COLORS, DIRECTIONS, NUM_CLASSES, SHAPES, synth_dataset
from data.video import VideoError, Windows, check_video, plan_windows
from ldm.errors import UserError
from ldm.latent import parts_text

SHOWN_CAPTION = 100  # characters of a caption `ldm data list` prints (a scraped one can be pages long)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="generate the synthetic attribute video set",
                           description="Generate clips of a colored shape moving over a dark background, "
                                       "with known shape/color/direction/speed/background, captions and "
                                       f"class ids (index in shapes x colors x directions, {NUM_CLASSES} ids).")
    synth.add_argument("--output", required=True, help="output directory")
    synth.add_argument("--num", type=int, required=True, help="number of clips")
    synth.add_argument("--frames", type=int, default=17,
                       help="frames per clip (default 17, the default clip of `ldm extract` and `ldm train-ae`)")
    synth.add_argument("--size", type=int, default=64, help="square frame size in pixels (default 64)")
    synth.add_argument("--height", type=int, default=None, help="frame height (overrides --size)")
    synth.add_argument("--width", type=int, default=None, help="frame width (overrides --size)")
    synth.add_argument("--fps", type=float, default=8.0, help="frame rate written to the files (default 8)")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    synth.add_argument("--layout", choices=("folder", "shards"), default="folder",
                       help="folder: videos/*.mp4 + metadata.jsonl; shards: raw WebDataset video shards")
    synth.add_argument("--shard-size", type=int, default=1000, help="clips per shard (shards layout)")
    synth.add_argument("--holdout", nargs="+", action="extend", default=[], metavar="COMBO",
                       help='combinations never emitted, e.g. "red circle left" (repeatable)')
    synth.add_argument("--include-holdout", action="store_true",
                       help="emit the held-out combinations anyway (marked holdout=true), e.g. for an eval set")
    synth.add_argument("--diagonals", action="store_true", help="add the four diagonal directions")
    synth.add_argument("--shapes", nargs="+", choices=SHAPES, default=None, help="subset of shapes (default all)")
    synth.add_argument("--colors", nargs="+", choices=COLORS, default=None, help="subset of colors (default all)")
    synth.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=None,
                       help="subset of directions (default the four cardinal ones, eight with --diagonals)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    lister = sub.add_parser("list", help="show what an input folder / shard set holds",
                            description="List the videos of a folder (with captions) or of raw WebDataset "
                                        "shards, and every problem found (rows without files, ...).")
    lister.add_argument("--input", required=True, help="folder, video file, .tar, or brace pattern of .tar shards")
    lister.add_argument("--captions", default=None, help="CSV or JSONL captions file (folders only)")
    lister.add_argument("--classes", metavar="folder|FILE", default=None,
                        help="class of each video from its top-level folder: 'folder' (ids in sorted name order) or "
                             "a class list fixing the ids (UCF-101 classInd.txt, numbered from 1: id = number - 1)")
    lister.add_argument("--split", metavar="FILE", default=None,
                        help="keep only the videos this list names (UCF-101 trainlist01.txt / testlist01.txt)")
    lister.add_argument("--show", type=int, default=5, help="items to print (default 5)")
    lister.add_argument("--frames", type=int, default=None,
                        help="count the clips of T frames each video gives (as `ldm extract` would)")
    lister.add_argument("--fps", type=float, default=None, help="with --frames: frame rate (default: native)")
    lister.add_argument("--clips-per-video", type=int, default=None, metavar="K", help="with --frames, as in ldm extract")
    lister.add_argument("--clip-stride", type=int, default=None, metavar="S", help="with --frames, as in ldm extract")
    lister.add_argument("--check", action="store_true",
                        help="decode every video to its end and list the broken ones (exit status 1 if any)")


def run(args: argparse.Namespace) -> int:
    commands = {"synth": _synth, "list": _list}
    return commands[args.data_command](args)


def _synth(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    summary = synth_dataset(args.output, args.num, frames=args.frames, size=args.size, fps=args.fps,
                            seed=args.seed, layout=args.layout, holdout=args.holdout,
                            include_holdout=args.include_holdout, shard_size=args.shard_size,
                            shapes=args.shapes, colors=args.colors, directions=args.directions,
                            diagonals=args.diagonals, height=args.height, width=args.width,
                            progress=not args.quiet)
    took = time.perf_counter() - start
    spec = summary["spec"]
    where = (f"{len(summary['shards'])} shard(s)" if spec["layout"] == "shards"
             else "videos/*.mp4 + metadata.jsonl")
    print(f"wrote {summary['count']} clips to {summary['output']} ({where}) in {took:.1f}s "
          f"({summary['count'] / max(took, 1e-9):.0f} clips/s)")
    print(f"  clips: {spec['frames']} frames of {spec['height']}x{spec['width']} at {spec['fps']:g} fps, "
          f"seed {spec['seed']}")
    print(f"  shapes: {', '.join(spec['shapes'])}")
    print(f"  colors: {', '.join(spec['colors'])}")
    print(f"  directions: {', '.join(spec['directions'])}")
    print(f"  classes present: {summary['classes']} "
          f"(class ids index shapes x colors x directions, {NUM_CLASSES} in all)")
    if spec["holdout"]:
        held = "; ".join(" ".join(h) for h in spec["holdout"])
        state = f"emitted {summary['holdout_emitted']} clips" if spec["include_holdout"] else "never emitted"
        print(f"  held out ({state}): {held}")
    return 0


def _clip_counts(items: list, args: argparse.Namespace) -> list[int | str]:
    """Per video, the clips ``ldm extract`` would take with these settings, or why none."""
    windows = Windows.from_flags(args.clips_per_video, args.clip_stride)
    counts: list[int | str] = []
    for it in items:
        try:
            counts.append(len(plan_windows(it.readable(), args.frames, args.fps, windows)))
        except VideoError as e:
            counts.append(str(e))
    return counts


def _broken(items: list) -> list[tuple[str, str]]:
    """``(key, reason)`` of every item that does not decode to its end (`data.video.check_video`)."""
    broken = []
    for it in items:
        try:
            check_video(it.readable())
        except VideoError as e:
            broken.append((it.key, str(e)))
    return broken


CLASSES_SHOWN = 20  # classes `ldm data list` prints one a line (more with a larger --show)


def print_classes(counts: Counter, names: Sequence[str], what: str, show: int = CLASSES_SHOWN) -> None:
    """Per class id: its name (when known) and how many ``what`` it has; the classes a name list
    numbers that have none are counted too (a split missing a class shows here)."""
    if not counts:
        return
    ids = sorted(set(counts) | set(range(len(names))))
    empty = [i for i in ids if not counts[i]]
    print(f"  per class ({len(ids) - len(empty)} of {len(ids)} classes have {what}; fewest "
          f"{min(counts.values())}, most {max(counts.values())}):")
    for i in [i for i in ids if counts[i]][:show]:
        print(f"    {i}" + (f" {names[i]}" if i < len(names) else "") + f": {counts[i]}")
    if len(ids) - len(empty) > show:
        print(f"    ... {len(ids) - len(empty) - show} more classes")
    if empty:
        shown = ", ".join(f"{i} {names[i]}" if i < len(names) else str(i) for i in empty[:10])
        print(f"    without {what}: {shown}" + (f" ... ({len(empty)} in all)" if len(empty) > 10 else ""))


def _list_latents(args: argparse.Namespace, folder: Path) -> int:
    """An ``ldm extract`` output folder: what its manifest records and, with ``--check``, whether
    every sample of every shard reads (`data.shards.decode_sample`, the trainer's own checks)."""
    from data import shards
    from data.manifest import load_manifest

    video_flags = (args.frames, args.fps, args.clips_per_video, args.clip_stride, args.captions, args.classes,
                   args.split)
    if video_flags != (None,) * len(video_flags):
        raise UserError(f"{folder} holds latent shards (`ldm extract` output): --frames / --fps / --clips-per-video / "
                        "--clip-stride / --captions / --classes / --split are about video inputs; give the videos "
                        "the latents came from")
    try:
        m = load_manifest(folder)
    except ValueError as e:
        raise UserError(f"{folder / MANIFEST} cannot be read ({e})") from None
    ae, v = m.autoencoder, m.video
    weights = (f"weights {ae.checkpoint} (sha256 {ae.checkpoint_hash[:12]})" if ae.checkpoint_hash
               else f"RANDOM weights (seed {ae.seed})")
    per_video = {None: "", 0: ", every window"}.get(v.clips_per_video, f", {v.clips_per_video} per video")
    if v.clip_stride:
        per_video = f", one every {v.clip_stride} frames"
    print(f"latent shards in {folder} (`ldm extract`): {m.counts.written} clips from {m.counts.inputs} videos in "
          f"{len(m.shards)} shard{'s' * (len(m.shards) != 1)}, {m.counts.skipped} videos skipped")
    print(f"  autoencoder: {ae.name} ({ae.family}), {weights}; encoded in {m.dtype}"
          + (f", tiles {m.tile}" if m.tile else ""))
    rate = f"{v.clip_fps:g} fps" if v.clip_fps else "their native rate"
    print(f"  clips: {v.frames}x{v.height}x{v.width}, played at {rate}{per_video}")
    _print_source_rates(folder, v.fps, m.counts.written)
    shapes = m.latent_shapes if m.mixed_shapes else [m.latent_spec["latent_shape"]]
    print(f"  latent ({m.form}): {'; '.join(parts_text(s) for s in shapes)}")
    text = (f"{m.text_encoder} embeddings (dim {m.text_dim}, ~{m.text_tokens} tokens)" if m.text_encoder
            else "no text embeddings")
    print(f"  conditioning: {text}; {m.num_classes or 'no'} class ids")
    print_classes(Counter(dict(enumerate(m.class_counts))), m.class_names, "clips", max(CLASSES_SHOWN, args.show))
    if m.num_classes and not m.class_counts:
        print("  (clips per class: not recorded by the extraction that wrote these shards)")
    for part, st in m.stats.items():
        std = " ".join(f"{x:.3g}" for x in st["std"][:16])
        more = f" ... ({len(st['std'])} channels)" if len(st["std"]) > 16 else ""
        print(f"  {part}: per-channel std {std}{more} over {st['count']} positions")
    for sk in m.skipped[: args.show]:
        print(f"  - skipped {sk['key']}: {sk['reason']}")
    if len(m.skipped) > args.show:
        print(f"  ... {len(m.skipped) - args.show} more skipped (all in {MANIFEST})")
    if not args.check:
        return 0
    expect = None if m.mixed_shapes else m.parts
    bad: list[str] = []
    for entry in m.shards:
        url, counters, n = str(folder / entry["name"]), Counter(), 0
        if not Path(url).is_file():
            bad.append(f"{entry['name']}: missing")
            continue
        for raw in shards.iter_shard(url, counters):
            try:
                shards.decode_sample(raw, expect)
                n += 1
            except shards.SampleError as e:
                bad.append(f"{entry['name']}: {e}")
        if counters["bad_shard"]:
            bad.append(f"{entry['name']}: truncated or unreadable after {n} good samples")
        elif n != entry["count"] and not any(b.startswith(entry["name"]) for b in bad):
            bad.append(f"{entry['name']}: {n} samples, the manifest says {entry['count']}")
    print(f"checked {len(m.shards)} shards (every sample read): " + (f"{len(bad)} problem(s):" if bad else "all good"))
    for b in bad:
        print(f"  - {b}")
    return 1 if bad else 0


def _print_source_rates(folder: Path, fps: float | None, written: int) -> None:
    """The source frame rates of the clips (`launch.extract.source_rates`) when they differ, and the
    inputs with a variable frame rate."""
    from launch.extract import source_rates

    rates, variable = source_rates(folder)
    if len(rates) > 1:
        read = f"resampled to {fps:g} fps" if fps else "read at their own rate, consecutive frames"
        shown = ", ".join(f"{r} fps: {n} clip{'s' * (n != 1)}" for r, n in rates.items())
        counted = sum(rates.values())
        older = f" ({written - counted} clips of shards written before the rates were counted)" \
            if counted < written else ""
        print(f"  source frame rates ({read}): {shown}{older}")
    if variable:
        more = f" and {len(variable) - 3} more" if len(variable) > 3 else ""
        print(f"  variable frame rate: {len(variable)} input(s) ({', '.join(variable[:3])}{more})"
              + ("" if fps else ": their clips' motion speed varies (no --fps)"))


def _list(args: argparse.Namespace) -> int:
    folder = Path(args.input)
    if folder.is_dir() and (folder / MANIFEST).is_file():
        return _list_latents(args, folder)
    if folder.is_dir() and any(folder.glob("shard-*.json")):
        raise UserError(f"{folder} holds an unfinished `ldm extract` output (shard sidecars, no {MANIFEST} yet): "
                        "run the same extraction again to finish it")
    counts = None
    if args.frames is None and (args.fps, args.clips_per_video, args.clip_stride) != (None, None, None):
        raise UserError("--fps / --clips-per-video / --clip-stride count clips: give --frames too")
    if args.frames is not None and args.frames < 1 or args.fps is not None and not args.fps > 0:
        raise UserError(f"--frames must be >= 1 and --fps > 0; got {args.frames}, {args.fps}")
    if args.show < 0:
        raise UserError(f"--show must be >= 0, got {args.show}")
    if args.frames is not None:
        Windows.from_flags(args.clips_per_video, args.clip_stride)  # contradictory flags: clear error first
    sources_log = logging.getLogger("data.sources")  # its warnings are the problems listed below: once
    level = sources_log.level
    sources_log.setLevel(logging.ERROR)
    try:
        items = list_items(args.input, args.captions, args.classes, args.split)
    finally:
        sources_log.setLevel(level)
    if args.frames is not None:
        counts = _clip_counts(items, args)
    captioned = sum(it.caption is not None for it in items)
    labelled = sum(it.class_id is not None for it in items)
    split = f" listed in {args.split} ({items.left_out} others left out)" if args.split else ""
    print(f"{len(items)} videos in {args.input}{split}: {captioned} with captions, {labelled} with class ids, "
          f"{len({it.class_id for it in items if it.class_id is not None})} distinct classes")
    print_classes(Counter(it.class_id for it in items if it.class_id is not None), items.class_names, "videos",
                  max(CLASSES_SHOWN, args.show))
    folders = sorted({it.meta["path"].split("/", 1)[0] for it in items if "/" in it.meta.get("path", "")})
    if not labelled and len(folders) > 1 and all("/" in it.meta.get("path", "") for it in items):
        print(f"  the videos lie in {len(folders)} folders ({', '.join(folders[:3])}{', ...' * (len(folders) > 3)}): "
              "if each is a class, --classes folder (or a class list such as classInd.txt) reads it")
    for i, it in enumerate(items[: args.show]):
        clips = ""
        if counts is not None:
            clips = f", {counts[i]} clips" if isinstance(counts[i], int) else ", no clip"
        caption = repr(it.caption) if it.caption is not None else "no caption"
        if it.caption is not None and len(it.caption) > SHOWN_CAPTION:
            caption = f"{it.caption[:SHOWN_CAPTION]!r}... ({len(it.caption)} characters)"
        label = "" if it.class_id is None else f" class={it.class_id}"
        label += f" ({it.class_name})" if it.class_id is not None and it.class_name else ""
        print(f"  {it.key}: {caption}{label} ({it.source}){clips}")
    if len(items) > args.show:
        print(f"  ... {len(items) - args.show} more")
    if counts is not None:
        none = [(it.key, c) for it, c in zip(items, counts) if isinstance(c, str)]
        rate = f" at {args.fps:g} fps" if args.fps is not None else ""
        print(f"{sum(c for c in counts if isinstance(c, int))} clips of {args.frames} frames{rate} from "
              f"{len(items) - len(none)} videos; {len(none)} without a clip" + (":" if none else ""))
        for key, reason in none:
            print(f"  - {key}: {reason}")
    if items.problems:
        print(f"{len(items.problems)} problem(s):")
        for p in items.problems:
            print(f"  - {p}")
    if args.check:
        broken = _broken(items)
        print(f"checked {len(items)} videos (decoded to the end): {len(items) - len(broken)} good, "
              f"{len(broken)} broken" + (":" if broken else ""))
        for key, reason in broken:
            print(f"  - {key}: {reason}")
        return 1 if broken else 0
    return 0
