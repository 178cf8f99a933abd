#pragma once
// Row-wise copy machinery for bandwidth-bound CUDA ops that move whole token rows.
//
// A block is (lanes x rows_per_block) threads: `lanes` threads (a power of two up to 256) stream one row
// with the widest vector load that the row size and every base pointer allow (16 bytes in the common
// case: LDG.128/STG.128), and the block's other threads take other rows. Short rows (a single int64
// token id) and long rows (4096 bf16 channels) then both keep every thread busy.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace vlcore::cuda {

constexpr int kRowBlockThreads = 256;

struct RowLaunch {
  dim3 grid, block;
};

// `vecs_per_row` vectors in each of `rows` rows.
inline RowLaunch row_launch(int64_t rows, int64_t vecs_per_row) {
  int lanes = 1;
  while (lanes < vecs_per_row && lanes < kRowBlockThreads) lanes <<= 1;
  const int rows_per_block = kRowBlockThreads / lanes;
  // The kernels loop over rows with a grid stride, so the grid can be capped.
  const int64_t blocks = std::clamp<int64_t>((rows + rows_per_block - 1) / rows_per_block, 1, int64_t(1) << 20);
  return {dim3(static_cast<unsigned>(blocks)), dim3(lanes, rows_per_block)};
}

__device__ __forceinline__ int64_t first_row() { return int64_t(blockIdx.x) * blockDim.y + threadIdx.y; }
__device__ __forceinline__ int64_t row_stride() { return int64_t(gridDim.x) * blockDim.y; }

template <typename V>
__device__ __forceinline__ void copy_row(V* __restrict__ dst, const V* __restrict__ src, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

template <typename V>
__device__ __forceinline__ void fill_row(V* __restrict__ dst, const V value, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = value;
}

// The widest of 16/8/4/2/1 bytes that divides the row size and the alignment of every pointer.
inline int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  int w = 16;
  auto fits = [&](int w) {
    if (row_bytes % w) return false;
    for (const void* p : ptrs)
      if (reinterpret_cast<uintptr_t>(p) % w) return false;
    return true;
  };
  while (w > 1 && !fits(w)) w >>= 1;
  return w;
}

// Calls f(V{}) with V the unsigned vector type of `bytes` bytes.
template <typename F>
void dispatch_vector(int bytes, F&& f) {
  switch (bytes) {
    case 16: return f(uint4{});
    case 8: return f(uint2{});
    case 4: return f(uint32_t{});
    case 2: return f(uint16_t{});
    default: return f(uint8_t{});
  }
}

template <typename V>
V vector_from_bytes(const unsigned char* bytes) {
  V v;
  std::memcpy(&v, bytes, sizeof(V));
  return v;
}

}  // namespace vlcore::cuda
