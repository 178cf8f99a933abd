#pragma once
// Declarations of every backend function. Schemas and registration live in register.cpp.
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
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

}  // namespace vlcore
