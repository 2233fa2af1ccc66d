import pytest
import standin_kernels
import torch

from ldm.attention import (AttentionBackendError, attention, available_backends, check_backend,
                           cu_seqlens_from_lengths, seq_ids_from_cu_seqlens, unusable_reason)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, N, M, D = 2, 3, 11, 7, 16
IDS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1],   # packed: three sequences + padding
                    [0, 1, 0, 1, 0, 1, 3, 3, 3, 3, 3]])    # interleaved groups (factorised layouts)
KV_IDS = torch.tensor([[0, 0, -1, 1, 1, 1, -1],            # sequence 2 has no keys -> zero output
                       [0, 0, 0, -1, -1, -1, -1]])


def _qkv(n=N, m=N, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda L: torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(n), mk(m), mk(m)


def _cases():
    g = torch.Generator().manual_seed(5)
    dense = torch.rand(B, 1, N, N, generator=g) > 0.5
    dense[0, 0, 4] = False  # a fully masked row
    return {
        "plain": dict(),
        "causal": dict(causal=True),
        "dense_mask": dict(mask=dense),
        "seq_ids": dict(seq_ids=IDS),
        "seq_ids_causal": dict(seq_ids=IDS, causal=True),
        "mask_ids_causal": dict(mask=dense, seq_ids=IDS, causal=True),
    }


CPU_BACKENDS = [b for b in ("sdpa", "flex", "math") if b in available_backends("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(_cases()))
def test_self_attention_backends_equal_sdpa(backend, case):
    kw = _cases()[case]
    q, k, v = _qkv()
    ref = attention(q, k, v, backend="sdpa", **kw)
    torch.testing.assert_close(attention(q, k, v, backend=backend, **kw), ref, atol=1e-5, rtol=1e-5)
    # and SDPA itself agrees with the float32 reference
    torch.testing.assert_close(ref, attention(q, k, v, backend="math", **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_attention_with_kv_ids(backend):
    q, k, v = _qkv(N, M, seed=1)
    out = attention(q, k, v, backend=backend, seq_ids=IDS, kv_seq_ids=KV_IDS)
    torch.testing.assert_close(out, attention(q, k, v, backend="math", seq_ids=IDS, kv_seq_ids=KV_IDS),
                               atol=1e-5, rtol=1e-5)
    assert torch.all(out[0, :, 5:9] == 0) and torch.all(out[0, :, 9:] == 0)  # no keys / padding
    # a key-padding mask alone (every query sees the unmasked keys of its row)
    key_only = attention(q, k, v, backend=backend, kv_seq_ids=KV_IDS)
    dense = (KV_IDS >= 0)[:, None, None, :]
    torch.testing.assert_close(key_only, attention(q, k, v, backend="sdpa", mask=dense), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_equals_separate_sequences(backend):
    lengths = torch.tensor([4, 2, 5])
    cu = cu_seqlens_from_lengths(lengths)
    q, k, v = (x[:1] for x in _qkv(seed=2))
    packed = attention(q, k, v, backend=backend, cu_seqlens=cu, causal=True)
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        alone = attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], backend="sdpa", causal=True)
        torch.testing.assert_close(packed[:, :, a:b], alone, atol=1e-5, rtol=1e-5)
    assert torch.all(packed[:, :, int(cu[-1]):] == 0)  # tokens past the last sequence
    torch.testing.assert_close(packed, attention(q, k, v, backend=backend, seq_ids=seq_ids_from_cu_seqlens(cu, N),
                                                 causal=True))


def test_grouped_sdpa_gradients_match_reference():
    q, k, v = (x.requires_grad_() for x in _qkv(seed=3))
    attention(q, k, v, backend="sdpa", seq_ids=IDS).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    attention(q, k, v, backend="math", seq_ids=IDS).square().sum().backward()
    for g, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-5)


def test_missing_or_unusable_backend_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        attention(q, k, v, backend="fast")
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        check_backend("fast")
    for name in ("flash", "xformers"):
        if unusable_reason(name, q) is not None:  # not installed, or CPU tensors here
            with pytest.raises(AttentionBackendError, match=name):
                attention(q, k, v, backend=name)
    torch.testing.assert_close(attention(q, k, v, backend="auto"), attention(q, k, v))


def test_bad_inputs():
    q, k, v = _qkv(N, M)
    with pytest.raises(ValueError, match="causal"):
        attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="kv_seq_ids"):
        attention(q, k, v, seq_ids=IDS)
    with pytest.raises(ValueError, match="bool"):
        attention(q, k, v, mask=torch.zeros(B, 1, N, M))
    with pytest.raises(ValueError, match=r"\(B, heads, N, d\)"):
        attention(q[0], k[0], v[0])


def _gpu_backend_or_skip(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    probe = torch.empty(1, 1, 1, D, device="cuda", dtype=torch.float16)
    reason = unusable_reason(name, probe)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash", "xformers", "flex"])
@pytest.mark.parametrize("case", ["plain", "causal", "seq_ids", "seq_ids_causal", "dense_mask"])
def test_gpu_backends_equal_sdpa(name, case):
    _gpu_backend_or_skip(name)
    kw = {k: (x.cuda() if isinstance(x, torch.Tensor) else x) for k, x in _cases()[case].items()}
    if name == "flash" and "mask" in kw:
        with pytest.raises(AttentionBackendError, match="masks"):
            attention(*_qkv(dtype=torch.float16, device="cuda"), backend=name, **kw)
        return
    q, k, v = _qkv(dtype=torch.float16, device="cuda")
    ref = attention(q, k, v, backend="sdpa", **kw)
    torch.testing.assert_close(attention(q, k, v, backend=name, **kw), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_gpu_varlen_and_cross(name):
    _gpu_backend_or_skip(name)
    q, k, v = (x[:1] for x in _qkv(dtype=torch.float16, device="cuda"))
    cu = cu_seqlens_from_lengths(torch.tensor([4, 2, 5], device="cuda"))
    torch.testing.assert_close(attention(q, k, v, backend=name, cu_seqlens=cu),
                               attention(q, k, v, backend="sdpa", cu_seqlens=cu), atol=2e-3, rtol=2e-3)
    q, k, v = _qkv(N, M, dtype=torch.float16, device="cuda")
    ids, kv = IDS.cuda(), KV_IDS.cuda()
    torch.testing.assert_close(attention(q, k, v, backend=name, seq_ids=ids, kv_seq_ids=kv),
                               attention(q, k, v, backend="sdpa", seq_ids=ids, kv_seq_ids=kv), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_rank_masks_broadcast(backend):
    q, k, v = _qkv(seed=4)
    tri = torch.ones(N, N, dtype=torch.bool).tril()  # (Nq, Nk)
    torch.testing.assert_close(attention(q, k, v, backend=backend, mask=tri),
                               attention(q, k, v, backend="sdpa", causal=True), atol=1e-5, rtol=1e-5)


def test_grouping_is_reused_for_the_same_ids_and_redone_when_they_change():
    """The (row, id) grouping is cached by the ids tensors (every block of a forward passes the
    same ones); ids changed in place or new ids are grouped anew."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 1, 1]])
    first = attention(q, k, v, seq_ids=ids)
    torch.testing.assert_close(attention(q, k, v, seq_ids=ids), first)
    fresh = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    expected = attention(q, k, v, seq_ids=fresh.clone())
    ids.copy_(fresh)  # same tensor, new values
    torch.testing.assert_close(attention(q, k, v, seq_ids=ids), expected)
    assert not torch.allclose(expected, first)


def test_auto_policy_keeps_plain_calls_on_sdpa_unless_flash_attention_3():
    """``"auto"`` on a GPU: calls with ids take an installed varlen kernel (flash, then xformers);
    plain calls stay on SDPA (cuDNN on Hopper, traced by torch.compile) unless FlashAttention-3 is
    installed; masks, fp32 and CPU tensors always SDPA."""
    from ldm.attention import auto_choice

    def choice(installed, grouped, cuda=True, half=True, masked=False, head_dim=72):
        return auto_choice(cuda=cuda, half=half, head_dim=head_dim, masked=masked, grouped=grouped,
                           installed=dict.fromkeys(installed, True))

    fa2, fa3, xf = {"flash"}, {"flash", "flash3"}, {"xformers"}
    assert [choice(s, grouped=False) for s in (set(), fa2, fa3, xf, fa2 | xf)] == \
        ["sdpa", "sdpa", "flash", "sdpa", "sdpa"]
    assert [choice(s, grouped=True) for s in (set(), fa2, fa3, xf, fa2 | xf)] == \
        ["sdpa", "flash", "flash", "xformers", "flash"]
    assert choice(fa3, grouped=True, masked=True) == choice(fa3, grouped=False, half=False) == "sdpa"
    assert choice(fa3 | xf, grouped=True, cuda=False) == "sdpa" and choice(fa3, False, head_dim=512) == "sdpa"
    assert choice(fa2 | xf, grouped=True, half=False) == "xformers"


# flash-attn and xformers call paths on the CPU, through stand-ins (tests/standin_kernels.py)
@pytest.fixture
def stand_in_kernels(monkeypatch):
    return standin_kernels.install(monkeypatch)


@pytest.mark.parametrize("backend", ["flash", "xformers"])
@pytest.mark.parametrize("case", list(_cases()))
def test_flash_and_xformers_call_paths_equal_sdpa(stand_in_kernels, backend, case):
    kw = _cases()[case]
    q, k, v = _qkv(seed=7)
    if backend == "flash" and "mask" in kw:
        with pytest.raises(AttentionBackendError, match="masks"):
            attention(q, k, v, backend=backend, **kw)
        return
    torch.testing.assert_close(attention(q, k, v, backend=backend, **kw), attention(q, k, v, backend="math", **kw),
                               atol=1e-5, rtol=1e-5)
    if backend == "flash":
        assert stand_in_kernels == ["varlen" if "seq_ids" in kw else "func"]


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_flash_and_xformers_varlen_and_cross_paths_equal_sdpa(stand_in_kernels, backend):
    q, k, v = (x[:1] for x in _qkv(seed=8))
    cu = cu_seqlens_from_lengths(torch.tensor([4, 2, 3]))  # 9 of 11 tokens: the last two get zeros
    out = attention(q, k, v, backend=backend, cu_seqlens=cu)
    torch.testing.assert_close(out, attention(q, k, v, backend="math", cu_seqlens=cu), atol=1e-5, rtol=1e-5)
    assert torch.all(out[..., 9:, :] == 0)
    q, k, v = _qkv(N, M, seed=9)
    for kw in (dict(seq_ids=IDS, kv_seq_ids=KV_IDS), dict(kv_seq_ids=KV_IDS)):
        torch.testing.assert_close(attention(q, k, v, backend=backend, **kw),
                                   attention(q, k, v, backend="math", **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_flash_and_xformers_call_paths_carry_gradients(stand_in_kernels, backend):
    """Training through the packed paths: gradients reach q, k, v as through SDPA (zeros for padding)."""
    grads = {}
    for name in (backend, "math"):
        q, k, v = (x.requires_grad_() for x in _qkv(seed=10))
        attention(q, k, v, backend=name, seq_ids=IDS, causal=True).square().sum().backward()
        grads[name] = (q.grad, k.grad, v.grad)
    for g, ref in zip(grads[backend], grads["math"]):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(grads[backend][0][0, :, 9:] == 0)  # padding tokens (id -1)
