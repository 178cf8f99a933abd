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
// Fused quantize of one 64x64 tile. Thread t loads row t/4, columns (t%4)*16 .. +16 with 16-byte loads
// (its rowwise job); after the tile is in shared memory it takes column t%64, rows (t/64)*16 .. +16 (its
// columnwise job). Each job is one 16-element block: one Philox draw when stochastic (nvfp4_math.h).
// Stores are wide: rowwise codes 16 bytes per lane pair, the transposed columnwise codes staged in shared
// memory and written 16 bytes per thread along each output row, scales 4 bytes (the 4 blocks of a tile
// row are adjacent in the plain layout and, at a multiple of 4, in the swizzled one).

// The checked configuration plus what the kernel needs to find its data.
struct QuantizeParams : QuantizeConfig {
  bool vector_ok;  // x is 16-byte aligned with whole 16-element row segments
  uint8_t* codes;
  uint8_t* scales;
  const float* amax;
  uint8_t* codes_t;
  uint8_t* scales_t;
  const float* amax_t;
};

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kStagePitch = 48;  // bytes per staged columnwise output row: 32 used, 16-byte aligned, fewer conflicts

__device__ __forceinline__ uint2 pack_codes8(const uint8_t* packed) {
  return make_uint2(packed[0] | (packed[1] << 8) | (packed[2] << 16) | (uint32_t(packed[3]) << 24),
                    packed[4] | (packed[5] << 8) | (packed[6] << 16) | (uint32_t(packed[7]) << 24));
}

// Store the scale bytes of 4 adjacent blocks (byte j of `word` for block j): one 4-byte store when all 4
// exist and the destination is 4-byte aligned, else a byte per existing block (shifts, not an array
// indexed at run time, so that nothing goes to local memory).
__device__ __forceinline__ void store_scales4(uint8_t* dst, uint32_t word, int valid, bool word_ok) {
  if (valid == 4 && word_ok) {
    *reinterpret_cast<uint32_t*>(dst) = word;
  } else {
    for (int i = 0; i < valid; ++i) dst[i] = static_cast<uint8_t>(word >> (8 * i));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_quantize_kernel(const T* __restrict__ x, QuantizeParams p) {
  __shared__ float tile[kTile][kTile + 1];    // +1: conflict-free column reads
  __shared__ float seg_amax[kTile][kTile / kBlock];  // amax of each 1x16 row segment (for 16x16 tiles)
  __shared__ __align__(16) uint8_t stage_codes[kTile][kStagePitch];  // columnwise codes of this tile
  __shared__ __align__(4) uint8_t stage_scales[kTile][kTile / kBlock];  // columnwise scales of this tile
  const int t = threadIdx.x, lane = t & 31;
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

  if (p.rowwise) {  // rowwise needs cols % 16 == 0: a segment is whole or absent
    uint8_t packed[8] = {};
    uint8_t scale = 0;
    const int64_t blocks_per_row = p.cols / kBlock;
    if (in_tile) {
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
      const uint64_t block = static_cast<uint64_t>(r * blocks_per_row + c / kBlock);
      const Philox4 rand = p.stochastic ? sr_bits(p.seed, p.offset, 0, block) : Philox4{};
      scale = quantize_block16(v, block_amax, s_enc, s_dec, p.stochastic, rand, packed);
    }
    // Lanes 4k..4k+3 hold the 4 segments of one tile row: exchange so that wide stores can be used.
    const uint2 mine = pack_codes8(packed);
    const uint32_t next_x = __shfl_down_sync(kFullMask, mine.x, 1), next_y = __shfl_down_sync(kFullMask, mine.y, 1);
    uint32_t row_scales = 0;  // the scale bytes of this tile row's 4 segments, segment j in byte j
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      row_scales |= (__shfl_sync(kFullMask, uint32_t(scale), (lane & ~3) + j) & 0xFFu) << (8 * j);
    }
    if (in_tile) {
      uint8_t* dst = p.codes + r * (p.cols / 2) + c / 2;
      if (p.cols % 32 == 0) {  // rows of 16-byte multiples: lane pairs (seg 0,1), (2,3) write 16 bytes
        if ((seg & 1) == 0) *reinterpret_cast<uint4*>(dst) = make_uint4(mine.x, mine.y, next_x, next_y);
      } else {
        *reinterpret_cast<uint2*>(dst) = mine;  // 8-byte aligned: the row pitch is a multiple of 8
      }
      if (seg == 0) {
        const int64_t b0 = c / kBlock;
        const int n = static_cast<int>(blocks_per_row - b0 < 4 ? blocks_per_row - b0 : 4);
        if (p.swizzle) {
          store_scales4(p.scales + swizzled_scale_index(r, b0, blocks_per_row), row_scales, n, true);
        } else {
          store_scales4(p.scales + r * blocks_per_row + b0, row_scales, n, blocks_per_row % 4 == 0);
        }
      }
    }
  }

  if (p.columnwise) {  // columnwise needs rows % 16 == 0: a segment is whole or absent
    const int lc = t % kTile, rb = t / kTile;
    const int64_t col = c0 + lc, row = r0 + rb * kBlock;
    const int64_t blocks_per_col = p.rows / kBlock;  // blocks per row of the transposed output
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
      const uint64_t block = static_cast<uint64_t>(col * blocks_per_col + row / kBlock);
      const Philox4 rand = p.stochastic ? sr_bits(p.seed, p.offset, 1, block) : Philox4{};
      uint8_t packed[8];
      stage_scales[lc][rb] = quantize_block16(w, block_amax, s_enc, s_dec, p.stochastic, rand, packed);
      *reinterpret_cast<uint2*>(&stage_codes[lc][rb * 8]) = pack_codes8(packed);
    }
    __syncthreads();
    if (t < 2 * kTile) {  // codes: output row c0 + t/2, 16 bytes (32 rows of x) per thread
      const int lc2 = t / 2, half = t % 2;
      const int64_t col2 = c0 + lc2, row_first = r0 + half * 32;
      if (col2 < p.cols && row_first < p.rows) {
        uint8_t* dst = p.codes_t + col2 * (p.rows / 2) + row_first / 2;
        const uint4 q = *reinterpret_cast<const uint4*>(&stage_codes[lc2][half * 16]);
        const bool second = row_first + 16 < p.rows;  // rows % 16 == 0: the first 16 rows exist
        if (second && p.rows % 32 == 0) {
          *reinterpret_cast<uint4*>(dst) = q;
        } else {
          *reinterpret_cast<uint2*>(dst) = make_uint2(q.x, q.y);
          if (second) *reinterpret_cast<uint2*>(dst + 8) = make_uint2(q.z, q.w);
        }
      }
    } else if (t < 3 * kTile) {  // scales: the 4 blocks of output row c0 + lc2 in this tile
      const int lc2 = t - 2 * kTile;
      const int64_t col2 = c0 + lc2, b0 = r0 / kBlock;
      if (col2 < p.cols) {
        const int n = static_cast<int>(blocks_per_col - b0 < 4 ? blocks_per_col - b0 : 4);
        const uint32_t tile_scales = *reinterpret_cast<const uint32_t*>(stage_scales[lc2]);
        if (p.swizzle) {
          store_scales4(p.scales_t + swizzled_scale_index(col2, b0, blocks_per_col), tile_scales, n, true);
        } else {
          store_scales4(p.scales_t + col2 * blocks_per_col + b0, tile_scales, n, blocks_per_col % 4 == 0);
        }
      }
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
