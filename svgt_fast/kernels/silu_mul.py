"""SwiGLU activation (Triton): silu(gate) * up from the fused gate/up projection, one launch.

gate_up [..., 2I] (gate first, as the fused weight in fast_model) -> [..., I]. Rounds like
torch: silu rounded to the activation dtype, then the product rounded again.
With `edit`, NeVA's inference edit act <- act * a + c (fp32, rounded once) runs in the same
pass on the rows marked on. Reference: `silu_mul_ref` in kernels/reference.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_vector


@triton.jit
def _silu_mul_kernel(GU, OUT, A, C, ON, s_g, s_o, I, BLOCK: tl.constexpr, EDIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(GU + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_g + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty)
    out = (s.to(tl.float32) * u).to(OUT.dtype.element_ty)
    if EDIT:  # NeVA: act <- act * a + c on this row's edited neurons (a = 1, c = 0 elsewhere)
        if tl.load(ON + row) != 0:
            a = tl.load(A + cols, mask=mask, other=1.0)
            c = tl.load(C + cols, mask=mask, other=0.0)
            out = (out.to(tl.float32) * a + c).to(OUT.dtype.element_ty)
    tl.store(OUT + row * s_o + cols, out, mask=mask)


def silu_mul(gate_up: torch.Tensor, edit: tuple | None = None) -> torch.Tensor:
    """edit: (a [I] fp32, c [I] fp32, on [rows] bool) — NeVA's neuron edit fused in."""
    if gate_up.shape[-1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul: gate_up must have an even, contiguous last dim, got {tuple(gate_up.shape)}")
    I = gate_up.shape[-1] // 2
    g2 = gate_up.reshape(-1, 2 * I)
    out = torch.empty((g2.shape[0], I), dtype=gate_up.dtype, device=gate_up.device)
    block = min(4096, triton.next_power_of_2(I))
    a, c, on = edit if edit is not None else (out, out, out)
    if edit is not None:
        check_vector("silu_mul", "edit a", a, I, gate_up.device, (torch.float32,))
        check_vector("silu_mul", "edit c", c, I, gate_up.device, (torch.float32,))
        check_vector("silu_mul", "edit on", on, g2.shape[0], gate_up.device)
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(I, block))](g2, out, a, c, on, g2.stride(0), out.stride(0), I,
                                                           BLOCK=block, EDIT=edit is not None, num_warps=4)
    return out.view(*gate_up.shape[:-1], I)
