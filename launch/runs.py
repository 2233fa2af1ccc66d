"""What both trainers (``ldm train-ae`` and ``ldm train``) share about a run: one way to write,
verify, rotate and find checkpoints, one log (``RunLog``: log.jsonl + TensorBoard, cut back to a
resumed step), one way to react to non-finite losses, and one learning-rate schedule (a pure
function of the step, so resuming needs no scheduler state).

A checkpoint is the folder ``OUTPUT/checkpoints/step-NNNNNNNN/``. It is written under the temporary
name ``.step-NNNNNNNN.tmp`` (``begin``; every rank may write into it, e.g. DeepSpeed's shards),
then ``commit`` (rank 0) writes ``MANIFEST.json`` -- sha256 and size of every file --, flushes every
file and folder to disk (fsync), renames the folder into place and flushes that rename (the rename
is the completion marker: no half-written checkpoint ever has a final name, not even after a
machine crash), points ``checkpoints/latest`` at it and removes all but the newest ``keep``. On resume
``find_checkpoint`` verifies the candidates newest first against their manifests and returns the
first intact one with the reasons the others were rejected. An intact checkpoint is never
deleted to make room for one of the same step (a run that fell back past it): it is kept aside as
``step-N.kept-K``.

``StepProfiler`` records a window of training steps with ``torch.profiler`` into
``OUTPUT/profile/`` (a Chrome trace and the operators that took the most time, per rank).

A run folder is bound to what made it (``check_binding`` / ``Binding.write``): ``run.json``
records every setting that shapes the run -- all of the verb's settings except the harmless ones
it names (logging, checkpoint cadence, workers, progress, device) -- and what the inputs are
(the latents' autoencoder and weights hashes, the list of videos, ...). Resuming into a folder
whose record differs is refused before anything is done or written, naming each differing key
``old -> new`` and the two ways out: a new output folder, or ``--allow-change KEY[,KEY]`` for
an intended change (e.g. ``steps`` for a longer schedule); an allowed change is recorded in
``run.json`` (``changes``).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import multiprocessing
import multiprocessing.util  # its exit step registered before `_kill_readers_left`
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor

from launch import dist
from ldm.checkpoint import atomic_write_bytes, atomic_write_json, file_sha256, fsync_path, read_json, save_tensors
from ldm.errors import UserError

log = logging.getLogger("ldm.checkpoints")

FORMAT = 1
STEP_PREFIX = "step-"
MANIFEST = "MANIFEST.json"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder name, None for anything else (temporary folders, files)."""
    name = path.name
    if not name.startswith(STEP_PREFIX) or not name[len(STEP_PREFIX):].isdigit():
        return None
    return int(name[len(STEP_PREFIX):])


def begin(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (left-overs of a killed run removed)."""
    tmp = root / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_files(folder: Path, files: dict[str, bytes | dict[str, Tensor] | Any]) -> None:
    """``files``: name -> raw bytes, a dict of tensors (``*.safetensors``) or a JSON-able object (``*.json``)."""
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_tensors(folder / name, content)
        elif name.endswith(".json"):
            atomic_write_json(folder / name, content)
        else:
            atomic_write_bytes(folder / name, content)


def commit(root: Path, step: int, keep: int) -> Path:
    """Seal ``begin``'s folder: MANIFEST.json (sha256 + size of every file below it) -> rename to
    ``step-N`` -> ``latest`` -> keep the newest ``keep`` at or below ``step`` (``keep <= 0``: all)."""
    tmp, final = root / f".{step_dir_name(step)}.tmp", root / step_dir_name(step)
    files = {str(p.relative_to(tmp)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    # durable before sealed: every file (whoever wrote it, e.g. DeepSpeed's torch.save) and folder is
    # on disk before the rename, and the rename itself after it, so a machine crash cannot leave a
    # sealed checkpoint with lost data (files just hashed: the fsyncs write what the cache still holds)
    for name in files:
        fsync_path(tmp / name)
    atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
    for folder in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        fsync_path(folder)
    if final.exists():  # a checkpoint of the same step that this run fell back past
        if verify_checkpoint(final) is None:  # intact (e.g. it could not be loaded here): never deleted
            k = 1
            while (root / f"{final.name}.kept-{k}").exists():
                k += 1
            final.rename(root / f"{final.name}.kept-{k}")
            log.warning("%s existed and is intact: kept as %s.kept-%d", final, final.name, k)
        else:  # corrupt or half-written: replaced
            trash = root / f".{final.name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            final.rename(trash)
            shutil.rmtree(trash)
    tmp.rename(final)
    fsync_path(root)
    atomic_write_bytes(root / "latest", (final.name + "\n").encode())
    if keep > 0:
        older = sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := step_of(p)) is not None and s <= step)
        for _, p in older[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def write_checkpoint(root: Path, step: int, files: dict[str, bytes | dict[str, Tensor] | Any], keep: int) -> Path:
    """``begin`` + ``write_files`` + ``commit`` for a checkpoint one process writes whole."""
    write_files(begin(root, step), files)
    return commit(root, step, keep)


# what a full disk, a quota or an I/O error raises while a checkpoint is written (torch.save: a
# RuntimeError "unexpected pos"; safetensors: its own error type)
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def write_failed(root: Path, step: int, error: Exception, what: str = "the checkpoint",
                 kept: str = "the earlier checkpoints are intact") -> OSError:
    """The error to raise when the checkpoint of ``step`` (or ``what`` else into ``root``) could not
    be written (disk full, quota, I/O error; torch and safetensors report these in their own
    exception types): its temporary folder is removed, the earlier checkpoints are untouched, and
    the message says so (``kept``) in one line."""
    shutil.rmtree(root / f".{step_dir_name(step)}.tmp", ignore_errors=True)
    free = shutil.disk_usage(root).free / 2**20 if root.is_dir() else float("nan")
    # each rank writes its own files: a node's own quota, mount or disk fails on its ranks only
    where = f" on rank {dist.rank()} ({socket.gethostname()})" if dist.world_size() > 1 else ""
    return OSError(getattr(error, "errno", None) or errno.EIO,
                   f"writing {what} of step {step} into {root} failed{where} ({type(error).__name__}: {error}; "
                   f"{free:.0f} MiB free there); {kept}: free space and run the same command to resume")


def verify_checkpoint(path: Path, required: tuple[str, ...] = ()) -> str | None:
    """None when MANIFEST.json lists every ``required`` file and every listed file is present with
    its size and sha256; else the reason the checkpoint cannot be trusted."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (half-written checkpoint)"
    try:
        files = read_json(manifest_path)["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, info in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {info['bytes']}"
        if file_sha256(p) != info["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted(((s, p) for s, p in found if s is not None), reverse=True)]


def holds_training(folder: Path) -> bool:
    """A trainer's run folder holds work a rerun could resume or lose: a checkpoint, or its model
    (``final/`` of ``ldm train-ae``, ``export/`` of ``ldm train``). A run that stopped before its
    first checkpoint (a typo, too short videos, out of memory at step 1) holds none, so its
    ``run.json`` binds nothing and the corrected command may start in the same folder."""
    return bool(checkpoints(folder / "checkpoints")) or (folder / "final").exists() or (folder / "export").exists()


def verified_checkpoints(root: Path, required: tuple[str, ...] = ()) -> tuple[list[Path], list[dict[str, str]]]:
    """Every intact checkpoint under ``root``, newest first, and the rejected ones with their
    reasons (newest is by step number, so a complete checkpoint whose ``latest`` update was
    interrupted still counts)."""
    good, rejected = [], []
    for path in checkpoints(root):
        reason = verify_checkpoint(path, required)
        if reason is None:
            good.append(path)
        else:
            rejected.append({"path": str(path), "reason": reason})
    return good, rejected


def find_checkpoint(root: Path, required: tuple[str, ...] = ()) -> tuple[Path | None, list[dict[str, str]]]:
    """The newest intact checkpoint under ``root`` (None when there is none) and the newer ones
    rejected, each with its reason."""
    rejected = []
    for path in checkpoints(root):
        reason = verify_checkpoint(path, required)
        if reason is None:
            return path, rejected
        rejected.append({"path": str(path), "reason": reason})
    return None, rejected


def truncate_log(path: Path, step: int) -> None:
    """Drop the JSONL lines a killed run logged past the step it resumes from (and lines torn by
    the kill), so the log reads as one uninterrupted run with one line per step."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(path, "".join(x + "\n" for x in kept).encode())


class RunLog:
    """A run's ``log.jsonl`` and ``tensorboard/`` (rank 0; inert elsewhere): one JSON line per ``log``
    call, its numbers also to TensorBoard as ``GROUP/KEY`` (``train/loss``, ``val/val_loss``). A run
    resumed from ``resumed_step`` first drops the lines a killed run logged past it (``truncate_log``)
    and hides its TensorBoard points past it (``purge_step``), so both read as one uninterrupted run."""

    def __init__(self, out: Path, resumed_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        truncate_log(self.path, resumed_step)
        self.jsonl = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter
        self.board = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1)

    def log(self, step: int, values: dict[str, Any], group: str = "train") -> None:
        """One line ``{"step": STEP, **values}``; numbers (not None, bools, lists) also to TensorBoard."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.board.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        if self.enabled and not self.jsonl.closed:
            self.jsonl.close()
            self.board.close()


def peak_memory_gib(device: torch.device) -> float | None:
    """For the trainers' logs: this rank's peak of GPU memory held by tensors since the run started
    (the allocator's count, read on the host: no sync), in GiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------
# run binding: a run folder belongs to the settings and inputs that made it
# ------------------------------------------------------------------------------------------
BINDING = "run.json"
ALLOW_FLAG = "--allow-change"
ALLOW_HELP = ("settings that may differ from the run the output folder holds: an intended change, e.g. steps for a "
              "longer schedule (a key or a prefix such as optim; repeatable). Without it a resume with other "
              "settings or inputs is refused")
_ABSENT = "(none)"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level of dotted keys (lists and other values kept as they are; an empty
    dict gives no key)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _covers(prefix: str, key: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def binding_record(settings: dict[str, Any], harmless: tuple[str, ...], facts: dict[str, Any]) -> dict[str, Any]:
    """What a run folder is bound to: the ``settings`` (a config as a dict, flattened to dotted
    keys) except the ``harmless`` keys (or prefixes), plus ``facts`` about its inputs; JSON-normal
    (tuples as lists), as ``run.json`` gives it back."""
    record = {k: v for k, v in flatten(settings).items() if not any(_covers(h, k) for h in harmless)}
    record.update(flatten(facts))
    return json.loads(json.dumps(record, sort_keys=True))


def defaults_of(cls: type) -> dict[str, Any]:
    """The defaults of a config dataclass's fields as binding keys (nested configs flattened;
    fields without a default left out): a setting that did not exist when a run folder was bound
    counts as its default there, so adding a setting does not strand the runs made before it."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        values[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return json.loads(json.dumps(flatten(values)))


def parse_allow(values: list[str] | str | None) -> tuple[str, ...]:
    """``--allow-change`` values (repeatable, comma-separated) -> the keys."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(k.strip() for v in values for k in v.split(",") if k.strip())


def _short(value: Any, limit: int = 60) -> str:
    text = value if value == _ABSENT else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Binding:
    """The record a run folder is bound to, and the allowed changes from the one it held."""

    folder: Path
    record: dict[str, Any]
    changes: dict[str, list[Any]] = field(default_factory=dict)  # key -> [old, new]
    history: list[dict[str, Any]] = field(default_factory=list)

    def write(self) -> None:
        """``run.json`` (atomically; the folder is made if needed). Call on one rank, once the run
        starts writing into the folder."""
        history = self.history + ([{"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": self.changes}]
                                  if self.changes else [])
        atomic_write_json(self.folder / BINDING, {"format": FORMAT, "record": self.record, "changes": history})
        self.history, self.changes = history, {}


def bound_record(folder: str | Path) -> dict[str, Any]:
    """The record of ``folder``'s ``run.json``; {} when there is none or it cannot be read."""
    try:
        return dict(read_json(Path(folder) / BINDING)["record"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_binding(folder: str | Path, record: dict[str, Any], allow: tuple[str, ...] = (),
                  new_folder: str = "--output NEW_FOLDER", defaults: dict[str, Any] | None = None,
                  allow_flag: str | None = ALLOW_FLAG, holds_work: bool = True,
                  harmless: tuple[str, ...] = (), hints: dict[str, str] | None = None) -> Binding:
    """The binding of a run that will write into ``folder``: refused (`UserError`) when the folder
    holds a run whose record differs in a key that ``allow`` does not name (a key, or a prefix of
    keys). ``new_folder`` is how this verb is given another output and ``allow_flag`` how it allows
    a change (None: it has no such flag), both named in the message; ``defaults`` (`defaults_of`)
    stand in for keys the folder's record predates, and keys of it that ``harmless`` now covers (a
    setting made harmless since) bind nothing; ``holds_work=False`` (`holds_training`): the
    earlier run left nothing to resume or lose, and its record binds nothing; ``hints``: a sentence
    the refusal adds for a key it names (how to keep it). Reads only: ``Binding.write`` records it."""
    folder = Path(folder)
    path = folder / BINDING
    old: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    if path.is_file():
        try:
            saved = read_json(path)
            old, history = dict(saved["record"]), list(saved.get("changes", []))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} cannot be read ({e}); move it away only if {folder} holds nothing you need, "
                            f"or give {new_folder}") from None
    unknown = [a for a in allow if not any(_covers(a, k) for k in set(record) | set(old))]
    if unknown:
        raise UserError(f"{ALLOW_FLAG} {','.join(unknown)}: not a setting this run is bound to "
                        f"(bound: {', '.join(sorted(record))})")
    if not path.is_file() or not holds_work:
        return Binding(folder, record)
    old = {k: v for k, v in old.items() if not any(_covers(h, k) for h in harmless)}
    old = {**{k: v for k, v in (defaults or {}).items() if k in record}, **old}
    differ = {k: [old.get(k, _ABSENT), record.get(k, _ABSENT)] for k in sorted(set(old) | set(record))
              if old.get(k, _ABSENT) != record.get(k, _ABSENT)}
    refused = [k for k in differ if not any(_covers(a, k) for a in allow)]
    if refused:
        what = "; ".join(f"{k}: {_short(differ[k][0])} -> {_short(differ[k][1])}" for k in refused)
        allowed = f", or {allow_flag} {','.join(refused)} if the change is intended" if allow_flag else ""
        told = "".join(f"; {hints[k]}" for k in refused if k in (hints or {}))
        raise UserError(f"{folder} holds a run made with other settings or inputs ({what}); give {new_folder} for a "
                        f"new run{allowed}{told}")
    return Binding(folder, record, differ, history)


LOCK = ".lock"
_HELD: dict[Path, Any] = {}  # folder -> the open lock file this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the lock files it inherited, so the lock goes
    with the run's process and not with a worker that outlives it by a few seconds (which refused
    the run that torchrun --max-restarts started next). The parent's lock stays."""
    for handle in _HELD.values():
        handle.close()  # this process's reference only: no unlock (flock is held while any reference is open)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _in_use(folder: Path, new_folder: str, handle: Any) -> str:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    return f"{folder} is in use by another run ({holder}): wait for it to end or stop it, or give {new_folder}"


def check_free(folder: str | Path, new_folder: str = "--output NEW_FOLDER") -> None:
    """`UserError` when a live run holds ``folder`` (`claim_folder`), found without creating or
    holding anything: a trainer asks this before it builds its model and puts it on the GPU,
    and claims the folder once its settings are checked. A shared ``flock`` probe, so the ranks of
    one run asking at once do not see each other."""
    lock = Path(folder) / LOCK
    if Path(folder).resolve() in _HELD or not lock.is_file():
        return
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(_in_use(Path(folder), new_folder, handle)) from None
        except OSError:  # no locking on this file system: `claim_folder` warns
            return


def claim_folder(folder: str | Path, new_folder: str = "--output NEW_FOLDER") -> None:
    """Make ``folder`` and hold it for this run (call on every rank; rank 0 locks): an exclusive
    ``flock`` on ``folder/.lock``, which the kernel drops when the process ends, SIGKILL included,
    so a stale lock cannot exist. A second run started into a folder a live run holds is refused
    on every rank (`UserError`) before it writes anything: two runs would interleave their steps,
    checkpoints and log. A file system without locks (some network mounts) gets a warning only.
    `release_folder` (or the end of the process) lets it go; claiming a folder twice is a no-op."""
    folder = Path(folder)
    error = None
    if dist.is_main() and folder.resolve() not in _HELD:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(folder, new_folder, handle)
            handle.close()
        except OSError as e:  # no locking on this file system
            log.warning("cannot lock %s (%s): make sure no other run writes into it", folder, e.strerror or e)
            _HELD[folder.resolve()] = handle
        else:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
            _HELD[folder.resolve()] = handle
    error = dist.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    check_shared(folder)


def check_output_layout(out: Path, flag: str, folders: tuple[str, ...], files: tuple[str, ...]) -> None:
    """``out`` can hold a run: it is a folder (or not there yet), and of the entries a run writes
    there, ``folders`` are folders and ``files`` files, where present (`UserError` naming the one in
    the way; was: a traceback at the first log line or checkpoint)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag}{out} is a file; give a run folder")
    for name in folders + files:
        path = out / name
        if path.exists() and path.is_dir() != (name in folders):
            what, want = ("a folder", "a file") if path.is_dir() else ("a file", "a folder")
            raise UserError(f"{path} is {what}, where the run keeps {want} of that name; move it away or give "
                            "another output folder")


def check_shared(folder: Path, wait_s: float = 30.0) -> None:
    """`UserError` on every rank when ``folder`` is not one folder for all ranks (an output on each
    node's own disk): rank 0 would seal checkpoints without the other nodes' files. Rank 0 writes a
    file of a fresh name; each rank looks for it, on another host for up to ``wait_s`` (a network
    file system may show a new file late)."""
    if dist.world_size() == 1:
        return
    probe = folder / f".shared-{dist.broadcast_object(os.urandom(6).hex())}"
    host = socket.gethostname()
    if dist.is_main():
        probe.write_text(host)
    dist.barrier()
    main_host = dist.broadcast_object(host)
    deadline = time.monotonic() + (wait_s if host != main_host else 0)
    while not (seen := probe.is_file()) and time.monotonic() < deadline:
        time.sleep(1)
    blind = [(r, h) for r, (ok, h) in enumerate(dist.all_gather_object((seen, host))) if not ok]
    if dist.is_main():
        probe.unlink()
    if blind:
        r, h = blind[0]
        raise UserError(f"{folder} is not the same folder on every rank: rank {r} on {h} does not see the files rank 0 "
                        f"on {main_host} writes there (a folder on each node's own disk?); give an output folder on a "
                        "file system every node shares")


def release_folder(folder: str | Path, made: bool = False) -> None:
    """Let go of `claim_folder`'s lock (nothing when this process does not hold it). ``made``: this
    run made the folder, which goes too when it holds nothing but the lock."""
    folder = Path(folder)
    handle = _HELD.pop(folder.resolve(), None)
    if handle is None:
        return
    if made and folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCK]:
        (folder / LOCK).unlink()  # while still locked: a run starting now makes a lock file of its own
        folder.rmdir()
    handle.close()


class NonFiniteLosses(UserError, RuntimeError):
    """A diverged run (`NonFiniteGuard`): one line from the CLI, with advice, not a traceback."""


class NonFiniteGuard:
    """The non-finite-loss policy of both trainers: a step (or micro-batch) whose loss or gradient
    is not finite on any rank is skipped on every rank; ``limit`` of them in a row stop the run
    (it would only burn compute) with advice; a finite one resets the count."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {limit}")
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def check(self, finite: bool, step: int, what: str = "update skipped") -> bool:
        """Record one step's outcome; True when it may be applied. Raises after ``limit`` in a row."""
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        log.warning("step %d: non-finite loss or gradient, %s (%d in a row)", step, what, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise NonFiniteLosses(f"{self.in_a_row} non-finite losses in a row at step {step}: stopping (lower the "
                                  "learning rate, check the data, or resume from an earlier checkpoint)")
        return False


class StopRequest:
    """A graceful stop for both trainers: SIGTERM (a scheduler's preemption or time limit, a
    launcher stopping its workers) or a first Ctrl-C asks the run to finish its step, write a
    checkpoint and exit; a second Ctrl-C stops at once (KeyboardInterrupt). The request is a flag
    the trainer all-reduces with the step's finite-loss flag, so every rank stops after the same
    step without a read of its own. Handlers are installed from the main thread only, and
    ``close`` puts the earlier ones back."""

    # SIGUSR1: SLURM's `--signal=USR1@120` habit; SIGHUP: a closed terminal (torchrun passes it on)
    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")

    def __init__(self) -> None:
        import signal
        import threading

        self.signal: str | None = None  # the first signal's name, once one came
        self.agreed = False  # some rank was asked to stop and every rank knows (`agree`)
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name)
                if signal.getsignal(num) is not signal.SIG_IGN:  # `nohup ldm train`: a hang-up stays ignored
                    self._previous[num] = signal.signal(num, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def flag(self, device: torch.device | str) -> Tensor:
        """This rank's request as a 0-d float on ``device`` (a fill, no copy from the host), for the
        step's all-reduce: the mean is > 0 when any rank was asked to stop."""
        return torch.full((), float(self.requested), device=device)

    @property
    def cause(self) -> str:
        """What stopped the run: this rank's signal, or another rank's (every rank stops together)."""
        return self.signal or "a signal to another rank"

    def message(self, step: int, steps: int, where: Path) -> str:
        return (f"stopped at step {step} of {steps} ({self.cause}); checkpoint saved in {where}: run the same "
                "command to resume")

    def agree(self, loss: Tensor) -> bool:
        """The trainers' one host read per (micro-)step, one collective over the ranks: whether
        ``loss`` is finite on every rank (returned: a non-finite loss anywhere drops the step
        everywhere), and whether any rank was asked to stop (``agreed`` turns True on every rank,
        each ends after this step; rank 0 says so when only other ranks had the signal, its own
        handler said it otherwise)."""
        flags = torch.stack([torch.isfinite(loss.detach()).float(), self.flag(loss.device)])
        finite, asked = dist.all_reduce_mean(flags).tolist()
        if asked > 0 and not self.agreed:
            self.agreed = True
            if self.signal is None and dist.is_main():
                log.warning("%s: stopping after this step with a checkpoint", self.cause)
        return finite == 1.0

    def _handle(self, signum: int, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.signal is not None:
            if name == "SIGINT":
                raise KeyboardInterrupt
            return  # SIGTERM after Ctrl-C (a launcher passing the stop on): already stopping
        self.signal = name
        if dist.is_main():  # a launcher, SLURM and a terminal signal every rank: one line, not one per rank
            log.warning("%s: stopping after this step with a checkpoint (%s to stop at once)", name,
                        "Ctrl-C again" if name == "SIGINT" else "Ctrl-C")

    def close(self) -> None:
        import signal

        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous = {}


def reader_ignores_interrupts(worker_id: int) -> None:
    """``worker_init_fn`` of the trainers' DataLoaders: a terminal's Ctrl-C reaches every process
    of the foreground group, SLURM's SIGTERM (or ``--signal``) every process of the job step; the
    readers leave `StopRequest`'s signals to the trainer, which still needs batches to finish its
    step, and stop with it."""
    import signal

    for name in StopRequest.SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _kill_readers_left() -> None:
    """At exit: kill the daemonic processes still alive, the DataLoader readers of a loader that an error left
    open. They ignore SIGTERM (`reader_ignores_interrupts`), so multiprocessing's own exit step (SIGTERM to each
    daemonic child, then a join) waited forever: an error raised in a reader (or a reader killed by the kernel)
    printed its traceback and the verb never exited. Registered after multiprocessing's step, so it runs first.
    The loader's SIGCHLD handler goes first (it raised a second traceback, "worker killed by signal")."""
    import signal

    left = [child for child in multiprocessing.active_children() if child.daemon]
    if not left:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in left:
        child.kill()
        child.join(timeout=5)


atexit.register(_kill_readers_left)


def stopped_exit_code(summary: dict[str, Any]) -> int:
    """A trainer's exit status: 0 when it ran to its last step; after a graceful stop 128 + the
    signal's number (130 Ctrl-C, 143 SIGTERM), as for a process the signal ended, so schedulers
    and shells see the run as interrupted (a stop asked of another rank: 143)."""
    import signal

    stopped = summary.get("stopped")
    if not stopped:
        return 0
    return 128 + int(getattr(signal, stopped, signal.SIGTERM))


# ------------------------------------------------------------------------------------------
# learning rate
# ------------------------------------------------------------------------------------------
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ProfileConfig:
    """Which training steps ``torch.profiler`` records: the ``steps`` steps after step ``start``
    (``steps: 0`` = off). The step before them is a warm-up the profiler discards."""

    start: int = 10
    steps: int = 0


class StepProfiler:
    """``torch.profiler`` over a window of training steps (``ProfileConfig``), written when the
    window closes to ``folder``: ``trace-rankR.json`` (Chrome / Perfetto trace), ``ops-rankR.txt``
    (the operators by self time on the device, or on the CPU without one) and ``ops-rankR.json``
    (the same top rows, for scripts, with ``steps_wall_us``: the profiled steps' wall time, and on
    a GPU ``device_busy_share``: the device's busy time over it; well below 1, the GPU waited for the
    host). Made before step ``first_step + 1`` (a resumed run starts later); ``step()`` after each
    training step; a no-op when off or outside the window.

    A trainer names the parts of its step with ``phase(name)`` (``ldm train``: data, forward, sync,
    backward, step, ema): each is a span in the trace, and ``phases_ms_per_step`` in ``ops-rankR.json``
    says what each took per profiled step. On a GPU that is device time, read from CUDA events on
    the current stream (no sync added): from the end of the work queued before the phase to the end
    of its own, so the phases share out the device's timeline (what runs between phases aside: in
    ``ldm train`` the step's loss all-reduce and counters), idle gaps going to the phase whose work
    the GPU waited for. On the CPU, wall time."""

    def __init__(self, cfg: ProfileConfig, folder: Path, rank: int, first_step: int, cuda: bool, rows: int = 40):
        self.folder, self.rank, self.cuda, self.rows = folder, rank, cuda, rows
        self.prof = None
        self.index, self.window = 0, (0, 0)  # this run's step being taken; the profiled ones, [first, end)
        self.marks: dict[str, list[tuple[Any, Any]]] = {}  # phase -> (start, end) marks in the window
        if cfg.steps <= 0 or cfg.start + cfg.steps <= first_step:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        lead = cfg.start - first_step  # steps of this run before the window
        active = cfg.start + cfg.steps - max(cfg.start, first_step)
        wait, warmup = max(lead - 1, 0), min(max(lead, 0), 1)
        self.window = (wait + warmup, wait + warmup + active)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(activities=activities, on_trace_ready=self._write,
                            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1))
        self.prof.start()

    def step(self) -> None:
        self.index += 1  # first: the window's trace is written in prof.step() when its last step ends
        if self.prof is not None:
            self.prof.step()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named part of a training step (the class's docstring); nothing outside the window."""
        if self.prof is None or not self.window[0] <= self.index < self.window[1]:
            yield
            return
        with torch.profiler.record_function(f"phase.{name}"):
            start = self._mark()
            try:
                yield
            finally:
                self.marks.setdefault(name, []).append((start, self._mark()))

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _phases_ms(self) -> dict[str, float]:
        """Each phase's milliseconds per profiled step (its micro-batches summed), in step order."""
        if self.cuda and self.marks:
            torch.cuda.synchronize()
        steps = max(min(self.index, self.window[1]) - self.window[0], 1)  # fewer where a stop ended the window

        def ms(start: Any, end: Any) -> float:
            return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

        return {name: round(sum(ms(a, b) for a, b in marks) / steps, 3) for name, marks in self.marks.items()}

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _write(self, prof: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / f"trace-rank{self.rank}.json"))
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        total, top = top_rows(averages, key, self.rows)
        wall = sum(e.cpu_time_total for e in averages if e.key.startswith("ProfilerStep"))  # the steps' spans
        busy = round(total / wall, 4) if self.cuda and wall else None
        phases = self._phases_ms()
        where = "on the device" if self.cuda else "wall"
        (self.folder / f"ops-rank{self.rank}.txt").write_text(
            "".join(f"phase {name:<10} {ms:10.3f} ms per step ({where})\n" for name, ms in phases.items())
            + averages.table(sort_by=key, row_limit=self.rows) + "\n")
        atomic_write_json(self.folder / f"ops-rank{self.rank}.json", {"sorted_by": key, "total_us": total,
                                                                      "steps_wall_us": wall,
                                                                      "device_busy_share": busy,
                                                                      "phases_ms_per_step": phases, "top": top})
        log.info("profile of the training steps written to %s", self.folder)


def unprofiled(name: str) -> contextlib.AbstractContextManager:
    """`StepProfiler.phase` of a step taken without a profiler: nothing."""
    return contextlib.nullcontext()


def top_rows(averages: Any, key: str, rows: int) -> tuple[float, list[dict[str, Any]]]:
    """The profile's total and its top ``rows`` events by ``key``, each with its share of the total.
    On the device (``self_device_time_total``) only the device's own events count (kernels, copies;
    not the CPU operators that launched them, whose device time is the same kernels again, nor
    user annotations spanning them): the shares add up to the device's busy time. `StepProfiler.phase`'s
    spans are left out on the CPU too: the phases are reported apart."""
    from torch.autograd import DeviceType

    def counted(e: Any) -> bool:
        if e.key.startswith(("ProfilerStep", "phase.")):  # the step's own span is all of it; phases: reported apart
            return False
        if key == "self_device_time_total":
            return e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
        return True

    events = sorted((e for e in averages if counted(e)), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return total, [{"name": e.key, "calls": e.count, "self_us": round(getattr(e, key), 1),
                    "share": round(getattr(e, key) / total, 4)} for e in events[:rows]]


def lr_factor(step: int, warmup: int = 0, schedule: str = "constant", total_steps: int = 0,
              min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the base LR for the update with 0-based index ``step``: linear warm-up
    ``(step + 1) / warmup``, then 1 (``constant``) or a cosine decay to ``min_lr_ratio`` at
    ``total_steps`` (``cosine``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"LR schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, lr: float, drops: tuple[tuple[int, float], ...] = (), **factor: Any) -> float:
    """Learning rate of the update with 0-based index ``step``: ``lr``, replaced by the LR of every
    ``drops`` entry (STEP, LR) with STEP <= step (piecewise constant; H3AE: 1e-4 with (70000, 1e-5)
    for the last 10K of 80K iterations), times ``lr_factor(step, **factor)``."""
    for at, value in drops:
        if step >= at:
            lr = value
    return lr * lr_factor(step, **factor)


# ------------------------------------------------------------------------------------------
# optimizer and RNG state as safetensors + JSON (no pickle)
# ------------------------------------------------------------------------------------------
def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (``state.<param>.<key>``) and JSON (the rest)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                state_json.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": state_json}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, st in meta["state"].items():
        state.setdefault(int(pid), {}).update(st)
    if len(meta["param_groups"]) != len(opt.param_groups):
        raise ValueError(f"checkpoint has {len(meta['param_groups'])} parameter groups, "
                         f"the optimizer {len(opt.param_groups)}")
    groups = []
    for saved, current in zip(meta["param_groups"], opt.param_groups):
        # JSON turned tuples (e.g. AdamW betas) into lists: restore the type the optimizer uses
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every RNG stream of this process (torch, CUDA, numpy, python, and ``generator``)."""
    tensors = {"torch": torch.get_rng_state(), "posterior": generator.get_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(generator: torch.Generator, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["posterior"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    v, st, gauss = meta["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
