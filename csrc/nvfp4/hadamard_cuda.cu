// The blockwise 16-point random Hadamard transform alone (differentiable op; the quantize kernels apply it
// on the fly). Butterfly order of nvfp4_math.h, the same bits as the CPU reference.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/Dispatch.h>
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

}  // namespace

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
