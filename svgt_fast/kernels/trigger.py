"""Sparse value-module trigger (Triton, one launch): per sequence, the risk signal and the
periodic schedule -> a trigger mask and a compacted list of triggered rows with its count, all on
the device (DESIGN §2, sparse triggering). Reference: `trigger_ref` in kernels/reference.py.

Per row b, at decode step t (a 0-d device tensor):
    score[b] = w2 · GELU(W1 z[b] + b1) + b2          the discriminator on the value state z
    drift[b] = 1 - cos(h[b], h_ref[b])                how far the trigger state moved since the
                                                      row's last refresh (0 when either is zero;
                                                      summed without cancellation: see
                                                      steering.trigger_drift)
    due[b]   = interval[b] > 0 and t % interval[b] == 0
    fire[b]  = due[b] and (policy[b] == ALWAYS or score[b] > score_thr[b] or drift[b] > drift_thr[b])
Outputs: mask [B] int32 (fire), rows [B] int32 (the fired row ids in increasing order, then -1),
count [1] int32, score [B] and drift [B] float32. interval 0 = the row is not steered.

One program sees the whole batch (B <= 256), so the compaction is a prefix sum in registers: no
atomics, a deterministic order, and nothing to read back on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_vector

ALWAYS, SPARSE = 0, 1
MAX_BATCH = 256


@triton.jit
def _trigger_kernel(Z, H, HREF, W1, B1, W2, B2, T, INTERVAL, POLICY, STHR, DTHR,
                    MASK, ROWS, COUNT, SCORE, DRIFT,
                    B, DV, DH, D, s_z, s_h, s_r,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    rb = tl.arange(0, BLOCK_B)
    row_ok = rb < B
    # discriminator: hidden units in blocks of BLOCK_H, the value dim in blocks of BLOCK_K
    score = tl.zeros([BLOCK_B], tl.float32)
    for h0 in range(0, DH, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < DH
        u = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
        for k0 in range(0, DV, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < DV
            z = tl.load(Z + rb[:, None] * s_z + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W1 + hh[None, :] * DV + kk[:, None], mask=h_ok[None, :] & k_ok[:, None], other=0.0)
            u += tl.dot(z.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        u += tl.load(B1 + hh, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        gelu = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
        w2 = tl.load(W2 + hh, mask=h_ok, other=0.0).to(tl.float32)
        score += tl.sum(gelu * w2[None, :], 1)
    score += tl.load(B2).to(tl.float32)
    # drift of the trigger state
    # 1 - cos as (|h - r|^2 - (|h| - |r|)^2) / (2 |h| |r|) (steering.trigger_drift: no
    # cancellation, exactly 0 for an unmoved state); the same three sums as h.r, |h|^2, |r|^2
    diff = tl.zeros([BLOCK_B], tl.float32)
    nh = tl.zeros([BLOCK_B], tl.float32)
    nr = tl.zeros([BLOCK_B], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (dd < D)[None, :]
        h = tl.load(H + rb[:, None] * s_h + dd[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.load(HREF + rb[:, None] * s_r + dd[None, :], mask=m, other=0.0).to(tl.float32)
        diff += tl.sum((h - r) * (h - r), 1)
        nh += tl.sum(h * h, 1)
        nr += tl.sum(r * r, 1)
    nh, nr = tl.sqrt(nh), tl.sqrt(nr)
    denom = 2.0 * nh * nr
    drift = (diff - (nh - nr) * (nh - nr)) / tl.where(denom > 0.0, denom, 1.0)
    drift = tl.where(denom > 0.0, tl.maximum(drift, 0.0), 0.0)
    # schedule and policy
    t = tl.load(T).to(tl.int64)
    interval = tl.load(INTERVAL + rb, mask=row_ok, other=0).to(tl.int64)
    policy = tl.load(POLICY + rb, mask=row_ok, other=0)
    due = (interval > 0) & (t % tl.where(interval > 0, interval, 1) == 0)
    risky = (score > tl.load(STHR + rb, mask=row_ok, other=0.0)) | (drift > tl.load(DTHR + rb, mask=row_ok, other=0.0))
    fire = row_ok & due & ((policy == 0) | risky)
    f = fire.to(tl.int32)
    pos = tl.cumsum(f, 0) - f  # exclusive prefix sum: each fired row's place in the list
    n = tl.sum(f, 0)
    tl.store(MASK + rb, f, mask=row_ok)
    # fired rows fill places 0..n-1 in order; the others fill n.. with -1 (disjoint places)
    tl.store(ROWS + tl.where(fire, pos, n + rb - pos), tl.where(fire, rb, -1).to(tl.int32), mask=row_ok)
    tl.store(COUNT, n)
    tl.store(SCORE + rb, score, mask=row_ok)
    tl.store(DRIFT + rb, drift, mask=row_ok)


def launch_config(B: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for a batch of B rows. One program reads every row's h and h_ref, so
    its tile is [BLOCK_B, BLOCK_D] twice in fp32: at BLOCK_B 64, BLOCK_D 128 and 4 warps the sm_90
    build spills 1640 bytes per thread (tests/test_triton_compile.py prints registers and
    spills); BLOCK_D 32 with 8 warps needs 103 registers and no spill. Up to 16 rows the wide
    tile fits (159 registers, no spill). Chosen from the compiler's resource report; the timing
    is benchmarks/bench_trigger.py's (it also times the previous choice)."""
    return (128, 4) if B <= 16 else (32, 8)


def trigger(z, h, h_ref, w1, b1, w2, b2, t, interval, policy, score_thr, drift_thr, *, config=None):
    """See the module docstring. z [B, dv]; h, h_ref [B, d]; the discriminator's
    w1 [dv/2, dv], b1 [dv/2], w2 [dv/2] (or [1, dv/2]), b2 [1]; t 0-d int tensor; interval [B]
    int; policy [B] int (ALWAYS / SPARSE); score_thr, drift_thr [B] float32.
    Returns (mask [B] int32, rows [B] int32, count [1] int32, score [B], drift [B]).
    config: (BLOCK_D, num_warps) instead of launch_config(B) — for benchmarks only."""
    B, DV = z.shape
    D = h.shape[1]
    w2 = w2.reshape(-1)
    DH = w1.shape[0]
    if not 1 <= B <= MAX_BATCH:
        raise ValueError(f"trigger: batch {B} outside 1..{MAX_BATCH}")
    if h.shape != (B, D) or h_ref.shape != (B, D) or w1.shape != (DH, DV) or b1.shape != (DH,) or w2.shape != (DH,):
        raise ValueError(f"trigger: shapes z {tuple(z.shape)} h {tuple(h.shape)} h_ref {tuple(h_ref.shape)} "
                         f"w1 {tuple(w1.shape)} b1 {tuple(b1.shape)} w2 {tuple(w2.shape)} do not fit")
    for name, x in (("interval", interval), ("policy", policy), ("score_thr", score_thr), ("drift_thr", drift_thr)):
        check_vector("trigger", name, x, B, z.device)
    for name, x, n in (("b1", b1, DH), ("w2", w2, DH), ("b2", b2.reshape(-1), 1)):
        check_vector("trigger", name, x, n, z.device)
    if DH > 1 and w1.stride(0) != DV:  # read as a row-major [DH, DV] array
        raise ValueError(f"trigger: w1 must be row-major contiguous, got strides {w1.stride()}")
    if t.numel() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise ValueError("trigger: t must be a 0-d int tensor (the step, on the device)")
    for name, x in (("z", z), ("h", h), ("h_ref", h_ref), ("w1", w1)):
        if x.stride(-1) != 1:
            raise ValueError(f"trigger: {name} must have a contiguous last dim")
    block_d, num_warps = config or launch_config(B)
    dev = z.device
    mask = torch.empty(B, dtype=torch.int32, device=dev)
    rows = torch.empty(B, dtype=torch.int32, device=dev)
    count = torch.empty(1, dtype=torch.int32, device=dev)
    score = torch.empty(B, dtype=torch.float32, device=dev)
    drift = torch.empty(B, dtype=torch.float32, device=dev)
    _trigger_kernel[(1,)](
        z, h, h_ref, w1, b1, w2, b2, t, interval, policy, score_thr, drift_thr,
        mask, rows, count, score, drift,
        B, DV, DH, D, z.stride(0), h.stride(0), h_ref.stride(0),
        BLOCK_B=max(16, triton.next_power_of_2(B)), BLOCK_K=16, BLOCK_H=16, BLOCK_D=block_d, num_warps=num_warps)
    return mask, rows, count, score, drift
