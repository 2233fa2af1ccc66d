"""Checkpoint IO: safetensors for tensors, JSON for everything else. Never pickle.

Writes are atomic: a file is written to a temporary name in the same folder, flushed to disk (fsync)
and renamed, so a killed process or a crashed machine never leaves a half-written file under its
final name. Files get the permissions
of any file the user creates (``0666`` minus the umask: ``0644`` under the usual ``022``), so
teammates on a shared cluster can read checkpoints and manifests (``tempfile.mkstemp`` would
make them ``0600``).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldm.errors import UserError


def _temp_file(path: Path) -> tuple[int, Path]:
    """A new, empty ``.<name>.<random>.tmp`` beside ``path`` (created exclusively, mode ``0666``
    minus the umask, applied by the kernel) and its open descriptor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (the names renamed or created in it), to disk:
    whoever wrote them, they then survive a machine crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    fd, tmp = _temp_file(Path(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors save (contiguous, detached CPU copies; shared storage is cloned)."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 minus the umask
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)  # safetensors recreates the file as 0600
        fsync_path(tmp)  # on disk before it has its name (as atomic_write_bytes)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_hash(path: str | Path) -> str:
    """sha256 over the sorted (name, content hash) of every file in a checkpoint folder."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint FILE: safetensors, or a torch file read with
    ``torch.load(weights_only=True)`` (a Lightning ``{"state_dict": ...}`` is unwrapped). Anything
    else (pickled objects, a truncated or foreign file, a folder) is a `UserError` saying what to do."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: pass the checkpoint file itself")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise UserError(f"{path}: expected a .safetensors or {'/'.join(TORCH_SUFFIXES)} checkpoint")
    try:  # a static read of the file's pickle opcodes: nothing is executed
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 (not a zip-format torch file: the weights-only load below judges it)
        unsafe = []
    if unsafe:
        raise UserError(
            f"{path} holds Python objects besides tensors ({', '.join(sorted(unsafe)[:5])}), which "
            f"weights_only=True loading refuses; this platform never loads arbitrary pickles. In an "
            f"environment you trust, re-save its state dict as safetensors (safetensors.torch.save_file) "
            f"and use that file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (a truncated or foreign file: the user's input, not a bug)
        raise UserError(f"{path} is not a torch checkpoint of tensors that loads with weights_only=True "
                        f"(truncated, another format, or pickled objects); convert it to safetensors where "
                        f"you trust it, or give the right file") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise UserError(f"{path}: entries that are not tensors: {bad[:12]}" + (" ..." if len(bad) > 12 else ""))
    return dict(obj)
