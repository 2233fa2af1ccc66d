"""How ``ldm train`` reads its batches: the batch size per shape bucket (`bucket_batch_sizes`),
where a resumed run's reader starts in the global stream (`resume_stream`), how the shard reader
processes start, and the `Prefetcher` thread that prepares the next micro-batches while the GPU
works. The mix of the data.shards folders (`data_mix`, `mix_rates`) is checked with the settings
(`launch/train_config.py`).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from data.manifest import Manifest
from launch.train_config import DataConfig

log = logging.getLogger("ldm.train")


READER_PREFETCH = 2  # batches each shard reader process keeps ready (DataLoader's default prefetch_factor)


def batch_bytes(manifest: Manifest, batch_size: int) -> int:
    """The bytes of one batch of ``batch_size`` a shard reader hands over, at most: float32 latents
    and their log-variances at the largest latent shape of the folders, and cached caption
    embeddings at the text encoder's full length (a manifest from before that was recorded: at the
    mean caption length, so about). With shape buckets give the largest bucket's batch size."""
    shapes = [manifest.parts] + [{k: tuple(v) for k, v in s.items()} for s in manifest.latent_shapes]
    latent = max(sum(math.prod(shape) for shape in parts.values()) for parts in shapes)
    text = (manifest.text_max_length or manifest.text_tokens) * (manifest.text_dim or 0)
    return batch_size * 4 * (2 * latent + text)


def reader_start(workers: int, device: torch.device) -> str | None:
    """How the shard reader processes start: spawned on CUDA (processes forked after CUDA / NCCL
    threads exist can deadlock), the platform's default (fork on Linux) elsewhere."""
    return "spawn" if workers and device.type == "cuda" else None


class Prefetcher:
    """Runs ``make(item)`` over ``source`` in a background thread, ``depth`` items ahead (pinned
    when ``pin``), so reading shards and drawing noise overlap the GPU's work. Errors in the
    thread are raised in the caller at the item where they happened. ``depth=0``: inline."""

    _END = object()

    def __init__(self, source, make, depth: int, pin: bool):
        import queue
        import threading

        self.source, self.make, self.pin, self.depth = iter(source), make, pin, depth
        if depth > 0:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._fill, name="ldm-prefetch", daemon=True)
            self.thread.start()

    def _one(self):
        item = self.make(next(self.source))
        return item.pin_memory() if self.pin else item

    def _fill(self) -> None:
        import queue

        while not self.stop.is_set():
            try:
                item = self._one()
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self):
        if self.depth == 0:
            return self._one()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self.depth > 0:
            self.stop.set()
            self.thread.join(timeout=5)


def bucket_batch_sizes(manifest: Manifest, dcfg_data: DataConfig, model) -> dict[str, int]:
    """Per-shape batch sizes for bucketed training. ``compute``: every bucket's batch costs the
    same DiT FLOPs, so ranks stepping on different shapes finish together and long clips do not
    stall the others. ``batch_size`` is the batch of the cheapest shape: a longer shape costs more
    per token (attention is quadratic in tokens), so its equal-cost batch has fewer tokens and
    needs no more activation memory than the cheapest shape's batch, which is the one to size to
    the GPU. A shape of which even one sample costs more than that batch gets 1 (warned: its
    steps take longer and need more memory). ``fixed``: ``batch_size`` for every shape. Explicit
    ``bucket_batch`` entries win."""
    sizes: dict[str, int] = {}
    if dcfg_data.bucket_sizing not in ("compute", "fixed"):
        raise ValueError(f"data.bucket_sizing must be compute or fixed, got {dcfg_data.bucket_sizing!r}")
    if dcfg_data.bucket_sizing == "compute":
        shapes = manifest.latent_shapes or (manifest.latent_spec["latent_shape"],)
        cost: dict[str, tuple[int, int]] = {}  # key -> (tokens, forward FLOPs) of one sample
        for parts in shapes:
            key = ";".join(f"{k}={'x'.join(map(str, v))}" for k, v in sorted(parts.items()))
            shape = {k: tuple(v) for k, v in parts.items()}
            cost[key] = model.num_tokens(shape), model.trunk_flops(shape)
        n_min, f_min = min(cost.values(), key=lambda c: c[1])
        budget = dcfg_data.batch_size * f_min  # the FLOPs of every step
        for key, (n, f) in cost.items():
            sizes[key] = max(1, int(budget / f))
            if f > budget:
                log.warning("bucket %s: one sample costs %.1fx the FLOPs of a step of the cheapest shape's batch "
                            "(%d x %d tokens) and has %.1fx its tokens: its steps take longer and need more memory; "
                            "raise data.batch_size or set data.bucket_batch", key, f / budget,
                            dcfg_data.batch_size, n_min, n / (dcfg_data.batch_size * n_min))
    sizes.update(dcfg_data.bucket_batch)
    log.info("batch size per shape bucket: %s", ", ".join(f"{k}: {b}" for k, b in sizes.items()))
    return sizes


def resume_stream(saved: dict[str, Any], stream: dict[str, Any], position: int, global_stream: bool
                  ) -> tuple[tuple[int, int], str | None]:
    """Where the reader of a run resumed from the checkpoint info ``saved`` starts
    (``LatentShards(start=...)``), and the line to print when data.shards changed since. The same
    latents (``stream["content"]``, at any path): the epoch in progress, from its first sample (the
    reader passes over the samples read, not every epoch before). Other latents (more clips
    extracted into the folder): a new epoch over all of them at ``position``; the rest of the
    epoch in progress is not read. From epoch 0: a checkpoint of an earlier version, or readers of
    their own shards (``global_stream=False``, data.split=shard), whose positions are their own."""
    old = saved.get("stream")
    if old is None:
        return (0, 0), None
    if old["content"] == stream["content"]:
        moved = (f"data.shards moved ({old['shards']} -> {stream['shards']}): the same latents (manifests, shard "
                 "names and sizes), read on from the same place") if old["shards"] != stream["shards"] else None
        in_epoch = global_stream and old["epoch_start"] <= position  # a bucket's first clip may be read ahead
        return ((old["epoch"], old["epoch_start"]) if in_epoch else (0, 0)), moved
    if not global_stream:
        return (0, 0), (f"data.shards holds other latents than at step {saved['step']} ({old['clips']} -> "
                        f"{stream['clips']} clips): each reader goes on after its share of the {position} samples "
                        "read, in the new stream")
    epoch = old["epoch"] + 1
    return (epoch, position), (f"data.shards holds other latents than at step {saved['step']} ({old['clips']} -> "
                               f"{stream['clips']} clips): epoch {epoch} starts at the next step over all of them "
                               f"(the rest of epoch {old['epoch']} is not read)")
