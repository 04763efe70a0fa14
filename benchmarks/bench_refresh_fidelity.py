"""Fidelity of the approximate refresh modes against refresh="exact" (issue 4's table).

For each prompt: the exact mode generates greedily (its logits recorded); every other mode is
then teacher-forced on the exact tokens, so both see the same context at every step, and we
report mean KL(p_exact || p_mode) of the next-token distributions and greedy (argmax)
agreement. Also: the share of free-running greedy tokens equal to exact's. CPU is fine: this is
a fidelity table, not a timing. The model is named in the output (a random-weight tiny Llama
until a trained one ships).

Usage: python benchmarks/bench_refresh_fidelity.py [--prompts 32] [--steps 128]
"""
from __future__ import annotations

import argparse

import torch

from common import print_table, write_results

MODES = ("window=8", "window=2", "bridge", "project")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=24)
    args = ap.parse_args()
    import svgt_fast
    from svgt_fast.sampling import SamplingParams
    from svgt_fast.tiny import build_tiny_model, build_value_module

    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=512)
    model = build_tiny_model("llama", seed=0, **shape)
    module = build_value_module(model, seed=0, n_intervention_tokens=5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (args.prompt_len,), generator=g) for _ in range(args.prompts)]
    eng = svgt_fast.Engine(model, max_batch=args.prompts, max_seq_len=args.prompt_len + args.steps + 1)
    kw = dict(max_new_tokens=args.steps, sampling=SamplingParams(), row_seeds=torch.arange(args.prompts),
              eos_ids=frozenset(), pad_id=0)
    rows = []
    for interval in (1, 5):
        exact = svgt_fast.SVGT(module, refresh_interval=interval, refresh="exact")
        ex_logits = []
        ex_tokens, _, _ = eng.generate(prompts, steering=exact, logits_out=ex_logits, **kw)
        p_exact = torch.stack(ex_logits, 1).float().log_softmax(-1)  # [B, N, V]
        for mode in MODES:
            st = svgt_fast.SVGT(module, refresh_interval=interval, refresh=mode)
            logits = []
            eng.generate(prompts, steering=st, forced_tokens=ex_tokens, logits_out=logits, **kw)
            p_mode = torch.stack(logits, 1).float().log_softmax(-1)
            kl = (p_exact.exp() * (p_exact - p_mode)).sum(-1)  # [B, N]
            agree = (p_exact.argmax(-1) == p_mode.argmax(-1)).float()
            free, _, _ = eng.generate(prompts, steering=st, **kw)
            rows.append(dict(refresh_interval=interval, mode=mode, mean_kl=float(kl.mean()), max_kl=float(kl.max()),
                             greedy_agreement_forced=float(agree.mean()),
                             free_running_token_match=float((free == ex_tokens).float().mean())))
    print_table(rows, ["refresh_interval", "mode", "mean_kl", "max_kl", "greedy_agreement_forced",
                       "free_running_token_match"])
    extra = {"model": "random-weight tiny Llama (d 128, 8 layers, 8/2 heads, vocab 257), fp32, CPU",
             "svgt": "random VLP module, K=5, beta 0.8, trigger current", "prompts": args.prompts,
             "steps": args.steps, "prompt_len": args.prompt_len}

    def plot(ax):
        for interval in (1, 5):
            sel = [r for r in rows if r["refresh_interval"] == interval]
            ax.plot([r["mode"] for r in sel], [r["mean_kl"] for r in sel], marker="o", label=f"refresh every {interval}")
        ax.set_yscale("log")
        ax.set_ylabel("mean KL(exact || mode)")
        ax.legend()
    print("wrote", write_results("refresh_fidelity", rows, extra, plot))


if __name__ == "__main__":
    main()
