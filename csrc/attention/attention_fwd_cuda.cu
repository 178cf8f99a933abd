// CUDA entry point of the attention forward (kernels in attention_kernel.cuh).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/attention_launch.cuh"
#include "ops.h"

namespace vlcore {

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool /*deterministic*/) {
  using namespace attention_cuda;
  constexpr const char* op = "attention_forward";
  const attention_detail::Shape s = attention_detail::check_forward(
      op, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, kv_segment, key_lengths);
  check_cuda_support(op, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const std::optional<at::Tensor> seg = kv_segment.has_value() ? std::optional(kv_segment->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> lens = key_lengths.has_value() ? std::optional(key_lengths->contiguous()) : std::nullopt;
  const at::Tensor bias = key_bias.has_value() ? key_bias->to(at::kFloat).contiguous() : at::Tensor();

  at::Tensor out = at::empty({s.total_q, s.heads_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.heads_q, s.total_q}, q.options().dtype(at::kFloat));
  if (s.total_q == 0) return {out, lse};

  Params p = make_params(op, s, q, k, v, cu_q, cu_k, seg, lens, bias, causal, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  dispatch(q.scalar_type(), s.head_dim, bias.defined(), [&]<typename T, int D, bool kHasBias>() {
    using C = Tiles<D>;
    p.q_tiles = tiles_for(max_seqlen_q, C::kQueries);
    launch(attention_forward_kernel<T, D, kHasBias>, segment_grid(op, s.num_q_segments, p.q_tiles, s.heads_q), C::kThreads,
           C::forward_smem(sizeof(T)), p);
  });
  return {out, lse};
}

}  // namespace vlcore
