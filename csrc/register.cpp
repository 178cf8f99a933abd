// THE registration point of vlcore: every schema is declared here, once, and each backend binds its
// implementations below. Fakes and autograd formulas are registered in Python, in the module named by
// set_python_module just before each schema (vlcore/ops/<family>.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

namespace {
// CPU-only builds bind this for CUDA tensors, so the user learns why instead of a dispatcher error.
void cuda_kernels_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), " was called on CUDA tensors, but this vlcore build has no CUDA ",
              "kernels (vlcore.cuda_available() is False). Reinstall with a CUDA build of torch and a complete ",
              "CUDA toolkit: VLCORE_ENABLE_CUDA=ON pip install --no-build-isolation -v .");
}
}  // namespace

TORCH_LIBRARY(vlcore, m) {
  m.set_python_module("vlcore.ops.seq_pack");
  m.def("seq_pack(Tensor padded, Tensor cu_seqlens, int total_tokens) -> Tensor");
  m.def("seq_unpack(Tensor packed, Tensor cu_seqlens, int padded_len, Scalar pad_value) -> Tensor");
  m.def("scatter_image_embeds(Tensor text_embeds, Tensor image_embeds, Tensor image_positions) -> Tensor");
  m.def("scatter_image_embeds_backward(Tensor grad_out, Tensor image_positions) -> (Tensor, Tensor)");

  m.set_python_module("vlcore.ops.tome");
  m.def("tome_match(Tensor metric, int[] seqlens, int[] r, bool class_token, bool distill_token) -> "
        "(Tensor unmerged, Tensor src, Tensor dst, Tensor dest, Tensor offsets, Tensor sources)");
  m.def("tome_merge(Tensor x, Tensor? size, Tensor dest, Tensor offsets, Tensor sources, str mode) -> (Tensor, Tensor)");
  m.def("tome_merge_backward(Tensor grad_out, Tensor? grad_size, Tensor x, Tensor? size, Tensor out, Tensor dest, "
        "Tensor offsets, Tensor sources, str mode) -> (Tensor, Tensor)");
  m.def("tome_unmerge(Tensor x, Tensor dest, Tensor offsets, Tensor sources) -> Tensor");

  m.set_python_module("vlcore.ops.token_grid");
  m.def("token_pool_2d(Tensor x, int[] grids, int[] out_grids, str mode, bool class_token) -> Tensor");
  m.def("token_pool_2d_backward(Tensor grad_out, int[] grids, int[] out_grids, str mode, bool class_token) -> Tensor");
  m.def("patch_merge_2x2(Tensor x, int[] grids) -> Tensor");
  m.def("patch_merge_2x2_backward(Tensor grad_out, int[] grids) -> Tensor");

  m.set_python_module("vlcore.ops.nvfp4");
  m.def("nvfp4_quantize(Tensor x, bool rowwise, bool columnwise, bool block_2d, bool rht_rowwise, "
        "bool rht_columnwise, bool stochastic, int seed, int offset, Tensor? amax_rowwise, Tensor? amax_columnwise, "
        "bool swizzle_scales) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("nvfp4_dequantize(Tensor codes, Tensor scales, Tensor amax, ScalarType dtype) -> Tensor");
  m.def("nvfp4_gemm(Tensor a_codes, Tensor a_scales, Tensor a_amax, Tensor b_codes, Tensor b_scales, "
        "Tensor b_amax, ScalarType out_dtype) -> Tensor");
  m.def("hadamard_transform(Tensor x, bool inverse, int sign_mask) -> Tensor");

  m.set_python_module("vlcore.ops.attention");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, Tensor? key_bias, Tensor? kv_segment, Tensor? key_lengths, bool causal, float scale, "
        "bool deterministic) -> (Tensor out, Tensor lse)");  // deterministic: recorded for the backward
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? grad_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
        "Tensor? key_bias, Tensor? kv_segment, Tensor? key_lengths, bool causal, float scale, "
        "bool bias_requires_grad, bool deterministic) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
        "Tensor grad_key_bias)");
}

// Each backend binds every op to vlcore::<op>_cpu / <op>_cuda (declared in ops.h).
TORCH_LIBRARY_IMPL(vlcore, CPU, m) {
  m.impl("seq_pack", &vlcore::seq_pack_cpu);
  m.impl("seq_unpack", &vlcore::seq_unpack_cpu);
  m.impl("scatter_image_embeds", &vlcore::scatter_image_embeds_cpu);
  m.impl("scatter_image_embeds_backward", &vlcore::scatter_image_embeds_backward_cpu);
  m.impl("tome_match", &vlcore::tome_match_cpu);
  m.impl("tome_merge", &vlcore::tome_merge_cpu);
  m.impl("tome_merge_backward", &vlcore::tome_merge_backward_cpu);
  m.impl("tome_unmerge", &vlcore::tome_unmerge_cpu);
  m.impl("token_pool_2d", &vlcore::token_pool_2d_cpu);
  m.impl("token_pool_2d_backward", &vlcore::token_pool_2d_backward_cpu);
  m.impl("patch_merge_2x2", &vlcore::patch_merge_2x2_cpu);
  m.impl("patch_merge_2x2_backward", &vlcore::patch_merge_2x2_backward_cpu);
  m.impl("nvfp4_quantize", &vlcore::nvfp4_quantize_cpu);
  m.impl("nvfp4_dequantize", &vlcore::nvfp4_dequantize_cpu);
  m.impl("nvfp4_gemm", &vlcore::nvfp4_gemm_cpu);
  m.impl("hadamard_transform", &vlcore::hadamard_transform_cpu);
  m.impl("attention_forward", &vlcore::attention_forward_cpu);
  m.impl("attention_backward", &vlcore::attention_backward_cpu);
}

TORCH_LIBRARY_IMPL(vlcore, CUDA, m) {
#if VLCORE_WITH_CUDA
  m.impl("seq_pack", &vlcore::seq_pack_cuda);
  m.impl("seq_unpack", &vlcore::seq_unpack_cuda);
  m.impl("scatter_image_embeds", &vlcore::scatter_image_embeds_cuda);
  m.impl("scatter_image_embeds_backward", &vlcore::scatter_image_embeds_backward_cuda);
  m.impl("tome_match", &vlcore::tome_match_cuda);
  m.impl("tome_merge", &vlcore::tome_merge_cuda);
  m.impl("tome_merge_backward", &vlcore::tome_merge_backward_cuda);
  m.impl("tome_unmerge", &vlcore::tome_unmerge_cuda);
  m.impl("token_pool_2d", &vlcore::token_pool_2d_cuda);
  m.impl("token_pool_2d_backward", &vlcore::token_pool_2d_backward_cuda);
  m.impl("patch_merge_2x2", &vlcore::patch_merge_2x2_cuda);
  m.impl("patch_merge_2x2_backward", &vlcore::patch_merge_2x2_backward_cuda);
  m.impl("nvfp4_quantize", &vlcore::nvfp4_quantize_cuda);
  m.impl("nvfp4_dequantize", &vlcore::nvfp4_dequantize_cuda);
  m.impl("nvfp4_gemm", &vlcore::nvfp4_gemm_cuda);
  m.impl("hadamard_transform", &vlcore::hadamard_transform_cuda);
  m.impl("attention_forward", &vlcore::attention_forward_cuda);
  m.impl("attention_backward", &vlcore::attention_backward_cuda);
#else
  // Every op of the library, so that CUDA tensors get the explanation above, not a dispatcher error.
  for (const char* op : {"seq_pack", "seq_unpack", "scatter_image_embeds", "scatter_image_embeds_backward", "tome_match", "tome_merge", "tome_merge_backward", "tome_unmerge", "token_pool_2d", "token_pool_2d_backward", "patch_merge_2x2", "patch_merge_2x2_backward", "nvfp4_quantize", "nvfp4_dequantize", "nvfp4_gemm", "hadamard_transform", "attention_forward", "attention_backward"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_not_built>());
#endif
}

PYBIND11_MODULE(_C, m) { m.attr("with_cuda") = static_cast<bool>(VLCORE_WITH_CUDA); }
