"""The refresh step of the engine (DESIGN §2): at a due step the value modules of the due
groups run, the rows that fire blend in a new bridge, and each group's refresh mode re-computes
what it defines (exact / window / bridge through the upper stack, project through kv_patch);
under policy="sparse" the upper-stack work is compacted to the rows that fire.

`RefreshSteps` is a mixin of `Engine` (engine.py), split out to keep each file readable; it uses
the engine's caches, weights and layer functions. `Segment` describes one run of rows in a
multi-segment pass (`Engine._stack`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import SamplingParams, sample_next
from .plan import SteeringPlan
from .steering import ema, trigger_drift


class Segment:
    """B sequences of M rows each in a flattened run of rows [N, d] (`Engine._stack`): logical
    [B, M], prompt_len / bridge_len [B] and seq [B] (cache row of each sequence; None = 0..B-1)
    as for `Engine._layers`; offset = its first row in the run (set by `segments`)."""

    def __init__(self, B, M, logical, prompt_len, bridge_len, seq=None):
        self.B, self.M, self.logical, self.prompt_len, self.bridge_len, self.seq = B, M, logical, prompt_len, bridge_len, seq
        self.offset = 0


def segments(*segs: Segment) -> list[Segment]:
    off = 0
    for sg in segs:
        sg.offset, off = off, off + sg.B * sg.M
    return list(segs)


def _segment_rows(per_seq: torch.Tensor, segs) -> torch.Tensor:
    """A per-sequence vector (a plan's membership mask) expanded to every row of the segments: [N],
    contiguous — the kernels read it as a flat array. (expand + reshape of a one-sequence segment
    is a stride-0 view of one element; the SwiGLU and ConVA kernels read past it, so a single
    prompt's prefill steered or not by whatever lay in memory after the mask.)"""
    parts = [(per_seq[:sg.B] if sg.seq is None else per_seq[sg.seq])[:, None].expand(sg.B, sg.M).contiguous().view(-1)
             for sg in segs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)



class RefreshSteps:
    """Engine methods of the refresh step (see the module docstring)."""

    def refresh_step(self, tok, t, P, state, seeds, sampling: SamplingParams, plan: SteeringPlan, n_slots: int,
                     due: tuple[int, ...], exact_rows: int | None = None):
        """A decode step at which the value modules of the groups `due` (plan.due(t)) are due.
        The lower stack runs for the new token; in a due group, the rows that fire (all under
        policy="always"; see SVGT.policy) blend a new bridge in by EMA (or take it as is when
        their bridge was gated off), then by their group's refresh mode (DESIGN §2):
          exact     — the upper stack again over [bridge ; every response token so far];
          window=W  — over [bridge ; the last W response tokens before this one ; this one];
          bridge    — over [bridge ; this token] (window=0): older response K/V stay stale;
          project   — bridge K/V = each upper layer's k/v projection of the raw bridge vector
                      (RoPE on keys, no norm, no propagation), then a plain decode of this token.
        Every row's chunk is right-aligned in one [B, M] block; the rest of a row's block, and
        the whole block of a row that does not fire, repeats this token's row (identical rows
        write identical K/V), so each row computes what it would alone. The prompt's upper K/V
        never change. state = (bridge [B, Kmax, d], bridge_len [B], h_ref [B, d], triggers [B]);
        returns (token [B], logits [B, V], new state). Shapes are static (t may be a 0-d device
        tensor), so the step can be graph-captured like `decode_step`: a window not yet full
        repeats response token 0; exact is the window of `exact_rows` >= t rows (a graph bucket;
        default t, which makes the shape depend on t)."""
        bridge, bridge_len, h_ref, triggers = state
        L, e = len(self.w.layers), self._extract_layer(plan)
        B, dev = tok.shape[0], tok.device
        batch = torch.arange(B, device=dev)
        slot = P + t - 1
        x = self._layers(self.w.embed[tok][:, None], range(e + 1), slot[:, None], P, bridge_len, False, n_slots, plan)
        self.hidden[batch, slot] = x[:, 0]
        bridge, h_ref = bridge.clone(), h_ref.clone()
        fire = torch.zeros(B, dtype=torch.bool, device=dev)
        groups = [(plan.groups[i], plan.rows(plan.groups[i], dev)) for i in due]
        for g, r in groups:
            st = g.steering
            h_t = x[r, 0] if st.trigger == "current" else self.hidden[r, P[r] - 1]
            if st.policy == "sparse" and self.attention == "triton":
                fresh, f = self._sparse_trigger(st, h_t, h_ref[r], t)
            else:
                fresh, score = st.bridge_and_score(h_t)
                f = st.fires(score, trigger_drift(h_t, h_ref[r]))
            old = bridge[r, :g.k]
            gate = (bridge_len[r] > 0)[:, None, None]
            bridge[r, :g.k] = torch.where(f[:, None, None], torch.where(gate, ema(old, fresh, st.beta), fresh), old)
            h_ref[r] = torch.where(f[:, None], h_t, h_ref[r])
            fire[r] = f
        bridge_len = torch.where(fire, plan.row_k(dev), bridge_len)
        triggers = triggers + fire.long()
        here = (slot + bridge_len)[:, None]  # this token's logical index
        # each due group's chunk width (bridge + response rows); project needs none
        spans = []
        for g, r in groups:
            mode, window = g.steering.refresh_spec
            if mode == "project":
                self._project_bridge(bridge[:, :g.k].to(self.dtype), P, range(e + 1, L), rows=fire & plan.member(g, dev))
                continue
            # A window wider than the response so far repeats response token 0 (same K/V, same
            # result), so one as wide as the cache is every window: window=10**12 allocated 10**12 rows.
            n = (exact_rows if exact_rows is not None else int(t)) if mode == "exact" else min(window, self.max_seq_len) + 1
            spans.append((g, r, n))
        M = max([g.k + n for g, _, n in spans], default=1)
        xs = x.expand(B, M, x.shape[-1]).clone()
        logical = here.expand(B, M).clone()
        chunk_fire = torch.zeros(B, dtype=torch.bool, device=dev)
        for g, r, n in spans:
            K, Pr = g.k, P[r][:, None]
            j = (t - n + torch.arange(n, device=dev)).clamp(min=0)
            resp = self.hidden[r[:, None], Pr + j[None]]
            chunk = torch.cat([bridge[r, :K].to(self.dtype), resp], dim=1)
            rows = torch.cat([Pr + torch.arange(K, device=dev)[None], (Pr + K) + j[None]], dim=1)
            f = fire[r]
            xs[r, M - K - n:] = torch.where(f[:, None, None], chunk, x[r].expand_as(chunk))
            logical[r, M - K - n:] = torch.where(f[:, None], rows, here[r].expand_as(rows))
            chunk_fire[r] = f
        upper = range(e + 1, L)
        sparse = any(g.steering.policy == "sparse" for g, _, _ in spans)
        if not sparse or not self._branches_ok():
            # Every row in one [B, M] block (rows that do not fire repeat this token).
            out = self._layers(xs, upper, logical, P, bridge_len, True, n_slots, plan)[:, -1:]
        else:
            out = self._sparse_chunks(x, xs, logical, here, chunk_fire, P, bridge_len, n_slots, plan, upper)
        logits = self._logits(out[:, -1], plan)
        return sample_next(logits, sampling, seeds, t), logits, (bridge, bridge_len, h_ref, triggers)

    def _sparse_chunks(self, x, xs, logical, here, chunk_fire, P, bridge_len, n_slots, plan, upper):
        """The upper stack of a refresh step whose chunk rows fire sparsely; cost follows the
        number n that fire (a device count, which a graph replay never reads on the host):
          n == 0          — a plain decode of this token for every row;
          n <= c <= B / 2 — in one pass (one read of the weights): the decode rows of the rows
                            that do not fire, then the [c, M] chunks of the fired rows only,
                            compacted (c a power of two; cache rows mapped by index; padding
                            entries and the fired rows' decode rows have logical index -1:
                            they write nothing and are dropped);
          n > B / 2       — the full [B, M] block, as under policy "always".
        Each branch is a conditional node of the CUDA graph (`cuda_graphs.run_if`), so a replay
        runs one of them; eager (no graph), the host reads n once and runs that branch (one sync
        per due step, not one per branch). Returns [B, 1, d]."""
        from .cuda_graphs import run_if

        B, M, d = xs.shape
        n = chunk_fire.sum()
        sizes = [c for c in (1, 2, 4, 8, 16, 32, 64, 128) if c <= B // 2]
        out = torch.empty_like(x)
        # fired rows first, in row order (a stable sort: no host sync, static shape)
        order = torch.argsort((~chunk_fire).to(torch.int8), stable=True)

        def decode():
            out.copy_(self._layers(x, upper, here, P, bridge_len, True, n_slots, plan))

        def compacted(c):
            def body():
                idx = order[:c]
                valid = torch.arange(c, device=x.device) < n
                segs = segments(
                    Segment(B, 1, torch.where(chunk_fire[:, None], -1, here), P, bridge_len),
                    Segment(c, M, torch.where(valid[:, None], logical[idx], -1), P[idx], bridge_len[idx], idx))
                y = self._stack(torch.cat([x.view(1, B, d), xs[idx].view(1, c * M, d)], dim=1), upper, segs, True,
                                n_slots, plan)[0]
                out.copy_(y[:B, None])
                last = y[B:].view(c, M, d)[:, -1:]
                out[idx] = torch.where(valid[:, None, None], last, out[idx])
            return body

        def full():
            out.copy_(self._layers(xs, upper, logical, P, bridge_len, True, n_slots, plan)[:, -1:])

        if self.graph_phase is None:  # eager
            k = int(n)
            fits = [c for c in sizes if k <= c]
            (decode if k == 0 else compacted(fits[0]) if fits else full)()
            return out
        run_if(self, n == 0, decode)
        lo = 0
        for c in sizes:
            run_if(self, (n > lo) & (n <= c), compacted(c))
            lo = c
        run_if(self, n > lo, full)
        return out

    def _branches_ok(self) -> bool:
        """Sparse refresh branches need conditional graph nodes when the step is captured on a
        GPU (torch's CUDAGraph.begin_capture_to_if_node); without them the full block runs
        (same tokens, no saving)."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return True
        from .cuda_graphs import conditional_nodes_supported

        return conditional_nodes_supported()

    def _sparse_trigger(self, st, h_t, h_ref, t):
        """policy="sparse" on our kernels: the value state, then the fused trigger kernel
        (discriminator score, drift, schedule -> fire mask, one launch), then the bridge."""
        from .kernels.trigger import SPARSE, trigger

        mod, n, dev = st.module, h_t.shape[0], h_t.device
        z = mod.value(h_t)
        lin1, lin2 = mod.discriminator.classifier[0], mod.discriminator.classifier[3]
        full = lambda v, dt=torch.float32: torch.full((n,), v, dtype=dt, device=dev)
        step = t if torch.is_tensor(t) else torch.full((), t, dtype=torch.long, device=dev)
        dthr = float("inf") if st.drift_threshold is None else st.drift_threshold
        mask = trigger(z.float().contiguous(), h_t, h_ref, lin1.weight, lin1.bias, lin2.weight, lin2.bias, step,
                       full(st.refresh_interval, torch.long), full(SPARSE, torch.long), full(st.score_threshold),
                       full(dthr))[0]
        fresh, _ = mod.bridge_from_value(h_t, z, st.gradient_step_size)
        return fresh, mask.bool()

    def _project_bridge(self, bridge, P, layer_ids, rows: torch.Tensor | None = None):
        """refresh="project": write k_proj/v_proj(bridge) (keys rotated at P..P+K-1, RoPE in fp32
        rounded once) into the bridge buffer of each listed (consecutive) layer. bridge [B, K, d]
        in the model dtype; rows [B] bool: only these sequences are patched (None = all). One GEMM
        per layer, then two in-place patches for all layers at once through the kv_patch op
        (csrc/) when its compiled backend serves this device."""
        B, K, _ = bridge.shape
        Hq, Hkv, D = self.w.n_heads, self.w.n_kv_heads, self.w.head_dim
        ids = list(layer_ids)
        if not ids:
            return
        l0, Lu, maxB = ids[0], len(ids), self.max_batch
        if ids != list(range(l0, l0 + Lu)):
            raise ValueError(f"project refresh needs consecutive layers, got {ids}")
        kv = torch.stack([F.linear(bridge, self.w.layers[i].wqkv[Hq * D:],
                                   None if self.w.layers[i].bqkv is None else self.w.layers[i].bqkv[Hq * D:])
                          for i in ids])  # [Lu, B, K, 2 Hkv D]
        kv = kv.view(Lu, B, K, 2, Hkv, D).permute(3, 0, 1, 4, 2, 5)  # [2, Lu, B, Hkv, K, D]
        k_src, v_src = kv[0].reshape(Lu * B, Hkv, K, D), kv[1].reshape(Lu * B, Hkv, K, D)
        pos = P[:, None] + torch.arange(K, device=bridge.device)[None]  # [B, K]
        if self._kv_patch_ok():
            from ._ops import kv_patch

            dev = bridge.device
            seq = (torch.arange(Lu, device=dev)[:, None] * maxB + torch.arange(B, device=dev)[None]).reshape(-1)
            dst = torch.zeros_like(seq) if rows is None else torch.where(rows, 0, -1).repeat(Lu)
            kbuf = self.k_bridge[l0:l0 + Lu].view(Lu * maxB, Hkv, self.kmax + 1, D)
            vbuf = self.v_bridge[l0:l0 + Lu].view(Lu * maxB, Hkv, self.kmax + 1, D)
            kv_patch(kbuf, k_src, seq, dst, self.cos, self.sin, pos.repeat(Lu, 1))
            kv_patch(vbuf, v_src, seq, dst)
            return
        # Same result without the extension (graph-safe slicing; kv_patch_ref's arithmetic).
        c, sn = self.cos[pos].float()[:, None], self.sin[pos].float()[:, None]  # [B, 1, K, D]
        kf = k_src.view(Lu, B, Hkv, K, D).float()
        rot = torch.cat([-kf[..., D // 2:], kf[..., : D // 2]], dim=-1)
        k_new, v_new = (kf * c + rot * sn).to(self.dtype), v_src.view(Lu, B, Hkv, K, D)
        if rows is not None:
            keep = ~rows[None, :, None, None, None]
            k_new = torch.where(keep, self.k_bridge[l0:l0 + Lu, :B, :, :K], k_new)
            v_new = torch.where(keep, self.v_bridge[l0:l0 + Lu, :B, :, :K], v_new)
        self.k_bridge[l0:l0 + Lu, :B, :, :K] = k_new
        self.v_bridge[l0:l0 + Lu, :B, :, :K] = v_new

    def _kv_patch_ok(self) -> bool:
        """Use the kv_patch op when its compiled code serves this device (CUDA kernel on a GPU,
        C++ on CPU); its PyTorch fallback syncs, which a CUDA graph cannot hold."""
        if self.use_kv_patch is None:
            from ._ops import kv_patch_backend

            backend = kv_patch_backend()
            self.use_kv_patch = backend == "cuda" if self.device.type == "cuda" else backend in ("cpp", "cuda")
        return self.use_kv_patch
