// The kernel's parameters and instantiation from the op's tensors (host code, ATen only): the CUDA
// op takes them from here, and so does the CPU emulation of the CUDA kernel in tests/csrc/, which
// therefore runs the kernel on exactly the pointers, strides, flags and types a GPU launch gets.
#pragma once

#include <limits>
#include <type_traits>

#include "kv_patch.h"
#include "kv_patch_kernels.cuh"

namespace svgt_fast {
namespace detail {

// Arguments already passed check_kv_patch_args (rope = its result). Also checks the launch's
// size limits. Sets *cos_elem to sizeof a cos/sin element (0 without RoPE).
inline KvPatchParams kv_patch_params(at::Tensor& cache, const at::Tensor& src, const at::Tensor& seq_idx,
                                     const at::Tensor& dst_slot, const std::optional<at::Tensor>& cos,
                                     const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& positions,
                                     bool rope, int* cos_elem) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(cache.size(1) <= 65535, "kv_patch: at most 65535 heads (a grid dimension), got ", cache.size(1));
  TORCH_CHECK(src.size(0) <= kInt32Max && src.size(2) * src.size(3) <= kInt32Max,
              "kv_patch: src ", src.sizes(), " is too large (N and T * D must fit in int32)");
  KvPatchParams p{};
  p.cache = cache.data_ptr();
  p.cache_sb = cache.stride(0), p.cache_sh = cache.stride(1), p.cache_ss = cache.stride(2);
  p.src = src.const_data_ptr();
  p.src_sn = src.stride(0), p.src_sh = src.stride(1), p.src_st = src.stride(2);
  p.seq_idx = seq_idx.const_data_ptr(), p.seq64 = seq_idx.scalar_type() == at::kLong, p.seq_sn = seq_idx.stride(0);
  p.dst_slot = dst_slot.const_data_ptr(), p.slot64 = dst_slot.scalar_type() == at::kLong;
  p.slot_sn = dst_slot.stride(0);
  p.B = cache.size(0), p.S = cache.size(2);
  p.N = static_cast<int32_t>(src.size(0)), p.H = static_cast<int32_t>(cache.size(1));
  p.T = static_cast<int32_t>(src.size(2)), p.D = static_cast<int32_t>(cache.size(3));
  *cos_elem = 0;
  if (rope) {
    p.cos = cos->const_data_ptr(), p.sin = sin->const_data_ptr();
    p.cos_sp = cos->stride(0), p.sin_sp = sin->stride(0);
    p.positions = positions->const_data_ptr(), p.pos64 = positions->scalar_type() == at::kLong;
    p.pos_sn = positions->stride(0), p.pos_st = positions->stride(1);
    p.n_pos = cos->size(0);
    *cos_elem = static_cast<int>(cos->element_size());
  }
  return p;
}

// Calls f(T{}, CosT{}, std::bool_constant<ROPE>{}) for the kernel instantiation the op's tensors
// need (arguments already passed check_kv_patch_args, so RoPE = cos given): T the CUDA element
// type of the cache (float, __half, __nv_bfloat16: the bit layouts of float, at::Half,
// at::BFloat16), CosT that of cos/sin (T, or float). The CUDA op launches it; the CPU emulation
// in tests/csrc/ runs it.
template <typename F>
void dispatch_kv_patch(const at::Tensor& cache, const std::optional<at::Tensor>& cos, F&& f) {
  const bool rope = cos.has_value(), cos_fp32 = rope && cos->scalar_type() == at::kFloat;
  auto with = [&](auto t) {
    using T = decltype(t);
    if (!rope)
      f(T{}, T{}, std::false_type{});
    else if (cos_fp32)
      f(T{}, float{}, std::true_type{});
    else
      f(T{}, T{}, std::true_type{});
  };
  switch (cache.scalar_type()) {
    case at::kFloat:
      return with(float{});
    case at::kHalf:
      return with(__half{});
    case at::kBFloat16:
      return with(__nv_bfloat16{});
    default:
      TORCH_CHECK(false, "kv_patch: unsupported dtype ", cache.scalar_type());
  }
}

}  // namespace detail
}  // namespace svgt_fast
