// The CUDA kv_patch kernel run on the CPU, for tests on machines without a GPU.
//
// Compiled by a host C++ compiler against the CUDA headers: without nvcc, __global__ and
// __device__ expand to nothing, so csrc/kv_patch_kernels.cuh's kernel is a plain function. The
// grid it would be launched on (kv_patch_launch_config) is walked one thread at a time, with the
// launch parameters the CUDA op builds (kv_patch_params), the 16-byte/scalar choice it makes
// (kv_patch_can_vectorize) and the kernel instantiation it picks (dispatch_kv_patch). Threads of
// this kernel share nothing (no shared memory, no sync), so running them in sequence gives the
// GPU's result whenever rows write distinct slots. Built with
// -fsanitize=alignment, a 16-byte access to an address that is not 16-byte aligned is reported.
// Not exercised: the device's own float rounding (the _rn intrinsics are plain IEEE float ops
// here, built with -ffp-contract=off) and the <<<>>> launch line.

// Before the CUDA headers: the built-in grid variables become ordinary globals defined below.
#define __STORAGE__ extern
#include <cuda_runtime.h>
extern "C" {
uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
int warpSize = 32;
}
// Device-only intrinsics the kernel uses: IEEE single-precision ops on the host.
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }

#include "kv_patch_params.h"

#include <torch/library.h>

namespace svgt_fast {
namespace {

template <typename T, typename CosT, bool ROPE>
void run_grid(const KvPatchParams& p, bool vectorize) {
  constexpr int kVec = 16 / sizeof(T);
  const KvPatchLaunch l = kv_patch_launch_config<T, ROPE>(p, vectorize);
  if (l.threads == 0) return;
  gridDim = l.grid;
  blockDim = dim3(static_cast<unsigned>(l.threads));
  for (unsigned z = 0; z < l.grid.z; ++z)
    for (unsigned y = 0; y < l.grid.y; ++y)
      for (unsigned x = 0; x < l.grid.x; ++x)
        for (unsigned t = 0; t < static_cast<unsigned>(l.threads); ++t) {
          blockIdx = make_uint3(x, y, z);
          threadIdx = make_uint3(t, 0, 0);
          if (l.vec == kVec)
            kv_patch_kernel<T, CosT, kVec, ROPE>(p);
          else
            kv_patch_kernel<T, CosT, 1, ROPE>(p);
        }
}

// Same arguments as svgt_fast::kv_patch (CPU tensors), plus force_scalar; returns 1 when the
// 16-byte kernel ran, 0 for the scalar one.
int64_t kv_patch_emulated(at::Tensor cache, const at::Tensor& src, const at::Tensor& seq_idx,
                          const at::Tensor& dst_slot, const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& positions,
                          bool force_scalar) {
  const bool rope = detail::check_kv_patch_args(cache, src, seq_idx, dst_slot, cos, sin, positions);
  TORCH_CHECK(cache.device().is_cpu(), "kv_patch_emulated: CPU tensors only");
  int cos_elem = 0;
  const KvPatchParams p = detail::kv_patch_params(cache, src, seq_idx, dst_slot, cos, sin, positions, rope, &cos_elem);
  const bool vec = !force_scalar && kv_patch_can_vectorize(p, static_cast<int>(cache.element_size()), cos_elem, rope);
  detail::dispatch_kv_patch(cache, cos, [&](auto t, auto c, auto r) {
    run_grid<decltype(t), decltype(c), decltype(r)::value>(p, vec);
  });
  return vec ? 1 : 0;
}

}  // namespace
}  // namespace svgt_fast

TORCH_LIBRARY(svgt_fast_emulation, m) {
  m.def(
      "kv_patch(Tensor(a!) cache, Tensor src, Tensor seq_idx, Tensor dst_slot, Tensor? cos, Tensor? sin, "
      "Tensor? positions, bool force_scalar) -> int");
  m.impl("kv_patch", c10::DispatchKey::CPU, &svgt_fast::kv_patch_emulated);
}
