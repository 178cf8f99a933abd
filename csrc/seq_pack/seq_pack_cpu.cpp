// CPU reference of the seq_pack family: row-by-row memcpy. It checks every value it reads (cu_seqlens
// order, lengths, image positions), which costs nothing here because the data is already on the host.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

#include "ops.h"
#include "seq_pack/seq_pack.h"

namespace vlcore {
using namespace seq_pack_detail;

at::Tensor seq_pack_cpu(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total_tokens) {
  const Layout l = check_pack(padded, cu_seqlens, total_tokens);
  check_cu_seqlens_values("seq_pack", cu_seqlens, total_tokens, l.padded_len, "padded_len (padded.size(1))");
  const at::Tensor src = padded.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor out = at::empty(l.out_sizes, padded.options());
  if (out.numel() == 0) return out;
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(out.data_ptr());
  const int32_t* c = cu.data_ptr<int32_t>();
  at::parallel_for(0, l.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::memcpy(d + int64_t(c[b]) * l.row_bytes, s + b * l.padded_len * l.row_bytes,
                  int64_t(c[b + 1] - c[b]) * l.row_bytes);
    }
  });
  return out;
}

at::Tensor seq_unpack_cpu(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t padded_len,
                          const c10::Scalar& pad_value) {
  const Layout l = check_unpack(packed, cu_seqlens, padded_len);
  check_cu_seqlens_values("seq_unpack", cu_seqlens, packed.size(0), padded_len, "padded_len");
  const auto pattern = pad_pattern(pad_value, packed.scalar_type());
  const at::Tensor src = packed.contiguous();
  const at::Tensor cu = cu_seqlens.contiguous();
  at::Tensor out = at::empty(l.out_sizes, packed.options());
  if (out.numel() == 0) return out;
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(out.data_ptr());
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t elem = packed.element_size();
  at::parallel_for(0, l.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t len = c[b + 1] - c[b];
      char* row = d + b * l.padded_len * l.row_bytes;
      std::memcpy(row, s + int64_t(c[b]) * l.row_bytes, len * l.row_bytes);
      for (int64_t i = len * l.row_bytes; i < l.padded_len * l.row_bytes; i += elem) {
        std::memcpy(row + i, pattern.data(), elem);
      }
    }
  });
  return out;
}

namespace {
// Maps each packed row to the image row that replaces it (-1: keep the text row). Validates positions.
std::vector<int64_t> image_row_of_token(const char* op, const at::Tensor& image_positions, int64_t total_tokens) {
  std::vector<int64_t> row_of(total_tokens, -1);
  const at::Tensor pos = image_positions.to(at::kLong).contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t j = 0; j < pos.numel(); ++j) {
    VLCORE_CHECK(p[j] >= 0 && p[j] < total_tokens, op, "image_positions[", j, "] = ", p[j],
                 " is out of range for ", total_tokens, " packed tokens");
    VLCORE_CHECK(row_of[p[j]] < 0, op, "image_positions must be unique, got position ", p[j], " at indices ",
                 row_of[p[j]], " and ", j);
    row_of[p[j]] = j;
  }
  return row_of;
}
}  // namespace

at::Tensor scatter_image_embeds_cpu(const at::Tensor& text_embeds, const at::Tensor& image_embeds,
                                    const at::Tensor& image_positions) {
  check_scatter(text_embeds, image_embeds, image_positions);
  const int64_t total = text_embeds.size(0);
  const auto row_of = image_row_of_token("scatter_image_embeds", image_positions, total);
  const at::Tensor text = text_embeds.contiguous();
  const at::Tensor image = image_embeds.contiguous();
  at::Tensor out = at::empty(text.sizes(), text.options());
  const int64_t rb = row_bytes(text, 1);
  if (out.numel() == 0) return out;
  const auto* t = static_cast<const char*>(text.data_ptr());
  const auto* im = static_cast<const char*>(image.data_ptr());
  auto* d = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, total, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(d + r * rb, row_of[r] < 0 ? t + r * rb : im + row_of[r] * rb, rb);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_image_embeds_backward_cpu(const at::Tensor& grad_out,
                                                                     const at::Tensor& image_positions) {
  check_scatter_backward(grad_out, image_positions);
  const int64_t total = grad_out.size(0);
  const auto row_of = image_row_of_token("scatter_image_embeds_backward", image_positions, total);
  const at::Tensor g = grad_out.contiguous();
  auto [grad_text, grad_image] = empty_scatter_grads(g, image_positions.size(0));
  const int64_t rb = row_bytes(g, 1);
  if (grad_text.numel() == 0) return {grad_text, grad_image};
  const auto* src = static_cast<const char*>(g.data_ptr());
  auto* gt = static_cast<char*>(grad_text.data_ptr());
  auto* gi = static_cast<char*>(grad_image.data_ptr());
  at::parallel_for(0, total, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (row_of[r] < 0) {
        std::memcpy(gt + r * rb, src + r * rb, rb);
      } else {
        std::memset(gt + r * rb, 0, rb);  // the text row was replaced: it receives no gradient
        std::memcpy(gi + row_of[r] * rb, src + r * rb, rb);
      }
    }
  });
  return {grad_text, grad_image};
}

}  // namespace vlcore
