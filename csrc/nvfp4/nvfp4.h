#pragma once
// Host-side argument checks and output allocation shared by the CPU and CUDA NVFP4 ops, so that both
// backends accept exactly the same inputs and return the same shapes (the Python fakes mirror this).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <optional>

#include <array>

#include "common/checks.h"

namespace vlcore::nvfp4_detail {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Scale tensor shape of an R x C quantized matrix (blocks of 16 along C): plain [R, C/16], or the
// swizzled 128x4 layout padded to [roundup(R,128), roundup(C/16,4)] (bytes in swizzled order).
inline std::array<int64_t, 2> scale_shape(int64_t rows, int64_t cols, bool swizzle) {
  if (!swizzle) return {rows, cols / 16};
  return {round_up(rows, 128), round_up(cols / 16, 4)};
}

struct QuantizeConfig {
  int64_t rows = 0, cols = 0;  // of x
  bool rowwise, columnwise, block_2d, rht_rowwise, rht_columnwise, stochastic, swizzle;
  uint64_t seed, offset;
};

inline void check_amax_arg(const char* op, const std::optional<at::Tensor>& amax, const at::Tensor& x,
                           const char* name) {
  if (!amax.has_value()) return;
  VLCORE_CHECK(amax->scalar_type() == at::kFloat, op, name, " must be float32, got ", amax->scalar_type());
  VLCORE_CHECK(amax->numel() == 1, op, name, " must hold exactly one value, got shape ", amax->sizes());
  check_same_device(op, x, "x", *amax, name);
}

inline QuantizeConfig check_quantize(const at::Tensor& x, bool rowwise, bool columnwise, bool block_2d,
                                     bool rht_rowwise, bool rht_columnwise, bool stochastic, int64_t seed,
                                     int64_t offset, const std::optional<at::Tensor>& amax_rowwise,
                                     const std::optional<at::Tensor>& amax_columnwise, bool swizzle) {
  const char* op = "nvfp4_quantize";
  VLCORE_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op,
               "x must be bfloat16 or float32, got ", x.scalar_type());
  VLCORE_CHECK(x.dim() == 2, op, "x must be 2-D (rows, cols), got shape ", x.sizes());
  VLCORE_CHECK(rowwise || columnwise, op, "at least one of rowwise / columnwise must be requested");
  const int64_t rows = x.size(0), cols = x.size(1);
  VLCORE_CHECK(!rowwise || cols % 16 == 0, op, "rowwise quantization needs cols % 16 == 0 (blocks of 16 along ",
               "dim 1), got x of shape ", x.sizes());
  VLCORE_CHECK(!columnwise || rows % 16 == 0, op, "columnwise quantization needs rows % 16 == 0 (blocks of 16 ",
               "along dim 0), got x of shape ", x.sizes());
  VLCORE_CHECK(!block_2d || (rows % 16 == 0 && cols % 16 == 0), op,
               "16x16 blocks need both dims to be multiples of 16, got x of shape ", x.sizes());
  VLCORE_CHECK(!block_2d || !(rht_rowwise || rht_columnwise), op,
               "block_2d=True cannot be combined with rht_rowwise / rht_columnwise: the Hadamard transform is for ",
               "1x16 blocks (activations and gradients); weights with 16x16 blocks are never transformed");
  VLCORE_CHECK(!rht_rowwise || rowwise, op, "rht_rowwise needs rowwise=True");
  VLCORE_CHECK(!rht_columnwise || columnwise, op, "rht_columnwise needs columnwise=True");
  VLCORE_CHECK(seed >= 0 && offset >= 0, op, "seed and offset must be >= 0, got ", seed, " and ", offset);
  check_amax_arg(op, amax_rowwise, x, "amax_rowwise");
  check_amax_arg(op, amax_columnwise, x, "amax_columnwise");
  QuantizeConfig c;
  c.rows = rows;
  c.cols = cols;
  c.rowwise = rowwise;
  c.columnwise = columnwise;
  c.block_2d = block_2d;
  c.rht_rowwise = rht_rowwise;
  c.rht_columnwise = rht_columnwise;
  c.stochastic = stochastic;
  c.swizzle = swizzle;
  c.seed = static_cast<uint64_t>(seed);
  c.offset = static_cast<uint64_t>(offset);
  return c;
}

struct QuantizedOutputs {
  at::Tensor codes, scales, amax, codes_t, scales_t, amax_t;
};

// Unrequested orientations are empty tensors of shape (0,). Swizzled scales start zeroed (padding).
inline QuantizedOutputs allocate_quantize_outputs(const at::Tensor& x, const QuantizeConfig& c) {
  const auto bytes = x.options().dtype(at::kByte);
  const auto f32 = x.options().dtype(at::kFloat);
  QuantizedOutputs o;
  auto make = [&](bool on, int64_t r, int64_t cc, at::Tensor& codes, at::Tensor& scales, at::Tensor& amax) {
    if (!on) {
      codes = at::empty({0}, bytes);
      scales = at::empty({0}, bytes);
      amax = at::empty({0}, f32);
      return;
    }
    codes = at::empty({r, cc / 2}, bytes);
    const auto s = scale_shape(r, cc, c.swizzle);
    scales = c.swizzle ? at::zeros({s[0], s[1]}, bytes) : at::empty({s[0], s[1]}, bytes);
    amax = at::empty({}, f32);
  };
  make(c.rowwise, c.rows, c.cols, o.codes, o.scales, o.amax);
  make(c.columnwise, c.cols, c.rows, o.codes_t, o.scales_t, o.amax_t);
  return o;
}

// codes [R, C/2] uint8, scales [R, C/16] uint8 or float8_e4m3fn (plain layout), amax float32 (1 value).
inline void check_operand(const char* op, const char* which, const at::Tensor& codes, const at::Tensor& scales,
                          const at::Tensor& amax) {
  VLCORE_CHECK(codes.scalar_type() == at::kByte, op, which, "codes must be uint8 (two E2M1 codes per byte), got ",
               codes.scalar_type());
  VLCORE_CHECK(codes.dim() == 2, op, which, "codes must be 2-D (rows, cols / 2), got shape ", codes.sizes());
  VLCORE_CHECK(scales.scalar_type() == at::kByte || scales.scalar_type() == at::kFloat8_e4m3fn, op, which,
               "scales must be uint8 or float8_e4m3fn, got ", scales.scalar_type());
  const int64_t rows = codes.size(0), cols = 2 * codes.size(1);
  VLCORE_CHECK(cols % 16 == 0, op, which, "codes must hold a multiple of 16 elements per row (a multiple of 8 ",
               "bytes), got shape ", codes.sizes());
  VLCORE_CHECK(scales.dim() == 2 && scales.size(0) == rows && scales.size(1) == cols / 16, op, which,
               "scales must have shape (", rows, ", ", cols / 16, ") (plain layout, one per 16 elements), got ",
               scales.sizes());
  VLCORE_CHECK(amax.scalar_type() == at::kFloat && amax.numel() == 1, op, which,
               "amax must be a float32 tensor with one value, got ", amax.scalar_type(), " of shape ", amax.sizes());
  check_same_device(op, codes, "codes", scales, "scales");
  check_same_device(op, codes, "codes", amax, "amax");
}

inline void check_dequantize(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& amax,
                             at::ScalarType dtype) {
  check_operand("nvfp4_dequantize", "", codes, scales, amax);
  VLCORE_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "nvfp4_dequantize",
               "dtype must be float32 or bfloat16, got ", dtype);
}

inline void check_gemm(const at::Tensor& a_codes, const at::Tensor& a_scales, const at::Tensor& a_amax,
                       const at::Tensor& b_codes, const at::Tensor& b_scales, const at::Tensor& b_amax,
                       at::ScalarType out_dtype) {
  const char* op = "nvfp4_gemm";
  check_operand(op, "a_", a_codes, a_scales, a_amax);
  check_operand(op, "b_", b_codes, b_scales, b_amax);
  check_same_device(op, a_codes, "a_codes", b_codes, "b_codes");
  VLCORE_CHECK(a_codes.size(1) == b_codes.size(1), op, "a and b must have the same K (both K-major: a_codes ",
               "(M, K/2), b_codes (N, K/2)), got ", a_codes.sizes(), " and ", b_codes.sizes());
  VLCORE_CHECK(a_codes.size(0) % 16 == 0 && b_codes.size(0) % 16 == 0, op,
               "M and N must be multiples of 16, got M = ", a_codes.size(0), ", N = ", b_codes.size(0),
               " (pad the operands with zero rows before quantizing)");
  VLCORE_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, op, "out_dtype must be float32 or bfloat16, got ",
               out_dtype);
}

inline void check_hadamard(const at::Tensor& x, int64_t sign_mask) {
  const char* op = "hadamard_transform";
  VLCORE_CHECK(at::isFloatingType(x.scalar_type()), op, "x must be floating point, got ", x.scalar_type());
  VLCORE_CHECK(x.dim() >= 1 && x.size(-1) % 16 == 0, op,
               "x must have a last dim that is a multiple of 16 (16-point blocks), got shape ", x.sizes());
  VLCORE_CHECK(sign_mask >= 0 && sign_mask <= 0xFFFF, op, "sign_mask must be a 16-bit mask in [0, 65535], got ",
               sign_mask);
}

}  // namespace vlcore::nvfp4_detail
