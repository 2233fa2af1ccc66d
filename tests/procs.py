"""Helpers for tests that spawn several processes: a free loopback port and a torchrun command."""
import socket
import sys


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (tests running at once never share a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N --master_port <free> [extra] -m launch.cli ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *extra, "-m", "launch.cli", *args]
