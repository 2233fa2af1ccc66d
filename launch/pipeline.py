"""The pipeline runner ``ldm demo`` and ``ldm compare`` share: run a verb (``train-ae``,
``extract``, ``train``) with its typed config, in this process or on several ranks under
``torchrun``. The config travels as a YAML file (``ldm VERB --config FILE``, the verbs' own
config system), never as flags rebuilt by hand, and is kept next to the verb's log: a rerun with
the same config uses the same file, one with another config gets the next free name, so the file
of an earlier run (which its folder may still hold) is never overwritten.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from launch import dist
from ldm import config as cfglib
from ldm.checkpoint import atomic_write_bytes, atomic_write_json, read_json

ROOT = Path(__file__).resolve().parents[1]


def _function(verb: str):
    """The function behind a verb (imported on use: each pulls in its own dependencies)."""
    if verb == "train-ae":
        from launch.train_ae import train_autoencoder
        return train_autoencoder
    if verb == "extract":
        from launch.extract import extract
        return extract
    if verb == "train":
        from launch.train import train
        return train
    raise ValueError(f"the pipeline runs train-ae, extract and train, not {verb!r}")


def config_file(log: Path, text: str) -> Path:
    """The YAML beside ``log`` holding ``text``: ``<log stem>.yaml`` when absent or the same,
    else the first ``<log stem>.N.yaml`` (N = 2, 3, ...) that is absent or the same (written
    atomically; an earlier run's file is never overwritten)."""
    n = 1
    while True:
        path = log.with_suffix(".yaml" if n == 1 else f".{n}.yaml")
        if not path.exists():
            atomic_write_bytes(path, text.encode())
            return path
        if path.read_text() == text:
            return path
        n += 1


def run_verb(verb: str, cfg: Any, log: Path, ranks: int = 1, in_process: bool = False,
             threads: int | None = None) -> Any:
    """Run ``ldm VERB`` with the config dataclass ``cfg``; ``log`` gets the command's output (appended
    to, never truncated) and, beside it, the config as ``<log stem>.yaml`` (`config_file`).
    ``in_process`` (one rank only) calls the verb's function here and returns its result; otherwise
    ``ranks`` processes run under ``torchrun --standalone`` (``threads``: their OMP_NUM_THREADS)
    and a failure raises with the log's tail."""
    function = _function(verb)
    log.parent.mkdir(parents=True, exist_ok=True)
    config = config_file(log, yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
    if in_process:
        if ranks != 1:
            raise ValueError(f"in_process runs one rank, not {ranks}")
        result = function(cfg)
        if isinstance(result, dict) and result.get("stopped"):  # a trainer stopped by Ctrl-C / SIGTERM, saved
            raise KeyboardInterrupt(f"`ldm {verb}` stopped at step {result.get('steps')} ({result['stopped']})")
        return result
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           "-m", "launch.cli", verb, "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "a") as f:  # a rerun into the same folder adds to the earlier runs' log
        start = f.tell()
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        # the caller's working folder: relative paths in the config mean what they meant to the user
        # stopped with this process (SIGTERM, SIGKILL): the launcher gets SIGTERM and its trainers save a
        # checkpoint (was: they trained on as orphans into the folder a rerun resumes)
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=dist.stop_with_parent)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the stage got the Ctrl-C too: a trainer finishes its step and saves it
            try:
                proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: the stage stops at once as well
                proc.kill()
                proc.wait()
            raise
    if code != 0:
        tail = log.read_bytes()[start:].decode(errors="replace")[-4000:]
        raise RuntimeError(f"`ldm {verb}` on {ranks} rank(s) failed (exit {code}); log {log}:\n{tail}")
    return None


class Stages:
    """The stages of a pipeline (``ldm demo``, each autoencoder of ``ldm compare``), timed, each
    finished one recorded in ``path`` (its seconds and JSON result): a rerun into the same folder
    returns what a finished stage gave instead of running it again, so an interrupted pipeline
    resumes at the stage it was in. ``tag`` prefixes the progress lines."""

    def __init__(self, path: Path, tag: str) -> None:
        self.path, self.tag = Path(path), tag
        self.done: dict[str, Any] = read_json(self.path) if self.path.is_file() else {}
        self.seconds: dict[str, float] = {}  # this run's and the reused stages', in the order met
        self.resumed: list[str] = []  # the stages an earlier run finished

    def run(self, name: str, fn: Callable[[], Any], keep_result: bool = True,
            key: dict[str, Any] | None = None) -> Any:
        """``fn()``, timed and recorded (its result only with ``keep_result``), or what an earlier run
        recorded for ``name``. ``key``: the settings the stage's result depends on (setting -> value),
        recorded with it; an earlier result recorded with another key is made again, the settings that
        changed said, and forgotten first (the files it describes are about to be overwritten)."""
        if key is not None and name in self.done and self.done[name].get("key") != key:
            print(f"[{self.tag}] {name} again: {_changes(self.done[name].get('key') or {}, key)}", flush=True)
            self.redo(name)
            atomic_write_json(self.path, self.done)
        if name in self.done:
            self.seconds[name] = self.done[name]["seconds"]
            self.resumed.append(name)
            print(f"[{self.tag}] {name} done by an earlier run ({self.seconds[name]:.1f}s)", flush=True)
            return self.done[name]["result"]
        with self.timed(name):
            result = fn()
        self.done[name] = {"seconds": self.seconds[name], "result": result if keep_result else None,
                           **({"key": key} if key is not None else {})}
        atomic_write_json(self.path, self.done)
        return result

    def redo(self, name: str) -> None:
        """Run ``name`` again (its recorded result is not usable on its own)."""
        self.done.pop(name, None)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time a stage that is not recorded (done again on every run)."""
        print(f"[{self.tag}] {name} ...", flush=True)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        print(f"[{self.tag}] {name} done in {self.seconds[name]:.1f}s", flush=True)

    def earlier_seconds(self) -> float:
        """The time earlier runs spent on the stages this run reused."""
        return sum(self.seconds[n] for n in self.resumed)


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The settings that differ between two stage keys, each added, left out or changed."""
    said = []
    for k in {**old, **new}:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if a is None or a is False:
            said.append(f"{k} added")
        elif b is None or b is False:
            said.append(f"{k} left out")
        else:  # a file's sha256 is not worth printing
            said.append(f"{k} changed" + (f" ({a} -> {b})" if len(str(a)) < 20 else ""))
    return ", ".join(said)
