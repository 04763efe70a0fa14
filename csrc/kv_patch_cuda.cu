// kv_patch on CUDA: the thin torch layer over csrc/kv_patch_kernels.cuh. Checks metadata on the
// host, picks the 16-byte or the scalar kernel, launches on the current stream. Never reads an
// index on the host and never allocates, so it is safe inside CUDA graph capture; indices out of
// range are skipped on the device (see the kernel header).
#include "kv_patch.h"
#include "kv_patch_kernels.cuh"

#include <limits>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace svgt_fast {
namespace {

// T is the CUDA element type (float, __half, __nv_bfloat16: the bit layouts of float,
// at::Half, at::BFloat16); cos/sin are T or float.
template <typename T>
void launch(const KvPatchParams& p, bool rope, bool cos_fp32, bool vec, cudaStream_t stream) {
  if (!rope)
    C10_CUDA_CHECK((launch_kv_patch<T, T, false>(p, vec, stream)));
  else if (cos_fp32)
    C10_CUDA_CHECK((launch_kv_patch<T, float, true>(p, vec, stream)));
  else
    C10_CUDA_CHECK((launch_kv_patch<T, T, true>(p, vec, stream)));
}

}  // namespace

void kv_patch_cuda(at::Tensor& cache, const at::Tensor& src, const at::Tensor& seq_idx, const at::Tensor& dst_slot,
                   const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                   const std::optional<at::Tensor>& positions) {
  const bool rope = detail::check_kv_patch_args(cache, src, seq_idx, dst_slot, cos, sin, positions);
  TORCH_CHECK(cache.is_cuda(), "kv_patch_cuda: tensors must be on a CUDA device, got ", cache.device());
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(cache.size(1) <= 65535, "kv_patch: at most 65535 heads (a grid dimension), got ", cache.size(1));
  TORCH_CHECK(src.size(0) <= kInt32Max && src.size(2) * src.size(3) <= kInt32Max,
              "kv_patch: src ", src.sizes(), " is too large (N and T * D must fit in int32)");
  const c10::cuda::CUDAGuard guard(cache.device());

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
  int cos_elem = 0;
  if (rope) {
    p.cos = cos->const_data_ptr(), p.sin = sin->const_data_ptr();
    p.cos_sp = cos->stride(0), p.sin_sp = sin->stride(0);
    p.positions = positions->const_data_ptr(), p.pos64 = positions->scalar_type() == at::kLong;
    p.pos_sn = positions->stride(0), p.pos_st = positions->stride(1);
    p.n_pos = cos->size(0);
    cos_elem = static_cast<int>(cos->element_size());
  }
  const bool vec = kv_patch_can_vectorize(p, static_cast<int>(cache.element_size()), cos_elem, rope);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool cos_fp32 = rope && cos->scalar_type() == at::kFloat;
  switch (cache.scalar_type()) {
    case at::kFloat:
      launch<float>(p, rope, cos_fp32, vec, stream);
      break;
    case at::kHalf:
      launch<__half>(p, rope, cos_fp32, vec, stream);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(p, rope, cos_fp32, vec, stream);
      break;
    default:
      TORCH_CHECK(false, "kv_patch_cuda: unsupported dtype ", cache.scalar_type());
  }
}

}  // namespace svgt_fast

// Registered here, not in torch_bindings.cpp, so a CPU-only build needs no CUDA toolkit.
TORCH_LIBRARY_IMPL(svgt_fast, CUDA, m) { m.impl("kv_patch", &svgt_fast::kv_patch_cuda); }
