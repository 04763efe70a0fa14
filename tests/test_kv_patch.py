"""kv_patch (C++/CUDA op, csrc/) vs kv_patch_ref, bit for bit; errors; opcheck; the PyTorch
fallback; an nvcc compile of the kernel header; GPU tests incl. a captured CUDA graph.

The first run builds the C++ extension (about 15 s on 2 cores; cached in ~/.cache/svgt_fast/ext
or $SVGT_FAST_EXT_DIR), later runs load it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svgt_fast import _ops
from svgt_fast.kernels.reference import kv_patch_ref

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bits(t):
    """Integer view, so equality is bitwise (NaN poison compares equal to itself)."""
    return t.view(INT_VIEW[t.dtype])


def make_case(seed, dtype, *, T, H=3, D=16, B=4, S=20, rope=None, idx=(torch.int64, torch.int32),
              layout="contiguous", device="cpu"):
    """Rows exercising every rule: two ragged rows into one sequence, a row clipped at the end
    of the cache, skipped rows (seq_idx < 0, dst_slot < 0, seq_idx >= B) and, with RoPE, one
    position outside the tables. rope: None | "fp32" (cos/sin float32) | "same" (cache dtype).
    layout: "contiguous" | "strided" (cache a view of a bigger buffer, src transposed)."""
    g = torch.Generator().manual_seed(seed)
    seq_idx = torch.tensor([2, 0, -1, 1, 3, 0, B + 3], dtype=idx[0])
    dst_slot = torch.tensor([3, 0, 5, -1, S - 2, T + 2, 0], dtype=idx[1])
    N = len(seq_idx)
    if layout == "strided":  # cache = big[1, 1:B+1, :, 2:S+2]: strides of an [L, maxB, H, S+3, D] buffer
        big = torch.full((2, B + 2, H, S + 3, D), float("nan"), dtype=dtype)
        src = torch.randn(N, T, H, D, generator=g).to(dtype).transpose(1, 2)  # [N, H, T, D], strided
    else:
        big = torch.full((B, H, S, D), float("nan"), dtype=dtype)
        src = torch.randn(N, H, T, D, generator=g).to(dtype)
    extra = (None, None, None)
    if rope is not None:
        n_pos = 40
        ang = torch.rand(n_pos, D // 2, generator=g) * 6.3
        ang = torch.cat([ang, ang], dim=-1)  # HF tables repeat the half
        cos, sin = ang.cos(), ang.sin()
        if rope == "same":
            cos, sin = cos.to(dtype), sin.to(dtype)
        positions = torch.randint(0, n_pos, (N, T), generator=g, dtype=torch.int64)
        positions[1, T - 1] = n_pos  # out of the tables: that slot is skipped
        extra = (cos, sin, positions.to(idx[0]))
    to = lambda t: None if t is None else t.to(device)
    return to(big), [to(t) for t in (src, seq_idx, dst_slot, *extra)]


def run_case(fn, big, cache_fn, args):
    out = big.clone()
    fn(cache_fn(out), *args)
    return out


def cache_view(big, layout, B=4, S=20):
    return big[1, 1:B + 1, :, 2:S + 2] if layout == "strided" else big


def written_mask(big_shape, layout, T, S=20, B=4, rope=False):
    """Where the op must write (independent of kv_patch_ref): rows 0, 1, 4 (clipped), 5."""
    m = torch.zeros(big_shape[:-1], dtype=torch.bool)
    view = cache_view(m, layout, B, S)
    for b, first, n in ((2, 3, 0), (0, 0, 1), (3, S - 2, 4), (0, T + 2, 5)):
        for t in range(min(T, S - first)):
            if not (rope and n == 1 and t == T - 1):
                view[b, :, first + t] = True
    return m


@pytest.fixture(scope="module")
def backend():
    return _ops.kv_patch_backend()


def test_extension_builds(backend):
    required = os.environ.get("SVGT_FAST_REQUIRE_EXT") == "1"  # set by .ci/run
    if not required and (shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None):
        pytest.skip("no C++ compiler or ninja: the PyTorch fallback is the expected backend")
    assert backend in ("cpp", "cuda"), _ops.kv_patch_backend_info()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [None, "fp32", "same"])
@pytest.mark.parametrize("idx", [(torch.int64, torch.int32), (torch.int32, torch.int64)], ids=["i64i32", "i32i64"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_op_matches_reference(backend, dtype, rope, idx, T, layout):
    big, args = make_case(T * 7 + len(layout), dtype, T=T, rope=rope, idx=idx, layout=layout)
    view = lambda b: cache_view(b, layout)
    got = run_case(_ops.kv_patch, big, view, args)
    want = run_case(kv_patch_ref, big, view, args)
    assert torch.equal(bits(got), bits(want))
    mask = written_mask(big.shape, layout, T, rope=rope is not None)
    assert torch.equal(bits(got)[~mask], bits(big)[~mask])  # poison outside the written slots
    assert not got[mask].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [None, "fp32", "same"])
def test_torch_fallback_matches_reference(dtype, rope):
    for layout in ("contiguous", "strided"):
        big, args = make_case(3, dtype, T=6, rope=rope, layout=layout)
        view = lambda b: cache_view(b, layout)
        got = run_case(_ops._kv_patch_torch, big, view, args)
        want = run_case(kv_patch_ref, big, view, args)
        assert torch.equal(bits(got), bits(want))


def bulk_case():
    """Seeded random rows, H=8, D=128, long T, bf16: one bulk patch as at a refresh. Returns
    (cache, src, seq_idx, dst_slot, [no RoPE extras, RoPE extras (cos, sin, positions)])."""
    g = torch.Generator().manual_seed(11)
    B, H, S, D, N, T = 6, 8, 300, 128, 6, 97
    cache = torch.randn(B, H, S, D, generator=g).to(torch.bfloat16)
    src = torch.randn(N, H, T, D, generator=g).to(torch.bfloat16)
    seq_idx = torch.randperm(B, generator=g)[:N]
    dst_slot = torch.randint(-20, S, (N,), generator=g)
    ang = torch.rand(S + T, D // 2, generator=g) * 3
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    positions = dst_slot.clamp(min=0)[:, None] + torch.arange(T)
    return cache, src, seq_idx, dst_slot, [(None, None, None), (cos, sin, positions)]


def test_random_large(backend):
    """One bulk patch as at a refresh (bulk_case), without and with RoPE."""
    cache, src, seq_idx, dst_slot, extras = bulk_case()
    for extra in extras:
        got, want = cache.clone(), cache.clone()
        _ops.kv_patch(got, src, seq_idx, dst_slot, *extra)
        kv_patch_ref(want, src, seq_idx, dst_slot, *extra)
        assert torch.equal(bits(got), bits(want))


def test_empty_and_all_skipped(backend):
    cache = torch.zeros(2, 2, 4, 8)
    before = cache.clone()
    _ops.kv_patch(cache, torch.ones(0, 2, 3, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    _ops.kv_patch(cache, torch.ones(2, 2, 3, 8), torch.tensor([-1, 5]), torch.tensor([0, 0]))
    _ops.kv_patch(cache, torch.ones(2, 2, 3, 8), torch.tensor([0, 1]), torch.tensor([-3, 4]))
    assert torch.equal(cache, before)


def _bad_calls():
    c = torch.zeros(2, 3, 8, 4)
    s = torch.ones(1, 3, 2, 4)
    i = torch.zeros(1, dtype=torch.long)
    cs = torch.ones(10, 4)
    pos = torch.zeros(1, 2, dtype=torch.long)
    return [
        ("cache must be", (c[0], s, i, i)),
        ("src must be", (c, s[0], i, i)),
        ("does not match cache", (c, torch.ones(1, 2, 2, 4), i, i)),
        ("dst_slot must be \\[N\\]", (c, s, i, i[:, None])),
        ("dst_slot has 2 entries", (c, s, i, torch.zeros(2, dtype=torch.long))),
        ("seq_idx has 3 entries", (c, s, torch.zeros(3, dtype=torch.long), i)),
        ("src dtype", (c, s.half(), i, i)),
        ("cache dtype must be", (c.double(), s.double(), i, i)),
        ("seq_idx must be int32 or int64", (c, s, i.float(), i)),
        ("dst_slot must be int32 or int64", (c, s, i, i.to(torch.int16))),
        ("last dim must have stride 1", (c.transpose(2, 3), s.transpose(2, 3), i, i)),
        ("overlapping", (torch.zeros(1, 3, 8, 4).expand(2, 3, 8, 4), s, i, i)),
        ("go together", (c, s, i, i, cs, None, None)),
        ("cos must be", (c, s, i, i, torch.ones(10, 6), torch.ones(10, 6), pos)),
        ("cos/sin dtype", (c, s, i, i, cs.double(), cs.double(), pos)),
        ("sin dtype", (c, s, i, i, cs, cs.half(), pos)),
        ("positions .* must be \\[N, T\\]", (c, s, i, i, cs, cs, pos[:, :1])),
        ("positions must be int32", (c, s, i, i, cs, cs, pos.float())),
        ("even head size", (torch.zeros(2, 3, 8, 5), torch.ones(1, 3, 2, 5), i, i, torch.ones(4, 5),
                            torch.ones(4, 5), pos)),
    ]


@pytest.mark.parametrize("impl", ["op", "torch"])
def test_clear_errors(backend, impl):
    fn = _ops.kv_patch if impl == "op" else _ops._kv_patch_torch
    for msg, args in _bad_calls():
        with pytest.raises(RuntimeError, match=msg):
            fn(*args)


def test_opcheck(backend):
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(3, 2, 10, 8, generator=g)
    src = torch.randn(2, 2, 4, 8, generator=g)
    seq_idx, dst_slot = torch.tensor([2, 0]), torch.tensor([1, 6], dtype=torch.int32)
    cos, sin = torch.rand(16, 8, generator=g), torch.rand(16, 8, generator=g)
    positions = torch.arange(8).view(2, 4)
    op = torch.ops.svgt_fast.kv_patch.default
    torch.library.opcheck(op, (cache, src, seq_idx, dst_slot, None, None, None))
    torch.library.opcheck(op, (cache, src, seq_idx, dst_slot, cos, sin, positions))


def test_torch_compile_sees_mutation(backend):
    cache = torch.zeros(2, 2, 6, 4)
    src = torch.randn(1, 2, 3, 4)
    seq_idx, dst_slot = torch.tensor([1]), torch.tensor([2])

    def step(c, x):
        _ops.kv_patch(c, x, seq_idx, dst_slot)
        return c.sum(dim=-1)

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(cache, src)
    want = torch.zeros(2, 2, 6, 4)
    kv_patch_ref(want, src, seq_idx, dst_slot)
    assert torch.equal(cache, want) and torch.equal(got, want.sum(-1))


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_env_var_forces_torch_fallback():
    code = ("import torch; from svgt_fast import _ops; from svgt_fast.kernels.reference import kv_patch_ref\n"
            "c, s = torch.zeros(2, 2, 5, 4), torch.randn(1, 2, 3, 4)\n"
            "a, b = c.clone(), c.clone(); i, j = torch.tensor([1]), torch.tensor([1])\n"
            "_ops.kv_patch(a, s, i, j); kv_patch_ref(b, s, i, j); assert torch.equal(a, b)\n"
            "print(_ops.kv_patch_backend())")
    r = _python(code, SVGT_FAST_NO_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch"


def test_build_inputs_follow_the_includes():
    """A variant is stale when a file it compiles changed: its sources and the csrc/ headers they
    include. (Listing every header for both variants made a CPU build look stale for ever after a
    CUDA-only header changed: ninja had nothing to redo, so the library stayed older.)"""
    from svgt_fast import _build

    src = _build.csrc_dir()
    cpu = {p.name for p in _build.build_inputs([src / f for f in _build.CPU_SOURCES])}
    both = {p.name for p in _build.build_inputs([src / f for f in _build.CPU_SOURCES + _build.CUDA_SOURCES])}
    assert cpu == {"torch_bindings.cpp", "kv_patch_cpu.cpp", "kv_patch.h"}
    assert both == cpu | {"kv_patch_cuda.cu", "kv_patch_kernels.cuh", "kv_patch_params.h"}


def test_failed_build_warns_and_falls_back(tmp_path):
    """A broken compiler: one warning, then the PyTorch implementation (an empty build dir forces a build)."""
    r = _python("from svgt_fast import _ops; print(_ops.kv_patch_backend())",
                SVGT_FAST_EXT_DIR=str(tmp_path), CXX="/bin/false", PATH="/nonexistent")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch"
    assert r.stderr.count("could not build the kv_patch C++ extension") == 1, r.stderr


def _find_nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _find_cuobjdump(nvcc):
    cands = [shutil.which("cuobjdump"), os.path.join(os.path.dirname(nvcc), "cuobjdump")]
    try:  # Triton ships one
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def test_kernel_header_compiles_for_sm90(tmp_path):
    """nvcc -arch=sm_90 -c of the torch-free kernel header (a few seconds); where cuobjdump is
    found, the SASS shows 16-byte loads/stores and no FMA in the RoPE kernels (bit equality)."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): kernel compile check not run")
    obj = tmp_path / "k.o"
    # The -D flags are the ones torch.utils.cpp_extension adds (no implicit half/bf16 conversions).
    no_conv = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    r = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", *no_conv, "-c",
                        str(ROOT / "csrc" / "kv_patch_kernels_check.cu"), "-o", str(obj)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cuobjdump = _find_cuobjdump(nvcc)
    if cuobjdump is None:
        return
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=60).stdout
    kernels = {}
    for block in sass.split("Function : ")[1:]:
        kernels[block.split()[0]] = block
    assert len(kernels) == 16, list(kernels)
    for name, body in kernels.items():
        vectorized = "Li1E" not in name  # VEC = 1 is the scalar fallback
        assert ("STG.E.128" in body) == vectorized, name
        if "Lb1E" in name:  # RoPE
            assert "FFMA" not in body, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the extension build compiles the op for real")
def test_cuda_op_compiles_for_sm90(tmp_path):
    """nvcc -c of the whole CUDA op (kv_patch_cuda.cu: the torch glue, the parameters, the
    dispatch) against the installed torch's headers, as the extension build on a GPU machine
    compiles it. A CPU-only torch lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h);
    a stand-in with the one macro a shared-library build defines is put first on the path."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): op compile check not run")
    from torch.utils.cpp_extension import include_paths

    incs = include_paths()
    if not any((Path(i) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for i in incs):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs = [str(tmp_path / "stub"), *incs]
    no_conv = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    r = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", *no_conv, *(f"-I{i}" for i in incs),
                        f"-I{ROOT / 'csrc'}", "-c", str(ROOT / "csrc" / "kv_patch_cuda.cu"), "-o",
                        str(tmp_path / "op.o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


# ---- GPU ----------------------------------------------------------------------------------


@needs_cuda
def test_cuda_backend_when_nvcc(backend):
    if _find_nvcc() is None:
        pytest.skip("nvcc not found: CUDA tensors use the PyTorch implementation")
    assert backend == "cuda", _ops.kv_patch_backend_info()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [None, "fp32", "same"])
@pytest.mark.parametrize("D", [128, 7, 16])  # 7: scalar kernel (odd size); 16: vector kernel
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_cuda_matches_reference(backend, dtype, rope, D, layout):
    if rope and D % 2:
        pytest.skip("RoPE needs an even head size")
    for T, idx in ((1, (torch.int64, torch.int32)), (6, (torch.int32, torch.int64))):
        big, args = make_case(D + T, dtype, T=T, D=D, rope=rope, idx=idx, layout=layout, device="cuda")
        view = lambda b: cache_view(b, layout)
        got = run_case(_ops.kv_patch, big, view, args)
        want = run_case(kv_patch_ref, big, view, args)
        assert torch.equal(bits(got), bits(want))


@needs_cuda
def test_cuda_unaligned_view_uses_scalar_path(backend):
    """A cache view starting one element in (not 16-byte aligned): scalar kernel, same bits."""
    big = torch.randn(2 * 4 * 10 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    cache = big[1:].view(2, 4, 10, 64)
    src = torch.randn(2, 4, 3, 64, device="cuda", dtype=torch.bfloat16)
    idx, slot = torch.tensor([1, 0], device="cuda"), torch.tensor([2, 8], device="cuda")
    want = cache.clone()
    kv_patch_ref(want, src, idx, slot)
    _ops.kv_patch(cache, src, idx, slot)
    assert torch.equal(bits(cache), bits(want))


@needs_cuda
def test_cuda_graph_capture_and_replay(backend):
    """Captured once, replayed with new indices, rows and positions written in place."""
    if backend != "cuda":
        pytest.skip(f"the PyTorch fallback syncs and cannot be captured ({_ops.kv_patch_backend_info()})")
    g = torch.Generator().manual_seed(3)
    dev, dt = "cuda", torch.bfloat16
    B, H, S, D, N, T = 4, 8, 64, 128, 3, 5
    cache = torch.zeros(B, H, S, D, device=dev, dtype=dt)
    src = torch.randn(N, H, T, D, generator=g).to(dev, dt)
    seq_idx = torch.tensor([0, 2, 3], device=dev, dtype=torch.int32)
    dst_slot = torch.tensor([0, 10, -1], device=dev, dtype=torch.int32)
    ang = torch.rand(128, D // 2, generator=g)
    cos, sin = torch.cat([ang, ang], -1).cos().to(dev), torch.cat([ang, ang], -1).sin().to(dev)
    positions = torch.zeros(N, T, device=dev, dtype=torch.int64)
    _ops.kv_patch(cache, src, seq_idx, dst_slot, cos, sin, positions)  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _ops.kv_patch(cache, src, seq_idx, dst_slot, cos, sin, positions)
    for step in range(3):
        src.copy_(torch.randn(N, H, T, D, generator=g).to(dt))
        seq_idx.copy_(torch.tensor([step, 3 - step, 1], dtype=torch.int32))
        dst_slot.copy_(torch.tensor([step * 7, 60, -1 if step == 0 else 2], dtype=torch.int32))
        positions.copy_(torch.randint(0, 128, (N, T), generator=g))
        want = cache.clone()
        kv_patch_ref(want, src, seq_idx, dst_slot, cos, sin, positions)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(bits(cache), bits(want))
