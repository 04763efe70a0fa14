"""The fast engine: our own forward over a static KV cache, with SVGT bridge tokens in a
separate bridge buffer and refresh="exact" re-running only the upper stack.

Storage (allocated once):
  token cache  k/v [L, max_batch, Hkv, S + 1, D]   slots 0..S-1 = [prompt | response]; slot S is
                                                  a dump for padding rows (no host sync to skip them)
  bridge buffer k/v [L, max_batch, Hkv, Kmax + 1, D] (index Kmax is the dump)
  hidden cache [max_batch, S + 1, d]              extract-layer states of every token (SVGT)
The attention layout and the logical/RoPE positions are those of kernels/reference.py.
"""
from __future__ import annotations

import time

import torch

from .backbone import backbone_info, model_device_dtype
from .fast_model import (ModelWeights, apply_rope, attention_output_and_mlp, logits_from_hidden,
                         qkv_projection)
from .kernels.reference import logical_to_storage, prefix_attention_ref
from .sampling import SamplingParams, sample_next
from .steering import SVGT, ema

ATTENTION_BACKENDS = ("auto", "torch", "triton")


class Engine:
    """Owns the caches of one backbone; reusable across `generate` calls.

    model: a HF causal LM (Llama/Mistral/Qwen2/Qwen3 family); its q/k/v and gate/up weights are
        fused in place (the HF modules keep working on views of them).
    max_batch, max_seq_len: cache sizes (max_seq_len counts real tokens: prompt + new tokens).
    max_bridge_tokens: the largest K of any SVGT module used with this engine.
    attention: "torch" (PyTorch reference path), "triton" (our kernels), "auto" (triton on CUDA).
    """

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                 max_bridge_tokens: int = 16, attention: str = "auto"):
        self.info = backbone_info(model)
        device, mdtype = model_device_dtype(model)
        if dtype is not None and dtype != mdtype:
            raise ValueError(f"engine dtype {dtype} differs from the model's {mdtype}: call model.to({dtype}) first")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        if attention == "auto":
            attention = "triton" if device.type == "cuda" else "torch"
        max_seq_len = self.info.max_positions if max_seq_len is None else int(max_seq_len)
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
        if not 1 <= max_bridge_tokens <= 16:
            raise ValueError(f"max_bridge_tokens must lie in 1..16, got {max_bridge_tokens}")
        self.model = model
        self.device, self.dtype = device, mdtype
        self.attention = attention
        self.max_batch, self.max_seq_len, self.kmax = int(max_batch), max_seq_len, int(max_bridge_tokens)
        with torch.no_grad():
            self.w = ModelWeights.from_hf(model)
            n_pos = max_seq_len + self.kmax + 1
            self.cos, self.sin = self.w.rope_tables(n_pos, device, mdtype)
        L, Hkv, D = len(self.w.layers), self.w.n_kv_heads, self.w.head_dim
        try:
            self.k_cache = torch.zeros(L, max_batch, Hkv, max_seq_len + 1, D, device=device, dtype=mdtype)
            self.v_cache = torch.zeros_like(self.k_cache)
            self.k_bridge = torch.zeros(L, max_batch, Hkv, self.kmax + 1, D, device=device, dtype=mdtype)
            self.v_bridge = torch.zeros_like(self.k_bridge)
        except torch.OutOfMemoryError:
            raise MemoryError(
                f"KV cache for max_batch={max_batch}, max_seq_len={max_seq_len} does not fit on {device}; "
                f"lower max_batch or max_seq_len") from None
        self.hidden = None  # allocated on first steered call

    # ------------------------------------------------------------------------------------------
    def _attend(self, layer: int, q, q_start, prompt_len, bridge_len, use_bridge: bool, n_slots: int):
        B = q.shape[0]
        kb, vb = (self.k_bridge[layer, :B], self.v_bridge[layer, :B]) if use_bridge else (None, None)
        kc, vc = self.k_cache[layer, :B], self.v_cache[layer, :B]
        if self.attention == "triton":
            from .kernels.prefix_attention import prefix_attention

            return prefix_attention(q, kc, vc, q_start, prompt_len, bridge_len, kb, vb, self.w.scale, n_slots)
        return prefix_attention_ref(q, kc, vc, q_start, prompt_len, bridge_len, kb, vb, self.w.scale, n_slots)

    def _layer(self, i: int, x, q_start, prompt_len, bridge_len, use_bridge: bool, n_slots: int):
        """One decoder layer over a chunk x [B, M, d] whose row r has logical index q_start + r."""
        w = self.w.layers[i]
        B, M, _ = x.shape
        q, k, v = qkv_projection(w, self.w, x)
        logical = q_start[:, None] + torch.arange(M, device=x.device)[None]
        pos = logical.clamp(max=self.cos.shape[0] - 1)  # padding rows may run past the table
        cos, sin = self.cos[pos], self.sin[pos]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kb = bridge_len if use_bridge else torch.zeros_like(bridge_len)
        is_bridge, index = logical_to_storage(logical, prompt_len, kb)
        S = self.max_seq_len
        tok_slot = torch.where(~is_bridge & (index < S), index, S)
        br_slot = torch.where(is_bridge, index, self.kmax)
        rows = torch.arange(B, device=x.device)[:, None].expand(B, M)
        self.k_cache[i][rows, :, tok_slot] = k
        self.v_cache[i][rows, :, tok_slot] = v
        if use_bridge:
            self.k_bridge[i][rows, :, br_slot] = k
            self.v_bridge[i][rows, :, br_slot] = v
        attn = self._attend(i, q, q_start, prompt_len, kb, use_bridge, n_slots)
        return attention_output_and_mlp(w, x, attn.reshape(B, M, -1))

    def _layers(self, x, layer_ids, q_start, prompt_len, bridge_len, use_bridge, n_slots):
        for i in layer_ids:
            x = self._layer(i, x, q_start, prompt_len, bridge_len, use_bridge, n_slots)
        return x

    # ------------------------------------------------------------------------------------------
    def check_request(self, prompts: list[torch.Tensor], max_new_tokens: int, steering: SVGT | None) -> None:
        if len(prompts) > self.max_batch:
            raise ValueError(f"batch of {len(prompts)} exceeds the engine's max_batch={self.max_batch}")
        longest = max(p.shape[0] for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the engine's "
                f"max_seq_len={self.max_seq_len}")
        if steering is not None:
            if steering.n_tokens > self.kmax:
                raise ValueError(f"K={steering.n_tokens} bridge tokens exceed max_bridge_tokens={self.kmax}")
            steering.module.check_backbone(self.model)

    @torch.no_grad()
    def generate(self, prompts: list[torch.Tensor], *, steering: SVGT | None, max_new_tokens: int,
                 sampling: SamplingParams, row_seeds: torch.Tensor, eos_ids: frozenset[int], pad_id: int):
        """Generate for unpadded prompts (list of [P_b] tensors). Returns (new_tokens [B, N] with
        pad after EOS, counts [B], timings dict)."""
        self.check_request(prompts, max_new_tokens, steering)
        B, dev = len(prompts), self.device
        if max_new_tokens == 0:
            return torch.empty((B, 0), dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.long), {}
        P = torch.tensor([p.shape[0] for p in prompts], device=dev)
        p_max = int(P.max())
        ids = torch.zeros((B, p_max), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : p.shape[0]] = p.to(dev)
        seeds = row_seeds.to(dev)
        eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev)
        L = len(self.w.layers)
        steer = steering is not None
        K = steering.n_tokens if steer else 0
        e = steering.module.config.extract_layer if steer else L - 1
        bridge_len = torch.full((B,), K, dtype=torch.long, device=dev)
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        batch = torch.arange(B, device=dev)
        if steer and self.hidden is None:
            self.hidden = torch.zeros(self.max_batch, self.max_seq_len + 1, self.w.hidden_size, device=dev, dtype=self.dtype)
        timings = {"prefill_s": 0.0, "decode_s": 0.0, "refresh_steps": 0}

        # ---- prefill ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        x = self.w.embed[ids]
        x = self._layers(x, range(e + 1), zeros, P, bridge_len, False, p_max)
        bridge = None
        if steer:
            self.hidden[:B, :p_max] = x
            bridge = steering.bridge(x[batch, P - 1])  # [B, K, d], module dtype
            x = self._assemble_upper(x, bridge, P, K)
            x = self._layers(x, range(e + 1, L), zeros, P, bridge_len, True, p_max)
        last = P - 1 + K
        tok = sample_next(logits_from_hidden(self.w, x[batch, last]), sampling, seeds, 0)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out[:, 0] = tok
        done |= torch.isin(tok, eos)
        timings["prefill_s"] = time.perf_counter() - t0

        # ---- decode ----------------------------------------------------------------------------
        t0 = time.perf_counter()
        for t in range(1, max_new_tokens):
            if t % 8 == 0 and bool(done.all()):  # one host sync every 8 steps to stop early
                break
            slot = P + t - 1  # the input token is response token t-1
            x = self.w.embed[tok][:, None]
            x = self._layers(x, range(e + 1), slot, P, bridge_len, False, p_max + t)
            if steer:
                self.hidden[batch, slot] = x[:, 0]
                if t % steering.refresh_interval == 0:
                    h_t = x[:, 0] if steering.trigger == "current" else self.hidden[batch, P - 1]
                    bridge = ema(bridge, steering.bridge(h_t), steering.beta)
                    resp = self.hidden[batch[:, None], P[:, None] + torch.arange(t, device=dev)[None]]
                    x = torch.cat([bridge.to(self.dtype), resp], dim=1)  # rows P .. P+K+t-1
                    q_start = P
                    timings["refresh_steps"] += 1
                else:
                    q_start = slot + K
                x = self._layers(x, range(e + 1, L), q_start, P, bridge_len, True, p_max + t)
            tok = sample_next(logits_from_hidden(self.w, x[:, -1]), sampling, seeds, t)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out[:, t] = tok
            done |= torch.isin(tok, eos)
        timings["decode_s"] = time.perf_counter() - t0

        counts = self._counts(out, eos, pad_id)
        width = int(counts.max())
        return out[:, :width], counts, timings

    def _assemble_upper(self, x, bridge, P, K):
        """[B, Pmax, d] prompt states + [B, K, d] bridge -> [B, Pmax + K, d] rows [prompt_b ; bridge_b ; 0]."""
        B, p_max, d = x.shape
        r = torch.arange(p_max + K, device=x.device)[None]
        Pc = P[:, None]
        from_prompt = r < Pc
        from_bridge = (r >= Pc) & (r < Pc + K)
        prompt_rows = x.gather(1, r.clamp(max=p_max - 1).expand(B, -1)[..., None].expand(-1, -1, d))
        bridge_rows = bridge.to(x.dtype).gather(1, (r - Pc).clamp(0, K - 1)[..., None].expand(-1, -1, d))
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(from_prompt[..., None], prompt_rows, torch.where(from_bridge[..., None], bridge_rows, zero))

    @staticmethod
    def _counts(out, eos, pad_id):
        """Tokens each row produced, its first EOS included."""
        is_eos = torch.isin(out, eos)
        n = out.shape[1]
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(out[:, 0], n))
        return first.cpu()
