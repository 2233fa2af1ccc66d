"""``ldm eval gen --reference``: FVD / FID of a DiT's clips against reference clips (`generation_fd`).

Fréchet distances (float64, unbiased covariances, streaming statistics; the features and the protocols live in
``ldm.metrics``) between features of reference clips and of as many generated clips (sampled with the reference
clips' captions or class ids; a random ``--num`` of the reference clips, seeded; a class-only DiT draws the classes
like the reference set or, ``--class-dist uniform``, in equal shares, recorded in the result; ``--classes`` /
``--split`` read a class-per-folder reference such as UCF-101's test split, its classes matched to the DiT's by
name, `reference_items`). FVD follows the reference protocol: the first 16 frames, each resized bilinearly to
224x224 (no crop) after quantising to [0, 255], mapped to [-1, 1], I3D Kinetics-400 logits; the default extractor is
the TorchScript ``i3d_torchscript.pt`` (StyleGAN-V's port of the TF-Hub I3D, called with ``rescale=False,
resize=False, return_features=True``); ``--i3d-kind torchscript`` takes any TorchScript module mapping the same
input to features (e.g. a scripted VideoMAE-v2 for content-debiased FVD). FID uses every frame through the
TorchScript Inception of StyleGAN2-ADA (``inception-2015-12-05.pt``: uint8 frames, ``return_features=True``, 2048-d
pool features). The extractor's file name and sha256, N and T are recorded with every value, with a
``small_sample`` warning below the protocol's N (biased upward) and, for FVD, the FVD between two halves of the
reference clips (``reference_split_half``: about a perfect model's score at that N). ``--reference-stats DIR``
keeps the reference statistics for the next evaluation of the same clips under the same protocol (another
checkpoint: FVD over training; `reference_stats_file`). Beside them the per-clip statistics of `GEN_CLIP_METRICS`
on each side (``frame_change``: how much clips change from frame to frame, in grey levels).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autoencoders import Autoencoder
from data.sources import ItemList, VideoItem, class_index, list_items
from dit import Export
from launch import dist
from launch.eval_clips import (CLIP_READING, choose_items, clip_batches, gathered, mean_std, merge_ranks,
                               rank_indices, rank_share, without_gif_twins)
from launch.sample import dit_conditioning, generate, sampling_text_encoder
from ldm.checkpoint import load_tensors, save_tensors
from ldm.errors import UserError
from ldm.metrics import (FVD_FRAMES, Extractor, FrechetAccumulator, fid_accumulator, frame_change,
                         fvd_accumulator)
from ldm.samplers import SamplingConfig


# The per-clip statistics of ``ldm eval gen --reference``: name -> (function of clips ``(B, C, T, H, W)`` in
# [-1, 1] to one value per clip ``(B,)``, the fewest frames it needs). Each is measured on every reference and
# generated clip; ``fd.<name>`` holds `mean_std` of each side. To add one: write the function in
# `ldm.metrics`, add its line here, describe it in README's evaluation section.
GEN_CLIP_METRICS = {"frame_change": (frame_change, 2)}


def _as_batches(videos: Tensor | list[Tensor]) -> list[Tensor]:
    """``generate``'s output as ``(B, C, T, H, W)`` batches (a variable-length list, one clip each)."""
    return [videos] if isinstance(videos, Tensor) else [v[None] for v in videos]


CLASS_DISTS = ("reference", "uniform")  # how `generation_fd` draws the classes of the generated clips


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


REFERENCE_STATS_VERSION = 2  # raise when the reading or the feature protocol changes what the statistics hold
# (2: frames resized on their 8-bit pixels)


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
    weights' sha256 included), with the clip metrics it holds (a metric added to `GEN_CLIP_METRICS`
    gives another file, so its reference side is measured): ``<sha256 of all that>.safetensors``."""
    key = {"version": REFERENCE_STATS_VERSION, "clips": [_item_stamp(it) for it in items], "frames": frames,
           "height": height, "width": width, "fps": fps,
           "features": {name: acc.describe() for name, acc in sorted(accs.items())},
           "clip_metrics": sorted(GEN_CLIP_METRICS)}
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
                     frames: int, height: int, width: int, fps: float | None, batch_size: int, workers: int
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
        ref, skipped = rank_share(reference, frames, height, width, fps, items, batch_size, workers=workers)
        return ref, skipped, None
    readable, skipped, clip_metrics = cached
    mine = set(rank_indices(len(items), batch_size))
    ref = iter([{"key": items[i].key, "caption": items[i].caption or "", "index": i,  # a clip's fields, no video
                 "class_id": -1 if items[i].class_id is None else items[i].class_id}
                for i in readable if i in mine])
    return ref, skipped if dist.rank() == 0 else [], clip_metrics


def _read_samples(samples: str, accs: dict[str, FrechetAccumulator], clip_metrics: dict[str, list[float]], *,
                  num: int | None, frames: int, height: int, width: int, fps: float | None, batch_size: int,
                  workers: int) -> tuple[float | None, list[str]]:
    """Add this rank's share of the ``samples`` folder's clips (its first ``num``) to the generated side of
    ``accs`` and their `GEN_CLIP_METRICS` to ``clip_metrics``; the rate they were read at and the skipped ones.
    An `ldm sample` folder (``index.json``) is read frame by frame: each file frame is a DiT frame, whatever
    ``--fps`` it was written at."""
    samples_fps = None if (Path(samples) / "index.json").is_file() else fps
    listed = without_gif_twins(list_items(samples))
    listed = ItemList(listed[:num], listed.problems, listed.class_names) if num else listed
    gen, skipped = rank_share(samples, frames, height, width, samples_fps, listed, batch_size, workers=workers)
    for batch in clip_batches(gen, batch_size):
        fake = torch.stack([x["video"] for x in batch])
        for acc in accs.values():
            acc.update("fake", fake)
        _add_clip_metrics(clip_metrics, fake)
    return samples_fps, skipped


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
    """``{name: {"reference": mean_std, "generated": mean_std}}`` of the sides that measured it."""
    return {name: {side: mean_std(values[name]) for side, values in (("reference", reference),
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
    """(text, class, text encoder): what `generation_fd` samples each reference clip's twin from (`dit_conditioning`;
    both False for an unconditional DiT); `ValueError` for a clip without the class id that the DiT needs."""
    use_text, use_cls = False, False  # an unconditional DiT, sampled unconditionally
    if model.config.text_dim or model.config.num_classes:
        use_text, use_cls = dit_conditioning(model, export, use_class)
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
                  reference_seed: int | None = None, text_encoder=None, workers: int = 0) -> dict[str, Any]:
    """FVD / FID between the reference clips (`reference_items`: a random ``num`` of them, seeded by
    ``reference_seed``, by default ``sampling.seed``) and generated ones: the given ``samples`` folder (its first
    ``num``), or one sample per reference clip from its caption (text DiT) or class (``use_class``: also with text,
    as `dit_conditioning`). A class-conditional DiT samples each reference clip's class (``class_dist="reference"``:
    the generated classes follow the reference set's) or the reference set's classes in equal shares
    (``"uniform"``); the result records which, with the clips per class. The noise of clip i is the same on every
    run (seed + i, any batch size or number of ranks), so a rerun gives the same value. Under several ranks each
    samples and reads every world_size-th batch of clips, the statistics are merged (`merge_ranks`) and every rank
    returns the same result; ``reference_stats`` is read and written by rank 0 alone. Reference (and ``samples``)
    clips are read at ``fps``, by default the rate the DiT's training clips were resampled to
    (``export.video.fps``; None: the videos' own), so both sides have the same motion per frame; an `ldm sample`
    folder (``index.json``) is read frame by frame, whatever playback ``--fps`` it was written at. With
    ``reference_stats`` (a folder), the reference features' statistics are kept there (`reference_stats_file`)
    and reused by a later evaluation against the same clips under the same protocol, e.g. another checkpoint of
    the run: the same numbers, without reading the reference again. ``workers``: the processes that decode the
    videos read (`rank_share`; 0: this one)."""
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
                                                 width=width, fps=fps, batch_size=batch_size, workers=workers)
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
    for batch in clip_batches(ref, batch_size):
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
                                                 width=width, fps=fps, batch_size=batch_size, workers=workers)
    merge_ranks(accs)  # every rank's clips; each list below in rank order
    skipped, made, readable_now = gathered(skipped), gathered(made), sorted(gathered(readable_now))
    if not reused:  # else the kept values, sent to every rank
        ref_metrics = _gathered_metrics(ref_metrics)
    gen_metrics = _gathered_metrics(gen_metrics)
    if stats_file is not None and not reused and readable_now and dist.rank() == 0:
        save_reference_stats(stats_file, accs, readable_now, skipped, ref_metrics)
    if samples is not None:
        skipped += gathered(gen_skipped)
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
