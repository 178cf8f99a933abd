#pragma once
// Shared by the CPU and CUDA backends of the token-grid family (2D token pooling and the 2x2 patch
// merger): argument checks, the per-image layout tables both backends derive from host ints (grids), and
// the index arithmetic of PyTorch's adaptive-average and bilinear resampling, written once for host and
// device.
//
// Layouts. Every op works on packed token rows: a dense batch [B, N, C] is passed as [B*N, C] with B
// images of N tokens, a varlen batch as [T, C] with images of h*w (+1 with a class token) tokens back to back.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/checks.h"

namespace vlcore::token_grid_detail {

struct GridSegment {
  int64_t in_start, h, w, out_start, oh, ow;
};

struct GridPlan {
  std::vector<GridSegment> segs;
  int64_t total_in = 0, total_out = 0;
  bool uniform = true;
};

enum class PoolMode { kAvg = 0, kBilinear = 1 };

inline PoolMode parse_pool_mode(const char* op, c10::string_view mode) {
  if (mode == "avg") return PoolMode::kAvg;
  if (mode == "bilinear") return PoolMode::kBilinear;
  VLCORE_CHECK(false, op, "mode must be 'avg' or 'bilinear', got '", std::string(mode), "'");
  return PoolMode::kAvg;
}

// grids / out_grids: flat (h, w) pairs, one pair per image. class_token: each image's first row is a class
// token that is passed through (it precedes the grid in the input and in the output).
inline GridPlan grid_plan(const char* op, c10::IntArrayRef grids, c10::IntArrayRef out_grids, bool class_token) {
  VLCORE_CHECK(grids.size() % 2 == 0, op, "grids must hold (h, w) pairs, got ", grids.size(), " values");
  VLCORE_CHECK(out_grids.size() == grids.size(), op, "output grids must hold one (h, w) pair per image (",
               grids.size(), " values), got ", out_grids.size());
  GridPlan p;
  const int64_t extra = class_token ? 1 : 0;
  for (size_t i = 0; i < grids.size() / 2; ++i) {
    const int64_t h = grids[2 * i], w = grids[2 * i + 1], oh = out_grids[2 * i], ow = out_grids[2 * i + 1];
    VLCORE_CHECK(h >= 0 && w >= 0, op, "grid of image ", i, " must be non-negative, got ", h, "x", w);
    VLCORE_CHECK(oh >= 0 && ow >= 0, op, "output grid of image ", i, " must be non-negative, got ", oh, "x", ow);
    VLCORE_CHECK(h * w > 0 || oh * ow == 0, op, "image ", i,
                 " has an empty grid ", h, "x", w, " but a non-empty output grid ", oh, "x", ow);
    p.segs.push_back({p.total_in, h, w, p.total_out, oh, ow});
    p.total_in += h * w + extra;
    p.total_out += oh * ow + extra;
    if (i > 0 && (h != p.segs[0].h || w != p.segs[0].w || oh != p.segs[0].oh || ow != p.segs[0].ow)) p.uniform = false;
  }
  return p;
}

#ifdef __CUDACC__
#define VLCORE_HD __host__ __device__
#else
#define VLCORE_HD
#endif

// Adaptive average pooling window [start, end) of output index o (PyTorch's rule), and the output indices
// whose window contains input index i: [first_window, last_window].
VLCORE_HD inline int64_t pool_start(int64_t o, int64_t in, int64_t out) { return (o * in) / out; }
VLCORE_HD inline int64_t pool_end(int64_t o, int64_t in, int64_t out) { return ((o + 1) * in + out - 1) / out; }
VLCORE_HD inline int64_t first_window(int64_t i, int64_t in, int64_t out) { return (i * out) / in; }
VLCORE_HD inline int64_t last_window(int64_t i, int64_t in, int64_t out) {
  const int64_t o = ((i + 1) * out + in - 1) / in - 1;
  return o < out - 1 ? o : out - 1;
}

// Bilinear (align_corners=False) source of output index o as PyTorch's upsample_bilinear2d computes it:
// src = max(0, (in / out) (o + 0.5) - 0.5), rows i0 = floor(src) and i1 = i0 + (i0 < in - 1) with weights
// l0 = 1 - l1 and l1 = src - i0. acc_t is PyTorch's opmath type (float, or double for double).
template <typename acc_t>
struct Lerp {
  int64_t i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
VLCORE_HD inline Lerp<acc_t> bilinear_source(int64_t o, int64_t in, int64_t out) {
  const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
  acc_t src = scale * (static_cast<acc_t>(o) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in - 1) i0 = in - 1;
  acc_t l1 = src - static_cast<acc_t>(i0);
  l1 = l1 < acc_t(0) ? acc_t(0) : (l1 > acc_t(1) ? acc_t(1) : l1);
  return {i0, i0 + (i0 < in - 1 ? 1 : 0), acc_t(1) - l1, l1};
}

// The bilinear weight of input index i in output index o (0 when o does not read i).
template <typename acc_t>
VLCORE_HD inline acc_t bilinear_weight(int64_t i, int64_t o, int64_t in, int64_t out) {
  const Lerp<acc_t> s = bilinear_source<acc_t>(o, in, out);
  return (s.i0 == i ? s.l0 : acc_t(0)) + (s.i1 == i ? s.l1 : acc_t(0));
}

// Output indices that may read input index i in bilinear mode: [lo, hi] (a superset; weights decide).
VLCORE_HD inline void bilinear_readers(int64_t i, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  // src(o) in (i - 1, i + 1) <=> o in ((i - 0.5) out / in - 0.5, (i + 1.5) out / in - 0.5); widen by 1 for
  // rounding and for the clamps at both borders.
  lo = ((i - 1) * out) / in - 2;
  hi = ((i + 2) * out) / in + 1;
  if (lo < 0) lo = 0;
  if (hi > out - 1) hi = out - 1;
}

// Backward of either pooling mode: the weight of input index i in output index o along one axis, and the
// output indices that may read i (a superset: the weights decide).
template <typename acc_t>
VLCORE_HD inline acc_t pool_weight(bool bilinear, int64_t i, int64_t o, int64_t in, int64_t out) {
  if (bilinear) return bilinear_weight<acc_t>(i, o, in, out);
  const int64_t a = pool_start(o, in, out), b = pool_end(o, in, out);
  return (a <= i && i < b) ? acc_t(1) / acc_t(b - a) : acc_t(0);
}

VLCORE_HD inline void pool_readers(bool bilinear, int64_t i, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  if (bilinear) {
    bilinear_readers(i, in, out, lo, hi);
  } else {
    lo = first_window(i, in, out);
    hi = last_window(i, in, out);
  }
}

// Checks of the pooling / merger inputs (x, or grad_out for the backward) against their grids.
inline GridPlan check_pool(const char* op, const at::Tensor& x, c10::IntArrayRef grids, c10::IntArrayRef out_grids,
                    bool class_token, bool input_is_grid) {
  const char* name = input_is_grid ? "x" : "grad_out";
  VLCORE_CHECK(x.dim() == 2, op, name, " must have shape (total_tokens, C), got ", x.sizes());
  VLCORE_CHECK(at::isFloatingType(x.scalar_type()), op, name, " must be floating point, got ", x.scalar_type());
  const GridPlan p = grid_plan(op, grids, out_grids, class_token);
  const int64_t want = input_is_grid ? p.total_in : p.total_out;
  VLCORE_CHECK(x.size(0) == want, op, name, " has ", x.size(0), " rows but the grids",
               class_token ? " (plus one class token per image)" : "", " hold ", want, " tokens");
  return p;
}

inline GridPlan check_merge_2x2(const char* op, const at::Tensor& t, c10::IntArrayRef grids, bool forward) {
  const char* name = forward ? "x" : "grad_out";
  VLCORE_CHECK(t.dim() == 2, op, name, " must have shape (", forward ? "total_tokens, C" : "total_tokens / 4, 4 C",
               "), got ", t.sizes());
  std::vector<int64_t> halves(grids.begin(), grids.end());
  for (size_t i = 0; i < halves.size(); ++i) {
    VLCORE_CHECK(halves[i] % 2 == 0, op, "grids must be even (the merger takes 2x2 cells), got ",
                 i % 2 ? "w" : "h", " = ", halves[i], " for image ", i / 2);
    halves[i] /= 2;
  }
  const GridPlan p = grid_plan(op, grids, halves, false);
  if (forward) {
    VLCORE_CHECK(t.size(0) == p.total_in, op, "x has ", t.size(0), " rows but the grids hold ", p.total_in, " tokens");
  } else {
    VLCORE_CHECK(t.size(0) == p.total_out && t.size(1) % 4 == 0, op, "grad_out must have shape (", p.total_out,
                 ", 4 C), got ", t.sizes());
  }
  return p;
}

}  // namespace vlcore::token_grid_detail
