"""Helpers the autoencoder tests share (`test_autoencoders`, `test_ivvae`, `test_h3ae`, `test_crossmodal`)."""
from __future__ import annotations

from typing import Callable

import torch


def one_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], lr: float = 1e-3,
             optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW) -> tuple[float, float]:
    """One optimizer step on ``loss_fn()`` (which must use the same batch and noise on every call):
    the loss before and after it."""
    opt = optimizer(model.parameters(), lr=lr)
    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    return before.item(), after.item()
