"""ConVA edit (Triton, one pass over the hidden state): per row of a steered layer's output,
the value probe, the gate, the closed-form step and the add (DESIGN §3, ConVA).

    e      = x (+ delta: the residual add of the layer, fused in when given)
    p      = sigmoid(w · e + b)                 value probe
    gate   = sigmoid(u · e + c) >= g0           relevance gate
    eps    = (logit(P0) - (w · e + b)) / (w · v)   if on[row] and gate and p < P0, else 0
    out    = e + eps * v                        (v = w / |w|: the probe's normal)
so the probe reads exactly P0 after the edit. Reference: `conva_edit_ref` in kernels/reference.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import check_vector


@triton.jit
def _conva_edit_kernel(X, DELTA, OUT, W, V, U, ON, s_x, s_d, s_o, N, b, c, logit_p0, g0_logit, wv,
                       BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    e = tl.load(X + row * s_x + cols, mask=m, other=0.0)
    if HAS_DELTA:
        e = (e.to(tl.float32) + tl.load(DELTA + row * s_d + cols, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    ef = e.to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0)
    u = tl.load(U + cols, mask=m, other=0.0)
    v = tl.load(V + cols, mask=m, other=0.0)
    z = tl.sum(ef * w, 0) + b
    gz = tl.sum(ef * u, 0) + c
    on = tl.load(ON + row) != 0
    act = on & (gz >= g0_logit) & (z < logit_p0)
    eps = tl.where(act, (logit_p0 - z) / wv, 0.0)
    tl.store(OUT + row * s_o + cols, (ef + eps * v).to(OUT.dtype.element_ty), mask=m)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def conva_edit(x, delta, w, b: float, v, u, c: float, p0: float, g0: float, on, wv: float) -> torch.Tensor:
    """x (and delta) [..., d] in the model dtype; w, v, u [d] float32; b, c floats; on [rows]
    bool/int (rows = x.numel() // d, row-major); wv = w · v (a host float, computed once: no
    sync here). Returns a new tensor like x."""
    d = x.shape[-1]
    for name, t in (("w", w), ("v", v), ("u", u)):
        check_vector("conva_edit", name, t, d, x.device, (torch.float32,))
    if not (0.0 < p0 < 1.0 and 0.0 < g0 < 1.0):
        raise ValueError(f"conva_edit: p0 and g0 must lie in (0, 1), got {p0}, {g0}")
    x2 = x.reshape(-1, d)
    d2 = delta.reshape(-1, d) if delta is not None else x2
    check_vector("conva_edit", "on", on, x2.shape[0], x.device)
    out = torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    _conva_edit_kernel[(x2.shape[0],)](
        x2, d2, out, w, v, u, on, x2.stride(0), d2.stride(0), out.stride(0), d, float(b), float(c),
        _logit(p0), _logit(g0), float(wv), BLOCK=block, HAS_DELTA=delta is not None,
        num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)
