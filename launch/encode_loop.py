"""The encode loop of ``ldm extract``: this rank's clips decoded by a DataLoader, encoded on the
device in batches and serialised into shard buffers, which a background thread hands to the shard
writer (`launch.extract` writes the tar and its sidecar).

`plan_units` cuts the videos into loader items (a video's windows, WINDOWS_PER_READ at a time);
`encode_shards` runs the loop: `_ShardEncoder` keeps one batch on its way to the host while the
next is encoded, and `_sample_meta` is each sample's JSON. Batches never span shards. The loop
measures how long it waited for decoded clips; `decoding_limit` says when that limited the run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch
from tqdm import tqdm

from autoencoders import Autoencoder
from data import shards
from data.sources import VideoClipDataset
from data.video import UINT8_VALUES, VideoError, Window, Windows, uint8_to_float
from launch import runs
from ldm.latent import Cond, Latent

if TYPE_CHECKING:
    from launch.extract import ExtractConfig, ExtractRun

log = logging.getLogger("ldm.extract")


WINDOWS_PER_READ = 16  # windows of one video decoded together (one loader item): bounds memory on long videos
# clips leave the decoding workers as uint8 (resized or not), made float32 by `_ShardEncoder.to_float`: a
# quarter of the bytes through shared and pinned memory and the copy to the device, the same floats
UINT8_CLIPS = True
Unit = tuple[int, "list[Window] | str"]  # a video and some of its windows, or why it gives none


class _Plans(torch.utils.data.Dataset):
    """Each video's windows (from its header), or the reason it gives none."""

    def __init__(self, clips: VideoClipDataset, indices: list[int], windows: Windows):
        self.clips, self.indices, self.windows = clips, indices, windows

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Unit:
        try:
            return self.indices[i], self.clips.plan(self.indices[i], self.windows)
        except VideoError as e:
            return self.indices[i], str(e)


def plan_units(clips: VideoClipDataset, indices: list[int], windows: Windows, workers: int,
               held: Callable[[], ContextManager] = contextlib.nullcontext) -> list[Unit]:
    """The loader items for videos ``indices``: their windows in groups of WINDOWS_PER_READ, or one
    item with the reason a video gives none. The first frames only need no look at the files; other
    windows come from the headers, read by ``workers`` processes (started and read inside ``held()``,
    as in `encode_shards`)."""
    plans: Any = ((i, clips.plan(i, windows)) for i in indices)
    if not windows.first_only:
        with held():
            plans = iter(torch.utils.data.DataLoader(_Plans(clips, indices, windows), batch_size=1,
                                                     num_workers=workers, collate_fn=_first,
                                                     worker_init_fn=runs.reader_ignores_interrupts))
        plans = _each_held(plans, held)
    units: list[Unit] = []
    for idx, plan in plans:
        if isinstance(plan, str):
            units.append((idx, plan))
        else:
            units += [(idx, plan[k:k + WINDOWS_PER_READ]) for k in range(0, len(plan), WINDOWS_PER_READ)]
    return units


_END = object()


def _each_held(items: Iterator, held: Callable[[], ContextManager]) -> Iterator:
    """The items of ``items`` (a loader's), each taken inside ``held()``."""
    while True:
        with held():
            item = next(items, _END)
        if item is _END:
            return
        yield item


class _Clips(torch.utils.data.Dataset):
    """Per loader item (a group of units, `group_units`), its decoded clips or the reason each could not be
    decoded (so workers never kill the run), packed (`_pack`); with ``uint8`` each clip is its uint8 pixels
    (`data.video.read_clips_timed`)."""

    def __init__(self, clips: VideoClipDataset, groups: list[list[Unit]], uint8: bool):
        self.clips, self.groups, self.uint8 = clips, groups, uint8

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _pack([clip for unit in self.groups[i] for clip in self._decode(unit)])

    def _decode(self, unit: Unit) -> list[dict[str, Any]]:
        idx, windows = unit
        if isinstance(windows, str):
            return [{"index": idx, "window": None, "error": windows}]
        try:
            got: list = self.clips.read_windows(idx, windows, uint8=self.uint8)
        except VideoError as e:
            got = [e] * len(windows)
        return [{"index": idx, "window": w, **({"error": str(g)} if isinstance(g, VideoError) else g)}
                for w, g in zip(windows, got)]


# A loader item carries up to ITEM_CLIPS clips (and ITEM_BYTES of pixels; at least one clip) in one tensor.
# Each tensor a worker hands over costs the main process a round trip to that worker (its shared memory's
# file descriptor is fetched from the worker's resource-sharer thread, which waits for the worker's GIL while
# it decodes): 0.9 ms of the main process a clip with a busy worker on the 2-core CPU machine, 0.15 with 8
# clips a tensor. A fast encoder feels it: h3ae (446 clips/s) extracted ~100 clips/s on an H100 with 15
# workers and one clip a tensor, though it waited for decoding only 15 % of the time.
ITEM_CLIPS = 8
ITEM_BYTES = 32 * 2**20


def clips_per_item(batch_size: int, clip_bytes: int) -> int:
    """How many clips one loader item gathers: ITEM_CLIPS, fewer for a smaller batch or large clips."""
    return max(1, min(ITEM_CLIPS, batch_size, ITEM_BYTES // max(clip_bytes, 1)))


def group_units(units: list[Unit], per_item: int) -> list[list[Unit]]:
    """``units`` in order, cut into loader items of consecutive units holding at most ``per_item`` clips
    together (a unit with more, a long video's windows, is an item of its own)."""
    groups: list[list[Unit]] = []
    n = per_item  # clips in the last group: full, so the first unit opens one
    for unit in units:
        k = 1 if isinstance(unit[1], str) else len(unit[1])
        if n + k > per_item:
            groups.append([])
            n = 0
        groups[-1].append(unit)
        n += k
    return groups


def _pack(clips: list[dict[str, Any]]) -> dict[str, Any]:
    """One loader item: the clips' pixels stacked in one tensor (``pixels``; allocated in shared memory in a
    worker, so handing it over copies nothing more) and each clip's fields with its ``slot`` in it."""
    videos = [c.pop("video") for c in clips if "error" not in c]
    pixels = None
    if videos:
        if any(v.shape != videos[0].shape for v in videos):
            raise ValueError(f"clips of one extraction differ in shape: {sorted({tuple(v.shape) for v in videos})}")
        pixels = torch.empty((len(videos), *videos[0].shape), dtype=videos[0].dtype)
        if torch.utils.data.get_worker_info() is not None:
            pixels.share_memory_()
        torch.stack(videos, out=pixels)
    slots = iter(range(len(videos)))
    for c in clips:
        if "error" not in c:
            c["slot"] = next(slots)
    return {"pixels": pixels, "clips": clips}


def _unpack(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The clips of a loader item (`_pack`), each with its ``video`` (a view of the item's pixels)."""
    pixels = item["pixels"]
    for c in item["clips"]:
        yield c if "error" in c else {**c, "video": pixels[c.pop("slot")]}


def _first(batch: list[Any]) -> Any:
    return batch[0]


def ae_cond(ae: Autoencoder, emb: torch.Tensor | None, mask: torch.Tensor | None,
             device: torch.device, dtype: torch.dtype = torch.float32) -> Cond | None:
    """``cond`` for encode/decode: the caption embeddings for a text-guided autoencoder, else None."""
    if not ae.text_dim:
        return None
    return Cond(text=emb.to(device, dtype), text_mask=mask.to(device))


@dataclass
class ShardBuffer:
    """What one shard collects before it is written."""

    index: int
    samples: list[dict[str, bytes]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stats: shards.ChannelStats = field(default_factory=shards.ChannelStats)
    text_tokens: int = 0
    captions_cut: int = 0  # captions that fill the text encoder's max_length: cut to it (or exactly as long)
    class_counts: dict[int, int] = field(default_factory=dict)  # written clips per class id
    source_fps: dict[str, int] = field(default_factory=dict)  # written clips per source frame rate ("24", "29.97")
    variable_rate: list[str] = field(default_factory=list)  # keys of the inputs with a variable frame rate


@torch.no_grad()
def encode_shards(run: ExtractRun, units: list[Unit], batch_size: int, workers: int, bar: tqdm,
                  write: Callable[[ShardBuffer], None], held: Callable[[], ContextManager] = contextlib.nullcontext
                  ) -> tuple[int, float | None, float, dict[str, float]]:
    """Encode the clips of ``units`` (`plan_units`: this rank's shards, in order) and hand each
    shard to ``write`` when its last clip is done.

    One DataLoader decodes every clip of this rank (``workers`` processes, pinned memory on a GPU)
    while the encoder runs; finished shards are written by a background thread, so tar writing
    overlaps the next shard's encoding. Batches never span shards. Returns the clips handled, when
    (``time.perf_counter()``) the first batch went to the encoder (None if none did) and the seconds
    after that the loop waited for the loader's decoded clips: the rest of its time went to encoding
    and handing off (`_ShardEncoder.add`, whose wait for the batch before on a GPU is the device's
    time), so a large share of waiting means decoding limits the run; and the seconds the loop spent
    in each part of that (`_ShardEncoder.spent`). No device sync is added.

    The loader's workers start, and each item is received from them, inside ``held()``
    (`launch.extract._StopOnSigterm.held`): a stop waits for the fork or the item being received,
    then the workers are shut down before the stop goes on (they exit cleanly, with no exchange left
    half done)."""
    loader = _clip_loader(run, units, batch_size, workers)
    encoder = _ShardEncoder(run, batch_size, write)
    with held():  # the workers are forked here: a stop raised in the fork's handlers was "ignored", with a traceback
        decoded = iter(loader)
    decode_wait = 0.0
    try:
        while True:
            asked = time.perf_counter()
            with held():
                item = next(decoded, None)  # blocks while the clips are being decoded
            if encoder.first_queued is not None:  # the wait for the first batch is the fill, reported apart
                decode_wait += time.perf_counter() - asked
            if item is None:
                break
            for clip in _unpack(item):
                bar.update(1)
                encoder.add(clip)
        encoder.finish()
    finally:  # on an error or a stop too: the shards handed to the writer are completed (temp name, then rename)
        del decoded  # the workers shut down now, not when the exception's frames go at exit
        encoder.writer.shutdown(wait=True)
    return encoder.handled, encoder.first_queued, decode_wait, dict(encoder.spent)


DECODE_BOUND_SHARE = 0.25  # the loop waited for decoded clips this share of its steady time or more: said


def decoding_limit(summary: dict[str, Any], encoded: int, cores: int, device: torch.device) -> str | None:
    """One line when decoding limited the run on a GPU: the encode loop waited for decoded clips at
    least DECODE_BOUND_SHARE of its time after the first batch (over 3 batches or more), with the
    figures and what to do; None when the encoder was the limit, and on the CPU (there decoding and
    encoding share the cores: 0 workers is its default on purpose, more workers are no cure)."""
    share, workers = summary["decode_wait_share"], summary["num_workers"]
    if (device.type == "cpu" or share is None or share < DECODE_BOUND_SHARE
            or encoded < 3 * summary["batch_size"]):
        return None
    # the workers that would decode as fast as the encoder encodes, if decoding scales with them: the
    # encoder was busy 1 - share of the time; without workers the main process decoded for `share` of it
    busy = max(1.0 - share, 0.01)
    need = max(workers + 1, math.ceil(workers / busy if workers else share / busy))
    if need <= cores:
        advice = f"give --num-workers {need}"
    elif workers < cores:
        advice = f"give --num-workers {cores} and more CPU cores per rank"
    else:
        advice = "give each rank more CPU cores"
    return (f"decoding limited this extraction: after the first batch the encoder waited for decoded clips "
            f"{share:.0%} of the time on rank 0 ({workers} decoding worker(s), {cores} CPU core(s) per rank); "
            f"about {need} worker{'s' if need > 1 else ''} would keep it busy: {advice}")


def prefetch_per_worker(batch_size: int, clips_per_item: int, workers: int) -> int:
    """Loader items each decoding worker keeps ready: together about 2 encoder batches of clips, and
    at least 2 each (one being decoded, one waiting). Was 2 batches per worker: 16 workers at GPU
    batch 64 held ~2,000 clips of 17x256x256 (25 GB of shared memory in float32) per rank."""
    return max(2, -(-2 * batch_size // (clips_per_item * workers)))


def clip_bytes(cfg: ExtractConfig) -> int:
    """The bytes of one decoded clip as the workers hand it over."""
    return 3 * cfg.frames * cfg.height * cfg.width * (1 if UINT8_CLIPS else 4)


def loader_items(units: list[Unit], batch_size: int, clip_bytes: int) -> list[list[Unit]]:
    """The loader items of ``units`` at this batch size and clip size (`group_units`)."""
    return group_units(units, clips_per_item(batch_size, clip_bytes))


def mean_clips(groups: list[list[Unit]]) -> int:
    """The clips a loader item holds on average (at least 1)."""
    clips = sum(1 if isinstance(w, str) else len(w) for g in groups for _, w in g)
    return max(1, round(clips / max(len(groups), 1)))


def bytes_in_flight(workers: int, batch_size: int, per_item: int, clip_bytes: int) -> int:
    """The bytes of decoded clips ``workers`` processes keep ready (`prefetch_per_worker` loader items of
    ``per_item`` clips each, `mean_clips`), in the shared memory they hand them over in:
    `data.video.fit_shared_memory`'s measure for ``ldm extract``."""
    return workers * prefetch_per_worker(batch_size, per_item, workers) * per_item * clip_bytes


def _clip_loader(run: ExtractRun, units: list[Unit], batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """The decoded clips of ``units``, several units a loader item (`loader_items`), about 2 batches ahead in
    all (pinned on a GPU)."""
    groups = loader_items(units, batch_size, clip_bytes(run.cfg))
    return torch.utils.data.DataLoader(_Clips(run.clips, groups, UINT8_CLIPS), batch_size=1, num_workers=workers,
                                       collate_fn=_first, pin_memory=run.device.type == "cuda",
                                       worker_init_fn=runs.reader_ignores_interrupts,  # the main process stops
                                       prefetch_factor=prefetch_per_worker(batch_size, mean_clips(groups), workers)
                                       if workers else None)


class _ShardEncoder:
    """The encode loop's state: the clips waiting for a batch (``pending``), the batch whose latents
    are on their way to the host (``in_flight``), the shard being filled (``buf``) and the background
    writer of finished shards (it calls ``write``). ``add`` takes the clips in shard order; ``finish``
    writes the last shard and waits for every write."""

    def __init__(self, run: ExtractRun, batch_size: int, write: Callable[[ShardBuffer], None]):
        self.run, self.batch_size, self.write = run, batch_size, write
        self.cuda = run.device.type == "cuda"
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.written: list[Future] = []
        self.pending: list[dict[str, Any]] = []
        self.buf: ShardBuffer | None = None
        self.handled = 0
        self.first_queued: float | None = None  # when the first batch went to the encoder
        self.in_flight: list[tuple[ShardBuffer, list[dict[str, Any]], Latent, dict | None, tuple | None, Any]] = []
        self.warned_cut = False  # a caption cut to the text encoder's length was reported
        self.uint8_values = UINT8_VALUES.to(run.device)  # copied once: a copy from pageable memory may wait
        # a compiled encoder has one graph for one shape (`Autoencoder.compile_encode`): a shorter batch (a
        # shard's last) is padded to the full one with copies of its last clip, their latents dropped
        self.pad_to = batch_size if run.ae.encode_compiled else 0
        # the loop's host seconds by part: queue (stack, encode and copies queued: on a GPU the encoder's
        # launch time), device_wait (for the batch before: the device's time), store (statistics, samples)
        self.spent = {"queue": 0.0, "device_wait": 0.0, "store": 0.0}

    def add(self, clip: dict[str, Any]) -> None:
        """One decoded clip (or the reason it could not be): a new shard starts when its index says so."""
        self.handled += 1
        j = clip["index"] // self.run.cfg.shard_size
        if self.buf is None or self.buf.index != j:
            if self.buf is not None:
                self.finish_shard()
            self.buf = ShardBuffer(j)
        if "error" in clip:
            w, key = clip["window"], self.run.items[clip["index"]].key
            where = {} if self.run.windows.first_only or w is None else {"clip": w.clip, "start_frame": w.start}
            self.buf.skipped.append({"key": key, **where, "reason": clip["error"]})
            log.warning("skipping %s%s: %s", key, f" (window at frame {w.start})" if where else "", clip["error"])
            return
        self.pending.append(clip)
        if len(self.pending) >= self.batch_size:
            self.encode_pending()

    def finish(self) -> None:
        """The last shard to the writer, then every write waited for (a failed one raises)."""
        if self.buf is not None:
            self.finish_shard()
        for f in self.written:
            f.result()

    def encode_pending(self) -> None:
        """Queue the pending clips' encode and the copy of their latents back to the host, then store
        the batch queued before: on a GPU the host serialises one batch while the device encodes the
        next (nothing waits but the copy of the batch being stored)."""
        if not self.pending:
            return
        t0 = time.perf_counter()
        run, cuda = self.run, self.cuda
        device, dtype, text_encoder = run.device, run.dtype, run.text_encoder
        batch = list(self.pending)
        self.pending.clear()
        if self.first_queued is None:
            self.first_queued = time.perf_counter()
        # page-locked clips (DataLoader pin_memory) copy asynchronously; stacked on the device as they came
        # (uint8: a quarter of float32's bytes), then made float32 at once (on the CPU a float32 stack of
        # 8 clips of 17x256x256 copied 107 MB a batch)
        video = self.to_float(torch.stack([p["video"].to(device, non_blocking=True) for p in batch])).to(dtype)
        emb, mask, text = None, None, None
        if text_encoder is not None:
            emb, mask = text_encoder.encode([p["caption"] for p in batch])
            text = (emb.to("cpu", non_blocking=cuda), mask.to("cpu", non_blocking=cuda))
        cond = ae_cond(run.ae, emb, mask, device, dtype)
        if len(batch) < self.pad_to:
            latent = first_clips(run.ae.encode(*padded(video, cond, self.pad_to)), len(batch))
        else:
            latent = run.ae.encode(video, cond)
        latent = latent.to(dtype=torch.float32)
        host = latent.to("cpu", non_blocking=cuda)  # into page-locked memory on CUDA
        # the batch's per-channel statistics reduced where it is (varlen rows: on the host, one at a time)
        sums = None if latent.form == "varlen" else {
            k: (rows.to("cpu", non_blocking=cuda), n) for k, (rows, n) in shards.channel_sums(latent).items()}
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        self.spent["queue"] += time.perf_counter() - t0
        self.store_batch()
        self.in_flight.append((self.buf, batch, host, sums, text, copied))

    def to_float(self, clips: torch.Tensor) -> torch.Tensor:
        """Decoded clips on the device, float32 in [-1, 1]: uint8 ones (`UINT8_CLIPS`) become there the
        float32 clips the decoder would have given, bit for bit (`data.video.uint8_to_float`)."""
        return uint8_to_float(clips, self.uint8_values)

    def store_batch(self) -> None:
        """Serialise the queued batch into its shard buffer once its latents are on the host."""
        if not self.in_flight:
            return
        into, batch, latent, sums, text, copied = self.in_flight.pop()
        t0 = time.perf_counter()
        if copied is not None:
            copied.synchronize()
        t1 = time.perf_counter()
        self.spent["device_wait"] += t1 - t0
        if text is not None:
            text = self._cached_text(into, batch, *text)
        if sums is not None:
            into.stats.add_sums(sums)
        else:
            into.stats.update(latent)
        items, windows = self.run.items, self.run.windows
        for b, (p, lat) in enumerate(zip(batch, latent.unbatch())):
            item = items[p["index"]]
            rate = "unknown" if p["source_fps"] is None else f"{_rate(p['source_fps']):g}"
            into.source_fps[rate] = into.source_fps.get(rate, 0) + 1
            if p["variable_rate"] and item.key not in into.variable_rate:
                into.variable_rate.append(item.key)
            if p["class_id"] >= 0:
                into.class_counts[p["class_id"]] = into.class_counts.get(p["class_id"], 0) + 1
            meta = _sample_meta(p, item, self.run.cfg, self.run.signature, windows)
            into.samples.append(shards.encode_sample(lat, meta, None if text is None else text[b]))
            into.keys.append(shards.clip_key(p["index"], p["window"].start))
        self.spent["store"] += time.perf_counter() - t1

    def _cached_text(self, into: ShardBuffer, batch: list[dict[str, Any]], emb: torch.Tensor,
                     mask: torch.Tensor) -> list[torch.Tensor]:
        """Each clip's caption embedding as cached in the shard, counted into ``into``; a caption cut to
        the text encoder's length is reported once per process."""
        # valid tokens only, (L_i, D); a clip without a caption caches none: it trains the DiT's null text
        # (condition dropout's, what --unconditional and guidance sample with), not the empty caption's tokens
        text = [e[m] if p["caption"] else e[:0] for e, m, p in zip(emb, mask, batch)]
        into.text_tokens += sum(t.shape[0] for t in text)
        cut = [p for p, full in zip(batch, mask.all(1).tolist()) if full and p["caption"]]
        if cut and not self.warned_cut:  # once per process, at the first
            self.warned_cut = True
            text_encoder = self.run.text_encoder
            log.warning("captions longer than the text encoder's %d tokens are cut to them (%s; first: %s): %d "
                        "tokens, the rest unseen; the count is in the summary", text_encoder.max_length,
                        text_encoder.spec, self.run.items[cut[0]["index"]].key,
                        text_encoder.token_counts([cut[0]["caption"]])[0])
        into.captions_cut += len(cut)
        return text

    def finish_shard(self) -> None:
        """The shard being filled, its last batch stored, handed to the background writer."""
        self.encode_pending()
        self.store_batch()
        for f in self.written:  # a failed write (disk full) stops the run at the next shard
            if f.done():
                f.result()
        self.written.append(self.writer.submit(self.write, self.buf))


def padded(video: torch.Tensor, cond: Cond | None, size: int) -> tuple[torch.Tensor, Cond | None]:
    """``video`` (``B C T H W``) and its ``cond`` (caption embeddings) filled up to ``size`` clips with
    copies of the last one."""
    def fill(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])

    if cond is not None:
        cond = Cond(text=fill(cond.text), text_mask=fill(cond.text_mask))
    return fill(video), cond


def first_clips(latent: Latent, n: int) -> Latent:
    """The first ``n`` samples of a batched ``latent`` (every part, log-variance and aux)."""
    first = lambda d: {k: v[:n] for k, v in d.items()}  # noqa: E731
    return Latent(first(latent.parts), latent.form, first(latent.logvar), first(latent.aux))


def _sample_meta(p: dict[str, Any], item, cfg: ExtractConfig, signature: dict[str, Any],
                 windows: Windows) -> dict[str, Any]:
    """The JSON of one clip's sample (``<key>.json``): its video, caption, class and the clip spec."""
    w = p["window"]
    meta = {"index": p["index"], "key": item.key, "caption": p["caption"] or None,
            "class_id": None if p["class_id"] < 0 else p["class_id"], "fps": cfg.fps,
            "frames": cfg.frames, "height": cfg.height, "width": cfg.width,
            "autoencoder": signature["autoencoder"], "source_fps": _rate(p["source_fps"])}
    if item.class_name is not None:
        meta["class_name"] = item.class_name
    if not windows.first_only:  # several clips per video: which window this is
        meta.update(clip=w.clip, start_frame=w.start, start_s=round(w.start_s, 6))
    return meta


def _rate(fps: float | None) -> float | None:
    """A source frame rate as recorded (3 decimals: 29.97, not 29.97002997)."""
    return None if fps is None else round(fps, 3)
