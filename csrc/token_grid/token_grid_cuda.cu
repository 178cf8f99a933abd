// CUDA kernels of the token-grid ops: 2D pooling (adaptive average / bilinear, align_corners=False) and the
// 2x2 patch merger, forward and backward. Bandwidth-bound: a row group per output row (forward) or input
// row (backward, a gather over the output rows that read it: deterministic, no atomics), 16-byte packs
// when the channel count and the pointers allow, fp32 accumulation. Which image a row belongs to comes
// from arithmetic for a dense batch (one grid) or a binary search in a per-image table uploaded without
// a sync for packed grids.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common/row_copy.cuh"
#include "ops.h"
#include "token_grid/token_grid.h"
#include "common/token_rows.cuh"

namespace vlcore {
namespace {
using namespace token_grid_detail;
using cuda::Pack;

struct Grids {
  const int64_t* table;  // [images, 6]: in_start, h, w, out_start, oh, ow; null for a dense batch
  int64_t images;
  GridSegment uniform;   // the one grid of a dense batch (in_start / out_start 0)
  int64_t in_per_image, out_per_image;
};

__device__ __forceinline__ GridSegment load_segment(const Grids& g, int64_t b) {
  if (!g.table) {
    GridSegment s = g.uniform;
    s.in_start = b * g.in_per_image;
    s.out_start = b * g.out_per_image;
    return s;
  }
  const int64_t* t = g.table + 6 * b;
  return {t[0], t[1], t[2], t[3], t[4], t[5]};
}

// The image holding `row` of the output (kOut) or input grid.
template <bool kOut>
__device__ __forceinline__ GridSegment segment_of_row(const Grids& g, int64_t row) {
  if (!g.table) return load_segment(g, row / (kOut ? g.out_per_image : g.in_per_image));
  int64_t lo = 0, hi = g.images - 1;
  while (lo < hi) {  // the last image starting at or before row (empty images start where the next does)
    const int64_t mid = (lo + hi + 1) / 2;
    const int64_t start = g.table[6 * mid + (kOut ? 3 : 0)];
    if (start <= row) lo = mid; else hi = mid - 1;
  }
  return load_segment(g, lo);
}

template <typename scalar_t, int VEC>
__global__ void token_pool_2d_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, Grids g,
                                     int64_t total_out, int64_t c, bool bilinear, bool class_token) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = c / VEC;
  for (int64_t row = cuda::first_row(); row < total_out; row += cuda::row_stride()) {
    const GridSegment s = segment_of_row<true>(g, row);
    int64_t q = row - s.out_start;
    P* dst = reinterpret_cast<P*>(out + row * c);
    if (class_token && q == 0) {
      const P* src = reinterpret_cast<const P*>(x + s.in_start * c);
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) dst[p] = src[p];
      continue;
    }
    q -= class_token ? 1 : 0;
    const int64_t base = s.in_start + (class_token ? 1 : 0);
    const int64_t oy = q / s.ow, ox = q - oy * s.ow;
    if (!bilinear) {
      const int64_t y0 = pool_start(oy, s.h, s.oh), y1 = pool_end(oy, s.h, s.oh);
      const int64_t x0 = pool_start(ox, s.w, s.ow), x1 = pool_end(ox, s.w, s.ow);
      const acc_t inv = acc_t(1) / acc_t((y1 - y0) * (x1 - x0));
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        acc_t acc[VEC] = {};
        for (int64_t y = y0; y < y1; ++y)
          for (int64_t xx = x0; xx < x1; ++xx) {
            const P v = reinterpret_cast<const P*>(x + (base + y * s.w + xx) * c)[p];
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[k] += static_cast<acc_t>(v.v[k]);
          }
        P o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc[k] * inv);
        dst[p] = o;
      }
    } else {
      const Lerp<acc_t> ly = bilinear_source<acc_t>(oy, s.h, s.oh), lx = bilinear_source<acc_t>(ox, s.w, s.ow);
      const int64_t taps[4] = {ly.i0 * s.w + lx.i0, ly.i0 * s.w + lx.i1, ly.i1 * s.w + lx.i0, ly.i1 * s.w + lx.i1};
      const acc_t w[4] = {ly.l0 * lx.l0, ly.l0 * lx.l1, ly.l1 * lx.l0, ly.l1 * lx.l1};
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        acc_t acc[VEC] = {};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const P v = reinterpret_cast<const P*>(x + (base + taps[t]) * c)[p];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += w[t] * static_cast<acc_t>(v.v[k]);
        }
        P o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc[k]);
        dst[p] = o;
      }
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void token_pool_2d_backward_kernel(const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_x,
                                              Grids g, int64_t total_in, int64_t c, bool bilinear, bool class_token) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = c / VEC;
  for (int64_t row = cuda::first_row(); row < total_in; row += cuda::row_stride()) {
    const GridSegment s = segment_of_row<false>(g, row);
    int64_t q = row - s.in_start;
    P* dst = reinterpret_cast<P*>(grad_x + row * c);
    if (class_token && q == 0) {
      const P* src = reinterpret_cast<const P*>(grad_out + s.out_start * c);
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) dst[p] = src[p];
      continue;
    }
    q -= class_token ? 1 : 0;
    const int64_t base = s.out_start + (class_token ? 1 : 0);
    const int64_t y = q / s.w, xx = q - y * s.w;
    int64_t oy0 = 0, oy1 = -1, ox0 = 0, ox1 = -1;
    if (s.oh > 0 && s.ow > 0) {
      pool_readers(bilinear, y, s.h, s.oh, oy0, oy1);
      pool_readers(bilinear, xx, s.w, s.ow, ox0, ox1);
    }
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      acc_t acc[VEC] = {};
      for (int64_t oy = oy0; oy <= oy1; ++oy) {
        const acc_t wy = pool_weight<acc_t>(bilinear, y, oy, s.h, s.oh);
        if (wy == acc_t(0)) continue;
        for (int64_t ox = ox0; ox <= ox1; ++ox) {
          const acc_t wx = pool_weight<acc_t>(bilinear, xx, ox, s.w, s.ow);
          if (wx == acc_t(0)) continue;
          const P v = reinterpret_cast<const P*>(grad_out + (base + oy * s.ow + ox) * c)[p];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += wy * wx * static_cast<acc_t>(v.v[k]);
        }
      }
      P o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc[k]);
      dst[p] = o;
    }
  }
}

// One (output cell, quadrant) per row group: a row copy between the [T, C] grid and the [T/4, 4C] cells.
template <typename V>
__global__ void patch_merge_2x2_kernel(const V* __restrict__ src, V* __restrict__ dst, Grids g, int64_t cells,
                                       int64_t vecs_per_row, bool forward) {
  for (int64_t q4 = cuda::first_row(); q4 < 4 * cells; q4 += cuda::row_stride()) {
    const int64_t cell = q4 >> 2, k = q4 & 3;
    const GridSegment s = segment_of_row<true>(g, cell);
    const int64_t q = cell - s.out_start, i = q / s.ow, j = q - i * s.ow;
    const int64_t in_row = s.in_start + (2 * i + k / 2) * s.w + 2 * j + (k & 1);
    if (forward) cuda::copy_row(dst + q4 * vecs_per_row, src + in_row * vecs_per_row, vecs_per_row);
    else cuda::copy_row(dst + in_row * vecs_per_row, src + q4 * vecs_per_row, vecs_per_row);
  }
}

// The kernel view of a grid plan; `table` keeps the uploaded table alive for the launch.
Grids make_grids(const GridPlan& p, bool class_token, const at::Device& device, at::Tensor& table) {
  Grids g{nullptr, int64_t(p.segs.size()), {}, 0, 0};
  if (p.segs.empty()) return g;
  if (p.uniform) {
    g.uniform = p.segs[0];
    g.in_per_image = g.uniform.h * g.uniform.w + (class_token ? 1 : 0);
    g.out_per_image = g.uniform.oh * g.uniform.ow + (class_token ? 1 : 0);
    return g;
  }
  std::vector<int64_t> host;
  host.reserve(6 * p.segs.size());
  for (const auto& s : p.segs) host.insert(host.end(), {s.in_start, s.h, s.w, s.out_start, s.oh, s.ow});
  table = cuda::upload_table(host, device);
  g.table = table.data_ptr<int64_t>();
  return g;
}

template <typename F>
void dispatch_pack(const at::Tensor& a, const at::Tensor& b, int64_t c, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "token_pool_2d_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (cuda::pack_width(c, sizeof(scalar_t), {a.data_ptr(), b.data_ptr()}) == kVec) {
      f(scalar_t{}, std::integral_constant<int, kVec>{});
    } else {
      f(scalar_t{}, std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace

at::Tensor token_pool_2d_cuda(const at::Tensor& x, c10::IntArrayRef grids, c10::IntArrayRef out_grids,
                              c10::string_view mode, bool class_token) {
  constexpr const char* op = "token_pool_2d";
  const GridPlan p = check_pool(op, x, grids, out_grids, class_token, true);
  const bool bilinear = parse_pool_mode(op, mode) == PoolMode::kBilinear;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous();
  const int64_t c = x.size(1);
  at::Tensor out = at::empty({p.total_out, c}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor table;
  const Grids g = make_grids(p, class_token, x.device(), table);
  dispatch_pack(xc, out, c, [&](auto tag, auto vec_tag) {
    using scalar_t = decltype(tag);
    constexpr int VEC = decltype(vec_tag)::value;
    const auto launch = cuda::row_groups(p.total_out, std::max<int64_t>(1, c / VEC));
    token_pool_2d_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
        xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, p.total_out, c, bilinear, class_token);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor token_pool_2d_backward_cuda(const at::Tensor& grad_out, c10::IntArrayRef grids, c10::IntArrayRef out_grids,
                                       c10::string_view mode, bool class_token) {
  constexpr const char* op = "token_pool_2d_backward";
  const GridPlan p = check_pool(op, grad_out, grids, out_grids, class_token, false);
  const bool bilinear = parse_pool_mode(op, mode) == PoolMode::kBilinear;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gc = grad_out.contiguous();
  const int64_t c = gc.size(1);
  at::Tensor grad_x = at::empty({p.total_in, c}, gc.options());
  if (grad_x.numel() == 0) return grad_x;
  at::Tensor table;
  const Grids g = make_grids(p, class_token, gc.device(), table);
  dispatch_pack(gc, grad_x, c, [&](auto tag, auto vec_tag) {
    using scalar_t = decltype(tag);
    constexpr int VEC = decltype(vec_tag)::value;
    const auto launch = cuda::row_groups(p.total_in, std::max<int64_t>(1, c / VEC));
    token_pool_2d_backward_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
        gc.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), g, p.total_in, c, bilinear, class_token);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

namespace {

at::Tensor merge_2x2_cuda(const at::Tensor& t, const GridPlan& p, bool forward) {
  const c10::cuda::CUDAGuard guard(t.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor tc = t.contiguous();
  const int64_t c = forward ? t.size(1) : t.size(1) / 4;
  at::Tensor out = forward ? at::empty({p.total_out, 4 * c}, t.options()) : at::empty({p.total_in, c}, t.options());
  if (out.numel() == 0) return out;
  at::Tensor table;
  const Grids g = make_grids(p, false, t.device(), table);
  const int64_t rb = c * t.element_size();
  cuda::dispatch_vector(cuda::vector_bytes(rb, {tc.data_ptr(), out.data_ptr()}), [&](auto v) {
    using V = decltype(v);
    const int64_t vpr = rb / int64_t(sizeof(V));
    const auto launch = cuda::row_launch(4 * p.total_out, vpr);
    patch_merge_2x2_kernel<V><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const V*>(tc.data_ptr()), static_cast<V*>(out.data_ptr()), g, p.total_out, vpr, forward);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor patch_merge_2x2_cuda(const at::Tensor& x, c10::IntArrayRef grids) {
  return merge_2x2_cuda(x, check_merge_2x2("patch_merge_2x2", x, grids, true), true);
}

at::Tensor patch_merge_2x2_backward_cuda(const at::Tensor& grad_out, c10::IntArrayRef grids) {
  return merge_2x2_cuda(grad_out, check_merge_2x2("patch_merge_2x2_backward", grad_out, grids, false), false);
}

}  // namespace vlcore
