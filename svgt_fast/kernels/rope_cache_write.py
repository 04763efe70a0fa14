"""RoPE + KV-cache write (Triton): one launch rotates q and k of a chunk of rows and stores k, v
where each row lives — the token cache or, for bridge rows, the bridge buffer (layout in
kernels/reference.py). Replaces the table gathers, the rotate-half arithmetic, the slot
arithmetic and four scatter writes of the PyTorch path (`rope_cache_write_ref`).

Rounding follows HF's apply_rotary_pos_emb in the activation dtype: x*cos and
rotate_half(x)*sin are each rounded, then their sum. With `qk_norm` (Qwen3) each q and k head is
first RMS-normalised over its head_dim as HF's Qwen3RMSNorm does (fp32, rounded, times the weight,
rounded) — in the same pass, instead of two more launches per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_vector


@triton.jit
def _rotate(X, COS, SIN, offs, NW, eps, HALF: tl.constexpr, NORM: tl.constexpr):
    x1 = tl.load(X + offs).to(tl.float32)
    x2 = tl.load(X + HALF + offs).to(tl.float32)
    dt = X.dtype.element_ty
    if NORM:  # RMSNorm over the head (both halves), HF's roundings
        inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
        w1 = tl.load(NW + offs).to(tl.float32)
        w2 = tl.load(NW + HALF + offs).to(tl.float32)
        x1 = (w1 * (x1 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    c1 = tl.load(COS + offs).to(tl.float32)
    c2 = tl.load(COS + HALF + offs).to(tl.float32)
    s1 = tl.load(SIN + offs).to(tl.float32)
    s2 = tl.load(SIN + HALF + offs).to(tl.float32)
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    return o1, o2


@triton.jit
def _rope_cache_write_kernel(
    Q, K, V, COS, SIN, QO, KC, VC, KB, VB, LOGICAL, PLEN, BLEN, SEQ, QN, KN, eps,
    s_qb, s_qm, s_qh, s_kb_, s_km, s_kh, s_vb_, s_vm, s_vh,
    s_ob, s_om, s_oh,
    s_cb, s_ch, s_cs, s_wb, s_wh, s_ws,
    s_bb, s_bh, s_bs, s_xb, s_xh, s_xs,
    s_lb, s_lm, s_cos,
    M, n_pos, n_tok_slots,
    HQ: tl.constexpr, HALF: tl.constexpr, HAS_BRIDGE: tl.constexpr, HAS_SEQ: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = r // M
    m = r % M
    lg = tl.load(LOGICAL + b * s_lb + m * s_lm).to(tl.int64)
    pos = tl.minimum(tl.maximum(lg, 0), n_pos - 1)
    offs = tl.arange(0, HALF)
    cos = COS + pos * s_cos
    sin = SIN + pos * s_cos
    if h < HQ:
        o1, o2 = _rotate(Q + b * s_qb + m * s_qm + h * s_qh, cos, sin, offs, QN, eps, HALF, QK_NORM)
        out = QO + b * s_ob + m * s_om + h * s_oh
        tl.store(out + offs, o1)
        tl.store(out + HALF + offs, o2)
    else:
        j = h - HQ
        P = tl.load(PLEN + b).to(tl.int64)
        kb = P * 0
        if HAS_BRIDGE:
            kb = tl.load(BLEN + b).to(tl.int64)
        c = b  # the cache row of row b
        if HAS_SEQ:
            c = tl.load(SEQ + b).to(tl.int64)
        is_bridge = (lg >= P) & (lg < P + kb)
        slot = tl.where(lg < P, lg, tl.where(is_bridge, lg - P, lg - kb))
        k1, k2 = _rotate(K + b * s_kb_ + m * s_km + j * s_kh, cos, sin, offs, KN, eps, HALF, QK_NORM)
        vp = V + b * s_vb_ + m * s_vm + j * s_vh
        v1 = tl.load(vp + offs)
        v2 = tl.load(vp + HALF + offs)
        tok_ok = (lg >= 0) & (~is_bridge) & (slot < n_tok_slots)
        if tok_ok:
            kd = KC + c * s_cb + j * s_ch + slot * s_cs
            vd = VC + c * s_wb + j * s_wh + slot * s_ws
            tl.store(kd + offs, k1)
            tl.store(kd + HALF + offs, k2)
            tl.store(vd + offs, v1)
            tl.store(vd + HALF + offs, v2)
        if HAS_BRIDGE:
            if is_bridge:
                kd = KB + c * s_bb + j * s_bh + slot * s_bs
                vd = VB + c * s_xb + j * s_xh + slot * s_xs
                tl.store(kd + offs, k1)
                tl.store(kd + HALF + offs, k2)
                tl.store(vd + offs, v1)
                tl.store(vd + HALF + offs, v2)


def rope_cache_write(q, k, v, cos, sin, logical, prompt_len, bridge_len, k_cache, v_cache,
                     k_bridge=None, v_bridge=None, n_tok_slots: int | None = None,
                     seq_idx: torch.Tensor | None = None, qk_norm: tuple | None = None) -> torch.Tensor:
    """Rotate q/k at their logical positions and write k, v into the caches in place.

    q [B, M, Hq, D]; k, v [B, M, Hkv, D] (any strides, last dim contiguous); cos, sin [n_pos, D]
    (positions past the table are clamped to its last row, as the engine's padding rows need);
    logical [B, M] int; prompt_len, bridge_len [B] int; k_cache, v_cache [B, Hkv, >= n_tok_slots, D];
    k_bridge, v_bridge [B, Hkv, Kmax, D] or None (then bridge_len is ignored: no bridge rows).
    Token rows whose slot is >= n_tok_slots (default: the cache length) and rows with a negative
    logical index are not written. seq_idx [B] int or None: row b writes cache row seq_idx[b]
    (the caches may then hold any number of rows; a compacted sub-batch writes in place).
    qk_norm: (q_weight [D], k_weight [D], eps) or None — Qwen3's per-head RMSNorm, applied first.
    Returns the rotated q as a new [B, M, Hq, D] tensor.
    """
    from .prefix_attention import INT_TYPES, _check_seq_idx
    B, M, Hq, D = q.shape
    Hkv = k.shape[2]
    if D % 2 or D & (D - 1) or D < 16:
        raise ValueError(f"rope_cache_write: head_dim {D} must be a power of two >= 16")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"rope_cache_write: {name} must have a contiguous last dim")
        if t.dtype != q.dtype:
            raise ValueError(f"rope_cache_write: {name} dtype {t.dtype} != q dtype {q.dtype}")
    _check_seq_idx(seq_idx, B, k_cache.shape[0], q.device)
    for name, t in (("prompt_len", prompt_len), ("bridge_len", bridge_len)):
        check_vector("rope_cache_write", name, t, B, q.device, INT_TYPES)
    rows = B if seq_idx is None else k_cache.shape[0]
    if k.shape != (B, M, Hkv, D) or v.shape != k.shape or k_cache.shape[:2] != (rows, Hkv) or k_cache.shape[3] != D:
        raise ValueError(f"rope_cache_write: shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"cache {tuple(k_cache.shape)} do not fit")
    if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.shape[1] != D or tuple(logical.shape) != (B, M):
        raise ValueError(f"rope_cache_write: cos/sin {tuple(cos.shape)} or logical {tuple(logical.shape)} do not fit")
    if qk_norm is not None:
        qn, kn, eps = qk_norm
        for name, t in (("q norm weight", qn), ("k norm weight", kn)):
            if tuple(t.shape) != (D,) or t.stride(0) != 1 or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"rope_cache_write: {name} must be a contiguous [{D}] {q.dtype} tensor on "
                                 f"{q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    else:
        qn = kn = cos  # never read
        eps = 0.0
    has_bridge = k_bridge is not None
    if not has_bridge:
        k_bridge = v_bridge = k_cache  # never written
    n_tok = k_cache.shape[2] if n_tok_slots is None else int(n_tok_slots)
    q_out = torch.empty((B, M, Hq, D), dtype=q.dtype, device=q.device)
    if B * M == 0:
        return q_out
    _rope_cache_write_kernel[(B * M, Hq + Hkv)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, k_bridge, v_bridge, logical, prompt_len, bridge_len,
        logical if seq_idx is None else seq_idx, qn, kn, float(eps),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q_out.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k_bridge.stride()[:3], *v_bridge.stride()[:3],
        *logical.stride(), cos.stride(0),
        M, cos.shape[0], n_tok,
        HQ=Hq, HALF=D // 2, HAS_BRIDGE=has_bridge, HAS_SEQ=seq_idx is not None, QK_NORM=qk_norm is not None,
        num_warps=1,
    )
    return q_out
