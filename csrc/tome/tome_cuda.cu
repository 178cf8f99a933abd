// CUDA kernels of ToMe: bipartite soft matching, and the merge / unmerge gathers with their backward.
//
// Matching never stores the [Na x Nb] score matrix. One CTA per image:
//   1. B (odd tokens) is normalised tile by tile into shared memory (a warp per row, float32, zero-padded to
//      the template width MAXC); every A token is normalised into registers by the threads that own it.
//   2. Groups of L threads own an A token and split the B tile between them (L chosen on the host to balance
//      work over the CTA); each keeps its best (score, lowest index) and the group combines with shuffles.
//      The running best per A token lives in shared memory across tiles.
//   3. Top-r: the Na (score, index) pairs become 64-bit keys (~orderable(score) << 32 | index) and a bitonic
//      sort in shared memory orders them by score descending, ties to the lower index; a second sort puts the
//      kept tokens in ascending order when a class token is protected, a third groups the merged edges by
//      destination (ascending source) to build the inverse map.
// Merge and its backward are gathers over that inverse map (a row group per output / input row, 16-byte
// packs when aligned, fp32 accumulation): deterministic, no atomics.
//
// The kernels never read or write out of bounds whatever the maps hold; the per-image tables are built on
// the host from the host ints that fix the output shapes, uploaded asynchronously (no sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>

#include "common/row_copy.cuh"
#include "ops.h"
#include "tome/tome.h"
#include "common/token_rows.cuh"

namespace vlcore {
namespace {
using namespace tome_detail;
using cuda::Pack;

constexpr int kMatchThreads = 256;
constexpr uint64_t kNoKey = ~uint64_t(0);
constexpr int kMergedBit = 1 << 30;  // set in partner[a] once A token a is merged (partners are < 2^30)

struct SegmentArgs {
  const int64_t* table;  // [images, 6] (in_start, n, r, out_start, r_start, u_start), or null when uniform
  int64_t n, r;          // the uniform image
};

__device__ __forceinline__ TomeSegment segment(const SegmentArgs& a, int64_t b) {
  if (a.table) {
    const int64_t* t = a.table + 6 * b;
    return {t[0], t[1], t[2], t[3], t[4], t[5]};
  }
  const int64_t na = (a.n + 1) / 2;
  return {b * a.n, a.n, a.r, b * (a.n - a.r), b * a.r, b * (na - a.r)};
}

// Edge order key: score descending (NaN first, as torch's argsort(descending=True) puts it), ties to the lower
// index. The protected class token gets the largest key of a real token: it sorts after every other token
// whatever their scores, so it is never a source (padding keys, kNoKey, sort after it).
__device__ __forceinline__ uint64_t edge_key(float score, int64_t a, bool is_class_token) {
  if (is_class_token) return uint64_t(0xffffffffu) << 32 | uint64_t(a);
  if (score != score) return uint64_t(a);  // NaN, whatever its sign and payload: above +inf
  const uint32_t bits = __float_as_uint(score + 0.f);  // -0 becomes +0: equal scores get equal high words
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ascending with the score
  // ~ordered >= ~ordered(+inf) = 0x007fffff > 0 and <= ~ordered(-inf) = 0xff800000 < 0xffffffff: strictly
  // between the NaN and the class token keys.
  return (uint64_t(~ordered) << 32) | uint64_t(a);
}

// Ascending bitonic sort of keys[0, p) (p a power of two) by the whole CTA.
__device__ void bitonic_sort(uint64_t* keys, int p) {
  for (int k = 2; k <= p; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < p; i += blockDim.x) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const uint64_t x = keys[i], y = keys[ixj];
          const bool ascending = (i & k) == 0;
          if ((x > y) == ascending) {
            keys[i] = y;
            keys[ixj] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Row normalisation in fp32 without overflow or underflow: the row is first scaled by a power of two (exact)
// that brings its largest |v| into [0.5, 1), so that squares of |v| up to FLT_MAX or down to the denormals
// stay representable and the cosine matches the CPU's float64 one to fp32 rounding. A unit row is
// (v * pow2) * inv_norm.
__device__ __forceinline__ float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }  // NaN sticks

// The power of two for a row whose largest |v| is max_abs (NaN-propagating max). A zero row or one holding
// Inf/NaN gets NaN, and so do all its scores, as with ToMe's metric / metric.norm() (0/0, Inf/Inf).
__device__ __forceinline__ float row_pow2(float max_abs) {
  if (!(max_abs > 0.f) || isinf(max_abs)) return NAN;
  int e;
  (void)frexpf(max_abs, &e);  // max_abs = m * 2^e, m in [0.5, 1)
  return ldexpf(1.f, -min(max(e, -125), 126));  // kept a normal float: 2^-126 .. 2^125
}

template <typename scalar_t>
__device__ __forceinline__ float row_max_abs(const scalar_t* row, int64_t c) {
  float m = 0.f;
  for (int64_t k = 0; k < c; ++k) m = nan_max(m, fabsf(static_cast<float>(row[k])));
  return m;
}

// MAXC > 0: the metric width is at most MAXC and A rows live in registers. MAXC == 0: any width, A rows are
// read from global memory (L1) for every B row.
template <typename scalar_t, int MAXC>
__global__ void __launch_bounds__(kMatchThreads) tome_match_kernel(
    const scalar_t* __restrict__ metric, int64_t c, SegmentArgs segs, int64_t total_in, int64_t total_out,
    bool class_token, bool distill_token, int lanes_per_a, int tile_b, int tile_stride, int sort_size,
    int64_t* __restrict__ unmerged, int64_t* __restrict__ src_out, int64_t* __restrict__ dst_out,
    int64_t* __restrict__ dest, int64_t* __restrict__ offsets, int64_t* __restrict__ sources) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);                         // [sort_size]
  float* tile = reinterpret_cast<float*>(keys + sort_size);                   // [tile_b, tile_stride]
  float* best_score = tile + int64_t(tile_b) * tile_stride;                   // [sort_size]
  int* partner = reinterpret_cast<int*>(best_score + sort_size);              // [sort_size]

  const int64_t b = blockIdx.x;
  if (b == 0 && threadIdx.x == 0) offsets[total_out] = total_in;
  const TomeSegment s = segment(segs, b);
  const int64_t n = s.n, na = (n + 1) / 2, nb = n / 2, r = s.r, nu = na - r;
  const int64_t in0 = s.in_start, out0 = s.out_start;
  if (r == 0) {  // nothing merges: the image passes through unchanged
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
      dest[in0 + t] = out0 + t;
      offsets[out0 + t] = in0 + t;
      sources[in0 + t] = in0 + t;
    }
    for (int64_t a = threadIdx.x; a < na; a += blockDim.x) unmerged[s.u_start + a] = a;
    return;
  }

  for (int64_t a = threadIdx.x; a < na; a += blockDim.x) {
    best_score[a] = -INFINITY;
    partner[a] = 0;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int group = threadIdx.x / lanes_per_a, sub = threadIdx.x % lanes_per_a;
  const int groups = blockDim.x / lanes_per_a;
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned gmask = (lanes_per_a == 32 ? 0xffffffffu : ((1u << lanes_per_a) - 1u))
                         << (warp_lane & ~unsigned(lanes_per_a - 1));

  for (int64_t j0 = 0; j0 < nb; j0 += tile_b) {
    const int tb = int(std::min<int64_t>(tile_b, nb - j0));
    __syncthreads();  // the previous tile is no longer read
    for (int jj = warp; jj < tb; jj += warps) {  // a warp normalises one B row into the tile
      const scalar_t* row = metric + (in0 + 2 * (j0 + jj) + 1) * c;
      float max_abs = 0.f;
      for (int64_t k = lane; k < c; k += 32) max_abs = nan_max(max_abs, fabsf(static_cast<float>(row[k])));
      for (int off = 16; off > 0; off >>= 1) max_abs = nan_max(max_abs, __shfl_xor_sync(0xffffffffu, max_abs, off));
      const float pow2 = row_pow2(max_abs);
      float ss = 0.f;
      for (int64_t k = lane; k < c; k += 32) {
        const float v = static_cast<float>(row[k]) * pow2;
        ss = fmaf(v, v, ss);
      }
      for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      const float inv = rsqrtf(ss);
      float* dst_row = tile + int64_t(jj) * tile_stride;
      for (int k = lane; k < tile_stride; k += 32)
        dst_row[k] = k < c ? (static_cast<float>(row[k]) * pow2) * inv : 0.f;
    }
    __syncthreads();
    // Every group owns A tokens a = group, group + groups, ...; all lanes of a group run the same trips.
    for (int64_t a = group; a < na; a += groups) {
      if (class_token && a == 0) continue;  // the class token is never a source: its score stays -inf
      const scalar_t* arow = metric + (in0 + 2 * a) * c;
      float best = -INFINITY;
      int best_j = INT_MAX;
      if constexpr (MAXC > 0) {
        float av[MAXC], max_abs = 0.f;
#pragma unroll
        for (int k = 0; k < MAXC; ++k) {
          av[k] = k < c ? static_cast<float>(arow[k]) : 0.f;
          max_abs = nan_max(max_abs, fabsf(av[k]));
        }
        const float pow2 = row_pow2(max_abs);
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < MAXC; ++k) {
          av[k] = k < c ? av[k] * pow2 : 0.f;  // the padding stays 0 (with c == 0 every score is 0, as on the CPU)
          ss = fmaf(av[k], av[k], ss);
        }
        const float inv = rsqrtf(ss);
#pragma unroll
        for (int k = 0; k < MAXC; ++k) av[k] = k < c ? av[k] * inv : 0.f;
        for (int jj = sub; jj < tb; jj += lanes_per_a) {
          const float4* brow = reinterpret_cast<const float4*>(tile + int64_t(jj) * tile_stride);
          float dot = 0.f;
#pragma unroll
          for (int k4 = 0; k4 < MAXC / 4; ++k4) {
            const float4 bv = brow[k4];
            dot = fmaf(av[4 * k4], bv.x, dot);
            dot = fmaf(av[4 * k4 + 1], bv.y, dot);
            dot = fmaf(av[4 * k4 + 2], bv.z, dot);
            dot = fmaf(av[4 * k4 + 3], bv.w, dot);
          }
          const int j = int(j0) + jj;
          if (distill_token && j == 0) continue;  // the distillation token is never a destination
          if (score_beats(dot, best)) {  // NaN beats every number; ties keep the lower j
            best = dot;
            best_j = j;
          }
        }
      } else {
        // c > 128 here. The dot runs on the power-of-two-scaled row, then scales by inv (one multiply per
        // element, as before); a NaN pow2 (zero / non-finite row) makes every dot NaN.
        const float pow2 = row_pow2(row_max_abs(arow, c));
        float ss = 0.f;
        for (int64_t k = 0; k < c; ++k) {
          const float v = static_cast<float>(arow[k]) * pow2;
          ss = fmaf(v, v, ss);
        }
        const float inv = rsqrtf(ss);
        for (int jj = sub; jj < tb; jj += lanes_per_a) {
          const float* brow = tile + int64_t(jj) * tile_stride;
          float dot = 0.f;
          for (int64_t k = 0; k < c; ++k) dot = fmaf(static_cast<float>(arow[k]) * pow2, brow[k], dot);
          dot *= inv;
          const int j = int(j0) + jj;
          if (distill_token && j == 0) continue;
          if (score_beats(dot, best)) {
            best = dot;
            best_j = j;
          }
        }
      }
      // Combine the group: the higher score (NaN highest), ties (equal, or both NaN) to the lower index.
      for (int off = lanes_per_a / 2; off > 0; off >>= 1) {
        const float other = __shfl_xor_sync(gmask, best, off, lanes_per_a);
        const int other_j = __shfl_xor_sync(gmask, best_j, off, lanes_per_a);
        if (score_beats(other, best) || (!score_beats(best, other) && other_j < best_j)) {
          best = other;
          best_j = other_j;
        }
      }
      if (sub == 0 && best_j != INT_MAX && score_beats(best, best_score[a])) {  // earlier tiles hold lower indices
        best_score[a] = best;
        partner[a] = best_j;
      }
    }
  }
  __syncthreads();

  // 1. Edge order: score descending (NaN first), ties to the lower A index, the class token last.
  for (int i = threadIdx.x; i < sort_size; i += blockDim.x)
    keys[i] = i < na ? edge_key(best_score[i], i, class_token && i == 0) : kNoKey;
  __syncthreads();
  bitonic_sort(keys, sort_size);
  for (int64_t k = threadIdx.x; k < r; k += blockDim.x) {
    const int a = int(keys[k] & 0xffffffffu);
    src_out[s.r_start + k] = a;
    dst_out[s.r_start + k] = partner[a];
    dest[in0 + 2 * a] = out0 + nu + partner[a];
    partner[a] |= kMergedBit;  // for the sorts below
  }
  if (!class_token) {  // kept tokens in edge order (ToMe's order without a class token)
    for (int64_t u = threadIdx.x; u < nu; u += blockDim.x) {
      const int a = int(keys[r + u] & 0xffffffffu);
      unmerged[s.u_start + u] = a;
      dest[in0 + 2 * a] = out0 + u;
      offsets[out0 + u] = in0 + u;
      sources[in0 + u] = in0 + 2 * a;
    }
  }
  __syncthreads();
  // 2. With a class token the kept tokens go in ascending order, so that the class token stays first.
  if (class_token) {
    for (int i = threadIdx.x; i < sort_size; i += blockDim.x)
      keys[i] = (i < na && !(partner[i] & kMergedBit)) ? uint64_t(i) : kNoKey;
    __syncthreads();
    bitonic_sort(keys, sort_size);
    for (int64_t u = threadIdx.x; u < nu; u += blockDim.x) {
      const int a = int(keys[u]);
      unmerged[s.u_start + u] = a;
      dest[in0 + 2 * a] = out0 + u;
      offsets[out0 + u] = in0 + u;
      sources[in0 + u] = in0 + 2 * a;
    }
    __syncthreads();
  }
  // 3. Merged edges grouped by destination, ascending source: the inverse map of the B rows.
  for (int i = threadIdx.x; i < sort_size; i += blockDim.x)
    keys[i] = (i < na && (partner[i] & kMergedBit)) ? ((uint64_t(partner[i] & ~kMergedBit) << 32) | uint64_t(i)) : kNoKey;
  __syncthreads();
  bitonic_sort(keys, sort_size);
  for (int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
    int64_t lo = 0, hi = r;  // merged edges with destination < j
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if ((keys[mid] >> 32) < uint64_t(j)) lo = mid + 1; else hi = mid;
    }
    const int64_t pos = in0 + nu + j + lo;
    dest[in0 + 2 * j + 1] = out0 + nu + j;
    offsets[out0 + nu + j] = pos;
    sources[pos] = in0 + 2 * j + 1;
  }
  for (int64_t e = threadIdx.x; e < r; e += blockDim.x) {
    const int64_t d = int64_t(keys[e] >> 32), a = int64_t(keys[e] & 0xffffffffu);
    sources[in0 + nu + d + 1 + e] = in0 + 2 * a;
  }
}

int next_pow2(int64_t v) {
  int p = 2;
  while (p < v) p <<= 1;
  return p;
}

template <typename scalar_t, int VEC>
__global__ void tome_merge_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ size,
                                  const int64_t* __restrict__ offsets, const int64_t* __restrict__ sources,
                                  scalar_t* __restrict__ out, scalar_t* __restrict__ out_size, int64_t total_in,
                                  int64_t total_out, int64_t c, int mode_id) {
  using acc_t = at::opmath_type<scalar_t>;
  const MergeMode mode = static_cast<MergeMode>(mode_id);
  const int64_t packs = c / VEC;
  for (int64_t j = cuda::first_row(); j < total_out; j += cuda::row_stride()) {
    const int64_t s0 = std::max<int64_t>(0, offsets[j]), s1 = std::min<int64_t>(total_in, offsets[j + 1]);
    acc_t total_size = 0;
    for (int64_t e = s0; e < s1; ++e) {
      const int64_t t = sources[e];
      if (t >= 0 && t < total_in) total_size += size ? static_cast<acc_t>(size[t]) : acc_t(1);
    }
    if (threadIdx.x == 0) out_size[j] = static_cast<scalar_t>(total_size);
    const acc_t scale = mode == MergeMode::kWavg ? acc_t(1) / total_size
                        : mode == MergeMode::kMean ? acc_t(1) / acc_t(s1 - s0) : acc_t(1);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = mode == MergeMode::kAmax ? acc_t(-INFINITY) : acc_t(0);
      for (int64_t e = s0; e < s1; ++e) {
        const int64_t t = sources[e];
        if (t < 0 || t >= total_in) continue;
        const Pack<scalar_t, VEC> in = reinterpret_cast<const Pack<scalar_t, VEC>*>(x + t * c)[p];
        const acc_t w = (mode == MergeMode::kWavg && size) ? static_cast<acc_t>(size[t]) : acc_t(1);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t val = static_cast<acc_t>(in.v[v]);
          if (mode == MergeMode::kAmax) acc[v] = (val > acc[v] || val != val) ? val : acc[v];
          else acc[v] += w * val;
        }
      }
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) o.v[v] = static_cast<scalar_t>(mode == MergeMode::kAmax ? acc[v] : acc[v] * scale);
      reinterpret_cast<Pack<scalar_t, VEC>*>(out + j * c)[p] = o;
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void tome_merge_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grad_size,
                                           const scalar_t* __restrict__ x, const scalar_t* __restrict__ size,
                                           const scalar_t* __restrict__ out, const int64_t* __restrict__ dest,
                                           const int64_t* __restrict__ offsets, const int64_t* __restrict__ sources,
                                           scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_sz,
                                           int64_t total_in, int64_t total_out, int64_t c, int mode_id) {
  using acc_t = at::opmath_type<scalar_t>;
  const MergeMode mode = static_cast<MergeMode>(mode_id);
  const int64_t packs = c / VEC;
  for (int64_t t = cuda::first_row(); t < total_in; t += cuda::row_stride()) {
    const int64_t j = dest[t];
    const bool valid = j >= 0 && j < total_out;
    int64_t s0 = 0, s1 = 0;
    acc_t total_size = 1, dsize = 0;
    if (valid) {
      s0 = std::max<int64_t>(0, offsets[j]);
      s1 = std::min<int64_t>(total_in, offsets[j + 1]);
      total_size = 0;
      for (int64_t e = s0; e < s1; ++e) {
        const int64_t u = sources[e];
        if (u >= 0 && u < total_in) total_size += size ? static_cast<acc_t>(size[u]) : acc_t(1);
      }
    }
    const acc_t wt = size ? static_cast<acc_t>(size[t]) : acc_t(1);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      Pack<scalar_t, VEC> gx;
      if (!valid) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) gx.v[v] = scalar_t(0);
      } else {
        const Pack<scalar_t, VEC> g = reinterpret_cast<const Pack<scalar_t, VEC>*>(grad_out + j * c)[p];
        const Pack<scalar_t, VEC> xv = reinterpret_cast<const Pack<scalar_t, VEC>*>(x + t * c)[p];
        const Pack<scalar_t, VEC> ov = reinterpret_cast<const Pack<scalar_t, VEC>*>(out + j * c)[p];
        int ties[VEC];
        if (mode == MergeMode::kAmax) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) ties[v] = 0;
          for (int64_t e = s0; e < s1; ++e) {
            const int64_t u = sources[e];
            if (u < 0 || u >= total_in) continue;
            const Pack<scalar_t, VEC> xu = reinterpret_cast<const Pack<scalar_t, VEC>*>(x + u * c)[p];
#pragma unroll
            for (int v = 0; v < VEC; ++v) ties[v] += static_cast<acc_t>(xu.v[v]) == static_cast<acc_t>(ov.v[v]);
          }
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const acc_t gv = static_cast<acc_t>(g.v[v]);
          acc_t r;
          if (mode == MergeMode::kWavg) {
            r = gv * wt / total_size;
            dsize += gv * (static_cast<acc_t>(xv.v[v]) - static_cast<acc_t>(ov.v[v])) / total_size;
          } else if (mode == MergeMode::kMean) {
            r = gv / acc_t(s1 - s0);
          } else if (mode == MergeMode::kSum) {
            r = gv;
          } else {
            r = static_cast<acc_t>(xv.v[v]) == static_cast<acc_t>(ov.v[v]) ? gv / acc_t(ties[v] > 0 ? ties[v] : 1) : acc_t(0);
          }
          gx.v[v] = static_cast<scalar_t>(r);
        }
      }
      reinterpret_cast<Pack<scalar_t, VEC>*>(grad_x + t * c)[p] = gx;
    }
    if (grad_sz) {
      dsize = cuda::group_sum(dsize);
      if (threadIdx.x == 0) {
        if (valid && grad_size) dsize += static_cast<acc_t>(grad_size[j]);
        grad_sz[t] = static_cast<scalar_t>(dsize);
      }
    }
  }
}

template <typename V>
__global__ void tome_unmerge_kernel(const V* __restrict__ x, const int64_t* __restrict__ dest, V* __restrict__ out,
                                    int64_t total_in, int64_t total_out, int64_t vecs_per_row) {
  for (int64_t t = cuda::first_row(); t < total_in; t += cuda::row_stride()) {
    const int64_t j = dest[t];
    if (j >= 0 && j < total_out) cuda::copy_row(out + t * vecs_per_row, x + j * vecs_per_row, vecs_per_row);
    else cuda::fill_row(out + t * vecs_per_row, V{}, vecs_per_row);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match_cuda(
    const at::Tensor& metric, c10::IntArrayRef seqlens, c10::IntArrayRef r, bool class_token, bool distill_token) {
  constexpr const char* op = "tome_match";
  const TomePlan p = tome_plan(op, seqlens, r, class_token, distill_token);
  check_metric(op, metric, p);
  const c10::cuda::CUDAGuard guard(metric.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor m = metric.contiguous();
  const auto opts = metric.options().dtype(at::kLong);
  at::Tensor unmerged = at::empty({p.total_unmerged}, opts), src = at::empty({p.total_r}, opts),
             dst = at::empty({p.total_r}, opts), dest = at::empty({p.total_in}, opts),
             offsets = at::empty({p.total_out + 1}, opts), sources = at::empty({p.total_in}, opts);
  const int64_t images = int64_t(p.segs.size());
  if (images == 0) {
    offsets.fill_(0);
    return {unmerged, src, dst, dest, offsets, sources};
  }
  int64_t max_na = 1;
  for (const auto& s : p.segs) max_na = std::max(max_na, (s.n + 1) / 2);
  // Lanes per A token: the fewest rounds of B-tile work over the CTA.
  int lanes = 1;
  double best_cost = 1e30;
  for (int l = 1; l <= 8; l <<= 1) {
    const double rounds = double((max_na * l + kMatchThreads - 1) / kMatchThreads);
    const double cost = rounds / l;
    if (cost < best_cost - 1e-9) {
      best_cost = cost;
      lanes = l;
    }
  }
  const int64_t c = m.size(1);
  const int maxc = c <= 64 ? 64 : (c <= 128 ? 128 : 0);
  const int tile_stride = maxc > 0 ? maxc + 4 : int((c + 3) / 4 * 4 + 4);
  const int tile_b = int(std::max<int64_t>(1, std::min<int64_t>(maxc == 64 ? 128 : 64, (32768 / 4) / tile_stride)));
  const int sort_size = next_pow2(max_na);
  const size_t smem = size_t(sort_size) * (8 + 4 + 4) + size_t(tile_b) * tile_stride * 4;
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, metric.device().index()));
  VLCORE_CHECK(smem <= size_t(smem_optin), op, "an image of ", 2 * max_na, " tokens needs ", smem,
               " bytes of shared memory for the matching, more than this GPU offers (", smem_optin,
               "); split the image or match it on the CPU");
  at::Tensor table;
  SegmentArgs args{nullptr, p.segs[0].n, p.segs[0].r};
  if (!p.uniform) {
    std::vector<int64_t> host;
    host.reserve(6 * images);
    for (const auto& s : p.segs) host.insert(host.end(), {s.in_start, s.n, s.r, s.out_start, s.r_start, s.u_start});
    table = cuda::upload_table(host, metric.device());
    args.table = table.data_ptr<int64_t>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "tome_match_cuda", [&] {
    auto launch = [&](auto kernel) {
      if (smem > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      }
      kernel<<<static_cast<unsigned>(images), kMatchThreads, smem, stream>>>(
          m.data_ptr<scalar_t>(), c, args, p.total_in, p.total_out, class_token, distill_token, lanes, tile_b,
          tile_stride, sort_size, unmerged.data_ptr<int64_t>(), src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(),
          dest.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), sources.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (maxc == 64) launch(tome_match_kernel<scalar_t, 64>);
    else if (maxc == 128) launch(tome_match_kernel<scalar_t, 128>);
    else launch(tome_match_kernel<scalar_t, 0>);
  });
  return {unmerged, src, dst, dest, offsets, sources};
}

std::tuple<at::Tensor, at::Tensor> tome_merge_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& size,
                                                   const at::Tensor& dest, const at::Tensor& offsets,
                                                   const at::Tensor& sources, c10::string_view mode) {
  const MergeArgs args = check_merge("tome_merge", x, size, dest, offsets, sources, mode);
  const int64_t total_in = args.total_in, total_out = args.total_out, c = args.c;
  const MergeMode md = args.mode;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous(), oc = offsets.contiguous(), sc = sources.contiguous();
  const at::Tensor sz = size ? size->contiguous() : at::Tensor();
  at::Tensor out = at::empty({total_out, c}, x.options()), out_size = at::empty({total_out}, x.options());
  if (total_out == 0) return {out, out_size};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge_cuda", [&] {
    const scalar_t* sp = size ? sz.data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const auto launch = cuda::row_groups(total_out, std::max<int64_t>(1, c / VEC));
      tome_merge_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
          xc.data_ptr<scalar_t>(), sp, oc.data_ptr<int64_t>(), sc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
          out_size.data_ptr<scalar_t>(), total_in, total_out, c, int(md));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (cuda::pack_width(c, sizeof(scalar_t), {xc.data_ptr(), out.data_ptr()}) == kVec) {
      run(std::integral_constant<int, kVec>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return {out, out_size};
}

std::tuple<at::Tensor, at::Tensor> tome_merge_backward_cuda(const at::Tensor& grad_out,
                                                            const c10::optional<at::Tensor>& grad_size,
                                                            const at::Tensor& x, const c10::optional<at::Tensor>& size,
                                                            const at::Tensor& out, const at::Tensor& dest,
                                                            const at::Tensor& offsets, const at::Tensor& sources,
                                                            c10::string_view mode) {
  const MergeArgs args =
      check_merge_backward("tome_merge_backward", grad_out, grad_size, x, size, out, dest, offsets, sources, mode);
  const int64_t total_in = args.total_in, total_out = args.total_out, c = args.c;
  const MergeMode md = args.mode;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad_out.contiguous(), xc = x.contiguous(), oc = out.contiguous(), dc = dest.contiguous(),
                   off = offsets.contiguous(), sc = sources.contiguous();
  const at::Tensor sz = size ? size->contiguous() : at::Tensor();
  const at::Tensor gs = grad_size ? grad_size->to(x.scalar_type()).contiguous() : at::Tensor();
  at::Tensor grad_x = at::empty({total_in, c}, x.options());
  at::Tensor grad_sz = at::empty({size ? total_in : 0}, x.options());
  if (total_in == 0) return {grad_x, grad_sz};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_merge_backward_cuda", [&] {
    auto run = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const auto launch = cuda::row_groups(total_in, std::max<int64_t>(1, c / VEC));
      tome_merge_backward_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
          g.data_ptr<scalar_t>(), grad_size ? gs.data_ptr<scalar_t>() : nullptr, xc.data_ptr<scalar_t>(),
          size ? sz.data_ptr<scalar_t>() : nullptr, oc.data_ptr<scalar_t>(), dc.data_ptr<int64_t>(),
          off.data_ptr<int64_t>(), sc.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(),
          size ? grad_sz.data_ptr<scalar_t>() : nullptr, total_in, total_out, c, int(md));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (cuda::pack_width(c, sizeof(scalar_t), {g.data_ptr(), xc.data_ptr(), oc.data_ptr(), grad_x.data_ptr()}) == kVec) {
      run(std::integral_constant<int, kVec>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return {grad_x, grad_sz};
}

at::Tensor tome_unmerge_cuda(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& offsets,
                             const at::Tensor& sources) {
  const auto totals = check_unmerge("tome_unmerge", x, dest, offsets, sources);
  const int64_t total_in = totals.first, total_out = totals.second;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous(), dc = dest.contiguous();
  at::Tensor out = at::empty({total_in, x.size(1)}, x.options());
  const int64_t rb = row_bytes(xc, 1);
  if (out.numel() == 0) return out;
  cuda::dispatch_vector(cuda::vector_bytes(rb, {xc.data_ptr(), out.data_ptr()}), [&](auto v) {
    using V = decltype(v);
    const int64_t vpr = rb / int64_t(sizeof(V));
    const auto launch = cuda::row_launch(total_in, vpr);
    tome_unmerge_kernel<V><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const V*>(xc.data_ptr()), dc.data_ptr<int64_t>(), static_cast<V*>(out.data_ptr()), total_in,
        total_out, vpr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace vlcore
