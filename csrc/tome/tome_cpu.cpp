// CPU reference of the ToMe ops: bipartite soft matching, the merge / unmerge gathers and their backward.
// Scores are computed in double from the metric (so the reference ranks edges as exactly as it can); the
// merges accumulate in the dtype's opmath type, gathering each output row from its sources (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "ops.h"
#include "tome/tome.h"

namespace vlcore {
using namespace tome_detail;

namespace {

// Match one image: writes its entries of unmerged/src/dst/dest/offsets/sources (see tome.h).
template <typename scalar_t>
void match_image(const scalar_t* metric, int64_t c, const TomeSegment& s, bool class_token, bool distill_token,
                 int64_t* unmerged, int64_t* src, int64_t* dst, int64_t* dest, int64_t* offsets, int64_t* sources) {
  const int64_t n = s.n, na = (n + 1) / 2, nb = n / 2, r = s.r;
  const int64_t in0 = s.in_start, out0 = s.out_start;
  if (r == 0) {  // nothing merges: the image passes through in its own order
    for (int64_t t = 0; t < n; ++t) {
      dest[in0 + t] = out0 + t;
      offsets[out0 + t] = in0 + t;
      sources[in0 + t] = in0 + t;
    }
    for (int64_t a = 0; a < na; ++a) unmerged[s.u_start + a] = a;
    return;
  }
  // Cosine similarity: normalise every row in double. A zero row, or one holding Inf/NaN, becomes NaN (0/0,
  // Inf/Inf) and so do all its scores, as in ToMe's `metric / metric.norm()`.
  std::vector<double> unit(n * c);
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* row = metric + (in0 + t) * c;
    double norm = 0;
    for (int64_t k = 0; k < c; ++k) norm += double(row[k]) * double(row[k]);
    norm = std::sqrt(norm);
    for (int64_t k = 0; k < c; ++k) unit[t * c + k] = double(row[k]) / norm;
  }
  // Each A token's best B partner: the highest score, ties to the lower B index. NaN counts as the highest
  // score (torch's max propagates NaN and returns the first NaN's index).
  const double neg_inf = -std::numeric_limits<double>::infinity();
  std::vector<double> best(na, neg_inf);
  std::vector<int64_t> partner(na, 0);
  for (int64_t a = 0; a < na; ++a) {
    if (class_token && a == 0) continue;  // the class token is never a source
    const double* ua = unit.data() + 2 * a * c;
    for (int64_t j = (distill_token ? 1 : 0); j < nb; ++j) {  // the distillation token (B 0) is never a destination
      const double* ub = unit.data() + (2 * j + 1) * c;
      double dot = 0;
      for (int64_t k = 0; k < c; ++k) dot += ua[k] * ub[k];
      if (score_beats(dot, best[a])) {
        best[a] = dot;
        partner[a] = j;
      }
    }
  }
  // Edges by score, descending; ties to the lower A index (a stable sort). NaN first, as in torch's
  // argsort(descending=True); the protected class token last, behind every other token whatever its score,
  // so that it is never a source.
  auto edge_rank = [&](int64_t a) {  // 0: the class token, 1: a number, 2: NaN
    return (class_token && a == 0) ? 0 : std::isnan(best[a]) ? 2 : 1;
  };
  std::vector<int64_t> order(na);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    const int rx = edge_rank(x), ry = edge_rank(y);
    return rx != ry ? rx > ry : (rx == 1 && best[x] > best[y]);
  });
  std::vector<int64_t> kept(order.begin() + r, order.end());
  if (class_token) std::sort(kept.begin(), kept.end());  // keeps the class token first
  const int64_t nu = na - r;
  for (int64_t k = 0; k < r; ++k) {
    src[s.r_start + k] = order[k];
    dst[s.r_start + k] = partner[order[k]];
  }
  for (int64_t u = 0; u < nu; ++u) {
    unmerged[s.u_start + u] = kept[u];
    dest[in0 + 2 * kept[u]] = out0 + u;
    offsets[out0 + u] = in0 + u;
    sources[in0 + u] = in0 + 2 * kept[u];
  }
  // B rows: the destination itself, then the A tokens merged into it in ascending order.
  std::vector<std::vector<int64_t>> into(nb);
  std::vector<char> merged(na, 0);
  for (int64_t k = 0; k < r; ++k) merged[order[k]] = 1;
  for (int64_t a = 0; a < na; ++a)
    if (merged[a]) {
      into[partner[a]].push_back(a);
      dest[in0 + 2 * a] = out0 + nu + partner[a];
    }
  int64_t pos = in0 + nu;
  for (int64_t j = 0; j < nb; ++j) {
    dest[in0 + 2 * j + 1] = out0 + nu + j;
    offsets[out0 + nu + j] = pos;
    sources[pos++] = in0 + 2 * j + 1;
    for (int64_t a : into[j]) sources[pos++] = in0 + 2 * a;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match_cpu(
    const at::Tensor& metric, c10::IntArrayRef seqlens, c10::IntArrayRef r, bool class_token, bool distill_token) {
  constexpr const char* op = "tome_match";
  const TomePlan p = tome_plan(op, seqlens, r, class_token, distill_token);
  check_metric(op, metric, p);
  const at::Tensor m = metric.contiguous();
  const auto opts = metric.options().dtype(at::kLong);
  at::Tensor unmerged = at::empty({p.total_unmerged}, opts), src = at::empty({p.total_r}, opts),
             dst = at::empty({p.total_r}, opts), dest = at::empty({p.total_in}, opts),
             offsets = at::empty({p.total_out + 1}, opts), sources = at::empty({p.total_in}, opts);
  offsets.data_ptr<int64_t>()[p.total_out] = p.total_in;
  const int64_t c = m.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "tome_match_cpu", [&] {
    at::parallel_for(0, int64_t(p.segs.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        match_image<scalar_t>(m.data_ptr<scalar_t>(), c, p.segs[b], class_token, distill_token,
                              unmerged.data_ptr<int64_t>(), src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(),
                              dest.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), sources.data_ptr<int64_t>());
      }
    });
  });
  return {unmerged, src, dst, dest, offsets, sources};
}

namespace {

// Range checks of the maps (the CPU reads them anyway; the CUDA kernels bound every access instead).
void check_map_values(const char* op, const at::Tensor& dest, const at::Tensor& offsets, const at::Tensor& sources,
                      int64_t total_in, int64_t total_out) {
  const int64_t* o = offsets.data_ptr<int64_t>();
  VLCORE_CHECK(o[0] == 0 && o[total_out] == total_in, op, "offsets must run from 0 to ", total_in, ", got ", o[0],
               " .. ", o[total_out]);
  for (int64_t j = 0; j < total_out; ++j)
    VLCORE_CHECK(o[j] <= o[j + 1], op, "offsets must be non-decreasing, got offsets[", j, "] = ", o[j], " > ", o[j + 1]);
  const int64_t* s = sources.data_ptr<int64_t>();
  const int64_t* d = dest.data_ptr<int64_t>();
  for (int64_t t = 0; t < total_in; ++t) {
    VLCORE_CHECK(s[t] >= 0 && s[t] < total_in, op, "sources[", t, "] = ", s[t], " is out of range for ", total_in,
                 " tokens");
    VLCORE_CHECK(d[t] >= 0 && d[t] < total_out, op, "dest[", t, "] = ", d[t], " is out of range for ", total_out,
                 " output tokens");
  }
}

template <typename scalar_t>
void merge_rows(const scalar_t* x, const scalar_t* size, const int64_t* offsets, const int64_t* sources,
                scalar_t* out, scalar_t* out_size, int64_t total_out, int64_t c, MergeMode mode) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, total_out, 16, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> acc(c);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t s0 = offsets[j], s1 = offsets[j + 1];
      acc_t total_size = 0;
      for (int64_t e = s0; e < s1; ++e) total_size += size ? acc_t(size[sources[e]]) : acc_t(1);
      out_size[j] = scalar_t(total_size);
      std::fill(acc.begin(), acc.end(), mode == MergeMode::kAmax ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
      for (int64_t e = s0; e < s1; ++e) {
        const scalar_t* row = x + sources[e] * c;
        const acc_t w = (mode == MergeMode::kWavg && size) ? acc_t(size[sources[e]]) : acc_t(1);
        if (mode == MergeMode::kAmax) {
          for (int64_t k = 0; k < c; ++k) {
            const acc_t v = acc_t(row[k]);
            acc[k] = (v > acc[k] || std::isnan(v)) ? v : acc[k];
          }
        } else {
          for (int64_t k = 0; k < c; ++k) acc[k] += w * acc_t(row[k]);
        }
      }
      const acc_t scale = mode == MergeMode::kWavg ? acc_t(1) / total_size
                          : mode == MergeMode::kMean ? acc_t(1) / acc_t(s1 - s0) : acc_t(1);
      for (int64_t k = 0; k < c; ++k) out[j * c + k] = scalar_t(mode == MergeMode::kAmax ? acc[k] : acc[k] * scale);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tome_merge_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& size,
                                                  const at::Tensor& dest, const at::Tensor& offsets,
                                                  const at::Tensor& sources, c10::string_view mode) {
  constexpr const char* op = "tome_merge";
  const MergeArgs args = check_merge(op, x, size, dest, offsets, sources, mode);
  const int64_t total_in = args.total_in, total_out = args.total_out, c = args.c;
  const MergeMode m = args.mode;
  const at::Tensor xc = x.contiguous(), oc = offsets.contiguous(), sc = sources.contiguous(), dc = dest.contiguous();
  check_map_values(op, dc, oc, sc, total_in, total_out);
  const at::Tensor sz = size ? size->contiguous() : at::Tensor();
  at::Tensor out = at::empty({total_out, x.size(1)}, x.options()), out_size = at::empty({total_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge_cpu", [&] {
    merge_rows<scalar_t>(xc.data_ptr<scalar_t>(), size ? sz.data_ptr<scalar_t>() : nullptr, oc.data_ptr<int64_t>(),
                         sc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), out_size.data_ptr<scalar_t>(), total_out,
                         c, m);
  });
  return {out, out_size};
}

std::tuple<at::Tensor, at::Tensor> tome_merge_backward_cpu(const at::Tensor& grad_out,
                                                           const c10::optional<at::Tensor>& grad_size,
                                                           const at::Tensor& x, const c10::optional<at::Tensor>& size,
                                                           const at::Tensor& out, const at::Tensor& dest,
                                                           const at::Tensor& offsets, const at::Tensor& sources,
                                                           c10::string_view mode) {
  constexpr const char* op = "tome_merge_backward";
  const MergeArgs args =
      check_merge_backward(op, grad_out, grad_size, x, size, out, dest, offsets, sources, mode);
  const int64_t total_in = args.total_in, total_out = args.total_out, c = args.c;
  const MergeMode m = args.mode;
  const at::Tensor g = grad_out.contiguous(), xc = x.contiguous(), oc = out.contiguous(), dc = dest.contiguous(),
                   off = offsets.contiguous(), sc = sources.contiguous();
  check_map_values(op, dc, off, sc, total_in, total_out);
  const at::Tensor sz = size ? size->contiguous() : at::Tensor();
  const at::Tensor gs = grad_size ? grad_size->to(x.scalar_type()).contiguous() : at::Tensor();
  at::Tensor grad_x = at::empty({total_in, c}, x.options());
  at::Tensor grad_sz = at::empty({size ? total_in : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.data_ptr<scalar_t>(), *xp = xc.data_ptr<scalar_t>(), *op_ = oc.data_ptr<scalar_t>();
    const scalar_t* sp = size ? sz.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gsp = grad_size ? gs.data_ptr<scalar_t>() : nullptr;
    const int64_t *d = dc.data_ptr<int64_t>(), *o = off.data_ptr<int64_t>(), *s = sc.data_ptr<int64_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    scalar_t* gsz = size ? grad_sz.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, total_in, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j = d[t], s0 = o[j], s1 = o[j + 1];
        const scalar_t* gj = gp + j * c;
        const scalar_t* xt = xp + t * c;
        const scalar_t* oj = op_ + j * c;
        acc_t total_size = 0;
        for (int64_t e = s0; e < s1; ++e) total_size += sp ? acc_t(sp[s[e]]) : acc_t(1);
        const acc_t wt = sp ? acc_t(sp[t]) : acc_t(1);
        acc_t dsize = gsp ? acc_t(gsp[j]) : acc_t(0);
        for (int64_t k = 0; k < c; ++k) {
          acc_t gx_k;
          if (m == MergeMode::kWavg) {
            gx_k = acc_t(gj[k]) * wt / total_size;
            dsize += acc_t(gj[k]) * (acc_t(xt[k]) - acc_t(oj[k])) / total_size;
          } else if (m == MergeMode::kMean) {
            gx_k = acc_t(gj[k]) / acc_t(s1 - s0);
          } else if (m == MergeMode::kSum) {
            gx_k = acc_t(gj[k]);
          } else {  // amax: the gradient is shared evenly by the sources that hold the maximum
            const acc_t best = acc_t(oj[k]);
            if (acc_t(xt[k]) != best) {
              gx_k = 0;
            } else {
              int64_t ties = 0;
              for (int64_t e = s0; e < s1; ++e) ties += acc_t(xp[s[e] * c + k]) == best;
              gx_k = acc_t(gj[k]) / acc_t(ties);
            }
          }
          gx[t * c + k] = scalar_t(gx_k);
        }
        if (gsz) gsz[t] = scalar_t(dsize);
      }
    });
  });
  return {grad_x, grad_sz};
}

at::Tensor tome_unmerge_cpu(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& offsets,
                            const at::Tensor& sources) {
  constexpr const char* op = "tome_unmerge";
  const auto totals = check_unmerge(op, x, dest, offsets, sources);
  const int64_t total_in = totals.first, total_out = totals.second;
  const at::Tensor xc = x.contiguous(), dc = dest.contiguous();
  check_map_values(op, dc, offsets.contiguous(), sources.contiguous(), total_in, total_out);
  at::Tensor out = at::empty({total_in, x.size(1)}, x.options());
  const int64_t rb = row_bytes(xc, 1);
  if (out.numel() == 0) return out;
  const auto* src = static_cast<const char*>(xc.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t* d = dc.data_ptr<int64_t>();
  at::parallel_for(0, total_in, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) std::memcpy(dst + t * rb, src + d[t] * rb, rb);
  });
  return out;
}

}  // namespace vlcore
