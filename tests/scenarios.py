"""Random whole-call scenarios for differential testing: a batch of ragged prompts, each row with
its own steering (none, SVGT in any mode / policy / trigger / K / generator, ConVA, NeVA,
RE-Control), sampling options, EOS tokens, and an engine configuration (attention backend,
graph emulation, prefill chunk size, a reused engine). `check_scenario` runs it on the fast
engine and on the reference engine and says where they differ.

tests/test_scenarios.py runs a fixed handful in CI; `python tests/scenarios.py N [first_seed]`
runs N of them and prints each failure (for hunting bugs, not a benchmark); with
--shared-engines every call of a configuration goes to one long-lived Engine."""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import torch

from helpers import intervention, output_differences, random_artifact

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Config options real checkpoints set (test_config_variants.py, test_rope_scaling.py), drawn with
# --variants: (family, overrides, randomise the biases). The RoPE types that depend on the length
# keep their fixed frequencies past MAX_LEN + the largest K, so every drawn call is admitted.
VARIANTS = {
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True), True),
    "qwen3-attention_bias": ("qwen3", dict(attention_bias=True), True),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True), True),
    "mistral-head_dim_32": ("mistral", dict(head_dim=32), False),
    "llama-mqa": ("llama", dict(num_key_value_heads=1), False),
    "llama-mha": ("llama", dict(num_key_value_heads=4), False),
    "llama-llama3_rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), False),
    "qwen2-yarn": ("qwen2", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)), False),
    "qwen3-longrope": ("qwen3", dict(rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
        long_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0], original_max_position_embeddings=64)), False),
    "mistral-dynamic": ("mistral", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0),
                                        max_position_embeddings=64), False),
}
KINDS = ("none", "svgt", "svgt", "svgt", "conva", "neva", "re_control")


@dataclass
class Scenario:
    seed: int
    family: str
    prompts: list[list[int]]
    steer: list[tuple]  # per row: ("none",) | ("svgt", module_idx, options) | (kind,)
    new_tokens: int
    sampling: dict
    eos_from: tuple[int, int] | None  # (row, step) of the reference's tokens whose token becomes EOS
    engine: dict = field(default_factory=dict)
    calls: int = 1  # the same call again on the same engine (graph replay, no state leaking)
    stream: bool = False  # through generate(..., stream=True)
    # before the checked calls, the same engine serves another call that is cut short:
    # ("stream", seed, k): another scenario's request streamed k steps, then closed;
    # ("refused", seed): a request the engine refuses (too long for its cache)
    interrupt: tuple | None = None
    variant: str | None = None  # a key of VARIANTS: the family's model with those config options

    @property
    def model_key(self):
        return self.family if self.variant is None else self.variant

    def describe(self) -> str:
        return (f"seed {self.seed}: {self.family}, lengths {[len(p) for p in self.prompts]}, "
                f"{self.new_tokens} new, sampling {self.sampling}, eos {self.eos_from}, engine {self.engine}, "
                f"calls {self.calls}, stream {self.stream}, interrupt {self.interrupt}, variant {self.variant}, "
                f"steering {self.steer}")


def random_scenario(seed: int, *, allow_triton: bool = False, variants: bool = False) -> Scenario:
    r = random.Random(seed)
    B = r.choice((1, 1, 2, 3, 4, 5, 7))
    prompts = [[r.randrange(256) for _ in range(r.randint(1, 12))] for _ in range(B)]
    steer = []
    for _ in range(B):
        kind = r.choice(KINDS)
        if kind != "svgt":
            steer.append((kind,))
            continue
        opts = dict(refresh_interval=r.choice((1, 2, 3, 5)), beta=r.choice((0.0, 0.5, 0.8, 1.0)),
                    trigger=r.choice(("current", "current", "prompt")),
                    gradient_step_size=r.choice((0.0, 0.5, 1.0, 3.0)),
                    refresh=r.choice(("exact", "exact", "bridge", "project", f"window={r.randint(1, 4)}")))
        if r.random() < 0.35:
            opts.update(policy="sparse", score_threshold=r.choice((-1e9, -0.5, 0.0, 0.5, 1e9)),
                        drift_threshold=r.choice((None, 0.0, 0.2, 0.6)))
        steer.append(("svgt", r.randrange(3), opts))
    sampling = {}
    if r.random() < 0.4:
        sampling = dict(temperature=r.choice((0.7, 1.0, 1.3)), top_p=r.choice((1.0, 0.9, 0.5)),
                        top_k=r.choice((0, 0, 5, 40)), seed=r.randrange(1000))
    engine = dict(graph_emulation=r.random() < 0.5, prefill_tokens=r.choice((4096, 4096, 8, 5)),
                  spare_batch=r.choice((0, 0, 1, 3)))
    if allow_triton and r.random() < 0.25:
        engine["attention"] = "triton"
    new_tokens = r.randint(1, 20) if r.random() < 0.85 else r.randint(33, 40)  # > 32: exact's 64-row bucket
    sc = Scenario(seed, r.choice(FAMILIES), prompts, steer, new_tokens, sampling,
                  (r.randrange(B), r.randrange(3)) if r.random() < 0.4 else None, engine,
                  calls=r.choice((1, 1, 2)), stream=r.random() < 0.2)
    # drawn from a stream of its own, so that the draws above stay what they were for every seed
    r2 = random.Random(seed * 7919 + 1)
    if r2.random() < 0.3:
        other = seed + 10**6
        sc.interrupt = ("stream", other, r2.randint(0, 12)) if r2.random() < 0.8 else ("refused", other)
        if r2.random() < 0.3:  # drawn last, so that the kinds above stay what they were
            sc.interrupt = ("overflow", other)
    if variants:  # a stream of its own again; the family follows the variant
        sc.variant = random.Random(seed * 104729 + 2).choice(sorted(VARIANTS))
        sc.family = VARIANTS[sc.variant][0]
    return sc


def _steerings(model, sc: Scenario):
    from svgt_fast import SVGT
    from svgt_fast.tiny import build_value_module

    modules = [build_value_module(model, seed=900),                                          # VLP, K=5
               build_value_module(model, seed=901, generator="mlp", n_intervention_tokens=3),
               build_value_module(model, seed=902, n_intervention_tokens=1)]
    arts = {}
    out = []
    for s in sc.steer:
        if s[0] == "none":
            out.append(None)
        elif s[0] == "svgt":
            out.append(SVGT(modules[s[1]], **s[2]))
        else:
            if s[0] not in arts:
                arts[s[0]] = intervention(s[0], random_artifact(model, s[0], seed=903))
            out.append(arts[s[0]])
    return out


MAX_LEN = 12 + 40 + 2  # the longest prompt and generation a scenario draws


def _run(model, sc: Scenario, steerings, eng, eos, kw):
    from svgt_fast import generate

    out = generate(model, sc.prompts, steering=steerings, engine=eng, eos_token_id=eos, stream=sc.stream, **kw)
    if sc.stream:
        for _ in out:
            pass
        out = out.output
    return out


def _interrupt(model, sc: Scenario, eng) -> None:
    """Serve the call sc.interrupt names on eng and cut it short. It fits any engine sized for
    sc: at most sc's batch, prompts of at most 12 tokens, at most sc's new tokens."""
    from svgt_fast import generate

    other = random_scenario(sc.interrupt[1])
    n = min(len(other.prompts), len(sc.prompts))
    other.prompts, other.steer = other.prompts[:n], other.steer[:n]
    if sc.interrupt[0] == "overflow":  # a call whose steering overflows leaves NaN in the caches
        from svgt_fast import SVGT
        from svgt_fast.tiny import build_value_module

        # 1e300: finite, so accepted, and enough to overflow every tiny family (1e30 is not, for some)
        blow = SVGT(build_value_module(model, seed=900), refresh_interval=1, gradient_step_size=1e300)
        kw = dict(steering=blow, max_new_tokens=min(3, sc.new_tokens), eos_token_id=[])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "stopped early, logits not finite": expected
            got = generate(model, other.prompts, engine=eng, **kw)
            left = sum(int((~torch.isfinite(t)).sum()) for t in (eng.v_cache, eng.v_bridge))
            want = generate(model, other.prompts, engine="reference", **kw)
        assert left > 0, "the overflowing call left no NaN or inf in the caches: it tests nothing"
        # the overflowing call itself: its rows stop where the reference's do
        assert got.finish_reasons == want.finish_reasons, (got.finish_reasons, want.finish_reasons)
        assert torch.equal(got.new_tokens, want.new_tokens)
        return
    steerings = _steerings(model, other)
    if sc.interrupt[0] == "refused":
        try:
            generate(model, other.prompts, steering=steerings, engine=eng, max_new_tokens=eng.max_seq_len)
        except ValueError:
            return
        raise AssertionError("a request longer than the engine's cache was not refused")
    stream = generate(model, other.prompts, steering=steerings, engine=eng, stream=True,
                      max_new_tokens=min(other.new_tokens, sc.new_tokens), **other.sampling)
    for i, _ in enumerate(stream if sc.interrupt[2] > 0 else ()):  # k = 0: closed before its first step
        if i + 1 >= sc.interrupt[2]:
            break
    stream.close()


def check_scenario(models: dict, sc: Scenario, engines: dict | None = None) -> list[str]:
    """Run sc on the fast engine and on the reference; the differences, as messages.
    engines: a dict that keeps one Engine per (family, engine options) across calls — a
    long-lived engine serving unrelated requests one after another (None: a new one per call)."""
    from svgt_fast import Engine, generate

    model = models[sc.model_key]
    steerings = _steerings(model, sc)
    kw = dict(max_new_tokens=sc.new_tokens, **sc.sampling)
    eos = []
    if sc.eos_from is not None:  # an EOS that really occurs: a token of the reference's own output
        pre = generate(model, sc.prompts, steering=steerings, engine="reference", eos_token_id=[], **kw)
        row, step = sc.eos_from
        eos = [int(pre.new_tokens[row, min(step, sc.new_tokens - 1)])]
    ref = generate(model, sc.prompts, steering=steerings, engine="reference", eos_token_id=eos, **kw)
    e = sc.engine
    B = len(sc.prompts)
    opts = dict(attention=e.get("attention", "torch"), prefill_tokens=e.get("prefill_tokens", 4096))
    if engines is None:
        eng = Engine(model, max_batch=B + e.get("spare_batch", 0), max_seq_len=12 + sc.new_tokens + 2, **opts)
    else:
        key = (sc.model_key, e.get("graph_emulation", False), *opts.items())
        if key not in engines:
            engines[key] = Engine(model, max_batch=8, max_seq_len=MAX_LEN, **opts)
        eng = engines[key]
    eng.graph_emulation = e.get("graph_emulation", False)
    if sc.interrupt is not None:
        _interrupt(model, sc, eng)
    problems = []
    for call in range(sc.calls):
        out = _run(model, sc, steerings, eng, eos, kw)
        problems += output_differences(ref, out, lambda i: f"call {call} row {i} ({sc.steer[i]})")
    return problems


def tiny_family_models() -> dict:
    from svgt_fast.tiny import build_tiny_model

    # 7 layers: ConVA steers layers 0 and 1, never the last 5
    return {fam: build_tiny_model(fam, seed=100 + i, num_hidden_layers=7) for i, fam in enumerate(FAMILIES)}


def variant_models() -> dict:
    """One 7-layer model per VARIANTS key, biases drawn N(0, 0.5²) where asked (HF's zeros would
    hide a bias left out)."""
    from svgt_fast.tiny import build_tiny_model

    models = {}
    for i, (name, (family, overrides, random_biases)) in enumerate(sorted(VARIANTS.items())):
        model = build_tiny_model(family, seed=200 + i, num_hidden_layers=7, **overrides)
        if random_biases:
            gen = torch.Generator().manual_seed(300 + i)
            with torch.no_grad():
                for mod in model.modules():
                    if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                        mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.5)
        models[name] = model
    return models


if __name__ == "__main__":
    import os
    import sys
    import time

    os.environ.setdefault("TRITON_INTERPRET", "1")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n, first = int(args[0]), int(args[1]) if len(args) > 1 else 0
    engines = {} if "--shared-engines" in sys.argv else None  # one long-lived engine per configuration
    variants = "--variants" in sys.argv  # the models of VARIANTS instead of the four plain families
    models = variant_models() if variants else tiny_family_models()
    failed = 0
    t0 = time.time()
    for seed in range(first, first + n):
        sc = random_scenario(seed, allow_triton=True, variants=variants)
        try:
            problems = check_scenario(models, sc, engines)
        except Exception as exc:  # noqa: BLE001 — a crash is a finding too
            problems = [f"raised {type(exc).__name__}: {exc}"]
        if problems:
            failed += 1
            print("FAIL", sc.describe())
            for p in problems[:6]:
                print("   ", p)
        if (seed - first + 1) % 10 == 0:
            print(f"{seed - first + 1 - failed}/{seed - first + 1} agree so far ({time.time() - t0:.0f} s)")
        sys.stdout.flush()
    print(f"{n - failed}/{n} scenarios agree ({time.time() - t0:.0f} s)")
