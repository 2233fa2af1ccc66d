"""The clips an evaluation reads (``ldm eval recon`` / ``gen``, `ldm compare`, `ldm cost --recon`).

Which videos (`choose_items`: a seeded random ``--num`` of a listing, GIF twins once), how each becomes a clip
(`iter_clips`: resized and center-cropped, `CLIP_READING`, or at its own size, `NATIVE_READING`; decoded in
DataLoader workers when given some, as ``ldm extract`` does), in batches of one shape (`clip_batches`), and
under torchrun / srun each rank's share (`rank_share`) with every rank's results put back together (`gathered`,
`merge_ranks`). `mean_std` is how a per-clip metric is summarised over clips.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autoencoders import Autoencoder
from data.sources import ItemList, VideoClipDataset, VideoItem, list_items
from data.video import UINT8_VALUES, VideoError, fit_shared_memory, uint8_to_float, upright_size
from launch import dist, runs
from launch.encode_loop import prefetch_per_worker
from launch.reconstruct import SIZE_MULTIPLES
from ldm.metrics import FrechetAccumulator

log = logging.getLogger("ldm.eval")


def without_gif_twins(listed: ItemList) -> ItemList:
    """``listed`` without a GIF beside a video of the same name (``ldm sample`` writes ``NNNN.mp4``
    + ``NNNN.gif``): the same clip, read once, from the video."""
    videos = {it.path.with_suffix("") for it in listed if it.path is not None and it.path.suffix.lower() != ".gif"}
    return ItemList([it for it in listed if it.path is None or it.path.suffix.lower() != ".gif"
                     or it.path.with_suffix("") not in videos], listed.problems, listed.class_names, listed.left_out)


def choose_items(input: str, *, num: int | None = None, seed: int | None = 0, classes: str | None = None,
                 split: str | None = None) -> tuple[ItemList, dict[str, Any]]:
    """The videos of ``input`` that an evaluation uses, and how they were chosen: the listing
    (``classes`` / ``split`` as `data.sources.list_items`, GIF twins once), then a random ``num`` of
    them seeded by ``seed`` and kept in listing order (sorted listings run class by class, so the
    first N would cover a few classes); the first ``num`` when ``seed`` is None; all when ``num`` is
    None or larger. The record says how many were listed and used, how, and the classes covered."""
    items = without_gif_twins(list_items(input, classes=classes, split=split))
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


# how `iter_clips` makes a clip of HxW from a video of another size (`data.video.resize_center_crop`), recorded
# with results
CLIP_READING = ("each frame resized to cover the clip size, aspect kept (bilinear, antialiased, on its 8-bit pixels), "
                "then center-cropped")
# how `iter_clips` reads a clip with ``native`` (``ldm eval recon --native-size``), recorded with results
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


def iter_clips(input: str, frames: int, height: int, width: int, fps: float | None, num: int | None,
               items: ItemList | None = None, native: Autoencoder | None = None, workers: int = 0,
               batch_size: int = 1, native_sizes: dict[str, tuple[int, int]] | None = None
               ) -> tuple[Iterable[dict[str, Any]], list[str], int]:
    """The clips of ``input`` (its first ``num``; GIF twins once, `without_gif_twins`), or of
    ``items`` when given (already chosen: ``num`` is not applied), in their order. ``native``: each clip at its
    own size, center-cropped to `native_size` for that autoencoder (``height`` / ``width`` unused), with its
    ``source_size``; a video no size of which the autoencoder takes is skipped; ``native_sizes`` (a video's
    ``source`` -> its size as shown, read already: `eval_recon._by_size`) spares a second look at those videos.
    ``workers`` > 0: decoded by that many DataLoader processes (fewer when the shared memory they hand clips over
    in holds less, `data.video.fit_shared_memory`, with ``native`` measured at the largest clip of
    ``native_sizes``; said once), about two batches of ``batch_size`` ahead, each clip sent as its 8-bit pixels
    (`uint8_to_float` makes them the same float32 clip, bit for bit)."""
    if items is None:
        items = without_gif_twins(list_items(input))
        if num:
            items = ItemList(items[:num], items.problems, items.class_names)
    if not items:
        raise ValueError(f"no videos found in {input}")
    known = native_sizes or {}
    reads = _Reads(VideoClipDataset(items, frames, height, width, fps), native, known)
    skipped: list[str] = list(getattr(items, "problems", []))
    if workers:
        crops = [native_size(native, frames, *known[it.source]) for it in items if it.source in known] if native else []
        clip_bytes = 3 * frames * (height * width if native is None else max((h * w for h, w in crops), default=0))
        workers, fewer = fit_shared_memory(workers, lambda w: w * prefetch_per_worker(batch_size, 1, w) * clip_bytes,
                                           dist.local_ranks(dist.dist_env()))
        if fewer and dist.rank() == 0:
            log.warning("ldm eval: %s", fewer)

    def gen():
        got: Iterable[dict[str, Any] | str] = (reads[i] for i in range(len(reads)))
        if workers:
            got = torch.utils.data.DataLoader(reads, batch_size=None, num_workers=workers,
                                              worker_init_fn=runs.reader_ignores_interrupts,  # the main process stops
                                              prefetch_factor=prefetch_per_worker(batch_size, 1, workers))
        for x in got:
            if isinstance(x, str):
                skipped.append(x)
            else:
                yield {**x, "video": uint8_to_float(x["video"], UINT8_VALUES)}
    return gen(), skipped, len(items)


class _Reads(torch.utils.data.Dataset):
    """`iter_clips`' reading of video ``i``: its clip's fields with the clip's uint8 pixels and ``index`` (its
    place in the items), or why it gives none (``"source: reason"``)."""

    def __init__(self, data: VideoClipDataset, native: Autoencoder | None, known: dict[str, tuple[int, int]]):
        self.data, self.native, self.known = data, native, known  # known: sizes as shown, by source

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any] | str:
        data = self.data
        try:
            if self.native is None:
                return {**data.read(i, data.frames, data.height, data.width, uint8=True), "index": i}
            item = data.items[i]
            src_h, src_w = self.known.get(item.source) or upright_size(item.readable())
            h, w = native_size(self.native, data.frames, src_h, src_w)
            clip = data.read(i, data.frames, src_h, src_w, uint8=True)  # its own size: no resize
            return {**clip, "video": center_crop(clip["video"], h, w).contiguous(), "index": i,
                    "source_size": [src_h, src_w]}
        except (VideoError, ValueError) as e:
            return f"{data.items[i].source}: {e}"


def center_crop(video: Tensor, height: int, width: int) -> Tensor:
    """The center ``height x width`` of ``(..., H, W)`` frames."""
    top, left = (video.shape[-2] - height) // 2, (video.shape[-1] - width) // 2
    return video[..., top:top + height, left:left + width]


def clip_batches(it: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
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


def rank_share(input: str, frames: int, height: int, width: int, fps: float | None, items: ItemList,
               batch_size: int, native: Autoencoder | None = None, workers: int = 0,
               native_sizes: dict[str, tuple[int, int]] | None = None) -> tuple[Iterable[dict[str, Any]], list[str]]:
    """`iter_clips` of this rank's share of ``items`` (decoded by ``workers`` processes, 0: in this one; with
    ``native``, ``native_sizes`` as there): every world_size-th batch of ``batch_size`` of them (all of them on one
    rank), each clip's ``index`` its place in ``items``; the listing's problems go with rank 0's skipped list."""
    if not items:
        raise ValueError(f"no videos found in {input}")
    mine = rank_indices(len(items), batch_size)
    share = ItemList([items[i] for i in mine], items.problems if dist.rank() == 0 else [], items.class_names)
    if not share:
        return iter(()), list(share.problems)
    clips, skipped, _ = iter_clips(input, frames, height, width, fps, None, share, native, workers, batch_size,
                                   native_sizes)
    return ({**x, "index": mine[x["index"]]} for x in clips), skipped


def rank_indices(n: int, batch_size: int) -> list[int]:
    """The indices (of ``n`` clips) that this rank takes: every world_size-th batch of ``batch_size``."""
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return [i for b in dist.shard_list(batches, dist.rank(), dist.world_size()) for i in b]


def merge_ranks(accs: dict[str, FrechetAccumulator]) -> None:
    """Every rank's statistics merged (in rank order) into ``accs`` on every rank; nothing on one rank."""
    if dist.world_size() == 1:
        return
    states = dist.all_gather_object({name: acc.state() for name, acc in accs.items()})
    for name, acc in accs.items():
        acc.merge_states([s[name] for s in states])


def gathered(values: list) -> list:
    """Every rank's ``values``, one list in rank order (``values`` itself on one rank)."""
    return [v for part in dist.all_gather_object(values) for v in part]


def mean_std(x: list[float]) -> dict[str, float]:
    """A per-clip metric over the clips: ``mean`` / ``std`` of its finite values (inf / 0 when none is), ``n``
    clips and how many were ``infinite`` (a perfect reconstruction's PSNR)."""
    a = np.asarray(x, dtype=np.float64)
    finite = a[np.isfinite(a)]
    return {"mean": float(finite.mean()) if finite.size else float("inf"),
            "std": float(finite.std()) if finite.size else 0.0, "n": int(a.size), "infinite": int(a.size - finite.size)}
