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

  m.set_python_module("vlcore.ops.token_merge");
  m.def("tome_match(Tensor metric, int[] seqlens, int[] r, bool class_token, bool distill_token) -> "
        "(Tensor unmerged, Tensor src, Tensor dst, Tensor dest, Tensor offsets, Tensor sources)");
  m.def("tome_merge(Tensor x, Tensor? size, Tensor dest, Tensor offsets, Tensor sources, str mode) -> (Tensor, Tensor)");
  m.def("tome_merge_backward(Tensor grad_out, Tensor? grad_size, Tensor x, Tensor? size, Tensor out, Tensor dest, "
        "Tensor offsets, Tensor sources, str mode) -> (Tensor, Tensor)");
  m.def("tome_unmerge(Tensor x, Tensor dest, Tensor offsets, Tensor sources) -> Tensor");
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

// Ops with a backend kernel of each kind; the C++ functions are named vlcore::<op>_cpu and <op>_cuda.
#define VLCORE_CPU_OPS(X) \
  X(seq_pack) X(seq_unpack) X(scatter_image_embeds) X(scatter_image_embeds_backward) \
  X(tome_match) X(tome_merge) X(tome_merge_backward) X(tome_unmerge) X(token_pool_2d) \
  X(token_pool_2d_backward) X(patch_merge_2x2) X(patch_merge_2x2_backward) \
  X(nvfp4_quantize) X(nvfp4_dequantize) X(nvfp4_gemm) X(hadamard_transform) \
  X(attention_forward) X(attention_backward)
#define VLCORE_CUDA_OPS(X) \
  X(seq_pack) X(seq_unpack) X(scatter_image_embeds) X(scatter_image_embeds_backward) \
  X(tome_match) X(tome_merge) X(tome_merge_backward) X(tome_unmerge) X(token_pool_2d) \
  X(token_pool_2d_backward) X(patch_merge_2x2) X(patch_merge_2x2_backward) \
  X(nvfp4_quantize) X(nvfp4_dequantize) X(nvfp4_gemm) X(hadamard_transform) \
  X(attention_forward) X(attention_backward)

TORCH_LIBRARY_IMPL(vlcore, CPU, m) {
#define VLCORE_IMPL_CPU(op) m.impl(#op, &vlcore::op##_cpu);
  VLCORE_CPU_OPS(VLCORE_IMPL_CPU)
}

TORCH_LIBRARY_IMPL(vlcore, CUDA, m) {
#if VLCORE_WITH_CUDA
#define VLCORE_IMPL_CUDA(op) m.impl(#op, &vlcore::op##_cuda);
#else
#define VLCORE_IMPL_CUDA(op) m.impl(#op, torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_not_built>());
#endif
  VLCORE_CUDA_OPS(VLCORE_IMPL_CUDA)
}

PYBIND11_MODULE(_C, m) { m.attr("with_cuda") = static_cast<bool>(VLCORE_WITH_CUDA); }
