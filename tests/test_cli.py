"""Every `ldm` verb imports and answers --help; `ldm list --json` reports the registries."""
import json
import sys
from pathlib import Path

import pytest

from launch.cli import VERBS, console, main, package_version
from procs import process_env


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: ldm " + verb in capsys.readouterr().out


def test_list_json(capsys):
    assert main(["list", "--json", "--frames", "17", "--height", "64", "--width", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {d["name"]: d for d in out["autoencoders"]}
    assert names["causal3d-f4x8c4-debug"]["latent_shape"] == {"z": [4, 5, 8, 8]}
    assert names["kl2d-f8c4"]["compression_factor"] == pytest.approx(48.0)
    assert {"dit-debug", "dit-standard"} <= {d["name"] for d in out["dits"]}


def test_list_shows_each_autoencoder_at_a_length_it_takes_with_its_parameters(capsys, monkeypatch):
    import fakes  # noqa: F401  (registered, as in any process that ran the contract tests: families longer
    # than the column's 10 characters, e.g. fake-tokens, must keep the columns in line)
    import launch.list_models as list_models
    from autoencoders import build

    assert main(["list", "--json", "--height", "64", "--width", "64"]) == 0  # 17 frames: cmvae takes 16 or 20
    out = json.loads(capsys.readouterr().out)
    rows = {d["name"]: d for d in out["autoencoders"]}
    assert rows["cmvae-z4-debug"]["reference_input"] == [3, 16, 64, 64]
    assert rows["cmvae-z4-debug"]["frames_note"].startswith("16f: cmvae: needs")
    causal = rows["causal3d-f4x8c4-debug"]
    assert causal["reference_input"][1] == 17 and "frames_note" not in causal
    assert main(["list", "--height", "64", "--width", "64"]) == 0
    text = capsys.readouterr().out
    assert " z:4x4x8x8 @16f " in next(line for line in text.splitlines() if "cmvae-z4-debug" in line)
    assert text.count("@16f: cmvae: needs") == 1  # one note per reason, not per row
    # parameter counts (a meta-device build, no weights), in the JSON and as a right-aligned column
    for name in ("causal3d-f4x8c4-debug", "ivvae-z8-debug", "cmvae-z4-debug"):
        assert rows[name]["params"] == build(name).num_parameters()
    # every shipped model has weights (tests/fakes.py's stand-ins have none)
    assert all(d["params"] > 0 for d in out["autoencoders"] + out["dits"] if not d["name"].startswith("fake-"))
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["name", "family", "params"]
    assert next(line for line in lines if line.split()[:1] == ["ivvae-z8"]).split()[2] == "107.4M"
    assert next(line for line in lines if line.split()[:1] == ["causal3d-f4x8c4-debug"]).split()[2] == \
        f"{rows['causal3d-f4x8c4-debug']['params'] / 1e6:.2f}M"
    end = lines[1].index("params") + len("params")
    assert all(line[:end].endswith(list_models.params_text(rows[line.split()[0]]["params"]))
               for line in lines[2:] if line.split() and line.split()[0] in rows)
    dits = lines[next(i for i, line in enumerate(lines) if line.startswith("dits")) + 1:]
    assert dits[0].split()[:2] == ["name", "params"] and dits[1].split()[1].endswith("M")
    # Hi-VAE: both rates, with the content latent (the row) and of the motion alone (the paper's)
    motion = rows["hivae-s"]["motion_compression_factor"]
    assert motion > rows["hivae-s"]["compression_factor"] and f"hivae-s {motion:.1f}" in text
    monkeypatch.setattr(list_models, "NEAREST_FRAMES", 0)  # nothing near: the row keeps its error
    assert main(["list", "--height", "64", "--width", "64"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "cmvae-z4-debug" in line)
    assert "needs 1 frame (an image) or a multiple of 4 frames" in line and "@" not in line


def test_deepspeed_launcher_flag_is_dropped(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--local_rank=1", "list", "--help"])
    assert e.value.code == 0


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        console(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ldm {package_version()}"
    assert package_version() != "unknown"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--shard-size SHARD_SIZE videos per shard (= clips per shard with one clip per video) (default: 64)" in text
    assert "--frames FRAMES (default: 17)" in text and "--device {auto,cpu,cuda} (default: auto)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])   # sub-commands too; helps that state their default keep it
    text = " ".join(capsys.readouterr().out.split())
    assert "frames per clip (default 17," in text and "--seed SEED dataset seed (default 0)" in text
    assert "--layout {folder,shards} folder: videos/*.mp4 + metadata.jsonl; shards: raw WebDataset video shards " \
           "(default: folder)" in text


def test_config_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """``--config NAME`` finds a built-in YAML (configs/ or configs/recipes/) when no such file is
    here; a file of that name here wins; anything else is one line listing the names."""
    from launch.configs import CONFIG_DIR, builtin_names, config_path

    monkeypatch.chdir(tmp_path)
    assert config_path("train-debug") == str(CONFIG_DIR / "train-debug.yaml")
    assert config_path("hivae-stage1.yaml") == str(CONFIG_DIR / "recipes" / "hivae-stage1.yaml")
    (tmp_path / "train-debug.yaml").write_text("steps: 3\n")
    assert config_path("train-debug.yaml") == "train-debug.yaml"
    names = builtin_names()
    assert {"train-debug", "hivae-stage1", "demo-quick"} <= set(names) and "accelerate-zero2" not in names
    assert main(["train", "--config", "hivae-generator", "--print-config"]) == 0
    assert "model:" in capsys.readouterr().out
    # overrides on both sides of a flag, in order (was: "unrecognized arguments: steps=7 save_every=3")
    assert main(["train", "--config", "hivae-generator", "steps=5", "--allow-change", "steps", "steps=7",
                 "save_every=3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "\nsteps: 7\n" in printed and "\nsave_every: 3\n" in printed
    with pytest.raises(SystemExit):  # argparse's own error, as before
        main(["train", "--config", "hivae-generator", "steps=5", "--print-config", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    assert console(["train", "--config", "nope", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm train: error: config file nope not found; give a YAML path or a built-in config: ")
    assert "train-debug" in err and "\n" not in err
    # another verb's config says whose it is (was: a list of unknown keys)
    assert console(["train-ae", "--config", "hivae-generator", "--print-config"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "ldm train-ae: error: --config hivae-generator is an `ldm train` config: it has ema_decay, engine, flow")
    assert console(["train", "--config", "hivae-stage1", "--print-config"]) == 2
    assert "run `ldm train-ae --config hivae-stage1`" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text("stepz: 3\n")  # a key of no verb: the verb's own error
    assert console(["train", "--config", "typo.yaml", "--print-config"]) == 2
    assert "unknown key(s) ['stepz']" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_no_error():
    """``ldm list --json | head``: the pipe closes while ldm writes (here a verb that prints 200 kB as
    `ldm list --json` prints 97 kB, more than a pipe holds, without building its 74 models); status
    141 as for any tool a pipe ended, and no traceback."""
    import subprocess

    code = ("import sys; from launch import cli\n"
            "def verb_that_prints_a_lot(argv): print('{' + 'x' * 200_000 + '}'); return 0\n"
            "cli.main = verb_that_prints_a_lot\n"
            "sys.argv[1:] = ['list', '--json']\n"
            "sys.exit(cli.console())")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10).startswith(b"{")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_a_crash_in_native_code_prints_where_each_thread_was():
    """A verb that dies in native code (here an abort, as a CUDA, NCCL or gloo library does) prints the Python stack
    of every thread (`faulthandler`), naming the verb's function (was: the process died without a word)."""
    import signal
    import subprocess

    code = ("import os, sys; from launch import cli\n"
            "def verb_that_aborts(argv): os.abort()\n"
            "cli.main = verb_that_aborts\n"
            "sys.exit(cli.console(['list']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]
    assert "Fatal Python error: Aborted" in proc.stderr and "in verb_that_aborts" in proc.stderr, proc.stderr[-2000:]


LATE_NATIVE_THREAD = """
import sys, time
import torch
from launch import cli

@torch.jit.script
def busy(x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = torch.mm(x, x) / 64.0
    return x

@torch.jit.script
def start(x: torch.Tensor, n: int) -> torch.jit.Future[torch.Tensor]:
    return torch.jit.fork(busy, x, n)

def verb(argv):
    import atexit
    import torch.distributed as td
    from launch.train import _single_process_group
    _single_process_group()  # what a one-process `ldm train` starts (a torchrun rank: `init_distributed`)
    td.all_reduce(torch.ones(4))
    atexit.register(print, "atexit ran", flush=True)
    # a native thread that takes the GIL about a second after the verb returned, as a gloo worker freeing
    # a collective's tensors may
    start(torch.ones(64, 64), 50000).then(lambda f: print("late callback", flush=True))
    sys.stdout.write("not flushed by the verb")
    if sys.argv[1] == "raise":
        raise RuntimeError("a bug of the verb")
    return 3

cli.main = verb
sys.exit(cli.console())
"""


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_a_rank_ends_without_the_interpreters_teardown(ending, tmp_path):
    """A process that started a process group ends, as the ``ldm`` program, without the interpreter's
    teardown: a native thread still running then (gloo's workers after the last collective) cannot abort it
    (was: SIGABRT or SIGSEGV after the verb's work was done; PyTorch issue 190489, twice in this project's
    CI). The verb's status is kept (an escaped error: its traceback, status 1), the atexit handlers run and
    the streams are flushed."""
    import subprocess

    env = process_env(OMP_NUM_THREADS="1")
    script = tmp_path / "verb.py"  # a file: TorchScript reads its functions' source
    script.write_text(LATE_NATIVE_THREAD)
    proc = subprocess.run([sys.executable, str(script), ending], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == (3 if ending == "return" else 1), proc.stderr[-2000:]
    assert proc.stdout == "not flushed by the verbatexit ran\n"  # the callback never ran: the process had ended
    assert ("RuntimeError: a bug of the verb" in proc.stderr) == (ending == "raise"), proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr and "Fatal Python error" not in proc.stderr, proc.stderr[-2000:]


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import launch.list_models as list_models

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(list_models, "run", interrupted)
    assert console(["list"]) == 130
    assert capsys.readouterr().err.strip() == "ldm list: interrupted"
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback
        console(["list", "--debug"])


def test_one_process_verbs_refuse_ranks_and_say_how_to_run(monkeypatch, tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m launch.cli eval ...` (or reconstruct, compare, ...): one line
    before any work (was: every rank did the whole evaluation into the same files); the verbs that
    take ranks are not refused."""
    import launch.list_models as list_models

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(list_models, "run", lambda args: pytest.fail("ran on a rank"))
    assert console(["list"]) == 2
    assert "ldm list: error: ldm list runs as one process, not on 2 ranks (torchrun)" in capsys.readouterr().err
    # eval takes ranks, eval gen for FVD / FID alone: the attribute benchmark is refused before any work
    assert console(["eval", "gen", "--checkpoint", str(tmp_path), "--attributes", "--output", str(tmp_path / "e")]) == 2
    assert "run --attributes / --vbench as one process" in capsys.readouterr().err and not (tmp_path / "e").exists()
    from launch import cli
    assert set(cli.RANKED_VERBS) < set(VERBS)


def test_the_projects_warnings_are_one_line_of_the_command(capsys):
    """A UserWarning of our code prints as ``ldm VERB: warning: ...`` (was: Python's source path,
    line number and source line); others keep Python's format; console puts the format back."""
    import os
    import warnings

    import launch.cli as ours
    from launch.cli import own_warning_format

    fmt = own_warning_format("ldm eval recon", warnings.formatwarning)
    assert fmt(UserWarning("no checkpoint: kl2d has RANDOM\n  weights"), UserWarning, ours.__file__, 131) == \
        "ldm eval recon: warning: no checkpoint: kl2d has RANDOM weights\n"
    other = fmt(DeprecationWarning("old"), DeprecationWarning, ours.__file__, 7)
    assert other.startswith(ours.__file__) and "DeprecationWarning" in other
    assert fmt(UserWarning("x"), UserWarning, os.__file__, 1).startswith(os.__file__)  # a library's own warning
    before = warnings.formatwarning
    assert console(["list"]) == 0
    assert warnings.formatwarning is before
