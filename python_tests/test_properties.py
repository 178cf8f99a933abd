"""Property tests: random shapes, strides (non-contiguous views, odd storage offsets), dtypes, lengths and
values thrown at every public op of vlcore.ops and at vlcore.packing. Each call must give a correct result
(checked against a simple reference where that is cheap) or a ValueError whose message names an argument;
any other exception, a hang or a wrong value fails.

The "ci" profile keeps the module bounded (50 examples per property, about 10 s on two cores; derandomized so a failure
reproduces); ``HYPOTHESIS_PROFILE=deep`` runs many more examples.
"""

import importlib
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vlcore  # noqa: E402
from vlcore.ops import nvfp4 as nvfp4_ops  # noqa: E402
from vlcore.ops import seq_pack as seq_ops  # noqa: E402
from vlcore.ops import token_grid as grid_ops  # noqa: E402
from vlcore.ops import tome as tome_ops  # noqa: E402
from vlcore.packing import build_packed_batch, plan  # noqa: E402

# vlcore.ops.attention is the op function; its module (for attention_ref) is reached by name.
attention_ops = importlib.import_module("vlcore.ops.attention")

settings.register_profile("ci", max_examples=50, deadline=10_000, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=300, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "offset", "strided", "transposed")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout: an odd storage offset, a stride-2 last dim, or a
    transposed (column-major) last two dims."""
    if layout == "offset":
        storage = torch.empty(t.numel() + 3, dtype=t.dtype)
        return storage[3:].view(t.shape).copy_(t)
    if layout == "strided" and t.dim() >= 1:
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        view = wide[..., 1::2]
        view.copy_(t)
        return view
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def names_an_argument(error: ValueError, names) -> None:
    message = str(error)
    assert any(n in message for n in names), f"ValueError does not name any of {names}: {message}"


def result_or_named_error(call, names):
    """``call()``, or None when it raised a ValueError naming one of ``names``; anything else propagates."""
    try:
        return call()
    except ValueError as e:
        names_an_argument(e, names)
        return None


def close(got, want, dtype):
    tol = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, equal_nan=True)


lengths_st = st.lists(st.integers(0, 6), min_size=0, max_size=4)
row_st = st.lists(st.integers(0, 3), min_size=0, max_size=2)


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------
# seq_pack

@given(lengths=lengths_st, row=row_st, dtype=st.sampled_from(FLOATS + (torch.int64,)), layout=st.sampled_from(LAYOUTS),
       pad=st.integers(0, 2), pad_value=st.sampled_from([0, -1, 2.5]))
def test_pack_unpack_roundtrip_or_named_error(lengths, row, dtype, layout, pad, pad_value):
    padded_len = max(lengths, default=0) + pad
    cu = cu_of(lengths)
    padded = laid_out(torch.randn(len(lengths), padded_len, *row).to(dtype), layout)
    packed = seq_ops.pack(padded, cu, sum(lengths))
    torch.testing.assert_close(packed, seq_ops.pack_ref(padded, cu))
    if dtype == torch.int64 and pad_value == 2.5:
        pad_value = 2
    unpacked = seq_ops.unpack(laid_out(packed, layout), cu, padded_len, pad_value)
    torch.testing.assert_close(unpacked, seq_ops.unpack_ref(packed, cu, padded_len, pad_value))


@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4), defect=st.sampled_from(
    ["int64", "decreasing", "too_long", "total", "2d", "pad_overflow"]))
def test_seq_pack_bad_inputs_name_the_argument(lengths, defect):
    cu = cu_of(lengths)
    padded_len, total = max(lengths), sum(lengths)
    x = torch.randn(len(lengths), padded_len, 2)
    if defect == "int64":
        cu = cu.long()
    elif defect == "decreasing" and len(lengths) >= 2:
        cu = cu.flip(0)
    elif defect == "too_long":
        padded_len = max(0, padded_len - 1)
    elif defect == "total":
        total += 1
    elif defect == "2d":
        cu = cu.view(1, -1)
    if defect == "pad_overflow":
        packed = torch.zeros(total, 2, dtype=torch.int8)
        out = result_or_named_error(lambda: seq_ops.unpack(packed, cu, padded_len, 1000), ["pad_value"])
        assert out is None  # 1000 does not fit in int8
        return
    names = ["cu_seqlens", "padded_len", "total_tokens", "max_len"]
    out = result_or_named_error(lambda: seq_ops.unpack(seq_ops.pack(x, cu, total), cu, padded_len), names)
    if out is not None:  # the defect happened to leave a valid input (e.g. flipping one segment)
        assert out.shape == (len(lengths), padded_len, 2)


@given(total=st.integers(0, 8), n=st.integers(0, 8), row=row_st, dtype=st.sampled_from(FLOATS),
       layout=st.sampled_from(LAYOUTS), data=st.data())
def test_scatter_image_embeds_or_named_error(total, n, row, dtype, layout, data):
    positions = torch.tensor(data.draw(st.lists(st.integers(-2, total + 1), min_size=n, max_size=n)), dtype=torch.long)
    text = laid_out(torch.randn(total, *row).to(dtype), layout)
    image = laid_out(torch.randn(n, *row).to(dtype), layout)
    valid = bool(((positions >= 0) & (positions < total)).all()) and positions.unique().numel() == n
    out = result_or_named_error(lambda: seq_ops.scatter_image_embeds(text, image, positions), ["image_positions"])
    assert (out is not None) == valid
    if valid:
        torch.testing.assert_close(out, seq_ops.scatter_image_embeds_ref(text, image, positions))


# ---------------------------------------------------------------------------------------------------------
# attention


@given(batch=st.integers(0, 2), len_q=st.integers(0, 4), len_k=st.integers(0, 4), heads_kv=st.integers(1, 2),
       group=st.integers(1, 2), head_dim=st.integers(1, 8), causal=st.booleans(), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64]), with_lengths=st.booleans(), data=st.data())
def test_dense_attention_matches_reference(batch, len_q, len_k, heads_kv, group, head_dim, causal, layout, dtype,
                                           with_lengths, data):
    heads_q = heads_kv * group
    q = laid_out(torch.randn(batch, len_q, heads_q, head_dim, dtype=dtype), layout)
    k = laid_out(torch.randn(batch, len_k, heads_kv, head_dim, dtype=dtype), layout)
    v = laid_out(torch.randn(batch, len_k, heads_kv, head_dim, dtype=dtype), layout)
    lengths = None
    if with_lengths:
        lengths = torch.tensor(data.draw(st.lists(st.integers(0, len_k), min_size=batch, max_size=batch)),
                               dtype=torch.int32)
    out = result_or_named_error(lambda: vlcore.ops.attention(q, k, v, causal=causal, key_lengths=lengths),
                                [f"{n} must be contiguous in its last (head_dim) dimension" for n in "qkv"])
    # The kernels read head_dim with unit stride: only a strided head dim may be refused (by name); an empty
    # batch may still give its empty result.
    if out is None:
        assert head_dim > 1 and any(t.stride(-1) != 1 for t in (q, k, v))
        return
    want = attention_ops.attention_ref(q.double(), k.double(), v.double(), causal=causal, key_lengths=lengths)
    close(out, want, dtype)


@given(defect=st.sampled_from(["head_dim0", "heads", "dtype", "cu_int64", "bias_shape"]))
def test_attention_bad_inputs_name_the_argument(defect):
    q, k, v = torch.randn(5, 2, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    bias = None
    if defect == "head_dim0":
        q, k, v = q[..., :0], k[..., :0], v[..., :0]
    elif defect == "heads":
        k, v = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    elif defect == "dtype":
        q, k, v = q.long(), k.long(), v.long()
    elif defect == "cu_int64":
        cu = cu.long()
    elif defect == "bias_shape":
        bias = torch.randn(4)
    try:
        out = vlcore.ops.attention(q, k, v, cu, cu, 3, 3, key_bias=bias)
    except ValueError as e:
        names_an_argument(e, ["q", "k", "v", "head_dim", "heads", "cu_seqlens", "key_bias"])
        return
    assert defect == "head_dim0" and out.shape == q.shape  # an empty head dim may also give an empty result


# ---------------------------------------------------------------------------------------------------------
# tome


@given(batch=st.integers(0, 3), n=st.integers(0, 12), c=st.integers(1, 5), channels=st.integers(0, 4),
       r=st.integers(0, 8), class_token=st.booleans(), mode=st.sampled_from(tome_ops.MERGE_MODES),
       dtype=st.sampled_from([torch.float32, torch.float64]), layout=st.sampled_from(LAYOUTS))
def test_dense_tome_matches_reference(batch, n, c, channels, r, class_token, mode, dtype, layout):
    metric = laid_out(torch.randn(batch, n, c, dtype=torch.float64), layout)
    x = laid_out(torch.randn(batch, n, channels, dtype=dtype), layout)
    size = laid_out(torch.randint(1, 4, (batch, n, 1)).to(dtype), layout)
    match = vlcore.ops.tome_match(metric, r, class_token=class_token)
    ref = tome_ops.tome_match_ref(metric, r, class_token=class_token)
    if ref is not None:
        for got, want in zip(match[:3], ref):
            assert torch.equal(got, want)
    out, out_size = vlcore.ops.tome_merge(x, match, size=size, mode=mode)
    want, want_size = tome_ops.tome_merge_ref(x.double(), ref, size=size.double(), mode=mode)
    close(out, want, dtype)
    close(out_size, want_size, dtype)
    rc = tome_ops.tome_cap(n, r, class_token)
    assert out.shape == (batch, n - rc, channels)
    full = vlcore.ops.tome_unmerge(out, match)
    torch.testing.assert_close(full.double(), tome_ops.tome_unmerge_ref(out.double(), ref, n))
    origin = vlcore.ops.tome_track(match)
    assert origin.shape == (batch, n) and (origin.numel() == 0 or int(origin.max()) < n - rc)
    source = vlcore.ops.tome_source(match)
    assert source.shape == (batch, n - rc, n)
    if batch and n:  # every original token is covered by exactly the merged token that tome_track names
        torch.testing.assert_close(source.argmax(1), origin)


@given(seqlens=st.lists(st.integers(0, 9), min_size=0, max_size=4), r=st.integers(0, 5), c=st.integers(1, 4),
       layout=st.sampled_from(LAYOUTS), data=st.data())
def test_varlen_tome_matches_dense_per_image(seqlens, r, c, layout, data):
    metric = laid_out(torch.randn(sum(seqlens), c, dtype=torch.float64), layout)
    x = laid_out(torch.randn(sum(seqlens), 3, dtype=torch.float64), layout)
    match = vlcore.ops.tome_match_varlen(metric, seqlens, r)
    out, _ = vlcore.ops.tome_merge(x, match)
    start, out_start = 0, 0
    for n, rc in zip(seqlens, match.r):
        dense = vlcore.ops.tome_match(metric[start:start + n][None], r)
        want, _ = vlcore.ops.tome_merge(x[start:start + n][None], dense)
        torch.testing.assert_close(out[out_start:out_start + n - rc], want[0])
        start, out_start = start + n, out_start + n - rc
    assert torch.equal(vlcore.ops.tome_unmerge(out, match), out[match.dest])
    total = sum(seqlens)
    origin = torch.tensor(data.draw(st.lists(st.integers(-2, total + 1), max_size=5)), dtype=torch.long)
    valid = bool(((origin >= 0) & (origin < total)).all())
    got = result_or_named_error(lambda: vlcore.ops.tome_track(match, origin), ["origin"])
    assert (got is not None) == valid
    if valid:
        assert torch.equal(got, match.dest[origin])


@given(defect=st.sampled_from(["r_negative", "r_float", "metric_2d", "seqlens_sum", "x_shape", "size_shape", "mode"]))
def test_tome_bad_inputs_name_the_argument(defect):
    metric, x = torch.randn(2, 6, 3), torch.randn(2, 6, 4)
    calls = {
        "r_negative": (lambda: vlcore.ops.tome_match(metric, -1), ["r"]),
        "r_float": (lambda: vlcore.ops.tome_match(metric, 1.5), ["r"]),
        "metric_2d": (lambda: vlcore.ops.tome_match(metric[0], 1), ["metric"]),
        "seqlens_sum": (lambda: vlcore.ops.tome_match_varlen(metric[0], [2, 3], 1), ["seqlens"]),
        "x_shape": (lambda: vlcore.ops.tome_merge(x[:, :5], vlcore.ops.tome_match(metric, 2)), ["x"]),
        "size_shape": (lambda: vlcore.ops.tome_merge(x, vlcore.ops.tome_match(metric, 2), size=x), ["size"]),
        "mode": (lambda: vlcore.ops.tome_merge(x, vlcore.ops.tome_match(metric, 2), mode="max"), ["mode"]),
    }
    call, names = calls[defect]
    try:
        call()
    except TypeError as e:  # a Python int is the documented type of r
        assert defect == "r_float" and "r must be a Python int" in str(e)
        return
    except ValueError as e:
        names_an_argument(e, names)
        return
    pytest.fail(f"{defect}: no error")


# ---------------------------------------------------------------------------------------------------------
# token_grid


@given(batch=st.integers(0, 2), h=st.integers(1, 7), w=st.integers(1, 7), oh=st.integers(1, 5), ow=st.integers(1, 5),
       channels=st.integers(0, 3), mode=st.sampled_from(grid_ops.POOL_MODES), class_token=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), layout=st.sampled_from(LAYOUTS))
def test_token_pool_matches_reference(batch, h, w, oh, ow, channels, mode, class_token, dtype, layout):
    x = laid_out(torch.randn(batch, h * w + int(class_token), channels, dtype=dtype), layout)
    out = vlcore.ops.token_pool_2d(x, (h, w), output_hw=(oh, ow), mode=mode, class_token=class_token)
    close(out, grid_ops.token_pool_2d_ref(x.double(), (h, w), (oh, ow), mode, class_token), dtype)
    packed = x.reshape(batch * (h * w + int(class_token)), channels)
    got, grids = vlcore.ops.token_pool_2d_varlen(packed, [(h, w)] * batch, output_hw=(oh, ow), mode=mode,
                                                 class_token=class_token)
    assert grids == [(oh, ow)] * batch
    torch.testing.assert_close(got, out.reshape(batch * (oh * ow + int(class_token)), channels))


@given(batch=st.integers(0, 2), h=st.integers(1, 4), w=st.integers(1, 4), channels=st.integers(0, 3),
       dtype=st.sampled_from(FLOATS + (torch.int32,)), layout=st.sampled_from(LAYOUTS))
def test_patch_merge_matches_reference(batch, h, w, channels, dtype, layout):
    x = laid_out(torch.randn(batch, 4 * h * w, channels).to(dtype), layout)
    out = vlcore.ops.patch_merge_2x2(x, (2 * h, 2 * w))
    assert torch.equal(out, grid_ops.patch_merge_2x2_ref(x, (2 * h, 2 * w)))
    assert torch.equal(vlcore.ops.patch_merge_2x2_varlen(x.reshape(batch * 4 * h * w, channels), [(2 * h, 2 * w)] * batch),
                       out.reshape(batch * h * w, 4 * channels))


@given(grid=st.tuples(st.integers(-1, 5), st.integers(-1, 5)), out_hw=st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
       kind=st.sampled_from(["float", "neg", "ok", "stride0", "rows", "odd"]))
def test_token_grid_bad_inputs_name_the_argument(grid, out_hw, kind):
    h, w = grid
    x = torch.randn(1, max(h, 0) * max(w, 0), 2)
    names = ["grid_hw", "output_hw", "stride", "x", "grids"]
    if kind == "float":
        grid = (float(h), w)
    if kind == "rows":
        x = torch.randn(1, max(h, 0) * max(w, 0) + 1, 2)
    stride = 0 if kind == "stride0" else None
    pooled = result_or_named_error(
        lambda: vlcore.ops.token_pool_2d(x, grid, output_hw=None if stride == 0 else out_hw, stride=stride), names)
    valid = kind in ("ok", "neg", "odd") and min(grid) >= 1 and min(out_hw) >= 1
    assert (pooled is not None) == valid
    merged = result_or_named_error(lambda: vlcore.ops.patch_merge_2x2(x, grid), names)
    assert (merged is not None) == (kind in ("ok", "neg", "odd", "stride0") and min(grid) >= 1
                                    and h % 2 == 0 and w % 2 == 0)


# ---------------------------------------------------------------------------------------------------------
# nvfp4


@given(rows=st.integers(0, 3).map(lambda v: 16 * v), cols=st.integers(0, 3).map(lambda v: 16 * v),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), layout=st.sampled_from(LAYOUTS),
       columnwise=st.booleans(), block_2d=st.booleans(), rht=st.booleans(), swizzle=st.booleans(),
       scale=st.sampled_from([1.0, 1e-30, 1e30]))
def test_nvfp4_quantize_matches_reference(rows, cols, dtype, layout, columnwise, block_2d, rht, swizzle, scale):
    x = laid_out((torch.randn(rows, cols) * scale).to(dtype), layout)
    kwargs = dict(columnwise=columnwise, block_2d=block_2d, rht_rowwise=rht, swizzle_scales=swizzle)
    got = result_or_named_error(lambda: vlcore.ops.nvfp4_quantize(x, **kwargs), ["block_2d", "rht_rowwise"])
    # 16x16 blocks (weights) are never Hadamard-transformed: that combination is refused by name.
    assert (got is None) == (block_2d and rht)
    if got is None:
        return
    want = nvfp4_ops.nvfp4_quantize_ref(x, **kwargs)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert torch.equal(g.codes, w.codes) and torch.equal(g.scales, w.scales)
        torch.testing.assert_close(g.amax, w.amax)
        torch.testing.assert_close(vlcore.ops.nvfp4_dequantize(g), nvfp4_ops.nvfp4_dequantize_ref(w))


@given(m=st.integers(0, 2).map(lambda v: 16 * v), n=st.integers(0, 2).map(lambda v: 16 * v),
       k=st.integers(0, 3).map(lambda v: 16 * v), out_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_nvfp4_gemm_matches_reference(m, n, k, out_dtype):
    a = vlcore.ops.nvfp4_quantize(torch.randn(m, k)).rowwise
    b = vlcore.ops.nvfp4_quantize(torch.randn(n, k)).rowwise
    out = vlcore.ops.nvfp4_gemm(a, b, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    want = nvfp4_ops.nvfp4_gemm_ref(a, b) if k else torch.zeros(m, n, dtype=torch.float64)
    torch.testing.assert_close(out.double(), want.to(out_dtype).double(), atol=1e-2, rtol=1e-2)


@given(defect=st.sampled_from(["cols", "dtype", "3d", "amax_nan", "amax_negative", "amax_zero", "raw_tensor"]))
def test_nvfp4_bad_inputs_name_the_argument(defect):
    x = torch.randn(16, 32)
    calls = {
        "cols": (lambda: vlcore.ops.nvfp4_quantize(x[:, :20]), ["x", "cols"]),
        "dtype": (lambda: vlcore.ops.nvfp4_quantize(x.double()), ["x"]),
        "3d": (lambda: vlcore.ops.nvfp4_quantize(x[None]), ["x"]),
        "amax_nan": (lambda: vlcore.ops.nvfp4_quantize(x, amax_rowwise=torch.tensor(float("nan"))), ["amax"]),
        "amax_negative": (lambda: vlcore.ops.nvfp4_quantize(x, amax_rowwise=torch.tensor(-1.0)), ["amax"]),
        "amax_zero": (lambda: vlcore.ops.nvfp4_quantize(x, amax_rowwise=torch.tensor(0.0)), ["amax"]),
        "raw_tensor": (lambda: vlcore.ops.nvfp4_dequantize(x), ["t"]),
    }
    call, names = calls[defect]
    try:
        call()
    except ValueError as e:
        names_an_argument(e, names)
        return
    pytest.fail(f"{defect}: no error")


@given(shape=st.lists(st.integers(0, 3), min_size=0, max_size=2), blocks=st.integers(0, 3), inverse=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), layout=st.sampled_from(LAYOUTS),
       sign_mask=st.integers(0, 0xFFFF))
def test_hadamard_matches_reference(shape, blocks, inverse, dtype, layout, sign_mask):
    x = laid_out(torch.randn(*shape, 16 * blocks).to(dtype), layout)
    out = result_or_named_error(lambda: vlcore.ops.hadamard_transform(x, inverse, sign_mask), ["x", "dtype"])
    if out is None:
        return
    close(out, nvfp4_ops.hadamard_transform_ref(x.double(), inverse, sign_mask), dtype)
    back = vlcore.ops.hadamard_transform(out, not inverse, sign_mask)
    close(back, x, dtype)


# ---------------------------------------------------------------------------------------------------------
# packing


@given(lengths=st.lists(st.one_of(st.integers(-2, 12), st.floats(allow_nan=True, allow_infinity=True),
                                  st.complex_numbers(max_magnitude=5)), max_size=8),
       max_len=st.one_of(st.integers(-1, 12), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([10**12, "8"]), st.integers(1, 12).map(torch.tensor)),
       algorithm=st.sampled_from(["first_fit", "best_fit"]), truncate=st.booleans())
def test_plan_packs_everything_or_names_the_argument(lengths, max_len, algorithm, truncate):
    original = max_len.clone() if isinstance(max_len, torch.Tensor) else None
    p = result_or_named_error(lambda: plan(lengths, max_len, algorithm=algorithm, truncate=truncate),
                              ["lengths", "max_len"])
    if original is not None:
        assert torch.equal(max_len, original)  # the caller's tensor is never changed
    if p is None:
        return
    assert sorted(i for b in p.bins for i in b) == list(range(len(lengths)))
    assert all(b for b in p.bins if any(p.lengths[i] for i in b)) and max(p.bin_lengths(), default=0) <= p.max_len
    for i, n in enumerate(lengths):
        assert p.lengths[i] == min(int(n), p.max_len) and (i in p.truncated) == (int(n) > p.max_len)
    # The bins are at most twice the lower bound plus one (any fit-decreasing heuristic is).
    assert len(p.bins) <= 2 * math.ceil(p.num_tokens / p.max_len) + 1


@given(samples=st.lists(st.one_of(st.lists(st.integers(0, 9), max_size=5).map(
    lambda ids: {"input_ids": torch.tensor(ids, dtype=torch.long)}), st.lists(st.integers(0, 9), max_size=5).map(
    lambda ids: torch.tensor(ids, dtype=torch.long))), min_size=0, max_size=4), image_token_id=st.sampled_from([None, 3]))
def test_build_packed_batch_or_named_error(samples, image_token_id):
    batch = result_or_named_error(lambda: build_packed_batch(samples, image_token_id), ["samples", "batch"])
    valid = bool(samples) and all(isinstance(s, dict) for s in samples)
    assert (batch is not None) == valid
    if valid:
        ids = torch.cat([s["input_ids"] for s in samples])
        assert torch.equal(batch.input_ids, ids)
        assert batch.cu_seqlens.tolist() == cu_of([len(s["input_ids"]) for s in samples]).tolist()
        if image_token_id is not None:
            assert torch.equal(batch.image_positions, (ids == image_token_id).nonzero().flatten())
