"""Fused RMSNorm (Triton), optionally with the residual add in front of it.

    add_rms_norm(x, delta, w) -> (x + delta, rms_norm(x + delta, w))    one pass, one launch
    rms_norm(x, w)            -> rms_norm(x, w)

Rounding follows HF exactly: the residual sum is rounded to the activation dtype (as torch's
add), the normalisation runs in fp32 and is rounded once to the activation dtype, then the
product with the weight is rounded again (HF: `weight * hidden.to(input_dtype)`).
Reference: `rms_norm_ref` in kernels/reference.py. Rows of any leading shape; last dim contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, OUT, SUM, s_x, s_r, s_o, s_s, N, eps,
                     BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * s_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * s_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(SUM + row * s_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    y = (xf * inv).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * s_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"rms_norm: {name} must have a contiguous last dim, got strides {t.stride()}")
    t2 = t.reshape(-1, t.shape[-1])
    return t2


def _launch(x, delta, weight, eps):
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not fit rows of {x.shape[-1]}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"rms_norm: weight {weight.dtype} on {weight.device} != x {x.dtype} on {x.device}")
    N = x.shape[-1]
    x2 = _rows(x, "x")
    out = torch.empty_like(x2)
    if delta is not None:
        if delta.shape != x.shape or delta.dtype != x.dtype:
            raise ValueError(f"rms_norm: delta {tuple(delta.shape)} {delta.dtype} != x {tuple(x.shape)} {x.dtype}")
        d2 = _rows(delta, "delta")
        total = torch.empty_like(x2)
    else:
        d2 = total = x2  # unused
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, d2, weight, out, total, x2.stride(0), d2.stride(0), out.stride(0), total.stride(0), N, float(eps),
        BLOCK=block, HAS_RES=delta is not None, num_warps=min(16, max(1, block // 256)))
    return total.view(x.shape), out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)) as two new tensors."""
    return _launch(x, delta, weight, eps)
