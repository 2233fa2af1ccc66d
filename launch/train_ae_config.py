"""``ldm train-ae``'s settings and the checks a run passes before any work: `TrainAEConfig` (the
YAML keys, value and loss-weight checks in ``__post_init__``, the LR schedule, the loss config, the
shape buckets), ``HARMLESS`` (the keys a resumed run may change), the videos a run reads, what its
folder is bound to (`check_run_folder`), the command-line flags (shorthands of the keys,
`add_arguments` -> `config_from_args`) and `check_inputs` (the files and clip sizes, before any
model is built).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoencoders import FAMILIES, REGISTRY, build
from autoencoders.base import saved_config
from autoencoders.losses import REC_LOSSES, AELossConfig
from autoencoders.resolve import check_saved_name
from data.buckets import BucketSchedule
from data.sources import list_items
from launch import runs
from launch.cli import config_flag
from ldm import config as cfglib
from ldm.checkpoint import dir_hash
from ldm.errors import MissingInput, UserError, check_min, checking
from ldm.text import check_text_max_length

log = logging.getLogger("ldm.train_ae")

# settings that may change when a run is resumed; every other TrainAEConfig key binds the run
# folder (runs.check_binding). ``stage`` is checked against the checkpoint's (AETrainer._resume_stage).
HARMLESS = ("output", "log_every", "save_every", "sample_every", "keep", "num_workers", "resume", "device",
            "progress", "max_nonfinite", "latent_stats_clips", "stage", "profile", "val")


@dataclass(frozen=True)
class ValConfig:
    """Held-out reconstruction metrics over training (``ldm train``'s ``val`` for the DiT's loss)."""

    data: str = ""  # held-out videos (a folder or raw video shards, as --data); "" = no validation
    split: str = ""  # a list of the videos of val.data to take (UCF-101 testlist01.txt), as --split
    every: int = 0  # steps between validations; 0 = at every checkpoint (save_every) and the last step
    clips: int = 16  # its first clips (in list order), read once at frames x height x width


@dataclass(frozen=True)
class TrainAEConfig:
    """Everything one ``ldm train-ae`` run needs (the YAML keys; the CLI flags are shorthands)."""

    data: str
    output: str
    captions: str | None = None  # CSV/JSONL with path,caption (as `ldm extract --captions`); default: metadata.jsonl
    split: str | None = None  # a list of the videos of `data` to train on (UCF-101 trainlist01.txt), as extract's
    autoencoder: str | None = None  # registry name; optional when --init names a saved model
    init: str | None = None  # folder written by save_pretrained to start from
    stage: int | None = None  # training stage of a staged autoencoder (Autoencoder.stages); None: the model's own
    base_checkpoint: str | None = None  # save_pretrained folder of the base it starts from (Autoencoder.load_base)
    # KEY=VALUE overrides of the registered config (with init: of the saved one, same weight shapes)
    ae_config: tuple[str, ...] = ()
    frames: int = 17
    height: int = 256
    width: int = 256
    fps: float | None = None
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0  # linear LR warm-up steps (the LR is a function of the step: nothing to save)
    schedule: str = "constant"  # after warm-up: constant | cosine (to min_lr_ratio x lr at `steps`; runs.lr_factor)
    min_lr_ratio: float = 0.1  # cosine: the final LR as a fraction of the base LR
    lr_drop: tuple[tuple[int, float], ...] = ()  # (step, lr): from that step on the base LR is lr (runs.lr_at)
    steps: int = 1000
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    loss: str = "l1"
    kl_weight: float = 1e-6
    lpips_vgg: str | None = None
    lpips_heads: str | None = None
    lpips_weight: float = 1.0
    dwt_weight: float = 0.0  # L1 on 3D Haar wavelet coefficients (H3AE Tab. 5's DWT loss; autoencoders.losses)
    gan: bool = False
    gan_weight: float = 0.5
    disc_kind: str = "2d"
    disc_start: int = 0
    disc_betas: tuple[float, float] | None = None  # the discriminator's AdamW betas; None: `betas`
    text_encoder: str | None = None  # builtin | t5:DIR | clip:DIR: caption embeddings for text-guided AEs
    text_max_length: int = 0  # tokens captions are cut / padded to (recorded in final/); 0 = the encoder's own
    image_ratio: float = 0.0  # fraction of steps that train on the batch's frames as images (joint training)
    # shape buckets (data.buckets): [frames, height, width, probability, disc_weight] each; a step draws
    # one, its clips are read at that shape, its GAN weight is x disc_weight. () = frames x height x width
    buckets: tuple[tuple[int | float, ...], ...] = ()
    log_every: int = 10
    save_every: int = 500
    sample_every: int = 500
    keep: int = 3  # checkpoints kept, >= 1 as ldm train's keep_checkpoints (1: no fallback, see add_arguments)
    num_workers: int = 2
    seed: int = 0
    resume: str = "auto"  # auto | no | a checkpoint folder
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast; CUDA only)
    latent_stats_clips: int = 32  # clips used to set latent_scale/shift of the final model; 0 keeps them
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    progress: bool = True
    profile: runs.ProfileConfig = field(default_factory=runs.ProfileConfig)  # torch.profiler window -> OUTPUT/profile
    val: ValConfig = field(default_factory=ValConfig)  # PSNR / SSIM (/ LPIPS) on held-out clips, in log.jsonl

    def __post_init__(self) -> None:
        if self.autoencoder is None and self.init is None:
            raise ValueError("give --autoencoder NAME or --init DIR (or both)")
        if self.autoencoder is not None and self.autoencoder not in REGISTRY:
            if self.autoencoder in FAMILIES and self.init is None:
                raise ValueError(f"autoencoder {self.autoencoder!r} is a family: with --init it checks the folder's "
                                 "family; without, give a registered name (see `ldm list`)")
            if self.autoencoder not in FAMILIES:
                raise ValueError(f"unknown autoencoder {self.autoencoder!r}; registered: {sorted(REGISTRY)}")
        positive = ("frames", "height", "width", "batch_size", "steps", "log_every", "save_every", "sample_every",
                    "max_nonfinite")
        check_min({name: getattr(self, name) for name in positive}, 1)
        check_min({"warmup": self.warmup, "num_workers": self.num_workers, "disc_start": self.disc_start,
                   "latent_stats_clips": self.latent_stats_clips, "profile.start": self.profile.start,
                   "profile.steps": self.profile.steps, "val.every": self.val.every}, 0)
        check_min({"val.clips": self.val.clips, "keep": self.keep}, 1)
        check_text_max_length(self.text_max_length, self.text_encoder)
        if self.schedule not in runs.SCHEDULES:
            raise ValueError(f"schedule must be one of {runs.SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("betas", "disc_betas"):
            betas = getattr(self, name)
            if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
                raise ValueError(f"{name} must be two numbers in [0, 1), got {betas}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, max_grad_norm >= 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.max_grad_norm}")
        drops = [tuple(d) for d in self.lr_drop]
        if any(len(d) != 2 for d in drops):
            raise ValueError(f"lr_drop entries must be (step, lr) pairs, got {self.lr_drop}")
        steps_at = [int(at) for at, _ in drops]
        if any(at < 1 for at in steps_at) or steps_at != sorted(set(steps_at)):
            raise ValueError(f"lr_drop steps must be >= 1 and strictly increasing, got {steps_at}")
        if not all(float(v) > 0 for _, v in drops):
            raise ValueError(f"lr_drop learning rates must be > 0, got {[v for _, v in drops]}")
        object.__setattr__(self, "lr_drop", tuple((int(at), float(v)) for at, v in drops))  # JSON lists -> pairs
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"stage must be >= 0, got {self.stage}")
        if not 0.0 <= self.image_ratio <= 1.0:
            raise ValueError(f"image_ratio must be in [0, 1], got {self.image_ratio}")
        if self.buckets:
            object.__setattr__(self, "buckets", tuple(tuple(b) for b in self.buckets))  # JSON lists -> tuples
            self.bucket_schedule()  # validates every entry
            if self.image_ratio > 0:
                raise ValueError("give images as a 1-frame bucket (e.g. [1, 256, 256, 0.2, 1.0]) rather than "
                                 "image_ratio together with buckets")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.loss not in REC_LOSSES:
            raise ValueError(f"loss must be one of {REC_LOSSES}, got {self.loss!r}")
        if (self.lpips_vgg is None) != (self.lpips_heads is None):
            raise ValueError("LPIPS needs both --lpips-vgg (backbone) and --lpips-heads (linear heads)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self.loss_config()  # the loss weights and disc settings, checked by AELossConfig before any work

    def learning_rate(self, step: int) -> float:
        """LR of the update with 0-based index ``step`` (``runs.lr_at``, the schedule of ``ldm train``
        too): warm-up, then constant or cosine, times the piecewise ``lr_drop`` base LR."""
        return runs.lr_at(step, self.lr, self.lr_drop, warmup=self.warmup, schedule=self.schedule,
                          total_steps=self.steps, min_lr_ratio=self.min_lr_ratio)

    def loss_config(self, disc_weight: float = 1.0) -> AELossConfig:
        """The autoencoder loss; ``disc_weight`` (a bucket's) multiplies the GAN weight."""
        return AELossConfig(rec=self.loss, kl_weight=self.kl_weight,
                            lpips_weight=self.lpips_weight if self.lpips_vgg else 0.0, dwt_weight=self.dwt_weight,
                            gan_weight=self.gan_weight * disc_weight if self.gan else 0.0, disc_kind=self.disc_kind,
                            disc_start=self.disc_start)

    def bucket_schedule(self) -> BucketSchedule:
        """The clip shape of each step: ``buckets``, or ``frames x height x width`` on every step."""
        if self.buckets:
            return BucketSchedule.from_spec(self.buckets, self.seed)
        return BucketSchedule.single(self.frames, self.height, self.width, self.seed)


def training_videos(cfg: TrainAEConfig):
    """The videos of ``--data`` (with ``--captions``), those ``--split`` names when it is given."""
    return list_items(cfg.data, cfg.captions, split=cfg.split)


def held_out_videos(cfg: TrainAEConfig):
    """The videos of ``val.data``, those ``val.split`` names when it is given."""
    return list_items(cfg.val.data, split=cfg.val.split or None)


def run_binding(cfg: TrainAEConfig) -> dict[str, Any]:
    """What the run folder is bound to: the settings except ``HARMLESS``, the videos (how many,
    and a hash of their names) and the weights hash of ``init`` / ``base_checkpoint``."""
    keys = [it.key for it in training_videos(cfg)]
    facts = {"videos": f"{len(keys)} (names sha256 {hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:16]})"}
    for key in ("init", "base_checkpoint"):
        if getattr(cfg, key) is not None:
            facts[f"{key}_weights"] = dir_hash(getattr(cfg, key))
    return runs.binding_record(cfglib.to_dict(cfg), HARMLESS, facts)


def check_run_folder(cfg: TrainAEConfig, allow_change: tuple[str, ...] = ()) -> runs.Binding:
    """The output folder may take this run: no earlier run's checkpoints are replaced
    (``--resume no`` into a folder that has some), and a folder of an earlier run -- or the run
    of ``--resume CHECKPOINT`` -- was made by the same settings and inputs (`runs.check_binding`;
    an earlier run that left no checkpoint and no final/ binds nothing, `runs.holds_training`)."""
    out = Path(cfg.output)
    if cfg.resume == "no" and runs.checkpoints(out / "checkpoints"):
        raise UserError(f"--resume no: {out} holds checkpoints of an earlier run, which this run would replace; "
                        f"give a new --output to start over (or move {out / 'checkpoints'} away)")
    record = run_binding(cfg)
    if cfg.resume not in ("auto", "no"):
        source = Path(cfg.resume).resolve().parent.parent  # RUN/checkpoints/step-N -> RUN
        if source != out.resolve():
            runs.check_binding(source, record, allow_change, new_folder="--resume CHECKPOINT of a run like this one",
                               defaults=runs.defaults_of(TrainAEConfig))
    return runs.check_binding(out, record, allow_change, defaults=runs.defaults_of(TrainAEConfig),
                              holds_work=runs.holds_training(out))


# ------------------------------------------------------------------------------------------
# The flags of `ldm train-ae`: shorthands of `TrainAEConfig` keys
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``[--config FILE.yaml] [flags] [KEY=VALUE ...]``: each flag is a shorthand of a
    ``TrainAEConfig`` key and wins over the YAML; dotted overrides win over both. Flags not given
    do not touch the YAML's values (defaults come from ``TrainAEConfig``)."""
    def a(*names: str, **kw: Any) -> None:
        config_flag(parser, TrainAEConfig, *names, **kw)

    parser.add_argument("--config",
                        help="train-ae YAML (TrainAEConfig keys), or a recipe by name (hivae-stage1; "
                             "launch/configs/recipes/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (YAML) and exit; reads and writes nothing")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides (YAML values), e.g. steps=2000 lr_drop=[[70000,1e-5]]; "
                             "val.data=HELD_OUT_VIDEOS [val.every=N val.clips=16]: held-out PSNR / SSIM in log.jsonl")
    parser.add_argument(runs.ALLOW_FLAG, dest="allow_change", action="append", metavar="KEY[,KEY]",
                        help=runs.ALLOW_HELP)
    a("--autoencoder", choices=sorted(REGISTRY), help="registered autoencoder to train")
    a("--init", help="start from a folder written by save_pretrained (e.g. another run's final/)")
    a("--ae-config", dest="ae_config", action="append", metavar="KEY=VALUE",
      help="override a field of the registered config (repeatable); with --init, of the saved one, for fields "
           "that keep the weights' shapes (e.g. MTC-VAE train_rates=random, Hi-VAE kl_free_bits=1)")
    a("--stage", type=int, choices=(0, 1, 2),
      help="training stage of a staged autoencoder: Hi-VAE 1 = global motion module + decoder, 2 = detailed "
           "module + decoder (global module frozen); MTC-VAE 1 = new sampling layers, 2 = keyframe embedding + "
           "predictor (+ decoder), 0 = everything. Start stage 2 from the stage-1 run: --init RUN/final --stage 2. "
           "Default: the model's own; a resumed run keeps its checkpoint's")
    a("--base-checkpoint", metavar="DIR",
      help="the trained base a staged autoencoder starts from (a save_pretrained folder, e.g. a train-ae "
           "OUTPUT/final): Hi-VAE's frozen kl2d, MTC-VAE's causal3d")
    a("--data", "--input", help="folder of videos or raw video shards (data.sources.list_items); --input as in "
                               "`ldm extract` is the same flag")
    a("--captions", help="CSV/JSONL with path,caption for the videos of --data (default: metadata.jsonl in the "
                         "folder); text-guided autoencoders train with them")
    a("--split", metavar="FILE",
      help="train on the videos this list names, paths relative to --data (UCF-101 trainlist01.txt; as `ldm "
           "extract --split`); val.split=FILE takes the held-out videos of val.data the same way")
    a("--output", help="run folder (checkpoints, samples, log, final/)")
    a("--frames", type=int, help="clip length")
    a("--height", type=int)
    a("--width", type=int)
    a("--fps", type=float, help="resample clips to this rate (default: native)")
    a("--batch-size", type=int, help="clips per rank per step")
    a("--lr", type=float)
    a("--weight-decay", type=float)
    a("--warmup", type=int, help="linear LR warm-up steps")
    a("--schedule", choices=runs.SCHEDULES,
      help="LR after warm-up: constant, or cosine to min_lr_ratio x LR at --steps")
    a("--min-lr-ratio", type=float, help="cosine schedule: final LR as a fraction of --lr")
    a("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="AdamW betas of the autoencoder")
    a("--disc-betas", type=float, nargs=2, metavar=("B1", "B2"),
      help="AdamW betas of the discriminator (default: --betas)")
    a("--lr-drop", dest="lr_drop", type=_parse_lr_drop, action="append", metavar="STEP:LR",
      help="from update STEP on (0-based; the log's steps > STEP) the LR is LR (repeatable, piecewise constant "
           "after warm-up; H3AE: --lr 1e-4 --lr-drop 70000:1e-5 --steps 80000)")
    a("--steps", type=int, help="total optimizer steps, resume continues up to it")
    a("--max-grad-norm", type=float, help="gradient clipping (0: off)")
    a("--loss", choices=REC_LOSSES, help="reconstruction loss")
    a("--kl-weight", type=float, help="weight of the KL term (SD convention: KL summed over latents / input elements)")
    a("--lpips-vgg", help="torchvision VGG16 weights file for the LPIPS term")
    a("--lpips-heads", help="the lpips package's vgg.pth linear heads")
    a("--lpips-weight", type=float)
    a("--dwt-weight", type=float, help="weight of an L1 loss on 3D Haar wavelet coefficients (H3AE Tab. 5's DWT loss)")
    a("--gan", action="store_true", help="add a PatchGAN discriminator (hinge loss, adaptive weight)")
    a("--gan-weight", type=float)
    a("--disc-kind", choices=("2d", "3d"))
    a("--disc-start", type=int, help="step at which the GAN switches on")
    a("--text-encoder", help="caption embeddings for a text-guided autoencoder: builtin | t5:DIR | clip:DIR")
    a("--text-max-length", type=int, metavar="N", help="tokens captions are cut or padded to, recorded in final/ for "
      "extract / reconstruct / eval recon (VideoVAE+: 100); default: the encoder's own (T5 120, CLIP 77, builtin 64)")
    a("--image-ratio", type=float,
      help="fraction of steps that train on the batch's frames as single images (joint image-video training; "
           "the cross-modal VAE paper uses 0.2)")
    a("--log-every", type=int)
    a("--save-every", type=int)
    a("--sample-every", type=int)
    # the older checkpoints go only once the new one is sealed (launch.runs.commit), so 1 is safe against a kill
    # or a full disk while writing; more guard against a sealed one damaged later (a crash before the page cache
    # reached the disk, a disk error): resume then falls back to the one before
    a("--keep", type=int, help="checkpoints to keep (default 3; >= 1, as ldm train's keep_checkpoints: with 1 a "
                               "checkpoint damaged after it was written has no fallback)")
    a("--num-workers", type=int)
    a("--seed", type=int)
    a("--resume", help="auto (default): newest valid checkpoint under OUTPUT/checkpoints; no: start from step 0 (an "
                       "OUTPUT holding checkpoints is refused); or a checkpoint folder")
    a("--device", choices=("auto", "cpu", "cuda"))
    a("--precision", choices=("fp32", "bf16"))
    a("--latent-stats-clips", type=int,
      help="clips used to set the final model's latent_scale/shift (0: keep the config's)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar (default: a bar on rank 0)")


def _parse_lr_drop(text: str) -> tuple[int, float]:
    """``STEP:LR`` -> ``(STEP, LR)`` for ``--lr-drop``."""
    step, sep, lr = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(step), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEP:LR (e.g. 70000:1e-5)") from None


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in TrainAEConfig.__dataclass_fields__}


def config_from_args(args: argparse.Namespace) -> TrainAEConfig:
    """``--config`` YAML, then the flags given, then the ``KEY=VALUE`` overrides."""
    return cfglib.load_yaml(args.config, TrainAEConfig, args.overrides, values=_flags(args))


def print_config_yaml(args: argparse.Namespace) -> str:
    """``--print-config``: the settings ``config_from_args`` resolves, as YAML (``data`` / ``output``
    may still be unset: a recipe leaves them to the command line)."""
    with checking():
        return cfglib.resolved_yaml(args.config, TrainAEConfig, args.overrides, values=_flags(args))


def check_inputs(cfg: TrainAEConfig) -> None:
    """What a run reads is there and fits, before any process group, model or folder: the output
    path, the ``--init`` / ``--base-checkpoint`` folders, the videos, and the clip size for the
    autoencoder (built on the meta device: no weights). `UserError` otherwise."""
    out = Path(cfg.output)
    runs.check_output_layout(out, "--output ", ("checkpoints", "final", "samples", "tensorboard", "profile"),
                             ("log.jsonl", "summary.json", runs.BINDING))
    for flag, path in (("--lpips-vgg", cfg.lpips_vgg), ("--lpips-heads", cfg.lpips_heads)):
        if path is not None and not Path(path).is_file():
            raise MissingInput(f"{flag} {path}: no such file (the LPIPS weights, local files: README, LPIPS)")
    saved = {}
    for flag, path in (("--base-checkpoint", cfg.base_checkpoint), ("--init", cfg.init)):
        if path is not None:
            try:
                saved[flag] = saved_config(path)
            except UserError as e:  # say which folder (a recipe names them; its header says how to make them)
                raise type(e)(f"{flag}: {e}") from None
    meta = saved.get("--init")
    if meta is not None:
        with checking("--init"):  # --autoencoder NAME with --init: the folder must hold it
            check_saved_name(cfg.init, meta, cfg.autoencoder)
    videos = training_videos(cfg)  # a missing --data, --captions or --split file is one line here
    if cfg.val.split and not cfg.val.data:
        raise UserError(f"val.split {cfg.val.split} without val.data: give val.data=FOLDER, the videos it lists from")
    if cfg.val.split and not Path(cfg.val.split).is_file():
        raise MissingInput(f"val.split {cfg.val.split}: split list file not found")
    if cfg.val.data:
        try:
            held_out = held_out_videos(cfg)
        except UserError as e:  # say which setting: --data's message reads the same
            raise type(e)(f"val.data: {e}") from None
        if not held_out:
            raise UserError(f"val.data {cfg.val.data}: no videos found; give a folder of held-out videos")
        both = {it.key for it in videos} & {it.key for it in held_out[:cfg.val.clips]}
        if Path(cfg.val.data).resolve() == Path(cfg.data).resolve() and both:
            log.warning("val.data is --data (%s) and %d of the validation clips are training clips (e.g. %s), not "
                        "held out; give val.split=LIST of videos --split leaves out", cfg.data, len(both), min(both))
    with checking(f"--ae-config {' '.join(cfg.ae_config)}" if cfg.ae_config else None), torch.device("meta"):
        overrides = cfglib.apply_dotted({}, list(cfg.ae_config))
        if meta is not None:
            init = FAMILIES[meta["family"]].from_config_dict(meta["config"])
            ae = init.with_config(**overrides) if overrides else init  # an architecture change stops here
        else:
            ae = build(cfg.autoencoder, **overrides)
    with checking(f"--frames {cfg.frames} --height {cfg.height} --width {cfg.width}"), torch.device("meta"):
        ae.check_input(cfg.frames, cfg.height, cfg.width)
        if cfg.image_ratio > 0:
            ae.check_input(1, cfg.height, cfg.width)
    stage = cfg.stage if cfg.stage is not None else ae.stage  # --ae-config stage=N trains that stage too
    if stage == 2 and meta is None and ae.stages:  # stage 2 freezes what stage 1 trains
        raise UserError(f"--stage 2 trains on a stage-1 model: from {cfg.autoencoder} what stage 1 trains would stay "
                        "untrained and frozen; run --stage 1 first, then --init STAGE1_RUN/final --stage 2")
    if cfg.base_checkpoint is not None and meta is not None and ae.base_family:
        raise UserError(f"--base-checkpoint with --init: {cfg.init} holds the {ae.base_family} base its modules were "
                        "trained on, and another would replace it under them; leave out --base-checkpoint (it "
                        "starts a model from --autoencoder NAME)")
    saved_stage = init.stage if meta is not None else None
    if stage and saved_stage and stage < saved_stage:  # stage 0 (everything) may start from any stage
        raise UserError(f"--init {cfg.init} is a stage-{saved_stage} {ae.family} model: --stage {stage} after "
                        f"stage {saved_stage} would retrain stage {stage}'s part over it and leave stage "
                        f"{saved_stage}'s training stale; to train stage {stage} longer, resume its run or --init "
                        f"STAGE{stage}_RUN/final --stage {stage}; to go on with stage {saved_stage}, leave "
                        "out --stage")
    for bucket in cfg.bucket_schedule().buckets:
        with checking(f"bucket {list(bucket.shape)}"), torch.device("meta"):
            ae.check_input(*bucket.shape)
