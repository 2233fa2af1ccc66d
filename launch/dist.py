"""Rank helpers shared by every entry point (the only place that imports ``torch.distributed``).

Works the same under ``torchrun`` / the DeepSpeed launcher (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) and under ``srun`` without torchrun (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID`` of a job step, which ``srun`` marks with ``SLURM_STEP_ID``). A plain ``python``
run is rank 0 of 1 and every helper is a cheap no-op, also in an ``sbatch`` script or an
``salloc`` shell, whose ``SLURM_NTASKS`` is the allocation's, not this process's.
"""
from __future__ import annotations

import atexit
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

from ldm.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torchrun", "slurm" or "single"


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by the launcher?)") from None


def dist_env() -> DistEnv:
    """Rank layout from the launcher's environment variables (torchrun first, then an srun step:
    an sbatch script or salloc shell also holds ``SLURM_PROCID=0`` and the allocation's
    ``SLURM_NTASKS``, but no ``SLURM_STEP_ID``, and runs as one process)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        source = "torchrun"
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "SLURM_STEP_ID" in os.environ:
        rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        source = "slurm"
    else:
        return DistEnv(0, 1, 0, "single")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UserError(f"inconsistent rank layout from {source}: rank={rank} world_size={world} local_rank={local}")
    return DistEnv(rank, world, local, source)


def local_ranks(env: DistEnv) -> int:
    """The ranks of this run on this machine: torchrun's ``LOCAL_WORLD_SIZE``; under ``srun`` this
    node's entry of ``SLURM_STEP_TASKS_PER_NODE`` (``"8(x2),4"``: 8 tasks on nodes 0 and 1, 4 on
    node 2; ``SLURM_NODEID`` picks the entry); else all of them."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    if env.source == "slurm":
        per_node: list[int] = []
        for entry in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", entry.strip())
            if not m:
                per_node = []
                break
            per_node += [int(m[1])] * int(m[2] or 1)
        node = os.environ.get("SLURM_NODEID", "")
        if node.isdigit() and int(node) < len(per_node) and per_node[int(node)] > 0:
            return per_node[int(node)]
    return env.world_size


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join the process group (gloo on CPU, nccl when CUDA is available); no-op for one process.

    Under SLURM without torchrun, ``MASTER_ADDR`` defaults to ``SLURM_LAUNCH_NODE_IPADDR`` and
    ``MASTER_PORT`` to 29500; set them yourself when the launch node is not the first task's node.
    """
    env = dist_env()
    if env.world_size == 1 or torch_dist.is_initialized():
        return env
    if env.source == "slurm":
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        if "MASTER_ADDR" not in os.environ:
            if "SLURM_LAUNCH_NODE_IPADDR" not in os.environ:
                raise UserError("SLURM launch without MASTER_ADDR: export MASTER_ADDR (the first node's "
                                "address) and MASTER_PORT, or launch with torchrun")
            os.environ["MASTER_ADDR"] = os.environ["SLURM_LAUNCH_NODE_IPADDR"]
        os.environ.setdefault("MASTER_PORT", "29500")
    if env.source == "torchrun" and started_by_a_launcher():
        stop_with_parent()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    torch_dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, store=_elastic_store())
    destroy_at_exit()
    return env


def started_by_a_launcher() -> bool:
    """Whether this process is a rank a launcher started and watches: torchrun (and accelerate /
    torch.distributed.run, which set ``TORCHELASTIC_RUN_ID``) or DeepSpeed's launcher (``CROSS_RANK``).
    Ranks started by hand (``RANK=0 WORLD_SIZE=2 ldm ...`` from a shell) are not: their parent
    may end first by design."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "CROSS_RANK" in os.environ


def stop_with_parent() -> None:
    """This process gets SIGTERM when its parent dies (SIGKILLed, out of memory, SIGTERM), as when
    the parent stops it. For a rank of a launcher (torchrun, deepspeed, accelerate): the trainers
    then finish the step, write a checkpoint and exit; without it such a rank trained on as an
    orphan (racing the next run started into its folder) or waited minutes for the dead launcher's
    store. `launch.pipeline` gives it to the launchers `ldm demo` / `ldm compare` start (a
    ``preexec_fn``), which pass it on to their ranks. Linux only (``prctl(PR_SET_PDEATHSIG)``);
    elsewhere nothing changes."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # 1 = PR_SET_PDEATHSIG
        return
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


_DESTROY_REGISTERED = False


def destroy_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, before the communicators'
    own destructors run in its teardown (where NCCL reports a group that was never destroyed, or
    aborts, after the run's last step). Not earlier: DeepSpeed caches its groups, so a process that
    trains again (tests, notebooks) keeps using this one."""
    global _DESTROY_REGISTERED
    if not _DESTROY_REGISTERED:
        atexit.register(cleanup)
        _DESTROY_REGISTERED = True


def joined_a_group() -> bool:
    """Whether this process started a process group (`init_distributed`, or the one-rank group a
    single-process trainer starts for DeepSpeed): its backend's worker threads live to the exit."""
    return _DESTROY_REGISTERED


def exit_without_teardown(status: int) -> None:
    """End this process with ``status`` as interpreter exit would, but without the interpreter's
    teardown: for a process whose process group's native worker threads are still alive.

    Those threads outlive `cleanup`'s ``destroy_process_group`` (DeepSpeed and every parameter keep
    the groups). One that has just finished a collective may still hold its tensors and take the
    GIL to free them; if the teardown has begun by then, Python ends that thread inside a C++
    destructor and the process aborts (``terminate called without an active exception``, SIGABRT,
    after the run's last step; torchrun then reports the whole run failed). PyTorch issue 190489;
    seen here twice, in CI runs of a 2-rank resume on two loaded cores. So the exit steps that matter
    run first, the atexit handlers (`cleanup`, the readers' kill, logging's flush, multiprocessing's
    children) and the standard streams' flush, then ``os._exit``. A non-daemon thread still alive
    (which interpreter exit would wait for): the ordinary exit instead."""
    import sys
    import threading

    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()  # what interpreter exit runs before its teardown (errors are printed, as there)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):  # none, closed, or a reader gone
            pass
    os._exit(status)


def _elastic_store() -> torch_dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart attempt. Without it, a worker
    restarted by ``--max-restarts`` can read the previous attempt's addresses for groups created
    after start-up (DeepSpeed's) and fail to connect; None (plain env:// init) elsewhere."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import datetime
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=datetime.timedelta(minutes=10))
    return torch_dist.PrefixStore(f"ldm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device_for(env: DistEnv, requested: str = "auto") -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else CPU; ``cpu``/``cuda`` force one."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    return torch.device("cuda", env.local_rank)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` of the inference verbs: ``auto`` is bf16 on CUDA and fp32 elsewhere; ``fp32`` /
    ``bf16`` / ``fp16`` as given (fp16 needs CUDA). Models run in it whole, weights included
    (``model.to(dtype)``, as diffusers' ``torch_dtype``): half the activation memory of autocast,
    whose norms return fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


WAIT_TIMEOUT_ENV = "LDM_WAIT_TIMEOUT_S"  # seconds `wait_all` waits for the slowest rank
WAIT_TIMEOUT_S = 24 * 3600  # its default: a day, far above the default group's (NCCL 10 min, gloo 30 min)
_WAIT_GROUP: Any = None


def open_wait_group() -> None:
    """Make the group `wait_all` waits on: gloo (on the CPU, next to NCCL), with the timeout of
    ``LDM_WAIT_TIMEOUT_S``. Called by every rank at the same point, while they are together (making a
    group is itself a wait on every rank); a no-op for one process or when it is made already."""
    global _WAIT_GROUP
    if not is_initialized() or _WAIT_GROUP is not None:
        return
    import datetime
    value = os.environ.get(WAIT_TIMEOUT_ENV, "").strip() or str(WAIT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise UserError(f"{WAIT_TIMEOUT_ENV}={value!r}: give the seconds ranks wait for each other at the end of a "
                        f"run (a number > 0; unset: {WAIT_TIMEOUT_S})")
    _WAIT_GROUP = torch_dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))


def wait_all() -> None:
    """A barrier for waits of unbounded length (ranks with uneven work, rank 0 merging and verifying
    alone): on `open_wait_group`'s group, whose timeout is ``LDM_WAIT_TIMEOUT_S`` (a day unless set),
    not the default group's, which would stop a rank that waits 10 minutes under NCCL. Without that
    group (one process, or not opened), `barrier`."""
    if _WAIT_GROUP is None or not is_initialized():
        barrier()
        return
    torch_dist.barrier(group=_WAIT_GROUP)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order (a one-element list for one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank ``dst``, None on the others (a one-element list
    for one process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    torch_dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device() -> torch.device:
    """Where a collective's tensor must live: the current GPU under NCCL (which cannot reduce CPU
    tensors), else the CPU."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy on the input's device; the input is untouched)."""
    out = values.detach().clone()
    if is_initialized():
        buf = out.to(_comm_device())
        torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.SUM)
        out = buf.to(values.device) / world_size()
    return out


def check_same(value: str, what: str) -> None:
    """Raise on every rank when ranks disagree on ``value`` (e.g. a config or data fingerprint):
    a mismatch would otherwise show up later as a hang or silently different models."""
    if not is_initialized():
        return
    import hashlib
    h = int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "little")
    t = torch.tensor([h, -h], dtype=torch.int64, device=_comm_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    if t[0] != h or -t[1] != h:
        raise UserError(f"ranks disagree on the {what}: check that every node runs the same command, "
                           f"config file and data (rank {rank()} has fingerprint {h:x})")


def shard_list(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Deterministic round-robin split: rank r gets items r, r+world, ...; every item lands on
    exactly one rank and shard sizes differ by at most one."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad shard request: rank={rank} world={world}")
    return list(items[rank::world])


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when several ranks run, else ``module``."""
    if not is_initialized() or world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def cleanup() -> None:
    global _WAIT_GROUP
    _WAIT_GROUP = None
    if is_initialized():
        torch_dist.destroy_process_group()
