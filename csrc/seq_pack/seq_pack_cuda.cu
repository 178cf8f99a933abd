// CUDA kernels of the seq_pack family. Each moves every byte once (the floor): pack reads the valid
// rows of the padded tensor and writes the packed rows; unpack writes B*L rows, reading only the valid
// ones; scatter reads each output row from exactly one of its two sources.
//
// Value checks of cu_seqlens / image_positions would need a host sync here, so the kernels instead
// never read or write out of bounds whatever the values, and every kernel loops over its OUTPUT rows, so
// each output row is written exactly once even when the values are wrong (a sample longer than padded_len,
// total_tokens above cu_seqlens[-1], duplicate or out-of-range image positions): a row with no valid
// source is written with zeros (the pad value in unpack), never left as uninitialised memory. The Python
// wrappers validate on the host (validate=True) and vlcore.packing builds its batches valid by construction.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/row_copy.cuh"
#include "ops.h"
#include "seq_pack/seq_pack.h"

namespace vlcore {
namespace {
using cuda::copy_row;
using cuda::fill_row;
using cuda::first_row;
using cuda::row_stride;

// The sample whose packed rows hold row `dst`: the last b with cu_seqlens[b] <= dst (binary search over the
// B + 1 offsets, which stay in L1). -1 before cu_seqlens[0]; B at or after cu_seqlens[B].
__device__ __forceinline__ int64_t sample_of_row(const int32_t* __restrict__ cu_seqlens, int64_t batch, int64_t dst) {
  int64_t lo = 0, hi = batch + 1;  // invariant: the answer is lo - 1 once lo == hi
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cu_seqlens[mid] <= dst) lo = mid + 1; else hi = mid;
  }
  return lo - 1;
}

// One iteration per packed row: rows that no sample's valid tokens cover get zeros.
template <typename V>
__global__ void seq_pack_kernel(const V* __restrict__ padded, const int32_t* __restrict__ cu_seqlens,
                                V* __restrict__ packed, int64_t batch, int64_t padded_len, int64_t total,
                                int64_t vecs_per_row) {
  for (int64_t dst = first_row(); dst < total; dst += row_stride()) {
    const int64_t b = sample_of_row(cu_seqlens, batch, dst);
    const int64_t t = b >= 0 && b < batch ? dst - cu_seqlens[b] : -1;
    const bool valid = t >= 0 && t < padded_len && dst < cu_seqlens[b + 1];
    if (valid) {
      copy_row(packed + dst * vecs_per_row, padded + (b * padded_len + t) * vecs_per_row, vecs_per_row);
    } else {
      fill_row(packed + dst * vecs_per_row, V{}, vecs_per_row);
    }
  }
}

template <typename V>
__global__ void seq_unpack_kernel(const V* __restrict__ packed, const int32_t* __restrict__ cu_seqlens,
                                  V* __restrict__ padded, int64_t rows, int64_t padded_len, int64_t total,
                                  int64_t vecs_per_row, const V pad) {
  for (int64_t r = first_row(); r < rows; r += row_stride()) {
    const int64_t b = r / padded_len, t = r - b * padded_len;
    const int64_t start = cu_seqlens[b], len = int64_t(cu_seqlens[b + 1]) - start;
    const int64_t src = start + t;
    if (t < len && src >= 0 && src < total) {
      copy_row(padded + r * vecs_per_row, packed + src * vecs_per_row, vecs_per_row);
    } else {
      fill_row(padded + r * vecs_per_row, pad, vecs_per_row);
    }
  }
}

// image_row[t] = j where image_positions[j] == t, else -1 (memset to 0xFF beforehand). Of duplicate
// positions the last j wins (atomicMax), so the result does not depend on the order the threads run in.
template <typename index_t>
__global__ void image_row_map_kernel(const index_t* __restrict__ positions, int64_t num_image, int32_t* image_row,
                                     int64_t total) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < num_image; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = positions[j];
    if (p >= 0 && p < total) atomicMax(image_row + p, static_cast<int32_t>(j));
  }
}

template <typename V>
__global__ void scatter_image_embeds_kernel(const V* __restrict__ text, const V* __restrict__ image,
                                            const int32_t* __restrict__ image_row, V* __restrict__ out,
                                            int64_t total, int64_t vecs_per_row) {
  for (int64_t r = first_row(); r < total; r += row_stride()) {
    const int64_t j = image_row[r];
    copy_row(out + r * vecs_per_row, j < 0 ? text + r * vecs_per_row : image + j * vecs_per_row, vecs_per_row);
  }
}

// Rows 0 .. total - 1 are grad_text's, rows total .. total + N - 1 grad_image's. Image row j takes the
// gradient of its position only if it is the row that the forward placed there (image_row), so a duplicate
// or out-of-range position gets a zero gradient, as the forward output did not depend on it.
template <typename V, typename index_t>
__global__ void scatter_image_embeds_backward_kernel(const V* __restrict__ grad_out,
                                                     const index_t* __restrict__ positions,
                                                     const int32_t* __restrict__ image_row,
                                                     V* __restrict__ grad_text, V* __restrict__ grad_image,
                                                     int64_t total, int64_t num_image, int64_t vecs_per_row) {
  for (int64_t r = first_row(); r < total + num_image; r += row_stride()) {
    if (r < total) {
      if (image_row[r] < 0) {
        copy_row(grad_text + r * vecs_per_row, grad_out + r * vecs_per_row, vecs_per_row);
      } else {
        fill_row(grad_text + r * vecs_per_row, V{}, vecs_per_row);  // replaced text rows get no gradient
      }
    } else {
      const int64_t j = r - total, p = positions[j];
      if (p >= 0 && p < total && image_row[p] == j) {
        copy_row(grad_image + j * vecs_per_row, grad_out + p * vecs_per_row, vecs_per_row);
      } else {
        fill_row(grad_image + j * vecs_per_row, V{}, vecs_per_row);
      }
    }
  }
}

at::Tensor image_row_map(const at::Tensor& image_positions, int64_t total, cudaStream_t stream) {
  at::Tensor image_row = at::empty({total}, image_positions.options().dtype(at::kInt));
  if (total == 0) return image_row;
  C10_CUDA_CHECK(cudaMemsetAsync(image_row.data_ptr(), 0xFF, total * sizeof(int32_t), stream));
  const int64_t n = image_positions.numel();
  if (n == 0) return image_row;
  const at::Tensor pos = image_positions.contiguous();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65536));
  AT_DISPATCH_INDEX_TYPES(pos.scalar_type(), "image_row_map", [&] {
    image_row_map_kernel<index_t><<<blocks, 256, 0, stream>>>(pos.data_ptr<index_t>(), n,
                                                              image_row.data_ptr<int32_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return image_row;
}

}  // namespace

using namespace seq_pack_detail;

at::Tensor seq_pack_cuda(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total_tokens) {
  const Layout l = check_pack(padded, cu_seqlens, total_tokens);
  const c10::cuda::CUDAGuard guard(padded.device());
  const at::Tensor src = padded.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor out = at::empty(l.out_sizes, padded.options());
  if (out.numel() == 0) return out;  // also B * L == 0: then total_tokens == 0 (check_pack)
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_vector(cuda::vector_bytes(l.row_bytes, {src.data_ptr(), out.data_ptr()}), [&](auto v) {
    using V = decltype(v);
    const int64_t vpr = l.row_bytes / int64_t(sizeof(V));
    const auto launch = cuda::row_launch(total_tokens, vpr);
    seq_pack_kernel<V><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const V*>(src.data_ptr()), cu.data_ptr<int32_t>(), static_cast<V*>(out.data_ptr()), l.batch,
        l.padded_len, total_tokens, vpr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor seq_unpack_cuda(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t padded_len,
                           const c10::Scalar& pad_value) {
  const Layout l = check_unpack(packed, cu_seqlens, padded_len);
  const auto pattern = pad_pattern(pad_value, packed.scalar_type());
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor src = packed.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor out = at::empty(l.out_sizes, packed.options());
  const int64_t rows = l.batch * l.padded_len;
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cuda::dispatch_vector(cuda::vector_bytes(l.row_bytes, {src.data_ptr(), out.data_ptr()}), [&](auto v) {
    using V = decltype(v);
    const int64_t vpr = l.row_bytes / int64_t(sizeof(V));
    const auto launch = cuda::row_launch(rows, vpr);
    seq_unpack_kernel<V><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const V*>(src.data_ptr()), cu.data_ptr<int32_t>(), static_cast<V*>(out.data_ptr()), rows,
        l.padded_len, packed.size(0), vpr, cuda::vector_from_bytes<V>(pattern.data()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_image_embeds_cuda(const at::Tensor& text_embeds, const at::Tensor& image_embeds,
                                     const at::Tensor& image_positions) {
  check_scatter(text_embeds, image_embeds, image_positions);
  const c10::cuda::CUDAGuard guard(text_embeds.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = text_embeds.size(0);
  const at::Tensor text = text_embeds.contiguous();
  const at::Tensor image = image_embeds.contiguous();
  at::Tensor out = at::empty(text.sizes(), text.options());
  const int64_t rb = row_bytes(text, 1);
  if (out.numel() == 0) return out;
  const at::Tensor image_row = image_row_map(image_positions, total, stream);
  cuda::dispatch_vector(cuda::vector_bytes(rb, {text.data_ptr(), image.data_ptr(), out.data_ptr()}), [&](auto v) {
    using V = decltype(v);
    const int64_t vpr = rb / int64_t(sizeof(V));
    const auto launch = cuda::row_launch(total, vpr);
    scatter_image_embeds_kernel<V><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const V*>(text.data_ptr()), static_cast<const V*>(image.data_ptr()),
        image_row.data_ptr<int32_t>(), static_cast<V*>(out.data_ptr()), total, vpr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_image_embeds_backward_cuda(const at::Tensor& grad_out,
                                                                      const at::Tensor& image_positions) {
  check_scatter_backward(grad_out, image_positions);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = grad_out.size(0);
  const at::Tensor g = grad_out.contiguous();
  const int64_t num_image = image_positions.size(0);
  auto [grad_text, grad_image] = empty_scatter_grads(g, num_image);
  const int64_t rb = row_bytes(g, 1);
  if (grad_text.numel() + grad_image.numel() == 0) return {grad_text, grad_image};
  const at::Tensor image_row = image_row_map(image_positions, total, stream);
  const at::Tensor pos = image_positions.contiguous();
  cuda::dispatch_vector(
      cuda::vector_bytes(rb, {g.data_ptr(), grad_text.data_ptr(), grad_image.data_ptr()}), [&](auto v) {
        using V = decltype(v);
        const int64_t vpr = rb / int64_t(sizeof(V));
        const auto launch = cuda::row_launch(total + num_image, vpr);
        AT_DISPATCH_INDEX_TYPES(pos.scalar_type(), "scatter_image_embeds_backward", [&] {
          scatter_image_embeds_backward_kernel<V, index_t><<<launch.grid, launch.block, 0, stream>>>(
              static_cast<const V*>(g.data_ptr()), pos.data_ptr<index_t>(), image_row.data_ptr<int32_t>(),
              static_cast<V*>(grad_text.data_ptr()), static_cast<V*>(grad_image.data_ptr()), total, num_image, vpr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {grad_text, grad_image};
}

}  // namespace vlcore
