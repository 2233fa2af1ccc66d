"""Two "nodes" on 127.0.0.1 (two torchrun agents, --nnodes 2, c10d rendezvous): extraction splits
clips over both with none lost or duplicated, and training matches one process over the same global batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data import shards
from data.manifest import load_manifest
from data.synth import synth_dataset
from launch.train import TrainConfig
from ldm import config as cfglib
from procs import free_port, one_process, tail

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "launch" / "configs" / "train-debug.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _two_nodes(*args: str, cwds: tuple[Path, Path] = (ROOT, ROOT)) -> list[subprocess.CompletedProcess]:
    """Run ``ldm ARGS`` on two "nodes" (node n in ``cwds[n]``); assert success unless ``cwds`` differ."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                               f"127.0.0.1:{port}", "--rdzv_id", "ldm-test", "-m", "launch.cli", *args],
                              env=ENV, cwd=cwds[n], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        assert p.returncode == 0 or cwds[0] != cwds[1], tail(err)
    return done


@pytest.mark.dist
def test_two_nodes_extract_and_train(tmp_path):
    synth_dataset(tmp_path / "videos", num=10, frames=8, size=32, fps=8, seed=0)
    extract = ["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "videos"), "--frames", "8",
               "--height", "32", "--width", "32", "--shard-size", "3", "--text-encoder", "builtin"]
    _two_nodes(*extract, "--output", str(tmp_path / "lat"))
    m = load_manifest(tmp_path / "lat")
    assert m.world_size == 2 and m.counts.written == 10
    assert sorted(s["meta"]["index"] for s in shards.read_all(tmp_path / "lat")) == list(range(10))

    over = [f"data.shards={tmp_path / 'lat'}", "steps=3", "save_every=3", "log_every=1", "engine.deepspeed=zero2"]
    _two_nodes("train", "--config", str(YAML), *over, "data.batch_size=2", f"output={tmp_path / 'nodes'}")
    # one process over the same global batch (2 ranks x 2) gives the same losses
    one_process(cfglib.load_yaml(YAML, TrainConfig, [*over, "data.batch_size=4", f"output={tmp_path / 'one'}"]))
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("nodes", "one")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.dist
def test_an_output_that_is_not_shared_by_the_nodes_is_one_line_before_training(tmp_path):
    """Each node's own folder (its local disk; here a relative output from two working folders):
    one line on the first node before any step (was: rank 0 sealed checkpoints without the other
    node's optimizer files, and the resume died with a FileNotFoundError traceback)."""
    synth_dataset(tmp_path / "videos", num=4, frames=8, size=32, fps=8, seed=0)
    shards_dir = tmp_path / "lat"
    from launch.cli import main as ldm
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "videos"), "--frames", "8",
             "--height", "32", "--width", "32", "--shard-size", "2", "--text-encoder", "builtin", "--output",
             str(shards_dir)])
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for n in nodes:
        n.mkdir()
    first, _ = _two_nodes("train", "--config", str(YAML), f"data.shards={shards_dir}", "data.batch_size=1",
                          "steps=2", "output=runs/dit", cwds=nodes)
    assert first.returncode != 0
    lines = [x for x in first.stderr.splitlines() if "ldm train: error:" in x]
    assert len(lines) == 1 and "not the same folder on every rank" in lines[0], tail(first.stderr)
    assert "Traceback" not in first.stderr.split("ldm train: error:")[0][-2000:]
    assert not (nodes[0] / "runs" / "dit" / "checkpoints").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_a_node_whose_local_copy_of_the_shards_differs_is_one_line_before_training(tmp_path):
    """Shards copied to each node's own disk (here the same relative path in two working folders),
    one copy cut short: one line before any step (was: that node's ranks read a shorter stream than
    the others, so clips were read twice or passed over, with a warning only)."""
    synth_dataset(tmp_path / "videos", num=4, frames=8, size=32, fps=8, seed=0)
    from launch.cli import main as ldm
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "videos"), "--frames", "8",
             "--height", "32", "--width", "32", "--shard-size", "2", "--output", str(tmp_path / "lat")])
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for n in nodes:
        shutil.copytree(tmp_path / "lat", n / "lat")
    tar = nodes[1] / "lat" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:-4096])  # a copy that stopped early
    first, _ = _two_nodes("train", "--config", str(YAML), "data.shards=lat", "data.batch_size=1", "steps=2",
                          f"output={tmp_path / 'dit'}", cwds=nodes)
    lines = [x for x in first.stderr.splitlines() if "ldm train: error:" in x]
    assert first.returncode != 0 and len(lines) == 1, tail(first.stderr)
    assert "ranks disagree on the latent shards" in lines[0]
    assert not (tmp_path / "dit" / "checkpoints").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_the_slurm_recipe_trains_on_two_nodes(tmp_path):
    """launch/recipes/slurm-train.sbatch as SLURM runs it, with stand-ins for srun (one task per
    node, the step's SLURM variables) and scontrol: both nodes' torchrun meet at the first node and
    train."""
    synth_dataset(tmp_path / "videos", num=4, frames=8, size=32, fps=8, seed=0)
    from launch.cli import main as ldm
    with pytest.warns(UserWarning):
        ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / "videos"), "--frames", "8",
             "--height", "32", "--width", "32", "--shard-size", "2", "--text-encoder", "builtin", "--output",
             str(tmp_path / "lat")])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(  # one task per node; the options before the command are srun's own
        "#!/bin/bash\necho \"$TORCH_ELASTIC_SHUTDOWN_TIMEOUT\" > shutdown_timeout\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_STEP_ID=0 SLURM_PROCID=$i SLURM_NODEID=$i "
        "SLURM_NTASKS=$SLURM_NNODES \"$@\" & done\nrc=0; for p in $(jobs -p); do wait $p || rc=$?; done; exit $rc\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "1",
           "SLURM_CPUS_PER_TASK": "1", "MASTER_PORT": str(free_port())}
    r = subprocess.run(["bash", str(ROOT / "launch" / "recipes" / "slurm-train.sbatch"), str(YAML),
                        f"data.shards={tmp_path / 'lat'}", f"output={tmp_path / 'run'}", "steps=2", "data.batch_size=1",
                        "log_every=1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer.json").read_text())[
        "world_size"] == 2
    assert (tmp_path / "shutdown_timeout").read_text().strip() == "100"  # torchrun's, the recipe's default


@pytest.mark.parametrize("recipe", ["slurm-train.sbatch", "slurm-extract.sbatch"])
def test_the_slurm_recipes_give_the_ranks_time_to_save_before_torchrun_kills_them(recipe):
    """SLURM's SIGTERM comes --signal=TERM@LEAD seconds before the time limit; torchrun passes it on and
    SIGKILLs its ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (30 s unless set): the recipes give
    the ranks more than that default to write a checkpoint or finish a shard, and less than the lead,
    so torchrun is not killed at the limit first (was: 30 s whatever the lead; the extraction recipe
    sent no early signal at all)."""
    import re
    text = (ROOT / "launch" / "recipes" / recipe).read_text()
    lead = int(re.search(r"^#SBATCH --signal=TERM@(\d+)$", text, re.M).group(1))
    shutdown = int(re.search(r"^export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=\$\{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)\}$",
                             text, re.M).group(1))
    assert 30 < shutdown <= lead - 20
    assert "--kill-on-bad-exit=1" in text and re.search(r"^#SBATCH --requeue$", text, re.M)


# two ranks of `extract`, whose default group times out after 3 s; rank 1 finishes 6 s after rank 0
_LATE_RANK = """
import datetime, os, sys, time
import torch.distributed as td
from launch import extract
from launch.cli import console
td.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
encode = extract._extract_shards
def late(*args, **kw):
    done = encode(*args, **kw)
    if td.get_rank() == 1:
        time.sleep(6)
    return done
extract._extract_shards = late
status = console(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", sys.argv[1], "--output",
                  sys.argv[2], "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "2"])
from launch import dist
dist.exit_without_teardown(status)  # as `ldm` ends a rank of a gloo group (procs.rank_then_exit)
sys.exit(status)
"""


@pytest.mark.slow
@pytest.mark.dist
def test_a_rank_that_finishes_long_after_the_others_does_not_time_out_the_extraction(tmp_path):
    """The end-of-run waits (rank 0 for the slowest rank's shards, the others while rank 0 merges and
    verifies) use their own group with LDM_WAIT_TIMEOUT_S, not the default group's timeout (NCCL:
    10 min), which crashed ranks that finished early after every shard was written."""
    synth_dataset(tmp_path / "in", num=3, frames=8, size=32, fps=8, seed=0)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _LATE_RANK, str(tmp_path / "in"), str(tmp_path / "out")],
                              env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [(p.communicate(timeout=240), p.returncode) for p in procs]
    for (out, err), code in results:
        assert code == 0, tail(err)
    assert load_manifest(tmp_path / "out").counts.written == 3


def test_the_end_of_run_wait_timeout_is_read_from_its_variable(monkeypatch):
    """LDM_WAIT_TIMEOUT_S sets the wait group's timeout; a value that is not a positive number is one line."""
    import datetime

    import torch.distributed as td

    from launch import dist
    from ldm.errors import UserError

    # an in-process `ldm train` earlier in this worker keeps its 1-rank group (DeepSpeed caches it): use it;
    # an in-process `ldm extract` after it left its wait group in the module: start without it
    monkeypatch.setattr(dist, "_WAIT_GROUP", None)
    made = not td.is_initialized()
    if made:
        td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=5))
    try:
        for bad in ("ten", "0"):
            monkeypatch.setenv(dist.WAIT_TIMEOUT_ENV, bad)
            with pytest.raises(UserError, match=f"LDM_WAIT_TIMEOUT_S='{bad}': give the seconds"):
                dist.open_wait_group()
        monkeypatch.setenv(dist.WAIT_TIMEOUT_ENV, "7200")
        dist.open_wait_group()
        assert dist._WAIT_GROUP is not None and td.get_backend(dist._WAIT_GROUP) == "gloo"
        dist.wait_all()
    finally:
        if made:
            dist.cleanup()
        elif dist._WAIT_GROUP is not None:
            td.destroy_process_group(dist._WAIT_GROUP)
            dist._WAIT_GROUP = None
    assert dist._WAIT_GROUP is None
