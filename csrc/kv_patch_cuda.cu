// kv_patch on CUDA: the thin torch layer over csrc/kv_patch_kernels.cuh. Checks metadata on the
// host (kv_patch_params.h builds the kernel parameters), picks the 16-byte or the scalar kernel,
// launches on the current stream. Never reads an
// index on the host and never allocates, so it is safe inside CUDA graph capture; indices out of
// range are skipped on the device (see the kernel header).
#include "kv_patch.h"
#include "kv_patch_kernels.cuh"
#include "kv_patch_params.h"

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
  const c10::cuda::CUDAGuard guard(cache.device());
  int cos_elem = 0;
  const KvPatchParams p = detail::kv_patch_params(cache, src, seq_idx, dst_slot, cos, sin, positions, rope, &cos_elem);
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
