"""``ldm eval gen --vbench``: the VBench bridge (`vbench_bridge`).

The standard prompt list (``VBench_full_info.json``) sampled in VBench's file naming (``{prompt}-{index}.mp4``),
``vbench`` run as a subprocess in its own environment (``--vbench-python``; it pins old dependencies and needs
CUDA), the model-free temporal flickering computed in-house, and the Quality / Semantic / Total aggregation
in-house with VBench's normalisation table (`ldm.metrics.vbench_aggregate`). The videos are kept with a record of
what made them (`VBENCH_RECORD`) and reused by a later evaluation of the same DiT, autoencoder and sampling
settings: generating VBench's prompt list takes hours.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autoencoders import Autoencoder
from data.video import probe, read_video, write_video
from dit import Export, load_text_encoder
from launch.sample import generate
from ldm.checkpoint import atomic_write_json, file_sha256, read_json
from ldm.errors import UserError
from ldm.metrics import VBENCH_NORMALIZE, temporal_flickering, vbench_aggregate
from ldm.samplers import SamplingConfig


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
    found = Path(spec.origin).parent / "VBench_full_info.json"
    if not found.is_file():
        raise FileNotFoundError(f"the installed vbench has no {found.name} ({found.parent}); pass --vbench-info")
    return found


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


def sampling_record(sampling: SamplingConfig) -> dict[str, Any]:
    """The settings a VBench folder records; the guidance interval only when set (folders made
    before it existed were sampled with guidance at every step, its default)."""
    record = dataclasses.asdict(sampling)
    if sampling.guidance_interval == SamplingConfig().guidance_interval:
        del record["guidance_interval"]
    return record


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
    try:
        data = json.loads(path.read_text())
        return {k: float(v[0] if isinstance(v, list) else v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path} is not a VBench *_eval_results.json ({{dimension: [score, per-video rows]}}): "
                         f"{e}") from None


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names and raw bytes, in name order): which weights made a video."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


VBENCH_RECORD = "vbench_videos.json"  # beside vbench_videos/: what made the videos in it


def check_vbench_dit(model, export: Export) -> None:
    """VBench's prompts are text: the DiT must read it (ValueError otherwise)."""
    if not (model.config.text_dim and export.text_encoder):
        raise ValueError("VBench prompts need a text-conditioned DiT; this one has no text conditioning")


def vbench_bridge(model, ae: Autoencoder, export: Export, out: Path, *, info: Path,
                  dimensions: Sequence[str] | None, per_prompt: int = 5, frames: int, height: int, width: int,
                  sampling: SamplingConfig = SamplingConfig(), batch_size: int = 8, fps: float = 8.0,
                  device: str | torch.device = "cpu",
                  vbench_python: str | None = None, vbench_results: str | None = None, gpus: int = 1,
                  max_prompts: int | None = None, replace: bool = False, text_encoder=None) -> dict[str, Any]:
    """Sample the standard prompts, score temporal flickering in-house, run VBench if given its
    environment (or read its results), aggregate. Videos already in ``out/vbench_videos`` are
    reused when ``vbench_videos.json`` shows the same DiT and autoencoder weights, clip size, fps
    and sampling settings; videos made otherwise are removed with ``replace``, else refused."""
    check_vbench_dit(model, export)
    entries = vbench_prompts(info, dimensions)[:max_prompts] if max_prompts else vbench_prompts(info, dimensions)
    dims = list(dimensions) if dimensions else sorted({d for e in entries for d in e["dimension"]})
    videos_dir, record_path = out / "vbench_videos", out / VBENCH_RECORD
    record = json.loads(json.dumps({"dit": weights_sha256(model), "autoencoder": weights_sha256(ae), "frames": frames,
                                    "height": height, "width": width, "fps": fps,
                                    "sampling": sampling_record(sampling)}))
    if videos_dir.exists() and not (record_path.is_file() and read_json(record_path) == record):
        if not replace:
            raise UserError(f"{videos_dir} holds videos of another DiT, autoencoder or sampling settings (see "
                            f"{record_path}); choose a new output folder or --overwrite")
        shutil.rmtree(videos_dir)
    videos_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, record)
    text_encoder = text_encoder or load_text_encoder(export, device=device)
    jobs = [(e["prompt_en"], k) for e in entries for k in range(per_prompt)]
    flicker: list[float] = []
    flicker_prompts = {e["prompt_en"] for e in entries if "temporal_flickering" in e["dimension"]}
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        todo = [(p, k) for p, k in chunk if not (videos_dir / vbench_video_name(p, k)).exists()]
        if todo:
            vids = generate(model, ae, export.latent_norm, prompts=[p for p, _ in todo], frames=frames, height=height,
                            width=width, sampling=sampling, text_encoder=text_encoder, device=device, progress=False,
                            seeds=[sampling.seed + b + j for j, job in enumerate(chunk) if job in todo])  # a resume too
            for (p, k), v in zip(todo, vids):
                write_video(videos_dir / vbench_video_name(p, k), v, fps)
        for p, k in chunk:
            if p in flicker_prompts:
                flicker.append(temporal_flickering(read_native(videos_dir / vbench_video_name(p, k))))
    result: dict[str, Any] = {"videos": str(videos_dir), "prompts": len(entries), "per_prompt": per_prompt,
                              "dimensions": dims, "info": str(info), "info_sha256": file_sha256(info)}
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
