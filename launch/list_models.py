"""``ldm list``: registered autoencoders (with compression at a reference size) and DiTs."""
from __future__ import annotations

import argparse
import json

import autoencoders
import dit
from ldm.errors import UserError, check_min


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--frames", type=int, default=17, help="reference clip length for the compression numbers")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    check_min({"--frames": args.frames, "--height": args.height, "--width": args.width}, 1)
    aes = [autoencoders.describe(n, args.frames, args.height, args.width) for n in sorted(autoencoders.REGISTRY)]
    if all("error" in d for d in aes):
        raise UserError(f"--frames {args.frames} --height {args.height} --width {args.width}: no registered "
                        f"autoencoder takes this size (e.g. {aes[0]['name']}: {aes[0]['error']})")
    dits = [dit.describe(n) for n in sorted(dit.REGISTRY)]
    if args.json:
        print(json.dumps({"autoencoders": aes, "dits": dits}, indent=2))
        return 0
    size = f"{args.frames}x{args.height}x{args.width}"
    print(f"autoencoders (latent at {size}; diffusers:<Class> path=DIR loads pretrained ones)")
    print(f"  {'name':28s} {'family':10s} {'latent':28s} {'factor':>8s} {'vcpr':>6s} {'tokens@1x2x2':>12s}")
    for d in aes:
        if "error" in d:
            print(f"  {d['name']:28s} {d['family']:10s} {d['error']}")
            continue
        shape = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in d["latent_shape"].items())
        vcpr = f"{d['vcpr']:.0f}" if d["vcpr"] else "-"
        print(f"  {d['name']:28s} {d['family']:10s} {shape:28s} {d['compression_factor']:8.1f} {vcpr:>6s} {d['tokens']:12d}")
    print("dits")
    print(f"  {'name':16s} {'depth':>5s} {'width':>6s} {'heads':>5s}")
    for d in dits:
        print(f"  {d['name']:16s} {d['depth']:5d} {d['hidden']:6d} {d['heads']:5d}")
    return 0
