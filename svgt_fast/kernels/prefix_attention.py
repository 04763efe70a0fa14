"""Bridge-token prefix attention (Triton): one online-softmax pass over the token cache and the
separate bridge buffer, in the logical order [prompt ; bridge ; response]; its reference is
`prefix_attention_ref` in kernels/reference.py.

One kernel serves decode (M = 1 query row per sequence) and chunks (prefill, refresh: M rows,
causal by logical index). GQA: the G = Hq / Hkv query heads that share a KV head are packed with
the M rows into one block of BLOCK_M rows, so each K/V tile is loaded once for all of them.
Split-K: long token ranges are cut into `n_splits` programs whose partial (acc, max, sum) are
merged afterwards; the bridge tile is read by split 0 only.

Math, per query row r = (m, g) of sequence b, KV head h, query head h*G + g, logical qi = q_pos[b, m]:
    keys   = { token slot s : s < n_slots, logical(s) <= qi } ∪ { bridge j : j < bridge_len[b], P + j <= qi }
    out[r] = softmax(q_r · k^T * scale) · v   (fp32 accumulation)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import check_vector


@triton.jit
def _attend_tile(q, k, v, visible, scale, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax step over a key tile: fold softmax(q k^T * scale) v of the `visible`
    [BLOCK_M, n] keys into the running (max m_i, sum l_i, acc). Fully masked rows keep max -inf
    and add nothing (m_safe keeps exp() finite)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefix_attention_kernel(
    Q, KC, VC, KB, VB, OUT, PART_ACC, PART_ML,
    q_pos_ptr, prompt_len_ptr, bridge_len_ptr, seq_ptr,
    s_qb, s_qm, s_qh, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_bb, s_bh, s_bs, s_bd,
    s_wb, s_wh, s_ws, s_wd,
    s_ob, s_om, s_oh, s_od,
    s_pb, s_pm,
    M, n_slots, slots_per_split, scale,
    G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, KMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BR: tl.constexpr,
    HAS_BRIDGE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    c = b  # the cache row of query row b
    if HAS_SEQ:
        c = tl.load(seq_ptr + b).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_idx = rows // G
    qh = h * G + rows % G
    row_ok = m_idx < M
    qi = tl.load(q_pos_ptr + b * s_pb + m_idx * s_pm, mask=row_ok, other=-1).to(tl.int64)  # logical
    P = tl.load(prompt_len_ptr + b).to(tl.int64)
    if HAS_BRIDGE:
        kb = tl.load(bridge_len_ptr + b).to(tl.int64)
    else:
        kb = 0
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + m_idx[:, None] * s_qm + qh[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # Token slots of this split; a slot's logical index is >= the slot, so none beyond the
    # block's largest logical index can be visible.
    q_max = tl.max(qi, 0)
    lo = split * slots_per_split
    hi = tl.minimum(tl.minimum(lo + slots_per_split, n_slots), q_max + 1)
    for start in range(lo, hi, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        logical = slots + tl.where(slots >= P, kb, 0)
        # Only slots some query of the block sees are loaded: the kb slots after the newest
        # token hold what an earlier call left, and a NaN there would leak through p = 0 * NaN.
        valid = (slots < hi) & (logical <= q_max)
        k = tl.load(KC + c * s_kb + h * s_kh + slots[:, None] * s_ks + offs_d[None, :] * s_kd,
                    mask=valid[:, None], other=0.0)
        v = tl.load(VC + c * s_vb + h * s_vh + slots[:, None] * s_vs + offs_d[None, :] * s_vd,
                    mask=valid[:, None], other=0.0)
        visible = valid[None, :] & (logical[None, :] <= qi[:, None])
        m_i, l_i, acc = _attend_tile(q, k, v, visible, scale, m_i, l_i, acc, PRECISION)

    if HAS_BRIDGE:
        if split == 0:
            j = tl.arange(0, BLOCK_BR)
            valid = j < kb
            logical = P + j
            kbr = tl.load(KB + c * s_bb + h * s_bh + j[:, None] * s_bs + offs_d[None, :] * s_bd,
                          mask=valid[:, None], other=0.0)
            vbr = tl.load(VB + c * s_wb + h * s_wh + j[:, None] * s_ws + offs_d[None, :] * s_wd,
                          mask=valid[:, None], other=0.0)
            visible = valid[None, :] & (logical[None, :] <= qi[:, None])
            m_i, l_i, acc = _attend_tile(q, kbr, vbr, visible, scale, m_i, l_i, acc, PRECISION)

    if SPLIT:
        # Partials [B, Hq, M, n_splits, D] and [B, Hq, M, n_splits, 2] (max, sum), contiguous.
        n_splits = tl.num_programs(2)
        base = ((b * (HKV * G) + qh) * M + m_idx) * n_splits + split
        tl.store(PART_ACC + base[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(PART_ML + base * 2, m_i, mask=row_ok)
        tl.store(PART_ML + base * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(OUT + b * s_ob + m_idx[:, None] * s_om + qh[:, None] * s_oh + offs_d[None, :] * s_od,
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(PART_ACC, PART_ML, OUT, s_ob, s_om, s_oh, HQ, M, n_splits,
                         D: tl.constexpr, NS: tl.constexpr):
    """One (b, query head, row): combine the splits' (acc, max, sum) into the output row."""
    r = tl.program_id(0).to(tl.int64)  # ((b * HQ + qh) * M + m)
    m_idx = r % M
    qh = (r // M) % HQ
    b = r // (M * HQ)
    sp = tl.arange(0, NS)
    ok = sp < n_splits
    mx = tl.load(PART_ML + (r * n_splits + sp) * 2, mask=ok, other=float("-inf"))
    sm = tl.load(PART_ML + (r * n_splits + sp) * 2 + 1, mask=ok, other=0.0)
    top = tl.max(mx, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.where(ok, tl.exp(mx - top), 0.0)
    offs_d = tl.arange(0, D)
    acc = tl.load(PART_ACC + (r * n_splits + sp)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.maximum(tl.sum(sm * w, 0), 1e-30)
    tl.store(OUT + b * s_ob + m_idx * s_om + qh * s_oh + offs_d, (num / den).to(OUT.dtype.element_ty))


INT_TYPES = (torch.int32, torch.int64)


def _check(name, t, ndim, dtype, device):
    if t.dim() != ndim:
        raise ValueError(f"prefix_attention: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"prefix_attention: {name} dtype {t.dtype} != q dtype {dtype}")
    if t.device != device:
        raise ValueError(f"prefix_attention: {name} on {t.device}, q on {device}")


def _check_seq_idx(seq_idx, B: int, n_rows: int, device) -> None:
    """seq_idx [B] int on the device. Its values are not read here (no host sync): each must lie
    in [0, n_rows), the caller's contract, as for every index a kernel reads."""
    if seq_idx is None:
        return
    check_vector("prefix attention / rope_cache_write", "seq_idx", seq_idx, B, device, INT_TYPES)
    if n_rows < 1:
        raise ValueError("seq_idx given but the caches hold no rows")


# (BLOCK_N, num_warps). Key tiles of 32: at head size 128 the sm_90 builds of 64-key tiles spill
# registers — decode with a bridge 24 bytes per thread (triton 3.9) / 176 (triton 3.6, the GPU
# machine's), chunks 80-176 — while 32-key tiles spill nothing with either (tests/
# test_triton_compile.py prints the compiler's report; benchmarks/NOTES.md has the table).
# Chosen from that report before any timing: bench_prefix_attention.py times (64, 4) beside it.
DEFAULT_CONFIG = (32, 4)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_splits(n_programs: int, n_slots: int, device: torch.device) -> int:
    """Split the key range only when the grid would leave the GPU's SMs idle."""
    if device.type != "cuda":
        return 1
    return splits_for(n_programs, n_slots, _sm_count(device.index if device.index is not None
                                                      else torch.cuda.current_device()))


def splits_for(n_programs: int, n_slots: int, sms: int) -> int:
    """default_splits on a GPU of `sms` SMs: about two programs per SM, at least 256 keys each."""
    if n_slots <= 512 or n_programs >= sms:
        return 1
    return int(max(1, min(triton.cdiv(2 * sms, n_programs), triton.cdiv(n_slots, 256), 64)))


def prefix_attention(
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
    n_splits: int | None = None,
    seq_idx: torch.Tensor | None = None,
    *,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Triton prefix attention; same arguments and result as `prefix_attention_ref`.

    q [B, M, Hq, D]; k_cache, v_cache [B, Hkv, S, D]; k_bridge, v_bridge [B, Hkv, Kmax, D] or
    None; q_pos [B, M] int (logical index per query row); prompt_len, bridge_len [B] int.
    Any strides; D a power of two >= 16.
    n_slots: token slots that may be read (default S). n_splits: split-K (default: heuristic).
    seq_idx [B] int or None: query row b reads cache row seq_idx[b] (the caches may then hold
    any number of rows): a compacted sub-batch attends in place, without gathering caches.
    Returns a new [B, M, Hq, D] tensor in q's dtype.
    config: (BLOCK_N, num_warps) instead of DEFAULT_CONFIG — for benchmarks only.
    """
    if q.dim() != 4:
        raise ValueError(f"prefix_attention: q must be [B, M, Hq, D], got {tuple(q.shape)}")
    B, M, Hq, D = q.shape
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # only the interpreter runs Triton on CPU
        from . import interpreter_problem

        raise ValueError(f"prefix_attention: {interpreter_problem(q.dtype)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(name, t, 4, q.dtype, q.device)
    _check_seq_idx(seq_idx, B, k_cache.shape[0], q.device)
    rows = B if seq_idx is None else k_cache.shape[0]
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != rows or k_cache.shape[3] != D:
        raise ValueError(f"prefix_attention: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"prefix_attention: {Hq} query heads not a multiple of {Hkv} KV heads")
    if D < 16 or D & (D - 1):
        raise ValueError(f"prefix_attention: head_dim {D} must be a power of two >= 16")
    if tuple(q_pos.shape) != (B, M) or q_pos.dtype not in INT_TYPES or q_pos.device != q.device:
        raise ValueError(f"prefix_attention: q_pos must be an int tensor [{B}, {M}] on {q.device}, "
                         f"got {q_pos.dtype} {tuple(q_pos.shape)} on {q_pos.device}")
    for name, t in (("prompt_len", prompt_len), ("bridge_len", bridge_len)):
        check_vector("prefix_attention", name, t, B, q.device, INT_TYPES)
    has_bridge = k_bridge is not None
    if has_bridge:
        for name, t in (("k_bridge", k_bridge), ("v_bridge", v_bridge)):
            _check(name, t, 4, q.dtype, q.device)
        if k_bridge.shape != v_bridge.shape or k_bridge.shape[:2] != (rows, Hkv) or k_bridge.shape[3] != D:
            raise ValueError(f"prefix_attention: bridge {tuple(k_bridge.shape)} does not fit [B, Hkv, Kmax, D]")
        kmax = k_bridge.shape[2]
    else:
        k_bridge = v_bridge = k_cache  # never read
        kmax = 1
    n_slots = S if n_slots is None else min(int(n_slots), S)
    G = Hq // Hkv
    block_m = 16 if M * G <= 16 else 64
    grid_m = triton.cdiv(M * G, block_m)
    if n_splits is None:
        n_splits = default_splits(B * Hkv * grid_m, n_slots, q.device)
    n_splits = max(1, min(int(n_splits), n_slots))
    per_split = triton.cdiv(n_slots, n_splits)
    out = torch.empty((B, M, Hq, D), dtype=q.dtype, device=q.device)
    split = n_splits > 1
    if split:
        part_acc = torch.empty((B, Hq, M, n_splits, D), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((B, Hq, M, n_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    grid = (B * Hkv, grid_m, n_splits)
    block_n, num_warps = config or DEFAULT_CONFIG
    if block_n < 16 or block_n & (block_n - 1) or num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"prefix_attention: config {config} must be (BLOCK_N a power of two >= 16, num_warps)")
    _prefix_attention_kernel[grid](
        q, k_cache, v_cache, k_bridge, v_bridge, out, part_acc, part_ml,
        q_pos, prompt_len, bridge_len, q_pos if seq_idx is None else seq_idx,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_bridge.stride(), *v_bridge.stride(), *out.stride(),
        *q_pos.stride(),
        M, n_slots, per_split, float(scale),
        G=G, HKV=Hkv, D=D, KMAX=kmax, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_BR=max(16, triton.next_power_of_2(kmax)), HAS_BRIDGE=has_bridge, SPLIT=split, HAS_SEQ=seq_idx is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    if split:
        _merge_splits_kernel[(B * Hq * M,)](part_acc, part_ml, out, out.stride(0), out.stride(1), out.stride(2),
                                            Hq, M, n_splits, D=D, NS=max(2, triton.next_power_of_2(n_splits)),
                                            num_warps=1 if D <= 64 else 2)
    return out
