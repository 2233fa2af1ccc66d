import pytest
import torch

from ldm.layers import (FinalLayer, QKNorm, RMSNorm, Rope3D, TimestepEmbedder, TokenLayout, TransformerBlock,
                        apply_rope, group_ids, rope_axes, set_attention_backend, timestep_embedding)


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
