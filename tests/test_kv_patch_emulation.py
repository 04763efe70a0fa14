"""The CUDA kv_patch kernel (csrc/kv_patch_kernels.cuh) run on the CPU, thread by thread, over
the grid the CUDA op would launch, with the parameters it would pass (tests/csrc/
kv_patch_emulation.cpp explains how and what it leaves out). It has never run on a GPU: this is
where its index math, skip rules, grid, 16-byte/scalar choice and RoPE are checked against
kv_patch_ref, bit for bit, on machines without one. Needs a C++ compiler, ninja and the CUDA
headers (nvcc's toolkit); the build (~30 s) is cached beside the extension's."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from svgt_fast import _build
from svgt_fast.kernels.reference import kv_patch_ref
from test_kv_patch import DTYPES, bits, bulk_case, cache_view, make_case, run_case, written_mask

ROOT = Path(__file__).resolve().parent.parent


def _cuda_include():
    nvcc = shutil.which("nvcc")
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    return next((str(Path(c) / "include") for c in cands if c and (Path(c) / "include" / "cuda_runtime.h").exists()),
                None)


@pytest.fixture(scope="module")
def emulated():
    inc = _cuda_include()
    required = os.environ.get("SVGT_FAST_REQUIRE_EXT") == "1"  # CI has the CUDA headers (nvcc)
    if inc is None or shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        if required:
            pytest.fail("SVGT_FAST_REQUIRE_EXT=1 but the CUDA headers, a C++ compiler or ninja is missing")
        pytest.skip("needs the CUDA headers (cuda_runtime.h), a C++ compiler and ninja")
    from torch.utils.cpp_extension import load

    out = _build.build_dir("cuda-emulation")
    out.mkdir(parents=True, exist_ok=True)
    # -fsanitize=alignment: a misaligned 16-byte access is reported on stderr (checked per test);
    flags = ["-O0", "-ffp-contract=off", "-fsanitize=alignment"]  # -O0: the access itself then does not fault
    load(name="svgt_fast_kv_patch_emulation", sources=[str(ROOT / "tests" / "csrc" / "kv_patch_emulation.cpp")],
         extra_include_paths=[str(ROOT / "csrc"), inc], extra_cflags=flags, extra_ldflags=["-fsanitize=alignment"],
         build_directory=str(out), is_python_module=False, verbose=False)
    return torch.ops.svgt_fast_emulation.kv_patch


@pytest.fixture
def no_misaligned_access(capfd):
    yield
    err = capfd.readouterr().err
    assert "runtime error" not in err, err  # UBSan: a 16-byte access to an unaligned address


# D = 7: odd, the scalar kernel only (and no RoPE, which needs an even head size)
ROPE_D = [(rope, D) for rope in (None, "fp32", "same") for D in (128, 16, 7) if not (rope and D % 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope, D", ROPE_D)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("force_scalar", [False, True])
def test_emulated_cuda_kernel_matches_reference(emulated, no_misaligned_access, dtype, rope, D, layout, force_scalar):
    for T, idx in ((1, (torch.int64, torch.int32)), (6, (torch.int32, torch.int64))):
        big, args = make_case(D + T, dtype, T=T, D=D, rope=rope, idx=idx, layout=layout)
        view = lambda b: cache_view(b, layout)
        vec = []
        got = run_case(lambda c, *a: vec.append(emulated(c, *a, force_scalar)), big, view, args)
        want = run_case(kv_patch_ref, big, view, args)
        assert torch.equal(bits(got), bits(want))
        mask = written_mask(big.shape, layout, T, rope=rope is not None)
        assert torch.equal(bits(got)[~mask], bits(big)[~mask])  # poison outside the written slots
        assert not got[mask].isnan().any()
        # the 16-byte kernel runs whenever a thread's span is a whole number of 16-byte words
        span_bytes = (D // 2 if rope else D) * big.element_size()
        assert vec == [int(not force_scalar and span_bytes % 16 == 0)]


def test_unaligned_view_takes_the_scalar_kernel(emulated, no_misaligned_access):
    big = torch.randn(2 * 4 * 10 * 64 + 1).to(torch.bfloat16)
    cache = big[1:].view(2, 4, 10, 64)  # starts 2 bytes past a 16-byte boundary
    src = torch.randn(2, 4, 3, 64).to(torch.bfloat16)
    idx, slot = torch.tensor([1, 0]), torch.tensor([2, 8])
    want = cache.clone()
    kv_patch_ref(want, src, idx, slot)
    assert emulated(cache, src, idx, slot, None, None, None, False) == 0
    assert torch.equal(bits(cache), bits(want))


def test_many_blocks_long_rows_with_rope(emulated, no_misaligned_access):
    """test_kv_patch's refresh-sized bulk patch: 776 chunks per row -> 4 blocks along x, 8 heads, RoPE."""
    cache, src, seq_idx, dst_slot, extras = bulk_case()
    for extra in extras:
        got, want = cache.clone(), cache.clone()
        assert emulated(got, src, seq_idx, dst_slot, *extra, False) == 1
        kv_patch_ref(want, src, seq_idx, dst_slot, *extra)
        assert torch.equal(bits(got), bits(want))


def test_more_rows_than_grid_z(emulated, no_misaligned_access):
    """N = 70,000 rows > the 65,535 blocks a grid's z can hold: the kernel loops over the rest."""
    B, S, D = 1000, 80, 16
    N = 70_000
    n = torch.arange(N)
    seq_idx, dst_slot = n % B, n // B  # every row its own slot (rows race on a GPU otherwise)
    src = torch.randn(N, 1, 1, D)
    cache = torch.zeros(B, 1, S, D)
    want = cache.clone()
    kv_patch_ref(want, src, seq_idx, dst_slot)
    assert emulated(cache, src, seq_idx, dst_slot, None, None, None, False) == 1
    assert torch.equal(cache, want)
    assert torch.equal(cache[seq_idx[-1], 0, dst_slot[-1]], src[-1, 0, 0])  # a row past 65,535 landed
