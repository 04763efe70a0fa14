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
) -> torch.Tensor:
    """Attention of queries over [token cache ; bridge buffer] in the logical order above.

    q: [B, M, Hq, D]; q_pos: [B, M] int, the logical index of each query row (rows need not be
        contiguous: a refresh chunk is [bridge rows ; a window of response rows]).
    k_cache, v_cache: [B, Hkv, S, D] (slots >= n_slots are never read).
    prompt_len, bridge_len: [B] int (bridge_len in 0..Kmax; ignored without a bridge).
    k_bridge, v_bridge: [B, Hkv, Kmax, D] or None.
    compute_dtype: dtype of the two matmuls (fp32 default; a low-precision run gives the error
        yardstick for kernels); the softmax is always fp32.
    Returns [B, M, Hq, D] in q's dtype.
    """
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
    Hkv = keys.shape[1]
    keys = keys.repeat_interleave(Hq // Hkv, dim=1).to(compute_dtype)
    vals = vals.repeat_interleave(Hq // Hkv, dim=1).to(compute_dtype)
    scores = torch.einsum("bmhd,bhnd->bhmn", q.to(compute_dtype), keys).float() * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(compute_dtype)
    out = torch.einsum("bhmn,bhnd->bmhd", probs, vals)
    return out.to(q.dtype)


def logical_to_storage(logical: torch.Tensor, prompt_len: torch.Tensor, bridge_len: torch.Tensor):
    """Where a row of logical index `logical` [B, M] lives: (is_bridge [B, M], index [B, M]) —
    a bridge-buffer index when is_bridge, else a token-cache slot."""
    P, kb = prompt_len[:, None], bridge_len[:, None]
    is_bridge = (logical >= P) & (logical < P + kb)
    index = torch.where(logical < P, logical, torch.where(is_bridge, logical - P, logical - kb))
    return is_bridge, index
