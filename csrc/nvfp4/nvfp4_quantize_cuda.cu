// The fused NVFP4 quantize pass over 64x64 tiles staged in shared memory, which emits the rowwise copy
// (1x16 row segments) and the transposed columnwise copy (16x1 column segments) from the same tile: x is
// read once for both orientations (plus the amax pass of nvfp4_amax_cuda.cu when the op computes it).
// The per-block arithmetic is nvfp4_math.h, shared with the CPU reference: the same bits on both.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <limits>

#include "nvfp4/nvfp4.h"
#include "nvfp4/nvfp4_cuda_common.cuh"
#include "ops.h"

namespace vlcore {
namespace {
using namespace nvfp4;
using namespace nvfp4_detail;
using namespace nvfp4_cuda;

constexpr int kTile = 64;  // quantize tile: 64 x 64 elements

// ---------------------------------------------------------------------------------------------------------
// Fused quantize of one 64x64 tile. Thread t loads row t/4, columns (t%4)*16 .. +16 (its rowwise job);
// after the tile is in shared memory it takes column t%64, rows (t/64)*16 .. +16 (its columnwise job).

// The checked configuration plus what the kernel needs to find its data.
struct QuantizeParams : QuantizeConfig {
  bool vector_ok;
  uint8_t* codes;
  uint8_t* scales;
  const float* amax;
  uint8_t* codes_t;
  uint8_t* scales_t;
  const float* amax_t;
};

__device__ __forceinline__ void draw_bits(uint64_t seed, uint64_t offset, int orientation, uint64_t first_index,
                                          uint32_t* rand) {
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const Philox4 bits = sr_bits(seed, offset, orientation, first_index / 4 + g);
#pragma unroll
    for (int j = 0; j < 4; ++j) rand[4 * g + j] = bits.x[j];
  }
}

// 8 packed code bytes (16 elements) as one 8-byte store; dst is 8-byte aligned (row pitch % 8 == 0).
__device__ __forceinline__ void store_codes8(uint8_t* dst, const uint8_t* packed) {
  uint2 w;
  w.x = packed[0] | (packed[1] << 8) | (packed[2] << 16) | (uint32_t(packed[3]) << 24);
  w.y = packed[4] | (packed[5] << 8) | (packed[6] << 16) | (uint32_t(packed[7]) << 24);
  *reinterpret_cast<uint2*>(dst) = w;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_quantize_kernel(const T* __restrict__ x, QuantizeParams p) {
  __shared__ float tile[kTile][kTile + 1];    // +1: conflict-free column reads
  __shared__ float seg_amax[kTile][kTile / kBlock];  // amax of each 1x16 row segment (for 16x16 tiles)
  const int t = threadIdx.x;
  // Row tiles in x (up to 2^31 - 1 blocks): the token count is the dimension that grows.
  const int64_t r0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;

  const int lr = t / 4, seg = t % 4;
  const int64_t r = r0 + lr, c = c0 + seg * kBlock;
  float v[16];
  const bool in_tile = r < p.rows && c < p.cols;
  const int valid = in_tile ? static_cast<int>(p.cols - c < kBlock ? p.cols - c : kBlock) : 0;
  if (in_tile) {
    load16(x + r * p.cols + c, valid, p.vector_ok && valid == kBlock, v);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = 0.0f;
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) tile[lr][seg * kBlock + i] = v[i];
  if (p.block_2d) seg_amax[lr][seg] = block_abs_max(v);
  __syncthreads();

  uint32_t rand[16];
  if (p.rowwise && in_tile) {  // rowwise needs cols % 16 == 0: the segment is whole
    const float amax = *p.amax;
    const float s_enc = global_encode_scale(amax), s_dec = global_decode_scale(s_enc);
    if (p.rht_rowwise) {
      hadamard16_forward(v, kDefaultSignMask);
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = round_to_bf16(v[i]);
    }
    float block_amax = block_abs_max(v);
    if (p.block_2d) {
      block_amax = 0.0f;
      const int tr = (lr / kBlock) * kBlock;
#pragma unroll
      for (int i = 0; i < kBlock; ++i) block_amax = max_drop_nan(block_amax, seg_amax[tr + i][seg]);
    }
    if (p.stochastic) draw_bits(p.seed, p.offset, 0, static_cast<uint64_t>(r * p.cols + c), rand);
    uint8_t packed[8];
    const uint8_t scale = quantize_block16(v, block_amax, s_enc, s_dec, p.stochastic, rand, packed);
    store_codes8(p.codes + r * (p.cols / 2) + c / 2, packed);
    const int64_t blocks_per_row = p.cols / kBlock;
    p.scales[p.swizzle ? swizzled_scale_index(r, c / kBlock, blocks_per_row) : r * blocks_per_row + c / kBlock] = scale;
  }

  if (p.columnwise) {  // columnwise needs rows % 16 == 0: a segment is whole or absent
    const int lc = t % kTile, rb = t / kTile;
    const int64_t col = c0 + lc, row = r0 + rb * kBlock;
    if (col < p.cols && row < p.rows) {
      const float amax = *p.amax_t;
      const float s_enc = global_encode_scale(amax), s_dec = global_decode_scale(s_enc);
      float w[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) w[i] = tile[rb * kBlock + i][lc];
      if (p.rht_columnwise) {
        hadamard16_forward(w, kDefaultSignMask);
#pragma unroll
        for (int i = 0; i < 16; ++i) w[i] = round_to_bf16(w[i]);
      }
      float block_amax = block_abs_max(w);
      if (p.block_2d) {  // the same 16x16 tile amax as the rowwise copy: codes are exact transposes
        block_amax = 0.0f;
#pragma unroll
        for (int i = 0; i < kBlock; ++i) block_amax = max_drop_nan(block_amax, seg_amax[rb * kBlock + i][lc / kBlock]);
      }
      if (p.stochastic) draw_bits(p.seed, p.offset, 1, static_cast<uint64_t>(col * p.rows + row), rand);
      uint8_t packed[8];
      const uint8_t scale = quantize_block16(w, block_amax, s_enc, s_dec, p.stochastic, rand, packed);
      store_codes8(p.codes_t + col * (p.rows / 2) + row / 2, packed);
      const int64_t blocks_per_row = p.rows / kBlock;
      p.scales_t[p.swizzle ? swizzled_scale_index(col, row / kBlock, blocks_per_row)
                           : col * blocks_per_row + row / kBlock] = scale;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nvfp4_quantize_cuda(
    const at::Tensor& x_in, bool rowwise, bool columnwise, bool block_2d, bool rht_rowwise, bool rht_columnwise,
    bool stochastic, int64_t seed, int64_t offset, const std::optional<at::Tensor>& amax_rowwise,
    const std::optional<at::Tensor>& amax_columnwise, bool swizzle_scales) {
  const QuantizeConfig cfg = check_quantize(x_in, rowwise, columnwise, block_2d, rht_rowwise, rht_columnwise,
                                            stochastic, seed, offset, amax_rowwise, amax_columnwise, swizzle_scales);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous();
  QuantizedOutputs o = allocate_quantize_outputs(x, cfg);
  const int64_t rows = cfg.rows, cols = cfg.cols;
  const bool vector_ok = aligned(x.data_ptr(), 16) && cols % kBlock == 0;

  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    // amax of each requested orientation, into its output tensor (the quantize pass reads it there).
    auto launch_amax = [&](int mode, float* out, float* out_rht) {
      launch_nvfp4_amax(x, mode, vector_ok, out, out_rht, stream);
    };
    auto compute_amax = [&](at::Tensor& out, const std::optional<at::Tensor>& given, int mode) {
      if (given.has_value()) {
        C10_CUDA_CHECK(cudaMemcpyAsync(out.data_ptr(), given->contiguous().data_ptr(), sizeof(float),
                                       cudaMemcpyDeviceToDevice, stream));
        return;
      }
      C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, sizeof(float), stream));
      if (rows == 0 || cols == 0) return;
      launch_amax(mode, out.data_ptr<float>(), nullptr);
    };
    const bool no_given = !amax_rowwise.has_value() && !amax_columnwise.has_value();
    if (rowwise && columnwise && no_given && !rht_rowwise) {
      // Both copies from one read of x: the raw amax (rowwise; also columnwise without RHT) and, with
      // the columnwise RHT, the transformed amax in the same pass.
      C10_CUDA_CHECK(cudaMemsetAsync(o.amax.data_ptr(), 0, sizeof(float), stream));
      C10_CUDA_CHECK(cudaMemsetAsync(o.amax_t.data_ptr(), 0, sizeof(float), stream));
      if (rows > 0 && cols > 0) {
        if (rht_columnwise) {
          launch_amax(3, o.amax.data_ptr<float>(), o.amax_t.data_ptr<float>());
        } else {
          launch_amax(0, o.amax.data_ptr<float>(), nullptr);
        }
      }
      if (!rht_columnwise) {
        C10_CUDA_CHECK(cudaMemcpyAsync(o.amax_t.data_ptr(), o.amax.data_ptr(), sizeof(float),
                                       cudaMemcpyDeviceToDevice, stream));
      }
    } else {
      if (rowwise) compute_amax(o.amax, amax_rowwise, rht_rowwise ? 1 : 0);
      if (columnwise) compute_amax(o.amax_t, amax_columnwise, rht_columnwise ? 2 : 0);
    }
    if (rows == 0 || cols == 0) return;
    QuantizeParams p;
    static_cast<QuantizeConfig&>(p) = cfg;
    p.vector_ok = vector_ok;
    p.codes = rowwise ? o.codes.data_ptr<uint8_t>() : nullptr;
    p.scales = rowwise ? o.scales.data_ptr<uint8_t>() : nullptr;
    p.amax = rowwise ? o.amax.data_ptr<float>() : nullptr;
    p.codes_t = columnwise ? o.codes_t.data_ptr<uint8_t>() : nullptr;
    p.scales_t = columnwise ? o.scales_t.data_ptr<uint8_t>() : nullptr;
    p.amax_t = columnwise ? o.amax_t.data_ptr<float>() : nullptr;
    const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
    VLCORE_CHECK(row_tiles <= std::numeric_limits<int32_t>::max() && col_tiles <= 65535, "nvfp4_quantize",
                 "x of shape (", rows, ", ", cols, ") is too large for this kernel (at most (2^31 - 1) * 64 rows ",
                 "and 65535 * 64 columns)");
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
    nvfp4_quantize_kernel<T><<<grid, kThreads, 0, stream>>>(xp, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
  return {o.codes, o.scales, o.amax, o.codes_t, o.scales_t, o.amax_t};
}

}  // namespace vlcore
