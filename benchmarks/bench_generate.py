"""End-to-end generation: the fast engine vs HF `generate` vs the eager SVGT reference, and the
SVGT-exact / unsteered ratio, all in one run on one device (BENCH.md).

Usage: python benchmarks/bench_generate.py [--shape llama3-8b] [--smoke]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import copy_bandwidth_gbs, print_table, write_results
from shapes import build_model


def _engine_run(svgt_fast, model, eng, prompts, n_new, steering):
    out = svgt_fast.generate(model, prompts, max_new_tokens=n_new, steering=steering, engine=eng, eos_token_id=[])
    t = out.timings
    steps = max(1, n_new - 1)
    return {"ms_per_token": t["decode_s"] * 1e3 / steps, "prefill_ms": t["prefill_s"] * 1e3,
            "refresh_steps": t["refresh_steps"], "graph_steps": t.get("graph_steps", 0),
            "refresh_ms": t["refresh_s"] * 1e3}


def _hf_ms_per_token(model, ids, n_new):
    def run(n):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t
    run(2)
    return (run(n_new + 1) - run(1)) * 1e3 / n_new


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--modes", default="exact", help="SVGT refresh modes, comma-separated (exact,bridge,project,window=8)")
    ap.add_argument("--intervals", default="5", help="refresh intervals, comma-separated")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--no-baselines", action="store_true", help="skip HF generate and the eager reference")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the harness only)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("no GPU: run with --smoke to check the harness on CPU")
    if args.smoke:
        args.shape, args.prompt, args.new_tokens, args.batches = "tiny", 16, 12, "1,2"
        args.modes, args.intervals = "exact,bridge,project,window=2", "5"
    import svgt_fast
    from svgt_fast.tiny import build_value_module

    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(args.shape, dev, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    module = build_value_module(model, seed=0, n_intervention_tokens=5)
    modes = args.modes.split(",")
    intervals = [int(i) for i in args.intervals.split(",")]
    eng = svgt_fast.Engine(model, max_batch=max(batches), max_seq_len=args.prompt + args.new_tokens + 8)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth_gbs()
    vocab = model.config.vocab_size
    rows = []
    g = torch.Generator().manual_seed(0)
    for B in batches:
        prompts = torch.randint(0, vocab, (B, args.prompt), generator=g)
        kv_bytes_avg = (2 * len(eng.w.layers) * B * eng.w.n_kv_heads * eng.w.head_dim * model.dtype.itemsize
                        * (args.prompt + args.new_tokens / 2))
        floor_ms = (weight_bytes + kv_bytes_avg) / (bw * 1e9) * 1e3 if bw else None
        configs = [("engine_unsteered", None)] + [
            (f"engine_svgt_{m}_k5_r{r}", svgt_fast.SVGT(module, refresh_interval=r, refresh=m))
            for m in modes for r in intervals]
        plain_ms = None
        for what, steering in configs:
            _engine_run(svgt_fast, model, eng, prompts, 8, steering)  # warm-up: compiles and captures graphs
            for rep in (1, 2):
                res = _engine_run(svgt_fast, model, eng, prompts, args.new_tokens, steering)
                row = dict(what=what, batch=B, rep=rep, **res)
                if steering is None:
                    row["pct_of_floor"] = floor_ms / res["ms_per_token"] * 100 if floor_ms else None
                    plain_ms = res["ms_per_token"] if plain_ms is None else min(plain_ms, res["ms_per_token"])
                else:
                    row["ratio_vs_unsteered"] = res["ms_per_token"] / plain_ms
                rows.append(row)
        if args.no_baselines:
            continue
        hf = _hf_ms_per_token(model, prompts.to(dev), 8 if args.smoke else 32)
        rows.append(dict(what="hf_generate", batch=B, rep=1, ms_per_token=hf, engine_speedup=hf / plain_ms))
        if B == 1:  # the authors' recompute loop (our eager oracle), a few tokens
            n = 4 if args.smoke else 16
            steering = svgt_fast.SVGT(module, refresh_interval=5)
            t = time.perf_counter()
            svgt_fast.generate(model, prompts[:1], max_new_tokens=n, steering=steering, engine="reference", eos_token_id=[])
            if cuda:
                torch.cuda.synchronize()
            ref_ms = (time.perf_counter() - t) * 1e3 / n
            st = [r["ms_per_token"] for r in rows if r["what"] == "engine_svgt_exact_k5_r5" and r["batch"] == 1]
            rows.append(dict(what="eager_svgt_reference_r5", batch=1, rep=1, ms_per_token=ref_ms,
                             engine_svgt_speedup=ref_ms / min(st) if st else None,
                             ratio_vs_unsteered=ref_ms / plain_ms))
    cols = ["what", "batch", "rep", "ms_per_token", "prefill_ms", "pct_of_floor", "ratio_vs_unsteered",
            "engine_speedup", "engine_svgt_speedup", "refresh_steps", "refresh_ms", "graph_steps"]
    print_table(rows, cols)

    def plot(ax):
        sel = [r for r in rows if r["rep"] == 1]
        ax.bar([f"{r['what']}\nB={r['batch']}" for r in sel], [r["ms_per_token"] for r in sel])
        ax.set_yscale("log")
        ax.set_ylabel("ms / token")
        ax.tick_params(axis="x", labelsize=5)
        ax.set_title(f"{args.shape}, prompt {args.prompt}, {args.new_tokens} new tokens")
    extra = {"shape": args.shape, "modes": modes, "intervals": intervals, "prompt": args.prompt, "new_tokens": args.new_tokens,
             "weight_bytes": weight_bytes, "copy_bandwidth_gbs": bw}
    print("wrote", write_results(f"generate_{args.shape}{args.tag}" + ("_smoke" if args.smoke else ""), rows, extra, plot))


if __name__ == "__main__":
    main()
