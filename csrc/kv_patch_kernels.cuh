// kv_patch CUDA kernel: torch-free, raw pointers, compilable with plain nvcc.
//
// Math (the definition is kv_patch_ref in svgt_fast/kernels/reference.py). For every row n with
// 0 <= seq_idx[n] < B and dst_slot[n] >= 0, every head h and every t with s = dst_slot[n] + t < S:
//   cache[seq_idx[n], h, s, :] = f(src[n, h, t, :])
//   f(x) = x                                            (no RoPE)
//   f(x) = round(x * cos[p] + rotate_half(x) * sin[p])   (RoPE, p = positions[n, t], fp32 math)
//   rotate_half(x) = cat(-x[D/2:], x[:D/2])
// Everything else is skipped: seq_idx or dst_slot < 0 on purpose, seq_idx >= B, slots past S (a
// row is clipped at the end of the cache) and p outside [0, n_pos). A kernel cannot raise, and
// skipping keeps a CUDA graph replayed with bad indices from writing out of bounds.
//
// Work split: grid (x: chunks of the T*D tile, y: head, z: row n), one thread per chunk of VEC
// contiguous elements (RoPE: VEC elements of each half, so element i meets its partner i + D/2 in
// the same thread). n and h come from the block, so index loads are warp-uniform and the
// per-thread split is one 32-bit division. VEC = 16 / sizeof(T) moves 16 bytes per load/store;
// VEC = 1 is the fallback for head sizes, pointers or strides that are not 16-byte multiples
// (kv_patch_can_vectorize decides on the host).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace svgt_fast {

// Strides are in elements; the last dimension of cache, src, cos and sin has stride 1.
struct KvPatchParams {
  void* cache;  // [B, H, S, D]
  int64_t cache_sb, cache_sh, cache_ss;
  const void* src;  // [N, H, T, D]
  int64_t src_sn, src_sh, src_st;
  const void* seq_idx;  // [N] int32 or int64
  int64_t seq_sn;
  const void* dst_slot;  // [N] int32 or int64: first slot of row n
  int64_t slot_sn;
  const void* cos;  // [n_pos, D] T or float (RoPE only)
  const void* sin;
  int64_t cos_sp, sin_sp;
  const void* positions;  // [N, T] int32 or int64 (RoPE only)
  int64_t pos_sn, pos_st;
  int64_t n_pos, B, S;
  int32_t N, H, T, D;  // the host checks that T * D and N, H fit (kv_patch_cuda.cu)
  // Index dtypes are read at run time (a warp-uniform branch) rather than templated: 8 more
  // instantiations per element type would buy nothing for a memory-bound copy.
  bool seq64, slot64, pos64;
};

namespace detail {

__device__ __forceinline__ int64_t load_index(const void* p, int64_t i, bool is64) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N elements in registers; moved as uint4 words when VECTORIZED (p 16-byte aligned).
template <typename E, int N>
struct alignas(16) Pack {
  E v[N];
};

template <bool VECTORIZED, typename E, int N>
__device__ __forceinline__ void load_pack(const E* p, Pack<E, N>& out) {
  if constexpr (VECTORIZED) {
    static_assert((N * sizeof(E)) % 16 == 0, "a vector pack is a whole number of uint4");
#pragma unroll
    for (int k = 0; k < static_cast<int>(N * sizeof(E) / 16); ++k)
      reinterpret_cast<uint4*>(out.v)[k] = reinterpret_cast<const uint4*>(p)[k];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out.v[j] = p[j];
  }
}

template <bool VECTORIZED, typename E, int N>
__device__ __forceinline__ void store_pack(E* p, const Pack<E, N>& in) {
  if constexpr (VECTORIZED) {
#pragma unroll
    for (int k = 0; k < static_cast<int>(N * sizeof(E) / 16); ++k)
      reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(in.v)[k];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = in.v[j];
  }
}

}  // namespace detail

// T: cache/src element (float, __half, __nv_bfloat16); CosT: cos/sin element (T or float).
template <typename T, typename CosT, int VEC, bool ROPE>
__global__ void kv_patch_kernel(const KvPatchParams p) {
  constexpr bool kVectorized = VEC * sizeof(T) == 16;
  const int chunks = (ROPE ? p.D / 2 : p.D) / VEC;  // per (t) row
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= p.T * chunks) return;
  const int t = j / chunks;
  const int d0 = (j - t * chunks) * VEC;
  const int h = blockIdx.y;

  // gridDim.z is capped at 65535 on the host; larger N loops.
  for (int64_t n = blockIdx.z; n < p.N; n += gridDim.z) {
    const int64_t b = detail::load_index(p.seq_idx, n * p.seq_sn, p.seq64);
    const int64_t first = detail::load_index(p.dst_slot, n * p.slot_sn, p.slot64);
    if (b < 0 || b >= p.B || first < 0 || first >= p.S - t) continue;

    T* dst = static_cast<T*>(p.cache) + b * p.cache_sb + h * p.cache_sh + (first + t) * p.cache_ss;
    const T* x = static_cast<const T*>(p.src) + n * p.src_sn + h * p.src_sh + t * p.src_st;
    if constexpr (!ROPE) {
      detail::Pack<T, VEC> v;
      detail::load_pack<kVectorized>(x + d0, v);
      detail::store_pack<kVectorized>(dst + d0, v);
    } else {
      const int64_t pos = detail::load_index(p.positions, n * p.pos_sn + t * p.pos_st, p.pos64);
      if (pos < 0 || pos >= p.n_pos) continue;
      const int half = p.D / 2;
      const CosT* c = static_cast<const CosT*>(p.cos) + pos * p.cos_sp;
      const CosT* s = static_cast<const CosT*>(p.sin) + pos * p.sin_sp;
      detail::Pack<T, VEC> lo, hi;
      detail::Pack<CosT, VEC> c_lo, c_hi, s_lo, s_hi;
      detail::load_pack<kVectorized>(x + d0, lo);
      detail::load_pack<kVectorized>(x + half + d0, hi);
      detail::load_pack<kVectorized>(c + d0, c_lo);
      detail::load_pack<kVectorized>(c + half + d0, c_hi);
      detail::load_pack<kVectorized>(s + d0, s_lo);
      detail::load_pack<kVectorized>(s + half + d0, s_hi);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xl = detail::to_float(lo.v[k]), xh = detail::to_float(hi.v[k]);
        // _rn intrinsics are never contracted into FMAs, so each product rounds as in PyTorch's
        // separate mul and add kernels: bit equality with kv_patch_ref. (Do not build this with
        // --use_fast_math: flushing denormals would break that equality.)
        const float ol = __fadd_rn(__fmul_rn(xl, detail::to_float(c_lo.v[k])),
                                   __fmul_rn(-xh, detail::to_float(s_lo.v[k])));
        const float oh = __fadd_rn(__fmul_rn(xh, detail::to_float(c_hi.v[k])),
                                   __fmul_rn(xl, detail::to_float(s_hi.v[k])));
        lo.v[k] = detail::from_float<T>(ol);
        hi.v[k] = detail::from_float<T>(oh);
      }
      detail::store_pack<kVectorized>(dst + d0, lo);
      detail::store_pack<kVectorized>(dst + half + d0, hi);
    }
  }
}

// Whether the 16-byte path is legal: every address a thread touches must be 16-byte aligned.
// elem, cos_elem: sizeof of a cache and of a cos/sin element (cos_elem unused without RoPE).
inline bool kv_patch_can_vectorize(const KvPatchParams& p, int elem, int cos_elem, bool rope) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto stride_ok = [](int64_t stride, int size) { return (stride * size) % 16 == 0; };
  const int64_t span = rope ? p.D / 2 : p.D;  // chunk starts are multiples of VEC within a span
  if ((span * elem) % 16 != 0) return false;
  if (!aligned(p.cache) || !aligned(p.src)) return false;
  if (!stride_ok(p.cache_sb, elem) || !stride_ok(p.cache_sh, elem) || !stride_ok(p.cache_ss, elem)) return false;
  if (!stride_ok(p.src_sn, elem) || !stride_ok(p.src_sh, elem) || !stride_ok(p.src_st, elem)) return false;
  if (rope) {
    // span * elem % 16 == 0 makes span a multiple of VEC, so with 4-byte cos the offsets
    // d0 and half + d0 are 16-byte multiples too.
    if (!aligned(p.cos) || !aligned(p.sin)) return false;
    if (!stride_ok(p.cos_sp, cos_elem) || !stride_ok(p.sin_sp, cos_elem)) return false;
  }
  return true;
}

// Launch shape: grid (x: chunks of the T*D tile, y: head, z: row n, capped at 65535 and looped
// in the kernel), `threads` per block, `vec` elements per thread; threads == 0: nothing to do.
// Host code without CUDA syntax, so tests/csrc/kv_patch_emulation.cpp runs the same grid on the
// CPU. Preconditions (checked by the caller): N, H in [0, 2^31), H <= 65535, T * D < 2^31.
struct KvPatchLaunch {
  dim3 grid;
  int threads;
  int vec;
};

template <typename T, bool ROPE>
inline KvPatchLaunch kv_patch_launch_config(const KvPatchParams& p, bool vectorize) {
  const int vec = vectorize ? static_cast<int>(16 / sizeof(T)) : 1;
  const int64_t per_row = static_cast<int64_t>(p.T) * ((ROPE ? p.D / 2 : p.D) / vec);
  if (per_row == 0 || p.N == 0 || p.H == 0) return {dim3(0, 0, 0), 0, vec};
  // Small tiles (a 5-token bridge is 80 chunks) get a small block rather than idle threads.
  const int threads = static_cast<int>(per_row >= 256 ? 256 : (per_row + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>((per_row + threads - 1) / threads), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.N < 65535 ? p.N : 65535));
  return {grid, threads, vec};
}

#if defined(__CUDACC__)
// Launches on `stream`; no allocation, no host sync (graph-capturable). Returns the launch error.
template <typename T, typename CosT, bool ROPE>
cudaError_t launch_kv_patch(const KvPatchParams& p, bool vectorize, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const KvPatchLaunch l = kv_patch_launch_config<T, ROPE>(p, vectorize);
  if (l.threads == 0) return cudaSuccess;
  if (l.vec == kVec)
    kv_patch_kernel<T, CosT, kVec, ROPE><<<l.grid, l.threads, 0, stream>>>(p);
  else
    kv_patch_kernel<T, CosT, 1, ROPE><<<l.grid, l.threads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace svgt_fast
