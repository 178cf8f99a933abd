// The amax pass of the NVFP4 quantize op: a grid-stride reduction over 16-element blocks. With the
// Hadamard transform it transforms each block on the fly (the amax is taken after the transform); the raw
// and the transformed amax of the activation / gradient quantizers come from one read of x.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "nvfp4/nvfp4_cuda_common.cuh"

namespace vlcore::nvfp4_cuda {
namespace {

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

}  // namespace

void launch_nvfp4_amax(const at::Tensor& x, int mode, bool vector_ok, float* amax, float* amax_rht,
                       cudaStream_t stream) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t jobs = mode >= 2 ? (rows / kBlock) * cols : rows * ((cols + kBlock - 1) / kBlock);
  if (x.scalar_type() == at::kFloat) {
    nvfp4_amax_kernel<float><<<grid_for(jobs), kThreads, 0, stream>>>(x.data_ptr<float>(), rows, cols, mode,
                                                                       vector_ok, amax, amax_rht);
  } else {
    nvfp4_amax_kernel<c10::BFloat16><<<grid_for(jobs), kThreads, 0, stream>>>(
        x.data_ptr<c10::BFloat16>(), rows, cols, mode, vector_ok, amax, amax_rht);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vlcore::nvfp4_cuda
