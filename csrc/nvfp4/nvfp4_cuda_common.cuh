#pragma once
// Helpers shared by the NVFP4 CUDA kernels (one kernel family per .cu): launch shape, element loads,
// alignment and architecture checks, and the amax pass that the quantize op launches.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "nvfp4/nvfp4_math.h"

namespace vlcore::nvfp4_cuda {
using namespace nvfp4;

constexpr int kThreads = 256;

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

inline unsigned grid_for(int64_t jobs) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((jobs + kThreads - 1) / kThreads, 8192)));
}

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// amax of x [rows, cols] (bf16 or fp32, contiguous) into *amax (and *amax_rht), which must be zeroed first.
// mode 0: raw values; 1: row segments Hadamard-transformed; 2: column segments transformed; 3: column
// segments, raw amax into `amax` and transformed into `amax_rht` from one read of x.
void launch_nvfp4_amax(const at::Tensor& x, int mode, bool vector_ok, float* amax, float* amax_rht,
                       cudaStream_t stream);

}  // namespace vlcore::nvfp4_cuda
