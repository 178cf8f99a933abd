// CPU reference of the attention family: exact softmax attention over varlen segments.
//
// Arithmetic is in float32 for float16 / bfloat16 / float32 inputs and in float64 for float64 inputs.
// Query rows are processed in chunks of kQueryChunk against chunks of kKeyChunk keys with an online
// softmax, and batches of segments are sized so that a score tile stays under kScoreBudget elements,
// whatever the segment lengths. Tiles are multiplied with ATen batched matmuls (BLAS), not scalar loops.
//
// Segments of equal shape are batched (see Bucket below); parallelism comes from ATen's intra-op threads
// inside the batched matmuls and elementwise ops. dK / dV / d key_bias are accumulated with index_add_ in
// a fixed order, so the result is deterministic.
#include <ATen/TensorOperators.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <map>
#include <tuple>
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

// Segments with the same (nq, nk) are computed together: their rows are gathered into one batch
// [segments * Hkv, group * rows, D] (head h = hk * group + j, so one batched matmul also serves GQA) and
// the per-op overhead is paid per bucket, not per segment and head. Dense batches (whatever their
// key_lengths) and ITM copies are one bucket. Segments of different lengths go into one "ragged" bucket
// padded to the longest when padding at most doubles the work (small packed batches: one bucket), else
// one bucket per length (long packed documents). Padded rows and keys, keys past a segment's
// key_lengths and the per-segment causal diagonal are masked.
struct Bucket {
  int64_t nq = 0, nk = 0, used = 0;  // the most any segment of the bucket has
  bool ragged = false;
  std::vector<int64_t> segments;
};

std::vector<Bucket> buckets_of(const Segments& seg) {
  std::map<std::tuple<int64_t, int64_t>, Bucket> by_shape;
  Bucket all;
  all.ragged = true;
  int64_t exact_work = 0;
  for (int64_t i = 0; i < seg.num_q(); ++i) {
    const int64_t nq = seg.q_len(i);
    if (nq == 0) continue;
    Bucket& b = by_shape[{nq, seg.k_len(i)}];
    b.nq = nq;
    b.nk = seg.k_len(i);
    b.used = std::max(b.used, seg.k_used(i));
    b.segments.push_back(i);
    all.nq = std::max(all.nq, nq);
    all.nk = std::max(all.nk, seg.k_len(i));
    all.used = std::max(all.used, seg.k_used(i));
    all.segments.push_back(i);
    exact_work += nq * std::max<int64_t>(1, seg.k_used(i));
  }
  const int64_t padded_work = int64_t(all.segments.size()) * all.nq * std::max<int64_t>(1, all.used);
  if (by_shape.size() > 1 && padded_work <= 2 * exact_work + (int64_t(1) << 16)) return {all};
  std::vector<Bucket> out;
  for (auto& [key, b] : by_shape) out.push_back(std::move(b));
  return out;
}

at::Tensor long_tensor(const std::vector<int64_t>& values) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong));
}

// The tensors of one batch of segments (see Bucket), in the compute dtype. Shapes use the bucket's
// maxima: nq query rows and `used` keys per segment.
struct Batch {
  int64_t n = 0, nq = 0, nk = 0, used = 0, heads_kv = 0, group = 0, head_dim = 0;
  at::ScalarType acc;
  bool ragged = false;
  at::Tensor q_rows, k_rows;  // [n * nq], [n * used]: row indices, clamped into each segment when padded
  at::Tensor key_limit;       // [n, 1, 1, 1, 1] keys read per segment, when they differ within the batch
  at::Tensor q_len, shift;    // [n, 1, 1, 1, 1] ragged only: query rows and causal shift (nk - nq) per segment
  std::vector<int64_t> q_lens;
  int64_t max_shift = 0;

  at::Tensor gather_q(const at::Tensor& t) const {  // [n, nq, Hq, D]
    return t.index_select(0, q_rows).to(acc).view({n, nq, heads_kv * group, head_dim});
  }
  at::Tensor gather_kv(const at::Tensor& t) const {  // [n * Hkv, used, D]
    return t.index_select(0, k_rows).to(acc).view({n, used, heads_kv, head_dim}).permute({0, 2, 1, 3})
        .reshape({n * heads_kv, used, head_dim});
  }
  // Rows [r0, r0 + rows) of a gathered [n, nq, Hq, D] as [n * Hkv, group * rows, D].
  at::Tensor query_chunk(const at::Tensor& x, int64_t r0, int64_t rows) const {
    return x.narrow(1, r0, rows).permute({0, 2, 1, 3}).reshape({n * heads_kv, group * rows, head_dim});
  }
  // [Hq, total_q]-shaped per-row values (lse, delta) for rows [r0, r0 + rows) as [n * Hkv, group * rows, 1].
  at::Tensor row_chunk(const at::Tensor& per_row, int64_t r0, int64_t rows) const {
    return per_row.index_select(1, chunk_rows(r0, rows)).view({heads_kv * group, n, rows}).permute({1, 0, 2})
        .reshape({n * heads_kv, group * rows, 1});
  }
  at::Tensor chunk_rows(int64_t r0, int64_t rows) const {
    return q_rows.view({n, nq}).narrow(1, r0, rows).reshape({-1});
  }
  // Of the n * rows positions of a chunk, those that are real query rows: (positions, their rows), or
  // (undefined, all rows) when nothing is padded.
  std::pair<at::Tensor, at::Tensor> chunk_targets(int64_t r0, int64_t rows) const {
    if (!ragged) return {at::Tensor(), chunk_rows(r0, rows)};
    std::vector<int64_t> positions;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = r0; r < std::min(r0 + rows, q_lens[i]); ++r) positions.push_back(i * rows + (r - r0));
    }
    const at::Tensor pos = long_tensor(positions);
    return {pos, chunk_rows(r0, rows).index_select(0, pos)};
  }
  // [n * Hkv, group * rows, D] back to rows [r0, r0 + rows) of a [total_q, Hq, D] tensor.
  void store_query_chunk(at::Tensor& dst, int64_t r0, int64_t rows, const at::Tensor& x) const {
    const auto [pos, targets] = chunk_targets(r0, rows);
    at::Tensor flat = x.view({n, heads_kv * group, rows, head_dim}).permute({0, 2, 1, 3})
                          .reshape({n * rows, heads_kv * group, head_dim});
    if (pos.defined()) flat = flat.index_select(0, pos);
    dst.index_copy_(0, targets, flat.to(dst.scalar_type()));
  }
  // [n * Hkv, group * rows, 1] per-row values back to rows [r0, r0 + rows) of an [Hq, total_q] tensor.
  void store_row_chunk(at::Tensor& dst, int64_t r0, int64_t rows, const at::Tensor& x) const {
    const auto [pos, targets] = chunk_targets(r0, rows);
    at::Tensor flat = x.view({n, heads_kv * group, rows}).permute({1, 0, 2}).reshape({heads_kv * group, n * rows});
    if (pos.defined()) flat = flat.index_select(1, pos);
    dst.index_copy_(1, targets, flat);
  }
  // key_bias broadcastable against scores viewed as [n, Hkv, group, rows, used].
  at::Tensor bias(const std::optional<at::Tensor>& key_bias) const {
    if (!key_bias.has_value()) return at::Tensor();
    const at::Tensor b = key_bias->index_select(0, k_rows).to(acc);
    if (b.dim() == 1) return b.view({n, 1, 1, 1, used});
    return b.view({n, used, heads_kv * group}).permute({0, 2, 1}).reshape({n, heads_kv, group, 1, used});
  }
};

// The logits of the query rows [r0, r0 + rows) against keys [c0, c0 + cols) of a batch, as
// [n * Hkv, group * rows, cols]: scaled, key_bias added, masked keys at -inf (bottom-right causal:
// row r sees keys j <= r + nk - nq of its segment).
struct ScoreTile {
  const Batch& b;
  int64_t r0, rows;
  double scale;
  bool causal;

  at::Tensor scores(const at::Tensor& Qc, const at::Tensor& Kc, int64_t c0, const at::Tensor& bias) const {
    const int64_t cols = Kc.size(1);
    const auto opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor s = at::bmm(Qc, Kc.transpose(1, 2)).mul_(scale);
    at::Tensor s5 = s.view({b.n, b.heads_kv, b.group, rows, cols});
    if (bias.defined()) s5.add_(bias.narrow(-1, c0, cols));
    const at::Tensor key = at::arange(c0, c0 + cols, opts);                 // [cols]
    const at::Tensor row = at::arange(r0, r0 + rows, opts).unsqueeze(1);   // [rows, 1]
    if (b.key_limit.defined()) s5.masked_fill_(key >= b.key_limit, kNegInf);
    if (b.ragged) {
      at::Tensor masked = row >= b.q_len;  // padded query rows
      if (causal) masked = masked | (key > row + b.shift);
      s5.masked_fill_(masked, kNegInf);
    } else if (causal && c0 + cols - 1 > r0 + b.max_shift) {  // the chunk crosses the diagonal
      s5.masked_fill_(key > row + b.max_shift, kNegInf);
    }
    return s;
  }
  // Keys at or beyond this bound are masked for every row of the chunk (causal), so their chunks are skipped.
  int64_t key_end() const { return causal ? std::clamp<int64_t>(r0 + rows + b.max_shift, 0, b.used) : b.used; }
};

// Splits each bucket into batches whose score tile stays under kScoreBudget elements.
constexpr int64_t kScoreBudget = int64_t(1) << 22;

template <typename Fn>
void for_each_batch(const Segments& seg, const Shape& s, at::ScalarType acc, Fn&& fn) {
  const int64_t group = s.heads_q / s.heads_kv;
  for (const Bucket& bucket : buckets_of(seg)) {
    const int64_t tile = s.heads_q * std::min(bucket.nq, kQueryChunk) * std::max<int64_t>(1, std::min(bucket.used, kKeyChunk));
    const int64_t per_batch = std::max<int64_t>(1, kScoreBudget / tile);
    for (size_t first = 0; first < bucket.segments.size(); first += per_batch) {
      const size_t last = std::min(bucket.segments.size(), first + size_t(per_batch));
      Batch b;
      b.n = int64_t(last - first);
      b.nq = bucket.nq;
      b.nk = bucket.nk;
      b.used = bucket.used;
      b.ragged = bucket.ragged;
      b.heads_kv = s.heads_kv;
      b.group = group;
      b.head_dim = s.head_dim;
      b.acc = acc;
      std::vector<int64_t> q_rows, k_rows, used, shifts;
      b.max_shift = std::numeric_limits<int64_t>::min();
      for (size_t j = first; j < last; ++j) {
        const int64_t i = bucket.segments[j], nq = seg.q_len(i), nk = seg.k_len(i);
        // Padded rows repeat a row of their own segment (clamped), so every index is valid; they are masked.
        for (int64_t r = 0; r < b.nq; ++r) q_rows.push_back(seg.q_start(i) + std::min(r, nq - 1));
        for (int64_t c = 0; c < b.used; ++c) {
          k_rows.push_back(std::min(seg.k_start(i) + std::min(c, std::max<int64_t>(nk - 1, 0)), s.total_k - 1));
        }
        used.push_back(seg.k_used(i));
        shifts.push_back(nk - nq);
        b.q_lens.push_back(nq);
        b.max_shift = std::max(b.max_shift, nk - nq);
      }
      b.q_rows = long_tensor(q_rows);
      b.k_rows = long_tensor(k_rows);
      if (std::any_of(used.begin(), used.end(), [&](int64_t u) { return u != b.used; })) {
        b.key_limit = long_tensor(used).view({b.n, 1, 1, 1, 1});
      }
      if (b.ragged) {
        b.q_len = long_tensor(b.q_lens).view({b.n, 1, 1, 1, 1});
        b.shift = long_tensor(shifts).view({b.n, 1, 1, 1, 1});
      }
      fn(b);
    }
  }
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
  const auto acc_opts = q.options().dtype(acc);
  at::Tensor out = at::empty({s.total_q, s.heads_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.heads_q, s.total_q}, acc_opts);
  const Segments seg(cu_seqlens_q, cu_seqlens_k, kv_segment, key_lengths);

  for_each_batch(seg, s, acc, [&](const Batch& b) {
    const at::Tensor Q = b.gather_q(q), K = b.gather_kv(k), V = b.gather_kv(v), bias = b.bias(key_bias);
    const int64_t bh = b.n * b.heads_kv;
    for (int64_t r0 = 0; r0 < b.nq; r0 += kQueryChunk) {
      const int64_t rows = std::min(kQueryChunk, b.nq - r0), n = b.group * rows;
      const at::Tensor Qc = b.query_chunk(Q, r0, rows);
      const ScoreTile tile{b, r0, rows, scale, causal};
      at::Tensor m = at::full({bh, n, 1}, kNegInf, acc_opts);  // running row max
      at::Tensor l = at::zeros({bh, n, 1}, acc_opts);          // running sum of exp(s - m)
      at::Tensor o = at::zeros({bh, n, s.head_dim}, acc_opts);
      at::Tensor m_safe = at::zeros({bh, n, 1}, acc_opts);  // m with -inf as 0: exp() never sees -inf - -inf
      for (int64_t c0 = 0, c1 = tile.key_end(); c0 < c1; c0 += kKeyChunk) {
        const int64_t cols = std::min(kKeyChunk, c1 - c0);
        const at::Tensor sc = tile.scores(Qc, K.narrow(1, c0, cols), c0, bias);
        const at::Tensor m_new = at::maximum(m, sc.amax(2, /*keepdim=*/true));
        m_safe = m_new.masked_fill(m_new == kNegInf, 0.0);
        const at::Tensor p = (sc - m_safe).exp_();
        const at::Tensor rescale = (m - m_safe).exp_();
        l = l.mul_(rescale).add_(p.sum(2, /*keepdim=*/true));
        o = o.mul_(rescale).baddbmm_(p, V.narrow(1, c0, cols));
        m = m_new;
      }
      const at::Tensor unseen = l == 0;
      b.store_query_chunk(out, r0, rows, (o / l).masked_fill_(unseen, 0.0));
      b.store_row_chunk(lse, r0, rows, (m_safe + at::log(l)).masked_fill_(unseen, kNegInf));
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

  for_each_batch(seg, s, acc, [&](const Batch& b) {
    if (b.used == 0) return;  // no key read: dq stays 0, nothing flows to k, v or the bias
    const at::Tensor Q = b.gather_q(q), dO = b.gather_q(grad_out), K = b.gather_kv(k), V = b.gather_kv(v);
    const at::Tensor bias = b.bias(key_bias);
    const int64_t bh = b.n * b.heads_kv;
    at::Tensor dK = at::zeros({bh, b.used, s.head_dim}, acc_opts), dV = at::zeros({bh, b.used, s.head_dim}, acc_opts);
    at::Tensor dB = bias_requires_grad ? at::zeros({b.n, b.heads_kv, b.group, b.used}, acc_opts) : at::Tensor();
    for (int64_t r0 = 0; r0 < b.nq; r0 += kQueryChunk) {
      const int64_t rows = std::min(kQueryChunk, b.nq - r0);
      const at::Tensor Qc = b.query_chunk(Q, r0, rows), dOc = b.query_chunk(dO, r0, rows);
      const at::Tensor lse_c = b.row_chunk(lse_safe, r0, rows), D_c = b.row_chunk(D, r0, rows);
      const ScoreTile tile{b, r0, rows, scale, causal};
      at::Tensor dQc = at::zeros({bh, b.group * rows, s.head_dim}, acc_opts);
      for (int64_t c0 = 0, c1 = tile.key_end(); c0 < c1; c0 += kKeyChunk) {
        const int64_t cols = std::min(kKeyChunk, c1 - c0);
        const at::Tensor Kc = K.narrow(1, c0, cols), Vc = V.narrow(1, c0, cols);
        const at::Tensor p = (tile.scores(Qc, Kc, c0, bias) - lse_c).exp_();
        const at::Tensor ds = p * (at::bmm(dOc, Vc.transpose(1, 2)) - D_c);  // d loss / d (biased, scaled logits)
        dV.narrow(1, c0, cols).baddbmm_(p.transpose(1, 2), dOc);
        dK.narrow(1, c0, cols).baddbmm_(ds.transpose(1, 2), Qc, 1.0, scale);
        dQc.baddbmm_(ds, Kc, 1.0, scale);
        if (dB.defined()) dB.narrow(3, c0, cols).add_(ds.view({b.n, b.heads_kv, b.group, rows, cols}).sum(3));
      }
      b.store_query_chunk(dq, r0, rows, dQc);
    }
    // Key rows are shared by every query segment reading them (kv_segment): accumulate, in a fixed order.
    const auto key_major = [&](const at::Tensor& x) {  // [n * Hkv, used, D] -> [n * used, Hkv, D]
      return x.view({b.n, b.heads_kv, b.used, s.head_dim}).permute({0, 2, 1, 3}).reshape({b.n * b.used, b.heads_kv, s.head_dim});
    };
    dk.index_add_(0, b.k_rows, key_major(dK));
    dv.index_add_(0, b.k_rows, key_major(dV));
    if (dB.defined()) {
      dbias.index_add_(0, b.k_rows, dB.view({b.n, s.heads_q, b.used}).permute({0, 2, 1}).reshape({b.n * b.used, s.heads_q}));
    }
  });
  at::Tensor grad_bias = at::empty({0}, q.options());
  if (bias_requires_grad) grad_bias = (key_bias->dim() == 1 ? dbias.sum(1) : dbias).to(key_bias->scalar_type());
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()), grad_bias};
}

}  // namespace vlcore
