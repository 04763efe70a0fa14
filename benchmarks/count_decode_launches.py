"""Kernels per decode step of the fast engine, counted on the CPU (no GPU needed): the ATen ops
the step dispatches (views and allocations left out: they launch nothing) plus the Triton
kernels it launches (run in Triton's interpreter; the interpreter's own argument copies are not
counted). On a GPU each is one kernel (one graph node under CUDA graphs), so this is the launch
count the graphed step replays — the figure behind NOTES.md's "~2000 tiny kernels per token"
(the old step) and "~10 per layer" (the fused one).

Per step = (count over a 12-token call - count over a 4-token call) / 8, so the prefill and the
one-off work cancel. Usage: python benchmarks/count_decode_launches.py [--family llama] [--steered]
"""
from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# scalar_tensor: a Python number wrapped as a 0-d CPU tensor (`torch.where(done, 0, tok)`), a kernel
# argument on a GPU, not a launch.
NO_KERNEL = ("empty", "empty_like", "new_empty", "empty_strided", "_unsafe_view", "_local_scalar_dense",
             "scalar_tensor")


class _Count(TorchDispatchMode):
    def __init__(self, inside):
        super().__init__()
        self.inside, self.ops = inside, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not self.inside[0] and not view and func.__name__.split(".")[0] not in NO_KERNEL:
            self.ops[func.__name__] += 1
        return out


def count(model, steering, n_new: int, eng) -> tuple[collections.Counter, collections.Counter]:
    import svgt_fast
    from triton.runtime.interpreter import InterpretedFunction

    inside, launches = [False], collections.Counter()
    run = InterpretedFunction.run

    def counted(self, *a, **k):
        launches[self.fn.__name__] += 1
        inside[0] = True
        try:
            return run(self, *a, **k)
        finally:
            inside[0] = False

    InterpretedFunction.run = counted
    try:
        mode = _Count(inside)
        with mode:
            svgt_fast.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=n_new, engine=eng, steering=steering,
                               eos_token_id=[])
    finally:
        InterpretedFunction.run = run
    return mode.ops, launches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="llama")
    ap.add_argument("--steered", action="store_true", help="SVGT exact, no refresh in the counted steps")
    args = ap.parse_args()
    import svgt_fast
    from svgt_fast.tiny import build_tiny_model, build_value_module

    model = build_tiny_model(args.family, seed=0)
    L = model.config.num_hidden_layers
    eng = svgt_fast.Engine(model, max_batch=2, max_seq_len=64, attention="triton")
    steering = svgt_fast.SVGT(build_value_module(model, seed=0), refresh_interval=1000) if args.steered else None
    (ops4, tl4), (ops12, tl12) = (count(model, steering, n, eng) for n in (4, 12))
    per = lambda a, b: {k: (b[k] - a.get(k, 0)) / 8 for k in b if b[k] != a.get(k, 0)}
    ops, tl = per(ops4, ops12), per(tl4, tl12)
    n_ops, n_tl = sum(ops.values()), sum(tl.values())
    print(f"{args.family}, {L} layers, {'SVGT' if args.steered else 'unsteered'}: per decode step "
          f"{n_ops + n_tl:.1f} kernels = {n_ops:.1f} ATen + {n_tl:.1f} Triton ({(n_ops + n_tl) / L:.1f} per layer)")
    for name, v in sorted({**ops, **tl}.items(), key=lambda kv: -kv[1]):
        print(f"  {v:6.2f}  {name}")


if __name__ == "__main__":
    main()
