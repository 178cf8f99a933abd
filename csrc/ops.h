#pragma once
// Declarations of every backend function. Schemas and registration live in register.cpp.
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <optional>
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

// attention/: fused varlen softmax attention (flash-attn layout, GQA, key_bias, kv_segment).
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool deterministic);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool bias_requires_grad,
    bool deterministic);

#if VLCORE_WITH_CUDA
at::Tensor seq_pack_cuda(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total_tokens);
at::Tensor seq_unpack_cuda(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t padded_len,
                           const c10::Scalar& pad_value);
at::Tensor scatter_image_embeds_cuda(const at::Tensor& text_embeds, const at::Tensor& image_embeds,
                                     const at::Tensor& image_positions);
std::tuple<at::Tensor, at::Tensor> scatter_image_embeds_backward_cuda(const at::Tensor& grad_out,
                                                                      const at::Tensor& image_positions);

// attention/: fused varlen softmax attention (flash-attn layout, GQA, key_bias, kv_segment).
std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool deterministic);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& kv_segment,
    const std::optional<at::Tensor>& key_lengths, bool causal, double scale, bool bias_requires_grad,
    bool deterministic);
#endif

}  // namespace vlcore
