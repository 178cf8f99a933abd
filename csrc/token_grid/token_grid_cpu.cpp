// CPU reference of the token-grid ops: 2D pooling of patch tokens (adaptive average / bilinear with
// align_corners=False, PyTorch's index rules) and Qwen2-VL's 2x2 patch merger, forward and backward.
// Backward passes gather: every input token sums the output tokens that read it (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

#include "ops.h"
#include "token_grid/token_grid.h"

namespace vlcore {
using namespace token_grid_detail;

namespace {

// Row index of the segment that holds `row` in the given column (in_start or out_start); empty images skip.
template <bool kOut>
int64_t segment_of(const GridPlan& p, int64_t row) {
  int64_t lo = 0, hi = int64_t(p.segs.size()) - 1;
  while (lo < hi) {  // last segment whose start <= row
    const int64_t mid = (lo + hi + 1) / 2;
    const int64_t start = kOut ? p.segs[mid].out_start : p.segs[mid].in_start;
    if (start <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace

at::Tensor token_pool_2d_cpu(const at::Tensor& x, c10::IntArrayRef grids, c10::IntArrayRef out_grids,
                             c10::string_view mode, bool class_token) {
  constexpr const char* op = "token_pool_2d";
  const GridPlan p = check_pool(op, x, grids, out_grids, class_token, true);
  const PoolMode m = parse_pool_mode(op, mode);
  const at::Tensor xc = x.contiguous();
  const int64_t c = x.size(1);
  at::Tensor out = at::empty({p.total_out, c}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_pool_2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, p.total_out, 16, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(c);
      for (int64_t row = r0; row < r1; ++row) {
        const GridSegment& s = p.segs[segment_of<true>(p, row)];
        int64_t q = row - s.out_start;
        const int64_t base = s.in_start + (class_token ? 1 : 0);
        if (class_token && q == 0) {
          std::memcpy(op_ + row * c, xp + s.in_start * c, c * sizeof(scalar_t));
          continue;
        }
        q -= class_token ? 1 : 0;
        const int64_t oy = q / s.ow, ox = q % s.ow;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (m == PoolMode::kAvg) {
          const int64_t y0 = pool_start(oy, s.h, s.oh), y1 = pool_end(oy, s.h, s.oh);
          const int64_t x0 = pool_start(ox, s.w, s.ow), x1 = pool_end(ox, s.w, s.ow);
          for (int64_t y = y0; y < y1; ++y)
            for (int64_t xx = x0; xx < x1; ++xx)
              for (int64_t k = 0; k < c; ++k) acc[k] += acc_t(xp[(base + y * s.w + xx) * c + k]);
          const acc_t inv = acc_t(1) / acc_t((y1 - y0) * (x1 - x0));
          for (int64_t k = 0; k < c; ++k) op_[row * c + k] = scalar_t(acc[k] * inv);
        } else {
          const Lerp<acc_t> ly = bilinear_source<acc_t>(oy, s.h, s.oh), lx = bilinear_source<acc_t>(ox, s.w, s.ow);
          const int64_t ys[2] = {ly.i0, ly.i1}, xs[2] = {lx.i0, lx.i1};
          const acc_t wy[2] = {ly.l0, ly.l1}, wx[2] = {lx.l0, lx.l1};
          for (int a = 0; a < 2; ++a)
            for (int b = 0; b < 2; ++b) {
              const acc_t w = wy[a] * wx[b];
              const scalar_t* src = xp + (base + ys[a] * s.w + xs[b]) * c;
              for (int64_t k = 0; k < c; ++k) acc[k] += w * acc_t(src[k]);
            }
          for (int64_t k = 0; k < c; ++k) op_[row * c + k] = scalar_t(acc[k]);
        }
      }
    });
  });
  return out;
}

at::Tensor token_pool_2d_backward_cpu(const at::Tensor& grad_out, c10::IntArrayRef grids, c10::IntArrayRef out_grids,
                                      c10::string_view mode, bool class_token) {
  constexpr const char* op = "token_pool_2d_backward";
  const GridPlan p = check_pool(op, grad_out, grids, out_grids, class_token, false);
  const PoolMode m = parse_pool_mode(op, mode);
  const at::Tensor g = grad_out.contiguous();
  const int64_t c = g.size(1);
  at::Tensor grad_x = at::empty({p.total_in, c}, g.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "token_pool_2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, p.total_in, 16, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(c);
      for (int64_t row = r0; row < r1; ++row) {
        const GridSegment& s = p.segs[segment_of<false>(p, row)];
        int64_t q = row - s.in_start;
        const int64_t base = s.out_start + (class_token ? 1 : 0);
        if (class_token && q == 0) {
          std::memcpy(gx + row * c, gp + s.out_start * c, c * sizeof(scalar_t));
          continue;
        }
        q -= class_token ? 1 : 0;
        const int64_t y = q / s.w, xx = q % s.w;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (s.oh > 0 && s.ow > 0) {
          const bool bilinear = m == PoolMode::kBilinear;
          int64_t oy0, oy1, ox0, ox1;
          pool_readers(bilinear, y, s.h, s.oh, oy0, oy1);
          pool_readers(bilinear, xx, s.w, s.ow, ox0, ox1);
          for (int64_t oy = oy0; oy <= oy1; ++oy) {
            const acc_t wy = pool_weight<acc_t>(bilinear, y, oy, s.h, s.oh);
            if (wy == acc_t(0)) continue;
            for (int64_t ox = ox0; ox <= ox1; ++ox) {
              const acc_t wx = pool_weight<acc_t>(bilinear, xx, ox, s.w, s.ow);
              if (wx == acc_t(0)) continue;
              const scalar_t* src = gp + (base + oy * s.ow + ox) * c;
              for (int64_t k = 0; k < c; ++k) acc[k] += wy * wx * acc_t(src[k]);
            }
          }
        }
        for (int64_t k = 0; k < c; ++k) gx[row * c + k] = scalar_t(acc[k]);
      }
    });
  });
  return grad_x;
}

namespace {

// Input row of output cell (segment s, cell q) and quadrant k (row-major: (0,0), (0,1), (1,0), (1,1)).
inline int64_t merge_source_row(const GridSegment& s, int64_t q, int64_t k) {
  const int64_t i = q / s.ow, j = q % s.ow;
  return s.in_start + (2 * i + k / 2) * s.w + 2 * j + k % 2;
}

at::Tensor merge_2x2_copy(const at::Tensor& t, const GridPlan& p, bool forward) {
  const at::Tensor tc = t.contiguous();
  const int64_t c = forward ? t.size(1) : t.size(1) / 4;
  at::Tensor out = forward ? at::empty({p.total_out, 4 * c}, t.options()) : at::empty({p.total_in, c}, t.options());
  if (out.numel() == 0) return out;
  const int64_t rb = c * t.element_size();
  const auto* src = static_cast<const char*>(tc.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, p.total_out, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const GridSegment& s = p.segs[segment_of<true>(p, row)];
      for (int64_t k = 0; k < 4; ++k) {
        const int64_t in_row = merge_source_row(s, row - s.out_start, k);
        if (forward) std::memcpy(dst + (row * 4 + k) * rb, src + in_row * rb, rb);
        else std::memcpy(dst + in_row * rb, src + (row * 4 + k) * rb, rb);
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor patch_merge_2x2_cpu(const at::Tensor& x, c10::IntArrayRef grids) {
  const GridPlan p = check_merge_2x2("patch_merge_2x2", x, grids, true);
  return merge_2x2_copy(x, p, true);
}

at::Tensor patch_merge_2x2_backward_cpu(const at::Tensor& grad_out, c10::IntArrayRef grids) {
  const GridPlan p = check_merge_2x2("patch_merge_2x2_backward", grad_out, grids, false);
  return merge_2x2_copy(grad_out, p, false);
}

}  // namespace vlcore
