"""Random weights for the test-only references of public models (tests/official_*.py): one tensor per
official name and shape, drawn so activations stay O(1) through a whole network."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def random_official(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """Weights ~ N(0, 1/fan_in), norm scales (``*.norm*.weight``) around 1, biases around 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) > 1:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif ".norm" in name and name.endswith(".weight"):
            out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.1 * torch.randn(shape, generator=g)
    return out
