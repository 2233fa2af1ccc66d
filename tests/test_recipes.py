"""The papers' recipes (``launch/configs/recipes/``): ``--print-config`` shows the paper's numbers and
writes nothing; every recipe of this file runs a few steps on CPU at a debug size through ``ldm
train-ae`` / ``ldm train`` (its `-debug` model, 32x32 clips), staged recipes chained as the
recipes say (stage 2 from stage 1's ``final/``); the LR schedule is ``runs.lr_factor``'s."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import dit
from autoencoders import build, load_pretrained
from data.synth import synth_dataset
from launch import runs
from launch.cli import main as ldm
from launch.train_ae import TrainAEConfig
from ldm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "launch" / "configs" / "recipes"
SIZE = 32
# what every train-ae recipe gets in the tests: the shared clips, 32x32, 2 logged steps, no LPIPS
# files and no trained base (random, with a warning)
DEBUG = [f"height={SIZE}", f"width={SIZE}", "batch_size=1", "steps=2", "num_workers=0", "log_every=1",
         "save_every=2", "sample_every=2", "latent_stats_clips=0", "progress=false", "lpips_vgg=null",
         "lpips_heads=null"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipes") / "videos"
    synth_dataset(out, num=2, frames=17, size=SIZE, fps=8, seed=0)
    return out


def _train_ae(recipe: str, videos: Path, out: Path, *overrides: str) -> Path:
    assert ldm(["train-ae", "--config", str(RECIPES / recipe), f"data={videos}", f"output={out}", *DEBUG,
                *overrides]) == 0
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _checkpoint(out: Path, name: str) -> dict:
    return json.loads((out / "checkpoints" / "step-00000002" / name).read_text())


def _print_config(capsys, verb: str, recipe: str, *extra: str) -> dict:
    assert ldm([verb, "--config", str(RECIPES / recipe), "--print-config", *extra]) == 0
    return yaml.safe_load(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------
# --print-config
# ------------------------------------------------------------------------------------------
def test_print_config_shows_the_papers_numbers_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes' relative output folders would land here
    cfg = _print_config(capsys, "train-ae", "hivae-stage1.yaml")
    assert cfg["data"] is None  # left to the command line, printed as unset
    assert (cfg["betas"], cfg["lr"], cfg["warmup"], cfg["schedule"], cfg["weight_decay"], cfg["batch_size"],
            cfg["steps"]) == ([0.9, 0.99], 1e-4, 5000, "cosine", 1e-4, 8, 20000)  # Tab. 4, App. A.2
    assert cfg["ae_config"] == ["stage1_blur=2.0"] and cfg["stage"] == 1 and cfg["max_grad_norm"] == 0.0
    # flags and overrides resolve as for a run; the printed YAML loads back to the same config
    cfg = _print_config(capsys, "train-ae", "videovaeplus.yaml", "--data", "clips", "steps=7")
    assert (cfg["data"], cfg["steps"], cfg["betas"], cfg["disc_betas"]) == ("clips", 7, [0.5, 0.9], [0.5, 0.9])
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(cfg))
    again = _print_config(capsys, "train-ae", str(tmp_path / "printed.yaml"))
    assert again == cfg
    gen = _print_config(capsys, "train", "hivae-generator.yaml", "steps=5")
    assert (gen["model"]["dit"], gen["steps"], gen["flow"]["cond_dropout"], gen["optim"]["warmup_steps"],
            gen["optim"]["betas"]) == ("dit-hivae", 5, 0.2, 10000, [0.9, 0.999])  # App. A.3
    paper = dit.REGISTRY["dit-hivae"]
    assert (paper.depth, paper.hidden) == (16, 1152) and "dit-hivae-debug" in dit.REGISTRY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]  # no run folder was made
    # a bad value is the one-line error a run gives, before anything is written
    with pytest.raises(ValueError, match="schedule must be one of"):
        ldm(["train-ae", "--config", str(RECIPES / "hivae-stage1.yaml"), "--print-config", "schedule=cos"])
    with pytest.raises(ValueError, match="expected 2 values"):
        ldm(["train-ae", "--config", str(RECIPES / "hivae-stage1.yaml"), "--print-config", "betas=[0.9,0.9,0.9]"])


def test_every_recipe_resolves():
    for path in sorted(RECIPES.glob("*.yaml")):
        verb = "train" if "model" in yaml.safe_load(path.read_text()) else "train-ae"
        assert ldm([verb, "--config", str(path), "--print-config"]) == 0, path.name


def test_each_recipe_runs_with_the_readme_command_and_chains_to_the_files_it_names(capsys):
    """The README gives each recipe as `--config RECIPE --data VIDEOS` (the generator: no flag at
    all): every recipe names its own output folder, runs/<recipe> (was: h3ae and ivvae-multires
    had none, so the README's command stopped on a missing --output), and every folder or file it
    starts from is an earlier recipe's runs/<recipe>/final or made by a command in its header
    (was: ivvae-multires started from random weights, its header naming runs/ivvae-512/final)."""
    cfgs, headers = {}, {}
    for path in sorted(RECIPES.glob("*.yaml")):
        train_ae = "model" not in yaml.safe_load(path.read_text())
        cfgs[path.stem] = _print_config(capsys, "train-ae" if train_ae else "train", path.name,
                                        *(["--data", "VIDEOS"] if train_ae else []))
        headers[path.stem] = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
        assert cfgs[path.stem]["output"] == f"runs/{path.stem}", path.name
    starts = {"ivvae-video-256", "ivvae-video-512", "ivvae-ablation", "ivvae-multires", "hivae-stage1", "hivae-stage2",
              "mtcvae-stage1", "mtcvae-stage2", "videovaeplus"}  # the recipes that start from weights
    for name, cfg in cfgs.items():
        sources = [cfg.get(k) for k in ("init", "base_checkpoint") if cfg.get(k)]
        assert bool(sources) == (name in starts), name
        for src in sources:
            earlier = src.removeprefix("runs/").removesuffix("/final")
            assert earlier in cfgs or f"--output {src.removesuffix('/final')}" in headers[name], (name, src)
        if "lpips_weight" in yaml.safe_load((RECIPES / f"{name}.yaml").read_text()):  # LPIPS in the loss:
            assert cfg["lpips_vgg"] and cfg["lpips_heads"], name  # its files (was: silently off in ivvae-multires)


# ------------------------------------------------------------------------------------------
# the LR schedule: one code path (runs.lr_at / lr_factor) for both trainers
# ------------------------------------------------------------------------------------------
def test_cosine_schedule_with_warmup_and_drops_is_runs_lr_factor():
    cfg = TrainAEConfig(data="d", output="o", autoencoder="kl2d-f8c4-debug", lr=1e-3, warmup=4, schedule="cosine",
                        steps=20, min_lr_ratio=0.1, lr_drop=((15, 1e-4),))
    for step in (0, 1, 3, 4, 5, 10, 14, 15, 19, 25):
        base = 1e-4 if step >= 15 else 1e-3
        assert cfg.learning_rate(step) == pytest.approx(base * runs.lr_factor(step, 4, "cosine", 20, 0.1), rel=1e-12)
    assert cfg.learning_rate(3) == pytest.approx(1e-3) and cfg.learning_rate(4) == pytest.approx(1e-3)
    assert cfg.learning_rate(19) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16))))
    assert TrainAEConfig(data="d", output="o", autoencoder="kl2d-f8c4-debug", schedule="cosine", steps=10,
                         min_lr_ratio=0.0).learning_rate(10) == 0.0
    for bad in (dict(schedule="linear"), dict(min_lr_ratio=1.5), dict(betas=(0.9, 1.0)), dict(disc_betas=(-0.1, 0.9))):
        with pytest.raises(ValueError):
            TrainAEConfig(data="d", output="o", autoencoder="kl2d-f8c4-debug", **bad)


# ------------------------------------------------------------------------------------------
# each recipe runs at a debug size
# ------------------------------------------------------------------------------------------
def test_hivae_recipes_stage_1_stage_2_and_generator(videos, tmp_path):
    s1 = _train_ae("hivae-stage1.yaml", videos, tmp_path / "s1", "autoencoder=hivae-s-debug", "base_checkpoint=null",
                   "frames=8", "steps=4", "warmup=2", "save_every=4")
    # warm-up then cosine to 0 over the 4 steps: the logged LR (update step - 1) is lr_factor's
    lrs = [r["lr"] for r in _log(s1)]
    assert lrs == pytest.approx([1e-4 * runs.lr_factor(s, 2, "cosine", 4, 0.0) for s in range(4)], rel=1e-12)
    groups = json.loads((s1 / "checkpoints" / "step-00000004" / "optimizer.json").read_text())["param_groups"]
    assert [(g["betas"], g["weight_decay"], g["lr"]) for g in groups] == [([0.9, 0.99], 1e-4, pytest.approx(lrs[-1]))]
    model = load_pretrained(s1 / "final")
    assert (model.config.stage, model.config.stage1_blur) == (1, 2.0)  # the recipe's blur reached the model
    s2 = _train_ae("hivae-stage2.yaml", videos, tmp_path / "s2", f"init={s1 / 'final'}", "frames=8")
    assert load_pretrained(s2 / "final").config.stage == 2
    # the motion generator: the recipe with its debug twin on the stage-2 model's latents
    assert ldm(["extract", "--checkpoint", str(s2 / "final"), "--input", str(videos), "--output", str(tmp_path / "lat"),
                "--frames", "8", "--height", str(SIZE), "--width", str(SIZE), "--shard-size", "2",
                "--text-encoder", "builtin"]) == 0
    assert ldm(["train", "--config", str(RECIPES / "hivae-generator.yaml"), "model.dit=dit-hivae-debug",
                f"data.shards={tmp_path / 'lat'}", f"output={tmp_path / 'gen'}", "steps=2", "data.batch_size=2",
                "data.shuffle=2", "save_every=2", "log_every=1", "optim.warmup_steps=1"]) == 0
    assert len(_log(tmp_path / "gen")) == 2


def test_dit_xl_recipe_trains_at_debug_size_with_its_validation_loss(videos, tmp_path, monkeypatch):
    """The DiT recipe, named as `--config dit-xl` from another folder, at the debug DiT size: its
    settings reach the run (DiT's optimiser, EMA, logit-normal t) and it logs its validation loss."""
    monkeypatch.chdir(tmp_path)
    for name, seed in (("latents", 0), ("latents-val", 1)):
        synth_dataset(tmp_path / f"v-{name}", num=2, frames=8, size=SIZE, fps=8, seed=seed)
        with pytest.warns(UserWarning, match="RANDOM"):
            assert ldm(["extract", "--autoencoder", "kl2d-f8c4-debug", "--input", str(tmp_path / f"v-{name}"),
                        "--output", f"runs/{name}", "--frames", "8", "--height", str(SIZE), "--width",
                        str(SIZE)]) == 0
    assert ldm(["train", "--config", "dit-xl", "model.dit=dit-debug", "steps=2", "data.batch_size=2",
                "data.num_workers=0", "save_every=2", "log_every=1", "val.every=1"]) == 0
    config = json.loads((tmp_path / "runs" / "dit-xl" / "config.json").read_text())["train"]
    assert (config["ema_decay"], config["optim"]["lr"], config["optim"]["warmup_steps"], config["flow"]["timesteps"]) \
        == (0.9999, 1e-4, 0, "logit_normal")
    assert [r["step"] for r in _log(tmp_path / "runs" / "dit-xl") if "val_loss" in r] == [1, 2]


def test_ivvae_recipes_image_then_video_256_then_512(videos, tmp_path):
    image = _train_ae("ivvae-image.yaml", videos, tmp_path / "image", "autoencoder=kl2d-ivvae-z16-debug")
    # the inflation step the video recipe's comment gives
    assert ldm(["convert", "--source", "saved", "--path", str(image / "final"), "--target", "ivvae-z16-debug",
                "--output", str(tmp_path / "init")]) == 0
    v256 = _train_ae("ivvae-video-256.yaml", videos, tmp_path / "v256", "autoencoder=ivvae-z16-debug",
                     f"init={tmp_path / 'init'}", "frames=5")
    v512 = _train_ae("ivvae-video-512.yaml", videos, tmp_path / "v512", f"init={v256 / 'final'}", "frames=5")
    assert load_pretrained(v512 / "final").config == load_pretrained(v256 / "final").config
    assert [r["lr"] for r in _log(v512)] == pytest.approx([1e-7, 2e-7])  # 1e-4 x (s + 1) / 1000 warm-up


@pytest.mark.parametrize("row, image_vae", [("ivvae-z8-causal-debug", "kl2d-ivvae-z8-debug"),
                                             ("causal3d-ivvae-baseline-z8-gc-debug", "kl2d-ivvae-z16-dim96-debug")])
def test_ivvae_ablation_recipe_trains_a_row_from_its_image_vae(videos, tmp_path, row, image_vae):
    """The ablation recipe's three commands (its header) for a KTC row and a baseline (A) row: the
    image VAE, its inflation into the row, the row's video training from it."""
    image = _train_ae("ivvae-image.yaml", videos, tmp_path / "image", f"autoencoder={image_vae}")
    assert ldm(["convert", "--source", "saved", "--path", str(image / "final"), "--target", row,
                "--output", str(tmp_path / "init")]) == 0
    out = _train_ae("ivvae-ablation.yaml", videos, tmp_path / "row", f"autoencoder={row}",
                    f"init={tmp_path / 'init'}", "frames=5")
    assert load_pretrained(out / "final").config == build(row).config
    assert [r["lr"] for r in _log(out)] == pytest.approx([1e-7, 2e-7])  # 1e-4 x (s + 1) / 1000 warm-up


def test_videovaeplus_recipe_with_text_joint_batches_and_gan(videos, tmp_path):
    out = _train_ae("videovaeplus.yaml", videos, tmp_path / "vae", "autoencoder=cmvae-z4-text-debug", "init=null",
                    "text_encoder=builtin", "frames=8", "disc_start=0", "betas=[0.5,0.99]")
    assert {"d_loss", "g_adv"} <= set(_log(out)[-1])  # the discriminator trained
    # each optimizer has its own betas: the recipe's (0.5, 0.9) for the discriminator
    assert [g["betas"] for g in _checkpoint(out, "optimizer.json")["param_groups"]] == [[0.5, 0.99]]
    assert [g["betas"] for g in _checkpoint(out, "disc_optimizer.json")["param_groups"]] == [[0.5, 0.9]]


def test_mtcvae_recipes_stage_1_then_stage_2(videos, tmp_path):
    s1 = _train_ae("mtcvae-stage1.yaml", videos, tmp_path / "s1", "autoencoder=mtcvae-c4-debug",
                   "base_checkpoint=null", "frames=17")
    assert [r["lr"] for r in _log(s1)] == [1e-5, 1e-5]
    s2 = _train_ae("mtcvae-stage2.yaml", videos, tmp_path / "s2", f"init={s1 / 'final'}", "frames=17",
                   "ae_config=[train_rates=random]")  # a setting of the saved model (same weight shapes)
    saved = load_pretrained(s2 / "final").config
    assert (load_pretrained(s1 / "final").config.stage, saved.stage, saved.train_rates) == (1, 2, "random")
    # a setting that changes the architecture does not fit the saved weights: stopped before any work
    with pytest.raises(UserError, match="change mtcvae's architecture"):
        ldm(["train-ae", "--config", str(RECIPES / "mtcvae-stage2.yaml"), f"data={videos}", *DEBUG, "frames=17",
             f"init={s1 / 'final'}", f"output={tmp_path / 's2b'}", "ae_config=[latent_channels=8]"])
    assert not (tmp_path / "s2b").exists()
    # another family's folder as init: the recipe's `autoencoder: mtcvae` names the mistake
    build("hivae-s-debug").save_pretrained(tmp_path / "hivae", name="hivae-s-debug")
    with pytest.raises(UserError, match="holds a 'hivae' model .'hivae-s-debug'., not a 'mtcvae' one"):
        ldm(["train-ae", "--config", str(RECIPES / "mtcvae-stage2.yaml"), f"data={videos}", *DEBUG, "frames=17",
             f"init={tmp_path / 'hivae'}", f"output={tmp_path / 's2c'}"])
    assert not (tmp_path / "s2c").exists()


def test_missing_lpips_files_stop_a_recipe_before_any_work(videos, tmp_path):
    """A recipe names the LPIPS files it trains with; absent, the run stops before any folder."""
    with pytest.raises(FileNotFoundError, match="--lpips-vgg models/lpips/vgg16.pth: no such file"):
        ldm(["train-ae", "--config", str(RECIPES / "ivvae-image.yaml"), f"data={videos}", f"output={tmp_path / 'r'}",
             "autoencoder=kl2d-ivvae-z16-debug", f"height={SIZE}", f"width={SIZE}"])
    assert not (tmp_path / "r").exists()
