"""``ldm eval gen --attributes``: the offline attribute benchmark (`attribute_benchmark`).

A fixed prompt suite over the synthetic attributes (`attribute_suite`: ``data.synth``'s shape x color x direction,
captions "a red circle moving left"), N samples per prompt, read back by the weight-free reader
(``data.attributes``): accuracy per attribute and overall, with 95% Wilson intervals and chance; the DiT is
conditioned as `launch.sample.dit_conditioning` says (text and / or class ids), like FVD / FID's sampling.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autoencoders import Autoencoder
from data.video import write_video
from dit import Export
from launch.sample import dit_conditioning, generate, sampling_text_encoder
from ldm.samplers import SamplingConfig


def attribute_suite(shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                    directions: Sequence[str] | None = None, holdout: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The fixed prompt suite: every (shape, color, direction) of the chosen sets in class-id order
    (default: all shapes and colors, the four cardinal directions), each with its caption, class id
    and whether it was held out of training."""
    from data.synth import caption, combinations

    combos = combinations(shapes, colors, directions, holdout=holdout, include_holdout=True)
    return [{**c, "prompt": caption(c)} for c in combos]


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
    use_text, use_cls = dit_conditioning(model, export, use_class)
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
