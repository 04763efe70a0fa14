"""End-to-end generation: the fast engine vs HF `generate` vs the eager SVGT reference, and the
SVGT / unsteered ratios, all in one run on one device (BENCH.md). The benchmark itself is
`svgt_fast.bench.generate_bench`, which `svgt-fast bench` runs too.

Usage: python benchmarks/bench_generate.py [--shape llama3-8b] [--smoke]
"""
from __future__ import annotations

import argparse

from common import gpu_or_smoke, partial_results, print_table, write_results
from shapes import build_model

from svgt_fast.bench import TABLE_COLUMNS, generate_bench, plot_generate


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
    dev, dtype = gpu_or_smoke(args.smoke)
    if args.smoke:
        args.shape, args.prompt, args.new_tokens, args.batches = "tiny", 16, 12, "1,2"  # modes, intervals: as given
    model = build_model(args.shape, dev, dtype)
    name = f"generate_{args.shape}{args.tag}" + ("_smoke" if args.smoke else "")
    rows, extra = generate_bench(
        model, batches=[int(b) for b in args.batches.split(",")], prompt=args.prompt, new_tokens=args.new_tokens,
        modes=args.modes.split(","), intervals=[int(i) for i in args.intervals.split(",")],
        baselines=not args.no_baselines, smoke=args.smoke, checkpoint=partial_results(name, dict(shape=args.shape)))
    print_table(rows, TABLE_COLUMNS)
    title = f"{args.shape}, prompt {args.prompt}, {args.new_tokens} new tokens"
    print("wrote", write_results(name, rows, dict(shape=args.shape, **extra), plot_generate(rows, title)))


if __name__ == "__main__":
    main()
