"""attention family: the fused varlen op against a float64 plain-PyTorch reference.

Low-precision results follow flash-attn's rule: the kernel's error against the float64 reference is at most
twice the error of the same reference computed in the same dtype, plus a small atol.
"""

import importlib
import math

import pytest
import torch
from torch.library import opcheck

import vlcore
from vlcore.nn import backend
from vlcore.nn.attention import CrossAttention, SelfAttention
from vlcore.ops.attention import attention_ref

from ..conftest import DEVICES

# The module (vlcore.ops.attention is also the name of the function).
attention_module = importlib.import_module("vlcore.ops.attention")

# (query lengths, key lengths): empty segments, single tokens, lengths that are no tile multiple, the
# text -> image fusion shape, more than one CPU chunk of queries (128) and of keys (512).
CASES = [
    ([1], [1]),
    ([5, 0, 3, 1, 7], [4, 3, 0, 1, 9]),
    ([40, 17], [197, 65]),
    ([130, 2], [3, 130]),
    ([3, 70], [600, 1]),
]
HEADS = [(2, 2), (4, 1)]
# Every CUDA backward path, chosen explicitly: the short-key kernel (key segments that fit one CTA), the
# tiled one with atomic dQ, the tiled deterministic one. Explicit because the poisoned fixture turns
# deterministic algorithms on (torch fills uninitialised memory only then), which would otherwise always
# select the deterministic path. On CPU the three are the same reference.
BACKWARDS = ["short_keys", "atomic_dq", "deterministic"]


@pytest.fixture(params=BACKWARDS)
def deterministic(request, monkeypatch):
    """The deterministic flag to pass for the backward path under test (the short-key kernel is switched by
    the VLCORE_ATTENTION_SHORT_BACKWARD environment variable, read at each call)."""
    monkeypatch.setenv("VLCORE_ATTENTION_SHORT_BACKWARD", "1" if request.param == "short_keys" else "0")
    return request.param == "deterministic"


@pytest.fixture
def backward_path(request):
    return request.node.callspec.params["deterministic"]
HEAD_DIMS = [32, 64, 72, 80, 96, 128]  # every head dim the CUDA kernels are built for  # (Hq, Hkv): MHA and MQA
# (heads, key_bias kind): MHA without bias, MQA with a per-key bias, GQA with a per-head bias.
VARIANTS = [((2, 2), None), ((4, 1), "per_key"), ((4, 2), "per_head")]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtypes_for(device):
    # CUDA kernels are 16-bit only; the CPU reference also takes float32 and float64.
    return list(LOW_PRECISION) if device == "cuda" else [torch.float64, torch.float32, *LOW_PRECISION]


# float16 and bfloat16 share the CPU code path (cast to float32), so the CPU runs bfloat16 only.
MATRIX_DTYPES = {"cpu": [torch.float64, torch.float32, torch.bfloat16], "cuda": list(LOW_PRECISION)}


def cu_of(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(device)


def randn(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)


def make_inputs(lq, lk, heads, head_dim, dtype, device, bias=None):
    hq, hkv = heads
    q = randn((sum(lq), hq, head_dim), dtype, device)
    k = randn((sum(lk), hkv, head_dim), dtype, device)
    v = randn((sum(lk), hkv, head_dim), dtype, device)
    key_bias = None
    if bias == "per_key":
        key_bias = randn((sum(lk),), dtype, device)
    elif bias == "per_head":
        key_bias = randn((sum(lk), hq), dtype, device)
    return q, k, v, key_bias


def run_with_grads(fn, tensors, grad_out, grad_lse):
    """out, lse and the gradients of <out, grad_out> + <finite lse, grad_lse> with respect to tensors."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    loss = (out.double() * grad_out).sum() + torch.where(finite, lse.double(), 0.0).mul(grad_lse).sum()
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted)]
    return [out.detach(), lse.detach(), *grads]


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    return torch.where(both_inf, 0.0, (a - b).abs()).max().item()


def assert_flash_rule(got, low, ref, dtype, what):
    """got/low/ref: lists of tensors (kernel, same-dtype reference, float64 reference)."""
    # The atol is relative to the tensor's largest value: gradients reach |20| on the long segments.
    base = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    for name, g, lo, r in zip(what, got, low, ref):
        finite = r[torch.isfinite(r)]
        atol = base * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
        assert g.shape == r.shape, name
        assert torch.equal(torch.isneginf(g), torch.isneginf(r)), f"{name}: -inf pattern differs"
        assert torch.isfinite(torch.where(torch.isneginf(g), 0, g)).all(), f"{name}: non-finite values"
        err, allowed = max_err(g, r), 2 * max_err(lo, r) + atol
        assert err <= allowed, f"{name}: error {err:.3g} > 2 x same-dtype torch error + atol = {allowed:.3g}"


def check_against_reference(device, dtype, op_fn, ref_fn, tensors, out_shape, lse_shape):
    grad_out = torch.randn(out_shape, dtype=torch.float64, device=device)
    grad_lse = torch.randn(lse_shape, dtype=torch.float64, device=device)
    got = run_with_grads(op_fn, tensors, grad_out, grad_lse)
    ref = run_with_grads(ref_fn, [None if t is None else t.cpu().double() for t in tensors], grad_out.cpu(),
                         grad_lse.cpu())
    low = run_with_grads(ref_fn, [None if t is None else t.cpu() for t in tensors], grad_out.cpu(), grad_lse.cpu())
    names = ["out", "lse", "dq", "dk", "dv", "dkey_bias"]
    assert got[0].dtype == dtype and got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[0].is_contiguous() and got[0].device.type == device
    assert_flash_rule([g.cpu() for g in got], low, ref, dtype, names)


@pytest.mark.parametrize("device,dtype", [(d, t) for d in DEVICES for t in MATRIX_DTYPES[d]])
@pytest.mark.parametrize("lengths", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,bias", VARIANTS)
def test_attention_matches_reference(device, dtype, lengths, causal, heads, bias, deterministic, poisoned):
    lq, lk = lengths
    head_dim = 64 if device == "cuda" else 8
    q, k, v, key_bias = make_inputs(lq, lk, heads, head_dim, dtype, device, bias)
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)
    cu_q_cpu, cu_k_cpu = cu_q.cpu(), cu_k.cpu()

    def op_fn(q, k, v, key_bias):
        return vlcore.ops.attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, key_bias=key_bias,
                                    return_lse=True, deterministic=deterministic)

    def ref_fn(q, k, v, key_bias):
        return attention_ref(q, k, v, cu_q_cpu, cu_k_cpu, causal=causal, key_bias=key_bias, return_lse=True)

    check_against_reference(device, dtype, op_fn, ref_fn, [q, k, v, key_bias], q.shape, (heads[0], sum(lq)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_head_dims(device, head_dim, deterministic, poisoned):
    # Every head dim the CUDA kernels are built for (each has its own tile shape), on the fusion shape.
    dtype = dtypes_for(device)[-1]
    lq, lk = [40, 3], [197, 70]
    q, k, v, key_bias = make_inputs(lq, lk, (4, 2), head_dim, dtype, device, "per_head")
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)

    def op_fn(q, k, v, key_bias):
        return vlcore.ops.attention(q, k, v, cu_q, cu_k, 40, 197, causal=True, key_bias=key_bias, return_lse=True,
                                    deterministic=deterministic)

    def ref_fn(q, k, v, key_bias):
        return attention_ref(q, k, v, cu_q.cpu(), cu_k.cpu(), causal=True, key_bias=key_bias, return_lse=True)

    check_against_reference(device, dtype, op_fn, ref_fn, [q, k, v, key_bias], q.shape, (4, sum(lq)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [None, "per_key", "per_head"])
def test_attention_kv_segment_matches_reference_and_copies(device, causal, bias, deterministic, poisoned):
    # ITM with hard negatives: 5 text segments read 3 image segments, one image read three times, one not at all.
    dtype = dtypes_for(device)[0]
    head_dim = 32 if device == "cuda" else 8
    lq, lk, kv_segment = [7, 1, 0, 12, 5], [9, 4, 13], [2, 0, 2, 2, 0]
    q, k, v, key_bias = make_inputs(lq, lk, (4, 2), head_dim, dtype, device, bias)
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)
    seg = torch.tensor(kv_segment, dtype=torch.int32, device=device)

    def op_fn(q, k, v, key_bias):
        return vlcore.ops.attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, key_bias=key_bias,
                                    kv_segment=seg, return_lse=True, deterministic=deterministic)

    def ref_fn(q, k, v, key_bias):
        return attention_ref(q, k, v, cu_q.cpu(), cu_k.cpu(), causal=causal, key_bias=key_bias,
                             kv_segment=seg.cpu(), return_lse=True)

    check_against_reference(device, dtype, op_fn, ref_fn, [q, k, v, key_bias], q.shape, (4, sum(lq)))

    # The same attention with K/V (and bias) materialised once per query segment: gradients must sum.
    rows = torch.cat([torch.arange(int(cu_k[s]), int(cu_k[s + 1])) for s in kv_segment]).to(device)
    copied_k = [len_k for s in kv_segment for len_k in [lk[s]]]

    def copies_fn(q, k, v, key_bias):
        return vlcore.ops.attention(q, k[rows], v[rows], cu_q, cu_of(copied_k, device), max(lq), max(lk),
                                    causal=causal, key_bias=None if key_bias is None else key_bias[rows],
                                    return_lse=True, deterministic=deterministic)

    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    grad_lse = torch.randn((4, sum(lq)), dtype=torch.float64, device=device)
    shared = run_with_grads(op_fn, [q, k, v, key_bias], grad_out, grad_lse)
    copies = run_with_grads(copies_fn, [q, k, v, key_bias], grad_out, grad_lse)
    for a, b in zip(shared, copies):
        torch.testing.assert_close(a, b, atol=1e-2 if dtype in LOW_PRECISION else 1e-12, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("heads", HEADS)
def test_attention_dense_form_with_key_lengths(device, causal, with_bias, heads, deterministic, poisoned):
    dtype = dtypes_for(device)[0]
    head_dim = 32 if device == "cuda" else 8
    batch, len_q, len_k = 4, 9, 13
    hq, hkv = heads
    q = randn((batch, len_q, hq, head_dim), dtype, device)
    k = randn((batch, len_k, hkv, head_dim), dtype, device)
    v = randn((batch, len_k, hkv, head_dim), dtype, device)
    key_lengths = torch.tensor([13, 0, 5, 1], dtype=torch.int32, device=device)
    key_bias = randn((batch, len_k, hq), dtype, device) if with_bias else None

    def op_fn(q, k, v, key_bias):
        return vlcore.ops.attention(q, k, v, causal=causal, key_lengths=key_lengths, key_bias=key_bias,
                                    return_lse=True, deterministic=deterministic)

    def ref_fn(q, k, v, key_bias):
        return attention_ref(q, k, v, causal=causal, key_lengths=key_lengths.cpu(), key_bias=key_bias,
                             return_lse=True)

    check_against_reference(device, dtype, op_fn, ref_fn, [q, k, v, key_bias], q.shape, (batch, hq, len_q))
    # The backend's plain-PyTorch dense path is a second, independent statement of the same semantics.
    if not with_bias and dtype == torch.float64:
        want = backend.attention(q, k, v, causal=causal, key_lengths=key_lengths, impl="torch")
        torch.testing.assert_close(op_fn(q, k, v, None)[0], want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_rows_without_keys_give_zero_and_minus_inf(device, poisoned):
    dtype = dtypes_for(device)[0]
    head_dim = 32 if device == "cuda" else 8
    lq, lk = [3, 2, 4], [0, 5, 2]
    q, k, v, _ = make_inputs(lq, lk, (2, 2), head_dim, dtype, device)
    key_bias = torch.zeros(sum(lk), dtype=dtype, device=device)
    key_bias[0:5] = float("-inf")  # every key of segment 1 masked
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = vlcore.ops.attention(q, k, v, cu_of(lq, device), cu_of(lk, device), 4, 5, causal=True,
                                    key_bias=key_bias, return_lse=True)
    # Segment 0 has no keys, segment 1 only masked ones; in segment 2 (4 queries, 2 keys, bottom-right causal)
    # the first two rows see nothing.
    empty_rows = torch.tensor([0, 1, 2, 3, 4, 5, 6], device=device)
    assert torch.equal(out[empty_rows], torch.zeros_like(out[empty_rows]))
    assert torch.isneginf(lse[:, empty_rows]).all() and torch.isfinite(lse[:, 7:]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dq[empty_rows], torch.zeros_like(dq[empty_rows]))
    assert torch.equal(dk[:5], torch.zeros_like(dk[:5])) and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_empty_batch_and_zero_tokens(device, poisoned):
    dtype = dtypes_for(device)[0]
    head_dim = 32 if device == "cuda" else 8
    q, k, v, _ = make_inputs([0, 0], [0, 0], (2, 1), head_dim, dtype, device)
    cu = cu_of([0, 0], device)
    out, lse = vlcore.ops.attention(q.requires_grad_(), k.requires_grad_(), v, cu, cu, 0, 0, return_lse=True)
    assert out.shape == (0, 2, head_dim) and lse.shape == (2, 0)
    # queries but no keys anywhere
    q, k, v, _ = make_inputs([3], [0], (2, 1), head_dim, dtype, device)
    out = vlcore.ops.attention(q.requires_grad_(), k, v, cu_of([3], device), cu_of([0], device), 3, 0)
    assert torch.equal(out, torch.zeros_like(out))
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq, torch.zeros_like(dq))


@pytest.mark.parametrize("device", DEVICES)
def test_attention_deterministic_backward(device, monkeypatch):
    dtype = dtypes_for(device)[0]
    head_dim = 64 if device == "cuda" else 8
    lq, lk = [40, 7, 100], [197, 1, 64]
    q, k, v, key_bias = make_inputs(lq, lk, (4, 2), head_dim, dtype, device, "per_head")
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)

    def grads(deterministic):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, key_bias)]
        out = vlcore.ops.attention(*leaves[:3], cu_q, cu_k, 100, 197, key_bias=leaves[3],
                                   deterministic=deterministic)
        return torch.autograd.grad(out.float().square().sum(), leaves)

    # Key segments of at most 197 fit the short-key kernel, which is deterministic whatever the flag.
    short = grads(False)
    assert all(torch.equal(a, b) for a, b in zip(short, grads(False)))
    monkeypatch.setenv("VLCORE_ATTENTION_SHORT_BACKWARD", "0")  # the tiled paths
    first, second, atomic = grads(True), grads(True), grads(False)
    for a, b, c, d in zip(first, second, atomic, short):
        assert torch.equal(a, b)  # bitwise reproducible
        torch.testing.assert_close(c.float(), a.float(), atol=2e-2, rtol=2e-2)  # only the summation order differs
        torch.testing.assert_close(d.float(), a.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradcheck(causal):
    lq, lk, seg = [3, 1, 0, 2], [4, 2, 3], [0, 2, 1, 0]
    q, k, v, key_bias = make_inputs(lq, lk, (2, 1), 3, torch.float64, "cpu", "per_head")
    cu_q, cu_k = cu_of(lq, "cpu"), cu_of(lk, "cpu")
    kv_segment = torch.tensor(seg, dtype=torch.int32)
    key_lengths = torch.tensor([4, 1, 0, 2], dtype=torch.int32)

    def fn(q, k, v, key_bias):
        out, lse = vlcore.ops.attention(q, k, v, cu_q, cu_k, 3, 4, causal=causal, key_bias=key_bias,
                                        kv_segment=kv_segment, key_lengths=key_lengths, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    args = [t.requires_grad_() for t in (q, k, v, key_bias)]
    assert torch.autograd.gradcheck(fn, args)
    per_key = torch.randn(sum(lk), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: fn(q, k, v, b), (per_key,))


def test_attention_gradcheck_dense():
    q = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: vlcore.ops.attention(q, k, v, causal=True, key_bias=b, key_lengths=lengths), (q, k, v, bias))


def opcheck_samples(device):
    dtype = dtypes_for(device)[0]
    head_dim = 32 if device == "cuda" else 8
    lq, lk = [5, 0, 3], [4, 6, 1]
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)
    q, k, v, bias = make_inputs(lq, lk, (4, 2), head_dim, dtype, device, "per_head")
    fwd = torch.ops.vlcore.attention_forward
    yield fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 5, 6, bias.requires_grad_(),
                None, None, True, 0.3, False)
    # Non-contiguous: q, k, v split from one fused qkv projection (row stride 3 * H * D), a transposed bias.
    qkv = randn((sum(lq), 3, 2, head_dim), dtype, device)
    k_rows = randn((sum(lk), 2, 2, head_dim), dtype, device)
    t_bias = randn((2, sum(lk)), dtype, device).t()
    seg = torch.tensor([1, 0, 1], dtype=torch.int32, device=device)
    lengths = torch.tensor([2, 9, 0], dtype=torch.int32, device=device)
    yield fwd, (qkv[:, 0].requires_grad_(), k_rows[:, 0], k_rows[:, 1], cu_q, cu_k, 5, 6, t_bias, seg, lengths,
                False, 0.5, False)
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))  # the backward op itself has no autograd
    out, lse = fwd(q, k, v, cu_q, cu_k, 5, 6, bias, seg, lengths, True, 0.3, False)
    grad_out = randn(q.shape, dtype, device)
    # A transposed-contiguous grad_out, grad_lse, kv_segment and key_lengths all in one backward sample.
    grad_out = grad_out.transpose(0, 1).contiguous().transpose(0, 1)
    yield torch.ops.vlcore.attention_backward, (grad_out, q, k, v, out, lse, torch.randn_like(lse), cu_q, cu_k, 5, 6,
                                                bias, seg, lengths, True, 0.3, True, True)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_opcheck(device):
    for n, (op, args) in enumerate(opcheck_samples(device)):
        # aot_dispatch_dynamic (the slow one) on the first sample; test_attention_compile traces the rest.
        utils = None if n == 0 else ("test_schema", "test_autograd_registration", "test_faketensor")
        opcheck(op, args) if utils is None else opcheck(op, args, test_utils=utils)


def test_attention_compile():
    lq, lk = [5, 0, 3], [4, 6, 1]
    cu_q, cu_k = cu_of(lq, "cpu"), cu_of(lk, "cpu")
    q, k, v, bias = make_inputs(lq, lk, (4, 2), 8, torch.float32, "cpu", "per_key")
    dense_q, dense_kv = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8)
    lengths = torch.tensor([5, 2], dtype=torch.int32)

    def step(q, k, v, bias, dense_q):
        packed, lse = vlcore.ops.attention(q, k, v, cu_q, cu_k, 5, 6, causal=True, key_bias=bias, return_lse=True)
        dense = vlcore.ops.attention(dense_q, dense_kv, dense_kv, key_lengths=lengths)
        return packed.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum() + dense.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a = [t.clone().requires_grad_() for t in (q, k, v, bias, dense_q)]
    b = [t.clone().requires_grad_() for t in (q, k, v, bias, dense_q)]
    loss_c, loss_e = compiled(*a), step(*b)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(torch.autograd.grad(loss_c, a), torch.autograd.grad(loss_e, b)):
        torch.testing.assert_close(gc, ge)


# ---------------------------------------------------------------------------------------------------------
# The vlcore.nn modules route through the op when impl="vlcore".


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = vlcore.ops.attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("kv_segment") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(vlcore.ops, "attention", spy)
    return calls


def test_attention_modules_use_the_op(op_calls):
    torch.manual_seed(0)
    ref = CrossAttention(16, 12, 4, num_kv_heads=2, gated=True)
    fused = CrossAttention(16, 12, 4, num_kv_heads=2, gated=True, impl="vlcore")
    fused.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.alpha.fill_(0.7)
        fused.alpha.fill_(0.7)
    x, ctx = torch.randn(6, 5, 16), torch.randn(2, 7, 12)
    index, lengths = torch.tensor([0, 1, 1, 0, 1, 1]), torch.tensor([7, 3], dtype=torch.int32)
    torch.testing.assert_close(fused(x, ctx, context_lengths=lengths, context_index=index),
                               ref(x, ctx, context_lengths=lengths, context_index=index), atol=1e-5, rtol=1e-5)
    assert op_calls == [True]  # shared K/V through kv_segment, not copies
    ref_self = SelfAttention(16, 4, causal=True)
    fused_self = SelfAttention(16, 4, causal=True, impl="vlcore")
    fused_self.load_state_dict(ref_self.state_dict())
    cu = cu_of([5, 0, 9], "cpu")
    tokens = torch.randn(14, 16)
    torch.testing.assert_close(fused_self(tokens, cu_seqlens=cu, max_seqlen=9), ref_self(tokens, cu_seqlens=cu, max_seqlen=9),
                               atol=1e-5, rtol=1e-5)
    assert len(op_calls) == 2


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

def _good(device="cpu"):
    q, k, v, _ = make_inputs([3, 2], [4, 1], (4, 2), 8, torch.float32, device)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_of([3, 2], device), cu_seqlens_k=cu_of([4, 1], device),
                max_seqlen_q=3, max_seqlen_k=4)


CU = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731

BAD_INPUTS = [
    (dict(k=torch.randn(5, 3, 8), v=torch.randn(5, 3, 8)), "heads_q must be a multiple of heads_kv"),
    (dict(k=torch.randn(5, 2, 4), v=torch.randn(5, 2, 4)), "k must have q's head_dim 8"),
    (dict(v=torch.randn(5, 2, 7)), "v must have the shape of k"),
    (dict(k=torch.randn(5, 2, 8, dtype=torch.float64)), "q, k and v must have the same dtype"),
    (dict(q=torch.randn(8, 5, 4).transpose(0, 2)), "must be contiguous in its last"),
    (dict(q=torch.randn(5, 4)), r"q must have shape \(total_q, heads_q, head_dim\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 5])), r"cu_seqlens_q\): cu_seqlens must be int32, got Long"),
    (dict(cu_seqlens_k=CU(0, 4)), "cu_seqlens_q and cu_seqlens_k must have the same number of entries"),
    (dict(cu_seqlens_q=CU(0, 3, 4)), r"cu_seqlens_q\): cu_seqlens must end at the total token count 5"),
    (dict(cu_seqlens_q=CU(0, 4, 3), max_seqlen_q=4), r"cu_seqlens_q\): cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens_k=CU(1, 4, 5)), r"cu_seqlens_k\): cu_seqlens must start at 0"),
    (dict(max_seqlen_k=3), r"sample 0 has length 4 > max_seqlen_k = 3"),
    (dict(kv_segment=CU(0, 2)), r"kv_segment\[1\] = 2 is out of range for 2 key segments"),
    (dict(kv_segment=CU(0)), r"kv_segment must have shape \(num_q_segments,\) = \(2,\)"),
    (dict(kv_segment=torch.tensor([0, 1])), "kv_segment must be int32"),
    (dict(key_lengths=torch.tensor([1, 1])), "key_lengths must be int32"),
    (dict(key_bias=torch.randn(5, 2)), r"key_bias must have shape \(total_k,\) = \(5,\) or \(total_k, heads_q\)"),
    (dict(q=torch.randint(0, 3, (5, 4, 8))), "q must be float16, bfloat16, float32 or float64"),
]


@pytest.mark.parametrize("change,match", BAD_INPUTS)
def test_attention_bad_input(change, match):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=match):
        vlcore.ops.attention(**args)


def test_attention_bad_input_dense_and_validate():
    q, kv = torch.randn(2, 3, 4, 8), torch.randn(3, 5, 2, 8)
    with pytest.raises(ValueError, match="must have q's batch size 2"):
        vlcore.ops.attention(q, kv, kv)
    with pytest.raises(ValueError, match="packed form needs"):
        vlcore.ops.attention(q[0], kv[0], kv[0], CU(0, 3))
    with pytest.raises(ValueError, match=r"dense key_bias must have shape \[B, Lk\]"):
        vlcore.ops.attention(q, kv[:2], kv[:2], key_bias=torch.randn(2, 4))
    # validate=True: the same value checks on the host, before any kernel (what CUDA callers use).
    args = _good()
    with pytest.raises(ValueError, match=r"cu_seqlens_q\): cu_seqlens must end at the total token count 5"):
        vlcore.ops.attention(**{**args, "cu_seqlens_q": CU(0, 3, 4)}, validate=True)
    with pytest.raises(ValueError, match=r"kv_segment\[0\] = -1 is out of range"):
        vlcore.ops.attention(**args, kv_segment=CU(-1, 0), validate=True)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a GPU")
def test_attention_cuda_rejects_unsupported():
    args = _good("cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        vlcore.ops.attention(**args)
    args = {key: (t.half() if torch.is_tensor(t) and t.is_floating_point() else t) for key, t in args.items()}
    with pytest.raises(ValueError, match="head_dim must be one of 32, 64, 72, 80, 96, 128"):
        vlcore.ops.attention(**args)
    with pytest.raises(ValueError, match="must be on the same device"):
        vlcore.ops.attention(**{**args, "cu_seqlens_k": args["cu_seqlens_k"].cpu()})


def test_attention_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = make_inputs([4], [6], (2, 2), 9, torch.float64, "cpu")
    cu_q, cu_k = cu_of([4], "cpu"), cu_of([6], "cpu")
    torch.testing.assert_close(vlcore.ops.attention(q, k, v, cu_q, cu_k, 4, 6),
                               vlcore.ops.attention(q, k, v, cu_q, cu_k, 4, 6, scale=1 / math.sqrt(9)))
    assert not torch.allclose(vlcore.ops.attention(q, k, v, cu_q, cu_k, 4, 6, scale=1.0),
                              vlcore.ops.attention(q, k, v, cu_q, cu_k, 4, 6))


# ---------------------------------------------------------------------------------------------------------
# Alignment, understated bounds, autocast, degenerate shapes.


def at_odd_offset(t):
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("device", DEVICES)
def test_attention_unaligned_inputs(device, deterministic, poisoned):
    # The CUDA kernels load 16 bytes at a time: a view at an odd storage offset must be realigned, not read.
    dtype = dtypes_for(device)[-1]
    lq, lk = [5, 17], [9, 40]
    q, k, v, key_bias = make_inputs(lq, lk, (4, 2), 32, dtype, device, "per_key")
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)
    odd = [at_odd_offset(t) for t in (q, k, v, key_bias)]
    assert all(t.is_contiguous() and t.data_ptr() % 16 != 0 for t in odd)

    def op_fn(q, k, v, key_bias):
        return vlcore.ops.attention(q, k, v, cu_q, cu_k, 17, 40, causal=True, key_bias=key_bias, return_lse=True,
                                    deterministic=deterministic)

    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    grad_lse = torch.randn((4, sum(lq)), dtype=torch.float64, device=device)
    aligned = run_with_grads(op_fn, [q, k, v, key_bias], grad_out, grad_lse)
    unaligned = run_with_grads(op_fn, odd, at_odd_offset(grad_out), grad_lse)
    for a, b in zip(aligned, unaligned):
        torch.testing.assert_close(a, b, atol=0, rtol=0) if deterministic else torch.testing.assert_close(a, b)
    # The backward op itself with every tensor it reads at an odd offset (autograd hands it fresh ones).
    out, lse = (t.detach() for t in aligned[:2])
    grad_out = randn(q.shape, dtype, device)
    backward = torch.ops.vlcore.attention_backward
    args = (cu_q, cu_k, 17, 40, key_bias, None, None, True, 1 / math.sqrt(32), True, deterministic)
    want = backward(grad_out, q, k, v, out, lse, None, *args)
    got = backward(*[at_odd_offset(t) for t in (grad_out, q, k, v, out, lse)], None, *args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0) if deterministic else torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("understated", ["max_seqlen_q", "max_seqlen_k"])
def test_attention_understated_max_seqlen(device, deterministic, understated, backward_path, poisoned):
    dtype = dtypes_for(device)[0]
    lq, lk = [70, 3], [150, 2]
    q, k, v, _ = make_inputs(lq, lk, (2, 2), 32, dtype, device)
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)
    bounds = {"max_seqlen_q": 70, "max_seqlen_k": 150}
    low = {**bounds, understated: 1}
    # validate=True names the argument on every device.
    with pytest.raises(ValueError, match=f"> {understated} = 1"):
        vlcore.ops.attention(q, k, v, cu_q, cu_k, **low, validate=True)
    if device == "cpu":  # the CPU kernel checks the values anyway
        with pytest.raises(ValueError, match=f"> {understated} = 1"):
            vlcore.ops.attention(q, k, v, cu_q, cu_k, **low)
        return
    # CUDA: no host sync to check, but the CTAs loop over the real tiles, so every output is still right.
    def op_fn(bound):
        return lambda q, k, v: vlcore.ops.attention(q, k, v, cu_q, cu_k, **bound, return_lse=True,
                                                    deterministic=deterministic)
    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    grad_lse = torch.randn((2, sum(lq)), dtype=torch.float64, device=device)
    want = run_with_grads(op_fn(bounds), [q, k, v], grad_out, grad_lse)
    got = run_with_grads(op_fn(low), [q, k, v], grad_out, grad_lse)
    # Bitwise where the kernels only change how tiles map to CTAs; with atomics, or the short-key kernel
    # doing the segment in chunks (dQ added per chunk in float16), close.
    exact = backward_path == "deterministic" or (backward_path == "short_keys" and understated == "max_seqlen_q")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0 if exact else 1e-2, rtol=0 if exact else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_autocast(device):
    lq, lk = [6, 9], [11, 4]
    q, k, v, key_bias = make_inputs(lq, lk, (4, 2), 32, torch.float32, device, "per_head")
    cu_q, cu_k = cu_of(lq, device), cu_of(lk, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, key_bias)]
    with torch.autocast(device, dtype=torch.bfloat16):
        out, lse = vlcore.ops.attention(*leaves[:3], cu_q, cu_k, 9, 11, key_bias=leaves[3], return_lse=True)
    grads = torch.autograd.grad(out.float().sum(), leaves)
    if device == "cpu":
        # The reference stays exact: float32 in, float32 arithmetic out (nothing routed through bfloat16 matmuls).
        exact = [t.double().requires_grad_() for t in (q, k, v, key_bias)]
        ref_out, ref_lse = attention_ref(*exact[:3], cu_q, cu_k, key_bias=exact[3], return_lse=True)
        ref_grads = torch.autograd.grad(ref_out.sum(), exact)
        assert out.dtype == torch.float32
        for got, want in zip([out, lse, *grads], [ref_out, ref_lse, *ref_grads]):
            assert max_err(got, want) < 1e-5
    else:
        # CUDA: the kernels run in the autocast dtype, exactly as on bfloat16 inputs.
        assert out.dtype == torch.bfloat16
        want = vlcore.ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k, 9, 11, key_bias=key_bias)
        torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_attention_head_dim_zero_and_empty_dense_batch():
    with pytest.raises(ValueError, match="head_dim"):
        vlcore.ops.attention(torch.randn(1, 3, 2, 0), torch.randn(1, 5, 2, 0), torch.randn(1, 5, 2, 0))
    with pytest.raises(ValueError, match="head_dim"):
        vlcore.ops.attention(torch.randn(3, 2, 0), torch.randn(5, 2, 0), torch.randn(5, 2, 0), CU(0, 3), CU(0, 5), 3, 5)
    q = torch.randn(0, 3, 4, 8, requires_grad=True)
    kv = torch.randn(0, 5, 2, 8)
    bias, lengths = torch.randn(0, 5), torch.zeros(0, dtype=torch.int32)
    out, lse = vlcore.ops.attention(q, kv, kv, causal=True, key_bias=bias, key_lengths=lengths, return_lse=True)
    assert out.shape == (0, 3, 4, 8) and lse.shape == (0, 4, 3)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert dq.shape == q.shape
    with pytest.raises(ValueError, match="k must have q's head_dim"):  # the shape checks still run for B = 0
        vlcore.ops.attention(q, kv[..., :4], kv[..., :4])


# ---------------------------------------------------------------------------------------------------------
# Dispatch: the library path (SDPA; varlen_attn on CUDA) behind the same function, against the reference.


@pytest.fixture
def library_calls(monkeypatch):
    calls = []
    real = attention_module._sdpa

    def spy(*args, **kwargs):
        calls.append("sdpa")
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_sdpa", spy)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", ["library", "vlcore"])
@pytest.mark.parametrize("causal,heads,lengths", [(False, (4, 2), (7, 13)), (True, (2, 2), (9, 9)),
                                                  (True, (4, 1), (5, 8))])
def test_attention_dispatch_paths_match_reference(device, backend_name, causal, heads, lengths, library_calls):
    dtype = dtypes_for(device)[0]
    (len_q, len_k), (hq, hkv) = lengths, heads
    q = randn((3, len_q, hq, 32), dtype, device)
    k = randn((3, len_k, hkv, 32), dtype, device)
    v = randn((3, len_k, hkv, 32), dtype, device)
    no_lse = torch.zeros((3, hq, len_q), dtype=torch.float64, device=device)

    def op_fn(q, k, v):
        return vlcore.ops.attention(q, k, v, causal=causal, backend=backend_name), no_lse

    def ref_fn(q, k, v):
        return attention_ref(q, k, v, causal=causal), no_lse.cpu()

    grad_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    got = run_with_grads(op_fn, [q, k, v], grad_out, no_lse)
    ref = run_with_grads(ref_fn, [t.cpu().double() for t in (q, k, v)], grad_out.cpu(), no_lse.cpu())
    low = run_with_grads(ref_fn, [t.cpu() for t in (q, k, v)], grad_out.cpu(), no_lse.cpu())
    assert_flash_rule([g.cpu() for g in got], low, ref, dtype, ["out", "lse", "dq", "dk", "dv"])
    # Causal with Lq != Lk has another mask alignment in SDPA: it stays on vlcore.
    assert library_calls == (["sdpa"] if backend_name == "library" and not (causal and len_q != len_k) else [])


def test_attention_dispatch_rules(library_calls, monkeypatch):
    q, kv = torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    vlcore.ops.attention(q, kv, kv)  # auto, short: vlcore
    assert library_calls == []
    monkeypatch.setattr(attention_module, "LIBRARY_MIN_SEQLEN", 6)
    vlcore.ops.attention(q, kv, kv)  # auto, long enough: the library
    assert library_calls == ["sdpa"]
    # What the library kernels cannot give keeps the vlcore path, whatever the backend.
    vlcore.ops.attention(q, kv, kv, return_lse=True, backend="library")
    vlcore.ops.attention(q, kv, kv, key_bias=torch.zeros(2, 6), backend="library")
    vlcore.ops.attention(q, kv, kv, key_lengths=torch.tensor([6, 2], dtype=torch.int32), backend="library")
    vlcore.ops.attention(q, kv, kv, backend="vlcore")
    assert library_calls == ["sdpa"]
    # The process-wide default, for tests and benchmarks.
    previous = attention_module.set_attention_backend("vlcore")
    try:
        vlcore.ops.attention(q, kv, kv)
        assert library_calls == ["sdpa"]
    finally:
        attention_module.set_attention_backend(previous)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the exact reference under CPU autocast
        vlcore.ops.attention(q, kv, kv, backend="library")
    assert library_calls == ["sdpa"]
    with pytest.raises(ValueError, match="backend must be one of"):
        vlcore.ops.attention(q, kv, kv, backend="cudnn")
    # Packed on CPU: no varlen kernel, so "library" runs vlcore and still matches the reference.
    cu = cu_of([2, 4], "cpu")
    qp, kp = torch.randn(6, 2, 8, dtype=torch.float64), torch.randn(6, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(vlcore.ops.attention(qp, kp, kp, cu, cu, 4, 4, causal=True, backend="library"),
                               attention_ref(qp, kp, kp, cu, cu, causal=True))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_attention_packed_library_path(causal):
    # varlen_attn where this torch has it (else the vlcore kernels): the same results either way.
    lengths = [5, 130, 1, 64]
    q, k, v, _ = make_inputs(lengths, lengths, (4, 2), 64, torch.bfloat16, "cuda")
    cu = cu_of(lengths, "cuda")
    no_lse = torch.zeros((4, sum(lengths)), dtype=torch.float64, device="cuda")

    def op_fn(q, k, v):
        return vlcore.ops.attention(q, k, v, cu, cu, 130, 130, causal=causal, backend="library"), no_lse

    def ref_fn(q, k, v):
        return attention_ref(q, k, v, cu.cpu(), cu.cpu(), causal=causal), no_lse.cpu()

    grad_out = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    got = run_with_grads(op_fn, [q, k, v], grad_out, no_lse)
    ref = run_with_grads(ref_fn, [t.cpu().double() for t in (q, k, v)], grad_out.cpu(), no_lse.cpu())
    low = run_with_grads(ref_fn, [t.cpu() for t in (q, k, v)], grad_out.cpu(), no_lse.cpu())
    assert_flash_rule([g.cpu() for g in got], low, ref, torch.bfloat16, ["out", "lse", "dq", "dk", "dv"])


def test_attention_compile_library_path():
    q, kv = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8)

    def step(q):
        return vlcore.ops.attention(q, kv, kv, causal=True, backend="library").square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a, b = q.clone().requires_grad_(), q.clone().requires_grad_()
    loss_c, loss_e = compiled(a), step(b)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(torch.autograd.grad(loss_c, a)[0], torch.autograd.grad(loss_e, b)[0])
