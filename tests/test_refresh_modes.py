"""Refresh modes (DESIGN §2): the engine against the inline-cache eager reference of each mode,
and the modes against each other where their definitions say they must agree."""
import pytest
import torch

from svgt_fast import SVGT, generate
from svgt_fast.reference_modes import generate_row_cached
from svgt_fast.sampling import SamplingParams
from svgt_fast.steering import parse_refresh
from svgt_fast.tiny import build_value_module

from helpers import ragged_prompts

N_NEW = 14


def _cached(model, rows, steering, trace=None):
    return [generate_row_cached(model, torch.tensor(r), steering=steering, max_new_tokens=N_NEW,
                                sampling=SamplingParams(), row_seed=0, eos_ids=frozenset(), trace=trace)
            for r in rows]


@pytest.mark.parametrize("refresh", ["exact", "window=3", "bridge", "project"])
def test_engine_equals_mode_reference(tiny_model, refresh):
    steering = SVGT(build_value_module(tiny_model, seed=40), refresh_interval=3, refresh=refresh)
    rows = ragged_prompts(40, lengths=(6, 11, 3))
    fast = generate(tiny_model, rows, steering=steering, max_new_tokens=N_NEW, engine="fast")
    assert fast.new_tokens.tolist() == _cached(tiny_model, rows, steering)


@pytest.mark.interpreter
@pytest.mark.parametrize("fam, refresh", [("llama", "window=3"), ("qwen3", "window=3"),
                                          ("mistral", "project"), ("qwen2", "project")])
def test_triton_engine_equals_mode_reference(tiny_models, fam, refresh):
    """Our kernels (fused norm, RoPE + cache write, prefix attention) under each static refresh.
    Each family's kernel variant (plain, q/k-norm, sliding window, qkv bias) runs once and each
    mode twice: the interpreter costs ~30 s a run, and the mode logic is family-independent."""
    from svgt_fast import Engine

    tiny_model = tiny_models[fam]
    steering = SVGT(build_value_module(tiny_model, seed=44), refresh_interval=3, refresh=refresh)
    rows = ragged_prompts(44, lengths=(6, 3))
    eng = Engine(tiny_model, max_batch=2, max_seq_len=32, attention="triton")
    fast = generate(tiny_model, rows, steering=steering, max_new_tokens=N_NEW, engine=eng)
    assert fast.new_tokens.tolist() == _cached(tiny_model, rows, steering)


def test_project_mode_kv_patch_op_and_fallback_agree(tiny_models):
    """refresh="project" writes the bridge K/V through the kv_patch op (C++ here); the engine's
    PyTorch path must give the same tokens and the same bridge buffer bits."""
    from svgt_fast import Engine
    from svgt_fast._ops import kv_patch_backend

    model = tiny_models["qwen2"]  # k/v bias on the projection
    steering = SVGT(build_value_module(model, seed=45), refresh_interval=2, refresh="project")
    rows = ragged_prompts(45, lengths=(7, 3))
    runs = []
    for use_op in (True, False):
        eng = Engine(model, max_batch=3, max_seq_len=32)
        eng.use_kv_patch = use_op if use_op is False else None
        out = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine=eng)
        runs.append((out.new_tokens, eng.k_bridge.clone(), eng.v_bridge.clone(), eng.use_kv_patch))
    assert runs[0][3] == (kv_patch_backend() in ("cpp", "cuda"))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    assert runs[0][1].abs().sum() > 0


def test_exact_refresh_row_buckets_change_nothing(tiny_models):
    """The CUDA graphs run an exact refresh over a bucket of >= t response rows (extra rows
    repeat response token 0); on CPU the same padded step must give the unpadded tokens."""
    from svgt_fast import Engine

    model = tiny_models["llama"]
    steering = SVGT(build_value_module(model, seed=46), refresh_interval=3, refresh="exact")
    rows = ragged_prompts(46, lengths=(5, 8))
    plain = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine=Engine(model, max_batch=2, max_seq_len=32))
    eng = Engine(model, max_batch=2, max_seq_len=32)
    padded = []

    def runner(B, plan, sampling):
        def run(tok, t, P, state, seeds, p_max, due):
            padded.append(-(-t // 4) * 4 + 4 - t)
            return eng.refresh_step(tok, t, P, state, seeds, sampling, plan, p_max + t, due,
                                    exact_rows=-(-t // 4) * 4 + 4)
        return run

    eng._refresh_runner = runner
    bucketed = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine=eng)
    assert padded and min(padded) >= 4  # every refresh really ran padded rows
    assert torch.equal(bucketed.new_tokens, plain.new_tokens)


def test_inline_reference_exact_equals_oracle(tiny_models):
    model = tiny_models["qwen2"]
    steering = SVGT(build_value_module(model, seed=41, generator="mlp"), refresh_interval=2, refresh="exact")
    rows = ragged_prompts(41, lengths=(7, 4))
    oracle = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="reference")
    assert oracle.new_tokens.tolist() == _cached(model, rows, steering)


def test_mode_nesting(tiny_models):
    """window >= every response token is exact; bridge is window=0."""
    model = tiny_models["llama"]
    module = build_value_module(model, seed=42)
    rows = ragged_prompts(42, lengths=(5, 9))
    run = lambda refresh: generate(model, rows, max_new_tokens=N_NEW, engine="fast",
                                   steering=SVGT(module, refresh_interval=2, refresh=refresh)).new_tokens
    assert torch.equal(run("window=100"), run("exact"))
    assert torch.equal(run("window=0"), run("bridge"))


def test_window_wider_than_the_cache_is_exact(tiny_models):
    """A window wider than the engine's cache is every response token: window=10**12 tried to
    allocate 10**12 rows per refresh; it is now as wide as the cache and equals exact, on the
    eager step, an emulated graph and the reference."""
    from svgt_fast import Engine

    model = tiny_models["llama"]
    module = build_value_module(model, seed=44)
    rows = ragged_prompts(44, lengths=(4, 7))
    exact = generate(model, rows, max_new_tokens=N_NEW, steering=SVGT(module, refresh_interval=2)).new_tokens
    wide = SVGT(module, refresh_interval=2, refresh=f"window={10**12}")
    assert torch.equal(generate(model, rows, max_new_tokens=N_NEW, steering=wide).new_tokens, exact)
    assert torch.equal(generate(model, rows, max_new_tokens=N_NEW, steering=wide, engine="reference").new_tokens, exact)
    eng = Engine(model, max_batch=2, max_seq_len=32)
    eng.graph_emulation = True
    out = generate(model, rows, max_new_tokens=N_NEW, steering=wide, engine=eng)
    assert torch.equal(out.new_tokens, exact) and out.timings["graph_steps"] == N_NEW - 1


def test_approximate_modes_really_differ_from_exact(tiny_models):
    """Stale response K/V (bridge) and the projection shortcut change the logits after a refresh."""
    model = tiny_models["mistral"]
    module = build_value_module(model, seed=43)
    prompt = ragged_prompts(43, lengths=(8,))
    traces = {}
    for refresh in ("exact", "bridge", "project"):
        traces[refresh] = []
        _cached(model, prompt, SVGT(module, refresh_interval=4, refresh=refresh), trace=traces[refresh])
    for mode in ("bridge", "project"):
        # Identical up to the first refresh (step 4), different from it on.
        for t in range(4):
            torch.testing.assert_close(traces[mode][t], traces["exact"][t], rtol=1e-5, atol=1e-5)
        assert (traces[mode][4] - traces["exact"][4]).abs().max() > 1e-3, mode


@pytest.mark.parametrize("bad", ["window=-1", "window=", "windows", "exact2", "window=2.5", 3, "window=\u00b2"])
def test_bad_refresh_option(bad):
    with pytest.raises(ValueError, match="refresh must be one of"):
        parse_refresh(bad)


def test_parse_refresh():
    assert parse_refresh("exact") == ("exact", None)
    assert parse_refresh("bridge") == ("window", 0)
    assert parse_refresh("window=7") == ("window", 7)
    assert parse_refresh("project") == ("project", None)


def test_reference_passes_the_cache_under_the_layers_own_name():
    """transformers renamed the decoder layers' `past_key_values` argument to `cache` (the old
    name deprecated, removal announced for 5.40); the mode references must pass whichever the
    installed version's layer takes, or the inline cache would silently be dropped."""
    from svgt_fast.reference_modes import _cache_kwarg

    class New(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
            return hidden_states

    class Old(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
            return hidden_states

    assert _cache_kwarg(New) == "cache" and _cache_kwarg(Old) == "past_key_values"
