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
import torch.nn.functional as F

from . import validate
from .backbone import backbone_info, check_fast_path
from .guard import CallGuard, out_of_memory
from .streaming import Clock, TokenFeed, run_to_end
from .fast_model import (ModelWeights, apply_rope, attention_output_and_mlp,
                         qkv_projection)
from .kernels.reference import conva_edit_ref, logical_to_storage, prefix_attention_ref, rms_norm_ref, silu_mul_ref
from .sampling import NONFINITE, SamplingParams, sample_next
from .plan import SteeringPlan
from .refresh import RefreshSteps, Segment, _segment_rows

ATTENTION_BACKENDS = ("auto", "torch", "triton")


def _neuron_edit(act, a, c, on):
    """NeVA's act <- act * a + c (fp32, rounded once) on the rows marked on ([..., I] rows)."""
    flat = act.reshape(-1, act.shape[-1])
    return torch.where(on[:, None], (flat.float() * a + c).to(act.dtype), flat).view(act.shape)


class Engine(RefreshSteps):
    """Owns the caches of one backbone; reusable across `generate` calls.

    model: a HF causal LM (Llama/Mistral/Qwen2/Qwen3 family); its q/k/v and gate/up weights are
        fused in place (the HF modules keep working on views of them).
    max_batch, max_seq_len: cache sizes (max_seq_len counts real tokens: prompt + new tokens).
    max_bridge_tokens: the largest K of any SVGT module used with this engine.
    attention: "torch" (PyTorch reference path), "triton" (our kernels), "auto" (triton on CUDA).
    cuda_graphs: capture the decode step per batch bucket on CUDA (ignored on CPU).
    prefill_tokens: prefill runs in chunks of about this many tokens (over the whole batch).
    max_graphs: CUDA graphs kept (least recently used dropped first; never those of the call
        running).
    """

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                 max_bridge_tokens: int = 16, attention: str = "auto", cuda_graphs: bool = True,
                 prefill_tokens: int = 4096, max_graphs: int = 64):
        from .cuda_graphs import GraphCache

        self.info = backbone_info(model)
        check_fast_path(model)  # before the fusion re-points any weight
        device, mdtype = validate.model_device(model)
        max_seq_len, attention = validate.check_engine_args(
            self.info, device, mdtype, max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype,
            max_bridge_tokens=max_bridge_tokens, attention=attention, cuda_graphs=cuda_graphs,
            prefill_tokens=prefill_tokens, backends=ATTENTION_BACKENDS)
        self.guard = CallGuard("Engine")  # one generation at a time (guard.py: threads queue up)
        self.model = model
        self.device, self.dtype = device, mdtype
        self.attention = attention
        self.cuda_graphs = bool(cuda_graphs)
        self.prefill_tokens = int(prefill_tokens)
        self.graphs = GraphCache(max_graphs)  # CUDA graphs of this engine, least recently used dropped
        self.max_batch, self.max_seq_len, self.kmax = int(max_batch), max_seq_len, int(max_bridge_tokens)
        with torch.no_grad():
            try:
                self.w = ModelWeights.from_hf(model)
            except torch.OutOfMemoryError:
                raise out_of_memory(f"fusing the q/k/v and gate/up weights does not fit on {device}",
                                    "the fusion briefly needs one more copy of those weights; free memory first") from None
            n_pos = max_seq_len + self.kmax + 1
            self.cos, self.sin = self.w.rope_tables(n_pos, device, mdtype)
        L, Hkv, D = len(self.w.layers), self.w.n_kv_heads, self.w.head_dim
        validate.check_head_dim(attention, D)
        try:
            self.k_cache = torch.zeros(L, max_batch, Hkv, max_seq_len + 1, D, device=device, dtype=mdtype)
            self.v_cache = torch.zeros_like(self.k_cache)
            self.k_bridge = torch.zeros(L, max_batch, Hkv, self.kmax + 1, D, device=device, dtype=mdtype)
            self.v_bridge = torch.zeros_like(self.k_bridge)
        except torch.OutOfMemoryError:
            self.k_cache = self.v_cache = self.k_bridge = self.v_bridge = None
            n_bytes = 2 * L * max_batch * Hkv * (max_seq_len + self.kmax + 2) * D * mdtype.itemsize
            raise validate.cache_oom(device, max_batch, max_seq_len, n_bytes) from None
        self.hidden = None  # allocated on first steered call
        self.use_kv_patch: bool | None = None  # decided on first use (builds the extension)
        self.graph_emulation = False  # tests: run the CUDA-graph runners on CPU (cuda_graphs.capture)
        self.graph_phase = None  # "warmup" / the graph being captured, while cuda_graphs.capture runs

    # ------------------------------------------------------------------------------------------
    def _caches(self, layer: int, B: int, use_bridge: bool, seq):
        """(k_cache, v_cache, k_bridge, v_bridge) of one layer for a chunk of B rows: the first B
        cache rows, or every row when seq (the cache row of each chunk row) maps them."""
        n = self.max_batch if seq is not None else B
        kb, vb = (self.k_bridge[layer, :n], self.v_bridge[layer, :n]) if use_bridge else (None, None)
        return self.k_cache[layer, :n], self.v_cache[layer, :n], kb, vb

    def _attend(self, layer: int, q, q_pos, prompt_len, bridge_len, use_bridge: bool, n_slots: int, seq=None):
        kc, vc, kb, vb = self._caches(layer, q.shape[0], use_bridge, seq)
        if self.attention == "triton":
            from .kernels.prefix_attention import prefix_attention

            return prefix_attention(q, kc, vc, q_pos, prompt_len, bridge_len, kb, vb, self.w.scale, n_slots,
                                    seq_idx=seq)
        return prefix_attention_ref(q, kc, vc, q_pos, prompt_len, bridge_len, kb, vb, self.w.scale, n_slots,
                                    seq_idx=seq)

    def _write_kv(self, i: int, k, v, sg: "Segment", use_bridge: bool) -> None:
        """PyTorch path: store one segment's rotated k, v [B, M, Hkv, D] where its rows live (the
        rows of negative logical index land in the dump slots: token slot S, bridge slot Kmax)."""
        kb = sg.bridge_len if use_bridge else torch.zeros_like(sg.bridge_len)
        is_bridge, index = logical_to_storage(sg.logical, sg.prompt_len, kb)
        S, live = self.max_seq_len, sg.logical >= 0
        tok_slot = torch.where(live & ~is_bridge & (index < S), index, S)
        br_slot = torch.where(live & is_bridge, index, self.kmax)
        rows = (torch.arange(sg.B, device=k.device) if sg.seq is None else sg.seq)[:, None].expand(sg.B, sg.M)
        self.k_cache[i][rows, :, tok_slot] = k
        self.v_cache[i][rows, :, tok_slot] = v
        if use_bridge:
            self.k_bridge[i][rows, :, br_slot] = k
            self.v_bridge[i][rows, :, br_slot] = v

    def _layer(self, i: int, x, segs, use_bridge: bool, n_slots: int, mlp_edits=None):
        """One decoder layer (PyTorch path) over x [1, N, d]: the rows of the segments `segs`, one
        after another (see `Segment`). Every segment writes its K/V before any attends, so a
        segment may overwrite what an earlier one wrote in the same cache slots."""
        w = self.w.layers[i]
        q, k, v = qkv_projection(w, self.w, x)  # [1, N, H, D]
        rotated = []
        for sg in segs:
            rows = slice(sg.offset, sg.offset + sg.B * sg.M)
            pos = sg.logical.clamp(min=0, max=self.cos.shape[0] - 1)  # padding rows may run past the table
            cos, sin = self.cos[pos], self.sin[pos]
            shape = lambda t: t[0, rows].reshape(sg.B, sg.M, *t.shape[2:])
            qs, ks = apply_rope(shape(q), cos, sin), apply_rope(shape(k), cos, sin)
            self._write_kv(i, ks, shape(v), sg, use_bridge)
            rotated.append(qs)
        attn = torch.cat([
            self._attend(i, qs, sg.logical, sg.prompt_len, sg.bridge_len if use_bridge else
                         torch.zeros_like(sg.bridge_len), use_bridge, n_slots, sg.seq).reshape(sg.B * sg.M, -1)
            for sg, qs in zip(segs, rotated)])[None]
        if not mlp_edits:
            return attention_output_and_mlp(w, x, attn)
        x = x + F.linear(attn, w.wo, w.bo)
        act = silu_mul_ref(F.linear(rms_norm_ref(x, w.ln2, w.eps), w.w_gate_up, w.b_gate_up))
        for a, c, member in mlp_edits:
            act = _neuron_edit(act, a, c, _segment_rows(member, segs))
        return x + F.linear(act, w.w_down, w.b_down)

    def _layer_fused(self, i: int, x, delta, segs, use_bridge: bool, n_slots: int, mlp_edits=None):
        """`_layer` on our Triton kernels (attention="triton"): the residual add of the previous
        layer's MLP rides in this layer's RMSNorm, so returns (x, delta) with x + delta the output.
        Per layer: norm, qkv GEMM, RoPE + cache write, attention (+ split merge), o GEMM,
        add + norm, gate/up GEMM, SwiGLU, down GEMM — the GEMMs, norms and SwiGLU once over all
        segments' rows (one weight read), RoPE + write and attention per segment."""
        from .kernels.prefix_attention import prefix_attention
        from .kernels.rms_norm import add_rms_norm, rms_norm
        from .kernels.rope_cache_write import rope_cache_write
        from .kernels.silu_mul import silu_mul

        w, mw = self.w.layers[i], self.w
        if delta is None:
            h = rms_norm(x, w.ln1, w.eps)
        else:
            x, h = add_rms_norm(x, delta, w.ln1, w.eps)
        qkv = F.linear(h, w.wqkv, w.bqkv)[0]
        D, Hq, Hkv = mw.head_dim, mw.n_heads, mw.n_kv_heads
        N = qkv.shape[0]
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(N, Hq, D), k.view(N, Hkv, D), v.view(N, Hkv, D)
        qk_norm = None if w.q_norm is None else (w.q_norm, w.k_norm, w.eps)  # Qwen3: fused into RoPE + write
        rotated = []
        for sg in segs:
            rows = slice(sg.offset, sg.offset + sg.B * sg.M)
            kc, vc, kb, vb = self._caches(i, sg.B, use_bridge, sg.seq)
            shape = lambda t: t[rows].view(sg.B, sg.M, *t.shape[1:])
            rotated.append(rope_cache_write(shape(q), shape(k), shape(v), self.cos, self.sin, sg.logical,
                                            sg.prompt_len, sg.bridge_len, kc, vc, kb, vb,
                                            n_tok_slots=self.max_seq_len, seq_idx=sg.seq, qk_norm=qk_norm))
        attn = []
        for sg, qs in zip(segs, rotated):
            kc, vc, kb, vb = self._caches(i, sg.B, use_bridge, sg.seq)
            attn.append(prefix_attention(qs, kc, vc, sg.logical, sg.prompt_len, sg.bridge_len, kb, vb, mw.scale,
                                         n_slots, seq_idx=sg.seq).view(sg.B * sg.M, Hq * D))
        attn = (attn[0] if len(attn) == 1 else torch.cat(attn))[None]
        x, h = add_rms_norm(x, F.linear(attn, w.wo, w.bo), w.ln2, w.eps)
        gu = F.linear(h, w.w_gate_up, w.b_gate_up)
        if not mlp_edits:
            act = silu_mul(gu)
        else:  # NeVA: the first group's neuron edit in the SwiGLU kernel, any further one after it
            (a, c, member), rest = mlp_edits[0], mlp_edits[1:]
            act = silu_mul(gu, (a, c, _segment_rows(member, segs)))
            for a, c, member in rest:
                act = _neuron_edit(act, a, c, _segment_rows(member, segs))
        return x, F.linear(act, w.w_down, w.b_down)

    def _layers(self, x, layer_ids, logical, prompt_len, bridge_len, use_bridge, n_slots, plan=None, seq=None):
        """Layers `layer_ids` over a chunk x [B, M, d]; logical [B, M] is each row's logical index
        (= its RoPE position and, through logical_to_storage, where its K/V are written; rows with
        a negative index write nothing). seq [B] or None: the cache row of each chunk row (a
        compacted sub-batch; also indexes the plan's per-row masks); None = rows 0..B-1."""
        B, M, d = x.shape
        segs = [Segment(B, M, logical, prompt_len, bridge_len, seq)]
        return self._stack(x.reshape(1, B * M, d), layer_ids, segs, use_bridge, n_slots, plan).view(B, M, d)

    def _stack(self, x, layer_ids, segs, use_bridge, n_slots, plan=None):
        """Layers `layer_ids` over x [1, N, d], the rows of `segs` one after another -> [1, N, d]."""
        edits = plan.layer_edits(x.device) if plan is not None else {}
        mlp = plan.mlp_edits(x.device) if plan is not None else {}
        if self.attention == "triton":
            delta = None
            for i in layer_ids:
                x, delta = self._layer_fused(i, x, delta, segs, use_bridge, n_slots, mlp.get(i))
                if i in edits:  # ConVA: the residual add rides in the edit kernel
                    x, delta = self._conva(x, delta, edits[i], segs), None
            return x if delta is None else x + delta
        for i in layer_ids:
            x = self._layer(i, x, segs, use_bridge, n_slots, mlp.get(i))
            if i in edits:
                x = self._conva(x, None, edits[i], segs)
        return x

    def _conva(self, x, delta, edits, segs):
        """ConVA edits of one layer's output x (+ delta) [1, N, d]: per group, its rows only."""
        for steering, k, member in edits:
            on = _segment_rows(member, segs)
            args = steering.edit_args(k)
            if self.attention == "triton":
                from .kernels.conva_edit import conva_edit

                x = conva_edit(x, delta, *args[:-1], on, args[-1])
            else:
                x = conva_edit_ref(x if delta is None else x + delta, None, *args[:-1], on, args[-1])
            delta = None
        return x

    def _logits(self, x, plan: SteeringPlan | None = None):
        """Final norm, the plan's logits-side edits (RE-Control) on their rows, LM head."""
        if self.attention == "triton":
            from .kernels.rms_norm import rms_norm

            h = rms_norm(x, self.w.final_norm, self.w.final_eps)
        else:
            h = rms_norm_ref(x, self.w.final_norm, self.w.final_eps)
        if plan is not None:
            for g in plan.edits:
                r = plan.rows(g, x.device)
                h[r] = g.steering.apply(h[r])
        return F.linear(h, self.w.lm_head, self.w.lm_head_bias)

    # ------------------------------------------------------------------------------------------
    def check_request(self, prompts: list[torch.Tensor], max_new_tokens: int, plan: SteeringPlan) -> None:
        """Refuse what this engine cannot run, naming the limit (before any work starts)."""
        check_fast_path(self.model)  # adapters, quantization or hooks added since the engine was built
        changed = self.w.replaced()
        if changed is not None:
            raise ValueError(f"the model's {changed} was replaced since this Engine was built (a parameter "
                             f"assigned, .data set, or model.to(...)): the engine read the weights once "
                             f"and would go on computing with the old ones; build a new Engine")
        validate.check_prompts(prompts, self.device, self.info.vocab_size)
        validate.need_int("max_new_tokens", max_new_tokens, 0)
        if len(prompts) > self.max_batch:
            raise ValueError(f"batch of {len(prompts)} exceeds the engine's max_batch={self.max_batch}")
        longest = max(p.shape[0] for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the engine's "
                f"max_seq_len={self.max_seq_len}")
        for g in plan.groups:
            if g.k > self.kmax:
                raise ValueError(f"K={g.k} bridge tokens exceed max_bridge_tokens={self.kmax}")
            g.steering.module.check_backbone(self.model)
        for g in plan.edits:
            g.steering.value_fn.check_backbone(self.model)
        for g in plan.layer_groups:
            g.steering.vectors.check_backbone(self.model)
        for g in plan.mlp_groups:
            g.steering.neurons.check_backbone(self.model)

    def generate(self, prompts: list[torch.Tensor], *, steering, max_new_tokens: int,
                 sampling: SamplingParams, row_seeds: torch.Tensor, eos_ids: frozenset[int], pad_id: int,
                 forced_tokens: torch.Tensor | None = None, logits_out: list | None = None, stream: bool = False):
        """Generate for unpadded prompts (list of [P_b] tensors). Returns (new_tokens [B, N] with
        pad after EOS, counts [B], timings dict: prefill_s, decode_s, refresh_s (device time on
        CUDA), steps, refresh_steps, graph_steps, trigger_counts). A row stops at its EOS
        (counted) or at its first step whose logits are not finite (sample_next's NONFINITE: not
        counted, pad from there), so counts[i] < N without an EOS last means the latter.

        steering: None, one SVGT for every row, or a list of SVGT-or-None, one per row (rows mix
        modules, K, strengths, intervals, refresh modes and policies; see plan.py).
        forced_tokens [B, N]: teacher forcing — step t feeds forced_tokens[:, t-1] instead of
        the sampled token (scoring a continuation under steering). logits_out: a list that
        receives each step's next-token logits [B, V].
        stream=True: returns a generator instead (checks run now, the work at its first next()):
        it yields (t, tokens) per step — token t of each row, B host ints, pad after a row's EOS
        — and returns the tuple above (streaming.py; on CUDA the host reads step t while step
        t+1 runs). One call at a time (guard.py): threads sharing the engine queue up, and a
        stream holds the engine until it ends or is closed."""
        plan = SteeringPlan.build(steering, len(prompts))
        self.check_request(prompts, max_new_tokens, plan)
        if not isinstance(row_seeds, torch.Tensor) or tuple(row_seeds.shape) != (len(prompts),):
            raise ValueError(f"row_seeds must be a [{len(prompts)}] tensor (one seed per prompt)")
        if forced_tokens is not None and (forced_tokens.dim() != 2 or forced_tokens.shape[0] != len(prompts)
                                          or forced_tokens.shape[1] < max_new_tokens):
            raise ValueError(f"forced_tokens must be [{len(prompts)}, >= {max_new_tokens}], "
                             f"got {tuple(forced_tokens.shape)}")
        if forced_tokens is not None and forced_tokens.numel() and (
                forced_tokens.dtype.is_floating_point or int(forced_tokens.min()) < 0
                or int(forced_tokens.max()) >= self.w.embed.shape[0]):
            raise ValueError(f"forced_tokens must hold integer ids in [0, {self.w.embed.shape[0]})")
        advice = (f"lower the batch ({len(prompts)} rows), or the Engine's max_batch ({self.max_batch}), "
                  f"max_seq_len ({self.max_seq_len}) or prefill_tokens ({self.prefill_tokens}); "
                  f"cuda_graphs=False saves the graphs' memory")
        steps = self.guard.run(self._generate(prompts, plan, max_new_tokens, sampling, row_seeds, eos_ids, pad_id,
                                              forced_tokens, logits_out, stream), advice, self.device)
        return steps if stream else run_to_end(steps)

    @torch.no_grad()
    def _generate(self, prompts, plan, max_new_tokens, sampling, row_seeds, eos_ids, pad_id, forced_tokens,
                  logits_out, stream):
        """The body of `generate`, a generator (it yields only when `stream`)."""
        B, dev = len(prompts), self.device
        plan.materialize(dev)
        if any(g.steering.refresh_spec[0] == "project" for g in plan.groups):
            self._kv_patch_ok()  # build / load the extension now, never inside a graph capture
        if max_new_tokens == 0:
            return (torch.empty((B, 0), dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.long),
                    {"prefill_s": 0.0, "decode_s": 0.0, "refresh_s": 0.0, "steps": 0, "refresh_steps": 0,
                     "graph_steps": 0})
        P = torch.tensor([p.shape[0] for p in prompts], device=dev)
        p_max = int(P.max())
        ids = torch.zeros((B, p_max), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : p.shape[0]] = p.to(dev)
        seeds = row_seeds.to(dev)
        eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev)
        # A row stops at its EOS or at its first non-finite logits (sample_next's NONFINITE,
        # kept in `out` until the end); one isin finds both. Forced tokens never stop a row.
        stops = torch.cat([eos, eos.new_tensor([NONFINITE])])
        steer = plan.steered
        bridge_len = plan.row_k(dev)
        if steer and self.hidden is None:
            self.hidden = torch.zeros(self.max_batch, self.max_seq_len + 1, self.w.hidden_size, device=dev, dtype=self.dtype)
        timings = {"prefill_s": 0.0, "decode_s": 0.0, "refresh_s": 0.0, "steps": 1, "refresh_steps": 0,
                   "graph_steps": 0}
        clock, refresh_marks = Clock(dev), []
        feed = TokenFeed(B, max_new_tokens, dev, eos_ids) if stream else None

        # Before the prefill: capturing a graph first runs the step on dummy inputs, which
        # writes into the caches; the prefill then overwrites what matters.
        step = self._decode_runner(B, plan, sampling)
        refresh = self._refresh_runner(B, plan, sampling) if steer else None
        if hasattr(refresh, "prepare"):
            refresh.prepare(max_new_tokens)  # every refresh graph of this call, before the prefill
        replays0 = getattr(step, "replays", 0) + getattr(refresh, "replays", 0)
        m0 = clock.mark()
        logits, state = self._prefill(ids, P, plan)
        if steer:
            bridge_len = state[1]
            fired = state[3].clone()  # per row, up to its EOS (refreshes after it do not count)
        tok = sample_next(logits, sampling, seeds, 0)
        if logits_out is not None:
            logits_out.append(logits)
        if forced_tokens is not None:
            forced_tokens = forced_tokens.to(dev)
            tok = forced_tokens[:, 0]
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        out[:, 0] = tok
        done = torch.isin(tok, stops)
        # The next step's input. A finished row feeds id 0, not pad_id: pad is only what the output
        # shows and may lie outside the vocabulary (-100, say); the row's results are dropped.
        nxt = torch.where(done, 0, tok)
        m1, t0 = clock.mark(), time.perf_counter()
        if stream:
            yield from feed.give(0, tok)

        for t in range(1, max_new_tokens):
            if stream:
                if feed.finished:  # known on the host from the tokens handed out: no extra sync
                    break
            elif t % 8 == 0 and bool(done.all()):  # one host sync every 8 steps to stop early
                break
            timings["steps"] += 1
            due = plan.due(t) if steer else ()
            if due:
                r0 = clock.mark()
                before = state[3]
                tok, logits, state = refresh(nxt, t, P, state, seeds, p_max, due)
                bridge_len = state[1]
                fired += (state[3] - before) * (~done)
                timings["refresh_steps"] += 1
                refresh_marks.append((r0, clock.mark()))
            else:
                tok, logits = step(nxt, t, P, bridge_len, seeds, p_max)
            if logits_out is not None:
                logits_out.append(logits.clone())
            if forced_tokens is not None:
                tok = forced_tokens[:, t]
            # A row's tokens after its stop are written as they come and masked once at the end,
            # so the step's own bookkeeping is 4 small kernels: the copy, isin, or, and the next
            # input (NONFINITE is no id).
            out[:, t] = tok
            done |= torch.isin(tok, stops)
            nxt = torch.where(done, 0, tok)
            if stream:
                yield from feed.give(t, tok)  # between graph replays
        if stream:
            yield from feed.flush()
        m2 = clock.mark()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        paused = feed.paused if stream else 0.0  # the consumer's time between steps
        timings["prefill_s"] = clock.seconds(m0, m1)
        timings["decode_s"] = max(0.0, (clock.seconds(m1, m2) if not stream else time.perf_counter() - t0) - paused)
        timings["refresh_s"] = sum((clock.seconds(a, b) for a, b in refresh_marks), 0.0)
        timings["graph_steps"] = getattr(step, "replays", 0) + getattr(refresh, "replays", 0) - replays0
        timings["trigger_counts"] = fired.tolist() if steer else [0] * B

        counts = self._counts(out, eos)
        width = int(counts.max())
        past = torch.arange(width, device=dev) >= counts.to(dev)[:, None]  # after a row's EOS or stop
        return out[:, :width].masked_fill(past, pad_id), counts, timings

    @torch.no_grad()
    def prefill_logits(self, prompts: list[torch.Tensor], steering=None) -> torch.Tensor:
        """Next-token logits [B, V] after the prompts (the first sampling step), for checks.
        Holds the engine like `generate` (it writes the caches)."""
        plan = SteeringPlan.build(steering, len(prompts))
        self.check_request(prompts, 1, plan)

        def body():
            yield from ()  # a generator that yields nothing: CallGuard.run holds the lock around it
            dev = self.device
            P = torch.tensor([p.shape[0] for p in prompts], device=dev)
            ids = torch.zeros((len(prompts), int(P.max())), dtype=torch.long, device=dev)
            for b, p in enumerate(prompts):
                ids[b, : p.shape[0]] = p.to(dev)
            if plan.steered and self.hidden is None:
                self.hidden = torch.zeros(self.max_batch, self.max_seq_len + 1, self.w.hidden_size, device=dev,
                                          dtype=self.dtype)
            return self._prefill(ids, P, plan)[0]

        return run_to_end(self.guard.run(body(), f"lower the batch ({len(prompts)} rows)", self.device))

    # ---- the three kinds of forward ----------------------------------------------------------
    def _extract_layer(self, plan: SteeringPlan) -> int:
        return plan.extract_layer if plan.steered else len(self.w.layers) - 1

    def _prefill(self, ids, P, plan: SteeringPlan):
        """Prompt forward in chunks of logical rows. Returns (logits [B, V], steering state or
        None); the state is (bridge [B, Kmax, d], bridge_len [B], h_ref [B, d], triggers [B]).

        Unsteered, each chunk runs through every layer. Steered, the lower stack runs first
        over the whole prompt (its extract-layer states fill the hidden cache), each group's
        bridge is made from its rows' last prompt token, then the upper stack runs over
        [prompt ; bridge]. A row without steering, or whose first check does not fire
        (policy="sparse"), gets bridge_len 0 (gated off): its bridge rows land in token slots
        that the response overwrites before any query can see them, and its logits come from
        its last prompt row."""
        B, p_max = ids.shape
        dev = ids.device
        L, e = len(self.w.layers), self._extract_layer(plan)
        batch = torch.arange(B, device=dev)
        chunk = max(16, self.prefill_tokens // B)
        no_bridge = torch.zeros(B, dtype=torch.long, device=dev)
        last_rows = []
        for c0 in range(0, p_max, chunk):
            x = self.w.embed[ids[:, c0:c0 + chunk]]
            logical = self._rows(c0, x.shape[1], B)
            x = self._layers(x, range(e + 1), logical, P, no_bridge, False, min(p_max, c0 + chunk), plan)
            if not plan.steered:
                last_rows.append(x)
            else:
                self.hidden[:B, c0:c0 + x.shape[1]] = x
        if not plan.steered:
            x = torch.cat(last_rows, dim=1) if len(last_rows) > 1 else last_rows[0]
            return self._logits(x[batch, P - 1], plan), None
        Kmax, k_row = plan.kmax, plan.row_k(dev)
        h_ref = self.hidden[batch, P - 1]
        bridge = torch.zeros(B, Kmax, plan.hidden_size, dtype=plan.dtype, device=dev)
        fire = torch.zeros(B, dtype=torch.bool, device=dev)
        for g in plan.groups:
            r = plan.rows(g, dev)
            br, score = g.steering.bridge_and_score(h_ref[r])  # [n, K, d], module dtype
            bridge[r, :g.k] = br
            fire[r] = g.steering.fires(score, torch.zeros_like(score))
        bridge_len = torch.where(fire, k_row, no_bridge)
        total = p_max + Kmax
        last_idx = P - 1 + bridge_len
        last = torch.zeros((B, self.w.hidden_size), device=dev, dtype=self.dtype)
        for c0 in range(0, total, chunk):
            rows = torch.arange(c0, min(total, c0 + chunk), device=dev)
            x = self._upper_rows(rows, bridge, P, k_row)
            x = self._layers(x, range(e + 1, L), self._rows(c0, rows.numel(), B), P, bridge_len, True, p_max, plan)
            hit = (last_idx >= c0) & (last_idx < c0 + rows.numel())
            idx = (last_idx - c0).clamp(0, rows.numel() - 1)
            last = torch.where(hit[:, None], x[batch, idx], last)
        return self._logits(last, plan), (bridge, bridge_len, h_ref.clone(), fire.long())

    def _rows(self, start: int, n: int, B: int) -> torch.Tensor:
        """Logical indices start..start+n-1 for every sequence: [B, n]."""
        return torch.arange(start, start + n, device=self.device)[None].expand(B, n)

    def _upper_rows(self, rows, bridge, P, K):
        """Upper-stack input for logical rows [R]: prompt states from the hidden cache, then the
        bridge (K [B] tokens per row), zero padding past each sequence's end -> [B, R, d]."""
        B = P.shape[0]
        r, Pc, Kc = rows[None], P[:, None], K[:, None]
        prompt = self.hidden[torch.arange(B, device=P.device)[:, None], r.clamp(max=self.max_seq_len).expand(B, -1)]
        j = torch.minimum((r - Pc).clamp(min=0), (Kc - 1).clamp(min=0))
        br = bridge.to(self.dtype).gather(1, j[..., None].expand(B, -1, bridge.shape[-1]))
        zero = torch.zeros((), dtype=self.dtype, device=P.device)
        return torch.where((r < Pc)[..., None], prompt, torch.where((r < Pc + Kc)[..., None], br, zero))

    def decode_step(self, tok, t, P, bridge_len, seeds, sampling: SamplingParams, plan: SteeringPlan, n_slots: int):
        """One token for every row: tok [B] is response token t-1 (slot P + t - 1); returns
        (token t [B], its logits [B, V]).
        Static shapes and no host sync (t may be a 0-d device tensor), so it can be graph-captured."""
        L, e = len(self.w.layers), self._extract_layer(plan)
        slot = P + t - 1
        x = self.w.embed[tok][:, None]
        x = self._layers(x, range(e + 1), slot[:, None], P, bridge_len, False, n_slots, plan)
        if plan.steered:
            self.hidden[torch.arange(tok.shape[0], device=tok.device), slot] = x[:, 0]
            x = self._layers(x, range(e + 1, L), (slot + bridge_len)[:, None], P, bridge_len, True, n_slots, plan)
        logits = self._logits(x[:, -1], plan)
        return sample_next(logits, sampling, seeds, t), logits

    def _decode_runner(self, B, plan, sampling):
        """The decode step of one call (made once, at the start of each call)."""
        if self.cuda_graphs and (self.device.type == "cuda" or self.graph_emulation):
            from .cuda_graphs import GraphedDecode, graph_cache

            graph_cache(self).begin_call()  # from here, earlier calls' graphs may be dropped (LRU)
            return GraphedDecode.get(self, B, plan, sampling)
        return lambda tok, t, P, bridge_len, seeds, p_max: self.decode_step(
            tok, t, P, bridge_len, seeds, sampling, plan, p_max + t)

    def _refresh_runner(self, B, plan, sampling):
        if self.cuda_graphs and (self.device.type == "cuda" or self.graph_emulation):
            from .cuda_graphs import GraphedRefresh

            return GraphedRefresh.runner(self, B, plan, sampling)
        return lambda tok, t, P, state, seeds, p_max, due: self.refresh_step(
            tok, t, P, state, seeds, sampling, plan, p_max + t, due)

    @staticmethod
    def _counts(out, eos):
        """Tokens each row produced: up to its first EOS (included) or its first NONFINITE
        (excluded), else all of them."""
        n = out.shape[1]
        end = torch.isin(out, eos) | (out == NONFINITE)
        first = end.float().argmax(1)
        count = torch.where(out.gather(1, first[:, None])[:, 0] == NONFINITE, first, first + 1)
        return torch.where(end.any(1), count, torch.full_like(count, n)).cpu()
