// Every svgt_fast op schema, in one place (mutated arguments marked with (a!)), and the CPU
// registrations. CUDA implementations register themselves from their .cu files, so a CPU-only
// build compiles no CUDA. Python wrappers with docstrings and fake impls: svgt_fast/_ops.py.
#include "kv_patch.h"

#include <torch/library.h>

TORCH_LIBRARY(svgt_fast, m) {
  // FakeTensor / torch.compile find the fake (meta) impls by importing this module.
  m.set_python_module("svgt_fast._ops");

  // cache[seq_idx[n], h, dst_slot[n] + t, :] = rope?(src[n, h, t, :]); negative or out-of-range
  // indices skip (csrc/kv_patch_kernels.cuh). cos, sin, positions: all three or none.
  m.def(
      "kv_patch(Tensor(a!) cache, Tensor src, Tensor seq_idx, Tensor dst_slot, Tensor? cos, Tensor? sin, "
      "Tensor? positions) -> ()");
}

TORCH_LIBRARY_IMPL(svgt_fast, CPU, m) { m.impl("kv_patch", &svgt_fast::kv_patch_cpu); }
