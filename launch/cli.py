"""The ``ldm`` console script. Each verb lives in its own module under ``launch/`` with
``add_arguments(parser)`` and ``run(args)``; this file only wires them."""
from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, help)
VERBS: dict[str, tuple[str, str]] = {  # keep in sync with the README's verb table
    "list": ("launch.list_models", "list registered autoencoders and DiTs with their compression"),
    "data": ("launch.data_cmd", "dataset tools (synth: generate the synthetic attribute video set)"),
    "train-ae": ("launch.train_ae", "train an autoencoder on videos"),
    "extract": ("launch.extract", "encode videos into WebDataset latent shards"),
    "reconstruct": ("launch.reconstruct", "encode+decode a video, print PSNR/SSIM"),
    "train": ("launch.train", "train a DiT on latent shards with DeepSpeed"),
    "sample": ("launch.sample", "sample videos from prompts or class labels"),
    "demo": ("launch.demo", "the whole pipeline on a laptop CPU with a report (make demo)"),
    "cost": ("launch.cost", "downstream cost per autoencoder: tokens, DiT FLOPs and training memory, no weights"),
    "eval": ("launch.evaluate", "quality: recon (PSNR/SSIM/LPIPS/rFVD) and gen (FVD/FID, attributes, VBench)"),
    "compare": ("launch.compare", "autoencoders side by side: same clips, same DiT, cost and quality report"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser with every verb listed; only ``verb``'s module is imported (fast start-up, and a
    verb whose optional dependencies are missing cannot break the others)."""
    parser = argparse.ArgumentParser(prog="ldm", description="Latent-diffusion video platform")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the `deepspeed` launcher inserts --local_rank=N after the module; the rank also comes in
    # LOCAL_RANK, which launch.dist reads, so drop the flag wherever it is
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(verb).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
