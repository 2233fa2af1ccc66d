"""Shape buckets: one training run over several clip lengths and resolutions.

A bucket is ``(frames, height, width, probability, disc_weight)``. Each optimizer step draws one
bucket, and every clip of that step's batch is read at the bucket's length and size (decoded,
resized to cover and center-cropped, as `data.video.read_video` does); a 1-frame bucket trains on
images (a video's first frame), which is how H3AE mixes images and videos and IV-VAE trains its
last stage "at different resolutions with different frame numbers".

- ``probability``: the share of steps drawn from the bucket, a relative weight > 0. The weights
  are normalised over the buckets, so ``[1, 1, 2]`` draws 25 / 25 / 50 %; weights that already sum
  to 1 are used as written.
- ``disc_weight``: multiplies the GAN weight (generator and discriminator terms) on the bucket's
  steps, >= 0 (0: no GAN update on those steps). IV-VAE (Sec. 4.2, "Training details") gives each
  training resolution its own discriminator weight.

The draw of step ``s`` is a pure function of ``(seed, s)`` (`BucketSchedule.index`), so every rank
of a distributed run picks the same bucket and a resumed run repeats the sequence of an
uninterrupted one. It is its own random stream: it does not follow the image-step draw of
``image_ratio``.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ldm.errors import UserError

SPEC = "[frames, height, width, probability, disc_weight]"


@dataclass(frozen=True)
class Bucket:
    """One clip shape and its share of the steps (see the module doc)."""

    frames: int
    height: int
    width: int
    probability: float = 1.0  # normalised over the buckets of a schedule
    disc_weight: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(frames, height, width)``: what every clip of the bucket's batches is read at."""
        return self.frames, self.height, self.width

    @property
    def name(self) -> str:
        return "x".join(map(str, self.shape))


def _whole(value: object) -> int | None:
    """``value`` as an int when it is a whole number (``17``, ``17.0``), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if math.isfinite(value) and float(value).is_integer() else None


def parse_bucket(entry: Sequence[object], where: str = "bucket") -> Bucket:
    """A `Bucket` from ``[frames, height, width, probability, disc_weight]``; `UserError` (one
    line naming the entry) otherwise."""
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 5:
        raise UserError(f"{where} {entry!r} must be {SPEC}, e.g. [17, 256, 256, 0.5, 1.0]")
    sizes = [_whole(v) for v in entry[:3]]
    if any(s is None or s < 1 for s in sizes):
        raise UserError(f"{where} {list(entry)}: frames, height and width must be whole numbers >= 1")
    numbers = entry[3:]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in numbers):
        raise UserError(f"{where} {list(entry)}: probability and disc_weight must be numbers")
    probability, disc_weight = (float(v) for v in numbers)
    if not probability > 0:
        raise UserError(f"{where} {list(entry)}: probability must be > 0 (leave a bucket out to never draw it)")
    if disc_weight < 0:
        raise UserError(f"{where} {list(entry)}: disc_weight must be >= 0")
    return Bucket(*sizes, probability, disc_weight)


@dataclass(frozen=True)
class BucketSchedule:
    """Which bucket each step trains on: a draw keyed by ``(seed, step)``, probabilities
    normalised over ``buckets``."""

    buckets: tuple[Bucket, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.buckets:
            raise UserError("a bucket schedule needs at least one bucket")
        shapes = [b.shape for b in self.buckets]
        twice = sorted({b.name for b in self.buckets if shapes.count(b.shape) > 1})
        if twice:
            raise UserError(f"buckets: shape(s) {twice} given twice; give each shape once with its total probability")

    @classmethod
    def from_spec(cls, spec: Sequence[Sequence[object]], seed: int = 0) -> "BucketSchedule":
        """From the ``buckets`` config value (a list of `SPEC` lists); `UserError` on a bad one."""
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
            raise UserError(f"buckets must be a non-empty list of {SPEC}, got {spec!r}")
        return cls(tuple(parse_bucket(e, f"buckets[{i}]") for i, e in enumerate(spec)), seed)

    @classmethod
    def single(cls, frames: int, height: int, width: int, seed: int = 0) -> "BucketSchedule":
        """One shape on every step (a run without ``buckets``)."""
        return cls((Bucket(frames, height, width),), seed)

    @property
    def probabilities(self) -> tuple[float, ...]:
        total = sum(b.probability for b in self.buckets)
        return tuple(b.probability / total for b in self.buckets)

    @property
    def has_images(self) -> bool:
        """Whether some steps train on 1-frame clips (their temporal layers go unused)."""
        return any(b.frames == 1 for b in self.buckets)

    def index(self, step: int) -> int:
        """Index of the bucket of step ``step`` (0-based), a pure function of ``(seed, step)``."""
        if len(self.buckets) == 1:
            return 0
        rng = random.Random(f"bucket {self.seed} {step}")  # str seeds hash with SHA-512: same on every machine
        return rng.choices(range(len(self.buckets)), weights=self.probabilities)[0]

    def at(self, step: int) -> Bucket:
        """The bucket of step ``step``."""
        return self.buckets[self.index(step)]
