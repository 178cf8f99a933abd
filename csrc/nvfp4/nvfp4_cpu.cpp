// CPU reference of the NVFP4 family. It is written for clarity: each orientation is first materialised
// as a contiguous FP32 matrix whose rows are the quantization axis (x itself, or x^T for the columnwise
// copy), optionally Hadamard-transformed and rounded to BF16, and then quantized block by block with the
// arithmetic of nvfp4_math.h that the CUDA kernels share.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "nvfp4/nvfp4.h"
#include "nvfp4/nvfp4_math.h"
#include "ops.h"

namespace vlcore {
namespace {
using namespace nvfp4;

// Grain sizes that keep small tensors on one thread: OpenMP fork/join costs far more than quantizing a
// few thousand elements, and much more again on an oversubscribed machine.
constexpr int64_t kMinElementsPerThread = 1 << 16;
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, work_per_item)); }
using namespace nvfp4_detail;

struct Orientation {
  bool rht, block_2d, stochastic, swizzle;
  int index;  // 0 rowwise, 1 columnwise: salts the random stream
  uint64_t seed, offset;
  const float* amax_override;  // caller-supplied global amax, or nullptr
};

// Quantize src [rows, cols] (contiguous FP32, blocks of 16 along cols) in place of its orientation.
void quantize_matrix(std::vector<float>& src, int64_t rows, int64_t cols, const Orientation& o, uint8_t* codes,
                     uint8_t* scales, float* amax_out) {
  const int64_t blocks_per_row = cols / kBlock;
  if (o.rht) {
    at::parallel_for(0, rows * blocks_per_row, grain(kBlock), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* v = src.data() + b * kBlock;
        hadamard16_forward(v, kDefaultSignMask);
        for (int i = 0; i < kBlock; ++i) v[i] = round_to_bf16(v[i]);  // TE writes the transform as BF16
      }
    });
  }
  float amax = 0.0f;
  if (o.amax_override != nullptr) {
    amax = *o.amax_override;
  } else {
    for (const float v : src) amax = max_drop_nan(amax, abs_f(v));
  }
  *amax_out = amax;
  const float s_enc = global_encode_scale(amax);
  const float s_dec = global_decode_scale(s_enc);

  // 16x16 tiles share one amax: precompute it per tile.
  std::vector<float> tile_amax;
  if (o.block_2d) {
    tile_amax.assign((rows / kBlock) * blocks_per_row, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        float& t = tile_amax[(r / kBlock) * blocks_per_row + b];
        t = max_drop_nan(t, block_abs_max(src.data() + r * cols + b * kBlock));
      }
    }
  }
  at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
    Philox4 rand = {};
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        const float* v = src.data() + r * cols + b * kBlock;
        const float block_amax = o.block_2d ? tile_amax[(r / kBlock) * blocks_per_row + b] : block_abs_max(v);
        if (o.stochastic) rand = sr_bits(o.seed, o.offset, o.index, static_cast<uint64_t>(r * blocks_per_row + b));
        const uint8_t scale =
            quantize_block16(v, block_amax, s_enc, s_dec, o.stochastic, rand, codes + r * (cols / 2) + b * 8);
        scales[o.swizzle ? swizzled_scale_index(r, b, blocks_per_row) : r * blocks_per_row + b] = scale;
      }
    }
  });
}

// x (bf16 / fp32, any strides) as an FP32 matrix with the quantization axis contiguous.
std::vector<float> oriented_copy(const at::Tensor& x, bool transpose) {
  const at::Tensor src = (transpose ? x.t() : x).to(at::kFloat).contiguous();
  const float* p = src.data_ptr<float>();
  return std::vector<float>(p, p + src.numel());
}

template <typename T>
void hadamard_rows(const T* in, T* out, int64_t blocks, bool inverse, uint32_t mask) {
  // Compute type: double for double input (gradcheck), FP32 otherwise (the type of the quantize path).
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  at::parallel_for(0, blocks, grain(kBlock), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t v[kBlock];
      for (int i = 0; i < kBlock; ++i) v[i] = static_cast<acc_t>(in[b * kBlock + i]);
      if (inverse) {
        hadamard16_inverse(v, mask);
      } else {
        hadamard16_forward(v, mask);
      }
      for (int i = 0; i < kBlock; ++i) out[b * kBlock + i] = static_cast<T>(v[i]);
    }
  });
}

// codes [R, C/2] and plain scales [R, C/16] -> e2m1 x block scale as BF16 [R, C], exact, with the
// block decode that the CUDA GEMM uses (nvfp4_math.h).
at::Tensor decode_bf16(const at::Tensor& codes, const at::Tensor& scales) {
  const int64_t rows = codes.size(0), cols = 2 * codes.size(1), blocks = rows * (cols / kBlock);
  const at::Tensor q = codes.contiguous();
  const at::Tensor s = scales.view(at::kByte).contiguous();
  at::Tensor out = at::empty({rows, cols}, codes.options().dtype(at::kBFloat16));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint8_t* sp = s.data_ptr<uint8_t>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, blocks, grain(kBlock), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {  // rows hold whole blocks: one flat block index covers them all
      uint32_t w[2];
      std::memcpy(w, qp + 8 * b, 8);
      decode_block16_bf16(w[0], w[1], sp[b], op + 8 * b);
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nvfp4_quantize_cpu(
    const at::Tensor& x, bool rowwise, bool columnwise, bool block_2d, bool rht_rowwise, bool rht_columnwise,
    bool stochastic, int64_t seed, int64_t offset, const std::optional<at::Tensor>& amax_rowwise,
    const std::optional<at::Tensor>& amax_columnwise, bool swizzle_scales) {
  const QuantizeConfig c = check_quantize(x, rowwise, columnwise, block_2d, rht_rowwise, rht_columnwise, stochastic,
                                          seed, offset, amax_rowwise, amax_columnwise, swizzle_scales);
  QuantizedOutputs o = allocate_quantize_outputs(x, c);
  auto run = [&](bool transpose, bool rht, const std::optional<at::Tensor>& amax_arg, at::Tensor& codes,
                 at::Tensor& scales, at::Tensor& amax) {
    float override_value = 0.0f;
    if (amax_arg.has_value()) override_value = amax_arg->reshape({}).item<float>();  // CPU tensor: no sync
    const Orientation orient{rht, block_2d, stochastic, swizzle_scales, transpose ? 1 : 0, c.seed, c.offset,
                             amax_arg.has_value() ? &override_value : nullptr};
    std::vector<float> src = oriented_copy(x, transpose);
    const int64_t rows = transpose ? c.cols : c.rows, cols = transpose ? c.rows : c.cols;
    quantize_matrix(src, rows, cols, orient, codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
                    amax.data_ptr<float>());
  };
  if (rowwise) run(false, rht_rowwise, amax_rowwise, o.codes, o.scales, o.amax);
  if (columnwise) run(true, rht_columnwise, amax_columnwise, o.codes_t, o.scales_t, o.amax_t);
  return {o.codes, o.scales, o.amax, o.codes_t, o.scales_t, o.amax_t};
}

at::Tensor nvfp4_dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& amax,
                                at::ScalarType dtype) {
  nvfp4_detail::check_dequantize(codes, scales, amax, dtype);
  // e2m1 x sb is exact in BF16; one FP32 rounding when applying the tensor factor.
  const at::Tensor decoded = decode_bf16(codes, scales).to(at::kFloat);
  const at::Tensor out32 = decoded.mul_(nvfp4::decode_factor(amax.reshape({}).item<float>()));
  return dtype == at::kFloat ? out32 : out32.to(dtype);
}

at::Tensor nvfp4_gemm_cpu(const at::Tensor& a_codes, const at::Tensor& a_scales, const at::Tensor& a_amax,
                          const at::Tensor& b_codes, const at::Tensor& b_scales, const at::Tensor& b_amax,
                          at::ScalarType out_dtype) {
  nvfp4_detail::check_gemm(a_codes, a_scales, a_amax, b_codes, b_scales, b_amax, out_dtype);
  const int64_t m = a_codes.size(0), n = b_codes.size(0), k = 2 * a_codes.size(1);
  // K == 0: an empty sum is 0 whatever the amaxes; alpha (Inf or NaN for a non-finite amax) is not applied,
  // so that the result is zeros, as on CUDA.
  if (k == 0) return at::zeros({m, n}, a_codes.options().dtype(at::kFloat)).to(out_dtype);
  // The structure of the CUDA path: both operands decoded exactly to BF16 (the same decode function),
  // one FP32-accumulated product A . B^T, then alpha = amax_a * amax_b / 2688^2 and the output dtype.
  const at::Tensor a = decode_bf16(a_codes, a_scales).to(at::kFloat);
  const at::Tensor b = decode_bf16(b_codes, b_scales).to(at::kFloat);
  const float alpha = a_amax.reshape({}).item<float>() * b_amax.reshape({}).item<float>() /
                      (nvfp4::kFp4Fp8Max * nvfp4::kFp4Fp8Max);
  const at::Tensor out32 = at::mm(a, b.t()).mul_(alpha);
  return out_dtype == at::kFloat ? out32 : out32.to(out_dtype);
}

at::Tensor hadamard_transform_cpu(const at::Tensor& x, bool inverse, int64_t sign_mask) {
  nvfp4_detail::check_hadamard(x, sign_mask);
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t blocks = x.numel() / 16;
  if (blocks == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hadamard_transform_cpu", [&] {
    hadamard_rows<scalar_t>(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), blocks, inverse,
                            static_cast<uint32_t>(sign_mask));
  });
  return out;
}

}  // namespace vlcore
