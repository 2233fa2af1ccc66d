"""Latent shapes and inputs the DiT tests share (`test_dit`, `test_compile`, `test_sequence_parallel`)."""
from __future__ import annotations

import torch

from ldm.latent import Latent

GRID = {"z": (4, 3, 6, 5)}  # c t h w: odd sizes exercise the patch padding
HIVAE = {"content": (4, 1, 8, 8), "global": (2, 4, 3), "detailed": (4, 3, 5)}  # content grid + two token sets
VARLEN = {"z": (3, 5, 4, 4)}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised parameters (adaLN, heads) values so outputs and gradients depend on inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def random_parts(parts: dict[str, tuple[int, ...]], B: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of B random latents with the per-sample part shapes ``parts``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((B, *s), generator=g) for k, s in parts.items()}


def varlen_batch(lengths: tuple[int, ...] = (5, 2, 3), seed: int = 0) -> tuple[Latent, list[Latent]]:
    """Varlen latents of ``lengths`` frames (3 x n x 4 x 4 each), collated, and the single items."""
    g = torch.Generator().manual_seed(seed)
    items = [Latent({"z": torch.randn(1, 3, n, 4, 4, generator=g)}, "varlen", aux={"length": torch.tensor([n])})
             for n in lengths]
    return Latent.collate(items), items
