// kv_patch on CUDA: the thin torch layer over csrc/kv_patch_kernels.cuh. Checks metadata on the
// host, takes the kernel parameters and instantiation from kv_patch_params.h, picks the 16-byte
// or the scalar kernel, launches on the current stream. Never reads an index on the host and
// never allocates, so it is safe inside CUDA graph capture; indices out of range are skipped on
// the device (see the kernel header).
#include "kv_patch.h"
#include "kv_patch_kernels.cuh"
#include "kv_patch_params.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace svgt_fast {

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
  detail::dispatch_kv_patch(cache, cos, [&](auto t, auto c, auto r) {
    C10_CUDA_CHECK((launch_kv_patch<decltype(t), decltype(c), decltype(r)::value>(p, vec, stream)));
  });
}

}  // namespace svgt_fast

// Registered here, not in torch_bindings.cpp, so a CPU-only build needs no CUDA toolkit.
TORCH_LIBRARY_IMPL(svgt_fast, CUDA, m) { m.impl("kv_patch", &svgt_fast::kv_patch_cuda); }
