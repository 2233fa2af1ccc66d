"""A user's mistake is one line and exit status 2, before any work and before any folder appears;
`--debug` / LDM_DEBUG=1 show the traceback; bugs keep theirs; `ldm sample` never overwrites and
records what made each video."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from autoencoders import build
from data.synth import synth_dataset
from data.video import probe
from launch import extract as extract_verb
from launch.cli import console
from ldm.errors import UserError
from procs import process_env, torchrun

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "launch" / "configs" / "train-debug.yaml"
AE = "kl2d-f8c4-debug"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic videos (8 fps), their latents, a 2-step DiT run and a saved autoencoder."""
    base = tmp_path_factory.mktemp("errors")
    synth_dataset(base / "videos", num=6, frames=8, size=32, fps=8, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(["extract", "--autoencoder", AE, "--input", str(base / "videos"), "--output",
                        str(base / "lat"), "--frames", "8", "--height", "32", "--width", "32", "--shard-size", "3",
                        "--text-encoder", "builtin"]) == 0
        assert console(["train", "--config", str(YAML), f"data.shards={base / 'lat'}", f"output={base / 'dit'}",
                        "steps=2", "save_every=2", "data.batch_size=2", "optim.warmup_steps=1"]) == 0
    build(AE).save_pretrained(base / "ae", name=AE)
    return base


def _one_line_error(argv: list[str], capsys, match: str) -> str:
    """Run ``ldm ARGV``: exit status 2 and exactly one line on stderr, ``ldm VERB: error: ...``;
    returns what went to stdout."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # not progress bars
    assert len(lines) == 1 and lines[0].startswith(f"ldm {argv[0]}"), err
    assert ": error: " in lines[0] and match in lines[0], lines[0]
    return out


def _extract(run, out, *extra):
    return ["extract", "--autoencoder", AE, "--input", str(run / "videos"), "--output", str(out), "--frames", "8",
            "--height", "32", "--width", "32", *extra]


EXTRACT_ERRORS = [
    (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["--shard-size", "-3"], "--shard-size must be >= 1, got -3"),
    (["--frames", "0"], "--frames must be >= 1"),
    (["--fps", "0"], "--fps must be > 0"),
    (["--height", "20"], "height and width must be positive multiples of 8, got 20x32"),
    (["--autoencoder", "nope"], "unknown autoencoder 'nope'"),
    (["--text-encoder", "gpt:x"], "--text-encoder: unknown text encoder spec"),
    (["--clips-per-video", "2", "--clip-stride", "4"], "give one of them"),
    (["--tile", "big"], "--tile must be"),
    (["--dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["compile=maybe"], "--compile: compile must be true, false or auto, got 'maybe'"),
    (["--compile", "true", "compile_mode=fast"], "--compile-mode must be one of default, max-autotune"),
]


@pytest.mark.parametrize("flags, match", EXTRACT_ERRORS)
def test_extract_errors_are_one_line_before_any_folder(run, tmp_path, capsys, flags, match):
    _one_line_error(_extract(run, tmp_path / "out", *flags), capsys, match)
    assert not (tmp_path / "out").exists()


def test_wrong_kind_of_folder_says_what_it_is(run, tmp_path, capsys):
    argv = ["extract", "--input", str(run / "videos"), "--output", str(tmp_path / "out"), "--frames", "8",
            "--height", "32", "--width", "32", "--checkpoint"]
    for dit in (run / "dit", run / "dit" / "export"):  # was: KeyError: 'family'
        _one_line_error(argv + [str(dit)], capsys, "is a DiT (an `ldm train` run or export), not an autoencoder")
    _one_line_error(argv + [str(run / "lat")], capsys, "is not a folder with config.json + model.safetensors")
    _one_line_error(argv + [str(tmp_path / "nowhere")], capsys, "not found")
    (tmp_path / "ae-run" / "final").mkdir(parents=True)   # a train-ae run folder instead of its final/
    for f in (run / "ae").iterdir():
        (tmp_path / "ae-run" / "final" / f.name).write_bytes(f.read_bytes())
    _one_line_error(argv + [str(tmp_path / "ae-run")], capsys, "is a `ldm train-ae` run folder; give its final/")
    _one_line_error(_extract(run, tmp_path / "out", "--input", str(tmp_path / "nowhere")), capsys,
                    "input not found")
    _one_line_error(_extract(run, tmp_path / "out", "--input", str(run / "lat")), capsys,  # was: a warning per sample
                    "holds latent shards written by `ldm extract` (manifest.json, shard-*.json), not videos")
    (tmp_path / "file").write_text("x")
    _one_line_error(_extract(run, tmp_path / "file"), capsys, "is a file")
    assert not (tmp_path / "out").exists()
    sample = ["sample", "--class", "1", "--output", str(tmp_path / "s"), "--checkpoint"]
    _one_line_error(sample + [str(run / "ae")], capsys, "is an autoencoder, not a DiT")
    _one_line_error(sample + [str(run / "lat")], capsys, "not a `ldm train` run folder or export")
    assert not (tmp_path / "s").exists()


def test_an_extraction_that_writes_nothing_fails_and_leaves_no_folder(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_text("<html>not a video</html>")
    (bad / "b.mp4").write_bytes(b"")
    out = _one_line_error(_extract(run, tmp_path / "out", "--input", str(bad)), capsys, "no clip was written")
    assert not (tmp_path / "out").exists()
    assert "skipped 2:" in out and "  - a: not a readable video" in out and "  - b: empty file (0 bytes)" in out
    # one good video among them: the run succeeds, prints what it skipped, and a rerun resumes
    (bad / "c.mp4").write_bytes((run / "videos" / "videos" / "000000.mp4").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_extract(run, tmp_path / "out", "--input", str(bad))) == 0
    assert "skipped 2:" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 3, "written": 1, "skipped": 2}
    assert manifest["video"]["clip_fps"] == 8.0   # the native rate of the inputs (no --fps)


def test_print_skipped_shows_windows_and_the_rest(capsys):
    skipped = [{"key": f"v{i}", "reason": "too short"} for i in range(extract_verb.SKIPPED_SHOWN + 3)]
    skipped[0].update(clip=1, start_frame=16)
    extract_verb.print_skipped(skipped)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"skipped {len(skipped)}:" and out[1] == "  - v0 (clip 1 at frame 16): too short"
    assert out[-1] == '  ... 3 more in manifest.json ("skipped")' and len(out) == extract_verb.SKIPPED_SHOWN + 2


SAMPLE_ERRORS = [
    (["--class", "999"], "--class 999: this DiT knows"),              # was IndexError
    (["--class", "-1"], "--class -1: class ids are >= 0"),            # was taken as "no class"
    (["--prompt", ""], "--prompt number 1 is empty"),                 # was TypeError
    (["--prompt", "a red circle", "--prompt", "  "], "--prompt number 2 is empty"),
    (["--class", "1", "--steps", "0"], "--steps must be >= 1, got 0"),  # was: exit 0, nothing written
    (["--class", "1", "--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--class", "1", "--num-per-prompt", "0"], "--num-per-prompt must be >= 1"),
    (["--class", "1", "--fps", "0"], "--fps must be > 0"),
    (["--class", "1", "--height", "20"], "--height 20 --width 32: kl2d: height and width must be positive multiples"),
    (["--class", "1", "--image", "nope.png"], "--image nope.png not found"),
    (["--class", "1", "--ae-checkpoint", "nowhere"], "not found"),
    (["--class", "1", "--ae-path", "nowhere"], "autoencoder weights nowhere not found"),  # extract's spelling
    (["--class", "1", "--guidance", "-1"], "--guidance and --chunk-frames must be >= 0"),
    (["--class", "1", "--rate", "0.5"], "--rate needs a variable-rate autoencoder (MTC-VAE), not kl2d-f8c4-debug"),
    (["--class", "1", "--latent-frames", "3"], "applies to variable-length latents only"),  # was a traceback
]


@pytest.mark.parametrize("flags, match", SAMPLE_ERRORS)
def test_sample_errors_are_one_line_before_any_folder(run, tmp_path, capsys, flags, match):
    _one_line_error(["sample", "--checkpoint", str(run / "dit"), "--output", str(tmp_path / "s"), *flags], capsys,
                    match)
    assert not (tmp_path / "s").exists()


def test_sample_input_and_output_mistakes_are_one_line(run, tmp_path, capsys):
    from PIL import Image

    argv = ["sample", "--checkpoint", str(run / "dit"), "--class", "1", "--output"]
    (tmp_path / "text.png").write_text("not an image")
    _one_line_error(argv + [str(tmp_path / "s"), "--image", str(tmp_path / "text.png")], capsys,
                    "not an image Pillow can read")
    Image.new("RGB", (32, 32)).save(tmp_path / "frame.png")  # a real frame, but kl2d has no content latent
    _one_line_error(argv + [str(tmp_path / "s"), "--image", str(tmp_path / "frame.png")], capsys,
                    "--image needs an autoencoder with a content (first-frame) latent")  # was a traceback
    assert not (tmp_path / "s").exists()
    (tmp_path / "file").write_text("x")
    _one_line_error(argv + [str(tmp_path / "file")], capsys, "is a file; give a folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{oops")
    _one_line_error(argv + [str(tmp_path / "bad"), "--append"], capsys, "index.json is not valid JSON")
    (tmp_path / "young" / "checkpoints").mkdir(parents=True)  # a run before its first checkpoint
    _one_line_error(["sample", "--checkpoint", str(tmp_path / "young"), "--class", "1", "--output",
                     str(tmp_path / "s")], capsys, "has no export/ yet")
    for save in ("checkpoints/step-00000004", "final"):  # a `ldm train-ae` run, before and after it ends
        shutil.copytree(run / "ae", tmp_path / "ae_run" / save)
        _one_line_error(["sample", "--checkpoint", str(tmp_path / "ae_run"), "--class", "1", "--output",
                         str(tmp_path / "s")], capsys, "is a `ldm train-ae` run (an autoencoder), not a DiT")


def _train(run, out, *over):
    return ["train", "--config", str(YAML), f"data.shards={run / 'lat'}", f"output={out}", "steps=2", *over]


def test_an_entry_in_the_way_in_a_run_folder_is_one_line_before_any_work(run, tmp_path, capsys):
    """A file where a trainer keeps a folder (``checkpoints``), or a folder where it keeps a file
    (``log.jsonl``), stops both trainers in one line (was: a traceback at the first save or log)."""
    for name, make in (("checkpoints", lambda p: p.write_text("x")), ("log.jsonl", lambda p: p.mkdir())):
        out = tmp_path / name.replace(".", "-")
        out.mkdir()
        make(out / name)
        kind = ("a file, where the run keeps a folder" if name == "checkpoints" else
                "a folder, where the run keeps a file")
        for argv in (_train(run, out), _train_ae(run, out)):
            _one_line_error(argv, capsys, f"{out / name} is {kind} of that name")
        assert sorted(p.name for p in out.iterdir()) == [name]


TRAIN_ERRORS = [
    (["data.batch_size=-2"], "data.batch_size must be >= 1, got -2"),   # was DeepSpeed's AssertionError
    (["steps=0"], "steps must be >= 1, got 0"),                         # was: exit 0, nothing written
    (["steps=-5"], "steps must be >= 1, got -5"),
    (["optim.lr=fast"], "OptimConfig.lr: expected float, got 'fast'"),
    (["optim.lr=-3e-4"], "need optim.lr > 0"),
    (["optim.lrr=1"], "unknown key(s) ['lrr']"),
    (["flow.cond_dropout=1.5"], "flow.cond_dropout must be in [0, 1]"),
    (["optim.schedule=linear"], "optim.schedule must be one of constant, cosine"),
    (["model.dit=dit-huge"], "unknown DiT 'dit-huge'"),
    (["engine.deepspeed=zero9"], "DeepSpeed config 'zero9' not found"),
    (["model.compile_mode=max-autotune"], "model.compile_mode must be one of default, max-autotune-no-cudagraphs"),
    (["data.shards=nowhere"], "data.shards: nowhere not found"),
    (["data.split=shard", "data.num_workers=3"],                       # was: ValueError traceback after the
     "data.split=shard needs at least 3 shards (data-parallel ranks"),  # run folder was made
    (["steps"], "not of the form key.path=value"),
]


@pytest.mark.parametrize("over, match", TRAIN_ERRORS)
def test_train_errors_are_one_line_before_any_folder(run, tmp_path, capsys, over, match):
    _one_line_error(_train(run, tmp_path / "r", *over), capsys, match)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("over, match", [
    (["model.sequence_parallel=4"], "model.sequence_parallel=4 must divide the world size 2"),
    (["model.sequence_parallel=2", "model.overrides.hidden=48", "model.overrides.heads=3"],  # was a ValueError
     "the DiT's 3 heads are not divisible by 2"),                                           # traceback per rank
])
def test_sequence_parallel_errors_are_one_line_before_any_process_group(run, tmp_path, capsys, monkeypatch, over,
                                                                          match):
    monkeypatch.setenv("RANK", "0")  # rank 0 of 2, as torchrun starts it
    monkeypatch.setenv("WORLD_SIZE", "2")
    _one_line_error(_train(run, tmp_path / "r", *over), capsys, match)
    assert not (tmp_path / "r").exists()


def test_srun_without_a_master_address_is_one_line(run, tmp_path):
    env = process_env(drop=("SLURM_", "TORCHELASTIC"), SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_ID="0")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *_train(run, tmp_path / "r")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("ldm", "Traceback"))]
    assert proc.returncode == 2 and lines == ["ldm train: error: SLURM launch without MASTER_ADDR: export MASTER_ADDR "
                                              "(the first node's address) and MASTER_PORT, or launch with torchrun"]


def test_a_train_mistake_in_a_new_process_prints_its_line_alone(run, tmp_path):
    """The whole output is the one line: the config checks import DeepSpeed, whose accelerator detection
    logged a warning of its own to stdout first on a machine without CUDA (was: two lines, DeepSpeed's on top)."""
    env = process_env(drop=("SLURM_", "TORCHELASTIC", "DS_ACCELERATOR"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *_train(run, tmp_path / "r", "data.batch_size=-2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["ldm train: error: data.batch_size must be >= 1, got -2"]
    assert not (tmp_path / "r").exists()


def test_numbers_as_people_write_them_on_the_train_command_line(run, tmp_path):
    assert console(_train(run, tmp_path / "r", "optim.lr=3e-4", "optim.weight_decay=1e-6", "save_every=1_000",
                          "data.batch_size=2")) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert config["optim"]["lr"] == 3e-4 and config["optim"]["weight_decay"] == 1e-6 and config["save_every"] == 1000


def test_config_file_errors(run, tmp_path, capsys):
    _one_line_error(["train", "--config", str(tmp_path / "nope.yaml")], capsys, "nope.yaml not found")
    (tmp_path / "bad.yaml").write_text("steps: [2\n")
    _one_line_error(["train", "--config", str(tmp_path / "bad.yaml")], capsys, "bad.yaml is not valid YAML")


def _train_ae(run, out, *extra):
    return ["train-ae", "--autoencoder", AE, "--data", str(run / "videos"), "--output", str(out), "--frames", "8",
            "--height", "32", "--width", "32", "--steps", "1", *extra]


TRAIN_AE_ERRORS = [
    (["--batch-size", "-2"], "batch_size must be >= 1, got -2"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--data", "nowhere"], "input not found: nowhere"),
    (["--autoencoder", "causal3d-f4x8c4-debug"], "needs 1 + 4k frames"),
    (["--height", "20"], "height and width must be positive multiples of 8"),
    (["--ae-config", "nope=1"], "unknown override"),
    (["--autoencoder", "hivae-s-debug", "--ae-config", "stage1_blur=-1"],  # was: named --frames --height --width
     "error: --ae-config stage1_blur=-1: hivae: stage1_blur"),
    (["--stage", "2"], "kl2d is not trained in stages"),
    (["--autoencoder", "hivae-s-debug", "--stage", "2"], "--stage 2 trains on a stage-1 model"),  # was: trained
    (["--autoencoder", "hivae-s-debug", "--ae-config", "stage=2"], "--stage 2 trains on a stage-1 model"),  # same
    (["--base-checkpoint", "nowhere"], "--base-checkpoint: autoencoder checkpoint nowhere not found"),
    (["--init", "nowhere"], "--init: autoencoder checkpoint nowhere not found"),
    (["--init", "SAVED_AE", "--autoencoder", "kl2d-f8c16-debug"],  # was: a traceback after the checks
     "--init: checkpoint SAVED_AE holds 'kl2d-f8c4-debug', not 'kl2d-f8c16-debug'"),
    (["--batch-size", "7"], "6 clips cannot fill a batch of 7"),
    (["--kl-weight", "-1"], "kl_weight must be a finite value >= 0, got -1.0"),  # was: a ValueError traceback
    (["--dwt-weight", "nan"], "dwt_weight must be a finite value >= 0, got nan"),
]


@pytest.mark.parametrize("flags, match", TRAIN_AE_ERRORS)
def test_train_ae_errors_are_one_line_before_any_folder(run, tmp_path, capsys, flags, match):
    saved = str(run / "ae")  # a kl2d-f8c4-debug
    flags, match = [saved if f == "SAVED_AE" else f for f in flags], match.replace("SAVED_AE", saved)
    _one_line_error(_train_ae(run, tmp_path / "a", *flags), capsys, match)
    assert not (tmp_path / "a").exists()


def test_train_ae_base_and_gan_that_do_not_fit_the_family(run, tmp_path, capsys):
    """--base-checkpoint on a family without a base, a base of another family, --gan on Hi-VAE
    (no decoder weight for the adaptive GAN weight): one line each (was: a traceback)."""
    ae = str(run / "ae")  # a kl2d-f8c4-debug
    _one_line_error(_train_ae(run, tmp_path / "a", "--base-checkpoint", ae), capsys, "kl2d has no frozen base")
    _one_line_error(_train_ae(run, tmp_path / "a", "--autoencoder", "mtcvae-c4-debug", "--frames", "17",
                              "--base-checkpoint", ae), capsys, "the MTC-VAE base must be a causal3d")
    _one_line_error(_train_ae(run, tmp_path / "a", "--autoencoder", "hivae-s-debug", "--base-checkpoint", ae,
                              "--gan"), capsys, "--gan: hivae decodes by sampling a diffusion model")
    # a saved Hi-VAE / MTC-VAE keeps the base it was trained on (was: replaced under its trained modules)
    for name in ("hivae-s-debug", "mtcvae-c4-debug"):
        build(name).save_pretrained(tmp_path / name, name=name)
        _one_line_error(_train_ae(run, tmp_path / "a", "--autoencoder", name, "--init", str(tmp_path / name),
                                  "--frames", "17", "--base-checkpoint", ae), capsys, "--base-checkpoint with --init")
    assert not (tmp_path / "a").exists()


def test_train_ae_init_of_a_later_stage_at_an_earlier_stage_is_refused(run, tmp_path, capsys):
    """``--init STAGE2/final --stage 1`` would retrain stage 1 over a stage-2 model (Hi-VAE: a decoder
    without the detailed motion stage 2 trained, decoding global motion only): one line, no folder
    (was: trained silently)."""
    for name, frames in (("hivae-s-debug", "8"), ("mtcvae-c4-debug", "17")):
        build(name).with_stage(2).save_pretrained(tmp_path / name, name=name)
        argv = _train_ae(run, tmp_path / "a", "--autoencoder", name, "--frames", frames, "--init", str(tmp_path / name))
        _one_line_error(argv + ["--stage", "1"], capsys, f"is a stage-2 {name.split('-')[0]} model: --stage 1 after")
        assert not (tmp_path / "a").exists()
    argv = _train_ae(run, tmp_path / "a", "--autoencoder", "hivae-s-debug", "--init", str(tmp_path / "hivae-s-debug"),
                     "--ae-config", "stage=1")
    _one_line_error(argv, capsys, "is a stage-2 hivae model: --stage 1 after")  # the stage as a setting
    assert not (tmp_path / "a").exists()


def test_train_ae_init_with_other_latent_channels_says_the_architecture_changes(run, tmp_path, capsys):
    """A saved model with per-channel latent statistics (as train-ae measures them) and --ae-config
    latent_channels=N: the architecture changes (was: "latent_scale=(...): expected 1 or N ...")."""
    build(AE, latent_scale=(1.0, 2.0, 3.0, 4.0)).save_pretrained(tmp_path / "saved", name=AE)
    _one_line_error(_train_ae(run, tmp_path / "a", "--init", str(tmp_path / "saved"), "--ae-config",
                              "latent_channels=8"), capsys, "overrides ['latent_channels'] change kl2d's architecture")
    assert not (tmp_path / "a").exists()


def test_train_ae_init_from_a_dit_says_what_it_is(run, tmp_path, capsys):
    _one_line_error(["train-ae", "--init", str(run / "dit"), "--data", str(run / "videos"), "--output",
                     str(tmp_path / "a")], capsys, "is a DiT")
    assert not (tmp_path / "a").exists()


def test_reconstruct_errors(run, tmp_path, capsys):
    argv = ["reconstruct", "--autoencoder", AE, "--frames", "8", "--height", "32", "--width", "32", "--output",
            str(tmp_path / "r.mp4"), "--input"]
    (tmp_path / "fake.mp4").write_text("<html>")
    _one_line_error(argv + [str(tmp_path / "none.mp4")], capsys, "file not found")
    _one_line_error(argv + [str(tmp_path / "fake.mp4")], capsys, "not a readable video")
    video = str(run / "videos" / "videos" / "000000.mp4")
    _one_line_error(argv + [video, "--frames", "9"], capsys, "too short: has 8 frames")
    _one_line_error(argv + [video, "--height", "20"], capsys, "multiples of 8")
    _one_line_error(argv + [video, "--checkpoint", str(run / "dit")], capsys, "is a DiT")
    assert not (tmp_path / "r.mp4").exists()


def test_debug_shows_the_traceback_and_bugs_keep_theirs(run, tmp_path, monkeypatch):
    argv = _extract(run, tmp_path / "out", "--shard-size", "0")
    with pytest.raises(UserError, match="--shard-size must be >= 1"):
        console(argv + ["--debug"])
    monkeypatch.setenv("LDM_DEBUG", "1")
    with pytest.raises(UserError):
        console(argv)
    monkeypatch.delenv("LDM_DEBUG")

    def bug(cfg, allow_change=()):
        return {}["written"]   # a real bug: KeyError, not a user error

    monkeypatch.setattr(extract_verb, "extract", bug)
    with pytest.raises(KeyError, match="written"):
        console(_extract(run, tmp_path / "out"))


@pytest.mark.dist
# the extraction under make test-slow: launch.cli prints every verb's errors alike (the next test, in-process)
@pytest.mark.parametrize("verb", ["train", pytest.param("extract", marks=pytest.mark.slow)])
def test_under_torchrun_the_error_is_printed_once(run, tmp_path, verb):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if verb == "train":
        argv, message = _train(run, tmp_path / "r", "data.batch_size=-2"), "ldm train: error: data.batch_size"
    else:
        argv, message = _extract(run, tmp_path / "r", "--shard-size", "0"), "ldm extract: error: --shard-size"
    r = subprocess.run(torchrun(2, *argv), env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert r.stderr.count(message) == 1, r.stderr[-3000:]
    assert "[rank0]" not in r.stderr and "[rank1]" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "r").exists()


def test_later_ranks_wait_for_the_first_and_report_their_own_errors(run, tmp_path, capsys, monkeypatch):
    """A second rank of a node does not print a user error at once (the node's first rank does,
    unless a launcher stops it first: the later rank waits ``ERROR_GRACE_S``); still alive after the
    wait under torchrun, the error was its own and it prints it with its rank; without torchrun it
    stays silent (every rank of e.g. srun runs on, the first rank prints)."""
    from launch import cli

    slept = []
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "3")
    argv = _extract(run, tmp_path / "e", "--shard-size", "0")
    capsys.readouterr()
    assert console(argv) == 2
    assert capsys.readouterr().err == "" and slept == [cli.ERROR_GRACE_S]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert console(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm extract: error: --shard-size must be >= 1") and err.endswith("(rank 3)")
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------------------------
# ldm sample: never overwrites, --append continues, index.json says how each video was made
# --------------------------------------------------------------------------------------------
def _sample(run, out, *extra):
    return ["sample", "--checkpoint", str(run / "dit"), "--output", str(out), "--steps", "2", *extra]


def test_sample_never_overwrites_and_appends(run, tmp_path, capsys):
    out = tmp_path / "s"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, out, "--prompt", "a red circle moving left", "--prompt", "a blue square",
                               "--seed", "7")) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["0000.gif", "0000.mp4", "0001.gif", "0001.mp4", "grid.png", "index.json"]
    _one_line_error(_sample(run, out, "--class", "3"), capsys, "already holds 6 file(s); nothing is overwritten")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, out, "--class", "3", "--num-per-prompt", "2", "--seed", "7", "--append",
                               "--fps", "5", "--guidance", "2", "--sampler", "heun")) == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: after[k] for k in first if k != "index.json"} == {k: v for k, v in first.items() if k != "index.json"}
    assert {"0002.mp4", "0003.mp4", "0002.gif", "0003.gif", "grid-0002.png"} <= set(after)
    index = json.loads((out / "index.json").read_text())
    assert [x["file"] for x in index] == ["0000.mp4", "0001.mp4", "0002.mp4", "0003.mp4"]
    assert [x["prompt"] for x in index] == ["a red circle moving left", "a blue square", None, None]
    assert [x["class_id"] for x in index] == [None, None, 3, 3]
    assert [x["seed"] for x in index] == [7, 8, 9, 10] and "noise_row" not in index[0]  # seeds continue
    assert [(x["steps"], x["guidance"], x["sampler"], x["fps"]) for x in index] == \
        [(2, 4.0, "euler", 8.0)] * 2 + [(2, 2.0, "heun", 5.0)] * 2
    assert all(x["frames"] == 8 and (x["height"], x["width"]) == (32, 32) for x in index)
    # the videos play at the rate of the training clips (the synthetic set's 8 fps), or --fps
    assert probe(out / "0000.mp4")["fps"] == pytest.approx(8.0) and probe(out / "0002.mp4")["fps"] == pytest.approx(5.0)


def _same_video(a: Path, b: Path) -> bool:
    """The same video up to the float rounding of batched kernels, which H.264 can spread over a few
    pixels: frames within 1 level on average (videos from other noise differ by tens)."""
    import av
    import numpy as np

    def frames(path):
        with av.open(str(path)) as f:
            return np.stack([x.to_ndarray(format="rgb24") for x in f.decode(video=0)]).astype(np.float32)

    x, y = frames(a), frames(b)
    return x.shape == y.shape and float(np.abs(x - y).mean()) < 1.0


def test_a_video_is_the_same_at_any_batch_size_and_made_again_alone_from_its_seed(run, tmp_path):
    """Each video's noise comes from its own seed (index.json's ``seed``): --batch-size 1 and 3 write
    the same videos, and one of them is made again alone with its prompt and --seed (was: one noise
    per batch, seeded with its first video, so a video changed with the batch size)."""
    prompts = ["--prompt", "a red circle moving left", "--prompt", "a blue square", "--prompt", "a green triangle"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for size in ("1", "3"):
            assert console(_sample(run, tmp_path / size, *prompts, "--seed", "4", "--batch-size", size)) == 0
        third = json.loads((tmp_path / "3" / "index.json").read_text())[2]
        assert (third["prompt"], third["seed"]) == ("a green triangle", 6)
        assert console(_sample(run, tmp_path / "again", "--prompt", third["prompt"], "--seed", str(third["seed"]))) == 0
    for name in ("0000.mp4", "0001.mp4", "0002.mp4"):
        assert _same_video(tmp_path / "1" / name, tmp_path / "3" / name), name
    assert _same_video(tmp_path / "again" / "0000.mp4", tmp_path / "3" / "0002.mp4")
    assert not _same_video(tmp_path / "3" / "0001.mp4", tmp_path / "3" / "0002.mp4")


def test_sampling_beyond_the_training_clips_says_so(run, tmp_path, capsys):
    """--frames longer than the training clips, or another size: sampled (RoPE takes any length), with
    a note that the DiT never saw it (was: silently); none at the training shape, nor for a DiT
    trained on several shapes (buckets), whose export records only the first."""
    import shutil

    def note(checkpoint, out, *extra):
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert console(["sample", "--checkpoint", str(checkpoint), "--output", str(tmp_path / out), "--steps", "1",
                            "--class", "1", *extra]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]

    assert note(run / "dit", "a") == []
    assert note(run / "dit", "b", "--frames", "16") == [
        "note: sampling 16 frames, beyond the 8-frame 32x32 clips this DiT was trained on: it runs (RoPE), but motion "
        "and detail usually degrade outside the training length and size"]
    assert note(run / "dit", "c", "--height", "64", "--frames", "4")[0].startswith("note: sampling 64x32, beyond")
    shutil.copytree(run / "dit" / "export", tmp_path / "mixed")
    context = json.loads((tmp_path / "mixed" / "training.json").read_text())
    (tmp_path / "mixed" / "training.json").write_text(json.dumps({**context, "mixed_shapes": True}))
    assert note(tmp_path / "mixed", "d", "--frames", "16") == []


def test_append_into_a_folder_without_numbered_videos_keeps_its_files(run, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "grid.png").write_bytes(b"someone else's grid")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, out, "--class", "2", "--append")) == 0
    assert (out / "grid.png").read_bytes() == b"someone else's grid"
    assert sorted(p.name for p in out.iterdir()) == ["0000.gif", "0000.mp4", "grid-0000.png", "grid.png", "index.json"]


def _second_batch_interrupted():
    """`launch.sample.generate` and a stand-in for it that raises KeyboardInterrupt at its second call."""
    import launch.sample as sample_verb

    real, calls = sample_verb.generate, []

    def generate(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    return real, generate


def test_an_interrupted_sample_keeps_its_finished_batches(run, tmp_path, capsys, monkeypatch):
    """Each batch's videos and index.json are written as soon as the batch is made: a Ctrl-C in the
    second batch leaves the first and their grid (status 130); --append then adds after them."""
    import launch.sample as sample_verb

    monkeypatch.setattr(sample_verb, "generate", _second_batch_interrupted()[1])
    out = tmp_path / "s"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, out, "--class", "1", "--num-per-prompt", "4", "--batch-size", "2")) == 130
        assert capsys.readouterr().err.strip().endswith("ldm sample: interrupted")
        index = json.loads((out / "index.json").read_text())
        assert [x["file"] for x in index] == ["0000.mp4", "0001.mp4"]
        assert Image.open(out / "grid.png").size[0] > 0
        assert all((out / x["file"]).stat().st_size > 0 for x in index)
        assert console(_sample(run, out, "--class", "1", "--append")) == 0
    assert [x["file"] for x in json.loads((out / "index.json").read_text())] == ["0000.mp4", "0001.mp4", "0002.mp4"]
    assert (out / "grid-0002.png").is_file()


def test_resume_finishes_an_interrupted_sample_as_if_it_had_not_stopped(run, tmp_path, capsys, monkeypatch):
    """--resume: the same command makes only the videos index.json lacks, each from its own seed, so
    the folder ends as an uninterrupted run's (was: only --append, which samples every video again
    after the ones made, with other seeds); another command's folder is one line."""
    import launch.sample as sample_verb

    real, generate = _second_batch_interrupted()
    argv = ["--prompt", "a red circle moving left", "--prompt", "a blue square", "--num-per-prompt", "2",
            "--batch-size", "2", "--seed", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, tmp_path / "full", *argv)) == 0
        monkeypatch.setattr(sample_verb, "generate", generate)
        assert console(_sample(run, tmp_path / "s", *argv)) == 130
        monkeypatch.setattr(sample_verb, "generate", real)
        assert len(json.loads((tmp_path / "s" / "index.json").read_text())) == 2
        capsys.readouterr()
        assert console(_sample(run, tmp_path / "s", *argv, "--resume")) == 0
        assert "wrote 2 videos (0002..0003)" in capsys.readouterr().out
        assert console(_sample(run, tmp_path / "s", *argv, "--resume")) == 0
        assert "nothing to do: the 4 videos of this command are in" in capsys.readouterr().out
    full, resumed = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("full", "s"))
    assert resumed == full
    assert all(_same_video(tmp_path / "full" / x["file"], tmp_path / "s" / x["file"]) for x in full)
    _one_line_error(_sample(run, tmp_path / "s", *argv, "--steps", "3", "--resume"), capsys,
                    "--resume: 0000.mp4 in")
    _one_line_error(_sample(run, tmp_path / "s", "--class", "1", "--resume"), capsys,
                    "holds 0001.mp4, which this command does not make")


def test_sample_prompt_file_and_text_checks(run, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n   \n")
    argv = ["sample", "--checkpoint", str(run / "dit"), "--output", str(tmp_path / "s")]
    _one_line_error(argv + ["--prompts-file", str(tmp_path / "prompts.txt")], capsys, "has no prompt")
    _one_line_error(argv + ["--prompts-file", str(tmp_path / "none.txt")], capsys, "none.txt not found")
    # an empty negative prompt would encode "" (was: accepted), not the null text condition dropout trained
    _one_line_error(argv + ["--prompt", "a red circle", "--guidance", "3", "--negative-prompt", " "], capsys,
                    "--negative-prompt is empty: leave it out to guide away from the null text")
    assert not (tmp_path / "s").exists()


def test_a_jsonl_prompts_file_gives_each_video_its_prompt_class_seed_and_negative_prompt(run, tmp_path):
    """--prompts-file F.jsonl: one object per line (was: each line's JSON text sampled as a prompt);
    a line's seed makes the video that --seed gives for its prompt alone; lines with different
    negative prompts go into different batches."""
    lines = [{"prompt": "a red circle moving left", "class": 2, "seed": 40},
             {"prompt": "a blue square", "class": "1", "negative_prompt": "a red circle"},
             {"prompt": "a green triangle", "class": 3}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, tmp_path / "s", "--prompts-file", str(tmp_path / "p.jsonl"), "--seed", "5",
                               "--num-per-prompt", "2", "--batch-size", "4")) == 0
        assert console(_sample(run, tmp_path / "one", "--prompt", "a blue square", "--class", "1", "--seed", "8",
                               "--negative-prompt", "a red circle")) == 0
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [(x["prompt"], x["class_id"], x["seed"], x["negative_prompt"]) for x in index] == [
        ("a red circle moving left", 2, 40, None), ("a red circle moving left", 2, 41, None),
        ("a blue square", 1, 7, "a red circle"), ("a blue square", 1, 8, "a red circle"),
        ("a green triangle", 3, 9, None), ("a green triangle", 3, 10, None)]
    assert _same_video(tmp_path / "one" / "0000.mp4", tmp_path / "s" / "0003.mp4")
    assert not _same_video(tmp_path / "one" / "0000.mp4", tmp_path / "s" / "0002.mp4")
    # the folder again from its index.json (null values are "not given", as index.json writes them)
    lines = [{"prompt": x["prompt"], "class": x["class_id"], "seed": x["seed"], "negative_prompt": x["negative_prompt"]}
             for x in index]
    (tmp_path / "again.jsonl").write_text("\n".join(map(json.dumps, lines)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, tmp_path / "again", "--prompts-file", str(tmp_path / "again.jsonl"))) == 0
    again = json.loads((tmp_path / "again" / "index.json").read_text())
    assert again == index
    assert all(_same_video(tmp_path / "again" / x["file"], tmp_path / "s" / x["file"]) for x in index)


@pytest.mark.parametrize("text,match", [
    ('{"prompt": "a red circle"}\n{"prompt": "a blue square", "colour": "red"}', "line 2: unknown key(s) colour"),
    ('{"prompt": "a red circle"}\n{"prompt": "a blue', "line 2 is not JSON"),
    ('{"prompt": "a red circle", "class": 1}\n{"prompt": "a blue square"}', "line 2 has no class: give every line"),
    ('{"prompt": "a red circle", "seed": "7"}', "seed must be an integer, got '7'"),
    ('{"prompt": ""}', "prompt must be a non-empty text"),
    ('{"seed": 3}', "line 1 gives neither a prompt nor a class"),
    ('{"prompt": "a red circle", "class": 999}', "--class 999: this DiT knows"),
])
def test_jsonl_prompts_file_mistakes_are_one_line(run, tmp_path, capsys, text, match):
    (tmp_path / "p.jsonl").write_text(text)
    _one_line_error(_sample(run, tmp_path / "s", "--prompts-file", str(tmp_path / "p.jsonl")), capsys, match)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------
# ldm list, eval, cost, compare, demo: the same one-line errors before any work or folder
# --------------------------------------------------------------------------------------------
def _recon(run, out, *extra):
    return ["eval", "recon", "--autoencoder", AE, "--input", str(run / "videos"), "--frames", "8", "--height", "32",
            "--width", "32", "--output", str(out), *extra]


def _other_verbs(run, tmp):
    """(argv, message, path that must not appear) for each mistake."""
    gen = ["eval", "gen", "--checkpoint", str(run / "dit"), "--output", str(tmp / "g")]
    cost = ["cost", "--frames", "17", "--height", "64", "--width", "64"]
    cmp = ["compare", "--autoencoders", AE, "--synth", "4", "--output", str(tmp / "c")]
    demo = ["demo", "--quick", "--output", str(tmp / "d")]
    return [
        (["list", "--frames", "0"], "--frames must be >= 1, got 0", None),  # was: exit 0, every row an error
        (_recon(run, tmp / "r.json", "--num", "0"), "--num must be >= 1, got 0", tmp / "r.json"),  # was: exit 0
        (_recon(run, tmp / "r.json", "--batch-size", "0"), "--batch-size must be >= 1", tmp / "r.json"),
        (_recon(run, tmp, ), "is a folder; give the result JSON file", None),  # was: IsADirectoryError
        (_recon(run, tmp / "r.json", "--autoencoder", "nope"), "unknown autoencoder 'nope'", tmp / "r.json"),
        (_recon(run, tmp / "r.json", "--height", "20"), "multiples of 8", tmp / "r.json"),
        (_recon(run, tmp / "r.json", "--input", str(tmp / "none")), "--input", tmp / "r.json"),
        (_recon(run, tmp / "r.json", "--i3d", str(tmp / "none.pt")), "--i3d", tmp / "r.json"),
        (_recon(run, tmp / "r.json", "--input", str(tmp / "fake.mp4")), "none of the 1 videos", tmp / "r.json"),
        (_recon(run, tmp / "r.json", "--i3d", str(tmp / "fake.mp4"), "--fvd-frames", "8"), "not a TorchScript archive",
         tmp / "r.json"),
        # clips shorter than FVD's frames or the SSIM groups (were: tracebacks after the whole evaluation)
        (_recon(run, tmp / "r.json", "--i3d", str(tmp / "fake.mp4")), "--fvd-frames 16: the clips have 8 frames",
         tmp / "r.json"),
        (_recon(run, tmp / "r.json", "--lpips-heads", str(tmp / "fake.mp4")), "LPIPS needs both --lpips-backbone and",
         tmp / "r.json"),  # was: a traceback
        (_recon(run, tmp / "r.json", "--flow-net", str(tmp / "fake.mp4")), "--flow-net adds FloLPIPS", tmp / "r.json"),
        (cmp + ["--flow-net", str(tmp / "fake.mp4")], "--flow-net adds FloLPIPS", tmp / "c"),
        (_recon(run, tmp / "r.json", "--frame-group", "4", "--group-start", "8"), "--group-start 8", tmp / "r.json"),
        (_recon(run, tmp / "r.json", "--frame-group", "8", "--group-start", "1"), "--frame-group 7 or fewer",
         tmp / "r.json"),  # was: exit 0 with null positions
        (cmp + ["--i3d", str(tmp / "fake.mp4")], "--fvd-frames 16: the clips have 9 frames", tmp / "c"),
        (cmp[:3] + ["--input", str(tmp / "empty")] + cmp[5:], "no videos", tmp / "c"),
        (gen, "choose at least one of --attributes", tmp / "g"),
        (gen + ["--attributes", "--per-prompt", "0"], "--per-prompt must be >= 1", tmp / "g"),
        (gen + ["--attributes", "--shapes", "hexagon"], "hexagon", tmp / "g"),
        (gen + ["--reference", str(run / "videos")], "--reference needs --i3d", tmp / "g"),
        (gen + ["--attributes", "--ae-path", str(tmp / "none")], f"--ae-checkpoint {tmp / 'none'}: not found",
         tmp / "g"),  # --ae-path: `ldm extract`'s spelling of --ae-checkpoint
        (gen + ["--attributes", "--samples", str(run / "videos")], "--samples is used only with --reference",
         tmp / "g"),  # was: ignored, the benchmark sampled its own videos
        (gen + ["--attributes", "--vbench-results", str(run / "videos")], "--vbench-results is used only with --vbench",
         tmp / "g"),
        (["eval", "gen", "--checkpoint", str(run / "lat"), "--attributes", "--output", str(tmp / "g")], "--checkpoint",
         tmp / "g"),
        (cost + ["--autoencoders", "nope"], "unknown autoencoder 'nope'", None),
        (cost + ["--all", "--frames", "0"], "--frames must be >= 1, got 0", None),
        (cost + ["--all", "--dit-config", "nope=1"], "unknown override(s) ['nope'] for DiTConfig", None),
        (cost + ["--autoencoders", ","], "--autoencoders is empty", None),
        (cost + ["--autoencoders", str(run / "dit")], "is a DiT", None),  # was: unknown autoencoder family None
        (cost + ["--autoencoders", AE, "--height", "30"], "no autoencoder asked for takes this size", None),
        (cost + ["--all", "--csv", str(tmp / "nodir" / "x.csv")], "does not exist", tmp / "nodir"),
        (cmp[:2] + ["nope"] + cmp[3:], "unknown autoencoder 'nope'", tmp / "c"),
        (cmp + ["--synth", "0"], "--synth must be >= 1, got 0", tmp / "c"),
        (cmp + ["--height", "20"], "multiples of 8", tmp / "c"),
        (cmp + ["--train", "optim.lrr=1"], "unknown key(s) ['lrr']", tmp / "c"),
        (cmp + ["--shapes", "hexagon"], "hexagon", tmp / "c"),
        (cmp + ["--nproc", "0"], "--nproc must be >= 1", tmp / "c"),
        (demo + ["nope=1"], "unknown key(s) ['nope']", tmp / "d"),
        (demo + ["dit.steps=0"], "dit: steps must be >= 1, got 0", tmp / "d"),
        (demo + ["autoencoder.steps=-1"], "autoencoder: steps must be >= 1", tmp / "d"),
        (demo + ["synth.size=20"], "multiples of 8", tmp / "d"),
    ]


def test_list_eval_cost_compare_demo_errors_are_one_line_before_any_folder(run, tmp_path, capsys):
    (tmp_path / "fake.mp4").write_text("<html>")
    (tmp_path / "empty").mkdir()
    for argv, match, absent in _other_verbs(run, tmp_path):
        _one_line_error(argv, capsys, match)
        assert absent is None or not absent.exists(), argv


def test_demo_refuses_a_folder_it_did_not_write(run, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    _one_line_error(["demo", "--quick", "--output", str(tmp_path / "d")], capsys, "was not written by `ldm demo`")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["notes.txt"]


def test_eval_gen_conditioning_the_dit_lacks_is_one_line_before_any_folder(run, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_train(run, tmp_path / "dit", "save_every=2", "data.batch_size=2", "optim.warmup_steps=1",
                              "model.class_cond=false")) == 0
    _one_line_error(["eval", "gen", "--checkpoint", str(tmp_path / "dit"), "--attributes", "--use-class", "--output",
                     str(tmp_path / "g")], capsys, "--use-class: this DiT has no class conditioning")
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------------------------------
# ldm eval: an earlier result is replaced only with --overwrite
# --------------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_recon_replaces_an_earlier_result_only_with_overwrite(run, tmp_path, capsys):
    out, grid = tmp_path / "r.json", tmp_path / "r.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_recon(run, out, "--num", "2", "--grid", str(grid))) == 0
    first = _files(tmp_path)
    _one_line_error(_recon(run, out, "--num", "3"), capsys, f"--output {out} holds an earlier result; give --overwrite")
    _one_line_error(_recon(run, tmp_path / "new.json", "--grid", str(grid)), capsys, f"--grid {grid} holds an earlier")
    _one_line_error(_recon(run, tmp_path / "new.json", "--grid", str(tmp_path), "--overwrite"), capsys,
                    "is a folder; give the PNG")
    video = run / "videos" / "videos" / "000000.mp4"
    _one_line_error(_recon(run, video, "--overwrite", "--input", str(video)), capsys, "is the --input video")
    assert _files(tmp_path) == first  # refused before any work: nothing written, nothing changed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_recon(run, out, "--num", "3", "--grid", str(grid), "--overwrite")) == 0
    assert json.loads(out.read_text())["clips"] == 3 and grid.read_bytes() != first["r.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temporary file left


def test_eval_gen_replaces_earlier_results_only_with_overwrite(run, tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not an evaluation's result: kept through everything
    gen = ["eval", "gen", "--checkpoint", str(run / "dit"), "--output", str(out), "--attributes", "--per-prompt", "1",
           "--shapes", "circle", "--colors", "red", "--directions", "left", "right", "--steps", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(gen) == 0
    first = _files(out)
    assert set(first) == {"notes.txt", "result.json", "attribute_videos/000-red-circle-left-0.mp4",
                          "attribute_videos/001-red-circle-right-0.mp4"}
    _one_line_error(gen[:-2] + ["--directions", "up"], capsys,
                    f"--output {out} holds the results of an earlier evaluation (result.json, attribute_videos); "
                    "give --overwrite")
    _one_line_error(gen + ["--overwrite", "--samples", str(out / "attribute_videos"), "--reference",
                           str(run / "videos"), "--i3d", str(out / "notes.txt")], capsys,
                    "lies inside the earlier results that --overwrite replaces")
    assert _files(out) == first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(gen[:-4] + ["up", "--steps", "2", "--overwrite"]) == 0
    assert set(_files(out)) == {"notes.txt", "result.json", "attribute_videos/000-red-circle-up-0.mp4"}
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "result.json").read_text())["attributes"]["prompts"] == 1


def test_reconstruct_and_cost_replace_a_file_only_with_overwrite(run, tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes((run / "videos" / "videos" / "000000.mp4").read_bytes())
    original = clip.read_bytes()
    argv = ["reconstruct", "--autoencoder", AE, "--frames", "8", "--height", "32", "--width", "32",
            "--input", str(clip), "--output"]
    # was: the input video replaced by its reconstruction
    _one_line_error(argv + [str(clip), "--overwrite"], capsys, "is the --input video")
    (tmp_path / "rec.mp4").write_bytes(b"an earlier reconstruction")
    _one_line_error(argv + [str(tmp_path / "rec.mp4")], capsys, "exists; give --overwrite")
    assert clip.read_bytes() == original and (tmp_path / "rec.mp4").read_bytes() == b"an earlier reconstruction"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(argv + [str(tmp_path / "rec.mp4"), "--overwrite"]) == 0
    assert probe(tmp_path / "rec.mp4")["frames"] == 8
    cost = ["cost", "--autoencoders", AE, "--frames", "8", "--height", "32", "--width", "32", "--dit", "dit-debug"]
    (tmp_path / "c.csv").write_text("mine")
    _one_line_error(cost + ["--csv", str(tmp_path / "c.csv")], capsys, "exists; give --overwrite")
    _one_line_error(cost + ["--plot", str(clip)], capsys, "exists; give --overwrite")
    assert (tmp_path / "c.csv").read_text() == "mine" and clip.read_bytes() == original
    assert console(cost + ["--csv", str(tmp_path / "c.csv"), "--plot", str(tmp_path / "c.png"), "--overwrite"]) == 0
    assert (tmp_path / "c.csv").read_text().startswith("autoencoder,") and \
        (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.png", "clip.mp4", "rec.mp4"]  # no temp files


def test_sample_compile_mode_reaches_both_compilations(run, tmp_path, monkeypatch):
    """``ldm sample --compile true --compile-mode M`` compiles the DiT's and the autoencoder's blocks in mode M."""
    from ldm import layers

    seen = []
    monkeypatch.setattr(layers, "compile_blocks", lambda module, mode=None: seen.append((type(module).__name__, mode)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, tmp_path / "s", "--prompt", "a red circle", "--compile", "true",
                               "--compile-mode", "max-autotune-no-cudagraphs")) == 0
    assert seen == [("VideoDiT", "max-autotune-no-cudagraphs"), ("KL2D", "max-autotune-no-cudagraphs")]


def test_sample_and_eval_gen_take_the_dits_text_encoder_from_another_folder(run, tmp_path, capsys):
    """--text-encoder SPEC replaces the recorded spec when its width and fingerprint match the DiT's
    (was: no such flag; a moved folder could only be put back); another model is one line before any
    video. The export records the encoder's max_length the prompts are cut to."""
    from texts import save_t5

    assert json.loads((run / "dit" / "export" / "training.json").read_text())["text_max_length"] == 64
    t5 = save_t5(tmp_path / "t5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert console(_sample(run, tmp_path / "s", "--prompt", "a red circle", "--text-encoder", "builtin")) == 0
    gen = ["eval", "gen", "--checkpoint", str(run / "dit"), "--attributes", "--per-prompt", "1", "--shapes", "circle",
           "--colors", "red", "--directions", "left", "--steps", "2", "--text-encoder", f"t5:{t5}"]
    for argv in (_sample(run, tmp_path / "s2", "--prompt", "a red circle", "--text-encoder", f"t5:{t5}"),
                 gen + ["--output", str(tmp_path / "g")]):
        _one_line_error(argv, capsys, f"--text-encoder t5:{t5} gives 32-d embeddings, the DiT was trained on 256-d")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "g").exists()
    _one_line_error(_sample(run, tmp_path / "s2", "--prompt", "a red circle", "--text-encoder", "t5:nowhere"), capsys,
                    "--text-encoder t5:nowhere cannot be loaded")
