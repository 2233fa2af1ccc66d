"""``ldm list``: registered autoencoders (parameters, compression at a reference size) and DiTs."""
from __future__ import annotations

import argparse
import json
from typing import Callable, TypeVar

import autoencoders
import dit
from ldm.errors import UserError, check_min
from ldm.latent import parts_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--frames", type=int, default=17, help="reference clip length for the compression numbers")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)


NEAREST_FRAMES = 8  # how far from --frames a row looks for a clip length its autoencoder takes
T = TypeVar("T")


def nearest(frames: int, attempt: Callable[[int], T]) -> tuple[int, T, str | None]:
    """``(frames, attempt(frames), None)`` or, when that raises ``ValueError`` (a clip length the
    autoencoder does not take: cmvae wants multiples of 4, causal models 1 + 4k), ``(n, attempt(n),
    why)`` at the nearest count n within ``NEAREST_FRAMES`` that it takes (the shorter one on a tie),
    ``why`` being the error at ``frames``. Raises that error when none is near."""
    try:
        return frames, attempt(frames), None
    except ValueError as at_frames:
        for step in range(1, NEAREST_FRAMES + 1):
            for n in (frames - step, frames + step):
                if n < 1:
                    continue
                try:
                    return n, attempt(n), str(at_frames)
                except ValueError:
                    continue
        raise at_frames


def describe_near(name: str, frames: int, height: int, width: int) -> dict:
    """``autoencoders.describe`` at the reference size or at the `nearest` frame count the
    autoencoder takes, with ``frames_note`` saying why; the error stays when none is near."""

    def taken(n: int) -> dict:
        d = autoencoders.describe(name, n, height, width)
        if "error" in d:
            raise ValueError(d["error"])
        return d

    try:
        n, d, why = nearest(frames, taken)
    except ValueError:
        return autoencoders.describe(name, frames, height, width)  # with its error
    return d if why is None else {**d, "frames_note": f"{n}f: {why}"}


def params_text(n: int) -> str:
    """``131.4M``, ``0.86M`` (the debug twins), ``12K``."""
    if n >= 10 ** 7:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e6:.2f}M" if n >= 10 ** 5 else f"{n / 1e3:.0f}K"


def run(args: argparse.Namespace) -> int:
    check_min({"--frames": args.frames, "--height": args.height, "--width": args.width}, 1)
    aes = [describe_near(n, args.frames, args.height, args.width) for n in sorted(autoencoders.REGISTRY)]
    if all("error" in d for d in aes):
        raise UserError(f"--frames {args.frames} --height {args.height} --width {args.width}: no registered "
                        f"autoencoder takes this size (e.g. {aes[0]['name']}: {aes[0]['error']})")
    dits = [dit.describe(n) for n in sorted(dit.REGISTRY)]
    if args.json:
        print(json.dumps({"autoencoders": aes, "dits": dits}, indent=2))
        return 0
    size = f"{args.frames}x{args.height}x{args.width}"
    print(f"autoencoders (latent at {size}; @Nf: at N frames, the nearest count it takes; "
          f"diffusers:<Class> path=DIR loads pretrained ones)")
    shapes = {d["name"]: parts_text(d.get("latent_shape"))
              + (f" @{d['reference_input'][1]}f" if "frames_note" in d else "") for d in aes}
    wide = max(28, *map(len, shapes.values()))
    nw = max(len(d["name"]) for d in aes)  # the name and family columns fit the longest
    fw = max(10, *(len(d["family"]) for d in aes))
    print(f"  {'name':{nw}s} {'family':{fw}s} {'params':>7s} {'latent':{wide}s} {'factor':>8s} {'vcpr':>6s} "
          f"{'tokens@1x2x2':>12s}")
    for d in aes:
        head = f"  {d['name']:{nw}s} {d['family']:{fw}s} {params_text(d['params']):>7s}"
        if "error" in d:
            print(f"{head} {d['error']}")
            continue
        vcpr = f"{d['vcpr']:.0f}" if d["vcpr"] else "-"
        print(f"{head} {shapes[d['name']]:{wide}s} {d['compression_factor']:8.1f} {vcpr:>6s} {d['tokens']:12d}")
    for note in dict.fromkeys(d["frames_note"] for d in aes if "frames_note" in d):  # once per distinct reason
        print(f"  @{note}")
    motion = [f"{d['name']} {d['motion_compression_factor']:.1f}" for d in aes if d.get("motion_compression_factor")]
    if motion:  # Hi-VAE: the factor above counts the content latent (what the generator models); the paper's does not
        print("  factor of the motion tokens alone (Hi-VAE's paper rate, without the content latent): "
              + ", ".join(motion))
    print("dits (params for a 4-channel latent; the input and output layers follow the latent's channels)")
    print(f"  {'name':16s} {'params':>7s} {'depth':>5s} {'width':>6s} {'heads':>5s}")
    for d in dits:
        print(f"  {d['name']:16s} {params_text(d['params']):>7s} {d['depth']:5d} {d['hidden']:6d} {d['heads']:5d}")
    return 0
