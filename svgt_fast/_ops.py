"""Typed wrappers over the custom ops torch.ops.svgt_fast.* (schemas: csrc/torch_bindings.cpp),
their fake (meta) impls for torch.compile, and a PyTorch fallback.

The C++/CUDA extension is built on first use (svgt_fast/_build.py: one time, cached in
~/.cache/svgt_fast/ext/<torch version>-<cpu|cuda>, root overridable with SVGT_FAST_EXT_DIR).
When it cannot be built (no compiler, no ninja, no sources) or SVGT_FAST_NO_EXT=1, the same
schema is registered with a PyTorch implementation that gives the same results bit for bit, so
the wrappers always work; kv_patch_backend() says which one runs, kv_patch_backend_info() why.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

_SCHEMA = ("kv_patch(Tensor(a!) cache, Tensor src, Tensor seq_idx, Tensor dst_slot, "
           "Tensor? cos, Tensor? sin, Tensor? positions) -> ()")
_lock = threading.Lock()
_backend: str | None = None  # "cuda" | "cpp" | "torch"
_info = ""
_op = None  # torch.ops.svgt_fast.kv_patch.default once loaded
_fake_registered = False
_py_libs: list[torch.library.Library] = []  # a Library unregisters its ops when collected


def kv_patch(
    cache: torch.Tensor,
    src: torch.Tensor,
    seq_idx: torch.Tensor,
    dst_slot: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> None:
    """Write recomputed K or V rows into a cache in place, for the listed sequences only.

    cache: [B, H, S, D] bf16/fp16/fp32, MUTATED: for every row n with 0 <= seq_idx[n] < B and
        dst_slot[n] >= 0, every head h and every t with s = dst_slot[n] + t < S,
        cache[seq_idx[n], h, s, :] = f(src[n, h, t, :]). Any strides on the first three dims
        (e.g. bridge_k[layer] of [L, B, H, K, D], or a [B, S, H, D] buffer transposed), stride 1
        on the last; no overlapping (expanded) dims. The 16-byte CUDA path needs D * itemsize,
        every stride * itemsize and the data pointers to be multiples of 16; otherwise a scalar
        kernel runs (same result).
    src: [N, H, T, D], the cache's dtype, strides as for cache; must not overlap cache.
    seq_idx: [N] int32/int64, the cache row (batch index) of each src row; < 0 skips the row.
    dst_slot: [N] int32/int64, the first slot of each row (rows are ragged: each has its own);
        < 0 skips the row. Skipped, never an error (the CUDA path cannot read indices on the host):
        seq_idx >= B, and slots past S (a row is clipped at the end of the cache).
    cos, sin: [n_pos, D] float32 or the cache's dtype (the tables a model's rotary module
        gives); positions: [N, T] int32/int64. All three or none. With them, keys are rotated on
        the way in, HF rotate_half convention: f(x) = x * cos[p] + rotate_half(x) * sin[p],
        p = positions[n, t], rotate_half(x) = cat(-x[D/2:], x[:D/2]), in fp32, rounded once
        to the cache dtype; a position outside [0, n_pos) skips that slot. Without, f(x) = x.
    Rows that map to the same destination leave an unspecified one of them there. The result
    equals svgt_fast.kernels.reference.kv_patch_ref bit for bit on every backend. The C++/CUDA op
    allocates nothing and never syncs (CUDA-graph safe); the PyTorch fallback does both.
    """
    if _op is None:
        _ensure_loaded()
    _op(cache, src, seq_idx, dst_slot, cos, sin, positions)


def kv_patch_backend() -> str:
    """Which implementation torch.ops.svgt_fast.kv_patch runs: "cuda" (extension with its CUDA
    kernel; CPU tensors use its C++ code), "cpp" (C++ CPU extension; CUDA tensors, if any, use
    the PyTorch implementation) or "torch" (PyTorch only). Builds the extension on first call."""
    if _backend is None:
        _ensure_loaded()
    return _backend


def kv_patch_backend_info() -> str:
    """One line on the backend: what was loaded (and the build time when built now), or why
    the PyTorch fallback runs."""
    if _backend is None:
        _ensure_loaded()
    return _info


def _kv_patch_fake(cache, src, seq_idx, dst_slot, cos=None, sin=None, positions=None) -> None:
    # Metadata checks only; the op returns nothing and mutates `cache`, which the schema's (a!)
    # tells functionalization.
    _check_args(cache, src, seq_idx, dst_slot, cos, sin, positions)


def _op_defined() -> bool:
    return hasattr(torch.ops.svgt_fast, "kv_patch")


def _has_kernel(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("svgt_fast::kv_patch", key)


def _register_fake() -> None:
    global _fake_registered
    if not _fake_registered:
        torch.library.register_fake("svgt_fast::kv_patch")(_kv_patch_fake)
        _fake_registered = True


def _register_torch_impl(keys: tuple[str, ...], define: bool) -> None:
    lib = torch.library.Library("svgt_fast", "DEF" if define else "IMPL")
    if define:
        lib.define(_SCHEMA)
    for key in keys:
        lib.impl("kv_patch", _kv_patch_torch, key)
    _py_libs.append(lib)


def _ensure_loaded() -> None:
    global _backend, _info, _op
    with _lock:
        if _backend is not None:
            return
        if _op_defined():  # e.g. the CMake-built library loaded with torch.ops.load_library
            _backend = "cuda" if _has_kernel("CUDA") else "cpp"
            _info = f"{_backend}: torch.ops.svgt_fast.kv_patch was already registered"
        elif os.environ.get("SVGT_FAST_NO_EXT", "") not in ("", "0"):
            _register_torch_impl(("CPU", "CUDA"), define=True)
            _backend, _info = "torch", "torch: SVGT_FAST_NO_EXT is set"
        else:
            from . import _build

            try:
                variant, path, seconds = _build.build_and_load()
            except Exception as exc:  # no compiler / ninja / sources: the PyTorch path still works
                first = _build.error_summary(exc)
                warnings.warn(f"svgt_fast: could not build the kv_patch C++ extension ({first}); using the "
                              "PyTorch implementation (same results, slower, not CUDA-graph safe; see "
                              "svgt_fast._ops.kv_patch_backend_info())", RuntimeWarning, stacklevel=3)
                if not _op_defined():
                    _register_torch_impl(("CPU", "CUDA"), define=True)
                _backend, _info = "torch", f"torch: the build failed: {first}"
            else:
                built = f"built in {seconds:.1f} s, " if seconds is not None else ""
                _backend = "cuda" if variant == "cuda" else "cpp"
                _info = f"{_backend}: {built}{path}"
                if variant == "cpu" and torch.cuda.is_available():
                    _register_torch_impl(("CUDA",), define=False)
                    _info += "; CUDA tensors use the PyTorch implementation (no CUDA build)"
        _register_fake()
        _op = torch.ops.svgt_fast.kv_patch.default


def _check_args(cache, src, seq_idx, dst_slot, cos, sin, positions) -> bool:
    """The C++ checks (csrc/kv_patch.h) with the same messages; returns whether RoPE is on."""
    def check(ok, msg):
        if not ok:
            raise RuntimeError(f"kv_patch: {msg}")

    check(cache.dim() == 4, f"cache must be [B, H, S, D], got {cache.dim()} dims")
    check(src.dim() == 4, f"src must be [N, H, T, D], got {src.dim()} dims")
    check(seq_idx.dim() == 1, f"seq_idx must be [N], got {seq_idx.dim()} dims")
    check(dst_slot.dim() == 1, f"dst_slot must be [N] (first slot of each row), got {dst_slot.dim()} dims")
    dt = cache.dtype
    check(dt in (torch.float32, torch.float16, torch.bfloat16),
          f"cache dtype must be float32, float16 or bfloat16, got {dt}")
    check(src.dtype == dt, f"src dtype {src.dtype} != cache dtype {dt}")
    idx = (torch.int32, torch.int64)
    check(seq_idx.dtype in idx, f"seq_idx must be int32 or int64, got {seq_idx.dtype}")
    check(dst_slot.dtype in idx, f"dst_slot must be int32 or int64, got {dst_slot.dtype}")
    check(src.device == cache.device and seq_idx.device == cache.device and dst_slot.device == cache.device,
          f"cache, src, seq_idx and dst_slot must be on one device, got {cache.device}, {src.device}, "
          f"{seq_idx.device}, {dst_slot.device}")
    check(cache.shape[-1] <= 1 or cache.stride(-1) == 1, f"cache's last dim must have stride 1, got stride "
          f"{cache.stride(-1)}")
    check(src.shape[-1] <= 1 or src.stride(-1) == 1, f"src's last dim must have stride 1, got stride {src.stride(-1)}")
    check(not any(st == 0 and sz > 1 for st, sz in zip(cache.stride(), cache.shape)),
          "cache has overlapping elements (an expanded view?); writes to it would race")
    _, H, _, D = cache.shape
    N, T = src.shape[0], src.shape[2]
    check(src.shape[1] == H and src.shape[3] == D,
          f"src [N, H, T, D] = {list(src.shape)} does not match cache [B, H, S, D] = {list(cache.shape)}")
    check(seq_idx.shape[0] == N, f"seq_idx has {seq_idx.shape[0]} entries, src has N = {N}")
    check(dst_slot.shape[0] == N, f"dst_slot has {dst_slot.shape[0]} entries, src has N = {N}")
    given = [x is not None for x in (cos, sin, positions)]
    check(not any(given) or all(given), "cos, sin and positions go together (RoPE)")
    if not any(given):
        return False
    check(D % 2 == 0, f"RoPE needs an even head size, got D = {D}")
    check(cos.dim() == 2 and cos.shape[1] == D, f"cos must be [n_pos, D = {D}], got {list(cos.shape)}")
    check(sin.shape == cos.shape, f"sin {list(sin.shape)} != cos {list(cos.shape)}")
    check(cos.dtype == sin.dtype, f"cos dtype {cos.dtype} != sin dtype {sin.dtype}")
    check(cos.dtype in (dt, torch.float32), f"cos/sin dtype must be float32 or the cache dtype {dt}, got {cos.dtype}")
    check((D <= 1 or cos.stride(-1) == 1) and (D <= 1 or sin.stride(-1) == 1),
          "cos/sin last dim must have stride 1")
    check(positions.dtype in idx, f"positions must be int32 or int64, got {positions.dtype}")
    check(positions.dim() == 2 and tuple(positions.shape) == (N, T),
          f"positions {list(positions.shape)} must be [N, T] = [{N}, {T}]")
    check(cos.device == cache.device and sin.device == cache.device and positions.device == cache.device,
          f"cos, sin and positions must be on the cache's device {cache.device}")
    return True


def _kv_patch_torch(cache, src, seq_idx, dst_slot, cos=None, sin=None, positions=None) -> None:
    """The op in PyTorch (the fallback): same checks, same skip rules, same bits. Syncs (nonzero)."""
    rope = _check_args(cache, src, seq_idx, dst_slot, cos, sin, positions)
    B, _, S, D = cache.shape
    N, _, T, _ = src.shape
    seq = seq_idx.long()[:, None].expand(N, T)
    slot = dst_slot.long()[:, None] + torch.arange(T, device=src.device)
    write = (seq >= 0) & (seq < B) & (dst_slot.long()[:, None] >= 0) & (slot < S)
    if rope:
        pos = positions.long()
        write &= (pos >= 0) & (pos < cos.shape[0])
    n_idx, t_idx = write.nonzero(as_tuple=True)
    x = src[n_idx, :, t_idx]  # [M, H, D]
    if rope:
        p = pos[n_idx, t_idx]
        xf = x.float()
        rot = torch.cat([-xf[..., D // 2:], xf[..., : D // 2]], dim=-1)
        x = (xf * cos[p].float()[:, None] + rot * sin[p].float()[:, None]).to(cache.dtype)
    cache[seq[n_idx, t_idx], :, slot[n_idx, t_idx]] = x


# A library loaded before this module (it names this module as its fake-impl home) needs the
# fake impl registered at import, without triggering a build.
if _op_defined():
    _register_fake()
