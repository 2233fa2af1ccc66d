"""``ldm eval recon``'s evaluation: how well an autoencoder reconstructs clips (`evaluate_reconstruction`).

Each clip is encoded and decoded; the per-clip metrics of `RECON_METRICS` (PSNR, SSIM: Gaussian 11 / 1.5, data
range 2, LPIPS: torchvision backbone + the lpips package's linear heads, both user files, FloLPIPS: LPIPS weighted
by where the motion differs, with a user's optical-flow network, and the temporal error:
frame-to-frame change unlike the clip's; IV-VAE's information preservation degree; a variable-rate autoencoder's
VCPR and keyframe accuracy, MTC-VAE's ``rate_report``) are computed by `ldm.metrics.reconstruction_scores` and
summarised here; rFVD and rFID compare the originals with their reconstructions (rFID: every frame, eval gen's
Inception). Optionally decoded with each clip's first frame (``--first-frame``, H3AE's I2V reconstruction),
optionally SSIM per frame position inside a frame group (`position_ssim`: IV-VAE Fig. 1b, a causal 4x-temporal VAE
reconstructs the frames of each group of 4 unequally), optionally each clip at its own size (``--native-size``),
and a grid PNG. The flags and the JSON file are `launch.evaluate`'s.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autoencoders import Autoencoder
from data.sources import ItemList
from data.video import VideoError, upright_size
from launch import dist
from launch.eval_clips import (CLIP_READING, NATIVE_READING, center_crop, choose_items, clip_batches, gathered,
                               mean_std, merge_ranks, native_size, rank_share)
from launch.train_ae import save_grid
from ldm.errors import UserError
from ldm.latent import Cond
from ldm.metrics import (FVD_FRAMES, LPIPS, Extractor, FrechetAccumulator, fid_accumulator, fvd_accumulator,
                         information_preservation, reconstruction_scores)


# The per-clip metrics of ``ldm eval recon``: the result's key -> the entry of
# `ldm.metrics.reconstruction_scores` (or, for a variable-rate autoencoder, of its ``rate_report``: `_rate_scores`)
# it summarises. A clip's value is the mean of its entry (an entry per frame is averaged over the clip's frames);
# the result holds mean / std / n / infinite over the clips (`mean_std`). An entry that a run does not compute
# (``lpips`` without LPIPS files, ``vcpr`` of a fixed-rate autoencoder) leaves its key out of the result.
# To add a metric: compute it in `reconstruction_scores`, add its line here, describe it in README's evaluation.
RECON_METRICS = {"psnr_db": "psnr", "ssim": "ssim_per_frame", "lpips": "lpips", "flolpips": "flolpips",
                 "temporal_error": "temporal_error", "info_preservation": "info_preservation", "vcpr": "vcpr",
                 "keyframe_accuracy": "keyframe_accuracy"}
SSIM_PROTOCOL = "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 2 ([-1, 1]), per frame, averaged"


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


def _by_size(items: ItemList, ae: Autoencoder, frames: int
             ) -> tuple[ItemList, list[int], dict[str, tuple[int, int]]]:
    """``items`` ordered by the size they are evaluated at (`native_size`; one that cannot be read or taken first:
    it is skipped when read), for each place in that order the item's place in ``items``, and each video's size as
    shown (its ``source`` -> ``(height, width)``; those that are evaluated), which the reading takes instead of
    looking again (`iter_clips`): clips of one size come one after another, batched together (a look at each
    video's first frame)."""
    shown: dict[str, tuple[int, int]] = {}

    def size(item) -> tuple[int, int]:
        try:
            source_size = upright_size(item.readable())
            crop = native_size(ae, frames, *source_size)
        except (VideoError, ValueError):
            return (0, 0)
        shown[item.source] = source_size
        return crop
    sizes = [size(item) for item in items]
    order = sorted(range(len(items)), key=sizes.__getitem__)
    return ItemList([items[i] for i in order], items.problems, items.class_names, items.left_out), order, shown


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
                       first_frame: bool = False, flow_net: Extractor | None = None) -> _ReconPass:
    """Encode + decode ``clips`` batch by batch (``first_frame``: the decoder also gets each clip's first frame,
    image-to-video reconstruction): each clip's scores, rFVD's and rFID's features, the first ``grid_clips``
    clips for the grid and the seconds spent encoding and decoding."""
    done = _ReconPass(rows=[], shown=[])
    for batch in clip_batches(clips, batch_size):
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
        scores = reconstruction_scores(x, y, lpips, flow_net)
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
    return _ReconPass(rows=sorted(gathered(done.rows), key=lambda r: r["index"]),
                      shown=sorted(gathered(done.shown), key=lambda s: s[0])[:grid_clips],
                      encode_s=sum(gathered([done.encode_s])), decode_s=sum(gathered([done.decode_s])))


def recon_metrics(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each `RECON_METRICS` key that ``rows`` (one per clip, `reconstruction_scores` entries) hold: `mean_std`
    over the clips of each clip's value (its entry, averaged over frames)."""
    return {key: mean_std([float(r[entry].double().mean()) for r in rows])
            for key, entry in RECON_METRICS.items() if rows and entry in rows[0]}


def _size_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How many clips were evaluated at each size (``sizes``) and had each size as shown (``source_sizes``),
    ``"HxW"`` (``--native-size``)."""
    out: dict[str, dict[str, int]] = {"sizes": {}, "source_sizes": {}}
    for key, field in (("sizes", "size"), ("source_sizes", "source_size")):
        for h, w in (r[field] for r in rows):
            out[key][f"{h}x{w}"] = out[key].get(f"{h}x{w}", 0) + 1
    return out


@torch.no_grad()
def evaluate_reconstruction(ae: Autoencoder, input: str, frames: int, height: int | None, width: int | None, *,
                            fps: float | None = None, num: int | None = None, seed: int | None = None,
                            classes: str | None = None, split: str | None = None, batch_size: int = 4,
                            device: str | torch.device = "cpu", lpips: LPIPS | None = None,
                            i3d: Extractor | None = None, fvd_frames: int = FVD_FRAMES,
                            frame_group: int = 0, group_start: int = 0, text_encoder=None,
                            grid: str | Path | None = None, grid_clips: int = 4,
                            dtype: torch.dtype = torch.float32, inception: Extractor | None = None,
                            first_frame: bool = False, native: bool = False, workers: int = 0,
                            flow_net: Extractor | None = None) -> dict[str, Any]:
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
    as their extractors resize every frame (FVD: to 224x224; Inception: inside the network). ``workers``: the
    processes that decode the videos (`rank_share`; 0: this one). ``flow_net`` (with ``lpips``): FloLPIPS too
    (`ldm.metrics.flolpips`, clips of 2 frames or more)."""
    device = torch.device(device)
    ae = ae.to(device=device, dtype=dtype).eval()
    if not native:
        ae.check_input(frames, height, width)
    ae.check_text_encoder(text_encoder)
    if first_frame and not ae.first_frame_decoding:
        raise ValueError(f"{ae.family} does not decode with a first frame (H3AE does): no image-to-video "
                         "reconstruction")
    items, chosen = choose_items(input, num=num, seed=seed, classes=classes, split=split)
    order, shown = list(range(len(items))), None
    if native:
        items, order, shown = _by_size(items, ae, frames)
    clips, skipped = rank_share(input, frames, height, width, fps, items, batch_size,  # all of them on one rank
                                ae if native else None, workers, shown)
    clips = ({**c, "index": order[c["index"]]} for c in clips)  # its place among the chosen clips
    rfvd = fvd_accumulator(i3d, fvd_frames) if i3d is not None else None
    rfid = fid_accumulator(inception) if inception is not None else None
    done = _reconstruct_clips(ae, clips, batch_size=batch_size, device=device, dtype=dtype, lpips=lpips, rfvd=rfvd,
                              text_encoder=text_encoder, grid_clips=grid_clips, rfid=rfid, first_frame=first_frame,
                              flow_net=flow_net)
    merge_ranks({k: acc for k, acc in {"rfvd": rfvd, "rfid": rfid}.items() if acc is not None})
    done, skipped = _gathered_pass(done, grid_clips), gathered(skipped)
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
    if "flolpips" in result:
        result["flolpips"].update(net=lpips.net, flow_net=flow_net.path.name, flow_net_sha256=flow_net.sha256)
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
            save_grid(torch.stack([center_crop(x, h, w) for x, _ in shown]),
                      torch.stack([center_crop(y, h, w) for _, y in shown]), Path(grid), max_frames=min(frames, 8))
        result["grid"] = str(grid)
    return result
