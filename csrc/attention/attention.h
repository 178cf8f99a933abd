#pragma once
// Argument checks and output shapes shared by the CPU and CUDA backends of the attention family.
//
// Layout (flash-attn varlen): q [total_q, Hq, D], k/v [total_k, Hkv, D] with Hq % Hkv == 0, int32
// cu_seqlens_q [Sq + 1] and cu_seqlens_k [Sk + 1] with a leading 0. Query segment i attends to key segment
// kv_segment[i] (default i, then Sq == Sk). Optional:
//   key_bias    [total_k] or [total_k, Hq], added to the scaled logits (ToMe's log(size), -inf key masks);
//   key_lengths int32 [Sq]: only the first key_lengths[i] keys of query segment i's key segment are read
//               (values are clamped to [0, segment length]); the causal alignment still uses the full length.
// causal aligns the mask bottom-right: row r of a segment with nq queries and nk keys sees keys
// j <= r + nk - nq. A query row that sees no key gets out = 0 and lse = -inf.
// Outputs: out [total_q, Hq, D] (q's dtype), lse [Hq, total_q] (float64 for float64 inputs, else float32).
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "common/checks.h"

namespace vlcore::attention_detail {

struct Shape {
  int64_t total_q = 0, total_k = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t num_q_segments = 0, num_k_segments = 0;
};

inline bool is_attention_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_qkv_tensor(const char* op, const at::Tensor& t, const char* name, const char* shape) {
  VLCORE_CHECK(t.dim() == 3, op, name, " must have shape ", shape, ", got ", t.sizes());
  VLCORE_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, name,
               " must be contiguous in its last (head_dim) dimension, got strides ", t.strides());
}

inline void check_int32_vector(const char* op, const at::Tensor& t, const char* name, int64_t n,
                                const at::Tensor& q) {
  VLCORE_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  VLCORE_CHECK(t.dim() == 1 && t.size(0) == n, op, name, " must have shape (num_q_segments,) = (", n,
               ",), got ", t.sizes());
  check_same_device(op, q, "q", t, name);
}

inline Shape check_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, const std::optional<at::Tensor>& key_bias,
                           const std::optional<at::Tensor>& kv_segment, const std::optional<at::Tensor>& key_lengths) {
  check_qkv_tensor(op, q, "q", "(total_q, heads_q, head_dim)");
  check_qkv_tensor(op, k, "k", "(total_k, heads_kv, head_dim)");
  check_qkv_tensor(op, v, "v", "(total_k, heads_kv, head_dim)");
  VLCORE_CHECK(is_attention_float(q.scalar_type()), op, "q must be float16, bfloat16, float32 or float64, got ",
               q.scalar_type());
  VLCORE_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
               "q, k and v must have the same dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
               v.scalar_type());
  check_same_device(op, q, "q", k, "k");
  check_same_device(op, q, "q", v, "v");
  VLCORE_CHECK(v.sizes() == k.sizes(), op, "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  VLCORE_CHECK(k.size(2) == q.size(2), op, "k must have q's head_dim ", q.size(2), ", got ", k.size(2));
  VLCORE_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op,
               "heads_q must be a multiple of heads_kv (GQA), got heads_q = ", q.size(1), " and heads_kv = ",
               k.size(1));
  Shape s{q.size(0), k.size(0), q.size(1), k.size(1), q.size(2), 0, 0};
  // The shared cu_seqlens checks say "cu_seqlens": name which one in the op prefix.
  s.num_q_segments = check_cu_seqlens_meta((std::string(op) + " (cu_seqlens_q)").c_str(), cu_seqlens_q, q, "q");
  s.num_k_segments = check_cu_seqlens_meta((std::string(op) + " (cu_seqlens_k)").c_str(), cu_seqlens_k, q, "q");
  if (kv_segment.has_value()) {
    check_int32_vector(op, *kv_segment, "kv_segment", s.num_q_segments, q);
  } else {
    VLCORE_CHECK(s.num_k_segments == s.num_q_segments, op, "cu_seqlens_q and cu_seqlens_k must have the same ",
                 "number of entries without kv_segment, got ", s.num_q_segments + 1, " and ", s.num_k_segments + 1);
  }
  if (key_lengths.has_value()) check_int32_vector(op, *key_lengths, "key_lengths", s.num_q_segments, q);
  if (key_bias.has_value()) {
    const at::Tensor& b = *key_bias;
    VLCORE_CHECK(at::isFloatingType(b.scalar_type()), op, "key_bias must be floating point, got ", b.scalar_type());
    VLCORE_CHECK((b.dim() == 1 && b.size(0) == s.total_k) ||
                     (b.dim() == 2 && b.size(0) == s.total_k && b.size(1) == s.heads_q),
                 op, "key_bias must have shape (total_k,) = (", s.total_k, ",) or (total_k, heads_q) = (", s.total_k,
                 ", ", s.heads_q, "), got ", b.sizes());
    check_same_device(op, q, "q", b, "key_bias");
  }
  VLCORE_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
               max_seqlen_q, " and ", max_seqlen_k);
  return s;
}

inline void check_backward(const char* op, const Shape& s, const at::Tensor& q, const at::Tensor& grad_out,
                           const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse) {
  VLCORE_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(), op,
               "grad_out must have q's shape ", q.sizes(), " and dtype ", q.scalar_type(), ", got ", grad_out.sizes(),
               " ", grad_out.scalar_type());
  VLCORE_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), op, "out must have q's shape ",
               q.sizes(), " and dtype, got ", out.sizes(), " ", out.scalar_type());
  const at::ScalarType want = lse_dtype(q.scalar_type());
  VLCORE_CHECK(lse.dim() == 2 && lse.size(0) == s.heads_q && lse.size(1) == s.total_q && lse.scalar_type() == want,
               op, "lse must be ", want, " of shape (heads_q, total_q) = (", s.heads_q, ", ", s.total_q, "), got ",
               lse.scalar_type(), " ", lse.sizes());
  check_same_device(op, q, "q", grad_out, "grad_out");
  check_same_device(op, q, "q", out, "out");
  check_same_device(op, q, "q", lse, "lse");
  if (grad_lse.has_value()) {
    VLCORE_CHECK(grad_lse->sizes() == lse.sizes() && grad_lse->scalar_type() == want, op,
                 "grad_lse must match lse (", want, " ", lse.sizes(), "), got ", grad_lse->scalar_type(), " ",
                 grad_lse->sizes());
    check_same_device(op, q, "q", *grad_lse, "grad_lse");
  }
}

// Value checks that need the index tensors on the host (the CPU backend; the Python wrapper's
// validate=True for CUDA).
inline void check_segment_values(const char* op, const Shape& s, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 const std::optional<at::Tensor>& kv_segment) {
  check_cu_seqlens_values((std::string(op) + " (cu_seqlens_q)").c_str(), cu_seqlens_q, s.total_q, max_seqlen_q,
                          "max_seqlen_q");
  check_cu_seqlens_values((std::string(op) + " (cu_seqlens_k)").c_str(), cu_seqlens_k, s.total_k, max_seqlen_k,
                          "max_seqlen_k");
  if (kv_segment.has_value()) {
    const auto seg = kv_segment->contiguous();
    const int32_t* p = seg.data_ptr<int32_t>();
    for (int64_t i = 0; i < seg.numel(); ++i) {
      VLCORE_CHECK(p[i] >= 0 && p[i] < s.num_k_segments, op, "kv_segment[", i, "] = ", p[i],
                   " is out of range for ", s.num_k_segments, " key segments (cu_seqlens_k has ",
                   s.num_k_segments + 1, " entries)");
    }
  }
}

}  // namespace vlcore::attention_detail
