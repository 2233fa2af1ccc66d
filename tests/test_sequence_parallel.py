"""Sequence parallelism (Ulysses) on 2 gloo ranks equals one process: outputs and every gradient."""
import copy

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from dit import build
from ldm.latent import Cond, Latent
from dits import randomize
from procs import free_port, rank_then_exit

GRID = {"z": (4, 2, 6, 8)}  # patch (1, 2, 2): 2 x 3 x 4 = 24 tokens, split 12 / 12
ODD = {"z": (4, 3, 6, 5)}  # 3 x 3 x 3 = 27 tokens: one padding token



def _run(model, x, t, cond, pack=False):
    model.zero_grad(set_to_none=True)
    out = model(x, t, cond, pack=pack)["z"]
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()  # position-dependent loss
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check(name, model, x, t, cond, pack=False):
    from launch.sequence_parallel import apply_sequence_parallel

    ref_out, ref_grads = _run(model, x, t, cond, pack)
    sp = apply_sequence_parallel(model)
    out, grads = _run(model, x, t, cond, pack)
    sp.average_gradients()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} output: {m}")
    assert set(grads) == set(ref_grads) and len(grads) == sum(1 for _ in model.parameters())
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} grad {n}: {m}")
    sp.remove()
    again, _ = _run(model, x, t, cond, pack)  # single-device again
    torch.testing.assert_close(again, ref_out, atol=1e-6, rtol=1e-6)


def _worker(rank, port):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from launch.engine import apply_activation_checkpointing
        from launch.sequence_parallel import apply_sequence_parallel

        torch.manual_seed(0)  # same weights and inputs on both ranks
        B = 2
        text, mask = torch.randn(B, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()
        # grid latent, full 3D attention, text cross-attention with a mask, class labels
        model = randomize(build("dit-debug", GRID, text_dim=8, num_classes=3), 1, scale=0.1)
        x = {"z": torch.randn(B, *GRID["z"])}
        _check("grid", model, x, torch.rand(B), Cond(text=text, text_mask=mask, class_id=torch.tensor([0, -1])))
        # odd token count (padded), factorized spatial / temporal blocks, text, activation checkpointing
        model = randomize(build("dit-debug", ODD, text_dim=8, attn_layout="factorized", depth=3), 2, scale=0.1)
        apply_activation_checkpointing(model.blocks)  # as train.py does: blocks recomputed (with exchanges) in backward
        _check("odd-factorized", model, {"z": torch.randn(B, *ODD["z"])}, torch.rand(B), Cond(text=text))
        # varlen packed: several samples in one row (sequence ids, per-token conditioning index)
        items = [Latent({"z": torch.randn(1, 3, n, 4, 4)}, "varlen", aux={"length": torch.tensor([n])})
                 for n in (3, 2)]
        model = randomize(build("dit-debug", {"z": (3, 4, 4, 4)}, text_dim=8), 3, scale=0.1)
        _check("packed", model, Latent.collate(items), torch.rand(B), Cond(text=text, text_mask=mask), pack=True)
        # heads must split over the ranks
        odd_heads = build("dit-debug", GRID, hidden=48, heads=3)
        with pytest.raises(ValueError, match="3 heads are not divisible by 2"):
            apply_sequence_parallel(odd_heads)
        # the wrapper and hooks leave the parameters and the state dict alone; a deep copy (EMA) works
        sp = apply_sequence_parallel(model)
        assert list(model.state_dict()) == list(build("dit-debug", {"z": (3, 4, 4, 4)}, text_dim=8).state_dict())
        twin = copy.deepcopy(model)
        lat = Latent.collate(items)
        with torch.no_grad():
            torch.testing.assert_close(twin(lat, torch.full((B,), 0.5))["z"], model(lat, torch.full((B,), 0.5))["z"])
        sp.remove()
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.dist
def test_sequence_parallel_matches_one_process():
    mp.spawn(rank_then_exit, args=(_worker, free_port()), nprocs=2, join=True)


def test_apply_needs_a_process_group():
    from launch.sequence_parallel import apply_sequence_parallel

    if torch_dist.is_available() and torch_dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="initialised process group"):
        apply_sequence_parallel(build("dit-debug", GRID))
