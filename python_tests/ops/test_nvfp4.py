"""nvfp4 family: quantize / dequantize / GEMM / Hadamard against the plain-PyTorch transcription of
docs/nvfp4.md (vlcore.ops.nvfp4.nvfp4_quantize_ref).

Quantization is integer-valued (codes, scale bytes) and the amax is a max: every comparison is exact
(torch.equal), CUDA against CPU too. Only the GEMM has a tolerance: FP32 accumulation order.
"""

import hashlib
import math

import numpy as np
import pytest
import torch
from torch.library import opcheck

import vlcore
from vlcore.ops.nvfp4 import (DEFAULT_SIGN_MASK, NVFP4Tensor, hadamard_matrix, hadamard_transform_ref,
                              nvfp4_dequantize_ref, nvfp4_gemm_ref, nvfp4_quantize_ref, philox4x32_10_ref,
                              swizzle_scales_ref)

from ..conftest import DEVICES

ops = vlcore.ops

# Quantize configurations of the recipe and around it (keyword arguments of nvfp4_quantize).
CONFIGS = {
    "row": dict(),
    "row+col": dict(columnwise=True),
    "col_only": dict(rowwise=False, columnwise=True),
    "activation": dict(columnwise=True, rht_columnwise=True),               # X: rowwise RNE, columnwise RHT
    "gradient": dict(columnwise=True, rht_columnwise=True, stochastic=True, seed=1234, offset=7),  # dY
    "weight_2d": dict(columnwise=True, block_2d=True),                        # W: 16x16, both orientations
    "row_rht_sr": dict(rht_rowwise=True, stochastic=True, seed=2**40 + 3, offset=2**33 + 1),
    "swizzled": dict(columnwise=True, swizzle_scales=True),
}
SHAPES = [(16, 16), (1, 32), (48, 80), (130, 208), (0, 16), (32, 0)]


def wide_range(shape, dtype, device, seed=0):
    """Gaussian rows spread over ~12 decades, with a few large outliers: many distinct block scales,
    subnormal E4M3 scales and underflowing blocks all occur."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x *= torch.logspace(-6, 6, max(rows, 1), dtype=torch.float64)[:rows, None] ** 0.5
    x *= torch.logspace(-3, 3, max(cols, 1), dtype=torch.float64)[None, :cols] ** 0.5
    if x.numel():
        idx = torch.randint(0, x.numel(), (max(1, x.numel() // 500),), generator=g)
        x.view(-1)[idx] *= 50.0
    return x.to(dtype).to(device)


def fits(shape, cfg):
    rows, cols = shape
    if cfg.get("rowwise", True) and cols % 16:
        return False
    if (cfg.get("columnwise") or cfg.get("block_2d")) and rows % 16:
        return False
    if cfg.get("block_2d") and (rows % 16 or cols % 16):
        return False
    return True


def assert_same_quantized(got, want):
    for orient in ("rowwise", "columnwise"):
        g, w = getattr(got, orient), getattr(want, orient)
        assert (g is None) == (w is None), orient
        if g is None:
            continue
        assert g.swizzled == w.swizzled, orient
        for field in ("codes", "scales", "amax"):
            a, b = getattr(g, field).cpu(), getattr(w, field).cpu()
            assert a.shape == b.shape and a.dtype == b.dtype, (orient, field, a.shape, b.shape)
            if field == "amax":
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (orient, a, b)
            else:
                mismatches = int((a != b).sum())
                assert mismatches == 0, f"{orient} {field}: {mismatches} of {a.numel()} differ"


# ---------------------------------------------------------------------------------------------------------
# Bit-exactness


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_quantize_worked_example(device):
    # docs/nvfp4.md, 'Worked example': one block, tensor amax 10 (given as the global amax).
    x = torch.tensor([[0.125, -0.25, 0.375, 1.0, -1.3125, 2.25, 0, -0.046875, 3.0, -2.875, 0.625, 0.75, -4.0,
                       1.625, 0.875, 4.75]], device=device)
    for dtype in (torch.float32, torch.bfloat16):
        q = ops.nvfp4_quantize(x.to(dtype), amax_rowwise=torch.tensor(10.0, device=device)).rowwise
        assert bytes(q.codes.cpu()[0].tolist()).hex(" ") == "90 31 5b 80 e6 22 4f 72"
        assert q.scales.cpu().tolist() == [[0x75]] and q.scales_e4m3().float().item() == 208.0
        assert q.amax.item() == 10.0
        decoded = q.dequantize().cpu()[0]
        factor = 208 * 10 / 2688
        want = torch.tensor([0, -0.5, 0.5, 1.5, -1.5, 3, 0, 0, 4, -4, 1, 1, -6, 2, 1, 6]) * factor
        torch.testing.assert_close(decoded, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_nvfp4_quantize_matches_transcription(device, dtype, shape, config, poisoned):
    cfg = CONFIGS[config]
    if not fits(shape, cfg):
        pytest.skip("shape not quantizable along the requested axis")
    x = wide_range(shape, dtype, device)
    got = ops.nvfp4_quantize(x, **cfg)
    assert_same_quantized(got, nvfp4_quantize_ref(x.cpu(), **cfg))
    if device != "cpu":  # CUDA kernels against the CPU kernels, bit for bit
        assert_same_quantized(got, ops.nvfp4_quantize(x.cpu(), **cfg))


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_quantize_noncontiguous_and_given_amax(device):
    x = wide_range((64, 96), torch.bfloat16, device).t()  # (96, 64), transposed strides
    amax = torch.tensor(3.0e3, device=device)
    cfg = dict(columnwise=True, rht_columnwise=True, amax_rowwise=amax, amax_columnwise=amax * 2)
    got = ops.nvfp4_quantize(x, **cfg)
    ref_cfg = dict(cfg, amax_rowwise=amax.cpu(), amax_columnwise=amax.cpu() * 2)
    assert_same_quantized(got, nvfp4_quantize_ref(x.cpu(), **ref_cfg))
    assert got.rowwise.amax.item() == 3.0e3 and got.columnwise.amax.item() == 6.0e3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_dequantize_matches_transcription(device, dtype, poisoned):
    x = wide_range((48, 64), torch.float32, device)
    q = ops.nvfp4_quantize(x, columnwise=True, rht_columnwise=True)
    for t in (q.rowwise, q.columnwise):
        got = ops.nvfp4_dequantize(t, dtype)
        assert got.dtype == dtype and got.shape == t.shape
        want = nvfp4_dequantize_ref(t.to("cpu"), dtype)
        assert torch.equal(got.cpu(), want)
    # float8_e4m3fn scales are accepted as well as their uint8 bytes
    t = q.rowwise
    assert torch.equal(ops.nvfp4_dequantize(t._replace(scales=t.scales_e4m3())), ops.nvfp4_dequantize(t))


def sqnr_db(ref, approx):
    return (20 * torch.log10(ref.norm() / (ref - approx).norm())).item()


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_round_trip_quality(device):
    # Gaussian data: quantize-dequantize SQNR around 20 dB for NVFP4 (torchao asserts >= 8 dB).
    x = torch.randn(256, 256, device=device)
    q = ops.nvfp4_quantize(x, columnwise=True)
    assert sqnr_db(x, q.rowwise.dequantize()) > 15
    assert sqnr_db(x.t(), q.columnwise.dequantize()) > 15


# ---------------------------------------------------------------------------------------------------------
# Edge cases (docs/nvfp4.md, 'Edge cases')


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_quantize_edge_cases(device):
    # all zeros: S_enc = 1, every scale 0, every code 0
    q = ops.nvfp4_quantize(torch.zeros(16, 32, device=device), columnwise=True)
    for t in q:
        assert t.amax.item() == 0 and not t.codes.any() and not t.scales.any()
        assert not t.dequantize().any()

    # an underflowing block: amax_b / amax ~ 1e-7 gives scale 0; its elements saturate to +-6, decode to 0
    x = torch.zeros(1, 32, device=device)
    x[0, 0], x[0, 16], x[0, 17] = 1.0e6, 0.1, -0.1
    t = ops.nvfp4_quantize(x).rowwise
    assert t.scales.cpu().tolist() == [[0x7E, 0x00]]  # 448 for the amax block, 0 for the underflowing one
    assert t.codes[0, 8].item() == 0x7 | (0xF << 4)   # +6, -6
    assert t.dequantize()[0, 16:].abs().max().item() == 0.0
    assert_same_quantized(ops.nvfp4_quantize(x), nvfp4_quantize_ref(x.cpu()))

    # Inf: amax = Inf, S_enc = 1, the Inf block's scale saturates to 448, the element to 6; decodes to Inf/NaN
    x = torch.randn(16, 32, device=device)
    x[3, 5] = float("inf")
    t = ops.nvfp4_quantize(x).rowwise
    assert t.amax.item() == float("inf") and t.scales[3, 0].item() == 0x7E
    assert t.codes[3, 2].item() >> 4 == 0x7
    assert not torch.isfinite(t.dequantize()[3, 5])
    assert_same_quantized(ops.nvfp4_quantize(x, columnwise=True), nvfp4_quantize_ref(x.cpu(), columnwise=True))

    # NaN: dropped from the amax (block and tensor), the element itself encodes as +6 (code 0x7)
    x = torch.randn(16, 32, device=device)
    x[2, 4] = float("nan")
    q = ops.nvfp4_quantize(x, columnwise=True, rht_columnwise=False)
    finite_amax = torch.nan_to_num(x, nan=0.0).abs().max()
    assert q.rowwise.amax.item() == finite_amax.item()
    assert q.rowwise.codes[2, 2].item() & 0xF == 0x7
    assert_same_quantized(q, nvfp4_quantize_ref(x.cpu(), columnwise=True))
    for sr in (False, True):  # stochastic rounding: NaN -> +6 too
        q = ops.nvfp4_quantize(x, stochastic=sr, seed=3)
        assert q.rowwise.codes[2, 2].item() & 0xF == 0x7

    # E2M1 ties go to the even code: with amax 2688 (S_enc = 1) and block amax 6 (sb = 1) x is encoded as is
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0])
    q = ops.nvfp4_quantize(ties.reshape(1, 16).to(device), amax_rowwise=torch.tensor(2688.0, device=device)).rowwise
    codes = torch.stack((q.codes.cpu() & 0xF, q.codes.cpu() >> 4), dim=2).reshape(-1).tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 15]

    # negative values that round to zero keep the sign: code 0x8
    x = torch.full((1, 16), -0.01, device=device)
    x[0, 0] = 6.0
    assert ops.nvfp4_quantize(x).rowwise.codes[0, 1:].unique().tolist() == [0x88]


def test_nvfp4_e4m3_scale_rounding_matches_torch_cast():
    # The C++ E4M3 conversion (bit manipulation) against torch's float8 cast, over every binade and tie,
    # through single-block tensors whose block amax is exactly v * 6 / S_enc... simpler: use a fixed global
    # amax of 2688 (S_enc = 1) so that the scale input is amax_b * fl32(1/6).
    vals = torch.cat([torch.logspace(-12, 3.5, 4000, base=2.0) * 6,
                      torch.tensor([0.0, 6 * 2**-10, 6 * 2**-9 * 0.5, 6 * 2**-9 * 1.5, 6 * 448.0, 6 * 464.0, 6 * 500.0])])
    x = torch.zeros(vals.numel(), 16)
    x[:, 0] = vals
    amax = torch.tensor(2688.0)
    got = ops.nvfp4_quantize(x, amax_rowwise=amax).rowwise.scales[:, 0]
    want = (vals * (torch.tensor(1.0) / torch.tensor(6.0))).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_block_scale_product_order(device):
    # sb = e4m3(amax_b * (S_enc * fl32(1/6))) in exactly that order: (amax_b * S_enc) * (1/6) or
    # (amax_b / 6) * S_enc round twice and flip the E4M3 rounding of ~0.1 % of blocks
    # (docs/nvfp4.md, 'Scale computation').
    # Take every BF16 block amax in (0, amax] for a few tensor amaxes and keep the order-sensitive ones.
    f32 = torch.float32
    one_sixth = torch.tensor(1.0) / torch.tensor(6.0)
    blocks, amaxes = [], []
    for amax in (52.0, 11.5, 70.0):
        s_enc = torch.tensor(2688.0) / torch.tensor(amax)
        cand = torch.arange(0x3C00, 0x4400, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(f32)
        cand = cand[(cand > 0) & (cand <= amax)]
        right = (cand * (s_enc * one_sixth)).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
        wrong = ((cand * s_enc) * one_sixth).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
        sensitive = cand[right != wrong]
        assert sensitive.numel() > 0
        blocks.append(sensitive)
        amaxes.append(amax)
    for amax, vals in zip(amaxes, blocks):
        x = torch.zeros(vals.numel(), 16, dtype=torch.bfloat16)
        x[:, 3] = vals
        x[:, 7] = -vals / 3
        x = x.to(device)
        given = torch.tensor(amax, device=device)
        got = ops.nvfp4_quantize(x, amax_rowwise=given)
        assert_same_quantized(got, nvfp4_quantize_ref(x.cpu(), amax_rowwise=given.cpu()))


# ---------------------------------------------------------------------------------------------------------
# 16x16 weights, swizzled scales


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_2d_codes_are_exact_transposes(device):
    w = wide_range((96, 160), torch.bfloat16, device, seed=4)
    q = ops.nvfp4_quantize(w, columnwise=True, block_2d=True)

    def unpack(codes):
        return torch.stack((codes & 0xF, codes >> 4), dim=2).reshape(codes.shape[0], -1)

    assert torch.equal(unpack(q.rowwise.codes).t(), unpack(q.columnwise.codes))
    # one scale per 16x16 tile, replicated over its 16 rows, and the same tiles in both orientations
    s = q.rowwise.scales.reshape(6, 16, 10)
    assert torch.equal(s, s[:, :1].expand_as(s))
    assert torch.equal(q.rowwise.scales[::16], q.columnwise.scales[::16].t())
    assert torch.equal(q.rowwise.amax, q.columnwise.amax)


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_swizzled_scale_layout(device):
    x = wide_range((272, 80), torch.float32, device)  # 272 rows: 3 row tiles of 128, 5 scale columns
    plain = ops.nvfp4_quantize(x, columnwise=True)
    swz = ops.nvfp4_quantize(x, columnwise=True, swizzle_scales=True)
    assert swz.rowwise.scales.shape == (384, 8) and swz.columnwise.scales.shape == (128, 20)
    for p, s in zip(plain, swz):
        assert torch.equal(p.codes, s.codes)
        assert torch.equal(swizzle_scales_ref(p.scales.cpu()), s.scales.cpu())
    # the index formula of docs/nvfp4.md, 'Swizzled scale layout', element by element
    flat, sp = swz.rowwise.scales.cpu().reshape(-1), plain.rowwise.scales.cpu()
    for i, j in [(0, 0), (1, 0), (31, 3), (32, 0), (127, 4), (128, 1), (200, 4), (271, 2)]:
        idx = ((i // 128) * 2 + j // 4) * 512 + (i % 128 % 32) * 16 + (i % 128 // 32) * 4 + j % 4
        assert flat[idx] == sp[i, j]
    assert swz.rowwise.swizzled and not plain.rowwise.swizzled
    for p, s in zip(plain, swz):
        assert torch.equal(s.plain_scales(), p.scales)
        assert torch.equal(s.dequantize(), p.dequantize())


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_swizzled_scales_with_the_plain_shape(device):
    # 128 rows and 64 columns: the swizzled scales have the plain shape (128, 4), so only the recorded
    # layout tells them apart. Dequantize and GEMM must read them as swizzled, not as row-major bytes.
    x = wide_range((128, 64), torch.float32, device, seed=5)
    w = wide_range((32, 64), torch.bfloat16, device, seed=6)
    plain, swz = ops.nvfp4_quantize(x).rowwise, ops.nvfp4_quantize(x, swizzle_scales=True).rowwise
    assert swz.swizzled and swz.scales.shape == plain.scales.shape == (128, 4)
    assert not torch.equal(swz.scales, plain.scales)  # the bytes are permuted: reading them row-major is wrong
    assert torch.equal(swz.dequantize(), plain.dequantize())
    assert torch.equal(ops.nvfp4_dequantize(swz, torch.bfloat16), ops.nvfp4_dequantize(plain, torch.bfloat16))
    wq = ops.nvfp4_quantize(w).rowwise
    wq_swz = ops.nvfp4_quantize(w, swizzle_scales=True).rowwise  # (32, 4) plain, (128, 4) swizzled
    want = ops.nvfp4_gemm(plain, wq, out_dtype=torch.float32)
    assert torch.equal(ops.nvfp4_gemm(swz, wq, out_dtype=torch.float32), want)
    assert torch.equal(ops.nvfp4_gemm(swz, wq_swz, out_dtype=torch.float32), want)
    assert torch.equal(ops.nvfp4_gemm(wq_swz, swz, out_dtype=torch.float32), want.t())
    assert torch.equal(nvfp4_dequantize_ref(swz.to("cpu")), plain.dequantize().cpu())
    # swizzled scales of the wrong shape: a clear error, not an out-of-range read
    with pytest.raises(ValueError, match=r"swizzled scales .* must have shape \(128, 4\)"):
        swz._replace(scales=swz.scales[:64]).dequantize()


# ---------------------------------------------------------------------------------------------------------
# Random Hadamard transform


def test_hadamard_matrix_is_orthogonal():
    r = hadamard_matrix()
    torch.testing.assert_close(r @ r.t(), torch.eye(16, dtype=torch.float64), rtol=0, atol=0)
    signs = [1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1]  # TE's get_wgrad_sign_vector
    h = r * 4 / torch.tensor(signs, dtype=torch.float64)[:, None]
    assert torch.equal(h @ h.t(), 16 * torch.eye(16, dtype=torch.float64))
    assert torch.equal(r.to(torch.bfloat16).double(), r)  # +-0.25: exact in BF16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_hadamard_transform_matches_matrix_and_inverts(device, dtype, poisoned):
    x = torch.randn(5, 3, 48, dtype=torch.float64, device=device).to(dtype)
    r = hadamard_matrix(device=device)
    y = ops.hadamard_transform(x)
    want = (x.double().reshape(-1, 16) @ r).reshape(x.shape)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    assert torch.equal(y, hadamard_transform_ref(x))  # the butterfly order, bit for bit
    back = ops.hadamard_transform(y.double() if dtype == torch.bfloat16 else y, inverse=True)
    torch.testing.assert_close(back.double(), y.double().reshape(-1, 16).matmul(r.t()).reshape(x.shape),
                               rtol=tol, atol=tol)
    if dtype != torch.bfloat16:
        torch.testing.assert_close(back, x, rtol=tol, atol=tol)
    custom = ops.hadamard_transform(x, sign_mask=0)
    torch.testing.assert_close(custom.double(), (x.double().reshape(-1, 16) @ hadamard_matrix(0, device=device))
                               .reshape(x.shape), rtol=tol, atol=tol)


def test_hadamard_transform_gradcheck():
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.hadamard_transform(t), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.hadamard_transform(t, inverse=True, sign_mask=0x1234), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_rht_cancels_in_the_wgrad_product(device):
    # dW = dY^T X = (dY^T R)(X^T R)^T: transforming both operands along the reduction axis preserves it.
    dy, x = torch.randn(64, 32, device=device, dtype=torch.float64), torch.randn(64, 48, device=device, dtype=torch.float64)
    a, b = ops.hadamard_transform(dy.t().contiguous()), ops.hadamard_transform(x.t().contiguous())
    torch.testing.assert_close(a @ b.t(), dy.t() @ x)


# ---------------------------------------------------------------------------------------------------------
# Stochastic rounding


def test_philox_known_answers():
    # Random123 kat_vectors for philox4x32_10; the C++ Philox is checked through the SR codes above.
    def run(ctr, key):
        return [int(w) for w in philox4x32_10_ref([torch.tensor([c]) for c in ctr], key)]

    assert run([0, 0, 0, 0], (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_stochastic_rounding(device):
    x = torch.randn(64, 64, device=device)
    amax = x.abs().max()

    def draw(seed, offset):
        return ops.nvfp4_quantize(x, stochastic=True, seed=seed, offset=offset, amax_rowwise=amax).rowwise

    a, b = draw(1, 0), draw(1, 1)
    assert torch.equal(a.codes, draw(1, 0).codes)            # same seed and offset: same bits
    assert not torch.equal(a.codes, b.codes)                 # a fresh offset: a different draw
    assert not torch.equal(a.codes, draw(2, 0).codes)        # another seed too
    assert torch.equal(a.scales, b.scales) and torch.equal(a.amax, b.amax)  # scales stay deterministic (RNE)
    rne = ops.nvfp4_quantize(x, amax_rowwise=amax).rowwise.dequantize()
    mean = torch.stack([draw(7, k).dequantize() for k in range(64)]).mean(0)
    # unbiased: the mean of 64 draws is much closer to x than the RNE result (TE's SR test criterion)
    rmse_mean, rmse_rne = (mean - x).pow(2).mean().sqrt(), (rne - x).pow(2).mean().sqrt()
    assert rmse_mean < 0.5 * rmse_rne, (rmse_mean, rmse_rne)


def sr_block_input(rows, fractions):
    """Blocks whose scaled values are exactly 1 + f * 0.5 (between E2M1 1.0 and 1.5, step 0.5): element 0 is
    6 (block amax 6 with a given amax of 2688: S_enc = 1, scale 1, enc_b = 1), elements 1..15 carry the
    fractions. Returns x and the given amax."""
    x = torch.empty(rows, 16)
    x[:, 0] = 6.0
    x[:, 1:] = 1.0 + 0.5 * torch.tensor(fractions, dtype=torch.float32)
    return x, torch.tensor(2688.0)


def test_nvfp4_stochastic_rounding_is_unbiased_at_byte_resolution():
    # One byte per element: u = r/256 with r uniform on 0..255, so a value at fraction f of its step rounds
    # up with probability floor(256 f) / 256: exactly f on the 1/256 grid (unbiased), and never more than
    # 1/256 of a step below f elsewhere (8 random bits per element, as the hardware cvt.rs conversion uses).
    fractions = [1 / 256, 77 / 256, 0.5, 255 / 256, 0.3, 0.7, 0.9, 0.1, 0.25, 0.01, 0.6, 0.45, 0.8, 0.99, 0.05]
    rows = 1 << 15  # 32768 draws per element position
    x, amax = sr_block_input(rows, fractions)
    codes = ops.nvfp4_quantize(x, stochastic=True, seed=2024, offset=5, amax_rowwise=amax).rowwise.codes
    nibbles = torch.stack((codes & 0xF, codes >> 4), dim=2).reshape(rows, 16)[:, 1:]
    assert ((nibbles == 2) | (nibbles == 3)).all()  # only the two neighbours 1.0 (code 2) and 1.5 (code 3)
    up = (nibbles == 3).double()
    for i, f in enumerate(fractions):
        want = math.floor(256 * f) / 256
        sigma = math.sqrt(max(want * (1 - want), 1 / rows) / rows)
        assert abs(up[:, i].mean().item() - want) < 5 * sigma, (i, f, up[:, i].mean().item(), want)
    # The 16 bytes of a draw are independent: no correlation between the elements of a block.
    centred = up - up.mean(0)
    corr = (centred.t() @ centred) / (centred.pow(2).sum(0).sqrt()[:, None] * centred.pow(2).sum(0).sqrt()[None, :])
    off_diagonal = corr[~torch.eye(15, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / math.sqrt(rows), off_diagonal.abs().max().item()


def test_nvfp4_stochastic_rounding_one_draw_per_block():
    # The stream of the op is the reference's: block b of a copy takes Philox(counter = (b, orientation,
    # offset), key = seed) and element i byte i % 4 of word i // 4. Check against the Philox reference
    # directly, through values whose rounding reveals the byte: fraction 255/256 rounds up unless r == 0.
    rows = 4096
    x, amax = sr_block_input(rows, [255 / 256] * 15)
    seed, offset = 2**33 + 9, 2**32 + 3
    codes = ops.nvfp4_quantize(x, stochastic=True, seed=seed, offset=offset, amax_rowwise=amax).rowwise.codes
    down = (torch.stack((codes & 0xF, codes >> 4), dim=2).reshape(rows, 16) == 2)[:, 1:]
    blocks = torch.arange(rows, dtype=torch.int64)
    ctr = [blocks, torch.zeros_like(blocks), torch.full_like(blocks, offset & 0xFFFFFFFF),
           torch.full_like(blocks, offset >> 32)]
    words = torch.stack(philox4x32_10_ref(ctr, (seed & 0xFFFFFFFF, seed >> 32)), dim=1)
    rbytes = torch.stack([(words[:, i // 4] >> (8 * (i % 4))) & 0xFF for i in range(16)], dim=1)[:, 1:]
    assert down.any()  # about 15 * 4096 / 256 elements draw r == 0
    assert torch.equal(down, rbytes == 0)


def test_nvfp4_stochastic_rounding_probability():
    # §1.7: 1.2923 lies between 1.0 and 1.5 and rounds up with probability ~0.585.
    x = torch.full((1024, 16), 0.125)
    x[:, 0] = 4.75  # block amax: with tensor amax 10, sb = 208 and enc_b = 268.8 / 208
    x[:, 1] = 1.0   # scaled: 1.2923
    amax = torch.tensor(10.0)
    codes = ops.nvfp4_quantize(x, stochastic=True, seed=11, amax_rowwise=amax).rowwise.codes
    up = ((codes[:, 0] >> 4) == 0x3).double().mean().item()  # element 1: 1.5 (code 3) vs 1.0 (code 2)
    assert abs(up - 0.585) < 0.05


def test_nvfp4_fp32_reciprocal_equals_double_formula():
    # S_dec = 1 / S_enc in FP32 (the kernels) against TE's fl32(1 / (double) S_enc): equal for every float
    # (the C++ comment gives the argument; checked exhaustively once over all 2^31 positive floats). Here:
    # 2^22 random bit patterns plus the edges, with numpy's IEEE float32 division (what the CPU path does).
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(1, 0x7F800000, 1 << 22, dtype=np.uint32),
                           np.array([1, 2, 0x007FFFFF, 0x00800000, 0x3F800000, 0x7F7FFFFF, 0x45280000], np.uint32)])
    s = bits.view(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        fp32 = (np.float32(1.0) / s).view(np.uint32)
        fp64 = (1.0 / s.astype(np.float64)).astype(np.float32).view(np.uint32)
    assert (fp32 == fp64).all()
    # and through the op: given amaxes spread over the float range, against the reference's double formula
    amaxes = torch.from_numpy(rng.integers(0x00800000, 0x7F000000, 512, dtype=np.uint32).view(np.float32).copy())
    x = wide_range((16, 32), torch.float32, "cpu", seed=4)
    for amax in amaxes:
        cfg = dict(columnwise=True, amax_rowwise=amax, amax_columnwise=amax)
        assert_same_quantized(ops.nvfp4_quantize(x, validate=False, **cfg), nvfp4_quantize_ref(x, **cfg))


def hashed_input(rows, cols, dtype):
    """Deterministic wide-range values from integer hashing (no RNG): signs, 2^-20..2^11, some zeros."""
    i = torch.arange(rows * cols, dtype=torch.int64)
    h = (i * 2654435761 + 97) & 0xFFFFFFFF
    h = (h ^ (h >> 15)) * 2246822519 & 0xFFFFFFFF
    mant = (h & 0xFFFF).double() / 65536 + 0.5
    expo = ((h >> 16) & 31).double() - 20
    sign = 1 - 2 * ((h >> 21) & 1).double()
    x = sign * mant * torch.pow(2.0, expo)
    x[(h >> 22) % 97 == 0] = 0.0
    return x.reshape(rows, cols).to(dtype)


# Round-to-nearest configurations and the digest of their codes, scales and amax, recorded from the kernels
# before the stochastic-rounding stream and the FP32 S_dec changed: RNE output must never change.
RNE_DIGEST_CASES = [((64, 64), {}), ((48, 80), {"columnwise": True}), ((130, 208), {}),
                    ((96, 128), {"columnwise": True, "rht_columnwise": True}),
                    ((64, 96), {"columnwise": True, "block_2d": True}),
                    ((128, 64), {"rht_rowwise": True, "columnwise": True, "swizzle_scales": True}),
                    ((32, 48), {"rowwise": False, "columnwise": True}),
                    ((64, 64), {"columnwise": True, "amax_rowwise": 3000.0, "amax_columnwise": 0.5})]
RNE_DIGEST = "7d67325399ccd7a1e4b966b93cdad4a8f2a5636f01ea62b7afb6862ffa86b3a7"


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_round_to_nearest_output_is_frozen(device):
    h = hashlib.sha256()
    for dtype in (torch.float32, torch.bfloat16):
        for shape, cfg in RNE_DIGEST_CASES:
            cfg = {k: (torch.tensor(v, device=device) if k.startswith("amax") else v) for k, v in cfg.items()}
            q = ops.nvfp4_quantize(hashed_input(*shape, dtype).to(device), **cfg)
            for t in (q.rowwise, q.columnwise):
                if t is not None:
                    for f in (t.codes, t.scales, t.amax.reshape(1).view(torch.uint8)):
                        h.update(f.cpu().contiguous().numpy().tobytes())
    assert h.hexdigest() == RNE_DIGEST


def test_nvfp4_dequantize_every_code_and_scale_byte():
    # All 256 code bytes against all 256 scale bytes (E4M3 NaN bytes included): the CPU decode (the block
    # decode the CUDA GEMM shares) against the reference's table lookup, bit for bit, NaN for NaN.
    codes = torch.arange(256, dtype=torch.uint8).repeat(256, 1)               # [256, 256]: 512 elements a row
    scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 32)      # row r: scale byte r
    t = NVFP4Tensor(codes, scales, torch.tensor(2688.0))                      # decode factor 1
    got, want = ops.nvfp4_dequantize(t), nvfp4_dequantize_ref(t)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got).view(torch.int32), torch.nan_to_num(want).view(torch.int32))


# ---------------------------------------------------------------------------------------------------------
# GEMM


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mnk", [(16, 16, 16), (48, 32, 80), (144, 272, 48), (16, 16, 528)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_gemm_matches_dequantized_float64(device, mnk, out_dtype, poisoned):
    m, n, k = mnk
    a = ops.nvfp4_quantize(wide_range((m, k), torch.bfloat16, device, seed=1)).rowwise
    b = ops.nvfp4_quantize(torch.randn(n, k, device=device)).rowwise
    got = ops.nvfp4_gemm(a, b, out_dtype=out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype
    want = nvfp4_gemm_ref(a.to("cpu"), b.to("cpu"))
    # Every product of decoded values is exact in FP32; the FP32 sum (a BLAS sgemm on CPU, tensor cores
    # on CUDA, which add inside each mma with truncation, not RNE) errs by at most ~1 ulp per product.
    scale = (nvfp4_gemm_ref(*(NVFP4Tensor(t.codes.cpu() & 0x77, t.scales.cpu(), t.amax.cpu()) for t in (a, b))))
    ulps = 2 * (k + 16)
    bound = scale.abs() * ulps * 2**-24 + (2**-8 * want.abs() if out_dtype == torch.bfloat16 else 0)
    err = (got.cpu().double() - want).abs()
    assert (err <= bound + 1e-30).all(), err.max()


def test_nvfp4_gemm_cpu_is_exact_decode_then_fp32_matmul():
    # The CPU GEMM has the structure of the CUDA one: exact decode (e2m1 x sb, no tensor factor), one FP32
    # matmul, then alpha. The decode is checked against the independent table lookup of the reference.
    a = ops.nvfp4_quantize(wide_range((128, 528), torch.bfloat16, "cpu", seed=2)).rowwise
    b = ops.nvfp4_quantize(torch.randn(96, 528)).rowwise
    unit = lambda t: t._replace(amax=torch.tensor(2688.0))  # noqa: E731 - decode factor 1
    da, db = nvfp4_dequantize_ref(unit(a)), nvfp4_dequantize_ref(unit(b))
    alpha = a.amax * b.amax / (2688.0 * 2688.0)
    assert torch.equal(ops.nvfp4_gemm(a, b, out_dtype=torch.float32), torch.mm(da, db.t()) * alpha)


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_gemm_sqnr(device, record_property):
    # SQNR of the NVFP4 product against the unquantized bf16 product (float64 matmul), with and without RHT
    # along K. Gaussian operands; torchao asserts >= 16 dB for an NVFP4 matmul.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(256, 512, generator=g).to(torch.bfloat16).to(device)
    b = torch.randn(128, 512, generator=g).to(torch.bfloat16).to(device)
    exact = a.double() @ b.double().t()
    plain = ops.nvfp4_gemm(ops.nvfp4_quantize(a).rowwise, ops.nvfp4_quantize(b).rowwise, out_dtype=torch.float32)
    rht = ops.nvfp4_gemm(ops.nvfp4_quantize(a, rht_rowwise=True).rowwise, ops.nvfp4_quantize(b, rht_rowwise=True).rowwise,
                         out_dtype=torch.float32)
    s_plain, s_rht = sqnr_db(exact, plain.double()), sqnr_db(exact, rht.double())
    record_property("sqnr_db_plain", s_plain)
    record_property("sqnr_db_rht", s_rht)
    print(f"NVFP4 GEMM SQNR vs bf16 product: {s_plain:.2f} dB plain, {s_rht:.2f} dB with RHT along K")
    assert s_plain > 16 and s_rht > 16


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_gemm_zero_tensor(device):
    z = ops.nvfp4_quantize(torch.zeros(32, 64, device=device)).rowwise
    b = ops.nvfp4_quantize(torch.randn(16, 64, device=device)).rowwise
    assert not ops.nvfp4_gemm(z, b, out_dtype=torch.float32).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_gemm_empty_k_is_zero(device, out_dtype, poisoned):
    # K == 0 is an empty sum: zeros on every backend, even when an amax is Inf or NaN (alpha not applied).
    for amax in (1.0, float("inf"), float("nan")):
        a = ops.nvfp4_quantize(torch.zeros(32, 0, device=device), amax_rowwise=torch.tensor(amax, device=device),
                               validate=False).rowwise
        b = ops.nvfp4_quantize(torch.zeros(16, 0, device=device)).rowwise
        assert a.codes.shape == (32, 0) and a.amax.isnan().item() == (amax != amax)
        got = ops.nvfp4_gemm(a, b, out_dtype=out_dtype)
        assert got.shape == (32, 16) and got.dtype == out_dtype
        assert torch.equal(got.cpu(), torch.zeros(32, 16, dtype=out_dtype)), amax


# ---------------------------------------------------------------------------------------------------------
# Registration: opcheck (with non-contiguous samples), compile, bad input


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_opcheck(device):
    x = torch.randn(64, 48, device=device, dtype=torch.bfloat16).t()  # non-contiguous (48, 64)
    amax = torch.tensor(5.0, device=device)
    for args in [(x, True, True, False, False, True, True, 3, 4, None, None, False),
                 (x, True, True, True, False, False, False, 0, 0, None, amax, True),
                 (x.float().contiguous(), False, True, False, False, False, False, 0, 0, None, None, False)]:
        opcheck(torch.ops.vlcore.nvfp4_quantize.default, args)
    q = ops.nvfp4_quantize(torch.randn(32, 64, device=device), columnwise=True)
    r = q.rowwise
    opcheck(torch.ops.vlcore.nvfp4_dequantize.default, (r.codes, r.scales, r.amax, torch.bfloat16))
    nc_codes = q.rowwise.codes.t().contiguous().t()  # same values, column-major strides
    opcheck(torch.ops.vlcore.nvfp4_dequantize.default, (nc_codes, q.rowwise.scales, q.rowwise.amax, torch.float32))
    opcheck(torch.ops.vlcore.nvfp4_gemm.default, (r.codes, r.scales, r.amax, nc_codes, q.rowwise.scales, q.rowwise.amax, torch.float32))
    h = torch.randn(4, 64, device=device, dtype=torch.float64).t().contiguous().t()
    opcheck(torch.ops.vlcore.hadamard_transform.default, (h, False, DEFAULT_SIGN_MASK))
    opcheck(torch.ops.vlcore.hadamard_transform.default, (h.float(), True, 0))


def test_nvfp4_compiles_fullgraph():
    def f(x, w):
        xq = ops.nvfp4_quantize(x, columnwise=True, rht_columnwise=True)
        wq = ops.nvfp4_quantize(w, block_2d=True, swizzle_scales=True)  # unswizzled in the traced graph
        y = ops.nvfp4_gemm(xq.rowwise, wq.rowwise, out_dtype=torch.float32)
        return y + ops.nvfp4_dequantize(xq.columnwise).sum() + ops.hadamard_transform(x.float()).sum()

    x, w = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(16, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, w), f(x, w))
    h = torch.randn(2, 32, requires_grad=True)
    out = torch.compile(lambda t: ops.hadamard_transform(t).pow(2).sum(), backend="aot_eager", fullgraph=True)(h)
    out.backward()
    torch.testing.assert_close(h.grad, 2 * h.detach())  # orthogonal: |xR|^2 = |x|^2


@pytest.mark.parametrize("device", DEVICES)
def test_nvfp4_bad_input(device):
    x = torch.randn(32, 64, device=device)
    with pytest.raises(ValueError, match="x must be bfloat16 or float32"):
        ops.nvfp4_quantize(x.double())
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.nvfp4_quantize(x.reshape(2, 16, 64))
    with pytest.raises(ValueError, match="rowwise quantization needs cols % 16 == 0"):
        ops.nvfp4_quantize(x[:, :40])
    with pytest.raises(ValueError, match="columnwise quantization needs rows % 16 == 0"):
        ops.nvfp4_quantize(x[:20], rowwise=False, columnwise=True)
    with pytest.raises(ValueError, match="block_2d=True cannot be combined with rht_rowwise / rht_columnwise"):
        ops.nvfp4_quantize(x, columnwise=True, block_2d=True, rht_columnwise=True)
    with pytest.raises(ValueError, match="block_2d=True cannot be combined with rht_rowwise / rht_columnwise"):
        ops.nvfp4_quantize(x, block_2d=True, rht_rowwise=True)
    with pytest.raises(ValueError, match="amax_rowwise must be float32"):
        ops.nvfp4_quantize(x, amax_rowwise=torch.tensor(1.0, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="at least one of rowwise"):
        ops.nvfp4_quantize(x, rowwise=False)
    a = ops.nvfp4_quantize(x).rowwise
    with pytest.raises(ValueError, match="same K"):
        ops.nvfp4_gemm(a, ops.nvfp4_quantize(torch.randn(16, 32, device=device)).rowwise)
    with pytest.raises(ValueError, match="M and N must be multiples of 16"):
        ops.nvfp4_gemm(a, ops.nvfp4_quantize(torch.randn(8, 64, device=device)).rowwise)
    with pytest.raises(ValueError, match="scales must have shape"):
        ops.nvfp4_dequantize(a._replace(scales=a.scales[:, :2]))
    with pytest.raises(ValueError, match="codes must be uint8"):
        ops.nvfp4_dequantize(a._replace(codes=a.codes.int()))
    with pytest.raises(ValueError, match="out_dtype must be float32 or bfloat16"):
        ops.nvfp4_gemm(a, a, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.hadamard_transform(torch.randn(3, 20, device=device))
    with pytest.raises(ValueError, match="sign_mask"):
        ops.hadamard_transform(x, sign_mask=1 << 16)
    with pytest.raises(ValueError, match="t must be an NVFP4Tensor"):
        ops.nvfp4_dequantize(a.codes)
    with pytest.raises(ValueError, match="b must be an NVFP4Tensor"):
        ops.nvfp4_gemm(a, a.codes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [math.nan, -1.0, 0.0])
def test_nvfp4_given_amax_values(device, value):
    x = torch.randn(32, 64, device=device)
    amax = torch.tensor(value, device=device)
    for name in ("amax_rowwise", "amax_columnwise"):
        with pytest.raises(ValueError, match=name):
            ops.nvfp4_quantize(x, columnwise=True, validate=True, **{name: amax})
    if device == "cpu":  # checked by default where it needs no synchronisation
        with pytest.raises(ValueError, match="amax_rowwise"):
            ops.nvfp4_quantize(x, amax_rowwise=amax)
    # zero is the amax of an all-zero x
    z = ops.nvfp4_quantize(torch.zeros(32, 64, device=device), amax_rowwise=torch.zeros((), device=device),
                           validate=True).rowwise
    assert not z.codes.any() and not z.scales.any()
    # Unchecked (the CUDA default): a NaN or negative amax gives NaN scales, so the copy decodes to NaN.
    q = ops.nvfp4_quantize(x, columnwise=True, amax_rowwise=amax, amax_columnwise=amax, validate=False)
    ref = nvfp4_quantize_ref(x.cpu(), columnwise=True, amax_rowwise=amax.cpu(), amax_columnwise=amax.cpu())
    assert_same_quantized(q, ref)
    if value != 0.0:
        for t in q:
            assert (t.scales == 0x7F).all() and t.dequantize().isnan().all()


@pytest.mark.parametrize("rows, cols", [(0, 16), (16, 0), (0, 0)])
def test_nvfp4_references_on_empty_operands(rows, cols):
    """The references decode an empty operand to an empty matrix of the right shape (no ambiguous reshape)."""
    q = ops.nvfp4_quantize(torch.randn(rows, cols)).rowwise
    assert nvfp4_dequantize_ref(q).shape == (rows, cols)
    assert nvfp4_gemm_ref(q, q).shape == (rows, rows)
