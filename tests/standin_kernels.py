"""Stand-ins for flash-attn and xformers with the libraries' documented interfaces (layouts,
packed varlen tensors, int32 cu_seqlens, block-diagonal biases), computed with SDPA on the CPU, so
the way `ldm.attention` lays out, packs and scatters their inputs runs in CI (`install`)."""
from __future__ import annotations

import torch


def _sdpa_tokens(q, k, v, scale, causal):
    """(N, H, d) tensors of one sequence -> (N, H, d)."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           is_causal=causal, scale=scale)
    return out.transpose(0, 1)


class StandInFlash:
    """flash_attn_func: (B, N, H, d); flash_attn_varlen_func: packed (T, H, d) with int32 cu_seqlens
    and the longest sequence on each side."""
    calls: list = []

    @classmethod
    def func(cls, q, k, v, softmax_scale=None, causal=False):
        assert q.stride(-1) == 1 and q.shape[2] == k.shape[2] and q.shape[3] == k.shape[3]
        cls.calls.append("func")
        return torch.stack([_sdpa_tokens(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])

    @classmethod
    def varlen_func(cls, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        assert q.ndim == 3 and cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
        assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0]
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        cls.calls.append("varlen")
        return torch.cat([_sdpa_tokens(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]],
                                       softmax_scale, causal) for i in range(len(cu_q) - 1)])


class StandInXformers:
    """xformers.ops: memory_efficient_attention over (B, N, H, d) with attn_bias None, a dense
    additive tensor, LowerTriangularMask, or a block-diagonal mask over B=1 packed sequences."""

    class fmha:
        class attn_bias:
            class LowerTriangularMask:
                pass

            class BlockDiagonalMask:
                causal = False

                def __init__(self, q_seqlen, kv_seqlen):
                    self.q_seqlen, self.kv_seqlen = q_seqlen, kv_seqlen

                @classmethod
                def from_seqlens(cls, q_seqlen, kv_seqlen=None):
                    assert all(isinstance(n, int) for n in q_seqlen + (kv_seqlen or []))
                    return cls(q_seqlen, kv_seqlen or q_seqlen)

            class BlockDiagonalCausalMask(BlockDiagonalMask):
                causal = True

    @classmethod
    def memory_efficient_attention(cls, q, k, v, attn_bias=None, scale=None):
        bias_mod = cls.fmha.attn_bias
        if isinstance(attn_bias, bias_mod.BlockDiagonalMask):
            assert q.shape[0] == 1 and sum(attn_bias.q_seqlen) == q.shape[1]
            cq, ck = (torch.tensor([0, *lens]).cumsum(0) for lens in (attn_bias.q_seqlen, attn_bias.kv_seqlen))
            return torch.cat([_sdpa_tokens(q[0, cq[i]:cq[i + 1]], k[0, ck[i]:ck[i + 1]], v[0, ck[i]:ck[i + 1]], scale,
                                           attn_bias.causal) for i in range(len(cq) - 1)])[None]
        if isinstance(attn_bias, torch.Tensor):
            assert attn_bias.stride(-2) % 8 == 0  # xformers' alignment rule for dense biases
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, scale=scale, is_causal=isinstance(attn_bias, bias_mod.LowerTriangularMask),
            attn_mask=attn_bias if isinstance(attn_bias, torch.Tensor) else None)
        return out.transpose(1, 2)


def install(monkeypatch) -> list[str]:
    """Route ``backend="flash"`` / ``"xformers"`` to the stand-ins, on CPU tensors too; returns the
    list the flash stand-in appends its entry points' names to."""
    import ldm.attention as attn

    monkeypatch.setattr(attn, "_flash_module", lambda: attn._Flash(StandInFlash.func, StandInFlash.varlen_func, 2))
    monkeypatch.setattr(attn, "_xformers_ops", lambda: StandInXformers)
    real = attn.unusable_reason

    def usable_on_cpu(backend, q, mask=None):  # CPU tensors allowed; flash's rule against masks stays
        if backend == "flash" and mask is not None:
            return "flash_attn takes no arbitrary masks"
        return None if backend in ("flash", "xformers") else real(backend, q, mask)

    monkeypatch.setattr(attn, "unusable_reason", usable_on_cpu)
    StandInFlash.calls = []
    return StandInFlash.calls
