"""``ldm reconstruct``: encode + decode one video with an autoencoder, write the result, print
PSNR / SSIM against the input.

    ldm reconstruct --autoencoder kl2d-f8c4 --checkpoint runs/ae/final --input clip.mp4 --output rec.mp4

``--autoencoder`` / ``--checkpoint`` go through ``autoencoders.resolve``: a folder written by
``save_pretrained`` (a training run's ``final/`` or one of its ``checkpoints/step-N/``), a
registered name with random weights (a warning says so; useful to check the pipeline and cost),
or a source such as ``diffusers:<Class>`` with ``--checkpoint`` its local folder.
``--side-by-side`` writes input | reconstruction. An existing ``--output`` is replaced only with
``--overwrite``, and never when it is the input.
A text-guided autoencoder (``text_dim > 0``, e.g. ``cmvae-z4-text``) encodes and decodes with the
caption: ``--prompt "..." --text-encoder builtin|t5:DIR|clip:DIR`` (the encoder it was trained with).
``--first-frame`` decodes with the clip's own first frame as the image condition, for a model that
takes one (H3AE's image-to-video reconstruction, its Tab. 4; the plain decode is the default).
A multi-rate autoencoder (MTC-VAE) also reports its segments' rates, the clip's VCPR and its
keyframe predictor's accuracy (``rate_report``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from autoencoders import LOADERS, REGISTRY, Autoencoder, resolve
from autoencoders.tiling import configure_inference
from data.video import (GIF_SUFFIXES, MP4_SUFFIXES, VideoError, output_frames, probe, read_video, upright_size,
                        write_video)
from launch import dist
from ldm.errors import UserError, checking
from ldm.latent import Cond
from ldm.metrics import psnr, ssim

@torch.no_grad()
def reconstruct(ae: Autoencoder, video: torch.Tensor, device: torch.device, cond: Cond | None = None,
                dtype: torch.dtype = torch.float32, first_frame: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """``video`` ``(C, T, H, W)`` in [-1, 1] -> reconstruction (same shape, clamped, fp32) and
    metrics. ``cond`` (batch 1) goes to both encode and decode, e.g. the caption of a text-guided
    model; ``first_frame`` also gives the decoder the clip's first frame (``first_frame_decoding``
    models: image-to-video reconstruction). The autoencoder runs in ``dtype`` (its weights are cast)."""
    ae.eval().to(device=device, dtype=dtype)
    x = video[None].to(device)  # (1, C, T, H, W)
    if cond is not None and cond.text is not None:
        cond = Cond(text=cond.text.to(dtype), text_mask=cond.text_mask)
    t0 = time.perf_counter()
    latent = ae.encode(x.to(dtype), cond)
    if first_frame:
        cond = dataclasses.replace(cond or Cond(), first_frame=x[:, :, :1].to(dtype))
    recon = ae.decode(latent, cond).float().clamp(-1, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if recon.shape != x.shape:
        raise RuntimeError(f"decoder returned {tuple(recon.shape)} for input {tuple(x.shape)}")
    metrics = {"psnr": float(psnr(recon.float(), x.float())[0]), "ssim": float(ssim(recon.float(), x.float())[0]),
               "seconds": seconds, "latent_shape": {k: list(v) for k, v in latent.shapes().items()}}
    if ae.variable_rate:  # MTC-VAE: the rates its selector chose, the VCPR they give, the keyframe predictor's Acc.
        metrics.update(ae.rate_report(latent)[0])
    return recon[0].cpu(), metrics


def caption_cond(ae: Autoencoder, name: str, prompt: str | None, text_encoder: str | None,
                 device: torch.device) -> Cond | None:
    """The ``cond`` a text-guided autoencoder encodes and decodes with (None for other models)."""
    if not ae.text_dim:
        if prompt is not None or text_encoder is not None:
            raise ValueError(f"{name} is not text-guided: --prompt / --text-encoder do not apply")
        return None
    if prompt is None or text_encoder is None:
        raise ValueError(f"{name} is text-guided (text_dim={ae.text_dim}): pass --prompt (the clip's caption) "
                         "and --text-encoder (the one it was trained with)")
    from ldm.text import build_text_encoder

    with checking("--text-encoder"):
        encoder = build_text_encoder(text_encoder, max_length=ae.text_length()).to(device)
    ae.check_text_encoder(encoder, text_encoder, name)
    emb, mask = encoder.encode([prompt])
    return Cond(text=emb.to(device), text_mask=mask.to(device))


DEFAULT_FRAMES = 17


def default_frames(ae: Autoencoder, available: int, height: int, width: int) -> int:
    """The longest clip of at most ``DEFAULT_FRAMES`` frames that a video of ``available`` frames
    holds and the autoencoder takes (a causal 4x model: 1 + 4k; cmvae: multiples of 4); ValueError
    when none, with the model's own rule for what is wrong: the size when a clip of these frames
    fits at a size it takes (was: the frame rule, for a size it does not take), else the frames."""
    def longest(h: int, w: int) -> int | None:
        for n in range(min(DEFAULT_FRAMES, available), 0, -1):
            try:
                ae.check_input(n, h, w)
                return n
            except ValueError:
                continue
        return None

    n = longest(height, width)
    if n is not None:
        return n
    fits = longest(*default_size(ae, height, width))
    ae.check_input(fits or min(DEFAULT_FRAMES, available), height, width)  # raises with the model's own rule
    raise ValueError(f"no clip of 1 to {available} frames fits the autoencoder")


DEFAULT_SIZE = 256
SIZE_MULTIPLES = (1, 2, 4, 8, 16, 32, 64, 128)  # the spatial factors and patch sizes of the families


def default_size(ae: Autoencoder, height: int, width: int) -> tuple[int, int]:
    """The clip size when ``--height`` / ``--width`` are not given, for a video shown at ``height x
    width``: its own size rounded down to the nearest multiple the autoencoder takes when it fits in
    ``DEFAULT_SIZE`` x ``DEFAULT_SIZE`` (a small video is not upscaled), else that square (center
    crop, as before: a 4K video in one shot would not fit most devices; give --height/--width and
    --tile for full size)."""
    if height > DEFAULT_SIZE or width > DEFAULT_SIZE:
        return DEFAULT_SIZE, DEFAULT_SIZE
    for m in SIZE_MULTIPLES:
        h, w = height // m * m, width // m * m
        for n in range(1, DEFAULT_FRAMES + 1):
            try:
                ae.check_input(n, h, w)
                return h, w
            except ValueError:
                continue
    return DEFAULT_SIZE, DEFAULT_SIZE  # smaller than any size it takes: upscaled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--autoencoder", help=f"registered name ({', '.join(sorted(REGISTRY))}; optional with --checkpoint) or "
                             f"{' / '.join(p + ':<what>' for p in sorted(LOADERS))} with --checkpoint DIR")
    a("--checkpoint", "--ae-path", dest="checkpoint",
      help="folder written by save_pretrained (a train-ae run's final/ or checkpoints/step-N/), or a source's local "
           "folder (--ae-path: the same, as `ldm extract` / `eval recon` name it)")
    a("--subfolder", "--ae-subfolder", dest="subfolder",
      help="subfolder of --checkpoint holding the model (e.g. vae in a diffusers pipeline)")
    a("--input", required=True, help="input video (any container/codec PyAV reads)")
    a("--output", required=True, help="output video, .mp4 or .gif")
    a("--overwrite", action="store_true", help="replace an existing --output file (never the --input)")
    a("--frames", type=int, default=None,
      help=f"frames to reconstruct (default: the longest clip of at most {DEFAULT_FRAMES} frames that the video "
           "holds and the autoencoder takes)")
    a("--height", type=int, help=f"(default: the video's own when it fits in {DEFAULT_SIZE}x{DEFAULT_SIZE}, "
                                 f"rounded down to a size the autoencoder takes; else {DEFAULT_SIZE})")
    a("--width", type=int, help="(default: as --height)")
    a("--fps", type=float, default=None, help="resample to this rate (default: native); also the output rate")
    a("--side-by-side", action="store_true", help="write input | reconstruction side by side")
    a("--prompt", help="the clip's caption, for a text-guided autoencoder (text_dim > 0)")
    a("--text-encoder", help="text encoder of a text-guided autoencoder: builtin | t5:DIR | clip:DIR")
    a("--first-frame", action="store_true",
      help="decode with the clip's first frame as the image condition (image-to-video reconstruction, H3AE)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--tile", help="encode/decode large frames in blended spatial tiles: TILE or TILE:OVERLAP pixels")
    a("--chunk-frames", type=int, default=0, help="stream long clips this many frames at a time (IV-VAE, H3AE, causal3d, kl2d, opensora)")
    a("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
      help="precision the autoencoder runs in: auto = bf16 on CUDA, fp32 on the CPU")
    a("--json", action="store_true", help="print the metrics as one JSON object")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    with checking():  # every argument before any decoding (a UserError: one line, exit status 2)
        if out.suffix.lower() not in MP4_SUFFIXES + GIF_SUFFIXES:
            raise ValueError(f"--output {out}: suffix must be one of {MP4_SUFFIXES + GIF_SUFFIXES}")
        if out.exists() and Path(args.input).exists() and out.samefile(args.input):
            raise ValueError(f"--output {out} is the --input video; give another file name")
        if out.exists() and not args.overwrite:
            raise ValueError(f"--output {out} exists; give --overwrite to replace it, or another file name")
        ae, name, _ = resolve(args.autoencoder, args.checkpoint, subfolder=args.subfolder)
        if args.first_frame and not ae.first_frame_decoding:
            raise ValueError(f"--first-frame: {name} does not decode with a first frame (H3AE does); leave it out")
        if args.frames is not None and args.height is not None and args.width is not None:
            ae.check_input(args.frames, args.height, args.width)
        configure_inference(ae, args.tile, args.chunk_frames)
        device = dist.device_for(dist.dist_env(), args.device)
        dtype = dist.compute_dtype(args.dtype, device)
        cond = caption_cond(ae, name, args.prompt, args.text_encoder, device)
    try:
        info = probe(args.input)
        if args.height is None or args.width is None:
            shown = default_size(ae, *upright_size(args.input))
            args.height, args.width = args.height or shown[0], args.width or shown[1]
            if args.frames is not None:
                with checking(f"--frames {args.frames} --height {args.height} --width {args.width}"):
                    ae.check_input(args.frames, args.height, args.width)
        frames = args.frames
        if frames is None:
            available = output_frames(info["frames"], info["fps"], args.fps, info["duration"])
            with checking(f"--input {args.input} ({available} frames) at --height {args.height} --width {args.width}"):
                frames = default_frames(ae, available, args.height, args.width)
        video = read_video(args.input, frames, args.height, args.width, fps=args.fps)  # (C, T, H, W)
        fps = args.fps or info["fps"] or 8.0
    except VideoError as e:
        raise UserError(f"--input {args.input}: {e}") from None
    recon, metrics = reconstruct(ae, video, device, cond, dtype, first_frame=args.first_frame)
    shown = torch.cat([video, recon], dim=-1) if args.side_by_side else recon  # (C, T, H, W or 2W)
    write_video(out, shown, fps)
    result: dict[str, Any] = {"autoencoder": name, "checkpoint": args.checkpoint, "input": args.input,
                              "output": str(out), "frames": frames, "height": args.height,
                              "width": args.width, "fps": fps, "dtype": dist.dtype_name(dtype), "tile": args.tile,
                              "first_frame": args.first_frame,
                              "chunk_frames": args.chunk_frames or None, **metrics}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name}: PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}  "
              f"({frames}x{args.height}x{args.width}{', first-frame conditioned' if args.first_frame else ''}, "
              f"encode+decode {metrics['seconds']:.2f} s) -> {out}")
        if "rates" in metrics:
            acc = metrics.get("keyframe_accuracy")
            print(f"  segment rates {metrics['rates']}  VCPR {metrics['vcpr']:.1f}"
                  + (f"  keyframe accuracy {100 * acc:.1f} %" if acc is not None else ""))
    return 0
