"""ConVA, NeVA and RE-Control next to SVGT (issue 6): time per token over unsteered, batch 1 and
16, Llama-3-8B shape, bf16, prompt 512, 128 new tokens (BENCH.md rules). Random artifacts of real
shapes: ConVA on layers 4..26 (all but the last 5, stride 2), NeVA 64 neurons on every layer,
RE-Control a 4096-1024-1024-1 MLP with 5 steps, SVGT K=5 refresh "bridge" every 5.
Usage: python benchmarks/bench_interventions.py [--smoke]
"""
from __future__ import annotations

import argparse

import torch

from common import decode_ms_per_token, gpu_or_smoke, partial_results, print_table, write_results
from shapes import build_model


def artifacts(model, dev):
    import svgt_fast
    from svgt_fast.conva import ConVAConfig, ConVAVectors
    from svgt_fast.neva import NeVAConfig, NeVANeurons
    from svgt_fast.tiny import build_value_module

    cfg = model.config
    L, d, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(0)
    layers = list(range(min(4, L - 6), L - 5, 2)) or [0]
    n = len(layers)
    conva = svgt_fast.ConVA(ConVAVectors(ConVAConfig(d, L, layers), torch.randn(n, d, generator=g) * 0.02,
                                         torch.zeros(n), torch.randn(n, d, generator=g) * 0.02, torch.zeros(n)).to(dev))
    k = min(64, inter)
    idx = torch.stack([torch.randperm(inter, generator=g)[:k] for _ in range(L)])
    neva = svgt_fast.NeVA(NeVANeurons(NeVAConfig(d, inter, L, list(range(L)), k), idx, torch.randn(L, k, generator=g)))
    vf = svgt_fast.REControlValue(svgt_fast.REControlConfig(d, [min(1024, 4 * d)] * 2, "relu")).to(dev)
    rc = svgt_fast.REControl(vf, n_steps=5, step_size=0.1)
    sv = svgt_fast.SVGT(build_value_module(model, seed=0, n_intervention_tokens=5), refresh_interval=5, refresh="bridge")
    return {"conva": conva, "neva": neva, "re_control_5": rc, "svgt_bridge_r5": sv}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the harness only)")
    args = ap.parse_args()
    dev, dtype = gpu_or_smoke(args.smoke)
    if args.smoke:
        args.shape, args.prompt, args.new_tokens, args.batches = "tiny8", 12, 8, "1,2"
    import svgt_fast

    model = build_model(args.shape, dev, dtype)
    methods = artifacts(model, dev)
    batches = [int(b) for b in args.batches.split(",")]
    eng = svgt_fast.Engine(model, max_batch=max(batches), max_seq_len=args.prompt + args.new_tokens + 8)
    g = torch.Generator().manual_seed(0)
    rows = []
    name = f"interventions_{args.shape}" + ("_smoke" if args.smoke else "")
    extra = {"shape": args.shape, "prompt": args.prompt, "new_tokens": args.new_tokens}
    checkpoint = partial_results(name, extra)
    for B in batches:
        prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt), generator=g)
        base = None
        for what, steering in [("unsteered", None), *methods.items(),
                               ("mixed_all_four", [list(methods.values())[i % 4] for i in range(B)]) if B >= 4 else
                               ("mixed_all_four", None)]:
            if what == "mixed_all_four" and steering is None:
                continue
            for rep in (1, 2):
                ms, _ = decode_ms_per_token(model, prompts, steering, eng, args.new_tokens, warmup=rep == 1)
                base = ms if base is None else base
                rows.append(dict(what=what, batch=B, rep=rep, ms_per_token=ms, ratio_vs_unsteered=ms / base))
                checkpoint(rows)
    print_table(rows, ["what", "batch", "rep", "ms_per_token", "ratio_vs_unsteered"])

    def plot(ax):
        for B in batches:
            sel = [r for r in rows if r["batch"] == B and r["rep"] == 1]
            ax.bar([f"{r['what']}\nB={B}" for r in sel], [r["ratio_vs_unsteered"] for r in sel])
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylabel("time / unsteered")
        ax.tick_params(axis="x", labelsize=5)
    print("wrote", write_results(name, rows, extra, plot))


if __name__ == "__main__":
    main()
