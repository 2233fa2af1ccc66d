"""``ldm eval``: reconstruction quality of an autoencoder and generation quality of a trained DiT.

    ldm eval recon --autoencoder NAME --checkpoint DIR --input VIDEOS --frames 17 --height 256 --width 256 \\
                   [--lpips-backbone vgg16.pth --lpips-heads vgg.pth] [--i3d i3d_torchscript.pt] \\
                   [--frame-group 4 --group-start 1] --output recon.json [--grid recon.png]
    ldm eval gen --checkpoint RUN --output DIR [--attributes --per-prompt 4] \\
                 [--reference VIDEOS --num 2048 --i3d i3d_torchscript.pt --inception inception-2015-12-05.pt] \\
                 [--vbench --vbench-info VBench_full_info.json --vbench-python /envs/vbench/bin/python]

Reconstruction (``recon``): PSNR, SSIM (Gaussian 11 / 1.5, data range 2), LPIPS (torchvision
backbone + the lpips package's linear heads, both user files) and rFVD (originals vs their
reconstructions), optionally SSIM per frame position inside a frame group (IV-VAE Fig. 1b: a
causal 4x-temporal VAE reconstructs the frames of each group of 4 unequally), a grid PNG and JSON.

Generation (``gen``):

- FVD / FID: Fréchet distances (float64, unbiased covariances, streaming statistics; ``ldm.metrics``)
  between features of reference clips and of as many generated clips (sampled with the reference
  clips' captions or class ids). FVD follows the reference protocol: the first 16 frames, each
  resized bilinearly to 224x224 (no crop) after quantising to [0, 255], mapped to [-1, 1], I3D
  Kinetics-400 logits; the default extractor is the TorchScript ``i3d_torchscript.pt`` (StyleGAN-V's
  port of the TF-Hub I3D, called with ``rescale=False, resize=False, return_features=True``);
  ``--i3d-kind torchscript`` takes any TorchScript module mapping the same input to features (e.g.
  a scripted VideoMAE-v2 for content-debiased FVD). FID uses every frame through the TorchScript
  Inception of StyleGAN2-ADA (``inception-2015-12-05.pt``: uint8 frames, ``return_features=True``,
  2048-d pool features). The extractor's file name and sha256, N and T are recorded with every value.
- The offline attribute benchmark: a fixed prompt suite over the synthetic attributes
  (``data.synth``: shape x color x direction, captions "a red circle moving left"), N samples per
  prompt, read back by the weight-free reader (``data.attributes``): accuracy per attribute and
  overall, with chance.
- A VBench bridge: the standard prompt list (``VBench_full_info.json``) sampled in VBench's file
  naming (``{prompt}-{index}.mp4``), ``vbench`` run as a subprocess in its own environment
  (``--vbench-python``; it pins old dependencies and needs CUDA), the model-free temporal
  flickering computed in-house, and the Quality / Semantic / Total aggregation in-house with
  VBench's normalisation table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from autoencoders import Autoencoder, build, load_pretrained
from data.sources import VideoClipDataset, list_items
from data.video import VideoError, probe, read_video, write_video
from launch.dist import compute_dtype
from ldm.checkpoint import atomic_write_json, dir_hash
from ldm.latent import Cond
from ldm.metrics import LPIPS, RunningGaussian, frechet_distance, psnr, ssim_per_frame

FVD_FRAMES = 16
FVD_SIZE = 224


# ------------------------------------------------------------------------------------------
# feature extractors (FVD / FID) from user files
# ------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Extractor:
    """A frozen feature network loaded from a user file, with what a result must record."""

    kind: str  # i3d_torchscript | torchscript | inception_torchscript
    path: Path
    sha256: str
    module: Any
    device: torch.device
    dim: int = 0

    def describe(self) -> dict[str, Any]:
        return {"extractor": self.kind, "weights": self.path.name, "sha256": self.sha256, "feature_dim": self.dim}


I3D_KINDS = ("i3d_torchscript", "torchscript")


def _load_torchscript(path: str | Path, what: str, device: torch.device) -> tuple[Path, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {str(p)!r}")
    try:
        module = torch.jit.load(str(p), map_location=device)
    except RuntimeError as e:
        raise ValueError(f"{what} {str(p)!r} is not a TorchScript archive ({str(e).splitlines()[0]}); "
                         "export it with torch.jit.script / torch.jit.save") from None
    return p, module.eval()


def load_i3d(path: str | Path, kind: str = "i3d_torchscript", device: str | torch.device = "cpu") -> Extractor:
    """The FVD feature network: ``i3d_torchscript`` (StyleGAN-V's TorchScript I3D, Kinetics-400
    logits) or ``torchscript`` (any scripted ``module(x) -> (B, D)`` on the same input)."""
    if kind not in I3D_KINDS:
        raise ValueError(f"unknown FVD extractor kind {kind!r}; expected one of {I3D_KINDS}")
    device = torch.device(device)
    p, module = _load_torchscript(path, f"FVD extractor ({kind}, e.g. i3d_torchscript.pt)", device)
    ext = Extractor(kind, p, sha256_file(p), module, device)
    probe_x = torch.zeros(1, 3, FVD_FRAMES, FVD_SIZE, FVD_SIZE, device=device)
    ext.dim = int(_i3d_features(ext, probe_x).shape[1])
    return ext


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> Extractor:
    """The FID feature network: StyleGAN2-ADA's TorchScript Inception (``inception-2015-12-05.pt``)."""
    device = torch.device(device)
    p, module = _load_torchscript(path, "FID Inception (e.g. inception-2015-12-05.pt)", device)
    ext = Extractor("inception_torchscript", p, sha256_file(p), module, device)
    ext.dim = int(_inception_features(ext, torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device)).shape[1])
    return ext


@torch.no_grad()
def _i3d_features(ext: Extractor, x: Tensor) -> Tensor:
    out = ext.module(x, rescale=False, resize=False, return_features=True) if ext.kind == "i3d_torchscript" \
        else ext.module(x)
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"{ext.path.name} returned {tuple(out.shape)} for {x.shape[0]} clips; expected (B, D)")
    return out.double().cpu()


@torch.no_grad()
def _inception_features(ext: Extractor, frames: Tensor) -> Tensor:
    out = ext.module(frames, return_features=True)
    if out.ndim != 2 or out.shape[0] != frames.shape[0]:
        raise ValueError(f"{ext.path.name} returned {tuple(out.shape)} for {frames.shape[0]} frames; expected (N, D)")
    return out.double().cpu()


def to_uint8_range(videos: Tensor) -> Tensor:
    """``[-1, 1]`` -> float values in {0, ..., 255} (what a saved video holds)."""
    return ((videos.float().clamp(-1, 1) + 1) * 127.5).round()


def fvd_preprocess(videos: Tensor, frames: int = FVD_FRAMES, size: int = FVD_SIZE) -> Tensor:
    """``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, 3, frames, size, size)`` in [-1, 1]: the first
    ``frames`` frames, quantised to [0, 255], each resized bilinearly (no crop, no antialias),
    mapped back to [-1, 1] as the reference FVD does."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected (B, 3, T, H, W) videos, got {tuple(videos.shape)}")
    if videos.shape[2] < frames:
        raise ValueError(f"FVD uses {frames} frames; the clips have {videos.shape[2]} (use longer clips or "
                         "--fvd-frames, and report it)")
    x = to_uint8_range(videos[:, :, :frames])
    B = x.shape[0]
    x = rearrange(x, "b c t h w -> (b t) c h w")
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (B*T, 3, size, size)
    x = rearrange(x, "(b t) c h w -> b c t h w", b=B)
    return x / 127.5 - 1.0


class FrechetAccumulator:
    """Streaming features of two sets (``real`` / ``fake``) for one extractor."""

    def __init__(self, ext: Extractor, features: Callable[[Tensor], Tensor], protocol: dict[str, Any]):
        self.ext, self.features, self.protocol = ext, features, protocol
        self.stats = {"real": RunningGaussian(ext.dim), "fake": RunningGaussian(ext.dim)}

    def update(self, which: str, batch: Tensor) -> None:
        self.stats[which].update(self.features(batch))

    def result(self, name: str) -> dict[str, Any]:
        (m1, s1), (m2, s2) = self.stats["real"].stats(), self.stats["fake"].stats()
        return {name: frechet_distance(m1, s1, m2, s2), **self.ext.describe(), "n_real": self.stats["real"].n,
                "n_fake": self.stats["fake"].n, "covariance": "unbiased (N - 1), float64", **self.protocol}


def fvd_accumulator(ext: Extractor, frames: int = FVD_FRAMES, batch: int = 8) -> FrechetAccumulator:
    def feats(videos: Tensor) -> Tensor:
        out = [_i3d_features(ext, fvd_preprocess(videos[i:i + batch], frames).to(ext.device))
               for i in range(0, len(videos), batch)]
        return torch.cat(out)
    return FrechetAccumulator(ext, feats, {"frames": frames, "resize": f"bilinear {FVD_SIZE}x{FVD_SIZE}, no crop",
                                            "range": "[-1, 1]"})


def fid_accumulator(ext: Extractor, batch: int = 64) -> FrechetAccumulator:
    def feats(videos: Tensor) -> Tensor:
        frames = rearrange(to_uint8_range(videos), "b c t h w -> (b t) c h w").to(torch.uint8)
        return torch.cat([_inception_features(ext, frames[i:i + batch].to(ext.device))
                          for i in range(0, len(frames), batch)])
    return FrechetAccumulator(ext, feats, {"frames": "all frames of every clip",
                                            "input": "uint8 frames, resized inside the network"})


# ------------------------------------------------------------------------------------------
# reconstruction
# ------------------------------------------------------------------------------------------
def load_autoencoder(name: str | None, checkpoint: str | None, ae_path: str | None = None,
                     ae_subfolder: str | None = None, seed: int = 0) -> tuple[Autoencoder, str, str | None]:
    """``(model, name, weights hash)`` from a saved folder, a diffusers folder or a registered
    name (random weights, with a warning)."""
    if checkpoint:
        ae = load_pretrained(checkpoint)
        meta = json.loads((Path(checkpoint) / "config.json").read_text())
        return ae, meta.get("name") or name or ae.family, dir_hash(checkpoint)
    if not name:
        raise ValueError("give --autoencoder NAME and/or --checkpoint DIR")
    if name.startswith("diffusers:"):
        if not ae_path:
            raise ValueError(f"--autoencoder {name} needs --ae-path (a local diffusers folder)")
        return build(name, path=ae_path, subfolder=ae_subfolder), name, dir_hash(Path(ae_path) / (ae_subfolder or ""))
    warnings.warn(f"no --checkpoint: {name} has RANDOM weights (a pipeline check, not a measurement)", stacklevel=2)
    torch.manual_seed(seed)
    return build(name), name, None


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


def _clips(input: str, frames: int, height: int, width: int, fps: float | None, num: int | None
           ) -> tuple[Iterable[dict[str, Any]], list[str], int]:
    items = list_items(input)
    if num:
        items = items[:num]
    if not items:
        raise ValueError(f"no videos found in {input}")
    data = VideoClipDataset(items, frames, height, width, fps)
    skipped: list[str] = list(getattr(items, "problems", []))

    def gen():
        for i in range(len(data)):
            try:
                yield data[i]
            except VideoError as e:
                skipped.append(f"{items[i].source}: {e}")
    return gen(), skipped, len(items)


def _batches(it: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for x in it:
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


@torch.no_grad()
def evaluate_reconstruction(ae: Autoencoder, input: str, frames: int, height: int, width: int, *,
                            fps: float | None = None, num: int | None = None, batch_size: int = 4,
                            device: str | torch.device = "cpu", lpips: LPIPS | None = None,
                            i3d: Extractor | None = None, fvd_frames: int = FVD_FRAMES,
                            frame_group: int = 0, group_start: int = 0, text_encoder=None,
                            grid: str | Path | None = None, grid_clips: int = 4,
                            dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Encode + decode the clips of ``input``; per-clip PSNR / SSIM (/ LPIPS), rFVD, optional
    per-position SSIM and a grid of the first ``grid_clips`` clips. The autoencoder runs in
    ``dtype``; the metrics are computed in fp32."""
    from launch.train_ae import save_grid

    device = torch.device(device)
    ae = ae.to(device=device, dtype=dtype).eval()
    ae.check_input(frames, height, width)
    text_dim = ae.text_dim
    if text_dim and text_encoder is None:
        raise ValueError(f"this autoencoder is text-guided (text_dim={text_dim}): pass --text-encoder")
    clips, skipped, listed = _clips(input, frames, height, width, fps, num)
    rfvd = fvd_accumulator(i3d, fvd_frames) if i3d is not None else None
    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    frame_ssim: list[Tensor] = []
    shown: tuple[list[Tensor], list[Tensor]] = ([], [])
    t_enc = t_dec = 0.0
    for batch in _batches(clips, batch_size):
        x = torch.stack([b["video"] for b in batch]).to(device)  # (B, C, T, H, W)
        cond = None
        if text_dim:
            emb, mask = text_encoder.encode([b["caption"] for b in batch])
            cond = Cond(text=emb.to(device, dtype), text_mask=mask.to(device))
        t0 = time.perf_counter()
        latent = ae.encode(x.to(dtype), cond)
        t1 = time.perf_counter()
        y = ae.decode(latent, cond).clamp(-1, 1)
        t_enc, t_dec = t_enc + t1 - t0, t_dec + time.perf_counter() - t1
        x, y = x.float().cpu(), y.float().cpu()
        scores["psnr"] += psnr(y, x).tolist()
        per_frame = ssim_per_frame(y, x)  # (B, T)
        frame_ssim.append(per_frame)
        scores["ssim"] += per_frame.mean(1).tolist()
        if lpips is not None:
            where = next(lpips.parameters()).device
            scores["lpips"] += lpips(y.to(where), x.to(where)).cpu().tolist()
        if rfvd is not None:
            rfvd.update("real", x)
            rfvd.update("fake", y)
        if len(shown[0]) < grid_clips:
            take = grid_clips - len(shown[0])
            shown[0].extend(x[:take])
            shown[1].extend(y[:take])
    n = len(scores["psnr"])
    if n == 0:
        raise ValueError(f"none of the {listed} videos in {input} could be read: {skipped[:3]}")
    result: dict[str, Any] = {"clips": n, "skipped": skipped, "frames": frames, "height": height, "width": width,
                              "psnr_db": _mean_std(scores["psnr"]), "ssim": _mean_std(scores["ssim"]),
                              "ssim_protocol": "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 2 "
                                               "([-1, 1]), per frame, averaged",
                              "encode_s_per_clip": t_enc / n, "decode_s_per_clip": t_dec / n}
    if lpips is not None:
        result["lpips"] = _mean_std(scores["lpips"]) | {"net": lpips.net}
    if rfvd is not None:
        result["rfvd"] = rfvd.result("rfvd") if n >= 2 else {"error": "rFVD needs >= 2 clips"}
    if frame_group:
        result["ssim_per_position"] = position_ssim(torch.cat(frame_ssim), frame_group, group_start)
    if grid:
        save_grid(torch.stack(shown[0]), torch.stack(shown[1]), Path(grid), max_frames=min(frames, 8))
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


def _conditioning(model, context: dict[str, Any], use_class: bool | None) -> tuple[bool, bool]:
    """(text, class): what the benchmark conditions on. Text when the DiT and its training run have
    it; class ids when asked (default: only when there is no text)."""
    text = bool(model.config.text_dim and context.get("text_encoder"))
    has_class = bool(model.config.num_classes)
    cls = has_class and (use_class if use_class is not None else not text)
    if use_class and not has_class:
        raise ValueError("--use-class: this DiT has no class conditioning")
    if not text and not cls:
        raise ValueError("this DiT takes neither text (with a text encoder) nor class ids")
    return text, cls


def attribute_benchmark(model, ae: Autoencoder, context: dict[str, Any], suite: list[dict[str, Any]], *,
                        per_prompt: int, frames: int, height: int, width: int, steps: int = 20,
                        guidance: float = 4.0, shift: float = 1.0, sampler: str = "euler", seed: int = 0,
                        batch_size: int = 8, use_class: bool | None = None, text_encoder=None,
                        device: str | torch.device = "cpu", save_dir: Path | None = None,
                        fps: float = 8.0) -> dict[str, Any]:
    """Sample ``per_prompt`` videos per suite prompt and read the attributes back.

    Accuracy per attribute, ``all`` (all three right), chance levels, the held-out combinations
    separately, per-prompt rows and the sampling time per video. Candidates for the reader are the
    suite's own shapes / colors / directions."""
    from data.attributes import read_attributes
    from launch.sample import generate

    if per_prompt < 1 or not suite:
        raise ValueError("the attribute benchmark needs a non-empty suite and per_prompt >= 1")
    use_text, use_cls = _conditioning(model, context, use_class)
    if use_text and text_encoder is None:
        from ldm.text import build_text_encoder
        text_encoder = build_text_encoder(context["text_encoder"], device=device)
    cands = {a: tuple(dict.fromkeys(c[a] for c in suite)) for a in ("shape", "color", "direction")}
    items = [(i, k) for i in range(len(suite)) for k in range(per_prompt)]
    rows, t_sample = [], 0.0
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        prompts = [suite[i]["prompt"] for i, _ in chunk]
        t0 = time.perf_counter()
        videos = generate(model, ae, context, prompts=prompts if use_text else None,
                          class_ids=[suite[i]["class_id"] for i, _ in chunk] if use_cls else None,
                          frames=frames, height=height, width=width, steps=steps, guidance=guidance, shift=shift,
                          sampler=sampler, seed=seed + b, text_encoder=text_encoder, device=device, progress=False)
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
    return {"accuracy": acc(rows), "accuracy_seen": acc([r for r in rows if not r["holdout"]]),
            "accuracy_holdout": acc([r for r in rows if r["holdout"]]), "chance": chance,
            "prompts": len(suite), "per_prompt": per_prompt, "conditioning": {"text": use_text, "class": use_cls},
            "sampling": {"steps": steps, "guidance": guidance, "sampler": sampler, "shift": shift, "seed": seed},
            "sample_s_per_video": t_sample / len(rows), "rows": rows}


# ------------------------------------------------------------------------------------------
# generation: VBench bridge
# ------------------------------------------------------------------------------------------
# VBench (Huang et al. 2024), scripts/constant.py: per-dimension normalisation, dimension weights and
# the Quality / Semantic split; Total = (4 Quality + 1 Semantic) / 5.
VBENCH_NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
VBENCH_WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in VBENCH_NORMALIZE}
VBENCH_QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                  "aesthetic_quality", "imaging_quality", "dynamic_degree")
VBENCH_SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
                   "appearance_style", "temporal_style", "overall_consistency")
VBENCH_QUALITY_WEIGHT, VBENCH_SEMANTIC_WEIGHT = 4.0, 1.0


def vbench_aggregate(scores: dict[str, float]) -> dict[str, Any]:
    """VBench's Quality, Semantic and Total scores from raw per-dimension scores (keys with ``_``
    or spaces). Each dimension is min-max normalised with VBench's table and weighted (dynamic
    degree 0.5); a group's score is the weighted mean over its dimensions, ``None`` with the
    missing dimensions listed when any is absent."""
    raw = {k.replace(" ", "_"): float(v) for k, v in scores.items()}
    unknown = sorted(set(raw) - set(VBENCH_NORMALIZE))
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {unknown}; known: {sorted(VBENCH_NORMALIZE)}")
    norm = {d: (v - VBENCH_NORMALIZE[d][0]) / (VBENCH_NORMALIZE[d][1] - VBENCH_NORMALIZE[d][0]) * VBENCH_WEIGHT[d]
            for d, v in raw.items()}

    def group(dims: tuple[str, ...]) -> tuple[float | None, list[str]]:
        missing = [d for d in dims if d not in norm]
        if missing:
            return None, missing
        return sum(norm[d] for d in dims) / sum(VBENCH_WEIGHT[d] for d in dims), []

    quality, miss_q = group(VBENCH_QUALITY)
    semantic, miss_s = group(VBENCH_SEMANTIC)
    total = None
    if quality is not None and semantic is not None:
        total = (VBENCH_QUALITY_WEIGHT * quality + VBENCH_SEMANTIC_WEIGHT * semantic) / (
            VBENCH_QUALITY_WEIGHT + VBENCH_SEMANTIC_WEIGHT)
    return {"raw": raw, "normalized": norm, "quality": quality, "semantic": semantic, "total": total,
            "missing": miss_q + miss_s}


def temporal_flickering(video: Tensor | np.ndarray) -> float:
    """VBench's temporal flickering of one clip: ``(255 - mean_t MAE(frame_t, frame_t+1)) / 255`` on
    [0, 255] frames (higher = steadier). ``video``: uint8 ``(T, H, W, 3)`` or float ``(3, T, H, W)``
    in [-1, 1]."""
    if isinstance(video, Tensor):
        x = video.detach().cpu()
        x = to_uint8_range(x).permute(1, 2, 3, 0).numpy() if x.is_floating_point() else x.numpy()
    else:
        x = np.asarray(video)
    x = x.astype(np.float64)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"temporal flickering needs >= 2 frames (T, H, W, C), got shape {x.shape}")
    mae = np.abs(np.diff(x, axis=0)).reshape(x.shape[0] - 1, -1).mean(1)  # (T-1,)
    return float((255.0 - mae.mean()) / 255.0)


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
    return Path(spec.origin).parent / "VBench_full_info.json"


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
    data = json.loads(path.read_text())
    return {k: float(v[0] if isinstance(v, list) else v) for k, v in data.items()}


def vbench_bridge(model, ae: Autoencoder, context: dict[str, Any], out: Path, *, info: Path,
                  dimensions: Sequence[str] | None, per_prompt: int = 5, frames: int, height: int, width: int,
                  steps: int = 20, guidance: float = 4.0, shift: float = 1.0, sampler: str = "euler", seed: int = 0,
                  batch_size: int = 8, fps: float = 8.0, device: str | torch.device = "cpu",
                  vbench_python: str | None = None, vbench_results: str | None = None, gpus: int = 1,
                  max_prompts: int | None = None) -> dict[str, Any]:
    """Sample the standard prompts, score temporal flickering in-house, run VBench if given its
    environment (or read its results), aggregate."""
    from launch.sample import generate
    from ldm.text import build_text_encoder

    if not (model.config.text_dim and context.get("text_encoder")):
        raise ValueError("VBench prompts need a text-conditioned DiT")
    entries = vbench_prompts(info, dimensions)[:max_prompts] if max_prompts else vbench_prompts(info, dimensions)
    dims = list(dimensions) if dimensions else sorted({d for e in entries for d in e["dimension"]})
    videos_dir = out / "vbench_videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    text_encoder = build_text_encoder(context["text_encoder"], device=device)
    jobs = [(e["prompt_en"], k) for e in entries for k in range(per_prompt)]
    flicker: list[float] = []
    flicker_prompts = {e["prompt_en"] for e in entries if "temporal_flickering" in e["dimension"]}
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        todo = [(p, k) for p, k in chunk if not (videos_dir / vbench_video_name(p, k)).exists()]
        if todo:
            vids = generate(model, ae, context, prompts=[p for p, _ in todo], frames=frames, height=height,
                            width=width, steps=steps, guidance=guidance, shift=shift, sampler=sampler,
                            seed=seed + b, text_encoder=text_encoder, device=device, progress=False)
            for (p, k), v in zip(todo, vids):
                write_video(videos_dir / vbench_video_name(p, k), v, fps)
        for p, k in chunk:
            if p in flicker_prompts:
                flicker.append(temporal_flickering(read_native(videos_dir / vbench_video_name(p, k))))
    result: dict[str, Any] = {"videos": str(videos_dir), "prompts": len(entries), "per_prompt": per_prompt,
                              "dimensions": dims, "info": str(info), "info_sha256": sha256_file(info)}
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


def generation_fd(model, ae: Autoencoder, context: dict[str, Any], reference: str, *, frames: int, height: int,
                  width: int, num: int | None, i3d: Extractor | None, inception: Extractor | None,
                  fvd_frames: int = FVD_FRAMES, samples: str | None = None, steps: int = 20, guidance: float = 4.0,
                  shift: float = 1.0, sampler: str = "euler", seed: int = 0, batch_size: int = 8,
                  device: str | torch.device = "cpu", fps: float | None = None) -> dict[str, Any]:
    """FVD / FID between the reference clips and generated ones: the given ``samples`` folder, or
    one sample per reference clip from its caption (text DiT) or class id."""
    from launch.sample import generate

    if i3d is None and inception is None:
        raise ValueError("FVD / FID need --i3d and/or --inception")
    accs = {}
    if i3d is not None:
        accs["fvd"] = fvd_accumulator(i3d, fvd_frames)
    if inception is not None:
        accs["fid"] = fid_accumulator(inception)
    ref, skipped, _ = _clips(reference, frames, height, width, fps, num)
    text_encoder = None
    use_text, use_cls = (False, False)
    if samples is None:
        use_text, use_cls = _conditioning(model, context, None)
        if use_text:
            from ldm.text import build_text_encoder
            text_encoder = build_text_encoder(context["text_encoder"], device=device)
    n = 0
    for b, batch in enumerate(_batches(ref, batch_size)):
        real = torch.stack([x["video"] for x in batch])
        for acc in accs.values():
            acc.update("real", real)
        if samples is None:
            if use_cls and any(x["class_id"] < 0 for x in batch):
                raise ValueError("a reference clip has no class id; this DiT is class-conditioned only")
            fake = generate(model, ae, context, prompts=[x["caption"] for x in batch] if use_text else None,
                            class_ids=[x["class_id"] for x in batch] if use_cls else None, frames=frames,
                            height=height, width=width, steps=steps, guidance=guidance, shift=shift, sampler=sampler,
                            seed=seed + b * batch_size, text_encoder=text_encoder, device=device, progress=False)
            for video in _as_batches(fake):
                for acc in accs.values():
                    acc.update("fake", video)
        n += len(batch)
    if samples is not None:
        gen, gen_skipped, _ = _clips(samples, frames, height, width, fps, num)
        skipped += gen_skipped
        for batch in _batches(gen, batch_size):
            fake = torch.stack([x["video"] for x in batch])
            for acc in accs.values():
                acc.update("fake", fake)
    out = {name: acc.result(name) for name, acc in accs.items()}
    out["reference"] = reference
    out["generated"] = samples or "sampled now: one per reference clip (its caption / class id)"
    out["skipped"] = skipped
    return out


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="{recon,gen}")
    r = sub.add_parser("recon", help="reconstruction quality of an autoencoder")
    r.add_argument("--autoencoder", help="registered name (random weights without --checkpoint)")
    r.add_argument("--checkpoint", help="a save_pretrained / `ldm train-ae` folder")
    r.add_argument("--ae-path", help="local diffusers folder, with --autoencoder diffusers:<Class>")
    r.add_argument("--ae-subfolder")
    r.add_argument("--input", required=True, help="videos (folder, raw shards, as `ldm extract`)")
    r.add_argument("--frames", type=int, default=17)
    r.add_argument("--height", type=int, default=256)
    r.add_argument("--width", type=int, default=256)
    r.add_argument("--fps", type=float)
    r.add_argument("--num", type=int, help="evaluate the first N clips")
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--text-encoder", help="for a text-guided autoencoder: builtin | t5:DIR | clip:DIR")
    _metric_args(r)
    r.add_argument("--frame-group", type=int, default=0, metavar="K",
                   help="also report SSIM per frame position inside groups of K frames (IV-VAE Fig. 1b)")
    r.add_argument("--group-start", type=int, default=0, help="first frame of the first group (1 for a causal VAE)")
    r.add_argument("--grid", help="reconstruction grid PNG (originals above reconstructions)")
    r.add_argument("--output", required=True, help="result JSON")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision the autoencoder runs in (auto: bf16 on CUDA, fp32 on the CPU)")

    g = sub.add_parser("gen", help="generation quality of a trained DiT")
    g.add_argument("--checkpoint", required=True, help="an `ldm train` run folder or its export/")
    g.add_argument("--ae-checkpoint", help="autoencoder weights (default: recorded at extraction)")
    g.add_argument("--output", required=True, help="output folder (result.json, videos)")
    g.add_argument("--frames", type=int, help="default: the training clips'")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--guidance", type=float, default=4.0)
    g.add_argument("--shift", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--fps", type=float, default=8.0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision the DiT and the autoencoder run in (auto: bf16 on CUDA, fp32 on the CPU)")
    g.add_argument("--attributes", action="store_true", help="the offline attribute benchmark")
    g.add_argument("--per-prompt", type=int, default=4)
    g.add_argument("--shapes", nargs="+")
    g.add_argument("--colors", nargs="+")
    g.add_argument("--directions", nargs="+")
    g.add_argument("--holdout", nargs="*", default=[], help="combinations held out of training, 'red circle left'")
    g.add_argument("--use-class", action="store_true", help="condition on class ids too (default: text if any)")
    g.add_argument("--reference", help="reference videos for FVD / FID")
    g.add_argument("--samples", help="already generated videos (instead of sampling one per reference clip)")
    g.add_argument("--num", type=int, help="clips used for FVD / FID (reference and generated)")
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


def _metric_args(p: argparse.ArgumentParser, lpips: bool = True) -> None:
    if lpips:
        p.add_argument("--lpips-backbone", help="torchvision VGG16 / AlexNet weights file (e.g. vgg16-397923af.pth)")
        p.add_argument("--lpips-heads", help="the lpips package's linear heads (vgg.pth / alex.pth)")
        p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--i3d", help="FVD extractor file (default kind: i3d_torchscript.pt)")
    p.add_argument("--i3d-kind", default="i3d_torchscript", choices=I3D_KINDS)
    p.add_argument("--fvd-frames", type=int, default=FVD_FRAMES, help="frames per clip for FVD (reference: 16)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.what == "recon":
        result = run_recon(args, device)
    else:
        result = run_gen(args, device)
    print(json.dumps(_summary(result), indent=2))
    return 0


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without per-video rows (those stay in the JSON file)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out[k] = _summary(v)
        elif k not in ("rows", "per_frame"):
            out[k] = v
    return out


def run_recon(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    lpips = None
    if args.lpips_backbone or args.lpips_heads:
        if not (args.lpips_backbone and args.lpips_heads):
            raise ValueError("LPIPS needs both --lpips-backbone and --lpips-heads")
        lpips = LPIPS.from_files(args.lpips_net, args.lpips_backbone, args.lpips_heads).to(device)
    i3d = load_i3d(args.i3d, args.i3d_kind, device) if args.i3d else None  # fail early, before encoding
    ae, name, ckpt_hash = load_autoencoder(args.autoencoder, args.checkpoint, args.ae_path, args.ae_subfolder)
    text_encoder = None
    if args.text_encoder:
        from ldm.text import build_text_encoder
        text_encoder = build_text_encoder(args.text_encoder, device=device)
    result = evaluate_reconstruction(ae, args.input, args.frames, args.height, args.width, fps=args.fps, num=args.num,
                                     batch_size=args.batch_size, device=device, lpips=lpips, i3d=i3d,
                                     fvd_frames=args.fvd_frames, frame_group=args.frame_group,
                                     group_start=args.group_start, text_encoder=text_encoder, grid=args.grid,
                                     dtype=compute_dtype(args.dtype, device))
    result = {"autoencoder": name, "checkpoint": args.checkpoint, "checkpoint_hash": ckpt_hash, "input": args.input,
              **result}
    if lpips is not None:
        result["lpips"]["backbone_sha256"] = sha256_file(args.lpips_backbone)
        result["lpips"]["heads_sha256"] = sha256_file(args.lpips_heads)
    atomic_write_json(Path(args.output), result)
    return result


def run_gen(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from launch.sample import load_autoencoder as load_context_ae
    from launch.train import load_export

    if not (args.attributes or args.reference or args.vbench):
        raise ValueError("choose at least one of --attributes, --reference (FVD / FID), --vbench")
    i3d = load_i3d(args.i3d, args.i3d_kind, device) if args.i3d else None
    inception = load_inception(args.inception, device) if args.inception else None
    if args.reference and i3d is None and inception is None:
        raise ValueError("--reference needs --i3d (FVD) and/or --inception (FID)")
    info = vbench_info_path(args.vbench_info) if args.vbench else None
    dtype = compute_dtype(args.dtype, device)
    model, context = load_export(args.checkpoint, device)
    model = model.to(dtype)
    ae = load_context_ae(context, args.ae_checkpoint).to(device=device, dtype=dtype).eval()
    video = context["video"]
    frames, height, width = args.frames or video["frames"], args.height or video["height"], args.width or video["width"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sampling = dict(steps=args.steps, guidance=args.guidance, shift=args.shift, sampler=args.sampler, seed=args.seed,
                    batch_size=args.batch_size, device=device)
    result: dict[str, Any] = {"checkpoint": args.checkpoint, "autoencoder": context.get("autoencoder"),
                              "frames": frames, "height": height, "width": width}
    if args.attributes:
        suite = attribute_suite(args.shapes, args.colors, args.directions, args.holdout)
        (out / "attribute_videos").mkdir(exist_ok=True)
        result["attributes"] = attribute_benchmark(model, ae, context, suite, per_prompt=args.per_prompt,
                                                   frames=frames, height=height, width=width,
                                                   use_class=True if args.use_class else None,
                                                   save_dir=out / "attribute_videos", fps=args.fps, **sampling)
    if args.reference:
        result["fd"] = generation_fd(model, ae, context, args.reference, frames=frames, height=height, width=width,
                                     num=args.num, i3d=i3d, inception=inception, fvd_frames=args.fvd_frames,
                                     samples=args.samples, **sampling)
    if args.vbench:
        result["vbench"] = vbench_bridge(model, ae, context, out, info=info, dimensions=args.vbench_dimensions,
                                         per_prompt=args.vbench_per_prompt, frames=frames, height=height,
                                         width=width, fps=args.fps, vbench_python=args.vbench_python,
                                         vbench_results=args.vbench_results, gpus=args.vbench_gpus,
                                         max_prompts=args.vbench_max_prompts, **sampling)
    atomic_write_json(out / "result.json", result)
    return result

