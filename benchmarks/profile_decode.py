"""Where a graphed decode step spends its GPU time: torch.profiler over generate() on the
Llama-3-8B shape (random bf16 weights), kernels ranked by total CUDA time, per step.

Usage (GPU): python benchmarks/profile_decode.py [--batch 1] [--steered MODE]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from shapes import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steered", default=None, help="SVGT refresh mode (default: unsteered)")
    args = ap.parse_args()
    import svgt_fast
    from svgt_fast.tiny import build_value_module

    model = build_model(args.shape, "cuda", torch.bfloat16)
    eng = svgt_fast.Engine(model, max_batch=args.batch, max_seq_len=args.prompt + 80)
    steering = None
    if args.steered:
        steering = svgt_fast.SVGT(build_value_module(model, seed=0, n_intervention_tokens=5), refresh_interval=5,
                                  refresh=args.steered)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt))
    run = lambda n: svgt_fast.generate(model, prompts, max_new_tokens=n, steering=steering, engine=eng, eos_token_id=[])
    run(8)
    n = 41
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = run(n)
        torch.cuda.synchronize()
    print("timings", out.timings)
    steps = n - 1
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    print(f"CUDA time per step {total / steps / 1e3:.3f} ms (incl. prefill), kernels per step "
          f"{sum(e.count for e in events) / steps:.0f}")
    for e in events[:25]:
        print(f"{e.device_time_total / steps:9.1f} us/step {e.count / steps:6.1f}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
