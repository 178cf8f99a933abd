#pragma once
// Shared by the CPU and CUDA backends of the ToMe family: argument checks, and the per-image layout tables
// that both backends derive from host ints (sequence lengths, r), so that no op ever reads a size back from
// the device.
//
// Layouts. Every op works on packed token rows: a dense batch [B, N, C] is passed as [B*N, C] with B
// images of N tokens, a varlen batch as [T, C] with images of seqlens[b] tokens back to back.
//
// ToMe (docs/tome.md). Image b with n tokens, p = class_token + distill_token protected tokens and
// r_b = clamp(r, 0, (n - p) / 2): A = even tokens (Na = ceil(n/2)), B = odd tokens (Nb = floor(n/2)).
// With r_b > 0 the image's output is [unmerged A (Na - r_b, ToMe's order), all B (Nb)]; with r_b = 0 it is the
// image unchanged (ToMe's do_nothing). The match is stored as
//   unmerged [sum(Na - r_b)]  A indices (local to the image) kept, in output order
//   src, dst [sum(r_b)]       merged A indices (edge order: score descending, ties to the lower index) and
//                             the B index each merges into. NaN scores (a zero / non-finite metric row) are
//                             the highest, as torch's max / argsort rank them; the class token sorts last.
//   dest [T]                  output row (global) of every input row
//   offsets [T' + 1], sources [T]  the inverse (CSR): output row j gathers input rows
//                             sources[offsets[j] .. offsets[j+1]), destination first, then the merged A rows
//                             in ascending order.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/checks.h"

namespace vlcore::tome_detail {

// One image of a ToMe batch.
struct TomeSegment {
  int64_t in_start, n, r, out_start, r_start, u_start;  // u_start: first entry in `unmerged`
};

struct TomePlan {
  std::vector<TomeSegment> segs;
  int64_t total_in = 0, total_out = 0, total_r = 0, total_unmerged = 0;
  bool uniform = true;  // every image has the same n and r (dense batch): kernels compute offsets
};

inline int64_t tome_cap(int64_t n, int64_t r, bool class_token, bool distill_token) {
  const int64_t protected_tokens = int64_t(class_token) + int64_t(distill_token);
  return std::max<int64_t>(0, std::min<int64_t>(r, (n - protected_tokens) / 2));
}

inline TomePlan tome_plan(const char* op, c10::IntArrayRef seqlens, c10::IntArrayRef r, bool class_token,
                          bool distill_token) {
  VLCORE_CHECK(r.size() == seqlens.size() || r.size() == 1, op, "r must hold one value or one per image (",
               seqlens.size(), "), got ", r.size());
  TomePlan p;
  p.segs.reserve(seqlens.size());
  for (size_t b = 0; b < seqlens.size(); ++b) {
    const int64_t n = seqlens[b], rb = r.size() == 1 ? r[0] : r[b];
    VLCORE_CHECK(n >= 0, op, "seqlens[", b, "] must be >= 0, got ", n);
    VLCORE_CHECK(rb >= 0, op, "r must be >= 0, got r = ", rb, r.size() == 1 ? "" : " for image ", r.size() == 1 ? "" : std::to_string(b));
    const int64_t rc = tome_cap(n, rb, class_token, distill_token);
    p.segs.push_back({p.total_in, n, rc, p.total_out, p.total_r, p.total_unmerged});
    p.total_in += n;
    p.total_out += n - rc;
    p.total_r += rc;
    p.total_unmerged += (n + 1) / 2 - rc;
    if (b > 0 && (n != p.segs[0].n || rc != p.segs[0].r)) p.uniform = false;
  }
  return p;
}

// The order of ToMe's scores as torch's max and argsort(descending=True) see them: NaN above every number,
// else the strictly higher score, so that a tie keeps the earlier (lower) index.
template <typename T>
C10_HOST_DEVICE inline bool score_beats(T score, T best) {
  return score > best || (score != score && best == best);
}

inline void check_metric(const char* op, const at::Tensor& metric, const TomePlan& p) {
  VLCORE_CHECK(metric.dim() == 2, op, "metric must have shape (total_tokens, c), got ", metric.sizes());
  VLCORE_CHECK(at::isFloatingType(metric.scalar_type()), op, "metric must be floating point, got ",
               metric.scalar_type());
  VLCORE_CHECK(metric.size(0) == p.total_in, op, "metric has ", metric.size(0),
               " rows but seqlens add up to ", p.total_in, " tokens");
}

// The index maps of a match as given to merge / unmerge.
inline void check_maps(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& dest,
                       const at::Tensor& offsets, const at::Tensor& sources, int64_t total_in, int64_t total_out) {
  for (auto [t, name] : {std::pair{&dest, "dest"}, {&offsets, "offsets"}, {&sources, "sources"}}) {
    VLCORE_CHECK(t->scalar_type() == at::kLong, op, name, " must be int64, got ", t->scalar_type());
    VLCORE_CHECK(t->dim() == 1, op, name, " must be 1-D, got shape ", t->sizes());
    check_same_device(op, ref, ref_name, *t, name);
  }
  VLCORE_CHECK(dest.size(0) == total_in && sources.size(0) == total_in, op, "dest and sources must have one entry ",
               "per input token (", total_in, "), got ", dest.size(0), " and ", sources.size(0));
  VLCORE_CHECK(offsets.size(0) == total_out + 1, op, "offsets must have one entry per output token plus one (",
               total_out + 1, "), got ", offsets.size(0));
}

enum class MergeMode { kWavg = 0, kMean = 1, kSum = 2, kAmax = 3 };

inline MergeMode parse_mode(const char* op, c10::string_view mode) {
  if (mode == "wavg") return MergeMode::kWavg;
  if (mode == "mean") return MergeMode::kMean;
  if (mode == "sum") return MergeMode::kSum;
  if (mode == "amax") return MergeMode::kAmax;
  VLCORE_CHECK(false, op, "mode must be 'wavg', 'mean', 'sum' or 'amax', got '", std::string(mode), "'");
  return MergeMode::kWavg;
}

// x [T, C] and its optional size [T] (the patches behind each token).
inline void check_merge_inputs(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& size) {
  VLCORE_CHECK(x.dim() == 2, op, "x must have shape (total_tokens, C), got ", x.sizes());
  VLCORE_CHECK(at::isFloatingType(x.scalar_type()), op, "x must be floating point, got ", x.scalar_type());
  if (size) {
    VLCORE_CHECK(size->dim() == 1 && size->size(0) == x.size(0), op, "size must have shape (", x.size(0),
                 ",): one entry per token of x, got ", size->sizes());
    VLCORE_CHECK(size->scalar_type() == x.scalar_type(), op, "size must have the dtype of x (", x.scalar_type(),
                 "), got ", size->scalar_type());
    check_same_device(op, x, "x", *size, "size");
  }
}

struct MergeArgs {
  int64_t total_in, total_out, c;
  MergeMode mode;
};

// tome_merge(x [T, C], size [T]?, dest [T], offsets [T' + 1], sources [T], mode).
inline MergeArgs check_merge(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& size,
                             const at::Tensor& dest, const at::Tensor& offsets, const at::Tensor& sources,
                             c10::string_view mode) {
  check_merge_inputs(op, x, size);
  const MergeMode m = parse_mode(op, mode);
  VLCORE_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, op, "offsets must be 1-D and non-empty, got ", offsets.sizes());
  const MergeArgs a{x.size(0), offsets.numel() - 1, x.size(1), m};
  check_maps(op, x, "x", dest, offsets, sources, a.total_in, a.total_out);
  return a;
}

// tome_merge_backward: the forward's arguments plus grad_out / out [T', C] and grad_size [T']?.
inline MergeArgs check_merge_backward(const char* op, const at::Tensor& grad_out,
                                      const c10::optional<at::Tensor>& grad_size, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& size, const at::Tensor& out,
                                      const at::Tensor& dest, const at::Tensor& offsets, const at::Tensor& sources,
                                      c10::string_view mode) {
  const MergeArgs a = check_merge(op, x, size, dest, offsets, sources, mode);
  VLCORE_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 2 && out.size(0) == a.total_out && out.size(1) == a.c,
               op, "grad_out and out must have shape (", a.total_out, ", ", a.c, "), got ", grad_out.sizes(), " and ",
               out.sizes());
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, {&out, "out"}}) {
    VLCORE_CHECK(t->scalar_type() == x.scalar_type(), op, name, " must have the dtype of x (", x.scalar_type(),
                 "), got ", t->scalar_type());
    check_same_device(op, x, "x", *t, name);
  }
  VLCORE_CHECK(!grad_size || (grad_size->dim() == 1 && grad_size->size(0) == a.total_out), op,
               "grad_size must have shape (", a.total_out, ",)");
  return a;
}

// tome_unmerge(x [T', C], dest, offsets, sources): returns (total_in, total_out).
inline std::pair<int64_t, int64_t> check_unmerge(const char* op, const at::Tensor& x, const at::Tensor& dest,
                                                 const at::Tensor& offsets, const at::Tensor& sources) {
  VLCORE_CHECK(x.dim() == 2, op, "x must have shape (merged_tokens, C), got ", x.sizes());
  VLCORE_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, op, "offsets must be 1-D and non-empty, got ", offsets.sizes());
  const int64_t total_out = x.size(0), total_in = dest.numel();
  VLCORE_CHECK(offsets.numel() == total_out + 1, op, "x has ", total_out, " rows but the match merges to ",
               offsets.numel() - 1, " tokens");
  check_maps(op, x, "x", dest, offsets, sources, total_in, total_out);
  return {total_in, total_out};
}

}  // namespace vlcore::tome_detail
