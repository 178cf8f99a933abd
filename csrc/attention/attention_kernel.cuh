#pragma once
// CUDA kernels of the attention family: FlashAttention-2-style tiles on mma.sync m16n8k16 (sm_80+, fine on
// sm_90a), float16 / bfloat16 inputs with float32 accumulation, head dims 32, 64, 72, 80, 96, 128 (72 is
// padded to 80 in shared memory and registers: zero columns add nothing to Q K^T and are not stored).
//
// Data movement is sm_80-style: tiles go global -> shared by cp.async (16 bytes, zero-fill past a
// segment's end), fragments come from shared memory by ldmatrix (.trans for V, dO, Q and K as the k x n
// operand and for the staged dS^T), rows padded by 16 bytes so that every ldmatrix phase is conflict-free.
// Softmax is in base 2 (scale * log2(e) folded into one multiply, MUFU.EX2); key_bias is a template flag,
// compiled out when absent, and staged in shared memory once per key tile. Masks (causal diagonal,
// key_lengths, the ragged last tile) are applied only on the tiles that need them, by a branch uniform
// over the CTA.
//
// Forward: one CTA of 4 warps per (64-query tile, query head, query segment); each warp owns 16 query
// rows, keeps its Q fragments and the output accumulator in registers and streams the key segment through
// shared memory in double-buffered tiles of 64 keys (32 above D = 64): the next tile's cp.async copies run
// while the current one is multiplied. P never leaves the registers (the S accumulator fragments are
// re-packed as the A operand of P V). CTAs loop over query tiles with the grid's stride, so a
// max_seqlen_q below a segment's real length still computes every row.
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
// The ldmatrix address patterns below were checked against these layouts by a numpy emulation.
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
  float scale_log2;  // scale * log2(e): logits in base 2
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

// ---------------------------------------------------------------------------------------------------------
// sm_80 data movement: cp.async (global -> shared without registers, LDGSTS in SASS) and ldmatrix (LDSM).

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1 (.cg) and the registers.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Four 8x8 b16 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix i. Without .trans lane
// (g, t) receives rows g, columns 2t..2t+1 of each; with .trans rows 2t..2t+1 of column g.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// Fragment loaders over row-major shared tiles (row length ld elements, rows 16-byte aligned).
// A 16x16 whose rows are tile rows [row0, row0 + 16) and k the columns [col0, col0 + 16):
// matrices (rows +0, cols +0), (rows +8, cols +0), (rows +0, cols +8), (rows +8, cols +8) = a0..a3.
template <typename T>
__device__ __forceinline__ void a_from_rows(uint32_t (&a)[4], const T* s, int ld, int row0, int col0, int lane) {
  const int m = lane / 8;
  ldsm_x4(a, s + (row0 + lane % 8 + (m & 1) * 8) * ld + col0 + (m >> 1) * 8);
}
// A 16x16 = X^T for a tile stored transposed (tile rows = k, tile columns = the A rows [row0, row0 + 16)):
// matrices (k +0, rows +0), (k +0, rows +8), (k +8, rows +0), (k +8, rows +8) read with .trans.
template <typename T>
__device__ __forceinline__ void a_from_cols(uint32_t (&a)[4], const T* s, int ld, int k0, int row0, int lane) {
  const int m = lane / 8;
  ldsm_x4_trans(a, s + (k0 + lane % 8 + (m >> 1) * 8) * ld + row0 + (m & 1) * 8);
}
// Two B 16x8 fragments with n the tile rows [n0, n0 + 16) (8 each) and k the columns [col0, col0 + 16):
// the tile read transposed (K for Q K^T). b[0] covers rows n0 .. n0 + 7, b[1] rows n0 + 8 .. n0 + 15.
template <typename T>
__device__ __forceinline__ void b_pair_from_rows(uint32_t (&b)[2][2], const T* s, int ld, int n0, int col0,
                                                 int lane) {
  const int m = lane / 8;
  uint32_t r[4];
  ldsm_x4(r, s + (n0 + lane % 8 + (m >> 1) * 8) * ld + col0 + (m & 1) * 8);
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}
// Two B 16x8 fragments with k the tile rows [k0, k0 + 16) and n the columns [col0, col0 + 16) (8 each):
// V for P V, read with .trans. b[0] covers columns col0 .. col0 + 7, b[1] col0 + 8 .. col0 + 15.
template <typename T>
__device__ __forceinline__ void b_pair_from_cols(uint32_t (&b)[2][2], const T* s, int ld, int k0, int col0,
                                                 int lane) {
  const int m = lane / 8;
  uint32_t r[4];
  ldsm_x4_trans(r, s + (k0 + lane % 8 + (m & 1) * 8) * ld + col0 + (m >> 1) * 8);
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
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
// stored to a contiguous row of D <= 8 N elements (the padded columns are dropped).
template <typename T, int D, int N>
__device__ __forceinline__ void store_accum_row(T* dst, const float (&acc)[N][4], int half, float scale, int t) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i * 8 < D) {
      *reinterpret_cast<uint32_t*>(dst + i * 8 + 2 * t) =
          Num<T>::pack(acc[i][2 * half] * scale, acc[i][2 * half + 1] * scale);
    }
  }
}

// out[16 x DOUT] += A[16 x K] B[K x DOUT], A given as float accumulator tiles [K / 8][4] (re-packed to T),
// B the shared tile rows [0, K) (k) from column 0 (n) (V in P V, K in dS K, dO in P^T dO, Q in dS^T Q).
template <typename T, int K, int DOUT>
__device__ __forceinline__ void mma_accum_times_rows(float (&out)[DOUT / 8][4], const float (&acc)[K / 8][4],
                                                     const T* s, int ld, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    a_from_accum<T>(a, acc, kk);
#pragma unroll
    for (int dt = 0; dt < DOUT / 8; dt += 2) {
      uint32_t b[2][2];
      b_pair_from_cols(b, s, ld, kk * 16, dt * 8, lane);
      mma_16816<T>(out[dt], a, b[0]);
      mma_16816<T>(out[dt + 1], a, b[1]);
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

// 2^x (MUFU.EX2); 2^-inf = 0. Logits are kept in base 2: scale * log2(e) is folded into one multiply.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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
  return p.bias[int64_t(key_row) * p.bias_row_stride + int64_t(head) * p.bias_head_stride];
}

// Copy `valid` rows of D elements (global rows `row_stride` apart, 16-byte aligned: see vector_ready) into
// shared rows of LD elements with cp.async; rows [valid, rows) and the padding columns [D, DP) that round a
// head dim up to the mma's k of 16 are zeroed by plain stores. The caller commits and waits.
template <typename T, int D, int DP, int LD>
__device__ __forceinline__ void load_rows_async(T* __restrict__ dst, const T* src, int64_t row_stride, int valid,
                                                int rows) {
  constexpr int kVec = 8;  // elements per 16 bytes
  constexpr int kVecsPerRow = DP / kVec;
  for (int idx = threadIdx.x; idx < rows * kVecsPerRow; idx += blockDim.x) {
    const int r = idx / kVecsPerRow, c = (idx % kVecsPerRow) * kVec;
    if (r < valid && c < D) {
      cp_async_16(dst + r * LD + c, src + int64_t(r) * row_stride + c);
    } else {
      *reinterpret_cast<uint4*>(dst + r * LD + c) = make_uint4(0, 0, 0, 0);
    }
  }
}

// B fragment pairs along n = columns [col0, col0 + 8 n) of tile rows [k0, k0 + 16): pairs through
// b_pair_from_cols, an odd last one through ldmatrix.x2.trans.
template <typename T, int N>
__device__ __forceinline__ void mma_a_times_cols(float (&out)[N][4], const uint32_t (&a)[4], const T* s, int ld,
                                                 int k0, int col0, int lane) {
#pragma unroll
  for (int dt = 0; dt + 1 < N; dt += 2) {
    uint32_t b[2][2];
    b_pair_from_cols(b, s, ld, k0, col0 + dt * 8, lane);
    mma_16816<T>(out[dt], a, b[0]);
    mma_16816<T>(out[dt + 1], a, b[1]);
  }
  if constexpr (N % 2 == 1) {
    uint32_t b[2];
    const int m = (lane / 8) & 1;  // lanes 16..31 repeat 0..15: their addresses are ignored
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(smem_addr(s + (k0 + lane % 8 + m * 8) * ld + col0 + (N - 1) * 8)));
    mma_16816<T>(out[N - 1], a, b);
  }
}

template <int D>
struct Tiles {
  static constexpr int kDp = (D + 15) / 16 * 16;  // 72 -> 80: fragments cover 16 columns
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPad = 8;  // 16 bytes per shared row: ldmatrix rows land in distinct banks
  static constexpr int kLd = kDp + kPad;
  // forward / dQ: 64 queries per CTA (16 per warp), key tiles of 64 (32 above D = 64: registers and smem),
  // double-buffered
  static constexpr int kQueries = 64;
  static constexpr int kKeys = kDp <= 64 ? 64 : 32;
  // dK/dV: 64 keys per CTA (16 per warp), query tiles of 64 (32 above D = 64)
  static constexpr int kBwdKeys = 64;
  static constexpr int kBwdQueries = kDp <= 64 ? 64 : 32;
  static constexpr int kLdS = kBwdQueries + kPad;  // row length of the staged dS^T tile

  // short-key backward: one warp per 16 keys of a whole key segment, query tiles of 16. Up to 16 warps
  // (256 keys) at D <= 64, where 128 registers per thread remain (any 13 to 16 warps put 4 on one SM
  // quarter: 16384 / 128); 8 warps (128 keys) above D = 64, whose dK / dV accumulators need more.
  static constexpr int kShortMaxWarps = kDp <= 64 ? 16 : 8;
  static constexpr int kShortMaxKeys = 16 * kShortMaxWarps;
  static constexpr int kShortQueries = 16;
  static constexpr int kLdShortS = kShortQueries + kPad;

  static constexpr size_t short_smem(size_t elem, int keys) {
    return elem * ((2 * keys + 3 * kShortQueries) * kLd + keys * kLdShortS) + 2 * sizeof(float) * kShortQueries;
  }
  static constexpr size_t bias_smem() { return 2 * kKeys * sizeof(float); }
  static constexpr size_t forward_smem(size_t elem) { return elem * (kQueries + 4 * kKeys) * kLd + bias_smem(); }
  static constexpr size_t dq_smem(size_t elem) { return elem * (2 * kQueries + 4 * kKeys) * kLd + bias_smem(); }
  static constexpr size_t dkdv_smem(size_t elem) {
    return elem * ((2 * kBwdKeys + 2 * kBwdQueries) * kLd + kBwdKeys * kLdS) + 2 * sizeof(float) * kBwdQueries;
  }
};

// A key tile [n0, n0 + BN) of one K/V head, double-buffered in shared memory: K, V and (kHasBias) the
// bias column of query head h in base-2 units, staged once per tile.
template <typename T, int D, bool kHasBias>
struct KeyTiles {
  using C = Tiles<D>;
  static constexpr int BN = C::kKeys, LD = C::kLd;
  T* sK;  // [2][BN][LD]
  T* sV;
  float* sBias;  // [2][BN]
  const T* k_head;
  const T* v_head;

  __device__ __forceinline__ void load(const Params& p, const SegmentView& sv, int h, int n0, int c1, int stage) const {
    const int valid = min(BN, c1 - n0);
    load_rows_async<T, D, C::kDp, LD>(sK + stage * BN * LD, k_head + int64_t(n0) * p.k_row_stride, p.k_row_stride,
                                      valid, BN);
    load_rows_async<T, D, C::kDp, LD>(sV + stage * BN * LD, v_head + int64_t(n0) * p.v_row_stride, p.v_row_stride,
                                      valid, BN);
    if constexpr (kHasBias) {
      for (int j = threadIdx.x; j < BN; j += blockDim.x) {
        sBias[stage * BN + j] = j < valid ? bias_at(p, sv.ks + n0 + j, h) * kLog2e : 0.f;
      }
    }
  }
};

// Base-2 logits of a warp's 16 rows x BN keys: scale * log2(e) * (Q K^T) + bias * log2(e), masked keys at
// -inf. Masks are applied only on the tiles that need them (a uniform branch per tile): the last,
// partial tile and tiles crossing the causal diagonal.
template <typename T, int DP, int BN, bool kHasBias>
__device__ __forceinline__ void logits_of_tile(float (&s)[BN / 8][4], const uint32_t (&qf)[DP / 16][4],
                                               const T* sK, int ld, const float* sBias, const Params& p, int n0,
                                               int c1, int m0, int shift, const int (&rows)[2], int lane) {
  const int t = lane % 4;
  zero(s);
#pragma unroll
  for (int nt = 0; nt < BN / 8; nt += 2) {
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t b[2][2];
      b_pair_from_rows(b, sK, ld, nt * 8, kk * 16, lane);
      mma_16816<T>(s[nt], qf[kk], b[0]);
      mma_16816<T>(s[nt + 1], qf[kk], b[1]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[nt][e] * p.scale_log2;
      if constexpr (kHasBias) x += sBias[nt * 8 + 2 * t + (e & 1)];
      s[nt][e] = x;
    }
  }
  if (n0 + BN > c1 || (p.causal && n0 + BN - 1 > m0 + shift)) {
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + nt * 8 + 2 * t + (e & 1);
        const bool ok = j < c1 && (!p.causal || j <= rows[e >> 1] + shift);
        s[nt][e] = ok ? s[nt][e] : kNegInf;
      }
    }
  }
}

// A row's lse in base 2 for p = 2^(x - lse2); a row that saw no key (lse = -inf) gets +inf, so every p of
// it is 0 whatever its logits (-inf included) and no nan appears.
__device__ __forceinline__ float lse_log2(float lse) { return lse == kNegInf ? INFINITY : lse * kLog2e; }

// ---------------------------------------------------------------------------------------------------------
// Forward. The CTAs of a (segment, head) loop over the segment's query tiles with a stride of the grid's
// tile count, so a max_seqlen_q below a segment's length still computes every row.

template <typename T, int D, bool kHasBias>
__global__ void __launch_bounds__(Tiles<D>::kThreads) attention_forward_kernel(const Params p) {
  using C = Tiles<D>;
  constexpr int BM = C::kQueries, BN = C::kKeys, LD = C::kLd, DP = C::kDp;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  const int seg = blockIdx.x / p.q_tiles, h = blockIdx.y;
  const SegmentView sv = segment_of(p, seg);
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* q = static_cast<const T*>(p.q);
  KeyTiles<T, D, kHasBias> tiles{sQ + BM * LD, sQ + (BM + 2 * BN) * LD,
                                 reinterpret_cast<float*>(sQ + (BM + 4 * BN) * LD),
                                 static_cast<const T*>(p.k) + int64_t(sv.ks) * p.k_row_stride + int64_t(hk) * p.k_head_stride,
                                 static_cast<const T*>(p.v) + int64_t(sv.ks) * p.v_row_stride + int64_t(hk) * p.v_head_stride};
  const int shift = sv.nk - sv.nq;  // bottom-right causal alignment
  const int wr = warp * 16;
  T* out = static_cast<T*>(p.out);

  for (int m0 = (blockIdx.x % p.q_tiles) * BM; m0 < sv.nq; m0 += p.q_tiles * BM) {
    __syncthreads();  // the previous query tile's shared memory is consumed
    // Keys past c1 are masked for every row of the tile.
    const int c1 = p.causal ? clampi(m0 + BM + shift, 0, sv.used) : sv.used;
    load_rows_async<T, D, DP, LD>(sQ, q + int64_t(sv.qs + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride,
                                  p.q_row_stride, min(BM, sv.nq - m0), BM);
    if (c1 > 0) tiles.load(p, sv, h, 0, c1, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) a_from_rows(qf[kk], sQ, LD, wr, kk * 16, lane);

    float o[DP / 8][4];
    zero(o);
    float m[2] = {kNegInf, kNegInf}, m_safe[2] = {0.f, 0.f}, l[2] = {0.f, 0.f};  // base-2 running max
    const int rows[2] = {m0 + wr + g, m0 + wr + g + 8};  // segment-relative query rows of this thread

    for (int n0 = 0, stage = 0; n0 < c1; n0 += BN, stage ^= 1) {
      const bool has_next = n0 + BN < c1;
      if (has_next) {  // the next tile streams in while this one is computed
        tiles.load(p, sv, h, n0 + BN, c1, stage ^ 1);
        cp_async_commit();
      }
      float s[BN / 8][4];
      logits_of_tile<T, DP, BN, kHasBias>(s, qf, tiles.sK + stage * BN * LD, LD, tiles.sBias + stage * BN, p, n0, c1,
                                          m0, shift, rows, lane);
      float row_max[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        row_max[0] = fmaxf(row_max[0], fmaxf(s[nt][0], s[nt][1]));
        row_max[1] = fmaxf(row_max[1], fmaxf(s[nt][2], s[nt][3]));
      }
      float rescale[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m[r], quad_max(row_max[r]));
        m_safe[r] = m_new == kNegInf ? 0.f : m_new;  // a row with no key yet: 2^x must not see -inf - -inf
        rescale[r] = exp2_fast(m[r] - m_safe[r]);
        m[r] = m_new;
        l[r] *= rescale[r];
      }
#pragma unroll
      for (int i = 0; i < DP / 8; ++i) {
        o[i][0] *= rescale[0];
        o[i][1] *= rescale[0];
        o[i][2] *= rescale[1];
        o[i][3] *= rescale[1];
      }
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = exp2_fast(s[nt][e] - m_safe[e >> 1]);
          l[e >> 1] += s[nt][e];
        }
      }
      // O += P V: the S accumulators re-packed as A fragments; V read as B (k = key, n = dim) by ldmatrix.trans.
      mma_accum_times_rows<T, BN, DP>(o, s, tiles.sV + stage * BN * LD, LD, lane);
      if (has_next) cp_async_wait<0>();
      __syncthreads();  // the next tile is visible; this one may be overwritten
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = quad_sum(l[r]);
      const int row = rows[r];
      if (row >= sv.nq) continue;
      const float inv = total > 0.f ? 1.f / total : 0.f;  // a row that saw no key gives 0
      store_accum_row<T, D>(out + (int64_t(sv.qs + row) * p.heads_q + h) * D, o, r, inv, t);
      if (t == 0) p.lse[int64_t(h) * p.total_q + sv.qs + row] = total > 0.f ? m_safe[r] * kLn2 + logf(total) : kNegInf;
    }
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

// One warp's 16 keys [kw, kw + 16) of the shared K / V tile against a tile of BQ queries (the dK / dV
// kernels): S^T = K Q^T and dP^T = V dO^T, then P^T = 2^(S^T scale log2(e) + bias - lse2) and
// dS^T = P^T (dP^T - delta), masked (a branch uniform over the warp) only when `masked`; dV += P^T dO,
// dK += dS^T Q, db += the rows of dS^T. dS^T is left in dst for the caller (dQ).
template <typename T, int DP, int BQ, int LD>
__device__ __forceinline__ void key_strip_step(float (&dk)[DP / 8][4], float (&dv)[DP / 8][4], float (&db)[2],
                                               float (&dst)[BQ / 8][4], const T* sK, const T* sV, const T* sQ,
                                               const T* sdO, const float* sLse, const float* sDelta,
                                               const float (&bias)[2], const int (&keys)[2], int kw, bool masked,
                                               int used, bool causal, int m0, int shift, float scale_log2,
                                               int lane) {
  const int t = lane % 4;
  float pt[BQ / 8][4];
  zero(pt);
  zero(dst);
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t ka[4], va[4];
    a_from_rows(ka, sK, LD, kw, kk * 16, lane);
    a_from_rows(va, sV, LD, kw, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < BQ / 8; nt += 2) {
      uint32_t qb[2][2], ob[2][2];
      b_pair_from_rows(qb, sQ, LD, nt * 8, kk * 16, lane);
      b_pair_from_rows(ob, sdO, LD, nt * 8, kk * 16, lane);
      mma_16816<T>(pt[nt], ka, qb[0]);
      mma_16816<T>(pt[nt + 1], ka, qb[1]);
      mma_16816<T>(dst[nt], va, ob[0]);
      mma_16816<T>(dst[nt + 1], va, ob[1]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qi = nt * 8 + 2 * t + (e & 1);
      float p = exp2_fast(pt[nt][e] * scale_log2 + bias[e >> 1] - sLse[qi]);
      if (masked) {
        const int j = keys[e >> 1];
        p = (j < used && (!causal || j <= m0 + qi + shift)) ? p : 0.f;
      }
      const float ds = p * (dst[nt][e] - sDelta[qi]);
      pt[nt][e] = p;
      dst[nt][e] = ds;
      db[e >> 1] += ds;
    }
  }
  mma_accum_times_rows<T, BQ, DP>(dv, pt, sdO, LD, lane);  // B (k = query, n = dim) from shared rows
  mma_accum_times_rows<T, BQ, DP>(dk, dst, sQ, LD, lane);
}

// Keys [k0, k0 + rows) of K/V head hk of the key segment starting at ks, `valid` of them real, into the
// shared K and V tiles (one cp.async group, committed).
template <typename T, int D, int DP, int LD>
__device__ __forceinline__ void load_key_rows(T* sK, T* sV, const Params& p, int ks, int k0, int hk, int valid,
                                              int rows) {
  load_rows_async<T, D, DP, LD>(sK, static_cast<const T*>(p.k) + int64_t(ks + k0) * p.k_row_stride + int64_t(hk) * p.k_head_stride,
                                p.k_row_stride, valid, rows);
  load_rows_async<T, D, DP, LD>(sV, static_cast<const T*>(p.v) + int64_t(ks + k0) * p.v_row_stride + int64_t(hk) * p.v_head_stride,
                                p.v_row_stride, valid, rows);
  cp_async_commit();
}

// key_bias of this thread's two key rows for query head h, in base 2 (0 past the segment or without bias).
template <bool kHasBias>
__device__ __forceinline__ void key_bias_log2(float (&bias)[2], const Params& p, int ks, const int (&keys)[2], int nk,
                                              int h) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (kHasBias) {
      bias[r] = keys[r] < nk ? bias_at(p, ks + keys[r], h) * kLog2e : 0.f;
    } else {
      bias[r] = 0.f;
    }
  }
}

// This thread's two key rows of dK (times scale) and dV, those inside the segment.
template <typename T, int D, int N>
__device__ __forceinline__ void store_dkdv(const Params& p, int ks, const int (&keys)[2], int nk, int hk,
                                           const float (&dk)[N][4], const float (&dv)[N][4], int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (keys[r] >= nk) continue;
    const int64_t at = (int64_t(ks + keys[r]) * p.heads_kv + hk) * D;
    store_accum_row<T, D>(static_cast<T*>(p.dk) + at, dk, r, p.scale, t);
    store_accum_row<T, D>(static_cast<T*>(p.dv) + at, dv, r, 1.f, t);
  }
}

// A warp's 16 rows [kw, kw + 16) of float accumulator tiles [N / 8][4] stored as T into shared rows of ld.
template <typename T, int N>
__device__ __forceinline__ void stage_rows(T* s, int ld, int kw, const float (&acc)[N / 8][4], int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(&s[(kw + g + 8 * r) * ld + nt * 8 + 2 * t]) =
          Num<T>::pack(acc[nt][2 * r], acc[nt][2 * r + 1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward dK / dV (and dQ by atomics when kAtomicDq): one CTA per (64-key tile, K/V head, key segment),
// looping with the grid's stride over the segment's key tiles (a max_seqlen_k below a segment's length
// still covers every key).

template <typename T, int D, bool kAtomicDq, bool kHasBias>
__global__ void __launch_bounds__(Tiles<D>::kThreads) attention_backward_dkdv_kernel(const Params p) {
  using C = Tiles<D>;
  constexpr int BN = C::kBwdKeys, BQ = C::kBwdQueries, LD = C::kLd, LDS = C::kLdS, DP = C::kDp;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;
  T* sdO = sQ + BQ * LD;
  T* sdS = sdO + BQ * LD;  // dS^T [BN keys][BQ queries]
  float* sLse = reinterpret_cast<float*>(sdS + BN * LDS);  // base 2 (lse_log2)
  float* sDelta = sLse + BQ;

  const int sk = blockIdx.x / p.k_tiles, hk = blockIdx.y;
  int ks, nk;
  key_segment_bounds(p, sk, ks, nk);
  const int group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const int kw = warp * 16;  // this warp's 16 keys in the tile
  const int reader_begin = clampi(p.reader_offsets[sk], 0, p.num_q_segments);
  const int reader_end = clampi(p.reader_offsets[sk + 1], reader_begin, p.num_q_segments);

  for (int n0 = (blockIdx.x % p.k_tiles) * BN; n0 < nk; n0 += p.k_tiles * BN) {
    __syncthreads();  // the previous key tile's shared memory is consumed
    load_key_rows<T, D, DP, LD>(sK, sV, p, ks, n0, hk, min(BN, nk - n0), BN);
    const int keys[2] = {n0 + kw + g, n0 + kw + g + 8};  // segment-relative key rows of this thread
    float dk[DP / 8][4], dv[DP / 8][4];
    zero(dk);
    zero(dv);

    for (int hq = 0; hq < group; ++hq) {
      const int h = hk * group + hq;
      float db[2] = {0.f, 0.f};
      float bias[2];
      key_bias_log2<kHasBias>(bias, p, ks, keys, nk, h);
      for (int reader = reader_begin; reader < reader_end; ++reader) {
        const SegmentView sv = segment_of(p, p.reader_order[reader]);
        if (n0 >= sv.used) continue;  // every key of this tile is beyond the reader's key_lengths
        const int shift = sv.nk - sv.nq;
        for (int m0 = 0; m0 < sv.nq; m0 += BQ) {
          if (p.causal && m0 + BQ - 1 + shift < n0) continue;  // no query of the tile sees a key of ours
          __syncthreads();  // shared tiles of the previous step are consumed
          const int valid = min(BQ, sv.nq - m0);
          load_rows_async<T, D, DP, LD>(sQ, q + int64_t(sv.qs + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride,
                                        p.q_row_stride, valid, BQ);
          load_rows_async<T, D, DP, LD>(sdO, dout + int64_t(sv.qs + m0) * p.do_row_stride + int64_t(h) * p.do_head_stride,
                                        p.do_row_stride, valid, BQ);
          cp_async_commit();
          for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
            const int64_t at = int64_t(h) * p.total_q + sv.qs + m0 + i;
            sLse[i] = i < valid ? lse_log2(p.lse[at]) : INFINITY;  // padded rows: p = 0
            sDelta[i] = i < valid ? p.delta[at] : 0.f;
          }
          cp_async_wait<0>();
          __syncthreads();

          float dst[BQ / 8][4];  // dS^T of this warp's 16 keys
          key_strip_step<T, DP, BQ, LD>(dk, dv, db, dst, sK, sV, sQ, sdO, sLse, sDelta, bias, keys, kw,
                                        n0 + BN > sv.used || (p.causal && n0 + BN - 1 > m0 + shift), sv.used,
                                        p.causal, m0, shift, p.scale_log2, lane);
          if constexpr (kAtomicDq) {
            // Stage dS^T, then dQ[BQ, D] += dS K over this CTA's 64 keys: warps split queries (16 rows each)
            // and, when BQ < 64, head dims.
            stage_rows<T, BQ>(sdS, LDS, kw, dst, lane);
            __syncthreads();
            constexpr int kQueryBlocks = BQ / 16, kDimSplit = C::kWarps / kQueryBlocks, kDims = DP / kDimSplit;
            static_assert(kDims % 8 == 0, "each warp's dQ columns are whole 8-column tiles");
            const int qb = warp % kQueryBlocks, d0 = (warp / kQueryBlocks) * kDims;
            float dq[kDims / 8][4];
            zero(dq);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
              uint32_t a[4];  // dS [queries x keys], read from the staged dS^T by ldmatrix.trans
              a_from_cols(a, sdS, LDS, kk * 16, qb * 16, lane);
              mma_a_times_cols<T>(dq, a, sK, LD, kk * 16, d0, lane);
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int qi = qb * 16 + g + 8 * r;
              if (qi >= valid) continue;
              float* dst = p.dq_accum + (int64_t(sv.qs + m0 + qi) * p.heads_q + h) * D + d0;
#pragma unroll
              for (int dt = 0; dt < kDims / 8; ++dt) {
                if (d0 + dt * 8 >= D) continue;  // padding columns of D = 72
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
    cp_async_wait<0>();  // a tile whose keys no reader reads still committed its K/V copies

    store_dkdv<T, D>(p, ks, keys, nk, hk, dk, dv, t);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic dQ: one CTA per (64-query tile, query head, query segment), looping with the grid's stride
// over the segment's query tiles; key tiles double-buffered, in a fixed order.

template <typename T, int D, bool kHasBias>
__global__ void __launch_bounds__(Tiles<D>::kThreads) attention_backward_dq_kernel(const Params p) {
  using C = Tiles<D>;
  constexpr int BM = C::kQueries, BN = C::kKeys, LD = C::kLd, DP = C::kDp;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * LD;
  const int seg = blockIdx.x / p.q_tiles, h = blockIdx.y;
  const SegmentView sv = segment_of(p, seg);
  const int hk = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  KeyTiles<T, D, kHasBias> tiles{sdO + BM * LD, sdO + (BM + 2 * BN) * LD,
                                 reinterpret_cast<float*>(sdO + (BM + 4 * BN) * LD),
                                 static_cast<const T*>(p.k) + int64_t(sv.ks) * p.k_row_stride + int64_t(hk) * p.k_head_stride,
                                 static_cast<const T*>(p.v) + int64_t(sv.ks) * p.v_row_stride + int64_t(hk) * p.v_head_stride};
  const int shift = sv.nk - sv.nq;
  const int wr = warp * 16;
  T* out = static_cast<T*>(p.dq);

  for (int m0 = (blockIdx.x % p.q_tiles) * BM; m0 < sv.nq; m0 += p.q_tiles * BM) {
    __syncthreads();
    const int valid_q = min(BM, sv.nq - m0);
    const int c1 = p.causal ? clampi(m0 + BM + shift, 0, sv.used) : sv.used;
    load_rows_async<T, D, DP, LD>(sQ, static_cast<const T*>(p.q) + int64_t(sv.qs + m0) * p.q_row_stride + int64_t(h) * p.q_head_stride,
                                  p.q_row_stride, valid_q, BM);
    load_rows_async<T, D, DP, LD>(sdO, static_cast<const T*>(p.dout) + int64_t(sv.qs + m0) * p.do_row_stride + int64_t(h) * p.do_head_stride,
                                  p.do_row_stride, valid_q, BM);
    if (c1 > 0) tiles.load(p, sv, h, 0, c1, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[DP / 16][4], of[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      a_from_rows(qf[kk], sQ, LD, wr, kk * 16, lane);
      a_from_rows(of[kk], sdO, LD, wr, kk * 16, lane);
    }
    const int rows[2] = {m0 + wr + g, m0 + wr + g + 8};
    float lse2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t at = int64_t(h) * p.total_q + sv.qs + min(rows[r], sv.nq - 1);
      lse2[r] = rows[r] < sv.nq ? lse_log2(p.lse[at]) : INFINITY;
      delta[r] = p.delta[at];
    }
    float dq[DP / 8][4];
    zero(dq);

    for (int n0 = 0, stage = 0; n0 < c1; n0 += BN, stage ^= 1) {
      const bool has_next = n0 + BN < c1;
      if (has_next) {
        tiles.load(p, sv, h, n0 + BN, c1, stage ^ 1);
        cp_async_commit();
      }
      const T* sKs = tiles.sK + stage * BN * LD;
      float s[BN / 8][4], dp[BN / 8][4];
      logits_of_tile<T, DP, BN, kHasBias>(s, qf, sKs, LD, tiles.sBias + stage * BN, p, n0, c1, m0, shift, rows, lane);
      zero(dp);
#pragma unroll
      for (int nt = 0; nt < BN / 8; nt += 2) {
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
          uint32_t vb[2][2];
          b_pair_from_rows(vb, tiles.sV + stage * BN * LD, LD, nt * 8, kk * 16, lane);
          mma_16816<T>(dp[nt], of[kk], vb[0]);
          mma_16816<T>(dp[nt + 1], of[kk], vb[1]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          s[nt][e] = exp2_fast(s[nt][e] - lse2[r]) * (dp[nt][e] - delta[r]);  // dS
        }
      }
      mma_accum_times_rows<T, BN, DP>(dq, s, sKs, LD, lane);  // dQ += dS K
      if (has_next) cp_async_wait<0>();
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] >= sv.nq) continue;
      store_accum_row<T, D>(out + (int64_t(sv.qs + rows[r]) * p.heads_q + h) * D, dq, r, p.scale, t);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Short-key backward (key segments up to kShortMaxKeys, the fusion shapes): one CTA per (key segment,
// K/V head) with one warp per 16 keys holds the whole key segment's K and V in shared memory and walks
// every query tile of every query segment reading it (kv_segment: an image's K/V is read once for all the
// text segments that attend to it). Per tile of 16 queries it folds delta = rowsum(dO * O) - dlse in,
// accumulates dK / dV / d key_bias in registers, stages dS^T, and computes the tile's whole dQ = dS K over
// every key of the segment: no atomics, no float32 buffer, no zero or conversion pass, deterministic.
// A segment longer than the CTA (max_seqlen_k understated it) is done in chunks of the CTA's keys; dQ is
// then read back and added in the input dtype, in a fixed order.

template <typename T, int D, bool kHasBias>
__global__ void __launch_bounds__(Tiles<D>::kShortMaxWarps * 32) attention_backward_short_kernel(const Params p) {
  using C = Tiles<D>;
  constexpr int BQ = C::kShortQueries, LD = C::kLd, LDS = C::kLdShortS, DP = C::kDp;
  const int warps = blockDim.x / 32, cap = warps * 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + cap * LD;
  T* sQ = sV + cap * LD;
  T* sdO = sQ + BQ * LD;
  T* sO = sdO + BQ * LD;
  T* sdS = sO + BQ * LD;  // dS^T [cap keys][BQ queries]
  float* sLse = reinterpret_cast<float*>(sdS + cap * LDS);  // base 2 (lse_log2)
  float* sDelta = sLse + BQ;

  const int sk = blockIdx.x, hk = blockIdx.y;
  int ks, nk;
  key_segment_bounds(p, sk, ks, nk);
  const int group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const T* o = static_cast<const T*>(p.o);
  T* dq_out = static_cast<T*>(p.dq);
  const int kw = warp * 16;  // this warp's 16 keys in the chunk
  const int reader_begin = clampi(p.reader_offsets[sk], 0, p.num_q_segments);
  const int reader_end = clampi(p.reader_offsets[sk + 1], reader_begin, p.num_q_segments);

  // Chunk 0 always runs, and skips no query tile: it writes every dQ row of the readers (zeros where a row
  // sees no key), so dQ needs no zero pass.
  for (int c0 = 0; c0 == 0 || c0 < nk; c0 += cap) {
    __syncthreads();  // the previous chunk's shared memory is consumed
    const int nc = max(0, min(cap, nk - c0));
    load_key_rows<T, D, DP, LD>(sK, sV, p, ks, c0, hk, nc, cap);
    const int keys[2] = {c0 + kw + g, c0 + kw + g + 8};  // segment-relative key rows of this thread
    float dk[DP / 8][4], dv[DP / 8][4];
    zero(dk);
    zero(dv);

    for (int hq = 0; hq < group; ++hq) {
      const int h = hk * group + hq;
      float db[2] = {0.f, 0.f};
      float bias[2];
      key_bias_log2<kHasBias>(bias, p, ks, keys, nk, h);
      for (int reader = reader_begin; reader < reader_end; ++reader) {
        const SegmentView sv = segment_of(p, p.reader_order[reader]);
        if (c0 > 0 && c0 >= sv.used) continue;  // no key of this chunk is read
        const int shift = sv.nk - sv.nq;
        for (int m0 = 0; m0 < sv.nq; m0 += BQ) {
          if (c0 > 0 && p.causal && m0 + BQ - 1 + shift < c0) continue;  // no query of the tile sees the chunk
          __syncthreads();  // shared tiles of the previous step are consumed
          const int valid = min(BQ, sv.nq - m0);
          const int64_t row0 = sv.qs + m0;
          load_rows_async<T, D, DP, LD>(sQ, q + row0 * p.q_row_stride + int64_t(h) * p.q_head_stride, p.q_row_stride,
                                        valid, BQ);
          load_rows_async<T, D, DP, LD>(sdO, dout + row0 * p.do_row_stride + int64_t(h) * p.do_head_stride,
                                        p.do_row_stride, valid, BQ);
          load_rows_async<T, D, DP, LD>(sO, o + row0 * p.o_row_stride + int64_t(h) * p.o_head_stride, p.o_row_stride,
                                        valid, BQ);
          cp_async_commit();
          for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
            sLse[i] = i < valid ? lse_log2(p.lse[int64_t(h) * p.total_q + row0 + i]) : INFINITY;  // padded: p = 0
          }
          cp_async_wait<0>();
          __syncthreads();
          // delta = rowsum(dO * O) - dlse, one warp per row
          for (int i = warp; i < BQ; i += warps) {
            float acc = 0.f;
            for (int d = lane; d < D; d += 32) acc += Num<T>::to_float(sdO[i * LD + d]) * Num<T>::to_float(sO[i * LD + d]);
#pragma unroll
            for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
            if (lane == 0) {
              sDelta[i] = i < valid ? acc - (p.dlse ? p.dlse[int64_t(h) * p.total_q + row0 + i] : 0.f) : 0.f;
            }
          }
          __syncthreads();

          float dst[BQ / 8][4];  // dS^T of this warp's 16 keys; masks only where they need them
          key_strip_step<T, DP, BQ, LD>(dk, dv, db, dst, sK, sV, sQ, sdO, sLse, sDelta, bias, keys, kw,
                                        c0 + kw + 16 > sv.used || (p.causal && c0 + kw + 15 > m0 + shift),
                                        sv.used, p.causal, m0, shift, p.scale_log2, lane);
          stage_rows<T, BQ>(sdS, LDS, kw, dst, lane);
          __syncthreads();
          // dQ [BQ x D] = dS [BQ x cap] K [cap x D], one 16 x 8 block per warp at a time
          for (int unit = warp; unit < (BQ / 16) * (D / 8); unit += warps) {
            const int qb = unit / (D / 8), col = (unit % (D / 8)) * 8;
            float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
            for (int kk = 0; kk < warps; ++kk) {
              uint32_t a[4];
              a_from_cols(a, sdS, LDS, kk * 16, qb * 16, lane);
              mma_a_times_cols<T>(acc, a, sK, LD, kk * 16, col, lane);
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int qi = qb * 16 + g + 8 * r;
              if (qi >= valid) continue;
              T* dst = dq_out + ((row0 + qi) * p.heads_q + h) * D + col + 2 * t;
              float lo = acc[0][2 * r] * p.scale, hi = acc[0][2 * r + 1] * p.scale;
              if (c0 > 0) {  // a later chunk of an understated segment: add to what chunk 0 wrote
                lo += Num<T>::to_float(dst[0]);
                hi += Num<T>::to_float(dst[1]);
              }
              *reinterpret_cast<uint32_t*>(dst) = Num<T>::pack(lo, hi);
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
    cp_async_wait<0>();  // a chunk that no reader reads still committed its K/V copies

    store_dkdv<T, D>(p, ks, keys, nk, hk, dk, dv, t);  // keys[r] < c0 + cap always
  }
}

}  // namespace vlcore::attention_cuda
