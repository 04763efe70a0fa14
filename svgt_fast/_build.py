"""Build-on-first-use of the C++/CUDA extension in csrc/ (torch.utils.cpp_extension.load + ninja).

The build is cached per torch version and variant in ~/.cache/svgt_fast/ext/<torch>-<cpu|cuda>
(SVGT_FAST_EXT_DIR overrides the root; SVGT_FAST_EXT_VERBOSE=1 shows the compiler commands);
ninja rebuilds only what changed, and cpp_extension's lock file in that folder keeps concurrent
processes from building at once (a build killed midway can leave that lock behind: delete the
folder). The "cuda" variant
(CPU sources + csrc/*.cu) is built when torch sees a GPU and nvcc is found; if that build fails
the "cpu" variant is tried. CMakeLists.txt builds the same sources ahead of time for C++ users.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch

LIB_NAME = "svgt_fast_C"  # + "_cpu" / "_cuda": one name per variant keeps cpp_extension's
# in-process versioning (name_v1.so when one name meets other sources) out of the way.
CPU_SOURCES = ("torch_bindings.cpp", "kv_patch_cpu.cpp")
CUDA_SOURCES = ("kv_patch_cuda.cu",)
HEADERS = ("kv_patch.h", "kv_patch_kernels.cuh", "kv_patch_params.h")
# -ffp-contract=off: RoPE must round after each multiply, as PyTorch's kernels do (bit equality).
# No -std flag: cpp_extension picks the standard the installed torch's headers need. No
# --use_fast_math for nvcc: it flushes denormals, which would break bit equality.
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
CUDA_FLAGS = ["-O3"]


def csrc_dir() -> Path:
    """The csrc/ folder of the source checkout (also an editable install's)."""
    d = Path(__file__).resolve().parent.parent / "csrc"
    missing = [f for f in CPU_SOURCES + CUDA_SOURCES + HEADERS if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"svgt_fast: C++ sources {missing} not found in {d}; "
                                "install from a source checkout (pip install -e .)")
    return d


def cuda_buildable() -> bool:
    """A GPU is visible, torch is a CUDA build and cpp_extension found a CUDA toolkit (nvcc)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return (torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None
            and (Path(CUDA_HOME) / "bin" / "nvcc").exists())


def build_dir(variant: str) -> Path:
    root = os.environ.get("SVGT_FAST_EXT_DIR") or Path.home() / ".cache" / "svgt_fast" / "ext"
    return Path(root) / f"{torch.__version__}-{variant}"


def error_summary(exc: BaseException) -> str:
    """The line of a build error that says what went wrong (a compiler's "error:" line rather
    than the command line cpp_extension puts first), at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("Error building extension")]
    return (hits or lines or [type(exc).__name__])[0][:300]


def build_inputs(sources: list[Path]) -> list[Path]:
    """The sources and every csrc/ header they include, transitively (`#include "..."`): what a
    build of these sources depends on. A header only another variant includes is not in it, so
    changing that header does not make this variant look stale."""
    seen, todo = [], list(sources)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        for line in f.read_text().splitlines():
            if line.startswith('#include "'):
                inc = f.parent / line.split('"')[1]
                if inc.is_file():
                    todo.append(inc)
    return seen


def _stale(lib: Path, inputs: list[Path]) -> bool:
    return not lib.exists() or any(f.stat().st_mtime > lib.stat().st_mtime for f in inputs)


def _build(variant: str) -> tuple[str, float | None]:
    """Compile (when stale) and load one variant; returns (library path, seconds spent building
    or None when the cached build was current). Raises whatever the build raises."""
    from torch.utils.cpp_extension import load

    src = csrc_dir()
    sources = [src / f for f in CPU_SOURCES + (CUDA_SOURCES if variant == "cuda" else ())]
    out = build_dir(variant)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{LIB_NAME}_{variant}"
    lib = out / f"{name}.so"
    stale = _stale(lib, build_inputs(sources))
    if stale:
        print(f"svgt_fast: building the kv_patch C++{'/CUDA' if variant == 'cuda' else ''} extension into {out} "
              "(first use only, under a minute)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    path = load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=CUDA_FLAGS,
        extra_include_paths=[str(src)],
        build_directory=str(out),
        with_cuda=variant == "cuda",
        is_python_module=False,
        verbose=os.environ.get("SVGT_FAST_EXT_VERBOSE", "") not in ("", "0"),
    )
    if stale and lib.exists():
        lib.touch()  # ninja may have found nothing to redo (an input's time changed, not its content)
    return str(path), (time.perf_counter() - t0) if stale else None


def build_and_load() -> tuple[str, str, float | None]:
    """Build (if needed) and load the extension, registering torch.ops.svgt_fast.*.
    Returns (variant "cuda" | "cpu", library path, build seconds or None). Raises when even the
    CPU variant cannot be built."""
    if cuda_buildable():
        try:
            return ("cuda", *_build("cuda"))
        except Exception as exc:  # e.g. nvcc / torch CUDA version mismatch: CPU ops still help
            warnings.warn(f"svgt_fast: the CUDA part of the kv_patch extension did not build "
                          f"({error_summary(exc)}); building the CPU part only, CUDA tensors use the "
                          "PyTorch implementation",
                          RuntimeWarning, stacklevel=3)
    return ("cpu", *_build("cpu"))
