#pragma once
// Argument checks and output shapes shared by the CPU and CUDA backends of the seq_pack family.
// Rows: a padded tensor [B, L, *row] holds B*L rows, a packed tensor [T, *row] holds T rows; the kernels
// move whole rows of bytes, so every dtype (bool, ints, floats, complex, fp8) is supported alike.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/Scalar.h>

#include <array>
#include <cstring>
#include <exception>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace vlcore::seq_pack_detail {

struct Layout {
  int64_t batch = 0;      // B
  int64_t padded_len = 0;  // L
  int64_t row_bytes = 0;  // bytes of one token row (product of the trailing dims times the element size)
  std::vector<int64_t> out_sizes;
};

// The shape checks below are the part of the value checks that needs no read of cu_seqlens: T tokens
// cannot fit B samples of at most L tokens each when T > B * L, so some sample overflows padded_len.
inline Layout check_pack(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total_tokens) {
  constexpr const char* op = "seq_pack";
  VLCORE_CHECK(padded.dim() >= 2, op, "padded must have shape (batch, padded_len, ...), got ", padded.sizes());
  const int64_t batch = check_cu_seqlens_meta(op, cu_seqlens, padded, "padded", /*min_batch=*/0);
  VLCORE_CHECK(batch == padded.size(0), op, "cu_seqlens must have batch + 1 = ", padded.size(0) + 1,
               " entries for padded of shape ", padded.sizes(), ", got ", cu_seqlens.numel());
  VLCORE_CHECK(total_tokens >= 0, op, "total_tokens must be >= 0, got ", total_tokens);
  VLCORE_CHECK(total_tokens <= batch * padded.size(1), op, "total_tokens = ", total_tokens, " cannot fit ", batch,
               " samples of at most padded_len (padded.size(1)) = ", padded.size(1), " tokens");
  Layout l{batch, padded.size(1), row_bytes(padded, 2), {}};
  l.out_sizes = padded.sizes().slice(1).vec();
  l.out_sizes[0] = total_tokens;
  return l;
}

inline Layout check_unpack(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t padded_len) {
  constexpr const char* op = "seq_unpack";
  VLCORE_CHECK(packed.dim() >= 1, op, "packed must have shape (total_tokens, ...), got a 0-d tensor");
  const int64_t batch = check_cu_seqlens_meta(op, cu_seqlens, packed, "packed", /*min_batch=*/0);
  VLCORE_CHECK(padded_len >= 0, op, "padded_len must be >= 0, got ", padded_len);
  VLCORE_CHECK(packed.size(0) <= batch * padded_len, op, "packed has ", packed.size(0), " tokens, more than ", batch,
               " samples of at most padded_len = ", padded_len, " tokens hold");
  Layout l{batch, padded_len, row_bytes(packed, 1), {}};
  l.out_sizes = packed.sizes().vec();
  l.out_sizes[0] = padded_len;
  l.out_sizes.insert(l.out_sizes.begin(), batch);
  return l;
}

inline void check_scatter(const at::Tensor& text_embeds, const at::Tensor& image_embeds,
                          const at::Tensor& image_positions) {
  constexpr const char* op = "scatter_image_embeds";
  VLCORE_CHECK(text_embeds.dim() >= 1, op, "text_embeds must have shape (total_tokens, ...), got a 0-d tensor");
  VLCORE_CHECK(image_embeds.dim() == text_embeds.dim() && image_embeds.sizes().slice(1) == text_embeds.sizes().slice(1),
               op, "image_embeds must have shape (num_image_tokens, ", text_embeds.sizes().slice(1),
               ") to match text_embeds ", text_embeds.sizes(), ", got ", image_embeds.sizes());
  VLCORE_CHECK(image_embeds.scalar_type() == text_embeds.scalar_type(), op, "image_embeds must have the dtype of ",
               "text_embeds (", text_embeds.scalar_type(), "), got ", image_embeds.scalar_type());
  VLCORE_CHECK(image_positions.scalar_type() == at::kLong || image_positions.scalar_type() == at::kInt, op,
               "image_positions must be int64 or int32, got ", image_positions.scalar_type());
  VLCORE_CHECK(image_positions.dim() == 1 && image_positions.size(0) == image_embeds.size(0), op,
               "image_positions must have shape (num_image_tokens,) = (", image_embeds.size(0),
               ",): one position per row of image_embeds, got ", image_positions.sizes());
  check_same_device(op, text_embeds, "text_embeds", image_embeds, "image_embeds");
  check_same_device(op, text_embeds, "text_embeds", image_positions, "image_positions");
}

inline void check_scatter_backward(const at::Tensor& grad_out, const at::Tensor& image_positions) {
  constexpr const char* op = "scatter_image_embeds_backward";
  VLCORE_CHECK(grad_out.dim() >= 1, op, "grad_out must have shape (total_tokens, ...), got a 0-d tensor");
  VLCORE_CHECK(image_positions.scalar_type() == at::kLong || image_positions.scalar_type() == at::kInt, op,
               "image_positions must be int64 or int32, got ", image_positions.scalar_type());
  VLCORE_CHECK(image_positions.dim() == 1, op, "image_positions must be 1-D, got shape ", image_positions.sizes());
  check_same_device(op, grad_out, "grad_out", image_positions, "image_positions");
}

// Uninitialised gradients of scatter_image_embeds (grad_text like grad_out, grad_image [N, *row]): every
// row of both is written by the kernels, also for duplicate or out-of-range positions (then with zeros).
inline std::tuple<at::Tensor, at::Tensor> empty_scatter_grads(const at::Tensor& grad_out, int64_t num_image_tokens) {
  std::vector<int64_t> image_sizes = grad_out.sizes().vec();
  image_sizes[0] = num_image_tokens;
  return {at::empty(grad_out.sizes(), grad_out.options()), at::empty(image_sizes, grad_out.options())};
}

// The pad value as 16 bytes: the element's bytes repeated, so any power-of-two vector width reads it.
inline std::array<unsigned char, 16> pad_pattern(const c10::Scalar& pad_value, at::ScalarType dtype) {
  at::Tensor one;
  try {
    one = at::scalar_tensor(pad_value, at::TensorOptions().dtype(dtype));
  } catch (const std::exception&) {  // the checked conversion throws a std::runtime_error naming no argument
    VLCORE_CHECK(false, "seq_unpack", "pad_value = ", pad_value, " does not fit the dtype ", dtype, " of packed");
  }
  const int64_t n = one.element_size();
  VLCORE_CHECK(16 % n == 0, "seq_unpack", "unsupported element size ", n, " for dtype ", dtype);
  std::array<unsigned char, 16> pattern{};
  for (int64_t i = 0; i < 16; i += n) std::memcpy(pattern.data() + i, one.data_ptr(), n);
  return pattern;
}

}  // namespace vlcore::seq_pack_detail
