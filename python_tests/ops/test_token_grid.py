"""token_grid family: 2D token pooling (adaptive average, bilinear align_corners=False) and
Qwen2-VL's 2x2 patch merger against F.adaptive_avg_pool2d / F.interpolate / a reshape-permute reference."""

import math

import pytest
import torch
from torch.library import opcheck

import vlcore
from vlcore.ops.token_grid import patch_merge_2x2_ref, token_pool_2d_ref

from ..conftest import DEVICES

# (grid, output grid): downsampling by 2 (even and odd: LLaVA-OneVision's 27 -> 14), uneven windows,
# upsampling, 1x1, non-square.
def assert_close_like_torch(got, ref_fn, x):
    """The flash-attn rule: the error against float64 is at most twice PyTorch's own float32 error (plus
    1e-6). Bilinear weights computed in float32 carry ~1e-6 relative error, in PyTorch as here."""
    want = ref_fn(x.double())
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    torch_err = (ref_fn(x).double() - want).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


POOL_CASES = [((6, 4), (3, 2)), ((27, 27), (14, 14)), ((5, 7), (3, 3)), ((3, 5), (7, 4)), ((1, 1), (2, 3)),
              ((24, 24), (12, 12)), ((9, 2), (1, 1))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid,out", POOL_CASES)
@pytest.mark.parametrize("mode", ["avg", "bilinear"])
@pytest.mark.parametrize("class_token", [False, True])
def test_token_pool_2d_matches_torch(device, grid, out, mode, class_token, poisoned):
    x = torch.randn(3, grid[0] * grid[1] + class_token, 136, device=device)
    got = vlcore.ops.token_pool_2d(x, grid, output_hw=out, mode=mode, class_token=class_token)
    assert got.shape == (3, out[0] * out[1] + class_token, 136) and got.is_contiguous()
    assert_close_like_torch(got, lambda t: token_pool_2d_ref(t, grid, out, mode, class_token), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["avg", "bilinear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels", [1, 7, 64])
def test_token_pool_2d_dtypes(device, mode, dtype, channels, poisoned):
    x = torch.randn(2, 27 * 27, channels, device=device, dtype=dtype)
    got = vlcore.ops.token_pool_2d(x, (27, 27), stride=2, mode=mode)
    want = token_pool_2d_ref(x.double(), (27, 27), (14, 14), mode)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_token_pool_2d_stride_is_ceil(device):
    x = torch.randn(2, 27 * 27, 3, device=device)
    for stride in (1, 2, 3, 4):
        got = vlcore.ops.token_pool_2d(x, (27, 27), stride=stride, mode="bilinear")
        side = math.ceil(27 / stride)
        assert got.shape == (2, side * side, 3)
        assert_close_like_torch(got, lambda t: token_pool_2d_ref(t, (27, 27), (side, side), "bilinear"), x)
    torch.testing.assert_close(vlcore.ops.token_pool_2d(x, (27, 27), stride=1), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["avg", "bilinear"])
@pytest.mark.parametrize("class_token", [False, True])
def test_token_pool_2d_varlen_packed_grids(device, mode, class_token, poisoned):
    grids = [(6, 4), (27, 27), (1, 1), (5, 9), (2, 2)]
    xs = [torch.randn(1, h * w + class_token, 24, device=device) for h, w in grids]
    got, out_grids = vlcore.ops.token_pool_2d_varlen(torch.cat(xs, 1)[0], grids, stride=2, mode=mode,
                                                      class_token=class_token)
    assert out_grids == [(3, 2), (14, 14), (1, 1), (3, 5), (1, 1)]
    assert_close_like_torch(got, lambda t: torch.cat([token_pool_2d_ref(x.to(t.dtype), g, o, mode, class_token)
                                                      for x, g, o in zip(xs, grids, out_grids)], 1)[0], xs[0])
    # one output grid per image
    got, _ = vlcore.ops.token_pool_2d_varlen(torch.cat(xs, 1)[0], grids, output_hw=[(2, 2), (12, 12), (1, 1), (4, 3), (3, 3)],
                                             mode=mode, class_token=class_token)
    outs = [(2, 2), (12, 12), (1, 1), (4, 3), (3, 3)]
    assert_close_like_torch(got, lambda t: torch.cat([token_pool_2d_ref(x.to(t.dtype), g, o, mode, class_token)
                                                      for x, g, o in zip(xs, grids, outs)], 1)[0], xs[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["avg", "bilinear"])
@pytest.mark.parametrize("grid,out", [((27, 27), (14, 14)), ((5, 7), (3, 3)), ((3, 5), (7, 4))])
def test_token_pool_2d_backward_matches_torch(device, mode, grid, out, poisoned):
    x = torch.randn(2, 1 + grid[0] * grid[1], 40, device=device, requires_grad=True)
    got = vlcore.ops.token_pool_2d(x, grid, output_hw=out, mode=mode, class_token=True)
    want = token_pool_2d_ref(x, grid, out, mode, True)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["avg", "bilinear"])
def test_token_pool_2d_gradcheck(mode):
    x = torch.randn(2, 1 + 5 * 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: vlcore.ops.token_pool_2d(x, (5, 3), output_hw=(3, 2), mode=mode,
                                                                       class_token=True), (x,))
    y = torch.randn(4 * 3 + 2 * 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: vlcore.ops.token_pool_2d_varlen(y, [(4, 3), (2, 5)], output_hw=(3, 4),
                                                                              mode=mode)[0], (y,))


# ---------------------------------------------------------------------------------------------------------
# 2x2 patch merger


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", [(2, 2), (6, 4), (28, 28), (2, 10)])
@pytest.mark.parametrize("dtype,channels", [(torch.float32, 136), (torch.bfloat16, 64), (torch.float32, 3),
                                            (torch.float16, 1)])
def test_patch_merge_2x2_matches_reshape(device, grid, dtype, channels, poisoned):
    x = torch.randn(3, grid[0] * grid[1], channels, device=device).to(dtype)
    got = vlcore.ops.patch_merge_2x2(x, grid)
    assert torch.equal(got, patch_merge_2x2_ref(x, grid))
    xr = x.detach().requires_grad_()
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(vlcore.ops.patch_merge_2x2(xr, grid), xr, g)
    (gw,) = torch.autograd.grad(patch_merge_2x2_ref(xr, grid), xr, g)
    assert torch.equal(gx, gw)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_merge_2x2_varlen(device, poisoned):
    grids = [(4, 6), (2, 2), (8, 8), (6, 2)]
    xs = [torch.randn(1, h * w, 5, device=device) for h, w in grids]
    got = vlcore.ops.patch_merge_2x2_varlen(torch.cat(xs, 1)[0], grids)
    assert torch.equal(got, torch.cat([patch_merge_2x2_ref(x, g) for x, g in zip(xs, grids)], 1)[0])


def test_patch_merge_2x2_gradcheck():
    x = torch.randn(2, 4 * 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: vlcore.ops.patch_merge_2x2(x, (4, 6)), (x,))
    assert torch.autograd.gradgradcheck(lambda x: vlcore.ops.patch_merge_2x2(x, (4, 6)), (x,))


# ---------------------------------------------------------------------------------------------------------
# Registration


def opcheck_samples(device):
    x = torch.randn(5, 2 * (1 + 6 * 4), device=device).t()  # non-contiguous
    for mode in ("avg", "bilinear"):
        yield torch.ops.vlcore.token_pool_2d, (x.detach().requires_grad_(), [6, 4, 6, 4], [3, 2, 3, 2], mode, True)
    y = torch.randn(4 * 3 + 2 * 5, 6, device=device)[:, ::2]
    yield torch.ops.vlcore.token_pool_2d, (y.requires_grad_(), [4, 3, 2, 5], [2, 2, 3, 3], "bilinear", False)
    yield torch.ops.vlcore.token_pool_2d_backward, (torch.randn(3, 2 * (1 + 3 * 2), device=device).t(), [6, 4, 6, 4],
                                                    [3, 2, 3, 2], "avg", True)
    z = torch.randn(6, 4 * 6 + 2 * 2, device=device).t()
    yield torch.ops.vlcore.patch_merge_2x2, (z.detach().requires_grad_(), [4, 6, 2, 2])
    yield torch.ops.vlcore.patch_merge_2x2_backward, (torch.randn(24, 7, device=device).t().requires_grad_(), [4, 6, 2, 2])


@pytest.mark.parametrize("device", DEVICES)
def test_token_pool_opcheck(device):
    for op, args in opcheck_samples(device):
        opcheck(op, args)


def test_token_pool_compile():
    x = torch.randn(2, 1 + 8 * 7, 4, requires_grad=True)

    def step(x):
        pooled = vlcore.ops.token_pool_2d(x, (8, 7), stride=2, mode="bilinear", class_token=True)  # 4 x 4
        merged = vlcore.ops.patch_merge_2x2(pooled[:, 1:], (4, 4))
        return merged.square().sum() + vlcore.ops.token_pool_2d(x[:, 1:], (8, 7), output_hw=(3, 3)).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c, loss_e = compiled(x), step(x)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(torch.autograd.grad(loss_c, x)[0], torch.autograd.grad(loss_e, x)[0])


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_token_pool_bad_input():
    x = torch.randn(2, 24, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H\*W, C\) = \(B, 20, C\) for the 5x4 grid"):
        vlcore.ops.token_pool_2d(x, (5, 4), stride=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1 \+ H\*W, C\) = \(B, 25, C\)"):
        vlcore.ops.token_pool_2d(x, (6, 4), stride=2, class_token=True)
    with pytest.raises(ValueError, match="give exactly one of output_hw and stride"):
        vlcore.ops.token_pool_2d(x, (6, 4))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        vlcore.ops.token_pool_2d(x, (6, 4), stride=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        vlcore.ops.token_pool_2d(x, (6, 4), stride=2, mode="max")
    with pytest.raises(ValueError, match=r"x must have shape \(B, H\*W, C\)"):
        vlcore.ops.token_pool_2d(x[0], (6, 4), stride=2)
    with pytest.raises(ValueError, match=r"x must have shape \(T, C\) with T = 30"):
        vlcore.ops.token_pool_2d_varlen(x[0], [(6, 4), (2, 3)], stride=2)
    with pytest.raises(ValueError, match="grid_hw must be even"):
        vlcore.ops.patch_merge_2x2(x, (3, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, H\*W, C\) = \(B, 16, C\)"):
        vlcore.ops.patch_merge_2x2(x, (4, 4))
    with pytest.raises(ValueError, match="every grid must be even"):
        vlcore.ops.patch_merge_2x2_varlen(x[0], [(4, 4), (2, 3)])
    # The ops themselves.
    with pytest.raises(ValueError, match=r"vlcore::token_pool_2d: x has 24 rows but the grids hold 20 tokens"):
        torch.ops.vlcore.token_pool_2d(x[0], [5, 4], [2, 2], "avg", False)
    with pytest.raises(ValueError, match=r"vlcore::token_pool_2d: mode must be 'avg' or 'bilinear'"):
        torch.ops.vlcore.token_pool_2d(x[0], [6, 4], [2, 2], "max", False)
    with pytest.raises(ValueError, match=r"vlcore::token_pool_2d: output grids must hold one \(h, w\) pair per image"):
        torch.ops.vlcore.token_pool_2d(x[0], [6, 4], [2, 2, 1, 1], "avg", False)
    with pytest.raises(ValueError, match=r"vlcore::token_pool_2d: x must have shape \(total_tokens, C\)"):
        torch.ops.vlcore.token_pool_2d(x, [6, 4], [2, 2], "avg", False)
    with pytest.raises(ValueError, match=r"vlcore::patch_merge_2x2: grids must be even"):
        torch.ops.vlcore.patch_merge_2x2(x[0], [3, 8])
    with pytest.raises(ValueError, match=r"vlcore::patch_merge_2x2: x has 24 rows but the grids hold 16 tokens"):
        torch.ops.vlcore.patch_merge_2x2(x[0], [4, 4])


def test_zero_channels_and_empty_batches_give_empty_results():
    assert vlcore.ops.token_pool_2d(torch.randn(2, 12, 0), (3, 4), stride=2).shape == (2, 4, 0)
    assert vlcore.ops.patch_merge_2x2(torch.randn(2, 16, 0), (4, 4)).shape == (2, 4, 0)
    assert vlcore.ops.token_pool_2d(torch.randn(0, 12, 3), (3, 4), output_hw=(2, 2)).shape == (0, 4, 3)
    assert vlcore.ops.patch_merge_2x2(torch.randn(0, 16, 3), (4, 4)).shape == (0, 4, 12)
    out, grids = vlcore.ops.token_pool_2d_varlen(torch.randn(0, 3), [], stride=2)
    assert out.shape == (0, 3) and grids == []
    assert vlcore.ops.patch_merge_2x2_varlen(torch.randn(0, 3), []).shape == (0, 12)


def test_grids_take_any_integer_type_and_name_the_rest():
    import numpy as np

    x = torch.randn(12 + 4, 3)
    got, grids = vlcore.ops.token_pool_2d_varlen(x, [(3, 4), (2, 2)], output_hw=(np.int64(2), np.int32(1)))
    want, _ = vlcore.ops.token_pool_2d_varlen(x, [(3, 4), (2, 2)], output_hw=(2, 1))
    assert grids == [(2, 1), (2, 1)] and torch.equal(got, want)
    assert vlcore.ops.token_pool_2d(x[None, :12], (np.int64(3), torch.tensor(4)), stride=2).shape == (1, 4, 3)
    with pytest.raises(ValueError, match=r"grid_hw must be a pair of integers \(h, w\), got \(3.0, 4\)"):
        vlcore.ops.token_pool_2d(x[None, :12], (3.0, 4), stride=2)
    with pytest.raises(ValueError, match="output_hw must be a pair of integers"):
        vlcore.ops.token_pool_2d(x[None, :12], (3, 4), output_hw=(1.5, 2))


def test_varlen_references_are_the_dense_reference_per_image():
    from vlcore.ops.token_grid import patch_merge_2x2_varlen_ref, token_pool_2d_varlen_ref

    grids = [(4, 2), (2, 6)]
    x = torch.randn(8 + 12, 3, dtype=torch.float64)
    got, out_grids = token_pool_2d_varlen_ref(x, grids, stride=2, mode="bilinear")
    assert out_grids == [(2, 1), (1, 3)]
    want = torch.cat([token_pool_2d_ref(x[None, :8], (4, 2), (2, 1), "bilinear")[0],
                      token_pool_2d_ref(x[None, 8:], (2, 6), (1, 3), "bilinear")[0]])
    assert torch.equal(got, want)
    torch.testing.assert_close(vlcore.ops.token_pool_2d_varlen(x, grids, stride=2, mode="bilinear")[0], want)
    assert torch.equal(patch_merge_2x2_varlen_ref(x, grids), vlcore.ops.patch_merge_2x2_varlen(x, grids))
    with pytest.raises(ValueError, match="mode must be one of"):
        token_pool_2d_ref(x[None, :8], (4, 2), (2, 1), "nearest")
