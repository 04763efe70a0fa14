"""Eager references of the approximate refresh modes (window=W, bridge, project) — and of
"exact" again — written on the HF decoder layers with an *inline* KV layout.

Unlike the engine (own forward, bridge in a separate buffer), this keeps one cache per layer
laid out as the sequence itself: lower layers [prompt | response], upper layers
[prompt | bridge | response], so a row's cache index is its RoPE position. Every operation is
"write these rows at these indices, then attend to every index <= the row's own": a decode
step, the prefill, a bridge re-computation (indices P..P+K-1) and a window re-computation (the
bridge plus the last W response indices; the response entries between stay stale).
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch

from .backbone import backbone_parts
from .sampling import NONFINITE, SamplingParams, sample_next
from .steering import SVGT, ema, trigger_drift


class _InlineCache:
    """Duck-typed HF cache: `update` writes the chunk's K/V at `self.index` and returns the
    layer's cache up to the chunk's last index."""

    def __init__(self):
        self.k, self.v, self.index = {}, {}, None

    def update(self, k, v, layer_idx, *args, **kwargs):
        idx = self.index
        end = int(idx.max()) + 1
        if layer_idx not in self.k:
            self.k[layer_idx] = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
            self.v[layer_idx] = v.new_zeros(v.shape[0], v.shape[1], 0, v.shape[3])
        ck, cv = self.k[layer_idx], self.v[layer_idx]
        if ck.shape[2] < end:
            pad = end - ck.shape[2]
            ck = torch.cat([ck, ck.new_zeros(*ck.shape[:2], pad, ck.shape[3])], dim=2)
            cv = torch.cat([cv, cv.new_zeros(*cv.shape[:2], pad, cv.shape[3])], dim=2)
        ck[:, :, idx], cv[:, :, idx] = k, v
        self.k[layer_idx], self.v[layer_idx] = ck, cv
        return ck[:, :, :end], cv[:, :, :end]


@functools.lru_cache(maxsize=None)
def _cache_kwarg(layer_cls) -> str:
    """A decoder layer class's name for its KV cache argument: `cache` in recent transformers
    (5.24), where `past_key_values` is deprecated (removal announced for 5.40); `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(layer_cls.forward).parameters else "past_key_values"


def _run(model, cache: _InlineCache, x: torch.Tensor, idx: torch.Tensor, layer_ids) -> torch.Tensor:
    """Rows x [M, d] at cache indices / positions idx [M] through the listed HF decoder layers."""
    inner, layers, _ = backbone_parts(model)
    cache.index = idx
    end = int(idx.max()) + 1
    rope = inner.rotary_emb(x[None], position_ids=idx[None])
    visible = torch.arange(end, device=x.device)[None] <= idx[:, None]
    mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, torch.finfo(x.dtype).min)
    h = x[None]
    for i in layer_ids:
        h = layers[i](h, attention_mask=mask[None, None], position_ids=idx[None], use_cache=True,
                      position_embeddings=rope, **{_cache_kwarg(type(layers[i])): cache})
        if isinstance(h, tuple):
            h = h[0]
    return h[0]


def _project(model, cache: _InlineCache, bridge: torch.Tensor, P: int, layer_ids) -> None:
    """The authors' shortcut: k_proj / v_proj of the raw bridge, keys rotated at P..P+K-1."""
    inner, layers, _ = backbone_parts(model)
    K = bridge.shape[0]
    idx = torch.arange(P, P + K, device=bridge.device)
    cos, sin = inner.rotary_emb(bridge[None], position_ids=idx[None])
    for i in layer_ids:
        att = layers[i].self_attn
        rope = sys.modules[type(att).__module__].apply_rotary_pos_emb
        k = att.k_proj(bridge).view(1, K, -1, att.head_dim).transpose(1, 2)
        v = att.v_proj(bridge).view(1, K, -1, att.head_dim).transpose(1, 2)
        k, _ = rope(k, k, cos, sin)
        cache.k[i][:, :, idx], cache.v[i][:, :, idx] = k, v


def _open_bridge(cache: _InlineCache, P: int, K: int) -> None:
    """Sparse policy, first firing: make room for the bridge at P..P+K-1 — the response entries
    move K places on, their keys keep the rotation they were written with."""
    for i in cache.k:
        ck, cv = cache.k[i], cache.v[i]
        gap = ck.new_zeros(*ck.shape[:2], K, ck.shape[3])
        cache.k[i] = torch.cat([ck[:, :, :P], gap, ck[:, :, P:]], dim=2)
        cache.v[i] = torch.cat([cv[:, :, :P], gap.clone(), cv[:, :, P:]], dim=2)


@torch.no_grad()
def generate_row_cached(model, prompt: torch.Tensor, *, steering: SVGT, max_new_tokens: int,
                        sampling: SamplingParams, row_seed: int, eos_ids: frozenset[int],
                        trace: list | None = None, stats: dict | None = None) -> list[int]:
    """One unpadded prompt [P] under `steering.refresh` and `steering.policy`; returns the new
    token ids (stats["triggers"]: how many times the value module fired, the prompt included)."""
    inner, layers, lm_head = backbone_parts(model)
    L, e, K = len(layers), steering.module.config.extract_layer, steering.n_tokens
    mode, window = steering.refresh_spec
    dev = prompt.device
    seeds = torch.tensor([row_seed], dtype=torch.int64, device=dev)
    lower, upper = _InlineCache(), _InlineCache()
    P = prompt.shape[0]
    ar = lambda a, b: torch.arange(a, b, device=dev)

    h_prompt = _run(model, lower, inner.embed_tokens(prompt), ar(0, P), range(e + 1))
    h_ref = h_prompt[P - 1]
    bridge, score = steering.bridge_and_score(h_ref[None])
    bridge = bridge[0]
    gate = bool(steering.fires(score, torch.zeros_like(score))[0])  # bridge on for this row?
    fired = int(gate)
    if gate:
        y = _run(model, upper, torch.cat([h_prompt, bridge.to(h_prompt.dtype)]), ar(0, P + K), range(e + 1, L))
    else:
        y = _run(model, upper, h_prompt, ar(0, P), range(e + 1, L))
    h_resp: list[torch.Tensor] = []
    new: list[int] = []
    for t in range(max_new_tokens):
        if t > 0:
            tok = torch.tensor([new[-1]], device=dev)
            h = _run(model, lower, inner.embed_tokens(tok), ar(P + t - 1, P + t), range(e + 1))[0]
            h_resp.append(h)
            fire = False
            if t % steering.refresh_interval == 0:
                h_t = h if steering.trigger == "current" else h_prompt[P - 1]
                fresh, score = steering.bridge_and_score(h_t[None])
                fire = bool(steering.fires(score, trigger_drift(h_t[None], h_ref[None]))[0])
            Kg = K if (gate or fire) else 0
            rows, idx = h[None], ar(P + Kg + t - 1, P + Kg + t)
            if fire:
                fired += 1
                h_ref = h_t
                bridge = ema(bridge, fresh[0], steering.beta) if gate else fresh[0]
                if not gate:
                    _open_bridge(upper, P, K)
                    gate = True
                b = bridge.to(h.dtype)
                if mode == "project":
                    _project(model, upper, b, P, range(e + 1, L))
                else:
                    j0 = 0 if mode == "exact" else max(0, t - 1 - window)
                    rows = torch.cat([b, torch.stack(h_resp[j0:])])
                    idx = torch.cat([ar(P, P + K), ar(P + K + j0, P + K + t)])
            y = _run(model, upper, rows, idx, range(e + 1, L))
        logits = lm_head(inner.norm(y[-1]))
        if trace is not None:
            trace.append(logits.float().clone())
        nxt = int(sample_next(logits[None], sampling, seeds, t)[0])
        if nxt == NONFINITE:  # the row stops here, without a token
            break
        new.append(nxt)
        if nxt in eos_ids:
            break
    if stats is not None:
        stats["triggers"] = fired
    return new
