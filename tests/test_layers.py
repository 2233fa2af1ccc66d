import pytest
import torch

from ldm.layers import (FinalLayer, QKNorm, RMSNorm, Rope3D, TimestepEmbedder, TokenLayout, TransformerBlock,
                        apply_rope, fold_groups, group_ids, rope_axes, set_attention_backend, timestep_embedding,
                        unfold_groups)


def _grid_positions(t, h, w):
    axes = [torch.arange(n) for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (N, 3)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 10.0, 500.0]), 33)
    assert e.shape == (3, 33)
    torch.testing.assert_close(e[0, :16], torch.ones(16))  # cos(0)
    assert not torch.allclose(e[1], e[2])
    emb = TimestepEmbedder(32)
    assert emb(torch.rand(4)).shape == (4, 32)


def test_rmsnorm_and_qknorm():
    x = torch.randn(2, 5, 8)
    n = RMSNorm(8)
    torch.testing.assert_close(n(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    q, k = QKNorm(8)(x, 3 * x)
    torch.testing.assert_close(q, k)


def test_rope_axes_and_relative_positions():
    assert rope_axes(64) == (24, 20, 20) and rope_axes(72) == (24, 24, 24) and rope_axes(16) == (8, 4, 4)
    with pytest.raises(ValueError):
        Rope3D(16, axes=(8, 4, 2))
    rope = Rope3D(16)
    pos = _grid_positions(2, 3, 2)
    q, k = torch.randn(1, 2, pos.shape[0], 16), torch.randn(1, 2, pos.shape[0], 16)
    scores = apply_rope(q, rope(pos)) @ apply_rope(k, rope(pos)).transpose(-1, -2)
    shifted = pos + torch.tensor([5, -3, 7])
    scores2 = apply_rope(q, rope(shifted)) @ apply_rope(k, rope(shifted)).transpose(-1, -2)
    torch.testing.assert_close(scores, scores2, atol=1e-4, rtol=1e-4)  # depends on offsets only
    torch.testing.assert_close(apply_rope(q, rope(pos)).norm(dim=-1), q.norm(dim=-1))  # a rotation
    # every axis moves the embedding
    for axis in range(3):
        moved = pos.clone()
        moved[:, axis] += 1
        assert not torch.allclose(apply_rope(q, rope(moved)), apply_rope(q, rope(pos)))
    # batched positions give the same as shared ones
    torch.testing.assert_close(rope(pos[None].expand(3, -1, -1))[0][1], rope(pos)[0][0])
    with pytest.raises(ValueError, match="integers"):
        rope(pos.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_the_pairwise_rotation_to_the_bit(dtype):
    """`apply_rope`'s four-kernel form (``x * [cos|cos] + [x2|x1] * [-sin|sin]``) gives the floats of
    RoFormer's pairwise rotation of channels ``(i, i + d/2)`` written out, in float32, cast back."""
    rope = Rope3D(72)  # dit-XL's head dim: axes (24, 24, 24)
    pos = torch.randint(-40, 400, (2, 50, 3))
    x = (torch.randn(2, 3, 50, 72) * 8).to(dtype)
    angles = pos.float()[..., rope.axis_of] * rope.inv_freq  # (B, N, 36)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x.float().chunk(2, -1)
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(dtype)
    got = apply_rope(x, rope(pos))
    assert got.dtype == dtype and torch.equal(got, expected)


def test_group_ids():
    pos = _grid_positions(2, 2, 2)  # 8 tokens
    seq = torch.tensor([[0, 0, 0, 0, 0, 0, -1, -1]])
    spatial = group_ids(pos, seq, (0,))
    temporal = group_ids(pos, seq, (1, 2))
    assert spatial[0, 6] == -1 and temporal[0, 7] == -1
    assert len(set(spatial[0, :4].tolist())) == 1 and spatial[0, 0] != spatial[0, 4]
    assert temporal[0, 0] == temporal[0, 4] and len(set(temporal[0, :4].tolist())) == 4


def _block(**kw):
    blk = TransformerBlock(32, 4, 2.0, **kw)
    return blk


def test_block_starts_as_identity():
    blk = _block()
    x, c = torch.randn(2, 12, 32), torch.randn(2, 32)
    layout = TokenLayout(_grid_positions(3, 2, 2), rope=Rope3D(8)(_grid_positions(3, 2, 2)))
    torch.testing.assert_close(blk(x, c, layout), x)
    head = FinalLayer(32, 5)
    assert torch.all(head(x, c) == 0)


@pytest.mark.parametrize("layout_name,axis_same", [("spatial", (0,)), ("temporal", (1, 2))])
def test_factorised_layouts_attend_within_groups(layout_name, axis_same):
    blk = _block(layout=layout_name)
    _randomize(blk)
    pos = _grid_positions(3, 2, 2)
    rope = Rope3D(8)(pos)
    x, c = torch.randn(1, 12, 32), torch.randn(1, 32)
    y = blk(x, c, TokenLayout(pos, rope=rope))
    x2 = x.clone()
    x2[:, 0] += torch.randn(32)  # perturb token (0, 0, 0)
    y2 = blk(x2, c, TokenLayout(pos, rope=rope))
    same = torch.all(pos[:, list(axis_same)] == pos[0, list(axis_same)], -1)
    changed = (y2 - y).abs().amax(-1)[0] > 1e-6
    assert torch.equal(changed, same)  # only tokens of the perturbed token's group move


def _two_block_positions(t, h, w, n):
    """Hi-VAE decoder's rows: a (t, h, w) frame grid, then n detailed tokens per frame at (t, -1-i, -1)."""
    det = _grid_positions(t, n, 1)
    return torch.cat([_grid_positions(t, h, w), torch.stack([det[:, 0], -1 - det[:, 1], det[:, 2] - 1], -1)])


@pytest.mark.parametrize("layout_name", ["spatial", "temporal"])
@pytest.mark.parametrize("sizes", [(6,), (6, 2)])
def test_dense_groups_equal_the_id_groups(layout_name, sizes):
    """``TokenLayout.grids`` (reshaped dense groups, no host syncs) gives the outputs and gradients
    of the id path (grouped by positions), for one grid and for a grid + detailed tokens."""
    T = 3
    pos = _grid_positions(T, 2, 3) if sizes == (6,) else _two_block_positions(T, 2, 3, 2)
    N, rope, pos = pos.shape[0], Rope3D(8)(pos), pos[None].expand(2, -1, -1)
    blk = _block(layout=layout_name, context_dim=24)
    _randomize(blk, seed=2)
    x, c, ctx = torch.randn(2, N, 32), torch.randn(2, 32), torch.randn(2, 5, 24)
    x.requires_grad_(True)
    ids_out = blk(x, c, TokenLayout(pos, rope=rope), ctx)
    (g_ids,) = torch.autograd.grad(ids_out.square().sum(), x)
    dense = TokenLayout(pos, rope=rope, grids=(T, sizes))
    assert dense.fold(layout_name) == (layout_name, sizes) and dense.fold("full") is None
    dense_out = blk(x, c, dense, ctx)
    (g_dense,) = torch.autograd.grad(dense_out.square().sum(), x)
    torch.testing.assert_close(dense_out, ids_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_dense, g_ids, atol=1e-5, rtol=1e-5)
    q = torch.randn(2, 4, N, 8)
    folded = fold_groups(q, layout_name, sizes)
    assert folded.shape == ((2 * T, 4, sum(sizes), 8) if layout_name == "spatial" else (2 * sum(sizes), 4, T, 8))
    assert torch.equal(unfold_groups(folded, layout_name, sizes, 2), q)
    with pytest.raises(ValueError, match="grids"):
        TokenLayout(pos, rope=rope, grids=(T + 1, sizes))
    with pytest.raises(ValueError, match="grids"):
        TokenLayout(pos, seq_ids=torch.zeros(2, N, dtype=torch.long), grids=(T, sizes))


def test_models_declare_dense_groups_that_match_their_ids(monkeypatch):
    """The DiT (factorised, one grid or one token set) and Hi-VAE's decoder declare ``grids``; with
    the declaration ignored (the id path) both give the same outputs."""
    import autoencoders
    import dit
    from ldm.latent import Cond

    torch.manual_seed(0)
    runs = []
    for parts in ({"z": (4, 3, 4, 6)}, {"s": (5, 3, 4)}):
        model = dit.build("dit-debug", parts, num_classes=4, attn_layout="factorized")
        _randomize(model)
        x = {k: torch.randn(2, *v) for k, v in parts.items()}
        runs.append(lambda m=model, x=x: m(x, torch.rand(2, generator=torch.Generator().manual_seed(1)),
                                           Cond(class_id=torch.tensor([1, 2])))[next(iter(x))])
    ae = autoencoders.build("hivae-debug").eval()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        latent = ae.encode(video)
    runs.append(lambda: ae.decode(latent, None, steps=2, seed=0))
    folds = []
    real_fold = TokenLayout.fold
    monkeypatch.setattr(TokenLayout, "fold", lambda self, layout: folds.append(layout) or real_fold(self, layout))
    with torch.no_grad():
        dense = [run() for run in runs]
    assert {"spatial", "temporal"} <= set(folds)
    monkeypatch.setattr(TokenLayout, "fold", lambda self, layout: None)
    with torch.no_grad():
        for run, out in zip(runs, dense):
            torch.testing.assert_close(out, run(), atol=1e-5, rtol=1e-5)


def test_block_padding_and_cross_attention_mask():
    blk = _block(context_dim=24)
    _randomize(blk, seed=1)
    pos = _grid_positions(2, 2, 2)
    seq = torch.tensor([[0] * 6 + [-1] * 2, [0] * 8])
    layout = TokenLayout(pos, seq_ids=seq, rope=Rope3D(8)(pos))
    x, c, ctx = torch.randn(2, 8, 32), torch.randn(2, 32), torch.randn(2, 5, 24)
    ctx_ids = torch.tensor([[0, 0, 0, -1, -1], [0, 0, 0, 0, 0]])
    y = blk(x, c, layout, ctx, ctx_ids)
    x2, ctx2 = x.clone(), ctx.clone()
    x2[0, 6:] = 50.0  # padding tokens
    ctx2[0, 3:] = -50.0  # masked context tokens
    y2 = blk(x2, c, layout, ctx2, ctx_ids)
    torch.testing.assert_close(y2[0, :6], y[0, :6])
    torch.testing.assert_close(y2[1], y[1])
    # the same block run on the unpadded first sample alone agrees
    alone = blk(x[:1, :6], c[:1], TokenLayout(pos[:6], rope=Rope3D(8)(pos[:6])), ctx[:1, :3])
    torch.testing.assert_close(alone[0], y[0, :6], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context"):
        blk(x, c, layout)


def test_set_attention_backend():
    blk = _block(context_dim=8)
    set_attention_backend(blk, "math")
    assert blk.attn.backend == "math" and blk.cross.backend == "math"
    with pytest.raises(Exception, match="unknown attention backend"):
        set_attention_backend(blk, "nope")
