"""``ldm sample``: videos from text prompts or class labels with a trained DiT + its autoencoder.

    ldm sample --checkpoint runs/dit --prompt "a red circle moving left" --output samples/
    ldm sample --checkpoint runs/dit --class 3 --frames 17 --height 64 --width 64 --guidance 4
    ldm sample --checkpoint runs/ucf-dit --class ApplyEyeMakeup --num-per-prompt 4 --output samples/
    ldm sample --checkpoint runs/hivae-gen --class 3 --image first.png --output i2v/
    ldm sample --checkpoint runs/dit --prompts-file prompts.jsonl --output samples/ --resume  # after a Ctrl-C

The DiT export (``dit.load_export``) carries the typed ``Export`` context: the autoencoder it was
trained for (an ``AERecord``: name, config, weights path and hash; ``autoencoders.resolve_record``
rebuilds it), the latent statistics to undo, and the text encoder spec. Decoding goes through the
autoencoder's ``decode`` with the prompt's text embedding in ``cond``. Sampling settings are one
``ldm.samplers.SamplingConfig`` (``--steps --sampler --guidance --shift --seed``).

``--class`` takes an id or a class name the export records (``Export.class_names``, from extraction).
Outputs: ``NNNN.mp4`` + ``NNNN.gif`` per video, ``grid.png`` (the run's first `GRID_VIDEOS` videos, also
when interrupted; each row labelled with its class name and / or prompt) and ``index.json`` (per video:
file, prompt, class id and name, the seed of its initial noise, steps, guidance, shift, sampler,
fps, frames, size, image, checkpoint). Each video's noise comes from its own seed
(``samplers.noise_per_seed``): video ``g`` of the folder is drawn with ``--seed + g``, whatever the
batch size, the number of ranks or the videos beside it, so ``--seed S`` with its one prompt /
class makes that video again. Nothing is ever overwritten: a non-empty ``--output`` is refused
unless ``--append`` is given, which numbers the new videos after the ones there, continues the
seeds (``g`` counting every video of the folder), extends ``index.json`` and writes its grid as
``grid-NNNN.png`` when ``grid.png`` exists. ``--resume`` finishes an interrupted run: the same
command makes only the videos its ``index.json`` lacks, or lists but whose files were deleted (made
again from their recorded seeds: the same videos; `resume_todo`). Videos play at ``--fps``,
by default the rate of the training clips
(``training.json``: the extraction's ``--fps`` or the videos' native rate).

Under torchrun / srun each rank samples every ``world_size``-th batch and writes its videos; rank 0
gathers the index entries after each round of batches and writes ``index.json`` and the grid. The
noise of a video depends only on its number, so the folder is the same on any number of ranks and at
any ``--batch-size``.

Every argument is checked before a model is loaded or a file written (`UserError`, one line):
empty prompts, class ids outside the DiT's classes, sizes the autoencoder cannot take, a folder
that is not a DiT export.

Image-to-video (``--image``) for autoencoders that declare ``content_encoding`` (Hi-VAE: the first
frame's base latent is the ``content`` part) and a generator that models it: the image's content
latent (``encode_content``, standardised like the training latents) is held fixed on its flow path
while the generator samples the motion (``ldm.samplers.known_part_velocity``), so the decoded
video starts from the given frame.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from autoencoders import Autoencoder, resolve_record
from autoencoders.tiling import configure_inference
from data.sources import class_index
from data.video import resize_center_crop, video_to_uint8, write_video
from dit import DiTConfig, Export, VideoDiT, load_export, load_text_encoder
from dit.export import TRAINING_JSON
from launch.cli import switch_value
from ldm import config as cfglib
from ldm import samplers
from ldm.artifacts import ClipSpec
from ldm.checkpoint import atomic_write_json, load_tensors, read_json
from ldm.errors import MissingInput, UserError, checking
from ldm.latent import Cond, Latent, normalize
from ldm.layers import COMPILE_MODES
from ldm.samplers import SamplingConfig

DEFAULT_FPS = 8.0  # videos of an export that does not record its clips' rate
GRID_VIDEOS = 64  # videos shown in grid.png (the first of the run): memory stays bounded for thousands of samples


def playback_fps(video: ClipSpec, requested: float | None = None) -> float:
    """The rate generated videos are written at: ``requested`` (``--fps``), else the rate the DiT's
    training clips play at (``clip_fps``, recorded at extraction), else `DEFAULT_FPS`."""
    return requested or video.clip_fps or video.fps or DEFAULT_FPS


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The ``SamplingConfig`` flags (its defaults), shared by every verb that samples."""
    d = SamplingConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="sampler steps")
    p.add_argument("--sampler", choices=sorted(samplers.SAMPLERS), default=d.sampler)
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-interval", metavar="LO:HI", default=None,
                   help="guide only at the steps with LO < t <= HI (t = 1 noise, 0 data; Kynkaanniemi et al. 2024), "
                        "e.g. 0.1:0.8; default: every step")
    p.add_argument("--shift", type=float, default=None,
                   help="timestep shift of the sampling schedule (default: the DiT's training flow.shift)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="noise seed of the first video (video g: seed + g, whatever the batch size or ranks); "
                        "one video of an index.json is made again by its prompt / class and --seed its seed")


def sampling_from_args(args: argparse.Namespace, export: Export) -> SamplingConfig:
    """The sampling flags; ``--shift`` left out samples with the shift ``export``'s DiT was trained with
    (SD3 uses one shift for both)."""
    shift = export.flow_shift if args.shift is None else args.shift
    interval = SamplingConfig().guidance_interval
    if args.guidance_interval is not None:
        try:
            lo, hi = (float(v) for v in args.guidance_interval.split(":"))
        except ValueError:
            raise UserError(f"--guidance-interval {args.guidance_interval}: give LO:HI, e.g. 0.1:0.8") from None
        interval = (lo, hi)
    with checking("--guidance-interval" if args.guidance_interval else None):
        return SamplingConfig(steps=args.steps, guidance=args.guidance, shift=shift, sampler=args.sampler,
                              seed=args.seed, guidance_interval=interval)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a `ldm train` run folder, its export/ folder, or one of its checkpoints "
                        "(RUN/checkpoints/step-N)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    src.add_argument("--prompts-file", help="a text file with one prompt per line, or a JSON Lines file (.jsonl) "
                     "with one object per line: prompt, class (id or name), seed, negative_prompt (each optional; "
                     "a prompt or a class on every line, and each of the two on every line or on none)")
    p.add_argument("--class", dest="class_id", action="append", metavar="ID|NAME",
                   help="a class id, or its name when the latents were extracted with named classes (--classes, a "
                        "label column of names), e.g. ApplyEyeMakeup (repeatable); with prompts, for a DiT "
                        "conditioned on both: one class for every prompt, or one per prompt")
    src.add_argument("--unconditional", type=int, metavar="N",
                     help="N videos without a condition: the null class and no text (a DiT trained without "
                          "captions or class ids, or a conditional one's unconditional samples); no guidance")
    p.add_argument("--negative-prompt", metavar="TEXT",
                   help="with --prompt / --prompts-file and --guidance > 1: guide away from TEXT instead of from the "
                        "null condition (CFG's unconditional branch reads TEXT)")
    p.add_argument("--image", help="image-to-video: the first frame (any image Pillow reads; resized and center-"
                   "cropped to --height x --width), held fixed while the motion is sampled (Hi-VAE generators)")
    p.add_argument("--text-encoder", metavar="SPEC", help="the text encoder the DiT was trained with, moved to "
                   "another folder, e.g. t5:/new/place/flan-t5-xl (default: the spec recorded at extraction); "
                   "checked against the recorded width and fingerprint")
    p.add_argument("--ae-checkpoint", "--ae-path", help="autoencoder weights, or a diffusers VAE folder (default: "
                   "the path recorded at extraction; --ae-path: as `ldm extract` names it)")
    p.add_argument("--frames", "--num-frames", dest="num_frames", type=int,
                   help="video frames to sample (default: the training clips' length); as --frames on every verb")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--latent-frames", type=int, help="variable-rate autoencoders (MTC-VAE): latent length "
                        "to generate (default: the longest, every segment at the base rate)")
    budget.add_argument("--rate", type=float, help="variable-rate autoencoders: average temporal rate budget, "
                        "sets the latent length for --frames")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    add_sampling_arguments(p)
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--fps", type=float, default=None,
                   help=f"frame rate of the written videos (default: the training clips' rate, else {DEFAULT_FPS:g})")
    p.add_argument("--output", required=True, help="output folder (MP4 + GIF per video, grid.png, index.json); "
                   "must be new or empty unless --append")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--append", action="store_true",
                       help="add to the videos already in --output: numbered after them, index.json extended")
    where.add_argument("--resume", action="store_true",
                       help="finish an interrupted run: the same command makes only the videos its index.json lacks "
                            "(each from its own seed, so the folder ends as an uninterrupted run's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision the DiT and the autoencoder run in: auto = bf16 on CUDA, fp32 on the CPU "
                        "(the sampler's state stays fp32)")
    p.add_argument("--tile", help="decode large frames in blended spatial tiles: TILE or TILE:OVERLAP pixels")
    p.add_argument("--chunk-frames", type=int, default=0,
                   help="decode long videos this many frames at a time, as one shot (IV-VAE, H3AE, causal3d, kl2d, opensora)")
    p.add_argument("--compile", default="auto", type=switch_value, metavar="true|false|auto",
                   help="regional torch.compile of the DiT's blocks and of a diffusion decoder's (Hi-VAE) "
                        "(auto: on for CUDA)")
    p.add_argument("--compile-mode", default="default", choices=list(COMPILE_MODES),
                   help="torch.compile mode for --compile (max-autotune-no-cudagraphs: autotuned Triton matmuls "
                        "with fused epilogues, minutes of compiling first)")


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file (any format Pillow reads; converted to RGB) as a ``(3, height, width)`` frame
    in [-1, 1], resized to cover ``height x width`` with its aspect kept, then center-cropped (the
    rule ``data.video`` applies to clips)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # (h, w, 3) in [0, 255]
    frame = rearrange(torch.from_numpy(rgb), "h w c -> 1 c h w")  # (1, 3, h, w)
    frame = resize_center_crop(frame, height, width)[0]  # (3, H, W)
    return frame.clamp(0, 255) / 127.5 - 1.0


def check_request(model, ae: Autoencoder, spec, latent_frames: int | None = None, image: bool = False) -> None:
    """A ``ValueError`` when a latent length or a first frame is asked of a DiT and autoencoder
    that cannot take it (``spec``: the autoencoder's latent spec at the sampled size)."""
    if latent_frames is not None and spec.form != "varlen":
        raise ValueError(f"a latent length (--latent-frames, latent_frames) applies to variable-length latents "
                         f"only (MTC-VAE); this autoencoder's are {spec.form!r}")
    if image and (not ae.content_encoding or "content" not in spec.parts):
        raise ValueError(f"--image needs an autoencoder with a content (first-frame) latent, such as Hi-VAE; "
                         f"{ae.family} has latent parts {sorted(spec.parts)}")
    if image and "content" not in model.config.parts:
        raise ValueError(f"--image: this generator does not model a content part (its parts: "
                         f"{sorted(model.config.parts)})")


def content_condition(model, ae: Autoencoder, latent_norm: dict[str, dict[str, list[float]]], image: torch.Tensor,
                      batch: int, frames: int, height: int, width: int) -> torch.Tensor:
    """The generator-space content latent of a first frame ``(3, H, W)`` for ``batch`` samples,
    ``(batch, c, 1, h, w)``: ``ae.encode_content`` standardised with the training statistics
    ``latent_norm`` (``Export.latent_norm``).
    A clear error when the autoencoder or the generator has no content part."""
    spec = ae.latent_spec(frames, height, width)
    check_request(model, ae, spec, image=True)
    if image.shape != (3, height, width):
        raise ValueError(f"--image: the frame must be (3, {height}, {width}), got {tuple(image.shape)}")
    device = next(model.parameters()).device
    content = ae.encode_content(image[None].to(device, _dtype_of(ae))).float()  # (1, c, 1, h, w)
    content = normalize(Latent({"content": content}, spec.form), latent_norm)["content"]
    return content.expand(batch, -1, -1, -1, -1).contiguous()  # (B, c, 1, h, w)


@torch.no_grad()
def sample_latents(model, ae: Autoencoder, latent_norm: dict[str, dict[str, list[float]]], *,
                   prompts: list[str] | None = None, class_ids: list[int] | None = None, frames: int, height: int,
                   width: int,
                   sampling: SamplingConfig = SamplingConfig(), seed_offset: int = 0, text_encoder=None,
                   device: torch.device | str = "cpu", progress: bool = True, latent_frames: int | None = None,
                   image: torch.Tensor | None = None, count: int | None = None, negative_prompt: str | None = None,
                   seeds: Sequence[int] | None = None) -> tuple[Latent, Cond]:
    """Sample one latent per prompt / class id (in the autoencoder's scale: the per-part training
    statistics ``latent_norm``, an export's ``Export.latent_norm``, undone) and the condition its
    decoder takes. Each sample's initial noise is drawn with its own seed (`samplers.noise_per_seed`),
    ``seeds[i]``, by default ``sampling.seed + seed_offset + i`` (``seed_offset``: the number of the
    first sample in the run), so a sample is the same whatever batch it is made in. With neither
    prompts nor class ids, ``count`` unconditional latents: the null condition (null class, only the
    empty-text token; what condition dropout trains, and all an unconditional DiT knows), without
    guidance.
    ``latent_frames``: the length of a variable-length latent (default: the spec's, the longest).
    ``image``: a first frame ``(3, H, W)`` in [-1, 1] whose content latent every sample keeps
    (image-to-video, see the module docstring). ``negative_prompt``: the text guidance steers away
    from, in place of the null text (``v_neg + w (v_cond - v_neg)``)."""
    unconditional = prompts is None and class_ids is None
    if unconditional and not count:
        raise ValueError("give prompts, class ids, or a count of unconditional samples")
    n = count if unconditional else len(prompts) if prompts is not None else len(class_ids)
    seeds = [sampling.seed + seed_offset + i for i in range(n)] if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} samples: give one seed per sample")
    spec = ae.latent_spec(frames, height, width)
    dcfg = model.config
    cond, ae_text = Cond(), None
    if prompts is not None and dcfg.text_dim:
        emb, mask = text_encoder.encode(prompts)
        ae_text = emb.to(device), mask.to(device)  # a text-guided decoder reads "" as extraction encoded it
        # an empty prompt (a reference clip without a caption) is the null text, as the DiT trained such clips
        mask = mask & torch.tensor([bool(p) for p in prompts], device=mask.device)[:, None]
        cond.text, cond.text_mask = (emb * mask[..., None]).to(device), mask.to(device)
    if class_ids is not None and dcfg.num_classes:
        cond.class_id = torch.tensor(class_ids, device=device)
    if cond.text is None and cond.class_id is None and not unconditional:
        raise ValueError("this DiT takes neither the given prompts nor class ids "
                         f"(text_dim={dcfg.text_dim}, num_classes={dcfg.num_classes})")
    check_request(model, ae, spec, latent_frames)
    if ae.text_dim and cond.text is None and text_encoder is None:  # before any step, not after them all
        raise ValueError(f"{ae.family} is text-guided: its decoder needs the text encoder the latents were "
                         "extracted with (text_encoder=, see sampling_text_encoder)")
    shapes, aux = dict(spec.parts), {}
    if spec.form == "varlen":
        t = latent_frames or shapes["z"][1]
        shapes["z"] = (shapes["z"][0], t, *shapes["z"][2:])
        aux = {"length": torch.full((n,), t, device=device)}
    x = Latent(samplers.noise_per_seed(shapes, seeds, device=device), spec.form, aux=aux)
    velocity = model
    if image is not None:
        given = content_condition(model, ae, latent_norm, image, n, frames, height, width)
        velocity = samplers.known_part_velocity(model, "content", given, x["content"])
    null_cond = model.null_cond(cond)
    if negative_prompt is not None:
        if cond.text is None:
            raise ValueError("a negative prompt needs prompts and a text-conditioned DiT")
        emb, mask = text_encoder.encode([negative_prompt] * n)
        null_cond = dataclasses.replace(null_cond, text=emb.to(device), text_mask=mask.to(device))
    bar = tqdm(total=sampling.steps, desc="sample", unit="step", disable=not progress)
    latent = samplers.sample(velocity, x, cond, method=sampling.sampler, steps=sampling.steps, shift=sampling.shift,
                             guidance_scale=1.0 if unconditional else sampling.guidance,
                             guidance_interval=sampling.guidance_interval,
                             null_cond=null_cond,
                             callback=lambda *a: bar.update(1))
    bar.close()
    latent = normalize(latent, latent_norm, inverse=True)
    ae_cond = Cond(text=ae_text[0], text_mask=ae_text[1]) if ae_text else Cond()
    if ae.text_dim and cond.text is None:  # a text-guided decoder always reads a caption: the prompts, else
        # the empty one (what extraction gives a clip without a caption)
        emb, mask = text_encoder.encode(list(prompts) if prompts is not None else [""] * n)
        ae_cond = Cond(text=emb.to(device), text_mask=mask.to(device))
    return latent.to(device), ae_cond


def dit_conditioning(model, export: Export, use_class: bool | None) -> tuple[bool, bool]:
    """(text, class): what `ldm eval gen` conditions its samples on (the attribute benchmark,
    `launch.eval_attributes`; FVD / FID, `launch.eval_fd`). Text when the DiT and its training run
    have it; class ids when asked (default: only when there is no text)."""
    text = bool(model.config.text_dim and export.text_encoder)
    has_class = bool(model.config.num_classes)
    cls = has_class and (use_class if use_class is not None else not text)
    if use_class and not has_class:
        raise ValueError("--use-class: this DiT has no class conditioning")
    if not text and not cls:
        raise ValueError("this DiT takes neither text (with a text encoder) nor class ids")
    return text, cls


def sampling_text_encoder(model, ae: Autoencoder, export, prompts: bool, device: torch.device | str = "cpu",
                          spec: str | None = None):
    """The text encoder that sampling needs (the one the latents were extracted with,
    ``export.text_encoder``, or ``spec``: the same model in another folder, ``--text-encoder``), or None:
    for the DiT's ``prompts``, and always for a text-guided autoencoder, whose decoder reads a caption
    (the empty one when sampling class ids or unconditionally)."""
    if spec and not export.text_encoder:
        raise ValueError(f"--text-encoder {spec}: no text encoder is recorded with this DiT's latents (it was "
                         "trained without text); leave it out")
    if not ((prompts and model.config.text_dim) or ae.text_dim):
        return None
    if not export.text_encoder:
        raise ValueError(f"no text encoder is recorded with this DiT's latents; {ae.family} decodes with text"
                         if ae.text_dim else "this DiT was trained without text")
    return load_text_encoder(export, device=device, spec=spec)


@torch.no_grad()
def generate(model, ae: Autoencoder, latent_norm: dict[str, dict[str, list[float]]], **kw: Any
             ) -> torch.Tensor | list[torch.Tensor]:
    """Sample one video per prompt / class id (``sample_latents``' arguments): ``(B, C, T, H, W)``
    in [-1, 1]; for variable-length latents a list of ``(C, T_i, H, W)``, each decoded on its own
    (MTC-VAE splits it at predicted keyframes, so its frame count follows the segments)."""
    latent, ae_cond = sample_latents(model, ae, latent_norm, **kw)
    dtype = _dtype_of(ae)  # the autoencoder decodes in its own precision (--dtype)
    latent = latent.to(dtype=dtype)
    if ae_cond.text is not None:
        ae_cond = Cond(text=ae_cond.text.to(dtype), text_mask=ae_cond.text_mask)
    if latent.form != "varlen":
        return ae.decode(latent, ae_cond).float().clamp(-1, 1).cpu()
    return [ae.decode(one, Cond(text=None if ae_cond.text is None else ae_cond.text[i:i + 1],
                                text_mask=None if ae_cond.text_mask is None else ae_cond.text_mask[i:i + 1]))
            .float().clamp(-1, 1)[0].cpu() for i, one in enumerate(latent.unbatch())]


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def write_videos(videos: torch.Tensor | list[torch.Tensor], out: Path, names: list[str], fps: float) -> list[Path]:
    """MP4 + GIF per video ``(C, T, H, W)``; the MP4 paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for v, name in zip(videos, names):
        write_video(out / f"{name}.mp4", v, fps)
        write_video(out / f"{name}.gif", v, fps)
        paths.append(out / f"{name}.mp4")
    return paths


def class_name(names: Sequence[str], class_id: int | None) -> str | None:
    """The name of ``class_id`` in an export's ``class_names``, None when it has none."""
    return names[class_id] if class_id is not None and class_id < len(names) else None


GRID_LABEL = 28  # characters of a row's label in grid.png


def row_label(entry: dict[str, Any]) -> str | None:
    """What a grid row is labelled with: the class name (else ``class N``) and / or the prompt."""
    cls = entry.get("class_name") or (None if entry.get("class_id") is None else f"class {entry['class_id']}")
    text = " | ".join(x for x in (cls, entry.get("prompt")) if x)
    return (text[:GRID_LABEL - 3] + "..." if len(text) > GRID_LABEL else text) or None


def write_grid(videos: torch.Tensor | list[torch.Tensor], path: Path, labels: Sequence[str | None] | None = None
               ) -> None:
    """A PNG with every video's frames in a row (videos of different lengths hold their last frame);
    ``labels``: a text per row, written in a column left of the frames (the class name, the prompt)."""
    from PIL import Image, ImageDraw, ImageFont

    longest = max(v.shape[1] for v in videos)
    frames = torch.stack([video_to_uint8(torch.cat([v, v[:, -1:].expand(-1, longest - v.shape[1], -1, -1)], 1))
                          for v in videos])  # (B, T, H, W, C)
    B, T, H, W, C = frames.shape
    step = max(1, T // 8)
    rows = frames[:, ::step].permute(0, 2, 1, 3, 4).reshape(B * H, -1, C)  # rows: videos, columns: frames
    image = Image.fromarray(rows.numpy())
    if labels is not None:
        font = ImageFont.load_default()
        width = max(int(font.getlength(x or "")) for x in labels) + 8
        framed = Image.new("RGB", (width + image.width, image.height), (255, 255, 255))
        framed.paste(image, (width, 0))
        draw = ImageDraw.Draw(framed)
        for b, text in enumerate(labels):
            draw.text((4, b * H + 2), text or "", fill=(0, 0, 0), font=font)
        image = framed
    image.save(path)


def save_videos(videos: torch.Tensor | list[torch.Tensor], out: Path, names: list[str], fps: float,
                grid: str = "grid.png") -> list[Path]:
    """`write_videos` and `write_grid` (``out / grid``)."""
    paths = write_videos(videos, out, names, fps)
    write_grid(videos, out / grid)
    return paths


def beyond_training(frames: int, height: int, width: int, video: ClipSpec) -> str | None:
    """A note when the sampled clip is longer than, or of another size than, the DiT's training clips
    (``video``): RoPE runs any length and size, but a DiT seldom keeps its quality outside what it saw."""
    longer = frames > video.frames
    other = (height, width) != (video.height, video.width)
    if not (longer or other):
        return None
    what = " and ".join(x for x in (f"{frames} frames" if longer else "", f"{height}x{width}" if other else "") if x)
    return (f"note: sampling {what}, beyond the {video.frames}-frame {video.height}x{video.width} clips this DiT was "
            "trained on: it runs (RoPE), but motion and detail usually degrade outside the training length and size")


def check_args(args: argparse.Namespace) -> None:
    """The numbers and texts of a ``ldm sample`` command are usable (`UserError` otherwise)."""
    for flag, value in {"--steps": args.steps, "--num-per-prompt": args.num_per_prompt,
                        "--batch-size": args.batch_size, "--frames": args.num_frames, "--height": args.height,
                        "--width": args.width, "--latent-frames": args.latent_frames,
                        "--unconditional": args.unconditional}.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--fps": args.fps, "--rate": args.rate, "--shift": args.shift}.items():
        if value is not None and not value > 0:
            raise UserError(f"{flag} must be > 0, got {value}")
    if args.guidance < 0 or args.chunk_frames < 0:
        raise UserError(f"--guidance and --chunk-frames must be >= 0, got {args.guidance}, {args.chunk_frames}")
    for i, prompt in enumerate(args.prompt or [], 1):
        if not prompt.strip():
            raise UserError(f"--prompt number {i} is empty: give the text of the video to make (or use --class)")
    for c in args.class_id or []:
        if not c.strip():
            raise UserError("--class is empty: give a class id or name")
        if c.strip().startswith("-") and c.strip()[1:].isdigit():
            raise UserError(f"--class {c}: class ids are >= 0 (-1 is not 'no class'; to sample without a class "
                            "use a text prompt)")
    if args.image and not Path(args.image).is_file():
        raise MissingInput(f"--image {args.image} not found")
    if args.unconditional and args.class_id:
        raise UserError("--unconditional samples without a condition; leave out --class")
    if not (args.prompt or args.prompts_file or args.class_id or args.unconditional):
        raise UserError("give what to sample: --prompt TEXT, --prompts-file F, --class N or --unconditional N")
    if args.negative_prompt is not None:
        if not args.negative_prompt.strip():  # "" would be encoded: not the null text condition dropout trained
            raise UserError("--negative-prompt is empty: leave it out to guide away from the null text (what the "
                            "DiT learned without a caption), or give the text to steer away from")
        if not (args.prompt or args.prompts_file):
            raise UserError("--negative-prompt goes with --prompt / --prompts-file (it replaces the null text of "
                            "classifier-free guidance)")
        if args.guidance == 1.0:
            raise UserError("--negative-prompt acts through guidance: give --guidance > 1")


PROMPT_KEYS = ("prompt", "class", "seed", "negative_prompt")  # what a line of a JSONL --prompts-file may give


def read_prompts_file(path: str | Path) -> list[dict[str, Any]]:
    """The videos a ``--prompts-file`` asks for, one dict of `PROMPT_KEYS` per line (absent keys
    None): a text file gives one prompt per non-empty line; a JSON Lines file (named ``.jsonl``, or
    whose first line starts with ``{``) one object per line, e.g. ``{"prompt": "a red circle",
    "class": "ApplyEyeMakeup", "seed": 7, "negative_prompt": "blurry"}`` (null: not given). Every line gives a prompt,
    or none does (then every line gives a class). A `UserError` naming the line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"--prompts-file {path} not found")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"--prompts-file {path} has no prompt (one per line, or one JSON object per line)")
    if path.suffix != ".jsonl" and not lines[0][1].startswith("{"):
        return [{**dict.fromkeys(PROMPT_KEYS), "prompt": line} for _, line in lines]
    entries = []
    for n, line in lines:
        where = f"--prompts-file {path} line {n}"
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where} is not JSON ({e}); give one object per line, e.g. "
                            '{"prompt": "a red circle", "seed": 7}') from None
        if not isinstance(entry, dict):
            raise UserError(f"{where}: give a JSON object, e.g. {{\"prompt\": \"a red circle\"}}")
        entry = {k: v for k, v in entry.items() if v is not None}  # null: not given (as index.json writes it)
        unknown = sorted(set(entry) - set(PROMPT_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; a line may give {', '.join(PROMPT_KEYS)}")
        for key in ("prompt", "negative_prompt"):
            if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
                raise UserError(f"{where}: {key} must be a non-empty text, got {entry[key]!r}")
        if "seed" in entry and (isinstance(entry["seed"], bool) or not isinstance(entry["seed"], int)):
            raise UserError(f"{where}: seed must be an integer, got {entry['seed']!r}")
        if "class" in entry and (isinstance(entry["class"], bool) or not isinstance(entry["class"], (int, str))):
            raise UserError(f"{where}: class must be an id or a class name, got {entry['class']!r}")
        if "prompt" not in entry and "class" not in entry:
            raise UserError(f"{where} gives neither a prompt nor a class")
        entries.append({**dict.fromkeys(PROMPT_KEYS), **entry})
    for key in ("prompt", "class"):
        given = [e[key] is not None for e in entries]
        if any(given) and not all(given):
            raise UserError(f"--prompts-file {path} line {lines[given.index(False)][0]} has no {key}: give every "
                            f"line a {key}, or none")
    if any(e["negative_prompt"] is not None for e in entries) and entries[0]["prompt"] is None:
        raise UserError(f"--prompts-file {path}: a negative_prompt goes with prompts (it replaces the null text of "
                        "classifier-free guidance)")
    return [{**e, "class": None if e["class"] is None else str(e["class"])} for e in entries]


def resume_todo(index: list[dict[str, Any]], wanted: list[dict[str, Any]], out: Path) -> list[int]:
    """Which of a command's videos (``wanted``: their index entries, but ``frames``) ``--resume`` still
    has to make: those not in ``index`` (``out``'s index.json), and those it lists whose MP4 or GIF is
    no longer in ``out`` (deleted: made again from the recorded seed, so the same video). A `UserError`
    when ``index`` holds a video this command does not make, or one made with other settings."""
    made = {e.get("file"): e for e in index}
    extra = sorted(set(made) - {w["file"] for w in wanted}, key=str)
    if extra:
        raise UserError(f"--resume: {out / 'index.json'} holds {extra[0]}, which this command does not make (it makes "
                        f"{len(wanted)} videos); give the command that made the folder, or --append to add to it")
    for w in wanted:
        e = made.get(w["file"])
        key = next((k for k in w if e is not None and e.get(k) != w[k]), None)
        if key is not None:
            raise UserError(f"--resume: {w['file']} in {out / 'index.json'} was made with {key} {e.get(key)!r}, this "
                            f"command gives {w[key]!r}; give the command that made the folder, or --append")
    return [g for g, w in enumerate(wanted) if w["file"] not in made or not _files_present(out, w["file"])]


def _files_present(out: Path, file: str) -> bool:
    """Whether both files `write_videos` makes for the index entry ``file`` (``NNNN.mp4``) are in ``out``."""
    return all((out / Path(file).with_suffix(suffix)).is_file() for suffix in (".mp4", ".gif"))


def batch_starts(negatives: Sequence[str | None], size: int) -> list[int]:
    """Where each batch of videos starts: at most ``size`` consecutive videos that share a negative
    prompt (the null condition of a batch is one). A video's noise is its own seed's, so how the
    videos are batched does not change them."""
    starts: list[int] = []
    for g, negative in enumerate(negatives):
        if not starts or g - starts[-1] == size or negative != negatives[g - 1]:
            starts.append(g)
    return starts


def class_ids_of(values: Sequence[str], names: Sequence[str], num_classes: int) -> list[int]:
    """The class ids of ``--class`` values: an id as it is, a name looked up in ``names`` (the
    export's class names; `data.sources.class_index`: exact, else ignoring case). A `UserError` for
    an id or name the DiT does not know, with the names that come closest."""
    ids = []
    for value in values:
        value = value.strip()
        if value.isdigit():
            ids.append(int(value))
            if ids[-1] >= num_classes:
                raise UserError(f"--class {value}: this DiT knows {num_classes} classes, ids 0 to {num_classes - 1}")
            continue
        found = class_index(names, value)
        if found is None and not names:
            raise UserError(f"--class {value!r}: this DiT's class ids have no names (its latents were extracted "
                            f"without --classes or a label column of names); give an id, 0 to {num_classes - 1}")
        if found is None:
            close = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
            raise UserError(f"--class {value!r} is not one of this DiT's {len(names)} classes" +
                            (f"; did you mean {' / '.join(close)}?" if close else
                             f" ({', '.join(names[:4])}{', ...' * (len(names) > 4)})"))
        ids.append(found)
    return ids


def checkpoint_run(path: str | Path) -> Path | None:
    """The run folder of a ``ldm train`` checkpoint ``RUN/checkpoints/step-N`` (its EMA weights and
    the run's ``config.json``, which holds the DiT config and the export context), else None."""
    path = Path(path)
    run = path.parent.parent
    if (path / "ema.safetensors").is_file() and (path / "trainer.json").is_file() and \
            (run / "config.json").is_file() and "dit" in read_json(run / "config.json"):
        return run
    return None


def export_weights(path: str | Path) -> tuple[Export, Path]:
    """The export context and the file of EMA weights of a run folder, its ``export/`` or one of
    its checkpoints (``RUN/checkpoints/step-N``)."""
    path = Path(path)
    run = checkpoint_run(path)
    if run is not None:
        return Export.from_dict(read_json(run / "config.json")["export"], what=str(run / "config.json")), \
            path / "ema.safetensors"
    folder = path / "export" if (path / "export").is_dir() else path
    return Export.from_dict(read_json(folder / TRAINING_JSON), what=str(folder / TRAINING_JSON)), \
        folder / "model.safetensors"


def load_dit(path: str | Path, device: torch.device | str = "cpu") -> tuple[VideoDiT, Export]:
    """``dit.load_export`` that also takes a checkpoint of the run (``RUN/checkpoints/step-N``):
    any kept step can be sampled and evaluated, not only the newest (``export/``)."""
    run = checkpoint_run(path)
    if run is None:
        return load_export(path, device)
    context, weights = export_weights(path)
    model = VideoDiT(cfglib.from_dict(DiTConfig, read_json(run / "config.json")["dit"]))
    model.load_state_dict(load_tensors(weights))
    return model.to(device).eval(), context


def check_export(path: str | Path, flag: str = "--checkpoint") -> None:
    """``path`` (given as ``flag``) is a ``ldm train`` run folder, its ``export/`` or one of its
    checkpoints (a `UserError` saying what it is otherwise)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{flag} {path} not found (expected a `ldm train` run folder, its export/ or a checkpoint)")
    if (path / "training.json").is_file() or (path / "export" / "training.json").is_file() or checkpoint_run(path):
        return

    def saved_model(folder: Path) -> bool:  # no training.json: an autoencoder's save_pretrained
        return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()

    if saved_model(path):
        raise UserError(f"{flag} {path} is an autoencoder, not a DiT: give the `ldm train` run folder "
                        "(the autoencoder is found through it, or passed with --ae-checkpoint)")
    if any(saved_model(p) for p in [path / "final", *(path / "checkpoints").glob("step-*")]):  # `ldm train-ae`'s
        raise UserError(f"{flag} {path} is a `ldm train-ae` run (an autoencoder), not a DiT: give a `ldm train` run "
                        "folder (extract latents with this autoencoder, then train a DiT on them)")
    if (path / "checkpoints").is_dir():
        raise UserError(f"{flag} {path}: this `ldm train` run has no export/ yet (it is written at the "
                        "first checkpoint); wait for it or use a finished run")
    raise UserError(f"{flag} {path} is not a `ldm train` run folder or export (no training.json)")


def output_start(out: Path, append: bool) -> tuple[int, list[dict[str, Any]]]:
    """Where new videos go in ``out``: the first free number and the index so far. An existing
    non-empty folder is refused unless ``append``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder")
    present = sorted(out.iterdir()) if out.is_dir() else []
    if not present:
        return 0, []
    if not append:
        raise UserError(f"--output {out} already holds {len(present)} file(s); nothing is overwritten: give a new "
                        "folder, or --append to add videos to these")
    index: list[dict[str, Any]] = []
    if (out / "index.json").is_file():
        try:
            index = read_json(out / "index.json")
        except ValueError as e:
            raise UserError(f"{out / 'index.json'} is not valid JSON ({e}); move it away to append") from None
    numbers = [int(p.stem) for p in present if p.stem.isdigit()] + [int(Path(x["file"]).stem) for x in index
                                                                     if Path(x.get("file", "")).stem.isdigit()]
    return max(numbers, default=-1) + 1, index


class Video(NamedTuple):
    """One video a command asks for: its prompt, class id, seed (None: ``--seed`` + its number) and
    negative prompt."""

    prompt: str | None
    class_id: int | None
    seed: int | None
    negative_prompt: str | None


@dataclasses.dataclass
class Job:
    """What every batch of one ``ldm sample`` command is made with: the DiT and its export, the
    autoencoder, the sampling settings, the text encoder, and the video asked for (size, rate,
    latent length, first frame); ``prompted`` / ``classed``: the videos take prompts / class ids."""

    model: VideoDiT
    export: Export
    ae: Autoencoder
    sampling: SamplingConfig
    device: torch.device
    dtype: torch.dtype
    prompted: bool
    classed: bool
    frames: int = 0
    height: int = 0
    width: int = 0
    fps: float = DEFAULT_FPS
    latent_frames: int | None = None
    image: torch.Tensor | None = None
    text_encoder: Any = None

    def make(self, chunk: list[Video], seeds: list[int], progress: bool) -> torch.Tensor | list[torch.Tensor]:
        """The videos of ``chunk`` (one negative prompt), each drawn from its seed of ``seeds``."""
        return generate(self.model, self.ae, self.export.latent_norm,
                        prompts=[c.prompt for c in chunk] if self.prompted else None,
                        class_ids=[c.class_id for c in chunk] if self.classed else None, count=len(chunk),
                        frames=self.frames, height=self.height, width=self.width, sampling=self.sampling,
                        seeds=seeds, text_encoder=self.text_encoder, device=self.device,
                        latent_frames=self.latent_frames, image=self.image, negative_prompt=chunk[0].negative_prompt,
                        progress=progress)


def run(args: argparse.Namespace) -> int:
    from launch import dist

    check_args(args)
    check_export(args.checkpoint)
    out = Path(args.output)
    env = dist.init_distributed()  # under torchrun / srun each rank samples its share of the batches
    first, index = output_start(out, args.append or args.resume)
    first = 0 if args.resume else first  # a resumed command numbers its videos from 0, as it did the first time
    dist.barrier()  # every rank has seen the folder as it was before any of them writes
    main = env.rank == 0
    prompts, class_ids, lines = requested_conditions(args)
    job, class_ids = load_job(args, env, prompts, class_ids)
    set_video(job, args, main)
    items, wanted = plan_videos(args, job, prompts, class_ids, lines, first)
    todo = resume_todo(index, wanted, out) if args.resume else list(range(len(items)))
    missing = [wanted[g]["file"] for g in todo if any(e.get("file") == wanted[g]["file"] for e in index)]
    if missing and main:
        print(f"--resume: making again {', '.join(missing)} (listed in index.json, the video files are gone)")
    index = [e for e in index if e.get("file") not in missing]  # each comes back with its new entry
    if not todo:
        if main:
            print(f"nothing to do: the {len(items)} videos of this command are in {out} (index.json)")
        return 0
    grid = f"grid-{first + todo[0]:04d}.png" if (out / "grid.png").exists() else "grid.png"
    names, lengths = sample_rounds(args, job, items, wanted, todo, index, out, grid, env)
    if not main:
        return 0
    what = f"{len(names)} videos ({names[0]}..{names[-1]})" if len(names) > 1 else f"1 video ({names[0]})"
    print(f"wrote {what} to {out} (index.json, {grid}) at {job.fps:g} fps")
    if lengths != {job.frames}:  # MTC-VAE: the keyframe predictor's segments set each video's length
        print(f"  frames: {', '.join(map(str, sorted(lengths)))} (--frames {job.frames}: {job.ae.family} splits each "
              f"latent at its predicted keyframes, so the length follows the segments; see index.json)")
    return 0


def requested_conditions(args: argparse.Namespace
                         ) -> tuple[list[str] | None, list[str] | None, list[dict[str, Any]]]:
    """The prompts, the ``--class`` values (one per prompt when both are given) and the lines of
    ``--prompts-file`` (``[]`` without one), checked against each other (`UserError`)."""
    prompts, class_ids = args.prompt, args.class_id
    lines = read_prompts_file(args.prompts_file) if args.prompts_file else []
    if lines and lines[0]["class"] is not None:
        if class_ids:
            raise UserError(f"--prompts-file {args.prompts_file} gives each line's class; leave out --class")
        class_ids = [e["class"] for e in lines]
    if lines:
        prompts = [e["prompt"] for e in lines] if lines[0]["prompt"] is not None else None
        if any(e["negative_prompt"] for e in lines) and args.guidance == 1.0:
            raise UserError("a negative_prompt of --prompts-file acts through guidance: give --guidance > 1")
    if args.negative_prompt is not None and not prompts:
        raise UserError(f"--negative-prompt goes with prompts; --prompts-file {args.prompts_file} gives classes only")
    if prompts and class_ids and len(class_ids) not in (1, len(prompts)):
        raise UserError(f"{len(class_ids)} --class for {len(prompts)} prompts: give one class for every prompt, or "
                        "one per prompt")
    if prompts and class_ids:  # a DiT conditioned on both: each prompt with its class
        class_ids = class_ids * len(prompts) if len(class_ids) == 1 else class_ids
    return prompts, class_ids, lines


def load_job(args: argparse.Namespace, env, prompts: list[str] | None, class_ids: list[str] | None
             ) -> tuple[Job, list[int] | None]:
    """The DiT and its autoencoder on the device in ``--dtype`` (compiled with ``--compile``), the
    sampling settings, and the class ids of the ``--class`` values; `UserError` for conditions the
    DiT was not trained with."""
    from launch import dist
    from launch.engine import resolve_switch
    from ldm.layers import compile_blocks

    device = dist.device_for(env, args.device)
    dtype = dist.compute_dtype(args.dtype, device)
    model, export = load_dit(args.checkpoint, device)
    sampling = sampling_from_args(args, export)
    n_classes, text = model.config.num_classes, export.text_encoder
    if class_ids is not None:
        if not n_classes:
            raise UserError("this DiT was trained without class ids (no class_id in its data, or model.class_cond="
                            "false); use --prompt" + ("" if text else " -- it takes no text either"))
        class_ids = class_ids_of(class_ids, export.class_names, n_classes)
    if prompts and (not text or not model.config.text_dim):
        raise UserError("this DiT was trained without text; use --class" +
                        (f" (0 to {n_classes - 1})" if n_classes else ""))
    model = model.to(dtype)
    with checking():
        ae = resolve_record(export.autoencoder, args.ae_checkpoint).model
        configure_inference(ae, args.tile, args.chunk_frames)
    ae = ae.to(device=device, dtype=dtype).eval()
    if resolve_switch(args.compile, device, "--compile"):
        compile_blocks(model, mode=args.compile_mode)
        compile_blocks(ae, mode=args.compile_mode)  # a diffusion decoder's blocks (Hi-VAE); none elsewhere
    return Job(model, export, ae, sampling, device, dtype, bool(prompts), bool(class_ids)), class_ids


def set_video(job: Job, args: argparse.Namespace, main: bool) -> None:
    """The video asked for on ``job``: its size (the training clips' unless given), playback rate,
    latent length (``--rate``), first frame (``--image``) and the text encoder, each checked
    against the autoencoder and the DiT (`UserError`); rank 0 prints the notes about them."""
    ae, export, video = job.ae, job.export, job.export.video
    frames, height, width = args.num_frames or video.frames, args.height or video.height, args.width or video.width
    job.frames, job.height, job.width = frames, height, width
    with checking(f"--frames {frames} --height {height} --width {width}"):
        ae.check_input(frames, height, width)
    note = None if export.mixed_shapes else beyond_training(frames, height, width, video)
    if note and main:
        print(note)
    job.fps = playback_fps(video, args.fps)
    job.latent_frames = args.latent_frames
    if args.rate is not None:
        if not ae.variable_rate:
            raise UserError(f"--rate needs a variable-rate autoencoder (MTC-VAE), not {export.autoencoder.name}")
        with checking("--rate"):
            job.latent_frames = ae.varlen_length(frames, args.rate)
    if args.image:
        try:
            job.image = load_image(args.image, height, width)
        except OSError as e:  # PIL.UnidentifiedImageError and unreadable files
            raise UserError(f"--image {args.image}: not an image Pillow can read ({e})") from None
    with checking(f"--frames {frames} --height {height} --width {width}"):
        spec = ae.latent_spec(frames, height, width)
    with checking():
        check_request(job.model, ae, spec, args.latent_frames, image=bool(args.image))
    with checking():
        job.text_encoder = sampling_text_encoder(job.model, ae, export, job.prompted, job.device, args.text_encoder)
    if ae.text_dim and not job.prompted and main:
        print(f"{export.autoencoder.name} is text-guided: it decodes these samples with the empty caption")


def plan_videos(args: argparse.Namespace, job: Job, prompts: list[str] | None, class_ids: list[int] | None,
                lines: list[dict[str, Any]], first: int) -> tuple[list[Video], list[dict[str, Any]]]:
    """The command's videos in order (``--num-per-prompt`` copies of every prompt / class / line)
    and each one's index entry but its frames: video ``g`` is file ``first + g``, drawn with seed
    ``--seed + first + g`` unless its line gives one."""
    from launch import dist

    sampling = job.sampling
    n = len(prompts or class_ids or []) or args.unconditional
    lines = lines or [dict.fromkeys(PROMPT_KEYS)] * n
    items = [Video(prompts[k] if prompts else None, class_ids[k] if class_ids else None,
                   None if line["seed"] is None else line["seed"] + copy,
                   line["negative_prompt"] or args.negative_prompt)
             for k, line in enumerate(lines) for copy in range(args.num_per_prompt)]
    seeds = [sampling.seed + first + g if it.seed is None else it.seed for g, it in enumerate(items)]
    settings = {"steps": sampling.steps, "guidance": 1.0 if args.unconditional else sampling.guidance,
                "guidance_interval": list(sampling.guidance_interval),
                "shift": sampling.shift,
                "sampler": sampling.sampler, "fps": job.fps, "height": job.height, "width": job.width,
                "image": args.image, "dtype": dist.dtype_name(job.dtype), "tile": args.tile,
                "chunk_frames": args.chunk_frames or None, "checkpoint": str(Path(args.checkpoint).resolve())}
    wanted = [{"file": f"{first + g:04d}.mp4", "prompt": it.prompt, "class_id": it.class_id,
               "class_name": class_name(job.export.class_names, it.class_id), "seed": seeds[g],
               "negative_prompt": it.negative_prompt,
               **settings} for g, it in enumerate(items)]  # each video's index entry, but its frames
    return items, wanted


def sample_rounds(args: argparse.Namespace, job: Job, items: list[Video], wanted: list[dict[str, Any]],
                  todo: list[int], index: list[dict[str, Any]], out: Path, grid: str, env
                  ) -> tuple[list[str], set[int]]:
    """The videos ``todo`` (numbers into ``items``) in batches of at most ``--batch-size`` that share a
    negative prompt, one batch per rank a round. Each rank writes its videos; rank 0 gathers their
    index entries (in batch order) into ``index.json`` after every round, and the grid of the first
    `GRID_VIDEOS` at the end or on an interrupt. Returns, on rank 0, the names and frame counts made."""
    from launch import dist

    main = env.rank == 0
    starts = batch_starts([items[g].negative_prompt for g in todo], args.batch_size)  # batch b: todo[starts[b]:ends[b]]
    ends = starts[1:] + [len(todo)]
    videos, names, lengths, labels = [], [], set(), []
    try:
        for r in range(0, len(starts), env.world_size):  # a round: one batch per rank
            made: tuple[list[dict[str, Any]], list[torch.Tensor]] = ([], [])
            if r + env.rank < len(starts):
                i = starts[r + env.rank]
                ids = todo[i:ends[r + env.rank]]
                batch = job.make([items[g] for g in ids], [wanted[g]["seed"] for g in ids], progress=main)
                write_videos(batch, out, [Path(wanted[g]["file"]).stem for g in ids], job.fps)
                made = ([{**wanted[g], "frames": v.shape[1]} for g, v in zip(ids, batch)],
                        list(batch)[:max(0, GRID_VIDEOS - i)])  # only what the grid shows goes to rank 0
            for entries, batch in dist.gather_object(made) or []:  # on rank 0, in batch order
                index += entries
                if args.resume:  # a resumed run fills the gaps an interrupted one left
                    index.sort(key=lambda e: str(e.get("file")))
                videos += batch
                labels += [row_label(e) for e in entries[:len(batch)]]
                names += [Path(e["file"]).stem for e in entries]
                lengths.update(e["frames"] for e in entries)
            if main:
                atomic_write_json(out / "index.json", index)  # each round is kept as soon as it is made
    finally:  # an interrupted run keeps the grid of the videos it made
        if main and videos:
            write_grid(videos, out / grid, labels if any(labels) else None)
    return names, lengths
