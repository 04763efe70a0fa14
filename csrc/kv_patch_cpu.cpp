// kv_patch on CPU: the same checks, the same skip rules and the same bits as the CUDA kernel
// (csrc/kv_patch_kernels.cuh states the math and what is skipped).
//
// Built with -ffp-contract=off: the RoPE sum x*c + r*s must round after each multiply, as
// PyTorch's separate mul and add kernels do, or results would differ from kv_patch_ref in the
// last bit.
#include "kv_patch.h"

#include <algorithm>
#include <cstring>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace svgt_fast {
namespace {

// Index tensors may be int32 or int64 independently; read them through one accessor.
struct Index {
  const void* p;
  bool is64;
  int64_t s0, s1;
  explicit Index(const at::Tensor& t)
      : p(t.const_data_ptr()), is64(t.scalar_type() == at::kLong), s0(t.stride(0)), s1(t.dim() > 1 ? t.stride(1) : 0) {}
  int64_t operator()(int64_t i, int64_t j = 0) const {
    const int64_t off = i * s0 + j * s1;
    return is64 ? static_cast<const int64_t*>(p)[off] : static_cast<const int32_t*>(p)[off];
  }
};

template <typename T, typename CosT>
void patch(at::Tensor& cache, const at::Tensor& src, const Index& seq, const Index& slot,
           const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, const Index* pos) {
  const int64_t B = cache.size(0), H = cache.size(1), S = cache.size(2), D = cache.size(3);
  const int64_t N = src.size(0), T_ = src.size(2), half = D / 2;
  T* out = cache.data_ptr<T>();
  const T* in = src.const_data_ptr<T>();
  const int64_t c_sb = cache.stride(0), c_sh = cache.stride(1), c_ss = cache.stride(2);
  const int64_t s_sn = src.stride(0), s_sh = src.stride(1), s_st = src.stride(2);
  const CosT* cos_p = pos ? cos->const_data_ptr<CosT>() : nullptr;
  const CosT* sin_p = pos ? sin->const_data_ptr<CosT>() : nullptr;
  const int64_t cos_sp = pos ? cos->stride(0) : 0, sin_sp = pos ? sin->stride(0) : 0;
  const int64_t n_pos = pos ? cos->size(0) : 0;
  // Work item = one (n, h, t) head row of D elements; tasks of >= ~16K elements, so a bridge
  // patch (a few rows) stays on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N * H * T_, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (H * T_), h = (r / T_) % H, t = r % T_;
      const int64_t b = seq(n), first = slot(n);
      if (b < 0 || b >= B || first < 0 || first >= S - t) continue;
      T* dst = out + b * c_sb + h * c_sh + (first + t) * c_ss;
      const T* x = in + n * s_sn + h * s_sh + t * s_st;
      if (pos == nullptr) {
        std::memcpy(dst, x, D * sizeof(T));
        continue;
      }
      const int64_t p = (*pos)(n, t);
      if (p < 0 || p >= n_pos) continue;
      const CosT* c = cos_p + p * cos_sp;
      const CosT* sn = sin_p + p * sin_sp;
      for (int64_t d = 0; d < half; ++d) {
        const float xl = static_cast<float>(x[d]), xh = static_cast<float>(x[d + half]);
        const float ol = xl * static_cast<float>(c[d]) + (-xh) * static_cast<float>(sn[d]);
        const float oh = xh * static_cast<float>(c[d + half]) + xl * static_cast<float>(sn[d + half]);
        dst[d] = static_cast<T>(ol);
        dst[d + half] = static_cast<T>(oh);
      }
    }
  });
}

}  // namespace

void kv_patch_cpu(at::Tensor& cache, const at::Tensor& src, const at::Tensor& seq_idx, const at::Tensor& dst_slot,
                  const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                  const std::optional<at::Tensor>& positions) {
  const bool rope = detail::check_kv_patch_args(cache, src, seq_idx, dst_slot, cos, sin, positions);
  TORCH_CHECK(cache.device().is_cpu(), "kv_patch_cpu: tensors must be on the CPU, got ", cache.device());
  const Index seq(seq_idx), slot(dst_slot);
  std::optional<Index> pos;
  if (rope) pos.emplace(*positions);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cache.scalar_type(), "kv_patch_cpu", [&] {
    if (rope && cos->scalar_type() == at::kFloat)
      patch<scalar_t, float>(cache, src, seq, slot, cos, sin, &*pos);
    else
      patch<scalar_t, scalar_t>(cache, src, seq, slot, cos, sin, rope ? &*pos : nullptr);
  });
}

}  // namespace svgt_fast
