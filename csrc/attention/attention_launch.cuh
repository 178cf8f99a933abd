#pragma once
// Host-side pieces shared by the forward and backward CUDA entry points: support checks, the Params of
// attention_kernel.cuh filled from tensors, and the dtype x head_dim dispatch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "attention/attention.h"
#include "attention/attention_kernel.cuh"

namespace vlcore::attention_cuda {

inline void check_cuda_support(const char* op, const at::Tensor& q) {
  VLCORE_CHECK(q.is_cuda(), op, "expected CUDA tensors, got q on ", q.device());
  VLCORE_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
               "the CUDA kernels take float16 or bfloat16 inputs, got ", q.scalar_type(),
               " (float32 / float64 run on the CPU reference)");
  const int64_t d = q.size(2);
  VLCORE_CHECK(d == 32 || d == 64 || d == 72 || d == 80 || d == 96 || d == 128, op,
               "on CUDA head_dim must be one of 32, 64, 72, 80, 96, 128, got ", d,
               " (other head dims run on the CPU reference)");
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  VLCORE_CHECK(major >= 8, op, "the CUDA kernels need compute capability 8.0 or newer (mma.sync bf16), got ", major,
               ".x");
}

// The kernels read rows with 16-byte vectors (cp.async): last dim contiguous, row and head strides
// multiples of 8 elements and a 16-byte aligned base. Anything else (a sliced head dim; a contiguous view at
// an odd storage offset, which contiguous() would return as it is) is copied once to a fresh, aligned buffer.
// Decided on the host from the strides and data_ptr: no sync.
inline at::Tensor vector_ready(const at::Tensor& t) {
  const bool ok = t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline int checked_int(const char* op, int64_t x, const char* what) {
  VLCORE_CHECK(x >= 0 && x <= std::numeric_limits<int32_t>::max(), op, what, " = ", x, " exceeds the kernels' int32 range");
  return static_cast<int>(x);
}

inline Params make_params(const char* op, const attention_detail::Shape& s, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                          const std::optional<at::Tensor>& kv_segment, const std::optional<at::Tensor>& key_lengths,
                          const at::Tensor& bias_f32, bool causal, double scale) {
  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.cu_q = cu_q.data_ptr<int32_t>();
  p.cu_k = cu_k.data_ptr<int32_t>();
  p.kv_segment = kv_segment.has_value() ? kv_segment->data_ptr<int32_t>() : nullptr;
  p.key_lengths = key_lengths.has_value() ? key_lengths->data_ptr<int32_t>() : nullptr;
  if (bias_f32.defined()) {
    p.bias = bias_f32.data_ptr<float>();
    p.bias_row_stride = bias_f32.dim() == 1 ? 1 : bias_f32.size(1);
    p.bias_head_stride = bias_f32.dim() == 1 ? 0 : 1;
  }
  p.total_q = checked_int(op, s.total_q, "total_q");
  p.total_k = checked_int(op, s.total_k, "total_k");
  p.heads_q = checked_int(op, s.heads_q, "heads_q");
  p.heads_kv = checked_int(op, s.heads_kv, "heads_kv");
  p.num_q_segments = checked_int(op, s.num_q_segments, "num_q_segments");
  p.num_k_segments = checked_int(op, s.num_k_segments, "num_k_segments");
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

inline at::Tensor contiguous_opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// Tiles per segment on the grid: at least one, so that a max_seqlen below the real lengths (even 0) still
// starts a CTA per segment, which then loops over the tiles the segment has.
inline int tiles_for(int64_t max_len, int tile) {
  return static_cast<int>(std::max<int64_t>(1, (max_len + tile - 1) / tile));
}

// grid.x = segments x tiles, checked against the hardware limit.
inline dim3 segment_grid(const char* op, int64_t segments, int tiles, int64_t heads) {
  const int64_t x = segments * tiles;
  VLCORE_CHECK(x <= std::numeric_limits<int32_t>::max() && heads <= 65535, op, "too many tiles for one launch: ",
               segments, " segments x ", tiles, " tiles, ", heads, " heads");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(heads));
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p) {
  if (grid.x == 0 || grid.y == 0) return;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn.template operator()<T, D, kHasBias>() for the input's dtype, head dim (checked by
// check_cuda_support) and whether there is a key_bias (compiled out of the kernels when absent).
template <typename Fn>
void dispatch(at::ScalarType dtype, int64_t head_dim, bool has_bias, Fn&& fn) {
  auto by_bias = [&]<typename T, int D>() {
    if (has_bias) {
      fn.template operator()<T, D, true>();
    } else {
      fn.template operator()<T, D, false>();
    }
  };
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (head_dim) {
      case 32: by_bias.template operator()<T, 32>(); break;
      case 64: by_bias.template operator()<T, 64>(); break;
      case 72: by_bias.template operator()<T, 72>(); break;
      case 80: by_bias.template operator()<T, 80>(); break;
      case 96: by_bias.template operator()<T, 96>(); break;
      default: by_bias.template operator()<T, 128>(); break;
    }
  };
  if (dtype == at::kHalf) {
    by_dim(__half{});
  } else {
    by_dim(__nv_bfloat16{});
  }
}

}  // namespace vlcore::attention_cuda
