"""Ranks that disagree on their config or data fail loudly on every rank."""
import os

import pytest
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from ldm.errors import UserError
from procs import free_port, rank_then_exit


def _worker(rank: int, port: int, values: list[str], results) -> None:
    from launch import dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_distributed("gloo")
    try:
        dist.check_same(values[rank], "training config")
        results[rank] = "same"
    except UserError as e:  # one line per node from `ldm`, not a traceback
        results[rank] = str(e)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("values,agree", [(["a: 1", "a: 1"], True), (["a: 1", "a: 2"], False)])
def test_check_same(values, agree):
    results = mp.Manager().dict()
    mp.spawn(rank_then_exit, args=(_worker, free_port(), values, results), nprocs=2)
    if agree:
        assert dict(results) == {0: "same", 1: "same"}
    else:
        assert all("ranks disagree on the training config" in results[r] for r in (0, 1))
