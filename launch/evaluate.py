"""``ldm eval``: reconstruction quality of an autoencoder and generation quality of a trained DiT.

    ldm eval recon --autoencoder NAME --checkpoint DIR --input VIDEOS --frames 17 --height 256 --width 256 \\
                   [--lpips-backbone vgg16.pth --lpips-heads vgg.pth] [--i3d i3d_torchscript.pt] \\
                   [--inception inception-2015-12-05.pt] [--first-frame] [--frame-group 4 --group-start 1] \\
                   [--num 2048 --seed 0] [--classes folder|FILE --split FILE] \\
                   --output recon.json [--grid recon.png] [--overwrite]
    ldm eval gen --checkpoint RUN --output DIR [--overwrite] [--attributes --per-prompt 4] \\
                 [--reference VIDEOS --num 2048 --i3d i3d_torchscript.pt --inception inception-2015-12-05.pt \\
                  --reference-stats DIR] \\
                 [--vbench --vbench-info VBench_full_info.json --vbench-python /envs/vbench/bin/python]

Reconstruction (``recon``): the per-clip metrics of `RECON_METRICS` (PSNR, SSIM: Gaussian 11 / 1.5, data
range 2, LPIPS: torchvision backbone + the lpips package's linear heads, both user files, and the temporal error:
frame-to-frame change unlike the clip's; IV-VAE's information preservation degree; a variable-rate autoencoder's
VCPR and keyframe accuracy, MTC-VAE's ``rate_report``), rFVD and rFID (originals vs their reconstructions; rFID:
every frame, eval gen's Inception),
optionally decoded with each clip's first frame (``--first-frame``, H3AE's I2V reconstruction), optionally SSIM
per frame position inside a frame group (IV-VAE Fig. 1b: a causal 4x-temporal VAE reconstructs the frames of each group
of 4 unequally), a grid PNG and JSON.

Generation (``gen``):

- FVD / FID: Fréchet distances (float64, unbiased covariances, streaming statistics; the features
  and the protocols below live in ``ldm.metrics``)
  between features of reference clips and of as many generated clips (sampled with the reference
  clips' captions or class ids; a random ``--num`` of the reference clips, seeded; a class-only DiT draws
  the classes like the reference set or, ``--class-dist uniform``, in equal shares, recorded in the
  result; ``--classes`` / ``--split`` read a class-per-folder reference such as UCF-101's test split, its
  classes matched to the DiT's by name). FVD follows the reference protocol: the first 16 frames, each
  resized bilinearly to 224x224 (no crop) after quantising to [0, 255], mapped to [-1, 1], I3D
  Kinetics-400 logits; the default extractor is the TorchScript ``i3d_torchscript.pt`` (StyleGAN-V's
  port of the TF-Hub I3D, called with ``rescale=False, resize=False, return_features=True``);
  ``--i3d-kind torchscript`` takes any TorchScript module mapping the same input to features (e.g.
  a scripted VideoMAE-v2 for content-debiased FVD). FID uses every frame through the TorchScript
  Inception of StyleGAN2-ADA (``inception-2015-12-05.pt``: uint8 frames, ``return_features=True``,
  2048-d pool features). The extractor's file name and sha256, N and T are recorded with every value,
  with a ``small_sample`` warning below the protocol's N (biased upward) and, for FVD, the FVD
  between two halves of the reference clips (``reference_split_half``: about a perfect model's
  score at that N). ``--reference-stats DIR`` keeps the reference statistics for the next
  evaluation of the same clips under the same protocol (another checkpoint: FVD over training). Beside them
  the per-clip statistics of `GEN_CLIP_METRICS` on each side (``frame_change``: how much clips change from
  frame to frame, in grey levels).
- The offline attribute benchmark: a fixed prompt suite over the synthetic attributes
  (``data.synth``: shape x color x direction, captions "a red circle moving left"), N samples per
  prompt, read back by the weight-free reader (``data.attributes``): accuracy per attribute and
  overall, with chance.
- A VBench bridge: the standard prompt list (``VBench_full_info.json``) sampled in VBench's file
  naming (``{prompt}-{index}.mp4``), ``vbench`` run as a subprocess in its own environment
  (``--vbench-python``; it pins old dependencies and needs CUDA), the model-free temporal
  flickering computed in-house, and the Quality / Semantic / Total aggregation in-house with
  VBench's normalisation table.

Results are never replaced silently: an existing ``recon`` result file (or grid PNG), or a ``gen``
folder holding an earlier evaluation's results (`GEN_RESULTS`), is refused before any work unless
``--overwrite`` is given; ``gen --overwrite`` then removes the earlier results once the models are
loaded, except VBench videos made by the same DiT, autoencoder and sampling settings (recorded in
``vbench_videos.json``), which are reused: generating VBench's prompt list takes hours.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autoencoders import Autoencoder, resolve, resolve_record
from autoencoders.tiling import configure_inference
from data.sources import ItemList, VideoClipDataset, VideoItem, class_index, list_items
from data.video import VideoError, output_frames, probe, read_video, upright_size, write_video
from dit import Export, load_text_encoder
from launch import dist
from launch.dist import compute_dtype
from launch.reconstruct import DEFAULT_FRAMES, SIZE_MULTIPLES, default_frames, default_size
from launch.sample import (add_sampling_arguments, check_export, checkpoint_run, export_weights, generate, load_dit,
                          playback_fps, sampling_from_args, sampling_text_encoder)
from launch.train_ae import save_grid
from ldm.checkpoint import atomic_write_json, file_sha256, load_tensors, read_json, save_tensors
from ldm.errors import MissingInput, UserError, check_min, checking
from ldm.latent import Cond
from ldm.metrics import (FVD_FRAMES, I3D_KINDS, LPIPS, VBENCH_NORMALIZE, Extractor, FrechetAccumulator,
                         fid_accumulator, fvd_accumulator, frame_change, load_i3d, load_inception,
                         information_preservation, reconstruction_scores, temporal_flickering, vbench_aggregate)
from ldm.samplers import SamplingConfig

# ------------------------------------------------------------------------------------------
# reconstruction
# ------------------------------------------------------------------------------------------
def position_ssim(per_frame: Tensor, group: int, start: int = 0) -> dict[str, Any]:
    """Mean SSIM by frame position inside groups of ``group`` frames starting at ``start``
    (``per_frame``: ``(N, T)``): ``positions[k]`` averages frames ``start + k, start + k + group, ...``;
    frames before ``start`` (a causal VAE's lone first frame) are ``lead``."""
    if group < 1 or start < 0:
        raise ValueError(f"frame group must be >= 1 and start >= 0, got {group}, {start}")
    curve = per_frame.double().mean(0)  # (T,)
    T = curve.numel()
    if start >= T:
        raise ValueError(f"group start {start} is past the clip's {T} frames")
    pos = [curve[start + k::group] for k in range(group)]
    return {"group": group, "start": start, "lead": curve[:start].tolist(),
            "positions": [float(p.mean()) if p.numel() else None for p in pos], "per_frame": curve.tolist()}


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


def check_lpips_files(backbone: str | None, heads: str | None) -> None:
    """LPIPS takes both files or neither (`UserError` otherwise)."""
    if bool(backbone) != bool(heads):
        raise UserError("LPIPS needs both --lpips-backbone and --lpips-heads")


def _without_gif_twins(listed: ItemList) -> ItemList:
    """``listed`` without a GIF beside a video of the same name (``ldm sample`` writes ``NNNN.mp4``
    + ``NNNN.gif``): the same clip, read once, from the video."""
    videos = {it.path.with_suffix("") for it in listed if it.path is not None and it.path.suffix.lower() != ".gif"}
    return ItemList([it for it in listed if it.path is None or it.path.suffix.lower() != ".gif"
                     or it.path.with_suffix("") not in videos], listed.problems, listed.class_names, listed.left_out)


# how `_clips` makes a clip of HxW from a video of another size (`data.video.resize_center_crop`), recorded with results
CLIP_READING = "each frame resized to cover the clip size, aspect kept (bilinear, antialiased), then center-cropped"
# how `_clips` reads a clip with ``native`` (``ldm eval recon --native-size``), recorded with results
NATIVE_READING = ("each clip at its own size (as shown), center-cropped to the largest size at most that the "
                  "autoencoder takes (`native_size`), never resized; encoded in batches of one size")


def native_size(ae: Autoencoder, frames: int, height: int, width: int) -> tuple[int, int]:
    """The size ``--native-size`` evaluates a ``height x width`` video at: both sides rounded down to the smallest
    multiple in `SIZE_MULTIPLES` at which ``ae`` takes clips of ``frames`` frames (the largest such size, cropped
    from the center); ValueError when none fits."""
    for m in SIZE_MULTIPLES:
        h, w = height // m * m, width // m * m
        if h < 1 or w < 1:
            break
        try:
            ae.check_input(frames, h, w)
            return h, w
        except ValueError:
            continue
    raise ValueError(f"{ae.family} takes no clip of {frames} frames at {height}x{width} or below it (rounded to "
                     f"multiples of {', '.join(map(str, SIZE_MULTIPLES))})")


def _by_size(items: ItemList, ae: Autoencoder, frames: int) -> tuple[ItemList, list[int]]:
    """``items`` ordered by the size they are evaluated at (`native_size`; one that cannot be read or taken first:
    it is skipped when read) and, for each place in that order, the item's place in ``items``: clips of one size
    come one after another, batched together (a look at each video's first frame)."""
    def size(i: int) -> tuple[int, int]:
        try:
            return native_size(ae, frames, *upright_size(items[i].readable()))
        except (VideoError, ValueError):
            return (0, 0)
    order = sorted(range(len(items)), key=size)
    return ItemList([items[i] for i in order], items.problems, items.class_names, items.left_out), order


def _clips(input: str, frames: int, height: int, width: int, fps: float | None, num: int | None,
           items: ItemList | None = None, native: Autoencoder | None = None
           ) -> tuple[Iterable[dict[str, Any]], list[str], int]:
    """The clips of ``input`` (its first ``num``; GIF twins once, `_without_gif_twins`), or of
    ``items`` when given (already chosen: ``num`` is not applied). ``native``: each clip at its own size,
    center-cropped to `native_size` for that autoencoder (``height`` / ``width`` unused), with its
    ``source_size``; a video no size of which the autoencoder takes is skipped."""
    if items is None:
        items = _without_gif_twins(list_items(input))
        if num:
            items = ItemList(items[:num], items.problems, items.class_names)
    if not items:
        raise ValueError(f"no videos found in {input}")
    data = VideoClipDataset(items, frames, height, width, fps)
    skipped: list[str] = list(getattr(items, "problems", []))

    def gen():
        for i in range(len(data)):
            try:
                if native is None:
                    yield {**data[i], "index": i}  # the item's place in ``items``
                    continue
                src_h, src_w = upright_size(items[i].readable())
                h, w = native_size(native, frames, src_h, src_w)
                clip = data.read(i, frames, src_h, src_w)  # its own size: no resize
                yield {**clip, "video": _center(clip["video"], h, w), "index": i, "source_size": [src_h, src_w]}
            except (VideoError, ValueError) as e:
                skipped.append(f"{items[i].source}: {e}")
    return gen(), skipped, len(items)


def _rank_share(input: str, frames: int, height: int, width: int, fps: float | None, items: ItemList,
                batch_size: int, native: Autoencoder | None = None) -> tuple[Iterable[dict[str, Any]], list[str]]:
    """`_clips` of this rank's share of ``items``: every world_size-th batch of ``batch_size`` of
    them (all of them on one rank), each clip's ``index`` its place in ``items``; the listing's
    problems go with rank 0's skipped list."""
    if not items:
        raise ValueError(f"no videos found in {input}")
    mine = _rank_indices(len(items), batch_size)
    share = ItemList([items[i] for i in mine], items.problems if dist.rank() == 0 else [], items.class_names)
    if not share:
        return iter(()), list(share.problems)
    clips, skipped, _ = _clips(input, frames, height, width, fps, None, share, native)
    return ({**x, "index": mine[x["index"]]} for x in clips), skipped


def _rank_indices(n: int, batch_size: int) -> list[int]:
    """The indices (of ``n`` clips) that this rank takes: every world_size-th batch of ``batch_size``."""
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return [i for b in dist.shard_list(batches, dist.rank(), dist.world_size()) for i in b]


def _merge_ranks(accs: dict[str, FrechetAccumulator]) -> None:
    """Every rank's statistics merged (in rank order) into ``accs`` on every rank; nothing on one rank."""
    if dist.world_size() == 1:
        return
    states = dist.all_gather_object({name: acc.state() for name, acc in accs.items()})
    for name, acc in accs.items():
        acc.merge_states([s[name] for s in states])


def _gathered(values: list) -> list:
    """Every rank's ``values``, one list in rank order (``values`` itself on one rank)."""
    return [v for part in dist.all_gather_object(values) for v in part]


def _batches(it: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    """``size`` clips at a time; a clip of another shape than the batch's starts the next batch."""
    batch: list[dict[str, Any]] = []
    for x in it:
        if batch and "video" in x and x["video"].shape != batch[0]["video"].shape:
            yield batch
            batch = []
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _mean_std(x: list[float]) -> dict[str, float]:
    a = np.asarray(x, dtype=np.float64)
    finite = a[np.isfinite(a)]
    return {"mean": float(finite.mean()) if finite.size else float("inf"),
            "std": float(finite.std()) if finite.size else 0.0, "n": int(a.size), "infinite": int(a.size - finite.size)}


# The per-clip metrics of ``ldm eval recon``: the result's key -> the entry of
# `ldm.metrics.reconstruction_scores` (or, for a variable-rate autoencoder, of its ``rate_report``: `_rate_scores`)
# it summarises. A clip's value is the mean of its entry (an entry per frame is averaged over the clip's frames);
# the result holds mean / std / n / infinite over the clips (`_mean_std`). An entry that a run does not compute
# (``lpips`` without LPIPS files, ``vcpr`` of a fixed-rate autoencoder) leaves its key out of the result.
# To add a metric: compute it in `reconstruction_scores`, add its line here, describe it in README's evaluation.
RECON_METRICS = {"psnr_db": "psnr", "ssim": "ssim_per_frame", "lpips": "lpips", "temporal_error": "temporal_error",
                 "info_preservation": "info_preservation", "vcpr": "vcpr", "keyframe_accuracy": "keyframe_accuracy"}
SSIM_PROTOCOL = "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 2 ([-1, 1]), per frame, averaged"


@dataclasses.dataclass
class _ReconPass:
    """What one rank's pass over its clips gathered (`_reconstruct_clips`)."""
    rows: list[dict[str, Any]]  # one per clip: its ``index`` and its `reconstruction_scores` entries
    shown: list[tuple[int, Tensor, Tensor]]  # (index, clip, reconstruction) of the first grid clips
    encode_s: float = 0.0
    decode_s: float = 0.0


def _rate_scores(ae: Autoencoder, latent) -> list[dict[str, Tensor]]:
    """Per clip of an encoded batch, the `RECON_METRICS` entries of a variable-rate autoencoder's
    ``rate_report`` (MTC-VAE Tab. 1 / 3: the clip's ``vcpr``, its keyframe predictor's ``keyframe_accuracy``);
    nothing for a fixed-rate one."""
    if not ae.variable_rate:
        return [{} for _ in range(latent.batch_size)]
    return [{k: torch.tensor(float(v), dtype=torch.float64) for k, v in report.items()
             if k in ("vcpr", "keyframe_accuracy")} for report in ae.rate_report(latent)]


def _reconstruct_clips(ae: Autoencoder, clips: Iterable[dict[str, Any]], *, batch_size: int, device: torch.device,
                       dtype: torch.dtype, lpips: LPIPS | None, rfvd: FrechetAccumulator | None, text_encoder,
                       grid_clips: int, rfid: FrechetAccumulator | None = None,
                       first_frame: bool = False) -> _ReconPass:
    """Encode + decode ``clips`` batch by batch (``first_frame``: the decoder also gets each clip's first frame,
    image-to-video reconstruction): each clip's scores, rFVD's and rFID's features, the first ``grid_clips``
    clips for the grid and the seconds spent encoding and decoding."""
    done = _ReconPass(rows=[], shown=[])
    for batch in _batches(clips, batch_size):
        x = torch.stack([b["video"] for b in batch]).to(device)  # (B, C, T, H, W)
        cond = None
        if ae.text_dim:
            emb, mask = text_encoder.encode([b["caption"] for b in batch])
            cond = Cond(text=emb.to(device, dtype), text_mask=mask.to(device))
        t0 = time.perf_counter()
        latent = ae.encode(x.to(dtype), cond)
        t1 = time.perf_counter()
        if first_frame:
            cond = dataclasses.replace(cond or Cond(), first_frame=x[:, :, :1].to(dtype))
        y = ae.decode(latent, cond).clamp(-1, 1)
        done.encode_s, done.decode_s = done.encode_s + t1 - t0, done.decode_s + time.perf_counter() - t1
        rates = _rate_scores(ae, latent)
        x, y = x.float().cpu(), y.float().cpu()
        scores = reconstruction_scores(x, y, lpips)
        index = [b["index"] for b in batch]
        done.rows += [{"index": i, "size": list(x.shape[-2:]), "source_size": batch[j].get("source_size"),
                       **{entry: v[j].clone() for entry, v in scores.items()}, **rates[j]} for j, i in enumerate(index)]
        if rfvd is not None:
            rfvd.update("real", x, index=index)
            rfvd.update("fake", y)
        if rfid is not None:
            rfid.update("real", x)
            rfid.update("fake", y)
        done.shown += [(i, x[j], y[j]) for j, i in enumerate(index)][:grid_clips - len(done.shown)]
    return done


def _gathered_pass(done: _ReconPass, grid_clips: int) -> _ReconPass:
    """Every rank's clips in the order of one rank (nothing changes on one rank)."""
    return _ReconPass(rows=sorted(_gathered(done.rows), key=lambda r: r["index"]),
                      shown=sorted(_gathered(done.shown), key=lambda s: s[0])[:grid_clips],
                      encode_s=sum(_gathered([done.encode_s])), decode_s=sum(_gathered([done.decode_s])))


def recon_metrics(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each `RECON_METRICS` key that ``rows`` (one per clip, `reconstruction_scores` entries) hold: `_mean_std`
    over the clips of each clip's value (its entry, averaged over frames)."""
    return {key: _mean_std([float(r[entry].double().mean()) for r in rows])
            for key, entry in RECON_METRICS.items() if rows and entry in rows[0]}


def _size_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How many clips were evaluated at each size (``sizes``) and had each size as shown (``source_sizes``),
    ``"HxW"`` (``--native-size``)."""
    out: dict[str, dict[str, int]] = {"sizes": {}, "source_sizes": {}}
    for key, field in (("sizes", "size"), ("source_sizes", "source_size")):
        for h, w in (r[field] for r in rows):
            out[key][f"{h}x{w}"] = out[key].get(f"{h}x{w}", 0) + 1
    return out


def _center(video: Tensor, height: int, width: int) -> Tensor:
    """The center ``height x width`` of ``(..., H, W)`` frames."""
    top, left = (video.shape[-2] - height) // 2, (video.shape[-1] - width) // 2
    return video[..., top:top + height, left:left + width]


@torch.no_grad()
def evaluate_reconstruction(ae: Autoencoder, input: str, frames: int, height: int | None, width: int | None, *,
                            fps: float | None = None, num: int | None = None, seed: int | None = None,
                            classes: str | None = None, split: str | None = None, batch_size: int = 4,
                            device: str | torch.device = "cpu", lpips: LPIPS | None = None,
                            i3d: Extractor | None = None, fvd_frames: int = FVD_FRAMES,
                            frame_group: int = 0, group_start: int = 0, text_encoder=None,
                            grid: str | Path | None = None, grid_clips: int = 4,
                            dtype: torch.dtype = torch.float32, inception: Extractor | None = None,
                            first_frame: bool = False, native: bool = False) -> dict[str, Any]:
    """Encode + decode the clips of ``input`` (`choose_items`: with ``num``, a random ``num`` of them
    seeded by ``seed``, or the first ``num`` when ``seed`` is None, as `ldm train-ae`'s held-out set
    and `ldm cost --recon` take them; ``classes`` / ``split`` as `data.sources.list_items`); the per-clip
    metrics of `RECON_METRICS`, rFVD (``i3d``), rFID (``inception``: every frame of the originals against every
    frame of their reconstructions), optional per-position SSIM and a grid of the first ``grid_clips``
    clips. ``first_frame``: decoded with each clip's first frame (``first_frame_decoding`` autoencoders: H3AE's
    image-to-video reconstruction, its Tab. 4). The autoencoder runs in ``dtype``; the metrics are computed in
    fp32. ``input_clips`` in the result records how the clips were chosen. ``native`` (IV-VAE's "original video
    resolution"): each clip at its own size (`native_size`: center-cropped to one the autoencoder takes, never
    resized; ``height`` / ``width`` unused), batched by size, the sizes recorded; rFVD / rFID take mixed sizes
    as their extractors resize every frame (FVD: to 224x224; Inception: inside the network)."""
    device = torch.device(device)
    ae = ae.to(device=device, dtype=dtype).eval()
    if not native:
        ae.check_input(frames, height, width)
    ae.check_text_encoder(text_encoder)
    if first_frame and not ae.first_frame_decoding:
        raise ValueError(f"{ae.family} does not decode with a first frame (H3AE does): no image-to-video "
                         "reconstruction")
    items, chosen = choose_items(input, num=num, seed=seed, classes=classes, split=split)
    order = list(range(len(items)))
    if native:
        items, order = _by_size(items, ae, frames)
    clips, skipped = _rank_share(input, frames, height, width, fps, items, batch_size,  # all of them on one rank
                                 ae if native else None)
    clips = ({**c, "index": order[c["index"]]} for c in clips)  # its place among the chosen clips
    rfvd = fvd_accumulator(i3d, fvd_frames) if i3d is not None else None
    rfid = fid_accumulator(inception) if inception is not None else None
    done = _reconstruct_clips(ae, clips, batch_size=batch_size, device=device, dtype=dtype, lpips=lpips, rfvd=rfvd,
                              text_encoder=text_encoder, grid_clips=grid_clips, rfid=rfid, first_frame=first_frame)
    _merge_ranks({k: acc for k, acc in {"rfvd": rfvd, "rfid": rfid}.items() if acc is not None})
    done, skipped = _gathered_pass(done, grid_clips), _gathered(skipped)
    n = len(done.rows)
    if n == 0:
        raise UserError(f"none of the {len(items)} videos in {input} could be read: {skipped[:3]}; fix or replace "
                        "the inputs, or change --frames/--fps")
    result: dict[str, Any] = {"clips": n, "skipped": skipped, "input_clips": chosen, "frames": frames,
                              "height": None if native else height, "width": None if native else width,
                              "native_size": native, **(_size_counts(done.rows) if native else {}),
                              "read_fps": fps, "read": NATIVE_READING if native else CLIP_READING,
                              "first_frame": first_frame, "dtype": dist.dtype_name(dtype), **recon_metrics(done.rows),
                              "ssim_protocol": SSIM_PROTOCOL,
                              "encode_s_per_clip": done.encode_s / n, "decode_s_per_clip": done.decode_s / n}
    if lpips is not None:
        result["lpips"]["net"] = lpips.net
    result["info_preservation"]["pooled"] = float(information_preservation(  # IV-VAE Eq. 2: sums over all clips
        sum(r["abs_error"] for r in done.rows), sum(r["abs_sum"] for r in done.rows)))
    if rfvd is not None:
        result["rfvd"] = rfvd.result("rfvd") if n >= 2 else {"error": "rFVD needs >= 2 clips"}
    if rfid is not None:
        result["rfid"] = rfid.result("rfid") if n * frames >= 2 else {"error": "rFID needs >= 2 frames"}
    if frame_group:
        per_frame = torch.stack([r["ssim_per_frame"] for r in done.rows])
        result["ssim_per_position"] = position_ssim(per_frame, frame_group, group_start)
    if grid:
        if dist.rank() == 0:
            shown = [s[1:] for s in done.shown]
            h, w = min(x.shape[-2] for x, _ in shown), min(x.shape[-1] for x, _ in shown)  # --native-size: cropped
            save_grid(torch.stack([_center(x, h, w) for x, _ in shown]),
                      torch.stack([_center(y, h, w) for _, y in shown]), Path(grid), max_frames=min(frames, 8))
        result["grid"] = str(grid)
    return result


# ------------------------------------------------------------------------------------------
# generation: the offline attribute benchmark
# ------------------------------------------------------------------------------------------
def attribute_suite(shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                    directions: Sequence[str] | None = None, holdout: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The fixed prompt suite: every (shape, color, direction) of the chosen sets in class-id order
    (default: all shapes and colors, the four cardinal directions), each with its caption, class id
    and whether it was held out of training."""
    from data.synth import caption, combinations

    combos = combinations(shapes, colors, directions, holdout=holdout, include_holdout=True)
    return [{**c, "prompt": caption(c)} for c in combos]


def _conditioning(model, export: Export, use_class: bool | None) -> tuple[bool, bool]:
    """(text, class): what the benchmark conditions on. Text when the DiT and its training run have
    it; class ids when asked (default: only when there is no text)."""
    text = bool(model.config.text_dim and export.text_encoder)
    has_class = bool(model.config.num_classes)
    cls = has_class and (use_class if use_class is not None else not text)
    if use_class and not has_class:
        raise ValueError("--use-class: this DiT has no class conditioning")
    if not text and not cls:
        raise ValueError("this DiT takes neither text (with a text encoder) nor class ids")
    return text, cls


def check_suite_classes(model, suite: list[dict[str, Any]]) -> None:
    """The DiT's class embedding holds every class id of the suite (`ValueError` otherwise: a DiT
    trained on latents whose manifest counted fewer classes, e.g. extracted before synthetic sets
    declared their whole id space)."""
    known, worst = model.config.num_classes, max(suite, key=lambda c: c["class_id"])
    top = worst["class_id"]
    if top >= known:
        raise ValueError(f"the prompt suite uses class ids up to {top} ({worst['prompt']!r}), but this DiT "
                         f"knows {known} classes (ids 0 to {known - 1}); choose --shapes / --colors / --directions "
                         f"within its classes, or train on latents extracted with "
                         f"--num-classes {top + 1} or more")


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a proportion ``k / n`` (95% for ``z = 1.96``): how far an accuracy
    measured on ``n`` samples may be from the model's (Wilson 1927; sound at small n and at 0 or 1)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def attribute_benchmark(model, ae: Autoencoder, export: Export, suite: list[dict[str, Any]], *,
                        per_prompt: int, frames: int, height: int, width: int,
                        sampling: SamplingConfig = SamplingConfig(),
                        batch_size: int = 8, use_class: bool | None = None, text_encoder=None,
                        device: str | torch.device = "cpu", save_dir: Path | None = None,
                        fps: float = 8.0) -> dict[str, Any]:
    """Sample ``per_prompt`` videos per suite prompt and read the attributes back.

    Accuracy per attribute, ``all`` (all three right), their 95% Wilson intervals, chance levels,
    the held-out combinations separately, per-prompt rows and the sampling time per video.
    Candidates for the reader are the suite's own shapes / colors / directions."""
    from data.attributes import read_attributes

    if per_prompt < 1 or not suite:
        raise ValueError("the attribute benchmark needs a non-empty suite and per_prompt >= 1")
    use_text, use_cls = _conditioning(model, export, use_class)
    if use_cls:
        check_suite_classes(model, suite)
    if text_encoder is None:
        text_encoder = sampling_text_encoder(model, ae, export, use_text, device)
    cands = {a: tuple(dict.fromkeys(c[a] for c in suite)) for a in ("shape", "color", "direction")}
    items = [(i, k) for i in range(len(suite)) for k in range(per_prompt)]
    rows, t_sample = [], 0.0
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        prompts = [suite[i]["prompt"] for i, _ in chunk]
        t0 = time.perf_counter()
        videos = generate(model, ae, export.latent_norm, prompts=prompts if use_text else None,
                          class_ids=[suite[i]["class_id"] for i, _ in chunk] if use_cls else None,
                          frames=frames, height=height, width=width, sampling=sampling, seed_offset=b,
                          text_encoder=text_encoder, device=device, progress=False)
        t_sample += time.perf_counter() - t0
        for (i, k), v in zip(chunk, videos):
            got = read_attributes(v, cands["shape"], cands["color"], cands["direction"])
            want = suite[i]
            row = {"prompt": want["prompt"], "sample": k, "holdout": want["holdout"],
                   **{f"read_{a}": got[a] for a in ("shape", "color", "direction")},
                   **{a: got[a] == want[a] for a in ("shape", "color", "direction")}}
            row["all"] = row["shape"] and row["color"] and row["direction"]
            if save_dir is not None:
                name = f"{i:03d}-{want['color']}-{want['shape']}-{want['direction']}-{k}"
                write_video(save_dir / f"{name}.mp4", v, fps)
                row["file"] = f"{name}.mp4"
            rows.append(row)

    def acc(sel: list[dict[str, Any]]) -> dict[str, float] | None:
        if not sel:
            return None
        return {a: sum(r[a] for r in sel) / len(sel) for a in ("shape", "color", "direction", "all")} | {"n": len(sel)}

    chance = {a: 1 / len(cands[a]) for a in ("shape", "color", "direction")}
    chance["all"] = chance["shape"] * chance["color"] * chance["direction"]
    ci95 = {a: wilson_interval(sum(r[a] for r in rows), len(rows)) for a in ("shape", "color", "direction", "all")}
    return {"accuracy": acc(rows), "accuracy_ci95": ci95, "accuracy_seen": acc([r for r in rows if not r["holdout"]]),
            "accuracy_holdout": acc([r for r in rows if r["holdout"]]), "chance": chance,
            "prompts": len(suite), "per_prompt": per_prompt, "conditioning": {"text": use_text, "class": use_cls},
            "sampling": dataclasses.asdict(sampling),
            "sample_s_per_video": t_sample / len(rows), "rows": rows}


# ------------------------------------------------------------------------------------------
# generation: VBench bridge
# ------------------------------------------------------------------------------------------
def read_native(path: str | Path) -> Tensor:
    """All frames of a video file at its own size: ``(3, T, H, W)`` in [-1, 1]."""
    info = probe(path)
    return read_video(path, info["frames"], info["height"], info["width"])


def vbench_info_path(path: str | None) -> Path:
    """``VBench_full_info.json``: the given file, else the one inside an installed ``vbench``."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"VBench prompt info not found: {str(p)!r}")
        return p
    import importlib.util

    spec = importlib.util.find_spec("vbench")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("no --vbench-info given and vbench is not installed here: pass VBench's "
                                "VBench_full_info.json (from its repository or its environment)")
    found = Path(spec.origin).parent / "VBench_full_info.json"
    if not found.is_file():
        raise FileNotFoundError(f"the installed vbench has no {found.name} ({found.parent}); pass --vbench-info")
    return found


def vbench_prompts(info: Path, dimensions: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Entries ``{"prompt_en", "dimension"}`` of the standard list, restricted to ``dimensions``."""
    data = json.loads(Path(info).read_text())
    if not isinstance(data, list) or not all("prompt_en" in e and "dimension" in e for e in data):
        raise ValueError(f"{info} is not VBench_full_info.json (a list of {{prompt_en, dimension}})")
    if dimensions:
        unknown = sorted(set(dimensions) - set(VBENCH_NORMALIZE))
        if unknown:
            raise ValueError(f"unknown VBench dimension(s) {unknown}; known: {sorted(VBENCH_NORMALIZE)}")
        data = [e for e in data if set(e["dimension"]) & set(dimensions)]
    return data


def vbench_video_name(prompt: str, index: int) -> str:
    """VBench's standard file name, ``{prompt}-{index}.mp4``."""
    if "/" in prompt or "\0" in prompt:
        raise ValueError(f"prompt {prompt!r} cannot be a file name")
    return f"{prompt}-{index}.mp4"


def sampling_record(sampling: SamplingConfig) -> dict[str, Any]:
    """The settings a VBench folder records; the guidance interval only when set (folders made
    before it existed were sampled with guidance at every step, its default)."""
    record = dataclasses.asdict(sampling)
    if sampling.guidance_interval == SamplingConfig().guidance_interval:
        del record["guidance_interval"]
    return record


def run_vbench(python: str, videos: Path, info: Path, dimensions: Sequence[str], output: Path,
               gpus: int = 1) -> dict[str, float]:
    """Run VBench's evaluation in its own environment (``python`` of that environment) on the
    standard-named videos; returns ``{dimension: score}`` from its ``*_eval_results.json``."""
    output.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
           "-m", "vbench.launch.evaluate", "--videos_path", str(videos), "--dimension", *dimensions,
           "--output_path", str(output), "--full_json_dir", str(info), "--mode", "vbench_standard"]
    log = output / "vbench.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"vbench exited with {code}; see {log}:\n{log.read_text()[-3000:]}")
    return read_vbench_results(output)


def read_vbench_results(path: Path) -> dict[str, float]:
    """``{dimension: score}`` from a VBench ``*_eval_results.json`` (a file, or the newest in a folder)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*_eval_results.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no *_eval_results.json in {path}")
        path = found[-1]
    try:
        data = json.loads(path.read_text())
        return {k: float(v[0] if isinstance(v, list) else v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path} is not a VBench *_eval_results.json ({{dimension: [score, per-video rows]}}): "
                         f"{e}") from None


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names and raw bytes, in name order): which weights made a video."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


VBENCH_RECORD = "vbench_videos.json"  # beside vbench_videos/: what made the videos in it


def check_vbench_dit(model, export: Export) -> None:
    """VBench's prompts are text: the DiT must read it (ValueError otherwise)."""
    if not (model.config.text_dim and export.text_encoder):
        raise ValueError("VBench prompts need a text-conditioned DiT; this one has no text conditioning")


def vbench_bridge(model, ae: Autoencoder, export: Export, out: Path, *, info: Path,
                  dimensions: Sequence[str] | None, per_prompt: int = 5, frames: int, height: int, width: int,
                  sampling: SamplingConfig = SamplingConfig(), batch_size: int = 8, fps: float = 8.0,
                  device: str | torch.device = "cpu",
                  vbench_python: str | None = None, vbench_results: str | None = None, gpus: int = 1,
                  max_prompts: int | None = None, replace: bool = False, text_encoder=None) -> dict[str, Any]:
    """Sample the standard prompts, score temporal flickering in-house, run VBench if given its
    environment (or read its results), aggregate. Videos already in ``out/vbench_videos`` are
    reused when ``vbench_videos.json`` shows the same DiT and autoencoder weights, clip size, fps
    and sampling settings; videos made otherwise are removed with ``replace``, else refused."""
    check_vbench_dit(model, export)
    entries = vbench_prompts(info, dimensions)[:max_prompts] if max_prompts else vbench_prompts(info, dimensions)
    dims = list(dimensions) if dimensions else sorted({d for e in entries for d in e["dimension"]})
    videos_dir, record_path = out / "vbench_videos", out / VBENCH_RECORD
    record = json.loads(json.dumps({"dit": weights_sha256(model), "autoencoder": weights_sha256(ae), "frames": frames,
                                    "height": height, "width": width, "fps": fps,
                                    "sampling": sampling_record(sampling)}))
    if videos_dir.exists() and not (record_path.is_file() and read_json(record_path) == record):
        if not replace:
            raise UserError(f"{videos_dir} holds videos of another DiT, autoencoder or sampling settings (see "
                            f"{record_path}); choose a new output folder or --overwrite")
        shutil.rmtree(videos_dir)
    videos_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, record)
    text_encoder = text_encoder or load_text_encoder(export, device=device)
    jobs = [(e["prompt_en"], k) for e in entries for k in range(per_prompt)]
    flicker: list[float] = []
    flicker_prompts = {e["prompt_en"] for e in entries if "temporal_flickering" in e["dimension"]}
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        todo = [(p, k) for p, k in chunk if not (videos_dir / vbench_video_name(p, k)).exists()]
        if todo:
            vids = generate(model, ae, export.latent_norm, prompts=[p for p, _ in todo], frames=frames, height=height,
                            width=width, sampling=sampling, text_encoder=text_encoder, device=device, progress=False,
                            seeds=[sampling.seed + b + j for j, job in enumerate(chunk) if job in todo])  # a resume too
            for (p, k), v in zip(todo, vids):
                write_video(videos_dir / vbench_video_name(p, k), v, fps)
        for p, k in chunk:
            if p in flicker_prompts:
                flicker.append(temporal_flickering(read_native(videos_dir / vbench_video_name(p, k))))
    result: dict[str, Any] = {"videos": str(videos_dir), "prompts": len(entries), "per_prompt": per_prompt,
                              "dimensions": dims, "info": str(info), "info_sha256": file_sha256(info)}
    scores: dict[str, float] = {}
    if flicker:
        result["temporal_flickering_inhouse"] = float(np.mean(flicker))
        scores["temporal_flickering"] = result["temporal_flickering_inhouse"]
    if vbench_results:
        result["vbench_scores"] = read_vbench_results(Path(vbench_results))
    elif vbench_python:
        result["vbench_scores"] = run_vbench(vbench_python, videos_dir, info, dims, out / "vbench_results", gpus)
    else:
        result["vbench_scores"] = {}
        result["vbench_note"] = ("vbench not run: pass --vbench-python (its environment's python) or "
                                 "--vbench-results (its *_eval_results.json); the videos are ready for it")
    scores.update({k.replace(" ", "_"): v for k, v in result["vbench_scores"].items()})
    result["aggregate"] = vbench_aggregate(scores)
    return result


# ------------------------------------------------------------------------------------------
# generation: FVD / FID against reference clips
# ------------------------------------------------------------------------------------------
def _as_batches(videos: Tensor | list[Tensor]) -> list[Tensor]:
    """``generate``'s output as ``(B, C, T, H, W)`` batches (a variable-length list, one clip each)."""
    return [videos] if isinstance(videos, Tensor) else [v[None] for v in videos]


CLASS_DISTS = ("reference", "uniform")  # how `generation_fd` draws the classes of the generated clips


def choose_items(input: str, *, num: int | None = None, seed: int | None = 0, classes: str | None = None,
                 split: str | None = None) -> tuple[ItemList, dict[str, Any]]:
    """The videos of ``input`` that an evaluation uses, and how they were chosen: the listing
    (``classes`` / ``split`` as `data.sources.list_items`, GIF twins once), then a random ``num`` of
    them seeded by ``seed`` and kept in listing order (sorted listings run class by class, so the
    first N would cover a few classes); the first ``num`` when ``seed`` is None; all when ``num`` is
    None or larger. The record says how many were listed and used, how, and the classes covered."""
    items = _without_gif_twins(list_items(input, classes=classes, split=split))
    total, listed_classes = len(items), _class_labels(items)
    if num and num < total:
        chosen = range(num) if seed is None else sorted(random.Random(seed).sample(range(total), num))
        items = ItemList([items[i] for i in chosen], items.problems, items.class_names)
    how = "all" if len(items) == total else (f"first {len(items)} of {total} in listing order" if seed is None
                                              else f"random {len(items)} of {total} (seed {seed})")
    record: dict[str, Any] = {"classes": classes, "split": split, "listed": total, "used": len(items), "chosen": how}
    if listed_classes:
        record["classes_covered"] = f"{len(_class_labels(items))} of {len(listed_classes)}"
    return items, record


def _class_labels(items: Iterable[VideoItem]) -> set[str | int]:
    """The distinct classes (names, else ids) of ``items``."""
    return {it.class_name or it.class_id for it in items if it.class_name or it.class_id is not None}


def reference_items(reference: str, export: Export, *, num: int | None = None, seed: int = 0,
                    classes: str | None = None, split: str | None = None) -> tuple[ItemList, dict[str, Any]]:
    """The reference clips of FVD / FID and how they were chosen (`choose_items`: a random ``num``,
    seeded by ``seed``). A clip's class is the DiT's id of its class NAME when both have names
    (`class_index`; an unknown name is a `UserError`), else its id as is."""
    items, record = choose_items(reference, num=num, seed=seed, classes=classes, split=split)
    by = "ids"
    if export.class_names and any(it.class_name is not None for it in items):
        by = "names"
        for it in items:
            if it.class_name is None:
                continue
            found = class_index(export.class_names, it.class_name)
            if found is None:
                raise UserError(f"--reference {reference}: class {it.class_name!r} ({it.key}) is not one of the "
                                f"{len(export.class_names)} classes this DiT was trained on; leave it out (--split) "
                                "or give the --classes list of its training data")
            it.class_id = found
    return items, record | {"class_ids_from": by}


def _class_plan(items: list, dist: str, seed: int) -> list[int]:
    """The class of each generated clip: the reference clip's own (``reference``), or the reference
    set's classes in equal shares (``uniform``: counts differ by at most one; which classes get one
    more, and the order, follow ``seed``)."""
    ids = [it.class_id for it in items]
    if dist == "reference":
        return ids
    present = sorted(set(ids))
    plan = [present[i % len(present)] for i in range(len(ids))]
    random.Random(seed).shuffle(plan)
    return plan


def _per_class(ids: list[int], names: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in sorted(ids):
        label = names[i] if i < len(names) else str(i)
        counts[label] = counts.get(label, 0) + 1
    return counts


REFERENCE_STATS_VERSION = 1  # raise when the reading or the feature protocol changes what the statistics hold


def _item_stamp(it: VideoItem) -> list[Any]:
    """Where an item's bytes are and their file's size and modification time: a replaced video
    gives another stamp."""
    path = it.path if it.path is not None else it.shard
    st = Path(path).stat()
    return [it.key, str(Path(path).resolve()), it.member, it.offset, it.size, st.st_size, st.st_mtime_ns]


def reference_stats_file(folder: Path, items: Sequence[VideoItem], accs: dict[str, FrechetAccumulator],
                         frames: int, height: int, width: int, fps: float | None) -> Path:
    """The file in ``folder`` for the statistics of these reference clips (each one's file, size and
    modification time), read at this clip size and rate, under each extractor's protocol (its
    weights' sha256 included): ``<sha256 of all that>.safetensors``."""
    key = {"version": REFERENCE_STATS_VERSION, "clips": [_item_stamp(it) for it in items], "frames": frames,
           "height": height, "width": width, "fps": fps,
           "features": {name: acc.describe() for name, acc in sorted(accs.items())}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / f"{digest[:32]}.safetensors"


def save_reference_stats(path: Path, accs: dict[str, FrechetAccumulator], readable: list[int],
                         skipped: list[str], clip_metrics: dict[str, list[float]]) -> None:
    """Keep the reference side of ``accs`` with the clips it was read from (indices into the chosen
    items), the skipped ones and the reference clips' `GEN_CLIP_METRICS` values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for name, acc in accs.items() for side in _real_sides(acc)
               for k, v in acc.stats[side].state(f"{name}.{side}").items()}
    save_tensors(path, tensors, {"readable": json.dumps(readable), "skipped": json.dumps(skipped),
                                 "clip_metrics": json.dumps(clip_metrics),
                                 "features": json.dumps({name: acc.describe() for name, acc in accs.items()})})


def _real_sides(acc: FrechetAccumulator) -> list[str]:
    """The reference side's statistics of ``acc``: all of it, and its halves when it keeps them."""
    return [side for side in acc.stats if side.startswith("real")]


def load_reference_stats(path: Path, accs: dict[str, FrechetAccumulator]
                         ) -> tuple[list[int], list[str], dict[str, list[float]]]:
    """Fill the reference side of ``accs`` from `save_reference_stats`' file; its readable clip
    indices, skipped list and clip metrics (none from a file written before they were kept). A file
    that cannot be read is a `UserError` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_tensors(path)
        for name, acc in accs.items():
            for side in _real_sides(acc):
                acc.stats[side].load(tensors, f"{name}.{side}")
        return json.loads(meta["readable"]), json.loads(meta["skipped"]), json.loads(meta.get("clip_metrics", "{}"))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise UserError(f"--reference-stats: {path} cannot be read ({e}); delete it to compute the reference "
                        "statistics again") from None


def _reference_clips(reference: str, items: ItemList, accs: dict[str, FrechetAccumulator], stats_file: Path | None, *,
                     frames: int, height: int, width: int, fps: float | None, batch_size: int
                     ) -> tuple[Iterable[dict[str, Any]], list[str], dict[str, list[float]] | None]:
    """This rank's reference clips, the skipped ones and, when the reference statistics came from
    ``stats_file`` (an earlier evaluation's, `load_reference_stats`: then the clips carry their caption and
    class, not their video, and are not decoded again), the reference clips' `GEN_CLIP_METRICS` (else None).
    The file is read by rank 0 alone (the others' reference sides stay empty) and its answer sent to all."""
    cached, error = None, None
    if stats_file is not None and dist.rank() == 0 and stats_file.is_file():
        try:
            cached = load_reference_stats(stats_file, accs)
        except UserError as e:
            error = str(e)
    cached, error = dist.broadcast_object((cached, error))
    if error is not None:
        raise UserError(error)
    if cached is None:
        ref, skipped = _rank_share(reference, frames, height, width, fps, items, batch_size)
        return ref, skipped, None
    readable, skipped, clip_metrics = cached
    mine = set(_rank_indices(len(items), batch_size))
    ref = iter([{"key": items[i].key, "caption": items[i].caption or "", "index": i,  # a clip's fields, no video
                 "class_id": -1 if items[i].class_id is None else items[i].class_id}
                for i in readable if i in mine])
    return ref, skipped if dist.rank() == 0 else [], clip_metrics


def _read_samples(samples: str, accs: dict[str, FrechetAccumulator], clip_metrics: dict[str, list[float]], *,
                  num: int | None, frames: int, height: int, width: int, fps: float | None, batch_size: int
                  ) -> tuple[float | None, list[str]]:
    """Add this rank's share of the ``samples`` folder's clips (its first ``num``) to the generated side of
    ``accs`` and their `GEN_CLIP_METRICS` to ``clip_metrics``; the rate they were read at and the skipped ones.
    An `ldm sample` folder (``index.json``) is read frame by frame: each file frame is a DiT frame, whatever
    ``--fps`` it was written at."""
    samples_fps = None if (Path(samples) / "index.json").is_file() else fps
    listed = _without_gif_twins(list_items(samples))
    listed = ItemList(listed[:num], listed.problems, listed.class_names) if num else listed
    gen, skipped = _rank_share(samples, frames, height, width, samples_fps, listed, batch_size)
    for batch in _batches(gen, batch_size):
        fake = torch.stack([x["video"] for x in batch])
        for acc in accs.values():
            acc.update("fake", fake)
        _add_clip_metrics(clip_metrics, fake)
    return samples_fps, skipped


# The per-clip statistics of ``ldm eval gen --reference``: name -> (function of clips ``(B, C, T, H, W)`` in
# [-1, 1] to one value per clip ``(B,)``, the fewest frames it needs). Each is measured on every reference and
# generated clip; ``fd.<name>`` holds `_mean_std` of each side. To add one: write the function in
# `ldm.metrics`, add its line here, describe it in README's evaluation section.
GEN_CLIP_METRICS = {"frame_change": (frame_change, 2)}


def _add_clip_metrics(values: dict[str, list[float]], videos: Tensor) -> None:
    """Append each clip's `GEN_CLIP_METRICS` of ``videos`` ``(B, C, T, H, W)`` to ``values``."""
    for name, (measure, fewest_frames) in GEN_CLIP_METRICS.items():
        if videos.shape[2] >= fewest_frames:
            values.setdefault(name, []).extend(measure(videos.float().cpu()).tolist())


def _gathered_metrics(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """Every rank's ``values`` (`_add_clip_metrics`), each list in rank order."""
    out: dict[str, list[float]] = {}
    for part in dist.all_gather_object(values):
        for name, v in part.items():
            out.setdefault(name, []).extend(v)
    return out


def _clip_metric_results(reference: dict[str, list[float]], generated: dict[str, list[float]]) -> dict[str, Any]:
    """``{name: {"reference": _mean_std, "generated": _mean_std}}`` of the sides that measured it."""
    return {name: {side: _mean_std(values[name]) for side, values in (("reference", reference),
                                                                       ("generated", generated)) if values.get(name)}
            for name in GEN_CLIP_METRICS if reference.get(name) or generated.get(name)}


def _fd_values(accs: dict[str, FrechetAccumulator]) -> dict[str, Any]:
    """Each accumulator's Fréchet distance (`FrechetAccumulator.result`); as rFVD, too few readable clips
    on a side is an entry, not a lost evaluation."""
    out: dict[str, Any] = {}
    for name, acc in accs.items():
        n_real, n_fake = acc.stats["real"].n, acc.stats["fake"].n
        out[name] = acc.result(name) if min(n_real, n_fake) >= 2 else {
            "error": f"{name.upper()} needs >= 2 {'clips' if name == 'fvd' else 'frames'} on each side, got "
                     f"{n_real} reference and {n_fake} generated (see skipped)"}
    return out


def _fd_conditioning(model, ae: Autoencoder, export: Export, items: ItemList, use_class: bool | None,
                     device: str | torch.device, text_encoder=None) -> tuple[bool, bool, Any]:
    """(text, class, text encoder): what `generation_fd` samples each reference clip's twin from (`_conditioning`;
    both False for an unconditional DiT); `ValueError` for a clip without the class id that the DiT needs."""
    use_text, use_cls = False, False  # an unconditional DiT, sampled unconditionally
    if model.config.text_dim or model.config.num_classes:
        use_text, use_cls = _conditioning(model, export, use_class)
    if text_encoder is None:
        text_encoder = sampling_text_encoder(model, ae, export, use_text, device)
    if use_cls and any(it.class_id is None for it in items):
        raise ValueError("a reference clip has no class id" + (" (--use-class)" if use_text else
                                                               "; this DiT is class-conditioned only"))
    return use_text, use_cls, text_encoder


def generation_fd(model, ae: Autoencoder, export: Export, reference: str, *, frames: int, height: int,
                  width: int, num: int | None, i3d: Extractor | None, inception: Extractor | None,
                  fvd_frames: int = FVD_FRAMES, samples: str | None = None,
                  sampling: SamplingConfig = SamplingConfig(), batch_size: int = 8,
                  device: str | torch.device = "cpu", fps: float | None = None,
                  use_class: bool | None = None, classes: str | None = None, split: str | None = None,
                  class_dist: str = "reference", reference_stats: str | Path | None = None,
                  reference_seed: int | None = None, text_encoder=None) -> dict[str, Any]:
    """FVD / FID between the reference clips (`reference_items`: a random ``num`` of them, seeded by
    ``reference_seed``, by default ``sampling.seed``) and generated ones: the given ``samples`` folder (its first
    ``num``), or one sample per reference clip from its caption (text DiT) or class (``use_class``: also with text,
    as `_conditioning`). A class-conditional DiT samples each reference clip's class (``class_dist="reference"``:
    the generated classes follow the reference set's) or the reference set's classes in equal shares
    (``"uniform"``); the result records which, with the clips per class. The noise of clip i is the same on every
    run (seed + i, any batch size or number of ranks), so a rerun gives the same value. Under several ranks each
    samples and reads every world_size-th batch of clips, the statistics are merged (`_merge_ranks`) and every rank
    returns the same result; ``reference_stats`` is read and written by rank 0 alone. Reference (and ``samples``)
    clips are read at ``fps``, by default the rate the DiT's training clips were resampled to
    (``export.video.fps``; None: the videos' own), so both sides have the same motion per frame; an `ldm sample`
    folder (``index.json``) is read frame by frame, whatever playback ``--fps`` it was written at. With
    ``reference_stats`` (a folder), the reference features' statistics are kept there (`reference_stats_file`)
    and reused by a later evaluation against the same clips under the same protocol, e.g. another checkpoint of
    the run: the same numbers, without reading the reference again."""
    if i3d is None and inception is None:
        raise ValueError("FVD / FID need --i3d and/or --inception")
    if class_dist not in CLASS_DISTS:
        raise ValueError(f"class_dist must be one of {', '.join(CLASS_DISTS)}, got {class_dist!r}")
    fps = export.video.fps if fps is None else fps
    accs = {}
    if i3d is not None:
        accs["fvd"] = fvd_accumulator(i3d, fvd_frames)
    if inception is not None:
        accs["fid"] = fid_accumulator(inception)
    reference_seed = sampling.seed if reference_seed is None else reference_seed
    items, chosen = reference_items(reference, export, num=num, seed=reference_seed, classes=classes, split=split)
    stats_file = reference_stats_file(Path(reference_stats), items, accs, frames, height, width, fps) \
        if reference_stats else None
    ref, skipped, ref_metrics = _reference_clips(reference, items, accs, stats_file, frames=frames, height=height,
                                                 width=width, fps=fps, batch_size=batch_size)
    reused = ref_metrics is not None
    gen_metrics: dict[str, list[float]] = {}
    ref_metrics = ref_metrics or {}
    use_text, use_cls, text_encoder = False, False, None  # --samples: nothing sampled
    if samples is None:
        use_text, use_cls, text_encoder = _fd_conditioning(model, ae, export, items, use_class, device, text_encoder)
    if class_dist != "reference" and not (use_cls and not use_text):
        raise ValueError(f"--class-dist {class_dist}: the generated clips' classes are drawn only for a DiT sampled "
                         "by class ids alone (with text, or from --samples, each clip keeps its reference's condition)")
    plan = _class_plan(items, class_dist, sampling.seed) if use_cls else []
    made: list[int] = []  # the class of each generated clip
    readable_now: list[int] = []  # the reference clips read now (none when reused)
    for batch in _batches(ref, batch_size):
        if not reused:
            real = torch.stack([x["video"] for x in batch])
            for acc in accs.values():
                acc.update("real", real, index=[x["index"] for x in batch])
            readable_now += [x["index"] for x in batch]
            _add_clip_metrics(ref_metrics, real)
        if samples is None:
            ids = [plan[x["index"]] for x in batch] if use_cls else None
            made += ids or []
            fake = generate(model, ae, export.latent_norm, prompts=[x["caption"] for x in batch] if use_text else None,
                            class_ids=ids, count=len(batch), frames=frames, height=height, width=width,
                            sampling=sampling, seeds=[sampling.seed + x["index"] for x in batch],  # clip i: seed + i
                            text_encoder=text_encoder, device=device, progress=False)
            for video in _as_batches(fake):
                for acc in accs.values():
                    acc.update("fake", video)
                _add_clip_metrics(gen_metrics, video)
    if samples is not None:
        samples_fps, gen_skipped = _read_samples(samples, accs, gen_metrics, num=num, frames=frames, height=height,
                                                 width=width, fps=fps, batch_size=batch_size)
    _merge_ranks(accs)  # every rank's clips; each list below in rank order
    skipped, made, readable_now = _gathered(skipped), _gathered(made), sorted(_gathered(readable_now))
    if not reused:  # else the kept values, sent to every rank
        ref_metrics = _gathered_metrics(ref_metrics)
    gen_metrics = _gathered_metrics(gen_metrics)
    if stats_file is not None and not reused and readable_now and dist.rank() == 0:
        save_reference_stats(stats_file, accs, readable_now, skipped, ref_metrics)
    if samples is not None:
        skipped += _gathered(gen_skipped)
    out = _fd_values(accs) | _clip_metric_results(ref_metrics, gen_metrics)
    out["reference"], out["read_fps"], out["reference_clips"] = reference, fps, chosen
    out["read"] = CLIP_READING
    if samples is not None:
        out["samples_read_fps"] = samples_fps
    if stats_file is not None:
        out["reference_stats"] = {"file": str(stats_file), "reused": reused}
    out["generated"] = samples or "sampled now: one per reference clip (its caption / class id)"
    if samples is None:
        out["sampling"] = dataclasses.asdict(sampling)
        out["conditioning"] = {"text": use_text, "class": use_cls}
        if use_cls:
            out["conditioning"].update(class_dist=class_dist, seed=sampling.seed,
                                       per_class=_per_class(made, export.class_names))
    out["skipped"] = skipped
    return out


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
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

    g = sub.add_parser("gen", help="generation quality of a trained DiT")
    g.add_argument("--checkpoint", required=True,
                   help="an `ldm train` run folder, its export/, or one of its checkpoints (RUN/checkpoints/step-N)")
    g.add_argument("--ae-checkpoint", help="autoencoder weights (default: recorded at extraction)")
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
                   help="stream long clips this many frames at a time (IV-VAE, H3AE, causal3d)")


def _metric_args(p: argparse.ArgumentParser, lpips: bool = True) -> None:
    if lpips:
        p.add_argument("--lpips-backbone", help="torchvision VGG16 / AlexNet weights file (e.g. vgg16-397923af.pth)")
        p.add_argument("--lpips-heads", help="the lpips package's linear heads (vgg.pth / alex.pth)")
        p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--i3d", help="FVD extractor file (default kind: i3d_torchscript.pt)")
    p.add_argument("--i3d-kind", default="i3d_torchscript", choices=I3D_KINDS)
    p.add_argument("--fvd-frames", type=int, default=FVD_FRAMES, help="frames per clip for FVD (reference: 16)")


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
    if not gen:
        check_min({"--frame-group": args.frame_group, "--group-start": args.group_start}, 0)
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps must be > 0, got {args.fps}")
    files = {"--i3d": args.i3d, "--inception": args.inception,
             **({} if gen else {"--lpips-backbone": args.lpips_backbone, "--lpips-heads": args.lpips_heads})}
    for flag, path in files.items():
        if path is not None and not Path(path).is_file():
            raise MissingInput(f"{flag} {path}: " + ("a folder; give the file itself" if Path(path).is_dir() else
                                                     "file not found"))
    if not gen:
        if args.native_size and (args.height is not None or args.width is not None):
            raise UserError("--native-size reads each clip at its own size; leave out --height/--width (or "
                            "--native-size to resize every clip to one size)")
        check_lpips_files(args.lpips_backbone, args.lpips_heads)
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
    items = _without_gif_twins(list_items(args.input, classes=args.classes, split=args.split))
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
    if not args.native_size:  # else each clip's size is checked as it is read (`native_size`)
        with checking(f"--frames {args.frames} --height {args.height} --width {args.width}"):
            ae.check_input(args.frames, args.height, args.width)
    with checking():
        configure_inference(ae, args.tile, args.chunk_frames)
    text_encoder = None
    if args.text_encoder:
        from ldm.text import build_text_encoder
        with checking("--text-encoder"):
            text_encoder = build_text_encoder(args.text_encoder, device=device)
    with checking():
        ae.check_text_encoder(text_encoder, args.text_encoder, name)
    result = evaluate_reconstruction(ae, args.input, args.frames, args.height, args.width, fps=args.fps, num=args.num,
                                     seed=None if args.first else args.seed, classes=args.classes, split=args.split,
                                     batch_size=args.batch_size, device=device, lpips=lpips, i3d=i3d,
                                     fvd_frames=args.fvd_frames, frame_group=args.frame_group,
                                     group_start=args.group_start, text_encoder=text_encoder, grid=args.grid,
                                     dtype=compute_dtype(args.dtype, device), inception=inception,
                                     first_frame=args.first_frame, native=args.native_size)
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
    from `_conditioning` / `check_suite_classes` / `reference_items`) before anything is written."""
    use_text, use_cls = False, False  # what --attributes and --reference condition on
    if (args.attributes or args.reference) and (model.config.text_dim or model.config.num_classes):
        use_text, use_cls = _conditioning(model, export, True if args.use_class else None)
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
                                     **common)
    if args.vbench:
        result["vbench"] = vbench_bridge(model, ae, export, out, info=info, dimensions=args.vbench_dimensions,
                                         per_prompt=args.vbench_per_prompt, frames=frames, height=height,
                                         width=width, fps=fps, vbench_python=args.vbench_python,
                                         vbench_results=args.vbench_results, gpus=args.vbench_gpus,
                                         max_prompts=args.vbench_max_prompts, replace=args.overwrite, **common)
    if dist.rank() == 0:
        atomic_write_json(out / "result.json", result)
    return result
