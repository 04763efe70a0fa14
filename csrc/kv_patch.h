// kv_patch: declarations of the CPU and CUDA implementations and the argument checks they share,
// so both devices reject the same inputs with the same messages (svgt_fast/_ops.py mirrors them
// for the PyTorch fallback). Semantics: csrc/kv_patch_kernels.cuh; schema: torch_bindings.cpp.
//
// Supported layouts: cache [B, H, S, D] and src [N, H, T, D] with any strides on the first three
// dims (views such as buffer[layer], buffer[layer, :B] or a transposed [B, S, H, D] buffer are
// fine) but stride 1 on the last; cache must not overlap itself (no expanded dims), and src must
// not overlap cache. Index tensors and cos/sin rows may be strided.
#pragma once

#include <optional>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace svgt_fast {

void kv_patch_cpu(at::Tensor& cache, const at::Tensor& src, const at::Tensor& seq_idx, const at::Tensor& dst_slot,
                  const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                  const std::optional<at::Tensor>& positions);

void kv_patch_cuda(at::Tensor& cache, const at::Tensor& src, const at::Tensor& seq_idx, const at::Tensor& dst_slot,
                   const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                   const std::optional<at::Tensor>& positions);

namespace detail {

inline bool last_dim_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

inline bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

// Host-side checks (metadata only, never index values). Returns whether RoPE is requested.
inline bool check_kv_patch_args(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& seq_idx,
                                const at::Tensor& dst_slot, const std::optional<at::Tensor>& cos,
                                const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& positions) {
  TORCH_CHECK(cache.dim() == 4, "kv_patch: cache must be [B, H, S, D], got ", cache.dim(), " dims");
  TORCH_CHECK(src.dim() == 4, "kv_patch: src must be [N, H, T, D], got ", src.dim(), " dims");
  TORCH_CHECK(seq_idx.dim() == 1, "kv_patch: seq_idx must be [N], got ", seq_idx.dim(), " dims");
  TORCH_CHECK(dst_slot.dim() == 1, "kv_patch: dst_slot must be [N] (first slot of each row), got ", dst_slot.dim(),
              " dims");
  const auto dt = cache.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "kv_patch: cache dtype must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(src.scalar_type() == dt, "kv_patch: src dtype ", src.scalar_type(), " != cache dtype ", dt);
  TORCH_CHECK(is_index_dtype(seq_idx), "kv_patch: seq_idx must be int32 or int64, got ", seq_idx.scalar_type());
  TORCH_CHECK(is_index_dtype(dst_slot), "kv_patch: dst_slot must be int32 or int64, got ", dst_slot.scalar_type());
  const auto dev = cache.device();
  TORCH_CHECK(src.device() == dev && seq_idx.device() == dev && dst_slot.device() == dev,
              "kv_patch: cache, src, seq_idx and dst_slot must be on one device, got ", dev, ", ", src.device(), ", ",
              seq_idx.device(), ", ", dst_slot.device());
  TORCH_CHECK(last_dim_contiguous(cache), "kv_patch: cache's last dim must have stride 1, got stride ",
              cache.stride(-1));
  TORCH_CHECK(last_dim_contiguous(src), "kv_patch: src's last dim must have stride 1, got stride ", src.stride(-1));
  TORCH_CHECK(at::has_internal_overlap(cache) != at::MemOverlap::Yes,
              "kv_patch: cache has overlapping elements (an expanded view?); writes to it would race");
  const int64_t H = cache.size(1), D = cache.size(3), N = src.size(0), T = src.size(2);
  TORCH_CHECK(src.size(1) == H && src.size(3) == D, "kv_patch: src [N, H, T, D] = ", src.sizes(),
              " does not match cache [B, H, S, D] = ", cache.sizes());
  TORCH_CHECK(seq_idx.size(0) == N, "kv_patch: seq_idx has ", seq_idx.size(0), " entries, src has N = ", N);
  TORCH_CHECK(dst_slot.size(0) == N, "kv_patch: dst_slot has ", dst_slot.size(0), " entries, src has N = ", N);

  const int given = cos.has_value() + sin.has_value() + positions.has_value();
  TORCH_CHECK(given == 0 || given == 3, "kv_patch: cos, sin and positions go together (RoPE); got only ",
              cos.has_value() ? "cos " : "", sin.has_value() ? "sin " : "", positions.has_value() ? "positions" : "");
  if (given == 0) return false;
  TORCH_CHECK(D % 2 == 0, "kv_patch: RoPE needs an even head size, got D = ", D);
  TORCH_CHECK(cos->dim() == 2 && cos->size(1) == D, "kv_patch: cos must be [n_pos, D = ", D, "], got ", cos->sizes());
  TORCH_CHECK(sin->sizes() == cos->sizes(), "kv_patch: sin ", sin->sizes(), " != cos ", cos->sizes());
  TORCH_CHECK(cos->scalar_type() == sin->scalar_type(), "kv_patch: cos dtype ", cos->scalar_type(), " != sin dtype ",
              sin->scalar_type());
  TORCH_CHECK(cos->scalar_type() == dt || cos->scalar_type() == at::kFloat,
              "kv_patch: cos/sin dtype must be float32 or the cache dtype ", dt, ", got ", cos->scalar_type());
  TORCH_CHECK(last_dim_contiguous(*cos) && last_dim_contiguous(*sin), "kv_patch: cos/sin last dim must have stride 1");
  TORCH_CHECK(is_index_dtype(*positions), "kv_patch: positions must be int32 or int64, got ", positions->scalar_type());
  TORCH_CHECK(positions->dim() == 2 && positions->size(0) == N && positions->size(1) == T, "kv_patch: positions ",
              positions->sizes(), " must be [N, T] = [", N, ", ", T, "]");
  TORCH_CHECK(cos->device() == dev && sin->device() == dev && positions->device() == dev,
              "kv_patch: cos, sin and positions must be on the cache's device ", dev);
  return true;
}

}  // namespace detail
}  // namespace svgt_fast
