// CUDA entry point of the attention backward (kernels in attention_kernel.cuh): the short-key kernel when
// every key segment fits one CTA (dK, dV, dQ and delta in one pass, deterministic); otherwise a delta
// preprocess, then dK/dV (+ dQ by float32 atomics) per key tile, or dK/dV then a deterministic dQ pass.
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>

#include "attention/attention_launch.cuh"
#include "ops.h"

namespace vlcore {
namespace {

// Query segments grouped by the key segment they read, on the device (no host sync):
// reader_order[reader_offsets[s] .. reader_offsets[s + 1]) are the query segments reading key segment s.
std::pair<at::Tensor, at::Tensor> readers_of(const std::optional<at::Tensor>& kv_segment, int64_t num_q,
                                             int64_t num_k, const at::TensorOptions& int_opts) {
  if (!kv_segment.has_value()) {  // segment i reads segment i
    return {at::arange(num_q, int_opts), at::arange(num_k + 1, int_opts)};
  }
  // Out-of-range entries are parked on segment 0 here; the kernels give them no keys (segment_of).
  const at::Tensor target = kv_segment->to(at::kLong).clamp(0, num_k - 1);
  const at::Tensor order = at::argsort(target, /*stable=*/true, /*dim=*/0, /*descending=*/false).to(at::kInt);
  const at::Tensor counts = at::zeros({num_k}, target.options()).index_add_(0, target, at::ones({num_q}, target.options()));
  const at::Tensor offsets = at::cat({at::zeros({1}, target.options()), counts.cumsum(0)}).to(at::kInt);
  return {order, offsets};
}

// The short-key backward is taken when max_seqlen_k fits one CTA; VLCORE_ATTENTION_SHORT_BACKWARD=0 turns it
// off (the tests use it to reach the tiled paths on short shapes too).
bool short_backward_enabled() {
  const char* flag = std::getenv("VLCORE_ATTENTION_SHORT_BACKWARD");
  return flag == nullptr || std::string(flag) != "0";
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool bias_requires_grad,
    bool deterministic) {
  using namespace attention_cuda;
  constexpr const char* op = "attention_backward";
  const attention_detail::Shape s = attention_detail::check_forward(
      op, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, kv_segment, key_lengths);
  attention_detail::check_backward(op, s, q_in, grad_out_in, out_in, lse_in, grad_lse);
  VLCORE_CHECK(!bias_requires_grad || key_bias.has_value(), op, "bias_requires_grad needs a key_bias");
  check_cuda_support(op, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const at::Tensor dout = vector_ready(grad_out_in.stride(-1) == 1 ? grad_out_in : grad_out_in.contiguous());
  const at::Tensor out = vector_ready(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor dlse = grad_lse.has_value() ? grad_lse->contiguous() : at::Tensor();
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const std::optional<at::Tensor> seg = kv_segment.has_value() ? std::optional(kv_segment->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> lens = key_lengths.has_value() ? std::optional(key_lengths->contiguous()) : std::nullopt;
  const at::Tensor bias = key_bias.has_value() ? key_bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto f32 = q.options().dtype(at::kFloat);

  at::Tensor dk = at::empty({s.total_k, s.heads_kv, s.head_dim}, q.options());
  at::Tensor dv = at::empty({s.total_k, s.heads_kv, s.head_dim}, q.options());
  at::Tensor dbias = bias_requires_grad ? at::zeros({s.total_k, s.heads_q}, f32) : at::Tensor();
  at::Tensor dq = at::empty({s.total_q, s.heads_q, s.head_dim}, q.options());
  at::Tensor delta, dq_accum;  // the tiled paths only
  const auto [order, offsets] = readers_of(seg, s.num_q_segments, s.num_k_segments, cu_q.options());

  Params p = make_params(op, s, q, k, v, cu_q, cu_k, seg, lens, bias, causal, scale);
  p.dout = dout.data_ptr();
  p.do_row_stride = dout.stride(0);
  p.do_head_stride = dout.stride(1);
  p.o = out.data_ptr();
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.lse = lse.data_ptr<float>();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.reader_order = order.data_ptr<int32_t>();
  p.reader_offsets = offsets.data_ptr<int32_t>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dbias = bias_requires_grad ? dbias.data_ptr<float>() : nullptr;

  dispatch(q.scalar_type(), s.head_dim, bias.defined(), [&]<typename T, int D, bool kHasBias>() {
    using C = Tiles<D>;
    // Short key segments (the fusion shapes): one CTA holds a whole segment, dQ without atomics.
    const int64_t strips = std::max<int64_t>(1, (max_seqlen_k + 15) / 16);
    if (strips <= C::kShortMaxWarps && short_backward_enabled()) {
      const int warps = static_cast<int>(strips);
      launch(attention_backward_short_kernel<T, D, kHasBias>, segment_grid(op, s.num_k_segments, 1, s.heads_kv),
             32 * warps, C::short_smem(sizeof(T), 16 * warps), p);
      return;
    }
    delta = at::empty({s.heads_q, s.total_q}, f32);
    p.delta = delta.data_ptr<float>();
    constexpr int kDeltaThreads = 256;  // 8 warps, one (row, head) each
    const int64_t delta_blocks = (s.total_q * s.heads_q + kDeltaThreads / 32 - 1) / (kDeltaThreads / 32);
    VLCORE_CHECK(delta_blocks <= std::numeric_limits<int32_t>::max(), op, "too many rows for one launch");
    launch(attention_backward_delta_kernel<T, D>, dim3(static_cast<unsigned>(delta_blocks)), kDeltaThreads, 0, p);
    p.k_tiles = tiles_for(max_seqlen_k, C::kBwdKeys);
    p.q_tiles = tiles_for(max_seqlen_q, C::kQueries);
    const dim3 key_grid = segment_grid(op, s.num_k_segments, p.k_tiles, s.heads_kv);
    if (deterministic) {
      launch(attention_backward_dkdv_kernel<T, D, false, kHasBias>, key_grid, C::kThreads, C::dkdv_smem(sizeof(T)), p);
      launch(attention_backward_dq_kernel<T, D, kHasBias>, segment_grid(op, s.num_q_segments, p.q_tiles, s.heads_q),
             C::kThreads, C::dq_smem(sizeof(T)), p);
    } else {
      dq_accum = at::zeros({s.total_q, s.heads_q, s.head_dim}, f32);
      p.dq_accum = dq_accum.data_ptr<float>();
      launch(attention_backward_dkdv_kernel<T, D, true, kHasBias>, key_grid, C::kThreads, C::dkdv_smem(sizeof(T)), p);
      dq.copy_(dq_accum);
    }
  });

  at::Tensor grad_bias = at::empty({0}, q.options());
  if (bias_requires_grad) grad_bias = (key_bias->dim() == 1 ? dbias.sum(1) : dbias).to(key_bias->scalar_type());
  return {dq, dk, dv, grad_bias};
}

}  // namespace vlcore
