"""Sparse triggering and per-request steering (issue 5): SVGT time per token over unsteered when
0 %, ~10 % and 100 % of the sequences fire, at batch 1, 16 and 64; and a mixed batch (half
unsteered, the rest split between two modules) against the homogeneous steered batch.
Llama-3-8B shape, bf16, prompt 512, 128 new tokens, refresh "bridge" every 5 (BENCH.md rules).

The firing rate is set by the policy: 0 % = sparse with an unreachable score threshold (no drift
rule), 100 % = policy "always", ~10 % = per-request: that share of rows "always", the rest
sparse-never. Usage: python benchmarks/bench_sparse.py [--smoke]
"""
from __future__ import annotations

import argparse

import torch

from common import decode_ms_per_token, gpu_or_smoke, partial_results, print_table, write_results
from shapes import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--refresh", default="bridge")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the harness only)")
    args = ap.parse_args()
    dev, dtype = gpu_or_smoke(args.smoke)
    if args.smoke:
        args.shape, args.prompt, args.new_tokens, args.batches = "tiny", 12, 10, "1,4"
    import svgt_fast
    from svgt_fast.tiny import build_value_module

    model = build_model(args.shape, dev, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    mod_a = build_value_module(model, seed=0, n_intervention_tokens=5)
    mod_b = build_value_module(model, seed=1, n_intervention_tokens=5)
    mk = lambda m, **kw: svgt_fast.SVGT(m, refresh_interval=5, refresh=args.refresh, **kw)
    always, never = mk(mod_a), mk(mod_a, policy="sparse", score_threshold=1e9)
    eng = svgt_fast.Engine(model, max_batch=max(batches), max_seq_len=args.prompt + args.new_tokens + 8)
    g = torch.Generator().manual_seed(0)
    rows = []
    name = f"sparse_{args.shape}" + ("_smoke" if args.smoke else "")
    extra = {"shape": args.shape, "prompt": args.prompt, "new_tokens": args.new_tokens, "refresh": args.refresh}
    checkpoint = partial_results(name, extra)

    for B in batches:
        prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt), generator=g)
        n10 = max(1, round(0.1 * B)) if B > 1 else None
        configs = [("unsteered", None), ("fire_0pct", never), ("fire_100pct", always)]
        if n10:
            configs.append((f"fire_{100 * n10 // B}pct", [always] * n10 + [never] * (B - n10)))
        if B > 1:
            half = B // 2
            configs.append(("mixed_half_unsteered_two_modules",
                            [None] * half + [mk(mod_a) if i % 2 else mk(mod_b) for i in range(B - half)]))
        base = None
        for what, steering in configs:
            for rep in (1, 2):
                ms, out = decode_ms_per_token(model, prompts, steering, eng, args.new_tokens, warmup=rep == 1)
                trig = out.trigger_counts
                base = ms if what == "unsteered" and base is None else base
                rows.append(dict(what=what, batch=B, rep=rep, ms_per_token=ms, ratio_vs_unsteered=ms / base,
                                 mean_triggers=float(trig.float().mean())))
                checkpoint(rows)
        homo = min(r["ms_per_token"] for r in rows if r["batch"] == B and r["what"] == "fire_100pct")
        for r in rows:
            if r["batch"] == B and r["what"].startswith("mixed"):
                r["throughput_vs_homogeneous_steered"] = homo / r["ms_per_token"]
    print_table(rows, ["what", "batch", "rep", "ms_per_token", "ratio_vs_unsteered", "mean_triggers",
                       "throughput_vs_homogeneous_steered"])

    def plot(ax):
        for B in batches:
            sel = [r for r in rows if r["batch"] == B and r["rep"] == 1]
            ax.plot([r["what"] for r in sel], [r["ratio_vs_unsteered"] for r in sel], marker="o", label=f"batch {B}")
        ax.set_ylabel("time / unsteered")
        ax.tick_params(axis="x", labelsize=6, rotation=20)
        ax.legend()
    print("wrote", write_results(name, rows, extra, plot))


if __name__ == "__main__":
    main()
