"""Where a graphed decode step spends its GPU time: torch.profiler over generate() on the
Llama-3-8B shape (random bf16 weights), kernels ranked by total CUDA time, per step.

Usage (GPU): python benchmarks/profile_decode.py [--batch 1] [--steered MODE]; --smoke profiles a
tiny model's CPU ops instead (checks the harness only).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import gpu_or_smoke
from shapes import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steered", default=None, help="SVGT refresh mode (default: unsteered)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU ops (checks the harness only)")
    args = ap.parse_args()
    dev, dtype = gpu_or_smoke(args.smoke)
    if args.smoke:
        args.shape, args.prompt = "tiny", 16
    kind = "CUDA" if dev == "cuda" else "CPU"
    import svgt_fast
    from svgt_fast.tiny import build_value_module

    model = build_model(args.shape, dev, dtype)
    eng = svgt_fast.Engine(model, max_batch=args.batch, max_seq_len=args.prompt + 80)
    steering = None
    if args.steered:
        steering = svgt_fast.SVGT(build_value_module(model, seed=0, n_intervention_tokens=5), refresh_interval=5,
                                  refresh=args.steered)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt))
    run = lambda n: svgt_fast.generate(model, prompts, max_new_tokens=n, steering=steering, engine=eng, eos_token_id=[])
    run(8)
    n = 41
    with profile(activities=[getattr(ProfilerActivity, kind)]) as prof:
        out = run(n)
        if dev == "cuda":
            torch.cuda.synchronize()
    print("timings", out.timings)
    steps = n - 1
    # CUDA: kernels (device time); CPU (smoke): every op, nested ones too (self time)
    events = [e for e in prof.key_averages() if e.device_type.name == kind]
    time_of = (lambda e: e.device_time_total) if dev == "cuda" else (lambda e: e.self_cpu_time_total)
    if not events:
        raise SystemExit(f"the profiler recorded no {kind} events")
    events.sort(key=lambda e: -time_of(e))
    total = sum(time_of(e) for e in events)
    print(f"{kind} time per step {total / steps / 1e3:.3f} ms (incl. prefill), {'kernels' if dev == 'cuda' else 'ops'} "
          f"per step {sum(e.count for e in events) / steps:.0f}")
    for e in events[:25]:
        print(f"{time_of(e) / steps:9.1f} us/step {e.count / steps:6.1f}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
