"""The fast engine at the Llama-3-8B layer width, on the CPU: a few full-width layers (d 4096,
32/8 heads of 128, SwiGLU 14336, vocab 128256, llama3 RoPE) with random weights, so every kernel
and tile choice meets the shapes the GPU benchmarks use, not only the tiny test widths.

Checks, for a batch of ragged prompts:
- fp32: unsteered tokens equal HF generate and the reference; a batch mixing SVGT rows (exact,
  bridge, project, window, sparse) and ConVA / NeVA / RE-Control rows equals the reference
  (tokens, finish reasons, trigger counts); with --attention triton the Triton kernels run under
  the interpreter (TRITON_INTERPRET=1) at these widths.
- --bf16: issue 3's bf16 bar (helpers.check_bf16_bar) at this width.
- --kernels: prefix attention at bench_prefix_attention's shapes (32/8 heads of 128, 4096 keys,
  batch 1 and 16, split-K as an H100 or H200 picks it: 132 SMs) and a 512-token prefill chunk,
  fp32 and fp16, under the interpreter, against the reference.

Not in CI (minutes and ~12 GB of memory at 7 layers, the fewest ConVA can steer):
    python tests/real_width.py [--shape llama3-8b] [--layers 7] [--new 8] [--attention torch|triton] [--bf16|--kernels]
"""
from __future__ import annotations

import os
import sys
import time

import torch

from helpers import check_bf16_bar, intervention, output_differences, random_artifact


SHAPE = "llama3-8b"  # --shape: another named shape of svgt_fast.bench.SHAPES (e.g. qwen2.5-0.5b) or below
# Shapes checked here only (not bench shapes): Qwen3-8B's config — q/k norms, head_dim 128, SwiGLU 12288.
EXTRA_SHAPES = {
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False),
}


def build(layers: int, dtype) -> torch.nn.Module:
    from svgt_fast.bench import SHAPES, random_model

    return random_model(dict({**SHAPES, **EXTRA_SHAPES}[SHAPE], num_hidden_layers=layers), "cpu", dtype)


def prompts(vocab: int, lengths=(5, 17, 11)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


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
            found = output_differences(ref, out, lambda i: f"{label} row {i}")
            print(f"{label}: reference {t1 - t0:.0f} s, fast {time.time() - t1:.0f} s, "
                  f"{'EQUAL' if not found else 'DIFFER'}; triggers {out.trigger_counts.tolist()}", flush=True)
            problems += found
            if not sampling and all(torch.equal(ref.new_tokens[i], plain.new_tokens[i])
                                    for i in range(B) if steering[i] is not None):
                problems.append(f"{label}: steering changed no token (the check would not see it misapplied)")
    return problems


def check_kernels() -> list[str]:
    from svgt_fast.kernels.prefix_attention import prefix_attention, splits_for
    from svgt_fast.kernels.reference import prefix_attention_ref

    Hq, Hkv, D, S, kmax, sms = 32, 8, 128, 4096, 5, 132
    problems = []
    # (batch, queries per row, split-K): decode with the split an H100 / H200 picks (16 at B=1:
    # 8 programs; 3 at B=16: 128 programs); a 512-query prefill chunk (one split and two)
    cases = [(1, 1, splits_for(1 * Hkv, S, sms)), (16, 1, splits_for(16 * Hkv, S, sms)), (1, 512, 1), (2, 512, 2)]
    for dtype in (torch.float32, torch.float16):
        for B, M, n_splits in cases:
            g = torch.Generator().manual_seed(B * 1000 + M)
            rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
            q, kc, vc = rnd(B, M, Hq, D), rnd(B, Hkv, S + 1, D), rnd(B, Hkv, S + 1, D)
            kb, vb = rnd(B, Hkv, kmax, D), rnd(B, Hkv, kmax, D)
            P = torch.randint(S // 2, S - M, (B,), generator=g)  # prompts then responses; ragged
            if M == 1:  # row 0 decodes its first response token
                P[0] = S - M - kmax
            bl = torch.full((B,), kmax)
            bl[B // 2:] = torch.randint(0, kmax + 1, (B - B // 2,), generator=g)
            # decode: the newest logical index of each row; prefill chunk: the last M positions
            last = (S - 1 - kmax) + bl if M == 1 else P + bl + M - 1
            q_pos = last[:, None] - torch.arange(M - 1, -1, -1)[None]
            args = (q, kc, vc, q_pos, P, bl, kb, vb, D ** -0.5)
            t0 = time.time()
            got = prefix_attention(*args, n_slots=S, n_splits=n_splits).float()
            want = prefix_attention_ref(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                                          for a in args), n_slots=S)
            same = prefix_attention_ref(*args, n_slots=S, compute_dtype=dtype).float()
            err, bar = (got - want).abs().max().item(), (same - want).abs().max().item()
            ok = err <= 1e-4 if dtype == torch.float32 else err <= 2 * bar + 1e-6
            print(f"prefix attention {str(dtype)[6:]} B={B} M={M} splits={n_splits}: error {err:.2e} "
                  f"(same-dtype reference {bar:.2e}) {'ok' if ok else 'TOO LARGE'}, {time.time() - t0:.0f} s", flush=True)
            if not ok:
                problems.append(f"prefix attention {dtype} B={B} M={M} splits={n_splits}: error {err} vs {bar}")
    return problems


def main() -> int:
    args = sys.argv[1:]

    def opt(name, default):
        return type(default)(args[args.index(name) + 1]) if name in args else default

    global SHAPE
    layers, n_new, attention = opt("--layers", 7), opt("--new", 8), opt("--attention", "torch")
    SHAPE = opt("--shape", SHAPE)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    if "--bf16" in args:
        ties = check_bf16_bar(build(layers, torch.bfloat16), n_new=n_new, lengths=(9, 23))
        print(f"bf16 bar at full width of {SHAPE}, {layers} layers: passed ({ties} ties), {time.time() - t0:.0f} s")
        return 0
    problems = check_kernels() if "--kernels" in args else check_fp32(layers, n_new, attention)
    for p in problems:
        print("PROBLEM", p)
    print(f"{'kernels' if '--kernels' in args else f'{SHAPE} fp32, {layers} layers, attention {attention}'}: {len(problems)} problems, {time.time() - t0:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
