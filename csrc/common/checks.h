#pragma once
// Argument checks shared by every op. Each message names the op, the argument and what was expected,
// so that a user sees "vlcore::seq_pack: cu_seqlens must be int32, got Long" rather than a crash.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// Raises ValueError (TORCH_CHECK_VALUE): bad arguments are the caller's error, not an internal one.
#define VLCORE_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, "vlcore::", op, ": ", __VA_ARGS__)

namespace vlcore {

inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                              const at::Tensor& t, const char* name) {
  VLCORE_CHECK(t.device() == ref.device(), op, name, " must be on the same device as ", ref_name, " (",
               ref.device(), "), got ", t.device());
}

// cu_seqlens in flash-attn's convention: int32, 1-D, (batch + 1) entries with a leading 0.
// The shape, dtype and device are checked everywhere; the values only where they can be read
// without a host synchronisation (see check_cu_seqlens_values). Ops that give an empty batch an empty
// result pass min_batch = 0 (cu_seqlens = [0]).
inline int64_t check_cu_seqlens_meta(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& data,
                                     const char* data_name, int64_t min_batch = 1) {
  VLCORE_CHECK(cu_seqlens.scalar_type() == at::kInt, op, "cu_seqlens must be int32, got ",
               cu_seqlens.scalar_type());
  VLCORE_CHECK(cu_seqlens.dim() == 1, op, "cu_seqlens must be 1-D of shape (batch + 1,), got shape ",
               cu_seqlens.sizes());
  VLCORE_CHECK(cu_seqlens.numel() >= min_batch + 1, op, "empty batch: cu_seqlens must hold at least ",
               min_batch + 1, " entries (a leading 0 and one end offset per sample), got ", cu_seqlens.numel());
  check_same_device(op, data, data_name, cu_seqlens, "cu_seqlens");
  return cu_seqlens.numel() - 1;
}

// Value checks for a CPU cu_seqlens: starts at 0, non-decreasing, ends at `total` (if >= 0), and no
// segment longer than `max_len` (if >= 0).
inline void check_cu_seqlens_values(const char* op, const at::Tensor& cu_seqlens, int64_t total, int64_t max_len,
                                    const char* max_len_name) {
  const auto cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t batch = cu.numel() - 1;
  VLCORE_CHECK(c[0] == 0, op, "cu_seqlens must start at 0, got cu_seqlens[0] = ", c[0]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t(c[b + 1]) - c[b];
    VLCORE_CHECK(len >= 0, op, "cu_seqlens must be non-decreasing, got cu_seqlens[", b, "] = ", c[b],
                 " > cu_seqlens[", b + 1, "] = ", c[b + 1]);
    VLCORE_CHECK(max_len < 0 || len <= max_len, op, "sample ", b, " has length ", len, " > ", max_len_name, " = ",
                 max_len);
  }
  VLCORE_CHECK(total < 0 || c[batch] == total, op, "cu_seqlens must end at the total token count ", total,
               ", got cu_seqlens[-1] = ", c[batch]);
}

// Row view of a tensor whose leading `lead` dims index rows: returns the bytes of one row.
inline int64_t row_bytes(const at::Tensor& t, int64_t lead) {
  int64_t n = t.element_size();
  for (int64_t d = lead; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

}  // namespace vlcore
