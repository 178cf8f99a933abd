// CUDA kernels of the NVFP4 family. The per-element and per-block arithmetic is nvfp4_math.h, shared with
// the CPU reference, so the codes, scales and amax are bit-identical to it (the tests compare them on every
// device). What differs is only the schedule:
//
// - quantize: an amax pass (a grid-stride reduction; with the Hadamard transform it transforms each block
//   on the fly, since the amax is taken after the transform; the raw and the transformed amax of the
//   activation / gradient quantizers come from one read of x), then one fused pass over 64x64 tiles staged
//   in shared memory, which emits the rowwise copy (1x16 row segments) and the transposed columnwise copy
//   (16x1 column segments) from the same tile: x is read once for both orientations.
// - GEMM (Hopper has no FP4 tensor cores): cp.async streams the packed codes of 128x32 tiles of A and B
//   into shared memory (double buffered); each thread decodes one 16-element block to e2m1 x block scale
//   in BF16, which is exact (<= 6 significant bits, range [2^-10, 2688]); mma.sync m16n8k16 BF16 with
//   FP32 accumulation; alpha = amax_a * amax_b / 2688^2 in the epilogue. Equal to the hardware NVFP4 GEMM
//   up to FP32 accumulation order.
//
// No host synchronisation anywhere: the amax and alpha are read by the kernels from device memory.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "nvfp4/nvfp4.h"
#include "nvfp4/nvfp4_math.h"
#include "ops.h"

namespace vlcore {
namespace {
using namespace nvfp4;
using namespace nvfp4_detail;

constexpr int kThreads = 256;
constexpr int kTile = 64;  // quantize tile: 64 x 64 elements

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// 16 consecutive elements starting at p, of which the first `valid` exist (the rest read as 0).
// `vector_ok`: p is 16-byte aligned and all 16 exist, so 16-byte loads can be used.
template <typename T>
__device__ __forceinline__ void load16(const T* p, int valid, bool vector_ok, float* v) {
  if constexpr (sizeof(T) == 2) {
    if (vector_ok) {
      const uint4 w0 = reinterpret_cast<const uint4*>(p)[0], w1 = reinterpret_cast<const uint4*>(p)[1];
      const uint32_t w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // bf16 -> fp32 is a 16-bit shift
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
      }
      return;
    }
  } else {
    if (vector_ok) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 f = reinterpret_cast<const float4*>(p)[i];
        v[4 * i] = f.x;
        v[4 * i + 1] = f.y;
        v[4 * i + 2] = f.z;
        v[4 * i + 3] = f.w;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = i < valid ? to_float(p[i]) : 0.0f;
}

__device__ __forceinline__ float warp_max(float m) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = max_drop_nan(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
  return m;
}

// Non-negative, non-NaN floats order like their bit patterns, so atomicMax on the bits is a float max.
__device__ __forceinline__ void atomic_max_nonneg(float* dst, float v) {
  atomicMax(reinterpret_cast<unsigned int*>(dst), __float_as_uint(v));
}

// ---------------------------------------------------------------------------------------------------------
// amax: each job is one 16-element block. mode 0: raw values (row segments); 1: row segments transformed
// (rowwise RHT); 2: column segments transformed (columnwise RHT: 16 rows of one column); 3: column
// segments, the raw amax into `amax` and the transformed one into `amax_rht` from a single read of x
// (the activation and gradient quantizers need both).
// Every transformed value is rounded to BF16 first, as in the quantize pass.

template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_amax_kernel(const T* __restrict__ x, int64_t rows, int64_t cols,
                                                              int mode, bool vector_ok, float* __restrict__ amax,
                                                              float* __restrict__ amax_rht) {
  float m = 0.0f, m_rht = 0.0f;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (mode >= 2) {
    const int64_t jobs = (rows / kBlock) * cols;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < jobs; j += stride) {
      const int64_t g = j / cols, c = j - g * cols;  // consecutive threads: consecutive columns (coalesced)
      float v[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = to_float(x[(g * kBlock + i) * cols + c]);
      if (mode == 3) m = max_drop_nan(m, block_abs_max(v));
      hadamard16_forward(v, kDefaultSignMask);
#pragma unroll
      for (int i = 0; i < 16; ++i) m_rht = max_drop_nan(m_rht, abs_f(round_to_bf16(v[i])));
    }
    if (mode == 2) {
      m = m_rht;
      m_rht = 0.0f;
    }
  } else {
    const int64_t blocks_per_row = (cols + kBlock - 1) / kBlock;
    const int64_t jobs = rows * blocks_per_row;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < jobs; j += stride) {
      const int64_t r = j / blocks_per_row, c0 = (j - r * blocks_per_row) * kBlock;
      const int valid = static_cast<int>(cols - c0 < kBlock ? cols - c0 : kBlock);
      float v[16];
      load16(x + r * cols + c0, valid, vector_ok && valid == kBlock, v);
      if (mode == 1) {
        hadamard16_forward(v, kDefaultSignMask);
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = round_to_bf16(v[i]);
      }
      m = max_drop_nan(m, block_abs_max(v));
    }
  }
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0 && m > 0.0f) atomic_max_nonneg(amax, m);
  if (mode == 3) {
    m_rht = warp_max(m_rht);
    if ((threadIdx.x & 31) == 0 && m_rht > 0.0f) atomic_max_nonneg(amax_rht, m_rht);
  }
}

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

unsigned grid_for(int64_t jobs) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((jobs + kThreads - 1) / kThreads, 8192)));
}

// ---------------------------------------------------------------------------------------------------------
// Dequantize: one thread per code byte (two elements).

template <typename out_t>
__global__ void nvfp4_dequantize_kernel(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                                        const float* __restrict__ amax, out_t* __restrict__ out, int64_t rows,
                                        int64_t cols) {
  const float factor = decode_factor(*amax);
  const int64_t bytes = rows * (cols / 2);
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < bytes; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = j / (cols / 2), i = 2 * (j - r * (cols / 2));
    const float sb = e4m3_to_float(scales[r * (cols / 16) + i / 16]);
    const uint8_t b = codes[j];
    out[r * cols + i] = static_cast<out_t>((e2m1_to_float(b & 0xF) * sb) * factor);
    out[r * cols + i + 1] = static_cast<out_t>((e2m1_to_float(b >> 4) * sb) * factor);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Hadamard transform alone: one thread per 16-element block, FP32 (double for double) in butterfly order.

template <typename T>
__global__ void hadamard_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t blocks, bool inverse,
                                uint32_t mask) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += int64_t(gridDim.x) * blockDim.x) {
    acc_t v[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = static_cast<acc_t>(x[b * 16 + i]);
    if (inverse) {
      hadamard16_inverse(v, mask);
    } else {
      hadamard16_forward(v, mask);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) out[b * 16 + i] = static_cast<T>(v[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// GEMM: C[M, N] = alpha * A[M, K] . B[N, K]^T, A and B as packed codes + E4M3 scales (both K-major).

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kPitch = kBK + 8;  // bf16 elements per smem row: 80 bytes, ldmatrix conflict-free

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 8-byte async copy global -> shared; src_bytes = 0 zero-fills (out-of-range rows / K tail).
__device__ __forceinline__ void cp_async8(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_bf16_16816(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // exact: e2m1 x E4M3 has <= 6 significant bits
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Decode 8 code bytes (16 elements) times the block scale into 16 bf16 at dst (32 bytes, 16B-aligned).
__device__ __forceinline__ void decode_block(const uint8_t* raw, float scale, const float* lut, __nv_bfloat16* dst) {
  const uint2 q = *reinterpret_cast<const uint2*>(raw);
  uint32_t out[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t byte_lo = (q.x >> (8 * i)) & 0xFFu, byte_hi = (q.y >> (8 * i)) & 0xFFu;
    out[i] = pack_bf16x2(lut[byte_lo & 0xF] * scale, lut[byte_lo >> 4] * scale);
    out[4 + i] = pack_bf16x2(lut[byte_hi & 0xF] * scale, lut[byte_hi >> 4] * scale);
  }
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(out[0], out[1], out[2], out[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(out[4], out[5], out[6], out[7]);
}

template <typename out_t>
__global__ void __launch_bounds__(kThreads) nvfp4_gemm_kernel(
    const uint8_t* __restrict__ a_codes, const uint8_t* __restrict__ a_scales, const float* __restrict__ a_amax,
    const uint8_t* __restrict__ b_codes, const uint8_t* __restrict__ b_scales, const float* __restrict__ b_amax,
    out_t* __restrict__ c, int64_t m_size, int64_t n_size, int64_t k_size) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(16) uint8_t raw_a[2][kBM][kBK / 2];
  __shared__ __align__(16) uint8_t raw_b[2][kBN][kBK / 2];
  __shared__ __align__(16) __nv_bfloat16 tile_a[kBM][kPitch];
  __shared__ __align__(16) __nv_bfloat16 tile_b[kBN][kPitch];
  __shared__ float lut[16];

  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps, 64 x 32 outputs each
  // M tiles in x (up to 2^31 - 1 blocks), N tiles in y (at most 65535).
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t k_bytes = k_size / 2, k_blocks = k_size / kBlock;
  const int k_tiles = static_cast<int>((k_size + kBK - 1) / kBK);
  if (t < 16) lut[t] = e2m1_to_float(static_cast<uint8_t>(t));

  // This thread's copy / decode job in every k tile: row t/2, 16-element half (t%2), for A and for B.
  const int job_row = t / 2, job_half = t % 2;
  const int64_t a_row = m0 + job_row, b_row = n0 + job_row;
  auto issue = [&](int kt, int buf, float& sa, float& sb) {
    const int64_t kblock = int64_t(kt) * 2 + job_half;
    const bool k_ok = kblock < k_blocks;
    const bool a_ok = k_ok && a_row < m_size, b_ok = k_ok && b_row < n_size;
    cp_async8(&raw_a[buf][job_row][job_half * 8], a_ok ? a_codes + a_row * k_bytes + kblock * 8 : a_codes, a_ok ? 8 : 0);
    cp_async8(&raw_b[buf][job_row][job_half * 8], b_ok ? b_codes + b_row * k_bytes + kblock * 8 : b_codes, b_ok ? 8 : 0);
    cp_async_commit();
    sa = a_ok ? e4m3_to_float(a_scales[a_row * k_blocks + kblock]) : 0.0f;
    sb = b_ok ? e4m3_to_float(b_scales[b_row * k_blocks + kblock]) : 0.0f;
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  float sa_cur = 0.0f, sb_cur = 0.0f, sa_next = 0.0f, sb_next = 0.0f;
  if (k_tiles > 0) issue(0, 0, sa_cur, sb_cur);
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < k_tiles) {
      issue(kt + 1, buf ^ 1, sa_next, sb_next);  // overlaps with this tile's decode and MMAs
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // raw[buf] landed for every thread; the previous MMAs are done with tile_a/tile_b
    decode_block(&raw_a[buf][job_row][job_half * 8], sa_cur, lut, &tile_a[job_row][job_half * 16]);
    decode_block(&raw_b[buf][job_row][job_half * 8], sb_cur, lut, &tile_b[job_row][job_half * 16]);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t a_frag[4][4], b_frag[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        ldmatrix_x4(a_frag[mt], &tile_a[warp_m * 64 + mt * 16 + (lane % 16)][ks + (lane / 16) * 8]);
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, &tile_b[warp_n * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3)][ks + ((lane >> 3) & 1) * 8]);
        b_frag[2 * np][0] = r[0];
        b_frag[2 * np][1] = r[1];
        b_frag[2 * np + 1][0] = r[2];
        b_frag[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_bf16_16816(acc[mt][nt], a_frag[mt], b_frag[nt]);
    }
    sa_cur = sa_next;
    sb_cur = sb_next;
  }

  const float alpha = (*a_amax) * (*b_amax) / (kFp4Fp8Max * kFp4Fp8Max);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int64_t col = n0 + warp_n * 32 + nt * 8 + (lane % 4) * 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = m0 + warp_m * 64 + mt * 16 + lane / 4 + half * 8;
        if (row < m_size && col < n_size) {  // n_size is even: col + 1 is in range too
          const float v0 = alpha * acc[mt][nt][2 * half], v1 = alpha * acc[mt][nt][2 * half + 1];
          if constexpr (std::is_same_v<out_t, float>) {
            *reinterpret_cast<float2*>(c + row * n_size + col) = make_float2(v0, v1);
          } else {
            *reinterpret_cast<__nv_bfloat162*>(c + row * n_size + col) = __floats2bfloat162_rn(v0, v1);
          }
        }
      }
    }
  }
#else
  __trap();  // the host entry point refuses devices below sm_80
#endif
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_device_arch(const char* op, const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  VLCORE_CHECK(major >= 8, op, "the CUDA kernel needs compute capability 8.0 or later (mma.sync bf16, cp.async), ",
               "got ", major, ".x");
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
      const int64_t jobs = mode >= 2 ? (rows / kBlock) * cols : rows * ((cols + kBlock - 1) / kBlock);
      nvfp4_amax_kernel<T><<<grid_for(jobs), kThreads, 0, stream>>>(xp, rows, cols, mode, vector_ok, out, out_rht);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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

at::Tensor nvfp4_dequantize_cuda(const at::Tensor& codes_in, const at::Tensor& scales_in, const at::Tensor& amax,
                                 at::ScalarType dtype) {
  check_dequantize(codes_in, scales_in, amax, dtype);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scales = scales_in.view(at::kByte).contiguous();
  const at::Tensor amax_c = amax.contiguous();
  const int64_t rows = codes.size(0), cols = 2 * codes.size(1);
  at::Tensor out = at::empty({rows, cols}, codes.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const unsigned blocks = grid_for(rows * cols / 2);
  if (dtype == at::kFloat) {
    nvfp4_dequantize_kernel<float><<<blocks, kThreads, 0, stream>>>(
        codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), amax_c.data_ptr<float>(), out.data_ptr<float>(), rows,
        cols);
  } else {
    nvfp4_dequantize_kernel<c10::BFloat16><<<blocks, kThreads, 0, stream>>>(
        codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), amax_c.data_ptr<float>(),
        out.data_ptr<c10::BFloat16>(), rows, cols);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor nvfp4_gemm_cuda(const at::Tensor& a_codes_in, const at::Tensor& a_scales_in, const at::Tensor& a_amax,
                           const at::Tensor& b_codes_in, const at::Tensor& b_scales_in, const at::Tensor& b_amax,
                           at::ScalarType out_dtype) {
  check_gemm(a_codes_in, a_scales_in, a_amax, b_codes_in, b_scales_in, b_amax, out_dtype);
  const c10::cuda::CUDAGuard guard(a_codes_in.device());
  check_device_arch("nvfp4_gemm", a_codes_in);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // cp.async copies 8 bytes: every row starts 8-byte aligned (K/2 % 8 == 0); the base pointer must be too.
  auto aligned_codes = [](const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    return aligned(c.data_ptr(), 8) ? c : c.clone();
  };
  const at::Tensor a_codes = aligned_codes(a_codes_in), b_codes = aligned_codes(b_codes_in);
  const at::Tensor a_scales = a_scales_in.view(at::kByte).contiguous(), b_scales = b_scales_in.view(at::kByte).contiguous();
  const at::Tensor a_am = a_amax.contiguous(), b_am = b_amax.contiguous();
  const int64_t m = a_codes.size(0), n = b_codes.size(0), k = 2 * a_codes.size(1);
  at::Tensor out = at::empty({m, n}, a_codes.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  if (k == 0) return out.zero_();  // an empty sum is 0 whatever the amaxes (alpha is not applied), as on CPU
  const int64_t m_tiles = (m + kBM - 1) / kBM, n_tiles = (n + kBN - 1) / kBN;
  VLCORE_CHECK(m_tiles <= std::numeric_limits<int32_t>::max() && n_tiles <= 65535, "nvfp4_gemm", "M = ", m,
               ", N = ", n, " is too large for this kernel (at most (2^31 - 1) * 128 and 65535 * 128)");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  if (out_dtype == at::kFloat) {
    nvfp4_gemm_kernel<float><<<grid, kThreads, 0, stream>>>(
        a_codes.data_ptr<uint8_t>(), a_scales.data_ptr<uint8_t>(), a_am.data_ptr<float>(), b_codes.data_ptr<uint8_t>(),
        b_scales.data_ptr<uint8_t>(), b_am.data_ptr<float>(), out.data_ptr<float>(), m, n, k);
  } else {
    nvfp4_gemm_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
        a_codes.data_ptr<uint8_t>(), a_scales.data_ptr<uint8_t>(), a_am.data_ptr<float>(), b_codes.data_ptr<uint8_t>(),
        b_scales.data_ptr<uint8_t>(), b_am.data_ptr<float>(),
        reinterpret_cast<__nv_bfloat16*>(out.data_ptr<c10::BFloat16>()), m, n, k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor hadamard_transform_cuda(const at::Tensor& x_in, bool inverse, int64_t sign_mask) {
  check_hadamard(x_in, sign_mask);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t blocks = x.numel() / 16;
  if (blocks == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hadamard_transform_cuda", [&] {
    hadamard_kernel<scalar_t><<<grid_for(blocks), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), blocks, inverse, static_cast<uint32_t>(sign_mask));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace vlcore
