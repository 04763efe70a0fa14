"""Bridge-token prefix attention: our Triton kernel vs PyTorch doing the same work.

Decode, Llama-3-8B attention shape (32 query / 8 KV heads, head 128), bf16, K = 5 bridge tokens.
Baselines, on the same caches: SDPA without any bridge (the target's yardstick), and the
PyTorch way to include the bridge (concatenate it into the keys, then SDPA).
Effective bandwidth = bytes of K/V (and bridge) read / GPU time (CUDA-graph replays). Inputs rotate through enough
cache copies to exceed L2. Usage: python benchmarks/bench_prefix_attention.py [--smoke]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import gpu_or_smoke, partial_results, print_table, time_fn, time_graphed, write_results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the harness only)")
    args = ap.parse_args()
    dev, dtype = gpu_or_smoke(args.smoke, interpret=True)
    cuda = dev == "cuda"
    from svgt_fast.kernels.prefix_attention import prefix_attention

    Hq, Hkv, D, K = (32, 8, 128, 5) if not args.smoke else (4, 2, 16, 5)
    cases = [(1, 4096), (16, 4096), (1, 512), (64, 1024)] if not args.smoke else [(1, 64), (2, 64)]
    rows = []
    out_name = "prefix_attention" + ("_smoke" if args.smoke else "")
    checkpoint = partial_results(out_name)
    for B, ctx in cases:
        kv_bytes = 2 * B * Hkv * ctx * D * torch.finfo(dtype).bits // 8
        copies = max(1, min(16, (256 << 20) // max(kv_bytes, 1))) if cuda else 1
        sets = []
        for _ in range(copies):
            q = torch.randn(B, 1, Hq, D, device=dev, dtype=dtype)
            kc = torch.randn(B, Hkv, ctx, D, device=dev, dtype=dtype)
            vc = torch.randn_like(kc)
            kb = torch.randn(B, Hkv, K, D, device=dev, dtype=dtype)
            vb = torch.randn_like(kb)
            sets.append((q, kc, vc, kb, vb))
        P = torch.full((B,), ctx // 2, device=dev)
        bl = torch.full((B,), K, device=dev)
        q_pos = torch.full((B, 1), ctx - 1 + K, device=dev)
        it = [0]

        def nxt():
            it[0] = (it[0] + 1) % copies
            return sets[it[0]]

        def ours():
            q, kc, vc, kb, vb = nxt()
            prefix_attention(q, kc, vc, q_pos, P, bl, kb, vb, D ** -0.5)

        def ours_block_n64():  # the earlier 64-key tile, which spills at D 128 (prefix_attention.DEFAULT_CONFIG)
            q, kc, vc, kb, vb = nxt()
            prefix_attention(q, kc, vc, q_pos, P, bl, kb, vb, D ** -0.5, config=(64, 4))

        def sdpa_no_bridge():
            q, kc, vc, _, _ = nxt()
            F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, enable_gqa=True)

        def concat_sdpa():
            q, kc, vc, kb, vb = nxt()
            k = torch.cat([kc, kb], dim=2)
            v = torch.cat([vc, vb], dim=2)
            F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=True)

        bridge_bytes = 2 * B * Hkv * K * D * torch.finfo(dtype).bits // 8
        for name, fn, nbytes in (("triton_prefix", ours, kv_bytes + bridge_bytes),
                                 ("triton_prefix_block_n64", ours_block_n64, kv_bytes + bridge_bytes),
                                 ("sdpa_no_bridge", sdpa_no_bridge, kv_bytes),
                                 ("concat_sdpa", concat_sdpa, kv_bytes + bridge_bytes)):
            def all_sets(fn=fn):
                for _ in range(copies):
                    fn()

            for rep in (1, 2):  # each variant twice: a gap below the spread is noise
                # GPU time: replays of a CUDA graph over every input copy (how the engine runs
                # it); eager_us adds Python + launch overhead (what a graph-less caller pays).
                t = time_graphed(all_sets, copies, warmup=5 if cuda else 1, reps=30 if cuda else 3)
                te = time_fn(fn, warmup=5 if cuda else 1, reps=30 if cuda else 3)
                rows.append(dict(kernel=name, rep=rep, batch=B, context=ctx, us=t["median_ms"] * 1e3,
                                 p10_us=t["p10_ms"] * 1e3, p90_us=t["p90_ms"] * 1e3,
                                 eager_us=te["median_ms"] * 1e3,
                                 tb_s=nbytes / (t["median_ms"] * 1e-3) / 1e12))
                checkpoint(rows)
    base = {(r["batch"], r["context"]): r["us"] for r in rows if r["kernel"] == "sdpa_no_bridge" and r["rep"] == 1}
    for r in rows:
        r["time_vs_sdpa_no_bridge"] = r["us"] / base[(r["batch"], r["context"])]
    print_table(rows, ["kernel", "rep", "batch", "context", "us", "p10_us", "p90_us", "eager_us", "tb_s",
                      "time_vs_sdpa_no_bridge"])

    def plot(ax):
        for name in ("triton_prefix", "triton_prefix_block_n64", "sdpa_no_bridge", "concat_sdpa"):
            sel = [r for r in rows if r["kernel"] == name and r["rep"] == 1]
            ax.bar([f"{r['batch']}x{r['context']}\n{name}" for r in sel], [r["tb_s"] for r in sel], label=name)
        ax.set_ylabel("effective TB/s")
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title("prefix attention decode (bf16, 32q/8kv, D128, K=5)")
    path = write_results(out_name, rows, plot=plot)
    print("wrote", path)


if __name__ == "__main__":
    main()
