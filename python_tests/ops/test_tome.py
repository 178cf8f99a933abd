"""tome family: matching, merge, unmerge, source tracking against ToMe's algorithm
transcribed in plain PyTorch (vlcore.ops.tome.tome_*_ref, scores in float64)."""

import pytest
import torch
from torch.library import opcheck

import vlcore
from vlcore.ops.tome import (TomeMatch, tome_cap, tome_match_ref, tome_merge_ref, tome_unmerge_ref)

from ..conftest import DEVICES


def separated_metric(batch, n, c, device, *, dtype=torch.float32, min_gap=1e-5, class_token=False, distill_token=False):
    """Random metric whose ToMe scores have no near-ties (so float32 and float64 scoring rank alike):
    every A token's best partner beats its second best, and the best scores differ, by >= min_gap."""
    for attempt in range(50):
        metric = torch.randn(batch, n, c, dtype=torch.float64)
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
        if class_token and scores.shape[1]:
            scores[:, 0] = -float("inf")
        if distill_token and scores.shape[2]:
            scores[:, :, 0] = -float("inf")
        ok = True
        if scores.shape[2] >= 2:
            top = scores.topk(2, dim=-1).values
            finite = top[..., 1].isfinite()
            ok &= bool(((top[..., 0] - top[..., 1])[finite] >= min_gap).all())
        if scores.shape[2] >= 1 and scores.shape[1] >= 2:
            best = scores.max(-1).values.sort(-1).values
            diffs = best.diff(dim=-1)
            ok &= bool((diffs[diffs.isfinite()] >= min_gap).all())
        if ok:
            return metric.to(device=device, dtype=dtype)
    raise AssertionError("could not draw a metric without near-ties")


MATCH_CASES = [  # (batch, n, c, r)
    (3, 1, 4, 1), (2, 2, 4, 1), (3, 3, 5, 1), (3, 17, 8, 4), (2, 17, 8, 20), (2, 16, 6, 8), (4, 10, 5, 0),
    (2, 64, 64, 16), (1, 197, 64, 16), (2, 33, 100, 7), (2, 25, 130, 12), (1, 2, 3, 5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,n,c,r", MATCH_CASES)
@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
def test_tome_match_indices_equal_tome(device, batch, n, c, r, class_token, distill_token, poisoned):
    metric = separated_metric(batch, n, c, device, class_token=class_token, distill_token=distill_token)
    match = vlcore.ops.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
    want = tome_match_ref(metric, r, class_token=class_token, distill_token=distill_token)
    rc = tome_cap(n, r, class_token, distill_token)
    assert match.r == (rc,) * batch
    if want is None:
        assert match.is_identity
        assert torch.equal(match.dest.cpu(), torch.arange(batch * n))
        return
    for got, ref in zip(match[:3], want):
        assert got.dtype == torch.long and torch.equal(got.cpu(), ref.cpu())
    if class_token:
        assert bool((match.unmerged[:, 0, 0] == 0).all())  # the class token stays first


@pytest.mark.parametrize("device", DEVICES)
def test_tome_match_ties_go_to_lower_indices(device):
    # Identical tokens: every score is 1. Best partner: the lowest B index; edges: the lowest A indices first.
    metric = torch.ones(2, 9, 4, device=device)
    match = vlcore.ops.tome_match(metric, 3)
    assert match.src[..., 0].tolist() == [[0, 1, 2]] * 2
    assert match.dst[..., 0].tolist() == [[0, 0, 0]] * 2
    assert match.unmerged[..., 0].tolist() == [[3, 4]] * 2


def test_tome_match_zero_rows_keep_the_class_token_first():
    # A tokens 1..3 have zero keys: their scores are NaN, which ToMe merges first; the class token never merges.
    metric = separated_metric(1, 9, 4, "cpu", class_token=True)
    metric[0, [2, 4, 6]] = 0
    x = torch.arange(9.0).view(1, 9, 1)
    for device in DEVICES:
        match = vlcore.ops.tome_match(metric.to(device), 4, class_token=True)
        assert match.src[..., 0].tolist() == [[1, 2, 3, 4]] and match.unmerged[..., 0].tolist() == [[0]]
        assert vlcore.ops.tome_merge(x.to(device), match)[0][0, 0, 0].item() == 0.0  # the class token's own row


# (batch, n, c, r, class_token, distill_token, rows made non-finite, how). c = 8 / 100 / 130 cover the three
# CUDA matching paths (A rows in registers up to 64 / 128 wide, or read from memory).
NONFINITE_CASES = [
    (1, 9, 4, 4, True, False, [2, 4, 6], "zero"),      # fewer finite A scores than r
    (2, 17, 8, 6, True, False, [0, 4, 10], "zero"),    # the class token's own row too
    (2, 17, 8, 5, False, False, [3], "zero"),          # a zero B token: every score of every A token is NaN
    (2, 18, 8, 8, True, True, [1, 6, 12], "nan"),      # the distillation token's row is masked anyway
    (2, 21, 100, 7, True, False, [2, 8], "inf"),
    (2, 21, 100, 9, False, False, [0, 2, 8, 14, 20], "nan"),
    (1, 33, 130, 12, True, False, [4, 6, 7, 30], "zero"),
    (1, 33, 130, 16, True, True, [2, 12, 22], "inf"),
    (2, 40, 8, 15, True, False, list(range(2, 40, 2)), "zero"),  # every A token but the class token
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,n,c,r,class_token,distill_token,rows,how", NONFINITE_CASES)
def test_tome_match_nonfinite_metric_rows_follow_tome(device, batch, n, c, r, class_token, distill_token, rows, how,
                                                      poisoned):
    # Zero, Inf or NaN keys give NaN scores: ToMe (torch's max / descending argsort) ranks NaN above every number
    # and the protected class token below every other token.
    metric = separated_metric(batch, n, c, device, class_token=class_token, distill_token=distill_token)
    fill = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[how]
    metric[:, rows, :: (3 if how == "inf" else 1)] = fill  # Inf: some entries of the row, as a real overflow
    match = vlcore.ops.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
    want = tome_match_ref(metric, r, class_token=class_token, distill_token=distill_token)
    for got, ref in zip(match[:3], want):
        assert torch.equal(got.cpu(), ref.cpu())
    if class_token:
        assert bool((match.unmerged[:, 0, 0] == 0).all())
        x = torch.randn(batch, n, 3, device=device)
        assert torch.equal(vlcore.ops.tome_merge(x, match)[0][:, 0], x[:, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [8, 100, 130])
def test_tome_match_extreme_magnitudes(device, c):
    # float32 rows whose squares overflow (1e30) or underflow (1e-30) in float32: the cosine is scale-free, so
    # both backends must still rank like the float64 reference.
    metric = separated_metric(2, 23, c, device, class_token=True)
    metric[:, 1::4] *= 1e30
    metric[:, 2::4] *= 1e-30
    match = vlcore.ops.tome_match(metric, 9, class_token=True)
    for got, ref in zip(match[:3], tome_match_ref(metric, 9, class_token=True)):
        assert torch.equal(got.cpu(), ref.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["wavg", "mean", "sum", "amax"])
@pytest.mark.parametrize("with_size", [False, True])
@pytest.mark.parametrize("batch,n,c,r,class_token", [(3, 17, 6, 4, True), (2, 16, 136, 8, False), (2, 197, 64, 16, True),
                                                     (3, 3, 5, 1, False), (2, 2, 7, 1, False)])
def test_tome_merge_matches_tome(device, mode, with_size, batch, n, c, r, class_token, poisoned):
    metric = separated_metric(batch, n, 8, device, class_token=class_token)
    x = torch.randn(batch, n, c, device=device)
    size = torch.randint(1, 5, (batch, n, 1), device=device).float() if with_size else None
    match = vlcore.ops.tome_match(metric, r, class_token=class_token)
    out, out_size = vlcore.ops.tome_merge(x, match, size=size, mode=mode)
    want, want_size = tome_merge_ref(x, tome_match_ref(metric, r, class_token=class_token), size=size, mode=mode)
    assert out.shape == want.shape and out_size.shape == want_size.shape
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_size, want_size, atol=0, rtol=0)
    # Patches are conserved.
    torch.testing.assert_close(out_size.sum(1), (size if with_size else torch.ones_like(x[..., :1])).sum(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_tome_merge_dtypes(device, dtype, poisoned):
    metric = separated_metric(2, 50, 16, device)
    x = torch.randn(2, 50, 40, device=device, dtype=dtype)
    size = torch.randint(1, 4, (2, 50, 1), device=device).to(dtype)
    match = vlcore.ops.tome_match(metric.to(dtype) if dtype == torch.float64 else metric, 10)
    out, out_size = vlcore.ops.tome_merge(x, match, size=size)
    want, want_size = tome_merge_ref(x.double(), match[:3], size=size.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(out_size.double(), want_size)


@pytest.mark.parametrize("device", DEVICES)
def test_tome_identity_and_degenerate(device):
    x = torch.randn(2, 5, 3, device=device)
    for n, r, class_token, distill_token in [(5, 0, False, False), (1, 4, False, False), (1, 1, True, False),
                                             (2, 1, True, False), (2, 3, True, True), (3, 1, True, True)]:
        xs = x[:, :n]
        match = vlcore.ops.tome_match(torch.randn(2, n, 4, device=device), r, class_token=class_token,
                                      distill_token=distill_token)
        assert match.is_identity
        out, size = vlcore.ops.tome_merge(xs, match)
        assert out is xs and torch.equal(size, torch.ones(2, n, 1, device=device))
        assert vlcore.ops.tome_unmerge(xs, match) is xs
    # r larger than allowed is capped: 17 tokens with a class token merge at most 8.
    match = vlcore.ops.tome_match(torch.randn(2, 17, 4, device=device), 100, class_token=True)
    assert match.r == (8, 8) and vlcore.ops.tome_merge(torch.randn(2, 17, 3, device=device), match)[0].shape == (2, 9, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("class_token", [False, True])
def test_tome_varlen_matches_per_image(device, class_token, poisoned):
    seqlens = [0, 1, 2, 17, 9, 64, 3, 30]
    rs = [3, 1, 1, 5, 100, 16, 0, 7]
    c, channels = 8, 12
    metrics = [separated_metric(1, n, c, device, class_token=class_token)[0] for n in seqlens]
    xs = [torch.randn(n, channels, device=device) for n in seqlens]
    sizes = [torch.randint(1, 4, (n, 1), device=device).float() for n in seqlens]
    match = vlcore.ops.tome_match_varlen(torch.cat(metrics), seqlens, rs, class_token=class_token)
    assert match.out_seqlens == tuple(n - tome_cap(n, r, class_token) for n, r in zip(seqlens, rs))
    cu = match.out_cu_seqlens()
    assert cu.dtype == torch.int32 and cu.device == match.dest.device and cu[-1] == sum(match.out_seqlens)
    out, out_size = vlcore.ops.tome_merge(torch.cat(xs), match, size=torch.cat(sizes))
    unmerged_out = vlcore.ops.tome_unmerge(out, match)
    start = 0
    in_start = 0
    for n, r, m, x, s in zip(seqlens, rs, metrics, xs, sizes):
        ref = tome_match_ref(m[None], r, class_token=class_token)
        want, want_size = tome_merge_ref(x[None], ref, size=s[None])
        k = want.shape[1]
        torch.testing.assert_close(out[start:start + k], want[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out_size[start:start + k], want_size[0])
        torch.testing.assert_close(unmerged_out[in_start:in_start + n], tome_unmerge_ref(want, ref, n)[0])
        start, in_start = start + k, in_start + n
    assert start == out.shape[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("class_token", [False, True])
def test_tome_unmerge_matches_tome(device, class_token, poisoned):
    metric = separated_metric(3, 21, 8, device, class_token=class_token)
    match = vlcore.ops.tome_match(metric, 6, class_token=class_token)
    merged = torch.randn(3, 15, 10, device=device)
    out = vlcore.ops.tome_unmerge(merged, match)
    assert torch.equal(out, tome_unmerge_ref(merged, match[:3], 21))
    # merge(sum) is unmerge's adjoint: <unmerge(y), x> == <y, merge_sum(x)>
    x = torch.randn(3, 21, 10, device=device)
    summed, _ = vlcore.ops.tome_merge(x, match, mode="sum")
    torch.testing.assert_close((out * x).sum(), (merged * summed).sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_tome_source_tracking(device):
    batch, n = 2, 23
    x = torch.randn(batch, n, 4, device=device)
    source, origin = None, None
    ref_source = torch.eye(n, device=device).expand(batch, n, n)
    for r in (5, 4, 3):
        metric = separated_metric(batch, x.shape[1], 8, device, class_token=True)
        match = vlcore.ops.tome_match(metric, r, class_token=True)
        source = vlcore.ops.tome_source(match, source)
        ref_source = tome_merge_ref(ref_source, match[:3], mode="amax")[0]
        origin = vlcore.ops.tome_track(match, origin)
        x, _ = vlcore.ops.tome_merge(x, match)
    assert torch.equal(source, ref_source)
    assert source.shape == (batch, n - 12, n)
    assert torch.equal(source.sum(1), torch.ones(batch, n, device=device))  # each patch in exactly one token
    assert torch.equal(origin, source.argmax(1))  # the compact map is the adjacency's column owner
    assert bool((origin[:, 0] == 0).all())  # the class token stays first and alone
    # varlen: global rows
    m = vlcore.ops.tome_match_varlen(torch.randn(12, 4, device=device), [5, 7], [2, 3])
    assert torch.equal(vlcore.ops.tome_track(m), m.dest)
    assert torch.equal(vlcore.ops.tome_track(m, torch.tensor([11, 0], device=device)), m.dest[[11, 0]])


# ---------------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["wavg", "mean", "sum", "amax"])
def test_tome_merge_backward_matches_tome(device, mode, poisoned):
    metric = separated_metric(2, 19, 8, device, class_token=True)
    match = vlcore.ops.tome_match(metric, 6, class_token=True)
    x = torch.randn(2, 19, 24, device=device, requires_grad=True)
    size = torch.randint(1, 4, (2, 19, 1), device=device).float().requires_grad_()
    out, out_size = vlcore.ops.tome_merge(x, match, size=size, mode=mode)
    want, want_size = tome_merge_ref(x, match[:3], size=size, mode=mode)
    g, gs = torch.randn_like(out), torch.randn_like(out_size)
    got = torch.autograd.grad((out * g).sum() + (out_size * gs).sum(), (x, size))
    ref = torch.autograd.grad((want * g).sum() + (want_size * gs).sum(), (x, size))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["wavg", "mean", "sum", "amax"])
def test_tome_merge_gradcheck(mode):
    metric = torch.randn(2, 11, 5, dtype=torch.float64)
    match = vlcore.ops.tome_match(metric, 4, class_token=True)
    x = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(2, 11, 1, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s: vlcore.ops.tome_merge(x, match, size=s, mode=mode), (x, size))
    assert torch.autograd.gradcheck(lambda x: vlcore.ops.tome_merge(x, match, mode=mode)[0], (x,))
    varlen = vlcore.ops.tome_match_varlen(torch.randn(14, 5, dtype=torch.float64), [9, 0, 5], [3, 1, 2])
    y = torch.randn(14, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: vlcore.ops.tome_merge(y, varlen, mode=mode)[0], (y,))


def test_tome_unmerge_gradcheck():
    match = vlcore.ops.tome_match(torch.randn(2, 13, 5, dtype=torch.float64), 4)
    y = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: vlcore.ops.tome_unmerge(y, match), (y,))
    assert torch.autograd.gradgradcheck(lambda y: vlcore.ops.tome_unmerge(y, match), (y,))


# ---------------------------------------------------------------------------------------------------------
# Registration: opcheck (with non-contiguous samples) and compile


def opcheck_samples(device):
    metric = torch.randn(3 * 17, 6, device=device)
    yield torch.ops.vlcore.tome_match, (metric, [17, 17, 17], [4], True, False)
    yield torch.ops.vlcore.tome_match, (torch.randn(6, 40, device=device).t(), [15, 0, 25], [3, 2, 30], False, False)
    match = vlcore.ops.tome_match_varlen(torch.randn(40, 6, device=device), [15, 25], [3, 6])
    maps = (match.dest, match.offsets, match.sources)
    x = torch.randn(7, 40, device=device).t()  # non-contiguous
    size = torch.randint(1, 3, (40,), device=device).float()
    for mode in ("wavg", "amax"):
        yield torch.ops.vlcore.tome_merge, (x.detach().requires_grad_(), size.detach().requires_grad_(), *maps, mode)
    yield torch.ops.vlcore.tome_merge, (x.detach().requires_grad_(), None, *maps, "wavg")
    out, out_size = torch.ops.vlcore.tome_merge(x, size, *maps, "wavg")
    yield torch.ops.vlcore.tome_merge_backward, (torch.randn_like(out), torch.randn_like(out_size), x, size, out, *maps, "wavg")
    yield torch.ops.vlcore.tome_unmerge, (torch.randn(5, 31, device=device).t().requires_grad_(), *maps)


@pytest.mark.parametrize("device", DEVICES)
def test_tome_opcheck(device):
    for op, args in opcheck_samples(device):
        opcheck(op, args)


def test_tome_compile():
    metric, x = torch.randn(2, 17, 6), torch.randn(2, 17, 5, requires_grad=True)

    def step(metric, x):
        match = vlcore.ops.tome_match(metric, 4, class_token=True)
        merged, size = vlcore.ops.tome_merge(x, match)
        match2 = vlcore.ops.tome_match(merged, 3, class_token=True)
        merged, size = vlcore.ops.tome_merge(merged, match2, size=size)
        return (vlcore.ops.tome_unmerge(merged, match2) * size.log1p()[:, :1]).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c, loss_e = compiled(metric, x), step(metric, x)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(torch.autograd.grad(loss_c, x)[0], torch.autograd.grad(loss_e, x)[0])


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_tome_bad_input():
    metric, x = torch.randn(2, 9, 4), torch.randn(2, 9, 3)
    with pytest.raises(ValueError, match=r"r must be >= 0, got -1"):
        vlcore.ops.tome_match(metric, -1)
    with pytest.raises(ValueError, match=r"metric must have shape \(B, N, c\)"):
        vlcore.ops.tome_match(metric[0], 2)
    with pytest.raises(TypeError, match="r must be a Python int"):
        vlcore.ops.tome_match(metric, 2.0)
    match = vlcore.ops.tome_match(metric, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, C\) = \(2, 9, C\)"):
        vlcore.ops.tome_merge(x[:, :8], match)
    with pytest.raises(ValueError, match=r"size must have shape \(B, N, 1\)"):
        vlcore.ops.tome_merge(x, match, size=torch.ones(2, 8, 1))
    with pytest.raises(ValueError, match=r"size must have shape"):
        vlcore.ops.tome_merge(x, match, size=torch.ones(2, 9, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        vlcore.ops.tome_merge(x, match, mode="max")
    with pytest.raises(ValueError, match=r"x must have shape \(B, N - r, C\)"):
        vlcore.ops.tome_unmerge(x, match)
    with pytest.raises(ValueError, match=r"seqlens must be >= 0 and add up to metric.shape\[0\] = 18"):
        vlcore.ops.tome_match_varlen(metric.flatten(0, 1), [9, 8], 2)
    with pytest.raises(ValueError, match=r"r must be an int or one per image \(2\)"):
        vlcore.ops.tome_match_varlen(metric.flatten(0, 1), [9, 9], [1, 2, 3])
    with pytest.raises(ValueError, match="r must be >= 0"):
        vlcore.ops.tome_match_varlen(metric.flatten(0, 1), [9, 9], [1, -2])
    # The ops themselves, called directly.
    with pytest.raises(ValueError, match=r"vlcore::tome_match: metric has 18 rows but seqlens add up to 17"):
        torch.ops.vlcore.tome_match(metric.flatten(0, 1), [9, 8], [1], False, False)
    with pytest.raises(ValueError, match=r"vlcore::tome_match: r must be >= 0"):
        torch.ops.vlcore.tome_match(metric.flatten(0, 1), [9, 9], [-1], False, False)
    with pytest.raises(ValueError, match=r"vlcore::tome_merge: size must have shape \(18,\)"):
        torch.ops.vlcore.tome_merge(x.flatten(0, 1), torch.ones(17), match.dest, match.offsets, match.sources, "wavg")
    with pytest.raises(ValueError, match=r"vlcore::tome_merge: dest and sources must have one entry per input token"):
        torch.ops.vlcore.tome_merge(x.flatten(0, 1)[:17], None, match.dest, match.offsets, match.sources, "wavg")
    with pytest.raises(ValueError, match=r"vlcore::tome_merge: sources\[3\] = 99 is out of range"):
        bad = match.sources.clone()
        bad[3] = 99
        torch.ops.vlcore.tome_merge(x.flatten(0, 1), None, match.dest, match.offsets, bad, "wavg")
    with pytest.raises(ValueError, match="vlcore::tome_merge: mode must be 'wavg', 'mean', 'sum' or 'amax'"):
        torch.ops.vlcore.tome_merge(x.flatten(0, 1), None, match.dest, match.offsets, match.sources, "max")


@pytest.mark.parametrize("device", DEVICES)
def test_tome_merge_backward_rejects_other_dtypes(device):
    match = vlcore.ops.tome_match(torch.randn(2, 9, 4, device=device), 3)
    maps = (match.dest, match.offsets, match.sources)
    x = torch.randn(18, 5, device=device)
    out, _ = torch.ops.vlcore.tome_merge(x, None, *maps, "wavg")
    with pytest.raises(ValueError, match=r"vlcore::tome_merge_backward: grad_out must have the dtype of x \(Float\)"):
        torch.ops.vlcore.tome_merge_backward(torch.randn_like(out).double(), None, x, None, out, *maps, "wavg")
    with pytest.raises(ValueError, match=r"vlcore::tome_merge_backward: out must have the dtype of x"):
        torch.ops.vlcore.tome_merge_backward(torch.randn_like(out), None, x, None, out.half(), *maps, "wavg")


def test_tome_match_object_is_a_namedtuple():
    match = vlcore.ops.tome_match(torch.randn(1, 6, 3), 2)
    assert isinstance(match, TomeMatch) and match.dense and match.out_seqlens == (4,)


def test_empty_dense_batch_gives_empty_results():
    match = vlcore.ops.tome_match(torch.randn(0, 9, 4), 3)
    x, size = vlcore.ops.tome_merge(torch.randn(0, 9, 5), match)
    assert x.shape == (0, 6, 5) and size.shape == (0, 6, 1)
    assert vlcore.ops.tome_unmerge(x, match).shape == (0, 9, 5)
    assert vlcore.ops.tome_source(match).shape == (0, 6, 9)
    assert vlcore.ops.tome_track(match).shape == (0, 9)
    identity = vlcore.ops.tome_match(torch.randn(0, 9, 4), 0)
    assert vlcore.ops.tome_merge(torch.randn(0, 9, 5), identity)[0].shape == (0, 9, 5)
    varlen = vlcore.ops.tome_match_varlen(torch.randn(0, 4), [], 2)
    assert vlcore.ops.tome_merge(torch.randn(0, 5), varlen)[0].shape == (0, 5)


def test_tome_track_checks_origin_and_never_wraps():
    varlen = vlcore.ops.tome_match_varlen(torch.randn(9, 4), [4, 5], 1)
    with pytest.raises(ValueError, match=r"origin\[1\] = -1 is out of range: the match has 9 input tokens"):
        vlcore.ops.tome_track(varlen, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"origin\[0\] = 9 is out of range"):
        vlcore.ops.tome_track(varlen, torch.tensor([9]))
    assert torch.equal(vlcore.ops.tome_track(varlen, torch.tensor([0, 8], dtype=torch.int32)), varlen.dest[[0, 8]])
    dense = vlcore.ops.tome_match(torch.randn(2, 9, 4), 3)
    with pytest.raises(ValueError, match=r"origin\[0, 1\] = -1 is out of range: the match has 9 input tokens per image"):
        vlcore.ops.tome_track(dense, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="origin must have the match's batch size 2"):
        vlcore.ops.tome_track(dense, torch.zeros(3, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"origin must be an int64 or int32 tensor \[B, N_orig\]"):
        vlcore.ops.tome_track(dense, torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"origin must be an int64 or int32 tensor \[T_orig\]"):
        vlcore.ops.tome_track(varlen, [0, 1])


def test_match_ref_scores_in_the_compute_dtype():
    metric = torch.randn(2, 11, 6)
    ref64 = tome_match_ref(metric, 4)
    ref32 = tome_match_ref(metric, 4, compute_dtype=torch.float32)
    assert ref64 is not None and ref32 is not None and ref64._fields == ("unmerged", "src", "dst")
    # Random scores are far apart: both dtypes rank alike.
    for a, b in zip(ref64, ref32):
        assert torch.equal(a, b)
