// CPU reference of the attention family: exact softmax attention over varlen segments.
//
// Arithmetic is in float32 for float16 / bfloat16 / float32 inputs and in float64 for float64 inputs.
// Each (query segment, query head) is processed in chunks of kQueryChunk query rows against chunks of
// kKeyChunk keys with an online softmax, so the score tile never exceeds kQueryChunk x kKeyChunk whatever
// the segment lengths. Tiles are multiplied with ATen matmuls (BLAS), not scalar loops.
//
// All heads of a segment go through one batched matmul ([Hkv, group * rows, D] x [Hkv, D, cols] serves
// GQA), so the per-op overhead is paid per segment, not per (segment, head).
//
// Parallelism (at::parallel_for): the forward over query segments; the backward over key segments, each
// work item owning the dK/dV/d key_bias rows of its key segment and the dQ rows of every query segment
// that reads it, so no two threads write the same element and the result is deterministic.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "ops.h"

namespace vlcore {
namespace {
using attention_detail::Shape;

constexpr int64_t kQueryChunk = 128;
constexpr int64_t kKeyChunk = 512;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The segments as host integers, read once per call.
struct Segments {
  std::vector<int32_t> cu_q, cu_k, kv_segment, key_lengths;

  Segments(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& kv_seg,
           const std::optional<at::Tensor>& key_len) {
    cu_q = to_vector(cu_seqlens_q);
    cu_k = to_vector(cu_seqlens_k);
    if (kv_seg.has_value()) kv_segment = to_vector(*kv_seg);
    if (key_len.has_value()) key_lengths = to_vector(*key_len);
  }
  static std::vector<int32_t> to_vector(const at::Tensor& t) {
    const auto c = t.contiguous();
    return {c.data_ptr<int32_t>(), c.data_ptr<int32_t>() + c.numel()};
  }
  int64_t num_q() const { return int64_t(cu_q.size()) - 1; }
  int64_t q_start(int64_t i) const { return cu_q[i]; }
  int64_t q_len(int64_t i) const { return int64_t(cu_q[i + 1]) - cu_q[i]; }
  int64_t key_segment(int64_t i) const { return kv_segment.empty() ? i : kv_segment[i]; }
  int64_t k_start(int64_t i) const { return cu_k[key_segment(i)]; }
  int64_t k_len(int64_t i) const { return int64_t(cu_k[key_segment(i) + 1]) - cu_k[key_segment(i)]; }
  // Keys actually read by query segment i: the first key_lengths[i] (clamped) of its key segment.
  int64_t k_used(int64_t i) const {
    const int64_t n = k_len(i);
    return key_lengths.empty() ? n : std::clamp<int64_t>(key_lengths[i], 0, n);
  }
};

// All the heads of one segment pair at once, grouped by K/V head so that one batched matmul serves GQA:
// queries as [Hkv, group * rows, D] (head h = hk * group + j), keys and values as [Hkv, cols, D].
struct SegmentTiles {
  int64_t heads_kv, group, head_dim;
  at::ScalarType acc;

  // q-like rows [start, start + n) of [total, Hq, D] as [Hkv, group * n, D] in the compute dtype.
  at::Tensor query_rows(const at::Tensor& t, int64_t start, int64_t n) const {
    return t.narrow(0, start, n).to(acc).permute({1, 0, 2}).reshape({heads_kv, group * n, head_dim});
  }
  // The inverse of query_rows, written into rows [start, start + n) of a [total, Hq, D] tensor.
  void store_query_rows(at::Tensor& dst, int64_t start, const at::Tensor& x) const {
    const int64_t n = x.size(1) / group;
    dst.narrow(0, start, n).copy_(x.view({heads_kv * group, n, head_dim}).permute({1, 0, 2}));
  }
  at::Tensor key_rows(const at::Tensor& t, int64_t start, int64_t n) const {
    return t.narrow(0, start, n).to(acc).permute({1, 0, 2});  // [Hkv, n, D], a view when no cast is needed
  }
};

// The logits of the query rows [r0, r0 + rows) against keys [c0, c0 + cols) of one segment pair, as
// [Hkv, group * rows, cols]: scaled, key_bias added, masked keys at -inf. causal_shift = nk - nq
// (bottom-right alignment).
struct ScoreTile {
  int64_t r0, rows, group;
  double scale;
  bool causal;
  int64_t causal_shift;

  at::Tensor scores(const at::Tensor& Qc, const at::Tensor& Kc, int64_t c0, const at::Tensor& bias_c) const {
    const int64_t cols = Kc.size(1);
    at::Tensor s = at::bmm(Qc, Kc.transpose(1, 2)).mul_(scale);
    at::Tensor s4 = s.view({s.size(0), group, rows, cols});
    if (bias_c.defined()) s4.add_(bias_c);  // [cols] or [Hkv, group, 1, cols]
    if (causal && c0 + cols - 1 > r0 + causal_shift) {  // the chunk crosses the diagonal
      const auto opts = at::TensorOptions().dtype(at::kLong);
      const at::Tensor limit = at::arange(r0 + causal_shift, r0 + causal_shift + rows, opts).unsqueeze(1);
      s4.masked_fill_(at::arange(c0, c0 + cols, opts).unsqueeze(0) > limit, kNegInf);
    }
    return s;
  }
  // Keys at or beyond this bound are masked for every row of the chunk (causal), so their chunks are skipped.
  int64_t key_end(int64_t used) const {
    return causal ? std::clamp<int64_t>(r0 + rows + causal_shift, 0, used) : used;
  }
};

// key_bias over the keys [start, start + n) of a segment, broadcastable against [Hkv, group, rows, n].
at::Tensor bias_tile(const std::optional<at::Tensor>& key_bias, int64_t start, int64_t n, int64_t heads_kv,
                     int64_t group, at::ScalarType acc) {
  if (!key_bias.has_value()) return at::Tensor();
  const at::Tensor b = key_bias->narrow(0, start, n).to(acc);
  if (b.dim() == 1) return b.contiguous();
  return b.t().reshape({heads_kv, group, 1, n});
}

at::Tensor narrow_bias(const at::Tensor& bias, int64_t c0, int64_t cols) {
  return bias.defined() ? bias.narrow(-1, c0, cols) : bias;
}

// Run small problems on the calling thread: below ~1 MFLOP a thread handoff costs more than it saves.
int64_t grain_for(int64_t items, int64_t total_q, int64_t max_seqlen_k, int64_t heads_q, int64_t head_dim) {
  const double flops = 4.0 * double(total_q) * double(max_seqlen_k) * double(heads_q) * double(head_dim);
  return flops < 1e6 ? std::max<int64_t>(items, 1) : 1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool /*deterministic*/) {
  constexpr const char* op = "attention_forward";
  const Shape s = attention_detail::check_forward(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  key_bias, kv_segment, key_lengths);
  attention_detail::check_segment_values(op, s, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_segment);
  const at::ScalarType acc = attention_detail::lse_dtype(q.scalar_type());
  at::Tensor out = at::empty({s.total_q, s.heads_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.heads_q, s.total_q}, q.options().dtype(acc));
  const Segments seg(cu_seqlens_q, cu_seqlens_k, kv_segment, key_lengths);
  const int64_t group = s.heads_q / s.heads_kv;
  const SegmentTiles tiles{s.heads_kv, group, s.head_dim, acc};
  const auto acc_opts = q.options().dtype(acc);
  const int64_t items = seg.num_q();

  at::parallel_for(0, items, grain_for(items, s.total_q, max_seqlen_k, s.heads_q, s.head_dim), [&](int64_t begin,
                                                                                                  int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t nq = seg.q_len(i), qs = seg.q_start(i);
      if (nq == 0) continue;
      const int64_t nk = seg.k_len(i), ks = seg.k_start(i), used = seg.k_used(i);
      const at::Tensor K = tiles.key_rows(k, ks, used), V = tiles.key_rows(v, ks, used);
      const at::Tensor bias = bias_tile(key_bias, ks, used, s.heads_kv, group, acc);
      for (int64_t r0 = 0; r0 < nq; r0 += kQueryChunk) {
        const int64_t rows = std::min(kQueryChunk, nq - r0);
        const at::Tensor Qc = tiles.query_rows(q, qs + r0, rows);
        const ScoreTile tile{r0, rows, group, scale, causal, nk - nq};
        const int64_t n = Qc.size(1);
        at::Tensor m = at::full({s.heads_kv, n, 1}, kNegInf, acc_opts);  // running row max
        at::Tensor l = at::zeros({s.heads_kv, n, 1}, acc_opts);          // running sum of exp(s - m)
        at::Tensor o = at::zeros({s.heads_kv, n, s.head_dim}, acc_opts);
        at::Tensor m_safe = at::zeros({s.heads_kv, n, 1}, acc_opts);  // m with -inf as 0: exp() never sees nan
        for (int64_t c0 = 0, c1 = tile.key_end(used); c0 < c1; c0 += kKeyChunk) {
          const int64_t cols = std::min(kKeyChunk, c1 - c0);
          const at::Tensor sc = tile.scores(Qc, K.narrow(1, c0, cols), c0, narrow_bias(bias, c0, cols));
          const at::Tensor m_new = at::maximum(m, sc.amax(2, /*keepdim=*/true));
          m_safe = m_new.masked_fill(m_new == kNegInf, 0.0);
          const at::Tensor p = (sc - m_safe).exp_();
          const at::Tensor rescale = (m - m_safe).exp_();
          l = l.mul_(rescale).add_(p.sum(2, /*keepdim=*/true));
          o = o.mul_(rescale).baddbmm_(p, V.narrow(1, c0, cols));
          m = m_new;
        }
        const at::Tensor unseen = l == 0;
        tiles.store_query_rows(out, qs + r0, (o / l).masked_fill_(unseen, 0.0));
        lse.narrow(1, qs + r0, rows)
            .copy_((m_safe + at::log(l)).masked_fill_(unseen, kNegInf).view({s.heads_q, rows}));
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool bias_requires_grad,
    bool /*deterministic: the CPU backward always is (see the file comment)*/) {
  constexpr const char* op = "attention_backward";
  const Shape s = attention_detail::check_forward(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  key_bias, kv_segment, key_lengths);
  attention_detail::check_backward(op, s, q, grad_out, out, lse, grad_lse);
  VLCORE_CHECK(!bias_requires_grad || key_bias.has_value(), op, "bias_requires_grad needs a key_bias");
  attention_detail::check_segment_values(op, s, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_segment);
  const at::ScalarType acc = attention_detail::lse_dtype(q.scalar_type());
  const auto acc_opts = q.options().dtype(acc);
  const Segments seg(cu_seqlens_q, cu_seqlens_k, kv_segment, key_lengths);
  const int64_t group = s.heads_q / s.heads_kv;
  const SegmentTiles tiles{s.heads_kv, group, s.head_dim, acc};

  // Query segments grouped by the key segment they read.
  std::vector<std::vector<int64_t>> readers(s.num_k_segments);
  for (int64_t i = 0; i < seg.num_q(); ++i) readers[seg.key_segment(i)].push_back(i);

  at::Tensor dq = at::zeros({s.total_q, s.heads_q, s.head_dim}, acc_opts);
  at::Tensor dk = at::zeros({s.total_k, s.heads_kv, s.head_dim}, acc_opts);
  at::Tensor dv = at::zeros({s.total_k, s.heads_kv, s.head_dim}, acc_opts);
  // Per query head always; summed over heads at the end for a (total_k,) bias.
  at::Tensor dbias = bias_requires_grad ? at::zeros({s.total_k, s.heads_q}, acc_opts) : at::Tensor();
  // D = rowsum(dO * O) - dlse, [Hq, total_q]: d(loss)/d(s_ij) = P_ij (dP_ij - D_i).
  at::Tensor D = (grad_out.to(acc) * out.to(acc)).sum(2).t();
  if (grad_lse.has_value()) D = D - *grad_lse;
  // Rows that saw no key have lse = -inf and P = 0: exp(s - (+inf)) gives exactly that.
  const at::Tensor lse_safe = lse.masked_fill(lse == kNegInf, std::numeric_limits<double>::infinity());
  const int64_t items = s.num_k_segments;

  at::parallel_for(0, items, grain_for(items, s.total_q, max_seqlen_k, s.heads_q, s.head_dim), [&](int64_t begin,
                                                                                                  int64_t end) {
    for (int64_t sk = begin; sk < end; ++sk) {
      const int64_t ks = seg.cu_k[sk], nk = int64_t(seg.cu_k[sk + 1]) - ks;
      if (nk == 0 || readers[sk].empty()) continue;
      const at::Tensor K = tiles.key_rows(k, ks, nk), V = tiles.key_rows(v, ks, nk);
      at::Tensor dK = at::zeros({s.heads_kv, nk, s.head_dim}, acc_opts);
      at::Tensor dV = at::zeros({s.heads_kv, nk, s.head_dim}, acc_opts);
      at::Tensor dB = bias_requires_grad ? at::zeros({s.heads_kv, group, nk}, acc_opts) : at::Tensor();
      const at::Tensor bias = bias_tile(key_bias, ks, nk, s.heads_kv, group, acc);
      for (int64_t i : readers[sk]) {
        const int64_t nq = seg.q_len(i), qs = seg.q_start(i), used = seg.k_used(i);
        if (nq == 0 || used == 0) continue;
        for (int64_t r0 = 0; r0 < nq; r0 += kQueryChunk) {
          const int64_t rows = std::min(kQueryChunk, nq - r0);
          const at::Tensor Qc = tiles.query_rows(q, qs + r0, rows), dOc = tiles.query_rows(grad_out, qs + r0, rows);
          const int64_t n = Qc.size(1);
          const at::Tensor lse_c = lse_safe.narrow(1, qs + r0, rows).reshape({s.heads_kv, n, 1});
          const at::Tensor D_c = D.narrow(1, qs + r0, rows).reshape({s.heads_kv, n, 1});
          const ScoreTile tile{r0, rows, group, scale, causal, nk - nq};
          at::Tensor dQc = at::zeros({s.heads_kv, n, s.head_dim}, acc_opts);
          for (int64_t c0 = 0, c1 = tile.key_end(used); c0 < c1; c0 += kKeyChunk) {
            const int64_t cols = std::min(kKeyChunk, c1 - c0);
            const at::Tensor Kc = K.narrow(1, c0, cols), Vc = V.narrow(1, c0, cols);
            const at::Tensor p = (tile.scores(Qc, Kc, c0, narrow_bias(bias, c0, cols)) - lse_c).exp_();
            // gradient of the biased, scaled logits
            const at::Tensor ds = p * (at::bmm(dOc, Vc.transpose(1, 2)) - D_c);
            dV.narrow(1, c0, cols).baddbmm_(p.transpose(1, 2), dOc);
            dK.narrow(1, c0, cols).baddbmm_(ds.transpose(1, 2), Qc, 1.0, scale);
            dQc.baddbmm_(ds, Kc, 1.0, scale);
            if (dB.defined()) dB.narrow(2, c0, cols).add_(ds.view({s.heads_kv, group, rows, cols}).sum(2));
          }
          tiles.store_query_rows(dq, qs + r0, dQc);
        }
      }
      dk.narrow(0, ks, nk).copy_(dK.permute({1, 0, 2}));
      dv.narrow(0, ks, nk).copy_(dV.permute({1, 0, 2}));
      if (dB.defined()) dbias.narrow(0, ks, nk).copy_(dB.view({s.heads_q, nk}).t());
    }
  });
  at::Tensor grad_bias = at::empty({0}, q.options());
  if (bias_requires_grad) grad_bias = (key_bias->dim() == 1 ? dbias.sum(1) : dbias).to(key_bias->scalar_type());
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()), grad_bias};
}

}  // namespace vlcore
