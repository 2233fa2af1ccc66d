"""Helpers for tests that spawn several processes: a free loopback port, a torchrun command, a rank
function for ``torch.multiprocessing.spawn`` that ends its process safely, a folder held by another process,
and the in-process one-rank training run a several-rank run is compared with."""
import contextlib
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (tests running at once never share a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, n: int = 3000) -> str:
    """The last ``n`` characters of a process's output for an assertion's message, with the report of a
    native crash kept whole when it came earlier (faulthandler's stacks: a plain tail cut off where it died)."""
    found = [i for i in (text.find("Fatal Python error"), text.find("terminate called")) if i >= 0]
    if not found or min(found) >= len(text) - n:
        return text[-n:]
    return text[min(found):min(found) + n] + "\n[...]\n" + text[-n:]


def rank_then_exit(rank: int, fn, *args) -> None:
    """``fn(rank, *args)`` in a child of ``torch.multiprocessing.spawn(rank_then_exit, args=(fn, ...))``, then the
    process ends without the interpreter's teardown (`launch.dist.exit_without_teardown`), as ``ldm`` ends a rank:
    the gloo group's worker threads outlive ``destroy_process_group`` and may still free a collective's tensors,
    and a teardown begun meanwhile aborts the process (seen in CI: SIGABRT, "terminate called without an active
    exception", in a 2-rank test whose checks had all passed). An error in ``fn`` goes to spawn as before."""
    from launch import dist

    fn(rank, *args)
    dist.exit_without_teardown(0)


def process_env(*, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child, with ``extra`` set, and without the process-group variables
    (``MASTER_*``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) an in-process run of another test left: its group may
    still hold that port, and the child would try to join it. ``drop``: more name prefixes to leave out."""
    import os

    prefixes = ("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", *drop)
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, **extra}


def torchrun(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port <free> [extra] -m launch.cli ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *extra, "-m", "launch.cli", *args]


@contextlib.contextmanager
def folder_held_by_another_process(folder):
    """``launch.runs.claim_folder(folder)`` held by a separate process (a live run's lock) while the block runs."""
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", f"from launch import runs; runs.claim_folder({str(folder)!r}); "
                               "print('held', flush=True); input()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=root)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("")


@contextlib.contextmanager
def one_thread():
    """Torch at one thread while the block runs, as each process a test launches runs (``OMP_NUM_THREADS=1``):
    float sums, and so the bytes a run writes, depend on the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_process(cfg, **kw):
    """``launch.train.train(cfg)`` in this process at one thread: the reference a several-rank run is compared
    with (one rank of the global batch gives the same losses), without the seconds of a launch."""
    from launch.train import train

    with one_thread():
        return train(cfg, **kw)
