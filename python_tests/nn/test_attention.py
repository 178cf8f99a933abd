"""vlcore.nn attention: the backend's torch paths against a per-segment float64 loop, both impls equal,
KV-cache decoding == full causal attention, shared-context cross-attention == copied context."""

import math

import pytest
import torch

from vlcore.nn import backend
from vlcore.nn.attention import CrossAttention, KVCache, SelfAttention


def _loop_attention(q, k, v, causal, bias=None):
    """One segment, float64: q [Lq, Hq, D], k/v [Lk, Hkv, D], bias [Lk, Hq] or None."""
    len_q, heads_q, dim = q.shape
    len_k, heads_k = k.shape[0], k.shape[1]
    out = torch.zeros(len_q, heads_q, dim, dtype=torch.float64)
    for h in range(heads_q):
        kv_head = h // (heads_q // heads_k)
        for i in range(len_q):
            scores = [q[i, h].double() @ k[j, kv_head].double() / math.sqrt(dim)
                      + (bias[j, h].double() if bias is not None else 0.0)
                      for j in range(len_k) if not causal or j <= i + len_k - len_q]
            if scores and not all(math.isinf(s) for s in scores):
                p = torch.softmax(torch.stack(scores), 0)
                out[i, h] = p @ v[: len(scores), kv_head].double()
    return out


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
@pytest.mark.parametrize("heads_q, heads_k", [(4, 4), (4, 2), (3, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_matches_loop(impl, heads_q, heads_k, causal):
    lens_q, lens_k = [3, 1, 0, 5], [4, 1, 2, 5]  # a zero-length query segment; causal with Lq < Lk
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), heads_q, 8)
    k, v = torch.randn(sum(lens_k), heads_k, 8), torch.randn(sum(lens_k), heads_k, 8)
    bias = torch.randn(sum(lens_k), heads_q)
    out = backend.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5,
                            causal=causal, key_bias=bias, impl=impl)
    for s in range(len(lens_q)):
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        want = _loop_attention(q[qs], k[ks], v[ks], causal, bias[ks])
        torch.testing.assert_close(out[qs].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
def test_kv_segment_reads_the_named_key_segment(impl):
    cu_k = torch.tensor([0, 2, 8, 11], dtype=torch.int32)  # K/V segments of lengths 2, 6, 3
    kv_segment = torch.tensor([1, 1, 0, 2, 1], dtype=torch.int32)  # 5 query segments share 3 K/V segments
    cu_q = torch.arange(6, dtype=torch.int32) * 3
    q, k, v = torch.randn(15, 2, 4), torch.randn(11, 2, 4), torch.randn(11, 2, 4)
    key_bias = torch.randn(11)
    out = backend.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=6,
                            key_bias=key_bias, kv_segment=kv_segment, impl=impl)
    for s, target in enumerate(kv_segment.tolist()):
        ks = slice(cu_k[target], cu_k[target + 1])
        want = _loop_attention(q[3 * s : 3 * s + 3], k[ks], v[ks], False, key_bias[ks, None].expand(-1, 2))
        torch.testing.assert_close(out[3 * s : 3 * s + 3].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_attention_with_key_lengths_and_bias_matches_loop(impl, causal):
    batch, len_q, len_k = 3, 5, 7
    q, k, v = torch.randn(batch, len_q, 4, 8), torch.randn(batch, len_k, 2, 8), torch.randn(batch, len_k, 2, 8)
    key_lengths = torch.tensor([7, 1, 4], dtype=torch.int32)
    bias = torch.randn(batch, len_k)
    out = backend.attention(q, k, v, causal=causal, key_bias=bias, key_lengths=key_lengths, impl=impl)
    for b in range(batch):
        masked_bias = bias[b].clone()
        masked_bias[key_lengths[b]:] = float("-inf")
        want = _loop_attention(q[b], k[b], v[b], causal, masked_bias[:, None].expand(-1, 4))
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_causal_attention():
    attn = SelfAttention(32, 4, num_kv_heads=2, causal=True)
    x = torch.randn(2, 9, 32)
    full = attn(x)
    cache = KVCache(2, 9, attn.num_kv_heads, attn.head_dim, dtype=x.dtype, device=x.device)
    steps = [attn(x[:, :4], kv_cache=cache)] + [attn(x[:, t : t + 1], kv_cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed the cache's max_len 9"):
        attn(x[:, :1], kv_cache=cache)


def test_shared_context_cross_attention_equals_copied_context():
    torch.manual_seed(0)
    copied = CrossAttention(24, 16, 4, gated=True, impl="torch")
    shared = CrossAttention(24, 16, 4, gated=True, impl="vlcore")
    with torch.no_grad():
        copied.alpha.fill_(0.7)
    shared.load_state_dict(copied.state_dict())
    x, context = torch.randn(5, 6, 24), torch.randn(3, 4, 16)
    lengths = torch.tensor([4, 2, 1], dtype=torch.int32)
    index = torch.tensor([0, 2, 2, 1, 0])
    want = copied(x, context, context_lengths=lengths, context_index=index)
    got = shared(x, context, context_lengths=lengths, context_index=index)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want[1], copied(x[1:2], context[2:3], context_lengths=lengths[2:3])[0])


def test_gate_at_zero_silences_cross_attention():
    cross = CrossAttention(8, 8, 2, gated=True)
    assert cross.alpha.item() == 0.0
    assert cross(torch.randn(2, 3, 8), torch.randn(2, 5, 8)).abs().max() == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=30, num_heads=4), "num_heads \\(4\\) must be positive and divide the width \\(30\\)"),
    (dict(dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads \\(3\\) must be positive and divide num_heads \\(4\\)"),
    (dict(dim=32, num_heads=4, impl="cuda"), "impl must be 'vlcore' or 'torch'"),
])
def test_bad_head_layouts_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelfAttention(**kwargs)


@pytest.mark.parametrize("impl", ["torch", "vlcore"])
def test_packed_key_lengths_match_loop(impl):
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    q, k, v = torch.randn(9, 2, 4), torch.randn(9, 2, 4), torch.randn(9, 2, 4)
    key_lengths = torch.tensor([2, 0, 9], dtype=torch.int32)  # 0: no key (out 0); 9: clamped to the segment
    out = backend.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4,
                            key_lengths=key_lengths, impl=impl)
    for s in range(3):
        rows = slice(cu[s], cu[s + 1])
        n = min(int(key_lengths[s]), int(cu[s + 1] - cu[s]))
        keys = slice(int(cu[s]), int(cu[s]) + n)
        torch.testing.assert_close(out[rows].double(), _loop_attention(q[rows], k[keys], v[keys], False),
                                   atol=1e-5, rtol=1e-5)
