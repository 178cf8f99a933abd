// NVFP4 dequantize: e2m1(code) x E4M3 scale x amax / 2688, the arithmetic of nvfp4_math.h.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "nvfp4/nvfp4.h"
#include "nvfp4/nvfp4_cuda_common.cuh"
#include "ops.h"

namespace vlcore {
namespace {
using namespace nvfp4;
using namespace nvfp4_detail;
using namespace nvfp4_cuda;

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

}  // namespace

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

}  // namespace vlcore
