#pragma once
// Declarations of every backend function, written out per family so that one grep for a kernel's name
// (e.g. tome_merge_cpu) finds its declaration here, its definition in csrc/<family>/ and its binding in
// register.cpp. Schemas and registration live in register.cpp. CPU functions are the exact references;
// CUDA functions exist only in builds with VLCORE_WITH_CUDA.
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <c10/util/string_view.h>
#include <optional>
#include <tuple>

namespace vlcore {

// seq_pack/: multimodal sequence packing (pack / unpack, the LLaVA image-embedding scatter).
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

// attention/: fused varlen softmax attention (flash-attn layout, GQA, key_bias, kv_segment).
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& kv_segment, const std::optional<at::Tensor>& key_lengths, bool causal, double scale,
    bool deterministic);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& kv_segment, const std::optional<at::Tensor>& key_lengths, bool causal, double scale,
    bool bias_requires_grad, bool deterministic);
#if VLCORE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& kv_segment, const std::optional<at::Tensor>& key_lengths, bool causal, double scale,
    bool deterministic);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& kv_segment, const std::optional<at::Tensor>& key_lengths, bool causal, double scale,
    bool bias_requires_grad, bool deterministic);
#endif

// tome/: ToMe bipartite soft matching, merge / unmerge (docs/tome.md).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match_cpu(
    const at::Tensor& metric, c10::IntArrayRef seqlens, c10::IntArrayRef r, bool class_token, bool distill_token);
std::tuple<at::Tensor, at::Tensor> tome_merge_cpu(const at::Tensor& x, const std::optional<at::Tensor>& size,
    const at::Tensor& dest, const at::Tensor& offsets, const at::Tensor& sources, c10::string_view mode);
std::tuple<at::Tensor, at::Tensor> tome_merge_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size, const at::Tensor& x,
    const std::optional<at::Tensor>& size, const at::Tensor& out, const at::Tensor& dest, const at::Tensor& offsets,
    const at::Tensor& sources, c10::string_view mode);
at::Tensor tome_unmerge_cpu(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& offsets,
    const at::Tensor& sources);
#if VLCORE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tome_match_cuda(
    const at::Tensor& metric, c10::IntArrayRef seqlens, c10::IntArrayRef r, bool class_token, bool distill_token);
std::tuple<at::Tensor, at::Tensor> tome_merge_cuda(const at::Tensor& x, const std::optional<at::Tensor>& size,
    const at::Tensor& dest, const at::Tensor& offsets, const at::Tensor& sources, c10::string_view mode);
std::tuple<at::Tensor, at::Tensor> tome_merge_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size, const at::Tensor& x,
    const std::optional<at::Tensor>& size, const at::Tensor& out, const at::Tensor& dest, const at::Tensor& offsets,
    const at::Tensor& sources, c10::string_view mode);
at::Tensor tome_unmerge_cuda(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& offsets,
    const at::Tensor& sources);
#endif

// token_grid/: 2D token pooling and the 2x2 patch merger on (packed) patch grids (docs/token_grid.md).
at::Tensor token_pool_2d_cpu(const at::Tensor& x, c10::IntArrayRef grids, c10::IntArrayRef out_grids,
    c10::string_view mode, bool class_token);
at::Tensor token_pool_2d_backward_cpu(const at::Tensor& grad_out, c10::IntArrayRef grids,
    c10::IntArrayRef out_grids, c10::string_view mode, bool class_token);
at::Tensor patch_merge_2x2_cpu(const at::Tensor& x, c10::IntArrayRef grids);
at::Tensor patch_merge_2x2_backward_cpu(const at::Tensor& grad_out, c10::IntArrayRef grids);
#if VLCORE_WITH_CUDA
at::Tensor token_pool_2d_cuda(const at::Tensor& x, c10::IntArrayRef grids, c10::IntArrayRef out_grids,
    c10::string_view mode, bool class_token);
at::Tensor token_pool_2d_backward_cuda(const at::Tensor& grad_out, c10::IntArrayRef grids,
    c10::IntArrayRef out_grids, c10::string_view mode, bool class_token);
at::Tensor patch_merge_2x2_cuda(const at::Tensor& x, c10::IntArrayRef grids);
at::Tensor patch_merge_2x2_backward_cuda(const at::Tensor& grad_out, c10::IntArrayRef grids);
#endif

// nvfp4/: NVFP4 quantization (E2M1 codes, E4M3 block scales, FP32 amax), Hadamard transform, NVFP4 GEMM
// (docs/nvfp4.md).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nvfp4_quantize_cpu(
    const at::Tensor& x, bool rowwise, bool columnwise, bool block_2d, bool rht_rowwise, bool rht_columnwise,
    bool stochastic, int64_t seed, int64_t offset, const std::optional<at::Tensor>& amax_rowwise,
    const std::optional<at::Tensor>& amax_columnwise, bool swizzle_scales);
at::Tensor nvfp4_dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& amax,
    at::ScalarType dtype);
at::Tensor nvfp4_gemm_cpu(const at::Tensor& a_codes, const at::Tensor& a_scales, const at::Tensor& a_amax,
    const at::Tensor& b_codes, const at::Tensor& b_scales, const at::Tensor& b_amax, at::ScalarType out_dtype);
at::Tensor hadamard_transform_cpu(const at::Tensor& x, bool inverse, int64_t sign_mask);
#if VLCORE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nvfp4_quantize_cuda(
    const at::Tensor& x, bool rowwise, bool columnwise, bool block_2d, bool rht_rowwise, bool rht_columnwise,
    bool stochastic, int64_t seed, int64_t offset, const std::optional<at::Tensor>& amax_rowwise,
    const std::optional<at::Tensor>& amax_columnwise, bool swizzle_scales);
at::Tensor nvfp4_dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& amax,
    at::ScalarType dtype);
at::Tensor nvfp4_gemm_cuda(const at::Tensor& a_codes, const at::Tensor& a_scales, const at::Tensor& a_amax,
    const at::Tensor& b_codes, const at::Tensor& b_scales, const at::Tensor& b_amax, at::ScalarType out_dtype);
at::Tensor hadamard_transform_cuda(const at::Tensor& x, bool inverse, int64_t sign_mask);
#endif

}  // namespace vlcore
