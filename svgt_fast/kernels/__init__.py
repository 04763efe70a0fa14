"""Triton kernels (one op per file) and their plain PyTorch references (reference.py)."""
from __future__ import annotations


def check_vector(op: str, name: str, t, n: int, device, dtypes=None) -> None:
    """A [n] argument that a kernel reads as a flat array (PTR + i): right length, device and
    dtype, and stride 1 — a strided or expanded view (stride 0) would be read past its elements,
    silently (the kernels take no stride for their per-row vectors)."""
    if tuple(t.shape) != (n,) or t.device != device or (dtypes is not None and t.dtype not in dtypes):
        want = "" if dtypes is None else " " + "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} must be a{want} tensor [{n}] on {device}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{op}: {name} must be contiguous (stride 1), got stride {t.stride(0)}: the kernel reads "
                         f"it as a flat array; pass .contiguous()")


def interpreter_problem(dtype=None) -> str | None:
    """Why Triton's CPU interpreter (TRITON_INTERPRET=1, tests only) cannot run our kernels with the
    installed packages (or on `dtype` data), or None.
    - Triton < 3.7's interpreter turns a runtime int argument into a 1-element array and calls
      int() on it, which NumPy >= 2.4 refuses: every kernel with a loop bound taken from an
      argument fails with an obscure TypeError.
    - The interpreter keeps bfloat16 as raw uint16 bits: its tl.dot multiplies those bits
      (values ~1e10; triton-lang/triton#11584, "not supported yet"), so the attention kernel's
      bf16 results there are garbage, and its fp32 -> bf16 casts truncate instead of rounding to
      nearest even (half of random values come out one ulp off; triton 3.6 and 3.9). A bf16
      load cast to fp32 is exact, so kernels that only read bf16 (the trigger) are testable;
      for the rest fp16 is the low-precision case on CPU."""
    import numpy
    import torch
    import triton
    from packaging.version import Version

    if dtype == torch.bfloat16:
        return ("Triton's CPU interpreter cannot run bfloat16 matrix products (it multiplies the raw bits; "
                "triton-lang/triton#11584) and truncates when it casts to bfloat16: use float16 or float32 on CPU, "
                "or attention='torch'")
    if Version(triton.__version__).release < (3, 7) and Version(numpy.__version__).release >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run kernels with NumPy {numpy.__version__}: "
                "install numpy<2.4 or triton>=3.7 (compiled GPU kernels are not affected)")
    return None
