// NVFP4 GEMM (Hopper has no FP4 tensor cores): cp.async streams the packed codes of 128x32 tiles of A and B
// into shared memory (double buffered); each thread decodes one 16-element block to e2m1 x block scale in
// BF16, which is exact (<= 6 significant bits, range [2^-10, 2688]); mma.sync m16n8k16 BF16 with FP32
// accumulation; alpha = amax_a * amax_b / 2688^2 in the epilogue. No host synchronisation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <limits>
#include <type_traits>

#include "nvfp4/nvfp4.h"
#include "nvfp4/nvfp4_cuda_common.cuh"
#include "ops.h"

namespace vlcore {
namespace {
using namespace nvfp4;
using namespace nvfp4_detail;
using namespace nvfp4_cuda;

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

void check_device_arch(const char* op, const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  VLCORE_CHECK(major >= 8, op, "the CUDA kernel needs compute capability 8.0 or later (mma.sync bf16, cp.async), ",
               "got ", major, ".x");
}

}  // namespace

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

}  // namespace vlcore
