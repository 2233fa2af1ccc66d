"""What each ``ldm train-ae`` step trains on: an endless, resumable stream of batches for this rank
(`epoch_batches`: a seeded permutation per epoch split over ranks; `PositionSampler`: from a saved
``(epoch, batch)``, each batch at its step's bucket shape; `SkipBad`: an unreadable clip becomes an
error record; `carried_position`: where ranks of another topology resume), and which steps train
on the clips' frames as single images (`is_image_step`, `frames_as_images`).
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import Dataset

from data.buckets import BucketSchedule
from data.sources import VideoClipDataset
from data.video import VideoError
from launch import dist
from launch.train_ae_config import TrainAEConfig
from ldm.latent import Cond


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of epoch ``epoch``: a seeded permutation of ``range(n)``, split
    round-robin over ranks, cut into full batches (a rank's last partial batch is dropped)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    mine = dist.shard_list(torch.randperm(n, generator=g).tolist(), rank, world)
    return [mine[i:i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


def carried_position(positions: list[tuple[int, int]], old_global: int, new_global: int) -> tuple[int, int]:
    """The ``(epoch, batch)`` every rank of another topology resumes from, given each saved rank's
    ``(epoch, next batch)`` and the global batches (clips per step over all ranks) before and now.
    Ranks split an epoch's permutation round-robin (`epoch_batches`), so ``b`` batches on every
    rank are its first ``b x old_global`` clips: the new ranks start at the batch that holds the
    next one (the least advanced rank counts; a clip may be read twice, none is passed over)."""
    epoch, batch = min(positions)
    return epoch, batch * old_global // new_global


Shape = tuple[int, int, int]  # (frames, height, width) of a batch's clips


class PositionSampler:
    """Batch sampler over epochs from a saved position ``(epoch, batch)``. Every index it yields
    is ``(clip index, epoch, batch, shape)`` so the consumer knows the position of each batch even
    though DataLoader workers prefetch ahead; ``shape`` is the bucket of the step the batch is
    meant for (``schedule.at(next_step)``; the trainer moves ``next_step`` back when it drops a
    batch of unreadable clips)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, epoch: int, batch: int,
                 schedule: BucketSchedule, step: int):
        self.args = (n, batch_size, seed, rank, world)
        self.epoch, self.batch = epoch, batch
        self.schedule, self.next_step = schedule, step

    def __iter__(self) -> Iterator[list[tuple[int, int, int, Shape]]]:
        n, bs, seed, rank, world = self.args
        epoch, start = self.epoch, self.batch
        while True:
            batches = epoch_batches(n, bs, epoch, seed, rank, world)
            for b in range(start, len(batches)):
                shape = self.schedule.at(self.next_step).shape
                self.next_step += 1
                yield [(i, epoch, b, shape) for i in batches[b]]
            epoch, start = epoch + 1, 0


class SkipBad(Dataset):
    """Wraps VideoClipDataset: reads clip ``i`` at the index's shape, as its uint8 pixels (a quarter
    of float32's bytes through the loader's workers, pinned memory and the copy to the device;
    `data.video.uint8_to_float` there); a clip that raises VideoError becomes an error record (its
    key and reason) instead of killing the loader."""

    def __init__(self, dataset: VideoClipDataset, keys: list[str]):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: tuple[int, int, int, Shape]) -> dict[str, Any]:
        i, epoch, batch, shape = index
        try:
            item = self.dataset.read(i, *shape, uint8=True)
        except VideoError as e:
            return {"error": str(e), "key": self.keys[i], "index": index}
        return {"video": item["video"], "caption": item["caption"], "key": self.keys[i], "index": index}


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of `SkipBad` samples: the readable clips stacked, the unreadable ones as errors, and
    the batch's position (epoch, batch) and bucket shape from its first sample's index."""
    good = [s for s in samples if "video" in s]
    return {"video": torch.stack([s["video"] for s in good]) if good else None,  # (B, C, T, H, W)
            "keys": [s["key"] for s in good], "captions": [s["caption"] for s in good],
            "errors": [(s["key"], s["error"]) for s in samples if "error" in s],
            "indices": [s["index"] for s in samples], "pos": samples[0]["index"][1:3],
            "shape": samples[0]["index"][3]}


def is_image_step(cfg: TrainAEConfig, step: int) -> bool:
    """Whether step ``step`` trains on images (joint image-video training, e.g. the cross-modal VAE's
    8:2 video:image ratio = ``image_ratio`` 0.2): a draw seeded by (seed, step), so every rank agrees
    and a resumed run repeats the sequence."""
    if cfg.image_ratio <= 0.0 or cfg.image_ratio >= 1.0:
        return cfg.image_ratio >= 1.0
    return random.Random(cfg.seed * 1_000_003 + step).random() < cfg.image_ratio


def frames_as_images(video: Tensor, cond: Cond | None) -> tuple[Tensor, Cond | None]:
    """``B C T H W`` clips -> ``(B T) C 1 H W`` single-frame images, each keeping its clip's text."""
    frames = video.shape[2]
    images = rearrange(video, "b c t h w -> (b t) c 1 h w")  # (B*T, C, 1, H, W)
    if cond is None or cond.text is None:
        return images, cond
    mask = None if cond.text_mask is None else cond.text_mask.repeat_interleave(frames, 0)  # (B*T, L)
    return images, Cond(text=cond.text.repeat_interleave(frames, 0), text_mask=mask)  # (B*T, L, D)
