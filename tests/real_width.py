"""The fast engine at the Llama-3-8B layer width, on the CPU: a few full-width layers (d 4096,
32/8 heads of 128, SwiGLU 14336, vocab 128256, llama3 RoPE) with random weights, so every kernel
and tile choice meets the shapes the GPU benchmarks use, not only the tiny test widths.

Checks, for a batch of ragged prompts:
- fp32: unsteered tokens equal HF generate and the reference; a batch mixing SVGT rows (exact,
  bridge, project, window, sparse) and ConVA / NeVA / RE-Control rows equals the reference
  (tokens, finish reasons, trigger counts); with --attention triton the Triton kernels run under
  the interpreter (TRITON_INTERPRET=1) at these widths.
- --bf16: issue 3's bf16 bar (helpers.check_bf16_bar) at this width.

Not in CI (minutes and ~12 GB of memory at 7 layers, the fewest ConVA can steer):
    python tests/real_width.py [--layers 7] [--new 8] [--attention torch|triton] [--bf16]
"""
from __future__ import annotations

import os
import sys
import time

import torch

from helpers import check_bf16_bar, intervention, random_artifact


def build(layers: int, dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from svgt_fast.bench import SHAPES

    args = dict(SHAPES["llama3-8b"], num_hidden_layers=layers)
    model_type = args.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **args), dtype=dtype)
    return model.eval()


def prompts(vocab: int, lengths=(5, 17, 11)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def compare(name: str, ref, out) -> list[str]:
    problems = []
    for i in range(ref.new_tokens.shape[0]):
        a = ref.new_tokens[i, :int(ref.num_new_tokens[i])].tolist()
        b = out.new_tokens[i, :int(out.num_new_tokens[i])].tolist()
        if a != b:
            problems.append(f"{name} row {i}: reference {a} vs fast {b}")
        if ref.finish_reasons[i] != out.finish_reasons[i]:
            problems.append(f"{name} row {i}: finish {out.finish_reasons[i]!r} vs {ref.finish_reasons[i]!r}")
        if int(ref.trigger_counts[i]) != int(out.trigger_counts[i]):
            problems.append(f"{name} row {i}: triggers {int(out.trigger_counts[i])} vs {int(ref.trigger_counts[i])}")
    return problems


def check_fp32(layers: int, n_new: int, attention: str) -> list[str]:
    from svgt_fast import SVGT, Engine, generate
    from svgt_fast.tiny import build_value_module

    model = build(layers, torch.float32)
    ps = prompts(model.config.vocab_size)
    B = len(ps)
    problems = []
    t0 = time.time()
    hf = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         pad_token_id=0)[0, len(p):].tolist() for p in ps]
    print(f"HF generate: {time.time() - t0:.0f} s", flush=True)
    eng = Engine(model, max_batch=B, max_seq_len=max(map(len, ps)) + n_new + 2, attention=attention)
    eng.graph_emulation = True  # replay a recorded step, as a CUDA graph would
    kw = dict(max_new_tokens=n_new, eos_token_id=[])
    t0 = time.time()
    plain = generate(model, ps, engine=eng, **kw)
    print(f"fast unsteered: {time.time() - t0:.0f} s", flush=True)
    for i, p in enumerate(ps):
        if plain.new_tokens[i].tolist() != hf[i]:
            problems.append(f"unsteered row {i}: HF {hf[i]} vs fast {plain.new_tokens[i].tolist()}")

    vm = build_value_module(model, seed=900)
    vm3 = build_value_module(model, seed=901, generator="mlp", n_intervention_tokens=3)
    batches = {
        "svgt exact/bridge/project": [SVGT(vm, refresh="exact", refresh_interval=2),
                                      SVGT(vm3, refresh="bridge", refresh_interval=1, beta=0.5),
                                      SVGT(vm, refresh="project", refresh_interval=3, trigger="prompt")],
        "svgt window/sparse + none": [SVGT(vm3, refresh="window=3", refresh_interval=2),
                                      SVGT(vm, policy="sparse", score_threshold=0.0, drift_threshold=0.2,
                                           refresh_interval=1),
                                      None],
        "conva/neva/re_control": [intervention(k, random_artifact(model, k, seed=903))
                                  for k in ("conva", "neva", "re_control")],
    }
    sampled = dict(temperature=1.0, top_p=0.9, top_k=40, seed=7)
    for name, steering in batches.items():
        for sampling in ({}, sampled):
            label = f"{name}{' sampled' if sampling else ''}"
            t0 = time.time()
            ref = generate(model, ps, steering=steering, engine="reference", **kw, **sampling)
            t1 = time.time()
            out = generate(model, ps, steering=steering, engine=eng, **kw, **sampling)
            found = compare(label, ref, out)
            print(f"{label}: reference {t1 - t0:.0f} s, fast {time.time() - t1:.0f} s, "
                  f"{'EQUAL' if not found else 'DIFFER'}; triggers {out.trigger_counts.tolist()}", flush=True)
            problems += found
            if not sampling and all(torch.equal(ref.new_tokens[i], plain.new_tokens[i])
                                    for i in range(B) if steering[i] is not None):
                problems.append(f"{label}: steering changed no token (the check would not see it misapplied)")
    return problems


def main() -> int:
    args = sys.argv[1:]

    def opt(name, default):
        return type(default)(args[args.index(name) + 1]) if name in args else default

    layers, n_new, attention = opt("--layers", 7), opt("--new", 8), opt("--attention", "torch")
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    if "--bf16" in args:
        ties = check_bf16_bar(build(layers, torch.bfloat16), n_new=n_new, lengths=(9, 23))
        print(f"bf16 bar at full width, {layers} layers: passed ({ties} ties), {time.time() - t0:.0f} s")
        return 0
    problems = check_fp32(layers, n_new, attention)
    for p in problems:
        print("PROBLEM", p)
    print(f"fp32, {layers} layers, attention {attention}: {len(problems)} problems, {time.time() - t0:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
