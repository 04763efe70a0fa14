// Compile check of the torch-free kernel header with plain nvcc (no torch headers, so it takes
// seconds): instantiates every launcher kv_patch_cuda.cu dispatches to. Not part of the
// extension; tests/test_kv_patch.py compiles it (nvcc -arch=sm_90 -c) on machines without a GPU.
#include "kv_patch_kernels.cuh"

namespace svgt_fast {

template cudaError_t launch_kv_patch<float, float, false>(const KvPatchParams&, bool, cudaStream_t);
template cudaError_t launch_kv_patch<float, float, true>(const KvPatchParams&, bool, cudaStream_t);
template cudaError_t launch_kv_patch<__half, __half, false>(const KvPatchParams&, bool, cudaStream_t);
template cudaError_t launch_kv_patch<__half, __half, true>(const KvPatchParams&, bool, cudaStream_t);
template cudaError_t launch_kv_patch<__half, float, true>(const KvPatchParams&, bool, cudaStream_t);
template cudaError_t launch_kv_patch<__nv_bfloat16, __nv_bfloat16, false>(const KvPatchParams&, bool, cudaStream_t);
template cudaError_t launch_kv_patch<__nv_bfloat16, __nv_bfloat16, true>(const KvPatchParams&, bool, cudaStream_t);
template cudaError_t launch_kv_patch<__nv_bfloat16, float, true>(const KvPatchParams&, bool, cudaStream_t);

}  // namespace svgt_fast
