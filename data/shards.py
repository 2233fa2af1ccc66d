"""Latent shards: WebDataset tars of encoded clips, their manifest, and the reader the trainer uses.

One sample per clip, members (raw bytes, nothing pickled):

    <key>.latent.safetensors   parts + ``logvar.<part>`` + ``aux.<name>``; metadata {"form": ...}
    <key>.text.safetensors     cached text embedding ``emb (L, D)`` (valid tokens only), optional
    <key>.json                 source key, caption, class id, fps/frames/height/width
    <key>.txt / <key>.cls      caption / class id, for other WebDataset tools

Keys are the video's index in the sorted input list (``%09d``), plus ``_<first frame>`` (``%06d``)
for a window that does not start at frame 0 (`clip_key`; several clips per video), so they never
contain dots or paths and never depend on ranks, workers or batch size; the source key, and for
several clips per video the window (``clip``, ``start_frame``, ``start_s``), are in the JSON. Shard
``j`` holds the clips of the videos ``[j*S, (j+1)*S)`` of the sorted input list, whatever the number
of ranks, so a rerun (even with another world size) finds the same shard names. A shard is
written to ``.shard-j.tar.tmp`` and renamed when complete; its sidecar ``shard-j.json`` (counts,
skipped inputs, channel statistics) is written after the rename and marks the shard done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds
from braceexpand import braceexpand
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor
from webdataset.tariterators import group_by_keys, tar_file_expander

from ldm.errors import UserError
from ldm.latent import Latent, channel_dim

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
_KEY_RE = re.compile(r"^\d{9}(_\d{6,})?$")


def clip_key(index: int, start: int = 0) -> str:
    """A clip's sample key: its video's index in the sorted input list, and the window's first
    output frame when that is not 0 (``000000042``, ``000000042_000034``); sorts in clip order."""
    return f"{index:09d}" if start == 0 else f"{index:09d}_{start:06d}"


class SampleError(ValueError):
    """A shard sample that cannot be used (missing member, bad tensor, unsafe name)."""


# ------------------------------------------------------------------------------------------
# sample encoding / decoding
# ------------------------------------------------------------------------------------------
def encode_sample(latent: Latent, meta: dict[str, Any], text_emb: Tensor | None = None) -> dict[str, bytes]:
    """Serialise one clip (``latent`` with batch size 1) into WebDataset members (bytes only)."""
    if latent.batch_size != 1:
        raise ValueError(f"encode_sample takes one clip, got batch {latent.batch_size}")
    tensors = {k: v[0] for k, v in latent.parts.items()}
    tensors.update({f"logvar.{k}": v[0] for k, v in latent.logvar.items()})
    tensors.update({f"aux.{k}": v[0] for k, v in latent.aux.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    out = {"latent.safetensors": st_save(tensors, metadata={"form": latent.form}),
           "json": json.dumps(meta, sort_keys=True).encode()}
    if meta.get("caption") is not None:
        out["txt"] = str(meta["caption"]).encode()
    if meta.get("class_id") is not None:
        out["cls"] = str(int(meta["class_id"])).encode()
    if text_emb is not None:
        out["text.safetensors"] = st_save({"emb": text_emb.detach().cpu().float().contiguous()})
    return out


def _form_of(blob: bytes) -> str:
    # safetensors header: 8-byte little-endian length, then JSON with "__metadata__"
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or n > len(blob) - 8:
        raise SampleError("latent member is not a safetensors blob")
    return json.loads(blob[8:8 + n]).get("__metadata__", {}).get("form", "grid")


def decode_sample(raw: dict[str, Any], expect_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Turn raw members into ``dict(latent=Latent (batch 1), cond=dict, meta=dict)``.

    Raises SampleError for anything unusable: a missing member, a name with a path, a tensor with
    NaN/Inf, or (when ``expect_shapes`` is given) a part of the wrong shape. Varlen parts may differ
    in their time axis only.
    """
    key = raw.get("__key__", "")
    if not _KEY_RE.match(os.path.basename(key)) or "/" in key or ".." in key:
        raise SampleError(f"unsafe or unexpected member name {key!r}")
    for member in ("latent.safetensors", "json"):
        if member not in raw:
            raise SampleError(f"sample {key}: missing member .{member}")
    blob = raw["latent.safetensors"]
    try:
        form = _form_of(blob)
        tensors = st_load(blob)
        meta = json.loads(raw["json"])
    except SampleError:
        raise
    except Exception as e:  # safetensors/JSON parse errors of many kinds
        raise SampleError(f"sample {key}: unreadable member ({type(e).__name__}: {e})") from e
    parts, logvar, aux = {}, {}, {}
    for name, t in sorted(tensors.items()):  # safetensors returns them in a random (hash) order
        if name.startswith("logvar."):
            logvar[name[7:]] = t[None]
        elif name.startswith("aux."):
            aux[name[4:]] = t[None]
        else:
            parts[name] = t[None]
    for name, t in list(parts.items()) + list(logvar.items()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SampleError(f"sample {key}: part {name!r} has NaN/Inf")
    if expect_shapes is not None:
        for name, shape in expect_shapes.items():
            got = tuple(parts[name].shape[1:]) if name in parts else None
            if got is None:
                raise SampleError(f"sample {key}: missing part {name!r}")
            if form == "varlen" and len(got) == len(shape):
                got, shape = got[:1] + got[2:], tuple(shape[:1]) + tuple(shape[2:])
            if got != tuple(shape):
                raise SampleError(f"sample {key}: part {name!r} has shape {got}, expected {tuple(shape)}")
    cond: dict[str, Any] = {"caption": meta.get("caption") or "",
                            "class_id": -1 if meta.get("class_id") is None else int(meta["class_id"])}
    if "text.safetensors" in raw:
        try:
            cond["text_emb"] = st_load(raw["text.safetensors"])["emb"]
        except Exception as e:
            raise SampleError(f"sample {key}: unreadable text embedding ({e})") from e
    try:
        latent = Latent(parts, form, logvar, aux)
    except ValueError as e:
        raise SampleError(f"sample {key}: {e}") from e
    return {"latent": latent, "cond": cond, "meta": meta}


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------
def write_shard(path: str | Path, samples: list[dict[str, bytes]], keys: list[str]) -> None:
    """Write a complete shard atomically with ``webdataset.TarWriter`` (raw bytes, fixed mtime so
    reruns are byte-identical): temp name first, renamed when closed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=0.0) as tw:
                for key, sample in zip(keys, samples):
                    tw.write({"__key__": key, **sample})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, I/O error: no partial file under any name
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"writing shard {path} failed: {e.strerror or e}; nothing was left under its "
                               "name, rerun the same command to resume") from e


SUM_KEYS = ("m", "m2", "var")  # `channel_sums`' rows: posterior mean, its square, exp(logvar)


def channel_sums(latent: Latent) -> dict[str, tuple[torch.Tensor, int]]:
    """Per floating part of a grid or token-set ``latent`` (or one trimmed varlen sample,
    ``Latent.unbatch``'s): the float64 per-channel sums of `ChannelStats` as a ``(k, c)`` tensor on
    the latent's device (rows `SUM_KEYS`, the last only when the part has a log-variance) and the
    element count per channel. Reduced where the latent is, without a copy per part: on a GPU a
    batch's statistics come back as a few numbers."""
    if latent.form == "varlen" and latent.batch_size != 1:  # padded frames would bias the statistics
        raise ValueError("channel_sums takes a batch of grid or token-set latents, or one varlen sample "
                         "(Latent.unbatch); ChannelStats.update takes varlen batches")
    out = {}
    for name, x in latent.parts.items():
        if not x.is_floating_point():
            continue
        cdim = channel_dim(x)
        dims = tuple(d for d in range(x.ndim) if d != cdim)
        rows = [x.sum(dims, dtype=torch.float64), x.square().sum(dims, dtype=torch.float64)]
        if name in latent.logvar:
            rows.append(latent.logvar[name].exp().sum(dims, dtype=torch.float64))
        out[name] = (torch.stack(rows), x.numel() // x.shape[cdim])
    return out


@dataclass
class ChannelStats:
    """Running per-channel sums (float64) of latent parts, mergeable across shards and ranks.

    Per part it keeps, per channel: sum and sum of squares of the posterior mean, the sum of the
    posterior variance ``exp(logvar)`` (when the part has one), and the element count. ``summary``
    gives ``mean``/``std`` of the posterior mean and ``sample_std``, the std of posterior SAMPLES
    (``sqrt(var(mean) + E[exp(logvar)])``), which is what a trainer sampling z should divide by.
    """

    sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # part -> {"m", "m2", "var"}
    counts: dict[str, int] = field(default_factory=dict)

    def update(self, latent: Latent) -> None:
        items = latent.unbatch() if latent.form == "varlen" else [latent]  # padded frames would bias stats
        for lat in items:
            self.add_sums(channel_sums(lat))

    def add_sums(self, sums: dict[str, tuple[torch.Tensor, int]]) -> None:
        """Add `channel_sums`' output (read on the host here)."""
        for name, (rows, count) in sums.items():
            self._add(name, dict(zip(SUM_KEYS, rows.tolist())), count)

    def _add(self, name: str, new: dict[str, list[float]], count: int) -> None:
        old = self.sums.setdefault(name, {})
        for k, v in new.items():
            old[k] = [a + b for a, b in zip(old[k], v)] if k in old else list(v)
        self.counts[name] = self.counts.get(name, 0) + count

    def merge(self, other: "ChannelStats") -> None:
        for name, sums in other.sums.items():
            self._add(name, sums, other.counts[name])

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, s in self.sums.items():
            n = max(self.counts[name], 1)
            mean = [v / n for v in s["m"]]
            var = [max(q / n - m * m, 0.0) for q, m in zip(s["m2"], mean)]
            post = [v / n for v in s["var"]] if "var" in s else [0.0] * len(var)
            out[name] = {"mean": mean, "std": [math.sqrt(v) for v in var],
                         "sample_std": [math.sqrt(v + p) for v, p in zip(var, post)], "count": self.counts[name]}
        return out

    def to_json(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    @classmethod
    def from_json(cls, d: dict) -> "ChannelStats":
        return cls(d["sums"], d["counts"])


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
def shard_urls(spec: str | Path | list[str]) -> list[str]:
    """Shard paths from a directory (its ``shard-*.tar``, sorted), one tar, a brace pattern
    ``dir/shard-{000000..000009}.tar``, or a comma-separated list of any of these."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in shard_urls(s)]
    spec = str(spec)
    if "," in spec and "{" not in spec:
        return shard_urls(spec.split(","))
    p = Path(spec)
    if p.is_dir():
        urls = sorted(str(x) for x in p.iterdir() if _SHARD_RE.match(x.name))
        if not urls:
            raise FileNotFoundError(f"no shard-*.tar files in {p}")
        return urls
    urls = list(braceexpand(spec))
    missing = [u for u in urls if not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return urls


def iter_shard(url: str, counters: Counter | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar (dicts of member bytes), via webdataset's tar iterators. A truncated
    or unreadable tar ends its iteration with a logged, counted error instead of killing the run."""
    try:
        with open(url, "rb") as f:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": f}]))
    except Exception as e:  # tarfile.ReadError, EOFError, OSError on truncated data...
        log.warning("shard %s: stopped reading (%s: %s)", url, type(e).__name__, e)
        if counters is not None:
            counters["bad_shard"] += 1


class LatentShards(torch.utils.data.IterableDataset):
    """Stream latent samples (``dict(latent, cond, meta)``), or collated batches with ``batch_size``.

    ``split="sample"`` (default): every reader walks the same GLOBAL stream -- shards permuted per
    epoch, then a shuffle buffer of ``shuffle`` samples, both seeded by (seed, epoch) -- and keeps its
    own chunks: the stream is cut into chunks of ``batch_size`` samples, chunk c belongs to rank
    ``c % world_size`` and, within the rank, to DataLoader worker ``(c // world_size - k) % workers``
    (``k``: the rank's chunks that ``skip`` passes, so its first chunk is worker 0's, which the
    loader reads first).
    A ``DataLoader(batch_size=None, collate_fn=as_batched)`` over this dataset hands rank r the
    chunks r, r+W, r+2W, ... in order, so after s steps the run has consumed exactly the first
    ``s * batch_size * world_size`` samples of the global stream, whatever the topology: ``skip``
    is that global count, and a resume with another number of ranks (same global batch) continues at the same place. Each sample is
    seen once per epoch across ranks, and its ``meta["position"]`` (its place in the stream, counting
    on across epochs) can seed its randomness. Bad samples are skipped and counted in
    ``self.skipped`` (their chunk comes out one smaller).

    ``split="shard"``: readers take whole shards round-robin and read nothing else (I/O scales with
    the data, not ranks x data); the shuffle buffer is per reader and ``skip`` is shared evenly
    among readers, so a resume is exact only on the same topology with ``num_workers=0``.
    ``resample=True``: each reader draws shards with replacement, forever. ``epochs=None``: endless.

    ``urls`` as a list of folders (or tar specs) with ``rates``: folder i's clips are read ``rates[i]``
    times per epoch (data mixing: `_epoch_urls`); every sample's ``meta["source"]`` is its folder's
    index. ``start=(epoch, position)``: the global stream begins at that epoch, whose first sample
    is at ``position`` (``meta["epoch"]`` / ``meta["epoch_start"]`` of a sample read before), so a
    resume reads the epoch in progress only, not every epoch before it (``split="sample"``, with or
    without buckets).
    """

    def __init__(self, urls: str | list[str], *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: int = 0, epochs: int | None = 1, resample: bool = False, split: str = "sample",
                 expect_shapes: dict[str, tuple[int, ...]] | None = None, skip: int = 0,
                 batch_size: int | None = None, buckets: dict[str, int] | None = None,
                 rates: tuple[float, ...] = (), start: tuple[int, int] = (0, 0)):
        super().__init__()
        if split not in ("shard", "sample"):
            raise ValueError(f"split must be 'shard' or 'sample', got {split!r}")
        specs = [urls] if isinstance(urls, (str, Path)) else list(urls)
        if rates and len(rates) != len(specs):
            raise ValueError(f"{len(rates)} rates for {len(specs)} shard folders")
        # (urls, rate) per source: a source's clips are read ``rate`` times per epoch (see _epoch_urls)
        self.sources = [(shard_urls(s), float(r)) for s, r in zip(specs, rates or [1.0] * len(specs))]
        self.urls = [u for group, _ in self.sources for u in group]
        self._source_of = {}
        for i, (group, _) in enumerate(self.sources):
            for u in group:
                self._source_of.setdefault(u, i)
        self.start = start
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.epochs, self.resample, self.split = shuffle, epochs, resample, split
        self.expect_shapes, self.skip, self.batch_size, self.buckets = expect_shapes, skip, batch_size, buckets
        self.skipped: Counter = Counter()
        self._tried = self._decoded = 0  # samples this reader read / decoded (an endless stream must decode some)

    def _decode(self, raw: dict[str, Any], epoch: int, position: int, epoch_start: int = 0) -> dict[str, Any] | None:
        self._tried += 1
        try:
            sample = decode_sample(raw, self.expect_shapes)
        except SampleError as e:
            self.skipped["bad_sample"] += 1
            log.warning("skipping sample: %s", e)
            return None
        sample["meta"].update(epoch=epoch, position=position, epoch_start=epoch_start,
                              source=self._source_of[raw["__url__"]])
        self._decoded += 1
        return sample

    def _emit(self, batch: list[dict[str, Any]]) -> Any:
        return collate(batch) if self.batch_size else batch[0]

    def _epochs(self, n_readers: int = 1, first: int = 0) -> Iterator[int]:
        """``first``, ``first + 1``, ... (up to ``epochs``, or endless). An endless stream stops with a
        `UserError` once this reader, in more passes than there are readers + 1, read samples and could
        decode none of them: every sample is bad or of another shape, and the trainer would wait for a
        batch forever."""
        epoch, barren, tried, decoded = first, 0, self._tried, self._decoded
        while self.epochs is None or epoch < self.epochs:
            yield epoch
            epoch += 1
            if self._decoded > decoded:
                barren = 0
            elif self._tried > tried:  # a pass with this reader's turn, and nothing read well
                barren += 1
            tried, decoded = self._tried, self._decoded
            if self.epochs is None and barren > n_readers + 1:
                raise UserError(f"none of the {self._tried} samples read from {len(self.urls)} shard(s) in {barren} "
                                f"passes could be used (skipped: {dict(self.skipped)}; see the warnings above): the "
                                "shards are corrupt or not the latents their manifest describes")

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if self.buckets is not None:
            yield from self._bucketed(workers, worker)
        elif self.split == "sample" and not self.resample:
            yield from self._global_chunks(workers, worker)
        else:
            yield from self._own_shards(self.rank * workers + worker, self.world_size * workers)

    def _epoch_urls(self, epoch: int) -> list[str]:
        """The shards of one epoch, before their shuffle: each source's shards ``int(rate)`` times,
        plus for the fraction of its rate a share of its shards drawn anew each epoch (seeded by
        (seed, epoch); the shard count rounded up or down at random, so on average a source's clips
        are read ``rate`` times per epoch). With every rate 1, each shard once, as without rates."""
        rng = random.Random(f"{self.seed}-{epoch}-mix")
        urls: list[str] = []
        for group, rate in self.sources:
            share = (rate - int(rate)) * len(group)  # shards beyond the whole copies
            extra = int(share) + int(rng.random() < share - int(share))
            urls += group * int(rate) + rng.sample(group, extra)
        return urls

    def _global_stream(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The raw samples of one epoch in the order every reader agrees on."""
        urls = self._epoch_urls(epoch)
        random.Random(f"{self.seed}-{epoch}").shuffle(urls)
        stream = (raw for url in urls for raw in iter_shard(url, self.skipped))
        if self.shuffle > 1:
            stream = _shuffled(stream, self.shuffle, random.Random(f"{self.seed}-{epoch}-buf"))
        return stream

    def _global_chunks(self, workers: int, worker: int) -> Iterator[Any]:
        size = self.batch_size or 1
        first_epoch, position = self.start
        batch = []
        # the loader asks worker 0 first: the rank's first chunk after ``skip`` is worker 0's
        resumed_at = self.skip // (size * self.world_size)
        for epoch in self._epochs(self.world_size * workers, first_epoch):
            epoch_start = position
            for raw in self._global_stream(epoch):
                chunk = position // size
                if (position >= self.skip and chunk % self.world_size == self.rank
                        and (chunk // self.world_size - resumed_at) % workers == worker):
                    sample = self._decode(raw, epoch, position, epoch_start)
                    if sample is not None:
                        batch.append(sample)
                position += 1
                if position % size == 0 and batch:
                    yield self._emit(batch)
                    batch = []
        if batch:
            yield self._emit(batch)

    def _bucketed(self, workers: int, worker: int) -> Iterator[Any]:
        """Shape buckets: the global stream is dealt sample by sample to the readers, and each
        reader batches samples of one latent shape together (``shape_key``), a bucket's batch size
        coming from ``buckets`` (default ``batch_size``). Ranks may step on different shapes at
        once; ``skip`` (global) is shared evenly among readers, so a resume is approximate."""
        reader, n_readers = self.rank * workers + worker, self.world_size * workers
        first_epoch, position = self.start
        skip, own = self.skip // n_readers, max(position - reader + n_readers - 1, 0) // n_readers  # dealt before
        pending: dict[str, list[dict[str, Any]]] = {}
        for epoch in self._epochs(n_readers, first_epoch):
            epoch_start = position
            for raw in self._global_stream(epoch):
                if position % n_readers == reader:
                    sample = self._decode(raw, epoch, position, epoch_start) if own >= skip else None
                    own += 1
                    if sample is not None:
                        key = shape_key(sample["latent"])
                        bucket = pending.setdefault(key, [])
                        bucket.append(sample)
                        if len(bucket) >= self.buckets.get(key, self.batch_size or 1):
                            yield self._emit(bucket)
                            pending[key] = []
                position += 1
        for bucket in pending.values():
            if bucket:
                yield self._emit(bucket)

    def _own_shards(self, reader: int, n_readers: int) -> Iterator[Any]:
        size = self.batch_size or 1
        skip, position, batch = self.skip // n_readers, 0, []
        for epoch in self._epochs(n_readers):
            urls = list(self.urls)
            if self.resample:
                rng = random.Random(f"{self.seed}-{reader}")
                stream = (raw for _ in iter(int, 1) for raw in iter_shard(rng.choice(urls), self.skipped))
            else:
                random.Random(f"{self.seed}-{epoch}").shuffle(urls)
                if len(urls) < n_readers:
                    raise ValueError(f"split='shard' needs at least {n_readers} shards (ranks x workers), "
                                     f"found {len(urls)}; use split='sample'")
                stream = (raw for url in urls[reader::n_readers] for raw in iter_shard(url, self.skipped))
            if self.shuffle > 1:
                stream = _shuffled(stream, self.shuffle, random.Random(f"{self.seed}-{epoch}-{reader}-buf"))
            for raw in stream:
                if position >= skip:
                    sample = self._decode(raw, epoch, position)
                    if sample is not None:
                        batch.append(sample)
                position += 1
                if len(batch) == size:
                    yield self._emit(batch)
                    batch = []
        if batch:
            yield self._emit(batch)


def shape_key(latent: Latent) -> str:
    """A latent's shape bucket, e.g. ``"z=4x5x8x8"`` (per-sample shapes of every part)."""
    return ";".join(f"{k}={'x'.join(map(str, v.shape[1:]))}" for k, v in sorted(latent.parts.items()))


def _shuffled(stream: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for x in stream:
        buf.append(x)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def as_batched(batch: dict[str, Any]) -> dict[str, Any]:
    """The ``collate_fn`` of a ``DataLoader(batch_size=None)`` over ``LatentShards(batch_size=...)``:
    its batches are already collated. (The default, ``default_convert``, rebuilds a `Latent` from
    its parts alone: the posterior ``logvar``, the ``form`` and the varlen lengths were lost.)"""
    return batch


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples from ``LatentShards``: latents via ``Latent.collate`` (varlen padded),
    captions as a list, class ids as a tensor, cached text embeddings padded with a mask."""
    cond: dict[str, Any] = {"caption": [s["cond"]["caption"] for s in samples],
                            "class_id": torch.tensor([s["cond"]["class_id"] for s in samples])}
    if all("text_emb" in s["cond"] for s in samples):
        embs = [s["cond"]["text_emb"] for s in samples]
        n = max(max(e.shape[0] for e in embs), 1)
        cond["text_emb"] = torch.stack([torch.cat([e, e.new_zeros(n - e.shape[0], e.shape[1])]) for e in embs])
        cond["text_mask"] = torch.stack([torch.arange(n) < e.shape[0] for e in embs])
    return {"latent": Latent.collate([s["latent"] for s in samples]), "cond": cond,
            "meta": [s["meta"] for s in samples]}


def read_all(path: str | Path) -> list[dict[str, Any]]:
    """Every sample of an extraction folder in key order (video, then window; for tests,
    verification and small sets)."""
    samples = [decode_sample(raw) for url in shard_urls(path) for raw in iter_shard(url)]
    return sorted(samples, key=lambda s: (s["meta"]["index"], s["meta"].get("start_frame", 0)))


def raw_bytes_digest(path: str | Path) -> dict[str, str]:
    """sha256 of every shard file in a folder: equal digests = byte-identical shard sets."""
    return {Path(u).name: hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in shard_urls(path)}


def content_fingerprint(folders: list[str]) -> str:
    """What the latents of extraction ``folders`` are, whatever their path: a hash of each folder's
    ``manifest.json`` bytes and the names and sizes of its shards, in order (cheap: no shard is
    read). A copy of the folders elsewhere (node-local disk, another file system) has the same."""
    h = hashlib.sha256()
    for folder in folders:
        h.update(hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).digest())
        h.update(json.dumps([[Path(u).name, Path(u).stat().st_size] for u in shard_urls(folder)]).encode())
    return h.hexdigest()[:16]
