"""Small attention building blocks of the value module, written out so every op is visible.

The parameter layout equals torch.nn.MultiheadAttention / nn.TransformerEncoderLayer
(`in_proj_weight` packs q, k, v rows), so checkpoints trained with those load unchanged; the
math is ours so it can later be fused and captured without PyTorch's fast-path detours.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention. query [B, Tq, d], context [B, Tk, d] -> [B, Tq, d].

    mask (optional, training only): bool [B or 1, Tq, Tk], True where a query may
    attend to a key (key padding, causal order). Inference never passes one."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"attention width {dim} is not divisible by {n_heads} heads")
        self.dim, self.n_heads = dim, n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if context.shape[1] == 1 and mask is None:
            # One key: the softmax is exactly 1, so attention is out_proj(v_proj(context)) for
            # every query — the value head's common case (a 1-token trigger) skips q and k.
            d = self.dim
            v = F.linear(context, self.in_proj_weight[2 * d:], self.in_proj_bias[2 * d:])
            return self.out_proj(v).expand(-1, query.shape[1], -1)
        d, h = self.dim, self.n_heads
        w_q, w_k, w_v = self.in_proj_weight.split(d)
        b_q, b_k, b_v = self.in_proj_bias.split(d)
        B, Tq, Tk = query.shape[0], query.shape[1], context.shape[1]
        q = F.linear(query, w_q, b_q).view(B, Tq, h, d // h).transpose(1, 2)
        k = F.linear(context, w_k, b_k).view(B, Tk, h, d // h).transpose(1, 2)
        v = F.linear(context, w_v, b_v).view(B, Tk, h, d // h).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
        att = torch.softmax(scores, dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(B, Tq, d))


class EncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer (self-attention, GELU FFN of 4*d), eval semantics."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, n_heads)
        self.linear1 = nn.Linear(dim, ffn_dim or 4 * dim)
        self.linear2 = nn.Linear(ffn_dim or 4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim]; mask as in MultiHeadAttention (None: every position sees every one)."""
        x = self.norm1(x + self.self_attn(x, x, mask))
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))
