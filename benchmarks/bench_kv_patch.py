"""kv_patch (csrc/, torch.ops.svgt_fast.kv_patch) vs the PyTorch ways to write the same rows.

1. Bulk patch (a refresh of many rows): B=16 sequences, 8 KV heads, D=128, T=512 tokens each,
   bf16, all rows, into a [16, 8, 1024, 128] cache. Baselines: slice assignment, index_copy_
   (both need one slot range for all rows) and index_put_ (ragged slots, like kv_patch); with
   RoPE, PyTorch's rotate-half math before the slice assignment. GB/s = (bytes read from src +
   bytes written) / time, and % of the measured device-to-device copy bandwidth. Inputs rotate
   through enough copies to exceed L2.
2. Bridge patch latency at batch 1, Llama-3-8B: K=5 bridge tokens into the 16 upper layers'
   bridge buffers [16, 1, 8, 5, 128], keys (RoPE) and values: per layer (32 op calls), all
   layers at once (the buffers viewed as [16*1, 8, 5, 128]: 2 calls), the per-layer calls
   replayed from a CUDA graph (one patch per replay, and 20 per replay: the cost inside a step's
   graph), and PyTorch per layer / all layers at once.
Times: CUDA events, median of reps; bulk figures from CUDA-graph replays (time_graphed), the eager
call's time beside them (eager_us). Usage: python benchmarks/bench_kv_patch.py [--smoke]
"""
from __future__ import annotations

import argparse

import torch

from common import copy_bandwidth_gbs, gpu_or_smoke, print_table, time_fn, time_graphed, write_results


def rope_torch(x, cos, sin, positions):
    """x [N, H, T, D]; cos/sin [n_pos, D] fp32; positions [N, T] -> rotated, x's dtype."""
    D = x.shape[-1]
    c, s = cos[positions][:, None], sin[positions][:, None]  # [N, 1, T, D]
    xf = x.float()
    rot = torch.cat([-xf[..., D // 2:], xf[..., : D // 2]], dim=-1)
    return (xf * c + rot * s).to(x.dtype)


def rope_tables(n_pos, D, device):
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=device).float() / D))
    ang = torch.arange(n_pos, device=device).float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def bulk_rows(dev, dtype, smoke, bw):
    from svgt_fast._ops import kv_patch

    B, H, D, T, S = (16, 8, 128, 512, 1024) if not smoke else (2, 2, 16, 8, 24)
    s0 = S // 4
    elem = torch.finfo(dtype).bits // 8
    nbytes = 2 * B * H * T * D * elem  # src read + cache written
    copies = max(1, min(8, (512 << 20) // (B * H * (S + T) * D * elem))) if dev == "cuda" else 1
    sets = [(torch.randn(B, H, S, D, device=dev, dtype=dtype), torch.randn(B, H, T, D, device=dev, dtype=dtype))
            for _ in range(copies)]
    seq_idx = torch.arange(B, device=dev)
    first = torch.full((B,), s0, device=dev)
    slots = torch.arange(s0, s0 + T, device=dev)
    ragged = (torch.arange(B, device=dev) * 7) % (S - T)  # index_put_ / kv_patch: a range per row
    b_idx = seq_idx[:, None].expand(B, T)
    s_idx = ragged[:, None] + torch.arange(T, device=dev)
    cos, sin = rope_tables(S + T, D, dev)
    positions = slots[None].expand(B, T)
    it = [0]

    def nxt():
        it[0] = (it[0] + 1) % copies
        return sets[it[0]]

    def k_patch():
        c, x = nxt()
        kv_patch(c, x, seq_idx, first)

    def k_patch_ragged():
        c, x = nxt()
        kv_patch(c, x, seq_idx, ragged)

    def slice_assign():
        c, x = nxt()
        c[:, :, s0:s0 + T] = x

    def index_copy():
        c, x = nxt()
        c.index_copy_(2, slots, x)

    def index_put():
        c, x = nxt()
        c[b_idx, :, s_idx] = x.transpose(1, 2)

    def k_patch_rope():
        c, x = nxt()
        kv_patch(c, x, seq_idx, first, cos, sin, positions)

    def torch_rope_slice():
        c, x = nxt()
        c[:, :, s0:s0 + T] = rope_torch(x, cos, sin, positions)

    rows = []
    for name, fn in (("kv_patch", k_patch), ("kv_patch_ragged", k_patch_ragged), ("slice_assign", slice_assign),
                     ("index_copy_", index_copy), ("index_put_ragged", index_put),
                     ("kv_patch_rope", k_patch_rope), ("torch_rope+slice", torch_rope_slice)):
        # GPU time from graph replays of one call per input set: a call moves ~34 MB (~11 us at
        # 3 TB/s), about what the host spends launching it, so an event pair around one eager
        # call would count that host time too. The eager call's time is reported beside it.
        def every_set(fn=fn):
            for _ in range(copies):
                fn()

        eager = time_fn(fn, warmup=5 if dev == "cuda" else 1, reps=50 if dev == "cuda" else 3)
        try:
            t, timed = time_graphed(every_set, calls=copies, warmup=3, reps=20 if dev == "cuda" else 3), "graph"
        except RuntimeError as exc:  # a baseline a graph cannot capture: its eager time, labelled
            t, timed = eager, f"eager (capture failed: {str(exc).splitlines()[0][:80]})"
            print(f"{name}: {timed}")
        gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9
        rows.append(dict(case="bulk", method=name, shape=f"B{B} H{H} T{T} D{D}", us=t["median_ms"] * 1e3,
                         p10_us=t["p10_ms"] * 1e3, p90_us=t["p90_ms"] * 1e3, gb_s=gbs,
                         pct_copy_bw=100 * gbs / bw if bw else None, eager_us=eager["median_ms"] * 1e3,
                         timed=timed if dev == "cuda" else "cpu"))

    # Same bits as PyTorch (the tests check this exhaustively; here a guard against a broken build).
    c, x = sets[0]
    a, b = c.clone(), c.clone()
    kv_patch(a, x, seq_idx, first, cos, sin, positions)
    b[:, :, s0:s0 + T] = rope_torch(x, cos, sin, positions)
    assert torch.equal(a, b), "kv_patch != PyTorch RoPE + slice assignment"
    return rows


def bridge_rows(dev, dtype, smoke):
    from svgt_fast._ops import kv_patch

    L, H, D, K, P = (16, 8, 128, 5, 300) if not smoke else (3, 2, 16, 5, 20)
    b = 0  # batch 1
    kbuf = torch.zeros(L, 1, H, K, D, device=dev, dtype=dtype)
    vbuf = torch.zeros_like(kbuf)
    src_k = torch.randn(L, 1, H, K, D, device=dev, dtype=dtype)  # [layer, n, H, T, D]
    src_v = torch.randn_like(src_k)
    cos, sin = rope_tables(P + K, D, dev)
    positions = torch.arange(P, P + K, device=dev)[None]  # bridge positions P..P+K-1
    seq_idx = torch.tensor([b], device=dev)
    first = torch.zeros(1, device=dev, dtype=torch.long)
    seq_all = torch.arange(L, device=dev) * 1 + b  # row of layer l in the [L*1, H, K, D] view
    first_all = torch.zeros(L, device=dev, dtype=torch.long)
    pos_all = positions.expand(L, K)
    k_all, v_all = kbuf.view(L, H, K, D), vbuf.view(L, H, K, D)
    sk_all, sv_all = src_k.view(L, H, K, D), src_v.view(L, H, K, D)

    def per_layer():
        for l in range(L):
            kv_patch(kbuf[l], src_k[l], seq_idx, first, cos, sin, positions)
            kv_patch(vbuf[l], src_v[l], seq_idx, first)

    def all_layers():
        kv_patch(k_all, sk_all, seq_all, first_all, cos, sin, pos_all)
        kv_patch(v_all, sv_all, seq_all, first_all)

    def torch_per_layer():
        for l in range(L):
            kbuf[l, b] = rope_torch(src_k[l], cos, sin, positions)[0]
            vbuf[l, b] = src_v[l, 0]

    def torch_all_layers():
        kbuf[:, b] = rope_torch(sk_all, cos, sin, pos_all)
        vbuf[:, b] = sv_all

    # (method, callable, op calls per patch, patches per call)
    cases = [("kv_patch_per_layer", per_layer, 2 * L, 1), ("kv_patch_all_layers", all_layers, 2, 1),
             ("torch_per_layer", torch_per_layer, None, 1), ("torch_all_layers", torch_all_layers, None, 1)]
    if dev == "cuda":
        per_layer()  # warm up outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            per_layer()
        cases.append(("kv_patch_per_layer_graph", graph.replay, 2 * L, 1))
        # What the patch adds inside a decode step's graph: its kernels without the replay's own
        # launch (a few us of host and graph-launch time a step pays once, not per patch).
        repeats = 20
        graph_n = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_n):
            for _ in range(repeats):
                per_layer()
        cases.append((f"kv_patch_per_layer_in_graph(x{repeats})", graph_n.replay, 2 * L, repeats))
    rows = []
    for name, fn, calls, n in cases:
        t = time_fn(fn, warmup=10 if dev == "cuda" else 1, reps=200 if dev == "cuda" else 3)
        rows.append(dict(case="bridge", method=name, shape=f"L{L} H{H} K{K} D{D} batch1 K+V", op_calls=calls,
                         us=t["median_ms"] * 1e3 / n, p10_us=t["p10_ms"] * 1e3 / n, p90_us=t["p90_ms"] * 1e3 / n))
    want_k, want_v = kbuf.clone(), vbuf.clone()
    kbuf.zero_(), vbuf.zero_()
    all_layers()
    assert torch.equal(kbuf, want_k) and torch.equal(vbuf, want_v), "bridge patch != PyTorch"
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the harness only)")
    args = ap.parse_args()
    dev, _ = gpu_or_smoke(args.smoke)
    cuda = dev == "cuda"
    dtype = torch.bfloat16  # also on CPU: the op's bf16 path is what the harness checks
    from svgt_fast._ops import kv_patch_backend, kv_patch_backend_info

    print("kv_patch backend:", kv_patch_backend_info())
    bw = copy_bandwidth_gbs() if cuda else None
    rows = bulk_rows(dev, dtype, args.smoke, bw) + bridge_rows(dev, dtype, args.smoke)
    print(f"measured copy bandwidth: {bw:.0f} GB/s" if bw else "copy bandwidth: n/a (CPU)")
    print_table([r for r in rows if r["case"] == "bulk"],
                ["method", "shape", "us", "p10_us", "p90_us", "gb_s", "pct_copy_bw", "eager_us"])
    print_table([r for r in rows if r["case"] == "bridge"], ["method", "shape", "op_calls", "us", "p10_us", "p90_us"])

    def plot(ax):
        sel = [r for r in rows if r["case"] == "bulk"]
        ax.bar([r["method"] for r in sel], [r["gb_s"] for r in sel])
        if bw:
            ax.axhline(bw, color="k", ls="--", label=f"copy bandwidth {bw:.0f} GB/s")
            ax.legend()
        ax.set_ylabel("GB/s (src read + cache written)")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.set_title(f"kv_patch bulk: {sel[0]['shape']}, bf16")

    extra = dict(copy_bandwidth_gbs=bw, backend=kv_patch_backend(), backend_info=kv_patch_backend_info())
    path = write_results("kv_patch" + ("_smoke" if args.smoke else ""), rows, extra, plot=plot)
    print("wrote", path)


if __name__ == "__main__":
    main()
