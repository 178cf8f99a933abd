#pragma once
// CUDA helpers shared by the kernels that work on token rows (ToMe, token grids): per-image tables
// uploaded without a sync, aligned vector packs of any float dtype, the lane layout of row kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace vlcore::cuda {

// A host table of int64 values on `device`: pinned staging buffer and an asynchronous copy on the current
// stream (the caching host allocator keeps the buffer alive until the copy has run). No host sync.
inline at::Tensor upload_table(const std::vector<int64_t>& host, const at::Device& device) {
  at::Tensor staging = at::empty({int64_t(host.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  if (!host.empty()) std::memcpy(staging.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
  return staging.to(device, /*non_blocking=*/true);
}

// VEC consecutive elements, loaded and stored as one aligned access (16 bytes for the vector case).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Elements per 16-byte pack when `c` and every base pointer allow it, else 1.
inline int pack_width(int64_t c, int64_t elem_size, std::initializer_list<const void*> ptrs) {
  const int64_t vec = 16 / elem_size;
  if (vec <= 1 || c % vec) return 1;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16) return 1;
  return int(vec);
}

// Rows processed by groups of `lanes` threads (a power of two up to 32, so a row's lanes share a warp).
struct RowGroups {
  dim3 grid, block;
};

inline RowGroups row_groups(int64_t rows, int64_t packs_per_row) {
  int lanes = 1;
  while (lanes < packs_per_row && lanes < 32) lanes <<= 1;
  const int rows_per_block = 256 / lanes;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, int64_t(1) << 20));
  return {dim3(static_cast<unsigned>(blocks)), dim3(lanes, rows_per_block)};
}

__device__ __forceinline__ unsigned group_mask() {
  // The lanes of this thread's row group within its warp (blockDim.x is a power of two <= 32).
  const unsigned lane = (threadIdx.y * blockDim.x + threadIdx.x) & 31u;
  const unsigned width = blockDim.x;
  const unsigned base = lane & ~(width - 1);
  return (width == 32 ? 0xffffffffu : ((1u << width) - 1u)) << base;
}

__device__ __forceinline__ float group_sum(float v) {
  const unsigned mask = group_mask();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off, blockDim.x);
  return v;
}

__device__ __forceinline__ double group_sum(double v) {
  const unsigned mask = group_mask();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off, blockDim.x);
  return v;
}

}  // namespace vlcore::cuda
