"""NVFP4 ops: quantize (with optional 16-point random Hadamard transform and stochastic rounding),
dequantize, the NVFP4 GEMM, and the Hadamard transform alone.

The arithmetic is docs/nvfp4.md, 'Scale computation' (TransformerEngine's default path, bit for
bit): for a tensor ``x`` with ``amax = max|x|``,

- ``S_enc = fminf(2688 / amax, FLT_MAX)`` (1 when ``amax`` is 0 or Inf), ``S_dec = 1 / S_enc``;
- per block of 16 (1x16 along the quantized axis, or a 16x16 tile for weights): the E4M3 scale
  ``sb = e4m3_rne_satfinite(amax_b * (S_enc * fl32(1/6)))``, then ``enc_b = fminf(1 / (sb * S_dec), FLT_MAX)``;
- per element: ``q = e2m1(x * enc_b)``, round-to-nearest-even with saturation to ±6, or stochastic.

Layouts (docs/nvfp4.md, 'Packing', 'Swizzled scale layout'): codes are uint8 ``[R, C/2]`` with the even element in the low nibble; scales are the E4M3
bytes as uint8 ``[R, C/16]`` (view them with :func:`NVFP4Tensor.scales_e4m3`), or the swizzled 128x4 layout
padded to ``[roundup(R, 128), roundup(C/16, 4)]``; amax is a 0-d float32 tensor. The columnwise copy is
stored transposed: it quantizes ``x^T`` (``[C, R]``, blocks of 16 along ``R``). The two scale layouts can
have the same shape (``R % 128 == 0`` and ``C % 64 == 0``), so :class:`NVFP4Tensor` records which one it
holds (``swizzled``) and :func:`nvfp4_dequantize` / :func:`nvfp4_gemm` read them accordingly; the raw
``torch.ops.vlcore`` ops take row-major scales only.

Documented edge cases: an all-zero tensor gives zero scales and codes; a block whose scale underflows
E4M3 gets scale 0 (its elements saturate to ±6 but decode to 0); NaN elements are dropped from the amax
and encode as +6; an Inf makes the amax Inf, so S_enc = 1 and the tensor decodes to Inf/NaN. Negative
values that round to zero keep their sign (code 0x8). A *given* amax that is NaN or negative is not an
amax: the op sets S_enc to NaN, so every scale of that copy is the E4M3 NaN byte 0x7F and the copy
dequantizes (and multiplies) to NaN instead of to silently wrong values; :func:`nvfp4_quantize` raises a
ValueError for it (and for a zero amax of a nonzero ``x``) where checking is free (CPU) or asked for.

Stochastic-rounding stream (docs/nvfp4.md, 'Stochastic rounding stream'): one Philox4x32-10 draw per
16-element block, keyed by ``seed``, counter (block index, orientation, ``offset``) where the block index
is the flat element index / 16 in that copy's row-major output; element ``i`` of the block takes byte
``i % 4`` of word ``i // 4`` (8 random bits per element, the resolution of the hardware ``cvt.rs``
conversion). Reproducible, independent per element, identical on CPU and CUDA. RHT: ``chunk · diag(s) H16 / 4`` along the quantized axis with TE's fixed signs (mask 0xD7E8), FP32
sums in butterfly order, rounded to BF16; the amax is taken after the transform.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

__all__ = [
    "NVFP4Tensor", "NVFP4Quantized", "DEFAULT_SIGN_MASK", "nvfp4_quantize", "nvfp4_dequantize", "nvfp4_gemm",
    "hadamard_transform", "hadamard_matrix", "nvfp4_quantize_ref", "nvfp4_dequantize_ref", "nvfp4_gemm_ref",
    "hadamard_transform_ref", "philox4x32_10_ref", "swizzle_scales_ref", "unswizzle_scales",
]

#: TE's wgrad RHT sign vector [1,1,1,-1,1,-1,-1,-1,-1,-1,-1,1,-1,1,-1,-1] as a mask (bit i set where s_i = -1).
DEFAULT_SIGN_MASK = 0xD7E8
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class NVFP4Tensor(NamedTuple):
    """One quantized orientation: ``codes`` uint8 ``[R, C/2]``, ``scales`` uint8 E4M3 bytes, ``amax`` 0-d fp32.

    ``swizzled`` records the layout of ``scales``: row-major ``[R, C/16]`` (False), or the swizzled 128x4
    layout ``[roundup(R, 128), roundup(C/16, 4)]`` (True). The two have the same shape whenever ``R % 128 == 0``
    and ``C % 64 == 0``, so the layout cannot be told from the tensor: :func:`nvfp4_dequantize` and
    :func:`nvfp4_gemm` read this field (the raw ``torch.ops.vlcore`` ops take row-major scales only).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    amax: torch.Tensor
    swizzled: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], 2 * self.codes.shape[1])

    def scales_e4m3(self) -> torch.Tensor:
        return self.scales.view(torch.float8_e4m3fn)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nvfp4_dequantize(self, dtype=dtype)

    def to(self, device) -> "NVFP4Tensor":
        """The same quantized tensor (and scale layout) on ``device``."""
        return self._replace(codes=self.codes.to(device), scales=self.scales.to(device), amax=self.amax.to(device))

    def plain_scales(self) -> torch.Tensor:
        """The scales in the row-major ``[R, C/16]`` layout (a view of ``scales`` when they already are)."""
        if not self.swizzled:
            return self.scales
        return unswizzle_scales(self.scales, self.codes.shape[0], 2 * self.codes.shape[1] // 16)


class NVFP4Quantized(NamedTuple):
    """Both orientations of a quantized ``x [R, C]``: ``rowwise`` quantizes ``x``, ``columnwise`` ``x^T``."""

    rowwise: Optional[NVFP4Tensor]
    columnwise: Optional[NVFP4Tensor]


def nvfp4_quantize(x: torch.Tensor, *, rowwise: bool = True, columnwise: bool = False, block_2d: bool = False,
                   rht_rowwise: bool = False, rht_columnwise: bool = False, stochastic: bool = False,
                   seed: int = 0, offset: int = 0, amax_rowwise: Optional[torch.Tensor] = None,
                   amax_columnwise: Optional[torch.Tensor] = None, swizzle_scales: bool = False,
                   validate: Optional[bool] = None) -> NVFP4Quantized:
    """Quantize ``x [R, C]`` (bf16 or fp32) to NVFP4, one or both orientations in one call.

    - ``rowwise``: blocks of 16 along ``C`` (needs ``C % 16 == 0``); ``columnwise``: ``x^T`` with blocks of 16
      along ``R`` (needs ``R % 16 == 0``), stored transposed ``[C, R/2]``.
    - ``block_2d``: 16x16 tiles sharing one scale (replicated per row), so the columnwise codes are exactly
      the transpose of the rowwise codes (weights).
    - ``rht_rowwise`` / ``rht_columnwise``: 16-point random Hadamard transform along that copy's quantized
      axis before quantizing (values rounded to BF16, amax after the transform).
    - ``stochastic``: stochastic rounding of the elements from (``seed``, ``offset``); scales stay RNE.
    - ``amax_rowwise`` / ``amax_columnwise``: a caller-supplied global amax (float32, one value), e.g. after an
      all-reduce across ranks; returned as that copy's amax.
    - ``swizzle_scales``: scales in the swizzled 128x4 layout instead of row-major.
    - ``validate``: check the values of a given amax (ValueError when it is NaN, negative, or zero while
      ``x`` is not all zero). Checking reads the value on the host, a synchronisation on CUDA, so the
      default (None) checks only CPU tensors (and nothing inside torch.compile); without the check a NaN
      or negative amax gives NaN scales.
    """
    if not torch.compiler.is_compiling():  # a traced graph has no values to check
        for name, amax in (("amax_rowwise", amax_rowwise), ("amax_columnwise", amax_columnwise)):
            if amax is not None and (validate or (validate is None and amax.device.type == "cpu")):
                _check_amax_value(name, amax, x)
    out = torch.ops.vlcore.nvfp4_quantize(x, rowwise, columnwise, block_2d, rht_rowwise, rht_columnwise, stochastic,
                                          seed, offset, amax_rowwise, amax_columnwise, swizzle_scales)
    return NVFP4Quantized(NVFP4Tensor(*out[:3], swizzled=swizzle_scales) if rowwise else None,
                          NVFP4Tensor(*out[3:], swizzled=swizzle_scales) if columnwise else None)


def _check_amax_value(name: str, amax: torch.Tensor, x: torch.Tensor) -> None:
    if amax.numel() != 1 or not amax.dtype.is_floating_point:
        return  # the op names the shape / dtype problem
    value = float(amax.reshape(()))
    if math.isnan(value) or value < 0:
        raise ValueError(f"nvfp4_quantize: {name} must be a non-negative global amax, got {value}")
    if value == 0 and x.numel() and bool((x != 0).any()):
        raise ValueError(f"nvfp4_quantize: {name} is 0 but x has nonzero values: a zero amax is only valid for an "
                         "all-zero x (pass the max of |x| over every rank)")


def _check_quantized(op: str, name: str, t) -> None:
    if not isinstance(t, NVFP4Tensor):
        raise ValueError(f"{op}: {name} must be an NVFP4Tensor (codes, scales, amax[, swizzled]) as returned by "
                         f"nvfp4_quantize, got {type(t).__name__}")


def nvfp4_dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``e2m1(q) · sb · amax/2688`` as ``dtype`` (float32 or bfloat16). Swizzled scales (``t.swizzled``) are
    first brought back to the row-major layout that the op reads."""
    _check_quantized("nvfp4_dequantize", "t", t)
    return torch.ops.vlcore.nvfp4_dequantize(t.codes, t.plain_scales(), t.amax, dtype)


def nvfp4_gemm(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C [M, N] = alpha · Σ_blocks (sa·sb)(qa·qb)`` for ``a [M, K]`` and ``b [N, K]`` (both quantized along K,
    i.e. ``C ≈ A @ B^T``), FP32 accumulation, ``alpha = amax_a·amax_b / 2688²``. M, N, K multiples of 16.

    With ``K == 0`` the result is zeros on every backend (an empty sum; alpha is not applied, so a non-finite
    amax does not turn it into NaN). Swizzled scales are first brought back to the row-major layout (a copy
    of the scales, 1/8 of the codes' bytes): quantize with ``swizzle_scales=False`` to avoid it.

    CUDA: both operands are decoded exactly to BF16 (``e2m1 · sb`` has at most 6 significant bits) and
    multiplied by one cuBLAS BF16 GEMM with FP32 accumulation and ``alpha`` as its scale; CPU: the same
    decode and an FP32 matmul."""
    _check_quantized("nvfp4_gemm", "a", a)
    _check_quantized("nvfp4_gemm", "b", b)
    return torch.ops.vlcore.nvfp4_gemm(a.codes, a.plain_scales(), a.amax, b.codes, b.plain_scales(), b.amax, out_dtype)


def hadamard_transform(x: torch.Tensor, inverse: bool = False, sign_mask: int = DEFAULT_SIGN_MASK) -> torch.Tensor:
    """Blockwise 16-point random Hadamard transform along the last dim: each chunk ``v`` of 16 becomes
    ``v · R`` with ``R = diag(s) H16 / 4`` (``inverse``: ``v · R^T``). Same dtype as ``x``; differentiable."""
    return torch.ops.vlcore.hadamard_transform(x, inverse, sign_mask)


# ---------------------------------------------------------------------------------------------------------
# Fakes: the shapes of the C++ checks (csrc/nvfp4/nvfp4.h), contiguous outputs.


def _round_up(v, m):
    return (v + m - 1) // m * m


def _scale_shape(rows, cols, swizzle):
    return (_round_up(rows, 128), _round_up(cols // 16, 4)) if swizzle else (rows, cols // 16)


@torch.library.register_fake("vlcore::nvfp4_quantize")
def _(x, rowwise, columnwise, block_2d, rht_rowwise, rht_columnwise, stochastic, seed, offset, amax_rowwise,
      amax_columnwise, swizzle_scales):
    op = "vlcore::nvfp4_quantize"
    torch._check(x.dtype in (torch.bfloat16, torch.float32), lambda: f"{op}: x must be bfloat16 or float32, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D (rows, cols)")
    torch._check(rowwise or columnwise, lambda: f"{op}: at least one of rowwise / columnwise must be requested")
    rows, cols = x.shape
    torch._check(not rowwise or cols % 16 == 0, lambda: f"{op}: rowwise quantization needs cols % 16 == 0")
    torch._check(not columnwise or rows % 16 == 0, lambda: f"{op}: columnwise quantization needs rows % 16 == 0")
    torch._check(not block_2d or (rows % 16 == 0 and cols % 16 == 0), lambda: f"{op}: 16x16 blocks need both dims % 16")
    torch._check(not block_2d or not (rht_rowwise or rht_columnwise), lambda: f"{op}: no Hadamard transform with 16x16 blocks")
    torch._check(not rht_rowwise or rowwise, lambda: f"{op}: rht_rowwise needs rowwise=True")
    torch._check(not rht_columnwise or columnwise, lambda: f"{op}: rht_columnwise needs columnwise=True")
    for name, amax in (("amax_rowwise", amax_rowwise), ("amax_columnwise", amax_columnwise)):
        if amax is not None:
            torch._check(amax.dtype == torch.float32 and amax.numel() == 1,
                         lambda: f"{op}: {name} must be a float32 tensor with one value")
    outs = []
    for on, r, c in ((rowwise, rows, cols), (columnwise, cols, rows)):
        if on:
            outs += [x.new_empty((r, c // 2), dtype=torch.uint8), x.new_empty(_scale_shape(r, c, swizzle_scales), dtype=torch.uint8),
                     x.new_empty((), dtype=torch.float32)]
        else:
            outs += [x.new_empty((0,), dtype=torch.uint8), x.new_empty((0,), dtype=torch.uint8),
                     x.new_empty((0,), dtype=torch.float32)]
    return tuple(outs)


def _check_operand_meta(op, which, codes, scales, amax):
    torch._check(codes.dtype == torch.uint8 and codes.dim() == 2, lambda: f"{op}: {which}codes must be uint8 (rows, cols/2)")
    rows, cols = codes.shape[0], 2 * codes.shape[1]
    torch._check(cols % 16 == 0, lambda: f"{op}: {which}codes must hold a multiple of 16 elements per row")
    torch._check(scales.dtype in (torch.uint8, torch.float8_e4m3fn) and scales.shape == (rows, cols // 16),
                 lambda: f"{op}: {which}scales must be uint8/float8_e4m3fn of shape ({rows}, {cols // 16})")
    torch._check(amax.dtype == torch.float32 and amax.numel() == 1, lambda: f"{op}: {which}amax must be float32 with one value")
    return rows, cols


@torch.library.register_fake("vlcore::nvfp4_dequantize")
def _(codes, scales, amax, dtype):
    rows, cols = _check_operand_meta("vlcore::nvfp4_dequantize", "", codes, scales, amax)
    torch._check(dtype in (torch.float32, torch.bfloat16), lambda: "vlcore::nvfp4_dequantize: dtype must be float32 or bfloat16")
    return codes.new_empty((rows, cols), dtype=dtype)


@torch.library.register_fake("vlcore::nvfp4_gemm")
def _(a_codes, a_scales, a_amax, b_codes, b_scales, b_amax, out_dtype):
    op = "vlcore::nvfp4_gemm"
    m, k = _check_operand_meta(op, "a_", a_codes, a_scales, a_amax)
    n, kb = _check_operand_meta(op, "b_", b_codes, b_scales, b_amax)
    torch._check(k == kb, lambda: f"{op}: a and b must have the same K")
    torch._check(m % 16 == 0 and n % 16 == 0, lambda: f"{op}: M and N must be multiples of 16")
    torch._check(out_dtype in (torch.float32, torch.bfloat16), lambda: f"{op}: out_dtype must be float32 or bfloat16")
    return a_codes.new_empty((m, n), dtype=out_dtype)


@torch.library.register_fake("vlcore::hadamard_transform")
def _(x, inverse, sign_mask):
    torch._check(x.dtype.is_floating_point, lambda: "vlcore::hadamard_transform: x must be floating point")
    torch._check(x.dim() >= 1 and x.shape[-1] % 16 == 0, lambda: "vlcore::hadamard_transform: last dim must be a multiple of 16")
    torch._check(0 <= sign_mask <= 0xFFFF, lambda: "vlcore::hadamard_transform: sign_mask must be a 16-bit mask")
    return x.new_empty(x.shape)


# The transform is orthogonal: the gradient of v·R is g·R^T, i.e. the inverse transform, and vice versa.
def _hadamard_setup_context(ctx, inputs, output):
    _, ctx.inverse, ctx.sign_mask = inputs


def _hadamard_backward(ctx, grad):
    return torch.ops.vlcore.hadamard_transform(grad, not ctx.inverse, ctx.sign_mask), None, None


torch.library.register_autograd("vlcore::hadamard_transform", _hadamard_backward, setup_context=_hadamard_setup_context)


# ---------------------------------------------------------------------------------------------------------
# References: a plain-PyTorch transcription of docs/nvfp4.md (written independently of the C++: torch's own
# float8 cast, comparisons for E2M1, tensor arithmetic in float32), used as the tests' oracle.

_F32 = torch.float32
_FLT_MAX = torch.finfo(torch.float32).max


def _f32(v, device):
    return torch.tensor(v, dtype=_F32, device=device)


def hadamard_matrix(sign_mask: int = DEFAULT_SIGN_MASK, dtype=torch.float64, device=None) -> torch.Tensor:
    """``R = diag(s) · H16 / 4`` with Sylvester ``H[i][j] = (-1)^popcount(i & j)``."""
    i = torch.arange(16, device=device)
    parity = torch.zeros(16, 16, dtype=torch.int64, device=device)
    and_ = i[:, None] & i[None, :]
    for bit in range(4):
        parity ^= (and_ >> bit) & 1
    h = 1 - 2 * parity
    s = torch.tensor([-1 if (sign_mask >> k) & 1 else 1 for k in range(16)], device=device)
    return (s[:, None] * h).to(dtype) / 4


def hadamard_transform_ref(x: torch.Tensor, inverse: bool = False, sign_mask: int = DEFAULT_SIGN_MASK) -> torch.Tensor:
    """The transform in float32 with the kernels' butterfly order (float64 for float64 input), then ``x``'s dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else _F32
    v = x.to(acc).reshape(-1, 16)
    signs = torch.tensor([-1.0 if (sign_mask >> k) & 1 else 1.0 for k in range(16)], dtype=acc, device=x.device)
    if not inverse:
        v = v * signs
    for h in (1, 2, 4, 8):
        w = v.reshape(-1, 16 // (2 * h), 2, h)
        a, b = w[:, :, 0, :], w[:, :, 1, :]
        v = torch.stack((a + b, a - b), dim=2).reshape(-1, 16)
    v = v * 0.25
    if inverse:
        v = v * signs
    return v.reshape(x.shape).to(x.dtype)


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product in int64 without overflow: split b into 16-bit halves.
    p0, p1 = a * (b & 0xFFFF), a * (b >> 16)
    lo = (((p1 & 0xFFFF) << 16) + p0) & 0xFFFFFFFF
    hi = (p1 + (p0 >> 16)) >> 16
    return hi, lo


def philox4x32_10_ref(ctr: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (Random123's constants and round order)."""
    k0, k1 = key
    c = list(ctr)
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        hi0, lo0 = _mulhilo32(c[0], 0xD2511F53)
        hi1, lo1 = _mulhilo32(c[2], 0xCD9E8D57)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def _sr_random_bytes(n: int, seed: int, offset: int, orientation: int, device) -> torch.Tensor:
    """One Philox draw per 16-element block: element i takes byte (i % 4) of word (i % 16) // 4 of the draw
    for counter (i // 16, orientation, offset), key seed; n is a multiple of 16."""
    blocks = torch.arange(n // 16, dtype=torch.int64, device=device)
    ctr = [blocks & 0xFFFFFFFF, (blocks >> 32) ^ (0x80000000 if orientation else 0),
           torch.full_like(blocks, offset & 0xFFFFFFFF), torch.full_like(blocks, (offset >> 32) & 0xFFFFFFFF)]
    words = torch.stack(philox4x32_10_ref(ctr, (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)), dim=1)  # [B, 4]
    shifts = torch.arange(0, 32, 8, device=device)
    return ((words[:, :, None] >> shifts) & 0xFF).reshape(-1)  # [B, 4 words, 4 bytes] -> element order


def _e2m1_code(s: torch.Tensor, rbytes: Optional[torch.Tensor]) -> torch.Tensor:
    a = s.abs()
    if rbytes is None:
        # RNE with ties to the even code; each comparison is one threshold of the code ladder.
        mag = ((a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int() + (a > 2.5).int()
               + (a >= 3.5).int() + (a > 5.0).int())
    else:
        u = rbytes.reshape(a.shape).to(_F32) / 256
        step = torch.where(a >= 4, 2.0, torch.where(a >= 2, 1.0, 0.5)).to(_F32)
        t = a + u * step
        step_t = torch.where(t >= 4, 2.0, torch.where(t >= 2, 1.0, 0.5)).to(_F32)
        q = torch.clamp(torch.floor(t / step_t) * step_t, max=6.0)
        mag = torch.bucketize(q, torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=s.device), right=True).int()
    code = mag | (torch.signbit(s).int() << 3)
    return torch.where(s.isnan(), 7, code).to(torch.uint8)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def swizzle_scales_ref(scales: torch.Tensor) -> torch.Tensor:
    """Plain ``[R, S]`` scales to the swizzled 128x4 layout, as ``[roundup(R,128), roundup(S,4)]`` bytes."""
    rows, cols = scales.shape
    rp, cp = _round_up(rows, 128), _round_up(cols, 4)
    padded = scales.new_zeros((rp, cp))
    padded[:rows, :cols] = scales
    # row = rt*128 + a*32 + b, col = ct*4 + d  ->  order (rt, ct, b, a, d)
    return padded.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4).reshape(rp, cp)


def unswizzle_scales(scales: torch.Tensor, rows: int, scale_cols: int) -> torch.Tensor:
    """Swizzled 128x4 scales ``[roundup(rows,128), roundup(scale_cols,4)]`` back to row-major ``[rows, scale_cols]``."""
    rp, cp = _round_up(rows, 128), _round_up(scale_cols, 4)
    if scales.dim() != 2 or tuple(scales.shape) != (rp, cp):
        raise ValueError(f"unswizzle_scales: swizzled scales of a ({rows}, {16 * scale_cols}) tensor must have shape "
                         f"({rp}, {cp}), got {tuple(scales.shape)}")
    # Inverse of swizzle_scales_ref: the stored order (rt, ct, b, a, d) back to row rt*128 + a*32 + b, col ct*4 + d.
    plain = scales.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(rp, cp)
    return plain[:rows, :scale_cols]


def _quantize_matrix_ref(v: torch.Tensor, *, block_2d: bool, rht: bool, stochastic: bool, seed: int, offset: int,
                         orientation: int, amax: Optional[torch.Tensor], swizzle: bool) -> NVFP4Tensor:
    rows, cols = v.shape
    dev = v.device
    v = v.to(_F32)
    if rht:
        v = hadamard_transform_ref(v).to(torch.bfloat16).to(_F32)
    if amax is None:
        amax = torch.where(v.isnan(), 0.0, v.abs()).amax() if v.numel() else _f32(0.0, dev)
    amax = amax.reshape(()).to(_F32)
    s_enc = torch.fmin(_f32(2688.0, dev) / amax, _f32(_FLT_MAX, dev))
    s_enc = torch.where((amax == 0) | (s_enc == 0), _f32(1.0, dev), s_enc)
    s_enc = torch.where(amax.isnan() | (amax < 0), _f32(math.nan, dev), s_enc)  # not an amax: NaN scales
    s_dec = (1.0 / s_enc.double()).to(_F32)
    blocks = v.reshape(rows, cols // 16, 16)
    block_amax = torch.where(blocks.isnan(), 0.0, blocks.abs()).amax(dim=2) if v.numel() else v.new_zeros(rows, cols // 16)
    if block_2d:
        tiles = block_amax.reshape(rows // 16, 16, cols // 16).amax(dim=1)
        block_amax = tiles.repeat_interleave(16, dim=0)
    sb = (block_amax * (s_enc * (_f32(1.0, dev) / _f32(6.0, dev)))).clamp(max=448.0)
    scale_bytes = sb.to(torch.float8_e4m3fn).view(torch.uint8)
    sb_f = scale_bytes.view(torch.float8_e4m3fn).to(_F32)
    enc = torch.fmin(1.0 / (sb_f * s_dec), _f32(_FLT_MAX, dev))
    scaled = blocks * enc[:, :, None]
    rbytes = _sr_random_bytes(v.numel(), seed, offset, orientation, dev) if stochastic else None
    codes = _pack(_e2m1_code(scaled.reshape(rows, cols), rbytes))
    if swizzle:
        scale_bytes = swizzle_scales_ref(scale_bytes)
    return NVFP4Tensor(codes, scale_bytes, amax.clone(), swizzled=swizzle)


def nvfp4_quantize_ref(x: torch.Tensor, *, rowwise: bool = True, columnwise: bool = False, block_2d: bool = False,
                       rht_rowwise: bool = False, rht_columnwise: bool = False, stochastic: bool = False,
                       seed: int = 0, offset: int = 0, amax_rowwise: Optional[torch.Tensor] = None,
                       amax_columnwise: Optional[torch.Tensor] = None, swizzle_scales: bool = False) -> NVFP4Quantized:
    """Plain-PyTorch transcription of docs/nvfp4.md with the same arguments as :func:`nvfp4_quantize`."""
    common = dict(block_2d=block_2d, stochastic=stochastic, seed=seed, offset=offset, swizzle=swizzle_scales)
    row = _quantize_matrix_ref(x, rht=rht_rowwise, orientation=0, amax=amax_rowwise, **common) if rowwise else None
    col = _quantize_matrix_ref(x.t(), rht=rht_columnwise, orientation=1, amax=amax_columnwise, **common) if columnwise else None
    return NVFP4Quantized(row, col)


def _decode_ref(t: NVFP4Tensor, dtype) -> torch.Tensor:
    lut = torch.tensor(E2M1_VALUES, dtype=dtype, device=t.codes.device)
    codes = torch.stack((t.codes & 0xF, t.codes >> 4), dim=2).reshape(t.codes.shape[0], 2 * t.codes.shape[1]).long()
    sb = t.plain_scales().view(torch.float8_e4m3fn).to(dtype).repeat_interleave(16, dim=1)
    return lut[codes] * sb


def nvfp4_dequantize_ref(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(e2m1 · sb) · (amax · fl32(1/2688))`` in float32 (TE dequantize), then ``dtype``."""
    factor = t.amax.to(_F32) * (_f32(1.0, t.codes.device) / _f32(2688.0, t.codes.device))
    return (_decode_ref(t, _F32) * factor).to(dtype)


def nvfp4_gemm_ref(a: NVFP4Tensor, b: NVFP4Tensor) -> torch.Tensor:
    """Dequantize both operands in float64 and multiply: ``A @ B^T`` (float64)."""
    da = _decode_ref(a, torch.float64) * (a.amax.double() / 2688)
    db = _decode_ref(b, torch.float64) * (b.amax.double() / 2688)
    return da @ db.t()
