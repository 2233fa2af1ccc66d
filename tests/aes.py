"""Helpers the autoencoder tests share (`test_autoencoders`, `test_ivvae`, `test_h3ae`, `test_crossmodal`)."""
from __future__ import annotations

from typing import Callable

import torch


def one_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], lr: float = 1e-3,
             optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW) -> tuple[float, float]:
    """One optimizer step on ``loss_fn()`` (which must use the same batch and noise on every call):
    the loss before and after it. Every gradient has its parameter's strides: DDP (`ldm train-ae` on
    ranks) copies one with other strides into its bucket at every step, with a warning. The backward
    runs on two threads at least: CPU kernels pick other layouts on several threads than on one (the
    thread count `make test`'s workers run at), and a user's machine has several."""
    opt = optimizer(model.parameters(), lr=lr)
    before = loss_fn()
    opt.zero_grad()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        before.backward()
    finally:
        torch.set_num_threads(threads)
    strided = [(n, p.grad.stride(), p.stride()) for n, p in model.named_parameters()
               if p.grad is not None and p.grad.stride() != p.stride()]
    assert not strided, f"gradients with other strides than their parameters (name, grad, param): {strided[:4]}"
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    return before.item(), after.item()


def registered(debug: bool) -> list[str]:
    """Registered names of the package's own families (test fakes register into the same registry),
    the ``-debug`` ones or the others."""
    from autoencoders.base import REGISTRY

    return sorted(n for n, (cls, _) in REGISTRY.items()
                  if cls.__module__.startswith("autoencoders.") and n.endswith("-debug") == debug)


def example_batch(ae, batch: int = 2):
    """``batch`` random clips in [-1, 1] of ``ae.example_clip()`` and, for a text-guided model, their caption
    embeddings (`text_cond`), drawn from torch's global generator in that order."""
    T, H, W = ae.example_clip()
    return torch.rand(batch, 3, T, H, W) * 2 - 1, text_cond(ae, batch)


def text_cond(ae, batch: int):
    """Random caption embeddings (5 tokens, the last 2 masked) for a text-guided model, else None."""
    from ldm.latent import Cond

    if not ae.text_dim:
        return None
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[:, 3:] = False
    return Cond(text=torch.randn(batch, 5, ae.text_dim), text_mask=mask)
