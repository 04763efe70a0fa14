"""Plain PyTorch references of every kernel in this package (the ladder's first rung).

Logical layout of one sequence in an attention layer (DESIGN §2): the token cache holds
[prompt (P) | response] contiguously in slots 0..; the bridge buffer holds Kb bridge tokens.
The attended sequence is [prompt ; bridge ; response], whose logical index is also the RoPE
position: slot s < P -> s; bridge j -> P + j; slot s >= P -> s + Kb. A query at logical index
qi sees every existing key of logical index <= qi. Kb = 0 (bridge off for that sequence or that
layer) gives plain causal attention over the token cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prefix_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    prompt_len: torch.Tensor,
    bridge_len: torch.Tensor,
    k_bridge: torch.Tensor | None,
    v_bridge: torch.Tensor | None,
    scale: float,
    n_slots: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of queries over [token cache ; bridge buffer] in the logical order above.

    q: [B, M, Hq, D]; q_pos: [B, M] int, the logical index of each query row (rows need not be
        contiguous: a refresh chunk is [bridge rows ; a window of response rows]).
    k_cache, v_cache: [B, Hkv, S, D] (slots >= n_slots are never read).
    prompt_len, bridge_len: [B] int (bridge_len in 0..Kmax; ignored without a bridge).
    k_bridge, v_bridge: [B, Hkv, Kmax, D] or None.
    compute_dtype: dtype of the two matmuls (fp32 default; a low-precision run gives the error
        yardstick for kernels); the softmax is always fp32. A query row that sees no key (a
        padding row of logical index < 0) gives 0.
    seq_idx: [B] int or None — query row b reads cache row seq_idx[b] of caches with any number
        of rows (a compacted sub-batch).
    Returns [B, M, Hq, D] in q's dtype.
    """
    if seq_idx is not None:
        k_cache, v_cache = k_cache[seq_idx], v_cache[seq_idx]
        if k_bridge is not None:
            k_bridge, v_bridge = k_bridge[seq_idx], v_bridge[seq_idx]
    B, M, Hq, D = q.shape
    S = k_cache.shape[2] if n_slots is None else n_slots
    dev = q.device
    slots = torch.arange(S, device=dev)
    kb = bridge_len if k_bridge is not None else torch.zeros_like(bridge_len)
    P = prompt_len[:, None]
    key_logical = slots[None] + kb[:, None] * (slots[None] >= P)  # [B, S]
    keys, vals = k_cache[:, :, :S], v_cache[:, :, :S]
    if k_bridge is not None:
        j = torch.arange(k_bridge.shape[2], device=dev)
        bridge_logical = torch.where(j[None] < kb[:, None], P + j[None], torch.iinfo(torch.int64).max)
        key_logical = torch.cat([key_logical, bridge_logical], dim=1)
        keys = torch.cat([keys, k_bridge], dim=2)
        vals = torch.cat([vals, v_bridge], dim=2)
    qi = q_pos  # [B, M]
    mask = key_logical[:, None, :] <= qi[:, :, None]  # [B, M, N]
    # A slot that no query of the row sees holds what an earlier call left there: a NaN from a
    # call that overflowed would leak into every later call through 0 * NaN. Read it as 0.
    vals = torch.where(mask.any(1)[:, None, :, None], vals, 0)
    Hkv = keys.shape[1]
    keys = keys.repeat_interleave(Hq // Hkv, dim=1).to(compute_dtype)
    vals = vals.repeat_interleave(Hq // Hkv, dim=1).to(compute_dtype)
    scores = torch.einsum("bmhd,bhnd->bhmn", q.to(compute_dtype), keys).float() * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # a row that sees no key (padding, logical index < 0) gives 0, as the kernel does, not NaN
    probs = torch.where(mask.any(-1)[:, None, :, None], probs, 0.0).to(compute_dtype)
    out = torch.einsum("bhmn,bhnd->bmhd", probs, vals)
    return out.to(q.dtype)


def logical_to_storage(logical: torch.Tensor, prompt_len: torch.Tensor, bridge_len: torch.Tensor):
    """Where a row of logical index `logical` [B, M] lives: (is_bridge [B, M], index [B, M]) —
    a bridge-buffer index when is_bridge, else a token-cache slot."""
    P, kb = prompt_len[:, None], bridge_len[:, None]
    is_bridge = (logical >= P) & (logical < P + kb)
    index = torch.where(logical < P, logical, torch.where(is_bridge, logical - P, logical - kb))
    return is_bridge, index



def kv_patch_ref(cache, src, seq_idx, dst_slot, cos=None, sin=None, positions=None) -> None:
    """The definition of torch.ops.svgt_fast.kv_patch (svgt_fast/_ops.py); mutates `cache`.

    cache [B, H, S, D]; src [N, H, T, D]; seq_idx [N]; dst_slot [N] (first slot of row n);
    optional RoPE tables cos, sin [n_pos, D] with positions [N, T]. For every row n with
    0 <= seq_idx[n] < B and dst_slot[n] >= 0, and every t with s = dst_slot[n] + t < S:
    cache[seq_idx[n], :, s] = f(src[n, :, t]), where f(x) = x * cos[p] + rotate_half(x) * sin[p]
    (p = positions[n, t]; computed in fp32, rounded once to the cache dtype; a slot whose p is
    outside [0, n_pos) is skipped) with RoPE, and f(x) = x without. Nothing else is touched.
    """
    B, _, S, D = cache.shape
    N, _, T, _ = src.shape
    for n in range(N):
        b, first = int(seq_idx[n]), int(dst_slot[n])
        if not 0 <= b < B or first < 0:
            continue
        for t in range(min(T, S - first)):
            x = src[n, :, t]  # [H, D]
            if cos is not None:
                p = int(positions[n, t])
                if not 0 <= p < cos.shape[0]:
                    continue
                xf = x.float()
                rot = torch.cat([-xf[:, D // 2:], xf[:, : D // 2]], dim=-1)
                x = (xf * cos[p].float() + rot * sin[p].float()).to(cache.dtype)
            cache[b, :, first + t] = x


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: normalise in fp32, round to x's dtype, then scale by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul_ref(gate_up: torch.Tensor, edit=None) -> torch.Tensor:
    """SwiGLU activation of a fused [..., 2I] gate/up projection (gate first); edit = (a, c, on):
    NeVA's act <- act * a + c (fp32, rounded once) on the rows marked on."""
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up
    if edit is None:
        return act
    a, c, on = edit
    flat = act.reshape(-1, act.shape[-1])
    edited = (flat.float() * a + c).to(act.dtype)
    return torch.where(on.bool()[:, None], edited, flat).view(act.shape)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, M, H, D]; cos/sin [B, M, D] (HF rotate-half convention, in x's dtype)."""
    c, s = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


def rope_cache_write_ref(q, k, v, cos, sin, logical, prompt_len, bridge_len, k_cache, v_cache,
                         k_bridge=None, v_bridge=None, n_tok_slots=None, seq_idx=None, qk_norm=None) -> torch.Tensor:
    """The definition of kernels/rope_cache_write.py: with qk_norm = (q_weight, k_weight, eps),
    RMS-normalise each q and k head first (rms_norm_ref); rotate q, k at min(logical, n_pos - 1);
    write k, v of each row with logical >= 0 to its storage (logical_to_storage) — token rows
    only below n_tok_slots, bridge rows only when a bridge buffer is given — in cache row b, or
    seq_idx[b] when given. Returns rotated q."""
    B, M = logical.shape
    if qk_norm is not None:
        q, k = rms_norm_ref(q, qk_norm[0], qk_norm[2]), rms_norm_ref(k, qk_norm[1], qk_norm[2])
    pos = logical.clamp(0, cos.shape[0] - 1)
    c, s = cos[pos], sin[pos]
    q, k = apply_rope_ref(q, c, s), apply_rope_ref(k, c, s)
    kb = bridge_len if k_bridge is not None else torch.zeros_like(bridge_len)
    is_bridge, index = logical_to_storage(logical, prompt_len, kb)
    n_tok = k_cache.shape[2] if n_tok_slots is None else n_tok_slots
    rows = (torch.arange(B, device=q.device) if seq_idx is None else seq_idx.long())[:, None].expand(B, M)
    tok = (logical >= 0) & ~is_bridge & (index < n_tok)
    k_cache[rows[tok], :, index[tok]] = k[tok]
    v_cache[rows[tok], :, index[tok]] = v[tok]
    if k_bridge is not None:
        br = (logical >= 0) & is_bridge
        k_bridge[rows[br], :, index[br]] = k[br]
        v_bridge[rows[br], :, index[br]] = v[br]
    return q


def trigger_ref(z, h, h_ref, w1, b1, w2, b2, t, interval, policy, score_thr, drift_thr):
    """The definition of kernels/trigger.py (sparse triggering), in fp32."""
    zf = z.float()
    u = zf @ w1.float().T + b1.float()
    score = F.gelu(u) @ w2.float().reshape(-1) + b2.float().reshape(())
    from ..steering import trigger_drift

    drift = trigger_drift(h, h_ref)
    iv = interval.to(torch.int64)
    due = (iv > 0) & (t.to(torch.int64) % torch.where(iv > 0, iv, torch.ones_like(iv)) == 0)
    fire = due & ((policy == 0) | (score > score_thr) | (drift > drift_thr))
    fired = fire.nonzero().flatten().to(torch.int32)
    rows = torch.full_like(fire, -1, dtype=torch.int32)
    rows[: fired.numel()] = fired
    count = torch.tensor([fired.numel()], dtype=torch.int32, device=z.device)
    return fire.to(torch.int32), rows, count, score, drift


def conva_edit_ref(x, delta, w, b, v, u, c, p0, g0, on, wv=None):
    """The definition of kernels/conva_edit.py, in fp32 (one rounding to x's dtype at the end)."""
    import math

    d = x.shape[-1]
    e = x if delta is None else x + delta
    ef = e.reshape(-1, d).float()
    z = ef @ w + b
    gz = ef @ u + c
    lp0, lg0 = math.log(p0 / (1 - p0)), math.log(g0 / (1 - g0))
    act = on.bool() & (gz >= lg0) & (z < lp0)
    wv = torch.dot(w, v) if wv is None else wv
    eps = torch.where(act, (lp0 - z) / wv, torch.zeros_like(z))
    return (ef + eps[:, None] * v).to(x.dtype).view(x.shape)
