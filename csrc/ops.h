#pragma once
// Declarations of every backend function. Schemas and registration live in register.cpp.
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <tuple>

namespace vlcore {

// seq_pack/: multimodal sequence packing.
at::Tensor seq_pack_cpu(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total_tokens);
at::Tensor seq_unpack_cpu(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t padded_len,
                          const c10::Scalar& pad_value);
at::Tensor scatter_image_embeds_cpu(const at::Tensor& text_embeds, const at::Tensor& image_embeds,
                                    const at::Tensor& image_positions);
std::tuple<at::Tensor, at::Tensor> scatter_image_embeds_backward_cpu(const at::Tensor& grad_out,
                                                                     const at::Tensor& image_positions);

#if VLCORE_WITH_CUDA
at::Tensor seq_pack_cuda(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total_tokens);
at::Tensor seq_unpack_cuda(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t padded_len,
                           const c10::Scalar& pad_value);
at::Tensor scatter_image_embeds_cuda(const at::Tensor& text_embeds, const at::Tensor& image_embeds,
                                     const at::Tensor& image_positions);
std::tuple<at::Tensor, at::Tensor> scatter_image_embeds_backward_cuda(const at::Tensor& grad_out,
                                                                      const at::Tensor& image_positions);
#endif

// token_merge/: ToMe bipartite soft matching, merge / unmerge, token pooling and the 2x2 patch merger.
#define VLCORE_TOKEN_MERGE_DECLS(SUFFIX)                                                                           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match_##SUFFIX(          \
      const at::Tensor& metric, c10::IntArrayRef seqlens, c10::IntArrayRef r, bool class_token, bool distill_token); \
  std::tuple<at::Tensor, at::Tensor> tome_merge_##SUFFIX(const at::Tensor& x, const c10::optional<at::Tensor>& size, \
                                                         const at::Tensor& dest, const at::Tensor& offsets,        \
                                                         const at::Tensor& sources, c10::string_view mode);         \
  std::tuple<at::Tensor, at::Tensor> tome_merge_backward_##SUFFIX(                                                 \
      const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_size, const at::Tensor& x,                 \
      const c10::optional<at::Tensor>& size, const at::Tensor& out, const at::Tensor& dest,                        \
      const at::Tensor& offsets, const at::Tensor& sources, c10::string_view mode);                                 \
  at::Tensor tome_unmerge_##SUFFIX(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& offsets,         \
                                   const at::Tensor& sources);                                                     \
  at::Tensor token_pool_2d_##SUFFIX(const at::Tensor& x, c10::IntArrayRef grids, c10::IntArrayRef out_grids,       \
                                    c10::string_view mode, bool class_token);                                       \
  at::Tensor token_pool_2d_backward_##SUFFIX(const at::Tensor& grad_out, c10::IntArrayRef grids,                   \
                                             c10::IntArrayRef out_grids, c10::string_view mode, bool class_token);  \
  at::Tensor patch_merge_2x2_##SUFFIX(const at::Tensor& x, c10::IntArrayRef grids);                                \
  at::Tensor patch_merge_2x2_backward_##SUFFIX(const at::Tensor& grad_out, c10::IntArrayRef grids);
VLCORE_TOKEN_MERGE_DECLS(cpu)
#if VLCORE_WITH_CUDA
VLCORE_TOKEN_MERGE_DECLS(cuda)
#endif

}  // namespace vlcore
