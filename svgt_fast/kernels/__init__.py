"""Triton kernels (one op per file) and their plain PyTorch references (reference.py)."""
from __future__ import annotations


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter (TRITON_INTERPRET=1, tests only) cannot run our kernels with the
    installed packages, or None. Triton < 3.7's interpreter turns a runtime int argument into a
    1-element array and calls int() on it, which NumPy >= 2.4 refuses; every kernel with a loop
    bound taken from an argument then fails with an obscure TypeError."""
    import numpy
    import triton
    from packaging.version import Version

    if Version(triton.__version__).release < (3, 7) and Version(numpy.__version__).release >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run kernels with NumPy {numpy.__version__}: "
                "install numpy<2.4 or triton>=3.7 (compiled GPU kernels are not affected)")
    return None
