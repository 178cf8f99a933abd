// NVFP4 GEMM on GPUs without FP4 tensor cores (sm_80, sm_90): decode both operands to BF16, then one
// cuBLAS BF16 GEMM with FP32 accumulation.
//
// Why this route: e2m1 x E4M3 block scale has at most 6 significant bits and lies in [2^-10, 2688], so the
// BF16 copy is exact and the product is the NVFP4 GEMM up to FP32 accumulation order (what a hardware
// NVFP4 GEMM also leaves open). The decode is a streaming kernel (9 bytes read, 32 written per 16
// elements), so its cost is bounded by the copy rate, and the GEMM runs at cuBLAS's BF16 rate, which a
// hand-written mma.sync kernel does not reach on Hopper (no wgmma, no TMA pipeline).
//
// FP32 output: cublasGemmEx with BF16 A/B, an FP32 C and CUBLAS_COMPUTE_32F writes the FP32 accumulators
// directly (at::mm on BF16 inputs returns BF16, and torch's out_dtype overload is not in every torch
// version). The global scale alpha = amax_a * amax_b / 2688^2 lives on the device (no host sync), so the
// call uses CUBLAS_POINTER_MODE_DEVICE; the decode kernel writes alpha and beta = 0 next to each other.
// Reduced-precision split-K reductions are disallowed for the call, so the sum stays in FP32 until the
// final conversion to the output dtype. The BF16 copies are transient (freed when the op returns).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
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

// One operand: `blocks` 16-element blocks, block b at codes[8b .. 8b+8), scale byte scales[b], and BF16
// output out[16b .. 16b+16). Rows hold whole blocks, so the flat block index covers every row at once.
struct DecodeOperand {
  const uint8_t* codes;   // 16-byte aligned
  const uint8_t* scales;  // 2-byte aligned
  uint16_t* out;          // BF16 bits, 16-byte aligned
  int64_t blocks;
};

// Decode block pair `pair` (blocks 2*pair and 2*pair + 1): one 16-byte code load, one 2-byte scale load,
// four 16-byte stores. The last pair of an odd block count holds one block.
__device__ __forceinline__ void decode_pair(const DecodeOperand& op, int64_t pair) {
  const int64_t b = 2 * pair;
  uint32_t w[16];
  if (b + 1 < op.blocks) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(op.codes + 8 * b));
    const uint16_t s = __ldg(reinterpret_cast<const unsigned short*>(op.scales + b));
    decode_block16_bf16(q.x, q.y, static_cast<uint8_t>(s & 0xFFu), w);
    decode_block16_bf16(q.z, q.w, static_cast<uint8_t>(s >> 8), w + 8);
    uint4* dst = reinterpret_cast<uint4*>(op.out + 16 * b);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  } else {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(op.codes + 8 * b));
    decode_block16_bf16(q.x, q.y, __ldg(op.scales + b), w);
    uint4* dst = reinterpret_cast<uint4*>(op.out + 16 * b);
    dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
    dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

// Both operands in one launch (grid-stride over the pairs of A, then those of B); thread 0 also writes
// alpha and beta for the cuBLAS call that follows on the same stream.
__global__ void __launch_bounds__(kThreads) nvfp4_decode_operands_kernel(DecodeOperand a, DecodeOperand b,
                                                                         const float* __restrict__ a_amax,
                                                                         const float* __restrict__ b_amax,
                                                                         float* __restrict__ alpha_beta) {
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (first == 0) {
    alpha_beta[0] = (*a_amax) * (*b_amax) / (kFp4Fp8Max * kFp4Fp8Max);
    alpha_beta[1] = 0.0f;
  }
  const int64_t a_pairs = (a.blocks + 1) / 2, pairs = a_pairs + (b.blocks + 1) / 2;
  for (int64_t j = first; j < pairs; j += int64_t(gridDim.x) * blockDim.x) {
    if (j < a_pairs) {
      decode_pair(a, j);
    } else {
      decode_pair(b, j - a_pairs);
    }
  }
}

void check_device_arch(const char* op, const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.device().index()));
  VLCORE_CHECK(major >= 8, op, "the CUDA path needs compute capability 8.0 or later (BF16 tensor cores), got ",
               major, ".x");
}

// Restores the handle's pointer and math modes when the GEMM call returns (torch shares the handle).
class BlasModeGuard {
 public:
  explicit BlasModeGuard(cublasHandle_t handle) : handle_(handle) {
    TORCH_CUDABLAS_CHECK(cublasGetPointerMode(handle_, &pointer_mode_));
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &math_mode_));
  }
  ~BlasModeGuard() {
    cublasSetPointerMode(handle_, pointer_mode_);
    cublasSetMathMode(handle_, math_mode_);
  }

 private:
  cublasHandle_t handle_;
  cublasPointerMode_t pointer_mode_;
  cublasMath_t math_mode_;
};

}  // namespace

at::Tensor nvfp4_gemm_cuda(const at::Tensor& a_codes_in, const at::Tensor& a_scales_in, const at::Tensor& a_amax,
                           const at::Tensor& b_codes_in, const at::Tensor& b_scales_in, const at::Tensor& b_amax,
                           at::ScalarType out_dtype) {
  check_gemm(a_codes_in, a_scales_in, a_amax, b_codes_in, b_scales_in, b_amax, out_dtype);
  const c10::cuda::CUDAGuard guard(a_codes_in.device());
  check_device_arch("nvfp4_gemm", a_codes_in);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t m = a_codes_in.size(0), n = b_codes_in.size(0), k = 2 * a_codes_in.size(1);
  at::Tensor out = at::empty({m, n}, a_codes_in.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  if (k == 0) return out.zero_();  // an empty sum is 0 whatever the amaxes (alpha is not applied), as on CPU
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  VLCORE_CHECK(m <= kIntMax && n <= kIntMax && k <= kIntMax, "nvfp4_gemm", "M = ", m, ", N = ", n, ", K = ", k,
               " must each be below 2^31 (cuBLAS dimensions are int)");

  // The decode kernel's vector loads need 16-byte aligned codes and 2-byte aligned scales: a fresh
  // (aligned) copy otherwise, which only a view at an odd offset needs.
  auto aligned_copy = [](const at::Tensor& t, int bytes) {
    at::Tensor c = t.view(at::kByte).contiguous();
    return aligned(c.data_ptr(), bytes) ? c : c.clone();
  };
  auto operand = [&](const at::Tensor& codes_in, const at::Tensor& scales_in, at::Tensor& codes, at::Tensor& scales,
                     at::Tensor& decoded) {
    codes = aligned_copy(codes_in, 16);
    scales = aligned_copy(scales_in, 2);
    decoded = at::empty({codes.size(0), k}, codes.options().dtype(at::kBFloat16));
    return DecodeOperand{codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
                         reinterpret_cast<uint16_t*>(decoded.data_ptr()), codes.numel() / 8};
  };
  at::Tensor a_codes, a_scales, a_dec, b_codes, b_scales, b_dec;
  const DecodeOperand a = operand(a_codes_in, a_scales_in, a_codes, a_scales, a_dec);
  const DecodeOperand b = operand(b_codes_in, b_scales_in, b_codes, b_scales, b_dec);
  at::Tensor alpha_beta = at::empty({2}, a_codes.options().dtype(at::kFloat));
  const at::Tensor a_am = a_amax.contiguous(), b_am = b_amax.contiguous();
  nvfp4_decode_operands_kernel<<<grid_for((a.blocks + 1) / 2 + (b.blocks + 1) / 2), kThreads, 0, stream>>>(
      a, b, a_am.data_ptr<float>(), b_am.data_ptr<float>(), alpha_beta.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Row-major C [M, N] = A [M, K] . B [N, K]^T is column-major C^T [N, M] = B . A^T: cuBLAS "TN" with
  // op(B) = B^T of the column-major [K, N] view of B, all leading dimensions K (and N for C).
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const BlasModeGuard restore(handle);
  TORCH_CUDABLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_DEVICE));
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(
      handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  const float* alpha = alpha_beta.data_ptr<float>();
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                    static_cast<int>(k), alpha, b_dec.data_ptr(), CUDA_R_16BF, static_cast<int>(k),
                                    a_dec.data_ptr(), CUDA_R_16BF, static_cast<int>(k), alpha + 1, out.data_ptr(),
                                    out_dtype == at::kFloat ? CUDA_R_32F : CUDA_R_16BF, static_cast<int>(n),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return out;
}

}  // namespace vlcore
