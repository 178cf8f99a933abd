#pragma once
// CUDA kernels of the attention family: FlashAttention-2-style tiles on mma.sync m16n8k16 (sm_80+, fine on
// sm_90a), float16 / bfloat16 inputs with float32 accumulation, head dims 32 / 64 / 128.
//
// Forward: one CTA of 4 warps per (64-query tile, query head, query segment); each warp owns 16 query
// rows, keeps its Q fragments and the output accumulator in registers and streams the key segment through
// shared memory in tiles of 64 keys (32 for D = 128), with an online softmax in registers (P never leaves
// the registers: the S accumulator fragments are re-packed as the A operand of P V). 64-row tiles keep
// the short fusion shapes (Lq 40: one tile) at one CTA per (sample, head) with 4 warps each.
//
// Backward: a preprocess computes delta = rowsum(dO * O) - dlse. Then one CTA per (64-key tile, K/V head,
// key segment) walks every query segment that reads its key segment (a CSR list built on the device, so
// kv_segment needs no host sync) and every query head of its GQA group, accumulating dK and dV in
// registers (each key row is owned by one CTA: no atomics, deterministic) and d key_bias per (key, head).
// dQ: by default the CTA stages dS in shared memory and adds its contribution to a float32 dQ buffer with
// atomics; with deterministic=True a separate kernel, one CTA per query tile, recomputes S and dP and
// accumulates dQ in registers in a fixed order (about 1.4x the backward's matmul work).
//
// Fragment layouts follow the PTX ISA for mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 (row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (k x n):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C 16x8  (float):     c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace vlcore::attention_cuda {

struct Params {
  // inputs (elements, not bytes, for every stride)
  const void* q;
  const void* k;
  const void* v;
  int64_t q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  const int32_t* cu_q;
  const int32_t* cu_k;
  const int32_t* kv_segment;   // may be null
  const int32_t* key_lengths;  // may be null
  const float* bias;           // float32 copy of key_bias, may be null
  int64_t bias_row_stride, bias_head_stride;
  int total_q, total_k, heads_q, heads_kv, num_q_segments, num_k_segments;
  int q_tiles, k_tiles;  // tiles per segment along the grid's x axis
  bool causal;
  float scale;
  // forward outputs (contiguous): out [total_q, Hq, D], lse [Hq, total_q]
  void* out;
  float* lse;
  // backward
  const void* dout;
  int64_t do_row_stride, do_head_stride;
  const void* o;
  int64_t o_row_stride, o_head_stride;
  const float* dlse;           // may be null
  float* delta;                // [Hq, total_q]
  const int32_t* reader_order;    // query segments sorted by the key segment they read
  const int32_t* reader_offsets;  // [num_k_segments + 1] into reader_order
  float* dq_accum;  // [total_q, Hq, D] float32 (atomic path)
  void* dq;         // [total_q, Hq, D] (deterministic path)
  void* dk;         // [total_k, Hkv, D]
  void* dv;
  float* dbias;  // [total_k, Hq] float32, may be null
};

// ---------------------------------------------------------------------------------------------------------
// Element helpers

template <typename T> struct Num;
template <> struct Num<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Two adjacent elements (4-byte aligned: even column, even row length) as one register.
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
// Two elements from different rows packed as one register (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
  return uint32_t(Num<T>::bits(lo)) | (uint32_t(Num<T>::bits(hi)) << 16);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host refuses devices below sm_80
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                          const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// Fragment loaders over row-major shared tiles (row length ld); g = lane / 4, t = lane % 4.
// A 16x16 whose rows are tile rows [row0, row0 + 16) and k the columns [col0, col0 + 16).
template <typename T>
__device__ __forceinline__ void a_from_rows(uint32_t (&a)[4], const T* s, int ld, int row0, int col0, int g, int t) {
  a[0] = ld_pair(&s[(row0 + g) * ld + col0 + 2 * t]);
  a[1] = ld_pair(&s[(row0 + g + 8) * ld + col0 + 2 * t]);
  a[2] = ld_pair(&s[(row0 + g) * ld + col0 + 8 + 2 * t]);
  a[3] = ld_pair(&s[(row0 + g + 8) * ld + col0 + 8 + 2 * t]);
}
// B 16x8 with n the tile rows [n0, n0 + 8) and k the columns [col0, col0 + 16): the tile read transposed
// (K for Q K^T), two adjacent elements per register.
template <typename T>
__device__ __forceinline__ void b_from_row_major(uint32_t (&b)[2], const T* s, int ld, int n0, int col0, int g, int t) {
  b[0] = ld_pair(&s[(n0 + g) * ld + col0 + 2 * t]);
  b[1] = ld_pair(&s[(n0 + g) * ld + col0 + 8 + 2 * t]);
}
// B 16x8 with k the tile rows [k0, k0 + 16) and n the column `col0 + g` (V for P V): elements of two rows
// packed per register.
template <typename T>
__device__ __forceinline__ void b_from_col(uint32_t (&b)[2], const T* s, int ld, int k0, int col0, int g, int t) {
  const int k = k0 + 2 * t, c = col0 + g;
  b[0] = pack_pair(s[k * ld + c], s[(k + 1) * ld + c]);
  b[1] = pack_pair(s[(k + 8) * ld + c], s[(k + 9) * ld + c]);
}
// Two float accumulator tiles (16 x 8 each, columns [16 kk, 16 kk + 16)) re-packed as one A fragment.
template <typename T, int N>
__device__ __forceinline__ void a_from_accum(uint32_t (&a)[4], const float (&acc)[N][4], int kk) {
  a[0] = Num<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = Num<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = Num<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = Num<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}
template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}
// Row `half` (0: g, 1: g + 8) of the accumulator tiles [N][4] (columns 8 i + 2t, + 1), times `scale`,
// stored to a contiguous row of N * 8 elements.
template <typename T, int N>
__device__ __forceinline__ void store_accum_row(T* dst, const float (&acc)[N][4], int half, float scale, int t) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    *reinterpret_cast<uint32_t*>(dst + i * 8 + 2 * t) = Num<T>::pack(acc[i][2 * half] * scale, acc[i][2 * half + 1] * scale);
  }
}

// out[16 x DOUT] += A[16 x K] B[K x DOUT], A given as float accumulator tiles [K / 8][4] (re-packed to T),
// B the shared tile rows [0, K) from column col0 (V in P V, K in dS K, dO in P^T dO, Q in dS^T Q).
template <typename T, int K, int DOUT>
__device__ __forceinline__ void mma_accum_times_rows(float (&out)[DOUT / 8][4], const float (&acc)[K / 8][4],
                                                     const T* s, int ld, int col0, int g, int t) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    a_from_accum<T>(a, acc, kk);
#pragma unroll
    for (int dt = 0; dt < DOUT / 8; ++dt) {
      uint32_t b[2];
      b_from_col(b, s, ld, kk * 16, col0 + dt * 8, g, t);
      mma_16816<T>(out[dt], a, b);
    }
  }
}

// Sum (or max) over the 4 threads of a quad, which hold the columns of the same two rows.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

constexpr float kNegInf = -INFINITY;

// ---------------------------------------------------------------------------------------------------------
// Segments, clamped so that bad index values never lead out of bounds (values are checked on the host
// only with validate=True; see vlcore/ops/attention.py).

struct SegmentView {
  int qs = 0, nq = 0;    // query rows [qs, qs + nq)
  int ks = 0, nk = 0;    // key rows [ks, ks + nk)
  int used = 0;          // keys read: the first `used` of the key segment
};

__device__ __forceinline__ int clampi(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

__device__ __forceinline__ void key_segment_bounds(const Params& p, int s, int& ks, int& nk) {
  if (s < 0 || s >= p.num_k_segments) {
    ks = 0;
    nk = 0;
    return;
  }
  ks = clampi(p.cu_k[s], 0, p.total_k);
  nk = clampi(p.cu_k[s + 1], ks, p.total_k) - ks;
}

__device__ __forceinline__ SegmentView segment_of(const Params& p, int i) {
  SegmentView v;
  v.qs = clampi(p.cu_q[i], 0, p.total_q);
  v.nq = clampi(p.cu_q[i + 1], v.qs, p.total_q) - v.qs;
  key_segment_bounds(p, p.kv_segment ? p.kv_segment[i] : i, v.ks, v.nk);
  v.used = p.key_lengths ? clampi(p.key_lengths[i], 0, v.nk) : v.nk;
  return v;
}

__device__ __forceinline__ float bias_at(const Params& p, int key_row, int head) {
  return p.bias ? p.bias[int64_t(key_row) * p.bias_row_stride + int64_t(head) * p.bias_head_stride] : 0.f;
}

// Copy `valid` rows of D elements (global rows `row_stride` apart, 16-byte aligned) into shared rows of LD
// elements, zero-filling rows [valid, rows). 16-byte vectors.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_rows(T* __restrict__ dst, const T* __restrict__ src, int64_t row_stride,
                                          int valid, int rows) {
  constexpr int kVec = 8;  // elements per 16 bytes
  constexpr int kVecsPerRow = D / kVec;
  for (int idx = threadIdx.x; idx < rows * kVecsPerRow; idx += blockDim.x) {
    const int r = idx / kVecsPerRow, c = (idx % kVecsPerRow) * kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < valid) val = *reinterpret_cast<const uint4*>(src + int64_t(r) * row_stride + c);
    *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
  }
}

template <int D>
struct Tiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPad = 8;  // 16 bytes per shared row: spreads rows over the banks, keeps alignment
  static constexpr int kLd = D + kPad;
  // forward / dQ: 64 queries per CTA (16 per warp), key tiles of 64 (32 for D = 128: registers and smem)
  static constexpr int kQueries = 64;
  static constexpr int kKeys = D <= 64 ? 64 : 32;
  // dK/dV: 64 keys per CTA (16 per warp), query tiles of 64 (32 for D = 128)
  static constexpr int kBwdKeys = 64;
  static constexpr int kBwdQueries = D <= 64 ? 64 : 32;
  static constexpr int kLdS = kBwdQueries + kPad;  // row length of the staged dS^T tile

  static constexpr size_t forward_smem(size_t elem) { return elem * (kQueries + 2 * kKeys) * kLd; }
  static constexpr size_t dq_smem(size_t elem) { return elem * (2 * kQueries + 2 * kKeys) * kLd; }
  static constexpr size_t dkdv_smem(size_t elem) {
    return elem * ((2 * kBwdKeys + 2 * kBwdQueries) * kLd + kBwdKeys * kLdS) + 2 * sizeof(float) * kBwdQueries;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Forward

template <typename T, int D>
__global__ void __launch_bounds__(Tiles<D>::kThreads) attention_forward_kernel(const Params p) {
  using C = Tiles<D>;
  constexpr int BM = C::kQueries, BN = C::kKeys, LD = C::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LD;
  T* sV = sK + BN * LD;

  const int seg = blockIdx.x / p.q_tiles, m0 = (blockIdx.x % p.q_tiles) * BM, h = blockIdx.y;
  const SegmentView sv = segment_of(p, seg);
  if (m0 >= sv.nq) return;  // uniform over the CTA
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  load_rows<T, D, LD>(sQ, q + int64_t(sv.qs + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride, p.q_row_stride,
                      min(BM, sv.nq - m0), BM);
  __syncthreads();
  const int wr = warp * 16;
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) a_from_rows(qf[kk], sQ, LD, wr, kk * 16, g, t);

  float o[D / 8][4];
  zero(o);
  float m[2] = {kNegInf, kNegInf}, m_safe[2] = {0.f, 0.f}, l[2] = {0.f, 0.f};
  const int shift = sv.nk - sv.nq;  // bottom-right causal alignment
  const int rows[2] = {m0 + wr + g, m0 + wr + g + 8};  // segment-relative query rows of this thread
  // Keys past c1 are masked for every row of the tile.
  const int c1 = p.causal ? clampi(m0 + BM + shift, 0, sv.used) : sv.used;

  for (int n0 = 0; n0 < c1; n0 += BN) {
    __syncthreads();  // the previous tile is consumed
    const int valid = min(BN, c1 - n0);
    load_rows<T, D, LD>(sK, k + int64_t(sv.ks + n0) * p.k_row_stride + int64_t(hk) * p.k_head_stride,
                        p.k_row_stride, valid, BN);
    load_rows<T, D, LD>(sV, v + int64_t(sv.ks + n0) * p.v_row_stride + int64_t(hk) * p.v_head_stride,
                        p.v_row_stride, valid, BN);
    __syncthreads();

    float s[BN / 8][4];
    zero(s);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t b[2];
        b_from_row_major(b, sK, LD, nt * 8, kk * 16, g, t);
        mma_16816<T>(s[nt], qf[kk], b);
      }
    }
    // scale, bias, mask; row maxima
    float row_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + nt * 8 + 2 * t + (e & 1), r = rows[e >> 1];
        const bool ok = j < c1 && (!p.causal || j <= r + shift);
        const float x = ok ? s[nt][e] * p.scale + bias_at(p, sv.ks + j, h) : kNegInf;
        s[nt][e] = x;
        row_max[e >> 1] = fmaxf(row_max[e >> 1], x);
      }
    }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m[r], quad_max(row_max[r]));
      m_safe[r] = m_new == kNegInf ? 0.f : m_new;  // a row with no key yet: exp() must not see -inf - -inf
      rescale[r] = __expf(m[r] - m_safe[r]);
      m[r] = m_new;
      l[r] *= rescale[r];
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= rescale[0];
      o[i][1] *= rescale[0];
      o[i][2] *= rescale[1];
      o[i][3] *= rescale[1];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = __expf(s[nt][e] - m_safe[e >> 1]);
        l[e >> 1] += s[nt][e];
      }
    }
    // O += P V: the S accumulators re-packed as A fragments; V read as B (k = key, n = dim).
    mma_accum_times_rows<T, BN, D>(o, s, sV, LD, 0, g, t);
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(l[r]);
    const int row = rows[r];
    if (row >= sv.nq) continue;
    const float inv = total > 0.f ? 1.f / total : 0.f;  // a row that saw no key gives 0
    store_accum_row<T>(out + (int64_t(sv.qs + row) * p.heads_q + h) * D, o, r, inv, t);
    if (t == 0) p.lse[int64_t(h) * p.total_q + sv.qs + row] = total > 0.f ? m_safe[r] + logf(total) : kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward preprocess: delta = rowsum(dO * O) - dlse, one warp per (query row, head).

template <typename T, int D>
__global__ void attention_backward_delta_kernel(const Params p) {
  const int64_t item = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (item >= int64_t(p.total_q) * p.heads_q) return;
  const int row = int(item / p.heads_q), h = int(item % p.heads_q);
  const T* dout = static_cast<const T*>(p.dout) + int64_t(row) * p.do_row_stride + int64_t(h) * p.do_head_stride;
  const T* o = static_cast<const T*>(p.o) + int64_t(row) * p.o_row_stride + int64_t(h) * p.o_head_stride;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += Num<T>::to_float(dout[d]) * Num<T>::to_float(o[d]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int64_t at = int64_t(h) * p.total_q + row;
    p.delta[at] = acc - (p.dlse ? p.dlse[at] : 0.f);
  }
}

// P and dS of one logit: p = exp(scale * s + bias - lse) (0 when masked or when the row saw no key).
__device__ __forceinline__ float prob(float s, float scale, float bias, float lse, bool ok) {
  return ok && lse != kNegInf ? __expf(s * scale + bias - lse) : 0.f;
}

// ---------------------------------------------------------------------------------------------------------
// Backward dK / dV (and dQ by atomics when atomic_dq): one CTA per (64-key tile, K/V head, key segment).

template <typename T, int D, bool kAtomicDq>
__global__ void __launch_bounds__(Tiles<D>::kThreads) attention_backward_dkdv_kernel(const Params p) {
  using C = Tiles<D>;
  constexpr int BN = C::kBwdKeys, BQ = C::kBwdQueries, LD = C::kLd, LDS = C::kLdS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;
  T* sdO = sQ + BQ * LD;
  T* sdS = sdO + BQ * LD;  // dS^T [BN keys][BQ queries]
  float* sLse = reinterpret_cast<float*>(sdS + BN * LDS);
  float* sDelta = sLse + BQ;

  const int sk = blockIdx.x / p.k_tiles, n0 = (blockIdx.x % p.k_tiles) * BN, hk = blockIdx.y;
  int ks, nk;
  key_segment_bounds(p, sk, ks, nk);
  if (n0 >= nk) return;  // uniform over the CTA
  const int group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);

  load_rows<T, D, LD>(sK, static_cast<const T*>(p.k) + int64_t(ks + n0) * p.k_row_stride + int64_t(hk) * p.k_head_stride,
                      p.k_row_stride, min(BN, nk - n0), BN);
  load_rows<T, D, LD>(sV, static_cast<const T*>(p.v) + int64_t(ks + n0) * p.v_row_stride + int64_t(hk) * p.v_head_stride,
                      p.v_row_stride, min(BN, nk - n0), BN);

  const int kw = warp * 16;                             // this warp's 16 keys in the tile
  const int keys[2] = {n0 + kw + g, n0 + kw + g + 8};   // segment-relative key rows of this thread
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  const int reader_begin = clampi(p.reader_offsets[sk], 0, p.num_q_segments);
  const int reader_end = clampi(p.reader_offsets[sk + 1], reader_begin, p.num_q_segments);

  for (int hq = 0; hq < group; ++hq) {
    const int h = hk * group + hq;
    float db[2] = {0.f, 0.f};
    float bias[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) bias[r] = keys[r] < nk ? bias_at(p, ks + keys[r], h) : 0.f;
    for (int reader = reader_begin; reader < reader_end; ++reader) {
      const SegmentView sv = segment_of(p, p.reader_order[reader]);
      if (n0 >= sv.used) continue;  // every key of this tile is beyond the reader's key_lengths
      const int shift = sv.nk - sv.nq;
      for (int m0 = 0; m0 < sv.nq; m0 += BQ) {
        if (p.causal && m0 + BQ - 1 + shift < n0) continue;  // no query of the tile sees a key of ours
        __syncthreads();  // shared tiles of the previous step are consumed
        const int valid = min(BQ, sv.nq - m0);
        load_rows<T, D, LD>(sQ, q + int64_t(sv.qs + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride,
                            p.q_row_stride, valid, BQ);
        load_rows<T, D, LD>(sdO, dout + int64_t(sv.qs + m0) * p.do_row_stride + int64_t(h) * p.do_head_stride,
                            p.do_row_stride, valid, BQ);
        for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
          const int64_t at = int64_t(h) * p.total_q + sv.qs + m0 + i;
          sLse[i] = i < valid ? p.lse[at] : kNegInf;
          sDelta[i] = i < valid ? p.delta[at] : 0.f;
        }
        __syncthreads();

        // S^T = K Q^T and dP^T = V dO^T, 16 keys x BQ queries per warp
        float st[BQ / 8][4], dpt[BQ / 8][4];
        zero(st);
        zero(dpt);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ka[4], va[4];
          a_from_rows(ka, sK, LD, kw, kk * 16, g, t);
          a_from_rows(va, sV, LD, kw, kk * 16, g, t);
#pragma unroll
          for (int nt = 0; nt < BQ / 8; ++nt) {
            uint32_t qb[2], ob[2];
            b_from_row_major(qb, sQ, LD, nt * 8, kk * 16, g, t);
            b_from_row_major(ob, sdO, LD, nt * 8, kk * 16, g, t);
            mma_16816<T>(st[nt], ka, qb);
            mma_16816<T>(dpt[nt], va, ob);
          }
        }
        // P^T and dS^T in place
#pragma unroll
        for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qi = nt * 8 + 2 * t + (e & 1), row = m0 + qi, j = keys[e >> 1];
            const bool ok = qi < valid && j < sv.used && (!p.causal || j <= row + shift);
            const float pt = prob(st[nt][e], p.scale, bias[e >> 1], sLse[qi], ok);
            const float ds = pt * (dpt[nt][e] - sDelta[qi]);
            st[nt][e] = pt;
            dpt[nt][e] = ds;
            db[e >> 1] += ds;
          }
        }
        // dV += P^T dO and dK += dS^T Q: A from the accumulators, B (k = query, n = dim) from shared rows
        mma_accum_times_rows<T, BQ, D>(dv, st, sdO, LD, 0, g, t);
        mma_accum_times_rows<T, BQ, D>(dk, dpt, sQ, LD, 0, g, t);
        if constexpr (kAtomicDq) {
          // Stage dS^T, then dQ[BQ, D] += dS K over this CTA's 64 keys: warps split queries (16 rows each)
          // and, when BQ < 64, head dims.
#pragma unroll
          for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              *reinterpret_cast<uint32_t*>(&sdS[(kw + g + 8 * r) * LDS + nt * 8 + 2 * t]) =
                  Num<T>::pack(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
            }
          }
          __syncthreads();
          constexpr int kQueryBlocks = BQ / 16, kDimSplit = C::kWarps / kQueryBlocks, kDims = D / kDimSplit;
          const int qb = warp % kQueryBlocks, d0 = (warp / kQueryBlocks) * kDims;
          float dq[kDims / 8][4];
          zero(dq);
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            // A = dS [queries x keys], read from the staged dS^T: elements of two key rows per register
            const int key = kk * 16 + 2 * t, qrow = qb * 16 + g;
            const uint32_t a[4] = {pack_pair(sdS[key * LDS + qrow], sdS[(key + 1) * LDS + qrow]),
                                   pack_pair(sdS[key * LDS + qrow + 8], sdS[(key + 1) * LDS + qrow + 8]),
                                   pack_pair(sdS[(key + 8) * LDS + qrow], sdS[(key + 9) * LDS + qrow]),
                                   pack_pair(sdS[(key + 8) * LDS + qrow + 8], sdS[(key + 9) * LDS + qrow + 8])};
#pragma unroll
            for (int dt = 0; dt < kDims / 8; ++dt) {
              uint32_t b[2];
              b_from_col(b, sK, LD, kk * 16, d0 + dt * 8, g, t);
              mma_16816<T>(dq[dt], a, b);
            }
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int qi = qb * 16 + g + 8 * r;
            if (qi >= valid) continue;
            float* dst = p.dq_accum + (int64_t(sv.qs + m0 + qi) * p.heads_q + h) * D + d0;
#pragma unroll
            for (int dt = 0; dt < kDims / 8; ++dt) {
              atomicAdd(dst + dt * 8 + 2 * t, dq[dt][2 * r] * p.scale);
              atomicAdd(dst + dt * 8 + 2 * t + 1, dq[dt][2 * r + 1] * p.scale);
            }
          }
        }
      }
    }
    if (p.dbias) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float total = quad_sum(db[r]);
        if (t == 0 && keys[r] < nk) p.dbias[int64_t(ks + keys[r]) * p.heads_q + h] = total;
      }
    }
  }

  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (keys[r] >= nk) continue;
    const int64_t at = (int64_t(ks + keys[r]) * p.heads_kv + hk) * D;
    store_accum_row<T>(dk_out + at, dk, r, p.scale, t);
    store_accum_row<T>(dv_out + at, dv, r, 1.f, t);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic dQ: one CTA per (64-query tile, query head, query segment), key tiles in a fixed order.

template <typename T, int D>
__global__ void __launch_bounds__(Tiles<D>::kThreads) attention_backward_dq_kernel(const Params p) {
  using C = Tiles<D>;
  constexpr int BM = C::kQueries, BN = C::kKeys, LD = C::kLd;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * LD;
  T* sK = sdO + BM * LD;
  T* sV = sK + BN * LD;

  const int seg = blockIdx.x / p.q_tiles, m0 = (blockIdx.x % p.q_tiles) * BM, h = blockIdx.y;
  const SegmentView sv = segment_of(p, seg);
  if (m0 >= sv.nq) return;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int valid_q = min(BM, sv.nq - m0);
  load_rows<T, D, LD>(sQ, static_cast<const T*>(p.q) + int64_t(sv.qs + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride,
                      p.q_row_stride, valid_q, BM);
  load_rows<T, D, LD>(sdO,
                      static_cast<const T*>(p.dout) + int64_t(sv.qs + m0) * p.do_row_stride + int64_t(h) * p.do_head_stride,
                      p.do_row_stride, valid_q, BM);
  __syncthreads();
  const int wr = warp * 16;
  uint32_t qf[D / 16][4], of[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    a_from_rows(qf[kk], sQ, LD, wr, kk * 16, g, t);
    a_from_rows(of[kk], sdO, LD, wr, kk * 16, g, t);
  }
  const int rows[2] = {m0 + wr + g, m0 + wr + g + 8};
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t at = int64_t(h) * p.total_q + sv.qs + min(rows[r], sv.nq - 1);
    lse[r] = rows[r] < sv.nq ? p.lse[at] : kNegInf;
    delta[r] = p.delta[at];
  }
  float dq[D / 8][4];
  zero(dq);
  const int shift = sv.nk - sv.nq;
  const int c1 = p.causal ? clampi(m0 + BM + shift, 0, sv.used) : sv.used;

  for (int n0 = 0; n0 < c1; n0 += BN) {
    __syncthreads();
    const int valid = min(BN, c1 - n0);
    load_rows<T, D, LD>(sK, static_cast<const T*>(p.k) + int64_t(sv.ks + n0) * p.k_row_stride + int64_t(hk) * p.k_head_stride,
                        p.k_row_stride, valid, BN);
    load_rows<T, D, LD>(sV, static_cast<const T*>(p.v) + int64_t(sv.ks + n0) * p.v_row_stride + int64_t(hk) * p.v_head_stride,
                        p.v_row_stride, valid, BN);
    __syncthreads();
    float s[BN / 8][4], dp[BN / 8][4];
    zero(s);
    zero(dp);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kb[2], vb[2];
        b_from_row_major(kb, sK, LD, nt * 8, kk * 16, g, t);
        b_from_row_major(vb, sV, LD, nt * 8, kk * 16, g, t);
        mma_16816<T>(s[nt], qf[kk], kb);
        mma_16816<T>(dp[nt], of[kk], vb);
      }
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + nt * 8 + 2 * t + (e & 1), r = e >> 1;
        const bool ok = rows[r] < sv.nq && j < c1 && (!p.causal || j <= rows[r] + shift);
        const float pr = prob(s[nt][e], p.scale, ok ? bias_at(p, sv.ks + j, h) : 0.f, lse[r], ok);
        s[nt][e] = pr * (dp[nt][e] - delta[r]);  // dS
      }
    }
    mma_accum_times_rows<T, BN, D>(dq, s, sK, LD, 0, g, t);  // dQ += dS K
  }
  T* out = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= sv.nq) continue;
    store_accum_row<T>(out + (int64_t(sv.qs + rows[r]) * p.heads_q + h) * D, dq, r, p.scale, t);
  }
}

}  // namespace vlcore::attention_cuda
